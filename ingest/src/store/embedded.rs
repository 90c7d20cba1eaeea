//! The embedded store: one redb file in the data directory, no server.
//!
//! # Layout
//! | table        | key                              | value                          |
//! |--------------|----------------------------------|--------------------------------|
//! | `gateways`   | gateway id                       | JSON: salted token hash        |
//! | `streams`    | (gateway, buffer_id)             | stored seq ranges (`SeqRanges`)|
//! | `manifests`  | (gateway, version)               | encoded `Manifest`             |
//! | `series_keys`| "gateway/device/tag"             | series id                      |
//! | `series`     | series id                        | JSON `SeriesMeta`              |
//! | `state`      | series id                        | encoded `SeriesState`          |
//! | `chunks`     | (series, first time, chunk id)   | encoded `Chunk`                |
//! | `minutes`    | (series, minute start)           | (good, uncertain, bad)         |
//! | `losses`     | (gateway, buffer_id, first seq)  | JSON `stream::LossRecord`      |
//! | `meta`       | name                             | u64 counters                   |
//! | `signed`     | (gateway, buffer_id, seq)        | original signed batch (`SignedLink`) |
//! | `chain_state`| (gateway, buffer_id)             | JSON `chain::ChainState`: verified through, head |
//! | `breaks`     | (gateway, buffer_id, seq)        | JSON `ChainBreak`              |
//! | `days`       | (series, day start)              | `rollup::SeriesDay`            |
//! | `hours`      | (series, hour start)             | (count, sum, min, max) of Good numbers |
//! | `runs`       | (series, kind, start)            | end: runs of data, Bad, backfill |
//! | `gateway_days`| (gateway, day of receipt)       | `rollup::GatewayDay`           |
//! | registry tables | see `registry` in this module | enterprises, equipment, accounts, access log |
//!
//! The rollup tables (`rollup` module) are written in the same transaction
//! as the points they summarise.
//!
//! Ingest's digest key (`ingest.key`, mode 0600) sits beside the redb file.
//!
//! A chunk holds the points of one series from one batch that fall in one
//! calendar minute, so any time window is answered from whole-minute counters
//! plus the chunks of at most two edge minutes.
//!
//! Batches of one stream may arrive out of sequence order (live data overtakes
//! a backlog), so each stream keeps the set of stored sequence ranges; which
//! batch is new and what a stream lost is decided by `store::stream`, which
//! this backend asks inside the batch's transaction.
//!
//! # Group commit
//! Appends go to one writer thread that takes every batch waiting (up to a
//! limit) into one write transaction and one fsync, then answers each. The
//! exactly-once check reads the stream's stored seq inside that transaction,
//! so two copies of a batch in one group are still stored once.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use guantong_proto::chain::PublicKey;
use guantong_proto::v1::{Manifest, Point, Quality};
use prost::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::chain::{self, ChainState};
use super::records::{
    GatewayRecord, SeriesMeta, SeriesState, SignedLink, SignedLinkHead, distinct, now_ms,
    quality_of, stored_algorithm,
};
pub(crate) use super::records::{quality_name, value_json};
use super::rollup;
use super::stream::{self, Admission, LossRecord};
mod backup;
mod evidence;

use crate::evidence::bundle::{Bundle, DayEvidence};
use crate::evidence::digest;

use super::{
    AppendBatch, AppendOutcome, Appended, ChainBreak, ChainInfo, GatewayInfo, Job, LossInfo,
    ManifestMap, Result, RunsQuery, SeqRanges, SeriesInfo, Store, StoreError, StoredPoint,
    WindowCounts,
};
pub use super::{BackupInfo, ChainVerification, StoreVerification};
use crate::registry::{Access, Account, Enterprise, Equipment};

const GATEWAYS: TableDefinition<&str, &[u8]> = TableDefinition::new("gateways");
const STREAMS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("streams");
const MANIFESTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("manifests");
const SERIES_KEYS: TableDefinition<&str, u64> = TableDefinition::new("series_keys");
const SERIES: TableDefinition<u64, &[u8]> = TableDefinition::new("series");
const STATE: TableDefinition<u64, &[u8]> = TableDefinition::new("state");
const CHUNKS: TableDefinition<(u64, i64, u64), &[u8]> = TableDefinition::new("chunks");
const MINUTES: TableDefinition<(u64, i64), (u64, u64, u64)> = TableDefinition::new("minutes");
const LOSSES: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("losses");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SIGNED: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("signed");
const CHAIN_STATE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("chain_state");
const BREAKS: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("breaks");
const DAYS: TableDefinition<(u64, i64), &[u8]> = TableDefinition::new("days");
const HOURS: TableDefinition<(u64, i64), rollup::HourStats> = TableDefinition::new("hours");
const RUNS: TableDefinition<(u64, u8, i64), i64> = TableDefinition::new("runs");
const GATEWAY_DAYS: TableDefinition<(&str, i64), &[u8]> = TableDefinition::new("gateway_days");

mod configs;
mod registry;
mod rollups;

use rollups::RollupTables;

const MINUTE_MS: i64 = 60_000;
/// redb's page cache. Its default (1 GiB) let a serving ingest grow with
/// the store (640 → 950 MiB RSS in three minutes with 1,000 streams and a
/// city's rollups, BENCHMARKS.md); bounded here, ingest's memory is this
/// plus what the streams hold.
const CACHE_BYTES: usize = 192 << 20;
/// Most points one group commit takes before committing.
const GROUP_POINTS: usize = 200_000;

fn db_err<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Backend(e.into().to_string())
}

#[derive(Clone, PartialEq, prost::Message)]
struct Chunk {
    #[prost(int64, tag = "1")]
    base_ms: i64,
    #[prost(int64, tag = "2")]
    received_at_ms: i64,
    /// `time_offset_ms` relative to `base_ms`; `tag` unused.
    #[prost(message, repeated, tag = "3")]
    points: Vec<Point>,
    /// Arrived from the gateway's backlog after an outage.
    #[prost(bool, tag = "4")]
    backfill: bool,
    /// The batch these points came from (seq 0: stored before chunks named
    /// their batch), so evidence checks can compare them with the signed batch.
    #[prost(fixed64, tag = "5")]
    buffer_id: u64,
    #[prost(uint64, tag = "6")]
    seq: u64,
}

/// The database, borrowed by registry and rollup reads and writes run on a
/// blocking thread.
pub(super) struct Db<'a> {
    db: &'a Database,
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    /// Signs daily digests (`evidence::digest`).
    digest_key: Arc<ed25519_dalek::SigningKey>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// The group-commit thread, joined on drop so the file is released.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
    /// `Store::generation`: bumped by `writing` and by the group commit.
    generation: Arc<AtomicU64>,
}

/// Data of every enterprise and the digest key: the data directory is the
/// owner's only (0700, database 0600), however ingest was started.
fn owner_only(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
        StoreError::Backend(format!(
            "cannot restrict {} to its owner: {e}",
            path.display()
        ))
    })
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<EmbeddedStore> {
        EmbeddedStore::open_unless_serving(dir)?.ok_or_else(|| {
            StoreError::Backend(format!(
                "{} is in use by another process (is guantong-ingest serve running on this data directory?)",
                dir.join("ingest.redb").display()
            ))
        })
    }

    /// Opens (or creates) the store in `dir`; None when another process
    /// (a running `serve`) has it open.
    pub fn open_unless_serving(dir: &Path) -> Result<Option<EmbeddedStore>> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Backend(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let (digest_key, _) =
            guantong_proto::keyfile::load_or_create(&dir.join(crate::evidence::KEY_FILE))
                .map_err(|e| StoreError::Backend(e.to_string()))?;
        let path = dir.join("ingest.redb");
        owner_only(dir, 0o700)?;
        let db = match redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
        {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Ok(None),
            Err(other) => {
                return Err(StoreError::Backend(format!(
                    "cannot open {}: {other}",
                    path.display()
                )));
            }
        };
        owner_only(&path, 0o600)?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(GATEWAYS).map_err(db_err)?;
            txn.open_table(STREAMS).map_err(db_err)?;
            txn.open_table(MANIFESTS).map_err(db_err)?;
            txn.open_table(SERIES_KEYS).map_err(db_err)?;
            txn.open_table(SERIES).map_err(db_err)?;
            txn.open_table(STATE).map_err(db_err)?;
            txn.open_table(CHUNKS).map_err(db_err)?;
            txn.open_table(MINUTES).map_err(db_err)?;
            txn.open_table(LOSSES).map_err(db_err)?;
            txn.open_table(META).map_err(db_err)?;
            txn.open_table(SIGNED).map_err(db_err)?;
            txn.open_table(CHAIN_STATE).map_err(db_err)?;
            txn.open_table(BREAKS).map_err(db_err)?;
            txn.open_table(DAYS).map_err(db_err)?;
            txn.open_table(HOURS).map_err(db_err)?;
            txn.open_table(RUNS).map_err(db_err)?;
            txn.open_table(GATEWAY_DAYS).map_err(db_err)?;
            registry::create_tables(&txn)?;
            configs::create_tables(&txn)?;
        }
        txn.commit().map_err(db_err)?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel::<Job>();
        let writer_db = db.clone();
        let generation = Arc::new(AtomicU64::new(0));
        let writer_generation = generation.clone();
        let writer = std::thread::Builder::new()
            .name("ingest-writer".into())
            .spawn(move || group_commit_loop(&writer_db, &writer_generation, rx))
            .map_err(|e| StoreError::Backend(format!("cannot start writer thread: {e}")))?;
        Ok(Some(EmbeddedStore {
            db,
            digest_key: Arc::new(digest_key),
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            path,
            generation,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `blocking` for a write: the generation grows once it is done.
    async fn writing<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let result = self.blocking(f).await;
        self.generation.fetch_add(1, Ordering::AcqRel);
        result
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Backend(format!("storage task failed: {e}")))?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer thread after the jobs queued;
        // waiting for it releases the file before the store is gone (a
        // command that opens the store next, or `serve`, finds it free).
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        if let Some(writer) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = writer.join();
        }
    }
}

fn group_commit_loop(db: &Database, generation: &AtomicU64, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut points = jobs[0].batch.batch.points.len();
        while points < GROUP_POINTS {
            match rx.try_recv() {
                Ok(job) => {
                    points += job.batch.batch.points.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let outcomes = append_group(db, jobs.iter().map(|j| &j.batch));
        generation.fetch_add(1, Ordering::AcqRel);
        super::answer(jobs, outcomes);
    }
}

fn append_group<'a>(
    db: &Database,
    batches: impl Iterator<Item = &'a AppendBatch>,
) -> Result<Vec<Appended>> {
    let mut txn = db.begin_write().map_err(db_err)?;
    txn.set_durability(Durability::Immediate).map_err(db_err)?;
    let mut outcomes = Vec::new();
    {
        let mut streams = txn.open_table(STREAMS).map_err(db_err)?;
        let mut chunks = txn.open_table(CHUNKS).map_err(db_err)?;
        let mut minutes = txn.open_table(MINUTES).map_err(db_err)?;
        let mut state = txn.open_table(STATE).map_err(db_err)?;
        let mut losses = txn.open_table(LOSSES).map_err(db_err)?;
        let mut meta = txn.open_table(META).map_err(db_err)?;
        let mut signed = txn.open_table(SIGNED).map_err(db_err)?;
        let mut chain_state = txn.open_table(CHAIN_STATE).map_err(db_err)?;
        let mut breaks = txn.open_table(BREAKS).map_err(db_err)?;
        let mut rollups = RollupTables {
            days: txn.open_table(DAYS).map_err(db_err)?,
            hours: txn.open_table(HOURS).map_err(db_err)?,
            runs: txn.open_table(RUNS).map_err(db_err)?,
            gateway_days: txn.open_table(GATEWAY_DAYS).map_err(db_err)?,
        };
        let mut next_chunk = meta
            .get("next_chunk")
            .map_err(db_err)?
            .map(|v| v.value())
            .unwrap_or(1);
        for a in batches {
            let b = &a.batch;
            let key = (a.gateway_id.as_str(), b.buffer_id);
            let mut ranges = match streams.get(key).map_err(db_err)? {
                Some(v) => SeqRanges::decode(v.value()),
                None => SeqRanges::default(),
            };
            let (first, last) = match stream::admit(&ranges, b) {
                Admission::Duplicate { stored_seq } => {
                    outcomes.push(Appended {
                        outcome: AppendOutcome::Duplicate,
                        stored_seq,
                    });
                    continue;
                }
                Admission::Store { first, last } => (first, last),
            };
            if let Some(record) = stream::loss_of(a) {
                let value =
                    serde_json::to_vec(&record).map_err(|e| StoreError::Backend(e.to_string()))?;
                losses
                    .insert(
                        (a.gateway_id.as_str(), b.buffer_id, b.seq),
                        value.as_slice(),
                    )
                    .map_err(db_err)?;
            }
            if a.rejected.is_none()
                && let Some(map) = &a.map
            {
                store_points(
                    a,
                    map,
                    &mut chunks,
                    &mut minutes,
                    &mut state,
                    &mut rollups,
                    &mut next_chunk,
                )?;
                rollups.gateway_day(a)?;
            }
            ranges.insert(first, last);
            streams
                .insert(key, ranges.encode().as_slice())
                .map_err(db_err)?;
            if let Some(link) = &a.link {
                let stored = SignedLink {
                    payload: link.payload.clone(),
                    prev_hash: link.prev_hash.clone(),
                    signature: link.signature.clone(),
                    effective_hash: link.effective_hash.to_vec(),
                    signature_ok: link.signature_ok,
                    last_seq: last,
                    signature_checked: link.signature_checked,
                    received_at_ms: a.received_at_ms,
                    algorithm: link.algorithm.wire() as i32,
                };
                signed
                    .insert(
                        (a.gateway_id.as_str(), b.buffer_id, b.seq),
                        stored.encode_to_vec().as_slice(),
                    )
                    .map_err(db_err)?;
                advance_chain(
                    &a.gateway_id,
                    b.buffer_id,
                    &signed,
                    &mut chain_state,
                    &mut breaks,
                )?;
            }
            outcomes.push(Appended {
                outcome: AppendOutcome::Stored,
                stored_seq: ranges.contiguous(),
            });
        }
        meta.insert("next_chunk", next_chunk).map_err(db_err)?;
    }
    txn.commit().map_err(db_err)?;
    Ok(outcomes)
}

fn put_break(
    t: &mut redb::Table<(&str, u64, u64), &[u8]>,
    gateway: &str,
    buffer_id: u64,
    seq: u64,
    reason: String,
) -> Result<()> {
    tracing::warn!(%gateway, buffer_id = format_args!("{buffer_id:016x}"), seq, %reason, "evidence chain break");
    let value = serde_json::to_vec(&ChainBreak {
        seq,
        reason,
        recorded_at_ms: now_ms(),
    })
    .map_err(|e| StoreError::Backend(e.to_string()))?;
    t.insert((gateway, buffer_id, seq), value.as_slice())
        .map_err(db_err)?;
    Ok(())
}

/// Walks the stream's chain (`store::chain`) over every stored link that
/// follows the verified ones, recording the breaks it finds.
fn advance_chain(
    gateway: &str,
    buffer_id: u64,
    signed: &redb::Table<(&str, u64, u64), &[u8]>,
    states: &mut redb::Table<(&str, u64), &[u8]>,
    breaks: &mut redb::Table<(&str, u64, u64), &[u8]>,
) -> Result<()> {
    let mut st: ChainState = match states.get((gateway, buffer_id)).map_err(db_err)? {
        Some(v) => {
            serde_json::from_slice(v.value()).map_err(|e| StoreError::Backend(e.to_string()))?
        }
        None => ChainState::default(),
    };
    let mut changed = false;
    loop {
        let next = st.next();
        let Some(v) = signed.get((gateway, buffer_id, next)).map_err(db_err)? else {
            break;
        };
        let link =
            SignedLinkHead::decode(v.value()).map_err(|e| StoreError::Backend(e.to_string()))?;
        drop(v);
        let head = chain::LinkHead {
            algorithm: stored_algorithm(link.algorithm),
            prev_hash: link.prev_hash,
            effective_hash: link.effective_hash,
            signature_ok: link.signature_ok,
            signature_checked: link.signature_checked,
            last_seq: link.last_seq,
        };
        for reason in chain::step(&mut st, gateway, buffer_id, &head) {
            put_break(breaks, gateway, buffer_id, next, reason)?;
        }
        changed = true;
    }
    if changed {
        let value = serde_json::to_vec(&st).map_err(|e| StoreError::Backend(e.to_string()))?;
        states
            .insert((gateway, buffer_id), value.as_slice())
            .map_err(db_err)?;
    }
    Ok(())
}

fn store_points(
    a: &AppendBatch,
    map: &ManifestMap,
    chunks: &mut redb::Table<(u64, i64, u64), &[u8]>,
    minutes: &mut redb::Table<(u64, i64), (u64, u64, u64)>,
    state: &mut redb::Table<u64, &[u8]>,
    rollups: &mut RollupTables,
    next_chunk: &mut u64,
) -> Result<()> {
    let b = &a.batch;
    let mut intervals: HashMap<u64, u64> = HashMap::new();
    // (series, minute) -> points with absolute times
    let mut groups: HashMap<(u64, i64), Vec<Point>> = HashMap::new();
    for p in &b.points {
        let series = *map
            .series
            .get(p.tag as usize)
            .ok_or_else(|| StoreError::Invalid(format!("tag {} outside manifest", p.tag)))?;
        intervals.insert(
            series,
            map.intervals.get(p.tag as usize).copied().unwrap_or(0),
        );
        let t = b.base_time_ms.saturating_add(p.time_offset_ms);
        let mut p = p.clone();
        p.tag = 0;
        p.time_offset_ms = t;
        groups
            .entry((series, t.div_euclid(MINUTE_MS) * MINUTE_MS))
            .or_default()
            .push(p);
    }
    let mut per_series: HashMap<u64, Vec<&Point>> = HashMap::new();
    for ((series, minute), points) in &groups {
        let first = points
            .iter()
            .map(|p| p.time_offset_ms)
            .min()
            .unwrap_or(*minute);
        let mut counts = minutes
            .get((*series, *minute))
            .map_err(db_err)?
            .map(|v| v.value())
            .unwrap_or((0, 0, 0));
        for p in points {
            match quality_of(p) {
                Quality::Good => counts.0 += 1,
                Quality::Uncertain => counts.1 += 1,
                Quality::Bad => counts.2 += 1,
            }
        }
        minutes.insert((*series, *minute), counts).map_err(db_err)?;
        let chunk = Chunk {
            base_ms: first,
            received_at_ms: a.received_at_ms,
            points: points
                .iter()
                .map(|p| Point {
                    time_offset_ms: p.time_offset_ms - first,
                    ..p.clone()
                })
                .collect(),
            backfill: a.backfill,
            buffer_id: b.buffer_id,
            seq: b.seq,
        };
        chunks
            .insert(
                (*series, first, *next_chunk),
                chunk.encode_to_vec().as_slice(),
            )
            .map_err(db_err)?;
        *next_chunk += 1;
        per_series.entry(*series).or_default().extend(points.iter());
    }
    for (series, mut points) in per_series {
        let mut s = match state.get(series).map_err(db_err)? {
            Some(v) => SeriesState::parse(v.value())?,
            None => SeriesState::default(),
        };
        let interval = intervals.get(&series).copied().unwrap_or(0);
        let update = s.fold(&mut points, interval, a.received_at_ms, a.backfill);
        rollups.apply(series, interval, update)?;
        state
            .insert(series, s.encode_to_vec().as_slice())
            .map_err(db_err)?;
    }
    Ok(())
}

/// Samples of `series` in `from_ms..to_ms`: whole minutes from their
/// counters, the edge minutes from their chunks.
fn count_window(
    minutes: &impl ReadableTable<(u64, i64), (u64, u64, u64)>,
    chunks: &impl ReadableTable<(u64, i64, u64), &'static [u8]>,
    series: u64,
    from_ms: i64,
    to_ms: i64,
) -> Result<WindowCounts> {
    let mut c = WindowCounts::default();
    if to_ms <= from_ms {
        return Ok(c);
    }
    let first_full = from_ms.div_euclid(MINUTE_MS) * MINUTE_MS
        + if from_ms.rem_euclid(MINUTE_MS) == 0 {
            0
        } else {
            MINUTE_MS
        };
    let end_full = to_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
    let count_edge = |lo: i64, hi: i64, c: &mut WindowCounts| -> Result<()> {
        let minute = lo.div_euclid(MINUTE_MS) * MINUTE_MS;
        for entry in chunks
            .range((series, minute, 0)..(series, minute + MINUTE_MS, 0))
            .map_err(db_err)?
        {
            let (_, v) = entry.map_err(db_err)?;
            let chunk = Chunk::decode(v.value()).map_err(|e| StoreError::Backend(e.to_string()))?;
            for p in &chunk.points {
                let t = chunk.base_ms + p.time_offset_ms;
                if t >= lo && t < hi {
                    match quality_of(p) {
                        Quality::Good => c.good += 1,
                        Quality::Uncertain => c.uncertain += 1,
                        Quality::Bad => c.bad += 1,
                    }
                }
            }
        }
        Ok(())
    };
    if first_full >= end_full {
        // Window within one minute, or spanning two partial minutes.
        count_edge(
            from_ms,
            to_ms.min(from_ms.div_euclid(MINUTE_MS) * MINUTE_MS + MINUTE_MS),
            &mut c,
        )?;
        if end_full > from_ms && end_full < to_ms {
            count_edge(end_full, to_ms, &mut c)?;
        }
        return Ok(c);
    }
    if from_ms < first_full {
        count_edge(from_ms, first_full, &mut c)?;
    }
    for entry in minutes
        .range((series, first_full)..(series, end_full))
        .map_err(db_err)?
    {
        let (_, v) = entry.map_err(db_err)?;
        let (g, u, b) = v.value();
        c.good += g;
        c.uncertain += u;
        c.bad += b;
    }
    if end_full < to_ms {
        count_edge(end_full, to_ms, &mut c)?;
    }
    Ok(c)
}

/// A series as reported, from its metadata row and its state row.
fn series_info(
    id: u64,
    meta: &[u8],
    states: &impl ReadableTable<u64, &'static [u8]>,
) -> Result<SeriesInfo> {
    let s = match states.get(id).map_err(db_err)? {
        Some(v) => SeriesState::parse(v.value())?,
        None => SeriesState::default(),
    };
    Ok(super::records::series_info(
        id,
        SeriesMeta::parse(meta)?,
        &s,
    ))
}

/// Loss records and sequence holes of `gateways` (None: of every gateway).
fn losses_in(db: &Database, gateways: Option<&[String]>) -> Result<Vec<LossInfo>> {
    let txn = db.begin_read().map_err(db_err)?;
    let t = txn.open_table(LOSSES).map_err(db_err)?;
    let manifests = txn.open_table(MANIFESTS).map_err(db_err)?;
    let mut out = Vec::new();
    let all = [String::new()];
    let scope = gateways.unwrap_or(&all);
    for g in scope {
        let records = match gateways {
            Some(_) => t.range((g.as_str(), 0, 0)..=(g.as_str(), u64::MAX, u64::MAX)),
            None => t.iter(),
        };
        for entry in records.map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let (gateway, buffer_id, first_seq) = k.value();
            let r: LossRecord = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            out.push(r.info(gateway, buffer_id, first_seq, |version, tag| {
                let Some(m) = manifests.get((gateway, version)).map_err(db_err)? else {
                    return Ok((String::new(), format!("#{tag} of manifest {version:016x}")));
                };
                let m =
                    Manifest::decode(m.value()).map_err(|e| StoreError::Backend(e.to_string()))?;
                let t = m.tags.get(tag as usize);
                let d = t.and_then(|t| m.devices.get(t.device as usize));
                Ok::<_, StoreError>((
                    d.map_or_else(String::new, |d| d.id.clone()),
                    t.map_or_else(|| format!("#{tag}"), |t| t.name.clone()),
                ))
            })?);
        }
    }
    let streams = txn.open_table(STREAMS).map_err(db_err)?;
    for g in scope {
        let ranges = match gateways {
            Some(_) => streams.range((g.as_str(), 0)..=(g.as_str(), u64::MAX)),
            None => streams.iter(),
        };
        for entry in ranges.map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let (gateway, buffer_id) = k.value();
            out.extend(stream::holes(
                gateway,
                buffer_id,
                &SeqRanges::decode(v.value()),
                now_ms(),
            ));
        }
    }
    Ok(out)
}

/// Chain status of the streams of `gateways` (None: of every gateway).
fn chains_in(db: &Database, gateways: Option<&[String]>) -> Result<Vec<ChainInfo>> {
    let txn = db.begin_read().map_err(db_err)?;
    let states = txn.open_table(CHAIN_STATE).map_err(db_err)?;
    let breaks = txn.open_table(BREAKS).map_err(db_err)?;
    let signed = txn.open_table(SIGNED).map_err(db_err)?;
    let mut out = Vec::new();
    // Streams with verified links, and streams known only by a break
    // (a refused key change before any batch).
    let mut streams: std::collections::BTreeSet<(String, u64)> = std::collections::BTreeSet::new();
    let all = [String::new()];
    for g in gateways.unwrap_or(&all) {
        let (states_in, breaks_in) = match gateways {
            Some(_) => (
                states.range((g.as_str(), 0)..=(g.as_str(), u64::MAX)),
                breaks.range((g.as_str(), 0, 0)..=(g.as_str(), u64::MAX, u64::MAX)),
            ),
            None => (states.iter(), breaks.iter()),
        };
        for entry in states_in.map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            let (g, b) = k.value();
            streams.insert((g.to_string(), b));
        }
        for entry in breaks_in.map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            let (g, b, _) = k.value();
            streams.insert((g.to_string(), b));
        }
    }
    for (gateway, buffer_id) in streams {
        let gateway = gateway.as_str();
        let st: ChainState = match states.get((gateway, buffer_id)).map_err(db_err)? {
            Some(v) => {
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Backend(e.to_string()))?
            }
            None => ChainState::default(),
        };
        let mut list = Vec::new();
        for b in breaks
            .range((gateway, buffer_id, 0)..=(gateway, buffer_id, u64::MAX))
            .map_err(db_err)?
        {
            let (_, v) = b.map_err(db_err)?;
            list.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Backend(e.to_string()))?,
            );
        }
        let waiting = signed
            .range((gateway, buffer_id, st.verified_through + 1)..=(gateway, buffer_id, u64::MAX))
            .map_err(db_err)?
            .count() as u64;
        out.push(ChainInfo {
            gateway: gateway.to_string(),
            buffer_id: format!("{buffer_id:016x}"),
            verified_from: st.verified_from,
            verified_through: st.verified_through,
            head_hash: st.head.unwrap_or_default(),
            waiting,
            breaks: list,
        });
    }
    Ok(out)
}

impl Store for EmbeddedStore {
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
    async fn put_enterprise(&self, e: &Enterprise) -> Result<()> {
        let e = e.clone();
        self.writing(move |db| Db { db }.put_enterprise(&e)).await
    }
    async fn enterprises(&self) -> Result<Vec<Enterprise>> {
        self.blocking(move |db| Db { db }.enterprises()).await
    }
    async fn enterprise(&self, code: &str) -> Result<Option<Enterprise>> {
        let code = code.to_string();
        self.blocking(move |db| Db { db }.enterprise(&code)).await
    }
    async fn put_equipment(&self, code: &str, list: &[Equipment]) -> Result<()> {
        let (code, list) = (code.to_string(), list.to_vec());
        self.writing(move |db| Db { db }.put_equipment(&code, &list))
            .await
    }
    async fn equipment(&self, code: &str) -> Result<Vec<Equipment>> {
        let code = code.to_string();
        self.blocking(move |db| Db { db }.equipment(&code)).await
    }
    async fn assign_gateway(&self, gateway: &str, code: &str) -> Result<()> {
        let (gateway, code) = (gateway.to_string(), code.to_string());
        self.writing(move |db| Db { db }.assign_gateway(&gateway, &code))
            .await
    }
    async fn unassign_gateway(&self, gateway: &str) -> Result<bool> {
        let gateway = gateway.to_string();
        self.writing(move |db| Db { db }.unassign_gateway(&gateway))
            .await
    }
    async fn gateway_owners(&self) -> Result<BTreeMap<String, String>> {
        self.blocking(move |db| Db { db }.gateway_owners()).await
    }
    async fn gateways_of(&self, codes: &[String]) -> Result<BTreeMap<String, String>> {
        let codes = codes.to_vec();
        self.blocking(move |db| Db { db }.gateways_of(&codes)).await
    }
    async fn enterprises_of_provider(&self, provider: &str) -> Result<Vec<Enterprise>> {
        let provider = provider.to_string();
        self.blocking(move |db| Db { db }.enterprises_of_provider(&provider))
            .await
    }
    async fn add_gateway_config(
        &self,
        gateway: &str,
        version: crate::gateway_config::ConfigVersion,
    ) -> Result<u64> {
        let gateway = gateway.to_string();
        self.writing(move |db| Db { db }.add_gateway_config(&gateway, version))
            .await
    }
    async fn gateway_configs(
        &self,
        gateway: &str,
    ) -> Result<Vec<crate::gateway_config::ConfigVersion>> {
        let gateway = gateway.to_string();
        self.blocking(move |db| Db { db }.gateway_configs(&gateway))
            .await
    }
    async fn gateway_config_states(
        &self,
    ) -> Result<BTreeMap<String, crate::gateway_config::ConfigState>> {
        self.blocking(move |db| Db { db }.gateway_config_states())
            .await
    }
    async fn update_gateway_config_state(
        &self,
        gateway: &str,
        change: Box<dyn FnOnce(&mut crate::gateway_config::ConfigState) + Send>,
    ) -> Result<crate::gateway_config::ConfigState> {
        let gateway = gateway.to_string();
        self.blocking(move |db| Db { db }.update_gateway_config_state(&gateway, change))
            .await
    }
    async fn put_account(&self, a: &Account) -> Result<String> {
        let a = a.clone();
        self.writing(move |db| Db { db }.put_account(&a)).await
    }
    async fn account_by_token(&self, token: &str) -> Result<Option<Account>> {
        let token = token.to_string();
        self.blocking(move |db| Db { db }.account_by_token(&token))
            .await
    }
    async fn accounts(&self) -> Result<Vec<Account>> {
        self.blocking(move |db| Db { db }.accounts()).await
    }
    async fn log_access(&self, a: &Access) -> Result<()> {
        let a = a.clone();
        self.blocking(move |db| Db { db }.log_access(&a)).await
    }
    async fn access_log(&self, limit: usize) -> Result<Vec<Access>> {
        self.blocking(move |db| Db { db }.access_log(limit)).await
    }
    async fn series_days(
        &self,
        series: &[u64],
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<(u64, i64, rollup::SeriesDay)>> {
        let series = series.to_vec();
        self.blocking(move |db| Db { db }.series_days(&series, from_day, to_day))
            .await
    }
    async fn series_runs_of(&self, queries: Vec<RunsQuery>) -> Result<Vec<Vec<(i64, i64)>>> {
        self.blocking(move |db| Db { db }.series_runs(&queries))
            .await
    }
    async fn series_hours_of(
        &self,
        series: Vec<u64>,
        from: i64,
        to: i64,
    ) -> Result<Vec<Vec<rollup::HourRow>>> {
        self.blocking(move |db| Db { db }.series_hours(&series, from, to))
            .await
    }
    async fn gateway_days(
        &self,
        gateway: &str,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<(i64, rollup::GatewayDay)>> {
        let gateway = gateway.to_string();
        self.blocking(move |db| Db { db }.gateway_days(&gateway, from_day, to_day))
            .await
    }

    async fn register_gateway(&self, id: &str, public_key: Option<PublicKey>) -> Result<String> {
        let id = id.to_string();
        self.writing(move |db| {
            let (record, token) = GatewayRecord::new(public_key);
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut t = txn.open_table(GATEWAYS).map_err(db_err)?;
                if t.get(id.as_str()).map_err(db_err)?.is_some() {
                    return Err(StoreError::Exists(format!("gateway `{id}`")));
                }
                let value =
                    serde_json::to_vec(&record).map_err(|e| StoreError::Backend(e.to_string()))?;
                t.insert(id.as_str(), value.as_slice()).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)?;
            Ok(token)
        })
        .await
    }

    async fn authenticate(&self, id: &str, token: &str) -> Result<bool> {
        let (id, token) = (id.to_string(), token.to_string());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let t = txn.open_table(GATEWAYS).map_err(db_err)?;
            let Some(v) = t.get(id.as_str()).map_err(db_err)? else {
                return Ok(false);
            };
            let record: GatewayRecord = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::Backend(format!("gateway {id}: {e}")))?;
            record.accepts(&id, &token)
        })
        .await
    }

    async fn rotate_token(&self, id: &str, grace: std::time::Duration) -> Result<String> {
        let id = id.to_string();
        self.writing(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            let token;
            {
                let mut t = txn.open_table(GATEWAYS).map_err(db_err)?;
                let mut record: GatewayRecord = match t.get(id.as_str()).map_err(db_err)? {
                    Some(v) => serde_json::from_slice(v.value())
                        .map_err(|e| StoreError::Backend(format!("gateway {id}: {e}")))?,
                    None => return Err(StoreError::Invalid(format!("no gateway `{id}`"))),
                };
                token = record.rotate(grace);
                let value =
                    serde_json::to_vec(&record).map_err(|e| StoreError::Backend(e.to_string()))?;
                t.insert(id.as_str(), value.as_slice()).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)?;
            Ok(token)
        })
        .await
    }

    async fn gateway_key(&self, id: &str) -> Result<Option<(PublicKey, String)>> {
        let id = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let t = txn.open_table(GATEWAYS).map_err(db_err)?;
            let Some(v) = t.get(id.as_str()).map_err(db_err)? else {
                return Ok(None);
            };
            let r: GatewayRecord = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            Ok(r.bound_key()?
                .map(|k| (k, r.key_source.unwrap_or_default())))
        })
        .await
    }

    async fn bind_key_on_first_use(&self, id: &str, public_key: PublicKey) -> Result<()> {
        let id = id.to_string();
        self.writing(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut t = txn.open_table(GATEWAYS).map_err(db_err)?;
                let mut r: GatewayRecord = match t.get(id.as_str()).map_err(db_err)? {
                    Some(v) => serde_json::from_slice(v.value())
                        .map_err(|e| StoreError::Backend(e.to_string()))?,
                    None => return Err(StoreError::NotFound(format!("gateway `{id}`"))),
                };
                if r.public_key.is_some() {
                    return Err(StoreError::Exists(format!("a key of gateway `{id}`")));
                }
                r.bind(public_key, "trust-on-first-use");
                let value =
                    serde_json::to_vec(&r).map_err(|e| StoreError::Backend(e.to_string()))?;
                t.insert(id.as_str(), value.as_slice()).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn record_break(
        &self,
        gateway: &str,
        buffer_id: u64,
        seq: u64,
        reason: String,
    ) -> Result<()> {
        let gateway = gateway.to_string();
        self.writing(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut t = txn.open_table(BREAKS).map_err(db_err)?;
                put_break(&mut t, &gateway, buffer_id, seq, reason)?;
            }
            txn.commit().map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn chains(&self) -> Result<Vec<ChainInfo>> {
        self.blocking(|db| chains_in(db, None)).await
    }

    async fn chains_of(&self, gateways: &[String]) -> Result<Vec<ChainInfo>> {
        let gateways = distinct(gateways);
        self.blocking(move |db| chains_in(db, Some(&gateways)))
            .await
    }

    async fn gateways(&self) -> Result<Vec<GatewayInfo>> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(db_err)?;
            let t = txn.open_table(GATEWAYS).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(db_err)? {
                let (k, v) = entry.map_err(db_err)?;
                let record: GatewayRecord = serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Backend(e.to_string()))?;
                out.push(GatewayInfo {
                    id: k.value().to_string(),
                    registered_at_ms: record.registered_at_ms,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn open_stream(&self, gateway: &str, buffer_id: u64, first_unacked: u64) -> Result<u64> {
        let gateway = gateway.to_string();
        self.writing(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            let stored;
            {
                let mut streams = txn.open_table(STREAMS).map_err(db_err)?;
                let key = (gateway.as_str(), buffer_id);
                let mut ranges = match streams.get(key).map_err(db_err)? {
                    Some(v) => SeqRanges::decode(v.value()),
                    None => SeqRanges::default(),
                };
                if let Some(record) =
                    stream::acknowledged_elsewhere(&mut ranges, first_unacked, now_ms())
                {
                    let value = serde_json::to_vec(&record)
                        .map_err(|e| StoreError::Backend(e.to_string()))?;
                    txn.open_table(LOSSES)
                        .map_err(db_err)?
                        .insert((gateway.as_str(), buffer_id, 1), value.as_slice())
                        .map_err(db_err)?;
                    streams
                        .insert(key, ranges.encode().as_slice())
                        .map_err(db_err)?;
                }
                stored = ranges.contiguous();
            }
            txn.commit().map_err(db_err)?;
            Ok(stored)
        })
        .await
    }

    async fn put_manifest(&self, gateway: &str, manifest: Manifest) -> Result<Arc<ManifestMap>> {
        let gateway = gateway.to_string();
        self.writing(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            let mut series = Vec::with_capacity(manifest.tags.len());
            {
                let mut keys = txn.open_table(SERIES_KEYS).map_err(db_err)?;
                let mut metas = txn.open_table(SERIES).map_err(db_err)?;
                let mut meta = txn.open_table(META).map_err(db_err)?;
                let mut next = meta
                    .get("next_series")
                    .map_err(db_err)?
                    .map(|v| v.value())
                    .unwrap_or(1);
                for (i, tag) in manifest.tags.iter().enumerate() {
                    // Validates the tag's device before anything is written.
                    let m = SeriesMeta::of_tag(&gateway, &manifest, i, 0)?;
                    let key = format!("{gateway}/{}/{}", m.device, tag.name);
                    let (id, created_ms) = match keys.get(key.as_str()).map_err(db_err)? {
                        Some(v) => {
                            let id = v.value();
                            let created = metas
                                .get(id)
                                .map_err(db_err)?
                                .and_then(|m| SeriesMeta::parse(m.value()).ok())
                                .map_or(0, |m| m.created_ms);
                            (id, created)
                        }
                        None => {
                            next += 1;
                            (next - 1, now_ms())
                        }
                    };
                    keys.insert(key.as_str(), id).map_err(db_err)?;
                    let m = SeriesMeta { created_ms, ..m };
                    let value =
                        serde_json::to_vec(&m).map_err(|e| StoreError::Backend(e.to_string()))?;
                    metas.insert(id, value.as_slice()).map_err(db_err)?;
                    series.push(id);
                }
                meta.insert("next_series", next).map_err(db_err)?;
                txn.open_table(MANIFESTS)
                    .map_err(db_err)?
                    .insert(
                        (gateway.as_str(), manifest.version),
                        manifest.encode_to_vec().as_slice(),
                    )
                    .map_err(db_err)?;
            }
            txn.commit().map_err(db_err)?;
            Ok(Arc::new(ManifestMap {
                version: manifest.version,
                series,
                intervals: manifest.tags.iter().map(|t| t.interval_ms).collect(),
            }))
        })
        .await
    }

    async fn manifest_map(&self, gateway: &str, version: u64) -> Result<Option<Arc<ManifestMap>>> {
        let gateway = gateway.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let manifests = txn.open_table(MANIFESTS).map_err(db_err)?;
            let Some(v) = manifests.get((gateway.as_str(), version)).map_err(db_err)? else {
                return Ok(None);
            };
            let manifest =
                Manifest::decode(v.value()).map_err(|e| StoreError::Backend(e.to_string()))?;
            let keys = txn.open_table(SERIES_KEYS).map_err(db_err)?;
            let mut series = Vec::with_capacity(manifest.tags.len());
            for tag in &manifest.tags {
                let device = manifest
                    .devices
                    .get(tag.device as usize)
                    .map(|d| d.id.as_str())
                    .unwrap_or_default();
                let key = format!("{gateway}/{device}/{}", tag.name);
                let id = keys
                    .get(key.as_str())
                    .map_err(db_err)?
                    .ok_or_else(|| StoreError::Backend(format!("series {key} missing")))?;
                series.push(id.value());
            }
            Ok(Some(Arc::new(ManifestMap {
                version,
                series,
                intervals: manifest.tags.iter().map(|t| t.interval_ms).collect(),
            })))
        })
        .await
    }

    fn append(
        &self,
        batch: AppendBatch,
    ) -> impl Future<Output = Result<Appended>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let queued = match self.jobs.lock() {
            Ok(jobs) => match jobs.as_ref() {
                Some(tx) => tx
                    .send(Job { batch, reply })
                    .map_err(|_| StoreError::Backend("writer thread stopped".into())),
                None => Err(StoreError::Backend("store is closing".into())),
            },
            Err(_) => Err(StoreError::Backend("writer lock poisoned".into())),
        };
        async move {
            queued?;
            rx.await
                .map_err(|_| StoreError::Backend("writer thread stopped".into()))?
        }
    }

    async fn series(&self) -> Result<Vec<SeriesInfo>> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(db_err)?;
            let metas = txn.open_table(SERIES).map_err(db_err)?;
            let states = txn.open_table(STATE).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in metas.iter().map_err(db_err)? {
                let (k, v) = entry.map_err(db_err)?;
                out.push(series_info(k.value(), v.value(), &states)?);
            }
            Ok(out)
        })
        .await
    }

    async fn series_of(&self, gateways: &[String]) -> Result<Vec<SeriesInfo>> {
        let gateways = gateways.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let keys = txn.open_table(SERIES_KEYS).map_err(db_err)?;
            let metas = txn.open_table(SERIES).map_err(db_err)?;
            let states = txn.open_table(STATE).map_err(db_err)?;
            let mut out = Vec::new();
            for gateway in gateways {
                // Keys are "gateway/device/tag"; gateway ids hold no `/`.
                let (lo, hi) = (format!("{gateway}/"), format!("{gateway}0"));
                for entry in keys.range(lo.as_str()..hi.as_str()).map_err(db_err)? {
                    let (_, id) = entry.map_err(db_err)?;
                    let id = id.value();
                    let Some(meta) = metas.get(id).map_err(db_err)? else {
                        return Err(StoreError::Backend(format!("series {id} has no metadata")));
                    };
                    out.push(series_info(id, meta.value(), &states)?);
                }
            }
            out.sort_by_key(|s| s.id);
            Ok(out)
        })
        .await
    }

    async fn series_by_tag(
        &self,
        gateway: &str,
        device: &str,
        tag: &str,
    ) -> Result<Option<SeriesInfo>> {
        let key = format!("{gateway}/{device}/{tag}");
        let (device, tag) = (device.to_string(), tag.to_string());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let keys = txn.open_table(SERIES_KEYS).map_err(db_err)?;
            let Some(id) = keys.get(key.as_str()).map_err(db_err)? else {
                return Ok(None);
            };
            let id = id.value();
            let metas = txn.open_table(SERIES).map_err(db_err)?;
            let Some(meta) = metas.get(id).map_err(db_err)? else {
                return Err(StoreError::Backend(format!("series {id} has no metadata")));
            };
            let states = txn.open_table(STATE).map_err(db_err)?;
            let info = series_info(id, meta.value(), &states)?;
            // The key joins names with `/`, which names may hold: compare.
            Ok((info.device == device && info.tag == tag).then_some(info))
        })
        .await
    }

    async fn window_counts_of(
        &self,
        series: Vec<u64>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<WindowCounts>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let minutes = txn.open_table(MINUTES).map_err(db_err)?;
            let chunks = txn.open_table(CHUNKS).map_err(db_err)?;
            series
                .iter()
                .map(|&s| count_window(&minutes, &chunks, s, from_ms, to_ms))
                .collect()
        })
        .await
    }

    async fn points(
        &self,
        series: u64,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredPoint>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let chunks = txn.open_table(CHUNKS).map_err(db_err)?;
            let start = from_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
            let mut out = Vec::new();
            for entry in chunks
                .range((series, start, 0)..(series, to_ms, 0))
                .map_err(db_err)?
            {
                let (_, v) = entry.map_err(db_err)?;
                let chunk =
                    Chunk::decode(v.value()).map_err(|e| StoreError::Backend(e.to_string()))?;
                for p in &chunk.points {
                    let t = chunk.base_ms + p.time_offset_ms;
                    if t >= from_ms && t < to_ms {
                        out.push(StoredPoint {
                            time_ms: t,
                            value: value_json(&p.value),
                            quality: quality_name(quality_of(p)),
                            quality_code: p.quality_code,
                            received_at_ms: chunk.received_at_ms,
                            backfill: chunk.backfill,
                            server_time_ms: p.server_time_delta_ms.map(|d| t.saturating_add(d)),
                        });
                    }
                }
            }
            out.sort_by_key(|p| p.time_ms);
            out.truncate(limit);
            Ok(out)
        })
        .await
    }

    async fn losses(&self) -> Result<Vec<LossInfo>> {
        self.blocking(|db| losses_in(db, None)).await
    }

    async fn losses_of(&self, gateways: &[String]) -> Result<Vec<LossInfo>> {
        let gateways = distinct(gateways);
        self.blocking(move |db| losses_in(db, Some(&gateways)))
            .await
    }

    async fn export_evidence(
        &self,
        gateways: Vec<String>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Bundle> {
        super::export::check_window(from_ms, to_ms)?;
        let mut collected = Vec::with_capacity(gateways.len());
        for gateway in gateways {
            collected.push(
                self.blocking(move |db| evidence::collect(db, &gateway, from_ms, to_ms))
                    .await?,
            );
        }
        let key = hex::encode(self.digest_key.verifying_key().as_bytes());
        super::export::bundle(self, collected, from_ms, to_ms, key).await
    }

    async fn verify_stored(&self) -> Result<StoreVerification> {
        self.blocking(Self::verify_db).await
    }

    async fn backup(&self, out: PathBuf) -> Result<BackupInfo> {
        self.blocking(move |db| backup::copy(db, &out)).await
    }

    async fn day_digests(&self, gateways: Vec<String>, day: String) -> Result<Vec<DayEvidence>> {
        let start = evidence::day_start(&day)?;
        let gateways = if gateways.is_empty() {
            self.gateways().await?.into_iter().map(|g| g.id).collect()
        } else {
            gateways
        };
        let key = self.digest_key.clone();
        self.blocking(move |db| {
            let mut out = Vec::with_capacity(gateways.len());
            for gateway in gateways {
                let links = evidence::day_links(db, &gateway, start)?;
                out.push(digest::day_evidence(&key, &gateway, &day, links));
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod suite {
    use super::EmbeddedStore;

    /// The embedded store in a temporary data directory.
    struct Embedded(tempfile::TempDir);

    impl crate::store::suite::Harness for Embedded {
        type Store = EmbeddedStore;
        async fn new() -> Embedded {
            Embedded(tempfile::tempdir().expect("tempdir"))
        }
        async fn open(&self) -> EmbeddedStore {
            EmbeddedStore::open(self.0.path()).expect("open the embedded store")
        }
    }

    crate::store_suite!(Embedded);
}

#[cfg(test)]
mod tests {
    use super::*;
    use guantong_proto::v1::Batch;

    fn manifest() -> Manifest {
        crate::store::suite::manifest("gw", 1, 1000)
    }

    /// Points every 7 s from an odd start, some Bad, sent out of time order.
    fn times() -> Vec<(i64, Quality)> {
        let t0 = 1_700_000_013_000i64;
        (0..200)
            .map(|i| {
                (
                    t0 + i * 7_000,
                    if i % 11 == 0 {
                        Quality::Bad
                    } else {
                        Quality::Good
                    },
                )
            })
            .rev()
            .collect()
    }

    /// A store holding `times()` in batches of 37 (seq 1, 2, ...).
    async fn filled() -> (tempfile::TempDir, EmbeddedStore, Arc<ManifestMap>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let map = store
            .put_manifest("gw", manifest())
            .await
            .expect("manifest");
        for (seq, chunk) in times().chunks(37).enumerate() {
            let base = chunk.iter().map(|(t, _)| *t).min().unwrap_or(0);
            let batch = Batch {
                buffer_id: 9,
                seq: seq as u64 + 1,
                manifest_version: 1,
                base_time_ms: base,
                points: chunk
                    .iter()
                    .map(|&(t, q)| Point {
                        tag: 0,
                        time_offset_ms: t - base,
                        value: (q == Quality::Good)
                            .then_some(guantong_proto::v1::point::Value::Uint(t as u64)),
                        quality: q as i32,
                        quality_code: 0,
                        server_time_delta_ms: None,
                    })
                    .collect(),
                ..Default::default()
            };
            let a = AppendBatch {
                gateway_id: "gw".into(),
                batch,
                map: Some(map.clone()),
                received_at_ms: 0,
                backfill: false,
                link: None,
                rejected: None,
                wire_bytes: 0,
            };
            assert_eq!(
                store.append(a).await.expect("append").outcome,
                AppendOutcome::Stored
            );
        }
        (dir, store, map)
    }

    #[tokio::test]
    async fn verify_finds_every_rollup_that_disagrees_with_the_stored_points() {
        let (_dir, store, map) = filled().await;
        let clean = store.verify_chains().expect("verify");
        assert_eq!(clean.query_tables, Vec::<String>::new());
        let series = map.series[0];
        let (t0, _) = *times().last().expect("points");
        let txn = store.db.begin_write().expect("write");
        {
            let mut days = txn.open_table(DAYS).expect("days");
            let key = (series, rollup::day_of(t0));
            let mut d =
                rollup::SeriesDay::decode(days.get(key).expect("get").expect("row").value())
                    .expect("decode");
            d.good += 1;
            days.insert(key, d.encode_to_vec().as_slice()).expect("put");
            let mut hours = txn.open_table(HOURS).expect("hours");
            let key = (series, rollup::hour_of(t0 + 7_000));
            let (n, sum, min, max) = hours.get(key).expect("get").expect("row").value();
            hours.insert(key, (n, sum, min, max + 1.0)).expect("put");
            let mut state = txn.open_table(STATE).expect("state");
            let mut s = SeriesState::decode(state.get(series).expect("get").expect("row").value())
                .expect("decode");
            s.bad += 1;
            state
                .insert(series, s.encode_to_vec().as_slice())
                .expect("put");
            let mut gateway_days = txn.open_table(GATEWAY_DAYS).expect("gateway days");
            gateway_days
                .remove(("gw", rollup::day_of(0)))
                .expect("remove");
            let mut runs = txn.open_table(RUNS).expect("runs");
            let first_run = runs
                .range((series, rollup::RUN_DATA, i64::MIN)..)
                .expect("range")
                .next()
                .expect("a run")
                .expect("read")
                .0
                .value();
            runs.remove(first_run).expect("remove");
        }
        txn.commit().expect("commit");
        let found = store.verify_chains().expect("verify").query_tables;
        for what in [
            "the day rollup says",
            "the hour rollup says",
            "the series totals say",
            "the gateway day rollup counts 0 points but 200 are stored",
            "stored points lie outside every data run",
        ] {
            assert!(
                found.iter().any(|p| p.contains(what)),
                "no problem says `{what}`: {found:#?}"
            );
        }
    }

    #[tokio::test]
    async fn a_batch_without_points_is_no_rollup_disagreement() {
        let (_dir, store, map) = filled().await;
        let a = AppendBatch {
            gateway_id: "gw".into(),
            batch: Batch {
                buffer_id: 10,
                seq: 1,
                manifest_version: 1,
                ..Default::default()
            },
            map: Some(map),
            // Another day of receipt than the points of `filled`.
            received_at_ms: 10 * 86_400_000,
            backfill: false,
            link: None,
            rejected: None,
            wire_bytes: 0,
        };
        store.append(a).await.expect("append");
        let v = store.verify_chains().expect("verify");
        assert_eq!(v.query_tables, Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_backup_holds_what_the_store_holds_and_refuses_a_table_it_does_not_know() {
        let (dir, store, _) = filled().await;
        let copy = dir.path().join("copy");
        std::fs::create_dir(&copy).expect("mkdir");
        let info = store
            .backup(copy.join("ingest.redb"))
            .await
            .expect("backup");
        assert!(info.rows > 0);
        let original = store.series().await.expect("series");
        let original_verification = format!("{:?}", store.verify_chains().expect("verify"));
        // A file that exists is never overwritten.
        assert!(store.backup(copy.join("ingest.redb")).await.is_err());
        drop(store);
        let restored = EmbeddedStore::open(&copy).expect("open the copy");
        assert_eq!(
            format!("{:?}", restored.series().await.expect("series")),
            format!("{original:?}")
        );
        let verification = restored.verify_chains().expect("verify");
        assert!(verification.query_tables.is_empty(), "{verification:?}");
        assert_eq!(format!("{verification:?}"), original_verification);

        // A table added to the store but not to the backup's list.
        let txn = restored.db.begin_write().expect("write");
        txn.open_table(TableDefinition::<&str, u64>::new("newcomer"))
            .expect("table");
        txn.commit().expect("commit");
        let e = restored
            .backup(dir.path().join("second.redb"))
            .await
            .expect_err("an unknown table is refused");
        assert!(e.to_string().contains("newcomer"), "{e}");
    }
}

impl EmbeddedStore {
    /// Re-verifies every stored chain from the original signed bytes, as an
    /// auditor would: recomputes each link hash, checks each signature with
    /// the gateway's bound key, each batch's own numbers, and each link's
    /// predecessor; compares each signed batch with the points the query
    /// tables serve for it, and every rollup with the stored points. Reads one
    /// snapshot; a serving process runs it through `Store::verify_stored`.
    pub fn verify_chains(&self) -> Result<StoreVerification> {
        Self::verify_db(&self.db)
    }

    /// `verify_chains` on one read transaction: a consistent snapshot,
    /// however many batches are written meanwhile.
    fn verify_db(db: &Database) -> Result<StoreVerification> {
        use super::verify::{self, Counts, Recount, Rolled};
        let txn = db.begin_read().map_err(db_err)?;
        let mut names = HashMap::new();
        for entry in txn
            .open_table(SERIES)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            names.insert(k.value(), SeriesMeta::parse(v.value())?);
        }
        let mut recount = Recount::new(names, None);
        for entry in txn
            .open_table(CHUNKS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            let chunk =
                Chunk::decode(v.value()).map_err(|e| StoreError::Backend(format!("chunk: {e}")))?;
            for p in &chunk.points {
                let p = Point {
                    time_offset_ms: chunk.base_ms + p.time_offset_ms,
                    ..p.clone()
                };
                recount.add(
                    k.value().0,
                    &p,
                    chunk.backfill,
                    chunk.received_at_ms,
                    chunk.buffer_id,
                    chunk.seq,
                );
            }
        }
        let mut rolled = Rolled::default();
        for entry in txn
            .open_table(MINUTES)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            rolled.minutes.insert(k.value(), v.value());
        }
        for entry in txn
            .open_table(DAYS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            let d = rollup::SeriesDay::decode(v.value())
                .map_err(|e| StoreError::Backend(format!("day rollup: {e}")))?;
            rolled.days.insert(k.value(), Counts::of_day(&d));
        }
        for entry in txn
            .open_table(HOURS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            let (n, _sum, min, max) = v.value();
            rolled.hours.insert(k.value(), (n, min, max));
        }
        for entry in txn
            .open_table(STATE)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            rolled
                .totals
                .insert(k.value(), Counts::of_state(&SeriesState::parse(v.value())?));
        }
        for entry in txn
            .open_table(GATEWAY_DAYS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            let (gateway, day) = k.value();
            let d = rollup::GatewayDay::decode(v.value())
                .map_err(|e| StoreError::Backend(format!("gateway day rollup: {e}")))?;
            rolled
                .gateway_days
                .insert((gateway.to_string(), day), d.points);
        }
        for entry in txn
            .open_table(RUNS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            let (series, kind, start) = k.value();
            if kind == rollup::RUN_DATA {
                rolled
                    .data_runs
                    .entry(series)
                    .or_default()
                    .insert(start, v.value());
            }
        }
        for entry in txn
            .open_table(MANIFESTS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            let (gateway, version) = k.value();
            rolled.manifests.insert(
                (gateway.to_string(), version),
                Manifest::decode(v.value()).ok(),
            );
        }
        for entry in txn
            .open_table(LOSSES)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            let r: LossRecord = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::Backend(format!("loss: {e}")))?;
            if r.is_rejection() {
                let (g, b, s) = k.value();
                rolled.rejected.insert((g.to_string(), b, s));
            }
        }
        let signed = txn.open_table(SIGNED).map_err(db_err)?;
        let gateways = txn.open_table(GATEWAYS).map_err(db_err)?;
        let links = signed.iter().map_err(db_err)?.map(|entry| {
            let (k, v) = entry.map_err(db_err)?;
            let (gateway, buffer_id, seq) = k.value();
            Ok((
                gateway.to_string(),
                buffer_id,
                seq,
                SignedLink::decode(v.value()).map_err(|e| e.to_string()),
            ))
        });
        verify::walk(recount, rolled, links, |gateway| {
            Ok(match gateways.get(gateway).map_err(db_err)? {
                Some(g) => serde_json::from_slice::<GatewayRecord>(g.value())
                    .ok()
                    .and_then(|r| r.bound_key().ok().flatten()),
                None => None,
            })
        })
    }
}
