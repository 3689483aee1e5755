"""Shared helpers for sluice's integration tests.

Each test starts its own processes on ports of its own, waits for them
with readiness checks (a log line, a connectable port), and stops them by
PID. Nothing here sleeps as synchronisation: waits poll a condition with
a deadline and fail loudly when it passes.
"""
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import threading
import time
import traceback

# The default bound of a wait for something that must happen (a log line,
# an exit): generous, since it costs nothing when things work, and a
# sanitizer build on a loaded 2-core machine may take 10 s to start.
# Waits that check that something does NOT happen pass their own bound.
WAIT = 60

SKIP = 77


def skip(why):
    print(f"SKIP: {why}")
    sys.exit(SKIP)


# Ports a test listens on come from below the kernel's ephemeral range, so
# that no outbound connection of any test running beside this one can hold
# one as its source port between free_port() and the listener's bind (CI saw
# exactly that: a status listener's port taken by a sluice's connection to
# its sink). Each port is claimed by an flock on a file in PORT_DIR, held for
# as long as this process lives, so two tests never pick the same one; the C
# side (tests/support/redis_server.c) claims through the same files.
PORT_DIR = os.path.join(tempfile.gettempdir(), "sluice-test-ports")
PORT_LOW = 20000
_claimed = []


def _port_high():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low - 1, PORT_LOW + 1000)


def free_port(host="127.0.0.1", kind=socket.SOCK_STREAM):
    """A port nobody listens on, outside the ephemeral range, claimed for
    this process (see PORT_DIR)."""
    import fcntl
    import random
    os.makedirs(PORT_DIR, exist_ok=True)
    high = _port_high()
    span = high - PORT_LOW + 1
    start = random.randrange(span)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for i in range(span):
        port = PORT_LOW + (start + i) % span
        fd = os.open(os.path.join(PORT_DIR, str(port)), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            with socket.socket(family, kind) as s:
                s.bind((host, port))
        except OSError:
            os.close(fd)
            continue
        _claimed.append(fd)
        return port
    raise AssertionError(f"no free port in {PORT_LOW}-{high}")


def wait_until(cond, timeout, what):
    """Poll cond() until it is true; fail with `what` after timeout s."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def read_jsonl(path):
    """The records of a JSON-lines file another process appends to (a
    receiver's records, the delivery log): [] while it does not exist.
    A last line not yet whole is left for the next read. A line that is
    whole but not JSON is read once more from a fresh open (a reader can
    meet a write in progress on some file systems); if it is still not
    JSON the test fails naming the file, the line and its text."""
    for attempt in (1, 2):
        try:
            with open(path, "rb") as f:
                lines = f.read().split(b"\n")[:-1]
        except FileNotFoundError:
            return []
        recs = []
        for k, ln in enumerate(lines, 1):
            try:
                recs.append(json.loads(ln))
            except ValueError as e:
                if attempt == 2:
                    raise AssertionError(f"{path}: line {k} is not JSON ({e}): {ln[:300]!r}")
                break
        else:
            return recs
    return recs


def jsonl_writer(path):
    """put(obj): append obj to path as one JSON line in one write(2) on an
    O_APPEND descriptor, so a reader never meets two records' bytes mixed
    (the test receivers' records)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def put(obj):
        os.write(fd, (json.dumps(obj) + "\n").encode())
    return put


@contextlib.contextmanager
def extra_env(env):
    """os.environ with env's variables set for the block (a test shim's
    LD_PRELOAD and its settings, for the sluice started there, not for
    the servers started after it), then each as it was."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Workdir:
    """A temporary directory removed at exit (kept when KEEP_TMP=1)."""

    def __init__(self, prefix):
        self.path = tempfile.mkdtemp(prefix=prefix)

    def file(self, name, text):
        p = os.path.join(self.path, name)
        with open(p, "w") as f:
            f.write(text)
        return p

    def cleanup(self):
        if os.environ.get("KEEP_TMP") != "1":
            shutil.rmtree(self.path, ignore_errors=True)


class Daemon:
    """A sluice process whose log goes to a pipe read by a thread, so a
    test can wait for a log line instead of sleeping."""

    def __init__(self, binary, config, extra_args=()):
        self.lines = []
        self.cv = threading.Condition()
        self.proc = subprocess.Popen(
            [binary, "-c", config, *extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._busy = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        """Read the log's pipe in chunks, whole lines appended to
        self.lines; while a chunk read is not yet appended, self._busy
        says so (sync() waits for it)."""
        fd = self.proc.stderr.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        rest = b""
        while True:
            poller.poll()
            with self.cv:
                self._busy = True
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            rest += chunk
            *whole, rest = rest.split(b"\n")
            if not chunk and rest:
                whole.append(rest)  # a last line without its end
            with self.cv:
                self.lines.extend(w.decode("utf-8", "backslashreplace") for w in whole)
                self._busy = False
                self.cv.notify_all()
            if not chunk:
                return

    def sync(self, timeout=5):
        """Wait until every log line sluice has written so far is in
        self.lines: its pipe holds nothing unread and no chunk is between
        the pipe and the list. A line written before a reply the test
        got (sluice writes a turn's lines before its sends) is then
        counted; without this, a count right after a reply raced the
        reader thread. Bounded: a sluice writing on and on gets 5 s."""
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout
        buf = bytearray(4)
        while time.monotonic() < deadline:
            with self.cv:
                if not self.reader.is_alive():
                    return
                try:
                    fcntl.ioctl(fd, termios.FIONREAD, buf)
                except OSError:
                    return
                if int.from_bytes(buf, sys.byteorder) == 0 and not self._busy:
                    return
                self.cv.wait(0.01)

    def wait_log(self, needle, timeout=WAIT):
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                if self.proc.poll() is not None and not self.reader.is_alive():
                    raise AssertionError(
                        f"sluice exited ({self.proc.returncode}) before logging {needle!r}:\n"
                        + "\n".join(self.lines[-20:]))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no log line {needle!r} within {timeout}s:\n"
                                         + "\n".join(self.lines[-20:]))
                self.cv.wait(left)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=WAIT):
        """SIGTERM and wait; returns the exit code. Kills (by our PID) if
        it does not stop in time, and fails."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"sluice did not stop within {timeout}s of SIGTERM")
        self.reader.join(5)
        return rc

    def rss_kb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS for sluice")


def preload(binary, lib):
    """The LD_PRELOAD that loads lib (a test's shim) into binary: a
    sanitizer's runtime it links comes first, since ASan refuses to start
    after another preloaded library; its interceptors then call the
    shim's functions as the real ones (RTLD_NEXT), which call libc's."""
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    first = [line.split("=>")[1].split()[0] for line in ldd.splitlines()
             if "=>" in line and line.split()[0].startswith(("libasan.", "libtsan."))]
    return ":".join(first + [lib])


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def main(tests, every=None):
    """Run test functions in order; print a summary; exit 1 on failure.
    Every test_ function of the calling file must be in tests, or in
    every when tests is one group of them (a ctest entry per group): one
    left out would never run under ctest, unseen.
    SLUICE_INTEG_ONLY=name,... runs those of the file alone, in that order."""
    mod = tests[0].__module__ if tests else None
    g = tests[0].__globals__ if tests else {}
    mine = {n: f for n, f in g.items()
            if n.startswith("test_") and callable(f) and getattr(f, "__module__", None) == mod}
    only = os.environ.get("SLUICE_INTEG_ONLY")
    if only:
        names = [n for n in only.split(",") if n]
        unknown = [n for n in names if n not in mine]
        if unknown:
            print(f"FAIL no such test in this file: {', '.join(unknown)}")
            sys.exit(1)
        tests = [mine[n] for n in names]
    else:
        listed = every if every is not None else tests
        unlisted = sorted(n for n, f in mine.items() if f not in listed)
        if unlisted:
            print(f"FAIL not in main()'s list, so never run: {', '.join(unlisted)}")
            sys.exit(1)
    failed = 0
    for t in tests:
        name = t.__name__
        try:
            t()
            print(f"ok   {name}")
        except Exception as e:  # an assertion or an unexpected error
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            # Where: an assertion without a message says nothing else.
            traceback.print_exc(limit=-3, file=sys.stdout)
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


# ---- Servers several tests share: redis-server.


class Redis:
    """redis-server on a loopback port of its own, no persistence; ready
    once it answers PING; stopped (or killed) by PID."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.pong() or self.proc.poll() is not None, 10, "redis to answer")
        assert self.proc.poll() is None, f"redis-server exited ({self.proc.returncode})"

    def pong(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill9(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- DKIM: what a verifier says of sluice's signatures.


def dkimpy_verify(msg, port):
    """Every signature of msg per dkimpy (Debian's python3-dkim), its keys
    asked of the DNS server on 127.0.0.1:port: [(domain, selector, ok)]."""
    import dkim
    import dns.resolver
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = port

    def dnsfunc(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        try:
            ans = res.resolve(name, "TXT")
        except Exception:
            return None
        return b"".join(b"".join(r.strings) for r in ans)

    out = []
    try:
        d = dkim.DKIM(msg)
        n = len([h for h in d.headers if h[0].lower() == b"dkim-signature"])
        for i in range(n):
            d = dkim.DKIM(msg)
            ok = d.verify(idx=i, dnsfunc=dnsfunc)
            out.append((d.domain.decode() if d.domain else None,
                        d.selector.decode() if d.selector else None, bool(ok)))
    except dkim.DKIMException:
        out.append((None, None, False))
    return out


# ---- SMTP submission tests: a sluice that checks its sanitizers, a raw
# ---- SMTP client, and a reader of the LMDB spool (lmdb-utils).

SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                   "UndefinedBehaviorSanitizer", "ThreadSanitizer")


def stats_ask(path, line="stats", timeout=10):
    """One request on sluice's stats socket at path: its JSON answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def log_time(line):
    """The time of a log line's stamp (2026-12-06T10:00:56.020Z ...), in
    seconds since the epoch (UTC, to the ms): the daemon's own clock, for
    the time between two of its lines."""
    import calendar
    stamp = line.split(" ", 1)[0]
    t = time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")
    assert stamp[19] == "." and stamp.endswith("Z"), stamp
    return calendar.timegm(t) + int(stamp[20:-1]) / 10 ** (len(stamp) - 21)


def log_fields(line):
    """The keys and values of a log line as a key=value reader that honours
    quotes and backslashes sees them: [(key, raw value), ...]."""
    # what str.split() or Go's strings.Fields would also split on
    assert not any(c.isspace() and c != " " for c in line), f"a Unicode space in: {line}"
    out = []
    i = line.index(" ") + 1  # after the timestamp
    while i < len(line):
        eq = line.find("=", i)
        key = line[i:eq]
        assert eq >= 0 and key and " " not in key, f"a word that is no key=value in: {line}"
        j = eq + 1
        if j < len(line) and line[j] == '"':
            j += 1
            while j < len(line) and line[j] != '"':
                j += 2 if line[j] == "\\" else 1
            assert j < len(line), f"a quoted value without its end in: {line}"
            j += 1
        else:
            while j < len(line) and line[j] != " ":
                j += 2 if line[j] == "\\" else 1
        out.append((key, line[eq + 1:j]))
        assert j == len(line) or line[j] == " ", (j, line)
        i = j + 1
    return out


class Sluice(Daemon):
    """A Daemon whose log is read with undecodable bytes escaped (a client's
    bytes may reach the log), that can count log lines, and that fails a
    test on any sanitizer report."""

    def __init__(self, binary, config, extra_args=(), stdout=subprocess.DEVNULL):
        self.lines = []
        self.cv = threading.Condition()
        self.proc = subprocess.Popen(
            [binary, "-c", config, *extra_args],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            errors="backslashreplace",
        )
        self._busy = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @property
    def pid(self):
        return self.proc.pid

    def log_lines(self, needle):
        self.sync()
        with self.cv:
            return [line for line in self.lines if needle in line]

    def count_log(self, needle):
        return len(self.log_lines(needle))

    def wait_log_count(self, needle, n, timeout=WAIT):
        """Wait until at least n log lines hold needle; returns them."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                got = [line for line in self.lines if needle in line]
                if len(got) >= n:
                    return got
                if self.proc.poll() is not None and not self.reader.is_alive():
                    raise AssertionError(
                        f"sluice exited ({self.proc.returncode}) with {len(got)}/{n} lines "
                        f"{needle!r}:\n" + "\n".join(self.lines[-20:]))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(got)}/{n} log lines {needle!r} within "
                                         f"{timeout}s:\n" + "\n".join(self.lines[-20:]))
                self.cv.wait(left)

    def sanitizer_findings(self):
        with self.cv:
            return [line for line in self.lines if any(m in line for m in SANITIZER_MARKS)]

    def check_sanitizers(self):
        found = self.sanitizer_findings()
        if found:
            with self.cv:
                first = next(i for i, line in enumerate(self.lines) if line in found)
                report = "\n".join(self.lines[first:first + 40])
            raise AssertionError(f"sanitizer report in sluice's log:\n{report}")

    def stop_clean(self, timeout=WAIT):
        """SIGTERM; fail on a non-zero exit or a sanitizer report."""
        rc = self.stop(timeout)
        self.check_sanitizers()
        if rc != 0:
            raise AssertionError(f"sluice exited with {rc}:\n" + "\n".join(self.lines[-30:]))
        return rc

    def kill9(self):
        """SIGKILL (by our PID) and reap."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.reader.join(5)
        self.check_sanitizers()


class Reply:
    """One SMTP reply: code (int), lines (text of each line without the
    code), raw (the whole reply as sent)."""

    def __init__(self, code, lines, raw):
        self.code, self.lines, self.raw = code, lines, raw

    @property
    def text(self):
        return self.raw.splitlines()[-1] if self.raw else ""

    def __repr__(self):
        return repr(self.raw)


class SmtpClosed(Exception):
    pass


class Smtp:
    """A raw SMTP client on one socket: send any bytes, read replies one by
    one. Every read has a deadline; EOF raises SmtpClosed."""

    def __init__(self, port, host="127.0.0.1", timeout=10, source=None, greet=True):
        self.timeout = timeout
        self.sock = socket.create_connection(
            (host, port), timeout, source_address=(source, 0) if source else None)
        self.buf = b""
        self.eof = False
        self.greeting = self.reply() if greet else None

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("no complete reply within the deadline; have %r" % self.buf[-200:])
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            raise SmtpClosed("connection closed; unread: %r" % self.buf[-200:])
        self.buf += chunk

    def reply(self, timeout=None):
        """The next complete reply (multi-line replies joined)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                self._fill(deadline)
            line, self.buf = self.buf.split(b"\r\n", 1)
            text = line.decode("utf-8", "backslashreplace")
            lines.append(text)
            if len(text) < 3 or not text[:3].isdigit():
                raise AssertionError(f"not an SMTP reply line: {text!r}")
            if len(text) == 3 or text[3] == " ":
                code = int(text[:3])
                return Reply(code, [ln[4:] for ln in lines], "\n".join(lines))
            if text[3] != "-":
                raise AssertionError(f"not an SMTP reply line: {text!r}")

    def replies(self, n, timeout=None):
        return [self.reply(timeout) for _ in range(n)]

    def cmd(self, line, timeout=None):
        """Send one command line (CRLF added) and read its reply."""
        self.send(line.encode() + b"\r\n" if isinstance(line, str) else line + b"\r\n")
        return self.reply(timeout)

    def expect(self, line, code, timeout=None):
        r = self.cmd(line, timeout)
        want = str(code)
        if not r.raw.startswith(want):
            raise AssertionError(f"sent {line!r}: expected {want}, got {r.raw!r}")
        return r

    def rest_until_closed(self, timeout=None):
        """Every reply left until the server closes; fails if it does not
        close within timeout. Returns the replies."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        out = []
        while True:
            try:
                out.append(self.reply(max(0.001, deadline - time.monotonic())))
            except SmtpClosed:
                return out

    def is_closed(self, timeout=2):
        """True if the server closes (with no further bytes) within timeout."""
        try:
            self._fill(time.monotonic() + timeout)
        except SmtpClosed:
            return True
        except socket.timeout:
            return False
        return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def _spool_tool():
    """tools/sluice-spool of the build under test: from the environment
    (ctest sets it), else beside the sluice binary given as argv[1]."""
    tool = os.environ.get("SLUICE_SPOOL")
    if tool:
        return tool
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[1]))),
                        "tools", "sluice-spool")


def spool_tool(cmd, env_dir):
    """Run sluice-spool count|check|list|dump on a spool no sluice has open."""
    r = subprocess.run([_spool_tool(), cmd, env_dir], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 and cmd != "check":
        raise AssertionError(f"sluice-spool {cmd} {env_dir}: {r.stderr.strip()}")
    return r


def mdb_entries(env_dir, db):
    """How many messages ("msg") or live recipients ("rcpt") a stopped
    sluice's spool holds (through sluice-spool, not the record format)."""
    import json
    c = json.loads(spool_tool("count", env_dir).stdout)
    if db == "msg":
        return c["messages"]
    if db == "rcpt":
        return c["ready"] + c["deferred"]
    raise AssertionError(f"unknown spool table {db}")


def spool_messages(env_dir):
    """Every message of a stopped sluice's spool: a list of dicts with id,
    sender, envid, auth, client, nrcpt, body (bytes, the MSA's headers
    included), rcpts (addresses, bytes)."""
    import base64
    import json
    msgs = []
    for line in spool_tool("dump", env_dir).stdout.splitlines():
        m = json.loads(line)
        body = base64.b64decode(m["body"])
        assert len(body) == m["body_len"], f"body {len(body)} octets, envelope says {m['body_len']}"
        for r in m["rcpts"]:  # never tried: no reply, and no code made up for it
            assert r["attempts"] > 0 or r["last_code"] is None, r
        msgs.append(dict(key=m["id"], sender=m["sender"].encode(), envid=m["envid"].encode(),
                         auth=m["auth_user"].encode(), client=m["client"].encode(),
                         nrcpt=len(m["rcpts"]), body=body,
                         rcpts=[r["addr"].encode() for r in m["rcpts"]]))
    check = spool_tool("check", env_dir)
    assert check.returncode == 0, f"spool inconsistent: {check.stdout}"
    return msgs


def site_worker(host, workers=2):
    """The worker a site whose first MX host is host is sent from (site
    affinity: engine/outbound/affinity.c site_worker, the 64-bit FNV-1a of
    the host's name)."""
    h = 14695981039346656037
    for ch in host.lower().encode():
        h = ((h ^ ch) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h % workers
