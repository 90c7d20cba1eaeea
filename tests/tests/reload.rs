//! Reloading the gateway's configuration with SIGHUP (issue 18), with the
//! real binaries: simulated Modbus TCP devices -> guantong-gateway ->
//! guantong-ingest. Device A is the scenario's counter device, checked point
//! by point; device B is changed under it.

use std::net::SocketAddr;
use std::time::Duration;

use guantong_e2e::procs::wait_for;
use guantong_e2e::scenario::{DEV, GW, Options, Scenario, check_counter};
use guantong_e2e::sim::SimDevice;

const B: &str = "sim-b";

fn hangup(s: &Scenario) {
    let pid = s.gateway.proc.pid().expect("gateway running");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -HUP {pid}");
}

/// Device B's entry: its counter, and the `u16` tag when `with_u16`.
fn device_b(addr: SocketAddr, with_u16: bool) -> String {
    let mut text = format!(
        "\n[[devices]]\nid = \"{B}\"\nprotocol = \"modbus-tcp\"\nhost = \"{}\"\nport = {}\nunit = 1\n\
         poll_interval = \"50ms\"\ntimeout = \"500ms\"\n\
         [[devices.tags]]\nname = \"counter\"\ntable = \"holding\"\naddress = 0\ntype = \"u32\"\n",
        addr.ip(),
        addr.port()
    );
    if with_u16 {
        text +=
            "[[devices.tags]]\nname = \"u16\"\ntable = \"holding\"\naddress = 10\ntype = \"u16\"\n";
    }
    text
}

/// Lines of the gateway log holding `what`.
fn log_lines(s: &Scenario, what: &str) -> Vec<String> {
    s.gateway_log()
        .lines()
        .filter(|l| l.contains(what))
        .map(str::to_string)
        .collect()
}

async fn wait_log(s: &Scenario, what: &str, count: usize) -> Vec<String> {
    wait_for(what, Duration::from_secs(60), || async {
        let lines = log_lines(s, what);
        Ok((lines.len() >= count).then_some(lines))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()))
}

/// Good counter values of a device stored at ingest.
async fn counter_values(s: &Scenario, device: &str) -> Vec<u64> {
    s.ingest
        .api()
        .points(GW, device, "counter")
        .await
        .unwrap_or_default()
        .iter()
        .filter(|p| p["quality"] == "good")
        .filter_map(|p| p["value"].as_u64())
        .collect()
}

async fn wait_counter_beyond(s: &Scenario, device: &str, beyond: u64) -> u64 {
    wait_for(
        &format!("{device} counter beyond {beyond}"),
        Duration::from_secs(60),
        || async {
            let max = counter_values(s, device).await.into_iter().max();
            Ok(max.filter(|m| *m > beyond))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()))
}

/// Settles device A and checks every counter value it served arrived once
/// (none missing across the reloads), and the chain verifies.
async fn settle_a(s: &Scenario) {
    let (points, last, lost) = s
        .settle(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(lost, 0, "no loss declared");
    if let Err(e) = check_counter(&points, last, 0, true) {
        panic!("{e}\n{}", s.logs());
    }
    s.assert_chain_intact()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_restarts_only_the_changed_device_and_its_series_go_on() -> anyhow::Result<()> {
    let s = Scenario::start(Options {
        poll: "50ms",
        ..Options::default()
    })
    .await?;
    let sim_b = SimDevice::new();
    let (addr_b, _task) = sim_b.serve("127.0.0.1:0".parse()?).await?;
    let original = std::fs::read_to_string(&s.gateway.config)?;
    wait_counter_beyond(&s, DEV, 5).await;
    // Identification and polling each open one.
    let a_connections = s.sim.connections();

    // Reload 1: device B is added; A goes on.
    std::fs::write(
        &s.gateway.config,
        original.clone() + &device_b(addr_b, false),
    )?;
    hangup(&s);
    let applied = wait_log(&s, "configuration reloaded", 1).await;
    assert!(applied[0].contains(B), "only B started: {}", applied[0]);
    assert!(!applied[0].contains(DEV), "A not restarted: {}", applied[0]);
    let b_before = wait_counter_beyond(&s, B, 5).await;
    let b_connections = sim_b.connections();

    // Reload 2: device B gets a tag; A goes on, B restarts.
    std::fs::write(&s.gateway.config, original + &device_b(addr_b, true))?;
    hangup(&s);
    wait_log(&s, "configuration reloaded", 2).await;
    let api = s.ingest.api();
    let u16 = wait_for("B's new tag at ingest", Duration::from_secs(60), || async {
        Ok(api
            .tag(GW, B, "u16")
            .await?
            .filter(|t| !t["last_value"].is_null()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert_eq!(u16["last_value"], 1234, "{u16}");
    // B's counter is one series across both manifests: values read before
    // and after the reload under the same device and tag name.
    wait_counter_beyond(&s, B, b_before + 5).await;
    let b = counter_values(&s, B).await;
    assert!(b.iter().any(|v| *v <= b_before) && b.iter().any(|v| *v > b_before + 5));
    assert!(sim_b.connections() > b_connections, "B was restarted");
    assert_eq!(
        s.sim.connections(),
        a_connections,
        "A kept its connection through both reloads\n{}",
        s.logs()
    );
    settle_a(&s).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_keeps_the_running_config_and_says_why() -> anyhow::Result<()> {
    let s = Scenario::start(Options {
        poll: "50ms",
        ..Options::default()
    })
    .await?;
    let original = std::fs::read_to_string(&s.gateway.config)?;
    let before = wait_counter_beyond(&s, DEV, 5).await;
    let connections = s.sim.connections();

    // Two problems in the devices: both named, one line each.
    let broken = original
        .replacen("type = \"u32\"", "type = \"u33\"", 1)
        .replace("poll_interval = \"50ms\"", "poll_interval = 5");
    assert_ne!(broken, original);
    std::fs::write(&s.gateway.config, &broken)?;
    hangup(&s);
    let refused = wait_log(&s, "reload refused", 3).await;
    assert!(
        refused
            .iter()
            .any(|l| l.contains("devices[0].tags[0].type") && l.contains("u33")),
        "{refused:#?}"
    );
    assert!(
        refused
            .iter()
            .any(|l| l.contains("devices[0].poll_interval")),
        "{refused:#?}"
    );
    assert!(
        refused
            .iter()
            .any(|l| l.contains("running configuration stays")),
        "{refused:#?}"
    );

    // A section only a restart changes is refused, naming it.
    let buffer = original.replace("max_bytes = \"64 MiB\"", "max_bytes = \"32 MiB\"");
    assert_ne!(buffer, original);
    std::fs::write(&s.gateway.config, &buffer)?;
    hangup(&s);
    let refused = wait_log(&s, "reload refused", 5).await;
    assert!(
        refused
            .iter()
            .any(|l| l.contains("key=buffer") && l.contains("only at a restart")),
        "{refused:#?}"
    );
    assert!(log_lines(&s, "configuration reloaded").is_empty());

    // The old config still runs: A keeps polling on its first connection.
    wait_counter_beyond(&s, DEV, before + 20).await;
    assert_eq!(s.sim.connections(), connections, "{}", s.logs());
    assert!(s.gateway_log().contains("gateway starting"));
    settle_a(&s).await;
    Ok(())
}
