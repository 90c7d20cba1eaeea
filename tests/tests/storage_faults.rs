//! Faults of the gateway's own storage, injected under the real binaries: a
//! disk that fills up (a small tmpfs mounted as the buffer directory and
//! filled with a ballast file) while a Modbus counter is collected and
//! streamed to ingest. The checker then compares every counter value the
//! device served with what ingest stored and what the gateway declared lost.

use std::time::Duration;

use guantong_e2e::procs::wait_for;
use guantong_e2e::proxy::Mode;
use guantong_e2e::scenario::{Options, Scenario, check_counter};

const SETTLE: Duration = Duration::from_secs(90);

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

async fn wait_log(s: &Scenario, what: &str, needle: &str, after: usize, timeout: Duration) {
    let seen = wait_for(what, timeout, || async {
        Ok((count(&s.gateway_log(), needle) > after).then_some(()))
    })
    .await;
    if let Err(e) = seen {
        panic!("{e}\n{}", s.logs());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_held_in_memory_declared_when_it_overflows_and_recovered_from()
-> anyhow::Result<()> {
    // 101 tags every 10 ms: ~10,000 points/s. max_bytes 2 MiB lets the
    // writer hold 32,768 points in memory: a few seconds of a full disk.
    let mut s = Scenario::start(Options {
        poll: "10ms",
        max_bytes: "2 MiB",
        extra_tags: 100,
        buffer_tmpfs: Some("24m"),
        ..Options::default()
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A cut link makes the backlog grow, so the file must grow into the full disk.
    s.proxy.set(Mode::Refuse);
    let fs = s.buffer_fs.as_ref().expect("mounted");
    let (ballast, size) = fs.fill("ballast")?;
    assert!(size > 1 << 20, "ballast filled only {size} bytes");
    wait_log(
        &s,
        "a commit to fail on the full disk",
        "buffer commit failed",
        0,
        Duration::from_secs(30),
    )
    .await;
    // The link is back while the disk stays full: the uplink delivers what
    // it can, and the writer overflows its memory bound.
    s.proxy.set(Mode::Pass);
    tokio::time::sleep(Duration::from_secs(8)).await;
    std::fs::remove_file(&ballast)?;
    wait_log(
        &s,
        "the buffer to commit again once space returned",
        "buffer commits again",
        0,
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (points, last, lost) = s.settle(SETTLE).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        lost > 0,
        "the memory bound overflowed: a loss must be declared\n{}",
        s.logs()
    );
    if let Err(e) = check_counter(&points, last, lost, true) {
        panic!(
            "stored + declared lost must equal served: {e}\n{}",
            s.logs()
        );
    }
    let losses = s.ingest.api().get("/api/v1/losses").await?;
    assert!(
        losses
            .to_string()
            .contains("dropped by the gateway: storage_error"),
        "the loss has a cause of its own: {losses}"
    );
    if let Err(e) = s.assert_chain_intact().await {
        panic!("{e}");
    }
    assert!(s.gateway.proc.is_running(), "no crash\n{}", s.logs());
    assert_eq!(
        count(&s.gateway_log(), "gateway starting"),
        1,
        "no restart\n{}",
        s.logs()
    );
    Ok(())
}

#[test]
fn a_disk_too_small_for_max_bytes_exits_with_the_bad_config_code() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let buffer = dir.path().join("buffer");
    let _fs = guantong_e2e::mount::Tmpfs::mount(&buffer, "4m")?;
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"gw-small-disk\"\n\n[uplink]\n{}token = \"t\"\n\n[buffer]\ndir = \"{}\"\nmax_bytes = \"64 MiB\"\n{}",
            guantong_e2e::procs::uplink_toml("127.0.0.1:1".parse()?),
            buffer.display(),
            guantong_e2e::sim::standard_device_toml("dev", "127.0.0.1:1".parse()?, "1s"),
        ),
    )?;
    let out = std::process::Command::new(guantong_e2e::procs::binary("guantong-gateway")?)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()?;
    let log =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a quota the disk cannot hold is a configuration problem: restarting cannot help\n{log}"
    );
    assert!(
        log.contains("lower buffer.max_bytes"),
        "the error says what to change\n{log}"
    );
    Ok(())
}
