//! `guantong-gateway probe mqtt`: the installer's look at a broker.
//!
//! Subscribes (clean session, a throw-away client id, QoS 0: it leaves no
//! session behind and takes nothing from the gateway's) and prints every
//! message with, beside it, what the mapping would extract:
//! - with `--config`: every MQTT device of that config whose filters match
//!   the topic, each tag's value (or the Bad code and reason), exactly as the
//!   collector would store it;
//! - without: the JSON pointers of the payload's scalar values (to copy into
//!   `pointer = ...`), the plain value, or the Sparkplug B metrics: names,
//!   aliases and datatypes from the births it sees (per edge node), so the
//!   alias-only data that follows is shown by name and with its sign.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use prost::Message as _;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

use super::config::{BrokerAddr, MqttConfig, MqttVersion, PayloadFormat};
use super::sparkplug::{BirthTable, Payload, datatype, metric_json};
use super::{Backoff, Decoder, Polled, Session};
use crate::config::{Config, DeviceConfig};
use crate::quality::{Sample, now_ms};

/// What `probe mqtt` was asked.
#[derive(Debug, Clone)]
pub struct ProbeArgs {
    pub broker: String,
    pub topics: Vec<String>,
    pub config: Option<PathBuf>,
    pub mqtt_version: MqttVersion,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// Stop after this many messages (0: until Ctrl-C).
    pub count: u64,
}

/// One configured device, as the probe applies it.
struct Probed {
    id: String,
    tags: Vec<String>,
    filters: Vec<String>,
    sparkplug: bool,
    decoder: Decoder,
}

pub async fn run(
    args: ProbeArgs,
    out: &mut (impl Write + Send),
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    for t in &args.topics {
        super::config::check_filter(t).map_err(|e| anyhow::anyhow!("--topic {e}"))?;
    }
    BrokerAddr::parse(&args.broker).map_err(|e| anyhow::anyhow!("--broker: {e}"))?;
    let mut devices = Vec::new();
    if let Some(path) = &args.config {
        let config = Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        for d in config.devices {
            if let DeviceConfig::Mqtt(m) = d {
                devices.push(Probed {
                    id: m.id.clone(),
                    tags: m.tags.iter().map(|t| t.name.clone()).collect(),
                    filters: m.filters(),
                    sparkplug: m.payload == PayloadFormat::Sparkplug,
                    decoder: Decoder::new(&m),
                });
            }
        }
        if devices.is_empty() {
            bail!(
                "{} declares no `protocol = \"mqtt\"` device",
                path.display()
            );
        }
    }
    let settings = MqttConfig::for_probe(&args);
    let client_id = format!("guantong-probe-{:08x}", rand::random::<u32>());
    let mut session = Session::new(&settings, &client_id, false, false)?;
    let acker = session.acker();
    let mut backoff = Backoff::new(Duration::from_secs(5));
    let mut seen = 0u64;
    let mut births: HashMap<String, BirthTable> = HashMap::new();
    writeln!(
        out,
        "probing {} as {client_id}, topics {}{}",
        args.broker,
        args.topics.join(" "),
        if devices.is_empty() {
            String::new()
        } else {
            format!(
                ", mapping of {} device(s) from {}",
                devices.len(),
                args.config
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )
        }
    )?;
    loop {
        // Only the cancel branch leaves; nothing is acknowledged (QoS 0).
        let polled = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            p = session.poll() => p,
        };
        match polled {
            Ok(Polled::Connected { .. }) => {
                backoff.reset();
                writeln!(out, "connected")?;
                acker
                    .subscribe(&args.topics, 0)
                    .await
                    .map_err(|e| anyhow::anyhow!("subscribe: {e}"))?;
            }
            Ok(Polled::Message(m)) => {
                seen += 1;
                describe(&m.topic, &m.payload, &mut devices, &mut births, out)?;
                out.flush()?;
                if args.count > 0 && seen >= args.count {
                    return Ok(());
                }
            }
            Ok(Polled::Subscribed { refused }) if !refused.is_empty() => {
                bail!("the broker refused the subscription: {refused:?}")
            }
            Ok(Polled::Subscribed { .. }) => writeln!(out, "subscribed")?,
            Ok(Polled::Other) => {}
            Err(e) => {
                writeln!(out, "connection: {e}; retrying")?;
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// Prints one message and what each mapping makes of it.
fn describe(
    topic: &str,
    payload: &[u8],
    devices: &mut [Probed],
    births: &mut HashMap<String, BirthTable>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let arrival = now_ms();
    writeln!(out, "{topic}  {}", show_payload(topic, payload))?;
    if devices.is_empty() {
        for line in guess(topic, payload, births) {
            writeln!(out, "    {line}")?;
        }
        return Ok(());
    }
    let mut any = false;
    for d in devices.iter_mut() {
        let matches = d
            .filters
            .iter()
            .any(|f| super::decode::topic_matches(f, topic));
        if !matches {
            continue;
        }
        any = true;
        let ids: Vec<u32> = (0..d.tags.len() as u32).collect();
        let mut samples: Vec<Sample> = Vec::new();
        let rejected = d
            .decoder
            .apply(topic, payload, arrival, &ids, &mut samples)
            .rejected;
        for s in &samples {
            let tag = &d.tags[s.tag as usize];
            match &s.value {
                Some(v) => writeln!(
                    out,
                    "    {}.{tag} = {} @ {}",
                    d.id,
                    show_value(v),
                    show_time(s.time_ms)
                )?,
                None => writeln!(out, "    {}.{tag}: Bad {:#010x}", d.id, s.code)?,
            }
        }
        if let Some(r) = rejected {
            writeln!(out, "    {}: rejected: {}", d.id, r.reason)?;
        } else if samples.is_empty() && !d.sparkplug {
            writeln!(
                out,
                "    {}: no tag of this device found a value here",
                d.id
            )?;
        }
    }
    if !any {
        writeln!(out, "    (no configured device subscribes to this topic)")?;
    }
    Ok(())
}

fn show_payload(topic: &str, payload: &[u8]) -> String {
    if topic.starts_with("spBv1.0/") {
        return format!("<Sparkplug B, {} bytes>", payload.len());
    }
    match std::str::from_utf8(payload) {
        Ok(t) if t.chars().count() > 200 => {
            format!(
                "{}… ({} bytes)",
                t.chars().take(200).collect::<String>(),
                payload.len()
            )
        }
        Ok(t) => t.to_string(),
        Err(_) => format!(
            "<{} bytes, not text: {}>",
            payload.len(),
            hex::encode(&payload[..payload.len().min(32)])
        ),
    }
}

fn show_value(v: &guantong_proto::v1::point::Value) -> String {
    use guantong_proto::v1::point::Value;
    match v {
        Value::Bool(b) => format!("{b} (bool)"),
        Value::Int(i) => format!("{i} (int)"),
        Value::Uint(u) => format!("{u} (uint)"),
        Value::Double(d) => format!("{d} (double)"),
        Value::String(s) => format!("{s:?} (string)"),
    }
}

fn show_time(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string()
        }
        Err(_) => format!("{ms} ms"),
    }
}

/// Without a config: what a mapping could use. `births`: the Sparkplug
/// birth tables seen so far, per `group/node`.
fn guess(topic: &str, payload: &[u8], births: &mut HashMap<String, BirthTable>) -> Vec<String> {
    if topic.starts_with("spBv1.0/") {
        return match Payload::decode(payload) {
            Ok(p) => sparkplug_lines(topic, &p, births),
            Err(e) => vec![format!("not a Sparkplug B payload: {e}")],
        };
    }
    match serde_json::from_slice::<Json>(payload) {
        Ok(doc @ (Json::Object(_) | Json::Array(_))) => {
            let mut lines = Vec::new();
            leaves(&doc, &mut String::new(), &mut lines);
            lines
        }
        Ok(scalar) => vec![format!("plain value: {scalar}")],
        Err(_) => match std::str::from_utf8(payload) {
            Ok(t) => vec![format!("plain text: {:?}", t.trim())],
            Err(_) => vec!["binary payload: neither JSON nor text".into()],
        },
    }
}

/// One line for the message, one per metric: name (resolved from the birth
/// when only the alias came), alias, datatype and value, in plain words.
fn sparkplug_lines(
    topic: &str,
    p: &Payload,
    births: &mut HashMap<String, BirthTable>,
) -> Vec<String> {
    let levels: Vec<&str> = topic.split('/').collect();
    let (kind, node, device) = match levels.as_slice() {
        [_, g, k, n] => (*k, format!("{g}/{n}"), None),
        [_, g, k, n, d] => (*k, format!("{g}/{n}"), Some(*d)),
        _ => ("", String::new(), None),
    };
    let table = births.entry(node).or_default();
    match kind {
        "NBIRTH" => {
            table.clear();
            table.learn(None, &p.metrics);
        }
        "DBIRTH" => table.learn(device, &p.metrics),
        _ => {}
    }
    let mut lines = vec![format!(
        "seq {}, timestamp {}",
        p.seq.map_or("none".into(), |s| s.to_string()),
        p.timestamp
            .and_then(|t| i64::try_from(t).ok())
            .map_or("none".into(), show_time)
    )];
    for m in &p.metrics {
        let alias = m.alias.map(|a| format!(", alias {a}")).unwrap_or_default();
        let line = match table.resolve(device, m) {
            Ok((name, dt)) => {
                let value = if m.is_null == Some(true) {
                    "null".to_string()
                } else {
                    match metric_json(m, dt) {
                        Ok(Some(j)) => j.to_string(),
                        Ok(None) => "no value".into(),
                        Err(e) => format!("unreadable: {e}"),
                    }
                };
                let name = if name.is_empty() { "(no name)" } else { &name };
                format!("metric {name}{alias}, {} = {value}", datatype::name(dt))
            }
            Err(a) => format!("metric alias {a}: not in any birth seen so far"),
        };
        lines.push(line);
    }
    if kind == "NDEATH" {
        table.clear();
    }
    lines
}

/// `pointer = value` for every scalar in `doc`.
fn leaves(doc: &Json, path: &mut String, out: &mut Vec<String>) {
    if out.len() >= 50 {
        return;
    }
    let len = path.len();
    match doc {
        Json::Object(map) => {
            for (k, v) in map {
                path.push('/');
                path.push_str(&k.replace('~', "~0").replace('/', "~1"));
                leaves(v, path, out);
                path.truncate(len);
            }
        }
        Json::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                path.push('/');
                path.push_str(&i.to_string());
                leaves(v, path, out);
                path.truncate(len);
            }
        }
        scalar => out.push(format!("pointer = \"{path}\"  ->  {scalar}")),
    }
}

impl MqttConfig {
    /// Connection settings of a probe (no tags).
    fn for_probe(args: &ProbeArgs) -> MqttConfig {
        let mut t = toml::Table::new();
        t.insert("id".into(), "probe".into());
        t.insert("broker".into(), args.broker.clone().into());
        t.insert("qos".into(), 0.into());
        let c: Result<MqttConfig, _> = toml::Value::Table(t).try_into();
        let mut c = c.expect("id, broker and qos are all a probe config needs");
        c.mqtt_version = args.mqtt_version;
        c.username = args.username.clone();
        c.password = args.password.clone();
        c.ca_file = args.ca_file.clone();
        c.client_cert_file = args.client_cert_file.clone();
        c.client_key_file = args.client_key_file.clone();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_json_pointers_of_scalars() {
        let mut births = HashMap::new();
        let lines = guess(
            "a/b",
            br#"{"t": 21.5, "s": [{"on": true}], "a/b": "x"}"#,
            &mut births,
        );
        assert_eq!(
            lines,
            [
                "pointer = \"/a~1b\"  ->  \"x\"",
                "pointer = \"/s/0/on\"  ->  true",
                "pointer = \"/t\"  ->  21.5",
            ]
        );
        assert_eq!(guess("a", b"42", &mut births), ["plain value: 42"]);
        assert_eq!(guess("a", b"on", &mut births), ["plain text: \"on\""]);
    }

    #[test]
    fn resolves_sparkplug_aliases_from_the_births_it_saw() {
        use super::super::sparkplug::{Metric, MetricValue};
        let mut births = HashMap::new();
        let birth = Payload {
            timestamp: Some(1_764_057_600_000),
            metrics: vec![Metric {
                name: Some("count".into()),
                alias: Some(3),
                datatype: Some(datatype::INT32),
                value: Some(MetricValue::Int(0)),
                ..Metric::default()
            }],
            seq: Some(1),
            uuid: None,
        };
        let data = Payload {
            metrics: vec![
                Metric {
                    alias: Some(3),
                    value: Some(MetricValue::Int(u32::MAX)),
                    ..Metric::default()
                },
                Metric {
                    alias: Some(9),
                    value: Some(MetricValue::Int(1)),
                    ..Metric::default()
                },
            ],
            seq: Some(2),
            ..Payload::default()
        };
        assert_eq!(
            guess("spBv1.0/g/DBIRTH/n/d", &birth.encode_to_vec(), &mut births),
            [
                "seq 1, timestamp 2025-11-25T08:00:00.000Z",
                "metric count, alias 3, Int32 = 0"
            ]
        );
        assert_eq!(
            guess("spBv1.0/g/DDATA/n/d", &data.encode_to_vec(), &mut births),
            [
                "seq 2, timestamp none",
                "metric count, alias 3, Int32 = -1",
                "metric alias 9: not in any birth seen so far",
            ]
        );
        // Another node: its own births.
        assert_eq!(
            guess(
                "spBv1.0/g/DDATA/other/d",
                &data.encode_to_vec(),
                &mut births
            )[1],
            "metric alias 3: not in any birth seen so far"
        );
    }
}
