//! A line: one connection and the units polled over it, one at a time.
//!
//! A Modbus TCP device is a line of one unit. Devices on one serial port, or
//! behind one serial device server (RTU over TCP), share a line: one task
//! owns the connection and sends strictly one request at a time, waiting the
//! inter-frame delay after every answer, so frames of two units never mix.
//!
//! Scheduling: every unit has poll groups (tags of the same interval), each
//! with its own plan and due time. The line polls the group that is due
//! first; a group that fell behind skips the missed ticks instead of bursting,
//! and a poll starts at least half an interval after the previous one of its
//! group ended (else a poll after a slow answer reads the same sample twice).
//!
//! Dead units: a unit that does not answer costs its timeout once; it is then
//! not polled, and its points are reported Bad with `BACKING_OFF` every poll
//! (no request sent). After `poll_interval × 2^(failures-1)` (at most
//! `max_backoff`) it is probed: one read of its first item, sent only in the
//! line's idle time, with a timeout shortened to the time until the next poll
//! of a live unit is due (at least `PROBE_MIN_TIMEOUT`, at most the unit's
//! `timeout`), so the live units keep their interval while a dead unit is
//! retried for ever. A line that is never idle that long gets its probe after
//! `max_backoff` more, costing `PROBE_MIN_TIMEOUT` at most. Retries are spent
//! only on units that answered their previous poll. One answer (even an
//! exception) ends the backoff. A unit slower to answer than the idle time
//! stays backed off, and its late answer may spoil the next read on the line
//! (Bad `MALFORMED` or `FRAME_ERROR` for that poll).
//!
//! Garbled frames: bytes that arrive without forming a valid frame (wrong
//! baud rate or parity, A/B swapped) are diagnosed once per line, in words an
//! installer acts on; the unit is backed off as if dead, with `FRAME_ERROR`.
//!
//! Requests per cycle: after each poll a line reports, per device, the
//! requests its latest poll of each group sent (retries and bisection
//! included), summed over groups, to the status page.
//!
//! Exceptions: a request that draws exception 2 or 3 is bisected (`plan::halve`)
//! until the refused tags stand alone; the answered halves stay merged in the
//! group's plan. A refused tag is reported Bad with its exception every poll
//! without being read, and read again every `max_backoff`: when the device
//! answers it (fixed on site), the group is planned afresh, so the tag rejoins
//! merged reads without a restart.
//!
//! Poll path: a unit keeps each tag as a 24-byte `TagReader` (names and
//! units are in the manifest) and numbers its samples `first_tag + index`;
//! an answer is matched once per request and, when every tag of the request
//! is a plain u16, copied into values without per-tag decoding.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use guantong_proto::v1::point::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::{ModbusConfig, Transport};
use super::decode::TagReader;
use super::plan::{self, ReadRequest};
use super::transport::{self, Connection, Outcome};
use crate::collector::{Collector, PointSink};
use crate::quality::{self, Sample, now_ms};
use crate::status::Status;

/// The shortest timeout a probe of a backed-off unit is given: a one-item
/// read and its answer take about 20 ms at 9600 baud, plus the device's
/// turnaround.
pub const PROBE_MIN_TIMEOUT: Duration = Duration::from_millis(100);

/// What an installer reads when a line delivers bytes but no valid frame.
pub const GARBLED_DIAGNOSIS: &str =
    "bytes arrive but no valid frame: check baud rate, parity, and A/B wiring";

/// One poll group of one unit.
#[derive(Debug)]
pub struct Group {
    pub interval: Duration,
    /// Shared so that a poll can walk it while the line is borrowed mutably.
    pub plan: Arc<Vec<ReadRequest>>,
    next: Instant,
    /// Requests its latest poll sent.
    requests: u32,
}

/// One device (unit id) on a line.
#[derive(Debug)]
pub struct Unit {
    /// The device's settings. Its `tags` are empty: `Unit::new` turns them
    /// into `readers` (names and units are in the manifest).
    pub config: ModbusConfig,
    /// How to decode each tag, in config order.
    pub readers: Vec<TagReader>,
    /// Manifest index of `readers[0]`; tag `i` is `first_tag + i`.
    pub first_tag: u32,
    pub groups: Vec<Group>,
    /// Consecutive polls and probes without an answer; above 0 the unit is
    /// backed off.
    failures: u32,
    /// When a backed-off unit is due for its probe.
    resume_at: Option<Instant>,
    /// Tags the device refuses on their own.
    refused: HashMap<usize, Refusal>,
}

/// A tag the device refused on its own.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    /// Quality code of the exception.
    code: u32,
    /// When to read it again.
    retry_at: Instant,
}

impl Unit {
    pub fn new(mut config: ModbusConfig, first_tag: u32) -> Unit {
        let mut by_interval: Vec<(Duration, Vec<usize>)> = Vec::new();
        for (i, t) in config.tags.iter().enumerate() {
            let interval = t.interval.unwrap_or(config.poll_interval);
            match by_interval.iter_mut().find(|(d, _)| *d == interval) {
                Some((_, v)) => v.push(i),
                None => by_interval.push((interval, vec![i])),
            }
        }
        by_interval.sort_by_key(|(d, _)| *d);
        let readers: Vec<TagReader> = std::mem::take(&mut config.tags)
            .iter()
            .map(TagReader::new)
            .collect();
        let now = Instant::now();
        let groups = by_interval
            .into_iter()
            .map(|(interval, select)| Group {
                interval,
                plan: Arc::new(plan::plan(
                    &readers,
                    &select,
                    config.max_gap,
                    config.max_registers,
                )),
                next: now,
                requests: 0,
            })
            .collect();
        Unit {
            config,
            readers,
            first_tag,
            groups,
            failures: 0,
            resume_at: None,
            refused: HashMap::new(),
        }
    }

    pub fn log_plan(&self) {
        for g in &self.groups {
            for r in g.plan.iter() {
                info!(
                    device = %self.config.id,
                    unit = self.config.unit,
                    interval = ?g.interval,
                    table = r.table.name(),
                    start = r.start,
                    count = r.count,
                    tags = r.tags.len(),
                    "modbus request planned"
                );
            }
        }
    }

    fn tag_id(&self, i: usize) -> u32 {
        self.first_tag + i as u32
    }

    fn bad(&self, requests: &[ReadRequest], code: u32, out: &mut Vec<Sample>) {
        let t = now_ms();
        for r in requests {
            out.extend(
                r.tags
                    .iter()
                    .map(|&(i, _)| Sample::bad(self.tag_id(i), t, code)),
            );
        }
    }

    /// Appends one sample per tag of `r` from its answer. The hot path of
    /// collection: one match per request, no allocation per point (except
    /// string values).
    fn decode(&self, r: &ReadRequest, outcome: &Outcome, out: &mut Vec<Sample>) {
        let t = now_ms();
        let sample = |i: usize, value: Result<Value, u32>| match value {
            Ok(v) => Sample::good(self.tag_id(i), t, v),
            Err(code) => Sample::bad(self.tag_id(i), t, code),
        };
        match outcome {
            Outcome::Words(words) if r.plain_u16 => out.extend(r.tags.iter().map(
                |&(i, offset)| match words.get(usize::from(offset)) {
                    Some(&w) => Sample::good(self.tag_id(i), t, Value::Uint(u64::from(w))),
                    None => Sample::bad(self.tag_id(i), t, quality::MALFORMED),
                },
            )),
            Outcome::Words(words) => out.extend(r.tags.iter().map(|&(i, offset)| {
                let start = usize::from(offset);
                let value = match self.readers.get(i) {
                    Some(tag) => words
                        .get(start..start + usize::from(tag.words))
                        .ok_or(quality::MALFORMED)
                        .and_then(|w| tag.decode(w)),
                    None => Err(quality::MALFORMED),
                };
                sample(i, value)
            })),
            Outcome::Bits(bits) => out.extend(r.tags.iter().map(|&(i, offset)| {
                let value = bits
                    .get(usize::from(offset))
                    .map(|&b| Value::Bool(b))
                    .ok_or(quality::MALFORMED);
                sample(i, value)
            })),
            other => self.bad(std::slice::from_ref(r), other.code(), out),
        }
    }
}

/// The connection of a line and the units on it.
pub struct Line {
    pub key: String,
    transport: Transport,
    pub units: Vec<Unit>,
    ctx: Option<Connection>,
    reconnect: Reconnect,
    /// End of the last frame exchange: the next request waits the inter-frame
    /// delay from here.
    quiet_since: Option<Instant>,
    /// The garbled-frame diagnosis was logged (once per line).
    garbled_reported: bool,
    /// Requests sent since this count was last taken.
    requests: u32,
    /// Where requests per cycle are reported.
    status: Option<Arc<Status>>,
}

/// Why polling a group stopped early.
enum Stop {
    /// The connection broke: rebuild it.
    Reconnect,
}

impl Line {
    pub fn new(key: String, units: Vec<Unit>) -> Line {
        let transport =
            units
                .first()
                .map(|u| u.config.transport.clone())
                .unwrap_or(Transport::Tcp {
                    host: String::new(),
                    port: 0,
                });
        Line {
            key,
            transport,
            units,
            ctx: None,
            reconnect: Reconnect::default(),
            quiet_since: None,
            garbled_reported: false,
            requests: 0,
            status: None,
        }
    }

    /// Reports requests per cycle of each unit to `status`.
    pub fn report_to(mut self, status: Arc<Status>) -> Line {
        self.status = Some(status);
        self
    }

    fn timeout(&self) -> Duration {
        self.units
            .iter()
            .map(|u| u.config.timeout)
            .max()
            .unwrap_or(Duration::from_secs(1))
    }

    fn max_backoff(&self) -> Duration {
        self.units
            .iter()
            .map(|u| u.config.max_backoff)
            .min()
            .unwrap_or(Duration::from_secs(30))
    }

    /// Connects if not connected (respecting the reconnect backoff).
    async fn ensure_connected(&mut self) -> Result<(), u32> {
        if self.ctx.is_some() {
            return Ok(());
        }
        if !self.reconnect.due() {
            return Err(quality::CONNECT_FAILED);
        }
        match transport::connect(&self.transport, self.timeout()).await {
            Ok(ctx) => {
                info!(line = %self.key, "modbus line connected");
                self.ctx = Some(ctx);
                self.reconnect.connected();
                Ok(())
            }
            Err(e) => {
                let max = self.max_backoff();
                self.reconnect.failed("modbus", &self.key, e, max);
                Err(quality::CONNECT_FAILED)
            }
        }
    }

    /// Waits the inter-frame delay, then reads within the unit's timeout.
    async fn read(&mut self, unit: usize, r: &ReadRequest) -> Outcome {
        let limit = self.units[unit].config.timeout;
        self.read_within(unit, r, limit).await
    }

    /// Waits the inter-frame delay, then reads within `limit`.
    async fn read_within(&mut self, unit: usize, r: &ReadRequest, limit: Duration) -> Outcome {
        let delay = self.transport.inter_frame_delay();
        if let Some(q) = self.quiet_since
            && !delay.is_zero()
        {
            tokio::time::sleep_until(q + delay).await;
        }
        let Some(ctx) = self.ctx.as_mut() else {
            return Outcome::Broken("not connected".into());
        };
        let c = &self.units[unit].config;
        self.requests += 1;
        let outcome = transport::read(ctx, c.unit, r.table, r.start, r.count, limit).await;
        if !delay.is_zero() {
            self.quiet_since = Some(Instant::now());
        }
        if matches!(outcome, Outcome::Frame) && !self.garbled_reported {
            self.garbled_reported = true;
            warn!(line = %self.key, device = %c.id, unit = c.unit, "{GARBLED_DIAGNOSIS}");
        }
        outcome
    }

    /// Polls group `g` of unit `u` once, appending its samples.
    async fn poll_group(&mut self, u: usize, g: usize, out: &mut Vec<Sample>) -> Result<(), Stop> {
        let now = Instant::now();
        if let Err(code) = self.ensure_connected().await {
            let unit = &self.units[u];
            unit.bad(&unit.groups[g].plan, code, out);
            return Ok(());
        }
        if self.units[u].failures > 0 {
            // Only its probe, in the line's idle time, may bring it back.
            let unit = &self.units[u];
            unit.bad(&unit.groups[g].plan, quality::BACKING_OFF, out);
            return Ok(());
        }
        let requests = Arc::clone(&self.units[u].groups[g].plan);
        out.reserve(requests.iter().map(|r| r.tags.len()).sum());
        let mut replanned: Option<Vec<ReadRequest>> = None;
        let mut rejoined = false;
        for (n, r) in requests.iter().enumerate() {
            // A refused tag is reported without asking, until its retry.
            if let [(i, _)] = r.tags[..]
                && let Some(refusal) = self.units[u].refused.get(&i)
                && now < refusal.retry_at
            {
                out.push(Sample::bad(self.units[u].tag_id(i), now_ms(), refusal.code));
                if let Some(p) = &mut replanned {
                    p.push(r.clone());
                }
                continue;
            }
            let attempts = 1 + u32::from(self.units[u].config.retries);
            let mut outcome = Outcome::Timeout;
            for _ in 0..attempts {
                outcome = self.read(u, r).await;
                if !matches!(outcome, Outcome::Timeout | Outcome::Frame) {
                    break;
                }
            }
            match outcome {
                Outcome::Words(_) | Outcome::Bits(_) => {
                    self.answered(u);
                    if let [(i, _)] = r.tags[..]
                        && self.units[u].refused.remove(&i).is_some()
                    {
                        let unit = &self.units[u];
                        info!(device = %unit.config.id, address = %unit.readers[i].address_text(), tag_index = unit.tag_id(i), "device answers a refused address again; planning it back in");
                        rejoined = true;
                    }
                    self.units[u].decode(r, &outcome, out);
                }
                Outcome::Exception(code @ (2 | 3)) => {
                    self.answered(u);
                    let kept = self.isolate_refused(u, r, code, out).await?;
                    let plan = replanned.get_or_insert_with(|| requests[..n].to_vec());
                    plan.extend(kept);
                    continue;
                }
                Outcome::Exception(_) | Outcome::Mismatch => {
                    self.answered(u);
                    self.units[u].bad(std::slice::from_ref(r), outcome.code(), out);
                }
                Outcome::Timeout | Outcome::Frame => {
                    self.units[u].bad(&requests[n..], outcome.code(), out);
                    self.not_answered(u, &outcome);
                    if let Some(p) = &mut replanned {
                        p.extend_from_slice(&requests[n..]);
                    }
                    break;
                }
                Outcome::Broken(_) => {
                    self.units[u].bad(&requests[n..], outcome.code(), out);
                    self.drop_connection(&outcome);
                    return Err(Stop::Reconnect);
                }
            }
            if let Some(p) = &mut replanned {
                p.push(r.clone());
            }
        }
        if rejoined {
            self.replan(u, g);
        } else if let Some(p) = replanned {
            self.units[u].groups[g].plan = Arc::new(p);
        }
        Ok(())
    }

    /// Bisects `r`, which drew exception `code`, until the refused tags
    /// stand alone; decodes what the device answers on the way and returns
    /// the requests that replace `r` in the plan.
    async fn isolate_refused(
        &mut self,
        u: usize,
        r: &ReadRequest,
        code: u8,
        out: &mut Vec<Sample>,
    ) -> Result<Vec<ReadRequest>, Stop> {
        if r.tags.len() > 1 {
            let unit = &self.units[u];
            warn!(device = %unit.config.id, start = r.start, count = r.count, exception = code, "merged read refused; bisecting it to find the refused addresses");
        }
        let mut kept = Vec::new();
        let mut todo = Vec::new();
        self.refuse_or_halve(u, r.clone(), code, &mut todo, &mut kept, out);
        while let Some(s) = todo.pop() {
            let o = self.read(u, &s).await;
            match o {
                Outcome::Exception(c @ (2 | 3)) => {
                    self.refuse_or_halve(u, s, c, &mut todo, &mut kept, out)
                }
                Outcome::Broken(_) => {
                    let unit = &self.units[u];
                    unit.bad(std::slice::from_ref(&s), o.code(), out);
                    unit.bad(&todo, o.code(), out);
                    self.drop_connection(&o);
                    return Err(Stop::Reconnect);
                }
                _ => {
                    self.units[u].decode(&s, &o, out);
                    kept.push(s);
                }
            }
        }
        kept.sort_by_key(|k| k.start);
        Ok(kept)
    }

    /// Queues the halves of `r` (refused with exception `code`) on `todo`,
    /// first half on top; a single tag is marked refused until its retry.
    fn refuse_or_halve(
        &mut self,
        u: usize,
        r: ReadRequest,
        code: u8,
        todo: &mut Vec<ReadRequest>,
        kept: &mut Vec<ReadRequest>,
        out: &mut Vec<Sample>,
    ) {
        let unit = &mut self.units[u];
        if let Some((a, b)) = plan::halve(&unit.readers, &r) {
            todo.push(b);
            todo.push(a);
            return;
        }
        let quality = quality::MODBUS_EXCEPTION | u32::from(code);
        for &(i, _) in &r.tags {
            let refusal = Refusal {
                code: quality,
                retry_at: Instant::now() + unit.config.max_backoff,
            };
            if unit.refused.insert(i, refusal).is_none() {
                warn!(device = %unit.config.id, address = %unit.readers[i].address_text(), tag_index = unit.tag_id(i), exception = code, retry_in = ?unit.config.max_backoff, "device refuses this address; reporting its tag Bad and asking again later");
            }
        }
        unit.bad(std::slice::from_ref(&r), quality, out);
        kept.push(r);
    }

    /// Plans group `g` of unit `u` afresh from all its tags, forgetting its
    /// refusals: addresses still refused are isolated again by the next poll.
    fn replan(&mut self, u: usize, g: usize) {
        let unit = &mut self.units[u];
        let mut select: Vec<usize> = unit.groups[g]
            .plan
            .iter()
            .flat_map(|r| r.tags.iter().map(|&(i, _)| i))
            .collect();
        select.sort_unstable();
        select.dedup();
        for i in &select {
            unit.refused.remove(i);
        }
        unit.groups[g].plan = Arc::new(plan::plan(
            &unit.readers,
            &select,
            unit.config.max_gap,
            unit.config.max_registers,
        ));
    }

    /// Unit `u` gave no (valid) answer: backs it off, longer each time.
    fn not_answered(&mut self, u: usize, outcome: &Outcome) {
        let unit = &mut self.units[u];
        unit.failures += 1;
        let wait = backoff(
            unit.config.poll_interval,
            unit.failures,
            unit.config.max_backoff,
        );
        if unit.failures == 1 {
            let code = format_args!("{:#010x}", outcome.code());
            let (device, id) = (&unit.config.id, unit.config.unit);
            if matches!(outcome, Outcome::Frame) {
                warn!(%device, unit = id, %code, "modbus unit's answers are garbled; backing off");
            } else {
                warn!(%device, unit = id, %code, "modbus unit not answering; backing off");
            }
        }
        unit.resume_at = Some(Instant::now() + wait);
        // On Modbus TCP a late answer would be taken for the next request's:
        // start over on a fresh connection.
        if matches!(self.transport, Transport::Tcp { .. }) {
            self.ctx = None;
        }
    }

    /// The backed-off unit due for its probe first, if any, and the time it
    /// is due.
    fn next_probe(&self) -> Option<(usize, Instant)> {
        self.units
            .iter()
            .enumerate()
            .filter(|(_, unit)| unit.failures > 0)
            .filter_map(|(u, unit)| unit.resume_at.map(|t| (u, t)))
            .min_by_key(|&(_, t)| t)
    }

    /// Time until the next poll of a unit that is not backed off (None: no
    /// such unit, the line is idle until the probe ends).
    fn idle_window(&self, now: Instant) -> Option<Duration> {
        self.units
            .iter()
            .filter(|unit| unit.failures == 0)
            .flat_map(|unit| unit.groups.iter().map(|g| g.next))
            .min()
            .map(|t| t.saturating_duration_since(now))
    }

    /// Probes backed-off unit `u` (due at `due`) if the line is idle long
    /// enough: one read of its first item, within the idle window. Returns
    /// false if it did not fit (the caller polls first and asks again).
    async fn probe(&mut self, u: usize, due: Instant) -> bool {
        let now = Instant::now();
        let unit = &self.units[u];
        let window = self.idle_window(now);
        let overdue = now.saturating_duration_since(due) >= unit.config.max_backoff;
        if window.is_some_and(|w| w < PROBE_MIN_TIMEOUT) && !overdue {
            return false;
        }
        let limit = window
            .unwrap_or(unit.config.timeout)
            .max(PROBE_MIN_TIMEOUT)
            .min(unit.config.timeout);
        let Some(first) = unit.groups.iter().find_map(|g| g.plan.first()) else {
            self.units[u].resume_at = None;
            return true;
        };
        let request = ReadRequest {
            table: first.table,
            start: first.start,
            count: 1,
            tags: Vec::new(),
            plain_u16: false,
        };
        if self.ensure_connected().await.is_err() {
            let outcome = Outcome::Broken("not connected".into());
            self.not_answered(u, &outcome);
            return true;
        }
        let outcome = self.read_within(u, &request, limit).await;
        match outcome {
            Outcome::Timeout | Outcome::Frame => self.not_answered(u, &outcome),
            Outcome::Broken(_) => {
                self.not_answered(u, &outcome);
                self.drop_connection(&outcome);
            }
            // Any answer, even an exception: the unit is there.
            _ => {
                self.answered(u);
                // Its polls resume at their next due time.
            }
        }
        true
    }

    fn answered(&mut self, u: usize) {
        let unit = &mut self.units[u];
        if unit.failures > 0 {
            info!(device = %unit.config.id, unit = unit.config.unit, "modbus unit answering again");
        }

        unit.failures = 0;
        unit.resume_at = None;
    }

    fn drop_connection(&mut self, why: &Outcome) {
        if let Outcome::Broken(e) = why {
            warn!(line = %self.key, error = %e, "modbus connection broken; reconnecting");
        }
        self.ctx = None;
        self.quiet_since = None;
    }

    /// Polls every group of every unit once (the `probe` dry run), returning
    /// (unit index, samples).
    pub async fn poll_once(&mut self) -> Vec<(usize, Vec<Sample>)> {
        let mut result = Vec::new();
        for u in 0..self.units.len() {
            let mut samples = Vec::new();
            for g in 0..self.units[u].groups.len() {
                let _ = self.poll_group(u, g, &mut samples).await;
            }
            result.push((u, samples));
        }
        result
    }

    /// The group due first: (unit, group, due time).
    fn next_due(&self) -> Option<(usize, usize, Instant)> {
        let mut best: Option<(usize, usize, Instant)> = None;
        for (u, unit) in self.units.iter().enumerate() {
            for (g, group) in unit.groups.iter().enumerate() {
                if best.is_none_or(|(_, _, t)| group.next < t) {
                    best = Some((u, g, group.next));
                }
            }
        }
        best
    }
}

/// `base × 2^(failures-1)`, at most `max`.
pub fn backoff(base: Duration, failures: u32, max: Duration) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(max)
}

/// A line's reconnect state, shared by the serial-line collectors: after a
/// failed connect the next attempt waits 0.5 s doubling to `max_backoff`;
/// an error is logged once until it changes or the line connects.
#[derive(Debug, Default)]
pub struct Reconnect {
    failures: u32,
    at: Option<Instant>,
    last_error: Option<String>,
}

impl Reconnect {
    /// Whether an attempt may be made now.
    pub fn due(&self) -> bool {
        self.at.is_none_or(|t| Instant::now() >= t)
    }

    pub fn connected(&mut self) {
        *self = Reconnect::default();
    }

    /// Notes a failed attempt (`protocol` and `line` name it in the log).
    pub fn failed(&mut self, protocol: &str, line: &str, error: String, max_backoff: Duration) {
        if self.last_error.as_deref() != Some(error.as_str()) {
            warn!(%line, %error, "{protocol} line unreachable");
            self.last_error = Some(error);
        }
        self.failures += 1;
        self.at =
            Some(Instant::now() + backoff(Duration::from_millis(500), self.failures, max_backoff));
    }
}

impl Collector for Line {
    async fn run(mut self, sink: PointSink, cancel: CancellationToken) {
        for u in &self.units {
            u.log_plan();
        }
        // A probe that did not fit waits for the next poll to end.
        let mut probe_deferred = false;
        loop {
            let Some((u, g, due)) = self.next_due() else {
                cancel.cancelled().await;
                return;
            };
            let probe = self.next_probe().filter(|_| !probe_deferred);
            let wake = probe.map_or(due, |(_, t)| t.min(due));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => {}
            }
            if let Some((p, probe_due)) = probe
                && probe_due <= Instant::now()
            {
                // Not cancel-safe either: a probe is one bounded read.
                probe_deferred = !self.probe(p, probe_due).await;
                continue;
            }
            probe_deferred = false;
            {
                let group = &mut self.units[u].groups[g];
                group.next += group.interval;
                let now = Instant::now();
                if group.next <= now {
                    // Behind (a slow line): skip the missed ticks.
                    group.next = now + group.interval;
                }
            }
            let mut samples = Vec::new();
            self.requests = 0;
            // Not cancel-safe on purpose: a poll runs to its end (each read
            // is bounded by the unit's timeout) so no frame is cut in half.
            let _ = self.poll_group(u, g, &mut samples).await;
            // A poll that overran (a slow answer) is not followed at once by
            // one reading the same device sample: half an interval at least.
            let group = &mut self.units[u].groups[g];
            group.next = group.next.max(Instant::now() + group.interval / 2);
            group.requests = self.requests;
            if let Some(status) = &self.status {
                let unit = &self.units[u];
                let per_cycle = unit.groups.iter().map(|g| g.requests).sum();
                status.requests_per_cycle(unit.first_tag, per_cycle);
            }
            if !sink.send(samples).await {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::config::{ModbusTagConfig, ModbusType, Table};

    fn device(tags: Vec<ModbusTagConfig>) -> ModbusConfig {
        ModbusConfig {
            id: "d".into(),
            transport: Transport::Tcp {
                host: "h".into(),
                port: 502,
            },
            unit: 1,
            poll_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            retries: 0,
            max_gap: 16,
            max_registers: 125,
            max_backoff: Duration::from_secs(60),
            identify: false,
            tags,
            identity: Default::default(),
        }
    }

    #[test]
    fn tags_with_their_own_interval_form_poll_groups_planned_apart() {
        let mut fast = ModbusTagConfig::new("fast", Table::Holding, 1, ModbusType::U16);
        fast.interval = Some(Duration::from_millis(100));
        let mut slow = ModbusTagConfig::new("slow", Table::Holding, 3, ModbusType::U16);
        slow.interval = Some(Duration::from_secs(60));
        let config = device(vec![
            ModbusTagConfig::new("a", Table::Holding, 0, ModbusType::U16),
            slow,
            fast,
            ModbusTagConfig::new("b", Table::Holding, 2, ModbusType::U16),
        ]);
        let unit = Unit::new(config, 10);
        assert_eq!(unit.readers.len(), 4);
        assert!(unit.config.tags.is_empty());
        let groups: Vec<_> = unit
            .groups
            .iter()
            .map(|g| {
                let tags: Vec<_> = g
                    .plan
                    .iter()
                    .flat_map(|r| r.tags.iter().map(|t| t.0))
                    .collect();
                (g.interval, g.plan.len(), tags)
            })
            .collect();
        assert_eq!(
            groups,
            vec![
                (Duration::from_millis(100), 1, vec![2]),
                (Duration::from_secs(1), 1, vec![0, 3]),
                (Duration::from_secs(60), 1, vec![1]),
            ]
        );
    }

    /// Requests of plain u16 tags skip per-tag decoding; the values must be
    /// those the general path gives.
    #[test]
    fn plain_registers_decode_as_the_general_path_does() {
        let plain: Vec<_> = (0..4)
            .map(|a| ModbusTagConfig::new(&format!("r{a}"), Table::Holding, a, ModbusType::U16))
            .collect();
        let mut scaled = plain.clone();
        scaled[2].scale = 0.5;
        for (tags, fast_path) in [(plain, true), (scaled, false)] {
            let unit = Unit::new(device(tags), 100);
            let r = &unit.groups[0].plan[0];
            assert_eq!(r.plain_u16, fast_path);
            let answer = Outcome::Words(vec![1, 0xFFFF, 3, 4]);
            let mut general = r.clone();
            general.plain_u16 = false;
            let (mut got, mut expected) = (Vec::new(), Vec::new());
            unit.decode(r, &answer, &mut got);
            unit.decode(&general, &answer, &mut expected);
            let strip = |v: Vec<Sample>| {
                v.into_iter()
                    .map(|s| (s.tag, s.value, s.code))
                    .collect::<Vec<_>>()
            };
            let got = strip(got);
            assert_eq!(got, strip(expected));
            assert_eq!(got[1], (101, Some(Value::Uint(0xFFFF)), 0));
            // An answer too short for its tags is Bad, not shifted.
            let mut short = Vec::new();
            unit.decode(r, &Outcome::Words(vec![1, 2]), &mut short);
            assert_eq!(strip(short)[3], (103, None, quality::MALFORMED));
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_ceiling() {
        let s = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        assert_eq!(backoff(s, 1, max), s);
        assert_eq!(backoff(s, 2, max), 2 * s);
        assert_eq!(backoff(s, 4, max), 8 * s);
        assert_eq!(backoff(s, 10, max), max);
        assert_eq!(backoff(s, u32::MAX, max), max);
    }
}
