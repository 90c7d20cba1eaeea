//! Evidence an auditor can take away: bundles, their offline verifier, and
//! daily signed digests. The format, algorithms and hash inputs are specified
//! byte by byte in docs/evidence.md; the chain itself in
//! `guantong_proto::chain`.
//!
//! - `bundle`: the self-contained bundle (JSON), written by
//!   `guantong-ingest export-evidence` from the store.
//! - `verify`: checks a bundle with nothing else (`guantong-ingest verify`).
//! - `digest`: per gateway and UTC day, a Merkle root over the day's link
//!   hashes, signed by ingest's own key (`ingest.key` in the data directory).
//! - `points`: the canonical form of a point, used to compare what the query
//!   tables serve with what the gateway signed.
//!
//! Export and digest functions take a list of gateway ids, so that a group of
//! gateways (an enterprise) resolves to that list.

pub mod bundle;
pub mod digest;
pub mod points;
pub mod verify;

/// The file of ingest's digest key in the data directory.
pub const KEY_FILE: &str = "ingest.key";

use std::path::Path;

use bundle::Bundle;
use digest::SignedDigest;

#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not {what}: {message}")]
    Format {
        path: String,
        what: &'static str,
        message: String,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> EvidenceError + '_ {
    move |source| EvidenceError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub fn write_bundle(path: &Path, bundle: &Bundle) -> Result<(), EvidenceError> {
    let json = bundle_bytes(bundle).map_err(|message| EvidenceError::Format {
        path: path.display().to_string(),
        what: "writable",
        message,
    })?;
    std::fs::write(path, json).map_err(io(path))
}

/// A bundle's fingerprint: SHA-256 (hex) of its compact JSON with
/// `created_at_ms` set to 0, so the same window of the same data has the
/// same fingerprint whenever it is exported. The report's footer shows it;
/// `verify` prints it for the dossier's bundle. The one place it is computed.
pub fn fingerprint(bundle: &Bundle) -> String {
    use sha2::Digest as _;
    let mut value = serde_json::to_value(bundle).unwrap_or_default();
    if let Some(created) = value.get_mut("created_at_ms") {
        *created = serde_json::Value::from(0);
    }
    let bytes = serde_json::to_vec(&value).unwrap_or_default();
    hex::encode(sha2::Sha256::digest(&bytes))
}

/// A bundle as its file holds it (pretty JSON), on disk or over HTTP.
pub fn bundle_bytes(bundle: &Bundle) -> Result<Vec<u8>, String> {
    serde_json::to_vec_pretty(bundle).map_err(|e| e.to_string())
}

pub fn read_bundle(path: &Path) -> Result<Bundle, EvidenceError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| EvidenceError::Format {
        path: path.display().to_string(),
        what: "an evidence bundle",
        message: e.to_string(),
    })
}

/// Digests kept by a supervisor: `{"digests": [...]}` as served, a list, or
/// one digest.
pub fn read_digests(path: &Path) -> Result<Vec<SignedDigest>, EvidenceError> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Kept {
        Served { digests: Vec<SignedDigest> },
        List(Vec<SignedDigest>),
        One(SignedDigest),
    }
    let bytes = std::fs::read(path).map_err(io(path))?;
    match serde_json::from_slice(&bytes).map_err(|e| EvidenceError::Format {
        path: path.display().to_string(),
        what: "digests",
        message: e.to_string(),
    })? {
        Kept::Served { digests } | Kept::List(digests) => Ok(digests),
        Kept::One(d) => Ok(vec![d]),
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    /// A bundle's fingerprint is taken of the values in memory and again of
    /// the values read back from its file (`verify`): every f64 must read back
    /// as written. Without serde_json's `float_roundtrip` some do not.
    #[test]
    fn every_f64_in_a_bundle_reads_back_as_written() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let mut wrong = Vec::new();
        for _ in 0..200_000 {
            let x = f64::from_bits(rng.random::<u64>());
            if !x.is_finite() {
                continue;
            }
            let json = serde_json::to_string(&x).expect("a finite f64 is JSON");
            let back: f64 = serde_json::from_str(&json).expect("JSON it wrote");
            if back.to_bits() != x.to_bits() {
                wrong.push(json);
            }
        }
        assert!(
            wrong.is_empty(),
            "{} values read back changed, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(3)]
        );
    }
}
