//! bench-dlt645: a shared DL/T 645 line of 16 meters at 2400 baud, polled
//! by the gateway's line collector, beside the line's theoretical cycle.
//!
//! Run: `cargo run --release -p guantong-e2e --bin bench-dlt645 [-- --meters 16 --baud 2400 --cycles 5]`
//!
//! The line is emulated in this process on a TCP socket (a serial device
//! server), paced at the baud rate: a request's answer is written when the
//! request and the answer would both have crossed the wire, 11 bits a byte
//! (8E1), counted from the request's first byte; the meters answer at once
//! (no turnaround). Each meter has two tags: phase A voltage (2 data bytes)
//! and forward active energy (4). The collector (`dlt645::line::Line`, the
//! code `run` uses) polls every meter as often as the line allows
//! (`poll_interval` below the cycle), waiting the inter-frame delay of a
//! serial line at that baud rate (3.5 characters) before each request.
//!
//! Theoretical cycle: the wire time of every exchange (request 20 bytes with
//! its preamble, answer 22 or 24) plus one inter-frame delay per exchange.
//! Measured: the mean time between consecutive polls of the first meter
//! (its samples reaching the sink) over `--cycles` cycles after one of
//! warm-up. Target: within 10 % of the theoretical.

use std::time::{Duration, Instant};

use clap::Parser;
use guantong_gateway::collector::{Collector, PointSink};
use guantong_gateway::dlt645::config::{Dlt645Config, Dlt645TagConfig, Dlt645Transport};
use guantong_gateway::dlt645::di::{Format, Reading};
use guantong_gateway::dlt645::frame::{self, Address, Found};
use guantong_gateway::dlt645::line::{Line, Meter};
use guantong_gateway::modbus::config::rtu_silent_interval;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 16)]
    meters: u8,
    #[arg(long, default_value_t = 2400)]
    baud: u32,
    /// Cycles measured (after one of warm-up).
    #[arg(long, default_value_t = 5)]
    cycles: usize,
}

/// (DI, data bytes, BCD value least significant first).
const TAGS: [(u32, u8, &[u8]); 2] = [
    (0x0201_0100, 2, &[0x01, 0x22]),
    (0x0001_0000, 4, &[0x78, 0x56, 0x34, 0x12]),
];
/// A read request: preamble, 12 bytes of frame, the DI.
const REQUEST_BYTES: u32 = 4 + 12 + 4;

fn answer_bytes(data: u8) -> u32 {
    4 + 12 + 4 + u32::from(data)
}

fn wire(bytes: u32, baud: u32) -> Duration {
    Duration::from_secs_f64(f64::from(bytes * 11) / f64::from(baud))
}

/// A meter's answer: preamble and frame, the value after the echoed DI.
fn answer(to: Address, di: u32, value: &[u8]) -> Vec<u8> {
    let mut data = di.to_le_bytes().to_vec();
    data.extend_from_slice(value);
    // `request` builds any frame; an answer has the response bit set.
    frame::request(to, frame::READ_DATA | 0x80, &data)
}

/// Serves the emulated line on `listener`: every meter in `meters` answers
/// its reads, paced at `baud`.
async fn serve(listener: tokio::net::TcpListener, meters: Vec<Address>, baud: u32) {
    while let Ok((mut s, _)) = listener.accept().await {
        let meters = meters.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 256];
            let mut first_byte: Option<Instant> = None;
            loop {
                let Ok(n) = s.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                first_byte.get_or_insert_with(Instant::now);
                buf.extend_from_slice(&chunk[..n]);
                while let Found::Frame(f, end) = frame::find_frame(&buf) {
                    buf.drain(..end);
                    let start = first_byte.take().unwrap_or_else(Instant::now);
                    if !buf.is_empty() {
                        first_byte = Some(Instant::now());
                    }
                    let Some(di) = f.data.first_chunk::<4>().map(|d| u32::from_le_bytes(*d)) else {
                        continue;
                    };
                    let Some((_, len, value)) = TAGS.iter().find(|t| t.0 == di) else {
                        continue;
                    };
                    if !meters.contains(&f.address) {
                        continue;
                    }
                    let done = start + wire(REQUEST_BYTES, baud) + wire(answer_bytes(*len), baud);
                    tokio::time::sleep_until(done.into()).await;
                    if s.write_all(&answer(f.address, di, value)).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let addresses: Vec<Address> = (1..=u64::from(args.meters))
        .map(|n| Address::parse(&format!("{n:012}")))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(listener, addresses.clone(), args.baud));

    let delay = rtu_silent_interval(args.baud);
    let meters: Vec<Meter> = addresses
        .iter()
        .enumerate()
        .map(|(i, &meter)| {
            let config = Dlt645Config {
                id: format!("meter-{}", i + 1),
                transport: Dlt645Transport::Tcp {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                    inter_frame_delay: delay,
                },
                meter,
                poll_interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                max_backoff: Duration::from_secs(60),
                identity: Default::default(),
                tags: TAGS
                    .iter()
                    .map(|&(di, length, _)| Dlt645TagConfig {
                        name: format!("{di:08X}"),
                        di,
                        reading: Reading {
                            length,
                            format: Format::Number,
                            signed: false,
                            scale: 0.01,
                        },
                        unit: String::new(),
                    })
                    .collect(),
            };
            Meter::new(config, (i * TAGS.len()) as u32)
        })
        .collect();
    let line = Line::new("bench".into(), meters);

    let exchanges = u32::from(args.meters) * TAGS.len() as u32;
    let wire_bytes: u32 = u32::from(args.meters)
        * TAGS
            .iter()
            .map(|t| REQUEST_BYTES + answer_bytes(t.1))
            .sum::<u32>();
    let wire_time = wire(wire_bytes, args.baud);
    let theoretical = wire_time + delay * exchanges;
    println!(
        "line: {} meters x {} tags at {} baud 8E1 (11 bits a byte), inter-frame delay {:.2} ms",
        args.meters,
        TAGS.len(),
        args.baud,
        delay.as_secs_f64() * 1e3
    );
    println!(
        "theoretical cycle: {exchanges} exchanges, {wire_bytes} bytes on the wire = {:.3} s, plus {exchanges} delays = {:.3} s",
        wire_time.as_secs_f64(),
        theoretical.as_secs_f64()
    );

    let (sink, mut rx) = PointSink::new(1 << 16);
    let cancel = CancellationToken::new();
    let collector = tokio::spawn(line.run(sink, cancel.clone()));
    let mut polls: Vec<Instant> = Vec::new();
    let mut bad = 0usize;
    let wanted = args.cycles + 2;
    let limit = Instant::now() + theoretical * (wanted as u32 * 2) + Duration::from_secs(10);
    while polls.len() < wanted {
        let handoff = tokio::time::timeout_at(limit.into(), rx.recv())
            .await
            .map_err(|_| anyhow::anyhow!("the line stalled: {} polls of meter 1", polls.len()))?
            .ok_or_else(|| anyhow::anyhow!("the collector stopped"))?;
        bad += handoff.samples.iter().filter(|s| s.value.is_none()).count();
        if handoff.samples.first().is_some_and(|s| s.tag == 0) {
            polls.push(Instant::now());
        }
    }
    cancel.cancel();
    let _ = collector.await;
    anyhow::ensure!(bad == 0, "{bad} Bad samples on a clean line");
    // One cycle of warm-up (the first poll ran at once).
    let measured = (polls[wanted - 1] - polls[1]) / (wanted - 2) as u32;
    let ratio = measured.as_secs_f64() / theoretical.as_secs_f64();
    println!(
        "measured cycle: {:.3} s (mean of {} cycles of meter 1); ratio to theoretical {:.3} (target 0.90-1.10); to wire time alone {:.3}",
        measured.as_secs_f64(),
        wanted - 2,
        ratio,
        measured.as_secs_f64() / wire_time.as_secs_f64()
    );
    anyhow::ensure!(
        (0.9..=1.1).contains(&ratio),
        "the cycle is {ratio:.3} of the theoretical"
    );
    Ok(())
}
