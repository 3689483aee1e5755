"""The suppression list, end to end: sluice relaying through dnsmasq to a
receiver on loopback, driven by sluicectl on its stats socket.

- An entry added by hand refuses the recipient at RCPT with the configured
  reply, queues nothing for it, logs a "suppressed" event in the delivery
  log and counts it; removing it lets the address through again; a domain
  entry refuses the whole domain.
- A receiver that answers 550 5.1.1 to RCPT (a small SMTP server written
  here: smtp-sink can only say 5.3.0) makes sluice bounce the recipient
  with class invalid_recipient; with on_invalid_recipient set, the address
  is on the list, and the next submission to it is refused at RCPT. A
  refused MAIL FROM with such a code (a sender problem) puts no recipient
  on the list.
- Import and export round-trip a 100,000-entry CSV.
- Import and export use the file sluicectl opened with its user's rights
  and passed to sluice: another user than sluice's cannot make sluice
  read a file it cannot read itself (a request naming a path is refused,
  sluicectl's own open fails), a pipe passed is refused, and an export
  is that user's file.
- The list survives a clean restart and a kill -9: every entry that
  sluicectl saw acknowledged is there afterwards.
- Out of band (the bounce listener, engine/oob.h): an ARF complaint about a
  recipient and a Postfix DSN (5.1.1) for another, sent back to their VERP
  addresses, put both on the list; the next submission to either is
  refused at RCPT.
"""
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading

from harness import Sluice, extra_env, main, preload, skip, stats_ask, wait_until
import test_delivery
from test_delivery import Relay, records_for
from test_outcomes import log_conf_text

SLUICE = sys.argv[1]
test_delivery.SLUICE = SLUICE
SLUICECTL = os.environ.get("SLUICECTL") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl"))
SOCK_SUFFIX = "-stats.sock"
REPLY = "550 5.7.1 <{addr}> is on the do-not-mail list ({reason})"


def conf(extra="", stats=""):
    return (f"[stats]\nsocket = @DLOG@{SOCK_SUFFIX}\n{stats}[suppress]\nreply = {REPLY}\n" +
            extra + "\n" + log_conf_text(""))


def ctl(r, *args):
    p = subprocess.run([SLUICECTL, "-s", r.dlog + SOCK_SUFFIX, "--json", *args],
                       capture_output=True, text=True, timeout=120)
    return p


def ctl_ok(r, *args):
    p = ctl(r, *args)
    assert p.returncode == 0, f"sluicectl {' '.join(args)}: rc {p.returncode}: {p.stderr}"
    docs = [json.loads(line) for line in p.stdout.splitlines()]
    for d in docs:
        assert d.get("ok") is True, d
    return docs[0] if len(docs) == 1 else docs


def events(path, settled=True):
    """The delivery log's lines, each parsed (a "suppressed" event has no
    queue id: nothing was queued, so test_outcomes' reader does not fit).
    settled as there: False for a poll while sluice writes, which leaves
    a last line not yet whole (a read can see part of a flush's write)
    for the next read."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    if not settled:
        data = data[:data.rfind(b"\n") + 1]
    assert data == b"" or data.endswith(b"\n"), "a line was cut"
    return [json.loads(raw) for raw in data.splitlines()]


def wait_events(path, pred, n, timeout=30):
    wait_until(lambda: len([e for e in events(path, False) if pred(e)]) >= n, timeout,
               f"{n} matching delivery-log events")
    return [e for e in events(path, False) if pred(e)]


def suppressed(r, addr):
    return ctl_ok(r, "suppress", "check", addr)["suppressed"]


class Client:
    """A submission session, one command at a time."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.f = self.s.makefile("rb")
        assert self.f.readline().startswith(b"220")
        self.cmd("EHLO tester")

    def cmd(self, line):
        self.s.sendall(line.encode() + b"\r\n")
        out = []
        while True:
            ln = self.f.readline()
            assert ln, "connection closed"
            out.append(ln.decode().rstrip("\r\n"))
            if ln[3:4] != b"-":
                return out[-1]

    def close(self):
        try:
            self.cmd("QUIT")
        finally:
            self.s.close()


class UnknownUserMx:
    """A receiving MX on loopback that says 550 5.1.1 to recipients whose
    local part starts with "gone" (quoted or not) and accepts the rest (pipelining); with
    mail_reply, it answers MAIL with that instead (a sender it refuses)."""

    def __init__(self, port, mail_reply=None):
        self.accepted = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                w = self.wfile
                w.write(b"220 unknown-user-mx ESMTP\r\n")
                good = 0
                for _ in range(10000):  # bounded
                    line = self.rfile.readline()
                    if not line:
                        return
                    verb = line[:4].upper()
                    if verb in (b"EHLO", b"HELO"):
                        w.write(b"250-unknown-user-mx\r\n250 PIPELINING\r\n")
                    elif verb == b"MAIL":
                        good = 0
                        w.write(mail_reply or b"250 2.1.0 Ok\r\n")
                    elif verb == b"RCPT":
                        addr = line.split(b"<", 1)[1].split(b">", 1)[0]
                        if addr.lower().lstrip(b'"').startswith(b"gone"):
                            w.write(b"550 5.1.1 <" + addr +
                                    b">: Recipient address rejected: User unknown\r\n")
                        else:
                            good += 1
                            outer.accepted.append(addr.decode())
                            w.write(b"250 2.1.5 Ok\r\n")
                    elif verb == b"DATA":
                        if good == 0:
                            w.write(b"554 5.5.1 No valid recipients\r\n")
                            continue
                        w.write(b"354 go ahead\r\n")
                        w.flush()
                        for _ in range(100000):
                            ln = self.rfile.readline()
                            if not ln or ln == b".\r\n":
                                break
                        w.write(b"250 2.0.0 Ok: queued\r\n")
                    elif verb == b"QUIT":
                        w.write(b"221 2.0.0 Bye\r\n")
                        return
                    else:
                        w.write(b"250 2.0.0 Ok\r\n")
                    w.flush()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_manual_entry_refused_at_rcpt():
    r = Relay(records_for(["sup.test"]), domain_conf=conf())
    try:
        got = ctl_ok(r, "suppress", "add", "Blocked@SUP.test", "--note", "asked by phone")
        assert got["added"] == "Blocked@sup.test", got
        c = Client(r.port)
        assert c.cmd("MAIL FROM:<s@example.com>").startswith("250")
        reply = c.cmd("RCPT TO:<Blocked@sup.test>")
        assert reply == "550 5.7.1 <Blocked@sup.test> is on the do-not-mail list (manual)", reply
        # the domain is case-insensitive; the local part is not (no normalisation)
        assert c.cmd("RCPT TO:<Blocked@Sup.Test>").startswith("550 5.7.1")
        assert c.cmd("RCPT TO:<blocked@sup.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        c.s.sendall(b"Subject: s\r\n\r\nhello\r\n.\r\n")
        assert c.f.readline().startswith(b"250")
        c.close()
        # only the one recipient that was not suppressed was queued and delivered
        d = wait_events(r.dlog, lambda e: e["event"] == "delivery", 1)
        assert [e["rcpt"] for e in d] == ["blocked@sup.test"], d
        sup = wait_events(r.dlog, lambda e: e["event"] == "suppressed", 2)
        assert sup[0]["rcpt"] == "Blocked@sup.test" and sup[0]["reason"] == "manual", sup
        assert sup[0]["scope"] == "global" and sup[0]["sender"] == "s@example.com", sup
        assert sup[0]["code"] == 550 and sup[0]["client"] == "127.0.0.1", sup
        rec = wait_events(r.dlog, lambda e: e["event"] == "reception", 1)
        assert rec[0]["rcpt_count"] == 1, rec
        st = ctl_ok(r, "stats")
        assert st["counters"]["rcpt_suppressed"] == 2, st["counters"]
        assert st["suppress"]["entries"] == 1 and st["suppress"]["enabled"] is True, st
        chk = ctl_ok(r, "suppress", "check", "Blocked@sup.test")
        assert chk["suppressed"] is True and chk["entry"]["note"] == "asked by phone", chk
        assert chk["entry"]["expires"] is None, chk
        # a whole domain, with an expiry; then the list
        ctl_ok(r, "suppress", "add", "@dead.test", "--reason", "hard_bounce", "--ttl", "1d")
        c = Client(r.port)
        c.cmd("MAIL FROM:<s@example.com>")
        assert c.cmd("RCPT TO:<anyone@DEAD.test>") == \
            "550 5.7.1 <anyone@DEAD.test> is on the do-not-mail list (hard_bounce)"
        c.close()
        lst = ctl_ok(r, "suppress", "list")
        addrs = [e["address"] for e in lst["entries"]]
        assert addrs == ["@dead.test", "Blocked@sup.test"], lst
        assert lst["entries"][0]["expires"] is not None, lst
        # sluicectl for people: a table
        p = subprocess.run([SLUICECTL, "-s", r.dlog + SOCK_SUFFIX, "suppress", "list"],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0 and "ADDRESS" in p.stdout and "@dead.test" in p.stdout, p
        # removed: through again
        ctl_ok(r, "suppress", "remove", "Blocked@sup.test")
        assert ctl(r, "suppress", "remove", "Blocked@sup.test").returncode == 1
        c = Client(r.port)
        c.cmd("MAIL FROM:<s@example.com>")
        assert c.cmd("RCPT TO:<Blocked@sup.test>").startswith("250")
        c.close()
        # bad input: usage errors from sluicectl, refusals from sluice
        assert ctl(r, "suppress", "add", "not an address").returncode == 2
        assert ctl(r, "suppress", "add", "a@b.test", "--reason", "spite").returncode == 1
        assert ctl(r, "suppress", "frobnicate").returncode == 2
        # a time past what the list can hold is said to be so, not "not an address"
        p = ctl(r, "suppress", "add", "a@b.test", "--ttl", "99999999999d")
        assert p.returncode == 1 and "ttl is at most 36500d" in p.stderr, p
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(r.dlog + SOCK_SUFFIX)  # expires= is the socket's own (sluicectl: --ttl)
            s.sendall(b"suppress add a@b.test expires=18446744073709551\n")
            reply = s.makefile("rb").readline()
        assert b"before the year 10000" in reply, reply
        assert ctl_ok(r, "suppress", "check", "a@b.test")["suppressed"] is False
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_header_tenant_checked_after_data():
    """A tenant named only by X-Sluice-Tenant (a trusted client) is known
    after DATA: its own list is checked then, the recipients on it are
    dropped with their suppressed events, the rest is delivered; a message
    whose every recipient is on it is refused with 550."""
    r = Relay(records_for(["ten.test"]), domain_conf=conf("[tenant acme]\n"))
    try:
        ctl_ok(r, "suppress", "add", "gone@ten.test", "--scope", "acme")
        c = Client(r.port)
        # at RCPT the tenant is not known yet: both are taken
        assert c.cmd("MAIL FROM:<s@example.com>").startswith("250")
        assert c.cmd("RCPT TO:<gone@ten.test>").startswith("250")
        assert c.cmd("RCPT TO:<here@ten.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        c.s.sendall(b"X-Sluice-Tenant: acme\r\nSubject: s\r\n\r\nhello\r\n.\r\n")
        assert c.f.readline().startswith(b"250")
        # every recipient on the tenant's list: the message is refused
        assert c.cmd("MAIL FROM:<s@example.com>").startswith("250")
        assert c.cmd("RCPT TO:<gone@ten.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        c.s.sendall(b"X-Sluice-Tenant: acme\r\nSubject: s\r\n\r\nhello\r\n.\r\n")
        line = c.f.readline()
        assert line.startswith(b"550 5.7.1") and b"acme" in line, line
        # another tenant's mail to the same address is not touched
        assert c.cmd("MAIL FROM:<s@example.com>").startswith("250")
        assert c.cmd("RCPT TO:<gone@ten.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        c.s.sendall(b"Subject: s\r\n\r\nuntenanted\r\n.\r\n")
        assert c.f.readline().startswith(b"250")
        c.close()
        d = wait_events(r.dlog, lambda e: e["event"] == "delivery", 2)
        assert sorted(e["rcpt"] for e in d) == ["gone@ten.test", "here@ten.test"], d
        tenants = {e["rcpt"]: e.get("tenant") for e in d}
        assert tenants == {"here@ten.test": "acme", "gone@ten.test": None}, d
        sup = wait_events(r.dlog, lambda e: e["event"] == "suppressed", 2)
        assert all(e["rcpt"] == "gone@ten.test" and e["scope"] == "acme" for e in sup), sup
        assert all(e.get("tenant") == "acme" for e in sup), sup
        rec = wait_events(r.dlog, lambda e: e["event"] == "reception", 2)
        assert sorted(e["rcpt_count"] for e in rec) == [1, 1], rec
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_rcpt_refusal_carries_the_header_tenant():
    """A recipient refused at RCPT (the global list) in a message whose
    tenant X-Sluice-Tenant names after DATA: its suppressed event carries
    that tenant, as the message's other events do, so that a sink
    filtered by tenant hears of it. A transaction that ends before DATA
    has no tenant: the event goes out then, without one."""
    r = Relay(records_for(["ten.test"]), domain_conf=conf("[tenant acme]\n"))
    try:
        ctl_ok(r, "suppress", "add", "dead@ten.test")
        c = Client(r.port)
        assert c.cmd("MAIL FROM:<s@example.com>").startswith("250")
        assert c.cmd("RCPT TO:<dead@ten.test>").startswith("550 5.7.1")
        assert c.cmd("RCPT TO:<here@ten.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        c.s.sendall(b"X-Sluice-Tenant: acme\r\nSubject: s\r\n\r\nhello\r\n.\r\n")
        assert c.f.readline().startswith(b"250")
        sup = wait_events(r.dlog, lambda e: e["event"] == "suppressed", 1)
        assert sup[0]["rcpt"] == "dead@ten.test" and sup[0]["scope"] == "global", sup
        assert sup[0].get("tenant") == "acme" and sup[0]["sender"] == "s@example.com", sup
        # refused, then the transaction reset: said at the RSET, no tenant
        assert c.cmd("MAIL FROM:<t@example.com>").startswith("250")
        assert c.cmd("RCPT TO:<dead@ten.test>").startswith("550 5.7.1")
        assert c.cmd("RSET").startswith("250")
        sup = wait_events(r.dlog, lambda e: e["event"] == "suppressed", 2)
        assert sup[1]["sender"] == "t@example.com" and sup[1].get("tenant") is None, sup
        # and at the end of the session, for one that just goes
        assert c.cmd("MAIL FROM:<u@example.com>").startswith("250")
        assert c.cmd("RCPT TO:<dead@ten.test>").startswith("550 5.7.1")
        c.close()
        sup = wait_events(r.dlog, lambda e: e["event"] == "suppressed", 3)
        assert sup[2]["sender"] == "u@example.com" and sup[2].get("tenant") is None, sup
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_auth_tenant_named_in_another_case():
    """Tenant names compare without case: a users file's tenant=ACME is
    the config's [tenant acme], whose name the message, its VERP token and
    so its complaints carry. RCPT checks that tenant's list under the
    config's name, not under the users file's spelling (under which no
    entry was ever written: the recipient went through RCPT and DATA)."""
    import base64
    import shutil
    import tempfile
    from test_auth import crypt
    keydir = tempfile.mkdtemp(prefix="sluice-sup-users-")
    users = os.path.join(keydir, "users")
    with open(users, "w") as fh:
        fh.write(f"app1:{crypt('secret', '$6$rounds=5000$')}:tenant=ACME\n")
    r = Relay(records_for(["ten.test"]), domain_conf=conf(
        f"[server]\nauth_users_file = {users}\nplaintext_auth = loopback\n[tenant acme]\n"))
    try:
        ctl_ok(r, "suppress", "add", "gone@ten.test", "--scope", "acme")
        c = Client(r.port)
        auth = base64.b64encode(b"\0app1\0secret").decode()
        assert c.cmd("AUTH PLAIN " + auth).startswith("235")
        assert c.cmd("MAIL FROM:<s@example.com>").startswith("250")
        reply = c.cmd("RCPT TO:<gone@ten.test>")
        assert reply == "550 5.7.1 <gone@ten.test> is on the do-not-mail list (manual)", reply
        assert c.cmd("RCPT TO:<here@ten.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        c.s.sendall(b"Subject: s\r\n\r\nhello\r\n.\r\n")
        assert c.f.readline().startswith(b"250")
        c.close()
        d = wait_events(r.dlog, lambda e: e["event"] == "delivery", 1)
        assert [(e["rcpt"], e.get("tenant")) for e in d] == [("here@ten.test", "acme")], d
        sup = wait_events(r.dlog, lambda e: e["event"] == "suppressed", 1)
        assert [(e["rcpt"], e["scope"]) for e in sup] == [("gone@ten.test", "acme")], sup
        assert r.d.stop_clean() == 0
    finally:
        r.close()
        shutil.rmtree(keydir, ignore_errors=True)


def test_operator_scope_in_another_case():
    """Tenant names compare without case, list scopes with it: an
    operator's `--scope ACME` and an imported line's "Acme" are stored in
    [tenant acme]'s list, under the config's name, where RCPT (and so
    `suppress check --scope acme`) looks and its complaints land; "GLOBAL"
    is the global list. Before the fix both went to lists named as typed,
    which nothing ever checks."""
    r = Relay(records_for(["ten.test"]), domain_conf=conf("[tenant acme]\n"))
    try:
        got = ctl_ok(r, "suppress", "add", "gone@ten.test", "--scope", "ACME")
        assert got["scope"] == "acme", got
        src = os.path.join(r.wd.path, "scopes.csv")
        with open(src, "w") as f:
            f.write("gone2@ten.test,Acme,,,,\nall@ten.test,GLOBAL,,,,\n")
        got = ctl_ok(r, "suppress", "import", src)
        assert got["imported"] == 2 and got["skipped"] == 0, got
        for addr in ("gone@ten.test", "gone2@ten.test"):
            chk = ctl_ok(r, "suppress", "check", addr, "--scope", "acme")
            assert chk["suppressed"] and chk["entry"]["scope"] == "acme", chk
        assert suppressed(r, "all@ten.test")  # the global list
        listed = ctl_ok(r, "suppress", "list")["entries"]
        assert sorted((e["address"], e["scope"]) for e in listed) == [
            ("all@ten.test", "global"), ("gone2@ten.test", "acme"),
            ("gone@ten.test", "acme")], listed
        # removed under any spelling of the tenant's name
        ctl_ok(r, "suppress", "remove", "gone@ten.test", "--scope", "aCmE")
        chk = ctl_ok(r, "suppress", "check", "gone@ten.test", "--scope", "acme")
        assert not chk["suppressed"], chk
        # A name that is no scope is refused, not answered for the global
        # list alone (gone2 is suppressed in acme: "no" would be wrong).
        for sub in ("check", "add", "remove"):
            p = ctl(r, "suppress", sub, "gone2@ten.test", "--scope", "ac,me")
            assert p.returncode != 0 and "not a scope" in p.stdout + p.stderr, (sub, p)
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_scope_for_a_tenant_configured_later():
    """An operator's entry for a tenant the config does not name yet,
    typed in another case than the section that comes later: once
    [tenant Foo] is configured (SIGHUP), its users' RCPT to the address
    is refused. Before the fix the entry stayed under "foo" while RCPT
    looked under "Foo": the recipient was mailed."""
    import base64
    import signal
    from test_auth import crypt
    keydir = tempfile.mkdtemp(prefix="sluice-sup-later-")
    users = os.path.join(keydir, "users")
    with open(users, "w") as fh:
        fh.write(f"app1:{crypt('secret', '$6$rounds=5000$')}:tenant=Foo\n")
    r = Relay(records_for(["ten.test"]), domain_conf=conf(
        f"[server]\nauth_users_file = {users}\nplaintext_auth = loopback\n"))
    cfg = os.path.join(r.wd.path, "sluice.conf")
    try:
        got = ctl_ok(r, "suppress", "add", "gone@ten.test", "--scope", "foo")
        assert got["scope"] == "foo", got
        with open(cfg, "a") as fh:
            fh.write("\n[tenant Foo]\n")
        n = r.d.count_log("event=config_reloaded")
        r.d.signal(signal.SIGHUP)
        r.d.wait_log_count("event=config_reloaded", n + 1)
        c = Client(r.port)
        auth = base64.b64encode(b"\0app1\0secret").decode()
        assert c.cmd("AUTH PLAIN " + auth).startswith("235")
        assert c.cmd("MAIL FROM:<s@example.com>").startswith("250")
        reply = c.cmd("RCPT TO:<gone@ten.test>")
        assert reply == "550 5.7.1 <gone@ten.test> is on the do-not-mail list (manual)", reply
        assert c.cmd("RCPT TO:<here@ten.test>").startswith("250")
        c.close()
        sup = wait_events(r.dlog, lambda e: e["event"] == "suppressed", 1)
        assert [(e["rcpt"], e["scope"]) for e in sup] == [("gone@ten.test", "foo")], sup
        chk = ctl_ok(r, "suppress", "check", "gone@ten.test", "--scope", "FOO")
        assert chk["suppressed"] and chk["entry"]["scope"] == "foo", chk
        assert r.d.stop_clean() == 0
    finally:
        r.close()
        shutil.rmtree(keydir, ignore_errors=True)


def test_quoted_local_part_with_blanks():
    """A quoted local part may hold blanks ("a b"@x.test, RFC 5321 4.1.2),
    and RCPT takes one: it could not be suppressed (sluicectl and the list
    refused every blank), so mail to it always went. sluicectl add, check,
    remove and the socket's paging now take it."""
    r = Relay(records_for(["sup.test"]), domain_conf=conf())
    try:
        got = ctl_ok(r, "suppress", "add", '"a b"@SUP.test')
        assert got["added"] == '"a b"@sup.test', got
        ctl_ok(r, "suppress", "add", "z@sup.test")
        c = Client(r.port)
        assert c.cmd("MAIL FROM:<s@example.com>").startswith("250")
        reply = c.cmd('RCPT TO:<"a b"@sup.test>')
        assert reply == '550 5.7.1 <"a b"@sup.test> is on the do-not-mail list (manual)', reply
        assert c.cmd('RCPT TO:<"a c"@sup.test>').startswith("250")
        c.cmd("RSET")
        chk = ctl_ok(r, "suppress", "check", '"a b"@sup.test')
        assert chk["suppressed"] is True and chk["entry"]["address"] == '"a b"@sup.test', chk
        # a page that ends at it goes on after it
        sock = r.dlog + SOCK_SUFFIX

        def ask(line):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(20)
                s.connect(sock)
                s.sendall(line.encode() + b"\n")
                return json.loads(s.makefile("rb").readline())
        page = ask("suppress list limit=1")
        assert [e["address"] for e in page["entries"]] == ['"a b"@sup.test'], page
        nxt = page["next"]
        page = ask(f"suppress list limit=1 after={nxt['after']} after_scope={nxt['after_scope']}")
        assert page["ok"] and [e["address"] for e in page["entries"]] == ["z@sup.test"], page
        # a blank outside the quotes is no address
        p = ctl(r, "suppress", "add", "a b@sup.test")
        assert p.returncode == 2 and "quoted local part" in p.stderr, (p.returncode, p.stderr)
        bad = ask('suppress add "a b"c d@sup.test')
        assert not bad["ok"], bad
        ctl_ok(r, "suppress", "remove", '"a b"@sup.test')
        assert not suppressed(r, '"a b"@sup.test')
        c.cmd("MAIL FROM:<s@example.com>")
        assert c.cmd('RCPT TO:<"a b"@sup.test>').startswith("250")
        c.close()
    finally:
        r.close()


def test_hard_bounce_feeds_the_list():
    r = Relay(records_for(["gone.test"]), with_sink=False,
              domain_conf=conf("on_invalid_recipient = 30d\n"))
    mx = UnknownUserMx(r.mx_port)
    try:
        r.inject([("s@example.com", ["gone1@gone.test", "here@gone.test"],
                   b"Subject: b\r\n\r\nhello\r\n")])
        b = wait_events(r.dlog, lambda e: e["event"] == "bounce", 1)
        assert b[0]["rcpt"] == "gone1@gone.test" and b[0]["class"] == "invalid_recipient", b
        wait_events(r.dlog, lambda e: e["event"] == "delivery", 1)
        # the feed is committed by the list's writer thread: a short wait
        wait_until(lambda: suppressed(r, "gone1@gone.test"), 15, "gone1 on the list")
        assert not suppressed(r, "here@gone.test")
        e = ctl_ok(r, "suppress", "check", "gone1@gone.test")["entry"]
        assert e["reason"] == "hard_bounce" and "5.1.1" in e["note"], e
        assert e["expires"] is not None, e
        # the next message to it is refused at RCPT; the other goes through
        c = Client(r.port)
        c.cmd("MAIL FROM:<s@example.com>")
        assert c.cmd("RCPT TO:<gone1@gone.test>") == \
            "550 5.7.1 <gone1@gone.test> is on the do-not-mail list (hard_bounce)"
        assert c.cmd("RCPT TO:<here@gone.test>").startswith("250")
        c.close()
        # the writer counts an entry once its commit returned, a moment
        # after the entry shows (suppress.c sup_write_pairs): wait for it
        wait_until(lambda: ctl_ok(r, "stats")["suppress"]["added"] >= 1, 15, "the entry counted")
        st = ctl_ok(r, "stats")["suppress"]
        assert st["added"] == 1 and st["feed_dropped"] == 0, st
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()


def test_entry_of_a_quoted_local_part_with_a_blank():
    """A hard bounce of a quoted local part with a blank ("gone doe"@:
    RCPT takes it) goes on the list like any other: it was lost, the list
    refusing every blank (logged event=suppress_feed_failed and counted in
    suppress.feed_dropped, which the unit test test_notes_wait_for_room
    still covers with an address no RCPT takes), and mail to it went on."""
    r = Relay(records_for(["gone.test"]), with_sink=False,
              domain_conf=conf("on_invalid_recipient = 30d\n"))
    mx = UnknownUserMx(r.mx_port)
    try:
        r.inject([("s@example.com", ['"gone doe"@gone.test', "gone2@gone.test"],
                   b"Subject: b\r\n\r\nhello\r\n")])
        b = wait_events(r.dlog, lambda e: e["event"] == "bounce", 2)
        assert all(e["class"] == "invalid_recipient" for e in b), b
        wait_until(lambda: suppressed(r, "gone2@gone.test"), 15, "gone2 on the list")
        wait_until(lambda: suppressed(r, '"gone doe"@gone.test'), 15, '"gone doe" on the list')
        assert r.d.log_lines("event=suppress_feed_failed") == []
        # counted once the commit returned, a moment after both show
        wait_until(lambda: ctl_ok(r, "stats")["suppress"]["added"] >= 2, 15, "both counted")
        st = ctl_ok(r, "stats")["suppress"]
        assert st["feed_dropped"] == 0 and st["added"] == 2, st
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()


def test_sender_refused_does_not_feed_the_list():
    """A MAIL FROM refused with a code of the invalid_recipient class
    (Postfix's reject_unlisted_sender: 550 5.1.0 ... Sender address
    rejected: User unknown) bounces every recipient of the transaction,
    but says nothing of them: none goes on the list."""
    r = Relay(records_for(["strict.test"]), with_sink=False,
              domain_conf=conf("on_invalid_recipient = 30d\n"))
    mx = UnknownUserMx(r.mx_port, mail_reply=b"550 5.1.0 <s@example.com>: Sender address "
                       b"rejected: User unknown in local recipient table\r\n")
    try:
        r.inject([("s@example.com", ["a@strict.test", "b@strict.test"],
                   b"Subject: b\r\n\r\nhello\r\n")])
        b = wait_events(r.dlog, lambda e: e["event"] == "bounce", 2)
        assert all(e["class"] == "invalid_recipient" for e in b), b
        # whatever the writer thread was given is committed before the check
        assert r.d.stop_clean() == 0
        r.d = Sluice(SLUICE, os.path.join(r.wd.path, "sluice.conf"))
        r.d.wait_log("event=ready")
        assert not suppressed(r, "a@strict.test")
        assert not suppressed(r, "b@strict.test")
        assert ctl_ok(r, "stats")["suppress"]["entries"] == 0
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()


def test_import_of_what_never_ends_is_refused():
    """suppress import of something that is no regular file is refused at
    once: /dev/zero (a line that never ends: the stats thread read it
    forever, and a stop, which waits for an import, never came), a FIFO
    (opening it waited for a writer that never comes): by sluicectl, which
    opens the file, and by sluice for a path root names. The stats socket
    answers after, and sluice stops."""
    r = Relay(records_for(["bulk.test"]), with_sink=False, domain_conf=conf())
    fifo = os.path.join(r.wd.path, "list.fifo")
    os.mkfifo(fifo)
    try:
        for path in ("/dev/zero", fifo):
            p = subprocess.run([SLUICECTL, "-s", r.dlog + SOCK_SUFFIX, "--json", "suppress",
                                "import", path], capture_output=True, text=True, timeout=20)
            assert p.returncode != 0 and "not a regular file" in p.stdout + p.stderr, p
            got = stats_ask(r.dlog + SOCK_SUFFIX, f"suppress import {path}", timeout=20)
            assert got["ok"] is False and "not a regular file" in got["error"], got
        assert ctl_ok(r, "stats")["suppress"]["entries"] == 0
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_file_errors_of_a_long_path_keep_their_reason():
    """suppress import and export of a path sluice opens itself (root
    names it): the reason of a refusal comes first and the path last,
    its start cut to fit the answer's 1,024 octets, as an import's counts
    do (ae46188). The path came first: one of 1,100 octets or more took
    the reason (No such file or directory, not a regular file) out of
    the answer."""
    r = Relay(records_for(["bulk.test"]), with_sink=False, domain_conf=conf())
    deep = os.path.join(r.wd.path, *(f"{i}" + "e" * 199 for i in range(6)))
    fifo = os.path.join(deep, "list.fifo")
    try:
        os.makedirs(deep)
        os.mkfifo(fifo)
        missing = os.path.join(deep, "missing.csv")
        for line, reason, name in ((f"suppress import {missing}", "No such file or directory",
                                    "/missing.csv)"),
                                   (f"suppress import {fifo}", "not a regular file",
                                    "/list.fifo)"),
                                   (f"suppress export {os.path.join(deep, 'no', 'out.csv')}",
                                    "No such file or directory", "/no/out.csv)")):
            got = stats_ask(r.dlog + SOCK_SUFFIX, line, timeout=20)
            err = got.get("error", "")
            assert got["ok"] is False and reason in err, (len(line), got)
            assert err.endswith(name) and " (file ..." in err, err
            assert len(err.encode()) < 1024, len(err.encode())
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_import_export_of_a_file_name_with_blanks():
    """sluicectl suppress import and export of a file whose name has a
    blank (and a quote, a backslash): the path went on the command line
    as a word, and sluicectl refused it ("no spaces ... please"), though
    the file itself is passed and the path only names it. It now goes
    quoted; sluice's answer and log name it as it is. A control
    character still cannot be named (a clear refusal, no file made)."""
    r = Relay(records_for(["bulk.test"]), with_sink=False, domain_conf=conf())
    try:
        src = os.path.join(r.wd.path, 'my "list" 2024\\.csv')
        with open(src, "w") as f:
            f.write("address,scope,reason,added,expires,note\nblank@name.test,,,,,\n")
        got = ctl_ok(r, "suppress", "import", src)
        assert got["imported"] == 1, got
        assert suppressed(r, "blank@name.test")
        out = os.path.join(r.wd.path, "the export 2024.csv")
        got = ctl_ok(r, "suppress", "export", out)
        assert got["path"] == out, got
        with open(out) as f:
            assert "blank@name.test" in f.read()
        assert r.d.count_log("event=suppress_export ") == 1
        # sluice itself opens a quoted path root names, unquoted
        quoted = '"' + src.replace("\\", "\\\\").replace('"', '\\"') + '"'
        got = stats_ask(r.dlog + SOCK_SUFFIX, f"suppress import {quoted}", timeout=20)
        assert got["ok"] is True and got["imported"] == 1, got
        # an empty quoted name is named as such, an unclosed one too
        got = stats_ask(r.dlog + SOCK_SUFFIX, 'suppress import ""', timeout=20)
        assert got["ok"] is False and "missing PATH" in got["error"], got
        got = stats_ask(r.dlog + SOCK_SUFFIX, 'suppress import "/tmp/x', timeout=20)
        assert got["ok"] is False and "must end with its quote" in got["error"], got
        bad = os.path.join(r.wd.path, "tab\there.csv")
        p = ctl(r, "suppress", "export", bad)
        assert p.returncode == 2 and "control character" in p.stderr, p
        assert not os.path.exists(bad)
        assert r.d.stop_clean() == 0
    finally:
        r.close()


NOBODY = 65534  # a user that is neither root nor sluice's (the tests run as root)

# A raw client of the stats socket, run as NOBODY: one request line,
# alone or with the read end of a pipe passed (SCM_RIGHTS) whose write
# end stays open (a read of it never ends), or with a file it opens as
# mode says ("wronly:PATH", "rdonly:PATH", "rdwr:PATH", "opath:PATH");
# prints the answer.
RAW_CLIENT = r"""
import json, os, socket, sys
path, line, mode = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(path)
data = (line + "\n").encode()
if mode == "pipe":
    r, w = os.pipe()
    os.write(w, b"address,scope,reason,added,expires,note\npiped@pipe.test,,,,,\n")
    socket.send_fds(s, [data], [r])
    os.close(r)
elif ":" in mode:
    how, name = mode.split(":", 1)
    fd = os.open(name, {"wronly": os.O_WRONLY, "rdonly": os.O_RDONLY, "rdwr": os.O_RDWR,
                        "opath": os.O_PATH}[how])
    socket.send_fds(s, [data], [fd])
    os.close(fd)
else:
    s.sendall(data)
buf = b""
while not buf.endswith(b"\n"):
    b = s.recv(65536)
    if not b:
        break
    buf += b
print(json.dumps({"uid": os.getuid(), "answer": json.loads(buf)}))
"""


def as_nobody(args, cwd):
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def raw_as_nobody(sock, line, cwd, mode="line"):
    p = as_nobody([sys.executable, "-c", RAW_CLIENT, sock, line, mode], cwd)
    assert p.returncode == 0, p
    got = json.loads(p.stdout)
    assert got["uid"] == NOBODY, got
    return got["answer"]


def test_import_export_with_the_callers_rights():
    """suppress import and export open their file with the rights of the
    one who asks, not sluice's: sluicectl opens it and passes it to sluice
    with the command. A user other than root and sluice's own, let onto
    the stats socket by its mode, cannot make sluice read a file that
    only sluice's user can read (here a root-only file with the look of a
    DKIM key and of addresses): a request naming a path is refused, and
    nothing of it is listed or echoed; sluicectl's own open fails with
    its reason. A pipe passed is refused at once (the import ends). What
    that user can read imports; an export is a file that user owns, made
    where that user may write, and not where only sluice may. Root may
    still name a path for sluice to open."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        print("     not root, or no setpriv: no other user to be (skipped)")
        return
    r = Relay(records_for(["bulk.test"]), with_sink=False,
              domain_conf=conf(stats="socket_mode = 0666\n"))
    try:
        sock = r.dlog + SOCK_SUFFIX
        os.chmod(r.wd.path, 0o711)  # the socket reachable, the rest not listed
        secret = os.path.join(r.wd.path, "secret.csv")
        with open(secret, "w") as f:
            f.write("MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n"
                    "leak@secret.test,,,,,\nnot an address at all,,,,,\n")
        os.chmod(secret, 0o600)
        home = os.path.join(r.wd.path, "nobody")
        os.mkdir(home, 0o700)
        os.chown(home, NOBODY, NOBODY)
        sluicectl = [os.path.abspath(SLUICECTL), "-s", sock, "--json"]  # run elsewhere

        # a raw request naming a path, without a file passed: refused
        for line in (f"suppress import {secret}",
                     f"suppress export {os.path.join(home, 'by-sluice.csv')}"):
            got = raw_as_nobody(sock, line, home)
            assert got["ok"] is False and "pass the file" in got["error"], got
            assert "MIIE" not in json.dumps(got) and "leak" not in json.dumps(got), got
        assert not os.path.exists(os.path.join(home, "by-sluice.csv"))
        assert ctl_ok(r, "stats")["suppress"]["entries"] == 0
        assert not suppressed(r, "leak@secret.test")

        # through sluicectl: its own open fails, with its reason
        p = as_nobody([*sluicectl, "suppress", "import", secret], home)
        assert p.returncode == 1, p
        assert "cannot open" in p.stderr and "Permission denied" in p.stderr, p.stderr
        assert "MIIE" not in p.stdout + p.stderr
        assert ctl_ok(r, "stats")["suppress"]["entries"] == 0

        # a pipe passed: refused at once, nothing of it imported
        got = raw_as_nobody(sock, "suppress import pipe", home, mode="pipe")
        assert got["ok"] is False and "not a regular file" in got["error"], got
        assert not suppressed(r, "piped@pipe.test")

        # what that user may read imports
        mine = os.path.join(home, "mine.csv")
        with open(mine, "w") as f:
            f.write("a@mine.test,,,,,\nb@mine.test,acme,,,,\n")
        os.chown(mine, NOBODY, NOBODY)
        os.chmod(mine, 0o600)
        p = as_nobody([*sluicectl, "suppress", "import", "mine.csv"], home)
        assert p.returncode == 0, p
        got = json.loads(p.stdout)
        assert got["imported"] == 2 and got["skipped"] == 0, got
        assert suppressed(r, "a@mine.test")

        # a file passed open the wrong way for its command: refused at
        # once, nothing read from it or written to it
        for how, sub, want in (("wronly", "import", "not open for reading"),
                               ("opath", "import", "not open for reading"),
                               ("rdonly", "export", "not open for writing"),
                               ("opath", "export", "not open for writing")):
            got = raw_as_nobody(sock, f"suppress {sub} mine.csv", home, mode=f"{how}:{mine}")
            assert got["ok"] is False and want in got["error"], (how, sub, got)
        # an export to a file passed with content in it: refused, as sluice
        # never exported over a file (written from its offset, the export
        # left the old file's tail after its own lines)
        got = raw_as_nobody(sock, "suppress export mine.csv", home, mode=f"rdwr:{mine}")
        assert got["ok"] is False and "not empty" in got["error"], got
        with open(mine) as f:
            assert f.read() == "a@mine.test,,,,,\nb@mine.test,acme,,,,\n"

        # an export is that user's file
        out = os.path.join(home, "out.csv")
        p = as_nobody([*sluicectl, "suppress", "export", "out.csv"], home)
        assert p.returncode == 0, p
        assert json.loads(p.stdout)["exported"] == 2, p.stdout
        st = os.stat(out)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), st
        with open(out) as f:
            lines = f.read().splitlines()
        assert lines[0] == "address,scope,reason,added,expires,note", lines
        assert sorted(x.split(",")[0] for x in lines[1:]) == ["a@mine.test", "b@mine.test"]
        # never over a file, and not where only root (sluice) may write
        p = as_nobody([*sluicectl, "suppress", "export", "out.csv"], home)
        assert p.returncode == 1 and "File exists" in p.stderr, p
        assert os.stat(out).st_size > 0
        p = as_nobody([*sluicectl, "suppress", "export", os.path.join(r.wd.path, "x.csv")],
                      home)
        assert p.returncode == 1 and "Permission denied" in p.stderr, p
        assert not os.path.exists(os.path.join(r.wd.path, "x.csv"))
        # an export sluice refuses leaves no empty file behind
        p = as_nobody([*sluicectl, "suppress", "export", "bad.csv", "--scope", "x" * 100], home)
        assert p.returncode == 1 and "too long" in p.stderr, p
        assert not os.path.exists(os.path.join(home, "bad.csv"))

        # root may still have sluice open a path
        got = stats_ask(sock, f"suppress import {secret}")
        assert got["ok"] is True and got["imported"] >= 1, got
        assert suppressed(r, "leak@secret.test")
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_export_file_removed_when_no_answer_comes():
    """sluicectl creates the file of an export before it asks: a request
    that ends without sluice's answer (the connection closed, an answer
    that is no JSON, a signal that stops sluicectl) removes that file
    again, as a refused one does, so that no empty or half-written file
    that looks like an export is left. Here a stand-in for sluice's socket that takes the line and
    its file and answers as told."""
    wd = tempfile.mkdtemp(prefix="sluice-export-gone-")
    try:
        sock = os.path.join(wd, "stats.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(sock)
        srv.listen(4)
        srv.settimeout(20)

        asked = threading.Event()

        def serve(answer):
            c, _ = srv.accept()
            with c:
                c.settimeout(20)
                data, fds, _, _ = socket.recv_fds(c, 65536, 4)
                for fd in fds:
                    os.write(fd, b"address,scope,reason,added,expires,note\n")
                    os.close(fd)
                assert data.startswith(b"suppress export "), data
                if answer is None:  # none: sluicectl waits until it is stopped
                    asked.set()
                    assert c.recv(1) == b""
                else:
                    c.sendall(answer)

        for answer, why in ((b"", "closed the connection"),
                            (b"not json\n", "not a JSON object")):
            out = os.path.join(wd, "out.csv")
            t = threading.Thread(target=serve, args=(answer,))
            t.start()
            p = subprocess.run([SLUICECTL, "-s", sock, "suppress", "export", out],
                               capture_output=True, text=True, timeout=60)
            t.join(timeout=30)
            assert not t.is_alive()
            assert p.returncode == 3 and why in p.stderr, p
            assert not os.path.exists(out), (why, os.listdir(wd))
        # stopped by a signal (Ctrl-C, SIGTERM, a hang-up) while it waits:
        # the file goes too (sluice, still writing, writes to no name)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            out = os.path.join(wd, "out.csv")
            asked.clear()
            t = threading.Thread(target=serve, args=(None,))
            t.start()
            p = subprocess.Popen([SLUICECTL, "-s", sock, "suppress", "export", out],
                                 stderr=subprocess.PIPE, text=True)
            try:
                assert asked.wait(timeout=30)
                assert os.path.exists(out)
                p.send_signal(sig)
                p.wait(timeout=30)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            t.join(timeout=30)
            assert not t.is_alive()
            assert p.returncode == -sig, (sig, p.returncode, p.stderr.read())
            p.stderr.close()
            assert not os.path.exists(out), (sig, os.listdir(wd))
        srv.close()
    finally:
        shutil.rmtree(wd, ignore_errors=True)


def test_import_export_round_trip_100k():
    r = Relay(records_for(["bulk.test"]), domain_conf=conf())
    try:
        src = os.path.join(r.wd.path, "in.csv")
        reasons = ["hard_bounce", "complaint", "unsubscribe", "manual"]
        with open(src, "w") as f:
            f.write("address,scope,reason,added,expires,note\n")
            for i in range(100000):
                scope = "global" if i % 3 else f"tenant{i % 7}"
                exp = "" if i % 2 else "2099-01-01T00:00:00Z"
                note = "" if i % 5 else f"\"note, {i} \"\"q\"\"\""
                f.write(f"user{i}@d{i % 1000}.bulk.test,{scope},{reasons[i % 4]},"
                        f"2026-01-02T03:04:05Z,{exp},{note}\n")
            f.write("this is not an address,,,,,\n")
        got = ctl_ok(r, "suppress", "import", src)
        assert got["imported"] == 100000 and got["skipped"] == 1, got
        assert got["first_error"].startswith("line 100002"), got
        assert suppressed(r, "user1@d1.bulk.test")
        c = Client(r.port)
        c.cmd("MAIL FROM:<s@example.com>")
        assert c.cmd("RCPT TO:<user2@d2.bulk.test>").startswith("550 5.7.1")
        c.close()
        out = os.path.join(r.wd.path, "out.csv")
        got = ctl_ok(r, "suppress", "export", out)
        assert got["exported"] == 100000, got
        # never over an existing file
        assert ctl(r, "suppress", "export", out).returncode == 1
        with open(src) as f:
            want = sorted(f.read().splitlines()[1:-1])
        with open(out) as f:
            lines = f.read().splitlines()
        assert lines[0] == "address,scope,reason,added,expires,note", lines[0]
        assert sorted(lines[1:]) == want, "export differs from the import"
        # and the export imports again (into a list that already holds it all)
        got = ctl_ok(r, "suppress", "import", out)
        assert got["imported"] == 100000 and got["skipped"] == 0, got
        assert ctl_ok(r, "stats")["suppress"]["entries"] == 100000
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_survives_restart_and_kill9():
    r = Relay(records_for(["keep.test"]), domain_conf=conf())
    cfg = os.path.join(r.wd.path, "sluice.conf")
    try:
        for i in range(20):
            ctl_ok(r, "suppress", "add", f"k{i}@keep.test", "--reason", "complaint")
        assert r.d.stop_clean() == 0
        r.d = Sluice(SLUICE, cfg)
        r.d.wait_log("event=ready")
        assert all(suppressed(r, f"k{i}@keep.test") for i in range(20))
        # kill -9 right after the acknowledgements
        for i in range(20, 40):
            ctl_ok(r, "suppress", "add", f"k{i}@keep.test")
        r.d.kill9()
        r.d = Sluice(SLUICE, cfg)
        r.d.wait_log("event=ready")
        missing = [i for i in range(40) if not suppressed(r, f"k{i}@keep.test")]
        assert missing == [], missing
        c = Client(r.port)
        c.cmd("MAIL FROM:<s@example.com>")
        assert c.cmd("RCPT TO:<k39@keep.test>").startswith("550 5.7.1")
        c.close()
        assert r.d.stop_clean() == 0
    finally:
        r.close()


HOLD = "SLUICE_TEST_SUPPRESS_HOLD"


def held(start):
    """start() with the list's writer held (suppress.c: it writes nothing
    of its own accord, as if a kill -9 always came before its commit)."""
    os.environ[HOLD] = "1"
    try:
        return start()
    finally:
        os.environ.pop(HOLD, None)


def test_hard_bounce_entry_survives_kill9():
    """A hard bounce's entry is committed with the bounce (a note in the
    spool, suppress.h), not after it: with the list's writer held, the
    bounce in the delivery log (written once its commit returned) and a
    kill -9, the next start has the entry and refuses the address at
    RCPT. Before, the entry waited in memory for the writer thread's own
    commit, and the kill lost it: the address was mailed again."""
    r = held(lambda: Relay(records_for(["gone.test"]), with_sink=False,
                           domain_conf=conf("on_invalid_recipient = 30d\n")))
    mx = UnknownUserMx(r.mx_port)
    cfg = os.path.join(r.wd.path, "sluice.conf")
    try:
        r.d.wait_log(f"event=test_hook name={HOLD}")
        r.inject([("s@example.com", ["gone1@gone.test"], b"Subject: b\r\n\r\nhello\r\n")])
        b = wait_events(r.dlog, lambda e: e["event"] == "bounce", 1)
        assert b[0]["class"] == "invalid_recipient", b
        assert not suppressed(r, "gone1@gone.test")  # the writer holds it
        r.d.kill9()
        r.d = Sluice(SLUICE, cfg)
        r.d.wait_log("event=ready")  # the spool's notes are copied before it
        e = ctl_ok(r, "suppress", "check", "gone1@gone.test")
        assert e["suppressed"] and e["entry"]["reason"] == "hard_bounce", e
        assert r.d.count_log("event=suppress_notes_replayed entries=1") == 1
        assert "5.1.1" in e["entry"]["note"] and e["entry"]["expires"] is not None, e
        c = Client(r.port)
        c.cmd("MAIL FROM:<s@example.com>")
        assert c.cmd("RCPT TO:<gone1@gone.test>") == \
            "550 5.7.1 <gone1@gone.test> is on the do-not-mail list (hard_bounce)"
        c.close()
        # copied once: a clean restart replays nothing
        assert r.d.stop_clean() == 0
        r.d = Sluice(SLUICE, cfg)
        r.d.wait_log("event=ready")
        assert r.d.count_log("event=suppress_notes_replayed") == 0
        assert suppressed(r, "gone1@gone.test")
        assert r.d.stop_clean() == 0
    finally:
        mx.stop()
        r.close()


def test_start_with_notes_and_a_failing_list():
    """A start with entries left in the spool (a kill -9 before the list's
    writer copied them) and a list that cannot be written (a failing disk,
    here the fail-writes shim, argv[3]; a full map_size would do the
    same) starts and delivers: the entries wait in the spool, and once the
    list takes writes again the writer copies them. Before, sluice refused
    to start ("cannot copy the spool's entries to the list") until the
    operator mended the list: no mail at all for a to-do of the list's."""
    shim = sys.argv[3] if len(sys.argv) > 3 else None
    if shim is None or not os.path.exists(shim):
        print("     no fail-writes shim (argv[3]): not run")
        return
    r = held(lambda: Relay(records_for(["gone.test"]), with_sink=False,
                           domain_conf=conf("on_invalid_recipient = 30d\n")))
    mx = UnknownUserMx(r.mx_port)
    cfg = os.path.join(r.wd.path, "sluice.conf")
    trigger = tempfile.mktemp(prefix="sluice-fail-writes-")
    env = {"LD_PRELOAD": preload(SLUICE, shim), "FAIL_WRITES_PATH": "/suppress/data.mdb",
           "FAIL_WRITES_TRIGGER": trigger}
    try:
        r.d.wait_log(f"event=test_hook name={HOLD}")
        r.inject([("s@example.com", ["gone1@gone.test"], b"Subject: b\r\n\r\nhello\r\n")])
        wait_events(r.dlog, lambda e: e["event"] == "bounce", 1)
        r.d.kill9()
        open(trigger, "w").close()
        with extra_env(env):
            r.d = Sluice(SLUICE, cfg)
        r.d.wait_log("event=ready")
        assert r.d.count_log("event=suppress_notes_waiting") == 1
        assert not suppressed(r, "gone1@gone.test")
        # the operator sees it wait (it was in no counter before)
        assert ctl_ok(r, "stats")["suppress"]["notes_pending"] == 1
        p = subprocess.run([SLUICECTL, "-s", r.dlog + SOCK_SUFFIX, "stats"],
                           capture_output=True, text=True, timeout=30)
        assert re.search(r"entries waiting in the spool \(list not written\) +1\n", p.stdout), \
            p.stdout
        os.unlink(trigger)
        # the writer's next try (every 5 s) copies it
        wait_until(lambda: suppressed(r, "gone1@gone.test"), 30, "the entry copied")
        wait_until(lambda: ctl_ok(r, "stats")["suppress"]["notes_pending"] == 0, 30,
                   "the note trimmed")
        assert r.d.stop_clean() == 0
    finally:
        if os.path.exists(trigger):
            os.unlink(trigger)
        mx.stop()
        r.close()


def test_report_entry_survives_kill9():
    """The bounce listener's 250 to a DSN and to a complaint promises
    their entries: with the list's writer held, a kill -9 right after both
    250s, and the next start has both (committed with the report, as its
    events are). Before, the entries were fed to the writer thread while
    the report was parsed, and the kill lost them."""
    from test_feedback import FIXTURE_VERP, Feedback, fixture
    f = held(lambda: Feedback(
        server_extra=f"[suppress]\nreply = {REPLY}\non_invalid_recipient = 30d\n"))
    sock = os.path.join(f.keydir, "stats.sock")
    cfg = os.path.join(f.r.wd.path, "sluice.conf")

    def check(addr):
        p = subprocess.run([SLUICECTL, "-s", sock, "--json", "suppress", "check", addr],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p
        return json.loads(p.stdout)

    try:
        _, verp = f.send_mail(["alice@d1.test", "carol@d2.test"])
        dsn = fixture("postfix-dsn.eml", **{FIXTURE_VERP: verp["alice@d1.test"],
                                           "nobody@example.net": "alice@d1.test"})
        assert f.bounce("", [verp["alice@d1.test"]], dsn) == {}
        arf = fixture("arf-yahoo.eml", **{FIXTURE_VERP: verp["carol@d2.test"],
                                          "happy.reader@yahoo.com": "carol@d2.test",
                                          "fbl@bounces.example.com": "fbl@fbl.test"})
        assert f.bounce("feedback@arf.mail.yahoo.test", ["fbl@fbl.test"], arf) == {}
        assert not check("alice@d1.test")["suppressed"]  # the writer holds them
        f.r.d.kill9()
        f.r.d = Sluice(SLUICE, cfg)
        f.r.d.wait_log("event=ready")  # the spool's notes are copied before it
        assert check("alice@d1.test")["suppressed"], "the hard bounce's entry was lost"
        assert check("carol@d2.test")["suppressed"], "the complaint's entry was lost"
        assert check("alice@d1.test")["entry"]["reason"] == "hard_bounce"
        assert check("carol@d2.test")["entry"]["reason"] == "complaint"
        assert f.r.d.count_log("event=suppress_notes_replayed entries=2") == 1
        assert f.r.d.stop_clean() == 0
    finally:
        f.close()


def test_import_killed_midway_keeps_whole_transactions():
    """doc/sluicectl.md: an import cut short by a crash keeps the
    transactions it committed (250,000 entries each, in address order)
    and nothing of the rest, and sluice starts as usual; the same import
    again completes it. A million lines, kill -9 at random moments within
    the time a whole import of as many lines took (in another scope,
    whose keys sort after the global list's), a bounded number of
    rounds, then the whole import."""
    import random
    import time
    n, batch = 1_000_000, 250_000
    r = Relay(records_for(["imp.test"]), domain_conf=conf())
    cfg = os.path.join(r.wd.path, "sluice.conf")
    src = os.path.join(r.wd.path, "big.csv")
    timing = os.path.join(r.wd.path, "timing.csv")
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)

    def import_cmd(path):
        return subprocess.Popen([SLUICECTL, "-s", r.dlog + SOCK_SUFFIX, "--json", "suppress",
                                 "import", path], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        for path, scope in ((src, ""), (timing, "zz")):
            with open(path, "w") as f:
                f.write("address,scope,reason,added,expires,note\n")
                f.writelines(f"u{i:07d}@imp.test,{scope},hard_bounce,,,n{i}\n"
                             for i in range(n))
        t0 = time.monotonic()
        p = import_cmd(timing)
        out, _ = p.communicate(timeout=120)
        took = time.monotonic() - t0
        assert p.returncode == 0 and json.loads(out)["imported"] == n, out
        seen = []
        for _ in range(5):
            p = import_cmd(src)
            time.sleep(rng.uniform(0.2, 0.95) * took)  # the random moment the test varies
            r.d.kill9()
            out, _ = p.communicate(timeout=60)
            r.d = Sluice(SLUICE, cfg)
            r.d.wait_log("event=ready")
            entries = ctl_ok(r, "stats")["suppress"]["entries"] - n
            seen.append(entries)
            assert entries % batch == 0, f"seed {seed}: {entries} entries: a transaction in part"
            if p.returncode == 0:
                assert json.loads(out)["imported"] == n and entries == n, (out, entries)
            # whole transactions in address order: the first ones stored
            assert suppressed(r, "u0000000@imp.test") == (entries > 0)
            if 0 < entries < n:
                assert suppressed(r, f"u{entries - 1:07d}@imp.test")
                assert not suppressed(r, f"u{entries:07d}@imp.test")
        print(f"     seed={seed}: a whole import {took:.2f}s; entries after each kill {seen}")
        got = ctl_ok(r, "suppress", "import", src)
        assert got["imported"] == n and got["skipped"] == 0, got
        assert ctl_ok(r, "stats")["suppress"]["entries"] == 2 * n
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_stop_ends_an_import_at_its_next_transaction():
    """doc/sluicectl.md: a stop of sluice ends an import at its next
    transaction (250,000 entries each). Nothing looked at the stop: the
    stop, past its drain, waited in ops_stop for the whole import (two
    million lines here), and sluicectl was told it all went in. Now
    sluicectl is told (exit 1) how many entries went in, whole
    transactions, the first in address order, and that the rest did not;
    the log says so (event=suppress_import cut=stopping); the same import
    after the restart completes the list. The file's path is longer than
    the answer's 1,024 octets: the counts come before it, its start cut
    (it came first, and a path of 830 octets pushed the counts out)."""
    import time
    n, batch = 2_000_000, 250_000
    r = Relay(records_for(["imp.test"]), domain_conf=conf())
    cfg = os.path.join(r.wd.path, "sluice.conf")
    deep = os.path.join(r.wd.path, *(f"{i}" + "d" * 199 for i in range(6)))
    src = os.path.join(deep, "big.csv")
    try:
        os.makedirs(deep)
        assert len(src) > 1200, len(src)
        with open(src, "w") as f:
            f.writelines(f"u{i:07d}@imp.test,,hard_bounce,,,n{i}\n" for i in range(n))
        p = subprocess.Popen([SLUICECTL, "-s", r.dlog + SOCK_SUFFIX, "--json", "suppress",
                              "import", src], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            # the first transaction in: the import is writing
            seen = [0]

            def writing():
                seen[0] = ctl_ok(r, "stats")["suppress"]["entries"]
                return seen[0] > 0
            wait_until(writing, 120, "the import's first transaction")
            t0 = time.monotonic()
            r.d.signal(signal.SIGTERM)
            out, err = p.communicate(timeout=60)
            rc = r.d.proc.wait(60)
            took = time.monotonic() - t0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        r.d.reader.join(5)
        assert rc == 0, "\n".join(r.d.lines[-20:])
        (logged,) = r.d.log_lines("event=suppress_import")
        print(f"     sluicectl: {err.strip()}; sluice gone {took:.2f}s after SIGTERM")
        if "cut=stopping" not in logged and n - seen[0] <= 2 * batch:
            # the import ended uncut, but it had at most two transactions
            # left when the SIGTERM went (a machine so loaded that the
            # look at the stats came that late): the drain and a
            # transaction under way may take that long
            print(f"     not conclusive: {seen[0]} of {n} in at the SIGTERM")
            return
        assert p.returncode == 1 and "cut by sluice's stop" in err, (p.returncode, out, err)
        assert "cut=stopping" in logged, logged
        f = dict(kv.split("=", 1) for kv in logged.split() if "=" in kv)
        imported, left = int(f["imported"]), int(f["not_imported"])
        assert imported % batch == 0 and 0 < imported < n, logged
        assert imported + left == n and f"{imported} entries imported" in err, (logged, err)
        assert f"{left} not;" in err, err
        # the path last, its start cut to fit: the file's own name kept
        line = err.strip()
        assert line.endswith("d" * 150 + "/big.csv)") and " (file ..." in line, line
        assert len(line.encode()) < 1024 + len("sluicectl: "), len(line)
        assert logged.endswith("file=" + os.path.realpath(src)), logged
        # the next start: whole transactions, the first in address order
        r.d = Sluice(SLUICE, cfg)
        r.d.wait_log("event=ready")
        assert ctl_ok(r, "stats")["suppress"]["entries"] == imported
        assert suppressed(r, f"u{imported - 1:07d}@imp.test")
        assert not suppressed(r, f"u{imported:07d}@imp.test")
        got = ctl_ok(r, "suppress", "import", src)
        assert got["imported"] == n and got["skipped"] == 0, got
        assert ctl_ok(r, "stats")["suppress"]["entries"] == n
        assert r.d.stop_clean() == 0
    finally:
        r.close()


def test_out_of_band_complaint_and_bounce():
    from test_feedback import FIXTURE_VERP, Feedback, fixture
    f = Feedback(server_extra=f"[suppress]\nreply = {REPLY}\non_invalid_recipient = 30d\n")
    sock = os.path.join(f.keydir, "stats.sock")

    def check(addr):
        p = subprocess.run([SLUICECTL, "-s", sock, "--json", "suppress", "check", addr],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p
        return json.loads(p.stdout)

    try:
        _, verp = f.send_mail(["alice@d1.test", "carol@d2.test"])
        assert not check("carol@d2.test")["suppressed"]
        arf = fixture("arf-yahoo.eml", **{FIXTURE_VERP: verp["carol@d2.test"],
                                          "happy.reader@yahoo.com": "carol@d2.test",
                                          "fbl@bounces.example.com": "fbl@fbl.test"})
        f.bounce("feedback@arf.mail.yahoo.test", ["fbl@fbl.test"], arf)
        dsn = fixture("postfix-dsn.eml", **{FIXTURE_VERP: verp["alice@d1.test"],
                                           "nobody@example.net": "alice@d1.test"})
        f.bounce("", [verp["alice@d1.test"]], dsn)
        f.wait_events("complaint", 1)
        f.wait_events("oob_bounce", 1)
        wait_until(lambda: check("carol@d2.test")["suppressed"] and
                   check("alice@d1.test")["suppressed"], 15, "both on the list")
        assert check("carol@d2.test")["entry"]["reason"] == "complaint"
        assert check("carol@d2.test")["entry"]["expires"] is None  # on_complaint = forever
        assert check("alice@d1.test")["entry"]["reason"] == "hard_bounce"
        c = Client(f.r.port)
        c.cmd("MAIL FROM:<news@shop.test>")
        assert c.cmd("RCPT TO:<carol@d2.test>") == \
            "550 5.7.1 <carol@d2.test> is on the do-not-mail list (complaint)"
        assert c.cmd("RCPT TO:<alice@d1.test>") == \
            "550 5.7.1 <alice@d1.test> is on the do-not-mail list (hard_bounce)"
        c.close()
        assert f.r.d.stop_clean() == 0
    finally:
        f.close()


def test_complaint_for_unconfigured_tenant_folded():
    """A tenant whose name is too long for a VERP token is carried as its
    tag; a complaint about its mail that comes back while the config does
    not name it (removed since, or not on this node yet) goes to the list
    "tag:XXXXXXXX". Once the config names the tenant again (SIGHUP, or a
    restart), that list is folded into the tenant's own: its mail to the
    complainer is refused at RCPT, another tenant's is not. Before the fix
    nothing ever checked a "tag:" list: the recipient was mailed again."""
    import base64
    import re
    import signal
    from test_auth import crypt
    from test_feedback import FIXTURE_VERP, Feedback, fixture
    tenant = "customer-00042"  # longer than a token's 8 octets: its tag goes
    section = f"[tenant {tenant}]\n"
    keydir = tempfile.mkdtemp(prefix="sluice-sup-tag-")
    users = os.path.join(keydir, "users")
    with open(users, "w") as fh:
        h = crypt("secret", "$6$rounds=5000$")
        fh.write(f"app1:{h}:tenant=shop1\napp2:{h}:tenant={tenant}\n")
    f = Feedback(server_extra=f"[server]\nauth_users_file = {users}\nplaintext_auth = loopback\n"
                 f"[suppress]\nreply = {REPLY}\n[tenant shop1]\n{section}")
    sock = os.path.join(f.keydir, "stats.sock")
    cfg = os.path.join(f.r.wd.path, "sluice.conf")
    with open(cfg) as fh:
        with_tenant = fh.read()
    assert section in with_tenant
    without_tenant = with_tenant.replace(section, "")

    def sup(*args):
        p = subprocess.run([SLUICECTL, "-s", sock, "--json", "suppress", *args],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p
        return json.loads(p.stdout)

    def reload(text):
        with open(cfg, "w") as fh:
            fh.write(text)
        n = f.r.d.count_log("event=config_reloaded")
        f.r.d.signal(signal.SIGHUP)
        f.r.d.wait_log_count("event=config_reloaded", n + 1)

    def complain(rcpt, verp, n):
        arf = fixture("arf-yahoo.eml", **{FIXTURE_VERP: verp, "happy.reader@yahoo.com": rcpt,
                                          "fbl@bounces.example.com": "fbl@fbl.test"})
        f.bounce("feedback@arf.mail.yahoo.test", ["fbl@fbl.test"], arf)
        f.wait_events("complaint", n)
        wait_until(lambda: any(e["address"] == rcpt for e in sup("list")["entries"]), 15,
                   f"{rcpt} on a list")
        got = [e for e in sup("list")["entries"] if e["address"] == rcpt]
        assert len(got) == 1 and re.fullmatch(r"tag:[0-9a-f]{8}", got[0]["scope"]), got
        assert got[0]["reason"] == "complaint", got

    def rcpt_as(user, rcpt):
        c = Client(f.r.port)
        auth = base64.b64encode(b"\0" + user.encode() + b"\0secret").decode()
        assert c.cmd("AUTH PLAIN " + auth).startswith("235")
        assert c.cmd("MAIL FROM:<news@shop.test>").startswith("250")
        reply = c.cmd(f"RCPT TO:<{rcpt}>")
        c.close()
        return reply

    try:
        # the tenant's mail, each recipient with its own VERP sender
        with smtplib.SMTP("127.0.0.1", f.r.port, timeout=30) as s:
            s.ehlo("app.test")
            s.login("app2", "secret")
            s.sendmail("news@shop.test", ["carol@d2.test", "dave@d2.test"],
                       b"Subject: t\r\n\r\nx\r\n")
        wait_until(lambda: len(f.events("delivery")) >= 2, 60, "two deliveries")
        verp = {}
        for m in f.r.sink.messages():
            head = m.split(b"\n\n", 1)[0].decode(errors="replace")
            verp[re.search(r"^X-Rcpt-Args: <([^>]*)>", head, re.M).group(1)] = \
                re.search(r"^X-Mail-Args: <([^>]*)>", head, re.M).group(1)
        assert set(verp) == {"carol@d2.test", "dave@d2.test"}, verp

        # the tenant leaves the config; carol complains meanwhile: its tag's list
        reload(without_tenant)
        complain("carol@d2.test", verp["carol@d2.test"], 1)
        # back in the config (SIGHUP): the tag's list is the tenant's now
        reload(with_tenant)
        assert rcpt_as("app2", "carol@d2.test") == \
            "550 5.7.1 <carol@d2.test> is on the do-not-mail list (complaint)"
        assert rcpt_as("app2", "dave@d2.test").startswith("250")
        assert rcpt_as("app1", "carol@d2.test").startswith("250")  # not another tenant's
        got = [(e["address"], e["scope"]) for e in sup("list")["entries"]]
        assert got == [("carol@d2.test", tenant)], got
        assert f.r.d.count_log("event=suppress_scope_folded") == 1

        # the same at a start: dave complains while the tenant is gone
        reload(without_tenant)
        complain("dave@d2.test", verp["dave@d2.test"], 2)
        assert f.r.d.stop_clean() == 0
        with open(cfg, "w") as fh:
            fh.write(with_tenant)
        f.r.d = Sluice(SLUICE, cfg)
        f.r.d.wait_log("event=ready")
        assert rcpt_as("app2", "dave@d2.test") == \
            "550 5.7.1 <dave@d2.test> is on the do-not-mail list (complaint)"
        assert rcpt_as("app1", "dave@d2.test").startswith("250")
        got = sorted((e["address"], e["scope"]) for e in sup("list")["entries"])
        assert got == [("carol@d2.test", tenant), ("dave@d2.test", tenant)], got
        assert f.r.d.stop_clean() == 0
    finally:
        f.close()
        shutil.rmtree(keydir, ignore_errors=True)


if __name__ == "__main__":
    for tool in ("dnsmasq", "smtp-sink"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0 and \
                not os.path.exists(f"/usr/sbin/{tool}"):
            skip(f"{tool} not installed (tools/install-deps --test)")
    if not os.path.exists(SLUICECTL):
        skip(f"no sluicectl at {SLUICECTL}")
    main([test_manual_entry_refused_at_rcpt, test_quoted_local_part_with_blanks,
          test_hard_bounce_feeds_the_list,
          test_import_export_round_trip_100k, test_survives_restart_and_kill9,
          test_import_killed_midway_keeps_whole_transactions,
          test_stop_ends_an_import_at_its_next_transaction,
          test_out_of_band_complaint_and_bounce, test_header_tenant_checked_after_data,
          test_rcpt_refusal_carries_the_header_tenant,
          test_auth_tenant_named_in_another_case, test_sender_refused_does_not_feed_the_list,
          test_operator_scope_in_another_case, test_complaint_for_unconfigured_tenant_folded,
          test_scope_for_a_tenant_configured_later, test_hard_bounce_entry_survives_kill9,
          test_report_entry_survives_kill9, test_start_with_notes_and_a_failing_list,
          test_entry_of_a_quoted_local_part_with_a_blank,
          test_import_of_what_never_ends_is_refused,
          test_file_errors_of_a_long_path_keep_their_reason,
          test_import_export_with_the_callers_rights,
          test_export_file_removed_when_no_answer_comes,
          test_import_export_of_a_file_name_with_blanks])
