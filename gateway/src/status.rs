//! The gateway's health as an installer and a monitoring system see it: the
//! status listener (`[status] listen`) serving `/` (a page that needs no
//! script), `/status.json`, `/metrics` (Prometheus text), `/healthz` and
//! `/readyz`; `guantong-gateway status` prints the same in a terminal.
//!
//! # Design
//! Nothing here asks a collector. Device health is derived from what flows to
//! the buffer writer: a device's tags are numbered contiguously in the
//! manifest, so each sample's tag names its device, and the writer calls
//! [`Status::observe`] once per hand-off. The uplink reports its state, each
//! batch sent and each ack; the writer reports each commit; a Modbus line
//! reports each device's requests per cycle after each poll. What can be read
//! when asked (buffer bytes, pending batches) is read when asked.
//!
//! A device's connection state:
//! - `down` when its latest sample is Bad with a link code
//!   ([`quality::is_link_failure`]: no answer, no connection, session lost),
//!   or when nothing arrived for `stale_after` (Modbus: poll interval +
//!   timeout; MQTT: twice a declared interval; OPC UA: none, as a subscription
//!   is silent while values do not change);
//! - `waiting` before its first sample, until `stale_after` has passed;
//! - `up` otherwise (Bad values that are data-quality facts, such as a Modbus
//!   exception, count as errors, not as a lost connection).
//!
//! Times are the gateway's clock at arrival in the writer, not source
//! timestamps (an OPC UA server may send old ones).
//!
//! Backlog age is the age of the oldest unacknowledged batch's commit, from a
//! log of commits at one-second resolution; for batches committed before this
//! start it counts from the start (a lower bound).
//!
//! # Invariants
//! - Metric labels are bounded: per device, never per tag.
//! - Locks are held for one hand-off's bookkeeping, never across an await.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::{DOCTYPE, Markup, html};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::buffer::Buffer;
use crate::config::{Config, DeviceConfig};
use crate::quality::{self, Sample, now_ms};
use guantong_proto::v1::Quality;

/// Commits closer together than this share one entry of the commit log.
const COMMIT_LOG_RESOLUTION_MS: i64 = 1000;
/// Entries of the commit log kept (18 h at one per second).
const COMMIT_LOG_MAX: usize = 1 << 16;
/// How long `guantong-gateway status` waits for the listener.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("the status listener is off (`[status] listen = \"\"`)")]
    Off,
    #[error("`{0}` is not an address")]
    Address(String),
    #[error("status listener at {addr}: {reason}")]
    Fetch { addr: SocketAddr, reason: String },
}

/// What the status knows of a device from its config.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub id: String,
    pub protocol: &'static str,
    pub first_tag: u32,
    pub tags: u32,
    /// Silence longer than this means the device is down; None: silence says
    /// nothing (values are sent only when they change).
    pub stale_after: Option<Duration>,
}

impl DeviceSpec {
    /// One spec per device of `config`, in manifest order.
    pub fn of(config: &Config) -> Vec<DeviceSpec> {
        let firsts = crate::manifest::first_tag_of_devices(config);
        config
            .devices
            .iter()
            .zip(firsts)
            .map(|(d, first_tag)| DeviceSpec::new(d, first_tag))
            .collect()
    }

    /// The spec of `d`, whose samples are numbered from `first_tag`.
    pub fn new(d: &DeviceConfig, first_tag: u32) -> DeviceSpec {
        let p = d.protocol();
        DeviceSpec {
            id: p.id().to_string(),
            protocol: p.name(),
            first_tag,
            tags: p.tag_count() as u32,
            stale_after: p.stale_after(),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct DeviceHealth {
    last_sample_ms: Option<i64>,
    last_good_ms: Option<i64>,
    good: u64,
    bad: u64,
    last_bad: Option<(u32, i64)>,
    /// The latest sample was Bad with a link code.
    link_down: bool,
    /// The latest Bad code other than "backing off": why it backs off.
    cause: Option<u32>,
    /// Requests one poll of each of its groups sent (Modbus).
    requests_per_cycle: Option<u32>,
}

/// Uplink connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UplinkState {
    Connecting,
    Connected,
    /// Waiting before the next attempt after a failure.
    Backoff,
}

impl fmt::Display for UplinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UplinkState::Connecting => "connecting",
            UplinkState::Connected => "connected",
            UplinkState::Backoff => "backoff",
        })
    }
}

#[derive(Debug)]
struct UplinkHealth {
    state: UplinkState,
    since_ms: i64,
    last_ack_ms: Option<i64>,
    rtt_ms: Option<f64>,
    clock_offset_ms: Option<i64>,
    last_error: Option<String>,
    /// The ingest endpoint of the latest connection attempt.
    endpoint: Option<String>,
    /// Send time of each batch in flight, by first sequence number.
    sent: HashMap<u64, Instant>,
}

#[derive(Debug)]
struct Commits {
    /// (last sequence number, commit time), oldest first.
    log: VecDeque<(u64, i64)>,
    last_failed: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SampleLabels {
    device: String,
    quality: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    version: String,
    manifest_version: String,
}

/// Every metric of the gateway, defined here and only here.
struct Metrics {
    registry: Registry,
    info: Family<InfoLabels, Gauge>,
    device_samples: Family<SampleLabels, Counter>,
    device_up: Family<DeviceLabels, Gauge>,
    device_last_good: Family<DeviceLabels, Gauge<f64, AtomicU64>>,
    device_requests_per_cycle: Family<DeviceLabels, Gauge>,
    buffer_used: Gauge,
    buffer_capacity: Gauge,
    buffer_pending: Gauge,
    buffer_backlog_age: Gauge<f64, AtomicU64>,
    buffer_commit_failures: Counter,
    uplink_connected: Gauge,
    uplink_connects: Counter,
    uplink_acked: Counter,
    uplink_ack_latency: Histogram,
    uplink_clock_offset: Gauge<f64, AtomicU64>,
}

impl Metrics {
    /// `guantong_gateway_info` names the running manifest only.
    fn set_manifest(&self, manifest_version: u64) {
        self.info.clear();
        self.info
            .get_or_create(&InfoLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
                manifest_version: format!("{manifest_version:016x}"),
            })
            .set(1);
    }

    fn new(manifest_version: u64) -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            device_samples: Family::default(),
            device_up: Family::default(),
            device_last_good: Family::default(),
            device_requests_per_cycle: Family::default(),
            buffer_used: Gauge::default(),
            buffer_capacity: Gauge::default(),
            buffer_pending: Gauge::default(),
            buffer_backlog_age: Gauge::default(),
            buffer_commit_failures: Counter::default(),
            uplink_connected: Gauge::default(),
            uplink_connects: Counter::default(),
            uplink_acked: Counter::default(),
            // 1 ms to ~65 s.
            uplink_ack_latency: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            uplink_clock_offset: Gauge::default(),
            registry: Registry::default(),
            info: Family::default(),
        };
        m.set_manifest(manifest_version);
        let r = &mut registry;
        r.register(
            "guantong_gateway_info",
            "Software and manifest version (value 1)",
            m.info.clone(),
        );
        r.register(
            "guantong_device_samples",
            "Samples handed to the buffer, per device and quality (good, bad)",
            m.device_samples.clone(),
        );
        r.register(
            "guantong_device_up",
            "1 while the device is up, 0 when down or not heard from yet",
            m.device_up.clone(),
        );
        r.register(
            "guantong_device_last_good_timestamp_seconds",
            "Arrival time of the device's latest Good sample, Unix seconds",
            m.device_last_good.clone(),
        );
        r.register(
            "guantong_device_requests_per_cycle",
            "Modbus requests the latest poll of each of the device's poll groups sent, summed (retries and bisection included; 0 while backing off)",
            m.device_requests_per_cycle.clone(),
        );
        r.register(
            "guantong_buffer_used_bytes",
            "Bytes of buffered data",
            m.buffer_used.clone(),
        );
        r.register(
            "guantong_buffer_capacity_bytes",
            "buffer.max_bytes",
            m.buffer_capacity.clone(),
        );
        r.register(
            "guantong_buffer_pending_batches",
            "Batches committed and not yet acknowledged by ingest",
            m.buffer_pending.clone(),
        );
        r.register(
            "guantong_buffer_backlog_age_seconds",
            "Age of the oldest unacknowledged batch (0: none)",
            m.buffer_backlog_age.clone(),
        );
        r.register(
            "guantong_buffer_commit_failures",
            "Commits that failed (their points are lost)",
            m.buffer_commit_failures.clone(),
        );
        r.register(
            "guantong_uplink_connected",
            "1 while a stream to ingest is open",
            m.uplink_connected.clone(),
        );
        r.register(
            "guantong_uplink_connects",
            "Streams to ingest opened",
            m.uplink_connects.clone(),
        );
        r.register(
            "guantong_uplink_batches_acked",
            "Batches acknowledged by ingest",
            m.uplink_acked.clone(),
        );
        r.register(
            "guantong_uplink_ack_latency_seconds",
            "Time from sending a batch to its ack",
            m.uplink_ack_latency.clone(),
        );
        r.register(
            "guantong_uplink_clock_offset_seconds",
            "Ingest's clock minus this gateway's, measured at connect",
            m.uplink_clock_offset.clone(),
        );
        Metrics { registry, ..m }
    }
}

/// The gateway's health, shared by the writer, the uplink and the listener.
pub struct Status {
    gateway_id: String,
    manifest_version: AtomicU64,
    started_ms: i64,
    /// Sorted by `first_tag`; replaced by a reload while `health` is locked,
    /// so read it with `health` locked (lock `health` first).
    devices: RwLock<Arc<[DeviceSpec]>>,
    health: Mutex<Vec<DeviceHealth>>,
    uplink: Mutex<UplinkHealth>,
    commits: Mutex<Commits>,
    metrics: Metrics,
}

/// Index of the device whose tags include `tag`.
fn device_of(devices: &[DeviceSpec], tag: u32) -> Option<usize> {
    let i = devices.partition_point(|d| d.first_tag <= tag);
    let i = i.checked_sub(1)?;
    (tag < devices[i].first_tag + devices[i].tags).then_some(i)
}

/// Devices in the order `device_of` searches them.
fn sorted(mut devices: Vec<DeviceSpec>) -> Arc<[DeviceSpec]> {
    devices.sort_by_key(|d| d.first_tag);
    devices.into()
}

/// A mutex whose holder panicked still holds consistent counters.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Status {
    /// `last_committed`: the last sequence number already in the buffer,
    /// whose commit time is unknown (counted from now).
    pub fn new(
        gateway_id: &str,
        manifest_version: u64,
        devices: Vec<DeviceSpec>,
        last_committed: u64,
    ) -> Status {
        let now = now_ms();
        Status {
            gateway_id: gateway_id.to_string(),
            manifest_version: AtomicU64::new(manifest_version),
            started_ms: now,
            health: Mutex::new(vec![DeviceHealth::default(); devices.len()]),
            devices: RwLock::new(sorted(devices)),
            uplink: Mutex::new(UplinkHealth {
                state: UplinkState::Connecting,
                since_ms: now,
                last_ack_ms: None,
                rtt_ms: None,
                clock_offset_ms: None,
                last_error: None,
                endpoint: None,
                sent: HashMap::new(),
            }),
            commits: Mutex::new(Commits {
                log: VecDeque::from([(last_committed, now)]),
                last_failed: None,
            }),
            metrics: Metrics::new(manifest_version),
        }
    }

    fn devices(&self) -> Arc<[DeviceSpec]> {
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// After a reload: the new manifest version and devices. A device kept
    /// with the same samples numbering keeps its health.
    pub fn reconfigure(&self, manifest_version: u64, devices: Vec<DeviceSpec>) {
        let mut health = lock(&self.health);
        let old = self.devices();
        let devices = sorted(devices);
        *health = devices
            .iter()
            .map(|d| {
                old.iter()
                    .position(|o| o.id == d.id && o.first_tag == d.first_tag && o.tags == d.tags)
                    .map(|i| health[i].clone())
                    .unwrap_or_default()
            })
            .collect();
        *self.devices.write().unwrap_or_else(|e| e.into_inner()) = devices;
        self.manifest_switched(manifest_version);
    }

    /// A new manifest version with the same devices and tags (an identity
    /// read after start).
    pub fn manifest_switched(&self, manifest_version: u64) {
        self.manifest_version
            .store(manifest_version, std::sync::atomic::Ordering::Relaxed);
        self.metrics.set_manifest(manifest_version);
    }

    /// Counts samples on their way to the buffer (the writer calls this).
    pub fn observe(&self, samples: &[Sample]) {
        let now = now_ms();
        // (good, bad) per device touched, to update the counters once.
        let mut counts: Vec<(usize, u64, u64)> = Vec::new();
        let mut health = lock(&self.health);
        let devices = self.devices();
        {
            let mut cached: Option<usize> = None;
            for s in samples {
                let d = match cached {
                    Some(d)
                        if devices[d].first_tag <= s.tag
                            && s.tag < devices[d].first_tag + devices[d].tags =>
                    {
                        d
                    }
                    _ => match device_of(&devices, s.tag) {
                        Some(d) => d,
                        None => continue,
                    },
                };
                cached = Some(d);
                let h = &mut health[d];
                h.last_sample_ms = Some(now);
                let good = s.quality == Quality::Good;
                if good {
                    h.good += 1;
                    h.last_good_ms = Some(now);
                    h.link_down = false;
                } else {
                    h.bad += 1;
                    h.last_bad = Some((s.code, now));
                    h.link_down = quality::is_link_failure(s.code);
                    if s.code != quality::BACKING_OFF {
                        h.cause = Some(s.code);
                    }
                }
                match counts.last_mut() {
                    Some((last, g, b)) if *last == d => {
                        *g += good as u64;
                        *b += !good as u64;
                    }
                    _ => counts.push((d, good as u64, !good as u64)),
                }
            }
        }
        drop(health);
        for (d, good, bad) in counts {
            let device = &devices[d].id;
            for (quality, n) in [("good", good), ("bad", bad)] {
                if n > 0 {
                    self.metrics
                        .device_samples
                        .get_or_create(&SampleLabels {
                            device: device.clone(),
                            quality,
                        })
                        .inc_by(n);
                }
            }
        }
    }

    /// The device owning `first_tag` sent `requests` in its latest poll of
    /// each poll group (a Modbus line calls this after each poll).
    pub fn requests_per_cycle(&self, first_tag: u32, requests: u32) {
        let mut health = lock(&self.health);
        let devices = self.devices();
        let Some(d) = device_of(&devices, first_tag) else {
            return;
        };
        health[d].requests_per_cycle = Some(requests);
        drop(health);
        self.metrics
            .device_requests_per_cycle
            .get_or_create(&DeviceLabels {
                device: devices[d].id.clone(),
            })
            .set(i64::from(requests));
    }

    /// A commit ended: `Ok(last sequence number)` or the error.
    pub fn committed(&self, result: Result<u64, String>) {
        let now = now_ms();
        let mut c = lock(&self.commits);
        match result {
            Ok(last) => {
                c.last_failed = None;
                match c.log.back_mut() {
                    Some(entry) if now - entry.1 < COMMIT_LOG_RESOLUTION_MS => entry.0 = last,
                    _ => c.log.push_back((last, now)),
                }
                if c.log.len() > COMMIT_LOG_MAX {
                    c.log.pop_front();
                }
            }
            Err(e) => {
                self.metrics.buffer_commit_failures.inc();
                c.last_failed = Some(e);
            }
        }
    }

    /// The uplink starts a connection attempt to `endpoint`.
    pub fn uplink_connecting(&self, endpoint: &str) {
        self.set_uplink_state(UplinkState::Connecting, None);
        lock(&self.uplink).endpoint = Some(endpoint.to_string());
    }

    /// The uplink failed and waits before the next attempt.
    pub fn uplink_backoff(&self, error: String) {
        self.set_uplink_state(UplinkState::Backoff, Some(error));
    }

    fn set_uplink_state(&self, state: UplinkState, error: Option<String>) {
        let mut u = lock(&self.uplink);
        if u.state != state {
            u.state = state;
            u.since_ms = now_ms();
        }
        if error.is_some() {
            u.last_error = error;
        }
        u.sent.clear();
        self.metrics.uplink_connected.set(0);
    }

    /// Ingest welcomed the stream. `asked_ms..answered_ms` is the local time
    /// around the exchange; ingest's clock read in between gives the offset.
    pub fn uplink_connected(&self, server_time_ms: i64, asked_ms: i64, answered_ms: i64) {
        let mut u = lock(&self.uplink);
        u.state = UplinkState::Connected;
        u.since_ms = answered_ms;
        if server_time_ms != 0 {
            let offset = server_time_ms - (asked_ms + answered_ms) / 2;
            u.clock_offset_ms = Some(offset);
            self.metrics.uplink_clock_offset.set(offset as f64 / 1000.0);
        }
        self.metrics.uplink_connected.set(1);
        self.metrics.uplink_connects.inc();
    }

    /// A batch starting at `seq` went out.
    pub fn batch_sent(&self, seq: u64) {
        lock(&self.uplink).sent.insert(seq, Instant::now());
    }

    /// Ingest acknowledged the batch starting at `seq`.
    pub fn batch_acked(&self, seq: u64) {
        let mut u = lock(&self.uplink);
        u.last_ack_ms = Some(now_ms());
        self.metrics.uplink_acked.inc();
        if let Some(sent) = u.sent.remove(&seq) {
            let rtt = sent.elapsed();
            u.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
            self.metrics.uplink_ack_latency.observe(rtt.as_secs_f64());
        }
    }

    /// Everything the page shows, now.
    pub fn snapshot(&self, buffer: &Buffer, max_bytes: u64) -> Snapshot {
        let now = now_ms();
        let stats = buffer.stats();
        let mut not_ready = Vec::new();
        let (used, pending, first_seq, dropped) = match &stats {
            Ok(s) => (
                s.bytes,
                s.next_seq - s.first_seq,
                s.first_seq,
                s.dropped_points,
            ),
            Err(e) => {
                not_ready.push(format!("buffer unreadable: {e}"));
                (0, 0, 0, 0)
            }
        };
        let backlog_age_s = {
            let mut c = lock(&self.commits);
            if let Some(e) = &c.last_failed {
                not_ready.push(format!("last buffer commit failed: {e}"));
            }
            // Entries wholly acknowledged are of no more use.
            while c.log.len() > 1 && c.log.front().is_some_and(|e| e.0 < first_seq) {
                c.log.pop_front();
            }
            match (pending, c.log.front()) {
                (0, _) | (_, None) => 0.0,
                (_, Some(&(_, at))) => (now - at).max(0) as f64 / 1000.0,
            }
        };
        let devices: Vec<DeviceView> = {
            let health = lock(&self.health);
            self.devices()
                .iter()
                .zip(health.iter())
                .map(|(spec, h)| DeviceView::of(spec, h, self.started_ms, now))
                .collect()
        };
        let uplink = {
            let u = lock(&self.uplink);
            UplinkView {
                state: u.state,
                since_ms: u.since_ms,
                last_ack_ms: u.last_ack_ms,
                rtt_ms: u.rtt_ms,
                clock_offset_ms: u.clock_offset_ms,
                last_error: u.last_error.clone(),
                endpoint: u.endpoint.clone(),
            }
        };
        let m = &self.metrics;
        for d in &devices {
            let labels = DeviceLabels {
                device: d.id.clone(),
            };
            m.device_up
                .get_or_create(&labels)
                .set((d.state == DeviceState::Up) as i64);
            if let Some(t) = d.last_good_ms {
                m.device_last_good
                    .get_or_create(&labels)
                    .set(t as f64 / 1000.0);
            }
        }
        m.buffer_used.set(used as i64);
        m.buffer_capacity.set(max_bytes as i64);
        m.buffer_pending.set(pending as i64);
        m.buffer_backlog_age.set(backlog_age_s);
        Snapshot {
            gateway: self.gateway_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            manifest_version: format!(
                "{:016x}",
                self.manifest_version
                    .load(std::sync::atomic::Ordering::Relaxed)
            ),
            started_ms: self.started_ms,
            now_ms: now,
            ready: not_ready.is_empty(),
            not_ready,
            buffer: BufferView {
                used_bytes: used,
                max_bytes,
                fill: if max_bytes == 0 {
                    0.0
                } else {
                    used as f64 / max_bytes as f64
                },
                pending_batches: pending,
                backlog_age_s,
                dropped_points: dropped,
            },
            uplink,
            devices,
        }
    }

    /// What the uplink reports to ingest for its fleet view: the snapshot,
    /// shortened to what an operator of many gateways needs.
    pub fn health(&self, buffer: &Buffer, max_bytes: u64) -> guantong_proto::v1::Health {
        use guantong_proto::v1::{DeviceHealth, Health};
        let s = self.snapshot(buffer, max_bytes);
        Health {
            taken_at_ms: s.now_ms,
            software_version: s.version,
            manifest_version: self
                .manifest_version
                .load(std::sync::atomic::Ordering::Relaxed),
            buffer_used_bytes: s.buffer.used_bytes,
            buffer_max_bytes: s.buffer.max_bytes,
            pending_batches: s.buffer.pending_batches,
            backlog_age_s: s.buffer.backlog_age_s,
            dropped_points: s.buffer.dropped_points,
            clock_offset_ms: s.uplink.clock_offset_ms,
            devices: s
                .devices
                .into_iter()
                .map(|d| DeviceHealth {
                    id: d.id,
                    protocol: d.protocol,
                    state: d.state.wire() as i32,
                    reason: d.reason.unwrap_or_default(),
                })
                .collect(),
            // The uplink knows it (`remote::Source`).
            config_version: 0,
        }
    }

    /// `/metrics`: the Prometheus text format (OpenMetrics flavour).
    fn encode_metrics(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.metrics.registry)?;
        Ok(text)
    }
}

/// Connection state of a device, derived from its samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Up,
    Down,
    Waiting,
}

impl DeviceState {
    fn wire(self) -> guantong_proto::v1::DeviceState {
        use guantong_proto::v1::DeviceState as W;
        match self {
            DeviceState::Up => W::Up,
            DeviceState::Down => W::Down,
            DeviceState::Waiting => W::Waiting,
        }
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceState::Up => "up",
            DeviceState::Down => "down",
            DeviceState::Waiting => "waiting",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceView {
    pub id: String,
    pub protocol: String,
    pub state: DeviceState,
    /// Why it is down, in words.
    pub reason: Option<String>,
    pub tags: u32,
    pub good: u64,
    pub bad: u64,
    pub last_good_ms: Option<i64>,
    pub last_error: Option<ErrorView>,
    /// Requests per poll cycle (Modbus; None before the first poll or for
    /// other protocols).
    #[serde(default)]
    pub requests_per_cycle: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorView {
    pub code_hex: String,
    pub text: String,
    pub at_ms: i64,
}

impl DeviceView {
    fn of(spec: &DeviceSpec, h: &DeviceHealth, started_ms: i64, now: i64) -> DeviceView {
        let silent_ms = now - h.last_sample_ms.unwrap_or(started_ms);
        let stale = spec
            .stale_after
            .is_some_and(|s| silent_ms > s.as_millis() as i64);
        let (state, reason) = if h.link_down {
            let code = h.last_bad.map(|(c, _)| c).unwrap_or_default();
            let reason = match h.cause {
                Some(cause) if code == quality::BACKING_OFF => {
                    format!(
                        "{}; polled less often until it answers",
                        quality::describe(cause)
                    )
                }
                _ => quality::describe(code),
            };
            (DeviceState::Down, Some(reason))
        } else if stale {
            let reason = format!("nothing received for {:.1} s", silent_ms as f64 / 1000.0);
            (DeviceState::Down, Some(reason))
        } else if h.last_sample_ms.is_none() {
            (DeviceState::Waiting, None)
        } else {
            (DeviceState::Up, None)
        };
        DeviceView {
            id: spec.id.clone(),
            protocol: spec.protocol.to_string(),
            state,
            reason,
            tags: spec.tags,
            good: h.good,
            bad: h.bad,
            last_good_ms: h.last_good_ms,
            requests_per_cycle: h.requests_per_cycle,
            last_error: h.last_bad.map(|(code, at_ms)| ErrorView {
                code_hex: format!("{code:#010x}"),
                text: quality::describe(code),
                at_ms,
            }),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BufferView {
    pub used_bytes: u64,
    pub max_bytes: u64,
    /// used / max, 0..=1.
    pub fill: f64,
    pub pending_batches: u64,
    pub backlog_age_s: f64,
    pub dropped_points: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UplinkView {
    pub state: UplinkState,
    pub since_ms: i64,
    pub last_ack_ms: Option<i64>,
    pub rtt_ms: Option<f64>,
    /// Ingest's clock minus this gateway's.
    pub clock_offset_ms: Option<i64>,
    pub last_error: Option<String>,
    /// The endpoint connected to, or of the latest attempt (None before
    /// the first, and from a gateway older than this field).
    #[serde(default)]
    pub endpoint: Option<String>,
}

/// Everything the status page shows; `/status.json` is this as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub gateway: String,
    pub version: String,
    pub manifest_version: String,
    pub started_ms: i64,
    pub now_ms: i64,
    pub ready: bool,
    pub not_ready: Vec<String>,
    pub buffer: BufferView,
    pub uplink: UplinkView,
    pub devices: Vec<DeviceView>,
}

/// `3.2 s ago`, or `never`.
fn ago(now: i64, at: Option<i64>) -> String {
    match at {
        Some(t) => format!("{:.1} s ago", (now - t) as f64 / 1000.0),
        None => "never".into(),
    }
}

fn or_dash<T: fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

impl Snapshot {
    fn rtt(&self) -> String {
        or_dash(self.uplink.rtt_ms.map(|r| format!("{r:.1} ms")))
    }
    fn offset(&self) -> String {
        or_dash(self.uplink.clock_offset_ms.map(|o| format!("{o:+} ms")))
    }
    fn fill(&self) -> String {
        format!(
            "{:.2}% ({} of {} bytes)",
            self.buffer.fill * 100.0,
            self.buffer.used_bytes,
            self.buffer.max_bytes
        )
    }

    /// The page: plain HTML, refreshed by the browser every 5 s.
    pub fn html(&self) -> Markup {
        let now = self.now_ms;
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta http-equiv="refresh" content="5";
                    title { "Guantong gateway " (self.gateway) " — status 状态" }
                    style { "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}.down{color:#b00;font-weight:bold}.up{color:#070}" }
                }
                body {
                    h1 { "Gateway " span id="gateway" { (self.gateway) } " 网关状态" }
                    p {
                        "Version " span id="version" { (self.version) }
                        ", config (manifest) " span id="manifest-version" { (self.manifest_version) }
                        ", ready 就绪: " span id="ready" { (if self.ready { "yes" } else { "no" }) }
                        @for reason in &self.not_ready { " — " (reason) }
                    }
                    h2 { "Buffer 缓存" }
                    table {
                        tr { th { "Fill 占用" } td id="buffer-fill" { (self.fill()) } }
                        tr { th { "Pending batches 待发批次" } td id="pending-batches" { (self.buffer.pending_batches) } }
                        tr { th { "Backlog age (s) 积压时长" } td id="backlog-age" { (format!("{:.1}", self.buffer.backlog_age_s)) } }
                        tr { th { "Points dropped 丢弃点数" } td id="dropped-points" { (self.buffer.dropped_points) } }
                    }
                    h2 { "Uplink 上行" }
                    table {
                        tr { th { "State 状态" } td id="uplink-state" { (self.uplink.state) } }
                        tr { th { "Endpoint 端点" } td id="uplink-endpoint" { (or_dash(self.uplink.endpoint.as_deref())) } }
                        tr { th { "Since" } td { (ago(now, Some(self.uplink.since_ms))) } }
                        tr { th { "Last ack 最近确认" } td id="last-ack" { (ago(now, self.uplink.last_ack_ms)) } }
                        tr { th { "Round trip 往返" } td id="rtt" { (self.rtt()) } }
                        tr { th { "Clock offset (ingest − gateway) 时钟偏差" } td id="clock-offset" { (self.offset()) } }
                        tr { th { "Last error" } td id="uplink-error" { (self.uplink.last_error.as_deref().unwrap_or("-")) } }
                    }
                    h2 { "Devices 设备" }
                    table {
                        tr {
                            th { "Device 设备" } th { "Protocol" } th { "State 状态" } th { "Tags" }
                            th { "Last good value 最近有效值" } th { "Good" } th { "Bad" }
                            th { "Requests per cycle 每周期请求数" } th { "Last error 最近错误" }
                        }
                        @for d in &self.devices {
                            tr id={ "device-" (d.id) } {
                                td { (d.id) }
                                td { (d.protocol) }
                                td class=(d.state) id={ "device-" (d.id) "-state" } {
                                    (d.state)
                                    @if let Some(r) = &d.reason { " (" (r) ")" }
                                }
                                td { (d.tags) }
                                td { (ago(now, d.last_good_ms)) }
                                td id={ "device-" (d.id) "-good" } { (d.good) }
                                td id={ "device-" (d.id) "-bad" } { (d.bad) }
                                td id={ "device-" (d.id) "-requests" } { (or_dash(d.requests_per_cycle)) }
                                td {
                                    @match &d.last_error {
                                        Some(e) => { (e.code_hex) " " (e.text) ", " (ago(now, Some(e.at_ms))) }
                                        None => "-",
                                    }
                                }
                            }
                        }
                    }
                    p { a href="/metrics" { "/metrics" } " · " a href="/status.json" { "/status.json" } }
                }
            }
        }
    }
}

/// The terminal form of the page (`guantong-gateway status`).
impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let now = self.now_ms;
        writeln!(f, "gateway           {}", self.gateway)?;
        writeln!(f, "version           {}", self.version)?;
        writeln!(f, "manifest version  {}", self.manifest_version)?;
        write!(
            f,
            "ready             {}",
            if self.ready { "yes" } else { "no" }
        )?;
        for r in &self.not_ready {
            write!(f, " ({r})")?;
        }
        writeln!(f)?;
        writeln!(f, "buffer fill       {}", self.fill())?;
        writeln!(f, "pending batches   {}", self.buffer.pending_batches)?;
        writeln!(f, "backlog age       {:.1} s", self.buffer.backlog_age_s)?;
        writeln!(f, "points dropped    {}", self.buffer.dropped_points)?;
        writeln!(
            f,
            "uplink            {} (since {})",
            self.uplink.state,
            ago(now, Some(self.uplink.since_ms))
        )?;
        writeln!(
            f,
            "endpoint          {}",
            or_dash(self.uplink.endpoint.as_deref())
        )?;
        writeln!(f, "last ack          {}", ago(now, self.uplink.last_ack_ms))?;
        writeln!(f, "round trip        {}", self.rtt())?;
        writeln!(f, "clock offset      {}", self.offset())?;
        if let Some(e) = &self.uplink.last_error {
            writeln!(f, "last uplink error {e}")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<20} {:<8} {:<8} {:>6} {:>10} {:>8} {:>9} {:<16} last error",
            "device", "protocol", "state", "tags", "good", "bad", "req/cycle", "last good"
        )?;
        for d in &self.devices {
            let error = match &d.last_error {
                Some(e) => format!("{} {} ({})", e.code_hex, e.text, ago(now, Some(e.at_ms))),
                None => "-".into(),
            };
            writeln!(
                f,
                "{:<20} {:<8} {:<8} {:>6} {:>10} {:>8} {:>9} {:<16} {error}",
                d.id,
                d.protocol,
                d.state.to_string(),
                d.tags,
                d.good,
                d.bad,
                or_dash(d.requests_per_cycle),
                ago(now, d.last_good_ms)
            )?;
            if let Some(r) = &d.reason {
                writeln!(f, "{:<20} down because: {r}", "")?;
            }
        }
        Ok(())
    }
}

#[derive(Clone)]
struct Listener {
    status: Arc<Status>,
    buffer: Arc<Buffer>,
    max_bytes: u64,
}

impl Listener {
    async fn snapshot(&self) -> Option<Snapshot> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.status.snapshot(&this.buffer, this.max_bytes))
            .await
            .ok()
    }
}

fn unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "status unavailable\n").into_response()
}

async fn page(State(l): State<Listener>) -> Response {
    match l.snapshot().await {
        Some(s) => s.html().into_response(),
        None => unavailable(),
    }
}

async fn json(State(l): State<Listener>) -> Response {
    match l.snapshot().await {
        Some(s) => axum::Json(s).into_response(),
        None => unavailable(),
    }
}

async fn metrics(State(l): State<Listener>) -> Response {
    // The snapshot refreshes the gauges read at scrape time.
    if l.snapshot().await.is_none() {
        return unavailable();
    }
    match l.status.encode_metrics() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(l): State<Listener>) -> Response {
    match l.snapshot().await {
        Some(s) if s.ready => "ready\n".into_response(),
        Some(s) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", s.not_ready.join("; ")),
        )
            .into_response(),
        None => unavailable(),
    }
}

/// Starts the status listener on `listen` (nothing when it is empty) and
/// returns the bound address. It stops when `cancel` fires.
pub async fn serve(
    listen: &str,
    status: Arc<Status>,
    buffer: Arc<Buffer>,
    max_bytes: u64,
    cancel: CancellationToken,
) -> Result<Option<SocketAddr>, StatusError> {
    if listen.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| StatusError::Bind {
            addr: listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StatusError::Bind {
        addr: listen.to_string(),
        source,
    })?;
    if !addr.ip().is_loopback() {
        warn!(%addr, "the status listener is reachable from the network and has no login; prefer a loopback address");
    }
    let app = Router::new()
        .route("/", get(page))
        .route("/status.json", get(json))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Listener {
            status,
            buffer,
            max_bytes,
        });
    tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned());
        if let Err(e) = server.await {
            warn!(error = %e, "status listener stopped");
        }
    });
    info!(%addr, "status listener started");
    Ok(Some(addr))
}

/// Reads the status of the gateway whose status listener is `listen`
/// (`[status] listen` of its config).
pub async fn fetch(listen: &str) -> Result<Snapshot, StatusError> {
    if listen.is_empty() {
        return Err(StatusError::Off);
    }
    let mut addr: SocketAddr = listen
        .parse()
        .map_err(|_| StatusError::Address(listen.to_string()))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let failed = |reason: String| StatusError::Fetch { addr, reason };
    let body = tokio::time::timeout(FETCH_TIMEOUT, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        // HTTP/1.0: the answer ends when the connection closes, never chunked.
        stream
            .write_all(b"GET /status.json HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    })
    .await
    .map_err(|_| failed(format!("no answer within {FETCH_TIMEOUT:?}")))?
    .map_err(|e| failed(format!("{e} (is the gateway running?)")))?;
    let text = String::from_utf8_lossy(&body);
    let (head, json) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| failed("not an HTTP answer".into()))?;
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(failed(format!("answered `{status_line}`")));
    }
    serde_json::from_str(json).map_err(|e| failed(format!("not a gateway status: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use guantong_proto::v1::point::Value;

    fn spec(id: &str, first_tag: u32, tags: u32, stale_ms: Option<u64>) -> DeviceSpec {
        DeviceSpec {
            id: id.into(),
            protocol: "modbus",
            first_tag,
            tags,
            stale_after: stale_ms.map(Duration::from_millis),
        }
    }

    fn buffer(dir: &std::path::Path) -> Buffer {
        Buffer::open(dir, 1 << 20, crate::buffer::WhenFull::DropOldest).expect("buffer")
    }

    #[test]
    fn samples_count_for_the_device_owning_their_tag() {
        let status = Status::new(
            "gw",
            1,
            vec![spec("a", 0, 2, None), spec("b", 2, 3, None)],
            0,
        );
        status.observe(&[
            Sample::good(0, 0, Value::Uint(1)),
            Sample::good(1, 0, Value::Uint(1)),
            Sample::bad(4, 0, quality::MODBUS_EXCEPTION | 2),
            Sample::good(9, 0, Value::Uint(1)), // no such tag: ignored
        ]);
        let dir = tempfile::tempdir().expect("dir");
        let s = status.snapshot(&buffer(dir.path()), 1 << 20);
        assert_eq!((s.devices[0].good, s.devices[0].bad), (2, 0));
        assert_eq!((s.devices[1].good, s.devices[1].bad), (0, 1));
        // An exception is a data-quality fact, not a lost connection.
        assert_eq!(s.devices[1].state, DeviceState::Up);
        let e = s.devices[1].last_error.as_ref().expect("last error");
        assert_eq!(e.code_hex, "0x00010002");
        assert!(e.text.contains("illegal data address"), "{}", e.text);
    }

    /// After a reload `guantong_gateway_info` names the new manifest, and
    /// only it (a scrape must not see two manifests running).
    #[test]
    fn the_info_metric_follows_the_running_manifest() {
        let status = Status::new("gw", 1, vec![spec("a", 0, 1, None)], 0);
        status.reconfigure(0xbeef, vec![spec("a", 0, 1, None)]);
        let text = status.encode_metrics().expect("metrics");
        let info: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("guantong_gateway_info{"))
            .collect();
        assert_eq!(info.len(), 1, "{text}");
        assert!(
            info[0].contains("manifest_version=\"000000000000beef\"") && info[0].ends_with(" 1"),
            "{text}"
        );
    }

    #[test]
    fn a_link_failure_is_down_until_a_good_sample() {
        let status = Status::new("gw", 1, vec![spec("a", 0, 1, None)], 0);
        let dir = tempfile::tempdir().expect("dir");
        let b = buffer(dir.path());
        assert_eq!(
            status.snapshot(&b, 1).devices[0].state,
            DeviceState::Waiting
        );
        status.observe(&[Sample::bad(0, 0, quality::TIMEOUT)]);
        let d = &status.snapshot(&b, 1).devices[0];
        assert_eq!(d.state, DeviceState::Down);
        assert_eq!(d.reason.as_deref(), Some("no answer within the timeout"));
        // Backing off, the reason still names why.
        status.observe(&[Sample::bad(0, 0, quality::BACKING_OFF)]);
        let d = &status.snapshot(&b, 1).devices[0];
        assert_eq!(
            d.reason.as_deref(),
            Some("no answer within the timeout; polled less often until it answers")
        );
        status.observe(&[Sample::good(0, 0, Value::Uint(1))]);
        assert_eq!(status.snapshot(&b, 1).devices[0].state, DeviceState::Up);
    }

    #[test]
    fn silence_longer_than_stale_after_is_down() {
        let status = Status::new("gw", 1, vec![spec("a", 0, 1, Some(30))], 0);
        let dir = tempfile::tempdir().expect("dir");
        let b = buffer(dir.path());
        status.observe(&[Sample::good(0, 0, Value::Uint(1))]);
        assert_eq!(status.snapshot(&b, 1).devices[0].state, DeviceState::Up);
        std::thread::sleep(Duration::from_millis(60));
        let d = &status.snapshot(&b, 1).devices[0];
        assert_eq!(d.state, DeviceState::Down);
        assert!(
            d.reason
                .as_deref()
                .is_some_and(|r| r.starts_with("nothing received"))
        );
    }

    #[test]
    fn backlog_age_counts_from_the_oldest_unacked_commit() {
        let dir = tempfile::tempdir().expect("dir");
        let b = buffer(dir.path());
        let status = Status::new("gw", 1, vec![spec("a", 0, 1, None)], 0);
        let samples = [Sample::good(0, now_ms(), Value::Uint(1))];
        let first = b.append(1, &samples, 100).expect("append");
        status.committed(Ok(first));
        std::thread::sleep(Duration::from_millis(1100));
        let second = b.append(1, &samples, 100).expect("append");
        status.committed(Ok(second));
        let s = status.snapshot(&b, 1 << 20);
        assert_eq!(s.buffer.pending_batches, 2);
        assert!(s.buffer.backlog_age_s >= 1.0, "{}", s.buffer.backlog_age_s);
        b.ack_range(first, first).expect("ack");
        let s = status.snapshot(&b, 1 << 20);
        assert!(s.buffer.backlog_age_s < 1.0, "{}", s.buffer.backlog_age_s);
        b.ack_range(second, second).expect("ack");
        assert_eq!(status.snapshot(&b, 1 << 20).buffer.backlog_age_s, 0.0);
    }

    #[test]
    fn a_failed_commit_is_not_ready_until_one_succeeds() {
        let dir = tempfile::tempdir().expect("dir");
        let b = buffer(dir.path());
        let status = Status::new("gw", 1, Vec::new(), 0);
        assert!(status.snapshot(&b, 1).ready);
        status.committed(Err("disk full".into()));
        let s = status.snapshot(&b, 1);
        assert!(!s.ready);
        assert!(s.not_ready[0].contains("disk full"));
        status.committed(Ok(1));
        assert!(status.snapshot(&b, 1).ready);
    }

    #[test]
    fn the_page_escapes_device_ids() {
        let status = Status::new("gw", 1, vec![spec("<b>x</b>", 0, 1, None)], 0);
        let dir = tempfile::tempdir().expect("dir");
        let page = status.snapshot(&buffer(dir.path()), 1).html().into_string();
        assert!(page.contains("&lt;b&gt;x&lt;/b&gt;"));
        assert!(!page.contains("<b>x</b>"));
    }

    /// The page, the terminal and the JSON name the endpoint of the latest
    /// attempt, kept through a backoff.
    #[test]
    fn the_uplink_endpoint_is_shown() {
        let status = Status::new("gw", 1, Vec::new(), 0);
        let dir = tempfile::tempdir().expect("dir");
        let buffer = buffer(dir.path());
        let page = status.snapshot(&buffer, 1).html().into_string();
        assert!(
            page.contains(r#"<td id="uplink-endpoint">-</td>"#),
            "{page}"
        );
        status.uplink_connecting("https://b:7600");
        status.uplink_backoff("refused".into());
        let s = status.snapshot(&buffer, 1);
        assert_eq!(s.uplink.endpoint.as_deref(), Some("https://b:7600"));
        let page = s.html().into_string();
        assert!(
            page.contains(r#"<td id="uplink-endpoint">https://b:7600</td>"#),
            "{page}"
        );
        assert!(s.to_string().contains("endpoint          https://b:7600\n"));
        // A gateway older than the field answers without it.
        let mut json = serde_json::to_value(&s).expect("json");
        json["uplink"]
            .as_object_mut()
            .expect("uplink")
            .remove("endpoint");
        let old: Snapshot = serde_json::from_value(json).expect("old snapshot");
        assert_eq!(old.uplink.endpoint, None);
    }
}
