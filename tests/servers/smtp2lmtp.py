#!/usr/bin/python3
"""Test-only SMTP server: accepts mail on 127.0.0.1:SMTP_PORT and hands it to
Dovecot's LMTP listener (127.0.0.1:LMTP_PORT), which stores it in the user's Maildir.
Start:  /usr/bin/python3 smtp2lmtp.py SMTP_PORT LMTP_PORT [INTROSPECT_URL]   (Debian python3-aiosmtpd)
Stop:   kill -TERM <pid>   (or Ctrl-C)
With INTROSPECT_URL, mail is accepted only after AUTH XOAUTH2 with an access token that the
OAuth2 server's introspection endpoint (RFC 7662) calls active for that very user.
"""
import asyncio, base64, json, signal, smtplib, sys, threading, urllib.parse, urllib.request
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

SMTP_PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 10025
LMTP_ADDR = ("127.0.0.1", int(sys.argv[2]) if len(sys.argv) > 2 else 10024)
INTROSPECT_URL = sys.argv[3] if len(sys.argv) > 3 else None

def token_user(token):
    """The user an active access token belongs to, per the introspection endpoint, else None."""
    body = urllib.parse.urlencode({"token": token}).encode()
    with urllib.request.urlopen(INTROSPECT_URL, body, timeout=10) as r:
        answer = json.load(r)
    return answer.get("username") if answer.get("active") is True else None

class LmtpRelay:
    async def auth_XOAUTH2(self, server, args):
        # AUTH XOAUTH2 <base64 "user=U\x01auth=Bearer T\x01\x01">; a bad token answers 535 at once
        if len(args) < 2:
            return AuthResult(success=False, handled=False)
        try:
            fields = dict(p.split("=", 1) for p in base64.b64decode(args[1]).decode().split("\x01") if p)
            user, auth = fields["user"], fields["auth"]
        except (ValueError, KeyError):
            return AuthResult(success=False, handled=False)
        if not auth.startswith("Bearer "):
            return AuthResult(success=False, handled=False)
        owner = await asyncio.get_running_loop().run_in_executor(None, token_user, auth[7:])
        if owner is None or owner != user.split("@")[0]:
            print("xoauth2 refused for", user, flush=True)
            return AuthResult(success=False, handled=False)
        print("xoauth2 ok for", user, flush=True)
        return AuthResult(success=True, auth_data=user)

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
if INTROSPECT_URL:
    ctl = Controller(LmtpRelay(), hostname="127.0.0.1", port=SMTP_PORT, auth_required=True,
                     auth_require_tls=False, auth_exclude_mechanism=["PLAIN", "LOGIN"])
else:
    # without an introspection URL the server behaves as before (no XOAUTH2)
    ctl = Controller(LmtpRelay(), hostname="127.0.0.1", port=SMTP_PORT,
                     auth_exclude_mechanism=["XOAUTH2"])
ctl.start()
print(f"smtp2lmtp listening on 127.0.0.1:{SMTP_PORT} -> LMTP {LMTP_ADDR}", flush=True)
stop.wait()
ctl.stop()
print("smtp2lmtp stopped", flush=True)
