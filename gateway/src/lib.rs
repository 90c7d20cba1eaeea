//! Guantong gateway: collects equipment data into a durable buffer and streams
//! it to ingest.
//!
//! Data path: collectors (one task per device) -> `PointSink` (bounded
//! channel) -> `Writer` (commits batches to the `Buffer` every
//! `commit_interval`) -> `Uplink` (gRPC stream; deletes what ingest acks).
//! `reload::Collectors` starts the collectors and changes them on a reload.

pub mod buffer;
pub mod collector;
pub mod config;
#[cfg(feature = "dlt645")]
pub mod dlt645;
pub mod identity;
pub mod liveness;
pub mod malloc;
pub mod manifest;
pub mod modbus;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "opcua")]
pub mod opcua;
pub mod probe;
pub mod protocol;
pub mod quality;
pub mod reload;
pub mod remote;
#[cfg(feature = "s7")]
pub mod s7;
pub mod secret;
pub mod status;
pub mod storage_io;
pub mod unstored;
pub mod uplink;
pub mod value;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::buffer::Buffer;
use crate::collector::PointSink;
use crate::config::Config;

/// How long the uplink may keep delivering after collection stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Samples that may wait between the collectors and the writer's commit:
/// 2.6 s at 100,000 points/s, at most 14 MiB of 56-byte samples.
pub const SINK_MAX_POINTS: usize = 1 << 18;

/// Runs the gateway until `shutdown` is cancelled: collectors stop first, the
/// writer commits what they handed over, then the uplink gets a short grace
/// period to deliver before the process exits. Nothing committed is lost by
/// stopping: it is sent on the next start.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (_reloader, reloads) = reload::channel();
    run_with(config, reloads, None, shutdown).await
}

/// `run`, applying the configs sent through `reloads` (see `reload`), and
/// carrying cloud configurations over the uplink through `remote`.
pub async fn run_with(
    mut config: Config,
    mut reloads: tokio::sync::mpsc::Receiver<reload::ReloadRequest>,
    remote: Option<remote::Link>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    secret::warn_at_start(&config);
    let key_file = config
        .gateway
        .key_file
        .clone()
        .unwrap_or_else(|| config.buffer.dir.join("gateway.key"));
    let (key, created) = identity::load_or_create(&key_file, config.gateway.key_algorithm.into())?;
    let public = key.public_key();
    if created {
        tracing::warn!(
            file = %key_file.display(),
            algorithm = %key.algorithm(),
            fingerprint = %key.algorithm().fingerprint(&public),
            public_key = %hex::encode(public),
            "created this gateway's signing key: register its public key with ingest"
        );
    }
    let buffer = Arc::new(
        Buffer::open(
            &config.buffer.dir,
            config.buffer.max_bytes.as_u64(),
            config.buffer.when_full,
        )
        .with_context(|| format!("cannot open the buffer in {}", config.buffer.dir.display()))?
        .with_identity(buffer::ChainSigner {
            key,
            gateway_id: config.gateway.id.clone(),
        }),
    );
    // Taken before identification, which writes into the config.
    let fingerprints = reload::fingerprints(&config.devices);
    protocol::identify(&mut config.devices).await;
    let manifest = manifest::build(&config);
    buffer.put_manifest(&manifest)?;
    let stats = buffer.stats()?;
    info!(
        gateway = %config.gateway.id,
        buffer = %buffer.path().display(),
        buffer_id = format_args!("{:016x}", stats.buffer_id),
        pending_batches = stats.next_seq - stats.first_seq,
        manifest_version = format_args!("{:016x}", manifest.version),
        devices = config.devices.len(),
        tags = manifest.tags.len(),
        "gateway starting"
    );

    let status = Arc::new(status::Status::new(
        &config.gateway.id,
        manifest.version,
        status::DeviceSpec::of(&config),
        stats.next_seq.saturating_sub(1),
    ));
    let status_cancel = CancellationToken::new();
    // The page is for people: collecting goes on without it.
    if let Err(e) = status::serve(
        &config.status.listen,
        status.clone(),
        buffer.clone(),
        config.buffer.max_bytes.as_u64(),
        status_cancel.clone(),
    )
    .await
    {
        tracing::warn!(error = %e, "no status page; collecting without it");
    }
    let (sink, rx) = PointSink::new(SINK_MAX_POINTS);
    let (committed_tx, committed_rx) = watch::channel(stats.next_seq.saturating_sub(1));
    let writer = writer::Writer {
        buffer: buffer.clone(),
        manifest_version: manifest.version,
        commit_interval: config.buffer.commit_interval,
        max_age: config.buffer.max_age,
        max_batch_points: config.uplink.max_batch_points.get() as usize,
        // While the disk refuses writes, hold what the quota would hold, in
        // memory no more than the sink's budget.
        max_held_points: (config.buffer.max_bytes.as_u64() / writer::HELD_SAMPLE_BYTES)
            .min(SINK_MAX_POINTS as u64) as usize,
        committed: committed_tx,
        status: status.clone(),
    };
    let writer_task = tokio::spawn(writer.run(rx));

    let uplink_cancel = CancellationToken::new();
    let uplink = uplink::Uplink {
        config: config.uplink.clone(),
        gateway_id: config.gateway.id.clone(),
        buffer: buffer.clone(),
        committed: committed_rx,
        status: status.clone(),
        health: Some(uplink::HealthReports {
            every: uplink::HEALTH_EVERY,
            max_bytes: config.buffer.max_bytes.as_u64(),
        }),
        remote,
    };
    let uplink_task = tokio::spawn(uplink.run(uplink_cancel.clone()));

    let collect_cancel = shutdown.child_token();
    let (identified_tx, mut identified) = tokio::sync::mpsc::unbounded_channel();
    let mut collectors = reload::Collectors::start(
        config,
        fingerprints,
        &manifest,
        sink,
        collect_cancel,
        status.clone(),
        buffer.clone(),
        identified_tx,
    );
    // The buffer holds the manifest now; at 100k tags this copy is ~14 MB.
    drop(manifest);
    // The config and manifest are dropped: give their pages back.
    malloc::trim();

    let mut failed = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(request) = reloads.recv() => {
                if let Err(e) = collectors.serve(request).await {
                    tracing::error!(error = format!("{e:#}"), "reload failed: stopping");
                    failed = Some(e);
                    shutdown.cancel();
                }
            }
            Some(report) = identified.recv() => {
                if let Err(e) = collectors.identified(report).await {
                    tracing::error!(error = format!("{e:#}"), "publishing an identity failed: stopping");
                    failed = Some(e);
                    shutdown.cancel();
                }
            }
        }
    }
    info!("shutting down: stopping collectors");
    collectors.stopped().await;
    writer_task.await?;
    info!("buffer flushed");
    // Let the uplink deliver what is buffered, for a short while: whatever is
    // left waits on disk for the next start.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while buffer.stats().is_ok_and(|s| s.first_seq < s.next_seq) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    uplink_cancel.cancel();
    uplink_task.await?;
    status_cancel.cancel();
    let stats = buffer.stats()?;
    info!(
        pending_batches = stats.next_seq - stats.first_seq,
        "gateway stopped"
    );
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
