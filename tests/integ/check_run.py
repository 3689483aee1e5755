"""The README's first command, checked: the sluice that `tools/dev run`
builds starts on the bundled etc/sluice.conf, greets an SMTP client with
220, answers on its stats socket and /metrics, and drains on SIGTERM
(exit 0). Not a ctest test: `tools/dev test` runs it on the build it made
with only the build packages visible (see tools/dev, "fresh").

The config is the bundled one, copied into a temporary directory that is
the daemon's working directory (its relative ./var paths land there, not
in the repository), with only the two fixed loopback ports replaced by
free ones.

usage: check_run.py SLUICE SOURCE_DIR
"""
import os
import re
import signal
import socket
import sys

from harness import Sluice, Workdir, free_port, wait_until

SLUICE = os.path.abspath(sys.argv[1])
SOURCE = os.path.abspath(sys.argv[2])


def bundled_config(wd):
    """etc/sluice.conf with its ports moved; fails when the keys the
    check relies on are no longer there."""
    with open(os.path.join(SOURCE, "etc", "sluice.conf")) as f:
        text = f.read()
    smtp, http = free_port(), free_port()
    text, n1 = re.subn(r"(?m)^listen = 127\.0\.0\.1:\d+$", f"listen = 127.0.0.1:{smtp}", text)
    text, n2 = re.subn(r"(?m)^http_listen = 127\.0\.0\.1:\d+$",
                       f"http_listen = 127.0.0.1:{http}", text)
    assert n1 == 1 and n2 == 1, "etc/sluice.conf: no 'listen' or 'http_listen' line to move"
    for key in ("path = ./var/spool", "socket = ./var/sluice.sock"):
        assert key in text, f"etc/sluice.conf: expected '{key}'"
    return wd.file("sluice.conf", text), smtp, http


def read_reply(f):
    lines = []
    while True:
        line = f.readline()
        assert line, f"connection closed after {lines!r}"
        lines.append(line.rstrip("\r\n"))
        if len(line) < 4 or line[3] != "-":
            return lines


def check():
    wd = Workdir("sluice-run-")
    d = None
    try:
        conf, smtp, http = bundled_config(wd)
        os.makedirs(os.path.join(wd.path, "var"))  # as tools/dev run does
        os.chdir(wd.path)
        d = Sluice(SLUICE, conf)
        d.wait_log("event=ready", timeout=30)

        with socket.create_connection(("127.0.0.1", smtp), timeout=10) as s:
            f = s.makefile("rw", newline="")
            greeting = read_reply(f)
            assert greeting[0].startswith("220 "), f"greeting: {greeting!r}"
            f.write("EHLO check.example\r\n")
            f.flush()
            ehlo = read_reply(f)
            assert ehlo[-1].startswith("250 "), f"EHLO: {ehlo!r}"
            f.write("QUIT\r\n")
            f.flush()
            assert read_reply(f)[0].startswith("221"), "QUIT"

        sock = os.path.join(wd.path, "var", "sluice.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as u:
            u.settimeout(10)
            u.connect(sock)
            u.sendall(b"stats\n")
            answer = u.makefile("r").readline()
            assert answer.startswith("{") and '"ok":true' in answer, answer[:200]

        with socket.create_connection(("127.0.0.1", http), timeout=10) as h:
            h.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            head = h.makefile("rb").readline()
            assert head.startswith(b"HTTP/1.") and b" 200 " in head, head

        d.signal(signal.SIGTERM)
        rc = d.proc.wait(60)
        d.reader.join(5)
        d.check_sanitizers()
        assert rc == 0, f"exit {rc} after SIGTERM:\n" + "\n".join(d.lines[-20:])
        assert d.log_lines("event=drain_done"), "no event=drain_done:\n" + "\n".join(d.lines[-20:])
        assert d.log_lines("event=stopped"), "no event=stopped"
        wait_until(lambda: not os.path.exists(sock), 5, "the stats socket to go away")
        print(f"ok   {SLUICE} on etc/sluice.conf: 220, stats, /metrics, SIGTERM drained, exit 0")
    finally:
        if d is not None and d.proc.poll() is None:
            d.proc.kill()  # by our own PID
            d.proc.wait()
        os.chdir(SOURCE)
        wd.cleanup()


if __name__ == "__main__":
    try:
        check()
    except AssertionError as e:
        print(f"FAIL check_run: {e}")
        sys.exit(1)
