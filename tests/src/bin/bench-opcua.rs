//! bench-opcua: values/s the real gateway delivers from an OPC UA server with
//! `--items` monitored items changing every second, its CPU and RSS, beside
//! a bare async-opcua client subscription loop on the same server in the
//! same run (the limit: what the server publishes).
//!
//! Run: `cargo build --release --workspace --bins && cargo run --release -p guantong-e2e --bin bench-opcua`
//!
//! Per run: an async-opcua server in this process (`guantong_e2e::opcua`,
//! 1000 items per subscription), a task setting every item to a new value
//! once a second, the bare client (10 subscriptions of 1000 items, counting
//! notifications), and the real `guantong-gateway` process subscribed to
//! the same items (publishing interval 1 s), with a real `guantong-ingest`
//! process behind it. After `--warmup`, over `--window`: values/s the
//! changer produced, values/s the bare client received, values/s ingest
//! stored for the gateway (sum of its tags' good counts), the gateway's CPU
//! (% of one core, /proc utime+stime) and RSS (median of 1 s samples).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_opcua::client::{ClientBuilder, DataChangeCallback, IdentityToken};
use async_opcua::types::{
    EndpointDescription, MessageSecurityMode, MonitoredItemCreateRequest, TimestampsToReturn,
    UserTokenPolicy, Variant,
};
use clap::Parser;
use guantong_e2e::opcua::{ServerOptions, TestServer};
use guantong_e2e::procs::{GatewayProc, IngestProc, gateway_toml};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    items: usize,
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Seconds before measuring (subscriptions created, values flowing).
    #[arg(long, default_value_t = 15)]
    warmup: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 30)]
    window: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

struct Figures {
    changed: f64,
    bare: f64,
    gateway: f64,
    cpu_pct: f64,
    rss_mib: f64,
    peak_mib: f64,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for r in 0..args.runs {
        let f = one_run(&args).await?;
        println!(
            "run {}: changed {:.0}/s, bare client {:.0}/s, gateway {:.0}/s (ratio {:.3}), gateway CPU {:.2}% of a core, RSS {:.1} MiB (peak {:.1})",
            r + 1,
            f.changed,
            f.bare,
            f.gateway,
            f.gateway / f.bare,
            f.cpu_pct,
            f.rss_mib,
            f.peak_mib
        );
        all.push(f);
    }
    let med = |g: fn(&Figures) -> f64| guantong_e2e::bench::median(all.iter().map(g).collect());
    let (bare, gw) = (med(|f| f.bare), med(|f| f.gateway));
    println!(
        "median of {} runs, {} items changing every second:\n  values/s: gateway {:.0} | limit (bare async-opcua client, same server, same run) {:.0} | ratio {:.3} | changes made {:.0}\n  gateway CPU {:.2}% of one core (target 2%) | RSS {:.1} MiB (target 40 MiB)",
        all.len(),
        args.items,
        gw,
        bare,
        gw / bare,
        med(|f| f.changed),
        med(|f| f.cpu_pct),
        med(|f| f.rss_mib)
    );
    Ok(())
}

async fn one_run(args: &Args) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let mut options = ServerOptions::new(&dir.path().join("server-pki"));
    options.items = args.items;
    let server = Arc::new(TestServer::start(options).await?);
    let changed = Arc::new(AtomicU64::new(0));
    let changer = {
        let (server, changed) = (server.clone(), changed.clone());
        let n = args.items;
        tokio::spawn(async move {
            let nodes: Vec<_> = (0..n).map(|i| server.node(&format!("v{i}"))).collect();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            for k in 1u64.. {
                tick.tick().await;
                server.set(
                    nodes
                        .iter()
                        .enumerate()
                        .map(|(i, node)| {
                            (node.clone(), Variant::Double(k as f64 + i as f64 * 1e-6))
                        })
                        .collect(),
                );
                changed.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };

    // The limit: a bare client subscription loop.
    let bare_count = Arc::new(AtomicU64::new(0));
    let mut client = ClientBuilder::new()
        .application_name("bench bare client")
        .application_uri("urn:bench:bare")
        .pki_dir(dir.path().join("bare-pki"))
        .create_sample_keypair(false)
        .session_retry_limit(0)
        .client()
        .map_err(|e| anyhow::anyhow!("bare client: {e:?}"))?;
    let endpoint: EndpointDescription = (
        server.url().as_str(),
        "None",
        MessageSecurityMode::None,
        UserTokenPolicy::anonymous(),
    )
        .into();
    let (session, event_loop) = client
        .connect_to_matching_endpoint(endpoint, IdentityToken::Anonymous)
        .await
        .context("bare client connect")?;
    let bare_loop = event_loop.spawn();
    session.wait_for_connection().await;
    for chunk in (0..args.items).collect::<Vec<_>>().chunks(1000) {
        let count = bare_count.clone();
        let sub = session
            .create_subscription(
                Duration::from_secs(1),
                30,
                10,
                0,
                0,
                true,
                DataChangeCallback::new(move |_, _| {
                    count.fetch_add(1, Ordering::Relaxed);
                }),
            )
            .await
            .context("bare subscription")?;
        let items: Vec<MonitoredItemCreateRequest> = chunk
            .iter()
            .map(|i| server.node(&format!("v{i}")).into())
            .collect();
        session
            .create_monitored_items(sub, TimestampsToReturn::Both, items)
            .await
            .context("bare monitored items")?;
    }

    // The gateway.
    let data = dir.path().join("ingest");
    let token = IngestProc::register(&data, "bench-gw")?;
    let ingest = IngestProc::start(&data, "127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?).await?;
    let mut text = gateway_toml("bench-gw", ingest.grpc, &token, &dir.path().join("buffer"));
    text += &format!(
        "\n[[devices]]\nid = \"opcua\"\nprotocol = \"opcua\"\nurl = \"{}\"\nsecurity_policy = \"none\"\npublishing_interval = \"1s\"\n",
        server.url()
    );
    for i in 0..args.items {
        text += &format!(
            "[[devices.tags]]\nname = \"v{i}\"\nnode = \"ns={};s=v{i}\"\n",
            server.ns
        );
    }
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, text)?;
    let mut gateway = GatewayProc::start(&config)?;
    let pid = gateway.proc.pid().context("gateway pid")?;
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;

    let api = ingest.api();
    let stored = || async {
        let s = api.get("/api/v1/summary").await?;
        let n: u64 = s["gateways"][0]["devices"][0]["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["good"].as_u64())
            .sum();
        anyhow::Ok(n)
    };
    let (c0, b0, g0, cpu0) = (
        changed.load(Ordering::Relaxed),
        bare_count.load(Ordering::Relaxed),
        stored().await?,
        guantong_e2e::bench::cpu_seconds(pid)?,
    );
    let t0 = Instant::now();
    let mut rss = Vec::new();
    while t0.elapsed() < Duration::from_secs(args.window) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(guantong_e2e::bench::rss_mib(pid)?.0);
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = guantong_e2e::bench::cpu_seconds(pid)? - cpu0;
    let (c1, b1, g1) = (
        changed.load(Ordering::Relaxed),
        bare_count.load(Ordering::Relaxed),
        stored().await?,
    );
    let (_, peak) = guantong_e2e::bench::rss_mib(pid)?;
    let split = guantong_e2e::bench::rss_by_mapping(pid)?
        .iter()
        .map(|(m, v)| format!("{m} {v:.1}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!("  gateway RSS by mapping (MiB): {split}");
    gateway.proc.terminate(Duration::from_secs(10));
    changer.abort();
    let _ = session.disconnect().await;
    bare_loop.abort();
    drop(ingest);
    if let Ok(server) = Arc::try_unwrap(server) {
        server.stop().await;
    }
    Ok(Figures {
        changed: (c1 - c0) as f64 / secs,
        bare: (b1 - b0) as f64 / secs,
        gateway: (g1 - g0) as f64 / secs,
        cpu_pct: 100.0 * cpu / secs,
        rss_mib: guantong_e2e::bench::median(rss),
        peak_mib: peak,
    })
}
