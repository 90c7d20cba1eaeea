//! What the MQTT fuzz targets share: a gateway config around their devices.

use std::path::Path;

use guantong_gateway::config::{Config, DeviceConfig};
use guantong_gateway::mqtt::config::MqttConfig;

const GATEWAY: &str = r#"
[gateway]
id = "fuzz"
[uplink]
endpoint = "https://127.0.0.1:1"
token = "t"
[buffer]
dir = "b"
"#;

/// The MQTT devices of `devices` (`[[devices]]` tables), parsed as the
/// gateway parses its config.
pub fn mqtt_devices(devices: &str) -> Vec<MqttConfig> {
    Config::parse(&format!("{GATEWAY}\n{devices}"), Path::new("/"))
        .expect("the fuzz config is valid")
        .devices
        .into_iter()
        .map(|d| match d {
            DeviceConfig::Mqtt(m) => *m,
            _ => unreachable!("only MQTT devices"),
        })
        .collect()
}
