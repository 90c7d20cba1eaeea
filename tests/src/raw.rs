//! A raw gRPC client that speaks the uplink protocol by hand, to play
//! gateways that misbehave: re-send what was stored, sign with the wrong key,
//! skip or reorder links.

use std::net::SocketAddr;
use std::time::Duration;

use guantong_proto::chain::{self, Algorithm, ChainKey, Hash};
use guantong_proto::v1::gateway_message::Kind as Up;
use guantong_proto::v1::ingest_message::Kind as Down;
use guantong_proto::v1::uplink_client::UplinkClient;
use guantong_proto::v1::{
    Batch, BatchEnvelope, DataType, Device, GatewayMessage, Hello, Manifest, Point, Tag, point,
};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;

/// One device `dev` with one uint tag `x` at 1 s.
pub fn manifest(gateway: &str) -> Manifest {
    Manifest {
        version: 42,
        gateway_id: gateway.into(),
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

/// Encoded batch `seq` of `buffer_id`: ten points valued seq*100+i.
pub fn batch_bytes(buffer_id: u64, seq: u64) -> Vec<u8> {
    let base = 1_700_000_000_000 + seq as i64 * 10_000;
    let points = (0..10)
        .map(|i| Point {
            tag: 0,
            time_offset_ms: i * 1000,
            value: Some(point::Value::Uint(seq * 100 + i as u64)),
            quality: 0,
            quality_code: 0,
            server_time_delta_ms: None,
        })
        .collect();
    Batch {
        buffer_id,
        seq,
        manifest_version: 42,
        base_time_ms: base,
        points,
        loss: None,
        committed_at_ms: base,
        manifest_sha256: Vec::new(),
    }
    .encode_to_vec()
}

/// An unsigned envelope.
pub fn unsigned(payload: Vec<u8>) -> BatchEnvelope {
    BatchEnvelope {
        payload: payload.into(),
        ..Default::default()
    }
}

/// A gateway's chain state: signs links in the order they are made.
pub struct Signer {
    pub key: ChainKey,
    pub head: Hash,
}

impl Signer {
    /// An Ed25519 signer with seed `[seed; 32]`.
    pub fn new(seed: u8, gateway: &str, buffer_id: u64) -> Signer {
        Signer {
            key: ChainKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[seed; 32])),
            head: chain::genesis(gateway, buffer_id),
        }
    }

    /// An SM2 signer with secret scalar `[seed; 32]`.
    pub fn sm2(seed: u8, gateway: &str, buffer_id: u64) -> Signer {
        Signer {
            key: ChainKey::sm2_from_secret(&[seed; 32]).expect("a valid SM2 scalar"),
            head: Algorithm::Sm2.genesis(gateway, buffer_id),
        }
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key()
    }

    /// Links `payload` after the current head and signs it with `key`
    /// (normally this signer's own; the link hash is of `key`'s algorithm).
    pub fn link_with(&mut self, payload: Vec<u8>, key: &ChainKey) -> BatchEnvelope {
        let prev = self.head;
        let link = key.algorithm().link_hash(&prev, &payload);
        self.head = link;
        BatchEnvelope {
            payload: payload.into(),
            prev_hash: prev.to_vec(),
            signature: key.sign(&link).to_vec(),
            algorithm: key.algorithm().wire() as i32,
            backfill: false,
        }
    }

    pub fn link(&mut self, payload: Vec<u8>) -> BatchEnvelope {
        let key = self.key.clone();
        self.link_with(payload, &key)
    }
}

/// A channel to the ingest at `addr`: TLS trusting its CA when it serves
/// TLS (see `procs::uplink_toml`), else plaintext.
pub async fn channel(addr: SocketAddr) -> anyhow::Result<tonic::transport::Channel> {
    channel_with(addr, None).await
}

/// A channel presenting the client certificate `identity` (cert, key PEM).
pub async fn channel_with(
    addr: SocketAddr,
    identity: Option<(Vec<u8>, Vec<u8>)>,
) -> anyhow::Result<tonic::transport::Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let Some(ca) = crate::procs::ca_for(addr) else {
        return Ok(Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?);
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await?)
}

/// Opens a stream with an optional client certificate (cert, key PEM),
/// authenticating as `gateway` and saying `hello_gateway` in Hello; any
/// refusal (at the handshake or by the service) as text.
pub async fn attempt(
    addr: SocketAddr,
    identity: Option<crate::procs::Identity>,
    gateway: &str,
    token: &str,
    hello_gateway: &str,
) -> Result<RawStream, String> {
    let channel = channel_with(addr, identity)
        .await
        .map_err(|e| format!("{e:#} {:?}", e.root_cause()))?;
    RawStream::open(channel, gateway, token, hello_gateway, 0xA11CE)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// One connection: Hello (with `public_key`), then `msgs`. Returns
/// (Welcome.stored_seq, the batch numbers acknowledged).
pub async fn session(
    addr: SocketAddr,
    gateway: &str,
    token: &str,
    buffer_id: u64,
    public_key: Vec<u8>,
    msgs: Vec<Up>,
) -> anyhow::Result<(u64, Vec<u64>)> {
    session_as(
        addr,
        gateway,
        token,
        buffer_id,
        (Algorithm::Ed25519, public_key),
        msgs,
    )
    .await
}

/// `session` presenting a key of `algorithm` in Hello.
pub async fn session_as(
    addr: SocketAddr,
    gateway: &str,
    token: &str,
    buffer_id: u64,
    (algorithm, public_key): (Algorithm, Vec<u8>),
    msgs: Vec<Up>,
) -> anyhow::Result<(u64, Vec<u64>)> {
    let mut client = UplinkClient::new(channel(addr).await?);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let key_algorithm = if public_key.is_empty() {
        0
    } else {
        algorithm.wire() as i32
    };
    let hello = Hello {
        gateway_id: gateway.into(),
        buffer_id,
        software_version: "test".into(),
        first_unacked_seq: 1,
        public_key,
        key_algorithm,
        config_version: 0,
    };
    tx.send(GatewayMessage {
        kind: Some(Up::Hello(hello)),
    })
    .await?;
    let expected_acks = msgs.iter().filter(|m| matches!(m, Up::Batch(_))).count();
    for m in msgs {
        tx.send(GatewayMessage { kind: Some(m) }).await?;
    }
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    req.metadata_mut()
        .insert("x-guantong-gateway", gateway.parse()?);
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

/// One stream held open, to send and receive message by message.
pub struct RawStream {
    tx: tokio::sync::mpsc::Sender<GatewayMessage>,
    inbound: tonic::Streaming<guantong_proto::v1::IngestMessage>,
    pub stored_seq: u64,
}

impl RawStream {
    /// Opens a stream on `channel` authenticated as `gateway` with `token`,
    /// whose Hello names `hello_gateway`. Refusals come back as the status.
    pub async fn open(
        channel: tonic::transport::Channel,
        gateway: &str,
        token: &str,
        hello_gateway: &str,
        buffer_id: u64,
    ) -> Result<RawStream, tonic::Status> {
        let mut client = UplinkClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let hello = Hello {
            gateway_id: hello_gateway.into(),
            buffer_id,
            software_version: "test".into(),
            first_unacked_seq: 1,
            public_key: Vec::new(),
            key_algorithm: 0,
            config_version: 0,
        };
        let _ = tx
            .send(GatewayMessage {
                kind: Some(Up::Hello(hello)),
            })
            .await;
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        let header = |v: &str| {
            v.parse()
                .map_err(|_| tonic::Status::invalid_argument("not a header value"))
        };
        req.metadata_mut()
            .insert("authorization", header(&format!("Bearer {token}"))?);
        req.metadata_mut()
            .insert("x-guantong-gateway", header(gateway)?);
        let mut inbound = client.stream(req).await?.into_inner();
        let stored_seq = match inbound.message().await?.and_then(|m| m.kind) {
            Some(Down::Welcome(w)) => w.stored_seq,
            other => {
                return Err(tonic::Status::internal(format!(
                    "expected Welcome, got {other:?}"
                )));
            }
        };
        Ok(RawStream {
            tx,
            inbound,
            stored_seq,
        })
    }

    pub async fn send(&self, kind: Up) -> anyhow::Result<()> {
        self.tx
            .send(GatewayMessage { kind: Some(kind) })
            .await
            .map_err(|_| anyhow::anyhow!("stream closed"))
    }

    /// The next message from ingest (10 s at most); an error status ends
    /// the stream.
    pub async fn next(&mut self) -> Result<Down, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(10), self.inbound.message()).await {
            Err(_) => Err(tonic::Status::deadline_exceeded("no message within 10 s")),
            Ok(Err(status)) => Err(status),
            Ok(Ok(None)) => Err(tonic::Status::aborted("stream ended")),
            Ok(Ok(Some(m))) => m
                .kind
                .ok_or_else(|| tonic::Status::internal("empty message")),
        }
    }
}

/// Encoded batch `seq` of `buffer_id` with `points` points of tag 0, timed
/// from `base_ms` on, 1 ms apart.
pub fn batch_at(buffer_id: u64, seq: u64, base_ms: i64, points: usize) -> Vec<u8> {
    Batch {
        buffer_id,
        seq,
        manifest_version: 42,
        base_time_ms: base_ms,
        points: (0..points)
            .map(|i| Point {
                tag: 0,
                time_offset_ms: i as i64,
                value: Some(point::Value::Uint(i as u64)),
                quality: 0,
                quality_code: 0,
                server_time_delta_ms: None,
            })
            .collect(),
        loss: None,
        committed_at_ms: base_ms,
        manifest_sha256: Vec::new(),
    }
    .encode_to_vec()
}
