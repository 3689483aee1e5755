"""IP warm-up plans through a running sluice: the stats socket's "warmup"
view, sluicectl warmup, the "stats" JSON and /metrics series; counts taken
as the outbound side takes them (the test hook "warmup take", the same
warmup_take() call), refused past the day's allowance, afresh the next
(test) day; kept across SIGTERM, kill -9 (the keeper's last write) and
SIGHUP; shared by two nodes through a real redis-server. The test hooks
need SLUICE_TEST_WARMUP_CLOCK in the environment (and a build with tests):
without it the daemon refuses them.

The outbound side (engine/outbound/egress.c and sched_conn.c) calls
warmup_left/take/next_day_ms on real deliveries; integ_pools
(test_warmup_allowance_holds_and_overflows) checks that; these tests count
through the hook."""
import datetime
import json
import os
import signal
import socket
import sys
import time

from harness import Redis, Sluice, Workdir, free_port, main, run, wait_until

SLUICE = sys.argv[1]
SLUICECTL = os.environ.get("SLUICECTL") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl"))

GMAIL = "gmail-smtp-in.l.google.com"
OTHER = "mx.example.org"
SRC = "127.0.0.2"


def today(offset_days=0):
    d = datetime.datetime.now(datetime.timezone.utc).date() + datetime.timedelta(offset_days)
    return d.isoformat()


def away_from_midnight():
    """The plans count UTC days: do not run across a midnight (at most a
    minute's wait, once)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    left = 86400 - (now.hour * 3600 + now.minute * 60 + now.second)
    if left < 60:
        time.sleep(left + 1)


class Node:
    def __init__(self, wd, name, plan, extra="", hooks=True):
        self.wd = wd
        self.name = name
        self.spool = os.path.join(wd.path, f"{name}-spool")
        self.sock = os.path.join(wd.path, f"{name}-stats.sock")
        self.conf = os.path.join(wd.path, f"{name}.conf")
        self.hooks = hooks
        self.write(plan, extra)
        self.start()

    def write(self, plan, extra=""):
        self.port = getattr(self, "port", None) or free_port()
        self.wd.file(f"{self.name}.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{self.port}
[queue]
path = {self.spool}
map_size = 64M
[delivery]
allow_networks = 127.0.0.0/8
[stats]
socket = {self.sock}
{plan}
{extra}
""")

    def start(self):
        env_before = os.environ.get("SLUICE_TEST_WARMUP_CLOCK")
        if self.hooks:
            os.environ["SLUICE_TEST_WARMUP_CLOCK"] = "0"
        else:
            os.environ.pop("SLUICE_TEST_WARMUP_CLOCK", None)
        try:
            self.d = Sluice(SLUICE, self.conf)
        finally:
            if env_before is None:
                os.environ.pop("SLUICE_TEST_WARMUP_CLOCK", None)
            else:
                os.environ["SLUICE_TEST_WARMUP_CLOCK"] = env_before
        self.d.wait_log("event=ready")

    def ctl(self, line, timeout=5):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.sock)
            s.sendall(line.encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise AssertionError(f"stats socket closed before answering {line!r}")
                buf += chunk
        return json.loads(buf.split(b"\n", 1)[0])

    def row(self, group, source=SRC):
        r = self.ctl("warmup")
        assert r["ok"], r
        for x in r["rows"]:
            if x["source"] == source and x["group"] == group:
                return x
        raise AssertionError(f"no warmup row for {source} {group}: {r}")

    def take(self, host, n=1):
        r = self.ctl(f"warmup take {SRC} {host} {n}")
        assert r["ok"], r
        return r["taken"]


PLAN = f"""
[warmup new-ip]
schedule = 5, 10, 20
scale gmail = 0.5
group corp = mx.corp.example
[source {SRC}]
warmup = new-ip
warmup_start = {today(-1)}
[source 127.0.0.3]
"""


def test_socket_view_sluicectl_stats_metrics():
    away_from_midnight()
    wd = Workdir("sluice-warmup-")
    n = Node(wd, "a", PLAN)
    try:
        r = n.ctl("warmup")
        assert r["ok"] and r["sources"] == 1 and r["redis"] == "off", r
        groups = [x["group"] for x in r["rows"]]
        assert groups == ["corp", "gmail", "microsoft", "yahoo", "other"], groups
        other = n.row("other")
        assert other["plan"] == "new-ip" and other["day"] == 2, other
        assert other["allowance"] == 10 and other["taken"] == 0 and other["left"] == 10, other
        assert other["start"] == today(-1) and other["date"] == today(), other
        assert n.row("gmail")["allowance"] == 5, n.row("gmail")
        assert n.take(GMAIL, 3) == 3
        g = n.row("gmail")
        assert g["taken"] == 3 and g["left"] == 2, g
        assert n.row("other")["taken"] == 0  # a group of its own
        # a source without a plan, an unknown one: never limited
        assert n.ctl(f"warmup take 127.0.0.3 {OTHER} 100")["taken"] == 100
        st = n.ctl("stats")
        rows = st["warmup"]["rows"]
        assert st["warmup"]["sources"] == 1, st["warmup"]
        assert {"source": SRC, "plan": "new-ip", "group": "gmail", "day": 2, "allowance": 5,
                "taken": 3, "left": 2} in rows, rows
        text = n.ctl("metrics")["text"]
        assert f'sluice_warmup_allowance{{source="{SRC}",group="gmail"}} 5' in text, text
        assert f'sluice_warmup_taken{{source="{SRC}",group="gmail"}} 3' in text, text
        assert f'sluice_warmup_day{{source="{SRC}",group="other"}} 2' in text, text
        p = run([SLUICECTL, "-s", n.sock, "warmup"])
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert lines[0].split() == ["SOURCE", "PLAN", "GROUP", "DAY", "ALLOWANCE", "TAKEN",
                                    "LEFT", "STARTED"], p.stdout
        gl = [ln.split() for ln in lines if " gmail " in ln]
        assert gl == [[SRC, "new-ip", "gmail", "2", "5", "3", "2", today(-1)]], p.stdout
        p = run([SLUICECTL, "-s", n.sock, "--json", "warmup"])
        assert p.returncode == 0 and json.loads(p.stdout)["rows"][1]["taken"] == 3, p.stdout
        n.d.stop_clean()
    finally:
        if n.d.proc.poll() is None:
            n.d.kill9()
        wd.cleanup()


def test_allowance_spent_then_next_day():
    away_from_midnight()
    wd = Workdir("sluice-warmup-")
    n = Node(wd, "a", PLAN)
    try:
        assert n.take(OTHER, 25) == 10  # day 2: 10, the rest refused
        o = n.row("other")
        assert o["taken"] == 10 and o["left"] == 0, o
        assert n.ctl("warmup")["refused"] == 1  # the hook stops at the first refusal
        assert n.ctl("warmup clock 1")["ok"]
        o = n.row("other")
        assert o["day"] == 3 and o["allowance"] == 20 and o["taken"] == 0, o
        assert n.take(OTHER, 25) == 20
        assert n.ctl("warmup clock 1")["ok"]
        o = n.row("other")  # past the schedule: no limit
        assert o["day"] == 4 and o["allowance"] is None and o["left"] is None, o
        assert n.take(OTHER, 1000) == 1000
        n.d.stop_clean()
    finally:
        if n.d.proc.poll() is None:
            n.d.kill9()
        wd.cleanup()


def test_counts_survive_restart_kill9_and_reload():
    away_from_midnight()
    wd = Workdir("sluice-warmup-")
    n = Node(wd, "a", PLAN)
    try:
        assert n.take(OTHER, 4) == 4
        n.d.stop_clean()
        n.start()
        assert n.row("other")["taken"] == 4
        # kill -9 after the keeper's write (every second): nothing lost
        assert n.take(OTHER, 2) == 2
        state = os.path.join(n.spool, "warmup.state")

        def written():
            # "SOURCE GROUP DAY MINE REPORTED RESERVED" after the magic line
            with open(state) as f:
                return any(ln.split()[:2] == [SRC, "other"] and ln.split()[3] == "6"
                           for ln in f.read().splitlines()[1:])
        wait_until(written, 10, "the keeper to write 6 to warmup.state")
        n.d.kill9()
        n.start()
        o = n.row("other")
        assert o["taken"] == 6 and o["left"] == 4, o
        # SIGHUP with a bigger plan: today's 6 still count
        n.write(PLAN.replace("schedule = 5, 10, 20", "schedule = 50, 100, 200"))
        n.d.signal(signal.SIGHUP)
        n.d.wait_log("event=warmup_reloaded")
        o = n.row("other")
        assert o["allowance"] == 100 and o["taken"] == 6 and o["left"] == 94, o
        n.d.stop_clean()
    finally:
        if n.d.proc.poll() is None:
            n.d.kill9()
        wd.cleanup()


def test_hooks_need_the_environment():
    wd = Workdir("sluice-warmup-")
    n = Node(wd, "a", PLAN, hooks=False)
    try:
        r = n.ctl(f"warmup take {SRC} {OTHER} 1")
        assert not r["ok"] and r["error"] == "usage: warmup", r
        r = n.ctl("warmup clock 1")
        assert not r["ok"], r
        assert n.row("other")["taken"] == 0
        n.d.stop_clean()
    finally:
        if n.d.proc.poll() is None:
            n.d.kill9()
        wd.cleanup()


def test_two_nodes_share_the_day_through_redis():
    away_from_midnight()
    if not any(os.access(os.path.join(d, "redis-server"), os.X_OK)
               for d in os.environ.get("PATH", "").split(":")):
        print("skip: no redis-server (tools/install-deps --test)")
        return
    wd = Workdir("sluice-warmup-")
    redis = Redis()
    extra = f"[redis]\nurl = redis://127.0.0.1:{redis.port}\nnodes = 2\n"
    a = b = None
    try:
        a = Node(wd, "a", PLAN, extra)
        b = Node(wd, "b", PLAN, extra)
        # A sends what it can (tokens come from Redis each second, in
        # batches of half of what is left / 2 nodes), up to the day's 10
        got_a = 0
        deadline = time.monotonic() + 30
        while got_a < 10 and time.monotonic() < deadline:
            got_a += a.take(OTHER, 10)
            if got_a < 10:
                time.sleep(0.2)  # polling a state that changes each second, bounded
        if got_a != 10:
            keys = run(["redis-cli", "-p", str(redis.port), "--scan"]).stdout.split()
            vals = {k: run(["redis-cli", "-p", str(redis.port), "GET", k]).stdout.strip()
                    for k in keys}
            raise AssertionError(f"node a took {got_a} of 10; redis: {vals}; "
                                 f"a: {a.ctl('warmup')}; b: {b.ctl('warmup')}")
        # B sees A's 10 and gets nothing more
        wait_until(lambda: b.row("other")["taken"] == 10, 10, "node b to see a's 10")
        got_b = 0
        for _ in range(15):  # over 3 s: several of b's passes
            got_b += b.take(OTHER, 5)
            time.sleep(0.2)
        assert got_b == 0, got_b
        assert a.ctl("warmup")["redis"] == "connected"
        assert a.row("other")["taken"] == 10
        a.d.stop_clean()
        b.d.stop_clean()
    finally:
        for n in (a, b):
            if n is not None and n.d.proc.poll() is None:
                n.d.kill9()
        redis.kill9()
        wd.cleanup()


def test_a_redis_that_lost_the_day_does_not_grant_it_again():
    """Two nodes on a day of 100; A takes 60 or more; Redis then loses
    its keys (FLUSHALL: what a restart without persistence, or a failover
    to an empty replica, does). The nodes together still take no more
    than the 100: each puts back what it knows the cluster had reserved
    and used. Before, the next reservations started from nothing and B
    got half of the day again (150 taken of 100)."""
    away_from_midnight()
    if not any(os.access(os.path.join(d, "redis-server"), os.X_OK)
               for d in os.environ.get("PATH", "").split(":")):
        print("skip: no redis-server (tools/install-deps --test)")
        return
    wd = Workdir("sluice-warmup-")
    redis = Redis()
    extra = f"[redis]\nurl = redis://127.0.0.1:{redis.port}\nnodes = 2\n"
    plan = PLAN.replace("schedule = 5, 10, 20", "schedule = 100, 100, 100")
    a = b = None
    try:
        a = Node(wd, "a", plan, extra)
        b = Node(wd, "b", plan, extra)
        got_a = 0
        for _ in range(150):  # bounded: tokens come from Redis each second
            got_a += a.take(OTHER, 7)
            if got_a >= 60:
                break
            time.sleep(0.2)
        assert got_a >= 60, got_a
        # B has seen A's use and reservations (a pass of its keeper, each
        # second): A no longer takes, so its reservations stand
        wait_until(lambda: b.row("other")["taken"] >= got_a, 10, "node b to see a's use")
        reserved = a.row("other")["reserved"]
        assert reserved >= got_a, (reserved, got_a)
        wait_until(lambda: b.row("other")["reserved"] >= reserved, 10,
                   "node b to see a's reservations")
        p = run(["redis-cli", "-p", str(redis.port), "FLUSHALL"])
        assert p.returncode == 0 and "OK" in p.stdout, (p.stdout, p.stderr)
        got_b = 0
        for _ in range(50):  # over 10 s: many passes of both keepers
            got_b += b.take(OTHER, 10)
            got_a += a.take(OTHER, 10)
            time.sleep(0.2)
        assert got_a + got_b <= 100, f"a took {got_a}, b {got_b}: {got_a + got_b} of 100"
        assert got_a + got_b >= 90, f"a took {got_a}, b {got_b}: the day was not used"
        a.d.stop_clean()
        b.d.stop_clean()
    finally:
        for n in (a, b):
            if n is not None and n.d.proc.poll() is None:
                n.d.kill9()
        redis.kill9()
        wd.cleanup()


if __name__ == "__main__":
    main([test_socket_view_sluicectl_stats_metrics, test_allowance_spent_then_next_day,
          test_counts_survive_restart_kill9_and_reload, test_hooks_need_the_environment,
          test_two_nodes_share_the_day_through_redis,
          test_a_redis_that_lost_the_day_does_not_grant_it_again])
