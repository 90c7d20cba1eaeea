//! The gateway's data path in this process: the real `Buffer` (on a
//! fault-injecting file backend), `Writer` and `Uplink`, streaming over gRPC
//! to an in-process ingest that verifies the signed chain. Tests and benches
//! inject storage faults (`StorageFaults`) that no file system here can
//! produce on demand (EIO, slow fsync), and collect through `sink`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use guantong_gateway::buffer::{Buffer, ChainSigner, WhenFull};
use guantong_gateway::collector::PointSink;
use guantong_gateway::config::Compression;
use guantong_gateway::status::Status;
use guantong_gateway::storage_io::{BufferStorage, StorageFaults};
use guantong_gateway::uplink::Uplink;
use guantong_gateway::writer::Writer;
use guantong_proto::chain::{ChainKey, PublicKey};
use guantong_proto::v1::Manifest;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bench::{GW, LocalIngest, MANIFEST_VERSION, manifest};

/// The key the in-process gateway signs its chain with.
pub fn chain_key() -> ChainKey {
    ChainKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[21; 32]))
}

/// An ingest that verifies `chain_key()`'s chain.
pub async fn verifying_ingest() -> anyhow::Result<LocalIngest> {
    let key = chain_key();
    let public = PublicKey::new(key.algorithm(), key.public_key()).map_err(anyhow::Error::msg)?;
    LocalIngest::start_with_key(Some(public)).await
}

pub struct PipelineOptions {
    pub tags: u32,
    pub commit_interval: Duration,
    pub max_held_points: usize,
    /// Batches in flight on the uplink.
    pub window: u32,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            tags: 20,
            commit_interval: Duration::from_millis(200),
            max_held_points: guantong_gateway::SINK_MAX_POINTS,
            window: 16,
        }
    }
}

pub struct Pipeline {
    pub buffer: Arc<Buffer>,
    pub faults: Arc<StorageFaults>,
    /// Where collected samples go; `None` once collection stopped.
    pub sink: Option<PointSink>,
    /// The writer's last committed sequence number.
    pub committed: watch::Receiver<u64>,
    writer: JoinHandle<()>,
    uplink: JoinHandle<()>,
    cancel: CancellationToken,
}

impl Pipeline {
    /// Opens the buffer in `dir` (signed with `chain_key()`), stores the
    /// manifest and starts the writer and the uplink to `ingest`.
    pub fn start(
        ingest: &LocalIngest,
        dir: &Path,
        options: PipelineOptions,
    ) -> anyhow::Result<Pipeline> {
        let faults = StorageFaults::new();
        let buffer = Buffer::open_on(
            dir,
            1 << 30,
            WhenFull::DropOldest,
            BufferStorage::Faulty(faults.clone()),
        )?
        .with_identity(ChainSigner {
            key: chain_key(),
            gateway_id: GW.into(),
        });
        let buffer = Arc::new(buffer);
        buffer.put_manifest(&Manifest {
            version: MANIFEST_VERSION,
            ..manifest(options.tags)
        })?;
        let stats = buffer.stats()?;
        let status = Arc::new(Status::new(
            GW,
            MANIFEST_VERSION,
            Vec::new(),
            stats.next_seq - 1,
        ));
        let (sink, rx) = PointSink::new(guantong_gateway::SINK_MAX_POINTS);
        let (committed_tx, committed) = watch::channel(stats.next_seq - 1);
        let writer = Writer {
            buffer: buffer.clone(),
            manifest_version: MANIFEST_VERSION,
            commit_interval: options.commit_interval,
            max_age: Duration::from_secs(86_400),
            max_batch_points: 10_000,
            max_held_points: options.max_held_points,
            committed: committed_tx,
            status: status.clone(),
        };
        let writer = tokio::spawn(writer.run(rx));
        let uplink = Uplink {
            config: ingest.uplink_config(ingest.grpc, Compression::Zstd, options.window),
            gateway_id: GW.into(),
            buffer: buffer.clone(),
            committed: committed.clone(),
            status,
            health: None,
            remote: None,
        };
        let cancel = CancellationToken::new();
        let uplink = tokio::spawn(uplink.run(cancel.clone()));
        Ok(Pipeline {
            buffer,
            faults,
            sink: Some(sink),
            committed,
            writer,
            uplink,
            cancel,
        })
    }

    /// Whether the writer and the uplink are both still running.
    pub fn running(&self) -> bool {
        !self.writer.is_finished() && !self.uplink.is_finished()
    }

    /// Stops collecting and waits for the writer's shutdown flush.
    pub async fn stop_collecting(&mut self) -> anyhow::Result<()> {
        self.sink = None;
        (&mut self.writer).await?;
        Ok(())
    }

    /// Waits until ingest acknowledged everything committed (at most
    /// `limit`), then stops the uplink.
    pub async fn drain_and_stop(self, limit: Duration) -> anyhow::Result<()> {
        let last = *self.committed.borrow();
        let drained = crate::bench::wait_drained(&self.buffer, last, limit).await;
        self.cancel.cancel();
        self.uplink.await?;
        drained
    }
}
