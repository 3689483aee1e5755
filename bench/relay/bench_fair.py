#!/usr/bin/env python3
"""Fair share between tenants at one site (issue 16): tenant A queues a
backlog of N recipients (default 200,000: 200 messages of 1,000, one
recipient per transaction, so 200,000 transactions) to one domain whose
MX is a local smtp-sink; as soon as A's injection is done, tenant B
injects 100 one-recipient messages. B's latency, injection to delivery,
is each delivery's queue_time_ms in the delivery log (sluice's reception
time to the receiver's 250), p50, p99 and max; beside it A's throughput
(A's deliveries over the run, first injection to last delivery), when the
late messages were injected (A's injection done, or --late-after), and
the whole run's time.

The same run in each mode (--modes), side by side:
  fair   B's messages are tenant B: the destination's queue shares
         between A and B by weight (both 1);
  one    B's messages are tenant A too (one tenant, as before fair
         share): they wait behind A's backlog, first in first out;
  site   the late messages are tenant A's too, but to another domain,
         small.test, whose MX is site.test's: the two domains share the
         site's connections, and take turns at them (site_share.c,
         conn_give_turn). With --before BIN the site mode runs on that
         binary first, for the figures before and after.

  chrt -f 80 bench/relay/bench_fair.py [--sluice build-rel/engine/sluice]
                                       [--backlog 200000] [--late 100] [--rate 4000]
                                       [--modes fair,one,site] [--before BIN]
                                       [--sink-delay 1] [--workers 1] [--late-after 50]
                                       [--conf '[delivery]\nmax_connections_per_address = 10']

Without --rate the receiver (smtp-sink) takes mail about as fast as it
is injected, so the backlog behind which B arrives is what delivery had
not caught up with; --sink-delay S makes the receiver wait S seconds
before it answers each DATA (a slow receiver: then the backlog waits on
the site's connections, not on a rate); --workers sets [server] workers
(2) and --conf appends lines to the config; --late-after N injects the
late messages once N of A's are delivered (the site's window grown). The site mode shows the
turns where one worker holds both domains and the address's cap binds
(--workers 1 and a max_connections_per_address under the domain's
max_connections): with two workers, small.test may live on the other one,
which gets its share of the cap at once (site_addr_yield), and with no
cap binding, small.test opens connections of its own as the site's window
grows. --rate gives the site a [domain] max_message_rate
(as a receiver's throttle would), so that A's 200,000 are queued.

Injection is Python on one connection, pipelined (MAIL, the RCPTs, DATA
in one write per message). Durable spool under /var/tmp. Never fails on
a number.
"""
import argparse
import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "integ"))
from harness import Daemon, Smtp, Workdir, free_port, wait_until  # noqa: E402
import test_delivery  # noqa: E402
from test_delivery import Dns, connectable, records_for  # noqa: E402


def inject(port, tenant, prefix, messages, rcpts, domain="site.test"):
    c = Smtp(port, timeout=120)
    c.expect("EHLO bench", 250)
    body = (f"X-Sluice-Tenant: {tenant}\r\nSubject: {prefix}\r\n\r\n" + ("x" * 78 + "\r\n") * 12 +
            ".\r\n").encode()
    for m in range(messages):
        cmds = ["MAIL FROM:<bench@example.com>"]
        cmds += [f"RCPT TO:<{prefix}.{m}.{i}@{domain}>" for i in range(rcpts)]
        cmds.append("DATA")
        c.send("".join(x + "\r\n" for x in cmds))
        reps = c.replies(len(cmds))
        if reps[-1].code != 354 or any(r.code != 250 for r in reps[:-1]):
            raise SystemExit(f"injection refused: {[r.raw for r in reps if r.code >= 400][:3]}")
        c.send(body)
        r = c.reply()
        if r.code != 250:
            raise SystemExit(f"DATA refused: {r.raw}")
    c.cmd("QUIT")
    c.close()


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p / 100.0 * len(v)))] if v else float("nan")


def one(a, mode, sluice):
    wd = Workdir("sluice-bench-fair-")
    dns = sink = d = None
    try:
        mx_port = free_port()
        dns = Dns(wd, records_for(["site.test", "small.test"]))
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        sink = subprocess.Popen(["smtp-sink", *user, *(["-w", str(a.sink_delay)] if a.sink_delay else []), "-c", f"127.0.0.1:{mx_port}", "256"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: connectable(mx_port), 10, "smtp-sink")
        port = free_port()
        spool = os.path.join("/var/tmp", f"sluice-bench-fair-{os.getpid()}-{mode}")
        shutil.rmtree(spool, ignore_errors=True)
        dlog = os.path.join(wd.path, "delivery.jsonl")
        conf = wd.file("sluice.conf", f"""
[server]
workers = {a.workers}
listen = 127.0.0.1:{port}
trusted_networks = 127.0.0.1/32
max_recipients = 1000
[queue]
path = {spool}
map_size = 4G
[delivery]
remote_port = {mx_port}
allow_networks = 127.0.0.0/8
[dns]
servers = 127.0.0.1:{dns.port}
[bounce]
dsn = no
[log]
delivery_log = {dlog}
level = notice
[domain site.test]
max_rcpt_per_txn = 1
{f"max_message_rate = {a.rate}/s" if a.rate else ""}
[tenant A]
[tenant B]
{a.conf.replace(chr(92) + "n", chr(10))}
""")
        d = Daemon(sluice, conf)
        d.wait_log("event=ready")
        t0 = time.monotonic()
        per = min(1000, a.backlog)  # recipients per message of A's
        inject(port, "A", "a", a.backlog // per, per)
        seen = {"off": 0, "n": 0}

        def delivered_lines():
            # read on from where the last look stopped, whole lines only
            if not os.path.exists(dlog):
                return 0
            with open(dlog, "rb") as f:
                f.seek(seen["off"])
                data = f.read()
            end = data.rfind(b"\n") + 1
            seen["off"] += end
            seen["n"] += data[:end].count(b'"event":"delivery"')
            return seen["n"]
        if a.late_after:
            wait_until(lambda: delivered_lines() >= a.late_after, 600,
                       f"{a.late_after} of A's deliveries")
        t_late = time.monotonic()
        inject(port, "B" if mode == "fair" else "A", "late", a.late, 1,
               "small.test" if mode == "site" else "site.test")
        total = a.backlog // per * per + a.late
        wait_until(lambda: delivered_lines() >= total, 1800, "every delivery")
        t_end = time.monotonic()
        late, a_times = [], []
        with open(dlog) as f:
            for ln in f:
                if '"event":"delivery"' not in ln:
                    continue
                e = json.loads(ln)
                if e["rcpt"].startswith("late."):
                    late.append(e["queue_time_ms"])
                else:
                    a_times.append(e["time"])
        d.stop()
        d = None
        return {
            "mode": mode,
            "late_p50": pct(late, 50), "late_p99": pct(late, 99), "late_max": max(late),
            "a_rate": len(a_times) / max(t_end - t0, 1e-9),
            "inject_s": t_late - t0, "total_s": t_end - t0,
        }
    finally:
        if d is not None:
            d.stop()
        if sink is not None:
            sink.kill()
            sink.wait()
        if dns is not None:
            dns.stop()
        shutil.rmtree(os.path.join("/var/tmp", f"sluice-bench-fair-{os.getpid()}-{mode}"),
                      ignore_errors=True)
        wd.cleanup()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-test/engine/sluice")
    ap.add_argument("--backlog", type=int, default=200000)
    ap.add_argument("--late", type=int, default=100)
    ap.add_argument("--rate", type=int, default=0,
                    help="[domain] max_message_rate per second (0: none)")
    ap.add_argument("--modes", default="fair,one,site")
    ap.add_argument("--before", help="another sluice binary: the site mode on it first")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--late-after", type=int, default=0,
                    help="inject the late messages once this many of A's are delivered "
                    "(0: as soon as A's injection is done)")
    ap.add_argument("--conf", default="", help="config lines appended (\\n between lines)")
    ap.add_argument("--sink-delay", type=int, default=0,
                    help="seconds smtp-sink waits before answering each DATA (-w)")
    a = ap.parse_args()
    # SIGTERM (timeout, an operator) still stops what it started, by PID
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    test_delivery.SLUICE = a.sluice
    print(f"tenant A: {a.backlog} recipients to site.test, one per transaction; "
          f"then {a.late} late messages of one recipient; site rate "
          f"{f'{a.rate}/s' if a.rate else 'unlimited'}"
          f"{f'; the receiver answers each DATA after {a.sink_delay} s' if a.sink_delay else ''}"
          f"; {a.workers} worker(s){'; ' + a.conf if a.conf else ''}")
    print(f"{'mode':13} {'late p50 ms':>12} {'p99 ms':>8} {'max ms':>8} "
          f"{'A msg/s':>8} {'late at s':>11} {'run s':>7}")
    runs = []
    for mode in a.modes.split(","):
        if mode == "site" and a.before:
            runs.append((mode, a.before, "site (before)"))
        runs.append((mode, a.sluice, mode))
    for mode, binary, label in runs:
        r = one(a, mode, binary)
        print(f"{label:13} {r['late_p50']:12.0f} {r['late_p99']:8.0f} {r['late_max']:8.0f} "
              f"{r['a_rate']:8.0f} {r['inject_s']:11.1f} {r['total_s']:7.1f}", flush=True)
    print("fair: the late messages are tenant B's; one: they are tenant A's too "
          "(FIFO behind the backlog); site: tenant A's, to small.test, which shares "
          "site.test's MX. A msg/s: A's deliveries over the whole run.")


if __name__ == "__main__":
    main()
