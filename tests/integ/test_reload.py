"""SIGHUP reloads the users file: a removed user can no longer log in, a
new one can, sessions already open keep the table they began with, and a
broken file is refused with the old table kept. It also reloads the
config: a domain's new rate limit takes effect with no connection dropped,
what needs a restart is reported as kept, and a broken config is refused.
A lowered max_connections_per_address ends the connections over it after
their transaction, and so does a lowered max_connections those of a site
(the domains sharing one MX host) over it.
A reload keeps little memory: 50 of them, with mail coming in between,
grow sluice's resident memory by a few MB at most (each kept about 280 KB
before: the built-in bounce rules and the shaping rules, compiled again
for every config and kept with it until exit). And a replaced config is
freed once nothing reads it: 200 reloads with mail flowing leave two
configs alive. A SIGHUP sent while sluice still reads its config at
start waits and reloads once it runs (it killed the process)."""
import base64
import errno
import json
import os
import signal
import subprocess
import sys
import time

from harness import Sluice, Smtp, Workdir, free_port, main, run, stats_ask, wait_until

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
    d = None
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
[stats]
socket = {wd.path}/stats.sock
""")
        sock = f"{wd.path}/stats.sock"
        d = Sluice(SLUICE, conf)
        d.wait_log("event=ready")
        # delivery off, said where one looks for why mail stays queued
        assert stats_ask(sock)["delivery_enabled"] is False
        ctl = os.environ.get("SLUICECTL") or os.path.normpath(
            os.path.join(os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl"))
        p = subprocess.run([ctl, "-s", sock, "stats"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0 and "[delivery] enabled = no" in p.stdout, p
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

        # A config refused is refused whole: a users file changed with
        # it is not read (dave got in before, the reload saying
        # "previous config kept"); once the config is mended, it is.
        with open(users, "w") as f:
            f.write(f"bob:{hashed('pw-bob')}\ndave:{hashed('pw-dave')}\n")
        with open(conf) as f:
            good = f.read()
        with open(conf, "w") as f:
            f.write(good + "[server]\nno_such_key = 1\n")
        d.signal(signal.SIGHUP)
        # the socket's reload answers once the reload is over
        r = stats_ask(sock, "reload", timeout=30)
        assert r.get("ok") is False and "no_such_key" in json.dumps(r), r
        assert auth(port, "dave", "pw-dave") == 535
        assert auth(port, "bob", "pw-bob") == 235
        with open(conf, "w") as f:
            f.write(good)
        r = stats_ask(sock, "reload", timeout=30)
        assert r.get("ok") is True, r
        assert auth(port, "dave", "pw-dave") == 235

        # A broken file is refused; bob still works.
        with open(users, "w") as f:
            f.write("carol:not-a-hash\n")
        d.signal(signal.SIGHUP)
        d.wait_log("event=reload_failed what=users")
        assert auth(port, "bob", "pw-bob") == 235
        assert d.stop_clean() == 0
        d = None
    finally:
        if d is not None:  # a failed check: stopped all the same
            d.stop_clean()
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
                    .replace("workers = 2", "workers = 3")
                    .replace("[dns]\n", "[dns]\ntries = 3\n") + "; " + "x" * 5000 + "\n")
        r.d.signal(signal.SIGHUP)
        line = r.d.wait_log("event=config_reloaded")
        # what changed, said (it was not)
        assert ('changed="[server] workers, [dns] tries, [domain slow.test] max_message_rate"'
                in line), line
        assert r.d.wait_log("event=reload_kept key=server.workers")
        # [dns] is the resolvers' of the start (servers, dnssec: DANE):
        # said, not applied in silence
        assert r.d.wait_log("event=reload_kept key=dns")
        # the same file again: still not applied, said again (against the
        # config sluice started on, not the last one)
        r.d.signal(signal.SIGHUP)
        r.d.wait_log_count("event=reload_kept key=dns", 2)
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


def test_sighup_lowers_max_connections_per_address():
    """[delivery] max_connections_per_address lowered by a reload while
    mail flows to a slow receiver: the connections over the new cap end
    after their transaction, as those over a domain's lowered
    max_connections do (before, the cap held for new connections only:
    the 6 open went on carrying the queue past a cap of 2 for as long
    as it lasted)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_delivery
    from test_delivery import Relay, records_for
    from test_campaign_mix import Receiver, established
    from harness import wait_until
    test_delivery.SLUICE = SLUICE
    r = Relay(records_for(["slow.test"]), with_sink=False,
              delivery_conf="max_connections_per_address = 6")
    rx = None
    try:
        rx = Receiver(r.wd, "127.0.0.1", r.mx_port, "slow", "--delay", "0.2")
        n = 300  # 10 s at 6 connections, 30 s at 2: still flowing at the check
        r.inject([("s@example.com", [f"u{i}@slow.test"],
                   f"Subject: {i}\r\nX-Test-Id: m{i}\r\n\r\nx\r\n".encode())
                  for i in range(n)], sessions=2)

        def open_now():
            return established(r.d.pid, r.mx_port).get("127.0.0.1", 0)
        wait_until(lambda: open_now() == 6, 30, "6 connections to the slow receiver")
        conf = os.path.join(r.wd.path, "sluice.conf")
        with open(conf) as f:
            text = f.read()
        with open(conf, "w") as f:
            f.write(text.replace("max_connections_per_address = 6",
                                 "max_connections_per_address = 2"))
        r.d.signal(signal.SIGHUP)
        r.d.wait_log("event=config_reloaded")
        # A transaction takes 0.2 s there: the extra ones end within a few.
        wait_until(lambda: open_now() <= 2, 10, "the connections down to the new cap")
        got = [x for x in rx.records() if x["ev"] == "msg"]
        assert len(got) < n - 20, f"{len(got)} of {n} delivered: the check came too late"
        # ... and stay there while the mail goes on (sampled for 2 s)
        most = 0
        for _ in range(40):
            most = max(most, open_now())
            time.sleep(0.05)
        assert most <= 2, f"{most} connections open past the cap of 2"
        after = len([x for x in rx.records() if x["ev"] == "msg"])
        assert after > len(got), "no mail went on the two connections left"
    finally:
        if rx is not None:
            rx.stop()
        r.close()


def test_sighup_lowering_max_connections_lowers_a_sites_connections():
    """[domain *] max_connections lowered by a reload while a campaign's
    mail to 20 domains on one MX host (one site: their connections
    shared) flows to a slow receiver: the site's connections come down to
    the new value after their transaction and stay there, as a start with
    that value would have them. Before, the site kept the ceiling of the
    start (the highest max_connections its domains had: 6), each domain
    under its own cap of 2 but the site holding 6 connections, and
    sluicectl sites said MAX 6, for as long as the mail flowed."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_delivery
    from test_delivery import Relay, records_for
    from test_campaign_mix import Receiver, established
    from harness import wait_until
    test_delivery.SLUICE = SLUICE
    domains = [f"d{i}.test" for i in range(20)]
    sock = None
    r = Relay(records_for(domains), with_sink=False,
              domain_conf="[domain *]\nmax_connections = 6\n[stats]\nsocket = @DLOG@.sock\n")
    sock = r.dlog + ".sock"
    rx = None
    try:
        rx = Receiver(r.wd, "127.0.0.1", r.mx_port, "slow", "--delay", "0.2")
        n = 400  # 13 s at 6 connections, 40 s at 2: still flowing at the check
        r.inject([("s@example.com", [f"u{i}@{domains[i % 20]}"],
                   f"Subject: {i}\r\nX-Test-Id: m{i}\r\n\r\nx\r\n".encode())
                  for i in range(n)], sessions=2)

        def open_now():
            return established(r.d.pid, r.mx_port).get("127.0.0.1", 0)

        def site():
            (row,) = stats_ask(sock, "sites")["sites"]
            return row
        wait_until(lambda: open_now() == 6, 30, "6 connections to the slow receiver")
        conf = os.path.join(r.wd.path, "sluice.conf")
        with open(conf) as f:
            text = f.read()
        with open(conf, "w") as f:
            f.write(text.replace("max_connections = 6", "max_connections = 2"))
        r.d.signal(signal.SIGHUP)
        r.d.wait_log("event=config_reloaded")
        assert site()["max_connections"] == 2, site()
        # A transaction takes 0.2 s there: the extra ones end within a few.
        wait_until(lambda: open_now() <= 2, 10, "the connections down to the new cap")
        got = [x for x in rx.records() if x["ev"] == "msg"]
        assert len(got) < n - 20, f"{len(got)} of {n} delivered: the check came too late"
        # ... and stay there while the mail goes on (sampled for 2 s)
        most = 0
        for _ in range(40):
            most = max(most, open_now())
            time.sleep(0.05)
        assert most <= 2, f"{most} connections open past the cap of 2"
        assert site()["connections"] <= 2 and site()["window"] <= 2, site()
        after = len([x for x in rx.records() if x["ev"] == "msg"])
        assert after > len(got), "no mail went on the two connections left"
    finally:
        if rx is not None:
            rx.stop()
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
    d = None
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
        d = None
    finally:
        if d is not None:
            d.stop_clean()
        wd.cleanup()


def test_reloads_free_replaced_configs():
    """200 reloads, each config differing (a domain's limit, a tenant
    more, a source's EHLO name), while mail of a tenant (half of it
    through a pool's source) flows to a receiver over connections
    kept open across them, with a submission session open throughout:
    every message is delivered, and the configs alive stay few (they
    were one per reload, kept until exit), down to two once the mail is
    through and the connections closed (idle for 2 s): the one started
    on, kept, and the one in force. Under ASan
    a replaced config freed while still read is a use-after-free."""
    import threading
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_delivery
    import test_ops
    from test_delivery import Relay, records_for, wait_sink
    from harness import wait_until
    test_delivery.SLUICE = SLUICE
    test_ops.SLUICE = SLUICE
    test_ops.SLUICECTL = os.environ.get("SLUICECTL") or os.path.normpath(
        os.path.join(os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl"))

    def variable(i):
        # Each config its own EHLO name for the pool's source: a
        # connection says the one of the config it opened under.
        return (f"[domain a.test]\nmax_connections = {2 + i % 3}\n"
                f"[tenant t{i}]\npriority = {i % 10}\n"
                f"[source 127.0.0.2]\nehlo = e{i}.example.net\n"
                f"[pool p]\nsources = 127.0.0.2\n")

    mark = "; generated\n"
    r = Relay(records_for(["a.test", "b.test"]), idle_timeout="2s",
              domain_conf=test_ops.stats_conf() + "[tenant acme]\npools = p\n" + mark +
              variable(0))
    stop = threading.Event()
    sent = [0]
    errors = []

    def mail_loop():
        i = 0
        try:
            while not stop.is_set():
                c = Smtp(r.port)
                c.expect("EHLO client", 250)
                for k in range(2):
                    c.expect("MAIL FROM:<s@example.com>", 250)
                    c.expect(f"RCPT TO:<u{i}@{'ab'[k]}.test>", 250)
                    c.expect("DATA", 354)
                    pool = "X-Sluice-Pool: p\r\n" if k == 0 else ""
                    c.send(f"X-Sluice-Tenant: acme\r\n{pool}Subject: {i}\r\n\r\nx\r\n.\r\n"
                           .encode())
                    assert c.reply().code == 250
                    sent[0] += 1
                    i += 1
                c.close()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    def alive():
        return test_ops.ctl_json(r, "stats")["config"]["generations_alive"]

    try:
        assert alive() == 1
        conf = os.path.join(r.wd.path, "sluice.conf")
        with open(conf) as f:
            head = f.read().split(mark)[0] + mark
        early = Smtp(r.port)
        early.expect("EHLO early", 250)
        t = threading.Thread(target=mail_loop)
        t.start()
        most = 0
        try:
            for i in range(1, 201):
                with open(conf + ".new", "w") as f:
                    f.write(head + variable(i))
                os.rename(conf + ".new", conf)
                r.d.signal(signal.SIGHUP)
                r.d.wait_log_count("event=config_reloaded", i)
                if i % 10 == 0:
                    most = max(most, alive())
                    assert not errors, errors
        finally:
            stop.set()
            t.join()
        assert not errors, errors
        assert r.d.count_log("event=reload_failed") == 0
        assert sent[0] > 0
        wait_sink(r, sent[0], timeout=60)
        assert early.cmd("NOOP").code == 250  # the session lived through them all
        early.close()
        print(f"200 reloads, {sent[0]} messages: at most {most} configs alive")
        # Before: one more per reload (201 here). Now the first, the one
        # in force, the one just replaced, and one per connection (it keeps
        # the config it opened under) or message in flight: a few.
        assert most <= 20, f"{most} configs alive during the reloads"
        wait_until(lambda: alive() <= 2, 15, "the replaced configs to be freed")
        assert alive() == 2
    finally:
        r.close()


def test_reload_says_what_redis_and_backoff_keep():
    """[redis] nodes, timeout, lease_ttl, token_batch, key_prefix and
    password, and [delivery] backoff and backoff_step are read when the
    workers' limiters start: a reload that changes them says so
    (event=reload_kept), as it does for the url; it said nothing, and
    a node added to the cluster (nodes = 3) kept its outage share of
    1/2 in silence."""
    from harness import Redis
    wd = Workdir("sluice-reload-redis-")
    redis = d = None
    try:
        redis = Redis()
        port = free_port()
        head = f"""
[server]
workers = 2
listen = 127.0.0.1:{port}
trusted_networks = 127.0.0.0/8
[queue]
path = {wd.path}/spool
map_size = 64M
[redis]
url = redis://127.0.0.1:{redis.port}
"""
        conf = wd.file("sluice.conf", head + "nodes = 2\n[delivery]\nbackoff = 1m\n")
        d = Sluice(SLUICE, conf)
        d.wait_log("event=ready")
        n = 0
        for redis_keys, delivery_keys, kept in [
                ("nodes = 3\n", "backoff = 1m\n", ["redis"]),
                ("nodes = 2\ntimeout = 300ms\n", "backoff = 1m\n", ["redis"]),
                ("nodes = 2\nlease_ttl = 10s\ntoken_batch = 5\n", "", ["redis"]),
                ("nodes = 2\nkey_prefix = other:\n", "", ["redis"]),
                ("nodes = 2\npassword = sesame\n", "", ["redis"]),
                ("nodes = 2\n", "backoff = 5m\n", ["delivery.backoff"]),
                ("nodes = 2\n", "backoff_step = 10s\n", ["delivery.backoff"]),
                ("nodes = 2\n", "backoff = 1m\n", [])]:
            before = {k: d.count_log(f"event=reload_kept key={k} ")
                      for k in ("redis", "delivery.backoff")}
            with open(conf, "w") as f:
                f.write(head + redis_keys + "[delivery]\n" + delivery_keys)
            n += 1
            d.signal(signal.SIGHUP)
            d.wait_log_count("event=config_reloaded", n)
            for k, was in before.items():
                now = d.count_log(f"event=reload_kept key={k} ")
                if k in kept:
                    assert now == was + 1, f"{redis_keys!r} {delivery_keys!r}: no " \
                                           f"event=reload_kept key={k}"
                else:
                    assert now == was, f"{redis_keys!r} {delivery_keys!r}: reload_kept key={k}"
        d.stop_clean()
    finally:
        if d is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        if redis is not None:
            redis.stop()
        wd.cleanup()


def test_sighup_while_the_config_is_read():
    """A SIGHUP that comes while sluice reads its config at start (a FIFO
    here, so that the read waits for the test) is held until the main
    loop runs, and taken as a reload; with the default action it killed
    the process (exit 129) before sluice ever started."""
    wd = Workdir("sluice-reload-")
    d = None
    fd = None
    try:
        port = free_port()
        text = f"""
[server]
workers = 1
listen = 127.0.0.1:{port}
[queue]
path = {wd.path}/spool
map_size = 64M
"""
        path = os.path.join(wd.path, "sluice.conf")
        os.mkfifo(path)
        d = Sluice(SLUICE, path)

        def opened():
            # a writer's non-blocking open succeeds once sluice has the
            # FIFO open for reading: it is then in its read of the config
            nonlocal fd
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                assert d.proc.poll() is None, f"sluice exited with {d.proc.returncode}"
                return False
            return True

        wait_until(opened, 10, "sluice to open its config")
        d.signal(signal.SIGHUP)
        # The reload reads the path again: a plain file by then (sluice
        # reads the FIFO it has open), with one key changed.
        with open(path + ".new", "w") as f:
            f.write(text.replace("[queue]", "[delivery]\ninitial_connections = 3\n[queue]"))
        os.replace(path + ".new", path)
        os.write(fd, text.encode())
        os.close(fd)
        fd = None
        d.wait_log("event=ready")
        line = d.wait_log("event=config_reloaded")
        assert 'changed="[delivery] initial_connections"' in line, line
        c = Smtp(port)
        c.expect("EHLO client", 250)
        c.close()
        d.stop_clean()
        d = None
    finally:
        if fd is not None:
            os.close(fd)
        if d is not None:
            d.kill9()
        wd.cleanup()


if __name__ == "__main__":
    main([test_sighup_reloads_users, test_sighup_reloads_domain_limits,
          test_sighup_lowers_max_connections_per_address,
          test_reloads_keep_little_memory, test_reloads_free_replaced_configs,
          test_reload_says_what_redis_and_backoff_keep, test_sighup_while_the_config_is_read,
          test_sighup_lowering_max_connections_lowers_a_sites_connections])
