//! Ingest on PostgreSQL, end to end with the real binaries: the schema is
//! applied by `migrate` and refused when missing; a `pg_dump`/`pg_restore`
//! round trip after which `verify-chain` passes and the gateway resumes
//! without loss; several replicas on one database, the one a gateway streams
//! to SIGKILLed again and again; a certificate revoked in the database
//! refused by every replica.
//!
//! Each test uses a database of its own on the server `./test.sh` starts
//! (`guantong_e2e_*`, dropped at the end).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use guantong_e2e::pg::TestDb;
use guantong_e2e::procs::{
    GatewayProc, IngestProc, any_port, gateway_identity, ingest_cli, issue_certificate, wait_for,
};
use guantong_e2e::raw::{attempt, batch_at, manifest, unsigned};
use guantong_e2e::scenario::check_counter;
use guantong_e2e::sim::{SimDevice, standard_device_toml};
use guantong_proto::v1::gateway_message::Kind as Up;
use guantong_proto::v1::ingest_message::Kind as Down;

const GW: &str = "gw-pg";
const DEV: &str = "sim-1";

/// A gateway config reading the simulator every 20 ms, sending to
/// `endpoints` (TLS with `ca`), buffering under `dir`.
fn gateway_config(
    endpoints: &[SocketAddr],
    ca: &Path,
    token: &str,
    dir: &Path,
    sim: SocketAddr,
) -> String {
    let list: Vec<String> = endpoints
        .iter()
        .map(|a| format!("\"https://{a}\""))
        .collect();
    let uplink = match list.as_slice() {
        [one] => format!("endpoint = {one}\n"),
        _ => format!("endpoints = [{}]\n", list.join(", ")),
    };
    format!(
        r#"[gateway]
id = "{GW}"

[uplink]
{uplink}ca_file = "{ca}"
token = "{token}"
max_backoff = "1s"
keepalive_interval = "2s"
keepalive_timeout = "2s"

[buffer]
dir = "{buffer}"
max_bytes = "64 MiB"
commit_interval = "100ms"
{device}"#,
        ca = ca.display(),
        buffer = dir.join("buffer").display(),
        device = standard_device_toml(DEV, sim, "20ms"),
    )
}

/// Registers the gateway whose config is at `config`, buffering under
/// `dir` (its key made first), in the database; returns its token.
fn register(
    db: &TestDb,
    data: &Path,
    config: &Path,
    dir: &Path,
    sim: SocketAddr,
) -> anyhow::Result<String> {
    std::fs::write(
        config,
        gateway_config(
            &["127.0.0.1:1".parse()?],
            Path::new("/nonexistent"),
            "none",
            dir,
            sim,
        ),
    )?;
    let (algorithm, key) = gateway_identity(config)?;
    ingest_cli(&[
        "register-gateway",
        "--database",
        &db.url,
        "--data",
        &data.display().to_string(),
        GW,
        "--key-algorithm",
        &algorithm,
        "--public-key",
        &key,
    ])
}

/// Stops the counter and waits until the ingest behind `api` stores its
/// last value; returns the stored counter points and that value.
async fn settle(
    sim: &SimDevice,
    api: &guantong_e2e::procs::Api,
) -> anyhow::Result<(Vec<serde_json::Value>, u64)> {
    sim.set_fault(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last = u64::from(sim.counter());
    ensure!(last > 0, "the gateway never read the device");
    let points = wait_for(
        "every counter value stored",
        Duration::from_secs(30),
        || async {
            let points = api.points(GW, DEV, "counter").await?;
            let good = points.iter().filter(|p| p["quality"] == "good").count() as u64;
            Ok((good >= last).then_some(points))
        },
    )
    .await?;
    Ok((points, last))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_database_without_the_schema_and_says_to_migrate() -> anyhow::Result<()> {
    let db = TestDb::create("unmigrated")?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let e = IngestProc::start_with_args(&data, any_port(), any_port(), &["--database", &db.url])
        .await
        .err()
        .context("serve started on a database without the schema")?;
    ensure!(
        format!("{e:#}").contains("guantong-ingest migrate"),
        "the refusal names the command to run: {e:#}"
    );
    let first = ingest_cli(&["migrate", "--database", &db.url]);
    ensure!(first.is_ok(), "{first:?}");
    // Again: nothing to do, and serve starts.
    ingest_cli(&["migrate", "--database", &db.url])?;
    let mut ingest =
        IngestProc::start_with_args(&data, any_port(), any_port(), &["--database", &db.url])
            .await?;
    ingest.proc.terminate(Duration::from_secs(10));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pg_dump_restored_verifies_and_the_gateway_resumes_without_loss() -> anyhow::Result<()> {
    let db = TestDb::create("backup")?;
    ingest_cli(&["migrate", "--database", &db.url])?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let config = dir.path().join("gateway.toml");
    let sim = SimDevice::new();
    let (sim_addr, _sim_task) = sim.serve(any_port()).await?;
    let token = register(&db, &data, &config, dir.path(), sim_addr)?;
    let serve = ["--database", db.url.as_str()];
    let mut ingest = IngestProc::start_with_args(&data, any_port(), any_port(), &serve).await?;
    std::fs::write(
        &config,
        gateway_config(
            &[ingest.grpc],
            &ingest.ca_file(),
            &token,
            dir.path(),
            sim_addr,
        ),
    )?;
    let mut gateway = GatewayProc::start(&config)?;
    let api = ingest.api();
    wait_for("points stored", Duration::from_secs(20), || async {
        Ok((api.points(GW, DEV, "counter").await?.len() > 30).then_some(()))
    })
    .await
    .with_context(|| format!("{}{}", gateway.proc.logs(), ingest.proc.logs()))?;

    // The gateway stops (what it has not sent stays in its buffer), the
    // database is dumped, lost, and restored from the dump.
    gateway.proc.terminate(Duration::from_secs(10));
    let dump = dir.path().join("guantong.dump");
    let out = Command::new("pg_dump")
        .args(["--format=custom", "--file"])
        .arg(&dump)
        .arg(&db.url)
        .output()?;
    ensure!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ingest.proc.kill9();
    db.drop_now()?;
    guantong_e2e::pg::psql(
        &std::env::var("GUANTONG_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        &format!("CREATE DATABASE {}", db.name),
    )?;
    let out = Command::new("pg_restore")
        .args(["--no-owner", "--exit-on-error", "--dbname"])
        .arg(&db.url)
        .arg(&dump)
        .output()?;
    ensure!(
        out.status.success(),
        "pg_restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verified = ingest_cli(&["verify-chain", "--database", &db.url])?;
    ensure!(
        verified.contains(GW),
        "verify-chain reports the gateway: {verified}"
    );

    let mut ingest = IngestProc::start_with_args(&data, ingest.grpc, ingest.http, &serve).await?;
    let mut gateway = GatewayProc::start(&config)?;
    sim.set_fault(false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let api = ingest.api();
    let (points, last) = settle(&sim, &api).await?;
    check_counter(&points, last, 0, true)
        .map_err(|e| anyhow::anyhow!("{e}\n{}{}", gateway.proc.logs(), ingest.proc.logs()))?;
    ingest_cli(&["verify-chain", "--database", &db.url])?;
    gateway.proc.terminate(Duration::from_secs(10));
    ingest.proc.terminate(Duration::from_secs(10));
    Ok(())
}

/// A report without what depends on the moment it was asked: when it was
/// computed, the samples expected until then (and what follows from them:
/// completeness, verdicts) and the gap still open at that moment.
fn timeless(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for key in ["generated_at_ms", "expected", "completeness", "verdict"] {
                m.remove(key);
            }
            if let Some(serde_json::Value::Array(gaps)) = m.get_mut("gaps") {
                gaps.pop();
            }
            m.values_mut().for_each(timeless);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(timeless),
        _ => {}
    }
}

/// `serve --retention` on a store with points of a day 40 days ago: the
/// day's partition is dropped at start (the hourly pass runs first thing),
/// its points are no longer served, today's stay, and `verify-chain` still
/// passes. Without `--database` the option is refused, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_expired_days_of_points_when_serving() -> anyhow::Result<()> {
    const GW_OLD: &str = "gw-old";
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let data_s = data.to_str().context("utf-8")?;
    let refused = ingest_cli(&["serve", "--data", data_s, "--retention", "30d"])
        .err()
        .context("--retention without a database is refused")?;
    ensure!(
        format!("{refused:#}").contains("--retention needs --database"),
        "{refused:#}"
    );

    let db = TestDb::create("retention")?;
    ingest_cli(&["migrate", "--database", &db.url])?;
    let token = ingest_cli(&[
        "register-gateway",
        "--database",
        &db.url,
        "--data",
        data_s,
        GW_OLD,
    ])?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let old = now - 40 * 86_400_000;
    let serve = ["--database", db.url.as_str()];
    let mut ingest = IngestProc::start_with_args(&data, any_port(), any_port(), &serve).await?;
    let Ok(mut stream) = attempt(ingest.grpc, None, GW_OLD, &token, GW_OLD).await else {
        bail!("no stream: {}", ingest.proc.logs());
    };
    stream.send(Up::Manifest(manifest(GW_OLD))).await?;
    for (seq, base) in [(1, old), (2, now - 60_000)] {
        stream
            .send(Up::Batch(unsigned(batch_at(0xA11CE, seq, base, 5))))
            .await?;
        ensure!(
            matches!(stream.next().await?, Down::Ack(_)),
            "batch {seq} acknowledged"
        );
    }
    drop(stream);
    let points = |api: guantong_e2e::procs::Api, from: i64, to: i64| async move {
        let v = api
            .get(&format!(
                "/api/v1/points?gateway={GW_OLD}&device=dev&tag=x&from={from}&to={to}"
            ))
            .await?;
        anyhow::Ok(v["points"].as_array().map_or(0, Vec::len))
    };
    ensure!(
        points(ingest.api(), old - 1, old + 1_000).await? == 5,
        "the old points are stored"
    );
    let partition = || -> anyhow::Result<u64> {
        Ok(guantong_e2e::pg::psql(
            &db.url,
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'points'::regclass",
        )?
        .parse()?)
    };
    let before = partition()?;
    ingest.proc.terminate(Duration::from_secs(10));

    let retention = ["--database", db.url.as_str(), "--retention", "30d"];
    let ingest = IngestProc::start_with_args(&data, any_port(), any_port(), &retention).await?;
    wait_for(
        "the expired day dropped",
        Duration::from_secs(30),
        || async { Ok((points(ingest.api(), old - 1, old + 1_000).await? == 0).then_some(())) },
    )
    .await
    .with_context(|| ingest.proc.logs())?;
    ensure!(partition()? == before - 1, "one whole partition dropped");
    ensure!(
        points(ingest.api(), now - 61_000, now).await? == 5,
        "today's points stay"
    );
    // Exits non-zero on any disagreement of rollups, points and batches.
    ingest_cli(&["verify-chain", "--database", &db.url]).with_context(|| ingest.proc.logs())?;
    Ok(())
}

/// Gives the data directory `to` the operator CA of `from`, as the README
/// says to before a replica's first start.
fn share_ca(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to.join("tls"))?;
    for file in ["ca.pem", "ca.key"] {
        std::fs::copy(from.join("tls").join(file), to.join("tls").join(file))?;
    }
    Ok(())
}

/// A certificate revoked with `ca revoke --database` is refused by every
/// replica at its next stream, though neither data directory lists it; `ca
/// list --database` shows it revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_in_the_database_is_refused_by_every_replica() -> anyhow::Result<()> {
    const GW_REV: &str = "gw-rev";
    let db = TestDb::create("revoke")?;
    ingest_cli(&["migrate", "--database", &db.url])?;
    let dir = tempfile::tempdir()?;
    let data = [dir.path().join("ingest-a"), dir.path().join("ingest-b")];
    let data_s = [
        data[0].to_str().context("utf-8")?,
        data[1].to_str().context("utf-8")?,
    ];
    let token = ingest_cli(&[
        "register-gateway",
        "--database",
        &db.url,
        "--data",
        data_s[0],
        GW_REV,
    ])?;
    ingest_cli(&["ca", "init", "--data", data_s[0]])?;
    share_ca(&data[0], &data[1])?;
    let (identity, serial) = issue_certificate(&data[0], GW_REV, &dir.path().join("certs"), "30d")?;
    let serve = ["--database", db.url.as_str(), "--mtls"];
    let replicas = [
        IngestProc::start_with_args(&data[0], any_port(), any_port(), &serve).await?,
        IngestProc::start_with_args(&data[1], any_port(), any_port(), &serve).await?,
    ];
    for r in &replicas {
        if let Err(e) = attempt(r.grpc, Some(identity.clone()), GW_REV, &token, GW_REV).await {
            bail!(
                "the issued certificate is refused before revocation: {e}\n{}",
                r.proc.logs()
            );
        }
    }
    ingest_cli(&[
        "ca",
        "revoke",
        "--data",
        data_s[0],
        "--database",
        &db.url,
        &serial,
    ])?;
    for r in &replicas {
        match attempt(r.grpc, Some(identity.clone()), GW_REV, &token, GW_REV).await {
            Ok(_) => bail!("replica {} still takes the revoked certificate", r.grpc),
            Err(e) => ensure!(e.contains("is revoked"), "refused for another reason: {e}"),
        }
    }
    for d in &data {
        ensure!(
            !d.join("tls/revoked.tsv").exists(),
            "the revocation went to a data directory, not the database"
        );
    }
    let state = |list: &str| {
        list.lines()
            .find(|l| l.starts_with(serial.as_str()))
            .and_then(|l| l.rsplit('\t').next())
            .map(str::to_string)
    };
    let shared = ingest_cli(&["ca", "list", "--data", data_s[0], "--database", &db.url])?;
    ensure!(state(&shared).as_deref() == Some("revoked"), "{shared}");
    let local = ingest_cli(&["ca", "list", "--data", data_s[0]])?;
    ensure!(state(&local).as_deref() == Some("valid"), "{local}");
    Ok(())
}

/// Which replica the gateway streams to now (its fleet row is online there).
async fn connected_to(replicas: &[IngestProc]) -> Option<usize> {
    for (i, r) in replicas.iter().enumerate() {
        let Ok(fleet) = r.api().get("/api/v1/gateways").await else {
            continue;
        };
        let online = fleet["gateways"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["id"] == GW))
            .is_some_and(|g| g["online"] == true);
        if online {
            return Some(i);
        }
    }
    None
}

/// Two replicas on one database; the gateway lists both. The replica it
/// streams to is SIGKILLed mid-stream, four times, and started again: the
/// gateway fails over each time, every counter value is stored once, the
/// chain verifies with no break, and both replicas answer the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_killed_mid_stream_lose_nothing_and_store_nothing_twice() -> anyhow::Result<()> {
    let db = TestDb::create("replicas")?;
    ingest_cli(&["migrate", "--database", &db.url])?;
    let dir = tempfile::tempdir()?;
    let data = [dir.path().join("ingest-a"), dir.path().join("ingest-b")];
    let config = dir.path().join("gateway.toml");
    let sim = SimDevice::new();
    let (sim_addr, _sim_task) = sim.serve(any_port()).await?;
    let token = register(&db, &data[0], &config, dir.path(), sim_addr)?;
    let serve = ["--database", db.url.as_str()];
    let a = IngestProc::start_with_args(&data[0], any_port(), any_port(), &serve).await?;
    // Replica B serves with A's CA (gateways trust one), and the admin
    // account A created in the database.
    share_ca(&data[0], &data[1])?;
    let b = IngestProc::start_with_args(&data[1], any_port(), any_port(), &serve).await?;
    std::fs::copy(data[0].join("admin.token"), data[1].join("admin.token"))?;
    let mut replicas = [a, b];
    let ca = replicas[0].ca_file();
    std::fs::write(
        &config,
        gateway_config(
            &[replicas[0].grpc, replicas[1].grpc],
            &ca,
            &token,
            dir.path(),
            sim_addr,
        ),
    )?;
    let mut gateway = GatewayProc::start(&config)?;
    let logs = |g: &GatewayProc, r: &[IngestProc]| {
        format!("{}{}{}", g.proc.logs(), r[0].proc.logs(), r[1].proc.logs())
    };

    let mut killed = Vec::new();
    for round in 0..4 {
        let before = sim.counter();
        let on = wait_for(
            "the gateway streaming to a replica",
            Duration::from_secs(30),
            || async { Ok(connected_to(&replicas).await) },
        )
        .await
        .with_context(|| logs(&gateway, &replicas))?;
        // Data flowing there before the cut.
        wait_for("new points stored", Duration::from_secs(30), || async {
            let points = replicas[on].api().points(GW, DEV, "counter").await?;
            Ok(points
                .iter()
                .any(|p| p["value"].as_u64() > Some(u64::from(before) + 5))
                .then_some(()))
        })
        .await
        .with_context(|| logs(&gateway, &replicas))?;
        let (grpc, http) = (replicas[on].grpc, replicas[on].http);
        replicas[on].proc.kill9();
        killed.push(on);
        // The other replica takes the gateway while this one is down.
        let other = 1 - on;
        wait_for(
            "the gateway on the other replica",
            Duration::from_secs(30),
            || async {
                Ok((connected_to(&replicas[other..=other]).await == Some(0)).then_some(()))
            },
        )
        .await
        .with_context(|| format!("round {round}\n{}", logs(&gateway, &replicas)))?;
        replicas[on] = IngestProc::start_with_args(&data[on], grpc, http, &serve).await?;
    }
    ensure!(
        killed.contains(&0) && killed.contains(&1),
        "both replicas were killed while streaming: {killed:?}"
    );

    let (points, last) = settle(&sim, &replicas[0].api()).await?;
    check_counter(&points, last, 0, true)
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&gateway, &replicas)))?;
    // The gateway stops; what both replicas answer must not differ.
    gateway.proc.terminate(Duration::from_secs(10));
    let verified = ingest_cli(&["verify-chain", "--database", &db.url])
        .with_context(|| logs(&gateway, &replicas))?;
    ensure!(
        verified.contains("every signature and every link holds"),
        "{verified}"
    );
    for path in ["/api/v1/chain", "/api/v1/losses"] {
        let (x, y) = (
            replicas[0].api().get(path).await?,
            replicas[1].api().get(path).await?,
        );
        ensure!(x == y, "{path} differs between the replicas:\n{x:#}\n{y:#}");
    }
    let chains = replicas[0].api().get("/api/v1/chain").await?;
    for c in chains["chains"].as_array().into_iter().flatten() {
        ensure!(c["breaks"].as_array().is_some_and(|b| b.is_empty()), "{c}");
        ensure!(c["verified_from"] == 1 && c["waiting"] == 0, "{c}");
    }
    // The enterprise's acceptance report, asked from either replica.
    let code = guantong_e2e::city::credit_code(7);
    let store = ["--database", db.url.as_str()];
    ingest_cli(
        &[
            &["enterprise", "add"][..],
            &store,
            &[
                "--code",
                &code,
                "--name",
                "一号厂",
                "--county",
                "鼓楼区",
                "--industry",
                "equipment",
            ],
        ]
        .concat(),
    )?;
    ingest_cli(
        &[
            &["assign-gateway"][..],
            &store,
            &["--enterprise", &code, GW],
        ]
        .concat(),
    )?;
    let report = |r: &IngestProc| {
        let api = r.api();
        let path = format!("/api/v1/enterprises/{code}/report");
        async move {
            let mut v = api.get(&path).await?;
            timeless(&mut v);
            anyhow::Ok(v)
        }
    };
    let (report_a, report_b) = (report(&replicas[0]).await?, report(&replicas[1]).await?);
    ensure!(report_a["devices"].is_array(), "a report: {report_a:#}");
    ensure!(
        report_a == report_b,
        "the report differs between the replicas:\n{report_a:#}\n{report_b:#}"
    );
    let (points_a, points_b) = (
        replicas[0].api().points(GW, DEV, "counter").await?,
        replicas[1].api().points(GW, DEV, "counter").await?,
    );
    ensure!(
        points_a == points_b && points_a.len() >= points.len(),
        "the replicas serve the same points"
    );
    for r in &mut replicas {
        r.proc.terminate(Duration::from_secs(10));
    }
    Ok(())
}
