//! Writing and reading the rollup tables of the embedded store (the rows are
//! described in `store::rollup`).

use prost::Message;
use redb::{ReadableDatabase, ReadableTable};

use super::{DAYS, Db, EmbeddedStore, GATEWAY_DAYS, HOURS, RUNS, SERIES, SeriesMeta, db_err};
use crate::store::rollup::{self, GatewayDay, SeriesDay, SeriesUpdate, merge_day};
use crate::store::{AppendBatch, Result, RunsQuery, StoreError};

pub(super) struct RollupTables<'t> {
    pub days: redb::Table<'t, (u64, i64), &'static [u8]>,
    pub hours: redb::Table<'t, (u64, i64), rollup::HourStats>,
    pub runs: redb::Table<'t, (u64, u8, i64), i64>,
    pub gateway_days: redb::Table<'t, (&'static str, i64), &'static [u8]>,
}

fn decode<M: Message + Default>(bytes: &[u8], what: &str) -> Result<M> {
    M::decode(bytes).map_err(|e| StoreError::Backend(format!("{what}: {e}")))
}

impl RollupTables<'_> {
    /// Adds one series' share of a batch.
    pub fn apply(&mut self, series: u64, interval_ms: u64, u: SeriesUpdate) -> Result<()> {
        for (day, d) in u.days {
            let mut row: SeriesDay = match self.days.get((series, day)).map_err(db_err)? {
                Some(v) => decode(v.value(), "day rollup")?,
                None => SeriesDay::default(),
            };
            merge_day(&mut row, &d);
            self.days
                .insert((series, day), row.encode_to_vec().as_slice())
                .map_err(db_err)?;
        }
        for (hour, n, sum, min, max) in u.hours {
            let row = match self.hours.get((series, hour)).map_err(db_err)? {
                Some(v) => {
                    let (n0, s0, lo, hi) = v.value();
                    (n0 + n, s0 + sum, lo.min(min), hi.max(max))
                }
                None => (n, sum, min, max),
            };
            self.hours.insert((series, hour), row).map_err(db_err)?;
        }
        let tol = rollup::run_tolerance(interval_ms);
        for (kind, start, end) in u.runs {
            let before = self
                .runs
                .range((series, kind, i64::MIN)..=(series, kind, start))
                .map_err(db_err)?
                .next_back()
                .transpose()
                .map_err(db_err)?
                .map(|(k, v)| (k.value().2, v.value()));
            if let Some((s, e)) = rollup::place_run(before, start, end, tol) {
                self.runs.insert((series, kind, s), e).map_err(db_err)?;
            }
        }
        Ok(())
    }

    /// Adds a stored batch to its gateway's day of receipt.
    pub fn gateway_day(&mut self, a: &AppendBatch) -> Result<()> {
        let day = rollup::day_of(a.received_at_ms);
        let key = (a.gateway_id.as_str(), day);
        let mut row: GatewayDay = match self.gateway_days.get(key).map_err(db_err)? {
            Some(v) => decode(v.value(), "gateway day rollup")?,
            None => GatewayDay::default(),
        };
        row.add_batch(a);
        self.gateway_days
            .insert(key, row.encode_to_vec().as_slice())
            .map_err(db_err)?;
        Ok(())
    }
}

impl Db<'_> {
    /// Day rollups of `series` for days starting in `from_day..to_day`.
    pub fn series_days(
        &self,
        series: &[u64],
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<(u64, i64, SeriesDay)>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let days = txn.open_table(DAYS).map_err(db_err)?;
        let mut out = Vec::new();
        for &s in series {
            for entry in days.range((s, from_day)..(s, to_day)).map_err(db_err)? {
                let (k, v) = entry.map_err(db_err)?;
                out.push((s, k.value().1, decode(v.value(), "day rollup")?));
            }
        }
        Ok(out)
    }

    /// The runs each of `queries` asks for, in order, from one read
    /// transaction.
    pub fn series_runs(&self, queries: &[RunsQuery]) -> Result<Vec<Vec<(i64, i64)>>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let runs = txn.open_table(RUNS).map_err(db_err)?;
        queries.iter().map(|q| runs_in(&runs, q)).collect()
    }

    /// Hourly (hour, count, sum, min, max) of each series' Good numbers.
    pub fn series_hours(
        &self,
        series: &[u64],
        from: i64,
        to: i64,
    ) -> Result<Vec<Vec<rollup::HourRow>>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let hours = txn.open_table(HOURS).map_err(db_err)?;
        let mut out = Vec::with_capacity(series.len());
        for &s in series {
            let mut rows = Vec::new();
            for entry in hours.range((s, from)..(s, to)).map_err(db_err)? {
                let (k, v) = entry.map_err(db_err)?;
                let (n, sum, min, max) = v.value();
                rows.push((k.value().1, n, sum, min, max));
            }
            out.push(rows);
        }
        Ok(out)
    }

    /// A gateway's day rollups for days starting in `from_day..to_day`.
    pub fn gateway_days(
        &self,
        gateway: &str,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<(i64, GatewayDay)>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(GATEWAY_DAYS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in t
            .range((gateway, from_day)..(gateway, to_day))
            .map_err(db_err)?
        {
            let (k, v) = entry.map_err(db_err)?;
            out.push((k.value().1, decode(v.value(), "gateway day rollup")?));
        }
        Ok(out)
    }
}

impl EmbeddedStore {
    /// Writes rollup rows directly, as a benchmark's stand-in for weeks of
    /// ingested points (the report reads nothing else).
    #[doc(hidden)]
    pub fn bench_put_rollups(
        &self,
        days: Vec<(u64, i64, SeriesDay)>,
        runs: Vec<(u64, u8, i64, i64)>,
        hours: Vec<(u64, i64, rollup::HourStats)>,
        gateway_days: Vec<(String, i64, GatewayDay)>,
    ) -> Result<()> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut g = txn.open_table(GATEWAY_DAYS).map_err(db_err)?;
            for (gw, d, row) in gateway_days {
                g.insert((gw.as_str(), d), row.encode_to_vec().as_slice())
                    .map_err(db_err)?;
            }
            let mut t = txn.open_table(DAYS).map_err(db_err)?;
            for (s, d, row) in days {
                t.insert((s, d), row.encode_to_vec().as_slice())
                    .map_err(db_err)?;
            }
            let mut r = txn.open_table(RUNS).map_err(db_err)?;
            for (s, k, a, b) in runs {
                r.insert((s, k, a), b).map_err(db_err)?;
            }
            let mut h = txn.open_table(HOURS).map_err(db_err)?;
            for (s, hour, v) in hours {
                h.insert((s, hour), v).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }
}

impl EmbeddedStore {
    /// Moves every series' creation time to `created_ms`, as if its
    /// manifest had arrived then (benchmarks of long windows).
    #[doc(hidden)]
    pub fn bench_backdate_series(&self, created_ms: i64) -> Result<()> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(SERIES).map_err(db_err)?;
            let rows: Vec<(u64, Vec<u8>)> = t
                .iter()
                .map_err(db_err)?
                .filter_map(|e| e.ok())
                .map(|(k, v)| (k.value(), v.value().to_vec()))
                .collect();
            for (id, bytes) in rows {
                let mut m: SeriesMeta = serde_json::from_slice(&bytes)
                    .map_err(|e| StoreError::Backend(e.to_string()))?;
                m.created_ms = created_ms;
                let v = serde_json::to_vec(&m).map_err(|e| StoreError::Backend(e.to_string()))?;
                t.insert(id, v.as_slice()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }
}

/// The runs `q` asks for, merged with its tolerance.
fn runs_in(
    runs: &impl ReadableTable<(u64, u8, i64), i64>,
    q: &RunsQuery,
) -> Result<Vec<(i64, i64)>> {
    let RunsQuery {
        series,
        kind,
        tol,
        from,
        to,
    } = *q;
    let mut out = Vec::new();
    // Runs start before `from` may reach into the window: take every run
    // from the last one starting at or before `from - tol`.
    let first = runs
        .range((series, kind, i64::MIN)..=(series, kind, from.saturating_sub(tol)))
        .map_err(db_err)?
        .next_back()
        .transpose()
        .map_err(db_err)?
        .map_or(i64::MIN, |(k, _)| k.value().2);
    for entry in runs
        .range((series, kind, first)..(series, kind, to))
        .map_err(db_err)?
    {
        let (k, v) = entry.map_err(db_err)?;
        out.push((k.value().2, v.value()));
    }
    Ok(rollup::merge_runs(out, tol))
}
