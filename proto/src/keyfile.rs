//! Signing keys kept in one file, readable by their owner only: the
//! gateway's identity (Ed25519 or SM2) and ingest's digest key (Ed25519).
//!
//! File format: one line, the algorithm's prefix and 64 hex digits:
//! - `guantong-ed25519-seed-v1 <hex>`: the 32-byte Ed25519 seed (RFC 8032);
//! - `guantong-sm2-secret-v1 <hex>`: the SM2 secret scalar d, 32 bytes
//!   big-endian, `1 ≤ d ≤ n - 2`.
//!
//! A file of one algorithm is never read as, or replaced by, a key of the
//! other: changing algorithms means moving the file away (a new key).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use crate::chain::{Algorithm, ChainKey};

const PREFIX: &str = "guantong-ed25519-seed-v1 ";
const SM2_PREFIX: &str = "guantong-sm2-secret-v1 ";

fn prefix(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Ed25519 => PREFIX,
        Algorithm::Sm2 => SM2_PREFIX,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {path} is not a Guantong key file (expected `{PREFIX}<64 hex digits>` or `{SM2_PREFIX}<64 hex digits>`)"
    )]
    Malformed { path: PathBuf },
    #[error(
        "key file {path} holds an {found} key but the configuration asks for {wanted}; to change \
         algorithms move the file away (a new key is created, which ingest refuses as a key change \
         until the gateway is registered again with it)"
    )]
    OtherAlgorithm {
        path: PathBuf,
        found: Algorithm,
        wanted: Algorithm,
    },
}

/// Loads the chain key of `algorithm` at `path`, creating it (mode 0600)
/// when the file does not exist. Returns the key and whether it was created
/// now.
pub fn load_or_create_chain_key(
    path: &Path,
    algorithm: Algorithm,
) -> Result<(ChainKey, bool), KeyFileError> {
    let malformed = || KeyFileError::Malformed {
        path: path.to_path_buf(),
    };
    let (secret, created) = load_or_create_secret(path, algorithm, || {
        loop {
            let secret: [u8; 32] = rand::random();
            // Ed25519 takes any seed; an SM2 scalar must be in [1, n-2].
            if algorithm == Algorithm::Ed25519 || ChainKey::sm2_from_secret(&secret).is_some() {
                return secret;
            }
        }
    })?;
    let key = match algorithm {
        Algorithm::Ed25519 => ChainKey::Ed25519(SigningKey::from_bytes(&secret)),
        Algorithm::Sm2 => ChainKey::sm2_from_secret(&secret).ok_or_else(malformed)?,
    };
    Ok((key, created))
}

/// Loads the key at `path`, creating it (mode 0600) when it does not exist.
/// Returns the key and whether it was created now.
pub fn load_or_create(path: &Path) -> Result<(SigningKey, bool), KeyFileError> {
    let (seed, created) = load_or_create_secret(path, Algorithm::Ed25519, rand::random)?;
    Ok((SigningKey::from_bytes(&seed), created))
}

/// The 32 secret bytes of the `algorithm` key file at `path`, created from
/// `new_secret` when the file does not exist.
fn load_or_create_secret(
    path: &Path,
    algorithm: Algorithm,
    new_secret: impl FnOnce() -> [u8; 32],
) -> Result<([u8; 32], bool), KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let text = text.trim();
            if let Some(found) = Algorithm::ALL
                .into_iter()
                .find(|a| *a != algorithm && text.starts_with(prefix(*a)))
            {
                return Err(KeyFileError::OtherAlgorithm {
                    path: path.to_path_buf(),
                    found,
                    wanted: algorithm,
                });
            }
            let seed = text
                .strip_prefix(prefix(algorithm))
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| KeyFileError::Malformed {
                    path: path.to_path_buf(),
                })?;
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(file = %path.display(), mode = format_args!("{:o}", mode & 0o777), "key file is readable by others; run chmod 600 on it");
            }
            Ok((seed, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let seed = new_secret();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            writeln!(f, "{}{}", prefix(algorithm), hex::encode(seed)).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok((seed, true))
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

    #[test]
    fn an_sm2_key_file_is_its_own_format_and_never_read_as_ed25519() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sm2.key");
        let (a, created) = load_or_create_chain_key(&path, Algorithm::Sm2).expect("create");
        assert!(created);
        assert_eq!(a.algorithm(), Algorithm::Sm2);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("guantong-sm2-secret-v1 "), "{text}");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) = load_or_create_chain_key(&path, Algorithm::Sm2).expect("load");
        assert!(!created);
        assert_eq!(a.public_key(), b.public_key());
        let err = load_or_create_chain_key(&path, Algorithm::Ed25519)
            .err()
            .expect("an SM2 file is not an Ed25519 key");
        assert!(
            matches!(
                err,
                KeyFileError::OtherAlgorithm {
                    found: Algorithm::Sm2,
                    wanted: Algorithm::Ed25519,
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(
            load_or_create(&path),
            Err(KeyFileError::OtherAlgorithm { .. })
        ));
        // The golden secret of chain.rs, written by hand, loads as that key.
        std::fs::write(
            &path,
            format!("guantong-sm2-secret-v1 {}\n", "07".repeat(32)),
        )
        .expect("write");
        let (k, _) = load_or_create_chain_key(&path, Algorithm::Sm2).expect("load");
        assert_eq!(hex::encode(&k.public_key()[..5]), "04df07dc0b");
        // A scalar out of range is named as malformed, not a panic.
        std::fs::write(
            &path,
            format!("guantong-sm2-secret-v1 {}\n", "00".repeat(32)),
        )
        .expect("write");
        assert!(matches!(
            load_or_create_chain_key(&path, Algorithm::Sm2),
            Err(KeyFileError::Malformed { .. })
        ));
    }
}
