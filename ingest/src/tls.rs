//! TLS for ingest's listeners: the gateway uplink (gRPC) always unless
//! `--plaintext`, the HTTP API with `--http-tls`.
//!
//! # Certificates
//! With no `--tls-cert`, `serve` uses the operator CA in `<data>/tls/`
//! (creating it at first start, see [`crate::ca`]) and issues itself a
//! server certificate at every start for `localhost`, `127.0.0.1`, `::1`, the
//! host name and every `--tls-name`; gateways trust `<data>/tls/ca.pem`.
//! With `--tls-cert`/`--tls-key` (e.g. a public certificate), those are used
//! as they are and gateways may rely on their system roots.
//!
//! # Mutual TLS (`--mtls`)
//! Every gateway must present a certificate issued by the client CA (the
//! operator CA, or `--client-ca`). rustls checks the chain and the validity
//! period during the handshake, so an expired certificate never gets a
//! stream. Per stream, [`ClientAuth::check`] then refuses a certificate
//! revoked (in `<data>/tls/revoked.tsv` or, with `--database`, the database
//! every replica shares; read at each new stream, so a revocation takes
//! effect at the next connection) or whose common name is not the gateway
//! the stream authenticates as.
//!
//! All TLS is rustls on the ring provider (never aws-lc).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::Status;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tracing::{debug, info, warn};

use crate::ca::{self, Ca, Revocations};
use crate::ops::StoreArgs;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Validity of the server certificate `serve` issues itself at each start.
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(397 * 24 * 3600);

/// TLS options of `guantong-ingest serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Serve gateways without TLS: tokens and data cross the network in
    /// clear. Local testing only; logged as a warning at every start.
    #[arg(long, env = "GUANTONG_PLAINTEXT")]
    pub plaintext: bool,
    /// Server certificate chain (PEM) instead of one issued from the
    /// operator CA in `<data>/tls/`.
    #[arg(long, env = "GUANTONG_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, env = "GUANTONG_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Extra DNS name or IP address for the issued server certificate
    /// (repeatable): the name gateways connect to.
    #[arg(long = "tls-name")]
    pub tls_names: Vec<String>,
    /// Require a client certificate from every gateway (mutual TLS), issued
    /// by `guantong-ingest ca issue` (or by `--client-ca`).
    #[arg(long, env = "GUANTONG_MTLS")]
    pub mtls: bool,
    /// CA (PEM) whose certificates gateways present with `--mtls`; default
    /// the operator CA `<data>/tls/ca.pem`.
    #[arg(long, env = "GUANTONG_CLIENT_CA", requires = "mtls")]
    pub client_ca: Option<PathBuf>,
    /// Serve the HTTP API and pages over TLS too, with the same certificate.
    #[arg(long, env = "GUANTONG_HTTP_TLS")]
    pub http_tls: bool,
}

/// A server identity and, with mTLS, how clients are checked.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_auth: Option<ClientAuth>,
}

/// Client certificate checks beyond the handshake.
#[derive(Clone, Debug)]
pub struct ClientAuth {
    pub ca_pem: String,
    pub revocations: Revocations,
}

impl TlsArgs {
    /// The TLS settings these options describe for the store `store` (its
    /// data directory holds the CA; revocations are there and in its
    /// database); None with `--plaintext`.
    pub fn prepare(&self, store: &StoreArgs) -> anyhow::Result<Option<ServerTls>> {
        if self.plaintext {
            if self.mtls || self.http_tls || self.tls_cert.is_some() {
                anyhow::bail!(
                    "--plaintext cannot be combined with --mtls, --http-tls or --tls-cert"
                );
            }
            warn!(
                "--plaintext: gateways connect without TLS; tokens and data cross the network in clear (local testing only)"
            );
            return Ok(None);
        }
        let dir = ca::dir(&store.data);
        let needs_ca = self.tls_cert.is_none() || (self.mtls && self.client_ca.is_none());
        let ca = if needs_ca {
            let (ca, created) = Ca::open_or_create(&dir)?;
            if created {
                info!(ca = %ca.cert_path().display(), "created the operator CA; gateways trust this file (uplink.ca_file)");
            }
            Some(ca)
        } else {
            None
        };
        let (cert_pem, key_pem) = match (&self.tls_cert, &self.tls_key, &ca) {
            (Some(cert), Some(key), _) => (read(cert)?, read(key)?),
            (_, _, Some(ca)) => {
                let mut names = vec![
                    "localhost".to_string(),
                    "127.0.0.1".to_string(),
                    "::1".to_string(),
                ];
                if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
                    let host = host.trim();
                    if !host.is_empty() && !names.iter().any(|n| n == host) {
                        names.push(host.to_string());
                    }
                }
                names.extend(self.tls_names.iter().cloned());
                let issued = ca.issue_server(&names, SERVER_CERT_VALIDITY)?;
                ca::write_private(&dir.join("server.key"), issued.key_pem.as_bytes())?;
                let cert_path = dir.join("server.pem");
                std::fs::write(&cert_path, &issued.cert_pem)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", cert_path.display()))?;
                info!(ca = %ca.cert_path().display(), names = ?names, "serving TLS with a certificate from the operator CA");
                (issued.cert_pem, issued.key_pem)
            }
            _ => anyhow::bail!("--tls-cert needs --tls-key"),
        };
        let client_auth = if self.mtls {
            let ca_pem = match (&self.client_ca, &ca) {
                (Some(path), _) => read(path)?,
                (None, Some(ca)) => ca.cert_pem().to_string(),
                (None, None) => anyhow::bail!("--mtls needs a CA"),
            };
            let revocations = store.revocations()?;
            info!(
                revocations = %revocations.place(),
                "mutual TLS: every gateway must present a certificate from the client CA"
            );
            Some(ClientAuth {
                ca_pem,
                revocations,
            })
        } else {
            None
        };
        Ok(Some(ServerTls {
            cert_pem,
            key_pem,
            client_auth,
        }))
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

impl ServerTls {
    /// The gRPC listener's TLS settings.
    pub fn grpc(&self) -> ServerTlsConfig {
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(auth) = &self.client_auth {
            config = config.client_ca_root(Certificate::from_pem(&auth.ca_pem));
        }
        config
    }

    /// A rustls acceptor for the HTTP listener (HTTP/1.1, no client
    /// certificates: the API has its own tokens).
    pub fn http_acceptor(&self) -> anyhow::Result<TlsAcceptor> {
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("server certificate: {e}"))?;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("server key: {e}"))?;
        let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

impl ClientAuth {
    /// Refuses a stream whose client certificate is missing, revoked, or
    /// issued to another gateway than `gateway`.
    pub async fn check(
        &self,
        peer_certs: Option<&[CertificateDer<'static>]>,
        gateway: &str,
    ) -> Result<(), Status> {
        let leaf = peer_certs
            .and_then(|c| c.first())
            .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
        let (serial, name) =
            ca::identity_of(leaf).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let revoked = self.revocations.is_revoked(&serial).await.map_err(|e| {
            warn!(error = %e, "cannot read the revocations; refusing client certificates");
            Status::unavailable("revocation list unreadable")
        })?;
        if revoked {
            return Err(Status::unauthenticated(format!(
                "client certificate {serial} (`{name}`) is revoked"
            )));
        }
        if name != gateway {
            return Err(Status::permission_denied(format!(
                "client certificate is issued to `{name}`, not to `{gateway}`"
            )));
        }
        Ok(())
    }
}

/// The HTTP listener with TLS: handshakes run in their own tasks (bounded by
/// [`HANDSHAKE_TIMEOUT`]), so a slow client cannot hold up others.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(error) => {
                        debug!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => debug!(%error, %peer, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task ended: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
