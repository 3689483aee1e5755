"""The Debian package, built once and checked as an operator would use it.

1. `dpkg-buildpackage -b -us -uc` in a copy of the sources (one build;
   every check below uses its .deb); lintian reports no error;
2. `dpkg -i` on this machine: the binaries, the conffile, the unit, the
   logrotate snippet and the man pages are in their places, the sluice
   system user and group exist and own /var/lib/sluice and /var/log/sluice;
   `systemd-analyze verify` accepts the unit;
3. the installed sluice is started on the installed /etc/sluice/sluice.conf
   as the unit would start it (no systemd runs here): as user sluice with
   only CAP_NET_BIND_SERVICE, /run/sluice made as RuntimeDirectory= makes
   it; a message sent to it on port 587 is accepted, logged in
   /var/log/sluice/delivery.jsonl and counted by sluicectl on
   /run/sluice/stats.sock; the status page answers on 127.0.0.1:9187;
   logrotate with the installed snippet renames the delivery log and
   sluice writes the next event into a new file;
4. `dpkg -r` keeps the conffile, `dpkg --purge` removes everything else but
   the sluice user and group (Debian policy keeps them).

The recipient is an address literal on loopback: the packaged config does
not allow loopback targets, so the message is refused as a target, and no
DNS query or connection leaves the machine.

Skipped (77) without the Debian build tools, when not root, when a sluice
package is already installed (it is never replaced), or when the ports of
the packaged config (587, 9187) are taken.

    test_package.py SOURCE_DIR [WORK_DIR]
"""
import gzip
import json
import os
import pwd
import grp
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

SKIP = 77
SRC = os.path.abspath(sys.argv[1])
WORK = sys.argv[2] if len(sys.argv) > 2 else None


def skip(why):
    print(f"SKIP: {why}")
    sys.exit(SKIP)


def run(cmd, timeout=600, check=True, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stdout[-3000:]}"
                             f"{p.stderr[-3000:]}")
    return p


def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def port_busy(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return False
        except OSError:
            return True


def installed(pkg):
    p = run(["dpkg-query", "-W", "-f=${Status}", pkg], check=False)
    return p.returncode == 0 and "installed" in p.stdout and "not-installed" not in p.stdout


def dpkg(*args):
    """dpkg, waiting for the lock that apt-get of another process may hold."""
    for _ in range(60):
        p = run(["dpkg", *args], check=False, timeout=300)
        if p.returncode == 0 or "lock" not in (p.stderr + p.stdout).lower():
            break
        time.sleep(5)
    if p.returncode != 0:
        raise AssertionError(f"dpkg {' '.join(args)}: exit {p.returncode}\n{p.stdout}{p.stderr}")
    return p


def copy_sources(dst):
    """The files git knows (tracked, and new ones not ignored), else the tree
    without build directories."""
    p = run(["git", "-C", SRC, "ls-files", "-co", "--exclude-standard", "-z"], check=False)
    if p.returncode == 0 and p.stdout:
        for rel in p.stdout.split("\0"):
            if not rel or not os.path.lexists(os.path.join(SRC, rel)):
                continue
            os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(os.path.join(SRC, rel), os.path.join(dst, rel), follow_symlinks=False)
    else:
        shutil.copytree(SRC, dst, symlinks=True, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("build*", "node_modules", ".git", "var"))


def build(tmp):
    src = os.path.join(tmp, "sluice")
    os.makedirs(src)
    copy_sources(src)
    env = dict(os.environ, DEB_BUILD_OPTIONS="nocheck parallel=2")
    t0 = time.monotonic()
    with open(os.path.join(tmp, "build.log"), "w") as log:
        p = subprocess.run(["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=src, env=env,
                           stdout=log, stderr=subprocess.STDOUT, timeout=1500)
    if p.returncode != 0:
        with open(os.path.join(tmp, "build.log")) as f:
            raise AssertionError(f"dpkg-buildpackage failed:\n{f.read()[-4000:]}")
    debs = [f for f in os.listdir(tmp) if re.fullmatch(r"sluice_[^_]+_[a-z0-9]+\.deb", f)]
    assert len(debs) == 1, os.listdir(tmp)
    print(f"     built {debs[0]} in {time.monotonic() - t0:.0f}s")
    changes = [f for f in os.listdir(tmp) if f.endswith(".changes")]
    return os.path.join(tmp, debs[0]), os.path.join(tmp, changes[0])


def check_lintian(deb):
    if shutil.which("lintian") is None:
        print("     lintian not installed: not checked")
        return
    p = run(["lintian", "--no-tag-display-limit", "--display-info", deb], check=False,
            timeout=600)
    out = p.stdout + p.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("E:")]
    tags = [ln for ln in out.splitlines() if ln[:2] in ("E:", "W:", "I:", "N:")]
    for ln in tags:
        print(f"     lintian {ln}")
    print(f"     lintian: exit {p.returncode}, {len(errors)} errors, {len(tags)} tags")
    assert "internal error" not in out.lower() and p.returncode in (0, 1), out[-2000:]
    assert not errors, "lintian errors:\n" + "\n".join(errors)


EXPECTED = ["./usr/sbin/sluice", "./usr/sbin/sluice-spool", "./usr/bin/sluicectl",
            "./etc/sluice/sluice.conf", "./lib/systemd/system/sluice.service",
            "./etc/logrotate.d/sluice", "./usr/share/man/man8/sluice.8.gz",
            "./usr/share/man/man8/sluice-spool.8.gz", "./usr/share/man/man5/sluice.conf.5.gz",
            "./usr/share/man/man1/sluicectl.1.gz",
            "./usr/share/doc/sluice/examples/grafana/sluice-dashboard.json",
            "./usr/share/doc/sluice/examples/prometheus/sluice-alerts.yml"]


def check_contents(deb):
    listing = run(["dpkg-deb", "-c", deb]).stdout
    paths = {ln.split()[-1] if " -> " not in ln else ln.split(" -> ")[0].split()[-1]
             for ln in listing.splitlines()}
    missing = [p for p in EXPECTED if p not in paths]
    assert not missing, f"not in the package: {missing}\n{listing}"
    conffiles = run(["dpkg-deb", "-f", deb, "Package"]).stdout.strip()
    assert conffiles == "sluice"
    with tempfile.TemporaryDirectory() as d:
        run(["dpkg-deb", "-e", deb, d])
        with open(os.path.join(d, "conffiles")) as f:
            cf = f.read().split()
        assert "/etc/sluice/sluice.conf" in cf, cf
    check_doc_paths(deb, paths)


def check_doc_paths(deb, paths):
    """Every /usr/share/doc/sluice/ file the unit and the man pages name
    is in the package under that name (dh_compress renames what it
    compresses: the unit pointed at sluicectl.md, installed as .md.gz)."""
    have = {p.rstrip("/") for p in paths}
    named = set()
    with tempfile.TemporaryDirectory() as d:
        run(["dpkg-deb", "-x", deb, d])
        texts = []
        with open(os.path.join(d, "lib/systemd/system/sluice.service")) as f:
            texts.append(f.read())
        for sec in ("man1", "man5", "man8"):
            mdir = os.path.join(d, "usr/share/man", sec)
            for name in os.listdir(mdir):
                with gzip.open(os.path.join(mdir, name), "rt") as f:
                    texts.append(f.read())
        for t in texts:
            named.update(m.rstrip(".),") for m in re.findall(r"/usr/share/doc/sluice/[\w./-]*", t))
    missing = sorted(n for n in named if "." + n.rstrip("/") not in have)
    assert named and not missing, f"named but not in the package: {missing}"


class Daemon:
    """The installed sluice, started as sluice.service would start it."""

    def __init__(self):
        os.makedirs("/run/sluice", exist_ok=True)   # RuntimeDirectory=sluice
        os.chmod("/run/sluice", 0o750)
        os.chown("/run/sluice", pwd.getpwnam("sluice").pw_uid, grp.getgrnam("sluice").gr_gid)
        self.log = tempfile.NamedTemporaryFile(prefix="sluice-pkg-log-", delete=False)
        # User=, Group=, AmbientCapabilities=CAP_NET_BIND_SERVICE,
        # NoNewPrivileges=yes, UMask=0027.
        cmd = ["setpriv", "--reuid=sluice", "--regid=sluice", "--init-groups",
               "--inh-caps=-all,+net_bind_service", "--ambient-caps=+net_bind_service",
               "--bounding-set=-all,+net_bind_service", "--no-new-privs",
               "/usr/sbin/sluice", "-c", "/etc/sluice/sluice.conf"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, preexec_fn=lambda: os.umask(0o027),
                                     cwd="/")
        wait_until(lambda: "event=ready" in self.text() or self.proc.poll() is not None, 60,
                   "the installed sluice to be ready")
        assert self.proc.poll() is None, f"sluice exited {self.proc.returncode}:\n{self.text()}"

    def text(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("the installed sluice did not drain on SIGTERM")
        rc = self.proc.returncode
        os.unlink(self.log.name)
        return rc


def events(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def send(n):
    with smtplib.SMTP("127.0.0.1", 587, timeout=30) as s:
        s.ehlo("pkgtest.localdomain")
        s.sendmail("", ["postmaster@[127.0.0.1]"],
                   f"From: t@example.com\r\nSubject: package test {n}\r\n\r\nhello {n}\r\n")


def test_package():
    for tool in ("dpkg-buildpackage", "dh", "fakeroot", "setpriv"):
        if shutil.which(tool) is None:
            skip(f"{tool} not installed (tools/install-deps --test)")
    if os.geteuid() != 0:
        skip("dpkg -i needs root")
    if installed("sluice"):
        skip("a sluice package is installed on this machine: not replaced by a test")
    for port in (587, 9187):
        if port_busy(port):
            skip(f"port {port} of the packaged config is taken")

    tmp = tempfile.mkdtemp(prefix="sluice-pkg-", dir=WORK)
    daemon = None
    try:
        deb, _ = build(tmp)
        if WORK is not None:  # kept beside the test's output, for whoever wants it
            shutil.copy2(deb, WORK)
        check_contents(deb)
        check_lintian(deb)

        dpkg("-i", deb)
        # Enabled as Debian enables daemons (no systemd runs here to start it).
        assert os.path.lexists("/etc/systemd/system/multi-user.target.wants/sluice.service")
        u = pwd.getpwnam("sluice")
        assert u.pw_uid < 1000 and u.pw_shell.endswith("nologin"), u
        assert grp.getgrgid(u.pw_gid).gr_name == "sluice"
        for d in ("/var/lib/sluice", "/var/log/sluice"):
            st = os.stat(d)
            assert st.st_uid == u.pw_uid and (st.st_mode & 0o7777) == 0o750, (d, st)
        p = run(["systemd-analyze", "verify", "/lib/systemd/system/sluice.service"], check=False)
        assert p.returncode == 0, f"systemd-analyze verify: {p.stdout}{p.stderr}"
        p = run(["man", "-w", "5", "sluice.conf"], check=False)
        assert p.returncode == 0 and p.stdout.startswith("/usr/share/man/man5/"), p.stdout

        daemon = Daemon()
        send(1)
        dlog = "/var/log/sluice/delivery.jsonl"
        got = wait_until(lambda: [e for e in events(dlog) if e.get("event") == "reception"],
                         30, "the reception event in the delivery log")
        assert got[0].get("rcpt_count") == 1, got
        st = os.stat(dlog)
        assert st.st_uid == u.pw_uid and not st.st_mode & 0o007, oct(st.st_mode)
        # The refused target is the message's outcome: nothing left the machine.
        wait_until(lambda: [e for e in events(dlog) if e.get("event") in ("bounce", "delivery",
                                                                           "transient_failure")],
                   60, "the recipient's outcome")
        p = run(["sluicectl", "--json", "stats"])
        stats = json.loads(p.stdout)
        assert stats["counters"]["received_msgs"] == 1, stats["counters"]
        with urllib.request.urlopen("http://127.0.0.1:9187/", timeout=10) as r:
            assert r.status == 200 and b"sluice" in r.read()

        # Rotation with the installed snippet: renamed, then SIGHUP.
        state = os.path.join(tmp, "logrotate.state")
        run(["logrotate", "-f", "-s", state, "/etc/logrotate.d/sluice"])
        assert os.path.exists(dlog + ".1"), os.listdir("/var/log/sluice")
        wait_until(lambda: "event=sighup" in daemon.text(), 30, "sluice to get SIGHUP")
        # The snippet has nocreate: the new file is sluice's, made as it
        # reopened the path.
        wait_until(lambda: os.path.exists(dlog), 30, "sluice to reopen the delivery log")
        st = os.stat(dlog)
        assert st.st_uid == u.pw_uid and (st.st_mode & 0o777) == 0o640, oct(st.st_mode)
        send(2)
        wait_until(lambda: [e for e in events(dlog) if e.get("event") == "reception"], 30,
                   "the next event in the new delivery log")
        assert len([e for e in events(dlog + ".1") if e.get("event") == "reception"]) == 1

        rc = daemon.stop()
        daemon = None
        assert rc == 0, f"the installed sluice exited {rc} after SIGTERM"

        files = [f for f in run(["dpkg", "-L", "sluice"]).stdout.split("\n")
                 if f and os.path.isfile(f)]
        dpkg("-r", "sluice")
        assert os.path.exists("/etc/sluice/sluice.conf"), "remove must keep the conffile"
        assert not os.path.exists("/usr/sbin/sluice")
        dpkg("--purge", "sluice")
        left = [f for f in files if os.path.lexists(f)]
        left += [d for d in ("/etc/sluice", "/var/lib/sluice", "/var/log/sluice", "/run/sluice",
                             "/etc/logrotate.d/sluice") if os.path.lexists(d)]
        for root in ("/etc/systemd", "/var/lib/systemd/deb-systemd-helper-enabled"):
            for dirpath, dirnames, filenames in os.walk(root):
                left += [os.path.join(dirpath, f) for f in filenames + dirnames if "sluice" in f]
        assert not left, f"left after purge: {left}"
        pwd.getpwnam("sluice")  # policy: the user stays
        print("     installed, ran, rotated, removed and purged")
    finally:
        if daemon is not None:
            daemon.proc.kill()
            daemon.proc.wait()
        if installed("sluice") or os.path.exists("/etc/sluice/sluice.conf"):
            dpkg("--purge", "sluice")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        test_package()
    except AssertionError as e:
        print(f"FAIL test_package: {e}")
        sys.exit(1)
    print("ok   test_package")
