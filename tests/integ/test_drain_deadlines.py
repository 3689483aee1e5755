"""A stop's drain and the deadlines already running: a submission session
that was closing before the drain began (its last reply, a 421, unable to
leave: the client stopped reading) keeps its deadline; the drain may only
bring it nearer (engine/server.c server_on_drain: never later than the
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
import datetime
import signal
import time

from harness import log_fields, main
from test_hostile_client import deaf_client, sluice


def stamp(line):
    """The log line's time (its first word, RFC 3339 UTC with ms)."""
    return datetime.datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S.%fZ")


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
        held = (stamp(closed[0]) - stamp(timed_out)).total_seconds()
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
        assert stamp(stopping) < stamp(closed[0]), (stopping, closed[0])


if __name__ == "__main__":
    main([test_drain_keeps_a_closing_sessions_earlier_deadline])
