//! Modbus transports and lines end to end, with the real binaries: RTU over
//! TCP (a serial device server) and RTU over a pseudo-terminal pair, several
//! units on one line with one dead (probed in the line's idle time, at no
//! cost to the live units), a line of garbled answers (one diagnosis, no
//! library noise), an outage of a shared line in the acceptance report, a
//! graceful stop while a line times out, a device with holes in its map
//! (bisected out, retried until fixed), and the inter-frame delay measured on
//! the wire by a relay.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guantong_e2e::procs::{GatewayProc, IngestProc, gateway_toml, wait_for};
use guantong_e2e::sim::{
    SimBus, SimDevice, serve_garbled_pty, standard_device_toml, standard_device_with,
    standard_expected,
};
use serde_json::Value;

const GW: &str = "gw-modbus";

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

struct Setup {
    dir: tempfile::TempDir,
    ingest: IngestProc,
    gateway: GatewayProc,
}

impl Setup {
    async fn start(devices: &str) -> anyhow::Result<Setup> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("ingest");
        let token = IngestProc::register(&data, GW)?;
        let ingest = IngestProc::start(&data, any_port(), any_port()).await?;
        let config = dir.path().join("gateway.toml");
        let text = gateway_toml(GW, ingest.grpc, &token, &dir.path().join("buffer")) + devices;
        std::fs::write(&config, text)?;
        let gateway = GatewayProc::start(&config)?;
        Ok(Setup {
            dir,
            ingest,
            gateway,
        })
    }

    /// The gateway's whole log (`logs` shows the last lines).
    fn gateway_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    fn logs(&self) -> String {
        format!("{}{}", self.gateway.proc.logs(), self.ingest.proc.logs())
    }

    /// Waits until every standard tag of `device` has its expected Good value.
    async fn expect_standard_values(&self, device: &str) {
        for (tag, expected) in standard_expected() {
            let got = self.wait_quality(device, tag, "good").await;
            assert!(
                close(&got["last_value"], &expected),
                "{device}/{tag}: got {} expected {expected}\n{}",
                got["last_value"],
                self.logs()
            );
        }
    }

    /// Waits (30 s at most) until `device/tag`'s last quality is `quality`.
    async fn wait_quality(&self, device: &str, tag: &str, quality: &str) -> Value {
        self.wait_tag(device, tag, quality, |t| t["last_quality"] == quality)
            .await
    }

    /// Waits (30 s at most) until `device/tag`'s last quality code is `code`.
    async fn wait_code(&self, device: &str, tag: &str, code: u32) -> Value {
        let what = format!("{code:#010x}");
        self.wait_tag(device, tag, &what, |t| t["last_quality_code"] == code)
            .await
    }

    /// Waits (30 s at most) until `device/tag`'s summary satisfies `want`.
    async fn wait_tag(
        &self,
        device: &str,
        tag: &str,
        what: &str,
        want: impl Fn(&Value) -> bool,
    ) -> Value {
        let api = self.ingest.api();
        let want = &want;
        wait_for(
            &format!("{device}/{tag} {what}"),
            Duration::from_secs(30),
            || async { Ok(api.tag(GW, device, tag).await?.filter(|t| want(t))) },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    async fn points(&self, device: &str, tag: &str) -> Vec<Value> {
        self.ingest
            .api()
            .points(GW, device, tag)
            .await
            .unwrap_or_default()
    }
}

fn close(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_f64() || b.is_f64() => (x - y).abs() < 1e-6,
        _ => a == b,
    }
}

/// A unit on the serial port `path` (19200 baud, even parity).
fn serial_device(
    id: &str,
    path: &str,
    unit: u8,
    poll: &str,
    timeout: &str,
    backoff: &str,
) -> String {
    standard_device_with(
        id,
        &format!(
            "protocol = \"modbus-rtu\"\nserial_port = \"{path}\"\nbaud_rate = 19200\nparity = \"even\"\nunit = {unit}\npoll_interval = \"{poll}\"\ntimeout = \"{timeout}\"\nmax_backoff = \"{backoff}\"\nidentify = false"
        ),
    )
}

fn rtu_over_tcp_device(id: &str, addr: SocketAddr, unit: u8, poll: &str, timeout: &str) -> String {
    standard_device_with(
        id,
        &format!(
            "protocol = \"modbus-rtu-over-tcp\"\nhost = \"{}\"\nport = {}\nunit = {unit}\npoll_interval = \"{poll}\"\ntimeout = \"{timeout}\"\nmax_backoff = \"3s\"",
            addr.ip(),
            addr.port()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_over_tcp_decodes_every_type() -> anyhow::Result<()> {
    let bus = SimBus::new(&[(7, SimDevice::new())]);
    let (addr, _task) = bus.serve_rtu_over_tcp(any_port()).await?;
    let s = Setup::start(&rtu_over_tcp_device("rtu-7", addr, 7, "100ms", "500ms")).await?;
    s.expect_standard_values("rtu-7").await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_over_a_pty_decodes_every_type() -> anyhow::Result<()> {
    let bus = SimBus::new(&[(3, SimDevice::new())]);
    let (path, _slave, _task) = bus.serve_pty()?;
    let device = standard_device_with(
        "serial-3",
        &format!(
            "protocol = \"modbus-rtu\"\nserial_port = \"{path}\"\nbaud_rate = 19200\nparity = \"even\"\nunit = 3\npoll_interval = \"100ms\"\ntimeout = \"500ms\""
        ),
    );
    let s = Setup::start(&device).await?;
    s.expect_standard_values("serial-3").await;
    Ok(())
}

/// Units 1 and 2 answer, unit 3 is dead. Polled every 200 ms with a 400 ms
/// timeout: without backoff every cycle would take 600+ ms; with it the live
/// units keep close to their interval and the dead one is reported Bad.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_unit_does_not_stall_the_line() -> anyhow::Result<()> {
    let (one, two) = (SimDevice::new(), SimDevice::new());
    let bus = SimBus::new(&[(1, one.clone()), (2, two.clone())]);
    let (addr, _task) = bus.serve_rtu_over_tcp(any_port()).await?;
    let devices = [
        rtu_over_tcp_device("unit-1", addr, 1, "200ms", "400ms"),
        rtu_over_tcp_device("unit-3", addr, 3, "200ms", "400ms"),
        rtu_over_tcp_device("unit-2", addr, 2, "200ms", "400ms"),
    ]
    .concat();
    let s = Setup::start(&devices).await?;
    s.expect_standard_values("unit-1").await;
    s.expect_standard_values("unit-2").await;
    let (c1, c2) = (one.counter(), two.counter());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (d1, d2) = (one.counter() - c1, two.counter() - c2);
    // 6 s at 200 ms is 30 polls; the dead unit may take one 400 ms timeout
    // every 3 s (max_backoff) at most, costing two or three polls, and after
    // each the live units' next poll waits half an interval rather than
    // catching up at once (no sample read twice). A stalled line, waiting
    // out the dead unit's timeout every cycle, manages about 10.
    for (unit, polls) in [(1, d1), (2, d2)] {
        assert!(
            polls >= 20,
            "unit {unit} was polled {polls} times in 6 s at 200 ms\n{}",
            s.logs()
        );
    }
    let dead = s.points("unit-3", "counter").await;
    assert!(
        !dead.is_empty(),
        "no points for the dead unit\n{}",
        s.logs()
    );
    for p in &dead {
        assert_eq!(p["quality"], "bad", "{p}");
        let code = p["quality_code"].as_u64().unwrap_or(0);
        assert!(
            code == 0x0002_0001 || code == 0x0002_0006,
            "dead unit code {code:#x}: expected timeout or backing off"
        );
    }
    assert!(
        dead.iter().any(|p| p["quality_code"] == 0x0002_0006),
        "the dead unit was never backed off"
    );
    Ok(())
}

/// Holding register 5 does not exist (between tags) and 15 does (inside the
/// i32 at 14-15): the merged read is refused, split, and everything but the
/// i32 keeps arriving Good; the i32 is Bad with exception 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exception_in_a_merged_read_costs_only_the_bad_tag() -> anyhow::Result<()> {
    let sim = SimDevice::new();
    sim.set_hole(5);
    sim.set_hole(15);
    let (addr, _task) = sim.serve(any_port()).await?;
    let s = Setup::start(&standard_device_toml("holes", addr, "100ms")).await?;
    let api = s.ingest.api();
    for (tag, expected) in standard_expected() {
        if tag == "i32_cdab" {
            continue;
        }
        let got = wait_for(&format!("tag {tag}"), Duration::from_secs(30), || async {
            Ok(api
                .tag(GW, "holes", tag)
                .await?
                .filter(|t| t["last_quality"] == "good"))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
        assert!(close(&got["last_value"], &expected), "{tag}: {got}");
    }
    let bad = wait_for("i32_cdab Bad", Duration::from_secs(10), || async {
        Ok(api
            .tag(GW, "holes", "i32_cdab")
            .await?
            .filter(|t| t["last_quality"] == "bad"))
    })
    .await?;
    assert_eq!(bad["last_quality_code"], 0x0001_0002, "{bad}");
    assert_eq!(bad["good"], 0, "{bad}");
    // After the split the device is no longer asked for what it refused:
    // exceptions stop growing.
    let e1 = sim.with(|st| st.exceptions);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let e2 = sim.with(|st| st.exceptions);
    assert_eq!(e1, e2, "refused reads are repeated\n{}", s.logs());
    Ok(())
}

/// One refused register inside a block of 8 tags: the merged read is
/// bisected, so a poll costs at most 3 requests (not one per tag), the
/// refused tag is Bad with exception 2 and the others Good; once the device
/// has the register again, the slow retry (`max_backoff`) finds it and the
/// block is one merged read again, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_address_is_bisected_out_and_retried_until_it_returns() -> anyhow::Result<()> {
    const HOLE: u16 = 5;
    let sim = SimDevice::new();
    sim.set_hole(HOLE);
    let (addr, _task) = sim.serve(any_port()).await?;
    // Holding 0-1 is the counter: one increment per read covering it, so
    // one per poll whatever the plan.
    let mut device = format!(
        "\n[[devices]]\nid = \"bisect\"\nprotocol = \"modbus-tcp\"\nhost = \"{}\"\nport = {}\nunit = 1\npoll_interval = \"100ms\"\ntimeout = \"2s\"\nmax_backoff = \"2s\"\n\n[[devices.tags]]\nname = \"counter\"\ntable = \"holding\"\naddress = 0\ntype = \"u32\"\n",
        addr.ip(),
        addr.port()
    );
    for a in 2..=8 {
        device += &format!(
            "\n[[devices.tags]]\nname = \"r{a}\"\ntable = \"holding\"\naddress = {a}\ntype = \"u16\"\n"
        );
    }
    let s = Setup::start(&device).await?;
    let refused = format!("r{HOLE}");
    let bad = s.wait_quality("bisect", &refused, "bad").await;
    assert_eq!(bad["last_quality_code"], 0x0001_0002, "{bad}");
    for a in (2..=8).filter(|&a| a != HOLE) {
        s.wait_quality("bisect", &format!("r{a}"), "good").await;
    }
    // Requests per poll after the split, over at least 5 polls; the window
    // may cut a poll at each end, and may hold one retry.
    let per_poll = |limit: u64| {
        let sim = sim.clone();
        async move {
            let (c0, r0) = (sim.counter(), sim.requests());
            let start = Instant::now();
            while sim.counter() < c0 + 5 && start.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let (polls, requests) = (u64::from(sim.counter() - c0), sim.requests() - r0);
            assert!(polls >= 5, "only {polls} polls in 30 s");
            (requests, polls, requests <= limit * polls + limit + 1)
        }
    };
    let (requests, polls, ok) = per_poll(3).await;
    assert!(
        ok,
        "{requests} requests in {polls} polls (at most 3 each)\n{}",
        s.logs()
    );
    // Fixed on site: within the retry period (2 s) the tag is Good again.
    sim.clear_hole(HOLE);
    // (generous timeout: a loaded machine)
    s.wait_quality("bisect", &refused, "good").await;
    // ... and the block is one merged read again.
    let (requests, polls, ok) = per_poll(1).await;
    assert!(
        ok,
        "{requests} requests in {polls} polls after the fix (1 each)\n{}",
        s.logs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_identification_reaches_the_config() -> anyhow::Result<()> {
    let sim = SimDevice::new();
    let (addr, _task) = sim.serve(any_port()).await?;
    let text = gateway_toml(GW, any_port(), "t", Path::new("/tmp/unused"))
        + &standard_device_toml("ident", addr, "1s");
    let mut config = guantong_gateway::config::Config::parse(&text, Path::new("/tmp"))
        .map_err(|p| anyhow::anyhow!("{p:?}"))?;
    guantong_gateway::modbus::identify_all(&mut config.devices).await;
    let manifest = guantong_gateway::manifest::build(&config);
    let identity = &manifest.devices[0].identity;
    assert_eq!(identity.get("vendor").map(String::as_str), Some("Guantong"));
    assert_eq!(
        identity.get("product_code").map(String::as_str),
        Some("SIM-1")
    );
    assert_eq!(identity.get("revision").map(String::as_str), Some("1.0"));
    Ok(())
}

/// What a relay between the gateway and a serial device server saw: when
/// each request started and when each answer ended, on the wire.
#[derive(Default)]
struct Wire {
    /// (time, true for gateway → device) of every chunk forwarded.
    chunks: Vec<(Instant, bool)>,
}

impl Wire {
    /// The silence before each request: from the end of the previous answer
    /// (its last chunk forwarded to the gateway) to the request's first byte.
    fn gaps(&self) -> Vec<Duration> {
        let mut gaps = Vec::new();
        let mut answer_end: Option<Instant> = None;
        for &(t, upstream) in &self.chunks {
            if upstream {
                if let Some(end) = answer_end.take() {
                    gaps.push(t - end);
                }
            } else {
                answer_end = Some(t);
            }
        }
        gaps
    }
}

/// Which way a chunk goes through a relay.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Gateway to device: a request.
    Request,
    /// Device to gateway: an answer.
    Answer,
}

/// Forwards every connection on a new port to `device`. `on_chunk` sees
/// every chunk after it was read and before it is written on, and returns
/// how long to hold it back (zero: pass at once).
async fn relay(
    device: SocketAddr,
    on_chunk: impl Fn(Way) -> Duration + Send + Sync + 'static,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn pump(
        mut from: impl AsyncRead + Unpin,
        mut to: impl AsyncWrite + Unpin,
        way: Way,
        on_chunk: Arc<dyn Fn(Way) -> Duration + Send + Sync>,
    ) {
        let mut buf = [0u8; 512];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            let hold = on_chunk(way);
            if !hold.is_zero() {
                tokio::time::sleep(hold).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    }
    let on_chunk: Arc<dyn Fn(Way) -> Duration + Send + Sync> = Arc::new(on_chunk);
    let listener = tokio::net::TcpListener::bind(any_port()).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((gateway, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(device).await else {
                continue;
            };
            let _ = (gateway.set_nodelay(true), upstream.set_nodelay(true));
            let (g_read, g_write) = gateway.into_split();
            let (d_read, d_write) = upstream.into_split();
            tokio::spawn(pump(g_read, d_write, Way::Request, on_chunk.clone()));
            tokio::spawn(pump(d_read, g_write, Way::Answer, on_chunk.clone()));
        }
    });
    Ok((addr, task))
}

/// A relay logging chunk times in `wire`. A chunk is stamped after it was
/// read and before it is written on, so the relay's own scheduling can only
/// lengthen a measured gap, never shorten it below the gateway's delay;
/// without the delay, gaps stay near a millisecond and the test fails.
async fn timed_relay(
    device: SocketAddr,
    wire: Arc<Mutex<Wire>>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    relay(device, move |way| {
        let t = Instant::now();
        wire.lock()
            .expect("wire log")
            .chunks
            .push((t, way == Way::Request));
        Duration::ZERO
    })
    .await
}

/// Two units on one serial device server, each polled as fast as allowed
/// (10 ms) with four requests per poll: without the configured 40 ms
/// inter-frame delay, requests would follow answers within a millisecond.
/// Every gap seen on the wire must be at least the delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_inter_frame_delay_is_kept_on_the_wire() -> anyhow::Result<()> {
    const DELAY: Duration = Duration::from_millis(40);
    let bus = SimBus::new(&[(1, SimDevice::new()), (2, SimDevice::new())]);
    let (device, _task) = bus.serve_rtu_over_tcp(any_port()).await?;
    let wire = Arc::new(Mutex::new(Wire::default()));
    let (relay, _relay_task) = timed_relay(device, wire.clone()).await?;
    let unit = |id: &str, unit: u8| {
        standard_device_with(
            id,
            &format!(
                "protocol = \"modbus-rtu-over-tcp\"\nhost = \"{}\"\nport = {}\nunit = {unit}\npoll_interval = \"10ms\"\ntimeout = \"500ms\"\ninter_frame_delay = \"{}ms\"\nidentify = false",
                relay.ip(),
                relay.port(),
                DELAY.as_millis()
            ),
        )
    };
    let s = Setup::start(&(unit("unit-1", 1) + &unit("unit-2", 2))).await?;
    s.expect_standard_values("unit-1").await;
    s.expect_standard_values("unit-2").await;
    let seen = wire.lock().expect("wire log").chunks.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gaps: Vec<Duration> = {
        let wire = wire.lock().expect("wire log");
        let Wire { chunks } = &*wire;
        Wire {
            chunks: chunks[seen..].to_vec(),
        }
        .gaps()
    };
    // 2 s at one request per 40+ ms: about 45 gaps.
    assert!(
        gaps.len() >= 20,
        "only {} request/answer gaps in 2 s\n{}",
        gaps.len(),
        s.logs()
    );
    let shortest = gaps.iter().min().copied().unwrap_or_default();
    assert!(
        shortest >= DELAY,
        "a request followed an answer after {shortest:?}, less than the inter_frame_delay {DELAY:?} ({} gaps)",
        gaps.len()
    );
    Ok(())
}

/// The Modbus side of liveness from data: a device (behind a proxy) that
/// keeps its TCP connection open, accepts new ones, but stops answering.
/// Every poll waits for its own answer, so no separate stall watch is
/// needed: the points go Bad with `0x0002_0001` (timeout, then backing off)
/// within a timeout or two, and come back Good by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_keeps_the_connection_but_stops_answering_is_bad_within_its_timeout()
-> anyhow::Result<()> {
    use guantong_e2e::proxy::{Mode, Proxy};
    let sim = SimDevice::new();
    let (addr, _task) = sim.serve(any_port()).await?;
    let proxy = Proxy::start(addr).await?;
    let s = Setup::start(&standard_device_toml("quiet", proxy.addr, "200ms")).await?;
    s.expect_standard_values("quiet").await;
    proxy.set(Mode::Blackhole);
    let quiet_ms = guantong_gateway::quality::now_ms();
    let bad = wait_for("a Bad point", Duration::from_secs(20), || async {
        Ok(s.points("quiet", "counter").await.into_iter().find(|p| {
            p["quality"] == "bad" && p["time_ms"].as_i64().is_some_and(|t| t >= quiet_ms)
        }))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", s.logs()))?;
    assert!(
        [0x0002_0001, 0x0002_0006].contains(&bad["quality_code"].as_u64().unwrap_or(0)),
        "timeout or backing off: {bad}"
    );
    let after = bad["time_ms"].as_i64().unwrap_or(0) - quiet_ms;
    assert!(
        after <= 3000,
        "seen within a poll and a 500 ms timeout (with slack for a loaded machine), not {after} ms"
    );
    proxy.set(Mode::Pass);
    let back_from = guantong_gateway::quality::now_ms();
    wait_for("Good again", Duration::from_secs(30), || async {
        Ok(s.points("quiet", "counter").await.into_iter().find(|p| {
            p["quality"] == "good" && p["time_ms"].as_i64().is_some_and(|t| t >= back_from)
        }))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", s.logs()))?;
    Ok(())
}

/// A relay holding every `every`th answer back by `delay`: a device that is
/// sometimes slow to answer.
async fn slow_answer_relay(
    device: SocketAddr,
    every: usize,
    delay: Duration,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let answers = std::sync::atomic::AtomicUsize::new(0);
    relay(device, move |way| {
        let n = match way {
            Way::Answer => answers.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
            Way::Request => return Duration::ZERO,
        };
        if n.is_multiple_of(every) {
            delay
        } else {
            Duration::ZERO
        }
    })
    .await
}

/// A poll that overran its interval (a slow answer) must not be followed at
/// once by the next: that second poll would read the same device sample
/// within the same millisecond and store it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_does_not_trigger_an_immediate_catch_up_poll() -> anyhow::Result<()> {
    const POLL_MS: i64 = 100;
    let sim = SimDevice::new();
    let (device, _task) = sim.serve(any_port()).await?;
    // One read per poll (the counter alone); every 4th answer 130 ms late.
    let (relay, _relay_task) = slow_answer_relay(device, 4, Duration::from_millis(130)).await?;
    let devices = format!(
        "[[devices]]\nid = \"slow\"\nprotocol = \"modbus-tcp\"\nhost = \"{}\"\nport = {}\nunit = 1\npoll_interval = \"{POLL_MS}ms\"\ntimeout = \"1s\"\nidentify = false\n\n[[devices.tags]]\nname = \"counter\"\ntable = \"holding\"\naddress = 0\ntype = \"u32\"\n",
        relay.ip(),
        relay.port()
    );
    let s = Setup::start(&devices).await?;
    let points = wait_for("40 counter points", Duration::from_secs(30), || async {
        let p = s.points("slow", "counter").await;
        Ok((p.len() >= 40).then_some(p))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    let mut times: Vec<i64> = points
        .iter()
        .filter_map(|p| p["time_ms"].as_i64())
        .collect();
    times.sort_unstable();
    let closest = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .min()
        .unwrap_or(i64::MAX);
    // The burst is within a millisecond or two; 10 ms leaves room for a
    // loaded machine delaying one answer.
    assert!(
        closest >= 10,
        "two polls {closest} ms apart with a {POLL_MS} ms interval: a catch-up burst\n{times:?}"
    );
    Ok(())
}

/// The issue's serial line: units 1 and 2 answer, unit 3 is absent, polled
/// every 500 ms with a 1 s timeout. A retry of unit 3 that waited its whole
/// timeout would make the live units miss a poll each time (seven samples in
/// the first minute); probed in the line's idle time it costs them nothing.
/// Unit 3 connected later is found by its probes and delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_unit_on_a_serial_line_costs_the_live_units_no_samples() -> anyhow::Result<()> {
    const POLL: Duration = Duration::from_millis(500);
    const WINDOW: Duration = Duration::from_secs(12);
    let (one, two) = (SimDevice::new(), SimDevice::new());
    let bus = SimBus::new(&[(1, one.clone()), (2, two.clone())]);
    let (path, _slave, _task) = bus.serve_pty()?;
    let devices: String = [("unit-1", 1), ("unit-2", 2), ("unit-3", 3)]
        .iter()
        .map(|&(id, unit)| serial_device(id, &path, unit, "500ms", "1s", "4s"))
        .collect();
    let s = Setup::start(&devices).await?;
    s.expect_standard_values("unit-1").await;
    s.expect_standard_values("unit-2").await;
    // After the first backoff: unit 3 is reported backing off.
    s.wait_code("unit-3", "counter", 0x0002_0006).await;
    let (c1, c2, start) = (one.counter(), two.counter(), Instant::now());
    tokio::time::sleep(WINDOW).await;
    let (d1, d2, took) = (one.counter() - c1, two.counter() - c2, start.elapsed());
    // Each counter grows once per poll; the window may cut one poll short.
    let due = (took.as_millis() / POLL.as_millis()) as u32;
    for (unit, polls) in [(1, d1), (2, d2)] {
        assert!(
            polls + 1 >= due,
            "unit {unit}: {polls} polls in {took:?} at {POLL:?}, {} lost to unit 3's retries\n{}",
            due - polls,
            s.logs()
        );
    }
    // The probes go on: unit 3 connected on site comes back by itself
    // within its backoff (4 s) and a poll.
    bus.attach(3, SimDevice::new());
    s.wait_quality("unit-3", "u16", "good").await;
    Ok(())
}

/// A device heard at the wrong baud rate, parity or with A/B swapped: bytes
/// arrive but no frame. The log says so once for the line, in words an
/// installer acts on, and carries none of tokio-modbus's per-byte lines;
/// the points are Bad with `0x0002_0005`, served with their hex code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbled_answers_are_diagnosed_once_per_line_without_library_noise() -> anyhow::Result<()> {
    let (path, _slave, _task, answers) = serve_garbled_pty()?;
    let devices = serial_device("garbled-1", &path, 1, "200ms", "300ms", "1s")
        + &serial_device("garbled-2", &path, 2, "200ms", "300ms", "1s");
    let s = Setup::start(&devices).await?;
    let bad = s.wait_quality("garbled-1", "counter", "bad").await;
    assert_eq!(bad["last_quality_code_hex"], "0x0002_0005", "{bad}");
    s.wait_quality("garbled-2", "counter", "bad").await;
    // Many garbled answers later (probes of both units)...
    wait_for("20 garbled answers", Duration::from_secs(60), || async {
        Ok((answers.load(std::sync::atomic::Ordering::Relaxed) >= 20).then_some(()))
    })
    .await?;
    let points = s.points("garbled-2", "counter").await;
    let first = points.first().expect("garbled-2 has points");
    assert_eq!(first["quality_code"], 0x0002_0005, "{first}");
    assert_eq!(first["quality_code_hex"], "0x0002_0005", "{first}");
    let log = s.gateway_log();
    let diagnosis = guantong_gateway::modbus::line::GARBLED_DIAGNOSIS;
    assert_eq!(
        log.matches(diagnosis).count(),
        1,
        "the diagnosis once for the line\n{log}"
    );
    for noise in [
        "Invalid CRC",
        "Incomplete ADU",
        "Giving up to decode",
        "Failed to decode",
    ] {
        assert!(
            !log.contains(noise),
            "library noise `{noise}` in the log\n{log}"
        );
    }
    assert!(
        log.contains("answers are garbled") && !log.contains("not answering"),
        "each unit said garbled, not silent\n{log}"
    );
    Ok(())
}

/// The issue's outage on a shared serial line: three units, the server gone
/// for 10 s. Each unit's Bad samples arrive on the line's schedule, not its
/// own interval; ingest's acceptance report must still call the stretch
/// `device_fault` (the gateway said Bad throughout), never `no_data`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_a_shared_line_is_a_device_fault_in_the_acceptance_report()
-> anyhow::Result<()> {
    use reqwest::{Method, StatusCode};
    const CODE: &str = "91350100M000100Y43";
    const IDS: [&str; 3] = ["line-1", "line-2", "line-3"];
    let bus = SimBus::new(&[
        (1, SimDevice::new()),
        (2, SimDevice::new()),
        (3, SimDevice::new()),
    ]);
    let (path, _slave, _task) = bus.serve_pty()?;
    let devices: String = (1..=3u8)
        .map(|u| serial_device(IDS[usize::from(u) - 1], &path, u, "500ms", "1s", "2s"))
        .collect();
    let s = Setup::start(&devices).await?;
    let admin = s.ingest.api();
    let register = IDS.iter().enumerate().fold(
        String::from("设备编号,设备名称,车间,生产设备,网关,采集设备\n"),
        |csv, (n, id)| csv + &format!("E{n},泵{n},一车间,是,{GW},{id}\n"),
    );
    for (method, path, body) in [
        (
            Method::POST,
            "/api/v1/enterprises".to_string(),
            format!(
                r#"{{"code":"{CODE}","name":"示范泵站","county":"鼓楼区","industry":"metallurgy","provider":"prov-a"}}"#
            ),
        ),
        (
            Method::PUT,
            format!("/api/v1/enterprises/{CODE}/equipment"),
            register,
        ),
        (
            Method::PUT,
            format!("/api/v1/gateways/{GW}/enterprise"),
            format!(r#"{{"enterprise":"{CODE}"}}"#),
        ),
    ] {
        let (status, body) = admin.send(method, &path, Some(body)).await?;
        assert!(status.is_success(), "{path}: {status} {body}");
        assert_ne!(status, StatusCode::NO_CONTENT);
    }
    for id in IDS {
        s.wait_quality(id, "u16", "good").await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    bus.set_silent(true);
    let outage_from = guantong_gateway::quality::now_ms();
    tokio::time::sleep(Duration::from_secs(10)).await;
    bus.set_silent(false);
    let outage_to = guantong_gateway::quality::now_ms();
    for id in IDS {
        wait_for(
            &format!("{id} Good again"),
            Duration::from_secs(30),
            || async {
                Ok(s.points(id, "u16").await.into_iter().find(|p| {
                    p["quality"] == "good" && p["time_ms"].as_i64().is_some_and(|t| t > outage_to)
                }))
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", s.logs()))?;
    }
    let path = format!("/api/v1/enterprises/{CODE}/report");
    let covered = |d: &Value| {
        d["gaps"].as_array().into_iter().flatten().any(|g| {
            g["cause"] == "device_fault"
                && g["start_ms"]
                    .as_i64()
                    .is_some_and(|t| t <= outage_from + 2_000)
                && g["end_ms"].as_i64().is_some_and(|t| t >= outage_to - 1_000)
        })
    };
    let report = wait_for(
        "the outage in the report",
        Duration::from_secs(60),
        || async {
            let r = admin.get(&path).await?;
            let all = IDS.iter().all(|id| {
                r["devices"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|d| d["device"] == *id && covered(d))
            });
            Ok(all.then_some(r))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", s.logs()));
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            let r = admin.get(&path).await?;
            panic!("{e}\nreport: {r:#}\noutage {outage_from}..{outage_to}");
        }
    };
    for d in report["devices"].as_array().into_iter().flatten() {
        let no_data: Vec<_> = d["gaps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|g| g["cause"] == "no_data")
            .collect();
        assert!(no_data.is_empty(), "no_data gaps: {d:#}");
    }
    Ok(())
}

/// A graceful stop (SIGTERM) while a shared line of three units waits out
/// its timeouts (the server went silent): no new poll starts, the poll in
/// flight ends within its timeout, and its Bad points and everything before
/// them are committed and delivered before the gateway exits; nothing is
/// left in the buffer for the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_while_the_line_times_out_delivers_its_last_batch() -> anyhow::Result<()> {
    const IDS: [&str; 3] = ["stop-1", "stop-2", "stop-3"];
    let units = [SimDevice::new(), SimDevice::new(), SimDevice::new()];
    let bus = SimBus::new(&[
        (1, units[0].clone()),
        (2, units[1].clone()),
        (3, units[2].clone()),
    ]);
    let (path, _slave, _task) = bus.serve_pty()?;
    let devices: String = (1..=3u8)
        .map(|u| serial_device(IDS[usize::from(u) - 1], &path, u, "200ms", "1s", "4s"))
        .collect();
    let mut s = Setup::start(&devices).await?;
    for id in IDS {
        s.wait_quality(id, "u16", "good").await;
    }
    bus.set_silent(true);
    let silent_from = guantong_gateway::quality::now_ms();
    // Into the timeout of the poll after the last answer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last_served: Vec<u32> = units.iter().map(SimDevice::counter).collect();
    let stopping = Instant::now();
    let status = s.gateway.proc.terminate(Duration::from_secs(20));
    let took = stopping.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?}\n{}",
        s.logs()
    );
    // The poll in flight (1 s), the final commit, the delivery.
    assert!(
        took < Duration::from_secs(6),
        "stopping took {took:?}\n{}",
        s.logs()
    );
    let log = s.gateway_log();
    let stopped = log
        .lines()
        .rfind(|l| l.contains("gateway stopped"))
        .unwrap_or_else(|| panic!("no `gateway stopped` line\n{log}"));
    assert!(
        stopped.contains("pending_batches=0"),
        "batches left for the next start: {stopped}\n{log}"
    );
    for (id, served) in IDS.iter().zip(last_served) {
        let points = s.points(id, "counter").await;
        let good_max = points
            .iter()
            .filter(|p| p["quality"] == "good")
            .filter_map(|p| p["value"].as_u64())
            .max();
        assert_eq!(
            good_max,
            Some(u64::from(served)),
            "{id}: every value served before the stop is at ingest"
        );
    }
    let mut timed_out = false;
    for id in IDS {
        timed_out |= s.points(id, "counter").await.iter().any(|p| {
            p["quality_code"] == 0x0002_0001
                && p["time_ms"].as_i64().is_some_and(|t| t >= silent_from)
        });
    }
    assert!(
        timed_out,
        "the timed-out poll's Bad points are at ingest\n{}",
        s.logs()
    );
    Ok(())
}
