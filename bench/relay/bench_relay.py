#!/usr/bin/env python3
"""End-to-end relay benchmark: smtp-source injects N messages into sluice,
which delivers them to smtp-sink through MX records served by dnsmasq;
beside it, in the same run, smtp-source straight into smtp-sink as the
ceiling of the tools on this machine.

  bench/relay/bench_relay.py [--sluice build-rel/engine/sluice] [--messages 20000]
                             [--sessions 50] [--size 2048] [--domains 1] [--dlog] [--dkim]
                             [--dkim-on-worker none|ed25519|all]
                             [--before OTHER-SLUICE [--rounds 3]] [--shaping]
                             [--postfix [--rounds 3]]

Prints the injection rate and the end-to-end rate (until sluice has logged
every delivery). Durable spool under /var/tmp (not tmpfs). Never fails on
a number.

--postfix alternates sluice with a private Postfix (tests/support/
private_postfix.py: its own queue under --spool, as durable) relaying the
same load to the same smtp-sink, --rounds times each: smtp-source into
Postfix's smtpd, its qmgr and smtp client to `relayhost =
[127.0.0.1]:<the sink>` (no DNS lookup, where sluice asks dnsmasq for the
MX), Postfix's defaults otherwise but for the concurrency to that
destination, raised from 20 to sluice's 50 here (and what
tests/support/private_postfix.py sets for any instance: no TLS, no
SMTPUTF8, no chroot, its log in a file of its own). Its end-to-end time
runs until its log shows every message sent. One domain only. Needs root.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "integ"))
sys.argv_saved = sys.argv
from harness import Daemon, Workdir, free_port, wait_until  # noqa: E402
from test_delivery import Dns, connectable  # noqa: E402
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "support"))
from private_postfix import PrivatePostfix  # noqa: E402


def source(port, n, sessions, size, to):
    t0 = time.monotonic()
    r = subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(n), "-l", str(size),
                        "-f", "bench@example.com", "-t", to, f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        print("smtp-source:", r.stderr.strip())
    return time.monotonic() - t0


def sink(port, *flags, backlog=1000):
    """smtp-sink on port (as nobody when root, which it requires). A listen
    backlog that overflows leaves half-open connections that wait for a
    greeting until its deadline (the kernel drops the last ACK)."""
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    p = subprocess.Popen(["smtp-sink", *user, *flags, "-c", f"127.0.0.1:{port}", str(backlog)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: connectable(port), 10, "smtp-sink")
    return p


def relay_conf(wd, port, spool, sink_port, dns_port, extra="", allow=True):
    """A sluice that takes mail on port and delivers to the sink through
    the benchmark's dnsmasq (allowing loopback as a target unless allow is
    false: a binary from before [delivery] allow_networks)."""
    allow_line = "allow_networks = 127.0.0.0/8" if allow else ""
    return wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{port}
trusted_networks = 127.0.0.0/8
[queue]
path = {spool}
map_size = 8G
[delivery]
remote_port = {sink_port}
{allow_line}
[dns]
servers = 127.0.0.1:{dns_port}
{extra}
""")


def openssl_rsa2048_per_core():
    """RSA-2048 signatures per second on one core, per openssl speed."""
    r = subprocess.run(["openssl", "speed", "-seconds", "3", "rsa2048"], capture_output=True,
                       text=True, timeout=120)
    for line in r.stdout.splitlines():
        if line.startswith("rsa 2048 bits"):
            return float(line.split()[5])
    return 3700.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-rel/engine/sluice")
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--domains", type=int, default=1)
    ap.add_argument("--spool", default="/var/tmp")
    ap.add_argument("--dlog", action="store_true",
                    help="run twice, with the JSON delivery log off and on, and compare "
                         "(with --before: both binaries with the log on)")
    ap.add_argument("--dkim", action="store_true",
                    help="run unsigned, Ed25519-signed and RSA-2048-signed, twice each, "
                         "alternating, and compare")
    ap.add_argument("--dkim-on-worker", choices=["none", "ed25519", "all"], default=None,
                    help="[dkim] sign_on_worker for the signed runs (default: sluice's)")
    ap.add_argument("--events", action="store_true",
                    help="run with the delivery log on and event sinks (a webhook and a Redis "
                         "stream) off, then on, twice each, and compare")
    ap.add_argument("--before", default="",
                    help="another sluice binary: runs alternate it and --sluice, --rounds "
                         "times each, and the best of each is compared (with --events: a "
                         "sinks-on run of it after each sinks off/on pair of --sluice)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--postfix", action="store_true",
                    help="alternate sluice with a private Postfix relaying the same load to the "
                         "same sink, --rounds times each, and compare (needs root)")
    ap.add_argument("--shaping", action="store_true",
                    help="run with [shaping] off, with 1,000 rules loaded, and with 1,000 "
                         "rules and one action in force (for another destination group, so "
                         "that every transaction asks the table), twice each, and compare")
    a = ap.parse_args()

    sink_port = free_port()
    s = sink(sink_port)
    try:
        t_ceiling = source(sink_port, a.messages, a.sessions, a.size, "rcpt@d0.test")
    finally:
        s.kill()
        s.wait()

    runs = [("", "")]
    binaries = {}
    if a.before:
        runs = [("before", ""), ("after", "")] * a.rounds
        binaries = {"before": a.before, "after": a.sluice}
    if a.dlog and a.before:
        runs = [("before", "dlog"), ("after", "dlog")] * a.rounds  # both with the log on
    elif a.dlog:
        runs = [("log off", ""), ("log on", "dlog")] * 2
    if a.postfix:
        why = PrivatePostfix.missing()
        if why is not None:
            sys.exit(f"--postfix: {why}")
        if a.domains != 1 or a.before or a.dlog or a.dkim or a.events or a.shaping:
            # one relayhost is one Postfix destination (50 connections in
            # all), where sluice's cap is per domain; the other runs have
            # no Postfix side
            sys.exit("--postfix: one domain, and none of --before, --dlog, --dkim, --events, "
                     "--shaping")
        runs = [("sluice", ""), ("postfix", "postfix")] * a.rounds
    if a.shaping:
        runs = [("shaping off", "shaping-off"), ("1,000 rules", "shaping-rules"),
                ("1,000 rules, 1 action", "shaping-action")] * 2
    keydir = None
    if a.dkim:
        runs = [("unsigned", ""), ("ed25519", "ed25519"), ("rsa-2048", "rsa2048")] * 2
        keydir = tempfile.mkdtemp(prefix="sluice-bench-keys-")
        for kind, args in (("ed25519", ["-algorithm", "ED25519"]),
                           ("rsa2048", ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])):
            subprocess.run(["openssl", "genpkey", *args, "-out", f"{keydir}/{kind}.pem"],
                           check=True, capture_output=True)
        a.keydir = keydir
    if a.events:
        runs = [("sinks off", "dlog"), ("sinks on", "events")] * 2
        if a.before:
            # --before with --events: its sinks-on rate beside this one's
            runs = [("sinks off", "dlog"), ("sinks on", "events"),
                    ("sinks on (before)", "events")] * 2
            binaries = {"sinks on (before)": a.before}
        sys.path.insert(0, os.path.join(here, "..", "events"))
        import bench_events  # noqa: E402
        a.receiver, a.receiver_port = bench_events.start_receiver(False)
        a.redis_port = free_port()
        a.redis = subprocess.Popen(["redis-server", "--port", str(a.redis_port), "--bind",
                                    "127.0.0.1", "--save", "", "--appendonly", "no"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: connectable(a.redis_port), 10, "redis")
    results = []
    try:
        for label, what in runs:
            b = argparse.Namespace(**vars(a))
            b.sluice = binaries.get(label, a.sluice)
            run = postfix_run if what == "postfix" else relay_run
            results.append((label, run(b, sink_port, what)))
    finally:
        if a.events:
            a.receiver.terminate()
            a.redis.terminate()
            a.receiver.wait()
            a.redis.wait()
    print(f"relay: {results[0][1][3]} messages of {a.size} B, 1 recipient, {a.sessions} sessions, "
          f"{min(50, a.domains)} domain(s), durable spool under {a.spool}")
    print(f"  smtp-source -> smtp-sink (ceiling):      {a.messages / t_ceiling:8.0f} msg/s")
    for label, (t_inject, t_e2e, got, n_expect, cpu) in results:
        tag = f" [{label}]" if label else ""
        relay = "postfix" if label == "postfix" else "sluice"
        print(f"  smtp-source -> {relay} (injection){tag}:       {n_expect / t_inject:8.0f} msg/s")
        print(f"  smtp-source -> {relay} -> smtp-sink (e2e){tag}: {n_expect / t_e2e:8.0f} msg/s "
              f"({100 * (n_expect / t_e2e) / (a.messages / t_ceiling):.0f}% of the ceiling)")
        if cpu is None:
            print(f"  delivered {got} of {n_expect}")
        else:
            print(f"  delivered {got} of {n_expect}; sluice used {cpu:.2f} s of CPU: "
                  f"{1e6 * cpu / max(1, n_expect):.0f} us per message")
    if a.postfix:
        best = {lab: max(r[3] / r[1] for ll, r in results if ll == lab)
                for lab in ("sluice", "postfix")}
        rates = {lab: sorted(r[3] / r[1] for ll, r in results if ll == lab)
                 for lab in ("sluice", "postfix")}
        ceil = a.messages / t_ceiling
        print(f"  best e2e of {a.rounds} alternating runs each: sluice {best['sluice']:.0f} msg/s "
              f"({100 * best['sluice'] / ceil:.0f}% of the ceiling), Postfix "
              f"{best['postfix']:.0f} msg/s ({100 * best['postfix'] / ceil:.0f}%): sluice/Postfix "
              f"= {best['sluice'] / best['postfix']:.1f}; medians "
              f"{rates['sluice'][len(rates['sluice']) // 2]:.0f} and "
              f"{rates['postfix'][len(rates['postfix']) // 2]:.0f} msg/s")
    if a.before and not a.events:
        best = {lab: max(r[3] / r[1] for ll, r in results if ll == lab)
                for lab in ("before", "after")}
        cpu = {lab: min(r[4] / r[3] for ll, r in results if ll == lab)
               for lab in ("before", "after")}
        ceil = a.messages / t_ceiling
        print(f"  before: {a.before}\n  after:  {a.sluice}")
        print(f"  best e2e of {a.rounds} alternating runs each: before {best['before']:.0f} msg/s "
              f"({100 * best['before'] / ceil:.0f}% of the ceiling), after {best['after']:.0f} "
              f"msg/s ({100 * best['after'] / ceil:.0f}%): after/before = "
              f"{best['after'] / best['before']:.2f}; sluice's CPU per message (least): before "
              f"{cpu['before'] * 1e6:.0f} us, after {cpu['after'] * 1e6:.0f} us")
    if keydir is not None:
        shutil.rmtree(keydir, ignore_errors=True)
        best = {lab: max(r[3] / r[1] for ll, r in results if ll == lab)
                for lab in ("unsigned", "ed25519", "rsa-2048")}
        speed = openssl_rsa2048_per_core()
        u, e, r = best["unsigned"], best["ed25519"], best["rsa-2048"]
        added = 2.0 / r - 2.0 / u  # core-seconds per message that signing adds
        print(f"  DKIM (best of 2 each, alternating): unsigned {u:.0f} msg/s, Ed25519 {e:.0f} "
              f"msg/s ({100 * e / u:.0f}% of unsigned), RSA-2048 {r:.0f} msg/s "
              f"({100 * r / u:.0f}%)")
        print(f"  RSA-2048 adds {added * 1e6:.0f} us of CPU per message (2 cores / signed rate "
              f"- 2 cores / unsigned rate); one signature per openssl speed here: "
              f"{1e6 / speed:.0f} us ({speed:.0f}/s per core): {added * speed:.2f} signatures' worth")
        cpu = {lab: min(r[4] / r[3] for ll, r in results if ll == lab)
               for lab in ("unsigned", "ed25519", "rsa-2048")}
        print(f"  sluice's own CPU per message (least of 2, from /proc, not moved by the load of "
              f"other processes): unsigned {cpu['unsigned'] * 1e6:.0f} us, Ed25519 "
              f"{cpu['ed25519'] * 1e6:.0f} us (+{(cpu['ed25519'] - cpu['unsigned']) * 1e6:.0f}), "
              f"RSA-2048 {cpu['rsa-2048'] * 1e6:.0f} us "
              f"(+{(cpu['rsa-2048'] - cpu['unsigned']) * 1e6:.0f}: "
              f"{(cpu['rsa-2048'] - cpu['unsigned']) * speed:.2f} signatures' worth)")
    if a.shaping:
        best = {lab: max(r[1][3] / r[1][1] for r in results if r[0] == lab)
                for lab in ("shaping off", "1,000 rules", "1,000 rules, 1 action")}
        cpu = {lab: min(r[1][4] / r[1][3] for r in results if r[0] == lab) for lab in best}
        off = best["shaping off"]
        print("  shaping (alternating runs, best of 2 each; replies are all 2xx, so no rule "
              "is matched here: bench/shaping has the matching cost per reply):")
        for lab, v in best.items():
            print(f"    {lab:24s} {v:8.0f} msg/s ({100 * v / off:.0f}% of shaping off), "
                  f"sluice CPU {cpu[lab] * 1e6:.0f} us per message")
    if a.dlog and not a.before:
        off = [r[1][3] / r[1][1] for r in results if r[0] == "log off"]
        on = [r[1][3] / r[1][1] for r in results if r[0] == "log on"]
        best_off, best_on = max(off), max(on)
        print(f"  delivery log: best e2e {best_off:.0f} msg/s off, {best_on:.0f} msg/s on: "
              f"{100 * (best_off - best_on) / best_off:+.1f}% cost (alternating runs, best of 2)")
    if a.events:
        off = [r[1][3] / r[1][1] for r in results if r[0] == "sinks off"]
        on = [r[1][3] / r[1][1] for r in results if r[0] == "sinks on"]
        best_off, best_on = max(off), max(on)
        print(f"  event sinks (webhook + Redis stream, delivery log on in both): best e2e "
              f"{best_off:.0f} msg/s off, {best_on:.0f} msg/s on: {100 * best_on / best_off:.0f}% "
              f"of the rate without sinks (alternating runs, best of 2; receiver and redis-server "
              f"share the 2 cores)")
        if a.before:
            bef = max(r[1][3] / r[1][1] for r in results if r[0] == "sinks on (before)")
            print(f"  sinks on with {a.before}: best e2e {bef:.0f} msg/s: this binary's sinks-on "
                  f"rate is {100 * best_on / bef:.0f}% of it")


def shaping_rules_file(work, n):
    """n operator rules over 16 groups and the usual codes (as bench/shaping
    generates them), none of which the sink's replies match."""
    codes = [421, 450, 451, 452, 550, 552, 553, 554]
    lines = [f"group g{g} *.g{g}.test" for g in range(16)]
    lines += [f'rule op{i} group=g{i % 16} code={codes[i % 8]} match="err-{i} [a-z]+ deferred" '
              f"action=suspend scope=source for=1h" for i in range(n)]
    path = os.path.join(work, "shaping.rules")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def stats_cmd(sock, line):
    import json
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock)
        s.sendall(line.encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            buf += s.recv(65536)
    r = json.loads(buf.split(b"\n", 1)[0])
    assert r.get("ok"), r
    return r


def sinks_pending(sock):
    import json
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock)
        s.sendall(b"events\n")
        buf = b""
        while b"\n" not in buf:
            buf += s.recv(65536)
    return sum(x["pending"] for x in json.loads(buf.split(b"\n", 1)[0])["sinks"])


def inject(a, port, domains):
    """a.messages over a.sessions into 127.0.0.1:port, to rcpt@ each of
    domains (at most 50 of them); returns the messages expected. smtp-source
    has one recipient address, so with several domains several runs of it
    share the messages."""
    per = a.messages // len(domains)
    procs = []
    for i, dom in enumerate(domains[:50]):
        n = per if i < len(domains) - 1 else a.messages - per * (len(domains) - 1)
        procs.append(subprocess.Popen(
            ["smtp-source", "-s", str(max(1, a.sessions // min(50, len(domains)))),
             "-m", str(n), "-l", str(a.size), "-f", "bench@example.com", "-t",
             f"rcpt@{dom}", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for p in procs:
        p.wait(3600)
    return per * min(50, len(domains)) if len(domains) > 1 else a.messages


def relay_run(a, sink_port, what):
    """One sluice between smtp-source and smtp-sink; returns (injection s,
    end-to-end s, delivered, expected)."""
    wd = Workdir("sluice-relay-")
    work = tempfile.mkdtemp(prefix="sluice-relay-", dir=a.spool)
    domains = [f"d{i}.test" for i in range(a.domains)]
    dns = Dns(wd, ["host-record=mx.test,127.0.0.1"] + [f"mx-host={d},mx.test,10" for d in domains])
    s = sink(sink_port)
    port = free_port()
    extra = f"[domain *]\nmax_connections = 50\n[stats]\nsocket = {work}/stats.sock\n"
    if what in ("dlog", "events"):
        extra += f"[log]\ndelivery_log = {work}/delivery.jsonl\n"
    if what in ("ed25519", "rsa2048"):
        # smtp-source writes From: <bench@example.com>
        if a.dkim_on_worker:
            extra += f"[dkim]\nsign_on_worker = {a.dkim_on_worker}\n"
        extra += f"[dkim example.com s1]\nkey_file = {a.keydir}/{what}.pem\n"
    if what == "events":
        extra += (f"[events hook]\nurl = http://127.0.0.1:{a.receiver_port}/events\n"
                  f"secret = bench\n"
                  f"[events stream]\nurl = redis://127.0.0.1:{a.redis_port}/relay-events\n")
    if what == "shaping-off":
        extra += "[shaping]\nenabled = no\n"
    elif what.startswith("shaping-"):
        extra += f"[shaping]\nrules = {shaping_rules_file(work, 977)}\n"
    ref = subprocess.run([a.sluice, "--config-reference"], capture_output=True, text=True).stdout
    conf = relay_conf(wd, port, f"{work}/spool", sink_port, dns.port, extra,
                      allow="allow_networks" in ref)
    d = Daemon(a.sluice, conf)
    try:
        d.wait_log("event=ready")
        if what == "shaping-action":
            stats_cmd(f"{work}/stats.sock", "shaping suspend group=yahoo for=1h")
        t0 = time.monotonic()
        n_expect = inject(a, port, domains)
        t_inject = time.monotonic() - t0
        deadline = time.monotonic() + 600
        got = 0
        while time.monotonic() < deadline:
            with d.cv:
                got = sum(1 for ln in d.lines if "event=delivered" in ln)
            if got >= n_expect:
                break
            time.sleep(0.05)
        t_e2e = time.monotonic() - t0
        cpu = proc_cpu_s(d.proc.pid)
        if what in ("ed25519", "rsa2048"):
            with d.cv:
                unsigned = sum(1 for ln in d.lines if "event=dkim_unsigned" in ln)
            if unsigned:
                print(f"  ({unsigned} messages went out unsigned: check the From: domain)")
        if what == "events":
            # every event pushed too: the sinks are done when pending is 0
            ev_deadline = time.monotonic() + 600
            while time.monotonic() < ev_deadline:
                st = sinks_pending(f"{work}/stats.sock")
                if st == 0:
                    break
                time.sleep(0.05)
            t_events = time.monotonic() - t0
            print(f"  (sinks on: every event acknowledged by both sinks {t_events:.1f} s after "
                  f"the start, {t_events - (t_e2e):.1f} s after the last delivery)")
        if what in ("dlog", "events"):
            with open(f"{work}/delivery.jsonl", "rb") as f:
                lines = f.read().count(b"\n")
            if lines < 2 * n_expect:
                print(f"  (delivery log holds {lines} lines so far)")
        d.stop()
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        s.kill()
        s.wait()
        dns.stop()
        wd.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return t_inject, t_e2e, got, n_expect, cpu


def postfix_run(a, sink_port, _what):
    """The same load as relay_run through a private Postfix to the same
    sink; returns (injection s, end-to-end s, delivered, expected, None).
    The end: its log's status=sent lines reach the messages expected (or
    600 s); what its queue still holds then is printed."""
    domains = [f"d{i}.test" for i in range(a.domains)]
    s = sink(sink_port)
    port = free_port()
    pf = None
    try:
        pf = PrivatePostfix(port, "relay.bench.test", f"""mydestination =
relayhost = [127.0.0.1]:{sink_port}
smtp_destination_concurrency_limit = 50
""", parent=a.spool)
        t0 = time.monotonic()
        n_expect = inject(a, port, domains)
        t_inject = time.monotonic() - t0
        # the log read from where the last look ended: its status=sent
        # lines counted, a last line not yet whole left for the next look
        got, off, tail = 0, 0, b""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                with open(pf.maillog, "rb") as f:
                    f.seek(off)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            off += len(chunk)
            buf = tail + chunk
            cut = buf.rfind(b"\n") + 1
            got += buf[:cut].count(b" status=sent ")
            tail = buf[cut:]
            if got >= n_expect:
                break
            time.sleep(0.05)
        t_e2e = time.monotonic() - t0
        left = pf.queued()
        if left:
            print(f"  (Postfix: {left} messages still in its queue at the end)")
    finally:
        if pf is not None:
            pf.stop()
        s.kill()
        s.wait()
    return t_inject, t_e2e, got, n_expect, None


def proc_cpu_s(pid):
    """User + system CPU seconds of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
