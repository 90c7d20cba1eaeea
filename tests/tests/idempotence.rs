//! Ingest's own exactly-once guarantee, tested with a raw gRPC client that
//! behaves like a gateway which ignores `Welcome` and re-sends what ingest
//! already stored (as after a lost ack raced with a reconnect), across
//! connections and an ingest restart.

use std::net::SocketAddr;
use std::time::Duration;

use guantong_e2e::procs::IngestProc;
use guantong_proto::v1::gateway_message::Kind as Up;
use guantong_proto::v1::ingest_message::Kind as Down;
use guantong_proto::v1::uplink_client::UplinkClient;
use guantong_proto::v1::{
    Batch, BatchEnvelope, DataType, Device, GatewayMessage, Hello, Manifest, Point, Tag, point,
};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;

const GW: &str = "gw-raw";

fn manifest() -> Manifest {
    Manifest {
        version: 42,
        gateway_id: GW.into(),
        created_at_ms: 0,
        devices: vec![Device {
            id: "dev".into(),
            protocol: "test".into(),
            endpoint: "here".into(),
            identity: Default::default(),
        }],
        tags: vec![Tag {
            device: 0,
            name: "x".into(),
            address: "holding:0".into(),
            data_type: DataType::Uint as i32,
            unit: String::new(),
            interval_ms: 1000,
        }],
    }
}

fn batch(buffer_id: u64, seq: u64) -> BatchEnvelope {
    let base = 1_700_000_000_000 + seq as i64 * 10_000;
    let points = (0..10)
        .map(|i| Point {
            tag: 0,
            time_offset_ms: i * 1000,
            value: Some(point::Value::Uint(seq * 100 + i as u64)),
            quality: 0,
            quality_code: 0,
        })
        .collect();
    let b = Batch {
        buffer_id,
        seq,
        manifest_version: 42,
        base_time_ms: base,
        points,
        loss: None,
        committed_at_ms: base,
    };
    BatchEnvelope {
        payload: b.encode_to_vec().into(),
        ..Default::default()
    }
}

/// One connection: Hello, then `msgs`; returns (Welcome.stored_seq, acked seqs).
async fn session(
    addr: SocketAddr,
    token: &str,
    buffer_id: u64,
    msgs: Vec<Up>,
) -> anyhow::Result<(u64, Vec<u64>)> {
    let mut client = UplinkClient::connect(format!("http://{addr}")).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(GatewayMessage {
        kind: Some(Up::Hello(Hello {
            gateway_id: GW.into(),
            buffer_id,
            software_version: "test".into(),
            first_unacked_seq: 1,
            ..Default::default()
        })),
    })
    .await?;
    let expected_acks = msgs.iter().filter(|m| matches!(m, Up::Batch(_))).count();
    for m in msgs {
        tx.send(GatewayMessage { kind: Some(m) }).await?;
    }
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    req.metadata_mut().insert("x-guantong-gateway", GW.parse()?);
    let mut inbound = client.stream(req).await?.into_inner();
    let stored = match inbound.message().await?.and_then(|m| m.kind) {
        Some(Down::Welcome(w)) => w.stored_seq,
        other => anyhow::bail!("expected Welcome, got {other:?}"),
    };
    let mut acks = Vec::new();
    while acks.len() < expected_acks {
        match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await?? {
            Some(m) => match m.kind {
                Some(Down::Ack(a)) => acks.push(a.batch_seq),
                other => anyhow::bail!("expected Ack, got {other:?}"),
            },
            None => anyhow::bail!("stream closed after {} acks", acks.len()),
        }
    }
    Ok((stored, acks))
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
            Up::Manifest(manifest()),
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
