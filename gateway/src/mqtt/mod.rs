//! MQTT collector: one persistent session per device on its broker.
//!
//! Design
//! - rumqttc (MQTT 3.1.1 `rumqttc::`, MQTT 5 `rumqttc::v5::`) behind one
//!   small `Session` enum, so the loop below is written once.
//! - Persistent session: clean session off (MQTT 5: clean start off and a
//!   session expiry), a stable client id. rumqttc neither backs off nor
//!   resubscribes: after a failed poll we wait (exponential backoff with
//!   jitter, up to `max_backoff`), and whenever a ConnAck says
//!   `session_present = false` we subscribe every filter again (and on the
//!   first connect of the process, since a saved session holds the filters
//!   of the config it was made with; filters since removed stay in it and
//!   their messages match no tag, so they are acknowledged and ignored).
//! - Nothing acknowledged is lost: QoS 1 messages are acknowledged by hand
//!   (`manual_acks`) only once the writer has committed their samples to the
//!   buffer (`PointSink::send_committed`); a SIGKILL before that makes the
//!   broker deliver them again. The price is at-least-once: a kill between
//!   commit and PUBACK stores a message twice.
//! - Messages already read from the socket are decoded and handed over
//!   together (one commit for all of them), which is what keeps QoS 1 fast.
//! - A payload that does not decode is counted (`malformed`), logged at most
//!   once per `WARN_EVERY` with topic and reason, and its matching tags get a
//!   Bad point; the loop never stops for it.
//! - Liveness from data (`liveness`), where `interval` is declared: every
//!   message beats the device's heartbeat; a task of its own watches it
//!   while the broker connection is up (so the poll loop is never
//!   interrupted) and on a stall marks every tag Bad `STALLED` once, logs
//!   once and subscribes the filters again.
//! - A device with `primary_host_id` announces the gateway as the Sparkplug
//!   primary host (`state`): its session is clean, the offline STATE is its
//!   will, re-armed with a new timestamp before every connect attempt.

pub mod config;
pub mod decode;
pub mod probe;
pub mod sparkplug;
pub mod state;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::collector::{Collector, PointSink};
use crate::liveness::{Heartbeat, StallWatch};
use crate::quality::{self, Sample, now_ms};
use config::{MqttConfig, MqttVersion, PayloadFormat};
use decode::Mapping;
use sparkplug::{NodeRegistry, SparkplugNode};

/// Most one malformed-payload warning per device per this interval.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// First reconnect delay; doubles up to `max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Publishes handed over in one commit, at most.
const MAX_GROUP: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("cannot read {path}: {error}")]
    File { path: String, error: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// One received message, whichever protocol version carried it.
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    ack: Option<Box<AckToken>>,
}

enum AckToken {
    V4(rumqttc::Publish),
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

/// What one poll of the event loop produced.
pub enum Polled {
    Connected {
        session_present: bool,
    },
    Message(Message),
    /// The broker answered a subscription; the codes it refused, if any
    /// (e.g. not authorized by its ACL).
    Subscribed {
        refused: Vec<String>,
    },
    Other,
}

/// A client and its event loop, MQTT 3.1.1 or 5.
pub enum Session {
    V4(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
    V5(rumqttc::v5::AsyncClient, Box<rumqttc::v5::EventLoop>),
}

#[derive(Clone)]
pub enum Acker {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Acker {
    async fn ack(&self, token: &AckToken) {
        let r = match (self, token) {
            (Acker::V4(c), AckToken::V4(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            (Acker::V5(c), AckToken::V5(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            _ => Ok(()),
        };
        if let Err(e) = r {
            debug!(error = %e, "mqtt ack not sent (the message will be delivered again)");
        }
    }

    /// Publishes at QoS 0, not retained (Sparkplug NCMD).
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        self.send(topic, payload, false).await
    }

    /// Publishes at QoS 1, retained (Sparkplug STATE).
    pub async fn publish_state(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        self.send(topic, payload, true).await
    }

    async fn send(&self, topic: &str, payload: Vec<u8>, state: bool) -> Result<(), String> {
        match self {
            Acker::V4(c) => {
                use rumqttc::QoS;
                let qos = if state {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                };
                c.publish(topic, qos, state, payload).await
            }
            .map_err(|e| e.to_string()),
            Acker::V5(c) => {
                use rumqttc::v5::mqttbytes::QoS;
                let qos = if state {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                };
                c.publish(topic, qos, state, payload).await
            }
            .map_err(|e| e.to_string()),
        }
    }

    pub async fn disconnect(&self) -> Result<(), String> {
        match self {
            Acker::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Acker::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        }
    }

    /// Subscribes every filter (after a connect without a saved session).
    pub async fn subscribe(&self, filters: &[String], qos: u8) -> Result<(), String> {
        match self {
            Acker::V4(c) => {
                let q = if qos == 0 {
                    rumqttc::QoS::AtMostOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                };
                c.subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), q)),
                )
                .await
                .map_err(|e| e.to_string())
            }
            Acker::V5(c) => {
                use rumqttc::v5::mqttbytes::{QoS, v5::Filter};
                let q = if qos == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                c.subscribe_many(filters.iter().map(|f| Filter::new(f.clone(), q)))
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }
}

impl Session {
    /// Builds the client for `config` (does not connect yet).
    /// `persistent`: keep the session on the broker (the collector); off
    /// for a look that must leave no trace (`probe`).
    pub fn new(
        config: &MqttConfig,
        client_id: &str,
        persistent: bool,
        manual_acks: bool,
    ) -> Result<Session, MqttError> {
        let addr = config.broker_addr();
        let tls = if addr.tls {
            Some(tls_config(config)?)
        } else {
            None
        };
        let credentials = config
            .username
            .as_ref()
            .map(|u| (u.clone(), config.password.clone().unwrap_or_default()));
        Ok(match config.mqtt_version {
            MqttVersion::V311 => {
                let mut o = rumqttc::MqttOptions::new(client_id, &addr.host, addr.port);
                o.set_keep_alive(config.keep_alive)
                    .set_clean_session(!persistent)
                    .set_manual_acks(manual_acks)
                    .set_max_packet_size(1 << 20, 1 << 20)
                    .set_request_channel_capacity(MAX_GROUP * 2);
                if let Some((u, p)) = credentials {
                    o.set_credentials(u, p);
                }
                if let Some(t) = tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(t));
                }
                let (c, e) = rumqttc::AsyncClient::new(o, MAX_GROUP * 2);
                Session::V4(c, Box::new(e))
            }
            MqttVersion::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(client_id, &addr.host, addr.port);
                o.set_keep_alive(config.keep_alive)
                    .set_clean_start(!persistent)
                    .set_session_expiry_interval(persistent.then(|| {
                        u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX)
                    }))
                    .set_manual_acks(manual_acks)
                    .set_max_packet_size(Some(1 << 20))
                    .set_request_channel_capacity(MAX_GROUP * 2);
                if let Some((u, p)) = credentials {
                    o.set_credentials(u, p);
                }
                if let Some(t) = tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(t));
                }
                let (c, e) = rumqttc::v5::AsyncClient::new(o, MAX_GROUP * 2);
                Session::V5(c, Box::new(e))
            }
        })
    }

    /// Gives the next CONNECT the primary host's offline STATE as its will
    /// (QoS 1, retained), under a new timestamp.
    pub fn arm_state_will(&mut self, host: &mut state::Announcer) {
        let (topic, payload) = (host.topic.clone(), host.next_connect());
        match self {
            Session::V4(_, e) => {
                e.mqtt_options.set_last_will(rumqttc::LastWill::new(
                    topic,
                    payload,
                    rumqttc::QoS::AtLeastOnce,
                    true,
                ));
            }
            Session::V5(_, e) => {
                use rumqttc::v5::mqttbytes::{QoS, v5::LastWill};
                e.options.set_last_will(LastWill::new(
                    topic,
                    payload,
                    QoS::AtLeastOnce,
                    true,
                    None,
                ));
            }
        }
    }

    pub fn acker(&self) -> Acker {
        match self {
            Session::V4(c, _) => Acker::V4(c.clone()),
            Session::V5(c, _) => Acker::V5(c.clone()),
        }
    }

    /// Next event; an error means the connection is down (the next call
    /// reconnects).
    pub async fn poll(&mut self) -> Result<Polled, String> {
        match self {
            Session::V4(_, e) => {
                use rumqttc::{Event, Packet};
                match e.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(c)) => Ok(Polled::Connected {
                        session_present: c.session_present,
                    }),
                    Event::Incoming(Packet::Publish(p)) => Ok(Polled::Message(Message {
                        topic: p.topic.clone(),
                        payload: p.payload.clone(),
                        ack: (p.qos != rumqttc::QoS::AtMostOnce)
                            .then_some(Box::new(AckToken::V4(p))),
                    })),
                    _ => Ok(Polled::Other),
                }
            }
            Session::V5(_, e) => {
                use rumqttc::v5::Event;
                use rumqttc::v5::mqttbytes::QoS;
                use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
                match e.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(c)) => Ok(Polled::Connected {
                        session_present: c.session_present,
                    }),
                    Event::Incoming(Packet::Publish(p)) => Ok(Polled::Message(Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.clone(),
                        ack: (p.qos != QoS::AtMostOnce).then_some(Box::new(AckToken::V5(p))),
                    })),
                    Event::Incoming(Packet::SubAck(s)) => Ok(Polled::Subscribed {
                        refused: s
                            .return_codes
                            .iter()
                            .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                            .map(|c| format!("{c:?}"))
                            .collect(),
                    }),
                    _ => Ok(Polled::Other),
                }
            }
        }
    }

    /// Whether the event loop holds events already read from the socket
    /// (the next `poll` returns without waiting for the network).
    pub fn has_buffered(&self) -> bool {
        match self {
            Session::V4(_, e) => !e.state.events.is_empty(),
            Session::V5(_, e) => !e.state.events.is_empty(),
        }
    }
}

/// rustls on the ring provider with the configured CA and optional client
/// certificate. The ring provider is also installed as the process default,
/// so nothing else in the process picks a second provider.
fn tls_config(config: &MqttConfig) -> Result<rumqttc::TlsConfiguration, MqttError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let file_err = |p: &std::path::Path, e: &dyn std::fmt::Display| MqttError::File {
        path: p.display().to_string(),
        error: e.to_string(),
    };
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &config.ca_file {
        let certs = CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca, &e))?;
        for cert in certs {
            let cert = cert.map_err(|e| file_err(ca, &e))?;
            roots.add(cert).map_err(|e| file_err(ca, &e))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let tls = match (&config.client_cert_file, &config.client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| file_err(cert, &e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_err(cert, &e))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, &e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| MqttError::Tls(e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(tls)))
}

/// Exponential backoff with jitter: each wait is drawn from [d/2, d], d
/// doubling from `FIRST_BACKOFF` to `max`.
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Backoff {
        Backoff {
            next: FIRST_BACKOFF.min(max),
            max,
        }
    }
    pub fn reset(&mut self) {
        self.next = FIRST_BACKOFF.min(self.max);
    }
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }
}

/// Turns messages into samples for one device: JSON/plain by mapping,
/// Sparkplug B through the node's state.
pub enum Decoder {
    Mapped(Mapping),
    Sparkplug(Box<SparkplugNode>),
}

/// Why a message yielded Bad points or nothing, for counting and logging.
pub struct Rejected {
    pub reason: String,
    /// The whole message was unreadable (else one value of it was bad and
    /// the others were stored).
    pub whole_message: bool,
}

/// What applying one message gave besides its samples.
#[derive(Default)]
pub struct Applied {
    pub rejected: Option<Rejected>,
    /// Sparkplug: why the edge node should be asked for its births.
    pub rebirth: Option<String>,
}

impl Decoder {
    pub fn new(config: &MqttConfig) -> Decoder {
        match config.payload {
            PayloadFormat::Sparkplug => Decoder::Sparkplug(Box::new(SparkplugNode::new(config))),
            PayloadFormat::Json | PayloadFormat::Plain => Decoder::Mapped(Mapping::new(config)),
        }
    }

    /// Appends the samples of one message (tags by device index, mapped to
    /// manifest ids through `ids`) and returns what was wrong with it, if
    /// anything.
    pub fn apply(
        &mut self,
        topic: &str,
        payload: &[u8],
        arrival_ms: i64,
        ids: &[u32],
        out: &mut Vec<Sample>,
    ) -> Applied {
        let mut applied = Applied::default();
        match self {
            Decoder::Mapped(m) => {
                let matching = m.matching(topic);
                if matching.is_empty() {
                    return applied;
                }
                match m.decode(&matching, payload, arrival_ms) {
                    Ok((time, values)) => {
                        for v in values {
                            out.push(match v.value {
                                Ok(x) => Sample::good(ids[v.tag], time, x),
                                Err(reason) => {
                                    applied.rejected = Some(Rejected {
                                        reason,
                                        whole_message: false,
                                    });
                                    Sample::bad(ids[v.tag], time, quality::MQTT_TYPE_MISMATCH)
                                }
                            });
                        }
                    }
                    Err(e) => {
                        out.extend(matching.iter().map(|&i| {
                            Sample::bad(ids[i], arrival_ms, quality::MQTT_MALFORMED_PAYLOAD)
                        }));
                        applied.rejected = Some(Rejected {
                            reason: e.to_string(),
                            whole_message: true,
                        });
                    }
                }
            }
            Decoder::Sparkplug(node) => {
                let handled = match node.handle(topic, payload, arrival_ms) {
                    Ok(h) => h,
                    Err(e) => {
                        let reason = e.to_string();
                        // Bad points only for a message that was ours to read.
                        if node.is_our_data(topic) {
                            out.extend(node.mark_malformed(arrival_ms, &reason).iter().map(|i| {
                                Sample::bad(ids[i.tag], i.time_ms, quality::MQTT_MALFORMED_PAYLOAD)
                            }));
                        }
                        applied.rejected = Some(Rejected {
                            reason,
                            whole_message: true,
                        });
                        return applied;
                    }
                };
                // A gap, a death or an unknown alias marks many tags: say so
                // once, and once per node for all its configured devices.
                let mut state: Option<String> = None;
                for i in handled.items {
                    out.push(match i.value {
                        Ok(x) => Sample::good(ids[i.tag], i.time_ms, x),
                        Err((code, reason)) => {
                            if code == quality::MQTT_TYPE_MISMATCH
                                || code == quality::SPARKPLUG_NULL
                            {
                                applied.rejected = Some(Rejected {
                                    reason,
                                    whole_message: false,
                                });
                            } else if state.as_deref() != Some(reason.as_str()) {
                                state = Some(reason);
                            }
                            Sample::bad(ids[i.tag], i.time_ms, code)
                        }
                    });
                }
                if let Some(reason) = state {
                    let event = format!("{topic}: {reason}");
                    if NodeRegistry::global().first_to_warn(&node.key(), &event, Instant::now()) {
                        warn!(topic, reason, "sparkplug node: tags marked Bad");
                    }
                }
                applied.rebirth = handled.rebirth;
            }
        }
        applied
    }

    /// The rebirth request of a Sparkplug node (`key`, NCMD topic, payload),
    /// if it may be sent now (rate limit shared by the whole process).
    pub fn claim_rebirth(&self) -> Option<(String, String, Vec<u8>)> {
        let Decoder::Sparkplug(node) = self else {
            return None;
        };
        let key = node.key();
        if !NodeRegistry::global().claim_rebirth(&key, Instant::now()) {
            return None;
        }
        let (topic, payload) = node.rebirth_request(now_ms());
        Some((key, topic, payload))
    }

    /// Whether this is a Sparkplug node without a known session (no NBIRTH
    /// seen since start or since its death).
    pub fn needs_birth(&self) -> bool {
        matches!(self, Decoder::Sparkplug(node) if !node.is_born())
    }
}

pub struct MqttCollector {
    config: MqttConfig,
    /// Manifest index of each of `config.tags`.
    tag_ids: Vec<u32>,
}

impl MqttCollector {
    pub fn new(config: MqttConfig, tag_ids: Vec<u32>) -> MqttCollector {
        MqttCollector { config, tag_ids }
    }
}

/// Counts malformed payloads and rate-limits their warnings.
struct Malformed {
    device: String,
    total: u64,
    since_warn: u64,
    last_warn: Option<Instant>,
}

impl Malformed {
    fn record(&mut self, topic: &str, rejected: &Rejected) {
        self.total += 1;
        self.since_warn += 1;
        if self.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            let reason = rejected.reason.as_str();
            let what = if rejected.whole_message {
                "mqtt payload rejected"
            } else {
                "mqtt value stored Bad (the message's other values were stored)"
            };
            warn!(
                device = %self.device,
                topic,
                reason,
                malformed_since_last_warning = self.since_warn,
                guantong_mqtt_malformed_payloads_total = self.total,
                "{what}"
            );
            self.last_warn = Some(Instant::now());
            self.since_warn = 0;
        }
    }
}

impl Collector for MqttCollector {
    async fn run(self, sink: PointSink, cancel: CancellationToken) {
        let config = self.config;
        let ids = self.tag_ids;
        let mut host = state::Announcer::for_device(&config);
        let mut filters = config.filters();
        if let Some(h) = &host {
            filters.push(h.topic.clone());
        }
        let client_id = config.client_id();
        let manual_acks = config.qos > 0;
        // A primary host keeps no session on the broker (`state`).
        let persistent = host.is_none();
        let mut session = match Session::new(&config, &client_id, persistent, manual_acks) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(device = %config.id, error = %e, "mqtt device cannot start");
                let all: Vec<Sample> = ids
                    .iter()
                    .map(|&id| Sample::bad(id, now_ms(), quality::CONNECT_FAILED))
                    .collect();
                sink.send(all).await;
                cancel.cancelled().await;
                return;
            }
        };
        if let Some(h) = &mut host {
            session.arm_state_will(h);
        }
        let acker = session.acker();
        let acks_out = spawn_acker(acker.clone());
        let heartbeat = Heartbeat::new();
        let broker_up = Arc::new(AtomicBool::new(false));
        if !config.interval.is_zero() {
            let watch = StallWatch::new(heartbeat.clone(), config.interval, config.stall_intervals);
            tokio::spawn(watch_for_stall(
                Stalling {
                    device: config.id.clone(),
                    ids: ids.clone(),
                    filters: filters.clone(),
                    qos: config.qos,
                    broker_up: broker_up.clone(),
                },
                watch,
                sink.clone(),
                acker.clone(),
                cancel.clone(),
            ));
        }
        let mut decoder = Decoder::new(&config);
        let mut backoff = Backoff::new(config.max_backoff);
        let mut malformed = Malformed {
            device: config.id.clone(),
            total: 0,
            since_warn: 0,
            last_warn: None,
        };
        let mut connected = false;
        let mut first_connect = true;
        let mut last_error: Option<String> = None;
        let mut samples: Vec<Sample> = Vec::new();
        let mut acks: Vec<AckToken> = Vec::new();
        let mut received: u64 = 0;
        info!(device = %config.id, broker = %config.broker, client_id, filters = ?filters, "mqtt collector starting");
        loop {
            // Only the cancel branch leaves the loop; a poll interrupted by
            // it loses nothing that was acknowledged.
            let polled = tokio::select! {
                _ = cancel.cancelled() => break,
                p = session.poll() => p,
            };
            match polled {
                Ok(Polled::Connected { session_present }) => {
                    connected = true;
                    heartbeat.beat();
                    broker_up.store(true, Ordering::Relaxed);
                    last_error = None;
                    backoff.reset();
                    info!(device = %config.id, session_present, "mqtt connected");
                    // Subscribe on the first connect of this process too: a
                    // saved session holds the filters of the config it was
                    // made with, which may have changed since.
                    if !session_present || first_connect {
                        first_connect = false;
                        // Asked after the subscription (same connection, so
                        // the broker has it first): the births that answer
                        // reach us.
                        let rebirth = decoder
                            .needs_birth()
                            .then(|| decoder.claim_rebirth())
                            .flatten();
                        let (acker, filters, qos, id, host) = (
                            acker.clone(),
                            filters.clone(),
                            config.qos,
                            config.id.clone(),
                            host.clone(),
                        );
                        // In its own task: the request channel is drained by
                        // the poll loop below.
                        tokio::spawn(async move {
                            if let Err(e) = acker.subscribe(&filters, qos).await {
                                warn!(device = %id, error = %e, "mqtt subscribe failed");
                            }
                            if let Some(h) = host {
                                announce_online(&acker, &h, &id).await;
                            }
                            if let Some((node, topic, payload)) = rebirth {
                                info!(
                                    node,
                                    reason = "no birth certificate since start",
                                    "sparkplug rebirth requested"
                                );
                                if let Err(e) = acker.publish(&topic, payload).await {
                                    warn!(node, error = %e, "sparkplug rebirth request not sent");
                                }
                            }
                        });
                    }
                }
                Ok(Polled::Message(m)) => {
                    if let Some(h) = host.as_ref().filter(|h| h.topic == m.topic) {
                        if state::says_offline(&m.payload) {
                            let (acker, h, id) = (acker.clone(), h.clone(), config.id.clone());
                            tokio::spawn(async move { announce_online(&acker, &h, &id).await });
                        }
                    } else {
                        received += 1;
                        heartbeat.beat();
                        let applied =
                            decoder.apply(&m.topic, &m.payload, now_ms(), &ids, &mut samples);
                        if let Some(r) = &applied.rejected {
                            malformed.record(&m.topic, r);
                        }
                        if let Some(reason) = applied.rebirth {
                            request_rebirth(&decoder, &acker, &reason);
                        }
                    }
                    if let Some(a) = m.ack {
                        acks.push(*a);
                    }
                }
                Ok(Polled::Subscribed { refused }) => {
                    if refused.is_empty() {
                        info!(device = %config.id, filters = ?filters, "mqtt subscribed");
                    } else {
                        tracing::error!(device = %config.id, filters = ?filters, refused = ?refused, "mqtt broker refused a subscription (check its ACL for this user)");
                    }
                }
                Ok(Polled::Other) => {}
                Err(e) => {
                    broker_up.store(false, Ordering::Relaxed);
                    if connected {
                        connected = false;
                        samples.extend(
                            ids.iter().map(|&id| {
                                Sample::bad(id, now_ms(), quality::MQTT_CONNECTION_LOST)
                            }),
                        );
                    }
                    if last_error.as_deref() != Some(e.as_str()) {
                        warn!(device = %config.id, error = %e, received, malformed = malformed.total, "mqtt connection down; reconnecting");
                        last_error = Some(e);
                    }
                    if !hand_over(&sink, &acks_out, &mut samples, &mut acks).await {
                        break;
                    }
                    if let Some(h) = &mut host {
                        session.arm_state_will(h);
                    }
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            }
            // Hand over once the messages already read are decoded, so one
            // commit covers them all.
            if (!session.has_buffered()
                || acks.len() >= MAX_GROUP
                || samples.len() >= 8 * MAX_GROUP)
                && !hand_over(&sink, &acks_out, &mut samples, &mut acks).await
            {
                break;
            }
        }
        let _ = hand_over(&sink, &acks_out, &mut samples, &mut acks).await;
        if let Some(h) = host.filter(|_| connected) {
            announce_offline(&mut session, &acker, &h, &config.id).await;
        }
        info!(device = %config.id, received, malformed = malformed.total, "mqtt collector stopped");
    }
}

/// Publishes the primary host's online STATE (after the subscriptions).
async fn announce_online(acker: &Acker, host: &state::Announcer, device: &str) {
    match acker.publish_state(&host.topic, host.online()).await {
        Ok(()) => info!(device, topic = %host.topic, "sparkplug primary host online"),
        Err(error) => warn!(device, %error, "sparkplug primary host STATE not sent"),
    }
}

/// At a deliberate stop: the offline STATE, then a clean disconnect, waiting
/// (briefly) for the event loop to send both.
async fn announce_offline(
    session: &mut Session,
    acker: &Acker,
    host: &state::Announcer,
    device: &str,
) {
    let sent = async {
        acker.publish_state(&host.topic, host.offline()).await?;
        acker.disconnect().await?;
        // The loop ends with an error once the disconnect went out.
        while session.poll().await.is_ok() {}
        Ok::<(), String>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), sent).await {
        Ok(Ok(())) => info!(device, topic = %host.topic, "sparkplug primary host offline"),
        _ => warn!(
            device,
            "sparkplug primary host offline STATE not confirmed; the broker sends the will"
        ),
    }
}

/// Publishes the Sparkplug rebirth request of `decoder`'s node, unless one
/// went to the node less than `REBIRTH_EVERY` ago.
fn request_rebirth(decoder: &Decoder, acker: &Acker, reason: &str) {
    let Some((node, topic, payload)) = decoder.claim_rebirth() else {
        return;
    };
    info!(node, reason, "sparkplug rebirth requested");
    let acker = acker.clone();
    // In its own task: the request channel is drained by the poll loop.
    tokio::spawn(async move {
        if let Err(e) = acker.publish(&topic, payload).await {
            warn!(node, error = %e, "sparkplug rebirth request not sent");
        }
    });
}

/// What the stall watch of one device needs to know.
struct Stalling {
    device: String,
    ids: Vec<u32>,
    filters: Vec<String>,
    qos: u8,
    broker_up: Arc<AtomicBool>,
}

/// Checks the device's heartbeat while the broker connection is up; on a
/// stall, one Bad point per tag, one log line, and the filters subscribed
/// again (in case the broker lost them).
async fn watch_for_stall(
    s: Stalling,
    mut watch: StallWatch,
    sink: PointSink,
    acker: Acker,
    cancel: CancellationToken,
) {
    let every = (watch.limit() / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !s.broker_up.load(Ordering::Relaxed) {
            continue;
        }
        let Some(silent) = watch.check() else {
            continue;
        };
        warn!(device = %s.device, ?silent, "mqtt device stalled: connected to the broker but no message for stall_intervals × interval; tags marked Bad, subscribing again");
        let now = now_ms();
        let bad = s
            .ids
            .iter()
            .map(|&id| Sample::bad(id, now, quality::STALLED));
        if !sink.send(bad.collect()).await {
            return;
        }
        if let Err(error) = acker.subscribe(&s.filters, s.qos).await {
            warn!(device = %s.device, %error, "mqtt subscribe failed");
        }
    }
}

/// Groups of messages waiting for their commit, in commit order.
type AckQueue =
    tokio::sync::mpsc::UnboundedSender<(tokio::sync::oneshot::Receiver<()>, Vec<AckToken>)>;

/// The one task that acknowledges: waits for each group's commit, in order
/// (the writer commits in order), then sends its PUBACKs. One task, so one
/// sender waits on rumqttc's request channel at a time (a task per group
/// made them queue up there by the thousand). Unbounded: what it holds is
/// bounded by the broker's in-flight window, and the poll loop must never
/// wait for it (the acks it sends need that loop).
fn spawn_acker(acker: Acker) -> AckQueue {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(
        tokio::sync::oneshot::Receiver<()>,
        Vec<AckToken>,
    )>();
    tokio::spawn(async move {
        while let Some((committed, batch)) = rx.recv().await {
            // Dropped (commit failed or shutdown): no ack, the broker
            // delivers the messages again.
            if committed.await.is_ok() {
                for a in &batch {
                    acker.ack(a).await;
                }
            }
        }
    });
    tx
}

/// Sends the samples to the writer; the acknowledging task sends the
/// PUBACKs once they are committed, while the event loop keeps running.
async fn hand_over(
    sink: &PointSink,
    acks_out: &AckQueue,
    samples: &mut Vec<Sample>,
    acks: &mut Vec<AckToken>,
) -> bool {
    if acks.is_empty() {
        return samples.is_empty() || sink.send(std::mem::take(samples)).await;
    }
    let batch = std::mem::take(acks);
    let Some(committed) = sink.send_committed(std::mem::take(samples)).await else {
        return false;
    };
    // Fails only once the acknowledging task is gone (shutdown).
    let _ = acks_out.send((committed, batch));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_limit() {
        let mut b = Backoff::new(Duration::from_secs(2));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        let bounds = [250, 500, 1000, 2000, 2000, 2000];
        for (d, max) in delays.iter().zip(bounds) {
            let max = Duration::from_millis(max);
            assert!(
                *d >= max / 2 && *d <= max,
                "{d:?} not in [{:?}, {max:?}]",
                max / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(250));
    }
}
