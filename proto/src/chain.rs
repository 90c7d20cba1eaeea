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
//!   own key).
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
//!
//! # Algorithms
//! The above is the `ed25519` algorithm ([`Algorithm::Ed25519`], the default).
//! The `sm2` algorithm ([`Algorithm::Sm2`]) is the same chain with the
//! national algorithms throughout: every hash of the chain is SM3
//! (GB/T 32905) under its own domains, `SM3("guantong/genesis/sm2/v1" ‖ …)`
//! and `SM3("guantong/chain/sm2/v1" ‖ prev_hash ‖ payload)`, and the link
//! hash is signed with SM2 (GB/T 32918.2) with the default user ID
//! `1234567812345678` (GB/T 35276): `e = SM3(Z_A ‖ link_hash)`, signature
//! `r ‖ s` (32 bytes each, big-endian), public key SEC1 uncompressed
//! (`04 ‖ x ‖ y`, 65 bytes). The manifest hash stays SHA-256 (it is a field
//! of the signed payload, named so). Each envelope names its algorithm; a
//! chain whose key changes algorithm is a key change like any other.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

pub const HASH_LEN: usize = 32;
pub type Hash = [u8; HASH_LEN];

const LINK_DOMAIN: &[u8] = b"guantong/chain/v1";
const GENESIS_DOMAIN: &[u8] = b"guantong/genesis/v1";
const MANIFEST_DOMAIN: &[u8] = b"guantong/manifest/v1";
const SM2_LINK_DOMAIN: &[u8] = b"guantong/chain/sm2/v1";
const SM2_GENESIS_DOMAIN: &[u8] = b"guantong/genesis/sm2/v1";
/// The SM2 user ID (distinguishing identifier) GB/T 35276 names as default.
pub const SM2_USER_ID: &str = "1234567812345678";

/// A chain's signature algorithm and the hash that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// Ed25519 (RFC 8032) over SHA-256 link hashes.
    #[default]
    Ed25519,
    /// SM2 (GB/T 32918.2, user ID [`SM2_USER_ID`]) over SM3 link hashes.
    Sm2,
}

impl Algorithm {
    pub const ALL: [Algorithm; 2] = [Algorithm::Ed25519, Algorithm::Sm2];

    /// The name used in configuration, bundles and reports.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed25519",
            Algorithm::Sm2 => "sm2",
        }
    }

    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.name() == name)
    }

    /// From the wire's `SignatureAlgorithm` (None for NONE and unknown values).
    pub fn from_wire(value: i32) -> Option<Algorithm> {
        match crate::v1::SignatureAlgorithm::try_from(value).ok()? {
            crate::v1::SignatureAlgorithm::Ed25519 => Some(Algorithm::Ed25519),
            crate::v1::SignatureAlgorithm::Sm2Sm3 => Some(Algorithm::Sm2),
            crate::v1::SignatureAlgorithm::None => None,
        }
    }

    pub fn wire(self) -> crate::v1::SignatureAlgorithm {
        match self {
            Algorithm::Ed25519 => crate::v1::SignatureAlgorithm::Ed25519,
            Algorithm::Sm2 => crate::v1::SignatureAlgorithm::Sm2Sm3,
        }
    }

    /// Length of a public key of this algorithm.
    pub fn public_key_len(self) -> usize {
        match self {
            Algorithm::Ed25519 => 32,
            Algorithm::Sm2 => 65,
        }
    }

    /// The `prev_hash` of a buffer's first link.
    pub fn genesis(self, gateway_id: &str, buffer_id: u64) -> Hash {
        match self {
            Algorithm::Ed25519 => genesis(gateway_id, buffer_id),
            Algorithm::Sm2 => sm3_of(&[
                SM2_GENESIS_DOMAIN,
                gateway_id.as_bytes(),
                &buffer_id.to_be_bytes(),
            ]),
        }
    }

    /// The link hash of `payload` chained after `prev`.
    pub fn link_hash(self, prev: &Hash, payload: &[u8]) -> Hash {
        match self {
            Algorithm::Ed25519 => link_hash(prev, payload),
            Algorithm::Sm2 => sm3_of(&[SM2_LINK_DOMAIN, prev, payload]),
        }
    }

    /// Whether `signature` is `public_key`'s signature over `link`.
    pub fn verify(self, public_key: &[u8], link: &Hash, signature: &[u8]) -> bool {
        match self {
            Algorithm::Ed25519 => verify(public_key, link, signature),
            Algorithm::Sm2 => sm2_verify(public_key, link, signature),
        }
    }

    /// Whether `public_key` is well-formed for this algorithm.
    pub fn valid_public_key(self, public_key: &[u8]) -> bool {
        match self {
            Algorithm::Ed25519 => {
                <[u8; 32]>::try_from(public_key).is_ok_and(|k| VerifyingKey::from_bytes(&k).is_ok())
            }
            Algorithm::Sm2 => sm2_verifying_key(public_key).is_some(),
        }
    }

    /// The key's fingerprint, naming the algorithm: `ed25519:` followed by
    /// [`fingerprint`], or `sm2:` followed by the first 16 bytes of SM3 of
    /// the 65-byte key, hex in groups of four.
    pub fn fingerprint(self, public_key: &[u8]) -> String {
        match self {
            Algorithm::Ed25519 => format!("ed25519:{}", fingerprint(public_key)),
            Algorithm::Sm2 => format!("sm2:{}", grouped(&sm3_of(&[public_key])[..16])),
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn sm3_of(parts: &[&[u8]]) -> Hash {
    use sm3::Digest as _;
    let mut h = sm3::Sm3::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// An SM2 public key: SEC1 uncompressed (65 bytes, `04 ‖ x ‖ y`) only, so
/// that one key has one byte string.
fn sm2_verifying_key(public_key: &[u8]) -> Option<sm2::dsa::VerifyingKey> {
    if public_key.len() != 65 || public_key[0] != 4 {
        return None;
    }
    sm2::dsa::VerifyingKey::from_sec1_bytes(SM2_USER_ID, public_key).ok()
}

fn sm2_verify(public_key: &[u8], link: &Hash, signature: &[u8]) -> bool {
    use sm2::dsa::signature::Verifier as _;
    let Some(key) = sm2_verifying_key(public_key) else {
        return false;
    };
    let Ok(sig) = sm2::dsa::Signature::from_slice(signature) else {
        return false;
    };
    key.verify(link, &sig).is_ok()
}

/// A public key with its algorithm: what ingest binds to a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub algorithm: Algorithm,
    pub bytes: Vec<u8>,
}

impl PublicKey {
    /// Checks that `bytes` is a key of `algorithm`; the error says what was
    /// expected.
    pub fn new(algorithm: Algorithm, bytes: Vec<u8>) -> Result<PublicKey, String> {
        if algorithm.valid_public_key(&bytes) {
            return Ok(PublicKey { algorithm, bytes });
        }
        let expected_len = algorithm.public_key_len();
        if bytes.len() == expected_len {
            return Err(format!(
                "these {expected_len} bytes are not a valid {algorithm} public key (not a point \
                 of the curve): the key was corrupted or mistyped"
            ));
        }
        Err(match algorithm {
            Algorithm::Ed25519 => format!(
                "an ed25519 public key has 32 bytes (64 hex digits), not {} bytes",
                bytes.len()
            ),
            Algorithm::Sm2 => format!(
                "an sm2 public key is a curve point in SEC1 uncompressed form: 65 bytes (130 hex \
                 digits) starting with 04, not {} bytes",
                bytes.len()
            ),
        })
    }

    pub fn fingerprint(&self) -> String {
        self.algorithm.fingerprint(&self.bytes)
    }

    pub fn verify(&self, link: &Hash, signature: &[u8]) -> bool {
        self.algorithm.verify(&self.bytes, link, signature)
    }
}

/// n - 1 for the SM2 curve's order n, big-endian.
const SM2_ORDER_MINUS_ONE: [u8; 32] = [
    0xff, 0xff, 0xff, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0x72, 0x03, 0xdf, 0x6b, 0x21, 0xc6, 0x05, 0x2b, 0x53, 0xbb, 0xf4, 0x09, 0x39, 0xd5, 0x41, 0x22,
];

/// A gateway's signing key, of either algorithm.
#[derive(Clone)]
pub enum ChainKey {
    Ed25519(SigningKey),
    Sm2(Box<sm2::dsa::SigningKey>),
}

impl ChainKey {
    /// An SM2 key from its 32-byte secret scalar (big-endian); None when the
    /// bytes are not a scalar in `[1, n-1]`.
    pub fn sm2_from_secret(secret: &[u8; 32]) -> Option<ChainKey> {
        // d = n - 1 has no (1 + d)^-1, so it cannot sign (GB/T 32918.1 6.1).
        if *secret == SM2_ORDER_MINUS_ONE {
            return None;
        }
        sm2::dsa::SigningKey::from_slice(SM2_USER_ID, secret)
            .ok()
            .map(|k| ChainKey::Sm2(Box::new(k)))
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            ChainKey::Ed25519(_) => Algorithm::Ed25519,
            ChainKey::Sm2(_) => Algorithm::Sm2,
        }
    }

    /// The public key as it travels and is registered: 32 bytes (Ed25519)
    /// or 65 bytes SEC1 uncompressed (SM2).
    pub fn public_key(&self) -> Vec<u8> {
        match self {
            ChainKey::Ed25519(k) => k.verifying_key().to_bytes().to_vec(),
            ChainKey::Sm2(k) => {
                use sm2::elliptic_curve::sec1::ToSec1Point as _;
                k.verifying_key().to_sec1_point(false).as_bytes().to_vec()
            }
        }
    }

    /// The signature over a link hash (64 bytes under both algorithms; SM2
    /// with a deterministic nonce, RFC 6979 style with SM3).
    pub fn sign(&self, link: &Hash) -> [u8; 64] {
        match self {
            ChainKey::Ed25519(k) => sign(k, link),
            ChainKey::Sm2(k) => {
                use sm2::dsa::signature::Signer as _;
                let sig: sm2::dsa::Signature = k
                    .try_sign(link)
                    .expect("SM2 signing fails only for r = 0 or r + k = n, probability 2^-256");
                let mut out = [0; 64];
                out.copy_from_slice(&sig.to_bytes());
                out
            }
        }
    }
}

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
    grouped(&Sha256::digest(public_key)[..16])
}

fn grouped(bytes: &[u8]) -> String {
    let hex = hex::encode(bytes);
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
    fn a_corrupted_key_of_the_right_length_is_called_corrupted_not_the_wrong_length() {
        let bad = (0u8..=255)
            .map(|b| [b; 32])
            .find(|k| !Algorithm::Ed25519.valid_public_key(k))
            .expect("some 32-byte string is no curve point");
        let e = PublicKey::new(Algorithm::Ed25519, bad.to_vec()).expect_err("invalid");
        assert!(e.contains("not a valid ed25519 public key"), "{e}");
        assert!(!e.contains("not 32 bytes"), "{e}");
        let e = PublicKey::new(Algorithm::Ed25519, vec![1; 31]).expect_err("short");
        assert!(e.contains("not 31 bytes"), "{e}");
    }

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

    /// SM3 test vectors of GB/T 32905-2016 (appendix A), computed again
    /// with gmssl 3.2.2.
    #[test]
    fn sm3_matches_the_standard_vectors() {
        assert_eq!(
            hex::encode(sm3_of(&[b"abc"])),
            "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
        );
        assert_eq!(
            hex::encode(sm3_of(&[&b"abcd".repeat(16)])),
            "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"
        );
    }

    /// Golden vectors of the `sm2` algorithm, produced independently with
    /// Python gmssl 3.2.2 (`pip install gmssl`; pure Python SM2/SM3):
    /// ```python
    /// from gmssl import sm3, func; from gmssl.sm2 import CryptSM2, default_ecc_table
    /// h = lambda b: bytes.fromhex(sm3.sm3_hash(func.bytes_to_list(b)))
    /// d = "07"*32
    /// pub = CryptSM2(d, "00"*64)._kg(int(d, 16), default_ecc_table["g"])   # x||y
    /// g = h(b"guantong/genesis/sm2/v1" + b"gw-1" + (0x0102030405060708).to_bytes(8, "big"))
    /// link = h(b"guantong/chain/sm2/v1" + g + b"payload")
    /// sig = CryptSM2(d, pub).sign_with_sm3(link, "0b"*32)   # user ID 1234567812345678, k = 0x0b..0b
    /// fp = h(bytes.fromhex("04" + pub))[:16]
    /// ```
    /// gmssl's signature (nonce k = 0x0b…0b) must verify here; the
    /// signature this crate makes (deterministic nonce) was checked with
    /// `CryptSM2(d, pub).verify_with_sm3(sig, link)` → True. Never update
    /// them to make a test pass.
    #[test]
    fn golden_vectors_of_the_sm2_algorithm() {
        let key = ChainKey::sm2_from_secret(&[7u8; 32]).expect("valid scalar");
        assert_eq!(key.algorithm(), Algorithm::Sm2);
        let public = key.public_key();
        assert_eq!(
            hex::encode(&public),
            "04df07dc0b31591dfb63ec895516e5bb4ad05a09c2feba6d496ce523f7303fffcd\
             4add27de09262dc59baf690c0286f05e29948517cc1e069b988e139c00f449c8"
        );
        let g = Algorithm::Sm2.genesis("gw-1", 0x0102_0304_0506_0708);
        assert_eq!(
            hex::encode(g),
            "218fd2c01386bce57fda14fbd86c9d340036d32f8fbff79024a96ac95392d8dc"
        );
        let link = Algorithm::Sm2.link_hash(&g, b"payload");
        assert_eq!(
            hex::encode(link),
            "191d3b8309b0b24b31b1eba4019ad2081e1626efc9e3f6465f0d41357e6dc677"
        );
        let by_gmssl = hex::decode(
            "42d1d48bf5a429e795b15bae4125d5c6a439ecf9bbb899e90c67bdf841ed2346\
             347e308e3cb6c3f2b31d7cef6c54fe2a79813e0345eacd62548ba03fc5bb84f3",
        )
        .expect("hex");
        assert!(Algorithm::Sm2.verify(&public, &link, &by_gmssl));
        let ours = key.sign(&link);
        assert_eq!(hex::encode(ours), SM2_SIGNATURE_BY_THIS_CRATE);
        assert!(Algorithm::Sm2.verify(&public, &link, &ours));
        assert_eq!(
            Algorithm::Sm2.fingerprint(&public),
            "sm2:c9da:ccbf:a561:2555:36b2:ab43:f2e0:624e"
        );
        // The Ed25519 fingerprint keeps its v1 form behind the name.
        let ed = SigningKey::from_bytes(&[7u8; 32]);
        assert_eq!(
            Algorithm::Ed25519.fingerprint(ed.verifying_key().as_bytes()),
            "ed25519:fe81:2c12:f3ab:4ce6:ac5d:b69a:c352:f906"
        );
    }

    /// `ChainKey::sign` of the golden link with secret 07…07 (see above).
    /// Checked with gmssl 3.2.2: `CryptSM2(d, pub).verify_with_sm3(sig,
    /// link)` → True, and False with its last hex digit changed.
    const SM2_SIGNATURE_BY_THIS_CRATE: &str = "7c51477183157a3e3677218e0e8a9637e4eeb70e7bb30511f4fb04dd\
                                               0d33163d7eeb5e20112c82dfcb31346e2a00ba016ed0651f9751a584\
                                               6bcf57cfdc19dc0a";

    #[test]
    fn sm2_rejects_other_bytes_keys_and_encodings() {
        let key = ChainKey::sm2_from_secret(&[7u8; 32]).expect("valid scalar");
        let other = ChainKey::sm2_from_secret(&[8u8; 32]).expect("valid scalar");
        let link = Algorithm::Sm2.link_hash(&Algorithm::Sm2.genesis("gw", 1), b"payload");
        let sig = key.sign(&link);
        let public = key.public_key();
        assert!(Algorithm::Sm2.verify(&public, &link, &sig));
        let edited = Algorithm::Sm2.link_hash(&Algorithm::Sm2.genesis("gw", 1), b"paylpad");
        assert!(!Algorithm::Sm2.verify(&public, &edited, &sig));
        assert!(!Algorithm::Sm2.verify(&other.public_key(), &link, &sig));
        // Not an Ed25519 signature, and the SHA-256 link is another message.
        assert!(!Algorithm::Ed25519.verify(&public, &link, &sig));
        assert!(!Algorithm::Sm2.verify(&public, &link_hash(&genesis("gw", 1), b"payload"), &sig));
        // Only the uncompressed 65-byte form is a key.
        assert!(!Algorithm::Sm2.valid_public_key(&public[1..]));
        assert!(Algorithm::Sm2.valid_public_key(&public));
        assert!(!Algorithm::Sm2.verify(&public, &link, &sig[..63]));
        assert!(ChainKey::sm2_from_secret(&[0u8; 32]).is_none());
        assert!(ChainKey::sm2_from_secret(&[0xffu8; 32]).is_none());
        assert!(ChainKey::sm2_from_secret(&SM2_ORDER_MINUS_ONE).is_none());
        let mut n_minus_two = SM2_ORDER_MINUS_ONE;
        n_minus_two[31] -= 1;
        assert!(ChainKey::sm2_from_secret(&n_minus_two).is_some());
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::from_name(a.name()), Some(a));
            assert_eq!(Algorithm::from_wire(a.wire() as i32), Some(a));
        }
        assert_eq!(Algorithm::from_wire(0), None);
        assert_eq!(Algorithm::from_wire(9), None);
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
