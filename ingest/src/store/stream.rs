//! What ingest decides about one stream (gateway, buffer), whatever the
//! backend: which batches are new, and what the stream lost.
//!
//! A backend keeps, per stream, the set of stored sequence numbers
//! (`SeqRanges`) and a loss row per loss, keyed by its first number; it
//! reads and writes them in the batch's transaction and asks this module
//! what to do. Invariants:
//! - a batch is stored only when no number of its range is stored yet;
//!   otherwise it is a duplicate and changes nothing;
//! - the ack is the end of the stored range that starts at 1;
//! - every number a stream consumed without storing points is a loss row:
//!   declared by the gateway, refused by ingest, or acknowledged before this
//!   store knew the stream; numbers not received yet are shown as holes.

use serde::{Deserialize, Serialize};

use super::{AppendBatch, LossInfo, SeqRanges, TagLossInfo};
use guantong_proto::v1::{Batch, LossReason};

/// Reasons of refused batches start with this.
pub const REJECTED: &str = "rejected by ingest";

/// What to do with a batch, given its stream's stored numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Its numbers are stored already; ack with `stored_seq`.
    Duplicate { stored_seq: u64 },
    /// New: store it, then add `first..=last` to the stream's ranges.
    Store { first: u64, last: u64 },
}

/// The numbers a batch takes: a loss record numbers `seq..=last_seq`.
pub fn seq_range(b: &Batch) -> (u64, u64) {
    (
        b.seq,
        b.loss.as_ref().map_or(b.seq, |l| l.last_seq.max(b.seq)),
    )
}

pub fn admit(ranges: &SeqRanges, b: &Batch) -> Admission {
    let (first, last) = seq_range(b);
    if ranges.covers(first, last) {
        Admission::Duplicate {
            stored_seq: ranges.contiguous(),
        }
    } else {
        Admission::Store { first, last }
    }
}

/// One loss of a stream, stored under its first sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossRecord {
    pub last_seq: u64,
    pub points: Option<u64>,
    pub reason: String,
    pub recorded_at_ms: i64,
    /// (manifest version, tag index, points, first ms, last ms, Bad points)
    pub tags: Vec<(u64, u32, u64, i64, i64, u64)>,
    /// The gateway estimated the counts (its records of them were damaged).
    #[serde(default)]
    pub estimated: bool,
}

impl LossRecord {
    pub fn is_rejection(&self) -> bool {
        self.reason.starts_with(REJECTED)
    }

    /// As reported, with each tag named by `name(manifest version, tag
    /// index)` → (device, tag).
    pub fn info<E>(
        self,
        gateway: &str,
        buffer_id: u64,
        first_seq: u64,
        mut name: impl FnMut(u64, u32) -> Result<(String, String), E>,
    ) -> Result<LossInfo, E> {
        let mut tags = Vec::with_capacity(self.tags.len());
        for &(version, tag, points, first_time_ms, last_time_ms, bad_points) in &self.tags {
            let (device, tag) = name(version, tag)?;
            tags.push(TagLossInfo {
                device,
                tag,
                points,
                bad_points,
                first_time_ms,
                last_time_ms,
            });
        }
        Ok(LossInfo {
            tags,
            gateway: gateway.to_string(),
            buffer_id: format!("{buffer_id:016x}"),
            first_seq,
            last_seq: self.last_seq,
            points: self.points,
            reason: self.reason,
            recorded_at_ms: self.recorded_at_ms,
            estimated: self.estimated,
        })
    }
}

/// The loss a new batch records, if any: its refusal by ingest, else the
/// loss the gateway declared. Stored under the batch's `seq`.
pub fn loss_of(a: &AppendBatch) -> Option<LossRecord> {
    let b = &a.batch;
    if let Some(reason) = &a.rejected {
        return Some(LossRecord {
            last_seq: b.seq,
            points: Some(b.points.len() as u64),
            reason: format!("{REJECTED}: {reason}"),
            recorded_at_ms: a.received_at_ms,
            tags: Vec::new(),
            estimated: false,
        });
    }
    let loss = b.loss.as_ref()?;
    let reason = LossReason::try_from(loss.reason)
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("LOSS_REASON_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| format!("code {}", loss.reason));
    Some(LossRecord {
        last_seq: loss.last_seq,
        points: Some(loss.points),
        reason: format!("dropped by the gateway: {reason}"),
        recorded_at_ms: a.received_at_ms,
        estimated: loss.estimated,
        tags: loss
            .tags
            .iter()
            .map(|t| {
                (
                    t.manifest_version,
                    t.tag,
                    t.points,
                    t.first_time_ms,
                    t.last_time_ms,
                    t.bad_points,
                )
            })
            .collect(),
    })
}

/// A stream opened with everything below `first_unacked` acknowledged (by
/// this or an earlier store). What this store lacks of that was stored
/// elsewhere (an earlier, wiped data directory): marks it stored and returns
/// the loss to record under seq 1, once.
pub fn acknowledged_elsewhere(
    ranges: &mut SeqRanges,
    first_unacked: u64,
    now_ms: i64,
) -> Option<LossRecord> {
    if first_unacked <= 1 || ranges.covers(1, first_unacked - 1) {
        return None;
    }
    ranges.insert(1, first_unacked - 1);
    Some(LossRecord {
        last_seq: first_unacked - 1,
        points: None,
        reason: "acknowledged before this store knew the stream; not in this store".into(),
        recorded_at_ms: now_ms,
        tags: Vec::new(),
        estimated: false,
    })
}

/// Numbers not received (yet) between stored ones, as losses.
pub fn holes(gateway: &str, buffer_id: u64, ranges: &SeqRanges, now_ms: i64) -> Vec<LossInfo> {
    ranges
        .holes()
        .into_iter()
        .map(|(first_seq, last_seq)| LossInfo {
            gateway: gateway.to_string(),
            buffer_id: format!("{buffer_id:016x}"),
            first_seq,
            last_seq,
            points: None,
            reason: "not received (yet): later batches arrived first".into(),
            recorded_at_ms: now_ms,
            tags: Vec::new(),
            estimated: false,
        })
        .collect()
}
