//! Ingest's metrics, defined here and only here, and the listener that
//! serves them (`serve --metrics-listen ADDR`, off by default, no token):
//! `/metrics` (Prometheus text), `/healthz` (the process answers) and
//! `/readyz` (serving, not shutting down).
//!
//! The metrics are process-wide (one ingest per process): the gRPC path
//! calls one function per event. Names follow
//! `guantong_ingest_<name>_<unit>[_total]`; there are no labels, so a
//! gateway fleet of any size costs the same.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::{AppendBatch, AppendOutcome, Appended, Store};

struct Metrics {
    registry: Registry,
    batches_stored: Counter,
    points_stored: Counter,
    duplicates: Counter,
    rejected: Counter,
    ack_latency: Histogram,
    streams: Gauge,
    http_refused: Counter,
    http_timed_out: Counter,
    reports_computed: Counter,
    reports_cached: Counter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = Metrics {
        registry: Registry::default(),
        batches_stored: Counter::default(),
        points_stored: Counter::default(),
        duplicates: Counter::default(),
        rejected: Counter::default(),
        // 0.5 ms to ~16 s.
        ack_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        streams: Gauge::default(),
        http_refused: Counter::default(),
        http_timed_out: Counter::default(),
        reports_computed: Counter::default(),
        reports_cached: Counter::default(),
    };
    let mut r = Registry::default();
    r.register(
        "guantong_ingest_batches_stored",
        "Batches stored (first time)",
        m.batches_stored.clone(),
    );
    r.register(
        "guantong_ingest_points_stored",
        "Points in the batches stored",
        m.points_stored.clone(),
    );
    r.register(
        "guantong_ingest_batches_duplicate",
        "Batches received again and found already stored",
        m.duplicates.clone(),
    );
    r.register(
        "guantong_ingest_batches_rejected",
        "Batches refused for good (recorded as a loss)",
        m.rejected.clone(),
    );
    r.register(
        "guantong_ingest_ack_latency_seconds",
        "Time from a batch's arrival to its ack (queue and store)",
        m.ack_latency.clone(),
    );
    r.register(
        "guantong_ingest_streams_connected",
        "Gateway streams open now",
        m.streams.clone(),
    );
    r.register(
        "guantong_ingest_http_refused",
        "HTTP requests refused with 503: --http-max-concurrent were being served",
        m.http_refused.clone(),
    );
    r.register(
        "guantong_ingest_http_timed_out",
        "HTTP requests stopped with 408 after --http-timeout",
        m.http_timed_out.clone(),
    );
    r.register(
        "guantong_ingest_reports_computed",
        "Enterprise reports and city views computed from the store",
        m.reports_computed.clone(),
    );
    r.register(
        "guantong_ingest_reports_cached",
        "Enterprise reports and city views served as computed before (the store unchanged)",
        m.reports_cached.clone(),
    );
    Metrics { registry: r, ..m }
});

/// `store.append(batch)`, counted: its outcome, its points when stored, and
/// the time from now (its arrival) until it is stored and the ack goes out.
pub fn timed_append<S: Store>(
    store: &S,
    batch: AppendBatch,
) -> impl Future<Output = crate::store::Result<Appended>> + Send + 'static {
    let arrived = Instant::now();
    let points = if batch.rejected.is_none() {
        batch.batch.points.len() as u64
    } else {
        0
    };
    let append = store.append(batch);
    async move {
        let result = append.await;
        if let Ok(appended) = &result {
            let m = &*METRICS;
            match appended.outcome {
                AppendOutcome::Stored => {
                    m.batches_stored.inc();
                    m.points_stored.inc_by(points);
                }
                AppendOutcome::Duplicate => {
                    m.duplicates.inc();
                }
            }
            m.ack_latency.observe(arrived.elapsed().as_secs_f64());
        }
        result
    }
}

/// A batch was refused for good.
pub fn batch_rejected() {
    METRICS.rejected.inc();
}

/// An HTTP request was refused: too many in flight.
pub fn http_refused() {
    METRICS.http_refused.inc();
}

/// An HTTP request was stopped at the timeout.
pub fn http_timed_out() {
    METRICS.http_timed_out.inc();
}

/// A report or city view was computed from the store.
pub fn report_computed() {
    METRICS.reports_computed.inc();
}

/// A report or city view was served as computed before.
pub fn report_cached() {
    METRICS.reports_cached.inc();
}

/// Counts an open gateway stream while it lives.
pub struct StreamOpen(());

impl StreamOpen {
    pub fn new() -> StreamOpen {
        METRICS.streams.inc();
        StreamOpen(())
    }
}

impl Default for StreamOpen {
    fn default() -> Self {
        StreamOpen::new()
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        METRICS.streams.dec();
    }
}

/// The metrics in the Prometheus text format (OpenMetrics flavour).
pub fn encode() -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &METRICS.registry)?;
    Ok(text)
}

async fn metrics() -> Response {
    match encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shutdown): State<CancellationToken>) -> Response {
    if shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr`;
/// returns the bound address. Call it once the gRPC and HTTP listeners are
/// bound: from then on `/readyz` is 200 until shutdown begins, then 503
/// while streams drain (the listener lives as long as the process).
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shutdown);
    // Not stopped by `shutdown`: while streams drain, `/readyz` says so.
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "metrics listener stopped");
        }
    });
    info!(addr = %bound, "metrics listening");
    Ok(bound)
}
