#!/usr/bin/env python3
"""Injection benchmark: smtp-source into sluice (durable spool) beside
smtp-source into smtp-sink (no storage), in one run on this machine.

  bench/inject/bench_inject.py [--sluice build-rel/engine/sluice] [--messages 20000]
                               [--sessions 50] [--size 2048] [--spool DIR]

Prints messages/s for both and sluice's acknowledgement latency (end of
DATA to the 250), measured by a probe client that sends one message at a
time while the load runs. Never fails on a number. The spool goes under
/var/tmp by default: fsync must reach a real disk, not tmpfs.
"""
import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "integ"))
from harness import Daemon, free_port, wait_until  # noqa: E402


def connectable(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def run_source(port, messages, sessions, size):
    t0 = time.monotonic()
    r = subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
                        "-f", "bench@example.com", "-t", "rcpt@example.org",
                        f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=1800)
    took = time.monotonic() - t0
    if r.returncode != 0:
        print(f"smtp-source failed: {r.stderr.strip()}")
    return took


class Probe(threading.Thread):
    """One connection, one message at a time: end of DATA -> 250 latency."""

    def __init__(self, port, size):
        super().__init__(daemon=True)
        self.port, self.size = port, size
        self.lat = []
        self.stop = threading.Event()

    def run(self):
        body = ("Subject: probe\r\n\r\n" + ("x" * 76 + "\r\n") * (self.size // 78)).encode()
        s = socket.create_connection(("127.0.0.1", self.port))
        # Without it Nagle holds ".\r\n" for the server's delayed ACK.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")

        def reply():
            while True:
                line = f.readline()
                if not line or line[3:4] != b"-":
                    return line

        reply()
        s.sendall(b"EHLO probe\r\n")
        reply()
        while not self.stop.is_set():
            s.sendall(b"MAIL FROM:<probe@example.com>\r\nRCPT TO:<p@example.org>\r\nDATA\r\n")
            reply(), reply(), reply()
            s.sendall(body)
            t0 = time.monotonic()
            s.sendall(b".\r\n")
            r = reply()
            if not r.startswith(b"250"):
                break
            self.lat.append(time.monotonic() - t0)
        s.close()


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))] if v else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-rel/engine/sluice")
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--spool", default="/var/tmp")
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: tools/install-deps --test")

    # Ceiling: smtp-source into smtp-sink.
    sink_port = free_port()
    # smtp-sink refuses to run as root without -u; nobody is harmless here.
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(["smtp-sink", *user, "-c", f"127.0.0.1:{sink_port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: connectable(sink_port), 10, "smtp-sink")
        t_sink = run_source(sink_port, a.messages, a.sessions, a.size)
    finally:
        sink.kill()
        sink.wait()

    work = tempfile.mkdtemp(prefix="sluice-bench-", dir=a.spool)
    port = free_port()
    conf = os.path.join(work, "sluice.conf")
    with open(conf, "w") as f:
        f.write(f"[server]\nworkers = {a.workers}\nlisten = 127.0.0.1:{port}\n"
                f"trusted_networks = 127.0.0.0/8\n[queue]\npath = {work}/spool\n"
                f"map_size = 8G\n[delivery]\nenabled = no\n[log]\nlevel = notice\n")
    fs = subprocess.run(["stat", "-f", "-c", "%T", work], capture_output=True, text=True).stdout
    d = Daemon(a.sluice, conf)
    try:
        d.wait_log("event=ready")
        probe = Probe(port, a.size)
        probe.start()
        t_sluice = run_source(port, a.messages, a.sessions, a.size)
        probe.stop.set()
        probe.join(10)
        d.stop()
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    rate_sink = a.messages / t_sink
    rate_sluice = a.messages / t_sluice
    print(f"injection: {a.messages} messages of {a.size} B, 1 recipient, {a.sessions} sessions "
          f"(smtp-source), spool on {fs.strip()} under {a.spool}")
    print(f"  smtp-source -> smtp-sink (ceiling): {rate_sink:10.0f} msg/s")
    print(f"  smtp-source -> sluice (durable):    {rate_sluice:10.0f} msg/s "
          f"({100 * rate_sluice / rate_sink:.0f}% of the ceiling)")
    lat = probe.lat
    if lat:
        print(f"  ack latency under load ({len(lat)} probes): p50 {1000 * pct(lat, .5):.2f} ms  "
              f"p99 {1000 * pct(lat, .99):.2f} ms  max {1000 * max(lat):.2f} ms")


if __name__ == "__main__":
    main()
