//! `[[devices]]` with `protocol = "s7"`: a Siemens S7 PLC over ISO-on-TCP
//! (S7-200 SMART, S7-300/400, S7-1200/1500 with PUT/GET enabled).
//!
//! ```toml
//! [[devices]]
//! id = "plc-01"
//! protocol = "s7"
//! host = "192.168.0.10"
//! port = 102            # default
//! rack = 0              # default
//! slot = 1              # default (S7-300: 2); or `tsap = "10.01"` (S7-200 SMART, LOGO!)
//! poll_interval = "1s"
//!
//! [[devices.tags]]
//! name = "temperature"
//! address = "DB1.DBD4"  # STEP 7 absolute notation
//! type = "f32"
//! ```
//!
//! Addresses: `DBn.DBX b.i` (bit), `DBn.DBB b`, `DBn.DBW b`, `DBn.DBD b`;
//! `M`, `I` (or `E`) and `Q` (or `A`) with `b.i`, `Bb`, `Wb`, `Db`
//! (`M0.1`, `MW10`, `ID4`, `QB0`); timers `Tn` and counters `Cn` (or `Zn`).
//! The type must fit the width: `X`/`b.i` bool; `B` u8, i8, string
//! (`length` = the declared maximum; the S7 STRING's two header bytes are
//! read and honoured), `date_and_time` (DT, 8 BCD bytes) or `dtl` (12
//! bytes); `W` u16, i16 or `date` (days since 1990-01-01); `D` u32, i32,
//! f32, f64 (`LReal`: 8 bytes from that byte), `time` (TIME, signed ms) or
//! `time_of_day` (ms since midnight). A timer reads as `f64`, its S5TIME in
//! seconds; a counter as `u16`, its BCD value. Values are big-endian, as S7
//! stores them; dates and times are the PLC's local clock, without a zone.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use guantong_proto::v1::{DataType, Device, Tag};
use serde::Deserialize;

use crate::config::{Problems, check_id};

/// A memory area of the CPU, with its S7 area code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Area {
    Inputs,
    Outputs,
    Markers,
    DataBlock(u16),
    /// Two bytes per timer: an address's `byte` is twice its number.
    Timers,
    /// Two bytes per counter, as timers.
    Counters,
}

impl Area {
    pub fn code(self) -> u8 {
        match self {
            Area::Inputs => 0x81,
            Area::Outputs => 0x82,
            Area::Markers => 0x83,
            Area::DataBlock(_) => 0x84,
            Area::Timers => super::proto::AREA_TIMERS,
            Area::Counters => super::proto::AREA_COUNTERS,
        }
    }
    pub fn db(self) -> u16 {
        match self {
            Area::DataBlock(n) => n,
            _ => 0,
        }
    }
}

/// How many bytes an address names from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    Bit(u8),
    Byte,
    Word,
    DWord,
}

/// A parsed STEP 7 absolute address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub area: Area,
    pub byte: u32,
    pub width: Width,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (prefix, letter) = match self.area {
            Area::DataBlock(n) => (format!("DB{n}.DB"), ""),
            Area::Inputs => ("I".into(), ""),
            Area::Outputs => ("Q".into(), ""),
            Area::Markers => ("M".into(), ""),
            Area::Timers => return write!(f, "T{}", self.byte / 2),
            Area::Counters => return write!(f, "C{}", self.byte / 2),
        };
        let db = matches!(self.area, Area::DataBlock(_));
        match self.width {
            Width::Bit(i) if db => write!(f, "{prefix}X{}.{i}", self.byte),
            Width::Bit(i) => write!(f, "{prefix}{}.{i}", self.byte),
            Width::Byte => write!(f, "{prefix}{letter}B{}", self.byte),
            Width::Word => write!(f, "{prefix}{letter}W{}", self.byte),
            Width::DWord => write!(f, "{prefix}{letter}D{}", self.byte),
        }
    }
}

const ADDRESS_HELP: &str = "expected STEP 7 absolute notation: DB1.DBX0.3, DB1.DBB0, DB1.DBW2, DB1.DBD4, M0.1, MB0, MW10, MD20, I0.1, IW4, Q0.0, QB1, T5, C3";

/// Largest byte offset accepted (the 3-byte S7 address holds byte × 8 + bit).
const MAX_BYTE: u32 = (1 << 21) - 1;

impl Address {
    pub fn parse(s: &str) -> Result<Address, String> {
        let bad = || format!("`{s}`: {ADDRESS_HELP}");
        let up = s.trim().to_ascii_uppercase();
        let (area, rest) = if let Some(rest) = up.strip_prefix("DB") {
            let (n, rest) = rest.split_once('.').ok_or_else(bad)?;
            let n: u16 = n.parse().map_err(|_| bad())?;
            if n == 0 {
                return Err(format!("`{s}`: data blocks are numbered from 1"));
            }
            let rest = rest.strip_prefix("DB").ok_or_else(bad)?;
            (Area::DataBlock(n), rest.to_string())
        } else if let Some(number) = up
            .strip_prefix('T')
            .map(|n| (Area::Timers, n))
            .or_else(|| up.strip_prefix(['C', 'Z']).map(|n| (Area::Counters, n)))
        {
            let (area, n) = number;
            let n: u16 = n.parse().map_err(|_| bad())?;
            return Ok(Address {
                area,
                byte: u32::from(n) * 2,
                width: Width::Word,
            });
        } else {
            let mut chars = up.chars();
            let area = match chars.next() {
                Some('M') => Area::Markers,
                Some('I' | 'E') => Area::Inputs,
                Some('Q' | 'A') => Area::Outputs,
                _ => return Err(bad()),
            };
            (area, chars.as_str().to_string())
        };
        let db = matches!(area, Area::DataBlock(_));
        let (width, number) = match rest.chars().next() {
            Some('X') if db => (None, &rest[1..]),
            Some('B') => (Some(Width::Byte), &rest[1..]),
            Some('W') => (Some(Width::Word), &rest[1..]),
            Some('D') => (Some(Width::DWord), &rest[1..]),
            Some(c) if c.is_ascii_digit() && !db => (None, rest.as_str()),
            _ => return Err(bad()),
        };
        let (byte, width) = match width {
            Some(w) => (number.parse::<u32>().map_err(|_| bad())?, w),
            None => {
                let (b, i) = number.split_once('.').ok_or_else(bad)?;
                let bit: u8 = i.parse().map_err(|_| bad())?;
                if bit > 7 {
                    return Err(format!("`{s}`: bit {bit}: bits are numbered 0 to 7"));
                }
                (b.parse::<u32>().map_err(|_| bad())?, Width::Bit(bit))
            }
        };
        if byte > MAX_BYTE {
            return Err(format!("`{s}`: byte {byte} is beyond the S7 address range"));
        }
        Ok(Address { area, byte, width })
    }
}

/// A tag's value type (the gateway's type names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum S7Type {
    Bool,
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    F64,
    String,
    /// DATE: days since 1990-01-01, as `YYYY-MM-DD`.
    Date,
    /// TIME: a signed duration in ms.
    Time,
    /// TIME_OF_DAY: ms since midnight, as `HH:MM:SS.mmm`.
    TimeOfDay,
    /// DATE_AND_TIME (DT): 8 BCD bytes, as `YYYY-MM-DDTHH:MM:SS.mmm`.
    DateAndTime,
    /// DTL (S7-1200/1500): 12 bytes, as `YYYY-MM-DDTHH:MM:SS.mmm`.
    Dtl,
}

impl S7Type {
    pub fn name(self) -> &'static str {
        match self {
            S7Type::Bool => "bool",
            S7Type::U8 => "u8",
            S7Type::I8 => "i8",
            S7Type::U16 => "u16",
            S7Type::I16 => "i16",
            S7Type::U32 => "u32",
            S7Type::I32 => "i32",
            S7Type::F32 => "f32",
            S7Type::F64 => "f64",
            S7Type::String => "string",
            S7Type::Date => "date",
            S7Type::Time => "time",
            S7Type::TimeOfDay => "time_of_day",
            S7Type::DateAndTime => "date_and_time",
            S7Type::Dtl => "dtl",
        }
    }
    pub fn wire(self) -> DataType {
        match self {
            S7Type::Bool => DataType::Bool,
            S7Type::U8 | S7Type::U16 | S7Type::U32 => DataType::Uint,
            S7Type::I8 | S7Type::I16 | S7Type::I32 | S7Type::Time => DataType::Int,
            S7Type::F32 | S7Type::F64 => DataType::Double,
            S7Type::String
            | S7Type::Date
            | S7Type::TimeOfDay
            | S7Type::DateAndTime
            | S7Type::Dtl => DataType::String,
        }
    }
    /// Whether this type may be read at `a`.
    fn fits(self, a: &Address) -> bool {
        match a.area {
            Area::Timers => return self == S7Type::F64,
            Area::Counters => return self == S7Type::U16,
            _ => {}
        }
        matches!(
            (self, a.width),
            (S7Type::Bool, Width::Bit(_))
                | (
                    S7Type::U8 | S7Type::I8 | S7Type::String | S7Type::DateAndTime | S7Type::Dtl,
                    Width::Byte
                )
                | (S7Type::U16 | S7Type::I16 | S7Type::Date, Width::Word)
                | (
                    S7Type::U32
                        | S7Type::I32
                        | S7Type::F32
                        | S7Type::F64
                        | S7Type::Time
                        | S7Type::TimeOfDay,
                    Width::DWord
                )
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S7TagConfig {
    pub name: String,
    /// As written; parsed into `parsed` by `parse`.
    pub address: String,
    #[serde(rename = "type")]
    pub data_type: S7Type,
    /// `string`: the declared maximum length (S7 STRING[n]).
    #[serde(default)]
    pub length: Option<u8>,
    #[serde(default)]
    pub unit: String,
    #[serde(skip)]
    pub parsed: Option<Address>,
}

impl S7TagConfig {
    pub fn address(&self) -> Address {
        self.parsed.unwrap_or(Address {
            area: Area::Markers,
            byte: 0,
            width: Width::Byte,
        })
    }
    /// Bytes the tag occupies from its start byte.
    pub fn bytes(&self) -> u32 {
        if matches!(self.address().area, Area::Timers | Area::Counters) {
            return 2;
        }
        match self.data_type {
            S7Type::Bool | S7Type::U8 | S7Type::I8 => 1,
            S7Type::U16 | S7Type::I16 | S7Type::Date => 2,
            S7Type::U32 | S7Type::I32 | S7Type::F32 | S7Type::Time | S7Type::TimeOfDay => 4,
            S7Type::F64 | S7Type::DateAndTime => 8,
            S7Type::Dtl => 12,
            S7Type::String => 2 + u32::from(self.length.unwrap_or(254)),
        }
    }
}

fn default_port() -> u16 {
    102
}
fn default_slot() -> u8 {
    1
}
fn default_poll() -> Duration {
    Duration::from_secs(1)
}
fn default_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S7Config {
    pub id: String,
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub rack: u8,
    #[serde(default = "default_slot")]
    pub slot: u8,
    /// The PLC's TSAP as `hi.lo` hex bytes (`"10.01"`, `"03.01"`), instead
    /// of rack and slot (S7-200 SMART, LOGO!, CPs with their own TSAP).
    #[serde(default)]
    pub tsap: Option<String>,
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Reconnects back off up to this.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    #[serde(skip)]
    pub tags: Vec<S7TagConfig>,
    /// What the CPU said of itself (filled at identification).
    #[serde(skip)]
    pub identity: BTreeMap<String, String>,
}

impl S7Config {
    /// The remote TSAP: `tsap`, or connection type PG (0x01) with rack and slot.
    pub fn remote_tsap(&self) -> u16 {
        self.tsap
            .as_deref()
            .and_then(parse_tsap)
            .unwrap_or(0x0100 | (u16::from(self.rack) << 5) | u16::from(self.slot & 0x1f))
    }

    pub fn endpoint(&self) -> String {
        match &self.tsap {
            Some(t) => format!("{}:{} tsap {t}", self.host, self.port),
            None => format!(
                "{}:{} rack {} slot {}",
                self.host, self.port, self.rack, self.slot
            ),
        }
    }

    pub fn manifest(&self, device_index: u32) -> (Device, Vec<Tag>) {
        let device = Device {
            id: self.id.clone(),
            protocol: "s7".into(),
            endpoint: self.endpoint(),
            identity: self.identity.clone().into_iter().collect(),
        };
        let tags = self
            .tags
            .iter()
            .map(|t| Tag {
                device: device_index,
                name: t.name.clone(),
                address: format!("{} {}", t.address(), t.data_type.name()),
                data_type: t.data_type.wire() as i32,
                unit: t.unit.clone(),
                interval_ms: self.poll_interval.as_millis() as u64,
            })
            .collect();
        (device, tags)
    }
}

impl crate::protocol::DeviceProtocol for S7Config {
    fn name(&self) -> &'static str {
        "s7"
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn tag_count(&self) -> usize {
        self.tags.len()
    }
    fn manifest(&self, device_index: u32) -> (Device, Vec<Tag>) {
        S7Config::manifest(self, device_index)
    }
    /// One poll plus the timeout of its answer.
    fn stale_after(&self) -> Option<Duration> {
        Some(self.poll_interval + self.timeout)
    }
}

/// `"10.01"` → 0x1001.
pub(crate) fn parse_tsap(s: &str) -> Option<u16> {
    let (hi, lo) = s.split_once('.')?;
    Some(
        u16::from(u8::from_str_radix(hi, 16).ok()?) << 8
            | u16::from(u8::from_str_radix(lo, 16).ok()?),
    )
}

pub(crate) fn parse(
    path: &str,
    mut table: toml::Table,
    problems: &mut Problems,
) -> Option<S7Config> {
    let raw_tags = table.remove("tags");
    let device = problems.parse::<S7Config>(path, toml::Value::Table(table));
    let tags = problems.parse_required_tags(path, raw_tags, |tag_path, mut tag: S7TagConfig, problems| {
        check_id(problems, &format!("{tag_path}.name"), &tag.name);
        match Address::parse(&tag.address) {
            Ok(a) if !tag.data_type.fits(&a) => problems.push(
                format!("{tag_path}.type"),
                format!(
                    "`{}` does not fit `{}`: bool takes a bit (DBX b.i, M b.i); u8/i8/string/date_and_time/dtl a byte (B); u16/i16/date a word (W); u32/i32/f32/f64/time/time_of_day a double word (D); a timer (T) reads as f64, a counter (C) as u16",
                    tag.data_type.name(),
                    tag.address
                ),
            ),
            Ok(a) => tag.parsed = Some(a),
            Err(e) => problems.push(format!("{tag_path}.address"), e),
        }
        match (tag.data_type, tag.length) {
            (S7Type::String, None) => problems.push(
                format!("{tag_path}.length"),
                "a string needs `length`, its declared maximum (STRING[n]: 1 to 254)",
            ),
            (S7Type::String, Some(0 | 255)) => problems.push(
                format!("{tag_path}.length"),
                "expected 1 to 254 (STRING[n])",
            ),
            (S7Type::String, _) | (_, None) => {}
            (_, Some(_)) => problems.push(
                format!("{tag_path}.length"),
                "only a string has a `length`",
            ),
        }
        Some(tag)
    });
    let mut device = device?;
    let at = |key: &str| format!("{path}.{key}");
    check_id(problems, &at("id"), &device.id);
    if device.host.trim().is_empty() {
        problems.push(at("host"), "expected the PLC's address");
    }
    if device
        .tsap
        .as_deref()
        .is_some_and(|t| parse_tsap(t).is_none())
    {
        problems.push(
            at("tsap"),
            "expected two hex bytes as `hi.lo`, e.g. \"10.01\" or \"03.01\"",
        );
    }
    if device.rack > 7 || device.slot > 31 {
        problems.push(at("slot"), "rack is 0 to 7 and slot 0 to 31");
    }
    if device.poll_interval.is_zero() || device.timeout.is_zero() {
        problems.push(
            at("poll_interval"),
            "poll_interval and timeout must be above zero",
        );
    }
    let mut names = std::collections::HashSet::new();
    for (i, t) in tags.iter().enumerate() {
        if !names.insert(t.name.as_str()) {
            problems.push(
                format!("{path}.tags[{i}].name"),
                format!("`{}` is used twice", t.name),
            );
        }
    }
    device.tags = tags;
    Some(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step7_addresses_parse_as_installers_write_them_and_print_back() {
        for (text, area, byte, width) in [
            ("DB1.DBX0.3", Area::DataBlock(1), 0, Width::Bit(3)),
            ("db10.dbb100", Area::DataBlock(10), 100, Width::Byte),
            ("DB1.DBW2", Area::DataBlock(1), 2, Width::Word),
            ("DB1.DBD4", Area::DataBlock(1), 4, Width::DWord),
            ("M0.1", Area::Markers, 0, Width::Bit(1)),
            ("MW10", Area::Markers, 10, Width::Word),
            ("MD20", Area::Markers, 20, Width::DWord),
            ("I0.1", Area::Inputs, 0, Width::Bit(1)),
            ("E2.7", Area::Inputs, 2, Width::Bit(7)),
            ("Q0.0", Area::Outputs, 0, Width::Bit(0)),
            ("AB1", Area::Outputs, 1, Width::Byte),
            ("T5", Area::Timers, 10, Width::Word),
            ("Z7", Area::Counters, 14, Width::Word),
            ("c0", Area::Counters, 0, Width::Word),
        ] {
            let a = Address::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((a.area, a.byte, a.width), (area, byte, width), "{text}");
            assert_eq!(Address::parse(&a.to_string()), Ok(a), "{a}");
        }
        for bad in [
            "DB0.DBW0",
            "DB1.W2",
            "M0.8",
            "X1",
            "DB1.DBX3",
            "MW",
            "DB1.DBD99999999",
            "%MW10",
            "T",
            "TW2",
            "C70000",
        ] {
            let e = Address::parse(bad).expect_err(bad);
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn a_type_must_fit_its_address_and_strings_need_a_length() {
        let mut problems = Problems::default();
        let table: toml::Table = r#"
id = "plc"
host = "127.0.0.1"
[[tags]]
name = "a"
address = "DB1.DBW0"
type = "f32"
[[tags]]
name = "b"
address = "DB1.DBB10"
type = "string"
[[tags]]
name = "c"
address = "DB1.DBD4"
type = "f64"
[[tags]]
name = "d"
address = "T3"
type = "u16"
[[tags]]
name = "e"
address = "DB1.DBB20"
type = "dtl"
"#
        .parse()
        .expect("toml");
        let device = parse("devices[0]", table, &mut problems).expect("parsed");
        let found = format!("{:?}", problems.0);
        assert!(found.contains("devices[0].tags[0].type"), "{found}");
        assert!(found.contains("devices[0].tags[1].length"), "{found}");
        assert!(!found.contains("tags[2]"), "{found}");
        assert!(found.contains("devices[0].tags[3].type"), "{found}");
        assert!(!found.contains("tags[4]"), "{found}");
        assert_eq!(device.remote_tsap(), 0x0101);
        assert_eq!(device.tags[2].bytes(), 8);
    }
}
