//! Sparkplug B: the payload subset we read, and the per-node state machine.
//!
//! Wire format: topics `spBv1.0/<group>/<type>/<edge node>[/<device>]`,
//! payloads protobuf `Payload` of Eclipse Sparkplug B 3.0
//! (`sparkplug_b.proto`). Only the fields needed here are declared, by hand,
//! with the spec's field numbers; prost skips the others (metadata,
//! properties, datasets, templates), so payloads using them still decode.
//!
//! State, per edge node (we subscribe to the node's whole topic tree, so we
//! see every message carrying its `seq`):
//! - NBIRTH starts a session: `seq` restarts at 0, its `bdSeq` metric is
//!   remembered, aliases are (re)learned. DBIRTH adds the device's aliases.
//! - Every NBIRTH/NDATA/DBIRTH/DDATA/DDEATH carries `seq`, one more than the
//!   previous message of the node (mod 256). A jump is recorded as a gap:
//!   each of our tags gets a Bad point with code `SPARKPLUG_SEQ_GAP` at the
//!   arrival time, so the lost interval is visible in the stored data.
//! - NDEATH (with the `bdSeq` of the current birth; stale ones are ignored)
//!   marks every tag of the node Bad (`SPARKPLUG_DEATH`), DDEATH those of
//!   the device.
//! - DATA before any birth can name metrics only by alias when the birth was
//!   missed; unknown aliases are reported, never guessed.

use std::collections::HashMap;

use guantong_proto::v1::point::Value;
use prost::Message;
use serde_json::Value as Json;

use super::config::{MqttConfig, ValueType};
use super::decode::json_value;
use crate::quality;

/// `Payload` of sparkplug_b.proto (fields 1 to 4 of 5; `body` and
/// extensions skipped).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
}

/// `Payload.Metric` of sparkplug_b.proto, scalar values only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15")]
    pub value: Option<MetricValue>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MetricValue {
    #[prost(uint32, tag = "10")]
    Int(u32),
    #[prost(uint64, tag = "11")]
    Long(u64),
    #[prost(float, tag = "12")]
    Float(f32),
    #[prost(double, tag = "13")]
    Double(f64),
    #[prost(bool, tag = "14")]
    Boolean(bool),
    #[prost(string, tag = "15")]
    String(String),
}

/// Sparkplug `DataType` numbers used to read signed integers.
mod datatype {
    pub const INT8: u32 = 1;
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const DATETIME: u32 = 13;
}

/// The value of a metric as JSON, its sign restored from the declared type
/// (signed integers travel as two's complement in unsigned fields).
pub fn metric_json(m: &Metric) -> Option<Json> {
    let dt = m.datatype.unwrap_or(0);
    Some(match m.value.as_ref()? {
        MetricValue::Int(v) => match dt {
            datatype::INT8 => Json::from(*v as u8 as i8),
            datatype::INT16 => Json::from(*v as u16 as i16),
            datatype::INT32 => Json::from(*v as i32),
            _ => Json::from(*v),
        },
        MetricValue::Long(v) => match dt {
            datatype::INT64 => Json::from(*v as i64),
            datatype::DATETIME => Json::from(*v),
            _ => Json::from(*v),
        },
        MetricValue::Float(v) => serde_json::Number::from_f64(f64::from(*v))?.into(),
        MetricValue::Double(v) => serde_json::Number::from_f64(*v)?.into(),
        MetricValue::Boolean(b) => Json::Bool(*b),
        MetricValue::String(s) => Json::String(s.clone()),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SparkplugError {
    #[error("not a Sparkplug B topic")]
    Topic,
    #[error("payload is not a Sparkplug B protobuf: {0}")]
    Protobuf(String),
    #[error("metric alias {alias} unknown (no birth certificate seen since the node's last death)")]
    UnknownAlias { alias: u64 },
    #[error("{kind} without `seq`")]
    NoSeq { kind: &'static str },
}

/// What one message means for our tags.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Index into the device's tags.
    pub tag: usize,
    pub time_ms: i64,
    /// The value, or a Bad code with the reason.
    pub value: Result<Value, (u32, String)>,
}

/// Message types of the `<type>` topic level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NBirth,
    NData,
    NDeath,
    DBirth,
    DData,
    DDeath,
    /// NCMD/DCMD/STATE and the like: not ours to read.
    Other,
}

impl Kind {
    fn parse(s: &str) -> Kind {
        match s {
            "NBIRTH" => Kind::NBirth,
            "NDATA" => Kind::NData,
            "NDEATH" => Kind::NDeath,
            "DBIRTH" => Kind::DBirth,
            "DDATA" => Kind::DData,
            "DDEATH" => Kind::DDeath,
            _ => Kind::Other,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::NBirth => "NBIRTH",
            Kind::NData => "NDATA",
            Kind::NDeath => "NDEATH",
            Kind::DBirth => "DBIRTH",
            Kind::DData => "DDATA",
            Kind::DDeath => "DDEATH",
            Kind::Other => "other",
        }
    }
}

/// One device's Sparkplug mapping and the state of its edge node.
#[derive(Debug, Clone)]
pub struct SparkplugNode {
    group: String,
    node: String,
    device: Option<String>,
    /// Metric name and type of each tag.
    tags: Vec<(String, ValueType)>,
    by_name: HashMap<String, usize>,
    /// Alias -> metric name, learned from births.
    aliases: HashMap<u64, String>,
    bd_seq: Option<u64>,
    last_seq: Option<u64>,
    /// Gaps seen since start.
    pub gaps: u64,
}

impl SparkplugNode {
    pub fn new(config: &MqttConfig) -> SparkplugNode {
        let tags: Vec<(String, ValueType)> = config
            .tags
            .iter()
            .map(|t| {
                (
                    t.metric.clone().unwrap_or_else(|| t.name.clone()),
                    t.data_type,
                )
            })
            .collect();
        let by_name = tags
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        SparkplugNode {
            group: config.group.clone().unwrap_or_default(),
            node: config.edge_node.clone().unwrap_or_default(),
            device: config.sparkplug_device.clone(),
            tags,
            by_name,
            aliases: HashMap::new(),
            bd_seq: None,
            last_seq: None,
            gaps: 0,
        }
    }

    /// Applies one message of the node's topic tree.
    pub fn handle(
        &mut self,
        topic: &str,
        payload: &[u8],
        arrival_ms: i64,
    ) -> Result<Vec<Item>, SparkplugError> {
        let levels: Vec<&str> = topic.split('/').collect();
        let (kind, device) = match levels.as_slice() {
            ["spBv1.0", g, k, n] if *g == self.group && *n == self.node => (Kind::parse(k), None),
            ["spBv1.0", g, k, n, d] if *g == self.group && *n == self.node => {
                (Kind::parse(k), Some(*d))
            }
            _ => return Err(SparkplugError::Topic),
        };
        if kind == Kind::Other {
            return Ok(Vec::new());
        }
        let p = Payload::decode(payload).map_err(|e| SparkplugError::Protobuf(e.to_string()))?;
        let time_of = |m: Option<&Metric>| {
            m.and_then(|m| m.timestamp)
                .or(p.timestamp)
                .and_then(|t| i64::try_from(t).ok())
                .unwrap_or(arrival_ms)
        };
        let ours = device == self.device.as_deref();
        let mut out = Vec::new();

        if kind == Kind::NDeath {
            let bd = p
                .metrics
                .iter()
                .find(|m| m.name.as_deref() == Some("bdSeq"))
                .and_then(|m| match m.value {
                    Some(MetricValue::Long(v)) => Some(v),
                    Some(MetricValue::Int(v)) => Some(u64::from(v)),
                    _ => None,
                });
            // A death certificate of an earlier session (the broker sends
            // the will late) says nothing about the current one.
            if bd.is_some() && self.bd_seq.is_some() && bd != self.bd_seq {
                return Ok(out);
            }
            self.last_seq = None;
            self.aliases.clear();
            self.mark_all(&mut out, arrival_ms, quality::SPARKPLUG_DEATH, "NDEATH");
            return Ok(out);
        }

        let seq = p.seq.ok_or(SparkplugError::NoSeq { kind: kind.name() })?;
        if kind == Kind::NBirth {
            self.bd_seq = p
                .metrics
                .iter()
                .find(|m| m.name.as_deref() == Some("bdSeq"))
                .and_then(|m| match m.value {
                    Some(MetricValue::Long(v)) => Some(v),
                    Some(MetricValue::Int(v)) => Some(u64::from(v)),
                    _ => None,
                });
            self.aliases.clear();
        } else if let Some(last) = self.last_seq {
            let expected = (last + 1) % 256;
            if seq != expected {
                self.gaps += 1;
                let reason = format!("seq gap: expected {expected}, got {seq}");
                self.mark_all(&mut out, arrival_ms, quality::SPARKPLUG_SEQ_GAP, &reason);
            }
        }
        self.last_seq = Some(seq);

        if matches!(kind, Kind::NBirth | Kind::DBirth) {
            for m in &p.metrics {
                if let (Some(a), Some(n)) = (m.alias, &m.name) {
                    self.aliases.insert(a, n.clone());
                }
            }
        }
        if !ours {
            return Ok(out);
        }
        if kind == Kind::DDeath {
            self.mark_all(&mut out, arrival_ms, quality::SPARKPLUG_DEATH, "DDEATH");
            return Ok(out);
        }
        let mut unknown_alias = None;
        for m in &p.metrics {
            let name = match (&m.name, m.alias) {
                (Some(n), _) => n.as_str(),
                (None, Some(a)) => match self.aliases.get(&a) {
                    Some(n) => n.as_str(),
                    None => {
                        unknown_alias = Some(a);
                        continue;
                    }
                },
                (None, None) => continue,
            };
            let Some(&tag) = self.by_name.get(name) else {
                continue;
            };
            if m.is_null == Some(true) {
                continue;
            }
            let value = match metric_json(m) {
                Some(j) => {
                    json_value(&j, self.tags[tag].1).map_err(|e| (quality::MQTT_TYPE_MISMATCH, e))
                }
                None => Err((
                    quality::MQTT_TYPE_MISMATCH,
                    format!("metric `{name}` has no scalar value"),
                )),
            };
            out.push(Item {
                tag,
                time_ms: time_of(Some(m)),
                value,
            });
        }
        match unknown_alias {
            Some(alias) if out.is_empty() => Err(SparkplugError::UnknownAlias { alias }),
            _ => Ok(out),
        }
    }

    fn mark_all(&self, out: &mut Vec<Item>, time_ms: i64, code: u32, reason: &str) {
        out.extend((0..self.tags.len()).map(|tag| Item {
            tag,
            time_ms,
            value: Err((code, reason.to_string())),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DeviceConfig};
    use std::path::Path;

    fn node(device: Option<&str>) -> SparkplugNode {
        let dev = device
            .map(|d| format!("sparkplug_device = \"{d}\"\n"))
            .unwrap_or_default();
        let text = format!(
            "[gateway]\nid = \"gw\"\n[uplink]\nendpoint = \"https://x:1\"\ntoken = \"t\"\n[buffer]\ndir = \"b\"\n\
             [[devices]]\nid = \"n1\"\nprotocol = \"mqtt\"\nbroker = \"mqtt://127.0.0.1\"\npayload = \"sparkplug\"\n\
             group = \"plant\"\nedge_node = \"node1\"\n{dev}\
             [[devices.tags]]\nname = \"temp\"\nmetric = \"Temperature\"\n\
             [[devices.tags]]\nname = \"count\"\ntype = \"int\"\n"
        );
        match Config::parse(&text, Path::new("/"))
            .expect("valid")
            .devices
            .remove(0)
        {
            DeviceConfig::Mqtt(m) => SparkplugNode::new(&m),
            _ => panic!("not mqtt"),
        }
    }

    /// NBIRTH, seq 0, timestamp 1000: bdSeq (Int64 7), Temperature alias 1
    /// Double 21.5, count alias 2 Int32 -2, hand-encoded.
    const NBIRTH: &[u8] = &[
        0x08, 0xe8, 0x07, // timestamp = 1000
        0x12, 0x09, 0x0a, 0x05, b'b', b'd', b'S', b'e', b'q', 0x58, 0x07, // bdSeq = 7 (long)
        0x12, 0x18, 0x0a, 0x0b, b'T', b'e', b'm', b'p', b'e', b'r', b'a', b't', b'u', b'r', b'e',
        0x10, 0x01, // alias 1
        0x69, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x35, 0x40, // double 21.5
        0x12, 0x11, 0x0a, 0x05, b'c', b'o', b'u', b'n', b't', 0x10, 0x02, // alias 2
        0x20, 0x03, // datatype Int32
        0x50, 0xfe, 0xff, 0xff, 0xff, 0x0f, // int_value = 0xfffffffe
        0x18, 0x00, // seq = 0
    ];

    /// NDATA, seq 1: alias 1 Double 22.0 with metric timestamp 2000.
    const NDATA_SEQ1: &[u8] = &[
        0x12, 0x0e, 0x10, 0x01, 0x18, 0xd0, 0x0f, // alias 1, timestamp 2000
        0x69, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x36, 0x40, // double 22.0
        0x18, 0x01, // seq = 1
    ];

    #[test]
    fn hand_encoded_bytes_match_prost() {
        let p = Payload::decode(NBIRTH).expect("decodes");
        assert_eq!(p.seq, Some(0));
        assert_eq!(p.timestamp, Some(1000));
        assert_eq!(p.metrics.len(), 3);
        assert_eq!(metric_json(&p.metrics[2]), Some(Json::from(-2)));
        assert_eq!(
            Payload::decode(NBIRTH).expect("ok").encode_to_vec().len(),
            NBIRTH.len()
        );
    }

    #[test]
    fn birth_then_data_by_alias() {
        let mut n = node(None);
        let birth = n
            .handle("spBv1.0/plant/NBIRTH/node1", NBIRTH, 5)
            .expect("ok");
        assert_eq!(
            birth,
            [
                Item {
                    tag: 0,
                    time_ms: 1000,
                    value: Ok(Value::Double(21.5))
                },
                Item {
                    tag: 1,
                    time_ms: 1000,
                    value: Ok(Value::Int(-2))
                },
            ]
        );
        let data = n
            .handle("spBv1.0/plant/NDATA/node1", NDATA_SEQ1, 5)
            .expect("ok");
        assert_eq!(
            data,
            [Item {
                tag: 0,
                time_ms: 2000,
                value: Ok(Value::Double(22.0))
            }]
        );
    }

    #[test]
    fn records_a_seq_gap_and_death() {
        let mut n = node(None);
        n.handle("spBv1.0/plant/NBIRTH/node1", NBIRTH, 5)
            .expect("ok");
        // seq 3 after 0: messages 1 and 2 lost.
        let mut skipped = NDATA_SEQ1.to_vec();
        let last = skipped.len() - 1;
        skipped[last] = 3;
        let items = n
            .handle("spBv1.0/plant/NDATA/node1", &skipped, 9)
            .expect("ok");
        assert_eq!(n.gaps, 1);
        assert_eq!(
            items[0].value,
            Err((
                quality::SPARKPLUG_SEQ_GAP,
                "seq gap: expected 1, got 3".into()
            ))
        );
        assert_eq!(items[1].tag, 1);
        assert_eq!(items[2].value, Ok(Value::Double(22.0)));

        // NDEATH of an older session (bdSeq 6): ignored.
        let stale = [
            0x12, 0x09, 0x0a, 0x05, b'b', b'd', b'S', b'e', b'q', 0x58, 0x06,
        ];
        assert_eq!(
            n.handle("spBv1.0/plant/NDEATH/node1", &stale, 9),
            Ok(vec![])
        );
        let death = [
            0x12, 0x09, 0x0a, 0x05, b'b', b'd', b'S', b'e', b'q', 0x58, 0x07,
        ];
        let items = n
            .handle("spBv1.0/plant/NDEATH/node1", &death, 10)
            .expect("ok");
        assert_eq!(items.len(), 2);
        assert!(items.iter().all(
            |i| i.value == Err((quality::SPARKPLUG_DEATH, "NDEATH".into())) && i.time_ms == 10
        ));
        // After death the aliases are forgotten: data by alias is refused.
        assert!(
            n.handle("spBv1.0/plant/NDATA/node1", NDATA_SEQ1, 5)
                .is_err()
        );
    }

    #[test]
    fn device_messages_count_for_the_node_seq() {
        let mut n = node(Some("pump"));
        let items = n
            .handle("spBv1.0/plant/NBIRTH/node1", NBIRTH, 5)
            .expect("ok");
        assert!(items.is_empty(), "node metrics are not the device's");
        let mut dbirth = NDATA_SEQ1.to_vec();
        dbirth[2..4].copy_from_slice(&[0x10, 0x09]); // alias 9, unknown
        assert!(
            n.handle("spBv1.0/plant/DDATA/node1/pump", &dbirth, 5)
                .is_err()
        );
        let items = n
            .handle("spBv1.0/plant/DDEATH/node1/pump", &[0x18, 0x02], 7)
            .expect("ok");
        assert_eq!(n.gaps, 0, "seq 1 went to the failed DDATA");
        assert_eq!(items.len(), 2);
        assert_eq!(
            items[0].value,
            Err((quality::SPARKPLUG_DEATH, "DDEATH".into()))
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut n = node(None);
        assert!(matches!(
            n.handle("spBv1.0/plant/NDATA/node1", &[0xff, 0xff, 0xff], 0),
            Err(SparkplugError::Protobuf(_))
        ));
        assert_eq!(
            n.handle("spBv1.0/plant/NDATA/node1", &[], 0),
            Err(SparkplugError::NoSeq { kind: "NDATA" })
        );
        assert_eq!(
            n.handle("spBv1.0/other/NDATA/node1", &[], 0),
            Err(SparkplugError::Topic)
        );
    }
}
