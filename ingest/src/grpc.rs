//! The gateway-facing gRPC service (`guantong.v1.Uplink/Stream`).
//!
//! Per stream: authenticate from metadata (unknown gateway or wrong token:
//! UNAUTHENTICATED), read `Hello` (its gateway id must be the authenticated
//! one: PERMISSION_DENIED otherwise), answer `Welcome` with the stored seq, then
//! take manifests and batches in order. Batches are validated (buffer id, known
//! manifest, tag indices) and queued to the store in arrival order without
//! waiting for each commit; a second task awaits the commits in the same order
//! and sends one cumulative `Ack` per batch. An ack is sent only after the
//! store says the batch is durable. A batch that fails validation is not
//! stored: it is recorded as a loss and answered with `BatchRejected`.
//!
//! Guards ([`Guards`]): with mutual TLS the client certificate must be
//! unrevoked and issued to the authenticated gateway; a gateway holds at most
//! `max_streams_per_gateway` streams; each batch is charged to its
//! gateway's quota and the stream's reader waits while the quota is spent
//! (see [`crate::limits`]); points and manifests are checked by
//! [`crate::validate`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use guantong_proto::v1::gateway_message::Kind as Up;
use guantong_proto::v1::ingest_message::Kind as Down;
use guantong_proto::v1::uplink_server::Uplink;
use guantong_proto::v1::{
    Ack, Batch, BatchRejected, ConfigOffer, ConfigResult, GatewayMessage, Hello, IngestMessage,
    Welcome,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::limits::{Limits, Quotas, StreamSlot};
use crate::metrics;
use crate::store::{AppendBatch, AppendOutcome, Appended, Link, ManifestMap, Store};
use crate::tls::ClientAuth;
use crate::validate::{self, ValidationLimits};
use guantong_proto::chain::{self, Algorithm, PublicKey};
use guantong_proto::v1::SignatureAlgorithm;

/// Batches queued to the store but not yet acked, per stream.
const PIPELINE_DEPTH: usize = 32;

/// Which gateways are connected now, for the API; and the news that a
/// gateway's cloud configuration was requested, for its streams.
pub struct Connections {
    inner: Mutex<HashMap<String, ConnectionInfo>>,
    config_requested: tokio::sync::broadcast::Sender<String>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            inner: Mutex::default(),
            config_requested: tokio::sync::broadcast::channel(256).0,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ConnectionInfo {
    pub connected: bool,
    pub peer: String,
    pub since_ms: i64,
    pub last_message_ms: i64,
    pub buffer_id: String,
    pub batches: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Streams open now (a gateway may hold more than one).
    pub streams: u32,
    /// From `Hello`.
    pub software_version: String,
    /// When a batch of this gateway was last stored (not a duplicate).
    pub last_batch_ms: Option<i64>,
    /// The latest health report (see [`crate::fleet`]).
    pub health: Option<crate::fleet::HealthView>,
}

impl Connections {
    /// A version of `gateway`'s cloud configuration was requested: its
    /// streams offer it.
    pub fn notify_config(&self, gateway: &str) {
        let _ = self.config_requested.send(gateway.to_string());
    }

    pub fn snapshot(&self) -> HashMap<String, ConnectionInfo> {
        self.inner.lock().map(|m| m.clone()).unwrap_or_default()
    }
    fn update(&self, gateway: &str, f: impl FnOnce(&mut ConnectionInfo)) {
        if let Ok(mut m) = self.inner.lock() {
            let e = m
                .entry(gateway.to_string())
                .or_insert_with(|| ConnectionInfo {
                    connected: false,
                    peer: String::new(),
                    since_ms: 0,
                    last_message_ms: 0,
                    buffer_id: String::new(),
                    batches: 0,
                    duplicates: 0,
                    rejected: 0,
                    streams: 0,
                    software_version: String::new(),
                    last_batch_ms: None,
                    health: None,
                });
            f(e);
        }
    }
}

pub struct UplinkService<S> {
    store: Arc<S>,
    connections: Arc<Connections>,
    trust_on_first_use: bool,
    guards: Arc<Guards>,
}

/// What every stream is held to beyond its token.
pub struct Guards {
    pub quotas: Arc<Quotas>,
    pub validation: ValidationLimits,
    /// Some with mutual TLS.
    pub client_auth: Option<ClientAuth>,
}

impl Default for Guards {
    fn default() -> Self {
        Guards {
            quotas: Quotas::new(Limits::default()),
            validation: ValidationLimits::default(),
            client_auth: None,
        }
    }
}

impl<S: Store> UplinkService<S> {
    pub fn new(store: Arc<S>, connections: Arc<Connections>) -> Self {
        UplinkService {
            store,
            connections,
            trust_on_first_use: false,
            guards: Arc::new(Guards::default()),
        }
    }

    pub fn guards(mut self, guards: Arc<Guards>) -> Self {
        self.guards = guards;
        self
    }

    /// Binds the key a gateway presents when none was registered for it
    /// (recorded in its chain report). Off by default.
    pub fn trust_on_first_use(mut self, enabled: bool) -> Self {
        self.trust_on_first_use = enabled;
        self
    }

    /// The key this stream's chain is verified with, handling first use and
    /// key changes. A key of another algorithm is a key change like any
    /// other.
    async fn signing_key(
        &self,
        gateway: &str,
        buffer_id: u64,
        hello: &Hello,
    ) -> Result<Option<PublicKey>, Status> {
        let unavailable = |e: crate::store::StoreError| Status::unavailable(e.to_string());
        let presented = match Algorithm::from_wire(hello.key_algorithm) {
            _ if hello.public_key.is_empty() => None,
            Some(a) => Some(
                PublicKey::new(a, hello.public_key.clone())
                    .map_err(|e| Status::invalid_argument(format!("Hello.public_key: {e}")))?,
            ),
            None => {
                return Err(Status::invalid_argument(format!(
                    "Hello.key_algorithm {} is not a signature algorithm this ingest knows",
                    hello.key_algorithm
                )));
            }
        };
        let bound = self.store.gateway_key(gateway).await.map_err(unavailable)?;
        match (bound, presented) {
            (Some((key, _)), Some(presented)) if key != presented => {
                let reason = format!(
                    "key change refused: the gateway presents key {} but {} is bound",
                    presented.fingerprint(),
                    key.fingerprint()
                );
                self.store
                    .record_break(gateway, buffer_id, 0, reason.clone())
                    .await
                    .map_err(unavailable)?;
                Err(Status::permission_denied(format!(
                    "{reason}; re-register the gateway with its new key"
                )))
            }
            (Some((key, _)), _) => Ok(Some(key)),
            (None, Some(presented)) if self.trust_on_first_use => {
                self.store
                    .bind_key_on_first_use(gateway, presented.clone())
                    .await
                    .map_err(unavailable)?;
                let note = format!(
                    "key {} bound by trust on first use",
                    presented.fingerprint()
                );
                self.store
                    .record_break(gateway, buffer_id, 0, note)
                    .await
                    .map_err(unavailable)?;
                Ok(Some(presented))
            }
            (None, _) => Ok(None),
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

type Outbound = Pin<Box<dyn Stream<Item = Result<IngestMessage, Status>> + Send>>;

fn down(kind: Down) -> Result<IngestMessage, Status> {
    Ok(IngestMessage { kind: Some(kind) })
}

#[tonic::async_trait]
impl<S: Store> Uplink for UplinkService<S> {
    type StreamStream = Outbound;

    async fn stream(
        &self,
        request: Request<Streaming<GatewayMessage>>,
    ) -> Result<Response<Outbound>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let md = request.metadata();
        let gateway = md
            .get("x-guantong-gateway")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| Status::unauthenticated("missing x-guantong-gateway metadata"))?;
        let token = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string)
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        let ok = self
            .store
            .authenticate(&gateway, &token)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if !ok {
            warn!(%gateway, %peer, "refused: unknown gateway or wrong token");
            return Err(Status::unauthenticated("unknown gateway or wrong token"));
        }
        if let Some(auth) = &self.guards.client_auth {
            let certs = request.peer_certs();
            auth.check(certs.as_deref().map(Vec::as_slice), &gateway)
                .await
                .inspect_err(
                    |status| warn!(%gateway, %peer, %status, "refused: client certificate"),
                )?;
        }
        let slot =
            self.guards.quotas.open_stream(&gateway).inspect_err(
                |status| warn!(%gateway, %peer, %status, "refused: too many streams"),
            )?;
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await?.and_then(|m| m.kind) {
            Some(Up::Hello(h)) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if hello.gateway_id != gateway {
            return Err(Status::permission_denied(format!(
                "authenticated as `{gateway}` but Hello names `{}`",
                hello.gateway_id
            )));
        }
        let stored = self
            .store
            .open_stream(&gateway, hello.buffer_id, hello.first_unacked_seq)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        info!(%gateway, %peer, buffer_id = format_args!("{:016x}", hello.buffer_id), stored_seq = stored, version = %hello.software_version, "gateway connected");
        self.connections.update(&gateway, |c| {
            if !c.connected {
                c.since_ms = now_ms();
            }
            c.connected = true;
            c.streams += 1;
            c.software_version = hello.software_version.clone();
            c.peer = peer.clone();
            c.last_message_ms = now_ms();
            c.buffer_id = format!("{:016x}", hello.buffer_id);
        });

        let (tx, rx) = mpsc::channel::<Result<IngestMessage, Status>>(PIPELINE_DEPTH + 4);
        let _ = tx
            .send(down(Down::Welcome(Welcome {
                stored_seq: stored,
                server_time_ms: now_ms(),
            })))
            .await;
        let key = self.signing_key(&gateway, hello.buffer_id, &hello).await?;
        let offers = tokio::spawn(offer_configs(
            self.store.clone(),
            gateway.clone(),
            hello.config_version,
            tx.clone(),
            self.connections.config_requested.subscribe(),
        ));
        let session = Session {
            store: self.store.clone(),
            connections: self.connections.clone(),
            gateway,
            buffer_id: hello.buffer_id,
            manifests: HashMap::new(),
            manifest_hashes: HashMap::new(),
            key,
            guards: self.guards.clone(),
            _slot: slot,
            _open: metrics::StreamOpen::new(),
            _offers: AbortOnDrop(offers),
        };
        tokio::spawn(session.run(inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session<S> {
    store: Arc<S>,
    connections: Arc<Connections>,
    gateway: String,
    buffer_id: u64,
    manifests: HashMap<u64, Arc<ManifestMap>>,
    /// `chain::manifest_hash` of each manifest received on this stream, to
    /// check manifest links against.
    manifest_hashes: HashMap<u64, chain::Hash>,
    /// Bound signing key; None: the chain cannot be verified.
    key: Option<PublicKey>,
    guards: Arc<Guards>,
    /// This stream's place in its gateway's stream quota.
    _slot: StreamSlot,
    _open: metrics::StreamOpen,
    /// The task offering cloud configurations on this stream.
    _offers: AbortOnDrop,
}

/// Ends a task when its owner ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Offers `gateway` the cloud configuration requested for it whenever it
/// runs another (see `crate::gateway_config`): at once, then at each request.
async fn offer_configs<S: Store>(
    store: Arc<S>,
    gateway: String,
    running: u64,
    tx: mpsc::Sender<Result<IngestMessage, Status>>,
    mut requested: tokio::sync::broadcast::Receiver<String>,
) {
    let now = now_ms();
    let state = match store
        .update_gateway_config_state(&gateway, Box::new(move |s| s.ran(running, now)))
        .await
    {
        Ok(state) => state,
        Err(e) => {
            warn!(%gateway, error = %e, "cannot read the gateway's configuration state");
            return;
        }
    };
    let mut next = state.to_offer(running);
    loop {
        if let Some(version) = next {
            let text = match store.gateway_configs(&gateway).await {
                Ok(all) => all
                    .into_iter()
                    .find(|c| c.version == version)
                    .map(|c| c.text),
                Err(e) => {
                    warn!(%gateway, error = %e, "cannot read the gateway's configurations");
                    None
                }
            };
            if let Some(toml) = text {
                info!(%gateway, version, "offering a cloud configuration");
                if tx
                    .send(down(Down::Config(ConfigOffer { version, toml })))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        // Wait for a request for this gateway (or a missed one: read again).
        loop {
            match requested.recv().await {
                Ok(g) if g == gateway => break,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
        next = match store.gateway_config_states().await {
            Ok(states) => states.get(&gateway).and_then(|s| s.to_offer(s.applied)),
            Err(_) => None,
        };
    }
}

/// What to answer for one batch once the store has it.
struct Reply {
    buffer_id: u64,
    first: u64,
    last: u64,
    rejected: Option<String>,
}

impl Reply {
    fn message(self, stored_seq: u64) -> Down {
        match self.rejected {
            Some(reason) => Down::Rejected(BatchRejected {
                buffer_id: self.buffer_id,
                seq: self.last,
                reason,
                batch_seq: self.first,
            }),
            None => Down::Ack(Ack {
                buffer_id: self.buffer_id,
                seq: stored_seq,
                batch_seq: self.first,
                batch_last_seq: self.last,
            }),
        }
    }
}

type PendingAppend =
    Pin<Box<dyn std::future::Future<Output = crate::store::Result<Appended>> + Send>>;

impl<S: Store> Session<S> {
    async fn run(
        mut self,
        mut inbound: Streaming<GatewayMessage>,
        tx: mpsc::Sender<Result<IngestMessage, Status>>,
    ) {
        let (pending_tx, mut pending_rx) = mpsc::channel::<(Reply, PendingAppend)>(PIPELINE_DEPTH);
        let acker = {
            let tx = tx.clone();
            let connections = self.connections.clone();
            let gateway = self.gateway.clone();
            tokio::spawn(async move {
                while let Some((reply, pending)) = pending_rx.recv().await {
                    match pending.await {
                        Ok(appended) => {
                            connections.update(&gateway, |c| match appended.outcome {
                                AppendOutcome::Stored => {
                                    c.batches += 1;
                                    c.last_batch_ms = Some(now_ms());
                                }
                                AppendOutcome::Duplicate => c.duplicates += 1,
                            });
                            if tx
                                .send(down(reply.message(appended.stored_seq)))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!(%gateway, error = %e, "store failed; closing stream so the gateway resends");
                            let _ = tx
                                .send(Err(Status::unavailable(format!("storage: {e}"))))
                                .await;
                            return;
                        }
                    }
                }
            })
        };
        let result = self.read_loop(&mut inbound, &tx, &pending_tx).await;
        drop(pending_tx);
        if let Err(status) = result {
            warn!(gateway = %self.gateway, %status, "stream ended with error");
            let _ = tx.send(Err(status)).await;
        }
        let _ = acker.await;
        self.connections.update(&self.gateway, |c| {
            c.streams = c.streams.saturating_sub(1);
            if c.streams == 0 {
                c.connected = false;
                c.since_ms = now_ms();
            }
        });
        info!(gateway = %self.gateway, "gateway disconnected");
    }

    /// The gateway's answer to a cloud configuration: kept as its state.
    async fn config_result(&self, result: ConfigResult) -> Result<(), Status> {
        if result.applied {
            info!(gateway = %self.gateway, version = result.version, manifest_version = format_args!("{:016x}", result.manifest_version), "cloud configuration applied");
        } else {
            warn!(gateway = %self.gateway, version = result.version, problems = result.problems.len(), "cloud configuration refused by the gateway");
        }
        let now = now_ms();
        self.store
            .update_gateway_config_state(&self.gateway, Box::new(move |s| s.answered(&result, now)))
            .await
            .map(drop)
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    async fn read_loop(
        &mut self,
        inbound: &mut Streaming<GatewayMessage>,
        tx: &mpsc::Sender<Result<IngestMessage, Status>>,
        pending: &mpsc::Sender<(Reply, PendingAppend)>,
    ) -> Result<(), Status> {
        while let Some(msg) = inbound.message().await? {
            self.connections
                .update(&self.gateway, |c| c.last_message_ms = now_ms());
            match msg.kind {
                Some(Up::Manifest(m)) => {
                    if m.gateway_id != self.gateway {
                        return Err(Status::permission_denied("manifest names another gateway"));
                    }
                    validate::check_manifest(&m)
                        .map_err(|e| Status::invalid_argument(format!("manifest: {e}")))?;
                    let version = m.version;
                    self.manifest_hashes
                        .insert(version, chain::manifest_hash(&m));
                    let map =
                        self.store
                            .put_manifest(&self.gateway, m)
                            .await
                            .map_err(|e| match e {
                                crate::store::StoreError::Invalid(msg) => {
                                    Status::invalid_argument(format!("manifest: {msg}"))
                                }
                                other => Status::unavailable(other.to_string()),
                            })?;
                    info!(gateway = %self.gateway, version = format_args!("{version:016x}"), tags = map.series.len(), "manifest stored");
                    self.manifests.insert(version, map);
                }
                Some(Up::Batch(envelope)) => {
                    let batch = Batch::decode(envelope.payload.as_ref()).map_err(|e| {
                        Status::invalid_argument(format!("batch payload does not decode: {e}"))
                    })?;
                    // Over quota: stop reading this stream until it refills;
                    // flow control holds this gateway back, and only it.
                    let wait = self.guards.quotas.charge(
                        &self.gateway,
                        batch.points.len() as u64,
                        envelope.payload.len() as u64,
                    );
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    let link = self.link(&batch, &envelope);
                    let (reply, mut append) = self.check(batch, envelope.backfill).await?;
                    append.link = link;
                    append.wire_bytes = envelope.payload.len() as u64;
                    if let Some(reason) = &reply.rejected {
                        warn!(gateway = %self.gateway, seq = reply.first, %reason, "batch rejected");
                        self.connections.update(&self.gateway, |c| c.rejected += 1);
                        metrics::batch_rejected();
                    }
                    let queued: PendingAppend =
                        Box::pin(metrics::timed_append(&*self.store, append));
                    if pending.send((reply, queued)).await.is_err() {
                        return Ok(());
                    }
                }
                Some(Up::Health(h)) => {
                    // Operational, not evidence: a bad report is dropped
                    // and logged, the stream goes on.
                    match crate::fleet::HealthView::from_wire(h, now_ms()) {
                        Ok(view) => self
                            .connections
                            .update(&self.gateway, |c| c.health = Some(view)),
                        Err(e) => {
                            warn!(gateway = %self.gateway, error = %e, "health report dropped")
                        }
                    }
                }
                Some(Up::ConfigResult(result)) => self.config_result(result).await?,
                Some(Up::Hello(_)) => {
                    return Err(Status::invalid_argument("Hello may only be sent first"));
                }
                None => return Err(Status::invalid_argument("empty message")),
            }
            if tx.is_closed() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The batch as a chain link, its signature checked with the bound key,
    /// which must be of the algorithm the envelope names. Unsigned batches
    /// are no link (their stream's chain stays empty); an unknown algorithm
    /// is a link whose signature fails.
    fn link(&self, batch: &Batch, envelope: &guantong_proto::v1::BatchEnvelope) -> Option<Link> {
        if envelope.algorithm == SignatureAlgorithm::None as i32 {
            return None;
        }
        let named = Algorithm::from_wire(envelope.algorithm);
        let algorithm = named.unwrap_or_default();
        let prev = chain::to_hash(&envelope.prev_hash).unwrap_or([0; 32]);
        let hash = algorithm.link_hash(&prev, &envelope.payload);
        let signature_ok =
            crate::store::chain::signature_ok(self.key.as_ref(), named, &hash, &envelope.signature);
        let effective_hash = batch
            .loss
            .as_ref()
            .and_then(|l| chain::to_hash(&l.bridge_hash))
            .unwrap_or(hash);
        Some(Link {
            algorithm,
            signature_checked: self.key.is_some(),
            payload: envelope.payload.clone(),
            prev_hash: envelope.prev_hash.clone(),
            signature: envelope.signature.clone(),
            effective_hash,
            signature_ok,
        })
    }

    /// Validates a batch; returns the reply to send once it is stored.
    async fn check(
        &mut self,
        batch: Batch,
        backfill: bool,
    ) -> Result<(Reply, AppendBatch), Status> {
        if batch.buffer_id != self.buffer_id {
            return Err(Status::invalid_argument(format!(
                "batch belongs to buffer {:016x}, stream to {:016x}",
                batch.buffer_id, self.buffer_id
            )));
        }
        let last_seq = batch
            .loss
            .as_ref()
            .map_or(batch.seq, |l| l.last_seq.max(batch.seq));
        let mut rejected = self.manifest_link_problem(&batch);
        let mut map = None;
        if batch.loss.is_none() {
            match self.manifest(batch.manifest_version).await? {
                _ if rejected.is_some() => {}
                None => {
                    rejected = Some(format!(
                        "unknown manifest version {:016x}",
                        batch.manifest_version
                    ))
                }
                Some(m) => {
                    match validate::check_points(
                        &batch,
                        m.series.len(),
                        &self.guards.validation,
                        now_ms(),
                    ) {
                        Err(reason) => rejected = Some(reason),
                        Ok(()) => map = Some(m),
                    }
                }
            }
        }
        let reply = Reply {
            buffer_id: self.buffer_id,
            first: batch.seq,
            last: last_seq,
            rejected: rejected.clone(),
        };
        let append = AppendBatch {
            gateway_id: self.gateway.clone(),
            batch,
            map,
            received_at_ms: now_ms(),
            backfill,
            link: None,
            rejected,
            wire_bytes: 0,
        };
        Ok((reply, append))
    }

    /// Why a manifest link does not match the manifest sent on this stream.
    fn manifest_link_problem(&self, batch: &Batch) -> Option<String> {
        if batch.manifest_sha256.is_empty() {
            return None;
        }
        if !batch.points.is_empty() {
            return Some("a manifest link carries points".into());
        }
        let sent = self.manifest_hashes.get(&batch.manifest_version)?;
        (sent.as_slice() != batch.manifest_sha256.as_slice()).then(|| {
            format!(
                "the manifest link's hash is not that of manifest {:016x} as sent",
                batch.manifest_version
            )
        })
    }

    async fn manifest(&mut self, version: u64) -> Result<Option<Arc<ManifestMap>>, Status> {
        if let Some(m) = self.manifests.get(&version) {
            return Ok(Some(m.clone()));
        }
        let found = self
            .store
            .manifest_map(&self.gateway, version)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if let Some(m) = &found {
            self.manifests.insert(version, m.clone());
        }
        Ok(found)
    }
}
