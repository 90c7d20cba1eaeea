//! Opening a DL/T 645 line and exchanging one request for its answer.
//!
//! `exchange` writes a request and reads until a frame answers it or the
//! limit passes. Frames that answer something else (another meter's late
//! answer, our own request echoed by a two-wire adapter) are skipped; bytes
//! that never form a valid frame make a timeout a frame error (`Frame`), as
//! for Modbus: the meter is there but the line is not right.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_serial::SerialPortBuilderExt;

use super::config::Dlt645Transport;
use super::frame::{self, Address, Found, Reply};
use crate::modbus::config::Parity;
use crate::quality;

/// Bytes kept while looking for an answer; a longer run without a valid
/// frame is noise and is dropped from the front.
const MAX_BUFFER: usize = 1024;

/// A byte stream a line runs over: a serial port, a TCP socket, or in tests
/// one end of a duplex pipe.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An open line.
pub struct Connection {
    io: Box<dyn Stream>,
    buf: Vec<u8>,
}

/// What one exchange returned.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The answer's data (after the DI for a read).
    Data(Vec<u8>),
    /// The meter's full answer frame to a read-address request.
    Address(Address),
    /// An abnormal answer: the meter's error byte.
    Refused(u8),
    /// No answer within the limit.
    Timeout,
    /// Bytes arrived but no valid frame: baud rate, parity or wiring.
    Frame,
    /// A frame from the meter that does not fit the request.
    Mismatch,
    /// The connection broke and must be rebuilt.
    Broken(String),
}

impl Outcome {
    /// Quality code of a failed exchange.
    pub fn code(&self) -> u32 {
        match self {
            Outcome::Data(_) | Outcome::Address(_) => 0,
            Outcome::Refused(e) => quality::DLT645_ERROR | u32::from(*e),
            Outcome::Timeout => quality::TIMEOUT,
            Outcome::Frame => quality::FRAME_ERROR,
            Outcome::Mismatch => quality::MALFORMED,
            Outcome::Broken(_) => quality::TRANSPORT_ERROR,
        }
    }

    /// The meter answered (even with an error): it is there.
    pub fn answered(&self) -> bool {
        matches!(
            self,
            Outcome::Data(_) | Outcome::Address(_) | Outcome::Refused(_) | Outcome::Mismatch
        )
    }
}

impl Connection {
    pub fn attach(io: impl Stream + 'static) -> Connection {
        Connection {
            io: Box::new(io),
            buf: Vec::with_capacity(256),
        }
    }

    /// Sends `request` (a whole frame with preamble) and reads its answer:
    /// to `to` with `control`, and for a read, echoing `di`.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        to: Address,
        control: u8,
        di: Option<u32>,
        limit: Duration,
    ) -> Outcome {
        let deadline = Instant::now() + limit;
        // Whatever came before this request is not its answer.
        self.buf.clear();
        match timeout_at(deadline, self.io.write_all(request)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Outcome::Broken(e.to_string()),
            Err(_) => return Outcome::Timeout,
        }
        let _ = timeout_at(deadline, self.io.flush()).await;
        // Bytes that were no valid frame (not counting the preamble).
        let mut garbled = false;
        let mut chunk = [0u8; 256];
        loop {
            // Frames already in the buffer first.
            loop {
                match frame::find_frame(&self.buf) {
                    Found::Frame(f, end) => {
                        self.buf.drain(..end);
                        match frame::reply(&f, to, control, di) {
                            Reply::Data(_) if control == frame::READ_ADDRESS => {
                                return Outcome::Address(frame::answered_address(&f));
                            }
                            Reply::Data(data) => return Outcome::Data(data),
                            Reply::Error(e) => return Outcome::Refused(e),
                            Reply::Mismatch => return Outcome::Mismatch,
                            Reply::Other => continue,
                        }
                    }
                    Found::NeedMore => break,
                    Found::Nothing => {
                        // Every candidate failed its checks and none can
                        // grow into a frame: noise (the preamble aside).
                        garbled |= self.buf.iter().any(|&b| b != 0xFE);
                        self.buf.clear();
                        break;
                    }
                }
            }
            if self.buf.len() > MAX_BUFFER {
                let cut = self.buf.len() - MAX_BUFFER / 2;
                self.buf.drain(..cut);
                garbled = true;
            }
            match timeout_at(deadline, self.io.read(&mut chunk)).await {
                Err(_) if garbled || self.buf.iter().any(|&b| b != 0xFE) => {
                    return Outcome::Frame;
                }
                Err(_) => return Outcome::Timeout,
                Ok(Ok(0)) => return Outcome::Broken("connection closed by the peer".into()),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Outcome::Broken(e.to_string()),
            }
        }
    }

    /// Reads one data identifier of meter `to`.
    pub async fn read(&mut self, to: Address, di: u32, limit: Duration) -> Outcome {
        let request = frame::read_request(to, di);
        self.exchange(&request, to, frame::READ_DATA, Some(di), limit)
            .await
    }

    /// Asks the meter alone on the line for its address (broadcast).
    pub async fn read_address(&mut self, limit: Duration) -> Outcome {
        let request = frame::request(frame::BROADCAST, frame::READ_ADDRESS, &[]);
        self.exchange(&request, frame::BROADCAST, frame::READ_ADDRESS, None, limit)
            .await
    }
}

/// Opens the connection of a line, within `limit`.
pub async fn connect(transport: &Dlt645Transport, limit: Duration) -> Result<Connection, String> {
    match transport {
        Dlt645Transport::Tcp { host, port, .. } => {
            let target = format!("{host}:{port}");
            match timeout(limit, tokio::net::TcpStream::connect(&target)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    Ok(Connection::attach(stream))
                }
                Ok(Err(e)) => Err(format!("cannot connect to {target}: {e}")),
                Err(_) => Err(format!("connecting to {target} timed out")),
            }
        }
        Dlt645Transport::Serial(s) => {
            let parity = match s.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Even => tokio_serial::Parity::Even,
                Parity::Odd => tokio_serial::Parity::Odd,
            };
            tokio_serial::new(&s.path, s.baud_rate)
                .data_bits(tokio_serial::DataBits::Eight)
                .parity(parity)
                .stop_bits(tokio_serial::StopBits::One)
                .open_native_async()
                .map(Connection::attach)
                .map_err(|e| format!("cannot open serial port {}: {e}", s.path))
        }
    }
}

#[doc(hidden)]
/// Reads DI 02010100 of meter 000000000001 and answers with `reply` (or
/// stays silent with `None`); returns the outcome. Shared by the tests and
/// the fuzz target.
pub async fn read_with_reply(reply: Option<Vec<u8>>) -> Outcome {
    let (client, mut meter) = tokio::io::duplex(4096);
    let mut conn = Connection::attach(client);
    let answer = tokio::spawn(async move {
        let mut request = [0u8; 20];
        if meter.read_exact(&mut request).await.is_err() {
            return meter;
        }
        if let Some(reply) = reply {
            let _ = meter.write_all(&reply).await;
        }
        meter
    });
    let outcome = conn
        .read(
            Address([1, 0, 0, 0, 0, 0]),
            0x0201_0100,
            Duration::from_millis(100),
        )
        .await;
    let _meter = answer.await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(address: [u8; 6], control: u8, data: &[u8]) -> Vec<u8> {
        let mut f = vec![0xFE, 0xFE, 0x68];
        f.extend_from_slice(&address);
        f.extend_from_slice(&[0x68, control, data.len() as u8]);
        f.extend(data.iter().map(|b| b.wrapping_add(0x33)));
        let cs = f[2..].iter().map(|&b| u32::from(b)).sum::<u32>() as u8;
        f.extend_from_slice(&[cs, 0x16]);
        f
    }

    const METER: [u8; 6] = [1, 0, 0, 0, 0, 0];
    const UA: [u8; 4] = [0x00, 0x01, 0x01, 0x02];

    #[tokio::test(start_paused = true)]
    async fn every_kind_of_answer_has_its_outcome() {
        let ok = answer(METER, 0x91, &[UA[0], UA[1], UA[2], UA[3], 0x01, 0x22]);
        assert_eq!(
            read_with_reply(Some(ok.clone())).await,
            Outcome::Data(vec![0x01, 0x22])
        );
        // Another meter's answer first (late), then ours: ours is taken.
        let mut late = answer(
            [2, 0, 0, 0, 0, 0],
            0x91,
            &[UA[0], UA[1], UA[2], UA[3], 0x09, 0x09],
        );
        late.extend_from_slice(&ok);
        assert_eq!(
            read_with_reply(Some(late)).await,
            Outcome::Data(vec![0x01, 0x22])
        );
        assert_eq!(
            read_with_reply(Some(answer(METER, 0xD1, &[0x02]))).await,
            Outcome::Refused(2)
        );
        assert_eq!(
            read_with_reply(Some(answer(METER, 0x91, &[0, 0, 0, 0, 1]))).await,
            Outcome::Mismatch
        );
        let mut bad_sum = ok.clone();
        let i = bad_sum.len() - 2;
        bad_sum[i] ^= 0xFF;
        assert_eq!(read_with_reply(Some(bad_sum)).await, Outcome::Frame);
        assert_eq!(read_with_reply(Some(vec![0xFE; 4])).await, Outcome::Timeout);
        assert_eq!(read_with_reply(None).await, Outcome::Timeout);
        // Another meter's answer only: ours never came (not garbled).
        let other = answer(
            [2, 0, 0, 0, 0, 0],
            0x91,
            &[UA[0], UA[1], UA[2], UA[3], 1, 2],
        );
        assert_eq!(read_with_reply(Some(other)).await, Outcome::Timeout);
        // Noise only.
        assert_eq!(read_with_reply(Some(vec![0x55; 40])).await, Outcome::Frame);
    }

    #[tokio::test(start_paused = true)]
    async fn any_bytes_give_an_outcome_never_a_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(645);
        for _ in 0..300 {
            let len = rng.random_range(0..300usize);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if len > 12 && rng.random_bool(0.5) {
                bytes[0] = 0x68;
                bytes[1..7].copy_from_slice(&METER);
                bytes[7] = 0x68;
            }
            let _ = read_with_reply(Some(bytes)).await;
        }
    }
}
