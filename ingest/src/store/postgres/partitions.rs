//! The daily partitions of `points`, and retention.
//!
//! # Design
//! `points` is range-partitioned by source time into one table per UTC+8
//! day, `points_YYYYMMDD`, with no default partition: a point whose day has
//! no partition cannot be stored, so every writer makes the partitions of
//! its group's days before its transaction (`Partitions::ensure`), and the
//! poller keeps yesterday to two days ahead made. A partition is made as a
//! table of its own and then attached, which locks `points` only against
//! other attaches and detaches (SHARE UPDATE EXCLUSIVE), never against
//! writers or readers; replicas racing to make one day both end with it.
//!
//! # Retention (`serve --retention`)
//! Each replica's poller drops, every hour, the partitions whose whole day
//! ended more than the retention ago, one transaction each, which also
//! raises `points_horizon` to that day's end. Dropping takes `points`'
//! ACCESS EXCLUSIVE lock; it waits at most `DROP_LOCK_TIMEOUT` for running
//! statements (then tries again next hour), so writers wait no longer than
//! that. Points are never deleted row by row. Rollups, signed batches,
//! losses and the chain are kept: reports are unchanged, and `verify-chain`
//! and exports leave points before the horizon out of their comparisons
//! (`points_from_ms`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Object};

use super::pg_err;
use crate::store::rollup::{DAY_MS, DAY_OFFSET_MS, day_of};
use crate::store::{Result, StoreError};

/// Longest a retention drop waits for `points`' lock.
const DROP_LOCK_TIMEOUT: &str = "2s";

/// The partition holding the UTC+8 day starting at `day_start`.
pub(super) fn name(day_start: i64) -> String {
    let number = (day_start + DAY_OFFSET_MS).div_euclid(DAY_MS);
    let date = crate::days::format(number);
    if date.len() == 10 && date.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        format!("points_{}", date.replace('-', ""))
    } else {
        format!("points_day{}", number.to_string().replace('-', "m"))
    }
}

/// The day start of a partition `name` made, if it is one.
fn day_of_name(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("points_")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let date = format!("{}-{}-{}", &digits[..4], &digits[4..6], &digits[6..]);
    let number = crate::days::parse(&date).ok()?;
    Some(number * DAY_MS - DAY_OFFSET_MS)
}

/// The distinct days (starts) of source times `times`.
pub(super) fn days_of(times: impl Iterator<Item = i64>) -> Vec<i64> {
    let mut days: Vec<i64> = Vec::new();
    let mut last = None;
    for t in times {
        let d = day_of(t);
        if last != Some(d) {
            last = Some(d);
            days.push(d);
        }
    }
    days.sort_unstable();
    days.dedup();
    days
}

/// The days whose partitions this replica knows exist.
#[derive(Clone, Default)]
pub(super) struct Partitions {
    known: Arc<Mutex<HashSet<i64>>>,
}

impl Partitions {
    /// Makes the partitions of `days` (day starts) that this replica has
    /// not seen yet.
    pub async fn ensure(&self, client: &mut Object, days: &[i64]) -> Result<()> {
        let missing: Vec<i64> = {
            let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            days.iter()
                .copied()
                .filter(|d| !known.contains(d))
                .collect()
        };
        for day in missing {
            make(client, day).await?;
            self.known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(day);
        }
        Ok(())
    }

    /// Forgets what it knows (after a failed write: a partition may have
    /// been dropped by retention meanwhile).
    pub fn forget(&self) {
        self.known.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

async fn attached(client: &impl GenericClient, name: &str) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_inherits \
             WHERE inhrelid = to_regclass($1) AND inhparent = to_regclass('points'))",
            &[&name],
        )
        .await
        .map_err(pg_err)?
        .get(0))
}

/// Makes (creates and attaches) the partition of the day starting at
/// `day_start`, unless it exists.
async fn make(client: &mut Object, day_start: i64) -> Result<()> {
    let name = name(day_start);
    if attached(&*client, &name).await? {
        return Ok(());
    }
    let made = async {
        let txn = client.transaction().await?;
        txn.batch_execute(&format!(
            "CREATE TABLE {name} (LIKE points INCLUDING DEFAULTS); \
             ALTER TABLE points ATTACH PARTITION {name} FOR VALUES FROM ({day_start}) TO ({})",
            day_start + DAY_MS
        ))
        .await?;
        txn.commit().await
    }
    .await;
    match made {
        Ok(()) => {
            tracing::debug!(partition = %name, "made a point partition");
            Ok(())
        }
        // Another writer or replica made it meanwhile.
        Err(_) if attached(&*client, &name).await? => Ok(()),
        Err(e) => Err(StoreError::Backend(format!(
            "cannot make the point partition {name}: {}",
            pg_err(e)
        ))),
    }
}

/// Makes the partitions of yesterday to two days ahead of `now`.
pub(super) async fn make_ahead(
    partitions: &Partitions,
    client: &mut Object,
    now: i64,
) -> Result<()> {
    let days = days_of((-1..=2).map(|d| now + d * DAY_MS));
    partitions.ensure(client, &days).await
}

/// Points with an earlier source time may have been dropped by retention.
pub(super) async fn horizon(client: &impl GenericClient) -> Result<Option<i64>> {
    Ok(client
        .query_opt("SELECT from_ms FROM points_horizon", &[])
        .await
        .map_err(pg_err)?
        .map(|r| r.get(0)))
}

/// Drops the partitions whose day ended `retention` or longer before `now`;
/// returns the days dropped.
pub(super) async fn expire(
    client: &mut Object,
    now: i64,
    retention: Duration,
) -> Result<Vec<String>> {
    let cutoff = now.saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
    let names: Vec<String> = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = to_regclass('points')",
            &[],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut expired: Vec<(i64, String)> = names
        .into_iter()
        .filter_map(|n| day_of_name(&n).map(|d| (d, n)))
        .filter(|(d, _)| d + DAY_MS <= cutoff)
        .collect();
    expired.sort();
    let mut dropped = Vec::new();
    for (day, name) in expired {
        let txn = client.transaction().await.map_err(pg_err)?;
        txn.batch_execute(&format!("SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'"))
            .await
            .map_err(pg_err)?;
        txn.execute(
            "INSERT INTO points_horizon (from_ms) VALUES ($1) ON CONFLICT (one) \
             DO UPDATE SET from_ms = greatest(points_horizon.from_ms, EXCLUDED.from_ms)",
            &[&(day + DAY_MS)],
        )
        .await
        .map_err(pg_err)?;
        txn.batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
            .await
            .map_err(|e| {
                StoreError::Backend(format!("cannot drop {name} (retention): {}", pg_err(e)))
            })?;
        txn.commit().await.map_err(pg_err)?;
        dropped.push(name);
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_are_utc8_days_and_read_back() {
        // 2026-12-04T16:00:00Z is the start of 2026-12-05 in UTC+8.
        let start = 1_796_400_000_000;
        assert_eq!(name(day_of(start)), "points_20261205");
        assert_eq!(name(day_of(start - 1)), "points_20261204");
        assert_eq!(day_of_name("points_20261205"), Some(start));
        assert_eq!(name(day_of(0)), "points_19700101");
        assert_eq!(name(-100 * 365 * DAY_MS), "points_18700125");
        assert_eq!(day_of_name("points_default"), None);
        assert_eq!(day_of_name("points_20261399"), None);
    }
}
