"""Delivery outcomes against real servers on loopback (dnsmasq, smtp-sink):
retries that succeed once the receiver accepts, bounces with their class
and a DSN to the sender (parsed with Python's email package), 421 holding
a destination, expiry in every state (ready, deferred, in flight on a
hanging connection, and a message's own expiry header), no DSN to <>, a
success DSN (Action: relayed) only when the next hop offered no DSN, and
the JSON Lines delivery log: every line parses and carries its fields, and
a logrotate-style rename plus SIGHUP loses nothing."""
import email
import email.policy
import json
import os
import re
import signal
import smtplib
import sys

from harness import main, mdb_entries, skip, spool_tool, stats_ask, wait_until
import test_delivery
from test_delivery import Relay, Sink, records_for, wait_sink

test_delivery.SLUICE = sys.argv[1]

TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PER_RCPT = ("delivery", "transient_failure", "bounce", "expiration")


def events(path, settled=True):
    """Every line of the delivery log as a dict; each must parse and carry
    the fields of its event. settled: sluice writes nothing now (stopped,
    or idle), so the file must end with a whole line; else (a poll while
    it writes) a last line being written is left for the next read: a
    read can see the first part of a flush's write."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        data = f.read()
    if not settled:
        data = data[:data.rfind(b"\n") + 1]
    assert data == b"" or data.endswith(b"\n"), "a line was cut"
    for raw in data.splitlines():
        ev = json.loads(raw)  # raises on a line that is not JSON
        assert TIME_RE.match(ev["time"]), ev
        kind = ev["event"]
        if kind in ("suppressed", "rejection"):  # refused at RCPT: no message, no id
            for k in ("rcpt", "code", "reply", "reason", "client"):
                assert k in ev, (k, ev)
            assert "id" not in ev, ev
            out.append(ev)
            continue
        # a message's queue id (13), or a shaping action's id (16 hex)
        assert len(ev["id"]) == (16 if kind.startswith("shaping_") else 13), ev
        if kind == "reception":
            for k in ("sender", "rcpt_count", "size", "client"):
                assert k in ev, (k, ev)
        elif kind in PER_RCPT:
            for k in ("rcpt", "sender", "domain", "attempt", "size", "queue_time_ms"):
                assert k in ev, (k, ev)
            if kind == "delivery":
                for k in ("mx", "mx_addr", "source", "code"):
                    assert k in ev, (k, ev)
                assert 200 <= ev["code"] < 300, ev
            else:
                assert ev.get("class"), ev
        elif kind in ("shaping_started", "shaping_ended"):
            for k in ("scope", "action", "rule"):
                assert k in ev, (k, ev)
        else:
            assert kind == "dsn", ev
        out.append(ev)
    return out


def wait_events(path, pred, n, timeout=30):
    try:
        wait_until(lambda: len([e for e in events(path, False) if pred(e)]) >= n, timeout,
                   f"{n} matching delivery-log events")
    except AssertionError:
        for e in events(path, False):
            print("  seen:", json.dumps(e))
        raise
    return [e for e in events(path, False) if pred(e)]


STATUS_RE = re.compile(r"Final-Recipient: rfc822;\s*(\S+)\n(?:[^\n]+\n)*?Status: (\d\.\d+\.\d+)")


def dsn_statuses(sink):
    """Recipient -> the Status of its entry, over the DSNs at sink (whole
    ones: a DSN is one line of delivery-status per field)."""
    out = {}
    for m in sink.messages():
        for rcpt, status in STATUS_RE.findall(m.decode("utf-8", "replace").replace("\r\n", "\n")):
            out[rcpt] = status
    return out


def wait_dsn_statuses(sink, rcpts, timeout=30):
    wait_until(lambda: set(rcpts) <= set(dsn_statuses(sink)), timeout,
               f"the DSNs of {sorted(rcpts)} at the sender's MX")
    return dsn_statuses(sink)


def log_conf_text(extra):
    return "[log]\ndelivery_log = @DLOG@\ndelivery_log_flush = 50ms\n" + (extra or "")


def test_4xx_then_accepted_on_retry():
    """smtp-sink answers 4xx to RCPT; it is replaced by an accepting sink on
    the same port, and the retry delivers: the log shows a transient
    failure, then the delivery, for every recipient."""
    r = Relay(records_for(["retry.test"]), sink_flags=["-r", "RCPT"],
              domain_conf=log_conf_text("[domain *]\nretry_schedule = 1s\n"))
    try:
        path = r.dlog
        r.inject([("s@example.com", ["a@retry.test", "b@retry.test"],
                   b"Subject: r\r\n\r\nretry me\r\n")])
        tf = wait_events(path, lambda e: e["event"] == "transient_failure", 2)
        assert all(e["code"] // 100 == 4 and e["attempt"] == 1 for e in tf), tf
        r.sink.stop()
        r.sink = Sink(r.wd, r.mx_port, name="sink2")
        dl = wait_events(path, lambda e: e["event"] == "delivery", 2)
        assert sorted(e["rcpt"] for e in dl) == ["a@retry.test", "b@retry.test"], dl
        assert all(e["attempt"] >= 2 for e in dl), dl
        wait_sink(r, 1)
        evs = events(path)
        first_tf = min(i for i, e in enumerate(evs) if e["event"] == "transient_failure")
        first_dl = min(i for i, e in enumerate(evs) if e["event"] == "delivery")
        assert first_tf < first_dl
        assert [e["event"] for e in evs].count("reception") == 1
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        r.close()


def test_5xx_bounce_class_and_dsn():
    """5xx to RCPT: a bounce, classified, and a DSN to the sender's domain
    (served by a second sink): a valid multipart/report."""
    recs = records_for(["hard.test"]) + [
        "host-record=mx2.test,127.0.0.2", "mx-host=sender.test,mx2.test,10"]
    r = Relay(recs, sink_flags=["-f", "RCPT"], dsn=True,
              domain_conf=log_conf_text(None))
    try:
        path = r.dlog
        s2 = Sink(r.wd, r.mx_port, name="senders", host="127.0.0.2")
        try:
            r.inject([("alice@sender.test", ["nobody@hard.test"],
                       b"Subject: to nobody\r\nX-Campaign-ID: c7\r\n\r\nbounce me\r\n")])
            b = wait_events(path, lambda e: e["event"] == "bounce", 1)[0]
            assert b["code"] // 100 == 5 and b["class"], b
            assert b["rcpt"] == "nobody@hard.test" and b["sender"] == "alice@sender.test", b
            dsn = wait_events(path, lambda e: e["event"] == "dsn", 1)[0]
            assert dsn["id"] == b["id"] and dsn["dsn_id"] != b["id"], dsn  # its own queue id
            assert dsn["reply"] == dsn["dsn_id"], dsn  # as earlier versions wrote it
            # Delivered (so written whole) at the sender's MX.
            dl = wait_events(path, lambda e: e["event"] == "delivery", 1)
            assert dl[0]["id"] == dsn["dsn_id"], (dl, dsn)
            wait_until(lambda: len(s2.files()) >= 1, 30, "the DSN at the sender's MX")
            dump = s2.messages()[0].replace(b"\n", b"\r\n")
            msg = email.message_from_bytes(dump, policy=email.policy.default)
            assert msg.get_content_type() == "multipart/report", msg.get_content_type()
            assert msg.get_param("report-type") == "delivery-status"
            assert msg["Auto-Submitted"].startswith("auto-replied")
            parts = list(msg.iter_parts())
            types = [p.get_content_type() for p in parts]
            assert types[0] == "text/plain" and types[1] == "message/delivery-status", types
            assert types[2] in ("text/rfc822-headers", "message/rfc822"), types
            status = parts[1].get_payload()
            text = "".join(str(p) for p in status) if isinstance(status, list) else str(status)
            assert "Final-Recipient: rfc822; nobody@hard.test" in text, text
            assert "Action: failed" in text and re.search(r"Status: 5\.\d+\.\d+", text), text
            assert "Reporting-MTA: dns;" in text, text
            assert b"X-Campaign-ID: c7" in dump
            # It came from the null sender (smtp-sink records MAIL's arguments).
            assert b"X-Mail-Args: <> " in s2.messages()[0], s2.messages()[0][:300]
            dl = wait_events(path, lambda e: e["event"] == "delivery", 1)
            assert dl[0]["sender"] == "" and dl[0]["rcpt"] == "alice@sender.test", dl
        finally:
            s2.stop()
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        r.close()


def test_nxdomain_bounce_says_which_name_was_not_found():
    """A recipient domain that DNS says does not exist: the bounce's
    reply, and the DSN the sender reads, name the name asked and say it
    as an operator knows it from Postfix ("Host or domain name not found.
    Name service error for name=nxdomain.test type=MX: Host not found");
    it said only "NXDOMAIN" ("Reason: NXDOMAIN")."""
    recs = ["host-record=mx2.test,127.0.0.2", "mx-host=sender.test,mx2.test,10"]
    r = Relay(recs, dsn=True, domain_conf=log_conf_text(None))
    try:
        s2 = Sink(r.wd, r.mx_port, name="senders", host="127.0.0.2")
        try:
            r.inject([("alice@sender.test", ["a@nxdomain.test"],
                       b"Subject: nowhere\r\n\r\nno such domain\r\n")])
            want = ("Host or domain name not found. Name service error for"
                    " name=nxdomain.test type=MX: Host not found (NXDOMAIN)")
            b = wait_events(r.dlog, lambda e: e["event"] == "bounce", 1)[0]
            assert b["reply"] == want and b["code"] == 550, b
            assert b["enhanced"] == "5.1.2" and b["class"] == "dns_failure", b
            # whole at the sink once sluice logged it delivered (smtp-sink
            # writes the file as it comes in)
            wait_until(lambda: len(s2.files()) >= 1 and r.d.count_log("event=delivered") >= 1,
                       30, "the DSN at the sender's MX")
            text = " ".join(s2.messages()[0].decode("utf-8", "replace").split())
            assert "Reason: " + want in text, text
            assert "Diagnostic-Code: X-Sluice; " + want in text, text
        finally:
            s2.stop()
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def _addr_spec_ok(value):
    """value parses as one RFC 5322 address without defects: its addr-spec."""
    h = email.policy.default.header_factory("To", value)
    assert not h.defects and len(h.addresses) == 1, (value, h.defects)
    return h.addresses[0].addr_spec


def test_dsn_quotes_a_local_part_that_needs_it():
    """A sender and recipients whose local parts sluice takes though they
    are no dot-atom (news., user., a..b, as Postfix takes them): the DSN
    names each in its valid, quoted form ("news."@sender.test) in To:,
    Final-Recipient and its text; it named them raw (To: <news.@...>,
    Final-Recipient: rfc822; user.@...), which RFC 5322 and 3464 do not
    allow and Python's email package reports as a defect."""
    recs = records_for(["hard.test"]) + [
        "host-record=mx2.test,127.0.0.2", "mx-host=sender.test,mx2.test,10"]
    r = Relay(recs, sink_flags=["-f", "RCPT"], dsn=True, domain_conf=log_conf_text(None))
    try:
        s2 = Sink(r.wd, r.mx_port, name="senders", host="127.0.0.2")
        try:
            with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as c:
                c.ehlo("t")
                assert c.mail("news.@sender.test")[0] == 250
                for a in ("user.@hard.test", "a..b@hard.test", "plain@hard.test"):
                    assert c.rcpt(a)[0] == 250, a
                assert c.data(b"Subject: dots\r\n\r\nbounce me\r\n")[0] == 250
            # whole: smtp-sink has written all of it once sluice logs it delivered
            wait_until(lambda: len(s2.files()) >= 1 and r.d.count_log("event=delivered") >= 1,
                       30, "the DSN at the sender's MX")
            raw = s2.messages()[0]
            assert b'X-Rcpt-Args: <"news."@sender.test>' in raw, raw[:300]
            msg = email.message_from_bytes(raw.replace(b"\n", b"\r\n"),
                                           policy=email.policy.default)
            assert not msg["To"].defects, (msg["To"], msg["To"].defects)
            assert msg["To"].addresses[0].username == "news.", msg["To"]
            assert b'\nTo: <"news."@sender.test>\n' in raw, raw[:800]
            parts = list(msg.iter_parts())
            blocks = parts[1].get_payload()
            got = []
            for blk in blocks[1:]:
                kind, _, addr = blk["Final-Recipient"].partition(";")
                assert kind.strip().lower() == "rfc822", blk["Final-Recipient"]
                _addr_spec_ok(addr.strip())
                got.append(addr.strip())
            assert sorted(got) == ['"a..b"@hard.test', '"user."@hard.test',
                                   "plain@hard.test"], got
            human = parts[0].get_content()
            assert '<"user."@hard.test>: delivery failed' in human, human
            assert '<"a..b"@hard.test>: delivery failed' in human, human
        finally:
            s2.stop()
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_dsn_cuts_huge_headers_at_a_line_and_says_so():
    """RET=HDRS with a header section over 256 KB: the DSN returns whole
    lines of it and says it cut them. sluice read only 256 KB of the
    original, so the last field was cut mid-line and the DSN did not say
    the headers were cut."""
    recs = records_for(["hard.test"]) + [
        "host-record=mx2.test,127.0.0.2", "mx-host=sender.test,mx2.test,10"]
    r = Relay(recs, sink_flags=["-f", "RCPT"], dsn=True, domain_conf=log_conf_text(None))
    try:
        s2 = Sink(r.wd, r.mx_port, name="senders", host="127.0.0.2")
        try:
            # 300 fields of 901 octets each (with CRLF): 270 KB, and 256 KB
            # (262,144) falls inside one of them, not at a line end.
            pad = "".join(f"X-Pad-{i:03d}: " + "p" * 877 + f"{i:03d}\r\n" for i in range(300))
            body = ("Subject: big head\r\n" + pad + "\r\nthe body\r\n").encode()
            with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as c:
                c.ehlo("t")
                assert c.mail("alice@sender.test", ["RET=HDRS"])[0] == 250
                assert c.rcpt("nobody@hard.test")[0] == 250
                assert c.data(body)[0] == 250
            # whole: smtp-sink has written all of it once sluice logs it delivered
            wait_until(lambda: len(s2.files()) >= 1 and r.d.count_log("event=delivered") >= 1,
                       30, "the DSN at the sender's MX")
            raw = s2.messages()[0].replace(b"\n", b"\r\n")
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            parts = list(msg.iter_parts())
            assert parts[2].get_content_type() == "text/rfc822-headers", parts[2]
            text = parts[0].get_content()
            assert "The headers were cut after 262144 octets." in text, text
            hdrs = parts[2].get_payload(decode=True).decode()
            lines = hdrs.rstrip("\r\n").split("\r\n")
            first = lines.index("Subject: big head") + 1  # after sluice's Received
            # whole fields only: each ends with its own number
            for ln in lines[first:]:
                assert re.fullmatch(r"X-Pad-(\d{3}): p{877}\1", ln), ln[:40] + "..." + ln[-40:]
            assert 280 <= len(lines) - first < 300, len(lines)
            assert "the body" not in hdrs
        finally:
            s2.stop()
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_delay_warning_only_when_asked():
    """NOTIFY=DELAY: one delay DSN (Action: delayed) once the recipient has
    waited delay_warning; a recipient that did not ask gets none."""
    recs = records_for(["soft.test"]) + [
        "host-record=mx2.test,127.0.0.2", "mx-host=sender.test,mx2.test,10"]
    r = Relay(recs, sink_flags=["-r", "RCPT"], dsn=True, domain_conf=log_conf_text(
        "[bounce]\ndelay_warning = 1s\n[domain soft.test]\nretry_schedule = 2s\n"))
    try:
        s2 = Sink(r.wd, r.mx_port, name="senders", host="127.0.0.2")
        try:
            with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as c:
                c.ehlo("t")
                c.mail("bob@sender.test")
                assert c.rcpt("asked@soft.test", ["NOTIFY=DELAY,FAILURE"])[0] == 250
                assert c.rcpt("silent@soft.test")[0] == 250
                assert c.data(b"Subject: later\r\n\r\nwaiting\r\n")[0] == 250
            wait_events(r.dlog, lambda e: e["event"] == "dsn", 1, timeout=30)
            wait_events(r.dlog, lambda e: e["event"] == "delivery", 1, timeout=30)
            wait_until(lambda: len(s2.files()) >= 1, 30, "the delay DSN at the sender's MX")
            dump = s2.messages()[0].replace(b"\n", b"\r\n")
            text = dump.decode("utf-8", "replace")
            assert "Action: delayed" in text and "Action: failed" not in text, text[:2000]
            assert "asked@soft.test" in text and "silent@soft.test" not in text, text[:2000]
            assert "Will-Retry-Until:" in text, text[:2000]
            # The recipient's block names its last attempt's MX and reply
            # (RFC 3464 2.3.5, 2.3.6), as Postfix's delay notices do.
            # Before the fix it named no Remote-MTA.
            msg = email.message_from_bytes(dump, policy=email.policy.default)
            ds = [p for p in msg.iter_parts() if p.get_content_type() == "message/delivery-status"]
            assert len(ds) == 1, [p.get_content_type() for p in msg.iter_parts()]
            blocks = [b for b in ds[0].get_payload()[1:]
                      if "asked@soft.test" in str(b["Final-Recipient"])]
            assert len(blocks) == 1, text[:3000]
            assert str(blocks[0]["Action"]) == "delayed", text[:3000]
            assert str(blocks[0]["Remote-MTA"]) == "dns; mx.test", text[:3000]
            assert re.match(r"smtp; 4\d\d ", str(blocks[0]["Diagnostic-Code"])), text[:3000]
            # Once: more attempts pass, no second warning.
            wait_events(r.dlog, lambda e: e["event"] == "transient_failure", 6, timeout=30)
            assert len([e for e in events(r.dlog) if e["event"] == "dsn"]) == 1
        finally:
            s2.stop()
    finally:
        r.close()


def test_no_dsn_to_null_sender():
    r = Relay(records_for(["hard.test"]), sink_flags=["-f", "RCPT"], dsn=True,
              domain_conf=log_conf_text(None))
    try:
        r.inject([("", ["x@hard.test"], b"Subject: from nobody\r\n\r\nbounce\r\n")])
        wait_events(r.dlog, lambda e: e["event"] == "bounce", 1)
        assert r.d.stop_clean() == 0
        assert r.d.count_log("event=dsn_queued") == 0
        assert not [e for e in events(r.dlog) if e["event"] == "dsn"]
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        r.close()


def test_421_at_data_holds_the_destination():
    r = Relay(records_for(["busy.test"]), sink_flags=["-Q", "DATA"],
              domain_conf=log_conf_text("[domain *]\nsite_hold = 1h\n"))
    try:
        r.inject([("s@example.com", [f"u{i}@busy.test"], b"Subject: b\r\n\r\nx\r\n")
                  for i in range(3)], sessions=1)
        r.d.wait_log("event=destination_held", timeout=30)
        tf = wait_events(r.dlog, lambda e: e["event"] == "transient_failure", 1)
        assert tf[0]["code"] == 421 and tf[0]["class"] == "rate_limited", tf
        assert r.d.count_log("event=delivered") == 0
        assert r.d.stop_clean() == 0
        c = json.loads(spool_tool("count", r.spool).stdout)
        assert c["messages"] == 3 and c["ready"] + c["deferred"] == 3, c
    finally:
        r.close()


def test_held_destination_still_expires():
    """After a 421 the destination is held for an hour; its recipients,
    waiting in memory or deferred, still expire at max_age. Each expiry
    names the reply that held the destination and the MX host (and
    address) that sent it, and its enhanced code is its DSN's Status."""
    recs = records_for(["busy.test"]) + [
        "host-record=mx2.test,127.0.0.2", "mx-host=sender.test,mx2.test,10"]
    r = Relay(recs, sink_flags=["-Q", "DATA"], dsn=True,
              domain_conf=log_conf_text("[domain *]\nsite_hold = 1h\nmax_age = 3s\n"
                                        "max_connections = 1\n[domain sender.test]\n"
                                        "max_age = 1h\n"))
    s2 = None
    try:
        s2 = Sink(r.wd, r.mx_port, name="senders", host="127.0.0.2")
        rcpts = ["u0@busy.test", "u1@busy.test", "u2@busy.test"]
        r.inject([("s@sender.test", [u], b"Subject: b\r\n\r\nx\r\n") for u in rcpts],
                 sessions=1)
        ex = wait_events(r.dlog, lambda e: e["event"] == "expiration", 3, timeout=60)
        assert sorted(e["rcpt"] for e in ex) == rcpts, ex
        assert all(e["queue_time_ms"] < 20000 for e in ex), ex
        # each says why it was held: the receiver's reply, once
        assert all(e["reply"] == "message expired while busy.test was held: "
                   "421 4.0.0 Server closing connection" for e in ex), ex
        # ... and who said it, although the held ones never had a connection
        assert all(e.get("mx") == "mx.test" and e.get("mx_addr") == f"127.0.0.1:{r.mx_port}"
                   for e in ex), ex
        # each expiry's log line follows its delivery-log line (written by
        # another thread, that may have flushed before it): wait for them
        r.d.wait_log_count("event=expired", 3)
        assert r.d.count_log("event=expired") == 3
        assert r.d.count_log("mx=-") == 0, "an expiry logged without the MX that held it"
        # one answer to the backend: the event's enhanced code is the DSN's Status
        st = wait_dsn_statuses(s2, rcpts)
        assert all(e.get("enhanced") == st[e["rcpt"]] == "4.4.7" for e in ex), (ex, st)
        # the DSN names the MTA whose reply it quotes
        assert all(b"Remote-MTA: dns; mx.test" in m for m in s2.messages()), s2.messages()
        assert r.d.stop_clean() == 0
    finally:
        if s2 is not None:
            s2.stop()
        r.close()


def test_expiry_in_every_state():
    """max_age 2s: a recipient in flight on a connection that hangs (the
    sink delays its DATA reply), one ready behind it (max_connections 1),
    one deferred by a 4xx: all three expire and leave the spool; and a
    message whose own header says 1s expires although its domain allows
    an hour."""
    recs = ["host-record=hang.test,127.0.0.3", "mx-host=hang.test,hang.test,10",
            "host-record=soft.test,127.0.0.4", "mx-host=soft.test,soft.test,10",
            "host-record=own.test,127.0.0.5", "mx-host=own.test,own.test,10",
            "host-record=mx2.test,127.0.0.2", "mx-host=sender.test,mx2.test,10"]
    r = Relay(recs, with_sink=False, dsn=True, domain_conf=log_conf_text(
        "[domain *]\nmax_age = 2s\nretry_schedule = 1h\nmax_connections = 1\n"
        "[domain own.test]\nmax_age = 1h\n[domain sender.test]\nmax_age = 1h\n"))
    sinks = []
    try:
        sinks.append(Sink(r.wd, r.mx_port, ["-w", "60"], name="hang", host="127.0.0.3"))
        sinks.append(Sink(r.wd, r.mx_port, ["-r", "RCPT"], name="soft", host="127.0.0.4"))
        sinks.append(Sink(r.wd, r.mx_port, ["-w", "60"], name="own", host="127.0.0.5"))
        sinks.append(Sink(r.wd, r.mx_port, name="senders", host="127.0.0.2"))
        r.inject([("s@sender.test", ["a@hang.test"], b"Subject: 1\r\n\r\nin flight\r\n"),
                  ("s@sender.test", ["b@hang.test"], b"Subject: 2\r\n\r\nready\r\n"),
                  ("s@sender.test", ["c@soft.test"], b"Subject: 3\r\n\r\ndeferred\r\n"),
                  ("s@sender.test", ["d@own.test"],
                   b"Subject: 4\r\nX-Sluice-Expire: 1s\r\n\r\nits own expiry\r\n")],
                 sessions=1)
        ex = wait_events(r.dlog, lambda e: e["event"] == "expiration", 4, timeout=60)
        rcpts = ["a@hang.test", "b@hang.test", "c@soft.test", "d@own.test"]
        assert sorted(e["rcpt"] for e in ex) == rcpts, ex
        assert all(e["class"] == "expired" for e in ex), ex
        # one answer to the backend, in every state: the event's enhanced
        # code is the DSN's Status (the last attempt's code and reply stay)
        st = wait_dsn_statuses(sinks[-1], rcpts)
        assert all(e.get("enhanced") == st[e["rcpt"]] == "4.4.7" for e in ex), (ex, st)
        soft = [e for e in events(r.dlog) if e["event"] == "transient_failure"
                and e["rcpt"] == "c@soft.test"]
        assert soft, "c was never deferred"
        # the deferred one's expiry says what it was deferred with
        (c,) = [e for e in ex if e["rcpt"] == "c@soft.test"]
        assert c["reply"] == (f"message expired in the queue; last attempt: {soft[-1]['code']} "
                              f"{soft[-1]['reply']}"), (c, soft)
        # Expired on time: well before the sinks' 60 s DATA delay.
        assert all(e["queue_time_ms"] < 30000 for e in ex), ex
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        for s in sinks:
            s.stop()
        r.close()


class Tarpit:
    """A receiver on host:port that accepts every connection and says
    nothing (no greeting): the connections it holds are closed by stop()."""

    def __init__(self, host, port):
        import socket
        import threading
        self.held = []
        self.srv = socket.socket()
        self.srv.bind((host, port))
        self.srv.listen(16)
        self.srv.settimeout(0.2)
        self.done = threading.Event()
        self.th = threading.Thread(target=self._accept, daemon=True)
        self.th.start()

    def _accept(self):
        while not self.done.is_set():
            try:
                self.held.append(self.srv.accept()[0])
            except OSError:
                pass

    def stop(self):
        self.done.set()
        self.th.join(5)
        self.srv.close()
        for c in self.held:
            c.close()


def test_expiry_while_the_greeting_waits():
    """max_age 2s, a receiver that accepts the connection and never
    greets (greeting_timeout 60s): the recipient expires at its max_age,
    while the attempt still waits, with a DSN-worthy event. Before, it
    waited for the attempt to end: expired at 60 s, greeting_timeout past
    its max_age (5 minutes by default, for each address tried)."""
    import time
    recs = ["host-record=tar.test,127.0.0.3", "mx-host=tar.test,tar.test,10"]
    r = Relay(recs, with_sink=False, delivery_conf="greeting_timeout = 60s\n",
              domain_conf=log_conf_text("[domain *]\nmax_age = 2s\nretry_schedule = 1h\n"))
    tar = None
    try:
        tar = Tarpit("127.0.0.3", r.mx_port)
        t0 = time.monotonic()
        r.inject([("s@example.com", ["a@tar.test"], b"Subject: t\r\n\r\ntarpit\r\n")],
                 sessions=1)
        (ex,) = wait_events(r.dlog, lambda e: e["event"] == "expiration", 1, timeout=30)
        assert tar.held, "the attempt never reached the receiver"
        assert ex["rcpt"] == "a@tar.test" and ex["class"] == "expired", ex
        assert ex["reply"].startswith("message expired in the queue"), ex
        assert ex["queue_time_ms"] < 10000, ex
        print(f"     expired after {time.monotonic() - t0:.1f}s (max_age 2s)")
        tar.stop()  # the attempt ends: the stop need not wait for it
        tar = None
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        if tar is not None:
            tar.stop()
        r.close()


def test_expiry_behind_a_busy_connection():
    """max_age 2s, max_connections 1: the connection's transaction waits
    for the reply to its dot (the receiver holds it; the message is sent,
    so it is not cut), and a second recipient waits behind it. That one
    expired only once a connection took it, here when the receiver
    answered (with a backlog behind a slow receiver, as long as the
    backlog took); it expires at its max_age now, while the connection
    still waits, and the first is delivered once answered."""
    import threading
    import time
    release, bodies = threading.Event(), []

    def script(c, rfile):
        c.sendall(b"220 mx ESMTP\r\n")
        for _ in range(1000):
            line = rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                c.sendall(b"250-mx\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                c.sendall(b"354 go\r\n")
                body = b""
                for _ in range(10000):
                    ln = rfile.readline()
                    if not ln or ln == b".\r\n":
                        break
                    body += ln
                bodies.append(body)
                release.wait(60)
                c.sendall(b"250 2.0.0 taken\r\n")
            elif verb == b"QUIT":
                c.sendall(b"221 bye\r\n")
                return
            else:
                c.sendall(b"250 ok\r\n")

    r = Relay(records_for(["slow.test"]), with_sink=False,
              domain_conf=log_conf_text("[domain *]\nmax_age = 2s\nretry_schedule = 1h\n"
                                        "max_connections = 1\n"))
    mx = test_delivery.HostileMx(r.mx_port, script)
    try:
        r.inject([("s@example.com", ["a@slow.test"], b"Subject: 1\r\n\r\nin flight\r\n")],
                 sessions=1)
        wait_until(lambda: bodies, 30, "the first message at the receiver")
        t0 = time.monotonic()
        r.inject([("s@example.com", ["b@slow.test"], b"Subject: 2\r\n\r\nbehind it\r\n")],
                 sessions=1)
        (ex,) = wait_events(r.dlog, lambda e: e["event"] == "expiration", 1, timeout=30)
        waited = time.monotonic() - t0
        print(f"     expired after {waited:.1f}s (max_age 2s)")
        assert ex["rcpt"] == "b@slow.test" and ex["class"] == "expired", ex
        assert ex["reply"].startswith("message expired in the queue"), ex
        assert not release.is_set() and len(bodies) == 1, "expired only once the first went"
        assert ex["queue_time_ms"] < 5000, ex
        release.set()
        (dl,) = wait_events(r.dlog, lambda e: e["event"] == "delivery", 1, timeout=30)
        assert dl["rcpt"] == "a@slow.test", dl
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        release.set()
        mx.stop()
        r.close()


def test_stop_does_not_wait_for_a_greeting():
    """A stop (SIGTERM) while a connection waits for a receiver's greeting
    (a tarpit: greeting_timeout 60s): the drain ends that connection at
    once, it carries nothing; the recipient stays queued, deferred by
    nothing, and goes at the next start. Before, the connection held the
    stop for the whole drain timeout (30 s), logged as drain_timed_out."""
    import time
    recs = ["host-record=tar.test,127.0.0.3", "mx-host=tar.test,tar.test,10"]
    r = Relay(recs, with_sink=False, delivery_conf="greeting_timeout = 60s\n",
              domain_conf=log_conf_text("[domain *]\nretry_schedule = 1h\n"))
    tar = None
    try:
        tar = Tarpit("127.0.0.3", r.mx_port)
        r.inject([("s@example.com", ["a@tar.test"], b"Subject: t\r\n\r\ntarpit\r\n")],
                 sessions=1)
        wait_until(lambda: tar.held, 30, "the attempt at the tarpit")
        t0 = time.monotonic()
        assert r.d.stop_clean() == 0
        took = time.monotonic() - t0
        assert took < 10, f"the stop took {took:.1f}s"
        assert r.d.count_log("event=drain_timed_out") == 0
        assert not [e for e in events(r.dlog) if e.get("rcpt") == "a@tar.test"], "told something"
        assert mdb_entries(r.spool, "msg") == 1, "the message stays queued"
    finally:
        if tar is not None:
            tar.stop()
        r.close()


def test_stop_says_which_transaction_it_cut_at_the_dot():
    """SIGTERM while a receiver holds its reply to the final dot (it read
    the whole message: a stalled MX, data_timeout 10 min): the drain
    (1 s here) times out, and the stop ends the connection, saying so for
    the message: event=transaction_cut with its id, the MX and state=dot
    (the body was sent whole: it may have arrived, and then arrives twice,
    RFC 1047). Before, nothing but the drain's what_was_in_flight_stays_queued
    said which message was cut, or that it may come twice. The recipient
    stays queued, told nothing, and is delivered after the restart."""
    import threading
    from harness import Sluice, log_fields
    from test_delivery import HostileMx, _read_until
    at_dot, release = threading.Event(), threading.Event()
    got = []

    def script(c, rfile):  # takes the body, holds its reply until release
        c.sendall(b"220 mx.test ESMTP\r\n")
        while True:
            line = rfile.readline()
            if not line:
                return
            cmd = line.upper()
            if cmd.startswith(b"EHLO"):
                c.sendall(b"250-mx.test\r\n250 PIPELINING\r\n")
            elif cmd.startswith(b"DATA"):
                c.sendall(b"354 go\r\n")
                _read_until(rfile, b".\r\n")
                got.append(1)
                at_dot.set()
                if not release.wait(60):
                    return
                c.sendall(b"250 2.0.0 taken\r\n")
            elif cmd.startswith(b"QUIT"):
                c.sendall(b"221 bye\r\n")
                return
            else:
                c.sendall(b"250 ok\r\n")

    r = Relay(records_for(["cut.test"]), with_sink=False, delivery_conf="data_timeout = 10m\n",
              domain_conf=log_conf_text(""))
    mx = None
    try:
        mx = HostileMx(r.mx_port, script)
        conf = os.path.join(r.wd.path, "sluice.conf")
        assert r.d.stop_clean() == 0
        with open(conf) as f:
            text = f.read()
        with open(conf, "w") as f:
            f.write(text.replace("[server]\n", "[server]\ndrain_timeout = 1s\n", 1))
        r.d = Sluice(test_delivery.SLUICE, conf)
        r.d.wait_log("event=ready")
        r.inject([("s@example.com", ["a@cut.test"], b"Subject: c\r\n\r\ncut at the dot\r\n")],
                 sessions=1)
        qid = dict(log_fields(r.d.wait_log("event=queued")))["id"]
        assert at_dot.wait(30), "the message at the MX"
        assert r.d.stop_clean() == 0
        assert r.d.count_log("event=drain_timed_out") == 1
        (cut,) = r.d.log_lines("event=transaction_cut")
        f = dict(log_fields(cut))
        assert f["id"] == qid and f["domain"] == "cut.test" and f["mx"] == "mx.test", cut
        assert f["state"] == "dot" and f["recipients"] == "1", cut
        assert "may_arrive_twice" in f["note"], cut
        assert not [e for e in events(r.dlog) if e.get("rcpt") == "a@cut.test"], "told something"
        release.set()  # the MX answers now
        r.d = Sluice(test_delivery.SLUICE, conf)
        r.d.wait_log("event=ready")
        line = r.d.wait_log(f"id={qid} event=delivered", timeout=60)
        assert "rcpt=<a@cut.test>" in line, line
        assert len(got) == 2, got  # sent again after the restart
    finally:
        release.set()
        if mx is not None:
            mx.stop()
        r.close()


def test_stop_at_a_dot_that_never_left_says_it_was_not_accepted():
    """The dot state begins when the final dot is given to the
    connection, not when it was sent: a receiver that stops reading
    after its 354 (a small receive buffer; sluice's send buffer small
    and fixed, the small-sndbuf shim, argv[3]) holds a body of 24 KB
    with its dot in sluice's own buffer. The stop then cuts it at
    state=dot, and says that it cannot have been accepted
    (note=stays_queued_dot_not_sent_not_accepted); before, it warned
    that it may arrive twice. The receiver indeed never got the dot."""
    import threading
    from harness import Sluice, extra_env, log_fields, preload
    from test_delivery import HostileMx
    shim = sys.argv[3] if len(sys.argv) > 3 else None
    if shim is None or not os.path.exists(shim):
        print("     no small-sndbuf shim (argv[3]): not run")
        return
    at_data, done, read_all = threading.Event(), threading.Event(), threading.Event()
    got = bytearray()

    def script(c, rfile):  # stops reading at the body; then takes what came, to the end
        c.sendall(b"220 mx.test ESMTP\r\n")
        while True:
            line = rfile.readline()
            if not line:
                return
            cmd = line.upper()
            if cmd.startswith(b"EHLO"):
                c.sendall(b"250-mx.test\r\n250 PIPELINING\r\n")
            elif cmd.startswith(b"DATA"):
                c.sendall(b"354 go\r\n")
                at_data.set()
                if not done.wait(60):
                    return
                while True:  # what sluice sent before its stop closed
                    chunk = rfile.read1(65536)
                    if not chunk:
                        break
                    got.extend(chunk)
                read_all.set()
                return
            else:
                c.sendall(b"250 ok\r\n")

    r = Relay(records_for(["held.test"]), with_sink=False, delivery_conf="data_timeout = 10m\n",
              domain_conf=log_conf_text(""))
    mx = None
    try:
        mx = HostileMx(r.mx_port, script, rcvbuf=4096)
        conf = os.path.join(r.wd.path, "sluice.conf")
        assert r.d.stop_clean() == 0
        with open(conf) as f:
            text = f.read()
        with open(conf, "w") as f:
            f.write(text.replace("[server]\n", "[server]\ndrain_timeout = 1s\n", 1))
        with extra_env({"LD_PRELOAD": preload(test_delivery.SLUICE, shim),
                        "SMALL_SNDBUF": "4096"}):
            r.d = Sluice(test_delivery.SLUICE, conf)
        r.d.wait_log("event=ready")
        line = b"x" * 78 + b"\r\n"
        body = b"Subject: h\r\n\r\n" + line * (24 * 1024 // len(line))
        r.inject([("s@example.com", ["a@held.test"], body)], sessions=1)
        qid = dict(log_fields(r.d.wait_log("event=queued")))["id"]
        assert at_data.wait(30), "the body at the MX"
        assert r.d.stop_clean() == 0  # the drain (1 s): sluice's buffers fill meanwhile
        (cut,) = r.d.log_lines("event=transaction_cut")
        f = dict(log_fields(cut))
        assert f["id"] == qid and f["state"] == "dot", cut
        assert f["note"] == "stays_queued_dot_not_sent_not_accepted", cut
        done.set()
        assert read_all.wait(30), "the MX's read to the end"
        assert got and not bytes(got).endswith(b"\r\n.\r\n"), len(got)  # no dot came
    finally:
        done.set()
        if mx is not None:
            mx.stop()
        r.close()

def test_stop_does_not_wait_for_a_dns_server_that_does_not_answer():
    """A stop (SIGTERM) while the MX lookup of a message waits on a DNS
    server that never answers (a UDP socket that reads and says nothing):
    the resolver closes at once, the stop takes no drain, the message
    stays queued, told nothing, and is delivered at the next start, with
    the DNS server back."""
    import socket
    import time
    from harness import Sluice
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent.settimeout(30)
    r = Relay(records_for(["quiet.test"]), domain_conf=log_conf_text(""))
    try:
        conf = os.path.join(r.wd.path, "sluice.conf")
        assert r.d.stop_clean() == 0
        with open(conf) as f:
            text = f.read()
        good = f"servers = 127.0.0.1:{r.dns.port}\n"
        with open(conf, "w") as f:
            f.write(text.replace(good, f"servers = 127.0.0.1:{silent.getsockname()[1]}\n"))
        r.d = Sluice(test_delivery.SLUICE, conf)
        r.d.wait_log("event=ready")
        r.inject([("s@example.com", ["a@quiet.test"], b"Subject: q\r\n\r\nunanswered\r\n")],
                 sessions=1)
        silent.recvfrom(4096)  # the lookup is out: no answer comes
        t0 = time.monotonic()
        assert r.d.stop_clean() == 0
        took = time.monotonic() - t0
        assert took < 10, f"the stop took {took:.1f}s"
        assert r.d.count_log("event=drain_timed_out") == 0
        assert not [e for e in events(r.dlog) if e.get("rcpt") == "a@quiet.test"], "told something"
        assert mdb_entries(r.spool, "msg") == 1, "the message stays queued"
        with open(conf, "w") as f:
            f.write(text)
        r.d = Sluice(test_delivery.SLUICE, conf)
        r.d.wait_log("event=ready")
        assert b"unanswered" in wait_sink(r, 1)[0]
    finally:
        silent.close()
        r.close()


def test_expiry_header_removed_and_headers_logged():
    """A message's own expiry field is honoured and never delivered; the
    configured X- fields appear in its events; a bad expiry is refused."""
    r = Relay(records_for(["ok.test"]), domain_conf=log_conf_text(
        "delivery_log_headers = X-Campaign-ID, X-Tenant-ID\n"))
    try:
        r.inject([("s@example.com", ["a@ok.test"],
                   b"Subject: h\r\nX-Sluice-Expire: 1h\r\nX-Campaign-ID: spring-42\r\n"
                   b"X-Tenant-ID: t9\r\n\r\nbody\r\n")])
        dump = wait_sink(r, 1)[0]
        assert b"X-Sluice-Expire" not in dump, dump
        assert b"X-Campaign-ID: spring-42" in dump
        evs = wait_events(r.dlog, lambda e: e["event"] == "delivery", 1)
        rec = [e for e in events(r.dlog) if e["event"] == "reception"]
        for e in (evs[0], rec[0]):
            assert e["headers"] == {"X-Campaign-ID": "spring-42", "X-Tenant-ID": "t9"}, e
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as c:
            c.ehlo("t")
            c.mail("s@example.com")
            c.rcpt("a@ok.test")
            code, msg = c.data(b"Subject: bad\r\nX-Sluice-Expire: tomorrow\r\n\r\nx\r\n")
            assert code == 550 and b"X-Sluice-Expire" in msg, (code, msg)
            c.mail("s@example.com")
            c.rcpt("a@ok.test")
            code, msg = c.data(b"Subject: two\r\nX-Sluice-Expire: 1h\r\n"
                               b"X-Sluice-Expire: 2h\r\n\r\nx\r\n")
            assert code == 550, (code, msg)
    finally:
        r.close()


def test_logged_headers_unfolded_and_alike_in_every_event():
    """delivery_log_headers values as a consumer joins them: a folded
    field (nodemailer folds a long Subject into encoded words on several
    lines) is logged whole, unfolded, not its first line; a long one is
    cut at the same length in the reception and the recipients' events
    (the reception cut it at 255 octets, the others at 4096); the first
    of two fields of one name counts."""
    r = Relay(records_for(["ok.test"]), domain_conf=log_conf_text(
        "delivery_log_headers = Subject, X-Campaign-ID, List-Id\n"))
    try:
        long_id = "c" * 900 + " " + "d" * 900
        r.inject([("s@example.com", ["a@ok.test", "b@ok.test"],
                   b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n =?utf-8?q?_aus_K=C3=B6ln?=\r\n"
                   b"\tand more  \r\n"
                   b"X-Campaign-ID: " + long_id[:900].encode() + b"\r\n " +
                   long_id[901:].encode() + b"\r\n"
                   b"List-Id: News <news.example>\r\nList-Id: second\r\n\r\nbody\r\n")])
        evs = wait_events(r.dlog, lambda e: e["event"] == "delivery", 2)
        rec = [e for e in events(r.dlog) if e["event"] == "reception"]
        want = {"Subject": "=?utf-8?q?Gr=C3=BC=C3=9Fe?= =?utf-8?q?_aus_K=C3=B6ln?=\tand more",
                "X-Campaign-ID": long_id[:1023], "List-Id": "News <news.example>"}
        for e in evs + rec:
            assert e["headers"] == want, (e["event"], e["headers"])
    finally:
        r.close()


def test_dsn_parameters_go_to_the_next_hop():
    """RFC 3461 5.2: RET, ENVID, NOTIFY and ORCPT given at injection are
    passed on to a next hop that offers DSN (smtp-sink does, and records
    the MAIL and RCPT arguments it got)."""
    r = Relay(records_for(["next.test"]))
    try:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as c:
            c.ehlo("t")
            assert c.mail("s@example.com", ["RET=HDRS", "ENVID=env+2B42"])[0] == 250
            assert c.rcpt("a@next.test", ["NOTIFY=FAILURE,DELAY",
                                          "ORCPT=rfc822;orig+2Bx@example.org"])[0] == 250
            assert c.data(b"Subject: p\r\n\r\nx\r\n")[0] == 250
        # smtp-sink writes its file as the message comes: wait for it whole.
        wait_until(lambda: any(m.rstrip(b"\n").endswith(b"\nx") for m in r.sink.messages()), 30,
                   "the message whole at the sink")
        dump = r.sink.messages()[0]
        head = dump.split(b"\nReceived:")[0]
        assert b"RET=HDRS" in head and b"ENVID=env+2B42" in head, head
        assert b"NOTIFY=FAILURE,DELAY" in head, head
        assert b"ORCPT=rfc822;orig+2Bx@example.org" in head, head
    finally:
        r.close()


def _success_relay(sink_flags, dsn=True):
    """A relay to nodsn.test whose MX takes everything (smtp-sink: sink_flags
    -N hides its DSN extension), and the sender's MX (sender.test) on
    127.0.0.2. Returns (relay, sender's sink)."""
    recs = records_for(["nodsn.test"]) + [
        "host-record=mx2.test,127.0.0.2", "mx-host=sender.test,mx2.test,10"]
    r = Relay(recs, sink_flags=sink_flags, dsn=dsn, domain_conf=log_conf_text(None))
    try:
        return r, Sink(r.wd, r.mx_port, name="senders", host="127.0.0.2")
    except BaseException:
        r.close()
        raise


def _inject_success(r):
    """alice@sender.test to four recipients (two asked for a success DSN,
    one with ORCPT), RET=FULL and ENVID; then <> to one that asked."""
    with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as c:
        c.ehlo("t")
        assert c.mail("alice@sender.test", ["RET=FULL", "ENVID=env+2B7"])[0] == 250
        assert c.rcpt("a@nodsn.test", ["NOTIFY=SUCCESS",
                                       "ORCPT=rfc822;A+2Bx@example.org"])[0] == 250
        assert c.rcpt("b@nodsn.test", ["NOTIFY=SUCCESS,FAILURE"])[0] == 250
        assert c.rcpt("c@nodsn.test")[0] == 250
        assert c.rcpt("d@nodsn.test", ["NOTIFY=FAILURE,DELAY"])[0] == 250
        assert c.data(b"Subject: tell me\r\nX-Campaign-ID: c9\r\n\r\nsecret body\r\n")[0] == 250
        assert c.mail("", [])[0] == 250
        assert c.rcpt("e@nodsn.test", ["NOTIFY=SUCCESS"])[0] == 250
        assert c.data(b"Subject: from nobody\r\n\r\nx\r\n")[0] == 250


def test_success_dsn_when_the_next_hop_has_no_dsn():
    """RFC 3461 5.2.2: a recipient that asked for NOTIFY=SUCCESS, delivered
    to a server that did not offer DSN (it got no NOTIFY and reports
    nothing), gets sluice's success DSN, Action: relayed, with ENVID,
    ORCPT, Remote-MTA, the 250 as Diagnostic-Code and only the headers
    (RFC 3461 4.3, despite RET=FULL); one DSN for the message, naming
    only those that asked; none to <>; a dsn event in the delivery log."""
    r, s2 = _success_relay(["-N"])
    try:
        _inject_success(r)
        dl = wait_events(r.dlog, lambda e: e["event"] == "delivery" and e["sender"], 4)
        dsn = wait_events(r.dlog, lambda e: e["event"] == "dsn", 1)[0]
        assert dsn["id"] == dl[0]["id"], (dsn, dl)
        wait_until(lambda: any(m.rstrip(b"\n").endswith(b"--") for m in s2.messages()), 30,
                   "the success DSN whole at the sender's MX")
        # to the next hop: no NOTIFY (it did not offer DSN)
        assert not any(b"NOTIFY=" in m for m in r.sink.messages()), r.sink.messages()
        raw = s2.messages()[0]
        assert b"X-Mail-Args: <> " in raw, raw[:300]  # from the null sender
        dump = raw.replace(b"\n", b"\r\n")
        msg = email.message_from_bytes(dump, policy=email.policy.default)
        assert msg["Subject"] == "Successful Mail Delivery Report", msg["Subject"]
        assert b"\r\nTo: <alice@sender.test>\r\n" in dump, dump[:600]
        assert msg.get_content_type() == "multipart/report", msg.get_content_type()
        parts = list(msg.iter_parts())
        types = [p.get_content_type() for p in parts]
        assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"], types
        text = dump.decode("utf-8", "replace").replace("\r\n", "\n")
        assert "Original-Envelope-Id: env+7\n" in text, text
        assert text.count("Action: relayed\n") == 2 and "Action: failed" not in text, text
        assert "Final-Recipient: rfc822; a@nodsn.test\n" in text, text
        assert "Original-Recipient: rfc822;A+x@example.org\n" in text, text
        assert "Final-Recipient: rfc822; b@nodsn.test\n" in text, text
        assert "c@nodsn.test" not in text and "d@nodsn.test" not in text, text
        assert "Remote-MTA: dns; mx.test\n" in text, text
        assert re.search(r"Diagnostic-Code: smtp; 250 2\.0\.0 ", text), text
        assert re.search(r"Status: 2\.0\.0\n", text), text
        assert "X-Campaign-ID: c9" in text and "secret body" not in text, text
        assert r.d.stop_clean() == 0
        # one DSN: none for <>'s message, and the DSN itself asks for none
        assert len([e for e in events(r.dlog) if e["event"] == "dsn"]) == 1
        assert r.d.count_log("event=dsn_queued") == 1
        assert len(s2.files()) == 1
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        s2.stop()
        r.close()


def test_no_success_dsn_when_the_next_hop_reports():
    """A next hop that offered DSN gets NOTIFY=SUCCESS on the RCPT line and
    reports the success itself: sluice sends nothing. Nor does it with
    [bounce] dsn = no, whatever the next hop."""
    for flags, dsn in ((), True), (["-N"], False):
        r, s2 = _success_relay(flags, dsn)
        try:
            _inject_success(r)
            wait_events(r.dlog, lambda e: e["event"] == "delivery", 5)
            wait_until(lambda: sum(m.rstrip(b"\n").endswith(b"\nx") or
                                   m.rstrip(b"\n").endswith(b"\nsecret body")
                                   for m in r.sink.messages()) == 2, 30,
                       "both messages whole at the sink")
            args = b"".join(r.sink.messages())
            if not flags:
                assert b"NOTIFY=SUCCESS\n" in args and b"NOTIFY=SUCCESS,FAILURE" in args, args
                assert b"ORCPT=rfc822;A+2Bx@example.org" in args, args
            assert r.d.stop_clean() == 0
            assert not [e for e in events(r.dlog) if e["event"] == "dsn"]
            assert r.d.count_log("event=dsn_queued") == 0
            assert s2.files() == []
        finally:
            s2.stop()
            r.close()


def test_success_under_verp_is_reported_here():
    """Under VERP the next hop's DSNs come back to the bounce listener,
    which reads failures only: a success it reported was dropped there
    (oob_dropped not_failed) and the sender never heard of it. So SUCCESS
    is not asked of a next hop under VERP (SUCCESS alone: NEVER), and
    sluice reports the success itself, Action: relayed, as to a next hop
    without DSN."""
    import shutil
    import tempfile
    from test_delivery import free_port
    keydir = tempfile.mkdtemp(prefix="sluice-verp-key-")
    keyfile = os.path.join(keydir, "verp.key")
    with open(keyfile, "wb") as f:
        f.write(b"0123456789abcdef0123456789abcdef-verp-test\n")
    recs = records_for(["nodsn.test"]) + [
        "host-record=mx2.test,127.0.0.2", "mx-host=sender.test,mx2.test,10"]
    r = Relay(recs, dsn=True, domain_conf=log_conf_text(
        f"[bounce]\nlisten = 127.0.0.1:{free_port()}\nverp_domain = bounces.test\n"
        f"verp_key_file = {keyfile}\n"))
    s2 = None
    try:
        s2 = Sink(r.wd, r.mx_port, name="senders", host="127.0.0.2")
        _inject_success(r)
        wait_events(r.dlog, lambda e: e["event"] == "delivery" and e["sender"], 4)
        # one transaction per recipient under VERP, yet one DSN for the
        # message (earlier versions sent one per recipient)
        wait_until(lambda: sum(m.rstrip(b"\n").endswith(b"--") for m in s2.messages()) == 1, 30,
                   "the success DSN whole at the sender's MX")
        args = b"".join(r.sink.messages())
        # the next hop offers DSN: under VERP asked for failures only,
        # never SUCCESS (the null sender's message has no VERP: as asked)
        assert b"X-Rcpt-Args: <a@nodsn.test> NOTIFY=NEVER ORCPT=" in args, args
        assert b"X-Rcpt-Args: <b@nodsn.test> NOTIFY=FAILURE\n" in args, args
        assert b"X-Rcpt-Args: <e@nodsn.test> NOTIFY=SUCCESS\n" in args, args
        assert args.count(b"NOTIFY=SUCCESS") == 1, args
        text = b"".join(s2.messages()).decode("utf-8", "replace")
        assert text.count("Action: relayed\n") == 2, text
        assert "Final-Recipient: rfc822; a@nodsn.test\n" in text, text
        assert "Final-Recipient: rfc822; b@nodsn.test\n" in text, text
        assert r.d.stop_clean() == 0
        assert len(s2.messages()) == 1, len(s2.messages())
    finally:
        if s2 is not None:
            s2.stop()
        r.close()
        shutil.rmtree(keydir, ignore_errors=True)


def _data_451_once(txns):
    """An MX that answers its first message's final dot with 451 and every
    later one's with 250; txns collects (recipients, reply) of each."""
    import threading
    lock = threading.Lock()

    def script(c, rfile):
        c.sendall(b"220 mx ESMTP\r\n")
        rcpts = []
        for _ in range(10000):  # bounded
            line = rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                c.sendall(b"250-mx\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL":
                rcpts = []
                c.sendall(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                rcpts.append(line[8:].strip().decode())
                c.sendall(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                c.sendall(b"354 go ahead\r\n")
                if test_delivery.read_message(rfile) is None:
                    return
                with lock:
                    reply = b"451 4.3.0 try again" if not txns else b"250 2.0.0 queued"
                    txns.append((sorted(rcpts), reply))
                c.sendall(reply + b"\r\n")
            elif verb == b"QUIT":
                c.sendall(b"221 bye\r\n")
                return
            else:
                c.sendall(b"250 ok\r\n")
    return script


def test_deferrals_while_the_site_rests_back_off():
    """Deferrals of mail not tried (its site resting after every address
    failed) count no attempt, yet the retry schedule goes on with the time
    waited: a recipient that comes due during a long rest again and again
    waits 1 s, 2 s, 4 s as the schedule says, where it came back every 2 s
    (its attempts' step), a transient_failure record each time, for as
    long as the host was down (under the defaults: every 5 minutes for the
    whole outage, the site resting nearly all the time). Such records say
    they were no try ("tried": false)."""
    import time
    r = Relay(records_for(["rest.test"]), with_sink=False, delivery_conf="retry_jitter = 0",
              domain_conf=log_conf_text("[domain *]\nretry_schedule = 1s, 2s, 4s, 8s\n"
                                        "site_hold = 1m\n"))
    try:
        r.inject([("s@example.com", ["a@rest.test"], b"Subject: r\r\n\r\nrest\r\n")],
                 sessions=1)
        tf = wait_events(r.dlog, lambda e: e["event"] == "transient_failure", 4, timeout=30)
        # the first was tried (the connect refused), the others not: the
        # site rests for a minute
        assert [e["attempt"] for e in tf[:4]] == [1, 1, 1, 1], tf
        assert r.d.count_log("event=connect_failed") == 1
        # and they say so: "tried": false, tried=no in the log line; the
        # first, a real try, carries neither
        assert "tried" not in tf[0] and [e.get("tried") for e in tf[1:4]] == [False] * 3, tf
        lines = r.d.log_lines("event=deferred")
        assert not lines[0].endswith(" tried=no") and lines[1].endswith(" tried=no"), lines
        at = [time.mktime(time.strptime(e["time"][:19], "%Y-%m-%dT%H:%M:%S")) +
              float("0" + e["time"][19:23]) for e in tf[:4]]
        gaps = [b - a for a, b in zip(at, at[1:])]
        print(f"     gaps between deferrals: {', '.join(f'{g:.1f}' for g in gaps)} s")
        assert gaps[2] >= 3.5, gaps  # 2 s for ever before
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_deferrals_not_tried_are_not_shaping_replies():
    """A receiver that answers every connection with a 421 greeting, for
    three domains of one site: the first 421 rests the site, the one at
    the next try defers the mail of all three (421_again), untried,
    carrying the reply the connection met. The shaping rules count the
    replies met, one per connection, not those deferrals too (each
    counted the reply again, as if met: a rule counting to an action
    acted on a multiple)."""
    import shutil
    import tempfile
    conns = []

    def greet_421(c, rfile):
        conns.append(1)
        c.sendall(b"421 4.7.0 busy, try later (test)\r\n")

    tmp = tempfile.mkdtemp(prefix="sluice-shp-")
    rules = os.path.join(tmp, "rules")
    with open(rules, "w") as f:
        f.write("rule t421 mx=mx.test code=421 action=count\n")
    doms = ["g1.test", "g2.test", "g3.test"]
    stats = os.path.join(tmp, "stats.sock")
    try:
        r = Relay(records_for(doms), with_sink=False,
                  domain_conf=log_conf_text(f"[stats]\nsocket = {stats}\n"
                                            f"[shaping]\nrules = {rules}\nbuiltin_rules = no\n"
                                            "[domain *]\nsite_hold = 1s\nretry_schedule = 1h\n"))
    except BaseException:
        shutil.rmtree(tmp)
        raise
    mx = test_delivery.HostileMx(r.mx_port, greet_421)
    try:
        r.inject([("s@example.com", [f"a@{d}"], b"Subject: g\r\n\r\nx\r\n") for d in doms],
                 sessions=1)
        tf = wait_events(r.dlog, lambda e: e["event"] == "transient_failure", 3, timeout=30)
        untried = [e for e in tf if e.get("tried") is False]
        assert untried and all(e.get("code") == 421 for e in untried), tf
        assert r.d.count_log("reason=421_again") >= 1

        def hits():
            return stats_ask(stats)["shaping"]["by_rule"].get("t421", 0)
        # each 421 met once: as many hits as greetings read (the count
        # settles: a greeting sent may be read a moment later)
        met = lambda: len([ln for ln in r.d.log_lines("event=destination_held")  # noqa: E731
                           if " conn=" in ln])  # a connection's, not its site's others
        wait_until(lambda: hits() == met() and met() >= 2, 10,
                   "the rule's hits to match the 421 greetings met")
        print(f"     {len(conns)} connections, {hits()} hits, {len(untried)} deferred untried")
        assert hits() <= len(conns) and len(untried) == 3, (hits(), len(conns), tf)
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()
        shutil.rmtree(tmp)


def test_recipients_deferred_together_come_back_together():
    """A message's recipients at one domain deferred together (451 to the
    final dot) come due together and go again in one transaction, however
    large retry_jitter: the jitter is drawn per job, not per recipient
    (which scattered them over the jitter's span: the message sent again
    once per recipient, and a DSN each)."""
    r = Relay(records_for(["together.test"]), with_sink=False,
              delivery_conf="retry_jitter = 50",
              domain_conf=log_conf_text("[domain *]\nretry_schedule = 4s\n"))
    txns = []
    mx = test_delivery.HostileMx(r.mx_port, _data_451_once(txns))
    try:
        rcpts = sorted(f"u{i:02d}@together.test" for i in range(12))
        r.inject([("s@example.com", rcpts, b"Subject: t\r\n\r\ntogether\r\n")], sessions=1)
        dl = wait_events(r.dlog, lambda e: e["event"] == "delivery", len(rcpts), timeout=60)
        assert sorted(e["rcpt"] for e in dl) == rcpts, dl
        assert all(e["attempt"] == 2 for e in dl), dl
        want = [f"<{a}>" for a in rcpts]
        assert txns == [(want, b"451 4.3.0 try again"), (want, b"250 2.0.0 queued")], txns
        assert r.d.stop_clean() == 0
        assert mdb_entries(r.spool, "msg") == 0
    finally:
        mx.stop()
        r.close()


def test_rotation_loses_nothing():
    """rename + SIGHUP while mail flows: the old and the new file together
    hold every event exactly once, and each line is whole."""
    r = Relay(records_for(["rot.test"]), domain_conf=log_conf_text(None))
    try:
        def batch(k):
            r.inject([("s@example.com", [f"u{k}-{i}@rot.test"],
                       f"Subject: {k}-{i}\r\n\r\nx\r\n".encode()) for i in range(40)])
        batch(0)
        wait_events(r.dlog, lambda e: e["event"] == "delivery", 20)
        os.rename(r.dlog, r.dlog + ".1")
        r.d.signal(signal.SIGHUP)
        # The writer reopens the path once the reload is through (slow under
        # the sanitizers): inject after that, or every line may still go to
        # the renamed file and the new one stay empty.
        wait_until(lambda: os.path.exists(r.dlog), 30, "the delivery log reopened")
        batch(1)
        wait_until(lambda: len([e for e in events(r.dlog, False) + events(r.dlog + ".1", False)
                                if e["event"] == "delivery"]) >= 80, 60, "80 deliveries")
        assert r.d.stop_clean() == 0
        old, new = events(r.dlog + ".1"), events(r.dlog)
        assert new, "nothing in the new file"
        allev = old + new
        rcpts = [e["rcpt"] for e in allev if e["event"] == "delivery"]
        assert len(rcpts) == 80 and len(set(rcpts)) == 80, len(rcpts)
        assert len([e for e in allev if e["event"] == "reception"]) == 80
    finally:
        r.close()


if __name__ == "__main__":
    main([test_4xx_then_accepted_on_retry, test_5xx_bounce_class_and_dsn,
          test_nxdomain_bounce_says_which_name_was_not_found,
          test_dsn_quotes_a_local_part_that_needs_it,
          test_dsn_cuts_huge_headers_at_a_line_and_says_so,
          test_delay_warning_only_when_asked, test_no_dsn_to_null_sender, test_421_at_data_holds_the_destination,
          test_held_destination_still_expires, test_expiry_in_every_state,
          test_expiry_while_the_greeting_waits, test_expiry_behind_a_busy_connection,
          test_stop_does_not_wait_for_a_greeting,
          test_stop_says_which_transaction_it_cut_at_the_dot,
          test_stop_at_a_dot_that_never_left_says_it_was_not_accepted,
          test_stop_does_not_wait_for_a_dns_server_that_does_not_answer,
          test_expiry_header_removed_and_headers_logged,
          test_logged_headers_unfolded_and_alike_in_every_event,
          test_dsn_parameters_go_to_the_next_hop, test_success_dsn_when_the_next_hop_has_no_dsn,
          test_no_success_dsn_when_the_next_hop_reports,
          test_success_under_verp_is_reported_here, test_rotation_loses_nothing,
          test_recipients_deferred_together_come_back_together,
          test_deferrals_while_the_site_rests_back_off,
          test_deferrals_not_tried_are_not_shaping_replies])
