//! The buffer writer: turns the collectors' samples into committed batches.
//!
//! Samples arrive on the sink channel and are held in memory until the next
//! commit tick (`buffer.commit_interval`) or until a full batch is waiting;
//! then one fsynced commit makes them durable and the uplink is woken. The
//! commit interval is therefore the most a power cut or SIGKILL can lose.
//! When the channel closes (all collectors stopped), what is held is committed
//! before the writer returns: that is the shutdown flush.
//!
//! A handoff that waits for its commit (`PointSink::send_committed`) is
//! committed at once, together with everything already queued behind it
//! (group commit), and its waiter is told after the commit succeeded.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::error;

use crate::buffer::Buffer;
use crate::collector::Handoff;
use crate::quality::Sample;
use crate::status::Status;

/// How often unsent data is checked against `max_age`.
const EXPIRY_CHECK: Duration = Duration::from_secs(60);

pub struct Writer {
    pub buffer: Arc<Buffer>,
    pub manifest_version: u64,
    pub commit_interval: Duration,
    /// Unsent batches older than this become loss records.
    pub max_age: Duration,
    pub max_batch_points: usize,
    /// Last committed sequence number, for the uplink.
    pub committed: watch::Sender<u64>,
    /// Sees every hand-off and commit (device health, backlog age).
    pub status: Arc<Status>,
}

impl Writer {
    pub async fn run(self, mut rx: mpsc::Receiver<Handoff>) {
        let mut pending: Vec<Sample> = Vec::new();
        let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
        // Released after the commit, so the sink's budget covers `pending`.
        let mut permits = Vec::new();
        let mut tick = tokio::time::interval(self.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expiry = tokio::time::interval(EXPIRY_CHECK);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        while open {
            tokio::select! {
                received = rx.recv() => match received {
                    Some(mut h) => {
                        self.status.observe(&h.samples);
                        pending.append(&mut h.samples);
                        waiters.extend(h.committed);
                        permits.push(h.permit);
                        // Group commit: take what is already queued too.
                        while !waiters.is_empty() && pending.len() < self.max_batch_points {
                            match rx.try_recv() {
                                Ok(mut h) => {
                                    self.status.observe(&h.samples);
                                    pending.append(&mut h.samples);
                                    waiters.extend(h.committed);
                                    permits.push(h.permit);
                                }
                                Err(_) => break,
                            }
                        }
                        if waiters.is_empty() && pending.len() < self.max_batch_points {
                            continue;
                        }
                    }
                    None => open = false,
                },
                _ = tick.tick() => {}
                _ = expiry.tick() => self.expire().await,
            }
            if !pending.is_empty() {
                let ok = self.commit(std::mem::take(&mut pending)).await;
                for w in waiters.drain(..) {
                    if ok {
                        let _ = w.send(());
                    }
                }
            }
            permits.clear();
        }
    }

    async fn expire(&self) {
        let buffer = self.buffer.clone();
        let cutoff = crate::quality::now_ms() - self.max_age.as_millis() as i64;
        match tokio::task::spawn_blocking(move || buffer.expire(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                tracing::warn!(points = n, max_age = ?self.max_age, "unsent data expired; reported as a loss")
            }
            Ok(Err(e)) => error!(error = %e, "buffer expiry failed"),
            Err(e) => error!(error = %e, "buffer expiry task failed"),
        }
    }

    /// Commits `samples`; true when they are on disk.
    async fn commit(&self, samples: Vec<Sample>) -> bool {
        let buffer = self.buffer.clone();
        let (version, max) = (self.manifest_version, self.max_batch_points);
        let n = samples.len();
        let result =
            tokio::task::spawn_blocking(move || buffer.append(version, &samples, max)).await;
        self.status.committed(match &result {
            Ok(Ok(last)) => Ok(*last),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        });
        match result {
            Ok(Ok(last)) => {
                self.committed.send_replace(last);
                true
            }
            Ok(Err(e)) => {
                error!(error = %e, points = n, "buffer commit failed; points lost");
                false
            }
            Err(e) => {
                error!(error = %e, points = n, "buffer commit task failed; points lost");
                false
            }
        }
    }
}
