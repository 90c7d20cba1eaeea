//! Evidence read from the embedded store: what a bundle needs, the links of
//! a gateway's day, and the cross-check of the query tables against the
//! signed batches (`verify-chain`).

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable};

use super::{
    CHUNKS, Chunk, GATEWAYS, GatewayRecord, LOSSES, MANIFESTS, MINUTE_MS, SERIES, SIGNED,
    SeriesMeta, SignedLink, db_err,
};
use crate::evidence::bundle::ManifestEvidence;
use crate::evidence::digest::{self, DayLink};
use crate::store::export::{Collected, Gather, Ranges};
use crate::store::records::link_hash;
use crate::store::stream::LossRecord;
use crate::store::{ChainBreak, Result, StoreError};

fn backend<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> StoreError + '_ {
    move |e| StoreError::Backend(format!("{what}: {e}"))
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

pub(crate) fn collect(db: &Database, gateway: &str, from_ms: i64, to_ms: i64) -> Result<Collected> {
    let record = gateway_record(db, gateway)?;
    let txn = db.begin_read().map_err(db_err)?;
    let signed = txn.open_table(SIGNED).map_err(db_err)?;
    let mut ranges = Ranges::new(from_ms, to_ms);
    for entry in signed
        .range((gateway, 0, 0)..=(gateway, u64::MAX, u64::MAX))
        .map_err(db_err)?
    {
        let (k, v) = entry.map_err(db_err)?;
        let (_, buffer_id, seq) = k.value();
        let link = SignedLink::decode(v.value()).map_err(backend("stored link"))?;
        ranges.see(buffer_id, seq, &link);
    }
    let breaks = txn.open_table(super::BREAKS).map_err(db_err)?;
    let losses = txn.open_table(LOSSES).map_err(db_err)?;
    let mut gather = Gather::new();
    for (&buffer_id, &(lo, hi)) in &ranges.by_buffer {
        let mut recorded_breaks = Vec::new();
        for entry in breaks
            .range((gateway, buffer_id, 0)..=(gateway, buffer_id, u64::MAX))
            .map_err(db_err)?
        {
            let (_, v) = entry.map_err(db_err)?;
            let b: ChainBreak = serde_json::from_slice(v.value()).map_err(backend("break"))?;
            recorded_breaks.push(b);
        }
        gather.stream(buffer_id, recorded_breaks);
        for entry in signed
            .range((gateway, buffer_id, lo)..=(gateway, buffer_id, hi))
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            let link = SignedLink::decode(v.value()).map_err(backend("stored link"))?;
            gather.link(k.value().2, &link);
        }
        for entry in losses
            .range((gateway, buffer_id, lo)..=(gateway, buffer_id, hi))
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            let r: LossRecord = serde_json::from_slice(v.value()).map_err(backend("loss"))?;
            gather.loss(buffer_id, k.value().2, r);
        }
    }
    let manifests_t = txn.open_table(MANIFESTS).map_err(db_err)?;
    let mut manifests = Vec::new();
    for &version in &gather.versions {
        if let Some(m) = manifests_t.get((gateway, version)).map_err(db_err)? {
            manifests.push(ManifestEvidence {
                version: format!("{version:016x}"),
                bytes: hex::encode(m.value()),
            });
        }
    }
    let series = gateway_series(&txn, gateway)?;
    // What the query tables serve for each collected batch.
    if let Some((first, last)) = gather.point_times() {
        let chunks = txn.open_table(CHUNKS).map_err(db_err)?;
        let start = first.div_euclid(MINUTE_MS) * MINUTE_MS;
        for (id, device, tag) in &series {
            for entry in chunks
                .range((*id, start, 0)..(*id, last.saturating_add(1), 0))
                .map_err(db_err)?
            {
                let (_, v) = entry.map_err(db_err)?;
                let chunk = Chunk::decode(v.value()).map_err(backend("chunk"))?;
                for p in &chunk.points {
                    let p = guantong_proto::v1::Point {
                        time_offset_ms: chunk.base_ms + p.time_offset_ms,
                        ..p.clone()
                    };
                    gather.served(chunk.buffer_id, chunk.seq, device, tag, &p);
                }
            }
        }
    }
    Ok(gather.finish(gateway, record, manifests, series))
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
