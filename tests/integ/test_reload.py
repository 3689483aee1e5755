"""SIGHUP reloads the users file: a removed user can no longer log in, a
new one can, sessions already open keep the table they began with, and a
broken file is refused with the old table kept."""
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


if __name__ == "__main__":
    main([test_sighup_reloads_users])
