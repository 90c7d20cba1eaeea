//! Security end to end, against the real `guantong-ingest` and
//! `guantong-gateway` binaries: TLS and mutual TLS on the uplink, issued,
//! revoked and expired certificates, tokens (wrong, another gateway's,
//! rotated), per-gateway quotas, message size limits, validation of points,
//! the HTTP API over TLS and behind a proxy, and secret files.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use guantong_e2e::procs::{
    GatewayProc, IngestProc, binary, gateway_toml, ingest_cli, issue_certificate, wait_for,
};
use guantong_e2e::raw::{RawStream, attempt, batch_at, manifest, unsigned};
use guantong_e2e::sim::{SimDevice, standard_device_toml};
use guantong_proto::v1::gateway_message::Kind as Up;
use guantong_proto::v1::ingest_message::Kind as Down;
use guantong_proto::v1::point;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEV: &str = "meter";

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_by_default_refuses_plaintext_clients_and_untrusted_servers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let token = IngestProc::register(&data, "gw")?;
    let ingest = IngestProc::start(&data, any_port(), any_port()).await?;
    assert!(ingest.ca_file().exists(), "serve creates the operator CA");
    attempt(ingest.grpc, None, "gw", &token, "gw")
        .await
        .map_err(|e| anyhow::anyhow!("a TLS client trusting the CA is served: {e}"))?;

    // A client speaking plaintext to the TLS port gets nothing.
    let plain = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", ingest.grpc))?
            .connect()
            .await?;
        RawStream::open(channel, "gw", &token, "gw", 1)
            .await
            .map_err(anyhow::Error::from)
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(15), plain)
            .await
            .map_or(true, |r| r.is_err()),
        "a plaintext client must not get a stream"
    );

    // A gateway that trusts another CA refuses ingest's certificate.
    let other = dir.path().join("other");
    ingest_cli(&["ca", "init", "--data", other.to_str().expect("utf-8")])?;
    let config = dir.path().join("gw.toml");
    let text = gateway_toml("gw", ingest.grpc, &token, &dir.path().join("buffer")).replace(
        &ingest.ca_file().display().to_string(),
        &other.join("tls/ca.pem").display().to_string(),
    );
    std::fs::write(&config, text)?;
    let gateway = GatewayProc::start(&config)?;
    wait_for(
        "the gateway to refuse the certificate",
        Duration::from_secs(20),
        || async {
            let log = std::fs::read_to_string(config.with_extension("log")).unwrap_or_default();
            Ok(log.contains("invalid peer certificate").then_some(()))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", gateway.proc.logs()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_takes_issued_certificates_and_refuses_missing_foreign_revoked_and_expired()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let token_a = IngestProc::register(&data, "gw-a")?;
    let token_b = IngestProc::register(&data, "gw-b")?;
    let data_s = data.to_str().expect("utf-8");
    ingest_cli(&["ca", "init", "--data", data_s])?;
    let certs = dir.path().join("certs");
    let (cert_a, serial_a) = issue_certificate(&data, "gw-a", &certs, "30d")?;
    let (cert_b, _) = issue_certificate(&data, "gw-b", &certs.join("b"), "30d")?;
    let short = dir.path().join("short");
    let (cert_short, _) = issue_certificate(&data, "gw-b", &short, "3s")?;
    let issued_at = Instant::now();
    let mode = std::fs::metadata(certs.join("gw-a.key"))?.permissions();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.mode() & 0o777, 0o600, "issued keys are owner-only");

    let ingest = IngestProc::start_with_args(&data, any_port(), any_port(), &["--mtls"]).await?;
    let grpc = ingest.grpc;

    let mut ok = attempt(grpc, Some(cert_a.clone()), "gw-a", &token_a, "gw-a")
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "an issued certificate is accepted: {e}\n{}",
                ingest.proc.logs()
            )
        })?;
    ok.send(Up::Manifest(manifest("gw-a"))).await?;
    ok.send(Up::Batch(unsigned(batch_at(0xA11CE, 1, now_ms(), 5))))
        .await?;
    assert!(matches!(ok.next().await?, Down::Ack(_)));

    let none = attempt(grpc, None, "gw-a", &token_a, "gw-a").await;
    assert!(none.is_err(), "a gateway without a certificate is refused");

    let foreign = attempt(grpc, Some(cert_b.clone()), "gw-a", &token_a, "gw-a").await;
    let e = foreign
        .err()
        .expect("another gateway's certificate is refused");
    assert!(e.contains("issued to `gw-b`, not to `gw-a`"), "{e}");
    // Its own certificate and token, but claiming gw-a in Hello.
    let claim = attempt(grpc, Some(cert_b.clone()), "gw-b", &token_b, "gw-a").await;
    let e = claim
        .err()
        .expect("Hello naming another gateway is refused");
    assert!(e.starts_with("PermissionDenied"), "{e}");

    // Revoked while ingest runs: refused at the next connection.
    let out = Command::new(binary("guantong-ingest")?)
        .args(["ca", "revoke", "--data", data_s, &serial_a])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked = attempt(grpc, Some(cert_a), "gw-a", &token_a, "gw-a").await;
    let e = revoked.err().expect("a revoked certificate is refused");
    assert!(e.contains("revoked"), "{e}");

    // Expired: refused in the handshake.
    let valid = attempt(grpc, Some(cert_short.clone()), "gw-b", &token_b, "gw-b").await;
    assert!(
        valid.is_ok() || issued_at.elapsed() > Duration::from_secs(3),
        "{valid:?}",
        valid = valid.err()
    );
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(issued_at.elapsed())).await;
    let expired = attempt(grpc, Some(cert_short), "gw-b", &token_b, "gw-b").await;
    assert!(expired.is_err(), "an expired certificate is refused");

    // A real gateway with its certificate files delivers over mutual TLS.
    let sim = SimDevice::new();
    let (sim_addr, _task) = sim.serve(any_port()).await?;
    let config = dir.path().join("gw-b.toml");
    let text = gateway_toml("gw-b", grpc, &token_b, &dir.path().join("buffer")).replace(
        "token = ",
        &format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\ntoken = ",
            certs.join("b/gw-b.pem").display(),
            certs.join("b/gw-b.key").display()
        ),
    ) + &standard_device_toml(DEV, sim_addr, "100ms");
    std::fs::write(&config, text)?;
    let gateway = GatewayProc::start(&config)?;
    let api = ingest.api();
    wait_for(
        "gw-b's data over mutual TLS",
        Duration::from_secs(30),
        || async { Ok(api.tag("gw-b", DEV, "counter").await?.map(|_| ())) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}{}", gateway.proc.logs(), ingest.proc.logs()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_and_other_gateways_ids_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let token_a = IngestProc::register(&data, "gw-a")?;
    IngestProc::register(&data, "gw-b")?;
    let ingest = IngestProc::start(&data, any_port(), any_port()).await?;
    let wrong = attempt(ingest.grpc, None, "gw-a", "gt_wrong", "gw-a").await;
    assert!(wrong.err().expect("refused").starts_with("Unauthenticated"));
    let header = attempt(ingest.grpc, None, "gw-b", &token_a, "gw-b").await;
    assert!(
        header
            .err()
            .expect("refused")
            .starts_with("Unauthenticated"),
        "gw-a's token does not open gw-b's stream"
    );
    let hello = attempt(ingest.grpc, None, "gw-a", &token_a, "gw-b").await;
    let e = hello.err().expect("refused");
    assert!(
        e.contains("authenticated as `gw-a` but Hello names `gw-b`"),
        "{e}"
    );
    // A manifest naming another gateway ends the stream.
    let mut s = attempt(ingest.grpc, None, "gw-a", &token_a, "gw-a")
        .await
        .map_err(anyhow::Error::msg)?;
    s.send(Up::Manifest(manifest("gw-b"))).await?;
    let e = s.next().await.expect_err("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_keeps_the_old_one_for_its_grace_and_no_buffered_data_is_lost()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sim = SimDevice::new();
    let (sim_addr, _task) = sim.serve(any_port()).await?;
    let data = dir.path().join("ingest");
    let data_s = data.to_str().expect("utf-8");
    let old = IngestProc::register(&data, "gw")?;
    let mut ingest = IngestProc::start(&data, any_port(), any_port()).await?;

    // The gateway reads its token from a file.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &old)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
    let config = dir.path().join("gw.toml");
    let text = gateway_toml("gw", ingest.grpc, "unused", &dir.path().join("buffer")).replace(
        "token = \"unused\"",
        &format!("token_file = \"{}\"", token_file.display()),
    ) + &standard_device_toml(DEV, sim_addr, "100ms");
    std::fs::write(&config, text)?;
    let mut gateway = GatewayProc::start(&config)?;
    let api = ingest.api();
    wait_for("first data", Duration::from_secs(30), || async {
        Ok(api.tag("gw", DEV, "counter").await?.map(|_| ()))
    })
    .await?;

    // Rotate with a grace period: the old token still works.
    ingest.proc.terminate(Duration::from_secs(5));
    let new = ingest_cli(&[
        "rotate-gateway-token",
        "--data",
        data_s,
        "gw",
        "--grace",
        "1h",
    ])?;
    let new = new.trim().to_string();
    ingest.restart().await?;
    attempt(ingest.grpc, None, "gw", &old, "gw")
        .await
        .map_err(|e| anyhow::anyhow!("old token within its grace: {e}"))?;
    attempt(ingest.grpc, None, "gw", &new, "gw")
        .await
        .map_err(|e| anyhow::anyhow!("new token: {e}"))?;

    // Rotate again with no grace: the gateway (still on the first token,
    // now two rotations old) is refused and keeps buffering.
    ingest.proc.terminate(Duration::from_secs(5));
    let newest = ingest_cli(&[
        "rotate-gateway-token",
        "--data",
        data_s,
        "gw",
        "--grace",
        "0s",
    ])?;
    let newest = newest.trim().to_string();
    ingest.restart().await?;
    let refused = attempt(ingest.grpc, None, "gw", &old, "gw").await;
    assert!(refused.is_err(), "a token two rotations old is refused");
    let refused = attempt(ingest.grpc, None, "gw", &new, "gw").await;
    assert!(refused.is_err(), "a rotated token with no grace is refused");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The new token in the file, a restart: everything buffered arrives.
    // SIGTERM, not SIGKILL: a sample polled in the last commit interval
    // before a SIGKILL is lost by design, which is not what this test is about.
    std::fs::write(&token_file, &newest)?;
    gateway.proc.terminate(Duration::from_secs(10));
    gateway = GatewayProc::start(&gateway.config)?;
    let polled = sim.counter();
    let api = ingest.api();
    let points = wait_for("the buffered data", Duration::from_secs(40), || async {
        let points = api.points("gw", DEV, "counter").await?;
        let last = points.last().and_then(|p| p["value"].as_u64()).unwrap_or(0);
        Ok((last >= u64::from(polled)).then_some(points))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}{}", gateway.proc.logs(), ingest.proc.logs()))?;
    let values: Vec<u64> = points.iter().filter_map(|p| p["value"].as_u64()).collect();
    let gaps: Vec<_> = values.windows(2).filter(|w| w[1] != w[0] + 1).collect();
    assert!(
        gaps.is_empty(),
        "counter values skip while the token was rotated: {gaps:?}"
    );
    Ok(())
}

/// Sends one small batch and waits for its ack; returns the round trip.
async fn round_trip(s: &mut RawStream, buffer: u64, seq: u64) -> anyhow::Result<Duration> {
    let t = Instant::now();
    s.send(Up::Batch(unsigned(batch_at(buffer, seq, now_ms(), 10))))
        .await?;
    match s.next().await? {
        Down::Ack(a) if a.batch_seq == seq => Ok(t.elapsed()),
        other => anyhow::bail!("expected the ack of {seq}, got {other:?}"),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_gateway_is_throttled_while_another_keeps_its_latency() -> anyhow::Result<()> {
    const LIMIT: u64 = 20_000;
    const BATCH: usize = 2_000;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let flood_token = IngestProc::register(&data, "flood")?;
    let calm_token = IngestProc::register(&data, "calm")?;
    let limit = LIMIT.to_string();
    let ingest = IngestProc::start_with_args(
        &data,
        any_port(),
        any_port(),
        &["--max-points-per-sec", &limit],
    )
    .await?;

    let mut calm = attempt(ingest.grpc, None, "calm", &calm_token, "calm")
        .await
        .map_err(anyhow::Error::msg)?;
    calm.send(Up::Manifest(manifest("calm"))).await?;
    let mut seq = 0;
    let mut alone = Vec::new();
    for _ in 0..20 {
        seq += 1;
        alone.push(round_trip(&mut calm, 0xA11CE, seq).await?);
    }

    let mut flood = attempt(ingest.grpc, None, "flood", &flood_token, "flood")
        .await
        .map_err(anyhow::Error::msg)?;
    flood.send(Up::Manifest(manifest("flood"))).await?;
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            let (sent, mut next_seq) = (Arc::new(AtomicU64::new(0)), 1u64);
            // Keep 32 batches in flight: as fast as ingest will take them.
            while !stop.load(Ordering::Relaxed) {
                while sent.load(Ordering::Relaxed)
                    < acked.load(Ordering::Relaxed) / BATCH as u64 + 32
                {
                    let payload = batch_at(0xA11CE, next_seq, now_ms(), BATCH);
                    if flood.send(Up::Batch(unsigned(payload))).await.is_err() {
                        return;
                    }
                    next_seq += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                match flood.next().await {
                    Ok(Down::Ack(_)) => {
                        acked.fetch_add(BATCH as u64, Ordering::Relaxed);
                    }
                    _ => return,
                }
            }
        })
    };
    // Past the first second (the bucket starts full), measure both.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (t0, a0) = (Instant::now(), acked.load(Ordering::Relaxed));
    let mut during = Vec::new();
    while t0.elapsed() < Duration::from_secs(4) {
        seq += 1;
        during.push(round_trip(&mut calm, 0xA11CE, seq).await?);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = (acked.load(Ordering::Relaxed) - a0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    flooder.abort();

    let (alone, during) = (median(alone), median(during));
    eprintln!(
        "flood acked {rate:.0} points/s (limit {LIMIT}); calm median round trip {alone:?} alone, {during:?} during the flood"
    );
    assert!(
        rate <= LIMIT as f64 * 1.3,
        "the flooding gateway got {rate:.0} points/s past its limit of {LIMIT}"
    );
    assert!(
        rate >= LIMIT as f64 * 0.5,
        "the flooding gateway is throttled, not cut off: {rate:.0} points/s"
    );
    assert!(
        during <= alone * 3 + Duration::from_millis(50),
        "the calm gateway's latency went from {alone:?} to {during:?} under the flood"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_quota_and_oversized_messages_are_refused_clearly() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let token = IngestProc::register(&data, "gw")?;
    let ingest = IngestProc::start_with_args(
        &data,
        any_port(),
        any_port(),
        &[
            "--max-streams-per-gateway",
            "1",
            "--max-message-bytes",
            "65536",
        ],
    )
    .await?;
    let first = attempt(ingest.grpc, None, "gw", &token, "gw")
        .await
        .map_err(anyhow::Error::msg)?;
    let second = attempt(ingest.grpc, None, "gw", &token, "gw").await;
    let e = second.err().expect("a second stream is refused");
    assert!(
        e.starts_with("ResourceExhausted") && e.contains("open streams (limit 1"),
        "{e}"
    );
    drop(first);
    let mut s = wait_for("the slot to free", Duration::from_secs(10), || async {
        Ok(attempt(ingest.grpc, None, "gw", &token, "gw").await.ok())
    })
    .await?;
    s.send(Up::Manifest(manifest("gw"))).await?;
    s.send(Up::Batch(unsigned(batch_at(0xA11CE, 1, now_ms(), 20_000))))
        .await?;
    let e = s.next().await.expect_err("an oversized message is refused");
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
    assert!(e.message().contains("the limit is: 65536 bytes"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_points_are_rejected_with_a_reason_and_never_stored() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let token = IngestProc::register(&data, "gw")?;
    let ingest = IngestProc::start(&data, any_port(), any_port()).await?;
    let mut s = attempt(ingest.grpc, None, "gw", &token, "gw")
        .await
        .map_err(anyhow::Error::msg)?;
    s.send(Up::Manifest(manifest("gw"))).await?;
    let day = 86_400_000;
    let long_string = {
        let mut b: guantong_proto::v1::Batch =
            prost::Message::decode(batch_at(0xA11CE, 3, now_ms(), 1).as_slice())?;
        b.points[0].value = Some(point::Value::String("x".repeat(100_000)));
        prost::Message::encode_to_vec(&b)
    };
    let unknown_tag = {
        let mut b: guantong_proto::v1::Batch =
            prost::Message::decode(batch_at(0xA11CE, 4, now_ms(), 1).as_slice())?;
        b.points[0].tag = 7;
        prost::Message::encode_to_vec(&b)
    };
    let cases = [
        (
            batch_at(0xA11CE, 1, now_ms() + 30 * day, 1),
            "outside the accepted range",
        ),
        (
            batch_at(0xA11CE, 2, 86_400_000, 1),
            "outside the accepted range",
        ),
        (long_string, "string of 100000 bytes exceeds"),
        (unknown_tag, "refers to tag 7 but the manifest has 1 tags"),
    ];
    for (payload, reason) in cases {
        s.send(Up::Batch(unsigned(payload))).await?;
        match s.next().await? {
            Down::Rejected(r) => assert!(r.reason.contains(reason), "{} lacks {reason}", r.reason),
            other => panic!("expected a rejection ({reason}), got {other:?}"),
        }
    }
    s.send(Up::Batch(unsigned(batch_at(0xA11CE, 5, now_ms(), 3))))
        .await?;
    assert!(
        matches!(s.next().await?, Down::Ack(_)),
        "a valid batch is still taken"
    );
    let points = ingest.api().points("gw", "dev", "x").await?;
    assert_eq!(
        points.len(),
        3,
        "only the valid batch is stored: {points:?}"
    );
    Ok(())
}

/// GET `path` over TLS trusting `ca`, with extra header lines; the response.
async fn https_get(
    addr: SocketAddr,
    ca: &Path,
    path: &str,
    headers: &str,
) -> anyhow::Result<String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_tls_and_believes_forwarded_headers_only_from_trusted_proxies()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    IngestProc::register(&data, "gw")?;
    let ingest =
        IngestProc::start_with_args(&data, any_port(), any_port(), &["--http-tls"]).await?;
    let out = https_get(ingest.http, &ingest.ca_file(), "/api/v1/client", "").await?;
    assert!(out.starts_with("HTTP/1.1 401"), "behind a token: {out}");
    let spoofed = format!(
        "Authorization: Bearer {}\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: http\r\n",
        ingest.admin_token()?
    );
    let out = https_get(ingest.http, &ingest.ca_file(), "/api/v1/client", &spoofed).await?;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains(r#""addr":"127.0.0.1","scheme":"https","via_proxy":false"#),
        "an untrusted peer's forwarded headers are ignored: {out}"
    );
    let plain = reqwest::get(format!("http://{}/healthz", ingest.http)).await;
    assert!(
        plain.map_or(true, |r| !r.status().is_success()),
        "no plain HTTP on the TLS port"
    );
    drop(ingest);

    let behind = dir.path().join("behind");
    IngestProc::register(&behind, "gw")?;
    let proxied = IngestProc::start_with_args(
        &behind,
        any_port(),
        any_port(),
        &["--trusted-proxy", "127.0.0.1"],
    )
    .await?;
    let client: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/api/v1/client", proxied.http))
        .bearer_auth(proxied.admin_token()?)
        .header("X-Forwarded-For", "198.51.100.7, 127.0.0.1")
        .header("X-Forwarded-Proto", "https")
        .header("X-Forwarded-Host", "guantong.example.com")
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(client["addr"], "198.51.100.7", "{client}");
    assert_eq!(client["scheme"], "https", "{client}");
    assert_eq!(client["host"], "guantong.example.com", "{client}");
    assert_eq!(client["via_proxy"], true, "{client}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_exposed_secret_files_are_warned_about_at_every_start() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let token = IngestProc::register(&data, "gw")?;
    let ingest =
        IngestProc::start_with_args(&data, any_port(), any_port(), &["--plaintext"]).await?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644))?;
    let config = dir.path().join("gw.toml");
    let text = gateway_toml("gw", ingest.grpc, "unused", &dir.path().join("buffer")).replace(
        "token = \"unused\"",
        &format!("token_file = \"{}\"", token_file.display()),
    );
    assert!(text.contains("plaintext = true"), "{text}");
    std::fs::write(&config, &text)?;
    let gateway = GatewayProc::start(&config)?;
    wait_for(
        "the gateway's warnings",
        Duration::from_secs(20),
        || async {
            let log = std::fs::read_to_string(config.with_extension("log")).unwrap_or_default();
            Ok((log.contains("secret file is readable by others")
                && log.contains("uplink.plaintext: no TLS"))
            .then_some(()))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", gateway.proc.logs()))?;
    let ingest_log = std::fs::read_to_string(data.with_extension("log"))?;
    assert!(
        ingest_log.contains("--plaintext: gateways connect without TLS"),
        "{ingest_log}"
    );

    // Without `plaintext = true`, an http:// endpoint is a config error.
    let out = Command::new(binary("guantong-gateway")?)
        .args(["check", "--config"])
        .arg(&config)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&config, text.replace("plaintext = true\n", ""))?;
    let out = Command::new(binary("guantong-gateway")?)
        .args(["check", "--config"])
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("has no TLS"),
        "{stderr}"
    );
    Ok(())
}
