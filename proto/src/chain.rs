//! The evidence chain format, shared byte for byte by the gateway (which
//! signs), ingest (which verifies on receipt) and offline verifiers.
//!
//! It is part of the contract, like the `.proto` file: changing anything here
//! breaks evidence already handed out, which the golden vectors below catch.
//!
//! # Format, version 1
//! - Each batch of a buffer is a link. Its **link hash** is
//!   `SHA-256("guantong/chain/v1" ‖ prev_hash ‖ payload)`, where `payload` is
//!   the exact encoded `Batch` bytes and `prev_hash` the previous link's hash.
//! - The first link of a buffer has `prev_hash = genesis(gateway_id, buffer_id)`
//!   = `SHA-256("guantong/genesis/v1" ‖ gateway_id ‖ buffer_id as 8 bytes big-endian)`.
//! - The gateway signs the 32-byte link hash with Ed25519 (RFC 8032, its
//!   own key; SM2/SM3 reserved).
//! - A loss record that replaces links k..=m has `prev_hash` = link k's
//!   `prev_hash` and carries `Loss.bridge_hash` = link m's hash; the chain
//!   continues from the bridge hash. The loss record is itself signed.
//! - Links are ordered by sequence number, whatever order they arrive in.
//! - A **manifest link** is a batch without points whose `manifest_sha256` is
//!   `manifest_hash` of the manifest its `manifest_version` names:
//!   `SHA-256("guantong/manifest/v1" ‖ the Manifest encoded with version = 0
//!   and created_at_ms = 0)` (protobuf encoding, fields in number order, map
//!   entries in key order). The gateway commits one whenever its manifest
//!   changes, so configuration changes are part of the chain.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

pub const HASH_LEN: usize = 32;
pub type Hash = [u8; HASH_LEN];

const LINK_DOMAIN: &[u8] = b"guantong/chain/v1";
const GENESIS_DOMAIN: &[u8] = b"guantong/genesis/v1";
const MANIFEST_DOMAIN: &[u8] = b"guantong/manifest/v1";

/// The hash a manifest link carries (see the module doc).
pub fn manifest_hash(manifest: &crate::v1::Manifest) -> Hash {
    use prost::Message;
    let canonical = crate::v1::Manifest {
        version: 0,
        created_at_ms: 0,
        ..manifest.clone()
    };
    let mut h = Sha256::new();
    h.update(MANIFEST_DOMAIN);
    h.update(canonical.encode_to_vec());
    h.finalize().into()
}

/// The `prev_hash` of a buffer's first link.
pub fn genesis(gateway_id: &str, buffer_id: u64) -> Hash {
    let mut h = Sha256::new();
    h.update(GENESIS_DOMAIN);
    h.update(gateway_id.as_bytes());
    h.update(buffer_id.to_be_bytes());
    h.finalize().into()
}

/// The link hash of `payload` chained after `prev`.
pub fn link_hash(prev: &Hash, payload: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(LINK_DOMAIN);
    h.update(prev);
    h.update(payload);
    h.finalize().into()
}

pub fn sign(key: &SigningKey, link: &Hash) -> [u8; 64] {
    key.sign(link).to_bytes()
}

/// Whether `signature` is `public_key`'s Ed25519 signature over `link`.
pub fn verify(public_key: &[u8], link: &Hash, signature: &[u8]) -> bool {
    let Ok(pk) = <[u8; 32]>::try_from(public_key) else {
        return false;
    };
    let Ok(key) = VerifyingKey::from_bytes(&pk) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(signature) else {
        return false;
    };
    key.verify(link, &sig).is_ok()
}

/// Short, stable name of a public key for people: SHA-256, first 16 bytes,
/// hex in groups of four.
pub fn fingerprint(public_key: &[u8]) -> String {
    let digest = Sha256::digest(public_key);
    let hex = hex::encode(&digest[..16]);
    hex.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

pub fn to_hash(bytes: &[u8]) -> Option<Hash> {
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden vectors: if any of these change, evidence signed earlier no
    /// longer verifies. Never update them to make a test pass. They were
    /// computed independently (Python's hashlib and `cryptography` Ed25519).
    #[test]
    fn golden_vectors_of_format_v1() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let g = genesis("gw-1", 0x0102_0304_0506_0708);
        assert_eq!(
            hex::encode(g),
            "a3e4e109450ea9e1ccae8ca4eb7c6091f0b08a43c8d7c4c26143300989e7fb49"
        );
        let link = link_hash(&g, b"payload");
        assert_eq!(
            hex::encode(link),
            "4987b32c4091d4df01893b744e09cf6e6145680f4ce620b4c3a26f31a3fc5d19"
        );
        let sig = sign(&key, &link);
        assert_eq!(
            hex::encode(sig),
            "f8f88a8079338f6beb425d67c60c37c3bb784d67048f92e318eb67364e783b45\
             37343bff99ddd1f77261c7dd16f8ada0524314710018e0ac66ab2daed2489d04"
        );
        assert_eq!(
            hex::encode(key.verifying_key().as_bytes()),
            "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c"
        );
        assert!(verify(key.verifying_key().as_bytes(), &link, &sig));
        assert_eq!(
            fingerprint(key.verifying_key().as_bytes()),
            "fe81:2c12:f3ab:4ce6:ac5d:b69a:c352:f906"
        );
    }

    /// Golden vector: the manifest's protobuf bytes written out by hand and
    /// hashed with Python's hashlib. Never update it to make a test pass.
    #[test]
    fn golden_vector_of_the_manifest_hash() {
        use crate::v1::{DataType, Device, Manifest, Tag};
        let m = Manifest {
            version: 99,
            gateway_id: "gw-1".into(),
            created_at_ms: 1234,
            devices: vec![Device {
                id: "d".into(),
                protocol: "modbus-tcp".into(),
                endpoint: String::new(),
                identity: [
                    ("vendor".to_string(), "V".to_string()),
                    ("model".to_string(), "M".to_string()),
                ]
                .into_iter()
                .collect(),
            }],
            tags: vec![Tag {
                device: 0,
                name: "t".into(),
                address: String::new(),
                data_type: DataType::Double as i32,
                unit: String::new(),
                interval_ms: 1000,
            }],
        };
        assert_eq!(
            hex::encode(manifest_hash(&m)),
            "e71b66034eb08ec8b4ddd3406169bcd0b3db95cf75f32b5e0859e1d907747718"
        );
    }

    #[test]
    fn a_changed_byte_or_another_key_fails_verification() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let other = SigningKey::from_bytes(&[8u8; 32]);
        let link = link_hash(&genesis("gw", 1), b"payload");
        let sig = sign(&key, &link);
        assert!(verify(key.verifying_key().as_bytes(), &link, &sig));
        assert!(!verify(
            key.verifying_key().as_bytes(),
            &link_hash(&genesis("gw", 1), b"paylpad"),
            &sig
        ));
        assert!(!verify(other.verifying_key().as_bytes(), &link, &sig));
        assert!(!verify(b"short", &link, &sig));
        assert!(!verify(key.verifying_key().as_bytes(), &link, b"bad"));
    }
}
