//! The uplink: streams buffered batches to ingest and deletes what it acks.
//!
//! # Protocol (see proto/guantong/v1/uplink.proto)
//! One bidirectional gRPC stream per connection. The gateway sends `Hello`
//! (gateway id, buffer id, first unacked sequence number); ingest answers
//! `Welcome` with the highest sequence number it already stored for this
//! buffer, which the gateway deletes at once. Then the gateway sends batches in
//! sequence order, each preceded by its manifest the first time a manifest
//! version appears on the connection, keeping at most `max_in_flight` batches
//! unacknowledged. Acks are cumulative.
//!
//! # Invariants
//! - A batch leaves the buffer only after an ack covers it.
//! - After any disconnect the next connection resumes at the first batch ingest
//!   has not stored; re-sent batches carry their original bytes and numbers,
//!   so ingest stores them once.
//! - Reconnects back off exponentially (0.5 s doubling to `max_backoff`) with
//!   full jitter, and reset after a connection that got an ack.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use guantong_proto::v1::gateway_message::Kind as Up;
use guantong_proto::v1::ingest_message::Kind as Down;
use guantong_proto::v1::uplink_client::UplinkClient;
use guantong_proto::v1::{BatchEnvelope, GatewayMessage, Hello, Manifest};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

use crate::buffer::Buffer;
use crate::config::UplinkConfig;

/// Largest message either side accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("invalid endpoint `{0}`")]
    Endpoint(String),
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("ingest refused the stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("ingest closed the stream")]
    Closed,
    #[error("unexpected message from ingest: {0}")]
    Protocol(String),
    #[error("buffer: {0}")]
    Buffer(#[from] crate::buffer::BufferError),
    #[error("buffer task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl UplinkError {
    /// Whether trying again later can succeed (a wrong token cannot).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, UplinkError::Endpoint(_))
            && !matches!(self, UplinkError::Status(s) if s.code() == tonic::Code::Unauthenticated || s.code() == tonic::Code::PermissionDenied)
    }
}

enum Event {
    Inbound(Option<Down>),
    Committed(u64),
}

pub struct Uplink {
    pub config: UplinkConfig,
    pub gateway_id: String,
    pub buffer: Arc<Buffer>,
    pub committed: watch::Receiver<u64>,
}

impl Uplink {
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let result = self.session(&cancel).await;
            if cancel.is_cancelled() {
                return;
            }
            match result {
                Ok(acked_any) => {
                    if acked_any {
                        backoff = Duration::from_millis(500);
                    }
                }
                Err(e) => {
                    if e.is_retryable() {
                        warn!(error = %e, "uplink disconnected; will retry");
                    } else {
                        warn!(error = %e, "uplink refused; check uplink.endpoint and uplink.token; will retry");
                    }
                }
            }
            let wait = backoff
                .mul_f64(rand::random::<f64>())
                .max(Duration::from_millis(50));
            debug!(?wait, "uplink reconnect backoff");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    /// One connection. Returns Ok(acked_any) when the stream ended cleanly.
    async fn session(&mut self, cancel: &CancellationToken) -> Result<bool, UplinkError> {
        let endpoint = Endpoint::from_shared(self.config.endpoint.clone())
            .map_err(|_| UplinkError::Endpoint(self.config.endpoint.clone()))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20));
        let channel = tokio::select! {
            _ = cancel.cancelled() => return Ok(false),
            c = endpoint.connect() => c?,
        };
        let mut client = UplinkClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);

        let window = self.config.max_in_flight.get() as usize;
        let (tx, rx) = mpsc::channel::<GatewayMessage>(window * 2 + 2);
        let stats = {
            let b = self.buffer.clone();
            tokio::task::spawn_blocking(move || b.stats()).await??
        };
        let hello = Hello {
            gateway_id: self.gateway_id.clone(),
            buffer_id: stats.buffer_id,
            software_version: env!("CARGO_PKG_VERSION").into(),
            first_unacked_seq: stats.first_seq,
        };
        tx.send(GatewayMessage {
            kind: Some(Up::Hello(hello)),
        })
        .await
        .map_err(|_| UplinkError::Closed)?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let md = request.metadata_mut();
        md.insert(
            "authorization",
            format!("Bearer {}", self.config.token)
                .parse()
                .map_err(|_| UplinkError::Protocol("token is not valid in a header".into()))?,
        );
        md.insert(
            "x-guantong-gateway",
            self.gateway_id
                .parse()
                .map_err(|_| UplinkError::Protocol("gateway id is not valid in a header".into()))?,
        );
        let mut inbound = client.stream(request).await?.into_inner();
        let welcome = match inbound.message().await?.and_then(|m| m.kind) {
            Some(Down::Welcome(w)) => w,
            other => {
                return Err(UplinkError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )));
            }
        };
        if welcome.stored_seq >= stats.first_seq {
            self.ack(welcome.stored_seq).await?;
        }
        info!(
            buffer_id = format_args!("{:016x}", stats.buffer_id),
            resume_at = welcome.stored_seq + 1,
            "uplink connected"
        );

        let mut next = stats.first_seq.max(welcome.stored_seq + 1);
        let mut in_flight: VecDeque<u64> = VecDeque::new();
        let mut manifests_sent: HashSet<u64> = HashSet::new();
        let mut acked_any = false;
        let mut committed = self.committed.clone();
        loop {
            let room = window.saturating_sub(in_flight.len());
            let event = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(acked_any),
                // Cancel-safe: `message()` keeps partial frames inside `inbound`.
                msg = inbound.message() => Event::Inbound(msg?.and_then(|m| m.kind)),
                // Cancel-safe: waiting on a watch channel consumes nothing.
                ready = committed.wait_for(|&c| c >= next), if room > 0 => match ready {
                    Ok(c) => Event::Committed(*c),
                    Err(_) => return Ok(acked_any), // writer gone: shutting down
                },
            };
            match event {
                Event::Inbound(Some(Down::Ack(ack))) => {
                    self.ack(ack.seq).await?;
                    acked_any = true;
                    while in_flight.front().is_some_and(|&s| s <= ack.seq) {
                        in_flight.pop_front();
                    }
                }
                Event::Inbound(Some(Down::Rejected(r))) => {
                    // Ingest will never accept it as sent; keeping it would stall the stream.
                    warn!(seq = r.seq, reason = %r.reason, "ingest rejected a batch; it is dropped");
                    self.ack(r.seq).await?;
                    while in_flight.front().is_some_and(|&s| s <= r.seq) {
                        in_flight.pop_front();
                    }
                }
                Event::Inbound(Some(other)) => {
                    return Err(UplinkError::Protocol(format!("unexpected {other:?}")));
                }
                Event::Inbound(None) => return Err(UplinkError::Closed),
                Event::Committed(last_committed) => {
                    let batches = {
                        let b = self.buffer.clone();
                        tokio::task::spawn_blocking(move || b.read_from(next, room)).await??
                    };
                    if batches.is_empty() {
                        warn!(
                            from = next,
                            to = last_committed,
                            "committed batches missing from the buffer; skipped"
                        );
                        next = last_committed + 1;
                    }
                    for b in batches {
                        if b.manifest_version != 0 && manifests_sent.insert(b.manifest_version) {
                            let manifest = self.manifest(b.manifest_version).await?;
                            tx.send(GatewayMessage {
                                kind: Some(Up::Manifest(manifest)),
                            })
                            .await
                            .map_err(|_| UplinkError::Closed)?;
                        }
                        next = b.last_seq + 1;
                        in_flight.push_back(b.last_seq);
                        let msg = GatewayMessage {
                            kind: Some(Up::Batch(BatchEnvelope { payload: b.payload })),
                        };
                        tx.send(msg).await.map_err(|_| UplinkError::Closed)?;
                    }
                }
            }
        }
    }

    async fn ack(&self, seq: u64) -> Result<(), UplinkError> {
        let b = self.buffer.clone();
        tokio::task::spawn_blocking(move || b.ack(seq)).await??;
        Ok(())
    }

    async fn manifest(&self, version: u64) -> Result<Manifest, UplinkError> {
        let b = self.buffer.clone();
        let bytes = tokio::task::spawn_blocking(move || b.manifest(version)).await??;
        let bytes = bytes.ok_or_else(|| {
            UplinkError::Protocol(format!("manifest {version:016x} missing from buffer"))
        })?;
        Manifest::decode(bytes.as_slice())
            .map_err(|e| UplinkError::Protocol(format!("stored manifest {version:016x}: {e}")))
    }
}
