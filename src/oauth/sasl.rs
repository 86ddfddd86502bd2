//! SASL with an OAuth2 access token: OAUTHBEARER (RFC 7628) where the server offers it, else
//! XOAUTH2 (Google's and Microsoft's). The IMAP login step lives here so that the IMAP fetch
//! code only calls `imap_login`.

use std::fmt;

use async_imap::imap_proto::{Capability, Response};
use async_imap::{Client, Session};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{OAuthError, access_token};
use crate::config::OAuth2;

/// The SASL mechanism carrying the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// Google's XOAUTH2 (also Microsoft's).
    Xoauth2,
    /// RFC 7628 OAUTHBEARER.
    OAuthBearer,
}

impl Mechanism {
    /// The SASL name.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Xoauth2 => "XOAUTH2",
            Mechanism::OAuthBearer => "OAUTHBEARER",
        }
    }
}

/// The client's first message (before base64): it contains the token, so never log it.
pub fn initial_response(mech: Mechanism, user: &str, token: &str, host: &str, port: u16) -> String {
    match mech {
        Mechanism::Xoauth2 => format!("user={user}\x01auth=Bearer {token}\x01\x01"),
        Mechanism::OAuthBearer => {
            // RFC 5801 gs2 header: `,` and `=` in the authzid are escaped
            let authzid = user.replace('=', "=3D").replace(',', "=2C");
            format!("n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01")
        }
    }
}

/// Answers the server's challenges: the initial response first; after a failure the server
/// sends an error challenge, answered with an empty message (XOAUTH2) or `%x01` (RFC 7628 §3.2.3).
struct Answer {
    mech: Mechanism,
    first: Option<String>,
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Answer([redacted])")
    }
}

impl async_imap::Authenticator for Answer {
    type Response = Vec<u8>;

    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        match (self.first.take(), self.mech) {
            (Some(first), _) => first.into_bytes(),
            (None, Mechanism::Xoauth2) => Vec::new(),
            (None, Mechanism::OAuthBearer) => vec![1],
        }
    }
}

/// Why an OAuth2 IMAP login failed.
#[derive(Debug)]
pub enum ImapLoginError {
    /// No access token could be had.
    Token(OAuthError),
    /// The server refused a freshly refreshed token (its NO text).
    Refused(String),
    /// The connection failed.
    Imap(async_imap::error::Error),
}

/// Authenticates `client` with an access token for `cfg`; when the server refuses the cached
/// token, refreshes it once and tries again on the same connection.
pub async fn imap_login<T>(
    mut client: Client<T>,
    cfg: &OAuth2,
    host: &str,
    port: u16,
) -> Result<Session<T>, ImapLoginError>
where
    T: AsyncRead + AsyncWrite + Unpin + fmt::Debug + Send,
{
    let mech = if offers(&mut client, "OAUTHBEARER")
        .await
        .map_err(ImapLoginError::Imap)?
    {
        Mechanism::OAuthBearer
    } else {
        Mechanism::Xoauth2
    };
    let mut renew = false;
    loop {
        let token = access_token(cfg, renew)
            .await
            .map_err(ImapLoginError::Token)?;
        let answer = Answer {
            mech,
            first: Some(initial_response(
                mech,
                &cfg.username,
                token.expose(),
                host,
                port,
            )),
        };
        match client.authenticate(mech.name(), answer).await {
            Ok(session) => return Ok(session),
            Err((async_imap::error::Error::No(_), c)) if !renew => {
                tracing::info!(login = %cfg.target, "server refused the access token; refreshing it");
                client = c;
                renew = true;
            }
            Err((
                async_imap::error::Error::No(reason) | async_imap::error::Error::Bad(reason),
                _,
            )) => return Err(ImapLoginError::Refused(reason)),
            Err((e, _)) => return Err(ImapLoginError::Imap(e)),
        }
    }
}

/// Whether the server lists `AUTH=<mech>` (asked after TLS: the pre-TLS list is untrusted).
async fn offers<T>(client: &mut Client<T>, mech: &str) -> Result<bool, async_imap::error::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + fmt::Debug + Send,
{
    // async-imap keeps its command writer private on an unauthenticated client, so the command
    // goes straight to the stream with a tag of ours that cannot clash with its `A0001` series
    const TAG: &str = "fdcap";
    {
        use tokio::io::AsyncWriteExt;
        let stream = client.get_mut();
        stream
            .write_all(format!("{TAG} CAPABILITY\r\n").as_bytes())
            .await?;
        stream.flush().await?;
    }
    let mut found = false;
    loop {
        let Some(resp) = client.read_response().await? else {
            return Err(async_imap::error::Error::ConnectionLost);
        };
        match resp.parsed() {
            Response::Capabilities(caps) => {
                found |= caps
                    .iter()
                    .any(|c| matches!(c, Capability::Auth(m) if m.eq_ignore_ascii_case(mech)));
            }
            Response::Done { tag, .. } if tag.0 == TAG => return Ok(found),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_responses_follow_the_specs() {
        // Google's XOAUTH2 example shape
        assert_eq!(
            initial_response(
                Mechanism::Xoauth2,
                "someuser@example.com",
                "ya29.vF9dft4",
                "h",
                1
            ),
            "user=someuser@example.com\x01auth=Bearer ya29.vF9dft4\x01\x01"
        );
        // RFC 7628 §4.1
        assert_eq!(
            initial_response(
                Mechanism::OAuthBearer,
                "user@example.com",
                "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==",
                "server.example.com",
                143
            ),
            "n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
        );
        assert!(
            initial_response(Mechanism::OAuthBearer, "a,b=c", "t", "h", 1)
                .starts_with("n,a=a=2Cb=3Dc,")
        );
    }
}
