//! `guantong-gateway probe modbus ...` against simulated devices: the real
//! binary, its real output.

use std::net::SocketAddr;
use std::process::Command;

use guantong_e2e::procs::binary;
use guantong_e2e::sim::{SimBus, SimDevice, standard_device_toml};

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

/// Runs `guantong-gateway probe modbus ARGS`; returns (exit code, stdout, stderr).
async fn probe(args: Vec<String>) -> (Option<i32>, String, String) {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(binary("guantong-gateway").expect("binary"))
            .args(["probe", "modbus"])
            .args(&args)
            .output()
            .expect("run probe")
    })
    .await
    .expect("probe task");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_finds_the_type_and_order_of_an_expected_value() {
    let sim = SimDevice::new();
    let (addr, _task) = sim.serve(any_port()).await.expect("sim");
    // Holding 18-19 hold -7.25 as f32 in CDAB.
    let (code, out, err) = probe(args(&format!(
        "read --tcp {addr} 40017 --count 4 --expect -7.25"
    )))
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(
            "-7.25 (±0.005) found as:\n  40019 (holding:18): type = \"f32\", order = \"CDAB\"\n"
        ),
        "{out}"
    );
    assert!(out.contains("40017 (holding:16)  raw 0x41B4"), "{out}");
    // Coils print as bits.
    let (code, out, err) = probe(args(&format!("read --tcp {addr} 00001 --count 2"))).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("00001 coil:0     1\n"), "{out}");
    // A bad address is a usage error, not a panic.
    let (code, _, err) = probe(args(&format!("read --tcp {addr} 20001"))).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("leading digit 2 names no table"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_lists_the_units_that_answer_with_identification() {
    let bus = SimBus::new(&[(1, SimDevice::new()), (4, SimDevice::new())]);
    let (addr, _task) = bus.serve_rtu_over_tcp(any_port()).await.expect("sim");
    let (code, out, err) = probe(args(&format!(
        "scan --rtu-over-tcp {addr} --units 1-5 --timeout 150ms"
    )))
    .await;
    assert_eq!(code, Some(0), "{err}");
    let answering: Vec<&str> = out.lines().filter(|l| l.starts_with("unit")).collect();
    assert_eq!(answering.len(), 2, "{out}");
    assert!(
        answering[0].starts_with("unit   1: holding 40001 = 0; product_code=\"SIM-1\" revision=\"1.0\" vendor=\"Guantong\""),
        "{out}"
    );
    assert!(answering[1].starts_with("unit   4: "), "{out}");
    assert!(out.contains("2 of 5 unit ids answered"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_the_plan_and_one_round_of_values() {
    let sim = SimDevice::new();
    sim.set_hole(15);
    let (addr, _task) = sim.serve(any_port()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    let text = format!(
        "[gateway]\nid = \"gw\"\n[uplink]\nendpoint = \"https://127.0.0.1:1\"\ntoken = \"t\"\n[buffer]\ndir = \"buf\"\n{}",
        standard_device_toml("press", addr, "1s")
    );
    std::fs::write(&config, text).expect("write config");
    let (code, out, err) = probe(vec![
        "dry-run".into(),
        "--config".into(),
        config.display().to_string(),
    ])
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("  device press unit 1 (modbus-tcp) identity {\"product_code\": \"SIM-1\""),
        "{out}"
    );
    assert!(
        out.contains("      holding 0..19 (20 registers, 7 tag(s))"),
        "{out}"
    );
    assert!(
        out.contains("    temperature                    40017 holding:16       22.5 °C"),
        "{out}"
    );
    assert!(
        out.contains("    i32_cdab                       40015 holding:14       BAD modbus exception 2 (illegal data address)"),
        "{out}"
    );
    assert!(
        out.contains("    flow                           30001 input:0          4.2 m³/h"),
        "{out}"
    );
}
