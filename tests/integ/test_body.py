"""Message bodies from submission to the next hop, against real servers
on loopback (dnsmasq for MX records, Postfix's smtp-sink as the MX):
a message whose client left between its final dot (or last BDAT chunk)
and the 250 is still delivered and logged without a restart; an empty
message (a lone "BDAT 0 LAST") is signed, stored and delivered; 8-bit
content declared BODY=7BIT (or undeclared, or sent with BDAT) is relayed
as 8BITMIME to a server that offers it and bounced with 5.6.3 by one
that does not."""
import json
import os
import socket
import struct
import sys

from harness import Workdir, main, mdb_entries, run, wait_until
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


def inject_raw(r, mail_args, body, bdat=False):
    """One message over a raw socket; returns the final reply."""
    s, f = hello(r.port)
    try:
        s.sendall(b"MAIL FROM:<s@example.com>%s\r\n" % mail_args)
        assert read_reply(f).startswith(b"250")
        s.sendall(b"RCPT TO:<u@eight.test>\r\n")
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


if __name__ == "__main__":
    main([
        test_client_gone_before_250_still_delivered,
        test_empty_bdat_message_signed_and_delivered,
        test_8bit_declared_7bit_goes_as_8bitmime,
        test_8bit_to_a_server_without_8bitmime_bounces_563,
    ])
