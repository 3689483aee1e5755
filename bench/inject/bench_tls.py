#!/usr/bin/env python3
"""Submission over STARTTLS: throughput of large messages and memory per
TLS session, each beside the same figure without TLS on the same sluice
(the ceiling TLS is measured against).

  bench/inject/bench_tls.py [--sluice build-test/engine/sluice] [--messages 400]
                            [--size 204800] [--clients 4] [--idle 400] [--spool DIR]

Throughput: --clients processes, one connection each, send --messages
messages of --size octets in all (MAIL, RCPT and DATA pipelined, the
content in one write), over STARTTLS, then in plaintext. Memory: --idle
sessions opened and held after EHLO (over TLS after the handshake, and in
plaintext); sluice's RSS before and after, divided by the count. Python's
clients share the machine with sluice: on a small machine they are part
of what is measured. Never fails on a number.
"""
import argparse
import multiprocessing
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "integ"))
from harness import Daemon, free_port  # noqa: E402


def client_ctx():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def read_reply(f):
    while True:
        line = f.readline()
        if not line:
            raise EOFError("closed")
        if line[3:4] != b"-":
            return line


def open_session(port, tls):
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    f = s.makefile("rb")
    read_reply(f)
    s.sendall(b"EHLO bench\r\n")
    read_reply(f)
    if tls:
        s.sendall(b"STARTTLS\r\n")
        read_reply(f)
        s = client_ctx().wrap_socket(s, server_hostname="localhost")
        f = s.makefile("rb")
        s.sendall(b"EHLO bench\r\n")
        read_reply(f)
    return s, f


def sender(args):
    port, tls, count, size = args
    body = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * (size // 78) + b".\r\n"
    s, f = open_session(port, tls)
    for _ in range(count):
        s.sendall(b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n")
        for _ in range(3):
            read_reply(f)
        s.sendall(body)
        line = read_reply(f)
        assert line.startswith(b"250"), line
    s.sendall(b"QUIT\r\n")
    s.close()
    return count


def throughput(port, tls, messages, size, clients):
    per = [messages // clients + (1 if i < messages % clients else 0) for i in range(clients)]
    t0 = time.monotonic()
    with multiprocessing.Pool(clients) as pool:
        done = sum(pool.map(sender, [(port, tls, n, size) for n in per]))
    took = time.monotonic() - t0
    return done / took, done * size / took / 1e6


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def memory(d, port, tls, n):
    before = rss_kb(d.proc.pid)
    held = [open_session(port, tls) for _ in range(n)]
    after = rss_kb(d.proc.pid)
    for s, _ in held:
        s.close()
    return (after - before) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-test/engine/sluice")
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--size", type=int, default=200 * 1024)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--idle", type=int, default=400)
    ap.add_argument("--spool", default=None)
    a = ap.parse_args()
    base = a.spool or tempfile.mkdtemp(prefix="sluice-bench-tls-", dir="/var/tmp")
    os.makedirs(base, exist_ok=True)
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=localhost", "-keyout", f"{base}/key.pem",
                        "-out", f"{base}/cert.pem"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    port = free_port()
    conf = os.path.join(base, "sluice.conf")
    with open(conf, "w") as f:
        f.write(f"""
[server]
listen = 127.0.0.1:{port}
trusted_networks = 127.0.0.0/8
max_clients_per_ip = 100000
[queue]
path = {base}/spool
map_size = 8G
[delivery]
enabled = no
[log]
level = notice
[tls]
cert_file = {base}/cert.pem
key_file = {base}/key.pem
""")
    d = Daemon(a.sluice, conf)
    try:
        d.wait_log("event=ready")
        print(f"sluice {a.sluice}, {os.cpu_count()} cores, {a.clients} client processes, "
              f"{a.messages} messages of {a.size} octets")
        for tls in (True, False):
            mps, mbs = throughput(port, tls, a.messages, a.size, a.clients)
            print(f"  {'STARTTLS ' if tls else 'plaintext'}: {mps:8.1f} messages/s "
                  f"{mbs:7.1f} MB/s{'' if tls else '   (ceiling: the same without TLS)'}")
        for tls in (True, False):
            per = memory(d, port, tls, a.idle)
            print(f"  memory per idle session after EHLO, {'TLS      ' if tls else 'plaintext'}: "
                  f"{per:6.1f} KB ({a.idle} sessions, RSS delta)")
    finally:
        d.stop()
        if a.spool is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
