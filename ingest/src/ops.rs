//! Operator commands while `serve` runs.
//!
//! The embedded store's file is locked by the process that has it open, so
//! no command can open it beside a running server. [`Target::open`] opens
//! the store when it is free and otherwise talks to the server holding it:
//! `serve` writes [`SERVING_FILE`] (its HTTP address) into the data
//! directory once listening, and the command authenticates with the admin
//! token `serve` wrote at its first start (`admin.token`). One decision, one
//! place: the server answers with the same library code the command runs
//! locally, so a command prints the same either way.
//!
//! With `--database` (PostgreSQL) there is no file to lock: a command opens
//! the database itself, beside any running replicas, and never goes through
//! a server.
//!
//! | command                 | through the server                                   |
//! |-------------------------|------------------------------------------------------|
//! | `register-gateway`      | `POST /api/v1/gateways`                              |
//! | `rotate-gateway-token`  | `POST /api/v1/gateways/{id}/token`                   |
//! | `assign-gateway`        | `PUT /api/v1/gateways/{id}/enterprise`               |
//! | `add-account`           | `POST /api/v1/accounts`                              |
//! | `enterprise add`/`list` | `POST`/`GET /api/v1/enterprises`                     |
//! | `import-equipment`      | `PUT /api/v1/enterprises/{code}/equipment`           |
//! | `report`                | `GET /api/v1/enterprises/{code}/report`, `GET /api/v1/city` |
//! | `dossier`               | `GET /api/v1/enterprises/{code}/dossier` (zip, unpacked) |
//! | `digest`                | `GET /api/v1/digests`                                |
//! | `export-evidence`       | `GET /api/v1/evidence`                               |
//! | `verify-chain`          | `GET /api/v1/verify-chain`                           |
//! | `backup`                | `POST /api/v1/backup`                                |
//! | `gateway-config`        | `PUT`/`GET /api/v1/gateways/{id}/config`, `POST …/rollback` |
//!
//! Routes of this module (admin only unless said; the rest of the API is in
//! `http` and `web`):
//!
//! | route                               | query or body                          | answer |
//! |-------------------------------------|----------------------------------------|--------|
//! | `POST /api/v1/gateways`             | `{id, public_key?, key_algorithm?}`    | 201 `{id, token}` |
//! | `POST /api/v1/gateways/{id}/token`  | `{grace}` (e.g. `"7d"`)                | `{id, token}` |
//! | `GET /api/v1/verify-chain`          |                                        | `{report, breaks}`: `verify-chain`'s text, from one read snapshot |
//! | `GET /api/v1/evidence`              | `?gateway=` (repeat) or `&enterprise=`, `&from=&to=` | the evidence bundle (JSON file) |
//! | `POST /api/v1/backup`               |                                        | a consistent copy of the store (redb file) |
//! | `GET /api/v1/enterprises/{code}/dossier` | `?from=&to=` (dates)              | the dossier as a zip; admin, the enterprise's provider and reviewers (`dossier`) |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use guantong_proto::chain::{Algorithm, PublicKey};
use serde::{Deserialize, Serialize};

use crate::http::{ApiError, ApiState};
use crate::registry::Role;
use crate::store::any::AnyStore;
use crate::store::embedded::EmbeddedStore;
use crate::store::postgres::{self, PgStore};
use crate::store::{Store, StoreVerification};
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

/// Where a command's (or `serve`'s) store is: the embedded store in the
/// data directory, or the PostgreSQL database named. The data directory
/// holds the TLS material and `admin.token` either way.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Data directory: the embedded store, TLS certificates, `admin.token`.
    #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
    pub data: PathBuf,
    /// Store data in this PostgreSQL database instead of the embedded store
    /// (`postgres://user:password@host:5432/name`; run `migrate` first).
    /// Every replica of ingest names the same one.
    #[arg(long, env = "GUANTONG_DATABASE_URL")]
    pub database: Option<String>,
    /// The CA that signed the database server's certificate: with it the
    /// certificate is verified (libpq's `verify-full`); without it the
    /// connection is encrypted when the server offers TLS, unverified
    /// (libpq's default `prefer`).
    #[arg(long, env = "GUANTONG_DATABASE_CA")]
    pub database_ca: Option<PathBuf>,
}

impl StoreArgs {
    /// The embedded store in `data`.
    pub fn embedded(data: &std::path::Path) -> StoreArgs {
        StoreArgs {
            data: data.to_path_buf(),
            database: None,
            database_ca: None,
        }
    }

    /// Where the database is, when one is named.
    pub fn database(&self) -> Result<Option<postgres::Target>, crate::store::StoreError> {
        self.database
            .as_deref()
            .map(|url| postgres::Target::new(url, self.database_ca.clone()))
            .transpose()
    }

    /// Where gateway certificates are revoked: the data directory's CA
    /// files, and the database when one is named (`ca::Revocations`).
    pub fn revocations(&self) -> Result<crate::ca::Revocations, crate::store::StoreError> {
        let database = self
            .database()?
            .map(|target| postgres::pool(&target, 2))
            .transpose()?;
        Ok(crate::ca::Revocations::new(
            &crate::ca::dir(&self.data),
            database,
        ))
    }

    /// The store, for `serve`: the database's, or the embedded store
    /// (which must be free).
    /// With `retention`, points older than it are dropped (database only).
    pub async fn open(
        &self,
        retention: Option<std::time::Duration>,
    ) -> Result<AnyStore, crate::store::StoreError> {
        use crate::store::StoreError;
        if retention.is_some_and(|r| r < std::time::Duration::from_secs(86_400)) {
            return Err(StoreError::Invalid(
                "--retention: at least 1d (whole days are dropped)".into(),
            ));
        }
        match (self.database()?, retention) {
            (Some(target), _) => Ok(AnyStore::Postgres(
                PgStore::open_with(&target, retention).await?,
            )),
            (None, Some(_)) => Err(StoreError::Invalid(
                "--retention needs --database: the embedded store keeps every point".into(),
            )),
            (None, None) => Ok(AnyStore::Embedded(EmbeddedStore::open(&self.data)?)),
        }
    }
}

/// Where a command's changes go.
pub enum Target {
    /// The store itself: a database (shared with any running replicas), or
    /// a data directory nobody serves.
    Local(AnyStore),
    /// The server that has the data directory open, through its HTTP API
    /// as admin.
    Remote(Remote),
}

impl Target {
    pub async fn open(store: &StoreArgs) -> Result<Target, OpsError> {
        if let Some(target) = store.database()? {
            return Ok(Target::Local(AnyStore::Postgres(
                PgStore::open(&target).await?,
            )));
        }
        match EmbeddedStore::open_unless_serving(&store.data)? {
            Some(s) => Ok(Target::Local(AnyStore::Embedded(s))),
            None => Ok(Target::Remote(Remote::of_data_dir(&store.data)?)),
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
        let request = self.client.request(method, self.url(path)).json(body);
        let resp = self.call(path, request, SHORT).await?;
        self.json(path, resp).await
    }

    /// Sends `text` (a TOML document) with `method` to `path`; the JSON answer.
    pub async fn send_text(
        &self,
        method: reqwest::Method,
        path: &str,
        text: String,
    ) -> Result<serde_json::Value, OpsError> {
        let request = self
            .client
            .request(method, self.url(path))
            .header(reqwest::header::CONTENT_TYPE, "application/toml")
            .body(text);
        let resp = self.call(path, request, SHORT).await?;
        self.json(path, resp).await
    }

    /// `GET path?query`; the JSON answer.
    pub async fn get_json(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<serde_json::Value, OpsError> {
        let resp = self.fetch(reqwest::Method::GET, path, query).await?;
        self.json(path, resp).await
    }

    /// `method path?query` as admin; the answer, once its status is a
    /// success (read its body as it comes: reports, archives, backups).
    pub async fn fetch(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<reqwest::Response, OpsError> {
        let request = self.client.request(method, self.url(path)).query(query);
        self.call(path, request, LONG).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn unreachable(&self, path: &str, e: reqwest::Error) -> OpsError {
        OpsError::Unreachable {
            url: self.url(path),
            detail: e.to_string(),
        }
    }

    async fn call(
        &self,
        path: &str,
        request: reqwest::RequestBuilder,
        timeout: std::time::Duration,
    ) -> Result<reqwest::Response, OpsError> {
        let resp = request
            .bearer_auth(&self.token)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(path, e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.map_err(|e| self.unreachable(path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        let message = json["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| json.to_string());
        Err(OpsError::Refused {
            url: self.url(path),
            status: status.as_u16(),
            message,
        })
    }

    async fn json(
        &self,
        path: &str,
        resp: reqwest::Response,
    ) -> Result<serde_json::Value, OpsError> {
        let text = resp.text().await.map_err(|e| self.unreachable(path, e))?;
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }
}

/// How long a change may take on the server, and a read or a copy of the
/// whole store (reports over long windows, backups of a big store).
const SHORT: std::time::Duration = std::time::Duration::from_secs(60);
/// Also the server's timeout for [`whole_store_routes`], whatever `--http-timeout` says.
pub const LONG: std::time::Duration = std::time::Duration::from_secs(3600);

/// The routes of this module that change the registry, for `http::router`
/// (behind its authentication and limits).
pub fn routes<S: Store>() -> Router<Arc<ApiState<S>>> {
    Router::new()
        .route(
            "/api/v1/gateways",
            get(crate::web::fleet::<S>).post(register_gateway::<S>),
        )
        .route("/api/v1/gateways/{id}/token", post(rotate_token::<S>))
}

/// The routes that read or copy the whole store or a long window of it:
/// `http::router` gives them [`LONG`] instead of `--http-timeout`.
pub fn whole_store_routes<S: Store>() -> Router<Arc<ApiState<S>>> {
    Router::new()
        .route("/api/v1/verify-chain", get(verify_chain::<S>))
        .route("/api/v1/evidence", get(evidence::<S>))
        .route("/api/v1/backup", post(backup::<S>))
        .route(
            "/api/v1/enterprises/{code}/dossier",
            get(crate::dossier::route::<S>),
        )
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

/// `verify-chain`'s text for what the store verification found, and how many
/// breaks (chain breaks and query-table problems) it counts.
pub fn verify_report(v: &StoreVerification) -> (String, usize) {
    use std::fmt::Write;
    let mut text = String::new();
    let mut broken = 0;
    for problem in &v.query_tables {
        let _ = writeln!(text, "QUERY TABLES: {problem}");
        broken += 1;
    }
    for c in &v.chains {
        let _ = writeln!(
            text,
            "gateway {} buffer {}: links {}..={} ({} stored), head {}",
            c.gateway, c.buffer_id, c.first_seq, c.last_seq, c.links, c.head_hash
        );
        if c.breaks.is_empty() {
            let _ = writeln!(text, "  verified: every signature and every link holds");
        }
        for (seq, reason) in &c.breaks {
            let _ = writeln!(text, "  BREAK at batch {seq}: {reason}");
            broken += 1;
        }
    }
    if v.chains.is_empty() {
        let _ = writeln!(text, "no signed batches stored");
    }
    (text, broken)
}

async fn verify_chain<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    admin_only(&viewer, "verify the stored chains")?;
    let (report, breaks) = verify_report(&state.store.verify_stored().await?);
    Ok(Json(
        serde_json::json!({ "report": report, "breaks": breaks }),
    ))
}

/// The gateways an evidence export covers: those named, and every gateway
/// of `enterprise`, which must exist and have one.
pub async fn evidence_gateways<S: Store>(
    store: &S,
    mut gateways: Vec<String>,
    enterprise: Option<&str>,
) -> Result<Vec<String>, ApiError> {
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    if let Some(code) = enterprise {
        if store.enterprise(code).await?.is_none() {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("enterprise {code}: no such enterprise"),
            ));
        }
        gateways.extend(
            store
                .gateway_owners()
                .await?
                .into_iter()
                .filter(|(_, owner)| owner == code)
                .map(|(g, _)| g),
        );
        if gateways.is_empty() {
            return Err(bad(format!(
                "enterprise {code}: no gateway belongs to it (assign-gateway)"
            )));
        }
    }
    if gateways.is_empty() {
        return Err(bad("name a gateway or an enterprise".into()));
    }
    Ok(gateways)
}

async fn evidence<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    admin_only(&viewer, "export evidence of any gateway")?;
    let (mut gateways, mut enterprise, mut from, mut to) = (Vec::new(), None, None, None);
    for (k, v) in q {
        match k.as_str() {
            "gateway" => gateways.push(v),
            "enterprise" => enterprise = Some(v),
            "from" => from = Some(crate::http::parse_time("from", &v)?),
            "to" => to = Some(crate::http::parse_time("to", &v)?),
            other => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter `{other}`; expected gateway, enterprise, from, to"),
                ));
            }
        }
    }
    let (Some(from), Some(to)) = (from, to) else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "`from` and `to` are required".into(),
        ));
    };
    let store = &*state.store;
    let gateways = evidence_gateways(store, gateways, enterprise.as_deref()).await?;
    let bundle = store.export_evidence(gateways, from, to).await?;
    let bytes = crate::evidence::bundle_bytes(&bundle)
        .map_err(|m| ApiError(StatusCode::INTERNAL_SERVER_ERROR, m))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

/// The store copied into a temporary file, answered as it is read; the file
/// is unlinked once open, so nothing is left behind.
async fn backup<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
) -> Result<Response, ApiError> {
    admin_only(&viewer, "back up the store")?;
    let path = std::env::temp_dir().join(format!(
        "guantong-backup-{}-{:016x}.redb",
        std::process::id(),
        rand::random::<u64>()
    ));
    let copied = state.store.backup(path.clone()).await;
    let opened = copied.and_then(|info| {
        let file = std::fs::File::open(&path)
            .map_err(|e| crate::store::StoreError::Backend(format!("backup: {e}")))?;
        Ok((info, file))
    });
    let _ = std::fs::remove_file(&path);
    let (info, file) = opened?;
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (BACKUP_ROWS_HEADER, info.rows.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// How many rows a backup copied, for the CLI's message.
pub const BACKUP_ROWS_HEADER: axum::http::HeaderName =
    axum::http::HeaderName::from_static("x-backup-rows");
