#!/usr/bin/env python3
"""Delivery through pools: the relay's delivery rate with 8 sources in 2
pools and 4 tenants beside the single-source rate, in the same run.

  chrt -f 80 bench/relay/bench_pools.py [--sluice build-rel/engine/sluice]
                                         [--messages 20000] [--domains 50] [--rounds 2]
                                         [--before OTHER-SLUICE]

Each round and each case (single source, then pools): Python clients
inject the messages (4 tenants, X-Sluice-Tenant from a trusted address;
one recipient each, spread over --domains domains that share one MX)
into a sluice with delivery off; sluice is stopped and started again
with delivery on, and the time from its start until it has logged every
delivery is the delivery rate (the spool's start-up walk hands every
recipient to the scheduler at once, so injection does not pace it).
Only [tenant] ... pool = differs between the cases: without it every
message leaves from the node's default source; with it, tenants t1 and
t2 use pool a (127.0.0.2..5), t3 and t4 pool b (127.0.0.6..9), equal
weights. smtp-sink (any source address) is the MX. Prints both rates,
the best of the rounds, and their ratio. With --before, another binary
(e.g. main's) runs both cases too, in each round right before this one:
before and after side by side in one run. Never fails on a number.
"""
import argparse
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from multiprocessing import Process

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "integ"))
sys.path.insert(0, here)
from harness import Daemon, Workdir, free_port, wait_until  # noqa: E402
from test_delivery import Dns  # noqa: E402
from bench_relay import proc_cpu_s, sink  # noqa: E402

TENANTS = ["t1", "t2", "t3", "t4"]


def conf(wd, port, spool, sink_port, dns_port, pools, delivery):
    tenants = "".join(
        f"[tenant {t}]\n" + (f"pool = {'a' if i < 2 else 'b'}\n" if pools else "")
        for i, t in enumerate(TENANTS))
    sources = "".join(f"[source 127.0.0.{i}]\nehlo = out{i}.example.net\n" for i in range(2, 10))
    return wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{port}
trusted_networks = 127.0.0.0/8
[queue]
path = {spool}
map_size = 8G
[delivery]
enabled = {"yes" if delivery else "no"}
remote_port = {sink_port}
allow_networks = 127.0.0.0/8
[domain *]
max_connections = 50
[dns]
servers = 127.0.0.1:{dns_port}
[bounce]
dsn = no
{sources}
[pool a]
sources = 127.0.0.2, 127.0.0.3, 127.0.0.4, 127.0.0.5
[pool b]
sources = 127.0.0.6, 127.0.0.7, 127.0.0.8, 127.0.0.9
{tenants}
""")


def inject_part(port, k, n, domains, size):
    line = "x" * 76 + "\r\n"
    body_pad = line * max(1, (size - 200) // len(line))
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as c:
        for i in range(n):
            t = TENANTS[(k + i) % len(TENANTS)]
            d = domains[(k * n + i) % len(domains)]
            msg = (f"From: bench@example.com\r\nSubject: m{k}-{i}\r\nX-Sluice-Tenant: {t}\r\n"
                   f"\r\n{body_pad}\r\n")
            c.sendmail("bench@example.com", [f"r{i}@{d}"], msg)


def run_case(a, sluice, pools):
    wd = Workdir("sluice-pools-bench-")
    work = tempfile.mkdtemp(prefix="sluice-pools-bench-", dir=a.spool)
    domains = [f"d{i}.test" for i in range(a.domains)]
    dns = Dns(wd, ["host-record=mx.test,127.0.0.1"] + [f"mx-host={d},mx.test,10" for d in domains])
    sink_port = free_port()
    s = sink(sink_port)
    port = free_port()
    d = None
    try:
        d = Daemon(sluice, conf(wd, port, f"{work}/spool", sink_port, dns.port, pools, False))
        d.wait_log("event=ready")
        per = a.messages // 4
        ps = [Process(target=inject_part, args=(port, k, per, domains, a.size)) for k in range(4)]
        for p in ps:
            p.start()
        for p in ps:
            p.join()
        d.stop()
        n = per * 4
        d = Daemon(sluice, conf(wd, port, f"{work}/spool", sink_port, dns.port, pools, True))
        t0 = time.monotonic()
        deadline = t0 + 600
        got = 0
        while time.monotonic() < deadline:
            with d.cv:
                got = sum(1 for ln in d.lines if "event=delivered" in ln)
            if got >= n:
                break
            time.sleep(0.02)
        took = time.monotonic() - t0
        cpu = proc_cpu_s(d.proc.pid)
        with d.cv:
            conns = sum(1 for ln in d.lines if "event=connected" in ln)
            srcs = len({ln.split("source=")[1].split()[0] for ln in d.lines
                        if "event=connected" in ln and "source=" in ln})
        d.stop()
        d = None
        return n / took, got, n, cpu, conns, srcs
    finally:
        if d is not None and d.proc.poll() is None:
            d.proc.kill()
        s.kill()
        s.wait()
        dns.stop()
        wd.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-rel/engine/sluice")
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--domains", type=int, default=50)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--spool", default="/var/tmp")
    ap.add_argument("--before", default="",
                    help="another sluice binary (e.g. main's) run on both cases just before "
                         "this one in each round")
    a = ap.parse_args()
    binaries = [("", a.sluice)] if not a.before else [("before", a.before), ("after", a.sluice)]
    res = {(b, p): [] for b, _ in binaries for p in (False, True)}
    for _ in range(a.rounds):
        for b, path in binaries:
            for pools in (False, True):  # alternating, side by side
                res[(b, pools)].append(run_case(a, path, pools))
    print(f"delivery from the spool: {a.messages} messages of {a.size} B, 1 recipient each, "
          f"{a.domains} domains on one MX, 4 tenants, best of {a.rounds} alternating rounds")
    for b, path in binaries:
        if b:
            print(f"{b}: {path}")
        for pools in (False, True):
            rate, got, n, cpu, conns, srcs = max(res[(b, pools)])
            label = "8 sources in 2 pools" if pools else "single source       "
            print(f"  {label}: {rate:8.0f} msg/s  (delivered {got} of {n}, {conns} connections "
                  f"from {srcs or 1} source address(es), sluice CPU {1e6 * cpu / n:.0f} us/msg)")
        best_single = max(r[0] for r in res[(b, False)])
        best_pools = max(r[0] for r in res[(b, True)])
        print(f"  pools / single source: {100 * best_pools / best_single:.0f}% "
              f"(target: at least 90%)")
        print(f"  all rounds, msg/s: single {[round(r[0]) for r in res[(b, False)]]}, "
              f"pools {[round(r[0]) for r in res[(b, True)]]}")

if __name__ == "__main__":
    main()
