//! Per-gateway quotas: points per second, bytes per second and open streams.
//!
//! # Design
//! Each gateway has one token bucket for points and one for bytes, shared by
//! all its streams, each holding at most one second of its rate. A batch
//! takes its points and bytes from the buckets; when they run short the
//! stream's reader sleeps until they refill. While it sleeps it reads
//! nothing more, so HTTP/2 flow control pushes back on that gateway's
//! connection alone: other gateways' streams are other tasks with their own
//! buckets and keep their latency. A batch larger than a bucket is let
//! through on credit (the bucket goes negative), so no batch waits forever.
//!
//! A stream beyond `max_streams` for one gateway is refused with
//! RESOURCE_EXHAUSTED; its slot is freed when the stream ends.
//!
//! The HTTP API has limits of its own (`HttpLimits`, applied by
//! `http::router`): at most `max_concurrent` requests are served at
//! once across all routes, and one more is refused at once with 503 rather
//! than queued, so a burst or slow clients cannot pile up work; a request
//! not answered within `timeout` (reading its body included) is
//! answered 408 and its work dropped, freeing its slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Status;

/// Quota options of `guantong-ingest serve`; 0 means unlimited.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Limits {
    /// Points per second one gateway may send (all its streams together);
    /// beyond it the gateway is slowed down, not refused. 0: unlimited.
    #[arg(long, env = "GUANTONG_MAX_POINTS_PER_SEC", default_value_t = 5_000_000)]
    pub max_points_per_sec: u64,
    /// Bytes of batch payload per second one gateway may send. 0: unlimited.
    #[arg(long, env = "GUANTONG_MAX_BYTES_PER_SEC", default_value_t = 128 << 20)]
    pub max_bytes_per_sec: u64,
    /// Open uplink streams one gateway may hold at once.
    #[arg(long, env = "GUANTONG_MAX_STREAMS_PER_GATEWAY", default_value_t = 4)]
    pub max_streams_per_gateway: u32,
    #[command(flatten)]
    pub http: HttpLimits,
}

/// Limits of the HTTP API (`serve --http-timeout --http-max-concurrent`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct HttpLimits {
    /// Longest time one HTTP request may take, reading its body included;
    /// beyond it the answer is 408 and the work is dropped.
    #[arg(long = "http-timeout", env = "GUANTONG_HTTP_TIMEOUT", default_value = "60s", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// HTTP requests served at once (all routes but /healthz); one more is
    /// refused at once with 503 and `Retry-After`.
    #[arg(long = "http-max-concurrent", env = "GUANTONG_HTTP_MAX_CONCURRENT", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            timeout: Duration::from_secs(60),
            max_concurrent: 64,
        }
    }
}

/// `--http-timeout`: a duration (`30s`, `2m`, `500ms`) above zero.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be above zero".into()),
        Err(e) => Err(format!(
            "`{s}` is not a duration like 30s, 2m or 500ms: {e}"
        )),
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_points_per_sec: 5_000_000,
            max_bytes_per_sec: 128 << 20,
            max_streams_per_gateway: 4,
            http: HttpLimits::default(),
        }
    }
}

impl Limits {
    /// No quota at all (benchmarks of ingest's own speed).
    pub fn unlimited() -> Limits {
        Limits {
            max_points_per_sec: 0,
            max_bytes_per_sec: 0,
            max_streams_per_gateway: u32::MAX,
            http: HttpLimits::default(),
        }
    }
}

struct Bucket {
    rate: f64,
    available: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket {
            rate: rate as f64,
            available: rate as f64,
            at: Instant::now(),
        }
    }

    /// Takes `cost`; returns how long to wait before going on.
    fn take(&mut self, cost: u64, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.available = (self.available + elapsed * self.rate).min(self.rate);
        self.available -= cost as f64;
        if self.available >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.available / self.rate)
        }
    }
}

struct GatewayState {
    points: Bucket,
    bytes: Bucket,
    streams: u32,
    throttled: u64,
}

/// The quotas of every gateway.
pub struct Quotas {
    limits: Limits,
    gateways: Mutex<HashMap<String, GatewayState>>,
}

/// An open stream's slot; freed on drop.
pub struct StreamSlot {
    quotas: Arc<Quotas>,
    gateway: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Ok(mut g) = self.quotas.gateways.lock()
            && let Some(s) = g.get_mut(&self.gateway)
        {
            s.streams = s.streams.saturating_sub(1);
        }
    }
}

impl Quotas {
    pub fn new(limits: Limits) -> Arc<Quotas> {
        Arc::new(Quotas {
            limits,
            gateways: Mutex::new(HashMap::new()),
        })
    }

    fn with<T>(&self, gateway: &str, f: impl FnOnce(&mut GatewayState) -> T) -> T {
        let mut map = self.gateways.lock().unwrap_or_else(|e| e.into_inner());
        let state = map
            .entry(gateway.to_string())
            .or_insert_with(|| GatewayState {
                points: Bucket::new(self.limits.max_points_per_sec),
                bytes: Bucket::new(self.limits.max_bytes_per_sec),
                streams: 0,
                throttled: 0,
            });
        f(state)
    }

    /// A slot for one more stream of `gateway`, or RESOURCE_EXHAUSTED.
    pub fn open_stream(self: &Arc<Self>, gateway: &str) -> Result<StreamSlot, Status> {
        let max = self.limits.max_streams_per_gateway;
        self.with(gateway, |s| {
            if s.streams >= max {
                return Err(Status::resource_exhausted(format!(
                    "gateway `{gateway}` already has {} open streams (limit {max}, --max-streams-per-gateway)",
                    s.streams
                )));
            }
            s.streams += 1;
            Ok(())
        })?;
        Ok(StreamSlot {
            quotas: self.clone(),
            gateway: gateway.to_string(),
        })
    }

    /// Charges one batch to `gateway`; returns how long its stream must
    /// wait before reading on (zero within quota).
    pub fn charge(&self, gateway: &str, points: u64, bytes: u64) -> Duration {
        let now = Instant::now();
        self.with(gateway, |s| {
            let wait = s.points.take(points, now).max(s.bytes.take(bytes, now));
            if !wait.is_zero() {
                s.throttled += 1;
            }
            wait
        })
    }

    /// Batches that had to wait, per gateway, since start.
    pub fn throttled(&self) -> HashMap<String, u64> {
        let map = self.gateways.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.throttled)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_its_rate_and_makes_the_excess_wait() {
        let mut b = Bucket::new(1000);
        let t0 = b.at;
        assert_eq!(b.take(1000, t0), Duration::ZERO);
        assert_eq!(b.take(500, t0), Duration::from_millis(500));
        // Half a second later the debt is paid.
        assert_eq!(b.take(0, t0 + Duration::from_millis(500)), Duration::ZERO);
        // Idle time refills at most one second's worth.
        assert_eq!(b.take(1000, t0 + Duration::from_secs(60)), Duration::ZERO);
        assert!(b.take(1, t0 + Duration::from_secs(60)) > Duration::ZERO);
    }

    #[test]
    fn streams_beyond_the_limit_are_refused_until_one_closes() {
        let q = Quotas::new(Limits {
            max_streams_per_gateway: 1,
            ..Limits::default()
        });
        let a = q.open_stream("gw").expect("first");
        assert_eq!(
            q.open_stream("gw").err().map(|s| s.code()),
            Some(tonic::Code::ResourceExhausted)
        );
        let _other = q
            .open_stream("other")
            .expect("another gateway is not affected");
        drop(a);
        q.open_stream("gw").expect("slot freed");
    }
}
