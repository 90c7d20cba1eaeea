//! Operator commands while ingest serves (issue 14): every read command
//! prints the same through the running server as on the stopped store, the
//! new admin routes refuse other accounts, the dossier route follows the
//! report's reading rule, and an online backup taken under signed load
//! restores to a store whose chains verify.
//!
//! Ingest and the CLI are the real binaries as processes; gateways are
//! played by `guantong_e2e::load` (each its own key, token and TLS stream).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use guantong_e2e::load::{self, Shape};
use guantong_e2e::procs::{IngestProc, binary};
use guantong_ingest::store::rollup::{DAY_MS, day_of};
use reqwest::{Method, StatusCode};
use serde_json::Value;

const A: &str = "91350100M000100Y43";
const B: &str = "91110000802100433B";

/// `guantong-ingest ARGS --data DATA`; (success, stdout, stderr).
fn run(args: &[&str], data: &Path) -> anyhow::Result<(bool, Vec<u8>, String)> {
    let out = Command::new(binary("guantong-ingest")?)
        .args(args)
        .arg("--data")
        .arg(data)
        .output()?;
    Ok((
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `run`, which must succeed; its standard output.
fn cli(args: &[&str], data: &Path) -> anyhow::Result<Vec<u8>> {
    let (ok, stdout, stderr) = run(args, data)?;
    anyhow::ensure!(
        ok,
        "guantong-ingest {args:?} failed: {stderr}\n{}",
        String::from_utf8_lossy(&stdout)
    );
    Ok(stdout)
}

fn cli_text(args: &[&str], data: &Path) -> anyhow::Result<String> {
    Ok(String::from_utf8(cli(args, data)?)?.trim().to_string())
}

/// Two enterprises (A of provider P1, B of P2), gateway `ga` in A and `gb`
/// in B, registered through the running server.
fn registry(data: &Path, ga: &str, gb: &str) -> anyhow::Result<()> {
    for (code, provider) in [(A, "P1"), (B, "P2")] {
        cli(
            &[
                "enterprise",
                "add",
                "--code",
                code,
                "--name",
                "示范企业",
                "--county",
                "鼓楼区",
                "--industry",
                "metallurgy",
                "--provider",
                provider,
            ],
            data,
        )?;
    }
    cli(&["assign-gateway", ga, "--enterprise", A], data)?;
    cli(&["assign-gateway", gb, "--enterprise", B], data)?;
    Ok(())
}

/// What a read command leaves: its standard output, or the files it wrote.
type Outputs = BTreeMap<String, Vec<u8>>;

/// Runs every read command with the same arguments, writing into `out`.
fn read_commands(data: &Path, out: &Path, gateway: &str) -> anyhow::Result<Outputs> {
    std::fs::create_dir_all(out)?;
    let now = guantong_ingest::grpc::now_ms();
    // A past report window: what it shows does not move with the clock.
    let yesterday = guantong_ingest::acceptance::date_of(day_of(now) - DAY_MS);
    let yesterday = yesterday.as_str();
    let today_utc = guantong_ingest::evidence::digest::day_of(now);
    let (from_ms, to_ms) = ((now / DAY_MS - 1) * DAY_MS, (now / DAY_MS + 1) * DAY_MS);
    let (from_ms, to_ms) = (from_ms.to_string(), to_ms.to_string());
    let mut o = Outputs::new();
    o.insert("verify-chain".into(), cli(&["verify-chain"], data)?);
    o.insert(
        "enterprise list".into(),
        cli(&["enterprise", "list"], data)?,
    );
    for (format, part) in [
        ("json", None),
        ("html", None),
        ("csv", Some("devices")),
        ("csv", Some("equipment")),
    ] {
        let mut args: Vec<&str> = vec![
            "report",
            "--enterprise",
            A,
            "--from",
            yesterday,
            "--to",
            yesterday,
            "--format",
            format,
            "--lang",
            "en",
        ];
        args.extend(part.map(|p| ["--part", p]).into_iter().flatten());
        o.insert(format!("report {format} {part:?}"), cli(&args, data)?);
    }
    let city: [&str; 8] = [
        "report", "--city", "--from", yesterday, "--to", yesterday, "--format", "json",
    ];
    o.insert("report city".into(), cli(&city, data)?);
    let dossier = out.join("dossier");
    cli(
        &[
            "dossier",
            "--enterprise",
            A,
            "--from",
            yesterday,
            "--to",
            yesterday,
            "--out",
            &dossier.display().to_string(),
        ],
        data,
    )?;
    for entry in std::fs::read_dir(&dossier)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        o.insert(format!("dossier/{name}"), std::fs::read(entry.path())?);
    }
    let bundle = out.join("bundle.json");
    let bundle_arg = bundle.display().to_string();
    cli(
        &[
            "export-evidence",
            "--enterprise",
            A,
            "--gateway",
            gateway,
            "--from",
            &from_ms,
            "--to",
            &to_ms,
            "--out",
            &bundle_arg,
        ],
        data,
    )?;
    o.insert("export-evidence".into(), std::fs::read(&bundle)?);
    o.insert(
        "digest".into(),
        cli(&["digest", "--day", &today_utc], data)?,
    );
    Ok(o)
}

/// `bytes` without what differs between two runs by their clock alone: the
/// generation times of reports and bundles.
fn normalized(name: &str, bytes: &[u8]) -> String {
    if let Ok(mut v) = serde_json::from_slice::<Value>(bytes) {
        strip_times(&mut v);
        return serde_json::to_string_pretty(&v).unwrap_or_default();
    }
    // HTML shows the generation time as `YYYY-MM-DD HH:MM:SS`.
    let text = String::from_utf8_lossy(bytes);
    if !name.contains("html") {
        return text.into_owned();
    }
    let pattern = |s: &[u8]| {
        s.len() >= 19
            && s[..19].iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                10 => *c == b' ',
                13 | 16 => *c == b':',
                _ => c.is_ascii_digit(),
            })
    };
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if pattern(&b[i..]) {
            out.extend_from_slice(b"<time>");
            i += 19;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn strip_times(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("generated_at_ms");
            m.remove("created_at_ms");
            m.values_mut().for_each(strip_times);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_times),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_command_prints_the_same_while_serving_as_stopped() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let prefix = format!("same{}", std::process::id());
    let shape = Shape {
        gateways: 2,
        tags: 10,
        interval_ms: 1000,
    };
    let (ingests, load) = load::start_with_ingest(work.path(), &prefix, shape, None, 1).await?;
    let mut ingest = ingests.into_iter().next().context("ingest")?;
    let data = ingest.data.clone();
    let (ga, gb) = (load::gateway_id(&prefix, 0), load::gateway_id(&prefix, 1));
    registry(&data, &ga, &gb)?;
    load::wait_acked(&load, &mut ingest, 100).await?;
    load.stop_producing();
    anyhow::ensure!(
        load.wait_drained(Duration::from_secs(60)).await,
        "not drained: {:?}",
        load.totals()
    );
    load.stop().await?;

    let serving = read_commands(&data, &work.path().join("serving"), &gb)?;
    anyhow::ensure!(ingest.proc.is_running(), "{}", ingest.proc.logs());
    ingest.proc.terminate(Duration::from_secs(10));
    let stopped = read_commands(&data, &work.path().join("stopped"), &gb)?;

    assert_eq!(
        serving.keys().collect::<Vec<_>>(),
        stopped.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &serving {
        let (a, b) = (normalized(name, bytes), normalized(name, &stopped[name]));
        assert!(
            a == b,
            "`{name}` differs while serving:\n{a}\n--- stopped:\n{b}"
        );
    }
    // Not the same by being empty: the commands saw the load.
    let chains = String::from_utf8_lossy(&serving["verify-chain"]).into_owned();
    assert_eq!(
        chains
            .matches("verified: every signature and every link holds")
            .count(),
        2,
        "{chains}"
    );
    let bundle: Value = serde_json::from_slice(&serving["export-evidence"])?;
    assert_eq!(bundle["gateways"].as_array().map(Vec::len), Some(2));
    let digests: Value = serde_json::from_slice(&serving["digest"])?;
    assert_eq!(digests["digests"].as_array().map(Vec::len), Some(2));
    assert!(serving.contains_key("dossier/evidence-bundle.json"));
    assert!(String::from_utf8_lossy(&serving["enterprise list"]).contains(B));
    Ok(())
}

/// `method path` on the server with `token`; status and body bytes.
async fn call(
    ingest: &IngestProc,
    token: Option<&str>,
    method: Method,
    path: &str,
) -> anyhow::Result<(StatusCode, Vec<u8>)> {
    let mut req = reqwest::Client::new().request(method, format!("http://{}{path}", ingest.http));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await?;
    Ok((resp.status(), resp.bytes().await?.to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_routes_answer_admin_and_the_dossier_its_readers_only() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let data = work.path().join("data");
    let any = "127.0.0.1:0".parse()?;
    let ingest = IngestProc::start(&data, any, any).await?;
    cli(&["register-gateway", "ga"], &data)?;
    cli(&["register-gateway", "gb"], &data)?;
    registry(&data, "ga", "gb")?;
    let admin = ingest.admin_token()?;
    let p1 = cli_text(
        &[
            "add-account",
            "p1",
            "--role",
            "provider",
            "--provider",
            "P1",
        ],
        &data,
    )?;
    let rb = cli_text(
        &["add-account", "rb", "--role", "reviewer", "--enterprise", B],
        &data,
    )?;
    let dossier = |code: &str| format!("/api/v1/enterprises/{code}/dossier");

    // Who may read which dossier: as the report.
    for (who, token, code, allowed) in [
        ("admin", &admin, A, true),
        ("admin", &admin, B, true),
        ("provider of A", &p1, A, true),
        ("provider of A", &p1, B, false),
        ("reviewer of B", &rb, B, true),
        ("reviewer of B", &rb, A, false),
    ] {
        let (status, body) =
            call(&ingest, Some(token.as_str()), Method::GET, &dossier(code)).await?;
        if allowed {
            assert_eq!(status, StatusCode::OK, "{who} reads the dossier of {code}");
            let files =
                guantong_ingest::dossier::unzip(&body, "answer").map_err(anyhow::Error::msg)?;
            let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
            for name in [
                "report-zh.html",
                "evidence-bundle.json",
                "digests.json",
                "VERIFY.txt",
            ] {
                assert!(names.contains(&name), "{who}, {code}: {names:?}");
            }
        } else {
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "{who} reads the dossier of {code}: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    let (status, _) = call(&ingest, None, Method::GET, &dossier(A)).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The operator routes: admin only.
    let evidence = format!("/api/v1/evidence?enterprise={A}&from=0&to=1");
    for (method, path) in [
        (Method::GET, "/api/v1/verify-chain"),
        (Method::GET, evidence.as_str()),
        (Method::POST, "/api/v1/backup"),
    ] {
        for (who, token) in [("provider", &p1), ("reviewer", &rb)] {
            let (status, body) = call(&ingest, Some(token.as_str()), method.clone(), path).await?;
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{who} {method} {path}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let (status, _) = call(&ingest, None, method.clone(), path).await?;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{method} {path} without a token"
        );
        let (status, body) = call(&ingest, Some(&admin), method.clone(), path).await?;
        assert_eq!(
            status,
            StatusCode::OK,
            "admin {method} {path}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

/// Replaces the store file of `data` with `backup` (ingest stopped).
fn restore(data: &Path, backup: &Path) -> anyhow::Result<PathBuf> {
    let file = data.join("ingest.redb");
    std::fs::copy(backup, &file)?;
    Ok(file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_signed_load_restores_to_a_store_that_verifies() -> anyhow::Result<()>
{
    let work = tempfile::tempdir()?;
    let prefix = format!("bak{}", std::process::id());
    let shape = Shape {
        gateways: 4,
        tags: 50,
        interval_ms: 1000,
    };
    let (ingests, load) = load::start_with_ingest(work.path(), &prefix, shape, None, 1).await?;
    let mut ingest = ingests.into_iter().next().context("ingest")?;
    let data = ingest.data.clone();
    load::wait_acked(&load, &mut ingest, 1).await?;
    // Two copies while batches are being written; the second is restored.
    // It holds every point acknowledged before it began and none committed
    // by the gateways after it ended (acks of stored batches may still be on
    // their way then).
    let backup = work.path().join("backup.redb");
    let (mut acked_before_backup, mut committed_after_backup) = (0, 0);
    for name in ["first.redb", "backup.redb"] {
        let acked = load.totals().acked;
        load::wait_acked(&load, &mut ingest, acked + 1).await?;
        let out = work.path().join(name);
        acked_before_backup = load.totals().acked;
        cli(&["backup", "--out", &out.display().to_string()], &data)?;
        committed_after_backup = load.totals().committed;
    }
    // A file that exists is not overwritten.
    let (ok, _, stderr) = run(&["backup", "--out", &backup.display().to_string()], &data)?;
    assert!(!ok && stderr.contains("exists"), "{stderr}");
    let committed = load.totals().committed;
    load::wait_acked(&load, &mut ingest, committed + 1).await?;
    load.stop().await?;
    ingest.proc.terminate(Duration::from_secs(10));

    // Restore: stop (done), replace the data file, start; verify while serving.
    restore(&data, &backup)?;
    let any = "127.0.0.1:0".parse()?;
    let mut ingest = IngestProc::start(&data, any, any).await?;
    let report = cli_text(&["verify-chain"], &data)?;
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
    // What the copy holds: points of every gateway, within the bounds above.
    let summary = ingest.api().get("/api/v1/summary").await?;
    let mut stored = 0;
    let mut gateways = 0;
    for g in summary["gateways"].as_array().into_iter().flatten() {
        gateways += 1;
        for d in g["devices"].as_array().into_iter().flatten() {
            for t in d["tags"].as_array().into_iter().flatten() {
                stored += t["samples"].as_u64().unwrap_or(0);
            }
        }
    }
    assert_eq!(gateways, shape.gateways, "{summary}");
    assert!(
        stored > 0 && (acked_before_backup..=committed_after_backup).contains(&stored),
        "the copy holds {stored} points; {acked_before_backup} were acknowledged before it \
         began, {committed_after_backup} committed by the gateways when it ended"
    );
    ingest.proc.terminate(Duration::from_secs(10));

    // A copy of the stopped store is made locally; it and the first online
    // copy verify too.
    let local = work.path().join("local.redb");
    cli(&["backup", "--out", &local.display().to_string()], &data)?;
    for copy in [local, work.path().join("first.redb")] {
        restore(&data, &copy)?;
        let report = cli_text(&["verify-chain"], &data)?;
        assert!(
            !report.contains("BREAK") && !report.contains("QUERY TABLES"),
            "{}: {report}",
            copy.display()
        );
    }
    Ok(())
}
