//! Ed25519 signing keys kept in one file, readable by their owner only: the
//! gateway's identity and ingest's digest key.
//!
//! File format: one line, `guantong-ed25519-seed-v1 <64 hex digits>`.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

const PREFIX: &str = "guantong-ed25519-seed-v1 ";

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} is not a Guantong key file (expected `{PREFIX}<64 hex digits>`)")]
    Malformed { path: PathBuf },
}

/// Loads the key at `path`, creating it (mode 0600) when it does not exist.
/// Returns the key and whether it was created now.
pub fn load_or_create(path: &Path) -> Result<(SigningKey, bool), KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let seed = text
                .trim()
                .strip_prefix(PREFIX)
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| KeyFileError::Malformed {
                    path: path.to_path_buf(),
                })?;
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(file = %path.display(), mode = format_args!("{:o}", mode & 0o777), "key file is readable by others; run chmod 600 on it");
            }
            Ok((SigningKey::from_bytes(&seed), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let seed: [u8; 32] = rand::random();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            writeln!(f, "{PREFIX}{}", hex::encode(seed)).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok((SigningKey::from_bytes(&seed), true))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_an_owner_only_key_once_and_loads_it_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/some.key");
        let (a, created) = load_or_create(&path).expect("create");
        assert!(created);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) = load_or_create(&path).expect("load");
        assert!(!created);
        assert_eq!(a.to_bytes(), b.to_bytes());
        std::fs::write(&path, "not a key").expect("write");
        assert!(matches!(
            load_or_create(&path),
            Err(KeyFileError::Malformed { .. })
        ));
    }
}
