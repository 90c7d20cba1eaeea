//! Liveness from data: a device is alive when its data keeps coming, not
//! when its transport answers.
//!
//! Design
//! - Each source of data a device is expected to deliver (an OPC UA
//!   subscription's publish responses, keep-alive notifications included;
//!   an MQTT device's messages where `interval` is declared) has a
//!   `Heartbeat`, beaten by whatever receives that data. Modbus needs none:
//!   every poll waits for its own answer and a missing one is a timeout.
//! - A `StallWatch` compares the heartbeat's silence with `stall_intervals`
//!   expected intervals. The collector calls `check` while its transport
//!   looks alive; the first check past the limit returns the silence (the
//!   collector then writes one Bad point per tag with `quality::STALLED`,
//!   logs once and rebuilds what it must); later checks return nothing
//!   until the heartbeat beats again, which re-arms the watch.
//! - Time is monotonic (`Instant`), so a wall-clock step is never a stall.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Expected intervals of silence before a device counts as stalled, unless
/// its config says otherwise (`stall_intervals`).
pub fn default_stall_intervals() -> NonZeroU32 {
    NonZeroU32::new(3).expect("3 is not 0")
}

/// When data last arrived; cheap to clone and to beat from any thread.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    base: Instant,
    /// Milliseconds after `base` of the last beat.
    last_ms: Arc<AtomicU64>,
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat::new()
    }
}

impl Heartbeat {
    /// A heartbeat that beat just now.
    pub fn new() -> Heartbeat {
        Heartbeat {
            base: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn beat(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }

    fn last(&self) -> u64 {
        self.last_ms.load(Ordering::Relaxed)
    }
}

/// Tells, once per stall, that a heartbeat has been silent too long.
#[derive(Debug)]
pub struct StallWatch {
    heartbeat: Heartbeat,
    limit: Duration,
    /// The heartbeat's last beat when the stall was reported.
    reported_at: Option<u64>,
}

impl StallWatch {
    /// Stalled after `intervals` × `interval` without a beat.
    pub fn new(heartbeat: Heartbeat, interval: Duration, intervals: NonZeroU32) -> StallWatch {
        StallWatch {
            heartbeat,
            limit: interval.saturating_mul(intervals.get()),
            reported_at: None,
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// The silence, the first time it exceeds the limit since the last beat.
    pub fn check(&mut self) -> Option<Duration> {
        let last = self.heartbeat.last();
        if self.reported_at.is_some_and(|at| at != last) {
            self.reported_at = None;
        }
        let silent = self.heartbeat.silent_for();
        if self.reported_at.is_none() && silent > self.limit {
            self.reported_at = Some(last);
            return Some(silent);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_a_stall_once_and_again_only_after_data_returned() {
        let heartbeat = Heartbeat::new();
        let mut watch = StallWatch::new(
            heartbeat.clone(),
            Duration::from_millis(10),
            NonZeroU32::new(2).expect("2"),
        );
        assert_eq!(watch.limit(), Duration::from_millis(20));
        assert_eq!(watch.check(), None, "not silent yet");
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            watch
                .check()
                .is_some_and(|s| s >= Duration::from_millis(20))
        );
        assert_eq!(watch.check(), None, "one report per stall");
        std::thread::sleep(Duration::from_millis(5));
        heartbeat.beat();
        assert_eq!(watch.check(), None, "data came back");
        std::thread::sleep(Duration::from_millis(40));
        assert!(watch.check().is_some(), "a second stall is reported again");
    }
}
