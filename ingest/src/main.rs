//! `guantong-ingest`: parses arguments and runs the library.

/// mimalloc instead of glibc malloc (see the workspace Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use guantong_ingest::acceptance::Criteria;
use guantong_ingest::ops::{StoreArgs, Target};
use guantong_ingest::registry::{Account, Enterprise, Role, parse_equipment_csv};
use guantong_ingest::store::Store;
use guantong_ingest::store::any::AnyStore;
use reqwest::Method;
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
        #[command(flatten)]
        data: StoreArgs,
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
        /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` on this
        /// address, without a token; off by default. Keep it off the internet.
        #[arg(long, env = "GUANTONG_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        /// Bind the signing key a gateway presents when none was registered
        /// for it (recorded in its chain report). Off by default.
        #[arg(long)]
        trust_on_first_use: bool,
        /// Acceptance criteria (TOML; see the README): verdict thresholds,
        /// critical flags, industries, the city's networking-rate target.
        #[arg(long, env = "GUANTONG_CRITERIA")]
        criteria: Option<PathBuf>,
        /// With `--database`: drop the points whose source day ended longer
        /// ago than this (e.g. `400d`; at least `1d`), a whole daily
        /// partition at a time, checked hourly. Rollups, signed batches and
        /// losses are kept, so reports do not change. Off: points are kept.
        #[arg(long, env = "GUANTONG_RETENTION", value_parser = humantime::parse_duration)]
        retention: Option<std::time::Duration>,
        #[command(flatten)]
        security: Box<ServeSecurity>,
    },
    /// Create or upgrade the PostgreSQL schema (`--database`); safe to run
    /// again and beside running replicas of the same version.
    Migrate {
        /// The database (`postgres://user:password@host:5432/name`).
        #[arg(long, env = "GUANTONG_DATABASE_URL")]
        database: String,
        /// The CA of the database server's certificate (see `serve`).
        #[arg(long, env = "GUANTONG_DATABASE_CA")]
        database_ca: Option<PathBuf>,
    },
    /// The operator CA for gateway client certificates (mutual TLS).
    #[command(subcommand)]
    Ca(guantong_ingest::ca::CaCommand),
    /// Issue a gateway a new token (while `serve` runs, through it); the
    /// old one keeps working for `--grace`, so buffered data keeps flowing
    /// until the gateway's config has the new one.
    RotateGatewayToken {
        #[command(flatten)]
        data: StoreArgs,
        id: String,
        /// How long the old token stays valid, e.g. `7d`; `0s` ends it now.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
    },
    /// Manage enterprises (while `serve` runs, through it).
    #[command(subcommand)]
    Enterprise(EnterpriseCommand),
    /// Cloud configurations of gateways (while `serve` runs, through it,
    /// which also offers them to connected gateways at once).
    #[command(subcommand)]
    GatewayConfig(GatewayConfigCommand),
    /// Replace an enterprise's equipment register (设备台账) from a CSV file
    /// (while `serve` runs, through it).
    ImportEquipment {
        #[command(flatten)]
        data: StoreArgs,
        /// The enterprise's unified social credit code.
        #[arg(long)]
        enterprise: String,
        /// CSV with columns id,name[,kind,workshop,production,gateway,device]
        /// (or the Chinese headers 设备编号,设备名称,…), UTF-8 or GBK/GB18030
        /// as Excel on Chinese Windows saves it.
        file: PathBuf,
        /// The file's encoding (utf-8, gbk, gb18030); detected when not given.
        #[arg(long)]
        encoding: Option<String>,
    },
    /// Make a gateway belong to an enterprise (while `serve` runs, through it).
    AssignGateway {
        #[command(flatten)]
        data: StoreArgs,
        gateway: String,
        #[arg(long)]
        enterprise: String,
    },
    /// Create or replace an account and print its new token (while `serve`
    /// runs, through it: POST /api/v1/accounts).
    AddAccount {
        #[command(flatten)]
        data: StoreArgs,
        name: String,
        /// admin, provider or reviewer.
        #[arg(long)]
        role: String,
        /// For a provider account: the provider name its enterprises carry.
        #[arg(long, default_value = "")]
        provider: String,
        /// For a reviewer: an enterprise it may read (repeat).
        #[arg(long = "enterprise")]
        enterprises: Vec<String>,
        /// For a reviewer: read every enterprise (a city-level reviewer).
        #[arg(long, conflicts_with = "enterprises")]
        all_enterprises: bool,
    },
    /// Write an acceptance report for one enterprise, or the city overview
    /// (while `serve` runs, through it: /api/v1/enterprises/CODE/report,
    /// /api/v1/city, with the server's criteria).
    Report {
        #[command(flatten)]
        data: StoreArgs,
        /// The enterprise's unified social credit code.
        #[arg(long, required_unless_present = "city")]
        enterprise: Option<String>,
        /// The city overview instead of one enterprise.
        #[arg(long, conflicts_with = "enterprise")]
        city: bool,
        /// First day (YYYY-MM-DD, UTC+8); default: 6 days before `to`.
        #[arg(long)]
        from: Option<String>,
        /// Last day, inclusive (YYYY-MM-DD, UTC+8); default: today.
        #[arg(long)]
        to: Option<String>,
        /// html, json or csv.
        #[arg(long, default_value = "html")]
        format: String,
        /// For csv: devices, equipment, gaps or usage.
        #[arg(long)]
        part: Option<String>,
        /// zh (default) or en.
        #[arg(long)]
        lang: Option<String>,
        #[arg(long, env = "GUANTONG_CRITERIA")]
        criteria: Option<PathBuf>,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// One enterprise's file for a window (一企一档): the report as
    /// self-contained HTML in both languages, its JSON and CSV parts, the
    /// evidence bundle, ingest's signed digests of the window's complete UTC
    /// days, and VERIFY.txt on checking it offline (while `serve` runs,
    /// through it: /api/v1/enterprises/CODE/dossier, unpacked).
    Dossier {
        #[command(flatten)]
        data: StoreArgs,
        /// The enterprise's unified social credit code.
        #[arg(long)]
        enterprise: String,
        /// First day (YYYY-MM-DD, UTC+8); default: 6 days before `to`.
        #[arg(long)]
        from: Option<String>,
        /// Last day, inclusive (YYYY-MM-DD, UTC+8); default: today.
        #[arg(long)]
        to: Option<String>,
        #[arg(long, env = "GUANTONG_CRITERIA")]
        criteria: Option<PathBuf>,
        /// The directory to write (created).
        #[arg(long)]
        out: PathBuf,
    },
    /// Re-verify every stored evidence chain from the original signed bytes
    /// (while `serve` runs, through it, on one snapshot). Exit code 1 when
    /// anything breaks.
    VerifyChain {
        #[command(flatten)]
        data: StoreArgs,
    },
    /// Write an evidence bundle of gateways over a window (while `serve`
    /// runs, through it); check it anywhere with `guantong-ingest verify`.
    ExportEvidence {
        #[command(flatten)]
        data: StoreArgs,
        /// A gateway to include (repeat for several).
        #[arg(long = "gateway", required_unless_present = "enterprise")]
        gateways: Vec<String>,
        /// Every gateway of this enterprise (unified social credit code).
        #[arg(long)]
        enterprise: Option<String>,
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
    /// Print ingest's signed daily digests as JSON (while `serve` runs,
    /// through it: /api/v1/digests).
    Digest {
        #[command(flatten)]
        data: StoreArgs,
        /// UTC day, YYYY-MM-DD; default yesterday.
        #[arg(long)]
        day: Option<String>,
        /// Only these gateways (repeat); default all.
        #[arg(long = "gateway")]
        gateways: Vec<String>,
    },
    /// Write a consistent copy of the store to a new file (while `serve`
    /// runs, through it, as writes go on). Restore: stop `serve`, put the
    /// copy in place of DATA/ingest.redb, start `serve`.
    Backup {
        #[command(flatten)]
        data: StoreArgs,
        /// The file to write; it must not exist.
        #[arg(long)]
        out: PathBuf,
    },
    /// Register a gateway and print its token (while `serve` runs, through it).
    RegisterGateway {
        #[command(flatten)]
        data: StoreArgs,
        /// The id the gateway's config names in `[gateway] id`.
        id: String,
        /// The gateway's signing public key (hex), printed by
        /// `guantong-gateway identity`. Without it, the gateway's evidence
        /// chain is stored but cannot be verified.
        #[arg(long)]
        public_key: Option<String>,
        /// The key's algorithm, as `guantong-gateway identity` prints it.
        #[arg(long, default_value = "ed25519", value_parser = ["ed25519", "sm2"])]
        key_algorithm: String,
    },
}

#[derive(Subcommand)]
enum GatewayConfigCommand {
    /// Check a TOML document of `[[devices]]` by the gateway's rules, store
    /// it as the gateway's next version and request it.
    Push {
        #[command(flatten)]
        data: StoreArgs,
        gateway: String,
        file: PathBuf,
    },
    /// Request a stored version again.
    Rollback {
        #[command(flatten)]
        data: StoreArgs,
        gateway: String,
        version: u64,
    },
    /// Print the requested and applied versions and every stored version
    /// (secrets masked), as JSON.
    Show {
        #[command(flatten)]
        data: StoreArgs,
        gateway: String,
    },
}

#[derive(Subcommand)]
enum EnterpriseCommand {
    /// Register (or update) an enterprise.
    Add {
        #[command(flatten)]
        data: StoreArgs,
        /// Unified social credit code (统一社会信用代码), checked.
        #[arg(long)]
        code: String,
        #[arg(long)]
        name: String,
        /// County or district (区县).
        #[arg(long)]
        county: String,
        /// Industry key: petrochemical, metallurgy, equipment, light (or
        /// those of the criteria file).
        #[arg(long)]
        industry: String,
        /// Service provider (服务商).
        #[arg(long, default_value = "")]
        provider: String,
        #[arg(long, env = "GUANTONG_CRITERIA")]
        criteria: Option<PathBuf>,
    },
    /// List enterprises as JSON (while `serve` runs, through it).
    List {
        #[command(flatten)]
        data: StoreArgs,
    },
}

/// Reads acceptance criteria, defaults where the file is silent.
fn load_criteria(path: Option<&std::path::Path>) -> anyhow::Result<Criteria> {
    let Some(path) = path else {
        return Ok(Criteria::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read criteria {}: {e}", path.display()))?;
    let c: Criteria =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("criteria {}: {e}", path.display()))?;
    if !(0.0..=1.0).contains(&c.completeness_min)
        || !(0.0..=1.0).contains(&c.networking_target)
        || !(0.0..=1.0).contains(&c.no_jitter_share)
        || !(0.0..=1.0).contains(&c.identical_similarity)
    {
        anyhow::bail!(
            "criteria {}: completeness_min, networking_target, no_jitter_share and identical_similarity are shares from 0 to 1",
            path.display()
        );
    }
    if c.verdict_days == 0 || c.industries.is_empty() {
        anyhow::bail!(
            "criteria {}: verdict_days must be at least 1 and industries not empty",
            path.display()
        );
    }
    Ok(c)
}

/// Where a report-like command reads: the store with what it needs, or the
/// running server (which applies its own criteria).
enum Reading {
    Local(Box<LocalReading>),
    Remote(guantong_ingest::ops::Remote),
}

/// The set-up `report` and `dossier` share: criteria, store, the window
/// `[from_day, to_day)` and one snapshot of the store.
struct LocalReading {
    store: AnyStore,
    criteria: Criteria,
    from_day: i64,
    to_day: i64,
    snap: guantong_ingest::acceptance::Snapshot,
}

async fn reading(
    data: &StoreArgs,
    criteria: Option<&std::path::Path>,
    from: Option<&str>,
    to: Option<&str>,
) -> anyhow::Result<Reading> {
    let store = match Target::open(data).await? {
        Target::Local(store) => store,
        Target::Remote(server) => {
            if criteria.is_some() {
                eprintln!("note: the running server's acceptance criteria apply, not --criteria");
            }
            return Ok(Reading::Remote(server));
        }
    };
    let criteria = load_criteria(criteria)?;
    let now = guantong_ingest::grpc::now_ms();
    let (from_day, to_day) =
        guantong_ingest::web::window(from, to, now).map_err(anyhow::Error::msg)?;
    let snap = guantong_ingest::web::snapshot(&store)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.1))?;
    Ok(Reading::Local(Box::new(LocalReading {
        store,
        criteria,
        from_day,
        to_day,
        snap,
    })))
}

/// `from` and `to` as the server's report routes take them.
fn window_query(from: Option<String>, to: Option<String>) -> Vec<(&'static str, String)> {
    let mut query = Vec::new();
    query.extend(from.map(|f| ("from", f)));
    query.extend(to.map(|t| ("to", t)));
    query
}

/// Creates the first admin account when there is none and writes its token
/// to `admin.token` in the data directory, readable by the owner only.
async fn bootstrap_admin(store: &AnyStore, data: &std::path::Path) -> anyhow::Result<()> {
    if !store.accounts().await?.is_empty() {
        return Ok(());
    }
    let token = store
        .put_account(&Account {
            name: "admin".into(),
            role: Role::Admin,
            provider: String::new(),
            enterprises: Vec::new(),
            all_enterprises: false,
        })
        .await?;
    let path = data.join("admin.token");
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    writeln!(f, "{token}")?;
    tracing::info!(path = %path.display(), "created the admin account; its token is in this file");
    Ok(())
}

/// The `token` of a server's answer.
fn token_of(answer: &serde_json::Value) -> anyhow::Result<String> {
    answer["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("the server's answer has no token: {answer}"))
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
            let (report, broken) = match Target::open(&data).await? {
                Target::Local(store) => {
                    guantong_ingest::ops::verify_report(&store.verify_stored().await?)
                }
                Target::Remote(server) => {
                    let answer = server.get_json("/api/v1/verify-chain", &[]).await?;
                    let report = answer["report"].as_str().ok_or_else(|| {
                        anyhow::anyhow!("the server's answer has no report: {answer}")
                    })?;
                    let broken = answer["breaks"].as_u64().unwrap_or(0) as usize;
                    (report.to_string(), broken)
                }
            };
            print!("{report}");
            if broken > 0 {
                anyhow::bail!("{broken} break(s) found");
            }
            Ok(())
        }
        Command::Enterprise(EnterpriseCommand::Add {
            data,
            code,
            name,
            county,
            industry,
            provider,
            criteria,
        }) => {
            let criteria = load_criteria(criteria.as_deref())?;
            let e = Enterprise {
                code: code.trim().to_string(),
                name,
                county,
                industry,
                provider,
            };
            e.validate(&criteria.industries)
                .map_err(anyhow::Error::msg)?;
            match Target::open(&data).await? {
                Target::Local(store) => store.put_enterprise(&e).await?,
                Target::Remote(server) => {
                    server.send(Method::POST, "/api/v1/enterprises", &e).await?;
                }
            }
            eprintln!("registered enterprise {} ({})", e.code, e.name);
            Ok(())
        }
        Command::GatewayConfig(GatewayConfigCommand::Push {
            data,
            gateway,
            file,
        }) => {
            use guantong_ingest::gateway_config;
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let path = format!("/api/v1/gateways/{gateway}/config");
            let (version, devices) = match Target::open(&data).await? {
                Target::Local(store) => gateway_config::push(&store, None, &gateway, &text, "cli")
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", e.message()))?,
                Target::Remote(server) => {
                    let v = server.send_text(Method::PUT, &path, text).await?;
                    (
                        v["version"].as_u64().unwrap_or_default(),
                        v["devices"].as_u64().unwrap_or_default() as usize,
                    )
                }
            };
            eprintln!(
                "stored version {version} of {gateway}'s configuration ({devices} devices) and requested it"
            );
            Ok(())
        }
        Command::GatewayConfig(GatewayConfigCommand::Rollback {
            data,
            gateway,
            version,
        }) => {
            match Target::open(&data).await? {
                Target::Local(store) => {
                    guantong_ingest::gateway_config::request(
                        &store, None, &gateway, version, "cli",
                    )
                    .await?;
                }
                Target::Remote(server) => {
                    let path = format!("/api/v1/gateways/{gateway}/config/rollback");
                    let body = serde_json::json!({ "version": version });
                    server.send(Method::POST, &path, &body).await?;
                }
            }
            eprintln!("requested version {version} of {gateway}'s configuration");
            Ok(())
        }
        Command::GatewayConfig(GatewayConfigCommand::Show { data, gateway }) => {
            let shown = match Target::open(&data).await? {
                Target::Local(store) => {
                    guantong_ingest::gateway_config::show(&store, &gateway).await?
                }
                Target::Remote(server) => {
                    let path = format!("/api/v1/gateways/{gateway}/config");
                    server.get_json(&path, &[]).await?
                }
            };
            println!("{}", serde_json::to_string_pretty(&shown)?);
            Ok(())
        }
        Command::Enterprise(EnterpriseCommand::List { data }) => {
            let list: Vec<Enterprise> = match Target::open(&data).await? {
                Target::Local(store) => store.enterprises().await?,
                Target::Remote(server) => {
                    let answer = server.get_json("/api/v1/enterprises", &[]).await?;
                    answer["enterprises"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|e| serde_json::from_value(e["enterprise"].clone()))
                        .collect::<Result<_, _>>()
                        .map_err(|e| anyhow::anyhow!("the server's enterprise list: {e}"))?
                }
            };
            println!("{}", serde_json::to_string_pretty(&list)?);
            Ok(())
        }
        Command::ImportEquipment {
            data,
            enterprise,
            file,
            encoding,
        } => {
            let bytes = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let text = guantong_ingest::registry::decode_equipment_csv(&bytes, encoding.as_deref())
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let list = parse_equipment_csv(&text).map_err(|problems| {
                anyhow::anyhow!("{}:\n  {}", file.display(), problems.join("\n  "))
            })?;
            match Target::open(&data).await? {
                Target::Local(store) => store.put_equipment(&enterprise, &list).await?,
                Target::Remote(server) => {
                    let path = format!("/api/v1/enterprises/{enterprise}/equipment");
                    server.send(Method::PUT, &path, &list).await?;
                }
            }
            eprintln!(
                "imported {} entries ({} production equipment) for {enterprise}",
                list.len(),
                list.iter().filter(|e| e.production).count()
            );
            Ok(())
        }
        Command::AssignGateway {
            data,
            gateway,
            enterprise,
        } => {
            match Target::open(&data).await? {
                Target::Local(store) => store.assign_gateway(&gateway, &enterprise).await?,
                Target::Remote(server) => {
                    let path = format!("/api/v1/gateways/{gateway}/enterprise");
                    let body = serde_json::json!({ "enterprise": enterprise });
                    server.send(Method::PUT, &path, &body).await?;
                }
            }
            eprintln!("gateway {gateway} belongs to {enterprise}");
            Ok(())
        }
        Command::AddAccount {
            data,
            name,
            role,
            provider,
            enterprises,
            all_enterprises,
        } => {
            let account = Account {
                name,
                role: role.parse().map_err(anyhow::Error::msg)?,
                provider,
                enterprises,
                all_enterprises,
            };
            guantong_ingest::web::check_account(&account).map_err(anyhow::Error::msg)?;
            let token = match Target::open(&data).await? {
                Target::Local(store) => store.put_account(&account).await?,
                Target::Remote(server) => {
                    let answer = server
                        .send(Method::POST, "/api/v1/accounts", &account)
                        .await?;
                    token_of(&answer)?
                }
            };
            eprintln!("account {} ({:?}); its token:", account.name, account.role);
            println!("{token}");
            Ok(())
        }
        Command::Report {
            data,
            enterprise,
            city,
            from,
            to,
            format,
            part,
            lang,
            criteria,
            out,
        } => {
            let enterprise = enterprise.filter(|_| !city);
            let bytes =
                match reading(&data, criteria.as_deref(), from.as_deref(), to.as_deref()).await? {
                    Reading::Local(r) => guantong_ingest::web::render_cli(
                        &r.store,
                        &r.snap,
                        enterprise.as_deref(),
                        r.from_day,
                        r.to_day,
                        &r.criteria,
                        &format,
                        part.as_deref(),
                        lang.as_deref(),
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", e.1))?,
                    Reading::Remote(server) => {
                        let path = match &enterprise {
                            Some(code) => format!("/api/v1/enterprises/{code}/report"),
                            None => "/api/v1/city".to_string(),
                        };
                        let mut query = window_query(from, to);
                        query.push(("format", format));
                        query.extend(part.map(|p| ("part", p)));
                        query.extend(lang.map(|l| ("lang", l)));
                        let resp = server.fetch(Method::GET, &path, &query).await?;
                        resp.bytes().await?.to_vec()
                    }
                };
            match out {
                Some(path) => std::fs::write(&path, bytes)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?,
                None => {
                    use std::io::Write;
                    std::io::stdout().write_all(&bytes)?;
                }
            }
            Ok(())
        }
        Command::Dossier {
            data,
            enterprise,
            from,
            to,
            criteria,
            out,
        } => {
            let (files, gateways, digests) =
                match reading(&data, criteria.as_deref(), from.as_deref(), to.as_deref()).await? {
                    Reading::Local(r) => {
                        let d = guantong_ingest::dossier::build(
                            &r.store,
                            &r.snap,
                            &r.criteria,
                            &enterprise,
                            r.from_day,
                            r.to_day,
                        )
                        .await
                        .map_err(|e| anyhow::anyhow!("{}", e.1))?;
                        (d.files, d.gateways.to_string(), d.digests.to_string())
                    }
                    Reading::Remote(server) => {
                        let path = format!("/api/v1/enterprises/{enterprise}/dossier");
                        let resp = server
                            .fetch(Method::GET, &path, &window_query(from, to))
                            .await?;
                        let header = |name| {
                            resp.headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("?")
                                .to_string()
                        };
                        let gateways = header(guantong_ingest::dossier::GATEWAYS_HEADER);
                        let digests = header(guantong_ingest::dossier::DIGESTS_HEADER);
                        let zip = resp.bytes().await?;
                        let files = guantong_ingest::dossier::unzip(&zip, &path)
                            .map_err(anyhow::Error::msg)?;
                        (files, gateways, digests)
                    }
                };
            guantong_ingest::dossier::write_dir(&files, &out)?;
            eprintln!(
                "wrote the dossier of {enterprise} to {} ({gateways} gateways, {digests} digests); check it with `guantong-ingest verify {}/evidence-bundle.json --digests {}/digests.json`",
                out.display(),
                out.display(),
                out.display()
            );
            Ok(())
        }
        Command::ExportEvidence {
            data,
            gateways,
            enterprise,
            from,
            to,
            out,
        } => {
            let time = |name: &str, s: &str| {
                guantong_ingest::http::parse_time(&format!("--{name}"), s)
                    .map_err(|e| anyhow::anyhow!("{}", e.1))
            };
            let (from_ms, to_ms) = (time("from", &from)?, time("to", &to)?);
            match Target::open(&data).await? {
                Target::Local(store) => {
                    let gateways = guantong_ingest::ops::evidence_gateways(
                        &store,
                        gateways,
                        enterprise.as_deref(),
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", e.1))?;
                    let bundle = store.export_evidence(gateways, from_ms, to_ms).await?;
                    guantong_ingest::evidence::write_bundle(&out, &bundle)?;
                }
                Target::Remote(server) => {
                    let mut query: Vec<(&str, String)> =
                        gateways.into_iter().map(|g| ("gateway", g)).collect();
                    query.extend(enterprise.map(|e| ("enterprise", e)));
                    query.push(("from", from_ms.to_string()));
                    query.push(("to", to_ms.to_string()));
                    let resp = server
                        .fetch(Method::GET, "/api/v1/evidence", &query)
                        .await?;
                    let bytes = resp.bytes().await?;
                    std::fs::write(&out, &bytes)
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
                }
            }
            let bundle = guantong_ingest::evidence::read_bundle(&out)?;
            let links: usize = bundle
                .gateways
                .iter()
                .flat_map(|g| &g.streams)
                .map(|s| s.links.len())
                .sum();
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
            println!(
                "bundle fingerprint (as in the report's footer): {}",
                guantong_ingest::evidence::fingerprint(&b)
            );
            Ok(())
        }
        Command::Digest {
            data,
            day,
            gateways,
        } => {
            let day = day.unwrap_or_else(guantong_ingest::evidence::digest::yesterday);
            let answer = match Target::open(&data).await? {
                Target::Local(store) => {
                    let days = store.day_digests(gateways, day).await?;
                    let digests: Vec<_> = days.into_iter().map(|d| d.digest).collect();
                    serde_json::json!({ "digests": digests })
                }
                Target::Remote(server) => {
                    let mut query: Vec<(&str, String)> =
                        gateways.into_iter().map(|g| ("gateway", g)).collect();
                    query.push(("day", day));
                    server.get_json("/api/v1/digests", &query).await?
                }
            };
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(())
        }
        Command::Backup { data, out } => {
            if out.exists() {
                anyhow::bail!("--out {}: exists; name a new file", out.display());
            }
            let rows = match Target::open(&data).await? {
                Target::Local(store) => store.backup(out.clone()).await?.rows.to_string(),
                Target::Remote(server) => {
                    let mut resp = server.fetch(Method::POST, "/api/v1/backup", &[]).await?;
                    let rows = resp
                        .headers()
                        .get(guantong_ingest::ops::BACKUP_ROWS_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("?")
                        .to_string();
                    // Written under another name first: `out` appears whole or not at all.
                    let part = out.with_extension("part");
                    let write =
                        |e: std::io::Error| anyhow::anyhow!("cannot write {}: {e}", part.display());
                    let mut file = std::fs::File::create(&part).map_err(write)?;
                    while let Some(chunk) = resp.chunk().await? {
                        std::io::Write::write_all(&mut file, &chunk).map_err(write)?;
                    }
                    file.sync_all().map_err(write)?;
                    std::fs::rename(&part, &out).map_err(write)?;
                    rows
                }
            };
            eprintln!(
                "wrote a consistent copy of the store in {} to {} ({rows} rows); restore: stop serve, replace {}/ingest.redb with it, start serve",
                data.data.display(),
                out.display(),
                data.data.display()
            );
            Ok(())
        }
        Command::Ca(command) => command.run().await,
        Command::Migrate {
            database,
            database_ca,
        } => {
            use guantong_ingest::store::postgres;
            let target = postgres::Target::new(&database, database_ca)?;
            let applied = postgres::migrate(&postgres::pool(&target, 1)?).await?;
            match applied.as_slice() {
                [] => eprintln!(
                    "the schema is at version {} already",
                    postgres::SCHEMA_VERSION
                ),
                list => eprintln!(
                    "applied migration(s) {list:?}; the schema is at version {}",
                    postgres::SCHEMA_VERSION
                ),
            }
            Ok(())
        }
        Command::RotateGatewayToken { data, id, grace } => {
            let token = match Target::open(&data).await? {
                Target::Local(store) => store.rotate_token(&id, grace).await?,
                Target::Remote(server) => {
                    let path = format!("/api/v1/gateways/{id}/token");
                    let body = guantong_ingest::ops::RotateToken { grace };
                    token_of(&server.send(Method::POST, &path, &body).await?)?
                }
            };
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
            key_algorithm,
        } => {
            let key = public_key
                .as_deref()
                .map(|h| guantong_ingest::ops::parse_public_key(&key_algorithm, h))
                .transpose()
                .map_err(|m| anyhow::anyhow!("--public-key, --key-algorithm: {m}"))?;
            guantong_ingest::ops::check_gateway_id(&id).map_err(anyhow::Error::msg)?;
            let token = match Target::open(&data).await? {
                Target::Local(store) => store.register_gateway(&id, key.clone()).await?,
                Target::Remote(server) => {
                    let body = guantong_ingest::ops::RegisterGateway {
                        id: id.clone(),
                        public_key,
                        key_algorithm: Some(key_algorithm),
                    };
                    token_of(&server.send(Method::POST, "/api/v1/gateways", &body).await?)?
                }
            };
            let public_key = key;
            match &public_key {
                Some(k) => eprintln!("bound signing key {}", k.fingerprint()),
                None => eprintln!(
                    "warning: no --public-key: this gateway's evidence chain cannot be verified"
                ),
            }
            eprintln!(
                "registered gateway `{id}` in {}; put this in its config under [uplink] token:",
                data.data.display()
            );
            println!("{token}");
            Ok(())
        }
        Command::Serve {
            data,
            grpc_listen,
            http_listen,
            ports_file,
            metrics_listen,
            trust_on_first_use,
            criteria,
            retention,
            security,
        } => {
            let criteria = load_criteria(criteria.as_deref())?;
            let tls = security.tls.prepare(&data)?;
            let store = Arc::new(data.open(retention).await?);
            bootstrap_admin(&store, &data.data).await?;
            let shutdown = CancellationToken::new();
            let options = guantong_ingest::Options {
                trust_on_first_use,
                criteria,
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
            let metrics_addr = match metrics_listen {
                Some(addr) => Some(guantong_ingest::metrics::serve(addr, shutdown.clone()).await?),
                None => None,
            };
            // Commands run beside this server reach it here (`ops`).
            let serving = serde_json::json!({
                "http": running.http_addr.to_string(),
                "tls": security.tls.http_tls,
            });
            let serving_file = data.data.join(guantong_ingest::ops::SERVING_FILE);
            std::fs::write(&serving_file, serving.to_string())
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", serving_file.display()))?;
            if let Some(path) = ports_file {
                let mut json = serde_json::json!({
                    "grpc": running.grpc_addr.to_string(),
                    "http": running.http_addr.to_string(),
                });
                if let Some(addr) = metrics_addr {
                    json["metrics"] = addr.to_string().into();
                }
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
