//! `auth: {oauth2: {...}}` for IMAP sources and SMTP channels: provider presets (hosts, ports,
//! endpoints, scopes) and validation. The refresh token itself never appears in the config: it
//! lives in the state directory, written by `frontdesk auth login` (see `crate::oauth`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{RawOAuth2, RawOAuth2Provider};
use super::{Ctx, Secret, TlsMode, is_loopback_host, secret};

/// Which OAuth2 provider a login talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuth2Provider {
    /// Google Workspace / Gmail.
    Google,
    /// Microsoft 365.
    Microsoft,
    /// Endpoints given in the config.
    Custom,
}

/// What `frontdesk auth login` is told to log in: `--source NAME` or `--channel NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginTarget {
    /// An IMAP source.
    Source(String),
    /// An SMTP channel.
    Channel(String),
}

impl LoginTarget {
    /// The configured name.
    pub fn name(&self) -> &str {
        match self {
            LoginTarget::Source(n) | LoginTarget::Channel(n) => n,
        }
    }
}

impl fmt::Display for LoginTarget {
    /// The `auth login` arguments, e.g. `--source support-mail`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoginTarget::Source(n) => write!(f, "--source {n}"),
            LoginTarget::Channel(n) => write!(f, "--channel {n}"),
        }
    }
}

/// The OAuth2 settings of one IMAP source or SMTP channel, presets applied.
#[derive(Debug, Clone, PartialEq)]
pub struct OAuth2 {
    /// The provider preset.
    pub provider: OAuth2Provider,
    /// The app registration's client id.
    pub client_id: String,
    /// The client secret, when the app has one (Google desktop apps, confidential clients).
    pub client_secret: Option<Secret>,
    /// Token endpoint.
    pub token_url: String,
    /// Device authorization endpoint (RFC 8628), when the provider allows the device flow.
    pub device_url: Option<String>,
    /// Authorization endpoint for the browser flow (RFC 8252 loopback redirect).
    pub auth_url: Option<String>,
    /// Scopes asked for at login.
    pub scopes: Vec<String>,
    /// The mailbox the token is for (the SASL user).
    pub username: String,
    /// What `auth login` needs to be told to renew this login.
    pub target: LoginTarget,
    /// Where the refresh token is kept (mode 0600).
    pub token_file: PathBuf,
    /// Timeout of one request to the provider.
    pub timeout: Duration,
}

/// Which protocol a login is for (the presets differ in host and scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    Imap,
    Smtp,
}

/// The preset server of a provider: (host, tls) for IMAP or SMTP.
pub(crate) fn preset_server(
    provider: RawOAuth2Provider,
    service: Service,
) -> Option<(&'static str, TlsMode)> {
    match (provider, service) {
        (RawOAuth2Provider::Google, Service::Imap) => Some(("imap.gmail.com", TlsMode::Implicit)),
        (RawOAuth2Provider::Google, Service::Smtp) => Some(("smtp.gmail.com", TlsMode::Implicit)),
        (RawOAuth2Provider::Microsoft, Service::Imap) => {
            Some(("outlook.office365.com", TlsMode::Implicit))
        }
        // Microsoft 365 offers SMTP submission only with STARTTLS on 587.
        (RawOAuth2Provider::Microsoft, Service::Smtp) => {
            Some(("smtp.office365.com", TlsMode::Starttls))
        }
        (RawOAuth2Provider::Custom, _) => None,
    }
}

/// The token file of a login: `STATE/oauth2/source-NAME.json` or `channel-NAME.json`.
pub fn token_file(state_dir: &Path, target: &LoginTarget) -> PathBuf {
    let file = match target {
        LoginTarget::Source(n) => format!("source-{n}.json"),
        LoginTarget::Channel(n) => format!("channel-{n}.json"),
    };
    state_dir.join("oauth2").join(file)
}

/// Validates `auth.oauth2` at `path` (e.g. `sources[0].imap.auth.oauth2`).
pub(crate) fn validate(
    raw: RawOAuth2,
    service: Service,
    target: LoginTarget,
    username: &str,
    state_dir: &Path,
    path: &str,
    ctx: &mut Ctx,
) -> Option<OAuth2> {
    let mut ok = true;
    if raw.client_id.trim().is_empty() {
        ctx.problem(
            &format!("{path}.client_id"),
            "empty client_id".into(),
            Some("copy the application (client) id from the provider's app registration".into()),
        );
        ok = false;
    }
    let secret_fields = secret::SecretFields {
        inline: raw.client_secret,
        file: raw.client_secret_file,
        env: raw.client_secret_env,
        credential: raw.client_secret_credential,
    };
    let client_secret = if secret_fields.any() {
        let s = secret::resolve(&secret_fields, &format!("{path}.client_secret"), ctx);
        ok &= s.is_some();
        s
    } else {
        None
    };
    if raw.tenant.is_some() && !matches!(raw.provider, RawOAuth2Provider::Microsoft) {
        ctx.problem(
            &format!("{path}.tenant"),
            "tenant is only used with provider: microsoft".into(),
            Some("remove it".into()),
        );
        ok = false;
    }
    let tenant = raw.tenant.unwrap_or_else(|| "organizations".into());
    if tenant.is_empty()
        || !tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        ctx.problem(
            &format!("{path}.tenant"),
            format!("`{tenant}` is not a tenant id or domain"),
            Some(
                "use the directory (tenant) id, a domain such as example.com, or organizations"
                    .into(),
            ),
        );
        ok = false;
    }
    let ms = |end: &str| format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{end}");
    let (token_url, device_url, auth_url, scopes): (
        Option<String>,
        Option<String>,
        Option<String>,
        Vec<String>,
    ) = match raw.provider {
        RawOAuth2Provider::Google => (
            Some("https://oauth2.googleapis.com/token".into()),
            // Google's device flow does not allow the Gmail scope: the browser flow it is.
            None,
            Some("https://accounts.google.com/o/oauth2/v2/auth".into()),
            vec!["https://mail.google.com/".into()],
        ),
        RawOAuth2Provider::Microsoft => (
            Some(ms("token")),
            Some(ms("devicecode")),
            Some(ms("authorize")),
            match service {
                Service::Imap => vec![
                    "https://outlook.office.com/IMAP.AccessAsUser.All".into(),
                    "offline_access".into(),
                ],
                Service::Smtp => vec![
                    "https://outlook.office.com/SMTP.Send".into(),
                    "offline_access".into(),
                ],
            },
        ),
        RawOAuth2Provider::Custom => (None, None, None, Vec::new()),
    };
    let token_url = raw.token_url.or(token_url);
    let device_url = raw.device_url.or(device_url);
    let auth_url = raw.auth_url.or(auth_url);
    let scopes = raw.scopes.unwrap_or(scopes);
    let Some(token_url) = token_url else {
        ctx.problem(
            &format!("{path}.token_url"),
            "provider: custom needs token_url".into(),
            Some(
                "set token_url, and auth_url or device_url, from the provider's documentation"
                    .into(),
            ),
        );
        return None;
    };
    if device_url.is_none() && auth_url.is_none() {
        ctx.problem(
            &format!("{path}.auth_url"),
            "neither auth_url nor device_url is set, so `frontdesk auth login` has no way to log in".into(),
            Some("set auth_url (browser login) or device_url (device code login)".into()),
        );
        ok = false;
    }
    for (key, url) in [
        ("token_url", Some(&token_url)),
        ("device_url", device_url.as_ref()),
        ("auth_url", auth_url.as_ref()),
    ] {
        if let Some(url) = url {
            ok &= check_url(url, &format!("{path}.{key}"), ctx);
        }
    }
    if scopes.is_empty()
        || scopes
            .iter()
            .any(|s| s.trim().is_empty() || s.contains(' '))
    {
        ctx.problem(
            &format!("{path}.scopes"),
            "scopes must be a non-empty list of single scopes".into(),
            Some("e.g. [\"https://mail.google.com/\"]".into()),
        );
        ok = false;
    }
    if !ok {
        return None;
    }
    Some(OAuth2 {
        provider: match raw.provider {
            RawOAuth2Provider::Google => OAuth2Provider::Google,
            RawOAuth2Provider::Microsoft => OAuth2Provider::Microsoft,
            RawOAuth2Provider::Custom => OAuth2Provider::Custom,
        },
        client_id: raw.client_id,
        client_secret,
        token_url,
        device_url,
        auth_url,
        scopes,
        username: username.to_string(),
        token_file: token_file(state_dir, &target),
        target,
        timeout: Duration::from_secs(30),
    })
}

/// Endpoints must be https: tokens and codes travel through them. Plain http only to loopback.
fn check_url(url: &str, path: &str, ctx: &mut Ctx) -> bool {
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "https" => true,
        Ok(u) if u.scheme() == "http" && u.host_str().is_some_and(is_loopback_host) => true,
        Ok(_) => {
            ctx.problem(
                path,
                format!("`{url}` is not an https URL"),
                Some(
                    "tokens must not travel in clear text; plain http is allowed only to loopback"
                        .into(),
                ),
            );
            false
        }
        Err(e) => {
            ctx.problem(path, format!("`{url}` is not a URL: {e}"), None);
            false
        }
    }
}
