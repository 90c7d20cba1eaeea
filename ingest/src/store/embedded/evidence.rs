//! Evidence read from the embedded store: what a bundle needs, the links of
//! a gateway's day, and the cross-check of the query tables against the
//! signed batches (`verify-chain`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use guantong_proto::chain;
use guantong_proto::v1::{Batch, Manifest};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable};

use super::{
    CHUNKS, Chunk, GATEWAYS, GatewayRecord, LOSSES, MANIFESTS, MINUTE_MS, MINUTES, SERIES, SIGNED,
    SeriesMeta, SignedLink, db_err, stored_algorithm,
};
use crate::evidence::bundle::{
    GatewayEvidence, LinkEvidence, LossEvidence, ManifestEvidence, ServedPoints, StreamEvidence,
};
use crate::evidence::digest::{self, DayLink};
use crate::evidence::points::PointsDigest;
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
        let prev = chain::to_hash(&link.prev_hash).unwrap_or([0; 32]);
        out.push(DayLink {
            buffer_id,
            seq,
            link_hash: stored_algorithm(link.algorithm).link_hash(&prev, &link.payload),
        });
    }
    Ok(out)
}

/// The day (start ms) of a `YYYY-MM-DD` string, as a store error.
pub(crate) fn day_start(day: &str) -> Result<i64> {
    digest::parse_day(day)
        .ok_or_else(|| StoreError::Invalid(format!("day `{day}`: expected YYYY-MM-DD")))
}

/// The query tables read back per batch, to compare with the signed batches.
pub(crate) struct QueryTables {
    /// (gateway, buffer, seq) -> the points the chunks hold for that batch.
    served: HashMap<(String, u64, u64), PointsDigest>,
    /// Gateways with chunks stored before chunks named their batch.
    unattributed: BTreeSet<String>,
    /// Decoded manifests, (gateway, version).
    manifests: HashMap<(String, u64), Option<Manifest>>,
    rejected: BTreeSet<(String, u64, u64)>,
    /// Problems of the tables themselves (minute counters vs chunks).
    pub problems: Vec<String>,
}

impl QueryTables {
    pub(crate) fn read(txn: &redb::ReadTransaction) -> Result<QueryTables> {
        let metas = txn.open_table(SERIES).map_err(db_err)?;
        let mut names: HashMap<u64, SeriesMeta> = HashMap::new();
        for entry in metas.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            names.insert(
                k.value(),
                serde_json::from_slice(v.value()).map_err(backend("series"))?,
            );
        }
        let chunks = txn.open_table(CHUNKS).map_err(db_err)?;
        let mut served: HashMap<(String, u64, u64), PointsDigest> = HashMap::new();
        let mut unattributed = BTreeSet::new();
        let mut minute_counts: BTreeMap<(u64, i64), (u64, u64, u64)> = BTreeMap::new();
        let mut minute_batches: HashMap<(u64, i64), BTreeSet<(u64, u64)>> = HashMap::new();
        for entry in chunks.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let (series, _, _) = k.value();
            let chunk = Chunk::decode(v.value()).map_err(backend("chunk"))?;
            let (gateway, device, tag) = names
                .get(&series)
                .map(|m| (m.gateway.as_str(), m.device.as_str(), m.tag.as_str()))
                .unwrap_or(("", "", ""));
            if chunk.seq == 0 {
                unattributed.insert(gateway.to_string());
            }
            let d = served
                .entry((gateway.to_string(), chunk.buffer_id, chunk.seq))
                .or_default();
            for p in &chunk.points {
                let t = chunk.base_ms + p.time_offset_ms;
                d.add(device, tag, t, p);
                let minute = t.div_euclid(MINUTE_MS) * MINUTE_MS;
                let c = minute_counts.entry((series, minute)).or_default();
                match crate::evidence::points::quality_byte(p) {
                    0 => c.0 += 1,
                    1 => c.1 += 1,
                    _ => c.2 += 1,
                }
                minute_batches
                    .entry((series, minute))
                    .or_default()
                    .insert((chunk.buffer_id, chunk.seq));
            }
        }
        let mut problems = Vec::new();
        let minutes = txn.open_table(MINUTES).map_err(db_err)?;
        let mut counted = BTreeMap::new();
        for entry in minutes.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            counted.insert(k.value(), v.value());
        }
        let keys: BTreeSet<(u64, i64)> = counted
            .keys()
            .chain(minute_counts.keys())
            .copied()
            .collect();
        for key in keys {
            let (a, b) = (
                counted.get(&key).copied().unwrap_or_default(),
                minute_counts.get(&key).copied().unwrap_or_default(),
            );
            if a != b {
                let m = names.get(&key.0);
                let batches: Vec<String> = minute_batches
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .map(|(buffer, seq)| format!("{buffer:016x}/{seq}"))
                    .collect();
                problems.push(format!(
                    "gateway {} series {}/{} minute {}: the minute counters say good/uncertain/bad {}/{}/{} but the stored points are {}/{}/{} (batches {})",
                    m.map_or("?", |m| m.gateway.as_str()),
                    m.map_or("?", |m| m.device.as_str()),
                    m.map_or("?", |m| m.tag.as_str()),
                    crate::http::rfc3339(key.1),
                    a.0, a.1, a.2, b.0, b.1, b.2,
                    batches.join(", ")
                ));
            }
        }
        let losses = txn.open_table(LOSSES).map_err(db_err)?;
        let mut rejected = BTreeSet::new();
        for entry in losses.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let r: LossRecord = serde_json::from_slice(v.value()).map_err(backend("loss"))?;
            if r.is_rejection() {
                let (g, b, s) = k.value();
                rejected.insert((g.to_string(), b, s));
            }
        }
        Ok(QueryTables {
            served,
            unattributed,
            manifests: HashMap::new(),
            rejected,
            problems,
        })
    }

    /// Compares a signed batch with the points served for it; the reason
    /// when they differ.
    pub(crate) fn compare(
        &mut self,
        txn: &redb::ReadTransaction,
        gateway: &str,
        batch: &Batch,
    ) -> Result<Option<String>> {
        if batch.loss.is_some() {
            return Ok(None);
        }
        let key = (gateway.to_string(), batch.manifest_version);
        if !self.manifests.contains_key(&key) {
            let t = txn.open_table(MANIFESTS).map_err(db_err)?;
            let m = t
                .get((gateway, batch.manifest_version))
                .map_err(db_err)?
                .and_then(|v| Manifest::decode(v.value()).ok());
            self.manifests.insert(key.clone(), m);
        }
        let served = self
            .served
            .remove(&(gateway.to_string(), batch.buffer_id, batch.seq))
            .unwrap_or_default();
        if self
            .rejected
            .contains(&(gateway.to_string(), batch.buffer_id, batch.seq))
        {
            return Ok((served.count > 0).then(|| {
                format!(
                    "ingest refused this batch but serves {} points for it",
                    served.count
                )
            }));
        }
        let Some(Some(manifest)) = self.manifests.get(&key) else {
            return Ok(Some(format!(
                "manifest {:016x} is not stored: the signed points cannot be named",
                batch.manifest_version
            )));
        };
        if !batch.manifest_sha256.is_empty()
            && chain::manifest_hash(manifest).as_slice() != batch.manifest_sha256.as_slice()
        {
            return Ok(Some(format!(
                "the stored manifest {:016x} is not the one this manifest link signed",
                batch.manifest_version
            )));
        }
        let mut signed = PointsDigest::default();
        for p in &batch.points {
            let t = manifest.tags.get(p.tag as usize);
            let device = t
                .and_then(|t| manifest.devices.get(t.device as usize))
                .map_or("", |d| d.id.as_str());
            signed.add(
                device,
                t.map_or("", |t| t.name.as_str()),
                batch.base_time_ms.saturating_add(p.time_offset_ms),
                p,
            );
        }
        if signed == served || (served.count == 0 && self.unattributed.contains(gateway)) {
            return Ok(None);
        }
        Ok(Some(format!(
            "the points the query tables serve for this batch differ from the signed batch ({} signed, {} served)",
            signed.count, served.count
        )))
    }

    /// Points served under a batch of a signed stream that is not stored as
    /// signed: (gateway, buffer, seq, points).
    pub(crate) fn unsigned_in(
        &self,
        streams: &BTreeSet<(String, u64)>,
    ) -> Vec<(String, u64, u64, u64)> {
        let mut out: Vec<_> = self
            .served
            .iter()
            .filter(|((g, b, s), _)| *s != 0 && streams.contains(&(g.clone(), *b)))
            .map(|((g, b, s), d)| (g.clone(), *b, *s, d.count))
            .collect();
        out.sort();
        out
    }
}
