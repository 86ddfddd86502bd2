"""W1: the providers' own webhook code against a running `frontdesk run` (docs/reliability.md).

For each scheme, W1_COUNT generated bodies (seeded: UTF-8 text and JSON) are signed with the
provider's SDK, checked with the SDK's own verifier, and POSTed over HTTP; every one must get a
2xx and be stored byte for byte. Then one-bit mutants of each request (body, signature, timestamp,
id; Twilio also a changed URL port and scheme) must each get 401 and store nothing. A mutant that
the SDK's own verifier still accepts is not a forgery (e.g. `%2B` -> `%2b` in a Twilio form body
decodes to the same parameter): it must be accepted as the same delivery (same id, no new row).

Mailgun's SDK only verifies (`SecurityGuard.verify_webhook`): requests are signed with the
documented algorithm (HMAC-SHA256 over timestamp + token) and the SDK verifier must accept each
before it is posted. Mailgun does not sign the body, so it has no body mutants. Every SDK signs
text (`str`), so genuine bodies are UTF-8; mutated bodies may be any bytes.

Usage: w1.py PORT DB SECRETS_JSON   (env: W1_COUNT, default 100; W1_SEED, default 1)
Prints `W1<TAB>scheme<TAB>parameters<TAB>result` per scheme; exits 1 on any failure.
"""

import base64
import datetime
import hashlib
import hmac
import http.client
import json
import os
import random
import sqlite3
import sys
import time
import urllib.parse

import slack_sdk.signature
import standardwebhooks.webhooks
import stripe
import twilio.request_validator
from mailgun.security import SecurityGuard

PORT = int(sys.argv[1])
DB = sys.argv[2]
SECRETS = json.loads(sys.argv[3])
COUNT = int(os.environ.get("W1_COUNT", "100"))
SEED = int(os.environ.get("W1_SEED", "1"))
TWILIO_URL = SECRETS["twilio_public_url"]

# Text that exercises escaping and encodings: quotes, backslashes, CR/LF, controls, non-BMP,
# right-to-left, combining marks, JSON and form metacharacters.
ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ")
    + list("\"'\\/<>&=+%?#;,.:{}[]\t\r\n\x00\x01\x7f")
    + ["é", "ß", "日本", "😀", "\u202e", "\u200b", "a\u0301", "\ufeff", "𝔘"]
)


def text(rng, max_len=200):
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, max_len)))


def flip_bytes(data: bytes, rng) -> bytes:
    i = rng.randrange(len(data))
    b = bytearray(data)
    b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def flip_ascii(s: str, rng) -> str:
    """One bit flipped in one character, keeping it printable ASCII (a header value)."""
    while True:
        i = rng.randrange(len(s))
        c = ord(s[i]) ^ (1 << rng.randrange(7))
        if 0x21 <= c <= 0x7E and c != ord(s[i]):
            return s[:i] + chr(c) + s[i + 1 :]


def flip_ts(ts: int, rng) -> int:
    # a low bit: the timestamp stays inside the 5-minute window, so only the signature can refuse it
    return ts ^ (1 << rng.randrange(7))


class Client:
    def __init__(self):
        self.conn = None

    def post(self, path, headers, body):
        for attempt in range(3):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
                self.conn.request("POST", path, body=body, headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return r.status, data
            except (ConnectionError, http.client.HTTPException, OSError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def sdk_accepts(check, *args):
    try:
        return bool(check(*args))
    except Exception:  # the SDKs raise on bad input: that is a rejection
        return False


# ---------- schemes: each yields genuine requests and their mutants ----------


class StandardWebhooks:
    name, source = "standard-webhooks", "sw"

    def __init__(self):
        self.wh = standardwebhooks.webhooks.Webhook(SECRETS["sw"])

    def headers(self, msg_id, ts, sig):
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sig,
            "content-type": "application/json",
        }

    def verify(self, headers, body):
        # json_parse=False: a text body is a valid delivery too (stored as degraded); the SDK
        # raises on any verification failure.
        self.wh.verify(body, headers, json_parse=False)
        return True

    def genuine(self, i, rng):
        if i % 3 == 2:
            body = f"{i} " + text(rng)
        else:
            body = json.dumps(
                {
                    "type": "w1.test",
                    "timestamp": "2026-11-27T00:00:00Z",
                    "data": {"email": f"c{i}@example.test", "name": text(rng, 40), "text": text(rng)},
                },
                ensure_ascii=bool(i % 2),
            )
        msg_id = f"msg_w1_{SEED}_{i}"
        now = datetime.datetime.now(tz=datetime.timezone.utc).replace(microsecond=0)
        sig = self.wh.sign(msg_id, now, body)
        return self.headers(msg_id, int(now.timestamp()), sig), body.encode()

    def mutants(self, headers, body, rng):
        msg_id, ts = headers["webhook-id"], int(headers["webhook-timestamp"])
        sig = headers["webhook-signature"]
        raw = bytearray(base64.b64decode(sig.split(",", 1)[1]))
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        bad_sig = "v1," + base64.b64encode(bytes(raw)).decode()
        yield "body", headers, flip_bytes(body, rng) if body else b"x"
        yield "signature", self.headers(msg_id, ts, bad_sig), body
        yield "timestamp", self.headers(msg_id, flip_ts(ts, rng), sig), body
        yield "id", self.headers(flip_ascii(msg_id, rng), ts, sig), body


class Slack:
    name, source = "slack", "slack"

    def __init__(self):
        self.v = slack_sdk.signature.SignatureVerifier(SECRETS["slack"])

    def verify(self, headers, body):
        return self.v.is_valid_request(body, headers)

    def genuine(self, i, rng):
        if i % 2:
            body = json.dumps(
                {
                    "type": "event_callback",
                    "event_id": f"Ev{SEED}W1{i}",
                    "event_time": 1700000000 + i,
                    "event": {
                        "type": "message",
                        "user": f"U{i}",
                        "text": text(rng),
                        "channel": "C1",
                        "ts": f"1700000000.{i:06}",
                    },
                },
                ensure_ascii=bool(i % 4 == 1),
            )
            ctype = "application/json"
        else:
            body = urllib.parse.urlencode(
                {
                    "command": "/w1",
                    "user_id": f"U{i}",
                    "user_name": text(rng, 20),
                    "text": text(rng),
                    "channel_id": "C1",
                    "trigger_id": f"{SEED}.{i}.w1",
                }
            )
            ctype = "application/x-www-form-urlencoded"
        ts = str(int(time.time()))
        sig = self.v.generate_signature(timestamp=ts, body=body)
        return self.headers(ts, sig, ctype), body.encode()

    def headers(self, ts, sig, ctype):
        return {"x-slack-request-timestamp": ts, "x-slack-signature": sig, "content-type": ctype}

    def mutants(self, headers, body, rng):
        ts, sig, ctype = (
            headers["x-slack-request-timestamp"],
            headers["x-slack-signature"],
            headers["content-type"],
        )
        raw = bytearray(bytes.fromhex(sig[3:]))
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        yield "body", headers, flip_bytes(body, rng)
        yield "signature", self.headers(ts, "v0=" + raw.hex(), ctype), body
        yield "timestamp", self.headers(str(flip_ts(int(ts), rng)), sig, ctype), body


class Stripe:
    name, source = "stripe", "stripe"

    def verify(self, headers, body):
        stripe.WebhookSignature.verify_header(body, headers["stripe-signature"], SECRETS["stripe"], 300)
        return True

    def genuine(self, i, rng):
        if i % 4 == 3:
            body = f"{i} " + text(rng)
        else:
            body = json.dumps(
                {
                    "id": f"evt_w1_{SEED}_{i}",
                    "object": "event",
                    "type": "customer.created",
                    "created": 1700000000 + i,
                    "data": {
                        "object": {
                            "object": "customer",
                            "id": f"cus_{i}",
                            "email": f"c{i}@example.test",
                            "name": text(rng, 40),
                            "description": text(rng),
                        }
                    },
                },
                ensure_ascii=bool(i % 2),
            )
        header = stripe.WebhookSignature.generate_signature_header(body, SECRETS["stripe"])
        return {"stripe-signature": header, "content-type": "application/json"}, body.encode()

    def mutants(self, headers, body, rng):
        parts = dict(p.split("=", 1) for p in headers["stripe-signature"].split(","))
        ts, sig = int(parts["t"]), parts["v1"]
        raw = bytearray(bytes.fromhex(sig))
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)

        def h(t, v1):
            return {"stripe-signature": f"t={t},v1={v1}", "content-type": "application/json"}

        yield "body", headers, flip_bytes(body, rng)
        yield "signature", h(ts, raw.hex()), body
        yield "timestamp", h(flip_ts(ts, rng), sig), body


class MultiDict(dict):
    """Repeated form fields for the Twilio validator (it calls `getlist`)."""

    def getlist(self, name):
        return self[name]


def form_params(body: bytes):
    params = MultiDict()
    for k, v in urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        params.setdefault(k, []).append(v)
    return params


class Twilio:
    name, source = "twilio", "tw"

    def __init__(self):
        self.v = twilio.request_validator.RequestValidator(SECRETS["tw"])

    def verify(self, headers, body):
        return self.v.validate(TWILIO_URL, form_params(body), headers["x-twilio-signature"])

    def params(self, i, rng):
        return [
            ("MessageSid", f"SMw1{SEED}x{i:08}"),
            ("AccountSid", "ACw1"),
            ("From", f"+1555{i:07}"),
            ("To", "+15550000000"),
            ("Body", text(rng)),
            ("NumMedia", "0"),
        ]

    def genuine(self, i, rng):
        params = self.params(i, rng)
        sig = self.v.compute_signature(TWILIO_URL, dict(params))
        return self.headers(sig), urllib.parse.urlencode(params).encode()

    def headers(self, sig):
        return {"x-twilio-signature": sig, "content-type": "application/x-www-form-urlencoded"}

    def reordered(self, headers, body, rng):
        pairs = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True)
        while len(pairs) > 1:
            shuffled = pairs[:]
            rng.shuffle(shuffled)
            if shuffled != pairs:
                return headers, urllib.parse.urlencode(shuffled).encode()
        return headers, body

    def mutants(self, headers, body, rng):
        sig = headers["x-twilio-signature"]
        raw = bytearray(base64.b64decode(sig))
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        params = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        u = urllib.parse.urlsplit(TWILIO_URL)
        other_port = u._replace(netloc=f"{u.hostname}:8443").geturl()
        other_scheme = u._replace(scheme="http" if u.scheme == "https" else "https").geturl()
        yield "body", headers, flip_bytes(body, rng)
        yield "signature", self.headers(base64.b64encode(bytes(raw)).decode()), body
        yield "url-port", self.headers(self.v.compute_signature(other_port, params)), body
        yield "url-scheme", self.headers(self.v.compute_signature(other_scheme, params)), body


class Mailgun:
    name, source = "mailgun", "mg"
    ctype = {"content-type": "application/x-www-form-urlencoded"}

    def verify(self, headers, body):
        f = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        return SecurityGuard.verify_webhook(
            SECRETS["mg"], f["token"], f["timestamp"], f["signature"], max_age_seconds=300
        )

    def sign(self, ts, token):
        # The SDK has no signer: Mailgun's documented algorithm, checked by the SDK's verifier.
        return hmac.new(SECRETS["mg"].encode(), f"{ts}{token}".encode(), hashlib.sha256).hexdigest()

    def body(self, fields):
        return urllib.parse.urlencode(fields).encode()

    def genuine(self, i, rng):
        ts, token = str(int(time.time())), rng.randbytes(25).hex()
        fields = {
            "recipient": "support@example.test",
            "sender": f"c{i}@example.test",
            "from": f"Client {i} <c{i}@example.test>",
            "subject": text(rng, 60),
            "body-plain": text(rng),
            "Message-Id": f"<w1-{SEED}-{i}@example.test>",
            "timestamp": ts,
            "token": token,
            "signature": self.sign(ts, token),
        }
        return dict(self.ctype), self.body(fields)

    def mutants(self, headers, body, rng):
        fields = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        raw = bytearray(bytes.fromhex(fields["signature"]))
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        yield "signature", headers, self.body({**fields, "signature": raw.hex()})
        ts = str(flip_ts(int(fields["timestamp"]), rng))
        yield "timestamp", headers, self.body({**fields, "timestamp": ts})
        yield "token", headers, self.body({**fields, "token": flip_ascii(fields["token"], rng)})


# ---------- the run ----------


def run(scheme, client, db):
    rng = random.Random(f"{SEED}:{scheme.name}")
    path = f"/hooks/{scheme.source}"
    failures, stored = [], {}
    genuine_ok = mutants = mutants_ok = equivalent = reorders_ok = 0
    counts = {}
    for i in range(COUNT):
        headers, body = scheme.genuine(i, rng)
        if not sdk_accepts(scheme.verify, headers, body):
            failures.append(f"{scheme.name} #{i}: the SDK rejects its own signature")
            continue
        status, reply = client.post(path, headers, body)
        if 200 <= status < 300:
            genuine_ok += 1
            stored[hashlib.sha256(body).hexdigest()] = i
        else:
            failures.append(f"{scheme.name} #{i}: genuine got {status} {reply[:200]!r}")
            continue
        if isinstance(scheme, Twilio):
            # Parameter order is not signed (they are sorted): a reorder is the same delivery.
            rh, rb = scheme.reordered(headers, body, rng)
            r_status, r_reply = client.post(path, rh, rb)
            if r_status == 200 and json.loads(r_reply)["id"] == json.loads(reply)["id"]:
                reorders_ok += 1
            else:
                failures.append(f"twilio #{i}: reordered params got {r_status} {r_reply[:200]!r}")
        for kind, mh, mb in scheme.mutants(headers, body, rng):
            if sdk_accepts(scheme.verify, mh, mb):
                # Not a forgery: the provider would accept it too, so must we, as the same delivery.
                e_status, e_reply = client.post(path, mh, mb)
                if e_status == 200 and json.loads(e_reply)["id"] == json.loads(reply)["id"]:
                    equivalent += 1
                else:
                    failures.append(f"{scheme.name} #{i} equivalent {kind} got {e_status} {e_reply[:200]!r}")
                continue
            mutants += 1
            counts[kind] = counts.get(kind, 0) + 1
            m_status, m_reply = client.post(path, mh, mb)
            if m_status == 401:
                mutants_ok += 1
            else:
                failures.append(f"{scheme.name} #{i} {kind} mutant got {m_status} {m_reply[:200]!r}")
    rows = db.execute("SELECT raw FROM messages WHERE source = ?", (scheme.source,)).fetchall()
    # the rows' own digests (raw_digest) are checked by the store's tests; here each stored body
    # must be one genuine request's, byte for byte
    row_hashes = [hashlib.sha256(raw).hexdigest() for (raw,) in rows]
    if sorted(row_hashes) != sorted(stored):
        extra = len(set(row_hashes) - set(stored))
        missing = len(set(stored) - set(row_hashes))
        failures.append(
            f"{scheme.name}: {len(rows)} rows for {len(stored)} genuine ({missing} missing, {extra} not genuine)"
        )
    stored_ok = len(stored) - len(set(stored) - set(row_hashes))
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    result = (
        f"genuine {genuine_ok}/{COUNT} 2xx, {stored_ok}/{COUNT} stored; "
        f"mutants {mutants_ok}/{mutants} 401 ({kinds}), {len(rows) - stored_ok} stored"
    )
    if isinstance(scheme, Twilio):
        result += f"; reorders {reorders_ok}/{COUNT} accepted as the same delivery"
    if equivalent:
        result += f"; {equivalent} equivalent mutants (the SDK accepts them) accepted as the same delivery"
    params = f"{scheme.name}, {COUNT} bodies, seed {SEED}"
    print(f"W1\t{params}\t{result}", flush=True)
    return failures


def main():
    client = Client()
    db = sqlite3.connect(f"file:{DB}?mode=ro", uri=True)
    failures = []
    for scheme in (StandardWebhooks(), Slack(), Stripe(), Twilio(), Mailgun()):
        failures += run(scheme, client, db)
    for f in failures[:30]:
        print("FAIL", f, file=sys.stderr)
    if failures:
        print(f"{len(failures)} failures", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
