"""Message bodies from submission to the next hop, against real servers
on loopback (dnsmasq for MX records, Postfix's smtp-sink as the MX):
a message whose client left between its final dot (or last BDAT chunk)
and the 250 is still delivered and logged without a restart; an empty
message (a lone "BDAT 0 LAST") is signed, stored and delivered; 8-bit
content declared BODY=7BIT (or undeclared, or sent with BDAT) is relayed
as 8BITMIME to a server that offers it and bounced with 5.6.3 by one
that does not, once no other MX host of the domain offers it: an MX host
without 8BITMIME, or whose SIZE is smaller than the message, sends it to
the next MX host (deferred when that one cannot be reached), over a
connection that carries only such messages, with no rate token spent on
passing it over, a connection to the first host ending to make room for
it at the domain's cap, and the refusals counted."""
import http.client
import json
import os
import re
import socket
import struct
import sys

from harness import Workdir, free_port, main, mdb_entries, run, stats_ask, wait_until
import test_delivery
from test_delivery import Relay, records_for, stuff, wait_sink

test_delivery.SLUICE = sys.argv[1]


def read_reply(f):
    """One (possibly multi-line) reply from a file over the socket."""
    lines = []
    while True:
        line = f.readline()
        assert line, f"connection closed after {lines}"
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


def hello(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    f = s.makefile("rb")
    assert read_reply(f).startswith(b"220")
    s.sendall(b"EHLO tester\r\n")
    assert b"CHUNKING" in read_reply(f)
    return s, f


def reset_close(s, f):
    """Close with a reset (SO_LINGER 0): nothing the server sends after
    this reaches anyone, and its next send fails."""
    f.close()  # else the socket stays open as long as its file does
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_client_gone_before_250_still_delivered():
    """Clients that send the end of their message and reset the
    connection at once: each message sluice stored is delivered and
    logged (event=queued, the delivery log's reception) without a
    restart; the spool ends empty."""
    dlog_conf = "[log]\ndelivery_log = @DLOG@\ndelivery_log_flush = 50ms\n"
    r = Relay(records_for(["gone.test"]), domain_conf=dlog_conf)
    try:
        n = 20
        for i in range(n):
            body = f"Subject: gone {i}\r\nX-Seq: {i}\r\n\r\nleft before the 250\r\n".encode()
            # BDAT: MAIL, RCPT and the last chunk in one write; the replies
            # to MAIL and RCPT are still going out while the chunk commits.
            s, f = hello(r.port)
            s.sendall(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<b%d@gone.test>\r\n"
                      b"BDAT %d LAST\r\n" % (i, len(body)) + body)
            reset_close(s, f)
            # DATA: the final dot, then a reset.
            s, f = hello(r.port)
            s.sendall(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<d%d@gone.test>\r\nDATA\r\n" % i)
            for _ in range(2):
                assert read_reply(f).startswith(b"250")
            assert read_reply(f).startswith(b"354")
            s.sendall(stuff(body) + b".\r\n")
            reset_close(s, f)
        # Every session is over once sluice logged its disconnect (a
        # session waits for its commit before it is freed).
        r.d.wait_log_count("event=disconnect", 2 * n, timeout=60)
        queued = r.d.count_log("event=queued")
        assert queued >= n, f"only {queued} of {2 * n} messages were stored"
        wait_until(lambda: r.d.count_log("event=delivered") >= queued, 60,
                   f"{queued} stored messages delivered")
        wait_sink(r, queued, timeout=30)
        gone = r.d.count_log("client_gone=1")
        print(f"     {queued} of {2 * n} stored, {gone} of them after the client left; "
              "all delivered")
        receptions = []
        wait_until(lambda: len([1 for ln in open(r.dlog, "rb")
                                if json.loads(ln)["event"] == "reception"]) >= queued,
                   30, "a reception event per stored message")
        with open(r.dlog, "rb") as fh:
            receptions = [json.loads(ln) for ln in fh if json.loads(ln)["event"] == "reception"]
        assert len(receptions) == queued, (len(receptions), queued)
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0, "stored messages left in the spool"
    finally:
        r.close()


EIGHT = "Grüße aus Köln — ĉu vi?\r\n".encode()


def inject_raw(r, mail_args, body, bdat=False, rcpt=b"u@eight.test"):
    """One message over a raw socket; returns the final reply."""
    s, f = hello(r.port)
    try:
        s.sendall(b"MAIL FROM:<s@example.com>%s\r\n" % mail_args)
        assert read_reply(f).startswith(b"250")
        s.sendall(b"RCPT TO:<%s>\r\n" % rcpt)
        assert read_reply(f).startswith(b"250")
        if bdat:
            half = len(body) // 2
            s.sendall(b"BDAT %d\r\n" % half + body[:half])
            assert read_reply(f).startswith(b"250")
            s.sendall(b"BDAT %d LAST\r\n" % (len(body) - half) + body[half:])
        else:
            s.sendall(b"DATA\r\n")
            assert read_reply(f).startswith(b"354")
            s.sendall(stuff(body) + b".\r\n")
        rep = read_reply(f)
        s.sendall(b"QUIT\r\n")
        return rep
    finally:
        s.close()


def test_8bit_declared_7bit_goes_as_8bitmime():
    """8-bit content declared BODY=7BIT, undeclared, and in BDAT chunks:
    stored as 8BITMIME and sent with BODY=8BITMIME (smtp-sink records
    MAIL's arguments); a 7-bit message stays 7BIT."""
    r = Relay(records_for(["eight.test"]))
    try:
        cases = [(b" BODY=7BIT", False), (b"", False), (b" BODY=7BIT", True)]
        for i, (args, bdat) in enumerate(cases):
            body = b"Subject: eight %d\r\nX-Seq: %d\r\n\r\n" % (i, i) + EIGHT
            rep = inject_raw(r, args, body, bdat)
            assert rep.startswith(b"250"), rep
        rep = inject_raw(r, b" BODY=7BIT", b"Subject: seven\r\nX-Seq: 9\r\n\r\nplain\r\n")
        assert rep.startswith(b"250"), rep
        queued = r.d.wait_log_count("event=queued", 4)
        assert [("body=8BITMIME" in q) for q in queued] == [True, True, True, False], queued
        got = wait_sink(r, 4)
        for dump in got:
            seq = int(dump.split(b"X-Seq: ")[1].split(b"\n")[0])
            args = dump.split(b"X-Mail-Args: ")[1].split(b"\n")[0]
            if seq == 9:
                assert b"BODY=8BITMIME" not in args, args
            else:
                assert b"BODY=8BITMIME" in args, (seq, args)
                assert EIGHT.replace(b"\r\n", b"\n") in dump, dump[-200:]
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_8bit_to_a_server_without_8bitmime_bounces_563():
    """smtp-sink -8 (no 8BITMIME): the message declared BODY=7BIT but
    carrying 8-bit octets bounces with 5.6.3 instead of being sent as
    7BIT; a 7-bit one to the same server is delivered."""
    dlog_conf = "[log]\ndelivery_log = @DLOG@\ndelivery_log_flush = 50ms\n"
    r = Relay(records_for(["eight.test"]), sink_flags=["-8"], domain_conf=dlog_conf)
    try:
        rep = inject_raw(r, b" BODY=7BIT", b"Subject: eight\r\n\r\n" + EIGHT)
        assert rep.startswith(b"250"), rep
        rep = inject_raw(r, b"", b"Subject: seven\r\nX-Seq: 7\r\n\r\nplain\r\n")
        assert rep.startswith(b"250"), rep

        def evs():
            if not os.path.exists(r.dlog):
                return []
            with open(r.dlog, "rb") as fh:
                return [json.loads(ln) for ln in fh]

        wait_until(lambda: [e for e in evs() if e["event"] == "bounce"]
                   and [e for e in evs() if e["event"] == "delivery"], 60,
                   "one bounce and one delivery")
        (b,) = [e for e in evs() if e["event"] == "bounce"]
        assert "5.6.3" in json.dumps(b), b
        got = wait_sink(r, 1)
        assert len(got) == 1 and b"X-Seq: 7" in got[0], got
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        r.close()


def test_empty_bdat_message_signed_and_delivered():
    """A transaction whose only chunk is "BDAT 0 LAST" (RFC 3030 allows a
    zero-length last chunk), from a sender whose domain has a DKIM key:
    250, then the message (sluice's own fields, nothing else) is signed
    and delivered, as one sent with DATA and a lone dot is; the session
    goes on. It used to reach the signer with no body buffer at all, and
    copy from a NULL pointer: under UBSan (the sanitizer build) sluice
    aborted and the client saw the connection drop."""
    kd = Workdir("sluice-empty-key-")
    r = None
    try:
        key = os.path.join(kd.path, "k.pem")
        g = run(["openssl", "genpkey", "-algorithm", "ED25519", "-out", key])
        assert g.returncode == 0, g.stderr
        r = Relay(records_for(["empty.test"]),
                  domain_conf=f"[dkim]\nsigning_domain = envelope\n"
                              f"[dkim example.com k]\nkey_file = {key}\n")
        s, f = hello(r.port)
        try:
            s.sendall(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<u@empty.test>\r\n"
                      b"BDAT 0 LAST\r\n")
            for _ in range(2):
                assert read_reply(f).startswith(b"250")
            rep = read_reply(f)
            assert rep.startswith(b"250 2.0.0 Ok: queued as"), rep
            s.sendall(b"NOOP\r\n")
            assert read_reply(f).startswith(b"250"), "the session did not go on"
            s.sendall(b"QUIT\r\n")
            assert read_reply(f).startswith(b"221")
        finally:
            s.close()
        got = wait_sink(r, 1)
        assert len(got) == 1, got
        head, sep, body = got[0].partition(b"\r\n\r\n")
        assert b"DKIM-Signature:" in head and b"d=example.com" in head, got[0][:800]
        assert b"Received:" in head and body in (b"", b".\r\n"), got[0][:800]
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        if r is not None:
            r.close()
        kd.cleanup()


def _dlog_events(r):
    if not os.path.exists(r.dlog):
        return []
    with open(r.dlog, "rb") as fh:
        return [json.loads(ln) for ln in fh]


def _deliveries(r):
    """The delivery log's delivery records."""
    return [e for e in _dlog_events(r) if e["event"] == "delivery"]


def _bounces(r):
    """The delivery log's bounce records."""
    return [e for e in _dlog_events(r) if e["event"] == "bounce"]


def _outcomes(r):
    """The delivery log's records of outcomes (all but receptions)."""
    return [e for e in _dlog_events(r) if e["event"] != "reception"]


def test_8bit_goes_to_the_next_mx_that_has_8bitmime():
    """MX 10 without 8BITMIME (smtp-sink -8 on 127.0.0.1), MX 20 with it
    (smtp-sink on 127.0.0.2): an 8-bit message is delivered at MX 20, not
    bounced 5.6.3 at MX 10 (the host lacks the extension, the message is
    fine); the connection to MX 10 is not closed for it (it idles out),
    and the domain's next mail goes to MX 10 again. Both MX hosts without
    8BITMIME (another domain): the 8-bit message bounces 5.6.3 at once
    with the last one's reply, deferred nowhere. The stats socket,
    sluicectl stats and /metrics count the three refusals, two of them
    sent on to the next MX host, and each domain its own."""
    hport = free_port()
    dlog_conf = ("[log]\nlevel = debug\ndelivery_log = @DLOG@\n"
                 "delivery_log_flush = 50ms\n"
                 f"[stats]\nsocket = @SOCK@\nhttp_listen = 127.0.0.1:{hport}\n")
    recs = ["host-record=mx1.test,127.0.0.1", "host-record=mx2.test,127.0.0.2",
            "host-record=mx3.test,127.0.0.3",
            "mx-host=eight.test,mx1.test,10", "mx-host=eight.test,mx2.test,20",
            "mx-host=none.test,mx1.test,10", "mx-host=none.test,mx3.test,20"]
    # a window of two: the detour's connection needs no slot of the one
    # to MX 10 (with one, that idle connection would give it up: site.h)
    sock_dir = Workdir("sluice-8bit-sock-")
    sock = os.path.join(sock_dir.path, "stats.sock")
    r = Relay(recs, sink_flags=["-8"], domain_conf=dlog_conf.replace("@SOCK@", sock),
              delivery_conf="initial_connections = 2")
    sink2 = sink3 = None

    try:
        sink2 = test_delivery.Sink(r.wd, r.mx_port, name="sink2", host="127.0.0.2")
        sink3 = test_delivery.Sink(r.wd, r.mx_port, flags=["-8"], name="sink3",
                                   host="127.0.0.3")
        rep = inject_raw(r, b" BODY=8BITMIME", b"Subject: eight\r\nX-Seq: 8\r\n\r\n" + EIGHT)
        assert rep.startswith(b"250"), rep
        wait_until(lambda: _deliveries(r) or _bounces(r), 60, "a delivery, or a bounce")
        assert _bounces(r) == [], _bounces(r)
        at2 = sink2.messages()
        assert len(at2) == 1 and b"X-Seq: 8" in at2[0], at2
        assert r.sink.files() == []
        assert r.d.count_log("event=host_refused domain=eight.test mx=mx1.test") == 1
        # both connections idle out (1 s): the one to MX 10 was kept
        r.d.wait_log_count("event=conn_close", 2, timeout=30)
        assert r.d.count_log("event=conn_close domain=eight.test mx=mx1.test") == 1
        closed = r.d.log_lines("event=conn_close domain=eight.test mx=mx1.test")
        assert "reason=idle_timeout" in closed[0], (closed, r.d.log_lines("conn="))
        rep = inject_raw(r, b"", b"Subject: seven\r\nX-Seq: 7\r\n\r\nplain\r\n")
        assert rep.startswith(b"250"), rep
        wait_until(lambda: len(_deliveries(r)) >= 2 or _bounces(r), 60, "a second delivery")
        at1 = r.sink.messages()
        assert len(at1) == 1 and b"X-Seq: 7" in at1[0], (at1, sink2.files())
        # no MX of none.test has 8BITMIME: bounced, not deferred nor looping
        rep = inject_raw(r, b" BODY=8BITMIME", b"Subject: none\r\n\r\n" + EIGHT,
                         rcpt=b"u@none.test")
        assert rep.startswith(b"250"), rep
        wait_until(lambda: _bounces(r), 60, "a bounce at none.test")
        (b,) = _bounces(r)
        assert b["enhanced"] == "5.6.3" and b["mx"] == "mx3.test", b
        assert sink3.files() == [] and len(r.sink.files()) == 1
        assert [e for e in _dlog_events(r) if e["event"] == "transient_failure"] == []
        # eight.test refused by mx1.test; none.test by mx1.test, then mx3.test
        conns = stats_ask(sock)["connections"]
        assert (conns["host_refused"], conns["host_detoured"]) == (3, 2), conns
        doms = {x["name"]: (x["host_refused"], x["host_detoured"])
                for x in stats_ask(sock, "domains")["domains"]}
        assert doms == {"eight.test": (1, 1), "none.test": (2, 1)}, doms
        ctl = os.environ.get("SLUICECTL") or os.path.normpath(os.path.join(
            os.path.dirname(os.path.abspath(test_delivery.SLUICE)), "..", "tools", "sluicectl"))
        out = run([ctl, "-s", sock, "stats"])
        assert out.returncode == 0, out.stderr
        rows = [ln.split() for ln in out.stdout.splitlines()
                if "refused by an MX host" in ln or "sent to the next MX host" in ln]
        assert [ln[-1] for ln in rows] == ["3", "2"], out.stdout
        c = http.client.HTTPConnection("127.0.0.1", hport, timeout=10)
        try:
            c.request("GET", "/metrics")
            text = c.getresponse().read().decode()
        finally:
            c.close()
        for name, want in (("sluice_host_refusals_total", "3"),
                           ("sluice_host_detours_total", "2")):
            assert re.search(rf"^{name} {want}$", text, re.M), (name, text[:2000])
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        for s in (sink2, sink3):
            if s is not None:
                s.stop()
        r.close()
        sock_dir.cleanup()


def test_8bit_deferred_when_the_mx_with_8bitmime_is_down():
    """MX 10 without 8BITMIME, MX 20 (127.0.0.4) refusing connections: the
    8-bit message is deferred (4.6.3), not bounced for a host that lacks
    8BITMIME while the one that may have it was not heard, nor left
    waiting in memory."""
    dlog_conf = "[log]\ndelivery_log = @DLOG@\ndelivery_log_flush = 50ms\n"
    recs = ["host-record=mx1.test,127.0.0.1", "host-record=mx2.test,127.0.0.4",
            "mx-host=eight.test,mx1.test,10", "mx-host=eight.test,mx2.test,20"]
    r = Relay(recs, sink_flags=["-8"], domain_conf=dlog_conf, idle_timeout="30s",
              delivery_conf="initial_connections = 2")
    try:
        rep = inject_raw(r, b" BODY=8BITMIME", b"Subject: eight\r\n\r\n" + EIGHT)
        assert rep.startswith(b"250"), rep
        wait_until(lambda: _outcomes(r), 20, "an outcome")
        evs = _outcomes(r)
        assert [e["event"] for e in evs] == ["transient_failure"], evs
        assert evs[0]["enhanced"] == "4.6.3" and evs[0]["mx"] == "mx1.test", evs
        assert r.d.count_log("event=connect_failed domain=eight.test mx=mx2.test") >= 1
        assert r.sink.files() == []
    finally:
        r.close()

def _seq_receiver(got, name, ehlo, delay=0):
    """An MX that greets as name, answers EHLO with ehlo (its whole reply)
    and takes what comes, each message's dot answered after delay seconds
    (a receiver's filtering); got collects each message's X-Seq line."""
    import time

    def script(c, rfile):
        c.sendall(b"220 " + name + b" ESMTP\r\n")
        while True:
            line = rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                c.sendall(ehlo)
            elif verb == b"DATA":
                c.sendall(b"354 go ahead\r\n")
                lines = test_delivery.read_message(rfile)
                if lines is None:
                    return
                seq = b""
                for body in lines:
                    if body.startswith(b"X-Seq:"):
                        seq = body.strip()
                if delay:
                    time.sleep(delay)  # the receiver's own pace, not a wait of the test's
                got.append(seq)
                c.sendall(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                c.sendall(b"221 bye\r\n")
                return
            else:
                c.sendall(b"250 ok\r\n")
    return script


def _size_receiver(got, limit, ext=b""):
    """An MX that announces SIZE limit (and ext, "250-X\\r\\n" lines) and
    takes what comes; got collects each message's X-Seq line."""
    return _seq_receiver(got, b"small", b"250-small\r\n250-PIPELINING\r\n250-8BITMIME\r\n" +
                         ext + b"250 SIZE %d\r\n" % limit)


def test_message_over_one_mx_size_goes_to_the_next_mx():
    """MX 10 announces SIZE 2000 (on 127.0.0.1), MX 20 no limit
    (smtp-sink on 127.0.0.2): a small message goes to MX 10; a
    5,000-octet one after it is delivered at MX 20, not bounced 5.3.4 for
    MX 10's limit, and the connection to MX 10 stays open for it."""
    dlog_conf = "[log]\ndelivery_log = @DLOG@\ndelivery_log_flush = 50ms\n"
    recs = ["host-record=mx1.test,127.0.0.1", "host-record=mx2.test,127.0.0.2",
            "mx-host=eight.test,mx1.test,10", "mx-host=eight.test,mx2.test,20"]
    r = Relay(recs, with_sink=False, domain_conf=dlog_conf, idle_timeout="10s",
              delivery_conf="initial_connections = 2")
    got = []
    mx = test_delivery.HostileMx(r.mx_port, _size_receiver(got, 2000))
    sink2 = None
    try:
        sink2 = test_delivery.Sink(r.wd, r.mx_port, name="sink2", host="127.0.0.2")
        rep = inject_raw(r, b"", b"Subject: small\r\nX-Seq: small\r\n\r\nsmall\r\n")
        assert rep.startswith(b"250"), rep
        wait_until(lambda: got, 60, "the small message at MX 10")
        big = b"Subject: big\r\nX-Seq: big\r\n\r\n" + (b"0123456789abcdef" * 4 + b"\r\n") * 80
        rep = inject_raw(r, b"", big)
        assert rep.startswith(b"250"), rep
        wait_until(lambda: len(_deliveries(r)) >= 2 or _bounces(r), 60,
                   "two deliveries, or a bounce")
        bounces = _bounces(r)
        assert bounces == [], bounces
        at2 = sink2.messages()
        assert len(at2) == 1 and b"X-Seq: big" in at2[0], at2
        assert got == [b"X-Seq: small"], got
        assert r.d.count_log("event=host_refused domain=eight.test mx=mx1.test") == 1
        assert r.d.count_log("event=connected domain=eight.test mx=mx1.test") == 1
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        if sink2 is not None:
            sink2.stop()
        mx.stop()
        r.close()


def test_utf8_envelope_goes_to_the_next_mx_that_has_smtputf8():
    """MX 10 without SMTPUTF8 (smtp-sink on 127.0.0.1), MX 20 with it (on
    127.0.0.2): a message to a UTF-8 local part is delivered at MX 20,
    not bounced 5.6.7 at MX 10."""
    dlog_conf = "[log]\ndelivery_log = @DLOG@\ndelivery_log_flush = 50ms\n"
    recs = ["host-record=mx1.test,127.0.0.1", "host-record=mx2.test,127.0.0.2",
            "mx-host=eight.test,mx1.test,10", "mx-host=eight.test,mx2.test,20"]
    r = Relay(recs, domain_conf=dlog_conf, delivery_conf="initial_connections = 2")
    got = []
    mx2 = test_delivery.HostileMx(r.mx_port, _size_receiver(got, 0, b"250-SMTPUTF8\r\n"),
                                  host="127.0.0.2")
    try:
        rep = inject_raw(r, b" SMTPUTF8", b"Subject: utf8\r\nX-Seq: utf8\r\n\r\n" + EIGHT,
                         rcpt="jö@eight.test".encode())
        assert rep.startswith(b"250"), rep
        wait_until(lambda: [e for e in _dlog_events(r) if e["event"] in ("delivery", "bounce")],
                   60, "a delivery, or a bounce")
        evs = [e for e in _dlog_events(r) if e["event"] in ("delivery", "bounce")]
        assert [e["event"] for e in evs] == ["delivery"] and evs[0]["mx"] == "mx2.test", evs
        assert got == [b"X-Seq: utf8"] and r.sink.files() == [], got
        assert r.d.count_log("event=host_refused domain=eight.test mx=mx1.test") == 1
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        mx2.stop()
        r.close()


def _first_refused_receiver(got, conns):
    """An MX with 8BITMIME that greets its first connection with 554 and
    takes mail on the others; conns counts the connections."""
    takes = _size_receiver(got, 0)

    def script(c, rfile):
        conns.append(1)
        if len(conns) == 1:
            c.sendall(b"554 5.7.1 not now\r\n")
            return
        takes(c, rfile)
    return script


def test_detour_that_fails_leaves_the_domain_at_its_first_mx():
    """MX 10 without 8BITMIME (smtp-sink -8), MX 20 refusing its first
    connection (a 554 greeting), the one the 8-bit message's detour
    opens: the message is deferred, and the domain's next mail goes to
    MX 10 again once the connection to it has idled out, not to MX 20
    (the detour's failure is no failure of MX 10)."""
    dlog_conf = ("[log]\nlevel = debug\ndelivery_log = @DLOG@\n"
                 "delivery_log_flush = 50ms\n")
    recs = ["host-record=mx1.test,127.0.0.1", "host-record=mx2.test,127.0.0.2",
            "mx-host=eight.test,mx1.test,10", "mx-host=eight.test,mx2.test,20"]
    r = Relay(recs, sink_flags=["-8"], domain_conf=dlog_conf,
              delivery_conf="initial_connections = 2")
    got, conns = [], []
    mx2 = test_delivery.HostileMx(r.mx_port, _first_refused_receiver(got, conns),
                                  host="127.0.0.2")
    try:
        rep = inject_raw(r, b" BODY=8BITMIME", b"Subject: eight\r\n\r\n" + EIGHT)
        assert rep.startswith(b"250"), rep
        wait_until(lambda: _outcomes(r), 20, "an outcome")
        evs = _outcomes(r)
        assert [e["event"] for e in evs] == ["transient_failure"], evs
        assert len(conns) == 1, conns
        # the connection to MX 10 idles out (1 s)
        r.d.wait_log("event=conn_close domain=eight.test mx=mx1.test", timeout=30)
        rep = inject_raw(r, b"", b"Subject: seven\r\nX-Seq: 7\r\n\r\nplain\r\n")
        assert rep.startswith(b"250"), rep
        wait_until(lambda: _deliveries(r), 30, "a delivery")
        (dv,) = _deliveries(r)
        assert dv["mx"] == "mx1.test" and got == [], (dv, got)
        assert len(r.sink.messages()) == 1
    finally:
        mx2.stop()
        r.close()


def test_8bit_goes_to_a_next_mx_whose_name_hashes_alike():
    """MX 10 (mx1.test) without 8BITMIME, MX 20 with it under a name
    whose 16-bit hash is mx1.test's (mx17249.test): the 8-bit message is
    delivered at MX 20, not taken for refused there and deferred at
    every attempt until it expires."""
    dlog_conf = "[log]\ndelivery_log = @DLOG@\ndelivery_log_flush = 50ms\n"
    recs = ["host-record=mx1.test,127.0.0.1", "host-record=mx17249.test,127.0.0.2",
            "mx-host=eight.test,mx1.test,10", "mx-host=eight.test,mx17249.test,20"]
    r = Relay(recs, sink_flags=["-8"], domain_conf=dlog_conf,
              delivery_conf="initial_connections = 2")
    sink2 = None
    try:
        sink2 = test_delivery.Sink(r.wd, r.mx_port, name="sink2", host="127.0.0.2")
        rep = inject_raw(r, b" BODY=8BITMIME", b"Subject: eight\r\nX-Seq: 8\r\n\r\n" + EIGHT)
        assert rep.startswith(b"250"), rep
        wait_until(lambda: _outcomes(r), 30, "an outcome")
        evs = _outcomes(r)
        assert [e["event"] for e in evs] == ["delivery"], evs
        assert evs[0]["mx"] == "mx17249.test", evs
        assert len(sink2.messages()) == 1 and r.sink.files() == []
    finally:
        if sink2 is not None:
            sink2.stop()
        r.close()


def _dlog_rate_conf(extra=""):
    return ("[log]\nlevel = debug\ndelivery_log = @DLOG@\ndelivery_log_flush = 50ms\n" + extra)


def _two_mx_records():
    return ["host-record=mx1.test,127.0.0.1", "host-record=mx2.test,127.0.0.2",
            "mx-host=eight.test,mx1.test,10", "mx-host=eight.test,mx2.test,20"]


def test_detour_connection_carries_only_the_refused_mail():
    """MX 10 without 8BITMIME, MX 20 with it, connections idle for 10 s:
    once an 8-bit message went to MX 20 (a detour), the domain's 7-bit
    mail goes to MX 10, not over the connection to MX 20 idling there
    (it was resumed first, and MX 20 took the domain's mail until it
    idled out); a second 8-bit message reuses that connection."""
    r = Relay(_two_mx_records(), sink_flags=["-8"], domain_conf=_dlog_rate_conf(),
              idle_timeout="10s", delivery_conf="initial_connections = 2")
    sink2 = None

    try:
        sink2 = test_delivery.Sink(r.wd, r.mx_port, name="sink2", host="127.0.0.2")
        rep = inject_raw(r, b" BODY=8BITMIME", b"Subject: e\r\nX-Seq: 8a\r\n\r\n" + EIGHT)
        assert rep.startswith(b"250"), rep
        wait_until(lambda: len(sink2.files()) == 1, 30, "the 8-bit message at MX 20")
        for i in range(5):
            rep = inject_raw(r, b"", b"Subject: s\r\nX-Seq: 7-%d\r\n\r\nplain\r\n" % i)
            assert rep.startswith(b"250"), rep
            wait_until(lambda: len(_deliveries(r)) == 2 + i, 30, "the 7-bit message delivered")
        at2 = sink2.messages()
        assert len(at2) == 1, [m[:200] for m in at2]
        assert len(r.sink.files()) == 5
        assert {e["mx"] for e in _deliveries(r)[1:]} == {"mx1.test"}, _deliveries(r)
        rep = inject_raw(r, b" BODY=8BITMIME", b"Subject: e\r\nX-Seq: 8b\r\n\r\n" + EIGHT)
        assert rep.startswith(b"250"), rep
        wait_until(lambda: len(sink2.files()) == 2, 30, "the second 8-bit message at MX 20")
        assert r.d.count_log("event=connected domain=eight.test mx=mx2.test") == 1
        # (read from sluice's log as it comes: the sink may hold the
        # message before the line is read)
        r.d.wait_log_count("event=host_refused domain=eight.test mx=mx1.test", 2)
        assert r.d.count_log("event=host_refused domain=eight.test mx=mx1.test") == 2
        assert [e for e in _dlog_events(r) if e["event"] not in ("reception", "delivery")] == []
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        if sink2 is not None:
            sink2.stop()
        r.close()


def test_detour_spends_no_rate_token_on_passes():
    """The domain's max_message_rate (1/h, a burst of 4: five messages
    now): an 8-bit message refused by MX 10 (which spends one) and
    delivered at MX 20 (one), then three 7-bit messages, all go now. The
    connection to MX 10 that passed the refused message over (to leave
    it for MX 20's) took a token each time, and the third message waited
    for the next hour."""
    r = Relay(_two_mx_records(), sink_flags=["-8"], idle_timeout="10s",
              domain_conf=_dlog_rate_conf("[domain eight.test]\nmax_message_rate = 1/h\n"
                                          "message_burst = 4\n"),
              delivery_conf="initial_connections = 2")
    sink2 = None

    try:
        sink2 = test_delivery.Sink(r.wd, r.mx_port, name="sink2", host="127.0.0.2")
        rep = inject_raw(r, b" BODY=8BITMIME", b"Subject: e\r\nX-Seq: 8\r\n\r\n" + EIGHT)
        assert rep.startswith(b"250"), rep
        wait_until(lambda: len(_deliveries(r)) == 1, 30, "the 8-bit message at MX 20")
        for i in range(3):
            rep = inject_raw(r, b"", b"Subject: s\r\nX-Seq: 7-%d\r\n\r\nplain\r\n" % i)
            assert rep.startswith(b"250"), rep
        wait_until(lambda: len(_deliveries(r)) == 4, 20, "the three 7-bit messages")
        assert len(sink2.files()) == 1 and len(r.sink.files()) == 3
    finally:
        if sink2 is not None:
            sink2.stop()
        r.close()


def _slow_receiver(got, delay):
    """An MX without 8BITMIME that answers each message's dot after delay
    seconds (a receiver's filtering); got collects the X-Seq lines."""
    return _seq_receiver(got, b"slow", b"250-slow\r\n250 PIPELINING\r\n", delay)


def test_detour_waits_behind_busy_connections_to_the_first_mx():
    """The domain at its max_connections (3), all three to MX 10 (no
    8BITMIME) busy with a backlog of 7-bit mail: an 8-bit message among
    it is delivered at MX 20, not deferred 4.6.3. Each transaction of
    the three passed it over (32 times at most), no connection to MX 20
    could open while they lived, and it was deferred with MX 20 up. Now
    one of them ends for MX 20's, and MX 20's ends once it has carried
    the message, for MX 10's (it idled, holding the slot, before)."""
    r = Relay(_two_mx_records(), with_sink=False, idle_timeout="10s",
              domain_conf=_dlog_rate_conf("[domain eight.test]\nmax_connections = 3\n"),
              delivery_conf="initial_connections = 3")
    got = []
    mx = test_delivery.HostileMx(r.mx_port, _slow_receiver(got, 0.02))
    sink2 = None

    try:
        sink2 = test_delivery.Sink(r.wd, r.mx_port, name="sink2", host="127.0.0.2")
        msgs = [("s@example.com", ["u@eight.test"],
                 b"Subject: s\r\nX-Seq: 7-%d\r\n\r\nplain\r\n" % i) for i in range(240)]
        msgs.insert(30, ("s@example.com", ["u@eight.test"],
                         b"Subject: e\r\nX-Seq: 8\r\n\r\n" + EIGHT))
        r.inject(msgs, sessions=1)
        wait_until(lambda: len(_outcomes(r)) == 241, 120, "every message's outcome")
        evs = _outcomes(r)
        assert [e for e in evs if e["event"] != "delivery"] == [], \
            [e for e in evs if e["event"] != "delivery"]
        at2 = sink2.messages()
        assert len(at2) == 1 and b"X-Seq: 8" in at2[0], len(at2)
        assert len(got) == 240, len(got)
        # one to MX 10 made room for MX 20's, which made room again once
        # it had carried the message, the backlog not drained yet
        assert r.d.count_log("event=conn_close domain=eight.test mx=mx1.test "
                             "addr=127.0.0.1:%d reason=host_refused" % r.mx_port) == 1
        assert r.d.count_log("event=conn_close domain=eight.test mx=mx2.test "
                             "addr=127.0.0.2:%d reason=detour_done" % r.mx_port) == 1
        assert r.d.count_log("event=connected domain=eight.test mx=mx1.test") == 4
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        if sink2 is not None:
            sink2.stop()
        mx.stop()
        r.close()



def test_detour_with_a_window_of_one():
    """initial_connections = 1: the site's one connection is MX 10's
    (no 8BITMIME); an 8-bit message needs MX 20's, so that connection
    ends to make room for it, and the domain's next 7-bit mail goes to MX
    10 again, the idle connection to MX 20 ending in turn (a window of
    one holds one connection: MX 20 took the domain's mail before)."""
    r = Relay(_two_mx_records(), sink_flags=["-8"], domain_conf=_dlog_rate_conf(),
              idle_timeout="10s", delivery_conf="initial_connections = 1")
    sink2 = None

    try:
        sink2 = test_delivery.Sink(r.wd, r.mx_port, name="sink2", host="127.0.0.2")
        rep = inject_raw(r, b"", b"Subject: s\r\nX-Seq: 7-a\r\n\r\nplain\r\n")
        assert rep.startswith(b"250"), rep
        wait_until(lambda: len(_deliveries(r)) == 1, 30, "the first 7-bit message")
        rep = inject_raw(r, b" BODY=8BITMIME", b"Subject: e\r\nX-Seq: 8\r\n\r\n" + EIGHT)
        assert rep.startswith(b"250"), rep
        wait_until(lambda: len(_deliveries(r)) == 2, 30, "the 8-bit message")
        rep = inject_raw(r, b"", b"Subject: s\r\nX-Seq: 7-b\r\n\r\nplain\r\n")
        assert rep.startswith(b"250"), rep
        wait_until(lambda: len(_deliveries(r)) == 3, 30, "the second 7-bit message")
        assert [e["mx"] for e in _deliveries(r)] == ["mx1.test", "mx2.test", "mx1.test"], \
            _deliveries(r)
        # three connections for three messages: the price of a window of one
        assert r.d.count_log("event=connected domain=eight.test") == 3
        assert r.d.count_log("event=conn_close domain=eight.test mx=mx1.test "
                             "addr=127.0.0.1:%d reason=host_refused" % r.mx_port) == 1
        assert r.d.stop_clean() == 0
    finally:
        if sink2 is not None:
            sink2.stop()
        r.close()



def _two_in_turn(r, eight_first, closed):
    """Into r (eight.test on MX 10 without 8BITMIME and MX 20, whose sink
    starts here): the 8-bit message, then a 7-bit one once it is
    delivered (eight_first), or the other way round. The second goes at
    once (within 10 s) to its own host, MX 20 for the 8-bit one, MX 10
    for the 7-bit one; closed, the (mx, address, reason) of the connection
    that ended to make room for it, is logged once. Stops r."""
    import time
    sink2 = None
    eight = (b" BODY=8BITMIME", b"Subject: e\r\nX-Seq: 8\r\n\r\n" + EIGHT, "mx2.test",
             "the 8-bit message")
    seven = (b"", b"Subject: s\r\nX-Seq: 7\r\n\r\nplain\r\n", "mx1.test", "the 7-bit message")
    first, second = (eight, seven) if eight_first else (seven, eight)

    try:
        sink2 = test_delivery.Sink(r.wd, r.mx_port, name="sink2", host="127.0.0.2")
        rep = inject_raw(r, first[0], first[1])
        assert rep.startswith(b"250"), rep
        wait_until(lambda: len(_deliveries(r)) == 1, 30, f"{first[3]} at {first[2]}")
        rep = inject_raw(r, second[0], second[1])
        assert rep.startswith(b"250"), rep
        t0 = time.monotonic()
        wait_until(lambda: len(_deliveries(r)) == 2, 40, second[3])
        took = time.monotonic() - t0
        assert [e["mx"] for e in _deliveries(r)] == [first[2], second[2]], _deliveries(r)
        assert took < 10, took
        assert r.d.count_log("event=conn_close domain=eight.test mx=%s addr=%s:%d reason=%s"
                             % (closed[0], closed[1], r.mx_port, closed[2])) == 1
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        if sink2 is not None:
            sink2.stop()
        r.close()


def test_detour_connection_ends_for_mail_at_the_domains_cap():
    """max_connections = 1, connections idle for 30 s: MX 10's connection
    ends for MX 20's (the 8-bit message), which idles once it has carried
    it; the domain's next 7-bit mail, queued after that, goes to MX 10
    at once, the detour's connection ending for it (reason=detour_done),
    not 30 s later when it idles out (the domain's run resumed no detour
    connection without refused mail and, at its cap, opened none)."""
    r = Relay(_two_mx_records(), sink_flags=["-8"], idle_timeout="30s",
              domain_conf=_dlog_rate_conf("[domain eight.test]\nmax_connections = 1\n"),
              delivery_conf="initial_connections = 2")
    _two_in_turn(r, eight_first=True, closed=("mx2.test", "127.0.0.2", "detour_done"))


def test_8bit_goes_to_the_third_mx_when_two_lack_8bitmime():
    """MX 10 and MX 20 without 8BITMIME (smtp-sink -8), MX 30 with it,
    connections idling for 30 s: the 8-bit message refused by MX 10, then
    by MX 20 over the detour's connection, is delivered at MX 30 at once,
    not deferred nor left waiting for a connection to idle out, and the
    domain's 7-bit mail goes on to MX 10."""
    recs = ["host-record=mx1.test,127.0.0.1", "host-record=mx2.test,127.0.0.2",
            "host-record=mx3.test,127.0.0.3",
            "mx-host=eight.test,mx1.test,10", "mx-host=eight.test,mx2.test,20",
            "mx-host=eight.test,mx3.test,30"]
    r = Relay(recs, sink_flags=["-8"], domain_conf=_dlog_rate_conf(), idle_timeout="30s",
              delivery_conf="initial_connections = 3")
    sink2 = sink3 = None

    try:
        sink2 = test_delivery.Sink(r.wd, r.mx_port, flags=["-8"], name="sink2",
                                   host="127.0.0.2")
        sink3 = test_delivery.Sink(r.wd, r.mx_port, name="sink3", host="127.0.0.3")
        rep = inject_raw(r, b"", b"Subject: s\r\nX-Seq: 7-a\r\n\r\nplain\r\n")
        assert rep.startswith(b"250"), rep
        wait_until(lambda: len(_outcomes(r)) == 1, 30, "the first 7-bit message")
        rep = inject_raw(r, b" BODY=8BITMIME", b"Subject: e\r\nX-Seq: 8\r\n\r\n" + EIGHT)
        assert rep.startswith(b"250"), rep
        wait_until(lambda: len(_outcomes(r)) == 2, 10, "the 8-bit message's outcome")
        ev = _outcomes(r)[1]
        assert (ev["event"], ev["mx"]) == ("delivery", "mx3.test"), ev
        assert r.d.count_log("event=host_refused domain=eight.test") == 2
        rep = inject_raw(r, b"", b"Subject: s\r\nX-Seq: 7-b\r\n\r\nplain\r\n")
        assert rep.startswith(b"250"), rep
        wait_until(lambda: len(_outcomes(r)) == 3, 30, "the second 7-bit message")
        assert _outcomes(r)[2]["mx"] == "mx1.test", _outcomes(r)
        assert sink2.files() == [] and len(sink3.files()) == 1
        assert r.d.stop_clean() == 0
    finally:
        for x in (sink2, sink3):
            if x is not None:
                x.stop()
        r.close()


def test_detour_at_an_mx_sections_cap():
    """[mx mx1.test] max_connections = 1 (the node's, engine/node_caps.h),
    connections idle for 30 s: the domain's connection to MX 10, idle
    after a 7-bit message, holds the cap's one slot (a connection of the
    domain to any of its hosts holds a slot of its preferred host's
    section); an 8-bit message MX 10 refuses goes to MX 20 at once, that
    connection ending to make room (reason=host_refused), not 30 s later
    when it idles out (the connection to MX 20 was refused by the cap
    meanwhile). (A cap of 2 was split, one for each of the two workers,
    until the cap became the node's: the domain's worker may now hold
    both, and MX 20's connection needs no room made.)"""
    r = Relay(_two_mx_records(), sink_flags=["-8"], idle_timeout="30s",
              domain_conf=_dlog_rate_conf("[mx mx1.test]\nmax_connections = 1\n"),
              delivery_conf="initial_connections = 4")
    _two_in_turn(r, eight_first=False, closed=("mx1.test", "127.0.0.1", "host_refused"))


def test_detour_with_many_tenants_waiting():
    """Six tenants at a domain with max_connections = 2, MX 10 slow and
    without 8BITMIME: tenant A's 8-bit message among the backlog of five
    others is delivered at MX 20 over one connection, and the five share
    MX 10. The detour's connection looked at the four jobs its pops gave,
    which were the other tenants' (deficit round-robin), not A's, ended at
    once (detour_done: the domain at its cap), one to MX 10 ended for the
    next, and so on: 32 connections to MX 20 in a second, and the message
    deferred 4.6.3 with MX 20 up."""
    tenants = "ABCDEF"
    conf = "[domain eight.test]\nmax_connections = 2\n" + "".join(
        "[tenant %s]\n" % x for x in tenants)
    r = Relay(_two_mx_records(), with_sink=False, idle_timeout="30s",
              domain_conf=_dlog_rate_conf(conf), delivery_conf="initial_connections = 2")
    got = []
    mx = test_delivery.HostileMx(r.mx_port, _slow_receiver(got, 0.02))
    sink2 = None

    try:
        sink2 = test_delivery.Sink(r.wd, r.mx_port, name="sink2", host="127.0.0.2")
        msgs = [("s@example.com", ["u@eight.test"],
                 b"X-Sluice-Tenant: %s\r\nSubject: s\r\nX-Seq: %s-%d\r\n\r\nplain\r\n"
                 % (x.encode(), x.encode(), i)) for i in range(40) for x in tenants[1:]]
        msgs.insert(10, ("s@example.com", ["u@eight.test"],
                         b"X-Sluice-Tenant: A\r\nSubject: e\r\nX-Seq: 8b\r\n\r\n" + EIGHT))
        r.inject(msgs, sessions=1)
        wait_until(lambda: len(_outcomes(r)) == 201, 120, "every message's outcome")
        bad = [e for e in _outcomes(r) if e["event"] != "delivery"]
        assert bad == [], bad
        assert len(sink2.files()) == 1 and len(got) == 200, (len(sink2.files()), len(got))
        # the 8-bit message went out before half the backlog had
        at2 = [i for i, e in enumerate(_outcomes(r)) if e["mx"] == "mx2.test"]
        assert at2[0] < 100, at2
        # one connection to MX 20 (before, 30 opened and ended at once)
        assert r.d.count_log("event=connected domain=eight.test mx=mx2.test") == 1
        # and the five tenants shared MX 10: each has some of the first 50
        first = [g.split(b" ")[1][:1].decode() for g in got[:50]]
        assert {x: first.count(x) for x in tenants[1:]} == {x: 10 for x in tenants[1:]} or \
            min(first.count(x) for x in tenants[1:]) >= 5, first
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        if sink2 is not None:
            sink2.stop()
        mx.stop()
        r.close()


if __name__ == "__main__":
    main([
        test_client_gone_before_250_still_delivered,
        test_empty_bdat_message_signed_and_delivered,
        test_8bit_declared_7bit_goes_as_8bitmime,
        test_8bit_to_a_server_without_8bitmime_bounces_563,
        test_8bit_goes_to_the_next_mx_that_has_8bitmime,
        test_8bit_deferred_when_the_mx_with_8bitmime_is_down,
        test_message_over_one_mx_size_goes_to_the_next_mx,
        test_utf8_envelope_goes_to_the_next_mx_that_has_smtputf8,
        test_detour_that_fails_leaves_the_domain_at_its_first_mx,
        test_8bit_goes_to_a_next_mx_whose_name_hashes_alike,
        test_detour_connection_carries_only_the_refused_mail,
        test_detour_spends_no_rate_token_on_passes,
        test_detour_waits_behind_busy_connections_to_the_first_mx,
        test_detour_with_a_window_of_one,
        test_8bit_goes_to_the_third_mx_when_two_lack_8bitmime,
        test_detour_connection_ends_for_mail_at_the_domains_cap,
        test_detour_at_an_mx_sections_cap,
        test_detour_with_many_tenants_waiting,
    ])
