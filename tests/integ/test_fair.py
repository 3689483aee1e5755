"""Fair share between tenants and priority within a tenant, at one
destination (issue 16, "Fair share and priority").

dnsmasq gives ok.test an MX on loopback, Postfix's smtp-sink receives
(one file per message), and sluice relays at a low [domain] rate with one
recipient per transaction, so that a backlog stays queued while the test
looks. Tenants come from X-Sluice-Tenant (the client is in
trusted_networks), priority from X-Sluice-Priority. Every count is taken
at the receiver, from the Subject of each file; nothing depends on time
but the bounds of the waits.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

from harness import Sluice, Smtp, Workdir, free_port, main, skip, wait_until
import test_delivery
from test_delivery import Dns, Sink, records_for

SLUICE = sys.argv[1]
test_delivery.SLUICE = SLUICE
SLUICECTL = os.environ.get("SLUICECTL") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl"))

BACKLOG = 20000   # tenant A's recipients, 1000 per message
RATE = 100        # [domain] max_message_rate per second (the domain's worker holds all of it)


class Node:
    def __init__(self, weight_b=1):
        for tool in ("dnsmasq", "smtp-sink"):
            if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
                skip(f"{tool} not installed (tools/install-deps --test)")
        self.wd = Workdir("sluice-fair-")
        self.dns = self.sink = self.d = None
        self.seen = {}
        try:
            self.mx_port = free_port()
            self.dns = Dns(self.wd, records_for(["ok.test"]))
            self.sink = Sink(self.wd, self.mx_port)
            self.port = free_port()
            self.sock = os.path.join(self.wd.path, "stats.sock")
            conf = self.write_conf(weight_b)
            self.d = Sluice(SLUICE, conf)
            self.d.wait_log("event=ready")
        except BaseException:
            self.close()
            raise

    def write_conf(self, weight_b):
        return self.wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{self.port}
trusted_networks = 127.0.0.1/32
max_recipients = 1000
[queue]
path = {os.path.join(self.wd.path, "spool")}
map_size = 256M
[delivery]
remote_port = {self.mx_port}
allow_networks = 127.0.0.0/8
connect_timeout = 2s
[dns]
servers = 127.0.0.1:{self.dns.port}
[bounce]
dsn = no
[stats]
socket = {self.sock}
[domain ok.test]
max_message_rate = {RATE}/s
max_rcpt_per_txn = 1
max_connections = 4
[tenant A]
[tenant B]
weight = {weight_b}
""")

    def reload(self, weight_b):
        """[tenant B] weight changed by a reload (the stats socket's)."""
        self.write_conf(weight_b)
        r = self.ask("reload")
        assert r.get("ok"), r
        self.d.wait_log_count("event=config_reloaded", 1)

    def received(self):
        """Messages at the receiver by Subject (files read once each)."""
        for f in os.listdir(self.sink.dir):
            if f in self.seen:
                continue
            with open(os.path.join(self.sink.dir, f), "rb") as fh:
                data = fh.read()
            # smtp-sink writes LF line ends
            i = data.find(b"\nSubject: ")
            j = data.find(b"\n", i + 10) if i >= 0 else -1
            if j < 0:
                continue  # still being written
            self.seen[f] = data[i + 10:j].decode()
        counts = {}
        for s in self.seen.values():
            counts[s] = counts.get(s, 0) + 1
        return counts

    def ask(self, command):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.sock)
            s.sendall(command.encode() + b"\n")
            return json.loads(s.makefile("rb").readline())

    def dest(self):
        doms = [x for x in self.ask("domains")["domains"] if x["name"] == "ok.test"]
        assert len(doms) == 1, doms
        return doms[0]

    def queued(self):
        return self.dest()["ready"]

    def close(self):
        try:
            if self.d is not None and self.d.proc.poll() is None:
                assert self.d.stop_clean() == 0
        finally:
            for p in (self.sink, self.dns):
                if p is not None:
                    p.stop()
            self.wd.cleanup()


def inject(port, tenant, subject, messages, rcpts, priority=None, sender="s@example.com"):
    """messages messages of rcpts recipients each at ok.test, pipelined
    (MAIL, the RCPTs and DATA in one write)."""
    c = Smtp(port, timeout=60)
    c.expect("EHLO tester", 250)
    hdr = f"X-Sluice-Tenant: {tenant}\r\n"
    if priority is not None:
        hdr += f"X-Sluice-Priority: {priority}\r\n"
    body = f"{hdr}Subject: {subject}\r\n\r\nbody\r\n.\r\n".encode()
    n = 0
    for m in range(messages):
        cmds = [f"MAIL FROM:<{sender}>"]
        cmds += [f"RCPT TO:<{subject.lower()}.{m}.{i}@ok.test>" for i in range(rcpts)]
        cmds.append("DATA")
        c.send("".join(x + "\r\n" for x in cmds))
        reps = c.replies(len(cmds))
        assert all(r.code == 250 for r in reps[:-1]), [r.raw for r in reps if r.code != 250][:3]
        assert reps[-1].code == 354, reps[-1].raw
        c.send(body)
        r = c.reply()
        assert r.code == 250, r.raw
        n += rcpts
    c.cmd("QUIT")
    c.close()
    return n


def test_new_tenant_not_behind_a_backlog():
    """Tenant A queues 20,000 recipients at one domain (one per
    transaction, at a rate that delivers a few hundred while the test
    looks); then tenant B sends 100 messages: all of B's arrive while
    nearly all of A's backlog is still queued. With one FIFO per
    destination, B's would wait behind the 20,000 (minutes at this rate)."""
    n = Node()
    try:
        assert inject(n.port, "A", "fair-A", BACKLOG // 1000, 1000) == BACKLOG
        wait_until(lambda: n.received().get("fair-A", 0) > 0, 30, "A's first deliveries")
        x = n.dest()
        assert x["ready"] > BACKLOG // 2, x
        # The stats socket shows whose jobs wait.
        assert x["tenants_waiting"] == 1 and x["tenants"][0]["tenant"] == "A", x
        assert x["tenants"][0]["ready"] == x["ready"], x
        p = subprocess.run([SLUICECTL, "-s", n.sock, "domains"], capture_output=True, text=True,
                           timeout=30)
        row = [ln for ln in p.stdout.splitlines() if ln.startswith("ok.test")]
        assert p.returncode == 0 and len(row) == 1 and " A " in row[0], p.stdout
        inject(n.port, "B", "fair-B", 100, 1)
        got = wait_until(lambda: (c := n.received()).get("fair-B", 0) >= 100 and c, 60,
                         "B's 100 messages at the receiver")
        a = got.get("fair-A", 0)
        assert got["fair-B"] == 100, got
        # A keeps its share meanwhile, but most of its backlog still waits.
        assert 0 < a < BACKLOG // 10, got
        assert n.queued() > BACKLOG - BACKLOG // 10, n.ask("domains")
    finally:
        n.close()


def test_priority_within_a_tenant():
    """Within tenant A, 20 messages of priority 9 sent after a backlog of
    20,000 recipients of priority 0 are delivered before the backlog: at
    most the transactions already taken (connections in flight) of the
    backlog go between them."""
    n = Node()
    try:
        inject(n.port, "A", "fair-A", BACKLOG // 1000, 1000, priority=0)
        wait_until(lambda: n.received().get("fair-A", 0) > 0, 30, "A's first deliveries")
        before = n.received().get("fair-A", 0)
        inject(n.port, "A", "fair-A9", 20, 1, priority=9)
        got = wait_until(lambda: (c := n.received()).get("fair-A9", 0) >= 20 and c, 60,
                         "A's 20 priority 9 messages at the receiver")
        assert got["fair-A9"] == 20, got
        # At 100/s the 20 take well under a
        # second of tokens; A's priority 0 backlog barely moved meanwhile
        # (its jobs already on connections, and what arrived while the 20
        # were being injected, one transaction each).
        assert got.get("fair-A", 0) - before < 200, (before, got)
        assert n.queued() > BACKLOG - BACKLOG // 10, n.ask("domains")
    finally:
        n.close()


def test_weight_gives_the_share():
    """With [tenant B] weight = 3 and both tenants backlogged, B gets
    three transactions for each of A's at the receiver: counted over 600
    of B's deliveries once both wait (each has 1000 queued at least the
    whole time), give or take the transactions on the 4 connections.
    After a reload that sets B's weight to 1, one for one."""
    n = Node(weight_b=3)
    try:
        inject(n.port, "A", "fair-A", 4, 1000)
        inject(n.port, "B", "fair-B", 4, 1000)
        start = wait_until(lambda: (c := n.received()).get("fair-B", 0) >= 10 and c, 60,
                           "B's first deliveries")
        x = n.dest()
        assert x["tenants_waiting"] == 2, x
        assert {t["tenant"] for t in x["tenants"]} == {"A", "B"}, x
        assert sum(t["ready"] for t in x["tenants"]) == x["ready"], x
        got = wait_until(lambda: (c := n.received()).get("fair-B", 0) >= start["fair-B"] + 600
                         and c, 60, "600 more of B's at the receiver")
        da = got.get("fair-A", 0) - start.get("fair-A", 0)
        db = got["fair-B"] - start["fair-B"]
        assert 600 <= db < 700, (start, got)
        assert db / 3 - 20 <= da <= db / 3 + 20, (start, got)
        # A reload makes B weigh 1: even shares from then on.
        n.reload(1)
        start = n.received()
        got = wait_until(lambda: (c := n.received()).get("fair-B", 0) >= start["fair-B"] + 300
                         and c, 60, "300 more of B's at the receiver")
        da = got.get("fair-A", 0) - start.get("fair-A", 0)
        db = got["fair-B"] - start["fair-B"]
        assert db - 20 <= da <= db + 20, (start, got)
    finally:
        n.close()


if __name__ == "__main__":
    main([test_new_tenant_not_behind_a_backlog, test_priority_within_a_tenant,
          test_weight_gives_the_share])
