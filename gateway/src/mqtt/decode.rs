//! Pure decoders of JSON and plain MQTT payloads: topic in, payload bytes
//! in, values of the device's tags out. No I/O, no state; shared by the
//! collector and `probe mqtt`.
//!
//! Rules:
//! - A tag takes part when its topic filter matches the message's topic.
//! - JSON: each matching tag reads the value at its pointer. A pointer the
//!   document lacks yields nothing for that tag (a message may carry a subset
//!   of the tags); a value of the wrong kind yields a type mismatch.
//! - Plain: the whole payload (UTF-8, trimmed) is the value.
//! - A payload that cannot be decoded at all, or a declared timestamp field
//!   that is missing or unreadable, is an error for the whole message.

use guantong_proto::v1::point::Value;
use serde_json::Value as Json;

use super::config::{MqttConfig, PayloadFormat, TimestampFormat, ValueType};

/// Why a message yielded no values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    #[error("payload is not UTF-8 text")]
    NotText,
    #[error("payload is empty")]
    Empty,
    #[error("timestamp at `{0}` is missing")]
    NoTimestamp(String),
    #[error("timestamp `{0}` is not epoch seconds, epoch milliseconds or RFC 3339")]
    BadTimestamp(String),
}

/// One tag's value from one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// Index into the device's tags.
    pub tag: usize,
    /// The value, or why the value found is not of the tag's type.
    pub value: Result<Value, String>,
}

/// A device's JSON/plain mapping, ready to apply to messages.
#[derive(Debug, Clone)]
pub struct Mapping {
    tags: Vec<TagMapping>,
    /// Distinct filters and the tags reading each: a topic is matched once
    /// per filter, not once per tag.
    filters: Vec<(String, Vec<usize>)>,
    timestamp: Option<String>,
    timestamp_format: TimestampFormat,
}

#[derive(Debug, Clone)]
struct TagMapping {
    /// The JSON pointer, unescaped into its reference tokens once.
    pointer: Vec<String>,
    data_type: ValueType,
    format: PayloadFormat,
}

impl Mapping {
    pub fn new(config: &MqttConfig) -> Mapping {
        let mut filters: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, t) in config.tags.iter().enumerate() {
            let f = config.tag_filter(t);
            match filters.iter_mut().find(|(g, _)| *g == f) {
                Some((_, tags)) => tags.push(i),
                None => filters.push((f, vec![i])),
            }
        }
        Mapping {
            filters,
            tags: config
                .tags
                .iter()
                .map(|t| TagMapping {
                    pointer: pointer_tokens(&t.pointer),
                    data_type: t.data_type,
                    format: config.payload,
                })
                .collect(),
            timestamp: config.timestamp.clone(),
            timestamp_format: config.timestamp_format,
        }
    }

    /// Indexes of the tags whose filter matches `topic`.
    pub fn matching(&self, topic: &str) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for (f, tags) in &self.filters {
            if topic_matches(f, topic) {
                out.extend(tags);
            }
        }
        if self.filters.len() > 1 {
            out.sort_unstable();
        }
        out
    }

    /// Decodes one message: its source time and the values of the tags
    /// listed in `matching` (from `matching(topic)`).
    pub fn decode(
        &self,
        matching: &[usize],
        payload: &[u8],
        arrival_ms: i64,
    ) -> Result<(i64, Vec<Extracted>), DecodeError> {
        let Some(first) = matching.first() else {
            return Ok((arrival_ms, Vec::new()));
        };
        match self.tags[*first].format {
            PayloadFormat::Plain => {
                let text = plain_text(payload)?;
                let values = matching
                    .iter()
                    .map(|&i| Extracted {
                        tag: i,
                        value: parse_text(text, self.tags[i].data_type),
                    })
                    .collect();
                Ok((arrival_ms, values))
            }
            // Sparkplug devices never build a Mapping with their tags; treat
            // as JSON to stay total.
            PayloadFormat::Json | PayloadFormat::Sparkplug => {
                if payload.is_empty() {
                    return Err(DecodeError::Empty);
                }
                let doc: Json = serde_json::from_slice(payload)
                    .map_err(|e| DecodeError::NotJson(e.to_string()))?;
                let time_ms = match &self.timestamp {
                    None => arrival_ms,
                    Some(p) => {
                        let v = doc
                            .pointer(p)
                            .ok_or_else(|| DecodeError::NoTimestamp(p.clone()))?;
                        timestamp_ms(v, self.timestamp_format)
                            .ok_or_else(|| DecodeError::BadTimestamp(short(v)))?
                    }
                };
                let values = matching
                    .iter()
                    .filter_map(|&i| {
                        let t = &self.tags[i];
                        resolve(&doc, &t.pointer).map(|v| Extracted {
                            tag: i,
                            value: json_value(v, t.data_type),
                        })
                    })
                    .collect();
                Ok((time_ms, values))
            }
        }
    }
}

/// The reference tokens of an RFC 6901 JSON pointer (`/a~1b/0` -> `a/b`,
/// `0`); `""` is the whole document.
fn pointer_tokens(pointer: &str) -> Vec<String> {
    if pointer.is_empty() {
        return Vec::new();
    }
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// `serde_json::Value::pointer` with the tokens unescaped beforehand.
fn resolve<'a>(doc: &'a Json, tokens: &[String]) -> Option<&'a Json> {
    let mut v = doc;
    for t in tokens {
        v = match v {
            Json::Object(map) => map.get(t)?,
            Json::Array(items) => {
                if t.len() > 1 && t.starts_with('0') {
                    return None;
                }
                items.get(t.parse::<usize>().ok()?)?
            }
            _ => return None,
        };
    }
    Some(v)
}

/// Whether `topic` matches the MQTT topic `filter` (`+` one level, `#` the
/// rest, including the parent level). Topics starting with `$` match no
/// wildcard in the first level (MQTT 3.1.1 §4.7.2).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn plain_text(payload: &[u8]) -> Result<&str, DecodeError> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| DecodeError::NotText)?
        .trim();
    if text.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(text)
}

/// A text value as `data_type`.
pub fn parse_text(text: &str, data_type: ValueType) -> Result<Value, String> {
    let bad = || format!("`{}` is not {}", shorten(text), type_name(data_type));
    match data_type {
        ValueType::String => Ok(Value::String(text.to_string())),
        ValueType::Double => text
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .map(Value::Double)
            .or_else(|| parse_bool(text).map(|b| Value::Double(f64::from(u8::from(b)))))
            .ok_or_else(bad),
        ValueType::Int => text
            .parse::<i64>()
            .ok()
            .or_else(|| text.parse::<f64>().ok().and_then(f64_to_i64))
            .map(Value::Int)
            .ok_or_else(bad),
        ValueType::Uint => text
            .parse::<u64>()
            .ok()
            .or_else(|| text.parse::<f64>().ok().and_then(f64_to_u64))
            .map(Value::Uint)
            .ok_or_else(bad),
        ValueType::Bool => parse_bool(text).map(Value::Bool).ok_or_else(bad),
    }
}

fn parse_bool(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "on" | "1" => Some(true),
        "false" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// A JSON value as `data_type`.
pub fn json_value(v: &Json, data_type: ValueType) -> Result<Value, String> {
    match (v, data_type) {
        (Json::String(s), ValueType::String) => Ok(Value::String(s.clone())),
        (other, ValueType::String) => Ok(Value::String(other.to_string())),
        (Json::String(s), t) => parse_text(s.trim(), t),
        (Json::Bool(b), ValueType::Bool) => Ok(Value::Bool(*b)),
        (Json::Bool(b), ValueType::Double) => Ok(Value::Double(f64::from(u8::from(*b)))),
        (Json::Bool(b), ValueType::Int) => Ok(Value::Int(i64::from(*b))),
        (Json::Bool(b), ValueType::Uint) => Ok(Value::Uint(u64::from(*b))),
        (Json::Number(n), ValueType::Double) => n
            .as_f64()
            .map(Value::Double)
            .ok_or_else(|| format!("{n} is not a double")),
        (Json::Number(n), ValueType::Int) => n
            .as_i64()
            .or_else(|| n.as_f64().and_then(f64_to_i64))
            .map(Value::Int)
            .ok_or_else(|| format!("{n} is not a signed integer")),
        (Json::Number(n), ValueType::Uint) => n
            .as_u64()
            .or_else(|| n.as_f64().and_then(f64_to_u64))
            .map(Value::Uint)
            .ok_or_else(|| format!("{n} is not an unsigned integer")),
        (Json::Number(n), ValueType::Bool) => match n.as_f64() {
            Some(0.0) => Ok(Value::Bool(false)),
            Some(1.0) => Ok(Value::Bool(true)),
            _ => Err(format!("{n} is not a boolean")),
        },
        (other, t) => Err(format!("{} is not {}", short(other), type_name(t))),
    }
}

fn f64_to_i64(f: f64) -> Option<i64> {
    (f.fract() == 0.0 && f >= i64::MIN as f64 && f < i64::MAX as f64).then_some(f as i64)
}

fn f64_to_u64(f: f64) -> Option<u64> {
    (f.fract() == 0.0 && f >= 0.0 && f < u64::MAX as f64).then_some(f as u64)
}

fn type_name(t: ValueType) -> &'static str {
    match t {
        ValueType::Bool => "a boolean",
        ValueType::Int => "a signed integer",
        ValueType::Uint => "an unsigned integer",
        ValueType::Double => "a number",
        ValueType::String => "text",
    }
}

fn short(v: &Json) -> String {
    shorten(&v.to_string())
}

fn shorten(s: &str) -> String {
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Epoch numbers below this are seconds, from it on milliseconds (10^11 s is
/// the year 5138; 10^11 ms is March 1973).
const SECONDS_LIMIT: f64 = 1e11;

/// A payload timestamp in milliseconds since the Unix epoch.
pub fn timestamp_ms(v: &Json, format: TimestampFormat) -> Option<i64> {
    let number = match v {
        Json::Number(n) => n.as_f64(),
        Json::String(s) if format != TimestampFormat::Rfc3339 => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    let ms = match (number, format) {
        (Some(n), TimestampFormat::EpochS) => n * 1000.0,
        (Some(n), TimestampFormat::EpochMs) => n,
        (Some(n), TimestampFormat::Auto) if n.abs() < SECONDS_LIMIT => n * 1000.0,
        (Some(n), TimestampFormat::Auto) => n,
        (None, TimestampFormat::Auto | TimestampFormat::Rfc3339) => {
            return v.as_str().and_then(rfc3339_ms);
        }
        _ => return None,
    };
    (ms.is_finite() && ms.abs() < 1e15).then_some(ms.round() as i64)
}

/// RFC 3339 (`2026-11-25T08:00:00.250+08:00`, `...Z`) in milliseconds.
pub fn rfc3339_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    let (body, offset_min) = if s.ends_with(['Z', 'z']) {
        (&s[..s.len() - 1], 0i64)
    } else if b.len() > 6 && matches!(b[b.len() - 6], b'+' | b'-') && b[b.len() - 3] == b':' {
        let sign = if b[b.len() - 6] == b'-' { -1 } else { 1 };
        let h: i64 = s.get(s.len() - 5..s.len() - 3)?.parse().ok()?;
        let m: i64 = s.get(s.len() - 2..)?.parse().ok()?;
        (&s[..s.len() - 6], sign * (h * 60 + m))
    } else {
        return None;
    };
    let t = humantime::parse_rfc3339_weak(body).ok()?;
    let ms = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    };
    Some(ms - offset_min * 60_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn device(extra: &str, tags: &str) -> MqttConfig {
        let text = format!(
            "[gateway]\nid = \"gw\"\n[uplink]\nendpoint = \"https://x:1\"\ntoken = \"t\"\n[buffer]\ndir = \"b\"\n\
             [[devices]]\nid = \"press-7\"\nprotocol = \"mqtt\"\nbroker = \"mqtt://127.0.0.1\"\n{extra}\n{tags}"
        );
        let c = Config::parse(&text, Path::new("/")).expect("valid config");
        match c.devices.into_iter().next() {
            Some(crate::config::DeviceConfig::Mqtt(m)) => *m,
            _ => panic!("not an mqtt device"),
        }
    }

    #[test]
    fn resolves_pointers_like_serde_json() {
        let doc: Json = serde_json::from_str(r#"{"a/b": {"~x": [1, {"c": 2}]}, "": 3, "01": 4}"#)
            .expect("json");
        for p in [
            "",
            "/a~1b",
            "/a~1b/~0x/1/c",
            "/",
            "/a~1b/~0x/01",
            "/01",
            "/nope",
            "/a~1b/~0x/9",
        ] {
            assert_eq!(resolve(&doc, &pointer_tokens(p)), doc.pointer(p), "{p}");
        }
    }

    #[test]
    fn matches_topic_filters() {
        assert!(topic_matches(
            "factory/+/line1/#",
            "factory/press-7/line1/temp"
        ));
        assert!(topic_matches("factory/+/line1/#", "factory/press-7/line1"));
        assert!(topic_matches("a/b", "a/b"));
        assert!(!topic_matches("a/b", "a/b/c"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(topic_matches("a/+/c", "a//c"));
        assert!(!topic_matches("#", "$SYS/broker"));
        assert!(topic_matches("$SYS/#", "$SYS/broker"));
    }

    #[test]
    fn substitutes_the_device_level_and_extracts_several_tags() {
        let m = device(
            "topic = \"factory/+/line1/data\"\ndevice_level = 1\ntimestamp = \"/ts\"",
            "[[devices.tags]]\nname = \"temp\"\npointer = \"/sensors/0/t\"\n\
             [[devices.tags]]\nname = \"running\"\npointer = \"/run\"\ntype = \"bool\"\n\
             [[devices.tags]]\nname = \"count\"\npointer = \"/n\"\ntype = \"uint\"\n\
             [[devices.tags]]\nname = \"absent\"\npointer = \"/nope\"",
        );
        assert_eq!(m.filters(), ["factory/press-7/line1/data"]);
        let map = Mapping::new(&m);
        assert!(map.matching("factory/press-8/line1/data").is_empty());
        let matching = map.matching("factory/press-7/line1/data");
        assert_eq!(matching, [0, 1, 2, 3]);
        let payload = br#"{"ts": 1764057600, "sensors": [{"t": 21.5}], "run": true, "n": "-3"}"#;
        let (time, values) = map.decode(&matching, payload, 5).expect("decodes");
        assert_eq!(time, 1_764_057_600_000);
        assert_eq!(
            values,
            [
                Extracted {
                    tag: 0,
                    value: Ok(Value::Double(21.5))
                },
                Extracted {
                    tag: 1,
                    value: Ok(Value::Bool(true))
                },
                Extracted {
                    tag: 2,
                    value: Err("`-3` is not an unsigned integer".into())
                },
            ]
        );
    }

    #[test]
    fn rejects_malformed_json_and_missing_timestamps() {
        let m = device(
            "topic = \"t/#\"\ntimestamp = \"/ts\"",
            "[[devices.tags]]\nname = \"v\"\npointer = \"/v\"",
        );
        let map = Mapping::new(&m);
        let all = map.matching("t/x");
        assert!(matches!(
            map.decode(&all, b"{\"v\": 1", 0),
            Err(DecodeError::NotJson(_))
        ));
        assert_eq!(
            map.decode(&all, b"{\"v\": 1}", 0),
            Err(DecodeError::NoTimestamp("/ts".into()))
        );
        assert_eq!(
            map.decode(&all, b"{\"v\": 1, \"ts\": \"yesterday\"}", 0),
            Err(DecodeError::BadTimestamp("\"yesterday\"".into()))
        );
        assert_eq!(map.decode(&all, b"", 0), Err(DecodeError::Empty));
        assert!(matches!(
            map.decode(&all, &[0xff, 0xfe, 0x00], 0),
            Err(DecodeError::NotJson(_))
        ));
    }

    #[test]
    fn decodes_plain_payloads() {
        let m = device(
            "payload = \"plain\"",
            "[[devices.tags]]\nname = \"t\"\ntopic = \"p/t\"\n\
             [[devices.tags]]\nname = \"on\"\ntopic = \"p/on\"\ntype = \"bool\"\n\
             [[devices.tags]]\nname = \"state\"\ntopic = \"p/state\"\ntype = \"string\"",
        );
        let map = Mapping::new(&m);
        let d = |topic: &str, p: &[u8]| map.decode(&map.matching(topic), p, 42);
        assert_eq!(
            d("p/t", b" 23.25\n"),
            Ok((
                42,
                vec![Extracted {
                    tag: 0,
                    value: Ok(Value::Double(23.25))
                }]
            ))
        );
        assert_eq!(
            d("p/on", b"false").expect("ok").1[0].value,
            Ok(Value::Bool(false))
        );
        assert_eq!(
            d("p/state", "运行".as_bytes()).expect("ok").1[0].value,
            Ok(Value::String("运行".into()))
        );
        assert!(d("p/t", b"warm").expect("ok").1[0].value.is_err());
        assert_eq!(d("p/t", &[0xc3, 0x28]), Err(DecodeError::NotText));
        assert_eq!(d("p/t", b"  "), Err(DecodeError::Empty));
    }

    #[test]
    fn reads_timestamps() {
        use serde_json::json;
        let auto = TimestampFormat::Auto;
        assert_eq!(
            timestamp_ms(&json!(1764057600), auto),
            Some(1_764_057_600_000)
        );
        assert_eq!(
            timestamp_ms(&json!(1764057600.25), auto),
            Some(1_764_057_600_250)
        );
        assert_eq!(
            timestamp_ms(&json!(1764057600123u64), auto),
            Some(1_764_057_600_123)
        );
        assert_eq!(
            timestamp_ms(&json!("1764057600123"), auto),
            Some(1_764_057_600_123)
        );
        assert_eq!(
            timestamp_ms(&json!(1764057600), TimestampFormat::EpochMs),
            Some(1_764_057_600)
        );
        assert_eq!(
            timestamp_ms(&json!("2025-11-25T16:00:00.5+08:00"), auto),
            Some(1_764_057_600_500)
        );
        assert_eq!(
            timestamp_ms(&json!("2025-11-25T08:00:00Z"), TimestampFormat::Rfc3339),
            Some(1_764_057_600_000)
        );
        assert_eq!(timestamp_ms(&json!("2025-11-25 08:00:00"), auto), None);
        assert_eq!(timestamp_ms(&json!(true), auto), None);
        assert_eq!(timestamp_ms(&json!(1e300), auto), None);
    }
}
