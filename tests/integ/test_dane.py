"""DANE for SMTP (RFC 7672) against real DNS on loopback.

nsd serves two zones: dane.test, signed with ldns-signzone, and plain.test,
unsigned. A validating unbound on its own port holds the trust anchor of
dane.test (a stub zone to nsd for each) and is sluice's only resolver, with
[dns] dnssec = trust_ad. The MX hosts live on their own loopback addresses
(127.0.0.N) on one port, each a receiver made for its case: a second sluice
offering STARTTLS with a certificate made here (openssl), or smtp-sink,
which offers no STARTTLS.

  ee.dane.test     DANE-EE(3 1 1) of the receiver's key (its certificate
                   names another host), beside a PKIX-EE record and one
                   with no association data (both unusable): delivered
                   over TLS, authenticated;
                   y.plain.test (unsigned) names the same MX host: its
                   opportunistic connection never carries ee's mail
  ta.dane.test     DANE-TA(2 0 1) of a CA that issued the receiver's
                   certificate (sent as a chain): delivered, authenticated
  bad.dane.test    3 1 1 of some other key: deferred, the receiver sees
                   nothing
  strip.dane.test  TLSA published, receiver offers no STARTTLS: deferred,
                   never sent in plaintext (tls = off for it: DANE first)
  pkix.dane.test   only a PKIX-EE record (unusable for SMTP) to the same
                   sink: TLS still mandatory, deferred
  bogus.dane.test  the TLSA record altered after signing (a validating
                   resolver answers SERVFAIL): deferred, host not used
  none.dane.test   signed zone, no TLSA: opportunistic TLS as before
  cn.dane.test     MX host alias-ee, a CNAME to mx-ee (validated): the
                   TLSA at the target (mx-ee's) is used first, not the
                   one at alias-ee that matches nothing (RFC 7672 2.2.2)
  cn2.dane.test    MX host alias-none, a CNAME to mx-none (no TLSA): the
                   TLSA at alias-none, which matches mx-none's key, is
                   used
  cn3.dane.test    MX host alias-ta, a CNAME to mx-ta: DANE-TA at the
                   target, whose certificate names only mx-ta: the target
                   is the TLSA base domain (SNI, names checked), delivered
  cn4.dane.test    MX host alias-ta2, a CNAME to mx-ta2 (no TLSA there):
                   DANE-TA at alias-ta2, the certificate names only mx-ta2:
                   the chain's end is a second reference identifier (RFC
                   7672 3.2.2), delivered
  cn5.dane.test    MX host alias-bogus, a CNAME to mx-bogus: the failed
                   lookup is the target's, and says so
  x.plain.test     unsigned zone with a TLSA record that matches nothing:
                   insecure, so ignored: opportunistic, delivered
"""
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys

from harness import (WAIT, Sluice, Workdir, free_port, main, run, skip, wait_until)

SLUICE = sys.argv[1]

NSD = shutil.which("nsd") or "/usr/sbin/nsd"
UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
for tool in (NSD, UNBOUND):
    if not os.path.exists(tool):
        skip(f"{tool} not installed (tools/install-deps --test)")
for tool in ("ldns-keygen", "ldns-signzone", "openssl", "smtp-sink"):
    if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
        skip(f"{tool} not installed (tools/install-deps --test)")

ADDR = {"ee": "127.0.0.2", "ta": "127.0.0.3", "bad": "127.0.0.4", "strip": "127.0.0.5",
        "bogus": "127.0.0.6", "none": "127.0.0.7", "plain": "127.0.0.8", "ta2": "127.0.0.9"}


def dns_query(port, name, qtype, ad=True, timeout=0.5):
    """One UDP query; returns (rcode, ad bit, answer count) or None."""
    q = struct.pack(">HHHHHH", 0x4242, 0x0100 | (0x20 if ad else 0), 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack(">HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(q, ("127.0.0.1", port))
            r = s.recv(4096)
        except OSError:
            return None
    if len(r) < 12 or r[:2] != b"\x42\x42":
        return None
    flags, _, an = struct.unpack(">HHH", r[2:8])
    return flags & 0xF, bool(flags & 0x20), an


def sh(cmd, cwd=None):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert res.returncode == 0, f"{cmd}: {res.stderr}"
    return res.stdout


def der(pem_file, pubkey=False):
    if pubkey:
        return subprocess.run(["openssl", "x509", "-in", pem_file, "-noout", "-pubkey"],
                              capture_output=True, check=True).stdout
    return subprocess.run(["openssl", "x509", "-in", pem_file, "-outform", "DER"],
                          capture_output=True, check=True).stdout


def spki_sha256(pem_file):
    pub = der(pem_file, pubkey=True)
    d = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub,
                       capture_output=True, check=True).stdout
    return hashlib.sha256(d).hexdigest()


class Env:
    """Certificates, the two zones, nsd and unbound: made once for the file."""

    def __init__(self):
        self.wd = Workdir("sluice-dane-")
        self.nsd = self.unbound = None
        p = self.wd.path
        os.chmod(p, 0o755)
        try:
            self._certs(p)
            self._zones(p)
            self._nsd(p)
            self._unbound(p)
        except BaseException:
            self.close()
            raise

    def _self_signed(self, name, cn, extra=()):
        p = self.wd.path
        sh(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "2", "-subj", f"/CN={cn}", "-keyout", f"{p}/{name}-key.pem",
            "-out", f"{p}/{name}-cert.pem", *extra])
        return f"{p}/{name}-cert.pem", f"{p}/{name}-key.pem"

    def _certs(self, p):
        self.certs = {}
        # DANE-EE ignores names: this one names some other host.
        self.certs["ee"] = self._self_signed("ee", "not-the-mx.example")
        # DANE-TA: a CA, and a leaf for the MX host it issued; the receiver
        # sends both.
        ca, _ = self._self_signed("ca", "DANE test CA",
                                  ["-addext", "basicConstraints=critical,CA:TRUE",
                                   "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        self.ca = ca
        # ta2's leaf names only mx-ta2 (the CNAME target of cn4's MX host).
        for n in ("ta", "ta2"):
            sh(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-subj", f"/CN=mx-{n}.dane.test", "-keyout", f"{p}/{n}-key.pem",
                "-out", f"{p}/{n}.csr"])
            with open(f"{p}/{n}.ext", "w") as f:
                f.write(f"subjectAltName=DNS:mx-{n}.dane.test\n")
            sh(["openssl", "x509", "-req", "-in", f"{p}/{n}.csr", "-CA", ca,
                "-CAkey", f"{p}/ca-key.pem", "-CAcreateserial", "-days", "2",
                "-extfile", f"{p}/{n}.ext", "-out", f"{p}/{n}-leaf.pem"])
            with open(f"{p}/{n}-cert.pem", "w") as out:
                for f in (f"{p}/{n}-leaf.pem", ca):
                    out.write(open(f).read())
            self.certs[n] = (f"{p}/{n}-cert.pem", f"{p}/{n}-key.pem")
        for n in ("bad", "bogus", "none", "plain", "other"):
            self.certs[n] = self._self_signed(n, f"mx-{n}.dane.test")

    def _zones(self, p):
        ee = spki_sha256(self.certs["ee"][0])
        ta = hashlib.sha256(der(self.ca)).hexdigest()
        other = spki_sha256(self.certs["other"][0])  # no receiver has this key
        bogus = spki_sha256(self.certs["bogus"][0])
        soa = "@ 300 IN SOA ns.{z}. hostmaster.{z}. 1 3600 600 86400 300\n@ 300 IN NS ns.{z}.\n" \
              "ns 300 IN A 127.0.0.1\n"
        z = soa.format(z="dane.test")
        for n in ("ee", "ta", "bad", "strip", "bogus", "none"):
            z += f"{n} 300 IN MX 10 mx-{n}.dane.test.\nmx-{n} 300 IN A {ADDR[n]}\n"
        z += f"_25._tcp.mx-ee 300 IN TLSA 3 1 1 {ee}\n"
        z += f"_25._tcp.mx-ta 300 IN TLSA 2 0 1 {ta}\n"
        z += f"_25._tcp.mx-bad 300 IN TLSA 3 1 1 {other}\n"
        z += f"_25._tcp.mx-strip 300 IN TLSA 3 1 1 {other}\n"
        z += f"_25._tcp.mx-bogus 300 IN TLSA 3 1 1 {bogus}\n"
        # PKIX usages are ignored (RFC 7672 3.1.3): with only this beside a
        # usable record, the usable one decides.
        z += f"_25._tcp.mx-ee 300 IN TLSA 1 1 1 {other}\n"
        # A record with no association data (RFC 3597 form: rdata 3 1 1
        # and nothing else) is one unusable record, not a malformed RRset.
        z += "_25._tcp.mx-ee 300 IN TLSA \\# 3 030101\n"
        # Validated records of which none is usable (PKIX-EE only): TLS is
        # still mandatory (RFC 7672 2.2); this host is the STARTTLS-less sink.
        z += f"pkix 300 IN MX 10 mx-pkix.dane.test.\nmx-pkix 300 IN A {ADDR['strip']}\n"
        z += f"_25._tcp.mx-pkix 300 IN TLSA 1 1 1 {other}\n"
        # CNAME'd MX hosts: records at the target come first, then at the
        # alias (RFC 7672 2.2.2).
        z += "cn 300 IN MX 10 alias-ee.dane.test.\nalias-ee 300 IN CNAME mx-ee.dane.test.\n"
        z += f"_25._tcp.alias-ee 300 IN TLSA 3 1 1 {other}\n"
        z += "cn2 300 IN MX 10 alias-none.dane.test.\nalias-none 300 IN CNAME mx-none.dane.test.\n"
        z += f"_25._tcp.alias-none 300 IN TLSA 3 1 1 {spki_sha256(self.certs['none'][0])}\n"
        # DANE-TA behind a CNAME: at the target (cn3), at the alias (cn4).
        z += "cn3 300 IN MX 10 alias-ta.dane.test.\nalias-ta 300 IN CNAME mx-ta.dane.test.\n"
        z += "cn4 300 IN MX 10 alias-ta2.dane.test.\nalias-ta2 300 IN CNAME mx-ta2.dane.test.\n"
        z += f"mx-ta2 300 IN A {ADDR['ta2']}\n_25._tcp.alias-ta2 300 IN TLSA 2 0 1 {ta}\n"
        z += "cn5 300 IN MX 10 alias-bogus.dane.test.\n"
        z += "alias-bogus 300 IN CNAME mx-bogus.dane.test.\n"
        with open(f"{p}/dane.test.zone", "w") as f:
            f.write("$ORIGIN dane.test.\n" + z)
        zp = soa.format(z="plain.test")
        zp += f"x 300 IN MX 10 mx.plain.test.\nmx 300 IN A {ADDR['plain']}\n"
        zp += f"_25._tcp.mx 300 IN TLSA 3 1 1 {other}\n"
        # an unsigned domain naming the DANE host: same site as ee.dane.test
        zp += "y 300 IN MX 10 mx-ee.dane.test.\n"
        with open(f"{p}/plain.test.zone", "w") as f:
            f.write("$ORIGIN plain.test.\n" + zp)
        ksk = sh(["ldns-keygen", "-a", "ECDSAP256SHA256", "-k", "dane.test"], cwd=p).strip()
        zsk = sh(["ldns-keygen", "-a", "ECDSAP256SHA256", "dane.test"], cwd=p).strip()
        sh(["ldns-signzone", "dane.test.zone", ksk, zsk], cwd=p)
        self.anchor = f"{p}/{ksk}.ds"
        # Break the TLSA of mx-bogus after signing: its RRSIG no longer
        # matches, and the validating resolver calls the answer bogus.
        signed = open(f"{p}/dane.test.zone.signed").read()
        signed, n = re.subn(r"(_25\._tcp\.mx-bogus\.dane\.test\.\s+\d+\s+IN\s+TLSA\s+3 1 1 )(\w)",
                            lambda m: m.group(1) + ("0" if m.group(2) != "0" else "1"), signed)
        assert n == 1, "no TLSA of mx-bogus in the signed zone"
        # ldns-signzone writes the empty record as "3 1 1", which nsd
        # cannot read: back to the generic form (the same rdata, signed).
        signed, n = re.subn(r"(_25\._tcp\.mx-ee\.dane\.test\.\s+\d+\s+IN\s+TLSA)\s+3 1 1\s*$",
                            r"\1 \\# 3 030101", signed, flags=re.M)
        assert n == 1, "no empty TLSA of mx-ee in the signed zone"
        with open(f"{p}/dane.test.zone.signed", "w") as f:
            f.write(signed)

    def _nsd(self, p):
        for _ in range(5):
            self.nsd_port = free_port(kind=socket.SOCK_DGRAM)
            conf = self.wd.file("nsd.conf", f"""server:
  ip-address: 127.0.0.1@{self.nsd_port}
  port: {self.nsd_port}
  username: ""
  chroot: ""
  database: ""
  zonesdir: "{p}"
  pidfile: "{p}/nsd.pid"
  xfrdfile: "{p}/xfrd.state"
  xfrdir: "{p}"
  zonelistfile: "{p}/zone.list"
  logfile: "{p}/nsd.log"
  server-count: 1
  verbosity: 1
remote-control:
  control-enable: no
zone:
  name: dane.test
  zonefile: dane.test.zone.signed
zone:
  name: plain.test
  zonefile: plain.test.zone
""")
            self.nsd = subprocess.Popen([NSD, "-d", "-c", conf], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            wait_until(lambda: self.nsd.poll() is not None or
                       dns_query(self.nsd_port, "dane.test", 6, ad=False), WAIT, "nsd to answer")
            if self.nsd.poll() is None:
                return
        raise AssertionError("nsd would not start: " + open(f"{p}/nsd.log").read()[-500:])

    def _unbound(self, p):
        for _ in range(5):
            self.port = free_port(kind=socket.SOCK_DGRAM)
            conf = self.wd.file("unbound.conf", f"""server:
  interface: 127.0.0.1@{self.port}
  port: {self.port}
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{p}"
  pidfile: "{p}/unbound.pid"
  use-syslog: no
  logfile: "{p}/unbound.log"
  verbosity: 1
  val-log-level: 2
  do-ip6: no
  do-not-query-localhost: no
  module-config: "validator iterator"
  trust-anchor-file: "{self.anchor}"
  domain-insecure: "plain.test"
  local-zone: "test." nodefault
  cache-max-ttl: 1
  so-reuseport: no
remote-control:
  control-enable: no
stub-zone:
  name: "dane.test"
  stub-addr: 127.0.0.1@{self.nsd_port}
stub-zone:
  name: "plain.test"
  stub-addr: 127.0.0.1@{self.nsd_port}
""")
            self.unbound = subprocess.Popen([UNBOUND, "-d", "-c", conf],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until(lambda: self.unbound.poll() is not None or
                       dns_query(self.port, "ee.dane.test", 15), WAIT, "unbound to answer")
            if self.unbound.poll() is None:
                break
        else:
            raise AssertionError("unbound would not start: " +
                                 open(f"{p}/unbound.log").read()[-500:])
        # The setup itself: validated where signed, not where not, bogus
        # where broken. Otherwise the tests below prove nothing. Each is
        # a fresh validation (unbound asks nsd for the chain; cache-max-ttl
        # is 1 s): 10 s for its answer, not the 0.5 s of the polls above,
        # which a loaded machine outlasts (no answer read as a wrong one).
        r = dns_query(self.port, "_25._tcp.mx-ee.dane.test", 52, timeout=10)
        assert r is not None and r[0] == 0 and r[1] and r[2] == 3, f"TLSA of mx-ee: {r}"
        r = dns_query(self.port, "_25._tcp.mx.plain.test", 52, timeout=10)
        assert r is not None and r[0] == 0 and not r[1] and r[2] == 1, f"TLSA of plain: {r}"
        r = dns_query(self.port, "_25._tcp.mx-bogus.dane.test", 52, timeout=10)
        assert r is not None and r[0] == 2, f"TLSA of mx-bogus should be SERVFAIL: {r}"

    def close(self):
        for proc in (self.unbound, self.nsd):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        self.wd.cleanup()


ENV = None


def receiver(wd, name, port):
    """A sluice on ADDR[name]:port offering STARTTLS with the case's cert."""
    cert, key = ENV.certs[name]
    conf = wd.file(f"mx-{name}.conf", f"""
[server]
workers = 1
listen = {ADDR[name]}:{port}
trusted_networks = 127.0.0.0/8
[queue]
path = {wd.path}/mx-{name}-spool
map_size = 64M
[delivery]
enabled = no
[tls]
cert_file = {cert}
key_file = {key}
""")
    mx = Sluice(SLUICE, conf)
    mx.wait_log("event=ready")
    return mx


class Relay:
    """The sending sluice, resolving through unbound with dnssec = trust_ad,
    and the receiver of one case."""

    def __init__(self, case, domain_conf="", idle="1s"):
        self.wd = Workdir("sluice-dane-run-")
        self.d = self.mx = self.sink = None
        try:
            self.mx_port = free_port()
            if case == "strip":
                os.chmod(self.wd.path, 0o755)
                os.makedirs(f"{self.wd.path}/sink", mode=0o777)
                os.chmod(f"{self.wd.path}/sink", 0o777)
                user = ["-u", "nobody"] if os.geteuid() == 0 else []
                self.sink = subprocess.Popen(
                    ["smtp-sink", *user, "-d", f"{self.wd.path}/sink/%M.",
                     f"{ADDR[case]}:{self.mx_port}", "10"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_until(lambda: self.sink.poll() is not None or
                           connectable(ADDR[case], self.mx_port), WAIT, "smtp-sink")
                assert self.sink.poll() is None, "smtp-sink exited"
            else:
                self.mx = receiver(self.wd, case, self.mx_port)
            self.port = free_port()
            conf = self.wd.file("sluice.conf", f"""
[server]
workers = 1
listen = 127.0.0.1:{self.port}
trusted_networks = 127.0.0.0/8
[queue]
path = {self.wd.path}/spool
map_size = 64M
[delivery]
remote_port = {self.mx_port}
allow_networks = 127.0.0.0/8
connect_timeout = 2s
idle_timeout = {idle}
[dns]
servers = 127.0.0.1:{ENV.port}
dnssec = trust_ad
[bounce]
dsn = no
[log]
level = info
[stats]
socket = {self.wd.path}/stats.sock
{domain_conf}
""")
            self.d = Sluice(SLUICE, conf)
            self.d.wait_log("event=ready")
        except BaseException:
            self.close()
            raise

    def inject(self, rcpt):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"EHLO tester\r\n")
        while f.readline()[3:4] == b"-":
            pass
        s.sendall(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<%s>\r\nDATA\r\n" % rcpt.encode())
        for _ in range(2):
            line = f.readline()
            assert line.startswith(b"250"), line
        assert f.readline().startswith(b"354")
        s.sendall(b"Subject: dane\r\n\r\nover DANE\r\n.\r\n")
        line = f.readline()
        assert line.startswith(b"250"), line
        s.sendall(b"QUIT\r\n")
        s.close()

    def stats(self):
        """The stats socket's answer to "stats" (a dict)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(f"{self.wd.path}/stats.sock")
            s.sendall(b"stats\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                assert chunk, "stats socket closed without an answer"
                buf += chunk
        doc = json.loads(buf)
        assert doc.get("ok"), doc
        return doc

    def sink_files(self):
        return os.listdir(f"{self.wd.path}/sink")

    def close(self):
        try:
            if self.d is not None and self.d.proc.poll() is None:
                assert self.d.stop_clean() == 0
        finally:
            try:
                if self.mx is not None and self.mx.proc.poll() is None:
                    self.mx.stop_clean()
            finally:
                if self.sink is not None:
                    self.sink.kill()
                    self.sink.wait()
                self.wd.cleanup()


def connectable(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def tlsrpt_tlsa(r, want):
    """The TLS report's counts (SPOOL/tlsrpt.state, written within a
    second) once they hold want: [(success, failure, mx, records, [failure
    result types], [their MX host names])] of the DANE (tlsa) policies; mx
    names the policy (the TLSA base domain)."""
    path = os.path.join(r.wd.path, "spool", "tlsrpt.state")

    def read():
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        pols, cur = [], None
        for ln in lines:
            x = ln.split(" ")
            if x[0] == "P":
                cur = None
                if x[1] == "tlsa":
                    cur = (int(x[2]), int(x[3]), x[4], x[5], [], [])
                    pols.append(cur)
            elif x[0] == "F" and cur is not None:
                cur[4].append(x[1])
                cur[5].append(x[3])
        return pols if want(pols) else None
    return wait_until(read, 30, "the TLS report's tlsa counts")


def delivered_case(case, domain, usage, policy_mx=None):
    r = Relay(case)
    try:
        r.inject(f"a@{domain}")
        line = r.d.wait_log("event=delivered", timeout=30)
        assert 'tls="TLSv1.' in line, line
        dane = r.d.wait_log("event=tls_dane", timeout=5)
        assert "authenticated=yes" in dane and f"usage={usage}" in dane, dane
        r.mx.wait_log("event=queued", timeout=10)
        assert r.mx.count_log("event=connect ") >= 1  # what no_connect looks for
        st = r.stats()
        assert st["connections"]["dane_authenticated"] >= 1, st["connections"]
        assert st["connections"]["dane_failed"] == 0, st["connections"]
        assert st["dns"]["tlsa_secure"] >= 1 and st["dns"]["tlsa_failed"] == 0, st["dns"]
        # TLS reporting (RFC 8460): a success under policy type tlsa, the
        # MX host's records as its policy string.
        pols = tlsrpt_tlsa(r, lambda p: any(x[0] >= 1 for x in p))
        want = "3:" if usage == "dane-ee" else "2:"
        assert len(pols) == 1 and pols[0][1] == 0, pols
        assert any(x.startswith(want) for x in pols[0][3].split(",")), pols
        if policy_mx is not None:  # the TLSA base domain names the policy
            assert pols[0][2] == policy_mx, pols
    finally:
        r.close()


def test_dane_ee_match_delivers_authenticated():
    delivered_case("ee", "ee.dane.test", "dane-ee")


def test_dane_ta_chain_delivers_authenticated():
    delivered_case("ta", "ta.dane.test", "dane-ta")


def test_cname_mx_host_uses_the_targets_tlsa_first():
    # alias-ee's own TLSA matches nothing: only the target's authenticates.
    delivered_case("ee", "cn.dane.test", "dane-ee")


def test_cname_mx_host_falls_back_to_the_alias_tlsa():
    delivered_case("none", "cn2.dane.test", "dane-ee")


def test_cname_mx_host_dane_ta_names_the_target():
    # TLSA at the target: it is the base domain, SNI and the name checked.
    delivered_case("ta", "cn3.dane.test", "dane-ta", policy_mx="mx-ta.dane.test")


def test_cname_mx_host_dane_ta_alias_records_accept_the_target_name():
    # TLSA at the alias, the certificate names only the chain's end: both
    # names are reference identifiers (RFC 7672 3.2.2).
    delivered_case("ta2", "cn4.dane.test", "dane-ta", policy_mx="alias-ta2.dane.test")


def deferred_case(case, domain, expect, domain_conf="", no_connect=False, tlsrpt=None,
                  policy_mx=None):
    r = Relay(case, domain_conf)
    try:
        r.inject(f"a@{domain}")
        line = r.d.wait_log("event=deferred", timeout=30)
        assert r.d.count_log("event=delivered") == 0, line
        assert expect in line, line
        assert r.d.count_log("event=dane_failed") + r.d.count_log("event=dane_tempfail") >= 1
        st = r.stats()
        assert st["connections"]["dane_failed"] >= 1, st["connections"]
        assert st["connections"]["dane_authenticated"] == 0, st["connections"]
        if r.mx is not None:
            assert r.mx.count_log("event=queued") == 0, r.mx.lines
            if no_connect:
                # a host whose TLSA lookup failed is not even connected to
                assert r.mx.count_log("event=connect ") == 0, r.mx.lines
        else:
            assert r.sink_files() == []
        if tlsrpt is not None:  # the failure in the TLS report, under tlsa
            pols = tlsrpt_tlsa(r, lambda p: any(tlsrpt in x[4] for x in p))
            assert all(x[0] == 0 for x in pols), pols
            if policy_mx is not None:
                assert [x[2] for x in pols] == [policy_mx], pols
        return r.d.lines[:]
    finally:
        r.close()


def test_dane_domain_never_rides_an_opportunistic_connection():
    # y.plain.test (unsigned: no DANE) and ee.dane.test (DANE) name the same
    # MX host, so they share a site and its idle connections. The
    # opportunistic connection left idle by the first must not carry the
    # second's mail: that one opens its own, authenticated.
    r = Relay("ee", idle="60s")
    try:
        r.inject("a@y.plain.test")
        r.d.wait_log("event=delivered", timeout=30)
        assert r.d.count_log("event=tls_dane") == 0, r.d.lines[-10:]
        r.inject("b@ee.dane.test")
        r.d.wait_log_count("event=delivered", 2, timeout=30)
        dane = r.d.wait_log("event=tls_dane", timeout=5)
        assert "authenticated=yes" in dane and "domain=ee.dane.test" in dane, dane
        assert r.mx.count_log("event=connect ") == 2, r.mx.lines
    finally:
        r.close()


def test_tlsa_mismatch_defers():
    lines = deferred_case("bad", "bad.dane.test", "DANE: TLS handshake failed",
                          tlsrpt="validation-failure")
    assert any("event=tls_failed" in ln and "tls_policy=dane" in ln and "TLSA" in ln
               for ln in lines), "\n".join(lines[-20:])
    # The deferral's text (a DSN's diagnostic) says why, not only that.
    deferred = [ln for ln in lines if "event=deferred" in ln]
    assert deferred and all("TLS handshake failed: certificate verify failed" in ln and "TLSA" in ln
                            for ln in deferred), deferred
    # ... under the policy the connection had (the domain's own,
    # opportunistic, before: the deferral of every address failed knew
    # nothing of DANE).
    assert all("tls_policy=dane" in ln for ln in deferred), deferred


def test_stripped_starttls_defers_for_a_dane_host():
    # tls = off for the domain: DANE comes first.
    deferred_case("strip", "strip.dane.test", "DANE: TLS required by policy but STARTTLS not offered",
                  "[domain strip.dane.test]\ntls = off\n", tlsrpt="starttls-not-supported")


def test_unusable_tlsa_still_makes_tls_mandatory():
    deferred_case("strip", "pkix.dane.test",
                  "DANE: TLS required by policy but STARTTLS not offered")


def test_bogus_tlsa_answer_defers():
    deferred_case("bogus", "bogus.dane.test", "DANE: TLSA lookup for _25._tcp.mx-bogus.dane.test",
                  no_connect=True, tlsrpt="dnssec-invalid")


def test_bogus_tlsa_at_a_cname_target_names_the_target():
    # The target's lookup failed: that is the name the deferral and the TLS
    # report give; the failure row keeps the MX record's name.
    r = Relay("bogus")
    try:
        r.inject("a@cn5.dane.test")
        line = r.d.wait_log("event=deferred", timeout=30)
        assert "DANE: TLSA lookup for _25._tcp.mx-bogus.dane.test failed" in line, line
        assert r.mx.count_log("event=connect ") == 0, r.mx.lines
        pols = tlsrpt_tlsa(r, lambda p: any("dnssec-invalid" in x[4] for x in p))
        want = [("mx-bogus.dane.test", ["alias-bogus.dane.test"])]
        assert [(x[2], x[5]) for x in pols] == want, pols
    finally:
        r.close()


def opportunistic_case(case, domain):
    r = Relay(case)
    try:
        r.inject(f"a@{domain}")
        line = r.d.wait_log("event=delivered", timeout=30)
        assert 'tls="TLSv1.' in line, line
        assert r.d.count_log("event=tls_dane") == 0
        r.mx.wait_log("event=queued", timeout=10)
    finally:
        r.close()


def test_signed_zone_without_tlsa_is_opportunistic():
    opportunistic_case("none", "none.dane.test")


def test_unsigned_zone_is_opportunistic_whatever_its_tlsa():
    opportunistic_case("plain", "x.plain.test")


def test_check_config_refuses_a_remote_resolver():
    wd = Workdir("sluice-dane-cc-")
    try:
        conf = wd.file("c.conf", f"[queue]\npath = {wd.path}/spool\n[dns]\n"
                       "servers = 192.0.2.53\ndnssec = trust_ad\n")
        res = run([SLUICE, "-c", conf, "--check-config"])
        assert res.returncode != 0 and "loopback" in res.stderr, res.stderr
        conf = wd.file("d.conf", f"[queue]\npath = {wd.path}/spool\n[dns]\n"
                       "servers = 127.0.0.1:5353\ndnssec = trust_ad\n")
        res = run([SLUICE, "-c", conf, "--check-config"])
        assert res.returncode == 0, res.stderr
        assert "validating resolver" in res.stdout, res.stdout
    finally:
        wd.cleanup()


if __name__ == "__main__":
    ENV = Env()
    try:
        main([test_dane_ee_match_delivers_authenticated, test_dane_ta_chain_delivers_authenticated,
              test_cname_mx_host_uses_the_targets_tlsa_first,
              test_cname_mx_host_falls_back_to_the_alias_tlsa,
              test_cname_mx_host_dane_ta_names_the_target,
              test_cname_mx_host_dane_ta_alias_records_accept_the_target_name,
              test_dane_domain_never_rides_an_opportunistic_connection,
              test_tlsa_mismatch_defers, test_stripped_starttls_defers_for_a_dane_host,
              test_unusable_tlsa_still_makes_tls_mandatory,
              test_bogus_tlsa_answer_defers, test_bogus_tlsa_at_a_cname_target_names_the_target,
              test_signed_zone_without_tlsa_is_opportunistic,
              test_unsigned_zone_is_opportunistic_whatever_its_tlsa,
              test_check_config_refuses_a_remote_resolver])
    finally:
        ENV.close()
