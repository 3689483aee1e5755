#!/usr/bin/env python3
"""AUTH guessing benchmark: how many passwords one client address can try
per minute against sluice, and what the guessing costs everyone else.

  bench/auth/bench_auth_guess.py [--sluice build-rel/engine/sluice] [--seconds 60]
                                 [--connections 100] [--workers 2] [--setting '$y$j9T$']

One users file with one user (a yescrypt hash at libxcrypt's default cost
unless --setting says otherwise); sluice at its defaults otherwise. From
127.0.0.1, --connections clients send AUTH PLAIN with wrong passwords as
fast as sluice answers, reconnecting whenever they are closed. Counted: the
535 replies (guesses answered), the 421/454 refusals, and meanwhile the
NOOP latency of one more client that never authenticates (on a worker
shared with the guessers). Prints guesses per minute beside the ceiling
the config allows: [server] auth_failures_per_address at once, then that
many per auth_failure_window. Never fails on a number.
"""
import argparse
import base64
import ctypes
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "integ"))
from harness import Sluice, Workdir, free_port  # noqa: E402


def crypt(password, setting):
    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    salt = base64.b64encode(os.urandom(12), b"./").decode()
    return lib.crypt(password.encode(), (setting + salt).encode()).decode()


def reference_keys(binary):
    r = subprocess.run([binary, "--config-reference"], capture_output=True, text=True)
    return r.stdout


class Counts:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = {}

    def add(self, k):
        with self.lock:
            self.c[k] = self.c.get(k, 0) + 1


def read_reply(f):
    while True:
        line = f.readline()
        if not line:
            raise EOFError
        if line[3:4] != b"-":
            return int(line[:3])


def guesser(port, until, counts, idx):
    auth = ("AUTH PLAIN " + base64.b64encode(f"\0alice\0guess-{idx}".encode()).decode()
            + "\r\n").encode()
    while time.monotonic() < until:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            f = s.makefile("rb")
            read_reply(f)
            s.sendall(b"EHLO guesser\r\n")
            read_reply(f)
            while time.monotonic() < until:
                s.sendall(auth)
                code = read_reply(f)
                counts.add(code)
                if code == 421:
                    break
            s.close()
        except (OSError, EOFError):
            counts.add("closed")


def prober(port, until, lat):
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    f = s.makefile("rb")
    read_reply(f)
    s.sendall(b"EHLO probe\r\n")
    read_reply(f)
    while time.monotonic() < until:
        t0 = time.monotonic()
        s.sendall(b"NOOP\r\n")
        read_reply(f)
        lat.append(time.monotonic() - t0)
        time.sleep(0.05)
    s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-test/engine/sluice")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--setting", default="$y$j9T$")
    a = ap.parse_args()
    wd = Workdir("sluice-bench-auth-")
    port = free_port()
    t0 = time.monotonic()
    h = crypt("the-right-one", a.setting)
    one_hash = time.monotonic() - t0
    users = wd.file("users", f"alice:{h}\n")
    conf = wd.file("sluice.conf", f"""
[server]
workers = {a.workers}
listen = 127.0.0.1:{port}
auth_users_file = {users}
plaintext_auth = loopback
[queue]
path = {wd.path}/spool
map_size = 64M
[delivery]
enabled = no
[log]
level = warn
""")
    ref = reference_keys(a.sluice)
    limited = "auth_failures_per_address" in ref
    d = Sluice(a.sluice, conf)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        counts = Counts()
        lat = []
        until = time.monotonic() + a.seconds
        threads = [threading.Thread(target=guesser, args=(port, until, counts, i), daemon=True)
                   for i in range(a.connections)]
        threads.append(threading.Thread(target=prober, args=(port, until, lat), daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(a.seconds + 120)
        c = counts.c
        guesses = c.get(535, 0)
        per_min = guesses / a.seconds * 60
        print(f"sluice {a.sluice}; {a.workers} workers; hash {h[:7]}... "
              f"({one_hash * 1000:.0f} ms in this process); {a.connections} connections from "
              f"one address for {a.seconds:.0f} s")
        print(f"  guesses answered (535): {guesses}  = {per_min:.0f} per minute")
        print(f"  refused: 421 {c.get(421, 0)}, 454 {c.get(454, 0)}; connections closed "
              f"{c.get('closed', 0)}")
        if limited:
            print(f"  ceiling from the config (defaults: 10 per address per 10 min): 10 at once, "
                  f"then 1 per minute = {10 + max(0.0, a.seconds / 60 - 0):.0f} in "
                  f"{a.seconds:.0f} s")
        else:
            print("  ceiling from the config: none across connections (auth_max_failures per "
                  "session, max_clients_per_ip sessions at once)")
        if lat:
            q = statistics.quantiles(lat, n=100)
            print(f"  NOOP of another client meanwhile: p50 {q[49] * 1000:.1f} ms, "
                  f"p99 {q[98] * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms ({len(lat)} probes)")
    finally:
        d.stop()
        wd.cleanup()


if __name__ == "__main__":
    main()
