//! Any MQTT payload (JSON or plain text) on any topic must decode to values
//! or a `DecodeError` — never a panic — and every value must belong to a tag
//! the topic matched.
#![no_main]

mod common;

use std::sync::LazyLock;

use guantong_gateway::mqtt::decode::Mapping;
use libfuzzer_sys::fuzz_target;

const DEVICES: &str = r#"
[[devices]]
id = "json"
protocol = "mqtt"
broker = "mqtt://127.0.0.1"
topic = "f/+/data"
timestamp = "/ts"
[[devices.tags]]
name = "d"
pointer = "/a/0/v"
[[devices.tags]]
name = "i"
type = "int"
pointer = "/i"
[[devices.tags]]
name = "u"
type = "uint"
pointer = "/a~1b/~0c"
[[devices.tags]]
name = "b"
type = "bool"
pointer = "/b"
[[devices.tags]]
name = "s"
type = "string"
pointer = ""

[[devices]]
id = "plain"
protocol = "mqtt"
broker = "mqtt://127.0.0.1"
payload = "plain"
[[devices.tags]]
name = "d"
topic = "p/d"
[[devices.tags]]
name = "i"
type = "int"
topic = "p/+"
[[devices.tags]]
name = "b"
type = "bool"
topic = "p/#"
"#;

static MAPPINGS: LazyLock<Vec<Mapping>> = LazyLock::new(|| {
    common::mqtt_devices(DEVICES).iter().map(Mapping::new).collect()
});

fuzz_target!(|data: &[u8]| {
    // First byte: which device and topic; the rest is the payload.
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let topics = ["f/x/data", "f//data", "p/d", "p/i", "p/x/y", "other"];
    let mapping = &MAPPINGS[usize::from(selector & 1)];
    let topic = topics[usize::from(selector >> 1) % topics.len()];
    let matching = mapping.matching(topic);
    if let Ok((_, values)) = mapping.decode(&matching, payload, 1_700_000_000_000) {
        for v in values {
            assert!(matching.contains(&v.tag), "value for a tag the topic did not match");
        }
    }
});
