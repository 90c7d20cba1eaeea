//! The evidence bundle of a window, whatever the backend (format in
//! docs/evidence.md).
//!
//! A backend collects each gateway in two passes over its stored links, on
//! one snapshot: `Ranges` finds, per stream, the sequence range whose links
//! touch the window (a point's source time in it, a declared loss
//! overlapping it, or received during it); `Gather` then takes every link
//! in those ranges (so the chain in the bundle is contiguous), the streams'
//! recorded breaks and losses, and the points the query tables serve for
//! each of those batches. `bundle` adds what the query path reports for
//! each series and the day digests of the days the links were received.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use guantong_proto::v1::Batch;
use prost::Message;

use super::records::{GatewayRecord, SignedLink, now_ms, stored_algorithm};
use super::stream::LossRecord;
use super::{ChainBreak, Result, Store, StoreError};
use crate::evidence::bundle::{
    self, Bundle, GatewayEvidence, LinkEvidence, LossEvidence, ManifestEvidence, SeriesReport,
    ServedPoints, StreamEvidence,
};
use crate::evidence::digest;
use crate::evidence::points::PointsDigest;

/// Whether a signed batch belongs to the window: a point's source time in
/// it, a declared loss overlapping it, or received during it.
fn touches(link: &SignedLink, from_ms: i64, to_ms: i64) -> bool {
    if (from_ms..to_ms).contains(&link.received_at_ms) {
        return true;
    }
    let Ok(b) = Batch::decode(link.payload.as_ref()) else {
        return true; // undecodable: let the verifier say so
    };
    let in_window = |t: i64| (from_ms..to_ms).contains(&t);
    b.points
        .iter()
        .any(|p| in_window(b.base_time_ms.saturating_add(p.time_offset_ms)))
        || b.loss.as_ref().is_some_and(|l| {
            l.tags
                .iter()
                .any(|t| t.first_time_ms < to_ms && t.last_time_ms >= from_ms)
        })
}

/// Pass 1: per stream, the sequence range of the links touching the window.
pub(crate) struct Ranges {
    from_ms: i64,
    to_ms: i64,
    pub by_buffer: BTreeMap<u64, (u64, u64)>,
}

impl Ranges {
    pub fn new(from_ms: i64, to_ms: i64) -> Ranges {
        Ranges {
            from_ms,
            to_ms,
            by_buffer: BTreeMap::new(),
        }
    }

    pub fn see(&mut self, buffer_id: u64, seq: u64, link: &SignedLink) {
        if touches(link, self.from_ms, self.to_ms) {
            let r = self.by_buffer.entry(buffer_id).or_insert((seq, seq));
            r.0 = r.0.min(seq);
            r.1 = r.1.max(seq);
        }
    }
}

/// Pass 2: the links, breaks and losses of the ranges, and what is served.
#[derive(Default)]
pub(crate) struct Gather {
    streams: Vec<(u64, Vec<ChainBreak>, Vec<LinkEvidence>)>,
    /// Manifest versions the links name.
    pub versions: BTreeSet<u64>,
    /// (buffer, seq) of every collected link -> its place in its stream.
    wanted: HashMap<(u64, u64), usize>,
    times: (i64, i64),
    /// Start of every UTC day a collected link was received.
    days: BTreeSet<i64>,
    losses: Vec<LossEvidence>,
    served: HashMap<(u64, u64), PointsDigest>,
    points_from: Option<i64>,
}

impl Gather {
    pub fn new() -> Gather {
        Gather {
            times: (i64::MAX, i64::MIN),
            ..Default::default()
        }
    }

    /// Points with an earlier source time were dropped by retention: they
    /// are not served, whatever the tables still hold.
    pub fn points_from(&mut self, horizon: Option<i64>) {
        self.points_from = horizon;
    }

    /// Starts the next stream, with the breaks ingest recorded for it.
    pub fn stream(&mut self, buffer_id: u64, recorded_breaks: Vec<ChainBreak>) {
        self.streams.push((buffer_id, recorded_breaks, Vec::new()));
    }

    /// A link of the current stream, in sequence order.
    pub fn link(&mut self, seq: u64, link: &SignedLink) {
        let Some((buffer_id, _, links)) = self.streams.last_mut() else {
            return;
        };
        if let Ok(b) = Batch::decode(link.payload.as_ref()) {
            if b.loss.is_none() {
                self.versions.insert(b.manifest_version);
            }
            for t in b.loss.iter().flat_map(|l| &l.tags) {
                self.versions.insert(t.manifest_version);
            }
            for p in &b.points {
                let t = b.base_time_ms.saturating_add(p.time_offset_ms);
                self.times = (self.times.0.min(t), self.times.1.max(t));
            }
        }
        self.days
            .insert(link.received_at_ms.div_euclid(86_400_000) * 86_400_000);
        self.wanted.insert((*buffer_id, seq), links.len());
        links.push(LinkEvidence {
            seq,
            last_seq: link.last_seq.max(seq),
            received_at_ms: link.received_at_ms,
            algorithm: stored_algorithm(link.algorithm).name().into(),
            prev_hash: hex::encode(&link.prev_hash),
            signature: hex::encode(&link.signature),
            payload: hex::encode(&link.payload),
            served: ServedPoints::default(),
        });
    }

    /// A loss of the current stream's range.
    pub fn loss(&mut self, buffer_id: u64, first_seq: u64, r: LossRecord) {
        self.losses.push(LossEvidence {
            buffer_id: format!("{buffer_id:016x}"),
            first_seq,
            last_seq: r.last_seq,
            points: r.points,
            reason: r.reason,
        });
    }

    /// The source times the collected batches' points span, if any: the
    /// backend serves the points of this window (`served`).
    pub fn point_times(&self) -> Option<(i64, i64)> {
        (self.times.0 <= self.times.1).then_some(self.times)
    }

    /// A point the query tables serve for batch (buffer, seq), time absolute.
    pub fn served(
        &mut self,
        buffer_id: u64,
        seq: u64,
        device: &str,
        tag: &str,
        p: &guantong_proto::v1::Point,
    ) {
        if self.points_from.is_some_and(|from| p.time_offset_ms < from) {
            return;
        }
        if self.wanted.contains_key(&(buffer_id, seq)) {
            self.served
                .entry((buffer_id, seq))
                .or_default()
                .add(device, tag, p.time_offset_ms, p);
        }
    }

    pub fn finish(
        self,
        gateway: &str,
        record: GatewayRecord,
        manifests: Vec<ManifestEvidence>,
        series: Vec<(u64, String, String)>,
    ) -> Collected {
        let served = self.served;
        let streams = self
            .streams
            .into_iter()
            .map(|(buffer_id, recorded_breaks, mut links)| {
                for l in &mut links {
                    let d = served.get(&(buffer_id, l.seq)).copied().unwrap_or_default();
                    l.served = ServedPoints {
                        points: d.count,
                        digest: d.hex(),
                    };
                }
                StreamEvidence {
                    buffer_id: format!("{buffer_id:016x}"),
                    recorded_breaks,
                    links,
                }
            })
            .collect();
        Collected {
            gateway: GatewayEvidence {
                id: gateway.to_string(),
                key_algorithm: record.public_key.as_ref().map(|_| {
                    record
                        .key_algorithm
                        .clone()
                        .unwrap_or_else(|| "ed25519".into())
                }),
                public_key: record.public_key,
                key_source: record.key_source,
                manifests,
                streams,
                losses: self.losses,
                series: Vec::new(),
                days: Vec::new(),
            },
            series,
            days: self.days,
            points_from: self.points_from,
        }
    }
}

/// A gateway's evidence over a window, without the report and the digests
/// (those come from the query path and the day digests).
pub(crate) struct Collected {
    pub gateway: GatewayEvidence,
    /// (series id, device, tag) of every series of the gateway.
    pub series: Vec<(u64, String, String)>,
    /// Start of every UTC day a collected link was received.
    pub days: BTreeSet<i64>,
    /// The retention horizon its snapshot saw (`Gather::points_from`).
    pub points_from: Option<i64>,
}

/// Refuses an empty window.
pub(crate) fn check_window(from_ms: i64, to_ms: i64) -> Result<()> {
    if to_ms <= from_ms {
        return Err(StoreError::Invalid(
            "the window is empty: `to` must be after `from`".into(),
        ));
    }
    Ok(())
}

/// The bundle of the gateways collected: each with the report as the query
/// path answers it and the digests of the days its links were received.
/// Refuses a window starting before the retention horizon: its points are
/// gone, so no report of it can be checked.
pub(crate) async fn bundle<S: Store>(
    store: &S,
    collected: Vec<Collected>,
    from_ms: i64,
    to_ms: i64,
    ingest_public_key: String,
) -> Result<Bundle> {
    let points_from = collected.iter().filter_map(|c| c.points_from).max();
    if let Some(horizon) = points_from
        && from_ms < horizon
    {
        return Err(StoreError::Invalid(format!(
            "points before {} were dropped by retention (`serve --retention`): export a window \
             from then on (the day rollups, signed batches and losses of earlier days are kept)",
            crate::http::rfc3339(horizon)
        )));
    }
    let mut out = Vec::with_capacity(collected.len());
    for collected in collected {
        let mut g = collected.gateway;
        for (series, device, tag) in collected.series {
            let c = store.window_counts(series, from_ms, to_ms).await?;
            let sum = store
                .points(series, from_ms, to_ms, usize::MAX)
                .await?
                .iter()
                .filter_map(|p| p.value.as_ref().and_then(serde_json::Value::as_f64))
                .sum();
            g.series.push(SeriesReport {
                device,
                tag,
                good: c.good,
                uncertain: c.uncertain,
                bad: c.bad,
                sum,
            });
        }
        for day in collected.days {
            let digests = store
                .day_digests(vec![g.id.clone()], digest::day_of(day))
                .await?;
            g.days.extend(digests);
        }
        out.push(g);
    }
    Ok(Bundle {
        format: bundle::FORMAT.into(),
        version: bundle::VERSION,
        created_at_ms: now_ms(),
        from_ms,
        to_ms,
        points_from_ms: points_from,
        ingest_public_key,
        gateways: out,
    })
}
