//! Evidence read from the embedded store: what a bundle needs, the links of
//! a gateway's day, and the cross-check of the query tables against the
//! signed batches (`verify-chain`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use guantong_proto::v1::Batch;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable};

use super::{
    CHUNKS, Chunk, GATEWAYS, GatewayRecord, LOSSES, MANIFESTS, MINUTE_MS, SERIES, SIGNED,
    SeriesMeta, SignedLink, db_err, stored_algorithm,
};
use crate::evidence::bundle::{
    GatewayEvidence, LinkEvidence, LossEvidence, ManifestEvidence, ServedPoints, StreamEvidence,
};
use crate::evidence::digest::{self, DayLink};
use crate::evidence::points::PointsDigest;
use crate::store::records::link_hash;
use crate::store::stream::LossRecord;
use crate::store::{ChainBreak, Result, StoreError};

fn backend<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> StoreError + '_ {
    move |e| StoreError::Backend(format!("{what}: {e}"))
}

/// A gateway's evidence over a window, without the report and the digests
/// (those come from the query path and the day digests).
pub(crate) struct Collected {
    pub gateway: GatewayEvidence,
    /// (series id, device, tag) of every series of the gateway.
    pub series: Vec<(u64, String, String)>,
    /// Start of every UTC day a collected link was received.
    pub days: BTreeSet<i64>,
}

fn gateway_record(db: &Database, gateway: &str) -> Result<GatewayRecord> {
    let txn = db.begin_read().map_err(db_err)?;
    let t = txn.open_table(GATEWAYS).map_err(db_err)?;
    let v = t
        .get(gateway)
        .map_err(db_err)?
        .ok_or_else(|| StoreError::NotFound(format!("gateway `{gateway}`")))?;
    serde_json::from_slice(v.value()).map_err(backend("gateway record"))
}

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

pub(crate) fn collect(db: &Database, gateway: &str, from_ms: i64, to_ms: i64) -> Result<Collected> {
    let record = gateway_record(db, gateway)?;
    let txn = db.begin_read().map_err(db_err)?;
    let signed = txn.open_table(SIGNED).map_err(db_err)?;
    // Pass 1: which sequence range of each stream touches the window.
    let mut ranges: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for entry in signed
        .range((gateway, 0, 0)..=(gateway, u64::MAX, u64::MAX))
        .map_err(db_err)?
    {
        let (k, v) = entry.map_err(db_err)?;
        let (_, buffer_id, seq) = k.value();
        let link = SignedLink::decode(v.value()).map_err(backend("stored link"))?;
        if touches(&link, from_ms, to_ms) {
            let r = ranges.entry(buffer_id).or_insert((seq, seq));
            r.0 = r.0.min(seq);
            r.1 = r.1.max(seq);
        }
    }
    // Pass 2: every stored link in those ranges, so the chain is contiguous.
    let breaks = txn.open_table(super::BREAKS).map_err(db_err)?;
    let losses = txn.open_table(LOSSES).map_err(db_err)?;
    let mut streams = Vec::new();
    let mut versions = BTreeSet::new();
    let mut wanted: HashMap<(u64, u64), usize> = HashMap::new();
    let mut times = (i64::MAX, i64::MIN);
    let mut days = BTreeSet::new();
    let mut loss_list = Vec::new();
    for (&buffer_id, &(lo, hi)) in &ranges {
        let mut links = Vec::new();
        for entry in signed
            .range((gateway, buffer_id, lo)..=(gateway, buffer_id, hi))
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            let seq = k.value().2;
            let link = SignedLink::decode(v.value()).map_err(backend("stored link"))?;
            if let Ok(b) = Batch::decode(link.payload.as_ref()) {
                if b.loss.is_none() {
                    versions.insert(b.manifest_version);
                }
                for t in b.loss.iter().flat_map(|l| &l.tags) {
                    versions.insert(t.manifest_version);
                }
                for p in &b.points {
                    let t = b.base_time_ms.saturating_add(p.time_offset_ms);
                    times = (times.0.min(t), times.1.max(t));
                }
            }
            days.insert(link.received_at_ms.div_euclid(86_400_000) * 86_400_000);
            wanted.insert((buffer_id, seq), links.len());
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
        let mut recorded_breaks = Vec::new();
        for entry in breaks
            .range((gateway, buffer_id, 0)..=(gateway, buffer_id, u64::MAX))
            .map_err(db_err)?
        {
            let (_, v) = entry.map_err(db_err)?;
            let b: ChainBreak = serde_json::from_slice(v.value()).map_err(backend("break"))?;
            recorded_breaks.push(b);
        }
        for entry in losses
            .range((gateway, buffer_id, lo)..=(gateway, buffer_id, hi))
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            let r: LossRecord = serde_json::from_slice(v.value()).map_err(backend("loss"))?;
            loss_list.push(LossEvidence {
                buffer_id: format!("{buffer_id:016x}"),
                first_seq: k.value().2,
                last_seq: r.last_seq,
                points: r.points,
                reason: r.reason,
            });
        }
        streams.push((buffer_id, recorded_breaks, links));
    }
    let manifests_t = txn.open_table(MANIFESTS).map_err(db_err)?;
    let mut manifests = Vec::new();
    for version in versions {
        if let Some(m) = manifests_t.get((gateway, version)).map_err(db_err)? {
            manifests.push(ManifestEvidence {
                version: format!("{version:016x}"),
                bytes: hex::encode(m.value()),
            });
        }
    }
    let series = gateway_series(&txn, gateway)?;
    // What the query tables serve for each collected batch.
    let mut served: HashMap<(u64, u64), PointsDigest> = HashMap::new();
    if times.0 <= times.1 {
        let chunks = txn.open_table(CHUNKS).map_err(db_err)?;
        let start = times.0.div_euclid(MINUTE_MS) * MINUTE_MS;
        for (id, device, tag) in &series {
            for entry in chunks
                .range((*id, start, 0)..(*id, times.1.saturating_add(1), 0))
                .map_err(db_err)?
            {
                let (_, v) = entry.map_err(db_err)?;
                let chunk = Chunk::decode(v.value()).map_err(backend("chunk"))?;
                if !wanted.contains_key(&(chunk.buffer_id, chunk.seq)) {
                    continue;
                }
                let d = served.entry((chunk.buffer_id, chunk.seq)).or_default();
                for p in &chunk.points {
                    d.add(device, tag, chunk.base_ms + p.time_offset_ms, p);
                }
            }
        }
    }
    let streams = streams
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
    Ok(Collected {
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
            losses: loss_list,
            series: Vec::new(),
            days: Vec::new(),
        },
        series,
        days,
    })
}

fn gateway_series(
    txn: &redb::ReadTransaction,
    gateway: &str,
) -> Result<Vec<(u64, String, String)>> {
    let metas = txn.open_table(SERIES).map_err(db_err)?;
    let mut out = Vec::new();
    for entry in metas.iter().map_err(db_err)? {
        let (k, v) = entry.map_err(db_err)?;
        let m: SeriesMeta = serde_json::from_slice(v.value()).map_err(backend("series"))?;
        if m.gateway == gateway {
            out.push((k.value(), m.device, m.tag));
        }
    }
    Ok(out)
}

/// Every signed link of `gateway` received on the UTC day starting at
/// `day_start_ms`, its link hash recomputed from the stored bytes.
pub(crate) fn day_links(db: &Database, gateway: &str, day_start_ms: i64) -> Result<Vec<DayLink>> {
    gateway_record(db, gateway)?;
    let txn = db.begin_read().map_err(db_err)?;
    let signed = txn.open_table(SIGNED).map_err(db_err)?;
    let day = day_start_ms..day_start_ms + 86_400_000;
    let mut out = Vec::new();
    for entry in signed
        .range((gateway, 0, 0)..=(gateway, u64::MAX, u64::MAX))
        .map_err(db_err)?
    {
        let (k, v) = entry.map_err(db_err)?;
        let (_, buffer_id, seq) = k.value();
        let link = SignedLink::decode(v.value()).map_err(backend("stored link"))?;
        if !day.contains(&link.received_at_ms) {
            continue;
        }
        out.push(DayLink {
            buffer_id,
            seq,
            link_hash: link_hash(link.algorithm, &link.prev_hash, &link.payload),
        });
    }
    Ok(out)
}

/// The day (start ms) of a `YYYY-MM-DD` string, as a store error.
pub(crate) fn day_start(day: &str) -> Result<i64> {
    digest::parse_day(day)
        .ok_or_else(|| StoreError::Invalid(format!("day `{day}`: expected YYYY-MM-DD")))
}
