//! HTTP JSON API and the live overview page.
//!
//! | route                 | what                                                      |
//! |-----------------------|-----------------------------------------------------------|
//! | `GET /`               | live overview page, zh or `?lang=en`, reloads every 5 s   |
//! | `GET /healthz`        | `ok`                                                      |
//! | `GET /api/v1/summary` | gateway -> device -> tag connectivity, `?from=&to=`       |
//! | `GET /api/v1/points`  | stored points of one tag, `?gateway=&device=&tag=&from=&to=&limit=` |
//! | `GET /api/v1/losses`  | data dropped by gateways and sequence gaps                |
//! | `GET /api/v1/chain`   | evidence chain per gateway buffer: verified range, head, breaks |
//! | gateways (admin)      | see the `ops` module: register, rotate a token            |
//! | registry, reports     | see the `web` module: enterprises, equipment, accounts, access log, reports, city view |
//!
//! | `GET /api/v1/digests` | ingest's signed daily digests, `?day=YYYY-MM-DD&gateway=` (repeatable) |
//!
//! Every route but `/healthz` and `/login` needs an account token (`web`).
//! Every route but `/healthz` is under the `HttpLimits` (`limits`): a
//! request beyond the concurrency limit is answered 503 at once, one past
//! the timeout 408, both as `{"error": "..."}` naming the option to change.
//!
//! Times are accepted as RFC 3339 (`2026-11-25T08:00:00Z`,
//! `2026-11-25T16:00:00+08:00`, fractional seconds optional) or milliseconds
//! since the Unix epoch, years 0000 to 9999, and returned as RFC 3339 UTC
//! with milliseconds. `parse_time` is the one parser, for the CLI too.
//!
//! Completeness of a tag over a window = (Good + Uncertain samples with a
//! source time in the window) / floor(window / declared interval), capped at
//! 100%. Without `from`/`to` the window is the last hour, clipped to start no
//! earlier than the tag's first sample.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};

use crate::acceptance::Criteria;
use crate::forwarded::Client;
use crate::grpc::{ConnectionInfo, Connections, now_ms};
use crate::limits::HttpLimits;
use crate::store::{Store, StoreError, StoredPoint};
use crate::web::{self, Sessions, Viewer};

pub struct ApiState<S> {
    pub store: Arc<S>,
    pub connections: Arc<Connections>,
    pub criteria: Arc<Criteria>,
    pub sessions: Sessions,
    pub limits: HttpLimits,
    /// Reports and city views computed since the store last changed.
    pub reports: web::ReportCache,
}

/// `router` under the `HttpLimits`: one concurrency limit shared by every
/// route it wraps (axum layers each route, so a plain per-service limit
/// would multiply), shedding what is beyond it, and the timeout inside it so
/// a timed-out request frees its slot.
fn with_limits<T: Clone + Send + Sync + 'static>(
    router: Router<T>,
    limits: HttpLimits,
) -> Router<T> {
    router.layer(
        tower::ServiceBuilder::new()
            .layer(axum::error_handling::HandleErrorLayer::new(
                move |e: tower::BoxError| std::future::ready(refusal(&limits, &e)),
            ))
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                limits.max_concurrent as usize,
            ))
            .timeout(limits.timeout),
    )
}

/// The answer to a request the limits stopped.
fn refusal(limits: &HttpLimits, e: &tower::BoxError) -> Response {
    if e.is::<tower::timeout::error::Elapsed>() {
        crate::metrics::http_timed_out();
        ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request took longer than {} (--http-timeout): its work was stopped",
                humantime::format_duration(limits.timeout)
            ),
        )
        .into_response()
    } else if e.is::<tower::load_shed::error::Overloaded>() {
        crate::metrics::http_refused();
        (
            [(header::RETRY_AFTER, "1")],
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "busy: {} requests are being served (--http-max-concurrent); retry shortly",
                    limits.max_concurrent
                ),
            ),
        )
            .into_response()
    } else {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request failed: {e}"),
        )
        .into_response()
    }
}

pub fn router<S: Store>(state: Arc<ApiState<S>>) -> Router {
    let protected = Router::new()
        .route("/", get(overview::<S>))
        .route("/api/v1/summary", get(summary::<S>))
        .route("/api/v1/points", get(points::<S>))
        .route("/api/v1/losses", get(losses::<S>))
        .route("/api/v1/chain", get(chains::<S>))
        .route(
            "/api/v1/enterprises",
            get(web::list_enterprises::<S>).post(web::put_enterprise::<S>),
        )
        .route(
            "/api/v1/enterprises/{code}/equipment",
            get(web::get_equipment::<S>).put(web::put_equipment::<S>),
        )
        .route("/api/v1/enterprises/{code}/report", get(web::report::<S>))
        .route(
            "/api/v1/gateways/{id}/enterprise",
            put(web::assign_gateway::<S>).delete(web::unassign_gateway::<S>),
        )
        .route(
            "/api/v1/client",
            get(|Extension(client): Extension<Client>| async move { Json(client) }),
        )
        .route(
            "/api/v1/accounts",
            get(web::list_accounts::<S>).post(web::add_account::<S>),
        )
        .route("/api/v1/access-log", get(web::access_log::<S>))
        .route("/api/v1/city", get(web::city::<S>))
        .route("/gateways", get(web::fleet_page::<S>))
        .route("/report/{code}", get(web::report_page::<S>))
        .route("/city", get(web::city_page::<S>))
        .route("/api/v1/digests", get(digests::<S>))
        .merge(crate::ops::routes::<S>())
        .merge(crate::gateway_config::routes::<S>())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            web::authenticate::<S>,
        ));
    let limited = Router::new()
        .route("/login", get(web::login_page).post(web::login::<S>))
        .route("/logout", post(web::logout::<S>))
        .merge(protected)
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) });
    let limited = with_limits(limited, state.limits);
    // Backups and whole-chain checks of a big store outlast --http-timeout;
    // they get their own limit with an hour to finish.
    let whole_store = crate::ops::whole_store_routes::<S>().layer(middleware::from_fn_with_state(
        state.clone(),
        web::authenticate::<S>,
    ));
    let whole_store = with_limits(
        whole_store,
        HttpLimits {
            timeout: state.limits.timeout.max(crate::ops::LONG),
            ..state.limits
        },
    );
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(whole_store)
        .merge(limited)
        .layer(middleware::from_fn(web::harden))
        .with_state(state)
}

#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let code = match e {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
            StoreError::Exists(_) => StatusCode::CONFLICT,
            StoreError::Backend(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(code, e.to_string())
    }
}

/// The earliest and latest times the API accepts and prints: RFC 3339 has
/// four-digit years, 0000-01-01T00:00:00.000Z to 9999-12-31T23:59:59.999Z.
pub const MIN_TIME_MS: i64 = -62_167_219_200_000;
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

const RFC3339_MILLIS: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
);

/// `ms` as RFC 3339 UTC with milliseconds; times outside years 0000-9999
/// print as the nearest end of that range (a stored time never is).
pub fn rfc3339(ms: i64) -> String {
    let ms = ms.clamp(MIN_TIME_MS, MAX_TIME_MS);
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(RFC3339_MILLIS).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// Parses a time as the API and the CLI take it: RFC 3339 with `Z` or an
/// offset (`2026-12-02T10:00:00+08:00`), with or without fractional seconds
/// (also with a space for `T` and no zone, meaning UTC), or epoch
/// milliseconds; years 0000-9999. The error names the parameter `name`.
pub fn parse_time(name: &str, s: &str) -> Result<i64, ApiError> {
    parse_time_ms(s.trim())
        .filter(|ms| (MIN_TIME_MS..=MAX_TIME_MS).contains(ms))
        .ok_or_else(|| {
            let shown: String = s.chars().take(64).collect();
            ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "`{name}`: `{shown}` is not a time from year 0000 to 9999; expected RFC 3339 (2026-11-25T08:00:00Z, 2026-11-25T16:00:00+08:00) or epoch milliseconds"
                ),
            )
        })
}

fn parse_time_ms(s: &str) -> Option<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    let nanos = match time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
    {
        Ok(t) => t.unix_timestamp_nanos(),
        Err(_) => {
            let t = humantime::parse_rfc3339_weak(s).ok()?;
            let d = t.duration_since(UNIX_EPOCH).ok()?;
            i128::try_from(d.as_nanos()).ok()?
        }
    };
    i64::try_from(nanos.div_euclid(1_000_000)).ok()
}

#[derive(Deserialize)]
pub struct WindowQuery {
    from: Option<String>,
    to: Option<String>,
}

#[derive(Serialize)]
pub struct Summary {
    pub generated_at: String,
    pub gateways: Vec<GatewaySummary>,
}

#[derive(Serialize)]
pub struct GatewaySummary {
    pub id: String,
    pub registered_at: String,
    pub connection: Option<ConnectionInfo>,
    pub devices: Vec<DeviceSummary>,
}

#[derive(Serialize)]
pub struct DeviceSummary {
    pub id: String,
    pub protocol: String,
    pub endpoint: String,
    /// What the device said it is (e.g. Modbus function 43/14: vendor,
    /// product code, revision): evidence that a real device answered.
    pub identity: std::collections::BTreeMap<String, String>,
    pub tags: Vec<TagSummary>,
}

#[derive(Serialize)]
pub struct TagSummary {
    pub name: String,
    pub address: String,
    pub data_type: String,
    pub unit: String,
    pub interval_ms: u64,
    pub samples: u64,
    pub good: u64,
    pub uncertain: u64,
    pub bad: u64,
    /// Samples that arrived from the gateway's backlog after an outage.
    pub backfilled: u64,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
    pub last_value: Option<serde_json::Value>,
    pub last_quality: Option<String>,
    pub last_quality_code: u32,
    /// `last_quality_code` as people read it (`0x0002_0001`).
    pub last_quality_code_hex: String,
    pub window: WindowSummary,
}

#[derive(Serialize)]
pub struct WindowSummary {
    pub from: String,
    pub to: String,
    pub expected: u64,
    pub received: u64,
    pub bad: u64,
    /// received / expected, at most 1.0; null when nothing was expected.
    pub completeness: Option<f64>,
}

async fn summary<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Query(q): Query<WindowQuery>,
) -> Result<Json<Summary>, ApiError> {
    let now = now_ms();
    let from = q
        .from
        .as_deref()
        .map(|s| parse_time("from", s))
        .transpose()?;
    let to =
        q.to.as_deref()
            .map(|s| parse_time("to", s))
            .transpose()?
            .unwrap_or(now);
    if from.is_some_and(|f| f >= to) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "`from` must be before `to`".into(),
        ));
    }
    let connections = state.connections.snapshot();
    let mut gateways: BTreeMap<String, GatewaySummary> = BTreeMap::new();
    for g in state.store.gateways().await? {
        if !viewer.sees(&g.id) {
            continue;
        }
        gateways.insert(
            g.id.clone(),
            GatewaySummary {
                connection: connections.get(&g.id).cloned(),
                id: g.id,
                registered_at: rfc3339(g.registered_at_ms),
                devices: Vec::new(),
            },
        );
    }
    // An account that sees some gateways reads only their series.
    let series = match visible_list(&viewer) {
        Some(visible) => state.store.series_of(&visible).await?,
        None => state.store.series().await?,
    };
    // Each tag's window starts at its own time when `from` is not given:
    // one store call per distinct start, not one per tag.
    let window_of = |s: &crate::store::SeriesInfo| {
        from.unwrap_or_else(|| (to - 3_600_000).max(s.first_seen_ms.unwrap_or(to)))
    };
    let mut by_start: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, s) in series.iter().enumerate() {
        by_start.entry(window_of(s)).or_default().push(i);
    }
    let mut counts = vec![crate::store::WindowCounts::default(); series.len()];
    for (start, members) in by_start {
        let ids = members.iter().map(|&i| series[i].id).collect();
        let got = state.store.window_counts_of(ids, start, to).await?;
        for (i, c) in members.into_iter().zip(got) {
            counts[i] = c;
        }
    }
    for (s, counts) in series.into_iter().zip(counts) {
        if !viewer.sees(&s.gateway) {
            continue;
        }
        let from = window_of(&s);
        let expected = ((to - from).max(0) as u64)
            .checked_div(s.interval_ms)
            .unwrap_or(0);
        let received = counts.good + counts.uncertain;
        let tag = TagSummary {
            name: s.tag,
            address: s.address,
            data_type: s.data_type,
            unit: s.unit,
            interval_ms: s.interval_ms,
            samples: s.samples,
            good: s.good,
            uncertain: s.uncertain,
            bad: s.bad,
            backfilled: s.backfilled,
            first_seen: s.first_seen_ms.map(rfc3339),
            last_seen: s.last_seen_ms.map(rfc3339),
            last_value: s.last_value,
            last_quality: s.last_quality,
            last_quality_code: s.last_quality_code,
            last_quality_code_hex: quality_code_hex(s.last_quality_code),
            window: WindowSummary {
                from: rfc3339(from),
                to: rfc3339(to),
                expected,
                received,
                bad: counts.bad,
                completeness: (expected > 0).then(|| (received as f64 / expected as f64).min(1.0)),
            },
        };
        let gateway = gateways
            .entry(s.gateway.clone())
            .or_insert_with(|| GatewaySummary {
                id: s.gateway.clone(),
                registered_at: String::new(),
                connection: None,
                devices: Vec::new(),
            });
        match gateway.devices.iter_mut().find(|d| d.id == s.device) {
            Some(d) => d.tags.push(tag),
            None => gateway.devices.push(DeviceSummary {
                id: s.device,
                protocol: s.protocol,
                endpoint: s.endpoint,
                identity: s.identity,
                tags: vec![tag],
            }),
        }
    }
    Ok(Json(Summary {
        generated_at: rfc3339(now),
        gateways: gateways.into_values().collect(),
    }))
}

/// The gateways `viewer` may see, as a list for the store's scoped
/// queries (None: all).
fn visible_list(viewer: &Viewer) -> Option<Vec<String>> {
    viewer
        .gateways
        .as_ref()
        .map(|g| g.iter().cloned().collect())
}

#[derive(Deserialize)]
pub struct PointsQuery {
    gateway: String,
    device: String,
    tag: String,
    from: Option<String>,
    to: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
pub struct PointsResponse {
    pub gateway: String,
    pub device: String,
    pub tag: String,
    pub points: Vec<PointView>,
}

/// A stored point as the API serves it: its fields and its quality code in
/// hex.
#[derive(Serialize)]
pub struct PointView {
    #[serde(flatten)]
    pub point: StoredPoint,
    pub quality_code_hex: String,
}

/// A quality code as the README's table of codes prints it:
/// `0x0002_0001` (class, then detail).
pub fn quality_code_hex(code: u32) -> String {
    format!("{:#06x}_{:04x}", code >> 16, code & 0xFFFF)
}

async fn points<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Query(q): Query<PointsQuery>,
) -> Result<Json<PointsResponse>, ApiError> {
    let from = q
        .from
        .as_deref()
        .map(|s| parse_time("from", s))
        .transpose()?
        .unwrap_or(0);
    let to =
        q.to.as_deref()
            .map(|s| parse_time("to", s))
            .transpose()?
            .unwrap_or(i64::MAX);
    let series = state
        .store
        .series_by_tag(&q.gateway, &q.device, &q.tag)
        .await?
        .filter(|s| viewer.sees(&s.gateway))
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no tag {}/{}/{}", q.gateway, q.device, q.tag),
            )
        })?;
    let points = state
        .store
        .points(series.id, from, to, q.limit.unwrap_or(100_000))
        .await?;
    Ok(Json(PointsResponse {
        gateway: q.gateway,
        device: q.device,
        tag: q.tag,
        points: points
            .into_iter()
            .map(|point| PointView {
                quality_code_hex: quality_code_hex(point.quality_code),
                point,
            })
            .collect(),
    }))
}

async fn chains<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
) -> Result<impl IntoResponse, ApiError> {
    // An account that sees some gateways reads only their chains.
    let chains = match visible_list(&viewer) {
        Some(visible) => state.store.chains_of(&visible).await?,
        None => state.store.chains().await?,
    };
    Ok(Json(serde_json::json!({ "chains": chains })))
}

/// `?day=YYYY-MM-DD` (default yesterday, UTC) and any number of `gateway=`;
/// only gateways the account may see (none asked: all of those).
async fn digests<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<impl IntoResponse, ApiError> {
    let mut day = None;
    let mut gateways = Vec::new();
    for (k, v) in q {
        match k.as_str() {
            "day" => day = Some(v),
            "gateway" => gateways.push(v),
            other => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter `{other}`; expected day, gateway"),
                ));
            }
        }
    }
    let day = day.unwrap_or_else(crate::evidence::digest::yesterday);
    if let Some(visible) = &viewer.gateways {
        // The store reads "no gateway named" as all of them.
        if gateways.is_empty() {
            gateways = visible.iter().cloned().collect();
        } else {
            gateways.retain(|g| visible.contains(g));
        }
        if gateways.is_empty() {
            return Ok(Json(serde_json::json!({ "digests": [] })));
        }
    }
    let digests: Vec<_> = state
        .store
        .day_digests(gateways, day)
        .await?
        .into_iter()
        .map(|d| d.digest)
        .collect();
    Ok(Json(serde_json::json!({ "digests": digests })))
}

async fn losses<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
) -> Result<impl IntoResponse, ApiError> {
    let losses = match visible_list(&viewer) {
        Some(visible) => state.store.losses_of(&visible).await?,
        None => state.store.losses().await?,
    };
    Ok(Json(serde_json::json!({ "losses": losses })))
}

#[derive(Deserialize)]
pub struct OverviewQuery {
    lang: Option<String>,
}

/// The live overview `/` (`?lang=en` for English): the summary as the
/// account sees it, with links to the reports it may read and the city view.
async fn overview<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    Query(q): Query<OverviewQuery>,
) -> Result<Html<String>, ApiError> {
    let lang = web::html::Lang::from(q.lang.as_deref());
    let window = WindowQuery {
        from: None,
        to: None,
    };
    let Json(s) = summary(
        State(state.clone()),
        Extension(viewer.clone()),
        Query(window),
    )
    .await?;
    let enterprises: Vec<(String, String)> = state
        .store
        .enterprises()
        .await?
        .into_iter()
        .filter(|e| viewer.account.can_read(e))
        .map(|e| (e.code, e.name))
        .collect();
    let fleet = crate::fleet::may_see(&viewer).is_ok();
    Ok(Html(web::html::overview(&s, &enterprises, fleet, lang)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quality_codes_print_in_hex_as_the_readme_table_does() {
        assert_eq!(quality_code_hex(0), "0x0000_0000");
        assert_eq!(quality_code_hex(0x0002_0001), "0x0002_0001");
        assert_eq!(quality_code_hex(0x0001_0002), "0x0001_0002");
        assert_eq!(quality_code_hex(u32::MAX), "0xffff_ffff");
    }

    #[test]
    fn times_with_offsets_and_without_fractions_parse_to_the_same_instant() {
        let utc = parse_time("to", "2026-12-02T02:00:00Z").expect("utc");
        assert_eq!(
            parse_time("to", "2026-12-02T10:00:00+08:00").ok(),
            Some(utc)
        );
        assert_eq!(parse_time("to", "2026-12-02T02:00:00.000Z").ok(), Some(utc));
        assert_eq!(parse_time("to", "2026-12-02 02:00:00").ok(), Some(utc));
        assert_eq!(parse_time("to", &utc.to_string()).ok(), Some(utc));
        assert_eq!(rfc3339(utc), "2026-12-02T02:00:00.000Z");
    }

    #[test]
    fn times_beyond_year_9999_are_refused_naming_the_parameter_and_never_panic() {
        for bad in [
            "253402300800000",
            "-62167219200001",
            "10000-01-01T00:00:00Z",
            "9223372036854775807",
            "x",
        ] {
            let e = parse_time("to", bad).expect_err(bad);
            assert_eq!(e.0, StatusCode::BAD_REQUEST);
            assert!(e.1.starts_with("`to`:"), "{}", e.1);
        }
        assert_eq!(rfc3339(MAX_TIME_MS), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(i64::MIN), "0000-01-01T00:00:00.000Z");
        assert_eq!(
            parse_time("from", "0000-01-01T00:00:00Z").ok(),
            Some(MIN_TIME_MS)
        );
    }
}
