//! Any sequence of Sparkplug B messages (births, data, deaths, for the node
//! and its devices, in any order, any protobuf bytes) must yield items or a
//! `SparkplugError` — never a panic — and items only for configured tags.
#![no_main]

mod common;

use std::sync::LazyLock;

use guantong_gateway::mqtt::config::MqttConfig;
use guantong_gateway::mqtt::sparkplug::SparkplugNode;
use libfuzzer_sys::fuzz_target;

const DEVICES: &str = r#"
[[devices]]
id = "n1"
protocol = "mqtt"
broker = "mqtt://127.0.0.1"
payload = "sparkplug"
group = "plant"
edge_node = "node1"
sparkplug_device = "d1"
[[devices.tags]]
name = "temp"
metric = "Temperature"
[[devices.tags]]
name = "count"
type = "int"
[[devices.tags]]
name = "on"
type = "bool"
[[devices.tags]]
name = "label"
type = "string"
"#;

static DEVICE: LazyLock<MqttConfig> =
    LazyLock::new(|| common::mqtt_devices(DEVICES).remove(0));

const TOPICS: [&str; 9] = [
    "spBv1.0/plant/NBIRTH/node1",
    "spBv1.0/plant/NDATA/node1",
    "spBv1.0/plant/NDEATH/node1",
    "spBv1.0/plant/DBIRTH/node1/d1",
    "spBv1.0/plant/DDATA/node1/d1",
    "spBv1.0/plant/DDEATH/node1/d1",
    "spBv1.0/plant/DDATA/node1/d2",
    "spBv1.0/plant/NCMD/node1",
    "spBv1.0/other/NDATA/node1",
];

fuzz_target!(|data: &[u8]| {
    let mut node = SparkplugNode::new(&DEVICE);
    // Messages: [topic selector, length, payload...]*.
    let mut rest = data;
    let mut arrival = 1_700_000_000_000i64;
    while let Some((&[selector, len], tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(len).min(tail.len());
        let (payload, next) = tail.split_at(len);
        rest = next;
        arrival += 1;
        let topic = TOPICS[usize::from(selector) % TOPICS.len()];
        if let Ok(handled) = node.handle(topic, payload, arrival) {
            for item in handled.items {
                assert!(item.tag < DEVICE.tags.len(), "item for an unknown tag");
            }
        }
    }
});
