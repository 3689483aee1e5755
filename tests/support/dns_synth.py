#!/usr/bin/env python3
"""dns_synth: a small authoritative DNS responder for tests and benchmarks
that synthesises its answers instead of holding a list of records, so that
200,000 test domains cost nothing to load and every query is answered in
constant time (dnsmasq with 200,000 mx-host lines answered about 10
lookups a second: it walks the list for each query).

Answers, for a zone Z (default "test") and M MX hosts (--mx-hosts):
  mx<k>.Z   A     127.0.0.(1+k)  (127.0.0.(1 + k mod N) with --mx-addrs N;
                  every host at --mx-addr when given)
  mx<k>.Z   AAAA  no data (NOERROR, empty answer)
  <name>.Z  MX    10 mx<n mod M>.Z, where n is the number the name's first
                  label ends with (0 if none), with mx<n mod M>'s A record in
                  the additional section as dnsmasq gives it; A and AAAA
                  of such a name: no data.
  any name outside Z: REFUSED. Other types: no data.
All answers carry --ttl (default 300 s). UDP and TCP on one port of
127.0.0.1 (or --listen). It prints "ready PORT" on stdout once both are
bound, and then serves until killed.

  tests/support/dns_synth.py [--zone test] [--mx-hosts 1] [--mx-addrs N] [--mx-addr 127.0.0.1]
                             [--ttl 300] [--port 0] [--listen 127.0.0.1]

From Python: DnsSynth(mx_hosts=10, zone="m.test") starts it as a child
process (its own core, not the test's GIL) and has .port and .stop().
"""
import argparse
import asyncio
import os
import re
import socket
import struct
import subprocess
import sys

T_A, T_MX, T_AAAA = 1, 15, 28
RC_NOERROR, RC_FORMERR, RC_NXDOMAIN, RC_REFUSED = 0, 1, 3, 5


def encode_name(name):
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


class Zone:
    def __init__(self, zone, mx_hosts, mx_addr, ttl, mx_addrs=0):
        self.mx_addrs = mx_addrs
        self.zone = zone.strip(".").lower()
        self.mx_hosts = max(1, mx_hosts)
        self.mx_addr = mx_addr
        self.ttl = ttl
        self.tail = "." + self.zone
        self.num = re.compile(r"(\d+)$")

    def host_addr(self, k):
        if self.mx_addr:
            return socket.inet_aton(self.mx_addr)
        if self.mx_addrs:
            k %= self.mx_addrs
        return bytes([127, 0, (1 + k) >> 8 & 255, (1 + k) & 255]) if k >= 255 else \
            bytes([127, 0, 0, 1 + k])

    def mx_index(self, label):
        """k when label is mx<k> of this zone, else None."""
        if label.startswith("mx") and label[2:].isdigit():
            k = int(label[2:])
            if k < self.mx_hosts:
                return k
        return None

    def answer(self, q):
        """The response to the query q (bytes), or None to drop it."""
        if len(q) < 12:
            return None
        qid, flags, qd = struct.unpack("!HHH", q[:6])
        if flags & 0x8000 or qd != 1:
            return None
        # The question: labels, type, class (no compression in questions).
        i, labels = 12, []
        while True:
            if i >= len(q):
                return None
            n = q[i]
            if n == 0:
                i += 1
                break
            if n & 0xC0 or i + 1 + n > len(q):
                return None
            labels.append(q[i + 1:i + 1 + n].decode("ascii", "replace"))
            i += 1 + n
        if i + 4 > len(q):
            return None
        qtype, qclass = struct.unpack("!HH", q[i:i + 4])
        question = q[12:i + 4]
        name = ".".join(labels).lower()
        rd = flags & 0x0100
        answers, additional = [], []
        rcode = RC_NOERROR
        if not (name == self.zone or name.endswith(self.tail)):
            rcode = RC_REFUSED
        elif name != self.zone:
            first = name[:-len(self.tail)].split(".")
            k = self.mx_index(first[0]) if len(first) == 1 else None
            if k is not None:
                if qtype == T_A:
                    answers.append(self.rr(b"\xc0\x0c", T_A, self.host_addr(k)))
            elif qtype == T_MX:
                m = self.num.search(first[0])
                k = (int(m.group(1)) if m else 0) % self.mx_hosts
                host = f"mx{k}{self.tail}"
                rdata = struct.pack("!H", 10) + encode_name(host)
                answers.append(self.rr(b"\xc0\x0c", T_MX, rdata))
                additional.append(self.rr(encode_name(host), T_A, self.host_addr(k)))
        hdr = struct.pack("!HHHHHH", qid, 0x8400 | rd | rcode, 1, len(answers), 0, len(additional))
        return hdr + question + b"".join(answers) + b"".join(additional)

    def rr(self, owner, rtype, rdata):
        return owner + struct.pack("!HHIH", rtype, 1, self.ttl, len(rdata)) + rdata


class Udp(asyncio.DatagramProtocol):
    def __init__(self, zone):
        self.zone = zone

    def connection_made(self, transport):
        self.t = transport

    def datagram_received(self, data, addr):
        r = self.zone.answer(data)
        if r is not None:
            self.t.sendto(r, addr)


async def serve(a):
    zone = Zone(a.zone, a.mx_hosts, a.mx_addr, a.ttl, a.mx_addrs)

    async def tcp(reader, writer):
        try:
            while True:
                n = struct.unpack("!H", await reader.readexactly(2))[0]
                r = zone.answer(await reader.readexactly(n))
                if r is None:
                    break
                writer.write(struct.pack("!H", len(r)) + r)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    loop = asyncio.get_running_loop()
    # UDP and TCP on one port: take a UDP port, then try TCP on it.
    for _ in range(50):
        us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        us.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        us.bind((a.listen, a.port))
        port = us.getsockname()[1]
        try:
            server = await asyncio.start_server(tcp, a.listen, port, backlog=1024)
            break
        except OSError:
            us.close()
            if a.port:
                raise
    else:
        raise SystemExit("dns_synth: no port free for both UDP and TCP")
    await loop.create_datagram_endpoint(lambda: Udp(zone), sock=us)
    print(f"ready {port}", flush=True)
    async with server:
        await server.serve_forever()


class DnsSynth:
    """The responder as a child process: .port, .stop(). The same shape as
    the tests' dnsmasq wrapper (test_delivery.Dns)."""

    def __init__(self, mx_hosts=1, zone="test", mx_addr="", ttl=300, mx_addrs=0, binary=None,
                 own_names=False):
        """binary: bench/relay/dns_synth.c built (UDP only, the same
        answers in microseconds, for benchmarks); None: this script.
        own_names: an MX host name of its own per domain (the C binary
        only: see there)."""
        cmd = [binary] if binary else [sys.executable, os.path.abspath(__file__)]
        args = cmd + ["--zone", zone,
                      "--mx-hosts", str(mx_hosts), "--ttl", str(ttl), "--mx-addrs", str(mx_addrs)]
        if mx_addr:
            args += ["--mx-addr", mx_addr]
        if own_names:
            assert binary, "own_names: bench/relay/dns_synth.c only"
            args += ["--own-names", "1"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # bounded: it prints or exits
        if not line.startswith("ready "):
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"dns_synth did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zone", default="test")
    ap.add_argument("--mx-hosts", type=int, default=1)
    ap.add_argument("--mx-addr", default="")
    ap.add_argument("--mx-addrs", type=int, default=0)
    ap.add_argument("--ttl", type=int, default=300)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--listen", default="127.0.0.1")
    a = ap.parse_args()
    try:
        asyncio.run(serve(a))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
