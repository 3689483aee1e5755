"""The operator's side of a running sluice, end to end: sluicectl against
the stats socket of a sluice relaying to smtp-sink through dnsmasq (the
Relay of test_delivery.py). Checks: the stats and domains figures agree
with what the sink received; message, suspend/resume, flush and bounce do
what they say (the sink, the spool and the delivery log as witnesses);
sluicectl's exit codes; the Prometheus listener (promtool as judge of the
text); reload keeps sessions open; and SIGTERM drains in-flight deliveries
and loses nothing across a restart on the same spool."""
import base64
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from harness import (Redis, Smtp, Sluice, Workdir, _spool_tool, free_port, main, mdb_entries,
                     skip, wait_until)
import test_delivery
from test_delivery import Relay, Sink, connectable, deferrals, records_for, wait_sink
from test_outcomes import events, log_conf_text, wait_events

SLUICE = sys.argv[1]
test_delivery.SLUICE = SLUICE
SLUICECTL = os.environ.get("SLUICECTL") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl"))

# Relay puts only @DLOG@ into its work directory; the socket goes beside
# the delivery log so that it is removed with the rest.
SOCK_SUFFIX = "-stats.sock"
QID_RE = re.compile(r"\bid=([0-9A-Za-z]{13})\b")


def stats_conf(extra="", http=None):
    text = f"[stats]\nsocket = @DLOG@{SOCK_SUFFIX}\n"
    if http is not None:
        text += f"http_listen = 127.0.0.1:{http}\n"
    return text + log_conf_text(extra)


def sock_of(r):
    return r.dlog + SOCK_SUFFIX


def ctl(r_or_sock, *args, json_out=False):
    """Run sluicectl on the relay's socket; returns the CompletedProcess."""
    sock = r_or_sock if isinstance(r_or_sock, str) else sock_of(r_or_sock)
    cmd = [SLUICECTL, "-s", sock] + (["--json"] if json_out else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def ctl_json(r, *args):
    """sluicectl --json ARGS, which must succeed; the parsed document."""
    p = ctl(r, *args, json_out=True)
    assert p.returncode == 0, f"sluicectl {' '.join(args)}: rc {p.returncode}: {p.stderr}"
    lines = p.stdout.splitlines()
    assert len(lines) == 1, f"--json must print one line, got {len(lines)}: {p.stdout[:300]}"
    doc = json.loads(lines[0])
    assert doc.get("ok") is True, doc
    return doc


def counters(r):
    return ctl_json(r, "stats")["counters"]


def domain_row(r, name):
    for d in ctl_json(r, "domains", "1000")["domains"]:
        if d["name"] == name:
            return d
    return None


def one_line_error(p, rc):
    assert p.returncode == rc, f"expected exit {rc}, got {p.returncode}: {p.stdout!r} {p.stderr!r}"
    err = p.stderr.strip()
    assert err and "\n" not in err, f"expected one line on stderr, got {p.stderr!r}"
    return err


def deferred_qid(r, rcpt):
    """The queue id of the message whose recipient rcpt was deferred (from
    the daemon log)."""
    line = wait_until(lambda: next((ln for ln in r.d.log_lines("event=deferred")
                                    if f"<{rcpt}>" in ln), None), 30, f"{rcpt} deferred")
    m = QID_RE.search(line)
    assert m, line
    return m.group(1)


def msg(i, rcpts, tag="m"):
    body = f"Subject: {tag}{i}\r\nX-Seq: {tag}{i}\r\n\r\nbody\r\nend-{tag}{i}\r\n".encode()
    return ("s@example.com", rcpts, body)


def seqs_at(sink):
    """The X-Seq of every complete message the sink holds (a list:
    duplicates kept), and how many files are not complete (smtp-sink
    writes a file as the message arrives)."""
    out, partial = [], 0
    for dump in sink.messages():
        m = re.search(rb"^X-Seq: (\S+)$", dump, re.M)
        if m is None or not dump.rstrip(b"\n").endswith(b"\nend-" + m.group(1)):
            partial += 1
        else:
            out.append(m.group(1).decode())
    return out, partial


def raw_events(path, settled=True):
    """The delivery log's lines as dicts, checking only that each parses
    (test_outcomes.events also checks the fields of each event). settled
    as there: False for a poll while sluice writes, which leaves a last
    line not yet whole (a read can see part of a flush's write) for the
    next read."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    if not settled:
        data = data[:data.rfind(b"\n") + 1]
    return [json.loads(ln) for ln in data.splitlines()]


def test_stats_domains_message_and_exit_codes():
    recs = records_for(["ok.test"]) + ["host-record=dead.test,127.0.0.9",
                                       "mx-host=dead.test,dead.test,10"]
    r = Relay(recs, domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\n"))
    try:
        assert os.path.exists(SLUICECTL), f"no sluicectl at {SLUICECTL}"
        # In its first minute sluice's "1m" rates are over the time since
        # start: the column says how long ("last 3s"), not "last 1m".
        wait_until(lambda: ctl_json(r, "stats")["rates"]["1m"] is not None, 10,
                   "the second rate sample")
        p = ctl(r, "stats")
        assert p.returncode == 0, p.stderr
        up = re.search(r" up ([0-9]+)s ", p.stdout)
        head = re.search(r"^per second +last 1s +last (\S+)$", p.stdout, re.M)
        assert up and head, p.stdout
        assert head.group(1) != "1m" and head.group(1).endswith("s"), p.stdout
        assert abs(int(head.group(1)[:-1]) - int(up.group(1))) <= 2, p.stdout
        w = ctl_json(r, "stats")["rates"]["1m"]["window_ms"]
        assert 0 < w < 59500, w
        n = 12
        r.inject([msg(i, [f"u{i}@ok.test"]) for i in range(n)] +
                 [msg(99, ["x@dead.test", "y@dead.test"])])
        wait_sink(r, n, timeout=60)
        qid = deferred_qid(r, "x@dead.test")
        # The counters follow the 250s: wait for them, then they must agree.
        wait_until(lambda: counters(r)["delivered"] >= n, 10, "stats delivered to reach the sink")
        c = counters(r)
        files = len(r.sink.files())
        assert c["delivered"] == files == n, (c, files)
        assert c["received_msgs"] == n + 1, c
        assert c["received_rcpts"] == n + 2, c
        assert c["deferred"] >= 1 and c["bounced"] == 0, c

        p = ctl(r, "stats")
        assert p.returncode == 0, p.stderr
        assert "delivered" in p.stdout, p.stdout

        names = [d["name"] for d in ctl_json(r, "domains")["domains"]]
        assert "ok.test" in names, names
        ok = domain_row(r, "ok.test")
        assert ok["delivered"] == n and ok["suspended"] is False, ok
        p = ctl(r, "domains")
        assert p.returncode == 0 and "ok.test" in p.stdout, (p.returncode, p.stdout)

        m = ctl_json(r, "message", qid)
        assert m["id"] == qid and m["sender"] == "s@example.com", m
        got = {x["rcpt"]: x["state"] for x in m["recipients"]}
        assert got == {"x@dead.test": "deferred", "y@dead.test": "deferred"}, m
        assert all(x["attempts"] >= 1 for x in m["recipients"]), m
        # A refused connect has no SMTP reply: no code, and JSON says so
        # (null), not 0; the text shows "-" under LAST CODE.
        assert all(x["last_code"] is None and x["last_reply"] for x in m["recipients"]), m
        p = ctl(r, "message", qid)
        assert p.returncode == 0 and "x@dead.test" in p.stdout and "deferred" in p.stdout, \
            p.stdout
        lines = p.stdout.splitlines()
        head = next(ln for ln in lines if "LAST CODE" in ln)
        at = head.index("LAST CODE")
        rows = [ln for ln in lines if "@dead.test" in ln]
        assert len(rows) == 2, p.stdout
        for ln in rows:
            cell = ln[at:at + len("LAST CODE")].strip()
            assert cell == "-", (cell, p.stdout)
        # A failure without a reply (code 0) shows its text alone in the
        # queue, as mailq does: "(connect to ...)", not "(0 connect to ...)".
        q = ctl(r, "queue", "10", "dead.test")
        assert q.returncode == 0 and "(connect to " in q.stdout, q.stdout
        assert "(0 " not in q.stdout, q.stdout

        # Errors: from sluice 1, usage 2, no socket 3.
        one_line_error(ctl(r, "message", "not-an-id"), 1)
        missing = "1" + qid[1:] if qid[0] != "1" else "2" + qid[1:]
        one_line_error(ctl(r, "message", missing), 1)
        err = one_line_error(ctl(r, "frobnicate"), 2)
        assert "did you mean" not in err, err
        # a slip, or another MTA's word: the command meant is named
        for word, meant in (("status", "stats"), ("domain", "domains"), ("mailq", "queue"),
                            ("flsuh", "flush")):
            err = one_line_error(ctl(r, word), 2)
            assert f'unknown command "{word}" (did you mean "{meant}"?' in err, err
        one_line_error(ctl(r, "message"), 2)
        # a bad N is a usage error, as domains' is: queue's was sluice's (1)
        one_line_error(ctl(r, "domains", "0"), 2)
        one_line_error(ctl(r, "queue", "0"), 2)
        one_line_error(ctl(r, "queue", "10001", "ok.test"), 2)
        # a global option after the command: said so, not "unknown option"
        err = one_line_error(ctl(r, "stats", "-s", sock_of(r)), 2)
        assert "-s goes before the command (sluicectl -s SOCKET stats" in err, err
        err = one_line_error(ctl(r, "queue", "--json"), 2)
        assert "--json goes before the command" in err, err
        one_line_error(ctl(sock_of(r) + ".nope", "stats"), 3)
        # The daemon is unharmed by all that.
        assert ctl(r, "stats").returncode == 0
    finally:
        r.close()


def test_sluicectl_without_sluice_says_so():
    """No sluice behind the socket: sluicectl exits 3 with one line that
    names the path it tried, where the path came from, and that sluice
    may not be running (no socket, or one left by a sluice that stopped),
    not a bare errno."""
    wd = Workdir("sluice-ctl-")
    try:
        gone = os.path.join(wd.path, "gone.sock")
        err = one_line_error(ctl(gone, "stats"), 3)
        assert gone in err and "(from -s)" in err and "is sluice running?" in err, err
        env = dict(os.environ, SLUICE_SOCKET=gone)
        p = subprocess.run([SLUICECTL, "stats"], capture_output=True, text=True, timeout=30,
                           env=env)
        err = one_line_error(p, 3)
        assert gone in err and "$SLUICE_SOCKET" in err and "is sluice running?" in err, err
        stale = os.path.join(wd.path, "stale.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(stale)  # never listened on: refused, as after a stop
        err = one_line_error(ctl(stale, "domains"), 3)
        assert stale in err and "sluice may not be running" in err, err
        # -s naming the config file or the spool's directory: connect says
        # "refused" there too, which is no left-behind socket
        conf = os.path.join(wd.path, "sluice.conf")
        with open(conf, "w") as f:
            f.write("[server]\n")
        for path, kind in ((conf, "a file"), (wd.path, "a directory")):
            err = one_line_error(ctl(path, "stats"), 3)
            assert path in err and f"that is {kind}, not a socket" in err, err
            assert "may not be running" not in err, err
    finally:
        wd.cleanup()


def test_flush_waits_for_a_slow_answer():
    """sluice answers a flush (or a bounce) once every recipient it
    selected was updated in the spool: 10 s for a queue of a million.
    sluicectl waits for that answer; it gave up after 10 s, exiting 3 with
    "timed out" as if sluice were unreachable, while the flush went on. A
    stats socket of our own answers after 11 s."""
    import threading
    wd = Workdir("sluice-ctl-")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path = os.path.join(wd.path, "slow.sock")
        srv.bind(path)
        srv.listen(1)
        got = []

        def answer():
            c, _ = srv.accept()
            with c:
                f = c.makefile("rb")
                got.append(f.readline())
                time.sleep(11)  # what is under test: an answer later than 10 s
                c.sendall(b'{"ok":true,"domain":null,"recipients":1000000,"already_due":0,'
                          b'"rests_ended":0}\n')
        t = threading.Thread(target=answer, daemon=True)
        t.start()
        p = ctl(path, "flush", json_out=True)
        t.join(30)
        assert got == [b"flush\n"], got
        assert p.returncode == 0, (p.returncode, p.stderr)
        assert json.loads(p.stdout.splitlines()[0])["recipients"] == 1000000, p.stdout
    finally:
        srv.close()
        wd.cleanup()


def test_durations_round_to_nearest():
    """sluicectl shows durations rounded to the nearest of their last unit:
    1,500 ms is "2s" and 59,600 ms "1m"; it cut them down ("1s", "59s",
    and 5,399,999 ms "1h 29m"). A stats socket of our own answers
    suspend with each for_ms in turn."""
    import threading
    wd = Workdir("sluice-ctl-")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cases = [(999, "999ms"), (1499, "1s"), (1500, "2s"), (59600, "1m"), (89999, "1m 30s"),
             (3599600, "1h"), (5399999, "1h 30m"), (86399999, "1d"), (131400000, "1d 13h")]
    try:
        path = os.path.join(wd.path, "dur.sock")
        srv.bind(path)
        srv.listen(len(cases))

        def answer():
            for ms, _ in cases:
                c, _ = srv.accept()
                with c:
                    c.makefile("rb").readline()
                    c.sendall(json.dumps({"ok": True, "domain": "x.test", "suspended": True,
                                          "cluster": False, "for_ms": ms}).encode() + b"\n")
        t = threading.Thread(target=answer, daemon=True)
        t.start()
        for ms, want in cases:
            p = ctl(path, "suspend", "x.test", "--for", "1h")
            assert p.returncode == 0, p.stderr
            rows = [ln.split(None, 1) for ln in p.stdout.splitlines()]
            got = next(r[1] for r in rows if r[0] == "for")
            assert got == want, (ms, got, want)
        t.join(10)
    finally:
        srv.close()
        wd.cleanup()


def test_sluicectl_suppress_too_long_says_so():
    """A suppress command longer than the socket's line (an export FILE
    whose absolute path is near PATH_MAX, then --scope) is refused with
    exit 2 and one line, before anything is sent. The line is checked
    before each word is added: the build with SLUICE_SANITIZE reported a
    stack-buffer-overflow here, writing --scope past the line."""
    wd = Workdir("sluice-ctl-")
    try:
        d = wd.path
        while len(d) < 3800:
            d = os.path.join(d, "d" * 200)
        os.makedirs(d)
        path = os.path.join(d, "f" * (4090 - len(d)))
        scope = "s" * 250
        err = one_line_error(ctl(os.path.join(wd.path, "gone.sock"), "suppress", "export", path,
                                 "--scope", scope, "--scope", scope), 2)
        assert "longer than 4095 octets" in err, err
        err = one_line_error(ctl(os.path.join(wd.path, "gone.sock"), "suppress", "list",
                                 "--note", "n" * 4090), 2)
        assert "longer than 4095 octets" in err, err
    finally:
        wd.cleanup()


def test_sluicectl_suppress_empty_file_name_says_so():
    """suppress import or export of an empty FILE (a variable unset: "$LIST")
    is a usage error, said as a missing FILE, exit 2, before sluice is
    asked: export said "FILE is a directory", import "cannot open : No
    such file or directory" (exit 1)."""
    wd = Workdir("sluice-ctl-")
    try:
        for sub in ("import", "export"):
            err = one_line_error(ctl(os.path.join(wd.path, "gone.sock"), "suppress", sub, ""), 2)
            assert err == f"sluicectl: suppress {sub}: missing FILE (an empty name)", err
    finally:
        wd.cleanup()


def test_spool_tool_refuses_a_directory_without_a_spool():
    """sluice-spool on a mistyped path, or a directory that holds no spool,
    exits 1 with one line, and creates nothing there (queue_open would
    make a new spool and report it empty and consistent)."""
    wd = Workdir("sluice-spool-")
    try:
        typo = os.path.join(wd.path, "spoool")
        empty = os.path.join(wd.path, "empty")
        os.mkdir(empty)
        # a data.mdb of 0 octets (a copy that never started) holds no spool
        zero = os.path.join(wd.path, "zero")
        os.mkdir(zero)
        open(os.path.join(zero, "data.mdb"), "wb").close()
        for cmd in ("count", "check", "list", "dump"):
            for d in (typo, empty, zero):
                p = subprocess.run([_spool_tool(), cmd, d], capture_output=True, text=True,
                                   timeout=60)
                err = one_line_error(p, 1)
                assert "no spool there" in err and d in err, err
                assert p.stdout == "", p.stdout
        assert not os.path.exists(typo), "a spool was made at the mistyped path"
        assert os.listdir(empty) == [], os.listdir(empty)
    finally:
        wd.cleanup()


def test_spool_tool_on_a_running_sluice_says_what_to_do():
    """sluice-spool on the spool of a running sluice is refused (the lock):
    the refusal said only "in use by another process"; it now says to stop
    sluice first, and what shows the queue meanwhile."""
    r = Relay(records_for(["p.test"]), domain_conf=stats_conf())
    try:
        p = subprocess.run([_spool_tool(), "count", r.spool], capture_output=True, text=True,
                           timeout=60)
        err = one_line_error(p, 1)
        assert "is in use by another process" in err and "stop sluice first" in err, err
        assert "sluicectl queue" in err, err
    finally:
        r.close()


def test_top_gives_the_terminal_back_when_sluice_goes():
    """sluicectl top on a terminal turns echo and line editing off while
    it waits for q; when sluice goes away under it (here a socket that
    answers one view and closes), it exits 3 and the terminal has them
    back, as after q."""
    import pty
    import termios
    import threading
    wd = Workdir("sluice-top-")
    master, slave = pty.openpty()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path = os.path.join(wd.path, "stats.sock")
        srv.bind(path)
        srv.listen(4)

        def serve():  # one view, then the connection closes, and so does the socket
            conn, _ = srv.accept()
            with conn:
                f = conn.makefile("rb")
                for _ in range(2):
                    if not f.readline():
                        return
                    conn.sendall(b'{"ok":true,"domains":[]}\n')
            srv.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ECHO and before[3] & termios.ICANON
        p = subprocess.run([SLUICECTL, "-s", path, "top", "-d", "0.1"], stdin=slave,
                           stdout=slave, stderr=subprocess.PIPE, text=True, timeout=30)
        t.join(10)
        assert p.returncode == 3, (p.returncode, p.stderr)
        after = termios.tcgetattr(slave)
        assert after[3] & termios.ECHO and after[3] & termios.ICANON, \
            "echo or canonical mode left off"
    finally:
        srv.close()
        os.close(master)
        os.close(slave)
        wd.cleanup()


def test_output_to_a_reader_that_left():
    """sluicectl writing to a pipe whose reader has gone (sluicectl top |
    head -n 2, sluicectl queue | head) stops quietly, as other tools do:
    top went on for ever, every view's write failing unseen, and queue
    ended with "cannot write the output: Broken pipe" and exit 3, as if
    sluice were unreachable. A stats socket of our own answers."""
    import threading
    wd = Workdir("sluice-ctl-")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stop = threading.Event()
    closed = threading.Event()  # the reader of queue's output has gone
    msgs = [{"id": "0ARE%09d" % i, "sender": "s@example.com", "size": 100, "age_ms": 1000,
             "recipients": [{"rcpt": "r%d@example.com" % i, "state": "deferred",
                             "attempts": 1, "last_code": 451, "last_reply": "try later"}]}
            for i in range(200)]  # more than stdio's buffer of output

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            with conn:
                f = conn.makefile("rb")
                for line in f:
                    if line.startswith(b"queue"):
                        closed.wait(10)
                        doc = {"ok": True, "messages": msgs, "more": False, "cut": False}
                    elif line.startswith(b"suppress list"):  # pages without end
                        doc = {"ok": True, "entries": [{"address": "a@b.test", "scope": "global",
                                                        "reason": "manual"}] * 1000,
                               "next": {"after": "a@b.test", "after_scope": "global"}}
                    else:
                        doc = {"ok": True, "domains": []}
                    conn.sendall(json.dumps(doc).encode() + b"\n")

    t = threading.Thread(target=serve, daemon=True)
    try:
        path = os.path.join(wd.path, "stats.sock")
        srv.bind(path)
        srv.listen(8)
        t.start()
        def leaves_after_a_line(args, what):
            """The reader takes one line and goes: sluicectl must end, quietly."""
            p = subprocess.Popen([SLUICECTL, "-s", path] + args,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            import select
            if not select.select([p.stdout], [], [], 15)[0]:
                p.kill()
                p.communicate(timeout=10)
                raise AssertionError(f"{what} printed nothing within 15 s")
            assert p.stdout.readline(), f"{what} printed nothing"
            p.stdout.close()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
                raise AssertionError(f"sluicectl {what} went on after its reader left")
            err = p.stderr.read().decode()
            p.stderr.close()
            assert p.returncode == 0 and err == "", (what, p.returncode, err)

        leaves_after_a_line(["top", "-d", "0.1"], "top")

        p = subprocess.Popen([SLUICECTL, "-s", path, "queue"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()
        closed.set()
        p.wait(30)
        err = p.stderr.read().decode()
        p.stderr.close()
        assert p.returncode == 0 and err == "", (p.returncode, err)

        # suppress list --json pages through the list as it prints: it
        # went on asking for pages after its reader had left
        leaves_after_a_line(["--json", "suppress", "list"], "suppress list")
        # and as text: it held the pages without end, printing nothing
        leaves_after_a_line(["suppress", "list"], "suppress list (text)")

        # Another failed write is still said: a full disk.
        with open("/dev/full", "w") as full:
            p = subprocess.run([SLUICECTL, "-s", path, "queue"], stdout=full,
                               stderr=subprocess.PIPE, text=True, timeout=30)
        err = one_line_error(p, 3)
        assert "cannot write the output" in err, err
    finally:
        stop.set()
        t.join(10)
        srv.close()
        wd.cleanup()


def test_suppress_list_prints_as_pages_come():
    """sluicectl suppress list (text) prints each page as it comes: it
    held every page of the list, and printed nothing, until the last had
    come (a list of millions: its memory, and minutes of silence). A
    stats socket of our own holds back the second page until the first
    page's lines have been read."""
    import threading
    wd = Workdir("sluice-ctl-")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    seen = threading.Event()       # the test read the first page's rows
    answered = threading.Event()   # the second page was sent
    asked = []

    def serve():
        srv.settimeout(10)
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            return
        with conn:
            f = conn.makefile("rb")
            for line in f:
                asked.append(line.decode().strip())
                if "after=" not in line.decode():
                    doc = {"ok": True, "entries": [
                        {"address": "u%04d@b.test" % i, "scope": "global", "reason": "manual",
                         "added": "2026-01-01T00:00:00.000Z", "expires": None, "note": "n"}
                        for i in range(1000)],
                        "next": {"after": "u0999@b.test", "after_scope": "global"}}
                else:
                    seen.wait(10)
                    doc = {"ok": True, "entries": [
                        {"address": "a-much-longer-address@b.test", "scope": "global",
                         "reason": "manual", "added": "2026-01-01T00:00:00.000Z",
                         "expires": None, "note": "n"}]}
                    answered.set()
                conn.sendall(json.dumps(doc).encode() + b"\n")

    t = threading.Thread(target=serve, daemon=True)
    try:
        path = os.path.join(wd.path, "stats.sock")
        srv.bind(path)
        srv.listen(8)
        t.start()
        p = subprocess.Popen([SLUICECTL, "-s", path, "suppress", "list"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        head = p.stdout.readline()
        rows = [p.stdout.readline() for _ in range(1000)]
        early = not answered.is_set()
        seen.set()
        rest, err = p.communicate(timeout=30)
        assert early, "the first page was printed only after the last page came"
        assert p.returncode == 0 and err == "", (p.returncode, err)
        assert head.split() == ["ADDRESS", "SCOPE", "REASON", "ADDED", "EXPIRES", "NOTE"], head
        assert rows[0].split()[0] == "u0000@b.test" and rows[-1].split()[0] == "u0999@b.test"
        # a page's rows line up under the header
        assert rows[0].index("global") == head.index("SCOPE"), (head, rows[0])
        assert rest.split() == ["a-much-longer-address@b.test", "global", "manual",
                                "2026-01-01T00:00:00.000Z", "-", "n"], rest
        assert len(asked) == 2 and "after=u0999@b.test after_scope=global" in asked[1], asked
    finally:
        seen.set()
        t.join(10)
        srv.close()
        wd.cleanup()


def test_stats_says_when_delivery_is_off():
    """[delivery] enabled = no (the README's way to look without sending)
    was said once, in the log at start: sluicectl stats and top showed
    mail received and queued, none delivered, and no reason. The header
    now says "delivery OFF", and the JSON delivery_enabled."""
    wd = Workdir("sluice-ctl-")
    d = None
    try:
        for enabled in ("no", "yes"):
            sock = os.path.join(wd.path, f"{enabled}.sock")
            conf = wd.file(f"{enabled}.conf", f"""[server]
workers = 1
listen = 127.0.0.1:{free_port()}
trusted_networks = 127.0.0.0/8
[queue]
path = {wd.path}/spool-{enabled}
map_size = 64M
[delivery]
enabled = {enabled}
mta_sts = no
[stats]
socket = {sock}
""")
            d = Sluice(SLUICE, conf)
            d.wait_log("event=ready")
            p = ctl(sock, "stats")
            assert p.returncode == 0, p.stderr
            head = p.stdout.splitlines()[0]
            assert ("delivery OFF ([delivery] enabled = no)" in head) == (enabled == "no"), head
            doc = json.loads(ctl(sock, "stats", json_out=True).stdout)
            assert doc["delivery_enabled"] is (enabled == "yes"), doc.get("delivery_enabled")
            # domains: with delivery off no destination is made, and mail
            # queued showed as "(no destinations)" alone, as if none were
            if enabled == "no":
                port = int(re.search(r"listen = 127\.0\.0\.1:(\d+)", open(conf).read())[1])
                s = Smtp(port)
                for line, code in (("EHLO t\r\n", 250), ("MAIL FROM:<a@b.test>\r\n", 250),
                                   ("RCPT TO:<x@queued.test>\r\n", 250), ("DATA\r\n", 354),
                                   ("Subject: q\r\n\r\nq\r\n.\r\n", 250)):
                    s.send(line)
                    got = s.reply()
                    assert got.code == code, (line, got.text)
                s.sock.close()
                assert ctl_json(sock, "stats")["counters"]["received_msgs"] == 1
            p = ctl(sock, "domains")
            assert p.returncode == 0, p.stderr
            said = "(no destinations: delivery is off ([delivery] enabled = no), " \
                   "the mail waits in the queue)"
            assert (said in p.stdout) == (enabled == "no"), p.stdout
            assert "(no destinations" in p.stdout, p.stdout
            doc = json.loads(ctl(sock, "domains", json_out=True).stdout)
            assert doc["delivery_enabled"] is (enabled == "yes") and doc["domains"] == [], doc
            assert d.stop_clean() == 0
            d = None
    finally:
        if d is not None:
            d.stop_clean()
        wd.cleanup()


def test_suspend_and_resume():
    r = Relay(records_for(["held.test", "free.test"]), domain_conf=stats_conf())
    try:
        # a bad --for says what it takes ("for=: not a duration: 0" did
        # not: 0 is one, refused for not being above 0)
        for bad in ("0", "10x"):
            err = one_line_error(ctl(r, "suspend", "held.test", "--for", bad), 1)
            assert f"for={bad} (--for): not a duration above 0, such as 90s" in err, err
        err = one_line_error(ctl(r, "shaping", "suspend", "domain=held.test", "for=0"), 1)
        assert "for=0: not a duration above 0" in err, err
        doc = ctl_json(r, "suspend", "HELD.test")
        assert doc["domain"] == "held.test" and doc["suspended"] is True, doc
        # no [redis]: the shaping action is this node's alone (it said
        # "cluster yes", as if every node held the domain)
        assert doc["cluster"] is False, doc
        assert r.d.count_log('event=suspended scope=domain name="HELD.test" for_ms=0 '
                             'cluster=no') == 1
        r.inject([msg(i, [f"u{i}@held.test"]) for i in range(5)] +
                 [msg(10, ["v@free.test"])])
        # The other domain flows: the suspension is per domain.
        wait_sink(r, 1, timeout=30)
        row = wait_until(lambda: (lambda d: d if d and d["ready"] >= 5 else None)(
            domain_row(r, "held.test")), 10, "held.test listed with 5 ready")
        assert row["suspended"] is True and row["inflight"] == 0, row
        # why its limits are what they are: it said "[domain *]" when the
        # suspension was a shaping action (the default, without --local)
        assert row["limit_reason"] == "suspended by the operator", row
        # A bounded negative check: nothing for held.test within 2.5 s.
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            assert len(r.sink.files()) == 1, "mail delivered to a suspended domain"
            time.sleep(0.1)
        assert not [ln for ln in r.d.log_lines("event=delivered") if "held.test" in ln]
        doc = ctl_json(r, "resume", "held.test")
        assert doc["suspended"] is False, doc
        t0 = time.monotonic()
        wait_sink(r, 6, timeout=10)
        print(f"     resumed: delivered within {time.monotonic() - t0:.2f}s")
        row = domain_row(r, "held.test")
        assert row is None or row["suspended"] is False, row
        # for people: the duration under its name, as typed (it read
        # "for_ms  10m 0s", a label in ms over a value in minutes)
        text = ctl(r, "suspend", "free.test", "--for", "10m")
        assert text.returncode == 0, text.stderr
        rows = [ln.split() for ln in text.stdout.splitlines()]
        assert ["for", "10m"] in rows and "for_ms" not in text.stdout, text.stdout
        assert ctl_json(r, "resume", "free.test")["suspended"] is False
        one_line_error(ctl(r, "suspend", "bad!domain"), 1)
    finally:
        r.close()


def test_domains_show_a_suspended_domain_whose_mail_waits_for_its_retry():
    """A domain suspended while all its mail waits in the spool for its
    retry (deferred, its destination forgotten once idle) is shown
    suspended: its row said suspended no, "waiting for its retry", as
    if the suspend had not been taken."""
    r = Relay(records_for(["held.test"]), sink_flags=["-r", "rcpt"],
              delivery_conf="destination_idle_ttl = 1s", domain_conf=stats_conf())
    try:
        r.inject([msg(i, [f"u{i}@held.test"]) for i in range(3)])
        wait_until(lambda: len(deferrals(r)) == 3, 30, "3 recipients deferred")

        def waiting():
            row = domain_row(r, "held.test") or {}
            return row.get("deferred") == 3 and row.get("limit_reason") == "waiting for its retry"
        wait_until(waiting, 30, "held.test known by its spool count alone")
        assert ctl_json(r, "suspend", "held.test")["suspended"] is True
        row = domain_row(r, "held.test")
        assert row["suspended"] is True, row
        assert row["limit_reason"] == "suspended by the operator", row
        text = ctl(r, "domains")
        assert text.returncode == 0 and "suspended by the operator" in text.stdout, text.stdout
        assert ctl_json(r, "resume", "held.test")["suspended"] is False
        row = domain_row(r, "held.test")
        assert row["suspended"] is False and row["limit_reason"] == "waiting for its retry", row
    finally:
        r.close()


def test_spool_bytes_are_the_messages_not_the_maps_high_water_mark():
    """sluicectl stats' "message data" (spool.bytes, sluice_spool_bytes)
    is what the queued messages take: it was the map's highest page in
    use, which a campaign delivered leaves where it was (LMDB keeps freed
    pages for reuse): 60 messages queued read 1.2 GiB."""
    r = Relay(records_for(["held.test"]), domain_conf=stats_conf())
    try:
        ctl_json(r, "suspend", "held.test")
        body = ("Subject: big\r\n\r\n" + ("x" * 998 + "\r\n") * 200).encode()  # 200 KB
        r.inject([("s@example.com", [f"u{i}@held.test"], body) for i in range(20)])
        spool = ctl_json(r, "stats")["spool"]
        assert spool["bytes"] >= 20 * 200000, spool
        assert spool["bytes"] <= spool["map_used"], spool
        ctl_json(r, "resume", "held.test")
        wait_sink(r, 20, timeout=60)
        wait_until(lambda: ctl_json(r, "stats")["queue"]["messages"] == 0, 30, "an empty queue")
        spool = ctl_json(r, "stats")["spool"]
        assert spool["map_used"] >= 20 * 200000, spool  # the map keeps its pages
        assert spool["bytes"] < 200000, spool  # the messages are gone
        text = ctl(r, "stats")
        line = [ln for ln in text.stdout.splitlines() if "message data" in ln]
        assert line and "MiB" not in line[0] and "GiB" not in line[0], line
    finally:
        r.close()


def test_domains_show_a_suspended_campaigns_mail():
    """A suspended campaign's jobs are parked, on no destination's queue:
    `sluicectl domains` showed its destination with nothing waiting (or
    not at all), and `sluicectl stats` did not show the parked count
    either (only --json had it). The domain's row has them (PARKED), and
    the stats text has the node's count; once the destination was
    evicted as idle (destination_idle_ttl), a row of their own."""
    r = Relay(records_for(["camp.test", "free.test"]), domain_conf=stats_conf(),
              delivery_conf="destination_idle_ttl = 1s")
    try:
        assert ctl_json(r, "suspend", "--campaign", "spring")["suspended"] is True
        spring = [("s@example.com", [f"u{i}@camp.test"],
                   f"Subject: c{i}\r\nX-Sluice-Campaign: spring\r\n\r\nbody\r\n".encode())
                  for i in range(5)]
        r.inject(spring + [msg(9, ["v@free.test"])])
        wait_sink(r, 1, timeout=30)
        wait_until(lambda: ctl_json(r, "stats").get("parked") == 5, 30, "5 jobs parked")
        row = domain_row(r, "camp.test")
        assert row is not None and row["parked"] == 5 and row["ready"] == 0, row
        assert row["oldest_age_ms"] is not None, row
        text = ctl(r, "domains")
        lines = text.stdout.splitlines()
        head = lines[0].split()
        assert "PARKED" in head, lines[0]
        cells = next(ln.split() for ln in lines if ln.startswith("camp.test"))
        assert cells[head.index("PARKED")] == "5", text.stdout
        st = ctl(r, "stats").stdout
        assert re.search(r"jobs parked \(tenant or campaign suspended\) +5$", st, re.M), st
        row = wait_until(lambda: (lambda x: x if x and x["limit_reason"] ==
                                  "its tenant or campaign suspended" else None)(
            domain_row(r, "camp.test")), 20, "the row of the parked jobs alone")
        assert row["parked"] == 5 and row["ready"] == 0 and row["max_connections"] > 0, row
        assert ctl_json(r, "resume", "--campaign", "spring")["suspended"] is False
        wait_sink(r, 6, timeout=30)
        wait_until(lambda: (domain_row(r, "camp.test") or {"parked": 0})["parked"] == 0, 10,
                   "nothing parked after the resume")
    finally:
        r.close()


def test_queue_lists_like_mailq():
    """sluicectl queue [N] [DOMAIN] on a running sluice: the queued
    messages oldest first with each recipient's state, attempts, next
    attempt and last reply; N cuts the list and says there is more; a
    DOMAIN keeps the messages with a recipient there; the text view shows
    the same. (sluice-spool needs sluice stopped.)"""
    r = Relay(records_for(["soft.test", "other.test"]), sink_flags=["-r", "RCPT"],
              domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\n"))
    try:
        r.inject([msg(1, ["a@soft.test", "b@soft.test"]), msg(2, ["c@other.test"]),
                  msg(3, ["d@other.test"])], sessions=1)
        wait_events(r.dlog, lambda e: e["event"] == "transient_failure", 4)
        doc = ctl_json(r, "queue")
        ms = doc["messages"]
        assert len(ms) == 3 and doc["more"] is False, doc
        assert [m["id"] for m in ms] == sorted(m["id"] for m in ms), "oldest first"
        first = ms[0]
        assert [x["rcpt"] for x in first["recipients"]] == ["a@soft.test", "b@soft.test"], first
        for x in first["recipients"]:
            assert x["state"] == "deferred" and x["attempts"] == 1, x
            assert x["next_attempt"] and 400 <= x["last_code"] < 500 and x["last_reply"], x
        one = ctl_json(r, "queue", "1")
        assert len(one["messages"]) == 1 and one["more"] is True, one
        other = ctl_json(r, "queue", "10", "other.test")
        assert [m["recipients"][0]["rcpt"] for m in other["messages"]] == \
            ["c@other.test", "d@other.test"], other
        text = ctl(r, "queue")
        assert text.returncode == 0, text.stderr
        assert text.stdout.startswith("ID") and first["id"] in text.stdout, text.stdout
        assert "deferred a@soft.test" in " ".join(text.stdout.split()), text.stdout
        assert "3 messages" in text.stdout, text.stdout
        one_line_error(ctl(r, "queue", "0"), 2)  # a bad number: usage, as domains 0
        # one N and one DOMAIN: a second of either is refused, not taken
        # for the first in silence
        for args in (("5", "6"), ("soft.test", "other.test"), ("1", "other.test", "2")):
            p = ctl(r, "queue", *args)
            assert p.returncode == 2 and p.stdout == "", (args, p.returncode, p.stdout)
            assert "usage" in p.stderr, (args, p.stderr)
        # arguments sluicectl passes on as typed: sluice's usage answer is
        # a usage error (2), as the man page says, not a refusal (1)
        for args in (("tlsrpt", "x"), ("shaping", "clear")):
            err = one_line_error(ctl(r, *args), 2)
            assert err.startswith("sluicectl: usage: "), (args, err)
        # a domain with nothing queued is not an empty queue
        none = ctl(r, "queue", "10", "nosuch.test")
        assert none.returncode == 0, none.stderr
        assert "no queued message has a recipient at nosuch.test" in none.stdout, none.stdout
        assert "the queue is empty" not in none.stdout, none.stdout
        assert ctl_json(r, "queue", "nosuch.test") == \
            {"ok": True, "more": False, "cut": False, "domain": "nosuch.test", "messages": []}
    finally:
        r.close()


def test_queue_answer_has_a_size_cap():
    """queue N counts messages, and a message may have 1,000 recipients:
    the answer stops at 8 MiB of messages, says it was cut (more, cut)
    and lists the oldest whole; 10,000 such messages were gigabytes of
    JSON, built whole by sluice and parsed whole by sluicectl."""
    r = Relay(records_for(["big.test"]), sink_flags=["-r", "RCPT"],
              domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\n"))
    try:
        local = "x" * 60
        r.inject([msg(i, [f"{local}{k}@big.test" for k in range(1000)]) for i in range(80)],
                 sessions=2)
        p = ctl(r, "queue", "100", json_out=True)
        assert p.returncode == 0, p.stderr
        assert len(p.stdout) < 9 << 20, f"answer of {len(p.stdout)} octets"
        doc = json.loads(p.stdout)
        ms = doc["messages"]
        assert doc["more"] is True and doc["cut"] is True and 10 <= len(ms) < 80, \
            (doc["more"], doc.get("cut"), len(ms))
        assert all(len(m["recipients"]) == 1000 for m in ms)
        assert [m["id"] for m in ms] == sorted(m["id"] for m in ms), "oldest first"
        assert ctl_json(r, "queue", "3")["cut"] is False
        text = ctl(r, "queue", "100")
        assert text.returncode == 0, text.stderr
        # recipients deferred meanwhile grow their message's JSON: the
        # count may differ from the first answer's
        assert re.search(r"\n\d+ messages shown, cut at the answer's size cap",
                         text.stdout), text.stdout[-300:]
    finally:
        r.close()


def test_flush_retries_deferred_now():
    r = Relay(records_for(["soft.test", "other.test"]), sink_flags=["-r", "RCPT"],
              domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\n"))
    try:
        r.inject([msg(1, ["a@soft.test", "b@soft.test"]), msg(2, ["c@other.test"])])
        wait_events(r.dlog, lambda e: e["event"] == "transient_failure", 3)
        qid = deferred_qid(r, "a@soft.test")
        r.sink.stop()
        r.sink = Sink(r.wd, r.mx_port, name="sink2")
        # Due in an hour: without the flush nothing would happen now.
        m = ctl_json(r, "message", qid)
        assert all(x["state"] == "deferred" for x in m["recipients"]), m
        doc = ctl_json(r, "flush", "soft.test")
        assert doc["recipients"] == 2, doc
        t0 = time.monotonic()
        dl = wait_events(r.dlog, lambda e: e["event"] == "delivery", 2, timeout=10)
        assert sorted(e["rcpt"] for e in dl) == ["a@soft.test", "b@soft.test"], dl
        print(f"     flushed: delivered within {time.monotonic() - t0:.2f}s")
        # other.test was not flushed: it waits for its hour.
        assert not [e for e in events(r.dlog) if e["event"] == "delivery"
                    and e["rcpt"] == "c@other.test"]
        doc = ctl_json(r, "flush")
        assert doc["recipients"] == 1, doc
        wait_events(r.dlog, lambda e: e["event"] == "delivery", 3, timeout=10)
        assert ctl_json(r, "flush")["recipients"] == 0
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        r.close()


def test_active_limit_keeps_due_mail_in_the_spool():
    """[delivery] active_limit: 100 deferred recipients come due at once
    (a flush after an outage) while the receiver takes 50 a second; with a
    limit of 20 the take hands out at most what fits under it, and the rest
    waits in the spool (deferred) until ready ones are done. Before, one
    take made all 100 ready at once, each with its memory: a million after
    a long outage. Every recipient is delivered, once."""
    n, limit = 100, 20
    r = Relay(records_for(["soft.test"]), sink_flags=["-r", "RCPT"],
              delivery_conf=f"active_limit = {limit}\n",
              domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\n"
                                     "max_message_rate = 50/s\n"))
    try:
        r.inject([msg(i, [f"u{i}@soft.test"]) for i in range(n)])
        wait_events(r.dlog, lambda e: e["event"] == "transient_failure", n, timeout=30)
        r.sink.stop()
        r.sink = Sink(r.wd, r.mx_port, name="sink2")
        # the injection's 100 ready held nothing back: none was due
        paused_before = len(r.d.log_lines("event=due_paused"))
        assert paused_before == 0, r.d.log_lines("event=due_paused")
        assert ctl_json(r, "flush")["recipients"] == n
        most, paused_seen, waiting_seen = 0, False, False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            q = ctl_json(r, "stats")["queue"]
            ready = q["recipients"] - q["deferred"]
            most = max(most, ready)
            paused_seen |= q["due_paused"]
            waiting_seen |= ready > 0 and q["deferred"] > 0
            if q["recipients"] == 0:
                break
            time.sleep(0.03)
        else:
            raise AssertionError(f"still queued after 60 s: {q}")
        print(f"     most ready at once: {most} (limit {limit})")
        assert most <= limit, f"{most} ready at once, over the limit of {limit}"
        assert waiting_seen and paused_seen, "the take never paused: no limit applied"
        count = lambda w: len(r.d.log_lines(f"event=due_{w}"))  # noqa: E731
        wait_until(lambda: count("resumed") >= count("paused"), 10, "the take resumed")
        # the flushed backlog paused the take once, logged once each way:
        # flipped at each take, the drain at the limit logged a pair every
        # 100 ms (17 pairs here)
        paused, resumed = count("paused"), count("resumed")
        assert paused - paused_before <= 1 and paused == resumed, \
            f"{paused - paused_before} due_paused lines since the flush, {paused}/{resumed} in all"
        dl = wait_events(r.dlog, lambda e: e["event"] == "delivery", n, timeout=10)
        assert sorted(e["rcpt"] for e in dl) == sorted(f"u{i}@soft.test" for i in range(n))
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        r.close()


def test_active_limit_leaves_out_a_suspended_campaigns_mail():
    """A suspended campaign's mail is parked: ready in the spool, but it
    cannot go until the campaign is resumed. It counted against
    [delivery] active_limit all the same, so with more of it parked than
    the limit, every other domain's deferred recipients that came due
    stayed in the spool (a paused campaign of 2 million stopped all
    retries). Only the mail that can go counts now: the retry of
    other.test is taken and delivered while 8 recipients of the campaign
    (over the limit of 4) stay parked."""
    limit, n = 4, 8
    r = Relay(records_for(["camp.test", "other.test"]), sink_flags=["-r", "RCPT"],
              delivery_conf=f"active_limit = {limit}\n",
              domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\n"))
    try:
        r.inject([msg(0, ["x@other.test"])], sessions=1)
        wait_events(r.dlog, lambda e: e["event"] == "transient_failure", 1, timeout=30)
        assert ctl_json(r, "suspend", "--campaign", "spring")["suspended"] is True
        spring = [("s@example.com", [f"u{i}@camp.test"],
                   f"Subject: c{i}\r\nX-Sluice-Campaign: spring\r\n\r\nbody\r\n".encode())
                  for i in range(n)]
        r.inject(spring)
        wait_until(lambda: ctl_json(r, "stats").get("parked") == n, 30, f"{n} jobs parked")
        q = ctl_json(r, "stats")["queue"]
        assert q["recipients"] - q["deferred"] == n > limit, q
        r.sink.stop()
        r.sink = Sink(r.wd, r.mx_port, name="sink2")
        assert ctl_json(r, "flush")["recipients"] == 1
        wait_events(r.dlog, lambda e: e["event"] == "delivery" and e["rcpt"] == "x@other.test",
                    1, timeout=15)
        assert ctl_json(r, "stats")["parked"] == n
        assert ctl_json(r, "resume", "--campaign", "spring")["suspended"] is False
        dl = wait_events(r.dlog, lambda e: e["event"] == "delivery", n + 1, timeout=30)
        assert sorted(e["rcpt"] for e in dl) == sorted(
            ["x@other.test"] + [f"u{i}@camp.test" for i in range(n)]), dl
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        r.close()


def test_active_limit_leaves_out_a_suspended_domains_mail():
    """As a suspended campaign's, the mail of a domain suspended on this
    node waits (on its destination's queue) until the resume: with more
    of it than [delivery] active_limit, the retries of every other domain
    stayed in the spool. It does not count now: other.test's retry is
    delivered while held.test's 8 (over the limit of 4) wait, and once
    held.test is resumed they go too."""
    limit, n = 4, 8
    r = Relay(records_for(["held.test", "other.test"]), sink_flags=["-r", "RCPT"],
              delivery_conf=f"active_limit = {limit}\n",
              domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\n"))
    try:
        r.inject([msg(0, ["x@other.test"])], sessions=1)
        wait_events(r.dlog, lambda e: e["event"] == "transient_failure", 1, timeout=30)
        assert ctl_json(r, "suspend", "--local", "held.test")["suspended"] is True
        r.inject([msg(i, [f"u{i}@held.test"]) for i in range(1, n + 1)])
        q = ctl_json(r, "stats")["queue"]
        assert q["recipients"] - q["deferred"] == n > limit, q
        r.sink.stop()
        r.sink = Sink(r.wd, r.mx_port, name="sink2")
        assert ctl_json(r, "flush", "other.test")["recipients"] == 1
        wait_events(r.dlog, lambda e: e["event"] == "delivery" and e["rcpt"] == "x@other.test",
                    1, timeout=15)
        assert not r.d.log_lines("event=due_paused"), r.d.log_lines("event=due_paused")
        assert not [e for e in events(r.dlog) if e["event"] == "delivery"
                    and e["rcpt"].endswith("@held.test")]
        assert ctl_json(r, "resume", "--local", "held.test")["suspended"] is False
        dl = wait_events(r.dlog, lambda e: e["event"] == "delivery", n + 1, timeout=30)
        assert sorted(e["rcpt"] for e in dl) == sorted(
            ["x@other.test"] + [f"u{i}@held.test" for i in range(1, n + 1)]), dl
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        r.close()


def test_due_paused_only_when_something_is_due():
    """event=due_paused (and queue.due_paused) say that deferred
    recipients that came due wait in the spool for [delivery]
    active_limit. New mail alone over the limit set it, with nothing due:
    the operator read that retries were held back while none was (here 8
    ready at a suspended domain, one recipient deferred for an hour). It
    is said once a deferred recipient is due and held back (the flush),
    and the resume says due_resumed."""
    limit, n = 4, 8
    r = Relay(records_for(["held.test", "other.test"]), sink_flags=["-r", "RCPT"],
              delivery_conf=f"active_limit = {limit}\n",
              domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\n"))
    try:
        r.inject([msg(0, ["x@other.test"])], sessions=1)
        wait_events(r.dlog, lambda e: e["event"] == "transient_failure", 1, timeout=30)
        assert ctl_json(r, "suspend", "held.test")["suspended"] is True
        r.inject([msg(i, [f"u{i}@held.test"]) for i in range(1, n + 1)])
        q = ctl_json(r, "stats")["queue"]
        assert q["recipients"] - q["deferred"] == n > limit and q["deferred"] == 1, q
        # the due poll looks every 100 ms while the limit holds: a few
        # seconds of them, none of which may say paused
        time.sleep(2.5)
        assert not r.d.log_lines("event=due_paused"), r.d.log_lines("event=due_paused")
        assert ctl_json(r, "stats")["queue"]["due_paused"] is False
        assert ctl_json(r, "flush", "other.test")["recipients"] == 1
        line = r.d.wait_log("event=due_paused")
        assert f"ready={n} " in line and "deferred=1 " in line, line
        assert ctl_json(r, "stats")["queue"]["due_paused"] is True
        r.sink.stop()
        r.sink = Sink(r.wd, r.mx_port, name="sink2")
        assert ctl_json(r, "resume", "held.test")["suspended"] is False
        dl = wait_events(r.dlog, lambda e: e["event"] == "delivery", n + 1, timeout=30)
        assert sorted(e["rcpt"] for e in dl) == sorted(
            ["x@other.test"] + [f"u{i}@held.test" for i in range(1, n + 1)]), dl
        r.d.wait_log("event=due_resumed")
        assert len(r.d.log_lines("event=due_paused")) == 1
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_flush_ends_the_rest_of_a_site_that_was_down():
    """An outage's flush: the MX host that three domains share refused
    connections, so their site rests (site_hold = 10m here) and their
    recipients wait, deferred for an hour or held in memory. Once the
    receiver is back, `flush` delivers now: it ends the rests too
    (rests_ended counts the destinations that rested). Before, the flush
    only retimed the spool and the mail waited out the ten minutes. A
    flush of one domain ends only the rests its own mail waits on, one of
    a tenant with nothing deferred none."""
    doms = ["a.test", "b.test", "c.test"]
    r = Relay(records_for(doms), with_sink=False,
              domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\nsite_hold = 10m\n"))
    try:
        r.inject([msg(i, [f"u{i}@{d}"]) for i, d in enumerate(doms)], sessions=1)
        r.d.wait_log("event=site_held")
        wait_events(r.dlog, lambda e: e["event"] == "transient_failure", 1)
        r.sink = Sink(r.wd, r.mx_port)
        # A scope that selects nobody ends no rest (it ended every one).
        doc = ctl_json(r, "flush", "--tenant", "nobody")
        assert doc["recipients"] == 0 and doc["rests_ended"] == 0, doc
        doc = ctl_json(r, "flush")
        assert doc["rests_ended"] >= 1, doc
        dl = wait_events(r.dlog, lambda e: e["event"] == "delivery", 3, timeout=10)
        assert sorted(e["rcpt"] for e in dl) == ["u0@a.test", "u1@b.test", "u2@c.test"], dl
        assert ctl_json(r, "flush")["rests_ended"] == 0

        # Down again: a.test's flush ends the rest a.test's mail waits on.
        r.sink.stop()
        r.sink = None
        held = r.d.count_log("event=site_held")
        r.inject([msg(10, ["v@a.test"])], sessions=1)
        r.d.wait_log_count("event=site_held", held + 1)
        wait_events(r.dlog, lambda e: e["event"] == "transient_failure" and
                    e["rcpt"] == "v@a.test", 1)
        r.sink = Sink(r.wd, r.mx_port, name="sink2")
        doc = ctl_json(r, "flush", "a.test")
        assert doc["recipients"] == 1 and doc["rests_ended"] == 1, doc
        wait_events(r.dlog, lambda e: e["event"] == "delivery" and e["rcpt"] == "v@a.test", 1,
                    timeout=10)
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        r.close()


def test_failing_a_dead_hosts_mail_does_not_stall_the_worker():
    """300 messages of 1,000 recipients wait at one domain while its only
    MX host holds the connection without a greeting; then it closes, and
    every waiting recipient is deferred. That was one worker turn for all
    300,000 (each a log line, a delivery-log record and its part of a
    commit; each envelope read and scanned once for every one of its
    recipients' jobs): nearly two seconds, the worker answering none of
    its submission sessions meanwhile. Now they are deferred some
    thousands a turn: the longest turn is a small part of the time the
    deferrals took (whatever the machine's speed, ASan or not), and each
    recipient is deferred exactly once."""
    import threading
    from test_delivery import HostileMx
    gone = threading.Event()

    def mute(c, rfile):
        gone.wait(120)  # then closes without a greeting

    r = Relay(records_for(["big.test"]), with_sink=False,
              delivery_conf="greeting_timeout = 5m",
              domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\nsite_hold = 1m\n"))
    mx = HostileMx(r.mx_port, mute)
    try:
        n_msg, n_rcpt = 300, 1000
        r.inject([msg(i, [f"{'x' * 30}{k}@big.test" for k in range(n_rcpt)])
                  for i in range(n_msg)], sessions=4)
        assert counters(r)["deferred"] == 0
        before = ctl_json(r, "stats")["loop"]["longest_turn_ms"]
        gone.set()
        wait_until(lambda: counters(r)["deferred"] >= n_msg * n_rcpt, 300,
                   "every recipient deferred")
        doc = ctl_json(r, "stats")
        longest = doc["loop"]["longest_turn_ms"]
        assert doc["counters"]["deferred"] == n_msg * n_rcpt, doc["counters"]
        # The delivery log's lines reach the file from its writer thread,
        # a flush interval (50 ms, more under load) after the counters:
        # wait for them (whole lines), then read them all
        def tf_lines():
            with open(r.dlog, "rb") as f:
                data = f.read()
            return data[:data.rfind(b"\n") + 1].count(b'"event":"transient_failure"')
        wait_until(lambda: tf_lines() >= n_msg * n_rcpt, 60,
                   "every deferral in the delivery log")
        tf = [e for e in raw_events(r.dlog) if e["event"] == "transient_failure"]
        assert len(tf) == n_msg * n_rcpt, len(tf)
        assert len({(e["id"], e["rcpt"]) for e in tf}) == n_msg * n_rcpt
        assert all(e["attempt"] == 1 for e in tf)
        span = (max(e["time"] for e in tf), min(e["time"] for e in tf))
        ms = [time.mktime(time.strptime(x[:19], "%Y-%m-%dT%H:%M:%S")) * 1000 + int(x[20:23])
              for x in span]
        took = ms[0] - ms[1]
        print(f"     deferrals over {took:.0f} ms, longest worker turn {longest:.0f} ms "
              f"({before:.0f} ms before the host closed)")
        assert longest < took / 3, f"a worker turn of {longest:.0f} ms of {took:.0f} ms"
        assert r.d.stop_clean() == 0
    finally:
        gone.set()
        mx.stop()
        r.close()


def test_domains_of_deferred_mail_across_a_restart():
    """A domain whose every recipient waits deferred: `domains` gives the
    age of the oldest one (not '-': none is ready) and its deferral class
    (TOP DEFERRAL: the recipients waiting deferred now, by class), before
    and after a restart on the same spool (the class is kept with each
    recipient in the spool), and after the same recipients were deferred
    again (deferrals since the destination was made are not recipients)."""
    r = Relay(records_for(["soft.test"]), sink_flags=["-r", "RCPT"],
              domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\n"))
    try:
        r.inject([msg(1, ["a@soft.test", "b@soft.test"]), msg(2, ["c@soft.test"])])
        ev = wait_events(r.dlog, lambda e: e["event"] == "transient_failure", 3)
        cls = ev[0]["class"]

        def check(when, key):
            d = wait_until(lambda: (lambda x: x if x and x["deferred"] == 3
                                    and x["waiting_by_class"] == {cls: 3} else None)(
                domain_row(r, "soft.test")), 10, f"soft.test's 3 deferred {when}")
            assert d["ready"] == 0, (when, d)
            assert d["oldest_age_ms"] is not None and d["oldest"] is not None, (when, d)
            assert d[key] == {cls: 3}, (when, d)
            p = ctl(r, "domains")
            assert p.returncode == 0, p.stderr
            row = [ln for ln in p.stdout.splitlines() if ln.startswith("soft.test ")]
            assert len(row) == 1, p.stdout
            assert row[0].split()[10] != "-", (when, p.stdout)  # OLDEST
            assert f" {cls}:3 " in row[0], (when, p.stdout)   # TOP DEFERRAL
        check("before the restart", "deferred_by_class")
        # The three tried and deferred again: six deferrals since the
        # destination was made, still three recipients waiting.
        assert ctl_json(r, "flush")["recipients"] == 3
        wait_events(r.dlog, lambda e: e["event"] == "transient_failure", 6)
        wait_until(lambda: domain_row(r, "soft.test")["deferred_by_class"] == {cls: 6}, 10,
                   "six deferrals counted")
        check("after a second deferral", "waiting_by_class")
        assert r.d.stop_clean() == 0
        r.d = Sluice(SLUICE, os.path.join(r.wd.path, "sluice.conf"))
        r.d.wait_log("event=ready")
        check("after the restart", "waiting_by_class")
        assert domain_row(r, "soft.test")["deferred_by_class"] == {}
    finally:
        r.close()


def test_domains_last_reply_says_whether_a_server_sent_it():
    """A destination's last reply in `domains`: a server's (smtp-sink
    refusing RCPT) with its code, as its delivery log event has it; a
    failure no server sent, a failed MX lookup (dnsmasq knows no upstream
    for nodns.example) that sluice defers 451 4.4.3 and a refused
    connect, with no code (null in JSON, "-" under LAST) and the class
    (and reason) its event has. Before, the view showed the failure
    policy's 451 as if a receiver had said it."""
    recs = records_for(["soft.test"]) + ["host-record=dead.test,127.0.0.9",
                                         "mx-host=dead.test,dead.test,10"]
    r = Relay(recs, sink_flags=["-r", "RCPT"],
              domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\n"))
    try:
        r.inject([msg(1, ["a@soft.test"]), msg(2, ["b@nodns.example"]),
                  msg(3, ["c@dead.test"])])
        ev = wait_events(r.dlog, lambda e: e["event"] == "transient_failure", 3)
        by = {e["domain"]: e for e in ev}
        dns, dead, soft = by["nodns.example"], by["dead.test"], by["soft.test"]
        assert dns["class"] == "dns_failure" and "mx" not in dns, dns
        assert dead.get("reason") == "connect_refused" and "code" not in dead, dead
        assert 400 <= soft["code"] < 500 and "reason" not in soft, soft
        rows = {d: domain_row(r, d) for d in by}
        want = {"nodns.example": (None, dns["reply"], None),
                "dead.test": (None, dead["reply"], "connect_refused"),
                "soft.test": (soft["code"], f"{soft['code']} {soft['reply']}", None)}
        for d, (code, reply, reason) in want.items():
            x = rows[d]
            assert x["last_code"] == code and x["last_reply"] == reply, (d, x, by[d])
            assert x["last_class"] == by[d]["class"] and x["last_reason"] == reason, (d, x)
        assert not rows["nodns.example"]["last_reply"].startswith("451"), rows
        p = ctl(r, "domains")
        assert p.returncode == 0, p.stderr
        head = p.stdout.splitlines()[0]
        at = head.index(" LAST ") + 1
        for d, (code, _, _) in want.items():
            row = next(ln for ln in p.stdout.splitlines() if ln.startswith(d + " "))
            cell = row[at:].split("  ")[0]
            assert cell == f"{code if code else '-'} {by[d]['class']}", (d, cell, p.stdout)
    finally:
        r.close()


def test_domains_oldest_counts_mail_in_flight():
    """A domain whose only mail is in flight (its receiver takes the
    message and holds the final dot's reply): `domains` gives the age of
    its oldest message, as doc/sluicectl.md says (ready, in flight or
    deferred), not '-' and null, which it gave while only ready and
    deferred mail counted; once delivered, none."""
    import threading
    from test_delivery import HostileMx
    release = threading.Event()

    def slow_dot(c, rfile):
        c.sendall(b"220 slow ESMTP\r\n")
        while True:
            line = rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"DATA":
                c.sendall(b"354 go\r\n")
                while rfile.readline() not in (b".\r\n", b""):
                    pass
                release.wait(60)
                c.sendall(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                c.sendall(b"221 bye\r\n")
                return
            else:
                c.sendall(b"250 ok\r\n")

    r = Relay(records_for(["slow.test"]), with_sink=False,
              domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\n"))
    mx = HostileMx(r.mx_port, slow_dot)
    try:
        r.inject([msg(1, ["a@slow.test"])])
        d = wait_until(lambda: (lambda x: x if x and x["inflight"] == 1 else None)(
            domain_row(r, "slow.test")), 30, "slow.test's message in flight")
        assert d["ready"] == 0 and d["deferred"] == 0, d
        assert d["oldest"] is not None and d["oldest_age_ms"] is not None, d
        p = ctl(r, "domains")
        assert p.returncode == 0, p.stderr
        row = [ln for ln in p.stdout.splitlines() if ln.startswith("slow.test ")]
        assert len(row) == 1 and row[0].split()[10] != "-", p.stdout  # OLDEST
        release.set()
        wait_events(r.dlog, lambda e: e["event"] == "delivery", 1)
        d = wait_until(lambda: (lambda x: x if x and x["inflight"] == 0 else None)(
            domain_row(r, "slow.test")), 30, "slow.test's message delivered")
        assert d["oldest"] is None and d["oldest_age_ms"] is None, d
        assert r.d.stop_clean() == 0
    finally:
        release.set()
        mx.stop()
        r.close()


def test_bounce_by_id_and_domain():
    """bounce ID of a deferred message, then bounce DOMAIN of a suspended
    domain's ready mail: the recipients leave the spool with a bounce event
    each, nothing is delivered after all, and (doc/sluicectl.md) the
    sender gets a DSN."""
    recs = records_for(["soft.test"]) + [
        "host-record=mx2.test,127.0.0.2", "mx-host=sender.test,mx2.test,10",
        "host-record=mx3.test,127.0.0.3", "mx-host=held.test,mx3.test,10"]
    r = Relay(recs, sink_flags=["-r", "RCPT"], dsn=True,
              domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\n"))
    s2 = s3 = None
    try:
        s2 = Sink(r.wd, r.mx_port, name="senders", host="127.0.0.2")
        s3 = Sink(r.wd, r.mx_port, name="held", host="127.0.0.3")  # accepts
        ctl_json(r, "suspend", "held.test")
        r.inject([("alice@sender.test", ["a@soft.test", "b@soft.test"],
                   b"Subject: 1\r\n\r\nx\r\n"),
                  ("alice@sender.test", ["c@soft.test"], b"Subject: 2\r\n\r\nx\r\n")] +
                 [("alice@sender.test", [f"h{i}@held.test"], b"Subject: h\r\n\r\nx\r\n")
                  for i in range(3)], sessions=1)
        wait_until(lambda: len([e for e in raw_events(r.dlog, False)
                                if e["event"] == "transient_failure"]) >= 3, 30,
                   "3 transient failures")
        qid = deferred_qid(r, "a@soft.test")

        def bounces():
            return [e for e in raw_events(r.dlog, False) if e["event"] == "bounce"]

        doc = ctl_json(r, "bounce", qid)
        assert doc["recipients"] == 2, doc
        b = wait_until(lambda: bounces() if len(bounces()) >= 2 else None, 10, "2 bounce events")
        assert sorted(e["rcpt"] for e in b) == ["a@soft.test", "b@soft.test"], b
        assert all(e["id"] == qid and e["code"] == 550 and e["class"] for e in b), b
        # with the reply they were deferred with, as an expiry says it: why
        # the mail was stuck (the DSN quotes the same)
        assert all(e["reply"].startswith("bounced by the operator; last attempt: 4")
                   for e in b), b
        one_line_error(ctl(r, "message", qid), 1)  # gone from the spool
        one_line_error(ctl(r, "bounce", qid), 1)   # and cannot be bounced twice
        # a mistyped queue id reads as a dotless domain: an error, not "0 bounced"
        err = one_line_error(ctl(r, "bounce", "ZZZZZZZZZZZZZ"), 1)
        assert "no queue id ZZZZZZZZZZZZZ" in err, err
        wait_until(lambda: domain_row(r, "held.test") and domain_row(r, "held.test")["ready"] == 3,
                   10, "held.test with 3 ready")
        doc = ctl_json(r, "bounce", "held.test")
        assert doc["recipients"] == 3, doc
        wait_until(lambda: len(bounces()) >= 5, 10, "5 bounce events")
        held = [e for e in bounces() if e["rcpt"].endswith("@held.test")]
        assert [e["reply"] for e in held] == ["bounced by the operator"] * 3, held  # never tried
        ctl_json(r, "resume", "held.test")
        # (with shaping on, the suspension is a cluster-wide shaping action:
        # the socket's line, not a worker's, says it ended)
        r.d.wait_log('event=resumed scope=domain name="held.test"')
        # A bounded negative check: the bounced recipients, which were
        # waiting in memory, must not go out now that the domain runs.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not s3.files():
            time.sleep(0.1)
        assert not s3.files(), f"{len(s3.files())} bounced recipients delivered after resume: " \
            + "; ".join(ln for ln in r.d.lines if "held.test" in ln and "event=delivered" in ln)
        # What is left: message 2 (c@soft.test) alone, once the bounces'
        # DSNs (queued with them) have been delivered to the sender's MX
        # and their outcomes committed, which the 3 s above did not wait
        # for: wait for that (bounded), then check what is left
        def queue():
            return ctl_json(r, "stats")["queue"]
        wait_until(lambda: queue()["messages"] == 1, 30, "only message 2 left in the spool")
        q = queue()
        assert q["messages"] == 1 and q["recipients"] == 1, q

        # The DSNs, where the documentation promises them (one per message).
        dsn_arrived = True
        try:
            wait_until(lambda: len(s2.files()) >= 4, 10, "4 DSNs at the sender's MX")
        except AssertionError:
            dsn_arrived = False
        dsns = [re.sub(rb"\r?\n[ \t]+", b" ", m) for m in s2.messages()]
        soft = [m for m in dsns if b"a@soft.test" in m]
        assert len(soft) == 1 and b"Diagnostic-Code: X-Sluice; bounced by the operator; " \
            b"last attempt: 4" in soft[0], soft
        assert r.d.stop_clean() == 0
        delivered = [ln for ln in r.d.log_lines("event=delivered") if "held.test" in ln]
        assert not delivered, f"bounced by the operator, then delivered: {delivered}"
        assert r.sink.files() == []
        assert mdb_entries(r.spool, "msg") == 0 + 1, "only message 2 (c@soft.test) is left"
        problems = []
        try:
            events(r.dlog)  # the fields every per-recipient event carries
        except AssertionError as e:
            problems.append(f"a bounce event lacks a field: {e}")
        if not dsn_arrived:
            problems.append(f"no DSN for operator bounces: {len(s2.files())} at the sender's "
                            f"MX, {r.d.count_log('event=dsn_queued')} dsn_queued in the log")
        assert not problems, "; ".join(problems)
    finally:
        for x in (s2, s3):
            if x is not None:
                x.stop()
        r.close()


def test_bounce_answers_once_done():
    """sluicectl bounce DOMAIN answers once the bounce is committed: the
    next command sees the spool without the bounced mail (it answered as
    soon as the bounces were posted to the workers, so a queue listing or
    a stop just after still found them: a stop then lost the bounce, and
    the mail went out at the next start), and still_queued says none was
    left behind."""
    recs = records_for(["other.test"]) + [
        "host-record=mx3.test,127.0.0.3", "mx-host=held.test,mx3.test,10"]
    r = Relay(recs, domain_conf=stats_conf())
    st = None
    try:
        ctl_json(r, "suspend", "held.test")
        r.inject([msg(i, [f"h{i}@held.test", f"k{i}@held.test"]) for i in range(40)],
                 sessions=2)
        # ready counts jobs, one per message here (doc/sluicectl.md), not its 80 recipients
        wait_until(lambda: (domain_row(r, "held.test") or {}).get("ready") == 40, 30,
                   "held.test with 40 messages ready")
        # one connection, both commands in one write: the second runs the
        # moment the first is answered
        st = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        st.settimeout(20)
        st.connect(sock_of(r))
        sf = st.makefile("rb")
        st.sendall(b"bounce held.test\nstats\n")
        doc = json.loads(sf.readline())
        assert doc["ok"] is True and doc["recipients"] == 80 and doc["still_queued"] == 0, doc
        stats = json.loads(sf.readline())
        assert stats["queue"]["messages"] == 0 and stats["queue"]["recipients"] == 0, \
            stats["queue"]
        p = ctl(r, "bounce", "held.test")  # nothing left to bounce
        assert p.returncode == 0 and p.stdout.split() == ["recipients", "0", "still_queued",
                                                          "0"], (p.stdout, p.stderr)
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
        assert len([e for e in raw_events(r.dlog) if e["event"] == "bounce"]) == 80
    finally:
        if st is not None:
            st.close()
        r.close()


def test_bounce_counts_failures_held_for_their_dsn_as_done():
    """Recipients bounced by sluicectl bounce DOMAIN while other
    recipients of their messages wait (here: a suspended domain's) stay in
    the spool held for their message's one DSN ([bounce] dsn_wait), as
    any failure does: they are bounced, with their events, and
    still_queued counts none of them (it said 40, the operator told to
    "bounce again", which then found nothing to bounce)."""
    recs = records_for(["other.test"]) + [
        "host-record=mx3.test,127.0.0.3", "mx-host=held.test,mx3.test,10",
        "mx-host=wait.test,mx3.test,10"]
    r = Relay(recs, domain_conf=stats_conf(), dsn=True)
    try:
        ctl_json(r, "suspend", "held.test")
        ctl_json(r, "suspend", "wait.test")
        r.inject([msg(i, [f"h{i}@held.test", f"w{i}@wait.test"]) for i in range(40)],
                 sessions=2)
        wait_until(lambda: all((domain_row(r, d) or {}).get("ready") == 40
                               for d in ("held.test", "wait.test")), 30,
                   "40 messages ready for each domain")
        doc = ctl_json(r, "bounce", "held.test")
        assert doc["recipients"] == 40 and doc["still_queued"] == 0, doc
        wait_until(lambda: len([e for e in raw_events(r.dlog, False)
                                if e["event"] == "bounce"]) == 40, 30, "40 bounce events")
        q = ctl_json(r, "queue", "100", "held.test")["messages"]
        held = [x for m in q for x in m["recipients"] if x["domain"] == "held.test"]
        assert len(held) == 40 and all(x["state"] == "dsn_held" for x in held), held[:3]
        p = ctl(r, "bounce", "held.test")  # nothing left to bounce
        assert p.returncode == 0 and p.stdout.split() == ["recipients", "0", "still_queued",
                                                          "0"], (p.stdout, p.stderr)
        assert r.d.count_log("event=operator_bounce what=held.test recipients=40 "
                             "still_queued=0") == 1
    finally:
        r.close()


def test_bounce_of_mail_on_a_connection_says_it_stayed():
    """A recipient on a connection when its bounce comes is left to its
    transaction (bounce_now), so it does not leave the spool while the
    answer waits: the answer comes at the wait's end (8 s), not at
    sluicectl's timeout, and still_queued counts it; the transaction then
    delivers it."""
    r = Relay(records_for(["slow.test"]), sink_flags=["-w", "14"],
              domain_conf=stats_conf())
    try:
        r.inject([msg(0, ["a@slow.test"])], sessions=1)
        wait_until(lambda: (domain_row(r, "slow.test") or {}).get("inflight") == 1, 30,
                   "the message on a connection")
        qid = ctl_json(r, "queue")["messages"][0]["id"]
        t0 = time.monotonic()
        doc = ctl_json(r, "bounce", qid)
        took = time.monotonic() - t0
        assert doc["recipients"] == 1 and doc["still_queued"] == 1, doc
        assert 7 <= took < 10, took  # the wait's 8 s, within sluicectl's 10
        r.d.wait_log("event=operator_bounce_skipped")
        wait_until(lambda: any(e["event"] == "delivery" for e in raw_events(r.dlog, False)), 30,
                   "the delivery its transaction made")
        assert not any(e["event"] == "bounce" for e in raw_events(r.dlog))
    finally:
        r.close()


def hold_a_message_on_a_connection(r):
    """One message to slow.test (the relay's only domain, its sink
    holding each transaction at DATA) on a connection now; its queue
    id."""
    r.inject([msg(0, ["a@slow.test"])], sessions=1)
    wait_until(lambda: (domain_row(r, "slow.test") or {}).get("inflight") == 1, 30,
               "the message on a connection")
    return ctl_json(r, "queue")["messages"][0]["id"]


@contextlib.contextmanager
def a_bounce_waiting(conf):
    """A relay (its domain_conf: conf) whose one message is on a
    connection, the sink holding it at DATA (14 s), and `sluicectl --json
    bounce` of that message running, waiting for its commit (its 8 s):
    yields the Relay and the sluicectl process; both are ended after."""
    r = Relay(records_for(["slow.test"]), sink_flags=["-w", "14"], domain_conf=conf)
    bounce = None
    try:
        qid = hold_a_message_on_a_connection(r)
        bounce = subprocess.Popen([SLUICECTL, "-s", sock_of(r), "--json", "bounce", qid],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        r.d.wait_log("event=operator_bounce_skipped")
        yield r, bounce
    finally:
        if bounce is not None and bounce.poll() is None:
            bounce.kill()
            bounce.wait()
        r.close()


def test_stop_ends_a_bounce_waiting_for_its_commits():
    """A SIGTERM while `sluicectl bounce` waits for a recipient a
    transaction holds (its 8 s): the stop, past its drain (1 s here),
    waited in ops_stop for the rest of those 8 s before any worker was
    told to stop. Now the bounce's wait ends when the stop begins, and
    the log says so (note=stopping) with the recipient not known to be
    committed; sluicectl prints the bounce's error and exits 1 (the
    stats socket's clients were closed before that answer was made: it
    saw the connection close, exit 3 and no reason, and only the log
    told why). A command queued behind the bounce, never run, is told
    so."""
    with a_bounce_waiting(stats_conf("[server]\ndrain_timeout = 1s\n")) as (r, bounce), \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as queued, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        queued.settimeout(30)
        queued.connect(sock_of(r))
        queued.sendall(b"queue 1\n")
        # The command must have been read by the stats thread before the
        # stop ends that thread (a command never read is never answered:
        # its client is closed). That was left to the drain's 1 s, which a
        # loaded machine can outlast. A stats asked on a second connection,
        # made and written after the first, is answered by the stats
        # thread in a pass of its poll loop that saw the first readable
        # too (accepted in order, its octets there first), and that pass
        # is finished before the stop's wake is heard: once the stats
        # answer is here, "queue 1" is queued behind the bounce.
        probe.settimeout(30)
        probe.connect(sock_of(r))
        probe.sendall(b"stats\n")
        assert probe.makefile("rb").readline(), "no answer to stats"
        t0 = time.monotonic()
        r.d.signal(signal.SIGTERM)
        try:
            rc = r.d.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError("sluice did not exit within 30 s of SIGTERM")
        took = time.monotonic() - t0
        r.d.reader.join(5)
        r.d.check_sanitizers()
        assert rc == 0, f"exit {rc}:\n" + "\n".join(r.d.lines[-20:])
        # the drain's 1 s and the stop; the bounce's wait ended at 8 s
        # from its start (7 s after the SIGTERM at least)
        assert took < 5, f"took {took:.1f}s to stop"
        (line,) = r.d.log_lines("event=operator_bounce what=")
        assert "recipients=1 still_queued=1 note=stopping" in line, line
        out, err = bounce.communicate(timeout=30)
        # sluice's error (exit 1), not a connection closed (exit 3)
        assert bounce.returncode == 1, (bounce.returncode, out, err)
        assert err.strip() == ("sluicectl: bounced 1, then sluice stopped: 1 of them still "
                               "queued or not known to be committed (any still queued at the "
                               "next start: bounce again)"), err
        doc = json.loads(out.splitlines()[0])
        assert doc["ok"] is False and doc["error"].startswith("bounced 1, then sluice"), doc
        doc = json.loads(queued.makefile("rb").readline())
        assert doc == {"ok": False, "error": "sluice is stopping: the command was not run"}, doc


def test_stats_answer_while_a_command_waits():
    """The engine's commands run on a thread of their own: while a bounce
    waits for a transaction under way (8 s), another client's stats, its
    /metrics and the status page's JSON are answered at once. They ran on
    the stats thread, which held every other client until the bounce
    answered (a flush or bounce of a million recipients: seconds to
    minutes without /metrics)."""
    hport = free_port()
    with a_bounce_waiting(stats_conf(http=hport)) as (r, bounce):
        assert bounce.poll() is None, "the bounce answered before its wait"
        st = ctl_json(r, "stats")
        assert st["queue"]["messages"] == 1, st["queue"]
        assert http_get(hport, "/metrics")[0] == 200
        assert http_get(hport, "/status.json")[0] == 200
        assert bounce.poll() is None, "the bounce's wait ended before the others were answered"
        out, err = bounce.communicate(timeout=30)
        assert bounce.returncode == 0, (bounce.returncode, err)
        doc = json.loads(out.splitlines()[0])
        assert doc["recipients"] == 1 and doc["still_queued"] == 1, doc


def test_commands_queued_leave_room_for_stats():
    """While a bounce waits (8 s), more engine commands queue behind it,
    each client holding its socket slot: 31 of them took the whole pool
    (32), and a `sluicectl stats` then was refused and printed "cannot
    send: Broken pipe" (exit 3, as if sluice were down). Commands past
    STATS_CMD_QUEUE_MAX (24) behind the one under way are answered "busy"
    at once, and stats is answered."""
    r = Relay(records_for(["slow.test"]), sink_flags=["-w", "14"], domain_conf=stats_conf())
    socks = []
    try:
        r.inject([msg(0, ["a@slow.test"])], sessions=1)
        wait_until(lambda: (domain_row(r, "slow.test") or {}).get("inflight") == 1, 30,
                   "the message on a connection")
        qid = ctl_json(r, "queue")["messages"][0]["id"]
        for i in range(31):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(sock_of(r))
            s.sendall(f"bounce {qid}\n".encode() if i == 0 else b"queue 1\n")
            socks.append(s)
            if i == 0:
                r.d.wait_log("event=operator_bounce_skipped")
        # the 6 past the bound have their answer at once; the rest wait
        busy = []
        for s in socks[25:]:
            line = s.makefile("rb").readline()
            busy.append(json.loads(line))
        assert all(not d["ok"] and d["error"].startswith("busy: 24 commands") for d in busy), busy
        p = ctl(r, "stats")
        assert p.returncode == 0 and "delivered" in p.stdout, (p.returncode, p.stdout, p.stderr)
        # the queued ones are answered in turn once the bounce is over
        socks[24].settimeout(30)
        d = json.loads(socks[24].makefile("rb").readline())
        assert d["ok"], d
    finally:
        for s in socks:
            s.close()
        r.close()


def test_sluicectl_shows_a_refusal():
    """sluice refuses a client it has no room for with one error line and
    closes at once, perhaps before sluicectl sent its command: sluicectl
    printed "cannot send: Broken pipe" (exit 3, "is sluice running?"
    territory); it now reads and shows sluice's line (exit 1). A socket
    of our own refuses each client before reading it."""
    import threading
    wd = Workdir("sluice-ctl-")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stop = []
    t = None
    try:
        path = os.path.join(wd.path, "full.sock")
        srv.bind(path)
        srv.listen(8)
        srv.settimeout(0.2)

        def refuse():
            while not stop:
                try:
                    c, _ = srv.accept()
                except socket.timeout:
                    continue
                c.sendall(b'{"ok":false,"error":"too many clients: try again"}\n')
                c.shutdown(socket.SHUT_RDWR)  # reads nothing: a send after this fails
                c.close()
        t = threading.Thread(target=refuse, daemon=True)
        t.start()
        for _ in range(10):
            p = ctl(path, "stats")
            err = one_line_error(p, 1)
            assert err == "sluicectl: too many clients: try again", err
    finally:
        stop.append(1)
        if t is not None:
            t.join(5)  # its accept times out within 0.2 s: then the socket goes
        srv.close()
        wd.cleanup()


def http_get(port, path, method="GET"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path)
        resp = c.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        c.close()


def metric(text, name):
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"no sample {name} in the metrics"
    return float(m.group(1))


def test_prometheus_endpoint():
    hport = free_port()
    r = Relay(records_for(["p.test", "q.test"]), domain_conf=stats_conf(http=hport))
    try:
        wait_until(lambda: http_get(hport, "/metrics")[0] == 200, 10, "the /metrics listener")
        n = 7
        r.inject([msg(i, [f"u{i}@p.test"] + ([f"u{i}@q.test"] if i % 2 else []))
                  for i in range(n)])
        want = n + n // 2
        wait_sink(r, want, timeout=60)
        wait_until(lambda: metric(http_get(hport, "/metrics")[2],
                                  "sluice_recipients_delivered_total") >= want, 10,
                   "the delivered counter to reach the sink")
        status, headers, text = http_get(hport, "/metrics")
        assert status == 200, status
        assert headers.get("Content-Type", "").startswith("text/plain; version=0.0.4"), headers
        assert metric(text, "sluice_recipients_delivered_total") == want == len(r.sink.files())
        assert metric(text, "sluice_messages_received_total") == n
        assert re.search(r'^sluice_domain_recipients_delivered_total\{domain="p\.test"\} 7$',
                         text, re.M), text
        # the workers' loops: turned, and the busiest turn in seconds (not
        # ms or us: nothing here holds a worker for 10 s, even under ASan)
        assert metric(text, "sluice_worker_turns_total") > 0, text
        assert 0 < metric(text, "sluice_worker_longest_turn_seconds") < 10, text
        metric(text, "sluice_worker_slow_turns_total")  # exported (any count)
        if os.path.exists("/usr/bin/promtool"):
            p = subprocess.run(["/usr/bin/promtool", "check", "metrics"], input=text,
                               capture_output=True, text=True, timeout=30)
            assert p.returncode == 0, f"promtool: {p.stdout}{p.stderr}"
        else:
            print("     promtool not installed: the text is not linted")
        # sluicectl metrics is the same exposition.
        p = ctl(r, "metrics")
        assert p.returncode == 0 and "sluice_recipients_delivered_total" in p.stdout, p.stdout[:300]
        assert http_get(hport, "/other")[0] == 404
        assert http_get(hport, "/metrics", "POST")[0] == 405
        status, _, body = http_get(hport, "/metrics", "HEAD")
        assert status == 200 and body == "", (status, body[:100])
        # an error answer to HEAD has no body either: read raw, to the close
        with socket.create_connection(("127.0.0.1", hport), timeout=10) as sk:
            sk.sendall(b"HEAD /other HTTP/1.0\r\n\r\n")
            raw = b""
            while chunk := sk.recv(4096):
                raw += chunk
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 404 ") and rest == b"", raw
        assert b"Content-Length: 14" in head, raw
    finally:
        r.close()


def test_shaping_actions_unknown_here_are_counted():
    """Actions of a kind or scope this node does not know (a newer node's,
    here in the state file it reads at start) are ignored, and counted
    beside the other shaping counters: `stats` (shaping.ignored), its
    sluicectl rendering, and /metrics."""
    hport = free_port()
    r = Relay(records_for(["p.test"]), domain_conf=stats_conf(http=hport))
    try:
        assert r.d.stop_clean() == 0
        until = int(time.time() * 1000) + 3600000
        rest = "source=\tgroup=*\tdomain=\ttenant=\torigin=n2\tstarted=1\t" \
               f"until={until}\tper=0\ttrigger=x"
        with open(os.path.join(r.spool, "shaping.state"), "w") as f:
            f.write(f"id=00000000000000a1\tkind=throttle\tscope=group\tvalue=3\trule=r1\t{rest}\n")
            f.write(f"id=00000000000000a2\tkind=throttle\tscope=group\tvalue=3\trule=r2\t{rest}\n")
            f.write(f"id=00000000000000a3\tkind=suspend\tscope=campaign\tvalue=0\trule=r3\t{rest}\n")
        r.d = Sluice(SLUICE, os.path.join(r.wd.path, "sluice.conf"))
        r.d.wait_log("event=ready")
        assert r.d.count_log("event=shaping_action_ignored") == 2  # once per kind and scope
        sh = ctl_json(r, "stats")["shaping"]
        assert sh["ignored"] == 3 and sum(sh["active"].values()) == 0, sh
        p = ctl(r, "stats")
        assert p.returncode == 0, p.stderr
        assert re.search(r"^  actions ignored \(unknown here\)\s+3$", p.stdout, re.M), p.stdout
        wait_until(lambda: http_get(hport, "/metrics")[0] == 200, 10, "the /metrics listener")
        assert metric(http_get(hport, "/metrics")[2], "sluice_shaping_actions_ignored_total") == 3
    finally:
        r.close()


def test_shaping_by_hand_without_redis_says_this_node():
    """Without [redis] an operator's shaping action is this node's alone:
    sluicectl shaping suspend and clear said "on every node" all the same.
    The answers now say whether the action reaches other nodes (cluster,
    as suspend's does), and sluicectl which."""
    r = Relay(records_for(["p.test"]), domain_conf=stats_conf())
    try:
        doc = ctl_json(r, "shaping", "suspend", "domain=p.test", "for=10m")
        assert doc["cluster"] is False and doc["action"]["domain"] == "p.test", doc
        p = ctl(r, "shaping", "backoff", "domain=q.test", "for=10m")
        assert p.returncode == 0, p.stderr
        assert p.stdout.endswith(" backoff domain for 10m on this node (no [redis]: no other "
                                 "node hears)\n"), p.stdout
        assert "every node" not in p.stdout, p.stdout
        p = ctl(r, "shaping", "clear", "all")
        assert p.returncode == 0, p.stderr
        assert p.stdout == "cleared 2 action(s) on this node (no [redis]: no other node " \
                           "hears)\n", p.stdout
    finally:
        r.close()


def test_shaping_outbox_while_redis_away():
    """An action started while Redis is unreachable waits in the outbox to
    be published: `stats` (shaping.outbox), its sluicectl rendering and
    /metrics show it, beside the changes dropped (none)."""
    hport, rport = free_port(), free_port()  # nothing listens on rport
    r = Relay(records_for(["p.test"]),
              domain_conf=stats_conf(f"[redis]\nurl = redis://127.0.0.1:{rport}\n", http=hport))
    try:
        p = ctl(r, "shaping", "suspend", "domain=p.test", "for=10m")
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout.endswith(" for 10m on every node\n"), p.stdout  # once Redis is back
        sh = ctl_json(r, "stats")["shaping"]
        assert sh["redis"] == "unreachable", sh
        assert sh["outbox"] == 1 and sh["outbox_dropped"] == 0, sh
        p = ctl(r, "stats")
        assert p.returncode == 0, p.stderr
        assert re.search(r"^  changes waiting for Redis\s+1$", p.stdout, re.M), p.stdout
        wait_until(lambda: http_get(hport, "/metrics")[0] == 200, 10, "the /metrics listener")
        text = http_get(hport, "/metrics")[2]
        assert metric(text, "sluice_shaping_outbox") == 1, text[-2000:]
        assert metric(text, "sluice_shaping_outbox_dropped_total") == 0
    finally:
        r.close()


def test_redis_password_with_slash_and_at():
    """[redis] url against a real redis-server whose requirepass holds '/',
    '@', ':' and '%': the URL with the password as it is (the '%' escaped
    as %25) and the same all percent-escaped both connect (shaping's Redis
    in `stats` is connected), and nothing of the password is logged."""
    if not any(os.access(os.path.join(d, "redis-server"), os.X_OK)
               for d in os.environ.get("PATH", "").split(":")):
        print("skip: no redis-server (tools/install-deps --test)")
        return
    redis = Redis()
    try:
        with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as c:
            c.sendall(b"CONFIG SET requirepass p/a@ss:w%rd\r\n")
            assert c.recv(64).startswith(b"+OK")
        for url in (f"redis://:p/a@ss:w%25rd@127.0.0.1:{redis.port}",
                    f"redis://:p%2Fa%40ss%3Aw%25rd@127.0.0.1:{redis.port}/0"):
            r = Relay(records_for(["r.test"]), domain_conf=stats_conf(f"[redis]\nurl = {url}\n"))
            try:
                wait_until(lambda: ctl_json(r, "stats")["shaping"]["redis"] == "connected", 10,
                           f"shaping's Redis to connect with {url}")
                assert r.d.count_log("redis_auth_failed") == 0
                assert r.d.count_log("a@ss") == 0 and r.d.count_log("%40ss") == 0
            finally:
                r.close()
    finally:
        redis.stop()


def test_reload_during_a_drain_says_it_was_not_done():
    """`sluicectl reload` while sluice drains (a SIGTERM taken, a
    transaction held at the sink): the main thread takes no SIGHUP once
    it drains, and the command waited its 8 s, then printed "reload
    requested (not finished yet: see the log)" and exited 0 for a reload
    never done. It answers at once that the reload was not done."""
    r = Relay(records_for(["slow.test"]), sink_flags=["-w", "14"],
              domain_conf=stats_conf("[server]\ndrain_timeout = 20s\n"))
    try:
        hold_a_message_on_a_connection(r)
        r.d.signal(signal.SIGTERM)
        r.d.wait_log("event=draining")  # the workers' line: engine_drain began
        t0 = time.monotonic()
        p = ctl(r, "reload")
        took = time.monotonic() - t0
        err = one_line_error(p, 1)
        assert err == ("sluicectl: sluice is draining: the reload was not done (the next "
                       "start reads the file)"), err
        assert took < 5, f"answered in {took:.1f}s"  # the wait's 8 s before
        assert r.d.count_log("event=sighup") == 0
        r.d.signal(signal.SIGTERM)  # a second one ends the drain
        try:
            rc = r.d.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError("sluice did not exit within 30 s of the second SIGTERM")
        r.d.reader.join(5)
        r.d.check_sanitizers()
        assert rc == 0, f"exit {rc}:\n" + "\n".join(r.d.lines[-20:])
    finally:
        r.close()


def test_reload_refused_says_why():
    """sluicectl reload answers once the reload is over: a config with an
    unknown key is refused with the file, line and key in the error and a
    non-zero exit (it printed "reload requested" and exited 0, whatever
    happened), and the running config stays in force."""
    r = Relay(records_for(["r.test"]), domain_conf=stats_conf())
    try:
        path = os.path.join(r.wd.path, "sluice.conf")
        with open(path) as f:
            good = f.read()
        with open(path, "a") as f:
            f.write("[delivery]\nmax_conections = 5\n")
        bad_line = good.count("\n") + 2
        p = ctl(r, "reload")
        assert p.returncode != 0, (p.returncode, p.stdout, p.stderr)
        assert "reload refused" in p.stderr and f"sluice.conf:{bad_line}" in p.stderr and \
            "max_conections" in p.stderr, p.stderr
        assert r.d.count_log("event=config_reloaded") == 0
        with open(path, "w") as f:
            f.write(good)
        p = ctl(r, "reload")  # the words the man page quotes, one space apart
        assert p.returncode == 0 and p.stdout == "reload done: no change\n", (p.stdout, p.stderr)
        assert r.d.count_log("event=config_reloaded") == 1
        assert ctl_json(r, "reload").get("reload") == "done"
        assert r.d.proc.poll() is None
    finally:
        r.close()


def test_reload_says_what_changed():
    """sluicectl reload printed "reload done" whatever the reload changed,
    while the log's event=config_reloaded named it: the operator could not
    tell a typo'd section from a change taken. It prints the log's list,
    or "no change", and the keys that wait for a restart."""
    r = Relay(records_for(["r.test"]), domain_conf=stats_conf())
    try:
        path = os.path.join(r.wd.path, "sluice.conf")
        with open(path) as f:
            good = f.read()
        p = ctl(r, "reload")
        assert p.returncode == 0 and p.stdout == "reload done: no change\n", (p.stdout, p.stderr)
        with open(path, "a") as f:
            f.write("[domain new.example]\nmax_connections = 3\n"
                    "[warmup ramp]\nschedule = 10, 20\n")
        p = ctl(r, "reload")
        assert p.returncode == 0 and p.stdout == \
            "reload done: changed +[domain new.example], +[warmup ramp]\n", (p.stdout, p.stderr)
        doc = ctl_json(r, "reload")
        assert doc["changed"] == "" and doc["needs_restart"] == "", doc
        with open(path, "w") as f:
            f.write(good.replace("[server]\n", "[server]\nring_entries = 128\n", 1))
        p = ctl(r, "reload")
        assert p.returncode == 0, (p.stdout, p.stderr)
        lines = p.stdout.splitlines()
        assert lines[0].startswith("reload done: changed [server] ring_entries"), p.stdout
        assert "-[domain new.example]" in lines[0] and "-[warmup ramp]" in lines[0], p.stdout
        assert lines[1:] == ["not in force until a restart: server.ring_entries"], p.stdout
        # [delivery] enabled waits for a restart too: the log said so
        # (event=reload_kept), the reload's answer "no change", as if mail
        # had stopped going out.
        with open(path, "w") as f:
            f.write(good + "[delivery]\nenabled = no\n")
        p = ctl(r, "reload")
        assert p.returncode == 0, (p.stdout, p.stderr)
        lines = p.stdout.splitlines()
        assert lines[1:] == ["not in force until a restart: delivery.enabled"], p.stdout
        assert ctl_json(r, "reload")["needs_restart"] == "delivery.enabled"
        # still sending: the stats say the running state, not the file's
        assert ctl_json(r, "stats")["delivery_enabled"] is True
        assert "enabled = no" not in ctl(r, "stats").stdout
    finally:
        r.close()


def test_reload_says_the_first_event_sink_and_mta_sts_wait_for_a_restart():
    """A first [events] sink added by a reload, and [mta_sts] settings
    changed while its thread runs, need a restart (the log said
    event=reload_kept); sluicectl reload said only "reload done: changed
    +[events hook]", and sluicectl events then showed no sink: the
    backend's webhook got nothing while the operator believed it on."""
    r = Relay(records_for(["r.test"]), domain_conf=stats_conf())
    try:
        path = os.path.join(r.wd.path, "sluice.conf")
        with open(path) as f:
            good = f.read()
        with open(path, "w") as f:
            f.write(good + f"[events hook]\nurl = http://127.0.0.1:{free_port()}/ev\n")
        p = ctl(r, "reload")
        assert p.returncode == 0, (p.stdout, p.stderr)
        lines = p.stdout.splitlines()
        assert lines[0] == "reload done: changed +[events hook]", p.stdout
        assert lines[1:] == ["not in force until a restart: events"], p.stdout
        assert ctl_json(r, "reload")["needs_restart"] == "events"
        assert r.d.count_log("event=reload_kept key=events") == 2
        with open(path, "w") as f:
            f.write(good + "[mta_sts]\nfetch_timeout = 3s\n")
        p = ctl(r, "reload")
        assert p.returncode == 0, (p.stdout, p.stderr)
        lines = p.stdout.splitlines()
        assert lines[1:] == ["not in force until a restart: mta_sts"], p.stdout
        assert r.d.count_log("event=reload_kept key=mta_sts") == 1
    finally:
        r.close()


def test_reload_says_which_files_changed():
    """The TLS certificate and key, the users file and the DKIM keys are
    read again at every reload, under the same names: sluicectl reload
    said "no change" when one of them had changed (a certificate renewed
    in place, a key replaced in key_dir, a user added). It now names each
    whose contents changed since its last load, and still says "no
    change" when they hold what they held (a file rewritten as it was).
    A users file that does not load is said (exit 1), not "no change"."""
    from test_tls_reload import install, make_cert
    kd = Workdir("sluice-reread-")
    r = None
    try:
        make_cert(kd.path, "a", "a.test")
        make_cert(kd.path, "b", "b.test")
        install(kd.path, "a")
        keys = os.path.join(kd.path, "keys")
        os.makedirs(os.path.join(keys, "r.test"))

        def genkey(path):
            g = subprocess.run(["openssl", "genpkey", "-algorithm", "ED25519", "-out", path],
                               capture_output=True, text=True)
            assert g.returncode == 0, g.stderr

        def rewrite(path, data):  # in place, as an editor does
            with open(path, "wb") as f:
                f.write(data)

        def reload_says(want):
            p = ctl(r, "reload")
            assert p.returncode == 0 and p.stdout == want + "\n", (p.stdout, p.stderr, want)

        r = Relay(records_for(["r.test"]), domain_conf=stats_conf() +
                  f"[tls]\ncert_file = {kd.path}/cert.pem\nkey_file = {kd.path}/key.pem\n"
                  f"[dkim]\nkey_dir = {keys}\n")
        reload_says("reload done: no change")
        install(kd.path, "b")  # a renewal: both replaced by a rename
        reload_says("reload done: changed [tls] cert_file (the file's contents), "
                    "[tls] key_file (the file's contents)")
        reload_says("reload done: no change")
        with open(os.path.join(kd.path, "cert.pem"), "rb") as f:
            rewrite(os.path.join(kd.path, "cert.pem"), f.read())  # the same octets
        reload_says("reload done: no change")

        key = os.path.join(keys, "r.test", "s1.pem")
        genkey(key)  # a key added to key_dir
        reload_says("reload done: changed [dkim] signing keys")
        reload_says("reload done: no change")
        genkey(key + ".new")  # replaced by a new key
        os.rename(key + ".new", key)
        reload_says("reload done: changed [dkim] signing keys")

        users = os.path.join(kd.path, "users")
        rewrite(users, b"alice:$6$x$y\n")
        path = os.path.join(r.wd.path, "sluice.conf")
        with open(path) as f:
            conf = f.read()
        with open(path, "w") as f:
            f.write(conf.replace("[server]\n", f"[server]\nauth_users_file = {users}\n"
                                 "plaintext_auth = loopback\n", 1))
        p = ctl(r, "reload")  # the key's own change, not the file's
        assert p.returncode == 0 and "auth_users_file" in p.stdout and \
            "contents" not in p.stdout, (p.stdout, p.stderr)
        reload_says("reload done: no change")
        rewrite(users, b"alice:$6$x$y\nbob:$6$x$z\n")
        reload_says("reload done: changed [server] auth_users_file (the file's contents)")
        assert r.d.count_log("event=reload_failed") == 0

        # A users file that does not load: the config took, the previous
        # users are kept. It printed "reload done: no change" and exit 0;
        # now stderr says so, with the file's first error, and exit 1.
        rewrite(users, b"alice:$6$x$y\nno colon here\n")
        p = ctl(r, "reload")
        assert p.returncode == 1 and p.stdout == "reload done: no change\n", (p.stdout, p.stderr)
        assert p.stderr.startswith("sluicectl: users file not loaded, the previous users kept: "
                                   f"auth_users_file {users}: cannot load ({users}:2: "), p.stderr
        p = ctl(r, "reload", json_out=True)
        assert p.returncode == 1 and \
            json.loads(p.stdout)["users_not_loaded"].startswith("auth_users_file "), p.stdout
        rewrite(users, b"alice:$6$x$y\n")
        p = ctl(r, "reload")  # loaded again: the contents of its last load changed
        assert p.returncode == 0 and p.stderr == "", (p.stdout, p.stderr)
    finally:
        if r is not None:
            r.close()
        kd.cleanup()


def test_reload_keeps_sessions():
    r = Relay(records_for(["r.test"]), domain_conf=stats_conf())
    s = None
    try:
        s = Smtp(r.port)
        s.expect("EHLO keep", 250)
        s.expect("MAIL FROM:<s@example.com>", 250)
        st = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        st.settimeout(10)
        st.connect(sock_of(r))
        sf = st.makefile("rb")
        st.sendall(b"stats\n")
        assert json.loads(sf.readline())["ok"] is True
        pid = r.d.pid
        doc = ctl_json(r, "reload")
        assert doc.get("reload") == "done", doc  # answered once it took
        assert r.d.count_log("event=config_reloaded") == 1
        assert r.d.proc.poll() is None, "sluice exited on reload"
        # Both connections open before the reload still work.
        s.expect("RCPT TO:<a@r.test>", 250)
        s.expect("DATA", 354)
        s.send(b"Subject: kept\r\nX-Seq: kept\r\n\r\nacross a reload\r\nend-kept\r\n.\r\n")
        assert s.reply().code == 250
        s.expect("QUIT", 221)
        st.sendall(b"domains 5\n")
        assert json.loads(sf.readline())["ok"] is True
        st.close()
        # smtp-sink writes its file as the message arrives: wait for it whole.
        wait_until(lambda: seqs_at(r.sink) == (["kept"], 0), 30, "the message whole at the sink")
        assert r.d.pid == pid and ctl(r, "stats").returncode == 0
        assert r.d.count_log("event=sighup") == 1
    finally:
        if s is not None:
            s.close()
        r.close()


def test_sigterm_drains_and_restart_loses_nothing():
    domains = [f"d{i}.test" for i in range(4)]
    r = Relay(records_for(domains), sink_flags=["-w", "3"],
              domain_conf=stats_conf("[server]\ndrain_timeout = 20s\n"
                                     "[domain *]\nmax_connections = 10\n"))
    try:
        n = 10000
        r.inject([msg(i, [f"u{i}@{domains[i % 4]}"], tag="s") for i in range(n)], sessions=8)
        # In flight: the sink holds every transaction for 3 s at DATA.
        wait_until(lambda: ctl_json(r, "stats")["connections"]["outbound_open"] >= 4, 20,
                   "outbound connections open")
        at_term = r.d.count_log("event=delivered")
        t0 = time.monotonic()
        r.d.signal(signal.SIGTERM)
        try:
            rc = r.d.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError("sluice did not exit within 30 s of SIGTERM "
                                 "(drain_timeout 20 s)")
        took = time.monotonic() - t0
        r.d.reader.join(5)
        r.d.check_sanitizers()
        assert rc == 0, f"exit {rc}:\n" + "\n".join(r.d.lines[-20:])
        assert took < 25, f"took {took:.1f}s to stop"
        done = r.d.count_log("event=drain_done") + r.d.count_log("event=drain_timed_out")
        assert done == 1, "\n".join(r.d.lines[-20:])
        assert r.d.count_log("event=drain_done") == 1, "in-flight deliveries did not finish " \
            "within 20 s although the sink answers in 3 s"
        before = len(r.sink.files())
        delivered_before = r.d.count_log("event=delivered")
        assert 0 < before < n, f"{before} of {n} at the sink at SIGTERM: not a mid-flight stop"
        assert delivered_before > at_term, \
            f"nothing in flight at SIGTERM finished during the drain ({at_term} delivered before)"
        print(f"     stopped in {took:.1f}s with {before}/{n} at the sink "
              f"({at_term} delivered at SIGTERM, {delivered_before} after the drain)")
        # Restart on the same spool: the rest goes out (to a sink without
        # the delay, dumping into the same directory).
        r.sink.stop()
        r.sink = Sink(r.wd, r.mx_port, name="sink")
        r.d = Sluice(SLUICE, os.path.join(r.wd.path, "sluice.conf"))
        r.d.wait_log("event=ready")
        wait_until(lambda: len(set(seqs_at(r.sink)[0])) >= n, 120, f"{n} distinct messages")
        assert r.d.stop_clean(30) == 0
        seqs, partial = seqs_at(r.sink)
        distinct = set(seqs)
        assert distinct == {f"s{i}" for i in range(n)}, sorted(distinct)[:5]
        dupes = len(seqs) - len(distinct)
        print(f"     after restart: {len(distinct)} distinct, {dupes} duplicates, "
              f"{partial} incomplete files at the sink")
        assert partial == 0, f"{partial} transactions cut off although the drain was done"
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        r.close()


def test_spool_dump_is_json_whatever_the_reply():
    """sluice-spool dump prints JSON (UTF-8) even when a receiver's reply,
    kept as the recipient's last reply, is not UTF-8 (here Latin-1, as
    some receivers still answer). The octets that are not UTF-8 become
    U+FFFD, as in sluicectl message. sluice-spool list prints the same
    without the body."""
    r = Relay(records_for(["odd.test"]), with_sink=False,
              domain_conf=stats_conf("[domain *]\nretry_schedule = 1h\n"))
    rx = None
    try:
        reply = b"450 4.2.0 <a@odd.test> M\xfcller: mailbox busy"
        rx = subprocess.Popen(
            [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          "shaping_receiver.py"),
             "127.0.0.1", str(r.mx_port), os.path.join(r.wd.path, "rx.jsonl"), "from:s@",
             "0", reply, r.wd.file("defer-on", "")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: rx.poll() is not None or connectable(r.mx_port), 30,
                   "the receiver listening")
        assert rx.poll() is None, "the receiver did not start"
        r.inject([msg(1, ["a@odd.test"])], sessions=1)
        wait_events(r.dlog, lambda e: e["event"] == "transient_failure", 1)
        r.d.stop_clean(30)
        p = subprocess.run([_spool_tool(), "dump", r.spool], capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.decode("utf-8").splitlines()  # strict: not UTF-8 fails here
        assert len(lines) == 1, lines
        m = json.loads(lines[0])
        x = m["rcpts"][0]
        assert x["state"] == "deferred" and x["last_code"] == 450, x
        assert "M\ufffdller: mailbox busy" in x["last_reply"], x
        assert base64.b64decode(m["body"]).endswith(b"\r\n") and \
            len(base64.b64decode(m["body"])) == m["body_len"], m
        # list: the same, without the body
        p = subprocess.run([_spool_tool(), "list", r.spool], capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr
        listed = [json.loads(ln) for ln in p.stdout.decode("utf-8").splitlines()]
        assert len(listed) == 1 and "body" not in listed[0], listed
        assert listed[0] == {k: v for k, v in m.items() if k != "body"}, (listed[0], m)
    finally:
        if rx is not None:
            rx.terminate()
            rx.wait(10)
        r.close()


class FakeStats:
    """A stats socket that answers every request with the document given:
    what sluicectl renders of answers a running sluice gives rarely (a
    gap in the rate samples)."""

    def __init__(self, doc):
        import tempfile
        import threading
        self.doc = doc
        self.dir = tempfile.mkdtemp(prefix="sluice-fakestats-")
        self.path = os.path.join(self.dir, "stats.sock")
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(4)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return  # closed
            with c:
                c.settimeout(10)
                if c.makefile("rb").readline():
                    c.sendall(json.dumps(self.doc).encode() + b"\n")

    def close(self):
        self.srv.shutdown(socket.SHUT_RDWR)
        self.srv.close()
        self.thread.join(5)
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


def test_export_to_an_older_sluice_says_why():
    """sluicectl makes an export's file and passes it; a sluice older than
    that (d50a435) takes no file passed, makes the path itself (O_EXCL)
    and refused with "suppress: PATH: File exists", the file sluicectl
    had just made, which sluicectl then removed: nothing said why. A fake
    socket answers as that sluice did; sluicectl now says the sluice is
    older, exits 1 and leaves no file."""
    import tempfile
    d = tempfile.mkdtemp(prefix="sluice-oldexport-")
    out = os.path.join(os.path.realpath(d), "out.csv")
    f = FakeStats({"ok": False, "error": f"suppress: {out}: {os.strerror(17)}"})
    try:
        p = ctl(f.path, "suppress", "export", out)
        assert p.returncode == 1, (p.returncode, p.stderr)
        assert "this sluice is older than sluicectl" in p.stderr, p.stderr
        assert not os.path.exists(out)
        # any other refusal is said alone
        f.doc = {"ok": False, "error": "suppress: the suppression list is off"}
        p = ctl(f.path, "suppress", "export", out)
        assert p.returncode == 1 and "older" not in p.stderr, p.stderr
    finally:
        f.close()
        import shutil
        shutil.rmtree(d, ignore_errors=True)


def test_stats_text_says_the_rates_window_and_delivery_off():
    """The "1m" column names its real window when the samples span more
    than a minute (a stats thread held up: it said "last 1m" over 75 s),
    keeps "last 1m" for a minute give or take a sampling a few ms late,
    and `delivery off` shows under Queue with [delivery] enabled = no."""
    def rendered(window_ms, enabled=True):
        f = FakeStats({"ok": True, "version": "t", "uptime_ms": 600000, "workers": 2,
                       "rates": {"1s": {"received": 1.0, "window_ms": 1000},
                                 "1m": {"received": 2.0, "window_ms": window_ms}},
                       "delivery_enabled": enabled, "queue": {"messages": 3}})
        try:
            p = ctl(f.path, "stats")
        finally:
            f.close()
        assert p.returncode == 0, p.stderr
        head = re.search(r"^per second +last 1s +last (\S+)$", p.stdout, re.M)
        assert head, p.stdout
        return head.group(1), p.stdout
    assert rendered(75000)[0] == "75s"
    assert rendered(60400)[0] == "1m"
    assert rendered(12000)[0] == "12s"
    out = rendered(60000, enabled=False)[1]
    assert "delivery OFF ([delivery] enabled = no)" in out.splitlines()[0], out
    assert "enabled = no" not in rendered(60000)[1]


if __name__ == "__main__":
    for tool in ("dnsmasq", "smtp-sink"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0 and \
                not os.path.exists(f"/usr/sbin/{tool}"):
            skip(f"{tool} not installed (tools/install-deps --test)")
    if not os.path.exists(SLUICECTL):
        skip(f"no sluicectl at {SLUICECTL}")
    main([test_stats_domains_message_and_exit_codes, test_sluicectl_without_sluice_says_so,
          test_stats_text_says_the_rates_window_and_delivery_off,
          test_export_to_an_older_sluice_says_why,
          test_flush_waits_for_a_slow_answer, test_active_limit_keeps_due_mail_in_the_spool,
          test_active_limit_leaves_out_a_suspended_campaigns_mail,
          test_due_paused_only_when_something_is_due,
          test_active_limit_leaves_out_a_suspended_domains_mail,
          test_stats_answer_while_a_command_waits,
          test_stop_ends_a_bounce_waiting_for_its_commits,
          test_commands_queued_leave_room_for_stats, test_sluicectl_shows_a_refusal,
          test_sluicectl_suppress_too_long_says_so, test_durations_round_to_nearest,
          test_sluicectl_suppress_empty_file_name_says_so,
          test_spool_tool_refuses_a_directory_without_a_spool,
          test_spool_tool_on_a_running_sluice_says_what_to_do,
          test_top_gives_the_terminal_back_when_sluice_goes, test_output_to_a_reader_that_left,
          test_suppress_list_prints_as_pages_come, test_stats_says_when_delivery_is_off,
          test_suspend_and_resume, test_domains_show_a_suspended_campaigns_mail,
          test_flush_retries_deferred_now, test_flush_ends_the_rest_of_a_site_that_was_down,
          test_failing_a_dead_hosts_mail_does_not_stall_the_worker,
          test_domains_of_deferred_mail_across_a_restart,
          test_domains_oldest_counts_mail_in_flight,
          test_domains_last_reply_says_whether_a_server_sent_it,
          test_bounce_by_id_and_domain,
          test_bounce_answers_once_done,
          test_bounce_of_mail_on_a_connection_says_it_stayed,
          test_prometheus_endpoint, test_shaping_actions_unknown_here_are_counted,
          test_shaping_outbox_while_redis_away, test_redis_password_with_slash_and_at,
          test_shaping_by_hand_without_redis_says_this_node,
          test_reload_keeps_sessions, test_reload_refused_says_why, test_reload_says_what_changed,
          test_reload_during_a_drain_says_it_was_not_done,
          test_reload_says_which_files_changed, test_queue_lists_like_mailq,
          test_queue_answer_has_a_size_cap,
          test_sigterm_drains_and_restart_loses_nothing,
          test_spool_dump_is_json_whatever_the_reply,
          test_bounce_counts_failures_held_for_their_dsn_as_done,
          test_domains_show_a_suspended_domain_whose_mail_waits_for_its_retry,
          test_reload_says_the_first_event_sink_and_mta_sts_wait_for_a_restart,
          test_spool_bytes_are_the_messages_not_the_maps_high_water_mark])
