//! `guantong-gateway probe modbus ...`: the installer's tools.
//!
//! * `read`: reads a range and prints every address decoded as every type
//!   and byte order side by side; `--expect 229.5` marks (and lists) the
//!   type/order/scale combinations that give the value the device's display
//!   shows, so nobody has to guess byte order or addressing.
//! * `scan`: lists the unit ids that answer on a line or host, with their
//!   identification (function 43/14) where they have it.
//! * `dry-run`: loads a config, prints each device's request plan and one
//!   round of decoded values per tag, and exits.
//!
//! Rendering is separate from I/O (`render_read`) so it is tested with
//! literal registers.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use guantong_proto::v1::point::Value;

use super::config::{
    ModbusConfig, ModbusTagConfig, ModbusType, Parity, SerialSettings, Table, Transport, WordOrder,
    conventional, rtu_silent_interval,
};
use super::decode::{decode_registers, decode_string};
use super::transport::{self, Outcome};
use crate::config::{Config, DeviceConfig};
use crate::probe::{Expect, as_f64, show};
use crate::quality;

#[derive(Debug, clap::Args)]
pub struct ModbusProbe {
    #[command(subcommand)]
    pub action: ProbeAction,
}

/// How to reach the device(s).
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Modbus TCP server, HOST:PORT (port 502 if omitted).
    #[arg(long, group = "transport", value_name = "HOST[:PORT]")]
    pub tcp: Option<String>,
    /// Serial device server carrying RTU frames over TCP, HOST:PORT.
    #[arg(long, group = "transport", value_name = "HOST[:PORT]")]
    pub rtu_over_tcp: Option<String>,
    /// Serial port for Modbus RTU, e.g. /dev/ttyUSB0.
    #[arg(long, group = "transport", value_name = "PATH")]
    pub serial: Option<String>,
    #[arg(long, default_value_t = 9600)]
    pub baud: u32,
    #[arg(long, value_enum, default_value_t = ParityArg::None)]
    pub parity: ParityArg,
    #[arg(long, default_value_t = 8)]
    pub data_bits: u8,
    #[arg(long, default_value_t = 1)]
    pub stop_bits: u8,
    /// Time to wait for each answer.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ParityArg {
    None,
    Even,
    Odd,
}

#[derive(Debug, clap::Subcommand)]
pub enum ProbeAction {
    /// Read a range; print each address as every type and byte order.
    Read {
        #[command(flatten)]
        target: Target,
        /// Unit id (slave id).
        #[arg(long, default_value_t = 1)]
        unit: u8,
        /// First address: conventional (40001, 30001, 10001, 00001, 400001)
        /// or TABLE:OFFSET with a zero-based offset (holding:0, input:12).
        address: String,
        /// Registers (or bits) to read.
        #[arg(long, default_value_t = 10)]
        count: u16,
        /// The value the device shows (e.g. on its display): mark which
        /// type, byte order and decimal scale yield it.
        #[arg(long, allow_hyphen_values = true)]
        expect: Option<String>,
    },
    /// List the unit ids that answer, with their identification.
    Scan {
        #[command(flatten)]
        target: Target,
        /// Unit ids to try: 1-247, or a list like 1,2,5-9.
        #[arg(long, default_value = "1-247")]
        units: String,
    },
    /// Load a config, print each device's request plan and one round of
    /// decoded values per tag, then exit.
    DryRun {
        #[arg(long, short, env = "GUANTONG_CONFIG")]
        config: PathBuf,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
    },
}

/// Probe failures worth a message and a non-zero exit.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
}

/// Runs a probe, printing to stdout.
pub async fn run(probe: ModbusProbe) -> Result<(), ProbeError> {
    match probe.action {
        ProbeAction::Read {
            target,
            unit,
            address,
            count,
            expect,
        } => {
            let (table, start) = parse_address(&address).map_err(ProbeError::Usage)?;
            let expect = expect
                .map(|e| Expect::parse(&e))
                .transpose()
                .map_err(ProbeError::Usage)?;
            let count = count.clamp(1, table.max_quantity());
            if u32::from(start) + u32::from(count) > 65536 {
                return Err(ProbeError::Usage(format!(
                    "{count} items from offset {start} run past 65535"
                )));
            }
            let transport = target.transport()?;
            let mut ctx = transport::connect(&transport, target.timeout)
                .await
                .map_err(ProbeError::Connect)?;
            let outcome =
                transport::read(&mut ctx, unit, table, start, count, target.timeout).await;
            match outcome {
                Outcome::Words(words) => {
                    print!("{}", render_read(table, start, &words, expect.as_ref()))
                }
                Outcome::Bits(bits) => {
                    for (i, b) in bits.iter().take(usize::from(count)).enumerate() {
                        let offset = start + i as u16;
                        println!(
                            "{:>7} {}:{offset:<5} {}",
                            table.conventional(offset),
                            table.name(),
                            u8::from(*b)
                        );
                    }
                }
                other => println!("no values: {}", quality::describe(other.code())),
            }
            Ok(())
        }
        ProbeAction::Scan { target, units } => {
            let units = parse_units(&units).map_err(ProbeError::Usage)?;
            scan(&target, &units).await
        }
        ProbeAction::DryRun { config, device } => dry_run(config, device).await,
    }
}

impl Target {
    fn transport(&self) -> Result<Transport, ProbeError> {
        let split = |s: &str| -> (String, u16) {
            match s.rsplit_once(':') {
                Some((h, p)) if p.parse::<u16>().is_ok() => {
                    (h.to_string(), p.parse().unwrap_or(502))
                }
                _ => (s.to_string(), 502),
            }
        };
        if let Some(t) = &self.tcp {
            let (host, port) = split(t);
            return Ok(Transport::Tcp { host, port });
        }
        if let Some(t) = &self.rtu_over_tcp {
            let (host, port) = split(t);
            return Ok(Transport::RtuOverTcp {
                host,
                port,
                inter_frame_delay: Duration::from_millis(5),
            });
        }
        if let Some(path) = &self.serial {
            return Ok(Transport::Rtu(SerialSettings {
                path: path.clone(),
                baud_rate: self.baud,
                data_bits: self.data_bits,
                parity: match self.parity {
                    ParityArg::None => Parity::None,
                    ParityArg::Even => Parity::Even,
                    ParityArg::Odd => Parity::Odd,
                },
                stop_bits: self.stop_bits,
                inter_frame_delay: rtu_silent_interval(self.baud),
            }));
        }
        Err(ProbeError::Usage(
            "say how to reach the device: --tcp HOST:PORT, --rtu-over-tcp HOST:PORT or --serial PATH"
                .into(),
        ))
    }
}

/// `40001`, `00001`, `400001`, or `holding:0` (zero-based).
pub fn parse_address(text: &str) -> Result<(Table, u16), String> {
    if let Some((table, offset)) = text.split_once(':') {
        let table = match table {
            "holding" => Table::Holding,
            "input" => Table::Input,
            "coil" => Table::Coil,
            "discrete" => Table::Discrete,
            other => {
                return Err(format!(
                    "unknown table `{other}`, expected holding, input, coil or discrete"
                ));
            }
        };
        let offset = offset
            .parse::<u16>()
            .map_err(|_| format!("`{offset}` is not a zero-based offset 0-65535"))?;
        return Ok((table, offset));
    }
    conventional(text)
}

/// `1-247`, `1,2,5-9`.
pub fn parse_units(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| {
            s.trim()
                .parse::<u8>()
                .map_err(|_| format!("`{s}` is not a unit id 0-255"))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if a > b {
            return Err(format!("`{part}`: empty range"));
        }
        out.extend(a..=b);
    }
    Ok(out)
}

const TYPES: [ModbusType; 9] = [
    ModbusType::U16,
    ModbusType::I16,
    ModbusType::U32,
    ModbusType::I32,
    ModbusType::F32,
    ModbusType::U64,
    ModbusType::I64,
    ModbusType::F64,
    ModbusType::String,
];

/// Every address of `words` (read from `start` of `table`) as every type and
/// order; with `expect`, matches are starred and listed at the end.
pub fn render_read(table: Table, start: u16, words: &[u16], expect: Option<&Expect>) -> String {
    let mut out = String::new();
    let mut found = Vec::new();
    let width = 22;
    for i in 0..words.len() {
        let offset = start.saturating_add(i as u16);
        let label = format!("{} ({}:{offset})", table.conventional(offset), table.name());
        let _ = writeln!(out, "{label}  raw 0x{:04X}", words[i]);
        let _ = write!(out, "  {:<7}", "");
        for order in WordOrder::ALL {
            let _ = write!(out, "{:<width$}", order.name());
        }
        let trimmed = out.trim_end_matches(' ').len();
        out.truncate(trimmed);
        out.push('\n');
        for ty in TYPES {
            let n = if ty == ModbusType::String {
                (words.len() - i).min(8)
            } else {
                usize::from(ty.words())
            };
            let Some(w) = words.get(i..i + n) else {
                continue;
            };
            let _ = write!(out, "  {:<7}", ty.name());
            for order in WordOrder::ALL {
                // One register has only two orders: with and without the byte swap.
                let redundant = matches!(
                    (ty, order),
                    (
                        ModbusType::U16 | ModbusType::I16 | ModbusType::String,
                        WordOrder::Cdab | WordOrder::Dcba
                    )
                );
                let cell = if redundant {
                    String::new()
                } else {
                    let v = match ty {
                        ModbusType::String => Some(Value::String(decode_string(w, order))),
                        // Show an f32 with the digits an f32 has (229.49, not
                        // 229.49000549316406).
                        ModbusType::F32 => decode_registers(w, ty, order).map(|v| match v {
                            Value::Double(d) => {
                                Value::Double(format!("{}", d as f32).parse().unwrap_or(d))
                            }
                            other => other,
                        }),
                        _ => decode_registers(w, ty, order),
                    };
                    match v {
                        Some(v) => {
                            let mut cell = show(&v);
                            if let (Some(e), Some(x)) = (expect, as_f64(&v)) {
                                let float = matches!(ty, ModbusType::F32 | ModbusType::F64);
                                let scales: &[(f64, &str)] = if float {
                                    &[(1.0, "")]
                                } else {
                                    &[
                                        (1.0, ""),
                                        (0.1, " x0.1"),
                                        (0.01, " x0.01"),
                                        (0.001, " x0.001"),
                                    ]
                                };
                                for (scale, name) in scales {
                                    if e.matches(x * scale) {
                                        cell = format!("{cell} *{}", name.trim());
                                        found.push(format!(
                                            "{label}: type = \"{}\", order = \"{}\"{}",
                                            ty.name(),
                                            order.name(),
                                            if *scale == 1.0 {
                                                String::new()
                                            } else {
                                                format!(", scale = {scale}")
                                            }
                                        ));
                                        break;
                                    }
                                }
                            }
                            cell
                        }
                        None => "-".into(),
                    }
                };
                let mut cell = cell;
                if cell.chars().count() >= width {
                    cell = cell.chars().take(width - 2).collect::<String>() + "…";
                }
                let _ = write!(out, "{cell:<width$}");
            }
            let trimmed = out.trim_end_matches(' ').len();
            out.truncate(trimmed);
            out.push('\n');
        }
    }
    if let Some(e) = expect {
        if found.is_empty() {
            let _ = writeln!(
                out,
                "\n{} (±{}) is not in this range as any type, order or decimal scale",
                e.value, e.tolerance
            );
        } else {
            let _ = writeln!(out, "\n{} (±{}) found as:", e.value, e.tolerance);
            for f in found {
                let _ = writeln!(out, "  {f}");
            }
        }
    }
    out
}

async fn scan(target: &Target, units: &[u8]) -> Result<(), ProbeError> {
    let transport = target.transport()?;
    let mut ctx = transport::connect(&transport, target.timeout)
        .await
        .map_err(ProbeError::Connect)?;
    let mut answering = 0;
    for &unit in units {
        let outcome = transport::read(&mut ctx, unit, Table::Holding, 0, 1, target.timeout).await;
        let answer = match &outcome {
            Outcome::Words(w) => Some(format!("holding 40001 = {}", w[0])),
            // An exception is an answer: a device with this unit id exists.
            Outcome::Exception(e) => Some(format!("answers with exception {e}")),
            Outcome::Frame => Some("answers, but garbled (check baud rate and parity)".into()),
            _ => None,
        };
        match answer {
            Some(a) => {
                answering += 1;
                let id = transport::identify(&mut ctx, unit, target.timeout).await;
                let id = if id.is_empty() {
                    "no identification (function 43/14)".to_string()
                } else {
                    id.iter()
                        .map(|(k, v)| format!("{k}={v:?}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                println!("unit {unit:>3}: {a}; {id}");
            }
            None => {
                if let Outcome::Broken(e) = &outcome {
                    println!("unit {unit:>3}: connection broken ({e}); reconnecting");
                }
            }
        }
        // On Modbus TCP a late answer would be taken for the next request's.
        if matches!(outcome, Outcome::Timeout | Outcome::Broken(_))
            && !matches!(transport, Transport::Rtu(_))
        {
            ctx = transport::connect(&transport, target.timeout)
                .await
                .map_err(ProbeError::Connect)?;
        }
        tokio::time::sleep(transport.inter_frame_delay()).await;
    }
    println!(
        "{answering} of {} unit ids answered on {}",
        units.len(),
        transport.endpoint()
    );
    Ok(())
}

async fn dry_run(path: PathBuf, only: Option<String>) -> Result<(), ProbeError> {
    let mut config = Config::load(&path)?;
    if let Some(only) = &only {
        config.devices.retain(|d| d.id() == only);
        if config.devices.is_empty() {
            return Err(ProbeError::Usage(format!(
                "no device `{only}` in the config"
            )));
        }
    }
    super::identify_all(&mut config.devices).await;
    let mut devices: Vec<(ModbusConfig, u32)> = Vec::new();
    // Lines keep only how to decode each tag; names and units for printing.
    let mut tags: Vec<ModbusTagConfig> = Vec::new();
    for d in config.devices {
        #[allow(irrefutable_let_patterns)] // other protocols join this enum
        if let DeviceConfig::Modbus(c) = d {
            devices.push((c.clone(), tags.len() as u32));
            tags.extend(c.tags);
        }
    }
    for mut line in super::lines(devices) {
        println!("line {}", line.key);
        for unit in &line.units {
            let c = &unit.config;
            println!(
                "  device {} unit {} ({}){}",
                c.id,
                c.unit,
                c.transport.protocol(),
                if c.identity.is_empty() {
                    String::new()
                } else {
                    format!(" identity {:?}", c.identity)
                }
            );
            for g in &unit.groups {
                println!("    every {:?}: {} request(s)", g.interval, g.plan.len());
                for r in g.plan.iter() {
                    println!(
                        "      {} {}..{} ({} {}, {} tag(s))",
                        r.table.name(),
                        r.start,
                        u32::from(r.start) + u32::from(r.count) - 1,
                        r.count,
                        if r.table.is_bits() {
                            "bits"
                        } else {
                            "registers"
                        },
                        r.tags.len()
                    );
                }
            }
        }
        for (u, samples) in line.poll_once().await {
            let unit = &line.units[u];
            println!("  values of {}:", unit.config.id);
            for s in samples {
                let Some(tag) = tags.get(s.tag as usize) else {
                    continue;
                };
                let value = match &s.value {
                    Some(v) => format!("{} {}", show(v), tag.unit),
                    None => format!("BAD {}", quality::describe(s.code)),
                };
                println!(
                    "    {:<28} {:>7} {:<16} {}",
                    tag.name,
                    tag.table.conventional(tag.address),
                    tag.address_text(),
                    value.trim_end()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_units_and_expectations() {
        assert_eq!(parse_address("40001"), Ok((Table::Holding, 0)));
        assert_eq!(parse_address("input:12"), Ok((Table::Input, 12)));
        assert!(parse_address("register:1").is_err());
        assert_eq!(parse_units("1-3,7"), Ok(vec![1, 2, 3, 7]));
        assert!(parse_units("5-2").is_err());
        assert_eq!(
            Expect::parse("229.5"),
            Ok(Expect {
                value: 229.5,
                tolerance: 0.05
            })
        );
        assert_eq!(Expect::parse("230").map(|e| e.tolerance), Ok(0.5));
    }

    #[test]
    fn read_marks_every_type_and_order_that_gives_the_expected_value() {
        // 229.5 as f32 is 0x4365_8000; in CDAB the words are swapped. Then
        // 2295 as a u16 (a meter with one decimal).
        let words = [0x8000, 0x4365, 2295];
        let e = Expect::parse("229.5").expect("number");
        let text = render_read(Table::Holding, 0, &words, Some(&e));
        assert!(
            text.contains(
                "229.5 (±0.05) found as:\n  40001 (holding:0): type = \"f32\", order = \"CDAB\"\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("  40003 (holding:2): type = \"u16\", order = \"ABCD\", scale = 0.1\n"),
            "{text}"
        );
        assert!(text.contains("40002 (holding:1)  raw 0x4365"), "{text}");
        // Values that need registers beyond the range are left out, not guessed.
        assert!(
            !text.contains("40003 (holding:2)  raw 0x08F7\n  ABCD"),
            "{text}"
        );
        let none = render_read(Table::Input, 0, &[1], Some(&Expect::parse("5").expect("n")));
        assert!(none.contains("is not in this range"), "{none}");
    }
}
