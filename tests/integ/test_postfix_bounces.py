"""Out-of-band bounces made by a real Postfix.

sluice relays, with VERP senders, to a private Postfix instance on loopback
(tests/support/private_postfix.py: its own main.cf and master.cf in a
temp dir, its smtpd on a free port, started as `master -d` and stopped by
PID). That Postfix accepts every
recipient of its domain, fails to deliver them (local_transport =
error:5.1.1) and, like any MX that accepts first and bounces later, sends
its DSN to the envelope sender: the VERP address, routed by its
transport_maps to sluice's bounce listener. Checks: Postfix saw the VERP
sender (its log and the DSN's X-Postfix-Sender); each DSN became an
oob_bounce event with the original's queue id, the recipient, its index,
class invalid_recipient, verified; nothing of it was queued.

Needs root (Postfix's master drops privileges to its mail_owner) and
Postfix; skips (77) otherwise."""
import json
import os
import re
import shutil
import tempfile

from harness import free_port, main, skip, wait_until
from private_postfix import PrivatePostfix  # tests/support
from test_delivery import Relay, records_for

KEY = b"postfix-bounce-test-key-0123456789"


def bouncing_postfix(port, domain, bounce_domain, bounce_port):
    """A private Postfix: smtpd on 127.0.0.1:port for domain, bouncing every
    recipient, its bounces for bounce_domain sent to 127.0.0.1:bounce_port."""
    why = PrivatePostfix.missing()
    if why is not None:
        skip(why)
    return PrivatePostfix(port, f"mx.{domain}", f"""mydomain = {domain}
myorigin = {domain}
mydestination = {domain}
local_recipient_maps =
smtpd_reject_unlisted_recipient = no
alias_maps =
alias_database =
local_transport = error:5.1.1 mailbox unavailable
transport_maps = inline:{{{bounce_domain}=smtp:[127.0.0.1]:{bounce_port}}}
delay_warning_time = 0
""")


def events(path, kind):
    """The delivery log's events of kind, each line parsed; a last line
    not yet whole (a read can see part of a flush's write, while sluice
    writes) is left for the next read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    data = data[:data.rfind(b"\n") + 1]
    return [e for e in map(json.loads, data.splitlines()) if e["event"] == kind]


def test_postfix_dsn_to_the_listener():
    bport = free_port()
    keydir = tempfile.mkdtemp(prefix="sluice-pf-key-")
    keyfile = os.path.join(keydir, "verp.key")
    with open(keyfile, "wb") as f:
        f.write(KEY + b"\n")
    r = pf = None
    try:
        r = Relay(records_for(["pf.test"]), with_sink=False, domain_conf=f"""
[log]
delivery_log = @DLOG@
delivery_log_flush = 10ms
[bounce]
listen = 127.0.0.1:{bport}
verp_domain = bounces.test
verp_key_file = {keyfile}
""")
        pf = bouncing_postfix(r.mx_port, "pf.test", "bounces.test", bport)
        rcpts = ["gone@pf.test", "missing@pf.test"]
        r.inject([("news@shop.test", rcpts,
                   b"From: news@shop.test\r\nTo: reader@pf.test\r\nSubject: offers\r\n"
                   b"Message-ID: <pf1@shop.test>\r\n\r\nOffers.\r\n")], sessions=1)
        qid = None
        wait_until(lambda: len(events(r.dlog, "reception")) == 1, 20, "the reception event")
        qid = events(r.dlog, "reception")[0]["id"]
        # Postfix accepted both (delivered, as far as sluice knows), then
        # bounced them by mail to their VERP senders
        wait_until(lambda: len(events(r.dlog, "oob_bounce")) >= 2, 90,
                   "Postfix's DSNs as oob_bounce events (maillog:\n" + pf.log()[-3000:] + ")")
        # sluice's own delivery events follow Postfix's 250 and its
        # outcome's commit, not Postfix's DSNs: nothing orders them before
        # the oob_bounce events (a loaded machine can commit late), so wait
        wait_until(lambda: len(events(r.dlog, "delivery")) >= 2, 30, "the delivery events")
        dl = events(r.dlog, "delivery")
        assert sorted(e["rcpt"] for e in dl) == rcpts, dl
        evs = sorted(events(r.dlog, "oob_bounce"), key=lambda e: e["rcpt"])
        for ev, rcpt, idx in zip(evs, rcpts, (0, 1)):
            assert ev["id"] == qid, (ev, qid)
            assert ev["rcpt"] == rcpt and ev["rcpt_index"] == idx, ev
            assert ev["class"] == "invalid_recipient", ev
            assert ev["enhanced"] == "5.1.1" and ev["report"] == "dsn", ev
            assert ev["verified"] is True and ev["reporter"] == "mx.pf.test", ev
            assert ev["client"] == "127.0.0.1", ev
        # what Postfix saw on the wire: a VERP sender per recipient
        senders = re.findall(r"from=<(bounce-[a-z2-7]+@bounces\.test)>", pf.log())
        assert len(set(senders)) == 2, pf.log()[-3000:]
        assert "from=<news@shop.test>" not in pf.log()
        # the DSNs were not queued by sluice: two receptions would show
        assert len(events(r.dlog, "reception")) == 1
        r.d.wait_log_count("event=oob_received", 2)
    finally:
        try:
            if pf is not None:
                pf.stop()
        finally:
            if r is not None:
                r.close()
            shutil.rmtree(keydir, ignore_errors=True)


if __name__ == "__main__":
    main([test_postfix_dsn_to_the_listener])
