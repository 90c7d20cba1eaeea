//! The foundation's data path end to end, with the real binaries as processes:
//! simulated Modbus TCP device -> guantong-gateway -> durable buffer -> gRPC ->
//! guantong-ingest (embedded store) -> HTTP API.

use std::net::SocketAddr;
use std::time::Duration;

use guantong_e2e::procs::{GatewayProc, IngestProc, gateway_toml, wait_for};
use guantong_e2e::proxy::Mode;
use guantong_e2e::scenario::{DEV, GW, Options, Scenario, check_counter, pending_batches_at_start};
use guantong_e2e::sim::{SimDevice, standard_device_toml, standard_expected};

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

/// Settles and checks that every counter value arrived exactly once.
async fn settle_exactly_once(s: &Scenario) -> u64 {
    let (points, last, lost) = s
        .settle(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(lost, 0, "no loss declared in this scenario");
    if let Err(e) = check_counter(&points, last, 0, true) {
        panic!("{e}\n{}", s.logs());
    }
    if let Err(e) = s.assert_chain_intact().await {
        panic!("{e}");
    }
    last
}

fn close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_f64() || b.is_f64() => (x - y).abs() < 1e-6,
        _ => a == b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_served_value_arrives_correctly_decoded() -> anyhow::Result<()> {
    let s = Scenario::start(Options {
        poll: "100ms",
        ..Options::default()
    })
    .await?;
    let api = s.ingest.api();
    for (tag, expected) in standard_expected() {
        let got = wait_for(&format!("tag {tag}"), Duration::from_secs(30), || async {
            Ok(api
                .tag(GW, DEV, tag)
                .await?
                .filter(|t| !t["last_value"].is_null()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
        assert!(
            close(&got["last_value"], &expected),
            "{tag}: got {} expected {expected}",
            got["last_value"]
        );
        assert_eq!(got["last_quality"], "good", "{tag}");
        assert_eq!(
            got["interval_ms"], 100,
            "{tag}: declared interval from the manifest"
        );
    }
    // The device's own identification (Modbus 43/14) reaches the summary.
    let summary = api.get("/api/v1/summary").await?;
    let device = &summary["gateways"][0]["devices"][0];
    assert_eq!(device["identity"]["vendor"], "Guantong", "{device}");
    assert_eq!(device["identity"]["product_code"], "SIM-1", "{device}");
    let flow = api.tag(GW, DEV, "flow").await?.expect("flow tag");
    assert_eq!(flow["unit"], "m³/h");
    assert_eq!(flow["address"], "input:0");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = settle_exactly_once(&s).await;
    assert!(n >= 10, "only {n} polls in the test window");

    // The device fault shows up as Bad points with the exception code.
    let counter = api.tag(GW, DEV, "counter").await?.expect("counter tag");
    assert!(
        counter["bad"].as_u64().unwrap_or(0) > 0,
        "fault answers counted as bad: {counter}"
    );
    assert_eq!(
        counter["last_quality_code"], 0x0001_0004,
        "Modbus exception 4: {counter}"
    );
    assert!(
        counter["window"]["expected"].as_u64().unwrap_or(0) > 0,
        "{counter}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_and_restarted_mid_stream_loses_nothing_and_stores_nothing_twice()
-> anyhow::Result<()> {
    let mut s = Scenario::start(Options::default()).await?;
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        s.ingest.proc.kill9();
        tokio::time::sleep(Duration::from_millis(1000 + round * 300)).await;
        s.ingest.restart().await?;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = settle_exactly_once(&s).await;
    assert!(
        n > 100,
        "only {n} values: the scenario did not stream enough"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sigkilled_with_a_full_buffer_delivers_it_exactly_once_after_restart()
-> anyhow::Result<()> {
    let mut s = Scenario::start(Options::default()).await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Ingest away: everything collected from now on waits in the buffer.
    s.ingest.proc.kill9();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // Stop the counter and let the last values reach the disk, then SIGKILL.
    s.sim.set_fault(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.gateway.proc.kill9();
    s.ingest.restart().await?;
    s.gateway.restart()?;
    let n = settle_exactly_once(&s).await;
    let pending = pending_batches_at_start(&s.gateway.config.with_extension("log"));
    assert_eq!(
        pending.len(),
        2,
        "two gateway starts logged: {pending:?}\n{}",
        s.logs()
    );
    assert!(
        pending[1] > 10,
        "the killed gateway left only {} batches in its buffer",
        pending[1]
    );
    assert!(n > 50, "only {n} values");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_stored_but_never_acked_are_replayed_once_after_a_gateway_kill()
-> anyhow::Result<()> {
    let mut s = Scenario::start(Options::default()).await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Acks vanish while ingest keeps storing: the gateway's window fills with
    // batches that are stored but still in its buffer.
    s.proxy.set(Mode::DropDownstream);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Let the last polled values reach the disk before the SIGKILL.
    s.sim.set_fault(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.gateway.proc.kill9();
    s.proxy.set(Mode::Refuse);
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.proxy.set(Mode::Pass);
    s.gateway.restart()?;
    s.sim.set_fault(false);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let n = settle_exactly_once(&s).await;
    let pending = pending_batches_at_start(&s.gateway.config.with_extension("log"));
    assert!(
        pending.len() == 2 && pending[1] > 0,
        "the restarted gateway held unacked batches: {pending:?}\n{}",
        s.logs()
    );
    assert!(n > 50, "only {n} values");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_a_wrong_token_is_refused_and_stores_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sim = SimDevice::new();
    let (sim_addr, _task) = sim.serve(any_port()).await?;
    let data = dir.path().join("ingest");
    IngestProc::register(&data, GW)?;
    let ingest = IngestProc::start(&data, any_port(), any_port()).await?;
    let config = dir.path().join("gateway.toml");
    let text = gateway_toml(GW, ingest.grpc, "gt_wrong", &dir.path().join("buffer"))
        + &standard_device_toml(DEV, sim_addr, "100ms");
    std::fs::write(&config, text)?;
    let gateway = GatewayProc::start(&config)?;
    let log = config.with_extension("log");
    wait_for(
        "the gateway to log the refusal",
        Duration::from_secs(20),
        || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(text
                .contains("unknown gateway or wrong token")
                .then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}{}", gateway.proc.logs(), ingest.proc.logs()));
    let api = ingest.api();
    assert!(
        api.tag(GW, DEV, "counter").await?.is_none(),
        "nothing may be stored for a refused gateway"
    );
    assert!(
        sim.counter() > 0,
        "the gateway still collects into its buffer while refused"
    );
    Ok(())
}
