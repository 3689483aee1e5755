"""A receiving MX of a given behaviour for the campaign test
(test_campaign_mix.py): an asyncio SMTP server on one address and port
that appends one JSON line per event to a file, written before the reply
it records is sent (so a message it answered 250 to is on file):
  {"ev": "conn", "open": N}            a connection accepted (N open now)
  {"ev": "msg", "id": X-Test-Id, "rcpts": [...], "size": octets,
   "t": Unix time its final dot came, "body": SHA-256 of the body}
                                       a message accepted (250 to the dot)
  {"ev": "rcpt_refused", "rcpt": addr, "code": 550}
  {"ev": "mail_refused", "code": 421}  (then the connection is closed)
Behaviours (--mode):
  slow    every reply to the final dot after --delay seconds, and the
          greeting too (a receiver that scans what it gets)
  flaky   421 at the greeting to the first --refuse-conns connections,
          then 451 4.7.1 to every RCPT until --greylist seconds after
          the first RCPT it saw; then accepts, but answers 421 to the
          MAIL after every --per-conn transactions on a connection and
          closes it (a receiver's limit of messages per connection)
  picky   550 5.1.1 to recipients whose local part starts with "bad",
          452 4.2.2 to the first RCPT of each one starting with "soft"
          (one transaction, several outcomes); accepts the rest

    python3 campaign_receiver.py HOST PORT RECORDS --mode M [--delay S]
                                 [--refuse-conns N] [--greylist S] [--per-conn N]

It prints "ready" once listening and runs until killed (the test stops it
by PID). PIPELINING is offered, so commands are answered in order.
"""
import argparse
import asyncio
import hashlib
import time

from harness import jsonl_writer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("records")
    ap.add_argument("--mode", required=True, choices=["slow", "flaky", "picky"])
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--refuse-conns", type=int, default=2)
    ap.add_argument("--greylist", type=float, default=3.0)
    ap.add_argument("--per-conn", type=int, default=0)
    a = ap.parse_args()
    put = jsonl_writer(a.records)
    state = {"conns": 0, "open": 0, "first_rcpt": None, "soft": set()}

    def record(**kw):
        put(kw)

    async def session(reader, writer):
        state["conns"] += 1
        state["open"] += 1
        record(ev="conn", open=state["open"])
        try:
            if a.mode == "flaky" and state["conns"] <= a.refuse_conns:
                writer.write(b"421 4.7.0 rx.test too busy, come back later\r\n")
                await writer.drain()
                return
            if a.mode == "slow":
                await asyncio.sleep(a.delay)
            writer.write(b"220 rx.test ESMTP\r\n")
            rcpts, txns = [], 0
            while True:
                line = await reader.readline()
                if not line:
                    break
                cmd = line.decode("latin-1").rstrip("\r\n")
                verb = cmd[:4].upper()
                if verb in ("EHLO", "HELO"):
                    writer.write(b"250-rx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                 b"250-SIZE 52428800\r\n250 ENHANCEDSTATUSCODES\r\n")
                elif verb == "MAIL":
                    rcpts = []
                    if a.mode == "flaky" and a.per_conn and txns >= a.per_conn:
                        record(ev="mail_refused", code=421)
                        writer.write(b"421 4.7.0 rx.test too many messages, closing\r\n")
                        await writer.drain()
                        break
                    writer.write(b"250 2.1.0 ok\r\n")
                elif verb == "RCPT":
                    addr = cmd[8:].strip().split()[0].strip("<>")
                    now = time.monotonic()
                    if state["first_rcpt"] is None:
                        state["first_rcpt"] = now
                    if a.mode == "flaky" and now - state["first_rcpt"] < a.greylist:
                        record(ev="rcpt_refused", rcpt=addr, code=451)
                        writer.write(b"451 4.7.1 greylisted, try again later\r\n")
                    elif a.mode == "picky" and addr.startswith("bad"):
                        record(ev="rcpt_refused", rcpt=addr, code=550)
                        writer.write(b"550 5.1.1 <" + addr.encode() +
                                     b">: Recipient address rejected: User unknown\r\n")
                    elif a.mode == "picky" and addr.startswith("soft") and \
                            addr not in state["soft"]:
                        state["soft"].add(addr)
                        record(ev="rcpt_refused", rcpt=addr, code=452)
                        writer.write(b"452 4.2.2 mailbox full, try again later\r\n")
                    else:
                        rcpts.append(addr)
                        writer.write(b"250 2.1.5 ok\r\n")
                elif verb == "DATA":
                    if not rcpts:
                        writer.write(b"554 5.5.1 no valid recipients\r\n")
                        await writer.drain()
                        continue
                    writer.write(b"354 go on\r\n")
                    await writer.drain()
                    size, tid, in_header = 0, None, True
                    digest = hashlib.sha256()
                    while True:
                        body = await reader.readline()
                        if not body:
                            return  # dropped mid-message: nothing accepted
                        if body == b".\r\n":
                            t_dot = time.time()
                            break
                        if body.startswith(b"."):
                            body = body[1:]  # RFC 5321 4.5.2
                        size += len(body)
                        if not in_header:
                            digest.update(body)
                        elif body == b"\r\n":
                            in_header = False
                        elif body.lower().startswith(b"x-test-id:"):
                            tid = body.split(b":", 1)[1].strip().decode()
                    if a.mode == "slow":
                        await asyncio.sleep(a.delay)
                    record(ev="msg", id=tid, rcpts=rcpts, size=size, t=t_dot,
                           body=digest.hexdigest())
                    rcpts = []
                    txns += 1
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
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            state["open"] -= 1
            writer.close()

    async def serve():
        server = await asyncio.start_server(session, a.host, a.port, backlog=512,
                                            limit=1 << 20)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
