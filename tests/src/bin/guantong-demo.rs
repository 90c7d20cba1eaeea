//! The live demo: ingest on embedded storage, a gateway, and a simulated
//! Modbus device with changing values, all in one process.
//!
//! `cargo run --release --bin guantong-demo` then open the printed URL.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use guantong_e2e::sim::{SimDevice, standard_device_toml};
use guantong_gateway::config::Config;
use guantong_ingest::registry::{Account, Enterprise, Role, parse_equipment_csv};
use guantong_ingest::store::Store;
use guantong_ingest::store::embedded::EmbeddedStore;
use guantong_proto::chain;
use tokio_util::sync::CancellationToken;

const DEMO_ENTERPRISE: &str = "91350100M000100Y43";

#[derive(Parser)]
#[command(about = "Guantong live demo: simulated Modbus device -> gateway -> ingest")]
struct Args {
    /// Data directory for ingest and the gateway buffer (default: a fresh temporary one).
    #[arg(long)]
    data: Option<PathBuf>,
    /// HTTP address of the overview page and API.
    #[arg(long, default_value = "127.0.0.1:7601")]
    http: SocketAddr,
    /// gRPC address gateways connect to.
    #[arg(long, default_value = "127.0.0.1:7600")]
    grpc: SocketAddr,
    /// Address of the simulated Modbus TCP device.
    #[arg(long, default_value = "127.0.0.1:5020")]
    modbus: SocketAddr,
}

/// Binds `addr`, or any free port on the same host if it is taken.
fn or_any(addr: SocketAddr) -> SocketAddr {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => addr,
        Err(_) => SocketAddr::new(addr.ip(), 0),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GUANTONG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_target(false)
        .init();
    let temp = tempfile::tempdir()?;
    let data = args.data.unwrap_or_else(|| temp.path().to_path_buf());

    let sim = SimDevice::new();
    sim.with(|s| s.animate = true);
    let (sim_addr, _sim) = sim.serve(or_any(args.modbus)).await?;

    let store = Arc::new(EmbeddedStore::open(&data.join("ingest"))?);
    // As an installer would: the gateway's key is made first (what
    // `guantong-gateway identity` does) and registered with its public key.
    let key_file = data.join("gateway.key");
    let (key, _) =
        guantong_gateway::identity::load_or_create(&key_file, chain::Algorithm::Ed25519)?;
    let public_key = chain::PublicKey::new(chain::Algorithm::Ed25519, key.public_key())
        .map_err(|e| anyhow::anyhow!("demo gateway key: {e}"))?;
    let token = match store
        .register_gateway("demo-gateway", Some(public_key))
        .await
    {
        Ok(t) => t,
        Err(e) => anyhow::bail!(
            "cannot register the demo gateway in {}: {e} (use a fresh --data)",
            data.display()
        ),
    };
    let shutdown = CancellationToken::new();
    // TLS as in production: an operator CA in the data directory, created
    // at the first start, which the gateway trusts.
    let ingest_data = data.join("ingest");
    let tls = guantong_ingest::tls::TlsArgs::default()
        .prepare(&guantong_ingest::ops::StoreArgs::embedded(&ingest_data))?;
    let ca_file = guantong_ingest::ca::dir(&ingest_data).join("ca.pem");
    let options = guantong_ingest::Options {
        tls,
        ..guantong_ingest::Options::default()
    };
    // A demo enterprise whose register has two production machines, one of
    // them networked through the demo gateway: networking rate 50 %.
    store
        .put_enterprise(&Enterprise {
            code: DEMO_ENTERPRISE.into(),
            name: "示范精细化工有限公司".into(),
            county: "示范区".into(),
            industry: "petrochemical".into(),
            provider: "demo-provider".into(),
        })
        .await?;
    store
        .put_equipment(
            DEMO_ENTERPRISE,
            &parse_equipment_csv(
                "设备编号,设备名称,车间,生产设备,网关,采集设备\n\
             E-001,压机1号,一车间,是,demo-gateway,press-01\n\
             E-002,反应釜2号,二车间,是,,\n",
            )
            .map_err(|p| anyhow::anyhow!("demo register: {p:?}"))?,
        )
        .await?;
    store
        .assign_gateway("demo-gateway", DEMO_ENTERPRISE)
        .await?;
    let admin = store
        .put_account(&Account {
            name: "demo-admin".into(),
            role: Role::Admin,
            provider: String::new(),
            enterprises: Vec::new(),
            all_enterprises: false,
        })
        .await?;
    let ingest = guantong_ingest::start_with(
        store.clone(),
        or_any(args.grpc),
        or_any(args.http),
        shutdown.clone(),
        options,
    )
    .await?;

    let config_text = format!(
        r#"[gateway]
id = "demo-gateway"
key_file = "{key_file}"

[uplink]
endpoint = "https://{grpc}"
ca_file = "{ca_file}"
token = "{token}"
max_backoff = "2s"

[buffer]
dir = "{buffer}"
max_bytes = "64 MiB"
commit_interval = "200ms"
"#,
        grpc = ingest.grpc_addr,
        ca_file = ca_file.display(),
        key_file = key_file.display(),
        buffer = data.join("gateway-buffer").display(),
    ) + &standard_device_toml("press-01", sim_addr, "1s");
    let config = Config::parse(&config_text, &data)
        .map_err(|p| anyhow::anyhow!("demo config is invalid: {p:?}"))?;
    let gateway = tokio::spawn(guantong_gateway::run(config, shutdown.clone()));

    println!();
    println!("  Guantong demo is running.");
    println!("  simulated Modbus TCP device  {sim_addr} (unit 1)");
    println!(
        "  gateway                      demo-gateway, buffer in {}",
        data.join("gateway-buffer").display()
    );
    println!("  ingest gRPC                  {}", ingest.grpc_addr);
    println!();
    let http = ingest.http_addr;
    println!("  Open  http://{http}/?token={admin}");
    println!("        live overview (the link signs you in as demo-admin)");
    println!("        http://{http}/report/{DEMO_ENTERPRISE}   acceptance report (中文; &lang=en)");
    println!("        http://{http}/city                       city overview");
    println!("  API   curl -H 'Authorization: Bearer {admin}' http://{http}/api/v1/summary");
    println!("        /api/v1/enterprises/{DEMO_ENTERPRISE}/report?format=json|csv");
    println!("        /api/v1/points?gateway=demo-gateway&device=press-01&tag=temperature");
    println!("        /api/v1/chain   signed evidence chain, verified on receipt");
    println!();
    println!("  Ctrl-C stops it. Points arriving:");

    let mut tick = tokio::time::interval(Duration::from_secs(3));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let series = store.series().await?;
                let total: u64 = series.iter().map(|s| s.samples).sum();
                let show = |name: &str| {
                    let v = series.iter().find(|s| s.tag == name).and_then(|s| s.last_value.clone());
                    match v {
                        Some(serde_json::Value::Number(n)) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or_default()),
                        Some(v) => v.to_string(),
                        None => "-".to_string(),
                    }
                };
                println!(
                    "  {:>7} points stored | temperature {} °C | flow {} m³/h | running {} | counter {}",
                    total, show("temperature"), show("flow"), show("running"), show("counter")
                );
            }
        }
    }
    shutdown.cancel();
    let _ = gateway.await;
    let _ = ingest.done.await;
    Ok(())
}
