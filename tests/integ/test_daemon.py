"""The sluice binary: --help, --version, --check-config errors with
file:line, start on a config, SIGTERM stops it within a second with exit
0, SIGHUP reopens the log file, doc/config.md matches the binary, and a
second instance on the same listen address or spool refuses to start."""
import os
import signal
import sys

from harness import Daemon, Smtp, Workdir, free_port, main, run, wait_until

SLUICE = sys.argv[1]
SOURCE = sys.argv[2]


def config(wd, extra="", server="", port=None):
    return wd.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{port or free_port()}
{server}
[delivery]
enabled = no
[queue]
path = {wd.path}/spool
map_size = 64M
[stats]
socket = {wd.path}/sluice.sock
{extra}
""")


def stop_if_running(d):
    """A failed assertion leaves no sluice behind: killed by its PID."""
    if d is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


def test_help_and_version():
    r = run([SLUICE, "--help"])
    assert r.returncode == 0 and "--check-config" in r.stdout, r
    r = run([SLUICE, "--version"])
    assert r.returncode == 0 and r.stdout.startswith("sluice "), r
    r = run([SLUICE, "--no-such-flag"])
    assert r.returncode == 2, r
    r = run([SLUICE, "stray-argument"])
    assert r.returncode == 2 and "unexpected argument" in r.stderr, r
    # the usage alone did not say what was wrong
    r = run([SLUICE, "--dkim-dns", "example.com"])
    assert r.returncode == 2 and r.stderr.startswith(
        "sluice: --dkim-dns needs a DOMAIN and a SELECTOR\n"), r
    # sluice --help says every exit status (2 and 70 were missing)
    r = run([SLUICE, "--help"])
    assert "2 on a usage error" in r.stdout and "stop_stuck" in r.stdout, r


def test_check_config_reports_every_error():
    wd = Workdir("sluice-cc-")
    try:
        path = wd.file("bad.conf", "[server]\n"
                       "workrs = 2\n"              # 2: wrong key
                       "[queue]\n"
                       "map_size = 12 parsecs\n"   # 4: bad size
                       "[domain example.com]\n"
                       "max_message_rate = 10/x\n"  # 6: bad rate
                       "max_age = 99d\n"           # 7: out of range
                       "[mx bad..host]\n"          # 8: not a pattern
                       "max_connections = 2\n"
                       "[source not-an-ip]\n"      # 10: not an address
                       "max_connections = 2\n"
                       "[mx *.ok.test]\n"
                       "max_rcpt_per_txn = many\n")  # 13: bad number
        r = run([SLUICE, "-c", path, "--check-config"])
        assert r.returncode == 1, r
        for line, what in [(2, "workrs: unknown key"), (4, "map_size: expected a size"),
                           (6, "max_message_rate: expected a rate"),
                           (7, "max_age: '99d' is out of range"),
                           (8, "[mx bad..host]: not a host name"),
                           (10, "[source not-an-ip]: not an IPv4 or IPv6 address"),
                           (13, "max_rcpt_per_txn: expected a whole number")]:
            assert f"{path}:{line}: {what}" in r.stderr, (what, r.stderr)
        good = config(wd)
        r = run([SLUICE, "-c", good, "--check-config"])
        assert r.returncode == 0 and "ok" in r.stdout, r
        r = run([SLUICE, "-c", os.path.join(wd.path, "missing.conf"), "-t"])
        assert r.returncode == 1 and "cannot read" in r.stderr, r
    finally:
        wd.cleanup()


def test_check_config_refuses_a_route_to_a_refused_literal():
    """A route to an address literal that delivery refuses as a target
    (loopback, link-local, ...) without [delivery] allow_networks would
    bounce every message routed there (refused_target): --check-config
    says so at the route's line. allow_networks makes it valid; a host
    name is left to delivery."""
    wd = Workdir("sluice-route-")
    try:
        conf = config(wd, "[domain *]\nroute = [127.0.0.1]:2526\n"
                          "[domain b.test]\nroute = [IPv6:fe80::1]:25\n"
                          "[domain c.test]\nroute = localhost:2526\n")
        r = run([SLUICE, "-c", conf, "--check-config"])
        assert r.returncode == 1, r
        errs = [x for x in r.stderr.splitlines() if ": route: " in x]
        assert len(errs) == 2, r.stderr
        assert "[127.0.0.1]:2526 is a loopback address" in errs[0], errs
        assert "allow_networks" in errs[0] and "refused_target" in errs[0], errs
        assert "[IPv6:fe80::1]:25 is a link-local address" in errs[1], errs
        conf = config(wd, "[delivery]\nallow_networks = 127.0.0.0/8, fe80::/10\n"
                          "[domain *]\nroute = [127.0.0.1]:2526\n"
                          "[domain b.test]\nroute = [IPv6:fe80::1]:25\n")
        r = run([SLUICE, "-c", conf, "--check-config"])
        assert r.returncode == 0, r
        # deny_networks refuses whatever allow_networks says
        conf = config(wd, "[delivery]\nallow_networks = 127.0.0.0/8\n"
                          "deny_networks = 127.0.0.1, 10.0.0.0/8\n"
                          "[domain *]\nroute = [127.0.0.1]:2526\n"
                          "[domain b.test]\nroute = [10.1.2.3]:25\n")
        r = run([SLUICE, "-c", conf, "--check-config"])
        assert r.returncode == 1, r
        errs = [x for x in r.stderr.splitlines() if ": route: " in x]
        assert len(errs) == 2 and all("deny_networks" in x for x in errs), r.stderr
        conf = config(wd, "[delivery]\ndeny_networks = 10.0.0.0/33\n")
        r = run([SLUICE, "-c", conf, "--check-config"])
        assert r.returncode == 1 and "deny_networks" in r.stderr, r
    finally:
        wd.cleanup()


def test_bundled_config_checks():
    r = run([SLUICE, "-c", os.path.join(SOURCE, "etc/sluice.conf"), "--check-config"])
    assert r.returncode == 0, r


def test_bundled_config_try_lines_check():
    """The lines etc/sluice.conf holds commented for a first try (STARTTLS
    and listen_tls with a self-signed certificate made by the command it
    gives, everything routed to a receiver on this machine) make a valid
    config once uncommented, with the certificate where they say."""
    wd = Workdir("sluice-try-")
    try:
        with open(os.path.join(SOURCE, "etc/sluice.conf")) as f:
            text = f.read()
        keys = ("listen_tls", "[tls]", "cert_file", "key_file", "[delivery]",
                "allow_networks", "route")
        out = []
        for line in text.splitlines():
            if line.startswith("#") and line[1:].startswith(keys):
                line = line[1:]
            out.append(line.replace("./var/", f"{wd.path}/var/"))
        got = [ln.split()[0] for ln in out if ln.startswith(keys)]
        assert got == ["listen_tls", "[tls]", "cert_file", "key_file", "route", "[delivery]",
                       "allow_networks"], got
        cmd = [ln.strip("# \\") for ln in text.splitlines() if "openssl req" in ln or
               "-keyout" in ln]
        assert len(cmd) == 2, cmd
        os.makedirs(f"{wd.path}/var")
        r = run(" ".join(cmd).split(), cwd=wd.path)
        assert r.returncode == 0, r
        conf = wd.file("try.conf", "\n".join(out) + "\n")
        r = run([SLUICE, "-c", conf, "--check-config"])
        assert r.returncode == 0, r
    finally:
        wd.cleanup()


def test_ready_line_says_where_to_find_it():
    """The ready line names the submission and implicit-TLS listeners,
    the stats socket and /metrics: what a first run needs to know to talk
    to it, without reading the config."""
    wd = Workdir("sluice-ready-")
    d = None
    try:
        port = free_port()
        conf = config(wd, f"http_listen = 127.0.0.1:{port}\n")
        listen = [ln.split("=", 1)[1].strip() for ln in open(conf) if ln.startswith("listen")]
        d = Daemon(SLUICE, conf)
        line = d.wait_log("event=ready")
        assert (f'listen="{listen[0]}" listen_tls="-" stats_socket={wd.path}/sluice.sock '
                f'metrics=127.0.0.1:{port} bounce_listen="-"') in line, line
        assert d.stop() == 0
        # the bounce listener too, when there is one (it was left out)
        key = wd.file("verp.key", "0123456789abcdef0123456789abcdef\n")
        bport = free_port()
        conf = config(wd, f"[bounce]\nverp_domain = b.example\nverp_key_file = {key}\n"
                          f"listen = 127.0.0.1:{bport}\n")
        d = Daemon(SLUICE, conf)
        line = d.wait_log("event=ready")
        assert line.endswith(f' bounce_listen="127.0.0.1:{bport}"'), line
        assert d.stop() == 0
    finally:
        stop_if_running(d)
        wd.cleanup()


def test_a_hostname_of_one_label_is_warned_of():
    """[server] hostname unset takes the system's host name, often one
    label ("vm"): every EHLO then says it, which receivers checking for a
    fully qualified name refuse. The start says so; a name with a dot is
    no warning."""
    wd = Workdir("sluice-fqdn-")
    d = None
    try:
        d = Daemon(SLUICE, config(wd, server="hostname = vm"))
        d.wait_log("event=ready")
        d.wait_log("event=hostname_not_fqdn hostname=vm key=server.hostname", timeout=10)
        assert d.stop() == 0
        d = Daemon(SLUICE, config(wd, server="hostname = mx.example.test"))
        d.wait_log("event=ready")
        assert d.stop() == 0
        assert not [ln for ln in d.lines if "hostname_not_fqdn" in ln], d.lines
    finally:
        stop_if_running(d)
        wd.cleanup()


def test_sigterm_stops_when_idle():
    """With nothing in flight the drain has nothing to wait for: exit 0
    without waiting out drain_timeout (30 s by default; the bound here is
    far below it, and far above what a slow machine needs)."""
    wd = Workdir("sluice-term-")
    try:
        d = Daemon(SLUICE, config(wd))
        d.wait_log("event=ready")
        d.signal(signal.SIGTERM)
        rc = d.proc.wait(10)
        assert rc == 0, f"exit code {rc}"
        d.wait_log("event=drain_done")
        d.wait_log("event=stopped")
        d.stop()
    finally:
        wd.cleanup()


def test_sigint_stops_too():
    wd = Workdir("sluice-int-")
    try:
        d = Daemon(SLUICE, config(wd))
        d.wait_log("event=ready")
        d.signal(signal.SIGINT)
        assert d.proc.wait(5) == 0
        d.stop()
    finally:
        wd.cleanup()


def test_sighup_reopens_log():
    wd = Workdir("sluice-hup-")
    try:
        log = os.path.join(wd.path, "sluice.log")
        d = Daemon(SLUICE, config(wd, f"[log]\nfile = {log}\nlevel = info\n"))
        wait_until(lambda: os.path.exists(log) and "event=ready" in open(log).read(), 10,
                   "ready in the log file")
        os.rename(log, log + ".1")  # what logrotate does
        d.signal(signal.SIGHUP)
        wait_until(lambda: os.path.exists(log) and "event=sighup" in open(log).read(), 10,
                   "a new log file after SIGHUP")
        assert d.stop() == 0
        assert "event=stopped" in open(log).read()
        assert "event=stopped" not in open(log + ".1").read()
    finally:
        wd.cleanup()


def test_a_crash_leaves_its_line():
    """A fatal signal (here SIGABRT and SIGSEGV sent from outside, as a
    fault or an abort in the code would raise them) writes one line of
    its own to the log (test_log checks that the workers' kept lines come
    before it), and then kills sluice as before: by that signal (a core
    dump where the system keeps them; none here: RLIMIT_CORE 0), not an
    exit of its own. The delivery log's lines not yet written go out too:
    the reception of a message queued just before, its flush interval
    (10 s) far from due."""
    import resource
    for sig, name in ((signal.SIGABRT, "ABRT"), (signal.SIGSEGV, "SEGV")):
        wd = Workdir("sluice-crash-")
        d = None
        port = free_port()
        dlog = os.path.join(wd.path, "delivery.jsonl")
        soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
        try:
            d = Daemon(SLUICE, config(wd, f"[log]\ndelivery_log = {dlog}\n"
                                          "delivery_log_flush = 10s\n",
                                      server="trusted_networks = 127.0.0.0/8", port=port))
        finally:
            resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
        try:
            d.wait_log("event=ready")
            c = Smtp(port)
            c.expect("EHLO client.example", 250)
            c.expect("MAIL FROM:<a@example.com>", 250)
            c.expect("RCPT TO:<b@example.org>", 250)
            c.expect("DATA", 354)
            r = c.expect("Subject: last\r\n\r\nqueued before the crash\r\n.", 250)
            qid = r.raw.split()[-1]
            c.sock.close()
            d.signal(sig)
            rc = d.proc.wait(10)
            d.reader.join(5)  # every line it wrote, a sanitizer's report too
            line = d.wait_log("event=fatal_signal")
            assert len([ln for ln in d.lines if "event=fatal_signal" in ln]) == 1, d.lines[-20:]
            if any("ERROR: AddressSanitizer: SEGV" in ln for ln in d.lines):
                # a sanitizer build: its own handler, put back, reports the
                # SEGV and ends the process its way (abort_on_error, or exit 1)
                assert sig == signal.SIGSEGV and rc in (-signal.SIGABRT, 1), (rc, name)
            else:
                assert rc == -sig, f"exit {rc}, not killed by SIG{name}"
            assert "level=crit" in line and f"signal={name} pid={d.proc.pid}" in line, line
            with open(dlog) as f:
                receptions = [ln for ln in f if '"event":"reception"' in ln]
            assert len(receptions) == 1 and f'"id":"{qid}"' in receptions[0], (qid, receptions)
        finally:
            if d is not None:
                stop_if_running(d)
            wd.cleanup()


def test_a_second_instance_on_the_same_port_is_refused():
    """The workers listen with SO_REUSEPORT, which a second process of the
    same user could share unnoticed (half the clients would go to it).
    A second sluice on the same listen address, with a spool of its own,
    must refuse to start and say why; the first goes on serving."""
    wd = Workdir("sluice-dup-")
    wd2 = Workdir("sluice-dup2-")
    try:
        port = free_port()
        conf = lambda w: w.file("sluice.conf", f"""
[server]
workers = 2
listen = 127.0.0.1:{port}
[delivery]
enabled = no
[queue]
path = {w.path}/spool
map_size = 64M
""")
        d = Daemon(SLUICE, conf(wd))
        d.wait_log("event=ready")
        r = run([SLUICE, "-c", conf(wd2)])
        assert r.returncode != 0, r
        assert f"listen 127.0.0.1:{port}: address in use" in r.stderr, r.stderr[-400:]
        assert d.proc.poll() is None, "the first instance died"
        assert d.stop() == 0
    finally:
        wd2.cleanup()
        wd.cleanup()


def test_a_second_instance_on_the_same_spool_is_refused():
    """Starting sluice twice on one config (the first hour's mistake) is
    refused at the spool's lock, saying so once and where the lock is;
    the first goes on serving."""
    wd = Workdir("sluice-lock-")
    d = None
    try:
        conf = config(wd)
        d = Daemon(SLUICE, conf)
        d.wait_log("event=ready")
        r = run([SLUICE, "-c", conf])
        assert r.returncode == 1, r
        (line,) = [x for x in r.stderr.splitlines() if "event=start_failed" in x]
        assert line.endswith(f'reason="spool {wd.path}/spool is in use by another process '
                             f'(lock {wd.path}/spool/sluice.lock)"'), line
        assert d.proc.poll() is None, "the first instance died"
        assert d.stop() == 0
    finally:
        stop_if_running(d)
        wd.cleanup()


def test_a_start_failure_is_said_on_stderr_when_logging_to_a_file():
    """With [log] file set, a start that fails (here: a second instance
    on the same spool) says why on stderr too, not only in the log file:
    before, the terminal (or the supervisor's journal) saw exit 1 and
    nothing else."""
    wd = Workdir("sluice-lockfile-")
    d = None
    try:
        log = os.path.join(wd.path, "sluice.log")
        conf = config(wd, f"[log]\nfile = {log}\n")
        d = Daemon(SLUICE, conf)
        wait_until(lambda: os.path.exists(log) and "event=ready" in open(log).read(), 10,
                   "ready in the log file")
        r = run([SLUICE, "-c", conf])
        assert r.returncode == 1, r
        reason = (f"spool {wd.path}/spool is in use by another process "
                  f"(lock {wd.path}/spool/sluice.lock)")
        assert f"sluice: start failed: {reason} (log: {log})" in r.stderr, r.stderr
        assert f'event=start_failed reason="{reason}"' in open(log).read()
        assert d.proc.poll() is None, "the first instance died"
        assert d.stop() == 0
    finally:
        stop_if_running(d)
        wd.cleanup()


def test_config_reference_is_current():
    r = run([SLUICE, "--config-reference"])
    assert r.returncode == 0
    with open(os.path.join(SOURCE, "doc/config.md")) as f:
        doc = f.read()
    assert doc == r.stdout, ("doc/config.md is out of date: "
                             "build/engine/sluice --config-reference > doc/config.md")


def test_classification_table_is_current():
    r = run([SLUICE, "--classify-rules"])
    assert r.returncode == 0 and r.stdout.count("\n") > 20, r.stdout[:200]
    with open(os.path.join(SOURCE, "doc/classify.md")) as f:
        doc = f.read()
    head, sep, table = doc.partition("<!-- generated: sluice --classify-rules -->\n")
    assert sep, "doc/classify.md lost its marker line"
    assert table == r.stdout, ("doc/classify.md is out of date: rerun "
                               "sluice --classify-rules below its marker line")


if __name__ == "__main__":
    main([test_help_and_version, test_check_config_reports_every_error,
          test_check_config_refuses_a_route_to_a_refused_literal,
          test_bundled_config_checks, test_bundled_config_try_lines_check,
          test_ready_line_says_where_to_find_it,
          test_a_hostname_of_one_label_is_warned_of, test_sigterm_stops_when_idle,
          test_sigint_stops_too, test_sighup_reopens_log, test_a_crash_leaves_its_line,
          test_config_reference_is_current,
          test_classification_table_is_current, test_a_second_instance_on_the_same_port_is_refused,
          test_a_second_instance_on_the_same_spool_is_refused,
          test_a_start_failure_is_said_on_stderr_when_logging_to_a_file])
