//! OPC UA values and status codes to points.
//!
//! - Status: Good → Good, Uncertain → Uncertain (value kept), Bad → Bad (no
//!   value). The OPC UA status code is kept verbatim as the point's
//!   `quality_code`: Uncertain and Bad codes have their top bits set, so they
//!   never collide with the gateway's own ranges (see `quality.rs`); a Good
//!   code with info bits (e.g. the overflow bit: the server's queue dropped
//!   values) is kept too.
//! - Values: every scalar built-in type converts to the tag's `type` when it
//!   can without losing information (an integer that does not fit, a
//!   fractional double for an `int` tag, an integer a double cannot hold
//!   exactly for a `double` tag, text for a number are
//!   `OPCUA_TYPE_MISMATCH`); `string` tags take any value, arrays as JSON
//!   text (`[1,2,3]`), so every built-in type and arrays of them arrive.
//! - Time: the configured timestamp (source or server), else the other one,
//!   else the arrival time. With `timestamp = "source"` (the default) the
//!   server timestamp, when the server sent one, is kept beside it in the
//!   point (`server_time_ms`, `Point.server_time_delta_ms` on the wire), so
//!   both arrive; with `"server"` the point's time is the server timestamp
//!   and the source timestamp is only its fallback.

use async_opcua::types::{DataValue, DateTime, StatusCode, Variant};
use guantong_proto::v1::Quality;
use guantong_proto::v1::point::Value;

use super::config::TimestampChoice;
use crate::quality::{self, Sample, now_ms};
use crate::value::ValueType;

/// How one tag's values convert.
#[derive(Debug, Clone, Copy)]
pub struct Conversion {
    pub tag: u32,
    pub value_type: ValueType,
    pub timestamp: TimestampChoice,
}

impl Conversion {
    pub fn sample(&self, dv: DataValue) -> Sample {
        let time_ms = self.time_of(&dv);
        let server_time_ms = match self.timestamp {
            TimestampChoice::Source
                if dv.source_timestamp.as_ref().is_some_and(|t| !t.is_null()) =>
            {
                dv.server_timestamp.as_ref().and_then(millis)
            }
            _ => None,
        };
        let status = dv.status.unwrap_or(StatusCode::Good);
        let mut sample = if status.is_bad() {
            Sample::bad(self.tag, time_ms, status.bits())
        } else {
            match dv.value.as_ref().and_then(|v| convert(v, self.value_type)) {
                Some(value) => Sample {
                    tag: self.tag,
                    time_ms,
                    value: Some(value),
                    quality: if status.is_uncertain() {
                        Quality::Uncertain
                    } else {
                        Quality::Good
                    },
                    code: status.bits(),
                    server_time_ms: None,
                },
                None => Sample::bad(self.tag, time_ms, quality::OPCUA_TYPE_MISMATCH),
            }
        };
        sample.server_time_ms = server_time_ms;
        sample
    }

    fn time_of(&self, dv: &DataValue) -> i64 {
        let (first, second) = match self.timestamp {
            TimestampChoice::Source => (&dv.source_timestamp, &dv.server_timestamp),
            TimestampChoice::Server => (&dv.server_timestamp, &dv.source_timestamp),
        };
        first
            .as_ref()
            .and_then(millis)
            .or_else(|| second.as_ref().and_then(millis))
            .unwrap_or_else(now_ms)
    }
}

fn millis(t: &DateTime) -> Option<i64> {
    (!t.is_null()).then(|| t.as_chrono().timestamp_millis())
}

/// `v` as a point value of type `t`, or None when it is not one.
pub fn convert(v: &Variant, t: ValueType) -> Option<Value> {
    match t {
        ValueType::Bool => match v {
            Variant::Boolean(b) => Some(Value::Bool(*b)),
            _ => match as_i128(v)? {
                0 => Some(Value::Bool(false)),
                1 => Some(Value::Bool(true)),
                _ => None,
            },
        },
        ValueType::Int => i64::try_from(as_i128(v)?).ok().map(Value::Int),
        ValueType::Uint => u64::try_from(as_i128(v)?).ok().map(Value::Uint),
        ValueType::Double => match v {
            Variant::Float(f) => Some(Value::Double(crate::value::f32_to_f64(*f))),
            Variant::Double(d) => Some(Value::Double(*d)),
            // Only integers a double holds exactly (|i| ≤ 2^53 and others
            // that round-trip): UInt64 max into a double is a mismatch.
            _ => as_i128(v)
                .filter(|&i| i as f64 as i128 == i)
                .map(|i| Value::Double(i as f64)),
        },
        ValueType::String => Some(Value::String(text(v))),
    }
}

/// Integers (and booleans, and integral floats) as i128.
fn as_i128(v: &Variant) -> Option<i128> {
    Some(match v {
        Variant::Boolean(b) => i128::from(*b),
        Variant::SByte(x) => i128::from(*x),
        Variant::Byte(x) => i128::from(*x),
        Variant::Int16(x) => i128::from(*x),
        Variant::UInt16(x) => i128::from(*x),
        Variant::Int32(x) => i128::from(*x),
        Variant::UInt32(x) => i128::from(*x),
        Variant::Int64(x) => i128::from(*x),
        Variant::UInt64(x) => i128::from(*x),
        Variant::Float(f) if f.fract() == 0.0 && f.is_finite() => *f as i128,
        Variant::Double(d) if d.fract() == 0.0 && d.is_finite() && d.abs() < 1e30 => *d as i128,
        _ => return None,
    })
}

/// Any value as text: strings as they are, arrays as JSON arrays.
pub fn text(v: &Variant) -> String {
    match v {
        Variant::String(s) => s.as_ref().to_string(),
        Variant::Array(a) => {
            let items: Vec<serde_json::Value> = a.values.iter().map(json).collect();
            serde_json::Value::Array(items).to_string()
        }
        other => match json(other) {
            serde_json::Value::String(s) => s,
            j => j.to_string(),
        },
    }
}

fn json(v: &Variant) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Variant::Empty => J::Null,
        Variant::Boolean(b) => J::Bool(*b),
        Variant::Float(f) => serde_json::Number::from_f64(crate::value::f32_to_f64(*f))
            .map(J::Number)
            .unwrap_or(J::Null),
        Variant::Double(d) => serde_json::Number::from_f64(*d)
            .map(J::Number)
            .unwrap_or(J::Null),
        Variant::String(s) => J::String(s.as_ref().to_string()),
        Variant::DateTime(t) => J::String(t.to_rfc3339()),
        Variant::Guid(g) => J::String(g.to_string()),
        Variant::StatusCode(c) => J::String(format!("{c}")),
        Variant::ByteString(b) => J::String(b.as_base64()),
        Variant::LocalizedText(t) => J::String(t.text.as_ref().to_string()),
        Variant::QualifiedName(q) => J::String(q.name.as_ref().to_string()),
        Variant::NodeId(n) => J::String(n.to_string()),
        Variant::ExpandedNodeId(n) => J::String(n.to_string()),
        Variant::Array(a) => J::Array(a.values.iter().map(json).collect()),
        Variant::Variant(inner) => json(inner),
        other => match as_i128(other) {
            Some(i) => i64::try_from(i)
                .map(J::from)
                .or_else(|_| u64::try_from(i).map(J::from))
                .unwrap_or(J::Null),
            None => J::String(format!("{other:?}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_opcua::types::{ByteString, LocalizedText, QualifiedName};

    fn conv(t: ValueType) -> Conversion {
        Conversion {
            tag: 7,
            value_type: t,
            timestamp: TimestampChoice::Source,
        }
    }

    #[test]
    fn converts_every_scalar_type_it_can_without_loss() {
        use ValueType::*;
        assert_eq!(convert(&Variant::SByte(-5), Int), Some(Value::Int(-5)));
        assert_eq!(convert(&Variant::Byte(5), Uint), Some(Value::Uint(5)));
        assert_eq!(
            convert(&Variant::Int16(-5), Double),
            Some(Value::Double(-5.0))
        );
        assert_eq!(convert(&Variant::UInt16(5), Int), Some(Value::Int(5)));
        assert_eq!(
            convert(&Variant::UInt64(u64::MAX), Uint),
            Some(Value::Uint(u64::MAX))
        );
        assert_eq!(convert(&Variant::UInt64(u64::MAX), Int), None);
        assert_eq!(convert(&Variant::Int32(-1), Uint), None);
        assert_eq!(
            convert(&Variant::Float(1.5), Double),
            Some(Value::Double(1.5))
        );
        assert_eq!(convert(&Variant::Double(1.5), Int), None);
        assert_eq!(convert(&Variant::Double(2.0), Int), Some(Value::Int(2)));
        assert_eq!(
            convert(&Variant::Boolean(true), Bool),
            Some(Value::Bool(true))
        );
        assert_eq!(convert(&Variant::Int32(1), Bool), Some(Value::Bool(true)));
        assert_eq!(convert(&Variant::Int32(2), Bool), None);
        assert_eq!(convert(&Variant::from("x"), Double), None);
        assert_eq!(convert(&Variant::UInt64(u64::MAX), Double), None);
        assert_eq!(
            convert(&Variant::Int64((1 << 53) + 1), Double),
            None,
            "not exact in a double"
        );
        assert_eq!(
            convert(&Variant::Int64(1 << 53), Double),
            Some(Value::Double(9007199254740992.0))
        );
        assert_eq!(
            convert(&Variant::from("x"), String),
            Some(Value::String("x".into()))
        );
        let lt = Variant::LocalizedText(Box::new(LocalizedText::new("en", "hello")));
        assert_eq!(text(&lt), "hello");
        let qn = Variant::QualifiedName(Box::new(QualifiedName::new(2, "q")));
        assert_eq!(text(&qn), "q");
        assert_eq!(
            text(&Variant::ByteString(ByteString::from(vec![1u8, 2, 3]))),
            "AQID"
        );
        let dt = Variant::DateTime(Box::new(DateTime::ymd_hms(2024, 1, 2, 3, 4, 5)));
        assert!(
            text(&dt).starts_with("2024-01-02T03:04:05"),
            "{}",
            text(&dt)
        );
        let arr = Variant::from(vec![1i32, 2, 3]);
        assert_eq!(convert(&arr, String), Some(Value::String("[1,2,3]".into())));
        assert_eq!(convert(&arr, Int), None);
    }

    #[test]
    fn keeps_status_codes_and_maps_severity() {
        let c = conv(ValueType::Double);
        let mut dv = DataValue::new_now(Variant::Double(1.0));
        dv.status = Some(StatusCode::UncertainLastUsableValue);
        let s = c.sample(dv.clone());
        assert_eq!(s.quality, Quality::Uncertain);
        assert_eq!(s.code, StatusCode::UncertainLastUsableValue.bits());
        assert_eq!(s.value, Some(Value::Double(1.0)));
        dv.status = Some(StatusCode::BadSensorFailure);
        let s = c.sample(dv.clone());
        assert_eq!((s.quality, s.value), (Quality::Bad, None));
        assert_eq!(s.code, StatusCode::BadSensorFailure.bits());
        dv.status = None;
        let s = c.sample(dv);
        assert_eq!((s.quality, s.code), (Quality::Good, 0));
    }

    #[test]
    fn uses_the_configured_timestamp_then_the_other() {
        let mut dv = DataValue::new_now(Variant::Double(1.0));
        dv.source_timestamp = Some(DateTime::ymd_hms(2024, 1, 1, 0, 0, 0));
        dv.server_timestamp = Some(DateTime::ymd_hms(2024, 1, 1, 0, 0, 1));
        let mut c = conv(ValueType::Double);
        let s = c.sample(dv.clone());
        assert_eq!(s.time_ms, 1_704_067_200_000);
        assert_eq!(s.server_time_ms, Some(1_704_067_201_000), "both kept");
        c.timestamp = TimestampChoice::Server;
        assert_eq!(c.sample(dv.clone()).server_time_ms, None);
        assert_eq!(c.sample(dv.clone()).time_ms, 1_704_067_201_000);
        dv.server_timestamp = None;
        assert_eq!(c.sample(dv).time_ms, 1_704_067_200_000);
    }
}
