//! DL/T 645 end to end against a third-party meter emulator (the `dlt645`
//! package's meter service and its TCP and serial servers, in
//! `.venv-peers/`, `tests/peers/dlt645_meter.py`): the gateway binary reads
//! a line of meters into a real ingest, over TCP (a serial device server)
//! and over a pseudo-terminal pair made with socat (the serial path, no
//! hardware). Checked: every value against the emulator's, scaled as the
//! standard says; a DI the meter does not hold is Bad with the meter's error
//! byte while the others keep coming; a template works for meters; each
//! meter's number (read at start) is in the manifest; a dead
//! meter on the shared line is Bad (timeout, then backing off) while the
//! live ones keep their interval; the installer's probe reads the address by
//! broadcast and then values, over TCP and the pty.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use guantong_e2e::mqtt::peers_python;
use guantong_e2e::procs::{GatewayProc, IngestProc, gateway_toml, wait_for};
use serde_json::{Value, json};

const GW: &str = "gw-dlt645";
const LIVE: [&str; 2] = ["000000000001", "000000000002"];
const DEAD: &str = "000000000099";
const POLL_MS: u64 = 500;

/// A child process killed when dropped (with its stdout, kept open: a
/// peer writing to a closed pipe would die).
struct Peer {
    child: Child,
    _stdout: Option<std::io::BufReader<std::process::ChildStdout>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The emulated meters `LIVE` on `where_` (`tcp PORT` or `serial PATH`),
/// ready. Their log is `dir/meters.log`.
fn start_meters(kind: &str, where_: &str, dir: &Path) -> anyhow::Result<Peer> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/dlt645_meter.py");
    let log = std::fs::File::create(dir.join("meters.log"))?;
    let mut child = Command::new(peers_python()?)
        .arg(script)
        .args([kind, where_])
        .args(LIVE)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut out = std::io::BufReader::new(out);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    let peer = Peer {
        child,
        _stdout: Some(out),
    };
    anyhow::ensure!(
        line.trim() == "ready",
        "the DL/T 645 emulator did not start: {line:?}\n{}",
        std::fs::read_to_string(dir.join("meters.log")).unwrap_or_default()
    );
    Ok(peer)
}

/// A pty pair linked at `dir/gateway` and `dir/meters`, made by socat.
fn pty_pair(dir: &Path) -> anyhow::Result<(Peer, PathBuf, PathBuf)> {
    let (gw, meters) = (dir.join("gateway"), dir.join("meters"));
    let child = Command::new("socat")
        .arg(format!("pty,raw,echo=0,link={}", gw.display()))
        .arg(format!("pty,raw,echo=0,link={}", meters.display()))
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!("socat: {e}: the serial test needs socat (apt-get install socat; ./test.sh installs it)")
        })?;
    let peer = Peer {
        child,
        _stdout: None,
    };
    for _ in 0..100 {
        if gw.exists() && meters.exists() {
            return Ok((peer, gw, meters));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("socat made no pty pair at {}", dir.display())
}

/// The meters' devices on one line reached with `transport` (the keys).
fn devices(transport: &str) -> String {
    let template =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/templates/dlt645-three-phase.toml");
    let head = |id: &str, meter: &str| {
        format!(
            "\n[[devices]]\nid = \"{id}\"\nprotocol = \"dlt645\"\n{transport}\nmeter = \"{meter}\"\npoll_interval = \"{POLL_MS}ms\"\ntimeout = \"1s\"\nmax_backoff = \"3s\"\n"
        )
    };
    let mut text = head("m1", LIVE[0]);
    for (name, di, _) in expected() {
        text += &format!("\n[[devices.tags]]\nname = \"{name}\"\ndi = \"{di}\"\n");
    }
    // Not a DI the emulated meter holds: it answers with an error frame.
    text += "\n[[devices.tags]]\nname = \"missing\"\ndi = \"02FF0000\"\nlength = 2\nscale = 0.1\n";
    text += &head("m2", LIVE[1]);
    text += &format!("template = \"{}\"\n", template.display());
    text += &head("dead", DEAD);
    text += "\n[[devices.tags]]\nname = \"voltage_a\"\ndi = \"02010100\"\n";
    text
}

/// (tag, DI, value at ingest) of meter m1: the emulator's values
/// (`VALUES` in dlt645_meter.py) with the standard's scale.
fn expected() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        ("voltage_a", "02010100", json!(220.1)),
        ("voltage_c", "02010300", json!(222.3)),
        ("current_a", "02020100", json!(5.123)),
        ("current_b", "02020200", json!(-6.234)),
        ("active_power", "02030000", json!(3.4567)),
        ("power_factor", "02060000", json!(0.987)),
        ("frequency", "02800002", json!(50.01)),
        ("energy_combined", "00000000", json!(12345.67)),
        ("energy_import", "00010000", json!(23456.78)),
        ("energy_export", "00020000", json!(345.67)),
        ("energy_import_a", "00150000", json!(7000.01)),
        ("energy_import_c", "003D0000", json!(9000.03)),
        ("meter_date", "04000101", json!("2024-05-17")),
        ("meter_time", "04000102", json!("12:34:56")),
    ]
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs the gateway on the meters' line and checks everything the module
/// docs list.
async fn a_line_of_meters(transport: &str, dir: &Path) -> anyhow::Result<()> {
    let data = dir.join("ingest");
    let token = IngestProc::register(&data, GW)?;
    let ingest = IngestProc::start(&data, any_port(), any_port()).await?;
    let config = dir.join("gateway.toml");
    let text = gateway_toml(GW, ingest.grpc, &token, &dir.join("buffer")) + &devices(transport);
    std::fs::write(&config, text)?;
    let gateway = GatewayProc::start(&config)?;
    let api = ingest.api();
    let logs = || {
        format!(
            "gateway log:\n{}\nmeters log:\n{}",
            gateway.proc.logs(),
            std::fs::read_to_string(dir.join("meters.log")).unwrap_or_default()
        )
    };

    for (tag, di, value) in expected() {
        let t = wait_for(
            &format!("m1 {tag} ({di})"),
            Duration::from_secs(30),
            || async {
                Ok(api
                    .tag(GW, "m1", tag)
                    .await?
                    .filter(|t| t["last_quality"] == "good"))
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;
        let got = &t["last_value"];
        let same = match (got.as_f64(), value.as_f64()) {
            (Some(a), Some(b)) => (a - b).abs() < 1e-9,
            _ => *got == value,
        };
        assert!(same, "m1 {tag} ({di}): {got}, expected {value}");
    }
    // The error frame: Bad with the meter's error byte (02: no such data).
    let missing = wait_for("m1 missing Bad", Duration::from_secs(10), || async {
        Ok(api
            .tag(GW, "m1", "missing")
            .await?
            .filter(|t| t["last_quality"] == "bad"))
    })
    .await?;
    assert_eq!(missing["last_quality_code"], 0x0007_0002, "{missing}");
    assert_eq!(missing["good"], 0, "{missing}");
    // The template, on the second meter (phase A voltage is 220.1 + 1).
    let m2 = wait_for("m2 voltage_a", Duration::from_secs(30), || async {
        Ok(api
            .tag(GW, "m2", "voltage_a")
            .await?
            .filter(|t| t["last_quality"] == "good"))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;
    assert_eq!(m2["last_value"], json!(221.1), "{m2}");
    let energy = api
        .tag(GW, "m2", "energy_import_b")
        .await?
        .unwrap_or_default();
    assert_eq!(energy["last_value"], json!(8000.02), "{energy}");
    // Each meter's number (DI 04000402, read at start) is in the manifest;
    // the dead meter has none.
    let summary = api.get("/api/v1/summary").await?;
    let identity = |id: &str| {
        summary["gateways"][0]["devices"]
            .as_array()
            .and_then(|ds| ds.iter().find(|d| d["id"] == id))
            .map(|d| d["identity"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(identity("m1")["meter_number"], "202400000001", "{summary}");
    assert_eq!(identity("m2")["meter_number"], "202400000002", "{summary}");
    assert!(identity("dead")["meter_number"].is_null(), "{summary}");

    // The live meters keep their interval while the dead one is Bad: a
    // poll of the dead meter costs its 1 s timeout, so a line waiting it
    // out every cycle polls m1 at most every 1.2 s (5 times in 6 s); backed
    // off, m1 is polled every 500 ms (12), less a probe's idle-time cost.
    let from = now_ms();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let to = from + 6000;
    let polls = wait_for(
        "m1's points of the window",
        Duration::from_secs(10),
        || async {
            let points = api.points(GW, "m1", "voltage_a").await?;
            let in_window: Vec<i64> = points
                .iter()
                .filter(|p| p["quality"] == "good")
                .filter_map(|p| p["time_ms"].as_i64())
                .filter(|t| (from..to).contains(t))
                .collect();
            let delivered = points
                .iter()
                .filter_map(|p| p["time_ms"].as_i64())
                .any(|t| t >= to);
            Ok(delivered.then_some(in_window))
        },
    )
    .await?;
    assert!(
        polls.len() >= 9,
        "m1 was polled {} times in 6 s at {POLL_MS} ms beside a dead meter: {polls:?}\n{}",
        polls.len(),
        logs()
    );
    let dead = api.points(GW, "dead", "voltage_a").await?;
    assert!(!dead.is_empty(), "no points for the dead meter\n{}", logs());
    for p in &dead {
        assert_eq!(p["quality"], "bad", "{p}");
        let code = p["quality_code"].as_u64().unwrap_or(0);
        assert!(
            code == 0x0002_0001 || code == 0x0002_0006,
            "dead meter code {code:#x}: expected timeout or backing off"
        );
    }
    assert!(
        dead.iter().any(|p| p["quality_code"] == 0x0002_0006),
        "the dead meter was never backed off"
    );
    assert!(
        !gateway.proc.logs().contains("no valid frame"),
        "a clean line was diagnosed as garbled\n{}",
        logs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_behind_a_serial_device_server_over_tcp() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let _meters = start_meters("tcp", &port.to_string(), dir.path())?;
    a_line_of_meters(&format!("host = \"127.0.0.1\"\nport = {port}"), dir.path()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_on_a_serial_line_over_a_pty_pair() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_socat, gateway_end, meters_end) = pty_pair(dir.path())?;
    let _meters = start_meters("serial", &meters_end.display().to_string(), dir.path())?;
    a_line_of_meters(
        &format!(
            // A pty is not paced: 2 ms instead of 3.5 characters at 2400
            // baud (16 ms), so the line's 37 reads fit the 500 ms interval.
            "serial_port = \"{}\"\nbaud_rate = 2400\nparity = \"even\"\ninter_frame_delay = \"2ms\"",
            gateway_end.display()
        ),
        dir.path(),
    )
    .await
}

/// The installer's probe: the broadcast read of the address, then a read of
/// two DIs of that meter, over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_reads_the_address_then_values() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let _meters = start_meters("tcp", &port.to_string(), dir.path())?;
    let gateway = guantong_e2e::procs::binary("guantong-gateway")?;
    let probe = |args: &[&str]| -> anyhow::Result<(bool, String)> {
        let out = Command::new(&gateway)
            .args([
                "probe",
                "dlt645",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .args(args)
            .output()?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    };
    let (ok, said) = probe(&["read-address"])?;
    assert!(ok, "{said}");
    assert_eq!(said.trim(), format!("meter address: {}", LIVE[0]));
    let (ok, said) = probe(&["--meter", LIVE[0], "read", "02010100", "00010000"])?;
    assert!(ok, "{said}");
    assert!(
        said.contains("02010100  220.1 V  (phase A voltage; data 01 22)"),
        "{said}"
    );
    assert!(
        said.contains("00010000  23456.78 kWh  (forward active energy"),
        "{said}"
    );
    let (ok, said) = probe(&["--meter", LIVE[0], "read", "02FF0000"])?;
    assert!(!ok, "{said}");
    assert!(
        said.contains("no data for this identifier (error byte 0x02)"),
        "{said}"
    );
    Ok(())
}

/// The probe as the issue writes it, on a serial line (a pty pair):
/// `probe dlt645 --serial PATH --baud 2400 --parity even read-address`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_reads_the_address_on_a_serial_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_socat, gateway_end, meters_end) = pty_pair(dir.path())?;
    let _meters = start_meters("serial", &meters_end.display().to_string(), dir.path())?;
    let gateway = guantong_e2e::procs::binary("guantong-gateway")?;
    let serial = gateway_end.display().to_string();
    let common = [
        "probe", "dlt645", "--serial", &serial, "--baud", "2400", "--parity", "even",
    ];
    let out = Command::new(&gateway)
        .args(common)
        .arg("read-address")
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(said.trim(), format!("meter address: {}", LIVE[0]));
    let out = Command::new(&gateway)
        .args(common)
        .args(["--meter", LIVE[1], "read", "02010100"])
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("02010100  221.1 V"), "{said}");
    // A meter that is not on the line: a timeout, explained.
    let out = Command::new(&gateway)
        .args(common)
        .args(["--timeout", "300ms", "--meter", DEAD, "read", "02010100"])
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("no answer from meter 000000000099"), "{said}");
    Ok(())
}
