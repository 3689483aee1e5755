"""Submission over TLS: STARTTLS and implicit TLS with real clients (swaks,
Python's ssl), AUTH only after TLS, and the attacks on STARTTLS: pipelined
plaintext after STARTTLS is dropped (CVE-2011-0411), plaintext injected
into the TLS stream ends the session, garbage instead of a handshake."""
import os
import socket
import ssl
import subprocess
import sys
import time

from harness import Daemon, Workdir, free_port, main, run, skip, wait_until

SLUICE = sys.argv[1]

PASSWORD = "s3cret-Pw"


class Server:
    def __init__(self, extra=""):
        self.wd = Workdir("sluice-tls-")
        p = self.wd.path
        r = run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", "/CN=localhost", "-keyout", f"{p}/key.pem", "-out", f"{p}/cert.pem"])
        assert r.returncode == 0, r.stderr
        h = run(["openssl", "passwd", "-6", PASSWORD]).stdout.strip()
        self.wd.file("users", f"alice:{h}\n")
        self.port, self.tls_port = free_port(), free_port()
        conf = self.wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{self.port}
listen_tls = 127.0.0.1:{self.tls_port}
auth_users_file = {p}/users
plaintext_auth = never
auth_fail_delay = 0
{extra}
[queue]
path = {p}/spool
map_size = 64M
[delivery]
enabled = no
[tls]
cert_file = {p}/cert.pem
key_file = {p}/key.pem
""")
        self.d = Daemon(SLUICE, conf)
        self.d.wait_log("event=ready")

    def queued(self):
        return [ln for ln in self.d.lines if "event=queued" in ln]

    def close(self):
        try:
            assert self.d.stop() == 0
            bad = [ln for ln in self.d.lines if "AddressSanitizer" in ln or "runtime error" in ln]
            assert not bad, bad
        finally:
            self.wd.cleanup()


def swaks(*args):
    return subprocess.run(["swaks", "--from", "alice@example.com", "--to", "bob@example.org",
                           "--timeout", "20", *args], capture_output=True, text=True, timeout=60)


class Conn:
    """A line-oriented SMTP client over a socket that can start TLS."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, data):
        self.s.sendall(data)

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.s.recv(4096)
            if not chunk:
                raise EOFError("closed")
            self.buf += chunk
        ln, self.buf = self.buf.split(b"\r\n", 1)
        return ln.decode()

    def reply(self):
        lines = [self.line()]
        while lines[-1][3:4] == "-":
            lines.append(self.line())
        return lines

    def starttls(self):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.s = ctx.wrap_socket(self.s, server_hostname="localhost")

    def closed(self):
        try:
            return self.s.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True


def test_swaks_starttls_auth_plain_pipelined():
    srv = Server()
    try:
        r = swaks("--server", f"127.0.0.1:{srv.port}", "--tls", "--auth", "PLAIN",
                  "--auth-user", "alice", "--auth-password", PASSWORD, "--pipeline")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "250 2.0.0 Ok: queued as" in r.stdout
        # The log is read by another thread: wait for the line, then count.
        assert "user=alice" in srv.d.wait_log("event=queued")
        assert len(srv.queued()) == 1
    finally:
        srv.close()


def test_swaks_implicit_tls_auth_login():
    srv = Server()
    try:
        r = swaks("--server", f"127.0.0.1:{srv.tls_port}", "--tlsc", "--auth", "LOGIN",
                  "--auth-user", "alice", "--auth-password", PASSWORD)
        assert r.returncode == 0, r.stdout + r.stderr
        srv.d.wait_log("event=queued")
        assert len(srv.queued()) == 1
    finally:
        srv.close()


def test_auth_only_after_tls():
    srv = Server()
    try:
        c = Conn(srv.port)
        assert c.reply()[0].startswith("220")
        c.send(b"EHLO client\r\n")
        ehlo = c.reply()
        assert any("STARTTLS" in ln for ln in ehlo)
        assert not any("AUTH" in ln for ln in ehlo), ehlo
        c.send(b"AUTH PLAIN AGFsaWNlAHMzY3JldC1Qdw==\r\n")
        assert c.reply()[0].startswith("538 5.7.11"), "AUTH before TLS must be refused"
        # RFC 4954: an unknown mechanism is 504 before TLS too, not 538
        c.send(b"AUTH FOO\r\n")
        assert c.reply()[0].startswith("504 5.5.4"), "unknown mechanism before TLS"
        c.send(b"AUTH CRAM-MD5\r\n")
        assert c.reply()[0].startswith("504 5.5.4"), "mechanism not offered, before TLS"
        c.send(b"MAIL FROM:<alice@example.com>\r\n")
        assert c.reply()[0].startswith("530 5.7.0")
        c.send(b"STARTTLS\r\n")
        assert c.reply()[0].startswith("220")
        c.starttls()
        c.send(b"EHLO client\r\n")
        ehlo = c.reply()
        assert any("AUTH PLAIN LOGIN" in ln for ln in ehlo), ehlo
        assert not any("STARTTLS" in ln for ln in ehlo), ehlo
        c.send(b"STARTTLS\r\n")
        assert c.reply()[0].startswith("503")
        c.send(b"AUTH PLAIN AGFsaWNlAHMzY3JldC1Qdw==\r\n")
        assert c.reply()[0].startswith("235"), "alice/s3cret-Pw over TLS"
        c.send(b"QUIT\r\n")
        assert c.reply()[0].startswith("221")
    finally:
        srv.close()


def test_plaintext_pipelined_after_starttls_is_dropped():
    """CVE-2011-0411: STARTTLS and RSET in one write: RSET never answered."""
    srv = Server()
    try:
        c = Conn(srv.port)
        c.reply()
        c.send(b"EHLO client\r\n")
        c.reply()
        c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.com>\r\n")
        assert c.reply()[0].startswith("220")
        assert c.buf == b"", f"plaintext after the 220: {c.buf!r}"
        c.starttls()
        c.send(b"NOOP\r\n")
        # The first reply inside TLS answers NOOP; an answer to the injected
        # RSET or MAIL would come first.
        r = c.reply()
        assert r == ["250 2.0.0 Ok"], r
        c.send(b"RCPT TO:<x@example.org>\r\n")
        assert c.reply()[0].startswith("503"), "the injected MAIL must not have counted"
    finally:
        srv.close()


def test_plaintext_injected_into_tls_stream_ends_session():
    srv = Server()
    try:
        c = Conn(srv.port)
        c.reply()
        c.send(b"EHLO client\r\nSTARTTLS\r\n")
        c.reply()
        assert c.reply()[0].startswith("220")
        raw = c.s
        c.starttls()
        c.send(b"EHLO client\r\n")
        c.reply()
        # An attacker on the path writes plaintext into the stream.
        raw_fd = c.s.fileno()
        os.write(raw_fd, b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<v@example.org>\r\nDATA\r\n")
        assert c.closed(), "sluice must end the session on a non-TLS record"
        del raw
        assert srv.queued() == []
    finally:
        srv.close()


def test_garbage_instead_of_handshake():
    srv = Server()
    try:
        s = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10)
        s.sendall(b"EHLO this is not TLS\r\n" * 20)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert b"250" not in data
        s.close()
        # the server is still fine
        r = swaks("--server", f"127.0.0.1:{srv.tls_port}", "--tlsc", "--auth", "PLAIN",
                  "--auth-user", "alice", "--auth-password", PASSWORD)
        assert r.returncode == 0, r.stdout
    finally:
        srv.close()


def test_help_names_what_is_offered():
    """HELP named AUTH where it was not offered (503 "AUTH is not offered
    here": plaintext here, plaintext_auth = never) and never STARTTLS,
    offered: it names them as EHLO shows them, before TLS and after."""
    srv = Server()
    try:
        c = Conn(srv.port)
        c.reply()
        c.send(b"EHLO x\r\nHELP\r\n")
        c.reply()
        assert c.reply() == ["214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT "
                             "VRFY HELP STARTTLS; see RFC 5321"]
        c.send(b"STARTTLS\r\n")
        assert c.reply()[0].startswith("220")
        c.starttls()
        c.send(b"EHLO x\r\nHELP\r\nQUIT\r\n")
        assert "250-AUTH PLAIN LOGIN" in c.reply()
        assert c.reply() == ["214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT "
                             "VRFY HELP AUTH; see RFC 5321"]
        assert c.reply()[0].startswith("221")
    finally:
        srv.close()


def test_wrong_password_over_tls():
    srv = Server()
    try:
        r = swaks("--server", f"127.0.0.1:{srv.port}", "--tls", "--auth", "PLAIN",
                  "--auth-user", "alice", "--auth-password", "wrong")
        assert "535 5.7.8" in r.stdout, r.stdout
        r2 = swaks("--server", f"127.0.0.1:{srv.port}", "--tls", "--auth", "PLAIN",
                   "--auth-user", "nobody", "--auth-password", "wrong")
        assert "535 5.7.8 Authentication credentials invalid" in r2.stdout
        assert srv.queued() == []
    finally:
        srv.close()


def test_implicit_tls_over_connection_limits():
    """On the implicit-TLS port a client over max_clients_per_ip or
    max_clients gets its handshake, then 421 4.7.0 inside TLS and the
    close (as Postfix's smtpd in wrapper mode), not a plaintext 421 that
    its TLS stack reads as a broken record."""
    srv = Server("max_clients = 3\nmax_clients_per_ip = 2\n")
    try:
        def tls_conn(source):
            c = Conn.__new__(Conn)
            c.s = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10,
                                           source_address=(source, 0))
            c.buf = b""
            c.starttls()  # the handshake; a plaintext reply makes it fail
            return c, c.reply()

        held = []
        for src in ("127.0.0.1", "127.0.0.1"):
            c, rep = tls_conn(src)
            assert rep[0].startswith("220 "), rep
            held.append(c)
        c, rep = tls_conn("127.0.0.1")  # a third from one address
        assert rep == ["421 4.7.0 Too many connections: try again later"], rep
        assert c.closed()
        c, rep = tls_conn("127.0.0.2")
        assert rep[0].startswith("220 "), rep
        held.append(c)
        c, rep = tls_conn("127.0.0.3")  # a fourth in all
        assert rep == ["421 4.7.0 Too many connections: try again later"], rep
        assert c.closed()
        # the log is read by another thread: wait for both lines
        wait_until(lambda: len([ln for ln in srv.d.lines if "refused=limit" in ln]) == 2, 10,
                   "two connect lines with refused=limit")
        for c in held:
            c.s.close()
    finally:
        srv.close()


def _tls_over_bios(port):
    """A TLS 1.3 handshake over memory BIOs: (socket, SSLObject, incoming,
    outgoing), the client's Finished still in outgoing, so that the test
    decides which octets go in which segment."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    o = ctx.wrap_bio(inc, out, server_hostname="localhost")
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    for _ in range(100):  # bounded
        try:
            o.do_handshake()
            break
        except ssl.SSLWantReadError:
            if out.pending:
                s.sendall(out.read())
            inc.write(s.recv(65536))
    return s, o, inc, out


def _bio_reply(s, o, inc):
    buf = b""
    for _ in range(100):  # bounded
        if b"\r\n" in buf:
            return buf
        try:
            buf += o.read(4096)
            continue
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            return buf + b"<close_notify>"
        d = s.recv(65536)
        if not d:
            return buf + b"<eof>"
        inc.write(d)
    return buf


def test_greet_pause_on_the_implicit_tls_port():
    """greet_pause holds on the implicit-TLS port too, from the end of the
    handshake (before, the 220 came at once, with no pause, and the early
    talker was served):
    - a client that sends EHLO at once gets 554 inside TLS and the close;
      so does one whose EHLO record came in part with its Finished (and
      the rest after the pause: no whole record to read, ciphertext
      waiting all the same);
    - one that waits gets its 220 after the pause, and swaks delivers;
    - one that ends TLS during the pause (close_notify and its FIN) has
      left: not logged as an early talker;
    - a stop during the pause tells a waiting client 421, plaintext port
      and TLS port alike (before: the connection cut without a word)."""
    srv = Server("greet_pause = 1s\n")
    try:
        early = Conn.__new__(Conn)
        early.s = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10)
        early.buf = b""
        early.starttls()
        early.send(b"EHLO early.example\r\n")
        assert early.reply() == ["554 5.5.1 Protocol error: client sent data before the greeting"]
        assert early.closed()

        s, o, inc, out = _tls_over_bios(srv.tls_port)
        fin = out.read()
        o.write(b"EHLO split.example\r\n")
        rec = out.read()
        s.sendall(fin + rec[:10])
        time.sleep(1.3)  # past the pause: what is tested is a client that waits that long
        s.sendall(rec[10:])
        got = _bio_reply(s, o, inc)
        assert got.startswith(b"554 5.5.1"), got
        s.close()

        polite = Conn.__new__(Conn)
        polite.s = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10)
        polite.buf = b""
        polite.starttls()
        t0 = time.monotonic()
        rep = polite.reply()
        waited = time.monotonic() - t0
        assert rep[0].startswith("220 ") and waited >= 0.9, (rep, waited)
        polite.s.close()
        r = swaks("--server", f"127.0.0.1:{srv.tls_port}", "--tlsc", "--auth", "PLAIN",
                  "--auth-user", "alice", "--auth-password", PASSWORD)
        assert r.returncode == 0, r.stdout + r.stderr
        srv.d.wait_log("event=queued")
        assert len(srv.queued()) == 1

        s, o, inc, out = _tls_over_bios(srv.tls_port)
        s.sendall(out.read())
        try:
            o.unwrap()
        except ssl.SSLWantReadError:
            pass
        s.sendall(out.read())
        s.shutdown(socket.SHUT_WR)
        srv.d.wait_log("state=pregreet")  # event=tls_closed state=pregreet
        s.close()
        assert len([ln for ln in srv.d.lines if "event=pregreet" in ln]) == 2, \
            [ln for ln in srv.d.lines if "event=pregreet" in ln]

        def connects():
            return len([ln for ln in srv.d.lines if "event=connect " in ln])
        before = connects()
        waiting = []
        for port, tls in ((srv.port, False), (srv.tls_port, True)):
            c = Conn(port)
            if tls:
                c.starttls()
            waiting.append(c)
        wait_until(lambda: connects() == before + 2, 10, "both clients taken in")
        assert srv.d.stop() == 0
        for c in waiting:
            assert c.reply() == ["421 4.3.2 Service shutting down: try again later"]
    finally:
        srv.close()


if __name__ == "__main__":
    for tool in ("swaks", "openssl"):
        if run(["which", tool]).returncode != 0:
            skip(f"{tool} not installed (tools/install-deps --test)")
    main([test_swaks_starttls_auth_plain_pipelined, test_swaks_implicit_tls_auth_login,
          test_auth_only_after_tls, test_plaintext_pipelined_after_starttls_is_dropped,
          test_plaintext_injected_into_tls_stream_ends_session, test_garbage_instead_of_handshake,
          test_help_names_what_is_offered, test_wrong_password_over_tls,
          test_implicit_tls_over_connection_limits,
          test_greet_pause_on_the_implicit_tls_port])
