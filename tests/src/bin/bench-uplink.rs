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
//!   plaintext, signed, and over TLS (the default since issue 9).

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
use guantong_gateway::uplink::Uplink;
use guantong_ingest::store::embedded::EmbeddedStore;
use guantong_ingest::store::{AppendBatch, Store};
use guantong_proto::chain;
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
    key: Option<&ed25519_dalek::SigningKey>,
) -> anyhow::Result<(Arc<Buffer>, Duration, u64)> {
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
    let start = Instant::now();
    // As the writer does: one commit per batch.
    let mut last = 0;
    for chunk in all.chunks(batch) {
        last = buffer.append(MANIFEST_VERSION, chunk, batch)?;
    }
    Ok((buffer, start.elapsed(), last))
}

/// Drains a pre-filled buffer into a real ingest; with `signed`, the buffer
/// signs its chain and ingest verifies it on receipt.
async fn end_to_end(
    all: &[Sample],
    args: &Args,
    signed: bool,
    tls: bool,
) -> anyhow::Result<(Duration, Duration, u64)> {
    let dir = tempfile::tempdir()?;
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let public = signed.then(|| key.verifying_key().to_bytes().to_vec());
    let ingest = LocalIngest::start_with(public, tls).await?;
    let (buffer, write_time, last) =
        fill_buffer(dir.path(), all, args.batch, signed.then_some(&key))?;
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
    };
    let cancel = CancellationToken::new();
    let start = Instant::now();
    let task = tokio::spawn(uplink.run(cancel.clone()));
    wait_drained(&buffer, last, Duration::from_secs(600)).await?;
    let elapsed = start.elapsed();
    cancel.cancel();
    let _ = task.await;
    if signed {
        let chains = ingest.store.chains().await?;
        anyhow::ensure!(
            chains.len() == 1 && chains[0].breaks.is_empty() && chains[0].verified_through == last,
            "the signed chain did not verify: {chains:?}"
        );
    }
    Ok((elapsed, write_time, ingest.stored_points().await?))
}

/// (sign, verify) cost per batch: link hash + Ed25519 over the real payloads.
fn chain_cost(batches: &[Batch]) -> (Duration, Duration) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let public = key.verifying_key().to_bytes();
    let payloads: Vec<Vec<u8>> = batches.iter().map(|b| b.encode_to_vec()).collect();
    let mut head = chain::genesis(GW, 1);
    let start = Instant::now();
    let mut sigs = Vec::with_capacity(payloads.len());
    for p in &payloads {
        let link = chain::link_hash(&head, p);
        sigs.push((head, chain::sign(&key, &link)));
        head = link;
    }
    let sign = start.elapsed() / payloads.len() as u32;
    let start = Instant::now();
    for (p, (prev, sig)) in payloads.iter().zip(&sigs) {
        let link = chain::link_hash(prev, p);
        assert!(
            chain::verify(&public, &link, sig),
            "a fresh signature verifies"
        );
    }
    (sign, start.elapsed() / payloads.len() as u32)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let all = samples(args.points, args.tags, 1_767_225_600_000);
    let batches = batches(&all, args.batch);
    let n = args.points as f64;
    let (mut raw, mut raw8, mut direct, mut buf, mut e2e) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut signed_e2e, mut tls_e2e) = (Vec::new(), Vec::new());
    println!(
        "bench-uplink: {} points, {} tags, {} points per batch, {} runs (median shown)",
        args.points, args.tags, args.batch, args.runs
    );
    let wire: usize = batches.iter().map(|b| b.encoded_len()).sum();
    for run in 1..=args.runs {
        let r = n / raw_redb(&batches, 1)?.as_secs_f64();
        let r8 = n / raw_redb(&batches, 8)?.as_secs_f64();
        let d = n / store_direct(&batches, args.tags).await?.as_secs_f64();
        let (e, w, stored) = end_to_end(&all, &args, false, false).await?;
        let (es, _, stored_signed) = end_to_end(&all, &args, true, false).await?;
        let (et, _, stored_tls) = end_to_end(&all, &args, false, true).await?;
        anyhow::ensure!(
            stored_tls == args.points as u64,
            "end to end over TLS stored {stored_tls} points"
        );
        let et = n / et.as_secs_f64();
        tls_e2e.push(et);
        anyhow::ensure!(
            stored_signed == args.points as u64,
            "signed end to end stored {stored_signed} points"
        );
        let es = n / es.as_secs_f64();
        signed_e2e.push(es);
        if stored != args.points as u64 {
            anyhow::bail!(
                "end to end stored {stored} points, expected {}",
                args.points
            );
        }
        let (e, w) = (n / e.as_secs_f64(), n / w.as_secs_f64());
        println!(
            "  run {run}: raw redb {r:>10.0}/s  raw redb x8 {r8:>10.0}/s  store direct {d:>10.0}/s  buffer write {w:>10.0}/s  end to end {e:>10.0}/s  signed {es:>10.0}/s  TLS {et:>10.0}/s"
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
    let signed = median(signed_e2e);
    let over_tls = median(tls_e2e);
    println!();
    println!("| transport security (issue 9) | points/s (median) | vs plaintext |");
    println!("|---|---:|---:|");
    println!("| end to end, plaintext | {e2e:.0} | 1.00 |");
    println!(
        "| end to end, TLS 1.3 (rustls, ring) | {over_tls:.0} | {:.2} |",
        over_tls / e2e
    );
    let (sign, verify) = chain_cost(&batches);
    println!();
    println!("| evidence chain (issue 8) | value | vs end to end unsigned |");
    println!("|---|---:|---:|");
    println!("| end to end, unsigned | {e2e:.0} points/s | 1.00 |");
    println!(
        "| end to end, signed at commit and verified by ingest on receipt | {signed:.0} points/s | {:.2} |",
        signed / e2e
    );
    let per_point = |d: Duration| d.as_secs_f64() * 1e9 / args.batch as f64;
    println!(
        "| sign one {}-point batch (link hash + Ed25519) | {:.1} µs, {:.1} ns/point | {:.1} % of an unsigned point's end-to-end time |",
        args.batch,
        sign.as_secs_f64() * 1e6,
        per_point(sign),
        per_point(sign) * e2e / 1e9 * 100.0
    );
    println!(
        "| verify one batch (link hash + Ed25519) | {:.1} µs, {:.1} ns/point | {:.1} % |",
        verify.as_secs_f64() * 1e6,
        per_point(verify),
        per_point(verify) * e2e / 1e9 * 100.0
    );
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
