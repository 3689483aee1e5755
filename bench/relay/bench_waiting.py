#!/usr/bin/env python3
"""Memory of mail that waits: what each recipient due for delivery costs
while it sits in sluice's memory, held back by its domain's rate.

A bulk sender's everyday large queue is not an outage (bench_backlog.py)
but a receiver that takes mail slower than it comes: a campaign of a
million to one provider whose rate is a few hundred a second. Every
recipient is due, so each is a delivery job in memory (the spool keeps
the message itself) until its turn; their count, not the spool, is what
the node's memory must hold. This bench puts N such recipients in memory
and reads sluice's RSS.

Each line: N messages (one recipient each, --size octets) over D
domains that share one MX host, under `[domain *] max_message_rate =
1/h`: each domain's first message leaves, the others wait. Columns:
sluice's anonymous RSS (RssAnon: its heap, not the spool's mapped pages,
which its trims drop every second) when ready, the same once the
injection ended and it held still (two readings 0.5 s apart within 1%),
the recipients waiting then (N less those delivered, from the stats
socket), and the octets of that RSS growth per waiting recipient (what
the injection left behind, its sessions' buffers, counts in it too). With many domains the figure also carries what a
domain costs (its destination, DNS answer, MTA-STS entry), shared by
N/D recipients.

  bench/relay/bench_waiting.py [--sluice build-rel/engine/sluice] [--messages 100000]
                               [--domains 10,10000] [--sessions 50] [--size 2048]
                               [--before OTHER-SLUICE]

With --before, each line runs with the other binary first, then with
--sluice. Receiver: one smtp-sink (Postfix's) on 127.0.0.1; the injector
and resolver are bench/relay/inject_synth and dns_synth, built beside
--sluice (cmake --build BUILD --target inject_synth dns_synth
sluicectl). Never fails on a number.
"""
import argparse
import os
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from bench_backlog import relay_conf, stats, teardown  # noqa: E402
from bench_sites import LogTail, inject_c, sinks  # noqa: E402
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "integ"))
from harness import Daemon, Workdir, free_port, wait_until  # noqa: E402
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "support"))
from dns_synth import DnsSynth  # noqa: E402


def rss_anon_kb(pid):
    """The anonymous part of the process's RSS (its heap: the jobs), in KB;
    the spool's mapped pages, which come and go with its trims, left out."""
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("RssAnon:"):
                return int(ln.split()[1])
    return 0


def one(a, binary, ndom):
    work = tempfile.mkdtemp(prefix="sluice-waiting-", dir=a.spool)
    wd = Workdir("sluice-waiting-")
    dns = d = None
    procs = []
    try:
        sink_port, port = free_port(), free_port()
        sock = f"{work}/stats.sock"
        dns = DnsSynth(mx_hosts=1, binary=a.dns_synth)
        conf = relay_conf(wd, binary, work, port, sink_port, dns.port,
                          "[domain *]\nmax_message_rate = 1/h")
        d = Daemon(binary, conf)
        procs = sinks(sink_port, 1, one=True)
        log = LogTail(f"{work}/sluice.log")
        wait_until(lambda: any(b"event=ready" in ln for ln in log.lines()), 30, "sluice ready")
        rss0 = rss_anon_kb(d.proc.pid)
        errors, _ = inject_c(a.injector, port, a.messages, a.sessions, a.size, ndom)
        rss1, deadline = rss_anon_kb(d.proc.pid), time.monotonic() + 60
        while time.monotonic() < deadline:  # bounded: a minute at most
            time.sleep(0.5)
            was, rss1 = rss1, rss_anon_kb(d.proc.pid)
            if abs(rss1 - was) <= was / 100:
                break
        st = stats(a.ctl, sock)
        waiting = a.messages - len(errors) - (st["counters"]["delivered"] if st else 0)
        return rss0, rss1, waiting, len(errors)
    finally:
        teardown(d, procs, dns, wd, work)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-rel/engine/sluice")
    ap.add_argument("--messages", type=int, default=100000)
    ap.add_argument("--domains", default="10,10000", help="domain counts, comma-separated")
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--spool", default="/var/tmp")
    ap.add_argument("--before", default="", help="another sluice binary (e.g. main's) run on "
                    "each line just before, for figures side by side")
    a = ap.parse_args()
    build = os.path.join(os.path.dirname(os.path.abspath(a.sluice)), "..")
    a.injector = os.path.join(build, "bench", "relay", "inject_synth")
    a.dns_synth = os.path.join(build, "bench", "relay", "dns_synth")
    a.ctl = os.path.join(build, "tools", "sluicectl")
    for b in (a.injector, a.dns_synth, a.ctl):
        if not os.access(b, os.X_OK):
            ap.error(f"{b}: not built (cmake --build BUILD --target inject_synth dns_synth "
                     f"sluicectl)")
    print(f"waiting: {a.messages} messages of {a.size} B, 1 recipient each, {a.sessions} "
          f"sessions, one MX host (smtp-sink), max_message_rate = 1/h; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'domains':>8} {'anon ready MB':>13} {'anon after MB':>13} {'waiting':>8} "
          f"{'B/waiting':>10}", flush=True)
    binaries = [("", a.sluice)] if not a.before else [("before", a.before), ("after", a.sluice)]
    for ndom in (int(x) for x in a.domains.split(",")):
        for label, binary in binaries:
            rss0, rss1, waiting, errs = one(a, binary, ndom)
            per = (rss1 - rss0) * 1024 / max(1, waiting)
            note = f"  ({errs} injection errors)" if errs else ""
            print(f"{ndom:>8} {rss0 / 1024:>13.1f} {rss1 / 1024:>13.1f} {waiting:>8} "
                  f"{per:>10.0f} {label}" + note, flush=True)


if __name__ == "__main__":
    main()
