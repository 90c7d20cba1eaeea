//! The durable local buffer: every collected point is committed here before it
//! can be sent, and deleted only after ingest acknowledges it.
//!
//! # Design
//! One redb file (`buffer.redb` in the configured directory). Points are
//! grouped into batches at commit time; a batch is stored already encoded as
//! the wire `Batch` message, under its sequence number, so that a re-send after
//! a crash or a lost ack carries exactly the same bytes under the same number.
//!
//! Tables:
//! - `batches`: seq (u64) -> record (header + encoded `Batch`)
//! - `manifests`: manifest version (u64) -> encoded `Manifest`
//! - `meta`: name -> u64 (`buffer_id`, `next_seq`, `bytes`, `dropped_points`)
//!
//! Record layout (version 1, big-endian): `[1] format = 1`, `[4] crc32 of
//! payload`, `[8] last_seq`, `[8] manifest_version`, `[4] points`, payload.
//!
//! # Invariants
//! - Sequence numbers start at 1, increase by one per batch and are never
//!   reused by this buffer (`next_seq` is committed with the batch).
//!   `buffer_id` is random per buffer file, so a new file never collides.
//! - A batch is durable when `append` returns (commit with fsync).
//! - `bytes` is the sum of stored record sizes; when an append takes it past
//!   `max_bytes`, the oldest batches not yet handed to the uplink are replaced
//!   by one loss record (a batch with `loss` set, covering their sequence
//!   numbers and counting their points per tag). Nothing is dropped silently,
//!   and the sequence stays gap-free on the wire.
//! - Batches handed out by `read_from` are never turned into loss records
//!   (`reserved_end`), so ingest never receives both a batch and a loss record
//!   for the same number. The drop step holds `drop_lock` through its commit
//!   and `read_from` takes it around its snapshot, which orders the two.
//! - Acknowledged deletes commit without fsync: if they are lost in a crash the
//!   batches are sent again and ingest recognises them by their numbers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use guantong_proto::v1::{Batch, Loss, LossReason, Point, Quality, TagLoss};
use prost::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::quality::{Sample, now_ms};

const BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("batches");
const MANIFESTS: TableDefinition<u64, &[u8]> = TableDefinition::new("manifests");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const FORMAT: u8 = 1;
const HEADER: usize = 1 + 4 + 8 + 8 + 4;

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("buffer directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("buffer storage: {0}")]
    Storage(#[from] redb::Error),
}

type Result<T> = std::result::Result<T, BufferError>;

fn storage<E: Into<redb::Error>>(e: E) -> BufferError {
    BufferError::Storage(e.into())
}

/// A batch as read back for sending.
#[derive(Debug, Clone)]
pub struct StoredBatch {
    pub seq: u64,
    /// Last sequence number this record covers (> seq only for loss records).
    pub last_seq: u64,
    pub manifest_version: u64,
    pub points: u32,
    /// The encoded `Batch`, exactly as stored.
    pub payload: Bytes,
}

/// Counters for status output and upstream reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BufferStats {
    pub buffer_id: u64,
    pub first_seq: u64,
    pub next_seq: u64,
    pub bytes: u64,
    pub dropped_points: u64,
}

pub struct Buffer {
    db: Database,
    path: PathBuf,
    buffer_id: u64,
    max_bytes: u64,
    /// Batches below this sequence number have been handed to the uplink.
    reserved_end: AtomicU64,
    drop_lock: Mutex<()>,
}

fn meta_get(table: &impl ReadableTable<&'static str, u64>, key: &str) -> Result<Option<u64>> {
    Ok(table.get(key).map_err(storage)?.map(|v| v.value()))
}

impl Buffer {
    /// Opens (or creates) the buffer in `dir`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Buffer> {
        std::fs::create_dir_all(dir).map_err(|source| BufferError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("buffer.redb");
        let db = Database::create(&path).map_err(storage)?;
        let txn = db.begin_write().map_err(storage)?;
        let buffer_id;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            buffer_id = match meta_get(&meta, "buffer_id")? {
                Some(id) => id,
                None => {
                    let id = rand::random::<u64>() | 1;
                    meta.insert("buffer_id", id).map_err(storage)?;
                    meta.insert("next_seq", 1).map_err(storage)?;
                    meta.insert("bytes", 0).map_err(storage)?;
                    meta.insert("dropped_points", 0).map_err(storage)?;
                    id
                }
            };
            txn.open_table(BATCHES).map_err(storage)?;
            txn.open_table(MANIFESTS).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(Buffer {
            db,
            path,
            buffer_id,
            max_bytes,
            reserved_end: AtomicU64::new(0),
            drop_lock: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn buffer_id(&self) -> u64 {
        self.buffer_id
    }

    pub fn put_manifest(&self, version: u64, encoded: &[u8]) -> Result<()> {
        let txn = self.db.begin_write().map_err(storage)?;
        txn.open_table(MANIFESTS)
            .map_err(storage)?
            .insert(version, encoded)
            .map_err(storage)?;
        txn.commit().map_err(storage)?;
        Ok(())
    }

    pub fn manifest(&self, version: u64) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(MANIFESTS).map_err(storage)?;
        Ok(table
            .get(version)
            .map_err(storage)?
            .map(|v| v.value().to_vec()))
    }

    /// Commits `samples` as batches of at most `max_points`, durably.
    /// Returns the last sequence number written.
    pub fn append(
        &self,
        manifest_version: u64,
        samples: &[Sample],
        max_points: usize,
    ) -> Result<u64> {
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        let last;
        let over;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut batches = txn.open_table(BATCHES).map_err(storage)?;
            let mut seq = meta_get(&meta, "next_seq")?.unwrap_or(1);
            let mut bytes = meta_get(&meta, "bytes")?.unwrap_or(0);
            let committed_at = now_ms();
            for chunk in samples.chunks(max_points.max(1)) {
                let record =
                    encode_record(self.buffer_id, seq, manifest_version, chunk, committed_at);
                batches.insert(seq, record.as_slice()).map_err(storage)?;
                bytes += record.len() as u64;
                seq += 1;
            }
            meta.insert("next_seq", seq).map_err(storage)?;
            meta.insert("bytes", bytes).map_err(storage)?;
            last = seq - 1;
            over = bytes > self.max_bytes;
        }
        if !over {
            txn.commit().map_err(storage)?;
            return Ok(last);
        }
        let _order = self.drop_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.drop_oldest_unsent(&txn, LossReason::BufferFull)?;
        txn.commit().map_err(storage)?;
        Ok(last)
    }

    /// Replaces the oldest batches not yet handed out by one loss record until
    /// the buffer fits its quota again. Caller holds `drop_lock`.
    fn drop_oldest_unsent(&self, txn: &redb::WriteTransaction, reason: LossReason) -> Result<()> {
        let mut meta = txn.open_table(META).map_err(storage)?;
        let mut batches = txn.open_table(BATCHES).map_err(storage)?;
        let mut bytes = meta_get(&meta, "bytes")?.unwrap_or(0);
        let dropped_total = meta_get(&meta, "dropped_points")?.unwrap_or(0);
        let mut dropped_now = 0u64;
        let floor = self.reserved_end.load(Ordering::Acquire);
        // Room for the loss record itself.
        let target = self.max_bytes.saturating_sub(4096);
        let mut first: Option<u64> = None;
        let mut last_seq = 0;
        let mut points = 0u64;
        let mut per_tag: BTreeMap<(u64, u32), (u64, i64, i64)> = BTreeMap::new();
        let candidates: Vec<u64> = batches
            .range(floor..)
            .map_err(storage)?
            .map(|r| r.map(|(k, _)| k.value()))
            .collect::<std::result::Result<_, _>>()
            .map_err(storage)?;
        for seq in candidates {
            if bytes <= target {
                break;
            }
            let Some(record) = batches.remove(seq).map_err(storage)? else {
                continue;
            };
            let record = record.value().to_vec();
            bytes = bytes.saturating_sub(record.len() as u64);
            first.get_or_insert(seq);
            match decode_record(&record) {
                Some((header, batch)) => {
                    last_seq = header.last_seq;
                    if let Some(loss) = batch.loss {
                        points += loss.points;
                        for t in loss.tags {
                            merge_tag_loss(
                                &mut per_tag,
                                (t.manifest_version, t.tag),
                                t.points,
                                t.first_time_ms,
                                t.last_time_ms,
                            );
                        }
                    } else {
                        dropped_now += batch.points.len() as u64;
                        points += batch.points.len() as u64;
                        for p in &batch.points {
                            let t = batch.base_time_ms + p.time_offset_ms;
                            merge_tag_loss(&mut per_tag, (batch.manifest_version, p.tag), 1, t, t);
                        }
                    }
                }
                None => {
                    // Unreadable record: count what the header claims, if anything.
                    last_seq = seq;
                    if record.len() >= HEADER {
                        let claimed = u64::from(u32::from_be_bytes(
                            record[21..25].try_into().unwrap_or_default(),
                        ));
                        dropped_now += claimed;
                        points += claimed;
                    }
                }
            }
        }
        let Some(first) = first else { return Ok(()) };
        let loss = Loss {
            last_seq,
            points,
            tags: per_tag
                .into_iter()
                .map(
                    |((manifest_version, tag), (points, first_time_ms, last_time_ms))| TagLoss {
                        tag,
                        points,
                        first_time_ms,
                        last_time_ms,
                        manifest_version,
                    },
                )
                .collect(),
            reason: reason as i32,
        };
        let batch = Batch {
            buffer_id: self.buffer_id,
            seq: first,
            manifest_version: 0,
            base_time_ms: 0,
            points: Vec::new(),
            loss: Some(loss),
            committed_at_ms: now_ms(),
        };
        let record = frame_record(last_seq, 0, 0, &batch.encode_to_vec());
        batches.insert(first, record.as_slice()).map_err(storage)?;
        bytes += record.len() as u64;
        meta.insert("bytes", bytes).map_err(storage)?;
        meta.insert("dropped_points", dropped_total + dropped_now)
            .map_err(storage)?;
        tracing::warn!(
            first_seq = first,
            last_seq,
            points = dropped_now,
            "buffer full: dropped the oldest unsent batches"
        );
        Ok(())
    }

    /// Up to `max` batches from `from` on, in order. Marks them as handed out.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<StoredBatch>> {
        let _order = self.drop_lock.lock().unwrap_or_else(|e| e.into_inner());
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(BATCHES).map_err(storage)?;
        let mut out = Vec::with_capacity(max);
        for entry in table.range(from..).map_err(storage)?.take(max) {
            let (k, v) = entry.map_err(storage)?;
            let record = v.value();
            match split_header(record) {
                Some(h) => out.push(StoredBatch {
                    seq: k.value(),
                    last_seq: h.last_seq,
                    manifest_version: h.manifest_version,
                    points: h.points,
                    payload: Bytes::copy_from_slice(&record[HEADER..]),
                }),
                None => tracing::error!(seq = k.value(), "corrupt buffer record skipped"),
            }
        }
        if let Some(b) = out.last() {
            self.reserved_end
                .fetch_max(b.last_seq + 1, Ordering::AcqRel);
        }
        Ok(out)
    }

    /// Deletes every batch up to and including `seq` (ingest has stored them).
    pub fn ack(&self, seq: u64) -> Result<u64> {
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::None).map_err(storage)?;
        let mut removed = 0;
        {
            let mut batches = txn.open_table(BATCHES).map_err(storage)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut bytes = meta_get(&meta, "bytes")?.unwrap_or(0);
            loop {
                let Some((k, v)) = batches.pop_first().map_err(storage)? else {
                    break;
                };
                let (key, len) = (k.value(), v.value().len() as u64);
                if key > seq {
                    let record = v.value().to_vec();
                    drop((k, v));
                    batches.insert(key, record.as_slice()).map_err(storage)?;
                    break;
                }
                bytes = bytes.saturating_sub(len);
                removed += 1;
            }
            meta.insert("bytes", bytes).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(removed)
    }

    pub fn stats(&self) -> Result<BufferStats> {
        let txn = self.db.begin_read().map_err(storage)?;
        let meta = txn.open_table(META).map_err(storage)?;
        let batches = txn.open_table(BATCHES).map_err(storage)?;
        let next_seq = meta_get(&meta, "next_seq")?.unwrap_or(1);
        let first_seq = batches
            .first()
            .map_err(storage)?
            .map(|(k, _)| k.value())
            .unwrap_or(next_seq);
        Ok(BufferStats {
            buffer_id: self.buffer_id,
            first_seq,
            next_seq,
            bytes: meta_get(&meta, "bytes")?.unwrap_or(0),
            dropped_points: meta_get(&meta, "dropped_points")?.unwrap_or(0),
        })
    }
}

fn merge_tag_loss(
    map: &mut BTreeMap<(u64, u32), (u64, i64, i64)>,
    key: (u64, u32),
    points: u64,
    first: i64,
    last: i64,
) {
    let e = map.entry(key).or_insert((0, i64::MAX, i64::MIN));
    e.0 += points;
    e.1 = e.1.min(first);
    e.2 = e.2.max(last);
}

struct Header {
    last_seq: u64,
    manifest_version: u64,
    points: u32,
}

fn split_header(record: &[u8]) -> Option<Header> {
    if record.len() < HEADER || record[0] != FORMAT {
        return None;
    }
    let crc = u32::from_be_bytes(record[1..5].try_into().ok()?);
    if crc32fast::hash(&record[HEADER..]) != crc {
        return None;
    }
    Some(Header {
        last_seq: u64::from_be_bytes(record[5..13].try_into().ok()?),
        manifest_version: u64::from_be_bytes(record[13..21].try_into().ok()?),
        points: u32::from_be_bytes(record[21..25].try_into().ok()?),
    })
}

fn decode_record(record: &[u8]) -> Option<(Header, Batch)> {
    let h = split_header(record)?;
    let batch = Batch::decode(&record[HEADER..]).ok()?;
    Some((h, batch))
}

fn frame_record(last_seq: u64, manifest_version: u64, points: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.push(FORMAT);
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.extend_from_slice(&last_seq.to_be_bytes());
    out.extend_from_slice(&manifest_version.to_be_bytes());
    out.extend_from_slice(&points.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Encodes samples as one wire batch, framed for storage.
fn encode_record(
    buffer_id: u64,
    seq: u64,
    manifest_version: u64,
    samples: &[Sample],
    committed_at_ms: i64,
) -> Vec<u8> {
    let base_time_ms = samples
        .iter()
        .map(|s| s.time_ms)
        .min()
        .unwrap_or(committed_at_ms);
    let batch = Batch {
        buffer_id,
        seq,
        manifest_version,
        base_time_ms,
        points: samples
            .iter()
            .map(|s| Point {
                tag: s.tag,
                time_offset_ms: s.time_ms - base_time_ms,
                value: s.value.clone(),
                quality: s.quality as i32,
                quality_code: s.code,
            })
            .collect(),
        loss: None,
        committed_at_ms,
    };
    frame_record(
        seq,
        manifest_version,
        samples.len() as u32,
        &batch.encode_to_vec(),
    )
}

/// Decodes a stored payload's points back into samples (tests, tools).
pub fn samples_of(payload: &[u8]) -> Option<Vec<Sample>> {
    let batch = Batch::decode(payload).ok()?;
    Some(
        batch
            .points
            .into_iter()
            .map(|p| Sample {
                tag: p.tag,
                time_ms: batch.base_time_ms + p.time_offset_ms,
                value: p.value,
                quality: Quality::try_from(p.quality).unwrap_or(Quality::Bad),
                code: p.quality_code,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use guantong_proto::v1::point::Value;

    fn samples(n: usize, t0: i64) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample::good((i % 4) as u32, t0 + i as i64, Value::Uint(i as u64)))
            .collect()
    }

    #[test]
    fn appends_reads_and_acks_in_order_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id;
        {
            let b = Buffer::open(dir.path(), 64 << 20).expect("open");
            id = b.buffer_id();
            assert_eq!(b.append(7, &samples(25, 1000), 10).expect("append"), 3);
            let got = b.read_from(1, 10).expect("read");
            assert_eq!(
                got.iter().map(|b| (b.seq, b.points)).collect::<Vec<_>>(),
                [(1, 10), (2, 10), (3, 5)]
            );
            assert_eq!(
                samples_of(&got[0].payload).expect("decodes"),
                samples(10, 1000)
            );
            assert_eq!(b.ack(2).expect("ack"), 2);
        }
        let b = Buffer::open(dir.path(), 64 << 20).expect("reopen");
        assert_eq!(b.buffer_id(), id, "buffer id survives restart");
        let stats = b.stats().expect("stats");
        assert_eq!((stats.first_seq, stats.next_seq), (3, 4));
        assert_eq!(
            b.append(7, &samples(1, 2000), 10).expect("append"),
            4,
            "sequence continues after restart"
        );
    }

    #[test]
    fn a_new_buffer_gets_a_new_id() {
        let (a, b) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let a = Buffer::open(a.path(), 1 << 20).expect("open");
        let b = Buffer::open(b.path(), 1 << 20).expect("open");
        assert_ne!(a.buffer_id(), b.buffer_id());
    }

    #[test]
    fn when_full_drops_oldest_unsent_into_one_counted_loss_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Buffer::open(dir.path(), 1 << 20).expect("open");
        // Hand out batch 1 to the uplink: it must survive.
        b.append(1, &samples(100, 0), 100).expect("append");
        assert_eq!(b.read_from(1, 1).expect("read").len(), 1);
        let mut total = 100u64;
        for i in 0..300 {
            b.append(1, &samples(1000, i * 1000), 100).expect("append");
            total += 1000;
        }
        let stats = b.stats().expect("stats");
        assert!(stats.bytes <= 1 << 20, "quota held: {}", stats.bytes);
        assert!(stats.dropped_points > 0);
        let all = b.read_from(1, 10_000).expect("read");
        assert_eq!(all[0].seq, 1, "handed-out batch kept");
        let loss_record = &all[1];
        assert_eq!(loss_record.seq, 2);
        let batch = Batch::decode(loss_record.payload.as_ref()).expect("decodes");
        let loss = batch.loss.expect("second record is a loss record");
        assert_eq!(loss.last_seq, loss_record.last_seq);
        assert_eq!(loss.points, stats.dropped_points);
        assert_eq!(
            loss.tags.iter().map(|t| t.points).sum::<u64>(),
            loss.points,
            "per-tag counts add up"
        );
        // Sequence numbers stay contiguous: every number is covered exactly once.
        let mut expect = 1;
        let mut kept = 0u64;
        for r in &all {
            assert_eq!(r.seq, expect);
            expect = r.last_seq + 1;
            kept += u64::from(r.points);
        }
        assert_eq!(expect, 3002);
        assert_eq!(
            kept + loss.points,
            total,
            "every point is either kept or counted as lost"
        );
    }
}
