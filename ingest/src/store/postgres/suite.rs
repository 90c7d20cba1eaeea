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
