//! `guantong-gateway probe s7 ...`: the installer's tools for a PLC.
//!
//! * `read ADDRESS --count N`: reads N bytes from the address's byte and
//!   prints every byte offset decoded as every S7 type that can start there,
//!   each with the STEP 7 address to put in the config; `--expect 229.5`
//!   marks (and lists) the addresses and types that give the value the HMI
//!   shows. For timers (`T5`) and counters (`C3`) it reads N of them.
//! * `identify`: connects, prints the negotiated PDU size and what the CPU
//!   says of itself (order number, module type, serial number).
//!
//! Rendering is separate from I/O (`render_read`) so it is tested with
//! literal bytes.

use std::fmt::Write as _;
use std::time::Duration;

use super::config::{Address, Area, S7Config, S7TagConfig, S7Type, Width};
use super::proto::ReadItem;
use super::{Connection, decode};
use crate::probe::{Expect, as_f64, show};

#[derive(Debug, clap::Args)]
pub struct S7Probe {
    /// The PLC's address.
    #[arg(long)]
    pub host: String,
    #[arg(long, default_value_t = 102)]
    pub port: u16,
    #[arg(long, default_value_t = 0)]
    pub rack: u8,
    /// The CPU's slot: 1 for S7-1200/1500, 2 for most S7-300.
    #[arg(long, default_value_t = 1)]
    pub slot: u8,
    /// The PLC's TSAP as `hi.lo` hex bytes, instead of rack and slot
    /// (S7-200 SMART: 03.01; LOGO!: 02.00).
    #[arg(long)]
    pub tsap: Option<String>,
    /// Time to wait for each answer.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub action: S7ProbeAction,
}

#[derive(Debug, clap::Subcommand)]
pub enum S7ProbeAction {
    /// Read bytes from an address; print each offset as every S7 type.
    Read {
        /// Where to start, in STEP 7 notation (DB1.DBB0, DB1.DBD4, MW10, T5).
        address: String,
        /// Bytes to read (timers, counters: how many).
        #[arg(long, default_value_t = 16)]
        count: u16,
        /// The value the HMI or display shows: mark which address and type
        /// yield it.
        #[arg(long, allow_hyphen_values = true)]
        expect: Option<String>,
    },
    /// Print the PDU size and the CPU's identity (order number, module
    /// type, serial number).
    Identify,
}

/// Runs the probe, printing to `out`; Err is the message for the installer.
pub async fn run(probe: S7Probe, out: &mut impl std::io::Write) -> Result<(), String> {
    let config = S7Config {
        id: "probe".into(),
        host: probe.host,
        port: probe.port,
        rack: probe.rack,
        slot: probe.slot,
        tsap: probe.tsap,
        poll_interval: Duration::from_secs(1),
        timeout: probe.timeout,
        max_backoff: Duration::from_secs(1),
        tags: Vec::new(),
        identity: Default::default(),
    };
    if config
        .tsap
        .as_deref()
        .is_some_and(|t| super::config::parse_tsap(t).is_none())
    {
        return Err("--tsap: expected two hex bytes as `hi.lo`, e.g. 03.01".into());
    }
    let request = match &probe.action {
        S7ProbeAction::Read {
            address,
            count,
            expect,
        } => {
            let start = Address::parse(address)?;
            let expect = expect.as_deref().map(Expect::parse).transpose()?;
            Some((start, *count, expect))
        }
        S7ProbeAction::Identify => None,
    };
    let mut conn = Connection::open(&config)
        .await
        .map_err(|(_, e)| format!("{}: {e}", config.endpoint()))?;
    let text = match request {
        None => {
            let identity = conn.identity().await.map_err(|(_, e)| e)?;
            let mut text = format!("{}: PDU {} bytes\n", config.endpoint(), conn.pdu);
            if identity.is_empty() {
                text.push_str("the CPU gives no identity (SZL 0x0011, 0x001C refused)\n");
            }
            for (k, v) in identity {
                let _ = writeln!(text, "  {k}: {v}");
            }
            text
        }
        Some((start, count, expect)) => {
            let per = if is_counted(start.area) { 2 } else { 1 };
            // One item's answer must fit the PDU, with its headers.
            let most = (usize::from(conn.pdu) - 14 - 5) as u32 / per * per;
            let bytes = (u32::from(count.max(1)) * per).min(most);
            let item = ReadItem {
                area: start.area.code(),
                db: start.area.db(),
                start: start.byte,
                bytes: bytes as u16,
            };
            conn.pdu_ref = conn.pdu_ref.wrapping_add(1);
            let answer = conn
                .exchange(&super::proto::read_request(conn.pdu_ref, &[item]))
                .await
                .map_err(|(_, e)| e)?;
            let data = match super::proto::read_response(&answer, 1)?.pop() {
                Some(Ok(data)) => data,
                Some(Err(code)) => {
                    return Err(format!(
                        "the PLC refused {start}: {} (item code {code:#04x})",
                        item_code_meaning(code)
                    ));
                }
                None => return Err("the PLC answered no item".into()),
            };
            format!(
                "{}: PDU {} bytes, {} bytes from {start}\n{}",
                config.endpoint(),
                conn.pdu,
                data.len(),
                render_read(start, &data, expect.as_ref())
            )
        }
    };
    out.write_all(text.as_bytes()).map_err(|e| e.to_string())
}

fn is_counted(area: Area) -> bool {
    matches!(area, Area::Timers | Area::Counters)
}

/// What an S7 item return code tells the installer.
pub fn item_code_meaning(code: u8) -> &'static str {
    match code {
        0x01 => "hardware fault",
        0x03 => "access not allowed (S7-1200/1500: enable PUT/GET, use a non-optimized block)",
        0x05 => "address out of range (past the end of the block or area)",
        0x06 => "data type not supported",
        0x07 => "data type inconsistent",
        0x0A => "object does not exist (no such data block)",
        _ => "refused",
    }
}

/// Types tried at each offset, by the width they are addressed with.
const BYTE_TYPES: [S7Type; 5] = [
    S7Type::U8,
    S7Type::I8,
    S7Type::String,
    S7Type::DateAndTime,
    S7Type::Dtl,
];
const WORD_TYPES: [S7Type; 3] = [S7Type::U16, S7Type::I16, S7Type::Date];
const DWORD_TYPES: [S7Type; 6] = [
    S7Type::U32,
    S7Type::I32,
    S7Type::F32,
    S7Type::F64,
    S7Type::Time,
    S7Type::TimeOfDay,
];

/// Every offset of `data` (read from `start`) as every type that can start
/// there; with `expect`, matches are starred and listed at the end.
pub fn render_read(start: Address, data: &[u8], expect: Option<&Expect>) -> String {
    let mut out = String::new();
    let mut found = Vec::new();
    let mut line = |out: &mut String, address: Address, ty: S7Type, bytes: &[u8]| {
        let tag = S7TagConfig {
            name: "probe".into(),
            address: address.to_string(),
            data_type: ty,
            length: (ty == S7Type::String).then(|| bytes.first().copied().unwrap_or(0)),
            unit: String::new(),
            parsed: Some(address),
        };
        if ty == S7Type::String && !plausible_string(bytes) {
            return;
        }
        let Some(v) = decode(&tag, bytes) else {
            return;
        };
        let hit = expect.is_some_and(|e| as_f64(&v).is_some_and(|x| e.matches(x)));
        let _ = writeln!(
            out,
            "  {:<16}{:<14}{}{}",
            address.to_string(),
            ty.name(),
            show(&v),
            if hit { "  *" } else { "" }
        );
        if hit {
            found.push(format!("address = \"{address}\", type = \"{}\"", ty.name()));
        }
    };
    if is_counted(start.area) {
        for (n, pair) in data.chunks_exact(2).enumerate() {
            let address = Address {
                byte: start.byte + 2 * n as u32,
                ..start
            };
            let ty = if start.area == Area::Timers {
                S7Type::F64
            } else {
                S7Type::U16
            };
            let _ = writeln!(out, "{address}  raw 0x{:02X}{:02X}", pair[0], pair[1]);
            line(&mut out, address, ty, pair);
        }
    } else {
        for i in 0..data.len() {
            let byte = start.byte + i as u32;
            let at = |width| Address {
                byte,
                width,
                ..start
            };
            let rest = &data[i..];
            let _ = writeln!(
                out,
                "{}  raw 0x{:02X}  bits 7..0 {:08b}",
                at(Width::Byte),
                rest[0],
                rest[0]
            );
            for ty in BYTE_TYPES {
                line(&mut out, at(Width::Byte), ty, rest);
            }
            if rest.len() >= 2 {
                for ty in WORD_TYPES {
                    line(&mut out, at(Width::Word), ty, rest);
                }
            }
            if rest.len() >= 4 {
                for ty in DWORD_TYPES {
                    line(&mut out, at(Width::DWord), ty, rest);
                }
            }
        }
    }
    if let Some(e) = expect {
        if found.is_empty() {
            let _ = writeln!(out, "{} (±{}) not found", e.value, e.tolerance);
        } else {
            let _ = writeln!(out, "{} (±{}) found as:", e.value, e.tolerance);
            for f in found {
                let _ = writeln!(out, "  {f}");
            }
        }
    }
    out
}

/// Whether bytes look like an S7 STRING header (length within maximum).
fn plausible_string(bytes: &[u8]) -> bool {
    matches!(bytes, [max, len, ..] if *max > 0 && len <= max && usize::from(*len) <= bytes.len() - 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_shows_each_offset_as_every_type_and_stars_the_expected_value() {
        let mut data = vec![0x43, 0x65, 0x80, 0x00]; // 229.5 as f32
        data.extend_from_slice(&[4, 2, b'o', b'k']); // STRING[4] "ok"
        let start = Address::parse("DB1.DBB0").expect("address");
        let e = Expect::parse("229.5").expect("number");
        let text = render_read(start, &data, Some(&e));
        assert!(
            text.contains("  DB1.DBD0        f32           229.5  *\n"),
            "{text}"
        );
        assert!(
            text.contains("229.5 (±0.05) found as:\n  address = \"DB1.DBD0\", type = \"f32\"\n"),
            "{text}"
        );
        assert!(
            text.contains("  DB1.DBB4        string        \"ok\"\n"),
            "{text}"
        );
        assert!(
            text.contains("  DB1.DBW0        u16           17253\n"),
            "{text}"
        );
        assert!(
            text.contains("DB1.DBB7  raw 0x6B  bits 7..0 01101011\n"),
            "{text}"
        );
        // Not enough bytes left for a word at the last offset.
        assert!(!text.contains("DB1.DBW7"), "{text}");
        let none = render_read(start, &data, Some(&Expect::parse("-7").expect("n")));
        assert!(none.ends_with("-7 (±0.5) not found\n"), "{none}");
    }

    #[test]
    fn timers_and_counters_read_by_number() {
        let text = render_read(
            Address::parse("T4").expect("timer"),
            &[0x11, 0x23, 0x20, 0x05],
            None,
        );
        assert!(text.contains("T4  raw 0x1123\n  T4"), "{text}");
        assert!(text.contains("12.3"), "{text}");
        assert!(text.contains("T5  raw 0x2005\n"), "{text}");
        assert!(
            text.contains("  T5              f64           5\n"),
            "{text}"
        );
    }
}
