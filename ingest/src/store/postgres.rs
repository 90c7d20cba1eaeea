//! The PostgreSQL store: several ingest replicas over one database.
//!
//! # Layout
//! The schema is `postgres/0001_initial.sql` (applied by `migrate`, checked
//! by `open`). Points are one row each in `points`, range-partitioned by
//! source time into daily partitions, dropped whole by retention
//! (`partitions`); rollups,
//! streams, links, losses and the registry are tables of their own, their
//! rich values in the encodings the embedded store uses (`store::records`).
//!
//! # Writes
//! Appends go to one of `WRITERS` writer tasks chosen by gateway (so a
//! stream's batches keep their order); each takes the batches waiting (up to
//! `GROUP_POINTS` points) into one transaction:
//! 1. lock the rows of the streams named (`FOR UPDATE`, in key order) — the
//!    turn-taking of replicas per stream — and decide each batch with
//!    `store::stream` against the stored ranges;
//! 2. lock the series rows touched, fold each batch's points into their
//!    state and rollup deltas (`SeriesState::fold`), in batch order;
//! 3. write points by binary COPY, then minutes, days, hours, runs, gateway
//!    days, states, batches, ranges, and walk the chain (`store::chain`);
//! 4. commit, then ack. A batch is stored once: its (gateway, buffer, seq)
//!    is the primary key of `batches`, and the stream lock orders replicas.
//!
//! `generation` is a database sequence advanced after each commit, read by
//! every replica (its own writes at once, others' within `POLL`).

mod partitions;
mod registry;
mod schema;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::hash::{Hash as _, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use guantong_proto::chain::PublicKey;
use guantong_proto::v1::{Manifest, Point, point::Value};
use partitions::Partitions;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, ToSql, Type};

use super::chain::{self, ChainState};
use super::records::{
    GatewayRecord, SeriesMeta, SeriesState, SignedLink, distinct, link_hash, now_ms, quality_name,
    quality_of, series_info, stored_algorithm, value_json,
};
use super::rollup::{self, GatewayDay, HourRow, SeriesDay};
use super::stream::{self, Admission, LossRecord};
use super::{
    AppendBatch, AppendOutcome, Appended, BackupInfo, ChainBreak, ChainInfo, GatewayInfo, Job,
    LossInfo, ManifestMap, Result, RunsQuery, SeqRanges, SeriesInfo, Store, StoreError,
    StoreVerification, StoredPoint, WindowCounts,
};
use crate::evidence::bundle::{Bundle, DayEvidence};
use crate::registry::{Access, Account, Enterprise, Equipment};

pub use registry::{is_revoked, revoke_certificate, revoked_certificates};
pub use schema::{LATEST as SCHEMA_VERSION, migrate};

const MINUTE_MS: i64 = 60_000;
/// Writer tasks (each one transaction at a time, on its own connection).
const WRITERS: usize = 4;
/// Most points one group transaction takes.
const GROUP_POINTS: usize = 100_000;
/// Connections per replica: the writers and the readers.
const POOL_SIZE: usize = 16;
/// How often a replica looks for other replicas' changes.
const POLL: Duration = Duration::from_secs(1);

pub(crate) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Backend(format!(
            "postgres: {} ({}){}",
            db.message(),
            db.code().code(),
            db.detail().map(|d| format!(": {d}")).unwrap_or_default()
        )),
        None => StoreError::Backend(format!("postgres: {e}")),
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(e),
        other => StoreError::Backend(format!("postgres pool: {other}")),
    }
}

/// u64 numbers (ids, sequence numbers) as stored in bigint columns.
fn big(n: u64) -> i64 {
    n as i64
}

fn unbig(n: i64) -> u64 {
    n as u64
}

pub struct PgStore {
    pool: Pool,
    writers: Vec<mpsc::UnboundedSender<Job>>,
    generation: Arc<AtomicU64>,
    digest_key: Arc<ed25519_dalek::SigningKey>,
    poller: tokio::task::JoinHandle<()>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// A connection configuration from a `postgres://` URL or a key=value string.
pub fn config(url: &str) -> Result<tokio_postgres::Config> {
    url.parse::<tokio_postgres::Config>()
        .map_err(|e| StoreError::Invalid(format!("database address `{}`: {e}", redact(url))))
}

/// `url` with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Where the database is: its connection settings and, to verify its
/// certificate, the CA that signed it.
#[derive(Clone, Debug)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub ca: Option<PathBuf>,
}

impl Target {
    pub fn new(url: &str, ca: Option<PathBuf>) -> Result<Target> {
        Ok(Target {
            config: config(url)?,
            ca,
        })
    }
}

/// TLS as libpq's `sslmode` has it (tokio-postgres: `disable`, `prefer`,
/// the default, or `require`): encrypted when the server offers it, the
/// certificate verified only against a CA given (`--database-ca`, as
/// libpq's `sslrootcert` with `verify-full`).
fn tls(ca: Option<&std::path::Path>) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Backend(format!("TLS: {e}")))?;
    let config = match ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| StoreError::Invalid(format!("database CA {}: {e}", path.display())))?;
            let mut roots = rustls::RootCertStore::empty();
            use rustls_pki_types::pem::PemObject;
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| {
                    StoreError::Invalid(format!("database CA {}: {e}", path.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    StoreError::Invalid(format!("database CA {}: {e}", path.display()))
                })?;
            }
            if roots.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "database CA {}: no certificate in it",
                    path.display()
                )));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth(),
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// libpq's `sslmode=require`: the connection is encrypted and the server's
/// handshake signature checked, its certificate chain not.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A pool of connections to `target`.
pub fn pool(target: &Target, size: usize) -> Result<Pool> {
    let manager = Manager::from_config(
        target.config.clone(),
        tls(target.ca.as_deref())?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Backend(format!("postgres pool: {e}")))
}

impl PgStore {
    /// Opens the store in the database `config` names; its schema must be
    /// the one this ingest knows (`migrate` makes it so).
    pub async fn open(target: &Target) -> Result<PgStore> {
        PgStore::open_with(target, None).await
    }

    /// `open`, dropping points older than `retention` every hour (their
    /// daily partitions; `partitions`).
    pub async fn open_with(target: &Target, retention: Option<Duration>) -> Result<PgStore> {
        let pool = pool(target, POOL_SIZE)?;
        let mut client = pool.get().await.map_err(pool_err)?;
        schema::check(&client).await?;
        let digest_key = digest_key(&client).await?;
        let made = Partitions::default();
        partitions::make_ahead(&made, &mut client, now_ms()).await?;
        let generation = Arc::new(AtomicU64::new(0));
        observe_generation(&client, &generation).await?;
        drop(client);
        let writers = (0..WRITERS)
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(writer_loop(
                    pool.clone(),
                    generation.clone(),
                    made.clone(),
                    rx,
                ));
                tx
            })
            .collect();
        let poller = tokio::spawn(poll_loop(pool.clone(), generation.clone(), made, retention));
        Ok(PgStore {
            pool,
            writers,
            generation,
            digest_key: Arc::new(digest_key),
            poller,
        })
    }

    async fn client(&self) -> Result<Object> {
        self.pool.get().await.map_err(pool_err)
    }

    /// After a committed write: the generation grows.
    async fn changed(&self, client: &Object) -> Result<()> {
        bump_generation(client, &self.generation).await
    }
}

async fn observe_generation(client: &Object, generation: &AtomicU64) -> Result<()> {
    let row = client
        .query_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM generation",
            &[],
        )
        .await
        .map_err(pg_err)?;
    generation.fetch_max(unbig(row.get::<_, i64>(0)), Ordering::AcqRel);
    Ok(())
}

async fn bump_generation(client: &Object, generation: &AtomicU64) -> Result<()> {
    let row = client
        .query_one("SELECT nextval('generation')", &[])
        .await
        .map_err(pg_err)?;
    generation.fetch_max(unbig(row.get::<_, i64>(0)), Ordering::AcqRel);
    Ok(())
}

/// Sees other replicas' changes; every hour makes the coming days'
/// partitions and, with a retention, drops the expired ones.
async fn poll_loop(
    pool: Pool,
    generation: Arc<AtomicU64>,
    made: Partitions,
    retention: Option<Duration>,
) {
    let mut last_hourly = 0;
    loop {
        let Ok(mut client) = pool.get().await else {
            tokio::time::sleep(POLL).await;
            continue;
        };
        if let Err(e) = observe_generation(&client, &generation).await {
            tracing::warn!(error = %e, "cannot read the database's generation");
        }
        if now_ms() - last_hourly > rollup::HOUR_MS {
            last_hourly = now_ms();
            if let Err(e) = partitions::make_ahead(&made, &mut client, last_hourly).await {
                tracing::warn!(error = %e, "cannot make the coming days' point partitions");
            }
            if let Some(retention) = retention {
                match partitions::expire(&mut client, last_hourly, retention).await {
                    Ok(dropped) if !dropped.is_empty() => {
                        made.forget();
                        tracing::info!(?dropped, retention = %humantime::format_duration(retention), "dropped expired point partitions");
                        if let Err(e) = bump_generation(&client, &generation).await {
                            tracing::warn!(error = %e, "cannot advance the generation");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "retention: expired points not dropped yet; trying again in an hour")
                    }
                }
            }
        }
        drop(client);
        tokio::time::sleep(POLL).await;
    }
}

/// The digest key every replica signs with, made by the first to open.
async fn digest_key(client: &Object) -> Result<ed25519_dalek::SigningKey> {
    let secret: [u8; 32] = rand::random();
    client
        .execute(
            "INSERT INTO ingest_keys (name, secret) VALUES ('digest', $1) ON CONFLICT DO NOTHING",
            &[&secret.as_slice()],
        )
        .await
        .map_err(pg_err)?;
    let row = client
        .query_one("SELECT secret FROM ingest_keys WHERE name = 'digest'", &[])
        .await
        .map_err(pg_err)?;
    let bytes: Vec<u8> = row.get(0);
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| StoreError::Backend("stored digest key is not 32 bytes".into()))?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&seed))
}

async fn writer_loop(
    pool: Pool,
    generation: Arc<AtomicU64>,
    made: Partitions,
    mut rx: mpsc::UnboundedReceiver<Job>,
) {
    while let Some(first) = rx.recv().await {
        let mut points = first.batch.batch.points.len();
        let mut jobs = vec![first];
        while points < GROUP_POINTS {
            match rx.try_recv() {
                Ok(job) => {
                    points += job.batch.batch.points.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let days = partitions::days_of(jobs.iter().flat_map(|j| {
            let b = &j.batch.batch;
            b.points
                .iter()
                .map(|p| b.base_time_ms.saturating_add(p.time_offset_ms))
        }));
        let outcome = async {
            let mut client = pool.get().await.map_err(pool_err)?;
            made.ensure(&mut client, &days).await?;
            let batches = || jobs.iter().map(|j| &j.batch).collect();
            let outcomes = match append_group(&mut client, batches()).await {
                Ok(outcomes) => outcomes,
                // Retention (here or on another replica) may have dropped a
                // day's partition this writer knew: make it again, once.
                Err(_) => {
                    made.forget();
                    made.ensure(&mut client, &days).await?;
                    append_group(&mut client, batches()).await?
                }
            };
            bump_generation(&client, &generation).await?;
            Ok::<_, StoreError>(outcomes)
        }
        .await;
        super::answer(jobs, outcome);
    }
}

/// A point row's value columns: (kind, num, bits, txt).
fn value_columns(v: &Option<Value>) -> (i16, Option<f64>, Option<i64>, Option<String>) {
    match v {
        None => (0, None, None, None),
        Some(Value::Bool(b)) => (1, Some(f64::from(u8::from(*b))), Some(i64::from(*b)), None),
        Some(Value::Int(i)) => (2, Some(*i as f64), Some(*i), None),
        Some(Value::Uint(u)) => (3, Some(*u as f64), Some(big(*u)), None),
        Some(Value::Double(d)) => (4, Some(*d), None, None),
        Some(Value::String(s)) => (5, None, None, Some(s.clone())),
    }
}

fn value_of(kind: i16, num: Option<f64>, bits: Option<i64>, txt: Option<String>) -> Option<Value> {
    match kind {
        1 => Some(Value::Bool(bits.unwrap_or(0) != 0)),
        2 => Some(Value::Int(bits.unwrap_or(0))),
        3 => Some(Value::Uint(unbig(bits.unwrap_or(0)))),
        4 => Some(Value::Double(num.unwrap_or(f64::NAN))),
        5 => Some(Value::String(txt.unwrap_or_default())),
        _ => None,
    }
}

/// The point a `points` row holds, its time absolute (`time_offset_ms`).
fn point_of(row: &tokio_postgres::Row) -> Point {
    Point {
        tag: 0,
        time_offset_ms: row.get("time_ms"),
        value: value_of(
            row.get("kind"),
            row.get("num"),
            row.get("bits"),
            row.get("txt"),
        ),
        quality: row.get("quality"),
        quality_code: row.get::<_, i64>("quality_code") as u32,
        server_time_delta_ms: row.get("server_delta_ms"),
    }
}

/// The columns of `points` ingest writes, in COPY order, and their types.
pub const POINT_COLUMNS: &str = "series, time_ms, quality, quality_code, kind, num, bits, txt, \
     server_delta_ms, received_at_ms, backfill, buffer_id, seq";
pub const POINT_TYPES: [Type; 13] = [
    Type::INT8,
    Type::INT8,
    Type::INT4,
    Type::INT8,
    Type::INT2,
    Type::FLOAT8,
    Type::INT8,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::BOOL,
    Type::INT8,
    Type::INT8,
];

/// What one group transaction changes besides points, gathered in batch
/// order and written at the end.
#[derive(Default)]
struct GroupWrites {
    minutes: BTreeMap<(u64, i64), [i64; 3]>,
    days: BTreeMap<(u64, i64), SeriesDay>,
    hours: BTreeMap<(u64, i64), rollup::HourStats>,
    runs: BTreeMap<(u64, u8), BTreeMap<i64, i64>>,
    runs_changed: BTreeSet<(u64, u8, i64)>,
    gateway_days: BTreeMap<(String, i64), GatewayDay>,
}

async fn append_group(client: &mut Object, batches: Vec<&AppendBatch>) -> Result<Vec<Appended>> {
    let txn = client.transaction().await.map_err(pg_err)?;

    // 1. The streams, locked in key order; each batch decided.
    let mut keys: Vec<(String, i64)> = batches
        .iter()
        .map(|a| (a.gateway_id.clone(), big(a.batch.buffer_id)))
        .collect();
    keys.sort();
    keys.dedup();
    let (gateways, buffers): (Vec<String>, Vec<i64>) = keys.iter().cloned().unzip();
    txn.execute(
        &txn.prepare_cached(
            "INSERT INTO streams (gateway, buffer_id, ranges) \
         SELECT g, b, '' FROM unnest($1::text[], $2::bigint[]) AS k(g, b) ON CONFLICT DO NOTHING",
        )
        .await
        .map_err(pg_err)?,
        &[&gateways, &buffers],
    )
    .await
    .map_err(pg_err)?;
    let mut ranges: BTreeMap<(String, i64), SeqRanges> = BTreeMap::new();
    for row in txn
        .query(
            &txn.prepare_cached("SELECT s.gateway, s.buffer_id, s.ranges FROM streams s \
             JOIN unnest($1::text[], $2::bigint[]) AS k(g, b) ON s.gateway = k.g AND s.buffer_id = k.b \
             ORDER BY s.gateway, s.buffer_id FOR UPDATE OF s").await.map_err(pg_err)?,
            &[&gateways, &buffers],
        )
        .await
        .map_err(pg_err)?
    {
        let bytes: Vec<u8> = row.get(2);
        ranges.insert((row.get(0), row.get(1)), SeqRanges::decode(&bytes));
    }
    let mut admitted: Vec<Option<(u64, u64)>> = Vec::with_capacity(batches.len());
    let mut outcomes = Vec::with_capacity(batches.len());
    for a in &batches {
        let r = ranges
            .entry((a.gateway_id.clone(), big(a.batch.buffer_id)))
            .or_default();
        match stream::admit(r, &a.batch) {
            Admission::Duplicate { stored_seq } => {
                admitted.push(None);
                outcomes.push(Appended {
                    outcome: AppendOutcome::Duplicate,
                    stored_seq,
                });
            }
            Admission::Store { first, last } => {
                r.insert(first, last);
                admitted.push(Some((first, last)));
                outcomes.push(Appended {
                    outcome: AppendOutcome::Stored,
                    stored_seq: r.contiguous(),
                });
            }
        }
    }

    // 2. The series touched, locked; their states and rollups folded.
    let mut series_ids: Vec<i64> = Vec::new();
    for (a, adm) in batches.iter().zip(&admitted) {
        if let (Some(_), None, Some(map)) = (adm, &a.rejected, &a.map) {
            for p in &a.batch.points {
                let s = *map.series.get(p.tag as usize).ok_or_else(|| {
                    StoreError::Invalid(format!("tag {} outside manifest", p.tag))
                })?;
                series_ids.push(big(s));
            }
        }
    }
    series_ids.sort_unstable();
    series_ids.dedup();
    let mut states: HashMap<u64, SeriesState> = HashMap::new();
    for row in txn
        .query(
            &txn.prepare_cached(
                "SELECT id, state FROM series WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            )
            .await
            .map_err(pg_err)?,
            &[&series_ids],
        )
        .await
        .map_err(pg_err)?
    {
        let state: Option<Vec<u8>> = row.get(1);
        let s = match state {
            Some(b) => SeriesState::parse(&b)?,
            None => SeriesState::default(),
        };
        states.insert(unbig(row.get(0)), s);
    }

    let mut w = GroupWrites::default();
    let sink = txn
        .copy_in(&format!("COPY points ({POINT_COLUMNS}) FROM STDIN BINARY"))
        .await
        .map_err(pg_err)?;
    let writer = BinaryCopyInWriter::new(sink, &POINT_TYPES);
    let mut writer = std::pin::pin!(writer);
    let mut folds: Vec<(u64, u64, rollup::SeriesUpdate)> = Vec::new();
    for (a, adm) in batches.iter().zip(&admitted) {
        let (Some(_), None, Some(map)) = (adm, &a.rejected, &a.map) else {
            continue;
        };
        let b = &a.batch;
        let mut per_series: BTreeMap<u64, Vec<Point>> = BTreeMap::new();
        let mut intervals: HashMap<u64, u64> = HashMap::new();
        for p in &b.points {
            let series = map.series[p.tag as usize];
            intervals.insert(
                series,
                map.intervals.get(p.tag as usize).copied().unwrap_or(0),
            );
            let t = b.base_time_ms.saturating_add(p.time_offset_ms);
            let (kind, num, bits, txt) = value_columns(&p.value);
            let q = quality_of(p) as usize;
            w.minutes
                .entry((series, t.div_euclid(MINUTE_MS) * MINUTE_MS))
                .or_default()[q.min(2)] += 1;
            let row: [&(dyn ToSql + Sync); 13] = [
                &big(series),
                &t,
                &p.quality,
                &i64::from(p.quality_code),
                &kind,
                &num,
                &bits,
                &txt,
                &p.server_time_delta_ms,
                &a.received_at_ms,
                &a.backfill,
                &big(b.buffer_id),
                &big(b.seq),
            ];
            writer.as_mut().write(&row).await.map_err(pg_err)?;
            let mut p = p.clone();
            p.tag = 0;
            p.time_offset_ms = t;
            per_series.entry(series).or_default().push(p);
        }
        for (series, points) in per_series {
            let interval = intervals.get(&series).copied().unwrap_or(0);
            let state = states.entry(series).or_default();
            let mut refs: Vec<&Point> = points.iter().collect();
            let update = state.fold(&mut refs, interval, a.received_at_ms, a.backfill);
            folds.push((series, interval, update));
        }
        let day = rollup::day_of(a.received_at_ms);
        w.gateway_days
            .entry((a.gateway_id.clone(), day))
            .or_default();
    }
    writer.as_mut().finish().await.map_err(pg_err)?;

    // Stored rollup rows the deltas merge into.
    let day_keys: BTreeSet<(u64, i64)> = folds
        .iter()
        .flat_map(|(s, _, u)| u.days.iter().map(move |(d, _)| (*s, *d)))
        .collect();
    let (ds, dd): (Vec<i64>, Vec<i64>) = day_keys.iter().map(|&(s, d)| (big(s), d)).unzip();
    for row in txn
        .query(
            &txn.prepare_cached(
                "SELECT r.series, r.day, r.row FROM series_days r \
             JOIN unnest($1::bigint[], $2::bigint[]) AS k(s, d) ON r.series = k.s AND r.day = k.d",
            )
            .await
            .map_err(pg_err)?,
            &[&ds, &dd],
        )
        .await
        .map_err(pg_err)?
    {
        let bytes: Vec<u8> = row.get(2);
        let day = SeriesDay::decode(bytes.as_slice())
            .map_err(|e| StoreError::Backend(format!("day rollup: {e}")))?;
        w.days.insert((unbig(row.get(0)), row.get(1)), day);
    }
    let hour_keys: BTreeSet<(u64, i64)> = folds
        .iter()
        .flat_map(|(s, _, u)| u.hours.iter().map(move |h| (*s, h.0)))
        .collect();
    let (hs, hh): (Vec<i64>, Vec<i64>) = hour_keys.iter().map(|&(s, h)| (big(s), h)).unzip();
    for row in txn
        .query(
            &txn.prepare_cached(
                "SELECT r.series, r.hour, r.n, r.sum, r.min, r.max FROM series_hours r \
             JOIN unnest($1::bigint[], $2::bigint[]) AS k(s, h) ON r.series = k.s AND r.hour = k.h",
            )
            .await
            .map_err(pg_err)?,
            &[&hs, &hh],
        )
        .await
        .map_err(pg_err)?
    {
        w.hours.insert(
            (unbig(row.get(0)), row.get(1)),
            (unbig(row.get(2)), row.get(3), row.get(4), row.get(5)),
        );
    }
    // For every new run, the stored run of its kind starting last at or
    // before it.
    let mut rs = Vec::new();
    let mut rk = Vec::new();
    let mut rstart = Vec::new();
    for (s, _, u) in &folds {
        for &(kind, start, _) in &u.runs {
            rs.push(big(*s));
            rk.push(i16::from(kind));
            rstart.push(start);
        }
    }
    for row in txn
        .query(
            &txn.prepare_cached("SELECT k.s, k.k, r.start_ms, r.end_ms FROM unnest($1::bigint[], $2::smallint[], $3::bigint[]) AS k(s, k, t) \
             CROSS JOIN LATERAL (SELECT start_ms, end_ms FROM series_runs \
               WHERE series = k.s AND kind = k.k AND start_ms <= k.t ORDER BY start_ms DESC LIMIT 1) r").await.map_err(pg_err)?,
            &[&rs, &rk, &rstart],
        )
        .await
        .map_err(pg_err)?
    {
        w.runs
            .entry((unbig(row.get(0)), row.get::<_, i16>(1) as u8))
            .or_default()
            .insert(row.get(2), row.get(3));
    }
    let gd_keys: Vec<(String, i64)> = w.gateway_days.keys().cloned().collect();
    let (gg, gd): (Vec<String>, Vec<i64>) = gd_keys.into_iter().unzip();
    for row in txn
        .query(
            &txn.prepare_cached(
                "SELECT r.gateway, r.day, r.row FROM gateway_days r \
             JOIN unnest($1::text[], $2::bigint[]) AS k(g, d) ON r.gateway = k.g AND r.day = k.d",
            )
            .await
            .map_err(pg_err)?,
            &[&gg, &gd],
        )
        .await
        .map_err(pg_err)?
    {
        let bytes: Vec<u8> = row.get(2);
        let day = GatewayDay::decode(bytes.as_slice())
            .map_err(|e| StoreError::Backend(format!("gateway day rollup: {e}")))?;
        w.gateway_days.insert((row.get(0), row.get(1)), day);
    }

    // Deltas merged in batch order, as the embedded store does.
    for (series, interval, u) in folds {
        for (day, d) in u.days {
            rollup::merge_day(w.days.entry((series, day)).or_default(), &d);
        }
        for (hour, n, sum, min, max) in u.hours {
            w.hours
                .entry((series, hour))
                .and_modify(|h| *h = (h.0 + n, h.1 + sum, h.2.min(min), h.3.max(max)))
                .or_insert((n, sum, min, max));
        }
        let tol = rollup::run_tolerance(interval);
        for (kind, start, end) in u.runs {
            let runs = w.runs.entry((series, kind)).or_default();
            let before = runs.range(..=start).next_back().map(|(s, e)| (*s, *e));
            if let Some((s, e)) = rollup::place_run(before, start, end, tol) {
                runs.insert(s, e);
                w.runs_changed.insert((series, kind, s));
            }
        }
    }
    for (a, adm) in batches.iter().zip(&admitted) {
        if let (Some(_), None, Some(_)) = (adm, &a.rejected, &a.map) {
            let day = rollup::day_of(a.received_at_ms);
            if let Some(row) = w.gateway_days.get_mut(&(a.gateway_id.clone(), day)) {
                row.add_batch(a);
            }
        }
    }

    // 3. Everything else written.
    write_rollups(&txn, &w).await?;
    let (ids, blobs): (Vec<i64>, Vec<Vec<u8>>) = states
        .iter()
        .map(|(id, s)| (big(*id), s.encode_to_vec()))
        .unzip();
    txn.execute(
        &txn.prepare_cached("UPDATE series SET state = k.v FROM unnest($1::bigint[], $2::bytea[]) AS k(id, v) WHERE series.id = k.id").await.map_err(pg_err)?,
        &[&ids, &blobs],
    )
    .await
    .map_err(pg_err)?;

    let mut loss_rows: (Vec<String>, Vec<i64>, Vec<i64>, Vec<Json<LossRecord>>) =
        Default::default();
    let mut batch_rows = BatchRows::default();
    let mut linked: BTreeSet<(String, i64)> = BTreeSet::new();
    for (a, adm) in batches.iter().zip(&admitted) {
        let Some((_, last)) = adm else { continue };
        let b = &a.batch;
        if let Some(record) = stream::loss_of(a) {
            loss_rows.0.push(a.gateway_id.clone());
            loss_rows.1.push(big(b.buffer_id));
            loss_rows.2.push(big(b.seq));
            loss_rows.3.push(Json(record));
        }
        batch_rows.push(a, *last);
        if a.link.is_some() {
            linked.insert((a.gateway_id.clone(), big(b.buffer_id)));
        }
    }
    txn.execute(
        &txn.prepare_cached(
            "INSERT INTO losses (gateway, buffer_id, first_seq, record) \
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::jsonb[]) \
         ON CONFLICT (gateway, buffer_id, first_seq) DO UPDATE SET record = excluded.record",
        )
        .await
        .map_err(pg_err)?,
        &[&loss_rows.0, &loss_rows.1, &loss_rows.2, &loss_rows.3],
    )
    .await
    .map_err(pg_err)?;
    batch_rows.insert(&txn).await?;
    let (rg, rb, rv): (Vec<String>, Vec<i64>, Vec<Vec<u8>>) = ranges
        .iter()
        .map(|((g, b), r)| (g.clone(), *b, r.encode()))
        .fold(
            Default::default(),
            |mut acc: (Vec<_>, Vec<_>, Vec<_>), (g, b, v)| {
                acc.0.push(g);
                acc.1.push(b);
                acc.2.push(v);
                acc
            },
        );
    txn.execute(
        &txn.prepare_cached("UPDATE streams SET ranges = k.v FROM unnest($1::text[], $2::bigint[], $3::bytea[]) AS k(g, b, v) \
         WHERE streams.gateway = k.g AND streams.buffer_id = k.b").await.map_err(pg_err)?,
        &[&rg, &rb, &rv],
    )
    .await
    .map_err(pg_err)?;
    advance_chains(&txn, linked).await?;
    txn.commit().await.map_err(pg_err)?;
    Ok(outcomes)
}

/// Rows of `batches`, as columns.
#[derive(Default)]
struct BatchRows {
    gateway: Vec<String>,
    buffer_id: Vec<i64>,
    seq: Vec<i64>,
    last_seq: Vec<i64>,
    received_at_ms: Vec<i64>,
    payload: Vec<Option<Vec<u8>>>,
    prev_hash: Vec<Option<Vec<u8>>>,
    signature: Vec<Option<Vec<u8>>>,
    effective_hash: Vec<Option<Vec<u8>>>,
    signature_ok: Vec<Option<bool>>,
    signature_checked: Vec<Option<bool>>,
    algorithm: Vec<Option<i32>>,
}

impl BatchRows {
    fn push(&mut self, a: &AppendBatch, last_seq: u64) {
        let b = &a.batch;
        self.gateway.push(a.gateway_id.clone());
        self.buffer_id.push(big(b.buffer_id));
        self.seq.push(big(b.seq));
        self.last_seq.push(big(last_seq));
        self.received_at_ms.push(a.received_at_ms);
        let l = a.link.as_ref();
        self.payload.push(l.map(|l| l.payload.to_vec()));
        self.prev_hash.push(l.map(|l| l.prev_hash.clone()));
        self.signature.push(l.map(|l| l.signature.clone()));
        self.effective_hash
            .push(l.map(|l| l.effective_hash.to_vec()));
        self.signature_ok.push(l.map(|l| l.signature_ok));
        self.signature_checked.push(l.map(|l| l.signature_checked));
        self.algorithm.push(l.map(|l| l.algorithm.wire() as i32));
    }

    async fn insert(&self, txn: &deadpool_postgres::Transaction<'_>) -> Result<()> {
        txn.execute(
            &txn.prepare_cached("INSERT INTO batches (gateway, buffer_id, seq, last_seq, received_at_ms, payload, prev_hash, \
               signature, effective_hash, signature_ok, signature_checked, algorithm) \
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], \
               $6::bytea[], $7::bytea[], $8::bytea[], $9::bytea[], $10::bool[], $11::bool[], $12::int[])").await.map_err(pg_err)?,
            &[
                &self.gateway,
                &self.buffer_id,
                &self.seq,
                &self.last_seq,
                &self.received_at_ms,
                &self.payload,
                &self.prev_hash,
                &self.signature,
                &self.effective_hash,
                &self.signature_ok,
                &self.signature_checked,
                &self.algorithm,
            ],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }
}

async fn write_rollups(txn: &deadpool_postgres::Transaction<'_>, w: &GroupWrites) -> Result<()> {
    // Columns of the rows, as arrays for unnest.
    let mut m: [Vec<i64>; 5] = Default::default();
    for (&(s, minute), c) in &w.minutes {
        for (col, v) in m.iter_mut().zip([big(s), minute, c[0], c[1], c[2]]) {
            col.push(v);
        }
    }
    txn.execute(
        &txn.prepare_cached("INSERT INTO minutes (series, minute, good, uncertain, bad) \
         SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[]) \
         ON CONFLICT (series, minute) DO UPDATE SET good = minutes.good + excluded.good, \
           uncertain = minutes.uncertain + excluded.uncertain, bad = minutes.bad + excluded.bad").await.map_err(pg_err)?,
        &[&m[0], &m[1], &m[2], &m[3], &m[4]],
    )
    .await
    .map_err(pg_err)?;
    let mut d: (Vec<i64>, Vec<i64>, Vec<Vec<u8>>) = Default::default();
    for (&(s, day), row) in &w.days {
        d.0.push(big(s));
        d.1.push(day);
        d.2.push(row.encode_to_vec());
    }
    txn.execute(
        &txn.prepare_cached("INSERT INTO series_days (series, day, row) SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bytea[]) \
         ON CONFLICT (series, day) DO UPDATE SET row = excluded.row").await.map_err(pg_err)?,
        &[&d.0, &d.1, &d.2],
    )
    .await
    .map_err(pg_err)?;
    let (mut hk, mut hv): ([Vec<i64>; 3], [Vec<f64>; 3]) = Default::default();
    for (&(s, hour), &(n, sum, min, max)) in &w.hours {
        for (col, v) in hk.iter_mut().zip([big(s), hour, big(n)]) {
            col.push(v);
        }
        for (col, v) in hv.iter_mut().zip([sum, min, max]) {
            col.push(v);
        }
    }
    txn.execute(
        &txn.prepare_cached("INSERT INTO series_hours (series, hour, n, sum, min, max) \
         SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::float8[], $5::float8[], $6::float8[]) \
         ON CONFLICT (series, hour) DO UPDATE SET n = excluded.n, sum = excluded.sum, min = excluded.min, max = excluded.max").await.map_err(pg_err)?,
        &[&hk[0], &hk[1], &hk[2], &hv[0], &hv[1], &hv[2]],
    )
    .await
    .map_err(pg_err)?;
    let mut r: (Vec<i64>, Vec<i16>, Vec<i64>, Vec<i64>) = Default::default();
    for &(s, kind, start) in &w.runs_changed {
        if let Some(end) = w.runs.get(&(s, kind)).and_then(|m| m.get(&start)) {
            r.0.push(big(s));
            r.1.push(i16::from(kind));
            r.2.push(start);
            r.3.push(*end);
        }
    }
    txn.execute(
        &txn.prepare_cached(
            "INSERT INTO series_runs (series, kind, start_ms, end_ms) \
         SELECT * FROM unnest($1::bigint[], $2::smallint[], $3::bigint[], $4::bigint[]) \
         ON CONFLICT (series, kind, start_ms) DO UPDATE SET end_ms = excluded.end_ms",
        )
        .await
        .map_err(pg_err)?,
        &[&r.0, &r.1, &r.2, &r.3],
    )
    .await
    .map_err(pg_err)?;
    let mut g: (Vec<String>, Vec<i64>, Vec<Vec<u8>>) = Default::default();
    for ((gw, day), row) in &w.gateway_days {
        if row.batches == 0 {
            continue;
        }
        g.0.push(gw.clone());
        g.1.push(*day);
        g.2.push(row.encode_to_vec());
    }
    txn.execute(
        &txn.prepare_cached("INSERT INTO gateway_days (gateway, day, row) SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[]) \
         ON CONFLICT (gateway, day) DO UPDATE SET row = excluded.row").await.map_err(pg_err)?,
        &[&g.0, &g.1, &g.2],
    )
    .await
    .map_err(pg_err)?;
    Ok(())
}

async fn put_break(
    client: &impl deadpool_postgres::GenericClient,
    gateway: &str,
    buffer_id: i64,
    seq: u64,
    reason: String,
) -> Result<()> {
    tracing::warn!(%gateway, buffer_id = format_args!("{:016x}", unbig(buffer_id)), seq, %reason, "evidence chain break");
    let record = ChainBreak {
        seq,
        reason,
        recorded_at_ms: now_ms(),
    };
    client
        .execute(
            "INSERT INTO chain_breaks (gateway, buffer_id, seq, record) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (gateway, buffer_id, seq) DO UPDATE SET record = excluded.record",
            &[&gateway, &buffer_id, &big(seq), &Json(&record)],
        )
        .await
        .map_err(pg_err)?;
    Ok(())
}

/// Walks the stream's chain (`store::chain`) over every stored link that
/// follows the verified ones, recording the breaks it finds.
/// Links read per stream and round trip of the chain walk (two in unit
/// tests, so the store suite's waiting links take several pages).
const CHAIN_PAGE: i64 = if cfg!(test) { 2 } else { 1_000 };

/// Walks the chains of `streams` past every stored link that continues
/// them (`chain::step`), recording breaks, in three round trips for all of
/// them: their states, the next links of each (up to `CHAIN_PAGE`), the
/// new states. A stream with more links waiting goes on a page at a time.
async fn advance_chains(
    txn: &deadpool_postgres::Transaction<'_>,
    streams: BTreeSet<(String, i64)>,
) -> Result<()> {
    let mut states: BTreeMap<(String, i64), ChainState> = streams
        .into_iter()
        .map(|k| (k, ChainState::default()))
        .collect();
    let (gs, bs): (Vec<String>, Vec<i64>) = states.keys().cloned().unzip();
    for row in txn
        .query(
            &txn.prepare_cached(
                "SELECT c.gateway, c.buffer_id, c.state FROM chain_state c \
                 JOIN unnest($1::text[], $2::bigint[]) AS k(g, b) ON c.gateway = k.g AND c.buffer_id = k.b",
            )
            .await
            .map_err(pg_err)?,
            &[&gs, &bs],
        )
        .await
        .map_err(pg_err)?
    {
        states.insert((row.get(0), row.get(1)), row.get::<_, Json<ChainState>>(2).0);
    }
    let mut walking: Vec<(String, i64)> = states.keys().cloned().collect();
    let mut changed: BTreeSet<(String, i64)> = BTreeSet::new();
    while !walking.is_empty() {
        let (gs, bs): (Vec<String>, Vec<i64>) = walking.iter().cloned().unzip();
        let next: Vec<i64> = walking.iter().map(|k| big(states[k].next())).collect();
        let mut links: BTreeMap<(String, i64), Vec<tokio_postgres::Row>> = BTreeMap::new();
        for row in txn
            .query(
                &txn.prepare_cached(
                    "SELECT k.g, k.b, l.seq, l.prev_hash, l.effective_hash, l.signature_ok, \
                     l.signature_checked, l.last_seq, l.algorithm \
                     FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS k(g, b, n) \
                     CROSS JOIN LATERAL (SELECT seq, prev_hash, effective_hash, signature_ok, \
                       signature_checked, last_seq, algorithm FROM batches \
                       WHERE gateway = k.g AND buffer_id = k.b AND seq >= k.n AND payload IS NOT NULL \
                       ORDER BY seq LIMIT $4) l \
                     ORDER BY k.g, k.b, l.seq",
                )
                .await
                .map_err(pg_err)?,
                &[&gs, &bs, &next, &CHAIN_PAGE],
            )
            .await
            .map_err(pg_err)?
        {
            links.entry((row.get(0), row.get(1))).or_default().push(row);
        }
        walking.clear();
        for ((gateway, buffer_id), rows) in links {
            let full = rows.len() as i64 == CHAIN_PAGE;
            let key = (gateway, buffer_id);
            let st = states.get_mut(&key).expect("walked streams have a state");
            let mut continued = true;
            for row in rows {
                let seq = unbig(row.get(2));
                if seq != st.next() {
                    continued = false;
                    break;
                }
                let head = chain::LinkHead {
                    algorithm: stored_algorithm(row.get::<_, Option<i32>>(8).unwrap_or(0)),
                    prev_hash: row.get::<_, Option<Vec<u8>>>(3).unwrap_or_default(),
                    effective_hash: row.get::<_, Option<Vec<u8>>>(4).unwrap_or_default(),
                    signature_ok: row.get::<_, Option<bool>>(5).unwrap_or(false),
                    signature_checked: row.get::<_, Option<bool>>(6).unwrap_or(false),
                    last_seq: unbig(row.get(7)),
                };
                for reason in chain::step(st, &key.0, unbig(buffer_id), &head) {
                    put_break(txn, &key.0, buffer_id, seq, reason).await?;
                }
                changed.insert(key.clone());
            }
            if full && continued {
                walking.push(key);
            }
        }
    }
    let mut rows: (Vec<String>, Vec<i64>, Vec<Json<&ChainState>>) = Default::default();
    for key in &changed {
        rows.0.push(key.0.clone());
        rows.1.push(key.1);
        rows.2.push(Json(&states[key]));
    }
    txn.execute(
        &txn.prepare_cached(
            "INSERT INTO chain_state (gateway, buffer_id, state) \
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::jsonb[]) \
             ON CONFLICT (gateway, buffer_id) DO UPDATE SET state = excluded.state",
        )
        .await
        .map_err(pg_err)?,
        &[&rows.0, &rows.1, &rows.2],
    )
    .await
    .map_err(pg_err)?;
    Ok(())
}

/// A read-only transaction on one snapshot, however many batches are
/// written meanwhile.
/// A read-only transaction on one snapshot. It locks `points` (shared)
/// before its snapshot is taken, so retention cannot drop a partition from
/// under it, and the horizon it reads is the one its points agree with.
async fn snapshot(client: &mut Object) -> Result<deadpool_postgres::Transaction<'_>> {
    let txn = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg_err)?;
    txn.batch_execute("LOCK TABLE points IN ACCESS SHARE MODE")
        .await
        .map_err(pg_err)?;
    Ok(txn)
}

/// Columns of `batches` that make a `SignedLink` (`link_of`).
const LINK_COLUMNS: &str = "last_seq, received_at_ms, payload, prev_hash, signature, effective_hash, \
     signature_ok, signature_checked, algorithm";

/// A stored link from a row holding `LINK_COLUMNS`.
fn link_of(r: &tokio_postgres::Row) -> SignedLink {
    SignedLink {
        payload: bytes::Bytes::from(r.get::<_, Option<Vec<u8>>>("payload").unwrap_or_default()),
        prev_hash: r.get::<_, Option<Vec<u8>>>("prev_hash").unwrap_or_default(),
        signature: r.get::<_, Option<Vec<u8>>>("signature").unwrap_or_default(),
        effective_hash: r
            .get::<_, Option<Vec<u8>>>("effective_hash")
            .unwrap_or_default(),
        signature_ok: r.get::<_, Option<bool>>("signature_ok").unwrap_or(false),
        last_seq: unbig(r.get("last_seq")),
        signature_checked: r
            .get::<_, Option<bool>>("signature_checked")
            .unwrap_or(false),
        received_at_ms: r.get("received_at_ms"),
        algorithm: r.get::<_, Option<i32>>("algorithm").unwrap_or(0),
    }
}

/// A series as reported, from a row of (id, meta, state).
fn series_row(row: &tokio_postgres::Row) -> Result<SeriesInfo> {
    let meta: Json<SeriesMeta> = row.get(1);
    let state: Option<Vec<u8>> = row.get(2);
    let s = match state {
        Some(b) => SeriesState::parse(&b)?,
        None => SeriesState::default(),
    };
    Ok(series_info(unbig(row.get(0)), meta.0, &s))
}

fn count_quality(c: &mut WindowCounts, quality: i32, n: u64) {
    match quality {
        0 => c.good += n,
        1 => c.uncertain += n,
        _ => c.bad += n,
    }
}

impl PgStore {
    /// Loss records and sequence holes of `gateways` (None: of every gateway).
    async fn losses_in(&self, gateways: Option<Vec<String>>) -> Result<Vec<LossInfo>> {
        let client = self.client().await?;
        let all = gateways.is_none();
        let gateways = gateways.unwrap_or_default();
        let rows = client
            .query(
                "SELECT gateway, buffer_id, first_seq, record FROM losses \
                 WHERE $1 OR gateway = ANY($2) ORDER BY gateway, buffer_id, first_seq",
                &[&all, &gateways],
            )
            .await
            .map_err(pg_err)?;
        let mut manifests: HashMap<(String, u64), Option<Manifest>> = HashMap::new();
        let mut out = Vec::new();
        for row in rows {
            let gateway: String = row.get(0);
            let record: Json<LossRecord> = row.get(3);
            let versions: BTreeSet<u64> = record.0.tags.iter().map(|t| t.0).collect();
            for v in versions {
                if manifests.contains_key(&(gateway.clone(), v)) {
                    continue;
                }
                let m = client
                    .query_opt(
                        "SELECT manifest FROM manifests WHERE gateway = $1 AND version = $2",
                        &[&gateway, &big(v)],
                    )
                    .await
                    .map_err(pg_err)?
                    .map(|r| {
                        Manifest::decode(r.get::<_, Vec<u8>>(0).as_slice())
                            .map_err(|e| StoreError::Backend(e.to_string()))
                    })
                    .transpose()?;
                manifests.insert((gateway.clone(), v), m);
            }
            out.push(record.0.info(
                &gateway,
                unbig(row.get(1)),
                unbig(row.get(2)),
                |version, tag| {
                    let Some(Some(m)) = manifests.get(&(gateway.clone(), version)) else {
                        return Ok((String::new(), format!("#{tag} of manifest {version:016x}")));
                    };
                    let t = m.tags.get(tag as usize);
                    let d = t.and_then(|t| m.devices.get(t.device as usize));
                    Ok::<_, StoreError>((
                        d.map_or_else(String::new, |d| d.id.clone()),
                        t.map_or_else(|| format!("#{tag}"), |t| t.name.clone()),
                    ))
                },
            )?);
        }
        for row in client
            .query(
                "SELECT gateway, buffer_id, ranges FROM streams WHERE $1 OR gateway = ANY($2) \
                 ORDER BY gateway, buffer_id",
                &[&all, &gateways],
            )
            .await
            .map_err(pg_err)?
        {
            let gateway: String = row.get(0);
            let bytes: Vec<u8> = row.get(2);
            out.extend(stream::holes(
                &gateway,
                unbig(row.get(1)),
                &SeqRanges::decode(&bytes),
                now_ms(),
            ));
        }
        Ok(out)
    }

    /// Chain status of the streams of `gateways` (None: of every gateway).
    async fn chains_in(&self, gateways: Option<Vec<String>>) -> Result<Vec<ChainInfo>> {
        let client = self.client().await?;
        let all = gateways.is_none();
        let gateways = gateways.unwrap_or_default();
        let mut streams: BTreeMap<(String, u64), ChainState> = BTreeMap::new();
        for row in client
            .query(
                "SELECT gateway, buffer_id, state FROM chain_state WHERE $1 OR gateway = ANY($2)",
                &[&all, &gateways],
            )
            .await
            .map_err(pg_err)?
        {
            streams.insert(
                (row.get(0), unbig(row.get(1))),
                row.get::<_, Json<ChainState>>(2).0,
            );
        }
        let mut breaks: BTreeMap<(String, u64), Vec<(u64, ChainBreak)>> = BTreeMap::new();
        for row in client
            .query(
                "SELECT gateway, buffer_id, seq, record FROM chain_breaks WHERE $1 OR gateway = ANY($2)",
                &[&all, &gateways],
            )
            .await
            .map_err(pg_err)?
        {
            let key = (row.get::<_, String>(0), unbig(row.get(1)));
            streams.entry(key.clone()).or_default();
            breaks
                .entry(key)
                .or_default()
                .push((unbig(row.get(2)), row.get::<_, Json<ChainBreak>>(3).0));
        }
        let mut out = Vec::with_capacity(streams.len());
        for ((gateway, buffer_id), st) in streams {
            let waiting = client
                .query_one(
                    "SELECT count(*) FROM batches WHERE gateway = $1 AND buffer_id = $2 AND seq > $3 \
                     AND payload IS NOT NULL",
                    &[&gateway, &big(buffer_id), &big(st.verified_through)],
                )
                .await
                .map_err(pg_err)?
                .get::<_, i64>(0);
            let mut list = breaks
                .remove(&(gateway.clone(), buffer_id))
                .unwrap_or_default();
            list.sort_by_key(|(seq, _)| *seq);
            out.push(ChainInfo {
                buffer_id: format!("{buffer_id:016x}"),
                gateway,
                verified_from: st.verified_from,
                verified_through: st.verified_through,
                head_hash: st.head.unwrap_or_default(),
                waiting: unbig(waiting),
                breaks: list.into_iter().map(|(_, b)| b).collect(),
            });
        }
        Ok(out)
    }

    /// A gateway's evidence over a window (`store::export`), on one snapshot.
    async fn collect(
        &self,
        gateway: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<super::export::Collected> {
        use futures_util::TryStreamExt;
        let mut client = self.client().await?;
        let record = self
            .gateway_record(&client, gateway)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("gateway `{gateway}`")))?;
        let txn = snapshot(&mut client).await?;
        let mut ranges = super::export::Ranges::new(from_ms, to_ms);
        let links = txn
            .query_raw(
                &format!(
                    "SELECT buffer_id, seq, {LINK_COLUMNS} FROM batches \
                     WHERE gateway = $1 AND payload IS NOT NULL"
                ),
                [gateway],
            )
            .await
            .map_err(pg_err)?;
        let mut links = std::pin::pin!(links);
        while let Some(row) = links.try_next().await.map_err(pg_err)? {
            ranges.see(
                unbig(row.get("buffer_id")),
                unbig(row.get("seq")),
                &link_of(&row),
            );
        }
        let mut gather = super::export::Gather::new();
        gather.points_from(partitions::horizon(&txn).await?);
        for (&buffer_id, &(lo, hi)) in &ranges.by_buffer {
            let (b, lo, hi) = (big(buffer_id), big(lo), big(hi));
            let breaks = txn
                .query(
                    "SELECT record FROM chain_breaks WHERE gateway = $1 AND buffer_id = $2 ORDER BY seq",
                    &[&gateway, &b],
                )
                .await
                .map_err(pg_err)?
                .iter()
                .map(|r| r.get::<_, Json<ChainBreak>>(0).0)
                .collect();
            gather.stream(buffer_id, breaks);
            for row in txn
                .query(
                    &format!(
                        "SELECT seq, {LINK_COLUMNS} FROM batches WHERE gateway = $1 AND buffer_id = $2 \
                         AND seq BETWEEN $3 AND $4 AND payload IS NOT NULL ORDER BY seq"
                    ),
                    &[&gateway, &b, &lo, &hi],
                )
                .await
                .map_err(pg_err)?
            {
                gather.link(unbig(row.get("seq")), &link_of(&row));
            }
            for row in txn
                .query(
                    "SELECT first_seq, record FROM losses WHERE gateway = $1 AND buffer_id = $2 \
                     AND first_seq BETWEEN $3 AND $4 ORDER BY first_seq",
                    &[&gateway, &b, &lo, &hi],
                )
                .await
                .map_err(pg_err)?
            {
                gather.loss(
                    buffer_id,
                    unbig(row.get(0)),
                    row.get::<_, Json<LossRecord>>(1).0,
                );
            }
        }
        let versions: Vec<i64> = gather.versions.iter().map(|v| big(*v)).collect();
        let manifests = txn
            .query(
                "SELECT version, manifest FROM manifests WHERE gateway = $1 AND version = ANY($2) \
                 ORDER BY version",
                &[&gateway, &versions],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| crate::evidence::bundle::ManifestEvidence {
                version: format!("{:016x}", unbig(r.get(0))),
                bytes: hex::encode(r.get::<_, Vec<u8>>(1)),
            })
            .collect();
        let series: Vec<(u64, String, String)> = txn
            .query(
                "SELECT id, device, tag FROM series WHERE gateway = $1 ORDER BY id",
                &[&gateway],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| (unbig(r.get(0)), r.get(1), r.get(2)))
            .collect();
        // What the query tables serve for each collected batch.
        if let Some((first, last)) = gather.point_times() {
            let names: HashMap<u64, (&str, &str)> = series
                .iter()
                .map(|(id, d, t)| (*id, (d.as_str(), t.as_str())))
                .collect();
            let ids: Vec<i64> = series.iter().map(|s| big(s.0)).collect();
            let points = txn
                .query_raw(
                    "SELECT series, time_ms, quality, quality_code, kind, num, bits, txt, server_delta_ms, \
                     buffer_id, seq FROM points WHERE series = ANY($1) AND time_ms >= $2 AND time_ms <= $3",
                    [
                        &ids as &(dyn ToSql + Sync),
                        &first as &(dyn ToSql + Sync),
                        &last as &(dyn ToSql + Sync),
                    ],
                )
                .await
                .map_err(pg_err)?;
            let mut points = std::pin::pin!(points);
            while let Some(row) = points.try_next().await.map_err(pg_err)? {
                let (device, tag) = names
                    .get(&unbig(row.get("series")))
                    .copied()
                    .unwrap_or(("", ""));
                gather.served(
                    unbig(row.get("buffer_id")),
                    unbig(row.get("seq")),
                    device,
                    tag,
                    &point_of(&row),
                );
            }
        }
        txn.commit().await.map_err(pg_err)?;
        Ok(gather.finish(gateway, record, manifests, series))
    }

    async fn gateway_record(&self, client: &Object, id: &str) -> Result<Option<GatewayRecord>> {
        Ok(client
            .query_opt("SELECT record FROM gateways WHERE id = $1", &[&id])
            .await
            .map_err(pg_err)?
            .map(|r| r.get::<_, Json<GatewayRecord>>(0).0))
    }
}

impl PgStore {
    /// `AnyStore::bench_put_rollups`.
    #[doc(hidden)]
    pub async fn bench_put_rollups(
        &self,
        days: Vec<(u64, i64, SeriesDay)>,
        runs: Vec<(u64, u8, i64, i64)>,
        hours: Vec<(u64, i64, rollup::HourStats)>,
        gateway_days: Vec<(String, i64, GatewayDay)>,
    ) -> Result<()> {
        let mut w = GroupWrites::default();
        for (s, d, row) in days {
            w.days.insert((s, d), row);
        }
        for (s, k, a, b) in runs {
            w.runs.entry((s, k)).or_default().insert(a, b);
            w.runs_changed.insert((s, k, a));
        }
        for (s, h, v) in hours {
            w.hours.insert((s, h), v);
        }
        for (g, d, row) in gateway_days {
            w.gateway_days.insert((g, d), row);
        }
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(pg_err)?;
        write_rollups(&txn, &w).await?;
        txn.commit().await.map_err(pg_err)?;
        self.changed(&client).await
    }

    /// `AnyStore::bench_backdate_series`.
    #[doc(hidden)]
    pub async fn bench_backdate_series(&self, created_ms: i64) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE series SET meta = jsonb_set(meta, '{created_ms}', to_jsonb($1::bigint))",
                &[&created_ms],
            )
            .await
            .map_err(pg_err)?;
        self.changed(&client).await
    }
}

impl Store for PgStore {
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    async fn register_gateway(&self, id: &str, public_key: Option<PublicKey>) -> Result<String> {
        let client = self.client().await?;
        let token = registry::register_gateway(&client, id, public_key).await?;
        self.changed(&client).await?;
        Ok(token)
    }

    async fn gateway_key(&self, id: &str) -> Result<Option<(PublicKey, String)>> {
        let client = self.client().await?;
        let Some(r) = self.gateway_record(&client, id).await? else {
            return Ok(None);
        };
        Ok(r.bound_key()?
            .map(|k| (k, r.key_source.unwrap_or_default())))
    }

    async fn bind_key_on_first_use(&self, id: &str, public_key: PublicKey) -> Result<()> {
        let mut client = self.client().await?;
        registry::bind_key(&mut client, id, public_key).await?;
        self.changed(&client).await
    }

    async fn record_break(
        &self,
        gateway: &str,
        buffer_id: u64,
        seq: u64,
        reason: String,
    ) -> Result<()> {
        let client = self.client().await?;
        put_break(&client, gateway, big(buffer_id), seq, reason).await?;
        self.changed(&client).await
    }

    async fn chains(&self) -> Result<Vec<ChainInfo>> {
        self.chains_in(None).await
    }

    async fn chains_of(&self, gateways: &[String]) -> Result<Vec<ChainInfo>> {
        self.chains_in(Some(distinct(gateways))).await
    }

    async fn authenticate(&self, id: &str, token: &str) -> Result<bool> {
        let client = self.client().await?;
        match self.gateway_record(&client, id).await? {
            Some(r) => r.accepts(id, token),
            None => Ok(false),
        }
    }

    async fn rotate_token(&self, id: &str, grace: Duration) -> Result<String> {
        let mut client = self.client().await?;
        let token = registry::rotate_token(&mut client, id, grace).await?;
        self.changed(&client).await?;
        Ok(token)
    }

    async fn gateways(&self) -> Result<Vec<GatewayInfo>> {
        let client = self.client().await?;
        Ok(client
            .query("SELECT id, registered_at_ms FROM gateways ORDER BY id", &[])
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| GatewayInfo {
                id: r.get(0),
                registered_at_ms: r.get(1),
            })
            .collect())
    }

    async fn open_stream(&self, gateway: &str, buffer_id: u64, first_unacked: u64) -> Result<u64> {
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(pg_err)?;
        txn.execute(
            "INSERT INTO streams (gateway, buffer_id, ranges) VALUES ($1, $2, '') ON CONFLICT DO NOTHING",
            &[&gateway, &big(buffer_id)],
        )
        .await
        .map_err(pg_err)?;
        let row = txn
            .query_one(
                "SELECT ranges FROM streams WHERE gateway = $1 AND buffer_id = $2 FOR UPDATE",
                &[&gateway, &big(buffer_id)],
            )
            .await
            .map_err(pg_err)?;
        let mut ranges = SeqRanges::decode(&row.get::<_, Vec<u8>>(0));
        let record = stream::acknowledged_elsewhere(&mut ranges, first_unacked, now_ms());
        if let Some(record) = &record {
            txn.execute(
                "INSERT INTO losses (gateway, buffer_id, first_seq, record) VALUES ($1, $2, 1, $3) \
                 ON CONFLICT (gateway, buffer_id, first_seq) DO UPDATE SET record = excluded.record",
                &[&gateway, &big(buffer_id), &Json(record)],
            )
            .await
            .map_err(pg_err)?;
            txn.execute(
                "UPDATE streams SET ranges = $3 WHERE gateway = $1 AND buffer_id = $2",
                &[&gateway, &big(buffer_id), &ranges.encode()],
            )
            .await
            .map_err(pg_err)?;
        }
        txn.commit().await.map_err(pg_err)?;
        if record.is_some() {
            self.changed(&client).await?;
        }
        Ok(ranges.contiguous())
    }

    async fn put_manifest(&self, gateway: &str, manifest: Manifest) -> Result<Arc<ManifestMap>> {
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(pg_err)?;
        let mut metas = Vec::with_capacity(manifest.tags.len());
        for i in 0..manifest.tags.len() {
            metas.push(SeriesMeta::of_tag(gateway, &manifest, i, now_ms())?);
        }
        let mut series = Vec::with_capacity(metas.len());
        for m in metas {
            // A series keeps the creation time of its first manifest.
            let row = txn
                .query_one(
                    "INSERT INTO series (gateway, device, tag, meta) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (gateway, device, tag) DO UPDATE SET meta = \
                       excluded.meta || jsonb_build_object('created_ms', series.meta->'created_ms') \
                     RETURNING id",
                    &[&m.gateway, &m.device, &m.tag, &Json(&m)],
                )
                .await
                .map_err(pg_err)?;
            series.push(unbig(row.get(0)));
        }
        txn.execute(
            "INSERT INTO manifests (gateway, version, manifest) VALUES ($1, $2, $3) \
             ON CONFLICT (gateway, version) DO UPDATE SET manifest = excluded.manifest",
            &[&gateway, &big(manifest.version), &manifest.encode_to_vec()],
        )
        .await
        .map_err(pg_err)?;
        txn.commit().await.map_err(pg_err)?;
        self.changed(&client).await?;
        Ok(Arc::new(ManifestMap {
            version: manifest.version,
            series,
            intervals: manifest.tags.iter().map(|t| t.interval_ms).collect(),
        }))
    }

    async fn manifest_map(&self, gateway: &str, version: u64) -> Result<Option<Arc<ManifestMap>>> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                "SELECT manifest FROM manifests WHERE gateway = $1 AND version = $2",
                &[&gateway, &big(version)],
            )
            .await
            .map_err(pg_err)?
        else {
            return Ok(None);
        };
        let manifest = Manifest::decode(row.get::<_, Vec<u8>>(0).as_slice())
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let mut devices = Vec::with_capacity(manifest.tags.len());
        let mut tags = Vec::with_capacity(manifest.tags.len());
        for t in &manifest.tags {
            devices.push(
                manifest
                    .devices
                    .get(t.device as usize)
                    .map(|d| d.id.clone())
                    .unwrap_or_default(),
            );
            tags.push(t.name.clone());
        }
        let rows = client
            .query(
                "SELECT k.i, s.id FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS k(d, t, i) \
                 LEFT JOIN series s ON s.gateway = $1 AND s.device = k.d AND s.tag = k.t ORDER BY k.i",
                &[&gateway, &devices, &tags],
            )
            .await
            .map_err(pg_err)?;
        let mut series = Vec::with_capacity(rows.len());
        for (row, (d, t)) in rows.iter().zip(devices.iter().zip(&tags)) {
            let id: Option<i64> = row.get(1);
            series.push(unbig(id.ok_or_else(|| {
                StoreError::Backend(format!("series {gateway}/{d}/{t} missing"))
            })?));
        }
        Ok(Some(Arc::new(ManifestMap {
            version,
            series,
            intervals: manifest.tags.iter().map(|t| t.interval_ms).collect(),
        })))
    }

    fn append(
        &self,
        batch: AppendBatch,
    ) -> impl Future<Output = Result<Appended>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        batch.gateway_id.hash(&mut h);
        let writer = &self.writers[(h.finish() as usize) % self.writers.len()];
        let queued = writer
            .send(Job { batch, reply })
            .map_err(|_| StoreError::Backend("writer task stopped".into()));
        async move {
            queued?;
            rx.await
                .map_err(|_| StoreError::Backend("writer task stopped".into()))?
        }
    }

    async fn series(&self) -> Result<Vec<SeriesInfo>> {
        let client = self.client().await?;
        client
            .query("SELECT id, meta, state FROM series ORDER BY id", &[])
            .await
            .map_err(pg_err)?
            .iter()
            .map(series_row)
            .collect()
    }

    async fn series_of(&self, gateways: &[String]) -> Result<Vec<SeriesInfo>> {
        let client = self.client().await?;
        client
            .query(
                "SELECT id, meta, state FROM series WHERE gateway = ANY($1) ORDER BY id",
                &[&gateways],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(series_row)
            .collect()
    }

    async fn series_by_tag(
        &self,
        gateway: &str,
        device: &str,
        tag: &str,
    ) -> Result<Option<SeriesInfo>> {
        let client = self.client().await?;
        client
            .query_opt(
                "SELECT id, meta, state FROM series WHERE gateway = $1 AND device = $2 AND tag = $3",
                &[&gateway, &device, &tag],
            )
            .await
            .map_err(pg_err)?
            .as_ref()
            .map(series_row)
            .transpose()
    }

    async fn window_counts_of(
        &self,
        series: Vec<u64>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<WindowCounts>> {
        let mut out = vec![WindowCounts::default(); series.len()];
        if to_ms <= from_ms || series.is_empty() {
            return Ok(out);
        }
        let index: HashMap<u64, usize> = series.iter().enumerate().map(|(i, s)| (*s, i)).collect();
        let ids: Vec<i64> = series.iter().map(|s| big(*s)).collect();
        let client = self.client().await?;
        // Whole minutes from their counters, the edges from the points.
        let first_full = from_ms.div_euclid(MINUTE_MS) * MINUTE_MS
            + if from_ms.rem_euclid(MINUTE_MS) == 0 {
                0
            } else {
                MINUTE_MS
            };
        let end_full = to_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
        let edges: Vec<(i64, i64)> = if first_full >= end_full {
            vec![(from_ms, to_ms)]
        } else {
            for row in client
                .query(
                    "SELECT series, sum(good)::bigint, sum(uncertain)::bigint, sum(bad)::bigint FROM minutes \
                     WHERE series = ANY($1) AND minute >= $2 AND minute < $3 GROUP BY series",
                    &[&ids, &first_full, &end_full],
                )
                .await
                .map_err(pg_err)?
            {
                if let Some(&i) = index.get(&unbig(row.get(0))) {
                    let c = &mut out[i];
                    c.good += unbig(row.get(1));
                    c.uncertain += unbig(row.get(2));
                    c.bad += unbig(row.get(3));
                }
            }
            [(from_ms, first_full), (end_full, to_ms)]
                .into_iter()
                .filter(|(a, b)| a < b)
                .collect()
        };
        for (lo, hi) in edges {
            for row in client
                .query(
                    "SELECT series, quality, count(*) FROM points \
                     WHERE series = ANY($1) AND time_ms >= $2 AND time_ms < $3 GROUP BY series, quality",
                    &[&ids, &lo, &hi],
                )
                .await
                .map_err(pg_err)?
            {
                if let Some(&i) = index.get(&unbig(row.get(0))) {
                    count_quality(&mut out[i], row.get(1), unbig(row.get(2)));
                }
            }
        }
        Ok(out)
    }

    async fn points(
        &self,
        series: u64,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredPoint>> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        client
            .query(
                "SELECT time_ms, quality, quality_code, kind, num, bits, txt, server_delta_ms, received_at_ms, backfill \
                 FROM points WHERE series = $1 AND time_ms >= $2 AND time_ms < $3 \
                 ORDER BY time_ms, buffer_id, seq LIMIT $4",
                &[&big(series), &from_ms, &to_ms, &limit],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(|row| {
                let p = point_of(row);
                let t = p.time_offset_ms;
                Ok(StoredPoint {
                    time_ms: t,
                    value: value_json(&p.value),
                    quality: quality_name(quality_of(&p)),
                    quality_code: p.quality_code,
                    received_at_ms: row.get("received_at_ms"),
                    backfill: row.get("backfill"),
                    server_time_ms: p.server_time_delta_ms.map(|d| t.saturating_add(d)),
                })
            })
            .collect()
    }

    async fn losses(&self) -> Result<Vec<LossInfo>> {
        self.losses_in(None).await
    }

    async fn losses_of(&self, gateways: &[String]) -> Result<Vec<LossInfo>> {
        self.losses_in(Some(distinct(gateways))).await
    }

    async fn put_enterprise(&self, e: &Enterprise) -> Result<()> {
        let client = self.client().await?;
        registry::put_enterprise(&client, e).await?;
        self.changed(&client).await
    }

    async fn enterprises(&self) -> Result<Vec<Enterprise>> {
        registry::enterprises(&self.client().await?, None).await
    }

    async fn enterprise(&self, code: &str) -> Result<Option<Enterprise>> {
        registry::enterprise(&self.client().await?, code).await
    }

    async fn put_equipment(&self, code: &str, list: &[Equipment]) -> Result<()> {
        let mut client = self.client().await?;
        registry::put_equipment(&mut client, code, list).await?;
        self.changed(&client).await
    }

    async fn equipment(&self, code: &str) -> Result<Vec<Equipment>> {
        registry::equipment(&self.client().await?, code).await
    }

    async fn assign_gateway(&self, gateway: &str, code: &str) -> Result<()> {
        let mut client = self.client().await?;
        registry::assign_gateway(&mut client, gateway, code).await?;
        self.changed(&client).await
    }

    async fn unassign_gateway(&self, gateway: &str) -> Result<bool> {
        let client = self.client().await?;
        let removed = client
            .execute("DELETE FROM owners WHERE gateway = $1", &[&gateway])
            .await
            .map_err(pg_err)?
            > 0;
        self.changed(&client).await?;
        Ok(removed)
    }

    async fn gateway_owners(&self) -> Result<BTreeMap<String, String>> {
        registry::owners(&self.client().await?, None).await
    }

    async fn gateways_of(&self, codes: &[String]) -> Result<BTreeMap<String, String>> {
        registry::owners(&self.client().await?, Some(codes)).await
    }

    async fn enterprises_of_provider(&self, provider: &str) -> Result<Vec<Enterprise>> {
        registry::enterprises(&self.client().await?, Some(provider)).await
    }

    async fn add_gateway_config(
        &self,
        gateway: &str,
        version: crate::gateway_config::ConfigVersion,
    ) -> Result<u64> {
        let mut client = self.client().await?;
        let n = registry::add_gateway_config(&mut client, gateway, version).await?;
        self.changed(&client).await?;
        Ok(n)
    }

    async fn gateway_configs(
        &self,
        gateway: &str,
    ) -> Result<Vec<crate::gateway_config::ConfigVersion>> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT record FROM gateway_configs WHERE gateway = $1 ORDER BY version",
                &[&gateway],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| r.get::<_, Json<crate::gateway_config::ConfigVersion>>(0).0)
            .collect())
    }

    async fn gateway_config_states(
        &self,
    ) -> Result<BTreeMap<String, crate::gateway_config::ConfigState>> {
        let client = self.client().await?;
        Ok(client
            .query("SELECT gateway, state FROM gateway_config_states", &[])
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get::<_, Json<crate::gateway_config::ConfigState>>(1).0,
                )
            })
            .collect())
    }

    async fn update_gateway_config_state(
        &self,
        gateway: &str,
        change: Box<dyn FnOnce(&mut crate::gateway_config::ConfigState) + Send>,
    ) -> Result<crate::gateway_config::ConfigState> {
        let mut client = self.client().await?;
        let (state, changed) = registry::update_config_state(&mut client, gateway, change).await?;
        if changed {
            self.changed(&client).await?;
        }
        Ok(state)
    }

    async fn put_account(&self, a: &Account) -> Result<String> {
        let mut client = self.client().await?;
        let token = registry::put_account(&mut client, a).await?;
        self.changed(&client).await?;
        Ok(token)
    }

    async fn account_by_token(&self, token: &str) -> Result<Option<Account>> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT record FROM accounts WHERE token_sha256 = $1",
                &[&crate::registry::token_digest(token).as_slice()],
            )
            .await
            .map_err(pg_err)?
            .map(|r| r.get::<_, Json<Account>>(0).0))
    }

    async fn accounts(&self) -> Result<Vec<Account>> {
        let client = self.client().await?;
        Ok(client
            .query("SELECT record FROM accounts ORDER BY name", &[])
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| r.get::<_, Json<Account>>(0).0)
            .collect())
    }

    async fn log_access(&self, a: &Access) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO access_log (at_ms, record) VALUES ($1, $2)",
                &[&a.at_ms, &Json(a)],
            )
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn access_log(&self, limit: usize) -> Result<Vec<Access>> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(client
            .query(
                "SELECT record FROM access_log ORDER BY at_ms DESC, id DESC LIMIT $1",
                &[&limit],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| r.get::<_, Json<Access>>(0).0)
            .collect())
    }

    async fn series_days(
        &self,
        series: &[u64],
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<(u64, i64, SeriesDay)>> {
        let client = self.client().await?;
        let ids: Vec<i64> = series.iter().map(|s| big(*s)).collect();
        let rows = client
            .query(
                "SELECT series, day, row FROM series_days WHERE series = ANY($1) AND day >= $2 AND day < $3 \
                 ORDER BY series, day",
                &[&ids, &from_day, &to_day],
            )
            .await
            .map_err(pg_err)?;
        let mut by_series: HashMap<u64, Vec<(i64, SeriesDay)>> = HashMap::new();
        for row in rows {
            let bytes: Vec<u8> = row.get(2);
            let day = SeriesDay::decode(bytes.as_slice())
                .map_err(|e| StoreError::Backend(format!("day rollup: {e}")))?;
            by_series
                .entry(unbig(row.get(0)))
                .or_default()
                .push((row.get(1), day));
        }
        // In the order the series were asked, as the embedded store answers.
        let mut out = Vec::new();
        for s in series {
            for (d, row) in by_series.remove(s).unwrap_or_default() {
                out.push((*s, d, row));
            }
        }
        Ok(out)
    }

    async fn series_runs_of(&self, queries: Vec<RunsQuery>) -> Result<Vec<Vec<(i64, i64)>>> {
        let client = self.client().await?;
        let mut s = Vec::with_capacity(queries.len());
        let mut k = Vec::with_capacity(queries.len());
        let mut lo = Vec::with_capacity(queries.len());
        let mut hi = Vec::with_capacity(queries.len());
        for q in &queries {
            s.push(big(q.series));
            k.push(i16::from(q.kind));
            lo.push(q.from.saturating_sub(q.tol));
            hi.push(q.to);
        }
        // Runs starting before `from` may reach into the window: from the
        // last run starting at or before `from - tol`, as `runs_in`.
        let rows = client
            .query(
                "SELECT q.i, r.start_ms, r.end_ms \
                 FROM unnest($1::bigint[], $2::smallint[], $3::bigint[], $4::bigint[]) WITH ORDINALITY AS q(s, k, lo, hi, i) \
                 JOIN series_runs r ON r.series = q.s AND r.kind = q.k AND r.start_ms < q.hi AND r.start_ms >= \
                   COALESCE((SELECT max(start_ms) FROM series_runs b WHERE b.series = q.s AND b.kind = q.k AND b.start_ms <= q.lo), \
                            -9223372036854775808) \
                 ORDER BY q.i, r.start_ms",
                &[&s, &k, &lo, &hi],
            )
            .await
            .map_err(pg_err)?;
        let mut out: Vec<Vec<(i64, i64)>> = vec![Vec::new(); queries.len()];
        for row in rows {
            let i = row.get::<_, i64>(0) as usize - 1;
            out[i].push((row.get(1), row.get(2)));
        }
        Ok(out
            .into_iter()
            .zip(&queries)
            .map(|(runs, q)| rollup::merge_runs(runs, q.tol))
            .collect())
    }

    async fn series_hours_of(
        &self,
        series: Vec<u64>,
        from: i64,
        to: i64,
    ) -> Result<Vec<Vec<HourRow>>> {
        let client = self.client().await?;
        let ids: Vec<i64> = series.iter().map(|s| big(*s)).collect();
        let index: HashMap<u64, usize> = series.iter().enumerate().map(|(i, s)| (*s, i)).collect();
        let mut out: Vec<Vec<HourRow>> = vec![Vec::new(); series.len()];
        for row in client
            .query(
                "SELECT series, hour, n, sum, min, max FROM series_hours \
                 WHERE series = ANY($1) AND hour >= $2 AND hour < $3 ORDER BY series, hour",
                &[&ids, &from, &to],
            )
            .await
            .map_err(pg_err)?
        {
            if let Some(&i) = index.get(&unbig(row.get(0))) {
                out[i].push((
                    row.get(1),
                    unbig(row.get(2)),
                    row.get(3),
                    row.get(4),
                    row.get(5),
                ));
            }
        }
        // A series asked twice gets its rows twice.
        for (i, s) in series.iter().enumerate() {
            if index.get(s) != Some(&i) {
                out[i] = out[index[s]].clone();
            }
        }
        Ok(out)
    }

    async fn gateway_days(
        &self,
        gateway: &str,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<(i64, GatewayDay)>> {
        let client = self.client().await?;
        client
            .query(
                "SELECT day, row FROM gateway_days WHERE gateway = $1 AND day >= $2 AND day < $3 ORDER BY day",
                &[&gateway, &from_day, &to_day],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(|row| {
                let bytes: Vec<u8> = row.get(1);
                Ok((
                    row.get(0),
                    GatewayDay::decode(bytes.as_slice())
                        .map_err(|e| StoreError::Backend(format!("gateway day rollup: {e}")))?,
                ))
            })
            .collect()
    }

    async fn export_evidence(
        &self,
        gateways: Vec<String>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Bundle> {
        super::export::check_window(from_ms, to_ms)?;
        let mut collected = Vec::with_capacity(gateways.len());
        for gateway in gateways {
            collected.push(self.collect(&gateway, from_ms, to_ms).await?);
        }
        let key = hex::encode(self.digest_key.verifying_key().as_bytes());
        super::export::bundle(self, collected, from_ms, to_ms, key).await
    }

    async fn day_digests(&self, gateways: Vec<String>, day: String) -> Result<Vec<DayEvidence>> {
        let start = crate::evidence::digest::parse_day(&day)
            .ok_or_else(|| StoreError::Invalid(format!("day `{day}`: expected YYYY-MM-DD")))?;
        let gateways = if gateways.is_empty() {
            self.gateways().await?.into_iter().map(|g| g.id).collect()
        } else {
            gateways
        };
        let client = self.client().await?;
        let mut out = Vec::with_capacity(gateways.len());
        for gateway in gateways {
            if self.gateway_record(&client, &gateway).await?.is_none() {
                return Err(StoreError::NotFound(format!("gateway `{gateway}`")));
            }
            let links = client
                .query(
                    "SELECT buffer_id, seq, algorithm, prev_hash, payload FROM batches \
                     WHERE gateway = $1 AND payload IS NOT NULL AND received_at_ms >= $2 AND received_at_ms < $3",
                    &[&gateway, &start, &(start + 86_400_000)],
                )
                .await
                .map_err(pg_err)?
                .iter()
                .map(|r| crate::evidence::digest::DayLink {
                    buffer_id: unbig(r.get(0)),
                    seq: unbig(r.get(1)),
                    link_hash: link_hash(
                        r.get::<_, Option<i32>>(2).unwrap_or(0),
                        &r.get::<_, Option<Vec<u8>>>(3).unwrap_or_default(),
                        &r.get::<_, Option<Vec<u8>>>(4).unwrap_or_default(),
                    ),
                })
                .collect();
            out.push(crate::evidence::digest::day_evidence(
                &self.digest_key,
                &gateway,
                &day,
                links,
            ));
        }
        Ok(out)
    }

    async fn verify_stored(&self) -> Result<StoreVerification> {
        use super::verify::{self, Counts, Recount, Rolled};
        use futures_util::TryStreamExt;
        let mut client = self.client().await?;
        let txn = snapshot(&mut client).await?;
        let mut names = HashMap::new();
        for row in txn
            .query("SELECT id, meta FROM series", &[])
            .await
            .map_err(pg_err)?
        {
            names.insert(unbig(row.get(0)), row.get::<_, Json<SeriesMeta>>(1).0);
        }
        let mut recount = Recount::new(names, partitions::horizon(&txn).await?);
        let none: [i64; 0] = [];
        let points = txn
            .query_raw(
                "SELECT series, time_ms, quality, quality_code, kind, num, bits, txt, server_delta_ms, \
                 received_at_ms, backfill, buffer_id, seq FROM points",
                none,
            )
            .await
            .map_err(pg_err)?;
        let mut points = std::pin::pin!(points);
        while let Some(row) = points.try_next().await.map_err(pg_err)? {
            recount.add(
                unbig(row.get("series")),
                &point_of(&row),
                row.get("backfill"),
                row.get("received_at_ms"),
                unbig(row.get("buffer_id")),
                unbig(row.get("seq")),
            );
        }
        let mut rolled = Rolled::default();
        for row in txn
            .query(
                "SELECT series, minute, good, uncertain, bad FROM minutes",
                &[],
            )
            .await
            .map_err(pg_err)?
        {
            rolled.minutes.insert(
                (unbig(row.get(0)), row.get(1)),
                (unbig(row.get(2)), unbig(row.get(3)), unbig(row.get(4))),
            );
        }
        for row in txn
            .query("SELECT series, day, row FROM series_days", &[])
            .await
            .map_err(pg_err)?
        {
            let d = SeriesDay::decode(row.get::<_, Vec<u8>>(2).as_slice())
                .map_err(|e| StoreError::Backend(format!("day rollup: {e}")))?;
            rolled
                .days
                .insert((unbig(row.get(0)), row.get(1)), Counts::of_day(&d));
        }
        for row in txn
            .query("SELECT series, hour, n, min, max FROM series_hours", &[])
            .await
            .map_err(pg_err)?
        {
            rolled.hours.insert(
                (unbig(row.get(0)), row.get(1)),
                (unbig(row.get(2)), row.get(3), row.get(4)),
            );
        }
        for row in txn
            .query("SELECT id, state FROM series WHERE state IS NOT NULL", &[])
            .await
            .map_err(pg_err)?
        {
            let s = SeriesState::parse(&row.get::<_, Vec<u8>>(1))?;
            rolled
                .totals
                .insert(unbig(row.get(0)), Counts::of_state(&s));
        }
        for row in txn
            .query("SELECT gateway, day, row FROM gateway_days", &[])
            .await
            .map_err(pg_err)?
        {
            let d = GatewayDay::decode(row.get::<_, Vec<u8>>(2).as_slice())
                .map_err(|e| StoreError::Backend(format!("gateway day rollup: {e}")))?;
            rolled
                .gateway_days
                .insert((row.get(0), row.get(1)), d.points);
        }
        for row in txn
            .query(
                "SELECT series, start_ms, end_ms FROM series_runs WHERE kind = $1",
                &[&i16::from(rollup::RUN_DATA)],
            )
            .await
            .map_err(pg_err)?
        {
            rolled
                .data_runs
                .entry(unbig(row.get(0)))
                .or_default()
                .insert(row.get(1), row.get(2));
        }
        for row in txn
            .query("SELECT gateway, version, manifest FROM manifests", &[])
            .await
            .map_err(pg_err)?
        {
            rolled.manifests.insert(
                (row.get(0), unbig(row.get(1))),
                Manifest::decode(row.get::<_, Vec<u8>>(2).as_slice()).ok(),
            );
        }
        for row in txn
            .query(
                "SELECT gateway, buffer_id, first_seq, record FROM losses",
                &[],
            )
            .await
            .map_err(pg_err)?
        {
            if row.get::<_, Json<LossRecord>>(3).0.is_rejection() {
                rolled
                    .rejected
                    .insert((row.get(0), unbig(row.get(1)), unbig(row.get(2))));
            }
        }
        let mut keys = HashMap::new();
        for row in txn
            .query("SELECT id, record FROM gateways", &[])
            .await
            .map_err(pg_err)?
        {
            let record = row.get::<_, Json<GatewayRecord>>(1).0;
            keys.insert(row.get::<_, String>(0), record.bound_key().ok().flatten());
        }
        let links: Vec<Result<verify::StoredLink>> = txn
            .query(
                &format!(
                    "SELECT gateway, buffer_id, seq, {LINK_COLUMNS} FROM batches \
                     WHERE payload IS NOT NULL ORDER BY gateway, buffer_id, seq"
                ),
                &[],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| {
                Ok((
                    r.get("gateway"),
                    unbig(r.get("buffer_id")),
                    unbig(r.get("seq")),
                    Ok(link_of(r)),
                ))
            })
            .collect();
        txn.commit().await.map_err(pg_err)?;
        verify::walk(recount, rolled, links, |gateway| {
            Ok(keys.get(gateway).cloned().flatten())
        })
    }

    async fn backup(&self, _out: PathBuf) -> Result<BackupInfo> {
        Err(StoreError::Invalid(
            "a PostgreSQL store is backed up with pg_dump (README, \"PostgreSQL\"), not by ingest"
                .into(),
        ))
    }
}

#[cfg(test)]
mod suite;
