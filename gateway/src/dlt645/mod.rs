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

pub mod config;
pub mod di;
pub mod frame;
pub mod line;
pub mod probe;
pub mod transport;

use std::collections::BTreeMap;

use config::Dlt645Config;
use line::{Line, Meter};

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
