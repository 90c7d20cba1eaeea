//! The OPC UA collector end to end: an async-opcua server started in this
//! test process (`guantong_e2e::opcua`), the real gateway and ingest
//! binaries, and what ingest stored. Each test is a few seconds.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use async_opcua::types::{DateTime, Variant};
use guantong_e2e::opcua::{
    ASYNCUA_NAMESPACE, AsyncuaServer, GUID, NAMESPACE, PASSWORD, ServerOptions, TestServer, USER,
};
use guantong_e2e::procs::{
    GatewayProc, IngestProc, binary, gateway_toml, register_keyed_gateway, wait_for,
};
use guantong_e2e::proxy::{Mode as ProxyMode, Proxy};
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
        let token = IngestProc::register(&dir.path().join("ingest"), GW)?;
        Setup::start_with(dir, devices, token).await
    }

    /// `start` with the gateway's signing key registered, so its chain
    /// verifies at ingest.
    async fn start_keyed(dir: tempfile::TempDir, devices: &str) -> anyhow::Result<Setup> {
        let token = register_keyed_gateway(
            &dir.path().join("ingest"),
            GW,
            &dir.path().join("gateway.toml"),
            &dir.path().join("buffer"),
        )?;
        Setup::start_with(dir, devices, token).await
    }

    async fn start_with(
        dir: tempfile::TempDir,
        devices: &str,
        token: String,
    ) -> anyhow::Result<Setup> {
        let data = dir.path().join("ingest");
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

/// The test server with default options, its PKI under `dir`.
async fn plain_server(dir: &Path) -> TestServer {
    TestServer::start(ServerOptions::new(&dir.join("server-pki")))
        .await
        .expect("server")
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
    let server = plain_server(dir.path()).await;
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
    let mut got: Vec<u64> = s
        .points("press", "counter")
        .await
        .iter()
        .filter_map(|p| p["value"].as_u64())
        .collect();
    // A value held for a publishing interval is repeated (`repeat_unchanged`).
    got.dedup();
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
    let server = plain_server(dir.path()).await;
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
    // An unchanged value is one point per poll, at the Read's time (its
    // source timestamp does not advance): the tag is alive, not missing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = s.points("oven", "temperature").await;
    let times: std::collections::BTreeSet<i64> = held
        .iter()
        .filter(|p| p["value"] == 20.5)
        .filter_map(|p| p["time_ms"].as_i64())
        .collect();
    assert!(
        times.len() >= 5,
        "about one point per 200 ms poll in 1.5 s: {held:?}"
    );
    // Each read takes the value of that moment.
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
repeat_unchanged = false
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

/// A device with one tag, `counter`; `extra`: more device keys.
fn counter_device(id: &str, url: &str, publishing_interval: &str, extra: &str) -> String {
    format!(
        r#"
[[devices]]
id = "{id}"
protocol = "opcua"
url = "{url}"
publishing_interval = "{publishing_interval}"
max_backoff = "500ms"
{extra}
[[devices.tags]]
name = "counter"
node = "nsu={NAMESPACE};s=Counter"
type = "uint"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_the_source_and_the_server_timestamp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = plain_server(dir.path()).await;
    let devices = counter_device(
        "press",
        &server.url(),
        "100ms",
        "security_policy = \"none\"",
    );
    let s = Setup::start(dir, &devices).await.expect("setup");
    s.wait_point("press", "counter", |p| p["quality"] == "good")
        .await;
    // The machine stamped the value 5 s before the server saw it.
    const TICKS_PER_MS: i64 = 10_000;
    let now = DateTime::now().ticks() / TICKS_PER_MS * TICKS_PER_MS;
    let server_time = DateTime::from(now - 1000 * TICKS_PER_MS);
    let source_time = DateTime::from(now - 6000 * TICKS_PER_MS);
    let (source_ms, server_ms) = (
        source_time.as_chrono().timestamp_millis(),
        server_time.as_chrono().timestamp_millis(),
    );
    server.set_at(
        vec![(server.node("Counter"), Variant::UInt32(77))],
        source_time,
        server_time,
    );
    let p = s.wait_point("press", "counter", |p| p["value"] == 77).await;
    assert_eq!(
        p["time_ms"], source_ms,
        "the point's time is the source timestamp: {p}"
    );
    assert_eq!(
        p["server_time_ms"], server_ms,
        "the server timestamp is kept: {p}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_on_first_use_trusts_the_first_certificate_and_rejects_a_changed_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = ServerOptions::new(&dir.path().join("server-pki"));
    options.secure = true;
    let server = TestServer::start(options).await.expect("server");
    let (port, first) = (server.port, server.thumbprint().expect("thumbprint"));
    let devices = counter_device(
        "press",
        &server.url(),
        "100ms",
        "security_policy = \"basic256sha256\"\nsecurity_mode = \"sign_and_encrypt\"\ntrust_on_first_use = true",
    );
    let s = Setup::start(dir, &devices).await.expect("setup");
    // Trusted without an operator: recorded in the log and in `opcua status`.
    s.wait_point("press", "counter", |p| p["quality"] == "good")
        .await;
    let logs = s.gateway.proc.logs();
    assert!(
        logs.contains("trusted the server's certificate on first use") && logs.contains(&first),
        "{logs}"
    );
    let (ok, status) = s.cli(&["opcua", "status"]);
    assert!(ok, "{status}");
    assert!(status.contains(&format!("trusted   {first}")), "{status}");
    assert!(
        status.contains(&format!(
            "tofu      {first}  trusted on first use by device press"
        )),
        "{status}"
    );

    // Another server (a new certificate) at the same address: rejected like
    // any unknown certificate, its values never taken.
    server.stop().await;
    let mut options = ServerOptions::new(&s.dir.path().join("impostor-pki"));
    options.secure = true;
    options.port = port;
    let impostor = TestServer::start(options).await.expect("impostor");
    let second = impostor.thumbprint().expect("thumbprint");
    assert_ne!(first, second);
    impostor.set(vec![(impostor.node("Counter"), Variant::UInt32(666))]);
    wait_for("the changed certificate in rejected/", WAIT, || async {
        let (_, status) = s.cli(&["opcua", "status"]);
        Ok(status
            .contains(&format!("rejected  {second}"))
            .then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let points = s.points("press", "counter").await;
    assert!(
        points.iter().all(|p| p["value"] != 666),
        "no value from the impostor: {points:?}"
    );
    let last = points.last().expect("points");
    assert_eq!(
        last["quality"], "bad",
        "the tag is Bad meanwhile: {points:?}"
    );
    impostor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_user_identity_is_accepted_and_an_unknown_user_certificate_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    std::fs::create_dir_all(&users).expect("users dir");
    let (alice_cert, alice_key) = TestServer::user_certificate(&users, "alice").expect("alice");
    let (mallory_cert, mallory_key) =
        TestServer::user_certificate(&users, "mallory").expect("mallory");
    let mut options = ServerOptions::new(&dir.path().join("server-pki"));
    options.secure = true;
    options.user_certificates = vec![alice_cert.clone()];
    let server = TestServer::start(options).await.expect("server");
    let secured =
        "security_policy = \"basic256sha256\"\nsecurity_mode = \"sign\"\ntrust_on_first_use = true";
    let devices = counter_device(
        "alice",
        &server.url(),
        "100ms",
        &format!(
            "{secured}\nuser_certificate_file = \"{}\"\nuser_private_key_file = \"{}\"",
            alice_cert.display(),
            alice_key.display()
        ),
    ) + &counter_device(
        "mallory",
        &server.url(),
        "100ms",
        &format!(
            "{secured}\nuser_certificate_file = \"{}\"\nuser_private_key_file = \"{}\"",
            mallory_cert.display(),
            mallory_key.display()
        ),
    );
    let s = Setup::start(dir, &devices).await.expect("setup");
    server.set(vec![(server.node("Counter"), Variant::UInt32(3))]);
    s.wait_point("alice", "counter", |p| p["value"] == 3).await;
    let refused = s
        .wait_point("mallory", "counter", |p| p["quality"] == "bad")
        .await;
    assert_eq!(
        refused["quality_code"],
        0x8021_0000u32,
        "BadIdentityTokenRejected: {refused}\n{}",
        s.logs()
    );
    assert!(
        s.points("mallory", "counter")
            .await
            .iter()
            .all(|p| p["quality"] == "bad")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_network_cut_is_detected_by_the_watchdog_and_the_subscription_transferred() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = ServerOptions::new(&dir.path().join("server-pki"));
    options.secure = true;
    let server = TestServer::start(options).await.expect("server");
    let proxy = Proxy::start(format!("127.0.0.1:{}", server.port).parse().expect("addr"))
        .await
        .expect("proxy");
    // Signed, so that the server lets the anonymous session's subscription
    // move to the next session.
    let devices = counter_device(
        "press",
        &format!("opc.tcp://{}/", proxy.addr),
        "100ms",
        "security_policy = \"basic256sha256\"\nsecurity_mode = \"sign\"\ntrust_on_first_use = true\nkeep_alive_interval = \"500ms\"\nkeep_alive_failures = 2\nrequest_timeout = \"1s\"",
    ) + &format!(
        "[[devices.tags]]\nname = \"temperature\"\nnode = \"nsu={NAMESPACE};s=Temperature\"\n"
    );
    let s = Setup::start(dir, &devices).await.expect("setup");
    server.set(vec![(server.node("Counter"), Variant::UInt32(1))]);
    s.wait_point("press", "counter", |p| p["value"] == 1).await;
    s.wait_point("press", "temperature", |p| p["value"] == 20.5)
        .await;
    let through_proxy = proxy.bytes_up.load(std::sync::atomic::Ordering::Relaxed);
    assert!(through_proxy > 0, "the session goes through the proxy");

    // Packets vanish, no FIN, no RST: only the watchdog can tell.
    proxy.set(ProxyMode::Blackhole);
    let cut_ms = DateTime::now().as_chrono().timestamp_millis();
    for v in [2u32, 3] {
        server.set(vec![(server.node("Counter"), Variant::UInt32(v))]);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let gap = s
        .wait_point("press", "counter", |p| p["quality_code"] == 0x0005_0001)
        .await;
    assert_eq!(gap["quality"], "bad", "{gap}");
    let detected_after = gap["time_ms"].as_i64().expect("time") - cut_ms;
    assert!(
        (0..=8000).contains(&detected_after),
        "the dead link is seen within the watchdog's bound (3 s here), not {detected_after} ms\n{}",
        s.logs()
    );

    // The link returns: the subscription moves to the new session, and the
    // values changed during the cut arrive, each of them.
    proxy.set(ProxyMode::Pass);
    s.wait_point("press", "counter", |p| p["value"] == 3).await;
    server.set(vec![(server.node("Counter"), Variant::UInt32(4))]);
    s.wait_point("press", "counter", |p| p["value"] == 4).await;
    let points = s.points("press", "counter").await;
    let values: Vec<u64> = points.iter().filter_map(|p| p["value"].as_u64()).collect();
    assert!(
        values.contains(&2) && values.contains(&3),
        "no value of the cut lost: {points:?}\n{}",
        s.logs()
    );
    assert!(
        s.gateway
            .proc
            .logs()
            .contains("opc ua subscriptions transferred to the new session"),
        "{}",
        s.logs()
    );
    let gap_at = points
        .iter()
        .position(|p| p["quality_code"] == 0x0005_0001)
        .expect("gap");
    assert!(
        points[gap_at + 1..].iter().all(|p| p["value"] != 1),
        "no stale value after the gap: {points:?}"
    );
    // A node that never changes gets its current value again after the
    // transfer, stamped after the gap: its last point is Good, not the
    // gap's Bad (its source timestamp is older than the gap).
    let last = wait_for("temperature Good after the gap", WAIT, || async {
        let points = s.points("press", "temperature").await;
        let gap = points.iter().any(|p| p["quality_code"] == 0x0005_0001);
        let last = points.iter().max_by_key(|p| p["time_ms"].as_i64()).cloned();
        Ok(last.filter(|l| gap && l["quality"] == "good"))
    })
    .await
    .unwrap_or_else(|e| {
        panic!("{e}\n{}", s.logs());
    });
    assert_eq!(last["value"], 20.5, "{last}");
    let summary = s
        .ingest
        .api()
        .tag(GW, "press", "temperature")
        .await
        .expect("summary")
        .expect("tag");
    assert_eq!(summary["last_quality"], "good", "{summary}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_queue_overflow_keeps_its_status_bit_and_is_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = plain_server(dir.path()).await;
    let devices = counter_device("press", &server.url(), "1s", "security_policy = \"none\"")
        + "queue_size = 2\n";
    let s = Setup::start(dir, &devices).await.expect("setup");
    s.wait_point("press", "counter", |p| p["value"] == 0).await;
    // Ten changes within one publishing interval into a queue of two: the
    // server drops values and says so in the status of what it keeps.
    for i in 1..=10u32 {
        server.set(vec![(server.node("Counter"), Variant::UInt32(i))]);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.wait_point("press", "counter", |p| p["value"] == 10).await;
    let points = s.points("press", "counter").await;
    let flagged: Vec<&Value> = points
        .iter()
        .filter(|p| p["quality_code"].as_u64().is_some_and(|c| c & 0x80 != 0))
        .collect();
    assert!(
        !flagged.is_empty(),
        "a point carries the overflow bit: {points:?}"
    );
    for p in &flagged {
        assert_eq!(
            p["quality"], "good",
            "overflow is info on a Good value: {p}"
        );
        assert!(p["value"].is_u64(), "{p}");
    }
    assert!(points.len() < 11, "the server did drop values: {points:?}");
    wait_for("the overflow count in the log", WAIT, || async {
        Ok(s.gateway
            .proc
            .logs()
            .contains("server queues overflowed")
            .then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_dropped_while_the_session_lives_is_a_stall_then_subscribed_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = ServerOptions::new(&dir.path().join("server-pki"));
    options.secure = true;
    let server = TestServer::start(options).await.expect("server");
    // Signed: the server lets only a signed anonymous session take the
    // gateway's subscription over.
    let devices = counter_device(
        "press",
        &server.url(),
        "100ms",
        "security_policy = \"basic256sha256\"\nsecurity_mode = \"sign\"\ntrust_on_first_use = true\nkeep_alive_interval = \"500ms\"\nrequest_timeout = \"1s\"",
    );
    let s = Setup::start(dir, &devices).await.expect("setup");
    server.set(vec![(server.node("Counter"), Variant::UInt32(1))]);
    s.wait_point("press", "counter", |p| p["value"] == 1).await;

    // Another session takes the subscription: the gateway's session keeps
    // answering its keep-alive Reads, but no publish response comes.
    let (_thief, taken) = server
        .steal_subscriptions(
            &s.dir.path().join("thief-pki"),
            &format!("urn:guantong:gateway:{GW}"),
        )
        .await
        .expect("steal");
    assert_eq!(taken, 1, "the gateway's one subscription was taken");
    let stolen_ms = DateTime::now().as_chrono().timestamp_millis();
    let stall = s
        .wait_point("press", "counter", |p| p["quality_code"] == 0x0002_0007)
        .await;
    assert_eq!(stall["quality"], "bad", "{stall}");
    let detected_after = stall["time_ms"].as_i64().expect("time") - stolen_ms;
    assert!(
        (2000..=10_000).contains(&detected_after),
        "the stall is seen after 3 keep-alive periods (3 s here), not {detected_after} ms\n{}",
        s.logs()
    );

    // A new subscription delivers the current value and every change.
    server.set(vec![(server.node("Counter"), Variant::UInt32(2))]);
    s.wait_point("press", "counter", |p| p["value"] == 2).await;
    server.set(vec![(server.node("Counter"), Variant::UInt32(3))]);
    s.wait_point("press", "counter", |p| p["value"] == 3).await;
    let logs = s.gateway.proc.logs();
    assert_eq!(
        logs.matches("opc ua subscription stalled").count(),
        1,
        "the stall is logged once\n{logs}"
    );
    let points = s.points("press", "counter").await;
    assert_eq!(
        points
            .iter()
            .filter(|p| p["quality_code"] == 0x0002_0007)
            .count(),
        1,
        "one Bad point per tag per stall: {points:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refusing_the_gateway_certificate_is_told_apart_from_an_untrusted_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = ServerOptions::new(&dir.path().join("server-pki"));
    options.secure = true;
    options.refuse_unknown_clients = true;
    let server = TestServer::start(options).await.expect("server");
    // The gateway trusts the server (first use); the server does not know
    // the gateway.
    let devices = counter_device(
        "press",
        &server.url(),
        "100ms",
        "security_policy = \"basic256sha256\"\nsecurity_mode = \"sign\"\ntrust_on_first_use = true",
    );
    let s = Setup::start(dir, &devices).await.expect("setup");
    wait_for("the refusal explained", WAIT, || async {
        Ok(s.gateway
            .proc
            .logs()
            .contains("the server refused the gateway's certificate")
            .then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    let logs = s.gateway.proc.logs();
    assert!(
        logs.contains("opcua-pki/own/cert.der"),
        "the file to copy is named\n{logs}"
    );
    assert!(
        !logs.contains("opcua trust THUMBPRINT"),
        "the gateway already trusts the server: no trust advice\n{logs}"
    );

    server.stop().await;
}

/// A second server stack (python asyncua), Basic256Sha256 SignAndEncrypt
/// with user and password, reached through a proxy: static nodes of several
/// types arrive exactly, changing ones value by value, and a cut recovers
/// with static tags Good again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_stack_delivers_every_type_and_change_and_recovers_from_a_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = AsyncuaServer::start(dir.path(), true, Some(("installer", "pa55-word")), 200)
        .expect("asyncua server");
    let proxy = Proxy::start(format!("127.0.0.1:{}", server.port).parse().expect("addr"))
        .await
        .expect("proxy");
    let tags = [
        ("bool", "Static.Bool", "bool"),
        ("int16", "Static.Int16", "int"),
        ("uint32", "Static.UInt32", "uint"),
        ("int64", "Static.Int64", "int"),
        ("float", "Static.Float", "double"),
        ("double", "Static.Double", "double"),
        ("string", "Static.String", "string"),
        ("uint64max", "Static.UInt64Max", "double"),
        ("counter", "Sim.Counter", "uint"),
        ("half", "Sim.Half", "double"),
        ("text", "Sim.Text", "string"),
    ];
    let mut devices = format!(
        r#"
[[devices]]
id = "line"
protocol = "opcua"
url = "opc.tcp://{}/"
publishing_interval = "100ms"
security_policy = "basic256sha256"
security_mode = "sign_and_encrypt"
trust_on_first_use = true
username = "installer"
password = "pa55-word"
keep_alive_interval = "500ms"
request_timeout = "2s"
max_backoff = "1s"
"#,
        proxy.addr
    );
    for (name, node, kind) in tags {
        devices += &format!(
            "[[devices.tags]]\nname = \"{name}\"\nnode = \"nsu={ASYNCUA_NAMESPACE};s={node}\"\ntype = \"{kind}\"\n"
        );
    }
    let s = Setup::start(dir, &devices).await.expect("setup");
    let expected: [(&str, Value); 7] = [
        ("bool", serde_json::json!(true)),
        ("int16", serde_json::json!(-1234)),
        ("uint32", serde_json::json!(4_000_000_000u64)),
        ("int64", serde_json::json!(-9_007_199_254_740_993i64)),
        ("float", serde_json::json!(0.25)),
        ("double", serde_json::json!(std::f64::consts::PI)),
        ("string", serde_json::json!("Linie 7")),
    ];
    for (tag, value) in &expected {
        let p = s.wait_point("line", tag, |p| p["quality"] == "good").await;
        assert_eq!(&p["value"], value, "{tag}: {p}");
    }
    // UInt64 max does not fit a double exactly: Bad, type mismatch.
    let lossy = s
        .wait_point("line", "uint64max", |p| p["quality"] != Value::Null)
        .await;
    assert_eq!(lossy["quality"], "bad", "{lossy}");
    assert_eq!(lossy["quality_code"], 0x0005_0002, "{lossy}");

    // Every step of the changing nodes, value by value.
    let counter = consecutive_steps(&s, 0, 15).await;
    let last = *counter.last().expect("values");
    let half: Vec<f64> = s
        .points("line", "half")
        .await
        .iter()
        .filter_map(|p| p["value"].as_f64())
        .collect();
    assert!(
        (counter[0] + 1..=last).all(|n| half.contains(&(n as f64 / 2.0))),
        "half = n / 2 for every n: {half:?}"
    );
    let text: Vec<String> = s
        .points("line", "text")
        .await
        .iter()
        .filter_map(|p| p["value"].as_str().map(String::from))
        .collect();
    assert!(
        (counter[0] + 1..=last).all(|n| text.contains(&format!("n={n}"))),
        "text n=<n> for every n: {text:?}"
    );

    // A 5 s cut with RST: a recorded gap, then data again, every step from
    // the reconnect on, and the static tags Good again.
    proxy.set(ProxyMode::Reset);
    let gap = s
        .wait_point("line", "counter", |p| p["quality_code"] == 0x0005_0001)
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.set(ProxyMode::Pass);
    let gap_ms = gap["time_ms"].as_i64().expect("time");
    consecutive_steps(&s, gap_ms + 5000, 10).await;
    for (tag, value) in &expected {
        let points = s.points("line", tag).await;
        let last = points
            .iter()
            .max_by_key(|p| p["time_ms"].as_i64())
            .expect("points");
        assert_eq!(
            (&last["quality"], &last["value"]),
            (&serde_json::json!("good"), value),
            "{tag} Good after the cut: {points:?}\n{}",
            s.logs()
        );
    }
    drop(server);
}

/// `line/counter` from its first value stamped after `after_ms` until `more`
/// steps later: asserts that every step in between arrived, in order.
async fn consecutive_steps(s: &Setup, after_ms: i64, more: u64) -> Vec<u64> {
    let since = |p: &Value| p["time_ms"].as_i64() > Some(after_ms);
    let first = s
        .wait_point("line", "counter", |p| since(p) && p["value"].is_u64())
        .await["value"]
        .as_u64()
        .expect("n");
    s.wait_point("line", "counter", |p| {
        p["value"].as_u64().is_some_and(|n| n >= first + more)
    })
    .await;
    let mut steps: Vec<u64> = s
        .points("line", "counter")
        .await
        .iter()
        .filter(|p| since(p))
        .filter_map(|p| p["value"].as_u64())
        .filter(|n| *n >= first)
        .collect();
    // A value held for a publishing interval is repeated (`repeat_unchanged`).
    steps.dedup();
    let last = *steps.last().expect("values");
    assert_eq!(
        steps,
        (first..=last).collect::<Vec<_>>(),
        "every change, in order\n{}",
        s.logs()
    );
    steps
}

/// `--select` takes the `ns=` form like `nsu=`, names a node the server
/// lacks (and fails), and with the gateway's PKI presents the gateway's
/// ApplicationUri, which a secured server checks against its certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_selects_by_index_names_unknown_nodes_and_presents_the_gateway_uri() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = ServerOptions::new(&dir.path().join("server-pki"));
    options.secure = true;
    let server = TestServer::start(options).await.expect("server");
    let pki = dir.path().join("gateway-pki");
    guantong_gateway::opcua::pki::ensure_own_certificate(&pki, "urn:guantong:gateway:site-7")
        .expect("gateway certificate");
    let probe = |selects: Vec<String>| {
        let (url, pki) = (server.url(), pki.clone());
        tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(binary("guantong-gateway").expect("binary"));
            cmd.args(["probe", "opcua", "--url", &url])
                .args([
                    "--security-policy",
                    "basic256sha256",
                    "--security-mode",
                    "sign",
                ])
                .args(["--trust-on-first-use", "--depth", "1", "--pki-dir"])
                .arg(&pki);
            for s in selects {
                cmd.args(["--select", &s]);
            }
            let out = cmd.output().expect("probe runs");
            (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            )
        })
    };
    let ns = server.ns;
    let (ok, text) = probe(vec![format!("ns={ns};s=Temperature")])
        .await
        .expect("join");
    assert!(ok, "{text}");
    let snippet = &text[text.find("[[devices]]").expect("snippet")..];
    assert!(
        snippet.contains("node = \"nsu=urn:guantong:test;s=Temperature\"\ntype = \"double\""),
        "the ns= form selects like nsu= (below the browse depth too): {snippet}"
    );
    let (ok, text) = probe(vec![format!("ns={ns};s=NoSuchNode")])
        .await
        .expect("join");
    assert!(!ok, "an unknown node fails the probe: {text}");
    assert!(
        text.contains("no such variable") && text.contains("NoSuchNode"),
        "{text}"
    );
    server.stop().await;

    // A server that checks the ApplicationUri against the certificate
    // (python asyncua, strict): the probe with the gateway's PKI passes.
    let strict = AsyncuaServer::start_checking_client_uri(dir.path()).expect("asyncua server");
    let url = strict.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(binary("guantong-gateway").expect("binary"))
            .args(["probe", "opcua", "--url", &url])
            .args([
                "--security-policy",
                "basic256sha256",
                "--security-mode",
                "sign",
            ])
            .args(["--trust-on-first-use", "--depth", "1", "--pki-dir"])
            .arg(&pki)
            .args([
                "--select",
                &format!("nsu={ASYNCUA_NAMESPACE};s=Static.Double"),
            ])
            // Another device: trust on first use is per device id.
            .args(["--device-id", "strict"])
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
    assert!(
        out.status.success() && text.contains("s=Static.Double"),
        "a server checking the ApplicationUri accepts the probe: {text}\n{}",
        strict.log()
    );
}

fn epoch_ms() -> i64 {
    DateTime::now().as_chrono().timestamp_millis()
}

/// A node that never changes is alive at ingest, not missing: while its
/// subscription lives its value is repeated once per publishing interval,
/// so its completeness is near 100 %. After a session loss its last value
/// at ingest is Good again, although the value the new session delivers
/// carries a source timestamp older than the gap's Bad point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_node_counts_as_alive_and_is_good_again_after_a_session_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = plain_server(dir.path()).await;
    let proxy = Proxy::start(format!("127.0.0.1:{}", server.port).parse().expect("addr"))
        .await
        .expect("proxy");
    let devices = format!(
        r#"
[[devices]]
id = "oven"
protocol = "opcua"
url = "opc.tcp://{}/"
security_policy = "none"
publishing_interval = "200ms"
keep_alive_interval = "500ms"
request_timeout = "1s"
max_backoff = "500ms"
[[devices.tags]]
name = "temperature"
node = "nsu={NAMESPACE};s=Temperature"
"#,
        proxy.addr
    );
    let s = Setup::start(dir, &devices).await.expect("setup");
    s.wait_point("oven", "temperature", |p| p["value"] == 20.5)
        .await;
    let from = epoch_ms();
    // The window's points are at ingest a commit and an upload later.
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let summary = s
        .ingest
        .api()
        .get(&format!("/api/v1/summary?from={from}&to={}", from + 4000))
        .await
        .expect("summary");
    let window = &summary["gateways"][0]["devices"][0]["tags"][0]["window"];
    assert_eq!(window["expected"], 20, "{window}");
    let completeness = window["completeness"].as_f64().unwrap_or(0.0);
    let times: Vec<i64> = s
        .points("oven", "temperature")
        .await
        .iter()
        .filter_map(|p| p["time_ms"].as_i64())
        .filter(|t| *t >= from)
        .map(|t| t - from)
        .collect();
    assert!(
        completeness >= 0.9,
        "a static node is alive, one point per 200 ms: {window}, at {times:?}\n{}",
        s.logs()
    );

    // A cut (RST): the tag is Bad at the loss, then Good again, at ingest's
    // "last value" too.
    proxy.set(ProxyMode::Reset);
    let gap = s
        .wait_point("oven", "temperature", |p| p["quality_code"] == 0x0005_0001)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set(ProxyMode::Pass);
    let gap_ms = gap["time_ms"].as_i64().expect("time");
    s.wait_point("oven", "temperature", |p| {
        p["quality"] == "good" && p["time_ms"].as_i64() > Some(gap_ms)
    })
    .await;
    let tag = s
        .ingest
        .api()
        .tag(GW, "oven", "temperature")
        .await
        .expect("summary")
        .expect("tag");
    assert_eq!(
        (&tag["last_quality"], &tag["last_value"]),
        (&serde_json::json!("good"), &serde_json::json!(20.5)),
        "{tag}\n{}",
        s.logs()
    );
    server.stop().await;
}

/// `best` takes the endpoint the server rates most secure: against python
/// asyncua, which offers Basic256Sha256, Aes128_Sha256_RsaOaep and
/// Aes256_Sha256_RsaPss, that is Aes256_Sha256_RsaPss SignAndEncrypt; the
/// policy can be chosen by name too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_takes_the_servers_highest_security_level_aes256_sha256_rsapss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = AsyncuaServer::start(dir.path(), true, None, 200).expect("asyncua server");
    let mut devices = String::new();
    for (id, extra) in [
        ("best", ""),
        (
            "pss_sign",
            "security_policy = \"aes256_sha256_rsapss\"\nsecurity_mode = \"sign\"\n",
        ),
    ] {
        devices += &format!(
            r#"
[[devices]]
id = "{id}"
protocol = "opcua"
url = "{url}"
trust_on_first_use = true
publishing_interval = "200ms"
request_timeout = "5s"
max_backoff = "1s"
{extra}[[devices.tags]]
name = "counter"
node = "nsu={ASYNCUA_NAMESPACE};s=Sim.Counter"
type = "uint"
"#,
            url = server.url()
        );
    }
    let s = Setup::start(dir, &devices).await.expect("setup");
    for id in ["best", "pss_sign"] {
        let first = s.wait_point(id, "counter", |p| p["value"].is_u64()).await["value"]
            .as_u64()
            .expect("n");
        s.wait_point(id, "counter", |p| {
            p["value"].as_u64().is_some_and(|n| n > first)
        })
        .await;
    }
    let logs = s.gateway.proc.logs();
    let opened: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("opc ua session open"))
        .collect();
    assert!(
        opened
            .iter()
            .any(|l| l.contains("device=best") && l.contains("Aes256-Sha256-RsaPss SignAndEncrypt")),
        "best = the level-80 endpoint: {opened:?}"
    );
    assert!(
        opened
            .iter()
            .any(|l| l.contains("device=pss_sign") && l.contains("Aes256-Sha256-RsaPss Sign ")),
        "{opened:?}"
    );
    drop(server);
}

/// A trusted server whose certificate names another host (`DNS:vm`, reached
/// as 127.0.0.1): the installer trusts it with `opcua trust`, then the
/// device with `accept_host_name_mismatch` connects at its next attempt (no
/// restart) with a warning, and the device without it stays Bad with the
/// host name code and advice naming the option.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_certificate_naming_another_host_connects_where_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = AsyncuaServer::start_naming(dir.path(), "vm").expect("asyncua server");
    let thumb =
        async_opcua::crypto::CertificateStore::read_cert(&AsyncuaServer::certificate(dir.path()))
            .expect("server certificate")
            .thumbprint()
            .as_hex_string();
    let mut devices = String::new();
    for (id, extra) in [
        ("lenient", "accept_host_name_mismatch = true\n"),
        ("strict", ""),
    ] {
        devices += &format!(
            r#"
[[devices]]
id = "{id}"
protocol = "opcua"
url = "{url}"
security_policy = "basic256sha256"
security_mode = "sign"
publishing_interval = "200ms"
request_timeout = "5s"
max_backoff = "500ms"
{extra}[[devices.tags]]
name = "double"
node = "nsu={ASYNCUA_NAMESPACE};s=Static.Double"
"#,
            url = server.url()
        );
    }
    let s = Setup::start(dir, &devices).await.expect("setup");
    // Untrusted at first: Bad, and one line saying what to run.
    let untrusted = s
        .wait_point("lenient", "double", |p| p["quality"] == "bad")
        .await;
    // BadCertificateUntrusted, or BadSecurityChecksFailed once the
    // certificate is in rejected/ (the start-up identification put it there).
    assert!(
        [0x801A_0000u32, 0x8013_0000]
            .contains(&(untrusted["quality_code"].as_u64().unwrap_or_default() as u32)),
        "{untrusted}"
    );
    wait_for("the trust advice", WAIT, || async {
        Ok(s.gateway
            .proc
            .logs()
            .contains(&format!("opcua trust {thumb}"))
            .then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));

    let (ok, out) = s.cli(&["opcua", "trust", &thumb[..12]]);
    assert!(ok, "{out}");
    let good = s
        .wait_point("lenient", "double", |p| p["quality"] == "good")
        .await;
    assert_eq!(good["value"], std::f64::consts::PI, "{good}");
    // The reason changed: ingest shows the host name code now, not the
    // earlier one.
    let refused = s
        .wait_point("strict", "double", |p| p["quality_code"] == 0x8016_0000u32)
        .await;
    assert_eq!(refused["quality"], "bad", "{refused}");
    let logs = s.gateway.proc.logs();
    assert!(
        logs.contains("accepting a server certificate that does not name the host"),
        "the accepted mismatch is warned about\n{logs}"
    );
    assert!(
        logs.contains("names vm")
            && logs.contains("`accept_host_name_mismatch = true` for device strict"),
        "the refusal names the certificate's host and the option\n{logs}"
    );
    assert!(
        !logs.contains("Transport disconnected") && !logs.contains(" ERROR "),
        "no library noise\n{logs}"
    );
    drop(server);
}

/// A server untrusted at start has no identity in the manifest; once
/// trusted, the session that connects reads it and the running gateway
/// publishes it in a new manifest (no restart), which the chain announces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_trusted_while_running_is_identified_at_its_first_connect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = ServerOptions::new(&dir.path().join("server-pki"));
    options.secure = true;
    let server = TestServer::start(options).await.expect("server");
    let thumb = server.thumbprint().expect("thumbprint");
    let devices = format!(
        r#"
[[devices]]
id = "late"
protocol = "opcua"
url = "{url}"
security_policy = "basic256sha256"
security_mode = "sign"
publishing_interval = "100ms"
max_backoff = "500ms"
[[devices.tags]]
name = "counter"
node = "nsu={NAMESPACE};s=Counter"
type = "uint"
"#,
        url = server.url()
    );
    let mut s = Setup::start_keyed(dir, &devices).await.expect("setup");
    let identity = |summary: &Value| summary["gateways"][0]["devices"][0]["identity"].clone();
    s.wait_point("late", "counter", |p| p["quality"] == "bad")
        .await;
    let before = s
        .ingest
        .api()
        .get("/api/v1/summary")
        .await
        .expect("summary");
    assert!(
        identity(&before)["application_uri"].is_null(),
        "untrusted: not identified\n{before}"
    );
    let pid = s.gateway.proc.pid();

    let (ok, out) = s.cli(&["opcua", "trust", &thumb[..12]]);
    assert!(ok, "{out}");
    s.wait_point("late", "counter", |p| p["quality"] == "good")
        .await;
    let found = wait_for("the identity at ingest", WAIT, || async {
        let summary = s.ingest.api().get("/api/v1/summary").await?;
        Ok((!identity(&summary)["application_uri"].is_null()).then(|| identity(&summary)))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert_eq!(
        found["application_uri"], "urn:guantong:test-server",
        "{found}"
    );
    assert_eq!(
        found["product_name"], "Guantong OPC UA test server",
        "{found}"
    );
    assert_eq!(found["software_version"], "1.2.3", "{found}");
    assert_eq!(found["certificate_thumbprint"], thumb, "{found}");
    assert!(
        found["security"]
            .as_str()
            .is_some_and(|t| t.contains("Basic256Sha256")),
        "{found}"
    );
    // The same process, data flowing on; one line says what happened.
    assert_eq!(s.gateway.proc.pid(), pid);
    assert!(s.gateway.proc.is_running());
    server.set(vec![(server.node("Counter"), Variant::UInt32(7))]);
    s.wait_point("late", "counter", |p| p["value"] == 7).await;
    let logs = s.gateway.proc.logs();
    assert_eq!(
        logs.matches("device identified at its first connect")
            .count(),
        1,
        "{logs}"
    );
    // The device was not restarted to publish it: one session all along.
    assert_eq!(logs.matches("opc ua session open").count(), 1, "{logs}");

    // The new manifest is announced in the chain: it verifies.
    s.gateway.proc.terminate(Duration::from_secs(10));
    s.ingest.proc.terminate(Duration::from_secs(10));
    let r = guantong_e2e::evidence::verify_chain(&s.ingest.data).expect("verify-chain runs");
    assert!(r.ok && !r.text.contains("BREAK"), "{}", r.text);
    server.stop().await;
}
