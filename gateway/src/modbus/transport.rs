//! Opening a Modbus connection for each transport, and sorting what a read
//! returned into device answers and transport failures.
//!
//! Every transport ends up as a tokio-modbus client `Context`; the unit id is
//! set per request (`set_slave`), so one context serves every unit of a line.
//!
//! The stream under the context counts the bytes it receives. tokio-modbus
//! skips bytes it cannot frame (a bad CRC, a wrong baud rate or parity) and
//! keeps waiting, so such an answer would look like silence; with the count,
//! a timeout after bytes did arrive is reported as a frame error instead,
//! which tells the installer the unit is there but the line is not right.
//!
//! Timeouts: each connection keeps one timer. A read re-arms it only when it
//! is set later than the read's deadline, or when it fires before the
//! deadline; while a device answers, that is about once per timeout period
//! instead of a timer registered and cancelled per request. A read never
//! times out before its deadline (and, like `tokio::time::timeout`, at most
//! a timer tick after it).

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use tokio::time::{Instant, Sleep, timeout};
use tokio_modbus::client::{Client, Context, rtu, tcp};
use tokio_modbus::prelude::{ReadCode, Request, Response, SlaveContext};
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

/// A client context and the count of bytes its stream has received.
pub struct Connection {
    pub ctx: Context,
    received: Arc<AtomicU64>,
    /// Read timeouts (see the module documentation); made at the first read.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Connection {
    /// Wraps `stream`, speaking RTU framing if `rtu`, else Modbus TCP.
    pub fn attach<T>(stream: T, rtu: bool) -> Connection
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug + 'static,
    {
        let received = Arc::new(AtomicU64::new(0));
        let stream = Counted {
            inner: stream,
            received: received.clone(),
        };
        let ctx = if rtu {
            rtu::attach(stream)
        } else {
            tcp::attach(stream)
        };
        Connection {
            ctx,
            received,
            timer: None,
        }
    }
}

/// A stream that counts the bytes read through it.
#[derive(Debug)]
struct Counted<T> {
    inner: T,
    received: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.received.fetch_add(n as u64, Ordering::Relaxed);
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Opens the connection of a line, within `limit`.
pub async fn connect(transport: &Transport, limit: Duration) -> Result<Connection, String> {
    match transport {
        Transport::Tcp { host, port } => {
            let addr = resolve(host, *port, limit).await?;
            match timeout(limit, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    Ok(Connection::attach(stream, false))
                }
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
                    Ok(Connection::attach(stream, true))
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
                .map(|s| Connection::attach(s, true))
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
    conn: &mut Connection,
    unit: u8,
    table: Table,
    start: u16,
    count: u16,
    limit: Duration,
) -> Outcome {
    let deadline = Instant::now() + limit;
    let before = conn.received.load(Ordering::Relaxed);
    let Connection {
        ctx,
        received,
        timer,
    } = conn;
    ctx.set_slave(Slave(unit));
    // `Client::call`, not the `Reader` helpers: those debug-assert the
    // answer's length, and a device's bytes must never panic the gateway.
    let request = match table {
        Table::Holding => Request::ReadHoldingRegisters(start, count),
        Table::Input => Request::ReadInputRegisters(start, count),
        Table::Coil => Request::ReadCoils(start, count),
        Table::Discrete => Request::ReadDiscreteInputs(start, count),
    };
    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    let call = ctx.call(request);
    tokio::pin!(call);
    let answer = loop {
        tokio::select! {
            biased;
            answer = &mut call => break Some(answer),
            () = timer.as_mut() => {
                if Instant::now() >= deadline {
                    break None;
                }
                // Armed by an earlier read: wait for this one's deadline.
                timer.as_mut().reset(deadline);
            }
        }
    };
    let outcome = match answer {
        // Bytes came, but no frame: garbled (CRC, baud rate, parity).
        None if received.load(Ordering::Relaxed) > before => return Outcome::Frame,
        None => return Outcome::Timeout,
        Some(Ok(Ok(response))) => match response {
            Response::ReadHoldingRegisters(w) | Response::ReadInputRegisters(w) => {
                Outcome::Words(w)
            }
            Response::ReadCoils(b) | Response::ReadDiscreteInputs(b) => Outcome::Bits(b),
            _ => Outcome::Mismatch,
        },
        Some(Ok(Err(exception))) => return Outcome::Exception(u8::from(exception)),
        Some(Err(e)) => return classify(e),
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
pub async fn identify(
    conn: &mut Connection,
    unit: u8,
    limit: Duration,
) -> BTreeMap<String, String> {
    let ctx = &mut conn.ctx;
    ctx.set_slave(Slave(unit));
    let mut out = BTreeMap::new();
    // `Client::call` rather than the helper, which has an `unreachable!`
    // for answers it does not expect.
    let Ok(Ok(Ok(Response::ReadDeviceIdentification(response)))) = timeout(
        limit,
        ctx.call(Request::ReadDeviceIdentification(ReadCode::Basic, 0x00)),
    )
    .await
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

#[doc(hidden)]
/// Sends one read of holding 0..`count` to unit 1 (RTU or TCP framing; count
/// 0: a device identification request) and answers it with `reply` (or stays
/// silent with `None`); returns what the collector makes of it. Shared by the
/// tests and the fuzz target.
pub async fn read_with_reply(reply: Option<Vec<u8>>, rtu: bool, count: u16) -> Outcome {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (client, mut device) = tokio::io::duplex(1024);
    let mut conn = Connection::attach(client, rtu);
    let answer = tokio::spawn(async move {
        let mut request = [0u8; 12];
        // The request: 8 bytes (RTU) or 12 (MBAP + PDU); identification 7 or 11.
        let n = match (rtu, count) {
            (true, 0) => 7,
            (false, 0) => 11,
            (true, _) => 8,
            (false, _) => 12,
        };
        if device.read_exact(&mut request[..n]).await.is_err() {
            return device;
        }
        if let Some(reply) = reply {
            let _ = device.write_all(&reply).await;
        }
        device
    });
    let limit = Duration::from_millis(100);
    let outcome = if count == 0 {
        // Identification instead of a read; any answer must leave a map.
        let _ = identify(&mut conn, 1, limit).await;
        Outcome::Timeout
    } else {
        read(&mut conn, 1, Table::Holding, 0, count, limit).await
    };
    // Keep the device end open until the read is over (EOF is another case).
    let _device = answer.await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc(data: &[u8]) -> [u8; 2] {
        let mut crc = 0xFFFFu16;
        for &b in data {
            crc ^= u16::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xA001
                } else {
                    crc >> 1
                };
            }
        }
        crc.to_le_bytes()
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = body.to_vec();
        f.extend_from_slice(&crc(body));
        f
    }

    #[tokio::test(start_paused = true)]
    async fn every_kind_of_rtu_answer_has_its_outcome() {
        let ok = frame(&[1, 3, 4, 0, 1, 0, 2]);
        match read_with_reply(Some(ok.clone()), true, 2).await {
            Outcome::Words(w) => assert_eq!(w, vec![1, 2]),
            other => panic!("{other:?}"),
        }
        let mut bad_crc = ok.clone();
        bad_crc[7] ^= 0xFF;
        assert!(matches!(
            read_with_reply(Some(bad_crc), true, 2).await,
            Outcome::Frame
        ));
        assert!(matches!(
            read_with_reply(Some(frame(&[1, 0x83, 2])), true, 2).await,
            Outcome::Exception(2)
        ));
        // Another unit's answer, another function's answer, too few values.
        for reply in [
            frame(&[2, 3, 4, 0, 1, 0, 2]),
            frame(&[1, 4, 4, 0, 1, 0, 2]),
            frame(&[1, 3, 2, 0, 1]),
        ] {
            let outcome = read_with_reply(Some(reply.clone()), true, 2).await;
            assert!(
                matches!(outcome, Outcome::Mismatch),
                "{reply:02X?}: {outcome:?}"
            );
        }
        assert!(matches!(
            read_with_reply(None, true, 2).await,
            Outcome::Timeout
        ));
    }

    /// The connection's timer, armed by an earlier read, must not cut a
    /// later read short: each read gets its whole timeout.
    #[tokio::test(start_paused = true)]
    async fn a_timer_armed_by_an_earlier_read_does_not_shorten_the_next() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut device) = tokio::io::duplex(1024);
        let mut conn = Connection::attach(client, true);
        let limit = Duration::from_millis(100);
        let device = tokio::spawn(async move {
            let mut request = [0u8; 8];
            // Answer the first read, then stay silent.
            device.read_exact(&mut request).await.ok()?;
            device.write_all(&frame(&[1, 3, 2, 0, 7])).await.ok()?;
            device.read_exact(&mut request).await.ok()?;
            Some(device)
        });
        assert!(matches!(
            read(&mut conn, 1, Table::Holding, 0, 1, limit).await,
            Outcome::Words(w) if w == [7]
        ));
        tokio::time::sleep(Duration::from_millis(60)).await;
        let start = Instant::now();
        let outcome = read(&mut conn, 1, Table::Holding, 0, 1, limit).await;
        let waited = start.elapsed();
        assert!(matches!(outcome, Outcome::Timeout), "{outcome:?}");
        assert!(
            waited >= limit && waited < limit + Duration::from_millis(5),
            "timed out after {waited:?}, expected {limit:?}"
        );
        let _device = device.await;
    }

    #[tokio::test(start_paused = true)]
    async fn any_bytes_give_an_outcome_never_a_panic_or_shifted_values() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for i in 0..400 {
            let rtu = i % 2 == 0;
            let count = rng.random_range(0..=125u16);
            let len = rng.random_range(0..300usize);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            // Half the time, a plausible header so decoding goes deeper.
            if rtu && len > 3 && rng.random_bool(0.5) {
                bytes[0] = 1;
                bytes[1] = if count == 0 { 0x2B } else { 3 };
                if count == 0 {
                    bytes[2] = 0x0E;
                }
            }
            match read_with_reply(Some(bytes.clone()), rtu, count).await {
                Outcome::Words(w) => assert_eq!(w.len(), usize::from(count), "{bytes:02X?}"),
                Outcome::Bits(_) => panic!("bits for a register read: {bytes:02X?}"),
                _ => {}
            }
        }
    }
}
