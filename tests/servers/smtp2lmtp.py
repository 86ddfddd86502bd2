#!/usr/bin/python3
"""Test-only SMTP server: accepts mail on 127.0.0.1:SMTP_PORT and hands it to
Dovecot's LMTP listener (127.0.0.1:LMTP_PORT), which stores it in the user's Maildir.
Start:  /usr/bin/python3 smtp2lmtp.py SMTP_PORT LMTP_PORT   (Debian python3-aiosmtpd)
Stop:   kill -TERM <pid>   (or Ctrl-C)
"""
import asyncio, signal, smtplib, sys, threading
from aiosmtpd.controller import Controller

SMTP_PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 10025
LMTP_ADDR = ("127.0.0.1", int(sys.argv[2]) if len(sys.argv) > 2 else 10024)

class LmtpRelay:
    async def handle_DATA(self, server, session, envelope):
        # One LMTP transaction per recipient: Python's smtplib does not read
        # LMTP's per-recipient DATA replies, so multi-RCPT sends confuse it.
        def deliver():
            refused = {}
            with smtplib.LMTP(*LMTP_ADDR) as lmtp:
                for rcpt in envelope.rcpt_tos:
                    try:
                        lmtp.sendmail(envelope.mail_from, [rcpt], envelope.original_content)
                    except smtplib.SMTPRecipientsRefused as e:
                        refused.update(e.recipients)
                        lmtp.rset()
            return refused
        try:
            refused = await asyncio.get_running_loop().run_in_executor(None, deliver)
        except (smtplib.SMTPException, OSError) as e:
            return "451 4.3.0 LMTP delivery failed: %s" % e
        if refused and len(refused) == len(envelope.rcpt_tos):
            return "550 5.1.1 recipients rejected by LMTP: %s" % ",".join(refused)
        if refused:
            print("partially refused:", refused, flush=True)
        return "250 2.0.0 delivered via LMTP"

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())
ctl = Controller(LmtpRelay(), hostname="127.0.0.1", port=SMTP_PORT)
ctl.start()
print(f"smtp2lmtp listening on 127.0.0.1:{SMTP_PORT} -> LMTP {LMTP_ADDR}", flush=True)
stop.wait()
ctl.stop()
print("smtp2lmtp stopped", flush=True)
