//! OPC UA collector: one session per device, subscription or polling.
//!
//! Design
//! - async-opcua's client, with its own reconnect switched off: a session
//!   that dies ends, and this module opens a new one (endpoint discovery,
//!   security, namespaces by URI resolved again), so one code path serves
//!   the first connect, a network cut and a server restart (after which
//!   namespace indexes may differ). The session is opened at the configured
//!   URL's host and port, whatever address the server advertises.
//! - Subscription transfer: a lost session is closed without deleting its
//!   subscriptions, whose lifetime covers `session_timeout`. When the next
//!   session resolves the same NodeIds it takes them over
//!   (TransferSubscriptions) and republishes what the server sent that never
//!   arrived (sequence numbers above the last one received), so the values
//!   the server queued during a network cut arrive; initial values are asked
//!   for, so an item that never changes sends its value again. When the server no longer
//!   has them (restart, lifetime over) or the nodes differ, they are deleted
//!   and created anew, each item's first notification being its current
//!   value. async-opcua's own reconnect could transfer too, but would keep
//!   stale namespace indexes after a server restart.
//! - The gap is recorded, never hidden: when a session ends every tag gets
//!   one Bad point (`OPCUA_CONNECTION_LOST`) at the time the loss was seen;
//!   while the server stays unreachable nothing more is written (the next
//!   point of each tag is its first value after the reconnect, which a new
//!   monitored item always sends, or values the server queued meanwhile
//!   when the subscription was transferred). A connect that fails before
//!   any session marks the tags Bad with the failure's status code, once
//!   per reason (a new code, e.g. after `opcua trust`, is a new point). A
//!   failure over certificates is one log line saying which side must trust
//!   which certificate (`refusal`); async-opcua's own lines are off
//!   (`log_filter`).
//! - Values that do not change are repeated once per publishing interval,
//!   up to the publish time the server's responses confirmed (`Hold`), so
//!   ingest counts a constant tag alive.
//! - Certificates: trust is the stack's (trusted/, rejected/); with
//!   `accept_host_name_mismatch` the stack's further checks are off and
//!   `check_server_certificate` does them but the host name.
//! - Watchdog: the stack reads the server state every `keep_alive_interval`
//!   and closes the session after `keep_alive_failures` failures. That Read
//!   proves the session, never a subscription: each subscription has its own
//!   `liveness::Heartbeat`, beaten by its publish responses (data or
//!   keep-alive notification). One silent for `stall_intervals` of its
//!   keep-alive periods ends the session here: as `STALLED` while the
//!   session's keep-alive still succeeds (a server that dropped or moved the
//!   subscription), as lost when that went silent too. A stalled session's
//!   subscriptions are deleted, not carried, and the next session creates
//!   new ones. In poll mode each Read is its own proof: one that fails ends
//!   the session.
//! - Subscriptions: monitored items are created `max_items_per_call` at a
//!   time (the server's OperationLimits, else 1000); when the server says a
//!   subscription is full (BadTooManyMonitoredItems) the rest go into a new
//!   subscription. Client handle = tag index + 1, so a notification maps to
//!   its tag without a lookup. Queue sizes are chosen so that no sample of a
//!   publishing interval is dropped (discard oldest if the server overflows
//!   anyway; the overflow bit then stays in the point's quality code and is
//!   counted in the log). A server that revises a queue size down is logged.
//! - Notifications are converted in the stack's callback and handed to this
//!   task as one `Vec<Sample>` per publish response through an unbounded
//!   channel (the callback cannot wait); the task forwards them to the
//!   bounded `PointSink`, so a slow disk slows the Publish loop here and the
//!   server keeps the backlog in its queues.
//! - Polling: Read of every resolved node every `poll_interval`, in chunks of
//!   the server's MaxNodesPerRead.  A value whose timestamp did not advance since
//!   the previous Read is stored at the Read's time: one point per poll.
//! - Order after a gap: see `AfterGap` (the first current value after the
//!   gateway's Bad point is stamped after it).
//! - Identity: read at start (`identify_all`); a device that got none then
//!   (untrusted, unreachable) reads it at its first session and reports it
//!   (`reload::Identified`), which publishes a new manifest without
//!   restarting anything.

pub mod config;
pub mod convert;
pub mod pki;
pub mod probe;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_opcua::client::services::CreateMonitoredItems;
use async_opcua::client::{
    Client, ClientBuilder, IdentityToken, MonitoredItemMap, OnSubscriptionNotificationCore,
    Session, SessionPollResult, Subscription, UARequest,
};
use async_opcua::crypto::{SecurityPolicy, X509};
use async_opcua::types::{
    AttributeId, DataChangeFilter, DataChangeNotification, DataChangeTrigger, DataValue,
    EndpointDescription, ExtensionObject, MessageSecurityMode, MonitoredItemCreateRequest,
    MonitoringMode, MonitoringParameters, NodeId, NotificationMessage, QualifiedName, ReadValueId,
    StatusCode, TimestampsToReturn, TransferResult, UserTokenType, VariableId,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::collector::{Collector, PointSink};
use crate::liveness::{Heartbeat, StallWatch};
use crate::quality::{self, Sample, now_ms};
use crate::reload::{Identified, IdentifiedTx};
use config::{
    Deadband, Mode, Namespace, NodeAddress, OpcUaConfig, SecurityModeChoice, SecurityPolicyChoice,
};
use convert::Conversion;

/// First reconnect delay; doubles up to `max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Items or nodes per request when the server does not say.
const DEFAULT_PER_CALL: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum OpcUaError {
    #[error("{context}: {status}")]
    Status {
        context: &'static str,
        status: StatusCode,
    },
    #[error("{0}")]
    Setup(String),
    #[error("no endpoint of {url} offers {wanted}; it offers: {offered}")]
    NoEndpoint {
        url: String,
        wanted: String,
        offered: String,
    },
    #[error("{0}")]
    Pki(#[from] pki::PkiError),
    /// Refused over certificates: `advice` says what the installer does.
    #[error("{status}: {advice}")]
    Refused { status: StatusCode, advice: String },
}

impl OpcUaError {
    fn status(context: &'static str, e: impl Into<StatusCode>) -> OpcUaError {
        OpcUaError::Status {
            context,
            status: e.into(),
        }
    }

    /// The code a tag gets while this error keeps the device unreachable.
    fn quality_code(&self) -> u32 {
        match self {
            OpcUaError::Status { status, .. } | OpcUaError::Refused { status, .. }
                if status.is_bad() =>
            {
                status.bits()
            }
            _ => quality::CONNECT_FAILED,
        }
    }
}

fn err_status(e: async_opcua::types::Error) -> StatusCode {
    e.status()
}

pub struct OpcUaCollector {
    config: OpcUaConfig,
    /// Manifest index of the device's first tag.
    first_tag: u32,
    /// Where to report the identity, while the device has none.
    identify: Option<IdentifiedTx>,
}

impl OpcUaCollector {
    pub fn new(config: OpcUaConfig, first_tag: u32) -> OpcUaCollector {
        OpcUaCollector {
            config,
            first_tag,
            identify: None,
        }
    }

    /// Reads the identity at the first session and sends it to `tx`, if
    /// the device was not identified before its collector started.
    pub fn report_identity_to(mut self, tx: IdentifiedTx) -> OpcUaCollector {
        self.identify = self.config.identity.is_empty().then_some(tx);
        self
    }
}

impl Collector for OpcUaCollector {
    async fn run(self, sink: PointSink, cancel: CancellationToken) {
        let id = self.config.id.clone();
        let mut client = match build_client(&self.config) {
            Ok(c) => c,
            Err(error) => {
                warn!(%error, device = %id, "opc ua client cannot start");
                let now = now_ms();
                let bad = (0..self.config.tags.len() as u32)
                    .map(|i| Sample::bad(self.first_tag + i, now, quality::CONNECT_FAILED))
                    .collect();
                sink.send(bad).await;
                return;
            }
        };
        let mut backoff = FIRST_BACKOFF;
        // The code of the Bad point the tags last got, while they are down:
        // the next one is written only when the reason changes (after
        // `opcua trust`, an untrusted server may turn out to be refused for
        // its host name, say), so ingest shows the current reason.
        let mut marked_down: Option<u32> = None;
        let mut across = Across {
            carried: None,
            order: AfterGap::new(self.first_tag, self.config.tags.len()),
            identify: self.identify,
        };
        loop {
            let started = Instant::now();
            let result = run_session(
                &self.config,
                &mut client,
                self.first_tag,
                &sink,
                &cancel,
                &mut across,
            )
            .await;
            if cancel.is_cancelled() {
                return;
            }
            let (code, connected) = match &result {
                Ok(SessionEnd::Lost(status)) => {
                    warn!(device = %id, %status, "opc ua session lost; tags marked Bad until it is back");
                    (quality::OPCUA_CONNECTION_LOST, true)
                }
                Ok(SessionEnd::Stalled { silent }) => {
                    warn!(device = %id, ?silent, "opc ua subscription stalled: the session answers but no publish response came; tags marked Bad, subscribing again in a new session");
                    (quality::STALLED, true)
                }
                Ok(SessionEnd::Stopped) => return,
                Err(error) => {
                    warn!(%error, device = %id, retry_in = ?backoff, "opc ua connect failed");
                    (error.quality_code(), false)
                }
            };
            if connected {
                marked_down = None;
                backoff = FIRST_BACKOFF;
            }
            if marked_down != Some(code) {
                let now = now_ms();
                let bad = (0..self.config.tags.len() as u32)
                    .map(|i| Sample::bad(self.first_tag + i, now, code))
                    .collect();
                if !sink.send(bad).await {
                    return;
                }
                across.order.gap_at(now);
                marked_down = Some(code);
            }
            // A session that lived a while reconnects at once (after the
            // first backoff step); repeated failures back off.
            let wait = if connected && started.elapsed() > self.config.max_backoff {
                FIRST_BACKOFF
            } else {
                backoff
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }
}

/// How a session that was established ended.
enum SessionEnd {
    Lost(StatusCode),
    /// A subscription went silent while the session answered.
    Stalled {
        silent: Duration,
    },
    Stopped,
}

/// Events of the stack's session event loop that matter here.
enum LoopEvent {
    Connected,
    /// The session keep-alive (a Read of the server state) succeeded.
    SessionAlive,
    Lost(StatusCode),
    Ended(StatusCode),
}

/// The log filter with async-opcua's crates off unless the filter names one
/// (`GUANTONG_LOG=info,opcua_client=debug`). The library logs each failed
/// connect as several lines, two of them ERROR, and `Transport disconnected:
/// Good` at a normal close; the collector logs one line per event instead,
/// with what the installer does about it.
pub fn log_filter(filter: String) -> String {
    if filter.contains("opcua_") {
        filter
    } else {
        format!("{filter},opcua_client=off,opcua_core=off,opcua_crypto=off,opcua_types=off")
    }
}

pub(crate) fn build_client(config: &OpcUaConfig) -> Result<Client, OpcUaError> {
    let uri = config
        .application_uri
        .clone()
        .unwrap_or_else(|| "urn:guantong:gateway".into());
    let (thumb, created) = pki::ensure_own_certificate(config.pki_dir(), &uri)?;
    if created {
        info!(device = %config.id, pki = %config.pki_dir().display(), thumbprint = %thumb, application_uri = %uri,
            "created the gateway's OPC UA application instance certificate");
    }
    ClientBuilder::new()
        .application_name("Guantong gateway")
        .application_uri(uri)
        .product_uri("urn:guantong:gateway")
        .pki_dir(config.pki_dir())
        .certificate_path("own/cert.der")
        .private_key_path("private/private.pem")
        .create_sample_keypair(false)
        .trust_server_certs(false)
        // Skipping the stack's checks of a trusted certificate skips its
        // host name check; `Connection::open` then checks the rest itself.
        .verify_server_certs(!config.accept_host_name_mismatch)
        .session_retry_limit(0)
        .recreate_subscriptions(false)
        .keep_alive_interval(config.keep_alive_interval)
        .max_failed_keep_alive_count(u64::from(config.keep_alive_failures))
        .request_timeout(config.request_timeout)
        .publish_timeout(config.request_timeout.max(config.publishing_interval * 3))
        .session_timeout(config.session_timeout.as_millis().min(u32::MAX as u128) as u32)
        .session_name(format!("guantong {}", config.id))
        .max_array_length(1_000_000)
        .max_message_size(64 * 1024 * 1024)
        .max_chunk_count(0)
        .client()
        .map_err(|e| OpcUaError::Setup(format!("OPC UA client settings: {}", e.join("; "))))
}

fn identity(config: &OpcUaConfig) -> Result<IdentityToken, OpcUaError> {
    if let (Some(u), Some(p)) = (&config.username, &config.password) {
        return Ok(IdentityToken::new_user_name(u.clone(), p.clone()));
    }
    if let (Some(c), Some(k)) = (&config.user_certificate_file, &config.user_private_key_file) {
        return IdentityToken::new_x509_path(c, k).map_err(|e| {
            OpcUaError::Setup(format!(
                "user certificate {} / key {}: {e}",
                c.display(),
                k.display()
            ))
        });
    }
    Ok(IdentityToken::Anonymous)
}

fn token_type(t: &IdentityToken) -> UserTokenType {
    match t {
        IdentityToken::UserName(..) => UserTokenType::UserName,
        IdentityToken::X509(..) => UserTokenType::Certificate,
        IdentityToken::IssuedToken(_) => UserTokenType::IssuedToken,
        _ => UserTokenType::Anonymous,
    }
}

/// Policies this gateway uses, weakest first (the order breaks ties of the
/// server's SecurityLevel).
const POLICIES: [SecurityPolicy; 4] = [
    SecurityPolicy::None,
    SecurityPolicy::Basic256Sha256,
    SecurityPolicy::Aes128Sha256RsaOaep,
    SecurityPolicy::Aes256Sha256RsaPss,
];

/// The endpoint to use: the configured policy and mode, with the user token
/// type needed; among those, the one the server rates most secure (its
/// SecurityLevel, which the server sets for its own endpoints), then
/// SignAndEncrypt over Sign, then the stronger policy.
pub fn select_endpoint(
    endpoints: &[EndpointDescription],
    policy: SecurityPolicyChoice,
    mode: SecurityModeChoice,
    token: UserTokenType,
) -> Option<EndpointDescription> {
    let policy_ok = |e: &EndpointDescription| {
        let p = SecurityPolicy::from_uri(e.security_policy_uri.as_ref());
        match policy {
            SecurityPolicyChoice::Best => POLICIES.contains(&p),
            SecurityPolicyChoice::None => p == SecurityPolicy::None,
            SecurityPolicyChoice::Basic256sha256 => p == SecurityPolicy::Basic256Sha256,
            SecurityPolicyChoice::Aes128Sha256RsaOaep => p == SecurityPolicy::Aes128Sha256RsaOaep,
            SecurityPolicyChoice::Aes256Sha256RsaPss => p == SecurityPolicy::Aes256Sha256RsaPss,
        }
    };
    let mode_ok = |e: &EndpointDescription| match mode {
        SecurityModeChoice::Best => e.security_mode != MessageSecurityMode::Invalid,
        SecurityModeChoice::None => e.security_mode == MessageSecurityMode::None,
        SecurityModeChoice::Sign => e.security_mode == MessageSecurityMode::Sign,
        SecurityModeChoice::SignAndEncrypt => {
            e.security_mode == MessageSecurityMode::SignAndEncrypt
        }
    };
    let token_ok = |e: &EndpointDescription| {
        e.user_identity_tokens
            .iter()
            .flatten()
            .any(|t| t.token_type == token)
    };
    let rank = |e: &EndpointDescription| {
        let p = SecurityPolicy::from_uri(e.security_policy_uri.as_ref());
        let policy_rank = POLICIES.iter().position(|x| *x == p).unwrap_or(0);
        let mode_rank = match e.security_mode {
            MessageSecurityMode::SignAndEncrypt => 2,
            MessageSecurityMode::Sign => 1,
            _ => 0,
        };
        (e.security_level, mode_rank, policy_rank)
    };
    endpoints
        .iter()
        .filter(|e| policy_ok(e) && mode_ok(e) && token_ok(e))
        .max_by_key(|e| rank(e))
        .cloned()
}

/// `endpoint_url` with the host and port of `configured` (its path kept).
fn at_address_of(endpoint_url: &str, configured: &str) -> String {
    fn split(url: &str) -> Option<(&str, &str, &str)> {
        let (scheme, rest) = url.split_once("://")?;
        let at = rest.find('/').unwrap_or(rest.len());
        Some((scheme, &rest[..at], &rest[at..]))
    }
    match (split(endpoint_url), split(configured)) {
        (Some((scheme, _, path)), Some((_, authority, _))) => {
            format!("{scheme}://{authority}{path}")
        }
        _ => endpoint_url.to_string(),
    }
}

/// `policy/mode` of an endpoint, for people.
pub fn describe_endpoint(e: &EndpointDescription) -> String {
    let policy = SecurityPolicy::from_uri(e.security_policy_uri.as_ref());
    let tokens: Vec<String> = e
        .user_identity_tokens
        .iter()
        .flatten()
        .map(|t| format!("{:?}", t.token_type))
        .collect();
    format!(
        "{} {:?} (level {}, users: {})",
        policy.to_str(),
        e.security_mode,
        e.security_level,
        tokens.join("/")
    )
}

/// An open session, its event loop running on its own task.
pub(crate) struct Connection {
    pub session: Arc<Session>,
    pub endpoint: EndpointDescription,
    events: mpsc::UnboundedReceiver<LoopEvent>,
    event_task: tokio::task::JoinHandle<()>,
}

impl Connection {
    /// Discovers the endpoints, picks one, applies trust on first use, and
    /// opens a session; returns once it is activated.
    pub(crate) async fn open(
        config: &OpcUaConfig,
        client: &mut Client,
    ) -> Result<Connection, OpcUaError> {
        let endpoints = tokio::time::timeout(
            config.request_timeout,
            client.get_server_endpoints_from_url(config.url.as_str()),
        )
        .await
        .map_err(|_| OpcUaError::status("GetEndpoints", StatusCode::BadTimeout))?
        .map_err(|e| OpcUaError::status("GetEndpoints", err_status(e)))?;
        // Servers advertise their own idea of their address (a host name the
        // gateway cannot resolve, a port behind NAT or a proxy): the session
        // goes where GetEndpoints was answered, the configured `url`.
        let endpoints: Vec<EndpointDescription> = endpoints
            .into_iter()
            .map(|mut e| {
                e.endpoint_url = at_address_of(e.endpoint_url.as_ref(), &config.url).into();
                e
            })
            .collect();
        let identity = identity(config)?;
        let Some(endpoint) = select_endpoint(
            &endpoints,
            config.security_policy,
            config.security_mode,
            token_type(&identity),
        ) else {
            return Err(OpcUaError::NoEndpoint {
                url: config.url.clone(),
                wanted: format!(
                    "policy {:?}, mode {:?}, user token {:?}",
                    config.security_policy,
                    config.security_mode,
                    token_type(&identity)
                ),
                offered: endpoints
                    .iter()
                    .map(describe_endpoint)
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        };
        let secured = endpoint.security_mode != MessageSecurityMode::None;
        let server_cert = X509::from_byte_string(&endpoint.server_certificate).ok();
        if secured
            && config.trust_on_first_use
            && let Some(cert) = &server_cert
            && let Some(thumbprint) = pki::trust_on_first_use(config.pki_dir(), &config.id, cert)?
        {
            warn!(device = %config.id, %thumbprint, "trusted the server's certificate on first use");
        }
        if secured
            && config.accept_host_name_mismatch
            && let Some(cert) = &server_cert
        {
            check_server_certificate(config, &endpoint, cert)?;
        }
        debug!(device = %config.id, endpoint = %describe_endpoint(&endpoint), "opc ua endpoint chosen");
        let (session, event_loop) = client
            .session_builder()
            .with_endpoints(endpoints)
            .connect_to_matching_endpoint(endpoint.clone())
            .map_err(|e| OpcUaError::status("endpoint", err_status(e)))?
            .user_identity_token(identity)
            .build(client.certificate_store().clone())
            .map_err(|e| OpcUaError::status("session", err_status(e)))?;
        session.disable_reconnects();
        let (tx, mut events) = mpsc::unbounded_channel();
        let event_task = tokio::spawn(async move {
            let stream = event_loop.enter();
            let mut stream = std::pin::pin!(stream);
            while let Some(r) = stream.next().await {
                let event = match r {
                    Ok(SessionPollResult::Reconnected(_)) => LoopEvent::Connected,
                    Ok(SessionPollResult::ConnectionLost(s)) => LoopEvent::Lost(s),
                    Ok(SessionPollResult::SessionActivity(
                        async_opcua::client::SessionActivity::KeepAliveSucceeded,
                    )) => LoopEvent::SessionAlive,
                    Ok(_) => continue,
                    Err(s) => {
                        let _ = tx.send(LoopEvent::Ended(s));
                        return;
                    }
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
            let _ = tx.send(LoopEvent::Ended(StatusCode::BadConnectionClosed));
        });
        let first = tokio::time::timeout(config.request_timeout * 3, events.recv()).await;
        let fail = |status: StatusCode| match &server_cert {
            Some(cert) if secured => refusal(config, status, cert),
            _ => OpcUaError::status("connect", status),
        };
        match first {
            Ok(Some(LoopEvent::Connected)) => Ok(Connection {
                session,
                endpoint,
                events,
                event_task,
            }),
            Ok(Some(LoopEvent::Lost(s) | LoopEvent::Ended(s))) => {
                event_task.abort();
                Err(fail(s))
            }
            Ok(Some(LoopEvent::SessionAlive)) | Ok(None) => {
                event_task.abort();
                Err(fail(StatusCode::BadConnectionClosed))
            }
            Err(_) => {
                event_task.abort();
                Err(fail(StatusCode::BadTimeout))
            }
        }
    }

    /// Closes the session (best effort, bounded) and stops its event loop.
    pub(crate) async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.session.disconnect()).await;
        self.event_task.abort();
    }

    /// Closes the session but leaves its subscriptions on the server (until
    /// their lifetime ends), for the next session to transfer.
    async fn close_keeping_subscriptions(self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.session.disconnect_without_delete_subscriptions(),
        )
        .await;
        self.event_task.abort();
    }
}

/// With `accept_host_name_mismatch` the stack skips its checks of a trusted
/// server certificate: the validity period and the ApplicationUri are checked
/// here, and only the host name may differ (logged when it does).
fn check_server_certificate(
    config: &OpcUaConfig,
    endpoint: &EndpointDescription,
    cert: &X509,
) -> Result<(), OpcUaError> {
    let refused = |e: async_opcua::types::Error| OpcUaError::Refused {
        status: e.status(),
        advice: format!("the server's certificate: {e}"),
    };
    cert.is_time_valid(&async_opcua::types::DateTime::now().as_chrono())
        .map_err(refused)?;
    cert.is_application_uri_valid(endpoint.server.application_uri.as_ref())
        .map_err(refused)?;
    let host = url_host(endpoint.endpoint_url.as_ref());
    if cert.is_hostname_valid(&host).is_err() {
        warn!(device = %config.id, %host, names = %pki::host_names(cert).join(", "),
            "accepting a server certificate that does not name the host connected to (accept_host_name_mismatch = true)");
    }
    Ok(())
}

/// The host of an `opc.tcp://` URL (empty when there is none).
fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.to_string()
}

/// A connect refused over certificates, as one error that says which side
/// must trust which certificate and the file to copy or the command to run.
/// Whose refusal it is shows in the gateway's PKI: the stack puts a server
/// certificate it refuses into `rejected/` (an unknown one, answered
/// BadCertificateUntrusted, or one already there, BadSecurityChecksFailed);
/// a refusal while the server's certificate is not there is the server's,
/// which checks the gateway's certificate first.
fn refusal(config: &OpcUaConfig, status: StatusCode, cert: &X509) -> OpcUaError {
    let pki = config.pki_dir();
    let thumbprint = pki::thumbprint(cert);
    let listed = |dir: &str| {
        pki::list(pki, dir)
            .into_iter()
            .find(|c| c.thumbprint == thumbprint)
    };
    let advice = if status == StatusCode::BadCertificateHostNameInvalid {
        format!(
            "the server's certificate does not name the host of `url` ({}); it names {}: use one of those in `url`, or set `accept_host_name_mismatch = true` for device {}",
            url_host(&config.url),
            pki::host_names(cert).join(", "),
            config.id
        )
    } else if status != StatusCode::BadCertificateUntrusted
        && status != StatusCode::BadSecurityChecksFailed
    {
        return OpcUaError::status("connect", status);
    } else if let Some(rejected) = listed("rejected") {
        format!(
            "the gateway does not trust the server's certificate {} ({}): after checking it, run `guantong-gateway opcua trust {}`",
            thumbprint,
            rejected.path.display(),
            thumbprint
        )
    } else {
        let then = if listed("trusted").is_some() {
            ""
        } else {
            "; the gateway will then ask to trust the server's certificate too"
        };
        format!(
            "the server refused the gateway's certificate: copy {} into the server's trusted certificates (or accept it in the server's rejected list){then}",
            pki::own_cert_path(pki).display()
        )
    };
    OpcUaError::Refused { status, advice }
}

/// Reads one scalar Value attribute of each node.
pub(crate) async fn read_values(
    session: &Session,
    nodes: &[NodeId],
) -> Result<Vec<DataValue>, OpcUaError> {
    let ids: Vec<ReadValueId> = nodes.iter().map(|n| read_value_id(n.clone())).collect();
    session
        .read(&ids, TimestampsToReturn::Both, 0.0)
        .await
        .map_err(|e| OpcUaError::status("Read", err_status(e)))
}

fn read_value_id(node_id: NodeId) -> ReadValueId {
    ReadValueId {
        node_id,
        attribute_id: AttributeId::Value as u32,
        index_range: Default::default(),
        data_encoding: QualifiedName::null(),
    }
}

/// The server's per-call limit for `limit` (an OperationLimits variable),
/// when it states one.
async fn server_limit(session: &Session, limit: VariableId) -> Option<usize> {
    let v = read_values(session, &[limit.into()]).await.ok()?;
    let n: u32 = v.first()?.value.clone()?.try_cast_to().ok()?;
    (n > 0).then_some(n as usize)
}

/// Each tag's NodeId on this server, or the code why it has none.
fn resolve(
    config: &OpcUaConfig,
    namespaces: &async_opcua::types::NamespaceMap,
) -> Vec<Result<NodeId, u32>> {
    config
        .tags
        .iter()
        .map(|t| {
            let a = NodeAddress::parse(&t.node).expect("checked when the config was loaded");
            match &a.namespace {
                Namespace::Index(i) => Ok(a.with_index(*i)),
                Namespace::Uri(u) => namespaces
                    .get_index(u)
                    .map(|i| a.with_index(i))
                    .ok_or(quality::OPCUA_NAMESPACE_UNKNOWN),
            }
        })
        .collect()
}

/// Runs one session: connect, subscribe or poll, until it is lost or
/// `cancel` fires.
async fn run_session(
    config: &OpcUaConfig,
    client: &mut Client,
    first_tag: u32,
    sink: &PointSink,
    cancel: &CancellationToken,
    across: &mut Across,
) -> Result<SessionEnd, OpcUaError> {
    let mut conn = tokio::select! {
        _ = cancel.cancelled() => return Ok(SessionEnd::Stopped),
        c = Connection::open(config, client) => c?,
    };
    info!(device = %config.id, endpoint = %describe_endpoint(&conn.endpoint), "opc ua session open");
    if let Some(tx) = across.identify.take() {
        match tokio::time::timeout(config.request_timeout, identity_of(&conn)).await {
            Ok(Ok(identity)) => {
                let _ = tx.send(Identified {
                    device: config.id.clone(),
                    first_slot: first_tag,
                    identity,
                });
            }
            Ok(Err(error)) => {
                warn!(%error, device = %config.id, "opc ua server not identified; trying again at the next session");
                across.identify = Some(tx);
            }
            Err(_) => {
                warn!(device = %config.id, "opc ua server not identified: no answer within request_timeout; trying again at the next session");
                across.identify = Some(tx);
            }
        }
    }
    let result = serve(config, &mut conn, first_tag, sink, cancel, across).await;
    match result {
        Ok(SessionEnd::Lost(_)) if across.carried.is_some() => {
            conn.close_keeping_subscriptions().await
        }
        _ => {
            across.carried = None;
            conn.close().await;
        }
    }
    result
}

async fn serve(
    config: &OpcUaConfig,
    conn: &mut Connection,
    first_tag: u32,
    sink: &PointSink,
    cancel: &CancellationToken,
    across: &mut Across,
) -> Result<SessionEnd, OpcUaError> {
    let session = conn.session.clone();
    let namespaces = session
        .read_namespace_array()
        .await
        .map_err(|e| OpcUaError::status("read NamespaceArray", err_status(e)))?;
    let nodes = resolve(config, &namespaces);
    let conversions: Vec<Conversion> = config
        .tags
        .iter()
        .enumerate()
        .map(|(i, t)| Conversion {
            tag: first_tag + i as u32,
            value_type: t.data_type,
            timestamp: config.timestamp,
        })
        .collect();
    let now = now_ms();
    let unresolved: Vec<Sample> = nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            n.as_ref()
                .err()
                .map(|c| Sample::bad(first_tag + i as u32, now, *c))
        })
        .collect();
    if !unresolved.is_empty() {
        warn!(device = %config.id, tags = unresolved.len(), "namespace URI not on the server; those tags are Bad");
        sink.send(unresolved).await;
    }
    match config.mode {
        Mode::Subscription => {
            subscribe_and_forward(config, conn, &nodes, conversions, sink, cancel, across).await
        }
        Mode::Poll => {
            poll(
                config,
                conn,
                &nodes,
                &conversions,
                sink,
                cancel,
                &mut across.order,
            )
            .await
        }
    }
}

/// The subscription callback: converts each publish response's data
/// changes and hands them to the collector task in one piece.
#[derive(Clone)]
struct Notifications {
    conversions: Arc<[Conversion]>,
    tx: mpsc::UnboundedSender<Delivered>,
    overflows: Arc<AtomicU64>,
    /// The subscription's highest sequence number received (0: none yet),
    /// so that a transfer republishes only what never arrived.
    received: Arc<AtomicU32>,
    /// Beaten by every publish response of the subscription.
    heard: Heartbeat,
    /// The publish time (ms, server clock) of its latest publish response
    /// the collector task has taken (see `Delivered::published`).
    published: Arc<AtomicI64>,
    /// Republished notifications: values from before the gap, stored with
    /// their own timestamps (see `AfterGap`).
    republished: bool,
}

impl OnSubscriptionNotificationCore for Notifications {
    fn on_subscription_notification(
        &mut self,
        notification: NotificationMessage,
        _items: MonitoredItemMap<'_>,
    ) {
        self.forward(notification);
    }
}

impl Notifications {
    fn forward(&self, notification: NotificationMessage) {
        self.heard.beat();
        // A server without a clock (null time): the arrival confirms.
        let published_ms = if notification.publish_time.is_null() {
            now_ms()
        } else {
            notification.publish_time.as_chrono().timestamp_millis()
        };
        let Some(data) = notification.notification_data else {
            // A keep-alive confirms the held values too, in its turn.
            if !self.republished {
                let _ = self.tx.send(Delivered {
                    samples: Vec::new(),
                    republished: false,
                    published: self.published.clone(),
                    published_ms,
                });
            }
            return;
        };
        self.received
            .fetch_max(notification.sequence_number, Ordering::Relaxed);
        let mut samples = Vec::new();
        for obj in data {
            let Some(v) = obj.into_inner_as::<DataChangeNotification>() else {
                continue;
            };
            samples.reserve(v.monitored_items.as_ref().map_or(0, |m| m.len()));
            for item in v.monitored_items.into_iter().flatten() {
                let Some(c) = (item.client_handle as usize)
                    .checked_sub(1)
                    .and_then(|i| self.conversions.get(i))
                else {
                    continue;
                };
                if item.value.status.is_some_and(|s| s.overflow()) {
                    self.overflows.fetch_add(1, Ordering::Relaxed);
                }
                samples.push(c.sample(item.value));
            }
        }
        if !samples.is_empty() || !self.republished {
            let _ = self.tx.send(Delivered {
                samples,
                republished: self.republished,
                published: self.published.clone(),
                published_ms,
            });
        }
    }
}

/// What one session leaves to the next.
struct Across {
    /// The lost session's subscriptions, for the next session to take over.
    carried: Option<Carried>,
    order: AfterGap,
    /// Where to report the identity until a session has read it.
    identify: Option<IdentifiedTx>,
}

/// One publish response's samples, as the callback hands them over.
struct Delivered {
    samples: Vec<Sample>,
    republished: bool,
    /// The subscription's confirmed publish time, advanced to
    /// `published_ms` by the collector task once it has taken these
    /// samples: in channel order, so a held value is never confirmed past
    /// a change the task has not seen yet.
    published: Arc<AtomicI64>,
    /// The publish response's publish time (ms, server clock).
    published_ms: i64,
}

/// Keeps each tag's points in time order across a gap the gateway stamped.
///
/// The Bad point of a lost or stalled session carries the gateway's time;
/// the value delivered as current after the reconnect (a transfer's initial
/// value, a new item's first notification, a Read) often carries an older
/// device timestamp (a value that did not change). Stored as it is, it would
/// sort before the Bad point and the tag would stay Bad at ingest while data
/// flows. So the first such value of a tag is stamped at its arrival (after
/// the Bad point): the status change is the gateway's, like the loss.
/// Values the server queued during the cut and republishes keep their own
/// timestamps (they happened before the loss was seen).
struct AfterGap {
    first_tag: u32,
    /// Per tag, the time of the gateway's Bad point not yet followed by a
    /// value.
    gap_at: Vec<Option<i64>>,
}

impl AfterGap {
    fn new(first_tag: u32, tags: usize) -> AfterGap {
        AfterGap {
            first_tag,
            gap_at: vec![None; tags],
        }
    }

    /// Every tag got a Bad point stamped `time_ms`.
    fn gap_at(&mut self, time_ms: i64) {
        self.gap_at.fill(Some(time_ms));
    }

    fn restamp(&mut self, samples: &mut [Sample]) {
        for s in samples {
            let Some(slot) = self.gap_at.get_mut((s.tag - self.first_tag) as usize) else {
                continue;
            };
            if let Some(gap) = slot.take()
                && s.time_ms <= gap
            {
                s.time_ms = now_ms().max(gap + 1);
            }
        }
    }
}

/// Subscription mode: a value that does not change is still the tag's value.
///
/// A server sends an item only when it changes, so a tag whose value holds
/// (a setpoint, a name plate) would get one point per session while ingest
/// expects one per declared interval (`publishing_interval`) and would
/// count it missing. Every publish response (data or keep-alive) tells, as
/// of its publish time (the server's clock, the clock of the source
/// timestamps), that what it did not carry did not change. So a tag whose
/// latest point is Good or Uncertain gets that value again at each
/// publishing interval after it, up to the publish time every subscription
/// of the session has reached: the value held then, one point per interval,
/// as in poll mode, and never a point stamped after a change the server has
/// not sent yet. A fully static subscription is confirmed by its keep-alive
/// (every 10 intervals), so its repeats arrive in tens. A Bad point is not
/// repeated (a gap stays a gap), a silent subscription confirms nothing, and
/// a new session starts with nothing held until each item's first
/// notification.
struct Hold {
    first_tag: u32,
    interval_ms: i64,
    /// Per tag: the latest point and the time it holds from.
    last: Vec<Option<(Sample, i64)>>,
}

impl Hold {
    fn new(first_tag: u32, tags: usize, interval: Duration) -> Hold {
        Hold {
            first_tag,
            interval_ms: interval.as_millis().max(1) as i64,
            last: vec![None; tags],
        }
    }

    /// Records points of a publish response sent at `published_ms`.
    fn delivered(&mut self, samples: &[Sample], published_ms: i64) {
        for s in samples {
            if let Some(slot) = self.last.get_mut((s.tag - self.first_tag) as usize) {
                *slot = (s.quality != guantong_proto::v1::Quality::Bad)
                    .then(|| (s.clone(), published_ms.max(s.time_ms)));
            }
        }
    }

    /// The held values due up to `confirmed_ms`, one per interval per tag.
    fn due(&mut self, confirmed_ms: i64) -> Vec<Sample> {
        let mut out = Vec::new();
        for (sample, from) in self.last.iter_mut().flatten() {
            while *from + self.interval_ms <= confirmed_ms {
                *from += self.interval_ms;
                sample.time_ms = *from;
                sample.server_time_ms = None;
                out.push(sample.clone());
            }
        }
        out
    }
}

fn monitored_item(config: &OpcUaConfig, tag: usize, node: NodeId) -> MonitoredItemCreateRequest {
    let t = &config.tags[tag];
    let deadband = t.deadband.unwrap_or(config.deadband);
    let filter = if deadband == Deadband::None {
        ExtensionObject::null()
    } else {
        ExtensionObject::from_message(DataChangeFilter {
            trigger: DataChangeTrigger::StatusValue,
            deadband_type: match deadband {
                Deadband::Absolute => 1,
                Deadband::Percent => 2,
                Deadband::None => 0,
            },
            deadband_value: t.deadband_value.unwrap_or(config.deadband_value),
        })
    };
    MonitoredItemCreateRequest {
        item_to_monitor: read_value_id(node),
        monitoring_mode: MonitoringMode::Reporting,
        requested_parameters: MonitoringParameters {
            client_handle: tag as u32 + 1,
            sampling_interval: t
                .sampling_interval
                .unwrap_or(config.sampling_interval)
                .as_secs_f64()
                * 1000.0,
            filter,
            queue_size: config.queue_size_for(t),
            discard_oldest: true,
        },
    }
}

/// Subscriptions a lost session leaves on the server, for the next session
/// to take over with TransferSubscriptions.
pub(crate) struct Carried {
    /// Hash of the resolved NodeIds: a transfer is only tried when they are
    /// the same (a server restart can move namespace indexes).
    nodes_key: u64,
    subscriptions: Vec<Tracked>,
}

/// A subscription of this collector on the server, and what its callback
/// records.
pub(crate) struct Tracked {
    id: u32,
    received: Arc<AtomicU32>,
    heard: Heartbeat,
    published: Arc<AtomicI64>,
    /// Publishing interval × keep-alive count, as the server revised them:
    /// the longest a live subscription stays silent.
    keep_alive_period: Duration,
}

fn nodes_key(nodes: &[Result<NodeId, u32>]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    nodes.hash(&mut h);
    h.finish()
}

/// Subscription parameters: keep-alive every `KEEP_ALIVE_COUNT` publishing
/// intervals; a lifetime long enough for the subscriptions to outlive a
/// network cut of up to `session_timeout`, so the next session can take
/// them over (at least the 3 keep-alives OPC UA requires).
const KEEP_ALIVE_COUNT: u32 = 10;

fn lifetime_count(config: &OpcUaConfig) -> u32 {
    let intervals =
        config.session_timeout.as_secs_f64() / config.publishing_interval.as_secs_f64().max(0.001);
    (intervals.ceil().min(f64::from(u32::MAX)) as u32).max(KEEP_ALIVE_COUNT * 3)
}

async fn subscribe_and_forward(
    config: &OpcUaConfig,
    conn: &mut Connection,
    nodes: &[Result<NodeId, u32>],
    conversions: Vec<Conversion>,
    sink: &PointSink,
    cancel: &CancellationToken,
    across: &mut Across,
) -> Result<SessionEnd, OpcUaError> {
    let Across { carried, order, .. } = across;
    let session = conn.session.clone();
    let (tx, mut data) = mpsc::unbounded_channel();
    let overflows = Arc::new(AtomicU64::new(0));
    let callback = Notifications {
        conversions: conversions.into(),
        tx,
        overflows: overflows.clone(),
        received: Arc::new(AtomicU32::new(0)),
        heard: Heartbeat::new(),
        published: Arc::new(AtomicI64::new(0)),
        republished: false,
    };
    let key = nodes_key(nodes);
    let transferred = match carried.take() {
        Some(c) if c.nodes_key == key => transfer(config, &session, c, &callback).await?,
        _ => None,
    };
    let subscriptions = match transferred {
        Some(s) => s,
        None => create_subscriptions(config, &session, nodes, &callback, sink).await?,
    };
    *carried = Some(Carried {
        nodes_key: key,
        subscriptions,
    });
    drop(callback);
    let subscriptions = &carried.as_ref().expect("set above").subscriptions;
    // Each subscription's silence counts from now (a transferred one was
    // silent during the cut).
    let mut watches: Vec<StallWatch> = subscriptions
        .iter()
        .map(|t| {
            t.heard.beat();
            StallWatch::new(t.heard.clone(), t.keep_alive_period, config.stall_intervals)
        })
        .collect();
    // The session counts as answering while its keep-alive Read succeeded
    // within this.
    let session_alive = Heartbeat::new();
    let session_limit = config.keep_alive_interval * (config.keep_alive_failures + 1);
    let mut tick = tokio::time::interval(config.publishing_interval.min(Duration::from_secs(1)));
    let mut overflows_logged = 0;
    let mut hold = Hold::new(order.first_tag, nodes.len(), config.publishing_interval);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(SessionEnd::Stopped),
            batch = data.recv() => {
                let Some(mut batch) = batch else {
                    return Ok(SessionEnd::Lost(StatusCode::BadSubscriptionIdInvalid));
                };
                if !batch.republished {
                    order.restamp(&mut batch.samples);
                    hold.delivered(&batch.samples, batch.published_ms);
                    batch.published.fetch_max(batch.published_ms, Ordering::Relaxed);
                }
                if batch.samples.is_empty() {
                    continue;
                }
                if !sink.send(batch.samples).await {
                    return Ok(SessionEnd::Stopped);
                }
            }
            event = conn.events.recv() => match event {
                Some(LoopEvent::SessionAlive | LoopEvent::Connected) => session_alive.beat(),
                Some(LoopEvent::Lost(s) | LoopEvent::Ended(s)) => return Ok(SessionEnd::Lost(s)),
                None => return Ok(SessionEnd::Lost(StatusCode::BadConnectionClosed)),
            },
            _ = tick.tick() => {
                if let Some(silent) = watches.iter_mut().find_map(StallWatch::check) {
                    if session_alive.silent_for() <= session_limit {
                        return Ok(SessionEnd::Stalled { silent });
                    }
                    warn!(device = %config.id, ?silent, "opc ua watchdog: no publish response and no session keep-alive");
                    return Ok(SessionEnd::Lost(StatusCode::BadTimeout));
                }
                // What every subscription's publish responses confirm.
                let confirmed = subscriptions
                    .iter()
                    .map(|t| t.published.load(Ordering::Relaxed))
                    .min()
                    .unwrap_or(0);
                if config.repeat_unchanged {
                    let held = hold.due(confirmed);
                    if !held.is_empty() && !sink.send(held).await {
                        return Ok(SessionEnd::Stopped);
                    }
                }
                let o = overflows.load(Ordering::Relaxed);
                if o > overflows_logged {
                    warn!(device = %config.id, overflows = o, "server queues overflowed: values were dropped before reaching the gateway");
                    overflows_logged = o;
                }
            }
        }
    }
}

/// Moves the lost session's subscriptions to this session
/// (TransferSubscriptions, OPC UA Part 4 5.13.7), then republishes the
/// notifications the server sent that never arrived, so a network cut
/// shorter than the subscriptions' lifetime loses nothing the server's
/// queues held. None when the server no longer has them all (server
/// restarted, lifetime over, another user): those it has are deleted and
/// the caller creates new ones.
async fn transfer(
    config: &OpcUaConfig,
    session: &Arc<Session>,
    carried: Carried,
    callback: &Notifications,
) -> Result<Option<Vec<Tracked>>, OpcUaError> {
    let ids: Vec<u32> = carried.subscriptions.iter().map(|t| t.id).collect();
    // Known to the stack before the server moves them, so that no publish
    // response of theirs is dropped as unknown.
    for t in &carried.subscriptions {
        let callback = Notifications {
            received: t.received.clone(),
            heard: t.heard.clone(),
            published: t.published.clone(),
            ..callback.clone()
        };
        session
            .subscription_state()
            .lock()
            .add_subscription(Subscription::new(
                t.id,
                config.publishing_interval,
                lifetime_count(config),
                KEEP_ALIVE_COUNT,
                0,
                0,
                true,
                Box::new(callback),
            ));
    }
    // A server without the service answers with a fault: recreate, as when
    // it refuses. Initial values: the server sends every item's current
    // value again, so a tag that does not change gets a value after the gap.
    let results = session
        .transfer_subscriptions(&ids, true)
        .await
        .unwrap_or_else(|e| {
            vec![TransferResult {
                status_code: e.status(),
                available_sequence_numbers: None,
            }]
        });
    if let Some(refused) = results
        .iter()
        .map(|r| r.status_code)
        .chain((results.len() < ids.len()).then_some(StatusCode::BadUnexpectedError))
        .find(|s| !s.is_good())
    {
        info!(device = %config.id, %refused, "opc ua subscriptions not transferred; creating new ones");
        session
            .delete_subscriptions(&ids)
            .await
            .map_err(|e| OpcUaError::status("DeleteSubscriptions", err_status(e)))?;
        return Ok(None);
    }
    session.trigger_publish_now();
    let history = Notifications {
        republished: true,
        ..callback.clone()
    };
    let mut republished = 0usize;
    for (t, result) in carried.subscriptions.iter().zip(&results) {
        let (id, seen) = (t.id, t.received.load(Ordering::Relaxed));
        for seq in result.available_sequence_numbers.iter().flatten() {
            if *seq <= seen {
                continue;
            }
            match session.republish(id, *seq).await {
                Ok(message) => {
                    history.forward(message);
                    republished += 1;
                }
                Err(e) => {
                    warn!(device = %config.id, subscription = id, seq, status = %e.status(), "a notification sent during the outage cannot be republished");
                }
            }
        }
    }
    info!(device = %config.id, subscriptions = ids.len(), republished, "opc ua subscriptions transferred to the new session");
    Ok(Some(carried.subscriptions))
}

/// Creates the subscriptions and monitored items of every resolved node.
async fn create_subscriptions(
    config: &OpcUaConfig,
    session: &Arc<Session>,
    nodes: &[Result<NodeId, u32>],
    callback: &Notifications,
    sink: &PointSink,
) -> Result<Vec<Tracked>, OpcUaError> {
    let per_call = match config.max_items_per_call {
        Some(n) => n as usize,
        None => server_limit(
            session,
            VariableId::Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
        )
        .await
        .unwrap_or(DEFAULT_PER_CALL),
    };
    let conversions = callback.conversions.clone();
    let mut ids = vec![new_subscription(config, session, callback).await?];
    let mut subscription = ids[0].id;
    // Tags still to create, by index: requests are built one batch at a time.
    let mut pending: std::collections::VecDeque<usize> = nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| n.is_ok().then_some(i))
        .collect();
    let (mut created, mut revised_down) = (0usize, 0usize);
    let mut refused = Vec::new();
    let mut batch_size = per_call.max(1);
    let mut in_subscription = 0usize;
    let now = now_ms();
    while !pending.is_empty() {
        let n = batch_size.min(pending.len());
        let batch: Vec<MonitoredItemCreateRequest> = pending
            .iter()
            .take(n)
            .filter_map(|&i| Some(monitored_item(config, i, nodes[i].clone().ok()?)))
            .collect();
        // The raw service, not `Session::create_monitored_items`: the stack
        // would keep its own record of every item (NodeId, parameters, two
        // map entries), which nothing here reads: the callback maps client
        // handles to tags itself.
        let results = match CreateMonitoredItems::new(subscription, session)
            .timestamps_to_return(TimestampsToReturn::Both)
            .items_to_create(batch)
            .send(session.channel())
            .await
        {
            Ok(r) => r.results,
            // The subscription is full (or the batch is larger than a
            // subscription may hold): a new subscription, or smaller batches.
            Err(e) if e.status() == StatusCode::BadTooManyMonitoredItems => {
                if in_subscription == 0 {
                    if batch_size == 1 {
                        return Err(OpcUaError::status("CreateMonitoredItems", e.status()));
                    }
                    batch_size = (batch_size / 2).max(1);
                } else {
                    ids.push(new_subscription(config, session, callback).await?);
                    subscription = ids[ids.len() - 1].id;
                    in_subscription = 0;
                }
                continue;
            }
            Err(e) => return Err(OpcUaError::status("CreateMonitoredItems", err_status(e))),
        };
        pending.drain(..n);
        in_subscription += n;
        let mut full = Vec::new();
        for res in results {
            let status = res.result.status_code;
            let tag = res.requested_parameters.client_handle as usize - 1;
            if status == StatusCode::BadTooManyMonitoredItems {
                full.push(tag);
            } else if status.is_bad() {
                refused.push(Sample::bad(conversions[tag].tag, now, status.bits()));
                debug!(device = %config.id, tag = %config.tags[tag].name, %status, "monitored item refused");
            } else {
                created += 1;
                if res.result.revised_queue_size < res.requested_parameters.queue_size {
                    revised_down += 1;
                }
            }
        }
        if !full.is_empty() {
            for r in full.into_iter().rev() {
                pending.push_front(r);
            }
            ids.push(new_subscription(config, session, callback).await?);
            subscription = ids[ids.len() - 1].id;
            in_subscription = 0;
        }
    }
    if !refused.is_empty() {
        warn!(device = %config.id, refused = refused.len(), first_code = %StatusCode::from(refused[0].code), "the server refused monitored items; those tags are Bad");
        sink.send(refused).await;
    }
    if revised_down > 0 {
        warn!(device = %config.id, items = revised_down, "the server revised queue sizes down: values changing faster than it publishes may be dropped (the overflow bit marks them)");
    }
    info!(device = %config.id, items = created, subscriptions = ids.len(), per_call, "opc ua subscribed");
    Ok(ids)
}

async fn new_subscription(
    config: &OpcUaConfig,
    session: &Session,
    callback: &Notifications,
) -> Result<Tracked, OpcUaError> {
    let received = Arc::new(AtomicU32::new(0));
    let heard = Heartbeat::new();
    let published = Arc::new(AtomicI64::new(0));
    let callback = Notifications {
        received: received.clone(),
        heard: heard.clone(),
        published: published.clone(),
        ..callback.clone()
    };
    let id = session
        .create_subscription(
            config.publishing_interval,
            lifetime_count(config),
            KEEP_ALIVE_COUNT,
            0,
            0,
            true,
            callback,
        )
        .await
        .map_err(|e| OpcUaError::status("CreateSubscription", err_status(e)))?;
    // The server may revise the interval and count up.
    let keep_alive_period = session
        .subscription_state()
        .lock()
        .get(id)
        .map(|s| s.publishing_interval() * s.max_keep_alive_count())
        .unwrap_or(config.publishing_interval * KEEP_ALIVE_COUNT);
    Ok(Tracked {
        id,
        received,
        heard,
        published,
        keep_alive_period,
    })
}

async fn poll(
    config: &OpcUaConfig,
    conn: &mut Connection,
    nodes: &[Result<NodeId, u32>],
    conversions: &[Conversion],
    sink: &PointSink,
    cancel: &CancellationToken,
    order: &mut AfterGap,
) -> Result<SessionEnd, OpcUaError> {
    let session = conn.session.clone();
    let per_call = match config.max_items_per_call {
        Some(n) => n as usize,
        None => server_limit(
            &session,
            VariableId::Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
        )
        .await
        .unwrap_or(DEFAULT_PER_CALL),
    };
    let targets: Vec<(usize, NodeId)> = nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| n.as_ref().ok().map(|n| (i, n.clone())))
        .collect();
    info!(device = %config.id, nodes = targets.len(), interval = ?config.poll_interval, "opc ua polling");
    let mut tick = tokio::time::interval(config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Per tag, the device timestamp of the previous Read.
    let mut device_time: Vec<Option<i64>> = vec![None; nodes.len()];
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(SessionEnd::Stopped),
            event = conn.events.recv() => match event {
                Some(LoopEvent::Lost(s) | LoopEvent::Ended(s)) => return Ok(SessionEnd::Lost(s)),
                None => return Ok(SessionEnd::Lost(StatusCode::BadConnectionClosed)),
                Some(_) => continue,
            },
            _ = tick.tick() => {}
        }
        let mut samples = Vec::with_capacity(targets.len());
        let read_at = now_ms();
        for chunk in targets.chunks(per_call) {
            let ids: Vec<NodeId> = chunk.iter().map(|(_, n)| n.clone()).collect();
            let values = match read_values(&session, &ids).await {
                Ok(v) => v,
                Err(OpcUaError::Status { status, .. }) => return Ok(SessionEnd::Lost(status)),
                Err(e) => return Err(e),
            };
            for ((i, _), dv) in chunk.iter().zip(values) {
                let mut sample = conversions[*i].sample(dv);
                // An unchanged value (its timestamp did not advance) is the
                // value held at this Read: one point per poll, at the
                // Read's time, not the same point again.
                let device = sample.time_ms;
                if device_time[*i].is_some_and(|t| device <= t) {
                    sample.time_ms = read_at;
                    sample.server_time_ms = None;
                }
                device_time[*i] = Some(device);
                samples.push(sample);
            }
        }
        order.restamp(&mut samples);
        if !sink.send(samples).await {
            return Ok(SessionEnd::Stopped);
        }
    }
}

/// Reads each OPC UA device's server identity for the manifest (ApplicationUri,
/// product, BuildInfo, certificate thumbprint, security in use). A server that
/// does not answer within `request_timeout` gets no identity; collection does
/// not wait for it.
pub async fn identify_all(devices: &mut [crate::config::DeviceConfig]) {
    let mut jobs = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        if let crate::config::DeviceConfig::OpcUa(c) = d {
            let c = (**c).clone();
            jobs.push(tokio::spawn(async move {
                // Creating the certificate (an RSA key) is not the server's
                // time: it happens before the timeout starts.
                let r = match build_client(&c) {
                    Ok(mut client) => {
                        tokio::time::timeout(c.request_timeout, identify(&c, &mut client)).await
                    }
                    Err(e) => Ok(Err(e)),
                };
                (i, c.id.clone(), r)
            }));
        }
    }
    for job in jobs {
        let Ok((i, id, r)) = job.await else { continue };
        match r {
            Ok(Ok(identity)) => {
                info!(device = %id, ?identity, "opc ua server identified");
                if let crate::config::DeviceConfig::OpcUa(c) = &mut devices[i] {
                    c.identity = identity;
                }
            }
            Ok(Err(error)) => warn!(%error, device = %id, "opc ua server not identified"),
            Err(_) => {
                warn!(device = %id, "opc ua server not identified: no answer within request_timeout")
            }
        }
    }
}

async fn identify(
    config: &OpcUaConfig,
    client: &mut Client,
) -> Result<std::collections::BTreeMap<String, String>, OpcUaError> {
    let conn = Connection::open(config, client).await?;
    let r = identity_of(&conn).await;
    conn.close().await;
    r
}

pub(crate) async fn identity_of(
    conn: &Connection,
) -> Result<std::collections::BTreeMap<String, String>, OpcUaError> {
    let mut id = std::collections::BTreeMap::new();
    let server = &conn.endpoint.server;
    id.insert(
        "application_uri".into(),
        server.application_uri.as_ref().to_string(),
    );
    id.insert(
        "product_uri".into(),
        server.product_uri.as_ref().to_string(),
    );
    id.insert(
        "application_name".into(),
        server.application_name.text.as_ref().to_string(),
    );
    if let Ok(cert) = X509::from_byte_string(&conn.endpoint.server_certificate) {
        id.insert("certificate_thumbprint".into(), pki::thumbprint(&cert));
    }
    id.insert(
        "security".into(),
        format!(
            "{} {:?}",
            SecurityPolicy::from_uri(conn.endpoint.security_policy_uri.as_ref()).to_str(),
            conn.endpoint.security_mode
        ),
    );
    let fields = [
        (
            "product_name",
            VariableId::Server_ServerStatus_BuildInfo_ProductName,
        ),
        (
            "manufacturer",
            VariableId::Server_ServerStatus_BuildInfo_ManufacturerName,
        ),
        (
            "software_version",
            VariableId::Server_ServerStatus_BuildInfo_SoftwareVersion,
        ),
        (
            "build_number",
            VariableId::Server_ServerStatus_BuildInfo_BuildNumber,
        ),
        (
            "build_date",
            VariableId::Server_ServerStatus_BuildInfo_BuildDate,
        ),
    ];
    let nodes: Vec<NodeId> = fields.iter().map(|(_, v)| (*v).into()).collect();
    let values = read_values(&conn.session, &nodes).await?;
    for ((key, _), dv) in fields.iter().zip(values) {
        if let Some(v) = dv.value
            && dv.status.is_none_or(|s| s.is_good())
        {
            let text = convert::text(&v);
            if !text.is_empty() {
                id.insert((*key).into(), text);
            }
        }
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_opcua::types::{UAString, UserTokenPolicy};

    fn ep(policy: SecurityPolicy, mode: MessageSecurityMode, level: u8) -> EndpointDescription {
        EndpointDescription {
            endpoint_url: UAString::from("opc.tcp://x:4840/"),
            security_policy_uri: UAString::from(policy.to_uri()),
            security_mode: mode,
            security_level: level,
            user_identity_tokens: Some(vec![UserTokenPolicy::anonymous()]),
            ..Default::default()
        }
    }

    #[test]
    fn endpoints_are_reached_at_the_configured_address() {
        let c = "opc.tcp://10.0.0.5:14840/";
        assert_eq!(
            at_address_of("opc.tcp://plc-7.local:4840/UA/Server", c),
            "opc.tcp://10.0.0.5:14840/UA/Server"
        );
        assert_eq!(
            at_address_of("opc.tcp://plc:4840", c),
            "opc.tcp://10.0.0.5:14840"
        );
        assert_eq!(at_address_of("garbage", c), "garbage");
    }

    #[test]
    fn selects_the_most_secure_endpoint_or_the_configured_one() {
        let eps = vec![
            ep(SecurityPolicy::None, MessageSecurityMode::None, 0),
            ep(SecurityPolicy::Basic256Sha256, MessageSecurityMode::Sign, 3),
            ep(
                SecurityPolicy::Basic256Sha256,
                MessageSecurityMode::SignAndEncrypt,
                4,
            ),
            ep(
                SecurityPolicy::Aes128Sha256RsaOaep,
                MessageSecurityMode::SignAndEncrypt,
                5,
            ),
            ep(
                SecurityPolicy::Basic128Rsa15,
                MessageSecurityMode::SignAndEncrypt,
                9,
            ),
        ];
        let pick = |p, m| {
            select_endpoint(&eps, p, m, UserTokenType::Anonymous).map(|e| {
                (
                    SecurityPolicy::from_uri(e.security_policy_uri.as_ref()),
                    e.security_mode,
                )
            })
        };
        use SecurityModeChoice as M;
        use SecurityPolicyChoice as P;
        assert_eq!(
            pick(P::Best, M::Best),
            Some((
                SecurityPolicy::Aes128Sha256RsaOaep,
                MessageSecurityMode::SignAndEncrypt
            ))
        );
        assert_eq!(
            pick(P::Basic256sha256, M::Sign),
            Some((SecurityPolicy::Basic256Sha256, MessageSecurityMode::Sign))
        );
        assert_eq!(
            pick(P::None, M::Best),
            Some((SecurityPolicy::None, MessageSecurityMode::None))
        );
        assert_eq!(pick(P::Aes128Sha256RsaOaep, M::Sign), None);
        assert!(select_endpoint(&eps, P::Best, M::Best, UserTokenType::UserName).is_none());
    }

    #[test]
    fn best_follows_the_servers_security_level() {
        let pick = |eps: &[EndpointDescription]| {
            select_endpoint(
                eps,
                SecurityPolicyChoice::Best,
                SecurityModeChoice::Best,
                UserTokenType::Anonymous,
            )
            .map(|e| {
                (
                    SecurityPolicy::from_uri(e.security_policy_uri.as_ref()),
                    e.security_mode,
                )
            })
        };
        use MessageSecurityMode as M;
        use SecurityPolicy as P;
        // asyncua's levels: Aes256Sha256RsaPss SignAndEncrypt is its highest.
        let asyncua = [
            ep(P::None, M::None, 0),
            ep(P::Basic256Sha256, M::Sign, 50),
            ep(P::Basic256Sha256, M::SignAndEncrypt, 70),
            ep(P::Aes128Sha256RsaOaep, M::SignAndEncrypt, 75),
            ep(P::Aes256Sha256RsaPss, M::Sign, 60),
            ep(P::Aes256Sha256RsaPss, M::SignAndEncrypt, 80),
        ];
        assert_eq!(
            pick(&asyncua),
            Some((P::Aes256Sha256RsaPss, M::SignAndEncrypt))
        );
        // A server that rates Basic256Sha256 Sign above the rest gets it,
        // whatever this gateway's own order of policies and modes.
        let rated = [
            ep(P::Basic256Sha256, M::Sign, 200),
            ep(P::Aes256Sha256RsaPss, M::SignAndEncrypt, 100),
        ];
        assert_eq!(pick(&rated), Some((P::Basic256Sha256, M::Sign)));
        // Equal levels: SignAndEncrypt, then the stronger policy.
        let equal = [
            ep(P::Aes256Sha256RsaPss, M::Sign, 1),
            ep(P::Basic256Sha256, M::SignAndEncrypt, 1),
            ep(P::Aes128Sha256RsaOaep, M::SignAndEncrypt, 1),
        ];
        assert_eq!(
            pick(&equal),
            Some((P::Aes128Sha256RsaOaep, M::SignAndEncrypt))
        );
    }

    #[test]
    fn url_host_is_the_host_without_port_or_path() {
        assert_eq!(url_host("opc.tcp://127.0.0.1:4840/UA"), "127.0.0.1");
        assert_eq!(url_host("opc.tcp://plc-7.local:4840"), "plc-7.local");
        assert_eq!(url_host("opc.tcp://[::1]:4840/"), "::1");
        assert_eq!(url_host("opc.tcp://vm/"), "vm");
    }

    #[test]
    fn held_values_repeat_once_per_interval_up_to_the_confirmed_time() {
        let mut hold = Hold::new(10, 2, Duration::from_millis(100));
        let value = guantong_proto::v1::point::Value::Double(1.5);
        let good = Sample::good(10, 500, value.clone());
        let bad = Sample::bad(11, 500, quality::OPCUA_CONNECTION_LOST);
        // Published at 1000: held from then.
        hold.delivered(&[good, bad], 1_000);
        assert!(hold.due(1_099).is_empty(), "not yet one interval");
        assert_eq!(
            hold.due(1_100),
            vec![Sample::good(10, 1_100, value.clone())]
        );
        assert!(hold.due(1_150).is_empty(), "once per interval");
        // A keep-alive confirms several intervals at once: one point each.
        let times: Vec<i64> = hold.due(1_420).iter().map(|s| s.time_ms).collect();
        assert_eq!(times, vec![1_200, 1_300, 1_400]);
        // A Bad point ends the hold.
        hold.delivered(&[Sample::bad(10, 1_450, quality::STALLED)], 1_450);
        assert!(hold.due(5_000).is_empty());
        // A source timestamp after the publish time: held from it.
        hold.delivered(&[Sample::good(11, 2_000, value.clone())], 1_900);
        assert_eq!(hold.due(2_050), vec![]);
        assert_eq!(hold.due(2_100).len(), 1);
    }
}
