//! OAuth2 for IMAP and SMTP logins (Google, Microsoft 365, any RFC 6749 provider).
//!
//! `frontdesk auth login` obtains a refresh token once (`login`: device code, RFC 8628, or
//! authorization code + PKCE with a loopback redirect, RFC 8252) and keeps it in the state
//! directory (`token_store`: mode 0600, replaced atomically, rewritten when the provider rotates
//! it). At run time `access_token` hands out a cached access token, refreshing it shortly before
//! it expires or when a server refused it; `sasl` turns it into XOAUTH2 / OAUTHBEARER.
//! Tokens are `Secret`s: they never reach a log, an error message or the config.

pub mod login;
pub mod sasl;
pub mod token_store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tracing::{debug, info};

use crate::config::{LoginTarget, OAuth2, OAuth2Provider, Secret};

/// An access token is renewed when less than this is left of its life.
const RENEW_BEFORE: Duration = Duration::from_secs(60);
/// Lifetime assumed when the provider does not say (`expires_in` is optional in RFC 6749).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// Why no access token could be had.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// The provider refused the stored refresh token (`invalid_grant`).
    #[error("refresh token revoked or expired: run `frontdesk auth login {0}`")]
    Revoked(LoginTarget),
    /// No refresh token is stored yet, or it belongs to another client or endpoint.
    #[error("not logged in: run `frontdesk auth login {0}`")]
    NotLoggedIn(LoginTarget),
    /// The provider could not be reached or answered 5xx: try again later.
    #[error("token endpoint {url} unavailable: {reason}")]
    Unavailable {
        /// The endpoint.
        url: String,
        /// What went wrong (never a token).
        reason: String,
    },
    /// The provider refused the request for a reason a retry will not fix (`invalid_client`).
    #[error("token endpoint {url} refused the request: {error}")]
    Refused {
        /// The endpoint.
        url: String,
        /// The OAuth2 error code and description.
        error: String,
    },
    /// The token file could not be read or written.
    #[error("token file {path}: {reason}")]
    TokenFile {
        /// The file.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// An interactive login did not complete.
    #[error("login failed: {0}")]
    Login(String),
}

impl OAuthError {
    /// True when retrying will not help until someone acts (logs in again, fixes the config).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, OAuthError::Unavailable { .. })
    }
}

/// A successful token endpoint answer (RFC 6749 §5.1).
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    pub access_token: String,
    #[serde(default, deserialize_with = "seconds")]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<String>,
}

/// `expires_in` as a number, or as a string of digits as some providers send it.
fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seconds {
        Number(u64),
        Text(String),
    }
    Ok(match Option::<Seconds>::deserialize(d)? {
        Some(Seconds::Number(n)) => Some(n),
        Some(Seconds::Text(t)) => t.trim().parse().ok(),
        None => None,
    })
}

/// An error answer (RFC 6749 §5.2, RFC 8628 §3.5).
#[derive(Debug, Deserialize)]
pub(crate) struct ErrorResponse {
    pub error: String,
    #[serde(default)]
    pub error_description: Option<String>,
}

impl ErrorResponse {
    fn text(&self) -> String {
        match &self.error_description {
            // Descriptions are provider prose; keep them on one line and short.
            Some(d) => format!("{}: {}", self.error, crate::cli_text::one_line(d, 200)),
            None => self.error.clone(),
        }
    }
}

/// What a token endpoint said.
pub(crate) enum TokenAnswer {
    Granted(TokenResponse),
    Error(ErrorResponse),
}

/// The HTTP client for provider endpoints: bounded by `timeout`, no redirects (a token request
/// that is redirected would carry its secrets to wherever the redirect points).
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, OAuthError> {
    // reqwest (rustls-no-provider) panics without a process-wide provider; main installs ring
    // first, and this keeps library users (tests, tools) from that panic. A no-op when set.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| OAuthError::Unavailable {
            url: String::new(),
            reason: format!("cannot build the http client: {e}"),
        })
}

/// POSTs a form to `url` and reads an RFC 6749 token answer or error.
pub(crate) async fn post_form(
    client: &reqwest::Client,
    url: &str,
    form: &[(&str, &str)],
) -> Result<(reqwest::StatusCode, Vec<u8>), OAuthError> {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form.iter())
        .finish();
    let unavailable = |e: reqwest::Error| OAuthError::Unavailable {
        url: url.to_string(),
        // reqwest's error text names the URL and the cause, never the body
        reason: e.without_url().to_string(),
    };
    let resp = client
        .post(url)
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(reqwest::header::ACCEPT, "application/json")
        .body(body)
        .send()
        .await
        .map_err(unavailable)?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(unavailable)?;
    Ok((status, bytes.to_vec()))
}

/// Calls the token endpoint with `form` (client id and secret added here).
pub(crate) async fn token_request(
    client: &reqwest::Client,
    cfg: &OAuth2,
    form: &[(&str, &str)],
) -> Result<TokenAnswer, OAuthError> {
    let mut full: Vec<(&str, &str)> = form.to_vec();
    full.push(("client_id", &cfg.client_id));
    if let Some(s) = &cfg.client_secret {
        full.push(("client_secret", s.expose()));
    }
    let (status, body) = post_form(client, &cfg.token_url, &full).await?;
    if status.is_server_error() {
        return Err(OAuthError::Unavailable {
            url: cfg.token_url.clone(),
            reason: format!("http {status}"),
        });
    }
    if status.is_success() {
        return serde_json::from_slice::<TokenResponse>(&body)
            .map(TokenAnswer::Granted)
            .map_err(|e| OAuthError::Refused {
                url: cfg.token_url.clone(),
                error: format!("unreadable token answer: {e}"),
            });
    }
    match serde_json::from_slice::<ErrorResponse>(&body) {
        Ok(e) => Ok(TokenAnswer::Error(e)),
        Err(_) => Err(OAuthError::Refused {
            url: cfg.token_url.clone(),
            error: format!("http {status}"),
        }),
    }
}

/// A cached access token.
struct Cached {
    token: Secret,
    renew_at: Instant,
}

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// One slot per token file: concurrent users of one login share one refresh (a rotating
/// provider would otherwise see the same refresh token twice and revoke the family).
fn slot(file: &Path) -> Slot {
    static SLOTS: OnceLock<Mutex<HashMap<PathBuf, Slot>>> = OnceLock::new();
    let mut map = SLOTS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    map.entry(file.to_path_buf()).or_default().clone()
}

/// An access token for `cfg`: the cached one while it has more than a minute left, else a new
/// one from the refresh token. `renew` forces a refresh (the server refused the cached token).
pub async fn access_token(cfg: &OAuth2, renew: bool) -> Result<Secret, OAuthError> {
    let slot = slot(&cfg.token_file);
    let mut cached = slot.lock().await;
    if !renew
        && let Some(c) = cached.as_ref()
        && Instant::now() < c.renew_at
    {
        return Ok(c.token.clone());
    }
    *cached = None;
    let (token, lifetime) = refresh(cfg).await?;
    let margin = RENEW_BEFORE.min(lifetime / 2);
    *cached = Some(Cached {
        token: token.clone(),
        renew_at: Instant::now() + lifetime.saturating_sub(margin),
    });
    Ok(token)
}

/// Forgets the cached access token of `cfg` (after `auth login` in this process, in tests).
pub async fn forget(cfg: &OAuth2) {
    *slot(&cfg.token_file).lock().await = None;
}

/// Exchanges the stored refresh token for an access token, storing a rotated refresh token.
async fn refresh(cfg: &OAuth2) -> Result<(Secret, Duration), OAuthError> {
    let client = http_client(cfg.timeout)?;
    let mut stored = token_store::load(cfg)?;
    // Two attempts: another frontdesk process (a `sync` beside the daemon) may have rotated the
    // token between our read and our request; then the file holds the new one.
    // Microsoft's v2 endpoint wants the scopes again on refresh; Google's takes them from the grant
    let scope = cfg.scopes.join(" ");
    for attempt in 0..2 {
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", stored.refresh_token.expose()),
        ];
        if cfg.provider == OAuth2Provider::Microsoft {
            form.push(("scope", &scope));
        }
        let answer = token_request(&client, cfg, &form).await?;
        match answer {
            TokenAnswer::Granted(t) => {
                if let Some(rotated) = t.refresh_token.filter(|r| !r.is_empty())
                    && rotated != stored.refresh_token.expose()
                {
                    token_store::save(cfg, &Secret::new(rotated))?;
                    info!(login = %cfg.target, "the provider rotated the refresh token; stored the new one");
                }
                debug!(login = %cfg.target, "access token refreshed");
                let lifetime = t
                    .expires_in
                    .map(Duration::from_secs)
                    .unwrap_or(DEFAULT_LIFETIME);
                return Ok((Secret::new(t.access_token), lifetime));
            }
            TokenAnswer::Error(e) if e.error == "invalid_grant" => {
                if attempt == 0
                    && let Ok(again) = token_store::load(cfg)
                    && again.refresh_token != stored.refresh_token
                {
                    stored = again;
                    continue;
                }
                return Err(OAuthError::Revoked(cfg.target.clone()));
            }
            TokenAnswer::Error(e) => {
                return Err(OAuthError::Refused {
                    url: cfg.token_url.clone(),
                    error: e.text(),
                });
            }
        }
    }
    Err(OAuthError::Revoked(cfg.target.clone()))
}

/// Whether `cfg` still needs `frontdesk auth login` (for `frontdesk check`): the reason, or None.
pub fn login_needed(cfg: &OAuth2) -> Option<String> {
    match token_store::load(cfg) {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_answers_parse_with_numeric_or_string_lifetimes() {
        let t: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":3599,"token_type":"Bearer"}"#)
                .unwrap();
        assert_eq!(t.expires_in, Some(3599));
        assert!(t.refresh_token.is_none());
        let t: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":"3600","refresh_token":"r"}"#)
                .unwrap();
        assert_eq!(t.expires_in, Some(3600));
        let t: TokenResponse = serde_json::from_str(r#"{"access_token":"a"}"#).unwrap();
        assert_eq!(t.expires_in, None);
    }

    #[test]
    fn errors_name_the_command_that_fixes_them() {
        let t = LoginTarget::Channel("office".into());
        assert_eq!(
            OAuthError::Revoked(t.clone()).to_string(),
            "refresh token revoked or expired: run `frontdesk auth login --channel office`"
        );
        assert!(OAuthError::Revoked(t).is_permanent());
        assert!(
            !OAuthError::Unavailable {
                url: "u".into(),
                reason: "r".into()
            }
            .is_permanent()
        );
    }
}
