"""A receiving MX for the pool tests: an asyncio SMTP server on one
address and port that appends one JSON line per message it accepts to a
file: the peer address the connection came from, the EHLO name it said,
the recipients and whether a control header field (X-Sluice-...) reached
it. It greets peers listed in --refuse with 421 and closes (a receiver
that throttles a sending address). With --greylist it greylists as
Postgrey does, by exact address: a recipient's first RCPT from a peer
gets "450 4.2.0 ... Greylisted" (a line {"peer", "rcpt", "greylisted":
true} in RECORDS), the next one from that peer is accepted; a DATA with
no recipient accepted gets 554. Each connection also gets a line
{"peer", "conn": "open"} when accepted and {"peer", "conn": "closed"}
when it ends, for a test to know which are still open.

    python3 pool_receiver.py HOST PORT RECORDS [--refuse ADDR,...] [--greylist]

It runs until killed (the test stops it by PID). PIPELINING is offered,
so commands are answered in the order they come, as RFC 2920 wants.
"""
import asyncio
import sys

from harness import jsonl_writer


def main():
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    refuse = set()
    if len(sys.argv) > 5 and sys.argv[4] == "--refuse":
        refuse = set(sys.argv[5].split(","))
    greylist = "--greylist" in sys.argv[4:]
    seen = set()  # (peer, recipient) greylisted once already
    put = jsonl_writer(path)

    async def session(reader, writer):
        peer = writer.get_extra_info("peername")[0]
        put({"peer": peer, "conn": "open"})
        try:
            await conversation(reader, writer, peer)
        finally:
            put({"peer": peer, "conn": "closed"})

    async def conversation(reader, writer, peer):
        if peer in refuse:
            writer.write(b"421 4.7.0 too many connections from your address\r\n")
            await writer.drain()
            writer.close()
            return
        writer.write(b"220 rx.test ESMTP\r\n")
        ehlo, sender, rcpts = "", None, []
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
                    sender, rcpts = cmd[10:].strip(), []
                    writer.write(b"250 2.1.0 ok\r\n")
                elif verb == "RCPT":
                    rcpt = cmd[8:].strip()
                    if greylist and (peer, rcpt) not in seen:
                        seen.add((peer, rcpt))
                        put({"peer": peer, "rcpt": rcpt, "greylisted": True})
                        writer.write(b"450 4.2.0 %s: Recipient address rejected: Greylisted, "
                                     b"see http://postgrey.schweikert.ch/help/rx.test.html\r\n"
                                     % rcpt.encode("latin-1"))
                    else:
                        rcpts.append(rcpt)
                        writer.write(b"250 2.1.5 ok\r\n")
                elif verb == "DATA" and greylist and not rcpts:
                    writer.write(b"554 5.5.1 no valid recipients\r\n")
                elif verb == "DATA":
                    writer.write(b"354 go on\r\n")
                    await writer.drain()
                    control = False
                    in_header = True
                    for _ in range(100000):  # bounded: test messages are small
                        body = await reader.readline()
                        if not body or body == b".\r\n":
                            break
                        if body == b"\r\n":
                            in_header = False
                        elif in_header and body.lower().startswith(b"x-sluice-"):
                            control = True
                    put({"peer": peer, "ehlo": ehlo, "from": sender, "rcpts": rcpts,
                         "control": control})
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == "RSET":
                    sender, rcpts = None, []
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
        writer.close()

    async def serve():
        server = await asyncio.start_server(session, host, port, backlog=512)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
