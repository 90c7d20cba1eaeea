//! The fleet view: every gateway an operator looks after, in one table
//! (`GET /api/v1/gateways`, the `/gateways` page).
//!
//! # Design
//! A row joins four sources, none of which is evidence:
//! - the registry: the gateway, its enterprise and that enterprise's provider;
//! - this process's connections ([`Connections`]): online or offline and
//!   since when, the software version from `Hello`, the last batch stored;
//! - the gateway's latest `Health` report on its stream (its own view of its
//!   buffer, backlog, clock offset and devices), checked by
//!   [`HealthView::from_wire`] and kept in memory, never stored;
//! - the store's chain state per gateway (verified through, waiting, breaks)
//!   and its cloud configuration state (requested and applied versions, the
//!   latest refusal: `crate::gateway_config`).
//!
//! # Invariants
//! - Admins see every gateway, providers the gateways of their enterprises;
//!   reviewers are refused (operations are not acceptance evidence).
//! - What a gateway reports about itself is shown as reported, with the time
//!   it arrived; a report that breaks the limits is dropped whole and logged,
//!   never shown in part.
//! - Connection state lives in this process: after a restart of ingest a
//!   gateway shows offline, since unknown, until it reconnects.

use std::collections::BTreeMap;

use guantong_proto::v1::{DeviceState, Health};
use serde::{Deserialize, Serialize};

use crate::grpc::ConnectionInfo;
use crate::http::{ApiError, rfc3339};
use crate::registry::{Enterprise, Role};
use crate::store::{ChainInfo, GatewayInfo};
use crate::web::Viewer;

/// Most devices a health report may list (the manifest's own bound is on tags).
pub const MAX_HEALTH_DEVICES: usize = 10_000;
/// Longest id, protocol or version in a health report, in bytes.
const MAX_HEALTH_NAME: usize = 256;
/// Longest reason in a health report, in bytes.
const MAX_HEALTH_REASON: usize = 1024;

/// A gateway's latest health report, as checked and kept by ingest.
#[derive(Debug, Clone, Serialize)]
pub struct HealthView {
    pub received_at: String,
    /// The gateway's clock when it took the report.
    pub taken_at: String,
    pub software_version: String,
    pub manifest_version: String,
    pub buffer_used_bytes: u64,
    pub buffer_max_bytes: u64,
    /// used / max, 0..=1 (0 when the bound is unknown).
    pub buffer_fill: f64,
    pub pending_batches: u64,
    pub backlog_age_s: f64,
    pub dropped_points: u64,
    /// Ingest's clock minus the gateway's, measured by the gateway at connect.
    pub clock_offset_ms: Option<i64>,
    pub devices: Vec<DeviceView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    pub id: String,
    pub protocol: String,
    /// `up`, `down` or `waiting`.
    pub state: &'static str,
    pub reason: Option<String>,
}

fn check_name(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{what} is {} bytes, at most {max}", s.len()));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{what} holds a control character"));
    }
    Ok(())
}

impl HealthView {
    /// The report as shown, or what is wrong with it.
    pub fn from_wire(h: Health, received_ms: i64) -> Result<HealthView, String> {
        if h.devices.len() > MAX_HEALTH_DEVICES {
            return Err(format!(
                "{} devices, at most {MAX_HEALTH_DEVICES}",
                h.devices.len()
            ));
        }
        check_name("software_version", &h.software_version, MAX_HEALTH_NAME)?;
        if !h.backlog_age_s.is_finite() || h.backlog_age_s < 0.0 {
            return Err(format!(
                "backlog_age_s is {}, not a non-negative number",
                h.backlog_age_s
            ));
        }
        let mut devices = Vec::with_capacity(h.devices.len());
        for (i, d) in h.devices.into_iter().enumerate() {
            check_name(&format!("devices[{i}].id"), &d.id, MAX_HEALTH_NAME)?;
            check_name(
                &format!("devices[{i}].protocol"),
                &d.protocol,
                MAX_HEALTH_NAME,
            )?;
            check_name(
                &format!("devices[{i}].reason"),
                &d.reason,
                MAX_HEALTH_REASON,
            )?;
            let state = match DeviceState::try_from(d.state) {
                Ok(DeviceState::Up) => "up",
                Ok(DeviceState::Down) => "down",
                Ok(DeviceState::Waiting) => "waiting",
                _ => return Err(format!("devices[{i}].state is {}, not a state", d.state)),
            };
            devices.push(DeviceView {
                id: d.id,
                protocol: d.protocol,
                state,
                reason: (!d.reason.is_empty()).then_some(d.reason),
            });
        }
        Ok(HealthView {
            received_at: rfc3339(received_ms),
            taken_at: rfc3339(h.taken_at_ms),
            software_version: h.software_version,
            manifest_version: format!("{:016x}", h.manifest_version),
            buffer_used_bytes: h.buffer_used_bytes,
            buffer_max_bytes: h.buffer_max_bytes,
            buffer_fill: if h.buffer_max_bytes == 0 {
                0.0
            } else {
                (h.buffer_used_bytes as f64 / h.buffer_max_bytes as f64).min(1.0)
            },
            pending_batches: h.pending_batches,
            backlog_age_s: h.backlog_age_s,
            dropped_points: h.dropped_points,
            clock_offset_ms: h.clock_offset_ms,
            devices,
        })
    }

    fn count(&self, state: &str) -> usize {
        self.devices.iter().filter(|d| d.state == state).count()
    }
}

/// The evidence chain of a gateway, over all its buffers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChainSummary {
    pub buffers: usize,
    /// Links verified in order (all buffers).
    pub verified: u64,
    /// Links stored but waiting for an earlier one.
    pub waiting: u64,
    pub breaks: usize,
}

/// One gateway of the fleet.
#[derive(Debug, Clone, Serialize)]
pub struct FleetRow {
    pub id: String,
    /// Credit code and name of its enterprise (None: not assigned).
    pub enterprise: Option<String>,
    pub enterprise_name: Option<String>,
    pub provider: Option<String>,
    pub registered_at: String,
    pub online: bool,
    /// Online or offline since (None: not seen since ingest started).
    pub since: Option<String>,
    pub last_batch: Option<String>,
    pub software_version: Option<String>,
    pub devices_up: usize,
    pub devices_down: usize,
    pub devices_waiting: usize,
    pub health: Option<HealthView>,
    pub chain: ChainSummary,
    /// Its cloud configuration (None: never given one).
    pub config: Option<crate::gateway_config::ConfigView>,
    #[serde(skip)]
    sort_times: (i64, i64),
}

/// `GET /api/v1/gateways` and `/gateways` parameters.
#[derive(Debug, Default, Deserialize)]
pub struct FleetQuery {
    /// Only this enterprise's gateways (credit code; `-` for unassigned).
    pub enterprise: Option<String>,
    /// Only the gateways of this provider's enterprises.
    pub provider: Option<String>,
    /// A `SORT_KEYS` key, `-` in front for descending.
    pub sort: Option<String>,
    pub lang: Option<String>,
}

/// What `sort` takes.
pub const SORT_KEYS: &[&str] = &[
    "id",
    "enterprise",
    "provider",
    "online",
    "last_batch",
    "backlog",
    "devices_down",
    "version",
    "chain_breaks",
];

/// The registry and live state a fleet is built from.
pub struct Sources {
    pub gateways: Vec<GatewayInfo>,
    /// gateway id -> credit code.
    pub owners: BTreeMap<String, String>,
    pub enterprises: Vec<Enterprise>,
    pub connections: std::collections::HashMap<String, ConnectionInfo>,
    pub chains: Vec<ChainInfo>,
    pub configs: BTreeMap<String, crate::gateway_config::ConfigState>,
}

/// May this account see the fleet at all?
pub fn may_see(viewer: &Viewer) -> Result<(), ApiError> {
    match viewer.account.role {
        Role::Admin | Role::Provider => Ok(()),
        Role::Reviewer => Err(ApiError(
            axum::http::StatusCode::FORBIDDEN,
            "this account may not see the fleet: it is for admins and providers".into(),
        )),
    }
}

/// The rows `viewer` may see that match `q`, sorted as asked.
pub fn rows(src: Sources, viewer: &Viewer, q: &FleetQuery) -> Result<Vec<FleetRow>, ApiError> {
    let bad = |m: String| ApiError(axum::http::StatusCode::BAD_REQUEST, m);
    let (key, descending) = match q.sort.as_deref().unwrap_or("id") {
        s if s.starts_with('-') => (&s[1..], true),
        s => (s, false),
    };
    if !SORT_KEYS.contains(&key) {
        return Err(bad(format!(
            "sort `{key}`: expected one of {} (`-` in front for descending)",
            SORT_KEYS.join(", ")
        )));
    }
    let enterprises: BTreeMap<&str, &Enterprise> = src
        .enterprises
        .iter()
        .map(|e| (e.code.as_str(), e))
        .collect();
    let mut chains: BTreeMap<&str, ChainSummary> = BTreeMap::new();
    for c in &src.chains {
        let s = chains.entry(c.gateway.as_str()).or_default();
        s.buffers += 1;
        s.verified += (c.verified_through + 1).saturating_sub(c.verified_from.max(1));
        s.waiting += c.waiting;
        s.breaks += c.breaks.len();
    }
    let mut rows = Vec::new();
    for g in &src.gateways {
        if !viewer.sees(&g.id) {
            continue;
        }
        let owner = src
            .owners
            .get(&g.id)
            .and_then(|c| enterprises.get(c.as_str()));
        if let Some(want) = &q.enterprise {
            let matches = match owner {
                Some(e) => &e.code == want,
                None => want == "-",
            };
            if !matches {
                continue;
            }
        }
        if let Some(want) = &q.provider
            && owner.is_none_or(|e| &e.provider != want)
        {
            continue;
        }
        let conn = src.connections.get(&g.id);
        let health = conn.and_then(|c| c.health.clone());
        let count = |state| health.as_ref().map_or(0, |h| h.count(state));
        rows.push(FleetRow {
            id: g.id.clone(),
            enterprise: owner.map(|e| e.code.clone()),
            enterprise_name: owner.map(|e| e.name.clone()),
            provider: owner.map(|e| e.provider.clone()).filter(|p| !p.is_empty()),
            registered_at: rfc3339(g.registered_at_ms),
            online: conn.is_some_and(|c| c.connected),
            since: conn.map(|c| rfc3339(c.since_ms)),
            last_batch: conn.and_then(|c| c.last_batch_ms).map(rfc3339),
            software_version: conn
                .map(|c| c.software_version.clone())
                .filter(|v| !v.is_empty()),
            devices_up: count("up"),
            devices_down: count("down"),
            devices_waiting: count("waiting"),
            chain: chains.get(g.id.as_str()).cloned().unwrap_or_default(),
            config: src
                .configs
                .get(&g.id)
                .filter(|c| c.requested != 0 || c.applied != 0)
                .map(crate::gateway_config::ConfigView::from),
            sort_times: (
                conn.and_then(|c| c.last_batch_ms).unwrap_or(i64::MIN),
                health.as_ref().map_or(0, |h| h.pending_batches as i64),
            ),
            health,
        });
    }
    rows.sort_by(|a, b| {
        let order = match key {
            "enterprise" => a.enterprise.cmp(&b.enterprise),
            "provider" => a.provider.cmp(&b.provider),
            "online" => a.online.cmp(&b.online),
            "last_batch" => a.sort_times.0.cmp(&b.sort_times.0),
            "backlog" => a.sort_times.1.cmp(&b.sort_times.1),
            "devices_down" => a.devices_down.cmp(&b.devices_down),
            "version" => a.software_version.cmp(&b.software_version),
            "chain_breaks" => a.chain.breaks.cmp(&b.chain.breaks),
            _ => a.id.cmp(&b.id),
        };
        let order = if descending { order.reverse() } else { order };
        order.then_with(|| a.id.cmp(&b.id))
    });
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use guantong_proto::v1::DeviceHealth;

    fn report() -> Health {
        Health {
            taken_at_ms: 1_700_000_000_000,
            software_version: "0.1.0".into(),
            manifest_version: 0xabc,
            buffer_used_bytes: 50,
            buffer_max_bytes: 100,
            pending_batches: 3,
            backlog_age_s: 1.5,
            dropped_points: 0,
            clock_offset_ms: Some(-40),
            config_version: 0,
            devices: vec![DeviceHealth {
                id: "press-01".into(),
                protocol: "modbus".into(),
                state: DeviceState::Down as i32,
                reason: "no answer".into(),
            }],
        }
    }

    #[test]
    fn a_health_report_is_kept_as_sent_or_refused_whole_naming_the_field() {
        let h = HealthView::from_wire(report(), 0).expect("valid");
        assert_eq!(h.buffer_fill, 0.5);
        assert_eq!(h.manifest_version, "0000000000000abc");
        assert_eq!(h.devices[0].state, "down");
        assert_eq!(h.devices[0].reason.as_deref(), Some("no answer"));

        let mut r = report();
        r.devices[0].state = 9;
        let e = HealthView::from_wire(r, 0).expect_err("unknown state");
        assert!(e.contains("devices[0].state"), "{e}");
        let mut r = report();
        r.devices[0].id = "x".repeat(300);
        let e = HealthView::from_wire(r, 0).expect_err("long id");
        assert!(e.contains("devices[0].id"), "{e}");
        let mut r = report();
        r.backlog_age_s = f64::NAN;
        let e = HealthView::from_wire(r, 0).expect_err("NaN");
        assert!(e.contains("backlog_age_s"), "{e}");
        let mut r = report();
        r.devices = vec![r.devices[0].clone(); MAX_HEALTH_DEVICES + 1];
        assert!(HealthView::from_wire(r, 0).is_err());
    }
}
