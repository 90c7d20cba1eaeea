//! MQTT device and tag settings, as written in `[[devices]]` with
//! `protocol = "mqtt"`.
//!
//! One `[[devices]]` is one MQTT session (its own client id) on one broker.
//! Which messages belong to the device is declared by topic filters (the
//! device's `topic`, or a tag's own `topic`), so the manifest says exactly
//! which topics feed which device: `Device.endpoint` is the broker URL and the
//! subscribed filters, `Tag.address` is `filter#/json/pointer` (JSON),
//! `filter` (plain) or `spBv1.0/group/node[/device]#metric` (Sparkplug B).
//!
//! `device_level` names a topic level that carries the device's name: a `+`
//! at that level in any filter is replaced by `device_name` (default: the
//! device id) before subscribing, so `factory/+/line1/#` with
//! `device_level = 1` subscribes `factory/press-7/line1/#` for `press-7`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guantong_proto::v1::{Device, Tag};
use serde::Deserialize;

use crate::config::{Problems, check_id};
pub use crate::value::ValueType;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub id: String,
    /// `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]`
    /// (TLS, default port 8883).
    pub broker: String,
    #[serde(default)]
    pub mqtt_version: MqttVersion,
    /// Stable client id; the broker keeps the session under it. Default
    /// `guantong-<gateway id>-<device id>`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Read the password from this file (trimmed) or environment variable
    /// instead; resolved into `password` at load.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// PEM file of the CA certificate(s) that signed the broker's
    /// certificate (`mqtts://` only); relative to the config file.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key, for brokers that require one.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Subscription QoS: 0 (at most once) or 1 (at least once, acknowledged
    /// only after the values are committed to the buffer).
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Longest wait between reconnect attempts (backoff doubles up to this,
    /// with jitter).
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// MQTT 5: how long the broker keeps the session (and queued QoS 1
    /// messages) while the gateway is away. MQTT 3.1.1 brokers keep it until
    /// their own limit.
    #[serde(default = "default_session_expiry", with = "humantime_serde")]
    pub session_expiry: Duration,
    /// Default topic filter of the tags (wildcards allowed).
    #[serde(default)]
    pub topic: Option<String>,
    /// Zero-based topic level that carries the device's name.
    #[serde(default)]
    pub device_level: Option<usize>,
    /// The name at `device_level`; default: `id`.
    #[serde(default)]
    pub device_name: Option<String>,
    #[serde(default)]
    pub payload: PayloadFormat,
    /// JSON pointer of the source timestamp in the payload (JSON only);
    /// absent: the arrival time.
    #[serde(default)]
    pub timestamp: Option<String>,
    #[serde(default)]
    pub timestamp_format: TimestampFormat,
    /// Expected publishing interval, for the evidence of connectivity;
    /// 0s: event-driven.
    #[serde(default, with = "humantime_serde")]
    pub interval: Duration,
    /// With `interval` declared: no message for this many intervals while
    /// the broker connection is up is a stall (tags Bad, filters
    /// subscribed again).
    #[serde(default = "crate::liveness::default_stall_intervals")]
    pub stall_intervals: std::num::NonZeroU32,
    /// Sparkplug B group id.
    #[serde(default)]
    pub group: Option<String>,
    /// Sparkplug B edge node id.
    #[serde(default)]
    pub edge_node: Option<String>,
    /// Sparkplug B device id under the edge node; absent: the node's own
    /// metrics (NBIRTH/NDATA).
    #[serde(default)]
    pub sparkplug_device: Option<String>,
    /// Sparkplug B: this device's session announces the gateway as the
    /// primary host application with this host id (`state` module). One
    /// device per broker.
    #[serde(default)]
    pub primary_host_id: Option<String>,
    #[serde(skip)]
    pub tags: Vec<MqttTagConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTagConfig {
    pub name: String,
    #[serde(rename = "type", default)]
    pub data_type: ValueType,
    /// Topic filter of this tag; default: the device's `topic`.
    #[serde(default)]
    pub topic: Option<String>,
    /// JSON pointer (RFC 6901) of the value, e.g. `/sensors/0/temp`; default
    /// `""`, the whole document.
    #[serde(default)]
    pub pointer: String,
    /// Sparkplug B metric name; default: `name`.
    #[serde(default)]
    pub metric: Option<String>,
    #[serde(default)]
    pub unit: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum MqttVersion {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// A JSON document; tags pick values by JSON pointer.
    #[default]
    Json,
    /// The payload is the value: a number, `true`/`false`, or text.
    Plain,
    /// Sparkplug B protobuf on `spBv1.0/...` topics.
    Sparkplug,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampFormat {
    /// Numbers below 10^11 are seconds, larger ones milliseconds; strings
    /// are RFC 3339.
    #[default]
    Auto,
    EpochS,
    EpochMs,
    Rfc3339,
}

/// Where the broker is, parsed from `broker`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerAddr {
    pub fn parse(url: &str) -> Result<BrokerAddr, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(format!(
                "`{url}` is not a broker URL, expected `mqtt://host[:port]` or `mqtts://host[:port]`"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
                Ok(p) => (h, p),
                Err(_) => return Err(format!("`{p}` in `{url}` is not a port number")),
            },
            _ => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(format!("`{url}` has no host"));
        }
        Ok(BrokerAddr {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

impl crate::protocol::DeviceProtocol for MqttConfig {
    fn name(&self) -> &'static str {
        "mqtt"
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn tag_count(&self) -> usize {
        self.tags.len()
    }
    fn manifest(&self, device_index: u32) -> (Device, Vec<Tag>) {
        MqttConfig::manifest(self, device_index)
    }
    /// Twice the declared publishing interval (none declared: never).
    fn stale_after(&self) -> Option<Duration> {
        (!self.interval.is_zero()).then(|| self.interval * 2)
    }
    fn finish(&mut self, gateway_id: &str, base_dir: &Path, _buffer_dir: &Path) {
        self.resolve_paths(base_dir);
        // Unique per gateway and device, so two gateways on one broker never
        // take over each other's session.
        self.client_id
            .get_or_insert_with(|| format!("guantong-{gateway_id}-{}", self.id));
    }
    fn secret_files(&self) -> Vec<&Path> {
        self.password_file.as_deref().into_iter().collect()
    }
}

impl MqttConfig {
    pub fn broker_addr(&self) -> BrokerAddr {
        BrokerAddr::parse(&self.broker).expect("checked when the config was loaded")
    }

    /// The client id the session is kept under.
    pub fn client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("guantong-{}", self.id))
    }

    /// The filter a tag's messages arrive on, after `device_level`
    /// substitution.
    pub fn tag_filter(&self, tag: &MqttTagConfig) -> String {
        if self.payload == PayloadFormat::Sparkplug {
            return self.sparkplug_filter();
        }
        let raw = tag
            .topic
            .as_deref()
            .or(self.topic.as_deref())
            .unwrap_or_default();
        self.substitute(raw)
    }

    /// `spBv1.0/<group>/+/<node>/#`: every message type of the node and its
    /// devices (`#` also matches the node-level topics).
    pub fn sparkplug_filter(&self) -> String {
        format!(
            "spBv1.0/{}/+/{}/#",
            self.group.as_deref().unwrap_or_default(),
            self.edge_node.as_deref().unwrap_or_default()
        )
    }

    fn substitute(&self, filter: &str) -> String {
        let Some(level) = self.device_level else {
            return filter.to_string();
        };
        let name = self.device_name.as_deref().unwrap_or(&self.id);
        filter
            .split('/')
            .enumerate()
            .map(|(i, l)| if i == level && l == "+" { name } else { l })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Distinct filters to subscribe, in tag order.
    pub fn filters(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for t in &self.tags {
            let f = self.tag_filter(t);
            if seen.insert(f.clone()) {
                out.push(f);
            }
        }
        out
    }

    pub fn manifest(&self, device_index: u32) -> (Device, Vec<Tag>) {
        let device = Device {
            id: self.id.clone(),
            protocol: "mqtt".into(),
            endpoint: format!("{} {}", self.broker, self.filters().join(" ")),
            identity: Default::default(),
        };
        let tags = self
            .tags
            .iter()
            .map(|t| Tag {
                device: device_index,
                name: t.name.clone(),
                address: self.tag_address(t),
                data_type: t.data_type.wire() as i32,
                unit: t.unit.clone(),
                interval_ms: self.interval.as_millis() as u64,
            })
            .collect();
        (device, tags)
    }

    fn tag_address(&self, t: &MqttTagConfig) -> String {
        match self.payload {
            PayloadFormat::Json => format!("{}#{}", self.tag_filter(t), t.pointer),
            PayloadFormat::Plain => self.tag_filter(t),
            PayloadFormat::Sparkplug => {
                let mut a = format!(
                    "spBv1.0/{}/{}",
                    self.group.as_deref().unwrap_or_default(),
                    self.edge_node.as_deref().unwrap_or_default()
                );
                if let Some(d) = &self.sparkplug_device {
                    a.push('/');
                    a.push_str(d);
                }
                a.push('#');
                a.push_str(t.metric.as_deref().unwrap_or(&t.name));
                a
            }
        }
    }

    /// Resolves relative file paths against the config file's directory.
    pub(crate) fn resolve_paths(&mut self, base_dir: &Path) {
        for p in [
            &mut self.password_file,
            &mut self.ca_file,
            &mut self.client_cert_file,
            &mut self.client_key_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base_dir.join(&*p);
            }
        }
    }
}

/// Whether `filter` is a valid MQTT topic filter (MQTT 3.1.1 §4.7).
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("is empty, expected a topic filter such as `factory/+/line1/#`".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Err(format!(
                "`{filter}`: `#` must be a whole level and the last one"
            ));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!("`{filter}`: `+` must be a whole level"));
        }
    }
    Ok(())
}

fn default_qos() -> u8 {
    1
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_session_expiry() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// Parses one `protocol = "mqtt"` device (its `protocol` key already
/// removed), recording problems under `path`.
pub(crate) fn parse(
    path: &str,
    mut table: toml::Table,
    problems: &mut Problems,
) -> Option<MqttConfig> {
    let raw_tags = table.remove("tags");
    let device = problems.parse::<MqttConfig>(path, toml::Value::Table(table));
    let tags =
        problems.parse_required_tags(path, raw_tags, |tag_path, tag: MqttTagConfig, problems| {
            check_id(problems, &format!("{tag_path}.name"), &tag.name);
            Some((tag_path.to_string(), tag))
        });
    let mut device = device?;
    let at = |key: &str| format!("{path}.{key}");
    check_id(problems, &at("id"), &device.id);
    if let Err(e) = BrokerAddr::parse(&device.broker) {
        problems.push(at("broker"), e);
    } else if !device.broker.starts_with("mqtts://") {
        for (key, set) in [
            ("ca_file", device.ca_file.is_some()),
            ("client_cert_file", device.client_cert_file.is_some()),
            ("client_key_file", device.client_key_file.is_some()),
        ] {
            if set {
                problems.push(at(key), "only used with an `mqtts://` broker");
            }
        }
    }
    if device.broker.starts_with("mqtts://") && device.ca_file.is_none() {
        problems.push(
            at("ca_file"),
            "missing: an `mqtts://` broker needs the CA that signed its certificate (for a public CA, the system bundle such as `/etc/ssl/certs/ca-certificates.crt`)",
        );
    }
    if device.client_cert_file.is_some() != device.client_key_file.is_some() {
        problems.push(
            at("client_cert_file"),
            "`client_cert_file` and `client_key_file` go together",
        );
    }
    if device.password.is_some() && device.username.is_none() {
        problems.push(at("password"), "a password needs a `username`");
    }
    if let Some(id) = &device.client_id
        && (id.is_empty() || id.len() > 65535)
    {
        problems.push(at("client_id"), "expected 1 to 65535 characters");
    }
    if device.qos > 1 {
        problems.push(
            at("qos"),
            format!("{} is not supported, expected 0 or 1", device.qos),
        );
    }
    if device.keep_alive < Duration::from_secs(5) || device.keep_alive > Duration::from_secs(65535)
    {
        problems.push(at("keep_alive"), "expected between 5s and 65535s");
    }
    if device.max_backoff < Duration::from_millis(100) {
        problems.push(at("max_backoff"), "expected at least 100ms");
    }
    if device.session_expiry.as_secs() > u64::from(u32::MAX) {
        problems.push(at("session_expiry"), "expected at most 136 years");
    }
    if let Some(ts) = &device.timestamp {
        if device.payload != PayloadFormat::Json {
            problems.push(
                at("timestamp"),
                "only JSON payloads carry a timestamp field",
            );
        } else if !(ts.is_empty() || ts.starts_with('/')) {
            problems.push(
                at("timestamp"),
                format!("`{ts}` is not a JSON pointer, expected e.g. `/ts`"),
            );
        }
    }
    match device.payload {
        PayloadFormat::Sparkplug => {
            for (key, v) in [("group", &device.group), ("edge_node", &device.edge_node)] {
                match v {
                    None => problems.push(path, format!("missing field `{key}` (Sparkplug B)")),
                    Some(v) => check_sparkplug_id(problems, &at(key), v),
                }
            }
            if let Some(d) = &device.sparkplug_device {
                check_sparkplug_id(problems, &at("sparkplug_device"), d);
            }
            if let Some(h) = &device.primary_host_id {
                check_sparkplug_id(problems, &at("primary_host_id"), h);
            }
            for key in ["topic", "device_level", "device_name"] {
                let set = match key {
                    "topic" => device.topic.is_some(),
                    "device_level" => device.device_level.is_some(),
                    _ => device.device_name.is_some(),
                };
                if set {
                    problems.push(
                        at(key),
                        "not used with `payload = \"sparkplug\"` (topics follow from `group`, `edge_node` and `sparkplug_device`)",
                    );
                }
            }
        }
        PayloadFormat::Json | PayloadFormat::Plain => {
            for (key, set) in [
                ("group", device.group.is_some()),
                ("edge_node", device.edge_node.is_some()),
                ("sparkplug_device", device.sparkplug_device.is_some()),
                ("primary_host_id", device.primary_host_id.is_some()),
            ] {
                if set {
                    problems.push(at(key), "only used with `payload = \"sparkplug\"`");
                }
            }
            if let Some(t) = &device.topic
                && let Err(e) = check_filter(t)
            {
                problems.push(at("topic"), e);
            }
        }
    }
    let mut names = HashSet::new();
    for (tag_path, tag) in &tags {
        if !names.insert(tag.name.as_str()) {
            problems.push(
                format!("{tag_path}.name"),
                format!("duplicate tag name `{}`", tag.name),
            );
        }
        match device.payload {
            PayloadFormat::Sparkplug => {
                for (key, set) in [
                    ("topic", tag.topic.is_some()),
                    ("pointer", !tag.pointer.is_empty()),
                ] {
                    if set {
                        problems.push(
                            format!("{tag_path}.{key}"),
                            "not used with `payload = \"sparkplug\"`; name the metric with `metric`",
                        );
                    }
                }
            }
            PayloadFormat::Json | PayloadFormat::Plain => {
                if tag.metric.is_some() {
                    problems.push(
                        format!("{tag_path}.metric"),
                        "only used with `payload = \"sparkplug\"`",
                    );
                }
                match &tag.topic {
                    Some(t) => {
                        if let Err(e) = check_filter(t) {
                            problems.push(format!("{tag_path}.topic"), e);
                        }
                    }
                    None if device.topic.is_none() => problems.push(
                        format!("{tag_path}.topic"),
                        "missing: set `topic` on the tag or on its device",
                    ),
                    None => {}
                }
                if device.payload == PayloadFormat::Plain && !tag.pointer.is_empty() {
                    problems.push(
                        format!("{tag_path}.pointer"),
                        "only used with `payload = \"json\"`",
                    );
                }
                if !(tag.pointer.is_empty() || tag.pointer.starts_with('/')) {
                    problems.push(
                        format!("{tag_path}.pointer"),
                        format!(
                            "`{}` is not a JSON pointer, expected e.g. `/temperature`",
                            tag.pointer
                        ),
                    );
                }
            }
        }
    }
    if let Some(level) = device.device_level {
        let topics = device.topic.iter().map(|t| (at("topic"), t)).chain(
            tags.iter()
                .filter_map(|(p, t)| t.topic.as_ref().map(|x| (format!("{p}.topic"), x))),
        );
        let name = device.device_name.as_deref().unwrap_or(&device.id);
        for (p, t) in topics {
            match t.split('/').nth(level) {
                Some("+") => {}
                Some(l) if l == name => {}
                _ => problems.push(
                    p,
                    format!(
                        "`{t}` has no `+` or `{name}` at level {level} (`device_level`, counted from 0)"
                    ),
                ),
            }
        }
        if name.contains(['/', '+', '#']) {
            problems.push(
                at("device_name"),
                format!("`{name}` contains `/`, `+` or `#`"),
            );
        }
    } else if device.device_name.is_some() {
        problems.push(at("device_name"), "needs `device_level`");
    }
    device.tags = tags.into_iter().map(|(_, t)| t).collect();
    Some(device)
}

fn check_sparkplug_id(problems: &mut Problems, path: &str, id: &str) {
    if id.is_empty() || id.contains(['/', '+', '#']) {
        problems.push(
            path,
            format!(
                "`{id}` is not a Sparkplug id, expected a non-empty name without `/`, `+` or `#`"
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_urls() {
        assert_eq!(
            BrokerAddr::parse("mqtt://10.0.0.5").expect("valid"),
            BrokerAddr {
                host: "10.0.0.5".into(),
                port: 1883,
                tls: false
            }
        );
        assert_eq!(
            BrokerAddr::parse("mqtts://broker.example.com:8884/").expect("valid"),
            BrokerAddr {
                host: "broker.example.com".into(),
                port: 8884,
                tls: true
            }
        );
        assert!(BrokerAddr::parse("tcp://x:1883").is_err());
        assert!(BrokerAddr::parse("mqtt://x:port").is_err());
        assert!(BrokerAddr::parse("mqtt://").is_err());
    }

    const HEAD: &str = "[gateway]\nid = \"gw\"\n[uplink]\nendpoint = \"https://x:1\"\ntoken = \"t\"\n[buffer]\ndir = \"b\"\n";

    fn problems(devices: &str) -> Vec<String> {
        crate::config::Config::parse(&format!("{HEAD}{devices}"), Path::new("/etc/g"))
            .expect_err("rejected")
            .into_iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    #[test]
    fn a_primary_host_is_announced_by_one_sparkplug_device_per_broker() {
        let device = |id: &str, broker: &str, extra: &str| {
            format!(
                "[[devices]]\nid = \"{id}\"\nprotocol = \"mqtt\"\nbroker = \"{broker}\"\n{extra}\n\
                 [[devices.tags]]\nname = \"t\"\ntopic = \"a\"\n"
            )
        };
        let spb = "payload = \"sparkplug\"\ngroup = \"g\"\nedge_node = \"n\"\nprimary_host_id = \"scada\"";
        let p = problems(&format!(
            "{}{}{}{}",
            device("a", "mqtt://x", spb).replace("topic = \"a\"\n", ""),
            device("b", "mqtt://x:1883", spb).replace("topic = \"a\"\n", ""),
            device("c", "mqtt://y", spb)
                .replace("topic = \"a\"\n", "")
                .replace("scada", "a/b"),
            device("d", "mqtt://x", "primary_host_id = \"scada\""),
        ));
        assert_eq!(
            p,
            [
                "devices[2].primary_host_id: `a/b` is not a Sparkplug id, expected a non-empty name without `/`, `+` or `#`",
                "devices[3].primary_host_id: only used with `payload = \"sparkplug\"`",
                "devices[1].primary_host_id: `scada` is already announced by device `a` on this broker; set `primary_host_id` on one device per broker",
            ]
        );
    }

    #[test]
    fn reports_every_mqtt_problem_with_its_key_path() {
        let p = problems(
            "[[devices]]\nid = \"d\"\nprotocol = \"mqtt\"\nbroker = \"tcp://x\"\nqos = 2\n\
             topic = \"a/#/b\"\n[[devices.tags]]\nname = \"t\"\npointer = \"temp\"\n\
             [[devices]]\nid = \"e\"\nprotocol = \"mqtt\"\nbroker = \"mqtt://x\"\ntopic = \"f/+/g\"\n\
             device_level = 0\n[[devices.tags]]\nname = \"t\"\nunit = 3\n",
        );
        assert_eq!(
            p,
            [
                "devices[0].broker: `tcp://x` is not a broker URL, expected `mqtt://host[:port]` or `mqtts://host[:port]`",
                "devices[0].qos: 2 is not supported, expected 0 or 1",
                "devices[0].topic: `a/#/b`: `#` must be a whole level and the last one",
                "devices[0].tags[0].pointer: `temp` is not a JSON pointer, expected e.g. `/temperature`",
                "devices[1].tags[0].unit: invalid type: integer `3`, expected a string",
                "devices[1].topic: `f/+/g` has no `+` or `e` at level 0 (`device_level`, counted from 0)",
            ]
        );
    }

    #[test]
    fn defaults_the_client_id_and_resolves_files() {
        let c = crate::config::Config::parse(
            &format!(
                "{HEAD}[[devices]]\nid = \"d\"\nprotocol = \"mqtt\"\nbroker = \"mqtts://x\"\n\
                 ca_file = \"ca.pem\"\ntopic = \"a\"\n[[devices.tags]]\nname = \"t\"\n"
            ),
            Path::new("/etc/g"),
        )
        .expect("valid");
        let crate::config::DeviceConfig::Mqtt(m) = &c.devices[0] else {
            panic!("mqtt")
        };
        assert_eq!(m.client_id(), "guantong-gw-d");
        assert_eq!(m.ca_file.as_deref(), Some(Path::new("/etc/g/ca.pem")));
        assert_eq!(m.broker_addr().port, 8883);
        let (device, tags) = m.manifest(0);
        assert_eq!(device.endpoint, "mqtts://x a");
        assert_eq!(tags[0].address, "a#");
    }

    #[test]
    fn checks_topic_filters() {
        assert!(check_filter("factory/+/line1/#").is_ok());
        assert!(check_filter("#").is_ok());
        assert!(check_filter("a/#/b").is_err());
        assert!(check_filter("a/b+").is_err());
        assert!(check_filter("").is_err());
    }
}
