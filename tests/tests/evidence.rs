//! Evidence an auditor takes away: a bundle exported from a stopped ingest,
//! checked offline; and the daily digest a supervisor keeps. Edits in the
//! database (query tables or signed bytes) and in the bundle (a batch
//! removed, a pair reordered, another key's signature) are each named.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guantong_e2e::evidence::{export, verify, verify_chain};
use guantong_e2e::procs::{GatewayProc, IngestProc, gateway_identity};
use guantong_e2e::raw::{Signer, batch_bytes, manifest, session};
use guantong_e2e::scenario::{GW as SCENARIO_GW, Options, Scenario, check_counter};
use guantong_proto::v1::gateway_message::Kind as Up;
use guantong_proto::v1::{Point, point};
use prost::Message;
use redb::ReadableTable;
use serde_json::Value;

const GW: &str = "gw-evidence";
/// Covers every point of `raw::batch_bytes` for small sequence numbers.
const FROM: i64 = 1_699_999_000_000;
const TO: i64 = 1_700_001_000_000;

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

/// Ingest's `Chunk` row (ingest/src/store/embedded.rs), to edit it as an
/// intruder with database access would.
#[derive(Clone, PartialEq, prost::Message)]
struct Chunk {
    #[prost(int64, tag = "1")]
    base_ms: i64,
    #[prost(int64, tag = "2")]
    received_at_ms: i64,
    #[prost(message, repeated, tag = "3")]
    points: Vec<Point>,
    #[prost(bool, tag = "4")]
    backfill: bool,
    #[prost(fixed64, tag = "5")]
    buffer_id: u64,
    #[prost(uint64, tag = "6")]
    seq: u64,
}

/// Ingest's stored signed link.
#[derive(Clone, PartialEq, prost::Message)]
struct SignedLink {
    #[prost(bytes = "vec", tag = "1")]
    payload: Vec<u8>,
}

const CHUNKS: redb::TableDefinition<(u64, i64, u64), &[u8]> = redb::TableDefinition::new("chunks");
const MANIFESTS: redb::TableDefinition<(&str, u64), &[u8]> =
    redb::TableDefinition::new("manifests");
const SIGNED: redb::TableDefinition<(&str, u64, u64), &[u8]> = redb::TableDefinition::new("signed");

/// Adds 1 to the first value of batch `seq`'s chunk in the query tables.
fn edit_query_tables(data: &Path, seq: u64) -> anyhow::Result<()> {
    let db = redb::Database::open(data.join("ingest.redb"))?;
    let txn = db.begin_write()?;
    {
        let mut t = txn.open_table(CHUNKS)?;
        let mut found = None;
        for entry in t.iter()? {
            let (k, v) = entry?;
            let chunk = Chunk::decode(v.value())?;
            if chunk.seq == seq {
                found = Some((k.value(), chunk));
                break;
            }
        }
        let (key, mut chunk) = found.expect("a chunk of the batch");
        match &mut chunk.points[0].value {
            Some(point::Value::Uint(u)) => *u += 1,
            other => panic!("unexpected value {other:?}"),
        }
        t.insert(key, chunk.encode_to_vec().as_slice())?;
    }
    txn.commit()?;
    Ok(())
}

/// Changes one point value, keeping the encoded length, inside the stored
/// signed bytes of `gateway`'s first batch with points that `pick` (buffer
/// id, seq) accepts; returns its (buffer id, seq). Every other byte of the
/// stored link stays as it was.
fn edit_signed_bytes(
    data: &Path,
    gateway: &str,
    pick: impl Fn(u64, u64) -> bool,
) -> anyhow::Result<(u64, u64)> {
    let db = redb::Database::open(data.join("ingest.redb"))?;
    let txn = db.begin_write()?;
    let edited;
    {
        let mut t = txn.open_table(SIGNED)?;
        let mut found = None;
        for entry in t.range((gateway, 0, 0)..=(gateway, u64::MAX, u64::MAX))? {
            let (k, v) = entry?;
            let link = SignedLink::decode(v.value())?;
            let batch = guantong_proto::v1::Batch::decode(link.payload.as_slice())?;
            let (_, buffer_id, seq) = k.value();
            if !batch.points.is_empty() && pick(buffer_id, seq) {
                found = Some((buffer_id, seq, v.value().to_vec(), link.payload, batch));
                break;
            }
        }
        let (buffer_id, seq, mut bytes, old, mut batch) =
            found.expect("a signed batch with points");
        match &mut batch.points[0].value {
            Some(point::Value::Uint(u)) => *u ^= 1,
            Some(point::Value::Int(i)) => *i ^= 1,
            Some(point::Value::Double(d)) => *d += 1.0,
            Some(point::Value::Bool(b)) => *b = !*b,
            other => anyhow::bail!("unexpected value {other:?}"),
        }
        let new = batch.encode_to_vec();
        anyhow::ensure!(new.len() == old.len(), "same length edit");
        let at = bytes
            .windows(old.len())
            .position(|w| w == old.as_slice())
            .expect("payload inside the stored link");
        bytes[at..at + old.len()].copy_from_slice(&new);
        t.insert((gateway, buffer_id, seq), bytes.as_slice())?;
        edited = (buffer_id, seq);
    }
    txn.commit()?;
    Ok(edited)
}

fn findings(text: &str, status: &str, needle: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with(status) && l.contains(needle))
        .map(str::to_string)
        .collect()
}

fn edit_bundle(src: &Path, dst: &Path, f: impl FnOnce(&mut Vec<Value>)) -> anyhow::Result<()> {
    let mut b: Value = serde_json::from_slice(&std::fs::read(src)?)?;
    let links = b["gateways"][0]["streams"][0]["links"]
        .as_array_mut()
        .expect("links");
    f(links);
    std::fs::write(dst, serde_json::to_vec(&b)?)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_verifies_offline_and_every_edit_is_named() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let mut signer = Signer::new(7, GW, 1);
    let token = IngestProc::register_with_key(&data, GW, Some(&hex::encode(signer.public_key())))?;
    let mut ingest = IngestProc::start(&data, any(), any()).await?;
    let mut msgs = vec![Up::Manifest(manifest(GW))];
    for seq in 1..=4 {
        msgs.push(Up::Batch(signer.link(batch_bytes(1, seq))));
    }
    session(ingest.grpc, GW, &token, 1, signer.public_key(), msgs).await?;

    // The supervisor keeps today's digest.
    let today = guantong_ingest::evidence::digest::day_of(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64,
    );
    let kept = ingest
        .api()
        .get(&format!("/api/v1/digests?day={today}&gateway={GW}"))
        .await?;
    assert_eq!(kept["digests"][0]["leaves"], 4, "{kept}");
    let kept_file = dir.path().join("kept.json");
    std::fs::write(&kept_file, kept.to_string())?;
    ingest.proc.terminate(Duration::from_secs(10));

    let bundle = dir.path().join("bundle.json");
    export(&data, GW, FROM, TO, &bundle)?;
    let r = verify(&bundle, Some(&kept_file))?;
    assert!(r.ok, "an honest bundle verifies:\n{}", r.text);
    assert!(
        r.text
            .contains("chain verified from batch 1 to batch 4 (4 links)"),
        "{}",
        r.text
    );
    assert!(r.text.contains("matches the digest kept"), "{}", r.text);
    assert!(
        r.text
            .contains("HOLDS gateway gw-evidence report: 1 of 1 series agree"),
        "{}",
        r.text
    );

    // Bundles edited after export.
    let edited = dir.path().join("edited.json");
    edit_bundle(&bundle, &edited, |links| {
        links.remove(1);
    })?;
    let r = verify(&edited, None)?;
    assert!(!r.ok, "{}", r.text);
    assert!(
        !findings(&r.text, "FAILS", "batch 3: batches 2..=2 are missing").is_empty(),
        "a removed batch is named:\n{}",
        r.text
    );
    edit_bundle(&bundle, &edited, |links| links.swap(1, 2))?;
    let r = verify(&edited, None)?;
    assert!(
        !findings(&r.text, "FAILS", "batch 2: out of order").is_empty(),
        "a reordered pair is named:\n{}",
        r.text
    );
    let intruder = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    edit_bundle(&bundle, &edited, |links| {
        let prev: [u8; 32] = hex::decode(links[1]["prev_hash"].as_str().expect("hex"))
            .expect("hex")
            .try_into()
            .expect("32 bytes");
        let payload = hex::decode(links[1]["payload"].as_str().expect("hex")).expect("hex");
        let link = guantong_proto::chain::link_hash(&prev, &payload);
        links[1]["signature"] = hex::encode(guantong_proto::chain::sign(&intruder, &link)).into();
    })?;
    let r = verify(&edited, None)?;
    assert!(
        !findings(&r.text, "FAILS", "batch 2: signature does not verify").is_empty(),
        "another key's signature is named:\n{}",
        r.text
    );

    // One value edited in the query tables: verify-chain and the bundle
    // name the batch; the chain itself (and the kept digest) still hold.
    edit_query_tables(&data, 3)?;
    let r = verify_chain(&data)?;
    assert!(!r.ok, "{}", r.text);
    assert!(
        r.text.contains("BREAK at batch 3: the points the query tables serve for this batch differ from the signed batch"),
        "{}",
        r.text
    );
    export(&data, GW, FROM, TO, &bundle)?;
    let r = verify(&bundle, Some(&kept_file))?;
    assert!(!r.ok, "{}", r.text);
    let named = findings(&r.text, "FAILS", "batch ");
    assert_eq!(named.len(), 1, "only batch 3 fails:\n{}", r.text);
    assert!(
        named[0].contains("batch 3: the points ingest serves for this batch differ"),
        "{}",
        r.text
    );
    assert!(
        !findings(&r.text, "FAILS", "series dev/x").is_empty(),
        "the report disagrees with the signed batches:\n{}",
        r.text
    );
    assert!(r.text.contains("matches the digest kept"), "{}", r.text);

    // One value edited in the signed bytes: the signature, the query tables
    // and the kept digest each contradict it.
    edit_signed_bytes(&data, GW, |buffer_id, seq| (buffer_id, seq) == (1, 2))?;
    let r = verify_chain(&data)?;
    assert!(
        r.text
            .contains("BREAK at batch 2: signature does not verify"),
        "{}",
        r.text
    );
    export(&data, GW, FROM, TO, &bundle)?;
    let r = verify(&bundle, Some(&kept_file))?;
    assert!(!r.ok, "{}", r.text);
    assert!(
        !findings(&r.text, "FAILS", "batch 2: signature does not verify").is_empty(),
        "{}",
        r.text
    );
    assert!(
        !findings(&r.text, "FAILS", "contradicts the digest kept").is_empty(),
        "a later edit contradicts the digest handed out:\n{}",
        r.text
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_restarts_and_buffer_replays_keep_the_evidence_valid() -> anyhow::Result<()> {
    let mut s = Scenario::start(Options::default()).await?;
    let from = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64
        - 60_000;
    tokio::time::sleep(Duration::from_secs(2)).await;
    restart_gateway(&mut s).await?;
    // Ingest killed: the gateway resends its unacked batches to the new one.
    s.ingest.restart().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bundle = settle_stop_and_export(&mut s, from).await?;
    let r = verify(&bundle, None)?;
    assert!(
        r.ok,
        "restarts and replays keep the evidence valid:\n{}",
        r.text
    );
    assert!(
        r.text.contains("HOLDS gateway gw-test buffer")
            && r.text.contains("chain verified from batch 1"),
        "{}",
        r.text
    );
    assert!(
        !r.text.contains("without a manifest link"),
        "the gateway announced every manifest it used in the chain:\n{}",
        r.text
    );

    // The stored manifest edited (a tag's unit): the manifest link signed
    // at the gateway contradicts it.
    {
        let db = redb::Database::open(s.ingest.data.join("ingest.redb"))?;
        let txn = db.begin_write()?;
        {
            let mut t = txn.open_table(MANIFESTS)?;
            let (key, mut manifest) = {
                let (k, v) = t.iter()?.next().expect("a manifest")?;
                let (g, version) = k.value();
                (
                    (g.to_string(), version),
                    guantong_proto::v1::Manifest::decode(v.value())?,
                )
            };
            manifest.tags[0].unit = "forged".into();
            t.insert((key.0.as_str(), key.1), manifest.encode_to_vec().as_slice())?;
        }
        txn.commit()?;
    }
    let r = verify_chain(&s.ingest.data)?;
    assert!(
        !r.ok && r.text.contains("is not the one this manifest link signed"),
        "{}",
        r.text
    );
    export(&s.ingest.data, SCENARIO_GW, from, from + 3_600_000, &bundle)?;
    let r = verify(&bundle, None)?;
    assert!(
        !findings(&r.text, "FAILS", "is not the one this manifest link signed").is_empty(),
        "{}",
        r.text
    );
    Ok(())
}

/// A real gateway configured with `key_algorithm = "sm2"`: its identity names
/// the algorithm, ingest verifies its SM2/SM3 chain on receipt, the exported
/// bundle verifies offline, and one value edited in a stored signed batch
/// fails both `verify-chain` and the bundle, naming the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sm2_gateway_chain_verifies_offline_and_an_edited_batch_fails() -> anyhow::Result<()> {
    let mut s = Scenario::start(Options {
        key_algorithm: "sm2",
        ..Options::default()
    })
    .await?;
    let from = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64
        - 60_000;
    let (algorithm, public_key) = gateway_identity(&s.gateway.config)?;
    assert_eq!(algorithm, "sm2");
    assert_eq!(public_key.len(), 130, "SEC1 uncompressed: {public_key}");
    assert!(public_key.starts_with("04"), "{public_key}");
    let key_file = std::fs::read_to_string(s.dir.path().join("gateway.key"))?;
    assert!(
        key_file.starts_with("guantong-sm2-secret-v1 "),
        "{key_file}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A restart continues the SM2 chain.
    restart_gateway(&mut s).await?;
    let bundle = settle_stop_and_export(&mut s, from).await?;
    let b: Value = serde_json::from_slice(&std::fs::read(&bundle)?)?;
    assert_eq!(b["gateways"][0]["key_algorithm"], "sm2");
    assert_eq!(b["gateways"][0]["public_key"], public_key.as_str());
    assert!(
        b["gateways"][0]["streams"][0]["links"]
            .as_array()
            .is_some_and(|l| !l.is_empty() && l.iter().all(|l| l["algorithm"] == "sm2")),
        "every link names sm2"
    );
    let r = verify(&bundle, None)?;
    assert!(r.ok, "an SM2 bundle verifies offline:\n{}", r.text);
    assert!(
        r.text.contains("key sm2:") && r.text.contains("chain verified from batch 1"),
        "{}",
        r.text
    );

    let (buffer_id, seq) = edit_signed_bytes(&s.ingest.data, SCENARIO_GW, |_, _| true)?;
    let r = verify_chain(&s.ingest.data)?;
    assert!(!r.ok, "{}", r.text);
    assert!(
        r.text
            .contains(&format!("BREAK at batch {seq}: signature does not verify")),
        "{}",
        r.text
    );
    export(&s.ingest.data, SCENARIO_GW, from, from + 3_600_000, &bundle)?;
    let r = verify(&bundle, None)?;
    assert!(!r.ok, "{}", r.text);
    assert!(
        !findings(
            &r.text,
            "FAILS",
            &format!("buffer {buffer_id:016x} batch {seq}: signature does not verify")
        )
        .is_empty(),
        "the edited batch is named:\n{}",
        r.text
    );
    Ok(())
}

/// A legitimate gateway restart: SIGTERM, then start again on the same
/// buffer, and let it run 2 s.
async fn restart_gateway(s: &mut Scenario) -> anyhow::Result<()> {
    s.gateway.proc.terminate(Duration::from_secs(10));
    s.gateway = GatewayProc::start(&s.gateway.config.clone())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

/// Waits until the counter arrived gapless and the chain is intact, stops
/// both processes, checks `verify-chain` and exports the gateway's bundle
/// for the hour from `from`.
async fn settle_stop_and_export(s: &mut Scenario, from: i64) -> anyhow::Result<PathBuf> {
    let (points, last, lost) = s.settle(Duration::from_secs(60)).await?;
    if let Err(e) = check_counter(&points, last, lost, true) {
        panic!("{e}\n{}", s.logs());
    }
    s.assert_chain_intact().await?;
    s.gateway.proc.terminate(Duration::from_secs(10));
    s.ingest.proc.terminate(Duration::from_secs(10));

    let r = verify_chain(&s.ingest.data)?;
    assert!(r.ok, "{}", r.text);
    let bundle = s.dir.path().join("bundle.json");
    export(&s.ingest.data, SCENARIO_GW, from, from + 3_600_000, &bundle)?;
    Ok(bundle)
}
