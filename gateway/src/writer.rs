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
//!
//! # Storage faults
//! When a commit fails (disk full, I/O error), the samples stay held in
//! memory and the commit is retried at every tick; the buffer reopens its
//! database by itself (`Buffer::db`). At most `max_held_points` are held:
//! beyond that the oldest are dropped and counted per tag with their time
//! ranges. Once a commit succeeds again, that count is committed first as a
//! signed, chained loss record (reason `storage_error`), then what was held.
//! So collected = stored + declared lost holds through a full disk.
//!
//! A commit reported as failed may be in the file after all: redb writes a
//! commit's pages and header, then fsyncs, and when only the fsync fails the
//! reopened file holds it. So after a failed commit nothing is committed
//! until `Buffer::resolve_unsure` has told, from the reopened file, whether
//! it landed (`Unsure`): if it did, its points are not written again and
//! those dropped from memory meanwhile are not declared; if not, both go on
//! as above. Points are thus never both stored and declared lost.
//!
//! When the process stops before the disk recovers, what is still held is
//! counted per tag into `unstored` (a file whose room was reserved at start)
//! and declared at the next start, before anything else is committed. Only a
//! crash (SIGKILL, power cut) while commits fail loses held points without
//! a record, as a crash loses at most one `commit_interval` anyway.
//!
//! # Reloads
//! A `Switch` in the stream (see `collector`) commits what came before it
//! under the old manifest version (or, if the disk refuses, declares it lost
//! under that version); samples after it are stamped with the new version,
//! their slots mapped to its tag indices.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guantong_proto::v1::LossReason;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, warn};

use crate::buffer::{Buffer, BufferError, LossTally};
use crate::collector::{Handoff, Switch, UNMAPPED};
use crate::quality::Sample;
use crate::status::Status;
use crate::unstored::UnstoredLoss;

/// How often unsent data is checked against `max_age`.
const EXPIRY_CHECK: Duration = Duration::from_secs(60);

/// How often a commit failure that goes on is logged again.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Memory a held sample may take, for sizing `max_held_points` from a quota.
pub const HELD_SAMPLE_BYTES: u64 = 64;

/// What the writer holds while the buffer cannot commit.
#[derive(Default)]
struct Held {
    /// Dropped from memory, not yet declared in a loss record.
    lost: LossTally,
    /// Since when commits fail, and when that was last logged.
    failing: Option<(Instant, Instant)>,
    /// Where the loss is recorded at a stop; `None` if its file cannot be used.
    unstored: Option<UnstoredLoss>,
    /// `lost` includes what `unstored` held at start: clear it once committed.
    unstored_pending: bool,
    /// The last commit failed and may be in the file after all.
    unsure: Option<Unsure>,
}

/// A failed commit not yet known to have missed the file.
enum Unsure {
    /// `record_loss` of this tally.
    Loss(LossTally),
    /// `append` of the first `held` samples still held, plus those of its
    /// samples dropped from memory since (`dropped`).
    Append { held: usize, dropped: LossTally },
}

pub struct Writer {
    pub buffer: Arc<Buffer>,
    pub manifest_version: u64,
    pub commit_interval: Duration,
    /// Unsent batches older than this become loss records.
    pub max_age: Duration,
    pub max_batch_points: usize,
    /// Most samples held in memory while the buffer cannot commit.
    pub max_held_points: usize,
    /// Last committed sequence number, for the uplink.
    pub committed: watch::Sender<u64>,
    /// Sees every hand-off and commit (device health, backlog age).
    pub status: Arc<Status>,
}

impl Writer {
    pub async fn run(mut self, mut rx: mpsc::Receiver<Handoff>) {
        let mut map: Option<Arc<[u32]>> = None;
        let mut pending: Vec<Sample> = Vec::new();
        let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
        // Released after the commit, so the sink's budget covers `pending`.
        let mut permits = Vec::new();
        let mut tick = tokio::time::interval(self.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expiry = tokio::time::interval(EXPIRY_CHECK);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        let mut held = self.held_at_start();
        while open {
            tokio::select! {
                received = rx.recv() => match received {
                    Some(mut h) => {
                        if let Some(s) = h.switch.take() {
                            self.switch(s, &mut map, &mut pending, &mut waiters, &mut held).await;
                            continue;
                        }
                        self.status.observe(&h.samples);
                        to_manifest(&map, &mut h.samples);
                        pending.append(&mut h.samples);
                        waiters.extend(h.committed);
                        permits.push(h.permit);
                        // Group commit: take what is already queued too.
                        while !waiters.is_empty() && pending.len() < self.max_batch_points {
                            match rx.try_recv() {
                                Ok(mut h) => {
                                    if let Some(s) = h.switch.take() {
                                        self.switch(s, &mut map, &mut pending, &mut waiters, &mut held).await;
                                        continue;
                                    }
                                    self.status.observe(&h.samples);
                                    to_manifest(&map, &mut h.samples);
                                    pending.append(&mut h.samples);
                                    waiters.extend(h.committed);
                                    permits.push(h.permit);
                                }
                                Err(_) => break,
                            }
                        }
                        // While commits fail, only the tick retries them.
                        if held.failing.is_some()
                            || (waiters.is_empty() && pending.len() < self.max_batch_points)
                        {
                            continue;
                        }
                    }
                    None => open = false,
                },
                _ = tick.tick() => {}
                _ = expiry.tick() => self.expire().await,
            }
            if !pending.is_empty() || !held.lost.is_empty() {
                if self.commit(&mut pending, &mut held).await {
                    for w in waiters.drain(..) {
                        let _ = w.send(());
                    }
                } else if !open {
                    self.record_unstored(&pending, &mut held);
                }
            }
            // Held samples are bounded by `max_held_points`, not the sink's budget.
            permits.clear();
        }
    }

    /// From here on samples refer to `s.version`: what is pending is
    /// committed under the old version first, or declared lost under it.
    async fn switch(
        &mut self,
        s: Switch,
        map: &mut Option<Arc<[u32]>>,
        pending: &mut Vec<Sample>,
        waiters: &mut Vec<oneshot::Sender<()>>,
        held: &mut Held,
    ) {
        if !pending.is_empty() || !held.lost.is_empty() {
            if self.commit(pending, held).await {
                for w in waiters.drain(..) {
                    let _ = w.send(());
                }
            } else {
                for p in pending.drain(..) {
                    held.lost.add(self.manifest_version, &p);
                }
                waiters.clear();
            }
        }
        self.manifest_version = s.version;
        *map = s.map;
    }

    /// What the writer starts with: the loss recorded at the last stop, if
    /// any, to be declared by the first commit.
    fn held_at_start(&self) -> Held {
        let mut held = Held::default();
        let dir = self
            .buffer
            .path()
            .parent()
            .unwrap_or(std::path::Path::new("."));
        match UnstoredLoss::open(dir) {
            Ok((file, loss)) => {
                if let Some(loss) = loss {
                    warn!(
                        points = loss.points,
                        "points unstored at the last stop (the buffer refused writes) are declared lost now"
                    );
                    held.lost.merge(&loss);
                    held.unstored_pending = true;
                }
                held.unstored = Some(file);
            }
            Err(e) => error!(
                error = %e,
                "points held when stopping on a failing disk will be logged, not declared"
            ),
        }
        held
    }

    /// At a stop with points held: records them and the undeclared loss for
    /// the next start.
    fn record_unstored(&self, pending: &[Sample], held: &mut Held) {
        let mut lost = held.lost.clone();
        // Unknown whether it reached the file: declared, with a warning.
        match &held.unsure {
            Some(Unsure::Loss(t) | Unsure::Append { dropped: t, .. }) => {
                warn!(
                    "stopping before the storage told whether the last failed commit reached the file: its points are declared lost, and are also stored if it did"
                );
                lost.merge(&t.to_loss(LossReason::StorageError));
            }
            None => {}
        }
        for s in pending {
            lost.add(self.manifest_version, s);
        }
        let recorded = match &held.unstored {
            Some(file) => file.write(&lost.to_loss(LossReason::StorageError)),
            None => Ok(()),
        };
        match (recorded, &held.unstored) {
            (Ok(()), Some(_)) => warn!(
                points = lost.points(),
                "stopping while the buffer cannot commit: these points are recorded and declared lost at the next start"
            ),
            (Ok(()), None) => error!(
                points = lost.points(),
                "stopping while the buffer cannot commit: these points are lost undeclared"
            ),
            (Err(e), _) => error!(
                error = %e,
                points = lost.points(),
                "stopping while the buffer cannot commit: these points are lost undeclared"
            ),
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

    /// Commits the loss not yet declared, then `pending`; true when both are
    /// on disk. On failure `pending` is kept, less its oldest samples beyond
    /// `max_held_points`, which join the loss.
    async fn commit(&self, pending: &mut Vec<Sample>, held: &mut Held) -> bool {
        let mut result = Ok(());
        if let Some(unsure) = held.unsure.take() {
            let buffer = self.buffer.clone();
            match blocking(move || buffer.resolve_unsure()).await {
                Ok(landed) => self.settle(unsure, landed, pending, held),
                Err(e) => {
                    held.unsure = Some(unsure);
                    result = Err(e);
                }
            }
        }
        if result.is_ok() && !held.lost.is_empty() {
            let (buffer, lost) = (self.buffer.clone(), held.lost.clone());
            match blocking(move || buffer.record_loss(&lost, LossReason::StorageError)).await {
                Ok(last) => {
                    held.lost = LossTally::default();
                    self.committed.send_replace(last);
                    self.loss_declared(held);
                }
                Err(e) => {
                    self.status.committed(Err(e.to_string()));
                    held.unsure = Some(Unsure::Loss(std::mem::take(&mut held.lost)));
                    result = Err(e);
                }
            }
        }
        if result.is_ok() && !pending.is_empty() {
            let buffer = self.buffer.clone();
            let samples = std::mem::take(pending);
            let (version, max) = (self.manifest_version, self.max_batch_points);
            let (appended, samples) = blocking(move || {
                let r = buffer.append(version, &samples, max);
                Ok((r, samples))
            })
            .await
            .unwrap_or_else(|e| (Err(e), Vec::new()));
            self.status.committed(match &appended {
                Ok(last) => Ok(*last),
                Err(e) => Err(e.to_string()),
            });
            match appended {
                Ok(last) => {
                    self.committed.send_replace(last);
                }
                Err(e) => {
                    held.unsure = Some(Unsure::Append {
                        held: samples.len(),
                        dropped: LossTally::default(),
                    });
                    *pending = samples;
                    result = Err(e);
                }
            }
        }
        match result {
            Ok(()) => {
                if let Some((since, _)) = held.failing.take() {
                    warn!(
                        failing_for = ?since.elapsed(),
                        "buffer commits again; what was held is stored"
                    );
                }
                true
            }
            Err(e) => {
                let excess = pending.len().saturating_sub(self.max_held_points);
                for s in pending.drain(..excess) {
                    match &mut held.unsure {
                        Some(Unsure::Append { held: n, dropped }) if *n > 0 => {
                            *n -= 1;
                            dropped.add(self.manifest_version, &s);
                        }
                        _ => held.lost.add(self.manifest_version, &s),
                    }
                }
                let now = Instant::now();
                let log = held
                    .failing
                    .is_none_or(|(_, at)| now.duration_since(at) >= FAILURE_LOG_EVERY);
                if log {
                    error!(
                        error = %e,
                        held_points = pending.len(),
                        lost_points = held.lost.points(),
                        max_held_points = self.max_held_points,
                        "buffer commit failed; holding points in memory and retrying"
                    );
                    held.failing = Some((held.failing.map_or(now, |(since, _)| since), now));
                }
                false
            }
        }
    }
}

impl Writer {
    /// Applies what `Buffer::resolve_unsure` found: a commit that landed
    /// (`Some(last)`) is done; one that did not goes back to being held.
    fn settle(
        &self,
        unsure: Unsure,
        landed: Option<u64>,
        pending: &mut Vec<Sample>,
        held: &mut Held,
    ) {
        if let Some(last) = landed {
            self.committed.send_replace(last);
        }
        match (unsure, landed) {
            (Unsure::Loss(_), Some(_)) => self.loss_declared(held),
            (Unsure::Loss(tally), None) => {
                held.lost.merge(&tally.to_loss(LossReason::StorageError))
            }
            (Unsure::Append { held: n, .. }, Some(_)) => {
                pending.drain(..n.min(pending.len()));
            }
            (Unsure::Append { dropped, .. }, None) => {
                if !dropped.is_empty() {
                    held.lost.merge(&dropped.to_loss(LossReason::StorageError));
                }
            }
        }
    }

    /// The held loss is committed: what `unstored` recorded is declared.
    fn loss_declared(&self, held: &mut Held) {
        if std::mem::take(&mut held.unstored_pending)
            && let Some(Err(e)) = held.unstored.as_ref().map(UnstoredLoss::clear)
        {
            error!(error = %e, "the declared loss stays recorded: it will be declared again at the next start");
        }
    }
}

/// Maps collectors' slots to the current manifest's tag indices.
fn to_manifest(map: &Option<Arc<[u32]>>, samples: &mut Vec<Sample>) {
    if let Some(map) = map {
        samples.retain_mut(|s| match map.get(s.tag as usize) {
            Some(&i) if i != UNMAPPED => {
                s.tag = i;
                true
            }
            _ => false,
        });
    }
}

/// Runs a buffer operation off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BufferError> + Send + 'static,
) -> Result<T, BufferError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(BufferError::Task(e.to_string())))
}
