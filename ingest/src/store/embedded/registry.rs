//! Registry tables of the embedded store: enterprises, equipment registers,
//! gateway ownership, accounts and the access log.
//!
//! | table         | key                        | value                       |
//! |---------------|----------------------------|-----------------------------|
//! | `enterprises` | credit code                | JSON `Enterprise`           |
//! | `equipment`   | (credit code, equipment id)| JSON `Equipment`            |
//! | `owners`      | gateway id (registered)    | credit code                 |
//! | `enterprise_gateways` | (credit code, gateway id) | () : `owners` by enterprise |
//! | `provider_enterprises` | (provider, credit code) | () : `enterprises` by provider |
//! | `accounts`    | account name               | JSON `Account`              |
//! | `tokens`      | SHA-256 of a token         | account name                |
//! | `access_log`  | (time ms, sequence)        | JSON `Access`               |
//!
//! The two index tables are written in the same transaction as the rows
//! they index, so they always agree; a store written before they existed
//! gets them filled once when it is opened.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{
    ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Db, db_err};
use crate::registry::{Access, Account, Enterprise, Equipment, new_token, token_digest};
use crate::store::{Result, StoreError};

pub(super) const ENTERPRISES: TableDefinition<&str, &[u8]> = TableDefinition::new("enterprises");
pub(super) const EQUIPMENT: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("equipment");
pub(super) const OWNERS: TableDefinition<&str, &str> = TableDefinition::new("owners");
pub(super) const ENTERPRISE_GATEWAYS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("enterprise_gateways");
pub(super) const PROVIDER_ENTERPRISES: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("provider_enterprises");
pub(super) const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
pub(super) const TOKENS: TableDefinition<&[u8], &str> = TableDefinition::new("tokens");
pub(super) const ACCESS_LOG: TableDefinition<(i64, u64), &[u8]> =
    TableDefinition::new("access_log");

static ACCESS_SEQ: AtomicU64 = AtomicU64::new(0);

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<()> {
    txn.open_table(ENTERPRISES).map_err(db_err)?;
    txn.open_table(EQUIPMENT).map_err(db_err)?;
    txn.open_table(OWNERS).map_err(db_err)?;
    txn.open_table(ACCOUNTS).map_err(db_err)?;
    txn.open_table(TOKENS).map_err(db_err)?;
    txn.open_table(ACCESS_LOG).map_err(db_err)?;
    fill_indexes(txn)
}

/// Fills the index tables of a store written before they existed.
fn fill_indexes(txn: &WriteTransaction) -> Result<()> {
    let mut by_enterprise = txn.open_table(ENTERPRISE_GATEWAYS).map_err(db_err)?;
    let owners = txn.open_table(OWNERS).map_err(db_err)?;
    if by_enterprise.is_empty().map_err(db_err)? {
        for entry in owners.iter().map_err(db_err)? {
            let (gateway, code) = entry.map_err(db_err)?;
            by_enterprise
                .insert((code.value(), gateway.value()), ())
                .map_err(db_err)?;
        }
    }
    let mut by_provider = txn.open_table(PROVIDER_ENTERPRISES).map_err(db_err)?;
    let enterprises = txn.open_table(ENTERPRISES).map_err(db_err)?;
    if by_provider.is_empty().map_err(db_err)? {
        for entry in enterprises.iter().map_err(db_err)? {
            let (code, e) = entry.map_err(db_err)?;
            let e: Enterprise = parse(e.value(), "enterprise")?;
            by_provider
                .insert((e.provider.as_str(), code.value()), ())
                .map_err(db_err)?;
        }
    }
    Ok(())
}

fn require_enterprise(txn: &WriteTransaction, code: &str) -> Result<()> {
    let t = txn.open_table(ENTERPRISES).map_err(db_err)?;
    if t.get(code).map_err(db_err)?.is_none() {
        return Err(StoreError::NotFound(format!("enterprise {code}")));
    }
    Ok(())
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Backend(e.to_string()))
}

fn parse<T: DeserializeOwned>(b: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Backend(format!("{what}: {e}")))
}

impl Db<'_> {
    pub fn put_enterprise(&self, e: &Enterprise) -> Result<()> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(ENTERPRISES).map_err(db_err)?;
            let mut by_provider = txn.open_table(PROVIDER_ENTERPRISES).map_err(db_err)?;
            if let Some(old) = t
                .insert(e.code.as_str(), json(e)?.as_slice())
                .map_err(db_err)?
            {
                let old: Enterprise = parse(old.value(), "enterprise")?;
                by_provider
                    .remove((old.provider.as_str(), e.code.as_str()))
                    .map_err(db_err)?;
            }
            by_provider
                .insert((e.provider.as_str(), e.code.as_str()), ())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }

    /// The enterprises of `provider`, by the provider index.
    pub fn enterprises_of_provider(&self, provider: &str) -> Result<Vec<Enterprise>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let by_provider = txn.open_table(PROVIDER_ENTERPRISES).map_err(db_err)?;
        let t = txn.open_table(ENTERPRISES).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in by_provider.range((provider, "")..).map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            let (p, code) = k.value();
            if p != provider {
                break;
            }
            if let Some(v) = t.get(code).map_err(db_err)? {
                out.push(parse(v.value(), "enterprise")?);
            }
        }
        Ok(out)
    }

    pub fn enterprises(&self) -> Result<Vec<Enterprise>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(ENTERPRISES).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(db_err)? {
            let (_, v) = entry.map_err(db_err)?;
            out.push(parse(v.value(), "enterprise")?);
        }
        Ok(out)
    }

    pub fn enterprise(&self, code: &str) -> Result<Option<Enterprise>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(ENTERPRISES).map_err(db_err)?;
        match t.get(code).map_err(db_err)? {
            Some(v) => Ok(Some(parse(v.value(), "enterprise")?)),
            None => Ok(None),
        }
    }

    /// Replaces an enterprise's equipment register.
    pub fn put_equipment(&self, code: &str, list: &[Equipment]) -> Result<()> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            require_enterprise(&txn, code)?;
            let mut t = txn.open_table(EQUIPMENT).map_err(db_err)?;
            let old: Vec<String> = t
                .range((code, "")..)
                .map_err(db_err)?
                .map_while(|e| e.ok())
                .take_while(|(k, _)| k.value().0 == code)
                .map(|(k, _)| k.value().1.to_string())
                .collect();
            for id in old {
                t.remove((code, id.as_str())).map_err(db_err)?;
            }
            for e in list {
                t.insert((code, e.id.as_str()), json(e)?.as_slice())
                    .map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }

    pub fn equipment(&self, code: &str) -> Result<Vec<Equipment>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(EQUIPMENT).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in t.range((code, "")..).map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            if k.value().0 != code {
                break;
            }
            out.push(parse(v.value(), "equipment")?);
        }
        Ok(out)
    }

    /// Makes `gateway` belong to enterprise `code`; both must exist.
    pub fn assign_gateway(&self, gateway: &str, code: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            require_enterprise(&txn, code)?;
            let registered = txn.open_table(super::GATEWAYS).map_err(db_err)?;
            if registered.get(gateway).map_err(db_err)?.is_none() {
                return Err(StoreError::NotFound(format!(
                    "gateway {gateway} (register it first: `guantong-ingest register-gateway`)"
                )));
            }
            let previous = txn
                .open_table(OWNERS)
                .map_err(db_err)?
                .insert(gateway, code)
                .map_err(db_err)?
                .map(|c| c.value().to_string());
            let mut by_enterprise = txn.open_table(ENTERPRISE_GATEWAYS).map_err(db_err)?;
            if let Some(previous) = previous {
                by_enterprise
                    .remove((previous.as_str(), gateway))
                    .map_err(db_err)?;
            }
            by_enterprise.insert((code, gateway), ()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }

    /// Makes `gateway` belong to no enterprise; false if it belonged to none.
    pub fn unassign_gateway(&self, gateway: &str) -> Result<bool> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let removed = txn
            .open_table(OWNERS)
            .map_err(db_err)?
            .remove(gateway)
            .map_err(db_err)?
            .map(|c| c.value().to_string());
        if let Some(code) = &removed {
            txn.open_table(ENTERPRISE_GATEWAYS)
                .map_err(db_err)?
                .remove((code.as_str(), gateway))
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(removed.is_some())
    }

    /// gateway id -> enterprise credit code.
    pub fn gateway_owners(&self) -> Result<BTreeMap<String, String>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(OWNERS).map_err(db_err)?;
        let mut out = BTreeMap::new();
        for entry in t.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            out.insert(k.value().to_string(), v.value().to_string());
        }
        Ok(out)
    }

    /// The gateways of enterprises `codes`, by the enterprise index.
    pub fn gateways_of(&self, codes: &[String]) -> Result<BTreeMap<String, String>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(ENTERPRISE_GATEWAYS).map_err(db_err)?;
        let mut out = BTreeMap::new();
        for code in codes {
            for entry in t.range((code.as_str(), "")..).map_err(db_err)? {
                let (k, _) = entry.map_err(db_err)?;
                let (c, gateway) = k.value();
                if c != code {
                    break;
                }
                out.insert(gateway.to_string(), code.clone());
            }
        }
        Ok(out)
    }

    /// Creates or replaces an account and returns its new token (the old
    /// token, if any, stops working).
    pub fn put_account(&self, a: &Account) -> Result<String> {
        let token = new_token();
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut tokens = txn.open_table(TOKENS).map_err(db_err)?;
            let stale: Vec<Vec<u8>> = tokens
                .iter()
                .map_err(db_err)?
                .filter_map(|e| e.ok())
                .filter(|(_, v)| v.value() == a.name)
                .map(|(k, _)| k.value().to_vec())
                .collect();
            for k in stale {
                tokens.remove(k.as_slice()).map_err(db_err)?;
            }
            tokens
                .insert(token_digest(&token).as_slice(), a.name.as_str())
                .map_err(db_err)?;
            txn.open_table(ACCOUNTS)
                .map_err(db_err)?
                .insert(a.name.as_str(), json(a)?.as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(token)
    }

    pub fn account_by_token(&self, token: &str) -> Result<Option<Account>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let tokens = txn.open_table(TOKENS).map_err(db_err)?;
        let Some(name) = tokens.get(token_digest(token).as_slice()).map_err(db_err)? else {
            return Ok(None);
        };
        let accounts = txn.open_table(ACCOUNTS).map_err(db_err)?;
        match accounts.get(name.value()).map_err(db_err)? {
            Some(v) => Ok(Some(parse(v.value(), "account")?)),
            None => Ok(None),
        }
    }

    pub fn accounts(&self) -> Result<Vec<Account>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(ACCOUNTS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(db_err)? {
            let (_, v) = entry.map_err(db_err)?;
            out.push(parse(v.value(), "account")?);
        }
        Ok(out)
    }

    pub fn log_access(&self, a: &Access) -> Result<()> {
        let seq = ACCESS_SEQ.fetch_add(1, Ordering::Relaxed);
        let txn = self.db.begin_write().map_err(db_err)?;
        txn.open_table(ACCESS_LOG)
            .map_err(db_err)?
            .insert((a.at_ms, seq), json(a)?.as_slice())
            .map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(())
    }

    /// The latest `limit` accesses, newest first.
    pub fn access_log(&self, limit: usize) -> Result<Vec<Access>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(ACCESS_LOG).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(db_err)?.rev().take(limit) {
            let (_, v) = entry.map_err(db_err)?;
            out.push(parse(v.value(), "access")?);
        }
        Ok(out)
    }
}
