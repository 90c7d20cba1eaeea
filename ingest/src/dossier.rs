//! One enterprise's file for a window (一企一档): the report as
//! self-contained HTML in both languages, its JSON and CSV parts, the
//! evidence bundle, ingest's signed digests of the window's complete UTC
//! days, and VERIFY.txt on checking it offline.
//!
//! [`build`] decides what the dossier holds, for the CLI (written as a
//! directory) and for `GET /api/v1/enterprises/{code}/dossier?from=&to=`
//! (answered as one zip archive, which every desktop opens without tools).
//! `dossier --out DIR` against a running server unpacks that archive, so
//! both give the same directory.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::acceptance::{Criteria, Snapshot};
use crate::http::{ApiError, ApiState};
use crate::store::Store;
use crate::web::{self, ReportQuery, Viewer};

/// The files of a dossier, in the order written, and what they cover.
pub struct Dossier {
    pub files: Vec<(String, Vec<u8>)>,
    pub gateways: usize,
    pub digests: usize,
}

/// The dossier of enterprise `code` over `[from_day, to_day)`.
pub async fn build<S: Store>(
    store: &S,
    snap: &Snapshot,
    criteria: &Criteria,
    code: &str,
    from_day: i64,
    to_day: i64,
) -> Result<Dossier, ApiError> {
    // The same bundle whose fingerprint the report's footer shows.
    let (gateways, bundle) = web::enterprise_bundle(store, code, from_day, to_day).await?;
    let fingerprint = crate::evidence::fingerprint(&bundle);
    let report = web::build_report(store, snap, code, from_day, to_day, criteria).await?;
    let mut files = Vec::new();
    let mut parts = vec![
        ("report-zh.html".to_string(), "html", None, "zh"),
        ("report-en.html".to_string(), "html", None, "en"),
        ("report.json".to_string(), "json", None, "zh"),
    ];
    for part in ["devices", "equipment", "gaps", "usage"] {
        parts.push((format!("report-{part}.csv"), "csv", Some(part), "zh"));
    }
    for (name, format, part, lang) in parts {
        let bytes = web::report_bytes(&report, format, part, Some(lang), Some(&fingerprint))?;
        files.push((name, bytes));
    }
    files.push((
        "evidence-bundle.json".into(),
        crate::evidence::bundle_bytes(&bundle)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?,
    ));
    // Digests exist for complete UTC days only.
    let mut digests = Vec::new();
    let day_ms = 86_400_000;
    let mut day = from_day.div_euclid(day_ms) * day_ms;
    while day + day_ms <= to_day.min(snap.now_ms) {
        if !gateways.is_empty() {
            let name = crate::evidence::digest::day_of(day);
            digests.extend(
                store
                    .day_digests(gateways.clone(), name)
                    .await?
                    .into_iter()
                    .map(|d| d.digest),
            );
        }
        day += day_ms;
    }
    let digest_count = digests.len();
    let json = serde_json::to_vec_pretty(&serde_json::json!({ "digests": digests }))
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    files.push(("digests.json".into(), json));
    files.push(("VERIFY.txt".into(), VERIFY_TEXT.as_bytes().to_vec()));
    Ok(Dossier {
        files,
        gateways: gateways.len(),
        digests: digest_count,
    })
}

/// Writes `files` into the directory `out` (created).
pub fn write_dir(files: &[(String, Vec<u8>)], out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    for (name, bytes) in files {
        let path = out.join(name);
        std::fs::write(&path, bytes)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// `files` as one zip archive (deflated, flat).
pub fn zip(files: &[(String, Vec<u8>)]) -> Result<Vec<u8>, String> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in files {
        w.start_file(name, options)
            .and_then(|()| w.write_all(bytes).map_err(Into::into))
            .map_err(|e| format!("dossier archive, {name}: {e}"))?;
    }
    let cursor = w.finish().map_err(|e| format!("dossier archive: {e}"))?;
    Ok(cursor.into_inner())
}

/// The files of a dossier archive, as [`zip`] wrote them; `source` names
/// where it came from in errors. Only flat file names are accepted.
pub fn unzip(bytes: &[u8], source: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| format!("{source}: not a dossier archive: {e}"))?;
    let mut files = Vec::with_capacity(archive.len());
    for i in 0..archive.len() {
        let mut f = archive
            .by_index(i)
            .map_err(|e| format!("{source}: entry {i}: {e}"))?;
        let name = f
            .name()
            .map_err(|e| format!("{source}: entry {i}: {e}"))?
            .into_owned();
        let flat = f
            .enclosed_name()
            .is_some_and(|p| p.components().count() == 1 && !f.is_dir());
        if !flat {
            return Err(format!(
                "{source}: entry `{name}` is not a plain file name; refused"
            ));
        }
        let mut data = Vec::new();
        f.read_to_end(&mut data)
            .map_err(|e| format!("{source}: entry `{name}`: {e}"))?;
        files.push((name, data));
    }
    Ok(files)
}

/// `GET /api/v1/enterprises/{code}/dossier?from=&to=`: the dossier as a zip,
/// for whoever may read the enterprise's report (admin, its provider, its
/// reviewers); recorded in the access log like a report.
pub async fn route<S: Store>(
    State(state): State<Arc<ApiState<S>>>,
    Extension(viewer): Extension<Arc<Viewer>>,
    UrlPath(code): UrlPath<String>,
    Query(q): Query<ReportQuery>,
) -> Result<Response, ApiError> {
    let (from_day, to_day) = web::window(q.from.as_deref(), q.to.as_deref(), crate::grpc::now_ms())
        .map_err(|m| ApiError(StatusCode::BAD_REQUEST, m))?;
    let store = &*state.store;
    web::readable(store, &viewer, &code).await?;
    web::record(store, &viewer, "GET", &format!("dossier/{code}"), &code).await;
    let snap = web::snapshot(store).await?;
    let dossier = build(store, &snap, &state.criteria, &code, from_day, to_day).await?;
    let zip = zip(&dossier.files).map_err(|m| ApiError(StatusCode::INTERNAL_SERVER_ERROR, m))?;
    let name = format!(
        "dossier-{code}-{}-{}.zip",
        crate::acceptance::date_of(from_day),
        crate::acceptance::date_of(to_day - crate::store::rollup::DAY_MS)
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/zip".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
            (GATEWAYS_HEADER, dossier.gateways.to_string()),
            (DIGESTS_HEADER, dossier.digests.to_string()),
        ],
        zip,
    )
        .into_response())
}

/// How many gateways and digests the archive covers, for the CLI's message.
pub const GATEWAYS_HEADER: HeaderName = HeaderName::from_static("x-dossier-gateways");
pub const DIGESTS_HEADER: HeaderName = HeaderName::from_static("x-dossier-digests");

/// How to check a dossier offline, in both languages (the dossier's VERIFY.txt).
pub const VERIFY_TEXT: &str = "\
如何离线校验本档案（一企一档）
1. 安装 guantong-ingest（与生成本档案的版本相同或更新），无需服务器或数据库。
2. 运行：guantong-ingest verify evidence-bundle.json --digests digests.json
3. 输出 \"all checks hold\" 且退出码为 0：证据包中每个网关的签名哈希链完整、未被篡改，且与平台每日签名摘要一致。
   任何一项不成立时会逐条列出，退出码为 1。
4. report-zh.html / report-en.html 为报告本身（无外部资源，可直接打开或打印）；页脚的链头哈希应与校验输出一致。
   report.json 与 report-*.csv 为同一数据。

How to verify this dossier offline
1. Install guantong-ingest (the version that wrote the dossier, or newer); no server or database needed.
2. Run: guantong-ingest verify evidence-bundle.json --digests digests.json
3. \"all checks hold\" and exit code 0: every gateway's signed hash chain in the bundle is whole and
   untampered, and agrees with ingest's signed daily digests. Anything that fails is listed; exit code 1.
4. report-zh.html / report-en.html are the report itself (no external resources; open or print them);
   the chain heads in their footer must match the verification. report.json and report-*.csv carry
   the same data.
";
