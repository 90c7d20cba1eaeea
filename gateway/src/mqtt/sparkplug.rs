//! Sparkplug B: the payload, the per-node state machine of a host
//! application, and the rebirth requests it makes.
//!
//! Wire format: topics `spBv1.0/<group>/<type>/<edge node>[/<device>]`,
//! payloads protobuf `Payload` of Eclipse Sparkplug B 3.0
//! (`sparkplug_b.proto`). The messages are declared here by hand with the
//! spec's field numbers; what we do not read (metadata, properties,
//! extensions) prost skips, so payloads using it still decode.
//!
//! Births are the source of truth. NBIRTH/DBIRTH give each metric its name,
//! alias and datatype; data messages may omit the name (alias only) and the
//! datatype (the spec requires it only in births), and are decoded with the
//! birth's. Signed integers travel as two's complement in unsigned fields,
//! so the datatype decides the sign: without it Int32 -1 would read
//! 4294967295. Values become JSON first (one place for every datatype), then
//! the tag's type:
//! - Int8..Int64 signed, UInt8..UInt64 and DateTime (ms) unsigned, Float as
//!   its shortest decimal (`value::f32_to_f64`), Double, Boolean;
//! - String, Text, UUID as text; Bytes, File and the arrays (packed bytes)
//!   as base64 text; DataSet and Template as JSON text; PropertySet values
//!   are not read (Bad `MQTT_TYPE_MISMATCH`, "no value");
//! - `is_null` is a Bad point `SPARKPLUG_NULL`; a value of the wrong kind
//!   for its datatype or for the tag is a Bad point `MQTT_TYPE_MISMATCH`
//!   for that tag only, the message's other metrics are stored.
//!
//! State, per edge node (we subscribe to the node's whole topic tree, so we
//! see every message carrying its `seq`):
//! - NBIRTH starts a session: `seq` restarts at 0, its `bdSeq` metric is
//!   remembered, the birth table is (re)learned. DBIRTH adds the device's.
//! - Every NBIRTH/NDATA/DBIRTH/DDATA/DDEATH carries `seq`, one more than the
//!   previous message of the node (mod 256). A jump is recorded as a gap:
//!   each of our tags gets a Bad point `SPARKPLUG_SEQ_GAP` at the arrival
//!   time, so the lost interval is visible in the stored data.
//! - NDEATH (with the `bdSeq` of the current birth; stale ones are ignored)
//!   marks every tag of the node Bad (`SPARKPLUG_DEATH`), DDEATH those of
//!   the device.
//!
//! Rebirth (a host application's duty, Sparkplug 3.0 §6.4.x): the state is
//! incomplete when data arrives for a node with no birth since start or
//! since its death, when a data metric's alias is not in the birth table,
//! after a `seq` gap, and at start-up. `handle` then says why
//! (`Handled::rebirth`) and the collector publishes NCMD
//! `Node Control/Rebirth` = true, at most once per `REBIRTH_EVERY` per node
//! for the whole process ([`NodeRegistry`]: the collectors of several
//! Sparkplug devices of one node share it, so a node gets one request and
//! its warnings are logged once, not once per device). Data that cannot be
//! attributed meanwhile (unknown alias, undecodable payload) gives each of
//! our tags without a value a Bad point `MQTT_MALFORMED_PAYLOAD`, never
//! a guessed one.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use guantong_proto::v1::point::Value;
use prost::Message;
use serde_json::{Value as Json, json};

use super::config::{MqttConfig, ValueType};
use super::decode::json_value;
use crate::quality;
use crate::value::f32_to_f64;

/// At most one rebirth request per node per this interval.
pub const REBIRTH_EVERY: Duration = Duration::from_secs(5);
/// The same warning about a node is logged once per this interval.
const WARN_SAME_EVERY: Duration = Duration::from_secs(10);
/// The metric of an NCMD that asks an edge node for its births.
pub const REBIRTH_METRIC: &str = "Node Control/Rebirth";

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

/// `Payload.Metric` of sparkplug_b.proto (metadata, properties and the
/// extension value skipped).
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
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16, 17, 18")]
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
    #[prost(bytes, tag = "16")]
    Bytes(Vec<u8>),
    #[prost(message, tag = "17")]
    DataSet(DataSet),
    #[prost(message, tag = "18")]
    Template(Template),
}

/// `Payload.DataSet`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DataSet {
    #[prost(uint64, optional, tag = "1")]
    pub num_of_columns: Option<u64>,
    #[prost(string, repeated, tag = "2")]
    pub columns: Vec<String>,
    #[prost(uint32, repeated, tag = "3")]
    pub types: Vec<u32>,
    #[prost(message, repeated, tag = "4")]
    pub rows: Vec<Row>,
}

/// `Payload.DataSet.Row`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Row {
    #[prost(message, repeated, tag = "1")]
    pub elements: Vec<DataSetValue>,
}

/// `Payload.DataSet.DataSetValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DataSetValue {
    #[prost(oneof = "ElementValue", tags = "1, 2, 3, 4, 5, 6")]
    pub value: Option<ElementValue>,
}

/// The scalar values a DataSet cell or a Template parameter can hold.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ElementValue {
    #[prost(uint32, tag = "1")]
    Int(u32),
    #[prost(uint64, tag = "2")]
    Long(u64),
    #[prost(float, tag = "3")]
    Float(f32),
    #[prost(double, tag = "4")]
    Double(f64),
    #[prost(bool, tag = "5")]
    Boolean(bool),
    #[prost(string, tag = "6")]
    String(String),
}

/// `Payload.Template`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Template {
    #[prost(string, optional, tag = "1")]
    pub version: Option<String>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    #[prost(message, repeated, tag = "3")]
    pub parameters: Vec<Parameter>,
    #[prost(string, optional, tag = "4")]
    pub template_ref: Option<String>,
    #[prost(bool, optional, tag = "5")]
    pub is_definition: Option<bool>,
}

/// `Payload.Template.Parameter` (its value fields are numbered 3 to 8).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Parameter {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint32, optional, tag = "2")]
    pub r#type: Option<u32>,
    #[prost(oneof = "ParameterValue", tags = "3, 4, 5, 6, 7, 8")]
    pub value: Option<ParameterValue>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ParameterValue {
    #[prost(uint32, tag = "3")]
    Int(u32),
    #[prost(uint64, tag = "4")]
    Long(u64),
    #[prost(float, tag = "5")]
    Float(f32),
    #[prost(double, tag = "6")]
    Double(f64),
    #[prost(bool, tag = "7")]
    Boolean(bool),
    #[prost(string, tag = "8")]
    String(String),
}

/// Sparkplug `DataType` numbers (sparkplug_b.proto).
pub mod datatype {
    pub const UNKNOWN: u32 = 0;
    pub const INT8: u32 = 1;
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const UINT8: u32 = 5;
    pub const UINT16: u32 = 6;
    pub const UINT32: u32 = 7;
    pub const UINT64: u32 = 8;
    pub const FLOAT: u32 = 9;
    pub const DOUBLE: u32 = 10;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
    pub const DATETIME: u32 = 13;
    pub const TEXT: u32 = 14;
    pub const UUID: u32 = 15;
    pub const DATASET: u32 = 16;
    pub const BYTES: u32 = 17;
    pub const FILE: u32 = 18;
    pub const TEMPLATE: u32 = 19;
    /// Int8Array..DateTimeArray: packed little-endian in `bytes_value`,
    /// stored as base64 like Bytes.
    pub const ARRAYS_FIRST: u32 = 22;
    pub const ARRAYS_LAST: u32 = 34;

    /// The name the specification gives `datatype`.
    pub fn name(datatype: u32) -> &'static str {
        const NAMES: [&str; 20] = [
            "Unknown", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
            "Float", "Double", "Boolean", "String", "DateTime", "Text", "UUID", "DataSet", "Bytes",
            "File", "Template",
        ];
        NAMES
            .get(datatype as usize)
            .copied()
            .unwrap_or("unsupported")
    }
}

/// A signed or unsigned integer field read as `datatype`: signed types
/// restore their sign from the two's complement (whether the edge node
/// sign-extended it to 32 bits or not), unsigned ones must fit.
fn integer(datatype: u32, v: u64) -> Result<Json, String> {
    use datatype::*;
    Ok(match datatype {
        INT8 => Json::from(v as u8 as i8),
        INT16 => Json::from(v as u16 as i16),
        INT32 => Json::from(v as u32 as i32),
        INT64 => Json::from(v as i64),
        UINT8 if v <= u64::from(u8::MAX) => Json::from(v),
        UINT16 if v <= u64::from(u16::MAX) => Json::from(v),
        UINT32 if v <= u64::from(u32::MAX) => Json::from(v),
        UINT8 | UINT16 | UINT32 => {
            return Err(format!("{v} does not fit {}", name(datatype)));
        }
        _ => Json::from(v),
    })
}

/// A float or double as JSON; NaN and the infinities as text (JSON has no
/// number for them; a `double` tag reads the text back as the number).
fn float(v: f64) -> Json {
    serde_json::Number::from_f64(v)
        .map(Json::Number)
        .unwrap_or_else(|| Json::String(v.to_string()))
}

/// The value of `m` as JSON, read as `datatype` (the metric's own, else the
/// birth's). `Ok(None)`: no value (e.g. `is_null`).
pub fn metric_json(m: &Metric, datatype: u32) -> Result<Option<Json>, String> {
    use datatype::*;
    let Some(value) = &m.value else {
        return Ok(None);
    };
    let kind = |k: &str| format!("declared {} but carries {k}", datatype::name(datatype));
    let json = match (datatype, value) {
        (INT8 | INT16 | INT32 | UINT8 | UINT16 | UINT32 | UNKNOWN, MetricValue::Int(v)) => {
            integer(datatype, u64::from(*v))?
        }
        (INT64 | UINT64 | DATETIME | UNKNOWN, MetricValue::Long(v)) => integer(datatype, *v)?,
        // Tolerated: a small integer type in the long field.
        (INT8 | INT16 | INT32 | UINT8 | UINT16 | UINT32, MetricValue::Long(v)) => {
            integer(datatype, *v)?
        }
        (FLOAT | UNKNOWN, MetricValue::Float(v)) => float(f32_to_f64(*v)),
        (DOUBLE | UNKNOWN, MetricValue::Double(v)) => float(*v),
        (BOOLEAN | UNKNOWN, MetricValue::Boolean(b)) => Json::Bool(*b),
        (STRING | TEXT | UUID | UNKNOWN, MetricValue::String(s)) => Json::String(s.clone()),
        (BYTES | FILE | UNKNOWN | ARRAYS_FIRST..=ARRAYS_LAST, MetricValue::Bytes(b)) => {
            Json::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        (DATASET | UNKNOWN, MetricValue::DataSet(d)) => Json::String(dataset_json(d).to_string()),
        (TEMPLATE | UNKNOWN, MetricValue::Template(t)) => {
            Json::String(template_json(t).to_string())
        }
        (_, MetricValue::Int(_)) => return Err(kind("a 32-bit integer")),
        (_, MetricValue::Long(_)) => return Err(kind("a 64-bit integer")),
        (_, MetricValue::Float(_)) => return Err(kind("a float")),
        (_, MetricValue::Double(_)) => return Err(kind("a double")),
        (_, MetricValue::Boolean(_)) => return Err(kind("a boolean")),
        (_, MetricValue::String(_)) => return Err(kind("text")),
        (_, MetricValue::Bytes(_)) => return Err(kind("bytes")),
        (_, MetricValue::DataSet(_)) => return Err(kind("a DataSet")),
        (_, MetricValue::Template(_)) => return Err(kind("a Template")),
    };
    Ok(Some(json))
}

/// A scalar cell or parameter as JSON, read as `datatype`.
fn element_json(datatype: u32, v: &ElementValue) -> Json {
    match v {
        ElementValue::Int(i) => integer(datatype, u64::from(*i)).unwrap_or(Json::from(*i)),
        ElementValue::Long(l) => integer(datatype, *l).unwrap_or(Json::from(*l)),
        ElementValue::Float(f) => float(f32_to_f64(*f)),
        ElementValue::Double(d) => float(*d),
        ElementValue::Boolean(b) => Json::Bool(*b),
        ElementValue::String(s) => Json::String(s.clone()),
    }
}

/// `{"columns": [...], "types": ["Int32", ...], "rows": [[...], ...]}`.
fn dataset_json(d: &DataSet) -> Json {
    let rows: Vec<Json> = d
        .rows
        .iter()
        .map(|r| {
            r.elements
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let t = d.types.get(i).copied().unwrap_or(datatype::UNKNOWN);
                    e.value.as_ref().map_or(Json::Null, |v| element_json(t, v))
                })
                .collect()
        })
        .collect();
    let types: Vec<&str> = d.types.iter().map(|t| datatype::name(*t)).collect();
    json!({"columns": d.columns, "types": types, "rows": rows})
}

/// `{"template_ref": .., "version": .., "parameters": {name: value},
/// "metrics": {name: value}}`, members read with their own datatypes.
fn template_json(t: &Template) -> Json {
    let parameters: serde_json::Map<String, Json> = t
        .parameters
        .iter()
        .map(|p| {
            let dt = p.r#type.unwrap_or(datatype::UNKNOWN);
            let v = p.value.as_ref().map_or(Json::Null, |v| {
                let e = match v {
                    ParameterValue::Int(i) => ElementValue::Int(*i),
                    ParameterValue::Long(l) => ElementValue::Long(*l),
                    ParameterValue::Float(f) => ElementValue::Float(*f),
                    ParameterValue::Double(d) => ElementValue::Double(*d),
                    ParameterValue::Boolean(b) => ElementValue::Boolean(*b),
                    ParameterValue::String(s) => ElementValue::String(s.clone()),
                };
                element_json(dt, &e)
            });
            (p.name.clone().unwrap_or_default(), v)
        })
        .collect();
    let metrics: serde_json::Map<String, Json> = t
        .metrics
        .iter()
        .map(|m| {
            let v = metric_json(m, m.datatype.unwrap_or(datatype::UNKNOWN))
                .ok()
                .flatten()
                .unwrap_or(Json::Null);
            (m.name.clone().unwrap_or_default(), v)
        })
        .collect();
    json!({
        "template_ref": t.template_ref,
        "version": t.version,
        "parameters": parameters,
        "metrics": metrics,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SparkplugError {
    #[error("not a Sparkplug B topic")]
    Topic,
    #[error("payload is not a Sparkplug B protobuf: {0}")]
    Protobuf(String),
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

/// The outcome of one message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Handled {
    pub items: Vec<Item>,
    /// Why the node should send its births again, if it should.
    pub rebirth: Option<String>,
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

/// A metric as its birth certificate declared it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Born {
    /// The device of the DBIRTH, None for the NBIRTH.
    device: Option<String>,
    name: String,
    datatype: u32,
}

/// The birth certificates of one edge node's current session: what data
/// messages are read with. Aliases are unique across the node and its
/// devices; names only within one of them.
#[derive(Debug, Clone, Default)]
pub struct BirthTable {
    by_alias: HashMap<u64, Born>,
    /// (device, name) -> datatype.
    by_name: HashMap<(Option<String>, String), u32>,
}

impl BirthTable {
    /// Learns the metrics of one NBIRTH (`device` None) or DBIRTH.
    pub fn learn(&mut self, device: Option<&str>, metrics: &[Metric]) {
        for m in metrics {
            let Some(name) = &m.name else { continue };
            let datatype = m.datatype.unwrap_or(datatype::UNKNOWN);
            let device = device.map(str::to_string);
            if let Some(a) = m.alias {
                self.by_alias.insert(
                    a,
                    Born {
                        device: device.clone(),
                        name: name.clone(),
                        datatype,
                    },
                );
            }
            self.by_name.insert((device, name.clone()), datatype);
        }
    }

    pub fn clear(&mut self) {
        self.by_alias.clear();
        self.by_name.clear();
    }

    /// A data metric's name and datatype from the births; Err(alias) when
    /// its alias was never born. The metric's own name and datatype win.
    pub fn resolve(&self, device: Option<&str>, m: &Metric) -> Result<(String, u32), u64> {
        let (name, born_type) = match (&m.name, m.alias) {
            (Some(n), _) => (
                n.clone(),
                self.by_name
                    .get(&(device.map(str::to_string), n.clone()))
                    .copied(),
            ),
            (None, Some(a)) => match self.by_alias.get(&a) {
                Some(b) => (b.name.clone(), Some(b.datatype)),
                None => return Err(a),
            },
            (None, None) => (String::new(), None),
        };
        let datatype = m.datatype.or(born_type).unwrap_or(datatype::UNKNOWN);
        Ok((name, datatype))
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
    births: BirthTable,
    /// Whether an NBIRTH was seen since start or since the last NDEATH.
    born: bool,
    /// Why a rebirth was wanted, until the NBIRTH that answers it: every
    /// data message meanwhile asks again (the registry's rate limit decides
    /// whether a request goes out).
    awaiting_birth: Option<String>,
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
            births: BirthTable::default(),
            born: false,
            awaiting_birth: None,
            bd_seq: None,
            last_seq: None,
            gaps: 0,
        }
    }

    /// `group/node`, the node's key in the [`NodeRegistry`].
    pub fn key(&self) -> String {
        format!("{}/{}", self.group, self.node)
    }

    /// The NCMD topic and payload asking this node for its births.
    pub fn rebirth_request(&self, now_ms: i64) -> (String, Vec<u8>) {
        let ts = u64::try_from(now_ms).unwrap_or(0);
        let payload = Payload {
            timestamp: Some(ts),
            metrics: vec![Metric {
                name: Some(REBIRTH_METRIC.into()),
                timestamp: Some(ts),
                datatype: Some(datatype::BOOLEAN),
                value: Some(MetricValue::Boolean(true)),
                ..Metric::default()
            }],
            seq: None,
            uuid: None,
        };
        (
            format!("spBv1.0/{}/NCMD/{}", self.group, self.node),
            payload.encode_to_vec(),
        )
    }

    /// Whether this node's session is known (an NBIRTH seen since start or
    /// since its death).
    pub fn is_born(&self) -> bool {
        self.born
    }

    /// Applies one message of the node's topic tree.
    pub fn handle(
        &mut self,
        topic: &str,
        payload: &[u8],
        arrival_ms: i64,
    ) -> Result<Handled, SparkplugError> {
        let levels: Vec<&str> = topic.split('/').collect();
        let (kind, device) = match levels.as_slice() {
            ["spBv1.0", g, k, n] if *g == self.group && *n == self.node => (Kind::parse(k), None),
            ["spBv1.0", g, k, n, d] if *g == self.group && *n == self.node => {
                (Kind::parse(k), Some(*d))
            }
            _ => return Err(SparkplugError::Topic),
        };
        if kind == Kind::Other {
            return Ok(Handled::default());
        }
        let ours = device == self.device.as_deref();
        let p = match Payload::decode(payload) {
            Ok(p) => p,
            Err(e) => return Err(self.undecodable(SparkplugError::Protobuf(e.to_string()))),
        };
        let time_of = |m: Option<&Metric>| {
            m.and_then(|m| m.timestamp)
                .or(p.timestamp)
                .and_then(|t| i64::try_from(t).ok())
                .unwrap_or(arrival_ms)
        };
        let mut out = Handled::default();

        if kind == Kind::NDeath {
            let bd = bd_seq(&p);
            // A death certificate of an earlier session (the broker sends
            // the will late) says nothing about the current one.
            if bd.is_some() && self.bd_seq.is_some() && bd != self.bd_seq {
                return Ok(out);
            }
            self.last_seq = None;
            self.born = false;
            self.births.clear();
            self.mark_all(
                &mut out.items,
                arrival_ms,
                quality::SPARKPLUG_DEATH,
                "NDEATH",
            );
            return Ok(out);
        }

        let Some(seq) = p.seq else {
            return Err(self.undecodable(SparkplugError::NoSeq { kind: kind.name() }));
        };
        if kind == Kind::NBirth {
            self.bd_seq = bd_seq(&p);
            self.births.clear();
            self.born = true;
            self.awaiting_birth = None;
        } else if !self.born {
            out.rebirth = Some(format!("{} before any NBIRTH", kind.name()));
        } else if let Some(last) = self.last_seq {
            let expected = (last + 1) % 256;
            if seq != expected {
                self.gaps += 1;
                let reason = format!("seq gap: expected {expected}, got {seq}");
                self.mark_all(
                    &mut out.items,
                    arrival_ms,
                    quality::SPARKPLUG_SEQ_GAP,
                    &reason,
                );
                out.rebirth = Some(reason);
            }
        }
        self.last_seq = Some(seq);
        match &out.rebirth {
            Some(reason) => {
                self.awaiting_birth.get_or_insert_with(|| reason.clone());
            }
            None => out.rebirth.clone_from(&self.awaiting_birth),
        }

        if matches!(kind, Kind::NBirth | Kind::DBirth) {
            self.births.learn(device, &p.metrics);
        }
        if !ours {
            return Ok(out);
        }
        if kind == Kind::DDeath {
            self.mark_all(
                &mut out.items,
                arrival_ms,
                quality::SPARKPLUG_DEATH,
                "DDEATH",
            );
            return Ok(out);
        }
        let mut unknown_alias = None;
        let mut valued = vec![false; self.tags.len()];
        for m in &p.metrics {
            let (name, datatype) = match self.births.resolve(device, m) {
                Ok(r) => r,
                Err(alias) => {
                    unknown_alias.get_or_insert(alias);
                    continue;
                }
            };
            let Some(&tag) = self.by_name.get(&name) else {
                continue;
            };
            valued[tag] = true;
            let value = if m.is_null == Some(true) {
                Err((quality::SPARKPLUG_NULL, format!("metric `{name}` is null")))
            } else {
                match metric_json(m, datatype) {
                    Ok(Some(j)) => json_value(&j, self.tags[tag].1),
                    Ok(None) => Err("no value".to_string()),
                    Err(e) => Err(e),
                }
                .map_err(|e| (quality::MQTT_TYPE_MISMATCH, format!("metric `{name}`: {e}")))
            };
            out.items.push(Item {
                tag,
                time_ms: time_of(Some(m)),
                value,
            });
        }
        if let Some(alias) = unknown_alias {
            let reason = format!("metric alias {alias} not in any birth certificate");
            out.items.extend(
                (0..self.tags.len())
                    .filter(|t| !valued[*t])
                    .map(|tag| Item {
                        tag,
                        time_ms: arrival_ms,
                        value: Err((quality::MQTT_MALFORMED_PAYLOAD, reason.clone())),
                    }),
            );
            self.awaiting_birth.get_or_insert_with(|| reason.clone());
            out.rebirth.get_or_insert(reason);
        }
        Ok(out)
    }

    /// A message we cannot read: the session state is unknown from here on,
    /// so the next data asks for a rebirth.
    fn undecodable(&mut self, e: SparkplugError) -> SparkplugError {
        self.born = false;
        self.last_seq = None;
        e
    }

    /// Bad points `MQTT_MALFORMED_PAYLOAD` for every tag (a message of
    /// ours that did not decode).
    pub fn mark_malformed(&self, time_ms: i64, reason: &str) -> Vec<Item> {
        let mut out = Vec::new();
        self.mark_all(&mut out, time_ms, quality::MQTT_MALFORMED_PAYLOAD, reason);
        out
    }

    /// Whether `topic` carries data of this device (NDATA for the node's own
    /// metrics, DDATA of our device).
    pub fn is_our_data(&self, topic: &str) -> bool {
        let levels: Vec<&str> = topic.split('/').collect();
        match (levels.as_slice(), &self.device) {
            (["spBv1.0", g, "NDATA", n], None) => *g == self.group && *n == self.node,
            (["spBv1.0", g, "DDATA", n, d], Some(ours)) => {
                *g == self.group && *n == self.node && d == ours
            }
            _ => false,
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

/// The `bdSeq` metric of an NBIRTH or NDEATH.
fn bd_seq(p: &Payload) -> Option<u64> {
    p.metrics
        .iter()
        .find(|m| m.name.as_deref() == Some("bdSeq"))
        .and_then(|m| match m.value {
            Some(MetricValue::Long(v)) => Some(v),
            Some(MetricValue::Int(v)) => Some(u64::from(v)),
            _ => None,
        })
}

/// What the collectors of one process share per edge node (`group/node`):
/// when it was last asked for a rebirth and which warning was last logged
/// about it. Several configured Sparkplug devices of one node each run a
/// collector; through this the node gets one rebirth request and one
/// warning per event.
#[derive(Debug, Default)]
pub struct NodeRegistry {
    nodes: Mutex<HashMap<String, NodeShared>>,
}

#[derive(Debug, Default)]
struct NodeShared {
    last_rebirth: Option<Instant>,
    last_warning: Option<(String, Instant)>,
}

impl NodeRegistry {
    /// The registry of this process.
    pub fn global() -> &'static NodeRegistry {
        static GLOBAL: LazyLock<NodeRegistry> = LazyLock::new(NodeRegistry::default);
        &GLOBAL
    }

    fn with<T>(&self, node: &str, f: impl FnOnce(&mut NodeShared) -> T) -> T {
        let mut nodes = self
            .nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(nodes.entry(node.to_string()).or_default())
    }

    /// Whether a rebirth request may go to `node` now (none in the last
    /// `REBIRTH_EVERY`); if so it counts as sent.
    pub fn claim_rebirth(&self, node: &str, now: Instant) -> bool {
        self.with(node, |n| {
            if n.last_rebirth
                .is_some_and(|t| now.duration_since(t) < REBIRTH_EVERY)
            {
                return false;
            }
            n.last_rebirth = Some(now);
            true
        })
    }

    /// Whether `warning` about `node` should be logged: not when the same
    /// one was logged in the last `WARN_SAME_EVERY` (by the collector of
    /// another device of the node, most often).
    pub fn first_to_warn(&self, node: &str, warning: &str, now: Instant) -> bool {
        self.with(node, |n| {
            if n.last_warning
                .as_ref()
                .is_some_and(|(w, t)| w == warning && now.duration_since(*t) < WARN_SAME_EVERY)
            {
                return false;
            }
            n.last_warning = Some((warning.to_string(), now));
            true
        })
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
        assert_eq!(metric_json(&p.metrics[2], 3), Ok(Some(Json::from(-2))));
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
            .expect("ok")
            .items;
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
            .expect("ok")
            .items;
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
        let handled = n
            .handle("spBv1.0/plant/NDATA/node1", &skipped, 9)
            .expect("ok");
        assert_eq!(n.gaps, 1);
        assert_eq!(
            handled.rebirth.as_deref(),
            Some("seq gap: expected 1, got 3")
        );
        let items = handled.items;
        // Until the NBIRTH that answers, every message asks again.
        let mut next = skipped.clone();
        next[last] = 4;
        let again = n.handle("spBv1.0/plant/NDATA/node1", &next, 9).expect("ok");
        assert_eq!(again.rebirth, handled.rebirth);
        assert_eq!(again.items.len(), 1, "no second gap");
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
            Ok(Handled::default())
        );
        let death = [
            0x12, 0x09, 0x0a, 0x05, b'b', b'd', b'S', b'e', b'q', 0x58, 0x07,
        ];
        let items = n
            .handle("spBv1.0/plant/NDEATH/node1", &death, 10)
            .expect("ok")
            .items;
        assert_eq!(items.len(), 2);
        assert!(items.iter().all(
            |i| i.value == Err((quality::SPARKPLUG_DEATH, "NDEATH".into())) && i.time_ms == 10
        ));
        // After death the aliases are forgotten: data by alias gives Bad
        // points, never a guessed value, and asks for a rebirth.
        let after = n
            .handle("spBv1.0/plant/NDATA/node1", NDATA_SEQ1, 5)
            .expect("ok");
        assert_eq!(after.rebirth.as_deref(), Some("NDATA before any NBIRTH"));
        assert!(
            after
                .items
                .iter()
                .all(|i| matches!(i.value, Err((quality::MQTT_MALFORMED_PAYLOAD, _))))
        );
    }

    #[test]
    fn device_messages_count_for_the_node_seq() {
        let mut n = node(Some("pump"));
        let items = n
            .handle("spBv1.0/plant/NBIRTH/node1", NBIRTH, 5)
            .expect("ok")
            .items;
        assert!(items.is_empty(), "node metrics are not the device's");
        let mut ddata = NDATA_SEQ1.to_vec();
        ddata[2..4].copy_from_slice(&[0x10, 0x09]); // alias 9, unknown
        let unknown = n
            .handle("spBv1.0/plant/DDATA/node1/pump", &ddata, 5)
            .expect("ok");
        assert_eq!(
            unknown.rebirth.as_deref(),
            Some("metric alias 9 not in any birth certificate")
        );
        assert_eq!(unknown.items.len(), 2, "each tag Bad: {unknown:?}");
        assert!(
            unknown
                .items
                .iter()
                .all(|i| matches!(i.value, Err((quality::MQTT_MALFORMED_PAYLOAD, _))))
        );
        let items = n
            .handle("spBv1.0/plant/DDEATH/node1/pump", &[0x18, 0x02], 7)
            .expect("ok")
            .items;
        assert_eq!(n.gaps, 0, "seq 1 went to the DDATA of unknown alias");
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

    /// A node whose NBIRTH declares one metric `m<N>` per datatype N,
    /// alias N, and a tag of the matching type for each.
    fn typed_node() -> SparkplugNode {
        let types: &[(u32, &str)] = &[
            (1, "int"),
            (2, "int"),
            (3, "int"),
            (4, "int"),
            (5, "uint"),
            (8, "uint"),
            (9, "double"),
            (10, "double"),
            (11, "bool"),
            (12, "string"),
            (13, "uint"),
            (14, "string"),
            (15, "string"),
            (16, "string"),
            (17, "string"),
            (19, "string"),
            (99, "double"),
        ];
        let tags: String = types
            .iter()
            .map(|(n, t)| format!("[[devices.tags]]\nname = \"m{n}\"\ntype = \"{t}\"\n"))
            .collect();
        let text = format!(
            "[gateway]\nid = \"gw\"\n[uplink]\nendpoint = \"https://x:1\"\ntoken = \"t\"\n[buffer]\ndir = \"b\"\n\
             [[devices]]\nid = \"n1\"\nprotocol = \"mqtt\"\nbroker = \"mqtt://127.0.0.1\"\npayload = \"sparkplug\"\n\
             group = \"plant\"\nedge_node = \"typed\"\n{tags}"
        );
        let mut n = match Config::parse(&text, Path::new("/"))
            .expect("valid")
            .devices
            .remove(0)
        {
            DeviceConfig::Mqtt(m) => SparkplugNode::new(&m),
            _ => panic!("not mqtt"),
        };
        let birth = Payload {
            timestamp: Some(1),
            metrics: types
                .iter()
                .map(|(dt, _)| Metric {
                    name: Some(format!("m{dt}")),
                    alias: Some(u64::from(*dt)),
                    datatype: Some(if *dt == 99 { datatype::DOUBLE } else { *dt }),
                    is_null: Some(true),
                    ..Metric::default()
                })
                .collect(),
            seq: Some(0),
            uuid: None,
        };
        n.handle("spBv1.0/plant/NBIRTH/typed", &birth.encode_to_vec(), 0)
            .expect("birth");
        n
    }

    /// The values of an NDATA (seq 1) for a fresh `typed_node`.
    fn typed(ndata: &[u8]) -> Vec<Result<Value, (u32, String)>> {
        let mut n = typed_node();
        let h = n
            .handle("spBv1.0/plant/NDATA/typed", ndata, 0)
            .expect("decodes");
        assert_eq!(h.rebirth, None);
        h.items.into_iter().map(|i| i.value).collect()
    }

    /// An NDATA (seq 1) of one metric by alias, its value field `value`.
    fn ndata_of(alias: u8, value: &[u8]) -> Vec<u8> {
        let mut m = vec![0x10, alias];
        m.extend_from_slice(value);
        let mut p = vec![0x12, u8::try_from(m.len()).expect("short")];
        p.extend(m);
        p.extend([0x18, 0x01]);
        p
    }

    #[test]
    fn alias_only_data_is_read_with_the_births_datatype() {
        // Each NDATA: one metric, alias only, no datatype, seq 1.
        let cases: [(&[u8], Value); 13] = [
            // Int8 -128 as 0x80 (8-bit two's complement).
            (
                &[0x12, 0x05, 0x10, 0x01, 0x50, 0x80, 0x01, 0x18, 0x01],
                Value::Int(-128),
            ),
            // Int8 -128 sign-extended to 32 bits.
            (
                &[
                    0x12, 0x08, 0x10, 0x01, 0x50, 0x80, 0xff, 0xff, 0xff, 0x0f, 0x18, 0x01,
                ],
                Value::Int(-128),
            ),
            (
                &[0x12, 0x06, 0x10, 0x02, 0x50, 0x80, 0x80, 0x02, 0x18, 0x01],
                Value::Int(-32768),
            ),
            (
                &[
                    0x12, 0x08, 0x10, 0x03, 0x50, 0xff, 0xd7, 0xa9, 0xc6, 0x08, 0x18, 0x01,
                ],
                Value::Int(-2_000_000_001),
            ),
            (
                &[
                    0x12, 0x0d, 0x10, 0x04, 0x58, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
                    0x80, 0x01, 0x18, 0x01,
                ],
                Value::Int(i64::MIN),
            ),
            (
                &[0x12, 0x05, 0x10, 0x05, 0x50, 0xff, 0x01, 0x18, 0x01],
                Value::Uint(255),
            ),
            (
                &[
                    0x12, 0x0d, 0x10, 0x08, 0x58, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                    0xff, 0x01, 0x18, 0x01,
                ],
                Value::Uint(u64::MAX),
            ),
            // Float -0.1 (0xbdcccccd): stored as -0.1, not -0.10000000149011612.
            (
                &[
                    0x12, 0x07, 0x10, 0x09, 0x65, 0xcd, 0xcc, 0xcc, 0xbd, 0x18, 0x01,
                ],
                Value::Double(-0.1),
            ),
            (
                &[
                    0x12, 0x0b, 0x10, 0x0a, 0x69, 0x35, 0x58, 0x00, 0x66, 0x2d, 0xeb, 0x41, 0xfe,
                    0x18, 0x01,
                ],
                Value::Double(-1.5e300),
            ),
            (
                &[0x12, 0x04, 0x10, 0x0b, 0x70, 0x01, 0x18, 0x01],
                Value::Bool(true),
            ),
            (
                &[
                    0x12, 0x0a, 0x10, 0x0c, 0x7a, 0x06, 0xe8, 0xbf, 0x90, 0xe8, 0xa1, 0x8c, 0x18,
                    0x01,
                ],
                Value::String("运行".into()),
            ),
            // DateTime: ms since the epoch.
            (
                &[
                    0x12, 0x09, 0x10, 0x0d, 0x58, 0xfb, 0xa0, 0x9b, 0xd0, 0xab, 0x33, 0x18, 0x01,
                ],
                Value::Uint(1_764_057_600_123),
            ),
            // Bytes 00 01 ff as base64.
            (
                &[
                    0x12, 0x08, 0x10, 0x11, 0x82, 0x01, 0x03, 0x00, 0x01, 0xff, 0x18, 0x01,
                ],
                Value::String("AAH/".into()),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(typed(bytes), [Ok(want.clone())], "{want:?}");
        }
        // Text and UUID: strings too.
        let text = ndata_of(14, &[0x7a, 0x02, b'o', b'k']);
        assert_eq!(typed(&text), [Ok(Value::String("ok".into()))]);
        let uuid = ndata_of(15, &[0x7a, 0x01, b'u']);
        let mut n = typed_node();
        let int16_array = Payload {
            metrics: vec![Metric {
                name: Some("m17".into()),
                datatype: Some(23),
                value: Some(MetricValue::Bytes(vec![0xfe, 0xff])),
                ..Metric::default()
            }],
            seq: Some(1),
            ..Payload::default()
        };
        let h = n
            .handle("spBv1.0/plant/NDATA/typed", &int16_array.encode_to_vec(), 0)
            .expect("ok");
        assert_eq!(h.items[0].value, Ok(Value::String("/v8=".into())));
        assert_eq!(typed(&uuid), [Ok(Value::String("u".into()))]);
    }

    #[test]
    fn datasets_and_templates_become_json_text() {
        // DataSet: column "n" Int32, one row [-1].
        const DATASET: &[u8] = &[
            0x8a, 0x01, 0x11, 0x08, 0x01, 0x12, 0x01, 0x6e, 0x18, 0x03, 0x22, 0x08, 0x0a, 0x06,
            0x08, 0xff, 0xff, 0xff, 0xff, 0x0f,
        ];
        assert_eq!(
            typed(&ndata_of(16, DATASET)),
            [Ok(Value::String(
                r#"{"columns":["n"],"rows":[[-1]],"types":["Int32"]}"#.into()
            ))]
        );
        // Template instance of "Motor": metric rpm Int16 -5, parameter max
        // Int32 -7.
        const TEMPLATE: &[u8] = &[
            0x92, 0x01, 0x23, 0x12, 0x0b, 0x0a, 0x03, 0x72, 0x70, 0x6d, 0x20, 0x02, 0x50, 0xfb,
            0xff, 0x03, 0x1a, 0x0d, 0x0a, 0x03, 0x6d, 0x61, 0x78, 0x10, 0x03, 0x18, 0xf9, 0xff,
            0xff, 0xff, 0x0f, 0x22, 0x05, 0x4d, 0x6f, 0x74, 0x6f, 0x72,
        ];
        assert_eq!(
            typed(&ndata_of(19, TEMPLATE)),
            [Ok(Value::String(
                r#"{"metrics":{"rpm":-5},"parameters":{"max":-7},"template_ref":"Motor","version":null}"#
                    .into()
            ))]
        );
    }

    #[test]
    fn null_is_bad_with_its_own_code() {
        let null = [0x12, 0x04, 0x10, 0x63, 0x38, 0x01, 0x18, 0x01];
        assert_eq!(
            typed(&null),
            [Err((
                quality::SPARKPLUG_NULL,
                "metric `m99` is null".into()
            ))]
        );
    }

    #[test]
    fn one_bad_metric_among_good_ones_is_bad_alone() {
        // Int32 -1 (alias 3), Boolean declared but text sent (alias 11),
        // Double 2.5 (alias 10).
        let mut p = vec![0x12, 0x08, 0x10, 0x03, 0x50, 0xff, 0xff, 0xff, 0xff, 0x0f];
        p.extend([0x12, 0x06, 0x10, 0x0b, 0x7a, 0x02, b'o', b'n']);
        p.extend([0x12, 0x0b, 0x10, 0x0a, 0x69, 0, 0, 0, 0, 0, 0, 0x04, 0x40]);
        p.extend([0x18, 0x01]);
        assert_eq!(
            typed(&p),
            [
                Ok(Value::Int(-1)),
                Err((
                    quality::MQTT_TYPE_MISMATCH,
                    "metric `m11`: declared Boolean but carries text".into()
                )),
                Ok(Value::Double(2.5)),
            ]
        );
    }

    #[test]
    fn asks_for_a_rebirth_when_the_state_is_unknown() {
        let mut n = node(None);
        // Data before any birth (started after the NBIRTH).
        let h = n
            .handle("spBv1.0/plant/NDATA/node1", NDATA_SEQ1, 5)
            .expect("ok");
        assert_eq!(h.rebirth.as_deref(), Some("NDATA before any NBIRTH"));
        // An undecodable message of ours: an error, and the next data asks
        // again even after a birth.
        n.handle("spBv1.0/plant/NBIRTH/node1", NBIRTH, 5)
            .expect("ok");
        assert!(n.is_born());
        assert!(n.handle("spBv1.0/plant/NDATA/node1", &[0xff], 5).is_err());
        assert!(!n.is_born());
        assert_eq!(
            n.mark_malformed(5, "x").len(),
            2,
            "each tag gets a Bad point for it"
        );
        assert!(n.is_our_data("spBv1.0/plant/NDATA/node1"));
        assert!(!n.is_our_data("spBv1.0/plant/DDATA/node1/pump"));
        // The request: NCMD with Node Control/Rebirth = true.
        let (topic, payload) = n.rebirth_request(1234);
        assert_eq!(topic, "spBv1.0/plant/NCMD/node1");
        let p = Payload::decode(payload.as_slice()).expect("decodes");
        assert_eq!(p.metrics.len(), 1);
        assert_eq!(p.metrics[0].name.as_deref(), Some(REBIRTH_METRIC));
        assert_eq!(p.metrics[0].datatype, Some(datatype::BOOLEAN));
        assert_eq!(p.metrics[0].value, Some(MetricValue::Boolean(true)));
        assert_eq!(p.timestamp, Some(1234));
    }

    #[test]
    fn rebirths_and_warnings_are_limited_per_node() {
        let r = NodeRegistry::default();
        let t0 = Instant::now();
        assert!(r.claim_rebirth("g/n", t0));
        assert!(!r.claim_rebirth("g/n", t0 + Duration::from_secs(1)));
        assert!(r.claim_rebirth("g/other", t0 + Duration::from_secs(1)));
        assert!(r.claim_rebirth("g/n", t0 + REBIRTH_EVERY));
        assert!(r.first_to_warn("g/n", "seq gap", t0));
        assert!(
            !r.first_to_warn("g/n", "seq gap", t0),
            "second device of the node"
        );
        assert!(r.first_to_warn("g/n", "NDEATH", t0));
        assert!(r.first_to_warn("g/n", "seq gap", t0 + Duration::from_secs(11)));
    }
}
