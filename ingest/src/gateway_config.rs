//! Cloud configuration of gateways: the document a provider or admin keeps
//! at ingest for a gateway, and what the gateway did with it.
//!
//! # Design
//! A cloud document is TOML holding a gateway's `[[devices]]` only. Before it
//! is stored it is judged by the gateway's own rules
//! (`guantong_gateway::remote::check_cloud`, the same code the gateway runs);
//! stored, it gets the gateway's next version number, its author and time,
//! and becomes the *requested* version. A rollback requests an earlier
//! version again. Every stream of the gateway offers the requested version
//! when the gateway runs another: right after `Welcome` (so a gateway offline
//! during a change gets it when it returns) and whenever a version is
//! requested ([`crate::grpc::Connections::notify_config`]). The gateway
//! answers each offer with a result, kept as [`ConfigState`].
//!
//! # Invariants
//! - The state changes only here ([`ConfigState::requested`],
//!   [`ConfigState::ran`], [`ConfigState::answered`]); stores keep it as a
//!   value, updated in one transaction.
//! - What the gateway says it runs (`Hello.config_version`, results) is what
//!   `applied` shows; an applied result names the manifest of the new
//!   configuration, itself a link of the evidence chain.
//! - Readers never see secrets: values of keys named like passwords, tokens
//!   or secrets are masked ([`redact`]); documents are never logged.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::grpc::{Connections, now_ms};
use crate::http::{ApiError, ApiState, rfc3339};
use crate::registry::Role;
use crate::store::{Store, StoreError};
use crate::web::Viewer;

/// Largest cloud document accepted, in bytes.
pub const MAX_DOCUMENT_BYTES: usize = 2 << 20;
/// Most problems kept from one refusal.
const MAX_PROBLEMS: usize = 100;
/// Longest problem text kept, in bytes.
const MAX_PROBLEM_BYTES: usize = 1024;

/// One stored version of a gateway's cloud document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigVersion {
    pub version: u64,
    pub author: String,
    pub at_ms: i64,
    pub devices: usize,
    pub text: String,
}

/// One problem the gateway (or the check at ingest) found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigProblem {
    pub path: String,
    pub message: String,
}

/// A version the gateway refused, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Refusal {
    pub version: u64,
    pub at_ms: i64,
    pub problems: Vec<ConfigProblem>,
}

/// Requested and applied versions of one gateway.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ConfigState {
    /// The version the gateway should run (0: none requested).
    pub requested: u64,
    pub requested_by: String,
    pub requested_at_ms: i64,
    /// The version the gateway last said it runs (0: its local file only).
    pub applied: u64,
    pub applied_at_ms: Option<i64>,
    /// The manifest the applied version produced (hex), when it was applied.
    pub manifest_version: Option<String>,
    /// The latest refusal of the requested version, if it was refused.
    pub refused: Option<Refusal>,
}

impl ConfigState {
    /// `version` is requested by `author` at `at_ms`.
    pub fn requested(&mut self, version: u64, author: &str, at_ms: i64) {
        self.requested = version;
        self.requested_by = author.to_string();
        self.requested_at_ms = at_ms;
        if self.refused.as_ref().is_some_and(|r| r.version != version) {
            self.refused = None;
        }
    }

    /// The gateway said (`Hello`) it runs `version`.
    pub fn ran(&mut self, version: u64, at_ms: i64) {
        if self.applied != version {
            self.applied = version;
            self.applied_at_ms = Some(at_ms);
            self.manifest_version = None;
        }
    }

    /// The gateway's answer to an offer.
    pub fn answered(&mut self, r: &guantong_proto::v1::ConfigResult, at_ms: i64) {
        if r.applied {
            self.applied = r.version;
            self.applied_at_ms = Some(at_ms);
            self.manifest_version = Some(format!("{:016x}", r.manifest_version));
            if self
                .refused
                .as_ref()
                .is_some_and(|x| x.version == r.version)
            {
                self.refused = None;
            }
        } else {
            let clip = |s: &str| {
                let mut end = s.len().min(MAX_PROBLEM_BYTES);
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s[..end].to_string()
            };
            self.refused = Some(Refusal {
                version: r.version,
                at_ms,
                problems: r
                    .problems
                    .iter()
                    .take(MAX_PROBLEMS)
                    .map(|p| ConfigProblem {
                        path: clip(&p.path),
                        message: clip(&p.message),
                    })
                    .collect(),
            });
        }
    }

    /// The version to offer a gateway running `running`, if any.
    pub fn to_offer(&self, running: u64) -> Option<u64> {
        (self.requested != 0 && self.requested != running).then_some(self.requested)
    }
}

/// How a state reads in the API.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigView {
    pub requested: u64,
    pub requested_by: String,
    pub requested_at: Option<String>,
    pub applied: u64,
    pub applied_at: Option<String>,
    pub manifest_version: Option<String>,
    /// Requested and applied are the same version.
    pub in_effect: bool,
    pub refused: Option<Refusal>,
}

impl From<&ConfigState> for ConfigView {
    fn from(s: &ConfigState) -> ConfigView {
        ConfigView {
            requested: s.requested,
            requested_by: s.requested_by.clone(),
            requested_at: (s.requested != 0).then(|| rfc3339(s.requested_at_ms)),
            applied: s.applied,
            applied_at: s.applied_at_ms.map(rfc3339),
            manifest_version: s.manifest_version.clone(),
            in_effect: s.requested == s.applied,
            refused: s.refused.clone(),
        }
    }
}

/// Whether a key names a secret whose value readers must not see.
fn secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "passwd", "secret", "token", "passphrase"]
        .iter()
        .any(|s| k.contains(s))
}

/// `text` with every secret value masked (the document as TOML again, or
/// a note when it is not TOML, which a stored document always is).
pub fn redact(text: &str) -> String {
    fn walk(v: &mut toml::Value) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t.iter_mut() {
                    if secret_key(k) && v.is_str() {
                        *v = toml::Value::String("********".into());
                    } else {
                        walk(v);
                    }
                }
            }
            toml::Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    match text.parse::<toml::Table>() {
        Ok(t) => {
            let mut v = toml::Value::Table(t);
            walk(&mut v);
            toml::to_string(&v).unwrap_or_else(|e| format!("# cannot be shown: {e}\n"))
        }
        Err(_) => "# not TOML: not shown\n".into(),
    }
}

/// The problems of a document at ingest, or its number of devices.
pub fn check(text: &str) -> Result<usize, Vec<ConfigProblem>> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(vec![ConfigProblem {
            path: String::new(),
            message: format!(
                "the document is {} bytes, at most {MAX_DOCUMENT_BYTES}",
                text.len()
            ),
        }]);
    }
    guantong_gateway::remote::check_cloud(text).map_err(|problems| {
        problems
            .into_iter()
            .map(|p| ConfigProblem {
                path: p.path,
                message: p.message,
            })
            .collect()
    })
}

/// Why a document was not stored.
#[derive(Debug)]
pub enum PushError {
    Invalid(Vec<ConfigProblem>),
    Store(StoreError),
}

impl From<StoreError> for PushError {
    fn from(e: StoreError) -> Self {
        PushError::Store(e)
    }
}

impl PushError {
    /// One line per problem, for the CLI and the API's `error`.
    pub fn message(&self) -> String {
        match self {
            PushError::Store(e) => e.to_string(),
            PushError::Invalid(problems) => {
                let mut m = format!(
                    "the configuration was not stored: {} problem(s)",
                    problems.len()
                );
                for p in problems {
                    let at = if p.path.is_empty() {
                        "document"
                    } else {
                        &p.path
                    };
                    m.push_str(&format!("\n  {at}: {}", p.message));
                }
                m
            }
        }
    }
}

/// Checks `text`, stores it as `gateway`'s next version by `author` and
/// requests it; tells the gateway's streams when `connections` is given.
pub async fn push<S: Store>(
    store: &S,
    connections: Option<&Connections>,
    gateway: &str,
    text: &str,
    author: &str,
) -> Result<(u64, usize), PushError> {
    let devices = check(text).map_err(PushError::Invalid)?;
    let at_ms = now_ms();
    let version = store
        .add_gateway_config(
            gateway,
            ConfigVersion {
                version: 0,
                author: author.to_string(),
                at_ms,
                devices,
                text: text.to_string(),
            },
        )
        .await?;
    request(store, connections, gateway, version, author).await?;
    Ok((version, devices))
}

/// Requests stored `version` of `gateway` again (a rollback).
pub async fn request<S: Store>(
    store: &S,
    connections: Option<&Connections>,
    gateway: &str,
    version: u64,
    author: &str,
) -> Result<ConfigState, StoreError> {
    if !store
        .gateway_configs(gateway)
        .await?
        .iter()
        .any(|c| c.version == version)
    {
        return Err(StoreError::NotFound(format!(
            "version {version} of gateway {gateway}'s configuration"
        )));
    }
    let (author, at_ms) = (author.to_string(), now_ms());
    let state = store
        .update_gateway_config_state(
            gateway,
            Box::new(move |s| s.requested(version, &author, at_ms)),
        )
        .await?;
    info!(%gateway, version, "cloud configuration requested");
    if let Some(c) = connections {
        c.notify_config(gateway);
    }
    Ok(state)
}

/// A gateway's configuration as readers see it: state and every version,
/// secrets masked.
pub async fn show<S: Store>(store: &S, gateway: &str) -> Result<serde_json::Value, StoreError> {
    if !store.gateways().await?.iter().any(|g| g.id == gateway) {
        return Err(StoreError::NotFound(format!("gateway {gateway}")));
    }
    let state = store
        .gateway_config_states()
        .await?
        .remove(gateway)
        .unwrap_or_default();
    let versions: Vec<serde_json::Value> = store
        .gateway_configs(gateway)
        .await?
        .into_iter()
        .map(|c| {
            serde_json::json!({
                "version": c.version,
                "author": c.author,
                "at": rfc3339(c.at_ms),
                "devices": c.devices,
                "toml": redact(&c.text),
            })
        })
        .collect();
    Ok(serde_json::json!({
        "gateway": gateway,
        "state": ConfigView::from(&state),
        "versions": versions,
    }))
}

/// Admins and providers, for the gateways they see; the others learn
/// nothing of a gateway they do not see.
fn may_configure(viewer: &Viewer, gateway: &str) -> Result<(), ApiError> {
    if !viewer.sees(gateway) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no gateway {gateway} this account looks after"),
        ));
    }
    match viewer.account.role {
        Role::Admin | Role::Provider => Ok(()),
        Role::Reviewer => Err(ApiError(
            StatusCode::FORBIDDEN,
            "this account may not read or change gateway configurations".into(),
        )),
    }
}

/// `PUT /api/v1/gateways/{id}/config`, `GET` the same, and
/// `POST /api/v1/gateways/{id}/config/rollback`, for `http::router`.
pub fn routes<S: Store>() -> Router<Arc<ApiState<S>>> {
    Router::new()
        .route(
            "/api/v1/gateways/{id}/config",
            get(get_config::<S>).put(put_config::<S>),
        )
        .route("/api/v1/gateways/{id}/config/rollback", post(rollback::<S>))
}

async fn put_config<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Path(gateway): Path<String>,
    body: String,
) -> Result<Response, ApiError> {
    may_configure(&viewer, &gateway)?;
    match push(
        &*state.store,
        Some(&state.connections),
        &gateway,
        &body,
        &viewer.account.name,
    )
    .await
    {
        Ok((version, devices)) => Ok((
            StatusCode::CREATED,
            Json(serde_json::json!({ "gateway": gateway, "version": version, "devices": devices, "requested": true })),
        )
            .into_response()),
        Err(PushError::Invalid(problems)) => {
            let error = PushError::Invalid(problems.clone()).message();
            Ok((
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "error": error, "problems": problems })),
            )
                .into_response())
        }
        Err(PushError::Store(e)) => Err(e.into()),
    }
}

async fn get_config<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Path(gateway): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    may_configure(&viewer, &gateway)?;
    Ok(Json(show(&*state.store, &gateway).await?))
}

#[derive(Deserialize)]
struct Rollback {
    version: u64,
}

async fn rollback<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Path(gateway): Path<String>,
    Json(r): Json<Rollback>,
) -> Result<Json<serde_json::Value>, ApiError> {
    may_configure(&viewer, &gateway)?;
    let s = request(
        &*state.store,
        Some(&state.connections),
        &gateway,
        r.version,
        &viewer.account.name,
    )
    .await?;
    Ok(Json(
        serde_json::json!({ "gateway": gateway, "state": ConfigView::from(&s) }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use guantong_proto::v1::{ConfigProblem as WireProblem, ConfigResult};

    #[test]
    fn requests_runs_and_answers_move_the_state_and_decide_the_offer() {
        let mut s = ConfigState::default();
        assert_eq!(s.to_offer(0), None);
        s.requested(1, "prov", 10);
        assert_eq!(s.to_offer(0), Some(1));
        s.answered(
            &ConfigResult {
                version: 1,
                applied: true,
                manifest_version: 0xab,
                problems: vec![],
            },
            20,
        );
        assert_eq!((s.applied, s.to_offer(1)), (1, None));
        assert_eq!(s.manifest_version.as_deref(), Some("00000000000000ab"));
        s.requested(2, "prov", 30);
        s.answered(
            &ConfigResult {
                version: 2,
                applied: false,
                manifest_version: 0,
                problems: vec![WireProblem {
                    path: "devices[0].port".into(),
                    message: "x".repeat(5000),
                }],
            },
            40,
        );
        let refused = s.refused.clone().expect("refused");
        assert_eq!(refused.problems[0].message.len(), MAX_PROBLEM_BYTES);
        assert_eq!(s.applied, 1, "a refusal leaves the running version");
        // Rolled back to 1: the refusal of 2 is no longer the news.
        s.requested(1, "admin", 50);
        assert!(s.refused.is_none());
        assert_eq!(s.to_offer(1), None);
        s.ran(0, 60);
        assert_eq!(
            s.to_offer(0),
            Some(1),
            "a gateway that lost it gets it again"
        );
    }

    #[test]
    fn secrets_are_masked_for_readers() {
        let shown = redact(
            "[[devices]]\nid = \"m\"\npassword = \"hunter2\"\n[devices.auth]\nToken = \"abc\"\nport = 1\n",
        );
        assert!(
            !shown.contains("hunter2") && !shown.contains("abc"),
            "{shown}"
        );
        assert!(
            shown.contains("********") && shown.contains("port = 1"),
            "{shown}"
        );
    }
}
