//! Cloud configuration end to end, with the real binaries: a provider stores
//! a gateway's `[[devices]]` at ingest, the running gateway receives it over
//! its uplink, applies it as a reload and reports it; a document breaking the
//! gateway's rules is refused at ingest with the problems, one the gateway
//! cannot apply is refused by the gateway and reported; a rollback restores
//! the earlier manifest; a gateway offline during a change applies it when
//! it returns (having kept the version it ran across the restart); two
//! changes in a row end on the second; secrets are never shown or logged;
//! and the evidence chain verifies throughout.

use std::net::SocketAddr;
use std::time::Duration;

use guantong_e2e::procs::{
    Api, GatewayProc, IngestProc, gateway_toml, register_keyed_gateway, wait_for,
};
use guantong_e2e::sim::{SimDevice, standard_device_toml};
use reqwest::{Method, StatusCode};
use serde_json::Value;

const GW: &str = "gw-remote";
const A: &str = "91350100M000100Y43";
const B: &str = "91110000802100433B";
const SECRET: &str = "s3cret-pw-7f1e";

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The configuration state of `GW` as its provider reads it.
async fn state(api: &Api) -> anyhow::Result<Value> {
    Ok(api.get(&format!("/api/v1/gateways/{GW}/config")).await?["state"].clone())
}

/// Waits until `GW` runs cloud version `version`; its manifest version.
async fn applied(api: &Api, version: u64) -> anyhow::Result<String> {
    wait_for(
        &format!("version {version} applied by the gateway"),
        Duration::from_secs(30),
        || async {
            let s = state(api).await?;
            Ok(
                (s["applied"] == version && s["manifest_version"].is_string()).then(|| {
                    s["manifest_version"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                }),
            )
        },
    )
    .await
}

/// Stores `doc` as the next version, as `api`'s account; the version.
async fn push(api: &Api, doc: &str) -> anyhow::Result<u64> {
    let (status, reply) = api
        .send(
            Method::PUT,
            &format!("/api/v1/gateways/{GW}/config"),
            Some(doc.to_string()),
        )
        .await?;
    anyhow::ensure!(status == StatusCode::CREATED, "push: {status} {reply}");
    Ok(reply["version"].as_u64().unwrap_or_default())
}

/// Requests stored `version` again, as `api`'s account.
async fn rollback(api: &Api, version: u64) -> anyhow::Result<(StatusCode, Value)> {
    api.send(
        Method::POST,
        &format!("/api/v1/gateways/{GW}/config/rollback"),
        Some(format!(r#"{{"version":{version}}}"#)),
    )
    .await
}

/// Points of `device`'s counter stored so far.
async fn counted(api: &Api, device: &str) -> anyhow::Result<usize> {
    Ok(api.points(GW, device, "counter").await?.len())
}

/// Waits until `device` stores more points than `after`.
async fn flowing(api: &Api, device: &str, after: usize) -> anyhow::Result<usize> {
    wait_for(
        &format!("points of {device} beyond {after}"),
        Duration::from_secs(30),
        || async {
            let n = counted(api, device).await?;
            Ok((n > after + 2).then_some(n))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_changes_a_gateway_from_ingest_and_every_outcome_is_reported()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let config = dir.path().join("gateway.toml");
    let buffer = dir.path().join("buffer");
    let token = register_keyed_gateway(&data, GW, &config, &buffer)?;
    let mut ingest = IngestProc::start(&data, any_port(), any_port()).await?;
    let admin = ingest.api();
    for (code, provider) in [(A, "prov-a"), (B, "prov-b")] {
        let enterprise = serde_json::json!({
            "code": code, "name": provider, "county": "示范区", "industry": "light", "provider": provider,
        });
        let (s, r) = admin
            .send(
                Method::POST,
                "/api/v1/enterprises",
                Some(enterprise.to_string()),
            )
            .await?;
        assert!(s.is_success(), "{r}");
    }
    let (s, r) = admin
        .send(
            Method::PUT,
            &format!("/api/v1/gateways/{GW}/enterprise"),
            Some(format!(r#"{{"enterprise":"{A}"}}"#)),
        )
        .await?;
    assert!(s.is_success(), "{r}");
    let mut providers = Vec::new();
    for name in ["prov-a", "prov-b"] {
        let account = format!(r#"{{"name":"{name}","role":"provider","provider":"{name}"}}"#);
        let (s, r) = admin
            .send(Method::POST, "/api/v1/accounts", Some(account))
            .await?;
        assert_eq!(s, StatusCode::CREATED, "{r}");
        providers.push(ingest.api_as(r["token"].as_str().map(str::to_string)));
    }
    let (prov_a, prov_b) = (&providers[0], &providers[1]);

    let (sim1, sim2) = (SimDevice::new(), SimDevice::new());
    let (addr1, _t1) = sim1.serve(any_port()).await?;
    let (addr2, _t2) = sim2.serve(any_port()).await?;
    let local = gateway_toml(GW, ingest.grpc, &token, &buffer)
        + &standard_device_toml("press-01", addr1, "200ms");
    std::fs::write(&config, &local)?;
    let mut gateway = GatewayProc::start(&config)?;
    let before = flowing(prov_a, "press-01", 0).await?;
    assert_eq!(
        state(prov_a).await?["applied"],
        0,
        "the local file alone runs"
    );

    // Another provider's account does not learn the gateway exists.
    let doc1 = standard_device_toml("press-01", addr1, "200ms")
        + &standard_device_toml("press-02", addr2, "200ms");
    let (s, _) = prov_b
        .send(
            Method::PUT,
            &format!("/api/v1/gateways/{GW}/config"),
            Some(doc1.clone()),
        )
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // 1. Applied and reported: the new device's data arrives, the kept one's
    // goes on.
    assert_eq!(push(prov_a, &doc1).await?, 1);
    let manifest1 = applied(prov_a, 1).await?;
    flowing(prov_a, "press-02", 0).await?;
    flowing(prov_a, "press-01", before).await?;

    // 2. Refused at ingest by the gateway's rules, naming the key; nothing stored.
    let (s, r) = prov_a
        .send(
            Method::PUT,
            &format!("/api/v1/gateways/{GW}/config"),
            Some(doc1.replace("type = \"u16\"", "type = \"u17\"")),
        )
        .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{r}");
    assert!(
        r["problems"][0]["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("devices[0].tags[")),
        "{r}"
    );
    let (s, r) = prov_a
        .send(
            Method::PUT,
            &format!("/api/v1/gateways/{GW}/config"),
            Some(format!("[uplink]\ntoken = \"x\"\n{doc1}")),
        )
        .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{r}");
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("local file")),
        "{r}"
    );

    // 3. Refused by the gateway: its local file's [buffer] was edited without
    // a restart, and a reload may not change it. Reported with the problem;
    // the running version stays.
    std::fs::write(&config, local.replace("64 MiB", "65 MiB"))?;
    let doc2 = standard_device_toml("press-01", addr1, "200ms");
    assert_eq!(push(prov_a, &doc2).await?, 2);
    let refused = wait_for("the gateway's refusal", Duration::from_secs(30), || async {
        let s = state(prov_a).await?;
        Ok(s["refused"]["version"].eq(&2).then_some(s))
    })
    .await?;
    assert_eq!(refused["applied"], 1, "{refused:#}");
    assert_eq!(refused["in_effect"], false, "{refused:#}");
    assert!(
        refused["refused"]["problems"]
            .to_string()
            .contains("buffer"),
        "{refused:#}"
    );
    std::fs::write(&config, &local)?;

    // 4. Applied once the file is back, then rolled back to 1: the earlier
    // manifest again.
    let (s, r) = rollback(prov_a, 2).await?;
    assert!(s.is_success(), "{r}");
    let manifest2 = applied(prov_a, 2).await?;
    assert_ne!(manifest2, manifest1);
    let (s, r) = rollback(prov_a, 1).await?;
    assert!(s.is_success(), "{r}");
    assert_eq!(
        applied(prov_a, 1).await?,
        manifest1,
        "the rollback restores manifest 1"
    );
    let (s, _) = rollback(prov_a, 9).await?;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // 5. Offline during a change: the gateway restarts on the version it
    // kept (1), then applies the new one (3) when it returns. It holds a
    // password, which readers never see and no log shows.
    gateway.proc.terminate(Duration::from_secs(10));
    let doc3 = doc1.clone()
        + &format!(
            "\n[[devices]]\nid = \"broker\"\nprotocol = \"mqtt\"\nbroker = \"mqtt://127.0.0.1:1883\"\nusername = \"gw\"\npassword = \"{SECRET}\"\ntopic = \"guantong/remote-test/{GW}\"\npayload = \"json\"\ninterval = \"5s\"\n\n[[devices.tags]]\nname = \"t\"\npointer = \"/t\"\ntype = \"double\"\n"
        );
    assert_eq!(push(prov_a, &doc3).await?, 3);
    assert_eq!(state(prov_a).await?["applied"], 1);
    let shown = prov_a.get(&format!("/api/v1/gateways/{GW}/config")).await?;
    assert!(!shown.to_string().contains(SECRET), "{shown}");
    assert!(shown.to_string().contains("********"), "{shown}");
    gateway = GatewayProc::start(&config)?;
    applied(prov_a, 3).await?;
    let at_return = counted(prov_a, "press-02").await?;
    flowing(prov_a, "press-02", at_return).await?;

    // 6. Two changes in a row: the second runs.
    assert_eq!(push(prov_a, &doc2).await?, 4);
    assert_eq!(push(prov_a, &doc1).await?, 5);
    assert_eq!(applied(prov_a, 5).await?, manifest1);

    // The fleet shows it in effect; the chain verifies; nobody logged the secret.
    let fleet = admin.get("/api/v1/gateways").await?;
    let config_view = &fleet["gateways"][0]["config"];
    assert_eq!(config_view["requested"], 5, "{fleet:#}");
    assert_eq!(config_view["in_effect"], true, "{fleet:#}");
    let chain = admin.get("/api/v1/chain").await?;
    for c in chain["chains"].as_array().into_iter().flatten() {
        assert_eq!(c["breaks"], serde_json::json!([]), "{chain:#}");
    }
    gateway.proc.terminate(Duration::from_secs(10));
    ingest.proc.terminate(Duration::from_secs(10));
    let report = std::process::Command::new(guantong_e2e::procs::binary("guantong-ingest")?)
        .args(["verify-chain", "--data"])
        .arg(&data)
        .output()?;
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(report.status.success() && !text.contains("BREAK"), "{text}");
    for log in [gateway.proc.logs(), ingest.proc.logs()] {
        assert!(!log.contains(SECRET), "a log shows the password");
    }
    Ok(())
}
