#!/usr/bin/env python3
"""Memory over many destinations (issue 14): N messages (200,000 by
default) to N distinct recipient domains over --sites MX host names (one
site each; dnsmasq serves the records, every MX host at 127.0.0.1),
delivered to one smtp-sink. Prints sluice's RSS
at start, at its peak, and after every domain has gone idle and
[delivery] destination_idle_ttl has passed, beside the stats socket's live
counts (destinations, sites, DNS cache entries).

  bench/relay/bench_memory.py [--sluice build-rel/engine/sluice] [--domains 200000]
                              [--idle-ttl 5s]

Settings beyond the built-in defaults: workers = 2, the allow-list for
loopback, and destination_idle_ttl (10m by default) shortened so that the
run does not wait ten minutes. Never fails on a number.
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
from harness import Daemon, Workdir, free_port, wait_until  # noqa: E402
from test_delivery import Dns  # noqa: E402
from bench_relay import sink as start_sink  # noqa: E402
from bench_sites import inject  # noqa: E402
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
    ap.add_argument("--wait", type=int, default=3600, help="seconds for the deliveries")
    ap.add_argument("--spool", default="/var/tmp")
    a = ap.parse_args()
    wd = Workdir("sluice-mem-")
    work = tempfile.mkdtemp(prefix="sluice-mem-", dir=a.spool)
    recs = [f"host-record=mx{k}.m.test,127.0.0.1" for k in range(a.sites)]
    recs += [f"mx-host=d{i}.m.test,mx{i % a.sites}.m.test,10" for i in range(a.domains)]
    dns = Dns(wd, recs)
    sink_port = free_port()
    snk = start_sink(sink_port, backlog=256)
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
[stats]
socket = {sock}
[bounce]
dsn = no
[log]
level = info
""")
    d = Daemon(a.sluice, conf)
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
        t0 = time.monotonic()
        rcpts = [f"u@d{i}.m.test" for i in range(a.domains)]
        errors = inject(port, rcpts, a.sessions, 512)
        t_inject = time.monotonic() - t0
        mid = stats(sock)
        wait_until(lambda: stats(sock)["counters"]["delivered"] >= a.domains - len(errors), a.wait,
                   "every delivery")
        t_done = time.monotonic() - t0
        busy = stats(sock)["objects"]
        wait_until(lambda: stats(sock)["objects"]["destinations"] == 0, 600, "eviction")
        time.sleep(1)  # a sample after the last frees
        stop.set()
        end = rss_kb(pid)
        o = stats(sock)
        print(f"memory: {a.domains} distinct domains over {a.sites} sites, 1 message each, "
              f"2 workers, destination_idle_ttl = {a.idle_ttl}, {a.sluice}")
        print(f"  injected in {t_inject:.0f} s, delivered in {t_done:.0f} s "
              f"({len(errors)} injection errors)")
        print(f"  RSS at start:                {start / 1024:8.1f} MB")
        print(f"  RSS at peak:                 {peak[0] / 1024:8.1f} MB "
              f"(destinations then {mid['objects']['destinations']}, "
              f"at the end of delivery {busy['destinations']})")
        print(f"  RSS after all went idle:     {end / 1024:8.1f} MB "
              f"(destinations {o['objects']['destinations']}, sites {o['objects'].get('sites')}, "
              f"DNS cache entries {o.get('dns', {}).get('cache_entries', '?')})")
        d.stop(60)
    except AssertionError:
        print("\n".join([x for x in d.lines if "m.test" in x][-5:]))
        raise
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        snk.kill()
        snk.wait()
        dns.stop()
        wd.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
