//! `guantong-gateway probe dlt645 ...`: the installer's tools.
//!
//! * `read-address`: asks the meter alone on the line for its address (the
//!   broadcast address AAAAAAAAAAAA, control code 0x13); the first thing to
//!   do with a meter whose label is unreadable.
//! * `read DI...`: reads data identifiers of `--meter` and prints each
//!   value as the gateway would decode it, with the raw bytes beside it.
//!
//! Rendering is separate from I/O (`render_value`) so it is tested with
//! literal bytes.

use std::time::Duration;

use guantong_proto::v1::point::Value;

use super::config::{Dlt645Transport, parse_di};
use super::di::{self, Reading};
use super::frame::Address;
use super::transport::{self, Outcome};
use crate::modbus::config::{Parity, SerialSettings, rtu_silent_interval};
use crate::modbus::probe::ParityArg;
use crate::quality;

#[derive(Debug, clap::Args)]
pub struct Dlt645Probe {
    /// Serial port of the RS-485 line, e.g. /dev/ttyUSB0.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "host",
        required_unless_present = "host"
    )]
    pub serial: Option<String>,
    #[arg(long, default_value_t = 2400)]
    pub baud: u32,
    #[arg(long, value_enum, default_value_t = ParityArg::Even)]
    pub parity: ParityArg,
    /// Serial device server (with --port) instead of a serial port.
    #[arg(long, requires = "port")]
    pub host: Option<String>,
    #[arg(long, requires = "host")]
    pub port: Option<u16>,
    /// The meter's 12-digit address (for `read`).
    #[arg(long)]
    pub meter: Option<String>,
    /// Time to wait for each answer.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub action: Dlt645Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Dlt645Action {
    /// Ask the only meter on the line for its address (broadcast).
    ReadAddress,
    /// Read data identifiers (8 hex digits, e.g. 02010100) of --meter.
    Read {
        #[arg(required = true)]
        di: Vec<String>,
        /// For a DI the gateway does not know: its data bytes.
        #[arg(long)]
        length: Option<u8>,
        /// For a DI the gateway does not know: the scale of its BCD number.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
    },
}

/// Runs a probe, printing to stdout; Err is the message for stderr.
pub async fn run(p: Dlt645Probe) -> Result<(), String> {
    let transport = match (&p.serial, &p.host, p.port) {
        (Some(path), _, _) => Dlt645Transport::Serial(SerialSettings {
            path: path.clone(),
            baud_rate: p.baud,
            data_bits: 8,
            parity: match p.parity {
                ParityArg::None => Parity::None,
                ParityArg::Even => Parity::Even,
                ParityArg::Odd => Parity::Odd,
            },
            stop_bits: 1,
            inter_frame_delay: rtu_silent_interval(p.baud),
        }),
        (None, Some(host), Some(port)) => Dlt645Transport::Tcp {
            host: host.clone(),
            port,
            inter_frame_delay: Duration::ZERO,
        },
        _ => return Err("give --serial PATH, or --host and --port".into()),
    };
    let mut conn = transport::connect(&transport, p.timeout).await?;
    let endpoint = transport.endpoint();
    match p.action {
        Dlt645Action::ReadAddress => match conn.read_address(p.timeout).await {
            Outcome::Address(a) => {
                println!("meter address: {a}");
                Ok(())
            }
            other => Err(explain(&endpoint, "AAAAAAAAAAAA", &other)),
        },
        Dlt645Action::Read { di, length, scale } => {
            let Some(meter) = p.meter.as_deref() else {
                return Err("`read` needs --meter ADDRESS (12 digits; `read-address` finds it when the meter is alone on the line)".into());
            };
            let meter = Address::parse(meter)?;
            let mut failed = 0;
            for text in di {
                let di = parse_di(&text)?;
                let reading = match (di::known(di), length) {
                    (_, Some(length)) => Reading {
                        length,
                        format: di::Format::Number,
                        signed: false,
                        scale,
                    },
                    (Some(k), None) => Reading {
                        length: k.length,
                        format: k.format,
                        signed: k.signed,
                        scale: 10f64.powi(-i32::from(k.decimals)),
                    },
                    (None, None) => Reading {
                        length: 0,
                        format: di::Format::Number,
                        signed: false,
                        scale,
                    },
                };
                let outcome = conn.read(meter, di, p.timeout).await;
                match outcome {
                    Outcome::Data(bytes) => println!("{}", render_value(di, &reading, &bytes)),
                    other => {
                        failed += 1;
                        println!(
                            "{di:08X}  {}",
                            explain(&endpoint, &meter.to_string(), &other)
                        );
                    }
                }
                tokio::time::sleep(transport.inter_frame_delay()).await;
            }
            if failed > 0 {
                Err(format!("{failed} data identifier(s) not read"))
            } else {
                Ok(())
            }
        }
    }
}

fn explain(endpoint: &str, meter: &str, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Timeout => format!(
            "no answer from meter {meter} on {endpoint}: check the address, baud rate and parity (meters default to 2400 8E1) and the A/B wiring"
        ),
        Outcome::Broken(e) => format!("{endpoint}: {e}"),
        other => quality::describe(other.code()),
    }
}

/// One line per DI: the value as the gateway decodes it, what the standard
/// calls it, and the raw data bytes as sent (least significant first).
pub fn render_value(di: u32, reading: &Reading, bytes: &[u8]) -> String {
    let raw: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
    let known = di::known(di);
    let what = known
        .as_ref()
        .map(|k| k.what.as_str())
        .unwrap_or("not a DI the gateway knows");
    let unit = known.as_ref().map(|k| k.unit).unwrap_or("");
    let value = if reading.length == 0 {
        "(give --length to decode)".to_string()
    } else {
        match reading.decode(bytes) {
            Ok(Value::Double(v)) => format!("{v} {unit}").trim_end().to_string(),
            Ok(Value::String(s)) => s,
            Ok(other) => format!("{other:?}"),
            Err(code) => quality::describe(code),
        }
    };
    format!("{di:08X}  {value}  ({what}; data {})", raw.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_prints_decoded_with_its_name_and_raw_bytes() {
        let k = di::known(0x0201_0100).expect("known");
        let r = Reading {
            length: k.length,
            format: k.format,
            signed: k.signed,
            scale: 0.1,
        };
        assert_eq!(
            render_value(0x0201_0100, &r, &[0x01, 0x22]),
            "02010100  220.1 V  (phase A voltage; data 01 22)"
        );
        let unknown = Reading {
            length: 0,
            format: di::Format::Number,
            signed: false,
            scale: 1.0,
        };
        assert_eq!(
            render_value(0x0400_0409, &unknown, &[0x12]),
            "04000409  (give --length to decode)  (not a DI the gateway knows; data 12)"
        );
    }
}
