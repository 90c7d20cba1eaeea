//! `guantong-ingest`: parses arguments and runs the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use guantong_ingest::acceptance::Criteria;
use guantong_ingest::ops::Target;
use guantong_ingest::registry::{Account, Enterprise, Role, parse_equipment_csv};
use guantong_ingest::store::Store;
use guantong_ingest::store::embedded::EmbeddedStore;
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
        #[command(flatten)]
        security: Box<ServeSecurity>,
    },
    /// The operator CA for gateway client certificates (mutual TLS).
    #[command(subcommand)]
    Ca(guantong_ingest::ca::CaCommand),
    /// Issue a gateway a new token (while `serve` runs, through it); the
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
    /// Manage enterprises (`add` works while `serve` runs, through it).
    #[command(subcommand)]
    Enterprise(EnterpriseCommand),
    /// Replace an enterprise's equipment register (设备台账) from a CSV file
    /// (while `serve` runs, through it).
    ImportEquipment {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
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
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
        gateway: String,
        #[arg(long)]
        enterprise: String,
    },
    /// Create or replace an account and print its new token (while `serve`
    /// runs, through it: POST /api/v1/accounts).
    AddAccount {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
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
    /// (run while the server is stopped; a running server serves the same at
    /// /report/CODE and /api/v1/enterprises/CODE/report).
    Report {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
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
    /// One enterprise's file for a window (一企一档), run while the server is
    /// stopped: the report as self-contained HTML in both languages, its JSON
    /// and CSV parts, the evidence bundle, ingest's signed digests of the
    /// window's complete UTC days, and VERIFY.txt on checking it offline.
    Dossier {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
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
    /// Register a gateway and print its token (while `serve` runs, through it).
    RegisterGateway {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
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
enum EnterpriseCommand {
    /// Register (or update) an enterprise.
    Add {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
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
    /// List enterprises as JSON.
    List {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
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

/// Creates the first admin account when there is none and writes its token
/// to `admin.token` in the data directory, readable by the owner only.
async fn bootstrap_admin(store: &EmbeddedStore, data: &std::path::Path) -> anyhow::Result<()> {
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
            match Target::open(&data)? {
                Target::Local(store) => store.put_enterprise(&e).await?,
                Target::Remote(server) => {
                    server.send(Method::POST, "/api/v1/enterprises", &e).await?;
                }
            }
            eprintln!("registered enterprise {} ({})", e.code, e.name);
            Ok(())
        }
        Command::Enterprise(EnterpriseCommand::List { data }) => {
            let store = EmbeddedStore::open(&data)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&store.enterprises().await?)?
            );
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
            match Target::open(&data)? {
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
            match Target::open(&data)? {
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
            let token = match Target::open(&data)? {
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
            let criteria = load_criteria(criteria.as_deref())?;
            let store = EmbeddedStore::open(&data)?;
            let now = guantong_ingest::grpc::now_ms();
            let (from_day, to_day) =
                guantong_ingest::web::window(from.as_deref(), to.as_deref(), now)
                    .map_err(anyhow::Error::msg)?;
            let snap = guantong_ingest::web::snapshot(&store)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.1))?;
            let bytes = guantong_ingest::web::render_cli(
                &store,
                &snap,
                enterprise.as_deref().filter(|_| !city),
                from_day,
                to_day,
                &criteria,
                &format,
                part.as_deref(),
                lang.as_deref(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.1))?;
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
            let criteria = load_criteria(criteria.as_deref())?;
            let store = EmbeddedStore::open(&data)?;
            let now = guantong_ingest::grpc::now_ms();
            let (from_day, to_day) =
                guantong_ingest::web::window(from.as_deref(), to.as_deref(), now)
                    .map_err(anyhow::Error::msg)?;
            // The same bundle whose fingerprint the report's footer shows.
            let (gateways, bundle) =
                guantong_ingest::web::enterprise_bundle(&store, &enterprise, from_day, to_day)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", e.1))?;
            let snap = guantong_ingest::web::snapshot(&store)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.1))?;
            std::fs::create_dir_all(&out)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
            let write = |name: &str, bytes: &[u8]| {
                let path = out.join(name);
                std::fs::write(&path, bytes)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
            };
            let mut parts = vec![
                ("report-zh.html", "html", None, "zh"),
                ("report-en.html", "html", None, "en"),
                ("report.json", "json", None, "zh"),
            ];
            for part in ["devices", "equipment", "gaps", "usage"] {
                parts.push((part, "csv", Some(part), "zh"));
            }
            for (name, format, part, lang) in parts {
                let bytes = guantong_ingest::web::render_cli(
                    &store,
                    &snap,
                    Some(&enterprise),
                    from_day,
                    to_day,
                    &criteria,
                    format,
                    part,
                    Some(lang),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.1))?;
                let file = match part {
                    Some(p) => format!("report-{p}.csv"),
                    None => name.to_string(),
                };
                write(&file, &bytes)?;
            }
            guantong_ingest::evidence::write_bundle(&out.join("evidence-bundle.json"), &bundle)?;
            // Digests exist for complete UTC days only.
            let mut digests = Vec::new();
            let day_ms = 86_400_000;
            let mut day = from_day.div_euclid(day_ms) * day_ms;
            while day + day_ms <= to_day.min(now) {
                if !gateways.is_empty() {
                    let name = guantong_ingest::evidence::digest::day_of(day);
                    digests.extend(
                        store
                            .day_digests(gateways.clone(), name)
                            .await?
                            .into_iter()
                            .map(|d| d.digest),
                    );
                }
                day += day_ms;
            }
            write(
                "digests.json",
                &serde_json::to_vec_pretty(&serde_json::json!({ "digests": digests }))?,
            )?;
            write("VERIFY.txt", VERIFY_TEXT.as_bytes())?;
            eprintln!(
                "wrote the dossier of {enterprise} to {} ({} gateways, {} digests); check it with `guantong-ingest verify {}/evidence-bundle.json --digests {}/digests.json`",
                out.display(),
                gateways.len(),
                digests.len(),
                out.display(),
                out.display()
            );
            Ok(())
        }
        Command::ExportEvidence {
            data,
            mut gateways,
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
            let store = EmbeddedStore::open(&data)?;
            if let Some(code) = &enterprise {
                if store.enterprise(code).await?.is_none() {
                    anyhow::bail!(
                        "--enterprise {code}: no such enterprise in {}",
                        data.display()
                    );
                }
                gateways.extend(
                    store
                        .gateway_owners()
                        .await?
                        .into_iter()
                        .filter(|(_, owner)| owner == code)
                        .map(|(g, _)| g),
                );
                if gateways.is_empty() {
                    anyhow::bail!("--enterprise {code}: no gateway belongs to it (assign-gateway)");
                }
            }
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
            let store = EmbeddedStore::open(&data)?;
            let days = store.day_digests(gateways, day).await?;
            let digests: Vec<_> = days.into_iter().map(|d| d.digest).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "digests": digests }))?
            );
            Ok(())
        }
        Command::Ca(command) => command.run(),
        Command::RotateGatewayToken { data, id, grace } => {
            let token = match Target::open(&data)? {
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
            let token = match Target::open(&data)? {
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
            metrics_listen,
            trust_on_first_use,
            criteria,
            security,
        } => {
            let criteria = load_criteria(criteria.as_deref())?;
            let tls = security.tls.prepare(&data)?;
            let store = Arc::new(EmbeddedStore::open(&data)?);
            bootstrap_admin(&store, &data).await?;
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
            let serving_file = data.join(guantong_ingest::ops::SERVING_FILE);
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

/// How to check a dossier offline, in both languages (the dossier's VERIFY.txt).
const VERIFY_TEXT: &str = "\
如何离线校验本档案（一企一档）
1. 安装 guantong-ingest（与生成本档案的版本相同或更新），无需服务器或数据库。
2. 运行：guantong-ingest verify evidence-bundle.json --digests digests.json
3. 输出 \"all checks hold\" 且退出码为 0：证据包中每个网关的签名哈希链完整、未被篡改，且与平台每日签名摘要一致。
   任何一项不成立时会逐条列出，退出码为 1。
4. report-zh.html / report-en.html 为报告本身（无外部资源，可直接打开或打印）；页脚的链头哈希应与校验输出一致。
   report.json 与 report-*.csv 为同一数据。

How to verify this dossier offline
1. Install guantong-ingest (the version that wrote the dossier, or newer); no server or database needed.
2. Run: guantong-ingest verify evidence-bundle.json --digests digests.json
3. \"all checks hold\" and exit code 0: every gateway's signed hash chain in the bundle is whole and
   untampered, and agrees with ingest's signed daily digests. Anything that fails is listed; exit code 1.
4. report-zh.html / report-en.html are the report itself (no external resources; open or print them);
   the chain heads in their footer must match the verification. report.json and report-*.csv carry
   the same data.
";
