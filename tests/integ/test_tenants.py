"""Who a message belongs to: tenants, campaigns, pools and priorities at
submission (issue 16, first part).

A sluice with [source], [pool] and [tenant] sections, a users file whose
users carry tenant= and pool=, dnsmasq for MX records and smtp-sink as the
receiver (it writes each message it receives to a file). Clients are
Python's smtplib: from 127.0.0.1 (in trusted_networks) and from 127.0.0.2
(not trusted: AUTH only).
"""
import ctypes
import json
import os
import secrets
import shutil
import smtplib
import sys

from harness import Sluice, Workdir, free_port, main, read_jsonl, skip, spool_tool, wait_until
import test_delivery
from test_delivery import Dns, Sink, records_for

SLUICE = sys.argv[1]
test_delivery.SLUICE = SLUICE

_libcrypt = ctypes.CDLL("libcrypt.so.1")
_libcrypt.crypt.restype = ctypes.c_char_p
_libcrypt.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]


def crypt(password):
    salt = secrets.token_hex(8)
    return _libcrypt.crypt(password.encode(), f"$5$rounds=1000${salt}".encode()).decode()


USERS = [
    ("app1", "tenant=acme"),                 # acme's default pool (transactional)
    ("app2", "example.com, tenant=globex, pool=bulk"),
    ("app3", ""),                            # no tenant
    ("app4", "tenant=acme, pool=shared"),    # a pool acme may not use
    ("app5", "tenant=ghost"),                # a tenant the config does not name
]
PASSWORD = "s3cret-pass"


class Node:
    """dnsmasq + smtp-sink + a sluice with tenants; stop() keeps the spool
    for sluice-spool, start() runs sluice again on it."""

    def __init__(self, delivery=True, server_extra=""):
        self.server_extra = server_extra
        for tool in ("dnsmasq", "smtp-sink"):
            if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
                skip(f"{tool} not installed (tools/install-deps --test)")
        self.wd = Workdir("sluice-tenants-")
        self.dns = self.sink = self.d = None
        try:
            self.mx_port = free_port()
            self.dns = Dns(self.wd, records_for(["ok.test"]))
            self.sink = Sink(self.wd, self.mx_port)
            self.port = free_port()
            self.spool = os.path.join(self.wd.path, "spool")
            self.dlog = os.path.join(self.wd.path, "delivery.jsonl")
            self.sock = os.path.join(self.wd.path, "stats.sock")
            users = "".join(f"{n}:{crypt(PASSWORD)}" + (f":{extra}" if extra else "") + "\n"
                            for n, extra in USERS)
            self.users = self.wd.file("users", users)
            self.start(delivery)
        except BaseException:
            self.close()
            raise

    def conf(self, delivery):
        return self.wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{self.port}
trusted_networks = 127.0.0.1/32
auth_users_file = {self.users}
plaintext_auth = loopback
{self.server_extra}
[queue]
path = {self.spool}
map_size = 64M
[delivery]
enabled = {"yes" if delivery else "no"}
remote_port = {self.mx_port}
allow_networks = 127.0.0.0/8
connect_timeout = 2s
idle_timeout = 1s
[dns]
servers = 127.0.0.1:{self.dns.port}
[bounce]
dsn = no
[stats]
socket = {self.sock}
[log]
delivery_log = {self.dlog}
delivery_log_flush = 20ms
[source 127.0.0.1]
ehlo = out1.example.net
[source 127.0.0.2]
ehlo = out2.example.net
[pool transactional]
sources = 127.0.0.1
[pool bulk]
sources = 127.0.0.1:3, 127.0.0.2
[pool shared]
sources = 127.0.0.2
[tenant acme]
pools = transactional, bulk
pool = transactional
priority = 5
[tenant globex]
pool = bulk
""")

    def start(self, delivery=True):
        self.d = Sluice(SLUICE, self.conf(delivery))
        self.d.wait_log("event=ready")

    def stop(self):
        assert self.d.stop_clean() == 0
        self.d = None

    def client(self, source=None, user=None):
        c = smtplib.SMTP("127.0.0.1", self.port, timeout=30,
                         source_address=(source, 0) if source else None)
        c.ehlo("tester")
        if user is not None:
            c.login(user, PASSWORD)
        return c

    def ask(self, command):
        import socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.sock)
            s.sendall(command.encode() + b"\n")
            f = s.makefile("rb")
            return json.loads(f.readline())

    def events(self):
        """The delivery log's events (read_jsonl: a last line not yet
        whole is left for the next read)."""
        return read_jsonl(self.dlog)

    def wait_events(self, pred, n, timeout=30):
        return wait_until(lambda: [e for e in self.events() if pred(e)][:n]
                          if len([e for e in self.events() if pred(e)]) >= n else None,
                          timeout, f"{n} matching delivery log events")

    def close(self):
        try:
            if self.d is not None and self.d.proc.poll() is None:
                assert self.d.stop_clean() == 0
        finally:
            for p in (self.sink, self.dns):
                if p is not None:
                    p.stop()
            self.wd.cleanup()


def send(c, body, sender="s@example.com", rcpt="a@ok.test"):
    """DATA's reply (code, text) for one message."""
    c.mail(sender)
    code, msg = c.rcpt(rcpt)
    assert code == 250, (code, msg)
    return c.data(body)


def spool(node):
    return {m["id"]: m for m in map(json.loads, spool_tool("dump", node.spool).stdout.splitlines())}


def test_owner_stored_logged_and_survives_restart():
    """An AUTH user's tenant and pool, the tenant's priority and a campaign
    header are stored with the message (sluice-spool), logged in its
    reception event, and still there after a restart; the control fields
    are gone from the stored message."""
    n = Node(delivery=False)
    try:
        with n.client("127.0.0.2", "app1") as c:
            code, msg = send(c, b"Subject: one\r\nX-Sluice-Campaign: spring sale 2026\r\n"
                                b"\r\nbody\r\n")
            assert code == 250, (code, msg)
        with n.client("127.0.0.2", "app2") as c:
            code, msg = send(c, b"Subject: two\r\nx-sluice-priority:  7\r\n"
                                b"X-Sluice-Campaign: c-\r\n 42\r\n\r\nbody\r\n")
            assert code == 250, (code, msg)
        with n.client("127.0.0.2", "app3") as c:
            code, msg = send(c, b"Subject: three\r\n\r\nbody\r\n")
            assert code == 250, (code, msg)
        rec = n.wait_events(lambda e: e["event"] == "reception", 3)
        by_user = {e["auth_user"]: e for e in rec}
        e = by_user["app1"]
        assert (e["tenant"], e["pool"], e["campaign"], e["priority"]) == \
            ("acme", "transactional", "spring sale 2026", 5), e
        e = by_user["app2"]
        assert (e["tenant"], e["pool"], e["campaign"], e["priority"]) == \
            ("globex", "bulk", "c- 42", 7), e
        e = by_user["app3"]
        assert "tenant" not in e and "pool" not in e and "campaign" not in e, e
        n.stop()
        for restarted in (False, True):
            msgs = spool(n)
            assert len(msgs) == 3, msgs
            got = {m["auth_user"]: m for m in msgs.values()}
            assert (got["app1"]["tenant"], got["app1"]["pool"], got["app1"]["campaign"],
                    got["app1"]["priority"]) == ("acme", "transactional", "spring sale 2026", 5)
            assert (got["app2"]["tenant"], got["app2"]["pool"], got["app2"]["priority"]) == \
                ("globex", "bulk", 7)
            assert (got["app3"]["tenant"], got["app3"]["pool"], got["app3"]["priority"]) == \
                ("", "", 0)
            import base64
            for m in msgs.values():
                body = base64.b64decode(m["body"])
                assert b"x-sluice" not in body.lower(), body
            if not restarted:
                n.start(delivery=False)
                n.stop()
        # Delivered after the restart: nothing of the control fields at
        # the receiver.
        n.start(delivery=True)
        wait_until(lambda: len(n.sink.files()) >= 3 and n.d.count_log("event=delivered") >= 3,
                   60, "3 messages at the sink")
        for m in n.sink.messages():
            assert b"x-sluice" not in m.lower(), m
        # Every event of the message carries its owner: the deliveries too.
        dl = n.wait_events(lambda e: e["event"] == "delivery", 3)
        owners = sorted((e.get("tenant", ""), e.get("pool", ""), e.get("campaign", ""),
                         e.get("priority", 0)) for e in dl)
        assert owners == sorted([("acme", "transactional", "spring sale 2026", 5),
                                 ("globex", "bulk", "c- 42", 7),
                                 ("", "", "", 0)]), owners
    finally:
        n.close()


def test_trusted_headers_and_refusals():
    """From trusted_networks the headers choose tenant, pool and priority;
    a pool the tenant may not use, an unknown tenant, a tenant header from
    an untrusted client or one other than the user's, duplicated or
    malformed control fields are refused at the end of DATA, with nothing
    queued; the receiver never sees a control field, folded or not."""
    n = Node()
    try:
        with n.client() as c:  # 127.0.0.1: trusted, no AUTH
            code, msg = send(c, b"Subject: t\r\nX-Sluice-Tenant: ACME\r\nX-Sluice-Pool: bulk\r\n"
                                b"X-Sluice-Priority: 9\r\nX-Sluice-Campaign:\r\n\tfolded\r\n"
                                b"X-Sluice-Expire: 1h\r\n\r\nbody\r\n")
            assert code == 250, (code, msg)
            code, msg = send(c, b"Subject: t\r\nX-Sluice-Tenant: acme\r\n"
                                b"X-Sluice-Pool: shared\r\n\r\nbody\r\n")
            assert code == 550 and b'pool "shared" not allowed for tenant "acme"' in msg, \
                (code, msg)
            code, msg = send(c, b"Subject: t\r\nX-Sluice-Tenant: nobody\r\n\r\nbody\r\n")
            assert code == 550 and b'unknown tenant "nobody"' in msg, (code, msg)
            code, msg = send(c, b"Subject: t\r\nX-Sluice-Tenant: acme\r\n"
                                b"X-Sluice-Tenant: globex\r\n\r\nbody\r\n")
            assert code == 550 and b"must appear once" in msg, (code, msg)
            code, msg = send(c, b"Subject: t\r\nX-Sluice-Campaign: " + b"x" * 200 +
                                b"\r\n\r\nbody\r\n")
            assert code == 550 and b"too long" in msg, (code, msg)
            code, msg = send(c, b"Subject: t\r\nX-Sluice-Priority: high\r\n\r\nbody\r\n")
            assert code == 550 and b"one digit" in msg, (code, msg)
        with n.client("127.0.0.2", "app3") as c:  # untrusted, no tenant of its own
            code, msg = send(c, b"Subject: t\r\nX-Sluice-Tenant: acme\r\n\r\nbody\r\n")
            assert code == 550 and b"trusted networks only" in msg, (code, msg)
        with n.client("127.0.0.2", "app1") as c:
            code, msg = send(c, b"Subject: t\r\nX-Sluice-Tenant: globex\r\n\r\nbody\r\n")
            assert code == 550 and b'tenant "globex" not allowed for user "app1"' in msg, \
                (code, msg)
            code, msg = send(c, b"Subject: t\r\nX-Sluice-Pool: shared\r\n\r\nbody\r\n")
            assert code == 550 and b'pool "shared" not allowed for tenant "acme"' in msg, \
                (code, msg)
            # the tenant's other allowed pool, chosen by header
            code, msg = send(c, b"Subject: t\r\nX-Sluice-Pool: bulk\r\n\r\nbody\r\n")
            assert code == 250, (code, msg)
        with n.client("127.0.0.2", "app4") as c:  # users file: a pool acme may not use
            code, msg = send(c, b"Subject: t\r\n\r\nbody\r\n")
            assert code == 550 and b'pool "shared" not allowed for tenant "acme"' in msg, \
                (code, msg)
        n.d.wait_log("event=users_file_warning user=app5 tenant=ghost")
        with n.client("127.0.0.2", "app5") as c:  # the operator's error: retried
            code, msg = send(c, b"Subject: t\r\n\r\nbody\r\n")
            assert code == 451 and b'tenant "ghost" of user "app5" is not configured' in msg, \
                (code, msg)
        with n.client("127.0.0.2", "app2") as c:  # user pinned to pool bulk
            code, msg = send(c, b"Subject: t\r\nX-Sluice-Pool: transactional\r\n\r\nbody\r\n")
            assert code == 550 and b'not allowed for user "app2"' in msg, (code, msg)
        wait_until(lambda: len(n.sink.files()) >= 2 and n.d.count_log("event=delivered") >= 2,
                   60, "2 messages at the sink")
        assert n.d.count_log("event=queued") == 2
        for m in n.sink.messages():
            assert b"x-sluice" not in m.lower() and b"folded" not in m, m
        rec = n.wait_events(lambda e: e["event"] == "reception", 2)
        trusted = [e for e in rec if "auth_user" not in e][0]
        assert (trusted["tenant"], trusted["pool"], trusted["priority"],
                trusted["campaign"]) == ("acme", "bulk", 9, "folded"), trusted
        authed = [e for e in rec if e.get("auth_user") == "app1"][0]
        assert (authed["tenant"], authed["pool"], authed["priority"]) == \
            ("acme", "bulk", 5), authed
        # counted per tenant, refusals not; and what became of them (both
        # delivered: logged after they were counted, so wait for the log)
        n.wait_events(lambda e: e["event"] == "delivery", 2)
        st = n.ask("stats")
        assert st["tenants"] == {"acme": {"received_msgs": 2, "received_rcpts": 2,
                                          "delivered": 2, "deferred": 0, "bounced": 0,
                                          "expired": 0}}, st
        text = n.ask("metrics")["text"]
        assert 'sluice_tenant_messages_received_total{tenant="acme"} 2' in text, text
        assert 'sluice_tenant_recipients_delivered_total{tenant="acme"} 2' in text, text
    finally:
        n.close()


def sluicectl(node, *args):
    import subprocess
    from harness import _spool_tool
    tool = os.path.join(os.path.dirname(_spool_tool()), "sluicectl")
    return subprocess.run([tool, "-s", node.sock, "--json", *args], capture_output=True,
                          text=True, timeout=60)


def test_bounce_and_flush_by_tenant_and_campaign():
    """sluicectl bounce/flush --tenant T --campaign C act on exactly the
    messages of that tenant and campaign."""
    n = Node(delivery=False)
    try:
        with n.client("127.0.0.2", "app1") as c:
            for camp in (b"c1", b"c2 with blanks"):
                code, msg = send(c, b"Subject: x\r\nX-Sluice-Campaign: " + camp + b"\r\n\r\nb\r\n")
                assert code == 250, (code, msg)
        with n.client("127.0.0.2", "app2") as c:
            code, msg = send(c, b"Subject: x\r\nX-Sluice-Campaign: c1\r\n\r\nb\r\n")
            assert code == 250, (code, msg)
        rec = n.wait_events(lambda e: e["event"] == "reception", 3)
        ids = {(e["tenant"], e["campaign"]): e["id"] for e in rec}
        r = sluicectl(n, "bounce", "--tenant", "acme", "--campaign", "c2 with blanks")
        assert r.returncode == 0, r
        assert json.loads(r.stdout)["recipients"] == 1, r.stdout
        bounced = n.wait_events(lambda e: e["event"] == "bounce", 1)
        assert bounced[0]["id"] == ids[("acme", "c2 with blanks")], bounced
        r = sluicectl(n, "message", ids[("acme", "c1")])
        m = json.loads(r.stdout)
        assert (m["tenant"], m["campaign"], m["pool"], m["priority"]) == \
            ("acme", "c1", "transactional", 5), m
        r = sluicectl(n, "flush", "--tenant", "globex")
        assert r.returncode == 0 and json.loads(r.stdout)["tenant"] == "globex", r
        r = sluicectl(n, "bounce", "--tenant", "bad/name")
        assert r.returncode == 1 and "not a tenant name" in r.stdout + r.stderr, r
        r = sluicectl(n, "bounce", "example.com", "--tenant", "acme")
        assert r.returncode == 2, r
        n.stop()
        left = {(m["tenant"], m["campaign"]) for m in spool(n).values()}
        assert left == {("acme", "c1"), ("globex", "c1")}, left
    finally:
        n.close()


def test_campaign_names_past_the_cap_are_counted():
    """Campaign names come from clients and their ids are never freed:
    past [server] campaign_names a new one gets none. The stats say how
    many lookups were refused (each message's at its reception, here: no
    delivery), on the socket and in /metrics, and how many names hold an
    id."""
    n = Node(delivery=False, server_extra="campaign_names = 2")
    try:
        with n.client("127.0.0.2", "app1") as c:
            for camp in (b"c1", b"c2", b"c3", b"c4", b"c1"):
                code, msg = send(c, b"Subject: x\r\nX-Sluice-Campaign: " + camp + b"\r\n\r\nb\r\n")
                assert code == 250, (code, msg)  # the message keeps its campaign's name
        n.wait_events(lambda e: e["event"] == "reception", 5)
        st = n.ask("stats")
        assert st["counters"]["campaign_names_refused"] == 2, st["counters"]
        assert st["counters"]["names_refused"] == 0, st["counters"]
        # acme, its pools transactional and bulk, the sources, c1 and c2
        assert st["objects"]["names"] >= 4, st["objects"]
        assert st["objects"]["campaign_names"] == 2, st["objects"]
        text = n.ask("metrics")["text"]
        assert "\nsluice_campaign_names_refused_total 2\n" in text, text
        assert "\nsluice_names_refused_total 0\n" in text, text
        assert 'sluice_objects{type="names"} ' in text, text
    finally:
        n.close()


def check_config(wd, text, wants):
    import subprocess
    conf = wd.file("bad.conf", "[server]\nlisten = 127.0.0.1:2525\n[queue]\npath = /nonexistent\n"
                   + text)
    r = subprocess.run([SLUICE, "-c", conf, "--check-config"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0, r
    for want in wants:
        assert want in r.stderr, (want, r.stderr)


def test_bad_config_is_refused():
    """--check-config names what is wrong with sources, pools and tenants."""
    wd = Workdir("sluice-tenants-cfg-")
    try:
        check_config(wd, """
[tenant t]
priority = 10
[tenant T]
weight = 2
weight = 3
[tenant bad/name]
weight = 1
[pool x]
colour = red
""", ["priority: '10' is out of range 0..9", "weight: set twice in [tenant t]",
      "[tenant bad/name]: a tenant name is", "colour: unknown key in [pool x]"])
        check_config(wd, """
[server]
expire_header = x-sluice-tenant
[source 127.0.0.1]
ehlo = not a host
[pool a]
sources = 127.0.0.1, 127.0.0.1, 127.0.0.9, [::1]:x
[pool c]
sources = 127.0.0.1:0
[tenant t]
pools = a, nope, a
pool = c
[tenant u]
pool = b
""", ['ehlo: "not a host" is not a host name',
      "expire_header: X-Sluice-Tenant is a control field of its own",
      "[pool a] sources: 127.0.0.1 is listed twice",
      "[pool a] sources: 127.0.0.9 has no [source 127.0.0.9] section",
      "[pool a] sources: \"[::1]:x\"",
      "[pool c] sources: every weight is 0",
      "[tenant t] pools: no [pool nope] section",
      "[tenant t] pools: a is listed twice",
      "[tenant t] pool: c is not among its pools",
      "[tenant u] pool: no [pool b] section"])
    finally:
        wd.cleanup()


if __name__ == "__main__":
    main([test_owner_stored_logged_and_survives_restart, test_trusted_headers_and_refusals,
          test_bounce_and_flush_by_tenant_and_campaign,
          test_campaign_names_past_the_cap_are_counted, test_bad_config_is_refused])
