//! `guantong-gateway`: parses arguments, loads the config, runs the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use guantong_gateway::config::Config;
use tokio_util::sync::CancellationToken;

/// Exit code for a config that does not validate.
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "guantong-gateway",
    version,
    about = "Guantong edge gateway: collect, buffer durably, stream to ingest"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Collect and stream until SIGTERM or Ctrl-C.
    Run {
        #[arg(long, short, env = "GUANTONG_CONFIG")]
        config: PathBuf,
    },
    /// Print this gateway's signing key fingerprint and public key (creating
    /// the key if it does not exist yet), to register it with ingest.
    Identity {
        #[arg(long, short, env = "GUANTONG_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config without connecting to anything; lists every problem.
    Check {
        #[arg(long, short, env = "GUANTONG_CONFIG")]
        config: PathBuf,
    },
    /// Talk to devices directly, for installers: read, scan, dry-run a config.
    Probe {
        #[command(subcommand)]
        target: ProbeTarget,
    },
}

#[derive(Subcommand)]
enum ProbeTarget {
    /// Modbus TCP, RTU on a serial port, RTU over TCP.
    Modbus(guantong_gateway::modbus::probe::ModbusProbe),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Identity { config } => {
            let c = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let path = c.gateway.key_file.clone().unwrap_or_default();
            match guantong_gateway::identity::load_or_create(&path) {
                Ok((key, created)) => {
                    let public = key.verifying_key().to_bytes();
                    println!("gateway      {}", c.gateway.id);
                    println!(
                        "key file     {}{}",
                        path.display(),
                        if created { " (created now)" } else { "" }
                    );
                    println!("algorithm    ed25519");
                    println!(
                        "fingerprint  {}",
                        guantong_proto::chain::fingerprint(&public)
                    );
                    println!("public key   {}", hex::encode(public));
                    println!();
                    println!(
                        "register with: guantong-ingest register-gateway {} --public-key {}",
                        c.gateway.id,
                        hex::encode(public)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                let tags: usize = c.devices.iter().map(|d| d.tag_count()).sum();
                println!(
                    "{}: ok ({} devices, {} tags)",
                    config.display(),
                    c.devices.len(),
                    tags
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Probe { target } => {
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            let result = match target {
                ProbeTarget::Modbus(p) => runtime.block_on(guantong_gateway::modbus::probe::run(p)),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(guantong_gateway::modbus::probe::ProbeError::Config(e)) => {
                    eprint!("{e}");
                    ExitCode::from(EXIT_BAD_CONFIG)
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => {
            init_tracing();
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(signal_shutdown(shutdown.clone()));
                match guantong_gateway::run(config, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %e, "gateway failed");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            None
        }
    }
}

async fn signal_shutdown(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("signal received");
    shutdown.cancel();
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GUANTONG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
