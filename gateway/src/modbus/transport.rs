//! Opening a Modbus connection for each transport, and sorting what a read
//! returned into device answers and transport failures.
//!
//! Every transport ends up as a tokio-modbus client `Context`; the unit id is
//! set per request (`set_slave`), so one context serves every unit of a line.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::timeout;
use tokio_modbus::client::{Context, Reader, rtu, tcp};
use tokio_modbus::prelude::{ReadCode, SlaveContext};
use tokio_modbus::slave::Slave;
use tokio_serial::SerialPortBuilderExt;

use super::config::{Parity, Table, Transport};
use crate::quality;

/// What one read returned.
#[derive(Debug)]
pub enum Outcome {
    Words(Vec<u16>),
    Bits(Vec<bool>),
    /// The device answered with this exception code: a data-quality fact.
    Exception(u8),
    /// No (recognisable) answer within the timeout.
    Timeout,
    /// A CRC error or a garbled frame: the line is noisy, the unit is alive.
    Frame,
    /// The answer did not match the request (unit, function or length).
    Mismatch,
    /// The connection is broken and must be rebuilt.
    Broken(String),
}

impl Outcome {
    /// Quality code of a failed read.
    pub fn code(&self) -> u32 {
        match self {
            Outcome::Words(_) | Outcome::Bits(_) => 0,
            Outcome::Exception(e) => quality::MODBUS_EXCEPTION | u32::from(*e),
            Outcome::Timeout => quality::TIMEOUT,
            Outcome::Frame => quality::FRAME_ERROR,
            Outcome::Mismatch => quality::MALFORMED,
            Outcome::Broken(_) => quality::TRANSPORT_ERROR,
        }
    }
}

/// Opens the connection of a line, within `limit`.
pub async fn connect(transport: &Transport, limit: Duration) -> Result<Context, String> {
    match transport {
        Transport::Tcp { host, port } => {
            let addr = resolve(host, *port, limit).await?;
            match timeout(limit, tcp::connect(addr)).await {
                Ok(Ok(ctx)) => Ok(ctx),
                Ok(Err(e)) => Err(format!("cannot connect to {addr}: {e}")),
                Err(_) => Err(format!("connecting to {addr} timed out")),
            }
        }
        Transport::RtuOverTcp { host, port, .. } => {
            let addr = resolve(host, *port, limit).await?;
            match timeout(limit, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    // Small frames, one at a time: send each at once.
                    let _ = stream.set_nodelay(true);
                    Ok(rtu::attach(stream))
                }
                Ok(Err(e)) => Err(format!("cannot connect to {addr}: {e}")),
                Err(_) => Err(format!("connecting to {addr} timed out")),
            }
        }
        Transport::Rtu(s) => {
            let data_bits = match s.data_bits {
                5 => tokio_serial::DataBits::Five,
                6 => tokio_serial::DataBits::Six,
                7 => tokio_serial::DataBits::Seven,
                _ => tokio_serial::DataBits::Eight,
            };
            let parity = match s.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Even => tokio_serial::Parity::Even,
                Parity::Odd => tokio_serial::Parity::Odd,
            };
            let stop_bits = match s.stop_bits {
                2 => tokio_serial::StopBits::Two,
                _ => tokio_serial::StopBits::One,
            };
            tokio_serial::new(&s.path, s.baud_rate)
                .data_bits(data_bits)
                .parity(parity)
                .stop_bits(stop_bits)
                .open_native_async()
                .map(rtu::attach)
                .map_err(|e| format!("cannot open serial port {}: {e}", s.path))
        }
    }
}

async fn resolve(host: &str, port: u16, limit: Duration) -> Result<SocketAddr, String> {
    let target = format!("{host}:{port}");
    match timeout(limit, tokio::net::lookup_host(&target)).await {
        Ok(Ok(mut addrs)) => addrs
            .next()
            .ok_or_else(|| format!("{target} resolves to no address")),
        Ok(Err(e)) => Err(format!("cannot resolve {target}: {e}")),
        Err(_) => Err(format!("resolving {target} timed out")),
    }
}

/// Reads `count` items of `table` from `start` on unit `unit`, within `limit`.
pub async fn read(
    ctx: &mut Context,
    unit: u8,
    table: Table,
    start: u16,
    count: u16,
    limit: Duration,
) -> Outcome {
    ctx.set_slave(Slave(unit));
    let call = async {
        match table {
            Table::Holding => ctx
                .read_holding_registers(start, count)
                .await
                .map(|x| x.map(Outcome::Words)),
            Table::Input => ctx
                .read_input_registers(start, count)
                .await
                .map(|x| x.map(Outcome::Words)),
            Table::Coil => ctx
                .read_coils(start, count)
                .await
                .map(|x| x.map(Outcome::Bits)),
            Table::Discrete => ctx
                .read_discrete_inputs(start, count)
                .await
                .map(|x| x.map(Outcome::Bits)),
        }
    };
    let outcome = match timeout(limit, call).await {
        Err(_) => return Outcome::Timeout,
        Ok(Ok(Ok(answer))) => answer,
        Ok(Ok(Err(exception))) => return Outcome::Exception(u8::from(exception)),
        Ok(Err(e)) => return classify(e),
    };
    // A device that returns fewer items than asked must not shift values
    // into the wrong tags: the whole answer is Bad. (Bit answers are padded
    // to whole bytes, so more bits than asked are normal.)
    match &outcome {
        Outcome::Words(w) if w.len() != usize::from(count) => Outcome::Mismatch,
        Outcome::Bits(b) if b.len() < usize::from(count) => Outcome::Mismatch,
        _ => outcome,
    }
}

fn classify(e: tokio_modbus::Error) -> Outcome {
    match e {
        tokio_modbus::Error::Protocol(_) => Outcome::Mismatch,
        tokio_modbus::Error::Transport(e) => match e.kind() {
            // tokio-modbus reports CRC errors and undecodable frames so.
            ErrorKind::InvalidData => Outcome::Frame,
            ErrorKind::TimedOut => Outcome::Timeout,
            _ => Outcome::Broken(e.to_string()),
        },
    }
}

/// Reads the basic device identification (function 43, MEI 14): vendor,
/// product code and revision. Empty when the unit does not support it.
pub async fn identify(ctx: &mut Context, unit: u8, limit: Duration) -> BTreeMap<String, String> {
    ctx.set_slave(Slave(unit));
    let mut out = BTreeMap::new();
    let Ok(Ok(Ok(response))) =
        timeout(limit, ctx.read_device_identification(ReadCode::Basic, 0x00)).await
    else {
        return out;
    };
    for object in response.device_id_objects {
        let key = match object.id {
            0x00 => "vendor",
            0x01 => "product_code",
            0x02 => "revision",
            _ => continue,
        };
        let text = String::from_utf8_lossy(&object.value)
            .chars()
            .filter(|c| !c.is_control())
            .take(128)
            .collect::<String>();
        out.insert(key.to_string(), text.trim().to_string());
    }
    out
}
