//! Daily signed digests: per gateway and UTC day, a Merkle root over the link
//! hashes of the batches ingest received that day, signed by ingest's own key.
//! A supervisor keeps the digests; stored data edited later no longer yields
//! the same root, so it contradicts a digest already handed out.
//!
//! # Format, version 1
//! - Day: the UTC calendar day of ingest's receipt time, `YYYY-MM-DD`. A day
//!   is final once it is over (a batch received later joins a later day).
//! - Leaf, 48 bytes: `buffer_id (u64 BE) ‖ seq (u64 BE) ‖ link hash`, where
//!   the link hash is recomputed from the stored bytes
//!   (`chain::link_hash(prev_hash, payload)`); leaves ordered by
//!   (buffer_id, seq). Root: RFC 6962 Merkle tree (`guantong_proto::merkle`).
//! - Signed message: `SHA-256("guantong/digest/v1" ‖ u32 BE len ‖ gateway id
//!   ‖ day (10 ASCII bytes) ‖ links (u64 BE) ‖ root)`, signed with Ed25519.
//! - Enterprise digest: a Merkle root whose leaves are
//!   `u32 BE len ‖ gateway id ‖ day root`, ordered by gateway id, signed as
//!   `SHA-256("guantong/enterprise-digest/v1" ‖ u32 BE len ‖ enterprise id ‖
//!   day ‖ gateways (u64 BE) ‖ root)`.

use ed25519_dalek::{Signer, SigningKey};
use guantong_proto::chain::{self, Hash};
use guantong_proto::merkle;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const DIGEST_FORMAT: &str = "guantong-digest/v1";
pub const ENTERPRISE_DIGEST_FORMAT: &str = "guantong-enterprise-digest/v1";
const DAY_MS: i64 = 86_400_000;

/// One leaf of a gateway's day tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayLink {
    pub buffer_id: u64,
    pub seq: u64,
    pub link_hash: Hash,
}

impl DayLink {
    pub fn leaf(&self) -> [u8; 48] {
        let mut out = [0u8; 48];
        out[..8].copy_from_slice(&self.buffer_id.to_be_bytes());
        out[8..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..].copy_from_slice(&self.link_hash);
        out
    }
}

/// A digest as handed out (`GET /api/v1/digests`, `guantong-ingest digest`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignedDigest {
    pub format: String,
    /// Gateway id (or enterprise id for an enterprise digest).
    pub subject: String,
    pub day: String,
    /// Leaves: links (or gateways, for an enterprise digest).
    pub leaves: u64,
    pub root: String,
    pub ingest_public_key: String,
    pub signature: String,
}

/// The UTC day (`YYYY-MM-DD`) of a time.
pub fn day_of(ms: i64) -> String {
    crate::days::format(ms.div_euclid(DAY_MS))
}

/// Yesterday, UTC: the latest day that is over.
pub fn yesterday() -> String {
    day_of(crate::grpc::now_ms() - DAY_MS)
}

/// Start (ms) of a `YYYY-MM-DD` day, UTC.
pub fn parse_day(day: &str) -> Option<i64> {
    crate::days::parse(day).ok().map(|d| d * DAY_MS)
}

/// The root over a gateway's day links (any order in; sorted here).
pub fn day_root(links: &mut [DayLink]) -> Hash {
    links.sort_by_key(|l| (l.buffer_id, l.seq));
    let leaves: Vec<[u8; 48]> = links.iter().map(DayLink::leaf).collect();
    merkle::root(&leaves)
}

fn signed_message(domain: &[u8], subject: &str, day: &str, leaves: u64, root: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(domain);
    h.update((subject.len() as u32).to_be_bytes());
    h.update(subject.as_bytes());
    h.update(day.as_bytes());
    h.update(leaves.to_be_bytes());
    h.update(root);
    h.finalize().into()
}

fn domain(format: &str) -> Option<&'static [u8]> {
    match format {
        DIGEST_FORMAT => Some(b"guantong/digest/v1"),
        ENTERPRISE_DIGEST_FORMAT => Some(b"guantong/enterprise-digest/v1"),
        _ => None,
    }
}

fn sign(
    key: &SigningKey,
    format: &'static str,
    subject: &str,
    day: &str,
    leaves: u64,
    root: Hash,
) -> SignedDigest {
    let domain = domain(format).expect("a known format");
    let message = signed_message(domain, subject, day, leaves, &root);
    SignedDigest {
        format: format.into(),
        subject: subject.into(),
        day: day.into(),
        leaves,
        root: hex::encode(root),
        ingest_public_key: hex::encode(key.verifying_key().as_bytes()),
        signature: hex::encode(key.sign(&message).to_bytes()),
    }
}

/// Ingest's signed digest of one gateway's day.
pub fn gateway_digest(
    key: &SigningKey,
    gateway: &str,
    day: &str,
    links: &mut [DayLink],
) -> SignedDigest {
    let root = day_root(links);
    sign(key, DIGEST_FORMAT, gateway, day, links.len() as u64, root)
}

/// A gateway's signed digest of `day` with its leaves in tree order.
pub fn day_evidence(
    key: &SigningKey,
    gateway: &str,
    day: &str,
    mut links: Vec<DayLink>,
) -> super::bundle::DayEvidence {
    let digest = gateway_digest(key, gateway, day, &mut links);
    super::bundle::DayEvidence {
        digest,
        leaves: links.iter().map(|l| hex::encode(l.leaf())).collect(),
    }
}

/// The leaf of one gateway in an enterprise's day tree.
fn enterprise_leaf(gateway: &str, root: &[u8]) -> Vec<u8> {
    let mut leaf = (gateway.len() as u32).to_be_bytes().to_vec();
    leaf.extend_from_slice(gateway.as_bytes());
    leaf.extend_from_slice(root);
    leaf
}

/// An enterprise's day digest: a root over its gateways' day digests (all of
/// the same day), signed by ingest.
pub fn enterprise_digest(
    key: &SigningKey,
    enterprise: &str,
    day: &str,
    gateways: &[SignedDigest],
) -> Result<SignedDigest, String> {
    let mut leaves = Vec::with_capacity(gateways.len());
    let mut sorted: Vec<&SignedDigest> = gateways.iter().collect();
    sorted.sort_by(|a, b| a.subject.cmp(&b.subject));
    for g in sorted {
        if g.day != day || g.format != DIGEST_FORMAT {
            return Err(format!(
                "digest of `{}` is for {} ({}), not {day}",
                g.subject, g.day, g.format
            ));
        }
        let root =
            hex::decode(&g.root).map_err(|e| format!("digest of `{}`: root: {e}", g.subject))?;
        leaves.push(enterprise_leaf(&g.subject, &root));
    }
    let root = merkle::root(&leaves);
    Ok(sign(
        key,
        ENTERPRISE_DIGEST_FORMAT,
        enterprise,
        day,
        leaves.len() as u64,
        root,
    ))
}

/// Whether the digest's signature verifies with its `ingest_public_key`.
pub fn verify_signature(d: &SignedDigest) -> bool {
    let (Some(domain), Ok(root), Ok(key), Ok(sig)) = (
        domain(&d.format),
        hex::decode(&d.root),
        hex::decode(&d.ingest_public_key),
        hex::decode(&d.signature),
    ) else {
        return false;
    };
    let Some(root) = chain::to_hash(&root) else {
        return false;
    };
    let message = signed_message(domain, &d.subject, &d.day, d.leaves, &root);
    chain::verify(&key, &message, &sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_round_trip_across_leap_years_and_epoch_edges() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(-1), "1969-12-31");
        assert_eq!(day_of(1_700_000_000_000), "2023-11-14");
        assert_eq!(parse_day("2024-02-29"), Some(1_709_164_800_000));
        assert_eq!(parse_day("2023-02-29"), None);
        assert_eq!(parse_day("2026-1-01"), None);
        for d in (-800..40_000).step_by(13) {
            let ms = d * DAY_MS;
            assert_eq!(parse_day(&day_of(ms)), Some(ms));
        }
    }

    /// Golden vector: computed independently with Python's hashlib and
    /// `cryptography` Ed25519. Never update it to make a test pass.
    #[test]
    fn golden_vector_of_a_signed_day_digest() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let mut links = vec![
            DayLink {
                buffer_id: 2,
                seq: 1,
                link_hash: [0xbb; 32],
            },
            DayLink {
                buffer_id: 1,
                seq: 5,
                link_hash: [0xaa; 32],
            },
        ];
        let d = gateway_digest(&key, "gw-1", "2026-11-25", &mut links);
        assert_eq!(d.leaves, 2);
        assert_eq!(
            d.root,
            "30b2e2efd61530798c6861271952ec0a1c741a0e4983e61b722de6224b8e50ed"
        );
        assert_eq!(
            d.signature,
            "0d801402facb62a57d0313a568170d4ead1f5ff00f50fce6a89c7deb4a69333b\
             0adeb09765d0f655bf82756075ba6992f984f3a6b3aa74ce3a8779110dd3e105"
        );
        assert!(verify_signature(&d));
        let mut forged = d.clone();
        forged.leaves = 1;
        assert!(!verify_signature(&forged));
        let e = enterprise_digest(&key, "ent", "2026-11-25", std::slice::from_ref(&d))
            .expect("one day");
        assert_eq!(
            e.root,
            "68dd6357af2720df8f9d9d237cf09975376f1c618bfa786c5fe078cd87009d36"
        );
        assert!(verify_signature(&e));
        assert!(enterprise_digest(&key, "ent", "2026-11-26", &[d]).is_err());
    }
}
