//! Acceptance evidence end to end: simulated devices -> gateway -> fault
//! proxy -> ingest, with an enterprise, its equipment register and accounts.
//! Induced device faults and an uplink outage must produce exactly the
//! expected gaps with the right causes; a frozen device and two devices
//! replaying one series must be flagged; the networking rate must count
//! registered, unregistered and never-connected devices right; roles must
//! hold; the report must come out the same through API, HTML, CSV, CLI and a
//! real browser.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use guantong_e2e::browser::chromium_dom;
use guantong_e2e::procs::{
    GatewayProc, IngestProc, binary, gateway_toml, register_keyed_gateway, wait_for,
};
use guantong_e2e::proxy::{Mode, Proxy};
use guantong_e2e::sim::{SIGNAL_ADDR, SimDevice};
use reqwest::{Method, StatusCode};
use serde_json::Value;

const GW: &str = "gw-acc";
const CODE: &str = "91350100M000100Y43";

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn device_toml(id: &str, addr: SocketAddr) -> String {
    format!(
        "\n[[devices]]\nid = \"{id}\"\nprotocol = \"modbus-tcp\"\nhost = \"{}\"\nport = {}\nunit = 1\n\
         poll_interval = \"100ms\"\ntimeout = \"300ms\"\n\n[[devices.tags]]\nname = \"value\"\n\
         table = \"holding\"\naddress = {SIGNAL_ADDR}\ntype = \"u16\"\n",
        addr.ip(),
        addr.port()
    )
}

const REGISTER: &str = "设备编号,设备名称,车间,生产设备,网关,采集设备
E1,挤出机1号,一车间,是,gw-acc,dev-ok
E2,挤出机2号,一车间,是,gw-acc,dev-fault
E3,冷却塔,一车间,是,gw-acc,dev-frozen
E4,注塑机A,二车间,是,gw-acc,dev-twin-a
E5,注塑机B,二车间,是,gw-acc,dev-twin-b
E6,老式冲床,三车间,是,,
E7,新装配线,三车间,是,gw-acc,dev-never
E8,办公空调,办公楼,否,,
";

fn device<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["device"] == id))
        .unwrap_or_else(|| panic!("device {id} missing from the report: {report:#}"))
}

fn gaps<'a>(d: &'a Value, cause: &str) -> Vec<&'a Value> {
    d["gaps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["cause"] == cause)
        .collect()
}

fn flags(d: &Value) -> Vec<String> {
    d["flags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| f["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn equipment<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["networking"]["equipment"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["equipment"]["id"] == id))
        .unwrap_or_else(|| panic!("equipment {id} missing: {report:#}"))
}

async fn sim(seed: Option<u64>) -> anyhow::Result<(SimDevice, SocketAddr)> {
    let d = SimDevice::new();
    d.with(|s| {
        s.signal = seed;
        s.holding[usize::from(SIGNAL_ADDR)] = 500;
    });
    let (addr, _task) = d.serve(any_port()).await?;
    Ok((d, addr))
}

fn run_cli(args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new(binary("guantong-ingest")?)
        .args(args)
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "guantong-ingest {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_evidence_gaps_flags_networking_rate_roles_and_reports() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let criteria = dir.path().join("criteria.toml");
    std::fs::write(
        &criteria,
        "completeness_min = 0.95\nverdict_days = 7\nfrozen_after = \"3s\"\nidentical_similarity = 0.8\n",
    )?;
    let config = dir.path().join("gateway.toml");
    let buffer = dir.path().join("buffer");
    let token = register_keyed_gateway(&data, GW, &config, &buffer)?;
    let criteria_arg = criteria.display().to_string();
    let mut ingest = IngestProc::start_with_args(
        &data,
        any_port(),
        any_port(),
        &["--criteria", &criteria_arg],
    )
    .await?;
    let admin = ingest.api();

    // Registry through the API: a wrong check character is refused by name.
    let enterprise = |code: &str| {
        format!(
            r#"{{"code":"{code}","name":"示范新材料有限公司","county":"鼓楼区","industry":"metallurgy","provider":"prov-a"}}"#
        )
    };
    let (status, body) = admin
        .send(
            Method::POST,
            "/api/v1/enterprises",
            Some(enterprise("91350100M000100Y44")),
        )
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("check character"),
        "{body}"
    );
    let (status, body) = admin
        .send(Method::POST, "/api/v1/enterprises", Some(enterprise(CODE)))
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = admin
        .send(
            Method::PUT,
            &format!("/api/v1/enterprises/{CODE}/equipment"),
            Some(format!("\u{feff}{REGISTER}")),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["equipment"], 8);
    let (status, body) = admin
        .send(
            Method::PUT,
            &format!("/api/v1/gateways/{GW}/enterprise"),
            Some(format!(r#"{{"enterprise":"{CODE}"}}"#)),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut tokens = std::collections::HashMap::new();
    for (name, account) in [
        (
            "reviewer",
            r#"{"name":"reviewer","role":"reviewer","all_enterprises":true}"#,
        ),
        (
            "own",
            r#"{"name":"own","role":"provider","provider":"prov-a"}"#,
        ),
        (
            "other",
            r#"{"name":"other","role":"provider","provider":"prov-b"}"#,
        ),
    ] {
        let (status, body) = admin
            .send(Method::POST, "/api/v1/accounts", Some(account.to_string()))
            .await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        tokens.insert(name, body["token"].as_str().unwrap_or_default().to_string());
    }
    let reviewer = ingest.api_as(Some(tokens["reviewer"].clone()));
    let own = ingest.api_as(Some(tokens["own"].clone()));
    let other = ingest.api_as(Some(tokens["other"].clone()));

    // Devices: normal, faulting for a while, frozen, two replaying one
    // series, and one the register does not list.
    let (_ok, ok_addr) = sim(Some(1)).await?;
    let (fault, fault_addr) = sim(Some(2)).await?;
    let (_frozen, frozen_addr) = sim(None).await?;
    let (_twin_a, twin_a_addr) = sim(Some(7)).await?;
    let (_twin_b, twin_b_addr) = sim(Some(7)).await?;
    let (_extra, extra_addr) = sim(Some(3)).await?;
    let proxy = Proxy::start(ingest.grpc).await?;
    let mut text = gateway_toml(GW, proxy.addr, &token, &buffer);
    for (id, addr) in [
        ("dev-ok", ok_addr),
        ("dev-fault", fault_addr),
        ("dev-frozen", frozen_addr),
        ("dev-twin-a", twin_a_addr),
        ("dev-twin-b", twin_b_addr),
        ("dev-extra", extra_addr),
    ] {
        text += &device_toml(id, addr);
    }
    std::fs::write(&config, text)?;
    let gateway = GatewayProc::start(&config)?;

    tokio::time::sleep(Duration::from_secs(6)).await;
    fault.set_fault(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    fault.set_fault(false);
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set(Mode::Refuse);
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set(Mode::Pass);
    tokio::time::sleep(Duration::from_secs(12)).await;

    // Everything the gateway buffered has arrived once the backlog entry is
    // there and completeness of the healthy device is back up.
    let path = format!("/api/v1/enterprises/{CODE}/report");
    let report = wait_for("backlog delivered", Duration::from_secs(30), || async {
        let r = reviewer.get(&path).await?;
        let d = device(&r, "dev-ok");
        let done = !gaps(d, "gateway_offline_backfilled").is_empty()
            && d["completeness"].as_f64().unwrap_or(0.0) >= 0.97;
        Ok(done.then_some(r))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", ingest.proc.logs(), gateway.proc.logs()));

    // Gaps and their causes.
    let ok = device(&report, "dev-ok");
    assert!(
        gaps(ok, "no_data").is_empty() && gaps(ok, "device_fault").is_empty(),
        "{ok:#}"
    );
    // Batches committed before the gateway's first connection are backlog
    // too: on a loaded machine the first batch can arrive as backfill, a
    // stretch starting at the device's first sample. The outage is the one
    // after it.
    let first_seen = ok["first_seen_ms"].as_i64();
    let backfilled: Vec<_> = gaps(ok, "gateway_offline_backfilled")
        .into_iter()
        .filter(|g| g["start_ms"].as_i64() != first_seen)
        .collect();
    assert_eq!(backfilled.len(), 1, "one outage: {ok:#}");
    let d = backfilled[0]["duration_ms"].as_i64().unwrap_or(0);
    assert!(
        (2_500..=9_000).contains(&d),
        "outage of 4 s backfilled, got {d} ms: {ok:#}"
    );
    let faulty = device(&report, "dev-fault");
    let faults = gaps(faulty, "device_fault");
    assert_eq!(faults.len(), 1, "one fault window: {faulty:#}");
    let d = faults[0]["duration_ms"].as_i64().unwrap_or(0);
    assert!(
        (2_000..=4_500).contains(&d),
        "fault of 3 s, got {d} ms: {faulty:#}"
    );
    assert!(gaps(faulty, "no_data").is_empty(), "{faulty:#}");
    assert!(
        faulty["bad"].as_u64().unwrap_or(0) >= 15,
        "Bad samples counted: {faulty:#}"
    );

    // Plausibility flags.
    assert!(flags(device(&report, "dev-frozen")).contains(&"frozen".to_string()));
    for twin in ["dev-twin-a", "dev-twin-b"] {
        let t = device(&report, twin);
        let f = &t["flags"].as_array().expect("flags")[..];
        let same = f
            .iter()
            .find(|f| f["kind"] == "identical_series")
            .unwrap_or_else(|| panic!("{twin} not flagged: {t:#}"));
        assert_eq!(same["critical"], true);
        assert_eq!(t["verdict"]["data_through"], false);
    }
    for dev in ["dev-ok", "dev-fault", "dev-extra"] {
        let f = flags(device(&report, dev));
        assert!(
            !f.contains(&"frozen".into()) && !f.contains(&"identical_series".into()),
            "{dev}: {f:?}"
        );
    }

    // Networking rate: E1 and E3 (frozen is a warning) of seven production
    // devices; E8 is not production; dev-extra is not in the register.
    let n = &report["networking"];
    assert_eq!(n["registered_production"], 7, "{n:#}");
    assert_eq!(n["data_through"], 2, "{n:#}");
    assert!((n["rate"].as_f64().unwrap_or(0.0) - 2.0 / 7.0).abs() < 1e-9);
    assert_eq!(equipment(&report, "E1")["data_through"], true);
    assert_eq!(equipment(&report, "E3")["data_through"], true);
    assert!(
        equipment(&report, "E2")["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("completeness")
    );
    assert!(
        equipment(&report, "E4")["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("identical_series")
    );
    assert!(
        equipment(&report, "E6")["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("not networked")
    );
    assert!(
        equipment(&report, "E7")["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("never connected")
    );
    assert_eq!(
        n["unregistered_devices"],
        serde_json::json!(["gw-acc/dev-extra"])
    );

    // Cloud usage and gateway figures.
    let today = report["usage"]
        .as_array()
        .and_then(|u| u.last())
        .expect("usage")
        .clone();
    assert_eq!(today["active"], true, "{today}");
    assert_eq!(today["active_devices"], 6, "{today}");
    let gw = &report["gateways"][0];
    assert!(gw["points"].as_u64().unwrap_or(0) > 1000, "{gw}");
    assert!(gw["latency_p95_ms"].as_i64().is_some(), "{gw}");
    assert!(gw["backfill_share"].as_f64().unwrap_or(0.0) > 0.0, "{gw}");

    // Roles.
    let (s, _) = ingest.api_as(None).send(Method::GET, &path, None).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "no token");
    let (s, _) = ingest
        .api_as(Some("gtk_wrong".into()))
        .send(Method::GET, &path, None)
        .await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "wrong token");
    let (s, _) = reviewer
        .send(Method::POST, "/api/v1/enterprises", Some(enterprise(CODE)))
        .await?;
    assert_eq!(s, StatusCode::FORBIDDEN, "a reviewer cannot write");
    let (s, _) = reviewer
        .send(
            Method::PUT,
            &format!("/api/v1/enterprises/{CODE}/equipment"),
            Some(REGISTER.into()),
        )
        .await?;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "a reviewer cannot write the register"
    );
    let (s, _) = other.send(Method::GET, &path, None).await?;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "another provider's enterprise is invisible"
    );
    let summary = other.get("/api/v1/summary").await?;
    assert_eq!(
        summary["gateways"],
        serde_json::json!([]),
        "another provider sees no data"
    );
    let (s, _) = other
        .send(
            Method::PUT,
            &format!("/api/v1/enterprises/{CODE}/equipment"),
            Some(REGISTER.into()),
        )
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = own.send(Method::GET, &path, None).await?;
    assert_eq!(s, StatusCode::OK, "the enterprise's own provider reads it");
    let log = admin.get("/api/v1/access-log").await?;
    let entries = log["access"].as_array().expect("access log");
    assert!(
        entries
            .iter()
            .any(|a| a["account"] == "reviewer" && a["enterprise"] == CODE),
        "the reviewer's report opening is logged: {log:#}"
    );

    // CSV with BOM, and the city view.
    let (s, csv) = reviewer
        .send(Method::GET, &format!("{path}?format=csv&part=gaps"), None)
        .await?;
    assert_eq!(s, StatusCode::OK);
    let csv = csv.as_str().unwrap_or_default();
    assert!(csv.starts_with('\u{feff}'), "BOM first");
    assert!(csv.contains("设备故障"), "causes in Chinese: {csv}");
    let city = reviewer.get("/api/v1/city").await?;
    assert_eq!(city["enterprises"], 1);
    assert_eq!(city["on_cloud"], 1);
    assert_eq!(
        city["distribution"][1], 1,
        "28.6 % falls in 20–40 %: {city}"
    );

    // A real browser: the pages render without console errors and show the
    // figures.
    let http = ingest.http;
    let admin_token = ingest.admin_token()?;
    let (dom, console) = chromium_dom(
        &format!("http://{http}/report/{CODE}?token={admin_token}"),
        &dir.path().join("chromium"),
    )?;
    assert!(console.is_empty(), "console errors: {console:?}");
    assert!(dom.contains("id=\"networking-rate\">28.6%"), "{dom}");
    assert!(
        dom.contains("生产设备联网率") && dom.contains("挤出机1号"),
        "Chinese report"
    );
    let (dom, console) = chromium_dom(
        &format!("http://{http}/city?lang=en&token={admin_token}"),
        &dir.path().join("chromium"),
    )?;
    assert!(console.is_empty(), "console errors: {console:?}");
    assert!(dom.contains("id=\"on-cloud\">1<"), "{dom}");
    assert!(
        dom.contains("Networking-rate distribution"),
        "English city page"
    );

    // The CLI gives the same figures from the data directory.
    drop(gateway);
    ingest.proc.terminate(Duration::from_secs(10));
    let data_arg = data.display().to_string();
    let json: Value = serde_json::from_slice(&run_cli(&[
        "report",
        "--data",
        &data_arg,
        "--enterprise",
        CODE,
        "--format",
        "json",
        "--criteria",
        &criteria_arg,
    ])?)?;
    assert_eq!(json["networking"]["data_through"], 2);
    assert_eq!(json["networking"]["registered_production"], 7);
    let csv = run_cli(&[
        "report",
        "--data",
        &data_arg,
        "--enterprise",
        CODE,
        "--format",
        "csv",
    ])?;
    assert_eq!(&csv[..3], &[0xEF, 0xBB, 0xBF]);
    let html = String::from_utf8(run_cli(&[
        "report",
        "--data",
        &data_arg,
        "--enterprise",
        CODE,
        "--format",
        "html",
        "--lang",
        "en",
    ])?)?;
    assert!(html.contains("Production equipment networking rate"));
    Ok(())
}
