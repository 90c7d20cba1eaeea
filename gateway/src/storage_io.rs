//! How the buffer's redb file is opened, and a fault-injecting variant of
//! redb's file backend for tests and benches.
//!
//! # Design
//! `BufferStorage::File` is what the gateway runs on: redb's own file
//! backend, opened exactly as `Database::create` does. `BufferStorage::Faulty`
//! wraps that same backend and consults shared `StorageFaults` before each
//! write, `set_len` and `sync_data`: a test switches failures (EIO, ENOSPC) on
//! and off while the buffer runs, and a bench adds latency to every
//! `sync_data` (a slow SD card's fsync). Reads, locks and close always reach
//! the file, so what redb committed before a fault stays readable, as on a
//! disk that refuses writes.
//!
//! # Invariants
//! - The gateway binary never builds `Faulty`: nothing in the configuration
//!   or environment selects it; only code that calls `Buffer::open_on` does.
//! - Every open of the file (the first, and every reopen after an I/O
//!   error) goes through `BufferStorage::open`, so injected faults also hit
//!   the reopen and the repair redb runs on it.

use std::fs::OpenOptions;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use redb::backends::FileBackend;
use redb::{BackendError, Database, DatabaseError, StorageBackend};

/// Most memory redb may use to cache pages (reads and the write buffer).
/// redb's default is 1 GiB; batches are read back within seconds of their
/// commit and only once, so a small cache serves the uplink.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// How the buffer reaches its file.
#[derive(Debug, Clone, Default)]
pub enum BufferStorage {
    /// redb's file backend: production.
    #[default]
    File,
    /// redb's file backend behind injected faults (tests, benches).
    Faulty(Arc<StorageFaults>),
}

impl BufferStorage {
    /// Opens (or creates) the redb database at `path`. With `keep_newest`,
    /// an open that would roll back to an older commit fails instead
    /// (`DatabaseError::RepairAborted`; see `refuses_rollback`).
    pub fn open(&self, path: &Path, keep_newest: bool) -> Result<Database, DatabaseError> {
        let mut builder = Database::builder();
        builder.set_cache_size(CACHE_BYTES);
        if keep_newest {
            builder.set_repair_callback(refuse_rollback);
        }
        match self {
            BufferStorage::File => builder.create(path),
            BufferStorage::Faulty(faults) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)?;
                builder.create_with_backend(FaultyBackend {
                    inner: FileBackend::new(file)?,
                    faults: faults.clone(),
                })
            }
        }
    }
}

/// Aborts a repair that would fall back to the older commit slot.
///
/// After a crash redb verifies the newest commit's page checksums; when
/// they fail it silently serves the commit before, so the newest commit's
/// batches vanish and their sequence numbers are reused, nothing declared
/// (issue 21: 256 bytes mid-file). redb tells only through the repair
/// callback: every repair calls it at progress 0.0, and at 0.3 exactly
/// when it is about to fall back (`Database::do_repair`, redb 4.6; the buffer's test
/// `damage_to_the_newest_commit_after_a_crash_is_salvaged_not_rolled_back`
/// fails if a redb upgrade changes this). The buffer then salvages the file
/// record by record, so what the damage took is declared.
fn refuse_rollback(session: &mut redb::RepairSession) {
    if (0.2..0.5).contains(&session.progress()) {
        session.abort();
    }
}

/// Which writes fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WriteFault {
    None = 0,
    /// `EIO` from every write, `set_len` and `sync_data`: a failing card.
    Eio = 1,
    /// `ENOSPC` from every write and `set_len` that grows the file, and from
    /// the next `sync_data` after such a failure: a full disk. Writes inside
    /// the file's length succeed, as they do on a full ext4 or tmpfs.
    NoSpace = 2,
    /// `EIO` from `sync_data` only: the writes reach the file (the page
    /// cache) but are never confirmed, as when a card fails at writeback.
    SyncEio = 3,
}

/// Faults shared between a test and the backends it injects them into.
#[derive(Debug, Default)]
pub struct StorageFaults {
    write_fault: AtomicU8,
    sync_delay_us: AtomicU64,
    syncs: AtomicU64,
    failed: AtomicU64,
    /// A write failed since the last `sync_data`: the next one reports it.
    unsynced_failure: std::sync::atomic::AtomicBool,
}

impl StorageFaults {
    pub fn new() -> Arc<StorageFaults> {
        Arc::new(StorageFaults::default())
    }

    /// From now on, writes fail as `fault` says (`WriteFault::None`: heal).
    pub fn set_write_fault(&self, fault: WriteFault) {
        self.write_fault.store(fault as u8, Ordering::SeqCst);
    }

    /// Every `sync_data` from now on takes at least `delay` longer.
    pub fn set_sync_delay(&self, delay: Duration) {
        self.sync_delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// `sync_data` calls that reached the file so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// Operations failed on purpose so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    fn write_fault(&self) -> WriteFault {
        match self.write_fault.load(Ordering::SeqCst) {
            1 => WriteFault::Eio,
            2 => WriteFault::NoSpace,
            3 => WriteFault::SyncEio,
            _ => WriteFault::None,
        }
    }

    /// The injected error for a write; `grows`: it would make the file longer.
    fn check_write(&self, grows: bool) -> io::Result<()> {
        let errno = match self.write_fault() {
            WriteFault::None | WriteFault::SyncEio => return Ok(()),
            WriteFault::Eio => rustix::io::Errno::IO,
            WriteFault::NoSpace if grows => rustix::io::Errno::NOSPC,
            WriteFault::NoSpace => return Ok(()),
        };
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.unsynced_failure.store(true, Ordering::SeqCst);
        Err(io::Error::from_raw_os_error(errno.raw_os_error()))
    }

    /// The injected error for a `sync_data`: EIO always while it is on; a
    /// full disk reports a write that failed since the last sync.
    fn check_sync(&self) -> io::Result<()> {
        let failed_before = self.unsynced_failure.swap(false, Ordering::SeqCst);
        match self.write_fault() {
            WriteFault::None => Ok(()),
            WriteFault::Eio => self.check_write(true),
            WriteFault::SyncEio => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                Err(io::Error::from_raw_os_error(
                    rustix::io::Errno::IO.raw_os_error(),
                ))
            }
            WriteFault::NoSpace if failed_before => self.check_write(true),
            WriteFault::NoSpace => Ok(()),
        }
    }
}

/// redb's file backend with `StorageFaults` in front of its writes.
#[derive(Debug)]
struct FaultyBackend {
    inner: FileBackend,
    faults: Arc<StorageFaults>,
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.faults.check_write(len > self.inner.len()?)?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        let delay = self.faults.sync_delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_micros(delay));
        }
        self.faults.check_sync()?;
        self.inner.sync_data()?;
        self.faults.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let grows = offset + data.len() as u64 > self.inner.len()?;
        self.faults.check_write(grows)?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
