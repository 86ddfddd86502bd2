#!/usr/bin/python3
"""Test-only SMTP server with scripted faults, for the outbound-mail tests.

  /usr/bin/python3 smtp_fault.py --port P [--mode relay|550|451|hang|silent] [--lmtp PORT]
                                 [--spool DIR] [--tls none|implicit|starttls] [--cert PEM --key KEY]

relay   accept; deliver through Dovecot LMTP (--lmtp) if given; save each DATA to --spool
550     answer 550 to DATA (permanent)
451     answer 451 to DATA (temporary)
hang    greet and take the message, then never answer the final dot
drop-once  the first DATA is spooled and delivered, then the connection is aborted before the
        reply to the final dot (the RFC 1047 ambiguity); later ones are relayed
silent  accept TCP and never send a greeting

Every DATA is counted in --spool/N.eml (the bytes as received, after dot-unstuffing), so a test can
count deliveries and inspect the exact message. Stop with SIGTERM.
"""
import argparse, asyncio, os, signal, smtplib, ssl, sys, threading

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--mode", default="relay")
ap.add_argument("--lmtp", type=int)
ap.add_argument("--spool")
ap.add_argument("--tls", default="none")
ap.add_argument("--cert")
ap.add_argument("--key")
args = ap.parse_args()

def spool(envelope):
    if not args.spool:
        return
    os.makedirs(args.spool, exist_ok=True)
    n = len([f for f in os.listdir(args.spool) if f.endswith(".eml")]) + 1
    with open(os.path.join(args.spool, "%d.eml" % n), "wb") as f:
        f.write(envelope.original_content)
    with open(os.path.join(args.spool, "%d.rcpt" % n), "w") as f:
        f.write("\n".join(envelope.rcpt_tos))

class Handler:
    async def handle_DATA(self, server, session, envelope):
        if args.mode == "550":
            return "550 5.7.1 rejected by the test server"
        if args.mode == "451":
            return "451 4.3.0 try again later"
        if args.mode == "hang":
            await asyncio.sleep(3600)
        spool(envelope)
        drop = args.mode == "drop-once" and not os.path.exists(os.path.join(args.spool, "dropped"))
        if args.lmtp:
            def deliver():
                with smtplib.LMTP("127.0.0.1", args.lmtp) as lmtp:
                    for rcpt in envelope.rcpt_tos:
                        try:
                            lmtp.sendmail(envelope.mail_from, [rcpt], envelope.original_content)
                        except smtplib.SMTPRecipientsRefused:
                            # No such rig user: the message is still counted in the spool.
                            lmtp.rset()
            try:
                await asyncio.get_running_loop().run_in_executor(None, deliver)
            except (smtplib.SMTPException, OSError) as e:
                return "451 4.3.0 LMTP delivery failed: %s" % e
        if drop:
            open(os.path.join(args.spool, "dropped"), "w").close()
            # abort(): no buffered bytes are flushed, so the 250 below never reaches the client.
            server.transport.abort()
        return "250 2.0.0 accepted"

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())

if args.mode == "silent":
    async def silent():
        async def hold(reader, writer):
            await asyncio.sleep(3600)
        srv = await asyncio.start_server(hold, "127.0.0.1", args.port)
        print("smtp_fault silent on", args.port, flush=True)
        while not stop.is_set():
            await asyncio.sleep(0.1)
        srv.close()
    asyncio.run(silent())
    sys.exit(0)

from aiosmtpd.controller import Controller
kwargs = {}
if args.tls in ("implicit", "starttls"):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    if args.tls == "implicit":
        kwargs["ssl_context"] = ctx
    else:
        kwargs["tls_context"] = ctx
        kwargs["require_starttls"] = True
ctl = Controller(Handler(), hostname="127.0.0.1", port=args.port, **kwargs)
ctl.start()
print("smtp_fault %s on %d" % (args.mode, args.port), flush=True)
stop.wait()
ctl.stop()
