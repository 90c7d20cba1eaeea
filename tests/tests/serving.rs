//! Ingest while it serves: killed under load, and operated from the CLI.
//!
//! Gateways are played by `guantong_e2e::load` (each its own buffer, key,
//! token and TLS stream); ingest is the real binary as a process.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use guantong_e2e::load::{self, Load, Shape};
use guantong_e2e::procs::{IngestProc, binary};
use guantong_ingest::store::Store;
use guantong_ingest::store::embedded::EmbeddedStore;

/// `guantong-ingest verify-chain` on `data` (ingest stopped); its output.
fn verify_chain(data: &std::path::Path) -> anyhow::Result<String> {
    let out = Command::new(binary("guantong-ingest")?)
        .args(["verify-chain", "--data"])
        .arg(data)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "verify-chain failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// Runs `guantong-ingest ARGS`; its standard output, trimmed.
fn ingest_cli(args: &[&str], data: &std::path::Path) -> anyhow::Result<String> {
    let out = Command::new(binary("guantong-ingest")?)
        .args(args)
        .arg("--data")
        .arg(data)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "guantong-ingest {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_registered_from_the_cli_while_ingest_serves_then_streams() -> anyhow::Result<()>
{
    let work = tempfile::tempdir()?;
    let data = work.path().join("data");
    let any = "127.0.0.1:0".parse()?;
    let mut ingest = IngestProc::start(&data, any, any).await?;
    let prefix = format!("ops{}", std::process::id());
    let id = load::gateway_id(&prefix, 0);
    let (algorithm, key) = load::public_key(0);
    let token = ingest_cli(
        &[
            "register-gateway",
            &id,
            "--key-algorithm",
            &algorithm,
            "--public-key",
            &key,
        ],
        &data,
    )?;
    anyhow::ensure!(ingest.proc.is_running(), "{}", ingest.proc.logs());
    // Registered again: refused by the server, and said so.
    let again = Command::new(binary("guantong-ingest")?)
        .args(["register-gateway", &id, "--data"])
        .arg(&data)
        .output()?;
    assert!(
        !again.status.success(),
        "a second registration of {id} was accepted"
    );

    let shape = Shape {
        gateways: 1,
        tags: 20,
        interval_ms: 1000,
    };
    let load = Load::start(
        work.path(),
        &prefix,
        shape,
        &[ingest.grpc],
        ingest.ca_file(),
        std::slice::from_ref(&token),
    )?;
    load::wait_acked(&load, &mut ingest, 1).await?;

    // A new token while serving; the old one stays valid for its grace.
    let rotated = ingest_cli(&["rotate-gateway-token", &id, "--grace", "1h"], &data)?;
    assert_ne!(rotated, token);
    // An account added while serving can read at once (a reviewer of every
    // enterprise: one with none listed sees nothing).
    let reviewer = ingest_cli(
        &[
            "add-account",
            "auditor",
            "--role",
            "reviewer",
            "--all-enterprises",
        ],
        &data,
    )?;
    let chains = ingest.api_as(Some(reviewer)).get("/api/v1/chain").await?;
    assert!(chains.to_string().contains(&id), "{chains}");
    let committed = load.totals().committed;
    load::wait_acked(&load, &mut ingest, committed).await?;
    load.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_point_is_stored_once_after_ingest_is_killed_during_load() -> anyhow::Result<()>
{
    let work = tempfile::tempdir()?;
    let prefix = format!("kill{}", std::process::id());
    // 200 points/s in 20 batches/s: light enough for a debug build on a
    // busy machine (about 0.5 ms of CPU per point), so the test measures
    // crash safety, not speed.
    let shape = Shape {
        gateways: 4,
        tags: 50,
        interval_ms: 1000,
    };
    let (ingests, load) = load::start_with_ingest(work.path(), &prefix, shape, None, 1).await?;
    let mut ingest = ingests.into_iter().next().context("ingest")?;
    let data = ingest.data.clone();
    load::wait_acked(&load, &mut ingest, 1).await?;
    for kill in 0..4u64 {
        // At a different moment of the write path each time.
        let pause = Duration::from_millis(700 + rand::random_range(0..1300));
        tokio::time::sleep(pause).await;
        ingest.restart().await?;
        // Served again: more is acknowledged than was committed at the kill.
        let committed = load.totals().committed;
        load::wait_acked(&load, &mut ingest, committed + 1)
            .await
            .with_context(|| format!("after kill {}", kill + 1))?;
    }
    load.stop_producing();
    anyhow::ensure!(
        load.wait_drained(Duration::from_secs(120)).await,
        "not everything committed was acknowledged: {:?}\n{}",
        load.totals(),
        ingest.proc.logs()
    );
    let expected = load.expected_per_tag();
    let totals = load.totals();
    load.stop().await?;
    ingest.proc.terminate(Duration::from_secs(10));

    let index: HashMap<String, usize> = (0..shape.gateways)
        .map(|i| (load::gateway_id(&prefix, i), i))
        .collect();
    let store = EmbeddedStore::open(&data)?;
    let series = store.series().await?;
    assert_eq!(series.len(), shape.gateways * shape.tags as usize);
    let mut stored = 0;
    for s in &series {
        let g = index[&s.gateway];
        let tag: usize = s.tag.trim_start_matches('r').parse()?;
        assert_eq!(
            s.samples, expected[g][tag],
            "{} {}: stored {} points, the gateway committed {}",
            s.gateway, s.tag, s.samples, expected[g][tag]
        );
        stored += s.samples;
    }
    assert_eq!(stored, totals.acked);
    drop(store);
    let report = verify_chain(&data)?;
    assert!(
        !report.contains("BREAK") && !report.contains("QUERY TABLES"),
        "{report}"
    );
    assert_eq!(
        report
            .matches("verified: every signature and every link holds")
            .count(),
        shape.gateways,
        "{report}"
    );
    Ok(())
}
