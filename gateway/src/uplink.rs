//! The uplink: streams buffered batches to ingest and deletes what it acks.
//!
//! # Protocol (see proto/guantong/v1/uplink.proto)
//! One bidirectional gRPC stream per connection, compressed with zstd (or
//! gzip, or none: `uplink.compression`). The gateway sends `Hello` (gateway
//! id, buffer id, first unacked sequence number); ingest answers `Welcome`
//! with the highest sequence number it already stored for this buffer, which
//! the gateway deletes at once. Then the gateway sends batches, each preceded
//! by its manifest the first time a manifest version appears on the
//! connection. Ingest answers one `Ack` per stored batch, naming the batch
//! and the cumulative stored mark. Beside them, a `Health` report (the
//! status page's view, for ingest's fleet view) right after `Welcome` and
//! every `HEALTH_EVERY`; it never waits behind batches.
//!
//! # Live data first
//! At connect, everything committed so far is *backlog*; batches committed
//! after that are *live*. Live batches are sent as soon as they are committed;
//! the backlog drains oldest first with the rest of the window, which keeps
//! `LIVE_RESERVE` slots free for live data. Backlog batches are marked
//! `backfill` on the wire, so ingest can tell delayed data from live data.
//!
//! # Invariants
//! - A batch leaves the buffer only after an ack covers it. Acked batches
//!   are deleted together, at most `ACK_DELETE_DELAY` after the first ack of
//!   a group and before a session ends: one fsynced delete for all the acks
//!   that arrive meanwhile instead of one per ack, which on a slow card (SD,
//!   eMMC) is the fsync budget the writer's commits need. An acked batch not
//!   yet deleted at a crash is sent again and stored once by ingest.
//! - After any disconnect the next connection resumes at the first batch ingest
//!   has not stored; re-sent batches carry their original bytes and numbers,
//!   so ingest stores them once.
//! - Reconnects back off exponentially (0.5 s doubling to `max_backoff`) with
//!   full jitter, and reset after a connection that got an ack.
//! - A session outlives the writer: at shutdown the final flush is still
//!   sent and acknowledged, until `lib::run`'s grace cancels the uplink.
//! - A dead link is noticed by HTTP/2 keepalive within `keepalive_interval` +
//!   `keepalive_timeout` even when no RST arrives.
//!
//! # Failover
//! `uplink.endpoints` are tried in order, wrapping around: a failed connect
//! or a stream that ends moves the next connection to the next endpoint,
//! after the same backoff as any reconnect (`Failover`). The backoff is
//! shared, so a round of failing endpoints grows it and never spins; the
//! endpoint that works is kept until its stream ends. One endpoint (a
//! load-balanced address) reconnects to itself exactly as before. Batches
//! resume at whatever the new endpoint's ingest has stored, so failing over
//! between ingests that share one store delivers each batch once.
//!
//! # Transport security
//! An `https://` endpoint is TLS (rustls, ring): ingest's certificate is
//! checked against `ca_file` or the system roots; with `cert_file` and
//! `key_file` the gateway presents its client certificate (mutual TLS). The
//! files are read at every connection, so renewed certificates are picked up
//! without a restart. `http://` needs `plaintext = true` (config check).
//! Every endpoint uses the same settings (and the same token).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use guantong_proto::v1::gateway_message::Kind as Up;
use guantong_proto::v1::ingest_message::Kind as Down;
use guantong_proto::v1::uplink_client::UplinkClient;
use guantong_proto::v1::{BatchEnvelope, GatewayMessage, Hello, Manifest, SignatureAlgorithm};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tracing::{debug, info, warn};

use crate::buffer::{Buffer, StoredBatch};
use crate::config::{Compression, UplinkConfig};
use crate::status::Status;

/// Largest message either side accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("invalid endpoint `{0}`")]
    Endpoint(String),
    #[error("cannot connect: {}", chain(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("TLS settings: {0}")]
    Tls(String),
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
        !matches!(self, UplinkError::Endpoint(_) | UplinkError::Tls(_))
            && !matches!(self, UplinkError::Status(s) if s.code() == tonic::Code::Unauthenticated || s.code() == tonic::Code::PermissionDenied)
    }
}

/// An error and its sources, `a: b: c` (tonic's own message is only
/// "transport error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// The TLS settings of `config` (an `https://` endpoint), files read now.
pub fn tls_config(config: &UplinkConfig) -> Result<ClientTlsConfig, UplinkError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| UplinkError::Tls(format!("{}: {e}", path.display())))
    };
    let mut tls = ClientTlsConfig::new();
    tls = match &config.ca_file {
        Some(path) => tls.ca_certificate(Certificate::from_pem(read(path)?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(name) = &config.server_name {
        tls = tls.domain_name(name.clone());
    }
    Ok(tls)
}

enum Event {
    Inbound(Option<Down>),
    Committed,
    DeleteDue,
    Health,
    /// A new result of a cloud configuration (None: no more will come).
    ConfigResult(Option<guantong_proto::v1::ConfigResult>),
}

/// Health reports on the stream (see `Status::health`): one after Welcome,
/// then one every `every`. None: no reports (benchmarks, tests of others).
#[derive(Debug, Clone, Copy)]
pub struct HealthReports {
    pub every: Duration,
    /// The buffer's bound, for its fill.
    pub max_bytes: u64,
}

/// How often a gateway reports its health to ingest.
pub const HEALTH_EVERY: Duration = Duration::from_secs(10);

/// How long acked batches may wait to be deleted together.
const ACK_DELETE_DELAY: Duration = Duration::from_millis(200);
/// Acked ranges held before they are deleted at once, whatever the delay.
const MAX_ACKED_RANGES: usize = 256;

/// Acked batches not yet deleted: everything up to `cumulative` and the
/// batches in `ranges`; `due` is when they must be. `any`: an ack arrived
/// in this session (deleting does not clear it).
#[derive(Default)]
struct Acked {
    cumulative: u64,
    ranges: Vec<(u64, u64)>,
    due: Option<tokio::time::Instant>,
    any: bool,
}

impl Acked {
    /// Records an ack of `first..=last` with ingest's cumulative mark; the
    /// window slot is free at once.
    fn add(&mut self, cumulative: u64, first: u64, last: u64, in_flight: &mut InFlight) {
        in_flight.remove(&first);
        in_flight.retain(|_, (l, _)| *l > cumulative);
        self.cumulative = self.cumulative.max(cumulative);
        if last > self.cumulative {
            self.ranges.push((first.max(self.cumulative + 1), last));
        }
        self.due
            .get_or_insert_with(|| tokio::time::Instant::now() + ACK_DELETE_DELAY);
    }

    /// The ranges to delete, if any, leaving `self` empty.
    fn take(&mut self) -> Option<Vec<(u64, u64)>> {
        self.due.take()?;
        let cumulative = std::mem::take(&mut self.cumulative);
        let mut ranges: Vec<(u64, u64)> = std::mem::take(&mut self.ranges)
            .into_iter()
            .filter(|&(_, last)| last > cumulative)
            .collect();
        ranges.push((1, cumulative));
        Some(ranges)
    }
}

/// The first reconnect backoff, and the one after a session that got an ack.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// Which endpoint the next connection goes to, and the backoff before it.
///
/// Endpoints are tried in order, wrapping around: every session that ends,
/// whether its connect failed or its stream closed, moves to the next. One
/// backoff serves them all, doubling after every session, so a round of
/// failures grows it as the same number of failures on one endpoint would.
/// With one endpoint this is the plain reconnect backoff.
struct Failover {
    endpoints: Vec<String>,
    current: usize,
    backoff: Duration,
    max_backoff: Duration,
}

impl Failover {
    /// None without endpoints.
    fn new(endpoints: Vec<String>, max_backoff: Duration) -> Option<Failover> {
        (!endpoints.is_empty()).then_some(Failover {
            endpoints,
            current: 0,
            backoff: FIRST_BACKOFF,
            max_backoff,
        })
    }

    fn current(&self) -> &str {
        &self.endpoints[self.current]
    }

    /// The session on `current()` ended (`acked_any`: ingest acked a batch
    /// on it). Moves to the next endpoint; returns the backoff to wait
    /// before connecting to it, which the caller jitters.
    fn ended(&mut self, acked_any: bool) -> Duration {
        if acked_any {
            self.backoff = FIRST_BACKOFF;
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(self.max_backoff);
        self.current = (self.current + 1) % self.endpoints.len();
        wait
    }
}

pub struct Uplink {
    pub config: UplinkConfig,
    pub gateway_id: String,
    pub buffer: Arc<Buffer>,
    pub committed: watch::Receiver<u64>,
    /// Told of connection state, sends and acks.
    pub status: Arc<Status>,
    pub health: Option<HealthReports>,
    /// Cloud configurations: offers in, results out (None: not taken).
    pub remote: Option<crate::remote::Link>,
}

/// Batches sent and not yet acknowledged: first seq -> (last seq, backlog?).
type InFlight = BTreeMap<u64, (u64, bool)>;

impl Uplink {
    pub async fn run(self, cancel: CancellationToken) {
        let Some(mut failover) =
            Failover::new(self.config.endpoints.clone(), self.config.max_backoff)
        else {
            warn!("uplink has no endpoint; nothing is delivered");
            return;
        };
        let mut compression = self.config.compression;
        loop {
            let endpoint = failover.current().to_string();
            let (acked_any, result) = self.session(&endpoint, &cancel, compression).await;
            if cancel.is_cancelled() {
                return;
            }
            match result {
                Ok(()) => {}
                Err(UplinkError::Status(s))
                    if s.code() == tonic::Code::Unimplemented
                        && compression != Compression::None =>
                {
                    // Older or differently built ingest: negotiate down.
                    warn!(?compression, status = %s, "ingest does not take this compression; sending uncompressed");
                    compression = Compression::None;
                    continue;
                }
                Err(e) => {
                    self.status.uplink_backoff(e.to_string());
                    if e.is_retryable() {
                        warn!(%endpoint, error = %e, "uplink disconnected; will retry");
                    } else {
                        warn!(%endpoint, error = %e, "uplink refused; check this endpoint and uplink.token; will retry");
                    }
                }
            }
            let wait = failover
                .ended(acked_any)
                .mul_f64(rand::random::<f64>())
                .max(Duration::from_millis(50));
            debug!(?wait, next = failover.current(), "uplink reconnect backoff");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn connect(
        &self,
        url: &str,
        compression: Compression,
    ) -> Result<UplinkClient<tonic::transport::Channel>, UplinkError> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|_| UplinkError::Endpoint(url.to_string()))?;
        if url.starts_with("https://") {
            endpoint = endpoint
                .tls_config(tls_config(&self.config)?)
                .map_err(|e| UplinkError::Tls(chain(&e)))?;
        }
        let endpoint = endpoint
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.config.keepalive_interval)
            .keep_alive_timeout(self.config.keepalive_timeout)
            .keep_alive_while_idle(true)
            // Large fixed windows: flow control must not cap a long, fat link
            // (300 ms round trip) below what the batch window allows.
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .initial_connection_window_size(Some(2 * STREAM_WINDOW));
        let channel = endpoint.connect().await?;
        let mut client = UplinkClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .accept_compressed(CompressionEncoding::Zstd)
            .accept_compressed(CompressionEncoding::Gzip);
        client = match compression {
            Compression::Zstd => client.send_compressed(CompressionEncoding::Zstd),
            Compression::Gzip => client.send_compressed(CompressionEncoding::Gzip),
            Compression::None => client,
        };
        Ok(client)
    }

    /// One connection to `endpoint`, until it fails (Ok only when
    /// cancelled). Returns whether ingest acked anything on it, however it
    /// ended. Whatever was acked is deleted before it returns.
    async fn session(
        &self,
        endpoint: &str,
        cancel: &CancellationToken,
        compression: Compression,
    ) -> (bool, Result<(), UplinkError>) {
        let mut acked = Acked::default();
        let result = self.stream(endpoint, cancel, compression, &mut acked).await;
        let deleted = self.delete_acked(&mut acked).await;
        (acked.any, result.and(deleted))
    }

    async fn stream(
        &self,
        endpoint: &str,
        cancel: &CancellationToken,
        compression: Compression,
        acked: &mut Acked,
    ) -> Result<(), UplinkError> {
        self.status.uplink_connecting(endpoint);
        let mut client = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            c = self.connect(endpoint, compression) => c?,
        };
        let window = self.config.max_in_flight.get() as usize;
        let backlog_window = window.saturating_sub(LIVE_RESERVE.min(window / 2)).max(1);
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
            config_version: self.remote.as_ref().map_or(0, |r| r.source.version()),
            public_key: self.buffer.public_key().unwrap_or_default(),
            key_algorithm: if self.buffer.public_key().is_some() {
                self.buffer.algorithm().wire() as i32
            } else {
                SignatureAlgorithm::None as i32
            },
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
        let asked_ms = crate::quality::now_ms();
        let mut inbound = client.stream(request).await?.into_inner();
        let welcome = match inbound.message().await?.and_then(|m| m.kind) {
            Some(Down::Welcome(w)) => w,
            other => {
                return Err(UplinkError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )));
            }
        };
        self.status
            .uplink_connected(welcome.server_time_ms, asked_ms, crate::quality::now_ms());
        if welcome.stored_seq >= stats.first_seq {
            self.delete(1, welcome.stored_seq).await?;
        }
        let mut committed = self.committed.clone();
        // Everything committed before this connection is backlog.
        let boundary = *committed.borrow_and_update();
        let mut backlog_next = stats.first_seq.max(welcome.stored_seq + 1);
        let mut live_next = boundary + 1;
        info!(
            %endpoint,
            buffer_id = format_args!("{:016x}", stats.buffer_id),
            resume_at = backlog_next,
            backlog_batches = (boundary + 1).saturating_sub(backlog_next),
            "uplink connected"
        );

        let mut health_tick = self.health.map(|h| {
            let mut tick = tokio::time::interval(h.every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        // Results from before this connection are stale: ingest offers again
        // what the gateway does not run.
        let mut results = self.remote.as_ref().map(|r| {
            let mut results = r.results.clone();
            results.borrow_and_update();
            results
        });
        let mut in_flight = InFlight::new();
        let mut manifests_sent: HashSet<u64> = HashSet::new();
        // The writer stops last at shutdown: its final flush must still be
        // delivered and acknowledged within the grace, so the session goes on.
        let mut writer_gone = false;
        loop {
            // Fill the window: live first, then backlog.
            let last_committed = *committed.borrow_and_update();
            let room = window.saturating_sub(in_flight.len());
            if room > 0 && last_committed >= live_next {
                let batches = self.read(live_next, room, u64::MAX).await?;
                if batches.is_empty() {
                    warn!(
                        from = live_next,
                        to = last_committed,
                        "committed batches missing from the buffer; skipped"
                    );
                    live_next = last_committed + 1;
                }
                for b in batches {
                    live_next = b.last_seq + 1;
                    self.send(&tx, &mut manifests_sent, &mut in_flight, b, false)
                        .await?;
                }
            }
            let backlog_in_flight = in_flight.values().filter(|(_, backlog)| *backlog).count();
            let room = window
                .saturating_sub(in_flight.len())
                .min(backlog_window.saturating_sub(backlog_in_flight));
            if room > 0 && backlog_next <= boundary {
                let batches = self.read(backlog_next, room, boundary).await?;
                if batches.is_empty() {
                    backlog_next = boundary + 1;
                }
                for b in batches {
                    backlog_next = b.last_seq + 1;
                    self.send(&tx, &mut manifests_sent, &mut in_flight, b, true)
                        .await?;
                }
            }

            let delete_due = acked.due;
            let event = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(delete_due.unwrap_or_else(tokio::time::Instant::now)),
                    if delete_due.is_some() => Event::DeleteDue,
                // The first tick is at once: a report right after Welcome.
                _ = async {
                    match health_tick.as_mut() {
                        Some(tick) => tick.tick().await,
                        None => std::future::pending().await,
                    }
                } => Event::Health,
                // Cancel-safe: waiting on a watch channel consumes nothing.
                result = async {
                    match results.as_mut() {
                        Some(r) => r.changed().await.ok().and_then(|_| r.borrow_and_update().clone()),
                        None => std::future::pending().await,
                    }
                } => Event::ConfigResult(result),
                // Cancel-safe: `message()` keeps partial frames inside `inbound`.
                msg = inbound.message() => Event::Inbound(msg?.and_then(|m| m.kind)),
                // Cancel-safe: waiting on a watch channel consumes nothing.
                changed = committed.changed(), if !writer_gone => {
                    writer_gone = changed.is_err();
                    Event::Committed
                }
            };
            match event {
                Event::Committed => {}
                Event::DeleteDue => self.delete_acked(acked).await?,
                Event::Health => self.report_health(&tx).await,
                Event::ConfigResult(None) => results = None,
                Event::ConfigResult(Some(result)) => {
                    tx.send(GatewayMessage {
                        kind: Some(Up::ConfigResult(result)),
                    })
                    .await
                    .map_err(|_| UplinkError::Closed)?;
                }
                Event::Inbound(Some(Down::Config(offer))) => match &self.remote {
                    Some(remote) => {
                        if remote.offers.try_send(offer).is_err() {
                            warn!(
                                "cloud configuration offer dropped: offers are queued already; ingest offers it again at the next connection"
                            );
                        }
                    }
                    None => warn!(
                        version = offer.version,
                        "cloud configuration offered, but this gateway does not take any"
                    ),
                },
                Event::Inbound(Some(Down::Ack(ack))) => {
                    acked.any = true;
                    self.status.batch_acked(ack.batch_seq);
                    let (first, last) = (ack.batch_seq, ack.batch_last_seq.max(ack.batch_seq));
                    acked.add(ack.seq, first, last, &mut in_flight);
                    if acked.ranges.len() >= MAX_ACKED_RANGES {
                        self.delete_acked(acked).await?;
                    }
                }
                Event::Inbound(Some(Down::Rejected(r))) => {
                    // Ingest will never accept it as sent and recorded it as a
                    // loss; keeping it would resend it forever.
                    warn!(seq = r.batch_seq, reason = %r.reason, "ingest rejected a batch; it is dropped");
                    let first = if r.batch_seq == 0 { r.seq } else { r.batch_seq };
                    acked.add(0, first, r.seq, &mut in_flight);
                }
                Event::Inbound(Some(other)) => {
                    return Err(UplinkError::Protocol(format!("unexpected {other:?}")));
                }
                Event::Inbound(None) => return Err(UplinkError::Closed),
            }
        }
    }

    /// Sends a health report unless the stream's queue is full: a report
    /// never waits behind batches, the next one follows anyway.
    async fn report_health(&self, tx: &mpsc::Sender<GatewayMessage>) {
        let Some(h) = self.health else { return };
        let (status, buffer) = (self.status.clone(), self.buffer.clone());
        let Ok(mut health) =
            tokio::task::spawn_blocking(move || status.health(&buffer, h.max_bytes)).await
        else {
            return;
        };
        health.config_version = self.remote.as_ref().map_or(0, |r| r.source.version());
        if tx
            .try_send(GatewayMessage {
                kind: Some(Up::Health(health)),
            })
            .is_err()
        {
            debug!("health report skipped: the stream's queue is full");
        }
    }

    /// Up to `max` batches from `from` on, none starting after `until`.
    async fn read(
        &self,
        from: u64,
        max: usize,
        until: u64,
    ) -> Result<Vec<StoredBatch>, UplinkError> {
        let b = self.buffer.clone();
        let mut batches = tokio::task::spawn_blocking(move || b.read_from(from, max)).await??;
        batches.retain(|b| b.seq <= until);
        Ok(batches)
    }

    async fn send(
        &self,
        tx: &mpsc::Sender<GatewayMessage>,
        manifests_sent: &mut HashSet<u64>,
        in_flight: &mut InFlight,
        b: StoredBatch,
        backfill: bool,
    ) -> Result<(), UplinkError> {
        if b.manifest_version != 0 && manifests_sent.insert(b.manifest_version) {
            let manifest = self.manifest(b.manifest_version).await?;
            tx.send(GatewayMessage {
                kind: Some(Up::Manifest(manifest)),
            })
            .await
            .map_err(|_| UplinkError::Closed)?;
        }
        in_flight.insert(b.seq, (b.last_seq, backfill));
        self.status.batch_sent(b.seq);
        let msg = GatewayMessage {
            kind: Some(Up::Batch(BatchEnvelope {
                payload: b.payload,
                backfill,
                algorithm: if b.signature == [0; 64] {
                    SignatureAlgorithm::None as i32
                } else {
                    b.algorithm.wire() as i32
                },
                prev_hash: b.prev_hash.to_vec(),
                signature: b.signature.to_vec(),
            })),
        };
        tx.send(msg).await.map_err(|_| UplinkError::Closed)
    }

    /// Deletes what `acked` holds, in one transaction.
    async fn delete_acked(&self, acked: &mut Acked) -> Result<(), UplinkError> {
        let Some(ranges) = acked.take() else {
            return Ok(());
        };
        let b = self.buffer.clone();
        tokio::task::spawn_blocking(move || b.ack_ranges(&ranges)).await??;
        Ok(())
    }

    async fn delete(&self, first: u64, last: u64) -> Result<(), UplinkError> {
        let b = self.buffer.clone();
        tokio::task::spawn_blocking(move || b.ack_range(first, last)).await??;
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

/// HTTP/2 stream flow-control window, bytes.
pub const STREAM_WINDOW: u32 = 16 << 20;

/// Window slots the backlog leaves free for live batches.
const LIVE_RESERVE: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("https://ingest-{i}:7600")).collect()
    }

    #[test]
    fn endpoints_are_tried_in_order_wrapping_around() {
        let mut f = Failover::new(urls(3), Duration::from_secs(30)).expect("endpoints");
        let mut tried = vec![f.current().to_string()];
        for _ in 0..4 {
            f.ended(false);
            tried.push(f.current().to_string());
        }
        let at = |i: usize| format!("https://ingest-{i}:7600");
        assert_eq!(tried, [at(0), at(1), at(2), at(0), at(1)]);
        assert!(Failover::new(Vec::new(), Duration::from_secs(1)).is_none());
    }

    /// Failing over never spins: the backoff doubles across endpoints up to
    /// `max_backoff`, and starts again after a session that got an ack.
    #[test]
    fn one_backoff_grows_across_endpoints_and_resets_after_an_ack() {
        let ms = Duration::from_millis;
        for n in [1, 2] {
            let mut f = Failover::new(urls(n), ms(3000)).expect("endpoints");
            let waits: Vec<Duration> = (0..5).map(|_| f.ended(false)).collect();
            assert_eq!(waits, [ms(500), ms(1000), ms(2000), ms(3000), ms(3000)]);
            assert_eq!(f.ended(true), ms(500), "{n} endpoints");
            assert_eq!(f.ended(false), ms(1000));
            // One endpoint: always the same one.
            if n == 1 {
                assert_eq!(f.current(), "https://ingest-0:7600");
            }
        }
    }
}
