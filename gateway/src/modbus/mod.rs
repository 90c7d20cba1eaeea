//! Modbus collection: TCP, RTU on serial ports and RTU over TCP.
//!
//! Design: devices are grouped into lines (`line`): a Modbus TCP device is a
//! line of its own; devices on one serial port or one serial device server
//! share a line, owned by one task that polls their unit ids strictly one at
//! a time. Tags are planned per unit and poll group into the fewest read
//! requests (`plan`), decoded by `decode`, and every failure becomes a Bad
//! point with a code from `crate::quality` — never a panic, whatever bytes a
//! device sends. `transport` opens connections and classifies answers;
//! `probe` is the installer's command line.
//!
//! Modules: `config` (device and tag keys, address notation, templates),
//! `plan`, `decode`, `transport`, `line` (scheduling, backoff, exception
//! splitting), `probe`.

pub mod config;
pub mod decode;
pub mod line;
pub mod plan;
pub mod probe;
pub mod transport;

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::info;

use crate::config::{DeviceConfig, Problems};
use config::{ModbusConfig, Transport};
use line::{Line, Unit};

/// The log filter for `GUANTONG_LOG` (default `info`), with tokio-modbus
/// off unless the filter names it. The library's warnings and errors
/// (`Invalid CRC`, `Incomplete ADU response`, `Giving up to decode frame…`)
/// describe each garbled byte of a misconfigured line, hundreds a minute; the
/// collector turns the same facts into one diagnosis per line
/// (`line::GARBLED_DIAGNOSIS`) and Bad points, so the library's lines appear
/// only when asked for (`GUANTONG_LOG=info,tokio_modbus=debug`).
pub fn log_filter(requested: Option<String>) -> String {
    let requested = requested
        .filter(|f| !f.trim().is_empty())
        .unwrap_or_else(|| "info".into());
    if requested.contains("tokio_modbus") {
        requested
    } else {
        format!("{requested},tokio_modbus=off")
    }
}

/// Groups devices (with the manifest index of their first tag) into lines,
/// in config order.
pub fn lines(devices: Vec<(ModbusConfig, u32)>) -> Vec<Line> {
    let mut grouped: BTreeMap<String, (usize, Vec<Unit>)> = BTreeMap::new();
    for (n, (config, first)) in devices.into_iter().enumerate() {
        let key = config.transport.line_key(&config.id);
        grouped
            .entry(key)
            .or_insert_with(|| (n, Vec::new()))
            .1
            .push(Unit::new(config, first));
    }
    let mut lines: Vec<(usize, Line)> = grouped
        .into_iter()
        .map(|(key, (n, units))| (n, Line::new(key, units)))
        .collect();
    lines.sort_by_key(|(n, _)| *n);
    lines.into_iter().map(|(_, l)| l).collect()
}

/// Checks that devices sharing a line agree on its settings and do not
/// share a unit id.
pub(crate) fn check_lines(devices: &[DeviceConfig], problems: &mut Problems) {
    let mut seen: BTreeMap<String, (usize, &Transport, Vec<u8>)> = BTreeMap::new();
    for (i, d) in devices.iter().enumerate() {
        #[allow(irrefutable_let_patterns)] // other protocols join this enum
        let DeviceConfig::Modbus(c) = d else {
            continue;
        };
        if matches!(c.transport, Transport::Tcp { .. }) {
            continue;
        }
        let key = c.transport.line_key(&c.id);
        match seen.get_mut(&key) {
            None => {
                seen.insert(key, (i, &c.transport, vec![c.unit]));
            }
            Some((first, transport, units)) => {
                if *transport != &c.transport {
                    problems.push(
                        format!("devices[{i}]"),
                        format!(
                            "shares {key} with devices[{first}] but not its line settings (baud rate, framing, inter_frame_delay must match)"
                        ),
                    );
                }
                if units.contains(&c.unit) {
                    problems.push(
                        format!("devices[{i}].unit"),
                        format!("unit {} is already used on {key}", c.unit),
                    );
                }
                units.push(c.unit);
            }
        }
    }
}

/// Reads device identification (function 43/14) of every device that has
/// `identify = true`, line by line in parallel, units of a line one at a
/// time, and stores it in the config for the manifest. A unit that does not
/// answer or support it costs at most its timeout and gets no identity.
pub async fn identify_all(devices: &mut [DeviceConfig]) {
    // Only what identification needs: a clone of a whole config would copy
    // every tag (tens of MB at 100k tags) just to read three strings.
    let mut by_line: BTreeMap<String, Vec<(usize, Transport, u8, Duration)>> = BTreeMap::new();
    for (i, d) in devices.iter().enumerate() {
        #[allow(irrefutable_let_patterns)]
        let DeviceConfig::Modbus(c) = d else {
            continue;
        };
        if c.identify {
            by_line
                .entry(c.transport.line_key(&c.id))
                .or_default()
                .push((i, c.transport.clone(), c.unit, c.timeout));
        }
    }
    let mut tasks = JoinSet::new();
    for (_, units) in by_line {
        tasks.spawn(async move {
            let mut found = Vec::new();
            let Some((_, transport, _, limit)) = units.first() else {
                return found;
            };
            let Ok(mut conn) = transport::connect(transport, *limit).await else {
                return found;
            };
            for (i, transport, unit, limit) in &units {
                let identity = transport::identify(&mut conn, *unit, *limit).await;
                tokio::time::sleep(transport.inter_frame_delay()).await;
                found.push((*i, identity));
            }
            found
        });
    }
    while let Some(done) = tasks.join_next().await {
        for (i, identity) in done.unwrap_or_default() {
            #[allow(irrefutable_let_patterns)]
            if let Some(DeviceConfig::Modbus(c)) = devices.get_mut(i) {
                if !identity.is_empty() {
                    info!(device = %c.id, ?identity, "modbus device identified");
                }
                c.identity = identity;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_logs_are_off_unless_the_filter_names_them() {
        assert_eq!(log_filter(None), "info,tokio_modbus=off");
        assert_eq!(log_filter(Some(" ".into())), "info,tokio_modbus=off");
        assert_eq!(log_filter(Some("debug".into())), "debug,tokio_modbus=off");
        let asked = "info,tokio_modbus=debug".to_string();
        assert_eq!(log_filter(Some(asked.clone())), asked);
    }
}
