"""A private Postfix instance for tests and benchmarks: its own main.cf and
master.cf in a temporary directory, its queue there, its smtpd on
127.0.0.1:port, started as `master -d` in a session of its own and
stopped by PID (SIGTERM, then SIGKILL to its process group).

The caller gives the main.cf lines that make it what it needs (where mail
goes, what it bounces); the lines every instance needs (its directories,
its owner, loopback only, no TLS, a log file of its own) are written
first. Needs root (master drops privileges to mail_owner) and Postfix:
PrivatePostfix.missing() says why not, or None."""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

DAEMON_DIR = "/usr/lib/postfix/sbin"

MASTER_CF = """cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def _connectable(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class PrivatePostfix:
    """smtpd on 127.0.0.1:port; main_cf: the caller's main.cf lines, after
    the common ones (a later line of the same name wins in Postfix);
    parent: the directory its own is made in (None: the system's temp)."""

    @staticmethod
    def missing():
        if os.geteuid() != 0:
            return "a private Postfix instance needs root"
        if not os.path.exists(f"{DAEMON_DIR}/master") or shutil.which("postconf") is None:
            return "postfix not installed (tools/install-deps --test)"
        return None

    def __init__(self, port, myhostname, main_cf, parent=None, start_timeout=20):
        why = self.missing()
        if why is not None:
            raise RuntimeError(why)
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="sluice-postfix-", dir=parent)
        self.proc = None
        self.queue = os.path.join(self.dir, "queue")
        etc = os.path.join(self.dir, "etc")
        self.maillog = os.path.join(self.dir, "maillog")
        try:
            self._start(etc, myhostname, main_cf, start_timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, etc, myhostname, main_cf, start_timeout):
        port = self.port
        os.chmod(self.dir, 0o755)
        os.makedirs(etc)
        with open(os.path.join(etc, "main.cf"), "w") as f:
            f.write(f"""compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.dir}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = {myhostname}
mynetworks = 127.0.0.0/8
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file = {self.maillog}
maillog_file_prefixes = {self.dir}
smtputf8_enable = no
biff = no
{main_cf}
""")
        with open(os.path.join(etc, "master.cf"), "w") as f:
            f.write(f"127.0.0.1:{port} inet n - n - - smtpd\n" + MASTER_CF)
        os.makedirs(os.path.join(self.dir, "data"))
        shutil.chown(os.path.join(self.dir, "data"), "postfix")
        subprocess.run([f"{DAEMON_DIR}/post-install", f"config_directory={etc}",
                        "meta_directory=/etc/postfix", "command_directory=/usr/sbin",
                        f"daemon_directory={DAEMON_DIR}", "create-missing"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Its own session: master signals its whole process group when
        # it stops, which must not be the caller's.
        self.proc = subprocess.Popen([f"{DAEMON_DIR}/master", "-c", etc, "-d"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + start_timeout
        while not _connectable(port) and self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"Postfix's smtpd not listening on {port} after "
                                     f"{start_timeout} s: {self.log()[-2000:]}")
            time.sleep(0.05)
        if self.proc.poll() is not None:
            raise AssertionError(f"postfix master exited {self.proc.returncode}: "
                                 f"{self.log()[-2000:]}")

    def log(self):
        try:
            with open(self.maillog, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def queued(self):
        """Queue files not yet delivered (maildrop, incoming, active,
        deferred, hold): 0 once everything accepted has left."""
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _root, _dirs, files in os.walk(os.path.join(self.queue, sub)):
                n += len(files)
        return n

    def stop(self):
        """master by SIGTERM (it signals its group), then what is left of
        its group (its session: master's pid) by SIGKILL, waited for
        until none is left (master does not wait for its children: one
        still exiting could write into the directory being removed),
        then the directory."""
        try:
            if self.proc is not None:
                if self.proc.poll() is None:
                    self.proc.send_signal(signal.SIGTERM)
                    try:
                        self.proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        pass
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    try:
                        os.killpg(self.proc.pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.02)
        finally:
            if os.environ.get("KEEP_TMP") != "1":
                shutil.rmtree(self.dir, ignore_errors=True)
