//! Registry rows of the PostgreSQL store: gateways and their tokens and
//! keys, enterprises, equipment, owners, accounts and cloud configurations.
//! Records are the JSON the embedded store keeps (`store::records`,
//! `crate::registry`); what a token or key change means is decided there.

use std::collections::BTreeMap;
use std::time::Duration;

use deadpool_postgres::Object;
use guantong_proto::chain::PublicKey;
use tokio_postgres::types::Json;

use super::pg_err;
use crate::gateway_config::{ConfigState, ConfigVersion};
use crate::registry::{
    Account, Enterprise, Equipment, new_token as new_account_token, token_digest,
};
use crate::store::records::GatewayRecord;
use crate::store::{Result, StoreError};

fn unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

pub(super) async fn register_gateway(
    client: &Object,
    id: &str,
    public_key: Option<PublicKey>,
) -> Result<String> {
    let (record, token) = GatewayRecord::new(public_key);
    match client
        .execute(
            "INSERT INTO gateways (id, record, registered_at_ms) VALUES ($1, $2, $3)",
            &[&id, &Json(&record), &record.registered_at_ms],
        )
        .await
    {
        Ok(_) => Ok(token),
        Err(e) if unique_violation(&e) => Err(StoreError::Exists(format!("gateway `{id}`"))),
        Err(e) => Err(pg_err(e)),
    }
}

/// Changes a gateway's record in one transaction (the row locked).
async fn change_gateway<T>(
    client: &mut Object,
    id: &str,
    missing: impl FnOnce() -> StoreError,
    change: impl FnOnce(&mut GatewayRecord) -> Result<T>,
) -> Result<T> {
    let txn = client.transaction().await.map_err(pg_err)?;
    let Some(row) = txn
        .query_opt(
            "SELECT record FROM gateways WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await
        .map_err(pg_err)?
    else {
        return Err(missing());
    };
    let mut record: GatewayRecord = row.get::<_, Json<GatewayRecord>>(0).0;
    let out = change(&mut record)?;
    txn.execute(
        "UPDATE gateways SET record = $2 WHERE id = $1",
        &[&id, &Json(&record)],
    )
    .await
    .map_err(pg_err)?;
    txn.commit().await.map_err(pg_err)?;
    Ok(out)
}

pub(super) async fn rotate_token(client: &mut Object, id: &str, grace: Duration) -> Result<String> {
    change_gateway(
        client,
        id,
        || StoreError::Invalid(format!("no gateway `{id}`")),
        |record| Ok(record.rotate(grace)),
    )
    .await
}

pub(super) async fn bind_key(client: &mut Object, id: &str, key: PublicKey) -> Result<()> {
    change_gateway(
        client,
        id,
        || StoreError::NotFound(format!("gateway `{id}`")),
        |record| {
            if record.public_key.is_some() {
                return Err(StoreError::Exists(format!("a key of gateway `{id}`")));
            }
            record.bind(key, "trust-on-first-use");
            Ok(())
        },
    )
    .await
}

pub(super) async fn put_enterprise(client: &Object, e: &Enterprise) -> Result<()> {
    client
        .execute(
            "INSERT INTO enterprises (code, provider, record) VALUES ($1, $2, $3) \
             ON CONFLICT (code) DO UPDATE SET provider = excluded.provider, record = excluded.record",
            &[&e.code, &e.provider, &Json(e)],
        )
        .await
        .map_err(pg_err)?;
    Ok(())
}

/// Every enterprise, or those of one provider, by credit code.
pub(super) async fn enterprises(
    client: &Object,
    provider: Option<&str>,
) -> Result<Vec<Enterprise>> {
    let all = provider.is_none();
    let provider = provider.unwrap_or_default();
    Ok(client
        .query(
            "SELECT record FROM enterprises WHERE $1 OR provider = $2 ORDER BY code",
            &[&all, &provider],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| r.get::<_, Json<Enterprise>>(0).0)
        .collect())
}

pub(super) async fn enterprise(client: &Object, code: &str) -> Result<Option<Enterprise>> {
    Ok(client
        .query_opt("SELECT record FROM enterprises WHERE code = $1", &[&code])
        .await
        .map_err(pg_err)?
        .map(|r| r.get::<_, Json<Enterprise>>(0).0))
}

async fn require_enterprise(txn: &deadpool_postgres::Transaction<'_>, code: &str) -> Result<()> {
    let found = txn
        .query_opt(
            "SELECT 1 FROM enterprises WHERE code = $1 FOR SHARE",
            &[&code],
        )
        .await
        .map_err(pg_err)?;
    match found {
        Some(_) => Ok(()),
        None => Err(StoreError::NotFound(format!("enterprise {code}"))),
    }
}

pub(super) async fn put_equipment(
    client: &mut Object,
    code: &str,
    list: &[Equipment],
) -> Result<()> {
    let txn = client.transaction().await.map_err(pg_err)?;
    require_enterprise(&txn, code).await?;
    txn.execute("DELETE FROM equipment WHERE code = $1", &[&code])
        .await
        .map_err(pg_err)?;
    // A register naming one id twice keeps the last, as the embedded store.
    let mut rows: BTreeMap<&str, &Equipment> = BTreeMap::new();
    for e in list {
        rows.insert(e.id.as_str(), e);
    }
    let ids: Vec<&str> = rows.keys().copied().collect();
    let records: Vec<Json<&Equipment>> = rows.values().map(|e| Json(*e)).collect();
    txn.execute(
        "INSERT INTO equipment (code, id, record) SELECT $1, * FROM unnest($2::text[], $3::jsonb[])",
        &[&code, &ids, &records],
    )
    .await
    .map_err(pg_err)?;
    txn.commit().await.map_err(pg_err)?;
    Ok(())
}

pub(super) async fn equipment(client: &Object, code: &str) -> Result<Vec<Equipment>> {
    Ok(client
        .query(
            "SELECT record FROM equipment WHERE code = $1 ORDER BY id",
            &[&code],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| r.get::<_, Json<Equipment>>(0).0)
        .collect())
}

pub(super) async fn assign_gateway(client: &mut Object, gateway: &str, code: &str) -> Result<()> {
    let txn = client.transaction().await.map_err(pg_err)?;
    require_enterprise(&txn, code).await?;
    if txn
        .query_opt(
            "SELECT 1 FROM gateways WHERE id = $1 FOR SHARE",
            &[&gateway],
        )
        .await
        .map_err(pg_err)?
        .is_none()
    {
        return Err(StoreError::NotFound(format!(
            "gateway {gateway} (register it first: `guantong-ingest register-gateway`)"
        )));
    }
    txn.execute(
        "INSERT INTO owners (gateway, code) VALUES ($1, $2) ON CONFLICT (gateway) DO UPDATE SET code = excluded.code",
        &[&gateway, &code],
    )
    .await
    .map_err(pg_err)?;
    txn.commit().await.map_err(pg_err)?;
    Ok(())
}

/// gateway id -> credit code, of every gateway or of enterprises `codes`.
pub(super) async fn owners(
    client: &Object,
    codes: Option<&[String]>,
) -> Result<BTreeMap<String, String>> {
    let all = codes.is_none();
    let codes = codes.unwrap_or_default();
    Ok(client
        .query(
            "SELECT gateway, code FROM owners WHERE $1 OR code = ANY($2)",
            &[&all, &codes],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

pub(super) async fn add_gateway_config(
    client: &mut Object,
    gateway: &str,
    mut version: ConfigVersion,
) -> Result<u64> {
    let txn = client.transaction().await.map_err(pg_err)?;
    // The gateway row, locked, orders concurrent additions.
    if txn
        .query_opt(
            "SELECT 1 FROM gateways WHERE id = $1 FOR UPDATE",
            &[&gateway],
        )
        .await
        .map_err(pg_err)?
        .is_none()
    {
        return Err(StoreError::NotFound(format!("gateway {gateway}")));
    }
    let last: Option<i64> = txn
        .query_one(
            "SELECT max(version) FROM gateway_configs WHERE gateway = $1",
            &[&gateway],
        )
        .await
        .map_err(pg_err)?
        .get(0);
    version.version = last.unwrap_or(0) as u64 + 1;
    txn.execute(
        "INSERT INTO gateway_configs (gateway, version, record) VALUES ($1, $2, $3)",
        &[&gateway, &(version.version as i64), &Json(&version)],
    )
    .await
    .map_err(pg_err)?;
    txn.commit().await.map_err(pg_err)?;
    Ok(version.version)
}

/// Changes a gateway's configuration state in one transaction; returns the
/// state and whether it changed.
pub(super) async fn update_config_state(
    client: &mut Object,
    gateway: &str,
    change: Box<dyn FnOnce(&mut ConfigState) + Send>,
) -> Result<(ConfigState, bool)> {
    let txn = client.transaction().await.map_err(pg_err)?;
    // Serialises changes of one gateway's state across replicas, whether
    // or not it has a row yet.
    txn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('config_state/' || $1, 0))",
        &[&gateway],
    )
    .await
    .map_err(pg_err)?;
    let mut state = txn
        .query_opt(
            "SELECT state FROM gateway_config_states WHERE gateway = $1",
            &[&gateway],
        )
        .await
        .map_err(pg_err)?
        .map(|r| r.get::<_, Json<ConfigState>>(0).0)
        .unwrap_or_default();
    let before = state.clone();
    change(&mut state);
    if state == before {
        return Ok((state, false));
    }
    txn.execute(
        "INSERT INTO gateway_config_states (gateway, state) VALUES ($1, $2) \
         ON CONFLICT (gateway) DO UPDATE SET state = excluded.state",
        &[&gateway, &Json(&state)],
    )
    .await
    .map_err(pg_err)?;
    txn.commit().await.map_err(pg_err)?;
    Ok((state, true))
}

/// Creates or replaces an account; its previous token stops working.
pub(super) async fn put_account(client: &mut Object, a: &Account) -> Result<String> {
    let token = new_account_token();
    client
        .execute(
            "INSERT INTO accounts (name, token_sha256, record) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET token_sha256 = excluded.token_sha256, record = excluded.record",
            &[&a.name, &token_digest(&token).as_slice(), &Json(a)],
        )
        .await
        .map_err(pg_err)?;
    Ok(token)
}

/// Records a gateway certificate (lowercase hex `serial`) as revoked.
pub async fn revoke_certificate(
    pool: &deadpool_postgres::Pool,
    serial: &str,
    gateway: &str,
) -> Result<()> {
    let client = pool.get().await.map_err(super::pool_err)?;
    client
        .execute(
            "INSERT INTO revoked_certificates (serial, gateway, revoked_at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (serial) DO NOTHING",
            &[&serial, &gateway, &crate::store::records::now_ms()],
        )
        .await
        .map_err(pg_err)?;
    Ok(())
}

/// Whether the certificate with this serial is revoked.
pub async fn is_revoked(pool: &deadpool_postgres::Pool, serial: &str) -> Result<bool> {
    let client = pool.get().await.map_err(super::pool_err)?;
    let row = client
        .query_opt(
            "SELECT 1 FROM revoked_certificates WHERE serial = $1",
            &[&serial],
        )
        .await
        .map_err(pg_err)?;
    Ok(row.is_some())
}

/// Every revoked serial.
pub async fn revoked_certificates(
    pool: &deadpool_postgres::Pool,
) -> Result<std::collections::HashSet<String>> {
    let client = pool.get().await.map_err(super::pool_err)?;
    Ok(client
        .query("SELECT serial FROM revoked_certificates", &[])
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| r.get(0))
        .collect())
}
