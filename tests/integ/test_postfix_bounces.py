"""Out-of-band bounces made by a real Postfix.

sluice relays, with VERP senders, to a private Postfix instance on loopback
(its own main.cf and master.cf in a temp dir, its smtpd on a free port,
started as `master -d` and stopped by PID). That Postfix accepts every
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
import signal
import subprocess
import sys
import tempfile
import time

from harness import free_port, main, skip, wait_until
from test_delivery import Relay, connectable, records_for

KEY = b"postfix-bounce-test-key-0123456789"
DAEMON_DIR = "/usr/lib/postfix/sbin"


class Postfix:
    """A private Postfix: smtpd on 127.0.0.1:port for domain, bouncing every
    recipient, its bounces for bounce_domain sent to 127.0.0.1:bounce_port."""

    def __init__(self, port, domain, bounce_domain, bounce_port):
        if os.geteuid() != 0:
            skip("a private Postfix instance needs root")
        if not os.path.exists(f"{DAEMON_DIR}/master") or shutil.which("postconf") is None:
            skip("postfix not installed (tools/install-deps --test)")
        self.dir = tempfile.mkdtemp(prefix="sluice-postfix-")
        os.chmod(self.dir, 0o755)
        self.proc = None
        etc = os.path.join(self.dir, "etc")
        os.makedirs(etc)
        self.maillog = os.path.join(self.dir, "maillog")
        with open(os.path.join(etc, "main.cf"), "w") as f:
            f.write(f"""compatibility_level = 3.6
queue_directory = {self.dir}/queue
data_directory = {self.dir}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.{domain}
mydomain = {domain}
myorigin = {domain}
mydestination = {domain}
mynetworks = 127.0.0.0/8
local_recipient_maps =
smtpd_reject_unlisted_recipient = no
alias_maps =
alias_database =
local_transport = error:5.1.1 mailbox unavailable
transport_maps = inline:{{{bounce_domain}=smtp:[127.0.0.1]:{bounce_port}}}
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file = {self.maillog}
maillog_file_prefixes = {self.dir}
delay_warning_time = 0
smtputf8_enable = no
biff = no
""")
        with open(os.path.join(etc, "master.cf"), "w") as f:
            f.write(f"""127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
""")
        try:
            os.makedirs(os.path.join(self.dir, "data"))
            shutil.chown(os.path.join(self.dir, "data"), "postfix")
            subprocess.run([f"{DAEMON_DIR}/post-install", f"config_directory={etc}",
                            "meta_directory=/etc/postfix", "command_directory=/usr/sbin",
                            f"daemon_directory={DAEMON_DIR}", "create-missing"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            # Its own session: master signals its whole process group when
            # it stops, which must not be the test's.
            self.proc = subprocess.Popen([f"{DAEMON_DIR}/master", "-c", etc, "-d"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
            wait_until(lambda: connectable(port) or self.proc.poll() is not None, 20,
                       "Postfix's smtpd to listen")
            if self.proc.poll() is not None:
                raise AssertionError(f"postfix master exited {self.proc.returncode}: "
                                     f"{self.log()[-2000:]}")
        except BaseException:
            self.stop()
            raise

    def log(self):
        try:
            with open(self.maillog, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self):
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        finally:
            if os.environ.get("KEEP_TMP") != "1":
                shutil.rmtree(self.dir, ignore_errors=True)


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
        pf = Postfix(r.mx_port, "pf.test", "bounces.test", bport)
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
