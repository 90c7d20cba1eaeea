//! Acceptance evidence: per tag, device, gateway and
//! enterprise, computed from the rollups (never from raw points), plus the
//! networking rate, cloud usage and the city view.
//!
//! Definitions (also in the README, "Acceptance evidence"):
//! - A tag is *expected* to deliver one sample per declared interval from
//!   when a manifest first named it (or the window start, if later) until the
//!   window end (or now, less a grace of two intervals). *Received* samples are
//!   Good or Uncertain; Bad samples mean the device did not give a value.
//! - A *gap* is a stretch longer than twice the interval without a received
//!   sample. Its cause is `device_fault` when the device reported Bad (any
//!   code) in it: from its first Bad sample to the next received one, however
//!   far apart the Bad samples are (on a shared serial line each poll of a
//!   dead unit waits out the timeouts of the others), and from the gap's
//!   start too when that first Bad sample came within `FAULT_LEAD_IN`.
//!   Otherwise `dropped_by_gateway` when the gateway's loss records cover
//!   most of it (`storage_error` or `storage_corrupted` when those records
//!   say the gateway's disk failed or its buffer file was damaged), else
//!   `no_data`. Stretches delivered late from the gateway's backlog are
//!   listed as `gateway_offline_backfilled` (data complete, arrived late).
//! - A device is *data-through* when, on every day of the verdict period
//!   (the last `verdict_days` days of the window that expected data), its
//!   completeness is at least `completeness_min`, and no tag carries a
//!   critical plausibility flag.
//! - Networking rate = data-through production devices of the equipment
//!   register ÷ all production devices of the register.
//!
//! Invariant: every figure here is a pure function of the store's contents
//! and the criteria, so two runs on the same data give the same report.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::registry::{Enterprise, Equipment, Industry, default_industries};
use crate::store::rollup::{
    self, DAY_MS, GatewayDay, LATENCY_BUCKETS, RUN_BACKFILL, RUN_BAD, RUN_DATA, SKETCH_K,
    SeriesDay, bucket_upper_ms, sketch_similarity,
};
use crate::store::{ChainInfo, LossInfo, Result, RunsQuery, SeriesInfo, Store};

/// The configurable criteria of verdicts and flags (`[evidence]` in the
/// ingest config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Criteria {
    /// Least completeness a device needs on each day of the verdict period.
    pub completeness_min: f64,
    /// Days (ending with the window) a verdict looks at.
    pub verdict_days: u32,
    /// A numeric value unchanged this long is `frozen`.
    #[serde(with = "humantime_serde")]
    pub frozen_after: std::time::Duration,
    /// Share of timestamp steps that are exact multiples of the interval
    /// above which a tag is flagged `no_jitter` (simulator-like), given at
    /// least 100 steps.
    pub no_jitter_share: f64,
    /// Estimated overlap of the value sets of two tags on different devices
    /// above which both are flagged `identical_series`.
    pub identical_similarity: f64,
    /// Flags that fail a device's verdict.
    pub critical_flags: Vec<FlagKind>,
    /// The city's target networking rate, for progress.
    pub networking_target: f64,
    /// The industries enterprises are filed under.
    pub industries: Vec<Industry>,
}

impl Default for Criteria {
    fn default() -> Self {
        Criteria {
            completeness_min: 0.95,
            verdict_days: 7,
            frozen_after: std::time::Duration::from_secs(6 * 3600),
            no_jitter_share: 0.99,
            identical_similarity: 0.9,
            critical_flags: vec![FlagKind::IdenticalSeries, FlagKind::FutureTimestamps],
            networking_target: 0.8,
            industries: default_industries(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum FlagKind {
    Frozen,
    IdenticalSeries,
    OutOfRange,
    NoJitter,
    FutureTimestamps,
}

#[derive(Debug, Clone, Serialize)]
pub struct Flag {
    pub kind: FlagKind,
    pub critical: bool,
    pub tag: String,
    pub detail: String,
    /// The figures of `detail`, for pages that word it in their language.
    #[serde(skip)]
    pub figures: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Gap {
    pub start_ms: i64,
    pub end_ms: i64,
    pub duration_ms: i64,
    pub cause: &'static str,
    /// Tags of the device affected.
    pub tags: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct DayCell {
    /// Day start (UTC ms) of a UTC+8 day.
    pub day_ms: i64,
    pub date: String,
    pub expected: u64,
    pub received: u64,
    pub completeness: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TagReport {
    pub tag: String,
    pub unit: String,
    pub interval_ms: u64,
    pub expected: u64,
    pub received: u64,
    pub bad: u64,
    pub completeness: Option<f64>,
    pub first_seen_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Trend {
    pub tag: String,
    pub unit: String,
    /// (hour start ms, mean, min, max)
    pub points: Vec<(i64, f64, f64, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub data_through: bool,
    /// In English, for the API and the CLI.
    pub reasons: Vec<String>,
    /// The same reasons as data, for pages that word them in their language.
    #[serde(skip)]
    pub why: Vec<Reason>,
}

/// Why a device or a register entry is, or is not, data-through.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    DataThrough,
    NoGatewayNamed,
    /// The register names a gateway that is not assigned to the enterprise
    /// (unknown, or another enterprise's).
    GatewayNotOwned(String),
    NeverConnected,
    NoDataExpected,
    LowCompleteness {
        date: String,
        completeness: f64,
        min: f64,
    },
    /// A critical plausibility flag (its index in the device's flags).
    CriticalFlag(usize),
}

impl Reason {
    /// The English wording of the API (`reasons`); pages word it from their
    /// catalogue instead.
    pub fn english(&self, flags: &[Flag]) -> String {
        match self {
            Reason::DataThrough => "data-through".into(),
            Reason::NoGatewayNamed => "not networked: no gateway device named".into(),
            Reason::GatewayNotOwned(g) => format!("gateway {g} does not belong to this enterprise"),
            Reason::NeverConnected => "never connected: no data from this device".into(),
            Reason::NoDataExpected => "no data expected in the verdict period".into(),
            Reason::LowCompleteness {
                date,
                completeness,
                min,
            } => format!(
                "{date}: completeness {:.1}% < {:.1}%",
                completeness * 100.0,
                min * 100.0
            ),
            Reason::CriticalFlag(i) => flags.get(*i).map_or_else(String::new, |f| {
                format!("{} on {}: {}", flag_name(f.kind), f.tag, f.detail)
            }),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    pub gateway: String,
    pub device: String,
    pub protocol: String,
    pub identity: BTreeMap<String, String>,
    /// The register entry this device collects, if any.
    pub equipment: Option<Equipment>,
    pub expected: u64,
    pub received: u64,
    pub good: u64,
    pub uncertain: u64,
    pub bad: u64,
    pub backfilled: u64,
    pub completeness: Option<f64>,
    pub first_seen_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
    pub daily: Vec<DayCell>,
    pub gaps: Vec<Gap>,
    pub gaps_total: usize,
    pub flags: Vec<Flag>,
    pub verdict: Verdict,
    pub tags: Vec<TagReport>,
    pub trend: Vec<Trend>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewayReport {
    pub gateway: String,
    pub batches: u64,
    pub points: u64,
    pub bytes: u64,
    pub backfill_share: f64,
    pub latency_p50_ms: Option<i64>,
    pub latency_p95_ms: Option<i64>,
    /// Gateway clock minus ingest clock, within ± the network delay.
    pub clock_offset_ms: Option<i64>,
    pub chains: Vec<ChainInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EquipmentStatus {
    pub equipment: Equipment,
    pub data_through: bool,
    pub reason: String,
    #[serde(skip)]
    pub why: Vec<Reason>,
    /// The device's flags, which `Reason::CriticalFlag` points into.
    #[serde(skip)]
    pub flags: Vec<Flag>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Networking {
    /// Production devices in the equipment register (the denominator).
    pub registered_production: u64,
    pub data_through: u64,
    pub rate: Option<f64>,
    pub equipment: Vec<EquipmentStatus>,
    /// Gateway devices no register entry names (not counted).
    pub unregistered_devices: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct UsageDay {
    pub day_ms: i64,
    pub date: String,
    pub active: bool,
    pub points: u64,
    pub bytes: u64,
    pub batches: u64,
    pub active_devices: u64,
    pub active_tags: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EnterpriseReport {
    pub enterprise: Enterprise,
    pub industry_name: String,
    pub from_day_ms: i64,
    pub to_day_ms: i64,
    pub from: String,
    pub to: String,
    pub generated_at_ms: i64,
    pub criteria: Criteria,
    pub networking: Networking,
    pub devices: Vec<DeviceReport>,
    pub gateways: Vec<GatewayReport>,
    pub usage: Vec<UsageDay>,
    /// month "YYYY-MM" -> active days.
    pub active_days: BTreeMap<String, u64>,
}

/// The store-wide lists a report needs, read once and shared by the
/// reports of many enterprises.
pub struct Snapshot {
    pub series: Vec<SeriesInfo>,
    pub losses: Vec<LossInfo>,
    pub chains: Vec<ChainInfo>,
    pub now_ms: i64,
}

/// "YYYY-MM-DD" of a UTC+8 day start.
pub fn date_of(day_ms: i64) -> String {
    crate::days::format((day_ms + rollup::DAY_OFFSET_MS).div_euclid(DAY_MS))
}

/// The UTC ms start of a UTC+8 date "YYYY-MM-DD".
pub fn parse_date(s: &str) -> std::result::Result<i64, String> {
    let days = crate::days::parse(s.trim()).map_err(|e| match e {
        crate::days::DateError::Format => format!("date `{s}`: expected YYYY-MM-DD"),
        crate::days::DateError::NoSuchDate => format!("date `{s}` does not exist"),
    })?;
    Ok(days * DAY_MS - rollup::DAY_OFFSET_MS)
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| (a.min(b)) as f64 / b as f64)
}

/// Samples a tag should have delivered in `[from, to)`.
fn expected_in(s: &SeriesInfo, from: i64, to: i64, now_ms: i64) -> u64 {
    if s.interval_ms == 0 {
        return 0;
    }
    let start = from.max(s.created_ms.unwrap_or(i64::MAX));
    let grace = 2 * s.interval_ms as i64;
    let end = to.min(now_ms - grace);
    if end <= start {
        return 0;
    }
    ((end - start) / s.interval_ms as i64) as u64
}

/// A time range a gateway loss record covers, with the gap cause it gives.
type LossRange = (i64, i64, &'static str);

/// The gap cause of a loss record's reason: the gateway's storage failing
/// (`storage_error`), its buffer file damaged (`storage_corrupted`), or a
/// drop by policy (`dropped_by_gateway`: buffer full, expired).
fn loss_cause_of(reason: &str) -> &'static str {
    match reason.rsplit(": ").next() {
        Some("storage_error") => "storage_error",
        Some("storage_corrupted" | "corrupted") => "storage_corrupted",
        _ => "dropped_by_gateway",
    }
}

/// The cause of `[a, b)` when loss records cover most of it: the one
/// covering most.
fn loss_cause(losses: &[LossRange], a: i64, b: i64) -> Option<&'static str> {
    let mut by_cause: BTreeMap<&'static str, i64> = BTreeMap::new();
    for &(x, y, cause) in losses {
        *by_cause.entry(cause).or_default() += (y.max(x + 1).min(b) - x.max(a)).max(0);
    }
    let total: i64 = by_cause.values().sum();
    (total * 2 >= b - a && total > 0)
        .then(|| by_cause.into_iter().max_by_key(|&(_, n)| n).map(|(c, _)| c))
        .flatten()
}

/// A gap whose first Bad sample came at most this long after its start is a
/// device fault from its start: the time a gateway takes to call a device
/// Bad (its timeout, a shared line's other units' timeouts, a watchdog), at
/// least 10 intervals or 30 s.
fn fault_lead_in(interval_ms: i64) -> i64 {
    interval_ms.saturating_mul(10).max(30_000)
}

/// Where a tag's gaps are looked for: `[start, to)` with run tolerance
/// `tol`.
#[derive(Clone, Copy)]
struct GapWindow {
    start: i64,
    to: i64,
    tol: i64,
}

/// The gap window of one tag in `[from, to)`; None when none can be judged
/// (no interval, or nothing due yet).
fn gap_window(s: &SeriesInfo, from: i64, to: i64, now_ms: i64) -> Option<GapWindow> {
    if s.interval_ms == 0 {
        return None;
    }
    // Samples of the last moments may still be on their way.
    let to = to.min(now_ms - 2 * s.interval_ms as i64);
    let start = from.max(s.created_ms.unwrap_or(i64::MAX));
    (to > start).then(|| GapWindow {
        start,
        to,
        tol: rollup::run_tolerance(s.interval_ms),
    })
}

/// The data, Bad and backfill runs a tag's gaps are made of.
const GAP_RUN_KINDS: [u8; 3] = [RUN_DATA, RUN_BAD, RUN_BACKFILL];

/// The gap windows of `tags` in `[from, to)` and their runs, read in one
/// store call (a report asks for a thousand tags).
async fn gap_runs(
    store: &impl Store,
    tags: &[&SeriesInfo],
    from: i64,
    to: i64,
    now_ms: i64,
) -> Result<HashMap<u64, (GapWindow, [Vec<(i64, i64)>; 3])>> {
    let windows: Vec<(u64, GapWindow)> = tags
        .iter()
        .filter_map(|s| Some((s.id, gap_window(s, from, to, now_ms)?)))
        .collect();
    let queries = windows
        .iter()
        .flat_map(|&(series, w)| {
            GAP_RUN_KINDS.map(|kind| RunsQuery {
                series,
                kind,
                tol: w.tol,
                from: w.start,
                to: w.to,
            })
        })
        .collect();
    let mut runs = store.series_runs_of(queries).await?.into_iter();
    let mut out = HashMap::with_capacity(windows.len());
    for (series, w) in windows {
        let of_tag = GAP_RUN_KINDS.map(|_| runs.next().unwrap_or_default());
        out.insert(series, (w, of_tag));
    }
    Ok(out)
}

/// Gaps of one tag in its window from its runs (`gap_runs`), with causes.
fn tag_gaps(
    s: &SeriesInfo,
    window: GapWindow,
    runs: &[Vec<(i64, i64)>; 3],
    losses: &[LossRange],
) -> Vec<Gap> {
    let iv = s.interval_ms as i64;
    let GapWindow { start, to, tol } = window;
    let (data, bad) = (&runs[0], &runs[1]);
    let mut holes = Vec::new();
    let mut cursor = start;
    for &(a, b) in data {
        if a - cursor > tol {
            holes.push((cursor, a));
        }
        cursor = cursor.max(b + iv);
    }
    if to - cursor > tol {
        holes.push((cursor, to));
    }
    let gap = |a: i64, b: i64, cause: &'static str| Gap {
        start_ms: a,
        end_ms: b,
        duration_ms: b - a,
        cause,
        tags: 1,
    };
    let mut out: Vec<Gap> = Vec::new();
    for (a, b) in holes {
        // The first Bad sample in the hole.
        let first_bad = bad
            .iter()
            .filter(|&&(x, y)| y >= a && x < b)
            .map(|&(x, _)| x.max(a))
            .min();
        let fault_from = match first_bad {
            Some(x) if x - a <= fault_lead_in(iv) => a,
            Some(x) => x,
            None => b,
        };
        if fault_from > a {
            let cause = loss_cause(losses, a, fault_from).unwrap_or("no_data");
            out.push(gap(a, fault_from, cause));
        }
        if fault_from < b {
            out.push(gap(fault_from, b, "device_fault"));
        }
    }
    for &(a, b) in &runs[2] {
        out.push(Gap {
            start_ms: a,
            end_ms: b + iv,
            duration_ms: b + iv - a,
            cause: "gateway_offline_backfilled",
            tags: 1,
        });
    }
    out
}

/// Joins the gaps of a device's tags: same cause and overlapping → one row.
fn merge_gaps(mut gaps: Vec<Gap>) -> Vec<Gap> {
    gaps.sort_by_key(|g| (g.cause, g.start_ms));
    let mut out: Vec<Gap> = Vec::new();
    for g in gaps {
        match out.last_mut() {
            Some(last) if last.cause == g.cause && g.start_ms <= last.end_ms => {
                last.end_ms = last.end_ms.max(g.end_ms);
                last.duration_ms = last.end_ms - last.start_ms;
                last.tags += 1;
            }
            _ => out.push(g),
        }
    }
    out.sort_by_key(|g| g.start_ms);
    out
}

fn percentile(hist: &[u64], q: f64) -> Option<i64> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil() as u64;
    let mut seen = 0;
    for (i, n) in hist.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(bucket_upper_ms(i));
        }
    }
    None
}

fn is_numeric(data_type: &str) -> bool {
    !matches!(data_type, "bool" | "string" | "unspecified")
}

/// Per-tag window facts read from the day rows.
#[derive(Default, Clone)]
struct TagWindow {
    day: SeriesDay,
    per_day: BTreeMap<i64, SeriesDay>,
}

/// Reads the rollups of a set of series for the window.
async fn tag_windows(
    store: &impl Store,
    series: &[&SeriesInfo],
    from_day: i64,
    to_day: i64,
) -> Result<HashMap<u64, TagWindow>> {
    let ids: Vec<u64> = series.iter().map(|s| s.id).collect();
    let mut out: HashMap<u64, TagWindow> = HashMap::new();
    for (id, day, row) in store.series_days(&ids, from_day, to_day).await? {
        let w = out.entry(id).or_default();
        rollup::merge_day(&mut w.day, &row);
        w.per_day.insert(day, row);
    }
    Ok(out)
}

/// Flags `identical_series` on tags of different devices whose value sets
/// nearly coincide. Candidates share one of their sketch's three smallest
/// hashes, so the check is not quadratic in the number of tags.
fn identical_pairs(
    series: &[&SeriesInfo],
    windows: &HashMap<u64, TagWindow>,
    threshold: f64,
) -> HashMap<u64, (String, String)> {
    let mut buckets: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, s) in series.iter().enumerate() {
        let Some(w) = windows.get(&s.id) else {
            continue;
        };
        if w.day.sketch.len() < SKETCH_K {
            continue; // too few distinct values to tell
        }
        for &h in w.day.sketch.iter().take(3) {
            buckets.entry(h).or_default().push(i);
        }
    }
    let mut hits = HashMap::new();
    let mut checked = BTreeSet::new();
    for members in buckets.values() {
        for (x, &i) in members.iter().enumerate() {
            for &j in &members[x + 1..] {
                let (a, b) = (series[i], series[j]);
                if (a.gateway == b.gateway && a.device == b.device)
                    || !checked.insert((i.min(j), i.max(j)))
                {
                    continue;
                }
                let sim = sketch_similarity(&windows[&a.id].day.sketch, &windows[&b.id].day.sketch);
                if sim >= threshold {
                    hits.insert(
                        a.id,
                        (
                            format!("{}/{}/{}", b.gateway, b.device, b.tag),
                            format!("{sim:.2}"),
                        ),
                    );
                    hits.insert(
                        b.id,
                        (
                            format!("{}/{}/{}", a.gateway, a.device, a.tag),
                            format!("{sim:.2}"),
                        ),
                    );
                }
            }
        }
    }
    hits
}

fn tag_flags(
    s: &SeriesInfo,
    w: &TagWindow,
    identical: Option<&(String, String)>,
    c: &Criteria,
) -> Vec<Flag> {
    let mut flags = Vec::new();
    let mut flag = |kind: FlagKind, detail: String, figures: Vec<String>| {
        flags.push(Flag {
            kind,
            critical: c.critical_flags.contains(&kind),
            tag: s.tag.clone(),
            detail,
            figures,
        })
    };
    let d = &w.day;
    if is_numeric(&s.data_type)
        && d.good + d.uncertain > 1
        && d.max_unchanged_ms as u128 >= c.frozen_after.as_millis()
    {
        flag(
            FlagKind::Frozen,
            format!("value unchanged for {} s", d.max_unchanged_ms / 1000),
            vec![(d.max_unchanged_ms / 1000).to_string()],
        );
    }
    if let Some((other, sim)) = identical {
        flag(
            FlagKind::IdenticalSeries,
            format!("same values as {other} (similarity {sim})"),
            vec![other.clone(), sim.clone()],
        );
    }
    if d.out_of_range > 0 {
        flag(
            FlagKind::OutOfRange,
            format!("{} samples outside the declared range", d.out_of_range),
            vec![d.out_of_range.to_string()],
        );
    }
    if d.deltas >= 100 && d.deltas_exact as f64 >= c.no_jitter_share * d.deltas as f64 {
        flag(
            FlagKind::NoJitter,
            format!(
                "{} of {} timestamp steps are exact multiples of the interval",
                d.deltas_exact, d.deltas
            ),
            vec![d.deltas_exact.to_string(), d.deltas.to_string()],
        );
    }
    if d.future > 0 {
        flag(
            FlagKind::FutureTimestamps,
            format!(
                "{} samples stamped more than 5 s after their receipt",
                d.future
            ),
            vec![d.future.to_string()],
        );
    }
    flags
}

/// The report of one enterprise for days `from_day..to_day` (UTC ms of
/// UTC+8 day starts, `to_day` exclusive).
pub async fn enterprise_report(
    store: &impl Store,
    snap: &Snapshot,
    enterprise: &Enterprise,
    from_day: i64,
    to_day: i64,
    c: &Criteria,
) -> Result<EnterpriseReport> {
    let index = Index::new(store, snap, std::slice::from_ref(&enterprise.code)).await?;
    report_with(store, snap, &index, enterprise, from_day, to_day, c, true).await
}

/// Lookups shared by the reports of many enterprises.
struct Index<'a> {
    owners: BTreeMap<String, String>,
    by_gateway: HashMap<&'a str, Vec<&'a SeriesInfo>>,
}

impl<'a> Index<'a> {
    /// For the enterprises `codes` only: their gateways, not every owner's.
    async fn new(store: &impl Store, snap: &'a Snapshot, codes: &[String]) -> Result<Index<'a>> {
        let mut by_gateway: HashMap<&str, Vec<&SeriesInfo>> = HashMap::new();
        for s in &snap.series {
            by_gateway.entry(s.gateway.as_str()).or_default().push(s);
        }
        Ok(Index {
            owners: store.gateways_of(codes).await?,
            by_gateway,
        })
    }
}

/// `detail`: also gaps and trends (the city view needs neither).
#[allow(clippy::too_many_arguments)]
async fn report_with(
    store: &impl Store,
    snap: &Snapshot,
    index: &Index<'_>,
    enterprise: &Enterprise,
    from_day: i64,
    to_day: i64,
    c: &Criteria,
    detail: bool,
) -> Result<EnterpriseReport> {
    let gateways: BTreeSet<&str> = index
        .owners
        .iter()
        .filter(|(_, code)| **code == enterprise.code)
        .map(|(g, _)| g.as_str())
        .collect();
    let register = store.equipment(&enterprise.code).await?;
    let series: Vec<&SeriesInfo> = gateways
        .iter()
        .filter_map(|g| index.by_gateway.get(g))
        .flatten()
        .copied()
        .collect();
    let windows = tag_windows(store, &series, from_day, to_day).await?;
    let identical = identical_pairs(&series, &windows, c.identical_similarity);
    let from_ms = from_day;
    let to_ms = to_day;
    let days: Vec<i64> = (0..)
        .map(|i| from_day + i * DAY_MS)
        .take_while(|d| *d < to_day)
        .collect();

    // Per-tag loss time ranges: (gateway, device, tag) -> ranges.
    type TagKey<'a> = (&'a str, &'a str, &'a str);
    let mut loss_ranges: HashMap<TagKey, Vec<LossRange>> = HashMap::new();
    for l in &snap.losses {
        let cause = loss_cause_of(&l.reason);
        for t in &l.tags {
            loss_ranges
                .entry((l.gateway.as_str(), t.device.as_str(), t.tag.as_str()))
                .or_default()
                .push((t.first_time_ms, t.last_time_ms, cause));
        }
    }

    let mut by_device: BTreeMap<(&str, &str), Vec<&SeriesInfo>> = BTreeMap::new();
    for s in &series {
        by_device
            .entry((s.gateway.as_str(), s.device.as_str()))
            .or_default()
            .push(s);
    }
    // Gaps and trends of every tag, read in two store calls.
    let (gap_runs, mut trend_hours) = if detail {
        let trended: Vec<u64> = series
            .iter()
            .filter(|s| !matches!(s.data_type.as_str(), "string" | "unspecified"))
            .map(|s| s.id)
            .collect();
        let hours = store
            .series_hours_of(trended.clone(), from_ms, to_ms)
            .await?;
        (
            gap_runs(store, &series, from_ms, to_ms, snap.now_ms).await?,
            trended.into_iter().zip(hours).collect(),
        )
    } else {
        (HashMap::new(), HashMap::new())
    };
    let verdict_from = to_day - c.verdict_days as i64 * DAY_MS;
    let empty = TagWindow::default();
    let mut devices = Vec::new();
    for ((gw, dev), tags) in &by_device {
        let mut d = DeviceReport {
            gateway: gw.to_string(),
            device: dev.to_string(),
            protocol: tags[0].protocol.clone(),
            identity: tags[0].identity.clone(),
            equipment: register
                .iter()
                .find(|e| e.gateway == *gw && e.device == *dev)
                .cloned(),
            expected: 0,
            received: 0,
            good: 0,
            uncertain: 0,
            bad: 0,
            backfilled: 0,
            completeness: None,
            first_seen_ms: None,
            last_seen_ms: None,
            daily: Vec::new(),
            gaps: Vec::new(),
            gaps_total: 0,
            flags: Vec::new(),
            verdict: Verdict {
                data_through: false,
                reasons: Vec::new(),
                why: Vec::new(),
            },
            tags: Vec::new(),
            trend: Vec::new(),
        };
        let mut daily: Vec<(u64, u64)> = vec![(0, 0); days.len()];
        let mut gaps = Vec::new();
        for s in tags {
            let w = windows.get(&s.id).unwrap_or(&empty);
            let expected = expected_in(s, from_ms, to_ms, snap.now_ms);
            let received = w.day.good + w.day.uncertain;
            d.expected += expected;
            d.received += received.min(expected.max(received));
            d.good += w.day.good;
            d.uncertain += w.day.uncertain;
            d.bad += w.day.bad;
            d.backfilled += w.day.backfilled;
            d.first_seen_ms = match (d.first_seen_ms, w.day.first_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            d.last_seen_ms = match (d.last_seen_ms, w.day.last_ms) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            for (i, day) in days.iter().enumerate() {
                let e = expected_in(s, *day, day + DAY_MS, snap.now_ms);
                let r = w.per_day.get(day).map_or(0, |r| r.good + r.uncertain);
                daily[i].0 += e;
                daily[i].1 += r.min(e);
            }
            let losses = loss_ranges
                .get(&(s.gateway.as_str(), s.device.as_str(), s.tag.as_str()))
                .map_or(&[][..], |v| v.as_slice());
            if let Some((window, runs)) = gap_runs.get(&s.id) {
                gaps.extend(tag_gaps(s, *window, runs, losses));
            }
            d.flags.extend(tag_flags(s, w, identical.get(&s.id), c));
            d.tags.push(TagReport {
                tag: s.tag.clone(),
                unit: s.unit.clone(),
                interval_ms: s.interval_ms,
                expected,
                received,
                bad: w.day.bad,
                completeness: ratio(received, expected),
                first_seen_ms: w.day.first_ms,
                last_seen_ms: w.day.last_ms,
            });
        }
        d.completeness = ratio(d.received, d.expected);
        d.daily = days
            .iter()
            .zip(&daily)
            .map(|(day, (e, r))| DayCell {
                day_ms: *day,
                date: date_of(*day),
                expected: *e,
                received: *r,
                completeness: ratio(*r, *e),
            })
            .collect();
        let merged = merge_gaps(gaps);
        d.gaps_total = merged.len();
        d.gaps = merged.into_iter().take(200).collect();
        // Trend: every tag with a number (bools as 0/1), hourly.
        for s in tags {
            let Some(hours) = trend_hours.remove(&s.id) else {
                continue;
            };
            let points = hours
                .into_iter()
                .map(|(h, n, sum, min, max)| (h, sum / n.max(1) as f64, min, max))
                .collect();
            d.trend.push(Trend {
                tag: s.tag.clone(),
                unit: s.unit.clone(),
                points,
            });
        }
        let mut why = Vec::new();
        let period: Vec<&DayCell> = d
            .daily
            .iter()
            .filter(|c| c.day_ms >= verdict_from && c.expected > 0)
            .collect();
        if period.is_empty() {
            why.push(Reason::NoDataExpected);
        }
        for cell in &period {
            let got = cell.completeness.unwrap_or(0.0);
            if got < c.completeness_min {
                why.push(Reason::LowCompleteness {
                    date: cell.date.clone(),
                    completeness: got,
                    min: c.completeness_min,
                });
            }
        }
        for (i, f) in d.flags.iter().enumerate() {
            if f.critical {
                why.push(Reason::CriticalFlag(i));
            }
        }
        d.verdict = Verdict {
            data_through: why.is_empty(),
            reasons: why.iter().map(|r| r.english(&d.flags)).collect(),
            why,
        };
        devices.push(d);
    }

    let networking = networking(&register, &devices, &gateways);

    let mut gateway_reports = Vec::new();
    let mut usage: BTreeMap<i64, UsageDay> = days
        .iter()
        .map(|&day| {
            (
                day,
                UsageDay {
                    day_ms: day,
                    date: date_of(day),
                    ..UsageDay::default()
                },
            )
        })
        .collect();
    for gw in &gateways {
        let rows = store.gateway_days(gw, from_day, to_day).await?;
        let mut hist = vec![0u64; LATENCY_BUCKETS];
        let mut total = GatewayDay::default();
        let mut skew_min: Option<i64> = None;
        for (day, row) in &rows {
            for (i, n) in row.latency.iter().enumerate() {
                hist[i] += n;
            }
            total.batches += row.batches;
            total.points += row.points;
            total.bytes += row.bytes;
            total.backfill_points += row.backfill_points;
            if let Some(m) = row.skew_min_ms {
                skew_min = Some(skew_min.map_or(m, |x| x.min(m)));
            }
            if let Some(u) = usage.get_mut(day) {
                u.points += row.points;
                u.bytes += row.bytes;
                u.batches += row.batches;
            }
        }
        gateway_reports.push(GatewayReport {
            gateway: gw.to_string(),
            batches: total.batches,
            points: total.points,
            bytes: total.bytes,
            backfill_share: if total.points > 0 {
                total.backfill_points as f64 / total.points as f64
            } else {
                0.0
            },
            latency_p50_ms: percentile(&hist, 0.50),
            latency_p95_ms: percentile(&hist, 0.95),
            clock_offset_ms: skew_min.map(|m| -m),
            chains: snap
                .chains
                .iter()
                .filter(|c| c.gateway == *gw)
                .cloned()
                .collect(),
        });
    }
    for s in &series {
        let Some(w) = windows.get(&s.id) else {
            continue;
        };
        for (day, row) in &w.per_day {
            if row.samples() > 0
                && let Some(u) = usage.get_mut(day)
            {
                u.active_tags += 1;
            }
        }
    }
    for d in &devices {
        for cell in &d.daily {
            if cell.received > 0
                && let Some(u) = usage.get_mut(&cell.day_ms)
            {
                u.active_devices += 1;
            }
        }
    }
    let mut active_days = BTreeMap::new();
    for u in usage.values_mut() {
        u.active = u.active_devices > 0;
        let month = u.date[..7].to_string();
        *active_days.entry(month).or_insert(0) += u.active as u64;
    }
    let industry_name = c
        .industries
        .iter()
        .find(|i| i.key == enterprise.industry)
        .map_or(enterprise.industry.clone(), |i| i.name_zh.clone());
    Ok(EnterpriseReport {
        enterprise: enterprise.clone(),
        industry_name,
        from_day_ms: from_day,
        to_day_ms: to_day,
        from: date_of(from_day),
        to: date_of(to_day - DAY_MS),
        generated_at_ms: snap.now_ms,
        criteria: c.clone(),
        networking,
        devices,
        gateways: gateway_reports,
        usage: usage.into_values().collect(),
        active_days,
    })
}

pub fn flag_name(k: FlagKind) -> &'static str {
    match k {
        FlagKind::Frozen => "frozen",
        FlagKind::IdenticalSeries => "identical_series",
        FlagKind::OutOfRange => "out_of_range",
        FlagKind::NoJitter => "no_jitter",
        FlagKind::FutureTimestamps => "future_timestamps",
    }
}

fn networking(
    register: &[Equipment],
    devices: &[DeviceReport],
    gateways: &BTreeSet<&str>,
) -> Networking {
    let mut equipment = Vec::new();
    let mut through = 0;
    let production: Vec<&Equipment> = register.iter().filter(|e| e.production).collect();
    // Non-production entries are listed with their state too; only
    // production ones count in the rate.
    for e in register {
        let device = devices
            .iter()
            .find(|d| d.gateway == e.gateway && d.device == e.device);
        let (why, flags) = if e.gateway.is_empty() {
            (vec![Reason::NoGatewayNamed], Vec::new())
        } else if !gateways.contains(e.gateway.as_str()) {
            (vec![Reason::GatewayNotOwned(e.gateway.clone())], Vec::new())
        } else {
            match device {
                None => (vec![Reason::NeverConnected], Vec::new()),
                Some(d) if d.verdict.data_through => (vec![Reason::DataThrough], Vec::new()),
                Some(d) => (d.verdict.why.clone(), d.flags.clone()),
            }
        };
        let data_through = why == [Reason::DataThrough];
        through += (data_through && e.production) as u64;
        equipment.push(EquipmentStatus {
            equipment: e.clone(),
            data_through,
            reason: why
                .iter()
                .map(|r| r.english(&flags))
                .collect::<Vec<_>>()
                .join("; "),
            why,
            flags,
        });
    }
    let unregistered_devices = devices
        .iter()
        .filter(|d| {
            !register
                .iter()
                .any(|e| e.gateway == d.gateway && e.device == d.device)
        })
        .map(|d| format!("{}/{}", d.gateway, d.device))
        .collect();
    Networking {
        registered_production: production.len() as u64,
        data_through: through,
        rate: ratio(through, production.len() as u64),
        equipment,
        unregistered_devices,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CityRow {
    pub code: String,
    pub name: String,
    pub county: String,
    pub industry: String,
    pub provider: String,
    pub registered_production: u64,
    pub data_through: u64,
    pub networking_rate: Option<f64>,
    /// Data from at least one device on the window's last day.
    pub on_cloud: bool,
    pub meets_target: bool,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct CityGroup {
    pub key: String,
    pub name: String,
    pub enterprises: u64,
    pub on_cloud: u64,
    pub meets_target: u64,
    pub mean_rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CityView {
    pub from: String,
    pub to: String,
    pub target: f64,
    pub enterprises: u64,
    pub on_cloud: u64,
    pub meets_target: u64,
    /// Enterprises by networking rate: [0,20%), [20,40%), … [80,100%], none.
    pub distribution: [u64; 6],
    pub by_industry: Vec<CityGroup>,
    pub by_county: Vec<CityGroup>,
    pub rows: Vec<CityRow>,
}

/// The city overview over `enterprises` (already filtered to what the
/// reader may see).
pub async fn city_view(
    store: &impl Store,
    snap: &Snapshot,
    enterprises: &[Enterprise],
    from_day: i64,
    to_day: i64,
    c: &Criteria,
) -> Result<CityView> {
    let mut rows = Vec::new();
    let codes: Vec<String> = enterprises.iter().map(|e| e.code.clone()).collect();
    let index = Index::new(store, snap, &codes).await?;
    for e in enterprises {
        let r = report_with(store, snap, &index, e, from_day, to_day, c, false).await?;
        let on_cloud = r.usage.last().is_some_and(|u| u.active);
        rows.push(CityRow {
            code: e.code.clone(),
            name: e.name.clone(),
            county: e.county.clone(),
            industry: e.industry.clone(),
            provider: e.provider.clone(),
            registered_production: r.networking.registered_production,
            data_through: r.networking.data_through,
            networking_rate: r.networking.rate,
            on_cloud,
            meets_target: r.networking.rate.is_some_and(|x| x >= c.networking_target),
        });
    }
    let mut distribution = [0u64; 6];
    for r in &rows {
        let i = match r.networking_rate {
            None => 5,
            Some(x) => ((x * 5.0) as usize).min(4),
        };
        distribution[i] += 1;
    }
    let group = |key_of: &dyn Fn(&CityRow) -> String, name_of: &dyn Fn(&str) -> String| {
        let mut groups: BTreeMap<String, (CityGroup, f64, u64)> = BTreeMap::new();
        for r in &rows {
            let k = key_of(r);
            let g = groups.entry(k.clone()).or_insert_with(|| {
                (
                    CityGroup {
                        name: name_of(&k),
                        key: k,
                        ..CityGroup::default()
                    },
                    0.0,
                    0,
                )
            });
            g.0.enterprises += 1;
            g.0.on_cloud += r.on_cloud as u64;
            g.0.meets_target += r.meets_target as u64;
            if let Some(x) = r.networking_rate {
                g.1 += x;
                g.2 += 1;
            }
        }
        groups
            .into_values()
            .map(|(mut g, sum, n)| {
                g.mean_rate = (n > 0).then(|| sum / n as f64);
                g
            })
            .collect::<Vec<_>>()
    };
    let industry_name = |k: &str| {
        c.industries
            .iter()
            .find(|i| i.key == k)
            .map_or(k.to_string(), |i| i.name_zh.clone())
    };
    let by_industry = group(&|r| r.industry.clone(), &industry_name);
    let by_county = group(&|r| r.county.clone(), &|k| k.to_string());
    Ok(CityView {
        from: date_of(from_day),
        to: date_of(to_day - DAY_MS),
        target: c.networking_target,
        enterprises: rows.len() as u64,
        on_cloud: rows.iter().filter(|r| r.on_cloud).count() as u64,
        meets_target: rows.iter().filter(|r| r.meets_target).count() as u64,
        distribution,
        by_industry,
        by_county,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_takes_the_cause_of_the_loss_records_covering_most_of_it() {
        assert_eq!(
            loss_cause_of("dropped by the gateway: storage_error"),
            "storage_error"
        );
        assert_eq!(
            loss_cause_of("dropped by the gateway: corrupted"),
            "storage_corrupted"
        );
        assert_eq!(
            loss_cause_of("dropped by the gateway: buffer_full"),
            "dropped_by_gateway"
        );
        let losses = [(0, 30, "dropped_by_gateway"), (30, 100, "storage_error")];
        assert_eq!(loss_cause(&losses, 0, 100), Some("storage_error"));
        assert_eq!(loss_cause(&losses, 0, 40), Some("dropped_by_gateway"));
        assert_eq!(
            loss_cause(&losses[..1], 0, 100),
            None,
            "covers less than half"
        );
        assert_eq!(loss_cause(&[], 0, 100), None);
    }

    #[test]
    fn dates_round_trip_in_china_standard_time() {
        let d = parse_date("2025-11-25").expect("valid");
        assert_eq!(date_of(d), "2025-11-25");
        // 2025-11-25 00:00 +08:00 = 2025-11-24 16:00 UTC = 1764000000000.
        assert_eq!(d, 1_764_000_000_000);
        assert_eq!(date_of(d + DAY_MS - 1), "2025-11-25");
        assert!(parse_date("2026-02-30").is_err());
        assert!(parse_date("25.11.2026").is_err());
    }

    #[test]
    fn gaps_of_a_device_merge_across_tags() {
        let g = |a, b, cause| Gap {
            start_ms: a,
            end_ms: b,
            duration_ms: b - a,
            cause,
            tags: 1,
        };
        let merged = merge_gaps(vec![
            g(100, 200, "no_data"),
            g(105, 210, "no_data"),
            g(150, 160, "device_fault"),
            g(500, 600, "no_data"),
        ]);
        assert_eq!(merged.len(), 3);
        assert_eq!(
            (merged[0].start_ms, merged[0].end_ms, merged[0].tags),
            (100, 210, 2)
        );
    }

    fn series(id: u64) -> SeriesInfo {
        SeriesInfo {
            id,
            gateway: "gw".into(),
            device: "d".into(),
            protocol: "modbus-tcp".into(),
            endpoint: String::new(),
            tag: "t".into(),
            address: String::new(),
            data_type: "double".into(),
            unit: String::new(),
            interval_ms: 1000,
            identity: BTreeMap::new(),
            created_ms: Some(0),
            samples: 0,
            good: 0,
            uncertain: 0,
            bad: 0,
            backfilled: 0,
            first_seen_ms: None,
            last_seen_ms: None,
            last_value: None,
            last_quality: None,
            last_quality_code: 0,
        }
    }

    /// Gaps of `s` in `[from, to)` read as a report reads them.
    async fn gaps_of(
        store: &impl Store,
        s: &SeriesInfo,
        from: i64,
        to: i64,
        now_ms: i64,
        losses: &[LossRange],
    ) -> Result<Vec<Gap>> {
        let runs = gap_runs(store, &[s], from, to, now_ms).await?;
        Ok(runs
            .get(&s.id)
            .map(|(window, runs)| tag_gaps(s, *window, runs, losses))
            .unwrap_or_default())
    }

    #[tokio::test]
    async fn gap_causes_come_from_bad_runs_loss_records_or_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::embedded::EmbeddedStore::open(dir.path()).expect("store");
        // Data 0–100 s, 120–200 s, 230–300 s, 340–400 s; Bad samples 101–119 s;
        // the gateway dropped 201–229 s; nothing explains 301–339 s.
        let runs = vec![
            (1, RUN_DATA, 0, 100_000),
            (1, RUN_DATA, 120_000, 200_000),
            (1, RUN_DATA, 230_000, 300_000),
            (1, RUN_DATA, 340_000, 400_000),
            (1, RUN_BAD, 101_000, 119_000),
            (1, RUN_BACKFILL, 150_000, 160_000),
        ];
        store
            .bench_put_rollups(Vec::new(), runs, Vec::new(), Vec::new())
            .expect("write");
        let gaps = gaps_of(
            &store,
            &series(1),
            0,
            401_000,
            1_000_000,
            &[(201_000, 229_000, "dropped_by_gateway")],
        )
        .await
        .expect("gaps");
        let got: Vec<(i64, i64, &str)> = gaps
            .iter()
            .map(|g| (g.start_ms, g.end_ms, g.cause))
            .collect();
        assert_eq!(
            got,
            vec![
                (101_000, 120_000, "device_fault"),
                (201_000, 230_000, "dropped_by_gateway"),
                (301_000, 340_000, "no_data"),
                (150_000, 161_000, "gateway_offline_backfilled"),
            ]
        );
        // The window end is clipped to now less two intervals.
        let gaps = gaps_of(&store, &series(1), 0, 500_000, 450_000, &[])
            .await
            .expect("gaps");
        assert_eq!(
            gaps.iter()
                .filter(|g| g.cause == "no_data")
                .map(|g| g.end_ms)
                .max(),
            Some(448_000)
        );
    }

    /// Gaps of series 1 (interval 1 s) in `[0, to)` from `runs`, long after.
    fn gap_causes(
        runs: Vec<(u64, u8, i64, i64)>,
        to: i64,
        losses: &[LossRange],
    ) -> Vec<(i64, i64, &'static str)> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::embedded::EmbeddedStore::open(dir.path()).expect("store");
        store
            .bench_put_rollups(Vec::new(), runs, Vec::new(), Vec::new())
            .expect("write");
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(gaps_of(&store, &series(1), 0, to, 1_000_000, losses))
            .expect("gaps")
            .iter()
            .map(|g| (g.start_ms, g.end_ms, g.cause))
            .collect()
    }

    #[test]
    fn bad_samples_far_apart_make_a_device_fault_until_the_next_good_one() {
        // Interval 1 s. Bad samples 20-45 s apart (each its own run) between
        // data at 100 s and 200 s; a first Bad sample 59 s into the next gap.
        let runs = vec![
            (1, RUN_DATA, 0, 100_000),
            (1, RUN_BAD, 110_000, 110_000),
            (1, RUN_BAD, 150_000, 150_000),
            (1, RUN_BAD, 195_000, 195_000),
            (1, RUN_DATA, 200_000, 500_000),
            (1, RUN_BAD, 560_000, 560_000),
            (1, RUN_DATA, 600_000, 700_000),
        ];
        assert_eq!(
            gap_causes(runs, 701_000, &[]),
            vec![
                (101_000, 200_000, "device_fault"),
                (501_000, 560_000, "no_data"),
                (560_000, 600_000, "device_fault"),
            ]
        );
    }

    #[test]
    fn percentiles_from_the_latency_histogram() {
        let mut h = vec![0u64; LATENCY_BUCKETS];
        h[5] = 50; // < 32 ms
        h[10] = 45; // < 1024 ms
        h[12] = 5; // < 4096 ms
        assert_eq!(percentile(&h, 0.5), Some(32));
        assert_eq!(percentile(&h, 0.95), Some(1024));
        assert_eq!(percentile(&h, 0.96), Some(4096));
        assert_eq!(percentile(&[0; 4], 0.5), None);
    }
}
