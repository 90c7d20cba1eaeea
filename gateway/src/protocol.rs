//! The protocol as the unit of extension.
//!
//! # Design
//! Each protocol module (`modbus`, `mqtt`, `opcua`, `s7`, `dlt645`) owns its
//! `[[devices]]` settings, their parsing and validation, its collector,
//! probe and identity reading. Its device settings implement [`DeviceProtocol`], through which
//! the rest of the gateway (manifests, status, reload, secrets) sees a device.
//! This module is the one place that dispatches on the protocol:
//! - [`DeviceConfig`]: one variant per protocol, and [`DeviceConfig::protocol`]
//!   the one match that turns it into the trait;
//! - [`parse_device`]: the `protocol = "..."` names and their parsers;
//! - [`start_unit`]: starting a protocol's collectors;
//! - [`identify`]: reading identities at start and reload.
//!
//! A new protocol is one module (settings implementing `DeviceProtocol`, a
//! parser, a collector implementing `collector::Collector`) plus one variant
//! here and one arm in each of the three functions. What it reuses: the
//! point sink and its back-pressure (`collector`), quality codes (`quality`),
//! value conversion (`value`), manifests (`manifest`), backoff and liveness
//! (`liveness`), and where requests can be merged, the Modbus planner's
//! approach (`modbus::plan`).
//!
//! # Invariants
//! - A device's tags are numbered contiguously from its first slot, in the
//!   order of its `tags`; `tag_count` is their number.
//! - Devices with the same `collector_key` share one collector (a Modbus
//!   line); a reload restarts them together.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use guantong_proto::v1::{Device, Tag};
use tokio_util::sync::CancellationToken;

use crate::collector::{Collector, PointSink};
use crate::config::{Problems, quoted};
#[cfg(feature = "dlt645")]
use crate::dlt645::config::Dlt645Config;
use crate::modbus::config::ModbusConfig;
#[cfg(feature = "mqtt")]
use crate::mqtt::config::MqttConfig;
#[cfg(feature = "opcua")]
use crate::opcua::config::OpcUaConfig;
#[cfg(feature = "s7")]
use crate::s7::config::S7Config;

/// What every protocol's device settings tell the rest of the gateway.
pub trait DeviceProtocol: std::fmt::Debug + Send + Sync {
    /// The protocol's name on the status page and in metrics.
    fn name(&self) -> &'static str;
    fn id(&self) -> &str;
    fn tag_count(&self) -> usize;
    /// Devices with the same key share one collector.
    fn collector_key(&self) -> String {
        format!("device {}", self.id())
    }
    /// This device and its tags as manifest entries; tags name `device_index`.
    fn manifest(&self, device_index: u32) -> (Device, Vec<Tag>);
    /// Silence longer than this means the device is down (None: silence
    /// says nothing, as with subscriptions that report changes only).
    fn stale_after(&self) -> Option<Duration>;
    /// Resolves what depends on the gateway: relative paths (against the
    /// config file's directory and the buffer directory) and defaults named
    /// after the gateway. Called once, after the whole file validated.
    fn finish(&mut self, _gateway_id: &str, _base_dir: &Path, _buffer_dir: &Path) {}
    /// Files holding secrets, for the warning about their permissions.
    fn secret_files(&self) -> Vec<&Path> {
        Vec::new()
    }
}

/// One device, with its protocol's settings.
#[derive(Debug, Clone)]
pub enum DeviceConfig {
    /// `modbus-tcp`, `modbus-rtu` and `modbus-rtu-over-tcp`.
    Modbus(ModbusConfig),
    #[cfg(feature = "mqtt")]
    Mqtt(Box<MqttConfig>),
    #[cfg(feature = "opcua")]
    OpcUa(Box<OpcUaConfig>),
    /// Siemens S7 over ISO-on-TCP.
    #[cfg(feature = "s7")]
    S7(Box<S7Config>),
    /// DL/T 645-2007 energy meters, on RS-485 or a serial device server.
    #[cfg(feature = "dlt645")]
    Dlt645(Box<Dlt645Config>),
}

impl DeviceConfig {
    /// The device as its protocol describes it: the one match on the variant.
    pub fn protocol(&self) -> &dyn DeviceProtocol {
        match self {
            DeviceConfig::Modbus(c) => c,
            #[cfg(feature = "mqtt")]
            DeviceConfig::Mqtt(c) => c.as_ref(),
            #[cfg(feature = "opcua")]
            DeviceConfig::OpcUa(c) => c.as_ref(),
            #[cfg(feature = "s7")]
            DeviceConfig::S7(c) => c.as_ref(),
            #[cfg(feature = "dlt645")]
            DeviceConfig::Dlt645(c) => c.as_ref(),
        }
    }

    pub fn protocol_mut(&mut self) -> &mut dyn DeviceProtocol {
        match self {
            DeviceConfig::Modbus(c) => c,
            #[cfg(feature = "mqtt")]
            DeviceConfig::Mqtt(c) => c.as_mut(),
            #[cfg(feature = "opcua")]
            DeviceConfig::OpcUa(c) => c.as_mut(),
            #[cfg(feature = "s7")]
            DeviceConfig::S7(c) => c.as_mut(),
            #[cfg(feature = "dlt645")]
            DeviceConfig::Dlt645(c) => c.as_mut(),
        }
    }

    pub fn id(&self) -> &str {
        self.protocol().id()
    }

    pub fn tag_count(&self) -> usize {
        self.protocol().tag_count()
    }

    /// Devices with the same key share one collector (a Modbus line), which
    /// a reload restarts as a whole.
    pub fn collector_key(&self) -> String {
        self.protocol().collector_key()
    }

    /// This device and its tags as manifest entries; tags name `device_index`.
    pub fn manifest(&self, device_index: u32) -> (Device, Vec<Tag>) {
        self.protocol().manifest(device_index)
    }
}

/// Protocols a device may name in `protocol = "..."`.
pub const PROTOCOLS: &[&str] = &[
    "modbus-tcp",
    "modbus-rtu",
    "modbus-rtu-over-tcp",
    "mqtt",
    "opcua",
    "s7",
    "dlt645",
];

pub(crate) fn parse_device(
    path: &str,
    item: toml::Value,
    base_dir: &Path,
    problems: &mut Problems,
) -> Option<DeviceConfig> {
    let toml::Value::Table(mut table) = item else {
        problems.push(
            path,
            format!("invalid type: {}, expected a table", item.type_str()),
        );
        return None;
    };
    let protocol = match table.remove("protocol") {
        Some(toml::Value::String(p)) => p,
        Some(other) => {
            problems.push(
                format!("{path}.protocol"),
                format!("invalid type: {}, expected a string", other.type_str()),
            );
            return None;
        }
        None => {
            problems.push(
                path,
                format!(
                    "missing field `protocol`, expected one of {}",
                    quoted(PROTOCOLS)
                ),
            );
            return None;
        }
    };
    match protocol.as_str() {
        "modbus-tcp" | "modbus-rtu" | "modbus-rtu-over-tcp" => {
            crate::modbus::config::parse(path, &protocol, table, base_dir, problems)
                .map(DeviceConfig::Modbus)
        }
        #[cfg(feature = "mqtt")]
        "mqtt" => crate::mqtt::config::parse(path, table, problems).map(|mut c| {
            c.resolve_paths(base_dir);
            c.password = crate::secret::resolve(
                c.password.take(),
                c.password_file.as_deref(),
                c.password_env.as_deref(),
                &format!("{path}.password"),
                problems,
            );
            DeviceConfig::Mqtt(Box::new(c))
        }),
        #[cfg(feature = "s7")]
        "s7" => {
            crate::s7::config::parse(path, table, problems).map(|c| DeviceConfig::S7(Box::new(c)))
        }
        #[cfg(not(feature = "s7"))]
        "s7" => {
            problems.push(
                format!("{path}.protocol"),
                "this gateway was built without S7 (the `s7` cargo feature)",
            );
            None
        }
        #[cfg(feature = "dlt645")]
        "dlt645" => crate::dlt645::config::parse(path, table, base_dir, problems)
            .map(|c| DeviceConfig::Dlt645(Box::new(c))),
        #[cfg(not(feature = "dlt645"))]
        "dlt645" => {
            problems.push(
                format!("{path}.protocol"),
                "this gateway was built without DL/T 645 (the `dlt645` cargo feature)",
            );
            None
        }
        #[cfg(feature = "opcua")]
        "opcua" => crate::opcua::config::parse(path, table, problems)
            .map(|c| DeviceConfig::OpcUa(Box::new(c))),
        #[cfg(not(feature = "opcua"))]
        "opcua" => {
            problems.push(
                format!("{path}.protocol"),
                "this gateway was built without OPC UA (the `opcua` cargo feature)",
            );
            None
        }
        #[cfg(not(feature = "mqtt"))]
        "mqtt" => {
            problems.push(
                format!("{path}.protocol"),
                "this gateway was built without MQTT (the `mqtt` cargo feature)",
            );
            None
        }
        other => {
            problems.push(
                format!("{path}.protocol"),
                format!(
                    "unknown protocol `{other}`, expected one of {}",
                    quoted(PROTOCOLS)
                ),
            );
            None
        }
    }
}

/// A collector's future, as `start_unit` returns them.
pub type Run = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What collectors are started with.
pub struct StartContext {
    pub sink: PointSink,
    pub cancel: CancellationToken,
    /// Told of Modbus requests per cycle.
    pub status: Arc<crate::status::Status>,
    /// Where collectors that identify their device at connect report it.
    pub identified: crate::reload::IdentifiedTx,
}

/// The collectors of one unit: devices sharing a `collector_key` (all of
/// one protocol), each with its first slot.
pub fn start_unit(devices: Vec<(DeviceConfig, u32)>, ctx: &StartContext) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut modbus = Vec::new();
    #[cfg(feature = "dlt645")]
    let mut meters = Vec::new();
    for (device, first) in devices {
        match device {
            DeviceConfig::Modbus(c) => modbus.push((c, first)),
            #[cfg(feature = "mqtt")]
            DeviceConfig::Mqtt(c) => {
                let ids = (first..first + c.tags.len() as u32).collect();
                runs.push(Box::pin(
                    crate::mqtt::MqttCollector::new(*c, ids)
                        .run(ctx.sink.clone(), ctx.cancel.clone()),
                ));
            }
            #[cfg(feature = "opcua")]
            DeviceConfig::OpcUa(c) => {
                runs.push(Box::pin(
                    crate::opcua::OpcUaCollector::new(*c, first)
                        .report_identity_to(ctx.identified.clone())
                        .run(ctx.sink.clone(), ctx.cancel.clone()),
                ));
            }
            #[cfg(feature = "s7")]
            DeviceConfig::S7(c) => runs.push(Box::pin(
                crate::s7::S7Collector::new(*c, first)
                    .report_identity_to(ctx.identified.clone())
                    .run(ctx.sink.clone(), ctx.cancel.clone()),
            )),
            #[cfg(feature = "dlt645")]
            DeviceConfig::Dlt645(c) => meters.push((*c, first)),
        }
    }
    #[cfg(feature = "dlt645")]
    for line in crate::dlt645::lines(meters) {
        runs.push(Box::pin(
            line.report_to(ctx.status.clone())
                .run(ctx.sink.clone(), ctx.cancel.clone()),
        ));
    }
    for line in crate::modbus::lines(modbus) {
        runs.push(Box::pin(
            line.report_to(ctx.status.clone())
                .run(ctx.sink.clone(), ctx.cancel.clone()),
        ));
    }
    runs
}

/// Reads each device's identity from the device itself, for the manifest
/// (at start, and for the devices a reload starts), protocol by protocol.
pub async fn identify(devices: &mut [DeviceConfig]) {
    crate::modbus::identify_all(devices).await;
    #[cfg(feature = "opcua")]
    crate::opcua::identify_all(devices).await;
    #[cfg(feature = "s7")]
    crate::s7::identify_all(devices).await;
    #[cfg(feature = "dlt645")]
    crate::dlt645::identify_all(devices).await;
}
