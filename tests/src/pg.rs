//! A PostgreSQL database of one test on the server `./test.sh` starts
//! (or the one `GUANTONG_TEST_DATABASE_URL` names), created at start and
//! dropped at the end, through the `psql` client.

use std::process::Command;

use anyhow::{Context, bail};

/// The server's address, a database on it to connect to for admin work.
fn server_url() -> String {
    std::env::var("GUANTONG_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").context("a postgres:// URL")? + 3;
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{name}", &base[..host_end]);
    if let Some(q) = query {
        out = format!("{out}?{q}");
    }
    Ok(out)
}

/// Runs `sql` on the server's admin database.
pub fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-tAc", sql])
        .output()
        .context("psql (./test.sh installs postgresql-client)")?;
    if !out.status.success() {
        bail!(
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub struct TestDb {
    pub name: String,
    /// What `--database` takes.
    pub url: String,
    admin: String,
}

impl TestDb {
    /// A new empty database `guantong_e2e_<what>_<pid>`.
    pub fn create(what: &str) -> anyhow::Result<TestDb> {
        TestDb::create_on(&server_url(), what)
    }

    /// `create` on the server `admin` names (a database on it to connect to).
    pub fn create_on(admin: &str, what: &str) -> anyhow::Result<TestDb> {
        let admin = admin.to_string();
        let name = format!("guantong_e2e_{what}_{}", std::process::id());
        psql(
            &admin,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )?;
        psql(&admin, &format!("CREATE DATABASE {name}"))
            .with_context(|| format!("no PostgreSQL at {admin}? ./test.sh starts one"))?;
        Ok(TestDb {
            url: with_database(&admin, &name)?,
            name,
            admin,
        })
    }

    /// Another database on the same server (a restore target), dropped with this one.
    pub fn sibling(&self, suffix: &str) -> anyhow::Result<TestDb> {
        TestDb::create(&format!(
            "{}_{suffix}",
            self.name.trim_start_matches("guantong_e2e_")
        ))
    }

    /// Applies the schema and opens the store, as `migrate` and `serve` do.
    pub async fn migrated_store(&self) -> anyhow::Result<guantong_ingest::store::any::AnyStore> {
        use guantong_ingest::store::postgres;
        let target = postgres::Target::new(&self.url, None)?;
        postgres::migrate(&postgres::pool(&target, 1)?).await?;
        Ok(guantong_ingest::store::any::AnyStore::Postgres(
            postgres::PgStore::open(&target).await?,
        ))
    }

    /// Drops it now (connections are ended).
    pub fn drop_now(&self) -> anyhow::Result<()> {
        psql(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        )?;
        Ok(())
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = self.drop_now();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_database_name_replaces_the_path_and_keeps_the_query() {
        assert_eq!(
            super::with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "x")
                .expect("url"),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            super::with_database("postgres://h", "x").expect("url"),
            "postgres://h/x"
        );
    }
}
