"""One DSN per message ([bounce] dsn_wait): a message to recipients on
several domains whose servers refuse them at different times gives its
sender one report naming every failed recipient, not one per delivery
batch (domain); across a kill -9 between the failures too, with no
recipient tried again and no report twice. A recipient still in flight
past dsn_wait does not keep the others' report back, and one that is
deferred lets it go at once; 1,000 recipients on 50 domains that all
bounce give one DSN (earlier versions sent 50); failures held for their
message's DSN are no waiting mail of their domain (sluicectl domains:
no OLDEST). Delay warnings likewise:
one per message, naming every deferred recipient that asked, kept at one
across later retries and a kill -9 (the spool marks the message); and
success reports (NOTIFY=SUCCESS, next hops without DSN) held with the
failures, one DSN for all, none delivered twice across a kill -9. The
DSNs are read at the
sender's MX
(smtp-sink); the refusing MX hosts are scripted servers on loopback
addresses of their own, with the delivering one (smtp-sink) on the
same port."""
import json
import os
import re
import signal
import smtplib
import socket
import socketserver
import subprocess
import sys
import threading
import time

from harness import Sluice, Workdir, free_port, main, skip, spool_tool, stats_ask, wait_until
import test_delivery
from test_delivery import Dns, Sink

SLUICE = sys.argv[1]
test_delivery.SLUICE = SLUICE
SLUICECTL = os.environ.get("SLUICECTL") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl"))

FINAL_RE = re.compile(r"Final-Recipient: rfc822;\s*(\S+)")
MSGID_RE = re.compile(rb"^Message-ID: *(<[^>]+>)", re.M | re.I)
BOUNDARY_RE = re.compile(rb'boundary="([^"]+)"')


def whole(m):
    """Whether smtp-sink has written this DSN whole: it creates the file
    at MAIL and writes it through a 4 KB buffer until the final dot, so
    a DSN of 10 recipients (5 KB) can be read with its Message-ID and
    only 7 of them. Whole once the report's closing boundary is there."""
    b = BOUNDARY_RE.search(m)
    return b is not None and b"--" + b.group(1) + b"--" in m


class Refuser:
    """An MX on host:port that refuses every RCPT with code (550 or 450),
    answering each one only once release is set (a server that takes its
    time), and counts the RCPTs it saw per address."""

    def __init__(self, host, port, code=550, release=None):
        self.code = code
        self.release = release
        self.rcpts = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                try:
                    outer.session(self.connection, self.rfile)
                except OSError:
                    pass

        class Server(socketserver.ThreadingTCPServer):
            request_queue_size = 64
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def session(self, c, rfile):
        c.sendall(b"220 refuser ESMTP\r\n")
        for line in rfile:
            cmd = line.strip().upper()
            if cmd.startswith(b"EHLO") or cmd.startswith(b"HELO"):
                c.sendall(b"250 refuser\r\n")
            elif cmd.startswith(b"RCPT"):
                addr = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
                with self.lock:
                    self.rcpts[addr] = self.rcpts.get(addr, 0) + 1
                if self.release is not None:
                    self.release.wait(120)
                if self.code >= 500:
                    c.sendall(b"550 5.1.1 <%s>: no such user here\r\n" % addr.encode())
                else:
                    c.sendall(b"450 4.2.0 <%s>: try again later\r\n" % addr.encode())
            elif cmd.startswith(b"QUIT"):
                c.sendall(b"221 bye\r\n")
                return
            elif cmd.startswith(b"DATA"):
                c.sendall(b"554 5.5.1 no valid recipients\r\n")
            else:
                c.sendall(b"250 ok\r\n")

    def seen(self):
        with self.lock:
            return dict(self.rcpts)

    def stop(self):
        if self.release is not None:
            self.release.set()  # a handler waiting on it ends
        self.server.shutdown()
        self.server.server_close()


class Setup:
    """dnsmasq; the delivering MX (smtp-sink, 127.0.0.1) for good.test,
    the sender's (smtp-sink, 127.0.0.2) for sender.test, a fast refuser
    (127.0.0.3) for fast1.test and fast2.test and a slow one (127.0.0.4,
    waiting for slow_release; code slow_code) for slow.test; sluice with
    the bounce section given."""

    def __init__(self, bounce_conf="", slow_code=550, retry="1h"):
        for tool in ("dnsmasq", "smtp-sink"):
            if not any(os.path.exists(os.path.join(d, tool)) for d in
                       os.environ.get("PATH", "").split(":") + ["/usr/sbin"]):
                skip(f"{tool} not installed (tools/install-deps --test)")
        self.wd = Workdir("sluice-dsnmsg-")
        self.dns = self.good = self.senders = self.fast = self.slow = self.node = None
        self.slow_release = threading.Event()
        try:
            self.mx_port = free_port()
            self.dns = Dns(self.wd, [
                "host-record=mx1.test,127.0.0.1", "host-record=mx2.test,127.0.0.2",
                "host-record=mx3.test,127.0.0.3", "host-record=mx4.test,127.0.0.4",
                "mx-host=good.test,mx1.test,10", "mx-host=sender.test,mx2.test,10",
                "mx-host=fast1.test,mx3.test,10", "mx-host=fast2.test,mx3.test,10",
                "mx-host=slow.test,mx4.test,10"])
            self.good = Sink(self.wd, self.mx_port)
            self.senders = Sink(self.wd, self.mx_port, name="senders", host="127.0.0.2")
            self.fast = Refuser("127.0.0.3", self.mx_port)
            self.slow = Refuser("127.0.0.4", self.mx_port, code=slow_code,
                                release=self.slow_release)
            self.port = free_port()
            self.spool = os.path.join(self.wd.path, "spool")
            self.dlog = os.path.join(self.wd.path, "delivery.jsonl")
            self.sock = os.path.join(self.wd.path, "stats.sock")
            self.conf = self.wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{self.port}
trusted_networks = 127.0.0.0/8
max_recipients = 1000
[queue]
path = {self.spool}
map_size = 256M
[delivery]
remote_port = {self.mx_port}
allow_networks = 127.0.0.0/8
connect_timeout = 2s
idle_timeout = 1s
[dns]
servers = 127.0.0.1:{self.dns.port}
[stats]
socket = {self.sock}
[log]
delivery_log = {self.dlog}
delivery_log_flush = 50ms
[bounce]
{bounce_conf}
[domain *]
retry_schedule = {retry}
""")
            self.start()
        except BaseException:
            self.close()
            raise

    def start(self):
        self.node = Sluice(SLUICE, self.conf)
        self.node.wait_log("event=ready", timeout=30)

    def inject(self, rcpts, subject):
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"220")
            s.sendall(b"EHLO tester\r\n")
            while f.readline()[3:4] == b"-":
                pass
            s.sendall(b"MAIL FROM:<alice@sender.test>\r\n" +
                      b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts) + b"DATA\r\n")
            for _ in range(1 + len(rcpts)):
                line = f.readline()
                assert line.startswith(b"250"), line
            assert f.readline().startswith(b"354")
            s.sendall(f"Subject: {subject}\r\n\r\nto many\r\n.\r\n".encode())
            line = f.readline()
            assert line.startswith(b"250"), line
            s.sendall(b"QUIT\r\n")

    def inject_notify(self, rcpts, subject):
        """rcpts: (address, NOTIFY value or None) pairs."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as c:
            c.ehlo("tester")
            assert c.mail("alice@sender.test")[0] == 250
            for addr, notify in rcpts:
                opts = [f"NOTIFY={notify}"] if notify else []
                assert c.rcpt(addr, opts)[0] == 250, addr
            assert c.data(f"Subject: {subject}\r\n\r\nto many\r\n".encode())[0] == 250

    def spool_empty(self):
        try:
            st = stats_ask(self.sock, "stats")
        except (OSError, ValueError):
            return False
        return st["queue"]["messages"] == 0

    def dsns(self):
        """Message-ID -> the recipients its report names, over the DSNs
        at the sender's MX written whole (a copy delivered twice is one
        DSN)."""
        out = {}
        for m in self.senders.messages():
            mid = MSGID_RE.search(m)
            if mid is None or not whole(m):
                continue
            text = m.decode("utf-8", "replace").replace("\r\n", "\n")
            out[mid.group(1)] = sorted(FINAL_RE.findall(text))
        return out

    def dlog_events(self, kind):
        if not os.path.exists(self.dlog):
            return []
        with open(self.dlog, "rb") as f:
            data = f.read()
        data = data[:data.rfind(b"\n") + 1]
        return [e for e in (json.loads(ln) for ln in data.splitlines()) if e["event"] == kind]

    def close(self):
        try:
            if self.node is not None and self.node.proc.poll() is None:
                assert self.node.stop_clean() == 0
        finally:
            for p in (self.slow, self.fast, self.senders, self.good, self.dns):
                if p is not None:
                    p.stop()
            self.wd.cleanup()


def recipients():
    fast = [f"u{i}@fast{d}.test" for d in (1, 2) for i in range(5)]
    slow = [f"s{i}@slow.test" for i in range(5)]
    good = [f"g{i}@good.test" for i in range(5)]
    return fast, slow, good


def test_failures_on_several_domains_one_dsn():
    """Two domains refuse at once, a third only after they were told
    bounced, a fourth takes its mail: one DSN, naming the 15 failures."""
    s = Setup()
    try:
        fast, slow, good = recipients()
        s.inject(fast + slow + good, "many domains")
        # the fast ones are told (their outcomes durable), the slow MX waits
        s.node.wait_log_count("event=bounced", len(fast), timeout=60)
        s.node.wait_log_count("event=delivered", len(good), timeout=60)
        wait_until(lambda: len(s.slow.seen()) >= 1, 30, "the slow MX to be asked")
        assert s.node.count_log("event=dsn_queued") == 0, s.node.log_lines("event=dsn_queued")
        s.slow_release.set()
        s.node.wait_log_count("event=bounced", len(fast) + len(slow), timeout=60)
        wait_until(s.spool_empty, 60, "an empty spool (the DSN delivered)")
        dsns = s.dsns()
        assert len(dsns) == 1, dsns
        named = next(iter(dsns.values()))
        assert named == sorted(fast + slow), named
        assert s.node.count_log("event=dsn_queued") == 1
        wait_until(lambda: len(s.dlog_events("dsn")) >= 1, 30, "the dsn event")
        ev = s.dlog_events("dsn")
        assert len(ev) == 1, ev
        assert sorted(x["rcpt"] for x in ev[0]["recipients"]) == sorted(fast + slow), ev
        assert len(s.dlog_events("bounce")) == len(fast + slow)
        assert all(n == 1 for n in s.fast.seen().values()), s.fast.seen()
        assert s.node.stop_clean() == 0
        s.node = None
        check = spool_tool("check", s.spool)
        assert check.returncode == 0, check.stdout
    finally:
        s.close()


def test_kill9_between_failures_still_one_dsn():
    """The fast failures are durable (held), sluice is killed (-9) while
    the slow MX holds its RCPTs; after the start the slow ones fail too:
    one DSN naming all, and the held ones are not tried again."""
    s = Setup()
    try:
        fast, slow, good = recipients()
        s.inject(fast + slow, "killed between")
        s.node.wait_log_count("event=bounced", len(fast), timeout=60)
        wait_until(lambda: len(s.slow.seen()) >= 1, 30, "the slow MX to be asked")
        assert s.node.count_log("event=dsn_queued") == 0
        s.node.kill9()
        s.node = None
        s.slow_release.set()  # answers at once from now on
        s.start()
        wait_until(lambda: s.node.count_log("event=bounced") >= len(slow), 60,
                   "the slow ones bounced after the restart")
        wait_until(s.spool_empty, 60, "an empty spool (the DSN delivered)")
        dsns = s.dsns()
        assert len(dsns) == 1, dsns
        assert next(iter(dsns.values())) == sorted(fast + slow), dsns
        assert all(n == 1 for n in s.fast.seen().values()), s.fast.seen()
        assert s.node.count_log("event=bounced") == len(slow)  # this run's only
        assert s.node.stop_clean() == 0
        s.node = None
    finally:
        s.close()


def test_held_failures_go_after_dsn_wait():
    """A recipient in flight longer than dsn_wait does not hold the
    others' DSN back: it goes when they are due, and the late failure
    gets a DSN of its own."""
    s = Setup(bounce_conf="dsn_wait = 2s")
    try:
        fast, slow, good = recipients()
        s.inject(fast + slow, "waited too long")
        s.node.wait_log_count("event=bounced", len(fast), timeout=60)
        wait_until(lambda: len(s.dsns()) >= 1, 60, "the held failures' DSN")
        first = s.dsns()
        assert list(first.values()) == [sorted(fast)], first
        s.slow_release.set()
        wait_until(s.spool_empty, 60, "an empty spool")
        dsns = s.dsns()
        assert len(dsns) == 2, dsns
        assert sorted(sorted(v) for v in dsns.values()) == sorted([sorted(fast), sorted(slow)])
    finally:
        s.close()


def test_deferred_recipient_lets_the_dsn_go():
    """The other recipients are deferred (450): nothing is in flight, so
    the failures' DSN goes at once, not after dsn_wait."""
    s = Setup(bounce_conf="dsn_wait = 1h", slow_code=450)
    try:
        s.slow_release.set()
        fast, slow, good = recipients()
        s.inject(fast + slow, "some deferred")
        s.node.wait_log_count("event=deferred", len(slow), timeout=60)
        wait_until(lambda: len(s.dsns()) >= 1, 60, "the failures' DSN")
        assert list(s.dsns().values()) == [sorted(fast)], s.dsns()
        # the message waits for its deferred recipients alone. The DSN
        # seen at the receiver leaves the spool when its delivery's
        # outcome is committed, a moment after the receiver's 250: wait
        # for that (bounded), then check what is left
        def queue():
            return stats_ask(s.sock, "stats")["queue"]
        wait_until(lambda: queue()["messages"] == 1, 30, "the DSN gone from the spool")
        q = queue()
        assert q["recipients"] == len(slow) and q["deferred"] == len(slow), q
    finally:
        s.close()


def test_held_failures_shown_and_left_by_flush():
    """sluicectl message shows a held failure (dsn_held) with the
    server's reply; sluicectl flush leaves it (it failed: no retry), and
    nothing is tried again."""
    s = Setup(bounce_conf="dsn_wait = 1h")
    try:
        fast, slow, good = recipients()
        s.inject(fast + slow, "flushed")
        line = s.node.wait_log_count("event=bounced", len(fast), timeout=60)[0]
        qid = re.search(r"id=(\S+)", line).group(1)
        msg = subprocess.run([SLUICECTL, "-s", s.sock, "--json", "message", qid],
                             capture_output=True, text=True, timeout=30)
        assert msg.returncode == 0, msg.stderr
        rows = {r["rcpt"]: r for r in json.loads(msg.stdout)["recipients"]}
        states = {a: r["state"] for a, r in rows.items()}
        assert all(states[r] == "dsn_held" for r in fast), states
        assert all(states[r] == "ready" for r in slow), states
        # A held failure shows the server's reply, as a deferred one does:
        # before, its last_reply was the DSN entry the spool keeps in front
        # of it ("dsn-held 5.1.1 invalid_recipient HOST r 1796... 5.1.1 <"),
        # which sluicectl message and queue printed, cut, as the reply.
        for r in fast:
            assert rows[r]["last_code"] == 550, rows[r]
            assert rows[r]["last_reply"] == "5.1.1 <%s>: no such user here" % r, rows[r]
        for view, shown in (("message", r"550\s+5\.1\.1 <%s>: no such user here\n"),
                            ("queue", r"\(550 5\.1\.1 <%s>: no such user here\)\n")):
            arg = qid if view == "message" else "10"
            text = subprocess.run([SLUICECTL, "-s", s.sock, view, arg], capture_output=True,
                                  text=True, timeout=30)
            assert text.returncode == 0, text.stderr
            assert "dsn-held" not in text.stdout, text.stdout
            assert re.search(shown % re.escape(fast[0]), text.stdout), text.stdout
        fl = subprocess.run([SLUICECTL, "-s", s.sock, "--json", "flush"], capture_output=True,
                            text=True, timeout=30)
        assert fl.returncode == 0, fl.stderr
        assert json.loads(fl.stdout)["recipients"] == 0, fl.stdout
        s.slow_release.set()
        wait_until(s.spool_empty, 60, "an empty spool")
        assert list(s.dsns().values()) == [sorted(fast + slow)], s.dsns()
        assert all(n == 1 for n in s.fast.seen().values()), s.fast.seen()
    finally:
        s.close()

def test_held_failures_are_not_waiting_mail_of_their_domain():
    """A domain whose recipients all failed, their DSN held for the rest
    of their message, has nothing waiting: sluicectl domains shows no
    deferred recipient and no oldest age for it (before, the held
    failures' age was its OLDEST, and the metric
    sluice_domain_oldest_message_age_seconds: a domain all of whose mail
    bounced looked stuck), while slow.test, its mail in flight, has one."""
    s = Setup(bounce_conf="dsn_wait = 1h")
    try:
        fast, slow, good = recipients()
        s.inject(fast + slow, "held")
        s.node.wait_log_count("event=bounced", len(fast), timeout=60)

        def rows():
            p = subprocess.run([SLUICECTL, "-s", s.sock, "--json", "domains", "100"],
                               capture_output=True, text=True, timeout=30)
            assert p.returncode == 0, p.stderr
            return {r["name"]: r for r in json.loads(p.stdout)["domains"]}
        # Logged bounced once committed (held): the first view scans the
        # spool with them there (its per-domain counts are then reused).
        wait_until(lambda: all(rows().get(f"fast{d}.test", {}).get("bounced") == 5
                               for d in (1, 2)), 30, "the fast domains' bounces counted")
        got = rows()
        for d in (1, 2):
            r = got[f"fast{d}.test"]
            assert (r["ready"], r["deferred"], r["inflight"]) == (0, 0, 0), r
            assert r["oldest"] is None and r["oldest_age_ms"] is None, r
        assert got["slow.test"]["oldest"] is not None, got["slow.test"]
        s.slow_release.set()
        wait_until(s.spool_empty, 60, "an empty spool")
        assert list(s.dsns().values()) == [sorted(fast + slow)], s.dsns()
    finally:
        s.close()


def test_reload_to_no_wait_sends_the_held_dsns():
    """dsn_wait = 0 set by a reload (the README's way before going back
    to an earlier version, which would try a held failure again): the
    held failures' DSN goes at their next check (30 s at most), while
    the slow recipient is still in flight, and none is held after."""
    s = Setup(bounce_conf="dsn_wait = 1h")
    try:
        fast, slow, good = recipients()
        s.inject(fast + slow, "reloaded")
        s.node.wait_log_count("event=bounced", len(fast), timeout=60)
        wait_until(lambda: len(s.slow.seen()) >= 1, 30, "the slow MX to be asked")
        assert s.dsns() == {}, s.dsns()
        with open(s.conf) as f:
            conf = f.read()
        with open(s.conf, "w") as f:
            f.write(conf.replace("dsn_wait = 1h", "dsn_wait = 0"))
        s.node.signal(signal.SIGHUP)
        s.node.wait_log("event=config_reloaded", timeout=30)
        wait_until(lambda: len(s.dsns()) >= 1, 60, "the held failures' DSN")
        assert list(s.dsns().values()) == [sorted(fast)], s.dsns()
        s.slow_release.set()
        wait_until(s.spool_empty, 60, "an empty spool")
        dsns = s.dsns()
        assert len(dsns) == 2, dsns
        assert all(n == 1 for n in s.fast.seen().values()), s.fast.seen()
    finally:
        s.close()


def test_thousand_recipients_on_fifty_domains_one_dsn():
    """1,000 recipients on 50 domains, every one refused (smtp-sink's
    5xx to RCPT, 20 batches to one MX at once over two workers): one DSN
    naming the 1,000."""
    s = Setup()
    try:
        s.dns.restart([
            "host-record=mx1.test,127.0.0.1", "host-record=mx2.test,127.0.0.2",
            "mx-host=sender.test,mx2.test,10"] +
            [f"mx-host=d{k}.test,mx3.test,10" for k in range(50)] +
            ["host-record=mx3.test,127.0.0.3"])
        rcpts = [f"r{i}@d{i % 50}.test" for i in range(1000)]
        s.inject(rcpts, "a thousand")
        s.node.wait_log_count("event=bounced", len(rcpts), timeout=120)
        wait_until(s.spool_empty, 120, "an empty spool (the DSN delivered)")
        dsns = s.dsns()
        assert len(dsns) == 1, {k: len(v) for k, v in dsns.items()}
        assert next(iter(dsns.values())) == sorted(rcpts)
        assert s.node.count_log("event=dsn_queued") == 1
        assert sum(s.fast.seen().values()) == len(rcpts), len(s.fast.seen())
    finally:
        s.close()


def test_verp_failures_one_dsn():
    """Under VERP each recipient goes in a transaction of its own (its own
    envelope sender), yet the message's failures make one DSN (earlier
    versions sent one per recipient)."""
    s = None
    keyfile = None
    try:
        wd = Workdir("sluice-dsnmsg-key-")
        keyfile = wd.file("verp.key", "0123456789abcdef0123456789abcdef-verp-test\n")
        s = Setup(bounce_conf=f"listen = 127.0.0.1:{free_port()}\nverp_domain = bounces.test\n"
                              f"verp_key_file = {keyfile}")
        fast, slow, good = recipients()
        s.inject(fast, "verp")
        s.node.wait_log_count("event=bounced", len(fast), timeout=60)
        wait_until(s.spool_empty, 60, "an empty spool (the DSN delivered)")
        dsns = s.dsns()
        assert list(dsns.values()) == [sorted(fast)], dsns
    finally:
        if s is not None:
            s.close()
        if keyfile is not None:
            wd.cleanup()


def slow_domains(s, n):
    """DNS: d0.test .. d{n-1}.test on the slow MX (127.0.0.4)."""
    s.dns.restart([
        "host-record=mx1.test,127.0.0.1", "host-record=mx2.test,127.0.0.2",
        "mx-host=good.test,mx1.test,10", "mx-host=sender.test,mx2.test,10",
        "host-record=mx4.test,127.0.0.4"] + [f"mx-host=d{k}.test,mx4.test,10" for k in range(n)])


def delay_dsns(s):
    """Message-ID -> the recipients named, over the delay warnings at the
    sender's MX written whole (each checked to name delayed recipients
    only)."""
    out = {}
    for m in s.senders.messages():
        text = m.decode("utf-8", "replace").replace("\r\n", "\n")
        mid = MSGID_RE.search(m)
        if mid is None or not whole(m) or "Action: delayed" not in text:
            continue
        assert "Action: failed" not in text and "Action: relayed" not in text, text[:3000]
        assert "Subject: Delayed Mail" in text, text[:3000]
        out[mid.group(1)] = sorted(FINAL_RE.findall(text))
    return out


def test_delay_warnings_one_per_message():
    """A message to 50 recipients on 10 domains whose MX takes longer than
    delay_warning to answer 450 gives its sender one delay warning naming
    every deferred recipient that asked for one (NOTIFY=DELAY), not one
    per domain (earlier versions sent 10); later deferrals, two rounds of
    the 2 s schedule, send none; a recipient with NOTIFY=NEVER or without
    NOTIFY, and one delivered, are not named."""
    s = Setup(bounce_conf="delay_warning = 2s", slow_code=450, retry="2s")
    try:
        slow_domains(s, 10)
        asked = [f"r{i}@d{i % 10}.test" for i in range(50)]
        rcpts = [(a, "DELAY,FAILURE" if i % 2 else "DELAY") for i, a in enumerate(asked)]
        rcpts += [("never@d1.test", "NEVER"), ("silent@d2.test", None),
                  ("g0@good.test", "DELAY,FAILURE")]
        t0 = time.monotonic()
        s.inject_notify(rcpts, "slow domains")
        wait_until(lambda: len(s.slow.seen()) >= 1, 30, "the slow MX to be asked")
        s.node.wait_log("event=delivered", timeout=30)
        # the MX answers once delay_warning has passed since the arrival
        wait_until(lambda: time.monotonic() > t0 + 2.5, 10, "delay_warning to pass")
        s.slow_release.set()
        wait_until(lambda: len(delay_dsns(s)) >= 1, 60, "the delay warning")
        # two more rounds of deferrals (52 recipients each), then count
        s.node.wait_log_count("event=deferred", 3 * 52, timeout=60)
        wait_until(lambda: s.node.count_log("event=dsn_queued") ==
                   len(s.senders.messages()), 30, "every queued DSN at the sender's MX")
        dsns = delay_dsns(s)
        assert len(dsns) == 1, {k: len(v) for k, v in dsns.items()}
        assert next(iter(dsns.values())) == sorted(asked), dsns
        assert s.node.count_log("event=dsn_queued") == 1, s.node.log_lines("event=dsn_queued")
        ev = s.dlog_events("dsn")
        assert len(ev) == 1 and len(ev[0]["recipients"]) == len(asked), ev
        assert all(x["action"] == "delayed" for x in ev[0]["recipients"]), ev
    finally:
        s.close()


def test_delay_warning_kept_across_kill9():
    """Deferrals past delay_warning stored without their warning (as a
    kill -9 between a deferral's commit and its warning's leaves them:
    here a first run with delay_warning = 0, killed): after the start the
    next deferrals send one warning naming every recipient; killed -9
    again and started, the message's mark keeps it at one."""
    s = Setup(bounce_conf="delay_warning = 0", slow_code=450, retry="2s")
    try:
        slow_domains(s, 3)
        s.slow_release.set()  # 450 at once
        asked = [f"r{i}@d{i % 3}.test" for i in range(9)]
        s.inject_notify([(a, "DELAY,FAILURE") for a in asked], "killed")
        s.node.wait_log_count("event=deferred", len(asked), timeout=60)
        s.node.kill9()
        s.node = None
        with open(s.conf) as f:
            conf = f.read()
        with open(s.conf, "w") as f:
            f.write(conf.replace("delay_warning = 0", "delay_warning = 1s"))
        s.start()
        wait_until(lambda: len(delay_dsns(s)) >= 1, 60, "the delay warning after the start")
        s.node.kill9()
        s.node = None
        msgs = [json.loads(ln) for ln in spool_tool("dump", s.spool).stdout.splitlines()
                if ln.startswith("{")]
        mine = [m for m in msgs if m["sender"] == "alice@sender.test"]
        assert len(mine) == 1 and mine[0]["delay_warned"] is True, msgs
        s.start()
        s.node.wait_log_count("event=deferred", 2 * len(asked), timeout=60)
        wait_until(lambda: len(s.senders.messages()) >= 1, 30, "the DSN at the sender's MX")
        dsns = delay_dsns(s)
        assert len(dsns) == 1, {k: len(v) for k, v in dsns.items()}
        assert next(iter(dsns.values())) == sorted(asked), dsns
        assert s.node.count_log("event=dsn_queued") == 0  # this run's
    finally:
        s.close()


def test_delay_warning_not_held_by_a_suspended_domain():
    """A recipient whose domain is suspended stays queued: the others'
    deferrals past delay_warning wait for it dsn_wait (3 s) at most, then
    the warning goes, not at their next retry an hour later, naming the
    queued one too (it asked, and has waited as long: the message's mark
    keeps any later warning from it; earlier versions left it out)."""
    s = Setup(bounce_conf="delay_warning = 2s\ndsn_wait = 3s", slow_code=450)
    try:
        slow_domains(s, 3)
        sus = subprocess.run([SLUICECTL, "-s", s.sock, "suspend", "good.test"],
                             capture_output=True, text=True, timeout=30)
        assert sus.returncode == 0, sus.stderr
        asked = [f"r{i}@d{i % 3}.test" for i in range(6)]
        t0 = time.monotonic()
        s.inject_notify([(a, "DELAY") for a in asked] + [("g0@good.test", "DELAY")], "suspended")
        wait_until(lambda: len(s.slow.seen()) >= 1, 30, "the slow MX to be asked")
        wait_until(lambda: time.monotonic() > t0 + 2.5, 10, "delay_warning to pass")
        s.slow_release.set()
        s.node.wait_log_count("event=deferred", len(asked), timeout=30)
        wait_until(lambda: len(delay_dsns(s)) >= 1, 30, "the delay warning")
        assert list(delay_dsns(s).values()) == [sorted(asked + ["g0@good.test"])], delay_dsns(s)
        assert not [ln for ln in s.node.log_lines("event=delivered") if "rcpt=<g0@" in ln]
    finally:
        s.close()


def test_ret_full_over_return_max_says_why():
    """RET=FULL for a message over return_max (64K here): its DSN returns
    the headers and says the message was too large (earlier versions said
    only that the headers are attached, as for RET=HDRS); one under it
    goes back whole; RET=HDRS, headers."""
    s = Setup(bounce_conf="return_max = 64K")
    try:
        big = (b"Subject: big\r\nX-Marker: head\r\n\r\n" + (b"y" * 998 + b"\r\n") * 100)
        small = b"Subject: small\r\nX-Marker: head\r\n\r\nsmall body\r\n"
        for rcpt, body, ret in (("u0@fast1.test", big, "FULL"), ("u1@fast1.test", small, "FULL"),
                                ("u2@fast1.test", big, "HDRS")):
            with smtplib.SMTP("127.0.0.1", s.port, timeout=30) as c:
                c.ehlo("t")
                assert c.mail("alice@sender.test", [f"RET={ret}"])[0] == 250
                assert c.rcpt(rcpt)[0] == 250
                assert c.data(body)[0] == 250
        wait_until(lambda: len(s.dsns()) >= 3 and s.spool_empty(), 60, "the three DSNs")
        by = {}
        for m in s.senders.messages():
            text = m.decode("utf-8", "replace").replace("\r\n", "\n")
            by[FINAL_RE.search(text).group(1)] = text
        assert "larger than 65536 octets, so only its headers" in by["u0@fast1.test"], \
            by["u0@fast1.test"][:1500]
        assert "text/rfc822-headers" in by["u0@fast1.test"] and "yyyy" not in by["u0@fast1.test"]
        assert "The original message is attached." in by["u1@fast1.test"]
        assert "message/rfc822" in by["u1@fast1.test"] and "small body" in by["u1@fast1.test"]
        assert "The headers of the original message are attached." in by["u2@fast1.test"]
        assert "larger than" not in by["u2@fast1.test"] and "yyyy" not in by["u2@fast1.test"]
    finally:
        s.close()


def test_success_reports_one_per_message_across_kill9():
    """Recipients on 5 domains whose MX offers no DSN ask NOTIFY=SUCCESS:
    they are delivered while the slow MX holds the others; sluice is
    killed (-9), started, and the slow ones fail: one DSN names the 5
    relayed and the 5 failed (earlier versions sent one success report
    per domain, then one failure report), and no delivered recipient is
    sent again."""
    s = Setup()
    try:
        s.good.stop()
        s.good = Sink(s.wd, s.mx_port, flags=["-N"])  # no DSN offered
        s.dns.restart([
            "host-record=mx1.test,127.0.0.1", "host-record=mx2.test,127.0.0.2",
            "host-record=mx4.test,127.0.0.4", "mx-host=sender.test,mx2.test,10",
            "mx-host=slow.test,mx4.test,10"] + [f"mx-host=g{k}.test,mx1.test,10" for k in range(5)])
        good = [f"u{k}@g{k}.test" for k in range(5)]
        slow = [f"s{i}@slow.test" for i in range(5)]
        s.inject_notify([(a, "SUCCESS,FAILURE") for a in good + slow], "success")
        s.node.wait_log_count("event=delivered", len(good), timeout=60)
        wait_until(lambda: len(s.slow.seen()) >= 1, 30, "the slow MX to be asked")
        assert s.node.count_log("event=dsn_queued") == 0, s.node.log_lines("event=dsn_queued")
        s.node.kill9()
        s.node = None
        s.slow_release.set()
        s.start()
        s.node.wait_log_count("event=bounced", len(slow), timeout=60)
        wait_until(s.spool_empty, 60, "an empty spool (the DSN delivered)")
        dsns = s.dsns()
        assert list(dsns.values()) == [sorted(good + slow)], dsns
        text = s.senders.messages()[0].decode("utf-8", "replace")
        assert text.count("Action: relayed") == len(good), text[:3000]
        assert text.count("Action: failed") == len(slow), text[:3000]
        again = [ln for ln in s.node.log_lines("event=delivered") if "rcpt=<u" in ln]
        assert again == [], again  # this run's: none sent again
        to_good = b"".join(m for m in s.good.messages())
        for a in good:
            assert to_good.count(f"X-Rcpt-Args: <{a}>".encode()) == 1, a
    finally:
        s.close()


if __name__ == "__main__":
    main([test_failures_on_several_domains_one_dsn, test_reload_to_no_wait_sends_the_held_dsns, test_kill9_between_failures_still_one_dsn,
          test_held_failures_go_after_dsn_wait, test_deferred_recipient_lets_the_dsn_go,
          test_held_failures_shown_and_left_by_flush,
          test_held_failures_are_not_waiting_mail_of_their_domain,
          test_thousand_recipients_on_fifty_domains_one_dsn, test_verp_failures_one_dsn,
          test_delay_warnings_one_per_message, test_delay_warning_kept_across_kill9,
          test_delay_warning_not_held_by_a_suspended_domain,
          test_success_reports_one_per_message_across_kill9,
          test_ret_full_over_return_max_says_why])
