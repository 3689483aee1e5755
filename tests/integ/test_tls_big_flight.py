"""A TLS flight larger than the per-connection ciphertext buffer (16 KB),
and than one record: certificates of 16 and 30 KB (hundreds of subject
alternative names, as on shared hosting MX hosts). Both sides of
sluice must carry it: the submission server sends it to Python's ssl, and
the outbound side receives it from another sluice acting as the MX, with
tls = verify (the certificate is the CA), and delivers."""
import hashlib
import os
import socket
import ssl
import sys

from harness import run, skip

SLUICE = sys.argv[1]


def big_cert(dirpath, stem, n):
    """A self-signed certificate for mx.test with n more names."""
    names = ",".join(["DNS:mx.test"] + [f"DNS:host-{i:04d}.customer.example.test"
                                        for i in range(n)])
    r = run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=mx.test", "-addext", f"subjectAltName={names}",
             "-keyout", f"{dirpath}/{stem}-key.pem", "-out", f"{dirpath}/{stem}-cert.pem"])
    assert r.returncode == 0, r.stderr
    der = ssl.PEM_cert_to_DER_cert(open(f"{dirpath}/{stem}-cert.pem").read())
    assert len(der) > 15000, f"certificate of {len(der)} octets: not big enough"
    return hashlib.sha256(der).hexdigest()


def big_flight(nsan):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_delivery
    from test_delivery import Relay, records_for
    from harness import Sluice
    test_delivery.SLUICE = SLUICE
    r = Relay(records_for(["big.test"]), with_sink=False,
              domain_conf="[domain big.test]\ntls = verify\n")
    mx = None
    try:
        p = r.wd.path
        fp = big_cert(p, "mx", nsan)
        conf = r.wd.file("mx.conf", f"""
[server]
workers = 1
listen = 127.0.0.1:{r.mx_port}
trusted_networks = 127.0.0.0/8
[queue]
path = {p}/mx-spool
map_size = 64M
[delivery]
enabled = no
[tls]
cert_file = {p}/mx-cert.pem
key_file = {p}/mx-key.pem
""")
        mx = Sluice(SLUICE, conf)
        mx.wait_log("event=ready")

        # Inbound: a client's STARTTLS to the MX gets the whole chain.
        s = socket.create_connection(("127.0.0.1", r.mx_port), timeout=20)
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"EHLO c\r\n")
        while f.readline()[3:4] == b"-":
            pass
        s.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220")
        ctx = ssl.create_default_context(cafile=f"{p}/mx-cert.pem")
        ctx.check_hostname = True
        t = ctx.wrap_socket(s, server_hostname="mx.test")
        assert hashlib.sha256(t.getpeercert(binary_form=True)).hexdigest() == fp
        t.sendall(b"QUIT\r\n")
        assert t.recv(100).startswith(b"221")
        t.close()

        # Outbound: sluice verifies it against the CA file and delivers.
        rconf = os.path.join(p, "sluice.conf")
        with open(rconf, "a") as fh:
            fh.write(f"\n[tls]\nca_file = {p}/mx-cert.pem\n")
        r.d.stop_clean()
        r.d = Sluice(SLUICE, rconf)
        r.d.wait_log("event=ready")
        r.inject([("s@example.com", ["a@big.test"], b"Subject: big\r\n\r\nbig chain\r\n")])
        line = r.d.wait_log("event=delivered", timeout=30)
        assert 'tls="TLSv1.' in line, line
        mx.wait_log("event=queued", timeout=10)
    finally:
        if mx is not None:
            mx.stop_clean()
        r.close()


def test_flight_just_over_the_buffer():
    """~16.5 KB: the server's whole flight fits one 17 KB read but not the
    conn's 16 KB buffer; once the conn is full, what is left in the read
    buffer must still be fed after OpenSSL takes the first part, although
    the server sends nothing more until the client answers (this stalled
    outbound handshakes for 5 minutes)."""
    big_flight(475)


def test_flight_over_two_records():
    """~30 KB: the certificate alone spans two records."""
    big_flight(900)


if __name__ == "__main__":
    if run(["which", "openssl"]).returncode != 0:
        skip("openssl not installed (tools/install-deps --test)")
    from harness import main
    main([test_flight_just_over_the_buffer, test_flight_over_two_records])
