//! Rollups kept at ingest time, so acceptance reports read a few rows per
//! series and day instead of scanning raw points.
//!
//! Per series and day (`SeriesDay`): sample counts by quality, backfilled,
//! out of range, future-stamped, value changes, the longest stretch without a
//! change, timestamp deltas and how many were exact multiples of the interval,
//! and a bottom-k sketch of the distinct values (to find identical series).
//! Per series and hour: count, sum, min and max of the numeric Good values
//! (trend charts). Per series: runs of data, of Bad points and of backfilled
//! points, as (start, end) of their sample times; a run continues while
//! consecutive samples are at most `2 × interval` apart, so the complement of
//! the data runs is the series' gaps. Per gateway and day of receipt
//! (`GatewayDay`): batches, points, bytes, a latency histogram and the
//! spread of (receipt − gateway commit) time, which bounds its clock offset.
//!
//! Invariants: everything here is derived from the points of one batch and
//! written in that batch's transaction; in-order facts (changes, deltas,
//! stretches) use only points later than the series' latest point, so a
//! backfill never rewrites them. Days are calendar days of `DAY_OFFSET_MS`
//! (China Standard Time, UTC+8).

use guantong_proto::v1::{Point, Quality, point::Value};

pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;
/// Days and day-based windows are in UTC+8 (China Standard Time, no DST).
pub const DAY_OFFSET_MS: i64 = 8 * HOUR_MS;
/// A point stamped later than this after its receipt is "in the future".
pub const FUTURE_TOLERANCE_MS: i64 = 5_000;
/// Distinct values kept per series and day for the identity sketch.
pub const SKETCH_K: usize = 32;
/// Latency histogram: bucket 0 is < 1 ms, bucket i is [2^(i-1), 2^i) ms.
pub const LATENCY_BUCKETS: usize = 40;
/// The gateway's quality code for a value outside the declared range.
pub const OUT_OF_RANGE_CODE: u32 = 0x0003_0001;

/// Hourly stats of Good numbers: (count, sum, min, max).
pub type HourStats = (u64, f64, f64, f64);
/// (hour start, count, sum, min, max)
pub type HourRow = (i64, u64, f64, f64, f64);

pub const RUN_DATA: u8 = 0;
pub const RUN_BAD: u8 = 1;
pub const RUN_BACKFILL: u8 = 2;

/// The start (UTC ms) of the UTC+8 calendar day holding `t`.
pub fn day_of(t: i64) -> i64 {
    (t + DAY_OFFSET_MS).div_euclid(DAY_MS) * DAY_MS - DAY_OFFSET_MS
}

pub fn hour_of(t: i64) -> i64 {
    t.div_euclid(HOUR_MS) * HOUR_MS
}

/// Largest gap between samples that still continues a run.
pub fn run_tolerance(interval_ms: u64) -> i64 {
    (interval_ms as i64).saturating_mul(2)
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SeriesDay {
    #[prost(uint64, tag = "1")]
    pub good: u64,
    #[prost(uint64, tag = "2")]
    pub uncertain: u64,
    #[prost(uint64, tag = "3")]
    pub bad: u64,
    #[prost(uint64, tag = "4")]
    pub backfilled: u64,
    #[prost(uint64, tag = "5")]
    pub out_of_range: u64,
    #[prost(uint64, tag = "6")]
    pub future: u64,
    #[prost(uint64, tag = "7")]
    pub changes: u64,
    #[prost(int64, tag = "8")]
    pub max_unchanged_ms: i64,
    #[prost(uint64, tag = "9")]
    pub deltas: u64,
    #[prost(uint64, tag = "10")]
    pub deltas_exact: u64,
    #[prost(int64, optional, tag = "11")]
    pub first_ms: Option<i64>,
    #[prost(int64, optional, tag = "12")]
    pub last_ms: Option<i64>,
    /// The smallest `SKETCH_K` hashes of distinct values, ascending.
    #[prost(fixed64, repeated, tag = "13")]
    pub sketch: Vec<u64>,
    /// Sum of (receipt − source time) over the day's points, for the mean.
    #[prost(int64, tag = "14")]
    pub latency_sum_ms: i64,
}

impl SeriesDay {
    pub fn samples(&self) -> u64 {
        self.good + self.uncertain + self.bad
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GatewayDay {
    #[prost(uint64, tag = "1")]
    pub batches: u64,
    #[prost(uint64, tag = "2")]
    pub points: u64,
    #[prost(uint64, tag = "3")]
    pub bytes: u64,
    #[prost(uint64, tag = "4")]
    pub backfill_points: u64,
    #[prost(uint64, repeated, tag = "5")]
    pub latency: Vec<u64>,
    /// min and max over live batches of (receipt − gateway commit time).
    #[prost(int64, optional, tag = "6")]
    pub skew_min_ms: Option<i64>,
    #[prost(int64, optional, tag = "7")]
    pub skew_max_ms: Option<i64>,
}

pub fn latency_bucket(ms: i64) -> usize {
    if ms < 1 {
        0
    } else {
        (64 - (ms as u64).leading_zeros() as usize).min(LATENCY_BUCKETS - 1)
    }
}

/// Upper edge (ms) of a latency bucket.
pub fn bucket_upper_ms(i: usize) -> i64 {
    if i == 0 { 1 } else { 1i64 << i.min(62) }
}

/// Adds a hash to a bottom-k sketch (ascending, distinct, at most k).
pub fn sketch_insert(sketch: &mut Vec<u64>, h: u64) {
    if sketch.len() >= SKETCH_K && sketch.last().is_some_and(|&m| h >= m) {
        return;
    }
    if let Err(i) = sketch.binary_search(&h) {
        sketch.insert(i, h);
        sketch.truncate(SKETCH_K);
    }
}

/// Merges `other` into a bottom-k sketch.
pub fn sketch_merge(sketch: &mut Vec<u64>, other: &[u64]) {
    for &h in other {
        sketch_insert(sketch, h);
    }
}

/// Estimated Jaccard similarity of the value sets behind two full sketches.
pub fn sketch_similarity(a: &[u64], b: &[u64]) -> f64 {
    let mut union = a.to_vec();
    sketch_merge(&mut union, b);
    if union.is_empty() {
        return 0.0;
    }
    let both = union
        .iter()
        .filter(|h| a.binary_search(h).is_ok() && b.binary_search(h).is_ok())
        .count();
    both as f64 / union.len() as f64
}

fn mix(mut z: u64) -> u64 {
    // splitmix64 finaliser: a fixed, well-spread hash of 64 bits.
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable hash of a value (same on every machine and version).
pub fn value_hash(v: &Option<Value>) -> u64 {
    match v {
        None => 0,
        Some(Value::Bool(b)) => mix(*b as u64 ^ 0x100),
        Some(Value::Int(i)) => mix(*i as u64 ^ 0x200),
        Some(Value::Uint(u)) => mix(*u ^ 0x300),
        // 0.0 and -0.0 are one value.
        Some(Value::Double(d)) => mix((if *d == 0.0 { 0.0f64 } else { *d }).to_bits() ^ 0x400),
        Some(Value::String(s)) => {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in s.as_bytes() {
                h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
            }
            mix(h)
        }
    }
}

pub fn value_f64(v: &Option<Value>) -> Option<f64> {
    match v {
        Some(Value::Int(i)) => Some(*i as f64),
        Some(Value::Uint(u)) => Some(*u as f64),
        Some(Value::Double(d)) if d.is_finite() => Some(*d),
        Some(Value::Bool(b)) => Some(*b as u8 as f64),
        _ => None,
    }
}

fn quality(p: &Point) -> Quality {
    Quality::try_from(p.quality).unwrap_or(Quality::Bad)
}

/// What the rollups need to know of a series' previous in-order point.
#[derive(Debug, Clone, Copy)]
pub struct Previous {
    pub time_ms: i64,
    pub value_hash: u64,
    /// When the value last changed.
    pub changed_at_ms: i64,
}

/// The rollup rows touched by one series' points of one batch.
#[derive(Default)]
pub struct SeriesUpdate {
    pub days: Vec<(i64, SeriesDay)>,
    /// (hour, count, sum, min, max)
    pub hours: Vec<HourRow>,
    /// (kind, start, end)
    pub runs: Vec<(u8, i64, i64)>,
}

/// Folds one series' points of one batch (absolute times, any order) into
/// rollup deltas, advancing `prev` over the in-order points.
pub fn fold_series(
    points: &mut [&Point],
    interval_ms: u64,
    received_at_ms: i64,
    backfill: bool,
    prev: &mut Option<Previous>,
) -> SeriesUpdate {
    points.sort_by_key(|p| p.time_offset_ms);
    let mut u = SeriesUpdate::default();
    let tol = run_tolerance(interval_ms);
    let mut open: [Option<(i64, i64)>; 3] = [None; 3];
    for p in points.iter() {
        let t = p.time_offset_ms;
        let q = quality(p);
        let day = day_of(t);
        if u.days.last().is_none_or(|(d, _)| *d != day) {
            u.days.push((day, SeriesDay::default()));
        }
        let Some((_, d)) = u.days.last_mut() else {
            continue;
        };
        match q {
            Quality::Good => d.good += 1,
            Quality::Uncertain => d.uncertain += 1,
            Quality::Bad => d.bad += 1,
        }
        if backfill {
            d.backfilled += 1;
        }
        if p.quality_code == OUT_OF_RANGE_CODE {
            d.out_of_range += 1;
        }
        if t > received_at_ms + FUTURE_TOLERANCE_MS {
            d.future += 1;
        }
        d.latency_sum_ms += (received_at_ms - t).max(0);
        d.first_ms = Some(d.first_ms.map_or(t, |f| f.min(t)));
        d.last_ms = Some(d.last_ms.map_or(t, |l| l.max(t)));
        if q != Quality::Bad {
            let h = value_hash(&p.value);
            sketch_insert(&mut d.sketch, h);
            match prev {
                Some(pr) if t > pr.time_ms => {
                    let delta = t - pr.time_ms;
                    d.deltas += 1;
                    if interval_ms > 0 && delta % interval_ms as i64 == 0 {
                        d.deltas_exact += 1;
                    }
                    if h != pr.value_hash {
                        d.changes += 1;
                        pr.changed_at_ms = t;
                    }
                    d.max_unchanged_ms = d.max_unchanged_ms.max(t - pr.changed_at_ms);
                    pr.time_ms = t;
                    pr.value_hash = h;
                }
                Some(_) => {}
                None => {
                    *prev = Some(Previous {
                        time_ms: t,
                        value_hash: h,
                        changed_at_ms: t,
                    })
                }
            }
            if q == Quality::Good
                && let Some(x) = value_f64(&p.value)
            {
                let hour = hour_of(t);
                match u.hours.last_mut() {
                    Some(h) if h.0 == hour => {
                        h.1 += 1;
                        h.2 += x;
                        h.3 = h.3.min(x);
                        h.4 = h.4.max(x);
                    }
                    _ => u.hours.push((hour, 1, x, x, x)),
                }
            }
        }
        if interval_ms > 0 {
            let mut kinds = [false; 3];
            kinds[RUN_DATA as usize] = q != Quality::Bad;
            kinds[RUN_BAD as usize] = q == Quality::Bad;
            kinds[RUN_BACKFILL as usize] = backfill;
            for (kind, on) in kinds.into_iter().enumerate() {
                if !on {
                    continue;
                }
                match &mut open[kind] {
                    Some((_, end)) if t - *end <= tol => *end = t,
                    slot => {
                        if let Some((s, e)) = slot.take() {
                            u.runs.push((kind as u8, s, e));
                        }
                        *slot = Some((t, t));
                    }
                }
            }
        }
    }
    for (kind, run) in open.into_iter().enumerate() {
        if let Some((s, e)) = run {
            u.runs.push((kind as u8, s, e));
        }
    }
    u
}

/// Where a new run `start..=end` of a series is written, given the stored
/// run of the same kind that starts last at or before `start`: that run
/// extended (its start, the new end), nothing (it already covers the new
/// one), or a run of its own. Runs are keyed by their start.
pub fn place_run(before: Option<(i64, i64)>, start: i64, end: i64, tol: i64) -> Option<(i64, i64)> {
    match before {
        Some((s, e)) if start - e <= tol => (end > e).then_some((s, end)),
        _ => Some((start, end)),
    }
}

impl GatewayDay {
    /// Adds a stored batch to its gateway's day of receipt (the row of
    /// `day_of(a.received_at_ms)`).
    pub fn add_batch(&mut self, a: &super::AppendBatch) {
        let b = &a.batch;
        self.batches += 1;
        self.points += b.points.len() as u64;
        self.bytes += a.wire_bytes;
        if a.backfill {
            self.backfill_points += b.points.len() as u64;
        }
        self.latency.resize(LATENCY_BUCKETS, 0);
        for p in &b.points {
            let t = b.base_time_ms.saturating_add(p.time_offset_ms);
            self.latency[latency_bucket(a.received_at_ms - t)] += 1;
        }
        if !a.backfill && b.committed_at_ms > 0 {
            let skew = a.received_at_ms - b.committed_at_ms;
            self.skew_min_ms = Some(self.skew_min_ms.map_or(skew, |m| m.min(skew)));
            self.skew_max_ms = Some(self.skew_max_ms.map_or(skew, |m| m.max(skew)));
        }
    }
}

/// Adds `b` into `a` (same series and day).
pub fn merge_day(a: &mut SeriesDay, b: &SeriesDay) {
    a.good += b.good;
    a.uncertain += b.uncertain;
    a.bad += b.bad;
    a.backfilled += b.backfilled;
    a.out_of_range += b.out_of_range;
    a.future += b.future;
    a.changes += b.changes;
    a.max_unchanged_ms = a.max_unchanged_ms.max(b.max_unchanged_ms);
    a.deltas += b.deltas;
    a.deltas_exact += b.deltas_exact;
    a.first_ms = match (a.first_ms, b.first_ms) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
    a.last_ms = match (a.last_ms, b.last_ms) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    sketch_merge(&mut a.sketch, &b.sketch);
    a.latency_sum_ms += b.latency_sum_ms;
}

/// Merges sorted-or-not runs into disjoint runs, joining those closer than
/// `tol`.
pub fn merge_runs(mut runs: Vec<(i64, i64)>, tol: i64) -> Vec<(i64, i64)> {
    runs.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::with_capacity(runs.len());
    for (s, e) in runs {
        match out.last_mut() {
            Some(last) if s - last.1 <= tol => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(t: i64, v: f64, q: Quality) -> Point {
        Point {
            tag: 0,
            time_offset_ms: t,
            value: Some(Value::Double(v)),
            quality: q as i32,
            quality_code: 0,
            server_time_delta_ms: None,
        }
    }

    #[test]
    fn days_are_china_standard_time() {
        // 2026-11-25 00:00 +08:00 is 2026-11-24 16:00 UTC.
        let midnight = 1_764_000_000_000 - (1_764_000_000_000 + DAY_OFFSET_MS) % DAY_MS;
        assert_eq!(day_of(midnight), midnight);
        assert_eq!(day_of(midnight - 1), midnight - DAY_MS);
        assert_eq!((midnight + DAY_OFFSET_MS) % DAY_MS, 0);
    }

    #[test]
    fn fold_counts_changes_runs_and_stretches() {
        let pts: Vec<Point> = [
            (1000, 1.0),
            (2000, 1.0),
            (3000, 2.0),
            (4000, 2.0),
            (9000, 2.0),
            (10000, 3.0),
        ]
        .iter()
        .map(|&(t, v)| pt(t, v, Quality::Good))
        .collect();
        let mut refs: Vec<&Point> = pts.iter().rev().collect();
        let mut prev = None;
        let u = fold_series(&mut refs, 1000, 10_500, false, &mut prev);
        let d = &u.days[0].1;
        assert_eq!((d.good, d.changes, d.deltas, d.deltas_exact), (6, 2, 5, 5));
        // 2.0 from 3 s to 10 s.
        assert_eq!(d.max_unchanged_ms, 7000 - 1000);
        assert_eq!(
            u.runs,
            vec![(RUN_DATA, 1000, 4000), (RUN_DATA, 9000, 10000)]
        );
        assert_eq!(d.sketch.len(), 3);
        let h = u.hours[0];
        assert_eq!((h.1, h.2, h.3, h.4), (6, 11.0, 1.0, 3.0));
    }

    #[test]
    fn sketches_tell_replayed_series_from_different_ones() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut c = Vec::new();
        for i in 0..500 {
            let v = (i as f64 * 0.37).sin() * 100.0;
            sketch_insert(&mut a, value_hash(&Some(Value::Double(v))));
            if i > 3 {
                sketch_insert(&mut b, value_hash(&Some(Value::Double(v))));
            }
            sketch_insert(&mut c, value_hash(&Some(Value::Double(v + 0.01))));
        }
        assert!(sketch_similarity(&a, &b) > 0.8);
        assert!(sketch_similarity(&a, &c) < 0.2);
    }

    #[test]
    fn latency_buckets() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1), 1);
        assert_eq!(latency_bucket(3), 2);
        assert_eq!(latency_bucket(1000), 10);
        assert!(bucket_upper_ms(10) > 1000);
    }
}
