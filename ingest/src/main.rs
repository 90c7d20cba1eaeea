//! `guantong-ingest`: parses arguments and runs the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use guantong_ingest::store::Store;
use guantong_ingest::store::embedded::EmbeddedStore;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "guantong-ingest",
    version,
    about = "Guantong ingest: gateways in, connectivity evidence out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gateways (gRPC) and the API (HTTP) until SIGTERM or Ctrl-C.
    Serve {
        /// Data directory of the embedded store.
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
        /// Address gateways connect to.
        #[arg(long, env = "GUANTONG_GRPC_LISTEN", default_value = "0.0.0.0:7600")]
        grpc_listen: SocketAddr,
        /// Address of the HTTP API and pages.
        #[arg(long, env = "GUANTONG_HTTP_LISTEN", default_value = "0.0.0.0:7601")]
        http_listen: SocketAddr,
        /// Write the bound addresses as JSON to this file once listening
        /// (useful with port 0).
        #[arg(long)]
        ports_file: Option<PathBuf>,
        /// Bind the signing key a gateway presents when none was registered
        /// for it (recorded in its chain report). Off by default.
        #[arg(long)]
        trust_on_first_use: bool,
        #[command(flatten)]
        security: Box<ServeSecurity>,
    },
    /// The operator CA for gateway client certificates (mutual TLS).
    #[command(subcommand)]
    Ca(guantong_ingest::ca::CaCommand),
    /// Issue a gateway a new token (run while the server is stopped); the
    /// old one keeps working for `--grace`, so buffered data keeps flowing
    /// until the gateway's config has the new one.
    RotateGatewayToken {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
        id: String,
        /// How long the old token stays valid, e.g. `7d`; `0s` ends it now.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
    },
    /// Re-verify every stored evidence chain from the original signed bytes
    /// (run while the server is stopped). Exit code 1 when anything breaks.
    VerifyChain {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
    },
    /// Register a gateway and print its token (run while the server is stopped).
    RegisterGateway {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
        /// The id the gateway's config names in `[gateway] id`.
        id: String,
        /// The gateway's signing public key (64 hex digits), printed by
        /// `guantong-gateway identity`. Without it, the gateway's evidence
        /// chain is stored but cannot be verified.
        #[arg(long)]
        public_key: Option<String>,
    },
}

/// `serve` options of the security work: TLS, quotas, validation, proxies.
#[derive(clap::Args)]
struct ServeSecurity {
    #[command(flatten)]
    tls: guantong_ingest::tls::TlsArgs,
    #[command(flatten)]
    limits: guantong_ingest::limits::Limits,
    #[command(flatten)]
    validation: guantong_ingest::validate::ValidationLimits,
    /// Address of a reverse proxy whose X-Forwarded-* headers are believed
    /// (repeatable); from any other peer they are removed.
    #[arg(
        long = "trusted-proxy",
        env = "GUANTONG_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<std::net::IpAddr>,
    /// Largest gRPC message accepted from a gateway, bytes.
    #[arg(long, env = "GUANTONG_MAX_MESSAGE_BYTES", default_value_t = guantong_ingest::MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("GUANTONG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::VerifyChain { data } => {
            let store = EmbeddedStore::open(&data)?;
            let results = store.verify_chains()?;
            let mut broken = 0;
            for c in &results {
                println!(
                    "gateway {} buffer {}: links {}..={} ({} stored), head {}",
                    c.gateway, c.buffer_id, c.first_seq, c.last_seq, c.links, c.head_hash
                );
                if c.breaks.is_empty() {
                    println!("  verified: every signature and every link holds");
                }
                for (seq, reason) in &c.breaks {
                    println!("  BREAK at batch {seq}: {reason}");
                    broken += 1;
                }
            }
            if results.is_empty() {
                println!("no signed batches stored");
            }
            if broken > 0 {
                anyhow::bail!("{broken} break(s) found");
            }
            Ok(())
        }
        Command::Ca(command) => command.run(),
        Command::RotateGatewayToken { data, id, grace } => {
            let store = EmbeddedStore::open(&data)?;
            let token = store.rotate_token(&id, grace).await?;
            eprintln!(
                "new token for gateway `{id}`; the old one stays valid for {}. Put this in its config under [uplink] token (or token_file):",
                humantime::format_duration(grace)
            );
            println!("{token}");
            Ok(())
        }
        Command::RegisterGateway {
            data,
            id,
            public_key,
        } => {
            let public_key = match public_key {
                Some(h) => Some(
                    hex::decode(h.trim())
                        .ok()
                        .filter(|k| k.len() == 32)
                        .ok_or_else(|| anyhow::anyhow!("--public-key: expected 64 hex digits (from `guantong-gateway identity`)"))?,
                ),
                None => None,
            };
            if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control() || c == '/') {
                anyhow::bail!(
                    "gateway id `{id}`: expected 1 to 128 characters without `/` or control characters"
                );
            }
            let store = EmbeddedStore::open(&data)?;
            let token = store.register_gateway(&id, public_key.clone()).await?;
            match &public_key {
                Some(k) => eprintln!(
                    "bound signing key {}",
                    guantong_proto::chain::fingerprint(k)
                ),
                None => eprintln!(
                    "warning: no --public-key: this gateway's evidence chain cannot be verified"
                ),
            }
            eprintln!(
                "registered gateway `{id}` in {}; put this in its config under [uplink] token:",
                data.display()
            );
            println!("{token}");
            Ok(())
        }
        Command::Serve {
            data,
            grpc_listen,
            http_listen,
            ports_file,
            trust_on_first_use,
            security,
        } => {
            let tls = security.tls.prepare(&data)?;
            let store = Arc::new(EmbeddedStore::open(&data)?);
            let shutdown = CancellationToken::new();
            let options = guantong_ingest::Options {
                trust_on_first_use,
                tls,
                http_tls: security.tls.http_tls,
                limits: security.limits,
                validation: security.validation,
                trusted_proxies: security.trusted_proxies,
                max_message_bytes: security.max_message_bytes,
            };
            let running = guantong_ingest::start_with(
                store,
                grpc_listen,
                http_listen,
                shutdown.clone(),
                options,
            )
            .await?;
            if let Some(path) = ports_file {
                let json = serde_json::json!({
                    "grpc": running.grpc_addr.to_string(),
                    "http": running.http_addr.to_string(),
                });
                std::fs::write(&path, json.to_string())
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            }
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down");
            shutdown.cancel();
            running.done.await??;
            Ok(())
        }
    }
}
