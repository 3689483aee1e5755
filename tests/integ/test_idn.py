"""Recipients whose domain is written in U-labels (RCPT TO:<x@bücher.test>
under SMTPUTF8, RFC 6531), delivered as Postfix with smtputf8_enable
delivers them: the destination is the domain's A-labels
(xn--bcher-kva.test): its MX, address, MTA-STS and TLSA lookups ask for
them, never for the UTF-8 name. The next hop gets the envelope as
received when it offers SMTPUTF8; when it does not, an address with an
ASCII local part goes with its domain in A-labels (RFC 6530 7.1, 6531
3.2), and one with a UTF-8 local part is refused need_smtputf8 as before.
The delivery log names each recipient as received, and its domain in
A-labels (the destination's name). A domain that is no valid IDN is
refused at RCPT.

The DNS server is test_hostile_mx's ScriptDns (every query it is asked
is recorded: the test checks that none named the UTF-8 form), the
receiver test_delivery's HostileMx with an honest script that records
its commands."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import test_hostile_mx
from harness import main
from test_delivery import HostileMx
from test_hostile_mx import T_A, T_MX, HostileRelay, a_rr, mx_rr, serve

SLUICE = test_hostile_mx.SLUICE

ALABEL = "xn--bcher-kva.test"


def idn_dns(q, tcp):
    """MX for the A-label domain only; everything else (the UTF-8 form
    too, should it be asked) does not exist."""
    if q.qname == ALABEL and q.qtype == T_MX:
        return q.reply([mx_rr(ALABEL, 10, "mx.test")])
    if q.qname == "mx.test":
        return q.reply([a_rr("mx.test", "127.0.0.1")] if q.qtype == T_A else [])
    return q.reply(rcode=0 if q.qname == ALABEL else 3)


def receiver(port, utf8):
    """An honest MX offering SMTPUTF8 or not; returns (mx, commands)."""
    cmds = []

    def script(c, rfile):
        class Spy:
            def readline(self):
                line = rfile.readline()
                if line[:4].upper() in (b"MAIL", b"RCPT"):
                    cmds.append(line.rstrip(b"\r\n"))
                return line
        ehlo = b"250-mx\r\n250-8BITMIME\r\n" + (b"250-SMTPUTF8\r\n" if utf8 else b"") + \
            b"250 PIPELINING\r\n"
        serve(c, Spy(), ehlo=ehlo)
    return HostileMx(port, script), cmds


def send(r, sender, rcpts, body=b"Subject: idn\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"):
    import smtplib
    with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as cl:
        cl.ehlo("tester")
        assert cl.has_extn("smtputf8")
        assert cl.sendmail(sender, rcpts, body, mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}


def no_utf8_query(r):
    asked = [q for q, _, _ in r.dns.asked]
    assert any(q == ALABEL for q, t, _ in r.dns.asked if t == T_MX), asked
    assert all(q.isascii() for q in asked), asked


def test_utf8_domain_goes_as_received_to_a_receiver_with_smtputf8():
    r = HostileRelay(idn_dns)
    mx, cmds = receiver(r.mx_port, utf8=True)
    try:
        send(r, "s@b\u00fccher.test", ["x@B\u00fccher.test", "j\u00f6rg@b\u00fccher.test"])
        evs = r.wait_events("delivery", 2)
        assert sorted(e["rcpt"] for e in evs) == ["j\u00f6rg@b\u00fccher.test",
                                                   "x@B\u00fccher.test"], evs
        assert all(e["domain"] == ALABEL for e in evs), evs
        assert not r.events("transient_failure") and not r.events("bounce"), r.events()
        assert cmds[0].startswith("MAIL FROM:<s@b\u00fccher.test> ".encode()), cmds
        assert b" SMTPUTF8" in cmds[0], cmds
        assert sorted(cmds[1:]) == sorted(["RCPT TO:<x@B\u00fccher.test>".encode(),
                                           "RCPT TO:<j\u00f6rg@b\u00fccher.test>".encode()]), cmds
        no_utf8_query(r)
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()


def test_ascii_local_part_goes_in_a_labels_to_a_receiver_without_smtputf8():
    r = HostileRelay(idn_dns)
    mx, cmds = receiver(r.mx_port, utf8=False)
    try:
        send(r, "s@b\u00fccher.test", ["x@b\u00fccher.test", "j\u00f6rg@b\u00fccher.test"],
             body=b"Subject: idn\r\n\r\nplain\r\n")
        ev = r.wait_events("delivery", 1)[0]
        assert ev["rcpt"] == "x@b\u00fccher.test" and ev["domain"] == ALABEL, ev
        bounce = r.wait_events("bounce", 1)[0]
        assert bounce["rcpt"] == "j\u00f6rg@b\u00fccher.test", bounce
        assert bounce["enhanced"] == "5.6.7" and bounce["domain"] == ALABEL, bounce
        # the sender's domain too: its local part is ASCII
        assert cmds == [b"MAIL FROM:<s@xn--bcher-kva.test> BODY=7BIT",
                        b"RCPT TO:<x@xn--bcher-kva.test>"], cmds
        assert b"SMTPUTF8" not in cmds[0], cmds
        no_utf8_query(r)
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()


def test_a_domain_that_is_no_idn_is_refused_at_rcpt():
    """A recipient domain in UTF-8 that is no valid IDNA2008 name (an
    emoji label) has no A-labels to deliver to: refused at RCPT with 553
    5.1.2 and libidn2's reason (it was taken and deferred until it
    expired); the other recipients of the message go."""
    import smtplib
    r = HostileRelay(idn_dns)
    mx, cmds = receiver(r.mx_port, utf8=True)
    try:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as cl:
            cl.ehlo("tester")
            refused = cl.sendmail("s@example.com", ["x@a\U0001f600b.test", "y@b\u00fccher.test"],
                                  b"Subject: idn\r\n\r\nhi\r\n", mail_options=["SMTPUTF8"])
        assert list(refused) == ["x@a\U0001f600b.test"], refused
        code, text = refused["x@a\U0001f600b.test"]
        assert code == 553 and text.startswith(b"5.1.2 Recipient domain is not a valid IDN: "), \
            refused
        ev = r.wait_events("delivery", 1)[0]
        assert ev["rcpt"] == "y@b\u00fccher.test", ev
        assert not r.events("transient_failure") and not r.events("bounce"), r.events()
        assert all(q.isascii() for q, _, _ in r.dns.asked), r.dns.asked
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()


def test_a_dsn_to_a_sender_domain_that_is_no_idn_fails_at_once():
    """MAIL FROM is not refused for its domain (a sender may be
    anything), so a DSN can be for a domain in UTF-8 that is no valid
    IDN: it bounces at once, 553 5.1.2, without a lookup (it was
    deferred as a DNS failure until it expired)."""
    r = HostileRelay(idn_dns, dsn=True)
    mx = HostileMx(r.mx_port, lambda c, rfile: serve(
        c, rfile, ehlo=b"250-mx\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n",
        rcpt_reply=lambda line: b"550 5.1.1 no such user\r\n"))
    try:
        send(r, "s@a\U0001f600b.test", ["x@b\u00fccher.test"], body=b"Subject: idn\r\n\r\nhi\r\n")
        evs = r.wait_events("bounce", 2)
        dsn = [e for e in evs if e["rcpt"] == "s@a\U0001f600b.test"]
        assert len(dsn) == 1 and dsn[0]["code"] == 553 and dsn[0]["enhanced"] == "5.1.2", evs
        assert "IDN" in dsn[0]["reply"], dsn
        assert not r.events("transient_failure"), r.events()
        assert all(q.isascii() for q, _, _ in r.dns.asked), r.dns.asked
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()


def test_a_dsn_quoting_utf8_reaches_a_sender_mx_without_smtputf8():
    """A recipient with a UTF-8 local part bounces (need_smtputf8) at an MX
    without SMTPUTF8; its DSN quotes that address, and goes to a sender
    whose MX has no SMTPUTF8 either: its parts are encoded (RFC 6532,
    6533), so it is 7-bit and delivered. It was 8-bit, bounced there, and
    a DSN's bounce is dropped: the sender heard of no failure at all."""
    def dns(q, tcp):
        if q.qname in (ALABEL, "sender.test") and q.qtype == T_MX:
            return q.reply([mx_rr(q.qname, 10, "mx.test")])
        return idn_dns(q, tcp)
    r = HostileRelay(dns, dsn=True)
    got = []
    mx = HostileMx(r.mx_port, lambda c, rfile: serve(
        c, rfile, ehlo=b"250-mx\r\n250-8BITMIME\r\n250 PIPELINING\r\n", got=got))
    try:
        send(r, "s@sender.test", ["j\u00f6rg@b\u00fccher.test"], body=b"Subject: x\r\n\r\nhi\r\n")
        bounce = r.wait_events("bounce", 1)[0]
        assert bounce["enhanced"] == "5.6.7", bounce
        ev = r.wait_events("delivery", 1)[0]
        assert ev["rcpt"] == "s@sender.test", ev
        assert len(got) == 1, got
        dsn = got[0]
        assert all(b < 128 for b in dsn), dsn[:600]
        assert b"message/global-delivery-status" in dsn, dsn[:1500]
        assert b"Content-Transfer-Encoding: quoted-printable" in dsn, dsn[:1500]
        assert b"utf-8; j=C3=B6rg@b=C3=BCcher.test" in dsn, dsn
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()


def test_operators_name_the_domain_in_a_labels():
    """The spool keeps the domain as received (U-labels); the delivery log
    and destinations name it in A-labels, and so may an operator:
    sluicectl queue and bounce by xn--bcher-kva.test find the mail to
    x@bücher.test (before, they matched nothing)."""
    sockdir = tempfile.mkdtemp(prefix="sluice-idn-")
    sock = os.path.join(sockdir, "stats.sock")
    r = HostileRelay(idn_dns, extra_conf=f"[stats]\nsocket = {sock}\n")
    mx = HostileMx(r.mx_port, lambda c, rfile: serve(
        c, rfile, ehlo=b"250-mx\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n",
        rcpt_reply=lambda line: b"451 4.2.1 later\r\n"))
    ctl = os.environ.get("SLUICECTL") or os.path.normpath(os.path.join(
        os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl"))

    def run_ctl(*args):
        p = subprocess.run([ctl, "-s", sock, "--json", *args], capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 0, (args, p.returncode, p.stderr)
        return json.loads(p.stdout)
    try:
        send(r, "s@example.com", ["x@b\u00fccher.test"], body=b"Subject: idn\r\n\r\nplain\r\n")
        ev = r.wait_events("transient_failure", 1)[0]
        assert ev["domain"] == ALABEL, ev
        q = run_ctl("queue", ALABEL)
        assert [[x["rcpt"] for x in m["recipients"]] for m in q["messages"]] == \
            [["x@b\u00fccher.test"]], q
        run_ctl("bounce", ALABEL)
        bounce = r.wait_events("bounce", 1)[0]
        assert bounce["rcpt"] == "x@b\u00fccher.test" and bounce["domain"] == ALABEL, bounce
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()
        shutil.rmtree(sockdir, ignore_errors=True)


if __name__ == "__main__":
    main([test_utf8_domain_goes_as_received_to_a_receiver_with_smtputf8,
          test_ascii_local_part_goes_in_a_labels_to_a_receiver_without_smtputf8,
          test_a_domain_that_is_no_idn_is_refused_at_rcpt,
          test_a_dsn_to_a_sender_domain_that_is_no_idn_fails_at_once,
          test_a_dsn_quoting_utf8_reaches_a_sender_mx_without_smtputf8,
          test_operators_name_the_domain_in_a_labels])
