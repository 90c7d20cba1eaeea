//! The store `serve` and the commands run on, chosen at start: the embedded
//! store in the data directory, or PostgreSQL when a database is named.
//! Each call goes to the backend as it is; nothing is decided here.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use guantong_proto::chain::PublicKey;
use guantong_proto::v1::Manifest;

use super::embedded::EmbeddedStore;
use super::postgres::PgStore;
use super::rollup::{GatewayDay, HourRow, SeriesDay};
use super::{
    AppendBatch, Appended, BackupInfo, ChainInfo, GatewayInfo, LossInfo, ManifestMap, Result,
    RunsQuery, SeriesInfo, Store, StoreVerification, StoredPoint, WindowCounts,
};
use crate::evidence::bundle::{Bundle, DayEvidence};
use crate::gateway_config::{ConfigState, ConfigVersion};
use crate::registry::{Access, Account, Enterprise, Equipment};

pub enum AnyStore {
    Embedded(EmbeddedStore),
    Postgres(PgStore),
}

/// Calls `$call` on whichever backend `$self` is.
macro_rules! each {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Embedded($s) => $call,
            AnyStore::Postgres($s) => $call,
        }
    };
}

impl AnyStore {
    /// Writes rollup rows directly, as a benchmark's stand-in for weeks of
    /// ingested points (the report reads nothing else).
    #[doc(hidden)]
    pub async fn bench_put_rollups(
        &self,
        days: Vec<(u64, i64, SeriesDay)>,
        runs: Vec<(u64, u8, i64, i64)>,
        hours: Vec<(u64, i64, super::rollup::HourStats)>,
        gateway_days: Vec<(String, i64, GatewayDay)>,
    ) -> Result<()> {
        match self {
            AnyStore::Embedded(s) => s.bench_put_rollups(days, runs, hours, gateway_days),
            AnyStore::Postgres(s) => s.bench_put_rollups(days, runs, hours, gateway_days).await,
        }
    }

    /// Moves every series' creation time to `created_ms` (benchmarks of
    /// long windows).
    #[doc(hidden)]
    pub async fn bench_backdate_series(&self, created_ms: i64) -> Result<()> {
        match self {
            AnyStore::Embedded(s) => s.bench_backdate_series(created_ms),
            AnyStore::Postgres(s) => s.bench_backdate_series(created_ms).await,
        }
    }
}

impl Store for AnyStore {
    fn generation(&self) -> u64 {
        each!(self, s => s.generation())
    }
    async fn register_gateway(&self, id: &str, public_key: Option<PublicKey>) -> Result<String> {
        each!(self, s => s.register_gateway(id, public_key).await)
    }
    async fn gateway_key(&self, id: &str) -> Result<Option<(PublicKey, String)>> {
        each!(self, s => s.gateway_key(id).await)
    }
    async fn bind_key_on_first_use(&self, id: &str, public_key: PublicKey) -> Result<()> {
        each!(self, s => s.bind_key_on_first_use(id, public_key).await)
    }
    async fn record_break(
        &self,
        gateway: &str,
        buffer_id: u64,
        seq: u64,
        reason: String,
    ) -> Result<()> {
        each!(self, s => s.record_break(gateway, buffer_id, seq, reason).await)
    }
    async fn chains(&self) -> Result<Vec<ChainInfo>> {
        each!(self, s => s.chains().await)
    }
    async fn chains_of(&self, gateways: &[String]) -> Result<Vec<ChainInfo>> {
        each!(self, s => s.chains_of(gateways).await)
    }
    async fn authenticate(&self, id: &str, token: &str) -> Result<bool> {
        each!(self, s => s.authenticate(id, token).await)
    }
    async fn rotate_token(&self, id: &str, grace: std::time::Duration) -> Result<String> {
        each!(self, s => s.rotate_token(id, grace).await)
    }
    async fn gateways(&self) -> Result<Vec<GatewayInfo>> {
        each!(self, s => s.gateways().await)
    }
    async fn open_stream(&self, gateway: &str, buffer_id: u64, first_unacked: u64) -> Result<u64> {
        each!(self, s => s.open_stream(gateway, buffer_id, first_unacked).await)
    }
    async fn put_manifest(&self, gateway: &str, manifest: Manifest) -> Result<Arc<ManifestMap>> {
        each!(self, s => s.put_manifest(gateway, manifest).await)
    }
    async fn manifest_map(&self, gateway: &str, version: u64) -> Result<Option<Arc<ManifestMap>>> {
        each!(self, s => s.manifest_map(gateway, version).await)
    }
    fn append(
        &self,
        batch: AppendBatch,
    ) -> impl Future<Output = Result<Appended>> + Send + 'static {
        // Queued now (the order of appends), awaited later.
        use futures_util::future::Either;
        match self {
            AnyStore::Embedded(s) => Either::Left(s.append(batch)),
            AnyStore::Postgres(s) => Either::Right(s.append(batch)),
        }
    }
    async fn series(&self) -> Result<Vec<SeriesInfo>> {
        each!(self, s => s.series().await)
    }
    async fn series_of(&self, gateways: &[String]) -> Result<Vec<SeriesInfo>> {
        each!(self, s => s.series_of(gateways).await)
    }
    async fn series_by_tag(
        &self,
        gateway: &str,
        device: &str,
        tag: &str,
    ) -> Result<Option<SeriesInfo>> {
        each!(self, s => s.series_by_tag(gateway, device, tag).await)
    }
    async fn window_counts_of(
        &self,
        series: Vec<u64>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<WindowCounts>> {
        each!(self, s => s.window_counts_of(series, from_ms, to_ms).await)
    }
    async fn points(
        &self,
        series: u64,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredPoint>> {
        each!(self, s => s.points(series, from_ms, to_ms, limit).await)
    }
    async fn losses(&self) -> Result<Vec<LossInfo>> {
        each!(self, s => s.losses().await)
    }
    async fn losses_of(&self, gateways: &[String]) -> Result<Vec<LossInfo>> {
        each!(self, s => s.losses_of(gateways).await)
    }
    async fn put_enterprise(&self, e: &Enterprise) -> Result<()> {
        each!(self, s => s.put_enterprise(e).await)
    }
    async fn enterprises(&self) -> Result<Vec<Enterprise>> {
        each!(self, s => s.enterprises().await)
    }
    async fn enterprise(&self, code: &str) -> Result<Option<Enterprise>> {
        each!(self, s => s.enterprise(code).await)
    }
    async fn put_equipment(&self, code: &str, list: &[Equipment]) -> Result<()> {
        each!(self, s => s.put_equipment(code, list).await)
    }
    async fn equipment(&self, code: &str) -> Result<Vec<Equipment>> {
        each!(self, s => s.equipment(code).await)
    }
    async fn assign_gateway(&self, gateway: &str, code: &str) -> Result<()> {
        each!(self, s => s.assign_gateway(gateway, code).await)
    }
    async fn unassign_gateway(&self, gateway: &str) -> Result<bool> {
        each!(self, s => s.unassign_gateway(gateway).await)
    }
    async fn gateway_owners(&self) -> Result<BTreeMap<String, String>> {
        each!(self, s => s.gateway_owners().await)
    }
    async fn gateways_of(&self, codes: &[String]) -> Result<BTreeMap<String, String>> {
        each!(self, s => s.gateways_of(codes).await)
    }
    async fn enterprises_of_provider(&self, provider: &str) -> Result<Vec<Enterprise>> {
        each!(self, s => s.enterprises_of_provider(provider).await)
    }
    async fn add_gateway_config(&self, gateway: &str, version: ConfigVersion) -> Result<u64> {
        each!(self, s => s.add_gateway_config(gateway, version).await)
    }
    async fn gateway_configs(&self, gateway: &str) -> Result<Vec<ConfigVersion>> {
        each!(self, s => s.gateway_configs(gateway).await)
    }
    async fn gateway_config_states(&self) -> Result<BTreeMap<String, ConfigState>> {
        each!(self, s => s.gateway_config_states().await)
    }
    async fn update_gateway_config_state(
        &self,
        gateway: &str,
        change: Box<dyn FnOnce(&mut ConfigState) + Send>,
    ) -> Result<ConfigState> {
        each!(self, s => s.update_gateway_config_state(gateway, change).await)
    }
    async fn put_account(&self, a: &Account) -> Result<String> {
        each!(self, s => s.put_account(a).await)
    }
    async fn account_by_token(&self, token: &str) -> Result<Option<Account>> {
        each!(self, s => s.account_by_token(token).await)
    }
    async fn accounts(&self) -> Result<Vec<Account>> {
        each!(self, s => s.accounts().await)
    }
    async fn log_access(&self, a: &Access) -> Result<()> {
        each!(self, s => s.log_access(a).await)
    }
    async fn access_log(&self, limit: usize) -> Result<Vec<Access>> {
        each!(self, s => s.access_log(limit).await)
    }
    async fn series_days(
        &self,
        series: &[u64],
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<(u64, i64, SeriesDay)>> {
        each!(self, s => s.series_days(series, from_day, to_day).await)
    }
    async fn series_runs_of(&self, queries: Vec<RunsQuery>) -> Result<Vec<Vec<(i64, i64)>>> {
        each!(self, s => s.series_runs_of(queries).await)
    }
    async fn series_hours_of(
        &self,
        series: Vec<u64>,
        from: i64,
        to: i64,
    ) -> Result<Vec<Vec<HourRow>>> {
        each!(self, s => s.series_hours_of(series, from, to).await)
    }
    async fn gateway_days(
        &self,
        gateway: &str,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<(i64, GatewayDay)>> {
        each!(self, s => s.gateway_days(gateway, from_day, to_day).await)
    }
    async fn export_evidence(
        &self,
        gateways: Vec<String>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Bundle> {
        each!(self, s => s.export_evidence(gateways, from_ms, to_ms).await)
    }
    async fn day_digests(&self, gateways: Vec<String>, day: String) -> Result<Vec<DayEvidence>> {
        each!(self, s => s.day_digests(gateways, day).await)
    }
    async fn verify_stored(&self) -> Result<StoreVerification> {
        each!(self, s => s.verify_stored().await)
    }
    async fn backup(&self, out: PathBuf) -> Result<BackupInfo> {
        each!(self, s => s.backup(out).await)
    }
}
