"""Crash safety of the whole daemon: sluice under injection (several
smtplib clients, each message with an id of its own) and delivery load
(to smtp-sink on loopback) is killed with SIGKILL at random moments, many
times, and started again each time; then it runs until its spool is
empty. Every message that got a 250 must have reached the receiver whole
(its last line carries its id, so a transfer cut by a kill does not
count). Duplicates are allowed after a crash (at-least-once): counted and
printed, not failed.

SLUICE_CRASH_SEED fixes the seed (printed either way); SLUICE_CRASH_ROUNDS
the number of kills (default 25). The run is bounded: each round lives at
most 1.5 s after the daemon is ready."""
import json
import os
import random
import smtplib
import socket
import subprocess
import sys
import threading
import time

from harness import Sluice, Workdir, free_port, main, skip, spool_tool, wait_until
import test_delivery
from test_delivery import Dns, Sink

SLUICE = sys.argv[1]
test_delivery.SLUICE = SLUICE
SLUICECTL = os.environ.get("SLUICECTL") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl"))


class Injector(threading.Thread):
    """One submission client sending message after message, reconnecting
    whenever the daemon is gone; records the ids that got their 250."""

    def __init__(self, port, name, rng_seed, stop):
        super().__init__(daemon=True)
        self.port, self.name, self.stop = port, name, stop
        self.rng = random.Random(rng_seed)
        self.acked, self.tries, self.errors = [], 0, 0

    def message(self, mid):
        lines = self.rng.randint(1, 400)
        body = "".join(f"line {i} of {mid} " + "z" * self.rng.randint(0, 70) + "\r\n"
                       for i in range(lines))
        return (f"From: inj@example.com\r\nTo: r@sink.test\r\nSubject: {mid}\r\n"
                f"X-Crash-Id: {mid}\r\n\r\n{body}end-of {mid}\r\n").encode()

    def run(self):
        n = 0
        while not self.stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                    while not self.stop.is_set():
                        mid = f"{self.name}-{n}"
                        n += 1
                        self.tries += 1
                        rcpts = [f"r{k}@sink.test" for k in range(self.rng.choice([1, 1, 2, 3]))]
                        c.sendmail("inj@example.com", rcpts, self.message(mid))
                        self.acked.append(mid)
            except (OSError, smtplib.SMTPException):
                self.errors += 1
                # down (killed) or starting: try again shortly
                self.stop.wait(0.05)


def delivered_ids(sink):
    """id -> how many whole copies the sink holds (a copy whose transfer a
    kill cut short lacks its last line)."""
    seen = {}
    for m in sink.messages():
        mid = None
        for line in m.split(b"\n"):
            if line.startswith(b"X-Crash-Id: "):
                mid = line[12:].strip().decode()
                break
        if mid is not None and f"end-of {mid}".encode() in m:
            seen[mid] = seen.get(mid, 0) + 1
    return seen


def stats(wd):
    p = subprocess.run([SLUICECTL, "-s", f"{wd.path}/stats.sock", "--json", "stats"],
                       capture_output=True, text=True, timeout=30)
    return json.loads(p.stdout) if p.returncode == 0 else None


def test_kill9_loses_nothing():
    for tool in ("dnsmasq", "smtp-sink"):
        if not any(os.path.exists(os.path.join(d, tool)) for d in
                   os.environ.get("PATH", "").split(":") + ["/usr/sbin"]):
            skip(f"{tool} not installed (tools/install-deps --test)")
    seed = int(os.environ.get("SLUICE_CRASH_SEED") or random.SystemRandom().randrange(1 << 30))
    rounds = int(os.environ.get("SLUICE_CRASH_ROUNDS", "25"))
    print(f"seed={seed} rounds={rounds} (SLUICE_CRASH_SEED={seed} repeats the kill times)")
    rng = random.Random(seed)
    wd = Workdir("sluice-crash-")
    dns = sink = node = None
    stop = threading.Event()
    injectors = []
    try:
        mx_port = free_port()
        dns = Dns(wd, ["host-record=mx.test,127.0.0.1", "mx-host=sink.test,mx.test,10"])
        sink = Sink(wd, mx_port)
        port = free_port()
        spool = os.path.join(wd.path, "spool")
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
socket = {wd.path}/stats.sock
[domain *]
retry_schedule = 1s
site_hold = 1s
""")
        injectors = [Injector(port, f"c{i}", rng.randrange(1 << 30), stop) for i in range(3)]
        for t in injectors:
            t.start()
        t0 = time.monotonic()
        for r in range(rounds):
            node = Sluice(SLUICE, conf)
            node.wait_log("event=ready", timeout=30)
            # the random moment: this is what the test varies, not a wait
            time.sleep(rng.uniform(0.05, 1.5))
            node.kill9()  # and fails on a sanitizer report in its log
            node = None
        stop.set()
        for t in injectors:
            t.join(timeout=30)
        acked = [m for t in injectors for m in t.acked]
        print(f"{rounds} kills in {time.monotonic() - t0:.1f}s; {len(acked)} messages got 250 "
              f"of {sum(t.tries for t in injectors)} tried")
        assert len(acked) > rounds, "too little injected to mean anything"

        # the last run: until the spool is empty
        node = Sluice(SLUICE, conf)
        node.wait_log("event=ready", timeout=30)

        def drained():
            st = stats(wd)
            return st is not None and st["queue"]["messages"] == 0

        wait_until(drained, 90, "an empty spool")
        seen = delivered_ids(sink)
        missing = [m for m in acked if m not in seen]
        dups = {m: c for m, c in seen.items() if c > 1}
        print(f"delivered {len(seen)} distinct messages; duplicates: {len(dups)}"
              f" ({sum(dups.values()) - len(dups)} extra copies)")
        assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:10]}"
        assert node.stop_clean() == 0
        node = None
        check = spool_tool("check", spool)
        assert check.returncode == 0, check.stdout
    finally:
        stop.set()
        if node is not None:
            node.kill9()
        for p in (sink, dns):
            if p is not None:
                p.stop()
        wd.cleanup()


if __name__ == "__main__":
    main([test_kill9_loses_nothing])
