"""Delivery events pushed to the backend: sluice relays mail from Python
to smtp-sink (MX records from dnsmasq) and pushes every delivery log
event to a webhook (a Python http.server in this process that checks
each batch's HMAC signature and freshness) or to a Redis stream (a
redis-server started here). Checks: every event of every message arrives
at least once, signed, in order per message; nothing is lost while the
receiver refuses (503), is down across a restart and a kill -9 of
sluice, or hangs; one event the receiver refuses (400) is dropped alone;
Redis killed and back; pause and resume; the stats socket's and
/metrics' view of each sink.

Every event the delivery log file holds must reach the sink: the file and
the spool get the same lines, so it is the reference (the file may show
an event a moment before its commit reaches the journal: counts of
pending events are waited for, not read once). Waits poll a condition
with a deadline; nothing depends on speed."""
import hashlib
import hmac
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from harness import Redis, Sluice, Workdir, extra_env, free_port, main, skip, wait_until
import test_delivery
from test_delivery import Dns, Sink, records_for
from test_outcomes import events


def dlog_events(path):
    """The delivery log's events while sluice runs (a line being written
    is left for the next read)."""
    return events(path, settled=False)


SLUICE = sys.argv[1]
test_delivery.SLUICE = SLUICE
SECRET = "s3cret-for-tests"
DOMAIN = "ev.test"


class Receiver:
    """A webhook endpoint: HTTP/1.1 keep-alive, checks the signature and
    the timestamp, keeps every event by event_id. `status` is what it
    answers; while `hold` is set, each request waits until it is cleared
    (a receiver that hangs)."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.refuse = None     # event -> True: a batch holding it is answered 400
        self.refused = 0       # batches answered 400 so
        self.lock = threading.Lock()
        self.events = {}       # event_id -> event (the first copy)
        self.clashes = []      # (first, other): a copy unlike the first
        self.order = []        # event_ids in arrival order (every copy)
        self.requests = 0
        self.accepted = 0
        self.bad_signatures = 0
        self.connections = set()
        self.status = 200
        self.replies = []      # (status, Retry-After or None) for the next requests, first first
        self.times = []        # time.monotonic() of each request
        self.secret = SECRET
        self.hold = threading.Event()  # set: requests wait
        self.released = threading.Event()
        self.server = None
        self.start()

    def start(self):
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                ts = self.headers.get("X-Sluice-Timestamp", "")
                sig = self.headers.get("X-Sluice-Signature", "")
                want = "sha256=" + hmac.new(rec.secret.encode(), ts.encode() + b"." + body,
                                            hashlib.sha256).hexdigest()
                fresh = ts.isdigit() and abs(time.time() - int(ts)) < 300
                retry_after = None
                with rec.lock:
                    rec.requests += 1
                    rec.times.append(time.monotonic())
                    rec.connections.add(self.client_address)
                    status = rec.status
                    if rec.replies:
                        status, retry_after = rec.replies.pop(0)
                    if not (hmac.compare_digest(want, sig) and fresh):
                        rec.bad_signatures += 1
                        status = 401
                if rec.hold.is_set():
                    rec.released.wait(60)
                if status == 200 and rec.refuse is not None and \
                        any(rec.refuse(ev) for ev in json.loads(body)):
                    status = 400  # a consumer that cannot take one event
                    with rec.lock:
                        rec.refused += 1
                if status == 200:
                    batch = json.loads(body)
                    assert isinstance(batch, list)
                    with rec.lock:
                        rec.accepted += 1
                        for ev in batch:
                            rec.order.append(ev["event_id"])
                            first = rec.events.setdefault(ev["event_id"], ev)
                            if first != ev:  # one event_id, two events
                                rec.clashes.append((first, ev))
                out = b"{}"
                try:
                    self.send_response(status)
                    if retry_after is not None:
                        self.send_header("Retry-After", retry_after)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except OSError:  # sluice gave up waiting (the hanging receiver)
                    self.close_connection = True

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        if self.server is not None:
            self.released.set()
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(10)
            self.server = None

    def count(self):
        with self.lock:
            return len(self.events)


def redis_cli(port, *args):
    r = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                       timeout=30)
    return r.stdout


class Node:
    """dnsmasq + smtp-sink + sluice with [events] sections (`sinks`:
    config text), a delivery log and a stats socket."""

    def __init__(self, sinks, metrics=False, flush="50ms"):
        for tool in ("dnsmasq", "smtp-sink"):
            if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
                skip(f"{tool} not installed (tools/install-deps --test)")
        self.wd = Workdir("sluice-ev-")
        self.dns = self.sink = self.d = None
        try:
            mx_port = free_port()
            self.dns = Dns(self.wd, records_for([DOMAIN]))
            self.sink = Sink(self.wd, mx_port)
            self.port = free_port()
            self.spool = os.path.join(self.wd.path, "spool")
            self.dlog = os.path.join(self.wd.path, "delivery.jsonl")
            self.sock = os.path.join(self.wd.path, "stats.sock")
            self.http_port = free_port() if metrics else None
            self.conf = self.wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{self.port}
trusted_networks = 127.0.0.0/8
max_recipients = 1000
[queue]
path = {self.spool}
map_size = 512M
[delivery]
remote_port = {mx_port}
allow_networks = 127.0.0.0/8
connect_timeout = 2s
idle_timeout = 1s
[dns]
servers = 127.0.0.1:{self.dns.port}
[bounce]
dsn = no
[log]
delivery_log = {self.dlog}
delivery_log_flush = {flush}
[stats]
socket = {self.sock}
{f"http_listen = 127.0.0.1:{self.http_port}" if metrics else ""}
{sinks}
""")
            self.start()
        except BaseException:
            self.close()
            raise

    def start(self):
        self.d = Sluice(SLUICE, self.conf)
        self.d.wait_log("event=ready")

    def ctl(self, line, timeout=10):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.sock)
            s.sendall(line.encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise AssertionError(f"stats socket closed before answering {line!r}")
                buf += chunk
        return json.loads(buf.split(b"\n", 1)[0])

    def sink_stats(self, name):
        for s in self.ctl("events")["sinks"]:
            if s["name"] == name:
                return s
        raise AssertionError(f"no sink {name}")

    def inject(self, n, tag):
        msgs = [("s@example.com", [f"{tag}{i}@{DOMAIN}"],
                 f"Subject: {tag}{i}\r\n\r\nbody {i}\r\n".encode()) for i in range(n)]
        test_delivery.Relay.inject(self, msgs)

    def delivered(self):
        return sum(1 for e in dlog_events(self.dlog) if e["event"] == "delivery")

    def wait_delivered(self, n, timeout=180):
        wait_until(lambda: self.delivered() >= n, timeout, f"{n} deliveries in the log")

    def close(self):
        try:
            if self.d is not None and self.d.proc.poll() is None:
                assert self.d.stop_clean() == 0
        finally:
            for p in (self.sink, self.dns):
                if p is not None:
                    p.stop()
            self.wd.cleanup()


def hook_conf(port, extra="", name="hook", secret=SECRET):
    """An [events NAME] section; extra's "key = value" lines replace the
    defaults here (a key set twice is an error) or add to them."""
    keys = {"url": f"http://127.0.0.1:{port}/events", "secret": secret, "batch_max": "500",
            "batch_wait": "100ms", "timeout": "5s", "retry_min": "100ms", "retry_max": "500ms"}
    for line in extra.splitlines():
        if line.strip():
            k, v = line.split("=", 1)
            keys[k.strip()] = v.strip()
    body = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return f"""
[events {name}]
{body}"""


def key(ev):
    """What identifies an event of the delivery log: its type, queue id,
    recipient and time (an event_id is not in the file)."""
    return (ev["event"], ev["id"], ev.get("rcpt"), ev["time"])


def check_all_arrived(node, rec, timeout=120):
    """Every line of the delivery log reached the receiver (at least once),
    each event_id always with the same event; returns the log's events."""
    def done():
        want = dlog_events(node.dlog)
        with rec.lock:
            got = {key(e) for e in rec.events.values()}
        return want if all(key(e) in got for e in want) else None
    want = wait_until(done, timeout, "every delivery log event at the receiver")
    with rec.lock:
        assert rec.bad_signatures == 0, f"{rec.bad_signatures} requests badly signed"
        ids = {}
        for eid, ev in rec.events.items():
            assert eid.count("-") == 1 and len(eid.split("-")[0]) == 16, eid
            ids.setdefault(key(ev), set()).add(eid)
        twice = [k for k, v in ids.items() if len(v) != 1]
        assert not twice, f"one event under several event_ids: {twice[:3]}"
    return want


def check_order_per_message(rec):
    """What consumers may rely on (README, "Event sinks"): events are
    numbered (the number after the dash of event_id) in the order their
    spool transactions committed, a message's reception before any of its
    outcomes, and each sink receives them in that order (a batch that is
    sent again after a failure or a restart starts again from its first
    event: only first copies count). Returns how many deliveries broke
    that, by number or by arrival of first copies."""
    with rec.lock:
        first, arrival = {}, {}
        for i, eid in enumerate(rec.order):
            ev = rec.events[eid]
            k = (ev["id"], ev["event"], ev.get("rcpt"))
            first.setdefault(k, int(eid.split("-")[1]))
            arrival.setdefault(k, i)
        late = 0
        for (qid, kind, rcpt), seq in first.items():
            if kind == "delivery":
                r = (qid, "reception", None)
                late += r not in first or first[r] > seq or arrival[r] > arrival[(qid, kind, rcpt)]
        return late


def test_every_event_of_10000_messages_arrives_signed():
    rec = Receiver()
    node = Node(hook_conf(rec.port))
    try:
        n = int(os.environ.get("SLUICE_EVENTS_MESSAGES", "10000"))
        node.inject(n, "a")
        node.wait_delivered(n)
        want = check_all_arrived(node, rec)
        assert sum(1 for e in want if e["event"] == "reception") == n
        assert sum(1 for e in want if e["event"] == "delivery") == n
        late = check_order_per_message(rec)
        assert late == 0, f"{late} deliveries before (or without) their reception"
        st = wait_until(lambda: (lambda s: s if s["pending"] == 0 else None)(
            node.sink_stats("hook")), 30, "pending 0")
        assert st["sent"] >= 2 * n, st
        assert st["kind"] == "http" and st["failed_attempts"] == 0, st
        with rec.lock:
            # batches of up to 500 on kept-alive connections
            assert rec.requests >= 2 * n // 500, rec.requests
            assert len(rec.connections) <= 3, f"{len(rec.connections)} connections " \
                                              f"for {rec.requests} requests: no keep-alive"
        print(f"     {2 * n} events in {rec.requests} requests on "
              f"{len(rec.connections)} connection(s); {late} reception(s) after a delivery")
    finally:
        node.close()
        rec.stop()


def test_503_for_a_while_then_accepted():
    rec = Receiver()
    rec.status = 503
    node = Node(hook_conf(rec.port))
    try:
        node.inject(300, "b")
        node.wait_delivered(300)
        wait_until(lambda: node.sink_stats("hook")["failed_attempts"] >= 3, 30,
                   "three refused attempts")
        # the file can show a delivery before its commit is journaled
        st = wait_until(lambda: (lambda x: x if x["pending"] >= 600 else None)(
            node.sink_stats("hook")), 30, "600 pending")
        assert "503" in st["last_error"], st
        assert rec.count() == 0
        rec.status = 200
        check_all_arrived(node, rec)
        wait_until(lambda: node.sink_stats("hook")["pending"] == 0, 30, "pending 0")
    finally:
        node.close()
        rec.stop()


def test_retry_after_of_429_and_503_heeded():
    """An endpoint that answers 429 or 503 with Retry-After (seconds, or
    an HTTP date) is asked again no sooner than it says, up to retry_max,
    not after retry_min (100 ms here: a rate-limited endpoint got a
    request every few hundred ms, each refused again); then everything
    arrives."""
    import email.utils
    rec = Receiver()
    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    rec.replies = [(429, "2"), (503, when), (429, "3600")]
    node = Node(hook_conf(rec.port, "retry_max = 4s"))
    try:
        node.inject(5, "r")
        node.wait_delivered(5)
        check_all_arrived(node, rec, timeout=60)
        with rec.lock:
            t = list(rec.times)
        gaps = [b - a for a, b in zip(t, t[1:])]
        assert len(gaps) >= 3, gaps
        # 2 s; the date's (whole seconds: 1 to 3 s after the second
        # request); 3600 s capped at retry_max
        assert gaps[0] >= 1.9 and gaps[1] >= 0.9 and 3.9 <= gaps[2] < 30, gaps
        line = node.d.wait_log("event=events_sink_failing")
        assert "retry_ms=2000" in line, line
    finally:
        node.close()
        rec.stop()


def test_receiver_down_across_restart_and_kill9():
    port = free_port()  # nobody listens: connections are refused
    node = Node(hook_conf(port))
    rec = None
    try:
        node.inject(200, "c")
        node.wait_delivered(200)
        wait_until(lambda: node.sink_stats("hook")["pending"] >= 400, 30, "400 pending")
        # known once the sink read its first batch (and failed to send it)
        wait_until(lambda: node.sink_stats("hook")["oldest_pending_age_ms"] > 0, 30,
                   "an oldest pending age")
        assert "refused" in node.sink_stats("hook")["last_error"].lower() or \
            "connect" in node.sink_stats("hook")["last_error"].lower(), node.sink_stats("hook")
        assert node.d.stop_clean() == 0
        node.start()
        assert node.sink_stats("hook")["pending"] >= 400  # the backlog is on disk
        node.inject(100, "d")
        node.wait_delivered(300)
        wait_until(lambda: node.sink_stats("hook")["pending"] >= 600, 30, "600 pending")
        node.d.kill9()
        node.start()
        assert node.sink_stats("hook")["pending"] >= 600
        rec = Receiver(port)
        want = check_all_arrived(node, rec)
        assert sum(1 for e in want if e["event"] == "delivery") == 300
        wait_until(lambda: node.sink_stats("hook")["pending"] == 0, 30, "pending 0")
    finally:
        node.close()
        if rec is not None:
            rec.stop()


def test_hanging_receiver_does_not_hold_delivery():
    rec = Receiver()
    rec.hold.set()  # every request waits until released
    node = Node(hook_conf(rec.port, "timeout = 2s"))
    try:
        node.inject(1000, "e")
        node.wait_delivered(1000)  # all delivered while the receiver took nothing
        assert rec.count() == 0
        wait_until(lambda: node.sink_stats("hook")["pending"] >= 2000, 30, "2000 pending")
        rec.hold.clear()
        rec.released.set()
        check_all_arrived(node, rec)
    finally:
        node.close()
        rec.stop()


def test_pause_resume_filter_and_metrics():
    rec = Receiver()
    node = Node(hook_conf(rec.port, "events = delivery\npaused = yes"), metrics=True)
    try:
        assert node.sink_stats("hook")["paused"] is True
        node.inject(50, "f")
        node.wait_delivered(50)
        wait_until(lambda: node.sink_stats("hook")["pending"] >= 100, 30, "100 pending")
        assert rec.count() == 0
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        assert 'sluice_events_pending{sink="hook"} ' in text, text[-2000:]
        assert 'sluice_events_paused{sink="hook"} 1' in text
        st = node.ctl("stats")
        assert st["event_sinks"][0]["name"] == "hook" and st["event_sinks"][0]["paused"]
        ctl = os.path.join(os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl")
        out = subprocess.run([ctl, "-s", node.sock, "events"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert "hook" in out.stdout and "paused" in out.stdout and "PENDING" in out.stdout, \
            out.stdout
        out = subprocess.run([ctl, "-s", node.sock, "events", "resume", "hook"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "active" in out.stdout, out.stdout + out.stderr
        r = node.ctl("events")
        assert r["ok"] and r["sinks"][0]["paused"] is False, r
        assert node.ctl("events resume nosuch")["ok"] is False
        wait_until(lambda: rec.count() >= 50, 30, "50 deliveries at the receiver")
        wait_until(lambda: node.sink_stats("hook")["pending"] == 0, 30, "pending 0")
        with rec.lock:
            kinds = {e["event"] for e in rec.events.values()}
        assert kinds == {"delivery"}, kinds  # the filter left receptions out
        assert rec.count() == 50
        assert node.sink_stats("hook")["filtered"] >= 50
    finally:
        node.close()
        rec.stop()


def test_400_to_one_event_drops_it_alone():
    """A webhook that answers 400 to any batch holding one event (the
    delivery of one recipient: its consumer cannot take it). The sink
    splits the batches until that event is refused alone, drops it
    (logged with its recipient, counted as rejected on the stats socket,
    /metrics and sluicectl) and goes on: every other event arrives, and
    events logged after it too. Before, the batch holding it was sent
    again for ever: nothing after it arrived and the journal grew."""
    rec = Receiver()
    poison = f"p37@{DOMAIN}"
    rec.refuse = lambda ev: ev.get("event") == "delivery" and ev.get("rcpt") == poison
    node = Node(hook_conf(rec.port, "batch_wait = 1s"), metrics=True)
    try:
        node.inject(100, "p")
        node.wait_delivered(100)

        def rejected():
            st = node.sink_stats("hook")
            return st if st["rejected"] >= 1 and st["pending"] == 0 else None
        st = wait_until(rejected, 60, "the refused event dropped and nothing pending")
        assert st["rejected"] == 1, st
        assert "400" in st["last_error"], st
        node.inject(20, "q")  # the sink goes on
        node.wait_delivered(120)
        want = dlog_events(node.dlog)
        bad = [e for e in want if e["event"] == "delivery" and e.get("rcpt") == poison]
        assert len(bad) == 1, bad

        def others_arrived():
            with rec.lock:
                got = {key(e) for e in rec.events.values()}
            return all(key(e) in got for e in dlog_events(node.dlog)
                       if key(e) != key(bad[0]))
        wait_until(others_arrived, 60, "every other event at the receiver")
        with rec.lock:
            assert key(bad[0]) not in {key(e) for e in rec.events.values()}
            assert rec.refused >= 1, rec.refused
        # the file can show an event a moment before its commit is journaled
        st = wait_until(lambda: (lambda s: s if s["pending"] == 0 and
                                 s["sent"] + s["rejected"] >= len(want) else None)(
            node.sink_stats("hook")), 30, "every event sent or rejected")
        assert st["rejected"] == 1 and st["sent"] == len(want) - 1, (st, len(want))
        line = node.d.wait_log("event=events_rejected")
        assert "sink=hook" in line and "status=400" in line and f"rcpt=<{poison}>" in line \
            and "event_id=" in line, line
        assert node.ctl("stats")["event_sinks"][0]["rejected"] == 1
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        assert 'sluice_events_rejected_total{sink="hook"} 1\n' in text, text[-2000:]
        ctl = os.path.join(os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl")
        out = subprocess.run([ctl, "-s", node.sock, "events"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0 and "REJECTED" in out.stdout, out.stdout + out.stderr
    finally:
        node.close()
        rec.stop()


def stream_ids(port, stream):
    """The event_ids in the stream, read with a consumer group (every
    entry delivered to the group once)."""
    redis_cli(port, "XGROUP", "CREATE", stream, "g", "0", "MKSTREAM")
    out = redis_cli(port, "XREADGROUP", "GROUP", "g", "c", "COUNT", "1000000", "STREAMS",
                    stream, ">")
    lines = out.splitlines()
    ids = []
    for i, line in enumerate(lines):
        if line == "event_id" and i + 1 < len(lines):
            ids.append(lines[i + 1])
    return ids


def test_redis_stream_and_redis_killed_and_back():
    if shutil.which("redis-server") is None:
        skip("redis-server not installed (tools/install-deps --test)")
    redis = Redis()
    node = None
    try:
        node = Node(f"""
[events stream]
url = redis://127.0.0.1:{redis.port}/sluice-events
maxlen = 100000
batch_wait = 50ms
timeout = 1s
retry_min = 100ms
retry_max = 500ms
""")
        node.inject(500, "g")
        node.wait_delivered(500)
        want = dlog_events(node.dlog)
        # every event in the stream (the file can be a moment ahead of the journal)
        wait_until(lambda: int(redis_cli(redis.port, "XLEN", "sluice-events").strip() or 0)
                   >= len(want), 60, "every event in the stream")
        wait_until(lambda: node.sink_stats("stream")["pending"] == 0, 60, "pending 0")
        ids = stream_ids(redis.port, "sluice-events")
        assert len(set(ids)) == len(want) == 1000, (len(set(ids)), len(want))
        # the data field is the event itself, with its event_id
        raw = redis_cli(redis.port, "XRANGE", "sluice-events", "-", "+", "COUNT", "1")
        assert '"event_id":"' in raw and '"event":"reception"' in raw, raw

        redis.kill9()
        node.inject(200, "h")
        node.wait_delivered(700)
        wait_until(lambda: node.sink_stats("stream")["failed_attempts"] >= 2, 30,
                   "failed attempts while Redis is away")
        wait_until(lambda: node.sink_stats("stream")["pending"] >= 400, 30, "400 pending")
        redis.start()  # empty: it kept nothing (no persistence)
        wait_until(lambda: node.sink_stats("stream")["pending"] == 0, 60, "pending 0")
        ids = stream_ids(redis.port, "sluice-events")
        assert len(set(ids)) >= 400, len(set(ids))
    finally:
        if node is not None:
            node.close()
        redis.stop()


def test_kill9_right_after_delivery_loses_no_event():
    """The crash window: kill -9 as soon as the MX has every message and
    the spool has every outcome, in bounded rounds, with the receiver
    down; then restart and bring it up. Every recipient the MX saw has
    its delivery event and every such message its reception (by queue
    id). The delivery log's flush interval is long (2 s) so that events
    that would only be in its buffers at the kill are many: events are
    committed with the outcomes, so none of them may be missing."""
    port = free_port()  # nobody listens until the end
    node = Node(hook_conf(port), flush="2s")
    rec = None
    try:
        rounds, per = 5, 60
        for r in range(rounds):
            tag = f"k{r}x"
            node.inject(per, tag)
            want = {f"{tag}{i}" for i in range(per)}
            def seen():
                subjects = set()
                for m in node.sink.messages():
                    for line in m.split(b"\n"):
                        if line.startswith(b"Subject: "):
                            subjects.add(line[9:].strip().decode())
                return want <= subjects
            wait_until(seen, 120, f"round {r}: the MX to have every message")
            wait_until(lambda: node.ctl("stats")["queue"]["messages"] == 0, 60,
                       f"round {r}: every outcome in the spool")
            node.d.kill9()
            node.start()
        rcpts = set()
        for m in node.sink.messages():
            for line in m.split(b"\n"):
                if line.startswith(b"Subject: "):
                    rcpts.add(f"{line[9:].strip().decode()}@{DOMAIN}")
        assert len(rcpts) == rounds * per, len(rcpts)
        rec = Receiver(port)

        def delivered_rcpts():
            with rec.lock:
                return {e["rcpt"] for e in rec.events.values() if e["event"] == "delivery"}
        try:
            wait_until(lambda: rcpts <= delivered_rcpts(), 60,
                       "a delivery event for every recipient the MX saw")
        finally:
            missing = rcpts - delivered_rcpts()
            if missing:
                print(f"     {len(missing)} of {len(rcpts)} delivery events lost, e.g. "
                      f"{sorted(missing)[:3]}")
        assert delivered_rcpts() == rcpts
        with rec.lock:
            got = list(rec.events.values())
        received = {e["id"] for e in got if e["event"] == "reception"}
        ids = {e["id"] for e in got if e["event"] == "delivery"}
        assert ids <= received, f"{len(ids - received)} messages without their reception event"
        assert check_order_per_message(rec) == 0
        wait_until(lambda: node.sink_stats("hook")["pending"] == 0, 30, "pending 0")
    finally:
        node.close()
        if rec is not None:
            rec.stop()


def test_reload_adds_changes_and_removes_sinks():
    """[events NAME] sections follow SIGHUP: a sink added by a reload gets
    every event from then on (and none from before); a changed secret
    signs the next batches (the receiver checks with the new one only); a
    removed sink stops, its cursor stays on disk, and added back (here
    with another URL) it resumes from that cursor: it gets every event
    logged while it was away."""
    a, b, c = Receiver(), Receiver(), Receiver()
    node = Node(hook_conf(a.port))
    base = open(node.conf).read()

    def reload(sinks, needle):
        with open(node.conf, "w") as f:
            f.write(base.replace(hook_conf(a.port), sinks))
        n = len([l for l in node.d.lines if needle in l])
        node.d.signal(signal.SIGHUP)
        node.d.wait_log_count(needle, n + 1)

    def ids_at(rec, tag):
        with rec.lock:
            return {e["id"] for e in rec.events.values()
                    if e["event"] == "delivery" and e["rcpt"].startswith(tag)}

    def all_of(rec, tag, n):
        """Every event (reception and delivery) of the n messages of tag."""
        def done():
            ids = ids_at(rec, tag)
            with rec.lock:
                rx = {e["id"] for e in rec.events.values() if e["event"] == "reception"}
            return len(ids) == n and ids <= rx
        wait_until(done, 60, f"every event of {tag} at {rec.port}")

    try:
        node.inject(20, "ra")
        all_of(a, "ra", 20)
        # add "second": from now on
        reload(hook_conf(a.port) + hook_conf(b.port, name="second"),
               "event=events_sink_added sink=second")
        node.inject(20, "rb")
        all_of(a, "rb", 20)
        all_of(b, "rb", 20)
        assert not ids_at(b, "ra"), "a sink added by a reload got events from before it"
        assert {s["name"] for s in node.ctl("events")["sinks"]} == {"hook", "second"}
        for name in ("hook", "second"):
            wait_until(lambda: node.sink_stats(name)["pending"] == 0, 30, f"{name} pending 0")
        # a new secret: the receiver accepts only it from now on
        a.secret = "the-new-secret"
        reload(hook_conf(a.port, secret="the-new-secret") + hook_conf(b.port, name="second"),
               "event=events_sink_changed sink=hook")
        node.inject(20, "rc")
        all_of(a, "rc", 20)
        all_of(b, "rc", 20)
        with a.lock:
            assert a.bad_signatures == 0, f"{a.bad_signatures} batches badly signed"
        wait_until(lambda: node.sink_stats("second")["pending"] == 0, 30, "second pending 0")
        # remove "second": it stops, its cursor stays
        reload(hook_conf(a.port, secret="the-new-secret"), "event=events_sink_removed sink=second")
        assert [s["name"] for s in node.ctl("events")["sinks"]] == ["hook"]
        assert os.path.exists(os.path.join(node.spool, "events", "cursor.second"))
        node.inject(20, "rd")
        all_of(a, "rd", 20)
        assert not ids_at(b, "rd"), "a removed sink still got events"
        # back, at another URL: it resumes from its cursor
        reload(hook_conf(a.port, secret="the-new-secret") + hook_conf(c.port, name="second"),
               "event=events_sink_added sink=second")
        all_of(c, "rd", 20)
        assert not ids_at(c, "rc"), "the cursor was not kept: events before it sent again"
        with a.lock, b.lock, c.lock:
            assert a.bad_signatures == b.bad_signatures == c.bad_signatures == 0
    finally:
        node.close()
        for r in (a, b, c):
            r.stop()


def test_suppressed_event_committed_alone_arrives():
    """An event that changes nothing in the spool (a recipient refused at
    RCPT as suppressed) is committed alone (the delivery log's hook) and
    reaches the sink like the others, numbered after the events committed
    before it."""
    rec = Receiver()
    node = Node("[suppress]\n" + hook_conf(rec.port))
    try:
        r = node.ctl("suppress add gone@ev.test")
        assert r.get("ok") is True, r
        node.inject(3, "sa")
        import smtplib
        with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as c:
            c.ehlo("tester")
            c.mail("s@example.com")
            code, _ = c.rcpt("gone@ev.test")
            assert code == 550, code
            c.rset()

        def suppressed():
            with rec.lock:
                return [(int(eid.split("-")[1]), e) for eid, e in rec.events.items()
                        if e["event"] == "suppressed"]
        wait_until(lambda: suppressed(), 60, "the suppressed event at the receiver")
        seq, ev = suppressed()[0]
        assert ev["rcpt"] == "gone@ev.test" and ev["reason"] == "manual", ev
        def receptions():
            with rec.lock:
                return [int(eid.split("-")[1]) for eid, e in rec.events.items()
                        if e["event"] == "reception"]
        before = wait_until(lambda: (lambda r: r if len(r) == 3 else None)(receptions()), 60,
                            "three receptions at the receiver")
        assert len(before) == 3 and max(before) < seq, (before, seq)
    finally:
        node.close()
        rec.stop()


def test_pending_counts_events_not_yet_journaled():
    """A sink's pending counts the events committed in the spool that the
    pump has not copied to the journal yet (here: its writes to the
    journal fail, a full or broken disk). Counted from the journal's end
    alone it showed 0 with a message's events still in the spool, and a
    backend (or a test) that waited for 0 missed them: the kill -9 test
    failed so in CI, its last message's delivery events not yet pumped."""
    shim = sys.argv[4] if len(sys.argv) > 4 else None
    if shim is None or not os.path.exists(shim):
        print("     no fail-writes shim (argv[4]): not run")
        return
    import tempfile
    from harness import preload
    rec = Receiver()
    node = Node(hook_conf(rec.port, "batch_wait = 10ms"))
    trigger = tempfile.mktemp(prefix="sluice-fail-writes-")
    env = {"LD_PRELOAD": preload(SLUICE, shim), "FAIL_WRITES_PATH": ".seg",
           "FAIL_WRITES_TRIGGER": trigger}
    try:
        assert node.d.stop_clean() == 0
        with extra_env(env):
            node.start()
        node.inject(1, "pa")
        node.wait_delivered(1)
        wait_until(lambda: len(rec.events) == 2 and node.sink_stats("hook")["pending"] == 0, 60,
                   "the first message's two events at the receiver")
        open(trigger, "w").close()
        node.inject(1, "pb")
        node.wait_delivered(2)
        # told in the delivery log after the commit that holds its events
        pending = node.sink_stats("hook")["pending"]
        assert pending >= 2, f"pending {pending} with two events not journaled: " \
            f"{node.sink_stats('hook')} {node.d.log_lines('journal')}"
        # and they age from the journal's first failure (the alert on the
        # oldest's age read 0 for them: none was in the journal)
        wait_until(lambda: node.sink_stats("hook")["oldest_pending_age_ms"] >= 1000, 30,
                   "the events in the spool aging")
        os.unlink(trigger)
        wait_until(lambda: node.sink_stats("hook")["pending"] == 0, 60, "pending 0")
        with rec.lock:
            got = sorted((e["event"], e.get("rcpt", "")) for e in rec.events.values())
        assert ("delivery", f"pb0@{DOMAIN}") in got, got
        assert len(got) == 4, got
    finally:
        if os.path.exists(trigger):
            os.unlink(trigger)
        node.close()
        rec.stop()


def test_pending_0_after_the_journal_made_anew():
    """A journal made anew beside a spool that numbered events before
    (its events/ directory removed, the spool's events all trimmed): the
    spool's numbers from the journal's end to its last are in neither,
    and a sink's pending, counted up to the spool's last number, showed
    them as pending until the next event came (for ever on an idle
    node). The pump moves the journal on past them at once, and tells
    the sinks: one already waiting for an append, its cursor before the
    skipped numbers, kept counting them until the next event. The
    fail-writes shim holds the pump's skip (the rename of the empty
    segment) until the node is ready, its sink waiting; without the shim
    the test runs in whichever order the threads take. The symptom is
    asked here (pending 0 soon): a sink also looks at the journal's end
    each second it waits, so the tell itself is test_events' (unit)
    test_skip_whose_sync_failed_is_told to pin."""
    shim = sys.argv[4] if len(sys.argv) > 4 else None
    import tempfile
    from harness import preload
    trigger = tempfile.mktemp(prefix="sluice-fail-writes-")
    env = {}
    if shim is not None and os.path.exists(shim):
        env = {"LD_PRELOAD": preload(SLUICE, shim), "FAIL_WRITES_PATH": ".seg",
               "FAIL_WRITES_TRIGGER": trigger, "FAIL_WRITES_MODE": "stall"}
    else:
        print("     no fail-writes shim (argv[4]): the threads' order not forced")
    rec = Receiver()
    node = Node(hook_conf(rec.port, "batch_wait = 10ms"))
    try:
        node.inject(1, "ja")
        node.wait_delivered(1)
        wait_until(lambda: len(rec.events) == 2 and node.sink_stats("hook")["pending"] == 0, 60,
                   "the first message's two events at the receiver")
        assert node.d.stop_clean() == 0
        shutil.rmtree(os.path.join(node.spool, "events"))
        if env:
            open(trigger, "w").close()
        with extra_env(env):
            node.start()
        if env:
            wait_until(lambda: os.path.exists(trigger + ".held"), 30, "the pump's skip held")
            assert node.sink_stats("hook")["pending"] > 0, node.sink_stats("hook")
            os.unlink(trigger)
        wait_until(lambda: node.sink_stats("hook")["pending"] == 0, 10,
                   "pending 0 with nothing to send")
        assert node.sink_stats("hook")["dropped"] == 0, node.sink_stats("hook")
        node.inject(1, "jb")
        node.wait_delivered(2)
        wait_until(lambda: len(rec.events) == 4 and node.sink_stats("hook")["pending"] == 0, 60,
                   "the second message's two events at the receiver")
        with rec.lock:
            assert not rec.clashes, f"one event_id, two events: {rec.clashes[:2]}"
    finally:
        for f in (trigger, trigger + ".held"):
            if os.path.exists(f):
                os.unlink(f)
        node.close()
        rec.stop()


def test_rcpt_refused_for_its_address_is_an_event():
    """A recipient refused at RCPT for its address (553: a bad domain, a
    local part too long, an address literal that is neither IPv4 nor
    IPv6; 553 5.6.7, UTF-8 without SMTPUTF8) gets no outcome later: a
    "rejection" event (KumoMTA's Rejection record) reaches the delivery
    log and the sinks, with the address as the client wrote it, the
    reply and why, as a suppressed recipient's "suppressed" event does;
    it was told only to the client. Under X-Sluice-Tenant it carries the
    message's tenant. The recipients accepted are delivered."""
    rec = Receiver()
    node = Node("[tenant acme]\n" + hook_conf(rec.port))
    try:
        import smtplib
        bad = ["a@host-.ev.test", "x" * 65 + "@ev.test", "c@[x-tag:any]", "d\x01e@ev.test",
               "j\u00fcrg@ev.test"]
        with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as c:
            c.ehlo("tester")
            c.command_encoding = "utf-8"  # the UTF-8 address, sent without SMTPUTF8
            c.mail("s@example.com")
            code, _ = c.rcpt(f"ok@{DOMAIN}")
            assert code == 250, code
            for a in bad:
                code, msg = c.docmd("RCPT", f"TO:<{a}> NOTIFY=NEVER")
                assert code == 553, (a, code, msg)
            code, _ = c.data(b"X-Sluice-Tenant: acme\r\nSubject: r\r\n\r\nbody\r\n")
            assert code == 250, code
        node.wait_delivered(1)

        def rejections():
            with rec.lock:
                return [e for e in rec.events.values() if e["event"] == "rejection"]
        wait_until(lambda: len(rejections()) >= len(bad), 60, "the rejection events")
        got = {e["rcpt"]: e for e in rejections()}
        assert sorted(got) == sorted(bad), sorted(got)
        for a, e in got.items():
            assert e["code"] == 553 and e["sender"] == "s@example.com", e
            assert e["tenant"] == "acme" and e["client"] == "127.0.0.1" and e["reason"], e
            assert "id" not in e and "domain" not in e, e
        assert got["c@[x-tag:any]"]["reply"].startswith("553 5.1.3 Address literals"), got
        assert got["j\u00fcrg@ev.test"]["reply"].startswith("553 5.6.7"), got
        assert got["x" * 65 + "@ev.test"]["reason"] == "local part over 64 octets", got
        logged = [e for e in dlog_events(node.dlog) if e["event"] == "rejection"]
        assert sorted(e["rcpt"] for e in logged) == sorted(bad), logged
        assert node.d.count_log("event=rcpt_rejected") == len(bad)
    finally:
        node.close()
        rec.stop()


def test_tenant_filter_compares_without_case():
    """A sink's `tenants` names tenants in any case, as every other tenant
    name does ([tenant Acme] is `acme` in a scope, X-Sluice-Tenant: ACME
    is Acme): a filter in another case than the section's must not drop
    every event of that tenant for good."""
    rec = Receiver()
    node = Node("[tenant Acme]\n[tenant globex]\n" +
                hook_conf(rec.port, extra="tenants = acme, GLOBEX"))
    try:
        msgs = [("s@example.com", [f"t{i}@{DOMAIN}"],
                 f"X-Sluice-Tenant: {t}\r\nSubject: t{i}\r\n\r\nbody\r\n".encode())
                for i, t in enumerate(["ACME", "acme", "Globex"])]
        test_delivery.Relay.inject(node, msgs)
        node.wait_delivered(3)
        def got():
            with rec.lock:
                return sorted((e["event"], e.get("tenant")) for e in rec.events.values())
        want = sorted([("reception", "Acme")] * 2 + [("delivery", "Acme")] * 2 +
                      [("reception", "globex"), ("delivery", "globex")])
        wait_until(lambda: got() == want, 60, f"{want} at the receiver, have {got()}")
    finally:
        node.close()
        rec.stop()


if __name__ == "__main__":
    # Three ctest entries (tests/integ/CMakeLists.txt), so that each stays
    # well inside its timeout under the sanitizers: "push" (the default),
    # "crash" (the kill -9 rounds and the reload) and "reject" (an
    # endpoint that refuses one event).
    group = sys.argv[3] if len(sys.argv) > 3 else "push"
    groups = {
        "reject": [test_400_to_one_event_drops_it_alone, test_retry_after_of_429_and_503_heeded],
        "crash": [test_kill9_right_after_delivery_loses_no_event,
                  test_reload_adds_changes_and_removes_sinks,
                  test_suppressed_event_committed_alone_arrives,
                  test_pending_counts_events_not_yet_journaled,
                  test_pending_0_after_the_journal_made_anew,
                  test_rcpt_refused_for_its_address_is_an_event,
                  test_tenant_filter_compares_without_case],
        "push": [test_every_event_of_10000_messages_arrives_signed,
                 test_503_for_a_while_then_accepted, test_receiver_down_across_restart_and_kill9,
                 test_hanging_receiver_does_not_hold_delivery, test_pause_resume_filter_and_metrics,
                 test_redis_stream_and_redis_killed_and_back],
    }
    main(groups.get(group, groups["push"]), every=[t for g in groups.values() for t in g])
