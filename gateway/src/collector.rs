//! What every protocol collector shares: the trait it implements and the sink
//! it writes to.
//!
//! A collector owns its device connection(s), polls or subscribes, and hands
//! `Sample`s to the `PointSink`. The sink is a bounded channel into the buffer
//! writer: when the disk falls behind, collectors wait instead of piling up
//! memory. A collector never returns on device errors; it reports them as Bad
//! samples and retries. It returns only when cancelled.

use std::future::Future;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::quality::Sample;

pub trait Collector: Send + 'static {
    fn run(self, sink: PointSink, cancel: CancellationToken) -> impl Future<Output = ()> + Send;
}

#[derive(Clone)]
pub struct PointSink {
    tx: mpsc::Sender<Vec<Sample>>,
}

impl PointSink {
    pub fn new(capacity: usize) -> (PointSink, mpsc::Receiver<Vec<Sample>>) {
        let (tx, rx) = mpsc::channel(capacity);
        (PointSink { tx }, rx)
    }

    /// Hands samples to the buffer writer, waiting while it is behind.
    /// Returns false once the writer has stopped (shutdown).
    pub async fn send(&self, samples: Vec<Sample>) -> bool {
        if samples.is_empty() {
            return true;
        }
        self.tx.send(samples).await.is_ok()
    }
}
