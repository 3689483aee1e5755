#!/usr/bin/env python3
"""Recovery from an outage: a deferred queue drained once the receivers
come back, beside the same messages relayed with the receivers up.

A sender's everyday bad hour: the MX hosts that receive for most of its
recipient domains stop answering (a provider's outage, a block, a network
fault) while the campaign goes on. Every message is accepted, tried,
deferred into the spool; the queue grows to the whole campaign. When the
receivers return, the operator flushes (Postfix's `postqueue -f`) or the
retry schedule brings the mail back, and what matters is how fast the
queue empties: a relay that scans its spool per recipient, reloads each
message's envelope for each domain or retries each domain on a
connection of its own drains a large queue far slower than it relays the
same mail fresh, and the backlog then meets the next campaign.

Each line, for N messages over D domains that all share one MX host
(the receiver of a large mail provider; a synthesising DNS responder
answers for them, as in bench_sites.py):

  fresh    the receiver up from the start: messages/s from the first
           injection to the last delivery (bench_sites.py's figure);
  outage   the receiver down (its port refuses): messages/s injected,
           seconds until every recipient is deferred in the spool
           (stats: queue.deferred), sluice's RSS then;
  drain    the receiver started, `sluicectl flush`: seconds from the
           flush to the first delivery (the spool's due poll runs every
           second), then messages/s from the first delivery to the last,
           and its ratio to the fresh line.
  turns    the busiest turn of a worker's loop in ms / the turns of 100 ms
           or more (stats: loop), since start: once every recipient was
           deferred (outage), and once the drain ended (start-up, outage
           and drain). While a turn lasts its worker serves nothing else,
           its submission sessions included.

The fresh line's rate includes the injection that competes with delivery
for the two cores; the drain has only delivery to do, and the spool's
reads in place of the injection's writes. A drain well below the fresh
rate is a collapse to look for.

  bench/relay/bench_backlog.py [--sluice build-rel/engine/sluice] [--messages 100000]
                               [--domains 1000,10000] [--sessions 150] [--size 2048]
                               [--relay-conf 'LINES'] [--rounds N] [--before OTHER-SLUICE]

With --before, each line runs with the other binary first (its own
fresh line, then its outage), then with --sluice. "never" in the
deferred column: some recipients were still not told deferred after
--timeout (the flush is sent all the same); a drain short of every
message says how many were delivered.

sluice runs on the built-in defaults (the bundled config's) but for what
the bench must set: listen address, spool (under --spool, /var/tmp),
resolver, the receiver's port, the stats socket and, where the binary
knows it, [delivery] allow_networks for loopback. The receiver is one
smtp-sink (Postfix's) on 127.0.0.1; the injector bench/relay/inject_synth
(built beside --sluice: cmake --build BUILD --target inject_synth
dns_synth). Never fails on a number.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from bench_sites import LogTail, inject_c, knows, log_time, sinks  # noqa: E402
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "integ"))
from harness import Daemon, Workdir, free_port, wait_until  # noqa: E402
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "support"))
from dns_synth import DnsSynth  # noqa: E402


def stats(ctl, sock):
    """sluice's stats now, from its stats socket (None: no answer)."""
    r = subprocess.run([ctl, "-s", sock, "--json", "stats"], capture_output=True, text=True,
                       timeout=30)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.splitlines()[0])


def queue_counts(ctl, sock):
    """(recipients, deferred) in sluice's queue now, from its stats socket."""
    st = stats(ctl, sock)
    return None if st is None else (st["queue"]["recipients"], st["queue"]["deferred"])


def longest_turn(ctl, sock):
    """(the busiest turn of a worker since start in ms, turns of 100 ms or
    more), or None from a sluice without these figures."""
    st = stats(ctl, sock)
    loop = st.get("loop") if st else None
    return None if loop is None else (loop["longest_turn_ms"], loop["slow_turns"])


def count_delivered(log, want, timeout):
    """Read the log until want deliveries are seen (or timeout); (count,
    times of the first and the last delivery by sluice's clock, Unix
    seconds)."""
    seen, first, last = 0, None, 0.0
    deadline = time.monotonic() + timeout
    while seen < want and time.monotonic() < deadline:
        for ln in log.lines():
            if b"event=delivered" in ln:
                seen += 1
                t = log_time(ln)
                first = t if first is None else min(first, t)
                last = max(last, t)
        if seen < want:
            time.sleep(0.05)
    return seen, first or 0.0, last


def relay_conf(wd, binary, work, port, sink_port, dns_port, extra=""):
    """The line's sluice.conf (in wd): the built-in defaults but for what
    the bench must set (listen, spool, resolver, the receiver's port, the
    stats socket at WORK/stats.sock, loopback allowed where binary knows
    allow_networks), then extra. Returns its path."""
    allow = "allow_networks = 127.0.0.0/8\n" if knows(binary, "allow_networks") else ""
    return wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{port}
trusted_networks = 127.0.0.0/8
[queue]
path = {work}/spool
map_size = 16G
[delivery]
remote_port = {sink_port}
{allow}
[dns]
servers = 127.0.0.1:{dns_port}
[stats]
socket = {work}/stats.sock
[log]
file = {work}/sluice.log
""" + extra + "\n")


def one(a, ndom, outage):
    work = tempfile.mkdtemp(prefix="sluice-backlog-", dir=a.spool)
    wd = Workdir("sluice-backlog-")
    sink_port = free_port()
    port = free_port()
    sock = f"{work}/stats.sock"
    dns = DnsSynth(mx_hosts=1, binary=a.dns_synth or None)
    conf = relay_conf(wd, a.sluice, work, port, sink_port, dns.port,
                      a.relay_conf.replace("\\n", "\n"))
    d = Daemon(a.sluice, conf)
    procs = []
    res = {}
    try:
        log = LogTail(f"{work}/sluice.log")
        wait_until(lambda: any(b"event=ready" in ln for ln in log.lines()), 30, "sluice ready")
        if not outage:
            procs = sinks(sink_port, 1, one=True)
        t0, w0 = time.monotonic(), time.time()
        errors, _ = inject_c(a.injector, port, a.messages, a.sessions, a.size, ndom)
        res["inject"] = a.messages / (time.monotonic() - t0)
        res["errors"] = len(errors)
        if not outage:
            n, _, last = count_delivered(log, a.messages - len(errors), a.timeout)
            res["delivered"], res["rate"] = n, n / max(1e-3, last - w0)
            return res
        # Every recipient deferred: the queue holds them all, none ready.
        want = a.messages - len(errors)
        got = [None]

        def all_deferred():
            got[0] = queue_counts(a.ctl, sock)
            return got[0] is not None and got[0][1] >= want
        try:
            wait_until(all_deferred, a.timeout, "every recipient deferred")
            res["defer_s"] = time.monotonic() - t0
        except AssertionError:
            res["defer_s"] = None  # some never told deferred: flushed all the same
        res["rss_mb"] = d.rss_kb() / 1024
        res["turn"] = longest_turn(a.ctl, sock)  # the outage's, start-up's included
        procs = sinks(sink_port, 1, one=True)
        for ln in log.lines():
            if b"event=delivered" in ln:
                raise AssertionError("delivered while the receiver was down")
        w1 = time.time()
        r = subprocess.run([a.ctl, "-s", sock, "flush"], capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            raise AssertionError(f"sluicectl flush: {r.returncode} {r.stderr.strip()}")
        n, first, last = count_delivered(log, want, a.timeout)
        res["delivered"], res["rate"] = n, n / max(1e-3, last - first) if n else 0.0
        res["start_s"] = first - w1 if n else None
        res["turn_all"] = longest_turn(a.ctl, sock)  # and the drain's
        return res
    finally:
        teardown(d, procs, dns, wd, work)


def teardown(d, procs, dns, wd, work):
    """Stop sluice (a drain, then a kill if it is still there), the
    receivers and the resolver (d and dns None: not started); remove the
    line's files."""
    try:
        if d is not None:
            d.stop(120)
    finally:
        if d is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        for p in procs:
            p.kill()
            p.wait()
        if dns is not None:
            dns.stop()
        wd.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-rel/engine/sluice")
    ap.add_argument("--messages", type=int, default=100000)
    ap.add_argument("--domains", default="1000,10000", help="domain counts, comma-separated")
    ap.add_argument("--sessions", type=int, default=150)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--timeout", type=int, default=600, help="seconds to wait for each phase")
    ap.add_argument("--spool", default="/var/tmp")
    ap.add_argument("--relay-conf", default="", help="config lines appended to sluice's (\\n "
                    "between lines)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each line; the best is shown")
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
    print(f"backlog: {a.messages} messages of {a.size} B, 1 recipient each, {a.sessions} "
          f"sessions, one MX host (smtp-sink), {a.sluice}, built-in defaults; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'domains':>8} {'fresh msg/s':>12} {'outage inj/s':>13} {'deferred in':>12} "
          f"{'RSS MB':>7} {'first after':>12} {'drain msg/s':>12} {'drain/fresh':>12} "
          f"{'turn outage':>11} {'turn drain':>11}", flush=True)
    binaries = [("", a.sluice)] if not a.before else [("before", a.before), ("after", a.sluice)]
    for ndom in (int(x) for x in a.domains.split(",")):
        for label, binary in binaries:
            a_run = argparse.Namespace(**vars(a))
            a_run.sluice = binary
            best = None
            for _ in range(a.rounds):
                f = one(a_run, ndom, False)
                o = one(a_run, ndom, True)
                if best is None or o["rate"] / max(1e-9, f["rate"]) > \
                        best[1]["rate"] / max(1e-9, best[0]["rate"]):
                    best = (f, o)
            f, o = best
            note = ""
            if f["delivered"] < a.messages or o["delivered"] < a.messages:
                note = f"  (delivered {f['delivered']} fresh, {o['delivered']} drained)"
            if f["errors"] or o["errors"]:
                note += f"  ({f['errors'] + o['errors']} injection errors)"
            defer = f"{o['defer_s']:>11.1f}s" if o["defer_s"] is not None else f"{'never':>12}"
            start = f"{o['start_s']:>11.1f}s" if o["start_s"] is not None else f"{'-':>12}"
            def turn(t):
                return f"{t[0]:>6.0f}/{t[1]:<4}" if t is not None else f"{'-':>11}"
            print(f"{ndom:>8} {f['rate']:>12.0f} {o['inject']:>13.0f} {defer} "
                  f"{o['rss_mb']:>7.0f} {start} {o['rate']:>12.0f} "
                  f"{100 * o['rate'] / max(1e-9, f['rate']):>11.0f}% "
                  f"{turn(o['turn'])} {turn(o['turn_all'])} {label}" + note, flush=True)


if __name__ == "__main__":
    main()
