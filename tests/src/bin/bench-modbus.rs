//! bench-modbus: the Modbus collector's throughput beside the limit, and the
//! real gateway's footprint.
//!
//! Run: `cargo build --release --workspace --bins && cargo run --release -p guantong-e2e --bin bench-modbus`
//!
//! 1. Throughput. One simulated Modbus TCP device (tokio-modbus server, in
//!    this process). The gateway's collector (`modbus::line::Line`, the code
//!    `run` uses: planned requests, per-request timeout, decode into
//!    samples) polls back to back for `--secs`; a bare tokio-modbus client
//!    loop sends the same requests to the same server for as long. Runs
//!    alternate; medians of `--runs` are printed with the ratio.
//! 2. Footprint. The real `guantong-gateway` process (durable buffer, uplink
//!    to a real local `guantong-ingest`) collecting 10,000 and 100,000 u16
//!    points at 1 s from `--devices` simulated devices; CPU (% of one core,
//!    from /proc utime+stime) and RSS over `--window` after a warm-up.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use guantong_e2e::procs::{GatewayProc, IngestProc, Proc, binary, gateway_toml};
use guantong_e2e::sim::SimDevice;
use guantong_gateway::modbus::config::{
    ModbusConfig, ModbusTagConfig, ModbusType, Table, Transport,
};
use guantong_gateway::modbus::line::{Line, Unit};
use tokio_modbus::client::Reader;

#[derive(Parser)]
struct Args {
    /// Registers each throughput cycle reads (u16 tags at consecutive addresses).
    #[arg(long, default_value_t = 1000)]
    registers: u16,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Simulated devices for the footprint runs.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Seconds of warm-up before measuring the footprint.
    #[arg(long, default_value_t = 15)]
    warmup: u64,
    /// Seconds the footprint is measured over.
    #[arg(long, default_value_t = 30)]
    window: u64,
    /// Point counts for the footprint runs.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000u32, 100_000])]
    points: Vec<u32>,
    /// Run the gateway under this profiler command (e.g. "heaptrack -o
    /// /tmp/gw"); figures then include the profiler's overhead.
    #[arg(long)]
    wrap: Option<String>,
    /// The gateway binary for the footprint runs, instead of the one built
    /// beside this bench: another profile, or a cross build run under
    /// `--wrap "qemu-aarch64-static -L /usr/aarch64-linux-gnu"`.
    #[arg(long)]
    gateway: Option<std::path::PathBuf>,
    /// Write the footprint devices' tags once, as a template they share,
    /// instead of inline in the config.
    #[arg(long)]
    template: bool,
    /// Skip the footprint runs.
    #[arg(long)]
    no_footprint: bool,
    /// The gateway's `uplink.max_in_flight` in the footprint runs (batches
    /// sent and not yet acknowledged; each holds its encoded points).
    #[arg(long)]
    max_in_flight: Option<u32>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    throughput(&args).await?;
    if !args.no_footprint {
        for &points in &args.points {
            footprint(&args, points).await?;
        }
    }
    Ok(())
}

fn device(id: &str, addr: SocketAddr, tags: u32, interval: Duration) -> ModbusConfig {
    ModbusConfig {
        id: id.into(),
        transport: Transport::Tcp {
            host: addr.ip().to_string(),
            port: addr.port(),
        },
        unit: 1,
        poll_interval: interval,
        timeout: Duration::from_secs(1),
        retries: 0,
        max_gap: 16,
        max_registers: 125,
        max_backoff: Duration::from_secs(60),
        identify: false,
        tags: (0..tags)
            .map(|a| {
                ModbusTagConfig::new(&format!("r{a}"), Table::Holding, a as u16, ModbusType::U16)
            })
            .collect(),
        identity: Default::default(),
    }
}

struct Rate {
    requests_per_s: f64,
    registers_per_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn throughput(args: &Args) -> anyhow::Result<()> {
    let n = args.registers;
    let sim = SimDevice::with_size(usize::from(n) + 200);
    let (addr, _task) = sim.serve("127.0.0.1:0".parse()?).await?;
    let config = device("bench", addr, u32::from(n), Duration::from_secs(1));
    let mut line = Line::new("bench".into(), vec![Unit::new(config, 0)]);
    let plan: Vec<(u16, u16)> = line.units[0].groups[0]
        .plan
        .iter()
        .map(|r| (r.start, r.count))
        .collect();
    let minimum = usize::from(n).div_ceil(125);
    println!(
        "throughput: {n} registers per cycle; collector plan {} requests (planner minimum {minimum})",
        plan.len()
    );
    if plan.len() != minimum {
        bail!("the plan is not minimal: {plan:?}");
    }
    let window = Duration::from_secs_f64(args.secs);
    let mut bare = Vec::new();
    let mut collector = Vec::new();
    let mut ctx = tokio_modbus::client::tcp::connect(addr).await?;
    let mut timed = Vec::new();
    let mut pair_ratios = Vec::new();
    let t = Some(Duration::from_secs(1));
    for run in 0..args.runs {
        // Rotate which goes first, so warm-up and drift favour none.
        let (b, c, bt) = match run % 3 {
            0 => {
                let b = bare_run(&mut ctx, &plan, window, None).await?;
                let c = collector_run(&mut line, plan.len(), window).await?;
                (b, c, bare_run(&mut ctx, &plan, window, t).await?)
            }
            1 => {
                let c = collector_run(&mut line, plan.len(), window).await?;
                let bt = bare_run(&mut ctx, &plan, window, t).await?;
                (bare_run(&mut ctx, &plan, window, None).await?, c, bt)
            }
            _ => {
                let bt = bare_run(&mut ctx, &plan, window, t).await?;
                let b = bare_run(&mut ctx, &plan, window, None).await?;
                (b, collector_run(&mut line, plan.len(), window).await?, bt)
            }
        };
        println!(
            "  run {}: bare {:.0} req/s {:.0} reg/s | bare+timeout {:.0} req/s | collector {:.0} req/s {:.0} reg/s | ratio {:.1}%",
            run + 1,
            b.requests_per_s,
            b.registers_per_s,
            bt.requests_per_s,
            c.requests_per_s,
            c.registers_per_s,
            100.0 * c.registers_per_s / b.registers_per_s
        );
        pair_ratios.push(c.registers_per_s / b.registers_per_s);
        timed.push(bt);
        bare.push(b);
        collector.push(c);
    }
    let med = |v: &[Rate], f: fn(&Rate) -> f64| median(v.iter().map(f).collect());
    let (br, bq) = (
        med(&bare, |r| r.registers_per_s),
        med(&bare, |r| r.requests_per_s),
    );
    let (cr, cq) = (
        med(&collector, |r| r.registers_per_s),
        med(&collector, |r| r.requests_per_s),
    );
    println!("| measure | collector | bare tokio-modbus loop (limit) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| registers/s (median of {}) | {cr:.0} | {br:.0} | {:.1}% |",
        args.runs,
        100.0 * cr / br
    );
    println!(
        "| requests/s (median of {}) | {cq:.0} | {bq:.0} | {:.1}% |",
        args.runs,
        100.0 * cq / bq
    );
    println!(
        "| median of per-run ratios collector/bare | | | {:.1}% |",
        100.0 * median(pair_ratios)
    );
    println!(
        "| bare loop with a 1 s timeout per request, requests/s | | {:.0} | {:.1}% of bare |",
        med(&timed, |r| r.requests_per_s),
        100.0 * med(&timed, |r| r.requests_per_s) / bq
    );
    println!(
        "| requests per cycle | {} | {} (planner minimum) | |",
        plan.len(),
        minimum
    );
    Ok(())
}

/// The limit: the collector's requests from a bare tokio-modbus client loop.
async fn bare_run(
    ctx: &mut tokio_modbus::client::Context,
    plan: &[(u16, u16)],
    window: Duration,
    per_request_timeout: Option<Duration>,
) -> anyhow::Result<Rate> {
    let start = Instant::now();
    let mut requests = 0u64;
    let mut registers = 0u64;
    while start.elapsed() < window {
        for &(s, c) in plan {
            let words = match per_request_timeout {
                Some(t) => tokio::time::timeout(t, ctx.read_holding_registers(s, c)).await???,
                None => ctx.read_holding_registers(s, c).await??,
            };
            registers += words.len() as u64;
            requests += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Rate {
        requests_per_s: requests as f64 / secs,
        registers_per_s: registers as f64 / secs,
    })
}

/// The collector: the same requests, each under its timeout, decoded into samples.
async fn collector_run(line: &mut Line, requests: usize, window: Duration) -> anyhow::Result<Rate> {
    let start = Instant::now();
    let mut cycles = 0u64;
    let mut samples = 0u64;
    while start.elapsed() < window {
        for (_, s) in line.poll_once().await {
            samples += s.len() as u64;
            if let Some(bad) = s.iter().find(|x| x.value.is_none()) {
                bail!("the collector read a Bad value: {bad:?}");
            }
        }
        cycles += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Rate {
        requests_per_s: (cycles * requests as u64) as f64 / secs,
        registers_per_s: samples as f64 / secs,
    })
}

async fn footprint(args: &Args, points: u32) -> anyhow::Result<()> {
    let devices = args.devices.max(1);
    let per_device = points.div_ceil(devices as u32);
    let dir = tempfile::tempdir()?;
    let mut sims = Vec::new();
    let mut text = String::new();
    let tags: String = (0..per_device)
        .map(|a| {
            format!(
                "[[devices.tags]]\nname = \"r{a}\"\naddress = {}\ntype = \"u16\"\n",
                400001 + a
            )
        })
        .collect();
    std::fs::write(
        dir.path().join("bench-template.toml"),
        format!(
            "[template]\nmanufacturer = \"Guantong\"\nmodel = \"bench\"\nmanual = \"none\"\n{}",
            tags.replace("[[devices.tags]]", "[[tags]]")
        ),
    )?;
    for d in 0..devices {
        let sim = SimDevice::with_size(per_device as usize);
        let (addr, task) = sim.serve("127.0.0.1:0".parse()?).await?;
        sims.push((sim, task));
        text += &format!(
            "\n[[devices]]\nid = \"dev-{d}\"\nprotocol = \"modbus-tcp\"\nhost = \"{}\"\nport = {}\npoll_interval = \"1s\"\nidentify = false\n",
            addr.ip(),
            addr.port()
        );
        if args.template {
            text += "template = \"bench-template.toml\"\n";
        } else {
            text += &tags;
        }
    }
    let data = dir.path().join("ingest");
    let token = IngestProc::register(&data, "bench-gw")?;
    let ingest = IngestProc::start(&data, "127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?).await?;
    let config = dir.path().join("gateway.toml");
    let mut head = gateway_toml("bench-gw", ingest.grpc, &token, &dir.path().join("buffer"));
    if let Some(n) = args.max_in_flight {
        head = head.replace("[uplink]\n", &format!("[uplink]\nmax_in_flight = {n}\n"));
    }
    std::fs::write(&config, head + &text)?;
    let gateway_binary = match &args.gateway {
        Some(path) => path.clone(),
        None => binary("guantong-gateway")?,
    };
    let gateway = match &args.wrap {
        None => {
            GatewayProc::start_command(std::process::Command::new(&gateway_binary), &config)?.proc
        }
        Some(wrap) => {
            let mut words = wrap.split_whitespace();
            let mut cmd = std::process::Command::new(words.next().context("empty --wrap")?);
            cmd.args(words)
                .arg(&gateway_binary)
                .arg("run")
                .arg("--config")
                .arg(&config);
            Proc::spawn(
                "guantong-gateway (wrapped)",
                &mut cmd,
                &config.with_extension("log"),
            )?
        }
    };
    let pid = gateway.pid().context("gateway pid")?;
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let requests0: u64 = sims.iter().map(|(s, _)| s.requests()).sum();
    let cpu0 = guantong_e2e::bench::cpu_seconds(pid)?;
    let t0 = Instant::now();
    let mut rss = Vec::new();
    while t0.elapsed() < Duration::from_secs(args.window) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(guantong_e2e::bench::rss_mib(pid)?.0);
    }
    let cpu = guantong_e2e::bench::cpu_seconds(pid)? - cpu0;
    let secs = t0.elapsed().as_secs_f64();
    let requests: u64 = sims.iter().map(|(s, _)| s.requests()).sum::<u64>() - requests0;
    let (_, peak) = guantong_e2e::bench::rss_mib(pid)?;
    let api = ingest.api();
    let stored = api.points("bench-gw", "dev-0", "r0").await?.len();
    println!(
        "footprint: {points} points at 1 s over {devices} devices ({per_device} each{}): CPU {:.1}% of one core ({:.2} µs/point), RSS median {:.1} MiB (peak {:.1} MiB), {:.0} requests/s; ingest holds {stored} points of dev-0/r0 after {:.0} s",
        if args.template {
            ", tags from a template"
        } else {
            ", tags inline"
        },
        100.0 * cpu / secs,
        1e6 * cpu / (secs * f64::from(points)),
        median(rss),
        peak,
        requests as f64 / secs,
        args.warmup as f64 + secs,
    );
    let mut gateway = gateway;
    gateway.terminate(Duration::from_secs(10));
    drop(ingest);
    Ok(())
}
