"""MTA-STS (RFC 8461) and TLS reporting (RFC 8460) against real servers on
loopback: dnsmasq serves the _mta-sts and _smtp._tls TXT records, the MX
records and the addresses; a Python HTTPS server (a test CA made here with
openssl) serves the policies and takes the reports; two sluice instances
are the receiving MX hosts, one with a certificate from the test CA
(127.0.0.1) and one with a self-signed certificate (127.0.0.2), on the
same port. Checks: enforce delivers to a matching MX over verified TLS
(also when the policy host's name has an MX record: its A record is
asked, RFC 8461 3.3) and defers (class tls_policy) against a bad certificate or an MX that
matches no pattern, and that receiver sees nothing; testing delivers and
counts the failure; an oversized, a slow and a redirecting policy server
are fetch failures that hang nothing; the cache survives a restart with
the policy server gone; a new TXT id fetches the policy again; the day's
TLS report is posted (gzip) and valid against RFC 8460's schema, and for
a rua with a mailto: address too it arrives by mail (through sluice's
own queue) at smtp-sink, the MX of reports.test (127.0.0.3), as RFC
8460 5.3 says: subject, TLS-Report-* fields, a multipart/report whose
application/tlsrpt+gzip attachment holds the same valid report, and
DKIM-signed (dkimpy verifies it) since the node signs for its From,
delivered in plaintext although reports.test has an enforce policy that
its MX does not match and tls = required, which hold ordinary mail there
(RFC 8460 3: reports go despite TLS failures); a
reload that turns [delivery] mta_sts on starts enforcing without a
restart; a policy in use is fetched again before its max_age ends; a
policy host whose first allowed address is down is fetched from the next;
a stop held by a report's commit that the spool does not answer names
that step.
sluice runs with https_proxy and all_proxy pointing at a listener on
127.0.0.9 (outside allow_networks), which nothing may connect to: a
fetch or report through it would have escaped the address checks."""
import email
import email.policy
import glob
import gzip
import http.server
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

from harness import (WAIT, Sluice, Workdir, dkimpy_verify, extra_env, free_port, log_fields, main,
                     run, skip, stats_ask, wait_until)
from spool_lock import SpoolWriteLock, have_mdb_load, writer_waits_for_lock  # tests/support

sys.path.append("/usr/lib/python3/dist-packages")  # Debian's python3-dkim under another python
try:
    import dkim
    import dns.resolver
except ImportError:
    dkim = None

SLUICE = sys.argv[1] if len(sys.argv) > 1 else None  # bench/tls_policy imports this file

MX_GOOD = "127.0.0.1"
MX_BAD = "127.0.0.2"
MX_REPORTS = "127.0.0.3"
TRAP = "127.0.0.9"  # listens, outside allow_networks: nothing may connect to it
PROXY_VARS = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")  # set to the trap


def connectable(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def openssl(*args):
    r = run(["openssl", *args])
    assert r.returncode == 0, r.stderr
    return r


class Pki:
    """A test CA, a certificate it signs for the policy server and the
    good MX (all their names, and 127.0.0.1 for the report URL), and a
    self-signed one for the bad MX."""

    def __init__(self, wd, names):
        p = wd.path
        self.ca = f"{p}/ca.pem"
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=sluice test CA", "-keyout", f"{p}/ca-key.pem", "-out", self.ca,
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        san = ",".join([f"DNS:{n}" for n in names] + ["IP:127.0.0.1"])
        ext = wd.file("ext.cnf", f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                                 "extendedKeyUsage=serverAuth\n")
        self.key, self.cert = f"{p}/srv-key.pem", f"{p}/srv.pem"
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=sluice test server",
                "-keyout", self.key, "-out", f"{p}/srv.csr")
        openssl("x509", "-req", "-in", f"{p}/srv.csr", "-CA", self.ca, "-CAkey",
                f"{p}/ca-key.pem", "-CAcreateserial", "-days", "2", "-extfile", ext,
                "-out", self.cert)
        self.bad_key, self.bad_cert = f"{p}/bad-key.pem", f"{p}/bad.pem"
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=mx.bad.test", "-addext", "subjectAltName=DNS:mx.bad.test",
                "-keyout", self.bad_key, "-out", self.bad_cert)


class PolicyServer:
    """HTTPS on 127.0.0.1: GET /.well-known/mta-sts.txt answers by the Host
    header from `policies` (a str, or "big", "slow", "redirect", "html");
    POST stores the report (and its answer waits while post_gate is an
    Event not set). A slow answer waits on an event that stop() sets, so
    no thread outlives the test."""

    def __init__(self, pki, policies):
        self.policies = policies
        self.reports = []
        self.gets = []
        self.release = threading.Event()
        self.post_gate = None
        self.cv = threading.Condition()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                host = self.headers.get("Host", "").split(":")[0]
                with server.cv:
                    server.gets.append(host)
                    server.cv.notify_all()
                pol = server.policies.get(host.removeprefix("mta-sts."))
                if self.path != "/.well-known/mta-sts.txt" or pol is None:
                    return self.answer(404, b"no\n")
                if pol == "slow":
                    server.release.wait(WAIT)
                    return self.answer(200, b"version: STSv1\nmode: enforce\n")
                if pol == "redirect":
                    self.send_response(302)
                    self.send_header("Location", f"https://{host}/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if pol == "big":
                    body = b"version: STSv1\nmode: enforce\nmx: mx.good.test\nmax_age: 86400\n"
                    return self.answer(200, body + b"#" * 70000 + b"\n")
                if pol == "html":  # a type that would forge log keys, were it unquoted
                    return self.answer(200, pol.encode(), 'text/html user=root "event=x"')
                return self.answer(200, pol.encode())

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                with server.cv:
                    server.reports.append((self.path, self.headers.get("Content-Type"), body))
                    server.cv.notify_all()
                    gate = server.post_gate
                if gate is not None:
                    gate.wait(WAIT)
                self.answer(200, b"thanks\n")

            def answer(self, code, body, ctype="text/plain; charset=utf-8"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (the slow policy): as expected

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.cert, pki.key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        wait_until(lambda: connectable(self.port), WAIT, "the policy server to listen")

    def gets_for(self, host):
        with self.cv:
            return self.gets.count(host)

    def stop(self):
        self.release.set()
        if self.post_gate is not None:
            self.post_gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


class Dns:
    """dnsmasq on its own port with the records given as config lines;
    restart() reads new ones on the same port."""

    def __init__(self, wd, records):
        self.wd = wd
        self.port = free_port(kind=socket.SOCK_DGRAM)
        self.proc = None
        self.start(records)

    def start(self, records):
        conf = self.wd.file("dnsmasq.conf", "\n".join(["local=/test/", *records]) + "\n")
        for _ in range(50):
            self.proc = subprocess.Popen(
                ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "-u", "root",
                 f"--conf-file={conf}", f"--port={self.port}", "--listen-address=127.0.0.1",
                 "--bind-interfaces", "--log-facility=/dev/null"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until(lambda: self.ready() or self.proc.poll() is not None, 10,
                       "dnsmasq to answer")
            if self.proc.poll() is None:
                return
        raise AssertionError("dnsmasq would not start")

    def ready(self):
        q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05probe\x04test\x00\x00\x01\x00\x01"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            try:
                s.sendto(q, ("127.0.0.1", self.port))
                return s.recv(512)[:2] == b"\x12\x34"
            except OSError:
                return False

    def restart(self, records):
        self.stop()
        self.start(records)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def a_records(port, name):
    """The A records dnsmasq on port answers for name, in its order."""
    qname = b"".join(bytes([len(x)]) + x.encode() for x in name.split(".")) + b"\0"
    q = b"\x43\x21\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + qname + b"\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(WAIT)
        s.sendto(q, ("127.0.0.1", port))
        r = s.recv(4096)
    assert r[:2] == b"\x43\x21", r
    pos, out = 12 + len(qname) + 4, []
    for _ in range(int.from_bytes(r[6:8], "big")):
        while r[pos] != 0 and r[pos] & 0xC0 != 0xC0:
            pos += 1 + r[pos]
        pos += 2 if r[pos] & 0xC0 == 0xC0 else 1
        rtype, rdlen = int.from_bytes(r[pos:pos + 2], "big"), int.from_bytes(r[pos + 8:pos + 10],
                                                                             "big")
        if rtype == 1:
            out.append(socket.inet_ntoa(r[pos + 10:pos + 14]))
        pos += 10 + rdlen
    return out


def policy(mode, *mx, max_age=86400):
    return "version: STSv1\r\nmode: %s\r\n%smax_age: %d\r\n" % (
        mode, "".join(f"mx: {m}\r\n" for m in mx), max_age)


# domain: (policy served, MX host, TXT id)
DOMAINS = {
    "enforce.test": (policy("enforce", "mx.good.test"), "mx.good.test", "1"),
    "wild.test": (policy("enforce", "*.good.test"), "mx.good.test", "1"),
    "badcert.test": (policy("enforce", "mx.bad.test"), "mx.bad.test", "1"),
    "nomatch.test": (policy("enforce", "*.elsewhere.test"), "mx.good.test", "1"),
    "testing.test": (policy("testing", "mx.bad.test"), "mx.bad.test", "1"),
    "testing2.test": (policy("testing", "mx.bad.test"), "mx.bad.test", "1"),
    "big.test": ("big", "mx.bad.test", "1"),
    "slow.test": ("slow", "mx.bad.test", "1"),
    "redirect.test": ("redirect", "mx.bad.test", "1"),
    "html.test": ("html", "mx.bad.test", "1"),
    "plain.test": (None, "mx.good.test", None),
    "short.test": (policy("enforce", "mx.good.test", max_age=10), "mx.good.test", "1"),
    # its policy host mta-sts.mxhost.test has an MX record as well (a
    # wildcard MX at a hosting provider does that): its A record counts
    "mxhost.test": (policy("enforce", "mx.good.test"), "mx.good.test", "1"),
    # its policy host has the addresses of POLICY_ADDRS
    "twoaddr.test": (policy("enforce", "mx.good.test"), "mx.good.test", "1"),
}
# Policy hosts with several addresses, in the order of the answer: the
# trap (outside allow_networks: never to be connected to), the bad MX
# (allowed, but nothing listens on the policy port there: refused), then
# the policy server.
POLICY_ADDRS = {"twoaddr.test": [TRAP, MX_BAD, "127.0.0.1"]}
# The domain of the mailto: reports: an enforce policy its MX (smtp-sink,
# no STARTTLS) does not match, so that only the reports' exemption from
# the recipient domain's TLS policy (RFC 8460 3) lets mail through.
REPORTS_POLICY = policy("enforce", "*.elsewhere.test")


def records(report_port, ids=None, trap_port=None):
    ids = ids or {}
    recs = [f"host-record=mx.good.test,{MX_GOOD}", f"host-record=mx.bad.test,{MX_BAD}"]
    for dom, (pol, mx, txt_id) in DOMAINS.items():
        recs.append(f"mx-host={dom},{mx},10")
        if txt_id is not None:
            recs.append(f'txt-record=_mta-sts.{dom},"v=STSv1; id={ids.get(dom, txt_id)}"')
            if dom in POLICY_ADDRS:
                # dnsmasq answers address= lines the last first (a
                # host-record's addresses rotate): test_policy_host_addresses
                # checks the order it got
                recs += [f"address=/mta-sts.{dom}/{a}" for a in reversed(POLICY_ADDRS[dom])]
            else:
                recs.append(f"host-record=mta-sts.{dom},127.0.0.1")
    recs.append("mx-host=mta-sts.mxhost.test,mx.bad.test,10")
    recs.append(f'txt-record=_smtp._tls.testing.test,"v=TLSRPTv1; '
                f'rua=https://127.0.0.1:{report_port}/report"')
    # and a third to an address outside allow_networks: refused, never
    # connected to (a domain must not make the node POST to its own
    # loopback or link-local services)
    trap = f",https://{TRAP}:{trap_port}/refused" if trap_port else ""
    recs.append(f'txt-record=_smtp._tls.badcert.test,"v=TLSRPTv1;rua=mailto:tlsrpt@reports.test,'
                f'https://127.0.0.1:{report_port}/bad{trap}"')
    # two TLSRPTv1 records: RFC 8460 3, no reporting at all
    for k in (1, 2):
        recs.append(f'txt-record=_smtp._tls.enforce.test,"v=TLSRPTv1; '
                    f'rua=https://127.0.0.1:{report_port}/two{k}"')
    recs.append("mx-host=reports.test,mx.reports.test,10")
    recs.append(f"host-record=mx.reports.test,{MX_REPORTS}")
    recs.append('txt-record=_mta-sts.reports.test,"v=STSv1; id=1"')
    recs.append("host-record=mta-sts.reports.test,127.0.0.1")
    return recs


class Sink:
    """smtp-sink on addr:port writing each message to a file in dir."""

    def __init__(self, wd, addr, port):
        self.dir = os.path.join(wd.path, "sink")
        os.chmod(wd.path, 0o755)
        os.makedirs(self.dir, mode=0o777)
        os.chmod(self.dir, 0o777)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(["smtp-sink", *user, "-d", f"{self.dir}/%M.",
                                      f"{addr}:{port}", "10"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.proc.poll() is not None or connectable(port, addr), WAIT,
                   "smtp-sink")
        assert self.proc.poll() is None, "smtp-sink exited"

    def messages(self):
        out = []
        for path in sorted(glob.glob(f"{self.dir}/*")):
            with open(path, "rb") as f:
                out.append(f.read())
        return out

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Receiver:
    """A sluice that accepts mail on addr:port with STARTTLS."""

    def __init__(self, wd, name, addr, port, cert, key):
        conf = wd.file(f"{name}.conf", f"""
[server]
workers = 1
listen = {addr}:{port}
trusted_networks = 127.0.0.0/8
[queue]
path = {wd.path}/{name}-spool
map_size = 64M
[delivery]
enabled = no
[tls]
cert_file = {cert}
key_file = {key}
""")
        self.d = Sluice(SLUICE, conf)
        self.d.wait_log("event=ready")

    def got_from(self, sender):
        return self.d.count_log(f"event=queued") and self.d.count_log(f"from=<{sender}>")


class World:
    def __init__(self, delivery_extra="", dkim_key=False, mta_sts_extra=""):
        for tool in ("dnsmasq", "openssl"):
            if run(["which", tool]).returncode != 0 and not os.path.exists(f"/usr/sbin/{tool}"):
                skip(f"{tool} not installed (tools/install-deps --test)")
        self.wd = Workdir("sluice-sts-")
        self.dns = self.https = self.good = self.bad = self.d = self.sink = None
        self.trap = socket.socket()
        try:
            self.trap.bind((TRAP, 0))
            self.trap.listen(8)
            self.trap.setblocking(False)
            names = ["mx.good.test", "mta-sts.reports.test"] + [f"mta-sts.{d}" for d in DOMAINS]
            self.pki = Pki(self.wd, names)
            self.https = PolicyServer(self.pki, {"reports.test": REPORTS_POLICY,
                                                 **{d: v[0] for d, v in DOMAINS.items() if v[0]}})
            self.dns = Dns(self.wd, records(self.https.port,
                                            trap_port=self.trap.getsockname()[1]))
            self.mx_port = free_port()
            self.good = Receiver(self.wd, "good", MX_GOOD, self.mx_port, self.pki.cert,
                                 self.pki.key)
            self.bad = Receiver(self.wd, "bad", MX_BAD, self.mx_port, self.pki.bad_cert,
                                self.pki.bad_key)
            self.sink = Sink(self.wd, MX_REPORTS, self.mx_port)
            dkim_conf = ""
            if dkim_key:
                key = os.path.join(self.wd.path, "dkim.pem")
                openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                        "-out", key)
                dkim_conf = f"[dkim sender.test rpt]\nkey_file = {key}\n"
            self.port = free_port()
            self.sock = os.path.join(self.wd.path, "sluice.sock")
            self.dlog = os.path.join(self.wd.path, "delivery.jsonl")
            self.conf = self.wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{self.port}
trusted_networks = 127.0.0.0/8
hostname = sender.test
[queue]
path = {self.wd.path}/spool
map_size = 128M
[delivery]
remote_port = {self.mx_port}
allow_networks = {MX_GOOD}, {MX_BAD}, {MX_REPORTS}
connect_timeout = 2s
idle_timeout = 1s
{delivery_extra}
[tls]
ca_file = {self.pki.ca}
[mta_sts]
ca_file = {self.pki.ca}
# the policy server's port: a test-only override of 443
fetch_port = {self.https.port}
fetch_timeout = 2s
recheck = 1s
{mta_sts_extra}
[dns]
servers = 127.0.0.1:{self.dns.port}
[stats]
socket = {self.sock}
[log]
delivery_log = {self.dlog}
delivery_log_flush = 10ms
[bounce]
dsn = no
{dkim_conf}""")
            if dkim_key:
                r = run([SLUICE, "-c", self.conf, "--dkim-dns", "sender.test", "rpt"])
                assert r.returncode == 0, r.stderr
                line = [x for x in r.stdout.splitlines() if not x.startswith(";")][0]
                strings = re.findall(r'"([^"]*)"', line)
                self.dns.restart(records(self.https.port,
                                         trap_port=self.trap.getsockname()[1]) + [
                    "txt-record=rpt._domainkey.sender.test," +
                    ",".join(f'"{x}"' for x in strings)])
            self.start()
        except BaseException:
            self.close()
            raise

    def start(self, stdout=subprocess.DEVNULL):
        # A proxy in sluice's environment points at the trap: policy
        # fetches and report posts must not go through it (the addresses
        # allow_networks checks would be the proxy's).
        with extra_env({k: f"http://{TRAP}:{self.trap.getsockname()[1]}" for k in PROXY_VARS}):
            self.d = Sluice(SLUICE, self.conf, stdout=stdout)
        self.d.wait_log("event=ready")

    def send(self, rcpt, sender=None):
        dom = rcpt.split("@")[1]
        sender = sender or f"s-{dom.split('.')[0]}@example.com"
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        f = s.makefile("rb")
        try:
            assert f.readline().startswith(b"220")
            s.sendall(b"EHLO tester\r\n")
            while f.readline()[3:4] == b"-":
                pass
            s.sendall(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (sender.encode(),
                                                                       rcpt.encode()))
            for _ in range(2):
                assert f.readline().startswith(b"250")
            assert f.readline().startswith(b"354")
            s.sendall(b"Subject: sts\r\n\r\nto %s\r\n.\r\n" % dom.encode())
            assert f.readline().startswith(b"250")
            s.sendall(b"QUIT\r\n")
        finally:
            s.close()
        return sender

    def outcome(self, rcpt, n=1):
        """The n-th outcome line (delivered or deferred) of rcpt."""
        def got():
            lines = [x for x in self.d.log_lines(f"rcpt=<{rcpt}>")
                     if "event=delivered" in x or "event=deferred" in x or "event=bounced" in x]
            return lines[n - 1] if len(lines) >= n else None
        return wait_until(got, WAIT, f"an outcome for {rcpt}")

    def ctl(self, line):
        return stats_ask(self.sock, line, WAIT)

    def close(self):
        try:
            if self.d is not None and self.d.proc.poll() is None:
                self.d.stop_clean()
        finally:
            for r in (self.good, self.bad):
                if r is not None and r.d.proc.poll() is None:
                    r.d.stop_clean()
            for p in (self.https, self.dns, self.sink):
                if p is not None:
                    p.stop()
            self.trap.close()
            self.wd.cleanup()


def dlog_records(path, rcpt):
    with open(path) as f:
        return [json.loads(x) for x in f if f'"rcpt":"{rcpt}"' in x]


def wait_dlog_records(path, rcpt, event):
    """rcpt's records once one of them is event: the delivery log's file
    is written by a thread of its own, every flush interval, after the
    daemon log's line of the outcome may have been read."""
    return wait_until(lambda: (lambda rec: rec if any(r["event"] == event for r in rec)
                               else None)(dlog_records(path, rcpt)),
                      WAIT, f"the delivery log's {event} record of {rcpt}")


# RFC 8460 4.4, written out as a JSON Schema (draft 7 vocabulary) and
# checked by check_schema below (no library needed for this much).
REPORT_SCHEMA = {
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string"},
        "date-range": {"type": "object", "required": ["start-datetime", "end-datetime"],
                       "properties": {"start-datetime": {"type": "string", "format": "date-time"},
                                      "end-datetime": {"type": "string",
                                                       "format": "date-time"}}},
        "contact-info": {"type": "string"},
        "report-id": {"type": "string"},
        "policies": {"type": "array", "items": {
            "type": "object", "required": ["policy", "summary"],
            "properties": {
                "policy": {"type": "object", "required": ["policy-type", "policy-domain"],
                           "properties": {
                               "policy-type": {"type": "string",
                                               "enum": ["tlsa", "sts", "no-policy-found"]},
                               "policy-string": {"type": "array", "items": {"type": "string"}},
                               "policy-domain": {"type": "string"},
                               "mx-host": {"type": "array", "items": {"type": "string"}}}},
                "summary": {"type": "object",
                            "required": ["total-successful-session-count",
                                         "total-failure-session-count"],
                            "properties": {
                                "total-successful-session-count": {"type": "integer"},
                                "total-failure-session-count": {"type": "integer"}}},
                "failure-details": {"type": "array", "items": {
                    "type": "object", "required": ["result-type", "failed-session-count"],
                    "properties": {
                        "result-type": {"type": "string", "enum": [
                            "starttls-not-supported", "certificate-host-mismatch",
                            "certificate-expired", "certificate-not-trusted",
                            "validation-failure", "tlsa-invalid", "dnssec-invalid",
                            "dane-required", "sts-policy-fetch-error", "sts-policy-invalid",
                            "sts-webpki-invalid"]},
                        "sending-mta-ip": {"type": "string"},
                        "receiving-mx-hostname": {"type": "string"},
                        "receiving-mx-helo": {"type": "string"},
                        "receiving-ip": {"type": "string"},
                        "failed-session-count": {"type": "integer"},
                        "additional-information": {"type": "string"},
                        "failure-reason-code": {"type": "string"}}}}}}},
    },
}
DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def check_schema(v, s, where="$"):
    t = s.get("type")
    types = {"object": dict, "array": list, "string": str, "integer": int}
    if t is not None:
        assert isinstance(v, types[t]) and not isinstance(v, bool), f"{where}: not {t}: {v!r}"
    if "enum" in s:
        assert v in s["enum"], f"{where}: {v!r} not one of {s['enum']}"
    if s.get("format") == "date-time":
        assert DATETIME.match(v), f"{where}: not an RFC 3339 date-time: {v!r}"
    if t == "integer":
        assert v >= 0, f"{where}: negative"
    for k in s.get("required", []):
        assert k in v, f"{where}: no {k}"
    for k, sub in s.get("properties", {}).items():
        if isinstance(v, dict) and k in v:
            check_schema(v[k], sub, f"{where}.{k}")
    if t == "array":
        for i, x in enumerate(v):
            check_schema(x, s["items"], f"{where}[{i}]")


def check_report_mail(raw, domain, submitter):
    """A TLS report by mail as RFC 8460 5.3 has it; returns the report."""
    # smtp-sink -d writes its own trace lines first: the message follows
    # the first Received field sluice's delivery does not add, so start at
    # the first field of the message proper.
    at = raw.find(b"From: ")
    assert at >= 0, raw[:500]
    msg = email.message_from_bytes(raw[at:], policy=email.policy.default)
    subj = msg["Subject"]
    m = re.fullmatch(r"Report Domain: (\S+) Submitter: (\S+) Report-ID: <([^<>@\s]+@[^<>@\s]+)>",
                     subj)
    assert m and m.group(1) == domain and m.group(2) == submitter, subj
    assert msg["TLS-Report-Domain"] == domain, msg["TLS-Report-Domain"]
    assert msg["TLS-Report-Submitter"] == submitter, msg["TLS-Report-Submitter"]
    assert msg["From"].addresses[0].addr_spec == f"postmaster@{submitter}", msg["From"]
    assert msg["To"].addresses[0].addr_spec == "tlsrpt@reports.test", msg["To"]
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert msg.get_param("report-type") == "tlsrpt", msg["Content-Type"]
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/tlsrpt+gzip"], \
        [p.get_content_type() for p in parts]
    att = parts[1]
    assert att["Content-Transfer-Encoding"] == "base64", att["Content-Transfer-Encoding"]
    name = att.get_filename()
    fm = re.fullmatch(r"([^!]+)!([^!]+)!(\d+)!(\d+)(![0-9A-Za-z]+)?\.json\.gz", name or "")
    assert fm and fm.group(1) == submitter and fm.group(2) == domain, name
    assert int(fm.group(4)) - int(fm.group(3)) == 86399, name
    rep = json.loads(gzip.decompress(att.get_content()))
    check_schema(rep, REPORT_SCHEMA)
    pol = rep["policies"][0]
    assert pol["policy"]["policy-domain"] == domain, rep
    assert rep["report-id"] == m.group(3), (rep["report-id"], subj)
    return rep


def test_enforce_testing_fetch_failures_cache_and_reports():
    # reports.test: an MTA-STS enforce policy that its MX does not match,
    # and TLS required by the config; smtp-sink offers no STARTTLS.
    w = World(dkim_key=True, delivery_extra="[domain reports.test]\ntls = required\n")
    try:
        # enforce, an MX that matches (exactly, then by wildcard), a
        # certificate from the CA: delivered over verified TLS; also when
        # the policy host's name has an MX record beside its address.
        for rcpt in ("a@enforce.test", "a@wild.test", "a@mxhost.test"):
            sender = w.send(rcpt)
            line = w.outcome(rcpt)
            assert "event=delivered" in line, line
            assert "tls_policy=mta-sts" in line and 'tls_verify="ok"' in line, line
            wait_until(lambda: w.good.d.count_log(f"from=<{sender}>"), WAIT,
                       f"the good MX to take {rcpt}")
        line = w.d.wait_log("event=mta_sts_checked domain=mxhost.test result=")
        assert "result=fetched mode=enforce" in line, line
        assert w.https.gets_for("mta-sts.mxhost.test") == 1
        rec = wait_dlog_records(w.dlog, "a@enforce.test", "delivery")
        assert rec and rec[-1]["tls_policy"] == "mta-sts" and rec[-1]["tls_verify"] == "ok", rec

        # enforce against a self-signed certificate: deferred, class
        # tls_policy, and the receiver got nothing (no plaintext retry).
        sender = w.send("a@badcert.test")
        line = w.outcome("a@badcert.test")
        assert "event=deferred" in line and "class=tls_policy" in line, line
        assert "tls_policy=mta-sts" in line and 'tls_verify="-"' not in line, line
        # enforce with no MX matching: deferred without a connection.
        w.send("a@nomatch.test")
        line = w.outcome("a@nomatch.test")
        assert "event=deferred" in line and "class=tls_policy" in line, line
        assert "MTA-STS" in line and "enhanced=4.7.5" in line, line

        # testing: delivered to the bad certificate anyway, and counted.
        sender_t = w.send("a@testing.test")
        line = w.outcome("a@testing.test")
        assert "event=delivered" in line and "tls_policy=mta-sts" in line, line
        assert 'tls_verify="ok"' not in line, line
        wait_until(lambda: w.bad.d.count_log(f"from=<{sender_t}>"), WAIT, "testing at the bad MX")
        assert w.bad.d.count_log(f"from=<{sender}>") == 0, "enforce mail reached a bad cert"
        assert w.good.d.count_log("from=<s-nomatch@example.com>") == 0

        # Oversized, slow, redirected and mistyped policies: fetch failures
        # (the domain has no policy yet), delivered as before, nothing hangs.
        for dom, why in (("big", "larger than"), ("slow", "imeout"),
                         ("redirect", "redirects are refused"), ("html", "not text/plain")):
            w.send(f"a@{dom}.test")
            line = w.d.wait_log(f"event=mta_sts_checked domain={dom}.test result=fetch_failed")
            assert why in line, line
            keys = [k for k, _ in log_fields(line) if k != "thread"]
            assert keys == ["level", "event", "domain", "result", "mode", "id", "reason"], \
                (keys, line)
            out = w.outcome(f"a@{dom}.test")
            assert "event=delivered" in out and "tls_policy=opportunistic" in out, out
        # No policy at all: as before.
        out = w.outcome(w.send("a@plain.test") and "a@plain.test")
        assert "event=delivered" in out and "tls_policy=opportunistic" in out, out
        # Ordinary mail to reports.test waits: no MX matches its policy.
        out = w.outcome(w.send("a@reports.test") and "a@reports.test")
        assert "event=deferred" in out and "class=tls_policy" in out, out

        # TLS report: flushed now; one report per policy domain with an
        # https rua, gzip, valid against RFC 8460's schema.
        ans = w.ctl("tlsrpt flush")
        assert ans.get("ok") is not False, ans
        wait_until(lambda: len([r for r in w.https.reports if r[0] == "/report"]) >= 1, WAIT,
                   "the testing.test report")
        wait_until(lambda: len([r for r in w.https.reports if r[0] == "/bad"]) >= 1, WAIT,
                   "the badcert.test report")
        # its third address is refused at connect: a line says so, and the
        # listener there was never connected to
        line = w.d.wait_log(f"event=tlsrpt_refused domain=badcert.test addr={TRAP}:")
        assert 'reason="loopback address, not in [delivery] allow_networks"' in line, line
        w.d.wait_log(f"event=tlsrpt_post domain=badcert.test url=https://{TRAP}:")
        # Once its transfers end, each day is done: sent (an address took
        # it), not left waiting on posts that finished.
        for dom in ("testing.test", "badcert.test"):
            w.d.wait_log(f"event=tlsrpt_sent domain={dom} day=", timeout=20)
        try:
            conn, peer = w.trap.accept()
            conn.close()
            raise AssertionError(f"the refused report address was connected to from {peer}")
        except BlockingIOError:
            pass
        for path, ctype, body in w.https.reports:
            assert ctype == "application/tlsrpt+gzip", ctype
            rep = json.loads(gzip.decompress(body))
            check_schema(rep, REPORT_SCHEMA)
            pol = rep["policies"][0]
            if path == "/report":
                assert pol["policy"]["policy-domain"] == "testing.test", rep
                assert pol["policy"]["policy-type"] == "sts", rep
                assert "mode: testing" in pol["policy"]["policy-string"], rep
                assert pol["summary"]["total-failure-session-count"] >= 1, rep
                kinds = {d["result-type"] for d in pol["failure-details"]}
                assert kinds & {"certificate-not-trusted", "certificate-host-mismatch"}, rep
            else:
                assert pol["policy"]["policy-domain"] == "badcert.test", rep
                assert pol["summary"]["total-failure-session-count"] >= 1, rep
        # The mailto: address of badcert.test's rua got it by mail, through
        # the queue: a reception, then a delivery to reports.test's MX, in
        # plaintext despite reports.test's enforce policy and tls =
        # required (RFC 8460 3: reports are delivered despite TLS failures).
        line = w.d.wait_log("event=tlsrpt_mailed domain=badcert.test day=")
        assert "to=<tlsrpt@reports.test>" in line, line
        # smtp-sink creates its file at MAIL and has it whole at the final
        # dot, before its 250: read once sluice logged the delivery
        out = w.outcome("tlsrpt@reports.test")
        assert "event=delivered" in out and "tls_policy=relaxed" in out, out
        assert 'tls="none"' in out, out
        msgs = w.sink.messages()
        assert len(msgs) == 1, msgs  # the report only: a@reports.test still waits
        check_report_mail(msgs[0], "badcert.test", "sender.test")
        # Signed: the node signs for sender.test, the report's From domain.
        raw = msgs[0].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # smtp-sink writes LF
        assert b"\r\nDKIM-Signature: " in raw or raw.startswith(b"DKIM-Signature: "), raw[:800]
        if dkim is not None:
            at = raw.find(b"DKIM-Signature: ")
            assert dkimpy_verify(raw[at:], w.dns.port) == [("sender.test", "rpt", True)], raw[:1500]
        rec = wait_dlog_records(w.dlog, "tlsrpt@reports.test", "delivery")
        kinds = [r["event"] for r in rec]
        assert "reception" in kinds and "delivery" in kinds, rec
        recv = [r for r in rec if r["event"] == "reception"][0]
        assert recv["report"] == "tlsrpt" and recv["sender"] == "postmaster@sender.test", recv
        assert [(x["d"], x["s"]) for x in recv["dkim"]] == [("sender.test", "rpt")], recv
        st = w.ctl("tlsrpt")
        # Two reports went out (testing.test's and badcert.test's); the
        # days of domains without a _smtp._tls record are no report sent.
        assert st["reports_sent"] == 2 and st["enforce"] >= 4, st
        assert w.d.count_log("event=tlsrpt_sent domain=enforce.test") == 0
        # enforce.test has two TLSRPTv1 records: not one, so no report
        line = w.d.wait_log("event=tlsrpt_no_record domain=enforce.test")
        assert 'reason="several TLSRPTv1 records"' in line, line
        assert not [r for r in w.https.reports if r[0].startswith("/two")], w.https.reports

        # The cache survives a restart with the policy server gone: still
        # enforced (no fetch needed while the TXT id stays).
        w.d.stop_clean()
        w.https.stop()
        w.https = None
        w.start()
        w.send("b@badcert.test")
        line = w.outcome("b@badcert.test")
        assert "event=deferred" in line and "class=tls_policy" in line, line
        w.d.wait_log("event=mta_sts_cache_loaded")
        assert "policies=" in w.d.wait_log("event=mta_sts_cache_loaded")
        # A new id with the server still gone: the fetch fails and the
        # cached enforce policy stays (RFC 8461 5.1).
        # (A domain's TXT record is asked again when mail for it comes,
        # at most every recheck: this message makes the check.)
        w.dns.restart(records(0, {"badcert.test": "2"}))
        w.send("c@badcert.test")
        w.d.wait_log("event=mta_sts_checked domain=badcert.test result=fetch_failed")
        line = w.outcome("c@badcert.test")
        assert "event=deferred" in line and "class=tls_policy" in line, line
        assert w.bad.d.count_log("from=<s-badcert@example.com>") == 0
    finally:
        w.close()


def test_policy_id_change_fetches_again():
    """A new TXT id fetches the policy again: enforce.test moves from
    mx.good.test to a pattern its MX does not match, and is deferred."""
    w = World()
    try:
        w.send("a@enforce.test")
        assert "event=delivered" in w.outcome("a@enforce.test")
        assert w.https.gets_for("mta-sts.enforce.test") == 1
        w.https.policies["enforce.test"] = policy("enforce", "mx.moved.test")
        w.dns.restart(records(w.https.port, {"enforce.test": "20261202"}))
        # Mail makes the check (the TXT record is asked again at most every
        # recheck, 1 s here, in the background: a message may still go
        # under the old policy meanwhile). Mail until one is refused.
        line = None
        deadline = time.monotonic() + WAIT
        for i in range(10000):
            if time.monotonic() > deadline:
                break
            rcpt = f"m{i}@enforce.test"
            w.send(rcpt)
            line = w.outcome(rcpt)
            if "event=deferred" in line:
                break
            assert "event=delivered" in line, line
        assert "event=deferred" in line and "class=tls_policy" in line, (
            line, w.d.log_lines("domain=enforce.test result="))
        fetched = w.d.log_lines("domain=enforce.test result=fetched")
        assert len(fetched) == 2 and "id=20261202" in fetched[-1], fetched
        assert w.https.gets_for("mta-sts.enforce.test") == 2
    finally:
        w.close()


def test_policy_refreshed_before_it_ends():
    """RFC 8461 3.3: short.test's policy lives 10 s; mail used it, so the
    MTA-STS thread fetches it again before it ends (no mail needed then),
    and a message after the first policy's end still goes under a policy
    (without the refresh its check would find it expired and deliver
    opportunistically while the fetch runs)."""
    w = World()
    try:
        w.send("a@short.test")
        line = w.outcome("a@short.test")
        assert "event=delivered" in line and "tls_policy=mta-sts" in line, line
        fetched = time.time()
        w.d.wait_log("event=mta_sts_checked domain=short.test result=fetched")
        line = w.d.wait_log("event=mta_sts_checked domain=short.test result=refreshed", 30)
        assert "mode=enforce" in line, line
        # Past the first policy's end (10 s after its fetch): still enforced.
        wait_until(lambda: time.time() > fetched + 11, 30, "the first policy's end")
        w.send("b@short.test")
        line = w.outcome("b@short.test")
        assert "event=delivered" in line and "tls_policy=mta-sts" in line, line
        st = w.ctl("tlsrpt")
        assert st["refreshed"] >= 1 and st["policies"] >= 1, st
    finally:
        w.close()


def test_policy_host_addresses():
    """The policy is fetched from any allowed address of the policy host,
    not only the first: mta-sts.twoaddr.test answers the trap (refused by
    allow_networks; a listener on the policy port there sees no
    connection), then 127.0.0.2 (allowed, refused on the policy port),
    then the policy server. The fetch goes past the dead address, the
    policy is enforced, and its first message goes under it."""
    w = World()
    trap = socket.socket()
    try:
        trap.bind((TRAP, w.https.port))
        trap.listen(8)
        trap.setblocking(False)
        got = a_records(w.dns.port, "mta-sts.twoaddr.test")
        assert got == POLICY_ADDRS["twoaddr.test"], got
        assert not connectable(w.https.port, MX_BAD)
        w.send("a@twoaddr.test")
        line = w.d.wait_log("event=mta_sts_checked domain=twoaddr.test result=")
        assert "result=fetched mode=enforce" in line, line
        assert w.https.gets_for("mta-sts.twoaddr.test") == 1
        line = w.outcome("a@twoaddr.test")
        assert "event=delivered" in line and "tls_policy=mta-sts" in line, line
        try:
            trap.accept()[0].close()
            raise AssertionError("the fetch connected to an address allow_networks refuses")
        except BlockingIOError:
            pass
    finally:
        trap.close()
        w.close()


def test_reload_turns_mta_sts_on():
    """Started with [delivery] mta_sts = no, an enforce domain gets its mail
    over unverified TLS; a reload with it on starts the MTA-STS thread,
    and the next message to that domain is deferred (class tls_policy)."""
    w = World(delivery_extra="mta_sts = no")
    try:
        w.send("a@badcert.test")
        line = w.outcome("a@badcert.test")
        assert "event=delivered" in line and "tls_policy=opportunistic" in line, line
        assert w.d.count_log("event=mta_sts_cache_loaded") == 0
        with open(w.conf) as f:
            text = f.read()
        with open(w.conf, "w") as f:
            f.write(text.replace("mta_sts = no\n", ""))
        w.d.signal(signal.SIGHUP)
        w.d.wait_log("event=mta_sts_started reason=reload")
        w.d.wait_log("event=config_reloaded")
        assert w.d.count_log("event=reload_kept key=mta_sts") == 0
        # A second reload that changes [mta_sts]: kept, and said so.
        with open(w.conf, "w") as f:
            f.write(text.replace("mta_sts = no\n", "").replace("recheck = 1s", "recheck = 2s"))
        w.d.signal(signal.SIGHUP)
        w.d.wait_log("event=reload_kept key=mta_sts")
        # The destination asks again within STS_ASK_MS of the reload: mail
        # until one is refused (bounded), none after it goes out.
        line = None
        deadline = time.monotonic() + WAIT
        for i in range(1000):
            if time.monotonic() > deadline:
                break
            rcpt = f"r{i}@badcert.test"
            w.send(rcpt)
            line = w.outcome(rcpt)
            if "event=deferred" in line:
                break
        assert "event=deferred" in line and "class=tls_policy" in line, line
        assert w.d.count_log("event=mta_sts_checked domain=badcert.test result=fetched") == 1
    finally:
        w.close()


def test_report_answer_not_on_stdout():
    """A report endpoint's answer is read and dropped, never written to
    sluice's standard output (the journal under systemd, or whatever file
    holds descriptor 1): the rua is any recipient domain's word, and its
    server could write what it likes there, as much as it likes."""
    w = World()
    out = os.path.join(w.wd.path, "stdout.txt")
    try:
        w.d.stop_clean()
        with open(out, "wb") as f:
            w.start(stdout=f)
        w.send("a@testing.test")
        assert "event=delivered" in w.outcome("a@testing.test")
        w.ctl("tlsrpt flush")
        w.d.wait_log("event=tlsrpt_post domain=testing.test url=https://127.0.0.1:")
        w.d.wait_log("event=tlsrpt_sent domain=testing.test day=")
        assert [r for r in w.https.reports if r[0] == "/report"], w.https.reports
        w.d.stop_clean()  # stdio buffers what goes to a file until exit
        with open(out, "rb") as f:
            got = f.read()
        assert got == b"", f"the report endpoint's answer reached stdout: {got[:200]!r}"
    finally:
        w.close()


def test_sessions_counted_while_a_report_posts_go_in_the_next():
    """`tlsrpt flush` sends today's report while today still counts:
    a session counted while its POST is in flight is not dropped with
    the day once it is sent, but goes in the next report."""
    w = World()
    try:
        w.send("a@testing.test")
        assert "event=delivered" in w.outcome("a@testing.test")
        # the session ended (idle_timeout, 1s): the next message makes a new one
        wait_until(lambda: w.bad.d.count_log("event=disconnect") >= 1, WAIT,
                   "the first session to end")
        w.https.post_gate = threading.Event()
        w.ctl("tlsrpt flush")
        wait_until(lambda: [r for r in w.https.reports if r[0] == "/report"], WAIT,
                   "the first report")
        w.send("b@testing.test")
        assert "event=delivered" in w.outcome("b@testing.test")
        wait_until(lambda: w.bad.d.count_log("event=disconnect") >= 2, WAIT,
                   "the second session to end")
        w.https.post_gate.set()
        w.d.wait_log("event=tlsrpt_sent domain=testing.test day=")
        w.ctl("tlsrpt flush")
        got = wait_until(lambda: [r for r in w.https.reports if r[0] == "/report"][1:], WAIT,
                         "a second report with the session counted during the first POST")

        def sessions(body):
            rep = json.loads(gzip.decompress(body))
            check_schema(rep, REPORT_SCHEMA)
            return sum(p["summary"]["total-successful-session-count"] +
                       p["summary"]["total-failure-session-count"] for p in rep["policies"])
        first = [r for r in w.https.reports if r[0] == "/report"][0]
        assert sessions(first[2]) == 1 and sessions(got[0][2]) == 1, w.https.reports
    finally:
        w.close()


def test_reload_narrows_fetch_and_report_addresses():
    """A reload that takes the policy server's address (127.0.0.1) out of
    [delivery] allow_networks refuses it to policy fetches and report
    POSTs as it does to deliveries: the MTA-STS thread keeps its
    [mta_sts] settings of the start, not the allow list of then."""
    w = World()
    try:
        w.send("a@testing.test")  # fetched and counted before the reload
        assert "event=delivered" in w.outcome("a@testing.test")
        with open(w.conf) as f:
            text = f.read()
        allow = f"allow_networks = {MX_GOOD}, {MX_BAD}, {MX_REPORTS}"
        assert allow in text
        with open(w.conf, "w") as f:
            f.write(text.replace(allow, f"allow_networks = {MX_BAD}, {MX_REPORTS}"))
        w.d.signal(signal.SIGHUP)
        w.d.wait_log("event=config_reloaded")
        # a first check after it: the policy host is refused, not fetched
        w.send("a@testing2.test")
        line = w.d.wait_log("event=mta_sts_checked domain=testing2.test result=")
        assert "result=fetch_failed" in line and "allow_networks" in line, line
        assert w.https.gets_for("mta-sts.testing2.test") == 0
        # the day's report to https://127.0.0.1: refused at connect
        w.ctl("tlsrpt flush")
        line = w.d.wait_log("event=tlsrpt_refused domain=testing.test addr=127.0.0.1:")
        w.d.wait_log("event=tlsrpt_not_sent domain=testing.test day=")
        assert not [r for r in w.https.reports if r[0] == "/report"], w.https.reports
    finally:
        w.close()


def test_stop_names_a_report_whose_commit_hangs():
    """A TLS report mailed by the node waits for its commit on the MTA-STS
    thread holding the mailer's lock, which the stop takes first
    (tlsrpt_set_mailer). A spool that does not answer (its write lock
    held by mdb_load, as a dead disk holds the committer) holds the stop
    there until its bound (5 s here) gives it up; the wait is not cut
    short, as the spool borrows the report's text until it answers. The
    stop's watch names that step (stage=tlsrpt_mail; before, the stage
    the watch starts with: workers), and the wait was said before the
    stop (event=tlsrpt_enqueue_slow)."""
    if not have_mdb_load():
        skip("mdb_load not installed (tools/install-deps --test)")
    w = World()
    hold = None
    try:
        # the drain, 1 s (worker 0's due poll waits on the spool: the
        # whole drain_timeout), then the stop with a bound of 5 s
        w.d.stop_clean()
        with open(w.conf) as f:
            text = f.read()
        with open(w.conf, "w") as f:
            f.write(text.replace("[server]\n", "[server]\ndrain_timeout = 1s\n", 1))
        with extra_env({"SLUICE_TEST_STOP_BOUND_MS": "5000"}):
            w.start()
        w.send("a@badcert.test")  # a TLS failure under an enforce policy: counted
        assert "event=deferred" in w.outcome("a@badcert.test")
        hold = SpoolWriteLock(os.path.join(w.wd.path, "spool"))
        wait_until(lambda: writer_waits_for_lock(w.d.proc.pid), 30,
                   "the spool's writer to wait behind mdb_load")
        assert w.ctl("tlsrpt flush").get("ok") is not False
        # badcert.test's rua names the mailto: address first: the send
        # waits for the report's commit
        line = w.d.wait_log("event=tlsrpt_enqueue_slow to=<tlsrpt@reports.test>")
        qid = dict(log_fields(line))["id"]
        w.d.signal(signal.SIGTERM)
        try:
            rc = w.d.proc.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the stop was not bounded:\n" + "\n".join(w.d.lines[-20:]))
        w.d.reader.join(10)
        assert rc == 70, (rc, w.d.lines[-20:])
        stuck = w.d.log_lines("event=stop_stuck")
        assert len(stuck) == 1, w.d.lines[-20:]
        assert dict(log_fields(stuck[0]))["stage"] == "tlsrpt_mail", stuck
        assert not w.d.log_lines(f"id={qid} event=tlsrpt_queued"), w.d.lines[-20:]
    finally:
        if hold is not None:
            hold.stop()
        w.close()


if __name__ == "__main__":
    if run(["which", "dnsmasq"]).returncode != 0 and not os.path.exists("/usr/sbin/dnsmasq"):
        skip("dnsmasq not installed (tools/install-deps --test)")
    main([test_enforce_testing_fetch_failures_cache_and_reports,
          test_policy_id_change_fetches_again, test_policy_refreshed_before_it_ends,
          test_policy_host_addresses, test_reload_turns_mta_sts_on,
          test_report_answer_not_on_stdout, test_sessions_counted_while_a_report_posts_go_in_the_next,
          test_reload_narrows_fetch_and_report_addresses,
          test_stop_names_a_report_whose_commit_hangs])
