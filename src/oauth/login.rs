//! `frontdesk auth login`: obtains a refresh token once, interactively.
//!
//! Two flows: the device code flow (RFC 8628: the user opens a URL anywhere and types a code;
//! good for headless servers, where the provider allows it) and the authorization code flow
//! with PKCE (RFC 7636) and a loopback redirect (RFC 8252: a one-shot HTTP listener on
//! 127.0.0.1 receives the code; the URL to open is printed).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{OAuthError, TokenAnswer, http_client, post_form, token_request, token_store};
use crate::config::{OAuth2, OAuth2Provider, Secret};

/// How long a login may wait for the user.
const LOGIN_WAIT: Duration = Duration::from_secs(15 * 60);

/// Which interactive flow to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// RFC 8628 device code.
    Device,
    /// Authorization code + PKCE with a loopback redirect.
    Browser,
}

/// The device flow where the provider has one (headless servers), else the browser flow.
pub fn default_flow(cfg: &OAuth2) -> Flow {
    if cfg.device_url.is_some() {
        Flow::Device
    } else {
        Flow::Browser
    }
}

/// Runs `flow` for `cfg`, stores the refresh token and returns a one-line summary. `say`
/// receives the instructions for the user (URL, code); nothing it gets contains a token.
pub async fn login(
    cfg: &OAuth2,
    flow: Flow,
    port: u16,
    say: &mut (dyn FnMut(&str) + Send),
) -> Result<String, OAuthError> {
    let client = http_client(cfg.timeout)?;
    let granted = match flow {
        Flow::Device => device(&client, cfg, say).await?,
        Flow::Browser => browser(&client, cfg, port, say).await?,
    };
    let Some(refresh) = granted.filter(|r| !r.is_empty()) else {
        return Err(OAuthError::Login(
            "the provider returned no refresh token (ask for offline access: the offline_access scope for Microsoft, consent again for Google)".into(),
        ));
    };
    token_store::save(cfg, &Secret::new(refresh))?;
    super::forget(cfg).await;
    Ok(format!(
        "logged in as {}: refresh token stored in {} (mode 0600)",
        cfg.username,
        cfg.token_file.display()
    ))
}

#[derive(Deserialize)]
struct DeviceAuthorization {
    device_code: String,
    user_code: String,
    // RFC 8628 says verification_uri; Google says verification_url
    #[serde(alias = "verification_url")]
    verification_uri: String,
    #[serde(default)]
    verification_uri_complete: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    interval: Option<u64>,
}

/// RFC 8628: ask for a device code, show it, poll the token endpoint until the user approves.
async fn device(
    client: &reqwest::Client,
    cfg: &OAuth2,
    say: &mut (dyn FnMut(&str) + Send),
) -> Result<Option<String>, OAuthError> {
    let Some(url) = &cfg.device_url else {
        return Err(OAuthError::Login(
            "this provider has no device_url: use --browser".into(),
        ));
    };
    let scope = cfg.scopes.join(" ");
    let mut form = vec![("client_id", cfg.client_id.as_str()), ("scope", &scope)];
    if let Some(s) = &cfg.client_secret {
        form.push(("client_secret", s.expose()));
    }
    let (status, body) = post_form(client, url, &form).await?;
    if !status.is_success() {
        let why = serde_json::from_slice::<super::ErrorResponse>(&body)
            .map(|e| e.text())
            .unwrap_or_else(|_| format!("http {status}"));
        return Err(OAuthError::Login(format!(
            "device authorization at {url} refused: {why}"
        )));
    }
    let auth: DeviceAuthorization = serde_json::from_slice(&body)
        .map_err(|e| OAuthError::Login(format!("unreadable device authorization answer: {e}")))?;
    say(&format!(
        "To sign in as {}, open {} and enter the code {}\n",
        cfg.username,
        one_line(&auth.verification_uri),
        one_line(&auth.user_code)
    ));
    if let Some(complete) = &auth.verification_uri_complete {
        say(&format!("(or open {} directly)\n", one_line(complete)));
    }
    say("Waiting for the sign-in to complete...\n");
    let mut interval = Duration::from_secs(auth.interval.unwrap_or(5).clamp(1, 60));
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(auth.expires_in.unwrap_or(900)).min(LOGIN_WAIT);
    loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() > deadline {
            return Err(OAuthError::Login(
                "the device code expired before the sign-in completed".into(),
            ));
        }
        let answer = token_request(
            client,
            cfg,
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", &auth.device_code),
            ],
        )
        .await;
        match answer {
            Ok(TokenAnswer::Granted(t)) => return Ok(t.refresh_token),
            Ok(TokenAnswer::Error(e)) if e.error == "authorization_pending" => {}
            Ok(TokenAnswer::Error(e)) if e.error == "slow_down" => {
                interval += Duration::from_secs(5);
            }
            Ok(TokenAnswer::Error(e)) => {
                return Err(OAuthError::Login(format!("sign-in refused: {}", e.text())));
            }
            // a passing network fault while polling: keep polling until the deadline
            Err(OAuthError::Unavailable { .. }) => {}
            Err(e) => return Err(e),
        }
    }
}

/// PKCE pair: (verifier, S256 challenge).
fn pkce() -> (String, String) {
    let verifier = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let challenge = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

/// Authorization code + PKCE, the code arriving at a loopback listener.
async fn browser(
    client: &reqwest::Client,
    cfg: &OAuth2,
    port: u16,
    say: &mut (dyn FnMut(&str) + Send),
) -> Result<Option<String>, OAuthError> {
    let Some(auth_url) = &cfg.auth_url else {
        return Err(OAuthError::Login(
            "this provider has no auth_url: use --device".into(),
        ));
    };
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| OAuthError::Login(format!("cannot listen on 127.0.0.1:{port}: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| OAuthError::Login(e.to_string()))?
        .port();
    // Microsoft registers loopback redirects as http://localhost (any port)
    let host = match cfg.provider {
        OAuth2Provider::Microsoft => "localhost",
        _ => "127.0.0.1",
    };
    let redirect_uri = format!("http://{host}:{port}/");
    let (verifier, challenge) = pkce();
    let state = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
    let mut url =
        reqwest::Url::parse(auth_url).map_err(|e| OAuthError::Login(format!("auth_url: {e}")))?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", &cfg.client_id)
            .append_pair("redirect_uri", &redirect_uri)
            .append_pair("scope", &cfg.scopes.join(" "))
            .append_pair("state", &state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("login_hint", &cfg.username);
        if cfg.provider == OAuth2Provider::Google {
            // without these Google returns no refresh token on a repeated consent
            q.append_pair("access_type", "offline")
                .append_pair("prompt", "consent");
        }
    }
    say(&format!(
        "Open this URL in a browser and sign in as {}:\n\n  {url}\n\n",
        cfg.username
    ));
    say(&format!(
        "The browser is sent back to {redirect_uri}; on a remote server, first forward the port: ssh -L {port}:127.0.0.1:{port} SERVER\n"
    ));
    say("Waiting for the sign-in to complete...\n");
    let code = tokio::time::timeout(LOGIN_WAIT, wait_for_code(&listener, &state))
        .await
        .map_err(|_| OAuthError::Login("no sign-in within 15 minutes".into()))??;
    let answer = token_request(
        client,
        cfg,
        &[
            ("grant_type", "authorization_code"),
            ("code", code.expose()),
            ("redirect_uri", &redirect_uri),
            ("code_verifier", &verifier),
        ],
    )
    .await?;
    match answer {
        TokenAnswer::Granted(t) => Ok(t.refresh_token),
        TokenAnswer::Error(e) => Err(OAuthError::Login(format!(
            "the code was refused: {}",
            e.text()
        ))),
    }
}

/// Serves the loopback redirect until a request with our `state` arrives; returns its code.
async fn wait_for_code(listener: &TcpListener, state: &str) -> Result<Secret, OAuthError> {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let Some(target) = read_request_target(&mut conn).await else {
            continue;
        };
        match redirect_result(&target, state) {
            Redirect::NotOurs => {
                // a stray request (favicon, a scanner): keep waiting
                respond(
                    &mut conn,
                    400,
                    "This is not the sign-in frontdesk is waiting for.",
                )
                .await;
            }
            Redirect::Error(e) => {
                respond(&mut conn, 200, "Sign-in failed; see the terminal.").await;
                return Err(OAuthError::Login(format!("the provider answered: {e}")));
            }
            Redirect::Code(code) => {
                respond(
                    &mut conn,
                    200,
                    "frontdesk is signed in. You can close this tab.",
                )
                .await;
                return Ok(code);
            }
            Redirect::NoCode => respond(&mut conn, 400, "No code in this request.").await,
        }
    }
}

/// What a request to the loopback redirect listener carries.
#[derive(Debug)]
pub enum Redirect {
    /// No or another `state`: not the answer to our authorization request.
    NotOurs,
    /// The provider's error (`error=access_denied`), made printable.
    Error(String),
    /// The authorization code.
    Code(Secret),
    /// Our state but neither code nor error.
    NoCode,
}

/// Reads the redirect's request target (`/?code=..&state=..`) against the expected `state`.
pub fn redirect_result(target: &str, state: &str) -> Redirect {
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut code = None;
    let mut got_state = None;
    let mut error = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "code" if !v.is_empty() => code = Some(Secret::new(v.into_owned())),
            "state" => got_state = Some(v.into_owned()),
            "error" => error = Some(one_line(&v)),
            _ => {}
        }
    }
    // constant-time: the state is the one secret of this exchange an attacker could probe
    let ours = got_state.is_some_and(|g| {
        use subtle::ConstantTimeEq;
        bool::from(g.as_bytes().ct_eq(state.as_bytes()))
    });
    match (ours, error, code) {
        (false, _, _) => Redirect::NotOurs,
        (true, Some(e), _) => Redirect::Error(e),
        (true, None, Some(c)) => Redirect::Code(c),
        (true, None, None) => Redirect::NoCode,
    }
}

/// Reads one HTTP request head (bounded in size and time) and returns its target.
async fn read_request_target(conn: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let read = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
            let n = conn.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .ok()??;
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next()?.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => Some(target.to_string()),
        _ => None,
    }
}

async fn respond(conn: &mut TcpStream, status: u16, text: &str) {
    let reason = if status == 200 { "OK" } else { "Bad Request" };
    let body = format!("<!doctype html><title>frontdesk</title><p>{text}</p>\n");
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(resp.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// Provider-supplied text printed to the terminal: one line, no control characters.
fn one_line(s: &str) -> String {
    crate::cli_text::one_line(s, 500)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_needs_our_state() {
        assert!(
            matches!(redirect_result("/?code=c1&state=s1", "s1"), Redirect::Code(c) if c.expose() == "c1")
        );
        assert!(matches!(
            redirect_result("/?code=c1&state=s2", "s1"),
            Redirect::NotOurs
        ));
        assert!(matches!(
            redirect_result("/?code=c1", "s1"),
            Redirect::NotOurs
        ));
        assert!(matches!(
            redirect_result("/favicon.ico", "s1"),
            Redirect::NotOurs
        ));
        assert!(matches!(
            redirect_result("/?state=s1", "s1"),
            Redirect::NoCode
        ));
        assert!(matches!(
            redirect_result("/?error=access_denied%0D%0Ax&state=s1", "s1"),
            Redirect::Error(e) if e == "access_denied  x"
        ));
    }

    #[test]
    fn pkce_challenge_is_s256_of_verifier() {
        let (v, c) = pkce();
        assert_eq!(v.len(), 43);
        assert_eq!(
            c,
            URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(v.as_bytes()))
        );
        // RFC 7636 appendix B
        assert_eq!(
            URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(
                b"dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
            )),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }
}
