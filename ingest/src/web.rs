//! Accounts, the acceptance registry and reports over HTTP.
//!
//! Every route but `/healthz` and `/login` needs an account token: an
//! `Authorization: Bearer` header, the `gt_token` cookie, or `?token=` once
//! (which sets the cookie, so a link opens a report in a browser). API routes
//! answer a missing or wrong token with 401; pages redirect to `/login`.
//!
//! Roles: `admin` manages everything; `provider` reads and writes only the
//! enterprises whose provider it is; `reviewer` only reads (all enterprises,
//! or those assigned). Every report, city view and access-log read is
//! recorded in the access log with who and when.

mod html;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form, Json};
use serde::Deserialize;

use crate::acceptance::{self, Criteria, EnterpriseReport, Snapshot};
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

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("task failed: {e}"),
        )
    })?
}

fn token_from(headers: &HeaderMap, query: Option<&str>) -> (Option<String>, bool) {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return (Some(v.trim().to_string()), false);
    }
    if let Some(t) = query.and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(str::to_string)
    }) {
        return (Some(t), true);
    }
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("gt_token=").map(str::to_string));
    (cookie, false)
}

fn visible_gateways<S: Store>(
    store: &S,
    account: &Account,
) -> Result<Option<BTreeSet<String>>, ApiError> {
    if account.role == Role::Admin
        || (account.role == Role::Reviewer && account.enterprises.is_empty())
    {
        return Ok(None);
    }
    let readable: BTreeSet<String> = store
        .enterprises()?
        .into_iter()
        .filter(|e| account.can_read(e))
        .map(|e| e.code)
        .collect();
    Ok(Some(
        store
            .gateway_owners()?
            .into_iter()
            .filter(|(_, code)| readable.contains(code))
            .map(|(g, _)| g)
            .collect(),
    ))
}

/// Middleware: resolves the account or refuses the request.
pub async fn authenticate<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    mut req: Request,
    next: Next,
) -> Response {
    let (token, from_query) = token_from(req.headers(), req.uri().query());
    let store = state.store.clone();
    let viewer = match token {
        Some(token) => {
            let t = token.clone();
            blocking(move || {
                let Some(account) = store.account_by_token(&t)? else {
                    return Ok(None);
                };
                let gateways = visible_gateways(&*store, &account)?;
                Ok(Some(Viewer { account, gateways }))
            })
            .await
            .map(|v| v.map(|v| (v, token)))
        }
        None => Ok(None),
    };
    let path = req.uri().path().to_string();
    match viewer {
        Ok(Some((viewer, token))) => {
            req.extensions_mut().insert(Arc::new(viewer));
            let mut resp = next.run(req).await;
            if from_query && let Ok(v) = HeaderValue::from_str(&session_cookie(&token)) {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
            resp
        }
        Ok(None) if path.starts_with("/api/") => err(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token: send `Authorization: Bearer <token>` (tokens come from `guantong-ingest account add` or POST /api/v1/accounts)",
        )
        .into_response(),
        Ok(None) => Redirect::to(&format!("/login?next={}", url_escape(&path))).into_response(),
        Err(e) => e.into_response(),
    }
}

fn session_cookie(token: &str) -> String {
    format!("gt_token={token}; HttpOnly; SameSite=Strict; Path=/")
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
}

pub async fn login_page(Query(q): Query<LoginQuery>) -> Html<String> {
    Html(html::login(q.next.as_deref().unwrap_or("/")))
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
    next: Option<String>,
}

pub async fn login<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Form(f): Form<LoginForm>,
) -> Response {
    let store = state.store.clone();
    let token = f.token.trim().to_string();
    let t = token.clone();
    match blocking(move || Ok(store.account_by_token(&t)?)).await {
        Ok(Some(_)) => {
            // Only local paths, never another site.
            let next = f
                .next
                .filter(|n| n.starts_with('/') && !n.starts_with("//"))
                .unwrap_or_else(|| "/".into());
            let mut resp = Redirect::to(&next).into_response();
            if let Ok(v) = HeaderValue::from_str(&session_cookie(&token)) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Ok(None) => (StatusCode::UNAUTHORIZED, Html(html::login_failed())).into_response(),
        Err(e) => e.into_response(),
    }
}

fn record<S: Store>(store: &S, viewer: &Viewer, method: &str, path: &str, enterprise: &str) {
    let a = Access {
        at_ms: now_ms(),
        account: viewer.account.name.clone(),
        role: viewer.account.role,
        method: method.into(),
        path: path.into(),
        enterprise: enterprise.into(),
    };
    if let Err(e) = store.log_access(&a) {
        tracing::error!(error = %e, "cannot write the access log");
    }
}

// --- registry ---------------------------------------------------------------

pub async fn list_enterprises<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let owners = store.gateway_owners()?;
        let mut out = Vec::new();
        for e in store.enterprises()? {
            if !viewer.account.can_read(&e) {
                continue;
            }
            let equipment = store.equipment(&e.code)?;
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
    })
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
    blocking(move || {
        if let Some(old) = store.enterprise(&e.code)?
            && !viewer.account.can_write(&old)
        {
            return Err(forbidden("change another provider's enterprise"));
        }
        store.put_enterprise(&e)?;
        Ok((StatusCode::CREATED, Json(e)))
    })
    .await
}

fn readable<S: Store>(store: &S, viewer: &Viewer, code: &str) -> Result<Enterprise, ApiError> {
    let e = store
        .enterprise(code)?
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
    blocking(move || {
        readable(&*store, &viewer, &code)?;
        Ok(Json(
            serde_json::json!({ "equipment": store.equipment(&code)? }),
        ))
    })
    .await
}

/// Replaces the register from CSV (or a JSON list).
pub async fn put_equipment<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Path(code): Path<String>,
    body: String,
) -> Result<Json<serde_json::Value>, ApiError> {
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
    blocking(move || {
        let e = readable(&*store, &viewer, &code)?;
        if !viewer.account.can_write(&e) {
            return Err(forbidden("change this enterprise"));
        }
        store.put_equipment(&code, &list)?;
        Ok(Json(
            serde_json::json!({ "enterprise": code, "equipment": list.len() }),
        ))
    })
    .await
}

#[derive(Deserialize)]
pub struct Owner {
    enterprise: String,
}

pub async fn assign_gateway<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Path(gateway): Path<String>,
    Json(o): Json<Owner>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let e = readable(&*store, &viewer, &o.enterprise)?;
        if !viewer.account.can_write(&e) {
            return Err(forbidden("change this enterprise"));
        }
        if let Some(current) = store.gateway_owners()?.get(&gateway)
            && let Some(cur) = store.enterprise(current)?
            && !viewer.account.can_write(&cur)
        {
            return Err(forbidden(
                "take a gateway from another provider's enterprise",
            ));
        }
        store.assign_gateway(&gateway, &o.enterprise)?;
        Ok(Json(
            serde_json::json!({ "gateway": gateway, "enterprise": o.enterprise }),
        ))
    })
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
    blocking(move || {
        let token = store.put_account(&a)?;
        Ok((
            StatusCode::CREATED,
            Json(serde_json::json!({ "account": a, "token": token })),
        ))
    })
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
    blocking(move || Ok(Json(serde_json::json!({ "accounts": store.accounts()? })))).await
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
    blocking(move || {
        record(&*store, &viewer, "GET", "/api/v1/access-log", "");
        Ok(Json(
            serde_json::json!({ "access": store.access_log(q.limit.unwrap_or(1000))? }),
        ))
    })
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

/// The query's window and a snapshot of the store.
async fn prepare<S: Store>(
    state: &ApiState<S>,
    q: &ReportQuery,
) -> Result<(i64, i64, Snapshot), ApiError> {
    let (from_day, to_day) = window(q.from.as_deref(), q.to.as_deref(), now_ms())
        .map_err(|m| err(StatusCode::BAD_REQUEST, m))?;
    Ok((from_day, to_day, snapshot(&*state.store).await?))
}

/// Builds one enterprise's report (blocking).
pub fn build_report<S: Store>(
    store: &S,
    snap: &Snapshot,
    code: &str,
    from_day: i64,
    to_day: i64,
    criteria: &Criteria,
) -> Result<EnterpriseReport, ApiError> {
    let e = store
        .enterprise(code)?
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no enterprise {code}")))?;
    Ok(acceptance::enterprise_report(
        store, snap, &e, from_day, to_day, criteria,
    )?)
}

pub async fn report<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Path(code): Path<String>,
    Query(q): Query<ReportQuery>,
) -> Result<Response, ApiError> {
    let (from_day, to_day, snap) = prepare(&state, &q).await?;
    let store = state.store.clone();
    let criteria = state.criteria.clone();
    blocking(move || {
        readable(&*store, &viewer, &code)?;
        record(&*store, &viewer, "GET", &format!("report/{code}"), &code);
        let r = build_report(&*store, &snap, &code, from_day, to_day, &criteria)?;
        render_report(&r, &q)
    })
    .await
}

pub fn render_report(r: &EnterpriseReport, q: &ReportQuery) -> Result<Response, ApiError> {
    let lang = html::Lang::from(q.lang.as_deref());
    match q.format.as_deref().unwrap_or("json") {
        "json" => Ok(Json(r).into_response()),
        "html" => Ok(Html(html::report(r, lang)).into_response()),
        "csv" => {
            let part = q.part.as_deref().unwrap_or("devices");
            let body =
                html::report_csv(r, part, lang).map_err(|m| err(StatusCode::BAD_REQUEST, m))?;
            Ok(csv_response(
                body,
                &format!("{}-{part}.csv", r.enterprise.code),
            ))
        }
        other => Err(err(
            StatusCode::BAD_REQUEST,
            format!("format `{other}`: expected json, html or csv"),
        )),
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

pub async fn report_page<S: Store>(
    state: State<Arc<ApiState<S>>>,
    viewer: Extension<Arc<Viewer>>,
    code: Path<String>,
    Query(mut q): Query<ReportQuery>,
) -> Result<Response, ApiError> {
    q.format = Some("html".into());
    report(state, viewer, code, Query(q)).await
}

pub async fn city<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Query(q): Query<ReportQuery>,
) -> Result<Response, ApiError> {
    let (from_day, to_day, snap) = prepare(&state, &q).await?;
    let store = state.store.clone();
    let criteria = state.criteria.clone();
    blocking(move || {
        record(&*store, &viewer, "GET", "city", "");
        let enterprises: Vec<Enterprise> = store
            .enterprises()?
            .into_iter()
            .filter(|e| viewer.account.can_read(e))
            .collect();
        let view =
            acceptance::city_view(&*store, &snap, &enterprises, from_day, to_day, &criteria)?;
        let lang = html::Lang::from(q.lang.as_deref());
        match q.format.as_deref().unwrap_or("json") {
            "json" => Ok(Json(view).into_response()),
            "html" => Ok(Html(html::city(&view, &criteria, lang)).into_response()),
            "csv" => Ok(csv_response(html::city_csv(&view, lang), "city.csv")),
            other => Err(err(
                StatusCode::BAD_REQUEST,
                format!("format `{other}`: expected json, html or csv"),
            )),
        }
    })
    .await
}

pub async fn city_page<S: Store>(
    state: State<Arc<ApiState<S>>>,
    viewer: Extension<Arc<Viewer>>,
    Query(mut q): Query<ReportQuery>,
) -> Result<Response, ApiError> {
    q.format = Some("html".into());
    city(state, viewer, Query(q)).await
}

/// A report or the city view as bytes, for the CLI (blocking).
#[allow(clippy::too_many_arguments)]
pub fn render_cli<S: Store>(
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
    let lang_ = html::Lang::from(lang);
    let bad_format = || {
        err(
            StatusCode::BAD_REQUEST,
            format!("format `{format}`: expected html, json or csv"),
        )
    };
    match enterprise {
        Some(code) => {
            let r = build_report(store, snap, code, from_day, to_day, criteria)?;
            match format {
                "json" => serde_json::to_vec_pretty(&r)
                    .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
                "html" => Ok(html::report(&r, lang_).into_bytes()),
                "csv" => html::report_csv(&r, part.unwrap_or("devices"), lang_)
                    .map_err(|m| err(StatusCode::BAD_REQUEST, m)),
                _ => Err(bad_format()),
            }
        }
        None => {
            let view = acceptance::city_view(
                store,
                snap,
                &store.enterprises()?,
                from_day,
                to_day,
                criteria,
            )?;
            match format {
                "json" => serde_json::to_vec_pretty(&view)
                    .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
                "html" => Ok(html::city(&view, criteria, lang_).into_bytes()),
                "csv" => Ok(html::city_csv(&view, lang_)),
                _ => Err(bad_format()),
            }
        }
    }
}
