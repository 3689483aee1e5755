"""Sites: domains whose MX records name the same hosts share connections
(MX rollup), within a cap per MX address, and a site's concurrency
adapts. Real servers on loopback: dnsmasq for the MX records, smtp-sink as
the receiver; connections are counted from the kernel's table
(/proc/net/tcp), not from sluice's word."""
import os
import sys
import threading
import time

from harness import main, run, skip, wait_until
from test_delivery import Relay, records_for


def established_to(port):
    """Established TCP connections to 127.0.0.1:port, from the kernel."""
    n = 0
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[2] == want and cols[3] == "01":
                n += 1
    return n


class Sampler:
    """The most connections open at once to a port, sampled every 5 ms
    until stopped."""

    def __init__(self, port):
        self.port, self.most, self.stopped = port, 0, False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stopped:
            self.most = max(self.most, established_to(self.port))
            time.sleep(0.005)

    def stop(self):
        self.stopped = True
        self.t.join(5)
        return self.most


def test_domains_behind_one_mx_share_its_connections():
    """60 domains, one MX host, 5 messages each: without sites each domain
    opens connections of its own (60 at least); with them the site's
    connections carry every domain's transactions, and the address never
    has more than its cap (4 across the node's two workers)."""
    doms = [f"d{i}.test" for i in range(60)]
    r = Relay(records_for(doms),
              domain_conf="[delivery]\nmax_connections_per_address = 4\n")
    try:
        s = Sampler(r.mx_port)
        msgs = [("s@example.com", [f"u{k}@{d}"], b"Subject: t\r\n\r\nrollup\r\n")
                for k in range(5) for d in doms]
        r.inject(msgs, sessions=4)
        r.d.wait_log_count("event=delivered", len(msgs), timeout=120)
        most = s.stop()
        opened = r.d.count_log("event=connected")
        assert most <= 4, f"{most} connections at once to one address (cap 4)"
        assert opened < len(doms), f"{opened} connections for {len(doms)} domains: not shared"
        assert r.d.count_log("event=delivered") == len(msgs)
    finally:
        r.close()


def test_a_refusing_address_shrinks_the_window():
    """An MX host that refuses connections: the site's window halves (a
    logged event) and the recipients are deferred, not bounced."""
    doms = ["down.test"]
    r = Relay(records_for(doms), with_sink=False)
    try:
        r.inject([("s@example.com", ["u@down.test"], b"Subject: t\r\n\r\nx\r\n")])
        line = r.d.wait_log("event=site_window_down", timeout=30)
        assert "reason=not_ready" in line and "site=mx.test:" in line, line
        line = r.d.wait_log("event=deferred", timeout=30)
        assert "class=connection_failure" in line, line
        assert r.d.count_log("event=bounced") == 0
    finally:
        r.close()


if __name__ == "__main__":
    if run(["which", "dnsmasq"]).returncode != 0 and not os.path.exists("/usr/sbin/dnsmasq"):
        skip("dnsmasq not installed (tools/install-deps --test)")
    main([test_domains_behind_one_mx_share_its_connections,
          test_a_refusing_address_shrinks_the_window])
