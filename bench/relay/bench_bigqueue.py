#!/usr/bin/env python3
"""A big deferred queue, as the operator of a bulk sender meets it: the
receivers are down for hours, the queue grows to hundreds of thousands of
recipients, sluice is restarted on it, then the receivers come back.

The queue: --messages single-recipient messages over --domains domains
(bench/relay/inject_synth) and --big messages of --rcpts recipients each
over --big-domains domains (smtp-source -r), all on one MX host that a
synthesising DNS responder names (dns_synth). The receiver is down until
the drain (--down refuse, the default: nothing listens on its port;
--down 421: smtp-sink answers every connection 421), then accepts and
dumps every transaction (smtp-sink -D), so each (Message-ID, recipient)
is counted at the sink: a duplicate or a loss shows there.

Phases, each printed with its figures:

  outage   inject the queue; seconds until every recipient is deferred
           (stats queue.deferred); RSS and RssAnon once idle;
  idle     --idle seconds with nothing due: sluice's CPU seconds over them
           (a scheduler that spins or wakes per job shows here);
  ops      seconds each sluicectl command takes on the queue (stats,
           domains, queue, queue 20 DOMAIN), and the workers' longest turn
           since start (stats loop) after them;
  restart  SIGTERM: seconds to exit; sluice-spool count and check on the
           stopped spool; the start: seconds to event=ready, RSS, and the
           recipients tried within --idle seconds after it (deferred
           events: 0 when every retry time is kept); then the same after
           kill -9;
  drain    the receiver accepts, `sluicectl flush`: seconds to the first
           delivery and until the queue is empty, recipients/s, the peak
           RSS and RssAnon while it drains (every due recipient is taken
           into memory at once), the latency of SMTP sessions (connect,
           EHLO, MAIL, RCPT, DATA of a small message, QUIT) on the
           submission port every 200 ms while it drains (p50, p99, max),
           the workers' longest turn, and the sink's count of recipients,
           duplicates and missing ones.

  bench/relay/bench_bigqueue.py [--sluice build-rel/engine/sluice] [--messages 100000]
      [--domains 10000] [--big 100] [--rcpts 1000] [--big-domains 10] [--size 300]

Never fails on a number; the ceiling each figure is read against is
printed beside it.
"""
import argparse
import os
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from bench_backlog import queue_counts, longest_turn, relay_conf  # noqa: E402
from bench_sites import LogTail, cpu_s, inject_c  # noqa: E402
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "integ"))
from harness import Daemon, Workdir, free_port, wait_until  # noqa: E402
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "support"))
from dns_synth import DnsSynth  # noqa: E402


def mem_kb(pid):
    """(VmRSS, RssAnon) of pid in KB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            k, _, v = ln.partition(":")
            if k in ("VmRSS", "RssAnon"):
                out[k] = int(v.split()[0])
    return out.get("VmRSS", 0), out.get("RssAnon", 0)


def timed(cmd):
    t = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return time.monotonic() - t, r


def sink(port, dump=None):
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    args = ["-D", dump] if dump else ["-Q", "CONNECT"]
    p = subprocess.Popen(["smtp-sink", *user, *args, "-m", "512", f"127.0.0.1:{port}", "1024"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: _connectable(port), 10, "smtp-sink")
    return p


def _connectable(port):
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def sink_count(dump):
    """(recipients, duplicates) in smtp-sink's dump: each (Message-ID,
    recipient) once."""
    seen, dup = set(), 0
    rcpts, mid = [], None
    with open(dump, "rb") as f:
        for ln in f:
            if ln.startswith(b"X-Rcpt-Args:"):
                rcpts.append(ln.split(b":", 1)[1].strip().split()[0])
            elif mid is None and ln.lower().startswith(b"message-id:"):
                mid = ln.split(b":", 1)[1].strip()
                for r in rcpts:
                    if (mid, r) in seen:
                        dup += 1
                    seen.add((mid, r))
            elif ln.startswith(b"X-Client-Addr:"):
                rcpts, mid = [], None
    return len(seen), dup


def session_latency(port):
    t = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("probe.test")
        s.sendmail("probe@example.com", ["probe@probe.test"], b"Subject: probe\r\n\r\nx\r\n")
    return time.monotonic() - t


def count_events(log, word):
    return sum(1 for ln in log.lines() if word in ln)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-rel/engine/sluice")
    ap.add_argument("--messages", type=int, default=100000)
    ap.add_argument("--domains", type=int, default=10000)
    ap.add_argument("--big", type=int, default=100)
    ap.add_argument("--rcpts", type=int, default=1000)
    ap.add_argument("--big-domains", type=int, default=10)
    ap.add_argument("--size", type=int, default=300)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--idle", type=int, default=20)
    ap.add_argument("--probe", type=int, default=70, help="seconds of SMTP sessions during "
                    "the outage (more than site_hold: a rest ends in them)")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--spool", default="/var/tmp")
    ap.add_argument("--relay-conf", default="")
    ap.add_argument("--down", choices=("refuse", "421"), default="refuse",
                    help="the receiver during the outage: its port refuses connections, or "
                    "smtp-sink answers every connection 421")
    a = ap.parse_args()
    build = os.path.join(os.path.dirname(os.path.abspath(a.sluice)), "..")
    inj = os.path.join(build, "bench", "relay", "inject_synth")
    dns_bin = os.path.join(build, "bench", "relay", "dns_synth")
    ctl = os.path.join(build, "tools", "sluicectl")
    spool_tool = os.path.join(build, "tools", "sluice-spool")
    want = a.messages + a.big * a.rcpts
    print(f"bigqueue: {a.messages} messages x 1 rcpt over {a.domains} domains + {a.big} x "
          f"{a.rcpts} rcpts over {a.big_domains} domains = {want} recipients, {a.sluice}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    work = tempfile.mkdtemp(prefix="sluice-bigq-", dir=a.spool)
    wd = Workdir("sluice-bigq-")
    sink_port, port = free_port(), free_port()
    sock = f"{work}/stats.sock"
    dns = DnsSynth(mx_hosts=1, binary=dns_bin)
    conf = relay_conf(wd, a.sluice, work, port, sink_port, dns.port,
                      a.relay_conf.replace("\\n", "\n"))
    ctlq = [ctl, "-s", sock]
    procs, d = [], None
    try:
        s = sink(sink_port) if a.down == "421" else None
        if s is not None:
            procs.append(s)
        d = Daemon(a.sluice, conf)
        log = LogTail(f"{work}/sluice.log")
        wait_until(lambda: any(b"event=ready" in ln for ln in log.lines()), 60, "ready")
        # ---- outage
        t0 = time.monotonic()
        per = max(1, a.big // a.big_domains)
        src = [subprocess.Popen(["smtp-source", "-s", "1", "-m", str(per), "-r", str(a.rcpts),
                                 "-l", str(a.size), "-f", "bench@example.com",
                                 "-t", f"r@big{k}.test", f"127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for k in range(a.big_domains)]
        errors, _ = inject_c(inj, port, a.messages, a.sessions, a.size, a.domains)
        for p in src:
            p.wait(600)
        tinj = time.monotonic() - t0
        want = a.messages - len(errors) + per * a.big_domains * a.rcpts
        # refuse: every recipient is deferred at once (the site rests with
        # its mail deferred); 421: the rest keeps the mail waiting in memory
        idx = 1 if a.down == "refuse" else 0
        wait_until(lambda: (queue_counts(ctl, sock) or (0, 0))[idx] >= want, a.timeout,
                   "every recipient deferred" if idx else "every recipient queued")
        tdef = time.monotonic() - t0
        time.sleep(3)
        rss, anon = mem_kb(d.proc.pid)
        q = queue_counts(ctl, sock)
        print(f"outage: {want} recipients injected in {tinj:.1f} s, queued in {tdef:.1f} s, "
              f"{q[1]} deferred in the spool; RSS {rss / 1024:.1f} MB, RssAnon "
              f"{anon / 1024:.1f} MB ({anon * 1024 / want:.0f} B/recipient, ceiling: 0 held "
              f"for deferred ones)", flush=True)
        # ---- idle
        c0 = cpu_s(d.proc.pid)
        time.sleep(a.idle)
        c1 = cpu_s(d.proc.pid)
        print(f"idle: {c1 - c0:.2f} CPU s over {a.idle} s ({100 * (c1 - c0) / a.idle:.1f}% of a "
              f"core; ceiling: the due poll's 1/s)", flush=True)
        # SMTP sessions during the outage (a site's rest ends every
        # site_hold: what its waiting domains then do takes a turn)
        lat, probes = [], 0
        tp = time.monotonic()
        while time.monotonic() - tp < a.probe:
            try:
                lat.append(session_latency(port))
                probes += 1
            except (OSError, smtplib.SMTPException) as e:
                lat.append(float("inf"))
                print(f"outage: probe failed: {e}", flush=True)
            time.sleep(0.2)
        lat.sort()
        if lat:
            print(f"outage: SMTP session on the submission port, {len(lat)} probes over "
                  f"{a.probe} s: p50 {1000 * statistics.median(lat):.0f} ms, p99 "
                  f"{1000 * lat[int(0.99 * (len(lat) - 1))]:.0f} ms, max {1000 * lat[-1]:.0f} ms;"
                  f" queue {queue_counts(ctl, sock)} (recipients, deferred); RSS "
                  f"{mem_kb(d.proc.pid)[0] / 1024:.1f} MB", flush=True)
        want += probes
        # ---- ops
        for cmd in (["stats"], ["domains"], ["domains", "1000"], ["queue"], ["queue", "20"],
                    ["queue", "20", "big0.test"]):
            t, r = timed(ctlq + cmd)
            print(f"ops: sluicectl {' '.join(cmd)}: {t:.2f} s, rc {r.returncode}, "
                  f"{len(r.stdout)} B out", flush=True)
        print(f"ops: longest turn since start {longest_turn(ctl, sock)} (ms, turns >= 100 ms)",
              flush=True)
        # ---- restart: SIGTERM, then kill -9
        for how in ("SIGTERM", "kill -9"):
            t = time.monotonic()
            if how == "SIGTERM":
                d.stop(300)
            else:
                d.proc.kill()
                d.proc.wait()
            tstop = time.monotonic() - t
            for sub in ("count", "check"):
                t, r = timed([spool_tool, sub, f"{work}/spool"])
                print(f"restart ({how}): sluice-spool {sub}: {t:.2f} s rc {r.returncode} "
                      f"{r.stdout.strip()[:120]}", flush=True)
            log = LogTail(f"{work}/sluice.log")
            log.lines()  # skip what the last run wrote
            t = time.monotonic()
            d = Daemon(a.sluice, conf)
            ready = []
            wait_until(lambda: ready.extend(ln for ln in log.lines() if b"event=ready" in ln
                                            or b"spool_requeued" in ln) or
                       any(b"event=ready" in ln for ln in ready), 300, "ready")
            tstart = time.monotonic() - t
            rq = [ln for ln in ready if b"spool_requeued" in ln]
            rss, anon = mem_kb(d.proc.pid)
            c0 = cpu_s(d.proc.pid)
            time.sleep(a.idle)
            c1 = cpu_s(d.proc.pid)
            tried = count_events(log, b"event=deferred")
            rss2, anon2 = mem_kb(d.proc.pid)
            print(f"restart ({how}): stopped in {tstop:.2f} s, ready in {tstart:.2f} s, RSS "
                  f"{rss / 1024:.1f} MB (RssAnon {anon / 1024:.1f}), after {a.idle} s RSS "
                  f"{rss2 / 1024:.1f} (RssAnon {anon2 / 1024:.1f}), CPU {c1 - c0:.2f} s; "
                  f"recipients retried in those {a.idle} s: {tried} (ceiling 0); "
                  f"{rq[0].decode().split(' ', 2)[-1] if rq else 'no spool_requeued'}",
                  flush=True)
        # ---- drain
        if s is not None:
            s.kill()
            s.wait()
            procs.remove(s)
        # smtp-sink runs as nobody: a directory it may write in
        os.chmod(work, 0o711)
        os.mkdir(f"{work}/sink", 0o777)
        os.chmod(f"{work}/sink", 0o777)
        dump = f"{work}/sink/dump"
        procs.append(sink(sink_port, dump))
        log.lines()
        t0 = time.monotonic()
        t, r = timed(ctlq + ["flush"])
        print(f"drain: sluicectl flush {t:.2f} s: {r.stdout.strip()}", flush=True)
        lat, peak, peak_anon, probes = [], 0, 0, 0
        first = None
        while time.monotonic() - t0 < a.timeout:
            v, an = mem_kb(d.proc.pid)
            peak, peak_anon = max(peak, v), max(peak_anon, an)
            try:
                lat.append(session_latency(port))
                probes += 1
            except (OSError, smtplib.SMTPException) as e:
                lat.append(float("inf"))
                print(f"drain: probe failed: {e}", flush=True)
            if first is None and any(b"event=delivered" in ln for ln in log.lines()):
                first = time.monotonic() - t0
            q = queue_counts(ctl, sock)
            if q is not None and q[0] == 0:
                break
            time.sleep(0.2)
        tdrain = time.monotonic() - t0
        lat.sort()
        print(f"drain: first delivery after {first if first is None else round(first, 2)} s, "
              f"queue empty after {tdrain:.1f} s ({want / tdrain:.0f} rcpt/s); peak RSS "
              f"{peak / 1024:.1f} MB, RssAnon {peak_anon / 1024:.1f} MB "
              f"({peak_anon * 1024 / want:.0f} B/recipient)", flush=True)
        if lat:
            print(f"drain: SMTP session on the submission port, {len(lat)} probes: p50 "
                  f"{1000 * statistics.median(lat):.0f} ms, p99 "
                  f"{1000 * lat[int(0.99 * (len(lat) - 1))]:.0f} ms, max {1000 * lat[-1]:.0f} ms"
                  f" (ceiling: one loop turn)", flush=True)
        print(f"drain: longest turn since start {longest_turn(ctl, sock)}", flush=True)
        d.stop(300)
        d = None
        n, dup = sink_count(dump)
        print(f"drain: sink received {n} distinct (Message-ID, rcpt), {dup} duplicates; "
              f"expected {want + probes} (the queue's {want} + {probes} probes)", flush=True)
    finally:
        if d is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        for p in procs:
            p.kill()
            p.wait()
        dns.stop()
        wd.cleanup()
        if os.environ.get("KEEP_TMP") != "1":
            subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
