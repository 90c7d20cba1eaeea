//! The gateway's manifest: every device and tag it is configured to collect.
//!
//! Tags are numbered in config order (devices in order, their tags in order);
//! batches refer to tags by that number. The version is the first 8 bytes of
//! the SHA-256 of the manifest encoded with `version` and `created_at_ms` set
//! to 0: the same config always yields the same version, and any change to a
//! device, tag, address, type, unit or interval yields a new one.
//!
//! Tag indices are positions in this manifest, valid for its version only;
//! ingest keys series by gateway, device id and tag name, so a series goes
//! on across manifests however its index moves. Collectors number samples
//! by slots that outlive reloads; the writer maps them to these indices
//! (see `reload`).

use guantong_proto::v1::Manifest;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::quality::now_ms;

pub fn build(config: &Config) -> Manifest {
    let mut devices = Vec::new();
    let mut tags = Vec::new();
    for (d, device) in config.devices.iter().enumerate() {
        let (entry, device_tags) = device.manifest(d as u32);
        devices.push(entry);
        tags.extend(device_tags);
    }
    let mut manifest = Manifest {
        version: 0,
        gateway_id: config.gateway.id.clone(),
        created_at_ms: 0,
        devices,
        tags,
    };
    seal(&mut manifest);
    manifest
}

/// Sets `version` from the content and `created_at_ms` to now, after a change.
pub fn seal(manifest: &mut Manifest) {
    manifest.version = 0;
    manifest.created_at_ms = 0;
    manifest.version = version_of(manifest);
    manifest.created_at_ms = now_ms();
}

pub(crate) fn version_of(m: &Manifest) -> u64 {
    let digest = Sha256::digest(m.encode_to_vec());
    u64::from_be_bytes(digest[..8].try_into().expect("SHA-256 is 32 bytes"))
}

/// Manifest index of the first tag of each device, in config order.
pub fn first_tag_of_devices(config: &Config) -> Vec<u32> {
    let mut next = 0u32;
    config
        .devices
        .iter()
        .map(|d| {
            let first = next;
            next += d.tag_count() as u32;
            first
        })
        .collect()
}
