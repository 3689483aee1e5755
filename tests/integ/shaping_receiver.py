"""A receiving MX for the shaping tests: an asyncio SMTP server that
answers like a large receiver that has had enough of one sending address.

    python3 shaping_receiver.py HOST PORT RECORDS PEER AFTER REPLY SWITCH

It accepts mail from everyone, and appends one JSON line per MAIL command
to RECORDS: the peer address, its EHLO name, the sender, the time, the
code answered, and "delivered": true once the message's data was
accepted. PEER is an address, or "from:TEXT" for the MAIL commands whose
sender holds TEXT. After AFTER messages accepted from PEER, and for as
long as the file SWITCH exists, it answers PEER's MAIL commands with REPLY (one line, code included, as
"421 4.7.0 [TSS04] Messages from ... deferred ...") and, for a 421, closes
the connection as a receiver does. Deleting SWITCH makes it accept PEER
again (the test's "the receiver is happy again").

It runs until killed (the test stops it by PID). PIPELINING is offered.
"""
import asyncio
import os
import sys
import time

from harness import jsonl_writer


def main():
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    peer_bad, after, reply, switch = sys.argv[4], int(sys.argv[5]), sys.argv[6], sys.argv[7]
    put = jsonl_writer(path)
    accepted = {"n": 0}

    def bad(peer, sender):
        if peer_bad.startswith("from:"):
            return peer_bad[5:] in sender
        return peer == peer_bad

    def record(**kw):
        kw["t"] = time.time()
        put(kw)

    async def session(reader, writer):
        peer = writer.get_extra_info("peername")[0]
        writer.write(b"220 rx.test ESMTP\r\n")
        ehlo, rcpts, sender = "", [], ""
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                cmd = line.decode("latin-1").rstrip("\r\n")
                verb = cmd[:4].upper()
                if verb in ("EHLO", "HELO"):
                    ehlo = cmd[5:].strip()
                    writer.write(b"250-rx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                 b"250 ENHANCEDSTATUSCODES\r\n")
                elif verb == "MAIL":
                    rcpts, sender = [], cmd[10:].strip()
                    if bad(peer, sender) and accepted["n"] >= after and os.path.exists(switch):
                        record(peer=peer, ehlo=ehlo, sender=sender, code=int(reply[:3]))
                        # surrogateescape: a REPLY given as octets that are
                        # not UTF-8 goes out as those octets
                        writer.write(reply.encode("utf-8", "surrogateescape") + b"\r\n")
                        await writer.drain()
                        if reply.startswith("421"):
                            break
                        continue
                    record(peer=peer, ehlo=ehlo, sender=sender, code=250)
                    writer.write(b"250 2.1.0 ok\r\n")
                elif verb == "RCPT":
                    rcpts.append(cmd[8:].strip())
                    writer.write(b"250 2.1.5 ok\r\n")
                elif verb == "DATA":
                    writer.write(b"354 go on\r\n")
                    await writer.drain()
                    for _ in range(100000):  # bounded: test messages are small
                        body = await reader.readline()
                        if not body or body == b".\r\n":
                            break
                    if bad(peer, sender):
                        accepted["n"] += 1
                    record(peer=peer, ehlo=ehlo, sender=sender, code=250, delivered=True,
                           rcpts=rcpts)
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == "RSET":
                    rcpts = []
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == "NOOP":
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"502 5.5.2 not here\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def serve():
        srv = await asyncio.start_server(session, host, port)
        async with srv:
            await srv.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
