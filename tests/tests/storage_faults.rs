//! Faults of the gateway's own storage. A disk that fills up is injected
//! under the real binaries (a small tmpfs mounted as the buffer directory and
//! filled with a ballast file) while a Modbus counter is collected and
//! streamed to ingest; the checker compares every counter value the device
//! served with what ingest stored and what the gateway declared lost.
//!
//! Failing writes (EIO) and a disk full at shutdown are injected into redb's
//! file backend (`StorageFaults`) under the real buffer, writer and uplink in
//! this process (`pipeline`): this machine has no device-mapper for
//! `dm-error`, and a process-level switch would put a fault knob into the
//! shipped binary. Ingest is real and verifies the signed chain.

use std::collections::BTreeMap;
use std::time::Duration;

use guantong_e2e::bench::LocalIngest;
use guantong_e2e::pipeline::{Pipeline, PipelineOptions, verifying_ingest};
use guantong_e2e::procs::wait_for;
use guantong_e2e::proxy::Mode;
use guantong_e2e::scenario::{Options, Scenario, check_counter};
use guantong_gateway::quality::{Sample, now_ms};
use guantong_gateway::storage_io::WriteFault;
use guantong_ingest::store::Store;
use guantong_proto::v1::point;

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

/// What was collected: points per tag; each sample's time is unique
/// (`clock` counts milliseconds up).
struct Collection {
    tags: u32,
    collected: BTreeMap<String, u64>,
    clock: i64,
}

impl Collection {
    fn new(tags: u32) -> Collection {
        Collection {
            tags,
            collected: BTreeMap::new(),
            clock: now_ms() - 3_600_000,
        }
    }

    /// Collects from every tag every 10 ms for `duration`.
    async fn run(&mut self, p: &Pipeline, duration: Duration) {
        let sink = p.sink.as_ref().expect("collecting");
        let start = std::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while start.elapsed() < duration {
            tick.tick().await;
            self.clock += 1;
            let samples: Vec<Sample> = (0..self.tags)
                .map(|tag| Sample::good(tag, self.clock, point::Value::Uint(self.clock as u64)))
                .collect();
            for tag in 0..self.tags {
                *self.collected.entry(format!("t{tag}")).or_default() += 1;
            }
            assert!(sink.send(samples).await, "the writer stopped");
        }
    }
}

/// Per tag: stored in ingest + declared lost (`storage_error`) must equal
/// collected; the chain verifies without a break through `last`. Returns
/// the points declared lost and the latest source time a loss covers.
async fn check_accounts(
    ingest: &LocalIngest,
    collected: &BTreeMap<String, u64>,
    last: u64,
) -> anyhow::Result<(u64, i64)> {
    let mut accounted: BTreeMap<String, u64> = BTreeMap::new();
    for s in ingest.store.series().await? {
        *accounted.entry(s.tag).or_default() += s.samples;
    }
    let (mut lost, mut latest_lost) = (0, i64::MIN);
    for l in ingest.store.losses().await? {
        anyhow::ensure!(
            l.reason.ends_with("storage_error"),
            "only storage errors were injected: {l:?}"
        );
        for t in l.tags {
            *accounted.entry(t.tag).or_default() += t.points;
            lost += t.points;
            latest_lost = latest_lost.max(t.last_time_ms);
        }
    }
    anyhow::ensure!(
        &accounted == collected,
        "stored + declared lost per tag {accounted:?} != collected {collected:?}"
    );
    let chains = ingest.store.chains().await?;
    anyhow::ensure!(
        chains.len() == 1
            && chains[0].breaks.is_empty()
            && chains[0].waiting == 0
            && chains[0].verified_through == last,
        "the chain must verify through {last}: {chains:?}"
    );
    Ok((lost, latest_lost))
}

/// Collects 20 tags (2,000 points/s) through the pipeline, lets writes fail
/// as `fault` says for 2 s (at most 1,500 points held, so they overflow),
/// heals them, collects on and drains. Returns what `check_accounts`
/// returns and the clock when the buffer committed again.
async fn fault_heal_and_account(fault: WriteFault) -> anyhow::Result<(u64, i64, i64)> {
    const TAGS: u32 = 20;
    let ingest = verifying_ingest().await?;
    let dir = tempfile::tempdir()?;
    let mut p = Pipeline::start(
        &ingest,
        dir.path(),
        PipelineOptions {
            tags: TAGS,
            commit_interval: Duration::from_millis(50),
            max_held_points: 1_500,
            ..PipelineOptions::default()
        },
    )?;
    let mut c = Collection::new(TAGS);
    c.run(&p, Duration::from_secs(1)).await;
    p.faults.set_write_fault(fault);
    c.run(&p, Duration::from_secs(2)).await;
    assert!(p.faults.failed() > 0, "writes were attempted and failed");
    assert!(p.running(), "the writer and the uplink survive the errors");
    p.faults.set_write_fault(WriteFault::None);
    // Recovery: the held points and the loss are committed once a reopen
    // succeeds (its backoff is at most 5 s), while collection goes on.
    let mut committed = p.committed.clone();
    let before = *committed.borrow_and_update();
    let recovery = async {
        while *committed.borrow() == before {
            committed.changed().await.expect("writer alive");
        }
    };
    tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(15), recovery) => {
            r.expect("the buffer commits again within 15 s of the writes healing");
        }
        _ = async { loop { c.run(&p, Duration::from_millis(100)).await } } => {}
    }
    let recovered_at = c.clock;
    c.run(&p, Duration::from_secs(1)).await;
    p.stop_collecting().await?;
    let last = *p.committed.borrow();
    p.drain_and_stop(Duration::from_secs(30)).await?;
    let (lost, latest_lost) = check_accounts(&ingest, &c.collected, last).await?;
    Ok((lost, latest_lost, recovered_at))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_writes_are_held_declared_when_they_overflow_and_recovered_from()
-> anyhow::Result<()> {
    let (lost, latest_lost, recovered_at) = fault_heal_and_account(WriteFault::Eio).await?;
    assert!(lost > 0, "the memory bound overflowed: a loss is declared");
    assert!(
        latest_lost < recovered_at,
        "nothing collected after the buffer committed again is lost ({latest_lost} >= {recovered_at})"
    );
    Ok(())
}

/// The first commit after the switch finds only its fsync failing: redb
/// finds it in the file when it reopens. The oldest held points dropped
/// for the bound are that commit's, so writing them again or declaring
/// them would count them twice in `check_accounts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_fsync_fails_is_stored_once_and_not_declared_lost() -> anyhow::Result<()> {
    let (lost, _, _) = fault_heal_and_account(WriteFault::SyncEio).await?;
    assert!(lost > 0, "the memory bound overflowed: a loss is declared");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_held_when_stopping_while_writes_fail_are_declared_at_the_next_start()
-> anyhow::Result<()> {
    const TAGS: u32 = 20;
    let ingest = verifying_ingest().await?;
    let dir = tempfile::tempdir()?;
    let options = || PipelineOptions {
        tags: TAGS,
        commit_interval: Duration::from_millis(50),
        ..PipelineOptions::default()
    };
    let mut p = Pipeline::start(&ingest, dir.path(), options())?;
    let mut c = Collection::new(TAGS);
    c.run(&p, Duration::from_millis(500)).await;
    p.faults.set_write_fault(WriteFault::Eio);
    c.run(&p, Duration::from_secs(1)).await;
    let held_from = c.clock - 100;
    p.stop_collecting().await?;
    assert!(p.faults.failed() > 0, "commits failed");
    // The disk works again; the uplink delivers what was committed before.
    p.faults.set_write_fault(WriteFault::None);
    wait_for("the buffer to reopen", Duration::from_secs(10), || async {
        Ok(p.buffer.stats().is_ok().then_some(()))
    })
    .await?;
    p.drain_and_stop(Duration::from_secs(30)).await?;

    // The disk has room again; the next start declares what was held.
    let mut p = Pipeline::start(&ingest, dir.path(), options())?;
    c.run(&p, Duration::from_millis(500)).await;
    p.stop_collecting().await?;
    let last = *p.committed.borrow();
    p.drain_and_stop(Duration::from_secs(30)).await?;
    let (lost, latest_lost) = check_accounts(&ingest, &c.collected, last).await?;
    assert!(
        lost >= 80 * u64::from(TAGS),
        "the last second before the stop was held and declared, not {lost} points"
    );
    assert!(latest_lost >= held_from, "the loss covers the stop");
    Ok(())
}
