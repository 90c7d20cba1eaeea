//! Online backup: every table of one read transaction copied into a new
//! redb file.
//!
//! A read transaction sees one committed state and keeps its pages while
//! the writer goes on, so the copy is consistent whatever is written
//! meanwhile: it holds every batch acknowledged before the snapshot and none
//! half. Copying the file's bytes instead is not safe while the writer
//! updates pages and the commit slots.
//!
//! Invariant: every table the store has is in [`copy`]'s list. A table in
//! the file that the list does not name fails the backup (naming it)
//! instead of leaving it out of the copy silently.

use std::collections::BTreeSet;
use std::path::Path;

use redb::{
    Database, Key, MultimapTableHandle, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition, TableHandle, Value, WriteTransaction,
};

use super::registry::{
    ACCESS_LOG, ACCOUNTS, ENTERPRISE_GATEWAYS, ENTERPRISES, EQUIPMENT, OWNERS,
    PROVIDER_ENTERPRISES, TOKENS,
};
use super::{
    BREAKS, CHAIN_STATE, CHUNKS, DAYS, GATEWAY_DAYS, GATEWAYS, HOURS, LOSSES, MANIFESTS, META,
    MINUTES, RUNS, SERIES, SERIES_KEYS, SIGNED, STATE, STREAMS, db_err,
};
use crate::store::{BackupInfo, Result, StoreError};

/// Copies the store `db` into the new file `out` (which must not exist).
pub(super) fn copy(db: &Database, out: &Path) -> Result<BackupInfo> {
    let backend = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Backend(format!("backup to {}: {what}: {e}", out.display()))
    };
    // Created empty here, so an existing file is never overwritten; redb
    // starts a new store in an empty file.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| backend("cannot create the file (it must not exist yet)", &e))?;
    let target = Database::create(out).map_err(|e| backend("cannot start a store in it", &e))?;
    let read = db.begin_read().map_err(db_err)?;
    let mut present: BTreeSet<String> = read
        .list_tables()
        .map_err(db_err)?
        .map(|t| t.name().to_string())
        .collect();
    present.extend(
        read.list_multimap_tables()
            .map_err(db_err)?
            .map(|t| t.name().to_string()),
    );
    let write = target.begin_write().map_err(db_err)?;
    let mut c = Copier {
        read: &read,
        write: &write,
        copied: BTreeSet::new(),
        rows: 0,
    };
    c.table(GATEWAYS)?;
    c.table(STREAMS)?;
    c.table(MANIFESTS)?;
    c.table(SERIES_KEYS)?;
    c.table(SERIES)?;
    c.table(STATE)?;
    c.table(CHUNKS)?;
    c.table(MINUTES)?;
    c.table(LOSSES)?;
    c.table(META)?;
    c.table(SIGNED)?;
    c.table(CHAIN_STATE)?;
    c.table(BREAKS)?;
    c.table(DAYS)?;
    c.table(HOURS)?;
    c.table(RUNS)?;
    c.table(GATEWAY_DAYS)?;
    c.table(ENTERPRISES)?;
    c.table(EQUIPMENT)?;
    c.table(OWNERS)?;
    c.table(ENTERPRISE_GATEWAYS)?;
    c.table(PROVIDER_ENTERPRISES)?;
    c.table(ACCOUNTS)?;
    c.table(TOKENS)?;
    c.table(ACCESS_LOG)?;
    c.table(super::configs::GATEWAY_CONFIGS)?;
    c.table(super::configs::CONFIG_STATE)?;
    let unknown: Vec<&String> = present.difference(&c.copied).collect();
    if !unknown.is_empty() {
        return Err(StoreError::Backend(format!(
            "backup: the store has tables the backup does not know: {unknown:?} (add them to store/embedded/backup.rs)"
        )));
    }
    let info = BackupInfo {
        tables: c.copied.len(),
        rows: c.rows,
    };
    write.commit().map_err(db_err)?;
    Ok(info)
}

struct Copier<'a> {
    read: &'a ReadTransaction,
    write: &'a WriteTransaction,
    copied: BTreeSet<String>,
    rows: u64,
}

impl Copier<'_> {
    /// Copies one table, row by row in key order.
    fn table<K: Key + 'static, V: Value + 'static>(
        &mut self,
        def: TableDefinition<K, V>,
    ) -> Result<()> {
        let source = match self.read.open_table(def) {
            Ok(t) => t,
            // Never created in this file: nothing to copy.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(db_err(e)),
        };
        let mut target = self.write.open_table(def).map_err(db_err)?;
        for entry in source.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            target.insert(k.value(), v.value()).map_err(db_err)?;
            self.rows += 1;
        }
        self.copied.insert(def.name().to_string());
        Ok(())
    }
}
