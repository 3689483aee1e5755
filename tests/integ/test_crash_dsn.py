"""Crash safety of DSNs: a mass bounce (every recipient refused with a 5xx
at RCPT by smtp-sink) while submission clients send on, sluice killed
with SIGKILL at random moments, many times, and started again each time;
then it runs until its spool is empty. Every message that got a 250 must
have had exactly one DSN made for it (README: a DSN is committed in the
same transaction as the outcomes that cause it, so a crash cannot lose
one, and an outcome is not applied twice; a message's failures on two
domains are held for one DSN, and a hold survives the kill): the DSNs at the sender's MX
are told apart by their Message-ID (a DSN delivered twice, at least once
as any message, is one DSN).

SLUICE_CRASH_SEED fixes the seed; SLUICE_CRASH_ROUNDS the number of kills
(default 20)."""
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time

from harness import Sluice, Workdir, free_port, main, skip, spool_tool, wait_until
import test_delivery
from test_delivery import Dns, Sink, records_for

SLUICE = sys.argv[1]
test_delivery.SLUICE = SLUICE
SLUICECTL = os.environ.get("SLUICECTL") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl"))


class Injector(threading.Thread):
    """One submission client: message after message from alice@sender.test
    to one to three recipients at hard.test and hard2.test (two domains:
    two delivery batches, whose failures wait for each other to make one
    DSN), each with its tag in Subject;
    reconnects whenever the daemon is gone; records the tags that got
    their 250."""

    def __init__(self, port, name, seed, stop):
        super().__init__(daemon=True)
        self.port, self.name, self.stop = port, name, stop
        self.rng = random.Random(seed)
        self.n = 0
        self.acked = []

    def session(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            f = s.makefile("rb")
            if not f.readline().startswith(b"220"):
                return
            s.sendall(b"EHLO inj\r\n")
            while f.readline()[3:4] == b"-":
                pass
            while not self.stop.is_set():
                tag = f"{self.name}x{self.n}x"  # one a message, across sessions
                self.n += 1
                rcpts = [f"{tag}{k}@{self.rng.choice(['hard', 'hard2'])}.test"
                         for k in range(self.rng.choice([1, 1, 2, 3]))]
                s.sendall(b"MAIL FROM:<alice@sender.test>\r\n" +
                          b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts) +
                          b"DATA\r\n")
                for _ in range(1 + len(rcpts)):
                    if not f.readline().startswith(b"250"):
                        return
                if not f.readline().startswith(b"354"):
                    return
                s.sendall(f"Subject: {tag}\r\n\r\nbody of {tag}\r\n.\r\n".encode())
                if not f.readline().startswith(b"250"):
                    return
                self.acked.append(tag)

    def run(self):
        while not self.stop.is_set():
            try:
                self.session()
            except OSError:
                pass
            self.stop.wait(0.05)


def stats(sock):
    p = subprocess.run([SLUICECTL, "-s", sock, "--json", "stats"], capture_output=True,
                       text=True, timeout=30)
    return json.loads(p.stdout) if p.returncode == 0 else None


SUBJECT = re.compile(rb"^Subject: (c\d+x\d+x)\r?$", re.M)
MSGID = re.compile(rb"^Message-ID: *(<[^>]+>)", re.M | re.I)


def test_kill9_mass_bounce_dsn_once():
    for tool in ("dnsmasq", "smtp-sink"):
        if not any(os.path.exists(os.path.join(d, tool)) for d in
                   os.environ.get("PATH", "").split(":") + ["/usr/sbin"]):
            skip(f"{tool} not installed (tools/install-deps --test)")
    seed = int(os.environ.get("SLUICE_CRASH_SEED") or random.SystemRandom().randrange(1 << 30))
    rounds = int(os.environ.get("SLUICE_CRASH_ROUNDS", "20"))
    print(f"     seed={seed} rounds={rounds}")
    rng = random.Random(seed)
    wd = Workdir("sluice-crash-dsn-")
    dns = hard = senders = node = None
    stop = threading.Event()
    try:
        mx_port = free_port()
        dns = Dns(wd, records_for(["hard.test", "hard2.test"]) + [
            "host-record=mx2.test,127.0.0.2", "mx-host=sender.test,mx2.test,10"])
        hard = Sink(wd, mx_port, ["-f", "RCPT"])
        senders = Sink(wd, mx_port, name="senders", host="127.0.0.2")
        port = free_port()
        spool = os.path.join(wd.path, "spool")
        sock = os.path.join(wd.path, "stats.sock")
        conf = wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{port}
trusted_networks = 127.0.0.0/8
[queue]
path = {spool}
map_size = 256M
[delivery]
remote_port = {mx_port}
allow_networks = 127.0.0.0/8
connect_timeout = 2s
idle_timeout = 1s
[dns]
servers = 127.0.0.1:{dns.port}
[stats]
socket = {sock}
[domain *]
retry_schedule = 1s
site_hold = 1s
""")
        injectors = [Injector(port, f"c{i}", rng.randrange(1 << 30), stop) for i in range(3)]
        for t in injectors:
            t.start()
        for r in range(rounds):
            node = Sluice(SLUICE, conf)
            node.wait_log("event=ready", timeout=30)
            time.sleep(rng.uniform(0.05, 1.5))  # the random moment: what the test varies
            node.kill9()
            node = None
        stop.set()
        for t in injectors:
            t.join(30)
        acked = [m for t in injectors for m in t.acked]
        print(f"     {rounds} kills; {len(acked)} messages acknowledged")
        assert len(acked) > rounds, "too little injected to mean anything"
        node = Sluice(SLUICE, conf)
        node.wait_log("event=ready", timeout=30)
        wait_until(lambda: (lambda st: st is not None and st["queue"]["messages"] == 0)(
            stats(sock)), 120, "an empty spool")
        dsns = {}  # tag -> the Message-IDs of its DSNs
        copies = 0
        for m in senders.messages():
            subj, mid = SUBJECT.search(m), MSGID.search(m)
            if subj is None or mid is None:
                continue
            copies += 1
            dsns.setdefault(subj.group(1).decode(), set()).add(mid.group(1))
        lost = [t for t in acked if t not in dsns]
        twice = {t: len(v) for t, v in dsns.items() if len(v) > 1}
        print(f"     {len(dsns)} messages with a DSN ({copies} copies delivered); "
              f"{len(twice)} with more than one")
        assert not lost, f"{len(lost)} acknowledged messages without a DSN, e.g. {lost[:5]}"
        if twice:
            t = next(iter(twice))
            for m in senders.messages():
                if f"Subject: {t}".encode() in m:
                    print(m.decode(errors="replace")[:1500])
        assert not twice, f"{len(twice)} messages with several DSNs, e.g. {list(twice)[:5]}"
        assert node.stop_clean() == 0
        node = None
        check = spool_tool("check", spool)
        assert check.returncode == 0, check.stdout
    finally:
        stop.set()
        if node is not None:
            node.kill9()
        for p in (hard, senders, dns):
            if p is not None:
                p.stop()
        wd.cleanup()


if __name__ == "__main__":
    main([test_kill9_mass_bounce_dsn_once])
