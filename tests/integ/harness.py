"""Shared helpers for sluice's integration tests.

Each test starts its own processes on ports of its own, waits for them
with readiness checks (a log line, a connectable port), and stops them by
PID. Nothing here sleeps as synchronisation: waits poll a condition with
a deadline and fail loudly when it passes.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

SKIP = 77


def skip(why):
    print(f"SKIP: {why}")
    sys.exit(SKIP)


def free_port(host="127.0.0.1"):
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self.cv:
                self.lines.append(line.rstrip("\n"))
                self.cv.notify_all()
        with self.cv:
            self.cv.notify_all()

    def wait_log(self, needle, timeout=10):
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

    def stop(self, timeout=10):
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


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def main(tests):
    """Run test functions in order; print a summary; exit 1 on failure."""
    failed = 0
    for t in tests:
        name = t.__name__
        try:
            t()
            print(f"ok   {name}")
        except Exception as e:  # an assertion or an unexpected error
            failed += 1
            print(f"FAIL {name}: {e}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
