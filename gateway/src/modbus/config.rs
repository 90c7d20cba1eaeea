//! Modbus device and tag settings, as written in `[[devices]]` with
//! `protocol = "modbus-tcp"`.
//!
//! Addresses are zero-based offsets into the named table (`table = "holding"`,
//! `address = 0` is the first holding register, conventionally written 40001).

use std::collections::HashSet;
use std::time::Duration;

use guantong_proto::v1::{DataType, Device, Tag};
use serde::Deserialize;

use crate::config::{Problems, check_id};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusTcpConfig {
    pub id: String,
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Unit identifier (slave id).
    #[serde(default = "default_unit")]
    pub unit: u8,
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Per request; a request that takes longer marks its points Bad and the
    /// connection is rebuilt.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Unused registers (or bits) a merged request may read across.
    #[serde(default = "default_max_gap")]
    pub max_gap: u16,
    #[serde(skip)]
    pub tags: Vec<ModbusTagConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusTagConfig {
    pub name: String,
    pub table: Table,
    /// Zero-based offset into `table`.
    pub address: u16,
    #[serde(rename = "type")]
    pub data_type: ModbusType,
    /// Byte and word order of multi-register values.
    #[serde(default)]
    pub order: WordOrder,
    /// Engineering value = raw * scale + offset (the value becomes a double).
    #[serde(default = "default_scale")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    #[serde(default)]
    pub unit: String,
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
}

impl ModbusType {
    /// Registers one value occupies (1 for bits).
    pub fn words(self) -> u16 {
        match self {
            ModbusType::Bool | ModbusType::U16 | ModbusType::I16 => 1,
            ModbusType::U32 | ModbusType::I32 | ModbusType::F32 => 2,
            ModbusType::U64 | ModbusType::I64 | ModbusType::F64 => 4,
        }
    }
}

/// Order of the bytes of a 32- or 64-bit value, named by where the most
/// significant byte `A` travels: `ABCD` is big-endian, `CDAB` swaps 16-bit
/// words, `BADC` swaps the bytes inside each word, `DCBA` is little-endian.
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

impl ModbusTcpConfig {
    pub fn manifest(&self, device_index: u32) -> (Device, Vec<Tag>) {
        let device = Device {
            id: self.id.clone(),
            protocol: "modbus-tcp".into(),
            endpoint: format!("{}:{} unit {}", self.host, self.port, self.unit),
            identity: Default::default(),
        };
        let tags = self
            .tags
            .iter()
            .map(|t| Tag {
                device: device_index,
                name: t.name.clone(),
                address: format!("{}:{}", t.table.name(), t.address),
                data_type: t.wire_type() as i32,
                unit: t.unit.clone(),
                interval_ms: self.poll_interval.as_millis() as u64,
            })
            .collect();
        (device, tags)
    }
}

impl ModbusTagConfig {
    /// The type the tag's values travel as (scaled values become doubles).
    pub fn wire_type(&self) -> DataType {
        if self.scale != 1.0 || self.offset != 0.0 {
            return DataType::Double;
        }
        match self.data_type {
            ModbusType::Bool => DataType::Bool,
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
fn default_max_gap() -> u16 {
    16
}
fn default_scale() -> f64 {
    1.0
}

/// Parses one `protocol = "modbus-tcp"` device (its `protocol` key already
/// removed), recording problems under `path`.
pub(crate) fn parse_tcp(
    path: &str,
    mut table: toml::Table,
    problems: &mut Problems,
) -> Option<ModbusTcpConfig> {
    let raw_tags = table.remove("tags");
    let device = problems.parse::<ModbusTcpConfig>(path, toml::Value::Table(table));
    let mut tags = Vec::new();
    match raw_tags {
        None => problems.push(
            path,
            "missing field `tags`, expected at least one `[[devices.tags]]`",
        ),
        Some(toml::Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                let tag_path = format!("{path}.tags[{i}]");
                if let Some(tag) = problems.parse::<ModbusTagConfig>(&tag_path, item) {
                    check_tag(&tag_path, &tag, problems);
                    tags.push(tag);
                }
            }
        }
        Some(other) => problems.push(
            format!("{path}.tags"),
            format!(
                "invalid type: {}, expected an array of tables (`[[devices.tags]]`)",
                other.type_str()
            ),
        ),
    }
    let mut device = device?;
    check_id(problems, &format!("{path}.id"), &device.id);
    if device.host.trim().is_empty() {
        problems.push(
            format!("{path}.host"),
            "is empty, expected a host name or IP address",
        );
    }
    if device.poll_interval < Duration::from_millis(10) {
        problems.push(format!("{path}.poll_interval"), "expected at least 10ms");
    }
    if device.timeout.is_zero() {
        problems.push(format!("{path}.timeout"), "expected more than 0s");
    }
    let mut names = HashSet::new();
    for (i, tag) in tags.iter().enumerate() {
        if !names.insert(tag.name.as_str()) {
            problems.push(
                format!("{path}.tags[{i}].name"),
                format!("duplicate tag name `{}`", tag.name),
            );
        }
    }
    device.tags = tags;
    Some(device)
}

fn check_tag(path: &str, tag: &ModbusTagConfig, problems: &mut Problems) {
    check_id(problems, &format!("{path}.name"), &tag.name);
    if tag.table.is_bits() && tag.data_type != ModbusType::Bool {
        problems.push(
            format!("{path}.type"),
            format!(
                "table `{}` holds single bits, expected `bool`",
                tag.table.name()
            ),
        );
    }
    if !tag.table.is_bits() && tag.data_type == ModbusType::Bool {
        problems.push(
            format!("{path}.type"),
            format!(
                "`bool` needs table `coil` or `discrete`, not `{}`",
                tag.table.name()
            ),
        );
    }
    let end = u32::from(tag.address) + u32::from(tag.data_type.words());
    if end > 65536 {
        problems.push(
            format!("{path}.address"),
            format!(
                "{} registers from {} run past the last address 65535",
                tag.data_type.words(),
                tag.address
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
}
