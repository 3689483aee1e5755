"""SIGHUP reloads the users file: a removed user can no longer log in, a
new one can, sessions already open keep the table they began with, and a
broken file is refused with the old table kept. It also reloads the
config: a domain's new rate limit takes effect with no connection dropped,
what needs a restart is reported as kept, and a broken config is refused.
A reload keeps little memory: 50 of them, with mail coming in between,
grow sluice's resident memory by a few MB at most (each kept about 280 KB
before: the built-in bounce rules and the shaping rules, compiled again
for every config and kept with it until exit)."""
import base64
import os
import signal
import sys

from harness import Sluice, Smtp, Workdir, free_port, main, run

SLUICE = sys.argv[1]


def hashed(pw):
    r = run(["openssl", "passwd", "-6", pw])
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def plain(user, pw):
    return base64.b64encode(f"\0{user}\0{pw}".encode()).decode()


def auth(port, user, pw):
    c = Smtp(port)
    c.expect("EHLO client", 250)
    r = c.cmd(f"AUTH PLAIN {plain(user, pw)}")
    c.close()
    return r.code


def test_sighup_reloads_users():
    wd = Workdir("sluice-reload-")
    try:
        users = wd.file("users", f"alice:{hashed('pw-alice')}\n")
        port = free_port()
        conf = wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{port}
auth_users_file = {users}
plaintext_auth = loopback
auth_fail_delay = 0
[queue]
path = {wd.path}/spool
map_size = 64M
[delivery]
enabled = no
""")
        d = Sluice(SLUICE, conf)
        d.wait_log("event=ready")
        assert auth(port, "alice", "pw-alice") == 235
        assert auth(port, "bob", "pw-bob") == 535

        # A session opened before the reload keeps the old table.
        early = Smtp(port)
        early.expect("EHLO early", 250)

        with open(users + ".new", "w") as f:
            f.write(f"bob:{hashed('pw-bob')}\n")
        os.rename(users + ".new", users)
        d.signal(signal.SIGHUP)
        d.wait_log_count("event=users_loaded", 2)
        assert auth(port, "bob", "pw-bob") == 235
        assert auth(port, "alice", "pw-alice") == 535
        assert early.cmd(f"AUTH PLAIN {plain('alice', 'pw-alice')}").code == 235
        early.close()

        # A broken file is refused; bob still works.
        with open(users, "w") as f:
            f.write("carol:not-a-hash\n")
        d.signal(signal.SIGHUP)
        d.wait_log("event=reload_failed")
        assert auth(port, "bob", "pw-bob") == 235
        d.stop_clean()
    finally:
        wd.cleanup()


def test_sighup_reloads_domain_limits():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_delivery
    from test_delivery import Relay, records_for, wait_sink
    test_delivery.SLUICE = SLUICE
    r = Relay(records_for(["slow.test"]),
              domain_conf="[domain slow.test]\nmax_message_rate = 1/h\n")
    try:
        r.inject([("s@example.com", [f"u{i}@slow.test"], f"Subject: {i}\r\n\r\nx\r\n".encode())
                  for i in range(5)], sessions=1)
        wait_sink(r, 1)
        # One an hour: the first went, the rest wait (a bounded look).
        try:
            r.d.wait_log_count("event=delivered", 2, timeout=2)
            second = True
        except AssertionError:
            second = False
        assert not second, "a second message went at 1/h"
        early = Smtp(r.port)
        early.expect("EHLO early", 250)
        conf = os.path.join(r.wd.path, "sluice.conf")
        with open(conf) as f:
            text = f.read()
        with open(conf, "w") as f:
            # with a comment far past inih's 200-octet default (a line
            # holds 64 KiB)
            f.write(text.replace("max_message_rate = 1/h", "max_message_rate = unlimited")
                    .replace("workers = 2", "workers = 3") + "; " + "x" * 5000 + "\n")
        r.d.signal(signal.SIGHUP)
        r.d.wait_log("event=config_reloaded")
        assert r.d.wait_log("event=reload_kept key=server.workers")
        wait_sink(r, 5, timeout=30)
        assert early.cmd("NOOP").code == 250  # the session lived through it
        early.close()
        with open(conf) as f:
            n = f.read().count("\n")
        with open(conf, "a") as f:
            f.write("[domain *]\nmax_connections = lots\n; " + "y" * 70000 + "\n")
        r.d.signal(signal.SIGHUP)
        r.d.wait_log("event=reload_failed what=config")
        assert r.d.count_log("event=reload_refused") >= 2
        assert r.d.count_log(f"sluice.conf:{n + 2}: max_connections:") == 1
        assert r.d.count_log(f"sluice.conf:{n + 3}: line longer than 65536 characters") == 1
    finally:
        r.close()


def asan_build(pid):
    """Is the daemon built with AddressSanitizer? Its quarantine holds
    freed memory back, so that RSS says nothing of what a reload keeps."""
    with open(f"/proc/{pid}/maps") as f:
        if "libasan" in f.read():
            return True
    with open(SLUICE, "rb") as f:
        return b"__asan_init" in f.read()


def test_reloads_keep_little_memory():
    wd = Workdir("sluice-reload-mem-")
    try:
        port = free_port()
        conf = wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{port}
trusted_networks = 127.0.0.0/8
[queue]
path = {wd.path}/spool
map_size = 64M
[delivery]
enabled = no
[domain *]
max_connections = 20
[domain gmail.com]
max_connections = 10
[domain yahoo.com]
max_connections = 5
[mx *.google.com]
max_connections = 30
""")
        d = Sluice(SLUICE, conf)
        d.wait_log("event=ready")
        n = 0

        def reload():
            nonlocal n
            n += 1
            d.signal(signal.SIGHUP)
            d.wait_log_count("event=config_reloaded", n)

        def mail(i):
            c = Smtp(port)
            c.expect("EHLO client", 250)
            c.expect("MAIL FROM:<s@example.com>", 250)
            c.expect(f"RCPT TO:<u{i}@gmail.com>", 250)
            c.expect("DATA", 354)
            c.send(f"Subject: {i}\r\n\r\nx\r\n.\r\n".encode())
            assert c.reply().code == 250
            c.close()

        # The first reloads and messages grow what any run grows (arenas,
        # caches); what is measured is the 50 after.
        for i in range(5):
            reload()
            mail(i)
        before = d.rss_kb()
        for i in range(50):
            reload()
            if i % 5 == 0:
                mail(100 + i)
        grown = d.rss_kb() - before
        print(f"50 reloads: VmRSS grew {grown} KB")
        # Before: about 280 KB a reload, 14 MB. Now: a few KB each.
        if not asan_build(d.pid):
            assert grown < 4096, f"50 reloads grew VmRSS by {grown} KB"
        d.stop_clean()
    finally:
        wd.cleanup()


if __name__ == "__main__":
    main([test_sighup_reloads_users, test_sighup_reloads_domain_limits,
          test_reloads_keep_little_memory])
