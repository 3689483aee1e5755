"""Crash safety of the event sinks: sluice relays mail (several
submission clients, each message a queue id of its own) to smtp-sink
while a webhook on loopback takes its events, with small journal
segments (a test hook) so that the journal rolls over to a new one every
few hundred events and trims the old ones all along; it is killed with SIGKILL at random
moments (some of them just after a SIGHUP that changes the sink, which
the reload restarts from its cursor), many times, and started
again each time; then it runs until its spool is empty and its sink has
caught up. Checks: every message that got a 250 has its reception event
and its delivery event at the webhook, each event always under one
event_id, none dropped; a copy sent again is one the README allows (its
previous copy acknowledged within the last second or so before a kill,
3 s allowed for a loaded machine, or the batch in flight).

SLUICE_CRASH_SEED fixes the seed; SLUICE_CRASH_ROUNDS the number of kills
(default 20)."""
import os
import random
import signal
import socket
import sys
import threading
import time

from harness import Sluice, main, wait_until
import test_delivery
import test_events
from test_events import DOMAIN, Node, Receiver, hook_conf

SLUICE = sys.argv[1]
test_delivery.SLUICE = SLUICE
test_events.SLUICE = SLUICE


class Injector(threading.Thread):
    """One submission client sending message after message (one or two
    recipients), reconnecting whenever the daemon is gone; records each
    queue id that got its 250 with its recipients."""

    def __init__(self, port, name, seed, stop):
        super().__init__(daemon=True)
        self.port, self.name, self.stop = port, name, stop
        self.rng = random.Random(seed)
        self.n = 0
        self.acked = {}  # queue id -> recipients

    def session(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            f = s.makefile("rb")
            if not f.readline().startswith(b"220"):
                return
            s.sendall(b"EHLO inj\r\n")
            while f.readline()[3:4] == b"-":
                pass
            while not self.stop.is_set():
                tag = f"{self.name}x{self.n}x"  # one a message, across sessions
                self.n += 1
                rcpts = [f"{tag}{k}@{DOMAIN}" for k in range(self.rng.choice([1, 1, 2]))]
                s.sendall(b"MAIL FROM:<s@example.com>\r\n" +
                          b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts) +
                          b"DATA\r\n")
                for _ in range(1 + len(rcpts)):
                    if not f.readline().startswith(b"250"):
                        return
                if not f.readline().startswith(b"354"):
                    return
                s.sendall(f"Subject: {tag}\r\n\r\nbody of {tag}\r\n.\r\n".encode())
                line = f.readline()
                if not line.startswith(b"250"):
                    return
                self.acked[line.split()[-1].decode()] = rcpts

    def run(self):
        while not self.stop.is_set():
            try:
                self.session()
            except OSError:
                pass
            self.stop.wait(0.05)  # down (killed) or starting: again shortly


class TimedReceiver(Receiver):
    """A Receiver that also notes when each event_id first arrived and
    how many copies of it came."""

    def __init__(self):
        self.first = {}   # event_id -> monotonic time of the first copy
        self.copies = {}  # event_id -> when each copy came
        super().__init__()
        rec = self
        handler = self.server.RequestHandlerClass
        post = handler.do_POST

        def do_POST(h):
            now = time.monotonic()  # when it came (sent before a kill, perhaps)
            with rec.lock:
                before = len(rec.order)
            post(h)
            with rec.lock:
                for eid in rec.order[before:]:
                    rec.first.setdefault(eid, now)
                    rec.copies.setdefault(eid, []).append(now)
        handler.do_POST = do_POST


def test_kill9_under_load_loses_no_event():
    seed = int(os.environ.get("SLUICE_CRASH_SEED") or random.SystemRandom().randrange(1 << 30))
    rounds = int(os.environ.get("SLUICE_CRASH_ROUNDS", "20"))
    print(f"     seed={seed} rounds={rounds}")
    rng = random.Random(seed)
    rec = TimedReceiver()
    # segments of 128 KB (a test hook: builds with the tests), some 300
    # events each, so rollovers and trims race the kills and a start
    # finds its sink's cursor in a segment before the last; max_backlog
    # far above what the sink may lag behind on a loaded machine, its
    # progress set back by each kill (the last second sent again)
    os.environ["SLUICE_TEST_EVENTS_SEGMENT"] = str(128 * 1024)
    node = Node(hook_conf(rec.port, "max_backlog = 256M\nbatch_wait = 20ms"))
    stop = threading.Event()
    injectors = [Injector(node.port, f"c{i}", rng.randrange(1 << 30), stop) for i in range(3)]
    kills = []
    logs = []  # the log lines of every run killed
    hup_at = []
    try:
        for t in injectors:
            t.start()
        hups = 0
        for r in range(rounds):
            time.sleep(rng.uniform(0.1, 1.5))  # the random moment: what the test varies
            if rng.random() < 0.3:
                # a changed batch_wait: the reload stops the sink (it
                # stores its cursor) and starts it again from there
                with open(node.conf) as f:
                    text = f.read()
                a, b = ("20ms", "30ms") if "batch_wait = 20ms" in text else ("30ms", "20ms")
                with open(node.conf, "w") as f:
                    f.write(text.replace(f"batch_wait = {a}", f"batch_wait = {b}"))
                node.d.signal(signal.SIGHUP)
                hup_at.append(time.monotonic())
                hups += 1
                time.sleep(rng.uniform(0, 0.05))
            kills.append(time.monotonic())
            node.d.kill9()
            logs.extend(node.d.lines)
            node.start()
        stop.set()
        for t in injectors:
            t.join(30)
        acked = {q: r for t in injectors for q, r in t.acked.items()}
        print(f"     {rounds} kills ({hups} after a SIGHUP); {len(acked)} messages acknowledged")
        assert len(acked) > rounds * 10, "too little injected to mean anything"
        wait_until(lambda: node.ctl("stats")["queue"]["messages"] == 0, 120, "an empty spool")
        wait_until(lambda: node.sink_stats("hook")["pending"] == 0, 120, "pending 0")

        def missing():
            with rec.lock:
                got = list(rec.events.values())
            rx = {e["id"] for e in got if e["event"] == "reception"}
            dl = {(e["id"], e["rcpt"]) for e in got if e["event"] == "delivery"}
            return ([q for q in acked if q not in rx],
                    [(q, a) for q, rs in acked.items() for a in rs if (q, a) not in dl])
        # pending 0 and an empty spool can still come a moment before the
        # last commit's sync publishes its events: wait for them (bounded)
        try:
            wait_until(lambda: missing() == ([], []), 60, "every event at the webhook")
        except AssertionError:
            pass  # told below, with what the runs logged
        no_rx, no_dl = missing()
        with rec.lock:
            # a number given again after a kill: the sink's consumer,
            # keeping the first copy of each event_id, loses the other
            assert not rec.clashes, f"one event_id, two events: {rec.clashes[:2]}"
        # A start used to trim the journal before its sinks were listed
        # (the pump copying a crash's backlog): segments the sink's
        # cursor was in were deleted, logged as events_backlog_dropped
        # (or lost silently without a stored cursor).
        dropped = [x for x in logs + node.d.lines if "events_backlog_dropped" in x]
        assert not dropped, f"events dropped: {dropped[0]}"
        if no_rx or no_dl:
            with rec.lock:
                seqs = sorted(int(e.split("-")[1]) for e in rec.events)
            gaps = [(a, b) for a, b in zip(seqs, seqs[1:]) if b != a + 1]
            print(f"     event numbers 0..{seqs[-1]}: {len(seqs)} received, gaps {gaps[:10]}")
            for x in logs + node.d.lines:
                if "events_journal" in x or "events_lost" in x or "skip" in x:
                    print(f"     log: {x}")
            # what was told of the first few messages short of an event
            # and what the runs logged of them
            ids = sorted({q for q in no_rx} | {q for q, _ in no_dl})[:3]
            with rec.lock:
                for e in rec.events.values():
                    if e.get("id") in ids:
                        print(f"     event: {e}")
            for x in logs + node.d.lines:
                if any(q in x for q in ids) or "event=start" in x or "event=ready" in x:
                    print(f"     log: {x}")
        assert not no_rx, f"{len(no_rx)} acknowledged messages without reception, e.g. {no_rx[:5]}"
        assert not no_dl, f"{len(no_dl)} recipients without delivery event, e.g. {no_dl[:5]}"
        with rec.lock:
            # a request a kill cut short fails its check: one a kill at most
            assert rec.bad_signatures <= len(kills), f"{rec.bad_signatures} badly signed"
            seen = {}
            for eid, ev in rec.events.items():
                seen.setdefault(test_events.key(ev), set()).add(eid)
            twice = [k for k, v in seen.items() if len(v) != 1]
            assert not twice, f"one event under several event_ids: {twice[:3]}"
            # a copy sent again: the one before it came shortly before a kill
            late, worst, dups = [], 0.0, 0
            for eid, times in rec.copies.items():
                for a, b in zip(times, times[1:]):
                    dups += 1
                    # (a request the daemon sent just before its kill may
                    # be read a moment after it)
                    between = [k for k in kills if a - 0.2 <= k <= b]
                    gap = max(0.0, between[0] - a) if between else None
                    if gap is None or gap > 3.0:
                        late.append((eid, gap))
                    else:
                        worst = max(worst, gap)
        print(f"     {len(rec.events)} events, {dups} copies sent again, the oldest "
              f"{worst:.2f}s before its kill")
        if late:
            eid = late[0][0]
            t0 = rec.copies[eid][0]
            print(f"     {eid}: copies at {[round(t - t0, 3) for t in rec.copies[eid]]}, "
                  f"kills at {[round(k - t0, 3) for k in kills if abs(k - t0) < 5]}, "
                  f"SIGHUPs at {[round(k - t0, 3) for k in hup_at if abs(k - t0) < 5]}")
        assert not late, f"{len(late)} events sent again long after they were acknowledged: " \
                         f"{late[:5]}"
    finally:
        os.environ.pop("SLUICE_TEST_EVENTS_SEGMENT", None)
        stop.set()
        node.close()
        rec.stop()


if __name__ == "__main__":
    main([test_kill9_under_load_loses_no_event])
