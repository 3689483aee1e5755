#!/usr/bin/env python3
"""Injection rate with the suppression list empty and with ENTRIES entries,
in the same run: two sluice daemons side by side (delivery off, spools of
their own), one with an empty list and one whose list was filled by
`sluicectl suppress import` of a generated CSV (the import rate is printed
too). smtp-source runs against each in turn, ROUNDS times, alternating, so
that the machine's noise falls on both alike; every RCPT is a miss (the
address and its domain are looked up), as most recipients are, and each
recipient is another address (smtp-source -N) that sorts beside a stored
entry, so that the lookups spread over the whole list.

  bench/suppress/bench_inject_suppress.py [--sluice build-rel/engine/sluice]
      [--sluicectl build-rel/tools/sluicectl] [--entries 10000000]
      [--messages 20000] [--sessions 50] [--size 2048] [--rounds 3] [--dir /var/tmp]

Prints figures; never fails on a number. The spools and the lists go under
--dir (a real disk: fsync must mean something).
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
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
                        "-N", "-f", "bench@example.com", "-t", "rcpt@example.org",
                        f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=3600)
    took = time.monotonic() - t0
    if r.returncode != 0:
        print(f"smtp-source failed: {r.stderr.strip()}")
    return messages / took


def start(sluice, work, name):
    port = free_port()
    d = os.path.join(work, name)
    os.makedirs(d)
    conf = os.path.join(d, "sluice.conf")
    with open(conf, "w") as f:
        f.write(f"[server]\nworkers = 0\nlisten = 127.0.0.1:{port}\n"
                f"trusted_networks = 127.0.0.0/8\n[queue]\npath = {d}/spool\nmap_size = 16G\n"
                f"[delivery]\nenabled = no\n[log]\nlevel = notice\n"
                f"[stats]\nsocket = {d}/stats.sock\n[suppress]\nmap_size = 8G\n")
    dm = Daemon(sluice, conf)
    dm.wait_log("event=ready")
    wait_until(lambda: connectable(port), 10, name)
    return dm, port, f"{d}/stats.sock"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-rel/engine/sluice")
    ap.add_argument("--sluicectl", default=None)
    ap.add_argument("--entries", type=int, default=10_000_000)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    ctlbin = a.sluicectl or os.path.join(os.path.dirname(os.path.abspath(a.sluice)), "..",
                                         "tools", "sluicectl")
    if shutil.which("smtp-source") is None:
        sys.exit("smtp-source not found: tools/install-deps --test")
    work = tempfile.mkdtemp(prefix="sluice-bench-suppress-", dir=a.dir)
    daemons = []
    try:
        csv = os.path.join(work, "list.csv")
        with open(csv, "w") as f:
            f.write("address,scope,reason,added,expires,note\n")
            for i in range(a.entries):
                # smtp-source -N sends to 1rcpt@example.org, 2rcpt@...: each
                # sorts beside one of these, so every RCPT's lookup walks to
                # its own leaf of the tree, as real misses do
                f.write(f"{i}rcpt@example.net,global,hard_bounce,1767225600,,\n")
        empty = start(a.sluice, work, "empty")
        daemons.append(empty[0])
        full = start(a.sluice, work, "full")
        daemons.append(full[0])
        t0 = time.monotonic()
        r = subprocess.run([ctlbin, "-s", full[2], "--json", "suppress", "import", csv],
                           capture_output=True, text=True, timeout=7200)
        took = time.monotonic() - t0
        doc = json.loads(r.stdout) if r.stdout else {}
        if not doc.get("ok"):
            sys.exit(f"import failed: {r.stdout} {r.stderr}")
        size = os.path.getsize(csv)
        print(f"import (sluicectl suppress import, {size / 1e6:.0f} MB CSV): "
              f"{doc['imported']} entries in {doc['ms'] / 1000:.2f} s inside sluice "
              f"({doc['imported'] / (doc['ms'] / 1000):.0f} entries/s), "
              f"{took:.2f} s end to end")
        st = json.loads(subprocess.run([ctlbin, "-s", full[2], "--json", "stats"],
                                       capture_output=True, text=True).stdout)["suppress"]
        print(f"list: {st['entries']} entries, {st['map_used'] / 1e6:.0f} MB")
        rates = {"empty": [], "full": []}
        for _ in range(a.rounds):
            for name, (_, port, _) in (("empty", empty), ("full", full)):
                rates[name].append(run_source(port, a.messages, a.sessions, a.size))
        e, f = statistics.median(rates["empty"]), statistics.median(rates["full"])
        print(f"injection: {a.messages} messages of {a.size} B, 1 recipient (a miss), "
              f"{a.sessions} sessions (smtp-source), {a.rounds} rounds alternating, median:")
        print(f"  list empty:                {e:10.0f} msg/s   "
              f"(rounds: {', '.join(f'{x:.0f}' for x in rates['empty'])})")
        print(f"  list of {a.entries:>10} entries: {f:10.0f} msg/s   "
              f"(rounds: {', '.join(f'{x:.0f}' for x in rates['full'])})  "
              f"{100 * f / e:.0f}% of the empty-list rate")
    finally:
        for dm in daemons:
            dm.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
