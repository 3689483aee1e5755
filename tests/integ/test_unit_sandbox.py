"""The packaged systemd unit's sandbox (tools/sluice.service) lets sluice
do what it does. No systemd runs here: restrict-af applies the unit's
RestrictAddressFamilies= as systemd does (a seccomp filter on socket(2)),
and sluice starts under it on a wildcard listener, which makes it read
the machine's addresses (getifaddrs(3), over netlink) to tell a
delivery to itself. With AF_NETLINK left out of the unit, that read
failed at every start and reload (event=local_addresses_unread), and an
MX naming one of the node's own non-loopback addresses was not seen as
a loop.

    test_unit_sandbox.py SLUICE SOURCE_DIR RESTRICT_AF"""
import os
import socket
import sys

from harness import Sluice, Workdir, free_port, main, skip

SLUICE = sys.argv[1]
SOURCE = sys.argv[2]
RESTRICT_AF = sys.argv[3] if len(sys.argv) > 3 else None


def unit_families():
    """The address family numbers of the unit's RestrictAddressFamilies=."""
    with open(os.path.join(SOURCE, "tools", "sluice.service")) as f:
        lines = [ln.split("=", 1)[1].split() for ln in f
                 if ln.startswith("RestrictAddressFamilies=")]
    assert len(lines) == 1, lines
    return [int(getattr(socket, name)) for name in lines[0]]


def test_sluice_reads_its_addresses_in_the_unit_sandbox():
    if RESTRICT_AF is None or not os.access(RESTRICT_AF, os.X_OK):
        skip("restrict-af not built")
    fams = ",".join(str(f) for f in unit_families())
    wd = Workdir("sluice-unit-")
    d = None
    try:
        wrapper = wd.file("sluice", f"#!/bin/sh\nexec {RESTRICT_AF} {fams} {SLUICE} \"$@\"\n")
        os.chmod(wrapper, 0o755)
        conf = wd.file("sluice.conf", f"""
[server]
workers = 1
listen = 0.0.0.0:{free_port()}
[delivery]
enabled = no
[queue]
path = {wd.path}/spool
map_size = 64M
""")
        d = Sluice(wrapper, conf)
        d.wait_log("event=ready")
        assert d.count_log("event=local_addresses_unread") == 0, d.log_lines("local_addresses")
        assert d.stop_clean() == 0
    finally:
        if d is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        wd.cleanup()


if __name__ == "__main__":
    main([test_sluice_reads_its_addresses_in_the_unit_sandbox])
