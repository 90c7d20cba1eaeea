//! Cloud configurations of gateways in the embedded store (see
//! `crate::gateway_config` for what they mean).
//!
//! | table            | key                    | value                 |
//! |------------------|------------------------|-----------------------|
//! | `gateway_configs`| (gateway id, version)  | JSON `ConfigVersion`  |
//! | `config_state`   | gateway id             | JSON `ConfigState`    |

use std::collections::BTreeMap;

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{Db, db_err};
use crate::gateway_config::{ConfigState, ConfigVersion};
use crate::store::{Result, StoreError};

pub(super) const GATEWAY_CONFIGS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("gateway_configs");
pub(super) const CONFIG_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("config_state");

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<()> {
    txn.open_table(GATEWAY_CONFIGS).map_err(db_err)?;
    txn.open_table(CONFIG_STATE).map_err(db_err)?;
    Ok(())
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Backend(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(b: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Backend(format!("{what}: {e}")))
}

impl Db<'_> {
    pub fn add_gateway_config(&self, gateway: &str, mut version: ConfigVersion) -> Result<u64> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let registered = txn.open_table(super::GATEWAYS).map_err(db_err)?;
            if registered.get(gateway).map_err(db_err)?.is_none() {
                return Err(StoreError::NotFound(format!("gateway {gateway}")));
            }
            let mut t = txn.open_table(GATEWAY_CONFIGS).map_err(db_err)?;
            let last = t
                .range((gateway, 0)..=(gateway, u64::MAX))
                .map_err(db_err)?
                .next_back()
                .transpose()
                .map_err(db_err)?
                .map_or(0, |(k, _)| k.value().1);
            version.version = last + 1;
            t.insert((gateway, version.version), json(&version)?.as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(version.version)
    }

    pub fn gateway_configs(&self, gateway: &str) -> Result<Vec<ConfigVersion>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(GATEWAY_CONFIGS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in t
            .range((gateway, 0)..=(gateway, u64::MAX))
            .map_err(db_err)?
        {
            let (_, v) = entry.map_err(db_err)?;
            out.push(parse(v.value(), "gateway config")?);
        }
        Ok(out)
    }

    pub fn gateway_config_states(&self) -> Result<BTreeMap<String, ConfigState>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(CONFIG_STATE).map_err(db_err)?;
        let mut out = BTreeMap::new();
        for entry in t.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            out.insert(k.value().to_string(), parse(v.value(), "config state")?);
        }
        Ok(out)
    }

    pub fn update_gateway_config_state(
        &self,
        gateway: &str,
        change: impl FnOnce(&mut ConfigState),
    ) -> Result<ConfigState> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let state = {
            let mut t = txn.open_table(CONFIG_STATE).map_err(db_err)?;
            let mut state: ConfigState = match t.get(gateway).map_err(db_err)? {
                Some(v) => parse(v.value(), "config state")?,
                None => ConfigState::default(),
            };
            let before = state.clone();
            change(&mut state);
            if state == before {
                return Ok(state);
            }
            t.insert(gateway, json(&state)?.as_slice())
                .map_err(db_err)?;
            state
        };
        txn.commit().map_err(db_err)?;
        Ok(state)
    }
}
