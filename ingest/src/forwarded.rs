//! Reverse-proxy headers on the HTTP API.
//!
//! Behind a proxy (nginx, Caddy, a cloud load balancer) the TCP peer is the
//! proxy, and the client's address and scheme arrive in `X-Forwarded-For`,
//! `X-Forwarded-Proto` and `X-Forwarded-Host`. Those headers are believed
//! only when the peer is one of `--trusted-proxy`; from any other peer they
//! are removed before a handler sees the request, so a client cannot claim
//! another address or pretend it came over HTTPS.
//!
//! Each request gets a [`Client`] extension: the client address (the
//! right-most `X-Forwarded-For` entry that is not itself a trusted proxy) and
//! the scheme. `GET /api/v1/client` (with a token) answers it, for checking
//! a proxy setup.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::IncomingStream;

const FORWARDED_HEADERS: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

/// The TCP peer of a connection, for both listeners (plain and TLS).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, crate::tls::TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, crate::tls::TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// Who sent a request, as far as ingest can tell.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Client {
    pub addr: Option<IpAddr>,
    /// `http` or `https` as the client used it.
    pub scheme: String,
    /// Whether a trusted proxy passed the request on.
    pub via_proxy: bool,
    pub host: Option<String>,
}

/// Adds the [`Client`] extension to every request of `router` (which serves
/// it, behind a token, at `GET /api/v1/client`); `tls`: whether the listener
/// itself speaks TLS.
pub fn layer(router: Router, trusted: Vec<IpAddr>, tls: bool) -> Router {
    let trusted = Arc::new(trusted);
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let trusted = trusted.clone();
            async move { resolve(req, next, &trusted, tls).await }
        },
    ))
}

async fn resolve(mut req: Request, next: Next, trusted: &[IpAddr], tls: bool) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0.0.ip());
    let direct_scheme = if tls { "https" } else { "http" };
    let client = match peer {
        Some(ip) if trusted.contains(&ip) => from_proxy(req.headers(), ip, trusted, direct_scheme),
        _ => {
            let headers = req.headers_mut();
            for h in FORWARDED_HEADERS {
                headers.remove(h);
            }
            Client {
                addr: peer,
                scheme: direct_scheme.to_string(),
                via_proxy: false,
                host: None,
            }
        }
    };
    req.extensions_mut().insert(client);
    next.run(req).await
}

fn from_proxy(headers: &HeaderMap, proxy: IpAddr, trusted: &[IpAddr], scheme: &str) -> Client {
    let first = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    // Right to left: each proxy appends the peer it saw; the first address
    // that is not one of ours is the client.
    let chain: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .collect();
    let addr = chain
        .iter()
        .rev()
        .find(|a| !trusted.contains(a))
        .or(chain.first())
        .copied()
        .unwrap_or(proxy);
    let scheme = match first("x-forwarded-proto").as_deref() {
        Some("https") => "https",
        Some("http") => "http",
        _ => scheme,
    };
    Client {
        addr: Some(addr),
        scheme: scheme.to_string(),
        via_proxy: true,
        host: first("x-forwarded-host"),
    }
}
