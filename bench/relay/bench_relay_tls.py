#!/usr/bin/env python3
"""Relay with STARTTLS to the receiver (issue 14): messages/s end to end
(Python injector -> sluice -> receiving MX) with STARTTLS on the outbound
leg, beside the same with the receiver offering no STARTTLS, in the same
run (alternating, --rounds times each); then memory per outbound
connection held open idle, TLS and plaintext.

The receiver is a second sluice (the same binary, [delivery] enabled = no,
one worker, its spool on tmpfs: the receiver's fsync is not what is
measured), once with a certificate (it offers STARTTLS; RSA-2048,
self-signed) and once without. smtp-sink has no TLS; Postfix's smtpd
would need a whole Postfix instance and queues every message through
cleanup and qmgr, a slower receiver than the relay measured; sluice's own
server is C on the same TLS code, and sluice already serves as the TLS
receiver of the integration tests (test_delivery.tls_receiver). The
relay's outbound TLS policy is the default (optional: STARTTLS when
offered, the certificate not verified).

Rate: --messages one-recipient messages of --size octets to one domain,
--sessions injecting sessions; the time runs from the first injection to
the relay's last event=delivered.

Memory: --idle domains, each with an MX host name of its own (a site
each, so a connection each; the cap per address lifted), one message
each, [delivery] idle_timeout = 5m so that every connection stays open
after its delivery. RSS of the relay before and once every delivery is
done and the connections sit idle, divided by the outbound connections
open (stats socket). The plaintext figure includes what each domain
costs besides its connection (destination, site, DNS answer); the
difference between the two is what TLS adds per connection.

  bench/relay/bench_relay_tls.py [--sluice build-rel/engine/sluice] [--messages 10000]
                                 [--idle 2000] [--rounds 2] [--relay-conf TEXT]

Never fails on a number.
"""
import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "integ"))
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "support"))
sys.path.insert(0, here)
from harness import Daemon, Workdir, free_port, wait_until  # noqa: E402
from dns_synth import DnsSynth  # noqa: E402
from bench_sites import inject, cpu_s  # noqa: E402
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


def receiver(a, wd, tls):
    """A sluice that takes mail and delivers none, with or without TLS."""
    name = "mx-tls" if tls else "mx-plain"
    spool = tempfile.mkdtemp(prefix=f"sluice-{name}-",
                             dir="/dev/shm" if os.path.isdir("/dev/shm") else a.spool)
    port = free_port()
    tls_conf = ""
    if tls:
        p = wd.path
        r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                            "2", "-subj", "/CN=mx.test", "-keyout", f"{p}/mx-key.pem", "-out",
                            f"{p}/mx-cert.pem"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        tls_conf = f"[tls]\ncert_file = {p}/mx-cert.pem\nkey_file = {p}/mx-key.pem\n"
    conf = wd.file(f"{name}.conf", f"""
[server]
workers = 1
listen = 127.0.0.1:{port}
trusted_networks = 127.0.0.0/8
max_clients = 100000
max_clients_per_ip = 100000
[queue]
path = {spool}/spool
map_size = 4G
[delivery]
enabled = no
[log]
level = warn
{tls_conf}
""")
    d = Daemon(a.sluice, conf)
    wait_until(lambda: _connectable(port), 20, f"{name} to listen")
    return d, port, spool


def _connectable(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def relay(a, wd, work, mx_port, dns_port, extra=""):
    port = free_port()
    sock = f"{wd.path}/relay-{port}.sock"
    extra_conf = a.relay_conf.replace("\\n", "\n")
    conf = wd.file(f"relay-{port}.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{port}
trusted_networks = 127.0.0.0/8
[queue]
path = {work}/spool-{port}
map_size = 8G
[delivery]
remote_port = {mx_port}
allow_networks = 127.0.0.0/8
{extra}
[dns]
servers = 127.0.0.1:{dns_port}
family = v4
[stats]
socket = {sock}
[bounce]
dsn = no
[log]
level = info
{extra_conf}
""")
    d = Daemon(a.sluice, conf)
    d.wait_log("event=ready")
    return d, port, sock


def count(d, needle, seen):
    with d.cv:
        new = d.lines[seen[0]:]
        seen[0] = len(d.lines)
    return sum(1 for ln in new if needle in ln)


def rate_run(a, wd, work, mx_port, dns_port):
    """Messages/s end to end, and the relay's CPU per message."""
    d, port, sock = relay(a, wd, work, mx_port, dns_port)
    try:
        rcpts = [f"r{k}@d0.test" for k in range(a.messages)]
        t0 = time.monotonic()
        errors = inject(port, rcpts, a.sessions, a.size)
        want = a.messages - len(errors)
        seen, delivered, t_last = [0], 0, t0
        deadline = time.monotonic() + a.timeout
        while delivered < want and time.monotonic() < deadline:
            n = count(d, "event=delivered", seen)
            if n:
                delivered += n
                t_last = time.monotonic()
            time.sleep(0.05)
        with d.cv:
            tls_lines = sum(1 for ln in d.lines if "event=delivered" in ln and 'tls="TLS' in ln)
        cpu = cpu_s(d.proc.pid)
        d.stop(60)
        return dict(rate=delivered / max(1e-9, t_last - t0), delivered=delivered,
                    tls=tls_lines, cpu_us=1e6 * cpu / max(1, delivered), errors=len(errors))
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def idle_run(a, wd, work, mx_port, dns_port):
    """RSS per idle outbound connection."""
    d, port, sock = relay(a, wd, work, mx_port, dns_port,
                          "idle_timeout = 5m\nmax_connections_per_address = 0\n")
    try:
        base = rss_kb(d.proc.pid)
        rcpts = [f"r@d{1 + k}.test" for k in range(a.idle)]
        errors = inject(port, rcpts, a.sessions, a.size)
        want = a.idle - len(errors)
        wait_until(lambda: stats(sock)["counters"]["delivered"] >= want, a.timeout,
                   "every delivery")
        time.sleep(1)  # the last replies read, the buffers handed back
        st = stats(sock)
        conns = st["connections"]["outbound_open"]
        rss = rss_kb(d.proc.pid)
        d.stop(120)
        return dict(conns=conns, base=base, rss=rss,
                    per=(rss - base) / max(1, conns), errors=len(errors))
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-rel/engine/sluice")
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--idle", type=int, default=2000, help="idle connections held, 0: none")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--spool", default="/var/tmp")
    ap.add_argument("--relay-conf", default="", help="config lines appended to the relay's "
                    "(\\n between lines), e.g. '[tls]\\nsession_cache_size = 0'")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * a.idle + 2000), hard))
    wd = Workdir("sluice-rtls-")
    work = tempfile.mkdtemp(prefix="sluice-rtls-", dir=a.spool)
    # d0.test for the rate; d<k>.test, k >= 1, a site each for the memory.
    dns = DnsSynth(mx_hosts=a.idle + 1, zone="test", mx_addr="127.0.0.1")
    rx = []
    try:
        rx.append(receiver(a, wd, True))
        rx.append(receiver(a, wd, False))
        ports = {"TLS": rx[0][1], "plain": rx[1][1]}
        print(f"relay over STARTTLS: {a.messages} messages of {a.size} B to one domain, "
              f"{a.sessions} injecting sessions, {a.sluice}; receiver: sluice, 1 worker, "
              f"RSA-2048 certificate; load average {os.getloadavg()[0]:.1f}", flush=True)
        best = {}
        for rnd in range(a.rounds):
            for what in ("plain", "TLS"):
                r = rate_run(a, wd, work, ports[what], dns.port)
                best[what] = max(best.get(what, 0), r["rate"])
                print(f"  e2e [{what:>5}]: {r['rate']:7.0f} msg/s  ({r['delivered']} delivered, "
                      f"{r['tls']} over TLS; relay CPU {r['cpu_us']:.0f} us/msg; "
                      f"load {os.getloadavg()[0]:.1f})"
                      + (f"  {r['errors']} injection errors" if r["errors"] else ""), flush=True)
        print(f"  best of {a.rounds}: TLS {best['TLS']:.0f} msg/s, plaintext {best['plain']:.0f} "
              f"msg/s: TLS at {100 * best['TLS'] / max(1, best['plain']):.0f}% of plaintext",
              flush=True)
        if a.idle:
            per = {}
            for what in ("plain", "TLS"):
                r = idle_run(a, wd, work, ports[what], dns.port)
                per[what] = r["per"]
                print(f"  idle outbound connections [{what:>5}]: {r['conns']} open, RSS "
                      f"{r['base'] / 1024:.1f} MB before, {r['rss'] / 1024:.1f} MB with them: "
                      f"{r['per']:.1f} kB per connection (and its domain); "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
            print(f"  TLS adds {per['TLS'] - per['plain']:.1f} kB per outbound connection")
    finally:
        for d, _, spool in rx:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
            shutil.rmtree(spool, ignore_errors=True)
        dns.stop()
        wd.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
