//! The fleet view as a service provider and an admin use it: a real
//! gateway with one working and one unreachable Modbus device reports its
//! health over its uplink to a real ingest, a second gateway never
//! connects; `GET /api/v1/gateways` and the `/gateways` page (headless
//! Chromium, 1400 px and a 400 px phone) show each what it may see, in both
//! languages, and a stopped gateway turns offline.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use guantong_e2e::browser::Browser;
use guantong_e2e::procs::{
    GatewayProc, IngestProc, gateway_toml, register_keyed_gateway, wait_for,
};
use guantong_e2e::sim::{SimDevice, standard_device_toml};
use reqwest::{Method, StatusCode};
use serde_json::Value;

const GW_A: &str = "gw-fleet-a";
const GW_B: &str = "gw-fleet-b";
const A: &str = "91350100M000100Y43";
const B: &str = "91110000802100433B";

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The rows of the fleet page as a reader sees them, and how it is laid out.
const ROWS: &str = r#"
const rows = [...document.querySelectorAll('tr.gateway')].map(r => ({
  id: r.dataset.id, text: r.innerText,
  right: r.getBoundingClientRect().right,
  labels: [...r.querySelectorAll('td')].map(td => getComputedStyle(td, '::before').content),
}));
const head = document.querySelector('tr.head');
return {
  rows,
  options: [...document.querySelectorAll('select[name=enterprise] option')].map(o => o.value),
  head_shown: head !== null && getComputedStyle(head).display !== 'none',
  inner: window.innerWidth,
  scroll: document.documentElement.scrollWidth,
};
"#;

fn row<'a>(page: &'a Value, id: &str) -> &'a Value {
    page["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["id"] == id))
        .unwrap_or(&Value::Null)
}

fn ids(page: &Value) -> Vec<String> {
    page["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_shows_each_provider_its_gateways_live_in_both_languages_and_on_a_phone()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet-page");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots)?;
    let data = dir.path().join("ingest");
    let config = dir.path().join("gateway.toml");
    let buffer = dir.path().join("buffer");
    let token = register_keyed_gateway(&data, GW_A, &config, &buffer)?;
    IngestProc::register(&data, GW_B)?;
    let ingest = IngestProc::start(&data, any_port(), any_port()).await?;
    let admin = ingest.api();
    let admin_token = ingest.admin_token()?;
    for (code, name, provider, gw) in [
        (A, "甲机械厂", "prov-a", GW_A),
        (B, "乙化工", "prov-b", GW_B),
    ] {
        let enterprise = serde_json::json!({
            "code": code, "name": name, "county": "示范区", "industry": "light", "provider": provider,
        });
        let assign = serde_json::json!({ "enterprise": code });
        for (method, path, body) in [
            (Method::POST, "/api/v1/enterprises".to_string(), enterprise),
            (
                Method::PUT,
                format!("/api/v1/gateways/{gw}/enterprise"),
                assign,
            ),
        ] {
            let (status, reply) = admin.send(method, &path, Some(body.to_string())).await?;
            assert!(status.is_success(), "{path}: {reply}");
        }
    }
    let (status, reply) = admin
        .send(
            Method::POST,
            "/api/v1/accounts",
            Some(r#"{"name":"prov-a","role":"provider","provider":"prov-a"}"#.into()),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{reply}");
    let provider_token = reply["token"].as_str().unwrap_or_default().to_string();

    // One device answers, one is a closed port.
    let sim = SimDevice::new();
    let (sim_addr, _sim_task) = sim.serve(any_port()).await?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    std::fs::write(
        &config,
        gateway_toml(GW_A, ingest.grpc, &token, &buffer)
            + &standard_device_toml("press-01", sim_addr, "200ms")
            + &standard_device_toml("dev-dead", dead, "200ms"),
    )?;
    let mut gateway = GatewayProc::start(&config)?;

    let a: Value = wait_for(
        "gw-fleet-a online, reporting one device up and one down, with chain links",
        Duration::from_secs(40),
        || async {
            let fleet = admin.get("/api/v1/gateways").await?;
            let a = fleet["gateways"]
                .as_array()
                .and_then(|g| g.iter().find(|g| g["id"] == GW_A))
                .cloned()
                .unwrap_or(Value::Null);
            let ready = a["online"] == true
                && a["devices_up"] == 1
                && a["devices_down"] == 1
                && a["chain"]["verified"].as_u64().unwrap_or(0) > 0
                && a["last_batch"].is_string();
            Ok(ready.then_some(a))
        },
    )
    .await?;
    assert_eq!(a["enterprise"], A, "{a:#}");
    assert_eq!(a["provider"], "prov-a", "{a:#}");
    assert_eq!(a["software_version"], env!("CARGO_PKG_VERSION"), "{a:#}");
    let h = &a["health"];
    assert_eq!(h["buffer_max_bytes"], 64 << 20, "{h:#}");
    assert_eq!(
        h["manifest_version"].as_str().map(str::len),
        Some(16),
        "{h:#}"
    );
    let offset = h["clock_offset_ms"].as_i64().unwrap_or(i64::MAX);
    assert!(
        offset.abs() < 5_000,
        "same machine, same clock: {offset} ms"
    );
    let down = h["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["state"] == "down"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(down["id"], "dev-dead", "{h:#}");
    assert!(
        down["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{down}"
    );
    assert_eq!(a["chain"]["breaks"], 0, "{a:#}");

    let fleet = admin.get("/api/v1/gateways").await?;
    let b = fleet["gateways"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["id"] == GW_B))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(b["online"], false, "{b:#}");
    assert!(
        b["since"].is_null() && b["health"].is_null(),
        "never connected: {b:#}"
    );
    // Sorted as asked; an unknown key names what it takes.
    let sorted = admin.get("/api/v1/gateways?sort=-id").await?;
    let order: Vec<&str> = sorted["gateways"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["id"].as_str())
        .collect();
    assert_eq!(order, [GW_B, GW_A]);
    let by_trouble = admin.get("/api/v1/gateways?sort=-devices_down").await?;
    assert_eq!(by_trouble["gateways"][0]["id"], GW_A, "{by_trouble:#}");
    let (status, reply) = admin
        .send(Method::GET, "/api/v1/gateways?sort=colour", None)
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert!(reply.to_string().contains("devices_down"), "{reply}");

    // The admin's page, in both languages.
    let base = format!("http://{}", ingest.http);
    let browser = Browser::start(&dir.path().join("chromium-admin"), 1400).await?;
    browser
        .open(&format!("{base}/gateways?token={admin_token}&lang=zh"))
        .await?;
    browser
        .screenshot(&shots.join("fleet-admin-zh.png"))
        .await?;
    let page = browser.eval(ROWS).await?;
    assert_eq!(ids(&page), [GW_A, GW_B], "{page:#}");
    let text_a = row(&page, GW_A)["text"].as_str().unwrap_or_default();
    for expected in ["在线", "甲机械厂", "1 离线", "dev-dead", "已验证"] {
        assert!(
            text_a.contains(expected),
            "{expected:?} in the zh row of A: {text_a}"
        );
    }
    let text_b = row(&page, GW_B)["text"].as_str().unwrap_or_default();
    for expected in ["离线", "本次启动后未连接", "尚无网关自报状态"] {
        assert!(
            text_b.contains(expected),
            "{expected:?} in the zh row of B: {text_b}"
        );
    }
    assert_eq!(page["head_shown"], true, "{page:#}");
    browser.open(&format!("{base}/gateways?lang=en")).await?;
    let page = browser.eval(ROWS).await?;
    let text_a = row(&page, GW_A)["text"].as_str().unwrap_or_default();
    for expected in ["online", "1 down", "dev-dead", "verified"] {
        assert!(
            text_a.contains(expected),
            "{expected:?} in the en row of A: {text_a}"
        );
    }
    let text_b = row(&page, GW_B)["text"].as_str().unwrap_or_default();
    assert!(text_b.contains("not seen since ingest started"), "{text_b}");
    // Filtered by provider through the form's parameter.
    browser
        .open(&format!("{base}/gateways?lang=en&provider=prov-b"))
        .await?;
    assert_eq!(ids(&browser.eval(ROWS).await?), [GW_B]);

    // The provider, on a phone: only its gateway, one card per gateway
    // with a label before each value, nothing wider than the screen.
    let phone = Browser::phone(&dir.path().join("chromium-phone"), 400).await?;
    phone
        .open(&format!("{base}/gateways?token={provider_token}&lang=zh"))
        .await?;
    phone
        .screenshot(&shots.join("fleet-provider-phone.png"))
        .await?;
    let page = phone.eval(ROWS).await?;
    let inner = page["inner"].as_f64().unwrap_or(0.0);
    assert!(inner <= 420.0, "the window is a phone's: {inner} px");
    assert_eq!(ids(&page), [GW_A], "{page:#}");
    assert_eq!(
        page["options"],
        serde_json::json!(["", A, "-"]),
        "the provider filters only by its enterprises"
    );
    assert_eq!(page["head_shown"], false, "cards, not a table, on a phone");
    assert!(
        page["scroll"].as_f64().unwrap_or(f64::MAX) <= inner,
        "no sideways scrolling: {page:#}"
    );
    assert!(
        row(&page, GW_A)["right"].as_f64().unwrap_or(f64::MAX) <= inner,
        "{page:#}"
    );
    let labels = row(&page, GW_A)["labels"].to_string();
    for label in ["网关", "状态", "积压", "证据链"] {
        assert!(
            labels.contains(label),
            "label {label} on the card: {labels}"
        );
    }

    // Stopped: offline, since the stop.
    let stopped_at = guantong_ingest::grpc::now_ms();
    gateway.proc.terminate(Duration::from_secs(10));
    wait_for("gw-fleet-a offline", Duration::from_secs(20), || async {
        let fleet = admin
            .get(&format!("/api/v1/gateways?enterprise={A}"))
            .await?;
        let a = &fleet["gateways"][0];
        let since = a["since"].as_str().unwrap_or_default();
        let since_ms = guantong_ingest::http::parse_time("since", since).unwrap_or(0);
        Ok((a["online"] == false && since_ms >= stopped_at - 1000).then_some(()))
    })
    .await?;
    Ok(())
}
