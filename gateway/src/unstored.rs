//! The record of points the writer could not commit before the gateway
//! stopped while the buffer refused writes (a full disk, EIO), so that they
//! are declared lost at the next start instead of vanishing.
//!
//! # Design
//! A file `unstored-loss.bin` beside `buffer.redb`, `RESERVED` bytes of
//! zeros written when the writer starts: recording a loss later overwrites
//! blocks the file already owns, which a full disk still allows on file
//! systems that overwrite in place (ext4, xfs, f2fs, tmpfs; not on
//! copy-on-write ones such as btrfs, where the write may fail: then the loss
//! is only logged).
//!
//! Layout (big-endian): `[4] length`, `[4] crc32 of the payload`, payload =
//! an encoded `Loss` (reason `storage_error`, per tag with time ranges).
//! Length 0: nothing to declare.
//!
//! # Invariants
//! - The writer reads the file at start into the loss it has not declared
//!   yet; the file is cleared only after that loss is committed as a signed
//!   loss record, so a crash in between declares it twice rather than never.
//! - At a stop with points still held, what the file holds is rewritten with
//!   the whole undeclared loss (a superset of what it held).
//! - A loss whose per-tag detail does not fit is kept as its total (logged).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use guantong_proto::v1::Loss;
use prost::Message;

/// Room for the per-tag detail of about 30,000 tags.
pub const RESERVED: u64 = 1 << 20;
const HEADER: usize = 8;
pub const FILE_NAME: &str = "unstored-loss.bin";

#[derive(Debug, thiserror::Error)]
pub enum UnstoredError {
    #[error("unstored-loss file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("unstored-loss file {path}: {what}; the points it counted are not known")]
    Unreadable { path: PathBuf, what: String },
}

/// The reserved file; see the module doc.
pub struct UnstoredLoss {
    path: PathBuf,
    file: File,
}

impl UnstoredLoss {
    /// Opens the file in `dir`, reserving its room, and returns the loss it
    /// held (recorded at an earlier stop) if any.
    pub fn open(dir: &Path) -> Result<(UnstoredLoss, Option<Loss>), UnstoredError> {
        let path = dir.join(FILE_NAME);
        let io = |source| UnstoredError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let this = UnstoredLoss {
            path: path.clone(),
            file,
        };
        let held = this.read().unwrap_or_else(|e| {
            tracing::error!(error = %e, "STORAGE LOSS NOT DECLARED: the record of points unstored at the last stop cannot be read");
            None
        });
        if this.file.metadata().map_err(io)?.len() != RESERVED {
            // Real zeros, not a sparse file: the blocks must be owned now.
            this.file.set_len(0).map_err(io)?;
            let mut writer = io::BufWriter::new(&this.file);
            let zeros = vec![0u8; 64 * 1024];
            for _ in 0..RESERVED / zeros.len() as u64 {
                writer.write_all(&zeros).map_err(io)?;
            }
            writer.flush().map_err(io)?;
            drop(writer);
            this.file.sync_all().map_err(io)?;
            if let Some(loss) = &held {
                this.write(loss)?;
            }
        }
        Ok((this, held))
    }

    fn read(&self) -> Result<Option<Loss>, UnstoredError> {
        let unreadable = |what: String| UnstoredError::Unreadable {
            path: self.path.clone(),
            what,
        };
        let mut header = [0u8; HEADER];
        match self.file.read_exact_at(&mut header, 0) {
            Ok(()) => {}
            // A new (or truncated) file holds nothing.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(source) => {
                return Err(UnstoredError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        }
        let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 {
            return Ok(None);
        }
        if (len + HEADER) as u64 > RESERVED {
            return Err(unreadable(format!("length {len} exceeds the file")));
        }
        let mut payload = vec![0u8; len];
        self.file
            .read_exact_at(&mut payload, HEADER as u64)
            .map_err(|e| unreadable(e.to_string()))?;
        let crc = u32::from_be_bytes(header[4..].try_into().expect("4 bytes"));
        if crc32fast::hash(&payload) != crc {
            return Err(unreadable("checksum mismatch".into()));
        }
        Loss::decode(payload.as_slice())
            .map(Some)
            .map_err(|e| unreadable(e.to_string()))
    }

    /// Records `loss` durably, in place of what the file held.
    pub fn write(&self, loss: &Loss) -> Result<(), UnstoredError> {
        let mut payload = loss.encode_to_vec();
        if (payload.len() + HEADER) as u64 > RESERVED {
            tracing::error!(
                tags = loss.tags.len(),
                points = loss.points,
                "the unstored loss is too large for its file: only its total is kept"
            );
            payload = Loss {
                tags: Vec::new(),
                ..loss.clone()
            }
            .encode_to_vec();
        }
        let mut bytes = Vec::with_capacity(HEADER + payload.len());
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
        bytes.extend_from_slice(&payload);
        self.put(&bytes)
    }

    /// Empties the record (its loss is committed in the buffer).
    pub fn clear(&self) -> Result<(), UnstoredError> {
        self.put(&[0; HEADER])
    }

    fn put(&self, bytes: &[u8]) -> Result<(), UnstoredError> {
        let io = |source| UnstoredError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all_at(bytes, 0).map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use guantong_proto::v1::{LossReason, TagLoss};

    use super::*;

    fn loss(tags: u32) -> Loss {
        Loss {
            points: u64::from(tags) * 3,
            reason: LossReason::StorageError as i32,
            tags: (0..tags)
                .map(|tag| TagLoss {
                    tag,
                    points: 3,
                    first_time_ms: 1_767_225_600_000,
                    last_time_ms: 1_767_225_600_200,
                    manifest_version: 7,
                    bad_points: 0,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_recorded_loss_is_read_back_at_the_next_open_until_cleared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, held) = UnstoredLoss::open(dir.path()).expect("open");
        assert_eq!(held, None);
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE_NAME))
                .map(|m| m.len())
                .ok(),
            Some(RESERVED),
            "the room is reserved at open"
        );
        file.write(&loss(3)).expect("write");
        drop(file);
        let (file, held) = UnstoredLoss::open(dir.path()).expect("reopen");
        assert_eq!(held, Some(loss(3)));
        file.clear().expect("clear");
        let (_, held) = UnstoredLoss::open(dir.path()).expect("reopen");
        assert_eq!(held, None);
    }

    #[test]
    fn a_loss_too_large_for_the_file_keeps_its_total() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, _) = UnstoredLoss::open(dir.path()).expect("open");
        file.write(&loss(100_000)).expect("write");
        let (_, held) = UnstoredLoss::open(dir.path()).expect("reopen");
        let held = held.expect("a loss");
        assert_eq!(held.points, 300_000);
        assert!(held.tags.is_empty());
    }

    #[test]
    fn a_damaged_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, _) = UnstoredLoss::open(dir.path()).expect("open");
        file.write(&loss(2)).expect("write");
        file.file
            .write_all_at(&[0xff], HEADER as u64 + 3)
            .expect("damage");
        let e = file.read().expect_err("refused");
        assert!(e.to_string().contains(FILE_NAME), "{e}");
        assert!(e.to_string().contains("checksum"), "{e}");
        // Logged at open; the room is kept for the next stop.
        let (_, held) = UnstoredLoss::open(dir.path()).expect("reopen");
        assert_eq!(held, None);
    }
}
