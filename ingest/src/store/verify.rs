//! `verify-chain`, whatever the backend: every stored chain re-verified from
//! its signed bytes, each signed batch compared with the points the query
//! tables serve for it, and every rollup compared with the stored points.
//!
//! A backend reads one consistent snapshot and feeds it here: every stored
//! point (`Recount::add`), the rollup rows (`Rolled`), the manifests and
//! refusals, then the signed links in (gateway, buffer, seq) order (`walk`).
//! What is checked, and what a disagreement says, is decided only here.
//!
//! A store whose retention dropped points before a horizon (PostgreSQL,
//! `--retention`) says so (`Recount::new`): points before it are left out of
//! every comparison, the series totals are checked against the day rollups
//! of the dropped days plus the points kept, and the per-gateway days of
//! receipt may count more than is left.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use guantong_proto::chain::{self as proto_chain, PublicKey};
use guantong_proto::v1::{Batch, Manifest, Point};
use prost::Message;

use super::chain::{self, ChainState};
use super::records::{SeriesMeta, SignedLink, stored_algorithm};
use super::rollup;
use super::{ChainVerification, Result, StoreVerification};
use crate::evidence::points::{PointsDigest, quality_byte};

const MINUTE_MS: i64 = 60_000;

/// Counts by quality and backfilled.
#[derive(Default, PartialEq, Debug, Clone, Copy)]
pub(crate) struct Counts {
    pub good: u64,
    pub uncertain: u64,
    pub bad: u64,
    pub backfilled: u64,
}

impl Counts {
    pub fn of_day(d: &rollup::SeriesDay) -> Counts {
        Counts {
            good: d.good,
            uncertain: d.uncertain,
            bad: d.bad,
            backfilled: d.backfilled,
        }
    }

    pub fn of_state(s: &super::records::SeriesState) -> Counts {
        Counts {
            good: s.good,
            uncertain: s.uncertain,
            bad: s.bad,
            backfilled: s.backfilled,
        }
    }

    fn add(&mut self, p: &Point, backfill: bool) {
        match quality_byte(p) {
            0 => self.good += 1,
            1 => self.uncertain += 1,
            _ => self.bad += 1,
        }
        if backfill {
            self.backfilled += 1;
        }
    }
}

/// What the rollups and counters of a store say, as read by its backend.
#[derive(Default)]
pub(crate) struct Rolled {
    /// (series, minute) -> (good, uncertain, bad)
    pub minutes: BTreeMap<(u64, i64), (u64, u64, u64)>,
    /// (series, day) -> the day rollup's counts
    pub days: BTreeMap<(u64, i64), Counts>,
    /// (series, hour) -> (count, min, max) of Good numbers
    pub hours: BTreeMap<(u64, i64), (u64, f64, f64)>,
    /// series -> its totals
    pub totals: BTreeMap<u64, Counts>,
    /// (gateway, day of receipt) -> points
    pub gateway_days: BTreeMap<(String, i64), u64>,
    /// series -> its data runs, start -> end
    pub data_runs: HashMap<u64, BTreeMap<i64, i64>>,
    /// (gateway, version) -> the stored manifest (None: does not decode)
    pub manifests: HashMap<(String, u64), Option<Manifest>>,
    /// Batches ingest refused: (gateway, buffer, seq)
    pub rejected: BTreeSet<(String, u64, u64)>,
}

/// What the stored points say, point by point.
pub(crate) struct Recount {
    names: HashMap<u64, SeriesMeta>,
    /// Points with an earlier source time were dropped by retention.
    points_from: Option<i64>,
    /// (gateway, buffer, seq) -> the points served for that batch.
    served: HashMap<(String, u64, u64), PointsDigest>,
    /// Gateways with points stored before they named their batch.
    unattributed: BTreeSet<String>,
    minutes: BTreeMap<(u64, i64), (u64, u64, u64)>,
    minute_batches: HashMap<(u64, i64), BTreeSet<(u64, u64)>>,
    days: BTreeMap<(u64, i64), Counts>,
    totals: BTreeMap<u64, Counts>,
    hours: BTreeMap<(u64, i64), (u64, f64, f64)>,
    gateway_days: BTreeMap<(String, i64), u64>,
    /// series -> times of its points that are not Bad
    data_times: HashMap<u64, Vec<i64>>,
}

impl Recount {
    /// `names`: every series' metadata; `points_from`: the retention
    /// horizon, when points before it were dropped.
    pub fn new(names: HashMap<u64, SeriesMeta>, points_from: Option<i64>) -> Recount {
        Recount {
            names,
            points_from,
            served: HashMap::new(),
            unattributed: BTreeSet::new(),
            minutes: BTreeMap::new(),
            minute_batches: HashMap::new(),
            days: BTreeMap::new(),
            totals: BTreeMap::new(),
            hours: BTreeMap::new(),
            gateway_days: BTreeMap::new(),
            data_times: HashMap::new(),
        }
    }

    /// One stored point of `series` (`p.time_offset_ms` absolute), of batch
    /// (buffer, seq) (seq 0: stored before points named their batch).
    pub fn add(
        &mut self,
        series: u64,
        p: &Point,
        backfill: bool,
        received_at_ms: i64,
        buffer_id: u64,
        seq: u64,
    ) {
        let t = p.time_offset_ms;
        if self.dropped(t) {
            return; // a late point in a partition retention drops next
        }
        let (gateway, device, tag) = self
            .names
            .get(&series)
            .map(|m| (m.gateway.as_str(), m.device.as_str(), m.tag.as_str()))
            .unwrap_or(("", "", ""));
        if seq == 0 {
            self.unattributed.insert(gateway.to_string());
        }
        self.served
            .entry((gateway.to_string(), buffer_id, seq))
            .or_default()
            .add(device, tag, t, p);
        *self
            .gateway_days
            .entry((gateway.to_string(), rollup::day_of(received_at_ms)))
            .or_default() += 1;
        let minute = t.div_euclid(MINUTE_MS) * MINUTE_MS;
        let q = quality_byte(p);
        let c = self.minutes.entry((series, minute)).or_default();
        match q {
            0 => c.0 += 1,
            1 => c.1 += 1,
            _ => c.2 += 1,
        }
        self.minute_batches
            .entry((series, minute))
            .or_default()
            .insert((buffer_id, seq));
        self.days
            .entry((series, rollup::day_of(t)))
            .or_default()
            .add(p, backfill);
        self.totals.entry(series).or_default().add(p, backfill);
        if q != 2 {
            self.data_times.entry(series).or_default().push(t);
        }
        if q == 0
            && let Some(x) = rollup::value_f64(&p.value)
        {
            let h = self
                .hours
                .entry((series, rollup::hour_of(t)))
                .or_insert((0, x, x));
            h.0 += 1;
            h.1 = h.1.min(x);
            h.2 = h.2.max(x);
        }
    }

    /// Whether retention dropped (or drops) the points of source time `t`.
    fn dropped(&self, t: i64) -> bool {
        self.points_from.is_some_and(|from| t < from)
    }

    fn name(&self, series: u64) -> String {
        self.names.get(&series).map_or_else(
            || format!("series {series}"),
            |m| format!("gateway {} series {}/{}", m.gateway, m.device, m.tag),
        )
    }

    /// Every disagreement of the rollups with the stored points, one line each.
    fn cross_check(&self, rolled: &Rolled) -> Vec<String> {
        let mut problems = Vec::new();
        let keys: BTreeSet<(u64, i64)> = rolled
            .minutes
            .keys()
            .chain(self.minutes.keys())
            .copied()
            .collect();
        for key in keys.into_iter().filter(|k| !self.dropped(k.1)) {
            let a = rolled.minutes.get(&key).copied().unwrap_or_default();
            let b = self.minutes.get(&key).copied().unwrap_or_default();
            if a != b {
                let batches: Vec<String> = self
                    .minute_batches
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .map(|(buffer, seq)| format!("{buffer:016x}/{seq}"))
                    .collect();
                problems.push(format!(
                    "{} minute {}: the minute counters say good/uncertain/bad {}/{}/{} but the stored points are {}/{}/{} (batches {})",
                    self.name(key.0),
                    crate::http::rfc3339(key.1),
                    a.0, a.1, a.2, b.0, b.1, b.2,
                    batches.join(", ")
                ));
            }
        }
        let keys: BTreeSet<(u64, i64)> = rolled
            .days
            .keys()
            .chain(self.days.keys())
            .copied()
            .collect();
        for key in keys.into_iter().filter(|k| !self.dropped(k.1)) {
            let r = rolled.days.get(&key).copied().unwrap_or_default();
            let s = self.days.get(&key).copied().unwrap_or_default();
            if r != s {
                problems.push(format!(
                    "{} day {}: the day rollup says {r:?} but the stored points are {s:?}",
                    self.name(key.0),
                    crate::http::rfc3339(key.1),
                ));
            }
        }
        let keys: BTreeSet<_> = rolled
            .hours
            .keys()
            .chain(self.hours.keys())
            .copied()
            .collect();
        for key in keys.into_iter().filter(|k| !self.dropped(k.1)) {
            let (r, s) = (rolled.hours.get(&key), self.hours.get(&key));
            if r != s {
                problems.push(format!(
                    "{} hour {}: the hour rollup says (count, min, max) {r:?} but the stored points give {s:?}",
                    self.name(key.0),
                    crate::http::rfc3339(key.1),
                ));
            }
        }
        let mut totals = self.totals.clone();
        // Dropped days count as their day rollups say.
        for (&(series, day), counts) in &rolled.days {
            if self.dropped(day) {
                let t = totals.entry(series).or_default();
                t.good += counts.good;
                t.uncertain += counts.uncertain;
                t.bad += counts.bad;
                t.backfilled += counts.backfilled;
            }
        }
        for (&series, stated) in &rolled.totals {
            let stored = totals.remove(&series).unwrap_or_default();
            if *stated != stored {
                problems.push(format!(
                    "{}: the series totals say {stated:?} but the stored points are {stored:?}",
                    self.name(series)
                ));
            }
        }
        for (series, stored) in totals {
            problems.push(format!(
                "{}: {stored:?} stored points but no series totals",
                self.name(series)
            ));
        }
        let keys: BTreeSet<_> = rolled
            .gateway_days
            .keys()
            .chain(self.gateway_days.keys())
            .cloned()
            .collect();
        for key in keys {
            // A batch without points leaves a row counting 0: the same as none.
            let r = rolled.gateway_days.get(&key).copied().unwrap_or(0);
            let s = self.gateway_days.get(&key).copied().unwrap_or(0);
            // Retention may have dropped points received that day.
            let agrees = if self.points_from.is_some() {
                s <= r
            } else {
                r == s
            };
            if !agrees {
                problems.push(format!(
                    "gateway {} day of receipt {}: the gateway day rollup counts {r} points but {s} are stored",
                    key.0,
                    crate::http::rfc3339(key.1),
                ));
            }
        }
        let no_runs = BTreeMap::new();
        for (series, times) in &self.data_times {
            let runs = rolled.data_runs.get(series).unwrap_or(&no_runs);
            // Usually the latest run starting before t; a backfill may have
            // left a longer run further back, so look at all on a miss.
            let outside = times
                .iter()
                .filter(|&&t| !runs.range(..=t).rev().any(|(_, &end)| end >= t))
                .count();
            if outside > 0 {
                problems.push(format!(
                    "{}: {outside} stored points lie outside every data run",
                    self.name(*series)
                ));
            }
        }
        problems
    }
}

/// The signed batches and what the query tables serve, compared batch by batch.
struct QueryTables {
    points_from: Option<i64>,
    served: HashMap<(String, u64, u64), PointsDigest>,
    unattributed: BTreeSet<String>,
    manifests: HashMap<(String, u64), Option<Manifest>>,
    rejected: BTreeSet<(String, u64, u64)>,
}

impl QueryTables {
    /// Compares a signed batch with the points served for it; the reason
    /// when they differ.
    fn compare(&mut self, gateway: &str, batch: &Batch) -> Option<String> {
        if batch.loss.is_some() {
            return None;
        }
        let key = (gateway.to_string(), batch.manifest_version);
        let served = self
            .served
            .remove(&(gateway.to_string(), batch.buffer_id, batch.seq))
            .unwrap_or_default();
        if self
            .rejected
            .contains(&(gateway.to_string(), batch.buffer_id, batch.seq))
        {
            return (served.count > 0).then(|| {
                format!(
                    "ingest refused this batch but serves {} points for it",
                    served.count
                )
            });
        }
        let Some(Some(manifest)) = self.manifests.get(&key) else {
            return Some(format!(
                "manifest {:016x} is not stored: the signed points cannot be named",
                batch.manifest_version
            ));
        };
        if !batch.manifest_sha256.is_empty()
            && proto_chain::manifest_hash(manifest).as_slice() != batch.manifest_sha256.as_slice()
        {
            return Some(format!(
                "the stored manifest {:016x} is not the one this manifest link signed",
                batch.manifest_version
            ));
        }
        let mut signed = PointsDigest::default();
        for p in &batch.points {
            let t = manifest.tags.get(p.tag as usize);
            let device = t
                .and_then(|t| manifest.devices.get(t.device as usize))
                .map_or("", |d| d.id.as_str());
            let time = batch.base_time_ms.saturating_add(p.time_offset_ms);
            if self.points_from.is_some_and(|from| time < from) {
                continue; // dropped by retention
            }
            signed.add(device, t.map_or("", |t| t.name.as_str()), time, p);
        }
        if signed == served || (served.count == 0 && self.unattributed.contains(gateway)) {
            return None;
        }
        Some(format!(
            "the points the query tables serve for this batch differ from the signed batch ({} signed, {} served)",
            signed.count, served.count
        ))
    }

    /// Points served under a batch of a signed stream that is not stored as
    /// signed: (gateway, buffer, seq, points).
    fn unsigned_in(&self, streams: &BTreeSet<(String, u64)>) -> Vec<(String, u64, u64, u64)> {
        let mut out: Vec<_> = self
            .served
            .iter()
            .filter(|((g, b, s), _)| *s != 0 && streams.contains(&(g.clone(), *b)))
            .map(|((g, b, s), d)| (g.clone(), *b, *s, d.count))
            .collect();
        out.sort();
        out
    }
}

/// One stored link as the backend read it: (gateway, buffer, seq) and its
/// bytes decoded, or why they do not decode.
pub(crate) type StoredLink = (String, u64, u64, std::result::Result<SignedLink, String>);

/// Re-verifies every stored chain from its links, given in (gateway,
/// buffer, seq) order, as an auditor would: recomputes each link hash,
/// checks each signature with the gateway's bound key (`key_of`), each
/// batch's own numbers and each link's predecessor, compares each signed
/// batch with the points served for it, and every rollup with the points.
pub(crate) fn walk(
    recount: Recount,
    rolled: Rolled,
    links: impl IntoIterator<Item = Result<StoredLink>>,
    mut key_of: impl FnMut(&str) -> Result<Option<PublicKey>>,
) -> Result<StoreVerification> {
    let problems = recount.cross_check(&rolled);
    let mut query = QueryTables {
        points_from: recount.points_from,
        served: recount.served,
        unattributed: recount.unattributed,
        manifests: rolled.manifests,
        rejected: rolled.rejected,
    };
    let mut out: Vec<ChainVerification> = Vec::new();
    let mut key: Option<PublicKey> = None;
    // The walker's state of the stream (`chain::step`, as online);
    // `known`: whether it holds the hash the next link must name.
    let mut st = ChainState::default();
    let mut known = true;
    for entry in links {
        let (gateway, buffer_id, seq, link) = entry?;
        let buffer_hex = format!("{buffer_id:016x}");
        let new_stream = out
            .last()
            .is_none_or(|c| c.gateway != gateway || c.buffer_id != buffer_hex);
        if new_stream {
            key = key_of(&gateway)?;
            // A stream starting after batch 1 is anchored there: the
            // walker says so.
            st = ChainState::default();
            known = true;
            out.push(ChainVerification {
                gateway: gateway.clone(),
                buffer_id: buffer_hex,
                first_seq: seq,
                last_seq: seq.saturating_sub(1),
                head_hash: String::new(),
                links: 0,
                breaks: Vec::new(),
            });
        }
        let Some(c) = out.last_mut() else { continue };
        let mut breaks = Vec::new();
        if seq != c.last_seq + 1 && !new_stream {
            breaks.push(format!(
                "links {}..={} are missing",
                c.last_seq + 1,
                seq - 1
            ));
            known = false;
        }
        let link = match link {
            Ok(l) => l,
            Err(e) => {
                c.breaks
                    .push((seq, format!("stored link does not decode: {e}")));
                continue;
            }
        };
        let algorithm = stored_algorithm(link.algorithm);
        let prev = proto_chain::to_hash(&link.prev_hash).unwrap_or([0; 32]);
        let hash = algorithm.link_hash(&prev, &link.payload);
        if let Some(k) = &key
            && k.algorithm != algorithm
        {
            breaks.push(format!(
                "signed with {algorithm} but the gateway's bound key is {}",
                k.algorithm
            ));
        }
        let batch = Batch::decode(link.payload.as_ref());
        match &batch {
            Ok(b) if b.seq != seq || b.buffer_id != buffer_id => breaks.push(format!(
                "stored under seq {seq} but the signed batch says seq {} of {:016x}",
                b.seq, b.buffer_id
            )),
            Ok(b) => breaks.extend(query.compare(&gateway, b)),
            Err(e) => breaks.push(format!("signed batch does not decode: {e}")),
        }
        let effective = batch
            .ok()
            .and_then(|b| b.loss)
            .and_then(|l| proto_chain::to_hash(&l.bridge_hash))
            .unwrap_or(hash);
        st.verified_through = seq.saturating_sub(1);
        if !known {
            st.head = Some(hex::encode(prev));
        }
        let head = chain::LinkHead {
            algorithm,
            prev_hash: link.prev_hash.to_vec(),
            effective_hash: effective.to_vec(),
            signature_checked: key.is_some(),
            signature_ok: chain::signature_ok(
                key.as_ref(),
                Some(algorithm),
                &hash,
                &link.signature,
            ),
            last_seq: link.last_seq.max(seq),
        };
        breaks.extend(chain::step(&mut st, &gateway, buffer_id, &head));
        known = true;
        c.last_seq = link.last_seq.max(seq);
        c.head_hash = hex::encode(effective);
        c.links += 1;
        c.breaks.extend(breaks.into_iter().map(|r| (seq, r)));
    }
    let streams = out
        .iter()
        .filter_map(|c| {
            Some((
                c.gateway.clone(),
                u64::from_str_radix(&c.buffer_id, 16).ok()?,
            ))
        })
        .collect();
    for (gateway, buffer_id, seq, points) in query.unsigned_in(&streams) {
        let id = format!("{buffer_id:016x}");
        if let Some(c) = out
            .iter_mut()
            .find(|c| c.gateway == gateway && c.buffer_id == id)
        {
            c.breaks.push((
                seq,
                format!("the query tables serve {points} points for this batch, which is not among the signed batches"),
            ));
        }
    }
    Ok(StoreVerification {
        chains: out,
        query_tables: problems,
    })
}
