//! DL/T 645-2007 energy meters on RS-485 or behind a serial device server:
//! `protocol = "dlt645"`.
//!
//! # Design
//! Meters are grouped into lines (`line`): all meters on one serial port, or
//! behind one serial device server, share one task that owns the connection
//! and polls them strictly one request at a time, with Modbus RTU's rules
//! (inter-frame delay, a dead meter costs its timeout once, then is backed
//! off and probed in the line's idle time). Each tag is one data identifier
//! read with control code 0x11; its answer is decoded from BCD by `di`.
//! `frame` builds and checks frames, `transport` opens lines and turns one
//! exchange into an `Outcome`, `config` parses devices and templates,
//! `probe` is the installer's command line.
//!
//! # Invariants
//! - Every tag yields one sample per poll of its meter: its value, or Bad
//!   with the reason: the meter's error byte (`quality::DLT645_ERROR | e`),
//!   `MALFORMED` for an answer that does not fit, or a link code.
//! - Whatever bytes arrive, the gateway does not panic (`frame::find_frame`
//!   is fuzzed: `gateway/fuzz` target `dlt645_frame`).
//! - A serial port (or serial device server) has one owner: `check` refuses
//!   one claimed by a Modbus device and a meter both.
//!
//! Identity: at start, before the lines open, each meter is asked for its
//! meter number (DI 04000402, the 表号 printed on its nameplate), which goes
//! into the manifest as `meter_number`; a meter that does not answer in its
//! `timeout` has none. Lines are asked in parallel, meters of a line in turn.

pub mod config;
pub mod di;
pub mod frame;
pub mod line;
pub mod probe;
pub mod transport;

use std::collections::BTreeMap;

use config::Dlt645Config;
use line::{Line, Meter};

/// DI of the meter number.
const METER_NUMBER: u32 = 0x0400_0402;

/// Reads every meter's number for the manifest (see the module docs).
pub async fn identify_all(devices: &mut [crate::config::DeviceConfig]) {
    let mut by_line: BTreeMap<String, Vec<(usize, Dlt645Config)>> = BTreeMap::new();
    for (i, d) in devices.iter().enumerate() {
        if let crate::config::DeviceConfig::Dlt645(c) = d {
            let c = Dlt645Config {
                tags: Vec::new(),
                ..(**c).clone()
            };
            by_line
                .entry(c.transport.line_key())
                .or_default()
                .push((i, c));
        }
    }
    let jobs: Vec<_> = by_line
        .into_values()
        .map(|meters| tokio::spawn(identify_line(meters)))
        .collect();
    for job in jobs {
        let Ok(found) = job.await else { continue };
        for (i, number) in found {
            if let crate::config::DeviceConfig::Dlt645(c) = &mut devices[i] {
                tracing::info!(device = %c.id, meter_number = %number, "meter identified");
                c.identity.insert("meter_number".into(), number);
            }
        }
    }
}

/// The meter numbers of one line's meters that answered.
async fn identify_line(meters: Vec<(usize, Dlt645Config)>) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let Some((_, first)) = meters.first() else {
        return found;
    };
    let mut conn = match transport::connect(&first.transport, first.timeout).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(line = %first.transport.line_key(), error = %e, "meters not identified");
            return found;
        }
    };
    let reading = di::Reading {
        length: 6,
        format: di::Format::Digits,
        signed: false,
        scale: 1.0,
    };
    for (i, c) in &meters {
        tokio::time::sleep(c.transport.inter_frame_delay()).await;
        match conn.read(c.meter, METER_NUMBER, c.timeout).await {
            transport::Outcome::Data(data) => {
                if let Ok(guantong_proto::v1::point::Value::String(n)) = reading.decode(&data) {
                    found.push((*i, n));
                }
            }
            transport::Outcome::Broken(_) => break,
            other => {
                tracing::warn!(device = %c.id, outcome = ?other, "meter number not read");
            }
        }
    }
    found
}

/// Groups meters (with the manifest index of their first tag) into lines,
/// in config order.
pub fn lines(devices: Vec<(Dlt645Config, u32)>) -> Vec<Line> {
    let mut grouped: BTreeMap<String, (usize, Vec<Meter>)> = BTreeMap::new();
    for (n, (config, first)) in devices.into_iter().enumerate() {
        grouped
            .entry(config.transport.line_key())
            .or_insert_with(|| (n, Vec::new()))
            .1
            .push(Meter::new(config, first));
    }
    let mut lines: Vec<(usize, Line)> = grouped
        .into_iter()
        .map(|(key, (n, meters))| (n, Line::new(format!("dlt645 {key}"), meters)))
        .collect();
    lines.sort_by_key(|(n, _)| *n);
    lines.into_iter().map(|(_, l)| l).collect()
}
