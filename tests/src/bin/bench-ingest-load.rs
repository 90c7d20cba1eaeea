//! Ingest under a city's load: N gateways × T tags every I, each gateway a
//! real buffer + uplink on its own gRPC/TLS stream with its own token and
//! key (see `guantong_e2e::load`), into the real `guantong-ingest` process.
//!
//! `cargo build --release --workspace --bins && nice target/release/bench-ingest-load --scenario all [--duration 20s]`
//!
//! Per scenario: points/s stored (acknowledged within the measured window),
//! ingest CPU per point (utime + stime of the ingest process from the start
//! of the window until everything committed in it is acknowledged, divided
//! by the points acknowledged meanwhile; load-independent), points/s per
//! ingest core (its inverse), ingest RSS, ack latency p50/p99 (commit in the
//! gateway buffer to its deletion after the ack, rounded up to 50 ms), and
//! the limit: redb alone writing the same points in ingest's chunk layout
//! (one row per series and minute of each batch) in the same transaction
//! shape (every gateway's batch of one commit interval in one fsynced
//! transaction, at most ingest's group size), no bookkeeping, measured in
//! this run as thread CPU per point.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use guantong_e2e::bench::{cpu_seconds, percentile, rss_mib};
use guantong_e2e::load::{self, COMMIT_INTERVAL, MAX_BATCH_POINTS, Shape};
use guantong_proto::v1::{Batch, Point};
use prost::Message;
use redb::{Database, Durability, TableDefinition};

#[derive(Parser)]
struct Args {
    /// `all` (the four: 10x10000@1s, 100x1000@1s, 1000x100@10s,
    /// 1x10000@100ms), or any `GATEWAYSxTAGS@INTERVAL`.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Measured window per scenario (after every gateway's first ack).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

/// The scenarios: (name, shape).
const SCENARIOS: [(&str, Shape); 4] = [
    (
        "10x10000@1s",
        Shape {
            gateways: 10,
            tags: 10_000,
            interval_ms: 1000,
        },
    ),
    (
        "100x1000@1s",
        Shape {
            gateways: 100,
            tags: 1000,
            interval_ms: 1000,
        },
    ),
    (
        "1000x100@10s",
        Shape {
            gateways: 1000,
            tags: 100,
            interval_ms: 10_000,
        },
    ),
    (
        "1x10000@100ms",
        Shape {
            gateways: 1,
            tags: 10_000,
            interval_ms: 100,
        },
    ),
];

/// Ingest's most points per group commit (`store::embedded::GROUP_POINTS`).
const GROUP_POINTS: usize = 200_000;

struct Figures {
    name: String,
    shape: Shape,
    stored_per_s: f64,
    cpu_us_per_point: f64,
    drained: bool,
    rss_mib: f64,
    hwm_mib: f64,
    p50_ms: i64,
    p99_ms: i64,
    limit_us_per_point: f64,
    limit_per_s: f64,
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// `GATEWAYSxTAGS@INTERVAL`, e.g. `100x1000@1s`.
fn parse_shape(text: &str) -> anyhow::Result<Shape> {
    let bad =
        || format!("scenario `{text}`: expected all or GATEWAYSxTAGS@INTERVAL, e.g. 100x1000@1s");
    let (counts, interval) = text.split_once('@').with_context(bad)?;
    let (gateways, tags) = counts.split_once('x').with_context(bad)?;
    let interval = humantime::parse_duration(interval).with_context(bad)?;
    let shape = Shape {
        gateways: gateways.parse().with_context(bad)?,
        tags: tags.parse().with_context(bad)?,
        interval_ms: u32::try_from(interval.as_millis()).with_context(bad)?,
    };
    anyhow::ensure!(
        shape.gateways > 0 && shape.tags > 0 && shape.interval_ms > 0,
        "{}",
        bad()
    );
    Ok(shape)
}

const RAW: TableDefinition<(u64, i64, u64), &[u8]> = TableDefinition::new("chunks");

/// The limit: `seconds` of the scenario's points written by redb alone.
/// Returns (thread CPU µs per point, points/s wall).
fn raw_redb(shape: Shape, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let db = Database::create(dir.path().join("raw.redb"))?;
    let t0_ms = guantong_gateway::quality::now_ms();
    let tick_ms = COMMIT_INTERVAL.as_millis() as u64;
    // Every gateway's batches of one commit interval, cut at MAX_BATCH_POINTS.
    let ticks: Vec<Vec<Vec<Point>>> = (0..seconds * 1000 / tick_ms)
        .map(|k| {
            let range = shape.samples_before(k * tick_ms)..shape.samples_before((k + 1) * tick_ms);
            (0..shape.gateways)
                .flat_map(|g| {
                    let samples = load::samples(shape, range.clone(), t0_ms);
                    samples
                        .chunks(MAX_BATCH_POINTS)
                        .map(|chunk| {
                            chunk
                                .iter()
                                .map(|s| Point {
                                    tag: g as u32 * shape.tags + s.tag,
                                    time_offset_ms: s.time_ms,
                                    value: s.value.clone(),
                                    ..Default::default()
                                })
                                .collect()
                        })
                        .collect::<Vec<Vec<Point>>>()
                })
                .collect()
        })
        .collect();
    let points: usize = ticks.iter().flatten().map(Vec::len).sum();
    let (start, cpu) = (Instant::now(), thread_cpu());
    let mut id = 0u64;
    for tick in &ticks {
        let mut batches = tick.iter().peekable();
        while batches.peek().is_some() {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            {
                let mut table = txn.open_table(RAW)?;
                let mut in_txn = 0;
                while in_txn < GROUP_POINTS {
                    let Some(batch) = batches.next() else { break };
                    in_txn += batch.len();
                    let mut rows: HashMap<(u32, i64), Vec<Point>> = HashMap::new();
                    for p in batch {
                        rows.entry((p.tag, p.time_offset_ms.div_euclid(60_000)))
                            .or_default()
                            .push(p.clone());
                    }
                    for ((series, minute), points) in rows {
                        id += 1;
                        let bytes = Batch {
                            points,
                            ..Default::default()
                        }
                        .encode_to_vec();
                        table.insert((u64::from(series), minute, id), bytes.as_slice())?;
                    }
                }
            }
            txn.commit()?;
        }
    }
    let (wall, cpu) = (start.elapsed(), thread_cpu() - cpu);
    let n = points as f64;
    Ok((cpu.as_secs_f64() * 1e6 / n, n / wall.as_secs_f64()))
}

async fn scenario(name: String, shape: Shape, duration: Duration) -> anyhow::Result<Figures> {
    let work = tempfile::tempdir()?;
    let prefix = format!("load{}", std::process::id());
    println!(
        "{name}: {} gateways × {} tags every {} ms = {:.0} points/s offered; registering…",
        shape.gateways,
        shape.tags,
        shape.interval_ms,
        shape.rate()
    );
    let (mut ingest, load) = load::start_with_ingest(work.path(), &prefix, shape).await?;
    let pid = ingest.proc.pid().context("ingest pid")?;
    // Warm up: every stream connected, its manifest stored and a batch acked.
    load::wait_for_load(
        &load,
        &mut ingest,
        Duration::from_secs(300),
        |l| l.gateways_acked() >= shape.gateways,
        |l| {
            format!(
                "only {} of {} gateways acknowledged",
                l.gateways_acked(),
                shape.gateways
            )
        },
    )
    .await?;
    let (cpu0, before) = (cpu_seconds(pid)?, load.totals());
    load.measure_latency(true);
    let start = Instant::now();
    tokio::time::sleep(duration).await;
    let window = load.totals();
    let elapsed = start.elapsed().as_secs_f64();
    load.measure_latency(false);
    load.stop_producing();
    let drained = load
        .wait_drained(duration.max(Duration::from_secs(60)))
        .await;
    let (cpu1, after) = (cpu_seconds(pid)?, load.totals());
    let (rss, hwm) = rss_mib(pid)?;
    let latencies = load.latencies_ms();
    load.stop().await?;
    ingest.proc.terminate(Duration::from_secs(10));
    let acked = (after.acked - before.acked) as f64;
    let (limit_us, limit_rate) = raw_redb(shape, duration.as_secs().clamp(2, 10))?;
    let f = Figures {
        name,
        shape,
        stored_per_s: (window.acked - before.acked) as f64 / elapsed,
        cpu_us_per_point: (cpu1 - cpu0) * 1e6 / acked,
        drained,
        rss_mib: rss,
        hwm_mib: hwm,
        p50_ms: percentile(latencies.clone(), 0.5),
        p99_ms: percentile(latencies, 0.99),
        limit_us_per_point: limit_us,
        limit_per_s: limit_rate,
    };
    println!(
        "  stored {:.0} points/s, ingest {:.2} µs CPU/point ({:.0} points/s per core), RSS {:.0} MiB (peak {:.0}), ack p50 {} ms p99 {} ms, drained: {}; limit {:.2} µs/point ({:.0} points/s); load average {}",
        f.stored_per_s,
        f.cpu_us_per_point,
        1e6 / f.cpu_us_per_point,
        f.rss_mib,
        f.hwm_mib,
        f.p50_ms,
        f.p99_ms,
        f.drained,
        f.limit_us_per_point,
        f.limit_per_s,
        load_average()
    );
    Ok(f)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let chosen: Vec<(String, Shape)> = if args.scenario == "all" {
        SCENARIOS.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    } else {
        vec![(args.scenario.clone(), parse_shape(&args.scenario)?)]
    };
    println!(
        "bench-ingest-load: {} s measured per scenario; load average at start {}",
        args.duration.as_secs(),
        load_average()
    );
    let mut figures = Vec::new();
    for (name, shape) in chosen {
        figures.push(scenario(name, shape, args.duration).await?);
    }
    println!();
    println!(
        "| scenario | offered points/s | stored points/s | ingest CPU µs/point | points/s per ingest core (target ≥ 300,000) | limit: redb alone, µs/point | ingest ÷ limit (CPU) | ingest RSS MiB (peak) | ack p50 / p99 ms | drained |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for f in &figures {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} ({:.0} points/s) | {:.1} | {:.0} ({:.0}) | {} / {} | {} |",
            f.name,
            f.shape.rate(),
            f.stored_per_s,
            f.cpu_us_per_point,
            1e6 / f.cpu_us_per_point,
            f.limit_us_per_point,
            f.limit_per_s,
            f.cpu_us_per_point / f.limit_us_per_point,
            f.rss_mib,
            f.hwm_mib,
            f.p50_ms,
            f.p99_ms,
            if f.drained { "yes" } else { "no" },
        );
    }
    println!();
    println!("load average at end {}", load_average());
    Ok(())
}
