//! Uplink benchmark: points/s from the gateway's durable buffer through gRPC
//! into ingest's embedded store, beside the limits measured in the same run.
//!
//! `cargo run --release -p guantong-e2e --bin bench-uplink [-- --points 2000000 --runs 3]`
//!
//! Figures (each the median of `--runs` runs on fresh directories):
//! - raw redb: the storage engine committing the same points in ingest's
//!   layout (one row per series and minute of each batch, encoded as ingest
//!   encodes them), one fsynced transaction per batch: the limit. Also with
//!   8 batches per transaction, the most ingest's group commit can gather
//!   from one gateway's window.
//! - ingest store direct: `EmbeddedStore::append` called in-process with the
//!   same batches, no network (shows the cost of ingest's bookkeeping).
//! - buffer write: the gateway buffer committing the same points.
//! - end to end: a pre-filled gateway buffer drained by the real uplink over
//!   loopback gRPC into a real ingest until every batch is acknowledged;
//!   plaintext, signed (Ed25519 and SM2), and over TLS (the default since
//!   issue 9).
//!
//! The evidence chain's cost is also given as process CPU time per point
//! (`CLOCK_PROCESS_CPUTIME_ID`: gateway buffer and ingest run in this
//! process), buffer fill (where signing happens) plus drain (where ingest
//! verifies), signed against unsigned: unlike wall time on a shared machine,
//! it does not grow when other processes take the cores.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use guantong_e2e::bench::{
    GW, LocalIngest, MANIFEST_VERSION, manifest, median, samples, wait_drained,
};
use guantong_gateway::buffer::{Buffer, ChainSigner, WhenFull};
use guantong_gateway::config::Compression;
use guantong_gateway::quality::Sample;
use guantong_gateway::status::Status;
use guantong_gateway::uplink::Uplink;
use guantong_ingest::store::embedded::EmbeddedStore;
use guantong_ingest::store::{AppendBatch, Store};
use guantong_proto::chain::{Algorithm, ChainKey, PublicKey};
use guantong_proto::v1::{Batch, Manifest, Point};
use prost::Message;
use redb::{Database, Durability, TableDefinition};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// Points per run.
    #[arg(long, default_value_t = 2_000_000)]
    points: usize,
    /// Points per batch (the gateway's max_batch_points).
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Tags the points are spread over.
    #[arg(long, default_value_t = 100)]
    tags: u32,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Uplink compression: zstd, gzip or none.
    #[arg(long, default_value = "zstd")]
    compression: String,
    /// Batches in flight.
    #[arg(long, default_value_t = 32)]
    window: u32,
}

fn batches(all: &[Sample], size: usize) -> Vec<Batch> {
    all.chunks(size)
        .enumerate()
        .map(|(i, chunk)| {
            let base = chunk.iter().map(|s| s.time_ms).min().unwrap_or(0);
            Batch {
                buffer_id: 1,
                seq: i as u64 + 1,
                manifest_version: MANIFEST_VERSION,
                base_time_ms: base,
                points: chunk
                    .iter()
                    .map(|s| Point {
                        tag: s.tag,
                        time_offset_ms: s.time_ms - base,
                        value: s.value.clone(),
                        quality: 0,
                        quality_code: 0,
                        server_time_delta_ms: None,
                    })
                    .collect(),
                loss: None,
                committed_at_ms: base,
                manifest_sha256: Vec::new(),
            }
        })
        .collect()
}

const RAW: TableDefinition<(u64, i64, u64), &[u8]> = TableDefinition::new("chunks");

/// The storage engine alone: same points, ingest's row layout, one fsync per
/// `group` batches.
fn raw_redb(batches: &[Batch], group: usize) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let db = Database::create(dir.path().join("raw.redb"))?;
    let start = Instant::now();
    let mut id = 0u64;
    for txn_batches in batches.chunks(group) {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut table = txn.open_table(RAW)?;
            for b in txn_batches {
                let mut groups: HashMap<(u32, i64), Vec<Point>> = HashMap::new();
                for p in &b.points {
                    let t = b.base_time_ms + p.time_offset_ms;
                    groups
                        .entry((p.tag, t.div_euclid(60_000)))
                        .or_default()
                        .push(p.clone());
                }
                for ((tag, minute), points) in groups {
                    id += 1;
                    let bytes = Batch {
                        points,
                        ..Default::default()
                    }
                    .encode_to_vec();
                    table.insert((u64::from(tag), minute, id), bytes.as_slice())?;
                }
            }
        }
        txn.commit()?;
    }
    Ok(start.elapsed())
}

async fn store_direct(batches: &[Batch], tags: u32) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let store = EmbeddedStore::open(dir.path())?;
    store.register_gateway(GW, None).await?;
    let map = store.put_manifest(GW, manifest(tags)).await?;
    let start = Instant::now();
    let mut pending = Vec::new();
    for b in batches {
        pending.push(store.append(AppendBatch {
            gateway_id: GW.into(),
            batch: b.clone(),
            map: Some(map.clone()),
            received_at_ms: 0,
            backfill: false,
            link: None,
            rejected: None,
            wire_bytes: 0,
        }));
        // Keep a window like a gateway stream would.
        if pending.len() >= 8 {
            pending.remove(0).await?;
        }
    }
    for p in pending {
        p.await?;
    }
    Ok(start.elapsed())
}

fn fill_buffer(
    dir: &std::path::Path,
    all: &[Sample],
    batch: usize,
    key: Option<&ChainKey>,
) -> anyhow::Result<(Arc<Buffer>, Duration, Duration, u64)> {
    let mut buffer = Buffer::open(dir, 8 << 30, WhenFull::DropOldest)?;
    if let Some(key) = key {
        buffer = buffer.with_identity(ChainSigner {
            key: key.clone(),
            gateway_id: GW.into(),
        });
    }
    let buffer = Arc::new(buffer);
    buffer.put_manifest(&Manifest {
        version: MANIFEST_VERSION,
        ..manifest(all.iter().map(|s| s.tag).max().unwrap_or(0) + 1)
    })?;
    let (start, cpu) = (Instant::now(), cpu_time());
    // As the writer does: one commit per batch.
    let mut last = 0;
    for chunk in all.chunks(batch) {
        last = buffer.append(MANIFEST_VERSION, chunk, batch)?;
    }
    Ok((buffer, start.elapsed(), cpu_time() - cpu, last))
}

/// CPU time of this process, all threads.
fn cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// One end-to-end run.
struct EndToEnd {
    /// Wall time of the drain (buffer -> gRPC -> ingest, acked).
    drain: Duration,
    /// Wall time of filling the buffer (one commit per batch).
    write: Duration,
    /// Process CPU time of filling and of draining.
    cpu_write: Duration,
    cpu_drain: Duration,
    stored: u64,
}

/// A key of `algorithm` for the bench gateway.
fn bench_key(algorithm: Algorithm) -> ChainKey {
    match algorithm {
        Algorithm::Ed25519 => ChainKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[3; 32])),
        Algorithm::Sm2 => ChainKey::sm2_from_secret(&[3; 32]).expect("a valid SM2 scalar"),
    }
}

/// Drains a pre-filled buffer into a real ingest; with `signed`, the buffer
/// signs its chain with that algorithm and ingest verifies it on receipt.
async fn end_to_end(
    all: &[Sample],
    args: &Args,
    signed: Option<Algorithm>,
    tls: bool,
) -> anyhow::Result<EndToEnd> {
    let dir = tempfile::tempdir()?;
    let key = signed.map(bench_key);
    let public = key
        .as_ref()
        .map(|k| PublicKey::new(k.algorithm(), k.public_key()))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let ingest = LocalIngest::start_with(public, tls).await?;
    let (buffer, write_time, cpu_write, last) =
        fill_buffer(dir.path(), all, args.batch, key.as_ref())?;
    let (_tx, committed) = watch::channel(last);
    let compression = match args.compression.as_str() {
        "gzip" => Compression::Gzip,
        "none" => Compression::None,
        _ => Compression::Zstd,
    };
    let mut config = ingest.uplink_config(ingest.grpc, compression, args.window);
    config.max_batch_points = std::num::NonZeroU32::new(args.batch as u32).expect("nonzero");
    let uplink = Uplink {
        config,
        gateway_id: GW.into(),
        buffer: buffer.clone(),
        committed,
        status: Arc::new(Status::new(GW, 0, Vec::new(), 0)),
        health: None,
        remote: None,
    };
    let cancel = CancellationToken::new();
    let (start, cpu) = (Instant::now(), cpu_time());
    let task = tokio::spawn(uplink.run(cancel.clone()));
    wait_drained(&buffer, last, Duration::from_secs(600)).await?;
    let (elapsed, cpu_drain) = (start.elapsed(), cpu_time() - cpu);
    cancel.cancel();
    let _ = task.await;
    if signed.is_some() {
        let chains = ingest.store.chains().await?;
        anyhow::ensure!(
            chains.len() == 1 && chains[0].breaks.is_empty() && chains[0].verified_through == last,
            "the signed chain did not verify: {chains:?}"
        );
    }
    Ok(EndToEnd {
        drain: elapsed,
        write: write_time,
        cpu_write,
        cpu_drain,
        stored: ingest.stored_points().await?,
    })
}

/// (sign, verify) CPU time per batch: link hash + signature over the real
/// payloads, as the buffer and ingest do them.
fn chain_cost(batches: &[Batch], algorithm: Algorithm) -> (Duration, Duration) {
    let key = bench_key(algorithm);
    let public = PublicKey::new(algorithm, key.public_key()).expect("its own key");
    let payloads: Vec<Vec<u8>> = batches.iter().map(|b| b.encode_to_vec()).collect();
    let mut head = algorithm.genesis(GW, 1);
    let start = cpu_time();
    let mut sigs = Vec::with_capacity(payloads.len());
    for p in &payloads {
        let link = algorithm.link_hash(&head, p);
        sigs.push((head, key.sign(&link)));
        head = link;
    }
    let sign = (cpu_time() - start) / payloads.len() as u32;
    let start = cpu_time();
    for (p, (prev, sig)) in payloads.iter().zip(&sigs) {
        let link = algorithm.link_hash(prev, p);
        assert!(public.verify(&link, sig), "a fresh signature verifies");
    }
    (sign, (cpu_time() - start) / payloads.len() as u32)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let all = samples(args.points, args.tags, 1_767_225_600_000);
    let batches = batches(&all, args.batch);
    let n = args.points as f64;
    let (mut raw, mut raw8, mut direct, mut buf, mut e2e) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut signed_e2e, mut sm2_e2e, mut tls_e2e) = (Vec::new(), Vec::new(), Vec::new());
    // CPU ns per point, fill + drain: unsigned, Ed25519, SM2.
    let (mut cpu_plain, mut cpu_ed, mut cpu_sm2) = (Vec::new(), Vec::new(), Vec::new());
    println!(
        "bench-uplink: {} points, {} tags, {} points per batch, {} runs (median shown)",
        args.points, args.tags, args.batch, args.runs
    );
    let wire: usize = batches.iter().map(|b| b.encoded_len()).sum();
    let cpu_per_point = |r: &EndToEnd| (r.cpu_write + r.cpu_drain).as_secs_f64() * 1e9 / n;
    for run in 1..=args.runs {
        let r = n / raw_redb(&batches, 1)?.as_secs_f64();
        let r8 = n / raw_redb(&batches, 8)?.as_secs_f64();
        let d = n / store_direct(&batches, args.tags).await?.as_secs_f64();
        let plain = end_to_end(&all, &args, None, false).await?;
        let ed = end_to_end(&all, &args, Some(Algorithm::Ed25519), false).await?;
        let sm2 = end_to_end(&all, &args, Some(Algorithm::Sm2), false).await?;
        let tls = end_to_end(&all, &args, None, true).await?;
        for (what, r) in [
            ("plaintext", &plain),
            ("signed", &ed),
            ("SM2-signed", &sm2),
            ("TLS", &tls),
        ] {
            anyhow::ensure!(
                r.stored == args.points as u64,
                "end to end {what} stored {} points, expected {}",
                r.stored,
                args.points
            );
        }
        let et = n / tls.drain.as_secs_f64();
        tls_e2e.push(et);
        let es = n / ed.drain.as_secs_f64();
        signed_e2e.push(es);
        let e2 = n / sm2.drain.as_secs_f64();
        sm2_e2e.push(e2);
        let (c0, c1, c2) = (
            cpu_per_point(&plain),
            cpu_per_point(&ed),
            cpu_per_point(&sm2),
        );
        cpu_plain.push(c0);
        cpu_ed.push(c1);
        cpu_sm2.push(c2);
        let (e, w) = (n / plain.drain.as_secs_f64(), n / plain.write.as_secs_f64());
        println!(
            "  run {run}: raw redb {r:>10.0}/s  raw redb x8 {r8:>10.0}/s  store direct {d:>10.0}/s  buffer write {w:>10.0}/s  end to end {e:>10.0}/s  signed {es:>10.0}/s  SM2 {e2:>10.0}/s  TLS {et:>10.0}/s  CPU ns/point unsigned {c0:.0} Ed25519 {c1:.0} SM2 {c2:.0}"
        );
        raw.push(r);
        raw8.push(r8);
        direct.push(d);
        buf.push(w);
        e2e.push(e);
    }
    let (raw, raw8, direct, buf, e2e) = (
        median(raw),
        median(raw8),
        median(direct),
        median(buf),
        median(e2e),
    );
    let (signed, signed_sm2) = (median(signed_e2e), median(sm2_e2e));
    let over_tls = median(tls_e2e);
    let (cpu_plain, cpu_ed, cpu_sm2) = (median(cpu_plain), median(cpu_ed), median(cpu_sm2));
    println!();
    println!("| transport security (issue 9) | points/s (median) | vs plaintext |");
    println!("|---|---:|---:|");
    println!("| end to end, plaintext | {e2e:.0} | 1.00 |");
    println!(
        "| end to end, TLS 1.3 (rustls, ring) | {over_tls:.0} | {:.2} |",
        over_tls / e2e
    );
    println!();
    println!(
        "| evidence chain (issue 8), wall time | points/s (median) | vs end to end unsigned |"
    );
    println!("|---|---:|---:|");
    println!("| end to end, unsigned | {e2e:.0} | 1.00 |");
    println!(
        "| end to end, Ed25519, verified by ingest on receipt | {signed:.0} | {:.2} |",
        signed / e2e
    );
    println!(
        "| end to end, SM2/SM3, verified by ingest on receipt | {signed_sm2:.0} | {:.2} |",
        signed_sm2 / e2e
    );
    println!();
    println!(
        "| evidence chain (issue 8), process CPU per point, buffer fill + drain | ns/point (median) | vs unsigned | chain's share of the signed total (limit 10 %) |"
    );
    println!("|---|---:|---:|---:|");
    println!("| unsigned | {cpu_plain:.0} | 1.00 | |");
    for (name, c) in [("Ed25519", cpu_ed), ("SM2/SM3", cpu_sm2)] {
        println!(
            "| {name} | {c:.0} | {:.3} | {:.1} % |",
            c / cpu_plain,
            (c - cpu_plain) / c * 100.0
        );
    }
    println!();
    println!(
        "| evidence chain (issue 8), CPU of the chain alone | per {}-point batch | ns/point | vs an unsigned point's CPU ({cpu_plain:.0} ns) |",
        args.batch
    );
    println!("|---|---:|---:|---:|");
    let per_point = |d: Duration| d.as_secs_f64() * 1e9 / args.batch as f64;
    for algorithm in Algorithm::ALL {
        let (sign, verify) = chain_cost(&batches, algorithm);
        for (what, d) in [("sign", sign), ("verify", verify)] {
            println!(
                "| {what} ({algorithm}: link hash + signature) | {:.1} µs | {:.2} | {:.2} % |",
                d.as_secs_f64() * 1e6,
                per_point(d),
                per_point(d) / cpu_plain * 100.0
            );
        }
    }
    println!();
    println!("| figure | points/s (median) | vs raw redb |");
    println!("|---|---:|---:|");
    println!("| raw redb, ingest layout, fsync per batch (limit) | {raw:.0} | 1.00 |");
    println!(
        "| raw redb, ingest layout, fsync per 8 batches | {raw8:.0} | {:.2} |",
        raw8 / raw
    );
    println!(
        "| ingest store, direct append | {direct:.0} | {:.2} |",
        direct / raw
    );
    println!(
        "| gateway buffer write, fsync per batch | {buf:.0} | {:.2} |",
        buf / raw
    );
    println!(
        "| end to end: buffer -> gRPC -> ingest store, acked | {e2e:.0} | {:.2} |",
        e2e / raw
    );
    println!();
    println!(
        "end to end vs raw redb with 8 batches per fsync: {:.2}",
        e2e / raw8
    );
    println!();
    println!(
        "wire size, uncompressed: {:.2} bytes/point",
        wire as f64 / n
    );
    Ok(())
}
