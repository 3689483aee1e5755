#!/usr/bin/env python3
"""Concurrency benchmark: smtp-sink waits --hold seconds (1 by default)
before answering DATA (-w), sluice delivers one message to each of N
destination domains (5,000 by default), each with an MX host name of its
own (a site each), so every delivery holds a connection that long. All MX
hosts are one smtp-sink: [delivery] max_connections_per_address is set to
0 (no cap) for the count. tests/support/dns_synth.py answers for the
domains (d<i>.test MX mx<i>.test, A 127.0.0.1). Prints the most
concurrent outbound connections seen, messages/s, and sluice's memory per
connection (RSS growth / connections). Never fails on a number.

For 10,000 connections at once the hold must outlast the injection (at a
few hundred messages a second here): --domains 10000 --hold 40.

  bench/relay/bench_concurrency.py [--sluice build-rel/engine/sluice] [--domains 5000]
                                   [--hold 1] [--before OLD_BINARY] [--rounds N]

With --before, each round runs OLD_BINARY then --sluice, one after the
other, for a before/after in one run. RSS is also split into anonymous
memory (the heap: what the connections cost) and file-backed pages (the
LMDB spool's map, read at delivery: page cache, shared).
"""
import argparse
import socket
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "integ"))
from harness import Daemon, Workdir, free_port  # noqa: E402
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "support"))
from dns_synth import DnsSynth  # noqa: E402

sys.path.insert(0, here)
from bench_relay import relay_conf, sink as start_sink  # noqa: E402


def rss_kb(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def file_rss(pid):
    """kB of RSS per mapped file (smaps), largest first."""
    out, cur = {}, None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                cur = parts[5] if len(parts) > 5 and parts[5].startswith("/") else None
            elif parts[0] == "Rss:" and cur:
                out[cur] = out.get(cur, 0) + int(parts[1])
    return sorted(out.items(), key=lambda kv: -kv[1])


def sockets(pid):
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-rel/engine/sluice")
    ap.add_argument("--domains", type=int, default=5000)
    ap.add_argument("--spool", default="/var/tmp")
    ap.add_argument("--hold", type=int, default=1, help="seconds smtp-sink waits before its "
                    "reply to DATA (-w)")
    ap.add_argument("--before", help="another sluice binary run first, side by side")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds with --before")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 4 * a.domains + 1000)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    for i in range(a.rounds):
        for b in ([a.before] if a.before else []) + [a.sluice]:
            run(a, b, "before" if b == a.before and b != a.sluice else "after" if a.before else "")


def run(a, binary, tag):
    wd = Workdir("sluice-conc-")
    work = tempfile.mkdtemp(prefix="sluice-conc-", dir=a.spool)
    domains = [f"d{i}.test" for i in range(a.domains)]
    # Each domain has an MX host of its own (a site each): one MX host
    # shared by all would be held to its cap per address, which is the
    # point of sites. Every MX host is this one smtp-sink, so the cap per
    # address is lifted (max_connections_per_address = 0) for the count.
    dns = DnsSynth(mx_hosts=a.domains, zone="test", mx_addr="127.0.0.1")
    sink_port = free_port()
    sink = start_sink(sink_port, "-w", str(a.hold), "-m", str(2 * a.domains), backlog=4096)
    port = free_port()
    conf = relay_conf(wd, port, f"{work}/spool", sink_port, dns.port,
                      "[log]\nlevel = info\n[delivery]\nmax_connections_per_address = 0\n")
    d = Daemon(binary, conf)
    peak = [0, 0, 0, 0]  # sockets, VmRSS, RssAnon, RssFile at the most sockets
    held = [0, 0, 0, 0]  # the same, the last sample with that many (the end of the hold)
    files = []           # the files mapped with the most RSS then
    stop = threading.Event()
    try:
        d.wait_log("event=ready")
        base = [rss_kb(d.proc.pid), rss_kb(d.proc.pid, "RssAnon"), rss_kb(d.proc.pid, "RssFile")]

        def sample():
            while not stop.wait(0.05):
                try:
                    n, r = sockets(d.proc.pid), rss_kb(d.proc.pid)
                    an, fi = rss_kb(d.proc.pid, "RssAnon"), rss_kb(d.proc.pid, "RssFile")
                except OSError:
                    return
                if n >= peak[0]:
                    held[:] = [n, r, an, fi]
                if n > peak[0]:
                    peak[:] = [n, r, an, fi]
                    try:
                        files[:] = file_rss(d.proc.pid)[:2]
                    except OSError:
                        pass

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        # Parallel sessions, so that injection (each message waits for its
        # durable commit) outruns the 1 s the sink holds every delivery.
        sessions = 20
        failed = []

        def inject(part):
            s = socket.create_connection(("127.0.0.1", port))
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO bench\r\n")
            while f.readline()[3:4] == b"-":
                pass
            for dom in part:
                s.sendall(b"MAIL FROM:<b@example.com>\r\nRCPT TO:<r@%s>\r\nDATA\r\n" % dom.encode())
                f.readline(), f.readline(), f.readline()
                s.sendall(b"Subject: c\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26 + b".\r\n")
                if not f.readline().startswith(b"250"):
                    failed.append(dom)
                    break
            s.close()

        t0 = time.monotonic()
        inj = [threading.Thread(target=inject, args=(domains[i::sessions],))
               for i in range(sessions)]
        for th in inj:
            th.start()
        for th in inj:
            th.join()
        injected = time.monotonic() - t0
        if failed:
            raise SystemExit("sluice refused a message")
        deadline = time.monotonic() + float(os.environ.get("BENCH_WAIT", "300"))
        while time.monotonic() < deadline:
            with d.cv:
                done = sum(1 for ln in d.lines if "event=delivered" in ln)
            if done >= a.domains:
                break
            time.sleep(0.1)
        took = time.monotonic() - t0
        if done < a.domains:
            with d.cv:
                bad = [ln for ln in d.lines if "event=deferred" in ln or "level=err" in ln
                       or "level=warn" in ln]
            print(f"  not delivered: {a.domains - done}; {len(bad)} deferrals/errors, e.g.:")
            print("\n".join("    " + ln for ln in bad[:5]))
            if os.environ.get("BENCH_DUMP"):
                with open(os.environ["BENCH_DUMP"], "w") as f:
                    f.write("\n".join(d.lines))
        stop.set()
        t.join(2)
        load = os.getloadavg()[0]
        d.stop(120)  # 10,000 connections to close first
    finally:
        stop.set()
        if d.proc.poll() is None:
            d.proc.kill()
        sink.kill()
        sink.wait()
        dns.stop()
        wd.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    conns = max(0, peak[0] - 4)  # less the listeners, the DNS and other sockets
    print(f"concurrency: {a.domains} domains, one 2 KB message each, smtp-sink -w {a.hold}, "
          f"{binary}{' (' + tag + ')' if tag else ''}; load average {load:.1f}")
    print(f"  injected in {injected:.1f}s over 20 sessions; "
          f"delivered {done} in {took:.1f}s: {done / took:.0f} msg/s")
    print(f"  most sockets open at once: {peak[0]} (about {conns} outbound connections)")
    if conns:
        print(f"  RSS {base[0]} kB before, {peak[1]} kB at the peak: "
              f"{(peak[1] - base[0]) / conns:.1f} kB per connection")
        # The spool is mapped (LMDB): its pages read at delivery count in
        # RSS as file pages, shared with the page cache and not the
        # connections'. The heap is what each connection costs.
        print(f"  of which anonymous (heap): {base[1]} kB before, {peak[2]} kB at the peak: "
              f"{(peak[2] - base[1]) / conns:.1f} kB per connection; "
              f"file-backed (spool map): {base[2]} kB before, {peak[3]} kB: "
              f"{(peak[3] - base[2]) / conns:.1f} kB per connection")
        if held[0] == peak[0]:
            print(f"  still {held[0]} sockets at the last sample (the hold's end): RSS {held[1]} kB: "
                  f"{(held[1] - base[0]) / conns:.1f} kB per connection (heap "
                  f"{(held[2] - base[1]) / conns:.1f}, spool map {(held[3] - base[2]) / conns:.1f})")
        print("  mapped files with the most RSS at the peak: " +
              ", ".join(f"{os.path.basename(p)} {kb} kB" for p, kb in files))


if __name__ == "__main__":
    main()
