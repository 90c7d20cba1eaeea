//! The gateway's manifest: every device and tag it is configured to collect.
//!
//! Tags are numbered in config order (devices in order, their tags in order);
//! batches refer to tags by that number. The version is the first 8 bytes of
//! the SHA-256 of the manifest encoded with `version` and `created_at_ms` set
//! to 0: the same config always yields the same version, and any change to a
//! device, tag, address, type, unit or interval yields a new one.

use guantong_proto::v1::{DataType, Device, Manifest, Tag};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::config::{Config, DeviceConfig};
use crate::modbus::config::{ModbusTagConfig, ModbusType};
use crate::quality::now_ms;

pub fn build(config: &Config) -> Manifest {
    let mut devices = Vec::new();
    let mut tags = Vec::new();
    for (d, device) in config.devices.iter().enumerate() {
        match device {
            DeviceConfig::ModbusTcp(c) => {
                devices.push(Device {
                    id: c.id.clone(),
                    protocol: "modbus-tcp".into(),
                    endpoint: format!("{}:{} unit {}", c.host, c.port, c.unit),
                    identity: Default::default(),
                });
                tags.extend(c.tags.iter().map(|t| Tag {
                    device: d as u32,
                    name: t.name.clone(),
                    address: format!("{}:{}", t.table.name(), t.address),
                    data_type: modbus_data_type(t) as i32,
                    unit: t.unit.clone(),
                    interval_ms: c.poll_interval.as_millis() as u64,
                }));
            }
        }
    }
    let mut manifest = Manifest {
        version: 0,
        gateway_id: config.gateway.id.clone(),
        created_at_ms: 0,
        devices,
        tags,
    };
    manifest.version = version_of(&manifest);
    manifest.created_at_ms = now_ms();
    manifest
}

fn version_of(m: &Manifest) -> u64 {
    let digest = Sha256::digest(m.encode_to_vec());
    u64::from_be_bytes(digest[..8].try_into().expect("SHA-256 is 32 bytes"))
}

fn modbus_data_type(t: &ModbusTagConfig) -> DataType {
    if t.scale != 1.0 || t.offset != 0.0 {
        return DataType::Double;
    }
    match t.data_type {
        ModbusType::Bool => DataType::Bool,
        ModbusType::U16 | ModbusType::U32 | ModbusType::U64 => DataType::Uint,
        ModbusType::I16 | ModbusType::I32 | ModbusType::I64 => DataType::Int,
        ModbusType::F32 | ModbusType::F64 => DataType::Double,
    }
}

/// Manifest index of the first tag of each device, in config order.
pub fn first_tag_of_devices(config: &Config) -> Vec<u32> {
    let mut next = 0u32;
    config
        .devices
        .iter()
        .map(|d| {
            let first = next;
            next += match d {
                DeviceConfig::ModbusTcp(c) => c.tags.len() as u32,
            };
            first
        })
        .collect()
}
