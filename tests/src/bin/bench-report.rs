//! Report benchmark: generating one enterprise's acceptance report (1,000
//! tags at 1 s over 30 days) and the city overview (500 enterprises, last 7
//! days), beside the limit measured in the same run: a bare read of the same
//! rollup rows from the store (what any report must at least read).
//!
//! `cargo run --release -p guantong-e2e --bin bench-report [-- --runs 5]`
//!
//! Reports read only rollups, so the benchmark writes the rollup rows that
//! 30 days of 1 s data produce (one day row per tag and day with a full
//! value sketch, hourly value rows, a data run with three gaps and a Bad run
//! per tag, a day row per gateway) instead of ingesting 2.6 billion points.
//! Rollups written at ingest time are covered by the acceptance e2e test.

use std::time::Instant;

use clap::Parser;
use guantong_e2e::bench::median;
use guantong_ingest::acceptance::{self, Criteria};
use guantong_ingest::grpc::now_ms;
use guantong_ingest::registry::{Enterprise, Equipment};
use guantong_ingest::store::Store;
use guantong_ingest::store::embedded::EmbeddedStore;
use guantong_ingest::store::rollup::{
    DAY_MS, GatewayDay, HOUR_MS, LATENCY_BUCKETS, RUN_BAD, RUN_DATA, SKETCH_K, SeriesDay, day_of,
};
use guantong_ingest::web::snapshot;
use guantong_proto::v1::{DataType, Device, Manifest, Tag};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Devices of the large enterprise (tags = devices × tags_per_device).
    #[arg(long, default_value_t = 50)]
    devices: u32,
    #[arg(long, default_value_t = 20)]
    tags_per_device: u32,
    #[arg(long, default_value_t = 30)]
    days: i64,
    /// Enterprises of the city view (each 10 devices × 10 tags, 7 days).
    #[arg(long, default_value_t = 500)]
    enterprises: u32,
}

fn manifest(gateway: &str, devices: u32, tags: u32) -> Manifest {
    Manifest {
        version: 1,
        gateway_id: gateway.into(),
        created_at_ms: 0,
        devices: (0..devices)
            .map(|d| Device {
                id: format!("dev-{d}"),
                protocol: "modbus-tcp".into(),
                endpoint: String::new(),
                identity: Default::default(),
            })
            .collect(),
        tags: (0..devices * tags)
            .map(|i| Tag {
                device: i / tags,
                name: format!("t{}", i % tags),
                address: format!("holding:{i}"),
                data_type: DataType::Double as i32,
                unit: "°C".into(),
                interval_ms: 1000,
            })
            .collect(),
    }
}

fn credit_code(n: u32) -> String {
    const C: &[u8] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
    const W: [u32; 17] = [
        1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
    ];
    let body = format!("9135010{n:010}");
    let sum: u32 = body
        .bytes()
        .zip(W)
        .map(|(b, w)| w * C.iter().position(|c| *c == b).unwrap_or(0) as u32)
        .sum();
    format!("{body}{}", C[((31 - sum % 31) % 31) as usize] as char)
}

/// Rollup rows of `series` for `days` days ending today.
fn fill(
    store: &EmbeddedStore,
    gateway: &str,
    series: &[u64],
    days: i64,
    today: i64,
) -> anyhow::Result<()> {
    let first = today - (days - 1) * DAY_MS;
    for chunk in series.chunks(100) {
        let mut day_rows = Vec::new();
        let mut runs = Vec::new();
        let mut hours = Vec::new();
        for &s in chunk {
            for d in 0..days {
                let day = first + d * DAY_MS;
                day_rows.push((
                    s,
                    day,
                    SeriesDay {
                        good: 86_000,
                        uncertain: 0,
                        bad: 100,
                        backfilled: 300,
                        changes: 8_000,
                        max_unchanged_ms: 60_000,
                        deltas: 86_000,
                        deltas_exact: 20_000,
                        first_ms: Some(day),
                        last_ms: Some(day + DAY_MS - 1000),
                        sketch: (0..SKETCH_K as u64)
                            .map(|k| s.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (k << 58 | d as u64))
                            .collect::<std::collections::BTreeSet<u64>>()
                            .into_iter()
                            .collect(),
                        latency_sum_ms: 86_000 * 300,
                        ..SeriesDay::default()
                    },
                ));
                for h in 0..24 {
                    hours.push((s, day + h * HOUR_MS, (3600, 3600.0 * 25.0, 20.0, 30.0)));
                }
            }
            // A data run with three gaps, and the Bad run of one of them.
            let end = today + DAY_MS - 1000;
            let span = (end - first) / 4;
            for g in 0..4 {
                runs.push((
                    s,
                    RUN_DATA,
                    first + g * span,
                    first + (g + 1) * span - 600_000,
                ));
            }
            runs.push((s, RUN_BAD, first + span - 600_000, first + span));
        }
        store.bench_put_rollups(day_rows, runs, hours, Vec::new())?;
    }
    let gw_days = (0..days)
        .map(|d| {
            let mut latency = vec![0; LATENCY_BUCKETS];
            latency[9] = 80_000_000;
            latency[12] = 6_000_000;
            (
                gateway.to_string(),
                first + d * DAY_MS,
                GatewayDay {
                    batches: 86_400,
                    points: series.len() as u64 * 86_400,
                    bytes: series.len() as u64 * 86_400,
                    latency,
                    ..GatewayDay::default()
                },
            )
        })
        .collect();
    store.bench_put_rollups(Vec::new(), Vec::new(), Vec::new(), gw_days)?;
    Ok(())
}

async fn enterprise(
    store: &EmbeddedStore,
    n: u32,
    devices: u32,
    tags: u32,
    days: i64,
    today: i64,
) -> anyhow::Result<(Enterprise, Vec<u64>)> {
    let gw = format!("gw-{n}");
    store.register_gateway(&gw, None).await?;
    let map = store
        .put_manifest(&gw, manifest(&gw, devices, tags))
        .await?;
    let e = Enterprise {
        code: credit_code(n),
        name: format!("企业{n}"),
        county: format!("区{}", n % 12),
        industry: ["petrochemical", "metallurgy", "equipment", "light"][n as usize % 4].into(),
        provider: format!("p{}", n % 7),
    };
    store.put_enterprise(&e).await?;
    let register: Vec<Equipment> = (0..devices + 2)
        .map(|d| Equipment {
            id: format!("E{d}"),
            name: format!("设备{d}"),
            kind: String::new(),
            workshop: String::new(),
            production: true,
            gateway: if d < devices {
                gw.clone()
            } else {
                String::new()
            },
            device: if d < devices {
                format!("dev-{d}")
            } else {
                String::new()
            },
        })
        .collect();
    store.put_equipment(&e.code, &register).await?;
    store.assign_gateway(&gw, &e.code).await?;
    fill(store, &gw, &map.series, days, today)?;
    Ok((e, map.series.clone()))
}

/// The limit: reading the same rows without computing anything.
async fn bare_read(
    store: &EmbeddedStore,
    series: &[u64],
    from: i64,
    to: i64,
) -> anyhow::Result<usize> {
    let mut n = store.series_days(series, from, to).await?.len();
    for &s in series {
        n += store.series_runs(s, RUN_DATA, 2000, from, to).await?.len();
        n += store.series_runs(s, RUN_BAD, 2000, from, to).await?.len();
    }
    Ok(n)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dir = tempfile::tempdir()?;
    let store = EmbeddedStore::open(dir.path())?;
    let today = day_of(now_ms());
    let criteria = Criteria::default();

    let t = Instant::now();
    let (big, big_series) =
        enterprise(&store, 0, a.devices, a.tags_per_device, a.days, today).await?;
    eprintln!(
        "large enterprise written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    for n in 1..=a.enterprises {
        enterprise(&store, n, 10, 10, 7, today).await?;
    }
    eprintln!(
        "{} enterprises written in {:.1} s",
        a.enterprises,
        t.elapsed().as_secs_f64()
    );
    store.bench_backdate_series(today - a.days * DAY_MS)?;

    let from = today - (a.days - 1) * DAY_MS;
    let to = today + DAY_MS;
    let mut report_s = Vec::new();
    let mut html_s = Vec::new();
    let mut bare_s = Vec::new();
    let mut city_s = Vec::new();
    let mut city_bare_s = Vec::new();
    let all_series: Vec<u64> = store.series().await?.iter().map(|s| s.id).collect();
    for _ in 0..a.runs {
        let t = Instant::now();
        let snap = snapshot(&store)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.1))?;
        let r = acceptance::enterprise_report(&store, &snap, &big, from, to, &criteria).await?;
        report_s.push(t.elapsed().as_secs_f64());
        assert_eq!(r.devices.len(), a.devices as usize);
        let t = Instant::now();
        let html = guantong_ingest::web::render_cli(
            &store,
            &snap,
            Some(&big.code),
            from,
            to,
            &criteria,
            "html",
            None,
            None,
        )
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.1))?;
        html_s.push(t.elapsed().as_secs_f64());
        assert!(html.len() > 10_000);
        let t = Instant::now();
        bare_read(&store, &big_series, from, to).await?;
        bare_s.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let snap = snapshot(&store)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.1))?;
        let view = acceptance::city_view(
            &store,
            &snap,
            &store.enterprises().await?,
            today - 6 * DAY_MS,
            to,
            &criteria,
        )
        .await?;
        city_s.push(t.elapsed().as_secs_f64());
        assert_eq!(view.enterprises, u64::from(a.enterprises) + 1);
        let t = Instant::now();
        store
            .series_days(&all_series, today - 6 * DAY_MS, to)
            .await?;
        city_bare_s.push(t.elapsed().as_secs_f64());
    }
    let tags = a.devices * a.tags_per_device;
    let (r, h, b) = (median(report_s), median(html_s), median(bare_s));
    let (c, cb) = (median(city_s), median(city_bare_s));
    println!(
        "enterprise report, {tags} tags × {} days (median of {} runs):",
        a.days, a.runs
    );
    println!("  report (JSON data)        {r:>8.3} s   target < 2 s");
    println!("  report rendered as HTML   {h:>8.3} s");
    println!(
        "  bare read of its rollups  {b:>8.3} s   (limit)   ratio {:.1}×",
        r / b
    );
    println!("city overview, {} enterprises, 7 days:", a.enterprises + 1);
    println!("  city view                 {c:>8.3} s   target < 5 s");
    println!(
        "  bare read of day rollups  {cb:>8.3} s   (limit)   ratio {:.1}×",
        c / cb
    );
    Ok(())
}
