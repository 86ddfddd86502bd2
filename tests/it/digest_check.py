#!/usr/bin/python3
"""Checks one digest email with Python's own parser (a real peer): used by tests/it/digest.rs.

  digest_check.py RAW.eml --subject S --to a@x,b@y [--headers h1,h2,..] [--section S ...]
                  [--payload P ...]

Raw checks: every line CRLF-terminated, no bare CR or LF, every line < 998 octets.
Parsed (email.policy.default): multipart/alternative with text/plain and text/html; the subject;
the recipients exactly; the header-name set exactly (when --headers is given); every section in both
parts; the HTML's elements and attributes only the template's; each payload only as text.
Prints "ok" or the first failure (exit 1).
"""
import argparse, email, sys, unicodedata
from email import policy
from html.parser import HTMLParser

ap = argparse.ArgumentParser()
ap.add_argument("raw")
ap.add_argument("--subject", required=True)
ap.add_argument("--to", required=True)
ap.add_argument("--headers")
ap.add_argument("--section", action="append", default=[])
ap.add_argument("--payload", action="append", default=[])
a = ap.parse_args()

ELEMENTS = {"html", "head", "meta", "title", "body", "div", "p", "h2", "h3", "ul", "li", "span", "bdi"}
ATTRIBUTES = {"lang", "charset", "name", "content", "style"}

def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)

raw = open(a.raw, "rb").read()
for i, b in enumerate(raw):
    if b == 0x0A and (i == 0 or raw[i - 1] != 0x0D):
        fail("bare LF at byte %d" % i)
    if b == 0x0D and (i + 1 >= len(raw) or raw[i + 1] != 0x0A):
        fail("bare CR at byte %d" % i)
for n, line in enumerate(raw.split(b"\r\n")):
    if len(line) >= 998:
        fail("line %d has %d octets" % (n, len(line)))

msg = email.message_from_bytes(raw, policy=policy.default)
if msg.defects:
    fail("parser defects: %r" % msg.defects)
if msg["Subject"] != a.subject:
    fail("subject %r != %r" % (msg["Subject"], a.subject))
to = sorted(str(x.addr_spec) for x in msg["To"].addresses)
if to != sorted(a.to.split(",")):
    fail("recipients %r != %r" % (to, a.to))
for h in ("Cc", "Bcc"):
    if msg[h] is not None:
        fail("unexpected %s header" % h)
if a.headers is not None:
    names = sorted({k.lower() for k in msg.keys()})
    want = sorted({h.lower() for h in a.headers.split(",")})
    if names != want:
        fail("header names %r != %r" % (names, want))
if msg.get_content_type() != "multipart/alternative":
    fail("content type %s" % msg.get_content_type())
if msg["Auto-Submitted"] != "auto-generated":
    fail("Auto-Submitted is %r" % msg["Auto-Submitted"])
if msg["X-Frontdesk-Generated"] not in ("digest", "alert"):
    fail("X-Frontdesk-Generated is %r" % msg["X-Frontdesk-Generated"])

parts = {p.get_content_type(): p for p in msg.iter_parts()}
if set(parts) != {"text/plain", "text/html"}:
    fail("parts %r" % sorted(parts))
# CRLF on the wire (checked above) reads as LF.
text = parts["text/plain"].get_content().replace("\r\n", "\n")
html = parts["text/html"].get_content().replace("\r\n", "\n")

for c in text:
    if (unicodedata.category(c) == "Cc" and c not in "\t\n") or "\u202a" <= c <= "\u202e" or "\u2066" <= c <= "\u2069":
        fail("control or bidi character %r in the text part" % c)

class Scan(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.data = []
        self.bad = []
    def handle_starttag(self, tag, attrs):
        if tag not in ELEMENTS:
            self.bad.append("element " + tag)
        for k, v in attrs:
            if k not in ATTRIBUTES or k.startswith("on"):
                self.bad.append("attribute %s on %s" % (k, tag))
    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
    def handle_data(self, d):
        self.data.append(d)

s = Scan()
s.feed(html)
s.close()
if s.bad:
    fail("html not from the template: %r" % s.bad[:5])
html_text = "".join(s.data)
if "\u202e" in html:
    fail("U+202E in the html part")
for sec in a.section:
    if sec not in text:
        fail("section %r missing from the text part" % sec)
    if sec.lower() not in html_text.lower():
        fail("section %r missing from the html part" % sec)
for p in a.payload:
    if p not in html_text:
        fail("payload %r not shown as text in the html part" % p)
    if p not in text:
        fail("payload %r not shown in the text part" % p)
print("ok")
