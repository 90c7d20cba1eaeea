//! Ingest's own exactly-once guarantee, tested with a raw gRPC client that
//! behaves like a gateway which ignores `Welcome` and re-sends what ingest
//! already stored (as after a lost ack raced with a reconnect), across
//! connections and an ingest restart.

use std::net::SocketAddr;

use guantong_e2e::procs::IngestProc;
use guantong_e2e::raw::{self, batch_bytes, manifest, unsigned};
use guantong_proto::v1::BatchEnvelope;
use guantong_proto::v1::gateway_message::Kind as Up;

const GW: &str = "gw-raw";

fn batch(buffer_id: u64, seq: u64) -> BatchEnvelope {
    unsigned(batch_bytes(buffer_id, seq))
}

async fn session(
    addr: SocketAddr,
    token: &str,
    buffer_id: u64,
    msgs: Vec<Up>,
) -> anyhow::Result<(u64, Vec<u64>)> {
    raw::session(addr, GW, token, buffer_id, Vec::new(), msgs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_resent_after_its_ack_was_lost_is_stored_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let token = IngestProc::register(&data, GW)?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let mut ingest = IngestProc::start(&data, any, any).await?;
    let buffer = 0xB0FF;

    let (stored, acks) = session(
        ingest.grpc,
        &token,
        buffer,
        vec![
            Up::Manifest(manifest(GW)),
            Up::Batch(batch(buffer, 1)),
            Up::Batch(batch(buffer, 2)),
        ],
    )
    .await?;
    assert_eq!((stored, acks), (0, vec![1, 2]));

    // Same batches again on a new connection, and again after an ingest restart.
    let (stored, acks) = session(
        ingest.grpc,
        &token,
        buffer,
        vec![Up::Batch(batch(buffer, 1)), Up::Batch(batch(buffer, 2))],
    )
    .await?;
    assert_eq!(
        (stored, acks),
        (2, vec![1, 2]),
        "duplicates are acked, not stored"
    );
    ingest.restart().await?;
    let (stored, acks) = session(
        ingest.grpc,
        &token,
        buffer,
        vec![Up::Batch(batch(buffer, 2)), Up::Batch(batch(buffer, 3))],
    )
    .await?;
    assert_eq!((stored, acks), (2, vec![2, 3]));

    let points = ingest.api().points(GW, "dev", "x").await?;
    let values: Vec<u64> = points.iter().filter_map(|p| p["value"].as_u64()).collect();
    let expected: Vec<u64> = (1..=3)
        .flat_map(|s| (0..10).map(move |i| s * 100 + i))
        .collect();
    assert_eq!(
        values,
        expected,
        "each of batches 1, 2, 3 stored exactly once\n{}",
        ingest.proc.logs()
    );

    // A new buffer of the same gateway starts again at seq 1 without colliding.
    let other = 0xB0FF + 1;
    let (stored, acks) =
        session(ingest.grpc, &token, other, vec![Up::Batch(batch(other, 1))]).await?;
    assert_eq!((stored, acks), (0, vec![1]));
    let tag = ingest.api().tag(GW, "dev", "x").await?.expect("tag");
    assert_eq!(tag["samples"], 40, "{tag}");
    Ok(())
}
