"""Out-of-band feedback (engine/oob.h): VERP senders and the bounce listener.

sluice relays to a receiving MX on loopback (Postfix's smtp-sink; dnsmasq
for the MX records) with [bounce] verp_domain set, and listens for bounces
on its [bounce] listen port. Bounces and complaints are the fixtures of
tests/fixtures/feedback (Postfix, Exim, Exchange DSNs and NDRs, a Yahoo ARF
report, auto-replies) made to point at what sluice really sent (the VERP
address seen at the sink, the recipient), and sent with smtplib as the
reporting MTA would. A Postfix instance bouncing for real is in
test_postfix_bounces.py.

Checks: the VERP sender on the wire, one per recipient; a DSN yields an
oob_bounce event with the original's queue id, recipient and class; an ARF
report yields a complaint; forged and altered tokens, other domains and
AUTH are refused at the listener (never a relay); a token for a message
too old is logged and dropped; an auto-reply is ignored; malformed MIME
gets a clean reply; oversize messages and silent clients meet the same
limits as on the submission port; the listener's connections are capped
by [bounce] max_clients, apart from the submission port's, and per
address by [bounce] max_clients_per_ip."""
import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time

from harness import WAIT, Smtp, extra_env, free_port, log_fields, main, stats_ask, wait_until
from test_delivery import Relay, records_for

KEY = b"0123456789abcdef0123456789abcdef-oob-test"
FIXTURES = os.path.join(sys.argv[2], "tests", "fixtures", "feedback")
FIXTURE_VERP = "bounce-aeaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@bounces.example.com"
EPOCH_MS = 1704067200000


def token(msg_id, index, rcpt, tenant=b""):
    """feedback/verp.c's token, made here to test what the listener does
    with valid tokens it never issued (a message too old)."""
    tag = hmac.new(KEY, b"sluice-verp-rcpt" + rcpt.lower().encode(), hashlib.sha256).digest()[:4]
    raw = bytes([1]) + msg_id.to_bytes(8, "big") + index.to_bytes(2, "big") + tag
    raw += bytes([len(tenant)]) + tenant
    raw += hmac.new(KEY, b"sluice-verp" + raw, hashlib.sha256).digest()[:10]
    return base64.b32encode(raw).decode().rstrip("=").lower()


def crlf(text):
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def fixture(name, **subst):
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        text = f.read()
    for old, new in subst.items():
        text = text.replace(old, new)
    return text


class Feedback:
    """A relay with VERP on and a bounce listener."""

    def __init__(self, server_extra=""):
        self.bport = free_port()
        self.r = None
        self.keydir = tempfile.mkdtemp(prefix="sluice-oob-key-")
        keyfile = os.path.join(self.keydir, "verp.key")
        with open(keyfile, "wb") as f:
            f.write(KEY + b"\n")
        try:
            self.r = Relay(records_for(["d1.test", "d2.test"]), domain_conf=f"""
[log]
delivery_log = @DLOG@
delivery_log_flush = 10ms
[stats]
socket = {self.keydir}/stats.sock
[bounce]
listen = 127.0.0.1:{self.bport}
verp_domain = bounces.test
domains = bounces.test, fbl.test
verp_key_file = {keyfile}
{server_extra}
""")
        except BaseException:
            shutil.rmtree(self.keydir, ignore_errors=True)
            raise

    def close(self):
        try:
            if self.r is not None:
                self.r.close()
        finally:
            shutil.rmtree(self.keydir, ignore_errors=True)

    def stats(self):
        return stats_ask(os.path.join(self.keydir, "stats.sock"))["counters"]

    def events(self, kind=None):
        out = []
        try:
            with open(self.r.dlog, encoding="utf-8") as f:
                for line in f:
                    ev = json.loads(line)
                    if kind is None or ev["event"] == kind:
                        out.append(ev)
        except FileNotFoundError:
            pass
        return out

    def wait_events(self, kind, n, timeout=20):
        wait_until(lambda: len(self.events(kind)) >= n, timeout, f"{n} {kind} events")
        return self.events(kind)

    def send_mail(self, rcpts, sender="news@shop.test"):
        """Inject one message; returns its queue id and the VERP sender each
        recipient's copy carried at the sink."""
        before = len(self.r.sink.files())
        body = (b"From: Shop <news@shop.test>\r\nTo: reader\r\nSubject: offers\r\n"
                b"Message-ID: <m%d@shop.test>\r\n\r\nOffers.\r\n" % time.monotonic_ns())
        self.r.inject([(sender, rcpts, body)], sessions=1)
        # whole at the sink once sluice logged them delivered
        wait_until(lambda: len(self.r.sink.files()) >= before + len(rcpts) and
                   len([e for e in self.events("delivery") if e["rcpt"] in rcpts]) >= len(rcpts),
                   60, "the copies at the sink")
        rec = self.wait_events("reception", 1)[-1]
        verp = {}
        for m in self.r.sink.messages():
            head = m.split(b"\n\n", 1)[0].decode(errors="replace")
            mail = re.search(r"^X-Mail-Args: <([^>]*)>", head, re.M)
            rcpt = re.search(r"^X-Rcpt-Args: <([^>]*)>", head, re.M)
            if mail and rcpt and rcpt.group(1) in rcpts and m.find(b"Message-ID") >= 0:
                verp[rcpt.group(1)] = mail.group(1)
        return rec["id"], verp

    def bounce(self, sender, rcpts, text):
        """Send text to the bounce listener as a reporting MTA would."""
        with smtplib.SMTP("127.0.0.1", self.bport, timeout=20) as s:
            s.ehlo("mx.reporter.test")
            return s.sendmail(sender, rcpts, crlf(text))


def test_verp_dsn_complaint():
    f = Feedback()
    try:
        d = f.r.d
        qid, verp = f.send_mail(["alice@d1.test", "bob@d1.test", "carol@d2.test"])
        # one transaction per recipient, each with its own sender, never the injected one
        assert set(verp) == {"alice@d1.test", "bob@d1.test", "carol@d2.test"}, verp
        assert len(set(verp.values())) == 3, verp
        for a in verp.values():
            assert re.fullmatch(r"bounce-[a-z2-7]{42,55}@bounces\.test", a), a
            assert len(a.split("@")[0]) <= 64
        # Postfix's DSN for alice, to alice's VERP address
        dsn = fixture("postfix-dsn.eml", **{FIXTURE_VERP: verp["alice@d1.test"],
                                           "nobody@example.net": "alice@d1.test"})
        assert f.bounce("", [verp["alice@d1.test"]], dsn) == {}
        ev = f.wait_events("oob_bounce", 1)[0]
        assert ev["id"] == qid, (ev, qid)
        assert ev["rcpt"] == "alice@d1.test", ev
        assert ev["rcpt_index"] == 0, ev
        assert ev["class"] == "invalid_recipient", ev
        assert ev["enhanced"] == "5.1.1" and ev["code"] == 550, ev
        assert ev["verified"] is True and ev["report"] == "dsn", ev
        assert ev["reporter"] == "mx.example.net", ev
        # Exim's text bounce for bob, to bob's address
        exim = fixture("exim-bounce.eml", **{FIXTURE_VERP: verp["bob@d1.test"],
                                            "gone@example.org": "bob@d1.test"})
        f.bounce("", [verp["bob@d1.test"]], exim)
        evs = f.wait_events("oob_bounce", 2)
        ev = [e for e in evs if e.get("rcpt") == "bob@d1.test"][0]
        assert ev["id"] == qid and ev["rcpt_index"] == 1 and ev["report"] == "bounce", ev
        assert ev["class"] == "invalid_recipient" and ev["verified"] is True, ev
        # An ARF complaint about carol, to the feedback-loop address: the
        # token comes from the report (Original-Mail-From, Return-Path)
        arf = fixture("arf-yahoo.eml", **{FIXTURE_VERP: verp["carol@d2.test"],
                                          "happy.reader@yahoo.com": "carol@d2.test",
                                          "fbl@bounces.example.com": "fbl@fbl.test"})
        f.bounce("feedback@arf.mail.yahoo.test", ["fbl@fbl.test"], arf)
        ev = f.wait_events("complaint", 1)[0]
        assert ev["id"] == qid and ev["rcpt"] == "carol@d2.test", ev
        assert ev["rcpt_index"] == 2 and ev["feedback_type"] == "abuse", ev
        assert ev["verified"] is True and ev["campaign"] == "december-offers", ev
        # A DSN naming another address than the token's: logged, unverified
        other = fixture("postfix-dsn.eml", **{FIXTURE_VERP: verp["alice@d1.test"],
                                             "nobody@example.net": "mallory@d1.test"})
        f.bounce("", [verp["alice@d1.test"]], other)
        evs = f.wait_events("oob_bounce", 3)
        ev = [e for e in evs if e.get("rcpt") == "mallory@d1.test"][0]
        assert ev["verified"] is False, ev
        # nothing of it was queued: the sink got the three copies only
        assert len(f.r.sink.files()) == 3
        d.wait_log_count("event=oob_received", 4)
        st = f.stats()
        assert st["oob_messages"] == 4 and st["oob_events"] == 4, st
        assert st["oob_dropped"] == 0 and st["oob_refused"] == 0, st
    finally:
        f.close()


def test_bounce_events_stored_before_the_250():
    """With an event sink the bounce listener's events are committed to
    the spool before its 250, as a message is: a kill -9 the moment the
    250 arrives, then a restart, and every report's event still reaches
    the sink. Before, the 250 went out once the events were in memory,
    and a kill -9 then lost them: the reporting MTA, answered 250, never
    sends again, and the backend never learnt of the bounce."""
    import test_delivery
    from harness import Sluice
    from test_events import Receiver, hook_conf
    rec = Receiver()
    f = Feedback(server_extra=hook_conf(rec.port))
    try:
        qid, verp = f.send_mail(["alice@d1.test"])
        dsn = fixture("postfix-dsn.eml", **{FIXTURE_VERP: verp["alice@d1.test"],
                                           "nobody@example.net": "alice@d1.test"})
        conf = os.path.join(f.r.wd.path, "sluice.conf")
        rounds = 5
        for _ in range(rounds):
            s = smtplib.SMTP("127.0.0.1", f.bport, timeout=20)
            s.ehlo("mx.reporter.test")
            assert s.sendmail("", [verp["alice@d1.test"]], crlf(dsn)) == {}
            f.r.d.kill9()  # at once: not even the QUIT
            s.close()
            f.r.d = Sluice(test_delivery.SLUICE, conf)
            f.r.d.wait_log("event=ready")

        def bounces():
            with rec.lock:
                return [e for e in rec.events.values() if e["event"] == "oob_bounce"]
        try:
            wait_until(lambda: len(bounces()) >= rounds, 60,
                       f"{rounds} oob_bounce events at the sink")
        finally:
            print(f"     {len(bounces())} of {rounds} reports' events at the sink")
        assert all(e["id"] == qid and e["rcpt"] == "alice@d1.test" for e in bounces())
    finally:
        f.close()
        rec.stop()


def test_report_answered_451_is_told_once():
    """A report whose commit fails (the spool's disk fails its writes:
    the fail-writes shim, argv[3]) is answered 451 and has logged,
    counted and suppressed nothing; the reporter sends it again once the
    disk is back, and it is told once: one oob_bounce and oob_received
    line, one event at the sink and in the delivery log, the entry added
    once. Before, the log lines and the entry were made before the
    commit, and the report sent again made them a second time."""
    from test_events import Receiver, hook_conf
    shim = sys.argv[3] if len(sys.argv) > 3 else None
    if shim is None or not os.path.exists(shim):
        print("     no fail-writes shim (argv[3]): not run")
        return
    from harness import Sluice, preload
    rec = Receiver()
    trigger = tempfile.mktemp(prefix="sluice-fail-writes-")
    # the shim (after a sanitizer's runtime) in sluice only, not dnsmasq
    env = {"LD_PRELOAD": preload(sluice_binary(), shim), "FAIL_WRITES_PATH": "/spool/data.mdb",
           "FAIL_WRITES_TRIGGER": trigger}
    f = Feedback(server_extra=hook_conf(rec.port) + "[suppress]\non_invalid_recipient = 30d\n")
    sock = os.path.join(f.keydir, "stats.sock")
    try:
        assert f.r.d.stop_clean() == 0
        with extra_env(env):
            f.r.d = Sluice(sluice_binary(), os.path.join(f.r.wd.path, "sluice.conf"))
        d = f.r.d
        d.wait_log("event=ready")
        _, verp = f.send_mail(["alice@d1.test"])
        dsn = fixture("postfix-dsn.eml", **{FIXTURE_VERP: verp["alice@d1.test"],
                                           "nobody@example.net": "alice@d1.test"})
        open(trigger, "w").close()
        try:
            with smtplib.SMTP("127.0.0.1", f.bport, timeout=20) as s:
                s.ehlo("mx.reporter.test")
                try:
                    s.sendmail("", [verp["alice@d1.test"]], crlf(dsn))
                    raise AssertionError("the report was taken on a failing disk")
                except smtplib.SMTPDataError as e:
                    assert e.smtp_code == 451, e
        finally:
            os.unlink(trigger)
        # the 451 may reach the reporter before the worker's batch of
        # log lines is written (at the end of its turn)
        d.wait_log_count("event=oob_commit_failed", 1)
        assert d.count_log("event=oob_commit_failed") == 1
        assert d.count_log("event=oob_bounce ") == 0
        assert d.count_log("event=oob_received") == 0
        assert f.stats()["oob_messages"] == 0
        # the reporter's retry
        assert f.bounce("", [verp["alice@d1.test"]], dsn) == {}
        f.wait_events("oob_bounce", 1)
        wait_until(lambda: stats_ask(sock)["suppress"]["added"] >= 1, 15, "the entry")

        def at_sink():
            with rec.lock:
                return [e for e in rec.events.values() if e["event"] == "oob_bounce"]
        wait_until(lambda: len(at_sink()) >= 1, 30, "the sink's event")
        assert stats_ask(sock)["suppress"]["added"] == 1
        assert f.r.d.stop_clean() == 0
        assert d.count_log("event=oob_bounce ") == 1, d.log_lines("event=oob_bounce ")
        assert d.count_log("event=oob_received") == 1
        assert len(f.events("oob_bounce")) == 1
        assert len(at_sink()) == 1, at_sink()
    finally:
        f.close()
        rec.stop()
        if os.path.exists(trigger):
            os.unlink(trigger)


def test_report_answered_after_the_loop_ended_is_logged_so():
    """SIGTERM while a report's commit is pending, and drain_timeout (1 s)
    runs out before the spool answers (SLUICE_TEST_COMMIT_DELAY holds
    each answer 3 s): the stop waits for that commit, the report is stored
    (its entry is on the list at the next start), and its oob_received
    line, logged once the commit returned, says unanswered=stopping, as a
    message's event=queued does: the reporter got no 250 and sends the
    report again. Before, the line was logged before the commit, as if
    the report had been answered."""
    import signal
    import test_delivery
    from harness import Sluice
    from test_body import read_reply
    f = Feedback(server_extra="[suppress]\non_invalid_recipient = 30d\n")
    sock = os.path.join(f.keydir, "stats.sock")
    cfg = os.path.join(f.r.wd.path, "sluice.conf")
    try:
        _, verp = f.send_mail(["alice@d1.test"])
        dsn = crlf(fixture("postfix-dsn.eml", **{FIXTURE_VERP: verp["alice@d1.test"],
                                                "nobody@example.net": "alice@d1.test"}))
        assert f.r.d.stop_clean() == 0
        with open(cfg) as fh:
            text = fh.read()
        with open(cfg, "w") as fh:
            fh.write(text.replace("[server]\n", "[server]\ndrain_timeout = 1s\n", 1))
        os.environ["SLUICE_TEST_COMMIT_DELAY"] = "3000"
        try:
            f.r.d = Sluice(test_delivery.SLUICE, cfg)
        finally:
            os.environ.pop("SLUICE_TEST_COMMIT_DELAY", None)
        d = f.r.d
        d.wait_log("event=ready")
        s = socket.create_connection(("127.0.0.1", f.bport), timeout=30)
        r = s.makefile("rb")
        try:
            assert read_reply(r).startswith(b"220")
            s.sendall(b"EHLO mx.reporter.test\r\n")
            assert read_reply(r).startswith(b"250")
            s.sendall(b"MAIL FROM:<>\r\nRCPT TO:<%s>\r\nDATA\r\n" %
                      verp["alice@d1.test"].encode())
            for want in (b"250", b"250", b"354"):
                assert read_reply(r).startswith(want)
            s.sendall(dsn.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            d.wait_log("event=commit_held")  # the report is with the spool
            d.proc.send_signal(signal.SIGTERM)
            d.wait_log("event=drain_timed_out")
            assert d.proc.wait(30) == 0
        finally:
            r.close()
            s.close()
        lines = d.log_lines("event=oob_received")
        assert len(lines) == 1 and "unanswered=stopping" in lines[0], lines
        assert d.count_log("event=oob_bounce ") == 1
        f.r.d = Sluice(test_delivery.SLUICE, cfg)
        f.r.d.wait_log("event=ready")
        ctl = os.environ.get("SLUICECTL") or os.path.normpath(os.path.join(
            os.path.dirname(os.path.abspath(test_delivery.SLUICE)), "..", "tools", "sluicectl"))
        p = subprocess.run([ctl, "-s", sock, "--json",
                            "suppress", "check", "alice@d1.test"],
                           capture_output=True, text=True, timeout=30)
        assert json.loads(p.stdout)["suppressed"], p.stdout
        assert f.r.d.stop_clean() == 0
    finally:
        f.close()


def test_report_cut_off_by_a_stop_is_logged_unanswered():
    """A report whose commit the spool does not answer (its disk stalls:
    the fail-writes shim in stall mode, argv[3]) when a stop comes: the
    stop waits for it 30 s (SERVER_STOP_COMMIT_WAIT_MS), then logs
    event=commit_unanswered report=dsn (no message id: a report has none)
    and event=stop_commit_wait_cut pending=1, and the reporter gets no
    250. Once the disk answers, the stop ends, and the report was stored:
    its entry is on the list at the next start. One worker: the stop
    frees a worker's server (this wait) before its delivery, whose own
    wait for the spool ends at the same bound (with a second worker, that
    worker's report would be waited for only what is left of it)."""
    import signal
    from harness import Sluice, preload
    from test_body import read_reply
    shim = sys.argv[3] if len(sys.argv) > 3 else None
    if shim is None or not os.path.exists(shim):
        print("     no fail-writes shim (argv[3]): not run")
        return
    trigger = tempfile.mktemp(prefix="sluice-stall-")
    # the session and port of a commit cut off stay allocated until the
    # exit (server.c, stop_commits_wait): no leak report under ASan
    asan = os.environ.get("ASAN_OPTIONS")
    env = {"LD_PRELOAD": preload(sluice_binary(), shim), "FAIL_WRITES_PATH": "/spool/data.mdb",
           "FAIL_WRITES_TRIGGER": trigger, "FAIL_WRITES_MODE": "stall",
           "ASAN_OPTIONS": (asan + ":" if asan else "") + "detect_leaks=0"}
    f = Feedback(server_extra="[suppress]\non_invalid_recipient = 30d\n")
    sock = os.path.join(f.keydir, "stats.sock")
    cfg = os.path.join(f.r.wd.path, "sluice.conf")
    ctl = os.environ.get("SLUICECTL") or os.path.normpath(os.path.join(
        os.path.dirname(os.path.abspath(sluice_binary())), "..", "tools", "sluicectl"))
    s = None
    try:
        _, verp = f.send_mail(["alice@d1.test"])
        dsn = crlf(fixture("postfix-dsn.eml", **{FIXTURE_VERP: verp["alice@d1.test"],
                                                "nobody@example.net": "alice@d1.test"}))
        assert f.r.d.stop_clean() == 0
        with open(cfg) as fh:
            text = fh.read()
        text = text.replace("[server]\n", "[server]\ndrain_timeout = 1s\n", 1)
        with open(cfg, "w") as fh:
            fh.write(text.replace("\nworkers = 2\n", "\nworkers = 1\n", 1))
        with extra_env(env):
            f.r.d = Sluice(sluice_binary(), cfg)
        d = f.r.d
        d.wait_log("event=ready")
        s = socket.create_connection(("127.0.0.1", f.bport), timeout=60)
        r = s.makefile("rb")
        assert read_reply(r).startswith(b"220")
        s.sendall(b"EHLO mx.reporter.test\r\n")
        assert read_reply(r).startswith(b"250")
        s.sendall(b"MAIL FROM:<>\r\nRCPT TO:<%s>\r\nDATA\r\n" %
                  verp["alice@d1.test"].encode())
        for want in (b"250", b"250", b"354"):
            assert read_reply(r).startswith(want)
        open(trigger, "w").close()  # the spool's disk stops answering
        s.sendall(dsn.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        wait_until(lambda: os.path.exists(trigger + ".held"), 30, "the report's commit held")
        d.proc.send_signal(signal.SIGTERM)
        d.wait_log("event=stop_commit_wait_cut", timeout=60)
        cut = d.log_lines("event=commit_unanswered")
        assert len(cut) == 1 and "report=dsn" in cut[0] and " id=" not in cut[0], cut
        assert "pending=1" in d.log_lines("event=stop_commit_wait_cut")[0]
        os.unlink(trigger)  # the disk answers: the stop goes on
        rc = d.proc.wait(60)
        assert rc == 0, (rc, d.lines[-20:])
        r.close()
        got = s.recv(4096)
        assert b"250" not in got, got  # never told stored
        f.r.d = Sluice(sluice_binary(), cfg)
        f.r.d.wait_log("event=ready")
        p = subprocess.run([ctl, "-s", sock, "--json", "suppress", "check", "alice@d1.test"],
                           capture_output=True, text=True, timeout=30)
        assert json.loads(p.stdout)["suppressed"], p.stdout
        assert f.r.d.stop_clean() == 0
    finally:
        if s is not None:
            s.close()
        for path in (trigger, trigger + ".held"):  # first: the stop may need the disk
            if os.path.exists(path):
                os.unlink(path)
        f.close()


def sluice_binary():
    import test_delivery
    return test_delivery.SLUICE


def test_complaint_in_another_case_suppresses_the_recipient():
    """A complaint whose report names the recipient in another case than
    it was sent to (Carol@D2.test for carol@d2.test: Microsoft's reports
    without Original-Rcpt-To fall back to the To: header), verified by its
    VERP token, which proves the address only up to case: the recipient
    as sent is refused at RCPT from then on. Before, the entry was stored
    as Carol@d2.test, and carol@d2.test was still mailed."""
    f = Feedback()
    try:
        _, verp = f.send_mail(["carol@d2.test"])
        arf = fixture("arf-yahoo.eml", **{FIXTURE_VERP: verp["carol@d2.test"],
                                          "happy.reader@yahoo.com": "Carol@D2.test",
                                          "fbl@bounces.example.com": "fbl@fbl.test"})
        f.bounce("feedback@arf.mail.yahoo.test", ["fbl@fbl.test"], arf)
        ev = f.wait_events("complaint", 1)[0]
        assert ev["verified"] is True and ev["rcpt"] == "Carol@D2.test", ev

        def refused():
            # the list's writer thread commits the entry: polled, bounded
            with smtplib.SMTP("127.0.0.1", f.r.port, timeout=10) as s:
                s.ehlo("client.test")
                s.mail("news@shop.test")
                code, _ = s.rcpt("carol@d2.test")
                s.rset()
                return code >= 500
        wait_until(refused, 20, "RCPT TO:<carol@d2.test> refused after the complaint")
    finally:
        f.close()


def test_refusals():
    f = Feedback()
    try:
        d = f.r.d
        c = Smtp(f.bport)
        c.expect("EHLO relay.attacker.test", 250)
        ehlo = c.cmd("EHLO relay.attacker.test")
        assert "AUTH" not in ehlo.text, ehlo.text
        c.expect("AUTH PLAIN AGZvbwBiYXI=", 503)
        c.expect("MAIL FROM:<spammer@attacker.test>", 250)
        # relay attempts: other domains, the relay's own delivery domains
        for rcpt in ("victim@example.com", "alice@d1.test", "bounce-x@example.com",
                     "someone@bounces.test", "postmaster@sub.bounces.test"):
            r = c.cmd(f"RCPT TO:<{rcpt}>")
            assert r.code == 550 and "5.7.1" in r.text, (rcpt, r)
        # forged tokens: junk, a well-formed token under another key, one
        # character changed in a real one
        qid, verp = f.send_mail(["dave@d1.test"])
        real = verp["dave@d1.test"]
        local = real.split("@")[0]
        flip = local[:-1] + ("a" if local[-1] != "a" else "b")
        other_key = base64.b32encode(b"\x01" + bytes(31)).decode().rstrip("=").lower()
        for forged in ("bounce-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", flip, "bounce-" + other_key,
                       "bounce-"):
            r = c.cmd(f"RCPT TO:<{forged}@bounces.test>")
            assert r.code == 550 and "5.7.1" in r.text, (forged, r)
        d.wait_log_count("reason=forged_token", 3)  # (the log is read by another thread)
        c.expect("DATA", 554)  # no recipient was accepted
        # the real one, postmaster and the FBL address are accepted
        c.expect(f"RCPT TO:<{real.upper()}>", 250)  # folded to upper case on the way
        c.expect("RCPT TO:<postmaster@bounces.test>", 250)
        c.expect("RCPT TO:<Postmaster>", 250)
        c.expect("RCPT TO:<abuse@fbl.test>", 250)
        c.expect("QUIT", 221)
        c.close()
        # A valid token (made with the key) for a message 60 days old:
        # logged and dropped, no event
        old = ((int(time.time() * 1000) - 60 * 86400 * 1000 - EPOCH_MS) << 22) | 7
        stale = f"bounce-{token(old, 0, 'eve@d1.test')}@bounces.test"
        dsn = fixture("postfix-dsn.eml", **{FIXTURE_VERP: stale,
                                           "nobody@example.net": "eve@d1.test"})
        f.bounce("", [stale], dsn)
        d.wait_log("reason=stale_token")
        # a report to postmaster that carries no token of ours: dropped
        dsn = fixture("postfix-dsn.eml", **{FIXTURE_VERP: "someone@elsewhere.test"})
        f.bounce("", ["postmaster@bounces.test"], dsn)
        d.wait_log("reason=no_token")
        assert f.events("oob_bounce") == [], f.events("oob_bounce")
        st = f.stats()
        assert st["oob_refused"] == 9 and st["oob_dropped"] == 2, st  # 5 relays, 4 forged
        assert st["oob_events"] == 0, st
    finally:
        f.close()


def test_autoreply_and_malformed():
    f = Feedback()
    try:
        d = f.r.d
        qid, verp = f.send_mail(["frank@d1.test"])
        addr = verp["frank@d1.test"]
        for name in ("autoreply-vacation.eml", "autoreply-outlook.eml"):
            f.bounce("jane@example.net", [addr], fixture(name, **{FIXTURE_VERP: addr}))
        d.wait_log_count("reason=autoreply", 2)
        # Malformed MIME: a report with no boundary parameter, nesting far
        # past the limit, an endless base64 part, a header with no end
        bad = [
            "Content-Type: multipart/report; report-type=delivery-status\r\n\r\n--x\r\n"
            "Content-Type: message/delivery-status\r\n\r\nFinal-Recipient: rfc822;\r\n",
            "Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + "".join(
                f"--b{i}\r\nContent-Type: multipart/mixed; boundary=b{i + 1}\r\n\r\n"
                for i in range(300)),
            "From: MAILER-DAEMON@x\r\nSubject: Undeliverable\r\nContent-Type: text/plain\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n" + ("!!!!====\r\n" * 5000),
            "Subject: " + "x" * 900 + "\r\n" + ("\tfold\r\n" * 2000),
            "Content-Type: multipart/report; boundary=\"\"\r\n\r\n--\r\n--\r\n\r\n",
        ]
        for text in bad:
            with smtplib.SMTP("127.0.0.1", f.bport, timeout=20) as s:
                s.ehlo("mx.reporter.test")
                s.mail("")
                s.rcpt(addr)
                code, msg = s.data(crlf(text))
                assert code == 250, (code, msg)
        assert f.events("oob_bounce") == [] and f.events("complaint") == []
        # still serving
        c = Smtp(f.bport)
        c.expect("EHLO again.test", 250)
        c.close()
    finally:
        f.close()


def test_limits():
    """The [server] limits hold at the listener: size (declared and sent)
    and the command deadline."""
    f = Feedback(server_extra="[server]\nmax_message_size = 100K\ntimeout_command = 2s\n")
    try:
        d = f.r.d
        qid, verp = f.send_mail(["gina@d1.test"])
        addr = verp["gina@d1.test"]
        c = Smtp(f.bport)
        c.expect("EHLO big.test", 250)
        c.expect("MAIL FROM:<> SIZE=200000", 552)
        c.expect("MAIL FROM:<>", 250)
        c.expect(f"RCPT TO:<{addr}>", 250)
        c.expect("DATA", 354)
        c.send(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 200 + b".\r\n")
        r = c.reply()
        assert r.code == 552, r
        c.close()
        assert d.count_log("event=oob_received") == 0
        # a client that goes silent is closed at the deadline
        s = socket.create_connection(("127.0.0.1", f.bport), timeout=10)
        s.settimeout(10)
        assert s.recv(512).startswith(b"220")
        t0 = time.monotonic()
        got = b""
        while True:
            chunk = s.recv(512)
            if not chunk:
                break
            got += chunk
        s.close()
        assert got.startswith(b"421"), got
        assert time.monotonic() - t0 < 9
    finally:
        f.close()


def test_refused_recipients_count_as_errors():
    """Each recipient the listener refuses (a forged token, an address
    that is not a bounce address) counts toward [server] max_errors, as
    Postfix's hard error limit counts refused RCPTs: a client trying
    tokens or addresses one after another is closed with 421, and each
    try no longer costs an HMAC and a log line without end."""
    f = Feedback(server_extra="[server]\nmax_errors = 5\n")
    try:
        d = f.r.d
        s = socket.create_connection(("127.0.0.1", f.bport), timeout=10)
        s.settimeout(10)
        assert s.recv(512).startswith(b"220")
        tries = b"".join(b"RCPT TO:<bounce-%052d@bounces.test>\r\n" % i if i % 2 else
                         b"RCPT TO:<user%d@elsewhere.test>\r\n" % i for i in range(40))
        s.sendall(b"EHLO prober.test\r\nMAIL FROM:<>\r\n" + tries + b"QUIT\r\n")
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        s.close()
        codes = [ln[:3] for ln in got.split(b"\r\n") if ln[:3].isdigit() and ln[3:4] == b" "]
        assert codes == [b"250", b"250"] + [b"550"] * 5 + [b"421"], got[-300:]
        d.wait_log("event=too_many_errors")
        assert d.count_log("event=oob_rcpt_refused") == 5
        # a reporting MTA's bounce in a session of its own is served
        c = Smtp(f.bport)
        c.expect("EHLO mx.reporter.test", 250)
        c.expect("MAIL FROM:<>", 250)
        c.expect("RCPT TO:<postmaster@bounces.test>", 250)
        c.expect("QUIT", 221)
        c.close()
    finally:
        f.close()


def test_connection_caps_apart():
    """The bounce listener's connections count against [bounce]
    max_clients, not [server] max_clients: remote MXs holding every slot
    of the listener leave the submission port all of its own."""
    f = Feedback(server_extra="max_clients = 3\n[server]\nmax_clients = 4\n")
    held = []
    try:
        def greeting(port):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(s)
            line = s.makefile("rb").readline()
            return line
        for _ in range(3):
            assert greeting(f.bport).startswith(b"220"), "bounce listener"
        assert greeting(f.bport).startswith(b"421 4.7.0"), "4th at the bounce listener"
        for i in range(4):
            line = greeting(f.r.port)
            assert line.startswith(b"220"), f"submission connection {i + 1}: {line!r}"
        assert greeting(f.r.port).startswith(b"421 4.7.0"), "5th at submission"
    finally:
        for s in held:
            s.close()
        f.close()


def test_per_address_cap_at_the_listener():
    """[bounce] max_clients_per_ip caps the listener's connections from one
    address (Postfix's smtpd_client_connection_count_limit): one address
    trickling bytes cannot hold every slot of a listener open to anyone.
    Past it 421 4.7.0; a slot given back is taken again; the submission
    port, under [server] max_clients_per_ip, still takes that address."""
    f = Feedback(server_extra="max_clients_per_ip = 2\n")
    held = []
    try:
        def greeting(port):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(s)
            return s.makefile("rb").readline()
        for _ in range(2):
            assert greeting(f.bport).startswith(b"220"), "bounce listener"
        assert greeting(f.bport).startswith(b"421 4.7.0"), "3rd from one address"
        held.pop().close()
        held.pop(0).close()  # one of the two: sluice sees it close a moment later

        def retaken():
            if greeting(f.bport).startswith(b"220"):
                return True
            held.pop().close()
            return False
        wait_until(retaken, WAIT, "a slot given back to be taken again")
        line = greeting(f.r.port)
        assert line.startswith(b"220"), f"submission from the same address: {line!r}"
        f.r.d.wait_log("role=bounce refused=limit")  # the reader thread may lag the socket
    finally:
        for s in held:
            s.close()
        f.close()


def test_tenant_from_auth_user():
    """The tenant of the message (here the AUTH user's tenant=, as stored
    in the spool) is carried in the token and given back in the event (a
    name too long for the token goes as its keyed tag, found again among
    the [tenant] sections)."""
    from test_auth import crypt
    keydir = tempfile.mkdtemp(prefix="sluice-oob-users-")
    users = os.path.join(keydir, "users")
    h = crypt("secret", "$6$rounds=5000$")
    with open(users, "w") as fh:
        fh.write(f"app1:{h}:tenant=shop1\napp2:{h}:tenant=verylongtenantname\n")
    f = Feedback(server_extra=f"[server]\nauth_users_file = {users}\nplaintext_auth = loopback\n"
                 "[source 127.0.0.1]\n[pool main]\nsources = 127.0.0.1\n"
                 "[tenant shop1]\npools = main\n[tenant verylongtenantname]\npools = main\n")
    try:
        got = {}
        for user, rcpt in (("app1", "ivy@d1.test"), ("app2", "jack@d1.test")):
            with smtplib.SMTP("127.0.0.1", f.r.port, timeout=30) as s:
                s.ehlo("app.test")
                s.login(user, "secret")
                s.sendmail("news@shop.test", [rcpt], b"Subject: t\r\n\r\nx\r\n")
        wait_until(lambda: len(f.events("delivery")) >= 2, 60, "two deliveries")
        for m in f.r.sink.messages():
            head = m.split(b"\n\n", 1)[0].decode(errors="replace")
            mail = re.search(r"^X-Mail-Args: <([^>]*)>", head, re.M).group(1)
            rcpt = re.search(r"^X-Rcpt-Args: <([^>]*)>", head, re.M).group(1)
            got[rcpt] = mail
        for rcpt in ("ivy@d1.test", "jack@d1.test"):
            dsn = fixture("postfix-dsn.eml", **{FIXTURE_VERP: got[rcpt],
                                               "nobody@example.net": rcpt})
            f.bounce("", [got[rcpt]], dsn)
        evs = {e["rcpt"]: e for e in f.wait_events("oob_bounce", 2)}
        assert evs["ivy@d1.test"]["tenant"] == "shop1", evs
        assert evs["jack@d1.test"]["tenant"] == "verylongtenantname", evs
        assert evs["jack@d1.test"]["verified"] is True, evs
    finally:
        f.close()
        shutil.rmtree(keydir, ignore_errors=True)


def test_client_text_cannot_forge_log_fields():
    """A client's quoted local part (spaces, Unicode spaces, '=', quotes)
    and a remote sender's Message-ID are values in their log lines, never
    keys: the submission port's queued line, the bounce listener's
    oob_received and oob_dropped (detail=, a key passed to log_msg as an
    argument)."""
    f = Feedback()
    try:
        d = f.r.d
        forged = '"x user=root event=auth_ok"@example.com'
        c = Smtp(f.r.port)
        c.expect("EHLO client.test", 250)
        c.expect(f"MAIL FROM:<{forged}>", 250)
        c.expect("RCPT TO:<r@d1.test>", 250)
        c.expect("DATA", 354)
        c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        assert c.reply().code == 250
        # the same with Unicode spaces (SMTPUTF8), as a reader that splits
        # on any white space sees them
        c.send('MAIL FROM:<"y\u2003user=root\u00a0event=auth_ok"@example.com> SMTPUTF8\r\n'
               .encode())
        assert c.reply().code == 250
        c.expect("RCPT TO:<r2@d1.test>", 250)
        c.expect("DATA", 354)
        c.send(b"Subject: y\r\n\r\nbody\r\n.\r\n")
        assert c.reply().code == 250
        c.expect("QUIT", 221)
        c.close()
        # to postmaster with no token of ours: dropped, the original's
        # Message-ID logged as detail=
        msgid = "<a@b> user=root event=auth_ok"
        dsn = fixture("postfix-dsn.eml", **{
            FIXTURE_VERP: "someone@elsewhere.test",
            "<0000018f2a6b1c00.sluice@relay.example.com>": msgid})
        with smtplib.SMTP("127.0.0.1", f.bport, timeout=20) as s:
            s.ehlo("mx.reporter.test")
            s.sendmail(forged, ["postmaster@bounces.test"], crlf(dsn))
        queued, queued_utf8 = d.wait_log_count("event=queued", 2)[:2]
        dropped = d.wait_log("event=oob_dropped")
        received = d.wait_log("event=oob_received")
        for line, keys in (
                (queued_utf8, ["level", "thread", "session", "event", "id", "from", "nrcpt",
                               "size", "body", "user", "client", "tenant", "pool", "campaign",
                               "priority"]),
                (queued, ["level", "thread", "session", "event", "id", "from", "nrcpt", "size",
                          "body", "user", "client", "tenant", "pool", "campaign", "priority"]),
                (dropped, ["level", "thread", "session", "event", "client", "kind", "reason",
                           "detail", "from"]),
                (received, ["level", "thread", "session", "event", "client", "from", "nrcpt",
                            "size", "kind", "events", "suppressed", "dropped"])):
            fields = log_fields(line)
            assert [k for k, _ in fields] == keys, (fields, line)
            vals = dict(fields)
            assert vals["event"] in ("queued", "oob_dropped", "oob_received"), line
            assert vals.get("user", "-") == "-", line
        for line in (queued, queued_utf8):  # no quoted value with a space: split() reads them
            words = [w.split("=", 1) for w in line.split()[1:]]
            assert [w[0] for w in words] == [k for k, _ in log_fields(line)], line
        assert dict(log_fields(dropped))["detail"] == \
            '"<a@b> user=root event=auth_ok"', dropped
        assert dict(log_fields(queued))["from"] == \
            r'<\"x\x20user=root\x20event=auth_ok\"@example.com>', queued
        # an ordinary address stays as it is
        assert "rcpt=<r@d1.test>" in d.wait_log("event=delivered"), d.log_lines("r@d1.test")
    finally:
        f.close()


if __name__ == "__main__":
    main([test_verp_dsn_complaint, test_bounce_events_stored_before_the_250,
          test_report_cut_off_by_a_stop_is_logged_unanswered,
          test_report_answered_451_is_told_once, test_report_answered_after_the_loop_ended_is_logged_so,
          test_complaint_in_another_case_suppresses_the_recipient,
          test_refusals, test_autoreply_and_malformed, test_limits,
          test_refused_recipients_count_as_errors, test_connection_caps_apart,
          test_per_address_cap_at_the_listener,
          test_tenant_from_auth_user, test_client_text_cannot_forge_log_fields])
