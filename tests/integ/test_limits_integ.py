"""Sending limits against real servers on loopback: dnsmasq gives the test
domain its MX, smtp-sink receives, redis-server holds the shared budget,
and one or two sluice nodes relay what Python injects. Checks, from the
delivery log's event times and the sockets open to the sink: a message
rate with its burst holds in every 1-second window and is reached on
average, on one node and across two sharing a Redis; max_connections holds
across nodes, for one domain and for an [mx] cap over 300 domains whose
connections move from domain to domain; a Redis killed mid-run leaves delivery going on local shares
and is picked up again once back, the connection caps holding again
(those opened on local shares beyond them end), and an [mx] cap lowered
by a reload holds across nodes within a lease refresh; a node killed while holding connection
leases gives them up after lease_ttl; suspend and resume through the stats
socket stop and restart a domain within a second."""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from harness import (Redis, Sluice, Workdir, free_port, log_time, main, site_worker, skip,
                     wait_until)
import test_delivery
from test_delivery import Dns, Sink, records_for
from test_outcomes import events

SLUICE = sys.argv[1]
test_delivery.SLUICE = SLUICE

DOMAIN = "rate.test"


# ---- the pieces: Redis, a sluice node, a cluster of them ----

def connectable(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Node:
    """One sluice with its own spool, submission port, delivery log and
    stats socket; `extra` (config text) is appended."""

    def __init__(self, wd, name, dns_port, mx_port, extra):
        self.name = name
        self.port = free_port()
        self.spool = os.path.join(wd.path, f"{name}-spool")
        self.dlog = os.path.join(wd.path, f"{name}-delivery.jsonl")
        self.sock = os.path.join(wd.path, f"{name}-stats.sock")
        conf = wd.file(f"{name}.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{self.port}
trusted_networks = 127.0.0.0/8
max_recipients = 1000
[queue]
path = {self.spool}
map_size = 128M
[delivery]
remote_port = {mx_port}
allow_networks = 127.0.0.0/8
connect_timeout = 2s
idle_timeout = 1s
[dns]
servers = 127.0.0.1:{dns_port}
[bounce]
dsn = no
[log]
delivery_log = {self.dlog}
delivery_log_flush = 50ms
[stats]
socket = {self.sock}
{extra}
""")
        self.d = Sluice(SLUICE, conf)
        self.d.wait_log("event=ready")

    def ctl(self, line, timeout=5):
        """One command on the stats socket; the parsed one-line answer."""
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

    def redis_state(self):
        return self.ctl("stats")["redis"]["state"]

    def outbound_open(self):
        return self.ctl("stats")["connections"]["outbound_open"]

    def inject(self, messages, sessions=4):
        inject(self.port, messages, sessions)

    def alive(self):
        return self.d.proc.poll() is None


def inject(port, messages, sessions=4):
    """messages: [(sender, [rcpts], body)], pipelined over a few sessions;
    returns once every one got its 250."""
    socks = []
    for i in range(sessions):
        chunk = messages[i::sessions]
        if not chunk:
            continue
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"EHLO tester\r\n")
        while f.readline()[3:4] == b"-":
            pass
        socks.append((s, f, chunk))
    for s, f, chunk in socks:
        for sender, rcpts, body in chunk:
            s.sendall(b"MAIL FROM:<%s>\r\n" % sender.encode() +
                      b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts) + b"DATA\r\n")
            for _ in range(1 + len(rcpts)):
                line = f.readline()
                assert line.startswith(b"250"), line
            assert f.readline().startswith(b"354")
            s.sendall(body + b".\r\n")
            line = f.readline()
            assert line.startswith(b"250"), line
        s.sendall(b"QUIT\r\n")
        f.close()
        s.close()


def msgs(n, tag):
    return [("s@example.com", [f"{tag}{i}@{DOMAIN}"],
             f"Subject: {tag}{i}\r\nX-Seq: {tag}{i}\r\n\r\nbody {i}\r\n".encode())
            for i in range(n)]


# Linux: the kernel stamps each received segment (SO_TIMESTAMPNS, whose
# control message carries a struct timespec of two longs).
SO_TIMESTAMPNS = 35


class StampMx:
    """A receiving MX in Python that notes, for every MAIL command, when
    its segment reached the kernel: that is when sluice sent it, right
    after the limiter granted the token, whatever the scheduler later does
    to this process or to sluice's worker. A loaded machine (parallel
    ctest) stalls smtp-sink and sluice's workers by tens of milliseconds,
    which piles a second's deliveries into a shorter stretch of the
    delivery log and of the sink's files (seen: 71 in a second for a limit
    of 55 with two busy loops running, the limiter being right); kernel
    arrival times do not move."""

    def __init__(self, port, data_delay=0.0):
        self.data_delay = data_delay  # s before the reply to each final dot
        self.mails = []       # kernel arrival time (s, wall clock) of each MAIL
        self.dots = 0         # transactions accepted
        self.lock = threading.Lock()
        self.ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", port))
        self.ls.listen(128)
        self.conns = []
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            c.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            with self.lock:
                self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            c.sendall(b"220 stamp.test ESMTP\r\n")
            buf, in_data = b"", False
            while True:
                data, anc, _, _ = c.recvmsg(65536, socket.CMSG_SPACE(16))
                if not data:
                    return
                stamp = time.time()
                for level, kind, raw in anc:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                        sec, nsec = struct.unpack("qq", raw[:16])
                        stamp = sec + nsec / 1e9
                buf += data
                out = []
                while True:
                    if in_data:
                        end = buf.find(b"\r\n.\r\n")
                        if end < 0:
                            break
                        buf, in_data = buf[end + 5:], False
                        if self.data_delay:
                            time.sleep(self.data_delay)
                        with self.lock:
                            self.dots += 1
                        out.append(b"250 2.0.0 Ok\r\n")
                        continue
                    if b"\r\n" not in buf:
                        break
                    line, buf = buf.split(b"\r\n", 1)
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        out.append(b"250-stamp.test\r\n250 PIPELINING\r\n")
                    elif verb == b"MAIL":
                        with self.lock:
                            self.mails.append(stamp)
                        out.append(b"250 2.1.0 Ok\r\n")
                    elif verb == b"DATA":
                        buf, in_data = b"\r\n" + buf, True  # the terminator may come at once
                        out.append(b"354 go\r\n")
                    elif verb == b"QUIT":
                        c.sendall(b"".join(out) + b"221 2.0.0 Bye\r\n")
                        return
                    else:
                        out.append(b"250 Ok\r\n")
                if out:
                    c.sendall(b"".join(out))
        except OSError:
            pass
        finally:
            c.close()

    def times(self):
        with self.lock:
            return sorted(self.mails)

    def stop(self):
        self.stopping = True
        self.ls.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(5)


class Cluster:
    """dnsmasq + smtp-sink (+ redis-server) + n sluice nodes. `domain` is
    the [domain] section; `redis` the [redis] keys besides url (None: no
    Redis); stamp: a StampMx receives instead of smtp-sink."""

    def __init__(self, n, domain, redis=None, sink_flags=(), stamp=False):
        for tool in ("dnsmasq", "smtp-sink"):
            if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
                skip(f"{tool} not installed (tools/install-deps --test)")
        self.wd = Workdir("sluice-lim-")
        self.dns = self.sink = self.redis = self.mx = None
        self.nodes = []
        try:
            self.mx_port = free_port()
            self.dns = Dns(self.wd, records_for([DOMAIN]))
            if stamp:
                self.mx = StampMx(self.mx_port)
            else:
                self.sink = Sink(self.wd, self.mx_port, sink_flags)
            extra = f"[domain {DOMAIN}]\n{domain}\n"
            if redis is not None:
                self.redis = Redis()
                extra += f"[redis]\nurl = redis://127.0.0.1:{self.redis.port}\n{redis}\n"
            for i in range(n):
                self.nodes.append(Node(self.wd, "ab"[i], self.dns.port, self.mx_port, extra))
            if redis is not None:
                for nd in self.nodes:
                    wait_until(lambda: nd.redis_state() == "connected", 10,
                               f"node {nd.name} connected to Redis")
        except BaseException:
            self.close()
            raise

    def pids(self):
        """The pids of the nodes' processes now (a restart changes them)."""
        return [nd.d.proc.pid for nd in self.nodes]

    def close(self):
        """Stop every node (each, even when one fails), then the rest."""
        errors = []
        try:
            for nd in self.nodes:
                if not nd.alive():
                    continue
                try:
                    nd.d.stop_clean()
                except AssertionError as e:
                    with nd.d.cv:
                        tail = "\n".join(nd.d.lines[-15:])
                    errors.append(f"node {nd.name}: {e}\n{tail}")
        finally:
            for p in (self.sink, self.mx, self.dns, self.redis):
                if p is not None:
                    p.stop()
            self.wd.cleanup()
        if errors:
            if sys.exc_info()[0] is not None:  # a test failure is on its way: keep it
                print("\n".join(errors))
            else:
                raise AssertionError("\n".join(errors))


# ---- reading the outcome ----

def delivery_times(path):
    """Wall-clock times (s) of the "delivery" events to DOMAIN so far (their
    "time", the daemon log's UTC stamp: harness.log_time reads it). Read
    while sluice writes: a last line without its newline is not yet whole
    and is left for the next read."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    out = []
    for raw in data.split(b"\n")[:-1]:
        ev = json.loads(raw)
        if ev["event"] == "delivery" and ev["domain"] == DOMAIN:
            out.append(log_time(ev["time"]))
    return sorted(out)


def all_times(nodes):
    return sorted(t for nd in nodes for t in delivery_times(nd.dlog))


def wait_delivered(nodes, n, timeout):
    wait_until(lambda: len(all_times(nodes)) >= n, timeout,
               f"{n} deliveries to {DOMAIN} (have {len(all_times(nodes))})")
    return all_times(nodes)


def redis_events(nodes):
    """The nodes' log lines about Redis (for a failure message)."""
    return [f"{nd.name}: {ln}" for nd in nodes for ln in nd.d.log_lines("event=redis")]


def max_in_window(times, w=1.0):
    """The most events in any half-open window [t, t + w) (the busiest
    window starts at an event)."""
    best, j = 0, 0
    for i in range(len(times)):
        while j < len(times) and times[j] < times[i] + w:
            j += 1
        best = max(best, j - i)
    return best


def check_rate(times, sent, rate, bound, what):
    """Every 1 s window of the send times within bound; first to last in
    the delivery log at >= 80% of rate. times: the delivery log's; sent:
    StampMx's kernel arrival times of the MAIL commands. 80%, not more: on
    a loaded machine (a CI runner, helpers building beside it) the
    deliveries trail the tokens, and 90% failed once at 26.7/s of 30/s; a
    limiter that gives a node half its share (the bugs this guards
    against) is still far below."""
    assert len(sent) == len(times), f"{len(sent)} MAIL commands, {len(times)} deliveries"
    peak = max_in_window(sent)
    span = times[-1] - times[0]
    avg = (len(times) - 1) / span if span > 0 else float("inf")
    print(f"     {what}: {len(times)} deliveries in {span:.2f}s, {avg:.1f}/s on average, "
          f"busiest 1s window {peak} as sent, {max_in_window(times)} in the log "
          f"(bound {bound})")
    assert peak <= bound, f"{what}: {peak} messages sent in one second, bound {bound}"
    assert avg >= 0.8 * rate, f"{what}: {avg:.1f}/s on average, want >= {0.8 * rate:.1f}/s"


def socket_inodes(pids):
    """The inodes of the sockets the processes pids hold open (a process
    that has gone holds none)."""
    out = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(link[8:-1])
    return out


def sink_conns(port, pids):
    """TCP connections of the processes pids (the sluice nodes) now
    established to the sink at 127.0.0.1:port, read from /proc/net/tcp:
    one sample costs no process. Only the nodes' own sockets and only the
    sink's address count: the port alone is not the sink's. Tests running
    beside this one bind sinks of their own to 127.0.0.2-4 on ports that
    free_port() (which asks about 127.0.0.1 only) may hand out again here,
    and their relays' connections to those have this port as their
    remote port too (a full parallel run once counted 56 here). Counted by
    socket inode, not by line: /proc/net/tcp is no snapshot (the kernel
    resumes its walk at each read, so under churn it may list a socket
    twice)."""
    mine = socket_inodes(pids())
    want = f"0100007F:{port:04X}"
    found = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[2] == want and parts[3] == "01" and parts[9] in mine:
                found.add(parts[9])
    return len(found)


class ConnSampler:
    """Samples sink_conns() every 20 ms in a thread; peak is the most seen.
    pids: a function giving the pids of the nodes now."""

    def __init__(self, port, pids):
        self.port, self.pids, self.peak, self.samples = port, pids, 0, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, sink_conns(self.port, self.pids))
            self.samples += 1
            self.done.wait(0.02)

    def stop(self):
        self.done.set()
        self.thread.join(5)
        return self.peak


def wait_capped(port, pids, cap, settle, timeout, what):
    """Poll sink_conns() every 20 ms until it stayed at cap or under for
    settle s on end (the connections beyond the cap ended, and no more
    opened); fail with `what` after timeout s. A sleep of a refresh's
    time (or a transaction's) in its place is not enough on a loaded
    machine, where the refresh comes late: the window sampled after it
    then caught the connections still ending. Connections that stay over
    the cap (the defects these tests are for: as long as the mail flowed)
    time this out, or stay until the mail is all gone, which the callers'
    left > 0 fails."""
    deadline = time.monotonic() + timeout
    since = None
    while True:
        now = time.monotonic()
        if sink_conns(port, pids) > cap:
            since = None
        elif since is None:
            since = now
        elif now - since >= settle:
            return
        if now > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} "
                                 f"({sink_conns(port, pids)} connections now)")
        time.sleep(0.02)


# ---- the tests ----

def test_local_rate_and_burst():
    """50/s with a burst of 5, 300 messages at once, one node, no Redis.
    GCRA lets through at most burst + W*rate in a window W: 55 a second
    (6 at once, then one every 20 ms), counted on the times the MAIL
    commands reached the receiver's kernel (see StampMx). Tolerance +1:
    a token is granted when a connection is ready and MAIL goes out a
    little later; the first ones, on new connections, go out a ms or two
    later than the rest, which shortens the busiest window, the first, by
    that much: a correct limiter shows 55 or 56 here, run after run."""
    c = Cluster(1, "max_message_rate = 50/s\nmessage_burst = 5\n", stamp=True)
    try:
        n = 300
        c.nodes[0].inject(msgs(n, "l"))
        times = wait_delivered(c.nodes, n, timeout=30)
        assert len(times) == n, f"{len(times)} deliveries for {n} messages"
        check_rate(times, c.mx.times(), 50, 50 + 5 + 1, "local 50/s burst 5")
        assert len(events(c.nodes[0].dlog)) >= 2 * n  # every line whole and well-formed
    finally:
        c.close()


def test_two_nodes_share_rate_and_connections():
    """Two nodes, one Redis, 40/s burst 5 across both: the combined times
    stay within the documented slack rate*W + burst + 1 + nodes*token_batch
    and reach 80% of the rate. Then max_connections = 3 across both, with a
    sink that holds each DATA reply 1 s: never more than 3 connections
    open at the sink, and more than one of them used."""
    batch = 10
    c = Cluster(2, "max_message_rate = 40/s\nmessage_burst = 5\n",
                redis=f"nodes = 2\ntoken_batch = {batch}\n", stamp=True)
    try:
        n = 150
        ta = threading.Thread(target=c.nodes[0].inject, args=(msgs(n, "a"),))
        ta.start()
        c.nodes[1].inject(msgs(n, "b"))
        ta.join(60)
        times = wait_delivered(c.nodes, 2 * n, timeout=40)
        assert len(times) == 2 * n, f"{len(times)} deliveries for {2 * n} messages"
        for nd in c.nodes:
            assert len(delivery_times(nd.dlog)) > n // 4, f"node {nd.name} hardly delivered"
        check_rate(times, c.mx.times(), 40, 40 + 5 + 1 + 2 * batch, "two nodes, 40/s burst 5")
    finally:
        c.close()

    c = Cluster(2, "max_connections = 3\n", redis="nodes = 2\n", sink_flags=["-w", "1"])
    try:
        n = 12
        sampler = ConnSampler(c.mx_port, c.pids)
        try:
            ta = threading.Thread(target=c.nodes[0].inject, args=(msgs(n, "a"),))
            ta.start()
            c.nodes[1].inject(msgs(n, "b"))
            ta.join(60)
            wait_delivered(c.nodes, 2 * n, timeout=30)
        finally:
            peak = sampler.stop()
        print(f"     max_connections = 3 over two nodes: at most {peak} open at once "
              f"({sampler.samples} samples)")
        assert peak <= 3 + 4, f"{peak} connections open at the sink, max_connections = 3; " \
                          f"Redis events: {redis_events(c.nodes)}"
        assert peak >= 2, f"only {peak} connection at a time: the limit was never tested"
    finally:
        c.close()


def deliveries(nd, settled=True):
    """The delivery events of node nd's delivery log so far."""
    return [e for e in events(nd.dlog, settled) if e["event"] == "delivery"]


def test_two_nodes_share_an_mx_cap_over_many_domains():
    """The shape of bulk mail behind one provider, from two nodes: 600
    messages over 300 domains (two each, as the relay grid) whose MX
    records all name one host, [mx] max_connections = 4 held across both
    nodes through Redis, a receiver that takes 50 ms over each message.
    Every message arrives once, within a bounded time; never more than
    the cap open at the receiver (plus the local shares of workers cut
    off from Redis, if one was: test_connections_hold_through_a_redis_stall);
    both nodes deliver; and the connections carry many domains
    each (their leases move from domain to domain): far fewer connections
    than domains."""
    wd = Workdir("sluice-mxcap-")
    dns = mx = redis = None
    nodes = []
    try:
        doms = [f"p{i}.test" for i in range(300)]
        mx_port = free_port()
        dns = Dns(wd, records_for(doms, mx_host="mx.shared.test"))
        mx = StampMx(mx_port, data_delay=0.05)
        redis = Redis()
        extra = (f"[mx mx.shared.test]\nmax_connections = 4\n"
                 f"[redis]\nurl = redis://127.0.0.1:{redis.port}\nnodes = 2\ntimeout = 2s\n")
        for name in ("a", "b"):
            nodes.append(Node(wd, name, dns.port, mx_port, extra))
        for nd in nodes:
            wait_until(lambda: nd.redis_state() == "connected", 10,
                       f"node {nd.name} connected to Redis")
        sampler = ConnSampler(mx_port, lambda: [nd.d.proc.pid for nd in nodes])
        try:
            batches = {}
            for k, nd in enumerate(nodes):
                batches[nd.name] = [("s@example.com", [f"{nd.name}{i}@{doms[i % 300]}"],
                                     f"Subject: {i}\r\nX-Seq: {nd.name}{i}\r\n\r\nb\r\n"
                                     .encode()) for i in range(300)]
            t0 = time.monotonic()
            failed = []

            def inject_a():
                try:
                    nodes[0].inject(batches["a"])
                except BaseException as e:  # told below, not lost with the thread
                    failed.append(e)
            ta = threading.Thread(target=inject_a)
            ta.start()
            nodes[1].inject(batches["b"])
            ta.join(60)
            assert not ta.is_alive(), "node a's injection did not end within 60 s"
            assert not failed, f"node a's injection failed: {failed[0]!r}"

            def delivered():
                return sum(len(deliveries(nd, settled=False)) for nd in nodes)
            wait_until(lambda: delivered() >= 600, 90,
                       f"600 deliveries (have {delivered()}; Redis: {redis_events(nodes)})")
            took = time.monotonic() - t0
        finally:
            peak = sampler.stop()
        conns = sum(nd.ctl("stats")["connections"]["outbound_total"] for nd in nodes)
        per_node = {nd.name: len(deliveries(nd, settled=False)) for nd in nodes}
        print(f"     600 messages over 300 domains behind one MX, cap 4 over two nodes: "
              f"{took:.1f} s (the receiver's floor {600 * 0.05 / 4:.1f} s), at most {peak} "
              f"open at once, {conns} connections opened, per node {per_node}")
        assert mx.dots == 600, f"{mx.dots} transactions at the receiver for 600 messages"
        rcpts = [e["rcpt"] for nd in nodes for e in deliveries(nd, settled=False)]
        assert len(set(rcpts)) == 600, f"{len(set(rcpts))} distinct recipients delivered"
        # A worker cut off from Redis (event=redis_down) falls back to a
        # local share; without one, the cap holds exactly (a bound of cap
        # plus those shares would not see each node take the whole cap).
        down = sum(nd.d.count_log("event=redis_down") for nd in nodes)
        assert peak <= 4 + (4 if down else 0), \
            f"{peak} connections open at the receiver, cap 4; Redis events: {redis_events(nodes)}"
        assert peak >= 2, f"only {peak} connection at a time: the cap was never tested"
        assert min(per_node.values()) > 0, per_node
        assert conns < 100, f"{conns} connections for 300 domains: the domains did not " \
                            f"share the site's connections"
    finally:
        errors = []
        for nd in nodes:
            if nd.alive() and nd.d.stop_clean() != 0:
                errors.append(nd.name)
        for p in (mx, dns, redis):
            if p is not None:
                p.stop()
        wd.cleanup()
        assert not errors, f"nodes {errors} did not stop cleanly"


def test_redis_killed_then_back():
    """SIGKILL the Redis mid-run: deliveries keep coming (local share),
    sluice does not crash, the stats socket says Redis is not connected;
    a new Redis on the same port is picked up again."""
    c = Cluster(1, "max_message_rate = 40/s\nmessage_burst = 5\n",
                redis="nodes = 2\ntimeout = 200ms\n")
    nd = c.nodes[0]
    try:
        n = 300
        nd.inject(msgs(n, "r"))
        wait_delivered(c.nodes, 40, timeout=20)
        c.redis.kill9()
        t_kill = time.time()
        st = wait_until(lambda: (lambda s: s if s != "connected" else None)(nd.redis_state()),
                        5, "the stats socket to report Redis down")
        print(f"     Redis killed: state {st!r}")
        assert st in ("unreachable", "connecting"), st
        at_kill = len([t for t in all_times(c.nodes) if t <= t_kill])
        wait_until(lambda: len(all_times(c.nodes)) >= at_kill + 20, 10,
                   "20 more deliveries with Redis down")
        assert nd.alive(), "sluice died with Redis"
        assert nd.redis_state() != "connected"
        nd.d.wait_log("event=redis_down", timeout=5)
        c.redis.start()
        t_back = time.monotonic()
        wait_until(lambda: nd.redis_state() == "connected", 15, "Redis state connected again")
        print(f"     Redis back: connected after {time.monotonic() - t_back:.2f}s")
        times = wait_delivered(c.nodes, n, timeout=30)
        assert len(times) == n, f"{len(times)} deliveries for {n} messages"
        # Nothing beyond the configured limit, down or up (the local share
        # is half of it).
        assert max_in_window(times) <= 40 + 5 + 1 + 10, max_in_window(times)
        assert nd.alive()
    finally:
        c.close()


def test_caps_come_back_with_redis():
    """max_connections = 3 across two nodes, in [mx] and then in the
    domain's section, a receiver that takes 0.1 s per message, both
    nodes injecting, lease_ttl = 3s: Redis killed (by PID) mid-run and
    started again.
    While it is away the nodes keep delivering on local shares (one
    connection per worker at least: four); once both are connected
    again the cap holds across them: the connections opened meanwhile
    beyond it end after their transaction (they went on carrying mail,
    four or five at the receiver for as long as it flowed)."""
    for section in ("[mx mx.test]\n", ""):
        caps_come_back_with_redis(section)


def caps_come_back_with_redis(section):
    what = section.strip() or f"[domain {DOMAIN}]"
    # [redis] timeout 2 s: the kill is seen by the connections' end, not a
    # timeout; at 200 ms a loaded machine's late answer took a worker back
    # to its local share with Redis there, and over the cap in the window
    c = Cluster(2, f"{section}max_connections = 3\n",
                redis="nodes = 2\ntimeout = 2s\nlease_ttl = 3s\n", stamp=True)
    c.mx.data_delay = 0.1
    try:
        n = 300
        ta = threading.Thread(target=c.nodes[0].inject, args=(msgs(n, "a"),))
        ta.start()
        c.nodes[1].inject(msgs(n, "b"))
        ta.join(60)
        wait_delivered(c.nodes, 40, timeout=30)
        c.redis.kill9()
        wait_until(lambda: all(nd.redis_state() != "connected" for nd in c.nodes), 5,
                   "both nodes to see Redis down")
        at_kill = len(all_times(c.nodes))
        wait_until(lambda: len(all_times(c.nodes)) >= at_kill + 20, 10,
                   "20 more deliveries with Redis down")
        c.redis.start()
        wait_until(lambda: all(nd.redis_state() == "connected" for nd in c.nodes), 15,
                   "both nodes connected to Redis again")
        for nd in c.nodes:
            wait_until(lambda: nd.d.count_log("event=redis_up") >= 4, 5,
                       f"node {nd.name}'s workers back on shared limits")
        # The refresh at the return counts the leases over the cap, or,
        # when a worker still cut off opened one after it, the next (every
        # lease_ttl/3: 1 s); a transaction takes 0.1 s. Waited for (at
        # the cap for 1.5 s on end; see wait_capped), then three seconds
        # of mail under the cap.
        wait_capped(c.mx_port, c.pids, 3, 1.5, 10, f"{what}: the cap of 3 held with Redis back")
        sampler = ConnSampler(c.mx_port, c.pids)
        try:
            time.sleep(3.0)
        finally:
            peak = sampler.stop()
        left = 2 * n - len(all_times(c.nodes))
        print(f"     {what}: Redis back, at most {peak} connections open in 3 s, "
              f"{left} messages left")
        assert left > 0, "all delivered before the check: nothing tested"
        assert peak <= 3, f"{what}: {peak} connections at the receiver with Redis back, " \
                          f"cap 3; Redis events: {redis_events(c.nodes)}"
        times = wait_delivered(c.nodes, 2 * n, timeout=60)
        assert len(times) == 2 * n, f"{len(times)} deliveries for {2 * n} messages"
        assert len(c.mx.times()) == 2 * n, f"{len(c.mx.times())} MAIL commands at the receiver"
    finally:
        c.close()

def test_mx_cap_lowered_by_reload_holds_across_nodes():
    """[mx] max_connections = 6 over two nodes sharing a Redis, lowered
    to 2 by a reload of both while mail flows (0.1 s per message at the
    receiver), lease_ttl = 3s: the connections beyond the new cap across
    the nodes end after their transaction once a lease refresh (every
    lease_ttl/3) counts them, so that within 1.5 s of the reload no more
    than 2 are open. Before, a worker ended only those of its own beyond
    the whole cap, and four stayed open for as long as the mail flowed."""
    c = Cluster(2, "[mx mx.test]\nmax_connections = 6\n",
                redis="nodes = 2\nlease_ttl = 3s\n", stamp=True)
    c.mx.data_delay = 0.1
    try:
        n = 400
        ta = threading.Thread(target=c.nodes[0].inject, args=(msgs(n, "a"),))
        ta.start()
        c.nodes[1].inject(msgs(n, "b"))
        ta.join(60)
        wait_until(lambda: sink_conns(c.mx_port, c.pids) >= 4, 10,
                   "four connections or more at the receiver under the cap of 6")
        for nd in c.nodes:
            path = os.path.join(c.wd.path, f"{nd.name}.conf")
            with open(path) as f:
                text = f.read()
            with open(path, "w") as f:
                f.write(text.replace("max_connections = 6", "max_connections = 2"))
            nd.d.signal(signal.SIGHUP)
        for nd in c.nodes:
            nd.d.wait_log("event=config_reloaded")
        # a refresh (1 s) and a transaction (0.1 s), waited for (see
        # wait_capped)
        t_reload = time.monotonic()
        wait_capped(c.mx_port, c.pids, 2, 1.5, 15, "the cap of 2 held after the reload")
        capped = time.monotonic() - t_reload
        sampler = ConnSampler(c.mx_port, c.pids)
        try:
            time.sleep(3.0)
        finally:
            peak = sampler.stop()
        left = 2 * n - len(all_times(c.nodes))
        print(f"     cap 6 -> 2 by a reload: at most {peak} connections open from "
              f"{capped:.1f} s after, {left} messages left")
        assert left > 0, "all delivered before the check: nothing tested"
        assert peak <= 2, f"{peak} connections at the receiver after the reload to a cap of 2"
        times = wait_delivered(c.nodes, 2 * n, timeout=90)
        assert len(times) == 2 * n, f"{len(times)} deliveries for {2 * n} messages"
    finally:
        c.close()


def test_mx_section_added_by_reload_caps_open_connections():
    """One node, no [mx] section, a receiver taking 0.1 s per message:
    several connections carry the mail; a reload adds [mx mx.test]
    max_connections = 2. The connections opened before it held no lease
    of the new section's key, so neither its cap nor its rates saw them,
    and they went on for as long as the mail flowed (five or more at the
    receiver); now each takes a lease at its next transaction or ends
    after the one it is in: within a second, no more than 2 are open."""
    c = Cluster(1, "", stamp=True)
    c.mx.data_delay = 0.1
    nd = c.nodes[0]
    try:
        n = 600
        # All of it queued before any goes: injected while it flows, on a
        # loaded machine (or under ASan) the mail went out about as slowly
        # as it came in, on fewer connections, and was nearly all gone
        # when the five were there (0 left at the check: nothing tested)
        assert nd.ctl(f"suspend {DOMAIN}").get("suspended") is True
        nd.inject(msgs(n, "x"))
        assert nd.ctl(f"resume {DOMAIN}").get("suspended") is False
        wait_until(lambda: sink_conns(c.mx_port, c.pids) >= 5, 15,
                   "five connections or more at the receiver")
        path = os.path.join(c.wd.path, f"{nd.name}.conf")
        with open(path, "a") as f:
            f.write("[mx mx.test]\nmax_connections = 2\n")
        nd.d.signal(signal.SIGHUP)
        nd.d.wait_log("event=config_reloaded")
        # the transactions under way end (0.1 s each), waited for (see
        # wait_capped)
        t_reload = time.monotonic()
        wait_capped(c.mx_port, c.pids, 2, 1.0, 8, "the cap of 2 held after the reload added it")
        capped = time.monotonic() - t_reload
        sampler = ConnSampler(c.mx_port, c.pids)
        try:
            time.sleep(2.0)
        finally:
            peak = sampler.stop()
        left = n - len(all_times(c.nodes))
        print(f"     [mx] added by a reload, cap 2: at most {peak} connections open from "
              f"{capped:.1f} s after, {left} messages left")
        assert left > 0, "all delivered before the check: nothing tested"
        assert peak <= 2, f"{peak} connections at the receiver after a reload added a cap of 2"
        # Without [redis] the [mx] cap is the node's (engine/node_caps.h):
        # the domain's mail goes from one worker (its site's, which the
        # reload does not change), which may hold both slots. (Split
        # between the two workers, as it was, its part was 1: 10/s once
        # capped.)
        times = wait_delivered(c.nodes, n, timeout=120)
        assert len(times) == n, f"{len(times)} deliveries for {n} messages"
        assert len(c.mx.times()) == n, f"{len(c.mx.times())} MAIL commands at the receiver"
    finally:
        c.close()


def test_connections_hold_through_a_redis_stall():
    """max_connections = 3 across two nodes while Redis stalls (SIGSTOP by
    PID, 0.5 s, three times) past [redis] timeout = 200ms: a node that
    gives up on Redis falls back to its local share (3/2: 1 connection),
    while the other may still be served by Redis up to the whole cap. A
    worker cut off cannot know what the others took, and each worker has
    its own Redis connection: a stall can cut off one worker of each node
    at once while the other workers are still served (seen in CI: w1 of
    both nodes down, w0 of both up). So the bound while Redis is away is
    the cap plus the local share of each worker that may be cut off: 3 +
    4 x 1 = 7 (before the fix that checks the local share on that path, a
    worker cut off took the whole cap again)."""
    c = Cluster(2, "max_connections = 3\n", redis="nodes = 2\ntimeout = 200ms\n",
                sink_flags=["-w", "1"])
    try:
        n = 20
        sampler = ConnSampler(c.mx_port, c.pids)
        try:
            ta = threading.Thread(target=c.nodes[0].inject, args=(msgs(n, "a"),))
            ta.start()
            c.nodes[1].inject(msgs(n, "b"))
            ta.join(60)
            for _ in range(3):
                time.sleep(0.2)  # Redis answers for a while: leases are taken
                c.redis.proc.send_signal(signal.SIGSTOP)
                try:
                    time.sleep(0.5)  # the stall itself, longer than the timeout
                finally:
                    c.redis.proc.send_signal(signal.SIGCONT)
            wait_delivered(c.nodes, 2 * n, timeout=40)
        finally:
            peak = sampler.stop()
        print(f"     Redis stalled 3 times: at most {peak} connections open at once")
        assert peak <= 3 + 4, f"{peak} connections open at the sink, max_connections = 3; " \
                          f"Redis events: {redis_events(c.nodes)}"
    finally:
        c.close()


def test_dead_node_leases_expire():
    """max_connections = 2 across two nodes, lease_ttl = 2s, a sink that
    holds each DATA reply 3 s. Node A takes both connections; B waits and
    opens none; A is killed with SIGKILL; B connects within ttl + 3 s and
    delivers."""
    ttl = 2
    c = Cluster(2, "max_connections = 2\n", redis=f"nodes = 2\nlease_ttl = {ttl}s\n",
                sink_flags=["-w", "3"])
    a, b = c.nodes
    try:
        a.inject(msgs(8, "a"))
        wait_until(lambda: a.outbound_open() == 2 and sink_conns(c.mx_port, c.pids) == 2, 10,
                   "node A to hold both connections")
        b.inject(msgs(3, "b"))
        # Bounded negative check: B gets no connection while A holds both.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert b.d.count_log("event=connected") == 0, "B connected past the leases"
            assert sink_conns(c.mx_port, c.pids) <= 2
            time.sleep(0.05)
        a.d.kill9()
        t_kill = time.monotonic()
        b.d.wait_log("event=connected", timeout=ttl + 3)
        took = time.monotonic() - t_kill
        print(f"     B connected {took:.2f}s after A was killed (lease_ttl {ttl}s)")
        wait_until(lambda: len(delivery_times(b.dlog)) >= 1, ttl + 3 + 5,
                   "B's first delivery")
        wait_until(lambda: len(delivery_times(b.dlog)) >= 3, 20, "all of B's deliveries")
        assert sink_conns(c.mx_port, c.pids) <= 2
    finally:
        c.close()


def test_suspend_stops_within_seconds_and_resume_restarts():
    """20/s, 100 messages: suspend through the stats socket mid-run; no
    delivery is logged more than 2 s after the answer (watched for 3.5
    s: at 20/s some 70 would come; the 2 s are for a transaction under
    way at the answer, and its commit, on a loaded machine: at 1 s one
    under ASan could fail it); resume and the rest go."""
    c = Cluster(1, "max_message_rate = 20/s\nmessage_burst = 2\n")
    nd = c.nodes[0]
    try:
        n = 100
        nd.inject(msgs(n, "s"))
        wait_delivered(c.nodes, 20, timeout=20)
        doc = nd.ctl(f"suspend {DOMAIN}")
        t_susp = time.time()
        assert doc.get("ok") is True and doc.get("suspended") is True, doc
        time.sleep(3.5)  # observation window: nothing may happen in it
        times = all_times(c.nodes)
        late = [t - t_susp for t in times if t > t_susp + 2.0]
        assert not late, f"{len(late)} deliveries after the suspension, first " \
                         f"{late[0]:.2f}s after it"
        held = len(times)
        assert held < n, "everything went before the suspension: nothing tested"
        print(f"     suspended with {n - held} left; last delivery "
              f"{(times[-1] - t_susp) * 1000:.0f} ms after the answer")
        doc = nd.ctl(f"resume {DOMAIN}")
        t_res = time.time()
        assert doc.get("ok") is True and doc.get("suspended") is False, doc
        wait_delivered(c.nodes, held + 1, timeout=5)
        times = wait_delivered(c.nodes, n, timeout=20)
        assert len(times) == n, f"{len(times)} deliveries for {n} messages"
        first = min(t for t in times if t > t_susp + 2.0)
        print(f"     resumed: first delivery {(first - t_res) * 1000:.0f} ms after the answer")
    finally:
        c.close()


def owner(domain, workers=2):
    """The worker that owns a domain in sluice (delivery_domain_hash)."""
    h = 2166136261
    for ch in domain.encode():
        h = ((h ^ (ch | 0x20)) * 16777619) & 0xFFFFFFFF
    return h % workers


def four_domains(prefix, worker_of=owner):
    """Four domains, two on each of sluice's two workers, as worker_of
    says (by default the worker their name hashes to, where a domain
    stays until its MX answer names its site)."""
    doms, want, i = [], {0: 2, 1: 2}, 0
    while len(doms) < 4:
        d = f"{prefix}{i}.test"
        if want[worker_of(d)] > 0:
            want[worker_of(d)] -= 1
            doms.append(d)
        i += 1
    return doms


def connected_threads(node):
    return {ln.split(" thread=")[1].split()[0] for ln in node.d.lines
            if "event=connected" in ln}


def shared_limit(doms, records, conf, what, workers):
    """160 messages over unlimited domains doms under one shared limit of
    30/s (burst 2) and 2 connections given by conf, sent from workers of
    the node's two workers (their sites'): together they stay within it,
    and get it. Without Redis each of the 2 workers holds half of the
    rate (15/s with a burst of 1), and lends it while it asks for none;
    the cap is the node's (engine/node_caps.h)."""
    wd = Workdir("sluice-shared-")
    dns = mx = node = None
    try:
        mx_port = free_port()
        dns = Dns(wd, records)
        mx = StampMx(mx_port)
        node = Node(wd, "m", dns.port, mx_port, conf)
        sampler = ConnSampler(mx_port, lambda: [node.d.proc.pid])
        n = 160
        node.inject([("s@example.com", [f"x{k}@{doms[k % len(doms)]}"],
                      f"Subject: {k}\r\nX-Seq: m{k}\r\n\r\nb\r\n".encode()) for k in range(n)])

        def times():
            if not os.path.exists(node.dlog):
                return []
            with open(node.dlog, "rb") as f:
                evs = [json.loads(ln) for ln in f.read().split(b"\n")[:-1]]
            return sorted(log_time(e["time"]) for e in evs if e["event"] == "delivery")
        wait_until(lambda: len(times()) >= n, 60, f"{n} deliveries")
        peak_conns = sampler.stop()
        check_rate(times(), mx.times(), 30, 30 + 2 + 2, what)
        assert peak_conns <= 2, f"{what}: {peak_conns} connections, cap 2"
        threads = connected_threads(node)
        assert len(threads) == workers, f"{what}: connections from {sorted(threads)}"
        assert node.d.stop_clean() == 0
    finally:
        if node is not None and node.d.proc.poll() is None:
            node.d.proc.kill()
            node.d.proc.wait()
        if mx is not None:
            mx.stop()
        if dns is not None:
            dns.stop()
        wd.cleanup()


def test_mx_pattern_limits_across_domains():
    """[mx *.bigmail.test]: four domains whose MX is under bigmail.test,
    two sites (two MX hosts) of two domains each, one on each worker (a
    site's domains are gathered on its worker: one site would be sent
    from one)."""
    doms = four_domains("big")
    hosts = {}
    i = 0
    while len(hosts) < 2:
        hosts.setdefault(site_worker(f"mx{i}.bigmail.test"), f"mx{i}.bigmail.test")
        i += 1
    recs = [f"host-record={h},127.0.0.1" for h in hosts.values()]
    recs += [f"mx-host={d},{hosts[k % 2]},10" for k, d in enumerate(doms)]
    shared_limit(doms, recs,
                 "[mx *.bigmail.test]\nmax_message_rate = 30/s\nmessage_burst = 2\n"
                 "max_connections = 2\n", "mx *.bigmail.test 30/s", 2)


def test_mx_pattern_limits_whole_for_one_domain():
    """[mx *.bigmail.test] and one domain under it, whose mail goes from one
    worker: it gets the whole 30/s (at least 80% of it), never more, and
    never more than the 2 connections (that it may hold both is
    test_sites's). Before, without [redis], it got its worker's part:
    15/s."""
    doms = four_domains("one")[:1]
    shared_limit(doms, ["host-record=mx1.bigmail.test,127.0.0.1"] +
                 [f"mx-host={d},mx1.bigmail.test,10" for d in doms],
                 "[mx *.bigmail.test]\nmax_message_rate = 30/s\nmessage_burst = 2\n"
                 "max_connections = 2\n", "mx *.bigmail.test 30/s, one domain", 1)


def test_mx_section_caps_recipients_and_messages():
    """[mx] max_rcpt_per_txn = 1 below the domain's 100: a message to three
    recipients of one domain goes in three transactions; and
    max_messages_per_connection = 2: with one connection at a time, three
    transactions need two connections."""
    from test_delivery import Relay, wait_sink
    r = Relay(records_for(["cap.test"]),
              domain_conf="[mx mx.test]\nmax_rcpt_per_txn = 1\nmax_messages_per_connection = 2\n"
                          "[domain cap.test]\nmax_connections = 1\n")
    try:
        r.inject([("s@example.com", ["a@cap.test", "b@cap.test", "c@cap.test"],
                   b"Subject: c\r\n\r\nthree\r\n")])
        files = wait_sink(r, 3)
        assert len(files) == 3, f"{len(files)} transactions for 3 recipients"
        assert r.d.count_log("event=connected") >= 2, r.d.log_lines("event=connected")
    finally:
        r.close()


def test_source_address_limits_across_domains():
    """[source 127.0.0.1]: four domains with MX hosts of their own (four
    sites, two on each worker), all reached from the one source
    address."""
    doms = four_domains("src", lambda d: site_worker(f"mx.{d}"))
    recs = []
    for d in doms:
        recs += [f"host-record=mx.{d},127.0.0.1", f"mx-host={d},mx.{d},10"]
    shared_limit(doms, recs,
                 "[delivery]\nsource_address = 127.0.0.1\n"
                 "[source 127.0.0.1]\nmax_message_rate = 30/s\nmessage_burst = 2\n"
                 "max_connections = 2\n", "source 127.0.0.1 30/s", 2)


if __name__ == "__main__":
    if shutil.which("redis-server") is None:
        skip("redis-server not installed (tools/install-deps --test)")
    main([test_local_rate_and_burst, test_two_nodes_share_rate_and_connections,
          test_two_nodes_share_an_mx_cap_over_many_domains,
          test_redis_killed_then_back, test_caps_come_back_with_redis,
          test_mx_cap_lowered_by_reload_holds_across_nodes,
          test_mx_section_added_by_reload_caps_open_connections,
          test_connections_hold_through_a_redis_stall,
          test_dead_node_leases_expire,
          test_suspend_stops_within_seconds_and_resume_restarts,
          test_mx_pattern_limits_across_domains, test_mx_pattern_limits_whole_for_one_domain,
          test_mx_section_caps_recipients_and_messages,
          test_source_address_limits_across_domains])
