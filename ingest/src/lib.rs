//! Guantong ingest: authenticates gateways, stores their data exactly once and
//! turns it into connectivity evidence.
//!
//! `start` binds the gRPC listener (gateways) and the HTTP listener (API and
//! pages) and serves both until the shutdown token is cancelled.

pub mod acceptance;
pub mod evidence;
pub mod grpc;
pub mod http;
pub mod registry;
pub mod store;
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

use crate::grpc::{Connections, UplinkService};
use crate::store::Store;

/// Largest gRPC message accepted.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub done: JoinHandle<anyhow::Result<()>>,
}

/// Serving options beyond the listeners.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Bind the key a gateway presents when none was registered for it.
    pub trust_on_first_use: bool,
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

    let service = UplinkServer::new(
        UplinkService::new(store.clone(), connections.clone())
            .trust_on_first_use(options.trust_on_first_use),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES)
    .accept_compressed(CompressionEncoding::Zstd)
    .accept_compressed(CompressionEncoding::Gzip)
    .send_compressed(CompressionEncoding::Zstd);
    let grpc_shutdown = shutdown.clone();
    let grpc_task = tokio::spawn(async move {
        tonic::transport::Server::builder()
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
        criteria: Arc::new(options.criteria),
    }));
    let http_shutdown = shutdown.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(http_listener, router)
            .with_graceful_shutdown(http_shutdown.cancelled_owned())
            .await
    });
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
