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
    },
    /// Re-verify every stored evidence chain from the original signed bytes
    /// (run while the server is stopped). Exit code 1 when anything breaks.
    VerifyChain {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
    },
    /// Write an evidence bundle of gateways over a window (run while the
    /// server is stopped); check it anywhere with `guantong-ingest verify`.
    ExportEvidence {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
        /// A gateway to include (repeat for several).
        #[arg(long = "gateway", required = true)]
        gateways: Vec<String>,
        /// Start of the window (source time), RFC 3339 or epoch ms.
        #[arg(long)]
        from: String,
        /// End of the window (exclusive), RFC 3339 or epoch ms.
        #[arg(long)]
        to: String,
        /// The bundle file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check an evidence bundle offline, without server or database; prints
    /// what holds and what does not. Exit code 1 when anything fails.
    Verify {
        bundle: PathBuf,
        /// Digests kept earlier (JSON as served by /api/v1/digests or
        /// `guantong-ingest digest`): the bundle must agree with them.
        #[arg(long = "digests")]
        digests: Vec<PathBuf>,
    },
    /// Print ingest's signed daily digests as JSON (run while the server is
    /// stopped; a running server serves them at /api/v1/digests).
    Digest {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
        /// UTC day, YYYY-MM-DD; default yesterday.
        #[arg(long)]
        day: Option<String>,
        /// Only these gateways (repeat); default all.
        #[arg(long = "gateway")]
        gateways: Vec<String>,
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
            for problem in &results.query_tables {
                println!("QUERY TABLES: {problem}");
                broken += 1;
            }
            for c in &results.chains {
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
            if results.chains.is_empty() {
                println!("no signed batches stored");
            }
            if broken > 0 {
                anyhow::bail!("{broken} break(s) found");
            }
            Ok(())
        }
        Command::ExportEvidence {
            data,
            gateways,
            from,
            to,
            out,
        } => {
            let time = |name: &str, s: &str| {
                guantong_ingest::http::parse_time(name, s).map_err(|_| {
                    anyhow::anyhow!("--{name} `{s}`: expected RFC 3339 (2026-11-25T00:00:00Z) or epoch milliseconds")
                })
            };
            let (from_ms, to_ms) = (time("from", &from)?, time("to", &to)?);
            let store = EmbeddedStore::open(&data)?;
            let bundle = store.export_evidence(gateways, from_ms, to_ms).await?;
            let links: usize = bundle
                .gateways
                .iter()
                .flat_map(|g| &g.streams)
                .map(|s| s.links.len())
                .sum();
            guantong_ingest::evidence::write_bundle(&out, &bundle)?;
            eprintln!(
                "wrote {} ({} gateways, {links} signed batches); check it with `guantong-ingest verify {}`",
                out.display(),
                bundle.gateways.len(),
                out.display()
            );
            Ok(())
        }
        Command::Verify { bundle, digests } => {
            let b = guantong_ingest::evidence::read_bundle(&bundle)?;
            let mut kept = Vec::new();
            for path in &digests {
                kept.extend(guantong_ingest::evidence::read_digests(path)?);
            }
            let verdict = guantong_ingest::evidence::verify::verify(&b, &kept);
            for f in &verdict.findings {
                println!("{f}");
            }
            let failures = verdict.failures();
            if failures > 0 {
                anyhow::bail!("{failures} check(s) fail: the evidence does not hold");
            }
            println!("all checks hold");
            Ok(())
        }
        Command::Digest {
            data,
            day,
            gateways,
        } => {
            let day = day.unwrap_or_else(guantong_ingest::evidence::digest::yesterday);
            let store = EmbeddedStore::open(&data)?;
            let days = store.day_digests(gateways, day).await?;
            let digests: Vec<_> = days.into_iter().map(|d| d.digest).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "digests": digests }))?
            );
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
        } => {
            let store = Arc::new(EmbeddedStore::open(&data)?);
            let shutdown = CancellationToken::new();
            let options = guantong_ingest::Options { trust_on_first_use };
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
