#!/usr/bin/env python3
"""Relay benchmark over many recipient domains and MX hosts (issue 14):
N messages injected into sluice and delivered, for 1, 100, 1,000 and
10,000 recipient domains whose MX records point at 1, 10 and 100 MX hosts
(domain i at host i mod M). Each MX host is an smtp-sink of its own on
127.0.0.(1+k), one port for all, with an ordinary listen backlog (256);
a synthesising responder answers for them (d<i>.test MX mx<i mod M>.test,
mx<k>.test A 127.0.0.(1+k)) in constant time per query, where dnsmasq
searched a list of 10,000 records for each: bench/relay/dns_synth.c when
built beside --sluice (cmake --build ... --target dns_synth), else
tests/support/dns_synth.py, whose 200-400 us of CPU per query on the same
two cores took 2 to 7 s from sluice and the injector in the 10,000-domain
lines (the dns-cpu column). sluice runs on the built-in defaults (those of
the bundled etc/sluice.conf) but for what the bench must set: its listen
address, spool, resolver, the receivers' port and, where the binary knows
it, [delivery] allow_networks for loopback.

  bench/relay/bench_sites.py [--sluice build-rel/engine/sluice] [--messages 20000]
                             [--sessions 50] [--size 2048] [--only D:M,...]
                             [--before OTHER-SLUICE] [--dns-synth BINARY]
                             [--relay-conf 'LINES'] [--perf PREFIX] [--rounds N] [--paired]
                             [--one-sink] [--injector BINARY|python] [--keep]
                             [--own-names] [--stat EVENTS]

--own-names (with the C responder): each domain's MX host has a name of
its own, mx<i mod M>-<i>.test on host i mod M's address, as Microsoft
365 names one per domain on shared servers: without an [mx] rollup
(--relay-conf '[mx *.test]\nrollup = yes') each domain is a site of its
own.

With --before, each line runs with the other binary first, then with
--sluice: the ratio of each is to its own one-domain line. With --rounds
N, the line shows the best run (but max/addr, the most in any run), and
the line under it every run and the median of their ratios: on two cores shared by sluice, the sink, the
injector and the responder, runs of one line differ by several percent,
and the median says where the line stands, the best what it can reach.

Each line: messages/s from the first injection to the last delivery, the
ratio to one domain on one MX in the same run, connections opened per
1,000 messages (sluice's event=connected lines), the most connections
open at once to one MX address (the sinks' accepted sockets as the
kernel's sock_diag lists them, sampled every 50 ms, a socket counted
where two samples in a row list it), the injection rate
alone, sluice's CPU seconds per 1,000 messages, its minor page faults per
message during the line (pages it touched for the first time: a fresh
VM's host backs a guest page on its first touch, 5 to 10 us each, four
to seven times a fault on memory the guest has used before; see
bench/README.md), and the CPU seconds that
the injector (inject_synth's own count; with the Python injector, this
whole process during the injection), the DNS responder (during the
line), the smtp-sinks (all M of them) and this process (reading sluice's
log, sampling the connections; the Python injector's share taken out)
took from the same two cores; "busy" is all of these together against
what the machine's cores could give during the line: near 100%, the
line is bound by the cores they share, its rate what their CPU per
message allows. "host" is the whole machine's busy share over the line
(/proc/stat, from the first injection to the poll of sluice's log that
saw the last deliveries, up to 50 ms after them: a little low): above
"busy", other processes took the difference (a shared machine), and a
line with both well below 100% waited on something other than CPU.
The injector (pipelined MAIL/RCPT/DATA on --sessions connections, the
same for every line; smtp-source has one recipient address per process)
is bench/relay/inject_synth.c when built beside --sluice (--injector
BINARY, or --injector python for the Python one below): the Python one
took 3 to 5 s of CPU per 20,000 messages from the same two cores, the C
one under 1 s. Durable spool under /var/tmp. Never fails on a number.
"""
import argparse
import calendar
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "integ"))
from harness import Daemon, Workdir, free_port, wait_until  # noqa: E402
from test_delivery import connectable  # noqa: E402
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "support"))
from dns_synth import DnsSynth  # noqa: E402


def sinks(port, m, backlog=256, one=False):
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    if one:
        # One smtp-sink on the wildcard address answers for every
        # 127.0.0.x: the receivers cost what one costs, as on a network
        # where they are other machines. Each of those machines would
        # serve sessions and queue connections of its own, so the one
        # stands for M of them: M times smtp-sink's 256 sessions at once
        # (-m) and M times the backlog. With one machine's, a relay that
        # held more than 256 connections over 100 hosts (idle ones wait
        # idle_timeout for more mail) had its next connections queued
        # unanswered: greetings came 5 to 10 s late, 500 msg/s instead of
        # 5,000 in a 5,000-message line over 10,000 domains; and the first
        # burst of connections overflowed the accept queue (the kernel
        # drops the last ACK of a connection that finds it full).
        p = subprocess.Popen(["smtp-sink", *user, "-c", "-m", str(256 * m), f"0.0.0.0:{port}",
                              str(min(backlog * m, 4096))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for k in range(m):
            wait_until(lambda: connectable(port, f"127.0.0.{1 + k}"), 10, "smtp-sink")
        return [p]
    procs = []
    for k in range(m):
        host = f"127.0.0.{1 + k}"
        procs.append(subprocess.Popen(["smtp-sink", *user, "-c", f"{host}:{port}", str(backlog)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for k in range(m):
        wait_until(lambda: connectable(port, f"127.0.0.{1 + k}"), 10, "smtp-sink")
    return procs


def _port_filter(port):
    """sock_diag bytecode (linux/inet_diag.h) keeping sockets whose local
    port is port: S_GE port and S_LE port, a failed test jumping past the
    end (rejected), as ss(8) builds "sport = :port"."""
    ge, le = 2, 3  # INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE
    return struct.pack("=BBHBBH BBHBBH", ge, 8, 20, 0, 0, port, le, 8, 12, 0, 0, port)


def per_address(port):
    """The established connections to each 127.0.0.x:port now, at the
    receivers' end: the smtp-sinks' accepted sockets (local port port), as
    the kernel's sock_diag lists them, each address's as a set of socket
    cookies (the kernel's id of a socket, never reused while it runs).
    Only the relay connects to the sinks, whose port is this benchmark's
    own (free_port() claims it).
    The kernel filters by port, so a sample costs what the relay's
    connections cost, not what every socket on the machine or every file
    of sluice does (the /proc/net/tcp and /proc/PID/fd reads it replaced
    took 0.9 to 2.5 s of CPU per line from the two cores, more where
    sluice held more connections)."""
    bc = _port_filter(port)
    # inet_diag_req_v2: AF_INET, TCP, no extensions, states ESTABLISHED
    req = struct.pack("=BBBBI48x", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 1 << 1)
    req += struct.pack("=HH", 4 + len(bc), 1) + bc  # INET_DIAG_REQ_BYTECODE
    # SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP
    msg = struct.pack("=IHHII", 16 + len(req), 20, 0x301, 1, 0) + req
    out = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4) as nl:  # NETLINK_SOCK_DIAG
        nl.sendall(msg)
        for _ in range(100000):
            buf = nl.recv(1 << 16)
            off = 0
            while off + 16 <= len(buf):
                length, kind = struct.unpack_from("=IH", buf, off)
                if kind == 3:  # NLMSG_DONE
                    return out
                if kind == 2:  # NLMSG_ERROR
                    raise OSError(-struct.unpack_from("=i", buf, off + 16)[0], "sock_diag")
                # inet_diag_msg: family, state, timer, retrans, then the
                # socket id: sport, dport (big-endian), src, dst, if, cookie
                src = socket.inet_ntoa(buf[off + 24:off + 28])
                out.setdefault(src, set()).add(buf[off + 60:off + 68])  # id.cookie
                off += (length + 3) & ~3
    return out


class Sampler(threading.Thread):
    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.most, self.stopped = port, 0, False
        self.most_one = 0  # the most in one dump, for comparison
        self.start()

    def run(self):
        prev = {}
        while not self.stopped:
            c = per_address(self.port)
            # A dump is no snapshot: it walks the table for milliseconds,
            # so a socket closed after its bucket was read and one opened
            # before its own was read can both be listed (where an
            # address is held at its cap while connections end and open,
            # each at its max_messages, single dumps listed 41 under a
            # cap of 40). Only sockets listed by two dumps in a row are
            # counted: each lived from its place in the first dump to its
            # place in the second, so all of them were open together in
            # the moment between the two.
            for a, socks in c.items():
                self.most_one = max(self.most_one, len(socks))
                self.most = max(self.most, len(socks & prev.get(a, set())))
            prev = c
            # Every 50 ms: a dump walks the kernel's whole table of
            # established connections (262,144 buckets here), 2 to 3 ms of
            # CPU each, 0.3 s per line at every 10 ms. So the count is a
            # floor: a connection that lives less than the time between
            # two samples is not counted (most last far longer: a few are
            # opened per address in a line and kept while mail comes; not
            # with an MX name per domain and no rollup, --own-names).
            time.sleep(0.05)


def inject(port, rcpts, sessions, size):
    """One message per recipient, over sessions pipelined connections."""
    body = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * max(1, size // 78) + b".\r\n"
    errors = []

    def session(mine):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=120)
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO bench\r\n")
            while f.readline()[3:4] == b"-":
                pass
            for r in mine:
                s.sendall(b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<%s>\r\nDATA\r\n" % r.encode())
                for _ in range(3):
                    f.readline()
                s.sendall(body)
                line = f.readline()
                if not line.startswith(b"250"):
                    errors.append(line)
            s.sendall(b"QUIT\r\n")
            s.close()
        except OSError as e:
            errors.append(str(e))

    ts = [threading.Thread(target=session, args=(rcpts[i::sessions],)) for i in range(sessions)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return errors


def inject_c(binary, port, messages, sessions, size, ndom):
    """The same messages as inject(), sent by bench/relay/inject_synth;
    (errors, its own CPU seconds)."""
    r = subprocess.run([binary, "--port", str(port), "--messages", str(messages),
                        "--sessions", str(sessions), "--size", str(size), "--domains", str(ndom),
                        "--zone", "test"], capture_output=True, text=True, timeout=3600)
    fields = dict(f.split("=", 1) for f in r.stdout.split()[1:] if "=" in f)
    if r.returncode != 0 or "accepted" not in fields:
        print(f"  inject_synth exited {r.returncode}: {r.stderr.strip()}", flush=True)
    accepted = int(fields.get("accepted", 0))
    return ["not accepted"] * (messages - accepted), float(fields.get("cpu_s", 0))


class LogTail:
    """sluice's log file, read as it grows: whole lines, in blocks. The
    log goes to a file, not to a pipe read line by line by a thread of
    this process (harness.Daemon's), which took 0.2 to 0.4 s of CPU per
    20,000-message line from the two cores sluice shares with the rest."""
    def __init__(self, path):
        self.path, self.off, self.tail = path, 0, b""

    def lines(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.off)
                data = f.read()
        except FileNotFoundError:
            return []
        self.off += len(data)
        data = self.tail + data
        cut = data.rfind(b"\n") + 1
        self.tail = data[cut:]
        return data[:cut].splitlines()


def log_time(line):
    """The Unix time of a sluice log line (bytes; its first field,
    2026-12-02T12:30:01.123Z)."""
    stamp = line.split(b" ", 1)[0].decode()
    t = time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")
    return calendar.timegm(t) + float("0" + stamp[19:-1])


def host_jiffies():
    """(all, idle) jiffies of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def cpu_s(pid):
    """User + system CPU seconds of pid so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid):
    """{tid: (name, CPU seconds)} of pid's threads so far."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, rest = f.read().rsplit(")", 1)
            fields = rest.split()
            out[int(tid)] = (head.split("(", 1)[1],
                             (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        except OSError:
            pass
    return out


def minflt(pid):
    """Minor page faults of pid so far (each a page the kernel had to
    find and zero: on a freshly booted VM, whose host backs a guest page
    on its first touch, several microseconds each)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def knows(binary, key):
    r = subprocess.run([binary, "--config-reference"], capture_output=True, text=True)
    return key in r.stdout


def one(a, ndom, nmx, sink_port):
    wd = Workdir("sluice-sites-")
    work = tempfile.mkdtemp(prefix="sluice-sites-", dir=a.spool)
    dns = DnsSynth(mx_hosts=nmx, zone="test", binary=a.dns_synth or None, own_names=a.own_names)
    procs = sinks(sink_port, nmx, one=a.one_sink)
    port = free_port()
    allow = "allow_networks = 127.0.0.0/8\n" if knows(a.sluice, "allow_networks") else ""
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
{allow}
[dns]
servers = 127.0.0.1:{dns.port}
[log]
file = {work}/sluice.log
""" + a.relay_conf.replace("\\n", "\n") + "\n")
    d = Daemon(a.sluice, conf)
    res = None
    try:
        log = LogTail(f"{work}/sluice.log")
        wait_until(lambda: any(b"event=ready" in ln for ln in log.lines()), 30, "sluice ready")
        rcpts = [f"r{k}@d{k % ndom}.test" for k in range(a.messages)]
        if a.warm:
            # The same messages once before the line, delivered and out of
            # the log before it starts: the line then finds every domain's
            # MX answer, MTA-STS answer and destination already held, as a
            # sender's daily campaign to the same lists does.
            if a.injector:
                inject_c(a.injector, port, a.messages, a.sessions, a.size, ndom)
            else:
                inject(port, rcpts, a.sessions, a.size)
            seen = 0
            deadline = time.monotonic() + a.timeout
            while seen < a.messages and time.monotonic() < deadline:
                seen += sum(b"event=delivered" in ln for ln in log.lines())
                time.sleep(0.05)
            if seen < a.messages:
                raise RuntimeError(f"warm-up: {seen} of {a.messages} delivered")
        samp = Sampler(sink_port)
        me0, dns0 = os.times(), cpu_s(dns.proc.pid)
        # sluice's and the sinks' CPU before the line (start-up; with --warm, the warm-up)
        sluice0, sink0 = cpu_s(d.proc.pid), sum(cpu_s(p.pid) for p in procs)
        flt0 = minflt(d.proc.pid)
        thr0 = thread_cpu(d.proc.pid)
        perf = None
        if a.perf:
            perf = subprocess.Popen(["perf", "record", "-q", "--call-graph", os.environ.get("BENCH_CALLGRAPH", "fp")] +
                                    (os.environ.get("BENCH_PERF_EVENTS", "").split() or
                                     ["-F", os.environ.get("BENCH_PERF_FREQ", "997")]) + ["-p",
                                     str(d.proc.pid), "-o", f"{a.perf}-{ndom}-{nmx}.data"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stat = None
        if a.stat:
            stat = subprocess.Popen(["perf", "stat", "-x", ",", "-e", a.stat, "-p",
                                     str(d.proc.pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        t0, w0 = time.monotonic(), time.time()
        host0 = host_jiffies()
        host1 = host0
        if a.injector:
            errors, inj_cpu = inject_c(a.injector, port, a.messages, a.sessions, a.size, ndom)
            t_inject = time.monotonic() - t0
        else:
            errors = inject(port, rcpts, a.sessions, a.size)
            t_inject = time.monotonic() - t0
            me1 = os.times()
            inj_cpu = me1.user + me1.system - me0.user - me0.system
        deadline = time.monotonic() + a.timeout
        delivered = connected = 0
        t_last = t0
        while time.monotonic() < deadline and delivered < a.messages:
            before = delivered
            for ln in log.lines():
                if b"event=delivered" in ln:
                    delivered += 1
                    # The line's own time (sluice's realtime clock, in ms):
                    # this loop reads the log every 50 ms, 5% of a 1 s line.
                    t_last = max(t_last, t0 + log_time(ln) - w0)
                elif b"event=connected" in ln:
                    connected += 1
            if delivered > before:
                host1 = host_jiffies()  # the window ends where the last deliveries were seen
            time.sleep(0.05)
        samp.stopped = True
        samp.join(5)
        me2 = os.times()
        # This process's own CPU in the line (reading sluice's log file, sampling
        # the connections), the Python injector's taken out.
        bench_cpu = me2.user + me2.system - me0.user - me0.system - (0 if a.injector else inj_cpu)
        if perf is not None:
            perf.send_signal(2)  # SIGINT: perf writes its file and exits
            perf.wait(60)
        counts = {}
        if stat is not None:
            stat.send_signal(2)  # SIGINT: perf prints its counts and exits
            for ln in stat.communicate(timeout=60)[1].splitlines():
                f = ln.split(",")
                if len(f) > 2 and f[0].replace(".", "", 1).isdigit():
                    counts[f[2]] = float(f[0])
        sluice_cpu = cpu_s(d.proc.pid) - sluice0
        thr1 = thread_cpu(d.proc.pid)
        threads = sorted(((v[1] - thr0.get(k, (None, 0))[1], v[0]) for k, v in thr1.items()),
                         reverse=True)
        faults = minflt(d.proc.pid) - flt0
        dns_cpu = cpu_s(dns.proc.pid) - dns0
        sink_cpu = sum(cpu_s(p.pid) for p in procs) - sink0
        # The share of the machine these processes took during the line:
        # near 100%, the line is bound by the cores they share.
        busy = (sluice_cpu + inj_cpu + dns_cpu + sink_cpu + bench_cpu) / \
            ((os.cpu_count() or 1) * max(1e-3, t_last - t0))
        res = dict(msgs=delivered / (t_last - t0), inject=a.messages / t_inject,
                   cpu=1000 * sluice_cpu / max(1, delivered), busy=busy,
                   faults=faults / max(1, delivered),
                   host=1 - (host1[1] - host0[1]) / max(1, host1[0] - host0[0]),
                   delivered=delivered, conns=connected, most=samp.most, most_one=samp.most_one,
                   errors=len(errors),
                   secs=t_last - t0, load=os.getloadavg()[0], inj_cpu=inj_cpu,
                   dns_cpu=dns_cpu, sink_cpu=sink_cpu, bench_cpu=bench_cpu,
                   threads=threads, counts=counts)
        d.stop(60)
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        for p in procs:
            p.kill()
            p.wait()
        dns.stop()
        wd.cleanup()
        if a.keep:
            print(f"kept: {work} (sluice.log, spool)", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-rel/engine/sluice")
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--timeout", type=int, default=300, help="seconds to wait for deliveries")
    ap.add_argument("--spool", default="/var/tmp")
    ap.add_argument("--only", default="", help="D:M pairs, comma-separated")
    ap.add_argument("--relay-conf", default="", help="config lines appended to sluice's (\\n "
                    "between lines), e.g. '[dns]\\nfamily = v4'")
    ap.add_argument("--stat", default="", help="perf stat -e STAT on sluice during each "
                    "line, counts per message delivered (of the best run with --rounds), e.g. "
                    "'task-clock,context-switches', or a uprobe (perf probe -x LIBC -a "
                    "malloc_consolidate, then 'probe_libc:malloc_consolidate')")
    ap.add_argument("--perf", default="", help="record each line's sluice with perf into "
                    "PREFIX-D-M.data (perf report -i ...); BENCH_CALLGRAPH (fp), "
                    "BENCH_PERF_FREQ (997) or BENCH_PERF_EVENTS instead (e.g. "
                    "'-e raw_syscalls:sys_enter -c 1': every system call)")
    ap.add_argument("--before", default="",
                    help="another sluice binary (e.g. main's) run on each line just before, "
                         "for figures side by side")
    ap.add_argument("--warm", action="store_true",
                    help="deliver the line's messages once before timing it: DNS answers, "
                         "MTA-STS answers and destinations are then held (a repeat campaign)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each line; the best is shown "
                    "(max/addr: the most of any run), every run's rate after it (the worst hides nothing) and the median of their "
                    "ratios")
    ap.add_argument("--keep", action="store_true",
                    help="keep each run's directory (sluice.log, the spool) under --spool and "
                         "print its path; with --relay-conf '[log]\\nlevel = debug' the log "
                         "says why each connection ended (event=conn_close reason=)")
    ap.add_argument("--one-sink", action="store_true",
                    help="one smtp-sink on 0.0.0.0 answers for every MX address (M of them cost "
                         "M times the CPU of one on these two cores)")
    ap.add_argument("--paired", action="store_true",
                    help="run one domain on one MX right before each run of a line; the ratio "
                         "is to that run")
    ap.add_argument("--dns-synth", default=None, help="the C responder (bench/relay/dns_synth.c); "
                    "default: beside --sluice's build, else the Python one")
    ap.add_argument("--injector", default=None, help="the C injector (bench/relay/"
                    "inject_synth.c), or 'python' for the Python one; default: beside "
                    "--sluice's build, else the Python one")
    ap.add_argument("--own-names", action="store_true",
                    help="an MX host name of its own per domain on the shared hosts (the C "
                         "responder only)")
    a = ap.parse_args()
    if a.injector is None:
        c = os.path.join(os.path.dirname(os.path.abspath(a.sluice)), "..", "bench", "relay",
                         "inject_synth")
        a.injector = c if os.access(c, os.X_OK) else ""
    elif a.injector == "python":
        a.injector = ""
    elif not os.access(a.injector, os.X_OK):
        ap.error(f"--injector {a.injector}: not an executable (build it: cmake --build BUILD "
                 f"--target inject_synth; or --injector python)")
    if a.dns_synth is None:
        c = os.path.join(os.path.dirname(os.path.abspath(a.sluice)), "..", "bench", "relay",
                         "dns_synth")
        a.dns_synth = c if os.access(c, os.X_OK) else ""
    if a.own_names and not a.dns_synth:
        ap.error("--own-names needs the C responder (--dns-synth)")
    grid = [(1, 1), (100, 1), (100, 10), (100, 100), (1000, 1), (1000, 10), (1000, 100),
            (10000, 1), (10000, 10), (10000, 100)]
    if a.only:
        grid = [tuple(int(x) for x in p.split(":")) for p in a.only.split(",")]
        if (1, 1) not in grid:
            grid.insert(0, (1, 1))
    sink_port = free_port()
    print(f"sites: {a.messages} messages of {a.size} B, 1 recipient each, {a.sessions} sessions, "
          f"{a.sluice}, built-in defaults (max_connections_per_address where known), "
          f"receivers: smtp-sink{' (one for all)' if a.one_sink else ''}, backlog 256"
          f"{' per MX host' if a.one_sink else ''}; "
          f"DNS: {a.dns_synth or 'dns_synth.py'}{' (an MX name per domain)' if a.own_names else ''}; "
          f"injector: {a.injector or 'Python'}; "
          f"load average {os.getloadavg()[0]:.1f}",
          flush=True)
    print(f"{'domains':>8} {'MX':>4} {'msg/s':>8} {'ratio':>6} {'conns/1k':>9} "
          f"{'max/addr':>9} {'delivered':>10} {'secs':>7} {'inject/s':>9} {'cpu-s/1k':>8} {'flt/msg':>7} "
          f"{'load':>5} {'inj-cpu':>7} {'dns-cpu':>7} {'sink-cpu':>8} {'bench-cpu':>9} {'busy':>5} {'host':>5}",
          flush=True)
    binaries = [("", a.sluice)] if not a.before else [("before", a.before), ("after", a.sluice)]
    base = {}
    for ndom, nmx in grid:
        for label, binary in binaries:
            a_run = argparse.Namespace(**vars(a))
            a_run.sluice = binary
            # The best of --rounds runs of the line: the machine is shared,
            # and a line run while another process takes the cores is
            # slower for that reason alone.
            # --paired: each run of the line right after a one-domain run
            # of its own, the ratio to that one (the load of a shared
            # machine moves within minutes; neighbours in time see the same).
            # Every run's figure is printed after the best one's line
            # (--rounds 2 or more): a stall in one run of N (a domain left
            # waiting until idle_timeout) shows there, where the best hides it.
            r, ref = None, None
            runs = []
            for _ in range(a.rounds):
                y = one(a_run, 1, 1, sink_port) if a.paired and (ndom, nmx) != (1, 1) else None
                x = one(a_run, ndom, nmx, sink_port)
                runs.append((x, y))
                if r is None or (x["msgs"] / y["msgs"] if y else x["msgs"]) > \
                        (r["msgs"] / ref["msgs"] if ref else r["msgs"]):
                    r, ref = x, y
            if label not in base:
                base[label] = r["msgs"]
            b = ref["msgs"] if ref else base[label]
            # the most at one address in any run of the line, not the best's alone
            most = max(x["most"] for x, _ in runs)
            print(f"{ndom:>8} {nmx:>4} {r['msgs']:>8.0f} {100 * r['msgs'] / b:>5.0f}% "
                  f"{1000 * r['conns'] / max(1, r['delivered']):>9.1f} {most:>9} "
                  f"{r['delivered']:>10} {r['secs']:>7.1f} {r['inject']:>9.0f} {r['cpu']:>8.3f} {r['faults']:>7.2f} "
                  f"{r['load']:>5.1f} {r['inj_cpu']:>7.1f} {r['dns_cpu']:>7.1f} {r['sink_cpu']:>8.1f} "
                  f"{r['bench_cpu']:>9.1f} {100 * r['busy']:>4.0f}% {100 * r['host']:>4.0f}% {label}"
                  + (f"  ({r['errors']} injection errors)" if r["errors"] else "")
                  + (f"  (one domain just before: {ref['msgs']:.0f} msg/s)" if ref else ""),
                  flush=True)
            most_one = max(x["most_one"] for x, _ in runs)
            if most_one > most:
                print(f"    max/addr {most} in two samples in a row, {most_one} in one alone "
                      f"(a sample is no snapshot: see per_address)", flush=True)
            if len(runs) > 1:
                b0 = base.get(label, r["msgs"])
                every = ", ".join(
                    f"{x['msgs']:.0f} ({100 * x['msgs'] / (y['msgs'] if y else b0):.0f}%, "
                    f"{x['secs']:.1f} s, {x['delivered']} delivered, {x['cpu']:.4f} cpu-s/1k)"
                    for x, y in runs)
                ratios = sorted(x["msgs"] / (y["msgs"] if y else b0) for x, y in runs)
                mid = len(ratios) // 2
                median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
                print(f"    every run, msg/s: {every}; median ratio {100 * median:.0f}%", flush=True)
            if a.stat:
                print("    perf stat, per message delivered: " + ", ".join(
                    f"{k} {v / max(1, r['delivered']):.3f}" for k, v in r["counts"].items()),
                    flush=True)
            if os.environ.get("BENCH_THREADS"):
                print("    threads (CPU s): " + ", ".join(f"{n} {c:.2f}" for c, n in r["threads"][:6]
                                                        if c > 0), flush=True)


if __name__ == "__main__":
    main()
