//! `guantong-gateway`: parses arguments, loads the config, runs the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use guantong_gateway::config::Config;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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
    /// Collect and stream until SIGTERM or Ctrl-C; SIGHUP reloads the config.
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
    /// Print the status of the gateway running with this config (its
    /// `[status] listen` page): devices, buffer, uplink.
    Status {
        #[arg(long, short, env = "GUANTONG_CONFIG")]
        config: PathBuf,
    },
    /// Talk to devices and brokers directly, for installers: read, scan,
    /// dry-run a config, watch live messages with the values a mapping extracts.
    Probe {
        #[command(subcommand)]
        target: ProbeTarget,
    },
    /// OPC UA certificates: what is trusted and rejected, and trusting a
    /// rejected server certificate.
    #[cfg(feature = "opcua")]
    Opcua {
        #[command(subcommand)]
        action: OpcuaAction,
    },
}

#[cfg(feature = "opcua")]
#[derive(Subcommand)]
enum OpcuaAction {
    /// For each OPC UA device: its PKI directory, this gateway's certificate,
    /// and the trusted and rejected server certificates with thumbprints.
    Status {
        #[arg(long, short, env = "GUANTONG_CONFIG")]
        config: PathBuf,
    },
    /// Trusts the rejected server certificate with this thumbprint (or a
    /// unique prefix of it): moves it from rejected/ to trusted/. A running
    /// gateway uses it at its next reconnect attempt.
    Trust {
        thumbprint: String,
        #[arg(long, short, env = "GUANTONG_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ProbeTarget {
    /// Modbus TCP, RTU on a serial port, RTU over TCP.
    Modbus(guantong_gateway::modbus::probe::ModbusProbe),
    /// Subscribe to a broker and print each message, with the values the
    /// configured mapping would extract beside it.
    #[cfg(feature = "mqtt")]
    Mqtt(ProbeMqtt),
    /// List an OPC UA server's endpoints, browse its address space with data
    /// types and values, and print a tag-mapping snippet for the config.
    #[cfg(feature = "opcua")]
    Opcua(guantong_gateway::opcua::probe::OpcUaProbe),
    /// Read a Siemens S7 PLC's memory as every S7 type, and its identity.
    #[cfg(feature = "s7")]
    S7(guantong_gateway::s7::probe::S7Probe),
    /// DL/T 645 meters: read a lone meter's address (broadcast), read data
    /// identifiers of a meter.
    #[cfg(feature = "dlt645")]
    Dlt645(guantong_gateway::dlt645::probe::Dlt645Probe),
}

#[cfg(feature = "mqtt")]
#[derive(clap::Args)]
struct ProbeMqtt {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`.
    #[arg(long)]
    broker: String,
    /// Topic filter to subscribe (wildcards allowed); repeat for several.
    #[arg(long, required = true)]
    topic: Vec<String>,
    /// Gateway config whose MQTT devices' mappings are applied to each message.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// MQTT protocol version: 3.1.1 or 5.
    #[arg(long, default_value = "3.1.1", value_parser = ["3.1.1", "5"])]
    mqtt_version: String,
    /// User name, for brokers that require a login.
    #[arg(long)]
    username: Option<String>,
    /// Password (better given in the environment than on the command line).
    #[arg(long, env = "GUANTONG_MQTT_PASSWORD", requires = "username")]
    password: Option<String>,
    /// PEM CA certificate(s) for an `mqtts://` broker.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for brokers that require one.
    #[arg(long, requires = "client_key_file")]
    client_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long, requires = "client_cert_file")]
    client_key_file: Option<PathBuf>,
    /// Stop after this many messages (default: until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    count: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Identity { config } => {
            // Only the key matters here: the uplink token does not exist
            // before this identity is registered.
            let gateway = match guantong_gateway::config::GatewaySection::load_for_identity(&config)
            {
                Ok(g) => g,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let path = gateway.key_file.clone().unwrap_or_default();
            match guantong_gateway::identity::load_or_create(&path, gateway.key_algorithm.into()) {
                Ok((key, created)) => {
                    let (algorithm, public) = (key.algorithm(), key.public_key());
                    println!("gateway      {}", gateway.id);
                    println!(
                        "key file     {}{}",
                        path.display(),
                        if created { " (created now)" } else { "" }
                    );
                    println!("algorithm    {algorithm}");
                    println!("fingerprint  {}", algorithm.fingerprint(&public));
                    println!("public key   {}", hex::encode(&public));
                    println!();
                    println!(
                        "register with: guantong-ingest register-gateway {} --key-algorithm {algorithm} --public-key {}",
                        gateway.id,
                        hex::encode(&public)
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
        Command::Probe {
            target: ProbeTarget::Modbus(p),
        } => {
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            let result = runtime.block_on(guantong_gateway::modbus::probe::run(p));
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
        #[cfg(feature = "mqtt")]
        Command::Probe {
            target: ProbeTarget::Mqtt(p),
        } => {
            let args = guantong_gateway::mqtt::probe::ProbeArgs {
                broker: p.broker,
                topics: p.topic,
                config: p.config,
                mqtt_version: if p.mqtt_version == "5" {
                    guantong_gateway::mqtt::config::MqttVersion::V5
                } else {
                    guantong_gateway::mqtt::config::MqttVersion::V311
                },
                username: p.username,
                password: p.password,
                ca_file: p.ca_file,
                client_cert_file: p.client_cert_file,
                client_key_file: p.client_key_file,
                count: p.count,
            };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async {
                let cancel = CancellationToken::new();
                tokio::spawn(signal_shutdown(cancel.clone()));
                let mut out = std::io::stdout();
                match guantong_gateway::mqtt::probe::run(args, &mut out, cancel).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("probe mqtt: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        #[cfg(feature = "opcua")]
        Command::Probe {
            target: ProbeTarget::Opcua(p),
        } => {
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            let mut out = std::io::stdout();
            match runtime.block_on(guantong_gateway::opcua::probe::run(p, &mut out)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("probe opcua: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        #[cfg(feature = "s7")]
        Command::Probe {
            target: ProbeTarget::S7(p),
        } => {
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            let mut out = std::io::stdout();
            match runtime.block_on(guantong_gateway::s7::probe::run(p, &mut out)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("probe s7: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        #[cfg(feature = "dlt645")]
        Command::Probe {
            target: ProbeTarget::Dlt645(p),
        } => {
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            match runtime.block_on(guantong_gateway::dlt645::probe::run(p)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("probe dlt645: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        #[cfg(feature = "opcua")]
        Command::Opcua { action } => opcua_command(action),
        Command::Status { config } => {
            let c = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            match runtime.block_on(guantong_gateway::status::fetch(&c.status.listen)) {
                Ok(snapshot) => {
                    print!("{snapshot}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => {
            guantong_gateway::malloc::tune();
            init_tracing();
            let path = config;
            let (source, config) = match guantong_gateway::remote::Source::start(&path) {
                Ok(started) => started,
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
                let (reloader, reloads) = guantong_gateway::reload::channel();
                tokio::spawn(guantong_gateway::reload::on_sighup(
                    source.clone(),
                    reloader.clone(),
                ));
                let (link, remote) = guantong_gateway::remote::link(source, reloader);
                tokio::spawn(remote);
                match guantong_gateway::run_with(config, reloads, Some(link), shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "gateway failed");
                        // A quota the disk cannot hold: restarting will not fix it.
                        let config_problem = e.chain().any(|c| {
                            c.downcast_ref::<guantong_gateway::buffer::BufferError>()
                                .is_some_and(|b| b.is_config_problem())
                        });
                        if config_problem {
                            ExitCode::from(EXIT_BAD_CONFIG)
                        } else {
                            ExitCode::FAILURE
                        }
                    }
                }
            })
        }
    }
}

#[cfg(feature = "opcua")]
fn opcua_command(action: OpcuaAction) -> ExitCode {
    use guantong_gateway::config::DeviceConfig;
    use guantong_gateway::opcua::pki;
    let config = match &action {
        OpcuaAction::Status { config } | OpcuaAction::Trust { config, .. } => config.clone(),
    };
    let c = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    // Devices grouped by PKI directory, in config order.
    let mut dirs: Vec<(PathBuf, Vec<String>)> = Vec::new();
    for d in &c.devices {
        if let DeviceConfig::OpcUa(o) = d {
            let dir = o.pki_dir().to_path_buf();
            match dirs.iter_mut().find(|(p, _)| *p == dir) {
                Some((_, ids)) => ids.push(o.id.clone()),
                None => dirs.push((dir, vec![o.id.clone()])),
            }
        }
    }
    if dirs.is_empty() {
        eprintln!("{}: no OPC UA devices", config.display());
        return ExitCode::FAILURE;
    }
    match action {
        OpcuaAction::Status { .. } => {
            for (dir, ids) in &dirs {
                println!("pki {}  (devices: {})", dir.display(), ids.join(", "));
                match guantong_gateway::opcua::pki::list(dir, "own").first() {
                    Some(own) => println!("  own       {}  {}", own.thumbprint, own.subject),
                    None => println!("  own       (none yet: created at the first connect)"),
                }
                for (kind, certs) in [
                    ("trusted", pki::list(dir, "trusted")),
                    ("rejected", pki::list(dir, "rejected")),
                ] {
                    for cert in certs {
                        println!("  {kind:<9} {}  {}", cert.thumbprint, cert.subject);
                        if kind == "rejected" {
                            println!(
                                "            trust with: guantong-gateway opcua trust {} --config {}",
                                cert.thumbprint,
                                config.display()
                            );
                        }
                    }
                }
                for (device, thumbprint) in pki::tofu_records(dir) {
                    println!("  tofu      {thumbprint}  trusted on first use by device {device}");
                }
            }
            ExitCode::SUCCESS
        }
        OpcuaAction::Trust { thumbprint, .. } => {
            let mut errors = Vec::new();
            for (dir, _) in &dirs {
                match pki::trust(dir, &thumbprint) {
                    Ok(cert) => {
                        println!(
                            "trusted {}  {}\n  now {}",
                            cert.thumbprint,
                            cert.subject,
                            cert.path.display()
                        );
                        return ExitCode::SUCCESS;
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            eprintln!("{}", errors.join("\n"));
            ExitCode::FAILURE
        }
    }
}

/// The config at `path`, or its problems printed and the exit code to end with.
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprint!("{e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
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
    let filter = guantong_gateway::modbus::log_filter(std::env::var("GUANTONG_LOG").ok());
    #[cfg(feature = "opcua")]
    let filter = guantong_gateway::opcua::log_filter(filter);
    let filter: Targets = filter.parse().unwrap_or_else(|e| {
        eprintln!("GUANTONG_LOG: {e}; logging at info");
        Targets::new().with_default(tracing::Level::INFO)
    });
    tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .finish()
        .with(filter)
        .init();
}
