//! Rows both backends store in the same shape, and what is decided from
//! them whatever the backend: gateway token records (salted hashes, the
//! previous token of a rotation), signed links as stored, series metadata
//! and running state, and a series as reported from those two.
//!
//! A backend keeps these encoded as it likes (JSON or protobuf bytes in a
//! column or a value); how a series' state advances with a batch's points
//! (`SeriesState::fold`) lives here, once.

use guantong_proto::chain::{Algorithm, PublicKey};
use guantong_proto::v1::{Point, Quality, point::Value};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::rollup::{self, SeriesUpdate};
use super::{Result, SeriesInfo, StoreError};

pub(crate) fn quality_of(p: &Point) -> Quality {
    Quality::try_from(p.quality).unwrap_or(Quality::Bad)
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct GatewayRecord {
    pub salt: String,
    pub token_sha256: String,
    pub registered_at_ms: i64,
    /// Hex public key the gateway's chain is verified with.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Its algorithm, `ed25519` or `sm2`; absent in records made before SM2
    /// existed, whose keys are all Ed25519.
    #[serde(default)]
    pub key_algorithm: Option<String>,
    /// `registered` or `trust-on-first-use`.
    #[serde(default)]
    pub key_source: Option<String>,
    /// The token before the last rotation, valid until `valid_until_ms`.
    #[serde(default)]
    pub previous_token: Option<PreviousToken>,
}

impl GatewayRecord {
    /// The bound key, if any (a record that does not parse is reported).
    pub(crate) fn bound_key(&self) -> Result<Option<PublicKey>> {
        let Some(hex_key) = &self.public_key else {
            return Ok(None);
        };
        let name = self.key_algorithm.as_deref().unwrap_or("ed25519");
        let algorithm = Algorithm::from_name(name)
            .ok_or_else(|| StoreError::Backend(format!("unknown key algorithm `{name}`")))?;
        let bytes = hex::decode(hex_key)
            .map_err(|e| StoreError::Backend(format!("stored public key: {e}")))?;
        PublicKey::new(algorithm, bytes)
            .map(Some)
            .map_err(|e| StoreError::Backend(format!("stored public key: {e}")))
    }

    /// A new gateway's record (its key bound when given) and its token.
    pub(crate) fn new(public_key: Option<PublicKey>) -> (GatewayRecord, String) {
        let (token, salt, token_sha256) = new_token();
        let mut record = GatewayRecord {
            salt,
            token_sha256,
            previous_token: None,
            registered_at_ms: now_ms(),
            key_source: None,
            public_key: None,
            key_algorithm: None,
        };
        if let Some(key) = public_key {
            record.bind(key, "registered");
        }
        (record, token)
    }

    /// Whether `token` is the current token, or the previous one within the
    /// grace period of its rotation. Compared in constant time.
    pub(crate) fn accepts(&self, id: &str, token: &str) -> Result<bool> {
        let current = token_matches(id, &self.salt, &self.token_sha256, token)?;
        let previous = match &self.previous_token {
            Some(p) => {
                token_matches(id, &p.salt, &p.token_sha256, token)? && now_ms() < p.valid_until_ms
            }
            None => false,
        };
        Ok(current || previous)
    }

    /// Gives the gateway a new token, the current one valid for `grace` more;
    /// returns the new token.
    pub(crate) fn rotate(&mut self, grace: std::time::Duration) -> String {
        let (token, salt, token_sha256) = new_token();
        self.previous_token = Some(PreviousToken {
            salt: std::mem::replace(&mut self.salt, salt),
            token_sha256: std::mem::replace(&mut self.token_sha256, token_sha256),
            valid_until_ms: now_ms().saturating_add(grace.as_millis() as i64),
        });
        token
    }

    pub(crate) fn bind(&mut self, key: PublicKey, source: &str) {
        self.public_key = Some(hex::encode(&key.bytes));
        self.key_algorithm = Some(key.algorithm.name().to_string());
        self.key_source = Some(source.to_string());
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PreviousToken {
    pub salt: String,
    pub token_sha256: String,
    pub valid_until_ms: i64,
}

/// A new random token and its record fields (salt, salted SHA-256), hex.
/// Tokens are 256 random bits, so a salted hash needs no slow KDF.
fn new_token() -> (String, String, String) {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = format!("gt_{}", hex::encode(secret));
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let hash = hex::encode(token_hash(&salt, &token));
    (token, hex::encode(salt), hash)
}

/// Constant-time check of `token` against a hex salt and hash.
fn token_matches(id: &str, salt: &str, hash: &str, token: &str) -> Result<bool> {
    let (Ok(salt), Ok(expected)) = (hex::decode(salt), hex::decode(hash)) else {
        return Err(StoreError::Backend(format!(
            "gateway {id}: malformed token record"
        )));
    };
    Ok(bool::from(
        token_hash(&salt, token).as_slice().ct_eq(&expected),
    ))
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SignedLink {
    /// `Bytes`: storing a link shares the received payload instead of copying it.
    #[prost(bytes = "bytes", tag = "1")]
    pub payload: bytes::Bytes,
    #[prost(bytes = "vec", tag = "2")]
    pub prev_hash: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub signature: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub effective_hash: Vec<u8>,
    #[prost(bool, tag = "5")]
    pub signature_ok: bool,
    #[prost(uint64, tag = "6")]
    pub last_seq: u64,
    #[prost(bool, tag = "7")]
    pub signature_checked: bool,
    /// When ingest received it: its UTC day places it in a daily digest.
    #[prost(int64, tag = "8")]
    pub received_at_ms: i64,
    /// `SignatureAlgorithm` the envelope named; 0 in links stored before
    /// SM2 existed, which are all Ed25519.
    #[prost(int32, tag = "9")]
    pub algorithm: i32,
}

/// A stored link's chain algorithm (see `SignedLink::algorithm`).
pub(crate) fn stored_algorithm(wire: i32) -> Algorithm {
    Algorithm::from_wire(wire).unwrap_or(Algorithm::Ed25519)
}

/// The hash of a stored link, recomputed from its bytes.
pub(crate) fn link_hash(
    algorithm: i32,
    prev_hash: &[u8],
    payload: &[u8],
) -> guantong_proto::chain::Hash {
    let prev = guantong_proto::chain::to_hash(prev_hash).unwrap_or([0; 32]);
    stored_algorithm(algorithm).link_hash(&prev, payload)
}

/// A `SignedLink` read without its payload (prost skips the field without
/// copying it): what chain bookkeeping on the write path needs.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SignedLinkHead {
    #[prost(bytes = "vec", tag = "2")]
    pub prev_hash: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub effective_hash: Vec<u8>,
    #[prost(bool, tag = "5")]
    pub signature_ok: bool,
    #[prost(uint64, tag = "6")]
    pub last_seq: u64,
    #[prost(bool, tag = "7")]
    pub signature_checked: bool,
    #[prost(int32, tag = "9")]
    pub algorithm: i32,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub(crate) struct SeriesMeta {
    pub gateway: String,
    pub device: String,
    pub protocol: String,
    pub endpoint: String,
    pub tag: String,
    pub address: String,
    pub data_type: String,
    pub unit: String,
    pub interval_ms: u64,
    /// What the device said it is (vendor, product code, revision, …).
    #[serde(default)]
    pub identity: std::collections::BTreeMap<String, String>,
    /// When a manifest first named the series (ms); expected samples count
    /// from here.
    #[serde(default)]
    pub created_ms: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SeriesState {
    #[prost(uint64, tag = "1")]
    pub good: u64,
    #[prost(uint64, tag = "2")]
    pub uncertain: u64,
    #[prost(uint64, tag = "3")]
    pub bad: u64,
    #[prost(int64, optional, tag = "4")]
    pub first_ms: Option<i64>,
    #[prost(int64, optional, tag = "5")]
    pub last_ms: Option<i64>,
    /// The point with the latest source time; its `time_offset_ms` is absolute.
    #[prost(message, optional, tag = "6")]
    pub last: Option<Point>,
    #[prost(uint64, tag = "7")]
    pub backfilled: u64,
    /// The latest in-order value (time, hash) and when the value last
    /// changed, for the rollups' change tracking.
    #[prost(int64, optional, tag = "8")]
    pub track_time_ms: Option<i64>,
    #[prost(uint64, tag = "9")]
    pub track_hash: u64,
    #[prost(int64, tag = "10")]
    pub changed_at_ms: i64,
}

impl SeriesMeta {
    pub(crate) fn parse(bytes: &[u8]) -> Result<SeriesMeta> {
        serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Backend(format!("series metadata: {e}")))
    }

    /// The metadata of tag `tag` of `manifest` (its device resolved), first
    /// named at `created_ms`.
    pub(crate) fn of_tag(
        gateway: &str,
        manifest: &guantong_proto::v1::Manifest,
        i: usize,
        created_ms: i64,
    ) -> Result<SeriesMeta> {
        let tag = &manifest.tags[i];
        let device = manifest.devices.get(tag.device as usize).ok_or_else(|| {
            StoreError::Invalid(format!(
                "manifest tag {i} (`{}`) names device {} of {}",
                tag.name,
                tag.device,
                manifest.devices.len()
            ))
        })?;
        Ok(SeriesMeta {
            gateway: gateway.to_string(),
            device: device.id.clone(),
            protocol: device.protocol.clone(),
            endpoint: device.endpoint.clone(),
            tag: tag.name.clone(),
            address: tag.address.clone(),
            data_type: guantong_proto::v1::DataType::try_from(tag.data_type)
                .map(|d| {
                    d.as_str_name()
                        .trim_start_matches("DATA_TYPE_")
                        .to_ascii_lowercase()
                })
                .unwrap_or_else(|_| "unspecified".into()),
            unit: tag.unit.clone(),
            interval_ms: tag.interval_ms,
            identity: device
                .identity
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            created_ms,
        })
    }
}

impl SeriesState {
    pub(crate) fn parse(bytes: &[u8]) -> Result<SeriesState> {
        <SeriesState as prost::Message>::decode(bytes)
            .map_err(|e| StoreError::Backend(format!("series state: {e}")))
    }

    /// Advances the state by one batch's points of this series (absolute
    /// times, any order; sorted by time on return) and returns the rollup
    /// rows they touch.
    pub(crate) fn fold(
        &mut self,
        points: &mut [&Point],
        interval_ms: u64,
        received_at_ms: i64,
        backfill: bool,
    ) -> SeriesUpdate {
        if backfill {
            self.backfilled += points.len() as u64;
        }
        let mut prev = self.track_time_ms.map(|t| rollup::Previous {
            time_ms: t,
            value_hash: self.track_hash,
            changed_at_ms: self.changed_at_ms,
        });
        let update = rollup::fold_series(points, interval_ms, received_at_ms, backfill, &mut prev);
        if let Some(p) = prev {
            self.track_time_ms = Some(p.time_ms);
            self.track_hash = p.value_hash;
            self.changed_at_ms = p.changed_at_ms;
        }
        for p in points.iter() {
            match quality_of(p) {
                Quality::Good => self.good += 1,
                Quality::Uncertain => self.uncertain += 1,
                Quality::Bad => self.bad += 1,
            }
        }
        if let (Some(first), Some(last)) = (points.first(), points.last()) {
            self.first_ms = Some(
                self.first_ms
                    .map_or(first.time_offset_ms, |f| f.min(first.time_offset_ms)),
            );
            if self.last_ms.is_none_or(|l| last.time_offset_ms >= l) {
                self.last_ms = Some(last.time_offset_ms);
                self.last = Some((*last).clone());
            }
        }
        update
    }
}

/// A series as reported, from its metadata and its state.
pub(crate) fn series_info(id: u64, m: SeriesMeta, s: &SeriesState) -> SeriesInfo {
    SeriesInfo {
        id,
        gateway: m.gateway,
        device: m.device,
        protocol: m.protocol,
        endpoint: m.endpoint,
        tag: m.tag,
        address: m.address,
        data_type: m.data_type,
        unit: m.unit,
        interval_ms: m.interval_ms,
        identity: m.identity,
        created_ms: if m.created_ms > 0 {
            Some(m.created_ms)
        } else {
            s.first_ms
        },
        samples: s.good + s.uncertain + s.bad,
        good: s.good,
        uncertain: s.uncertain,
        bad: s.bad,
        backfilled: s.backfilled,
        first_seen_ms: s.first_ms,
        last_seen_ms: s.last_ms,
        last_value: s.last.as_ref().and_then(|p| value_json(&p.value)),
        last_quality: s
            .last
            .as_ref()
            .map(|p| quality_name(quality_of(p)).to_string()),
        last_quality_code: s.last.as_ref().map_or(0, |p| p.quality_code),
    }
}

pub fn value_json(v: &Option<Value>) -> Option<serde_json::Value> {
    v.as_ref().map(|v| match v {
        Value::Bool(b) => serde_json::Value::from(*b),
        Value::Int(i) => serde_json::Value::from(*i),
        Value::Uint(u) => serde_json::Value::from(*u),
        Value::Double(d) => serde_json::Number::from_f64(*d)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        Value::String(s) => serde_json::Value::from(s.clone()),
    })
}

pub fn quality_name(q: Quality) -> &'static str {
    match q {
        Quality::Good => "good",
        Quality::Uncertain => "uncertain",
        Quality::Bad => "bad",
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn token_hash(salt: &[u8], token: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(token.as_bytes());
    h.finalize().into()
}

/// `gateways` sorted, each once.
pub(crate) fn distinct(gateways: &[String]) -> Vec<String> {
    let mut out = gateways.to_vec();
    out.sort_unstable();
    out.dedup();
    out
}
