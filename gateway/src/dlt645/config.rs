//! DL/T 645 meter and tag settings, as written in `[[devices]]` with
//! `protocol = "dlt645"`.
//!
//! Transport by keys, as for Modbus RTU: `serial_port` (with `baud_rate`,
//! default 2400, and `parity`, default even; 8 data bits, 1 stop bit) for
//! RS-485, or `host` + `port` for a serial device server. Meters on one
//! port (or one server) share a line. `meter` is the meter's 12-digit
//! address; each tag names its data identifier as 8 hex digits
//! (`di = "02010100"`). A DI the gateway knows (`di::known`) needs nothing
//! else; any other needs `length` (data bytes) and may give `scale`,
//! `signed` and `format`. `template` takes tags from a template file, as for
//! Modbus.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use guantong_proto::v1::{DataType, Device, Tag};
use serde::Deserialize;

use super::di::{self, Format, Reading};
use super::frame::{Address, BROADCAST};
use crate::config::{Problems, check_id};
use crate::modbus::config::{Parity, SerialSettings, rtu_silent_interval};

/// One meter, validated.
#[derive(Debug, Clone)]
pub struct Dlt645Config {
    pub id: String,
    pub transport: Dlt645Transport,
    pub meter: Address,
    pub poll_interval: Duration,
    pub timeout: Duration,
    /// Longest wait between probes of a meter that stopped answering.
    pub max_backoff: Duration,
    pub tags: Vec<Dlt645TagConfig>,
    /// What the meter said of itself (filled at identification).
    pub identity: BTreeMap<String, String>,
}

/// How frames reach the meters.
#[derive(Debug, Clone, PartialEq)]
pub enum Dlt645Transport {
    /// RS-485 on a serial port (8 data bits, 1 stop bit).
    Serial(SerialSettings),
    /// Through a serial device server.
    Tcp {
        host: String,
        port: u16,
        inter_frame_delay: Duration,
    },
}

impl Dlt645Transport {
    /// Meters with the same key share one line. A serial port's key is the
    /// one Modbus RTU uses, so that `check` can refuse a port claimed by both.
    pub fn line_key(&self) -> String {
        match self {
            Dlt645Transport::Serial(s) => format!("serial {}", s.path),
            Dlt645Transport::Tcp { host, port, .. } => format!("tcp {host}:{port}"),
        }
    }

    pub fn inter_frame_delay(&self) -> Duration {
        match self {
            Dlt645Transport::Serial(s) => s.inter_frame_delay,
            Dlt645Transport::Tcp {
                inter_frame_delay, ..
            } => *inter_frame_delay,
        }
    }

    /// Line speed, when known (serial): sizes the shortest probe timeout.
    pub fn baud_rate(&self) -> Option<u32> {
        match self {
            Dlt645Transport::Serial(s) => Some(s.baud_rate),
            Dlt645Transport::Tcp { .. } => None,
        }
    }

    pub fn endpoint(&self) -> String {
        match self {
            Dlt645Transport::Serial(s) => format!(
                "{} {} 8{}1",
                s.path,
                s.baud_rate,
                match s.parity {
                    Parity::None => 'N',
                    Parity::Even => 'E',
                    Parity::Odd => 'O',
                }
            ),
            Dlt645Transport::Tcp { host, port, .. } => format!("{host}:{port}"),
        }
    }
}

/// One tag: a data identifier and how its value reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Dlt645TagConfig {
    pub name: String,
    pub di: u32,
    pub reading: Reading,
    pub unit: String,
}

impl Dlt645TagConfig {
    pub fn wire_type(&self) -> DataType {
        match self.reading.format {
            Format::Number => DataType::Double,
            _ => DataType::String,
        }
    }
}

fn default_poll() -> Duration {
    Duration::from_secs(5)
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}
fn default_baud_rate() -> u32 {
    2400
}
/// Default gap between frames through a serial device server.
fn default_tcp_delay() -> Duration {
    Duration::from_millis(5)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    id: String,
    meter: String,
    #[serde(default)]
    serial_port: Option<String>,
    #[serde(default)]
    baud_rate: Option<u32>,
    #[serde(default)]
    parity: Option<Parity>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default, with = "humantime_serde")]
    inter_frame_delay: Option<Duration>,
    #[serde(default = "default_poll", with = "humantime_serde")]
    poll_interval: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    max_backoff: Duration,
    #[serde(default)]
    template: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTag {
    name: String,
    di: String,
    #[serde(default)]
    length: Option<u8>,
    #[serde(default)]
    scale: Option<f64>,
    #[serde(default)]
    signed: Option<bool>,
    #[serde(default)]
    format: Option<Format>,
    #[serde(default)]
    unit: Option<String>,
}

/// `[template]` of a template file: what it describes and where from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read for validation; the fields document the file
struct TemplateInfo {
    manufacturer: String,
    model: String,
    /// The standard or manual the identifiers were taken from.
    manual: String,
    #[serde(default)]
    notes: String,
}

impl crate::protocol::DeviceProtocol for Dlt645Config {
    fn name(&self) -> &'static str {
        "dlt645"
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn tag_count(&self) -> usize {
        self.tags.len()
    }
    /// Meters of one port or one serial device server share a collector.
    fn collector_key(&self) -> String {
        format!("dlt645 {}", self.transport.line_key())
    }
    fn manifest(&self, device_index: u32) -> (Device, Vec<Tag>) {
        let device = Device {
            id: self.id.clone(),
            protocol: "dlt645".into(),
            endpoint: format!("{} meter {}", self.transport.endpoint(), self.meter),
            identity: self.identity.clone().into_iter().collect(),
        };
        let tags = self
            .tags
            .iter()
            .map(|t| Tag {
                device: device_index,
                name: t.name.clone(),
                address: format!("{:08X}", t.di),
                data_type: t.wire_type() as i32,
                unit: t.unit.clone(),
                interval_ms: self.poll_interval.as_millis() as u64,
            })
            .collect();
        (device, tags)
    }
    /// One poll plus the timeout of its answer.
    fn stale_after(&self) -> Option<Duration> {
        Some(self.poll_interval + self.timeout)
    }
}

/// Parses one meter (its `protocol` key already removed).
pub(crate) fn parse(
    path: &str,
    mut table: toml::Table,
    base_dir: &Path,
    problems: &mut Problems,
) -> Option<Dlt645Config> {
    let raw_tags = table.remove("tags");
    let raw = problems.parse::<RawDevice>(path, toml::Value::Table(table));
    let mut tags: Vec<(String, Dlt645TagConfig)> = Vec::new();
    let template = raw.as_ref().and_then(|r| r.template.clone());
    if let Some(t) = &template {
        tags.extend(
            load_template(path, t, base_dir, problems)
                .into_iter()
                .map(|tag| (format!("{path}.template"), tag)),
        );
    }
    match raw_tags {
        None if template.is_some() => {}
        None => problems.push(
            path,
            "missing field `tags`, expected at least one `[[devices.tags]]` or a `template`",
        ),
        Some(value) => tags.extend(problems.parse_tags::<RawTag, _>(path, value, |p, raw, pr| {
            check_tag(p, raw, pr).map(|tag| (p.to_string(), tag))
        })),
    }
    let mut names = HashSet::new();
    for (tag_path, tag) in &tags {
        if !names.insert(tag.name.clone()) {
            problems.push(
                format!("{tag_path}.name"),
                format!("duplicate tag name `{}`", tag.name),
            );
        }
    }
    let raw = raw?;
    let at = |key: &str| format!("{path}.{key}");
    check_id(problems, &at("id"), &raw.id);
    let meter = match Address::parse(&raw.meter) {
        Ok(a) if a == BROADCAST => {
            problems.push(
                at("meter"),
                "AAAAAAAAAAAA is the broadcast address, for finding a lone meter's address (`guantong-gateway probe dlt645 ... read-address`); give the meter's own",
            );
            a
        }
        Ok(a) => a,
        Err(e) => {
            problems.push(at("meter"), e);
            BROADCAST
        }
    };
    let transport = transport(path, &raw, problems)?;
    if raw.poll_interval < Duration::from_millis(10) {
        problems.push(at("poll_interval"), "expected at least 10ms");
    }
    if raw.timeout.is_zero() {
        problems.push(at("timeout"), "expected more than 0s");
    }
    if raw.max_backoff < raw.poll_interval {
        problems.push(at("max_backoff"), "expected at least the poll_interval");
    }
    Some(Dlt645Config {
        id: raw.id,
        transport,
        meter,
        poll_interval: raw.poll_interval,
        timeout: raw.timeout,
        max_backoff: raw.max_backoff,
        tags: tags.into_iter().map(|(_, t)| t).collect(),
        identity: BTreeMap::new(),
    })
}

fn transport(path: &str, raw: &RawDevice, problems: &mut Problems) -> Option<Dlt645Transport> {
    let at = |key: &str| format!("{path}.{key}");
    match (&raw.serial_port, &raw.host) {
        (Some(_), Some(_)) => {
            problems.push(
                path,
                "give either `serial_port` (RS-485) or `host` and `port` (a serial device server), not both",
            );
            None
        }
        (None, None) => {
            problems.push(
                path,
                "missing field `serial_port` (e.g. \"/dev/ttyUSB0\") or `host` and `port` (a serial device server)",
            );
            None
        }
        (Some(port), None) => {
            if raw.port.is_some() {
                problems.push(
                    at("port"),
                    "`port` goes with `host`; a serial line has `serial_port`",
                );
            }
            if port.trim().is_empty() {
                problems.push(
                    at("serial_port"),
                    "is empty, expected e.g. \"/dev/ttyUSB0\"",
                );
            }
            let baud_rate = raw.baud_rate.unwrap_or_else(default_baud_rate);
            if !(300..=115_200).contains(&baud_rate) {
                problems.push(
                    at("baud_rate"),
                    "expected 300 to 115200 baud (meters use 1200, 2400, 4800 or 9600)",
                );
            }
            Some(Dlt645Transport::Serial(SerialSettings {
                path: port.clone(),
                baud_rate,
                data_bits: 8,
                parity: raw.parity.unwrap_or(Parity::Even),
                stop_bits: 1,
                inter_frame_delay: raw
                    .inter_frame_delay
                    .unwrap_or_else(|| rtu_silent_interval(baud_rate)),
            }))
        }
        (None, Some(host)) => {
            for (key, present) in [
                ("baud_rate", raw.baud_rate.is_some()),
                ("parity", raw.parity.is_some()),
            ] {
                if present {
                    problems.push(
                        at(key),
                        format!(
                            "`{key}` is set on the serial device server, not here (`host` given)"
                        ),
                    );
                }
            }
            if host.trim().is_empty() {
                problems.push(at("host"), "is empty, expected a host name or IP address");
            }
            let Some(port) = raw.port else {
                problems.push(
                    path,
                    "missing field `port` (the serial device server's TCP port)",
                );
                return None;
            };
            Some(Dlt645Transport::Tcp {
                host: host.clone(),
                port,
                inter_frame_delay: raw.inter_frame_delay.unwrap_or_else(default_tcp_delay),
            })
        }
    }
}

/// Parses a DI written as 8 hex digits.
pub fn parse_di(text: &str) -> Result<u32, String> {
    let t = text.trim();
    if t.len() != 8 || !t.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "`{text}`: expected the data identifier as 8 hex digits DI3 DI2 DI1 DI0, e.g. \"02010100\" (phase A voltage)"
        ));
    }
    u32::from_str_radix(t, 16).map_err(|e| format!("`{text}`: {e}"))
}

fn check_tag(path: &str, raw: RawTag, problems: &mut Problems) -> Option<Dlt645TagConfig> {
    let before = problems.len();
    let at = |key: &str| format!("{path}.{key}");
    check_id(problems, &at("name"), &raw.name);
    let di = match parse_di(&raw.di) {
        Ok(d) => d,
        Err(e) => {
            problems.push(at("di"), e);
            return None;
        }
    };
    let known = di::known(di);
    let Some(length) = raw.length.or(known.as_ref().map(|k| k.length)) else {
        problems.push(
            at("length"),
            format!(
                "DI {di:08X} is not one the gateway knows: give `length` (its data bytes after the DI) and, for a number, `scale` (e.g. 0.01 for XXXXXX.XX)"
            ),
        );
        return None;
    };
    let format = raw
        .format
        .or(known.as_ref().map(|k| k.format))
        .unwrap_or(Format::Number);
    let scale = raw.scale.unwrap_or_else(|| match &known {
        Some(k) => 10f64.powi(-i32::from(k.decimals)),
        None => 1.0,
    });
    let signed = raw
        .signed
        .unwrap_or_else(|| known.as_ref().is_some_and(|k| k.signed));
    let max = match format {
        Format::Number => 8,
        Format::Date => 4,
        Format::Time => 3,
        Format::Digits => 9,
    };
    let exact = matches!(format, Format::Date | Format::Time);
    if length == 0 || length > max || (exact && length != max) {
        problems.push(
            at("length"),
            if exact {
                format!("a `{}` is {max} bytes", format.name())
            } else {
                format!("expected 1 to {max} bytes for a `{}`", format.name())
            },
        );
    }
    if format != Format::Number && (raw.scale.is_some() || raw.signed.is_some()) {
        problems.push(
            at("scale"),
            format!(
                "`scale` and `signed` apply to numbers, not a `{}`",
                format.name()
            ),
        );
    }
    if !scale.is_finite() || scale == 0.0 {
        problems.push(at("scale"), "expected a finite, non-zero number");
    }
    let unit = raw.unit.unwrap_or_else(|| {
        known
            .as_ref()
            .map(|k| k.unit.to_string())
            .unwrap_or_default()
    });
    (problems.len() == before).then_some(Dlt645TagConfig {
        name: raw.name,
        di,
        reading: Reading {
            length,
            format,
            signed,
            scale,
        },
        unit,
    })
}

fn load_template(
    path: &str,
    file: &str,
    base_dir: &Path,
    problems: &mut Problems,
) -> Vec<Dlt645TagConfig> {
    let key = format!("{path}.template");
    let full = base_dir.join(file);
    let text = match std::fs::read_to_string(&full) {
        Ok(t) => t,
        Err(e) => {
            problems.push(key, format!("cannot read {}: {e}", full.display()));
            return Vec::new();
        }
    };
    let mut root: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            let e: toml::de::Error = e;
            problems.push(
                key,
                format!("{} is not valid TOML: {}", full.display(), e.message()),
            );
            return Vec::new();
        }
    };
    let at = format!("{path}.template({file})");
    match root.remove("template") {
        Some(v) => {
            problems.parse::<TemplateInfo>(&format!("{at}.template"), v);
        }
        None => problems.push(
            &at,
            "missing section `[template]` (manufacturer, model, manual)",
        ),
    }
    let tags = match root.remove("tags") {
        Some(v) => problems.parse_tags::<RawTag, _>(&at, v, check_tag),
        None => {
            problems.push(&at, "missing `[[tags]]`");
            Vec::new()
        }
    };
    for k in root.keys() {
        problems.push(
            format!("{at}.{k}"),
            format!("unknown key `{k}`, expected `template` or `tags`"),
        );
    }
    tags
}

/// Checks that meters sharing a line agree on its settings and addresses,
/// and that no port (or serial device server) is claimed by a Modbus line
/// as well: one task owns a line.
pub(crate) fn check_lines(devices: &[crate::protocol::DeviceConfig], problems: &mut Problems) {
    use crate::modbus::config::Transport;
    use crate::protocol::DeviceConfig;
    let mut modbus: BTreeMap<String, usize> = BTreeMap::new();
    for (i, d) in devices.iter().enumerate() {
        #[allow(irrefutable_let_patterns)]
        let DeviceConfig::Modbus(c) = d else {
            continue;
        };
        let key = match &c.transport {
            Transport::Rtu(s) => format!("serial {}", s.path),
            Transport::RtuOverTcp { host, port, .. } | Transport::Tcp { host, port } => {
                format!("tcp {host}:{port}")
            }
        };
        modbus.entry(key).or_insert(i);
    }
    let mut seen: BTreeMap<String, (usize, &Dlt645Transport, Vec<Address>)> = BTreeMap::new();
    for (i, d) in devices.iter().enumerate() {
        let DeviceConfig::Dlt645(c) = d else {
            continue;
        };
        let key = c.transport.line_key();
        if let Some(m) = modbus.get(&key) {
            problems.push(
                format!("devices[{i}]"),
                format!(
                    "{key} is also used by Modbus device devices[{m}]: one line has one owner; put DL/T 645 meters and Modbus devices on separate ports"
                ),
            );
        }
        match seen.get_mut(&key) {
            None => {
                seen.insert(key, (i, &c.transport, vec![c.meter]));
            }
            Some((first, transport, meters)) => {
                if *transport != &c.transport {
                    problems.push(
                        format!("devices[{i}]"),
                        format!(
                            "shares {key} with devices[{first}] but not its line settings (baud_rate, parity, inter_frame_delay must match)"
                        ),
                    );
                }
                if meters.contains(&c.meter) {
                    problems.push(
                        format!("devices[{i}].meter"),
                        format!("meter {} is already on {key}", c.meter),
                    );
                }
                meters.push(c.meter);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> (Option<Dlt645Config>, Vec<String>) {
        let mut problems = Problems::default();
        let table: toml::Table = text.parse().expect("toml");
        let c = parse("devices[0]", table, Path::new("."), &mut problems);
        let found = problems
            .0
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect();
        (c, found)
    }

    #[test]
    fn known_identifiers_need_nothing_but_the_di() {
        let (c, problems) = parse_text(
            "id = \"m1\"\nmeter = \"000000000001\"\nserial_port = \"/dev/ttyUSB0\"\n[[tags]]\nname = \"ua\"\ndi = \"02010100\"\n[[tags]]\nname = \"custom\"\ndi = \"04000409\"\nlength = 3\nscale = 0.01\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        let c = c.expect("parsed");
        assert_eq!(c.meter.0, [1, 0, 0, 0, 0, 0]);
        let Dlt645Transport::Serial(s) = &c.transport else {
            panic!("serial expected")
        };
        assert_eq!((s.baud_rate, s.parity), (2400, Parity::Even));
        assert_eq!(c.tags[0].reading.length, 2);
        assert_eq!(c.tags[0].unit, "V");
        assert_eq!(c.tags[1].reading.scale, 0.01);
    }

    #[test]
    fn mistakes_are_named_with_their_path() {
        let (_, problems) = parse_text(
            "id = \"m1\"\nmeter = \"12345\"\nhost = \"10.0.0.5\"\nport = 4001\nbaud_rate = 2400\n[[tags]]\nname = \"x\"\ndi = \"0201010\"\n[[tags]]\nname = \"y\"\ndi = \"04000409\"\n[[tags]]\nname = \"t\"\ndi = \"04000102\"\nscale = 2.0\n",
        );
        let text = problems.join("\n");
        for expected in [
            "devices[0].meter: `12345`: expected the meter's 12-digit address",
            "devices[0].baud_rate: `baud_rate` is set on the serial device server",
            "devices[0].tags[0].di: `0201010`: expected the data identifier as 8 hex digits",
            "devices[0].tags[1].length: DI 04000409 is not one the gateway knows",
            "devices[0].tags[2].scale: `scale` and `signed` apply to numbers, not a `time`",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        let (_, problems) = parse_text(
            "id = \"m\"\nmeter = \"AAAAAAAAAAAA\"\n[[tags]]\nname = \"x\"\ndi = \"02010100\"\n",
        );
        let text = problems.join("\n");
        assert!(
            text.contains("devices[0].meter: AAAAAAAAAAAA is the broadcast address"),
            "{text}"
        );
        assert!(text.contains("missing field `serial_port`"), "{text}");
    }
}
