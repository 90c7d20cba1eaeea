//! Writing and reading the rollup tables of the embedded store (the rows are
//! described in `store::rollup`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

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

/// Totals recomputed from the stored points, to compare with the rollups.
#[derive(Default, PartialEq, Debug, Clone, Copy)]
struct Recount {
    good: u64,
    uncertain: u64,
    bad: u64,
    backfilled: u64,
}

impl Recount {
    fn add(&mut self, p: &guantong_proto::v1::Point, backfill: bool) {
        match crate::evidence::points::quality_byte(p) {
            0 => self.good += 1,
            1 => self.uncertain += 1,
            _ => self.bad += 1,
        }
        if backfill {
            self.backfilled += 1;
        }
    }
}

/// Compares every rollup with the stored points (`verify-chain`): per
/// series and day the counts by quality and backfilled, per series and hour
/// the count, min and max of Good numbers, per series its totals, per
/// gateway and day of receipt the points, and that every stored point that
/// is not Bad lies in one of its series' data runs. Returns one line per
/// disagreement.
pub(super) fn cross_check(txn: &redb::ReadTransaction) -> Result<Vec<String>> {
    use super::{CHUNKS, Chunk, STATE, SeriesState};
    let mut names: HashMap<u64, SeriesMeta> = HashMap::new();
    for entry in txn
        .open_table(SERIES)
        .map_err(db_err)?
        .iter()
        .map_err(db_err)?
    {
        let (k, v) = entry.map_err(db_err)?;
        let meta = serde_json::from_slice(v.value())
            .map_err(|e| StoreError::Backend(format!("series: {e}")))?;
        names.insert(k.value(), meta);
    }
    let mut days: BTreeMap<(u64, i64), Recount> = BTreeMap::new();
    let mut totals: BTreeMap<u64, Recount> = BTreeMap::new();
    let mut hours: BTreeMap<(u64, i64), (u64, f64, f64)> = BTreeMap::new();
    let mut gateway_days: BTreeMap<(String, i64), u64> = BTreeMap::new();
    // Series -> times of its points that are not Bad.
    let mut data_times: HashMap<u64, Vec<i64>> = HashMap::new();
    for entry in txn
        .open_table(CHUNKS)
        .map_err(db_err)?
        .iter()
        .map_err(db_err)?
    {
        let (k, v) = entry.map_err(db_err)?;
        let series = k.value().0;
        let chunk = decode::<Chunk>(v.value(), "chunk")?;
        let gateway = names.get(&series).map_or("?", |m| m.gateway.as_str());
        *gateway_days
            .entry((gateway.to_string(), rollup::day_of(chunk.received_at_ms)))
            .or_default() += chunk.points.len() as u64;
        for p in &chunk.points {
            let t = chunk.base_ms + p.time_offset_ms;
            days.entry((series, rollup::day_of(t)))
                .or_default()
                .add(p, chunk.backfill);
            totals.entry(series).or_default().add(p, chunk.backfill);
            let quality = crate::evidence::points::quality_byte(p);
            if quality != 2 {
                data_times.entry(series).or_default().push(t);
            }
            if quality == 0
                && let Some(x) = rollup::value_f64(&p.value)
            {
                let h = hours
                    .entry((series, rollup::hour_of(t)))
                    .or_insert((0, x, x));
                h.0 += 1;
                h.1 = h.1.min(x);
                h.2 = h.2.max(x);
            }
        }
    }
    let name = |series: u64| {
        names.get(&series).map_or_else(
            || format!("series {series}"),
            |m| format!("gateway {} series {}/{}", m.gateway, m.device, m.tag),
        )
    };
    let mut problems = Vec::new();

    let mut rolled: BTreeMap<(u64, i64), Recount> = BTreeMap::new();
    for entry in txn
        .open_table(DAYS)
        .map_err(db_err)?
        .iter()
        .map_err(db_err)?
    {
        let (k, v) = entry.map_err(db_err)?;
        let d = decode::<SeriesDay>(v.value(), "day rollup")?;
        let recount = Recount {
            good: d.good,
            uncertain: d.uncertain,
            bad: d.bad,
            backfilled: d.backfilled,
        };
        rolled.insert(k.value(), recount);
    }
    for key in rolled
        .keys()
        .chain(days.keys())
        .copied()
        .collect::<BTreeSet<_>>()
    {
        let (r, s) = (rolled.get(&key).copied(), days.get(&key).copied());
        if r.unwrap_or_default() != s.unwrap_or_default() {
            problems.push(format!(
                "{} day {}: the day rollup says {:?} but the stored points are {:?}",
                name(key.0),
                crate::http::rfc3339(key.1),
                r.unwrap_or_default(),
                s.unwrap_or_default()
            ));
        }
    }

    let mut rolled_hours: BTreeMap<(u64, i64), (u64, f64, f64)> = BTreeMap::new();
    for entry in txn
        .open_table(HOURS)
        .map_err(db_err)?
        .iter()
        .map_err(db_err)?
    {
        let (k, v) = entry.map_err(db_err)?;
        let (n, _sum, min, max) = v.value();
        rolled_hours.insert(k.value(), (n, min, max));
    }
    let hour_keys: BTreeSet<_> = rolled_hours.keys().chain(hours.keys()).copied().collect();
    for key in hour_keys {
        let (r, s) = (rolled_hours.get(&key), hours.get(&key));
        if r != s {
            problems.push(format!(
                "{} hour {}: the hour rollup says (count, min, max) {r:?} but the stored points give {s:?}",
                name(key.0),
                crate::http::rfc3339(key.1),
            ));
        }
    }

    for entry in txn
        .open_table(STATE)
        .map_err(db_err)?
        .iter()
        .map_err(db_err)?
    {
        let (k, v) = entry.map_err(db_err)?;
        let s = decode::<SeriesState>(v.value(), "series state")?;
        let stated = Recount {
            good: s.good,
            uncertain: s.uncertain,
            bad: s.bad,
            backfilled: s.backfilled,
        };
        let stored = totals.remove(&k.value()).unwrap_or_default();
        if stated != stored {
            problems.push(format!(
                "{}: the series totals say {stated:?} but the stored points are {stored:?}",
                name(k.value())
            ));
        }
    }
    for (series, stored) in totals {
        problems.push(format!(
            "{}: {stored:?} stored points but no series totals",
            name(series)
        ));
    }

    let mut rolled_gateways: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for entry in txn
        .open_table(GATEWAY_DAYS)
        .map_err(db_err)?
        .iter()
        .map_err(db_err)?
    {
        let (k, v) = entry.map_err(db_err)?;
        let (gateway, day) = k.value();
        let d = decode::<GatewayDay>(v.value(), "gateway day rollup")?;
        rolled_gateways.insert((gateway.to_string(), day), d.points);
    }
    let gateway_keys: BTreeSet<_> = rolled_gateways
        .keys()
        .chain(gateway_days.keys())
        .cloned()
        .collect();
    for key in gateway_keys {
        // A batch without points leaves a row counting 0: the same as none.
        let count = |m: &BTreeMap<(String, i64), u64>| m.get(&key).copied().unwrap_or(0);
        let (r, s) = (count(&rolled_gateways), count(&gateway_days));
        if r != s {
            problems.push(format!(
                "gateway {} day of receipt {}: the gateway day rollup counts {} points but {} are stored",
                key.0,
                crate::http::rfc3339(key.1),
                r,
                s
            ));
        }
    }

    let runs = txn.open_table(RUNS).map_err(db_err)?;
    for (series, times) in data_times {
        let mut outside = 0u64;
        for t in &times {
            // Usually the latest run starting before t; a backfill may have
            // left a longer run further back, so look at all on a miss.
            let mut before = runs
                .range((series, rollup::RUN_DATA, i64::MIN)..=(series, rollup::RUN_DATA, *t))
                .map_err(db_err)?
                .rev();
            let mut covered = false;
            for run in before.by_ref() {
                if run.map_err(db_err)?.1.value() >= *t {
                    covered = true;
                    break;
                }
            }
            if !covered {
                outside += 1;
            }
        }
        if outside > 0 {
            problems.push(format!(
                "{}: {outside} stored points lie outside every data run",
                name(series)
            ));
        }
    }
    Ok(problems)
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
