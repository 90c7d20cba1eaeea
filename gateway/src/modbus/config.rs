//! Modbus device and tag settings, as written in `[[devices]]` with
//! `protocol = "modbus-tcp"`, `"modbus-rtu"` or `"modbus-rtu-over-tcp"`.
//!
//! The three protocols share one settings type, `ModbusConfig`: only the
//! transport differs (`Transport`), and the keys of the other transports are
//! rejected by name, so a serial key on a TCP device is an error, not ignored.
//!
//! # Addresses
//!
//! A tag's register is written in exactly one of two forms:
//!
//! * `table` + `address` (an integer): `address` is the zero-based offset sent
//!   on the wire. `table = "holding", address = 0` is the first holding
//!   register. With `table`, a number is *always* an offset, even 40001.
//! * `address` alone, in the conventional 1-based notation whose first digit
//!   names the table: 5 digits `0xxxx` coils, `1xxxx` discrete inputs,
//!   `3xxxx` input registers, `4xxxx` holding registers, register part
//!   0001-9999; or 6 digits (`400001`-`465536`) for the full range. The offset
//!   is the register part minus one: `40001` and `"400001"` are holding offset 0.
//!   Coils start with 0, which TOML integers cannot, so write them as strings
//!   (`"00001"`); any conventional address may be a string.
//!
//! Anything else is rejected with a message rather than guessed: a number of
//! fewer than 5 digits without `table`, a leading digit 2 or 5-9, register
//! part 0, or a string with `table`.
//!
//! # Templates
//!
//! `template = "templates/eastron-sdm630.toml"` (relative to the config file)
//! takes the tags of a device model from a template file; the device adds only
//! its connection settings and unit id (and may add tags of its own).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use guantong_proto::v1::{DataType, Device, Tag};
use serde::Deserialize;

use crate::config::{Problems, check_id};

/// One Modbus device (one unit id), validated.
#[derive(Debug, Clone)]
pub struct ModbusConfig {
    pub id: String,
    pub transport: Transport,
    /// Unit identifier (slave id).
    pub unit: u8,
    pub poll_interval: Duration,
    pub timeout: Duration,
    /// Extra attempts after a timeout, while the unit is answering.
    pub retries: u8,
    pub max_gap: u16,
    /// Registers one read may carry (1-125); some devices accept fewer.
    pub max_registers: u16,
    /// Longest wait between polls of a unit that stopped answering, and
    /// between reads of an address it refused.
    pub max_backoff: Duration,
    /// Read device identification (function 43/14) at start-up.
    pub identify: bool,
    pub tags: Vec<ModbusTagConfig>,
    /// Vendor, product code and revision read from the device (function
    /// 43/14) at start-up; empty when it did not answer.
    pub identity: BTreeMap<String, String>,
}

/// How frames reach the device.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// Modbus TCP (MBAP header); one connection per device.
    Tcp { host: String, port: u16 },
    /// RTU frames (with CRC) over a TCP socket, as serial device servers
    /// carry them. Devices with the same host and port share one line.
    RtuOverTcp {
        host: String,
        port: u16,
        inter_frame_delay: Duration,
    },
    /// RTU on a serial port. Devices with the same port share one line.
    Rtu(SerialSettings),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SerialSettings {
    pub path: String,
    pub baud_rate: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
    pub inter_frame_delay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    None,
    Even,
    Odd,
}

impl Transport {
    /// Devices with the same key share one connection and are polled one at
    /// a time. Modbus TCP devices never share: each has its own connection.
    pub fn line_key(&self, device_id: &str) -> String {
        match self {
            Transport::Tcp { .. } => format!("tcp device {device_id}"),
            Transport::RtuOverTcp { host, port, .. } => format!("rtu-over-tcp {host}:{port}"),
            Transport::Rtu(s) => format!("serial {}", s.path),
        }
    }

    pub fn protocol(&self) -> &'static str {
        match self {
            Transport::Tcp { .. } => "modbus-tcp",
            Transport::RtuOverTcp { .. } => "modbus-rtu-over-tcp",
            Transport::Rtu(_) => "modbus-rtu",
        }
    }

    pub fn inter_frame_delay(&self) -> Duration {
        match self {
            Transport::Tcp { .. } => Duration::ZERO,
            Transport::RtuOverTcp {
                inter_frame_delay, ..
            } => *inter_frame_delay,
            Transport::Rtu(s) => s.inter_frame_delay,
        }
    }

    pub fn endpoint(&self) -> String {
        match self {
            Transport::Tcp { host, port } | Transport::RtuOverTcp { host, port, .. } => {
                format!("{host}:{port}")
            }
            Transport::Rtu(s) => format!(
                "{} {} {}{}{}",
                s.path,
                s.baud_rate,
                s.data_bits,
                match s.parity {
                    Parity::None => 'N',
                    Parity::Even => 'E',
                    Parity::Odd => 'O',
                },
                s.stop_bits
            ),
        }
    }
}

/// The device keys as written; turned into `ModbusConfig` by `parse`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    id: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    serial_port: Option<String>,
    #[serde(default)]
    baud_rate: Option<u32>,
    #[serde(default)]
    data_bits: Option<u8>,
    #[serde(default)]
    parity: Option<Parity>,
    #[serde(default)]
    stop_bits: Option<u8>,
    #[serde(default, with = "humantime_serde")]
    inter_frame_delay: Option<Duration>,
    #[serde(default = "default_unit")]
    unit: u8,
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    poll_interval: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_retries")]
    retries: u8,
    #[serde(default = "default_max_gap")]
    max_gap: u16,
    #[serde(default)]
    max_registers: Option<u16>,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    max_backoff: Duration,
    #[serde(default = "default_identify")]
    identify: bool,
    #[serde(default)]
    template: Option<String>,
}

/// One tag, validated; `address` is the zero-based offset in `table`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModbusTagConfig {
    pub name: String,
    pub table: Table,
    pub address: u16,
    pub data_type: ModbusType,
    /// For `bool` in a register table: the bit, 0 = least significant.
    pub bit: Option<u8>,
    /// For `string`: registers (two characters each).
    pub length: u16,
    pub order: WordOrder,
    pub scale: f64,
    pub offset: f64,
    pub unit: String,
    /// Declared valid range of the engineering value; outside it the point is Bad.
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Own poll interval (a poll group); the device's when absent.
    pub interval: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTag {
    name: String,
    #[serde(default)]
    table: Option<Table>,
    address: toml::Value,
    #[serde(rename = "type")]
    data_type: ModbusType,
    #[serde(default)]
    bit: Option<u8>,
    #[serde(default)]
    length: Option<u16>,
    #[serde(default)]
    order: WordOrder,
    #[serde(default = "default_scale")]
    scale: f64,
    #[serde(default)]
    offset: f64,
    #[serde(default)]
    unit: String,
    #[serde(default)]
    min: Option<f64>,
    #[serde(default)]
    max: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
}

/// `[template]` of a template file: what it describes and where the map is from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read for validation; the fields document the file
struct TemplateInfo {
    manufacturer: String,
    model: String,
    /// Manual title and version the register map was taken from.
    manual: String,
    #[serde(default)]
    notes: String,
    /// Registers the model answers in one read, when fewer than 125.
    #[serde(default)]
    max_registers: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    Coil,
    Discrete,
    Input,
    Holding,
}

impl Table {
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::Discrete)
    }
    /// Most items one read request may carry (Modbus application protocol v1.1b3).
    pub fn max_quantity(self) -> u16 {
        if self.is_bits() { 2000 } else { 125 }
    }
    pub fn name(self) -> &'static str {
        match self {
            Table::Coil => "coil",
            Table::Discrete => "discrete",
            Table::Input => "input",
            Table::Holding => "holding",
        }
    }
    /// Leading digit of the conventional notation.
    pub fn digit(self) -> u32 {
        match self {
            Table::Coil => 0,
            Table::Discrete => 1,
            Table::Input => 3,
            Table::Holding => 4,
        }
    }
    /// The conventional 1-based address of `offset` (6 digits when 5 cannot hold it).
    pub fn conventional(self, offset: u16) -> String {
        let n = u32::from(offset) + 1;
        if n <= 9999 {
            format!("{}{n:04}", self.digit())
        } else {
            format!("{}{n:05}", self.digit())
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModbusType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    String,
}

impl ModbusType {
    /// Registers one value occupies (1 for bits; strings: see `ModbusTagConfig::words`).
    pub fn words(self) -> u16 {
        match self {
            ModbusType::Bool | ModbusType::U16 | ModbusType::I16 | ModbusType::String => 1,
            ModbusType::U32 | ModbusType::I32 | ModbusType::F32 => 2,
            ModbusType::U64 | ModbusType::I64 | ModbusType::F64 => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ModbusType::Bool => "bool",
            ModbusType::U16 => "u16",
            ModbusType::I16 => "i16",
            ModbusType::U32 => "u32",
            ModbusType::I32 => "i32",
            ModbusType::U64 => "u64",
            ModbusType::I64 => "i64",
            ModbusType::F32 => "f32",
            ModbusType::F64 => "f64",
            ModbusType::String => "string",
        }
    }
}

/// Order of the bytes of a value, named by where the most significant byte
/// `A` travels: `ABCD` is big-endian (the Modbus default), `CDAB` swaps 16-bit
/// words, `BADC` swaps the bytes inside each word, `DCBA` is little-endian.
/// For 16-bit values and strings only the byte swap inside a word matters
/// (`BADC`/`DCBA` swap, `ABCD`/`CDAB` do not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum WordOrder {
    #[default]
    #[serde(rename = "ABCD", alias = "abcd")]
    Abcd,
    #[serde(rename = "BADC", alias = "badc")]
    Badc,
    #[serde(rename = "CDAB", alias = "cdab")]
    Cdab,
    #[serde(rename = "DCBA", alias = "dcba")]
    Dcba,
}

impl WordOrder {
    pub const ALL: [WordOrder; 4] = [
        WordOrder::Abcd,
        WordOrder::Cdab,
        WordOrder::Badc,
        WordOrder::Dcba,
    ];
    pub fn name(self) -> &'static str {
        match self {
            WordOrder::Abcd => "ABCD",
            WordOrder::Badc => "BADC",
            WordOrder::Cdab => "CDAB",
            WordOrder::Dcba => "DCBA",
        }
    }
}

impl crate::protocol::DeviceProtocol for ModbusConfig {
    fn name(&self) -> &'static str {
        "modbus"
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn tag_count(&self) -> usize {
        self.tags.len()
    }
    /// Devices of one serial line or RTU-over-TCP link share a collector.
    fn collector_key(&self) -> String {
        format!("modbus {}", self.transport.line_key(&self.id))
    }
    fn manifest(&self, device_index: u32) -> (Device, Vec<Tag>) {
        ModbusConfig::manifest(self, device_index)
    }
    /// The slowest poll, plus the timeout of its answer.
    fn stale_after(&self) -> Option<Duration> {
        let slowest = self
            .tags
            .iter()
            .filter_map(|t| t.interval)
            .fold(self.poll_interval, Duration::max);
        Some(slowest + self.timeout)
    }
}

impl ModbusConfig {
    pub fn manifest(&self, device_index: u32) -> (Device, Vec<Tag>) {
        let device = Device {
            id: self.id.clone(),
            protocol: self.transport.protocol().into(),
            endpoint: format!("{} unit {}", self.transport.endpoint(), self.unit),
            identity: self.identity.clone().into_iter().collect(),
        };
        let tags = self
            .tags
            .iter()
            .map(|t| Tag {
                device: device_index,
                name: t.name.clone(),
                address: t.address_text(),
                data_type: t.wire_type() as i32,
                unit: t.unit.clone(),
                interval_ms: t.interval.unwrap_or(self.poll_interval).as_millis() as u64,
            })
            .collect();
        (device, tags)
    }
}

impl ModbusTagConfig {
    /// A tag at `address` of `table` with defaults for everything else.
    pub fn new(name: &str, table: Table, address: u16, data_type: ModbusType) -> ModbusTagConfig {
        ModbusTagConfig {
            name: name.to_string(),
            table,
            address,
            data_type,
            bit: None,
            length: data_type.words(),
            order: WordOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: String::new(),
            min: None,
            max: None,
            interval: None,
        }
    }

    /// Registers (or bits) the tag occupies.
    pub fn words(&self) -> u16 {
        match self.data_type {
            ModbusType::String => self.length,
            t => t.words(),
        }
    }

    /// `holding:0`, `holding:3.15` (a bit), `holding:100+10` (a string of 10 registers).
    pub fn address_text(&self) -> String {
        super::decode::TagReader::new(self).address_text()
    }

    fn scaled(&self) -> bool {
        self.scale != 1.0 || self.offset != 0.0
    }

    /// The type the tag's values travel as (scaled values become doubles).
    pub fn wire_type(&self) -> DataType {
        match self.data_type {
            ModbusType::Bool => DataType::Bool,
            ModbusType::String => DataType::String,
            _ if self.scaled() => DataType::Double,
            ModbusType::U16 | ModbusType::U32 | ModbusType::U64 => DataType::Uint,
            ModbusType::I16 | ModbusType::I32 | ModbusType::I64 => DataType::Int,
            ModbusType::F32 | ModbusType::F64 => DataType::Double,
        }
    }
}

fn default_port() -> u16 {
    502
}
fn default_unit() -> u8 {
    1
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}
/// No retries by default: on a shared line every retry of a silent unit is
/// time the others wait.
fn default_retries() -> u8 {
    0
}
fn default_max_gap() -> u16 {
    16
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}
fn default_identify() -> bool {
    true
}
fn default_scale() -> f64 {
    1.0
}
fn default_baud_rate() -> u32 {
    9600
}
/// Default gap between frames on a serial device server's line.
fn default_rtu_over_tcp_delay() -> Duration {
    Duration::from_millis(5)
}

/// The RTU silent interval: 3.5 character times (11 bits each), and at
/// least 1.75 ms as the specification fixes it above 19200 baud.
pub fn rtu_silent_interval(baud_rate: u32) -> Duration {
    let secs = 3.5 * 11.0 / f64::from(baud_rate.max(1));
    Duration::from_secs_f64(secs).max(Duration::from_micros(1750))
}

/// Parses one Modbus device (its `protocol` key already removed), recording
/// problems under `path`. `base_dir` resolves template paths.
pub(crate) fn parse(
    path: &str,
    protocol: &str,
    mut table: toml::Table,
    base_dir: &Path,
    problems: &mut Problems,
) -> Option<ModbusConfig> {
    let raw_tags = table.remove("tags");
    let raw = problems.parse::<RawDevice>(path, toml::Value::Table(table));
    // (key path, tag): template tags are named by the `template` key.
    let mut tags = Vec::new();
    let template = raw.as_ref().and_then(|r| r.template.clone());
    let mut template_max_registers = None;
    if let Some(t) = &template {
        let (info, template_tags) = load_template(path, t, base_dir, problems);
        template_max_registers = info.and_then(|i| i.max_registers);
        tags.extend(
            template_tags
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
    // Before anything that may end the parse early, so a duplicate is
    // reported whatever else is wrong with the device.
    let mut names = HashSet::new();
    for (tag_path, tag) in &tags {
        if !names.insert(tag.name.clone()) {
            problems.push(
                format!("{tag_path}.name"),
                format!("duplicate tag name `{}`", tag.name),
            );
        }
    }
    let tags: Vec<_> = tags.into_iter().map(|(_, tag)| tag).collect();
    let raw = raw?;
    check_id(problems, &format!("{path}.id"), &raw.id);
    let transport = transport(path, protocol, &raw, problems)?;
    if raw.poll_interval < Duration::from_millis(10) {
        problems.push(format!("{path}.poll_interval"), "expected at least 10ms");
    }
    if raw.timeout.is_zero() {
        problems.push(format!("{path}.timeout"), "expected more than 0s");
    }
    if raw.max_backoff < raw.poll_interval {
        problems.push(
            format!("{path}.max_backoff"),
            "expected at least the poll_interval",
        );
    }
    if matches!(transport, Transport::Rtu(_) | Transport::RtuOverTcp { .. }) && raw.unit == 0 {
        problems.push(
            format!("{path}.unit"),
            "0 is the RTU broadcast address, which never answers; expected 1-247",
        );
    }
    let max_registers = raw.max_registers.or(template_max_registers).unwrap_or(125);
    if !(1..=125).contains(&max_registers) {
        problems.push(format!("{path}.max_registers"), "expected 1-125");
    }
    Some(ModbusConfig {
        id: raw.id,
        transport,
        unit: raw.unit,
        poll_interval: raw.poll_interval,
        timeout: raw.timeout,
        retries: raw.retries,
        max_gap: raw.max_gap,
        max_registers,
        max_backoff: raw.max_backoff,
        identify: raw.identify,
        tags,
        identity: BTreeMap::new(),
    })
}

fn transport(
    path: &str,
    protocol: &str,
    raw: &RawDevice,
    problems: &mut Problems,
) -> Option<Transport> {
    let serial_keys = [
        ("serial_port", raw.serial_port.is_some()),
        ("baud_rate", raw.baud_rate.is_some()),
        ("data_bits", raw.data_bits.is_some()),
        ("parity", raw.parity.is_some()),
        ("stop_bits", raw.stop_bits.is_some()),
    ];
    let network_keys = [("host", raw.host.is_some()), ("port", raw.port.is_some())];
    let forbid = |keys: &[(&str, bool)], problems: &mut Problems| {
        for (key, present) in keys {
            if *present {
                problems.push(
                    format!("{path}.{key}"),
                    format!("`{key}` does not apply to protocol `{protocol}`"),
                );
            }
        }
    };
    let host = |problems: &mut Problems| match &raw.host {
        Some(h) if !h.trim().is_empty() => Some(h.clone()),
        Some(_) => {
            problems.push(
                format!("{path}.host"),
                "is empty, expected a host name or IP address",
            );
            None
        }
        None => {
            problems.push(path, "missing field `host`");
            None
        }
    };
    match protocol {
        "modbus-tcp" => {
            forbid(&serial_keys, problems);
            if raw.inter_frame_delay.is_some() {
                forbid(&[("inter_frame_delay", true)], problems);
            }
            Some(Transport::Tcp {
                host: host(problems)?,
                port: raw.port.unwrap_or_else(default_port),
            })
        }
        "modbus-rtu-over-tcp" => {
            forbid(&serial_keys, problems);
            Some(Transport::RtuOverTcp {
                host: host(problems)?,
                port: raw.port.unwrap_or_else(default_port),
                inter_frame_delay: raw
                    .inter_frame_delay
                    .unwrap_or_else(default_rtu_over_tcp_delay),
            })
        }
        _ => {
            forbid(&network_keys, problems);
            let Some(port) = raw.serial_port.clone().filter(|p| !p.trim().is_empty()) else {
                problems.push(
                    path,
                    "missing field `serial_port`, expected e.g. \"/dev/ttyUSB0\"",
                );
                return None;
            };
            let baud_rate = raw.baud_rate.unwrap_or_else(default_baud_rate);
            if !(300..=4_000_000).contains(&baud_rate) {
                problems.push(format!("{path}.baud_rate"), "expected 300 to 4000000 baud");
            }
            let data_bits = raw.data_bits.unwrap_or(8);
            if !(5..=8).contains(&data_bits) {
                problems.push(format!("{path}.data_bits"), "expected 5, 6, 7 or 8");
            }
            let stop_bits = raw.stop_bits.unwrap_or(1);
            if !(1..=2).contains(&stop_bits) {
                problems.push(format!("{path}.stop_bits"), "expected 1 or 2");
            }
            Some(Transport::Rtu(SerialSettings {
                path: port,
                baud_rate,
                data_bits,
                parity: raw.parity.unwrap_or(Parity::None),
                stop_bits,
                inter_frame_delay: raw
                    .inter_frame_delay
                    .unwrap_or_else(|| rtu_silent_interval(baud_rate)),
            }))
        }
    }
}

fn load_template(
    path: &str,
    file: &str,
    base_dir: &Path,
    problems: &mut Problems,
) -> (Option<TemplateInfo>, Vec<ModbusTagConfig>) {
    let key = format!("{path}.template");
    let full = base_dir.join(file);
    let text = match std::fs::read_to_string(&full) {
        Ok(t) => t,
        Err(e) => {
            problems.push(key, format!("cannot read {}: {e}", full.display()));
            return (None, Vec::new());
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
            return (None, Vec::new());
        }
    };
    let at = format!("{path}.template({file})");
    let info = match root.remove("template") {
        Some(v) => problems.parse::<TemplateInfo>(&format!("{at}.template"), v),
        None => {
            problems.push(
                &at,
                "missing section `[template]` (manufacturer, model, manual)",
            );
            None
        }
    };
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
    (info, tags)
}

/// Resolves `table` + `address` into (table, zero-based offset); see the
/// module documentation for the rules.
pub fn resolve_address(
    table: Option<Table>,
    address: &toml::Value,
) -> Result<(Table, u16), String> {
    match (table, address) {
        (Some(t), toml::Value::Integer(n)) => u16::try_from(*n).map(|a| (t, a)).map_err(|_| {
            format!(
                "{n} is not a zero-based offset 0-65535; with `table` the address is the offset sent on the wire (a conventional address like 40001 goes without `table`)"
            )
        }),
        (Some(_), toml::Value::String(s)) => Err(format!(
            "\"{s}\": with `table`, `address` is a zero-based offset (an integer); write a conventional address like \"40001\" without `table`"
        )),
        (None, toml::Value::Integer(n)) => conventional(&n.to_string()),
        (None, toml::Value::String(s)) => conventional(s.trim()),
        (_, other) => Err(format!(
            "invalid type: {}, expected an integer or a string",
            other.type_str()
        )),
    }
}

/// Parses the conventional 1-based notation (`40001`, `"00001"`, `400001`).
pub fn conventional(s: &str) -> Result<(Table, u16), String> {
    let ambiguous = || {
        format!(
            "`{s}` is ambiguous without `table`: give `table` and a zero-based offset, or a 5- or 6-digit conventional address (40001 = holding offset 0)"
        )
    };
    if !s.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "`{s}` is not an address: expected digits, e.g. 40001"
        ));
    }
    if s.len() < 5 || s.len() > 6 {
        return Err(ambiguous());
    }
    let table = match s.as_bytes()[0] {
        b'0' => Table::Coil,
        b'1' => Table::Discrete,
        b'3' => Table::Input,
        b'4' => Table::Holding,
        d => {
            return Err(format!(
                "`{s}`: leading digit {} names no table; expected 0 (coil), 1 (discrete input), 3 (input register) or 4 (holding register)",
                char::from(d)
            ));
        }
    };
    let register: u32 = s[1..].parse().map_err(|_| ambiguous())?;
    if register == 0 || register > 65536 {
        return Err(format!(
            "`{s}`: register number {register} is outside 1-{}; conventional addresses count from 1",
            if s.len() == 5 { 9999 } else { 65536 }
        ));
    }
    Ok((table, (register - 1) as u16))
}

fn check_tag(path: &str, raw: RawTag, problems: &mut Problems) -> Option<ModbusTagConfig> {
    let before = problems.len();
    check_id(problems, &format!("{path}.name"), &raw.name);
    let (table, address) = match resolve_address(raw.table, &raw.address) {
        Ok(a) => a,
        Err(e) => {
            problems.push(format!("{path}.address"), e);
            return None;
        }
    };
    let mut tag = ModbusTagConfig::new(&raw.name, table, address, raw.data_type);
    tag.bit = raw.bit;
    tag.order = raw.order;
    tag.scale = raw.scale;
    tag.offset = raw.offset;
    tag.unit = raw.unit;
    tag.min = raw.min;
    tag.max = raw.max;
    tag.interval = raw.interval;
    let ty = raw.data_type;
    if table.is_bits() && ty != ModbusType::Bool {
        problems.push(
            format!("{path}.type"),
            format!(
                "table `{}` holds single bits, expected `bool`",
                table.name()
            ),
        );
    }
    match (ty, raw.bit) {
        (ModbusType::Bool, None) if !table.is_bits() => problems.push(
            format!("{path}.bit"),
            format!(
                "`bool` in table `{}` needs `bit` (0-15, 0 = least significant) to pick one bit of the register",
                table.name()
            ),
        ),
        (ModbusType::Bool, Some(_)) if table.is_bits() => problems.push(
            format!("{path}.bit"),
            format!("table `{}` holds single bits; `bit` applies to register tables", table.name()),
        ),
        (ModbusType::Bool, Some(b)) if b > 15 => {
            problems.push(format!("{path}.bit"), "expected 0-15")
        }
        (_, Some(_)) if ty != ModbusType::Bool => problems.push(
            format!("{path}.bit"),
            "`bit` applies to type `bool` only",
        ),
        _ => {}
    }
    match (ty, raw.length) {
        (ModbusType::String, Some(n)) if (1..=125).contains(&n) => tag.length = n,
        (ModbusType::String, Some(_)) => {
            problems.push(format!("{path}.length"), "expected 1-125 registers")
        }
        (ModbusType::String, None) => problems.push(
            format!("{path}.length"),
            "type `string` needs `length`, in registers (two characters each)",
        ),
        (_, Some(_)) => problems.push(
            format!("{path}.length"),
            "`length` applies to type `string` only",
        ),
        _ => {}
    }
    let end = u32::from(address) + u32::from(tag.words());
    if end > 65536 {
        problems.push(
            format!("{path}.address"),
            format!(
                "{} registers from offset {address} run past the last offset 65535",
                tag.words()
            ),
        );
    }
    if !tag.scale.is_finite() || tag.scale == 0.0 {
        problems.push(
            format!("{path}.scale"),
            "expected a finite, non-zero number",
        );
    }
    if !tag.offset.is_finite() {
        problems.push(format!("{path}.offset"), "expected a finite number");
    }
    let numeric = !matches!(ty, ModbusType::Bool | ModbusType::String);
    for (key, v) in [("min", tag.min), ("max", tag.max)] {
        if let Some(v) = v {
            if !numeric {
                problems.push(
                    format!("{path}.{key}"),
                    format!("a valid range applies to numbers, not `{}`", ty.name()),
                );
            } else if !v.is_finite() {
                problems.push(format!("{path}.{key}"), "expected a finite number");
            }
        }
    }
    if let (Some(lo), Some(hi)) = (tag.min, tag.max)
        && lo > hi
    {
        problems.push(format!("{path}.max"), format!("{hi} is below min {lo}"));
    }
    if !numeric && tag.scaled() {
        problems.push(
            format!("{path}.scale"),
            format!("scale and offset apply to numbers, not `{}`", ty.name()),
        );
    }
    if let Some(i) = tag.interval
        && i < Duration::from_millis(10)
    {
        problems.push(format!("{path}.interval"), "expected at least 10ms");
    }
    (problems.len() == before).then_some(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conventional_addresses_name_table_and_offset() {
        for (text, table, offset) in [
            ("40001", Table::Holding, 0),
            ("49999", Table::Holding, 9998),
            ("400001", Table::Holding, 0),
            ("465536", Table::Holding, 65535),
            ("30001", Table::Input, 0),
            ("310001", Table::Input, 10000),
            ("10001", Table::Discrete, 0),
            ("00001", Table::Coil, 0),
            ("000100", Table::Coil, 99),
        ] {
            assert_eq!(conventional(text), Ok((table, offset)), "{text}");
        }
        for bad in ["1", "4001", "40000", "20001", "465537", "4000001", "4x001"] {
            assert!(conventional(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn table_and_offset_take_the_number_as_is() {
        let v = |n: i64| toml::Value::Integer(n);
        assert_eq!(
            resolve_address(Some(Table::Holding), &v(40001)),
            Ok((Table::Holding, 40001))
        );
        assert_eq!(resolve_address(None, &v(40001)), Ok((Table::Holding, 0)));
        assert!(resolve_address(None, &v(7)).is_err());
        assert!(resolve_address(Some(Table::Input), &v(70000)).is_err());
        assert!(resolve_address(Some(Table::Input), &toml::Value::String("30001".into())).is_err());
        assert_eq!(
            resolve_address(None, &toml::Value::String("00017".into())),
            Ok((Table::Coil, 16))
        );
    }

    #[test]
    fn conventional_text_round_trips() {
        assert_eq!(Table::Holding.conventional(0), "40001");
        assert_eq!(Table::Coil.conventional(9), "00010");
        assert_eq!(Table::Input.conventional(10000), "310001");
        for t in [Table::Coil, Table::Discrete, Table::Input, Table::Holding] {
            for o in [0u16, 9998, 9999, 65535] {
                assert_eq!(conventional(&t.conventional(o)), Ok((t, o)));
            }
        }
    }

    #[test]
    fn silent_interval_follows_baud_rate() {
        assert_eq!(rtu_silent_interval(9600).as_micros(), 4010);
        assert_eq!(rtu_silent_interval(115_200), Duration::from_micros(1750));
    }
}
