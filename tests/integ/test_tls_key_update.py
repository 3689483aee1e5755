"""TLS 1.3 KeyUpdate requests (update_requested: each asks for an answer,
which OpenSSL writes at once) sent in one write with something after them.

- A burst within the budget (BURST, under tls/conn.c's KEY_UPDATE_FREE of
  32): sluice takes them on and answers what follows at once. Inbound, a
  submission client (STARTTLS and implicit TLS) sends them, then NOOP: the
  250 comes within seconds (the command deadline is 60 s). Outbound, the
  receiving MX sends them between the 220 to STARTTLS and its EHLO reply:
  the message is delivered within seconds (the reply deadline is 5 min).
- A flood (FLOOD, whose answers are more than the connection's output
  buffer holds): past the budget the connection fails at once, not at the
  next deadline: inbound, the session is closed within seconds and logged
  as a TLS failure (event=tls_failed, the flood in its detail); outbound,
  the recipient is deferred within seconds with the TLS failure as its
  reason (reason=tls, class tls_failure, the flood in the reply text, in
  the log line and the delivery log alike; not "lost connection").

Python's ssl cannot send a KeyUpdate on demand: the peers are ssl.SSLObject
over memory BIOs, and ctypes calls SSL_key_update on the SSL of the object
(the same libssl that Python's _ssl uses). Skips (77) where that cannot be
done safely."""
import ctypes
import ctypes.util
import os
import socket
import ssl
import sys
import threading

from harness import main, read_jsonl, run, skip, wait_until

SLUICE = sys.argv[1]
FLOOD = 800  # 800 answers of 27 octets: 21 KB, over the output buffer
BURST = 30   # within the budget of key updates
# The smallest ciphertext buffers (4 KB each way): the flood's answers
# fill the output several times over, and the input holds the flood's
# end while they do.
BUFFER = "buffer_size = 4K"


def _libssl():
    """libssl as Python's _ssl uses it, or None."""
    if sys.implementation.name != "cpython" or not ssl.OPENSSL_VERSION.startswith("OpenSSL 3"):
        return None
    import _ssl  # noqa: F401 (loaded: its libssl is in /proc/self/maps)
    for name in ("libssl.so.3", ctypes.util.find_library("ssl")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.OpenSSL_version_num.restype = ctypes.c_ulong
        if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
            continue
        if not any(name in line for line in open("/proc/self/maps") if "libssl" in line):
            continue  # not the library _ssl loaded
        for fn in ("SSL_key_update", "SSL_do_handshake", "SSL_version", "SSL_is_server"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p] + ([ctypes.c_int]
                                                              if fn == "SSL_key_update" else [])
        return lib
    return None


LIB = None


def ssl_of(obj):
    """The SSL * of an ssl.SSLObject: _ssl._SSLSocket begins with
    PyObject_HEAD, then PyObject *Socket, then SSL *ssl (CPython 3.x)."""
    p = ctypes.sizeof(ctypes.c_void_p)
    return ctypes.c_void_p.from_address(id(obj._sslobj) + 3 * p).value


def flood(obj, server_side, n):
    """Queue n KeyUpdate requests in obj's outgoing BIO."""
    s = ssl_of(obj)
    assert LIB.SSL_version(s) == 0x0304, "not TLSv1.3"
    assert LIB.SSL_is_server(s) == int(server_side)
    for i in range(n):
        assert LIB.SSL_key_update(s, 1) == 1, i  # SSL_KEY_UPDATE_REQUESTED
        assert LIB.SSL_do_handshake(s) == 1, i


class Peer:
    """TLS over memory BIOs on a blocking socket: every byte moved here."""

    def __init__(self, sock, ctx, server_side):
        self.sock = sock
        self.inc, self.outg = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.outg, server_side=server_side,
                                server_hostname=None if server_side else "localhost")
        self.server_side = server_side
        self.plain = b""

    def pump_out(self):
        data = self.outg.read()
        if data:
            self.sock.sendall(data)

    def pump_in(self):
        data = self.sock.recv(65536)
        if not data:
            raise AssertionError(f"closed by sluice; have {self.plain!r}")
        self.inc.write(data)

    def handshake(self):
        while True:
            try:
                self.obj.do_handshake()
                self.pump_out()
                return
            except ssl.SSLWantReadError:
                self.pump_out()
                self.pump_in()

    def flood_and_send(self, data, n):
        """n key update requests and data, in one write."""
        flood(self.obj, self.server_side, n)
        self.obj.write(data)
        self.pump_out()

    def line(self):
        """The next line of plaintext (a reply or a command)."""
        while b"\r\n" not in self.plain:
            try:
                self.plain += self.obj.read(65536)
                continue
            except ssl.SSLWantReadError:
                pass
            self.pump_out()
            self.pump_in()
        ln, self.plain = self.plain.split(b"\r\n", 1)
        return ln

    def reply(self):
        while True:
            ln = self.line()
            if ln[3:4] != b"-":
                return ln


def plain_lines(sock, until):
    buf = b""
    while not any(ln.startswith(until) for ln in buf.split(b"\r\n")[:-1]):
        chunk = sock.recv(4096)
        assert chunk, buf
        buf += chunk
    return buf


# ---- inbound ----

def test_inbound_flood():
    """A submission client floods after its handshake, then NOOPs."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_tls_hostile
    test_tls_hostile.SLUICE = SLUICE
    srv = test_tls_hostile.Server(tls_extra=BUFFER)
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        nflood = 0
        for mode in ("starttls", "implicit"):
            sock = socket.create_connection(("127.0.0.1", srv.port_for(mode)), timeout=30)
            if mode == "starttls":
                plain_lines(sock, b"220 ")
                sock.sendall(b"EHLO client\r\nSTARTTLS\r\n")
                plain_lines(sock, b"220 2.0.0")
            c = Peer(sock, ctx, False)
            c.handshake()
            if mode == "implicit":
                assert c.reply().startswith(b"220")
            c.obj.write(b"EHLO client\r\n")
            c.pump_out()
            assert c.reply().startswith(b"250")
            # Well under the 60 s command deadline: a stalled session
            # would answer only with its 421 at the deadline.
            sock.settimeout(10)
            c.flood_and_send(b"NOOP\r\n", BURST)
            r = c.reply()
            assert r.startswith(b"250"), f"{mode}: {r!r}"
            # A flood past the budget: the session ends at once.
            c.flood_and_send(b"NOOP\r\n", FLOOD)
            try:
                r = c.reply()
                raise AssertionError(f"{mode}: answered after a flood: {r!r}")
            except (AssertionError, ssl.SSLError, ConnectionError) as e:
                assert "answered after a flood" not in str(e), e
            sock.close()
            # Logged as what it was: a TLS failure, the flood named.
            failed = srv.d.wait_log_count("event=tls_failed", nflood + 1, timeout=10)
            nflood += 1
            assert "a flood" in failed[-1] and "state=command" in failed[-1], failed[-1]
        srv.wait_no_sessions()
    finally:
        srv.close()


# ---- outbound ----

def hostile_mx(lsock, cert, key, result, n):
    """One SMTP session as the MX: STARTTLS, then n key update requests
    ahead of the EHLO reply, then an ordinary transaction."""
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cert, key)
        sock, _ = lsock.accept()
        sock.settimeout(60)
        sock.sendall(b"220 mx.test ESMTP\r\n")
        plain_lines(sock, b"EHLO")
        sock.sendall(b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
        plain_lines(sock, b"STARTTLS")
        sock.sendall(b"220 2.0.0 go ahead\r\n")
        p = Peer(sock, ctx, True)
        p.handshake()
        assert p.line().startswith(b"EHLO")
        p.flood_and_send(b"250-mx.test\r\n250 PIPELINING\r\n", n)
        # Replies as the commands come; the message up to its final dot.
        while True:
            ln = p.line()
            verb = ln[:4].upper()
            if verb in (b"MAIL", b"RCPT"):
                p.obj.write(b"250 2.1.0 ok\r\n")
            elif verb == b"DATA":
                p.obj.write(b"354 go\r\n")
                p.pump_out()
                while p.line() != b".":
                    pass
                p.obj.write(b"250 2.0.0 queued\r\n")
                result["delivered"] = True
            elif verb == b"QUIT":
                p.obj.write(b"221 bye\r\n")
                p.pump_out()
                break
            elif verb == b"RSET" or verb == b"NOOP":
                p.obj.write(b"250 ok\r\n")
            else:
                p.obj.write(b"502 no\r\n")
            p.pump_out()
        sock.close()
    except Exception as e:  # reported by the test
        result.setdefault("error", repr(e))


def outbound_case(n, flood):
    """The MX sends n key update requests between STARTTLS and its EHLO
    reply. Within the budget the message is delivered, a flood fails the
    connection and the recipient is deferred: both well before the
    5-minute reply deadline."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_delivery
    from test_delivery import Relay, records_for
    test_delivery.SLUICE = SLUICE
    r = Relay(records_for(["ku.test"]), with_sink=False,
              domain_conf=f"[domain ku.test]\ntls = required\n[tls]\n{BUFFER}\n"
                          "[log]\ndelivery_log = @DLOG@\ndelivery_log_flush = 50ms\n")
    lsock = None
    t = None
    try:
        p = r.wd.path
        rc = run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                  "-subj", "/CN=mx.test", "-keyout", f"{p}/mx-key.pem", "-out",
                  f"{p}/mx-cert.pem"])
        assert rc.returncode == 0, rc.stderr
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", r.mx_port))
        lsock.listen(4)
        lsock.settimeout(60)
        result = {}
        t = threading.Thread(target=hostile_mx,
                             args=(lsock, f"{p}/mx-cert.pem", f"{p}/mx-key.pem", result, n),
                             daemon=True)
        t.start()
        r.inject([("a@sender.test", ["x@ku.test"], b"Subject: ku\r\n\r\nhello\r\n")], sessions=1)
        if flood:
            line = r.d.wait_log("event=deferred", timeout=30)
            assert "ku.test" in line or "x@ku.test" in line, line
            assert r.d.count_log("event=delivered") == 0
            # The TLS failure is the reason, in OpenSSL's (here tls/conn.c's)
            # words: not "eof", "lost connection in state ehlo".
            assert " reason=tls " in line and "class=tls_failure" in line, line
            assert "key updates" in line and "a flood" in line, line
            assert "lost connection" not in line, line
            conn = r.d.wait_log("event=tls_failed", timeout=10)
            assert "state=ehlo" in conn and "a flood" in conn, conn

            def deferrals():
                return [e for e in read_jsonl(r.dlog) if e["event"] == "transient_failure"]
            wait_until(lambda: deferrals(), 10, "the deferral in the delivery log")
            ev = deferrals()[0]
            assert ev["rcpt"] == "x@ku.test", ev
            assert ev["reason"] == "tls" and ev["class"] == "tls_failure", ev
            assert "key updates" in ev["reply"] and "a flood" in ev["reply"], ev
            t.join(30)
            assert not t.is_alive(), "the MX session did not end"
            return
        line = r.d.wait_log("event=delivered", timeout=30)
        assert "ku.test" in line, line
        t.join(30)
        assert not t.is_alive(), "the MX session did not end"
        assert "error" not in result, result
        assert result.get("delivered"), result
    finally:
        if lsock is not None:
            lsock.close()
        r.close()


def test_outbound_burst():
    outbound_case(BURST, False)


def test_outbound_flood():
    outbound_case(FLOOD, True)


if __name__ == "__main__":
    if run(["which", "openssl"]).returncode != 0:
        skip("openssl not installed (tools/install-deps --test)")
    LIB = _libssl()
    if LIB is None:
        skip("no libssl 3 matching Python's ssl module to call SSL_key_update through")
    main([test_inbound_flood, test_outbound_burst, test_outbound_flood])
