//! A simulated Modbus TCP device (tokio-modbus server) for tests, the demo
//! and benchmarks.
//!
//! Its register map is fixed (`standard_tags` describes it as gateway config)
//! so a test knows exactly what each tag must decode to. Holding registers
//! 0-1 are a u32 counter that increases by one on every read request that
//! covers them, so each poll yields a distinct value and a test can check that
//! every value arrived exactly once. `set_fault(true)` makes the device answer
//! every request with exception 4 (server device failure) without counting.
//! `set_hole(a)` makes holding register `a` absent: any read covering it is
//! answered with exception 2 (illegal data address), as real devices do;
//! `clear_hole(a)` gives it back (a device fixed on site).
//! Function 43/14 answers vendor `Guantong`, product `SIM-1`, revision `1.0`.
//!
//! `SimBus` puts several `SimDevice`s on one RTU line, by unit id, served
//! over RTU-over-TCP or over a pseudo-terminal pair (`serve_pty`); a unit id
//! with no device never answers, like a dead unit on RS-485, and
//! `set_silent(true)` makes every unit stop answering (the server is down, the
//! line stays). `serve_garbled_pty` is a line whose device answers every
//! request with bytes that form no frame, as a device at another baud rate
//! or parity, or with A and B swapped, is heard.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_modbus::prelude::{
    ConformityLevel, DeviceIdObject, ExceptionCode, ReadCode, ReadDeviceIdentificationResponse,
    Request, Response, SlaveRequest,
};
use tokio_modbus::server::tcp::Server;

pub const COUNTER_ADDR: u16 = 0;

#[derive(Debug)]
pub struct SimState {
    pub holding: Vec<u16>,
    pub input: Vec<u16>,
    pub coils: Vec<bool>,
    pub discrete: Vec<bool>,
    /// Last counter value served (0: none yet).
    pub counter: u32,
    pub fault: bool,
    /// Change the analog values with time (demo).
    pub animate: bool,
    pub requests: u64,
    /// TCP connections accepted (`serve`).
    pub connections: u64,
    pub exceptions: u64,
    /// Holding registers the device does not have.
    pub holes: Vec<u16>,
    /// When set, holding register `SIGNAL_ADDR` follows a pseudo-random
    /// signal of this seed that steps every 400 ms of wall-clock time, so
    /// two devices with one seed serve the same series.
    pub signal: Option<u64>,
}

pub const SIGNAL_ADDR: u16 = 30;

#[derive(Clone)]
pub struct SimDevice {
    state: Arc<Mutex<SimState>>,
}

/// Known register contents, and the values the standard tags decode to.
pub struct Expected;

impl Expected {
    pub const U16: u64 = 1234;
    pub const I16: i64 = -200;
    pub const U32: u64 = 0x1234_5678;
    pub const I32_CDAB: i64 = -123_456;
    pub const F32: f64 = 22.5;
    pub const F32_CDAB: f64 = -7.25;
    pub const SCALED: f64 = 4.2; // input register 42 * 0.1
}

fn words_be(bytes: [u8; 4]) -> [u16; 2] {
    [
        u16::from_be_bytes([bytes[0], bytes[1]]),
        u16::from_be_bytes([bytes[2], bytes[3]]),
    ]
}

impl Default for SimDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl SimDevice {
    pub fn new() -> SimDevice {
        let mut holding = vec![0u16; 200];
        holding[10] = Expected::U16 as u16;
        holding[11] = (Expected::I16 as i16) as u16;
        holding[12..14].copy_from_slice(&words_be((Expected::U32 as u32).to_be_bytes()));
        let [a, b] = words_be((Expected::I32_CDAB as i32).to_be_bytes());
        holding[14..16].copy_from_slice(&[b, a]);
        holding[16..18].copy_from_slice(&words_be((Expected::F32 as f32).to_be_bytes()));
        let [a, b] = words_be((Expected::F32_CDAB as f32).to_be_bytes());
        holding[18..20].copy_from_slice(&[b, a]);
        let mut input = vec![0u16; 200];
        input[0] = 42;
        let mut coils = vec![false; 200];
        coils[0] = true;
        let mut discrete = vec![false; 200];
        discrete[0] = true;
        SimDevice {
            state: Arc::new(Mutex::new(SimState {
                holding,
                input,
                coils,
                discrete,
                counter: 0,
                fault: false,
                animate: false,
                requests: 0,
                connections: 0,
                exceptions: 0,
                holes: Vec::new(),
                signal: None,
            })),
        }
    }

    /// The standard map with `n` (at least 200) holding and input
    /// registers, for benchmarks with many tags.
    pub fn with_size(n: usize) -> SimDevice {
        let sim = SimDevice::new();
        sim.with(|s| {
            s.holding.resize(n.max(200), 0);
            s.input.resize(n.max(200), 0);
        });
        sim
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut SimState) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }

    pub fn set_fault(&self, fault: bool) {
        self.with(|s| s.fault = fault);
    }

    pub fn set_hole(&self, address: u16) {
        self.with(|s| s.holes.push(address));
    }

    pub fn clear_hole(&self, address: u16) {
        self.with(|s| s.holes.retain(|&h| h != address));
    }

    pub fn requests(&self) -> u64 {
        self.with(|s| s.requests)
    }

    pub fn connections(&self) -> u64 {
        self.with(|s| s.connections)
    }

    pub fn counter(&self) -> u32 {
        self.with(|s| s.counter)
    }

    /// Starts serving on `addr` (port 0 for any free port).
    pub async fn serve(&self, addr: SocketAddr) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let device = self.clone();
        let task = tokio::spawn(async move {
            let server = Server::new(listener);
            let on_connected = |stream, _peer| {
                let device = device.clone();
                device.with(|s| s.connections += 1);
                async move { Ok(Some((device, stream))) }
            };
            if let Err(e) = server.serve(&on_connected, |_err| {}).await {
                tracing::warn!(error = %e, "simulated device stopped");
            }
        });
        Ok((local, task))
    }

    fn answer(&self, request: Request<'static>) -> Result<Response, ExceptionCode> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.requests += 1;
        if s.fault {
            s.exceptions += 1;
            return Err(ExceptionCode::ServerDeviceFailure);
        }
        if s.animate {
            animate(&mut s);
        }
        if let Some(seed) = s.signal {
            let step = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64 / 400)
                .unwrap_or(0);
            let mut z = step ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            s.holding[usize::from(SIGNAL_ADDR)] = (z >> 40) as u16;
        }
        let range =
            |addr: u16, cnt: u16, len: usize| -> Result<std::ops::Range<usize>, ExceptionCode> {
                let (a, n) = (usize::from(addr), usize::from(cnt));
                if n == 0 || a + n > len {
                    Err(ExceptionCode::IllegalDataAddress)
                } else {
                    Ok(a..a + n)
                }
            };
        let result = match request {
            Request::ReadHoldingRegisters(addr, cnt) => {
                let r = range(addr, cnt, s.holding.len())?;
                if s.holes.iter().any(|h| r.contains(&usize::from(*h))) {
                    s.exceptions += 1;
                    return Err(ExceptionCode::IllegalDataAddress);
                }
                if r.contains(&usize::from(COUNTER_ADDR)) {
                    s.counter += 1;
                    let [a, b] = words_be(s.counter.to_be_bytes());
                    let c = usize::from(COUNTER_ADDR);
                    s.holding[c] = a;
                    s.holding[c + 1] = b;
                }
                Ok(Response::ReadHoldingRegisters(s.holding[r].to_vec()))
            }
            Request::ReadInputRegisters(addr, cnt) => {
                let r = range(addr, cnt, s.input.len())?;
                Ok(Response::ReadInputRegisters(s.input[r].to_vec()))
            }
            Request::ReadCoils(addr, cnt) => {
                let r = range(addr, cnt, s.coils.len())?;
                Ok(Response::ReadCoils(s.coils[r].to_vec()))
            }
            Request::ReadDiscreteInputs(addr, cnt) => {
                let r = range(addr, cnt, s.discrete.len())?;
                Ok(Response::ReadDiscreteInputs(s.discrete[r].to_vec()))
            }
            Request::ReadDeviceIdentification(_, _) => Ok(Response::ReadDeviceIdentification(
                ReadDeviceIdentificationResponse {
                    read_code: ReadCode::Basic,
                    conformity_level: ConformityLevel::BasicIdentificationStreamOnly,
                    more_follows: false,
                    next_object_id: 0,
                    device_id_objects: [(0u8, "Guantong"), (1, "SIM-1"), (2, "1.0")]
                        .into_iter()
                        .map(|(id, v)| DeviceIdObject {
                            id,
                            value: bytes::Bytes::from_static(v.as_bytes()),
                        })
                        .collect(),
                },
            )),
            _ => Err(ExceptionCode::IllegalFunction),
        };
        if result.is_err() {
            s.exceptions += 1;
        }
        result
    }
}

/// Demo motion: a temperature wave, a pressure wave and a running flag.
fn animate(s: &mut SimState) {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let temperature = 65.0 + 8.0 * (t / 30.0).sin() + 0.3 * (t * 1.7).sin();
    s.holding[16..18].copy_from_slice(&words_be((temperature as f32).to_be_bytes()));
    s.input[0] = (420.0 + 35.0 * (t / 11.0).cos()) as u16;
    s.coils[0] = !(t as u64 / 20).is_multiple_of(3);
}

impl tokio_modbus::server::Service for SimDevice {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: SlaveRequest<'static>) -> Self::Future {
        std::future::ready(self.answer(req.request))
    }
}

/// Several simulated units on one RTU line. Unit ids without a device never
/// answer.
#[derive(Clone, Default)]
pub struct SimBus {
    units: Arc<Mutex<BTreeMap<u8, SimDevice>>>,
    silent: Arc<std::sync::atomic::AtomicBool>,
}

impl SimBus {
    pub fn new(units: &[(u8, SimDevice)]) -> SimBus {
        SimBus {
            units: Arc::new(Mutex::new(units.iter().cloned().collect())),
            silent: Arc::default(),
        }
    }

    /// Puts `device` on the line as unit `unit` (a unit connected on site).
    pub fn attach(&self, unit: u8, device: SimDevice) {
        self.units
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(unit, device);
    }

    /// While silent, no unit answers (an outage of the whole server).
    pub fn set_silent(&self, silent: bool) {
        self.silent
            .store(silent, std::sync::atomic::Ordering::Relaxed);
    }

    /// Serves RTU frames over TCP (a serial device server) on `addr`.
    pub async fn serve_rtu_over_tcp(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let bus = self.clone();
        let task = tokio::spawn(async move {
            let server = tokio_modbus::server::rtu_over_tcp::Server::new(listener);
            let on_connected = |stream, _peer| {
                let bus = bus.clone();
                async move { Ok(Some((bus, stream))) }
            };
            if let Err(e) = server.serve(&on_connected, |_err| {}).await {
                tracing::warn!(error = %e, "simulated line stopped");
            }
        });
        Ok((local, task))
    }

    /// Serves RTU on the master side of a new pseudo-terminal pair; returns
    /// the path of the slave side (what the gateway opens as its serial
    /// port) and a plain handle on it, which must stay open while the test
    /// runs (with no slave handle open the master fails).
    pub fn serve_pty(&self) -> std::io::Result<(String, std::fs::File, JoinHandle<()>)> {
        let (master, path, keep) = open_pty()?;
        let bus = self.clone();
        let task = tokio::spawn(async move {
            let server = tokio_modbus::server::rtu::Server::new(master);
            if let Err(e) = server.serve_forever(bus).await {
                tracing::warn!(error = %e, "simulated serial line stopped");
            }
        });
        Ok((path, keep, task))
    }
}

/// A new pseudo-terminal pair: its master side, the path of its slave side
/// (what the gateway opens) and a plain handle on the slave that keeps the
/// pty alive.
fn open_pty() -> std::io::Result<(tokio_serial::SerialStream, String, std::fs::File)> {
    use tokio_serial::SerialPort;
    let (master, slave) = tokio_serial::SerialStream::pair()?;
    let path = slave
        .name()
        .ok_or_else(|| std::io::Error::other("the pty has no name"))?;
    // serialport holds an exclusive flock on the slave it opened, as the
    // gateway will on its own handle: keep the pty alive with a plain
    // handle instead, then let go of the locked one.
    let keep = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)?;
    drop(slave);
    Ok((master, path, keep))
}

/// A serial line whose device answers every request (every chunk read) with
/// bytes that form no Modbus frame: what a gateway at the wrong baud rate or
/// parity, or with A/B swapped, receives. Returns what `SimBus::serve_pty`
/// returns, and a count of the answers sent.
pub fn serve_garbled_pty() -> std::io::Result<(
    String,
    std::fs::File,
    JoinHandle<()>,
    Arc<std::sync::atomic::AtomicU64>,
)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut master, path, keep) = open_pty()?;
    let answers = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = answers.clone();
    let task = tokio::spawn(async move {
        // A 9600-baud answer read at 19200 baud: bytes of 0x00, 0x80, 0xF8
        // and 0xFE, no valid header or CRC.
        const NOISE: [u8; 11] = [
            0x80, 0x00, 0xF8, 0x80, 0xFE, 0x00, 0x78, 0x80, 0x00, 0xF8, 0xFE,
        ];
        let mut buf = [0u8; 256];
        while let Ok(1..) = master.read(&mut buf).await {
            // The request's bytes arrive in one chunk or a few: one answer
            // per pause, as a device would send.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            if master.write_all(&NOISE).await.is_err() {
                break;
            }
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    Ok((path, keep, task, answers))
}

impl tokio_modbus::server::Service for SimBus {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: SlaveRequest<'static>) -> Self::Future {
        if self.silent.load(std::sync::atomic::Ordering::Relaxed) {
            return std::future::ready(Ok(None));
        }
        let device = self
            .units
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&req.slave)
            .cloned();
        std::future::ready(match device {
            Some(d) => d.answer(req.request).map(Some),
            None => Ok(None),
        })
    }
}

/// Gateway config `[[devices]]` entry for the simulator's map, with the
/// expected decoded value of each tag (None for the counter).
pub fn standard_device_toml(id: &str, addr: SocketAddr, poll_interval: &str) -> String {
    standard_device_with(
        id,
        &format!(
            "protocol = \"modbus-tcp\"\nhost = \"{}\"\nport = {}\nunit = 1\npoll_interval = \"{poll_interval}\"\ntimeout = \"500ms\"",
            addr.ip(),
            addr.port()
        ),
    )
}

/// A `[[devices]]` entry with the simulator's tags and `settings` (protocol,
/// connection, unit, intervals) as TOML lines.
pub fn standard_device_with(id: &str, settings: &str) -> String {
    format!(
        "\n[[devices]]\nid = \"{id}\"\n{settings}\n{}",
        standard_tags_toml()
    )
}

/// The `[[devices.tags]]` of the simulator's map (any transport).
pub fn standard_tags_toml() -> String {
    String::from(
        r#"
[[devices.tags]]
name = "counter"
table = "holding"
address = 0
type = "u32"

[[devices.tags]]
name = "u16"
table = "holding"
address = 10
type = "u16"

[[devices.tags]]
name = "i16"
table = "holding"
address = 11
type = "i16"

[[devices.tags]]
name = "u32"
table = "holding"
address = 12
type = "u32"

[[devices.tags]]
name = "i32_cdab"
table = "holding"
address = 14
type = "i32"
order = "CDAB"

[[devices.tags]]
name = "temperature"
table = "holding"
address = 16
type = "f32"
unit = "°C"

[[devices.tags]]
name = "f32_cdab"
table = "holding"
address = 18
type = "f32"
order = "CDAB"

[[devices.tags]]
name = "flow"
table = "input"
address = 0
type = "u16"
scale = 0.1
unit = "m³/h"

[[devices.tags]]
name = "running"
table = "coil"
address = 0
type = "bool"

[[devices.tags]]
name = "door_closed"
table = "discrete"
address = 0
type = "bool"
"#,
    )
}

/// Expected last value of each standard tag, as JSON.
pub fn standard_expected() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    vec![
        ("u16", json!(Expected::U16)),
        ("i16", json!(Expected::I16)),
        ("u32", json!(Expected::U32)),
        ("i32_cdab", json!(Expected::I32_CDAB)),
        ("temperature", json!(Expected::F32)),
        ("f32_cdab", json!(Expected::F32_CDAB)),
        ("flow", json!(Expected::SCALED)),
        ("running", json!(true)),
        ("door_closed", json!(true)),
    ]
}
