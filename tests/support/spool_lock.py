"""spool_lock: a process that holds a spool's LMDB write lock, so that the
daemon's next commit hangs as it would on a dead disk, for the integration
tests of what waits on such a commit (test_dkim, test_mta_sts).

mdb_load (lmdb-utils) takes the write lock once it has read a dump's
header, then waits for records that never come until its input is closed:
release() closes it (mdb_load commits nothing and lets go), stop() kills it
by its PID. writer_waits_for_lock() tells when the daemon's spool writer is
blocked behind it.

    from spool_lock import SpoolWriteLock, writer_waits_for_lock
    hold = SpoolWriteLock(os.path.join(workdir, "spool"))
    try:
        wait_until(lambda: writer_waits_for_lock(daemon_pid), 30, "...")
        ...
        assert hold.release() == 0
    finally:
        hold.stop()

Needs mdb_load on PATH (have_mdb_load(); tools/install-deps --test).
"""
import os
import platform
import shutil
import signal
import subprocess

# The header of an empty dump of one named database, mdb_dump's format.
_HEADER = b"VERSION=3\nformat=bytevalue\ntype=btree\nHEADER=END\n"


def have_mdb_load():
    return shutil.which("mdb_load") is not None


class SpoolWriteLock:
    """mdb_load on the spool directory spool (its database "rcpt"),
    holding the write lock from shortly after it starts: a writer of the
    daemon waits behind it (see writer_waits_for_lock) until release() or
    stop()."""

    def __init__(self, spool):
        self.proc = subprocess.Popen(["mdb_load", "-s", "rcpt", spool],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        try:
            self.proc.stdin.write(_HEADER)
            self.proc.stdin.flush()
        except OSError:
            self.stop()
            raise

    def release(self, timeout=30):
        """Closes mdb_load's input: it commits nothing and exits. Returns
        its exit status (0), once it exited (within timeout s)."""
        self.proc.stdin.close()
        rc = self.proc.wait(timeout=timeout)
        self.pid = None
        return rc

    def stop(self):
        """Kills mdb_load by its PID if it still runs, and reaps it. Safe
        to call more than once, and after release()."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.pid = None
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass


# futex(2)'s number as /proc/PID/task/TID/syscall prints it: x86_64's
# table, else the generic one (aarch64, riscv64)
FUTEX_NR = "202" if platform.machine() == "x86_64" else "98"


def writer_waits_for_lock(pid):
    """Whether the spool's writer thread (sluice-queue) of sluice pid is
    blocked on LMDB's write lock: in futex(2) on an address inside its
    lock.mdb mapping (/proc/PID/maps; /proc/PID/task/TID/syscall: the
    syscall number, then its arguments)."""
    spans = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if line.rstrip().endswith("/lock.mdb"):
                lo, hi = line.split()[0].split("-")
                spans.append((int(lo, 16), int(hi, 16)))
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() != "sluice-queue":
                    continue
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                sc = f.read().split()
        except OSError:
            continue
        if len(sc) > 1 and sc[0] == FUTEX_NR and any(lo <= int(sc[1], 16) < hi for lo, hi in spans):
            return True
    return False
