//! Storage behind one trait, so the embedded default and PostgreSQL (later)
//! are interchangeable and pass the same tests (`suite`).
//!
//! What ingest decides lives beside the backends, which only store and read
//! rows: `stream` (exactly-once and loss records), `chain` (the online chain
//! walker), `rollup` (rollup folding). Every trait method is async; a backend
//! that blocks runs the work off the async threads.
//!
//! Contract every backend keeps:
//! - `append` is exactly-once per (gateway, buffer_id, seq): a batch whose
//!   number is already stored changes nothing and reports `Duplicate`; the
//!   points, the counters and the stream's stored sequence number are written
//!   in one transaction, so a crash never leaves half a batch.
//! - `append` returns only after the batch is durable; an ack may then be sent.
//! - Series (gateway, device, tag) get stable ids the first time a manifest
//!   names them; later manifests update their metadata.

pub mod any;
pub mod chain;
pub mod embedded;
pub(crate) mod export;
pub mod postgres;
pub(crate) mod records;
pub mod rollup;
pub mod stream;
#[cfg(test)]
pub mod suite;
pub(crate) mod verify;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use guantong_proto::chain::PublicKey;
use guantong_proto::v1::{Batch, Manifest};
use serde::Serialize;

use crate::evidence::bundle::{Bundle, DayEvidence};
use crate::registry::{Access, Account, Enterprise, Equipment};
use rollup::{GatewayDay, SeriesDay};

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
    /// `intervals[i]`: the declared sampling interval of tag `i` (0: none).
    pub intervals: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    Stored,
    Duplicate,
}

/// One batch as a chain link, with its original signed bytes.
#[derive(Debug, Clone)]
pub struct Link {
    /// The chain algorithm the envelope names (the link hash is computed
    /// with it).
    pub algorithm: guantong_proto::chain::Algorithm,
    pub payload: bytes::Bytes,
    pub prev_hash: Vec<u8>,
    pub signature: Vec<u8>,
    /// The hash the next link must name: the loss record's bridge, or this
    /// link's hash.
    pub effective_hash: [u8; 32],
    /// Signature verified with the gateway's bound key.
    pub signature_ok: bool,
    /// A key was bound, so the signature could be checked at all.
    pub signature_checked: bool,
}

/// Evidence chain status of one stream (gateway, buffer).
#[derive(Debug, Clone, Serialize)]
pub struct ChainInfo {
    pub gateway: String,
    pub buffer_id: String,
    /// Links verified in sequence order, first..=last (0 when none).
    pub verified_from: u64,
    pub verified_through: u64,
    pub head_hash: String,
    /// Links stored but not yet reached: an earlier link is missing (so far).
    pub waiting: u64,
    pub breaks: Vec<ChainBreak>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ChainBreak {
    pub seq: u64,
    pub reason: String,
    pub recorded_at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub outcome: AppendOutcome,
    /// The stream's highest sequence number stored with all before it.
    pub stored_seq: u64,
}

/// The sequence numbers stored for one stream, as sorted disjoint ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqRanges(Vec<(u64, u64)>);

impl SeqRanges {
    pub fn decode(bytes: &[u8]) -> SeqRanges {
        SeqRanges(
            bytes
                .chunks_exact(16)
                .map(|c| {
                    let (a, b) = c.split_at(8);
                    (
                        u64::from_be_bytes(a.try_into().unwrap_or_default()),
                        u64::from_be_bytes(b.try_into().unwrap_or_default()),
                    )
                })
                .collect(),
        )
    }

    pub fn encode(&self) -> Vec<u8> {
        self.0
            .iter()
            .flat_map(|(a, b)| a.to_be_bytes().into_iter().chain(b.to_be_bytes()))
            .collect()
    }

    /// Whether every number in first..=last is stored.
    pub fn covers(&self, first: u64, last: u64) -> bool {
        self.0.iter().any(|&(a, b)| a <= first && last <= b)
    }

    pub fn insert(&mut self, first: u64, last: u64) {
        let (mut a, mut b) = (first, last.max(first));
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(x, y) in &self.0 {
            if y.saturating_add(1) < a || b.saturating_add(1) < x {
                out.push((x, y));
            } else {
                a = a.min(x);
                b = b.max(y);
            }
        }
        out.push((a, b));
        out.sort_unstable();
        self.0 = out;
    }

    /// The highest number stored with all before it (0: none).
    pub fn contiguous(&self) -> u64 {
        match self.0.first() {
            Some(&(1, b)) => b,
            _ => 0,
        }
    }

    /// Numbers not stored between stored ones.
    pub fn holes(&self) -> Vec<(u64, u64)> {
        let mut holes = Vec::new();
        let mut next = 1;
        for &(a, b) in &self.0 {
            if a > next {
                holes.push((next, a - 1));
            }
            next = b + 1;
        }
        holes
    }
}

/// A batch queued for a backend's group commit, with where its outcome goes.
pub(crate) struct Job {
    pub batch: AppendBatch,
    pub reply: tokio::sync::oneshot::Sender<Result<Appended>>,
}

/// Answers every job of one group commit: its own outcome, or the group's
/// error (nothing of the group was stored, nothing is acked).
pub(crate) fn answer(jobs: Vec<Job>, outcomes: Result<Vec<Appended>>) {
    match outcomes {
        Ok(outcomes) => {
            for (job, outcome) in jobs.into_iter().zip(outcomes) {
                let _ = job.reply.send(Ok(outcome));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, batches = jobs.len(), "group commit failed; nothing acked");
            for job in jobs {
                let _ = job.reply.send(Err(StoreError::Backend(e.to_string())));
            }
        }
    }
}

/// A batch, decoded and checked by the gRPC layer, ready to store.
#[derive(Debug, Clone)]
pub struct AppendBatch {
    pub gateway_id: String,
    pub batch: Batch,
    /// Resolves the batch's tag indices (None for loss records).
    pub map: Option<Arc<ManifestMap>>,
    pub received_at_ms: i64,
    /// Sent from the gateway's backlog after an outage.
    pub backfill: bool,
    /// The batch as a link of the gateway's evidence chain, checked on receipt.
    pub link: Option<Link>,
    /// Size of the batch as received (signed payload bytes).
    pub wire_bytes: u64,
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
    /// The device's own identification, from the manifest.
    pub identity: std::collections::BTreeMap<String, String>,
    /// When a manifest first named the series.
    pub created_ms: Option<i64>,
    pub samples: u64,
    pub good: u64,
    pub uncertain: u64,
    pub bad: u64,
    /// Samples that arrived as backfill (after an outage).
    pub backfilled: u64,
    pub first_seen_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
    pub last_value: Option<serde_json::Value>,
    pub last_quality: Option<String>,
    pub last_quality_code: u32,
}

/// One `Store::series_runs` question: the runs of `kind` of `series`
/// overlapping `from..to`, merged with tolerance `tol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunsQuery {
    pub series: u64,
    pub kind: u8,
    pub tol: i64,
    pub from: i64,
    pub to: i64,
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
    pub backfill: bool,
    pub value: Option<serde_json::Value>,
    pub quality: &'static str,
    pub quality_code: u32,
    pub received_at_ms: i64,
    /// The device's second timestamp (OPC UA server timestamp), when it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_time_ms: Option<i64>,
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
    /// Per tag, when the gateway counted them.
    pub tags: Vec<TagLossInfo>,
    /// The counts are the gateway's estimate: the records that held them
    /// were damaged on its disk (reason `corrupted`).
    pub estimated: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TagLossInfo {
    pub device: String,
    pub tag: String,
    /// Points dropped, of all qualities.
    pub points: u64,
    /// Of `points`, those that were Bad (the device gave no value then).
    pub bad_points: u64,
    pub first_time_ms: i64,
    pub last_time_ms: i64,
}

pub trait Store: Send + Sync + 'static {
    /// A number that grows whenever what the store holds changes: after
    /// every commit of an append, and of every write to the registry,
    /// streams, manifests, gateways or chain breaks (not the access log,
    /// which no report reads). Equal numbers mean nothing a report or the
    /// city view reads has changed in between, so results computed at one
    /// generation may be served again while it holds.
    fn generation(&self) -> u64;
    /// Registers a gateway, binding its signing public key when given, and
    /// returns its token.
    fn register_gateway(
        &self,
        id: &str,
        public_key: Option<PublicKey>,
    ) -> impl Future<Output = Result<String>> + Send;
    /// The gateway's bound public key (with its algorithm) and how it was
    /// bound.
    fn gateway_key(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<(PublicKey, String)>>> + Send;
    /// Binds a key presented by the gateway itself (trust on first use).
    fn bind_key_on_first_use(
        &self,
        id: &str,
        public_key: PublicKey,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Records a chain break not tied to a stored batch (e.g. a key change).
    fn record_break(
        &self,
        gateway: &str,
        buffer_id: u64,
        seq: u64,
        reason: String,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Chain status of every stream.
    fn chains(&self) -> impl Future<Output = Result<Vec<ChainInfo>>> + Send;
    /// `chains` of the streams of `gateways` only, without reading others.
    fn chains_of(&self, gateways: &[String])
    -> impl Future<Output = Result<Vec<ChainInfo>>> + Send;
    /// Whether `token` is the gateway's current token, or its previous one
    /// within the grace period of a rotation. Compared in constant time.
    fn authenticate(&self, id: &str, token: &str) -> impl Future<Output = Result<bool>> + Send;
    /// Gives a registered gateway a new token; the current one stays valid
    /// for `grace`. Returns the new token.
    fn rotate_token(
        &self,
        id: &str,
        grace: std::time::Duration,
    ) -> impl Future<Output = Result<String>> + Send;
    fn gateways(&self) -> impl Future<Output = Result<Vec<GatewayInfo>>> + Send;

    /// Starts a stream: everything below `first_unacked` was acknowledged
    /// (by this or an earlier store); returns the highest sequence number
    /// stored with all before it.
    fn open_stream(
        &self,
        gateway: &str,
        buffer_id: u64,
        first_unacked: u64,
    ) -> impl Future<Output = Result<u64>> + Send;

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
    fn append(&self, batch: AppendBatch)
    -> impl Future<Output = Result<Appended>> + Send + 'static;

    fn series(&self) -> impl Future<Output = Result<Vec<SeriesInfo>>> + Send;
    /// The series of `gateways` (by id), without reading the others.
    fn series_of(
        &self,
        gateways: &[String],
    ) -> impl Future<Output = Result<Vec<SeriesInfo>>> + Send;
    /// The series of one tag, without reading the others' series.
    fn series_by_tag(
        &self,
        gateway: &str,
        device: &str,
        tag: &str,
    ) -> impl Future<Output = Result<Option<SeriesInfo>>> + Send;
    fn window_counts(
        &self,
        series: u64,
        from_ms: i64,
        to_ms: i64,
    ) -> impl Future<Output = Result<WindowCounts>> + Send {
        async move {
            Ok(self
                .window_counts_of(vec![series], from_ms, to_ms)
                .await?
                .pop()
                .unwrap_or_default())
        }
    }
    /// `window_counts` of many series in one call, in the order given.
    fn window_counts_of(
        &self,
        series: Vec<u64>,
        from_ms: i64,
        to_ms: i64,
    ) -> impl Future<Output = Result<Vec<WindowCounts>>> + Send;
    fn points(
        &self,
        series: u64,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredPoint>>> + Send;
    fn losses(&self) -> impl Future<Output = Result<Vec<LossInfo>>> + Send;
    /// `losses` of `gateways` only, without reading others'.
    fn losses_of(&self, gateways: &[String]) -> impl Future<Output = Result<Vec<LossInfo>>> + Send;

    // Registry and rollups.

    fn put_enterprise(&self, e: &Enterprise) -> impl Future<Output = Result<()>> + Send;
    fn enterprises(&self) -> impl Future<Output = Result<Vec<Enterprise>>> + Send;
    fn enterprise(&self, code: &str) -> impl Future<Output = Result<Option<Enterprise>>> + Send;
    /// Replaces an enterprise's equipment register.
    fn put_equipment(
        &self,
        code: &str,
        list: &[Equipment],
    ) -> impl Future<Output = Result<()>> + Send;
    fn equipment(&self, code: &str) -> impl Future<Output = Result<Vec<Equipment>>> + Send;
    /// Makes a registered gateway belong to an existing enterprise.
    fn assign_gateway(&self, gateway: &str, code: &str) -> impl Future<Output = Result<()>> + Send;
    /// Makes a gateway belong to no enterprise; false if it belonged to none.
    fn unassign_gateway(&self, gateway: &str) -> impl Future<Output = Result<bool>> + Send;
    /// gateway id -> enterprise credit code.
    fn gateway_owners(&self) -> impl Future<Output = Result<BTreeMap<String, String>>> + Send;
    /// The gateways of enterprises `codes` (gateway id -> credit code),
    /// without reading other enterprises' gateways.
    fn gateways_of(
        &self,
        codes: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, String>>> + Send;
    /// The enterprises whose provider is `provider`, without reading the
    /// others.
    fn enterprises_of_provider(
        &self,
        provider: &str,
    ) -> impl Future<Output = Result<Vec<Enterprise>>> + Send;
    // Cloud configurations of gateways (`crate::gateway_config`).

    /// Stores a cloud document of a registered gateway as its next version
    /// (`version.version` is set here); returns that number.
    fn add_gateway_config(
        &self,
        gateway: &str,
        version: crate::gateway_config::ConfigVersion,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Every stored version of a gateway's cloud document, oldest first.
    fn gateway_configs(
        &self,
        gateway: &str,
    ) -> impl Future<Output = Result<Vec<crate::gateway_config::ConfigVersion>>> + Send;
    /// The configuration state of every gateway that has one.
    fn gateway_config_states(
        &self,
    ) -> impl Future<Output = Result<BTreeMap<String, crate::gateway_config::ConfigState>>> + Send;
    /// Changes a gateway's configuration state (the default when it has
    /// none) by `change`, in one transaction; returns the new state.
    fn update_gateway_config_state(
        &self,
        gateway: &str,
        change: Box<dyn FnOnce(&mut crate::gateway_config::ConfigState) + Send>,
    ) -> impl Future<Output = Result<crate::gateway_config::ConfigState>> + Send;
    /// Creates or replaces an account; returns its new token.
    fn put_account(&self, a: &Account) -> impl Future<Output = Result<String>> + Send;
    fn account_by_token(&self, token: &str)
    -> impl Future<Output = Result<Option<Account>>> + Send;
    fn accounts(&self) -> impl Future<Output = Result<Vec<Account>>> + Send;
    fn log_access(&self, a: &Access) -> impl Future<Output = Result<()>> + Send;
    /// The latest `limit` accesses, newest first.
    fn access_log(&self, limit: usize) -> impl Future<Output = Result<Vec<Access>>> + Send;
    /// Day rollups of `series` for days starting in `from_day..to_day`.
    fn series_days(
        &self,
        series: &[u64],
        from_day: i64,
        to_day: i64,
    ) -> impl Future<Output = Result<Vec<(u64, i64, SeriesDay)>>> + Send;
    /// Runs of one kind of one series overlapping `from..to`, merged with
    /// tolerance `tol`.
    fn series_runs(
        &self,
        series: u64,
        kind: u8,
        tol: i64,
        from: i64,
        to: i64,
    ) -> impl Future<Output = Result<Vec<(i64, i64)>>> + Send {
        let q = RunsQuery {
            series,
            kind,
            tol,
            from,
            to,
        };
        async move {
            Ok(self
                .series_runs_of(vec![q])
                .await?
                .pop()
                .unwrap_or_default())
        }
    }
    /// `series_runs` of many questions in one call, in the order given.
    fn series_runs_of(
        &self,
        queries: Vec<RunsQuery>,
    ) -> impl Future<Output = Result<Vec<Vec<(i64, i64)>>>> + Send;
    /// Hourly (hour, count, sum, min, max) of one series' Good numbers.
    fn series_hours(
        &self,
        series: u64,
        from: i64,
        to: i64,
    ) -> impl Future<Output = Result<Vec<rollup::HourRow>>> + Send {
        async move {
            let mut hours = self.series_hours_of(vec![series], from, to).await?;
            Ok(hours.pop().unwrap_or_default())
        }
    }
    /// `series_hours` of many series in one call, in the order given.
    fn series_hours_of(
        &self,
        series: Vec<u64>,
        from: i64,
        to: i64,
    ) -> impl Future<Output = Result<Vec<Vec<rollup::HourRow>>>> + Send;
    fn gateway_days(
        &self,
        gateway: &str,
        from_day: i64,
        to_day: i64,
    ) -> impl Future<Output = Result<Vec<(i64, GatewayDay)>>> + Send;
    /// The evidence bundle of `gateways` over the source-time window
    /// `from_ms..to_ms` (format in docs/evidence.md). An enterprise is
    /// exported by passing its gateways.
    fn export_evidence(
        &self,
        gateways: Vec<String>,
        from_ms: i64,
        to_ms: i64,
    ) -> impl Future<Output = Result<Bundle>> + Send;
    /// Ingest's signed digest of one UTC day (`YYYY-MM-DD`) for each of
    /// `gateways` (every registered gateway when empty), with its leaves.
    /// The digest key lives with the store's data.
    fn day_digests(
        &self,
        gateways: Vec<String>,
        day: String,
    ) -> impl Future<Output = Result<Vec<DayEvidence>>> + Send;
    /// Re-verifies every stored chain from its signed bytes and cross-checks
    /// the query tables against the stored points (what `verify-chain`
    /// prints), on one consistent snapshot while writes go on.
    fn verify_stored(&self) -> impl Future<Output = Result<StoreVerification>> + Send;
    /// Writes a consistent copy of the whole store to the new file `out`
    /// (one snapshot, while writes go on); the data file of a restore.
    fn backup(&self, out: PathBuf) -> impl Future<Output = Result<BackupInfo>> + Send;
}

/// The result of re-verifying one stream's stored chain from its signed bytes.
#[derive(Debug, Clone, Serialize)]
pub struct ChainVerification {
    pub gateway: String,
    pub buffer_id: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub head_hash: String,
    pub links: u64,
    /// (seq, reason)
    pub breaks: Vec<(u64, String)>,
}

/// Everything `verify-chain` found.
#[derive(Debug, Clone, Serialize)]
pub struct StoreVerification {
    pub chains: Vec<ChainVerification>,
    /// The query tables disagree with themselves: minute counters or rollups
    /// (days, hours, runs, series totals, gateway days) vs the stored points.
    pub query_tables: Vec<String>,
}

/// What a backup copied.
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    pub tables: usize,
    pub rows: u64,
}

#[cfg(test)]
mod tests {
    use super::SeqRanges;

    #[test]
    fn seq_ranges_merge_detect_duplicates_and_holes() {
        let mut r = SeqRanges::default();
        assert_eq!(r.contiguous(), 0);
        r.insert(5, 7);
        r.insert(1, 1);
        assert_eq!((r.contiguous(), r.holes()), (1, vec![(2, 4)]));
        assert!(r.covers(6, 7) && !r.covers(4, 5));
        r.insert(2, 4);
        assert_eq!((r.contiguous(), r.holes()), (7, vec![]));
        r.insert(9, 9);
        r.insert(8, 8);
        assert_eq!(r, SeqRanges(vec![(1, 9)]));
        assert_eq!(SeqRanges::decode(&r.encode()), r);
    }
}
