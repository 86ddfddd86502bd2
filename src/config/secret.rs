//! Secrets: read from a file, an environment variable or a systemd credential, never logged.

use std::fmt;
use std::path::PathBuf;

use super::Ctx;

/// A secret value whose Debug and Display print `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself: pass it straight to the library that needs it, never to a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The four ways a config names one secret (`password`, `password_file`, ...).
#[derive(Debug, Default)]
pub(crate) struct SecretFields {
    pub inline: Option<String>,
    pub file: Option<PathBuf>,
    pub env: Option<String>,
    pub credential: Option<String>,
}

impl SecretFields {
    /// True when any of the four is set.
    pub fn any(&self) -> bool {
        self.inline.is_some()
            || self.file.is_some()
            || self.env.is_some()
            || self.credential.is_some()
    }
}

/// Reads the secret named by exactly one of the fields; `path` is e.g. `sources[0].imap.password`.
pub(crate) fn resolve(fields: &SecretFields, path: &str, ctx: &mut Ctx) -> Option<Secret> {
    let set = [
        fields.inline.is_some(),
        fields.file.is_some(),
        fields.env.is_some(),
        fields.credential.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    let base = path.rsplit_once('.').map(|(b, _)| b).unwrap_or("");
    let name = path.rsplit('.').next().unwrap_or(path);
    let at = |suffix: &str| {
        if base.is_empty() {
            format!("{name}{suffix}")
        } else {
            format!("{base}.{name}{suffix}")
        }
    };
    if set == 0 {
        ctx.problem(
            path,
            format!("no {name} given"),
            Some(format!("set {name}_file, {name}_env or {name}_credential")),
        );
        return None;
    }
    if set > 1 {
        ctx.problem(
            path,
            format!("more than one of {name}, {name}_file, {name}_env, {name}_credential is set"),
            Some("keep exactly one".into()),
        );
        return None;
    }
    if let Some(v) = &fields.inline {
        ctx.warn(
            path,
            format!("{name} written inline in the config file"),
            Some(format!(
                "move it to {name}_file (mode 0600) or a systemd credential ({name}_credential)"
            )),
        );
        return Some(Secret::new(v.clone()));
    }
    if let Some(file) = &fields.file {
        return read_secret_file(file, &at("_file"), true, ctx);
    }
    if let Some(var) = &fields.env {
        return match std::env::var(var) {
            Ok(v) if !v.is_empty() => Some(Secret::new(v)),
            _ => {
                ctx.problem(
                    &at("_env"),
                    format!("environment variable {var} is not set or empty"),
                    Some(format!(
                        "export {var}=... before starting, or use {name}_file"
                    )),
                );
                None
            }
        };
    }
    if let Some(cred) = &fields.credential {
        let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
            ctx.problem(
                &at("_credential"),
                format!("credential `{cred}` requested but $CREDENTIALS_DIRECTORY is not set"),
                Some(format!(
                    "add `LoadCredential={cred}:/path/to/secret` to the systemd unit, or use {name}_file"
                )),
            );
            return None;
        };
        if cred.contains('/') || cred == ".." || cred.is_empty() {
            ctx.problem(
                &at("_credential"),
                format!("`{cred}` is not a credential name"),
                None,
            );
            return None;
        }
        // systemd makes credentials readable only by the service, so no mode check here.
        return read_secret_file(
            &PathBuf::from(dir).join(cred),
            &at("_credential"),
            false,
            ctx,
        );
    }
    None
}

fn read_secret_file(file: &PathBuf, path: &str, check_mode: bool, ctx: &mut Ctx) -> Option<Secret> {
    let meta = match std::fs::metadata(file) {
        Ok(m) => m,
        Err(e) => {
            ctx.problem(
                path,
                format!("cannot read secret file {}: {e}", file.display()),
                None,
            );
            return None;
        }
    };
    #[cfg(unix)]
    if check_mode {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            ctx.problem(
                path,
                format!(
                    "secret file {} is readable by group or others (mode {mode:04o})",
                    file.display()
                ),
                Some(format!("chmod 600 {}", file.display())),
            );
            return None;
        }
    }
    match std::fs::read_to_string(file) {
        Ok(s) => {
            // Files written with `echo` end in a newline that is not part of the secret.
            let v = s.trim_end_matches(['\n', '\r']).to_string();
            if v.is_empty() {
                ctx.problem(
                    path,
                    format!("secret file {} is empty", file.display()),
                    None,
                );
                None
            } else {
                Some(Secret::new(v))
            }
        }
        Err(e) => {
            ctx.problem(
                path,
                format!("cannot read secret file {}: {e}", file.display()),
                None,
            );
            None
        }
    }
}
