"""SIGHUP applies [tls]: a certificate renewed in place is served to new
clients while sessions already open keep theirs; a new min_protocol takes
effect; a broken certificate, key or CA file refuses the whole reload
with a clear log line and the running settings stay. Outbound: a domain
switched to tls = verify with a new ca_file fails verification before the
reload and delivers after it, with no restart (a second sluice is the TLS
receiver, as in test_delivery.py)."""
import hashlib
import os
import signal
import socket
import ssl
import sys

from harness import Sluice, Workdir, free_port, main, run, skip

SLUICE = sys.argv[1]


def make_cert(dirpath, stem, cn):
    r = run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={cn}", "-keyout", f"{dirpath}/{stem}.key",
             "-out", f"{dirpath}/{stem}.pem"])
    assert r.returncode == 0, r.stderr
    der = ssl.PEM_cert_to_DER_cert(open(f"{dirpath}/{stem}.pem").read())
    return hashlib.sha256(der).hexdigest()


def install(dirpath, stem):
    """Put stem's certificate and key where the config points, each by a
    rename, as a renewal tool does (the key first: it is read second)."""
    for src, dst in ((f"{stem}.key", "key.pem"), (f"{stem}.pem", "cert.pem")):
        with open(os.path.join(dirpath, src), "rb") as f:
            data = f.read()
        tmp = os.path.join(dirpath, dst + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, os.path.join(dirpath, dst))


def client_ctx(max_version=None):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


class TlsLine:
    """An implicit-TLS or STARTTLS session: its peer certificate's
    fingerprint and a command at a time."""

    def __init__(self, port, starttls, ctx=None):
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""
        self.sock = s
        if starttls:
            self.expect(b"220")
            s.sendall(b"EHLO c\r\n")
            self.expect(b"250")
            s.sendall(b"STARTTLS\r\n")
            self.expect(b"220")
        self.sock = (ctx or client_ctx()).wrap_socket(s, server_hostname="localhost")
        if not starttls:
            self.expect(b"220")
        self.sock.sendall(b"EHLO c\r\n")
        self.expect(b"250")
        self.fingerprint = hashlib.sha256(self.sock.getpeercert(binary_form=True)).hexdigest()

    def expect(self, code):
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(4096)
                assert chunk, f"closed; wanted {code}"
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                assert line.startswith(code), f"wanted {code}, got {line!r}"
                return line

    def cmd(self, line, code):
        self.sock.sendall(line + b"\r\n")
        return self.expect(code)

    def close(self):
        self.sock.close()


def test_server_certificate_and_protocols_on_sighup():
    wd = Workdir("sluice-tlsr-")
    d = None
    try:
        p = wd.path
        fp_a = make_cert(p, "a", "a.example.test")
        fp_b = make_cert(p, "b", "b.example.test")
        make_cert(p, "c", "c.example.test")
        install(p, "a")
        port, tls_port = free_port(), free_port()
        conf_text = f"""
[server]
workers = 2
listen = 127.0.0.1:{port}
listen_tls = 127.0.0.1:{tls_port}
trusted_networks = 127.0.0.0/8
[queue]
path = {p}/spool
map_size = 64M
[delivery]
enabled = no
[tls]
cert_file = {p}/cert.pem
key_file = {p}/key.pem
"""
        conf = wd.file("sluice.conf", conf_text)
        d = Sluice(SLUICE, conf)
        d.wait_log("event=ready")
        early = TlsLine(tls_port, False)
        assert early.fingerprint == fp_a
        assert TlsLine(port, True).fingerprint == fp_a

        # Renewed in place: same paths, new files.
        install(p, "b")
        d.signal(signal.SIGHUP)
        d.wait_log_count("event=config_reloaded", 1)
        assert d.count_log("event=reload_kept") == 0, d.log_lines("event=reload_kept")
        for starttls in (False, True):
            assert TlsLine(tls_port if not starttls else port, starttls).fingerprint == fp_b, \
                "the renewed certificate must be served after SIGHUP"
        # The session opened before keeps its TLS and goes on.
        early.cmd(b"MAIL FROM:<a@example.com>", b"250")
        early.cmd(b"RCPT TO:<b@example.org>", b"250")
        early.cmd(b"DATA", b"354")
        early.cmd(b"Subject: across a reload\r\n\r\nok\r\n.", b"250")
        early.close()

        # A key that belongs to another certificate: refused whole.
        with open(os.path.join(p, "c.key"), "rb") as f:
            other_key = f.read()
        with open(os.path.join(p, "key.pem"), "wb") as f:
            f.write(other_key)
        d.signal(signal.SIGHUP)
        line = d.wait_log("event=reload_refused")
        assert "key_file" in line and "does not match" in line, line
        # on the line of the key, as any other error of the file (and
        # --check-config finds it: it said ok before)
        key_line = conf_text.splitlines().index(f"key_file = {p}/key.pem") + 1
        assert f"{conf}:{key_line}: [tls] key_file" in line, line
        chk = run([SLUICE, "-c", conf, "--check-config"])
        assert chk.returncode == 1, chk
        assert f"{conf}:{key_line}: [tls] key_file" in chk.stdout + chk.stderr, chk
        d.wait_log("event=reload_failed what=config")
        assert TlsLine(tls_port, False).fingerprint == fp_b, "the running certificate stays"
        # A certificate file that is not PEM: refused too.
        install(p, "b")
        with open(os.path.join(p, "cert.pem"), "w") as f:
            f.write("not a certificate\n")
        d.signal(signal.SIGHUP)
        line = d.wait_log_count("event=reload_refused", 2)[-1]
        assert "cert_file" in line, line
        assert TlsLine(port, True).fingerprint == fp_b

        # Fixed, and the protocol floor raised: TLS 1.2 clients are refused.
        install(p, "a")
        assert TlsLine(tls_port, False, client_ctx(ssl.TLSVersion.TLSv1_2)).fingerprint == fp_b
        with open(conf, "w") as f:
            f.write(conf_text + "min_protocol = TLSv1.3\n")
        d.signal(signal.SIGHUP)
        d.wait_log_count("event=config_reloaded", 2)
        try:
            TlsLine(tls_port, False, client_ctx(ssl.TLSVersion.TLSv1_2))
            raise AssertionError("a TLS 1.2 client got in after min_protocol = TLSv1.3")
        except ssl.SSLError as e:
            assert "PROTOCOL_VERSION" in str(e), e
        assert TlsLine(tls_port, False).fingerprint == fp_a
        assert d.proc.poll() is None
        d.stop_clean()
    finally:
        if d is not None and d.proc.poll() is None:
            d.stop()
        wd.cleanup()


def test_verify_delivery_with_ca_file_after_sighup():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_delivery
    from test_delivery import Relay, records_for, tls_receiver
    test_delivery.SLUICE = SLUICE
    r = Relay(records_for(["verify.test"]), with_sink=False,
              domain_conf="[domain verify.test]\ntls = verify\nretry_schedule = 1s\n"
                          "site_hold = 0\n")
    mx = None
    try:
        mx = tls_receiver(r)  # self-signed CN=mx.test: trusted by nobody yet
        r.inject([("s@example.com", ["a@verify.test"], b"Subject: v\r\n\r\nverify me\r\n")])
        r.d.wait_log_count("event=deferred", 2, timeout=30)  # first try and a retry
        assert r.d.count_log("event=delivered") == 0
        assert mx.count_log("event=queued") == 0

        conf = os.path.join(r.wd.path, "sluice.conf")
        with open(conf) as f:
            text = f.read()
        # A CA file that is not there: the reload is refused, nothing changes.
        with open(conf, "w") as f:
            f.write(text + f"\n[tls]\nca_file = {r.wd.path}/no-such-ca.pem\n")
        r.d.signal(signal.SIGHUP)
        line = r.d.wait_log("event=reload_refused")
        assert "ca_file" in line and "no-such-ca.pem" in line, line
        r.d.wait_log("event=reload_failed what=config")
        deferred = r.d.count_log("event=deferred")
        r.d.wait_log_count("event=deferred", deferred + 1, timeout=30)
        assert r.d.count_log("event=delivered") == 0

        # The receiver's certificate as the CA: verified and delivered.
        with open(conf, "w") as f:
            f.write(text + f"\n[tls]\nca_file = {r.wd.path}/mx-cert.pem\n")
        r.d.signal(signal.SIGHUP)
        r.d.wait_log("event=config_reloaded")
        assert r.d.count_log("event=reload_kept") == 0, r.d.log_lines("event=reload_kept")
        line = r.d.wait_log("event=delivered", timeout=30)
        assert 'tls="TLSv1.' in line, line
        mx.wait_log("event=queued", timeout=10)
        assert mx.count_log("event=queued") == 1
    finally:
        if mx is not None:
            mx.stop_clean()
        r.close()


if __name__ == "__main__":
    if run(["which", "openssl"]).returncode != 0:
        skip("openssl not installed (tools/install-deps --test)")
    main([test_server_certificate_and_protocols_on_sighup,
          test_verify_delivery_with_ca_file_after_sighup])
