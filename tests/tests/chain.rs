//! The evidence chain against a real ingest process, with a raw client that
//! plays gateways: an honest one, and ones whose batches were signed by
//! another key, removed, reordered, or edited in the database afterwards.

use std::net::SocketAddr;
use std::process::Command;

use guantong_e2e::evidence::{export, verify};
use guantong_e2e::procs::{IngestProc, binary};
use guantong_e2e::raw::{Signer, batch_bytes, manifest, session, session_as};
use guantong_proto::chain::Algorithm;
use guantong_proto::v1::gateway_message::Kind as Up;
use redb::ReadableTable;
use serde_json::Value;

const GW: &str = "gw-chain";

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

async fn chains(ingest: &IngestProc) -> anyhow::Result<Vec<Value>> {
    Ok(ingest.api().get("/api/v1/chain").await?["chains"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn chain_of(chains: &[Value], buffer_id: u64) -> &Value {
    let id = format!("{buffer_id:016x}");
    chains
        .iter()
        .find(|c| c["buffer_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no chain for {id}: {chains:?}"))
}

fn break_reasons(chain: &Value) -> Vec<(u64, String)> {
    chain["breaks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                b["seq"].as_u64().unwrap_or(0),
                b["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_names_every_kind_of_break_and_accepts_an_honest_chain() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let honest = Signer::new(7, GW, 1);
    let token = IngestProc::register_with_key(&data, GW, Some(&hex::encode(honest.public_key())))?;
    let mut ingest = IngestProc::start(&data, any(), any()).await?;
    let key = honest.public_key();
    let intruder =
        guantong_proto::chain::ChainKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[9; 32]));

    // Buffer 1: honest, sent in two connections and out of order.
    let mut s = Signer::new(7, GW, 1);
    let (b1, b2, b3) = (
        s.link(batch_bytes(1, 1)),
        s.link(batch_bytes(1, 2)),
        s.link(batch_bytes(1, 3)),
    );
    session(
        ingest.grpc,
        GW,
        &token,
        1,
        key.clone(),
        vec![Up::Manifest(manifest(GW)), Up::Batch(b1), Up::Batch(b3)],
    )
    .await?;
    session(ingest.grpc, GW, &token, 1, key.clone(), vec![Up::Batch(b2)]).await?;

    // Buffer 2: batch 2 signed by another key.
    let mut s = Signer::new(7, GW, 2);
    let msgs = vec![
        Up::Batch(s.link(batch_bytes(2, 1))),
        Up::Batch(s.link_with(batch_bytes(2, 2), &intruder)),
        Up::Batch(s.link(batch_bytes(2, 3))),
    ];
    session(ingest.grpc, GW, &token, 2, key.clone(), msgs).await?;

    // Buffer 3: batch 2 removed.
    let mut s = Signer::new(7, GW, 3);
    let (l1, _l2, l3) = (
        s.link(batch_bytes(3, 1)),
        s.link(batch_bytes(3, 2)),
        s.link(batch_bytes(3, 3)),
    );
    session(
        ingest.grpc,
        GW,
        &token,
        3,
        key.clone(),
        vec![Up::Batch(l1), Up::Batch(l3)],
    )
    .await?;

    // Buffer 4: batches 2 and 3 chained in the other order.
    let mut s = Signer::new(7, GW, 4);
    let l1 = s.link(batch_bytes(4, 1));
    let l3 = s.link(batch_bytes(4, 3));
    let l2 = s.link(batch_bytes(4, 2));
    session(
        ingest.grpc,
        GW,
        &token,
        4,
        key.clone(),
        vec![Up::Batch(l1), Up::Batch(l2), Up::Batch(l3)],
    )
    .await?;

    // A different key presented in Hello is refused and recorded.
    let other = Signer::new(9, GW, 5);
    let refused = session(ingest.grpc, GW, &token, 5, other.public_key(), vec![]).await;
    assert!(refused.is_err_and(|e| e.to_string().contains("key change refused")));

    let all = chains(&ingest).await?;
    let c1 = chain_of(&all, 1);
    assert_eq!(
        (
            c1["verified_from"].as_u64(),
            c1["verified_through"].as_u64()
        ),
        (Some(1), Some(3)),
        "{c1}"
    );
    assert!(
        break_reasons(c1).is_empty(),
        "honest chain has no break: {c1}"
    );

    let b = break_reasons(chain_of(&all, 2));
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!(b[0].0, 2);
    assert!(b[0].1.contains("signature does not verify"), "{b:?}");

    let c3 = chain_of(&all, 3);
    assert_eq!(
        c3["verified_through"], 1,
        "verification stops before the removed batch: {c3}"
    );
    assert_eq!(
        c3["waiting"], 1,
        "batch 3 waits for its missing predecessor: {c3}"
    );

    let b = break_reasons(chain_of(&all, 4));
    assert_eq!(
        b.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        vec![2, 3],
        "both reordered links break: {b:?}"
    );
    assert!(
        b.iter()
            .all(|(_, r)| r.contains("does not link to the previous batch")),
        "{b:?}"
    );

    let key_change = all
        .iter()
        .flat_map(break_reasons)
        .filter(|(_, r)| r.contains("key change refused"))
        .count();
    assert_eq!(key_change, 1, "{all:?}");

    // Offline re-verification agrees, and names the batch edited in the database.
    ingest.proc.terminate(std::time::Duration::from_secs(10));

    // The same vectors through the offline verifier of a bundle: ingest's
    // walker judges both, so every break is the same batch with the same
    // words; only the batch whose predecessor is missing differs (online it
    // waits, in a bundle it is a gap).
    let bundle = dir.path().join("bundle.json");
    export(&data, GW, 1_699_999_000_000, 1_700_001_000_000, &bundle)?;
    let offline = verify(&bundle, None)?;
    let mut online: Vec<String> = all
        .iter()
        .flat_map(|c| {
            let buffer = c["buffer_id"].as_str().unwrap_or_default().to_string();
            break_reasons(c)
                .into_iter()
                .filter(|(_, r)| !r.contains("key change refused"))
                .map(move |(seq, r)| format!("FAILS gateway {GW} buffer {buffer} batch {seq}: {r}"))
        })
        .collect();
    online.push(format!(
        "FAILS gateway {GW} buffer {:016x} batch 3: batches 2..=2 are missing before it",
        3
    ));
    online.sort();
    let mut found: Vec<String> = offline
        .text
        .lines()
        .filter(|l| l.starts_with("FAILS") && l.contains(" batch "))
        .map(str::to_string)
        .collect();
    found.sort();
    assert_eq!(found, online, "offline:\n{}", offline.text);
    assert!(
        offline.text.contains(&format!(
            "HOLDS gateway {GW} buffer {:016x}: chain verified from batch 1 to batch 3",
            1
        )),
        "{}",
        offline.text
    );
    let verify = || {
        Command::new(binary("guantong-ingest").expect("binary"))
            .args(["verify-chain", "--data"])
            .arg(&data)
            .output()
    };
    let out = verify()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !out.status.success(),
        "breaks make verify-chain fail:\n{text}"
    );
    assert!(
        text.contains(&format!("buffer {:016x}: links 1..=3 (3 stored)", 1)),
        "{text}"
    );
    // verify-chain walks the stored links with the same walker: the same
    // breaks in the same words, under their buffers.
    for c in &all {
        let buffer = c["buffer_id"].as_str().unwrap_or_default();
        let Some(section) = text
            .split("gateway ")
            .find(|s| s.contains(&format!("buffer {buffer}:")))
        else {
            continue; // a stream known only by a break has no stored links
        };
        for (seq, reason) in break_reasons(c) {
            assert!(
                section.contains(&format!("BREAK at batch {seq}: {reason}")),
                "buffer {buffer} batch {seq}: {reason}\n{text}"
            );
        }
    }
    {
        let db = redb::Database::open(data.join("ingest.redb"))?;
        let table: redb::TableDefinition<(&str, u64, u64), &[u8]> =
            redb::TableDefinition::new("signed");
        let txn = db.begin_write()?;
        {
            let mut t = txn.open_table(table)?;
            let mut bytes = t
                .get((GW, 1, 2))?
                .expect("batch 2 of buffer 1 stored")
                .value()
                .to_vec();
            // The stored link is a protobuf whose field 1 is the payload; flip
            // a byte inside it (one point value).
            let at = bytes.len() / 3;
            bytes[at] ^= 0x01;
            t.insert((GW, 1, 2), bytes.as_slice())?;
        }
        txn.commit()?;
    }
    let out = verify()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let buffer1: Vec<&str> = text
        .split("gateway ")
        .filter(|s| s.contains(&format!("buffer {:016x}", 1)))
        .collect();
    assert_eq!(buffer1.len(), 1, "{text}");
    assert!(
        buffer1[0].contains("BREAK at batch 2"),
        "the edited batch is named:\n{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_on_first_use_binds_the_first_key_records_it_and_refuses_another()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let token = IngestProc::register(&data, GW)?;
    let ingest =
        IngestProc::start_with_args(&data, any(), any(), &["--trust-on-first-use"]).await?;
    let mut first = Signer::new(7, GW, 1);
    let key = first.public_key();
    let (l1, l2) = (first.link(batch_bytes(1, 1)), first.link(batch_bytes(1, 2)));
    session(
        ingest.grpc,
        GW,
        &token,
        1,
        key,
        vec![Up::Manifest(manifest(GW)), Up::Batch(l1), Up::Batch(l2)],
    )
    .await?;
    let other = Signer::new(8, GW, 2);
    let refused = session(ingest.grpc, GW, &token, 2, other.public_key(), vec![]).await;
    assert!(
        refused.is_err_and(|e| e.to_string().contains("key change refused")),
        "a second key is refused"
    );
    let all = chains(&ingest).await?;
    let c1 = chain_of(&all, 1);
    let notes = break_reasons(c1);
    assert_eq!(notes.len(), 1, "{c1}");
    assert!(
        notes[0].1.contains("bound by trust on first use"),
        "recorded as such: {notes:?}"
    );
    assert_eq!(
        c1["verified_through"], 2,
        "the bound key verifies the chain: {c1}"
    );
    Ok(())
}

/// A gateway whose key moves from Ed25519 to SM2 is a key change like any
/// other: refused and recorded, both fingerprints naming their algorithm.
/// An SM2 key bound by trust on first use verifies an SM2 chain, and an
/// Ed25519-signed link on it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_algorithm_is_a_recorded_key_change_and_sm2_chains_verify() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let ed = Signer::new(7, GW, 1);
    let token = IngestProc::register_with_key(&data, GW, Some(&hex::encode(ed.public_key())))?;
    const SM2_GW: &str = "gw-sm2";
    let sm2_token = IngestProc::register(&data, SM2_GW)?;
    let ingest =
        IngestProc::start_with_args(&data, any(), any(), &["--trust-on-first-use"]).await?;

    let sm2 = Signer::sm2(7, GW, 1);
    let refused = session_as(
        ingest.grpc,
        GW,
        &token,
        1,
        (Algorithm::Sm2, sm2.public_key()),
        vec![],
    )
    .await;
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("key change refused: the gateway presents key sm2:")
            && message.contains("but ed25519:"),
        "{message}"
    );

    // The SM2 gateway: batches 1 and 2 signed with SM2; batch 3 claims SM2
    // but carries an Ed25519 signature over the SHA-256 link.
    let mut s = Signer::sm2(5, SM2_GW, 1);
    let (b1, b2) = (s.link(batch_bytes(1, 1)), s.link(batch_bytes(1, 2)));
    let ed_key = Signer::new(5, SM2_GW, 1).key;
    let mut b3 = s.link_with(batch_bytes(1, 3), &ed_key);
    b3.algorithm = Algorithm::Sm2.wire() as i32;
    session_as(
        ingest.grpc,
        SM2_GW,
        &sm2_token,
        1,
        (Algorithm::Sm2, s.public_key()),
        vec![
            Up::Manifest(manifest(SM2_GW)),
            Up::Batch(b1),
            Up::Batch(b2),
            Up::Batch(b3),
        ],
    )
    .await?;
    let all = chains(&ingest).await?;
    let key_change: Vec<String> = all
        .iter()
        .filter(|c| c["gateway"] == GW)
        .flat_map(break_reasons)
        .map(|(_, r)| r)
        .filter(|r| r.contains("key change refused"))
        .collect();
    assert_eq!(key_change.len(), 1, "recorded once: {all:?}");
    let c = all
        .iter()
        .find(|c| c["gateway"] == SM2_GW)
        .expect("the SM2 gateway's chain");
    assert_eq!(c["verified_from"], 1, "{c}");
    assert_eq!(c["verified_through"], 3, "{c}");
    let b = break_reasons(c);
    assert!(
        b.iter().any(|(seq, r)| *seq == 0
            && r.contains("key sm2:")
            && r.contains("trust on first use")),
        "{b:?}"
    );
    let bad: Vec<u64> = b
        .iter()
        .filter(|(_, r)| r.contains("signature does not verify"))
        .map(|(seq, _)| *seq)
        .collect();
    assert_eq!(bad, [3], "only the Ed25519-signed link fails: {b:?}");
    Ok(())
}
