//! What every protocol collector shares: the trait it implements and the sink
//! it writes to.
//!
//! A collector owns its device connection(s), polls or subscribes, and hands
//! `Sample`s to the `PointSink`. The sink is a channel into the buffer writer
//! bounded by points, not by hand-offs: every hand-off holds permits for its
//! samples from one budget until the writer has committed them, so when the
//! disk falls behind, collectors wait instead of piling up memory, however
//! large their hand-offs are. A hand-off larger than the whole budget takes
//! all of it. A collector never returns on device errors; it reports them as Bad
//! samples and retries. It returns only when cancelled.
//!
//! A collector whose source redelivers what is not acknowledged (MQTT QoS 1)
//! uses `send_committed` and acknowledges only when the returned receiver
//! fires: the writer fires it after the fsynced commit that holds the samples,
//! and commits at once (grouping whatever else is queued) instead of waiting
//! for the next commit tick.
//!
//! Collectors number their samples by *slot*: a device keeps its slots for
//! as long as its collector runs, across reloads. A reload sends a `Switch`
//! down the same channel, after the collectors it stopped have returned and
//! before those it starts send anything: the writer commits what came before
//! it under the old manifest and maps slots to the new manifest's tag
//! indices from then on (see `reload`).

use std::future::Future;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::quality::Sample;

pub trait Collector: Send + 'static {
    fn run(self, sink: PointSink, cancel: CancellationToken) -> impl Future<Output = ()> + Send;
}

#[derive(Clone)]
pub struct PointSink {
    tx: mpsc::Sender<Handoff>,
    budget: Arc<Semaphore>,
    max_points: usize,
}

/// Samples on their way to the writer, who wants to know when they are on
/// disk, and their share of the sink's budget (to be dropped after commit).
pub struct Handoff {
    pub samples: Vec<Sample>,
    pub committed: Option<oneshot::Sender<()>>,
    pub permit: OwnedSemaphorePermit,
    /// A new manifest, from this point of the stream on (no samples then).
    pub switch: Option<Switch>,
}

/// The manifest samples after this point refer to, and how their slots map
/// to its tag indices.
pub struct Switch {
    pub version: u64,
    /// `map[slot]` is the manifest index of that slot; `UNMAPPED` for none.
    /// None: slot and index are the same.
    pub map: Option<Arc<[u32]>>,
}

/// A slot no tag of the current manifest has.
pub const UNMAPPED: u32 = u32::MAX;

impl PointSink {
    /// A sink holding at most `max_points` samples between collectors and
    /// the writer's commit.
    pub fn new(max_points: usize) -> (PointSink, mpsc::Receiver<Handoff>) {
        let max_points = max_points.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        // Hand-offs are bounded by the budget; the channel itself only
        // needs room for many small ones.
        let (tx, rx) = mpsc::channel(4096);
        let budget = Arc::new(Semaphore::new(max_points));
        (
            PointSink {
                tx,
                budget,
                max_points,
            },
            rx,
        )
    }

    /// Tells the writer that what follows refers to a new manifest.
    /// Returns false once the writer has stopped.
    pub async fn switch(&self, switch: Switch) -> bool {
        let Ok(permit) = self.budget.clone().acquire_many_owned(0).await else {
            return false;
        };
        self.tx
            .send(Handoff {
                samples: Vec::new(),
                committed: None,
                permit,
                switch: Some(switch),
            })
            .await
            .is_ok()
    }

    async fn handoff(&self, samples: Vec<Sample>, committed: Option<oneshot::Sender<()>>) -> bool {
        let permits = samples.len().min(self.max_points) as u32;
        let Ok(permit) = self.budget.clone().acquire_many_owned(permits).await else {
            return false;
        };
        self.tx
            .send(Handoff {
                samples,
                committed,
                permit,
                switch: None,
            })
            .await
            .is_ok()
    }

    /// Hands samples to the buffer writer; the receiver fires once they are
    /// committed to disk (and is dropped unfired if the commit fails).
    /// Returns None once the writer has stopped.
    pub async fn send_committed(&self, samples: Vec<Sample>) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        if samples.is_empty() {
            let _ = tx.send(());
            return Some(rx);
        }
        self.handoff(samples, Some(tx)).await.then_some(rx)
    }

    /// Hands samples to the buffer writer, waiting while it is behind.
    /// Returns false once the writer has stopped (shutdown).
    pub async fn send(&self, samples: Vec<Sample>) -> bool {
        if samples.is_empty() {
            return true;
        }
        self.handoff(samples, None).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use guantong_proto::v1::point::Value;

    fn samples(n: usize) -> Vec<Sample> {
        (0..n as u32)
            .map(|i| Sample::good(i, 0, Value::Uint(1)))
            .collect()
    }

    #[tokio::test]
    async fn senders_wait_until_the_writer_has_committed_what_the_budget_holds() {
        let (sink, mut rx) = PointSink::new(100);
        assert!(sink.send(samples(60)).await);
        let first = rx.recv().await.expect("first hand-off");
        // 60 of 100 points are held by the writer: 50 more must wait.
        let waiting = tokio::spawn({
            let sink = sink.clone();
            async move { sink.send(samples(50)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the budget did not hold the sender");
        assert!(rx.try_recv().is_err());
        drop(first); // committed: its permits go back
        assert!(waiting.await.expect("sender task"));
        assert_eq!(rx.recv().await.expect("second hand-off").samples.len(), 50);
    }

    #[tokio::test]
    async fn a_hand_off_larger_than_the_budget_takes_all_of_it() {
        let (sink, mut rx) = PointSink::new(10);
        assert!(sink.send(samples(25)).await);
        assert_eq!(rx.recv().await.expect("hand-off").samples.len(), 25);
    }
}
