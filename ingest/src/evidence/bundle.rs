//! The evidence bundle: one self-contained JSON file (format in
//! docs/evidence.md). Byte strings are lowercase hex; ids of buffers and
//! manifest versions are 16 hex digits, as everywhere in the API.

use serde::{Deserialize, Serialize};

use super::digest::SignedDigest;
use crate::store::ChainBreak;

pub const FORMAT: &str = "guantong-evidence-bundle";
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    pub format: String,
    pub version: u32,
    pub created_at_ms: i64,
    /// The report window, source time, `from_ms <= t < to_ms`.
    pub from_ms: i64,
    pub to_ms: i64,
    /// Points with an earlier source time were dropped by ingest's
    /// retention: they are signed in their batches but not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points_from_ms: Option<i64>,
    /// Ingest's digest key, which signs `days[].digest`.
    pub ingest_public_key: String,
    pub gateways: Vec<GatewayEvidence>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayEvidence {
    pub id: String,
    /// The public key bound to the gateway; None: none bound.
    pub public_key: Option<String>,
    /// Its algorithm: `ed25519` (32-byte key) or `sm2` (65-byte SEC1
    /// uncompressed key). Absent in bundles made before SM2: `ed25519`.
    #[serde(default)]
    pub key_algorithm: Option<String>,
    /// `registered` or `trust-on-first-use`.
    pub key_source: Option<String>,
    /// Every manifest version the links refer to: encoded `Manifest` bytes.
    pub manifests: Vec<ManifestEvidence>,
    pub streams: Vec<StreamEvidence>,
    /// Data the gateway declared dropped, or ingest refused, in these streams.
    pub losses: Vec<LossEvidence>,
    /// The report, as ingest's query tables answer it for the window.
    pub series: Vec<SeriesReport>,
    /// Digests of every day a link in `streams` was received, with all of
    /// that day's leaves.
    pub days: Vec<DayEvidence>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestEvidence {
    pub version: String,
    pub bytes: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamEvidence {
    pub buffer_id: String,
    /// Breaks ingest recorded on receipt (for information; the verifier
    /// re-derives everything from the links).
    pub recorded_breaks: Vec<ChainBreak>,
    /// Consecutive links in sequence order.
    pub links: Vec<LinkEvidence>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkEvidence {
    pub seq: u64,
    /// A loss record covers seq..=last_seq.
    pub last_seq: u64,
    pub received_at_ms: i64,
    /// The chain algorithm of this link: `ed25519` or `sm2`.
    pub algorithm: String,
    pub prev_hash: String,
    pub signature: String,
    /// The exact signed `Batch` bytes.
    pub payload: String,
    /// What ingest's query tables hold for this batch.
    pub served: ServedPoints,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServedPoints {
    pub points: u64,
    /// `evidence::points` digest.
    pub digest: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LossEvidence {
    pub buffer_id: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub points: Option<u64>,
    pub reason: String,
}

impl LossEvidence {
    /// Ingest refused the batch's points (they are not served).
    pub fn is_rejection(&self) -> bool {
        self.reason.starts_with("rejected by ingest")
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SeriesReport {
    pub device: String,
    pub tag: String,
    pub good: u64,
    pub uncertain: u64,
    pub bad: u64,
    /// Sum of the int, uint and double values in the window.
    pub sum: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DayEvidence {
    pub digest: SignedDigest,
    /// The day's 48-byte leaves in tree order.
    pub leaves: Vec<String>,
}
