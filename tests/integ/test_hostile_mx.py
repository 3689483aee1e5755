"""Outbound delivery against broken and hostile peers on loopback: a
scripted receiving MX (test_delivery.HostileMx) and a scripted DNS server
(ScriptDns below: UDP and TCP on one port, each answer a Python function
of the query). What test_delivery, test_outcomes and the unit tests of
smtp_client and dns/wire assert already is not repeated here; these check
what only the whole relay shows:

- a session that fails (a reply dribbled an octet at a time past its
  deadline) is deferred in bounded time, and its delivery-log event says
  where: MX host, address and the source address it left from;
- replies that make no sense (ahead of their command, a second greeting,
  354 to MAIL) defer the mail, and the log quotes what the server said;
- a close right after the final dot is deferred at every attempt, never
  delivered; replies longer than sluice keeps keep their code (a 250 to
  the dot delivers once, a 550 at RCPT bounces);
- each recipient of one transaction gets its own outcome (delivered,
  deferred, bounced) in the delivery log, and the DSN names only the
  bounced ones;
- a receiver that never reads the body stalls no other domain;
- hostile DNS answers: CNAME loops, a truncated UDP answer whose TCP one
  differs, answers with the wrong ID or question, 500 and 1,000 MX records, MX
  hosts at addresses that are no place to deliver to (0.0.0.0,
  multicast, broadcast, link-local, v4-mapped): each ends in the outcome
  and log line it should, and mail goes only where the real answer says."""
import json
import os
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time

from harness import Sluice, Workdir, free_port, main, mdb_entries, stats_ask, wait_until
import test_delivery
from test_delivery import HostileMx, Relay, _read_until

SLUICE = test_delivery.SLUICE = sys.argv[1]

T_A, T_CNAME, T_MX, T_AAAA = 1, 5, 15, 28


# ---- a scripted DNS server


def name_wire(name):
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def rr(name, rtype, ttl, rdata):
    return name_wire(name) + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def mx_rr(name, pref, host, ttl=300):
    return rr(name, T_MX, ttl, struct.pack("!H", pref) + name_wire(host))


def a_rr(name, addr, ttl=300):
    return rr(name, T_A, ttl, socket.inet_aton(addr))


def aaaa_rr(name, addr, ttl=300):
    return rr(name, T_AAAA, ttl, socket.inet_pton(socket.AF_INET6, addr))


def cname_rr(name, target, ttl=300):
    return rr(name, T_CNAME, ttl, name_wire(target))


class Query:
    def __init__(self, raw):
        self.id, self.flags = struct.unpack("!HH", raw[:4])
        i, labels = 12, []
        while raw[i]:
            labels.append(raw[i + 1:i + 1 + raw[i]])
            i += 1 + raw[i]
        self.qname = b".".join(labels).decode("latin-1").lower()
        self.qtype = struct.unpack("!H", raw[i + 1:i + 3])[0]
        self.question = raw[12:i + 5]

    def reply(self, answers=(), rcode=0, tc=False, qid=None, question=None):
        """A response to this query: answers are rr() bytes."""
        flags = 0x8400 | (self.flags & 0x0100) | rcode | (0x0200 if tc else 0)
        head = struct.pack("!HHHHHH", self.id if qid is None else qid, flags, 1, len(answers),
                           0, 0)
        return head + (self.question if question is None else question) + b"".join(answers)


class ScriptDns:
    """answer(query, tcp) gives the response bytes, a list of them (sent
    in order) or None (no answer)."""

    def __init__(self, answer):
        self.answer = answer
        self.lock = threading.Lock()
        self.asked = []  # (qname, qtype, tcp)
        for _ in range(20):  # a port free for both UDP and TCP
            self.port = free_port(kind=socket.SOCK_DGRAM)
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.udp.bind(("127.0.0.1", self.port))
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        else:
            raise AssertionError("no port free for both UDP and TCP")
        self.tcp.listen(16)
        self.stopping = False
        for f in (self._udp, self._tcp):
            threading.Thread(target=f, daemon=True).start()

    def _respond(self, data, tcp):
        q = Query(data)
        with self.lock:
            self.asked.append((q.qname, q.qtype, tcp))
        out = self.answer(q, tcp)
        return [o for o in (out if isinstance(out, list) else [out]) if o is not None]

    def _udp(self):
        while not self.stopping:
            try:
                data, peer = self.udp.recvfrom(4096)
            except OSError:
                return
            if len(data) >= 12:
                for o in self._respond(data, False):
                    self.udp.sendto(o, peer)

    def _tcp(self):
        while not self.stopping:
            try:
                c, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(c,), daemon=True).start()

    def _tcp_conn(self, c):
        with c:
            f = c.makefile("rb")
            while True:
                h = f.read(2)
                if len(h) < 2:
                    return
                for o in self._respond(f.read(struct.unpack("!H", h)[0]), True):
                    c.sendall(struct.pack("!H", len(o)) + o)

    def count(self, qname, tcp=None):
        with self.lock:
            return len([a for a in self.asked if a[0] == qname and (tcp is None or a[2] == tcp)])

    def stop(self):
        self.stopping = True
        for s in (self.udp, self.tcp):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def plain_dns(mx="mx.test", addr="127.0.0.1"):
    """Every domain has MX 10 mx, and mx has the address addr."""
    def answer(q, tcp):
        if q.qtype == T_MX and q.qname != mx:
            return q.reply([mx_rr(q.qname, 10, mx)])
        if q.qname == mx and q.qtype == T_A:
            return q.reply([a_rr(mx, addr)])
        return q.reply([])
    return answer


class HostileRelay:
    """sluice whose [dns] servers is a ScriptDns, every MX on mx_port,
    with a delivery log."""

    def __init__(self, dns_answer, delivery_conf="", extra_conf="", dsn=False, workers=2):
        self.wd = Workdir("sluice-hmx-")
        self.dns = self.d = None
        try:
            self.dns = ScriptDns(dns_answer)
            self.mx_port = free_port()
            self.port = free_port()
            self.spool = os.path.join(self.wd.path, "spool")
            self.dlog = os.path.join(self.wd.path, "delivery.jsonl")
            conf = self.wd.file("sluice.conf", f"""
[server]
workers = {workers}
listen = 127.0.0.1:{self.port}
trusted_networks = 127.0.0.0/8
[queue]
path = {self.spool}
map_size = 256M
[delivery]
remote_port = {self.mx_port}
allow_networks = 127.0.0.0/8
connect_timeout = 2s
idle_timeout = 1s
{delivery_conf}
[dns]
servers = 127.0.0.1:{self.dns.port}
[log]
delivery_log = {self.dlog}
delivery_log_flush = 20ms
{"" if dsn else "[bounce]"}
{"" if dsn else "dsn = no"}
{extra_conf}
""")
            self.d = Sluice(SLUICE, conf)
            self.d.wait_log("event=ready")
        except BaseException:
            self.close()
            raise

    def inject(self, messages, sessions=1):
        Relay.inject(self, messages, sessions)

    def events(self, kind=None):
        """The delivery log's whole lines, as dicts."""
        if not os.path.exists(self.dlog):
            return []
        with open(self.dlog, "rb") as f:
            data = f.read()
        data = data[:data.rfind(b"\n") + 1]
        evs = [json.loads(x) for x in data.splitlines()]
        return [e for e in evs if kind is None or e["event"] == kind]

    def wait_events(self, kind, n, timeout=30):
        wait_until(lambda: len(self.events(kind)) >= n, timeout, f"{n} {kind} events")
        return self.events(kind)

    def close(self):
        try:
            if self.d is not None and self.d.proc.poll() is None:
                assert self.d.stop_clean() == 0
        finally:
            if self.dns is not None:
                self.dns.stop()
            self.wd.cleanup()


MSG = ("s@example.com", ["a@h.test"], b"Subject: h\r\n\r\nhostile\r\n")


def serve(c, rfile, ehlo=b"250-mx\r\n250 PIPELINING\r\n", got=None,
          dot_reply=b"250 2.0.0 taken\r\n", rcpt_reply=None):
    """An honest receiver from the greeting on; got collects each body;
    rcpt_reply(line) may give the reply to a RCPT (None: 250 ok)."""
    c.sendall(b"220 mx ESMTP\r\n")
    for _ in range(1000):  # bounded
        line = rfile.readline()
        if not line:
            return
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            c.sendall(ehlo)
        elif verb == b"DATA":
            c.sendall(b"354 go\r\n")
            body = b""
            while True:
                ln = rfile.readline()
                if not ln or ln == b".\r\n":
                    break
                body += ln
            if not ln:
                return
            if got is not None:
                got.append(body)
            c.sendall(dot_reply)
        elif verb == b"QUIT":
            c.sendall(b"221 bye\r\n")
            return
        elif verb == b"RCPT" and rcpt_reply is not None and rcpt_reply(line) is not None:
            c.sendall(rcpt_reply(line))
        else:
            c.sendall(b"250 ok\r\n")


# ---- sessions


def test_dribbled_reply_is_cut_at_its_deadline_and_logged_with_its_source():
    """A reply to MAIL sent one octet every 200 ms (an octet is never late,
    the reply always is): the session ends at command_timeout, not when
    the trickle does (a minute later); the recipient is deferred with
    reason timeout, and its delivery-log event names the MX host, its
    address and the source address the session left from (before, an
    outcome reported for the whole destination, as after every address
    failed, lost the source: only outcomes reported with a transaction
    had it)."""
    done = threading.Event()

    def script(c, rfile):
        c.sendall(b"220 mx ESMTP\r\n")
        rfile.readline()
        c.sendall(b"250-mx\r\n250 PIPELINING\r\n")
        _read_until(rfile, b"DATA")
        for ch in b"250 2.1.0 sender ok" + b"." * 300 + b"\r\n":
            if done.wait(0.2):
                return
            c.sendall(bytes([ch]))

    r = HostileRelay(plain_dns(), delivery_conf="command_timeout = 1s\n")
    mx = HostileMx(r.mx_port, script)
    try:
        t0 = time.monotonic()
        r.inject([MSG])
        line = r.d.wait_log("event=deferred", timeout=30)
        assert time.monotonic() - t0 < 10, line
        assert "reason=timeout" in line and "in state mail" in line and " mx=mx.test " in line, line
        ev = r.wait_events("transient_failure", 1)[0]
        assert ev["mx"] == "mx.test" and ev["mx_addr"] == f"127.0.0.1:{r.mx_port}", ev
        assert ev.get("source") == "127.0.0.1", ev
        assert ev["class"] == "connection_failure" and ev["reason"] == "timeout", ev
        assert r.events("delivery") == []
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 1
    finally:
        done.set()
        mx.stop()
        r.close()


def _early_replies(c, rfile):
    # MAIL, RCPT and DATA answered before any was sent: a desync
    c.sendall(b"220 mx ESMTP\r\n")
    rfile.readline()
    c.sendall(b"250-mx\r\n250 PIPELINING\r\n250 2.1.0 early bird\r\n250 2.1.5 ok\r\n354 go\r\n")
    rfile.readline()


def _second_greeting(c, rfile):
    c.sendall(b"220 mx ESMTP\r\n")
    rfile.readline()
    c.sendall(b"220 mx ESMTP once more\r\n")
    rfile.readline()


def _354_to_mail(c, rfile):
    c.sendall(b"220 mx ESMTP\r\n")
    rfile.readline()
    c.sendall(b"250 mx\r\n")  # no PIPELINING: MAIL alone
    rfile.readline()
    c.sendall(b"354 send the data\r\n")
    rfile.readline()


def test_senseless_replies_defer_and_are_quoted():
    """Replies that fit no command (ahead of the commands they answer, a
    second greeting to EHLO, 354 to MAIL): the mail is deferred as a
    protocol error, nothing is delivered, and the log line quotes what
    the server said (before: only "unsolicited reply", "EHLO reply not
    250", which no operator could take to the receiver's admin)."""
    for script, state, said in ((_early_replies, "idle", "250 2.1.0 early bird"),
                                (_second_greeting, "ehlo", "220 mx ESMTP once more"),
                                (_354_to_mail, "mail", "354 send the data")):
        what = script.__name__
        r = HostileRelay(plain_dns())
        mx = HostileMx(r.mx_port, script)
        try:
            r.inject([MSG])
            line = r.d.wait_log("event=deferred", timeout=30)
            assert "reason=protocol" in line and f"in state {state}" in line, (what, line)
            assert f"server said: {said}" in line, (what, line)
            ev = r.wait_events("transient_failure", 1)[0]
            assert f"server said: {said}" in ev["reply"] and ev["mx"] == "mx.test", (what, ev)
            assert r.d.count_log("event=delivered") == 0, what
            assert r.d.stop_clean() == 0, what
            assert mdb_entries(r.spool, "msg") == 1, what
        finally:
            mx.stop()
            r.close()


def test_close_after_the_dot_is_deferred_at_every_attempt():
    """A receiver that reads the whole message and closes before replying
    to the final dot, every time: each attempt is a deferral (attempt 1,
    then 2 on the retry a second later), never a delivery, and the
    message stays queued."""
    conns = []

    def script(c, rfile):
        conns.append(1)
        c.sendall(b"220 mx ESMTP\r\n")
        rfile.readline()
        c.sendall(b"250-mx\r\n250 PIPELINING\r\n")
        _read_until(rfile, b"DATA")
        c.sendall(b"250 ok\r\n250 ok\r\n354 go\r\n")
        _read_until(rfile, b".\r\n")  # and goes without a word

    r = HostileRelay(plain_dns(), extra_conf="[domain *]\nretry_schedule = 1s\n")
    mx = HostileMx(r.mx_port, script)
    try:
        r.inject([MSG])
        evs = r.wait_events("transient_failure", 2)
        assert [e["attempt"] for e in evs[:2]] == [1, 2], evs
        for e in evs:
            assert e["reason"] == "eof" and "in state dot" in e["reply"], e
            assert e["mx"] == "mx.test" and e["class"] == "connection_failure", e
        assert len(conns) >= 2
        assert r.events("delivery") == []
        assert r.d.count_log("event=delivered") == 0
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 1
    finally:
        mx.stop()
        r.close()


def test_each_recipient_of_a_transaction_gets_its_own_outcome():
    """One message to four recipients of one domain, answered 250, 550,
    450 and 550 at RCPT: one delivery, one deferral and two bounces in the
    delivery log, each with its own code and reply; the DSN to the sender
    names the two bounced recipients and no other."""
    got = []

    def script(c, rfile):
        c.sendall(b"220 mx ESMTP\r\n")
        for _ in range(1000):
            line = rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"RCPT" and b"bad" in line:
                c.sendall(b"550 5.1.1 <%s> no such user\r\n" % line[9:].strip(b"\r\n<>"))
            elif verb == b"RCPT" and b"soft" in line:
                c.sendall(b"450 4.2.1 try later\r\n")
            elif verb == b"RCPT":
                c.sendall(b"250 ok\r\n")
            elif verb == b"EHLO":
                c.sendall(b"250-mx\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                c.sendall(b"354 go\r\n")
                got.append(_body(rfile))
                c.sendall(b"250 2.0.0 taken\r\n")
            elif verb == b"QUIT":
                c.sendall(b"221 bye\r\n")
                return
            else:
                c.sendall(b"250 ok\r\n")

    r = HostileRelay(plain_dns(), dsn=True)
    mx = HostileMx(r.mx_port, script)
    try:
        r.inject([("s@sender.test", ["ok@h.test", "bad1@h.test", "soft@h.test", "bad2@h.test"],
                   b"Subject: m\r\n\r\nmulti\r\n")])
        r.wait_events("dsn", 1)
        r.wait_events("delivery", 2)  # the message to ok@, then the DSN to s@
        by = {e["rcpt"]: e for e in r.events() if "rcpt" in e and e["id"] == r.events("dsn")[0]["id"]}
        assert by["ok@h.test"]["event"] == "delivery" and by["ok@h.test"]["code"] == 250, by
        assert by["soft@h.test"]["event"] == "transient_failure", by
        assert by["soft@h.test"]["code"] == 450 and by["soft@h.test"]["enhanced"] == "4.2.1", by
        for a in ("bad1@h.test", "bad2@h.test"):
            assert by[a]["event"] == "bounce" and by[a]["code"] == 550, by
            assert by[a]["class"] == "invalid_recipient" and a in by[a]["reply"], by
        wait_until(lambda: len(got) >= 2, 30, "the DSN at the sender's MX")
        dsn = got[1].decode(errors="replace")
        assert "Final-Recipient: rfc822; bad1@h.test" in dsn, dsn
        assert "Final-Recipient: rfc822; bad2@h.test" in dsn, dsn
        assert "rfc822; ok@h.test" not in dsn and "rfc822; soft@h.test" not in dsn, dsn
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()


def test_replies_longer_than_kept_keep_their_code():
    """Replies with more text than sluice keeps (a 600-octet line, 150
    lines, 12 lines of 400 octets) keep their code, their text cut: a 250
    to the final dot is a delivery, once (before: a protocol error, and
    the message sent again at every retry, five copies in nine seconds
    at a one-second schedule); a 550 5.1.1 at RCPT a bounce, not a
    deferral; an EHLO reply of 150 lines a session that delivers."""
    long_line = b"250 2.0.0 Ok: queued as " + b"Q" * 600 + b"\r\n"
    many_lines = b"250-ok\r\n" * 150 + b"250 queued\r\n"
    long_text = (b"250-" + b"x" * 400 + b"\r\n") * 12 + b"250 queued\r\n"
    for dot_reply, said in ((long_line, "queued as QQQQ"), (many_lines, "ok ok ok"),
                            (long_text, "xxxx")):
        got = []
        r = HostileRelay(plain_dns(), extra_conf="[domain *]\nretry_schedule = 1s\n")
        mx = HostileMx(r.mx_port,
                       lambda c, rfile, g=got, dot=dot_reply: serve(c, rfile, got=g, dot_reply=dot))
        try:
            r.inject([MSG])
            ev = r.wait_events("delivery", 1)[0]
            assert ev["code"] == 250 and said in ev["reply"], ev
            assert r.d.stop_clean() == 0
            assert r.events("transient_failure") == [], r.events("transient_failure")
            assert len(got) == 1, len(got)
            assert mdb_entries(r.spool, "msg") == 0
        finally:
            mx.stop()
            r.close()

    # 150 EHLO lines: those past the 100th are not kept (nor seen)
    ehlo = (b"250-mx\r\n250-PIPELINING\r\n" +
            b"".join(b"250-X-EXT%d\r\n" % i for i in range(147)) + b"250 X-LAST\r\n")
    gone = (b"550-5.1.1 " + b"y" * 400 + b"\r\n") * 12 + b"550 5.1.1 no such user\r\n"

    def refuses(c, rfile):
        serve(c, rfile, ehlo=ehlo, rcpt_reply=lambda line: gone if b"gone" in line else None)

    r = HostileRelay(plain_dns())
    mx = HostileMx(r.mx_port, refuses)
    try:
        r.inject([("s@example.com", ["gone@h.test", "here@h.test"], b"Subject: h\r\n\r\nlong\r\n")])
        bounce = r.wait_events("bounce", 1)[0]
        assert bounce["rcpt"] == "gone@h.test" and bounce["code"] == 550, bounce
        assert bounce["enhanced"] == "5.1.1" and bounce["class"] == "invalid_recipient", bounce
        ev = r.wait_events("delivery", 1)[0]
        assert ev["rcpt"] == "here@h.test", ev
        assert r.events("transient_failure") == []
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        mx.stop()
        r.close()


def test_declared_8bit_and_utf8_that_are_ascii_go_to_a_plain_receiver():
    """A client that declares BODY=8BITMIME and SMTPUTF8 for everything
    (many do), for an all-ASCII message, to a receiver that offers
    neither: delivered, without BODY=8BITMIME or SMTPUTF8 on its MAIL
    (before: bounced 5.6.3, and 5.6.7 with SMTPUTF8; RFC 6152 and 6531
    forbid only sending what needs them). The same declared message with
    8-bit octets in it still bounces 5.6.3 there."""
    import smtplib
    got, mails = [], []

    def script(c, rfile):
        class Spy:
            def readline(self):
                line = rfile.readline()
                if line[:4].upper() == b"MAIL":
                    mails.append(line)
                return line
        serve(c, Spy(), got=got)

    r = HostileRelay(plain_dns())
    mx = HostileMx(r.mx_port, script)
    try:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as cl:
            cl.ehlo("tester")
            cl.sendmail("s@example.com", ["a@h.test"], b"Subject: ascii\r\n\r\nplain\r\n",
                        mail_options=["BODY=8BITMIME", "SMTPUTF8"])
            cl.sendmail("s@example.com", ["b@h.test"],
                        "Subject: eight\r\n\r\ncaf\u00e9\r\n".encode(),
                        mail_options=["BODY=8BITMIME"])
        ev = r.wait_events("delivery", 1)[0]
        assert ev["rcpt"] == "a@h.test", ev
        bounce = r.wait_events("bounce", 1)[0]
        assert bounce["rcpt"] == "b@h.test" and bounce["enhanced"] == "5.6.3", bounce
        assert len(got) == 1 and b"plain" in got[0], got
        assert len(mails) == 1 and b"BODY=" not in mails[0] and b"SMTPUTF8" not in mails[0], mails
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()


def test_a_dsn_of_an_8bit_message_reaches_a_sender_mx_without_8bitmime():
    """An 8-bit message (8-bit Subject and body, BODY=8BITMIME, RET=FULL)
    bounces 5.6.3 at an MX without 8BITMIME; its DSN goes to the sender's
    MX, which has none either. The DSN returns the headers only
    (text/rfc822-headers, quoted-printable: message/rfc822 may not be
    encoded) and says why, so it is 7-bit, sent without BODY=8BITMIME, and
    delivered. Before, it returned the whole message as 8bit, bounced
    there 5.6.3 too, and was dropped (a DSN's bounce is told to nobody):
    the sender never heard that the mail failed."""
    import email
    import email.policy
    import smtplib
    got, mails = [], []

    def script(c, rfile):
        class Spy:
            def readline(self):
                line = rfile.readline()
                if line[:4].upper() == b"MAIL":
                    mails.append(line)
                return line
        serve(c, Spy(), got=got)

    r = HostileRelay(plain_dns(), dsn=True)
    mx = HostileMx(r.mx_port, script)
    try:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as cl:
            cl.ehlo("tester")
            cl.sendmail("s@sender.test", ["x@rcpt.test"],
                        "Subject: Gr\u00fc\u00dfe\r\nX-Campaign: c8\r\n\r\nna\u00efve body\r\n"
                        .encode(), mail_options=["BODY=8BITMIME", "RET=FULL"])
        bounce = r.wait_events("bounce", 1)[0]
        assert bounce["rcpt"] == "x@rcpt.test" and bounce["enhanced"] == "5.6.3", bounce
        ev = r.wait_events("delivery", 1)[0]
        assert ev["rcpt"] == "s@sender.test" and ev["sender"] == "", ev
        assert len(r.events("bounce")) == 1, r.events()
        assert len(got) == 1 and len(mails) == 1, (got, mails)
        dsn = got[0]
        assert all(b < 128 for b in dsn), dsn[:2000]
        assert mails[0].startswith(b"MAIL FROM:<>") and b"BODY=" not in mails[0], mails
        msg = email.message_from_bytes(dsn, policy=email.policy.default)
        assert msg.get_content_type() == "multipart/report", dsn[:2000]
        parts = list(msg.iter_parts())
        types = [p.get_content_type() for p in parts]
        assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"], types
        assert "has 8-bit content" in parts[0].get_content(), parts[0]
        assert parts[2]["Content-Transfer-Encoding"] == "quoted-printable", parts[2]
        hdrs = parts[2].get_payload(decode=True)
        assert "Subject: Gr\u00fc\u00dfe\r\n".encode() in hdrs, hdrs
        assert b"X-Campaign: c8\r\n" in hdrs and b"body" not in hdrs, hdrs
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()


def test_a_dsn_that_bounces_is_dropped_and_logged_once():
    """A bounce's DSN refused by the sender's MX (550 at RCPT) is not
    bounced again (its sender is <>): sluice logs event=dsn_dropped
    reason=null_sender once, with the DSN's id, besides its bounced line
    (before, only that line's empty sender said that the sender would
    hear nothing). A delivered DSN logs none."""
    import smtplib
    got = []
    refuse = {"on": True}

    def rcpt(line):
        if b"@rcpt.test" in line or (refuse["on"] and b"@sender.test" in line):
            return b"550 5.1.1 no such user\r\n"
        return None

    r = HostileRelay(plain_dns(), dsn=True)
    mx = HostileMx(r.mx_port, lambda c, rfile: serve(c, rfile, got=got, rcpt_reply=rcpt))
    try:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as cl:
            cl.ehlo("tester")
            cl.sendmail("s@sender.test", ["x@rcpt.test"], b"Subject: one\r\n\r\nx\r\n")
        evs = r.wait_events("bounce", 2)
        dsn = r.wait_events("dsn", 1)[0]
        assert [e["sender"] for e in evs] == ["s@sender.test", ""], evs
        assert evs[1]["id"] == dsn["dsn_id"] and evs[1]["rcpt"] == "s@sender.test", (evs, dsn)
        line = r.d.wait_log("event=dsn_dropped")
        assert f"id={dsn['dsn_id']} event=dsn_dropped reason=null_sender recipients=1" in line, \
            line
        refuse["on"] = False
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as cl:
            cl.ehlo("tester")
            cl.sendmail("s@sender.test", ["y@rcpt.test"], b"Subject: two\r\n\r\nx\r\n")
        ev = r.wait_events("delivery", 1)[0]
        assert ev["sender"] == "" and ev["rcpt"] == "s@sender.test", ev
        assert r.d.stop_clean() == 0
        assert r.d.count_log("event=dsn_dropped") == 1, r.d.lines
        # (a refused RCPT's pipelined DATA ends at once: "." alone)
        assert len(r.events("dsn")) == 2 and len([g for g in got if g]) == 1, (r.events(), got)
    finally:
        mx.stop()
        r.close()


def test_failed_and_relayed_recipients_of_a_transaction_share_one_dsn():
    """One transaction to an MX without DSN: two recipients refused at
    RCPT, two taken, all four with NOTIFY=SUCCESS,FAILURE, a fifth taken
    that asked nothing. One DSN names the four (failed, relayed), not
    the fifth, returns the message (RET=FULL, a failure), and its dsn
    event lists them with their Action and Status (before, it named no
    recipient: a consumer of the events could not tell whom it was for)."""
    import email
    import email.policy
    import smtplib
    got = []
    r = HostileRelay(plain_dns(), dsn=True)
    mx = HostileMx(r.mx_port, lambda c, rfile: serve(
        c, rfile, got=got,
        rcpt_reply=lambda line: b"550 5.1.1 no such user\r\n" if b"bad" in line else None))
    try:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as cl:
            cl.ehlo("tester")
            cl.mail("s@sender.test", ["RET=FULL", "ENVID=e1"])
            for a in ("bad1@rcpt.test", "good1@rcpt.test", "bad2@rcpt.test", "good2@rcpt.test"):
                assert cl.rcpt(a, ["NOTIFY=SUCCESS,FAILURE"])[0] == 250
            assert cl.rcpt("quiet@rcpt.test")[0] == 250
            assert cl.data(b"Subject: mixed\r\n\r\nthe body\r\n")[0] == 250
        dl = r.wait_events("delivery", 4)  # three recipients, then the DSN
        dsn_ev = r.events("dsn")
        assert len(dsn_ev) == 1, r.events()
        assert dsn_ev[0]["recipients"] == [
            {"rcpt": "bad1@rcpt.test", "action": "failed", "status": "5.1.1"},
            {"rcpt": "good1@rcpt.test", "action": "relayed", "status": "2.0.0"},
            {"rcpt": "bad2@rcpt.test", "action": "failed", "status": "5.1.1"},
            {"rcpt": "good2@rcpt.test", "action": "relayed", "status": "2.0.0"}], dsn_ev
        assert [e["rcpt"] for e in dl if e["sender"] == ""] == ["s@sender.test"], dl
        dsns = [g for g in got if b"multipart/report" in g]
        assert len(dsns) == 1, got
        msg = email.message_from_bytes(dsns[0], policy=email.policy.default)
        assert msg["Subject"] == "Undelivered Mail Returned to Sender", msg["Subject"]
        parts = list(msg.iter_parts())
        assert [p.get_content_type() for p in parts] == [
            "text/plain", "message/delivery-status", "message/rfc822"], parts
        text = dsns[0].decode().replace("\r\n", "\n")
        assert text.count("Action: failed\n") == 2 and text.count("Action: relayed\n") == 2, text
        assert "quiet@rcpt.test" not in text and "Original-Envelope-Id: e1\n" in text, text
        assert "the body" in text, text
        assert r.d.stop_clean() == 0
        assert len(r.events("dsn")) == 1, r.events()
    finally:
        mx.stop()
        r.close()


def _body(rfile):
    out = b""
    for _ in range(100000):
        ln = rfile.readline()
        if not ln or ln == b".\r\n":
            break
        out += ln
    return out


def test_a_receiver_that_never_reads_stalls_no_other_domain():
    """The MX of stall.test (127.0.0.1) answers 354 and then reads
    nothing, so sluice's send of a large body blocks; the MX of the other
    domains (127.0.0.2) is honest. Mail to the others is delivered at
    once while the stalled session waits out its data_timeout, on the
    same worker; then the stalled recipient is deferred (timeout in state
    body)."""
    release = threading.Event()

    def stall(c, rfile):
        c.sendall(b"220 stall ESMTP\r\n")
        rfile.readline()
        c.sendall(b"250-stall\r\n250 PIPELINING\r\n")
        _read_until(rfile, b"DATA")
        c.sendall(b"250 ok\r\n250 ok\r\n354 go\r\n")
        release.wait(60)

    def dns(q, tcp):
        if q.qtype == T_MX:
            return q.reply([mx_rr(q.qname, 10, "mxa.test" if q.qname == "stall.test"
                                  else "mxb.test")])
        if q.qtype == T_A and q.qname in ("mxa.test", "mxb.test"):
            return q.reply([a_rr(q.qname, "127.0.0.1" if q.qname == "mxa.test"
                                 else "127.0.0.2")])
        return q.reply([])

    class Honest(socketserver.StreamRequestHandler):
        def handle(self):
            try:
                serve(self.connection, self.rfile)
            except OSError:
                pass

    # one worker: the stalled session and the others share its loop
    r = HostileRelay(dns, delivery_conf="data_timeout = 3s\ncommand_timeout = 1s\n", workers=1)
    mx = HostileMx(r.mx_port, stall)
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    good = socketserver.ThreadingTCPServer(("127.0.0.2", r.mx_port), Honest)
    good.daemon_threads = True
    threading.Thread(target=good.serve_forever, daemon=True).start()
    try:
        big = b"Subject: s\r\n\r\n" + (b"x" * 998 + b"\r\n") * 20000  # past the socket buffers
        r.inject([("s@example.com", ["a@stall.test"], big)])
        wait_until(lambda: r.d.count_log("event=connected domain=stall.test") >= 1, 30,
                   "the stalled session to start")
        r.inject([("s@example.com", [f"b@ok{i}.test"], b"Subject: k\r\n\r\nok\r\n")
                  for i in range(6)])
        r.d.wait_log_count("event=delivered", 6, timeout=20)
        assert r.d.count_log("event=deferred") == 0, "the others waited for the stall"
        line = r.d.wait_log("event=deferred", timeout=30)
        assert "rcpt=<a@stall.test>" in line and "reason=timeout" in line, line
        assert "in state body" in line, line
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 1
    finally:
        release.set()
        mx.stop()
        good.shutdown()
        good.server_close()
        r.close()


# ---- hostile DNS


def _mx_then(answer_rest):
    """h.test's MX is mx.test; other queries go to answer_rest."""
    def answer(q, tcp):
        if q.qtype == T_MX and q.qname == "h.test":
            return q.reply([mx_rr("h.test", 10, "mx.test")])
        return answer_rest(q, tcp)
    return answer


def _cname_self(q, tcp):
    # mx.test is an alias of itself
    if q.qname == "mx.test":
        return q.reply([cname_rr("mx.test", "mx.test")])
    return q.reply([])


def _domain_cname_self(q, tcp):
    # the domain itself is an alias of itself
    if q.qname == "h.test":
        return q.reply([cname_rr("h.test", "h.test")])
    return q.reply([])


def _cname_pair(q, tcp):
    if q.qname == "mx.test":
        return q.reply([cname_rr("mx.test", "mx2.test"), cname_rr("mx2.test", "mx.test")])
    return q.reply([])


def _tc_differs(q, tcp):
    # over UDP, truncated and naming evil.test; over TCP, mx.test
    if q.qtype == T_MX and q.qname == "h.test":
        if not tcp:
            return q.reply([mx_rr("h.test", 10, "evil.test")], tc=True)
        return q.reply([mx_rr("h.test", 10, "mx.test")])
    if q.qtype == T_A and q.qname in ("mx.test", "evil.test"):
        return q.reply([a_rr(q.qname, "127.0.0.1")])
    return q.reply([])


def _spoofs_first(q, tcp):
    # a wrong ID, then the wrong question, then the real answer
    if q.qtype == T_MX and q.qname == "h.test":
        other = name_wire("other.test") + struct.pack("!HH", T_MX, 1)
        return [q.reply([mx_rr("h.test", 10, "evil.test")], qid=(q.id + 1) & 0xffff),
                q.reply([mx_rr("h.test", 10, "evil.test")], question=other),
                q.reply([mx_rr("h.test", 10, "mx.test")])]
    if q.qtype == T_A and q.qname in ("mx.test", "evil.test"):
        return q.reply([a_rr(q.qname, "127.0.0.1")])
    return q.reply([])


def _spoofs_only(q, tcp):
    if q.qtype == T_MX:
        return q.reply([mx_rr("h.test", 10, "mx.test")], qid=(q.id + 1) & 0xffff)
    return q.reply([])


def _many_mx(n):
    """n MX records (over TCP; over UDP a truncated part), every host at
    the receiver; the most preferred last in the answer."""
    def answer(q, tcp):
        if q.qtype == T_MX and q.qname == "h.test":
            ans = [mx_rr("h.test", 100 + i, f"mx{i}.test") for i in range(n - 1)]
            ans.append(mx_rr("h.test", 5, "best.test"))
            return q.reply(ans) if tcp else q.reply(ans[:10], tc=True)
        if q.qtype == T_A and q.qname.endswith(".test"):
            return q.reply([a_rr(q.qname, "127.0.0.1")])
        return q.reply([])
    return answer


def _referral(q, tcp):
    # a server that does not recurse: old BIND's upward referral to the
    # root, no answer and no SOA, RA clear
    ns = rr(".", 2, 518400, name_wire("a.root-servers.net"))
    head = struct.pack("!HHHHHH", q.id, 0x8000 | (q.flags & 0x0100), 1, 0, 1, 0)
    return head + q.question + ns


def _address(addr):
    def answer(q, tcp):
        if q.qname == "mx.test" and q.qtype == (T_AAAA if ":" in addr else T_A):
            return q.reply([(aaaa_rr if ":" in addr else a_rr)("mx.test", addr)])
        return q.reply([])
    return _mx_then(answer)


def test_hostile_dns_answers():
    """Each answer ends as it should, with a log line that says so:
    a CNAME loop (at the MX host, at the domain, a pair) is a DNS failure,
    deferred; a truncated UDP answer is asked again over TCP and the TCP
    one counts; answers with the wrong ID or question are dropped for the
    real one (mail never goes to the MX they name), or, when no real one
    comes, the lookup times out (deferred); of 500 MX records the most
    preferred is used, wherever it is in the answer; 1,000, more than are
    read, are deferred as such (before, the best of the first 512 was
    taken: the most preferred, last, was never tried); a referral (a
    server that does not recurse: NS records, no SOA) is deferred as no
    answer (before, it was taken as no MX and no address records, and
    every recipient bounced 5.1.2); an MX host at 0.0.0.0, a multicast, broadcast,
    reserved (240/4) or link-local address (v4-mapped or not) is refused as a target whatever
    the answer, the refusal saying which address and why."""
    cases = [
        ("cname loop at the mx", _mx_then(_cname_self), "deferred", "CNAME chain", None),
        ("cname loop at the domain", _domain_cname_self, "deferred", "CNAME chain", None),
        ("cname pair", _mx_then(_cname_pair), "deferred", "CNAME chain", None),
        ("tc answer differs", _tc_differs, "delivered", None, "mx.test"),
        ("spoofed answers first", _spoofs_first, "delivered", None, "mx.test"),
        ("only spoofed answers", _spoofs_only, "deferred", "timeout", None),
        ("500 mx records", _many_mx(500), "delivered", None, "best.test"),
        ("1000 mx records", _many_mx(1000), "deferred", "more MX records than are read", None),
        ("referral", _referral, "deferred", "referral, not an answer", None),
    ]
    for addr, why in (("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"),
                      ("255.255.255.255", "broadcast"), ("169.254.169.254", "link-local"),
                      ("::ffff:224.0.0.1", "multicast"), ("::ffff:0.0.0.0", "unspecified"),
                      ("240.1.2.3", "reserved")):
        cases.append((f"address {addr}", _address(addr), "bounced", f"({why})", None))
    for what, answer, want, reply, mx_host in cases:
        r = HostileRelay(answer, extra_conf="[dns]\ntimeout = 200ms\ntries = 1\nfamily = both\n")
        got = []
        mx = HostileMx(r.mx_port, lambda c, rfile: serve(c, rfile, got=got))
        try:
            r.inject([MSG])
            line = r.d.wait_log(f"event={want}", timeout=30)
            assert "rcpt=<a@h.test>" in line, (what, line)
            if reply is not None:
                assert reply in line, (what, line)
            if want == "delivered":
                assert f" mx={mx_host} " in line and len(got) == 1, (what, line)
                assert r.d.count_log("evil.test") == 0, (what, r.d.log_lines("evil.test"))
            elif want == "deferred":
                assert "class=dns_failure" in line and " mx=- " in line, (what, line)
            else:
                assert "class=refused_target" in line and "5.4.4" in line, (what, line)
                assert r.d.count_log("event=target_refused") >= 1, what
            if what == "tc answer differs":
                assert r.dns.count("h.test", tcp=True) >= 1, what
            assert len(got) == (1 if want == "delivered" else 0), (what, got)
            assert r.d.stop_clean() == 0, what
        finally:
            mx.stop()
            r.close()


def test_a_domain_that_can_exist_nowhere_bounces_at_once():
    """A recipient domain that RFC 5321's grammar takes but no DNS name
    can be (192.0.2.1 without brackets, 123: an all-numeric last label,
    which no top-level domain is) is bounced at its first attempt, 5.1.2
    as the NXDOMAIN DNS would answer, and no DNS server is asked (before,
    the resolver's "invalid domain name" was deferred 4.4.3 at every
    attempt until the message expired, days later); a domain whose MX
    host has no address is still deferred."""
    def answer(q, tcp):
        if q.qtype == T_MX and q.qname == "h.test":
            return q.reply([mx_rr("h.test", 10, "mx.test")])
        return q.reply([])
    r = HostileRelay(answer, extra_conf="[dns]\ntimeout = 200ms\ntries = 1\n")
    try:
        r.inject([("s@example.com", ["a@192.0.2.1", "b@123", "c@h.test"],
                   b"Subject: n\r\n\r\nnowhere\r\n")])
        r.wait_events("bounce", 2)
        r.wait_events("transient_failure", 1)
        for rcpt in ("a@192.0.2.1", "b@123"):
            line = r.d.wait_log(f"rcpt=<{rcpt}>", timeout=10)
            assert "event=bounced" in line and "enhanced=5.1.2" in line, line
            assert 'reply="invalid domain name"' in line and "class=dns_failure" in line, line
        line = r.d.wait_log("rcpt=<c@h.test>", timeout=10)
        assert "event=deferred" in line and "enhanced=4.4.3" in line, line
        assert r.dns.count("192.0.2.1") == 0 and r.dns.count("123") == 0, r.dns.asked
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_mx_hosts_that_do_not_exist_bounce():
    """A domain whose every MX host name is NXDOMAIN names hosts that do
    not exist (RFC 5321 5.1: an error): its mail bounces 5.4.4 "no MX host
    exists" at the first attempt, as Postfix's "Host not found" does
    (before, deferred 4.4.3 at every attempt until max_age, days later);
    one whose MX host exists without an address (NODATA) is still
    deferred, and so is one with a host that answers for now only with a
    failure (SERVFAIL) beside a host that does not exist."""
    def answer(q, tcp):
        if q.qtype == T_MX and q.qname == "nx.test":
            return q.reply([mx_rr("nx.test", 10, "gone1.test"), mx_rr("nx.test", 20, "gone2.test")])
        if q.qtype == T_MX and q.qname == "nodata.test":
            return q.reply([mx_rr("nodata.test", 10, "bare.test")])
        if q.qtype == T_MX and q.qname == "mixed.test":
            return q.reply([mx_rr("mixed.test", 10, "gone1.test"), mx_rr("mixed.test", 20, "sf.test")])
        if q.qname.startswith("gone"):
            return q.reply([], rcode=3)
        if q.qname == "sf.test":
            return q.reply([], rcode=2)
        return q.reply([])
    r = HostileRelay(answer, extra_conf="[dns]\ntimeout = 200ms\ntries = 1\n")
    try:
        r.inject([("s@example.com", ["a@nx.test", "b@nodata.test", "c@mixed.test"],
                   b"Subject: n\r\n\r\nnowhere\r\n")])
        r.wait_events("bounce", 1)
        r.wait_events("transient_failure", 2)
        line = r.d.wait_log("rcpt=<a@nx.test>", timeout=10)
        assert "event=bounced" in line and "enhanced=5.4.4" in line, line
        assert "no MX host exists" in line and "class=dns_failure" in line, line
        for rcpt in ("b@nodata.test", "c@mixed.test"):
            line = r.d.wait_log(f"rcpt=<{rcpt}>", timeout=10)
            assert "event=deferred" in line and "enhanced=4.4.3" in line, line
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_lookups_waiting_for_a_slot_are_shown():
    """A flood of domains whose DNS never answers fills [dns] max_inflight
    and the other lookups wait their turn: the stats socket shows how many
    run and how many wait (dns.inflight, dns.queued; before, nothing of
    either was shown: the operator saw mail in "ready" and no reason),
    then the query timeouts and failed lookups they end in; each waiting
    domain is "resolving" in the domains view (before, "active" as one
    being delivered); a domain that answers is delivered once a slot is
    free, and nothing stays queued."""
    def answer(q, tcp):
        if q.qname.startswith("slow"):
            return None
        return plain_dns()(q, tcp)
    sock = os.path.join("/tmp", f"sluice-hmx-{os.getpid()}-stats.sock")
    r = HostileRelay(answer, workers=1, delivery_conf="mta_sts = no\n",
                     extra_conf=f"[stats]\nsocket = {sock}\n"
                                "[dns]\ntimeout = 2s\ntries = 1\nmax_inflight = 2\n")
    got = []
    mx = HostileMx(r.mx_port, lambda c, rfile: serve(c, rfile, got=got))
    try:
        r.inject([("s@example.com", [f"a@slow{i}.test"], b"Subject: s\r\n\r\nslow\r\n")
                  for i in range(6)])
        r.inject([("s@example.com", ["a@good.test"], b"Subject: g\r\n\r\ngood\r\n")])
        wait_until(lambda: stats_ask(sock)["dns"]["queued"] >= 4, 10, "lookups queued")
        dns = stats_ask(sock)["dns"]
        assert dns["inflight"] == 2 and dns["queued"] >= 4, dns
        doms = {x["name"]: x for x in stats_ask(sock, "domains 20")["domains"]}
        assert all(doms[f"slow{i}.test"]["resolving"] for i in range(6)), doms
        ctl = os.environ.get("SLUICECTL") or os.path.join(
            os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl")
        out = subprocess.run([ctl, "-s", sock, "domains"], capture_output=True, text=True,
                             timeout=10).stdout
        rows = [x for x in out.splitlines() if x.startswith("slow")]
        assert len(rows) == 6 and all(" resolving " in x for x in rows), out
        line = r.d.wait_log("rcpt=<a@good.test>", timeout=30)
        assert "event=delivered" in line and len(got) == 1, line
        r.wait_events("transient_failure", 6)
        wait_until(lambda: stats_ask(sock)["dns"]["inflight"] == 0, 10, "no lookup running")
        dns = stats_ask(sock)["dns"]
        assert dns["queued"] == 0 and dns["timeouts"] >= 6 and dns["failures"] >= 6, dns
        doms = stats_ask(sock, "domains 20")["domains"]
        assert not any(x["resolving"] for x in doms), doms
        text = stats_ask(sock, "metrics")["text"]
        assert "\nsluice_dns_lookups_queued 0\n" in text, text
        assert "\nsluice_dns_timeouts_total " in text, text
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()


def test_dead_domains_give_their_dns_slots_up():
    """A lookup whose DNS server stays silent a whole try's timeout gives
    its slot of [dns] max_inflight up to a queued one: a domain that
    answers, queued behind six dead ones on two slots, is delivered while
    the dead ones still retry (here 1 s a try, two tries: 3 s each).
    Before, each held its slot to the end of its last try, and the live
    domain waited for all six (9 s)."""
    def answer(q, tcp):
        if q.qname.startswith("dead"):
            return None
        return plain_dns()(q, tcp)
    sock = os.path.join("/tmp", f"sluice-hmx-{os.getpid()}-stats.sock")
    r = HostileRelay(answer, workers=1, delivery_conf="mta_sts = no\n",
                     extra_conf=f"[stats]\nsocket = {sock}\n"
                                "[dns]\ntimeout = 1s\ntries = 2\nmax_inflight = 2\n")
    got = []
    mx = HostileMx(r.mx_port, lambda c, rfile: serve(c, rfile, got=got))
    try:
        r.inject([("s@example.com", [f"a@dead{i}.test"], b"Subject: d\r\n\r\ndead\r\n")
                  for i in range(6)])
        r.inject([("s@example.com", ["a@good.test"], b"Subject: g\r\n\r\ngood\r\n")])
        line = r.d.wait_log("rcpt=<a@good.test>", timeout=30)
        assert "event=delivered" in line and len(got) == 1, line
        deferred = len(r.d.log_lines("event=deferred"))
        assert deferred < 6, f"the live domain waited for all {deferred} dead ones"
        r.wait_events("transient_failure", 6)
        wait_until(lambda: stats_ask(sock)["dns"]["inflight"] == 0, 10, "no lookup running")
        assert stats_ask(sock)["dns"]["queued"] == 0
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()


def test_connect_refused_names_the_bound_source():
    """With [delivery] source_address, a connection that never connects
    (nothing listens: refused) still left from that address: its
    deferral's delivery-log event names it (before, the source was read
    only once connected, so a connect failure had none)."""
    r = HostileRelay(plain_dns(), delivery_conf="source_address = 127.0.0.2\n")
    try:
        r.inject([MSG])  # no MX server: the connect is refused
        ev = r.wait_events("transient_failure", 1)[0]
        assert ev["class"] == "connection_failure", ev
        assert ev.get("source") == "127.0.0.2", ev
        assert r.d.stop_clean() == 0
    finally:
        r.close()


if __name__ == "__main__":
    main([test_dribbled_reply_is_cut_at_its_deadline_and_logged_with_its_source,
          test_senseless_replies_defer_and_are_quoted,
          test_close_after_the_dot_is_deferred_at_every_attempt,
          test_each_recipient_of_a_transaction_gets_its_own_outcome,
          test_replies_longer_than_kept_keep_their_code,
          test_declared_8bit_and_utf8_that_are_ascii_go_to_a_plain_receiver,
          test_a_dsn_of_an_8bit_message_reaches_a_sender_mx_without_8bitmime,
          test_a_dsn_that_bounces_is_dropped_and_logged_once,
          test_failed_and_relayed_recipients_of_a_transaction_share_one_dsn,
          test_a_receiver_that_never_reads_stalls_no_other_domain,
          test_hostile_dns_answers, test_a_domain_that_can_exist_nowhere_bounces_at_once, test_mx_hosts_that_do_not_exist_bounce,
          test_lookups_waiting_for_a_slot_are_shown, test_dead_domains_give_their_dns_slots_up,
          test_connect_refused_names_the_bound_source])
