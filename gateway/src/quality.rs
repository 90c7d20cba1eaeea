//! Points as collectors produce them, and the code space of `quality_code`.
//!
//! A point that is not Good carries a code saying why. Codes are grouped by
//! their high 16 bits so that ingest can explain them without knowing every
//! protocol:
//!
//! | range         | meaning                                            |
//! |---------------|----------------------------------------------------|
//! | `0x0001_00xx` | Modbus exception `xx` returned by the device       |
//! | `0x0002_0001` | no answer within the timeout                       |
//! | `0x0002_0002` | could not connect to the device                    |
//! | `0x0002_0003` | connection broken while reading                    |
//! | `0x0002_0004` | malformed or mismatched answer                     |
//! | `0x0002_0005` | CRC error or garbled RTU frame                     |
//! | `0x0002_0006` | not polled: the unit stopped answering and is      |
//! |               | polled less often until it answers again (backoff) |
//! | `0x0002_0007` | stalled: the connection looks alive but the        |
//! |               | device's data stopped for `stall_intervals`        |
//! |               | expected intervals (see `liveness`)                |
//! | `0x0003_0001` | value outside the tag's declared valid range       |
//! | `0x0004_0001` | MQTT payload not decodable in the configured format |
//! | `0x0004_0002` | MQTT value present but not of the tag's type        |
//! | `0x0004_0003` | Sparkplug death certificate (NDEATH or DDEATH)      |
//! | `0x0004_0004` | Sparkplug `seq` gap: messages between were lost     |
//! | `0x0004_0005` | MQTT broker connection lost                         |
//! | `0x0004_0006` | Sparkplug metric sent with `is_null`: no value      |
//! | `0x0005_0001` | OPC UA session lost (connection cut, server gone or |
//! |               | keep-alive watchdog): no value until it is back     |
//! | `0x0005_0002` | OPC UA value missing or not of the tag's type       |
//! | `0x0005_0003` | OPC UA namespace URI of the tag not on the server   |
//! | `0x0006_00xx` | S7 item return code `xx` from the PLC (`05` address |
//! |               | out of range, `0A` object does not exist, `03` no   |
//! |               | access)                                             |
//! | `0x0007_00xx` | DL/T 645 error frame: the meter's error byte `xx`  |
//! |               | (bit 1 `02` no data for this DI, bit 0 `01` other, |
//! |               | bit 2 `04` password or authority)                  |
//! | `0x4000_0000` | an OPC UA status code, verbatim: Uncertain          |
//! | ..`0xFFFF_FFFF` | (`0b01` top bits) or Bad (`0b10`), as the server  |
//! |               | sent it or as the OPC UA stack reported it          |
//! |               | (e.g. `0x8034_0000` BadNodeIdUnknown)               |
//!
//! A Good point normally has code 0; an OPC UA Good status with info bits
//! keeps them (e.g. `0x0000_0480`: the server's queue overflowed, values
//! were dropped before this one).

use guantong_proto::v1::Quality;
use guantong_proto::v1::point::Value;

pub const MODBUS_EXCEPTION: u32 = 0x0001_0000;
pub const TIMEOUT: u32 = 0x0002_0001;
pub const CONNECT_FAILED: u32 = 0x0002_0002;
pub const TRANSPORT_ERROR: u32 = 0x0002_0003;
pub const MALFORMED: u32 = 0x0002_0004;
pub const FRAME_ERROR: u32 = 0x0002_0005;
pub const BACKING_OFF: u32 = 0x0002_0006;
pub const STALLED: u32 = 0x0002_0007;
pub const OUT_OF_RANGE: u32 = 0x0003_0001;
/// An S7 item return code in the low byte.
pub const S7_ITEM: u32 = 0x0006_0000;
/// A DL/T 645 error frame's error byte in the low byte.
pub const DLT645_ERROR: u32 = 0x0007_0000;

/// What a quality code means, for people (the table above).
pub fn describe(code: u32) -> String {
    match code {
        c if c & 0xFFFF_FF00 == S7_ITEM => {
            let what = match c & 0xFF {
                0x01 => "hardware fault",
                0x03 => "access to the object not allowed",
                0x05 => "address out of range",
                0x06 => "data type not supported",
                0x07 => "data type inconsistent",
                0x0A => "object does not exist (no such data block?)",
                _ => "item refused",
            };
            format!("S7 PLC: {what} (item code {:#04x})", c & 0xFF)
        }
        c if c & 0xFFFF_FF00 == DLT645_ERROR => {
            let e = c & 0xFF;
            let bits = [
                (0x01, "other error"),
                (0x02, "no data for this identifier"),
                (0x04, "password or authority refused"),
                (0x08, "baud rate cannot change"),
                (0x10, "too many year zones"),
                (0x20, "too many day periods"),
                (0x40, "too many tariffs"),
            ];
            let what: Vec<&str> = bits
                .iter()
                .filter(|(bit, _)| e & bit != 0)
                .map(|(_, w)| *w)
                .collect();
            let what = if what.is_empty() {
                "error".to_string()
            } else {
                what.join(", ")
            };
            format!("DL/T 645 meter: {what} (error byte {e:#04x})")
        }
        0 => "good".into(),
        c if c & 0xFFFF_FF00 == MODBUS_EXCEPTION => {
            let e = c & 0xFF;
            let name = match e {
                1 => "illegal function",
                2 => "illegal data address",
                3 => "illegal data value",
                4 => "server device failure",
                5 => "acknowledge",
                6 => "server device busy",
                10 => "gateway path unavailable",
                11 => "gateway target device failed to respond",
                _ => "exception",
            };
            format!("modbus exception {e} ({name})")
        }
        TIMEOUT => "no answer within the timeout".into(),
        CONNECT_FAILED => "could not connect".into(),
        TRANSPORT_ERROR => "connection broken while reading".into(),
        MALFORMED => "malformed or mismatched answer".into(),
        FRAME_ERROR => crate::modbus::line::GARBLED_DIAGNOSIS.into(),
        BACKING_OFF => "not polled: unit stopped answering (backing off)".into(),
        STALLED => "stalled: connected, but the device's data stopped".into(),
        OUT_OF_RANGE => "value outside the declared valid range".into(),
        MQTT_MALFORMED_PAYLOAD => "MQTT payload not decodable in the configured format".into(),
        MQTT_TYPE_MISMATCH => "MQTT value not of the tag's type".into(),
        SPARKPLUG_DEATH => "Sparkplug death certificate".into(),
        SPARKPLUG_SEQ_GAP => "Sparkplug seq gap: messages were lost".into(),
        MQTT_CONNECTION_LOST => "MQTT broker connection lost".into(),
        SPARKPLUG_NULL => "Sparkplug metric is null".into(),
        OPCUA_CONNECTION_LOST => "OPC UA session lost".into(),
        OPCUA_TYPE_MISMATCH => "OPC UA value missing or not of the tag's type".into(),
        OPCUA_NAMESPACE_UNKNOWN => "OPC UA namespace URI not on the server".into(),
        c if c >= 0x4000_0000 || c & 0xFFFF_0000 == 0 => opcua_status(c),
        c => format!("code {c:#010x}"),
    }
}
pub const MQTT_MALFORMED_PAYLOAD: u32 = 0x0004_0001;
pub const MQTT_TYPE_MISMATCH: u32 = 0x0004_0002;
pub const SPARKPLUG_DEATH: u32 = 0x0004_0003;
pub const SPARKPLUG_SEQ_GAP: u32 = 0x0004_0004;
pub const MQTT_CONNECTION_LOST: u32 = 0x0004_0005;
pub const SPARKPLUG_NULL: u32 = 0x0004_0006;
pub const OPCUA_CONNECTION_LOST: u32 = 0x0005_0001;
pub const OPCUA_TYPE_MISMATCH: u32 = 0x0005_0002;
pub const OPCUA_NAMESPACE_UNKNOWN: u32 = 0x0005_0003;

/// Whether `code` says the device cannot be reached (no answer, no
/// connection, session lost), rather than something about one value.
pub fn is_link_failure(code: u32) -> bool {
    matches!(
        code,
        TIMEOUT
            | CONNECT_FAILED
            | TRANSPORT_ERROR
            | FRAME_ERROR
            | BACKING_OFF
            | MQTT_CONNECTION_LOST
            | SPARKPLUG_DEATH
            | OPCUA_CONNECTION_LOST
            | STALLED
    )
}

/// An OPC UA status code by name, where this build knows the names.
fn opcua_status(code: u32) -> String {
    #[cfg(feature = "opcua")]
    {
        let status = async_opcua::types::StatusCode::from(code);
        format!("OPC UA {status} ({code:#010x})")
    }
    #[cfg(not(feature = "opcua"))]
    format!("OPC UA status {code:#010x}")
}

/// One collected value of one tag.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Index of the tag in the gateway's manifest.
    pub tag: u32,
    /// Source timestamp, milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub value: Option<Value>,
    pub quality: Quality,
    pub code: u32,
    /// A second timestamp from the device (the OPC UA server timestamp),
    /// milliseconds since the Unix epoch; None for other protocols.
    pub server_time_ms: Option<i64>,
}

impl Sample {
    pub fn good(tag: u32, time_ms: i64, value: Value) -> Sample {
        Sample {
            tag,
            time_ms,
            value: Some(value),
            quality: Quality::Good,
            code: 0,
            server_time_ms: None,
        }
    }
    pub fn bad(tag: u32, time_ms: i64, code: u32) -> Sample {
        Sample {
            tag,
            time_ms,
            value: None,
            quality: Quality::Bad,
            code,
            server_time_ms: None,
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
