//! What every protocol collector shares: the trait it implements and the sink
//! it writes to.
//!
//! A collector owns its device connection(s), polls or subscribes, and hands
//! `Sample`s to the `PointSink`. The sink is a bounded channel into the buffer
//! writer: when the disk falls behind, collectors wait instead of piling up
//! memory. A collector never returns on device errors; it reports them as Bad
//! samples and retries. It returns only when cancelled.
//!
//! A collector whose source redelivers what is not acknowledged (MQTT QoS 1)
//! uses `send_committed` and acknowledges only when the returned receiver
//! fires: the writer fires it after the fsynced commit that holds the samples,
//! and commits at once (grouping whatever else is queued) instead of waiting
//! for the next commit tick.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::quality::Sample;

pub trait Collector: Send + 'static {
    fn run(self, sink: PointSink, cancel: CancellationToken) -> impl Future<Output = ()> + Send;
}

#[derive(Clone)]
pub struct PointSink {
    tx: mpsc::Sender<Handoff>,
}

/// Samples on their way to the writer, and who wants to know when they are
/// on disk.
pub struct Handoff {
    pub samples: Vec<Sample>,
    pub committed: Option<oneshot::Sender<()>>,
}

impl PointSink {
    pub fn new(capacity: usize) -> (PointSink, mpsc::Receiver<Handoff>) {
        let (tx, rx) = mpsc::channel(capacity);
        (PointSink { tx }, rx)
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
        self.tx
            .send(Handoff {
                samples,
                committed: Some(tx),
            })
            .await
            .ok()?;
        Some(rx)
    }

    /// Hands samples to the buffer writer, waiting while it is behind.
    /// Returns false once the writer has stopped (shutdown).
    pub async fn send(&self, samples: Vec<Sample>) -> bool {
        if samples.is_empty() {
            return true;
        }
        self.tx
            .send(Handoff {
                samples,
                committed: None,
            })
            .await
            .is_ok()
    }
}
