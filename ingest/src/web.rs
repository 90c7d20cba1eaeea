//! Accounts, the acceptance registry and reports over HTTP.
//!
//! Every route but `/healthz`, `/login` and `/logout` needs
//! an account token: an `Authorization: Bearer` header (scheme in any case),
//! or a browser session. `?token=` in an address (a link that opens a
//! report) or the login form opens a session: a random id in an `HttpOnly;
//! SameSite=Strict` cookie (`Secure` over HTTPS) that stands for the token
//! for 8 hours or until `POST /logout`; `?token=` is then removed from the
//! address by a redirect. API routes answer a missing or wrong token with
//! 401; pages redirect to `/login`, which returns only to paths on this site.
//!
//! Roles: `admin` manages everything; `provider` reads and writes only the
//! enterprises whose provider it is, and moves gateways only between them
//! (an admin assigns a gateway first); `reviewer` only reads: the
//! enterprises listed, or all with `all_enterprises`, none otherwise. Every
//! report, city view and access-log read is recorded in the access log with
//! who and when.
//!
//! Page routes (`/report/CODE`, `/city`) answer a failure with an HTML page
//! in the page's language and the API's status; API routes with JSON.
//!
//! `harden` wraps every route: cross-site form posts are refused, errors
//! are `{"error": "..."}`, and responses carry CSP, `X-Frame-Options`,
//! `Referrer-Policy` and `nosniff`.

pub(crate) mod html;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form, Json};
use serde::Deserialize;

use crate::acceptance::{self, Criteria, EnterpriseReport, Snapshot};
use crate::forwarded::Client;
use crate::grpc::now_ms;
use crate::http::{ApiError, ApiState};
use crate::registry::{Access, Account, Enterprise, Role, parse_equipment_csv};
use crate::store::Store;
use crate::store::rollup::{DAY_MS, day_of};

/// Who is asking, and which gateways' data they may see (None: all).
#[derive(Debug, Clone)]
pub struct Viewer {
    pub account: Account,
    pub gateways: Option<BTreeSet<String>>,
}

impl Viewer {
    pub fn sees(&self, gateway: &str) -> bool {
        self.gateways.as_ref().is_none_or(|g| g.contains(gateway))
    }
}

fn err(code: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError(code, msg.into())
}

fn forbidden(what: &str) -> ApiError {
    err(
        StatusCode::FORBIDDEN,
        format!("this account may not {what}"),
    )
}

/// How a request presented its credentials.
enum Credential {
    /// `Authorization: Bearer <token>` (scheme case-insensitive).
    Header(String),
    /// `?token=` in the address: signs a browser in once, then redirects
    /// to the same address without it.
    Query(String),
    /// The `gt_session` cookie of a browser session.
    Session(String),
}

fn credential(headers: &HeaderMap, query: Option<&str>) -> Option<Credential> {
    if let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_string())
    {
        return Some(Credential::Header(token));
    }
    if let Some(token) = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token="))) {
        return Some(Credential::Query(token.to_string()));
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(SESSION_COOKIE)
                .and_then(|c| c.strip_prefix('='))
        })
        .map(|id| Credential::Session(id.to_string()))
}

/// The enterprises an account may read, read through the provider index
/// or by code when it may not read all: never every enterprise's row.
/// None: it reads every enterprise.
async fn scoped_enterprises<S: Store>(
    store: &S,
    account: &Account,
) -> Result<Option<Vec<Enterprise>>, ApiError> {
    let candidates = match account.role {
        Role::Admin => return Ok(None),
        Role::Reviewer if account.all_enterprises => return Ok(None),
        Role::Reviewer => {
            let mut list = Vec::new();
            for code in &account.enterprises {
                list.extend(store.enterprise(code).await?);
            }
            list
        }
        Role::Provider if account.provider.is_empty() => Vec::new(),
        Role::Provider => store.enterprises_of_provider(&account.provider).await?,
    };
    Ok(Some(
        candidates
            .into_iter()
            .filter(|e| account.can_read(e))
            .collect(),
    ))
}

/// The gateways an account may see (None: all).
async fn visible_gateways<S: Store>(
    store: &S,
    account: &Account,
) -> Result<Option<BTreeSet<String>>, ApiError> {
    let Some(readable) = scoped_enterprises(store, account).await? else {
        return Ok(None);
    };
    let codes: Vec<String> = readable.into_iter().map(|e| e.code).collect();
    Ok(Some(store.gateways_of(&codes).await?.into_keys().collect()))
}

/// Whether the client reached ingest over HTTPS (directly or through a
/// trusted proxy): session cookies are then `Secure`.
fn over_tls(extensions: &axum::http::Extensions) -> bool {
    extensions
        .get::<Client>()
        .is_some_and(|c| c.scheme == "https")
}

/// Middleware: resolves the account or refuses the request.
pub async fn authenticate<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    mut req: Request,
    next: Next,
) -> Response {
    let credential = credential(req.headers(), req.uri().query());
    let (token, from_query) = match credential {
        Some(Credential::Header(t)) => (Some(t), false),
        Some(Credential::Query(t)) => (Some(t), true),
        Some(Credential::Session(id)) => (state.sessions.token(&id), false),
        None => (None, false),
    };
    let store = state.store.clone();
    let viewer = match token {
        Some(token) => {
            let t = token.clone();
            async move {
                let Some(account) = store.account_by_token(&t).await? else {
                    return Ok::<_, ApiError>(None);
                };
                let gateways = visible_gateways(&*store, &account).await?;
                Ok(Some(Viewer { account, gateways }))
            }
            .await
            .map(|v| v.map(|v| (v, token)))
        }
        None => Ok(None),
    };
    let path = req.uri().path().to_string();
    match viewer {
        Ok(Some((_, token)))
            if from_query && matches!(*req.method(), Method::GET | Method::HEAD) =>
        {
            // Keep the token out of the address bar, history and Referer.
            let rest: Vec<&str> = req
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .filter(|kv| !kv.starts_with("token=") && !kv.is_empty())
                .collect();
            let target = if rest.is_empty() {
                path
            } else {
                format!("{path}?{}", rest.join("&"))
            };
            let id = state.sessions.open(&token);
            with_cookie(
                Redirect::to(&target).into_response(),
                &session_cookie(&id, over_tls(req.extensions())),
            )
        }
        Ok(Some((viewer, _))) => {
            req.extensions_mut().insert(Arc::new(viewer));
            next.run(req).await
        }
        Ok(None) if path.starts_with("/api/") => err(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token: send `Authorization: Bearer <token>` (tokens come from `guantong-ingest add-account` or POST /api/v1/accounts)",
        )
        .into_response(),
        Ok(None) => Redirect::to(&format!("/login?next={}", url_escape(&path))).into_response(),
        Err(e) => e.into_response(),
    }
}

const SESSION_COOKIE: &str = "gt_session";

/// How long a browser session lasts after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// Browser sessions: a random id in the `gt_session` cookie stands for an
/// account token for `SESSION_TTL`, and `/logout` ends it. The account
/// token itself never goes into a cookie. Kept in memory, at most
/// `MAX_SESSIONS`: a restart signs browsers out.
#[derive(Default)]
pub struct Sessions(Mutex<HashMap<String, (String, Instant)>>);

const MAX_SESSIONS: usize = 10_000;

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new session for `token`; returns its id.
    fn open(&self, token: &str) -> String {
        let id = crate::registry::new_token();
        let now = Instant::now();
        let mut sessions = self.lock();
        sessions.retain(|_, (_, expires)| *expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, (_, expires))| *expires)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(id.clone(), (token.to_string(), now + SESSION_TTL));
        id
    }

    /// The account token of a live session.
    fn token(&self, id: &str) -> Option<String> {
        let now = Instant::now();
        self.lock()
            .get(id)
            .filter(|(_, expires)| *expires > now)
            .map(|(token, _)| token.clone())
    }

    fn close(&self, id: &str) {
        self.lock().remove(id);
    }
}

/// The session cookie: script cannot read it, other sites do not send it,
/// and over HTTPS it never travels in clear.
fn session_cookie(id: &str, secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

fn with_cookie(mut resp: Response, cookie: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

pub(crate) fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `next` when it is a path on this site, to redirect to after sign-in:
/// one leading `/`, then only unreserved URL characters, `/?=&+,:;@~` and
/// `%` escapes other than of `/` and `\`. Refuses `//host`, `/\host`,
/// tabs and other whitespace (browsers drop them, making `/\t/host`
/// `//host`), and encoded variants of those.
pub fn same_origin_path(next: &str) -> Option<&str> {
    let b = next.as_bytes();
    let plain = |c: u8| c.is_ascii_alphanumeric() || b"-._~/?=&+,:;@%".contains(&c);
    let lower = next.to_ascii_lowercase();
    let ok = b.first() == Some(&b'/')
        && b.get(1) != Some(&b'/')
        && b.len() <= 2048
        && b.iter().all(|&c| plain(c))
        && !lower.contains("%2f")
        && !lower.contains("%5c")
        && !lower.contains("%09")
        && !lower.contains("%0a")
        && !lower.contains("%0d");
    ok.then_some(next)
}

#[derive(Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
}

pub async fn login_page(Query(q): Query<LoginQuery>) -> Html<String> {
    Html(html::login(
        q.next.as_deref().and_then(same_origin_path).unwrap_or("/"),
    ))
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
    next: Option<String>,
}

pub async fn login<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    client: Option<Extension<Client>>,
    Form(f): Form<LoginForm>,
) -> Response {
    let store = state.store.clone();
    let token = f.token.trim().to_string();
    let t = token.clone();
    match store.account_by_token(&t).await.map_err(ApiError::from) {
        Ok(Some(_)) => {
            let next = f.next.as_deref().and_then(same_origin_path).unwrap_or("/");
            let id = state.sessions.open(&token);
            let secure = client.is_some_and(|Extension(c)| c.scheme == "https");
            with_cookie(
                Redirect::to(next).into_response(),
                &session_cookie(&id, secure),
            )
        }
        Ok(None) => (StatusCode::UNAUTHORIZED, Html(html::login_failed())).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Ends the browser session of the request and clears its cookie.
pub async fn logout<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    headers: HeaderMap,
) -> Response {
    if let Some(Credential::Session(id)) = credential(&headers, None) {
        state.sessions.close(&id);
    }
    with_cookie(
        Redirect::to("/login").into_response(),
        &format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    )
}

/// The Content-Security-Policy of every response: scripts only from ingest
/// itself (pages carry no inline script), no framing, forms post only here.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

/// Middleware over every route: refuses cross-site state changes (CSRF, by
/// `Sec-Fetch-Site` and `Origin` as OWASP recommends; API clients send
/// neither), gives every error the one shape `{"error": "..."}` (axum's own
/// rejections are plain text) and adds the browser security headers.
pub async fn harden(req: Request, next: Next) -> Response {
    let unsafe_method = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let mut resp = if unsafe_method && cross_site(&req) {
        err(
            StatusCode::FORBIDDEN,
            "cross-site request refused: changes are accepted only from ingest's own pages or API clients",
        )
        .into_response()
    } else {
        json_error(next.run(req).await).await
    };
    let headers = resp.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    resp
}

/// Whether a browser sent this request from another site.
fn cross_site(req: &Request) -> bool {
    let headers = req.headers();
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if text("sec-fetch-site").is_some_and(|s| s == "cross-site" || s == "same-site") {
        return true;
    }
    let Some(origin) = text(header::ORIGIN.as_str()) else {
        return false;
    };
    let host = req
        .extensions()
        .get::<Client>()
        .and_then(|c| c.host.clone())
        .or_else(|| text(header::HOST.as_str()).map(str::to_string));
    origin.split_once("://").map(|(_, h)| h) != host.as_deref()
}

/// An error response that is not JSON (nor a page) rewritten as
/// `{"error": "..."}`, its status and other headers kept.
async fn json_error(resp: Response) -> Response {
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !(status.is_client_error() || status.is_server_error())
        || content_type.starts_with("application/json")
        || content_type.starts_with("text/html")
    {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = err(status, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

pub(crate) async fn record<S: Store>(
    store: &S,
    viewer: &Viewer,
    method: &str,
    path: &str,
    enterprise: &str,
) {
    let a = Access {
        at_ms: now_ms(),
        account: viewer.account.name.clone(),
        role: viewer.account.role,
        method: method.into(),
        path: path.into(),
        enterprise: enterprise.into(),
    };
    if let Err(e) = store.log_access(&a).await {
        tracing::error!(error = %e, "cannot write the access log");
    }
}

// --- registry ---------------------------------------------------------------

pub async fn list_enterprises<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = state.store.clone();
    async move {
        let owners = store.gateway_owners().await?;
        let mut out = Vec::new();
        for e in store.enterprises().await? {
            if !viewer.account.can_read(&e) {
                continue;
            }
            let equipment = store.equipment(&e.code).await?;
            let gateways: Vec<&String> = owners
                .iter()
                .filter(|(_, c)| **c == e.code)
                .map(|(g, _)| g)
                .collect();
            out.push(serde_json::json!({
                "enterprise": e,
                "equipment": equipment.len(),
                "production_equipment": equipment.iter().filter(|q| q.production).count(),
                "gateways": gateways,
            }));
        }
        Ok(Json(serde_json::json!({ "enterprises": out })))
    }
    .await
}

pub async fn put_enterprise<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Json(e): Json<Enterprise>,
) -> Result<(StatusCode, Json<Enterprise>), ApiError> {
    if !viewer.account.can_write(&e) {
        return Err(forbidden("register enterprises of another provider"));
    }
    e.validate(&state.criteria.industries)
        .map_err(|m| err(StatusCode::BAD_REQUEST, m))?;
    let store = state.store.clone();
    async move {
        if let Some(old) = store.enterprise(&e.code).await?
            && !viewer.account.can_write(&old)
        {
            return Err(forbidden("change another provider's enterprise"));
        }
        store.put_enterprise(&e).await?;
        Ok((StatusCode::CREATED, Json(e)))
    }
    .await
}

pub(crate) async fn readable<S: Store>(
    store: &S,
    viewer: &Viewer,
    code: &str,
) -> Result<Enterprise, ApiError> {
    let e = store
        .enterprise(code)
        .await?
        .filter(|e| viewer.account.can_read(e))
        .ok_or_else(|| {
            err(
                StatusCode::NOT_FOUND,
                format!("no enterprise {code} for this account"),
            )
        })?;
    Ok(e)
}

pub async fn get_equipment<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Path(code): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = state.store.clone();
    async move {
        readable(&*store, &viewer, &code).await?;
        Ok(Json(
            serde_json::json!({ "equipment": store.equipment(&code).await? }),
        ))
    }
    .await
}

#[derive(Deserialize)]
pub struct EncodingQuery {
    encoding: Option<String>,
}

/// Replaces the register from CSV (UTF-8, or GBK/GB18030 detected or
/// declared by `?encoding=`) or a JSON list.
pub async fn put_equipment<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Path(code): Path<String>,
    Query(q): Query<EncodingQuery>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = crate::registry::decode_equipment_csv(&body, q.encoding.as_deref())
        .map_err(|e| err(StatusCode::BAD_REQUEST, format!("equipment CSV: {e}")))?;
    let list = if body.trim_start().starts_with('[') {
        serde_json::from_str(&body)
            .map_err(|e| err(StatusCode::BAD_REQUEST, format!("equipment JSON: {e}")))?
    } else {
        parse_equipment_csv(&body).map_err(|p| {
            err(
                StatusCode::BAD_REQUEST,
                format!("equipment CSV: {}", p.join("; ")),
            )
        })?
    };
    let store = state.store.clone();
    async move {
        let e = readable(&*store, &viewer, &code).await?;
        if !viewer.account.can_write(&e) {
            return Err(forbidden("change this enterprise"));
        }
        store.put_equipment(&code, &list).await?;
        Ok(Json(
            serde_json::json!({ "enterprise": code, "equipment": list.len() }),
        ))
    }
    .await
}

#[derive(Deserialize)]
pub struct Owner {
    enterprise: String,
}

/// A gateway id as registration accepts it; refused before any lookup.
fn check_gateway_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control() || c == '/') {
        let shown: String = id.chars().take(64).collect();
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!(
                "gateway id `{shown}`: expected 1 to 128 characters without `/` or control characters"
            ),
        ));
    }
    Ok(())
}

/// Assigns a registered gateway to an enterprise. An admin assigns any
/// gateway; a provider only moves a gateway between its own enterprises,
/// so it can never take one registered for someone else.
pub async fn assign_gateway<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Path(gateway): Path<String>,
    Json(o): Json<Owner>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_gateway_id(&gateway)?;
    let store = state.store.clone();
    async move {
        let e = readable(&*store, &viewer, &o.enterprise).await?;
        if !viewer.account.can_write(&e) {
            return Err(forbidden("change this enterprise"));
        }
        match store.gateway_owners().await?.get(&gateway) {
            Some(current)
                if !store
                    .enterprise(current).await?
                    .is_some_and(|cur| viewer.account.can_write(&cur)) =>
            {
                return Err(forbidden(
                    "take a gateway from another provider's enterprise",
                ));
            }
            Some(_) => {}
            None if viewer.account.role != Role::Admin => {
                return Err(forbidden(
                    "assign a gateway that belongs to no enterprise yet (an admin assigns it first)",
                ));
            }
            None => {}
        }
        store.assign_gateway(&gateway, &o.enterprise).await?;
        Ok(Json(
            serde_json::json!({ "gateway": gateway, "enterprise": o.enterprise }),
        ))
    }
    .await
}

/// `DELETE /api/v1/gateways/ID/enterprise`: the gateway belongs to no
/// enterprise any more (admin, or the provider of its enterprise).
pub async fn unassign_gateway<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Path(gateway): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_gateway_id(&gateway)?;
    let store = state.store.clone();
    async move {
        let not_assigned = || {
            err(
                StatusCode::NOT_FOUND,
                format!("gateway {gateway} belongs to no enterprise this account may change"),
            )
        };
        let owners = store.gateway_owners().await?;
        let current = owners.get(&gateway).ok_or_else(not_assigned)?;
        if !store
            .enterprise(current)
            .await?
            .is_some_and(|cur| viewer.account.can_write(&cur))
        {
            return Err(not_assigned());
        }
        store.unassign_gateway(&gateway).await?;
        Ok(Json(
            serde_json::json!({ "gateway": gateway, "enterprise": null }),
        ))
    }
    .await
}

pub async fn add_account<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Json(a): Json<Account>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    if viewer.account.role != Role::Admin {
        return Err(forbidden("manage accounts"));
    }
    check_account(&a).map_err(|m| err(StatusCode::BAD_REQUEST, m))?;
    let store = state.store.clone();
    async move {
        let token = store.put_account(&a).await?;
        Ok((
            StatusCode::CREATED,
            Json(serde_json::json!({ "account": a, "token": token })),
        ))
    }
    .await
}

/// An account is complete for its role.
pub fn check_account(a: &Account) -> Result<(), String> {
    if a.name.is_empty() || a.name.len() > 64 || a.name.chars().any(char::is_control) {
        return Err(format!(
            "account name `{}`: expected 1 to 64 printable characters",
            a.name
        ));
    }
    if a.role == Role::Provider && a.provider.is_empty() {
        return Err(format!(
            "account {}: a provider account needs `provider`",
            a.name
        ));
    }
    Ok(())
}

pub async fn list_accounts<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if viewer.account.role != Role::Admin {
        return Err(forbidden("list accounts"));
    }
    let store = state.store.clone();
    Ok(Json(
        serde_json::json!({ "accounts": store.accounts().await? }),
    ))
}

#[derive(Deserialize)]
pub struct LimitQuery {
    limit: Option<usize>,
}

pub async fn access_log<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Query(q): Query<LimitQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if viewer.account.role != Role::Admin {
        return Err(forbidden("read the access log"));
    }
    let store = state.store.clone();
    async move {
        record(&*store, &viewer, "GET", "/api/v1/access-log", "").await;
        Ok(Json(
            serde_json::json!({ "access": store.access_log(q.limit.unwrap_or(1000)).await? }),
        ))
    }
    .await
}

// --- reports -----------------------------------------------------------------

#[derive(Deserialize, Default)]
pub struct ReportQuery {
    pub from: Option<String>,
    pub to: Option<String>,
    pub format: Option<String>,
    pub lang: Option<String>,
    /// CSV part: devices (default), gaps, usage, equipment.
    pub part: Option<String>,
}

/// The window `[from_day, to_day)` of a query: dates inclusive, by default
/// the last seven days up to today.
pub fn window(from: Option<&str>, to: Option<&str>, now: i64) -> Result<(i64, i64), String> {
    let to_day = match to {
        Some(t) => acceptance::parse_date(t)? + DAY_MS,
        None => day_of(now) + DAY_MS,
    };
    let from_day = match from {
        Some(f) => acceptance::parse_date(f)?,
        None => to_day - 7 * DAY_MS,
    };
    if from_day >= to_day {
        return Err("`from` must not be after `to`".into());
    }
    if to_day - from_day > 400 * DAY_MS {
        return Err("window longer than 400 days".into());
    }
    Ok((from_day, to_day))
}

pub async fn snapshot<S: Store>(store: &S) -> Result<Snapshot, ApiError> {
    Ok(Snapshot {
        series: store.series().await?,
        losses: store.losses().await?,
        chains: store.chains().await?,
        now_ms: now_ms(),
    })
}

/// A snapshot of `gateways` only (None: of all), read by gateway.
pub async fn snapshot_of<S: Store>(
    store: &S,
    gateways: Option<&[String]>,
) -> Result<Snapshot, ApiError> {
    let Some(gateways) = gateways else {
        return snapshot(store).await;
    };
    Ok(Snapshot {
        series: store.series_of(gateways).await?,
        losses: store.losses_of(gateways).await?,
        chains: store.chains_of(gateways).await?,
        now_ms: now_ms(),
    })
}

/// The query's window.
fn window_of(q: &ReportQuery) -> Result<(i64, i64), ApiError> {
    window(q.from.as_deref(), q.to.as_deref(), now_ms())
        .map_err(|m| err(StatusCode::BAD_REQUEST, m))
}

/// Builds one enterprise's report.
pub async fn build_report<S: Store>(
    store: &S,
    snap: &Snapshot,
    code: &str,
    from_day: i64,
    to_day: i64,
    criteria: &Criteria,
) -> Result<EnterpriseReport, ApiError> {
    let e = store
        .enterprise(code)
        .await?
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no enterprise {code}")))?;
    Ok(acceptance::enterprise_report(store, snap, &e, from_day, to_day, criteria).await?)
}

/// Reports and city views computed since the store last changed, so that
/// asking again computes nothing.
///
/// An entry is keyed by what determines it besides the store: the window
/// and which enterprises (the criteria are the server's, fixed while it
/// runs, and every entry belongs to one server's `ApiState`). It is served
/// while the store's `generation` is the one it was computed at (read
/// before reading the store, so a write during the computation makes it
/// stale at once) and for at most `MAX_AGE`, because a report also depends
/// on the clock (the samples expected up to now). At most `MAX_ENTRIES`
/// are kept; stale ones go first, then the oldest.
#[derive(Default)]
pub struct ReportCache(Mutex<HashMap<CacheKey, CacheEntry>>);

#[derive(Clone, PartialEq, Eq, Hash)]
enum CacheKey {
    Report {
        code: String,
        from_day: i64,
        to_day: i64,
    },
    /// The city view over these enterprises (sorted codes).
    City {
        codes: Vec<String>,
        from_day: i64,
        to_day: i64,
    },
}

#[derive(Clone)]
enum Cached {
    Report(Arc<EnterpriseReport>),
    City(Arc<acceptance::CityView>),
}

struct CacheEntry {
    generation: u64,
    at: Instant,
    value: Cached,
}

impl ReportCache {
    const MAX_AGE: Duration = Duration::from_secs(60);
    const MAX_ENTRIES: usize = 256;

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, CacheEntry>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The entry of `key` if still valid at `generation`; counted.
    fn get(&self, key: &CacheKey, generation: u64) -> Option<Cached> {
        let hit = self
            .lock()
            .get(key)
            .filter(|e| e.generation == generation && e.at.elapsed() < Self::MAX_AGE)
            .map(|e| e.value.clone());
        if hit.is_some() {
            crate::metrics::report_cached();
        }
        hit
    }

    fn put(&self, key: CacheKey, generation: u64, value: Cached) {
        crate::metrics::report_computed();
        let mut map = self.lock();
        if map.len() >= Self::MAX_ENTRIES {
            map.retain(|_, e| e.generation == generation && e.at.elapsed() < Self::MAX_AGE);
        }
        if map.len() >= Self::MAX_ENTRIES
            && let Some(oldest) = map.iter().min_by_key(|(_, e)| e.at).map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(
            key,
            CacheEntry {
                generation,
                at: Instant::now(),
                value,
            },
        );
    }

    /// One enterprise's report, from the cache or computed from that
    /// enterprise's gateways alone.
    async fn report<S: Store>(
        &self,
        store: &S,
        code: &str,
        from_day: i64,
        to_day: i64,
        criteria: &Criteria,
    ) -> Result<Arc<EnterpriseReport>, ApiError> {
        let generation = store.generation();
        let key = CacheKey::Report {
            code: code.to_string(),
            from_day,
            to_day,
        };
        if let Some(Cached::Report(r)) = self.get(&key, generation) {
            return Ok(r);
        }
        let gateways: Vec<String> = store
            .gateways_of(&[code.to_string()])
            .await?
            .into_keys()
            .collect();
        let snap = snapshot_of(store, Some(&gateways)).await?;
        let r = Arc::new(build_report(store, &snap, code, from_day, to_day, criteria).await?);
        self.put(key, generation, Cached::Report(r.clone()));
        Ok(r)
    }

    /// The city view over `enterprises`, whose gateways are `gateways`
    /// (None: every enterprise, every gateway).
    async fn city<S: Store>(
        &self,
        store: &S,
        enterprises: &[Enterprise],
        gateways: Option<&[String]>,
        from_day: i64,
        to_day: i64,
        criteria: &Criteria,
    ) -> Result<Arc<acceptance::CityView>, ApiError> {
        let generation = store.generation();
        let mut codes: Vec<String> = enterprises.iter().map(|e| e.code.clone()).collect();
        codes.sort_unstable();
        let key = CacheKey::City {
            codes,
            from_day,
            to_day,
        };
        if let Some(Cached::City(v)) = self.get(&key, generation) {
            return Ok(v);
        }
        let snap = snapshot_of(store, gateways).await?;
        let view = Arc::new(
            acceptance::city_view(store, &snap, enterprises, from_day, to_day, criteria).await?,
        );
        self.put(key, generation, Cached::City(view.clone()));
        Ok(view)
    }
}

pub async fn report<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Path(code): Path<String>,
    Query(q): Query<ReportQuery>,
) -> Result<Response, ApiError> {
    let (from_day, to_day) = window_of(&q)?;
    let store = state.store.clone();
    readable(&*store, &viewer, &code).await?;
    record(&*store, &viewer, "GET", &format!("report/{code}"), &code).await;
    let r = state
        .reports
        .report(&*store, &code, from_day, to_day, &state.criteria)
        .await?;
    // No bundle fingerprint here: exporting the bundle reads every link of
    // the window; the dossier's copy of the report carries it.
    render_report(&r, &q)
}

/// The gateways of an enterprise and their evidence bundle over a window:
/// what the dossier writes, and whose fingerprint its report's footer shows.
pub async fn enterprise_bundle<S: Store>(
    store: &S,
    code: &str,
    from_day: i64,
    to_day: i64,
) -> Result<(Vec<String>, crate::evidence::bundle::Bundle), ApiError> {
    let gateways: Vec<String> = store
        .gateways_of(&[code.to_string()])
        .await?
        .into_keys()
        .collect();
    let bundle = store
        .export_evidence(gateways.clone(), from_day, to_day)
        .await?;
    Ok((gateways, bundle))
}

pub fn render_report(r: &EnterpriseReport, q: &ReportQuery) -> Result<Response, ApiError> {
    let format = q.format.as_deref().unwrap_or("json");
    let part = q.part.as_deref().unwrap_or("devices");
    let body = report_bytes(r, format, Some(part), q.lang.as_deref(), None)?;
    Ok(respond(
        body,
        format,
        &format!("{}-{part}.csv", r.enterprise.code),
    ))
}

/// One enterprise's report as `format` (json, html, or csv of `part`): the
/// bytes the API answers and the CLI writes, decided here only. An HTML
/// report's footer shows `fingerprint`, its evidence bundle's.
pub fn report_bytes(
    r: &EnterpriseReport,
    format: &str,
    part: Option<&str>,
    lang: Option<&str>,
    fingerprint: Option<&str>,
) -> Result<Vec<u8>, ApiError> {
    let lang = html::Lang::from(lang);
    match format {
        "json" => serde_json::to_vec_pretty(r)
            .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        "html" => Ok(html::report(r, lang, fingerprint).into_bytes()),
        "csv" => html::report_csv(r, part.unwrap_or("devices"), lang)
            .map_err(|m| err(StatusCode::BAD_REQUEST, m)),
        other => Err(bad_format(other)),
    }
}

/// The city view as `format`, for the API and the CLI alike.
pub fn city_bytes(
    view: &acceptance::CityView,
    criteria: &Criteria,
    format: &str,
    lang: Option<&str>,
) -> Result<Vec<u8>, ApiError> {
    let lang = html::Lang::from(lang);
    match format {
        "json" => serde_json::to_vec_pretty(view)
            .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        "html" => Ok(html::city(view, criteria, lang).into_bytes()),
        "csv" => Ok(html::city_csv(view, lang)),
        other => Err(bad_format(other)),
    }
}

fn bad_format(format: &str) -> ApiError {
    err(
        StatusCode::BAD_REQUEST,
        format!("format `{format}`: expected json, html or csv"),
    )
}

/// `body` of `format` with its content type (a CSV as the download `csv_name`).
fn respond(body: Vec<u8>, format: &str, csv_name: &str) -> Response {
    match format {
        "json" => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        "html" => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response(),
        _ => csv_response(body, csv_name),
    }
}

fn csv_response(body: Vec<u8>, name: &str) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/csv; charset=utf-8")
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        )
        .body(Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The report as a page. A failure (unknown or malformed code, bad window)
/// is an HTML page in the page's language with the same status, not JSON.
pub async fn report_page<S: Store>(
    state: State<Arc<ApiState<S>>>,
    viewer: Extension<Arc<Viewer>>,
    code: Path<String>,
    Query(mut q): Query<ReportQuery>,
) -> Response {
    q.format = Some("html".into());
    let lang = html::Lang::from(q.lang.as_deref());
    report(state, viewer, code, Query(q))
        .await
        .unwrap_or_else(|e| page_error(lang, e))
}

/// An error of a page route as a page, with the API's status and message.
fn page_error(lang: html::Lang, ApiError(status, message): ApiError) -> Response {
    let page = html::error_page(lang, status.as_u16(), &message);
    (status, Html(page)).into_response()
}

pub async fn city<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Query(q): Query<ReportQuery>,
) -> Result<Response, ApiError> {
    let (from_day, to_day) = window_of(&q)?;
    let store = state.store.clone();
    let criteria = state.criteria.clone();
    record(&*store, &viewer, "GET", "city", "").await;
    let (enterprises, gateways) = match scoped_enterprises(&*store, &viewer.account).await? {
        None => (store.enterprises().await?, None),
        Some(list) => {
            let codes: Vec<String> = list.iter().map(|e| e.code.clone()).collect();
            let gateways: Vec<String> = store.gateways_of(&codes).await?.into_keys().collect();
            (list, Some(gateways))
        }
    };
    let view = state
        .reports
        .city(
            &*store,
            &enterprises,
            gateways.as_deref(),
            from_day,
            to_day,
            &criteria,
        )
        .await?;
    let format = q.format.as_deref().unwrap_or("json");
    let body = city_bytes(&view, &criteria, format, q.lang.as_deref())?;
    Ok(respond(body, format, "city.csv"))
}

/// The city view as a page; a failure (a bad window) is an HTML page in
/// the page's language, as for the report.
pub async fn city_page<S: Store>(
    state: State<Arc<ApiState<S>>>,
    viewer: Extension<Arc<Viewer>>,
    Query(mut q): Query<ReportQuery>,
) -> Response {
    q.format = Some("html".into());
    let lang = html::Lang::from(q.lang.as_deref());
    city(state, viewer, Query(q))
        .await
        .unwrap_or_else(|e| page_error(lang, e))
}

/// The fleet `viewer` may see (see [`crate::fleet`]), and the enterprises
/// it may filter by.
async fn fleet_of<S: Store>(
    state: &ApiState<S>,
    viewer: &Viewer,
    q: &crate::fleet::FleetQuery,
) -> Result<(Vec<crate::fleet::FleetRow>, Vec<Enterprise>), ApiError> {
    crate::fleet::may_see(viewer)?;
    let store = &*state.store;
    let (enterprises, owners, chains) = match scoped_enterprises(store, &viewer.account).await? {
        None => (
            store.enterprises().await?,
            store.gateway_owners().await?,
            store.chains().await?,
        ),
        Some(enterprises) => {
            let codes: Vec<String> = enterprises.iter().map(|e| e.code.clone()).collect();
            let owners = store.gateways_of(&codes).await?;
            let visible: Vec<String> = owners.keys().cloned().collect();
            (enterprises, owners, store.chains_of(&visible).await?)
        }
    };
    let sources = crate::fleet::Sources {
        gateways: store.gateways().await?,
        owners,
        enterprises: enterprises.clone(),
        connections: state.connections.snapshot(),
        chains,
        configs: store.gateway_config_states().await?,
    };
    Ok((crate::fleet::rows(sources, viewer, q)?, enterprises))
}

/// `GET /api/v1/gateways`: the fleet as JSON.
pub async fn fleet<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Query(q): Query<crate::fleet::FleetQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (rows, _) = fleet_of(&state, &viewer, &q).await?;
    Ok(Json(serde_json::json!({
        "generated_at": crate::http::rfc3339(now_ms()),
        "gateways": rows,
    })))
}

/// `/gateways`: the fleet page.
pub async fn fleet_page<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Query(q): Query<crate::fleet::FleetQuery>,
) -> Response {
    let lang = html::Lang::from(q.lang.as_deref());
    match fleet_of(&state, &viewer, &q).await {
        Ok((rows, enterprises)) => {
            let providers: BTreeSet<String> = enterprises
                .iter()
                .map(|e| e.provider.clone())
                .filter(|p| !p.is_empty())
                .collect();
            let choices: Vec<(String, String)> =
                enterprises.into_iter().map(|e| (e.code, e.name)).collect();
            let providers: Vec<String> = providers.into_iter().collect();
            Html(html::fleet(&rows, &q, &choices, &providers, lang)).into_response()
        }
        Err(e) => page_error(lang, e),
    }
}

/// A report or the city view as bytes, for the CLI.
#[allow(clippy::too_many_arguments)]
pub async fn render_cli<S: Store>(
    store: &S,
    snap: &Snapshot,
    enterprise: Option<&str>,
    from_day: i64,
    to_day: i64,
    criteria: &Criteria,
    format: &str,
    part: Option<&str>,
    lang: Option<&str>,
) -> Result<Vec<u8>, ApiError> {
    match enterprise {
        Some(code) => {
            let r = build_report(store, snap, code, from_day, to_day, criteria).await?;
            report_bytes(&r, format, part, lang, None)
        }
        None => {
            let view = acceptance::city_view(
                store,
                snap,
                &store.enterprises().await?,
                from_day,
                to_day,
                criteria,
            )
            .await?;
            city_bytes(&view, criteria, format, lang)
        }
    }
}
