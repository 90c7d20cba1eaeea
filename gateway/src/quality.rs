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
//! | `0x0003_0001` | MQTT payload not decodable in the configured format |
//! | `0x0003_0002` | MQTT value present but not of the tag's type        |
//! | `0x0003_0003` | Sparkplug death certificate (NDEATH or DDEATH)      |
//! | `0x0003_0004` | Sparkplug `seq` gap: messages between were lost     |
//! | `0x0003_0005` | MQTT broker connection lost                         |

use guantong_proto::v1::Quality;
use guantong_proto::v1::point::Value;

pub const MODBUS_EXCEPTION: u32 = 0x0001_0000;
pub const TIMEOUT: u32 = 0x0002_0001;
pub const CONNECT_FAILED: u32 = 0x0002_0002;
pub const TRANSPORT_ERROR: u32 = 0x0002_0003;
pub const MALFORMED: u32 = 0x0002_0004;
pub const MQTT_MALFORMED_PAYLOAD: u32 = 0x0003_0001;
pub const MQTT_TYPE_MISMATCH: u32 = 0x0003_0002;
pub const SPARKPLUG_DEATH: u32 = 0x0003_0003;
pub const SPARKPLUG_SEQ_GAP: u32 = 0x0003_0004;
pub const MQTT_CONNECTION_LOST: u32 = 0x0003_0005;

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
}

impl Sample {
    pub fn good(tag: u32, time_ms: i64, value: Value) -> Sample {
        Sample {
            tag,
            time_ms,
            value: Some(value),
            quality: Quality::Good,
            code: 0,
        }
    }
    pub fn bad(tag: u32, time_ms: i64, code: u32) -> Sample {
        Sample {
            tag,
            time_ms,
            value: None,
            quality: Quality::Bad,
            code,
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
