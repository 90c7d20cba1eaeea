//! Report benchmark: generating one enterprise's acceptance report (1,000
//! tags at 1 s over 30 days) and the city overview (500 enterprises, last 7
//! days), beside the limit measured in the same run: a bare read of the same
//! rollup rows from the store (what any report must at least read).
//!
//! `cargo run --release -p guantong-e2e --bin bench-report [-- --runs 5]`
//!
//! The store holds the rollup rows 30 days of 1 s data produce, written by
//! `guantong_e2e::city::seed` (reports read only rollups).

use std::time::Instant;

use clap::Parser;
use guantong_e2e::bench::median;
use guantong_e2e::city::{self, City};
use guantong_ingest::acceptance::{self, Criteria};
use guantong_ingest::grpc::now_ms;
use guantong_ingest::store::any::AnyStore;
use guantong_ingest::store::embedded::EmbeddedStore;
use guantong_ingest::store::rollup::{DAY_MS, RUN_BAD, RUN_DATA, day_of};
use guantong_ingest::store::{RunsQuery, Store};
use guantong_ingest::web::snapshot;

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
    /// Run on PostgreSQL: the server (a `postgres://` URL to a database on
    /// it); the bench makes and drops a database of its own there.
    #[arg(long)]
    database: Option<String>,
}

/// The limit: reading the same rows without computing anything.
async fn bare_read(store: &AnyStore, series: &[u64], from: i64, to: i64) -> anyhow::Result<usize> {
    let mut n = store.series_days(series, from, to).await?.len();
    let queries = series
        .iter()
        .flat_map(|&series| {
            [RUN_DATA, RUN_BAD].map(|kind| RunsQuery {
                series,
                kind,
                tol: 2000,
                from,
                to,
            })
        })
        .collect();
    n += store
        .series_runs_of(queries)
        .await?
        .iter()
        .map(Vec::len)
        .sum::<usize>();
    Ok(n)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dir = tempfile::tempdir()?;
    // A database of its own on the server named, dropped at the end.
    let db = a
        .database
        .as_deref()
        .map(|url| guantong_e2e::pg::TestDb::create_on(url, "bench_report"))
        .transpose()?;
    let store = match &db {
        Some(db) => db.migrated_store().await?,
        None => AnyStore::Embedded(EmbeddedStore::open(dir.path())?),
    };
    println!(
        "store: {}",
        if db.is_some() {
            "PostgreSQL"
        } else {
            "embedded"
        }
    );
    let today = day_of(now_ms());
    let criteria = Criteria::default();

    let (big, big_series) = city::seed(
        &store,
        City {
            devices: a.devices,
            tags_per_device: a.tags_per_device,
            days: a.days,
            enterprises: a.enterprises,
        },
        today,
    )
    .await?;

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
