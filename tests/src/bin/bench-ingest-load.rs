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
//!
//! The played gateways share this machine with ingest; the cores the load
//! generator itself used are printed beside ingest's figures.
//!
//! Unless `--no-reports`, the store first receives a city's report rollups
//! (`guantong_e2e::city`: one enterprise of 1,000 tags × 30 days, 500 small
//! ones) and, with the load running at its steady state and before the
//! measured window, the enterprise's report and the city view are asked
//! over HTTP (as an admin) three times each and timed. Ingest RSS is
//! sampled through the window (`--rss-every`) to show growth on long runs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use guantong_e2e::bench::{cpu_seconds, median, percentile, rss_mib};
use guantong_e2e::city::City;
use guantong_e2e::load::{self, COMMIT_INTERVAL, MAX_BATCH_POINTS, Shape};
use guantong_ingest::store::any::AnyStore;
use guantong_ingest::store::embedded::EmbeddedStore;
use guantong_ingest::store::rollup::{DAY_MS, day_of};
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
    /// Skip the city's report rollups and the reports asked under load.
    #[arg(long)]
    no_reports: bool,
    /// How often ingest RSS is sampled in the window.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    rss_every: Duration,
    /// Run ingest on PostgreSQL: the server (a `postgres://` URL to a
    /// database on it). Each scenario makes and drops a database of its own;
    /// the limit is then a bare client's binary COPY of the same rows into
    /// the same table, and PostgreSQL's CPU is counted beside ingest's.
    #[arg(long)]
    database: Option<String>,
    /// Ingest replicas on PostgreSQL (gateway `i` streams to replica `i mod N`).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
}

/// Reports asked over HTTP while the load runs (medians and worst of
/// `REPORT_RUNS`, seconds).
#[derive(Default)]
struct ReportTimes {
    report_s: Vec<f64>,
    city_s: Vec<f64>,
    /// The access log's last entry: little to read, but like every report
    /// it first writes an access-log entry (a store write).
    access_log_s: Vec<f64>,
    /// Size of the report's JSON.
    report_mb: f64,
}

const REPORT_RUNS: usize = 3;

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
    /// PostgreSQL's CPU per point stored (on PostgreSQL).
    pg_us_per_point: Option<f64>,
    reports: Option<ReportTimes>,
    /// CPU cores the load generator itself used (same machine).
    load_cores: f64,
    /// (seconds into the window, RSS MiB).
    rss_samples: Vec<(f64, f64)>,
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

/// Asks the seeded enterprise's 30-day report and the city's 7-day view
/// `REPORT_RUNS` times each, timing every answer until its last byte.
///
/// The client runs on a thread and runtime of its own and parses the
/// answers outside the timing: on the load generator's runtime, busy with
/// 1,000 streams, receiving and parsing a report's tens of megabytes of
/// JSON took seconds that were the client's, not ingest's.
fn ask_reports(
    base: String,
    token: String,
    big: String,
    city: City,
    today: i64,
) -> anyhow::Result<ReportTimes> {
    let date = guantong_ingest::acceptance::date_of;
    let report = format!(
        "{base}/api/v1/enterprises/{big}/report?from={}&to={}",
        date(today - (city.days - 1) * DAY_MS),
        date(today)
    );
    let city_view = format!(
        "{base}/api/v1/city?from={}&to={}",
        date(today - 6 * DAY_MS),
        date(today)
    );
    let access_log = format!("{base}/api/v1/access-log?limit=1");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = reqwest::Client::new();
        // (seconds until the last byte, the body)
        let get = |url: String| {
            let request = client.get(url.clone()).bearer_auth(&token);
            async move {
                let t = Instant::now();
                let resp = request.send().await?;
                let status = resp.status();
                let body = resp.bytes().await?;
                let seconds = t.elapsed().as_secs_f64();
                anyhow::ensure!(status.is_success(), "GET {url}: {status}");
                anyhow::Ok((seconds, body))
            }
        };
        let mut times = ReportTimes::default();
        for _ in 0..REPORT_RUNS {
            let (seconds, body) = get(report.clone()).await?;
            times.report_s.push(seconds);
            times.report_mb = body.len() as f64 / 1e6;
            let r: serde_json::Value = serde_json::from_slice(&body)?;
            let devices = r["devices"].as_array().map_or(0, Vec::len);
            anyhow::ensure!(
                devices == city.devices as usize,
                "report of {big}: {devices} devices, expected {}",
                city.devices
            );
            times.access_log_s.push(get(access_log.clone()).await?.0);
            let (seconds, body) = get(city_view.clone()).await?;
            times.city_s.push(seconds);
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            anyhow::ensure!(
                v["enterprises"].as_u64() == Some(u64::from(city.enterprises) + 1),
                "city view: {} enterprises, expected {}",
                v["enterprises"],
                city.enterprises + 1
            );
        }
        Ok(times)
    })
}

/// Prints the bytes PostgreSQL holds per stored point (tables, indexes,
/// TOAST): the point partitions, the signed batches, and everything else
/// (rollups, streams, chain) — what retention can free and what it keeps.
fn storage_per_point(url: &str, points: u64) -> anyhow::Result<()> {
    let bytes = |sql: &str| -> anyhow::Result<f64> {
        Ok(guantong_e2e::pg::psql(url, sql)?
            .parse::<f64>()
            .unwrap_or(0.0))
    };
    let partitions = bytes(
        "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits \
         WHERE inhparent = 'points'::regclass",
    )?;
    let batches = bytes("SELECT pg_total_relation_size('batches')")?;
    let all = bytes(
        "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')",
    )?;
    let per = |b: f64| b / points.max(1) as f64;
    println!(
        "  on disk per stored point: points {:.0} B (dropped by --retention), signed batches {:.0} B, rollups and the rest {:.0} B",
        per(partitions),
        per(batches),
        per(all - partitions - batches)
    );
    Ok(())
}

async fn scenario(name: String, shape: Shape, args: &Args) -> anyhow::Result<Figures> {
    let duration = args.duration;
    let work = tempfile::tempdir()?;
    let prefix = format!("load{}", std::process::id());
    let today = day_of(guantong_ingest::grpc::now_ms());
    let city = City::default();
    let db = args
        .database
        .as_deref()
        .map(|url| guantong_e2e::pg::TestDb::create_on(url, "load"))
        .transpose()?;
    let store = match &db {
        Some(db) => db.migrated_store().await?,
        None => AnyStore::Embedded(EmbeddedStore::open(&work.path().join("data"))?),
    };
    let big = if args.no_reports {
        None
    } else {
        let (big, _) = guantong_e2e::city::seed(&store, city, today).await?;
        Some(big.code)
    };
    drop(store);
    println!(
        "{name}: {} gateways × {} tags every {} ms = {:.0} points/s offered; registering…",
        shape.gateways,
        shape.tags,
        shape.interval_ms,
        shape.rate()
    );
    let (mut ingests, load) = load::start_with_ingest(
        work.path(),
        &prefix,
        shape,
        db.as_ref().map(|d| d.url.as_str()),
        args.replicas,
    )
    .await?;
    let pids: Vec<u32> = ingests.iter().filter_map(|i| i.proc.pid()).collect();
    let ingest_cpu = || -> anyhow::Result<f64> { pids.iter().map(|p| cpu_seconds(*p)).sum() };
    let ingest_rss = || -> anyhow::Result<(f64, f64)> {
        pids.iter().try_fold((0.0, 0.0), |(r, h), p| {
            let (r1, h1) = rss_mib(*p)?;
            Ok((r + r1, h + h1))
        })
    };
    let ingest = &mut ingests[0];
    let (own_cpu0, start_all) = (cpu_seconds(std::process::id())?, Instant::now());
    // Warm up: every stream connected, its manifest stored and a batch acked.
    load::wait_for_load(
        &load,
        ingest,
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
    let reports = match &big {
        Some(code) => {
            let (base, token) = (ingest.api().base, ingest.admin_token()?);
            let big = code.clone();
            Some(
                tokio::task::spawn_blocking(move || ask_reports(base, token, big, city, today))
                    .await??,
            )
        }
        None => None,
    };
    let (cpu0, pg0, before) = (ingest_cpu()?, postgres_cpu(), load.totals());
    load.measure_latency(true);
    let start = Instant::now();
    let mut rss_samples = Vec::new();
    while start.elapsed() < duration {
        rss_samples.push((start.elapsed().as_secs_f64(), ingest_rss()?.0));
        tokio::time::sleep(args.rss_every.min(duration.saturating_sub(start.elapsed()))).await;
    }
    let window = load.totals();
    let elapsed = start.elapsed().as_secs_f64();
    load.measure_latency(false);
    load.stop_producing();
    let drained = load
        .wait_drained(duration.max(Duration::from_secs(60)))
        .await;
    let (cpu1, pg1, after) = (ingest_cpu()?, postgres_cpu(), load.totals());
    let load_cores =
        (cpu_seconds(std::process::id())? - own_cpu0) / start_all.elapsed().as_secs_f64();
    let (rss, hwm) = ingest_rss()?;
    let latencies = load.latencies_ms();
    load.stop().await?;
    for i in &mut ingests {
        i.proc.terminate(Duration::from_secs(10));
    }
    let acked = (after.acked - before.acked) as f64;
    let seconds = duration.as_secs().clamp(2, 10);
    let (limit_us, limit_rate) = match &args.database {
        Some(url) => copy_limit(url, shape, seconds).await?,
        None => raw_redb(shape, seconds)?,
    };
    if let Some(db) = &db {
        storage_per_point(&db.url, after.acked)?;
    }
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
        pg_us_per_point: db.as_ref().map(|_| (pg1 - pg0) * 1e6 / acked),
        reports,
        load_cores,
        rss_samples,
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
    if let Some(r) = &f.reports {
        println!(
            "  while loaded: enterprise report ({} tags × {} days, {:.1} MB of JSON) median {:.3} s, worst {:.3} s (target < 2 s); city view ({} enterprises, 7 days) median {:.3} s, worst {:.3} s (target < 5 s)",
            city.devices * city.tags_per_device,
            city.days,
            r.report_mb,
            median(r.report_s.clone()),
            worst(&r.report_s),
            city.enterprises + 1,
            median(r.city_s.clone()),
            worst(&r.city_s),
        );
        println!(
            "  while loaded: the access log's last entry (an access-log write and a small read) median {:.3} s, worst {:.3} s",
            median(r.access_log_s.clone()),
            worst(&r.access_log_s),
        );
    }
    if let Some(pg) = f.pg_us_per_point {
        println!(
            "  on PostgreSQL ({} replica(s)): PostgreSQL {pg:.2} µs CPU/point beside ingest's {:.2}: {:.2} µs/point in all against the COPY limit's {:.2} (client and server); stored {:.0}% of the COPY limit's points/s (target ≥ 50%)",
            args.replicas,
            f.cpu_us_per_point,
            f.cpu_us_per_point + pg,
            f.limit_us_per_point,
            f.stored_per_s / f.limit_per_s * 100.0,
        );
    }
    println!(
        "  the load generator itself used {:.2} of this machine's cores",
        f.load_cores
    );
    println!(
        "  ingest RSS MiB over the window: {}",
        f.rss_samples
            .iter()
            .map(|(t, m)| format!("{m:.0} @{t:.0}s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(f)
}

/// CPU seconds of every PostgreSQL server process on this machine.
fn postgres_cpu() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .filter_map(|pid| cpu_seconds(pid).ok())
        .sum()
}

/// The limit on PostgreSQL: `seconds` of the scenario's points as rows of
/// `points` (ingest's columns), written by a bare client with binary COPY
/// into a fresh database of the same schema, in ingest's transaction shape
/// (every gateway's batches of one commit interval, at most a group per
/// transaction). Returns (client process + PostgreSQL CPU µs per point,
/// points/s wall).
async fn copy_limit(server: &str, shape: Shape, seconds: u64) -> anyhow::Result<(f64, f64)> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::ToSql;
    let db = guantong_e2e::pg::TestDb::create_on(server, "copy_limit")?;
    drop(db.migrated_store().await?); // the schema and today's partitions
    let (mut client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let t0_ms = guantong_gateway::quality::now_ms();
    let tick_ms = COMMIT_INTERVAL.as_millis() as u64;
    let ticks: Vec<Vec<(i64, i64, f64, i64)>> = (0..seconds * 1000 / tick_ms)
        .map(|k| {
            let range = shape.samples_before(k * tick_ms)..shape.samples_before((k + 1) * tick_ms);
            (0..shape.gateways)
                .flat_map(|g| {
                    load::samples(shape, range.clone(), t0_ms)
                        .into_iter()
                        .map(move |s| {
                            let num = match s.value {
                                Some(guantong_proto::v1::point::Value::Double(d)) => d,
                                _ => 0.0,
                            };
                            (
                                (g as i64) * i64::from(shape.tags) + i64::from(s.tag) + 1,
                                s.time_ms,
                                num,
                                g as i64,
                            )
                        })
                })
                .collect()
        })
        .collect();
    let points: usize = ticks.iter().map(Vec::len).sum();
    // This process's CPU (the client and its connection task; the load
    // generator has stopped) and the server's.
    let own = std::process::id();
    let (start, cpu, pg) = (Instant::now(), cpu_seconds(own)?, postgres_cpu());
    for (k, tick) in ticks.iter().enumerate() {
        for rows in tick.chunks(PG_GROUP_POINTS) {
            let txn = client.transaction().await?;
            let sink = txn
                .copy_in(&format!(
                    "COPY points ({}) FROM STDIN BINARY",
                    guantong_ingest::store::postgres::POINT_COLUMNS
                ))
                .await?;
            let writer =
                BinaryCopyInWriter::new(sink, &guantong_ingest::store::postgres::POINT_TYPES);
            let mut writer = std::pin::pin!(writer);
            let (none_i64, none_txt) = (None::<i64>, None::<String>);
            for (series, time, num, g) in rows {
                let row: [&(dyn ToSql + Sync); 13] = [
                    series,
                    time,
                    &0i32,
                    &0i64,
                    &4i16,
                    num,
                    &none_i64,
                    &none_txt,
                    &none_i64,
                    time,
                    &false,
                    g,
                    &(k as i64),
                ];
                writer.as_mut().write(&row).await?;
            }
            writer.as_mut().finish().await?;
            txn.commit().await?;
        }
    }
    let wall = start.elapsed();
    let cpu = (cpu_seconds(own)? - cpu) + (postgres_cpu() - pg);
    let n = points as f64;
    Ok((cpu * 1e6 / n, n / wall.as_secs_f64()))
}

/// Ingest's most points per transaction on PostgreSQL (`store::postgres::GROUP_POINTS`).
const PG_GROUP_POINTS: usize = 100_000;

fn worst(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
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
        figures.push(scenario(name, shape, &args).await?);
    }
    println!();
    println!(
        "| scenario | offered points/s | stored points/s | ingest CPU µs/point | points/s per ingest core (target ≥ 300,000) | limit: redb alone, µs/point | ingest ÷ limit (CPU) | ingest RSS MiB (peak) | ack p50 / p99 ms | drained | report / city view s while loaded (targets 2 / 5) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|");
    for f in &figures {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} ({:.0} points/s) | {:.1} | {:.0} ({:.0}) | {} / {} | {} | {} |",
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
            f.reports.as_ref().map_or("—".to_string(), |r| format!(
                "{:.2} / {:.2}",
                median(r.report_s.clone()),
                median(r.city_s.clone())
            )),
        );
    }
    println!();
    println!("load average at end {}", load_average());
    Ok(())
}
