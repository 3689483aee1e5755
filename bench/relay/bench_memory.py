#!/usr/bin/env python3
"""Memory over many destinations (issue 14): N messages (200,000 by
default) to N distinct recipient domains over --sites MX host names (one
site each; MX host k at 127.0.0.(1 + k mod --addrs), an smtp-sink on
each of those addresses), in
waves of --wave domains (each wave injected, then delivered, before the
next). The answers come from tests/support/dns_synth.py, which
synthesises them (dnsmasq with 200,000 records answered about 10 a
second). Prints sluice's RSS at start, after each wave, at its peak, and
after every domain has gone idle and destination_idle_ttl has passed,
beside the stats socket's live counts (destinations, sites and the other
live objects, DNS cache entries); the last, once the daemon has given
the heap's free pages back (event=memory_trimmed), split into heap and
stacks (RssAnon) and mapped files, the spool's pages (RssFile).

  bench/relay/bench_memory.py [--sluice build-rel/engine/sluice] [--domains 200000]
                              [--wave 20000] [--idle-ttl 5s]

Settings beyond the built-in defaults: workers = 2, the allow-list for
loopback, destination_idle_ttl (10m by default) shortened so that the run
does not wait ten minutes, and the DNS answers kept no longer than that
([dns] max_ttl = the same, min_ttl = 0; family = v4: the MX hosts have
no AAAA, and the bench need not ask). Never fails on a number.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "integ"))
sys.path.insert(0, here)
from harness import Sluice, Workdir, free_port, wait_until  # noqa: E402
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "support"))
from dns_synth import DnsSynth  # noqa: E402
from bench_sites import inject, sinks  # noqa: E402
from bench_concurrency import rss_kb  # noqa: E402


def stats(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"stats\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    return json.loads(buf)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-rel/engine/sluice")
    ap.add_argument("--domains", type=int, default=200000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--idle-ttl", default="5s")
    ap.add_argument("--sites", type=int, default=1000, help="MX host names (one site each)")
    ap.add_argument("--wave", type=int, default=20000, help="domains injected per wave")
    ap.add_argument("--addrs", type=int, default=100,
                    help="MX addresses (127.0.0.1 up), an smtp-sink on each")
    ap.add_argument("--wait", type=int, default=3600, help="seconds for the deliveries")
    ap.add_argument("--spool", default="/var/tmp")
    a = ap.parse_args()
    wd = Workdir("sluice-mem-")
    work = tempfile.mkdtemp(prefix="sluice-mem-", dir=a.spool)
    # d<i>.m.test has MX mx<i mod sites>.m.test, at 127.0.0.(1 + k mod addrs).
    # One address for all would hold the sites to its cap per address
    # (40), and a site's idle connection keeps its slot for idle_timeout.
    dns = DnsSynth(mx_hosts=a.sites, zone="m.test", mx_addrs=a.addrs, ttl=300)
    sink_port = free_port()
    snks = sinks(sink_port, a.addrs)
    port = free_port()
    sock = f"{wd.path}/stats.sock"
    conf = wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{port}
trusted_networks = 127.0.0.0/8
[queue]
path = {work}/spool
map_size = 8G
[delivery]
remote_port = {sink_port}
allow_networks = 127.0.0.0/8
destination_idle_ttl = {a.idle_ttl}
[dns]
servers = 127.0.0.1:{dns.port}
family = v4
min_ttl = 0
max_ttl = {a.idle_ttl}
[stats]
socket = {sock}
[bounce]
dsn = no
[log]
level = info
""")
    d = Sluice(a.sluice, conf)
    try:
        d.wait_log("event=ready")
        pid = d.proc.pid
        start = rss_kb(pid)
        peak = [start]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_kb(pid))
                stop.wait(0.2)
        threading.Thread(target=sample, daemon=True).start()
        print(f"memory: {a.domains} distinct domains over {a.sites} sites, 1 message each, "
              f"{a.addrs} MX addresses, in waves of {a.wave}, 2 workers, "
              f"destination_idle_ttl = {a.idle_ttl}, "
              f"{a.sluice}; load average {os.getloadavg()[0]:.1f}", flush=True)
        print(f"  RSS at start:                {start / 1024:8.1f} MB", flush=True)
        t0 = time.monotonic()
        errors = []
        t_inject = 0.0
        most = {"destinations": 0, "dns": 0}
        for w0 in range(0, a.domains, a.wave):
            rcpts = [f"u@d{i}.m.test" for i in range(w0, min(a.domains, w0 + a.wave))]
            t1 = time.monotonic()
            errors += inject(port, rcpts, a.sessions, 512)
            t_inject += time.monotonic() - t1
            want = min(a.domains, w0 + a.wave) - len(errors)
            wait_until(lambda: stats(sock)["counters"]["delivered"] >= want, a.wait,
                       "every delivery of the wave")
            st = stats(sock)
            most["destinations"] = max(most["destinations"], st["objects"]["destinations"])
            most["dns"] = max(most["dns"], st["dns"]["cache_entries"])
            print(f"  after {want:7d} domains:       {rss_kb(pid) / 1024:8.1f} MB "
                  f"(at {time.monotonic() - t0:5.0f} s; "
                  f"destinations {st['objects']['destinations']}, "
                  f"DNS cache entries {st['dns']['cache_entries']}, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
        t_done = time.monotonic() - t0
        busy = stats(sock)
        trims = d.count_log("event=memory_trimmed")
        wait_until(lambda: stats(sock)["objects"]["destinations"] == 0
                   and stats(sock)["dns"]["cache_entries"] == 0, 600, "eviction")
        # The sweep after the last eviction finds nothing more to free and
        # gives the heap's free pages back (engine/outbound/dest.c): within
        # two sweeps (5 s each), unless the eviction's own sweep did.
        try:
            d.wait_log_count("event=memory_trimmed", trims + 1, timeout=12)
        except AssertionError:
            pass
        time.sleep(1)  # a sample after the last frees
        stop.set()
        end = rss_kb(pid)
        o = stats(sock)
        objs = ", ".join(f"{k} {v}" for k, v in o["objects"].items())
        print(f"  injected in {t_inject:.0f} s, delivered in {t_done:.0f} s "
              f"({len(errors)} injection errors): {a.domains / t_done:.0f} msg/s")
        print(f"  RSS at peak:                 {peak[0] / 1024:8.1f} MB "
              f"(destinations at most {most['destinations']} between waves, "
              f"DNS cache entries at most {most['dns']}; at the end of delivery "
              f"{busy['objects']['destinations']} and {busy['dns']['cache_entries']})")
        print(f"  RSS after all went idle:     {end / 1024:8.1f} MB "
              f"({time.monotonic() - t0 - t_done:.0f} s after the last delivery: {objs}; "
              f"DNS cache entries {o['dns']['cache_entries']})")
        print(f"    of which heap and stacks:  {rss_kb(pid, 'RssAnon') / 1024:8.1f} MB, "
              f"mapped files (the spool): {rss_kb(pid, 'RssFile') / 1024:.1f} MB")
        if os.environ.get("BENCH_DUMP"):
            with open(os.environ["BENCH_DUMP"], "w") as f:
                f.write("\n".join(d.lines) + "\n")
        d.stop(60)
    except AssertionError:
        print("\n".join([x for x in d.lines if "m.test" in x][-5:]))
        raise
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        for p in snks:
            p.kill()
            p.wait()
        dns.stop()
        wd.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
