//! The store test suite against a real PostgreSQL server.
//!
//! The server is the one `GUANTONG_TEST_DATABASE_URL` names (default: the
//! local one `./test.sh` starts, `postgres://postgres@127.0.0.1:5432/postgres`).
//! Each case gets a schema of its own in the database `guantong_store_suite`
//! (created when missing), dropped when the case ends. No server fails every
//! case, saying so; nothing is skipped.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{PgStore, Target, migrate, pool};

fn server_url() -> String {
    std::env::var("GUANTONG_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

const DATABASE: &str = "guantong_store_suite";
static CREATED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// The suite's database, created when missing.
async fn suite_target() -> Target {
    let url = server_url();
    let admin = Target::new(&url, None).expect("GUANTONG_TEST_DATABASE_URL");
    let p = pool(&admin, 1).expect("pool");
    let client = p.get().await.unwrap_or_else(|e| {
        panic!(
            "no PostgreSQL at {} for the store suite ({e}); ./test.sh starts one",
            super::redact(&url)
        )
    });
    // Once per test process; two processes may still race: a database
    // that exists by then is fine, however the server says so.
    CREATED
        .get_or_init(|| async {
            let exists = client
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE])
                .await
                .expect("pg_database")
                .is_some();
            if !exists
                && let Err(e) = client
                    .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
                    .await
            {
                use tokio_postgres::error::SqlState;
                let code = e.code().cloned();
                assert!(
                    code == Some(SqlState::DUPLICATE_DATABASE)
                        || code == Some(SqlState::UNIQUE_VIOLATION),
                    "create {DATABASE}: {e:?}"
                );
            }
        })
        .await;
    let mut t = admin;
    t.config.dbname(DATABASE);
    t
}

/// A schema of one case.
pub(crate) struct Postgres {
    target: Target,
    schema: String,
}

static CASES: AtomicU64 = AtomicU64::new(0);

impl crate::store::suite::Harness for Postgres {
    type Store = PgStore;

    async fn new() -> Postgres {
        let base = suite_target().await;
        let schema = format!(
            "case_{}_{}_{:08x}",
            std::process::id(),
            CASES.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let p = pool(&base, 1).expect("pool");
        let client = p.get().await.expect("connect to the suite database");
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .expect("create schema");
        let mut target = base;
        target.config.options(format!("-c search_path={schema}"));
        let applied = migrate(&pool(&target, 1).expect("pool"))
            .await
            .expect("migrate");
        assert_eq!(applied, vec![1], "a new schema gets every migration");
        Postgres { target, schema }
    }

    async fn open(&self) -> PgStore {
        PgStore::open(&self.target)
            .await
            .expect("open the PostgreSQL store")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let (target, schema) = (self.target.clone(), self.schema.clone());
        // A runtime of its own: the case's may be ending.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(p) = pool(&target, 1)
                    && let Ok(c) = p.get().await
                {
                    let _ = c
                        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                        .await;
                }
            });
        })
        .join();
    }
}

crate::store_suite!(Postgres);

/// Retention drops whole days of points, never rows: a late point for a
/// dropped day makes its partition again (dropped at the next pass); the
/// minute rollups still count the dropped days, the chain stays whole,
/// `verify-chain` agrees, a bundle from the horizon on verifies offline,
/// and a window before it is refused.
#[tokio::test]
async fn retention_drops_whole_days_and_the_evidence_still_verifies() {
    use crate::store::Store;
    use crate::store::rollup::DAY_MS;
    use crate::store::suite::{
        Chain, GW, Harness, T0, all_points, append_linked, batch, good, signing_gateway,
    };
    use std::time::Duration;

    let place = Postgres::new().await;
    let store = place.open().await;
    let (key, map) = signing_gateway(&store).await;
    let mut chain = Chain::new();
    let mut seq = 0;
    let mut send = async |points: Vec<(u32, i64, guantong_proto::v1::Quality)>| {
        seq += 1;
        let b = batch(seq, &points);
        let mut link = chain.link(&b, true);
        link.signature = guantong_proto::chain::sign(&key, &link.effective_hash).to_vec();
        append_linked(&store, &map, b, link).await;
    };
    let (day1, day2) = (T0 + DAY_MS, T0 + 2 * DAY_MS);
    send(good(0, T0, 1_000, 0..3)).await;
    send(good(0, day1, 1_000, 0..3)).await;
    send(good(0, day2 - 2_000, 1_000, 0..4)).await; // across midnight
    let series = store
        .series_by_tag(GW, "dev", "t0")
        .await
        .expect("series")
        .expect("t0 stored")
        .id;
    let horizon = day1;
    let expire = async || {
        let mut client = store.pool.get().await.expect("client");
        super::partitions::expire(&mut client, day2 + 1_000, Duration::from_secs(86_400))
            .await
            .expect("expire")
    };
    let dropped = expire().await;
    assert_eq!(
        dropped,
        vec![super::partitions::name(T0)],
        "only the day that ended a day ago"
    );
    let times = |points: Vec<crate::store::StoredPoint>| -> Vec<i64> {
        points.iter().map(|p| p.time_ms).collect()
    };
    let kept = times(all_points(&store, series).await);
    assert!(kept.iter().all(|&t| t >= horizon), "{kept:?}");
    assert_eq!(kept.len(), 7, "the other days' points stay");
    let counted = store.window_counts(series, T0, day1).await.expect("counts");
    assert_eq!(
        counted.good, 3,
        "the minute rollups still count the dropped day"
    );

    // A late batch with a point of the dropped day and one after it.
    let mut late = good(0, T0, 1_000, 10..11);
    late.extend(good(0, day2, 1_000, 10..11));
    send(late).await;
    assert!(
        times(all_points(&store, series).await).contains(&(T0 + 10_000)),
        "the dropped day's partition is made again for a late point"
    );

    for pass in ["before the late point is dropped", "after"] {
        let v = store.verify_stored().await.expect("verify");
        assert_eq!(v.query_tables, Vec::<String>::new(), "{pass}");
        assert_eq!(v.chains.len(), 1);
        assert!(
            v.chains[0].breaks.is_empty(),
            "{pass}: {:#?}",
            v.chains[0].breaks
        );
        assert_eq!(v.chains[0].links, 4, "{pass}");
        let bundle = store
            .export_evidence(vec![GW.to_string()], horizon, day2 + DAY_MS)
            .await
            .expect("export from the horizon");
        assert_eq!(bundle.points_from_ms, Some(horizon));
        let links: Vec<(u64, u64)> = bundle.gateways[0].streams[0]
            .links
            .iter()
            .map(|l| (l.seq, l.served.points))
            .collect();
        assert_eq!(
            links,
            vec![(2, 3), (3, 4), (4, 1)],
            "{pass}: served after the horizon only"
        );
        let verdict = crate::evidence::verify::verify(&bundle, &[]);
        assert_eq!(verdict.failures(), 0, "{pass}: {:#?}", verdict.findings);
        assert!(
            verdict
                .findings
                .iter()
                .any(|f| f.to_string().contains("retention dropped")),
            "the verdict says which points it could not compare"
        );
        let refused = store
            .export_evidence(vec![GW.to_string()], T0, day2)
            .await
            .expect_err("a window before the horizon is refused");
        assert!(
            refused.to_string().contains("dropped by retention"),
            "{refused}"
        );
        if pass == "after" {
            break;
        }
        assert_eq!(expire().await, vec![super::partitions::name(T0)]);
        assert!(
            times(all_points(&store, series).await)
                .iter()
                .all(|&t| t >= horizon)
        );
    }
}

/// Links arriving after the one they wait for are walked a page at a time
/// (`CHAIN_PAGE` is 2 in tests): all five verify, with no break.
#[tokio::test]
async fn a_chain_waiting_for_one_link_is_walked_over_several_pages() {
    use crate::store::Store;
    use crate::store::suite::{
        Chain, GW, Harness, T0, append_linked, batch, good, signing_gateway,
    };

    let place = Postgres::new().await;
    let store = place.open().await;
    let (key, map) = signing_gateway(&store).await;
    let mut chain = Chain::new();
    let links: Vec<_> = (1..=5u64)
        .map(|seq| {
            let b = batch(seq, &good(0, T0 + seq as i64 * 10_000, 1_000, 0..2));
            let mut link = chain.link(&b, true);
            link.signature = guantong_proto::chain::sign(&key, &link.effective_hash).to_vec();
            (b, link)
        })
        .collect();
    for (b, link) in links[1..].iter().chain(&links[..1]) {
        append_linked(&store, &map, b.clone(), link.clone()).await;
    }
    let chains = store.chains().await.expect("chains");
    assert_eq!(chains.len(), 1);
    let c = &chains[0];
    assert_eq!((c.gateway.as_str(), c.verified_through), (GW, 5), "{c:#?}");
    assert!(c.breaks.is_empty(), "{:#?}", c.breaks);
}
