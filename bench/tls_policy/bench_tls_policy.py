#!/usr/bin/env python3
"""MTA-STS benchmark (issue 20), two figures, each beside its ceiling.

1. Relay rate with an MTA-STS policy cached beside no policy, in the same
   run (alternating, --rounds each): --messages one-recipient messages to
   sts.test (policy enforce, cached: fetched once before the first round)
   and to plain.test (no _mta-sts record), both delivered to the same
   receiving MX (a second sluice with a certificate from a test CA) over
   STARTTLS: verified (the policy) against
   opportunistic. The time runs from the first injection to the relay's
   last delivery (stats socket). Target: the policy run at >= 95% of the
   no-policy run.

2. Policy fetches per second at start with --domains cold domains (10,000
   by default): one sluice, dnsmasq with each domain's MX, _mta-sts TXT
   and mta-sts address, a Python HTTPS server answering every policy (SNI
   picks one of a few certificates, --per-cert names each: one
   certificate with 10,000 names is past what TLS clients take). The
   recipients arrive as 1,000-recipient messages; the rate is policies
   fetched over the time from the first check to the last (stats socket,
   `tlsrpt`). Ceiling: the same HTTPS server fetched by Python threads
   alone (--ceiling-fetches GETs, a new TLS connection each, as sluice
   makes them).

  bench/tls_policy/bench_tls_policy.py [--sluice build-rel/engine/sluice] [--messages 5000]
                                       [--rounds 3] [--domains 10000]

Run under chrt -f 80 on a shared machine. Never fails on a number.
"""
import argparse
import http.server
import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "integ"))
sys.path.insert(0, os.path.join(here, "..", "relay"))
import test_mta_sts as sts  # noqa: E402
from harness import Daemon, Workdir, free_port, wait_until  # noqa: E402
from bench_sites import inject  # noqa: E402


def ctl(sock, line):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(sock)
        s.sendall(line.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def sender_conf(wd, name, dns_port, mx_port, https_port, ca, extra=""):
    port = free_port()
    sock = os.path.join(wd.path, f"{name}.sock")
    conf = wd.file(f"{name}.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{port}
trusted_networks = 127.0.0.0/8
max_recipients = 1000
[queue]
path = {wd.path}/{name}-spool
map_size = 4G
[delivery]
remote_port = {mx_port}
allow_networks = 127.0.0.0/8
[tls]
ca_file = {ca}
[mta_sts]
ca_file = {ca}
fetch_port = {https_port}
[dns]
servers = 127.0.0.1:{dns_port}
[stats]
socket = {sock}
[bounce]
dsn = no
{extra}
""")
    return port, sock, conf


def delivered(sock):
    return ctl(sock, "stats")["counters"]["delivered"]


def relay_rate(a, wd):
    domains = {"sts.test": (sts.policy("enforce", "mx.good.test"), "mx.good.test", "1"),
               "plain.test": (None, "mx.good.test", None)}
    sts.DOMAINS.clear()
    sts.DOMAINS.update(domains)
    pki = sts.Pki(wd, ["mx.good.test", "mta-sts.sts.test"])
    https = sts.PolicyServer(pki, {"sts.test": domains["sts.test"][0]})
    dns = sts.Dns(wd, sts.records(https.port))
    mx_port = free_port()
    mx = d = None
    try:
        mx = sts.Receiver(wd, "mx", "127.0.0.1", mx_port, pki.cert, pki.key)
        port, sock, conf = sender_conf(wd, "relay", dns.port, mx_port, https.port, pki.ca)
        d = Daemon(a.sluice, conf)
        d.wait_log("event=ready")
        inject(port, ["warm@sts.test", "warm@plain.test"], 2, a.size)
        wait_until(lambda: delivered(sock) >= 2, 60, "the warm-up deliveries")
        results = []
        for r in range(a.rounds):
            for label, dom in (("no policy", "plain.test"), ("mta-sts enforce", "sts.test")):
                before = delivered(sock)
                rcpts = [f"r{r}-{i}@{dom}" for i in range(a.messages)]
                t0 = time.monotonic()
                inject(port, rcpts, a.sessions, a.size)
                wait_until(lambda: delivered(sock) >= before + a.messages, 600,
                           f"{a.messages} deliveries")
                results.append((label, a.messages / (time.monotonic() - t0)))
        st = ctl(sock, "tlsrpt")
        print(f"relay rate: {a.messages} messages of {a.size} B per run, {a.sessions} sessions, "
              f"{a.rounds} alternating rounds; receiver: sluice over STARTTLS")
        ratios = []
        for r in range(a.rounds):
            (l0, v0), (l1, v1) = results[2 * r], results[2 * r + 1]
            ratios.append(v1 / v0)
            print(f"  round {r + 1}: {l0} {v0:8.0f} msg/s (the ceiling), {l1} {v1:8.0f} msg/s = "
                  f"{100 * v1 / v0:.0f}%")
        ratios.sort()
        print(f"  median of the rounds: mta-sts enforce at {100 * ratios[len(ratios) // 2]:.0f}% "
              f"of no policy (target >= 95%); policy fetches during the runs: {st['fetches']}")
    finally:
        for p in (d, mx.d if mx else None):
            if p is not None:
                p.stop()
        https.stop()
        dns.stop()


class ManyPolicies:
    """HTTPS answering every mta-sts.dN.cold with one policy; SNI picks the
    certificate that names it."""

    def __init__(self, wd, pki_key, ca, ca_key, n, per_cert):
        body = sts.policy("testing", "mx.good.test").encode()
        self.ctxs = []
        for k in range(0, n, per_cert):
            names = [f"mta-sts.d{i}.cold" for i in range(k, min(n, k + per_cert))]
            ext = wd.file(f"ext{k}.cnf", "subjectAltName=" + ",".join(f"DNS:{x}" for x in names)
                          + "\nextendedKeyUsage=serverAuth\n")
            crt = os.path.join(wd.path, f"cold{k}.pem")
            sts.openssl("req", "-new", "-key", pki_key, "-subj", "/CN=cold", "-out",
                        f"{wd.path}/cold{k}.csr")
            sts.openssl("x509", "-req", "-in", f"{wd.path}/cold{k}.csr", "-CA", ca, "-CAkey",
                        ca_key, "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", crt)
            c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            c.load_cert_chain(crt, pki_key)
            self.ctxs.append(c)
        per = per_cert

        def pick(sock, name, _ctx):
            if name and name.startswith("mta-sts.d"):
                i = int(name.split(".")[1][1:])
                sock.context = self.ctxs[min(i // per, len(self.ctxs) - 1)]

        base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        base.load_cert_chain(os.path.join(wd.path, "cold0.pem"), pki_key)
        base.sni_callback = pick

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *x):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), H)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 1024
        # The handshake in the handler's thread, not in accept(): in parallel.
        self.httpd.socket = base.wrap_socket(self.httpd.socket, server_side=True,
                                             do_handshake_on_connect=False)
        self.t = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.t.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def ceiling(port, ca, n, threads=32):
    """GETs/s of the HTTPS server alone: new TLS connection per GET."""
    ctx = ssl.create_default_context(cafile=ca)
    done = [0]
    lock = threading.Lock()

    def worker(k):
        for i in range(k, n, threads):
            host = f"mta-sts.d{i}.cold"
            with socket.create_connection(("127.0.0.1", port)) as s:
                with ctx.wrap_socket(s, server_hostname=host) as t:
                    t.sendall(f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\n"
                              "Connection: close\r\n\r\n".encode())
                    while t.recv(65536):
                        pass
            with lock:
                done[0] += 1

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return done[0] / (time.monotonic() - t0)


def fetch_rate(a, wd):
    pki = sts.Pki(wd, ["mx.good.test"])
    srv = ManyPolicies(wd, pki.key, pki.ca, os.path.join(wd.path, "ca-key.pem"), a.domains,
                       a.per_cert)
    recs = ["host-record=mx.good.test,127.0.0.1"]
    for i in range(a.domains):
        recs += [f"mx-host=d{i}.cold,mx.good.test,10",
                 f'txt-record=_mta-sts.d{i}.cold,"v=STSv1; id=1"',
                 f"host-record=mta-sts.d{i}.cold,127.0.0.1"]
    recs[0:0] = ["local=/cold/"]
    dns = sts.Dns(wd, recs)
    mx_port = free_port()
    sys.path.insert(0, os.path.join(here, "..", "relay"))
    from bench_relay import sink
    sk = sink(mx_port)
    d = None
    try:
        c = ceiling(srv.port, pki.ca, min(a.ceiling_fetches, a.domains))
        port, sock, conf = sender_conf(wd, "cold", dns.port, mx_port, srv.port, pki.ca,
                                       f"[mta_sts]\nmax_fetches = {a.max_fetches}\n"
                                       "[domain *]\nmax_rcpt_per_txn = 1\n")
        d = Daemon(a.sluice, conf)
        d.wait_log("event=ready")
        rcpts = [f"u@d{i}.cold" for i in range(a.domains)]
        t_inj = time.monotonic()
        s = socket.create_connection(("127.0.0.1", port), timeout=120)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO bench\r\n")
        while f.readline()[3:4] == b"-":
            pass
        for k in range(0, len(rcpts), 1000):
            chunk = rcpts[k:k + 1000]
            s.sendall(b"MAIL FROM:<b@example.com>\r\n" +
                      b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in chunk) + b"DATA\r\n")
            for _ in range(len(chunk) + 1):
                f.readline()
            f.readline()
            s.sendall(b"Subject: cold\r\n\r\nx\r\n.\r\n")
            f.readline()
        s.close()
        t_first = t_last = None
        while True:
            st = ctl(sock, "tlsrpt")
            now = time.monotonic()
            if t_first is None and st["checks"] > 0:
                t_first = now
            if st["fetched"] + st["fetch_failed"] >= a.domains:
                t_last = now
                break
            if now - t_inj > 900:
                break
            time.sleep(0.05)  # a benchmark's sampling period, not synchronisation
        st = ctl(sock, "tlsrpt")
        el = (t_last or time.monotonic()) - (t_first or t_inj)
        print(f"policy fetches at start: {a.domains} cold domains, max_fetches "
              f"{a.max_fetches}, Python HTTPS server (SNI over {len(srv.ctxs)} certificates)")
        print(f"  HTTPS server alone (ceiling, {min(a.ceiling_fetches, a.domains)} GETs, 32 "
              f"threads, a TLS connection each): {c:8.0f} fetches/s")
        print(f"  sluice: {st['fetched']} fetched, {st['fetch_failed']} failed in {el:.1f} s: "
              f"{st['fetched'] / el:8.0f} fetches/s ({100 * st['fetched'] / el / c:.0f}% of the "
              f"ceiling)")
    finally:
        if d is not None:
            d.stop()
        sk.kill()
        sk.wait()
        srv.stop()
        dns.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-rel/engine/sluice")
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--domains", type=int, default=10000)
    ap.add_argument("--per-cert", type=int, default=500)
    ap.add_argument("--max-fetches", type=int, default=64)
    ap.add_argument("--ceiling-fetches", type=int, default=2000)
    ap.add_argument("--skip-relay", action="store_true")
    ap.add_argument("--skip-fetch", action="store_true")
    a = ap.parse_args()
    sts.SLUICE = a.sluice
    if shutil.which("dnsmasq") is None and not os.path.exists("/usr/sbin/dnsmasq"):
        sys.exit("dnsmasq is needed (tools/install-deps --test)")
    if not a.skip_relay:
        wd = Workdir("sluice-bench-sts-")
        try:
            relay_rate(a, wd)
        finally:
            wd.cleanup()
    if not a.skip_fetch:
        wd = Workdir("sluice-bench-cold-")
        try:
            fetch_rate(a, wd)
        finally:
            wd.cleanup()


if __name__ == "__main__":
    main()
