"""DKIM signing end to end: sluice signs at reception, delivers to a small
Python MX that keeps the exact octets it received, and two independent
verifiers check the signatures against public keys served as TXT records
by a local dnsmasq (the records are what `sluice --dkim-dns` prints):
Python's dkimpy and Perl's Mail::DKIM (Debian 12's Mail::DKIM predates
Ed25519, so Ed25519 signatures are verified by dkimpy alone). Also: a
message changed after signing fails both; a domain without a key goes out
unsigned and the delivery log says why; [dkim * SELECTOR] signs for the
rest; key_dir keys come and go on SIGHUP, and a bad key is refused at
--check-config and at reload; hostile header sections get a clear
outcome; a TLS report the node signs keeps its signature's names in the
delivery log across a reload that frees the keyring it was signed with."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.append("/usr/lib/python3/dist-packages")  # Debian's python3-dkim under another python

from harness import Workdir, dkimpy_verify, main, run, skip, wait_until  # noqa: E402
import test_delivery  # noqa: E402
from test_delivery import Relay, records_for  # noqa: E402
from test_outcomes import events, wait_events  # noqa: E402
from spool_lock import SpoolWriteLock, writer_waits_for_lock  # noqa: E402 (tests/support)

SLUICE = sys.argv[1]
test_delivery.SLUICE = SLUICE

try:
    import dkim
    import dns.resolver
except ImportError:
    dkim = None


class Mx:
    """A receiving MX on its own port that keeps each message exactly as it
    came (unstuffed, CRLF kept): smtp-sink writes LF line ends."""

    def __init__(self, port):
        self.messages = []
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        f = c.makefile("rb")
        try:
            c.sendall(b"220 mx.test ESMTP\r\n")
            while True:
                line = f.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    c.sendall(b"250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                              b"250 SIZE 100000000\r\n")
                elif verb == b"DATA":
                    c.sendall(b"354 go\r\n")
                    lines = []
                    while True:
                        ln = f.readline()
                        if ln in (b".\r\n", b""):
                            break
                        lines.append(ln[1:] if ln.startswith(b".") else ln)
                    with self.lock:
                        self.messages.append(b"".join(lines))
                    c.sendall(b"250 ok\r\n")
                elif verb == b"QUIT":
                    c.sendall(b"221 bye\r\n")
                    return
                else:
                    c.sendall(b"250 ok\r\n")
        except OSError:
            return
        finally:
            c.close()

    def wait(self, n, timeout=60):
        wait_until(lambda: len(self.messages) >= n, timeout, f"{n} messages at the MX")
        with self.lock:
            return list(self.messages)

    def stop(self):
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(5)


def read_until(f, prefix, most=50):
    """Read reply lines until one starts with prefix (bounded; EOF fails)."""
    for _ in range(most):
        line = f.readline()
        assert line, "connection closed"
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} line")


def genkey(path, kind):
    args = {"ed25519": ["-algorithm", "ED25519"]}.get(
        kind, ["-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{kind[3:]}"])
    r = run(["openssl", "genpkey", *args, "-out", path])
    assert r.returncode == 0, r.stderr


def dns_records(conf, pairs):
    """dnsmasq txt-record lines from `sluice --dkim-dns` for (domain, selector)."""
    recs = []
    for d, s in pairs:
        r = run([SLUICE, "-c", conf, "--dkim-dns", d, s])
        assert r.returncode == 0, r.stderr
        line = [ln for ln in r.stdout.splitlines() if not ln.startswith(";")][0]
        name = line.split()[0].rstrip(".")
        assert name == f"{s}._domainkey.{d}", line
        strings = re.findall(r'"([^"]*)"', line)
        assert strings and all(len(x) <= 255 for x in strings), line
        recs.append(f"txt-record={name}," + ",".join(f'"{x}"' for x in strings))
    return recs


PERL = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS::Resolver;
my $res = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0],
                                  recurse => 1, tcp_timeout => 5, udp_timeout => 5);
Mail::DKIM::DNS::resolver($res);
binmode STDIN;
local $/; my $msg = <STDIN>;
my $v = Mail::DKIM::Verifier->new();
$v->PRINT($msg); $v->CLOSE;
foreach my $s ($v->signatures) {
    printf "%s %s %s %s\n", $s->domain, $s->selector, $s->algorithm, $s->result;
}
"""


def perl_verify(msg, port):
    """Every signature of msg per Mail::DKIM: [(domain, selector, alg, result)]."""
    r = subprocess.run(["perl", "-e", PERL, str(port)], input=msg, capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return [tuple(ln.split()) for ln in r.stdout.decode().splitlines()]


def check_both(msg, port, want):
    """msg carries exactly the signatures want [(domain, selector, alg)] and
    each verifies with dkimpy, and with Mail::DKIM where it knows the alg."""
    got = dkimpy_verify(msg, port)
    assert sorted((d, s) for d, s, _ in got) == sorted((d, s) for d, s, _ in want), (got, want)
    assert all(ok for _, _, ok in got), (got, msg[:1500])
    perl = perl_verify(msg, port)
    assert sorted((p[0], p[1]) for p in perl) == sorted((d, s) for d, s, _ in want), perl
    for d, s, alg, result in perl:
        if alg == "rsa-sha256":
            assert result == "pass", (perl, msg[:1500])
        else:
            assert alg == "ed25519-sha256" and result in ("pass", "invalid"), perl


def check_fails(msg, port):
    """Every signature of msg fails with both verifiers."""
    got = dkimpy_verify(msg, port)
    assert got and not any(ok for _, _, ok in got), got
    perl = perl_verify(msg, port)
    assert perl and all(p[3] != "pass" for p in perl), perl


def need_verifiers():
    if dkim is None:
        skip("python3-dkim or python3-dnspython missing (tools/install-deps --test)")
    if run(["perl", "-MMail::DKIM::Verifier", "-MNet::DNS", "-e", "1"]).returncode != 0:
        skip("libmail-dkim-perl missing (tools/install-deps --test)")


class DkimRelay:
    """Keys in a work dir, dnsmasq serving their TXT records and the MX
    names, the Python MX, and sluice configured with dkim_conf (@KEYS@ is
    the key directory)."""

    def __init__(self, keys, dkim_conf, pairs, extra_dns=()):
        need_verifiers()
        self.kd = Workdir("sluice-dkim-keys-")
        self.r = self.mx = None
        try:
            for name, kind in keys:
                path = os.path.join(self.kd.path, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                genkey(path, kind)
            self.dkim_conf = dkim_conf.replace("@KEYS@", self.kd.path)
            conf = self.kd.file("probe.conf", "[server]\nlisten = 127.0.0.1:1\n" + self.dkim_conf)
            recs = dns_records(conf, pairs) + records_for(["rcpt.test"]) + list(extra_dns)
            self.r = Relay(recs, with_sink=False, domain_conf=self.dkim_conf +
                           "\n[log]\ndelivery_log = @DLOG@\ndelivery_log_flush = 50ms\n"
                           "[stats]\nsocket = @DLOG@.sock\n")
            self.mx = Mx(self.r.mx_port)
        except BaseException:
            self.close()
            raise

    @property
    def dns_port(self):
        return self.r.dns.port

    def counters(self):
        """The stats socket's counters."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as st:
            st.settimeout(10)
            st.connect(self.r.dlog + ".sock")
            st.sendall(b"stats\n")
            return json.loads(st.makefile("rb").readline())["counters"]

    def close(self):
        try:
            if self.r is not None:
                self.r.close()
        finally:
            if self.mx is not None:
                self.mx.stop()
            self.kd.cleanup()


def msg(frm, subject, body=b"Hello.\r\n", extra=b""):
    return (b"From: " + frm + b"\r\nTo: someone@rcpt.test\r\nSubject: " + subject + b"\r\n" +
            extra + b"\r\n" + body)


CASES = {
    "folded": msg(b"Jane\r\n <jane@a.test>", b"folded\r\n  over   two\r\n\tlines",
                  extra=b"X-Long: one\r\n two\r\n"),
    "trailing_ws": msg(b"jane@a.test  ", b"spaces \t ", body=b"trailing   \r\n  x  y\t\r\n\r\n\r\n"),
    "empty_body": msg(b"jane@a.test", b"empty", body=b""),
    "dots": msg(b"jane@a.test", b"dots", body=b".\r\n..\r\n.x\r\n"),
    "eightbit": msg(b"=?utf-8?q?J=C3=A9?= <j@a.test>", b"caf\xc3\xa9",
                    body=b"d\xc3\xa9j\xc3\xa0 vu \xe2\x82\xac\r\n",
                    extra=b"Content-Type: text/plain; charset=utf-8\r\n"),
    "two_from": msg(b"a@a.test", b"two from", extra=b"From: b@a.test\r\n"),
    "long_header": msg(b"jane@a.test", b"long " + b"\r\n ".join(b"w%d" % i for i in range(4000))),
    "rsa4096": msg(b"big@b.test", b"four thousand"),
    "dual": msg(b"both@dual.test", b"two signatures",
                extra=b"List-Unsubscribe: <https://dual.test/u>\r\n"
                      b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"),
    "subdomain": msg(b"news@news.a.test", b"aligned with the parent's key"),
}

WANT = {
    "a.test": [("a.test", "r1024", "rsa-sha256"), ("a.test", "s2048", "rsa-sha256")],
    "b.test": [("b.test", "big", "rsa-sha256")],
    "dual.test": [("dual.test", "ed", "ed25519-sha256"), ("dual.test", "rsa", "rsa-sha256")],
}


def test_signatures_verify_with_dkimpy_and_mail_dkim():
    """RSA 1024 (relaxed), 2048 (simple/simple) and 4096, Ed25519 beside RSA
    on one domain; folded headers, trailing whitespace, empty body, dot
    lines, 8-bit, two From fields, a 4,000-line Subject; each message
    verifies with both verifiers, and fails once changed after signing."""
    keys = [("a1024.pem", "rsa1024"), ("a2048.pem", "rsa2048"), ("b4096.pem", "rsa4096"),
            ("ded.pem", "ed25519"), ("drsa.pem", "rsa2048")]
    conf = """
[dkim a.test r1024]
key_file = @KEYS@/a1024.pem
[dkim a.test s2048]
key_file = @KEYS@/a2048.pem
canonicalization = simple/simple
[dkim b.test big]
key_file = @KEYS@/b4096.pem
[dkim dual.test ed]
key_file = @KEYS@/ded.pem
[dkim dual.test rsa]
key_file = @KEYS@/drsa.pem
expire = 7d
"""
    pairs = [("a.test", "r1024"), ("a.test", "s2048"), ("b.test", "big"), ("dual.test", "ed"),
             ("dual.test", "rsa")]
    t = DkimRelay(keys, conf, pairs)
    try:
        names = list(CASES)
        t.r.inject([("bounce@sender.test", ["someone@rcpt.test"], CASES[n]) for n in names],
                   sessions=3)
        got = t.mx.wait(len(names))
        assert len(got) == len(names)
        for m in got:
            subj = [n for n in names if CASES[n].split(b"\r\n\r\n")[0].split(b"Subject: ")[1][:12]
                    in m]
            assert len(subj) == 1, m[:300]
            name = subj[0]
            dom = {"rsa4096": "b.test", "dual": "dual.test"}.get(name, "a.test")
            check_both(m, t.dns_port, WANT[dom])
            if name == "dual":
                assert b"x=" in m.split(b"\r\n\r\n")[0]
            # changed after signing: the body, then a signed header field
            check_fails(m + b"one more line\r\n", t.dns_port)
            check_fails(m.replace(b"Subject: ", b"Subject: Re: ", 1), t.dns_port)
            print(f"  {name}: {len(WANT[dom])} signature(s) verified")
        # The delivery log lists the signatures of each message.
        evs = wait_events(t.r.dlog, lambda e: e["event"] == "reception", len(names))
        dual = [e for e in evs if e.get("dkim") and e["dkim"][0]["d"] == "dual.test"]
        assert len(dual) == 1, evs
        assert sorted((x["s"], x["a"]) for x in dual[0]["dkim"]) == [
            ("ed", "ed25519-sha256"), ("rsa", "rsa-sha256")], dual
        assert all("dkim_unsigned" not in e for e in evs), evs
    finally:
        t.close()


def test_unsigned_domains_and_the_default_key():
    """A From: domain without a key goes out unsigned and the delivery log
    says so; with a [dkim * SELECTOR] section, the provider's key signs it."""
    keys = [("a.pem", "ed25519"), ("prov.pem", "rsa2048")]
    t = DkimRelay(keys, "[dkim a.test k]\nkey_file = @KEYS@/a.pem\n", [("a.test", "k")])
    try:
        t.r.inject([("s@sender.test", ["x@rcpt.test"], msg(b"c@customer.test", b"no key"))])
        m = t.mx.wait(1)[0]
        assert b"DKIM-Signature" not in m
        ev = wait_events(t.r.dlog, lambda e: e["event"] == "reception", 1)[0]
        assert ev.get("dkim_unsigned") == "no_key" and "dkim" not in ev, ev
        assert t.r.d.count_log("event=dkim_unsigned reason=no_key domain=customer.test") == 1
    finally:
        t.close()
    conf = ("[dkim a.test k]\nkey_file = @KEYS@/a.pem\n"
            "[dkim * prov]\nkey_file = @KEYS@/prov.pem\ndomain = provider.test\n")
    t = DkimRelay(keys, conf, [("a.test", "k"), ("provider.test", "prov")])
    try:
        t.r.inject([("s@sender.test", ["x@rcpt.test"], msg(b"c@customer.test", b"default")),
                    ("s@sender.test", ["x@rcpt.test"], msg(b"me@a.test", b"own key"))],
                   sessions=1)
        got = t.mx.wait(2)
        for m in got:
            if b"default" in m:
                check_both(m, t.dns_port, [("provider.test", "prov", "rsa-sha256")])
            else:
                check_both(m, t.dns_port, [("a.test", "k", "ed25519-sha256")])
    finally:
        t.close()


def test_key_dir_and_sighup():
    """[dkim] key_dir: DOMAIN/SELECTOR.pem files are found at start; a key
    added later signs after SIGHUP; a broken key makes the reload refused
    (the running keys go on signing), and --check-config names it."""
    keys = [("kd/one.test/s1.pem", "ed25519"), ("two.pem", "rsa2048")]
    t = DkimRelay(keys, "[dkim]\nkey_dir = @KEYS@/kd\n", [("one.test", "s1")],
                  extra_dns=[])
    try:
        t.r.inject([("s@sender.test", ["x@rcpt.test"], msg(b"a@one.test", b"first")),
                    ("s@sender.test", ["x@rcpt.test"], msg(b"a@two.test", b"second"))],
                   sessions=1)
        got = t.mx.wait(2)
        for m in got:
            if b"first" in m:
                check_both(m, t.dns_port, [("one.test", "s1", "ed25519-sha256")])
            else:
                assert b"DKIM-Signature" not in m

        # A new domain's key appears: SIGHUP, and it signs.
        os.makedirs(os.path.join(t.kd.path, "kd", "two.test"))
        os.rename(os.path.join(t.kd.path, "two.pem"),
                  os.path.join(t.kd.path, "kd", "two.test", "s2.pem"))
        n = t.r.d.count_log("event=config_reloaded")
        t.r.d.signal(signal.SIGHUP)
        t.r.d.wait_log_count("event=config_reloaded", n + 1)
        t.r.inject([("s@sender.test", ["x@rcpt.test"], msg(b"a@two.test", b"third"))])
        m = [x for x in t.mx.wait(3) if b"third" in x][0]
        assert b"d=two.test" in m and b"s=s2" in m, m[:600]

        # A broken key: --check-config says which file; SIGHUP is refused
        # and the keys in use go on signing.
        bad = os.path.join(t.kd.path, "kd", "three.test")
        os.makedirs(bad)
        with open(os.path.join(bad, "s3.pem"), "w") as f:
            f.write("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        conf = os.path.join(t.r.wd.path, "sluice.conf")
        r = run([SLUICE, "-c", conf, "--check-config"])
        assert r.returncode == 1 and "three.test/s3.pem" in r.stderr, r.stderr
        t.r.d.signal(signal.SIGHUP)
        t.r.d.wait_log("event=reload_failed what=config")
        assert any("three.test/s3.pem" in ln for ln in t.r.d.log_lines("event=reload_refused"))
        t.r.inject([("s@sender.test", ["x@rcpt.test"], msg(b"a@one.test", b"fourth"))])
        m = [x for x in t.mx.wait(4) if b"fourth" in x][0]
        assert b"d=one.test" in m
    finally:
        t.close()


def test_check_config_reports_bad_keys():
    """A key that cannot be read or parsed is an error with file:line."""
    wd = Workdir("sluice-dkim-conf-")
    try:
        bad = wd.file("bad.pem", "not a key\n")
        r = run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-out", os.path.join(wd.path, "ec.pem")])
        assert r.returncode == 0
        conf = wd.file("sluice.conf", f"""[server]
listen = 127.0.0.1:2525
[dkim a.test s1]
key_file = {bad}
[dkim b.test s1]
key_file = {wd.path}/missing.pem
[dkim c.test s1]
key_file = {wd.path}/ec.pem
[dkim * s1]
key_file = {bad}
[dkim d.test s1]
canonicalization = relaxed/loose
key_file = {bad}
""")
        r = run([SLUICE, "-c", conf, "--check-config"])
        assert r.returncode == 1, r.stdout
        err = r.stderr
        assert f"{conf}:4: [dkim a.test s1] key_file: {bad}: not a PEM private key" in err, err
        assert f"{conf}:6: [dkim b.test s1] key_file: cannot read" in err, err
        assert f"{conf}:8: [dkim c.test s1] key_file:" in err and "RSA or Ed25519" in err, err
        assert f"{conf}:9: [dkim * s1] domain:" in err, err
        assert f"{conf}:12: [dkim d.test s1] canonicalization:" in err, err
    finally:
        wd.cleanup()


def test_hostile_headers_get_a_clear_outcome():
    """A 100 KB header field, 10,000 header fields, a From: naming two
    domains, none at all, one whose address is in an unterminated comment,
    a body that begins without the empty line: each
    is queued (signed, or unsigned and logged with the reason), and sluice
    stays up. The one without the empty line is stored with one inserted,
    and signed as stored."""
    keys = [("a.pem", "ed25519")]
    t = DkimRelay(keys, "[dkim a.test k]\nkey_file = @KEYS@/a.pem\n", [("a.test", "k")])
    try:
        big = b"X-Big: " + b"\r\n ".join([b"y" * 900] * 115) + b"\r\n"  # ~100 KB, folded
        many = b"".join(b"X-F%d: v\r\n" % i for i in range(10000))
        many_to = b"".join(b"To: r%d@rcpt.test\r\n" % i for i in range(10000))
        msgs = {
            "big": msg(b"a@a.test", b"big field", extra=big),
            "many": msg(b"a@a.test", b"many fields", extra=many),
            "many_to": msg(b"a@a.test", b"many signed fields", extra=many_to),
            "two_domains": msg(b"a@a.test, b@other.test", b"two domains"),
            "no_from": b"To: x@rcpt.test\r\nSubject: no from\r\n\r\nbody\r\n",
            "empty_from": msg(b"undisclosed-recipients:;", b"empty from"),
            # the address is inside a comment that never ends: RFC 5322
            # (and OpenDKIM) read no address; unsigned, and the log says why
            "open_comment": msg(b"(Bob <a@a.test>", b"open comment"),
            # the body's first line follows the fields directly; an empty
            # line later in the body must not be taken for the separator
            "no_separator": b"From: a@a.test\r\nTo: x@rcpt.test\r\nSubject: no separator\r\n"
                            b"first body line\r\n\r\nafter an empty line\r\n",
        }
        t.r.inject([("s@sender.test", ["x@rcpt.test"], m) for m in msgs.values()], sessions=2)
        got = t.mx.wait(len(msgs))
        for m in got:
            if b"no separator" in m:
                assert b"Subject: no separator\r\n\r\nfirst body line\r\n" in m, m
            if (b"big field" in m or b"many fields" in m or b"many signed fields" in m or
                    b"no separator" in m):
                check_both(m, t.dns_port, [("a.test", "k", "ed25519-sha256")])
            else:
                assert b"DKIM-Signature" not in m
        evs = wait_events(t.r.dlog, lambda e: e["event"] == "reception", len(msgs))
        reasons = sorted(e.get("dkim_unsigned", "signed") for e in evs)
        assert reasons == ["no_from", "no_from", "no_from", "several_from_domains", "signed",
                           "signed", "signed", "signed"], reasons
        assert t.r.d.count_log('event=dkim_unsigned reason=no_from domain=- '
                               'error="a From: field ends inside a comment') == 1
        assert t.r.d.count_log('event=dkim_unsigned reason=no_from domain=- '
                               'error="no From: address"') == 2
        c = t.counters()
        assert (c["dkim_signed"], c["dkim_unsigned"], c["dkim_failed"]) == (4, 4, 0), c
    finally:
        t.close()


def test_bdat_and_clients_that_leave_while_signing():
    """A message sent with BDAT in three chunks is signed like one sent with
    DATA; clients that hang up right after the final dot (their session is
    closed while its RSA-4096 signature is being made) cost nothing: no
    crash, no leak (the sanitizer build checks), and the next client is
    served."""
    keys = [("big.pem", "rsa4096")]
    t = DkimRelay(keys, "[dkim a.test big]\nkey_file = @KEYS@/big.pem\n", [("a.test", "big")])
    try:
        m = msg(b"a@a.test", b"chunked", body=b"line one\r\n\r\n.dot line\r\n")
        parts = [m[:20], m[20:len(m) - 7], m[len(m) - 7:]]
        c = socket.create_connection(("127.0.0.1", t.r.port), timeout=30)
        f = c.makefile("rb")
        assert f.readline().startswith(b"220")
        c.sendall(b"EHLO t\r\nMAIL FROM:<s@sender.test>\r\nRCPT TO:<x@rcpt.test>\r\n")
        read_until(f, b"250 ")  # the last line of the EHLO reply
        assert f.readline().startswith(b"250") and f.readline().startswith(b"250")
        for i, p in enumerate(parts):
            last = b" LAST" if i == len(parts) - 1 else b""
            c.sendall(b"BDAT %d%s\r\n" % (len(p), last) + p)
            assert f.readline().startswith(b"250")
        c.sendall(b"QUIT\r\n")
        c.close()
        got = t.mx.wait(1)[0]
        check_both(got, t.dns_port, [("a.test", "big", "rsa-sha256")])

        for i in range(40):
            c = socket.create_connection(("127.0.0.1", t.r.port), timeout=30)
            c.sendall(b"EHLO t\r\nMAIL FROM:<s@sender.test>\r\nRCPT TO:<x@rcpt.test>\r\n"
                      b"DATA\r\n")
            f = c.makefile("rb")
            read_until(f, b"354")
            c.sendall(msg(b"a@a.test", b"gone %d" % i) + b".\r\n")
            c.close()
        t.r.inject([("s@sender.test", ["x@rcpt.test"], msg(b"a@a.test", b"after"))])
        assert t.r.d.proc.poll() is None

        # SIGTERM while messages are with the signing threads: a clean exit
        # (the jobs come back cancelled; their clients got no 250).
        socks = []
        for i in range(20):
            c = socket.create_connection(("127.0.0.1", t.r.port), timeout=30)
            c.sendall(b"EHLO t\r\nMAIL FROM:<s@sender.test>\r\nRCPT TO:<x@rcpt.test>\r\n"
                      b"DATA\r\n")
            f = c.makefile("rb")
            read_until(f, b"354")
            socks.append(c)
        for i, c in enumerate(socks):
            c.sendall(msg(b"a@a.test", b"at stop %d" % i) + b".\r\n")
        assert t.r.d.stop_clean() == 0
        for c in socks:
            c.close()
    finally:
        t.close()


def test_tls_report_signed_across_a_reload():
    """A TLS report mailed by the node is signed on the MTA-STS thread
    (engine.c local_dkim); its reception event names the signature after
    the commit. A SIGHUP while that commit is held (an mdb_load holds the
    spool's write lock) replaces the keyring: the event still says
    d=sender.test s=rpt, and nothing reads the keyring the reload freed.
    The report's From is written in capitals (tlsrpt_from): its domain is
    still the keyring's sender.test (it used to be looked up as written,
    and the report went out unsigned)."""
    for tool in ("mdb_load", "openssl"):
        if run(["which", tool]).returncode != 0:
            skip(f"{tool} not installed (tools/install-deps --test)")
    import test_mta_sts as sts
    w = sts.World(dkim_key=True, mta_sts_extra="tlsrpt_from = Reports@Sender.TEST\n")
    hold = None
    try:
        w.send("a@badcert.test")  # a TLS failure under an enforce policy: counted
        assert "event=deferred" in w.outcome("a@badcert.test")
        hold = SpoolWriteLock(os.path.join(w.wd.path, "spool"))
        # The report is signed, then handed to the spool, whose writer
        # then waits behind mdb_load.
        assert w.ctl("tlsrpt flush").get("ok") is not False
        wait_until(lambda: writer_waits_for_lock(w.d.proc.pid), 30,
                   "the report's commit to wait behind mdb_load")
        os.kill(w.d.proc.pid, signal.SIGHUP)
        w.d.wait_log("event=config_reloaded")
        assert hold.release() == 0  # mdb_load commits nothing and lets go
        w.d.wait_log("event=tlsrpt_mailed domain=badcert.test")

        def reception():
            rec = [r for r in sts.dlog_records(w.dlog, "tlsrpt@reports.test")
                   if r["event"] == "reception"]
            return rec[0] if rec else None
        recv = wait_until(reception, 30, "the report's reception event")
        assert [(x["d"], x["s"]) for x in recv["dkim"]] == [("sender.test", "rpt")], recv
        assert w.d.proc.poll() is None
    finally:
        if hold is not None:
            hold.stop()
        w.close()


def test_idn_from_domain_signs_with_its_a_label_key():
    """An IDN From: domain written as U-labels (SMTPUTF8, RFC 6532) is
    signed by the key configured under its A-labels, d= in A-labels (RFC
    8616 4), and verifies with both verifiers. It went out unsigned
    (no_key)."""
    keys = [("idn.pem", "ed25519"), ("idnrsa.pem", "rsa2048")]
    conf = ("[dkim xn--bcher-kva.test k]\nkey_file = @KEYS@/idn.pem\n"
            "[dkim xn--bcher-kva.test r]\nkey_file = @KEYS@/idnrsa.pem\n")
    t = DkimRelay(keys, conf, [("xn--bcher-kva.test", "k"), ("xn--bcher-kva.test", "r")])
    try:
        frm = "Jane <jane@B\u00fccher.test>".encode()
        c = socket.create_connection(("127.0.0.1", t.r.port), timeout=30)
        f = c.makefile("rb")
        assert f.readline().startswith(b"220")
        c.sendall(b"EHLO t\r\n")
        read_until(f, b"250 ")
        c.sendall("MAIL FROM:<jane@b\u00fccher.test> SMTPUTF8\r\n".encode() +
                  b"RCPT TO:<x@rcpt.test>\r\nDATA\r\n")
        assert f.readline().startswith(b"250") and f.readline().startswith(b"250")
        assert f.readline().startswith(b"354")
        c.sendall(msg(frm, "Gr\u00fc\u00dfe".encode()) + b".\r\n")
        assert f.readline().startswith(b"250")
        c.sendall(b"QUIT\r\n")
        c.close()
        m = t.mx.wait(1)[0]
        check_both(m, t.dns_port, [("xn--bcher-kva.test", "k", "ed25519-sha256"),
                                   ("xn--bcher-kva.test", "r", "rsa-sha256")])
        ev = wait_events(t.r.dlog, lambda e: e["event"] == "reception", 1)[0]
        assert "dkim_unsigned" not in ev and len(ev["dkim"]) == 2, ev
    finally:
        t.close()


def test_key_rotation_by_reload():
    """A rotation as an operator does it: a new selector's section is
    added and the old one removed, then `sluicectl reload`. Mail queued
    before the reload keeps the signature it got at reception (old
    selector: it verifies while the old record stays published); mail
    received after it is signed by the new key only. A key file then
    replaced on disk by an EC key, or by garbage, makes the reload refused
    with the file named, and the new key goes on signing."""
    keys = [("old.pem", "rsa2048"), ("new.pem", "ed25519")]
    conf1 = "[dkim a.test old]\nkey_file = @KEYS@/old.pem\n"
    t = DkimRelay(keys, conf1 + "[dkim a.test new]\nkey_file = @KEYS@/new.pem\n",
                  [("a.test", "old"), ("a.test", "new")])
    try:
        path = os.path.join(t.r.wd.path, "sluice.conf")
        with open(path) as f:
            text = f.read()
        # start with the old key only
        new_sec = "[dkim a.test new]\nkey_file = %s/new.pem\n" % t.kd.path
        old_sec = "[dkim a.test old]\nkey_file = %s/old.pem\n" % t.kd.path
        assert new_sec in text and old_sec in text, text
        with open(path, "w") as f:
            f.write(text.replace(new_sec, ""))

        def ctl(cmd):
            ctl_bin = os.environ.get("SLUICECTL") or os.path.normpath(os.path.join(
                os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl"))
            r = run([ctl_bin, "-s", t.r.dlog + ".sock",
                     *cmd.split()])
            return r
        r = ctl("reload")
        # (a section removed: the keys that sign changed, which the
        # answer says; it said "no change")
        assert r.returncode == 0 and r.stdout == "reload done: changed [dkim] signing keys\n", \
            (r.stdout, r.stderr)
        r = ctl("suspend rcpt.test")
        assert r.returncode == 0, (r.stdout, r.stderr)
        t.r.inject([("s@sender.test", ["x@rcpt.test"], msg(b"a@a.test", b"before"))])
        with open(path, "w") as f:
            f.write(text.replace(old_sec, ""))
        r = ctl("reload")
        # (a section removed: the keys that sign changed, which the
        # answer says; it said "no change")
        assert r.returncode == 0 and r.stdout == "reload done: changed [dkim] signing keys\n", \
            (r.stdout, r.stderr)
        t.r.inject([("s@sender.test", ["x@rcpt.test"], msg(b"a@a.test", b"after"))])
        r = ctl("resume rcpt.test")
        assert r.returncode == 0, (r.stdout, r.stderr)
        got = t.mx.wait(2)
        for m in got:
            if b"before" in m:
                check_both(m, t.dns_port, [("a.test", "old", "rsa-sha256")])
            else:
                check_both(m, t.dns_port, [("a.test", "new", "ed25519-sha256")])

        # the key file replaced on disk by another algorithm, then by garbage
        newpath = os.path.join(t.kd.path, "new.pem")
        os.rename(newpath, newpath + ".good")
        r = run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                 "ec_paramgen_curve:P-256", "-out", newpath])
        assert r.returncode == 0
        r = ctl("reload")
        assert r.returncode != 0 and "new.pem" in r.stdout + r.stderr, (r.stdout, r.stderr)
        with open(newpath, "w") as f:
            f.write("garbage\n")
        r = ctl("reload")
        assert r.returncode != 0 and "new.pem" in r.stdout + r.stderr, (r.stdout, r.stderr)
        os.unlink(newpath)
        r = ctl("reload")
        assert r.returncode != 0 and "new.pem" in r.stdout + r.stderr, (r.stdout, r.stderr)
        t.r.inject([("s@sender.test", ["x@rcpt.test"], msg(b"a@a.test", b"kept"))])
        m = [x for x in t.mx.wait(3) if b"kept" in x][0]
        check_both(m, t.dns_port, [("a.test", "new", "ed25519-sha256")])
        os.rename(newpath + ".good", newpath)
    finally:
        t.close()


if __name__ == "__main__":
    if run(["which", "dnsmasq"]).returncode != 0 and not os.path.exists("/usr/sbin/dnsmasq"):
        skip("dnsmasq not installed (tools/install-deps --test)")
    main([test_signatures_verify_with_dkimpy_and_mail_dkim,
          test_unsigned_domains_and_the_default_key, test_key_dir_and_sighup,
          test_check_config_reports_bad_keys, test_hostile_headers_get_a_clear_outcome,
          test_bdat_and_clients_that_leave_while_signing,
          test_tls_report_signed_across_a_reload,
          test_idn_from_domain_signs_with_its_a_label_key, test_key_rotation_by_reload])
