//! The store test suite: what every backend must do, written against the
//! `Store` trait alone, so a second backend runs all of it by adding one line
//! to its tests: `crate::store_suite!(ItsHarness);`.
//!
//! Each case starts from an empty store of a fresh `Harness` place and
//! reopens it where durability matters. Expected values come from the points
//! the case sent, never from the backend's own bookkeeping, so a backend that
//! loses, doubles or miscounts data fails here.

use std::future::Future;
use std::sync::Arc;

use guantong_proto::chain::{Algorithm, Hash, PublicKey};
use guantong_proto::v1::{
    Batch, DataType, Device, Loss, LossReason, Manifest, Point, Quality, Tag, TagLoss, point::Value,
};
use prost::Message;

use super::rollup::{self, RUN_BACKFILL, RUN_BAD, RUN_DATA};
use super::{
    AppendBatch, AppendOutcome, Appended, Link, ManifestMap, RunsQuery, Store, StoreError,
    StoredPoint, WindowCounts,
};
use crate::registry::{Access, Account, Enterprise, Equipment, Role};

/// Where a backend's store lives for one case.
pub trait Harness: Send + Sized + 'static {
    type Store: Store;
    /// A fresh, empty place (a directory, a database schema).
    fn new() -> impl Future<Output = Self> + Send;
    /// Opens the store at this place; any earlier instance was dropped.
    fn open(&self) -> impl Future<Output = Self::Store> + Send;
}

/// Runs every case of the suite against `$harness`, one `#[tokio::test]` each.
#[macro_export]
macro_rules! store_suite {
    ($harness:ty) => {
        $crate::store_suite!(@cases $harness;
            exactly_once_per_gateway_buffer_and_seq,
            out_of_order_batches_fill_holes_and_ranges_are_exactly_once,
            copies_queued_together_are_stored_once,
            duplicates_after_reopen_change_nothing,
            a_stream_acknowledged_elsewhere_is_recorded_as_lost_once,
            good_links_verify_in_order_and_wait_for_a_missing_one,
            chain_breaks_are_recorded_and_the_chain_continues,
            unchecked_signatures_and_recorded_breaks_show_as_breaks,
            declared_and_rejected_losses_are_recorded_and_collected_adds_up,
            rollups_agree_with_the_stored_points,
            rollups_of_batches_queued_together_agree_with_the_stored_points,
            gateways_tokens_and_keys,
            enterprises_equipment_owners_accounts_and_access,
            report_queries_answer_from_the_stored_points,
            scoped_queries_answer_for_the_gateways_named_only,
            owners_and_providers_are_found_without_reading_the_others,
            the_generation_grows_with_every_change_and_only_then,
            gateway_configs_are_numbered_per_gateway_and_states_change_in_place,
            verify_rechecks_signed_links_and_rollups_and_days_are_digested_and_exported,
        );
    };
    (@cases $harness:ty; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                $crate::store::suite::$case::<$harness>().await;
            }
        )*
    };
}

pub(crate) const GW: &str = "gw-a";
pub(crate) const BUFFER: u64 = 0xb0f;
/// A source time on a UTC+8 day boundary, so rollup cases cross days.
pub(crate) const T0: i64 = (1_700_000_000_000 + rollup::DAY_OFFSET_MS) / rollup::DAY_MS
    * rollup::DAY_MS
    - rollup::DAY_OFFSET_MS;

/// One device `dev` with tags `t0..tN`, all `interval_ms`.
pub(crate) fn manifest(gateway: &str, tags: usize, interval_ms: u64) -> Manifest {
    Manifest {
        version: 1,
        gateway_id: gateway.into(),
        created_at_ms: 0,
        devices: vec![Device {
            id: "dev".into(),
            protocol: "modbus-tcp".into(),
            endpoint: "10.0.0.9:502".into(),
            identity: [("vendor".to_string(), "ACME".to_string())].into(),
        }],
        tags: (0..tags)
            .map(|i| Tag {
                device: 0,
                name: format!("t{i}"),
                address: format!("hr{i}"),
                data_type: DataType::Double as i32,
                unit: "kW".into(),
                interval_ms,
            })
            .collect(),
    }
}

/// A point of tag `tag` at `t`; Good and Uncertain points carry `t` in
/// seconds as their value, Bad points none.
pub(crate) fn point(tag: u32, t: i64, q: Quality) -> (u32, i64, Quality) {
    (tag, t, q)
}

pub(crate) fn batch(seq: u64, points: &[(u32, i64, Quality)]) -> Batch {
    let base = points.iter().map(|p| p.1).min().unwrap_or(T0);
    Batch {
        buffer_id: BUFFER,
        seq,
        manifest_version: 1,
        base_time_ms: base,
        points: points
            .iter()
            .map(|&(tag, t, q)| Point {
                tag,
                time_offset_ms: t - base,
                value: (q != Quality::Bad).then_some(Value::Double(t as f64 / 1000.0)),
                quality: q as i32,
                quality_code: 0,
                server_time_delta_ms: None,
            })
            .collect(),
        committed_at_ms: base + 100,
        ..Default::default()
    }
}

fn loss_batch(seq: u64, last_seq: u64, tags: Vec<TagLoss>) -> Batch {
    Batch {
        buffer_id: BUFFER,
        seq,
        manifest_version: 1,
        loss: Some(Loss {
            last_seq,
            points: tags.iter().map(|t| t.points).sum(),
            tags,
            reason: LossReason::BufferFull as i32,
            bridge_hash: Vec::new(),
            estimated: false,
        }),
        ..Default::default()
    }
}

fn appending(gateway: &str, map: &Arc<ManifestMap>, batch: Batch) -> AppendBatch {
    let received_at_ms = batch.base_time_ms + 1_000;
    AppendBatch {
        gateway_id: gateway.into(),
        map: batch.loss.is_none().then(|| map.clone()),
        wire_bytes: batch.encoded_len() as u64,
        batch,
        received_at_ms,
        backfill: false,
        link: None,
        rejected: None,
    }
}

async fn append<S: Store>(store: &S, a: AppendBatch) -> Appended {
    store.append(a).await.expect("append")
}

async fn store_batch<S: Store>(
    store: &S,
    map: &Arc<ManifestMap>,
    seq: u64,
    points: &[(u32, i64, Quality)],
) -> Appended {
    append(store, appending(GW, map, batch(seq, points))).await
}

/// One tag's points at `t0 + i * step` for `i` in `range`, all Good.
pub(crate) fn good(
    tag: u32,
    t0: i64,
    step: i64,
    range: std::ops::Range<i64>,
) -> Vec<(u32, i64, Quality)> {
    range
        .map(|i| point(tag, t0 + i * step, Quality::Good))
        .collect()
}

pub(crate) async fn all_points<S: Store>(store: &S, series: u64) -> Vec<StoredPoint> {
    store
        .points(series, i64::MIN / 2, i64::MAX / 2, usize::MAX)
        .await
        .expect("points")
}

async fn count<S: Store>(store: &S, series: u64) -> WindowCounts {
    store
        .window_counts(series, i64::MIN / 2, i64::MAX / 2)
        .await
        .expect("window counts")
}

fn counts_of(points: &[(u32, i64, Quality)], tag: u32, from: i64, to: i64) -> WindowCounts {
    let mut c = WindowCounts::default();
    for &(t, time, q) in points {
        if t == tag && time >= from && time < to {
            match q {
                Quality::Good => c.good += 1,
                Quality::Uncertain => c.uncertain += 1,
                Quality::Bad => c.bad += 1,
            }
        }
    }
    c
}

async fn fresh<H: Harness>() -> (H, H::Store, Arc<ManifestMap>) {
    let place = H::new().await;
    let store = place.open().await;
    let map = put_manifest(&store, GW, 2, 1_000).await;
    (place, store, map)
}

pub(crate) async fn put_manifest<S: Store>(
    store: &S,
    gateway: &str,
    tags: usize,
    interval_ms: u64,
) -> Arc<ManifestMap> {
    store
        .put_manifest(gateway, manifest(gateway, tags, interval_ms))
        .await
        .expect("manifest")
}

pub async fn exactly_once_per_gateway_buffer_and_seq<H: Harness>() {
    let (_place, store, map) = fresh::<H>().await;
    let other_map = put_manifest(&store, "gw-b", 2, 1_000).await;
    assert_ne!(
        map.series, other_map.series,
        "same tag names on two gateways are different series"
    );
    for seq in 1..=3 {
        let a = store_batch(
            &store,
            &map,
            seq,
            &good(0, T0, 1_000, seq as i64 * 10..seq as i64 * 10 + 5),
        )
        .await;
        assert_eq!((a.outcome, a.stored_seq), (AppendOutcome::Stored, seq));
    }
    let again = store_batch(&store, &map, 2, &good(0, T0, 1_000, 20..25)).await;
    assert_eq!(
        (again.outcome, again.stored_seq),
        (AppendOutcome::Duplicate, 3)
    );
    // The same number of another buffer or another gateway is another batch.
    let mut other_buffer = appending(GW, &map, batch(2, &good(0, T0, 1_000, 40..45)));
    other_buffer.batch.buffer_id = BUFFER + 1;
    assert_eq!(
        append(&store, other_buffer).await.outcome,
        AppendOutcome::Stored
    );
    let other_gateway = appending("gw-b", &other_map, batch(2, &good(0, T0, 1_000, 50..55)));
    assert_eq!(
        append(&store, other_gateway).await.outcome,
        AppendOutcome::Stored
    );
    assert_eq!(count(&store, map.series[0]).await.good, 20);
    assert_eq!(count(&store, other_map.series[0]).await.good, 5);
}

pub async fn out_of_order_batches_fill_holes_and_ranges_are_exactly_once<H: Harness>() {
    let (_place, store, map) = fresh::<H>().await;
    let sent = |seq: u64| good(0, T0, 1_000, seq as i64 * 10..seq as i64 * 10 + 3);
    let mut acks = Vec::new();
    for seq in [1, 4, 3] {
        acks.push(store_batch(&store, &map, seq, &sent(seq)).await.stored_seq);
    }
    assert_eq!(acks, [1, 1, 1], "the ack stays below the first hole");
    let holes: Vec<_> = store
        .losses()
        .await
        .expect("losses")
        .into_iter()
        .map(|l| (l.first_seq, l.last_seq, l.points))
        .collect();
    assert_eq!(holes, [(2, 2, None)], "the hole is shown while it is open");
    let filled = store_batch(&store, &map, 2, &sent(2)).await;
    assert_eq!(
        (filled.outcome, filled.stored_seq),
        (AppendOutcome::Stored, 4)
    );
    assert!(
        store.losses().await.expect("losses").is_empty(),
        "filled hole still shown"
    );
    let dup = store_batch(&store, &map, 3, &sent(3)).await;
    assert_eq!((dup.outcome, dup.stored_seq), (AppendOutcome::Duplicate, 4));
    // A loss record numbers a range; every number in it is then stored.
    let loss = append(&store, appending(GW, &map, loss_batch(5, 7, Vec::new()))).await;
    assert_eq!((loss.outcome, loss.stored_seq), (AppendOutcome::Stored, 7));
    for seq in [5, 6, 7] {
        let inside = store_batch(&store, &map, seq, &sent(seq)).await;
        assert_eq!(
            inside.outcome,
            AppendOutcome::Duplicate,
            "seq {seq} inside the loss range"
        );
    }
    assert_eq!(count(&store, map.series[0]).await.good, 12);
}

pub async fn copies_queued_together_are_stored_once<H: Harness>() {
    let (_place, store, map) = fresh::<H>().await;
    let points = good(0, T0, 1_000, 0..10);
    // Both are queued before either is awaited, as a stream does.
    let first = store.append(appending(GW, &map, batch(1, &points)));
    let second = store.append(appending(GW, &map, batch(1, &points)));
    let outcomes = [
        first.await.expect("first").outcome,
        second.await.expect("second").outcome,
    ];
    assert_eq!(outcomes, [AppendOutcome::Stored, AppendOutcome::Duplicate]);
    assert_eq!(count(&store, map.series[0]).await.good, 10);
    assert_eq!(all_points(&store, map.series[0]).await.len(), 10);
}

pub async fn duplicates_after_reopen_change_nothing<H: Harness>() {
    let (place, store, map) = fresh::<H>().await;
    for seq in 1..=2 {
        store_batch(
            &store,
            &map,
            seq,
            &good(0, T0, 1_000, seq as i64 * 10..seq as i64 * 10 + 4),
        )
        .await;
    }
    drop(store);
    let store = place.open().await;
    assert_eq!(
        store.open_stream(GW, BUFFER, 1).await.expect("open stream"),
        2
    );
    let reread = store
        .manifest_map(GW, 1)
        .await
        .expect("manifest map")
        .expect("the manifest survives a reopen");
    assert_eq!(reread.series, map.series);
    let again = put_manifest(&store, GW, 2, 1_000).await;
    assert_eq!(again.series, map.series, "series ids are stable");
    let dup = store_batch(&store, &map, 2, &good(0, T0, 1_000, 20..24)).await;
    assert_eq!((dup.outcome, dup.stored_seq), (AppendOutcome::Duplicate, 2));
    let next = store_batch(&store, &map, 3, &good(0, T0, 1_000, 30..34)).await;
    assert_eq!((next.outcome, next.stored_seq), (AppendOutcome::Stored, 3));
    assert_eq!(count(&store, map.series[0]).await.good, 12);
    assert_eq!(all_points(&store, map.series[0]).await.len(), 12);
}

pub async fn a_stream_acknowledged_elsewhere_is_recorded_as_lost_once<H: Harness>() {
    let (place, store, map) = fresh::<H>().await;
    assert_eq!(store.open_stream(GW, BUFFER, 5).await.expect("open"), 4);
    let stored = store_batch(&store, &map, 5, &good(0, T0, 1_000, 0..2)).await;
    assert_eq!(stored.stored_seq, 5);
    drop(store);
    let store = place.open().await;
    assert_eq!(store.open_stream(GW, BUFFER, 5).await.expect("reopen"), 5);
    let losses = store.losses().await.expect("losses");
    assert_eq!(losses.len(), 1, "{losses:#?}");
    let l = &losses[0];
    assert_eq!(
        (
            l.gateway.as_str(),
            l.buffer_id.as_str(),
            l.first_seq,
            l.last_seq,
            l.points
        ),
        (GW, format!("{BUFFER:016x}").as_str(), 1, 4, None)
    );
    assert!(l.reason.contains("not in this store"), "{}", l.reason);
}

/// Builds the links of one stream as the gRPC layer would hand them over.
pub(crate) struct Chain {
    head: Hash,
}

impl Chain {
    pub(crate) fn new() -> Chain {
        Chain {
            head: Algorithm::Ed25519.genesis(GW, BUFFER),
        }
    }

    /// The batch as the next link; `signature_ok` is what the receiver's
    /// check found.
    pub(crate) fn link(&mut self, batch: &Batch, signature_ok: bool) -> Link {
        let prev = self.head;
        self.link_after(batch, prev, signature_ok)
    }

    fn link_after(&mut self, batch: &Batch, prev: Hash, signature_ok: bool) -> Link {
        let payload = bytes::Bytes::from(batch.encode_to_vec());
        let hash = Algorithm::Ed25519.link_hash(&prev, &payload);
        self.head = hash;
        Link {
            algorithm: Algorithm::Ed25519,
            payload,
            prev_hash: prev.to_vec(),
            signature: vec![7; 64],
            effective_hash: hash,
            signature_ok,
            signature_checked: true,
        }
    }
}

pub(crate) async fn append_linked<S: Store>(
    store: &S,
    map: &Arc<ManifestMap>,
    b: Batch,
    link: Link,
) -> Appended {
    let mut a = appending(GW, map, b);
    a.link = Some(link);
    append(store, a).await
}

async fn chain_of<S: Store>(store: &S) -> super::ChainInfo {
    let chains = store.chains().await.expect("chains");
    let buffer = format!("{BUFFER:016x}");
    chains
        .into_iter()
        .find(|c| c.gateway == GW && c.buffer_id == buffer)
        .expect("the stream's chain is listed")
}

pub async fn good_links_verify_in_order_and_wait_for_a_missing_one<H: Harness>() {
    let (_place, store, map) = fresh::<H>().await;
    let mut chain = Chain::new();
    let batches: Vec<Batch> = (1..=3)
        .map(|seq| {
            batch(
                seq,
                &good(0, T0, 1_000, seq as i64 * 10..seq as i64 * 10 + 2),
            )
        })
        .collect();
    let links: Vec<Link> = batches.iter().map(|b| chain.link(b, true)).collect();
    append_linked(&store, &map, batches[0].clone(), links[0].clone()).await;
    append_linked(&store, &map, batches[2].clone(), links[2].clone()).await;
    let c = chain_of(&store).await;
    assert_eq!((c.verified_from, c.verified_through, c.waiting), (1, 1, 1));
    append_linked(&store, &map, batches[1].clone(), links[1].clone()).await;
    let c = chain_of(&store).await;
    assert_eq!((c.verified_from, c.verified_through, c.waiting), (1, 3, 0));
    assert!(c.breaks.is_empty(), "{:#?}", c.breaks);
    assert_eq!(c.head_hash, hex::encode(links[2].effective_hash));
    // A loss record's bridge is what the next link names.
    let mut loss = loss_batch(4, 4, Vec::new());
    let bridge = [9u8; 32];
    if let Some(l) = loss.loss.as_mut() {
        l.bridge_hash = bridge.to_vec();
    }
    let mut loss_link = chain.link(&loss, true);
    loss_link.effective_hash = bridge;
    append_linked(&store, &map, loss, loss_link).await;
    let after = batch(5, &good(0, T0, 1_000, 50..52));
    let link = chain.link_after(&after, bridge, true);
    append_linked(&store, &map, after, link).await;
    let c = chain_of(&store).await;
    assert_eq!(c.verified_through, 5);
    assert!(
        c.breaks.is_empty(),
        "a bridged loss is no break: {:#?}",
        c.breaks
    );
}

pub async fn chain_breaks_are_recorded_and_the_chain_continues<H: Harness>() {
    let (_place, store, map) = fresh::<H>().await;
    let mut chain = Chain::new();
    let b1 = batch(1, &good(0, T0, 1_000, 0..2));
    let l1 = chain.link(&b1, true);
    append_linked(&store, &map, b1, l1).await;
    let b2 = batch(2, &good(0, T0, 1_000, 10..12));
    let l2 = chain.link(&b2, false);
    append_linked(&store, &map, b2, l2).await;
    let b3 = batch(3, &good(0, T0, 1_000, 20..22));
    let l3 = chain.link_after(&b3, [1; 32], true);
    append_linked(&store, &map, b3, l3).await;
    let b4 = batch(4, &good(0, T0, 1_000, 30..32));
    let l4 = chain.link(&b4, true);
    append_linked(&store, &map, b4, l4).await;
    let c = chain_of(&store).await;
    assert_eq!(c.verified_through, 4, "the chain continues after a break");
    let breaks: Vec<_> = c
        .breaks
        .iter()
        .map(|b| (b.seq, b.reason.as_str()))
        .collect();
    assert_eq!(breaks.len(), 2, "{breaks:#?}");
    assert_eq!(breaks[0].0, 2);
    assert!(breaks[0].1.contains("signature"), "{breaks:#?}");
    assert_eq!(breaks[1].0, 3);
    assert!(breaks[1].1.contains("does not link"), "{breaks:#?}");
    // Points of a broken link are stored all the same.
    assert_eq!(count(&store, map.series[0]).await.good, 8);
}

pub async fn unchecked_signatures_and_recorded_breaks_show_as_breaks<H: Harness>() {
    let (_place, store, map) = fresh::<H>().await;
    let mut chain = Chain::new();
    for seq in 1..=2 {
        let b = batch(
            seq,
            &good(0, T0, 1_000, seq as i64 * 10..seq as i64 * 10 + 2),
        );
        let mut link = chain.link(&b, false);
        link.signature_checked = false;
        append_linked(&store, &map, b, link).await;
    }
    let c = chain_of(&store).await;
    assert_eq!(c.verified_through, 2);
    let breaks: Vec<_> = c.breaks.iter().map(|b| (b.seq, b.reason.clone())).collect();
    assert_eq!(breaks.len(), 1, "said once per stream: {breaks:#?}");
    assert!(breaks[0].1.contains("no public key"), "{breaks:#?}");
    store
        .record_break("gw-b", 5, 3, "key changed".into())
        .await
        .expect("record break");
    let chains = store.chains().await.expect("chains");
    let other = chains
        .iter()
        .find(|c| c.gateway == "gw-b" && c.buffer_id == format!("{:016x}", 5))
        .expect("a stream known only by its break is listed");
    assert_eq!(
        other
            .breaks
            .iter()
            .map(|b| (b.seq, b.reason.as_str()))
            .collect::<Vec<_>>(),
        [(3, "key changed")]
    );
}

pub async fn declared_and_rejected_losses_are_recorded_and_collected_adds_up<H: Harness>() {
    let (_place, store, map) = fresh::<H>().await;
    // The gateway collected 10 points of t0 and 6 of t1, dropped some.
    let collected = [10u64, 6];
    store_batch(&store, &map, 1, &good(0, T0, 1_000, 0..4)).await;
    let dropped = vec![
        TagLoss {
            tag: 0,
            points: 6,
            first_time_ms: T0 + 4_000,
            last_time_ms: T0 + 9_000,
            manifest_version: 1,
            bad_points: 1,
        },
        TagLoss {
            tag: 1,
            points: 2,
            first_time_ms: T0,
            last_time_ms: T0 + 1_000,
            manifest_version: 1,
            bad_points: 0,
        },
    ];
    let loss = append(&store, appending(GW, &map, loss_batch(2, 4, dropped))).await;
    assert_eq!((loss.outcome, loss.stored_seq), (AppendOutcome::Stored, 4));
    store_batch(&store, &map, 5, &good(1, T0, 1_000, 2..6)).await;
    let mut refused = appending(GW, &map, batch(6, &good(0, T0 + 60_000, 1_000, 0..3)));
    refused.rejected = Some("timestamps too far in the future".into());
    let r = append(&store, refused).await;
    assert_eq!(
        (r.outcome, r.stored_seq),
        (AppendOutcome::Stored, 6),
        "a refused batch consumes its number"
    );
    let losses = store.losses().await.expect("losses");
    assert_eq!(losses.len(), 2, "{losses:#?}");
    let declared = losses
        .iter()
        .find(|l| l.first_seq == 2)
        .expect("declared loss");
    assert_eq!((declared.last_seq, declared.points), (4, Some(8)));
    assert!(
        declared.reason.contains("buffer_full"),
        "{}",
        declared.reason
    );
    let tags: Vec<_> = declared
        .tags
        .iter()
        .map(|t| {
            (
                t.device.as_str(),
                t.tag.as_str(),
                t.points,
                t.bad_points,
                t.first_time_ms,
                t.last_time_ms,
            )
        })
        .collect();
    assert_eq!(
        tags,
        [
            ("dev", "t0", 6, 1, T0 + 4_000, T0 + 9_000),
            ("dev", "t1", 2, 0, T0, T0 + 1_000)
        ]
    );
    let rejected = losses
        .iter()
        .find(|l| l.first_seq == 6)
        .expect("rejected batch");
    assert_eq!((rejected.last_seq, rejected.points), (6, Some(3)));
    assert!(
        rejected
            .reason
            .contains("rejected by ingest: timestamps too far"),
        "{}",
        rejected.reason
    );
    assert_eq!(
        count(&store, map.series[0]).await,
        WindowCounts {
            good: 4,
            uncertain: 0,
            bad: 0
        },
        "a refused batch's points are not stored"
    );
    // Collected = stored + declared lost, per tag.
    for (tag, want) in collected.iter().enumerate() {
        let c = count(&store, map.series[tag]).await;
        let lost: u64 = declared
            .tags
            .iter()
            .filter(|t| t.tag == format!("t{tag}"))
            .map(|t| t.points)
            .sum();
        assert_eq!(c.good + c.uncertain + c.bad + lost, *want, "tag t{tag}");
    }
}

pub async fn rollups_agree_with_the_stored_points<H: Harness>() {
    rollups_agree::<H>(false).await;
}

/// Batches queued before any is awaited, as a stream sends them, so that a
/// backend committing them together folds their rollups in one go.
pub async fn rollups_of_batches_queued_together_agree_with_the_stored_points<H: Harness>() {
    rollups_agree::<H>(true).await;
}

async fn rollups_agree<H: Harness>(queued_together: bool) {
    let (_place, store, map) = fresh::<H>().await;
    let series = map.series[0];
    let interval = 1_000;
    let tol = rollup::run_tolerance(interval);
    // Every 20 min over two days, some Bad and Uncertain, a gap of 3 hours,
    // sent out of time order across batches; the last batch is backfill.
    let step = 20 * 60_000;
    let times: Vec<(u32, i64, Quality)> = (0..150)
        .filter(|i| !(40..49).contains(i))
        .map(|i| {
            let q = match i % 7 {
                0 => Quality::Bad,
                3 => Quality::Uncertain,
                _ => Quality::Good,
            };
            point(0, T0 - 3 * rollup::HOUR_MS + i * step, q)
        })
        .collect();
    let mut batches: Vec<Vec<(u32, i64, Quality)>> = times.chunks(17).map(<[_]>::to_vec).collect();
    batches.swap(1, 3);
    let last = batches.len() - 1;
    let mut wire_bytes = 0;
    let mut queued = Vec::new();
    for (i, points) in batches.iter().enumerate() {
        let mut a = appending(GW, &map, batch(i as u64 + 1, points));
        a.backfill = i == last;
        wire_bytes += a.wire_bytes;
        if queued_together {
            queued.push(store.append(a));
        } else {
            append(&store, a).await;
        }
    }
    for q in queued {
        assert_eq!(q.await.expect("append").outcome, AppendOutcome::Stored);
    }
    let stored = all_points(&store, series).await;
    assert_eq!(stored.len(), times.len());
    let (from, to) = (T0 - 10 * rollup::DAY_MS, T0 + 10 * rollup::DAY_MS);
    let days = store.series_days(&[series], from, to).await.expect("days");
    assert!(
        days.len() >= 3,
        "the points span three UTC+8 days: {}",
        days.len()
    );
    let mut day_total = 0;
    for (s, day, row) in &days {
        assert_eq!(*s, series);
        let of_day: Vec<&StoredPoint> = stored
            .iter()
            .filter(|p| rollup::day_of(p.time_ms) == *day)
            .collect();
        let n = |q: &str| of_day.iter().filter(|p| p.quality == q).count() as u64;
        assert_eq!(
            (row.good, row.uncertain, row.bad, row.backfilled),
            (
                n("good"),
                n("uncertain"),
                n("bad"),
                of_day.iter().filter(|p| p.backfill).count() as u64
            ),
            "day {day}"
        );
        assert_eq!(
            row.first_ms,
            of_day.iter().map(|p| p.time_ms).min(),
            "day {day}"
        );
        assert_eq!(
            row.last_ms,
            of_day.iter().map(|p| p.time_ms).max(),
            "day {day}"
        );
        day_total += row.samples();
    }
    assert_eq!(
        day_total,
        stored.len() as u64,
        "every stored point is in a day"
    );
    let hours = store.series_hours(series, from, to).await.expect("hours");
    let mut want_hours: std::collections::BTreeMap<i64, (u64, f64, f64, f64)> = Default::default();
    for p in stored.iter().filter(|p| p.quality == "good") {
        let x = p
            .value
            .as_ref()
            .and_then(serde_json::Value::as_f64)
            .expect("a number");
        let h =
            want_hours
                .entry(rollup::hour_of(p.time_ms))
                .or_insert((0, 0.0, f64::MAX, f64::MIN));
        h.0 += 1;
        h.1 += x;
        h.2 = h.2.min(x);
        h.3 = h.3.max(x);
    }
    let got_hours: Vec<_> = hours
        .iter()
        .map(|&(h, n, sum, min, max)| (h, (n, sum, min, max)))
        .collect();
    assert_eq!(got_hours, want_hours.into_iter().collect::<Vec<_>>());
    // Runs of 20-minute samples with the tolerance of 20 minutes: one run
    // before the gap, one after; Bad points each their own run.
    let step_tol = step;
    let data = store
        .series_runs(series, RUN_DATA, step_tol, from, to)
        .await
        .expect("data runs");
    let want_data = runs_of(
        stored
            .iter()
            .filter(|p| p.quality != "bad")
            .map(|p| p.time_ms),
        step_tol,
    );
    assert_eq!(data, want_data);
    let bad = store
        .series_runs(series, RUN_BAD, step_tol, from, to)
        .await
        .expect("bad runs");
    assert_eq!(
        bad,
        runs_of(
            stored
                .iter()
                .filter(|p| p.quality == "bad")
                .map(|p| p.time_ms),
            step_tol
        )
    );
    // Many questions in one call answer as one call each, in order; a
    // series without rows answers empty.
    let q = |series, kind| RunsQuery {
        series,
        kind,
        tol: step_tol,
        from,
        to,
    };
    let many = store
        .series_runs_of(vec![
            q(series, RUN_BAD),
            q(series + 999, RUN_DATA),
            q(series, RUN_DATA),
        ])
        .await
        .expect("runs of many");
    assert_eq!(many, vec![bad.clone(), Vec::new(), data.clone()]);
    let many = store
        .series_hours_of(vec![series + 999, series], from, to)
        .await
        .expect("hours of many");
    assert_eq!(many, vec![Vec::new(), hours.clone()]);
    let backfill = store
        .series_runs(series, RUN_BACKFILL, tol, from, to)
        .await
        .expect("backfill runs");
    let backfilled: Vec<i64> = stored
        .iter()
        .filter(|p| p.backfill)
        .map(|p| p.time_ms)
        .collect();
    assert!(!backfilled.is_empty());
    for t in &backfilled {
        assert!(
            backfill.iter().any(|&(a, b)| a <= *t && *t <= b),
            "backfilled {t} outside {backfill:?}"
        );
    }
    // A window inside the data: only runs that overlap it.
    let mid = times[60].1;
    let inside = store
        .series_runs(series, RUN_DATA, step_tol, mid, mid + 1)
        .await
        .expect("runs");
    assert_eq!(inside.len(), 1);
    assert!(inside[0].0 <= mid && mid <= inside[0].1);
    let gdays = store
        .gateway_days(GW, from, to)
        .await
        .expect("gateway days");
    let batches_n: u64 = gdays.iter().map(|(_, d)| d.batches).sum();
    let points_n: u64 = gdays.iter().map(|(_, d)| d.points).sum();
    let bytes_n: u64 = gdays.iter().map(|(_, d)| d.bytes).sum();
    let backfill_n: u64 = gdays.iter().map(|(_, d)| d.backfill_points).sum();
    assert_eq!(
        (batches_n, points_n, bytes_n, backfill_n),
        (
            batches.len() as u64,
            stored.len() as u64,
            wire_bytes,
            backfilled.len() as u64
        )
    );
}

/// Sample times (any order) as runs: consecutive samples at most `tol` apart.
fn runs_of(times: impl Iterator<Item = i64>, tol: i64) -> Vec<(i64, i64)> {
    let mut times: Vec<i64> = times.collect();
    times.sort_unstable();
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for t in times {
        match runs.last_mut() {
            Some((_, end)) if t - *end <= tol => *end = t,
            _ => runs.push((t, t)),
        }
    }
    runs
}

fn test_key(seed: u8) -> PublicKey {
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    PublicKey::new(Algorithm::Ed25519, key.verifying_key().to_bytes().to_vec()).expect("key")
}

pub async fn gateways_tokens_and_keys<H: Harness>() {
    let place = H::new().await;
    let store = place.open().await;
    let token = store
        .register_gateway("gw-1", None)
        .await
        .expect("register");
    let key = test_key(3);
    let keyed = store
        .register_gateway("gw-2", Some(key.clone()))
        .await
        .expect("register");
    assert_ne!(token, keyed);
    assert!(matches!(
        store.register_gateway("gw-1", None).await,
        Err(StoreError::Exists(_))
    ));
    assert!(store.authenticate("gw-1", &token).await.expect("auth"));
    assert!(
        !store.authenticate("gw-1", &keyed).await.expect("auth"),
        "another gateway's token"
    );
    assert!(!store.authenticate("gw-1", "gt_wrong").await.expect("auth"));
    assert!(!store.authenticate("nobody", &token).await.expect("auth"));
    assert_eq!(store.gateway_key("gw-1").await.expect("key"), None);
    assert_eq!(
        store.gateway_key("gw-2").await.expect("key"),
        Some((key.clone(), "registered".to_string()))
    );
    let tofu = test_key(4);
    store
        .bind_key_on_first_use("gw-1", tofu.clone())
        .await
        .expect("bind");
    assert_eq!(
        store.gateway_key("gw-1").await.expect("key"),
        Some((tofu, "trust-on-first-use".to_string()))
    );
    assert!(matches!(
        store.bind_key_on_first_use("gw-1", test_key(5)).await,
        Err(StoreError::Exists(_))
    ));
    assert!(matches!(
        store.bind_key_on_first_use("nobody", test_key(5)).await,
        Err(StoreError::NotFound(_))
    ));
    // Rotation: the old token stays valid for the grace period only.
    let rotated = store
        .rotate_token("gw-1", std::time::Duration::from_secs(3600))
        .await
        .expect("rotate");
    assert!(store.authenticate("gw-1", &rotated).await.expect("auth"));
    assert!(
        store.authenticate("gw-1", &token).await.expect("auth"),
        "within the grace period"
    );
    let again = store
        .rotate_token("gw-1", std::time::Duration::ZERO)
        .await
        .expect("rotate");
    assert!(store.authenticate("gw-1", &again).await.expect("auth"));
    assert!(
        !store.authenticate("gw-1", &rotated).await.expect("auth"),
        "grace over"
    );
    assert!(
        !store.authenticate("gw-1", &token).await.expect("auth"),
        "two rotations ago"
    );
    assert!(
        store
            .rotate_token("nobody", std::time::Duration::ZERO)
            .await
            .is_err()
    );
    drop(store);
    let store = place.open().await;
    let mut ids: Vec<String> = store
        .gateways()
        .await
        .expect("gateways")
        .into_iter()
        .map(|g| g.id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["gw-1", "gw-2"]);
    assert!(
        store.authenticate("gw-1", &again).await.expect("auth"),
        "survives a reopen"
    );
}

fn enterprise(code: &str, name: &str) -> Enterprise {
    Enterprise {
        code: code.into(),
        name: name.into(),
        county: "鼓楼区".into(),
        industry: "textile".into(),
        provider: "p1".into(),
    }
}

fn equipment(id: &str, gateway: &str) -> Equipment {
    Equipment {
        id: id.into(),
        name: format!("machine {id}"),
        kind: "loom".into(),
        workshop: "w1".into(),
        production: true,
        gateway: gateway.into(),
        device: if gateway.is_empty() {
            String::new()
        } else {
            "dev".into()
        },
    }
}

pub async fn enterprises_equipment_owners_accounts_and_access<H: Harness>() {
    const A: &str = "91350100M000100Y43";
    const B: &str = "91110000802100433B";
    let place = H::new().await;
    let store = place.open().await;
    store
        .register_gateway("gw-1", None)
        .await
        .expect("register");
    store
        .put_enterprise(&enterprise(A, "one"))
        .await
        .expect("put");
    store
        .put_enterprise(&enterprise(B, "two"))
        .await
        .expect("put");
    store
        .put_enterprise(&enterprise(A, "one, renamed"))
        .await
        .expect("replace");
    let mut all = store.enterprises().await.expect("enterprises");
    all.sort_by(|a, b| a.code.cmp(&b.code));
    assert_eq!(all, [enterprise(B, "two"), enterprise(A, "one, renamed")]);
    assert_eq!(
        store.enterprise(A).await.expect("get"),
        Some(enterprise(A, "one, renamed"))
    );
    assert_eq!(
        store.enterprise("91000000000000000X").await.expect("get"),
        None
    );

    store
        .put_equipment(A, &[equipment("e1", "gw-1"), equipment("e2", "")])
        .await
        .expect("equipment");
    store
        .put_equipment(A, &[equipment("e3", "")])
        .await
        .expect("replace equipment");
    assert_eq!(
        store.equipment(A).await.expect("equipment"),
        [equipment("e3", "")]
    );
    assert!(store.equipment(B).await.expect("equipment").is_empty());
    assert!(
        store
            .put_equipment("91000000000000000X", &[])
            .await
            .is_err(),
        "unknown enterprise"
    );

    assert!(matches!(
        store.assign_gateway("gw-1", "91000000000000000X").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.assign_gateway("gw-unknown", A).await,
        Err(StoreError::NotFound(_))
    ));
    store.assign_gateway("gw-1", A).await.expect("assign");
    assert_eq!(
        store.gateway_owners().await.expect("owners"),
        [("gw-1".to_string(), A.to_string())].into()
    );
    store.assign_gateway("gw-1", B).await.expect("move");
    assert_eq!(
        store
            .gateway_owners()
            .await
            .expect("owners")
            .get("gw-1")
            .map(String::as_str),
        Some(B)
    );
    assert!(store.unassign_gateway("gw-1").await.expect("unassign"));
    assert!(
        !store
            .unassign_gateway("gw-1")
            .await
            .expect("unassign again")
    );
    assert!(store.gateway_owners().await.expect("owners").is_empty());

    let reviewer = Account {
        name: "li".into(),
        role: Role::Reviewer,
        provider: String::new(),
        enterprises: vec![A.into()],
        all_enterprises: false,
    };
    let first = store.put_account(&reviewer).await.expect("account");
    assert_eq!(
        store.account_by_token(&first).await.expect("by token"),
        Some(reviewer.clone())
    );
    let admin = Account {
        name: "admin".into(),
        role: Role::Admin,
        provider: String::new(),
        enterprises: Vec::new(),
        all_enterprises: false,
    };
    store.put_account(&admin).await.expect("admin");
    let widened = Account {
        all_enterprises: true,
        ..reviewer.clone()
    };
    let second = store.put_account(&widened).await.expect("replace account");
    assert_eq!(
        store.account_by_token(&first).await.expect("by token"),
        None,
        "the old token stops working"
    );
    assert_eq!(
        store.account_by_token(&second).await.expect("by token"),
        Some(widened.clone())
    );
    assert_eq!(
        store
            .account_by_token("gtk_nothing")
            .await
            .expect("by token"),
        None
    );
    let mut names: Vec<String> = store
        .accounts()
        .await
        .expect("accounts")
        .into_iter()
        .map(|a| a.name)
        .collect();
    names.sort();
    assert_eq!(names, ["admin", "li"]);

    for (i, path) in ["/a", "/b", "/c"].into_iter().enumerate() {
        store
            .log_access(&Access {
                at_ms: T0 + i as i64,
                account: "li".into(),
                role: Role::Reviewer,
                method: "GET".into(),
                path: path.into(),
                enterprise: A.into(),
            })
            .await
            .expect("log");
    }
    let latest: Vec<String> = store
        .access_log(2)
        .await
        .expect("access log")
        .into_iter()
        .map(|a| a.path)
        .collect();
    assert_eq!(latest, ["/c", "/b"], "the latest, newest first");
    drop(store);
    let store = place.open().await;
    assert_eq!(
        store.enterprises().await.expect("enterprises").len(),
        2,
        "survives a reopen"
    );
    assert_eq!(
        store.account_by_token(&second).await.expect("by token"),
        Some(widened)
    );
}

pub async fn report_queries_answer_from_the_stored_points<H: Harness>() {
    let (_place, store, map) = fresh::<H>().await;
    let other = put_manifest(&store, "gw-b", 1, 5_000).await;
    // Two tags, points every 7 s from an odd start, some Bad and Uncertain.
    let sent: Vec<(u32, i64, Quality)> = (0..300)
        .map(|i| {
            let q = match i % 13 {
                0 => Quality::Bad,
                5 => Quality::Uncertain,
                _ => Quality::Good,
            };
            point((i % 2) as u32, T0 + 13_000 + i * 7_000, q)
        })
        .collect();
    for (seq, chunk) in sent.chunks(41).enumerate() {
        store_batch(&store, &map, seq as u64 + 1, chunk).await;
    }
    let other_sent = good(0, T0, 5_000, 0..3);
    append(&store, appending("gw-b", &other, batch(1, &other_sent))).await;

    let series = store.series().await.expect("series");
    let mine: Vec<_> = series.iter().filter(|s| s.gateway == GW).collect();
    assert_eq!(mine.len(), 2);
    assert_eq!(series.iter().filter(|s| s.gateway == "gw-b").count(), 1);
    for (tag, id) in map.series.iter().enumerate() {
        let s = mine.iter().find(|s| s.id == *id).expect("series listed");
        assert_eq!(
            (
                s.device.as_str(),
                s.tag.clone(),
                s.protocol.as_str(),
                s.unit.as_str(),
                s.interval_ms,
                s.data_type.as_str()
            ),
            (
                "dev",
                format!("t{tag}"),
                "modbus-tcp",
                "kW",
                1_000,
                "double"
            )
        );
        assert_eq!(s.identity.get("vendor").map(String::as_str), Some("ACME"));
        let want = counts_of(&sent, tag as u32, i64::MIN, i64::MAX);
        assert_eq!(
            (s.good, s.uncertain, s.bad),
            (want.good, want.uncertain, want.bad)
        );
        let last = sent.iter().filter(|p| p.0 == tag as u32).map(|p| p.1).max();
        assert_eq!(s.last_seen_ms, last);
    }
    // The series of some gateways, without the others; "gw" is a prefix of
    // the id "gw-a" but another gateway.
    let short = put_manifest(&store, "gw", 1, 1_000).await;
    let ids = |list: Vec<super::SeriesInfo>| list.into_iter().map(|s| s.id).collect::<Vec<_>>();
    let of = |gateways: &[&str]| gateways.iter().map(|g| g.to_string()).collect::<Vec<_>>();
    assert_eq!(
        ids(store.series_of(&of(&[GW])).await.expect("series of")),
        map.series
    );
    assert_eq!(
        ids(store.series_of(&of(&["gw"])).await.expect("series of")),
        short.series
    );
    let mut both = map.series.clone();
    both.extend(&other.series);
    both.sort_unstable();
    assert_eq!(
        ids(store
            .series_of(&of(&["gw-b", GW]))
            .await
            .expect("series of")),
        both
    );
    assert!(
        store
            .series_of(&of(&["nobody"]))
            .await
            .expect("series of")
            .is_empty()
    );
    let listed = store.series_of(&of(&[GW])).await.expect("series of");
    let full: Vec<_> = series.iter().filter(|s| s.gateway == GW).collect();
    assert_eq!(
        format!("{listed:?}"),
        format!("{:?}", full.into_iter().cloned().collect::<Vec<_>>()),
        "the same rows as `series`"
    );
    // Window counts of many series, each against a brute-force count.
    let first = T0 + 13_000;
    let windows = [
        (first - 5_000, first + 3_000_000),
        (first + 1_000, first + 30_000),
        (first + 59_999, first + 60_001),
        (first + 61_234, first + 61_234 + 5 * 60_000),
        (first + 120_000, first + 120_000),
    ];
    for (from, to) in windows {
        let want: Vec<WindowCounts> = (0..map.series.len())
            .map(|tag| counts_of(&sent, tag as u32, from, to))
            .collect();
        for (tag, id) in map.series.iter().enumerate() {
            let got = store.window_counts(*id, from, to).await.expect("counts");
            assert_eq!(got, want[tag], "tag {tag} window {from}..{to}");
        }
        // In one call, in the order asked, a series of another gateway too.
        let mut ids: Vec<u64> = map.series.iter().rev().copied().collect();
        ids.push(other.series[0]);
        let many = store
            .window_counts_of(ids, from, to)
            .await
            .expect("counts of many");
        let mut want_many: Vec<WindowCounts> = want.into_iter().rev().collect();
        want_many.push(counts_of(&other_sent, 0, from, to));
        assert_eq!(many, want_many, "window {from}..{to}");
    }
    // Points in pages: each page continues after the last time seen.
    let id = map.series[0];
    let mut pages = Vec::new();
    let mut from = i64::MIN / 2;
    loop {
        let page = store
            .points(id, from, i64::MAX / 2, 16)
            .await
            .expect("page");
        assert!(page.len() <= 16);
        let Some(last) = page.last() else { break };
        from = last.time_ms + 1;
        pages.extend(page);
    }
    let want: Vec<i64> = sent.iter().filter(|p| p.0 == 0).map(|p| p.1).collect();
    assert_eq!(pages.iter().map(|p| p.time_ms).collect::<Vec<_>>(), want);
    for (p, s) in pages.iter().zip(sent.iter().filter(|p| p.0 == 0)) {
        assert_eq!(p.quality, super::embedded::quality_name(s.2));
        let value = (s.2 != Quality::Bad).then(|| serde_json::json!(s.1 as f64 / 1000.0));
        assert_eq!(p.value, value, "at {}", s.1);
    }
}

/// `losses_of`, `chains_of` and `series_by_tag` against their unscoped
/// twins: the same rows for the gateways named, none of the others, and a
/// gateway whose id is a prefix of another's is that gateway alone.
pub async fn scoped_queries_answer_for_the_gateways_named_only<H: Harness>() {
    let (_place, store, map) = fresh::<H>().await;
    let other = put_manifest(&store, "gw-a2", 1, 1_000).await;
    // gw-a: a declared loss, a hole (seq 3 missing) and a chain break.
    let mut chain = Chain::new();
    let b1 = batch(1, &good(0, T0, 1_000, 0..2));
    let l1 = chain.link(&b1, true);
    append_linked(&store, &map, b1, l1).await;
    let loss = TagLoss {
        tag: 0,
        points: 3,
        first_time_ms: T0,
        last_time_ms: T0 + 2_000,
        manifest_version: 1,
        bad_points: 0,
    };
    append(&store, appending(GW, &map, loss_batch(2, 2, vec![loss]))).await;
    store_batch(&store, &map, 4, &good(1, T0, 1_000, 0..2)).await;
    store
        .record_break(GW, 9, 1, "key changed".into())
        .await
        .expect("break");
    // gw-a2: only a loss and a break of its own.
    let mut b = loss_batch(1, 1, Vec::new());
    b.buffer_id = 7;
    append(&store, appending("gw-a2", &other, b)).await;
    store
        .record_break("gw-a2", 7, 2, "key changed".into())
        .await
        .expect("break");

    let names = |gateways: &[&str]| gateways.iter().map(|g| g.to_string()).collect::<Vec<_>>();
    let losses = |list: Vec<super::LossInfo>| {
        let mut v: Vec<String> = list
            .iter()
            .map(|l| {
                format!(
                    "{} {} {}..={} {}",
                    l.gateway, l.buffer_id, l.first_seq, l.last_seq, l.reason
                )
            })
            .collect();
        v.sort();
        v
    };
    let all_losses = losses(store.losses().await.expect("losses"));
    let mine = losses(store.losses_of(&names(&[GW])).await.expect("losses of"));
    assert_eq!(
        mine,
        all_losses
            .iter()
            .filter(|l| l.starts_with("gw-a "))
            .cloned()
            .collect::<Vec<_>>()
    );
    assert_eq!(mine.len(), 2, "the declared loss and the hole: {mine:?}");
    assert_eq!(
        losses(
            store
                .losses_of(&names(&["gw-a2", GW, GW]))
                .await
                .expect("losses of")
        ),
        all_losses,
        "each gateway once"
    );
    assert!(
        store
            .losses_of(&names(&["gw"]))
            .await
            .expect("losses of")
            .is_empty()
    );

    let chains = |list: Vec<super::ChainInfo>| {
        let mut v: Vec<String> = list
            .iter()
            .map(|c| {
                format!(
                    "{} {} {} {}",
                    c.gateway,
                    c.buffer_id,
                    c.verified_through,
                    c.breaks.len()
                )
            })
            .collect();
        v.sort();
        v
    };
    let all_chains = chains(store.chains().await.expect("chains"));
    let mine = chains(store.chains_of(&names(&[GW])).await.expect("chains of"));
    assert_eq!(
        mine.len(),
        2,
        "the linked stream and the one known by a break: {mine:?}"
    );
    assert_eq!(
        mine,
        all_chains
            .iter()
            .filter(|c| c.starts_with("gw-a "))
            .cloned()
            .collect::<Vec<_>>()
    );
    assert_eq!(
        chains(
            store
                .chains_of(&names(&[GW, "gw-a2"]))
                .await
                .expect("chains of")
        ),
        all_chains
    );
    assert!(
        store
            .chains_of(&names(&["nobody"]))
            .await
            .expect("chains of")
            .is_empty()
    );

    let t1 = store
        .series_by_tag(GW, "dev", "t1")
        .await
        .expect("by tag")
        .expect("t1 is a series");
    assert_eq!((t1.id, t1.good), (map.series[1], 2));
    let listed = store
        .series_of(&names(&[GW]))
        .await
        .expect("series of")
        .into_iter()
        .find(|s| s.id == t1.id)
        .expect("listed");
    assert_eq!(
        format!("{t1:?}"),
        format!("{listed:?}"),
        "the same row as `series_of`"
    );
    for (g, d, t) in [
        (GW, "dev", "t9"),
        (GW, "other", "t1"),
        ("gw", "dev", "t1"),
        ("gw-a2", "dev", "t1"),
    ] {
        assert!(
            store
                .series_by_tag(g, d, t)
                .await
                .expect("by tag")
                .is_none(),
            "{g}/{d}/{t}"
        );
    }
}

/// The gateways of some enterprises and the enterprises of a provider,
/// kept right as gateways move and enterprises change provider, and across
/// a reopen.
pub async fn owners_and_providers_are_found_without_reading_the_others<H: Harness>() {
    const A: &str = "91350100M000100Y43";
    const B: &str = "91110000802100433B";
    let place = H::new().await;
    let store = place.open().await;
    for g in ["gw-1", "gw-2", "gw-3"] {
        store.register_gateway(g, None).await.expect("register");
    }
    store
        .put_enterprise(&enterprise(A, "one"))
        .await
        .expect("put");
    let b = Enterprise {
        provider: "p2".into(),
        ..enterprise(B, "two")
    };
    store.put_enterprise(&b).await.expect("put");
    store.assign_gateway("gw-1", A).await.expect("assign");
    store.assign_gateway("gw-2", A).await.expect("assign");
    store.assign_gateway("gw-3", B).await.expect("assign");
    let of = |codes: &[&str]| codes.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    let owners = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(g, c)| (g.to_string(), c.to_string()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(
        store.gateways_of(&of(&[A])).await.expect("gateways of"),
        owners(&[("gw-1", A), ("gw-2", A)])
    );
    store.assign_gateway("gw-2", B).await.expect("move");
    store.unassign_gateway("gw-1").await.expect("unassign");
    assert!(
        store
            .gateways_of(&of(&[A]))
            .await
            .expect("gateways of")
            .is_empty()
    );
    assert_eq!(
        store.gateways_of(&of(&[B, A])).await.expect("gateways of"),
        store.gateway_owners().await.expect("owners"),
    );
    assert!(
        store
            .gateways_of(&of(&["91000000000000000X"]))
            .await
            .expect("none")
            .is_empty()
    );

    let codes = |list: Vec<Enterprise>| {
        let mut v: Vec<String> = list.into_iter().map(|e| e.code).collect();
        v.sort();
        v
    };
    assert_eq!(
        codes(store.enterprises_of_provider("p1").await.expect("p1")),
        [A]
    );
    assert_eq!(
        codes(store.enterprises_of_provider("p2").await.expect("p2")),
        [B]
    );
    assert!(
        store
            .enterprises_of_provider("p")
            .await
            .expect("p")
            .is_empty(),
        "a prefix is another provider"
    );
    // B changes provider: found under the new one only, with its new row.
    let moved = Enterprise {
        provider: "p1".into(),
        name: "two, moved".into(),
        ..b
    };
    store.put_enterprise(&moved).await.expect("move");
    assert!(
        store
            .enterprises_of_provider("p2")
            .await
            .expect("p2")
            .is_empty()
    );
    let p1 = store.enterprises_of_provider("p1").await.expect("p1");
    assert_eq!(
        codes(p1.clone()),
        [B, A]
            .iter()
            .map(|c| c.to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
    assert!(p1.contains(&moved));
    drop(store);
    let store = place.open().await;
    assert_eq!(
        codes(store.enterprises_of_provider("p1").await.expect("p1")).len(),
        2,
        "survives a reopen"
    );
    assert_eq!(
        store.gateways_of(&of(&[B])).await.expect("gateways of"),
        owners(&[("gw-2", B), ("gw-3", B)])
    );
}

/// Every write a report reads bumps the generation once it is visible;
/// reads and the access log leave it.
pub async fn the_generation_grows_with_every_change_and_only_then<H: Harness>() {
    const A: &str = "91350100M000100Y43";
    let place = H::new().await;
    let store = place.open().await;
    let mut seen = store.generation();
    let mut changed = |store: &H::Store, what: &str| {
        let now = store.generation();
        assert!(now > seen, "{what} bumps the generation");
        seen = now;
    };
    let map = put_manifest(&store, GW, 2, 1_000).await;
    changed(&store, "a manifest");
    store_batch(&store, &map, 1, &good(0, T0, 1_000, 0..3)).await;
    changed(&store, "an append");
    assert_eq!(
        count(&store, map.series[0]).await.good,
        3,
        "visible once bumped"
    );
    store_batch(&store, &map, 1, &good(0, T0, 1_000, 0..3)).await;
    changed(&store, "a duplicate (harmless)");
    store
        .register_gateway("gw-1", None)
        .await
        .expect("register");
    changed(&store, "a registration");
    store
        .put_enterprise(&enterprise(A, "one"))
        .await
        .expect("put");
    changed(&store, "an enterprise");
    store
        .put_equipment(A, &[equipment("e1", "gw-1")])
        .await
        .expect("equipment");
    changed(&store, "equipment");
    store.assign_gateway("gw-1", A).await.expect("assign");
    changed(&store, "an assignment");
    store
        .record_break(GW, BUFFER, 5, "key changed".into())
        .await
        .expect("break");
    changed(&store, "a break");

    let before = store.generation();
    store.series().await.expect("series");
    store.losses().await.expect("losses");
    store.chains().await.expect("chains");
    store.enterprises().await.expect("enterprises");
    store
        .log_access(&Access {
            at_ms: T0,
            account: "li".into(),
            role: Role::Reviewer,
            method: "GET".into(),
            path: "/city".into(),
            enterprise: String::new(),
        })
        .await
        .expect("log");
    assert_eq!(
        store.generation(),
        before,
        "reads and the access log change nothing"
    );
}

pub async fn gateway_configs_are_numbered_per_gateway_and_states_change_in_place<H: Harness>() {
    use crate::gateway_config::{ConfigState, ConfigVersion};
    let place = H::new().await;
    let store = place.open().await;
    let doc = |text: &str| ConfigVersion {
        version: 0,
        author: "prov".into(),
        at_ms: T0,
        devices: 1,
        text: text.into(),
    };
    assert!(matches!(
        store.add_gateway_config("gw-unknown", doc("a")).await,
        Err(StoreError::NotFound(_))
    ));
    for g in ["gw-1", "gw-2"] {
        store.register_gateway(g, None).await.expect("register");
    }
    assert_eq!(
        store.add_gateway_config("gw-1", doc("a")).await.ok(),
        Some(1)
    );
    assert_eq!(
        store.add_gateway_config("gw-2", doc("x")).await.ok(),
        Some(1)
    );
    assert_eq!(
        store.add_gateway_config("gw-1", doc("b")).await.ok(),
        Some(2)
    );
    let state = store
        .update_gateway_config_state("gw-1", Box::new(|s| s.requested(2, "prov", T0)))
        .await
        .expect("update");
    assert_eq!(state.requested, 2);
    drop(store);
    let store = place.open().await;
    let versions = store.gateway_configs("gw-1").await.expect("versions");
    let texts: Vec<(u64, &str)> = versions
        .iter()
        .map(|v| (v.version, v.text.as_str()))
        .collect();
    assert_eq!(texts, [(1, "a"), (2, "b")]);
    assert_eq!(store.gateway_configs("gw-3").await.expect("none"), []);
    let states = store.gateway_config_states().await.expect("states");
    assert_eq!(states.len(), 1);
    assert_eq!(
        states.get("gw-1"),
        Some(&ConfigState {
            requested: 2,
            requested_by: "prov".into(),
            requested_at_ms: T0,
            ..ConfigState::default()
        })
    );
    // A change built on the stored state, not a copy read earlier.
    let state = store
        .update_gateway_config_state("gw-1", Box::new(|s| s.ran(2, T0 + 1)))
        .await
        .expect("update");
    assert_eq!((state.requested, state.applied), (2, 2));
}

/// Registers `GW` with an ed25519 key bound, and its two-tag manifest;
/// returns the key its links are signed with.
pub(crate) async fn signing_gateway<S: Store>(
    store: &S,
) -> (ed25519_dalek::SigningKey, Arc<ManifestMap>) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let public =
        PublicKey::new(Algorithm::Ed25519, key.verifying_key().to_bytes().to_vec()).expect("key");
    store
        .register_gateway(GW, Some(public))
        .await
        .expect("register");
    (key, put_manifest(store, GW, 2, 1_000).await)
}

/// `verify-chain` from the stored bytes: real signatures with the bound
/// key, every rollup against the points; and the day's digest leaves.
pub async fn verify_rechecks_signed_links_and_rollups_and_days_are_digested_and_exported<
    H: Harness,
>() {
    let place = H::new().await;
    let store = place.open().await;
    let (key, map) = signing_gateway(&store).await;
    let mut chain = Chain::new();
    let mut head = String::new();
    for seq in 1..=4u64 {
        let from = seq as i64 * 10;
        let mut points = good(0, T0, 1_000, from..from + 3);
        points.push(point(1, T0 + from * 1_000, Quality::Bad));
        let b = batch(seq, &points);
        let mut link = chain.link(&b, true);
        link.signature = guantong_proto::chain::sign(&key, &link.effective_hash).to_vec();
        head = hex::encode(link.effective_hash);
        append_linked(&store, &map, b, link).await;
    }
    let v = store.verify_stored().await.expect("verify");
    assert_eq!(v.query_tables, Vec::<String>::new(), "rollups agree");
    assert_eq!(v.chains.len(), 1, "{:#?}", v.chains);
    let c = &v.chains[0];
    assert_eq!(
        (c.gateway.as_str(), c.first_seq, c.last_seq, c.links),
        (GW, 1, 4, 4)
    );
    assert!(c.breaks.is_empty(), "{:#?}", c.breaks);
    assert_eq!(c.head_hash, head);

    let received = T0 + 10_000 + 1_000;
    let day = crate::days::format(received.div_euclid(rollup::DAY_MS));
    let digests = store
        .day_digests(vec![GW.to_string()], day.clone())
        .await
        .expect("digest");
    assert_eq!(digests.len(), 1);
    let d = &digests[0];
    assert_eq!(
        (d.digest.subject.as_str(), d.digest.day.as_str()),
        (GW, day.as_str())
    );
    assert_eq!(
        (d.digest.leaves, d.leaves.len()),
        (4, 4),
        "every link of the day"
    );
    assert!(crate::evidence::digest::verify_signature(&d.digest));
    assert!(
        store
            .day_digests(vec!["gw-unknown".into()], day)
            .await
            .is_err(),
        "an unknown gateway is an error, not an empty digest"
    );

    // Links 2 and 3 hold the points of the window; the bundle carries them
    // with what is served for them, and verifies offline.
    let (from, to) = (T0 + 20_000, T0 + 33_000);
    let bundle = store
        .export_evidence(vec![GW.to_string()], from, to)
        .await
        .expect("export");
    assert_eq!(bundle.gateways.len(), 1);
    let g = &bundle.gateways[0];
    let seqs: Vec<u64> = g
        .streams
        .iter()
        .flat_map(|s| &s.links)
        .map(|l| l.seq)
        .collect();
    assert_eq!(
        seqs,
        vec![2, 3],
        "the links touching the window, contiguous"
    );
    assert_eq!(
        g.streams[0]
            .links
            .iter()
            .map(|l| l.served.points)
            .collect::<Vec<_>>(),
        vec![4, 4],
        "what the query tables serve for each batch"
    );
    let t0 = g
        .series
        .iter()
        .find(|r| r.tag == "t0")
        .expect("t0 reported");
    assert_eq!((t0.good, t0.bad), (6, 0));
    assert_eq!(g.days.len(), 1, "the digest of the day the links came");
    let verdict = crate::evidence::verify::verify(&bundle, &[]);
    assert_eq!(verdict.failures(), 0, "{:#?}", verdict.findings);
    assert!(
        store
            .export_evidence(vec![GW.to_string()], to, from)
            .await
            .is_err(),
        "an empty window is refused"
    );
}
