//! Sparkplug B against a third-party edge node: pysparkplug (from PyPI, in
//! the virtualenv `./test.sh` makes) on the shared Mosquitto, with a unique
//! group id per test, through the real gateway and ingest binaries. What is
//! checked is what ingest stored, value by value.
//!
//! The edge node sends births with name, alias and datatype, and data with
//! aliases only and no datatype, as the specification allows.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use guantong_e2e::mqtt::{SparkplugEdgeNode, forget_session, shared_broker, unique_prefix};
use guantong_e2e::procs::{GatewayProc, IngestProc, gateway_toml, wait_for};
use serde_json::{Value, json};

const GW: &str = "gw-sparkplug";

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

/// Each metric of the edge node, the tag type it is stored as, and the
/// values it publishes (negative and extreme ones included).
fn published() -> Vec<(&'static str, &'static str, Vec<Value>)> {
    vec![
        ("int8", "int", vec![json!(-128), json!(127), json!(-1)]),
        ("int16", "int", vec![json!(-32768), json!(32767), json!(-2)]),
        (
            "int32",
            "int",
            vec![json!(-2_000_000_001), json!(i32::MAX), json!(i32::MIN)],
        ),
        (
            "int64",
            "int",
            vec![json!(i64::MIN), json!(i64::MAX), json!(-5)],
        ),
        ("uint8", "uint", vec![json!(255), json!(1)]),
        ("uint16", "uint", vec![json!(65535), json!(2)]),
        ("uint32", "uint", vec![json!(u32::MAX), json!(3)]),
        ("uint64", "uint", vec![json!(u64::MAX), json!(4)]),
        (
            "float",
            "double",
            vec![
                json!(-0.1),
                json!(123.456),
                json!(3.4028235e38),
                json!(-1.1754944e-38),
            ],
        ),
        (
            "double",
            "double",
            vec![json!(-1.5e300), json!(2.2250738585072014e-308), json!(0.1)],
        ),
        ("boolean", "bool", vec![json!(true), json!(false)]),
        ("string", "string", vec![json!("运行 \"ok\""), json!("x")]),
        ("datetime", "uint", vec![json!(1_764_057_600_125u64)]),
        ("text", "string", vec![json!("第二行\nline 2")]),
        (
            "uuid",
            "string",
            vec![json!("3f2504e0-4f89-11d3-9a0c-0305e82c3301")],
        ),
        // 00 01 ff, stored as base64.
        ("bytes", "string", vec![json!([0, 1, 255])]),
    ]
}

/// What the gateway stores for a published value.
fn stored(metric: &str, v: &Value) -> Value {
    match metric {
        "bytes" => json!("AAH/"),
        _ => v.clone(),
    }
}

/// The values of the birth certificate (the peer's defaults).
fn birth_value(tag_type: &str) -> Value {
    match tag_type {
        "double" => json!(0.0),
        "bool" => json!(false),
        "string" => json!(""),
        _ => json!(0),
    }
}

/// The data messages that publish every value once: round i carries the
/// i-th value of each metric that has one.
fn rounds() -> Vec<String> {
    let metrics = published();
    let n = metrics.iter().map(|(_, _, v)| v.len()).max().unwrap_or(0);
    (0..n)
        .map(|i| {
            let round: serde_json::Map<String, Value> = metrics
                .iter()
                .filter_map(|(m, _, vs)| vs.get(i).map(|v| (m.to_string(), v.clone())))
                .collect();
            format!("data {}", Value::Object(round))
        })
        .collect()
}

struct Setup {
    dir: tempfile::TempDir,
    ingest: IngestProc,
    gateway: Option<GatewayProc>,
    group: String,
    /// Unique per test: the gateway's MQTT client id is made of it, and
    /// two sessions with one client id on the shared broker take turns.
    device: String,
}

impl Setup {
    async fn new() -> anyhow::Result<Setup> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("ingest");
        let token = IngestProc::register(&data, GW)?;
        let ingest = IngestProc::start(&data, any_port(), any_port()).await?;
        let group = unique_prefix("sparkplug").replace('/', "-");
        let device = format!("press-{:08x}", rand::random::<u32>());
        let tags: String = published()
            .iter()
            .map(|(m, t, _)| format!("[[devices.tags]]\nname = \"{m}\"\ntype = \"{t}\"\n"))
            .collect();
        let text = gateway_toml(GW, ingest.grpc, &token, &dir.path().join("buffer"))
            + &format!(
                "\n[[devices]]\nid = \"{device}\"\nprotocol = \"mqtt\"\nbroker = \"mqtt://127.0.0.1:{}\"\n\
                 max_backoff = \"1s\"\npayload = \"sparkplug\"\ngroup = \"{group}\"\nedge_node = \"node1\"\n\
                 sparkplug_device = \"dev1\"\n{tags}",
                shared_broker()?
            );
        std::fs::write(dir.path().join("gateway.toml"), text)?;
        Ok(Setup {
            dir,
            ingest,
            gateway: None,
            group,
            device,
        })
    }

    /// Removes the gateway's persistent session from the shared broker.
    async fn forget_session(&mut self) -> anyhow::Result<()> {
        if let Some(mut g) = self.gateway.take() {
            g.proc.terminate(Duration::from_secs(5));
        }
        forget_session(shared_broker()?, &format!("guantong-{}", self.device)).await
    }

    fn start_gateway(&mut self) -> anyhow::Result<()> {
        self.gateway = Some(GatewayProc::start(&self.dir.path().join("gateway.toml"))?);
        Ok(())
    }

    fn edge_node(&self) -> anyhow::Result<SparkplugEdgeNode> {
        SparkplugEdgeNode::start(
            self.dir.path(),
            shared_broker()?,
            &self.group,
            "node1",
            "dev1",
        )
    }

    fn logs(&self, node: &SparkplugEdgeNode) -> String {
        format!(
            "gateway:\n{}\ningest:\n{}\nedge node:\n{}",
            self.gateway
                .as_ref()
                .map(|g| g.proc.logs())
                .unwrap_or_default(),
            self.ingest.proc.logs(),
            node.log()
        )
    }

    async fn points(&self, tag: &str) -> anyhow::Result<Vec<Value>> {
        self.ingest.api().points(GW, &self.device, tag).await
    }

    /// Every point of every tag.
    async fn all_points(&self) -> anyhow::Result<BTreeMap<String, Vec<Value>>> {
        let mut all = BTreeMap::new();
        for (m, _, _) in published() {
            all.insert(m.to_string(), self.points(m).await?);
        }
        Ok(all)
    }
}

fn good_values(points: &[Value]) -> Vec<Value> {
    points
        .iter()
        .filter(|p| p["quality"] == "good")
        .map(|p| p["value"].clone())
        .collect()
}

/// Per tag: its Good values and its Bad codes, one line each.
fn summary(all: &BTreeMap<String, Vec<Value>>) -> String {
    all.iter()
        .map(|(tag, points)| {
            let bad: Vec<String> = points
                .iter()
                .filter(|p| p["quality"] != "good")
                .map(|p| p["quality_code"].to_string())
                .collect();
            format!("{tag}: good {:?} bad {bad:?}\n", good_values(points))
        })
        .collect()
}

/// Whether `tag` has a point with `code` (Bad).
fn has_code(points: &[Value], code: u32) -> bool {
    points.iter().any(|p| p["quality_code"] == code)
}

#[tokio::test]
async fn every_datatype_alias_only_is_stored_as_published_after_a_rebirth_request()
-> anyhow::Result<()> {
    let mut s = Setup::new().await?;
    let mut node = s.edge_node()?;
    // The births go out before the gateway runs: it has to ask for them.
    node.send("birth")?;
    s.start_gateway()?;
    let rounds = rounds();
    let expected: Vec<(&str, &str, Vec<Value>)> = published();
    let complete = wait_for(
        "every published value at ingest",
        Duration::from_secs(90),
        || {
            let round = rounds[rand::random::<u32>() as usize % rounds.len()].clone();
            let sent = node.send(&round);
            let s = &s;
            let expected = &expected;
            async move {
                sent?;
                tokio::time::sleep(Duration::from_millis(150)).await;
                let all = s.all_points().await?;
                let done = expected.iter().all(|(m, _, values)| {
                    let good = good_values(&all[*m]);
                    values.iter().all(|v| good.contains(&stored(m, v)))
                });
                Ok(done.then_some(all))
            }
        },
    )
    .await;
    let all = match complete {
        Ok(all) => all,
        Err(e) => panic!(
            "{e}\n{}\n{}",
            summary(&s.all_points().await?),
            s.logs(&node)
        ),
    };
    assert!(
        node.rebirths_requested() >= 1,
        "the gateway asked for the births it missed: {}",
        s.logs(&node)
    );
    // Value by value: nothing stored Good that was not published.
    for (m, t, values) in &expected {
        let mut allowed: Vec<Value> = values.iter().map(|v| stored(m, v)).collect();
        allowed.push(birth_value(t));
        for v in good_values(&all[*m]) {
            assert!(
                allowed.contains(&v),
                "{m}: stored {v}, published {allowed:?}"
            );
        }
    }
    s.forget_session().await
}

#[tokio::test]
async fn seq_gap_bad_metric_deaths_and_rebirths() -> anyhow::Result<()> {
    let mut s = Setup::new().await?;
    s.start_gateway()?;
    let mut node = s.edge_node()?;
    node.send("birth")?;
    // Until the gateway is subscribed and storing.
    let mut i = 0i64;
    let warm = wait_for("the first value at ingest", Duration::from_secs(60), || {
        i += 1;
        let sent = node.send(&format!("data {{\"int32\": {}}}", -i));
        let s = &s;
        async move {
            sent?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok((!good_values(&s.points("int32").await?).is_empty()).then_some(()))
        }
    })
    .await;
    if let Err(e) = warm {
        panic!("{e}\n{}", s.logs(&node));
    }
    let before_gap = node.rebirths_requested();

    // A seq gap: a Bad point on each tag and a rebirth request (the rate
    // limit may delay it; data keeps asking until the births came).
    node.send("gap")?;
    let asked = wait_for(
        "a rebirth request after the gap",
        Duration::from_secs(30),
        || {
            let sent = node.send("data {\"int32\": -100}");
            let n = node.rebirths_requested();
            async move {
                sent?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok((n > before_gap).then_some(()))
            }
        },
    )
    .await;
    if let Err(e) = asked {
        panic!("{e}\n{}", s.logs(&node));
    }

    // One bad metric among good ones.
    node.send("bad boolean")?;
    // A device death, then a node death and a new session with new births.
    let stored_bad = wait_for(
        "the bad metric at ingest",
        Duration::from_secs(30),
        || async {
            let b = s.points("boolean").await?;
            Ok(has_code(&b, 0x0004_0002).then_some(()))
        },
    )
    .await;
    if let Err(e) = stored_bad {
        panic!("{e}\n{}", s.logs(&node));
    }
    node.send("ddeath")?;
    node.send("reconnect")?;
    node.send("data {\"int32\": -4242, \"boolean\": true}")?;
    let after = wait_for(
        "data of the new session",
        Duration::from_secs(30),
        || async {
            let p = s.points("int32").await?;
            Ok(good_values(&p).contains(&json!(-4242)).then_some(p))
        },
    )
    .await;
    let int32 = match after {
        Ok(p) => p,
        Err(e) => panic!("{e}\n{}", s.logs(&node)),
    };
    let logs = s.logs(&node);
    assert!(
        has_code(&int32, 0x0004_0004),
        "seq gap recorded: {int32:#?}"
    );
    assert!(
        has_code(&int32, 0x0004_0003),
        "DDEATH/NDEATH recorded: {int32:#?}"
    );
    let int32_good = good_values(&int32);
    assert!(
        int32_good.contains(&json!(-7)),
        "good metric beside the bad one stored: {int32:#?}"
    );
    assert!(
        int32_good.contains(&json!(-100)),
        "data after the gap stored: {int32:#?}"
    );
    let double = s.points("double").await?;
    assert!(good_values(&double).contains(&json!(2.5)), "{double:#?}");
    // The death is followed by Good data again, in time order.
    let last_death = int32
        .iter()
        .rposition(|p| p["quality_code"] == 0x0004_0003)
        .expect("a death point");
    let last_good = int32
        .iter()
        .rposition(|p| p["value"] == json!(-4242))
        .expect("new data");
    assert!(last_good > last_death, "{int32:#?}");
    assert!(
        logs.contains("metric `boolean`") && !logs.contains("mqtt payload rejected"),
        "the log names the bad metric, not the payload:\n{logs}"
    );
    s.forget_session().await
}

/// The STATE the broker retains for `host`: (online, timestamp), checked to
/// be the specification's JSON at QoS 1.
async fn retained_state(host: &str) -> anyhow::Result<Option<(bool, i64)>> {
    let topic = format!("spBv1.0/STATE/{host}");
    let Some(p) = guantong_e2e::mqtt::retained_message(shared_broker()?, &topic).await? else {
        return Ok(None);
    };
    let v: Value = serde_json::from_slice(&p.payload)?;
    let keys: Vec<&String> = v
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    anyhow::ensure!(
        keys.len() == 2 && p.retain && p.qos == rumqttc::QoS::AtLeastOnce,
        "STATE {v} retain {} qos {:?}: expected retained QoS 1 {{online, timestamp}}",
        p.retain,
        p.qos
    );
    Ok(Some((
        v["online"].as_bool().unwrap_or_default(),
        v["timestamp"].as_i64().unwrap_or_default(),
    )))
}

async fn wait_state(
    what: &str,
    host: &str,
    want: impl Fn(bool, i64) -> bool,
) -> anyhow::Result<i64> {
    wait_for(what, Duration::from_secs(20), || async {
        Ok(retained_state(host)
            .await?
            .filter(|(online, ts)| want(*online, *ts))
            .map(|(_, ts)| ts))
    })
    .await
}

/// Sparkplug 3.0 primary host: online STATE with the will's timestamp, the
/// will on a crash, a later timestamp after a restart, an offline STATE
/// answered at once, offline at a deliberate stop; data flows meanwhile.
#[tokio::test]
async fn announces_itself_as_the_primary_host() -> anyhow::Result<()> {
    let mut s = Setup::new().await?;
    let host = format!("scada-{}", s.device);
    let config = s.dir.path().join("gateway.toml");
    let text = std::fs::read_to_string(&config)?.replace(
        "sparkplug_device = \"dev1\"\n",
        &format!("sparkplug_device = \"dev1\"\nprimary_host_id = \"{host}\"\n"),
    );
    std::fs::write(&config, text)?;
    let started = guantong_gateway::quality::now_ms();
    s.start_gateway()?;
    let t1 = wait_state("online STATE", &host, |online, ts| online && ts >= started).await?;

    // Data arrives with a clean session too.
    let mut node = s.edge_node()?;
    node.send("birth")?;
    let stored = wait_for("a value at ingest", Duration::from_secs(60), || {
        let sent = node.send("data {\"int32\": -7}");
        let s = &s;
        async move {
            sent?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok(good_values(&s.points("int32").await?)
                .contains(&json!(-7))
                .then_some(()))
        }
    })
    .await;
    if let Err(e) = stored {
        panic!("{e}\n{}", s.logs(&node));
    }

    // A crash: the broker publishes the will, with the birth's timestamp.
    s.gateway.as_mut().expect("started").proc.kill9();
    wait_state("the will", &host, |online, ts| !online && ts == t1).await?;

    s.gateway.as_mut().expect("started").restart()?;
    let t2 = wait_state("online again", &host, |online, ts| online && ts > t1).await?;

    // Someone (a late will) says the host is offline: it answers at once.
    let p = guantong_e2e::mqtt::Publisher::connect(shared_broker()?, &format!("{host}-x"), false)
        .await?;
    p.client
        .publish(
            format!("spBv1.0/STATE/{host}"),
            rumqttc::QoS::AtLeastOnce,
            true,
            format!(r#"{{"online":false,"timestamp":{t2}}}"#),
        )
        .await?;
    p.wait_acked(1, Duration::from_secs(5)).await?;
    wait_state("online republished", &host, |online, ts| online && ts == t2).await?;

    // A deliberate stop: offline before the disconnect.
    let mut g = s.gateway.take().expect("started");
    g.proc.terminate(Duration::from_secs(10));
    wait_state("offline at stop", &host, |online, ts| !online && ts == t2).await?;
    assert!(
        g.proc.logs().contains("sparkplug primary host offline")
            && !g.proc.logs().contains("not confirmed"),
        "the gateway sent the offline STATE itself: {}",
        g.proc.logs()
    );
    // Leave nothing retained on the shared broker.
    p.client
        .publish(
            format!("spBv1.0/STATE/{host}"),
            rumqttc::QoS::AtLeastOnce,
            true,
            Vec::new(),
        )
        .await?;
    p.wait_acked(2, Duration::from_secs(5)).await?;
    Ok(())
}
