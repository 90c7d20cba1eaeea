//! Fault injection with the real binaries: a TCP proxy between gateway and
//! ingest cuts, blackholes, delays and resets the link; processes are
//! SIGKILLed; the buffer fills up or is destroyed. After every scenario the
//! checker compares each counter value the simulated device served with what
//! ingest stored: nothing missing except declared losses, nothing twice, and
//! loss records exactly equal to what was dropped.
//! (Ingest killed and restarted repeatedly is in data_path.rs.)

use std::time::Duration;

use guantong_e2e::proxy::Mode;
use guantong_e2e::scenario::{DEV, GW, Options, Scenario, check_counter, pending_batches_at};

const SETTLE: Duration = Duration::from_secs(60);

async fn assert_exactly_once(s: &Scenario) -> u64 {
    let (points, last, lost) = s.settle(SETTLE).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        lost,
        0,
        "no loss may be declared in this scenario\n{}",
        s.logs()
    );
    if let Err(e) = check_counter(&points, last, 0, true) {
        panic!("{e}\n{}", s.logs());
    }
    if let Err(e) = s.assert_chain_intact().await {
        panic!("{e}");
    }
    last
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_for_half_a_minute_backfills_everything_once_live_first() -> anyhow::Result<()> {
    let s = Scenario::start(Options::default()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.proxy.set(Mode::Refuse);
    tokio::time::sleep(Duration::from_secs(30)).await;
    s.proxy.set(Mode::Pass);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = assert_exactly_once(&s).await;
    assert!(n > 500, "only {n} values");
    let counter = s
        .ingest
        .api()
        .tag(GW, DEV, "counter")
        .await?
        .expect("counter");
    assert!(
        counter["backfilled"].as_u64().unwrap_or(0) > 100,
        "the outage's data arrived as backfill: {counter}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_link_is_detected_by_keepalive_and_nothing_is_lost() -> anyhow::Result<()> {
    let s = Scenario::start(Options {
        keepalive: "1s",
        ..Options::default()
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = count(&s.gateway_log(), "uplink disconnected");
    s.proxy.set(Mode::Blackhole);
    // Packets vanish, no RST: keepalive (1 s + 1 s) must notice within a few seconds.
    let detected = guantong_e2e::procs::wait_for(
        "keepalive to declare the link dead",
        Duration::from_secs(8),
        || async { Ok((count(&s.gateway_log(), "uplink disconnected") > before).then_some(())) },
    )
    .await;
    if let Err(e) = detected {
        panic!("{e}\n{}", s.logs());
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    s.proxy.set(Mode::Pass);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_exactly_once(&s).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_mid_stream_loses_nothing() -> anyhow::Result<()> {
    let s = Scenario::start(Options::default()).await?;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        s.proxy.set(Mode::Reset);
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.proxy.set(Mode::Pass);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_exactly_once(&s).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sigkilled_twenty_times_loses_at_most_its_commit_interval_each_time()
-> anyhow::Result<()> {
    // Poll every 20 ms, commit every 100 ms: a SIGKILL may lose what was
    // polled since the last commit, ~5 values, and nothing else.
    let mut s = Scenario::start(Options::default()).await?;
    const KILLS: u64 = 20;
    for i in 0..KILLS {
        let pause = 300 + (i * 7919) % 700; // spread over 0.3-1 s, reproducibly
        tokio::time::sleep(Duration::from_millis(pause)).await;
        s.gateway.restart()?; // SIGKILL, then start again
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (points, last, lost) = s
        .settle_with(SETTLE, true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(lost, 0, "a kill is not a declared loss");
    let per_kill = 100 / 20 + 3;
    match check_counter(&points, last, KILLS * per_kill, false) {
        Ok(missing) => {
            // Missing values come in short runs, one per kill at most.
            let runs = missing.windows(2).filter(|w| w[1] != w[0] + 1).count()
                + usize::from(!missing.is_empty());
            assert!(
                runs as u64 <= KILLS,
                "{runs} separate gaps for {KILLS} kills: {missing:?}"
            );
        }
        Err(e) => panic!("{e}\n{}", s.logs()),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_during_a_long_outage_declares_exactly_what_it_dropped() -> anyhow::Result<()>
{
    // 110 tags every 10 ms into a 1 MiB buffer: full within seconds.
    let s = Scenario::start(Options {
        poll: "10ms",
        max_bytes: "1 MiB",
        extra_tags: 100,
        ..Options::default()
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.proxy.set(Mode::Refuse);
    tokio::time::sleep(Duration::from_secs(20)).await;
    s.proxy.set(Mode::Pass);
    let (points, last, lost) = s.settle(SETTLE).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        lost > 0,
        "the buffer must have dropped counter values\n{}",
        s.logs()
    );
    if let Err(e) = check_counter(&points, last, lost, true) {
        let losses = s.ingest.api().get("/api/v1/losses").await?;
        let mut detail = String::new();
        for l in losses["losses"].as_array().into_iter().flatten() {
            let c: Vec<&serde_json::Value> = l["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| t["tag"] == "counter")
                .collect();
            detail += &format!(
                "{}..{} {} {:?}\n",
                l["first_seq"], l["last_seq"], l["reason"], c
            );
            for t in &c {
                let (a, b) = (
                    t["first_time_ms"].as_i64().unwrap_or(0),
                    t["last_time_ms"].as_i64().unwrap_or(0),
                );
                let inside: Vec<String> = points
                    .iter()
                    .filter(|p| p["time_ms"].as_i64().is_some_and(|x| x >= a && x <= b))
                    .map(|p| format!("{}@{}", p["value"], p["time_ms"]))
                    .collect();
                detail += &format!(
                    "   stored inside that range: {} {:?}\n",
                    inside.len(),
                    &inside[..inside.len().min(12)]
                );
            }
        }
        panic!(
            "stored + declared lost must equal served: {e}\nlosses:\n{detail}\n{}",
            s.logs()
        );
    }
    // Loss records bridge the dropped links: the chain still verifies.
    if let Err(e) = s.assert_chain_intact().await {
        panic!("{e}");
    }
    // Every tag's loss is declared, not only the counter's.
    let losses = s.ingest.api().get("/api/v1/losses").await?;
    let tags: std::collections::HashSet<String> = losses["losses"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["tags"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["tag"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        tags.len(),
        110,
        "per-tag loss counts for all 110 tags: {tags:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_buffer_file_is_moved_aside_and_collection_goes_on() -> anyhow::Result<()> {
    let mut s = Scenario::start(Options::default()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.proxy.set(Mode::Refuse);
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.gateway.proc.kill9();
    let lost_with_file = u64::from(s.sim.counter());
    let file = s.buffer_dir().join("buffer.redb");
    let len = std::fs::metadata(&file)?.len() as usize;
    std::fs::write(&file, vec![0x5Au8; len.max(4096)])?;
    s.gateway.restart()?;
    s.proxy.set(Mode::Pass);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (points, last, _) = s
        .settle_with(SETTLE, true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let missing = check_counter(&points, last, lost_with_file, false)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert!(
        missing.iter().all(|&v| v <= lost_with_file),
        "only values from the destroyed file may be missing: {missing:?}"
    );
    let losses = s.ingest.api().get("/api/v1/losses").await?;
    assert!(
        losses
            .to_string()
            .contains("dropped by the gateway: corrupted"),
        "the lost file is declared: {losses}"
    );
    let aside = std::fs::read_dir(s.buffer_dir())?
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("buffer.redb.unreadable-")
        });
    assert!(aside, "the destroyed file is kept for inspection");
    // The new buffer's first link is the signed record of the lost file.
    if let Err(e) = s.assert_chain_intact().await {
        panic!("{e}");
    }
    assert!(
        s.gateway_log().contains("BUFFER FILE CANNOT BE OPENED"),
        "loud error"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300ms_round_trip_delivers_everything_once() -> anyhow::Result<()> {
    let s = Scenario::start(Options::default()).await?;
    s.proxy.set(Mode::Delay(150));
    tokio::time::sleep(Duration::from_secs(8)).await;
    let n = assert_exactly_once(&s).await;
    assert!(n > 200, "only {n} values");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_the_buffer_so_a_restart_loses_nothing() -> anyhow::Result<()> {
    // Unlike SIGKILL, SIGTERM lets the gateway commit what it polled.
    let mut s = Scenario::start(Options::default()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.proxy.set(Mode::Refuse);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = s.gateway.proc.terminate(Duration::from_secs(10));
    assert!(
        status.is_some_and(|st| st.success()),
        "clean exit on SIGTERM: {status:?}\n{}",
        s.logs()
    );
    let served_before_stop = u64::from(s.sim.counter());
    s.proxy.set(Mode::Pass);
    s.gateway.restart()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = assert_exactly_once(&s).await;
    assert!(
        n > served_before_stop,
        "collection resumed after the restart"
    );
    assert!(
        s.gateway_log().contains("buffer flushed"),
        "the shutdown flush is logged"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_delivers_the_final_flush_within_the_grace() -> anyhow::Result<()> {
    // The link is up: what the shutdown flush commits must be sent and
    // acknowledged before the gateway exits, not left for the next start.
    let mut s = Scenario::start(Options::default()).await?;
    const STOPS: usize = 6;
    for _ in 0..STOPS {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let status = s.gateway.proc.terminate(Duration::from_secs(15));
        assert!(
            status.is_some_and(|st| st.success()),
            "clean exit on SIGTERM: {status:?}\n{}",
            s.logs()
        );
        s.gateway.restart()?;
    }
    let left = pending_batches_at(&s.gateway.config.with_extension("log"), "gateway stopped");
    assert_eq!(left.len(), STOPS, "one stop line per SIGTERM\n{}", s.logs());
    assert!(
        left.iter().all(|&n| n == 0),
        "batches left unsent at each stop: {left:?}\n{}",
        s.logs()
    );
    assert_exactly_once(&s).await;
    Ok(())
}
