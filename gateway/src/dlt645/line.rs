//! A DL/T 645 line: one connection and the meters polled over it, one
//! request at a time.
//!
//! The rules are Modbus RTU's (`modbus::line`), for meters: one task owns
//! the serial port or the serial device server's connection and sends
//! strictly one request at a time, waiting the inter-frame delay after every
//! answer. Each meter is polled every `poll_interval`, one read per tag (DL/T
//! 645 reads one data identifier per frame); a meter that fell behind skips
//! the missed ticks, and a poll starts at least half an interval after the
//! previous one ended.
//!
//! Dead meters: a meter that does not answer costs its timeout once (the
//! rest of its tags are Bad with the same code, not asked); it is then not
//! polled, its points are Bad `BACKING_OFF` every poll, and after
//! `poll_interval × 2^(failures-1)` (at most `max_backoff`) it is probed with
//! one read of its first tag, sent in the line's idle time only, with a
//! timeout cut to that idle time (at least `probe_min_timeout`, the wire time
//! of one exchange at the line's baud rate plus margin), so the live meters
//! keep their interval. A line never idle that long probes after
//! `max_backoff` more. Any answer, even an error frame, ends the backoff.
//!
//! Answers: an error frame (control code bit 6) is the meter saying no to
//! one DI: Bad `DLT645_ERROR | error byte` for that tag, the meter stays
//! live. Bytes that form no valid frame are diagnosed once per line
//! (`modbus::line::GARBLED_DIAGNOSIS`) and back the meter off as if dead.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::{Dlt645Config, Dlt645Transport};
use super::transport::{self, Connection, Outcome};
use crate::collector::{Collector, PointSink};
use crate::modbus::line::{GARBLED_DIAGNOSIS, Reconnect, backoff};
use crate::quality::{self, Sample, now_ms};
use crate::status::Status;

/// Longest request and answer of a read at the usual data lengths, in bytes
/// (preamble included), for sizing the shortest probe timeout.
const EXCHANGE_BYTES: u32 = 20 + 26;

/// The shortest timeout a probe of a backed-off meter gets: one exchange's
/// wire time at `baud_rate` (11 bits a byte, 8E1), plus 100 ms for the
/// meter's turnaround; 300 ms through a serial device server (speed unknown).
pub fn probe_min_timeout(baud_rate: Option<u32>) -> Duration {
    match baud_rate {
        Some(b) => {
            Duration::from_secs_f64(f64::from(EXCHANGE_BYTES * 11) / f64::from(b.max(1)))
                + Duration::from_millis(100)
        }
        None => Duration::from_millis(300),
    }
}

/// One meter on a line.
#[derive(Debug)]
pub struct Meter {
    pub config: Dlt645Config,
    /// Manifest index of its first tag; tag `i` is `first_tag + i`.
    pub first_tag: u32,
    next: Instant,
    /// Consecutive polls and probes without an answer; above 0 the meter is
    /// backed off.
    failures: u32,
    resume_at: Option<Instant>,
}

impl Meter {
    pub fn new(config: Dlt645Config, first_tag: u32) -> Meter {
        Meter {
            config,
            first_tag,
            next: Instant::now(),
            failures: 0,
            resume_at: None,
        }
    }

    fn bad_from(&self, from: usize, code: u32, out: &mut Vec<Sample>) {
        let t = now_ms();
        out.extend(
            (from..self.config.tags.len()).map(|i| Sample::bad(self.first_tag + i as u32, t, code)),
        );
    }
}

/// The connection of a line and the meters on it.
pub struct Line {
    pub key: String,
    transport: Dlt645Transport,
    pub meters: Vec<Meter>,
    conn: Option<Connection>,
    reconnect: Reconnect,
    /// End of the last exchange: the next request waits the inter-frame
    /// delay from here.
    quiet_since: Option<Instant>,
    garbled_reported: bool,
    status: Option<Arc<Status>>,
}

impl Line {
    pub fn new(key: String, meters: Vec<Meter>) -> Line {
        let transport = meters
            .first()
            .map(|m| m.config.transport.clone())
            .unwrap_or(Dlt645Transport::Tcp {
                host: String::new(),
                port: 0,
                inter_frame_delay: Duration::ZERO,
            });
        Line {
            key,
            transport,
            meters,
            conn: None,
            reconnect: Reconnect::default(),
            quiet_since: None,
            garbled_reported: false,
            status: None,
        }
    }

    /// Runs over `conn` (already open) instead of opening the transport:
    /// for tests with an emulated line.
    #[doc(hidden)]
    pub fn attach(mut self, conn: Connection) -> Line {
        self.conn = Some(conn);
        self
    }

    /// Reports requests per cycle of each meter to `status`.
    pub fn report_to(mut self, status: Arc<Status>) -> Line {
        self.status = Some(status);
        self
    }

    fn timeout(&self) -> Duration {
        self.meters
            .iter()
            .map(|m| m.config.timeout)
            .max()
            .unwrap_or(Duration::from_secs(1))
    }

    fn max_backoff(&self) -> Duration {
        self.meters
            .iter()
            .map(|m| m.config.max_backoff)
            .min()
            .unwrap_or(Duration::from_secs(60))
    }

    async fn ensure_connected(&mut self) -> Result<(), u32> {
        if self.conn.is_some() {
            return Ok(());
        }
        if !self.reconnect.due() {
            return Err(quality::CONNECT_FAILED);
        }
        match transport::connect(&self.transport, self.timeout()).await {
            Ok(conn) => {
                info!(line = %self.key, "dlt645 line connected");
                self.conn = Some(conn);
                self.reconnect.connected();
                Ok(())
            }
            Err(e) => {
                let max = self.max_backoff();
                self.reconnect.failed("dlt645", &self.key, e, max);
                Err(quality::CONNECT_FAILED)
            }
        }
    }

    /// Waits the inter-frame delay, then reads `di` of meter `m` within `limit`.
    async fn read(&mut self, m: usize, di: u32, limit: Duration) -> Outcome {
        let delay = self.transport.inter_frame_delay();
        if let Some(q) = self.quiet_since
            && !delay.is_zero()
        {
            tokio::time::sleep_until(q + delay).await;
        }
        let Some(conn) = self.conn.as_mut() else {
            return Outcome::Broken("not connected".into());
        };
        let meter = self.meters[m].config.meter;
        let outcome = conn.read(meter, di, limit).await;
        self.quiet_since = Some(Instant::now());
        if matches!(outcome, Outcome::Frame) && !self.garbled_reported {
            self.garbled_reported = true;
            let c = &self.meters[m].config;
            warn!(line = %self.key, device = %c.id, meter = %c.meter, "{GARBLED_DIAGNOSIS}");
        }
        outcome
    }

    /// Polls meter `m` once, appending a sample per tag; returns the
    /// requests sent.
    async fn poll_meter(&mut self, m: usize, out: &mut Vec<Sample>) -> u32 {
        if let Err(code) = self.ensure_connected().await {
            self.meters[m].bad_from(0, code, out);
            return 0;
        }
        if self.meters[m].failures > 0 {
            // Only its probe, in the line's idle time, may bring it back.
            self.meters[m].bad_from(0, quality::BACKING_OFF, out);
            return 0;
        }
        let limit = self.meters[m].config.timeout;
        let mut requests = 0;
        for i in 0..self.meters[m].config.tags.len() {
            let di = self.meters[m].config.tags[i].di;
            requests += 1;
            let outcome = self.read(m, di, limit).await;
            let meter = &self.meters[m];
            let tag = meter.first_tag + i as u32;
            match outcome {
                Outcome::Data(bytes) => {
                    out.push(match meter.config.tags[i].reading.decode(&bytes) {
                        Ok(v) => Sample::good(tag, now_ms(), v),
                        Err(code) => Sample::bad(tag, now_ms(), code),
                    });
                }
                Outcome::Timeout | Outcome::Frame => {
                    meter.bad_from(i, outcome.code(), out);
                    self.not_answered(m, &outcome);
                    return requests;
                }
                Outcome::Broken(_) => {
                    meter.bad_from(i, outcome.code(), out);
                    self.drop_connection(&outcome);
                    return requests;
                }
                other => out.push(Sample::bad(tag, now_ms(), other.code())),
            }
        }
        self.answered(m);
        requests
    }

    /// Meter `m` gave no (valid) answer: backs it off, longer each time.
    fn not_answered(&mut self, m: usize, outcome: &Outcome) {
        let meter = &mut self.meters[m];
        meter.failures += 1;
        let wait = backoff(
            meter.config.poll_interval,
            meter.failures,
            meter.config.max_backoff,
        );
        if meter.failures == 1 {
            let code = format_args!("{:#010x}", outcome.code());
            let (device, address) = (&meter.config.id, meter.config.meter);
            if matches!(outcome, Outcome::Frame) {
                warn!(%device, meter = %address, %code, "dlt645 meter's answers are garbled; backing off");
            } else {
                warn!(%device, meter = %address, %code, "dlt645 meter not answering; backing off");
            }
        }
        meter.resume_at = Some(Instant::now() + wait);
    }

    fn answered(&mut self, m: usize) {
        let meter = &mut self.meters[m];
        if meter.failures > 0 {
            info!(device = %meter.config.id, meter = %meter.config.meter, "dlt645 meter answering again");
        }
        meter.failures = 0;
        meter.resume_at = None;
    }

    fn drop_connection(&mut self, why: &Outcome) {
        if let Outcome::Broken(e) = why {
            warn!(line = %self.key, error = %e, "dlt645 connection broken; reconnecting");
        }
        self.conn = None;
        self.quiet_since = None;
    }

    /// The backed-off meter due for its probe first, and when.
    fn next_probe(&self) -> Option<(usize, Instant)> {
        self.meters
            .iter()
            .enumerate()
            .filter(|(_, m)| m.failures > 0)
            .filter_map(|(i, m)| m.resume_at.map(|t| (i, t)))
            .min_by_key(|&(_, t)| t)
    }

    /// Time until the next poll of a live meter (None: no live meter).
    fn idle_window(&self, now: Instant) -> Option<Duration> {
        self.meters
            .iter()
            .filter(|m| m.failures == 0)
            .map(|m| m.next)
            .min()
            .map(|t| t.saturating_duration_since(now))
    }

    /// Probes backed-off meter `m` (due at `due`) if the line is idle long
    /// enough; false if it did not fit (the caller polls first).
    async fn probe(&mut self, m: usize, due: Instant) -> bool {
        let now = Instant::now();
        let shortest = probe_min_timeout(self.transport.baud_rate());
        let meter = &self.meters[m];
        let window = self.idle_window(now);
        let overdue = now.saturating_duration_since(due) >= meter.config.max_backoff;
        if window.is_some_and(|w| w < shortest) && !overdue {
            return false;
        }
        let limit = window
            .unwrap_or(meter.config.timeout)
            .max(shortest)
            .min(meter.config.timeout);
        let Some(di) = meter.config.tags.first().map(|t| t.di) else {
            self.meters[m].resume_at = None;
            return true;
        };
        if self.ensure_connected().await.is_err() {
            self.not_answered(m, &Outcome::Broken("not connected".into()));
            return true;
        }
        let outcome = self.read(m, di, limit).await;
        if outcome.answered() {
            // Its polls resume at their next due time.
            self.answered(m);
        } else {
            self.not_answered(m, &outcome);
            if matches!(outcome, Outcome::Broken(_)) {
                self.drop_connection(&outcome);
            }
        }
        true
    }

    /// The meter due first, and when.
    fn next_due(&self) -> Option<(usize, Instant)> {
        self.meters
            .iter()
            .enumerate()
            .map(|(i, m)| (i, m.next))
            .min_by_key(|&(_, t)| t)
    }
}

impl Collector for Line {
    async fn run(mut self, sink: PointSink, cancel: CancellationToken) {
        info!(line = %self.key, meters = self.meters.len(), "dlt645 line starting");
        let mut probe_deferred = false;
        loop {
            let Some((m, due)) = self.next_due() else {
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
                // Not cancel-safe: a probe is one bounded exchange.
                probe_deferred = !self.probe(p, probe_due).await;
                continue;
            }
            probe_deferred = false;
            {
                let meter = &mut self.meters[m];
                let interval = meter.config.poll_interval;
                meter.next += interval;
                let now = Instant::now();
                if meter.next <= now {
                    // Behind (a slow line): skip the missed ticks.
                    meter.next = now + interval;
                }
            }
            let mut samples = Vec::with_capacity(self.meters[m].config.tags.len());
            // Not cancel-safe on purpose: a poll runs to its end (each
            // exchange is bounded) so no frame is cut in half.
            let requests = self.poll_meter(m, &mut samples).await;
            let meter = &mut self.meters[m];
            meter.next = meter
                .next
                .max(Instant::now() + meter.config.poll_interval / 2);
            if let Some(status) = &self.status {
                status.requests_per_cycle(meter.first_tag, requests);
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
    use crate::dlt645::config::Dlt645TagConfig;
    use crate::dlt645::di::{Format, Reading};
    use crate::dlt645::frame::{self, Address, Found};
    use guantong_proto::v1::point::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn meter(n: u8, tags: &[u32]) -> Dlt645Config {
        Dlt645Config {
            id: format!("m{n}"),
            transport: Dlt645Transport::Tcp {
                host: "emulated".into(),
                port: 0,
                inter_frame_delay: Duration::from_millis(5),
            },
            meter: Address([n, 0, 0, 0, 0, 0]),
            poll_interval: Duration::from_millis(500),
            timeout: Duration::from_secs(1),
            max_backoff: Duration::from_secs(4),
            identity: Default::default(),
            tags: tags
                .iter()
                .map(|&di| Dlt645TagConfig {
                    name: format!("{di:08X}"),
                    di,
                    reading: Reading {
                        length: 2,
                        format: Format::Number,
                        signed: false,
                        scale: 0.1,
                    },
                    unit: String::new(),
                })
                .collect(),
        }
    }

    /// Meter 1 answers DI 02010100 with 220.1 V and anything else with an
    /// error frame (error byte 02); any other meter is silent.
    async fn emulated_line(mut io: tokio::io::DuplexStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 256];
        while let Ok(n) = io.read(&mut chunk).await {
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Found::Frame(f, end) = frame::find_frame(&buf) {
                buf.drain(..end);
                if f.address != Address([1, 0, 0, 0, 0, 0]) {
                    continue;
                }
                let answer = if f.data == [0x00, 0x01, 0x01, 0x02] {
                    frame::request(f.address, 0x91, &[0x00, 0x01, 0x01, 0x02, 0x01, 0x22])
                } else {
                    frame::request(f.address, 0xD1, &[0x02])
                };
                if io.write_all(&answer).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Meter 1 is live, meter 2 dead, on one line: meter 1's value and its
    /// refused DI (Bad with the error byte, the meter stays live) arrive
    /// every 500 ms; meter 2 costs its timeout once, then is Bad
    /// BACKING_OFF without being asked, probed only in idle time.
    #[tokio::test(start_paused = true)]
    async fn a_dead_meter_is_backed_off_and_the_live_one_keeps_its_interval() {
        let (client, device) = tokio::io::duplex(4096);
        tokio::spawn(emulated_line(device));
        let line = Line::new(
            "test".into(),
            vec![
                Meter::new(meter(1, &[0x0201_0100, 0x0201_0200]), 0),
                Meter::new(meter(2, &[0x0201_0100]), 2),
            ],
        )
        .attach(Connection::attach(client));
        let (sink, mut rx) = PointSink::new(1024);
        let cancel = CancellationToken::new();
        let run = tokio::spawn(line.run(sink, cancel.clone()));
        let start = Instant::now();
        let (mut live, mut dead) = (Vec::new(), Vec::new());
        while start.elapsed() < Duration::from_secs(20) {
            let Some(h) = rx.recv().await else { break };
            for s in h.samples {
                match s.tag {
                    0 => live.push((start.elapsed(), s.value)),
                    1 => assert_eq!(s.code, quality::DLT645_ERROR | 2, "{s:?}"),
                    _ => dead.push(s.code),
                }
            }
        }
        cancel.cancel();
        let _ = run.await;
        assert!(
            live.iter().all(|(_, v)| *v == Some(Value::Double(220.1))),
            "{live:?}"
        );
        // 40 polls at 500 ms in 20 s; the dead meter's first timeout costs
        // two, its probes (in idle time, cut to it) cost none.
        assert!(
            live.len() >= 36,
            "{} polls of the live meter: {live:?}",
            live.len()
        );
        assert_eq!(dead.first(), Some(&quality::TIMEOUT), "{dead:?}");
        assert_eq!(
            dead.iter().filter(|&&c| c == quality::TIMEOUT).count(),
            1,
            "{dead:?}"
        );
        assert!(
            dead[1..].iter().all(|&c| c == quality::BACKING_OFF),
            "{dead:?}"
        );
    }

    #[test]
    fn the_shortest_probe_covers_one_exchange_at_the_baud_rate() {
        // 46 bytes of 11 bits at 2400 baud: 211 ms, plus 100 ms.
        let t = probe_min_timeout(Some(2400));
        assert!(
            t > Duration::from_millis(305) && t < Duration::from_millis(315),
            "{t:?}"
        );
        assert_eq!(probe_min_timeout(None), Duration::from_millis(300));
    }
}
