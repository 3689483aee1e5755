"""Messages of every size over TLS, with real clients: each one is queued
whole and answered before sluice's (short) DATA deadline.

Sizes 1 KB, 64 KB, 200 KB, 1 MB, 5 MB and 20 MB go over STARTTLS (587
style) and implicit TLS (465 style). The group named on the command line
picks the clients:

  raw       Python's ssl socket: DATA and BDAT (one chunk, or many chunks
            pipelined), the message sent in one write or in records of a
            few hundred bytes (one SSL_write each)
  smtplib   Python's smtplib (SMTP + starttls, SMTP_SSL)
  swaks     swaks --tls / --tlsc
  node      nodemailer (tests/integ/node, installed by tools/install-deps
            --test; the group skips without node or the module)

Up to 1 MB, sluice runs with timeout_data = 10s: a session that stalls
(the bug these tests were written for: plaintext left inside OpenSSL or
the ciphertext buffer while a receive waits for bytes the client never
sends; it showed from 64 KB on) gets 421 4.4.2 and fails the test in
seconds, not minutes. The 5 and 20 MB messages go to a second sluice with
timeout_data = 240s: the deadline is for the whole message, and a sanitizer
build on a busy machine may need a good part of a minute for 20 MB. After
the clients, each sluice is stopped and its spool read message by message:
every message is there exactly once, byte for byte behind the MSA's
Received field.
"""
import base64
import json
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys

from harness import Sluice, Workdir, free_port, main, run, skip

SLUICE = sys.argv[1]
SOURCE = sys.argv[2]
GROUP = sys.argv[3] if len(sys.argv) > 3 else "raw"

# (sizes, sluice's timeout_data): the small ones fail fast on a stall.
PHASES = [([("1k", 1024), ("64k", 64 * 1024), ("200k", 200 * 1024), ("1m", 1024 * 1024)], "10s"),
          ([("5m", 5 * 1024 * 1024), ("20m", 20 * 1024 * 1024)], "240s")]
SMALL_RECORD = 300  # plaintext octets per SSL_write in the "small records" mode
CLIENT_TIMEOUT = 300  # longer than timeout_data: sluice's 421 is what shows a hang


def make_message(case, size):
    """A message of about size octets with a unique X-Case field, Message-ID
    and Date (so that the MSA adds only its Received field), CRLF lines
    of varied length, some starting with a dot (stuffed for DATA)."""
    head = (f"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: {case}\r\n"
            f"Message-ID: <{case}@tls.test>\r\nDate: Tue, 1 Dec 2026 12:00:00 +0000\r\n"
            f"X-Case: {case}\r\n\r\n").encode()
    parts = [head]
    total = len(head)
    i = 0
    while total < size:
        fill = "abcdefghijklmnopqrstuvwxyz0123456789"[i % 36] * (i * 7 % 70)
        line = (f"{'.' if i % 11 == 0 else ''}{case} line {i:08d} {fill}\r\n").encode()
        parts.append(line)
        total += len(line)
        i += 1
    return b"".join(parts)


def stuff(msg):
    """Dot-stuffed content and the end of data (msg ends with CRLF)."""
    return msg.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class Server:
    """sluice with a STARTTLS listener and an implicit-TLS one; trusted
    loopback, so no AUTH is needed."""

    def __init__(self, timeout_data):
        self.wd = Workdir("sluice-tlsx-")
        p = self.wd.path
        r = run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", "/CN=localhost", "-keyout", f"{p}/key.pem", "-out", f"{p}/cert.pem"])
        assert r.returncode == 0, r.stderr
        self.port, self.tls_port = free_port(), free_port()
        self.spool = os.path.join(p, "spool")
        conf = self.wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{self.port}
listen_tls = 127.0.0.1:{self.tls_port}
trusted_networks = 127.0.0.0/8
max_message_size = 64M
timeout_command = 20s
timeout_data = {timeout_data}
[queue]
path = {self.spool}
map_size = 2G
[delivery]
enabled = no
[tls]
cert_file = {p}/cert.pem
key_file = {p}/key.pem
""")
        self.d = Sluice(SLUICE, conf)
        self.d.wait_log("event=ready")
        self.expect = {}  # case -> message

    def port_for(self, mode):
        return self.tls_port if mode == "implicit" else self.port

    def finish(self):
        """Stop sluice; check that every expected message is in the spool
        once, whole; nothing else is."""
        self.d.stop_clean(timeout=60)
        tool = os.environ.get("SLUICE_SPOOL") or os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(SLUICE))), "tools", "sluice-spool")
        seen = {}
        with subprocess.Popen([tool, "dump", self.spool], stdout=subprocess.PIPE) as proc:
            for line in proc.stdout:
                m = json.loads(line)
                body = base64.b64decode(m["body"])
                case = body.split(b"\r\nX-Case: ", 1)[1].split(b"\r\n", 1)[0].decode()
                want = self.expect.get(case)
                assert want is not None, f"unexpected message {case} in the spool"
                assert case not in seen, f"{case} queued twice"
                assert body.endswith(want), f"{case}: queued body differs from what was sent " \
                                            f"({len(body)} octets queued, {len(want)} sent)"
                assert body.startswith(b"Received: ") and len(body) - len(want) < 1024, \
                    f"{case}: more than the Received field was added"
                seen[case] = True
            assert proc.wait() == 0
        missing = sorted(set(self.expect) - set(seen))
        assert not missing, f"not in the spool: {missing}"
        check = run([tool, "check", self.spool])
        assert check.returncode == 0, check.stdout

    def close(self):
        if self.d.proc.poll() is None:
            self.d.stop()
        self.wd.cleanup()


def client_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class TlsSmtp:
    """A raw SMTP client that starts TLS (STARTTLS or at once) and sends
    whatever it is given, in one write or in small records."""

    def __init__(self, port, mode):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
        self.buf = b""
        if mode == "implicit":
            self.sock = client_context().wrap_socket(self.sock, server_hostname="localhost")
        self.expect(220)
        self.send(b"EHLO client\r\n")
        ehlo = self.reply()
        if mode == "starttls":
            assert "STARTTLS" in ehlo, ehlo
            self.send(b"STARTTLS\r\n")
            self.expect(220)
            self.sock = client_context().wrap_socket(self.sock, server_hostname="localhost")
            self.send(b"EHLO client\r\n")
            ehlo = self.reply()
        assert "CHUNKING" in ehlo and "PIPELINING" in ehlo, ehlo

    def send(self, data, small=False):
        if not small:
            self.sock.sendall(data)
            return
        for i in range(0, len(data), SMALL_RECORD):
            self.sock.sendall(data[i:i + SMALL_RECORD])

    def reply(self):
        """The next reply, all its lines joined."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise AssertionError(f"connection closed; replies so far {lines}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "\n".join(lines)

    def expect(self, code):
        r = self.reply()
        assert r.startswith(str(code)), f"expected {code}, got {r!r}"
        return r

    def close(self):
        try:
            self.send(b"QUIT\r\n")
            self.reply()
        except (OSError, AssertionError):
            pass
        self.sock.close()


def send_data(c, msg, small):
    c.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    c.expect(250)
    c.expect(250)
    c.expect(354)
    c.send(stuff(msg), small)
    return c.reply()


def send_bdat(c, msg, small):
    """One BDAT LAST in one write; in small records, chunks of 64 KB (and
    a last one of 1 KB at most), all pipelined before any reply is read."""
    if not small:
        c.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\n"
               b"BDAT %d LAST\r\n" % len(msg) + msg)
        c.expect(250)
        c.expect(250)
        return c.reply()
    step = 64 * 1024
    chunks = [msg[i:i + step] for i in range(0, len(msg), step)]
    out = [b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\n"]
    for n, ch in enumerate(chunks):
        last = n == len(chunks) - 1
        out.append(b"BDAT %d%s\r\n" % (len(ch), b" LAST" if last else b"") + ch)
    c.send(b"".join(out), small=True)
    c.expect(250)
    c.expect(250)
    for _ in chunks[:-1]:
        c.expect(250)
    return c.reply()


def phases(run_phase):
    """run_phase(srv, sizes) against a sluice per phase; then the spool."""
    for sizes, timeout_data in PHASES:
        srv = Server(timeout_data)
        try:
            run_phase(srv, sizes)
            srv.finish()
        except BaseException:
            print("sluice's log, last lines:\n" + "\n".join(srv.d.lines[-15:]))
            raise
        finally:
            srv.close()


def test_raw_clients():
    def run_phase(srv, sizes):
        for mode in ("starttls", "implicit"):
            for verb, fn in (("data", send_data), ("bdat", send_bdat)):
                for small in (False, True):
                    # One connection per combination: message after message
                    # on it, so a session that survived a big one is tested
                    # again with the next.
                    c = TlsSmtp(srv.port_for(mode), mode)
                    for name, size in sizes:
                        case = f"raw-{mode}-{verb}-{'small' if small else 'one'}-{name}"
                        msg = make_message(case, size)
                        srv.expect[case] = msg
                        r = fn(c, msg, small)
                        assert r.startswith("250 2.0.0 Ok: queued as"), f"{case}: {r!r}"
                    c.close()
    phases(run_phase)


def test_smtplib():
    def run_phase(srv, sizes):
        for mode in ("starttls", "implicit"):
            for name, size in sizes:
                case = f"smtplib-{mode}-{name}"
                msg = make_message(case, size)
                srv.expect[case] = msg
                if mode == "implicit":
                    s = smtplib.SMTP_SSL("127.0.0.1", srv.tls_port, timeout=CLIENT_TIMEOUT,
                                         context=client_context())
                else:
                    s = smtplib.SMTP("127.0.0.1", srv.port, timeout=CLIENT_TIMEOUT)
                    s.starttls(context=client_context())
                s.ehlo()
                code, resp = s.mail("alice@example.com")
                assert code == 250, (case, code, resp)
                code, resp = s.rcpt("bob@example.org")
                assert code == 250, (case, code, resp)
                code, resp = s.data(msg)
                assert code == 250 and resp.startswith(b"2.0.0 Ok: queued"), (case, code, resp)
                s.quit()
    phases(run_phase)


def test_swaks():
    if shutil.which("swaks") is None:
        skip("swaks not installed (tools/install-deps --test)")

    def run_phase(srv, sizes):
        for mode in ("starttls", "implicit"):
            for name, size in sizes:
                case = f"swaks-{mode}-{name}"
                msg = make_message(case, size)
                srv.expect[case] = msg
                path = srv.wd.file(f"{case}.eml", "")
                with open(path, "wb") as f:
                    f.write(msg[:-2])  # swaks puts CRLF before the final dot itself
                r = subprocess.run(
                    ["swaks", "--server", f"127.0.0.1:{srv.port_for(mode)}",
                     "--tls" if mode == "starttls" else "--tlsc", "--from", "alice@example.com",
                     "--to", "bob@example.org", "--timeout", str(CLIENT_TIMEOUT),
                     "--data", f"@{path}", "--suppress-data"],
                    capture_output=True, text=True, timeout=600)
                assert r.returncode == 0 and "250 2.0.0 Ok: queued as" in r.stdout, \
                    f"{case}: swaks exit {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-1000:]}"
    phases(run_phase)


def test_nodemailer():
    node_dir = os.path.join(SOURCE, "tests", "integ", "node")
    if shutil.which("node") is None:
        skip("node not installed (tools/install-deps --test)")
    if not os.path.isdir(os.path.join(node_dir, "node_modules", "nodemailer")):
        skip(f"nodemailer not installed in {node_dir} (tools/install-deps --test)")

    def run_phase(srv, sizes):
        for mode in ("starttls", "implicit"):
            files = []
            for name, size in sizes:
                case = f"node-{mode}-{name}"
                msg = make_message(case, size)
                srv.expect[case] = msg
                path = srv.wd.file(f"{case}.eml", "")
                with open(path, "wb") as f:
                    f.write(msg)
                files.append(path)
            r = subprocess.run(["node", os.path.join(node_dir, "send.js"),
                                str(srv.port_for(mode)), mode, *files],
                               capture_output=True, text=True, timeout=600)
            if r.returncode == 77:
                skip(r.stdout.strip())
            results = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
            assert len(results) == len(files), r.stdout + r.stderr
            for res in results:
                assert res["ok"] and res["response"].startswith("250 2.0.0 Ok: queued as"), res
    phases(run_phase)


if __name__ == "__main__":
    if run(["which", "openssl"]).returncode != 0:
        skip("openssl not installed (tools/install-deps --test)")
    tests = {"raw": [test_raw_clients], "smtplib": [test_smtplib], "swaks": [test_swaks],
             "node": [test_nodemailer]}
    if GROUP not in tests:
        print(f"unknown group {GROUP}; one of {', '.join(tests)}")
        sys.exit(2)
    main(tests[GROUP], every=[t for g in tests.values() for t in g])
