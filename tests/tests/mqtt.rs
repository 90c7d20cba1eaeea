//! The MQTT collector end to end, with real peers only: a real Mosquitto
//! (the shared one on 127.0.0.1:1883 with a unique topic prefix per test, or
//! a private one that the test restarts), a real rumqttc publisher, and the
//! real gateway and ingest binaries. What is checked is what ingest stored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use guantong_e2e::mqtt::{
    OwnBroker, Publisher, TestPki, forget_session, free_port, shared_broker, unique_prefix,
};
use guantong_e2e::procs::{GatewayProc, IngestProc, gateway_toml, wait_for};
use guantong_gateway::mqtt::sparkplug::{Metric, MetricValue, Payload};
use prost::Message;
use rumqttc::QoS;
use serde_json::Value;

const GW: &str = "gw-mqtt";

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

struct Setup {
    dir: tempfile::TempDir,
    ingest: IngestProc,
    gateway: GatewayProc,
}

impl Setup {
    /// Ingest and a gateway with `devices` (TOML `[[devices]]` text).
    async fn start(devices: impl Fn(&Path) -> String) -> anyhow::Result<Setup> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("ingest");
        let token = IngestProc::register(&data, GW)?;
        let ingest = IngestProc::start(&data, any_port(), any_port()).await?;
        let config = dir.path().join("gateway.toml");
        let text = gateway_toml(GW, ingest.grpc, &token, &dir.path().join("buffer"))
            + &devices(dir.path());
        std::fs::write(&config, text)?;
        let gateway = GatewayProc::start(&config)?;
        Ok(Setup {
            dir,
            ingest,
            gateway,
        })
    }

    /// One MQTT device `id` on the shared broker, its mapping `body(prefix)`
    /// under a topic prefix unique to `test`; also the port and the prefix.
    async fn on_shared_broker(
        test: &str,
        id: &str,
        body: impl FnOnce(&str) -> String,
    ) -> anyhow::Result<(Setup, u16, String)> {
        let port = shared_broker()?;
        let prefix = unique_prefix(test);
        let device = mqtt_device(id, port, &body(&prefix));
        let s = Setup::start(move |_| device.clone()).await?;
        Ok((s, port, prefix))
    }

    fn logs(&self) -> String {
        format!("{}{}", self.gateway.proc.logs(), self.ingest.proc.logs())
    }

    async fn points(&self, device: &str, tag: &str) -> anyhow::Result<Vec<Value>> {
        self.ingest.api().points(GW, device, tag).await
    }

    /// Waits (20 s at most) for a point of `device/tag` for which `check` holds.
    async fn wait_point(
        &self,
        device: &str,
        tag: &str,
        check: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        wait_for(
            &format!("{device}/{tag}"),
            Duration::from_secs(20),
            || async {
                Ok(self
                    .points(device, tag)
                    .await?
                    .into_iter()
                    .find(|p| check(p)))
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.logs()))
    }

    /// Publishes `warm_payload` on `topic` until a point of `tag` reaches
    /// ingest: the gateway has then subscribed and the path works.
    async fn warm_up(
        &self,
        publisher: &Publisher,
        topic: &str,
        warm_payload: &[u8],
        device: &str,
        tag: &str,
    ) -> anyhow::Result<()> {
        for _ in 0..150 {
            publisher
                .publish(topic, QoS::AtLeastOnce, warm_payload)
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            // 404 until ingest has the gateway's manifest.
            if !self
                .points(device, tag)
                .await
                .unwrap_or_default()
                .is_empty()
            {
                return Ok(());
            }
        }
        anyhow::bail!("nothing reached ingest in 30 s\n{}", self.logs())
    }
}

fn mqtt_device(id: &str, port: u16, body: &str) -> String {
    format!(
        "\n[[devices]]\nid = \"{id}\"\nprotocol = \"mqtt\"\nbroker = \"mqtt://127.0.0.1:{port}\"\nmax_backoff = \"1s\"\n{body}\n"
    )
}

/// Good values of a counter tag, and how often each arrived.
fn counts(points: &[Value]) -> BTreeMap<u64, u32> {
    let mut seen = BTreeMap::new();
    for p in points.iter().filter(|p| p["quality"] == "good") {
        if let Some(v) = p["value"].as_u64() {
            *seen.entry(v).or_insert(0u32) += 1;
        }
    }
    seen
}

/// Waits until every value 1..=last of `tag` is stored; returns the
/// duplicates (at-least-once may store a message twice across a kill).
async fn wait_all(s: &Setup, device: &str, tag: &str, last: u64) -> anyhow::Result<u64> {
    let result = wait_for(
        "every counter value at ingest",
        Duration::from_secs(60),
        || async {
            let seen = counts(&s.points(device, tag).await?);
            Ok((1..=last).all(|v| seen.contains_key(&v)).then_some(seen))
        },
    )
    .await;
    match result {
        Ok(seen) => Ok(seen.values().map(|n| u64::from(*n) - 1).sum()),
        Err(e) => {
            let seen = counts(&s.points(device, tag).await.unwrap_or_default());
            let missing: Vec<u64> = (1..=last).filter(|v| !seen.contains_key(v)).collect();
            panic!(
                "{e}: {} of {last} missing, first {:?}\n{}",
                missing.len(),
                &missing[..missing.len().min(20)],
                s.logs()
            );
        }
    }
}

#[tokio::test]
async fn json_tags_by_pointer_with_payload_time_and_device_level() -> anyhow::Result<()> {
    let (s, port, prefix) = Setup::on_shared_broker("json", "press-7", |p| {
        format!(
            "topic = \"{p}/+/data\"\ndevice_level = 2\ntimestamp = \"/ts\"\n\
                 [[devices.tags]]\nname = \"temp\"\npointer = \"/sensors/0/t\"\nunit = \"°C\"\n\
                 [[devices.tags]]\nname = \"count\"\npointer = \"/n\"\ntype = \"uint\"\n\
                 [[devices.tags]]\nname = \"running\"\npointer = \"/run\"\ntype = \"bool\"\n"
        )
    })
    .await?;
    let publisher = Publisher::connect(port, &format!("{prefix}-pub"), false).await?;
    let topic = format!("{prefix}/press-7/data");
    s.warm_up(
        &publisher,
        &topic,
        br#"{"ts": "2025-11-25T16:00:00+08:00", "run": true}"#,
        "press-7",
        "running",
    )
    .await?;
    let base = 1_764_057_600_000i64;
    for n in 1..=50u64 {
        let payload = format!(
            r#"{{"ts": {}, "n": {n}, "sensors": [{{"t": {}.5}}], "run": false}}"#,
            base + n as i64 * 1000,
            20 + n
        );
        publisher.publish(&topic, QoS::AtLeastOnce, payload).await;
        // Another press on the same filter: not this device's.
        publisher
            .publish(
                &format!("{prefix}/press-8/data"),
                QoS::AtLeastOnce,
                format!(r#"{{"ts": 1, "n": {}}}"#, 1000 + n),
            )
            .await;
    }
    let dups = wait_all(&s, "press-7", "count", 50).await?;
    assert_eq!(dups, 0, "no restart, so nothing is delivered twice");
    let counts = s.points("press-7", "count").await?;
    assert_eq!(
        counts.len(),
        50,
        "press-8's values must not arrive: {counts:?}"
    );
    for p in &counts {
        let n = p["value"].as_i64().expect("uint");
        assert_eq!(
            p["time_ms"].as_i64(),
            Some(base + n * 1000),
            "time from /ts: {p}"
        );
    }
    let temps = s.points("press-7", "temp").await?;
    assert_eq!(temps.len(), 50);
    assert_eq!(temps[0]["value"], serde_json::json!(21.5));
    let running = s.points("press-7", "running").await?;
    assert_eq!(
        running[0]["time_ms"].as_i64(),
        Some(base),
        "RFC 3339 with +08:00"
    );
    Ok(())
}

#[tokio::test]
async fn plain_payloads_number_bool_and_text() -> anyhow::Result<()> {
    let (s, port, prefix) = Setup::on_shared_broker("plain", "meter", |p| {
        format!(
            "payload = \"plain\"\nqos = 0\nmqtt_version = \"5\"\n\
                 [[devices.tags]]\nname = \"kwh\"\ntopic = \"{p}/kwh\"\n\
                 [[devices.tags]]\nname = \"on\"\ntopic = \"{p}/on\"\ntype = \"bool\"\n\
                 [[devices.tags]]\nname = \"state\"\ntopic = \"{p}/state\"\ntype = \"string\"\n"
        )
    })
    .await?;
    let publisher = Publisher::connect(port, &format!("{prefix}-pub"), false).await?;
    s.warm_up(&publisher, &format!("{prefix}/on"), b"true", "meter", "on")
        .await?;
    publisher
        .publish(&format!("{prefix}/kwh"), QoS::AtLeastOnce, "1234.5")
        .await;
    publisher
        .publish(&format!("{prefix}/state"), QoS::AtLeastOnce, "运行 running")
        .await;
    publisher
        .publish(&format!("{prefix}/on"), QoS::AtLeastOnce, "false")
        .await;
    let kwh = wait_for("kwh", Duration::from_secs(20), || async {
        let p = s.points("meter", "kwh").await?;
        Ok((!p.is_empty()).then_some(p))
    })
    .await?;
    assert_eq!(kwh[0]["value"], serde_json::json!(1234.5));
    let state = wait_for("state", Duration::from_secs(20), || async {
        let p = s.points("meter", "state").await?;
        Ok((!p.is_empty()).then_some(p))
    })
    .await?;
    assert_eq!(state[0]["value"], serde_json::json!("运行 running"));
    wait_for("on = false", Duration::from_secs(20), || async {
        let p = s.points("meter", "on").await?;
        Ok(p.iter()
            .any(|p| p["value"] == serde_json::json!(false))
            .then_some(()))
    })
    .await?;
    Ok(())
}

fn metric(name: Option<&str>, alias: u64, value: MetricValue) -> Metric {
    Metric {
        name: name.map(str::to_string),
        alias: Some(alias),
        value: Some(value),
        ..Metric::default()
    }
}

fn payload(seq: Option<u64>, timestamp: u64, metrics: Vec<Metric>) -> Vec<u8> {
    Payload {
        timestamp: Some(timestamp),
        metrics,
        seq,
        uuid: None,
    }
    .encode_to_vec()
}

#[tokio::test]
async fn sparkplug_birth_data_gap_and_death() -> anyhow::Result<()> {
    let port = shared_broker()?;
    let group = unique_prefix("sp").replace('/', "-");
    let g = group.clone();
    let s = Setup::start(move |_| {
        mqtt_device(
            "filler",
            port,
            &format!(
                "payload = \"sparkplug\"\ngroup = \"{g}\"\nedge_node = \"node1\"\n\
                 [[devices.tags]]\nname = \"temp\"\nmetric = \"Temperature\"\n\
                 [[devices.tags]]\nname = \"count\"\ntype = \"uint\"\n"
            ),
        )
    })
    .await?;
    let publisher = Publisher::connect(port, &format!("{group}-pub"), false).await?;
    let topic = |kind: &str| format!("spBv1.0/{group}/{kind}/node1");
    let t0 = 1_764_057_600_000u64;
    let birth = payload(
        Some(0),
        t0,
        vec![
            metric(Some("bdSeq"), 0, MetricValue::Long(3)),
            metric(Some("Temperature"), 1, MetricValue::Double(20.0)),
            metric(Some("count"), 2, MetricValue::Long(0)),
        ],
    );
    s.warm_up(&publisher, &topic("NBIRTH"), &birth, "filler", "temp")
        .await?;
    // NDATA by alias, seq 1..=5, then seq 7 (6 lost), then the death.
    for seq in [1u64, 2, 3, 4, 5, 7] {
        let p = payload(
            Some(seq),
            t0 + seq * 1000,
            vec![
                metric(None, 1, MetricValue::Double(20.0 + seq as f64)),
                metric(None, 2, MetricValue::Long(seq)),
            ],
        );
        publisher
            .publish(&topic("NDATA"), QoS::AtLeastOnce, p)
            .await;
    }
    let death = payload(
        None,
        t0 + 9000,
        vec![metric(Some("bdSeq"), 0, MetricValue::Long(3))],
    );
    publisher
        .publish(&topic("NDEATH"), QoS::AtLeastOnce, death)
        .await;
    let points = wait_for("the death certificate", Duration::from_secs(20), || async {
        let p = s.points("filler", "count").await?;
        Ok(p.iter()
            .any(|p| p["quality_code"] == 0x0004_0003)
            .then_some(p))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", s.logs()))?;
    let good: Vec<u64> = points
        .iter()
        .filter(|p| p["quality"] == "good")
        .filter_map(|p| p["value"].as_u64())
        .filter(|v| *v > 0)
        .collect();
    assert_eq!(good, [1, 2, 3, 4, 5, 7], "{points:#?}");
    let gaps = points
        .iter()
        .filter(|p| p["quality_code"] == 0x0004_0004)
        .count();
    assert_eq!(gaps, 1, "one seq gap (6 lost) recorded: {points:#?}");
    let temps = s.points("filler", "temp").await?;
    assert!(
        temps
            .iter()
            .any(|p| p["value"] == serde_json::json!(27.0)
                && p["time_ms"].as_u64() == Some(t0 + 7000))
    );
    assert_eq!(
        temps.last().map(|p| p["quality"].clone()),
        Some(Value::from("bad")),
        "death marks the tag Bad"
    );
    Ok(())
}

#[tokio::test]
async fn malformed_payloads_are_counted_and_the_stream_continues() -> anyhow::Result<()> {
    let (s, port, prefix) = Setup::on_shared_broker("malformed", "dev-malformed", |p| {
        format!(
                "topic = \"{p}/data\"\n[[devices.tags]]\nname = \"n\"\npointer = \"/n\"\ntype = \"uint\"\n"
        )
    })
    .await?;
    let publisher = Publisher::connect(port, &format!("{prefix}-pub"), false).await?;
    let topic = format!("{prefix}/data");
    s.warm_up(&publisher, &topic, br#"{"n": 0}"#, "dev-malformed", "n")
        .await?;
    let garbage: [&[u8]; 4] = [b"{\"n\": ", &[0xff, 0x00, 0x13], b"", b"[1,2"];
    for n in 1..=40u64 {
        if n % 10 == 0 {
            publisher
                .publish(&topic, QoS::AtLeastOnce, garbage[(n / 10 - 1) as usize])
                .await;
        }
        publisher
            .publish(&topic, QoS::AtLeastOnce, format!(r#"{{"n": {n}}}"#))
            .await;
    }
    wait_all(&s, "dev-malformed", "n", 40).await?;
    let bad = s
        .points("dev-malformed", "n")
        .await?
        .iter()
        .filter(|p| p["quality_code"] == 0x0004_0001)
        .count();
    assert_eq!(bad, 4, "each malformed payload is one Bad point");
    let log = std::fs::read_to_string(s.dir.path().join("gateway.log"))?;
    assert!(
        log.contains("mqtt payload rejected") && log.contains(&topic),
        "a warning names the topic and reason\n{}",
        s.logs()
    );
    Ok(())
}

#[tokio::test]
async fn broker_restart_mid_stream_loses_no_qos1_message() -> anyhow::Result<()> {
    let broker_dir = tempfile::tempdir()?;
    let mut broker = OwnBroker::start(broker_dir.path())?;
    let port = broker.port;
    let s = Setup::start(move |_| {
        mqtt_device(
            "dev-restart",
            port,
            "topic = \"line/data\"\n[[devices.tags]]\nname = \"n\"\npointer = \"/n\"\ntype = \"uint\"\n",
        )
    })
    .await?;
    let publisher = Publisher::connect(port, "restart-pub", true).await?;
    s.warm_up(&publisher, "line/data", br#"{"n": 0}"#, "dev-restart", "n")
        .await?;
    let last = 400u64;
    for n in 1..=last {
        publisher
            .publish("line/data", QoS::AtLeastOnce, format!(r#"{{"n": {n}}}"#))
            .await;
        if n == last / 2 {
            publisher.wait_acked(n, Duration::from_secs(20)).await?;
            broker.restart(Duration::from_millis(500))?;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_all(&s, "dev-restart", "n", last).await?;
    let log = std::fs::read_to_string(s.dir.path().join("gateway.log"))?;
    assert!(
        log.contains("reconnecting"),
        "the gateway saw the broker go"
    );
    Ok(())
}

#[tokio::test]
async fn gateway_sigkill_with_persistent_session_loses_no_qos1_message() -> anyhow::Result<()> {
    sigkill_loses_nothing("3.1.1").await
}

#[tokio::test]
async fn gateway_sigkill_with_persistent_mqtt5_session_loses_no_qos1_message() -> anyhow::Result<()>
{
    sigkill_loses_nothing("5").await
}

async fn sigkill_loses_nothing(version: &str) -> anyhow::Result<()> {
    let port = shared_broker()?;
    let prefix = unique_prefix(&format!("kill-v{version}"));
    let dev = format!("dev-kill-v{version}");
    let version = version.to_string();
    let (p, d) = (prefix.clone(), dev.clone());
    let mut s = Setup::start(move |_| {
        mqtt_device(
            &d,
            port,
            &format!(
                "topic = \"{p}/data\"\nclient_id = \"{p}-gw\"\nmqtt_version = \"{version}\"\n[[devices.tags]]\nname = \"n\"\npointer = \"/n\"\ntype = \"uint\"\n"
            ),
        )
    })
    .await?;
    let publisher = Publisher::connect(port, &format!("{prefix}-pub"), false).await?;
    let topic = format!("{prefix}/data");
    s.warm_up(&publisher, &topic, br#"{"n": 0}"#, &dev, "n")
        .await?;
    let last = 1000u64;
    let before = publisher.acked.load(std::sync::atomic::Ordering::Relaxed);
    for n in 1..=last {
        publisher
            .publish(&topic, QoS::AtLeastOnce, format!(r#"{{"n": {n}}}"#))
            .await;
        if n == 350 {
            // A burst the broker has taken and the gateway is receiving:
            // kill well inside the 100 ms commit interval, with messages
            // received but not yet on disk (an implementation that acked
            // on receipt would lose them).
            publisher
                .wait_acked(before + n, Duration::from_secs(20))
                .await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.gateway.proc.kill9();
        }
        if n == 600 {
            s.gateway.restart()?;
        }
    }
    let dups = wait_all(&s, &dev, "n", last).await?;
    eprintln!("stored twice across the kill (at-least-once): {dups}");
    let log = std::fs::read_to_string(s.dir.path().join("gateway.log"))?;
    assert_eq!(
        (
            log.matches("session_present=false").count(),
            log.matches("session_present=true").count()
        ),
        (1, 1),
        "a new session at the first start, found again after the kill\n{}",
        s.logs()
    );
    s.gateway.proc.kill9();
    forget_session(port, &format!("{prefix}-gw")).await?;
    Ok(())
}

#[tokio::test]
async fn tls_with_ca_and_client_certificate() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::create(dir.path())?;
    let tls_port = free_port()?;
    // The publisher uses the plain listener; the gateway must pass the TLS
    // one, which demands a client certificate signed by the test CA.
    let broker = OwnBroker::start_conf(
        dir.path(),
        false,
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            pki.ca.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        ),
    )?;
    let (ca, cert, key) = (
        pki.ca.clone(),
        pki.client_cert.clone(),
        pki.client_key.clone(),
    );
    let s = Setup::start(move |_| {
        format!(
            "\n[[devices]]\nid = \"tls-dev\"\nprotocol = \"mqtt\"\nbroker = \"mqtts://127.0.0.1:{tls_port}\"\n\
             mqtt_version = \"5\"\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n\
             topic = \"secure/data\"\nmax_backoff = \"1s\"\n\
             [[devices.tags]]\nname = \"n\"\npointer = \"/n\"\ntype = \"uint\"\n",
            ca.display(),
            cert.display(),
            key.display()
        )
    })
    .await?;
    let publisher = Publisher::connect(broker.port, "tls-pub", false).await?;
    s.warm_up(&publisher, "secure/data", br#"{"n": 0}"#, "tls-dev", "n")
        .await?;
    for n in 1..=20u64 {
        publisher
            .publish("secure/data", QoS::AtLeastOnce, format!(r#"{{"n": {n}}}"#))
            .await;
    }
    wait_all(&s, "tls-dev", "n", 20).await?;
    Ok(())
}

#[tokio::test]
async fn probe_shows_messages_and_the_values_the_mapping_extracts() -> anyhow::Result<()> {
    let port = shared_broker()?;
    let prefix = unique_prefix("probe");
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        gateway_toml(GW, any_port(), "t", &dir.path().join("buffer"))
            + &mqtt_device(
                "press-7",
                port,
                &format!(
                    "topic = \"{prefix}/+/data\"\ndevice_level = 2\n\
                     [[devices.tags]]\nname = \"temp\"\npointer = \"/t\"\n\
                     [[devices.tags]]\nname = \"count\"\npointer = \"/n\"\ntype = \"uint\"\n"
                ),
            ),
    )?;
    let child = std::process::Command::new(guantong_e2e::procs::binary("guantong-gateway")?)
        .args(["probe", "mqtt", "--broker"])
        .arg(format!("mqtt://127.0.0.1:{port}"))
        .args([
            "--topic",
            &format!("{prefix}/#"),
            "--count",
            "3",
            "--config",
        ])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let publisher = Publisher::connect(port, &format!("{prefix}-pub"), false).await?;
    let output = std::thread::spawn(move || child.wait_with_output());
    // Until the probe has subscribed and seen three messages.
    for _ in 0..100 {
        if output.is_finished() {
            break;
        }
        publisher
            .publish(
                &format!("{prefix}/press-7/data"),
                QoS::AtLeastOnce,
                r#"{"t": 21.5, "n": -1}"#,
            )
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !output.is_finished() {
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
    }
    let out = output
        .join()
        .map_err(|_| anyhow::anyhow!("probe waiter panicked"))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "{prefix}/press-7/data  {{\"t\": 21.5, \"n\": -1}}"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("    press-7.temp = 21.5 (double) @ "),
        "{stdout}"
    );
    assert!(
        stdout.contains("    press-7.count: Bad 0x00040002"),
        "{stdout}"
    );
    assert!(
        stdout.contains("    press-7: rejected: -1 is not an unsigned integer"),
        "{stdout}"
    );
    Ok(())
}

#[tokio::test]
async fn username_and_password_are_sent_and_checked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let passwords = dir.path().join("passwords");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwords)
        .args(["gateway", "s3cret"])
        .status()?;
    anyhow::ensure!(
        made.success(),
        "mosquitto_passwd failed (install mosquitto: ./test.sh does)"
    );
    // Anonymous clients may still publish; a client that presents a user
    // name is checked against the file.
    let broker = OwnBroker::start_conf(
        dir.path(),
        false,
        &format!("password_file {}\n", passwords.display()),
    )?;
    let port = broker.port;
    let s = Setup::start(move |_| {
        format!(
            "\n[[devices]]\nid = \"good\"\nprotocol = \"mqtt\"\nbroker = \"mqtt://127.0.0.1:{port}\"\n\
             username = \"gateway\"\npassword = \"s3cret\"\ntopic = \"auth/data\"\nmax_backoff = \"1s\"\n\
             [[devices.tags]]\nname = \"n\"\npointer = \"/n\"\ntype = \"uint\"\n\
             \n[[devices]]\nid = \"bad\"\nprotocol = \"mqtt\"\nbroker = \"mqtt://127.0.0.1:{port}\"\n\
             username = \"gateway\"\npassword = \"wrong\"\ntopic = \"auth/data\"\nmax_backoff = \"1s\"\n\
             [[devices.tags]]\nname = \"n\"\npointer = \"/n\"\ntype = \"uint\"\n"
        )
    })
    .await?;
    let publisher = Publisher::connect(port, "auth-pub", false).await?;
    s.warm_up(&publisher, "auth/data", br#"{"n": 0}"#, "good", "n")
        .await?;
    for n in 1..=10u64 {
        publisher
            .publish("auth/data", QoS::AtLeastOnce, format!(r#"{{"n": {n}}}"#))
            .await;
    }
    wait_all(&s, "good", "n", 10).await?;
    let api = s.ingest.api();
    let bad = api.points(GW, "bad", "n").await?;
    assert!(
        bad.iter().all(|p| p["quality"] != "good"),
        "a wrong password must not receive anything: {bad:?}\n{}",
        s.logs()
    );
    Ok(())
}

#[tokio::test]
async fn a_publisher_gone_quiet_while_the_broker_session_stays_is_a_stall() -> anyhow::Result<()> {
    let (s, port, prefix) = Setup::on_shared_broker("stall", "meter", |p| {
        format!(
            "payload = \"plain\"\ninterval = \"500ms\"\nstall_intervals = 4\n\
                 [[devices.tags]]\nname = \"kwh\"\ntopic = \"{p}/kwh\"\n"
        )
    })
    .await?;
    let publisher = Publisher::connect(port, &format!("{prefix}-pub"), false).await?;
    let topic = format!("{prefix}/kwh");
    s.warm_up(&publisher, &topic, b"1", "meter", "kwh").await?;
    publisher.publish(&topic, QoS::AtLeastOnce, "2").await;
    let time = |p: Value| p["time_ms"].as_i64().unwrap_or(0);
    let quiet_from = time(s.wait_point("meter", "kwh", |p| p["value"] == 2.0).await?);
    // The publisher stays connected and says nothing; the gateway's broker
    // session stays up too.
    let stall = s
        .wait_point("meter", "kwh", |p| p["quality_code"] == 0x0002_0007)
        .await?;
    assert_eq!(stall["quality"], "bad", "{stall}");
    let after = stall["time_ms"].as_i64().expect("time") - quiet_from;
    assert!(
        (2000..=10_000).contains(&after),
        "stalled after 4 × 500 ms of silence, not {after} ms"
    );
    // Data again: Good, after exactly one stall point.
    publisher.publish(&topic, QoS::AtLeastOnce, "3").await;
    let back = time(s.wait_point("meter", "kwh", |p| p["value"] == 3.0).await?);
    let points = s.points("meter", "kwh").await?;
    let stalls = points
        .iter()
        .filter(|p| p["quality_code"] == 0x0002_0007)
        .filter(|p| p["time_ms"].as_i64().is_some_and(|t| t < back))
        .count();
    assert_eq!(stalls, 1, "one Bad point per stall: {points:?}");
    assert!(
        s.gateway.proc.logs().contains("mqtt device stalled"),
        "{}",
        s.logs()
    );
    Ok(())
}
