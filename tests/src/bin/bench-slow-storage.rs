//! Slow-storage benchmark (issue 21): what the buffer sustains when every
//! fsync takes 10, 30 or 100 ms (an SD card, an eMMC), beside the same run
//! with no added latency (the limit).
//!
//! `nice -n 10 cargo run --release -p guantong-e2e --bin bench-slow-storage`
//!
//! The real data path runs in this process (`pipeline`): collectors' shape
//! (`--tags` tags, each sampled every `--period-ms`, so 1-2 points per tag
//! per commit), the real writer committing every `--commit-ms`, the real
//! uplink streaming to an in-process ingest that verifies the signed chain
//! and acks, so the acknowledged deletes' fsyncs are included. The delay is
//! added to every `sync_data` of redb's file backend (`StorageFaults`).
//!
//! Sustained points/s: points collected in `--seconds`, over the time from
//! the first collected point until ingest acknowledged the last one. Added
//! latency: median of (ingest receipt - source time) for tag t0, minus the
//! same at no delay.

use std::time::{Duration, Instant};

use clap::Parser;
use guantong_e2e::bench::{median, percentile};
use guantong_e2e::pipeline::{Pipeline, PipelineOptions, verifying_ingest};
use guantong_gateway::quality::{Sample, now_ms};
use guantong_ingest::store::Store;
use guantong_proto::v1::point;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 20_000)]
    tags: u32,
    /// Sampling period of every tag.
    #[arg(long, default_value_t = 200)]
    period_ms: u64,
    /// The writer's `buffer.commit_interval`.
    #[arg(long, default_value_t = 200)]
    commit_ms: u64,
    /// How long points are collected per run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Added fsync latencies, ms (0, the limit, always runs first).
    #[arg(long, value_delimiter = ',', default_value = "10,30,100")]
    delays_ms: Vec<u64>,
}

/// Collection happens in slices of this length.
const SLICE: Duration = Duration::from_millis(10);

struct Run {
    offered: f64,
    sustained: f64,
    latency_ms: f64,
    latency_p99_ms: i64,
    syncs_per_s: f64,
}

async fn run(args: &Args, delay: Duration) -> anyhow::Result<Run> {
    let ingest = verifying_ingest().await?;
    let dir = tempfile::tempdir()?;
    let mut p = Pipeline::start(
        &ingest,
        dir.path(),
        PipelineOptions {
            tags: args.tags,
            commit_interval: Duration::from_millis(args.commit_ms),
            ..PipelineOptions::default()
        },
    )?;
    p.faults.set_sync_delay(delay);
    let sink = p.sink.clone().expect("collecting");
    let slices_per_period = (args.period_ms / SLICE.as_millis() as u64).max(1);
    let (start, syncs_before) = (Instant::now(), p.faults.syncs());
    let mut tick = tokio::time::interval(SLICE);
    let (mut slice, mut collected) = (0u64, 0u64);
    while start.elapsed() < Duration::from_secs(args.seconds) {
        tick.tick().await;
        // Each tag is sampled once per period, spread over its slices.
        let now = now_ms();
        let phase = (slice % slices_per_period) as u32;
        let samples: Vec<Sample> = (phase..args.tags)
            .step_by(slices_per_period as usize)
            .map(|tag| Sample::good(tag, now, point::Value::Double(f64::from(tag))))
            .collect();
        collected += samples.len() as u64;
        if !sink.send(samples).await {
            anyhow::bail!("the writer stopped");
        }
        slice += 1;
    }
    let offered = collected as f64 / start.elapsed().as_secs_f64();
    drop(sink);
    p.stop_collecting().await?;
    let syncs = p.faults.syncs() - syncs_before;
    p.drain_and_stop(Duration::from_secs(600)).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let stored = ingest.stored_points().await?;
    anyhow::ensure!(
        stored == collected,
        "ingest stored {stored} of {collected} points"
    );
    let chains = ingest.store.chains().await?;
    anyhow::ensure!(
        chains.len() == 1 && chains[0].breaks.is_empty() && chains[0].waiting == 0,
        "the chain did not verify: {chains:?}"
    );
    let t0 = ingest
        .store
        .series()
        .await?
        .into_iter()
        .find(|s| s.tag == "t0")
        .ok_or_else(|| anyhow::anyhow!("no series t0"))?;
    let latencies: Vec<i64> = ingest
        .store
        .points(t0.id, 0, i64::MAX, usize::MAX)
        .await?
        .iter()
        .map(|p| p.received_at_ms - p.time_ms)
        .collect();
    Ok(Run {
        offered,
        sustained: collected as f64 / elapsed,
        latency_ms: percentile(latencies.clone(), 0.5) as f64,
        latency_p99_ms: percentile(latencies, 0.99),
        syncs_per_s: syncs as f64 / elapsed,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "bench-slow-storage: {} tags every {} ms ({} points/s offered), commit_interval {} ms, {} s per run, {} runs (medians)",
        args.tags,
        args.period_ms,
        u64::from(args.tags) * 1000 / args.period_ms,
        args.commit_ms,
        args.seconds,
        args.runs
    );
    println!();
    println!(
        "| added fsync latency | offered points/s | sustained points/s | ratio to no delay | latency p50 ms | added p50 ms | latency p99 ms | fsyncs/s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut limit = None;
    for delay_ms in std::iter::once(0).chain(args.delays_ms.iter().copied()) {
        let mut runs = Vec::new();
        for _ in 0..args.runs {
            runs.push(run(&args, Duration::from_millis(delay_ms)).await?);
        }
        let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let (sustained, latency) = (m(|r| r.sustained), m(|r| r.latency_ms));
        let (limit_sustained, limit_latency) = *limit.get_or_insert((sustained, latency));
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.1} |",
            if delay_ms == 0 {
                "0 ms (limit)".to_string()
            } else {
                format!("{delay_ms} ms")
            },
            m(|r| r.offered),
            sustained,
            sustained / limit_sustained,
            latency,
            latency - limit_latency,
            m(|r| r.latency_p99_ms as f64),
            m(|r| r.syncs_per_s),
        );
    }
    Ok(())
}
