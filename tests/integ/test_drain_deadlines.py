"""A stop's drain and the deadlines already running: a submission session
that was closing before the drain began (its last reply, a 421, unable to
leave: the client stopped reading) keeps its deadline; the drain may only
bring it nearer (engine/server_worker.c server_on_drain: never later than the
deadline it has). With a drain_timeout longer than timeout_command, the
drain's own bound for a closing session (closing_deadline: timeout_command
from the drain, or what is left of the drain) is later than the deadline
the session had, by the time it had spent closing; taken as it is, a
client that stopped reading would hold its session, and the stop, that
much longer.

(Outbound connections have no deadline of the drain: delivery's drain
says QUIT to the idle ones, and a QUIT to a session already closed is no
event, tests/client/test_smtp_client.c, so nothing is armed again.)

Each test starts its own sluice (test_hostile_client.sluice: own spool and
ports, delivery off) and stops it."""
import os
import signal
import subprocess
import time

from harness import Smtp, log_fields, log_time, main, spool_messages
from test_hostile_client import deaf_client, envelope, held_message, sluice


def test_drain_keeps_a_closing_sessions_earlier_deadline():
    """A client pipelines NOOPs and never reads: sluice stops reading it,
    its command times out (event=timeout) and the session closes with a
    421 that cannot leave: it has timeout_command (10 s) for that. The
    stop comes 4 s later, with a drain_timeout of 60 s: the session must
    still end 10 s after its timeout, not 10 s after the stop (14 s after
    its timeout), and the drain then ends done (the session was all it
    waited for) and sluice exits 0."""
    command_s, aged_s = 10, 4
    with sluice(f"timeout_command = {command_s}s\ndrain_timeout = 60s\n"
                "max_junk_commands = 1000000000\n", workers=1) as d:
        deaf = deaf_client(d)
        try:
            timed_out = d.wait_log("event=timeout", timeout=command_s + 30)
            sid = dict(log_fields(timed_out))["session"]
            # The session ages in its closing state before the stop: the
            # quantity under test (not a wait for anything to happen).
            time.sleep(aged_s)
            assert d.count_log(f"session={sid} event=disconnect") == 0, \
                "closed before the stop: nothing left to test"
            t_term = time.monotonic()
            d.signal(signal.SIGTERM)
            rc = d.proc.wait(60)
            took = time.monotonic() - t_term
        finally:
            deaf.close()
        d.reader.join(5)
        assert rc == 0, "\n".join(d.lines[-20:])
        closed = d.log_lines(f"session={sid} event=disconnect")
        assert len(closed) == 1, d.lines[-20:]
        held = log_time(closed[0]) - log_time(timed_out)
        print(f"     closed {held:.2f}s after its timeout (timeout_command {command_s}s, "
              f"the stop {aged_s}s after the timeout); sluice gone {took:.2f}s after SIGTERM")
        # Its own deadline: timeout_command after the timeout. The drain's
        # would have been aged_s later.
        assert command_s - 0.5 <= held < command_s + aged_s / 2, \
            f"the closing session ended {held:.2f}s after its timeout, not {command_s}s: " \
            "the drain moved its deadline"
        assert d.count_log("event=drain_done") == 1, d.log_lines("event=drain_")
        # the stop came while it was closing (not after it had gone)
        (stopping,) = d.log_lines("event=stopping")
        assert log_time(stopping) < log_time(closed[0]), (stopping, closed[0])


def test_drain_timeout_is_a_time_on_the_clock():
    """drain_timeout bounds the drain in time: its wait for the workers
    counted 20 ms per sleep, so each sleep's lateness added up (32 s for
    the 30 s default on a loaded machine) and a process stopped
    meanwhile (SIGSTOP here, as a paused VM or an overloaded host) went
    on draining for all of drain_timeout after it resumed: 3 s + 5 s. A
    commit held 12 s (SLUICE_TEST_COMMIT_DELAY) holds the drain; once the
    process resumes 5 s after the stop, the drain has timed out: at once,
    not drain_timeout later (timed from the resume, which the test knows,
    so that the latency of its look at the log before the pause is not
    counted)."""
    drain_s, paused_s = 3, 5
    with sluice(f"drain_timeout = {drain_s}s\n",
                env={"SLUICE_TEST_COMMIT_DELAY": "12000"}) as d:
        d.wait_log("event=test_hook name=SLUICE_TEST_COMMIT_DELAY")
        pending = held_message(d, b"Subject: held\r\n\r\nheld by the spool\r\n.\r\n")
        try:
            d.signal(signal.SIGTERM)
            stopping = d.wait_log("event=stopping")
            draining = d.wait_log("event=draining")  # the drain's deadline is set
            paused = time.time()  # UTC seconds since the epoch, as log_time
            d.signal(signal.SIGSTOP)
            # the pause under test (not a wait for anything to happen)
            time.sleep(paused_s)
            resumed = time.time()
            d.signal(signal.SIGCONT)
            timed_out = d.wait_log("event=drain_timed_out", timeout=30)
        finally:
            d.signal(signal.SIGCONT)
            pending.close()
        took = log_time(timed_out) - log_time(stopping)
        after = log_time(timed_out) - resumed
        print(f"     drain ended {took:.2f}s after the stop, {after:.2f}s after the resume "
              f"(drain_timeout {drain_s}s, stopped for {paused_s}s)")
        # The fault drains for what was left of drain_timeout at the pause
        # (drain_s - prepause) after the resume; the fix ends it at once.
        # Half of what was left tells them apart, if the test's look at
        # the log before the pause left enough.
        prepause = paused - log_time(draining)
        left = drain_s - prepause
        if left < 0.6:
            print(f"     not conclusive: {prepause:.2f}s of drain_timeout had gone at the pause")
            return
        assert after < left / 2, \
            f"the drain ended {after:.2f}s after the resume ({took:.2f}s after the stop, " \
            f"{left:.2f}s of drain_timeout left at the pause): drain_timeout counted past the pause"


def test_a_second_sigterm_ends_the_drain():
    """A second SIGTERM (or Ctrl-C again) during the drain ends it at
    once, logged event=drain_cut, as drain_timeout running out would: the
    stop goes on and exits 0. Before, it waited, blocked, for all of
    drain_timeout (60 s here), held by a client that does not read its
    421. A message accepted before the stop is in the spool after it."""
    drain_s = 60
    with sluice(f"drain_timeout = {drain_s}s\nmax_junk_commands = 1000000000\n",
                workers=1) as d:
        c = Smtp(d.port, timeout=30)
        envelope(c)
        c.expect(b"Subject: kept\r\n\r\naccepted before the stop\r\n.", 250)
        c.expect("QUIT", 221)
        c.close()
        deaf = deaf_client(d)
        try:
            d.signal(signal.SIGTERM)
            d.wait_log("event=shutting_down")  # its 421 cannot leave: the drain waits
            t0 = time.monotonic()
            d.signal(signal.SIGTERM)
            try:
                rc = d.proc.wait(20)
            except subprocess.TimeoutExpired:
                raise AssertionError("a second SIGTERM did not end the drain")
            took = time.monotonic() - t0
        finally:
            deaf.close()
        d.reader.join(5)
        assert rc == 0, "\n".join(d.lines[-20:])
        print(f"     gone {took:.2f}s after the second SIGTERM (drain_timeout {drain_s}s)")
        (cut,) = d.log_lines("event=drain_cut")
        assert "signal=TERM" in cut and f"sender_pid={os.getpid()}" in cut, cut
        assert not d.log_lines("event=drain_timed_out") and not d.log_lines("event=drain_done")
        (m,) = spool_messages(d.spool)
        assert b"accepted before the stop" in m["body"]


def test_a_sighup_during_the_drain_is_logged_not_done():
    """A SIGHUP during the drain (60 s here, held by a client that does
    not read its 421) was never taken: the main thread waited for a
    second TERM or INT only, and the HUP stayed pending, unseen, to the
    exit: neither done nor logged. Now it is logged as not done
    (event=reload_ignored reason=draining, with its sender) and the drain
    goes on as before: no reload, no log reopened, still draining until
    the second SIGTERM cuts it."""
    with sluice("drain_timeout = 60s\nmax_junk_commands = 1000000000\n", workers=1) as d:
        deaf = deaf_client(d)
        try:
            d.signal(signal.SIGTERM)
            d.wait_log("event=shutting_down")  # its 421 cannot leave: the drain waits
            d.signal(signal.SIGHUP)
            ignored = d.wait_log("event=reload_ignored", timeout=10)
            assert d.proc.poll() is None, "the SIGHUP ended the process"
            ended = [ln for ln in d.log_lines("event=drain_")
                     if "event=drain_sealed" not in ln]  # sealed: the drain's start
            assert not ended, ended
            d.signal(signal.SIGTERM)
            try:
                rc = d.proc.wait(20)
            except subprocess.TimeoutExpired:
                raise AssertionError("a SIGTERM after the SIGHUP did not end the drain")
        finally:
            deaf.close()
        d.reader.join(5)
        assert rc == 0, "\n".join(d.lines[-20:])
        fields = dict(log_fields(ignored))
        assert fields.get("reason") == "draining" and fields.get("signal") == "HUP", ignored
        assert fields.get("sender_pid") == str(os.getpid()), ignored
        assert "note=the_next_start_reads_the_file" in ignored, ignored
        # not done: no reload, no reopen (the reload's lines), one line
        assert not d.log_lines("event=sighup") and not d.log_lines("event=config_reloaded"), \
            d.lines[-20:]
        assert d.count_log("event=reload_ignored") == 1
        # the drain went on to the second SIGTERM, which cut it
        (cut,) = d.log_lines("event=drain_cut")
        assert "signal=TERM" in cut, cut
        assert not d.log_lines("event=drain_timed_out") and not d.log_lines("event=drain_done")


if __name__ == "__main__":
    main([test_drain_keeps_a_closing_sessions_earlier_deadline,
          test_drain_timeout_is_a_time_on_the_clock, test_a_second_sigterm_ends_the_drain,
          test_a_sighup_during_the_drain_is_logged_not_done])
