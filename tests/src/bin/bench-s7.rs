//! bench-s7: the S7 collector's read rate beside a bare client loop, its
//! requests per cycle beside the planner's minimum, and the real gateway's
//! CPU at 1,000 tags polled every second.
//!
//! Run: `cargo build --release --workspace --bins && ./target/release/bench-s7`
//! (needs `.venv-peers/` from `./test.sh`, or `GUANTONG_PEERS_PYTHON`).
//!
//! The PLC is python-snap7's server (`tests/peers/s7_server.py`), a
//! third-party S7comm implementation, serving `--blocks` data blocks of
//! `--tags / --blocks` f32 values each.
//! 1. Rate. The collector's poll (`s7::Poller`: the plan, multi-item read
//!    requests, item checks, decoding into samples) and a bare loop sending
//!    the same pre-encoded requests over its own connection and reading the
//!    answers without decoding them (the limit), one cycle each in turn for
//!    `--secs`, each timed on its own; medians of `--runs`, with the ratio.
//! 2. Requests per cycle: the plan's, beside the least any plan needs for
//!    the PDU the CPU granted (each request's answer carries at most PDU −
//!    14 bytes, and every item 5 bytes of header and fill besides its data).
//! 3. Footprint: the real `guantong-gateway run` (durable buffer, uplink to
//!    a real `guantong-ingest`) polling the tags every second: CPU as % of
//!    one core over `--window` after `--warmup`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use guantong_e2e::bench::{cpu_seconds, median, rss_mib};
use guantong_e2e::procs::{GatewayProc, IngestProc, gateway_toml};
use guantong_e2e::s7::Plc;
use guantong_gateway::s7::config::{Address, S7Config, S7TagConfig, S7Type};
use guantong_gateway::s7::{Poller, proto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    tags: u32,
    /// Data blocks the tags are spread over.
    #[arg(long, default_value_t = 4)]
    blocks: u32,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds per rate run.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Tag type: f32 (stored as its shortest decimal) or u16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "u16"])]
    r#type: String,
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    #[arg(long, default_value_t = 30)]
    window: u64,
}

fn tags_toml(args: &Args) -> String {
    let per = args.tags.div_ceil(args.blocks);
    (0..args.tags)
        .map(|i| {
            format!(
                "[[devices.tags]]\nname = \"t{i}\"\naddress = \"DB{}.DB{}{}\"\ntype = \"{}\"\n",
                10 + i / per,
                width(args),
                4 * (i % per),
                args.r#type
            )
        })
        .collect()
}

/// The address letter for the tag type (a u16 tag reads the first word of
/// each 4-byte slot, so both types read the same bytes).
fn width(args: &Args) -> &'static str {
    if args.r#type == "u16" { "W" } else { "D" }
}

fn config(args: &Args, port: u16) -> anyhow::Result<S7Config> {
    let per = args.tags.div_ceil(args.blocks);
    let tags = (0..args.tags)
        .map(|i| {
            let address = format!("DB{}.DB{}{}", 10 + i / per, width(args), 4 * (i % per));
            Ok(S7TagConfig {
                name: format!("t{i}"),
                parsed: Some(Address::parse(&address).map_err(anyhow::Error::msg)?),
                address,
                data_type: if args.r#type == "u16" {
                    S7Type::U16
                } else {
                    S7Type::F32
                },
                length: None,
                unit: String::new(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(S7Config {
        id: "plc".into(),
        host: "127.0.0.1".into(),
        port,
        rack: 0,
        slot: 1,
        tsap: None,
        poll_interval: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
        max_backoff: Duration::from_secs(5),
        tags,
        identity: Default::default(),
    })
}

/// A bare S7 client: connect, negotiate, then the given frames in turn.
struct Bare {
    stream: TcpStream,
}

impl Bare {
    async fn connect(port: u16) -> anyhow::Result<Bare> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let mut bare = Bare { stream };
        bare.exchange(&proto::connect_request(0x0101)).await?;
        bare.exchange(&proto::setup_request()).await?;
        Ok(bare)
    }

    async fn exchange(&mut self, frame: &[u8]) -> anyhow::Result<usize> {
        self.stream.write_all(frame).await?;
        let mut header = [0u8; 4];
        self.stream.read_exact(&mut header).await?;
        let len = usize::from(u16::from_be_bytes([header[2], header[3]])) - 4;
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).await?;
        Ok(len)
    }
}

/// CPU time of the calling thread (the bench's runtime is single-threaded).
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let per = args.tags.div_ceil(args.blocks);
    let logs = tempfile::tempdir()?;
    let _plc = Plc::start_with(
        port,
        &[args.blocks.to_string(), (per * 4).to_string()],
        logs.path(),
    )?;
    let config = config(&args, port)?;
    let mut poller = Poller::connect(config.clone())
        .await
        .map_err(anyhow::Error::msg)?;
    let pdu = usize::from(poller.pdu());
    let plan = poller.plan();
    let frames: Vec<Vec<u8>> = (0..plan.requests())
        .map(|q| proto::read_request(q as u16, &plan.request_items(q)))
        .collect();
    let items: usize = (0..plan.requests())
        .map(|q| plan.request_items(q).len())
        .sum();
    let bytes = u64::from(args.tags) * 4;
    // Fewest items: each block's bytes split at the largest even item size.
    let max_item = ((pdu - 14 - 5) & !1) as u64;
    let least_items = u64::from(args.blocks) * (u64::from(per) * 4).div_ceil(max_item);
    let minimum = (bytes + 5 * least_items).div_ceil(pdu as u64 - 14);
    println!(
        "{} tags ({}) in {} data blocks; PDU {pdu} bytes; plan: {} requests, {items} items per cycle; planner minimum for this PDU: {minimum} requests",
        args.tags,
        args.r#type,
        args.blocks,
        plan.requests()
    );
    let mut bare = Bare::connect(port).await?;
    let window = Duration::from_secs_f64(args.secs);
    let (mut collector_rates, mut bare_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut cpu_ratios = Vec::new();
    for run in 0..args.runs {
        // One collector poll, then one bare cycle, in turn: both meet the
        // server (a Python process, whose speed drifts) in the same state.
        let (mut collector_time, mut bare_time) = (Duration::ZERO, Duration::ZERO);
        let (mut collector_cpu, mut bare_cpu) = (Duration::ZERO, Duration::ZERO);
        let mut cycles = 0u64;
        let t0 = Instant::now();
        while t0.elapsed() < window {
            let (t, c) = (Instant::now(), thread_cpu());
            let samples = poller.poll().await.map_err(anyhow::Error::msg)?;
            collector_time += t.elapsed();
            collector_cpu += thread_cpu() - c;
            if samples.len() != args.tags as usize {
                bail!("a poll gave {} samples", samples.len());
            }
            let (t, c) = (Instant::now(), thread_cpu());
            for f in &frames {
                bare.exchange(f).await?;
            }
            bare_time += t.elapsed();
            bare_cpu += thread_cpu() - c;
            cycles += 1;
        }
        cpu_ratios.push(collector_cpu.as_secs_f64() / bare_cpu.as_secs_f64());
        println!(
            "run {run}: client CPU per cycle: collector {:.1} µs, bare loop {:.1} µs",
            1e6 * collector_cpu.as_secs_f64() / cycles as f64,
            1e6 * bare_cpu.as_secs_f64() / cycles as f64
        );
        let values = cycles as f64 * f64::from(args.tags);
        let collector = values / collector_time.as_secs_f64();
        let limit = values / bare_time.as_secs_f64();
        println!(
            "run {run}: collector {collector:.0} values/s, bare loop {limit:.0} values/s, ratio {:.1} %",
            100.0 * collector / limit
        );
        collector_rates.push(collector);
        bare_rates.push(limit);
        ratios.push(collector / limit);
    }
    println!(
        "rate: collector {:.0} values/s, bare loop (limit) {:.0} values/s; ratio of medians {:.1} %, median of per-run ratios {:.1} %",
        median(collector_rates.clone()),
        median(bare_rates.clone()),
        100.0 * median(collector_rates) / median(bare_rates),
        100.0 * median(ratios)
    );
    println!(
        "client CPU per cycle, collector ÷ bare loop: median {:.2}×",
        median(cpu_ratios)
    );
    drop(bare);
    drop(poller);
    footprint(&args, port).await
}

async fn footprint(args: &Args, port: u16) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let token = IngestProc::register(&data, "bench-gw")?;
    let ingest = IngestProc::start(&data, "127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?).await?;
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        gateway_toml("bench-gw", ingest.grpc, &token, &dir.path().join("buffer"))
            + &format!(
                "\n[[devices]]\nid = \"plc\"\nprotocol = \"s7\"\nhost = \"127.0.0.1\"\nport = {port}\npoll_interval = \"1s\"\n{}",
                tags_toml(args)
            ),
    )?;
    let gateway = GatewayProc::start(&config)?;
    let pid = gateway.proc.pid().context("gateway pid")?;
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    let mut rss = Vec::new();
    while t0.elapsed() < Duration::from_secs(args.window) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(rss_mib(pid)?.0);
    }
    let cpu = cpu_seconds(pid)? - cpu0;
    let secs = t0.elapsed().as_secs_f64();
    let stored = ingest.api().points("bench-gw", "plc", "t0").await?.len();
    println!(
        "footprint: {} tags at 1 s: gateway CPU {:.2} % of one core (target ≤ 1 %), RSS median {:.1} MiB; ingest holds {stored} points of plc/t0 after {:.0} s",
        args.tags,
        100.0 * cpu / secs,
        median(rss),
        args.warmup as f64 + secs,
    );
    drop(gateway);
    Ok(())
}
