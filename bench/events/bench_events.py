#!/usr/bin/env python3
"""Event sinks: the catch-up rate after a large backlog, which is the
rate a sink pushes events at when it has all it can take: to a webhook
(a Python receiver in a process of its own that counts events and
answers 200; --verify also checks each signature) and to a Redis stream
(a redis-server started here). Beside each, the ceiling of the other
side on this machine: the same receiver fed the same batches by a
Python keep-alive client, and redis-benchmark doing the same XADDs
pipelined.

  bench/events/bench_events.py [--sluice build-rel/engine/sluice] [--events 500000]
                               [--batch 500] [--verify]

The backlog is written straight into a journal under /var/tmp (what an
hour of an outage leaves: segment files of delivery log lines, 64 MB
each) before sluice starts with the sink; the figure is events
acknowledged per second until the sink's pending count is 0 (read from
the stats socket). Never fails on a number.
"""
import argparse
import hashlib
import hmac
import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "tests", "integ"))
from harness import Daemon, Workdir, free_port, wait_until  # noqa: E402

SECRET = "bench-secret"
SEGMENT = 64 * 1024 * 1024


def receiver_main(port, verify):
    """Run as a child: count events, answer 200, print the count on
    SIGTERM-free request GET /count."""
    count = [0]
    lock = threading.Lock()

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = 200
            if verify:
                ts = self.headers.get("X-Sluice-Timestamp", "")
                want = "sha256=" + hmac.new(SECRET.encode(), ts.encode() + b"." + body,
                                            hashlib.sha256).hexdigest()
                if not hmac.compare_digest(want, self.headers.get("X-Sluice-Signature", "")):
                    status = 401
            if status == 200:
                with lock:
                    count[0] += body.count(b'"event_id":')
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            with lock:
                out = str(count[0]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()


def start_receiver(verify):
    port = free_port()
    p = subprocess.Popen([sys.executable, __file__, "--receiver", str(port)] +
                         (["--verify"] if verify else []))

    def up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False
    wait_until(up, 10, "the receiver")
    return p, port


LINE = ('{"time":"2026-12-01T20:00:00.000Z","event":"delivery","id":"0000000000%03d",'
        '"rcpt":"user%d@example.com","sender":"bounce@news.example.net","domain":"example.com",'
        '"mx":"mx1.example.com","mx_addr":"192.0.2.25","source":"198.51.100.7","code":250,'
        '"enhanced":"2.0.0","reply":"2.0.0 OK 1701460800 a1si123456qkb.42 - gsmtp",'
        '"attempt":1,"tls_protocol":"TLSv1.3","tls_cipher":"TLS_AES_256_GCM_SHA384",'
        '"size":18432,"queue_time_ms":412}\n')


def write_backlog(events_dir, n):
    """A journal of n delivery lines in 64 MB segments, as the writer
    thread leaves it."""
    os.makedirs(events_dir, exist_ok=True)
    with open(os.path.join(events_dir, "id"), "w") as f:
        f.write("00000000b0a7c4e1\n")
    off = seq = 0
    f = None
    seg_len = 0
    total = 0
    for i in range(n):
        if f is None or seg_len >= SEGMENT:
            if f is not None:
                f.close()
            f = open(os.path.join(events_dir, f"{off:016x}-{seq:016x}.seg"), "w")
            seg_len = 0
        line = LINE % (i % 1000, i)
        f.write(line)
        seg_len += len(line)
        off += len(line)
        total += len(line)
        seq += 1
    f.close()
    return total


def ctl(sock, line):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock)
        s.sendall(line.encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            buf += s.recv(65536)
    return json.loads(buf.split(b"\n", 1)[0])


def catch_up(a, url_conf, label):
    """Start sluice on a journal of a.events lines with one sink; return
    (events/s, seconds, backlog bytes)."""
    wd = Workdir("sluice-evb-")
    work = tempfile.mkdtemp(prefix="sluice-evb-", dir=a.spool)
    try:
        spool = os.path.join(work, "spool")
        os.makedirs(spool)
        nbytes = write_backlog(os.path.join(spool, "events"), a.events)
        sock = os.path.join(wd.path, "stats.sock")
        conf = wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{free_port()}
[queue]
path = {spool}
map_size = 1G
[stats]
socket = {sock}
[events bench]
{url_conf}
batch_max = {a.batch}
batch_wait = 100ms
paused = yes
""")
        d = Daemon(a.sluice, conf)
        try:
            d.wait_log("event=ready")
            st = ctl(sock, "events")["sinks"][0]
            assert st["pending"] == a.events, st
            t0 = time.monotonic()
            ctl(sock, "events resume bench")
            deadline = t0 + 3600
            while time.monotonic() < deadline:
                st = ctl(sock, "events")["sinks"][0]
                if st["pending"] == 0:
                    break
                time.sleep(0.05)
            took = time.monotonic() - t0
            if st["pending"] != 0 or st["failed_attempts"]:
                print(f"  [{label}] {st}")
            d.stop()
        finally:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
        return a.events / took, took, nbytes
    finally:
        wd.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def http_ceiling(port, batch, seconds=3.0):
    """The receiver fed by a Python keep-alive client, batch events a POST."""
    body = ("[" + ",".join('{"event_id":"x-%d",' % i + (LINE % (0, i))[1:-1]
                           for i in range(batch)) + "]").encode()
    ts = str(int(time.time()))
    sig = "sha256=" + hmac.new(SECRET.encode(), ts.encode() + b"." + body,
                               hashlib.sha256).hexdigest()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    n = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        c.request("POST", "/", body, {"Content-Type": "application/json",
                                      "X-Sluice-Timestamp": ts, "X-Sluice-Signature": sig})
        c.getresponse().read()
        n += batch
    return n / (time.monotonic() - t0)


def redis_ceiling(port, n, batch):
    data = (LINE % (0, 0)).strip()
    t0 = time.monotonic()
    subprocess.run(["redis-benchmark", "-p", str(port), "-n", str(n), "-P", str(batch), "-q",
                    "XADD", "ceiling", "MAXLEN", "~", "1000000", "*", "event_id",
                    "00000000b0a7c4e1-1", "data", data],
                   capture_output=True, timeout=3600)
    return n / (time.monotonic() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="build-rel/engine/sluice")
    ap.add_argument("--events", type=int, default=500000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--spool", default="/var/tmp")
    ap.add_argument("--verify", action="store_true", help="the receiver checks signatures")
    ap.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.receiver:
        receiver_main(a.receiver, a.verify)
        return

    rp, rport = start_receiver(a.verify)
    try:
        rate, took, nbytes = catch_up(
            a, f"url = http://127.0.0.1:{rport}/events\nsecret = {SECRET}", "webhook")
        ceil = http_ceiling(rport, a.batch)
    finally:
        rp.terminate()
        rp.wait()
    print(f"events: backlog of {a.events} events ({nbytes / 1e6:.0f} MB of journal), "
          f"batches of {a.batch}, 2 workers, journal under {a.spool}")
    print(f"  webhook catch-up (signed{', receiver verifies' if a.verify else ''}): "
          f"{rate:9.0f} events/s ({took:.1f} s)")
    print(f"  webhook ceiling (Python client -> same receiver):     {ceil:9.0f} events/s")

    if shutil.which("redis-server") is None:
        print("  redis: redis-server not installed")
        return
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def pong():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(64).startswith(b"+PONG")
            except OSError:
                return False
        wait_until(pong, 10, "redis")
        rate, took, _ = catch_up(a, f"url = redis://127.0.0.1:{port}/bench-events", "redis")
        ceil = redis_ceiling(port, a.events, a.batch)
    finally:
        redis.terminate()
        redis.wait()
    print(f"  redis stream catch-up (XADD MAXLEN ~, pipelined):    {rate:9.0f} events/s "
          f"({took:.1f} s)")
    print(f"  redis ceiling (redis-benchmark, same XADD, -P {a.batch}):   {ceil:9.0f} events/s")


if __name__ == "__main__":
    main()
