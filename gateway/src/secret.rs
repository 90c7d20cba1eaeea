//! Secrets in the config: from the file itself, a file of their own, or an
//! environment variable; and a warning when a file holding one is readable
//! by others.
//!
//! `[uplink]` takes exactly one of `token`, `token_file` (its content,
//! trimmed) and `token_env` (a variable's value). Paths are relative to the
//! config file. Files are read once at load; the TLS files (`ca_file`,
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

    let sources = usize::from(!u.token.is_empty())
        + usize::from(u.token_file.is_some())
        + usize::from(u.token_env.is_some());
    if sources > 1 {
        problems.push(
            "uplink.token",
            "set only one of `token`, `token_file` and `token_env`",
        );
        return;
    }
    if let Some(path) = &u.token_file {
        match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => u.token = text.trim().to_string(),
            Ok(_) => problems.push("uplink.token_file", format!("{} is empty", path.display())),
            Err(e) => problems.push(
                "uplink.token_file",
                format!("cannot read {}: {e}", path.display()),
            ),
        }
    }
    if let Some(var) = &u.token_env {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => u.token = v.trim().to_string(),
            _ => problems.push(
                "uplink.token_env",
                format!("environment variable `{var}` is not set or empty"),
            ),
        }
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
    if u.plaintext {
        warn!(endpoint = %u.endpoint, "uplink.plaintext: no TLS, the token and data cross the network in clear (local testing only)");
    }
}
