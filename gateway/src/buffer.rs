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
//! - `salvage`: first seq -> loss record for damaged records found at open,
//!   waiting to be signed (`note_lost_file`)
//! - `chain`: `head` -> link hash of the newest record (see proto `chain`);
//!   `manifest` -> the manifest version the last manifest link announced
//!
//! Record layout (version 2, big-endian): `[1] format`, `[4] crc32 of
//! everything after the header's first 25 bytes`, `[8] last_seq`,
//! `[8] manifest_version`, `[4] points`, `[32] prev_hash`, `[64] signature`,
//! payload. The format byte names the link's chain algorithm: 2 for
//! `ed25519` (or unsigned, signature all zero), 3 for `sm2` (same layout), so
//! a record keeps its algorithm when the configured one changes.
//!
//! # Evidence chain
//! With an identity (`with_identity`), every record is a signed link of the
//! buffer's hash chain, fixed at commit: a re-send carries the same link. A
//! loss record replacing links k..=m takes link k's `prev_hash` and carries
//! link m's effective hash as `bridge_hash`, so the chain still verifies
//! across what was dropped. A buffer's first link chains after the genesis
//! of the algorithm that signs it.
//!
//! # Invariants
//! - Sequence numbers start at 1, increase by one per batch and are never
//!   reused by this buffer (`next_seq` is committed with the batch).
//!   `buffer_id` is random per buffer file, so a new file never collides.
//! - A batch is durable when `append` returns (commit with fsync).
//! - `bytes` is the sum of stored record sizes. When an append takes it past
//!   `max_bytes`, the policy applies: `DropOldest` replaces the oldest batches
//!   not handed to the uplink by loss records; `RejectNewest` stores a loss
//!   record instead of the new points. Batches older than `max_age` become
//!   loss records too. A loss record is a batch with `loss` set: it covers the
//!   sequence numbers it replaces and counts their points per tag, so nothing
//!   is dropped silently and the sequence stays gap-free on the wire.
//! - Batches handed out by `read_from` and not yet acknowledged are never
//!   turned into loss records, so ingest never receives both a batch and a
//!   loss record for the same number. Dropping holds `drop_lock` through its
//!   commit and `read_from` takes it around its snapshot, which orders the two.
//! - Damage costs only the damaged records, declared: at open, a record
//!   whose checksum fails is replaced by a signed loss record (reason
//!   `corrupted`, counts estimated from its neighbours, `prev_hash` and
//!   `bridge_hash` from the records before and after); a file redb cannot
//!   open is moved aside and salvaged record by record into a fresh file
//!   under the same `buffer_id` and sequence numbers, its missing ranges
//!   declared the same way (see `salvage`). Only a file with no record left
//!   starts a new `buffer_id`, whose first record says so. A checksum that
//!   fails later, while running, is handled the same way when `read_from`
//!   meets it (`replace_corrupted_records` is the one place for both).
//! - After an I/O error (disk full, EIO) redb refuses every transaction
//!   until it is reopened: the operation that saw it schedules a reopen
//!   (`watch`), and the next operation closes and reopens the file first
//!   (`db`), backing off from 0.2 to 5 s while writes keep failing. Nothing
//!   committed is lost by a reopen; the writer holds what it could not
//!   commit (see `writer`).
//! - The record layout is pinned by golden bytes (a test): a backlog written
//!   by an older version must still read.
//! - Acknowledged deletes commit with fsync, like appends: a delete lost in a
//!   crash would bring back batches ingest already holds, and a drop under
//!   quota pressure could then declare them lost as well (found by the model
//!   test).
//!
//! # Memory
//! redb's page cache is capped (`storage_io::CACHE_BYTES`; redb's default is
//! 1 GiB). Batches are read back within seconds of their commit and only
//! once, so a small cache serves the uplink; older pages come from the OS
//! page cache.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use guantong_proto::chain::{self, Algorithm, ChainKey, Hash};
use guantong_proto::v1::{Batch, Loss, LossReason, Manifest, Point, Quality, TagLoss};
use prost::Message;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::Deserialize;

use crate::quality::{Sample, now_ms};
use crate::storage_io::BufferStorage;

const BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("batches");
const MANIFESTS: TableDefinition<u64, &[u8]> = TableDefinition::new("manifests");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const CHAIN: TableDefinition<&str, &[u8]> = TableDefinition::new("chain");
/// Loss records for damaged records, waiting to be signed and written
/// (`note_lost_file`): first seq -> `salvage::PendingLoss`.
const SALVAGE: TableDefinition<u64, &[u8]> = TableDefinition::new("salvage");

mod salvage;
#[doc(hidden)]
pub use salvage::fuzz_check as fuzz_salvage;

const FORMAT: u8 = 2;
/// The same layout, for a link of the `sm2` chain algorithm.
const FORMAT_SM2: u8 = 3;
/// format, crc32, last_seq, manifest_version, points, prev_hash, signature
const HEADER: usize = 1 + 4 + 8 + 8 + 4 + 32 + 64;
/// Room kept below the quota for the loss record a drop writes.
const LOSS_RECORD_ROOM: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("buffer directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "buffer.max_bytes is {max} but the disk holding {path} has only {available} free (plus {current} already used by the buffer): lower buffer.max_bytes or free disk space"
    )]
    NoRoom {
        path: PathBuf,
        max: bytesize::ByteSize,
        available: bytesize::ByteSize,
        current: bytesize::ByteSize,
    },
    #[error("buffer storage: {0}")]
    Storage(#[from] redb::Error),
    #[error("buffer task failed: {0}")]
    Task(String),
    #[error("buffer record {seq} fails its checksum even after it was replaced by a loss record")]
    Unreplaceable { seq: u64 },
    #[error("buffer storage failed ({cause}); reopening it again in {retry_in:?}")]
    Reopening { cause: String, retry_in: Duration },
}

impl BufferError {
    /// Whether the configuration must change (a restart cannot help).
    pub fn is_config_problem(&self) -> bool {
        matches!(self, BufferError::NoRoom { .. })
    }

    /// Whether redb must be closed and opened again before it can write
    /// (after an I/O error it refuses every transaction until then).
    fn needs_reopen(&self) -> bool {
        matches!(
            self,
            BufferError::Storage(redb::Error::Io(_) | redb::Error::PreviousIo)
        )
    }
}

type Result<T> = std::result::Result<T, BufferError>;

fn storage<E: Into<redb::Error>>(e: E) -> BufferError {
    BufferError::Storage(e.into())
}

/// What to do when the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Replace the oldest unsent batches by a loss record (default).
    #[default]
    DropOldest,
    /// Keep what is buffered; count new points as lost.
    RejectNewest,
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
    /// Chain link: previous link hash and the signature over this link.
    pub prev_hash: [u8; 32],
    pub signature: [u8; 64],
    /// The chain algorithm the link was made with.
    pub algorithm: Algorithm,
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
    /// `None` only while a reopen after an I/O error has not succeeded yet.
    db: RwLock<Option<Database>>,
    reopen: Mutex<Reopen>,
    path: PathBuf,
    buffer_id: u64,
    max_bytes: u64,
    when_full: WhenFull,
    /// First sequence numbers handed to the uplink and not yet acknowledged.
    handed_out: Mutex<BTreeSet<u64>>,
    drop_lock: Mutex<()>,
    signer: Option<ChainSigner>,
    /// Damage not recorded yet: an unreadable file moved aside with nothing
    /// salvaged, or loss records waiting in `SALVAGE`.
    lost_file: Mutex<bool>,
    /// How the file is opened, at start and after an I/O error.
    backend: BufferStorage,
    /// The last write commit failed: `next_seq` before it and after it, to
    /// tell whether it reached the file after all (`resolve_unsure`).
    unsure: Mutex<Option<(u64, u64)>>,
}

/// Signs the buffer's links with the gateway's identity.
pub struct ChainSigner {
    pub key: ChainKey,
    pub gateway_id: String,
}

fn meta_get(table: &impl ReadableTable<&'static str, u64>, key: &str) -> Result<Option<u64>> {
    Ok(table.get(key).map_err(storage)?.map(|v| v.value()))
}

/// Bytes free for an unprivileged writer on the file system holding `dir`.
fn available_space(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

impl Buffer {
    /// Opens (or creates) the buffer in `dir`, checking that `max_bytes` fits
    /// on the disk. A file redb cannot open is moved aside (loudly) and a
    /// fresh buffer started.
    pub fn open(dir: &Path, max_bytes: u64, when_full: WhenFull) -> Result<Buffer> {
        Buffer::open_on(dir, max_bytes, when_full, BufferStorage::File)
    }

    /// `open`, reaching the file through `backend` (also for every reopen):
    /// tests and benches inject faults this way.
    pub fn open_on(
        dir: &Path,
        max_bytes: u64,
        when_full: WhenFull,
        backend: BufferStorage,
    ) -> Result<Buffer> {
        std::fs::create_dir_all(dir).map_err(|source| BufferError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("buffer.redb");
        let current = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let available = available_space(dir).map_err(|source| BufferError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        if available.saturating_add(current) < max_bytes {
            return Err(BufferError::NoRoom {
                path: dir.to_path_buf(),
                max: bytesize::ByteSize(max_bytes),
                available: bytesize::ByteSize(available),
                current: bytesize::ByteSize(current),
            });
        }
        // A damaged newest commit is not rolled back to the one before (its
        // batches would vanish undeclared) but salvaged like an unopenable file.
        let create = |path: &Path| backend.open(path, true);
        let (db, moved_aside) = match create(&path) {
            Ok(db) => {
                replace_corrupted_records(&db)?;
                (db, None)
            }
            Err(e) => {
                let aside = dir.join(format!("buffer.redb.unreadable-{}", now_ms()));
                let why = match e {
                    redb::DatabaseError::RepairAborted => {
                        "the newest commit is damaged (redb would fall back to the one before it)"
                            .to_string()
                    }
                    e => e.to_string(),
                };
                tracing::error!(
                    error = %why,
                    file = %path.display(),
                    moved_to = %aside.display(),
                    "BUFFER FILE CANNOT BE OPENED: moved aside and salvaged into a fresh buffer"
                );
                std::fs::rename(&path, &aside).map_err(|source| BufferError::Dir {
                    path: path.clone(),
                    source,
                })?;
                let db = create(&path).map_err(storage)?;
                let salvaged = salvage_into(&aside, &db)?;
                (db, (!salvaged).then_some(aside))
            }
        };
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
            txn.open_table(CHAIN).map_err(storage)?;
        }
        let pending_salvage = !txn
            .open_table(SALVAGE)
            .map_err(storage)?
            .is_empty()
            .map_err(storage)?;
        txn.commit().map_err(storage)?;
        let buffer = Buffer {
            db: RwLock::new(Some(db)),
            reopen: Mutex::new(Reopen::default()),
            path,
            buffer_id,
            max_bytes,
            when_full,
            handed_out: Mutex::new(BTreeSet::new()),
            drop_lock: Mutex::new(()),
            signer: None,
            lost_file: Mutex::new(moved_aside.is_some() || pending_salvage),
            backend,
            unsure: Mutex::new(None),
        };
        Ok(buffer)
    }

    /// Records damage found at open, once, signed when an identity is
    /// attached: the loss records waiting in `SALVAGE` at their own sequence
    /// numbers, bridged by their neighbours; or, when nothing of an
    /// unreadable file could be salvaged, one record saying so as the new
    /// buffer's first (a proper first link).
    fn note_lost_file(&self) -> Result<()> {
        let mut pending = self.lost_file.lock().unwrap_or_else(|e| e.into_inner());
        if *pending {
            if !self.watch(self.write_salvaged_losses(), true)? {
                self.append_loss(Loss {
                    reason: LossReason::Corrupted as i32,
                    ..Default::default()
                })?;
            }
            *pending = false;
        }
        Ok(())
    }

    /// Signs and writes the loss records waiting in `SALVAGE`; false when
    /// there were none.
    fn write_salvaged_losses(&self) -> Result<bool> {
        let db = self.db()?;
        self.write_salvaged_losses_in(&db)
    }

    fn write_salvaged_losses_in(&self, db: &Database) -> Result<bool> {
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        let pending: Vec<salvage::PendingLoss> = {
            let table = txn.open_table(SALVAGE).map_err(storage)?;
            table
                .iter()
                .map_err(storage)?
                .filter_map(|r| r.ok())
                .filter_map(|(_, v)| salvage::PendingLoss::decode(v.value()))
                .collect()
        };
        if pending.is_empty() {
            return Ok(false);
        }
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut batches = txn.open_table(BATCHES).map_err(storage)?;
            let mut bytes = meta_get(&meta, "bytes")?.unwrap_or(0);
            let mut dropped = meta_get(&meta, "dropped_points")?.unwrap_or(0);
            for p in &pending {
                let batch = Batch {
                    buffer_id: self.buffer_id,
                    seq: p.first,
                    loss: Some(p.loss.clone()),
                    committed_at_ms: now_ms(),
                    manifest_sha256: Vec::new(),
                    ..Default::default()
                };
                let (record, _) = self.seal(p.loss.last_seq, 0, 0, &p.prev, &batch.encode_to_vec());
                batches
                    .insert(p.first, record.as_slice())
                    .map_err(storage)?;
                bytes += record.len() as u64;
                dropped += p.loss.points;
                tracing::warn!(
                    first_seq = p.first,
                    last_seq = p.loss.last_seq,
                    points = p.loss.points,
                    estimated = p.loss.estimated,
                    "buffer: damaged records declared lost"
                );
            }
            meta.insert("bytes", bytes).map_err(storage)?;
            meta.insert("dropped_points", dropped).map_err(storage)?;
            txn.open_table(SALVAGE)
                .map_err(storage)?
                .retain(|_, _| false)
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(true)
    }

    /// Signs every record committed from now on as a link of the chain.
    pub fn with_identity(mut self, signer: ChainSigner) -> Buffer {
        self.signer = Some(signer);
        if let Err(e) = self.note_lost_file() {
            tracing::error!(error = %e, "cannot record the lost buffer file; it is logged above");
        }
        self
    }

    /// The link hash of the newest record (genesis for an empty chain).
    fn chain_head(&self, txn: &redb::WriteTransaction) -> Result<Hash> {
        let t = txn.open_table(CHAIN).map_err(storage)?;
        let stored = t
            .get("head")
            .map_err(storage)?
            .and_then(|v| chain::to_hash(v.value()));
        Ok(stored.unwrap_or_else(|| match &self.signer {
            Some(s) => s.key.algorithm().genesis(&s.gateway_id, self.buffer_id),
            None => [0; 32],
        }))
    }

    fn set_chain_head(&self, txn: &redb::WriteTransaction, head: &Hash) -> Result<()> {
        txn.open_table(CHAIN)
            .map_err(storage)?
            .insert("head", head.as_slice())
            .map_err(storage)?;
        Ok(())
    }

    /// Frames `payload` as a record linked after `prev`; returns it and its link hash.
    fn seal(
        &self,
        last_seq: u64,
        manifest_version: u64,
        points: u32,
        prev: &Hash,
        payload: &[u8],
    ) -> (Vec<u8>, Hash) {
        let algorithm = self.algorithm();
        // Without an identity (tests, benches) there is no chain to keep:
        // no hash, so an unsigned baseline carries none of the chain's cost.
        let (link, signature) = match &self.signer {
            Some(s) => {
                let link = algorithm.link_hash(prev, payload);
                (link, s.key.sign(&link))
            }
            None => ([0; 32], [0; 64]),
        };
        (
            frame_record(
                algorithm,
                last_seq,
                manifest_version,
                points,
                prev,
                &signature,
                payload,
            ),
            link,
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The public key the buffer's links are signed with, if any.
    pub fn public_key(&self) -> Option<Vec<u8>> {
        self.signer.as_ref().map(|s| s.key.public_key())
    }

    /// The chain algorithm of links made from now on (`ed25519` unsigned).
    pub fn algorithm(&self) -> Algorithm {
        self.signer
            .as_ref()
            .map_or(Algorithm::Ed25519, |s| s.key.algorithm())
    }

    pub fn buffer_id(&self) -> u64 {
        self.buffer_id
    }

    /// Stores a manifest. With an identity, when the chain has not announced
    /// this version last, also commits a manifest link for it (a signed batch
    /// without points carrying `chain::manifest_hash`), so configuration
    /// changes are part of the evidence.
    pub fn put_manifest(&self, manifest: &Manifest) -> Result<()> {
        self.watch(self.put_manifest_once(manifest), true)
    }

    fn put_manifest_once(&self, manifest: &Manifest) -> Result<()> {
        let version = manifest.version;
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        txn.open_table(MANIFESTS)
            .map_err(storage)?
            .insert(version, manifest.encode_to_vec().as_slice())
            .map_err(storage)?;
        let announced = txn
            .open_table(CHAIN)
            .map_err(storage)?
            .get("manifest")
            .map_err(storage)?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map(u64::from_be_bytes);
        if self.signer.is_some() && announced != Some(version) {
            let committed_at = now_ms();
            let mut meta = txn.open_table(META).map_err(storage)?;
            let seq = meta_get(&meta, "next_seq")?.unwrap_or(1);
            let payload = Batch {
                buffer_id: self.buffer_id,
                seq,
                manifest_version: version,
                base_time_ms: committed_at,
                points: Vec::new(),
                loss: None,
                committed_at_ms: committed_at,
                manifest_sha256: chain::manifest_hash(manifest).to_vec(),
            }
            .encode_to_vec();
            let head = self.chain_head(&txn)?;
            let (record, link) = self.seal(seq, version, 0, &head, &payload);
            txn.open_table(BATCHES)
                .map_err(storage)?
                .insert(seq, record.as_slice())
                .map_err(storage)?;
            let bytes = meta_get(&meta, "bytes")?.unwrap_or(0) + record.len() as u64;
            meta.insert("next_seq", seq + 1).map_err(storage)?;
            meta.insert("bytes", bytes).map_err(storage)?;
            drop(meta);
            self.set_chain_head(&txn, &link)?;
            txn.open_table(CHAIN)
                .map_err(storage)?
                .insert("manifest", version.to_be_bytes().as_slice())
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(())
    }

    pub fn manifest(&self, version: u64) -> Result<Option<Vec<u8>>> {
        self.watch(self.manifest_once(version), false)
    }

    fn manifest_once(&self, version: u64) -> Result<Option<Vec<u8>>> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(storage)?;
        let table = txn.open_table(MANIFESTS).map_err(storage)?;
        Ok(table
            .get(version)
            .map_err(storage)?
            .map(|v| v.value().to_vec()))
    }

    /// The open database. After an I/O error (`watch`) it is first closed
    /// and opened again, at most once per backoff step; until that succeeds
    /// every operation fails with `Reopening`.
    fn db(&self) -> Result<Db<'_>> {
        let mut reopen = self.reopen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cause) = reopen.cause.clone() {
            let now = Instant::now();
            if now < reopen.next_try {
                return Err(BufferError::Reopening {
                    cause,
                    retry_in: reopen.next_try - now,
                });
            }
            let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
            // redb keeps the file locked while open: close before opening.
            drop(slot.take());
            // A reopen may roll back a commit whose write failed: its caller
            // was told it failed (see `resolve_unsure`).
            match self.backend.open(&self.path, false) {
                Ok(db) => {
                    *slot = Some(db);
                    tracing::debug!(file = %self.path.display(), after = %cause, "buffer database reopened");
                    reopen.cause = None;
                }
                Err(e) => {
                    reopen.backoff = (reopen.backoff * 2).min(REOPEN_BACKOFF_MAX);
                    reopen.next_try = now + reopen.backoff;
                    tracing::error!(error = %e, retry_in = ?reopen.backoff, "buffer database cannot be reopened yet");
                    return Err(storage(e));
                }
            }
        }
        drop(reopen);
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(_) => Ok(Db(guard)),
            None => Err(BufferError::Reopening {
                cause: "a reopen is under way".into(),
                retry_in: Duration::ZERO,
            }),
        }
    }

    /// Passes `result` on; an I/O error schedules a reopen of the database
    /// (redb refuses every later transaction until it is reopened). A write
    /// that succeeds (`wrote`) ends the failure and its backoff.
    fn watch<T>(&self, result: Result<T>, wrote: bool) -> Result<T> {
        let mut reopen = self.reopen.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Err(e) if e.needs_reopen() && reopen.cause.is_none() => {
                let now = Instant::now();
                // Backoff grows while reopened databases keep failing.
                reopen.backoff = match reopen.failing_since {
                    Some(_) => (reopen.backoff * 2).min(REOPEN_BACKOFF_MAX),
                    None => REOPEN_BACKOFF_MIN,
                };
                reopen.next_try = now + reopen.backoff;
                reopen.failing_since.get_or_insert(now);
                reopen.cause = Some(e.to_string());
            }
            Ok(_) if wrote && reopen.cause.is_none() => {
                if let Some(since) = reopen.failing_since.take() {
                    tracing::warn!(failing_for = ?since.elapsed(), "buffer storage works again");
                    *reopen = Reopen::default();
                }
            }
            _ => {}
        }
        result
    }

    /// Commits a loss record for points that never reached the buffer
    /// (e.g. held in memory while the disk refused writes): signed and
    /// chained like every record.
    /// Returns the last sequence number written.
    pub fn record_loss(&self, tally: &LossTally, reason: LossReason) -> Result<u64> {
        self.append_loss(tally.to_loss(reason))?;
        Ok(self.stats()?.next_seq - 1)
    }

    fn handed_out(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.handed_out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits `samples` as batches of at most `max_points`, durably.
    /// Returns the last sequence number written.
    pub fn append(
        &self,
        manifest_version: u64,
        samples: &[Sample],
        max_points: usize,
    ) -> Result<u64> {
        self.note_lost_file()?;
        self.watch(
            self.append_once(manifest_version, samples, max_points),
            true,
        )
    }

    fn append_once(
        &self,
        manifest_version: u64,
        samples: &[Sample],
        max_points: usize,
    ) -> Result<u64> {
        let committed_at = now_ms();
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        let (before, last, over) = {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut batches = txn.open_table(BATCHES).map_err(storage)?;
            let mut seq = meta_get(&meta, "next_seq")?.unwrap_or(1);
            let before = seq;
            let mut bytes = meta_get(&meta, "bytes")?.unwrap_or(0);
            let mut rejected: Vec<&Sample> = Vec::new();
            let mut head = self.chain_head(&txn)?;
            for chunk in samples.chunks(max_points.max(1)) {
                let payload =
                    encode_batch(self.buffer_id, seq, manifest_version, chunk, committed_at);
                let (record, link) =
                    self.seal(seq, manifest_version, chunk.len() as u32, &head, &payload);
                if self.when_full == WhenFull::RejectNewest
                    && bytes + record.len() as u64 > self.max_bytes
                {
                    rejected.extend(chunk.iter());
                    continue;
                }
                batches.insert(seq, record.as_slice()).map_err(storage)?;
                bytes += record.len() as u64;
                seq += 1;
                head = link;
            }
            self.set_chain_head(&txn, &head)?;
            meta.insert("next_seq", seq).map_err(storage)?;
            meta.insert("bytes", bytes).map_err(storage)?;
            drop((meta, batches));
            if !rejected.is_empty() {
                let mut tally = LossTally::default();
                for s in &rejected {
                    tally.add(manifest_version, s);
                }
                self.write_loss(
                    &txn,
                    tally.to_loss(LossReason::BufferFull),
                    rejected.len() as u64,
                )?;
                tracing::warn!(
                    points = rejected.len(),
                    "buffer full: new points rejected and counted as lost"
                );
            }
            let meta = txn.open_table(META).map_err(storage)?;
            (
                before,
                meta_get(&meta, "next_seq")?.unwrap_or(1) - 1,
                meta_get(&meta, "bytes")?.unwrap_or(0) > self.max_bytes,
            )
        };
        if !over || self.when_full == WhenFull::RejectNewest {
            self.commit_noting(txn, before, last + 1)?;
            return Ok(last);
        }
        let _order = self.drop_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.drop_unsent(&txn, LossReason::BufferFull, |_, bytes| {
            bytes > self.max_bytes.saturating_sub(LOSS_RECORD_ROOM)
        })?;
        self.commit_noting(txn, before, last + 1)?;
        Ok(last)
    }

    /// Commits a transaction that moves `next_seq` from `before` to
    /// `after`; when the commit fails, notes both for `resolve_unsure`.
    fn commit_noting(&self, txn: redb::WriteTransaction, before: u64, after: u64) -> Result<()> {
        let committed = txn.commit().map_err(storage);
        *self.unsure.lock().unwrap_or_else(|e| e.into_inner()) =
            committed.is_err().then_some((before, after));
        committed
    }

    /// Whether the last write commit that failed (`append`, `record_loss`)
    /// reached the file after all: `Some(last seq)` if it did, `None` if it
    /// did not (or none failed). redb writes a commit's pages and header,
    /// then fsyncs; when only the fsync fails, the reopened file holds the
    /// commit, and its points must be neither written again nor declared
    /// lost. Reopens the database first, so it fails while storage does;
    /// the caller commits nothing before it succeeds.
    pub fn resolve_unsure(&self) -> Result<Option<u64>> {
        let Some((before, after)) = *self.unsure.lock().unwrap_or_else(|e| e.into_inner()) else {
            return Ok(None);
        };
        let next = self.stats()?.next_seq;
        *self.unsure.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // A commit that wrote no record (nothing to append) cannot be told
        // by `next_seq`: it held nothing, so it counts as not landed and
        // what the writer holds is written again.
        if after > before && next == after {
            tracing::warn!(
                first_seq = before,
                last_seq = after - 1,
                "a commit reported as failed is in the file after all (its fsync failed): kept, not written again"
            );
            return Ok(Some(after - 1));
        }
        if next != before {
            tracing::error!(
                before,
                after,
                next,
                "the buffer's next sequence number is neither before nor after the failed commit"
            );
        }
        Ok(None)
    }

    /// Appends a standalone loss record (e.g. a buffer file lost).
    fn append_loss(&self, loss: Loss) -> Result<u64> {
        self.watch(self.append_loss_once(loss), true)
    }

    fn append_loss_once(&self, loss: Loss) -> Result<u64> {
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        let points = loss.points;
        let before = meta_get(&txn.open_table(META).map_err(storage)?, "next_seq")?.unwrap_or(1);
        let seq = self.write_loss(&txn, loss, points)?;
        let after = meta_get(&txn.open_table(META).map_err(storage)?, "next_seq")?.unwrap_or(1);
        self.commit_noting(txn, before, after)?;
        Ok(seq)
    }

    /// Writes `loss` as the next record, or merges it into the last record
    /// when that is a loss record of the same reason not yet handed out.
    /// Returns the record's first sequence number.
    fn write_loss(
        &self,
        txn: &redb::WriteTransaction,
        mut loss: Loss,
        dropped_now: u64,
    ) -> Result<u64> {
        let mut meta = txn.open_table(META).map_err(storage)?;
        let mut batches = txn.open_table(BATCHES).map_err(storage)?;
        let next = meta_get(&meta, "next_seq")?.unwrap_or(1);
        let mut bytes = meta_get(&meta, "bytes")?.unwrap_or(0);
        let (mut first, mut last) = (next, next);
        let mut prev = self.chain_head(txn)?;
        let tail = batches
            .last()
            .map_err(storage)?
            .map(|(k, v)| (k.value(), v.value().to_vec()));
        if let Some((key, record)) = tail.filter(|(key, _)| !self.handed_out().contains(key)) {
            let mergeable = decode_record(&record)
                .filter(|(h, _)| h.last_seq + 1 == next)
                .and_then(|(h, b)| Some((h, b.loss?)))
                .filter(|(_, old)| old.reason == loss.reason);
            if let Some((h, old)) = mergeable {
                let mut merged = LossTally::default();
                merged.merge(&old);
                merged.merge(&loss);
                loss.points = merged.points;
                loss.tags = tag_losses(merged.per_tag);
                batches.remove(key).map_err(storage)?;
                bytes = bytes.saturating_sub(record.len() as u64);
                (first, last) = (key, h.last_seq);
                prev = h.prev_hash;
            }
        }
        loss.last_seq = last;
        let batch = Batch {
            buffer_id: self.buffer_id,
            seq: first,
            loss: Some(loss),
            committed_at_ms: now_ms(),
            manifest_sha256: Vec::new(),
            ..Default::default()
        };
        let (record, link) = self.seal(last, 0, 0, &prev, &batch.encode_to_vec());
        batches.insert(first, record.as_slice()).map_err(storage)?;
        self.set_chain_head(txn, &link)?;
        bytes += record.len() as u64;
        meta.insert("next_seq", last + 1).map_err(storage)?;
        meta.insert("bytes", bytes).map_err(storage)?;
        let dropped = meta_get(&meta, "dropped_points")?.unwrap_or(0);
        meta.insert("dropped_points", dropped + dropped_now)
            .map_err(storage)?;
        Ok(first)
    }

    /// Replaces batches not handed out, oldest first, by loss records while
    /// `keep_dropping(record, bytes)` says so. Caller holds `drop_lock`.
    fn drop_unsent(
        &self,
        txn: &redb::WriteTransaction,
        reason: LossReason,
        mut keep_dropping: impl FnMut(&Batch, u64) -> bool,
    ) -> Result<u64> {
        let mut meta = txn.open_table(META).map_err(storage)?;
        let mut batches = txn.open_table(BATCHES).map_err(storage)?;
        let mut bytes = meta_get(&meta, "bytes")?.unwrap_or(0);
        let mut dropped_now = 0u64;
        let handed = self.handed_out().clone();
        let keys: Vec<u64> = batches
            .iter()
            .map_err(storage)?
            .map(|r| r.map(|(k, _)| k.value()))
            .collect::<std::result::Result<_, _>>()
            .map_err(storage)?;
        // Runs of consecutive dropped records, each becoming one loss record.
        let mut runs: Vec<Run> = Vec::new();
        let mut open: Option<Run> = None;
        for key in keys {
            if handed.contains(&key) {
                runs.extend(open.take());
                continue;
            }
            let Some(record) = batches
                .get(key)
                .map_err(storage)?
                .map(|v| v.value().to_vec())
            else {
                continue;
            };
            let decoded = decode_record(&record);
            let probe = decoded.as_ref().map(|(_, b)| b.clone()).unwrap_or_default();
            if !keep_dropping(&probe, bytes) {
                break;
            }
            batches.remove(key).map_err(storage)?;
            bytes = bytes.saturating_sub(record.len() as u64);
            let first_prev = decoded.as_ref().map_or([0; 32], |(h, _)| h.prev_hash);
            let run = open.get_or_insert_with(|| Run {
                first: key,
                last: key,
                prev: first_prev,
                bridge: [0; 32],
                points: 0,
                per_tag: BTreeMap::new(),
            });
            match decoded {
                Some((h, batch)) => {
                    run.last = h.last_seq.max(key);
                    run.bridge = effective_link(&h, &record[HEADER..], &batch);
                    if let Some(loss) = batch.loss {
                        run.points += loss.points;
                        for t in loss.tags {
                            merge_tag_loss(
                                &mut run.per_tag,
                                (t.manifest_version, t.tag),
                                t.points,
                                t.first_time_ms,
                                t.last_time_ms,
                                t.bad_points,
                            );
                        }
                    } else {
                        dropped_now += batch.points.len() as u64;
                        run.points += batch.points.len() as u64;
                        for p in &batch.points {
                            let t = batch.base_time_ms + p.time_offset_ms;
                            let bad = u64::from(p.quality == Quality::Bad as i32);
                            merge_tag_loss(
                                &mut run.per_tag,
                                (batch.manifest_version, p.tag),
                                1,
                                t,
                                t,
                                bad,
                            );
                        }
                    }
                }
                None => {
                    run.last = key;
                    if record.len() >= 25 {
                        let claimed = u64::from(u32::from_be_bytes(
                            record[21..25].try_into().unwrap_or_default(),
                        ));
                        dropped_now += claimed;
                        run.points += claimed;
                    }
                }
            }
        }
        runs.extend(open.take());
        for run in &runs {
            let loss = Loss {
                last_seq: run.last,
                points: run.points,
                tags: tag_losses(run.per_tag.clone()),
                reason: reason as i32,
                bridge_hash: run.bridge.to_vec(),
                estimated: false,
            };
            let batch = Batch {
                buffer_id: self.buffer_id,
                seq: run.first,
                loss: Some(loss),
                committed_at_ms: now_ms(),
                manifest_sha256: Vec::new(),
                ..Default::default()
            };
            let (record, _) = self.seal(run.last, 0, 0, &run.prev, &batch.encode_to_vec());
            batches
                .insert(run.first, record.as_slice())
                .map_err(storage)?;
            bytes += record.len() as u64;
            tracing::warn!(
                first_seq = run.first,
                last_seq = run.last,
                points = run.points,
                ?reason,
                "buffer: unsent batches replaced by a loss record"
            );
        }
        meta.insert("bytes", bytes).map_err(storage)?;
        let dropped = meta_get(&meta, "dropped_points")?.unwrap_or(0);
        meta.insert("dropped_points", dropped + dropped_now)
            .map_err(storage)?;
        Ok(dropped_now)
    }

    /// Replaces unsent batches committed before `cutoff_ms` by loss records
    /// (reason `expired`). Returns the points dropped.
    pub fn expire(&self, cutoff_ms: i64) -> Result<u64> {
        self.watch(self.expire_once(cutoff_ms), true)
    }

    fn expire_once(&self, cutoff_ms: i64) -> Result<u64> {
        // The database first, then `drop_lock`, as in `append`: a reopen
        // waiting for the database must not wait on a holder of `drop_lock`.
        let db = self.db()?;
        let _order = self.drop_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        let dropped = self.drop_unsent(&txn, LossReason::Expired, |b, _| {
            b.loss.is_none() && b.committed_at_ms < cutoff_ms
        })?;
        txn.commit().map_err(storage)?;
        Ok(dropped)
    }

    /// Up to `max` batches from `from` on, in order. Marks them as handed out.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<StoredBatch>> {
        self.watch(self.read_from_once(from, max), false)
    }

    fn read_from_once(&self, from: u64, max: usize) -> Result<Vec<StoredBatch>> {
        // The database first, then `drop_lock`, as in `append`: a reopen
        // waiting for the database must not wait on a holder of `drop_lock`.
        let db = self.db()?;
        let _order = self.drop_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut replaced = None;
        loop {
            match read_records(&db, from, max)? {
                Ok(out) => {
                    self.handed_out().extend(out.iter().map(|b| b.seq));
                    return Ok(out);
                }
                // A record damaged since the buffer opened: declared as at
                // open, by a signed loss record bridged by its neighbours.
                Err(seq) if replaced != Some(seq) => {
                    tracing::error!(
                        seq,
                        "buffer record fails its checksum while running; a loss record replaces it"
                    );
                    replace_corrupted_records(&db)?;
                    self.write_salvaged_losses_in(&db)?;
                    replaced = Some(seq);
                }
                Err(seq) => return Err(BufferError::Unreplaceable { seq }),
            }
        }
    }

    /// Deletes every record in `first..=last` (ingest has stored them).
    pub fn ack_range(&self, first: u64, last: u64) -> Result<u64> {
        self.ack_ranges(&[(first, last)])
    }

    /// Deletes every record in each of `ranges`, in one transaction.
    pub fn ack_ranges(&self, ranges: &[(u64, u64)]) -> Result<u64> {
        self.watch(self.ack_ranges_once(ranges), true)
    }

    fn ack_ranges_once(&self, ranges: &[(u64, u64)]) -> Result<u64> {
        let ranges: Vec<(u64, u64)> = ranges.iter().copied().filter(|(a, b)| a <= b).collect();
        if ranges.is_empty() {
            return Ok(0);
        }
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        let mut removed = 0;
        {
            let mut batches = txn.open_table(BATCHES).map_err(storage)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut bytes = meta_get(&meta, "bytes")?.unwrap_or(0);
            for &(first, last) in &ranges {
                for entry in batches
                    .extract_from_if(first..=last, |_, _| true)
                    .map_err(storage)?
                {
                    let (_, v) = entry.map_err(storage)?;
                    bytes = bytes.saturating_sub(v.value().len() as u64);
                    removed += 1;
                }
            }
            if removed > 0 {
                meta.insert("bytes", bytes).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)?;
        let mut handed = self.handed_out();
        for &(first, last) in &ranges {
            let acked: Vec<u64> = handed.range(first..=last).copied().collect();
            for k in acked {
                handed.remove(&k);
            }
        }
        Ok(removed)
    }

    /// Deletes every record up to and including `seq`.
    pub fn ack(&self, seq: u64) -> Result<u64> {
        self.ack_range(1, seq)
    }

    pub fn stats(&self) -> Result<BufferStats> {
        self.watch(self.stats_once(), false)
    }

    fn stats_once(&self) -> Result<BufferStats> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(storage)?;
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

/// The database behind the read lock; dereferences to an open `Database`.
struct Db<'a>(RwLockReadGuard<'a, Option<Database>>);

impl std::ops::Deref for Db<'_> {
    type Target = Database;
    fn deref(&self) -> &Database {
        self.0
            .as_ref()
            .expect("Buffer::db hands out open databases only")
    }
}

/// The reopen schedule after an I/O error.
struct Reopen {
    /// The error that made a reopen necessary; `None` once reopened.
    cause: Option<String>,
    next_try: Instant,
    backoff: Duration,
    /// Since when storage fails; cleared by the first success after.
    failing_since: Option<Instant>,
}

impl Default for Reopen {
    fn default() -> Self {
        Reopen {
            cause: None,
            next_try: Instant::now(),
            backoff: REOPEN_BACKOFF_MIN,
            failing_since: None,
        }
    }
}

const REOPEN_BACKOFF_MIN: Duration = Duration::from_millis(200);
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Up to `max` records from `from` on, or the first that fails its
/// checksum.
fn read_records(
    db: &Database,
    from: u64,
    max: usize,
) -> Result<std::result::Result<Vec<StoredBatch>, u64>> {
    let txn = db.begin_read().map_err(storage)?;
    let table = txn.open_table(BATCHES).map_err(storage)?;
    let mut out = Vec::with_capacity(max.min(1024));
    for entry in table.range(from..).map_err(storage)?.take(max) {
        let (k, v) = entry.map_err(storage)?;
        let (seq, record) = (k.value(), v.value());
        let Some(h) = split_header(record) else {
            return Ok(Err(seq));
        };
        out.push(StoredBatch {
            seq,
            last_seq: h.last_seq,
            manifest_version: h.manifest_version,
            points: h.points,
            payload: Bytes::copy_from_slice(&record[HEADER..]),
            prev_hash: h.prev_hash,
            signature: h.signature,
            algorithm: h.algorithm,
        });
    }
    Ok(Ok(out))
}

/// Fills the fresh database `db` with what the unreadable file `aside` still
/// holds (see `salvage`), under its old `buffer_id` and sequence numbers so
/// that ingest stores each batch once. Returns whether anything was found.
fn salvage_into(aside: &Path, db: &Database) -> Result<bool> {
    let bytes = std::fs::read(aside).map_err(|source| BufferError::Dir {
        path: aside.to_path_buf(),
        source,
    })?;
    let s = salvage::salvage(&bytes);
    let (Some(first), Some(last)) = (s.records.first(), s.records.last()) else {
        return Ok(false);
    };
    let head = match s.gaps.last() {
        Some(g) if g.loss.last_seq + 1 == s.next_seq => chain::to_hash(&g.loss.bridge_hash),
        _ => decode_record(&last.bytes).map(|(h, b)| effective_link(&h, &last.bytes[HEADER..], &b)),
    }
    .unwrap_or([0; 32]);
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut batches = txn.open_table(BATCHES).map_err(storage)?;
        let mut total = 0u64;
        for r in &s.records {
            batches.insert(r.seq, r.bytes.as_slice()).map_err(storage)?;
            total += r.bytes.len() as u64;
        }
        let mut meta = txn.open_table(META).map_err(storage)?;
        meta.insert("buffer_id", s.buffer_id).map_err(storage)?;
        meta.insert("next_seq", s.next_seq).map_err(storage)?;
        meta.insert("bytes", total).map_err(storage)?;
        meta.insert("dropped_points", 0).map_err(storage)?;
        let mut manifests = txn.open_table(MANIFESTS).map_err(storage)?;
        for (version, m) in &s.manifests {
            manifests.insert(*version, m.as_slice()).map_err(storage)?;
        }
        txn.open_table(CHAIN)
            .map_err(storage)?
            .insert("head", head.as_slice())
            .map_err(storage)?;
        let mut pending = txn.open_table(SALVAGE).map_err(storage)?;
        for gap in &s.gaps {
            pending
                .insert(gap.first, gap.encode().as_slice())
                .map_err(storage)?;
        }
    }
    txn.commit().map_err(storage)?;
    let estimated: u64 = s.gaps.iter().map(|g| g.loss.points).sum();
    tracing::error!(
        buffer_id = format_args!("{:016x}", s.buffer_id),
        records = s.records.len(),
        copies_found = s.copies_found,
        first_seq = first.seq,
        last_seq = last.last_seq,
        next_seq = s.next_seq,
        gaps = s.gaps.len(),
        estimated_lost_points = estimated,
        manifests = s.manifests.len(),
        "buffer file salvaged record by record: intact batches are sent, damaged ranges declared lost"
    );
    if first.seq > 1 {
        tracing::warn!(
            before_seq = first.seq,
            "salvage: records before this one were acknowledged or damaged, which the file cannot tell"
        );
    }
    for (seq, why) in &s.breaks {
        tracing::error!(seq, why, "salvage: this link cannot be bridged");
    }
    Ok(true)
}

/// Replaces every record of an opened `db` that fails its checksum by a
/// loss record waiting in `SALVAGE` (written signed by `note_lost_file`):
/// its range ends before the next record (or at the newest), its points
/// are estimated from the neighbours, its `prev_hash` is the record
/// before's effective link and its bridge the record after's `prev_hash`
/// (or the chain head, for the newest).
fn replace_corrupted_records(db: &Database) -> Result<()> {
    let txn = db.begin_write().map_err(storage)?;
    let mut replaced = 0;
    {
        let mut batches = txn.open_table(BATCHES).map_err(storage)?;
        let corrupted: Vec<u64> = batches
            .iter()
            .map_err(storage)?
            .filter_map(|r| r.ok())
            .filter(|(_, v)| split_header(v.value()).is_none())
            .map(|(k, _)| k.value())
            .collect();
        if corrupted.is_empty() {
            return Ok(());
        }
        let mut meta = txn.open_table(META).map_err(storage)?;
        let mut pending = txn.open_table(SALVAGE).map_err(storage)?;
        let next_seq = meta_get(&meta, "next_seq")?.unwrap_or(1);
        let head = txn
            .open_table(CHAIN)
            .map_err(storage)?
            .get("head")
            .map_err(storage)?
            .and_then(|v| chain::to_hash(v.value()));
        let mut bytes = meta_get(&meta, "bytes")?.unwrap_or(0);
        for seq in corrupted {
            let decoded = |r: std::result::Result<_, redb::StorageError>| {
                let (_, v): (redb::AccessGuard<u64>, redb::AccessGuard<&[u8]>) = r.ok()?;
                let record = v.value().to_vec();
                let (h, b) = decode_record(&record)?;
                let link = effective_link(&h, &record[HEADER..], &b);
                Some((h, b, link))
            };
            let before: Vec<_> = batches
                .range(..seq)
                .map_err(storage)?
                .rev()
                .take(8)
                .map(decoded)
                .collect();
            let after: Vec<_> = batches
                .range(seq + 1..)
                .map_err(storage)?
                .take(8)
                .map(decoded)
                .collect();
            let next_key = batches
                .range(seq + 1..)
                .map_err(storage)?
                .next()
                .and_then(|r| r.ok())
                .map(|(k, _)| k.value());
            let last_seq = next_key
                .map_or(next_seq.saturating_sub(1), |k| k - 1)
                .max(seq);
            let Some(record) = batches
                .remove(seq)
                .map_err(storage)?
                .map(|v| v.value().to_vec())
            else {
                continue;
            };
            bytes = bytes.saturating_sub(record.len() as u64);
            // The link before, when it is still held and adjacent; else the
            // damaged record's own field, unverified (ingest names a break
            // if it is wrong).
            let prev = match before.first() {
                Some(Some((h, _, link))) if h.last_seq + 1 == seq => *link,
                _ => record
                    .get(25..57)
                    .and_then(chain::to_hash)
                    .unwrap_or([0; 32]),
            };
            let bridge = match (next_key, after.first()) {
                (Some(k), Some(Some((h, _, _)))) if k == last_seq + 1 => Some(h.prev_hash),
                (None, _) => head,
                _ => None,
            };
            let (points, per_tag) = salvage::estimate(
                before.iter().flatten().map(|(_, b, _)| b),
                after.iter().flatten().map(|(_, b, _)| b),
                (last_seq - seq).saturating_add(1),
            );
            if bridge.is_none() {
                tracing::error!(
                    seq,
                    "damaged record: the link after it is damaged too, so the chain cannot be bridged here"
                );
            }
            let loss = Loss {
                last_seq,
                points,
                tags: tag_losses(per_tag),
                reason: LossReason::Corrupted as i32,
                bridge_hash: bridge.map(|b| b.to_vec()).unwrap_or_default(),
                estimated: true,
            };
            tracing::error!(
                first_seq = seq,
                last_seq,
                estimated_points = points,
                "buffer record fails its checksum; a loss record replaces it"
            );
            let p = salvage::PendingLoss {
                first: seq,
                prev,
                loss,
            };
            pending
                .insert(seq, p.encode().as_slice())
                .map_err(storage)?;
            replaced += 1;
        }
        meta.insert("bytes", bytes).map_err(storage)?;
    }
    txn.commit().map_err(storage)?;
    tracing::debug!(replaced, "damaged records replaced");
    Ok(())
}

/// Points that were collected but never stored, per tag with time ranges:
/// what a loss record declares.
#[derive(Debug, Default, Clone)]
pub struct LossTally {
    points: u64,
    per_tag: TagLossMap,
}

impl LossTally {
    pub fn add(&mut self, manifest_version: u64, sample: &Sample) {
        let bad = u64::from(sample.quality == Quality::Bad);
        merge_tag_loss(
            &mut self.per_tag,
            (manifest_version, sample.tag),
            1,
            sample.time_ms,
            sample.time_ms,
            bad,
        );
        self.points += 1;
    }

    pub fn points(&self) -> u64 {
        self.points
    }

    pub fn is_empty(&self) -> bool {
        self.points == 0
    }

    /// Adds a loss counted earlier (read back by `unstored`).
    pub fn merge(&mut self, loss: &Loss) {
        for t in &loss.tags {
            merge_tag_loss(
                &mut self.per_tag,
                (t.manifest_version, t.tag),
                t.points,
                t.first_time_ms,
                t.last_time_ms,
                t.bad_points,
            );
        }
        self.points += loss.points;
    }

    pub fn to_loss(&self, reason: LossReason) -> Loss {
        Loss {
            last_seq: 0,
            points: self.points,
            tags: tag_losses(self.per_tag.clone()),
            reason: reason as i32,
            bridge_hash: Vec::new(),
            estimated: false,
        }
    }
}

struct Run {
    first: u64,
    last: u64,
    /// `prev_hash` of the first record dropped.
    prev: Hash,
    /// Effective link hash of the last record dropped.
    bridge: Hash,
    points: u64,
    per_tag: TagLossMap,
}

/// Per (manifest version, tag): points, first time, last time, Bad points.
type TagLossMap = BTreeMap<(u64, u32), (u64, i64, i64, u64)>;

fn merge_tag_loss(
    map: &mut TagLossMap,
    key: (u64, u32),
    points: u64,
    first: i64,
    last: i64,
    bad: u64,
) {
    let e = map.entry(key).or_insert((0, i64::MAX, i64::MIN, 0));
    e.0 = e.0.saturating_add(points);
    e.1 = e.1.min(first);
    e.2 = e.2.max(last);
    e.3 = e.3.saturating_add(bad);
}

fn tag_losses(map: TagLossMap) -> Vec<TagLoss> {
    map.into_iter()
        .map(
            |((manifest_version, tag), (points, first_time_ms, last_time_ms, bad_points))| {
                TagLoss {
                    tag,
                    points,
                    first_time_ms,
                    last_time_ms,
                    manifest_version,
                    bad_points,
                }
            },
        )
        .collect()
}

struct Header {
    last_seq: u64,
    manifest_version: u64,
    points: u32,
    prev_hash: Hash,
    signature: [u8; 64],
    algorithm: Algorithm,
}

fn split_header(record: &[u8]) -> Option<Header> {
    let algorithm = match *record.first()? {
        FORMAT => Algorithm::Ed25519,
        FORMAT_SM2 => Algorithm::Sm2,
        _ => return None,
    };
    if record.len() < HEADER {
        return None;
    }
    let crc = u32::from_be_bytes(record[1..5].try_into().ok()?);
    if crc32fast::hash(&record[25..]) != crc {
        return None;
    }
    let h = Header {
        last_seq: u64::from_be_bytes(record[5..13].try_into().ok()?),
        manifest_version: u64::from_be_bytes(record[13..21].try_into().ok()?),
        points: u32::from_be_bytes(record[21..25].try_into().ok()?),
        prev_hash: record[25..57].try_into().ok()?,
        signature: record[57..121].try_into().ok()?,
        algorithm,
    };
    header_agrees(&h, &record[HEADER..]).then_some(h)
}

/// Whether the header's `last_seq` and `manifest_version`, which the CRC
/// does not cover (the layout is pinned), say what the payload says: a
/// damaged `last_seq` would make a record cover sequence numbers it does
/// not hold, and those would be skipped undeclared. A data batch's payload
/// starts with `buffer_id` (fixed64, tag 0x09), `seq` (0x10) and, unless 0,
/// `manifest_version` (fixed64, 0x19), so the common case needs no decoding; a loss
/// record is decoded (`last_seq` is its loss's).
fn header_agrees(h: &Header, payload: &[u8]) -> bool {
    fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
        let mut v = 0u64;
        for (i, b) in bytes.iter().take(10).enumerate() {
            v |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Some((v, &bytes[i + 1..]));
            }
        }
        None
    }
    let fast = (payload.first() == Some(&0x09) && payload.get(9) == Some(&0x10))
        .then(|| varint(&payload[10..]))
        .flatten()
        .filter(|(seq, _)| *seq == h.last_seq)
        .map(|(_, rest)| match rest.first() {
            Some(&0x19) => {
                rest.get(1..9)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    == Some(h.manifest_version)
            }
            // No manifest field: version 0, or a loss record (decoded below).
            _ => h.manifest_version == 0,
        });
    match fast {
        Some(agrees) => agrees,
        None => Batch::decode(payload).is_ok_and(|b| {
            let last = b.loss.as_ref().map_or(b.seq, |l| l.last_seq);
            last == h.last_seq && b.manifest_version == h.manifest_version
        }),
    }
}

fn decode_record(record: &[u8]) -> Option<(Header, Batch)> {
    let h = split_header(record)?;
    let batch = Batch::decode(&record[HEADER..]).ok()?;
    Some((h, batch))
}

/// The hash the next link's `prev_hash` must equal: a loss record's bridge,
/// any other record's link hash.
fn effective_link(header: &Header, payload: &[u8], batch: &Batch) -> Hash {
    batch
        .loss
        .as_ref()
        .and_then(|l| chain::to_hash(&l.bridge_hash))
        .unwrap_or_else(|| header.algorithm.link_hash(&header.prev_hash, payload))
}

fn frame_record(
    algorithm: Algorithm,
    last_seq: u64,
    manifest_version: u64,
    points: u32,
    prev: &Hash,
    signature: &[u8; 64],
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.push(match algorithm {
        Algorithm::Ed25519 => FORMAT,
        Algorithm::Sm2 => FORMAT_SM2,
    });
    out.extend_from_slice(&[0; 4]); // crc, below
    out.extend_from_slice(&last_seq.to_be_bytes());
    out.extend_from_slice(&manifest_version.to_be_bytes());
    out.extend_from_slice(&points.to_be_bytes());
    out.extend_from_slice(prev);
    out.extend_from_slice(signature);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[25..]);
    out[1..5].copy_from_slice(&crc.to_be_bytes());
    out
}

/// Encodes samples as one wire batch.
fn encode_batch(
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
                server_time_delta_ms: s.server_time_ms.map(|t| t.saturating_sub(s.time_ms)),
            })
            .collect(),
        loss: None,
        committed_at_ms,
        manifest_sha256: Vec::new(),
    };
    batch.encode_to_vec()
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
                server_time_ms: p
                    .server_time_delta_ms
                    .map(|d| batch.base_time_ms + p.time_offset_ms + d),
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

    /// A record as version 2 writes it. Changing these bytes means old
    /// backlogs no longer read: add a format instead.
    const GOLDEN_RECORD: &str = concat!(
        "0203d5580a",                                                       // format 2, crc32
        "0000000000000007",                                                 // last_seq
        "0000000000000009",                                                 // manifest_version
        "00000002",                                                         // points
        "1111111111111111111111111111111111111111111111111111111111111111", // prev_hash
        "22222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222", // signature
        "09887766554433221110071909000000000000002080d095ffbc312a040801282a2a0c080210c8014002488486880838c8d195ffbc31", // payload: the encoded Batch
    );

    fn golden_record() -> Vec<u8> {
        let samples = vec![
            Sample::good(1, 1_700_000_000_000, Value::Uint(42)),
            Sample::bad(2, 1_700_000_000_100, 0x0102_0304),
        ];
        let payload = encode_batch(0x1122_3344_5566_7788, 7, 9, &samples, 1_700_000_000_200);
        frame_record(
            Algorithm::Ed25519,
            7,
            9,
            2,
            &[0x11; 32],
            &[0x22; 64],
            &payload,
        )
    }

    #[test]
    fn the_record_format_is_pinned_by_golden_bytes() {
        let record = golden_record();
        assert_eq!(hex::encode(&record), GOLDEN_RECORD);
        let golden = hex::decode(GOLDEN_RECORD).expect("hex");
        let (h, batch) = decode_record(&golden).expect("a stored record still decodes");
        assert_eq!((h.last_seq, h.manifest_version, h.points), (7, 9, 2));
        assert_eq!((h.prev_hash, h.signature), ([0x11; 32], [0x22; 64]));
        assert_eq!(batch.seq, 7);
        let back = samples_of(&golden[HEADER..]).expect("samples");
        assert_eq!(back.len(), 2);
        assert_eq!((back[0].tag, back[0].time_ms), (1, 1_700_000_000_000));
        assert_eq!((back[1].tag, back[1].code), (2, 0x0102_0304));
    }

    fn open(dir: &Path, max: u64) -> Buffer {
        Buffer::open(dir, max, WhenFull::DropOldest).expect("open")
    }

    #[test]
    fn a_server_timestamp_is_encoded_only_when_present() {
        let mut s = Sample::good(0, 1000, Value::Uint(5));
        // Without one the bytes are those of batches from before the field
        // existed: signed batches and golden vectors stay valid.
        let without = encode_batch(1, 1, 1, std::slice::from_ref(&s), 1000);
        let mut expect = vec![
            0x09, 1, 0, 0, 0, 0, 0, 0, 0, 0x10, 1, 0x19, 1, 0, 0, 0, 0, 0, 0, 0,
        ];
        expect.extend([0x20, 0xE8, 0x07, 0x2A, 2, 0x28, 5, 0x38, 0xE8, 0x07]);
        assert_eq!(without, expect);
        // Field 16, sint64 +250 (zigzag 500).
        s.server_time_ms = Some(1250);
        let with = encode_batch(1, 1, 1, std::slice::from_ref(&s), 1000);
        let mut expect = vec![
            0x09, 1, 0, 0, 0, 0, 0, 0, 0, 0x10, 1, 0x19, 1, 0, 0, 0, 0, 0, 0, 0,
        ];
        expect.extend([0x20, 0xE8, 0x07, 0x2A, 6, 0x28, 5, 0x80, 0x01, 0xF4, 0x03]);
        expect.extend([0x38, 0xE8, 0x07]);
        assert_eq!(with, expect);
        assert_eq!(samples_of(&with), Some(vec![s]));
    }

    /// Every sequence number is covered exactly once; returns (kept points, lost points).
    fn account(b: &Buffer) -> (u64, u64, u64) {
        let all = b.read_from(1, 100_000).expect("read");
        let mut expect = all.first().map_or(1, |r| r.seq);
        let (mut kept, mut lost) = (0, 0);
        for r in &all {
            assert_eq!(r.seq, expect, "sequence numbers stay contiguous");
            expect = r.last_seq + 1;
            kept += u64::from(r.points);
            let batch = Batch::decode(r.payload.as_ref()).expect("decodes");
            if let Some(loss) = batch.loss {
                assert_eq!(loss.last_seq, r.last_seq);
                assert_eq!(
                    loss.tags.iter().map(|t| t.points).sum::<u64>(),
                    loss.points,
                    "per-tag counts add up"
                );
                lost += loss.points;
            }
        }
        (kept, lost, expect)
    }

    #[test]
    fn appends_reads_and_acks_in_order_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id;
        {
            let b = open(dir.path(), 64 << 20);
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
        let b = open(dir.path(), 64 << 20);
        assert_eq!(b.buffer_id(), id, "buffer id survives restart");
        let stats = b.stats().expect("stats");
        assert_eq!((stats.first_seq, stats.next_seq), (3, 4));
        assert_eq!(
            b.append(7, &samples(1, 2000), 10).expect("append"),
            4,
            "sequence continues after restart"
        );
        assert_eq!(
            b.ack_range(4, 4).expect("ack"),
            1,
            "a batch acked out of order is deleted alone"
        );
        assert_eq!(b.stats().expect("stats").first_seq, 3);
    }

    #[test]
    fn a_changed_manifest_is_a_signed_link_of_the_chain_once_per_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = ChainKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[7; 32]));
        let signed = |b: Buffer| {
            b.with_identity(ChainSigner {
                key: key.clone(),
                gateway_id: "gw".into(),
            })
        };
        let manifest = |version| Manifest {
            version,
            gateway_id: "gw".into(),
            ..Default::default()
        };
        {
            let b = signed(open(dir.path(), 64 << 20));
            b.put_manifest(&manifest(7)).expect("manifest");
            b.append(7, &samples(3, 1000), 10).expect("append");
        }
        let b = signed(open(dir.path(), 64 << 20));
        b.put_manifest(&manifest(7))
            .expect("same manifest after restart");
        b.put_manifest(&manifest(8)).expect("changed manifest");
        let all = b.read_from(1, 10).expect("read");
        let links: Vec<(u64, u64, u32)> = all
            .iter()
            .map(|r| (r.seq, r.manifest_version, r.points))
            .collect();
        assert_eq!(links, [(1, 7, 0), (2, 7, 3), (3, 8, 0)]);
        for (r, version) in [(&all[0], 7), (&all[2], 8)] {
            let batch = Batch::decode(r.payload.as_ref()).expect("decodes");
            assert_eq!(
                batch.manifest_sha256,
                chain::manifest_hash(&manifest(version)).to_vec()
            );
        }
        // Each record links to the one before, manifest links included.
        let mut prev = chain::genesis("gw", b.buffer_id());
        for r in &all {
            assert_eq!(r.prev_hash, prev);
            prev = chain::link_hash(&prev, &r.payload);
            assert_eq!(r.algorithm, Algorithm::Ed25519);
            assert!(Algorithm::Ed25519.verify(&key.public_key(), &prev, &r.signature));
        }
    }

    #[test]
    fn records_keep_their_algorithm_when_the_key_changes_from_sm2_to_ed25519() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sm2 = ChainKey::sm2_from_secret(&[7; 32]).expect("scalar");
        let ed = ChainKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[7; 32]));
        let with = |key: &ChainKey| {
            open(dir.path(), 64 << 20).with_identity(ChainSigner {
                key: key.clone(),
                gateway_id: "gw".into(),
            })
        };
        let sm2_head = {
            let b = with(&sm2);
            assert_eq!(b.algorithm(), Algorithm::Sm2);
            b.append(7, &samples(3, 1000), 10).expect("append");
            b.append(7, &samples(3, 2000), 10).expect("append");
            let mut prev = Algorithm::Sm2.genesis("gw", b.buffer_id());
            for r in b.read_from(1, 10).expect("read") {
                assert_eq!((r.algorithm, r.prev_hash), (Algorithm::Sm2, prev));
                prev = Algorithm::Sm2.link_hash(&prev, &r.payload);
                assert!(Algorithm::Sm2.verify(&sm2.public_key(), &prev, &r.signature));
            }
            prev
        };
        // Under the Ed25519 key: the SM2 links become a loss record, whose
        // bridge is the last SM2 link's SM3 hash, then a new Ed25519 link.
        let b = with(&ed);
        b.expire(i64::MAX).expect("expire");
        b.append(7, &samples(3, 3000), 10).expect("append");
        let all = b.read_from(1, 10).expect("read");
        let got: Vec<(u64, u64, Algorithm)> = all
            .iter()
            .map(|r| (r.seq, r.last_seq, r.algorithm))
            .collect();
        assert_eq!(
            got,
            [(1, 2, Algorithm::Ed25519), (3, 3, Algorithm::Ed25519)]
        );
        let loss = Batch::decode(all[0].payload.as_ref())
            .expect("decodes")
            .loss
            .expect("a loss record");
        assert_eq!(loss.bridge_hash, sm2_head.to_vec());
        assert_eq!(
            all[0].prev_hash,
            Algorithm::Sm2.genesis("gw", b.buffer_id())
        );
        assert_eq!(all[1].prev_hash, sm2_head);
        for r in &all {
            let link = Algorithm::Ed25519.link_hash(&r.prev_hash, &r.payload);
            assert!(Algorithm::Ed25519.verify(&ed.public_key(), &link, &r.signature));
        }
    }

    #[test]
    fn a_new_buffer_gets_a_new_id() {
        let (a, b) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        assert_ne!(
            open(a.path(), 1 << 20).buffer_id(),
            open(b.path(), 1 << 20).buffer_id()
        );
    }

    #[test]
    fn when_full_drops_oldest_unsent_into_counted_loss_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = open(dir.path(), 1 << 20);
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
        let all = b.read_from(1, 10).expect("read");
        assert_eq!(all[0].seq, 1, "handed-out batch kept");
        assert!(
            Batch::decode(all[1].payload.as_ref())
                .expect("decodes")
                .loss
                .is_some(),
            "then a loss record"
        );
        let (kept, lost, end) = account(&b);
        assert_eq!(end, 3002);
        assert_eq!(lost, stats.dropped_points);
        assert_eq!(
            kept + lost,
            total,
            "every point is either kept or counted as lost"
        );
    }

    #[test]
    fn reject_newest_keeps_the_old_and_counts_the_new() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Buffer::open(dir.path(), 1 << 20, WhenFull::RejectNewest).expect("open");
        let mut total = 0u64;
        for i in 0..300 {
            b.append(1, &samples(1000, i * 1000), 100).expect("append");
            total += 1000;
        }
        let stats = b.stats().expect("stats");
        assert!(
            stats.bytes <= (1 << 20) + LOSS_RECORD_ROOM,
            "quota held: {}",
            stats.bytes
        );
        let first = b.read_from(1, 1).expect("read");
        assert_eq!(
            samples_of(&first[0].payload).expect("decodes"),
            samples(100, 0),
            "oldest data kept"
        );
        let (kept, lost, _) = account(&b);
        assert_eq!(lost, stats.dropped_points);
        assert_eq!(kept + lost, total);
    }

    #[test]
    fn expired_batches_become_loss_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = open(dir.path(), 64 << 20);
        b.append(1, &samples(10, 0), 10).expect("append");
        b.append(1, &samples(10, 0), 10).expect("append");
        assert_eq!(b.expire(now_ms() + 1).expect("expire"), 20);
        let (kept, lost, end) = account(&b);
        assert_eq!((kept, lost, end), (0, 20, 3));
    }

    fn signer() -> ChainSigner {
        ChainSigner {
            key: ChainKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[9; 32])),
            gateway_id: "gw".into(),
        }
    }

    /// Appends `n` batches of 40 points, 4 tags sampled every 4 ms without
    /// a break across batches, and returns the buffer.
    fn steady_batches(dir: &Path, n: u64) -> Buffer {
        let b = open(dir, 64 << 20).with_identity(signer());
        for k in 0..n {
            b.append(1, &samples(40, k as i64 * 40), 40)
                .expect("append");
        }
        b
    }

    /// Checks every record from `from` on links to the one before (loss
    /// records by their bridge) and is signed; returns the records.
    fn assert_chain_from(b: &Buffer, from: u64) -> Vec<StoredBatch> {
        let all = b.read_from(from, 100_000).expect("read");
        let key = signer().key;
        let mut prev: Option<Hash> = None;
        for r in &all {
            if let Some(p) = prev {
                assert_eq!(r.prev_hash, p, "seq {} links to the record before", r.seq);
            }
            let link = Algorithm::Ed25519.link_hash(&r.prev_hash, &r.payload);
            assert!(
                Algorithm::Ed25519.verify(&key.public_key(), &link, &r.signature),
                "seq {} is signed",
                r.seq
            );
            let batch = Batch::decode(r.payload.as_ref()).expect("decodes");
            prev = Some(
                batch
                    .loss
                    .and_then(|l| chain::to_hash(&l.bridge_hash))
                    .unwrap_or(link),
            );
        }
        all
    }

    /// The loss a record declares, per tag: (tag, points, first ms, last ms).
    fn declared(r: &StoredBatch) -> (Loss, Vec<(u32, u64, i64, i64)>) {
        let loss = Batch::decode(r.payload.as_ref())
            .expect("decodes")
            .loss
            .expect("a loss record");
        let tags = loss
            .tags
            .iter()
            .map(|t| (t.tag, t.points, t.first_time_ms, t.last_time_ms))
            .collect();
        (loss, tags)
    }

    /// Changes the stored record `seq` behind the buffer's checks.
    fn tamper(b: &Buffer, seq: u64, change: impl FnOnce(&mut Vec<u8>)) {
        let txn = b.db().expect("db").begin_write().expect("txn");
        {
            let mut t = txn.open_table(BATCHES).expect("table");
            let mut record = t.get(seq).expect("get").expect("record").value().to_vec();
            change(&mut record);
            t.insert(seq, record.as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }

    /// Of `steady_batches(…, 8)`, seq 5 was damaged: it is a signed loss
    /// record bridged in the chain, sized per tag from its neighbours.
    fn assert_seq_5_of_8_declared(b: &Buffer) {
        let all = assert_chain_from(b, 1);
        assert_eq!(all.len(), 8);
        let (loss, tags) = declared(&all[4]);
        assert_eq!(
            (loss.reason, loss.last_seq, loss.points, loss.estimated),
            (LossReason::Corrupted as i32, 5, 40, true)
        );
        assert_eq!(tags, batch_per_tag(5), "sized per tag from the neighbours");
        let (kept, lost, _) = account(b);
        assert_eq!((kept, lost), (7 * 40, 40));
    }

    #[test]
    fn a_record_failing_its_checksum_becomes_a_signed_bridged_loss_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let b = steady_batches(dir.path(), 8);
            // Flip a payload byte of seq 5 behind redb's back.
            tamper(&b, 5, |r| *r.last_mut().expect("bytes") ^= 0xFF);
        }
        let b = open(dir.path(), 64 << 20).with_identity(signer());
        assert_seq_5_of_8_declared(&b);
    }

    #[test]
    fn a_damaged_last_seq_outside_the_checksum_is_caught_and_declared() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let b = steady_batches(dir.path(), 8);
            // The header's last_seq is not under the CRC (pinned layout):
            // seq 5 would claim to cover 5..=1000, and 6..=8 be skipped.
            tamper(&b, 5, |r| r[5..13].copy_from_slice(&1000u64.to_be_bytes()));
        }
        let b = open(dir.path(), 64 << 20).with_identity(signer());
        let all = assert_chain_from(&b, 1);
        let seqs: Vec<(u64, u64)> = all.iter().map(|r| (r.seq, r.last_seq)).collect();
        assert_eq!(seqs, (1..=8).map(|s| (s, s)).collect::<Vec<_>>());
        let (loss, _) = declared(&all[4]);
        assert_eq!(
            (loss.reason, loss.points),
            (LossReason::Corrupted as i32, 40)
        );
    }

    #[test]
    fn a_record_failing_its_checksum_while_running_becomes_a_signed_bridged_loss_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = steady_batches(dir.path(), 8);
        assert_eq!(b.read_from(1, 2).expect("read").len(), 2, "some sent");
        // Seq 5 rots on the card after the buffer opened: the open-time
        // check has passed, `read_from` is the first to meet it.
        tamper(&b, 5, |r| *r.last_mut().expect("bytes") ^= 0xFF);
        assert_seq_5_of_8_declared(&b);
    }

    /// Damages the file of `steady_batches(…, 10)`: 16 bytes inside the
    /// payload of each of `seqs`, and redb's header destroyed, so redb
    /// cannot open it. Returns the buffer id.
    fn damage_file(dir: &Path, seqs: &[u64]) -> u64 {
        let (id, payloads) = {
            let b = steady_batches(dir, 10);
            let payloads: Vec<Bytes> = seqs
                .iter()
                .map(|&seq| b.read_from(seq, 1).expect("read").remove(0).payload)
                .collect();
            (b.buffer_id(), payloads)
        };
        let path = dir.join("buffer.redb");
        let mut bytes = std::fs::read(&path).expect("read file");
        for payload in payloads {
            // Every copy: freed pages may hold older ones.
            let at: Vec<usize> = bytes
                .windows(payload.len())
                .enumerate()
                .filter(|(_, w)| *w == payload.as_ref())
                .map(|(i, _)| i)
                .collect();
            assert!(!at.is_empty(), "the record is stored contiguously");
            for at in at {
                for b in &mut bytes[at + 40..at + 56] {
                    *b ^= 0x5A;
                }
            }
        }
        bytes[..512].fill(0xA5);
        std::fs::write(&path, bytes).expect("write file");
        id
    }

    /// What batch `seq` of `steady_batches` held, per tag.
    fn batch_per_tag(seq: u64) -> Vec<(u32, u64, i64, i64)> {
        let t0 = (seq as i64 - 1) * 40;
        (0..4)
            .map(|t| (t, 10, t0 + t as i64, t0 + 36 + t as i64))
            .collect()
    }

    #[test]
    fn an_unopenable_file_is_salvaged_record_by_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Seq 10 is the newest: only the meta table says it existed.
        let id = damage_file(dir.path(), &[5, 10]);
        let b = open(dir.path(), 64 << 20).with_identity(signer());
        assert_eq!(b.buffer_id(), id, "salvaged batches keep their buffer");
        let all = assert_chain_from(&b, 1);
        let seqs: Vec<(u64, u64)> = all.iter().map(|r| (r.seq, r.last_seq)).collect();
        assert_eq!(seqs, (1..=10).map(|s| (s, s)).collect::<Vec<_>>());
        for seq in [5, 10] {
            let (loss, tags) = declared(&all[seq as usize - 1]);
            assert_eq!(
                (loss.reason, loss.points, loss.estimated),
                (LossReason::Corrupted as i32, 40, true),
                "seq {seq}"
            );
            assert_eq!(tags, batch_per_tag(seq), "seq {seq} sized per tag");
        }
        for r in all.iter().filter(|r| r.seq != 5 && r.seq != 10) {
            let back = samples_of(&r.payload).expect("samples");
            assert_eq!(back, samples(40, (r.seq as i64 - 1) * 40), "seq {}", r.seq);
        }
        assert_eq!(b.stats().expect("stats").next_seq, 11);
        assert_eq!(
            b.append(1, &samples(40, 400), 40).expect("append"),
            11,
            "new batches continue the sequence"
        );
        assert_chain_from(&b, 1);
    }

    /// `resolve_unsure` once the storage has healed (its reopen backs off).
    fn resolved(b: &Buffer) -> Option<u64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match b.resolve_unsure() {
                Ok(landed) => return landed,
                Err(e) if Instant::now() < deadline => {
                    assert!(matches!(
                        e,
                        BufferError::Reopening { .. } | BufferError::Storage(_)
                    ));
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("storage healed but: {e}"),
            }
        }
    }

    #[test]
    fn a_failed_commit_is_known_to_have_reached_the_file_or_not_after_the_reopen() {
        use crate::storage_io::{StorageFaults, WriteFault};
        let dir = tempfile::tempdir().expect("tempdir");
        let faults = StorageFaults::new();
        let b = Buffer::open_on(
            dir.path(),
            64 << 20,
            WhenFull::DropOldest,
            BufferStorage::Faulty(faults.clone()),
        )
        .expect("open");
        b.append(1, &samples(40, 0), 40).expect("append");
        // Only the fsync fails: redb wrote the commit's pages and header.
        faults.set_write_fault(WriteFault::SyncEio);
        assert!(
            b.append(1, &samples(40, 40), 40).is_err(),
            "reported failed"
        );
        assert!(b.resolve_unsure().is_err(), "undecided while fsyncs fail");
        faults.set_write_fault(WriteFault::None);
        assert_eq!(resolved(&b), Some(2), "the commit is in the file after all");
        assert_eq!(b.resolve_unsure().expect("once"), None);
        assert_eq!(b.read_from(1, 10).expect("read").len(), 2);
        // The writes themselves fail: nothing reaches the file.
        faults.set_write_fault(WriteFault::Eio);
        assert!(
            b.append(1, &samples(40, 80), 40).is_err(),
            "reported failed"
        );
        faults.set_write_fault(WriteFault::None);
        assert_eq!(resolved(&b), None, "the commit did not reach the file");
        assert_eq!(b.append(1, &samples(40, 80), 40).expect("append"), 3);
    }

    #[test]
    fn damage_to_the_newest_commit_after_a_crash_is_salvaged_not_rolled_back() {
        let (open_dir, crashed) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let b = steady_batches(open_dir.path(), 10);
        let newest = b.read_from(10, 1).expect("read").remove(0).payload;
        // The file as a crash leaves it: copied while the buffer is open.
        let mut bytes = std::fs::read(b.path()).expect("read file");
        drop(b);
        let at = bytes
            .windows(newest.len())
            .position(|w| w == newest.as_ref())
            .expect("the newest record is stored contiguously");
        bytes[at + 40..at + 56].iter_mut().for_each(|b| *b ^= 0x5A);
        std::fs::write(crashed.path().join("buffer.redb"), bytes).expect("write file");
        // redb verifies the newest commit after a crash and would fall back
        // to the one before, losing seq 10 undeclared and reusing its number.
        let b = open(crashed.path(), 64 << 20).with_identity(signer());
        let all = assert_chain_from(&b, 1);
        let seqs: Vec<u64> = all.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>(), "nothing rolled back");
        let (loss, tags) = declared(&all[9]);
        assert_eq!(
            (loss.reason, loss.points, loss.estimated),
            (LossReason::Corrupted as i32, 40, true)
        );
        assert_eq!(tags, batch_per_tag(10), "declared per tag");
        assert_eq!(b.stats().expect("stats").next_seq, 11, "no number reused");
    }

    #[test]
    fn an_unopenable_file_is_moved_aside_and_a_fresh_buffer_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("buffer.redb"), vec![0xA5; 8192]).expect("write garbage");
        let b = open(dir.path(), 1 << 20);
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("buffer.redb.unreadable-")
            })
            .collect();
        assert_eq!(aside.len(), 1, "the unreadable file is kept for inspection");
        b.append(1, &samples(1, 0), 10).expect("append");
        let first = b.read_from(1, 1).expect("read");
        let loss = Batch::decode(first[0].payload.as_ref())
            .expect("decodes")
            .loss
            .expect("first record says so");
        assert_eq!(loss.reason, LossReason::Corrupted as i32);
    }

    #[test]
    fn refuses_a_quota_larger_than_the_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Buffer::open(dir.path(), u64::MAX / 2, WhenFull::DropOldest)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("lower buffer.max_bytes"), "{err}");
    }
}

/// A model-based test (issue 21): random sequences of append, read, ack,
/// reopen and crash under a tiny quota, checked after every step against a
/// simple in-memory model of what the buffer must hold.
///
/// The model: every sequence number below `next_seq` is either stored (a
/// batch or covered by a loss record) or acknowledged, never both and never
/// neither; records handed to the uplink and not acknowledged keep their
/// exact bytes; per tag, points appended = points delivered + stored +
/// declared lost; `bytes` is the sum of record sizes and `dropped_points` the
/// points loss records declare. A clean reopen and a crash (the file copied
/// while open, as a SIGKILL leaves it) both keep exactly what was committed:
/// acknowledged records never come back.
#[cfg(test)]
mod model_tests {
    use super::*;
    use guantong_proto::v1::point::Value;
    use proptest::prelude::*;

    /// The test writes a few hundred fsynced commits per case; tmpfs keeps
    /// them cheap. Falls back to the default temp directory.
    fn scratch_dir() -> tempfile::TempDir {
        let shm = Path::new("/dev/shm");
        if shm.is_dir()
            && let Ok(dir) = tempfile::tempdir_in(shm)
        {
            return dir;
        }
        tempfile::tempdir().expect("tempdir")
    }

    const MANIFEST: u64 = 1;
    const MAX_POINTS: usize = 8;

    #[derive(Debug, Clone)]
    enum Op {
        /// `points` samples over the first `tags` tags.
        Append {
            points: usize,
            tags: u32,
        },
        /// The uplink reads up to `max` records after those it holds.
        Read {
            max: usize,
        },
        /// The uplink acknowledges its oldest `count` records.
        Ack {
            count: usize,
        },
        Reopen,
        Crash,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (1usize..40, 1u32..4).prop_map(|(points, tags)| Op::Append { points, tags }),
            3 => (1usize..6).prop_map(|max| Op::Read { max }),
            3 => (1usize..4).prop_map(|count| Op::Ack { count }),
            1 => Just(Op::Reopen),
            1 => Just(Op::Crash),
        ]
    }

    /// What a record stands for: its range and points per tag.
    #[derive(Debug, Clone, PartialEq)]
    struct Content {
        last_seq: u64,
        payload: Bytes,
        is_loss: bool,
        per_tag: BTreeMap<u32, u64>,
        lost: u64,
    }

    fn content(b: &StoredBatch) -> Content {
        let batch = Batch::decode(b.payload.as_ref()).expect("stored payload decodes");
        let mut per_tag = BTreeMap::new();
        let (is_loss, lost) = match &batch.loss {
            Some(loss) => {
                for t in &loss.tags {
                    *per_tag.entry(t.tag).or_default() += t.points;
                }
                assert_eq!(
                    loss.points,
                    loss.tags.iter().map(|t| t.points).sum::<u64>(),
                    "loss record {} counts its points per tag",
                    b.seq
                );
                (true, loss.points)
            }
            None => {
                for p in &batch.points {
                    *per_tag.entry(p.tag).or_default() += 1;
                }
                (false, 0)
            }
        };
        assert_eq!(batch.seq, b.seq, "payload carries its own number");
        Content {
            last_seq: b.last_seq,
            payload: b.payload.clone(),
            is_loss,
            per_tag,
            lost,
        }
    }

    struct Model {
        dir: tempfile::TempDir,
        /// `None` only while reopening.
        buffer: Option<Buffer>,
        max_bytes: u64,
        when_full: WhenFull,
        clock: i64,
        appended: BTreeMap<u32, u64>,
        /// Read by the uplink, not acknowledged, by first sequence number.
        handed: BTreeMap<u64, Content>,
        /// Acknowledged: what ingest holds, by first sequence number.
        delivered: BTreeMap<u64, Content>,
        next_seq: u64,
    }

    impl Model {
        fn new(max_bytes: u64, when_full: WhenFull) -> Model {
            let dir = scratch_dir();
            let buffer = Buffer::open(dir.path(), max_bytes, when_full).expect("open");
            Model {
                dir,
                buffer: Some(buffer),
                max_bytes,
                when_full,
                clock: 1_700_000_000_000,
                appended: BTreeMap::new(),
                handed: BTreeMap::new(),
                delivered: BTreeMap::new(),
                next_seq: 1,
            }
        }

        fn b(&self) -> &Buffer {
            self.buffer.as_ref().expect("open")
        }

        /// Every stored record, without handing anything out.
        fn peek(&self) -> Vec<StoredBatch> {
            let saved = self.b().handed_out().clone();
            let all = self.b().read_from(1, usize::MAX).expect("read");
            *self.b().handed_out() = saved;
            all
        }

        fn apply(&mut self, op: &Op) {
            match *op {
                Op::Append { points, tags } => {
                    let samples: Vec<Sample> = (0..points)
                        .map(|i| {
                            self.clock += 10;
                            let tag = i as u32 % tags;
                            *self.appended.entry(tag).or_default() += 1;
                            Sample::good(tag, self.clock, Value::Uint(i as u64))
                        })
                        .collect();
                    let last = self
                        .b()
                        .append(MANIFEST, &samples, MAX_POINTS)
                        .expect("append");
                    if self.when_full == WhenFull::DropOldest {
                        let chunks = points.div_ceil(MAX_POINTS) as u64;
                        assert_eq!(last, self.next_seq + chunks - 1, "one number per batch");
                    }
                    assert!(last >= self.next_seq - 1, "numbers never go back");
                    self.next_seq = last + 1;
                }
                Op::Read { max } => {
                    let from = self
                        .handed
                        .values()
                        .map(|c| c.last_seq + 1)
                        .max()
                        .unwrap_or(1);
                    for b in self.b().read_from(from, max).expect("read") {
                        assert!(b.seq >= from);
                        self.handed.insert(b.seq, content(&b));
                    }
                }
                Op::Ack { count } => {
                    let acked: Vec<u64> = self.handed.keys().copied().take(count).collect();
                    let ranges: Vec<(u64, u64)> = acked
                        .iter()
                        .map(|s| (*s, self.handed[s].last_seq))
                        .collect();
                    self.b().ack_ranges(&ranges).expect("ack");
                    for seq in acked {
                        let c = self.handed.remove(&seq).expect("handed");
                        assert!(
                            self.delivered.insert(seq, c).is_none(),
                            "record {seq} acknowledged twice"
                        );
                    }
                }
                Op::Reopen => {
                    let before = self.b().stats().expect("stats");
                    let records = self.peek().len();
                    self.reopen(self.dir.path().to_path_buf());
                    let after = self.b().stats().expect("stats");
                    assert_eq!(before, after, "a clean reopen keeps everything");
                    assert_eq!(records, self.peek().len());
                }
                Op::Crash => {
                    let before = self.b().stats().expect("stats");
                    let records: Vec<Bytes> = self.peek().into_iter().map(|b| b.payload).collect();
                    let crashed = scratch_dir();
                    std::fs::copy(self.b().path(), crashed.path().join("buffer.redb"))
                        .expect("copy the file as a crash leaves it");
                    self.reopen(crashed.path().to_path_buf());
                    self.dir = crashed;
                    let after: Vec<Bytes> = self.peek().into_iter().map(|b| b.payload).collect();
                    assert_eq!(
                        before,
                        self.b().stats().expect("stats"),
                        "a crash keeps what was committed"
                    );
                    assert_eq!(
                        records, after,
                        "a crash keeps exactly the committed records"
                    );
                }
            }
        }

        fn reopen(&mut self, dir: PathBuf) {
            let id = self.b().buffer_id();
            // The old handle closes before the new one opens, as in a restart.
            self.buffer = None;
            self.buffer = Some(Buffer::open(&dir, self.max_bytes, self.when_full).expect("reopen"));
            assert_eq!(self.b().buffer_id(), id, "the same buffer after reopening");
            self.handed.clear();
        }

        fn check(&self, after_append: bool) {
            let stats = self.b().stats().expect("stats");
            assert_eq!(stats.next_seq, self.next_seq, "next_seq survives");
            let stored = self.peek();
            let mut covered = BTreeSet::new();
            let mut per_tag: BTreeMap<u32, u64> = BTreeMap::new();
            let mut lost = 0u64;
            let mut bytes = 0u64;
            for b in &stored {
                let c = content(b);
                bytes += (HEADER + b.payload.len()) as u64;
                assert!(c.last_seq >= b.seq && c.last_seq < self.next_seq);
                for s in b.seq..=c.last_seq {
                    assert!(covered.insert(s), "sequence number {s} stored twice");
                }
                if let Some(h) = self.handed.get(&b.seq) {
                    assert_eq!(h, &c, "record {} changed after it was handed out", b.seq);
                }
                match self.delivered.get(&b.seq) {
                    Some(_) => panic!("record {} acknowledged and still stored", b.seq),
                    None => {
                        for (tag, n) in &c.per_tag {
                            *per_tag.entry(*tag).or_default() += n;
                        }
                        lost += c.lost;
                    }
                }
            }
            for h in self.handed.keys() {
                assert!(
                    stored.iter().any(|b| b.seq == *h),
                    "record {h} handed out is gone before its ack"
                );
            }
            for (seq, d) in &self.delivered {
                for s in *seq..=d.last_seq {
                    assert!(
                        covered.insert(s),
                        "sequence number {s} acknowledged and stored"
                    );
                }
                for (tag, n) in &d.per_tag {
                    *per_tag.entry(*tag).or_default() += n;
                }
                lost += d.lost;
            }
            assert_eq!(
                covered,
                (1..self.next_seq).collect::<BTreeSet<u64>>(),
                "every number is stored or acknowledged, none skipped"
            );
            assert_eq!(
                per_tag, self.appended,
                "per tag: appended = delivered + stored + declared lost"
            );
            assert_eq!(stats.bytes, bytes, "bytes is the sum of record sizes");
            assert_eq!(
                stats.dropped_points, lost,
                "dropped_points = points declared lost"
            );
            if after_append
                && self.when_full == WhenFull::DropOldest
                && stats.bytes > self.max_bytes
            {
                for b in &stored {
                    assert!(
                        self.handed.contains_key(&b.seq) || content(b).is_loss,
                        "over quota ({} > {}) with batch {} still droppable",
                        stats.bytes,
                        self.max_bytes,
                        b.seq
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn the_buffer_behaves_like_its_model(
            max_bytes in 5_000u64..9_000,
            reject_newest in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..24),
        ) {
            let when_full = if reject_newest { WhenFull::RejectNewest } else { WhenFull::DropOldest };
            let mut model = Model::new(max_bytes, when_full);
            for op in &ops {
                model.apply(op);
                model.check(matches!(op, Op::Append { .. }));
            }
        }
    }
}
