//! Secrets in the config: from the file itself, a file of their own, or an
//! environment variable; and a warning when a file holding one is readable
//! by others.
//!
//! `[uplink]` takes exactly one of `token`, `token_file` (its content,
//! trimmed) and `token_env` (a variable's value); an MQTT device at most one
//! of `password`, `password_file` and `password_env`. Paths are relative to
//! the config file. Files are read once at load; the TLS files (`ca_file`,
//! `cert_file`, `key_file`) are checked to be readable at load and read again
//! at every connection.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::config::{Config, Problems, UplinkConfig};

/// Resolves the token source and the TLS file paths of `u`, adding to
/// `problems` what is wrong.
pub(crate) fn resolve_uplink(u: &mut UplinkConfig, base_dir: &Path, problems: &mut Problems) {
    let absolute = |p: &mut Option<PathBuf>| {
        if let Some(path) = p
            && path.is_relative()
        {
            *path = base_dir.join(&*path);
        }
    };
    absolute(&mut u.token_file);
    absolute(&mut u.ca_file);
    absolute(&mut u.cert_file);
    absolute(&mut u.key_file);

    let inline = (!u.token.is_empty()).then(|| u.token.clone());
    if let Some(token) = resolve(
        inline,
        u.token_file.as_deref(),
        u.token_env.as_deref(),
        "uplink.token",
        problems,
    ) {
        u.token = token;
    }
    if u.cert_file.is_some() != u.key_file.is_some() {
        problems.push(
            "uplink.cert_file",
            "`cert_file` and `key_file` go together (a client certificate and its key)",
        );
    }
    for (key, path) in [
        ("uplink.ca_file", &u.ca_file),
        ("uplink.cert_file", &u.cert_file),
        ("uplink.key_file", &u.key_file),
    ] {
        if let Some(path) = path
            && let Err(e) = std::fs::File::open(path)
        {
            problems.push(key, format!("cannot read {}: {e}", path.display()));
        }
    }
    if u.plaintext && (u.ca_file.is_some() || u.cert_file.is_some()) {
        problems.push(
            "uplink.plaintext",
            "`plaintext = true` cannot use `ca_file`, `cert_file` or `key_file`",
        );
    }
}

/// The secret from exactly one of `inline`, the file `file` (trimmed) or
/// the environment variable `env`; problems are recorded under `at`
/// (`uplink.token`) and `at` + `_file` / `_env`.
pub(crate) fn resolve(
    inline: Option<String>,
    file: Option<&Path>,
    env: Option<&str>,
    at: &str,
    problems: &mut Problems,
) -> Option<String> {
    let key = at.rsplit('.').next().unwrap_or(at);
    let sources =
        usize::from(inline.is_some()) + usize::from(file.is_some()) + usize::from(env.is_some());
    if sources > 1 {
        problems.push(
            at,
            format!("set only one of `{key}`, `{key}_file` and `{key}_env`"),
        );
        return None;
    }
    if let Some(path) = file {
        return match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => Some(text.trim().to_string()),
            Ok(_) => {
                problems.push(format!("{at}_file"), format!("{} is empty", path.display()));
                None
            }
            Err(e) => {
                problems.push(
                    format!("{at}_file"),
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
        };
    }
    if let Some(var) = env {
        return match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Some(v.trim().to_string()),
            _ => {
                problems.push(
                    format!("{at}_env"),
                    format!("environment variable `{var}` is not set or empty"),
                );
                None
            }
        };
    }
    inline
}

/// Whether the file at `path` can be read by its group or others.
pub fn readable_by_others(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

/// Warns about every secret-holding file of `config` that others can read,
/// and about a plaintext uplink. Called at every start.
pub fn warn_at_start(config: &Config) {
    let u = &config.uplink;
    for (what, path) in [("token_file", &u.token_file), ("key_file", &u.key_file)] {
        if let Some(path) = path
            && readable_by_others(path)
        {
            warn!(file = %path.display(), key = what, "secret file is readable by others; run chmod 600 on it");
        }
    }
    for d in &config.devices {
        for path in d.protocol().secret_files() {
            if readable_by_others(path) {
                warn!(file = %path.display(), device = %d.id(), "secret file is readable by others; run chmod 600 on it");
            }
        }
    }
    if u.plaintext {
        warn!(endpoints = %u.endpoints.join(" "), "uplink.plaintext: no TLS, the token and data cross the network in clear (local testing only)");
    }
}
