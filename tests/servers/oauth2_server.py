#!/usr/bin/python3
"""Test-only OAuth2 authorization server (Python stdlib), written for frontdesk's tests because
no real provider can run on loopback. It implements what frontdesk and Dovecot use:

  POST /token        RFC 6749 token endpoint: authorization_code (PKCE S256 checked),
                     refresh_token (rotation: each use returns a new refresh token and
                     invalidates the old one), urn:ietf:params:oauth:grant-type:device_code
  POST /device       RFC 8628 device authorization (interval 1 s)
  GET  /authorize    authorization endpoint: approves at once as login_hint and redirects (302)
                     to the loopback redirect_uri with code and state (the test is the browser)
  POST /introspect   RFC 7662 introspection (form `token=`), used by Dovecot's oauth2 passdb and
                     the SMTP checker: {"active": true, "username": USER} or {"active": false}

and test controls (the test plays the user and the provider's admin):
  GET  /device/approve?user_code=C&user=U   the user approves a device code
  POST /admin/expire                        every access token expires now
  POST /admin/revoke                        every refresh token is revoked (and access tokens expire)
  POST /admin/config?access_lifetime=S&rotate=0|1
  GET  /admin/state                         counters and every token ever issued (for leak sweeps)

Start: /usr/bin/python3 oauth2_server.py PORT     Stop: kill -TERM <pid>
"""
import base64, hashlib, json, secrets, signal, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlparse

PORT = int(sys.argv[1])
CLIENT_ID = "frontdesk-test"
CLIENT_SECRET = "test-client-secret"  # required when sent; public clients send none

lock = threading.Lock()
state = {
    "access": {},    # token -> {"user", "expires"}
    "refresh": {},   # token -> {"user", "scope"}
    "codes": {},     # code -> {"user", "redirect_uri", "challenge", "scope"}
    "devices": {},   # device_code -> {"user_code", "user" or None, "scope"}
    "issued": [],    # every access and refresh token handed out
    "access_lifetime": 3600,
    "rotate": True,
    "counts": {"authorization_code": 0, "refresh_token": 0, "device_code": 0,
               "invalid_grant": 0, "introspect": 0, "introspect_active": 0},
}


def new_token(prefix):
    return prefix + secrets.token_urlsafe(24)


def grant(user, scope):
    """Issues an access and a refresh token (lock held)."""
    access = new_token("at-")
    refresh = new_token("rt-")
    state["access"][access] = {"user": user, "expires": time.time() + state["access_lifetime"]}
    state["refresh"][refresh] = {"user": user, "scope": scope}
    state["issued"] += [access, refresh]
    return {"access_token": access, "token_type": "Bearer",
            "expires_in": state["access_lifetime"], "refresh_token": refresh, "scope": scope}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
        # request lines carry codes and tokens in query strings: log only method and path
        sys.stderr.write("oauth2: %s %s\n" % (self.command, self.path.split("?")[0]))

    def reply(self, status, body, headers=()):
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def error(self, code, status=400):
        self.reply(status, {"error": code, "error_description": code.replace("_", " ")})

    def form(self):
        n = int(self.headers.get("Content-Length") or 0)
        q = parse_qs(self.rfile.read(n).decode(), keep_blank_values=True)
        return {k: v[0] for k, v in q.items()}

    def client_ok(self, f):
        if f.get("client_id") != CLIENT_ID:
            return False
        return "client_secret" not in f or f["client_secret"] == CLIENT_SECRET

    def do_GET(self):
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        if u.path == "/authorize":
            if q.get("client_id") != CLIENT_ID or q.get("response_type") != "code" \
                    or q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
                return self.error("invalid_request")
            code = new_token("code-")
            with lock:
                state["codes"][code] = {"user": q.get("login_hint", "alice"),
                                        "redirect_uri": q["redirect_uri"],
                                        "challenge": q["code_challenge"],
                                        "scope": q.get("scope", "")}
            sep = "&" if "?" in q["redirect_uri"] else "?"
            loc = q["redirect_uri"] + sep + urlencode({"code": code, "state": q.get("state", "")})
            return self.reply(302, b"", [("Location", loc)])
        if u.path == "/device/approve":
            with lock:
                for d in state["devices"].values():
                    if d["user_code"] == q.get("user_code"):
                        d["user"] = q.get("user", "alice")
                        return self.reply(200, {"approved": True})
            return self.reply(404, {"approved": False})
        if u.path == "/admin/state":
            with lock:
                return self.reply(200, {"counts": state["counts"], "issued": state["issued"],
                                        "refresh_valid": list(state["refresh"]),
                                        "access_lifetime": state["access_lifetime"]})
        self.reply(404, {"error": "not found"})

    def do_POST(self):
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        f = self.form()
        if u.path == "/token":
            return self.token(f)
        if u.path == "/device":
            if not self.client_ok(f):
                return self.error("invalid_client", 401)
            dc, uc = new_token("dc-"), secrets.token_hex(4).upper()
            with lock:
                state["devices"][dc] = {"user_code": uc, "user": None, "scope": f.get("scope", "")}
            return self.reply(200, {"device_code": dc, "user_code": uc,
                                    "verification_uri": "http://127.0.0.1:%d/device/verify" % PORT,
                                    "expires_in": 300, "interval": 1})
        if u.path == "/introspect":
            with lock:
                state["counts"]["introspect"] += 1
                a = state["access"].get(f.get("token", ""))
                if a and a["expires"] > time.time():
                    state["counts"]["introspect_active"] += 1
                    return self.reply(200, {"active": True, "username": a["user"]})
            return self.reply(200, {"active": False})
        if u.path == "/admin/expire":
            with lock:
                for a in state["access"].values():
                    a["expires"] = 0
            return self.reply(200, {})
        if u.path == "/admin/revoke":
            with lock:
                state["refresh"].clear()
                for a in state["access"].values():
                    a["expires"] = 0
            return self.reply(200, {})
        if u.path == "/admin/config":
            with lock:
                if "access_lifetime" in q:
                    state["access_lifetime"] = int(q["access_lifetime"])
                if "rotate" in q:
                    state["rotate"] = q["rotate"] == "1"
            return self.reply(200, {})
        self.reply(404, {"error": "not found"})

    def token(self, f):
        if not self.client_ok(f):
            return self.error("invalid_client", 401)
        gt = f.get("grant_type")
        with lock:
            if gt == "authorization_code":
                c = state["codes"].pop(f.get("code", ""), None)
                verifier = f.get("code_verifier", "").encode()
                challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
                if not c or c["redirect_uri"] != f.get("redirect_uri") or c["challenge"] != challenge:
                    state["counts"]["invalid_grant"] += 1
                    return self.error("invalid_grant")
                state["counts"]["authorization_code"] += 1
                return self.reply(200, grant(c["user"], c["scope"]))
            if gt == "urn:ietf:params:oauth:grant-type:device_code":
                d = state["devices"].get(f.get("device_code", ""))
                if not d:
                    return self.error("expired_token")
                if d["user"] is None:
                    return self.error("authorization_pending")
                del state["devices"][f["device_code"]]
                state["counts"]["device_code"] += 1
                return self.reply(200, grant(d["user"], d["scope"]))
            if gt == "refresh_token":
                rt = f.get("refresh_token", "")
                r = state["refresh"].get(rt)
                if not r:
                    state["counts"]["invalid_grant"] += 1
                    return self.error("invalid_grant")
                state["counts"]["refresh_token"] += 1
                body = grant(r["user"], r["scope"])
                if state["rotate"]:
                    del state["refresh"][rt]
                else:
                    del state["refresh"][body["refresh_token"]]
                    del body["refresh_token"]
                return self.reply(200, body)
        return self.error("unsupported_grant_type")


server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
server.daemon_threads = True
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
print("oauth2 test server on 127.0.0.1:%d" % PORT, flush=True)
server.serve_forever()
print("oauth2 test server stopped", flush=True)
