//! The HTTP API under load and when nothing changed, against the real
//! `guantong-ingest` over real sockets: slow and hung requests meet the
//! concurrency limit and the timeout (503 and 408 in the one JSON error
//! shape) while the server stays up; a report and the city view asked
//! twice are computed once, until a batch arrives.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use guantong_e2e::procs::IngestProc;
use guantong_e2e::raw::{Signer, batch_bytes, manifest, session};
use guantong_proto::v1::gateway_message::Kind as Up;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

/// Ingest serving with `extra` options and a metrics listener.
async fn ingest_with(
    dir: &tempfile::TempDir,
    extra: &[&str],
) -> anyhow::Result<(IngestProc, SocketAddr)> {
    let data = dir.path().join("ingest");
    let mut args = vec!["--metrics-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let ingest = IngestProc::start_with_args(&data, any(), any(), &args).await?;
    let ports: Value =
        serde_json::from_str(&std::fs::read_to_string(data.with_extension("ports.json"))?)?;
    let metrics = ports["metrics"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no metrics address: {ports}"))?
        .parse()?;
    Ok((ingest, metrics))
}

/// The value of counter `name` (without `_total`) at ingest's metrics.
async fn counter(metrics: SocketAddr, name: &str) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await?
        .text()
        .await?;
    let line = format!("{name}_total ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| anyhow::anyhow!("no {name}_total in\n{text}"))
}

/// A request that never finishes its body: the handler waits for it.
async fn hung_post(http: SocketAddr, token: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(http).await?;
    s.write_all(
        format!(
            "POST /api/v1/enterprises HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"code\":"
        )
        .as_bytes(),
    )
    .await?;
    Ok(s)
}

/// The status and body of the answer on `s` (read until the body is in).
async fn answer(s: &mut TcpStream, within: Duration) -> anyhow::Result<(u16, String)> {
    let mut buf = Vec::new();
    let deadline = Instant::now() + within;
    loop {
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, s.read(&mut chunk))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "no complete answer within {within:?}: {:?}",
                    String::from_utf8_lossy(&buf)
                )
            })??;
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= length || n == 0 {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                return Ok((status, body.to_string()));
            }
        }
        if n == 0 {
            anyhow::bail!("connection closed: {text:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_requests_fill_the_limit_the_rest_get_503_then_408_frees_it() -> anyhow::Result<()> {
    const LIMIT: usize = 4;
    let dir = tempfile::tempdir()?;
    let (ingest, metrics) = ingest_with(
        &dir,
        &["--http-max-concurrent", "4", "--http-timeout", "3s"],
    )
    .await?;
    let token = ingest.admin_token()?;
    let api = ingest.api();
    let client = reqwest::Client::new();
    let chain_url = format!("http://{}/api/v1/chain", ingest.http);

    // LIMIT requests that hang while reading their bodies hold every slot.
    let started = Instant::now();
    let mut hung = Vec::new();
    for _ in 0..LIMIT {
        hung.push(hung_post(ingest.http, &token).await?);
    }
    // Once they are all in, one more (hung or not) is refused at once. A
    // hung request the server reaches after a probe is itself refused (the
    // probe held a slot): it is sent again. All before the 3 s timeout.
    let mut full = false;
    while !full && started.elapsed() < Duration::from_millis(2500) {
        for s in &mut hung {
            if let Ok((503, _)) = answer(s, Duration::from_millis(1)).await {
                *s = hung_post(ingest.http, &token).await?;
            }
        }
        let (status, _) = api
            .send(reqwest::Method::GET, "/api/v1/chain", None)
            .await?;
        full = status == StatusCode::SERVICE_UNAVAILABLE;
    }
    assert!(full, "the limit of {LIMIT} never filled");
    let mut extra = hung_post(ingest.http, &token).await?;
    let (status, body) = answer(&mut extra, Duration::from_secs(1)).await?;
    assert_eq!(status, 503, "a hung request beyond the limit: {body}");

    // Many requests at once while full: each refused at once, none queued.
    let t = Instant::now();
    let burst = (0..40).map(|_| {
        let req = client.get(&chain_url).bearer_auth(&token).send();
        async move {
            let r = req.await?;
            let retry = r.headers().get("retry-after").cloned();
            let status = r.status();
            let body: Value = r.json().await?;
            anyhow::Ok((status, retry, body))
        }
    });
    let answers = futures_join(burst).await?;
    let burst_took = t.elapsed();
    for (status, retry, body) in &answers {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(retry.is_some(), "503 says when to retry");
        let e = body["error"].as_str().unwrap_or_default();
        assert!(e.contains("--http-max-concurrent"), "{body}");
    }
    assert!(
        burst_took < Duration::from_secs(2),
        "refusals are immediate, not queued: {burst_took:?}"
    );
    // The health check is outside the limit.
    let health = client
        .get(format!("http://{}/healthz", ingest.http))
        .send()
        .await?;
    assert_eq!(health.status(), StatusCode::OK);

    // The hung requests end at the timeout with 408 in the JSON error shape.
    for s in &mut hung {
        let (status, body) = answer(s, Duration::from_secs(10)).await?;
        assert_eq!(status, 408, "{body}");
        let v: Value = serde_json::from_str(&body)?;
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("--http-timeout")),
            "{body}"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "not before the timeout"
    );
    // Their slots are free again: the server answers as before.
    let v = api.get("/api/v1/chain").await?;
    assert!(v["chains"].is_array(), "{v}");
    assert!(counter(metrics, "guantong_ingest_http_refused").await? >= 41);
    assert_eq!(
        counter(metrics, "guantong_ingest_http_timed_out").await?,
        LIMIT as u64
    );
    Ok(())
}

/// Runs the futures concurrently; their results in order.
async fn futures_join<T: Send + 'static>(
    futures: impl Iterator<Item = impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static>,
) -> anyhow::Result<Vec<T>> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await??);
    }
    Ok(out)
}

const GW: &str = "gw-cache";
const CODE: &str = "91350100M000100Y43";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_and_the_city_view_are_computed_once_until_a_batch_arrives() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let mut signer = Signer::new(7, GW, 1);
    let key = signer.public_key();
    let token = IngestProc::register_with_key(&data, GW, Some(&hex::encode(&key)))?;
    let (ingest, metrics) = ingest_with(&dir, &[]).await?;
    let api = ingest.api();
    let enterprise = serde_json::json!({
        "code": CODE, "name": "甲公司", "county": "示范区",
        "industry": "light", "provider": "prov-a",
    });
    let (status, body) = api
        .send(
            reqwest::Method::POST,
            "/api/v1/enterprises",
            Some(enterprise.to_string()),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = api
        .send(
            reqwest::Method::PUT,
            &format!("/api/v1/gateways/{GW}/enterprise"),
            Some(serde_json::json!({ "enterprise": CODE }).to_string()),
        )
        .await?;
    assert!(status.is_success(), "{body}");
    session(
        ingest.grpc,
        GW,
        &token,
        1,
        key.clone(),
        vec![
            Up::Manifest(manifest(GW)),
            Up::Batch(signer.link(batch_bytes(1, 1))),
        ],
    )
    .await?;

    let report = format!("/api/v1/enterprises/{CODE}/report");
    let computed = || counter(metrics, "guantong_ingest_reports_computed");
    let cached = || counter(metrics, "guantong_ingest_reports_cached");
    let (c0, h0) = (computed().await?, cached().await?);
    let first = api.get(&report).await?;
    assert_eq!(computed().await?, c0 + 1, "the first report is computed");
    let again = api.get(&report).await?;
    let (status, csv) = api
        .send(reqwest::Method::GET, &format!("{report}?format=csv"), None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{csv}");
    assert_eq!(
        (computed().await?, cached().await?),
        (c0 + 1, h0 + 2),
        "asked again (in JSON and CSV) with nothing changed, it is served as computed"
    );
    assert_eq!(first, again);
    let batches = |r: &Value| r["gateways"][0]["batches"].as_u64();
    assert!(batches(&first).is_some_and(|b| b > 0), "{first}");

    let city = api.get("/api/v1/city").await?;
    api.get("/api/v1/city").await?;
    assert_eq!(
        (computed().await?, cached().await?),
        (c0 + 2, h0 + 3),
        "the city view likewise"
    );
    assert_eq!(city["rows"].as_array().map(Vec::len), Some(1), "{city}");
    // Another window is another entry.
    api.get(&format!("{report}?from=2026-01-01&to=2026-01-31"))
        .await?;
    assert_eq!(computed().await?, c0 + 3);

    // A new batch makes both stale.
    session(
        ingest.grpc,
        GW,
        &token,
        1,
        key,
        vec![Up::Batch(signer.link(batch_bytes(1, 2)))],
    )
    .await?;
    let after = api.get(&report).await?;
    assert_eq!(computed().await?, c0 + 4, "recomputed after the batch");
    assert_eq!(
        batches(&after),
        batches(&first).map(|b| b + 1),
        "with the new batch: {after}"
    );
    api.get("/api/v1/city").await?;
    assert_eq!(computed().await?, c0 + 5);
    api.get(&report).await?;
    assert_eq!(
        computed().await?,
        c0 + 5,
        "and then served again as computed"
    );
    Ok(())
}
