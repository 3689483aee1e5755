"""Spool faults, end to end against real servers on loopback (dnsmasq,
smtp-sink, smtplib, sluicectl, LMDB's own mdb_dump/mdb_load):

- a bounce on a spool so full that injection gets 452 still sends its
  DSN to the sender's MX: the DSN is committed with the bounce, through
  the reserve kept for updates;
- a spool filled while every MX is down (the deferrals take its last
  pages) delivers every accepted recipient once the MX is back, and
  takes mail again;
- a corrupt recipient record in a copy of a spool is skipped at start:
  the recipients behind it are delivered, the stats socket counts it, the
  log names its key, and sluice-spool check reports it (exit 1);
- a stop while the spool's disk stalls (the fail-writes shim, argv[3])
  is bounded, says which outcomes the spool did not answer, and loses
  no message: it is delivered after the restart."""
import json
import os
import shutil
import smtplib
import struct
import signal
import subprocess
import sys
import threading
import time

from harness import (Sluice, Workdir, extra_env, free_port, log_fields, log_time, main, preload,
                     skip, spool_messages, spool_tool, wait_until)
import test_delivery
from test_delivery import Dns, HostileMx, Sink, _read_until

SLUICE = sys.argv[1]
test_delivery.SLUICE = SLUICE
SLUICECTL = os.environ.get("SLUICECTL") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(SLUICE)), "..", "tools", "sluicectl"))


def need(*tools):
    for tool in tools:
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            skip(f"{tool} not installed (tools/install-deps --test)")


def node_conf(wd, port, mx_port, dns_port, spool, map_size, extra=""):
    return wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{port}
trusted_networks = 127.0.0.0/8
[queue]
path = {spool}
map_size = {map_size}
[delivery]
remote_port = {mx_port}
allow_networks = 127.0.0.0/8
connect_timeout = 2s
idle_timeout = 1s
[dns]
servers = 127.0.0.1:{dns_port}
[stats]
socket = {wd.path}/stats.sock
{extra}
""")


def stats(wd):
    p = subprocess.run([SLUICECTL, "-s", f"{wd.path}/stats.sock", "--json", "stats"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def send(port, sender, rcpts, body):
    """One message over its own session: True on 250, False on a 4xx
    (the spool is full), anything else raises."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.sendmail(sender, rcpts, body)
        return True
    except smtplib.SMTPResponseException as e:
        assert 400 <= e.smtp_code < 500, e
        return False
    except smtplib.SMTPRecipientsRefused as e:
        assert all(400 <= code < 500 for code, _ in e.recipients.values()), e
        return False


def test_dsn_on_full_spool():
    """Messages to one recipient at bounce.test (MX down at first) and one
    at defer.test (never answers) fill a 16 MB spool until injection gets
    452, down to small messages so that not even a DSN would fit as new
    mail. Then bounce.test's MX comes up rejecting every RCPT with 5xx:
    each message bounces there and its DSN must reach sender.test's MX.
    The originals stay (their defer.test recipient waits), so the room for
    the DSNs comes from the reserve alone (the half of it DSNs may use:
    those that do not fit wait, with their bounce, until delivered DSNs
    make room)."""
    need("dnsmasq", "smtp-sink")
    wd = Workdir("sluice-full-dsn-")
    dns = node = bounce_mx = sender_mx = None
    try:
        mx_port = free_port()
        dns = Dns(wd, [
            "host-record=mx1.test,127.0.0.1", "mx-host=bounce.test,mx1.test,10",
            "host-record=mx2.test,127.0.0.2", "mx-host=sender.test,mx2.test,10",
            "host-record=mx3.test,127.0.0.3", "mx-host=defer.test,mx3.test,10"])
        sender_mx = Sink(wd, mx_port, name="senders", host="127.0.0.2")
        port = free_port()
        conf = node_conf(wd, port, mx_port, dns.port, os.path.join(wd.path, "spool"), "16M",
                         "[domain *]\nretry_schedule = 1s\nsite_hold = 1s\n"
                         "[domain defer.test]\nretry_schedule = 1h\n")
        node = Sluice(SLUICE, conf)
        node.wait_log("event=ready")
        accepted = 0
        for size in (1000000, 100000, 10000, 1000):
            for i in range(400):
                body = (f"From: s@sender.test\r\nSubject: fill {size} {i}\r\n"
                        f"Message-ID: <fill.{size}.{i}@sender.test>\r\n\r\n").encode()
                body += b"x" * 76 + b"\r\n"
                body = body + (b"y" * 76 + b"\r\n") * (size // 78)
                if not send(port, "s@sender.test", ["u@bounce.test", "w@defer.test"], body):
                    break
                accepted += 1
            else:
                raise AssertionError(f"the 16 MB spool took 400 messages of {size} octets")
        print(f"accepted {accepted} messages before 452")
        assert accepted >= 10
        assert node.count_log("queue=full") >= 1
        # bounce.test's MX comes up and rejects every recipient for good
        bounce_mx = Sink(wd, mx_port, flags=["-f", "RCPT"], name="bouncer")
        try:
            wait_until(lambda: node.count_log("event=dsn_queued") >= accepted, 90,
                       f"{accepted} DSNs committed")
        except AssertionError:
            for line in node.lines:
                if "tries=1 " in line or "queue=" in line or "dsn" in line or "bounced" in line:
                    print("  log:", line.rstrip()[:300])
            raise
        wait_until(lambda: len(sender_mx.files()) >= accepted
                   and node.count_log("event=delivered rcpt=<s@sender.test>") >= accepted, 90,
                   f"{accepted} DSNs at the sender's MX")
        ids = set()
        for m in sender_mx.messages():
            assert b"X-Mail-Args: <> " in m, m[:300]
            assert b"Final-Recipient: rfc822; u@bounce.test" in m, m[:2000]
            for line in m.split(b"\n"):
                if line.startswith(b"Message-ID: <fill."):
                    ids.add(line)
        assert len(ids) == accepted, f"{len(ids)} distinct originals in {accepted} DSNs"
        assert node.count_log("event=dsn_enqueue_failed") == 0
        assert node.stop_clean() == 0
        node = None
        check = spool_tool("check", os.path.join(wd.path, "spool"))
        assert check.returncode == 0, check.stdout
        # the originals wait for defer.test, their bounce.test recipient gone
        count = json.loads(spool_tool("count", os.path.join(wd.path, "spool")).stdout)
        assert count["messages"] == accepted and count["deferred"] + count["ready"] == accepted, count
    finally:
        if node is not None:
            node.stop_clean()
        for p in (bounce_mx, sender_mx, dns):
            if p is not None:
                p.stop()
        wd.cleanup()


def test_full_spool_with_deferrals_recovers():
    """An 8 MB spool fills while every MX is down: injection gets 452 and
    the recipients it took are deferred again and again (each deferral
    writes its reply and its retry time). Then the MX comes back: every
    accepted recipient is delivered once, and injection is taken again.
    (The wedge this guards against, a take of due recipients too big for
    the last pages tried at that size every second, came with a longer
    outage and more mail than this test's: a probe of 1,500 messages over
    three hosts, not in the tree; see delivery.c due_on_done.)"""
    need("dnsmasq", "smtp-sink")
    wd = Workdir("sluice-full-defer-")
    dns = node = sink = None
    try:
        mx_port = free_port()
        doms = [f"d{i}.test" for i in range(30)]
        dns = Dns(wd, ["host-record=mx1.test,127.0.0.1"] +
                  [f"mx-host={d},mx1.test,10" for d in doms])
        port = free_port()
        conf = node_conf(wd, port, mx_port, dns.port, os.path.join(wd.path, "spool"), "8M",
                         "[domain *]\nretry_schedule = 1s\nsite_hold = 1s\n")
        node = Sluice(SLUICE, conf)
        node.wait_log("event=ready")
        accepted, refused = [], 0
        body = b"Subject: fill\r\n\r\n" + (b"z" * 76 + b"\r\n") * 256
        for i in range(2000):  # bounded: the spool is full long before
            rcpt = f"u{i}@{doms[i % len(doms)]}"
            if send(port, "s@sender.example", [rcpt], body):
                accepted.append(rcpt)
            else:
                refused += 1
                if refused >= 200:
                    break
        assert refused >= 200 and len(accepted) >= 50, (len(accepted), refused)
        # one notice a refused message; the one warning is the alert
        full = [ln for ln in node.lines if "event=spool_full" in ln]
        assert full and all("level=notice" in ln for ln in full), full[:3]
        assert node.count_log("queue=full") >= 1
        # the deferrals go on while the MX is down (each writes its reply
        # and its retry time)
        wait_until(lambda: node.count_log("event=deferred") >= 5 * len(accepted), 120,
                   "five deferrals a recipient")
        sink = Sink(wd, mx_port)
        try:
            wait_until(lambda: node.count_log("event=delivered") >= len(accepted), 120,
                       f"{len(accepted)} recipients delivered once the MX is back")
        except AssertionError:
            print("  due polls failed:", node.count_log("event=due_poll_failed"),
                  "delivered:", node.count_log("event=delivered"))
            raise
        got = sorted(ln.split("rcpt=<")[1].split(">")[0]
                     for ln in node.lines if "event=delivered" in ln)
        assert got == sorted(accepted), "each accepted recipient delivered once"
        wait_until(lambda: send(port, "s@sender.example", ["again@d0.test"], body), 60,
                   "injection taken again")
        assert node.stop_clean() == 0
        node = None
    finally:
        if node is not None:
            node.stop_clean()
        for p in (sink, dns):
            if p is not None:
                p.stop()
        wd.cleanup()


def mdb_rcpt_corrupt(spool, nth):
    """Overwrite the value of the nth record of the rcpt database with
    bytes that fail its checks, with lmdb-utils (mdb_dump, mdb_load)."""
    out = subprocess.run(["mdb_dump", "-s", "rcpt", spool], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    hdr_end = out.index("HEADER=END")
    pairs = out[hdr_end + 1:-1]  # key, value lines, then DATA=END
    key = pairs[2 * nth].strip()
    header = [ln for ln in out[:hdr_end + 1] if not ln.startswith("db_pagesize=")]
    data = "\n".join(header + [" " + key, " 09676172626167650a", "DATA=END"]) + "\n"
    subprocess.run(["mdb_load", "-s", "rcpt", spool], input=data, text=True, check=True)
    return key


def test_corrupt_record_skipped():
    """Ten messages wait in a spool (their MX is down); in a copy of it one
    recipient record is overwritten with garbage. sluice started on the
    copy delivers the nine others, counts the record on the stats socket
    and logs its key; sluice-spool check reports it and exits 1."""
    need("dnsmasq", "smtp-sink", "mdb_dump", "mdb_load")
    wd = Workdir("sluice-corrupt-")
    dns = node = sink = None
    try:
        mx_port = free_port()
        dns = Dns(wd, ["host-record=mx.test,127.0.0.1", "mx-host=c.test,mx.test,10"])
        port = free_port()
        spool = os.path.join(wd.path, "spool")
        conf = node_conf(wd, port, mx_port, dns.port, spool, "64M",
                         "[domain *]\nretry_schedule = 1s\nsite_hold = 1s\n")
        node = Sluice(SLUICE, conf)
        node.wait_log("event=ready")
        for i in range(10):
            body = f"Subject: c{i}\r\nX-Seq: {i}\r\n\r\nbody {i}\r\n".encode()
            assert send(port, "s@example.com", [f"u{i}@c.test"], body)
        # all deferred once: in the copy they come due through the time index
        wait_until(lambda: node.count_log("event=deferred") >= 10, 30, "ten deferrals")
        assert node.stop_clean() == 0
        node = None
        copy = os.path.join(wd.path, "copy")
        shutil.copytree(spool, copy)
        os.remove(os.path.join(copy, "sluice.lock"))
        key = mdb_rcpt_corrupt(copy, 3)
        check = spool_tool("check", copy)
        assert check.returncode == 1, check
        rep = json.loads(check.stdout)
        assert rep["bad_records"] == 1, rep
        assert f"bad_record db=rcpt key={key}" in check.stderr, check.stderr

        sink = Sink(wd, mx_port)
        conf = node_conf(wd, port, mx_port, dns.port, copy, "64M",
                         "[domain *]\nretry_schedule = 1s\nsite_hold = 1s\n")
        node = Sluice(SLUICE, conf)
        node.wait_log("event=ready")
        wait_until(lambda: node.count_log("event=delivered") >= 9, 60, "nine deliveries")
        assert node.count_log(f"queue=corrupt_record db=rcpt key={key}") == 1, key
        assert stats(wd)["spool"]["corrupt_records"] >= 1
        seqs = sorted(int(line.split(b":")[1]) for m in sink.messages()
                      for line in m.split(b"\n") if line.startswith(b"X-Seq:"))
        assert len(seqs) == 9 and len(set(seqs)) == 9, seqs
        assert node.stop_clean() == 0
        node = None
        check = spool_tool("check", copy)
        assert check.returncode == 1 and json.loads(check.stdout)["bad_records"] == 1, check
    finally:
        if node is not None:
            node.stop_clean()
        for p in (sink, dns):
            if p is not None:
                p.stop()
        wd.cleanup()


def rcpt_leaves(data):
    """The page numbers of the rcpt database's leaf pages in an LMDB data
    file (the newer meta page, the main tree's root, the rcpt record in
    it; a root that is a branch names its children)."""
    psize = 4096
    metas = [data[0:psize], data[psize:2 * psize]]
    meta = max(metas, key=lambda m: struct.unpack_from("<Q", m, 144)[0])  # mm_txnid
    main_root = struct.unpack_from("<Q", meta, 128)[0]  # mm_dbs[1].md_root
    page = data[main_root * psize:(main_root + 1) * psize]
    at = page.index(b"rcpt")
    root = struct.unpack_from("<Q", page, at + 4 + 40)[0]  # its MDB_db's md_root
    flags, lower = struct.unpack_from("<HH", data, root * psize + 10)
    if flags & 2:
        return [root]
    leaves = []
    for i in range((lower - 16) // 2):
        off = struct.unpack_from("<H", data, root * psize + 16 + 2 * i)[0]
        lo, hi, fl = struct.unpack_from("<HHH", data, root * psize + off)
        leaves.append(lo | hi << 16 | fl << 32)
    return leaves


def test_damaged_spool_refused_at_start():
    """A spool whose recipients' leaf pages are damaged inside (a node
    count of garbage: LMDB keeps no checksums and follows it): sluice
    started on it exits 1 with event=start_failed naming the damage,
    not a crash (it died of SIGSEGV in the start walk before);
    sluice-spool check says the same and exits 1."""
    need("dnsmasq")
    wd = Workdir("sluice-damaged-")
    dns = node = None
    try:
        mx_port = free_port()
        dns = Dns(wd, ["host-record=mx.test,127.0.0.1", "mx-host=c.test,mx.test,10"])
        port = free_port()
        spool = os.path.join(wd.path, "spool")
        conf = node_conf(wd, port, mx_port, dns.port, spool, "64M",
                         "[domain *]\nretry_schedule = 1h\n")
        node = Sluice(SLUICE, conf)
        node.wait_log("event=ready")
        for i in range(30):
            body = f"Subject: d{i}\r\n\r\nbody {i}\r\n".encode()
            assert send(port, "s@example.com", [f"u{i}@c.test", f"v{i}@c.test"], body)
        wait_until(lambda: node.count_log("event=deferred") >= 60, 60, "sixty deferrals")
        assert node.stop_clean() == 0
        node = None
        path = os.path.join(spool, "data.mdb")
        with open(path, "rb") as f:
            data = bytearray(f.read())
        for pg in rcpt_leaves(data):
            struct.pack_into("<H", data, pg * 4096 + 12, 0x0ff0)  # mp_lower
        with open(path, "wb") as f:
            f.write(data)
        node = Sluice(SLUICE, conf)
        rc = node.proc.wait(timeout=60)
        node.reader.join(10)  # every line read
        assert rc == 1, f"sluice ended with {rc}: " + "\n".join(node.lines[-5:])
        assert node.count_log("event=start_failed") == 1
        assert node.count_log("is damaged") >= 1, node.lines[-3:]
        assert node.count_log("event=fatal_signal") == 0
        node = None
        check = spool_tool("check", spool)
        assert check.returncode == 1, check
        assert "the spool is damaged" in check.stderr, check.stderr
    finally:
        if node is not None:
            node.stop_clean()
        if dns is not None:
            dns.stop()
        wd.cleanup()


def fail_writes_shim():
    """The fail-writes shim (argv[3]), or None when there is none (said)."""
    shim = sys.argv[3] if len(sys.argv) > 3 else None
    if shim is None or not os.path.exists(shim):
        print("     no fail-writes shim (argv[3]): not run")
        return None
    return shim


def shim_env(shim, trigger, stall=False, stop_bound_ms=None, leaks_checked=False):
    """The environment of a sluice whose spool's disk fails its writes
    (EIO) once trigger exists; with stall, stalls them instead (and,
    unless leaks_checked, what a stop cut off stays allocated until the
    exit: no leak check); with stop_bound_ms, the stop's last bound that
    long."""
    env = {"LD_PRELOAD": preload(SLUICE, shim), "FAIL_WRITES_PATH": "/spool/data.mdb",
           "FAIL_WRITES_TRIGGER": trigger}
    if stall:
        env["FAIL_WRITES_MODE"] = "stall"
    if stall and not leaks_checked:
        asan = os.environ.get("ASAN_OPTIONS")
        env["ASAN_OPTIONS"] = (asan + ":" if asan else "") + "detect_leaks=0"
    if stop_bound_ms is not None:
        env["SLUICE_TEST_STOP_BOUND_MS"] = str(stop_bound_ms)
    return env


def drain_timeout_1s(conf):
    """The config file conf's [server] given drain_timeout = 1s."""
    with open(conf) as f:
        text = f.read()
    with open(conf, "w") as f:
        f.write(text.replace("[server]\n", "[server]\ndrain_timeout = 1s\n", 1))


def holding_mx(at_dot, release, got):
    """A HostileMx script that takes a message whole (got gets a 1), sets
    at_dot, and holds its 250 to the final dot until release is set."""
    def script(c, rfile):
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
                release.wait(60)
                c.sendall(b"250 2.0.0 taken\r\n")
            elif cmd.startswith(b"QUIT"):
                c.sendall(b"221 bye\r\n")
                return
            else:
                c.sendall(b"250 ok\r\n")
    return script


def delivered_again(node, qid, got):
    """node, started again on the spool of message qid, whose delivery to
    <a@c.test> (got at the MX once) was never stored, delivers it again
    (at least once, never lost), then stops clean."""
    node.wait_log("event=ready")
    line = node.wait_log(f"id={qid} event=delivered", timeout=60)
    assert "rcpt=<a@c.test>" in line, line
    assert len(got) == 2, got  # sent again: its first delivery was never stored
    assert node.stop_clean() == 0


def test_stop_on_a_stalled_spool_is_bounded_and_loses_nothing():
    """SIGTERM while the spool's disk stalls (the fail-writes shim in
    stall mode, argv[3]) with a delivery's outcome on its way to it: the
    MX took the message, its "delivered" is not stored. The drain is not
    done while that outcome is with the spool: it times out (before, it
    counted connections only and logged drain_done
    note=nothing_in_flight). The stop waits for the spool's answers 30 s
    (SERVER_STOP_COMMIT_WAIT_MS), then logs event=outcome_unanswered with
    the message's id and recipient and goes on (before, that wait had no
    bound: the stop hung in the delivery's free until its last bound gave
    it up, with nothing said of the outcome and the later workers'
    commits never logged); the spool still answers nothing where it
    closes: after that cut its close is given up within seconds
    (event=stop_spool_given_up, exit 70), not at the stop's last bound
    60 s after the drain (before: stop_stuck stage=spool, half a minute
    after the cut). After the restart the message, acknowledged with 250,
    is delivered again: at least once, never lost."""
    need("dnsmasq")
    shim = fail_writes_shim()
    if shim is None:
        return
    wd = Workdir("sluice-stall-stop-")
    trigger = os.path.join(wd.path, "stall")
    at_dot, release = threading.Event(), threading.Event()
    got = []

    dns = mx = node = None
    env = shim_env(shim, trigger, stall=True)
    try:
        mx_port = free_port()
        dns = Dns(wd, ["host-record=mx.test,127.0.0.1", "mx-host=c.test,mx.test,10"])
        mx = HostileMx(mx_port, holding_mx(at_dot, release, got))
        port = free_port()
        spool = os.path.join(wd.path, "spool")
        conf = node_conf(wd, port, mx_port, dns.port, spool, "64M")
        drain_timeout_1s(conf)
        with extra_env(env):
            node = Sluice(SLUICE, conf)
        node.wait_log("event=ready")
        assert send(port, "s@example.com", ["a@c.test"], b"Subject: s\r\n\r\nstalled\r\n")
        qid = dict(log_fields(node.wait_log("event=queued")))["id"]
        assert at_dot.wait(30), "the message at the MX"
        open(trigger, "w").close()  # the spool's disk stops answering
        release.set()  # the MX takes it: its outcome goes to the spool
        wait_until(lambda: os.path.exists(trigger + ".held"), 30, "the outcome's commit held")
        t0 = time.monotonic()
        node.signal(signal.SIGTERM)
        try:
            rc = node.proc.wait(90)
        except subprocess.TimeoutExpired:
            raise AssertionError("the stop was not bounded:\n" + "\n".join(node.lines[-20:]))
        took = time.monotonic() - t0
        node.reader.join(10)
        assert rc == 70, (rc, node.lines[-20:])
        # the outcome's commit held the drain: not "nothing_in_flight"
        assert node.count_log("event=drain_done") == 0, node.log_lines("event=drain_")
        assert node.count_log("event=drain_timed_out") == 1, node.lines[-20:]
        cut = node.log_lines("event=outcome_unanswered")
        assert len(cut) == 1, node.lines[-20:]
        f = dict(log_fields(cut[0]))
        assert f["id"] == qid and f["rcpt"] == "<a@c.test>" and f["outcome"] == "delivered", cut
        (wait_cut,) = node.log_lines("event=stop_outcome_wait_cut")
        assert "pending=1 " in wait_cut, wait_cut
        # past every worker's free, the spool's close is given up soon
        # after the cut, not at the stop's last bound (stop_stuck)
        assert node.count_log("event=stop_stuck") == 0, node.lines[-20:]
        (given_up,) = node.log_lines("event=stop_spool_given_up")
        assert "exit=70 " in given_up, given_up
        (stopped,) = node.log_lines("event=stopped")
        assert "exit=70" in stopped, stopped
        assert node.lines.index(cut[0]) < node.lines.index(given_up)
        after_cut = log_time(stopped) - log_time(wait_cut)
        assert after_cut < 20, after_cut  # the close's wait (5 s), not 30 s more
        assert took < 55, took  # the drain (1 s), the wait (30 s), the close (5 s)
        assert node.count_log("event=delivered") == 0  # never stored: not told
        node = None
        os.unlink(trigger)
        node = Sluice(SLUICE, conf)
        delivered_again(node, qid, got)
        node = None
    finally:
        release.set()
        for path in (trigger, trigger + ".held"):  # first: the stop may need the disk
            if os.path.exists(path):
                os.unlink(path)
        if node is not None:
            node.stop_clean()
        for p in (mx, dns):
            if p is not None:
                p.stop()
        wd.cleanup()


def test_drain_waits_for_an_outcome_with_the_spool():
    """SIGTERM while a delivery's outcome is with the spool (its disk
    stalls, the fail-writes shim, argv[3]) and its connection is gone:
    the drain is not done then (before, it counted connections only and
    logged drain_done note=nothing_in_flight with "delivered" not
    stored). Once the disk answers, the outcome lands and the drain is
    done at once, well inside drain_timeout (the answer's port looks
    again), the message delivered once and gone from the spool."""
    need("dnsmasq")
    shim = fail_writes_shim()
    if shim is None:
        return
    wd = Workdir("sluice-stall-drain-")
    trigger = os.path.join(wd.path, "stall")
    at_dot, release = threading.Event(), threading.Event()
    got = []
    dns = mx = node = None
    env = shim_env(shim, trigger, stall=True, leaks_checked=True)
    try:
        mx_port = free_port()
        dns = Dns(wd, ["host-record=mx.test,127.0.0.1", "mx-host=c.test,mx.test,10"])
        mx = HostileMx(mx_port, holding_mx(at_dot, release, got))
        port = free_port()
        spool = os.path.join(wd.path, "spool")
        conf = node_conf(wd, port, mx_port, dns.port, spool, "64M")
        with open(conf) as f:
            text = f.read()
        with open(conf, "w") as f:
            f.write(text.replace("[server]\n", "[server]\ndrain_timeout = 60s\n", 1))
        with extra_env(env):
            node = Sluice(SLUICE, conf)
        node.wait_log("event=ready")
        assert send(port, "s@example.com", ["a@c.test"], b"Subject: s\r\n\r\ndrained\r\n")
        qid = dict(log_fields(node.wait_log("event=queued")))["id"]
        assert at_dot.wait(30), "the message at the MX"
        open(trigger, "w").close()  # the spool's disk stops answering
        release.set()  # the MX takes it: its outcome goes to the spool
        wait_until(lambda: os.path.exists(trigger + ".held"), 30, "the outcome's commit held")
        # idle_timeout (1 s) ends the connection: nothing but the outcome left
        wait_until(lambda: stats(wd)["connections"]["outbound_open"] == 0, 30,
                   "the connection gone")
        node.signal(signal.SIGTERM)
        node.wait_log("event=draining")
        # not done while the outcome is with the spool (a look of 2 s:
        # before, drain_done came at once)
        look = time.monotonic() + 2
        while time.monotonic() < look:
            assert node.count_log("event=drain_done") == 0, node.lines[-10:]
            time.sleep(0.1)
        t0 = time.monotonic()
        os.unlink(trigger)  # the disk answers
        rc = node.proc.wait(90)
        took = time.monotonic() - t0
        node.reader.join(10)
        assert rc == 0, (rc, node.lines[-20:])
        assert node.count_log("event=drain_timed_out") == 0, node.lines[-20:]
        (done,) = node.log_lines("event=drain_done")
        (delivered,) = node.log_lines("event=delivered")
        assert dict(log_fields(delivered))["id"] == qid, delivered
        assert node.lines.index(delivered) < node.lines.index(done), node.lines[-20:]
        assert took < 30, took  # not the drain's 60 s
        node = None
        assert got == [1]
        assert len(spool_messages(spool)) == 0
    finally:
        release.set()
        if os.path.exists(trigger):
            os.unlink(trigger)
        if node is not None:
            node.stop_clean()
        if mx is not None:
            mx.stop()
        if dns is not None:
            dns.stop()
        wd.cleanup()


def _reply(rfile):
    """One SMTP reply (its lines), as bytes; b"" at the end."""
    out = b""
    while True:
        line = rfile.readline()
        out += line
        if not line or line[3:4] != b"-":
            return out


def _message_to_the_dot(s, body):
    """On the session s (greeted), one message whole, the final dot
    included, without waiting for its reply."""
    r = s.makefile("rb")
    s.sendall(b"EHLO client.test\r\n")
    assert _reply(r).startswith(b"250")
    for cmd, want in ((b"MAIL FROM:<s@example.com>", b"250"), (b"RCPT TO:<a@c.test>", b"250"),
                      (b"DATA", b"354")):
        s.sendall(cmd + b"\r\n")
        got = _reply(r)
        assert got.startswith(want), (cmd, got)
    s.sendall(body + b"\r\n.\r\n")


def test_stop_tells_answers_that_came_after_another_workers_wait():
    """The stop's wait for the spool's answers has one bound for every
    worker (stop_commit_until): worker 0's wait may take all of it (here
    a commit whose answer the test hook SLUICE_TEST_COMMIT_DELAY holds
    two minutes), and the answer to worker 1's commit (held by the
    spool's stalled disk, the fail-writes shim, until the test frees it
    once the loops ended) then waits in worker 1's port when its turn
    comes, past the bound. It is told (event=queued
    unanswered=stopping), as delivery.c's outcomes_wait tells an outcome
    found there; before, that wait broke out at once and logged the
    stored message event=commit_unanswered, stop_commit_wait_cut."""
    shim = fail_writes_shim()
    if shim is None:
        return
    wd = Workdir("sluice-stall-port-")
    trigger = os.path.join(wd.path, "stall")
    env = shim_env(shim, trigger, stall=True)
    env["SLUICE_TEST_COMMIT_DELAY"] = "120000"
    node = None
    socks = []
    try:
        port = free_port()
        spool = os.path.join(wd.path, "spool")
        conf = wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{port}
trusted_networks = 127.0.0.0/8
drain_timeout = 1s
[queue]
path = {spool}
map_size = 64M
[delivery]
enabled = no
""")
        with extra_env(env):
            node = Sluice(SLUICE, conf)
        node.wait_log("event=ready")

        sources = iter(range(2, 250))

        def on_worker(want, body):
            # a loopback address of its own per try (the log's
            # event=connect names it), until the kernel gives one to want
            import socket
            for k in sources:
                ip = f"127.0.0.{k}"
                s = socket.create_connection(("127.0.0.1", port), timeout=30,
                                             source_address=(ip, 0))
                assert s.recv(512).startswith(b"220")
                line = node.wait_log(f"event=connect client={ip} ")
                if f" thread={want} " in line:
                    _message_to_the_dot(s, body)
                    return s, dict(log_fields(line))["session"]
                s.close()
            raise AssertionError(f"no connection on {want}")

        a, a_session = on_worker("w0", b"Subject: a\r\n\r\nheld by the hook")
        socks.append(a)
        node.wait_log(f"session={a_session} event=commit_held")
        open(trigger, "w").close()  # the spool's disk stops answering
        b, b_session = on_worker("w1", b"Subject: b\r\n\r\nheld by the disk")
        socks.append(b)
        wait_until(lambda: os.path.exists(trigger + ".held"), 30, "b's commit held")
        node.signal(signal.SIGTERM)
        node.wait_log("event=drain_timed_out", timeout=30)
        # Worker 0's wait (every loop ended before it begins) lasts 30 s:
        # b's answer comes meanwhile, to worker 1's port, not its loop.
        node.wait_log("event=stop_commit_wait worker=0 ", timeout=30)
        os.unlink(trigger)  # the disk answers: b's commit lands in w1's port
        rc = node.proc.wait(90)
        node.reader.join(10)
        assert rc == 0, (rc, node.lines[-20:])
        assert node.count_log("event=commit_unanswered") == 0, node.lines[-20:]
        assert node.count_log("event=stop_commit_wait_cut") == 0, node.lines[-20:]
        told = node.log_lines("unanswered=stopping")
        assert sorted(dict(log_fields(t))["session"] for t in told) == \
            sorted([a_session, b_session]), told
        node = None
        assert len(spool_messages(spool)) == 2
    finally:
        for s in socks:
            s.close()
        for path in (trigger, trigger + ".held"):  # first: the stop may need the disk
            if os.path.exists(path):
                os.unlink(path)
        if node is not None:
            node.stop_clean()
        wd.cleanup()

def test_stop_ends_a_flush_waiting_for_a_stalled_spool():
    """`sluicectl flush` while the spool's disk stalls (the fail-writes
    shim, argv[3]): its retime waits for the spool; a SIGTERM then must
    not wait for it. Before, the stop waited for the command in ops_stop,
    before any worker was told to stop, until its last bound gave it up
    (stop_stuck stage=stats); now the flush gives up at the stop
    (event=flush_cut), the workers stop, and the stop
    is given up past them (the bound 8 s here).
    The deferred message is in the spool at the next start."""
    need("dnsmasq")
    shim = fail_writes_shim()
    if shim is None:
        return
    wd = Workdir("sluice-stall-flush-")
    trigger = os.path.join(wd.path, "stall")
    dns = node = flush = None
    env = shim_env(shim, trigger, stall=True, stop_bound_ms=8000)
    try:
        mx_port = free_port()  # nobody listens: deferred
        dns = Dns(wd, ["host-record=mx.test,127.0.0.1", "mx-host=c.test,mx.test,10"])
        port = free_port()
        spool = os.path.join(wd.path, "spool")
        conf = node_conf(wd, port, mx_port, dns.port, spool, "64M",
                         "[domain *]\nretry_schedule = 1h\n")
        drain_timeout_1s(conf)
        with extra_env(env):
            node = Sluice(SLUICE, conf)
        node.wait_log("event=ready")
        assert send(port, "s@example.com", ["a@c.test"], b"Subject: f\r\n\r\ndeferred\r\n")
        node.wait_log("event=deferred")  # logged once its commit is durable
        open(trigger, "w").close()  # the spool's disk stops answering
        flush = subprocess.Popen([SLUICECTL, "-s", f"{wd.path}/stats.sock", "flush"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: os.path.exists(trigger + ".held"), 30, "the flush's retime held")
        node.signal(signal.SIGTERM)
        try:
            rc = node.proc.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the stop was not bounded:\n" + "\n".join(node.lines[-20:]))
        node.reader.join(10)
        said = flush.communicate(timeout=30)[0]
        assert rc == 70, (rc, node.lines[-20:])
        stuck = node.log_lines("event=stop_stuck")
        # past the workers' join: their spool answers (the due poll's take
        # waits behind the flush: 30 s), or where the spool closes
        assert len(stuck) == 1, node.lines[-20:]
        stage = dict(log_fields(stuck[0]))["stage"]
        assert stage in ("servers_and_spool_answers", "spool"), stuck
        (cut,) = node.log_lines("event=flush_cut")
        assert "recipients=1 retimed=0 " in cut, cut
        assert flush.returncode != 0 and "recipients" not in said, said  # not told done
        node = None
        os.unlink(trigger)
        node = Sluice(SLUICE, conf)
        node.wait_log("event=ready")
        assert node.stop_clean() == 0
        node = None
        (m,) = spool_messages(spool)
        assert b"deferred" in m["body"]
    finally:
        for path in (trigger, trigger + ".held"):  # first: the stop may need the disk
            if os.path.exists(path):
                os.unlink(path)
        if flush is not None and flush.poll() is None:
            flush.kill()
            flush.wait()
        if node is not None:
            node.stop_clean()
        if dns is not None:
            dns.stop()
        wd.cleanup()


def test_outcome_commit_failure_names_its_message():
    """A delivery's outcome the spool refuses (its disk fails writes with
    EIO: the fail-writes shim, argv[3]) is tried again, backing off, and
    at a stop left for the next start: each of those lines,
    event=outcome_commit_failed, says which message (id=), as every line
    about a message does; before, they gave a count of recipients alone,
    and the operator could not tell which message would go again. The
    message, taken by the MX, its "delivered" never stored, is delivered
    again after the restart."""
    need("dnsmasq")
    shim = fail_writes_shim()
    if shim is None:
        return
    wd = Workdir("sluice-eio-outcome-")
    trigger = os.path.join(wd.path, "fail")
    at_dot, release = threading.Event(), threading.Event()
    got = []
    dns = mx = node = None
    env = shim_env(shim, trigger)
    try:
        mx_port = free_port()
        dns = Dns(wd, ["host-record=mx.test,127.0.0.1", "mx-host=c.test,mx.test,10"])
        mx = HostileMx(mx_port, holding_mx(at_dot, release, got))
        port = free_port()
        spool = os.path.join(wd.path, "spool")
        conf = node_conf(wd, port, mx_port, dns.port, spool, "64M")
        with extra_env(env):
            node = Sluice(SLUICE, conf)
        node.wait_log("event=ready")
        assert send(port, "s@example.com", ["a@c.test"], b"Subject: e\r\n\r\nrefused\r\n")
        qid = dict(log_fields(node.wait_log("event=queued")))["id"]
        assert at_dot.wait(30), "the message at the MX"
        open(trigger, "w").close()  # the spool's disk fails its writes
        release.set()  # the MX takes it: its outcome goes to the spool
        first = node.wait_log("event=outcome_commit_failed", timeout=30)
        assert dict(log_fields(first)).get("id") == qid, first
        assert node.stop_clean() == 0
        left = node.log_lines("note=retried_after_restart")
        assert len(left) == 1 and dict(log_fields(left[0])).get("id") == qid, left
        assert node.count_log("event=delivered") == 0
        node = None
        os.unlink(trigger)
        node = Sluice(SLUICE, conf)
        delivered_again(node, qid, got)
        node = None
    finally:
        release.set()
        if os.path.exists(trigger):
            os.unlink(trigger)
        if node is not None:
            node.stop_clean()
        for p in (mx, dns):
            if p is not None:
                p.stop()
        wd.cleanup()


def test_stop_with_the_events_pumps_request_stuck_is_bounded():
    """SIGTERM while the spool's disk stalls (the fail-writes shim, argv[3])
    with only the events pump's request waiting for it: a recipient
    refused at RCPT (an address literal sluice cannot deliver to) is an
    event put alone, not with a worker's commit, so no wait of the stop
    for the spool's answers is cut. The pump gives its request up at the
    stop (event=events_port_busy_at_stop); the spool's close then waits 5 s
    at most, as after a cut (event=stop_spool_given_up, exit 70). Before,
    the close waited with no bound until the stop's last bound gave it up
    (stop_stuck stage=spool; 30 s here, SLUICE_TEST_STOP_BOUND_MS)."""
    shim = fail_writes_shim()
    if shim is None:
        return
    wd = Workdir("sluice-stall-events-")
    trigger = os.path.join(wd.path, "stall")
    node = None
    env = shim_env(shim, trigger, stall=True, stop_bound_ms=30000)
    try:
        port = free_port()
        spool = os.path.join(wd.path, "spool")
        hook = (f"[events hook]\nurl = http://127.0.0.1:{free_port()}/events\n"
                "secret = s3cret-for-tests\ntimeout = 1s\n")
        conf = node_conf(wd, port, free_port(), free_port(), spool, "64M", hook)
        drain_timeout_1s(conf)
        with extra_env(env):
            node = Sluice(SLUICE, conf)
        node.wait_log("event=ready")
        open(trigger, "w").close()  # the spool's disk stops answering
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.mail("s@example.com")[0] == 250
            code, _ = c.rcpt("a@[test:x]")
            assert code == 553, code
            c.rset()  # the event of a refused RCPT: once the transaction ends
            wait_until(lambda: os.path.exists(trigger + ".held"), 30, "the event's put held")
            c.quit()
        node.wait_log("event=rcpt_rejected")
        t0 = time.monotonic()
        node.signal(signal.SIGTERM)
        try:
            rc = node.proc.wait(90)
        except subprocess.TimeoutExpired:
            raise AssertionError("the stop was not bounded:\n" + "\n".join(node.lines[-20:]))
        took = time.monotonic() - t0
        node.reader.join(10)
        d, node = node, None  # ended: nothing to stop
        assert rc == 70, (rc, d.lines[-20:])
        # nothing of a worker's waited: no cut, the pump's request alone
        assert d.count_log("event=stop_commit_wait_cut") == 0, d.lines[-20:]
        (busy,) = d.log_lines("event=events_port_busy_at_stop")
        assert d.count_log("event=stop_stuck") == 0, d.lines[-20:]
        (given_up,) = d.log_lines("event=stop_spool_given_up")
        assert "exit=70 " in given_up, given_up
        assert d.lines.index(busy) < d.lines.index(given_up)
        (stopped,) = d.log_lines("event=stopped")
        assert "exit=70" in stopped, stopped
        after_busy = log_time(stopped) - log_time(busy)
        assert after_busy < 15, after_busy  # the close's wait (5 s)
        assert took < 28, took  # the pump's last wait (10 s), the close (5 s)
    finally:
        for path in (trigger, trigger + ".held"):  # first: the stop may need the disk
            if os.path.exists(path):
                os.unlink(path)
        if node is not None:
            node.stop_clean()
        wd.cleanup()


if __name__ == "__main__":
    main([test_dsn_on_full_spool, test_full_spool_with_deferrals_recovers,
          test_corrupt_record_skipped, test_damaged_spool_refused_at_start,
          test_stop_on_a_stalled_spool_is_bounded_and_loses_nothing,
          test_stop_tells_answers_that_came_after_another_workers_wait,
          test_drain_waits_for_an_outcome_with_the_spool,
          test_stop_ends_a_flush_waiting_for_a_stalled_spool,
          test_stop_with_the_events_pumps_request_stuck_is_bounded,
          test_outcome_commit_failure_names_its_message])
