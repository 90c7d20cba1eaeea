//! The OPC UA collector end to end: an async-opcua server started in this
//! test process (`guantong_e2e::opcua`), the real gateway and ingest
//! binaries, and what ingest stored. Each test is a few seconds.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use async_opcua::types::Variant;
use guantong_e2e::opcua::{GUID, NAMESPACE, PASSWORD, ServerOptions, TestServer, USER};
use guantong_e2e::procs::{GatewayProc, IngestProc, binary, gateway_toml, wait_for};
use serde_json::Value;

const GW: &str = "gw-opcua";
const WAIT: Duration = Duration::from_secs(30);

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

struct Setup {
    dir: tempfile::TempDir,
    ingest: IngestProc,
    gateway: GatewayProc,
}

impl Setup {
    async fn start(dir: tempfile::TempDir, devices: &str) -> anyhow::Result<Setup> {
        let data = dir.path().join("ingest");
        let token = IngestProc::register(&data, GW)?;
        let ingest = IngestProc::start(&data, any_port(), any_port()).await?;
        let config = dir.path().join("gateway.toml");
        let text = gateway_toml(GW, ingest.grpc, &token, &dir.path().join("buffer")) + devices;
        std::fs::write(&config, text)?;
        let gateway = GatewayProc::start(&config)?;
        Ok(Setup {
            dir,
            ingest,
            gateway,
        })
    }

    fn logs(&self) -> String {
        format!("{}{}", self.gateway.proc.logs(), self.ingest.proc.logs())
    }

    async fn points(&self, device: &str, tag: &str) -> Vec<Value> {
        self.ingest
            .api()
            .points(GW, device, tag)
            .await
            .unwrap_or_default()
    }

    /// Waits until `tag` has a point for which `check` holds.
    async fn wait_point(&self, device: &str, tag: &str, check: impl Fn(&Value) -> bool) -> Value {
        wait_for(&format!("{device}/{tag}"), WAIT, || async {
            Ok(self
                .points(device, tag)
                .await
                .into_iter()
                .find(|p| check(p)))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(binary("guantong-gateway").expect("binary"))
            .args(args)
            .arg("--config")
            .arg(self.dir.path().join("gateway.toml"))
            .output()
            .expect("gateway CLI runs");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

fn plant_tags() -> String {
    format!(
        r#"
[[devices.tags]]
name = "counter"
node = "nsu={NAMESPACE};s=Counter"
type = "uint"
[[devices.tags]]
name = "temperature"
node = "nsu={NAMESPACE};s=Temperature"
unit = "°C"
[[devices.tags]]
name = "running"
node = "nsu={NAMESPACE};s=Running"
type = "bool"
[[devices.tags]]
name = "label"
node = "nsu={NAMESPACE};s=Label"
type = "string"
[[devices.tags]]
name = "vector"
node = "nsu={NAMESPACE};s=Vector"
type = "string"
[[devices.tags]]
name = "total"
node = "nsu={NAMESPACE};i=1001"
type = "int"
[[devices.tags]]
name = "ratio"
node = "nsu={NAMESPACE};g={GUID}"
[[devices.tags]]
name = "code"
node = "nsu={NAMESPACE};b=AQID"
type = "uint"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribes_every_identifier_type_and_delivers_every_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(ServerOptions::new(&dir.path().join("server-pki")))
        .await
        .expect("server");
    let devices = format!(
        r#"
[[devices]]
id = "press"
protocol = "opcua"
url = "{}"
security_policy = "none"
publishing_interval = "100ms"
max_backoff = "1s"
{}"#,
        server.url(),
        plant_tags()
    );
    let s = Setup::start(dir, &devices).await.expect("setup");
    // Initial values of all four identifier types and every mapped type.
    let expect = [
        ("counter", serde_json::json!(0)),
        ("temperature", serde_json::json!(20.5)),
        ("running", serde_json::json!(true)),
        ("label", serde_json::json!("Line 1")),
        ("vector", serde_json::json!("[1,2,3]")),
        ("total", serde_json::json!(-7)),
        ("ratio", serde_json::json!(0.25)),
        ("code", serde_json::json!(7)),
    ];
    for (tag, v) in &expect {
        s.wait_point("press", tag, |p| p["value"] == *v && p["quality"] == "good")
            .await;
    }
    // Changes faster than the publishing interval: none may be lost.
    for i in 1..=20u32 {
        server.set(vec![(server.node("Counter"), Variant::UInt32(i))]);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    s.wait_point("press", "counter", |p| p["value"] == 20).await;
    let got: Vec<u64> = s
        .points("press", "counter")
        .await
        .iter()
        .filter_map(|p| p["value"].as_u64())
        .collect();
    assert_eq!(
        got,
        (0..=20).collect::<Vec<u64>>(),
        "every change, in order\n{}",
        s.logs()
    );

    // The server's identity is in the manifest, as evidence.
    let summary = s
        .ingest
        .api()
        .get("/api/v1/summary")
        .await
        .expect("summary");
    let device = &summary["gateways"][0]["devices"][0];
    let identity = &device["identity"];
    assert_eq!(
        identity["application_uri"], "urn:guantong:test-server",
        "{device}"
    );
    assert_eq!(
        identity["product_name"], "Guantong OPC UA test server",
        "{device}"
    );
    assert_eq!(identity["software_version"], "1.2.3", "{device}");
    assert_eq!(
        identity["certificate_thumbprint"],
        server.thumbprint().expect("thumbprint"),
        "{device}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_with_read_at_the_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(ServerOptions::new(&dir.path().join("server-pki")))
        .await
        .expect("server");
    let devices = format!(
        r#"
[[devices]]
id = "oven"
protocol = "opcua"
url = "{}"
mode = "poll"
poll_interval = "200ms"
[[devices.tags]]
name = "temperature"
node = "ns={};s=Temperature"
[[devices.tags]]
name = "missing"
node = "ns={};s=NoSuchNode"
"#,
        server.url(),
        server.ns,
        server.ns
    );
    let s = Setup::start(dir, &devices).await.expect("setup");
    s.wait_point("oven", "temperature", |p| p["value"] == 20.5)
        .await;
    // Each read takes the value of that moment (a value read twice has the
    // same source timestamp, and ingest keeps it once).
    for v in [97.5, 98.5, 99.5] {
        server.set(vec![(server.node("Temperature"), Variant::Double(v))]);
        s.wait_point("oven", "temperature", |p| p["value"] == v)
            .await;
    }
    // A node the server does not have: Bad with the server's own code.
    let bad = s
        .wait_point("oven", "missing", |p| p["quality"] == "bad")
        .await;
    assert_eq!(
        bad["quality_code"], 0x8034_0000u32,
        "BadNodeIdUnknown: {bad}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secured_endpoints_reject_an_unknown_server_until_trusted_by_thumbprint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = ServerOptions::new(&dir.path().join("server-pki"));
    options.secure = true;
    let server = TestServer::start(options).await.expect("server");
    let thumb = server.thumbprint().expect("thumbprint");
    let devices = format!(
        r#"
[[devices]]
id = "signed"
protocol = "opcua"
url = "{url}"
security_policy = "basic256sha256"
security_mode = "sign"
username = "{USER}"
password = "{PASSWORD}"
publishing_interval = "100ms"
max_backoff = "500ms"
[[devices.tags]]
name = "counter"
node = "nsu={NAMESPACE};s=Counter"
type = "uint"

[[devices]]
id = "encrypted"
protocol = "opcua"
url = "{url}"
security_policy = "aes128_sha256_rsaoaep"
security_mode = "sign_and_encrypt"
publishing_interval = "100ms"
max_backoff = "500ms"
[[devices.tags]]
name = "counter"
node = "nsu={NAMESPACE};s=Counter"
type = "uint"
"#,
        url = server.url()
    );
    let s = Setup::start(dir, &devices).await.expect("setup");
    // Refused: the certificate lands in rejected/, its thumbprint in the log
    // and in `opcua status`; the tags are Bad meanwhile.
    let rejected = s.dir.path().join("opcua-pki/rejected");
    wait_for("a rejected certificate", WAIT, || async {
        Ok(std::fs::read_dir(&rejected)
            .ok()
            .and_then(|mut d| d.next())
            .map(|_| ()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    let bad = s
        .wait_point("signed", "counter", |p| p["quality"] == "bad")
        .await;
    assert!(bad["value"].is_null());
    wait_for("the thumbprint in the log", WAIT, || async {
        Ok(s.gateway.proc.logs().contains(&thumb).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    let (ok, status) = s.cli(&["opcua", "status"]);
    assert!(ok, "{status}");
    assert!(
        status.contains(&format!("rejected  {thumb}")),
        "status lists the rejected certificate:\n{status}"
    );
    assert!(
        s.points("signed", "counter")
            .await
            .iter()
            .all(|p| p["quality"] == "bad")
    );

    // One command trusts it; both sessions come up without a restart.
    let (ok, out) = s.cli(&["opcua", "trust", &thumb[..12]]);
    assert!(ok, "{out}");
    s.wait_point("signed", "counter", |p| p["quality"] == "good")
        .await;
    s.wait_point("encrypted", "counter", |p| p["quality"] == "good")
        .await;
    server.set(vec![(server.node("Counter"), Variant::UInt32(5))]);
    s.wait_point("encrypted", "counter", |p| p["value"] == 5)
        .await;
    let (_, status) = s.cli(&["opcua", "status"]);
    assert!(status.contains(&format!("trusted   {thumb}")), "{status}");
    let summary = s
        .ingest
        .api()
        .get("/api/v1/summary")
        .await
        .expect("summary");
    let security = summary["gateways"][0]["devices"][1]["identity"]["security"].clone();
    assert!(
        security
            .as_str()
            .is_some_and(|s| s.contains("SignAndEncrypt"))
            || security.is_null(),
        "{security}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_is_a_recorded_gap_then_resubscribes_by_namespace_uri() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server_pki = dir.path().join("server-pki");
    let server = TestServer::start(ServerOptions::new(&server_pki))
        .await
        .expect("server");
    let port = server.port;
    let devices = format!(
        r#"
[[devices]]
id = "press"
protocol = "opcua"
url = "{}"
security_policy = "none"
publishing_interval = "100ms"
keep_alive_interval = "500ms"
max_backoff = "500ms"
[[devices.tags]]
name = "counter"
node = "nsu={NAMESPACE};s=Counter"
type = "uint"
"#,
        server.url()
    );
    let s = Setup::start(dir, &devices).await.expect("setup");
    server.set(vec![(server.node("Counter"), Variant::UInt32(1))]);
    s.wait_point("press", "counter", |p| p["value"] == 1).await;
    server.stop().await;
    // The loss is recorded: a Bad point with the session-lost code.
    let gap = s
        .wait_point("press", "counter", |p| p["quality_code"] == 0x0005_0001)
        .await;
    assert_eq!(gap["quality"], "bad", "{gap}");

    // The server comes back on the same port with its namespace at another
    // index; the tag, configured by URI, follows it.
    let mut options = ServerOptions::new(&server_pki);
    options.port = port;
    options.shift_namespace = true;
    let server = TestServer::start(options).await.expect("server restarted");
    assert_eq!(server.ns, 3, "the test namespace moved");
    let after = tokio::time::Instant::now();
    loop {
        server.set(vec![(server.node("Counter"), Variant::UInt32(42))]);
        if s.points("press", "counter")
            .await
            .iter()
            .any(|p| p["value"] == 42)
        {
            break;
        }
        assert!(
            after.elapsed() < WAIT,
            "no value after the restart\n{}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let points = s.points("press", "counter").await;
    let gap_at = points
        .iter()
        .position(|p| p["quality_code"] == 0x0005_0001)
        .expect("gap");
    let back_at = points.iter().position(|p| p["value"] == 42).expect("value");
    assert!(
        gap_at < back_at,
        "the gap comes before the new values: {points:?}"
    );
    assert!(
        points[gap_at + 1..]
            .iter()
            .all(|p| p["value"] != 1 || p["quality"] != "good"),
        "no stale value after the gap: {points:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribes_ten_thousand_items_in_batches_within_server_limits() {
    const N: usize = 10_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = ServerOptions::new(&dir.path().join("server-pki"));
    options.items = N;
    options.max_items_per_subscription = 1000;
    let server = TestServer::start(options).await.expect("server");
    let mut devices = format!(
        r#"
[[devices]]
id = "big"
protocol = "opcua"
url = "{}"
security_policy = "none"
publishing_interval = "200ms"
"#,
        server.url()
    );
    for i in 0..N {
        devices.push_str(&format!(
            "[[devices.tags]]\nname = \"v{i}\"\nnode = \"ns={};s=v{i}\"\n",
            server.ns
        ));
    }
    let s = Setup::start(dir, &devices).await.expect("setup");
    wait_for("the subscription of every item", WAIT, || async {
        Ok(s.gateway
            .proc
            .logs()
            .contains("opc ua subscribed")
            .then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    let values: Vec<_> = (0..N)
        .map(|i| {
            (
                server.node(&format!("v{i}")),
                Variant::Double(i as f64 + 0.5),
            )
        })
        .collect();
    server.set(values);
    let api = s.ingest.api();
    let good = wait_for(
        "every item's new value",
        Duration::from_secs(60),
        || async {
            let summary = api.get("/api/v1/summary").await?;
            let tags = summary["gateways"][0]["devices"][0]["tags"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let n = tags
                .iter()
                .filter(|t| {
                    let name = t["name"].as_str().unwrap_or_default();
                    let i: f64 = name[1..].parse().unwrap_or(-1.0);
                    t["last_value"].as_f64() == Some(i + 0.5)
                })
                .count();
            Ok((n == N).then_some(n))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert_eq!(good, N);
    let logs = s.gateway.proc.logs();
    assert!(
        logs.contains("items=10000") && logs.contains("subscriptions=10"),
        "10 subscriptions of 1000 (the server's limit): {logs}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_lists_endpoints_browses_and_writes_a_snippet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = ServerOptions::new(&dir.path().join("server-pki"));
    options.secure = true;
    let server = TestServer::start(options).await.expect("server");
    let url = server.url();
    let pki = dir.path().join("probe-pki");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(binary("guantong-gateway").expect("binary"))
            .args(["probe", "opcua", "--url", &url, "--security-policy", "none"])
            .args([
                "--select",
                "Temperature",
                "--select",
                "Running",
                "--pki-dir",
            ])
            .arg(&pki)
            .output()
            .expect("probe runs")
    })
    .await
    .expect("join");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Basic256Sha256 SignAndEncrypt"), "{text}");
    assert!(
        text.contains("Aes128-Sha256-RsaOaep Sign") || text.contains("Aes128"),
        "{text}"
    );
    assert!(
        text.contains("Temperature  [nsu=urn:guantong:test;s=Temperature]  Double = 20.5"),
        "{text}"
    );
    let snippet = &text[text.find("[[devices]]").expect("snippet")..];
    assert!(
        snippet.contains("node = \"nsu=urn:guantong:test;s=Temperature\"\ntype = \"double\""),
        "{snippet}"
    );
    assert!(snippet.contains("type = \"bool\""), "{snippet}");
    assert!(
        !snippet.contains("Label"),
        "only the selected nodes: {snippet}"
    );
    // The snippet is a valid config once under a gateway section.
    let cfg = format!(
        "[gateway]\nid = \"g\"\n[uplink]\nendpoint = \"http://127.0.0.1:1\"\nplaintext = true\ntoken = \"t\"\n[buffer]\ndir = \"b\"\n{snippet}"
    );
    guantong_gateway::config::Config::parse(&cfg, Path::new("/tmp")).expect("snippet parses");
    server.stop().await;
}
