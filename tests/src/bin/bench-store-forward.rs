//! Store-and-forward benchmark (issue 3), each figure beside its limit.
//!
//! `cargo run --release -p guantong-e2e --bin bench-store-forward`
//!
//! 1. Buffer write: the gateway buffer committing batches of 10,000 points
//!    with fsync (its documented durability), beside redb committing the same
//!    record bytes in the same transactions (the limit).
//! 2. Drain: a 5,000,000-point backlog drained through gRPC into ingest while
//!    live data at 10,000 points/s keeps arriving; drain rate, and the live
//!    points' latency (source time to ingest receipt) p50/p99 during the drain.
//! 3. Wire size: bytes per point between gateway and ingest (counted by a
//!    proxy) with zstd and uncompressed, for slowly changing values.
//! 4. Latency: backlog drain throughput over a link with 300 ms round trip
//!    beside the same over loopback.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use guantong_e2e::bench::{
    LocalIngest, MANIFEST_VERSION, manifest, median, percentile, samples, wait_drained,
};
use guantong_e2e::proxy::{Mode, Proxy};
use guantong_gateway::buffer::{Buffer, WhenFull};
use guantong_gateway::config::Compression;
use guantong_gateway::quality::{Sample, now_ms};
use guantong_gateway::status::Status;
use guantong_gateway::uplink::Uplink;
use guantong_ingest::store::Store;
use guantong_proto::v1::{Manifest, point};
use redb::{Database, Durability, TableDefinition};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5_000_000)]
    backlog: usize,
    /// Live points per second during the drain.
    #[arg(long, default_value_t = 10_000)]
    live_rate: usize,
    #[arg(long, default_value_t = 100)]
    tags: u32,
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const BATCH: usize = 10_000;
const RAW: TableDefinition<u64, &[u8]> = TableDefinition::new("raw");

fn new_buffer(dir: &std::path::Path, tags: u32) -> anyhow::Result<Arc<Buffer>> {
    let b = Arc::new(Buffer::open(dir, 8 << 30, WhenFull::DropOldest)?);
    b.put_manifest(&Manifest {
        version: MANIFEST_VERSION,
        ..manifest(tags + 1)
    })?;
    Ok(b)
}

/// (buffer points/s, raw redb points/s)
fn buffer_write(points: &[Sample], tags: u32) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let buffer = new_buffer(dir.path(), tags)?;
    let start = Instant::now();
    for chunk in points.chunks(BATCH) {
        buffer.append(MANIFEST_VERSION, chunk, BATCH)?;
    }
    let buffered = points.len() as f64 / start.elapsed().as_secs_f64();
    let records = buffer.read_from(1, usize::MAX)?;
    let raw_dir = tempfile::tempdir()?;
    let db = Database::create(raw_dir.path().join("raw.redb"))?;
    let start = Instant::now();
    for r in &records {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.open_table(RAW)?.insert(r.seq, r.payload.as_ref())?;
        txn.commit()?;
    }
    let raw = points.len() as f64 / start.elapsed().as_secs_f64();
    Ok((buffered, raw))
}

struct Drain {
    points_per_s: f64,
    live_p50_ms: i64,
    live_p99_ms: i64,
    wire_bytes_per_point: f64,
}

/// Drains `backlog` points through a proxy (with `delay_ms` each way) while
/// `live_rate` points/s arrive live.
async fn drain(
    args: &Args,
    backlog: usize,
    live_rate: usize,
    compression: Compression,
    delay_ms: u64,
) -> anyhow::Result<Drain> {
    let ingest = LocalIngest::start().await?;
    let proxy = Proxy::start(ingest.grpc).await?;
    if delay_ms > 0 {
        proxy.set(Mode::Delay(delay_ms));
    }
    let dir = tempfile::tempdir()?;
    let buffer = new_buffer(dir.path(), args.tags)?;
    let t0 = now_ms() - 86_400_000;
    let mut last = 0;
    for chunk in samples(backlog, args.tags, t0).chunks(BATCH) {
        last = buffer.append(MANIFEST_VERSION, chunk, BATCH)?;
    }
    let (backlog_last, total) = (last, backlog);
    let (committed_tx, committed) = watch::channel(last);
    let uplink = Uplink {
        config: ingest.uplink_config(proxy.addr, compression, 128),
        gateway_id: guantong_e2e::bench::GW.into(),
        buffer: buffer.clone(),
        committed,
        status: Arc::new(Status::new(guantong_e2e::bench::GW, 0, Vec::new(), 0)),
        health: None,
        remote: None,
    };
    let cancel = CancellationToken::new();
    let live_tag = args.tags;
    let live = {
        let buffer = buffer.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            // Live data starts once the uplink is connected: what was committed
            // before is backlog by definition. Commits every 100 ms.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut n = 0u64;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if live_rate == 0 {
                    continue;
                }
                let now = now_ms();
                let batch: Vec<Sample> = (0..live_rate / 10)
                    .map(|_| {
                        n += 1;
                        Sample::good(live_tag, now, point::Value::Uint(n))
                    })
                    .collect();
                let b = buffer.clone();
                if let Ok(Ok(seq)) =
                    tokio::task::spawn_blocking(move || b.append(MANIFEST_VERSION, &batch, BATCH))
                        .await
                {
                    committed_tx.send_replace(seq);
                }
            }
        })
    };
    let start = Instant::now();
    let bytes_before = proxy.bytes_up.load(Ordering::Relaxed);
    let task = tokio::spawn(uplink.run(cancel.clone()));
    // Steady state: time from the first acknowledged batch (connection set-up
    // costs a few round trips that a long drain does not notice).
    while buffer.stats()?.first_seq == 1 && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (steady, first_acked) = (Instant::now(), buffer.stats()?.first_seq - 1);
    wait_drained(&buffer, backlog_last, Duration::from_secs(900)).await?;
    let elapsed = steady.elapsed();
    let backlog = backlog - (first_acked as usize * BATCH).min(backlog);
    let wire = proxy.bytes_up.load(Ordering::Relaxed) - bytes_before;
    let drain_end_ms = now_ms();
    cancel.cancel();
    let _ = live.await;
    let _ = task.await;
    let live_series = ingest
        .store
        .series()
        .await?
        .into_iter()
        .find(|s| s.tag == format!("t{live_tag}"));
    let latencies: Vec<i64> = match live_series {
        Some(s) => ingest
            .store
            .points(s.id, 0, drain_end_ms, usize::MAX)
            .await?
            .iter()
            .map(|p| p.received_at_ms - p.time_ms)
            .collect(),
        None => Vec::new(),
    };
    let live_points = latencies.len();
    Ok(Drain {
        points_per_s: backlog as f64 / elapsed.as_secs_f64().max(1e-3),
        live_p50_ms: percentile(latencies.clone(), 0.5),
        live_p99_ms: percentile(latencies, 0.99),
        wire_bytes_per_point: wire as f64 / (total + live_points) as f64,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "bench-store-forward: {} tags, batches of {BATCH}, {} runs (medians)",
        args.tags, args.runs
    );

    let points = samples(1_000_000, args.tags, 1_767_225_600_000);
    let (mut buffered, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let (b, r) = buffer_write(&points, args.tags)?;
        buffered.push(b);
        raw.push(r);
    }
    let (b, r) = (median(buffered), median(raw));
    println!();
    println!("| buffer write (1,000,000 points, fsync per 10,000) | points/s | ratio |");
    println!("|---|---:|---:|");
    println!("| redb committing the same record bytes (limit) | {r:.0} | 1.00 |");
    println!("| gateway buffer append | {b:.0} | {:.2} |", b / r);

    let (mut rate, mut p50, mut p99, mut bpp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let d = drain(&args, args.backlog, args.live_rate, Compression::Zstd, 0).await?;
        rate.push(d.points_per_s);
        p50.push(d.live_p50_ms as f64);
        p99.push(d.live_p99_ms as f64);
        bpp.push(d.wire_bytes_per_point);
    }
    let rate = median(rate);
    println!();
    println!(
        "| drain of a {}-point backlog with live data at {} points/s | value | target |",
        args.backlog, args.live_rate
    );
    println!("|---|---:|---:|");
    println!(
        "| backlog drain rate, points/s | {rate:.0} | ≥ {} |",
        20 * args.live_rate
    );
    println!(
        "| drain rate ÷ live rate | {:.1} | ≥ 20 |",
        rate / args.live_rate as f64
    );
    println!(
        "| live latency p50 during the drain, ms | {:.0} | |",
        median(p50)
    );
    println!(
        "| live latency p99 during the drain, ms | {:.0} | < 1000 |",
        median(p99)
    );

    let plain = drain(&args, 1_000_000, 0, Compression::None, 0).await?;
    println!();
    println!("| wire size, slowly changing values | bytes/point | target |");
    println!("|---|---:|---:|");
    println!("| uncompressed | {:.2} | |", plain.wire_bytes_per_point);
    println!("| zstd | {:.2} | ≤ 4 |", median(bpp));

    let (mut near, mut far) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        near.push(
            drain(&args, 3_000_000, 0, Compression::Zstd, 0)
                .await?
                .points_per_s,
        );
        far.push(
            drain(&args, 3_000_000, 0, Compression::Zstd, 150)
                .await?
                .points_per_s,
        );
    }
    let (near, far) = (median(near), median(far));
    println!();
    println!(
        "| 3,000,000-point backlog drain, zstd, steady state, window 128 | points/s | ratio |"
    );
    println!("|---|---:|---:|");
    println!("| loopback, ~0 ms round trip (limit) | {near:.0} | 1.00 |");
    println!(
        "| 300 ms round trip (proxy delays 150 ms each way) | {far:.0} | {:.2} (target ≥ 0.50) |",
        far / near
    );
    Ok(())
}
