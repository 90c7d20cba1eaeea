//! Storage behind one trait, so the embedded default and PostgreSQL (later)
//! are interchangeable and pass the same tests.
//!
//! Contract every backend keeps:
//! - `append` is exactly-once per (gateway, buffer_id, seq): a batch whose
//!   number is already stored changes nothing and reports `Duplicate`; the
//!   points, the counters and the stream's stored sequence number are written
//!   in one transaction, so a crash never leaves half a batch.
//! - `append` returns only after the batch is durable; an ack may then be sent.
//! - Series (gateway, device, tag) get stable ids the first time a manifest
//!   names them; later manifests update their metadata.

pub mod embedded;

use std::future::Future;
use std::sync::Arc;

use guantong_proto::v1::{Batch, Manifest};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Backend(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A manifest resolved to series ids: `series[i]` is the series of tag `i`.
#[derive(Debug, Clone)]
pub struct ManifestMap {
    pub version: u64,
    pub series: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    Stored,
    Duplicate,
}

/// A batch, decoded and checked by the gRPC layer, ready to store.
#[derive(Debug, Clone)]
pub struct AppendBatch {
    pub gateway_id: String,
    pub batch: Batch,
    /// Resolves the batch's tag indices (None for loss records).
    pub map: Option<Arc<ManifestMap>>,
    pub received_at_ms: i64,
    /// Set when ingest refuses the batch's points: they are not stored, the
    /// sequence number is consumed, and the refusal is recorded as a loss.
    pub rejected: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewayInfo {
    pub id: String,
    pub registered_at_ms: i64,
}

/// Everything known about one series, for summaries.
#[derive(Debug, Clone, Serialize)]
pub struct SeriesInfo {
    pub id: u64,
    pub gateway: String,
    pub device: String,
    pub protocol: String,
    pub endpoint: String,
    pub tag: String,
    pub address: String,
    pub data_type: String,
    pub unit: String,
    pub interval_ms: u64,
    pub samples: u64,
    pub good: u64,
    pub uncertain: u64,
    pub bad: u64,
    pub first_seen_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
    pub last_value: Option<serde_json::Value>,
    pub last_quality: Option<String>,
    pub last_quality_code: u32,
}

/// Sample counts inside a time window.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct WindowCounts {
    pub good: u64,
    pub uncertain: u64,
    pub bad: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StoredPoint {
    pub time_ms: i64,
    pub value: Option<serde_json::Value>,
    pub quality: &'static str,
    pub quality_code: u32,
    pub received_at_ms: i64,
}

/// A gap in a gateway's sequence, or data the gateway declared dropped.
#[derive(Debug, Clone, Serialize)]
pub struct LossInfo {
    pub gateway: String,
    pub buffer_id: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub points: Option<u64>,
    pub reason: String,
    pub recorded_at_ms: i64,
}

pub trait Store: Send + Sync + 'static {
    fn register_gateway(&self, id: &str) -> impl Future<Output = Result<String>> + Send;
    fn authenticate(&self, id: &str, token: &str) -> impl Future<Output = Result<bool>> + Send;
    fn gateways(&self) -> impl Future<Output = Result<Vec<GatewayInfo>>> + Send;

    /// Highest sequence number stored for this buffer, with all before it.
    fn stored_seq(&self, gateway: &str, buffer_id: u64)
    -> impl Future<Output = Result<u64>> + Send;

    fn put_manifest(
        &self,
        gateway: &str,
        manifest: Manifest,
    ) -> impl Future<Output = Result<Arc<ManifestMap>>> + Send;
    fn manifest_map(
        &self,
        gateway: &str,
        version: u64,
    ) -> impl Future<Output = Result<Option<Arc<ManifestMap>>>> + Send;

    /// Queues a batch for storing. Its place in the order of appends is fixed
    /// when `append` is called, not when the future is first polled, so a
    /// stream may queue several batches and await them in order.
    fn append(
        &self,
        batch: AppendBatch,
    ) -> impl Future<Output = Result<AppendOutcome>> + Send + 'static;

    fn series(&self) -> impl Future<Output = Result<Vec<SeriesInfo>>> + Send;
    fn window_counts(
        &self,
        series: u64,
        from_ms: i64,
        to_ms: i64,
    ) -> impl Future<Output = Result<WindowCounts>> + Send;
    fn points(
        &self,
        series: u64,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredPoint>>> + Send;
    fn losses(&self) -> impl Future<Output = Result<Vec<LossInfo>>> + Send;
}
