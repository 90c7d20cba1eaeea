//! Rollup rows as 30 days of 1 s data leave them, written straight into a
//! store (embedded or PostgreSQL): one large enterprise for the report and hundreds of small
//! ones for the city view. Used by `bench-report` and by `bench-ingest-load`
//! (reports asked while load runs).
//!
//! Reports read only rollups, so these are the rows 30 days of 1 s data
//! produce (one day row per tag and day with a full value sketch, hourly
//! value rows, a data run with three gaps and a Bad run per tag, a day row
//! per gateway) instead of 2.6 billion ingested points. Rollups written at
//! ingest time are covered by the acceptance e2e test.

use guantong_ingest::registry::{Enterprise, Equipment};
use guantong_ingest::store::Store;
use guantong_ingest::store::any::AnyStore;
use guantong_ingest::store::rollup::{
    DAY_MS, GatewayDay, HOUR_MS, LATENCY_BUCKETS, RUN_BAD, RUN_DATA, SKETCH_K, SeriesDay,
};
use guantong_proto::v1::{DataType, Device, Manifest, Tag};

/// What a city holds: one large enterprise of `devices` × `tags_per_device`
/// tags over `days`, and `enterprises` small ones (10 devices × 10 tags,
/// 7 days).
#[derive(Debug, Clone, Copy)]
pub struct City {
    pub devices: u32,
    pub tags_per_device: u32,
    pub days: i64,
    pub enterprises: u32,
}

impl Default for City {
    /// The report shape: 1,000 tags × 30 days, 500 enterprises.
    fn default() -> Self {
        City {
            devices: 50,
            tags_per_device: 20,
            days: 30,
            enterprises: 500,
        }
    }
}

/// Writes `city` for the days ending `today`; returns the large enterprise
/// and its series. The small enterprises are numbered 1..=enterprises.
pub async fn seed(
    store: &AnyStore,
    city: City,
    today: i64,
) -> anyhow::Result<(Enterprise, Vec<u64>)> {
    let t = std::time::Instant::now();
    let big = enterprise(
        store,
        0,
        city.devices,
        city.tags_per_device,
        city.days,
        today,
    )
    .await?;
    eprintln!(
        "large enterprise written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = std::time::Instant::now();
    for n in 1..=city.enterprises {
        enterprise(store, n, 10, 10, 7, today).await?;
    }
    eprintln!(
        "{} enterprises written in {:.1} s",
        city.enterprises,
        t.elapsed().as_secs_f64()
    );
    store
        .bench_backdate_series(today - city.days * DAY_MS)
        .await?;
    Ok(big)
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

pub fn credit_code(n: u32) -> String {
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
async fn fill(
    store: &AnyStore,
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
        store
            .bench_put_rollups(day_rows, runs, hours, Vec::new())
            .await?;
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
    store
        .bench_put_rollups(Vec::new(), Vec::new(), Vec::new(), gw_days)
        .await?;
    Ok(())
}

async fn enterprise(
    store: &AnyStore,
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
    fill(store, &gw, &map.series, days, today).await?;
    Ok((e, map.series.clone()))
}
