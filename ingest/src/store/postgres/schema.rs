//! Versioned schema migrations of the PostgreSQL store.
//!
//! `migrate` applies, in one transaction under an advisory lock (so
//! replicas started together do not race), every migration newer than the
//! database's version and records it in `guantong_schema`; `check` refuses a
//! database whose version is not the one this ingest knows, saying which
//! command to run. Migrations are never edited once released: a change is a
//! new file.

use deadpool_postgres::{GenericClient, Object};

use super::pg_err;
use crate::store::{Result, StoreError};

const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("0001_initial.sql"))];
/// The schema version this ingest reads and writes.
pub const LATEST: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;
/// Key of the advisory lock `migrate` holds.
const MIGRATE_LOCK: i64 = 0x6775_616e_746f_6e67; // "guantong"

/// The database's schema version; None when it has no Guantong schema.
async fn version(client: &impl GenericClient) -> Result<Option<i32>> {
    let exists: bool = client
        .query_one("SELECT to_regclass('guantong_schema') IS NOT NULL", &[])
        .await
        .map_err(pg_err)?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let v: Option<i32> = client
        .query_one("SELECT max(version) FROM guantong_schema", &[])
        .await
        .map_err(pg_err)?
        .get(0);
    Ok(v)
}

/// Brings the schema to `LATEST`; returns the versions applied now.
pub async fn migrate(pool: &deadpool_postgres::Pool) -> Result<Vec<i32>> {
    let mut client: Object = pool.get().await.map_err(super::pool_err)?;
    let txn = client.transaction().await.map_err(pg_err)?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(pg_err)?;
    txn.batch_execute(
        "CREATE TABLE IF NOT EXISTS guantong_schema (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(pg_err)?;
    let current = version(&txn).await?.unwrap_or(0);
    if current > LATEST {
        return Err(newer(current));
    }
    let mut applied = Vec::new();
    for &(v, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        txn.batch_execute(sql)
            .await
            .map_err(|e| StoreError::Backend(format!("migration {v}: {}", pg_err(e))))?;
        txn.execute("INSERT INTO guantong_schema (version) VALUES ($1)", &[&v])
            .await
            .map_err(pg_err)?;
        applied.push(v);
    }
    txn.commit().await.map_err(pg_err)?;
    Ok(applied)
}

fn newer(v: i32) -> StoreError {
    StoreError::Invalid(format!(
        "the database's Guantong schema is version {v}, newer than this ingest knows ({LATEST}): \
         upgrade guantong-ingest"
    ))
}

/// Refuses a database whose schema is not `LATEST`.
pub async fn check(client: &impl GenericClient) -> Result<()> {
    match version(client).await? {
        Some(v) if v == LATEST => Ok(()),
        Some(v) if v > LATEST => Err(newer(v)),
        Some(v) => Err(StoreError::Invalid(format!(
            "the database's Guantong schema is version {v}, this ingest needs {LATEST}: \
             run `guantong-ingest migrate --database …` first"
        ))),
        None => Err(StoreError::Invalid(
            "the database has no Guantong schema: run `guantong-ingest migrate --database …` first"
                .into(),
        )),
    }
}
