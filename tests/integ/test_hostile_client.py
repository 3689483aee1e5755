"""Submission clients that go away, or break the order of a transaction,
where the other hostile tests do not look: a client that leaves in the
middle of a transaction (a FIN, a reset, a TCP close under TLS without
close_notify, a half-close), or a stop that finds one, is logged as
having dropped it, with where and how far it got; a client cut at every
point of a DATA or a BDAT transaction gets exactly one stored message if
and only if it sent the whole of it; a RCPT between two BDAT chunks is
refused; the disconnect line says why a client got nowhere, whichever
reply refused it, a command's or the session's (a timeout, a limit, a
stop); a stop answers a message whose commit is pending before it ends,
and logs one whose commit lands after drain_timeout ran out queued,
unanswered; a client that stops reading neither keeps its worker storing
during a drain nor holds the drain past its time; commands pipelined behind an AUTH wait for its answer; an AUTH before
STARTTLS is forgotten after it; a client that sends only commands that
move no mail (an EHLO loop too) is closed; a client that greeted with HELO
uses no ESMTP parameter, whatever its value, and no BDAT. Each test starts its own sluice (plain and
implicit-TLS listeners, own spool, own ports) and stops it."""
import base64
import contextlib
import json
import os
import signal
import socket
import ssl
import struct
import sys
import time

from harness import Sluice, Smtp, Workdir, free_port, main, run, spool_messages, wait_until

SLUICE = sys.argv[1]

LOST = "event=connection_lost"
PASSWORD = "s3cret-Pw"


@contextlib.contextmanager
def sluice(extra="", trusted="127.0.0.0/8", env=None, workers=2, log="", exits=0):
    """sluice on a plaintext port and an implicit-TLS port (d.port,
    d.tls_port), with env added to its environment, extra in [server]
    and log in [log] (d.dir: its directory, {dir} in log); stopped on the way out,
    failing on a sanitizer report, or on an exit code other than exits (a
    test that stops it itself)."""
    wd = Workdir("sluice-hcl-")
    d = None
    try:
        p = wd.path
        r = run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", "/CN=localhost", "-keyout", f"{p}/key.pem", "-out", f"{p}/cert.pem"])
        assert r.returncode == 0, r.stderr
        h = run(["openssl", "passwd", "-6", PASSWORD])
        assert h.returncode == 0, h.stderr
        wd.file("users", f"alice:{h.stdout.strip()}\n")
        port, tls_port = free_port(), free_port()
        conf = wd.file("sluice.conf", f"""
[server]
workers = {workers}
hostname = mx.sluice.test
listen = 127.0.0.1:{port}
listen_tls = 127.0.0.1:{tls_port}
trusted_networks = {trusted}
max_clients_per_ip = 10000
auth_users_file = {p}/users
plaintext_auth = loopback
auth_fail_delay = 100ms
{extra}
[queue]
path = {p}/spool
map_size = 64M
[delivery]
# these tests look at what was queued: nothing leaves
enabled = no
[tls]
cert_file = {p}/cert.pem
key_file = {p}/key.pem
[log]
level = info
{log.replace("{dir}", p)}
""")
        saved = {k: os.environ.get(k) for k in env or {}}
        os.environ.update(env or {})
        try:
            d = Sluice(SLUICE, conf)
        finally:
            for k, v in saved.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v
        d.port, d.tls_port, d.spool, d.dir = port, tls_port, f"{p}/spool", p
        d.wait_log("event=ready")
        yield d
        if exits == 0:
            d.stop_clean()
        else:
            assert d.proc.wait(30) == exits, d.lines[-20:]
    finally:
        if d is not None:
            if d.proc.poll() is None:
                try:
                    d.stop()
                except AssertionError:
                    pass
            d.check_sanitizers()
        wd.cleanup()


def tls_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect(d, tls):
    """A socket past the greeting (TLS: the handshake done on the
    implicit-TLS port)."""
    s = socket.create_connection(("127.0.0.1", d.tls_port if tls else d.port), timeout=10)
    if tls:
        s = tls_context().wrap_socket(s, server_hostname="localhost")
    read_until(s, b"220 ")
    return s


def read_until(s, needle):
    buf = b""
    while needle not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before {needle!r}; got {buf!r}")
        buf += chunk
    return buf


def read_to_end(s):
    buf = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return buf
            buf += chunk
    except (ConnectionError, ssl.SSLError):
        return buf


def leave(s, how):
    """End the connection the way a client that gives up does: close
    (FIN; under TLS without close_notify, as ssl's close() does), reset
    (SO_LINGER 0: RST), or half-close (shutdown of the sending side, then
    read until sluice closes; returns what it said meanwhile)."""
    if how == "reset":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        return b""
    if how == "half":
        # socket's own shutdown: SSLSocket's drops TLS from the reads after
        socket.socket.shutdown(s, socket.SHUT_WR)
        got = read_to_end(s)
        s.close()
        return got
    s.close()
    return b""


def fields(line):
    return dict(f.split("=", 1) for f in line.split() if "=" in f)


def test_client_gone_mid_transaction_is_logged():
    """A client that leaves with a transaction open (its envelope given,
    its content not ended) is logged at once as having dropped it:
    event=connection_lost with the state it left in, how it left and the
    content octets received, whether it closed, reset, or closed TCP under
    TLS without close_notify. Before, such a session logged only its
    disconnect line ("data=1"), though a close_notify in the same place
    said note=transaction_dropped. A client that leaves between
    transactions, or after the end of its message, logs no such line, and
    that message is queued."""
    content = b"Subject: gone\r\n\r\n" + b"a" * 100 + b"\r\n"
    chunk = b"b" * 500
    envelope = b"EHLO gone.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"

    def in_data(s):
        s.sendall(envelope + b"DATA\r\n")
        read_until(s, b"354 ")
        s.sendall(content)

    def between_chunks(s):
        s.sendall(envelope + b"BDAT %d\r\n" % len(chunk) + chunk)
        read_until(s, b"octets received")

    def in_chunk(s):
        # the replies read first: a close with unread data is a reset
        s.sendall(envelope)
        read_until(s, b"2.1.5")
        s.sendall(b"BDAT 100000 LAST\r\n" + chunk)

    def envelope_only(s):
        s.sendall(envelope)
        read_until(s, b"2.1.5")

    def no_transaction(s):
        s.sendall(b"EHLO gone.example\r\nMAIL FROM:<a@example.com>\r\nRSET\r\n")
        read_until(s, b"2.0.0 Ok")

    def after_the_dot(s):
        s.sendall(envelope + b"DATA\r\n")
        read_until(s, b"354 ")
        s.sendall(content + b".\r\n")

    # (what the client does, its transport, how it leaves, the line
    # expected: state, how, octets; None: no connection_lost line)
    cases = [
        (in_data, False, "close", ("data", "closed", len(content))),
        (in_data, False, "reset", ("data", "reset", len(content))),
        (in_data, True, "close", ("data", "closed", len(content))),
        (between_chunks, False, "close", ("command", "closed", len(chunk))),
        (between_chunks, True, "reset", ("command", "reset", len(chunk))),
        (in_chunk, False, "close", ("bdat", "closed", len(chunk))),
        (envelope_only, False, "half", ("command", "closed", 0)),
        (no_transaction, False, "close", None),
        (no_transaction, True, "close", None),
        (after_the_dot, False, "close", None),
    ]
    with sluice() as d:
        problems = []
        lost = 0
        for i, (act, tls, how, want) in enumerate(cases, 1):
            s = connect(d, tls)
            act(s)
            leave(s, how)
            d.wait_log_count("event=disconnect", i)
            what = f"{act.__name__} over {'TLS' if tls else 'TCP'}, {how}"
            lines = d.log_lines(LOST)
            if want is None:
                if len(lines) != lost:
                    problems.append(f"{what}: unexpected {lines[-1]}")
                    lost = len(lines)
                continue
            if len(lines) != lost + 1:
                problems.append(f"{what}: no {LOST} line")
                lost = len(lines)
                continue
            lost += 1
            f = fields(lines[-1])
            got = (f.get("state"), f.get("how"), int(f.get("octets", -1)))
            if got != want or f.get("note") != "transaction_dropped":
                problems.append(f"{what}: expected state, how, octets {want}: {lines[-1]}")
        wait_until(lambda: d.count_log("event=queued") == 1, 30, "the message sent whole")
        assert not problems, "\n".join(problems)


def test_cut_at_every_point_stores_only_whole_messages():
    """A client cut at every few octets of a transaction (DATA after its
    354; MAIL, RCPT and two BDAT chunks pipelined), leaving by a close, a
    reset or a half-close, over TCP and TLS: the sessions that sent their
    whole message have it stored once (a half-closed one also reads its
    250), no other has anything stored, every other logs that it dropped
    its transaction, and every session ends."""
    content = b"Subject: cut\r\n\r\n" + b"line of text\r\n" * 8
    data_cmds = b"EHLO cut.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
    data_text = content + b".\r\n"
    half = len(content) // 2
    bdat_all = (b"EHLO cut.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                + b"BDAT %d\r\n" % half + content[:half]
                + b"BDAT %d LAST\r\n" % (len(content) - half) + content[half:])
    # BDAT cuts start after the EHLO, MAIL and RCPT lines are whole: a cut
    # before them leaves no transaction open.
    bdat_from = bdat_all.index(b"BDAT")
    with sluice() as d:
        n = whole = 0
        problems = []
        for tls in (False, True):
            for verb, text, start in (("data", data_text, 0), ("bdat", bdat_all, bdat_from)):
                cuts = list(range(start, len(text), 4)) + [len(text) - 1, len(text)]
                for cut in sorted(set(cuts)):
                    for how in ("close", "reset", "half"):
                        s = connect(d, tls)
                        if verb == "data":
                            s.sendall(data_cmds)
                            read_until(s, b"354 ")
                        s.sendall(text[:cut])
                        got = leave(s, how)
                        n += 1
                        if cut == len(text):
                            whole += 1
                            if how == "half" and b"250 2.0.0 Ok: queued as" not in got:
                                problems.append(f"{verb} over {'TLS' if tls else 'TCP'}, "
                                                f"half-closed after the end: {got!r}")
        d.wait_log_count("event=disconnect", n, timeout=120)
        wait_until(lambda: d.count_log("event=queued") >= whole, 30, f"{whole} messages queued")
        assert not problems, "\n".join(problems)
        lost = d.count_log(LOST)
        assert lost == n - whole, f"{lost} {LOST} lines for {n - whole} cut transactions"
        d.stop_clean()
        msgs = spool_messages(d.spool)
        assert len(msgs) == whole, f"{len(msgs)} stored for {whole} whole messages"
        assert all(m["body"].endswith(content) for m in msgs)
        assert d.count_log("event=queued") == whole


def test_rcpt_between_bdat_chunks_refused():
    """RFC 3030 2: the BDAT chunks come after all of MAIL and RCPT. A RCPT
    between two chunks is refused (503) as DATA after BDAT is, and the
    message goes to the recipients it had when its first chunk came; it
    used to be accepted, the envelope changing half-way through the
    message."""
    with sluice() as d:
        c = Smtp(d.port)
        c.expect("EHLO client.example", 250)
        c.expect("MAIL FROM:<a@example.com>", 250)
        c.expect("RCPT TO:<first@example.org>", 250)
        first = b"Subject: chunks\r\n\r\n"
        c.send(b"BDAT %d\r\n" % len(first) + first)
        assert c.reply().code == 250
        rep = c.cmd("RCPT TO:<late@example.org>")
        assert rep.raw == "503 5.5.1 RCPT after BDAT in one transaction", rep
        last = b"the rest\r\n"
        c.send(b"BDAT %d LAST\r\n" % len(last) + last)
        assert "queued as" in c.reply().text
        # the next transaction takes recipients again
        c.expect("MAIL FROM:<a@example.com>", 250)
        c.expect("RCPT TO:<next@example.org>", 250)
        c.send(b"BDAT 5 LAST\r\nnext\n")
        assert c.reply().code >= 500  # a bare LF: refused, the transaction over
        c.expect("QUIT", 221)
        c.close()
        d.wait_log_count("event=disconnect", 1)
        d.stop_clean()
        (m,) = spool_messages(d.spool)
        assert m["rcpts"] == [b"first@example.org"] and m["body"].endswith(first + last), m


def test_disconnect_line_says_why_a_client_got_nowhere():
    """A careless client (no AUTH where relaying needs it) that tries
    again and again gets one line that says why: the disconnect line
    names the first refused command and its reply. Before, it said only
    mail=0/3, and no line said what the refusals were."""
    with sluice(trusted="10.9.9.0/24") as d:
        c = Smtp(d.port)
        c.expect("EHLO careless.example", 250)
        for _ in range(3):
            c.expect("MAIL FROM:<app@example.com>", 530)
        c.expect("QUIT", 221)
        c.close()
        line = d.wait_log("event=disconnect")
        assert line.endswith(' mail=0/3 quit=1 commands=2/5'
                             ' first_refused="MAIL 530 5.7.0 Authentication required"'), line
        c = Smtp(d.port)
        c.expect("EHLO fine.example", 250)
        c.expect("NOOP", 250)
        c.expect("QUIT", 221)
        c.close()
        d.wait_log_count("event=disconnect", 2)
        line = d.log_lines("event=disconnect")[1]
        assert line.endswith(" commands=3/3"), line


def test_stop_tells_a_client_in_its_envelope_421():
    """A client that gave its envelope (MAIL, RCPT) and waits before its
    DATA when sluice stops (SIGTERM) is told 421 4.3.2 once nothing it
    sends could be stored any more (the drain sealed), as an idle client
    is: before, with nothing in flight the drain was done at once and
    the stop cut it without a word (a newsletter backend's client saw
    "Connection unexpectedly closed" in the middle of its recipients).
    Its transaction is logged dropped, and nothing is stored."""
    with sluice() as d:
        c = Smtp(d.port)
        c.expect("EHLO a.example", 250)
        c.expect("MAIL FROM:<a@example.com>", 250)
        c.expect("RCPT TO:<b@example.org>", 250)
        c.expect("RCPT TO:<c@example.org>", 250)
        d.stop_clean()
        bye = c.reply()
        assert bye.code == 421 and bye.raw.startswith("421 4.3.2 "), bye
        assert c.is_closed(5)
        c.close()
        (line,) = d.log_lines("event=shutting_down")
        assert line.endswith(" note=transaction_dropped"), line
        assert d.log_lines(LOST) == [], d.log_lines(LOST)
        assert spool_messages(d.spool) == []


def test_stop_with_transactions_open_says_what_it_dropped():
    """sluice stopped (SIGTERM) while clients are in DATA, in a BDAT
    chunk, and idle: it exits 0, stores nothing of the open
    transactions, and logs each one it dropped (how=stopping, with its
    state and the octets it had); the idle session logs no such line
    and is told 421 before the close (RFC 5321 3.8; before, it was cut
    without a word). Before, all three logged the same disconnect line."""
    with sluice() as d:
        in_data = Smtp(d.port)
        in_data.expect("EHLO a.example", 250)
        in_data.expect("MAIL FROM:<a@example.com>", 250)
        in_data.expect("RCPT TO:<b@example.org>", 250)
        in_data.expect("DATA", 354)
        text = b"Subject: stop\r\n\r\npartial\r\n"
        in_data.send(text)
        in_chunk = Smtp(d.port)
        in_chunk.expect("EHLO a.example", 250)
        in_chunk.expect("MAIL FROM:<a@example.com>", 250)
        in_chunk.expect("RCPT TO:<b@example.org>", 250)
        in_chunk.send(b"BDAT 10 LAST\r\n12345")
        idle = Smtp(d.port)
        idle.expect("EHLO a.example", 250)
        d.stop_clean()
        bye = idle.reply()
        assert bye.code == 421 and bye.raw.startswith("421 4.3.2 "), bye
        for c in (in_data, in_chunk, idle):
            assert c.is_closed(5)
            c.close()
        assert d.count_log("event=shutting_down") == 1, d.log_lines("event=shutting_down")
        lines = d.log_lines(LOST)
        # The BDAT session is in its chunk once it has read "BDAT 10 LAST"
        # (state=bdat), else between commands with its envelope (command);
        # the octets are those read when it stopped (all, unless the stop
        # came first).
        got = sorted(fields(ln)["state"] for ln in lines)
        assert got in (["bdat", "data"], ["command", "data"]), lines
        for ln in lines:
            most = len(text) if fields(ln)["state"] == "data" else 5
            assert fields(ln)["how"] == "stopping", ln
            assert 0 <= int(fields(ln)["octets"]) <= most, ln
        assert spool_messages(d.spool) == []


def envelope(c):
    """A transaction up to DATA's 354 on the Smtp client c."""
    c.expect("EHLO client.example", 250)
    c.expect("MAIL FROM:<a@example.com>", 250)
    c.expect("RCPT TO:<b@example.org>", 250)
    c.expect("DATA", 354)


def held_message(d, body):
    """A client whose message (body, dot included) is stored, its commit's
    answer held (SLUICE_TEST_COMMIT_DELAY): returned before any reply."""
    pending = Smtp(d.port, timeout=30)
    envelope(pending)
    pending.send(body)
    d.wait_log("event=commit_held")  # stored, its answer not yet back
    return pending


def test_stop_answers_a_message_whose_commit_is_pending():
    """SIGTERM while a message's content has ended and its commit is
    pending (a spool slow to answer: the test hook SLUICE_TEST_COMMIT_DELAY
    holds each commit's answer 2 s): the drain waits for it, and the
    client gets its 250 once the message is stored, then 421 for the stop;
    the message is stored and logged queued once. A client in DATA at the
    stop whose dot comes just after it gets 250 and 421 when its message
    is stored, else a 4xx (its worker's drain was done: nothing new is
    stored), or nothing when the stop came first: never a 250 for a
    message not stored, never a stored message without its 250. Before,
    the drain waited only for outbound deliveries: the loop ended with the
    commit pending, the message stayed in the spool unanswered (the client
    sends it again: twice delivered) and unlogged."""
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 2000
    with sluice(env={"SLUICE_TEST_COMMIT_DELAY": "2000"}) as d:
        d.wait_log("event=test_hook name=SLUICE_TEST_COMMIT_DELAY")
        pending = held_message(d, body + b".\r\n")
        late = Smtp(d.port, timeout=30)
        envelope(late)
        late.send(body)
        d.signal(signal.SIGTERM)
        d.wait_log("event=stopping")
        late.send(b".\r\n")
        got = [r.code for r in pending.rest_until_closed(30)]
        got_late = [r.code for r in late.rest_until_closed(30)]
        pending.close()
        late.close()
        assert d.proc.wait(30) == 0
        assert got == [250, 421], got
        assert got_late in ([250, 421], [421], []), got_late
        stored = spool_messages(d.spool)
        assert len(stored) == 1 + (got_late[:1] == [250]), (got_late, len(stored))
        assert d.count_log("event=queued") == len(stored), d.log_lines("event=queued")
        assert d.count_log("event=drain_done") == 1


def test_drain_timeout_with_a_commit_pending_logs_it_queued():
    """SIGTERM while a message's commit is pending, and drain_timeout
    (1 s) runs out before the spool answers (the test hook
    SLUICE_TEST_COMMIT_DELAY holds each commit's answer 3 s, as a slow
    disk would): the stop waits for that commit after the drain, the
    message is stored, and it is logged queued (unanswered=stopping) with
    its reception line in the delivery log; its client got no 250 (it
    may send it again: at least once, never lost). Before, the hook's
    held answer was dropped at the stop, and a real commit landing after
    the loop ended was stored unlogged: the backend saw outcomes of a
    message it was never told was queued."""
    with sluice("drain_timeout = 1s\n", env={"SLUICE_TEST_COMMIT_DELAY": "3000"},
                log="delivery_log = {dir}/delivery.log") as d:
        pending = held_message(d, b"Subject: slow\r\n\r\nstored late\r\n.\r\n")
        d.signal(signal.SIGTERM)
        d.wait_log("event=drain_timed_out")
        got = [r.code for r in pending.rest_until_closed(30)]
        pending.close()
        assert d.proc.wait(30) == 0
        assert 250 not in got, got
        (m,) = spool_messages(d.spool)
        lines = d.log_lines("event=queued")
        assert len(lines) == 1 and "unanswered=stopping" in lines[0], lines
        qid = fields(lines[0])["id"]
        with open(f"{d.dir}/delivery.log") as f:
            receptions = [ln for ln in f if '"reception"' in ln]
        assert len(receptions) == 1 and qid in receptions[0], receptions
        assert d.count_log("event=stop_commit_wait_cut") == 0


def test_a_spool_that_never_answers_cannot_hold_the_stop():
    """The stop has one last bound: a spool that answers nothing (a dead
    disk under the committer: the stop's own waits for it, one of them
    unbounded, would hold it forever) is given up, with event=stop_stuck
    and exit 70, for a supervisor to restart it. The test hook
    SLUICE_TEST_COMMIT_DELAY holds a commit's answer ten minutes, and
    SLUICE_TEST_STOP_BOUND_MS makes the bound 3 s instead of 60 s. What
    the spool stored is there after it; its client got no 250."""
    with sluice("drain_timeout = 1s\n", exits=70,
                env={"SLUICE_TEST_COMMIT_DELAY": "600000", "SLUICE_TEST_STOP_BOUND_MS": "3000"}
                ) as d:
        pending = held_message(d, b"Subject: stuck\r\n\r\nstored, never answered\r\n.\r\n")
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.proc.wait(30) == 70, d.lines[-20:]
        took = time.monotonic() - t0
        got = [r.code for r in pending.rest_until_closed(10)]
        pending.close()
        d.reader.join(5)
        stuck = d.log_lines("event=stop_stuck")
        assert len(stuck) == 1, d.lines[-20:]
        # given up where the servers wait for the spool's answers
        assert "waited_ms=3000 stage=servers_and_spool_answers exit=70" in stuck[0], stuck
        # the drain (1 s), then the bound (3 s) from the stop's start: not
        # the 30 s the stop waits for a held commit
        assert took < 20, took
        assert 250 not in got, got
        (m,) = spool_messages(d.spool)
        assert b"stored, never answered" in m["body"]


def test_a_stop_stuck_after_the_delivery_log_is_given_up_too():
    """The stop's last bound holds in its waits that have no bound of their
    own, past the servers: the test hook SLUICE_TEST_STOP_STALL=spool
    hangs the stop where it closes the spool (queue_close joins a
    committer that a dead disk would hold forever), after the delivery log
    was closed. The watch gives it up at its bound (3 s here), names that
    stage, exits 70; the message accepted before is in the spool and its
    reception line in the delivery log, once."""
    with sluice(exits=70, env={"SLUICE_TEST_STOP_STALL": "spool",
                               "SLUICE_TEST_STOP_BOUND_MS": "3000"},
                log="delivery_log = {dir}/delivery.jsonl\ndelivery_log_flush = 10s") as d:
        c = Smtp(d.port, timeout=30)
        envelope(c)
        c.expect(b"Subject: last\r\n\r\nstored before the stop\r\n.", 250)
        c.expect("QUIT", 221)
        c.close()
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.proc.wait(30) == 70, d.lines[-20:]
        took = time.monotonic() - t0
        d.reader.join(5)
        assert d.log_lines("event=test_hook name=SLUICE_TEST_STOP_STALL stage=spool"), \
            d.lines[-20:]
        stuck = d.log_lines("event=stop_stuck")
        assert len(stuck) == 1, d.lines[-20:]
        assert "waited_ms=3000 stage=spool exit=70" in stuck[0], stuck
        assert took < 20, took
        (m,) = spool_messages(d.spool)
        assert b"stored before the stop" in m["body"]
        with open(f"{d.dir}/delivery.jsonl") as f:
            receptions = [json.loads(ln) for ln in f if '"reception"' in ln]
        assert len(receptions) == 1, receptions


def test_a_stop_stuck_is_given_up_at_its_real_bound():
    """The bound the other stop tests shorten (SLUICE_TEST_STOP_BOUND_MS),
    as it stands: with no hook but the stall (SLUICE_TEST_STOP_STALL=spool,
    the stop hung where it closes the spool), the stop is given up 60 s
    after it began (the drain's 30 s wait for a held commit, then 30 s
    more: sluice(8)), not sooner and not much later, with the stage named
    and exit 70."""
    with sluice("drain_timeout = 1s\n", exits=70, env={"SLUICE_TEST_STOP_STALL": "spool"}) as d:
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.proc.wait(120) == 70, d.lines[-20:]
        took = time.monotonic() - t0
        d.reader.join(5)
        stuck = d.log_lines("event=stop_stuck")
        assert len(stuck) == 1, d.lines[-20:]
        assert "waited_ms=60000 stage=spool exit=70" in stuck[0], stuck
        assert 60 <= took < 90, took


def deaf_client(d):
    """A client that greets, then pipelines NOOPs and never reads their
    replies, until sluice has stopped reading it: its replies fill its
    socket's send buffer (the kernel grows it to a few megabytes) and the
    session's own, so the next reply, a 421, cannot leave."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", d.port))
    read_until(s, b"220 ")
    s.sendall(b"EHLO deaf.example\r\n")
    read_until(s, b"250 ")
    me = s.getsockname()[1]

    def server_queues():
        """sluice's socket to us: (octets not yet acknowledged by us,
        octets we sent that it has not read), from /proc/net/tcp."""
        with open("/proc/net/tcp") as f:
            for ln in f.readlines()[1:]:
                x = ln.split()
                if int(x[1].split(":")[1], 16) == d.port and int(x[2].split(":")[1], 16) == me:
                    tx, rx = x[4].split(":")
                    return int(tx, 16), int(rx, 16)
        return 0, 0

    s.setblocking(False)
    noops = b"NOOP\r\n" * 10000
    seen = {"queues": None, "same": 0}

    def stuck():
        """Our send would block, sluice holds more replies than we could
        ever take in (our receive buffer is 4 KB), and neither what it
        holds for us nor what it left unread of ours has moved in five
        looks (a slow loop, under a sanitizer, moves between them)."""
        try:
            while True:
                s.send(noops)
        except BlockingIOError:
            pass
        q = server_queues()
        seen["same"] = seen["same"] + 1 if q == seen["queues"] else 0
        seen["queues"] = q
        return q[0] > 65536 and q[1] > 0 and seen["same"] >= 5

    wait_until(stuck, 60, "sluice no longer reading a client that does not read")
    return s


def test_a_client_that_does_not_read_leaves_the_drain_sealed():
    """A client that stopped reading (its buffers full of replies, the
    421 of the stop behind them) does not keep its worker storing: the
    worker seals as soon as no message is being signed or stored, and a
    second session whose DATA ends after that is refused 421, nothing
    stored. Before (968d671's parent), the non-reading client's 421
    leaving held the seal open: the late message was stored and got 250
    while the loop could end before such a 250 left."""
    with sluice("drain_timeout = 20s\nmax_junk_commands = 1000000000\n", workers=1) as d:
        late = Smtp(d.port, timeout=30)
        late.expect("EHLO client.example", 250)
        late.expect("MAIL FROM:<a@example.com>", 250)
        late.expect("RCPT TO:<b@example.org>", 250)
        late.expect("DATA", 354)
        late.send(b"Subject: late\r\n\r\nafter the seal\r\n")
        deaf = deaf_client(d)
        d.signal(signal.SIGTERM)
        d.wait_log("event=shutting_down")  # the deaf one: the other is in DATA
        try:
            sealed = d.wait_log("event=drain_sealed", timeout=5)
        except AssertionError:
            sealed = None  # never sealed: the late message shows what that costs
        late.send(b".\r\n")
        got = [r.code for r in late.rest_until_closed(30)]
        late.close()
        deaf.close()  # unread replies: a reset, the session ends
        assert d.proc.wait(30) == 0
        assert got == [421], got
        assert sealed is not None and "closing=1" in sealed, sealed
        assert spool_messages(d.spool) == []
        assert d.count_log("event=queued") == 0
        assert d.count_log("reason=shutting_down") == 1, d.log_lines("event=message_refused")


def test_a_client_that_does_not_read_is_closed_within_the_drain():
    """The stop's 421 to a client that stopped reading cannot leave: its
    session is closed when the drain's time is up (drain_timeout, 2 s,
    not timeout_command, 5 minutes), and the drain ends done, not timed
    out: nothing was in flight. Before, that session held the drain to
    its end, logged as timed out with what was in flight left queued."""
    with sluice("drain_timeout = 2s\nmax_junk_commands = 1000000000\n", workers=1) as d:
        deaf = deaf_client(d)
        d.signal(signal.SIGTERM)
        d.wait_log("event=shutting_down")
        assert d.proc.wait(30) == 0
        deaf.close()
        assert d.count_log("event=drain_done") == 1, d.log_lines("event=drain_")
        assert d.count_log("event=disconnect") == 1


def plain(user, password):
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_pipelined_auth_decides_the_commands_behind_it():
    """AUTH, MAIL and RCPT in one write where relaying needs AUTH: the
    password is hashed off the loop, and the commands behind the AUTH wait
    for its answer. A wrong password: 535, and MAIL is refused (530), not
    taken as authenticated; the right one: 235, and MAIL and RCPT pass.
    Over AUTH LOGIN too, its two answers pipelined."""
    login = (base64.b64encode(b"alice").decode() + "\r\n"
             + base64.b64encode(PASSWORD.encode()).decode())
    wrong_login = (base64.b64encode(b"alice").decode() + "\r\n"
                   + base64.b64encode(b"wrong").decode())
    cases = [
        (f"AUTH PLAIN {plain('alice', 'wrong')}", ["535", "530", "503"]),
        (f"AUTH PLAIN {plain('alice', PASSWORD)}", ["235", "250", "250"]),
        (f"AUTH LOGIN\r\n{wrong_login}", ["334", "334", "535", "530", "503"]),
        (f"AUTH LOGIN\r\n{login}", ["334", "334", "235", "250", "250"]),
    ]
    with sluice(trusted="10.9.9.0/24") as d:
        for auth, want in cases:
            c = Smtp(d.port)
            c.expect("EHLO client.example", 250)
            c.send(f"{auth}\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
            got = [x.raw[:3] for x in c.replies(len(want))]
            assert got == want, (auth[:10], got)
            c.expect("QUIT", 221)
            c.close()


def test_auth_before_starttls_is_forgotten_after_it():
    """RFC 3207 4.2: after STARTTLS the server forgets what the client
    said before, AUTH included: a client that authenticated in plaintext
    (plaintext_auth = loopback) and then started TLS must authenticate
    again before relaying; its EHLO offers AUTH again."""
    with sluice(trusted="10.9.9.0/24") as d:
        c = Smtp(d.port)
        c.expect("EHLO client.example", 250)
        c.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", 235)
        c.expect("STARTTLS", 220)
        c.sock = tls_context().wrap_socket(c.sock, server_hostname="localhost")
        ehlo = c.cmd("EHLO client.example")
        assert ehlo.code == 250 and "AUTH PLAIN LOGIN" in ehlo.raw, ehlo
        c.expect("MAIL FROM:<a@example.com>", 530)
        c.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", 235)
        c.expect("MAIL FROM:<a@example.com>", 250)
        c.expect("QUIT", 221)
        c.close()


def test_junk_commands_end_a_session_that_moves_no_mail():
    """A client that sends only commands that move no mail (NOOP, an RSET
    outside a transaction, VRFY, HELP, a MAIL refused with 5xx) is closed
    with 421 once it has sent more than max_junk_commands of them since its
    last MAIL accepted, instead of holding its connection slot for ever;
    a bulk client whose transactions end in RSET (smtplib's way when every
    recipient was refused, as suppressed ones are) is never closed for
    that, however many it makes."""
    with sluice("max_junk_commands = 5\nmax_errors = 3\n", trusted="10.9.9.0/24") as d:
        c = Smtp(d.port)
        c.expect("EHLO client.example", 250)
        for verb, code in [("NOOP", 250), ("RSET", 250), ("VRFY x", 252), ("HELP", 214),
                           ("MAIL FROM:<a@example.com>", 530)]:
            c.expect(verb, code)
        # the sixth is one past the limit: answered, then 421
        r = c.cmd("NOOP")
        assert r.code == 250, r
        rest = c.rest_until_closed()
        assert [x.code for x in rest] == [421] and "without mail" in rest[0].raw, rest
        c.close()
        line = d.wait_log("event=too_many_junk_commands")
        assert "junk=6" in line, line

        # transactions ended by RSET, with NOOPs between: never closed
        c = Smtp(d.port)
        c.expect("EHLO client.example", 250)
        c.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", 235)
        for i in range(20):
            for _ in range(4):
                c.expect("NOOP", 250)
            c.expect("MAIL FROM:<a@example.com>", 250)
            c.expect("RCPT TO:<b@example.net>", 250)
            c.expect("RSET", 250)
        c.expect("MAIL FROM:<a@example.com>", 250)
        c.expect("RCPT TO:<b@example.net>", 250)
        c.expect("DATA", 354)
        c.expect("Subject: last\r\n\r\nbody\r\n.", 250)
        c.expect("QUIT", 221)
        c.close()
        d.wait_log_count("event=queued", 1)
        assert d.count_log("event=too_many_junk_commands") == 1
        assert d.count_log("event=too_many_errors") == 0


def test_ehlo_loop_counts_as_junk():
    """A client that greets again and again (EHLO or HELO, nothing else)
    moves no mail: every greeting after the session's first counts toward
    max_junk_commands, and one past it gets 421. Before, an EHLO loop was
    answered for ever. A bulk client is never closed for its greetings:
    EHLO, STARTTLS, EHLO (the protocol's own), AUTH, then a thousand
    transactions ended by RSET, some with an EHLO or HELO between them to
    reset (each followed by a MAIL accepted, which clears the count)."""
    with sluice("max_junk_commands = 5\n", trusted="10.9.9.0/24") as d:
        for verb in ("EHLO", "HELO"):
            c = Smtp(d.port)
            for _ in range(6):  # the first, then five counted
                c.expect(f"{verb} client.example", 250)
            c.send(f"{verb} client.example\r\n")
            rest = c.rest_until_closed()
            assert [x.code for x in rest] == [250, 421] and "without mail" in rest[1].raw, rest
            c.close()
        lines = d.wait_log_count("event=too_many_junk_commands", 2)
        assert all("junk=6" in ln for ln in lines), lines

        c = Smtp(d.port)
        c.expect("EHLO client.example", 250)
        c.expect("STARTTLS", 220)
        c.sock = tls_context().wrap_socket(c.sock, server_hostname="localhost")
        c.expect("EHLO client.example", 250)
        c.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", 235)
        for i in range(1000):
            greet = ["EHLO client.example", "HELO client.example"][i % 2] if i % 7 == 0 else None
            lines = ([greet] if greet else []) + [
                "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.net>", "RSET"]
            c.send("".join(x + "\r\n" for x in lines))
            got = [x.code for x in c.replies(len(lines))]
            assert got == [250] * len(lines), (i, got)
        c.expect("QUIT", 221)
        c.close()
        d.wait_log_count("event=disconnect", 3)
        assert d.count_log("event=too_many_junk_commands") == 2


def test_refused_auth_starttls_and_commands_outside_a_transaction_count_as_junk():
    """A client that repeats an AUTH it cancels ("*") or whose mechanism is
    not offered, a STARTTLS refused (here: TLS already up), or an RCPT, DATA
    or BDAT with no MAIL before it, moves no mail and makes no protocol
    error: each counts toward max_junk_commands, and one past it gets 421.
    Before, these were answered for ever, a connection slot held by a
    client that never even authenticated. The RCPTs, DATA and BDATs
    pipelined behind a refused MAIL or chunk (RFC 2920 3.1) are not junk,
    up to max_recipients + 1 of them: a client whose MAIL is refused (here for its
    declared size) with max_recipients RCPTs behind it, or whose BDAT
    chunk is (over max_message_size) with twenty more behind it, goes on,
    and its next message is queued."""
    loops = [(False, [b"AUTH LOGIN\r\n", b"*\r\n"], [334, 501]),
             (False, [b"AUTH LOGIN\r\n", base64.b64encode(b"alice") + b"\r\n", b"*\r\n"],
              [334, 334, 501]),
             (False, [b"AUTH CRAM-MD5\r\n"], [504]),
             (False, [b"RCPT TO:<b@example.net>\r\n"], [503]),
             (False, [b"DATA\r\n"], [503]),
             (False, [b"BDAT 1\r\nx"], [503]),
             (True, [b"STARTTLS\r\n"], [503])]
    with sluice("max_junk_commands = 5\nmax_recipients = 20\nmax_message_size = 10K\n",
                trusted="10.9.9.0/24") as d:
        for tls, steps, codes in loops:
            s = connect(d, tls)
            f = s.makefile("rb")
            s.sendall(b"EHLO client.example\r\n")
            while f.readline()[3:4] == b"-":
                pass
            got = []
            for _ in range(6):  # five counted, the sixth one past the limit
                for step in steps:
                    s.sendall(step)
                    got.append(int(f.readline()[:3]))
            last = f.readline()
            s.close()
            assert got == codes * 6 and last.startswith(b"421 4.7.0") \
                and b"without mail" in last, (steps, got, last)
        lines = d.wait_log_count("event=too_many_junk_commands", len(loops))
        assert all("junk=6" in ln for ln in lines), lines

        c = Smtp(d.port)
        c.expect("EHLO client.example", 250)
        c.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", 235)
        for _ in range(2):  # each MAIL refused and each RSET are junk: 4 of 5
            c.send("MAIL FROM:<a@example.com> SIZE=20000\r\n" +
                   "".join(f"RCPT TO:<b{i}@example.net>\r\n" for i in range(20)) + "DATA\r\n")
            got = [x.code for x in c.replies(22)]
            assert got == [552] + [503] * 21, got
            c.expect("RSET", 250)
        # a chunk over max_message_size, twenty more pipelined behind it
        c.expect("MAIL FROM:<a@example.com>", 250)
        c.expect("RCPT TO:<b@example.net>", 250)
        big = b"x" * 998 + b"\r\n"
        c.send(b"BDAT 12000\r\n" + big * 12 + (b"BDAT 1000\r\n" + big) * 20)
        got = [x.code for x in c.replies(21)]
        assert got == [552] + [503] * 20, got
        c.expect("MAIL FROM:<a@example.com>", 250)
        c.expect("RCPT TO:<b@example.net>", 250)
        c.expect("DATA", 354)
        c.expect("Subject: after\r\n\r\nbody\r\n.", 250)
        c.expect("QUIT", 221)
        c.close()
        d.wait_log_count("event=queued", 1)
        assert d.count_log("event=too_many_junk_commands") == len(loops)


def test_client_hello_pipelined_with_starttls_is_closed_at_once():
    """A client that sends its TLS ClientHello in the same write as
    STARTTLS, before the 220: the hello is dropped with the rest of that
    plaintext (CVE-2011-0411), and no second one comes, so the session is
    closed at once, with the log saying why, instead of waiting out the
    whole handshake deadline (30 s)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inb, outb, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outb.read()
    assert hello[:2] == b"\x16\x03", hello[:8]
    with sluice() as d:
        c = Smtp(d.port)
        c.expect("EHLO client.example", 250)
        c.send(b"STARTTLS\r\n" + hello)
        assert c.reply().code == 220
        assert c.is_closed(5), "still open: waiting for a ClientHello that came too early"
        c.close()
        line = d.wait_log("event=pipelined_after_starttls")
        assert f"dropped={len(hello)} note=tls_hello_dropped_closing" in line, line


def test_esmtp_after_helo_refused():
    """A client that greeted with HELO saw no extension, and may use none
    (RFC 5321 2.2.1 and 4.1.1.11, RFC 1869 4, RFC 6531 3.4 for
    SMTPUTF8): every ESMTP parameter of MAIL (SIZE, BODY, SMTPUTF8, RET,
    ENVID, AUTH) and of RCPT (NOTIFY, ORCPT) is refused with 555 5.5.4
    naming it, and moves nothing: no transaction opens, no recipient is
    added, the session goes on, and the plain transaction after them is
    stored once, with its one sender and recipient. Before, every one of
    them was accepted as after EHLO. BDAT (CHUNKING) after HELO is refused
    with 503 and its chunk read and dropped (as Exim does), not taken for
    commands; AUTH after HELO is refused as before (503: send EHLO);
    STARTTLS after HELO is accepted (as Postfix does: it only protects),
    and the session begins again after it (RFC 3207 4.2)."""
    mail = [("SIZE=1000", "SIZE"), ("BODY=8BITMIME", "BODY"), ("BODY=7BIT", "BODY"),
            ("BODY=BINARYMIME", "BODY"), ("SMTPUTF8", "SMTPUTF8"), ("RET=HDRS", "RET"),
            ("ENVID=env+2B1", "ENVID"), ("AUTH=<>", "AUTH"), ("size=10 ret=full", "SIZE RET")]
    with sluice() as d:
        c = Smtp(d.port)
        c.expect("HELO old.example", 250)
        problems = []
        for param, named in mail:
            r = c.cmd(f"MAIL FROM:<a@example.com> {param}")
            if not (r.code == 555 and r.raw.startswith("555 5.5.4 ") and f": {named} " in r.raw):
                problems.append(f"MAIL {param}: {r.raw}")
        r = c.cmd("MAIL FROM:<j\u00f6rg@example.com> SMTPUTF8".encode())
        if r.code != 555:
            problems.append(f"MAIL <j\u00f6rg@...> SMTPUTF8: {r.raw}")
        # none of them opened a transaction: a plain MAIL is no nested one
        c.expect("MAIL FROM:<sender@example.com>", 250)
        for param, named in [("NOTIFY=SUCCESS,FAILURE", "NOTIFY"),
                             ("ORCPT=rfc822;orig@example.org", "ORCPT")]:
            r = c.cmd(f"RCPT TO:<extra@example.org> {param}")
            if not (r.code == 555 and r.raw.startswith("555 5.5.4 ") and f": {named} " in r.raw):
                problems.append(f"RCPT {param}: {r.raw}")
        assert not problems, "\n".join(problems)
        c.expect("RCPT TO:<rcpt@example.org>", 250)
        c.expect("DATA", 354)
        c.expect("Subject: helo\r\n\r\nplain\r\n.", 250)
        # BDAT after HELO: refused, its chunk dropped unread
        c.expect("MAIL FROM:<sender@example.com>", 250)
        c.expect("RCPT TO:<rcpt@example.org>", 250)
        c.send(b"BDAT 12 LAST\r\nQUIT\r\nNOOP\r\n")
        r = c.reply()
        assert r.code == 503 and "EHLO" in r.raw, r
        c.expect("RSET", 250)
        c.expect(f"AUTH PLAIN {plain('alice', PASSWORD)}", 503)
        c.expect("QUIT", 221)
        c.close()
        # STARTTLS after HELO: TLS, and a session that must greet again
        c = Smtp(d.port)
        c.expect("HELO old.example", 250)
        c.expect("STARTTLS", 220)
        c.sock = tls_context().wrap_socket(c.sock, server_hostname="localhost")
        c.expect("MAIL FROM:<a@example.com>", 503)
        c.expect("EHLO new.example", 250)
        c.expect("MAIL FROM:<a@example.com> SIZE=100", 250)
        c.expect("QUIT", 221)
        c.close()
        d.wait_log_count("event=disconnect", 2)
        d.stop_clean()
        (m,) = spool_messages(d.spool)
        assert m["sender"] == b"sender@example.com" and m["rcpts"] == [b"rcpt@example.org"], m
        assert m["envid"] == b"" and m["body"].endswith(b"plain\r\n"), m


def test_bad_parameter_values_after_helo_refused_as_parameters():
    """After HELO a parameter is refused for being there, before its value
    is read: a bad value (SIZE=abc, BODY=9BIT, RET=x, NOTIFY=bogus, ORCPT
    without its type), a duplicate, a keyword nobody knows get the same
    555 5.5.4 "Unsupported option after HELO" naming them as a good value
    does, and move nothing. Before, each got the parser's wording (501
    5.5.4 Invalid parameter value, 501 Duplicate parameter, 555
    Unsupported parameter). A broken list (two spaces) stays a syntax
    error, and after EHLO a bad value is the parser's 501 as before."""
    mail = [("SIZE=abc", "SIZE"), ("BODY=9BIT", "BODY"), ("RET=x", "RET"),
            ("ENVID=a+zz", "ENVID"), ("SIZE=1 SIZE=2", "SIZE"), ("X-PRIO=5", "X-PRIO"),
            ("SIZE=abc X-PRIO=5", "SIZE X-PRIO")]
    rcpt = [("NOTIFY=bogus", "NOTIFY"), ("ORCPT=nosemicolon", "ORCPT"),
            ("NOTIFY=NEVER,SUCCESS", "NOTIFY")]
    with sluice() as d:
        c = Smtp(d.port)
        c.expect("HELO old.example", 250)
        problems = []
        for param, named in mail:
            r = c.cmd(f"MAIL FROM:<a@example.com> {param}")
            if not r.raw.startswith(f"555 5.5.4 Unsupported option after HELO: {named} ("):
                problems.append(f"MAIL {param}: {r.raw}")
        c.expect("MAIL FROM:<sender@example.com>", 250)  # none opened a transaction
        for param, named in rcpt:
            r = c.cmd(f"RCPT TO:<extra@example.org> {param}")
            if not r.raw.startswith(f"555 5.5.4 Unsupported option after HELO: {named} ("):
                problems.append(f"RCPT {param}: {r.raw}")
        r = c.cmd("MAIL FROM:<a@example.com>  SIZE=1")
        if r.code != 501:
            problems.append(f"two spaces: {r.raw}")
        c.expect("RCPT TO:<rcpt@example.org>", 250)
        c.expect("DATA", 354)
        c.expect("Subject: helo\r\n\r\nplain\r\n.", 250)
        c.expect("EHLO new.example", 250)
        r = c.cmd("MAIL FROM:<a@example.com> SIZE=abc")
        if not r.raw.startswith("501 5.5.4 "):
            problems.append(f"after EHLO: {r.raw}")
        c.expect("QUIT", 221)
        c.close()
        assert not problems, "\n".join(problems)
        d.wait_log_count("event=disconnect", 1)
        d.stop_clean()
        (m,) = spool_messages(d.spool)
        assert m["sender"] == b"sender@example.com" and m["rcpts"] == [b"rcpt@example.org"], m


def test_disconnect_line_names_refusals_outside_commands():
    """Every 4xx or 5xx reply to what a client sent counts once, in the
    disconnect line's sums and as its first_refused, wherever it is made:
    a line too long (for a command, a BDAT, an AUTH exchange), a bare LF
    in a command line, a TLS ClientHello on the plaintext port, AUTH's
    501 (bad base64, cancelled) and its 535 after the hash and the delay,
    a message refused after its dot or after its last BDAT chunk. Before,
    these passed the one place that kept the first refusal: their lines
    said no first_refused, and auth=1, data=1, bdat=1 for an AUTH or a
    message that was refused."""
    long_line = "NOOP " + "x" * 13000
    hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 32
    content_lf = b"Subject: lf\r\n\r\nbare\nLF\r\n.\r\n"
    envelope = ["EHLO client.example", "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.org>"]

    def say(c, lines, codes):
        for line, code in zip(lines, codes):
            c.expect(line, code)

    def too_long(c):
        say(c, ["EHLO client.example", long_line, "QUIT"], [250, 500, 221])

    def bdat_too_long(c):
        c.expect("EHLO client.example", 250)
        c.send("BDAT " + "1" * 13000 + "\r\n")
        assert [r.code for r in c.rest_until_closed()] == [501]

    def auth_too_long(c):
        say(c, ["EHLO client.example", "AUTH LOGIN", long_line, "QUIT"], [250, 334, 500, 221])

    def bare_lf(c):
        c.expect("EHLO client.example", 250)
        c.send(b"NOOP\n")
        assert [r.code for r in c.rest_until_closed()] == [500]

    def tls_hello(c):
        c.send(hello)
        assert [r.code for r in c.rest_until_closed()] == [500]

    def bad_base64(c):
        say(c, ["EHLO client.example", "AUTH PLAIN", "!!not base64!!", "QUIT"],
            [250, 334, 501, 221])

    def cancelled(c):
        say(c, ["EHLO client.example", "AUTH LOGIN", "*", "QUIT"], [250, 334, 501, 221])

    def wrong_password(c):
        say(c, ["EHLO client.example", f"AUTH PLAIN {plain('alice', 'wrong')}", "QUIT"],
            [250, 535, 221])

    def data_refused(c):
        say(c, envelope + ["DATA"], [250, 250, 250, 354])
        c.send(content_lf)
        assert c.reply().code == 550
        c.expect("QUIT", 221)

    def bdat_refused(c):
        say(c, envelope, [250, 250, 250])
        c.send(b"BDAT 7 LAST\r\nbare\nLF")
        assert c.reply().code == 550
        c.expect("QUIT", 221)

    # what the client does, the end of its disconnect line
    cases = [
        (too_long, ' ehlo=1 quit=1 unknown=0/1 commands=2/3'
                   ' first_refused="unknown 500 5.5.2 Line too long"'),
        (bdat_too_long, ' ehlo=1 bdat=0/1 commands=1/2'
                        ' first_refused="BDAT 501 5.5.4 Syntax error in BDAT size; closing"'),
        (auth_too_long, ' ehlo=1 quit=1 auth=0/1 commands=2/3'
                        ' first_refused="AUTH 500 5.5.6 Authentication Exchange line is too long"'),
        (bare_lf, ' ehlo=1 unknown=0/1 commands=1/2'
                  ' first_refused="unknown 500 5.5.2 Bare CR or LF in a command line: closing"'),
        (tls_hello, ' unknown=0/1 commands=0/1 first_refused="unknown 500 5.5.2'
                    ' TLS handshake on a plaintext port: use STARTTLS"'),
        (bad_base64, ' ehlo=1 quit=1 auth=0/1 commands=2/3'
                     ' first_refused="AUTH 501 5.5.2 Invalid base64 data"'),
        (cancelled, ' ehlo=1 quit=1 auth=0/1 commands=2/3'
                    ' first_refused="AUTH 501 5.0.0 Authentication cancelled"'),
        (wrong_password, ' ehlo=1 quit=1 auth=0/1 commands=2/3'
                         ' first_refused="AUTH 535 5.7.8 Authentication credentials invalid"'),
        (data_refused, ' ehlo=1 mail=1 rcpt=1 data=0/1 quit=1 commands=4/5'
                       ' first_refused="DATA 550 5.6.0 Message refused: bare CR or LF in the'
                       ' content (lines must end with CRLF)"'),
        (bdat_refused, ' ehlo=1 mail=1 rcpt=1 bdat=0/1 quit=1 commands=4/5'
                       ' first_refused="BDAT 550 5.6.0 Message refused: bare CR or LF in the'
                       ' content (lines must end with CRLF)"'),
    ]
    with sluice() as d:
        problems = []
        for i, (act, want) in enumerate(cases, 1):
            c = Smtp(d.port)
            act(c)
            c.close()
            d.wait_log_count("event=disconnect", i)
            line = d.log_lines("event=disconnect")[-1]
            if not line.endswith(want):
                problems.append(f"{act.__name__}: {line}")
        assert not problems, "\n".join(problems)


def test_disconnect_line_names_refusals_that_answer_no_command():
    """A refusal that answers no command is named on the disconnect line,
    as first_refused="- CODE ..." when nothing was refused before it, else
    as closed_by="CODE ...": 554 to a client that talks before the
    greeting, 421 over a connection limit, for a timeout between
    commands, for too many errors, for too many junk commands, for a stop.
    Before, none of them reached the line: a session that ended on one
    said nothing of why (or only why an earlier command was refused)."""
    conf = ("greet_pause = 300ms\nmax_clients = 3\nmax_errors = 2\nmax_junk_commands = 2\n"
            "timeout_command = 1s\n")
    with sluice(conf) as d:
        problems = []

        def check(what, line, want):
            if not line.endswith(want):
                problems.append(f"{what}: {line}")

        n = 0
        # talks before the greeting
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        s.sendall(b"EHLO early.example\r\n")
        got = read_to_end(s)
        s.close()
        assert got.startswith(b"554 5.5.1 "), got
        n += 1
        d.wait_log_count("event=disconnect", n)
        check("pregreet", d.log_lines("event=disconnect")[-1],
              ' commands=0/0 first_refused="- 554 5.5.1 Protocol error: client sent data'
              ' before the greeting"')

        # over max_clients: the fourth connection
        held = [Smtp(d.port) for _ in range(3)]
        c = Smtp(d.port)
        assert c.greeting.code == 421 and c.is_closed(5), c.greeting
        c.close()
        n += 1
        d.wait_log_count("event=disconnect", n)
        check("connection limit", d.log_lines("event=disconnect")[-1],
              ' commands=0/0 first_refused="- 421 4.7.0 Too many connections: try again later"')
        for h in held:
            h.close()
        n += 3
        d.wait_log_count("event=disconnect", n)

        # silent after EHLO: the command deadline
        c = Smtp(d.port)
        c.expect("EHLO client.example", 250)
        rest = c.rest_until_closed(10)
        assert [r.code for r in rest] == [421], rest
        c.close()
        n += 1
        d.wait_log_count("event=disconnect", n)
        check("timeout", d.log_lines("event=disconnect")[-1],
              ' ehlo=1 commands=1/1 first_refused="- 421 4.4.2 Timeout: closing connection"')

        # too many errors: the first error is first_refused, the 421 closed_by
        c = Smtp(d.port)
        c.expect("EHLO client.example", 250)
        c.expect("FOO", 500)
        c.send("BAR\r\n")
        assert [r.code for r in c.rest_until_closed()] == [500, 421]
        c.close()
        n += 1
        d.wait_log_count("event=disconnect", n)
        check("errors", d.log_lines("event=disconnect")[-1],
              ' ehlo=1 unknown=0/2 commands=1/3 first_refused="unknown 500 5.5.2 Command'
              ' unrecognized" closed_by="421 4.7.0 Too many errors: closing"')

        # too many junk commands
        c = Smtp(d.port)
        c.expect("EHLO client.example", 250)
        c.expect("NOOP", 250)
        c.expect("NOOP", 250)
        c.send("NOOP\r\n")
        assert [r.code for r in c.rest_until_closed()] == [250, 421]
        c.close()
        n += 1
        d.wait_log_count("event=disconnect", n)
        check("junk", d.log_lines("event=disconnect")[-1],
              ' ehlo=1 noop=3 commands=4/4 first_refused="- 421 4.7.0 Too many commands'
              ' without mail: closing"')

        # a stop
        c = Smtp(d.port)
        c.expect("EHLO client.example", 250)
        d.stop_clean()
        assert [r.code for r in c.rest_until_closed()] == [421]
        c.close()
        check("stop", d.log_lines("event=disconnect")[-1],
              ' ehlo=1 commands=1/1 first_refused="- 421 4.3.2 Service shutting down: try'
              ' again later"')
        assert not problems, "\n".join(problems)


if __name__ == "__main__":
    main([
        test_client_gone_mid_transaction_is_logged,
        test_cut_at_every_point_stores_only_whole_messages,
        test_rcpt_between_bdat_chunks_refused,
        test_disconnect_line_says_why_a_client_got_nowhere,
        test_stop_with_transactions_open_says_what_it_dropped,
        test_stop_tells_a_client_in_its_envelope_421,
        test_stop_answers_a_message_whose_commit_is_pending,
        test_drain_timeout_with_a_commit_pending_logs_it_queued,
        test_a_spool_that_never_answers_cannot_hold_the_stop,
        test_a_stop_stuck_after_the_delivery_log_is_given_up_too,
        test_a_stop_stuck_is_given_up_at_its_real_bound,
        test_a_client_that_does_not_read_leaves_the_drain_sealed,
        test_a_client_that_does_not_read_is_closed_within_the_drain,
        test_pipelined_auth_decides_the_commands_behind_it,
        test_auth_before_starttls_is_forgotten_after_it,
        test_junk_commands_end_a_session_that_moves_no_mail,
        test_ehlo_loop_counts_as_junk,
        test_refused_auth_starttls_and_commands_outside_a_transaction_count_as_junk,
        test_client_hello_pipelined_with_starttls_is_closed_at_once,
        test_esmtp_after_helo_refused,
        test_bad_parameter_values_after_helo_refused_as_parameters,
        test_disconnect_line_names_refusals_outside_commands,
        test_disconnect_line_names_refusals_that_answer_no_command,
    ])
