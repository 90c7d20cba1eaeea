//! Guantong ingest: authenticates gateways, stores their data exactly once and
//! turns it into connectivity evidence.
//!
//! `start` binds the gRPC listener (gateways) and the HTTP listener (API and
//! pages) and serves both until the shutdown token is cancelled. The gRPC
//! listener speaks TLS when `Options::tls` is set (the binary sets it unless
//! `--plaintext`), the HTTP listener when `Options::http_tls` is also set.

pub mod acceptance;
pub mod ca;
pub mod days;
pub mod dossier;
pub mod evidence;
pub mod fleet;
pub mod forwarded;
pub mod gateway_config;
pub mod grpc;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod registry;
pub mod store;
pub mod tls;
pub mod validate;
pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use guantong_proto::v1::uplink_server::UplinkServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tracing::info;

use crate::grpc::{Connections, Guards, UplinkService};
use crate::store::Store;

/// Largest gRPC message accepted.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub done: JoinHandle<anyhow::Result<()>>,
}

/// Serving options beyond the listeners.
#[derive(Clone, Default)]
pub struct Options {
    /// Bind the key a gateway presents when none was registered for it.
    pub trust_on_first_use: bool,
    /// TLS for the gRPC listener (None: plaintext).
    pub tls: Option<tls::ServerTls>,
    /// Serve HTTP over TLS as well (needs `tls`).
    pub http_tls: bool,
    /// Per-gateway quotas.
    pub limits: limits::Limits,
    /// Checks on points and manifests.
    pub validation: validate::ValidationLimits,
    /// Peers whose X-Forwarded-* headers are believed (reverse proxies).
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Largest gRPC message accepted, bytes (0: [`MAX_MESSAGE_BYTES`]).
    pub max_message_bytes: usize,
    /// Criteria of acceptance verdicts and flags.
    pub criteria: acceptance::Criteria,
}

/// Binds both listeners and serves until `shutdown`, with default options.
pub async fn start<S: Store>(
    store: Arc<S>,
    grpc: SocketAddr,
    http: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    start_with(store, grpc, http, shutdown, Options::default()).await
}

/// Binds both listeners and serves until `shutdown`.
pub async fn start_with<S: Store>(
    store: Arc<S>,
    grpc: SocketAddr,
    http: SocketAddr,
    shutdown: CancellationToken,
    options: Options,
) -> anyhow::Result<Running> {
    let grpc_listener = TcpListener::bind(grpc)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for gRPC on {grpc}: {e}"))?;
    let http_listener = TcpListener::bind(http)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for HTTP on {http}: {e}"))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let connections = Arc::new(Connections::default());
    let guards = Arc::new(Guards {
        quotas: limits::Quotas::new(options.limits),
        validation: options.validation,
        client_auth: options.tls.as_ref().and_then(|t| t.client_auth.clone()),
    });
    let max_message = match options.max_message_bytes {
        0 => MAX_MESSAGE_BYTES,
        n => n,
    };

    let service = UplinkServer::new(
        UplinkService::new(store.clone(), connections.clone())
            .trust_on_first_use(options.trust_on_first_use)
            .guards(guards),
    )
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message)
    .accept_compressed(CompressionEncoding::Zstd)
    // Answers (acks, configuration offers) go uncompressed: they are a few
    // bytes, and tonic builds a zstd context for every message it compresses
    // (about 5 % of ingest's CPU with 1,000 streams, BENCHMARKS.md).
    .accept_compressed(CompressionEncoding::Gzip);
    let grpc_shutdown = shutdown.clone();
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &options.tls {
        server = server
            .tls_config(tls.grpc())
            .map_err(|e| anyhow::anyhow!("TLS settings: {e}"))?;
    }
    let grpc_task = tokio::spawn(async move {
        server
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .add_service(service)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(grpc_listener),
                grpc_shutdown.cancelled_owned(),
            )
            .await
    });
    let router = http::router(Arc::new(http::ApiState {
        store,
        connections,
        criteria: Arc::new(options.criteria.clone()),
        sessions: web::Sessions::default(),
        limits: options.limits.http,
        reports: web::ReportCache::default(),
    }));
    let http_tls = options.tls.is_some() && options.http_tls;
    let router = forwarded::layer(router, options.trusted_proxies.clone(), http_tls)
        .into_make_service_with_connect_info::<forwarded::Peer>();
    let http_shutdown = shutdown.clone();
    let http_task = match (&options.tls, options.http_tls) {
        (Some(tls), true) => {
            let listener = tls::TlsListener::new(http_listener, tls.http_acceptor()?)?;
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(http_shutdown.cancelled_owned())
                    .await
            })
        }
        (None, true) => anyhow::bail!("HTTP over TLS needs the TLS settings"),
        _ => tokio::spawn(async move {
            axum::serve(http_listener, router)
                .with_graceful_shutdown(http_shutdown.cancelled_owned())
                .await
        }),
    };
    info!(grpc = %grpc_addr, http = %http_addr, "ingest listening");
    let done = tokio::spawn(async move {
        shutdown.cancelled().await;
        // Streams end when their gateways notice; do not wait on them forever.
        let _ = tokio::time::timeout(Duration::from_secs(5), grpc_task).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), http_task).await;
        Ok(())
    });
    Ok(Running {
        grpc_addr,
        http_addr,
        done,
    })
}
