//! The refresh token of each OAuth2 login: one JSON file under `STATE/oauth2/`, mode 0600 in a
//! 0700 directory, replaced atomically (temp file + fsync + rename + directory fsync) so a crash
//! leaves either the old token or the new one, never half of one.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::OAuthError;
use crate::config::{OAuth2, Secret};

/// What is kept for one login.
#[derive(Debug)]
pub struct Stored {
    /// The refresh token.
    pub refresh_token: Secret,
}

#[derive(Serialize, Deserialize)]
struct File {
    refresh_token: String,
    /// The client and endpoint the token was issued to: a token for another client is useless.
    client_id: String,
    token_url: String,
    username: String,
    saved_at: String,
}

fn file_error(path: &Path, reason: impl ToString) -> OAuthError {
    OAuthError::TokenFile {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Reads the refresh token of `cfg`; `NotLoggedIn` when there is none for this client.
pub fn load(cfg: &OAuth2) -> Result<Stored, OAuthError> {
    let path = &cfg.token_file;
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(OAuthError::NotLoggedIn(cfg.target.clone()));
        }
        Err(e) => return Err(file_error(path, e)),
    };
    // serde_json's error names a position, not the content, so it cannot leak the token
    let file: File = serde_json::from_slice(&bytes).map_err(|e| file_error(path, e))?;
    if file.client_id != cfg.client_id
        || file.token_url != cfg.token_url
        || file.refresh_token.is_empty()
    {
        return Err(OAuthError::NotLoggedIn(cfg.target.clone()));
    }
    Ok(Stored {
        refresh_token: Secret::new(file.refresh_token),
    })
}

/// Stores `refresh_token` for `cfg`, replacing any previous one atomically.
pub fn save(cfg: &OAuth2, refresh_token: &Secret) -> Result<(), OAuthError> {
    let path = &cfg.token_file;
    let dir = path
        .parent()
        .ok_or_else(|| file_error(path, "no parent directory"))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| file_error(dir, e))?;
    // an existing directory keeps its mode; tighten it in case it was made by hand
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let body = serde_json::to_vec_pretty(&File {
        refresh_token: refresh_token.expose().to_string(),
        client_id: cfg.client_id.clone(),
        token_url: cfg.token_url.clone(),
        username: cfg.username.clone(),
        saved_at: Utc::now().to_rfc3339(),
    })
    .map_err(|e| file_error(path, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(file_error(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LoginTarget, OAuth2Provider};
    use std::time::Duration;

    fn cfg(dir: &Path) -> OAuth2 {
        OAuth2 {
            provider: OAuth2Provider::Custom,
            client_id: "client".into(),
            client_secret: None,
            token_url: "http://127.0.0.1:1/token".into(),
            device_url: None,
            auth_url: Some("http://127.0.0.1:1/authorize".into()),
            scopes: vec!["mail".into()],
            username: "alice".into(),
            target: LoginTarget::Source("mail".into()),
            token_file: dir.join("state/oauth2/source-mail.json"),
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn saved_token_is_private_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        assert!(matches!(load(&c), Err(OAuthError::NotLoggedIn(_))));
        save(&c, &Secret::new("first")).unwrap();
        save(&c, &Secret::new("second")).unwrap();
        assert_eq!(load(&c).unwrap().refresh_token.expose(), "second");
        let mode = std::fs::metadata(&c.token_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(c.token_file.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        // no temp file left behind
        let names: Vec<_> = std::fs::read_dir(c.token_file.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn token_of_another_client_means_login_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        save(&c, &Secret::new("tok")).unwrap();
        c.client_id = "other".into();
        let err = load(&c).unwrap_err();
        assert_eq!(
            err.to_string(),
            "not logged in: run `frontdesk auth login --source mail`"
        );
    }
}
