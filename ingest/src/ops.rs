//! Operator commands while `serve` runs.
//!
//! The embedded store's file is locked by the process that has it open, so a
//! command (`register-gateway`, `rotate-gateway-token`, `assign-gateway`,
//! `add-account`, `enterprise add`, `import-equipment`) cannot open it
//! beside a running server. [`Target::open`] opens the store when it is free
//! and otherwise talks to the server holding it: `serve` writes
//! [`SERVING_FILE`] (its HTTP address) into the data directory once
//! listening, and the command authenticates with the admin token `serve`
//! wrote at its first start (`admin.token`). One decision, one place: the
//! server applies the same checks to a request as the command would locally.
//!
//! Admin routes only the CLI needed so far (the rest of the API is in
//! `http` and `web`):
//!
//! | route                               | body                                   | answer |
//! |-------------------------------------|----------------------------------------|--------|
//! | `POST /api/v1/gateways`             | `{id, public_key?, key_algorithm?}`    | 201 `{id, token}` |
//! | `POST /api/v1/gateways/{id}/token`  | `{grace}` (e.g. `"7d"`)                | `{id, token}` |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Extension, Json, Router};
use guantong_proto::chain::{Algorithm, PublicKey};
use serde::{Deserialize, Serialize};

use crate::http::{ApiError, ApiState};
use crate::registry::Role;
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;
use crate::web::Viewer;

/// Written by `serve` into the data directory once listening: `{"http": ADDR, "tls": bool}`.
pub const SERVING_FILE: &str = "serving.json";
/// The admin account's token, written by `serve` at its first start.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(
        "the store in {dir} is in use by a running server, and {what}: {detail} (run the command on the server's machine, or stop the server)"
    )]
    NoServer {
        dir: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("the running server at {url} answered {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("cannot reach the running server at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// A gateway's signing key from the algorithm name and hex text an
/// installer copies from `guantong-gateway identity`.
pub fn parse_public_key(algorithm: &str, hex_key: &str) -> Result<PublicKey, String> {
    let algorithm = Algorithm::from_name(algorithm)
        .ok_or_else(|| format!("key algorithm `{algorithm}` is not ed25519 or sm2"))?;
    let bytes = hex::decode(hex_key.trim()).map_err(|e| {
        format!("public key: not hex ({e}); copy it from `guantong-gateway identity`")
    })?;
    PublicKey::new(algorithm, bytes).map_err(|e| {
        format!(
            "public key with algorithm {algorithm}: {e} (copy both from `guantong-gateway identity`)"
        )
    })
}

/// A gateway id as its config names it: 1 to 128 characters without `/` or
/// control characters (it appears in URLs and store keys).
pub fn check_gateway_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control() || c == '/') {
        return Err(format!(
            "gateway id `{id}`: expected 1 to 128 characters without `/` or control characters"
        ));
    }
    Ok(())
}

/// Where a command's changes go.
pub enum Target {
    /// Nobody serves this data directory: the store itself.
    Local(EmbeddedStore),
    /// The server that has it open, through its HTTP API as admin.
    Remote(Remote),
}

impl Target {
    pub fn open(data: &Path) -> Result<Target, OpsError> {
        match EmbeddedStore::open_unless_serving(data)? {
            Some(store) => Ok(Target::Local(store)),
            None => Ok(Target::Remote(Remote::of_data_dir(data)?)),
        }
    }
}

/// A running server's admin API.
pub struct Remote {
    base: String,
    token: String,
    client: reqwest::Client,
}

#[derive(Deserialize)]
struct Serving {
    http: std::net::SocketAddr,
    #[serde(default)]
    tls: bool,
}

impl Remote {
    /// The server serving `data`, from the files `serve` wrote there.
    pub fn of_data_dir(data: &Path) -> Result<Remote, OpsError> {
        let no_server = |what, detail: String| OpsError::NoServer {
            dir: data.to_path_buf(),
            what,
            detail,
        };
        let path = data.join(SERVING_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| no_server("its address is unknown", format!("{}: {e}", path.display())))?;
        let serving: Serving = serde_json::from_str(&text).map_err(|e| {
            no_server(
                "its address is unreadable",
                format!("{}: {e}", path.display()),
            )
        })?;
        if serving.tls {
            return Err(no_server(
                "it serves its API over TLS (--http-tls)",
                "the command speaks plain HTTP to the server on this machine only".into(),
            ));
        }
        let path = data.join(ADMIN_TOKEN_FILE);
        let token = std::fs::read_to_string(&path)
            .map_err(|e| {
                no_server(
                    "the admin token is unreadable",
                    format!("{}: {e}", path.display()),
                )
            })?
            .trim()
            .to_string();
        // A server listening on every address is reached on loopback.
        let mut addr = serving.http;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        Ok(Remote {
            base: format!("http://{addr}"),
            token,
            client: reqwest::Client::new(),
        })
    }

    /// Sends `body` with `method` to `path`; the JSON answer.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<serde_json::Value, OpsError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e: reqwest::Error| OpsError::Unreachable {
            url: url.clone(),
            detail: e.to_string(),
        };
        let resp = self
            .client
            .request(method, &url)
            .bearer_auth(&self.token)
            .json(body)
            .timeout(std::time::Duration::from_secs(60))
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status();
        let text = resp.text().await.map_err(unreachable)?;
        let json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        if !status.is_success() {
            let message = json["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| json.to_string());
            return Err(OpsError::Refused {
                url,
                status: status.as_u16(),
                message,
            });
        }
        Ok(json)
    }
}

/// The routes of this module, for `http::router` (behind its authentication).
pub fn routes<S: Store>() -> Router<Arc<ApiState<S>>> {
    Router::new()
        .route("/api/v1/gateways", post(register_gateway::<S>))
        .route("/api/v1/gateways/{id}/token", post(rotate_token::<S>))
}

fn admin_only(viewer: &Viewer, what: &str) -> Result<(), ApiError> {
    if viewer.account.role == Role::Admin {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("only an admin account may {what}"),
        ))
    }
}

#[derive(Serialize, Deserialize)]
pub struct RegisterGateway {
    pub id: String,
    /// Hex, as `guantong-gateway identity` prints it.
    #[serde(default)]
    pub public_key: Option<String>,
    /// `ed25519` (default) or `sm2`.
    #[serde(default)]
    pub key_algorithm: Option<String>,
}

async fn register_gateway<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Json(r): Json<RegisterGateway>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    admin_only(&viewer, "register gateways")?;
    check_gateway_id(&r.id).map_err(|m| ApiError(StatusCode::BAD_REQUEST, m))?;
    let key = r
        .public_key
        .as_deref()
        .map(|k| parse_public_key(r.key_algorithm.as_deref().unwrap_or("ed25519"), k))
        .transpose()
        .map_err(|m| ApiError(StatusCode::BAD_REQUEST, m))?;
    let token = state.store.register_gateway(&r.id, key).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "id": r.id, "token": token })),
    ))
}

#[derive(Serialize, Deserialize)]
pub struct RotateToken {
    /// How long the old token stays valid, e.g. `7d`.
    #[serde(with = "humantime_serde")]
    pub grace: std::time::Duration,
}

async fn rotate_token<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    UrlPath(id): UrlPath<String>,
    Json(r): Json<RotateToken>,
) -> Result<Json<serde_json::Value>, ApiError> {
    admin_only(&viewer, "rotate gateway tokens")?;
    let token = state.store.rotate_token(&id, r.grace).await?;
    Ok(Json(serde_json::json!({ "id": id, "token": token })))
}
