//! The HTTP API against its own users, end to end against the real
//! `guantong-ingest`: every route asked by admin, provider and reviewer
//! accounts of two enterprises (who may read, who may change, what leaks);
//! times, sign-in redirects, browser sessions, CSV for Excel and the
//! security headers; and a property test over every route's query
//! parameters and paths: never a 5xx, never a panic in the log.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use guantong_e2e::procs::IngestProc;
use reqwest::{Method, StatusCode, header};
use serde_json::Value;

/// Two enterprises of two providers, valid credit codes.
const A: &str = "91350100M000100Y43";
const B: &str = "91110000802100433B";

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Ingest with enterprises A (provider prov-a, gateway gw-a) and B
/// (prov-b, gw-b), a registered gateway of nobody (gw-loose), and accounts
/// of every role; `tokens` by account name.
struct World {
    dir: tempfile::TempDir,
    ingest: IngestProc,
    client: reqwest::Client,
    tokens: BTreeMap<&'static str, String>,
}

impl World {
    async fn start() -> anyhow::Result<World> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        for gw in ["gw-a", "gw-b", "gw-loose"] {
            IngestProc::register(&data, gw)?;
        }
        let ingest = IngestProc::start(&data, any_port(), any_port()).await?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let mut w = World {
            dir,
            ingest,
            client,
            tokens: BTreeMap::new(),
        };
        w.tokens.insert("admin", w.ingest.admin_token()?);
        for (code, provider, name) in [
            (A, "prov-a", "=HYPERLINK(\"http://evil.example\",\"A\")"),
            (B, "prov-b", "乙公司"),
        ] {
            let body = serde_json::json!({
                "code": code, "name": name, "county": "示范区",
                "industry": "light", "provider": provider,
            });
            w.expect(
                "admin",
                Method::POST,
                "/api/v1/enterprises",
                Some(body),
                201,
            )
            .await?;
        }
        let register = "设备编号,设备名称,生产设备,网关,采集设备\nE1,+SUM(1+1),是,gw-a,dev-1\nE2,-2+3,是,,\nE3,@cmd,否,,\n";
        w.send_text(
            "admin",
            Method::PUT,
            &format!("/api/v1/enterprises/{A}/equipment"),
            register,
        )
        .await?;
        for (gw, code) in [("gw-a", A), ("gw-b", B)] {
            let body = serde_json::json!({ "enterprise": code });
            w.expect(
                "admin",
                Method::PUT,
                &format!("/api/v1/gateways/{gw}/enterprise"),
                Some(body),
                200,
            )
            .await?;
        }
        for (name, account) in [
            (
                "prov-a",
                r#"{"name":"prov-a","role":"provider","provider":"prov-a"}"#,
            ),
            (
                "prov-b",
                r#"{"name":"prov-b","role":"provider","provider":"prov-b"}"#,
            ),
            (
                "rev-a",
                r#"{"name":"rev-a","role":"reviewer","enterprises":["91350100M000100Y43"]}"#,
            ),
            ("rev-none", r#"{"name":"rev-none","role":"reviewer"}"#),
            (
                "rev-all",
                r#"{"name":"rev-all","role":"reviewer","all_enterprises":true}"#,
            ),
        ] {
            let (_, body) = w
                .expect(
                    "admin",
                    Method::POST,
                    "/api/v1/accounts",
                    Some(serde_json::from_str(account)?),
                    201,
                )
                .await?;
            let token = body["token"].as_str().unwrap_or_default().to_string();
            w.tokens.insert(name, token);
        }
        Ok(w)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ingest.http)
    }

    fn request(&self, who: &str, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.client.request(method, self.url(path));
        match self.tokens.get(who) {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends `body` as JSON as account `who` (no token for an unknown
    /// name); returns the status and the body (JSON, or text as a string).
    async fn send(
        &self,
        who: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut req = self.request(who, method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    async fn send_text(
        &self,
        who: &str,
        method: Method,
        path: &str,
        body: &str,
    ) -> anyhow::Result<(StatusCode, String)> {
        let resp = self
            .request(who, method, path)
            .header(header::CONTENT_TYPE, "text/csv")
            .body(body.to_string())
            .send()
            .await?;
        Ok((resp.status(), resp.text().await?))
    }

    /// `send`, failing unless the status is `status`.
    async fn expect(
        &self,
        who: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
        status: u16,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let (s, v) = self.send(who, method.clone(), path, body).await?;
        anyhow::ensure!(
            s.as_u16() == status,
            "{who} {method} {path}: expected {status}, got {s}: {v}"
        );
        Ok((s, v))
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn strings(v: &Value, list: &str, field: &[&str]) -> BTreeSet<String> {
    v[list]
        .as_array()
        .into_iter()
        .flatten()
        .map(|item| {
            field
                .iter()
                .fold(item, |v, f| &v[*f])
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

const ACCOUNTS: [&str; 6] = ["admin", "prov-a", "prov-b", "rev-a", "rev-none", "rev-all"];

/// What each account may see: gateways and enterprises.
fn visible(who: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    match who {
        "admin" | "rev-all" => (set(&["gw-a", "gw-b", "gw-loose"]), set(&[A, B])),
        "prov-a" | "rev-a" => (set(&["gw-a"]), set(&[A])),
        "prov-b" => (set(&["gw-b"]), set(&[B])),
        _ => (set(&[]), set(&[])),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_each_role_of_two_enterprises_only_what_it_may() -> anyhow::Result<()> {
    let w = World::start().await?;
    for who in ACCOUNTS {
        let (gateways, enterprises) = visible(who);
        let mut gateways_with_data = gateways.clone();
        gateways_with_data.remove("gw-loose");
        let (_, summary) = w
            .expect(who, Method::GET, "/api/v1/summary", None, 200)
            .await?;
        assert_eq!(
            strings(&summary, "gateways", &["id"]),
            gateways,
            "{who}: summary"
        );
        // Digests name gateways, batch counts and roots: only one's own.
        let (_, digests) = w
            .expect(
                who,
                Method::GET,
                "/api/v1/digests?day=2026-01-01",
                None,
                200,
            )
            .await?;
        assert_eq!(
            strings(&digests, "digests", &["subject"]),
            gateways,
            "{who}: digests"
        );
        let (_, asked) = w
            .expect(
                who,
                Method::GET,
                "/api/v1/digests?day=2026-01-01&gateway=gw-a&gateway=gw-b",
                None,
                200,
            )
            .await?;
        let asked_visible: BTreeSet<String> = gateways
            .iter()
            .filter(|g| *g != "gw-loose")
            .cloned()
            .collect();
        assert_eq!(
            strings(&asked, "digests", &["subject"]),
            asked_visible,
            "{who}: digests of named gateways"
        );
        let (_, list) = w
            .expect(who, Method::GET, "/api/v1/enterprises", None, 200)
            .await?;
        assert_eq!(
            strings(&list, "enterprises", &["enterprise", "code"]),
            enterprises,
            "{who}: enterprises"
        );
        let (_, city) = w
            .expect(who, Method::GET, "/api/v1/city", None, 200)
            .await?;
        let city_text = city.to_string();
        for code in [A, B] {
            assert_eq!(
                city_text.contains(code),
                enterprises.contains(code),
                "{who}: city view and {code}: {city}"
            );
        }
        for code in [A, B] {
            let readable = if enterprises.contains(code) { 200 } else { 404 };
            for path in [
                format!("/api/v1/enterprises/{code}/report"),
                format!("/api/v1/enterprises/{code}/equipment"),
            ] {
                w.expect(who, Method::GET, &path, None, readable).await?;
            }
        }
        for path in ["/api/v1/chain", "/api/v1/losses", "/api/v1/client"] {
            w.expect(who, Method::GET, path, None, 200).await?;
        }
        // The fleet: admins and providers, each only its gateways;
        // reviewers are refused, on the API and on the page.
        let fleet_status = if who.starts_with("rev-") { 403 } else { 200 };
        let (_, fleet) = w
            .expect(who, Method::GET, "/api/v1/gateways", None, fleet_status)
            .await?;
        if fleet_status == 200 {
            assert_eq!(
                strings(&fleet, "gateways", &["id"]),
                gateways,
                "{who}: fleet"
            );
            // A filter never widens what an account sees.
            let (_, of_b) = w
                .expect(
                    who,
                    Method::GET,
                    &format!("/api/v1/gateways?enterprise={B}"),
                    None,
                    200,
                )
                .await?;
            let b_visible: BTreeSet<String> =
                gateways.iter().filter(|g| *g == "gw-b").cloned().collect();
            assert_eq!(strings(&of_b, "gateways", &["id"]), b_visible, "{who}");
        } else {
            assert!(
                fleet.to_string().contains("admins and providers"),
                "{fleet}"
            );
        }
        // Cloud configuration: admins and providers of the gateway read and
        // change it; a reviewer who sees the gateway is refused, anyone else
        // does not learn it exists.
        for gw in ["gw-a", "gw-b"] {
            let expected = match (gateways.contains(gw), fleet_status) {
                (false, _) => 404,
                (true, 200) => 200,
                (true, _) => 403,
            };
            let path = format!("/api/v1/gateways/{gw}/config");
            w.expect(who, Method::GET, &path, None, expected).await?;
            let (s, body) = w
                .send_text(who, Method::PUT, &path, "[[devices]]\nid = 3\n")
                .await?;
            let put_expected = if expected == 200 { 400 } else { expected };
            assert_eq!(s.as_u16(), put_expected, "{who}: PUT {path}: {body}");
        }
        let (_, overview) = w.send_text(who, Method::GET, "/", "").await?;
        assert_eq!(
            overview.contains("id=\"fleet-link\""),
            fleet_status == 200,
            "{who}: the overview links to the fleet only where it opens"
        );
        let (page_status, page) = w
            .send_text(who, Method::GET, "/gateways?lang=en", "")
            .await?;
        assert_eq!(page_status.as_u16(), fleet_status, "{who}: /gateways");
        for g in ["gw-a", "gw-b", "gw-loose"] {
            assert_eq!(
                page.contains(&format!("data-id=\"{g}\"")),
                fleet_status == 200 && gateways.contains(g),
                "{who}: {g} on the fleet page"
            );
        }
        let admin_only = if who == "admin" { 200 } else { 403 };
        for path in ["/api/v1/accounts", "/api/v1/access-log"] {
            w.expect(who, Method::GET, path, None, admin_only).await?;
        }
        // Writing B's register: its provider and admin; a reader is refused,
        // and an account that may not read it does not learn it exists.
        let write_b = match who {
            "admin" | "prov-b" => 200,
            "rev-all" => 403,
            _ => 404,
        };
        let (s, body) = w
            .send_text(
                who,
                Method::PUT,
                &format!("/api/v1/enterprises/{B}/equipment"),
                "id,name\nB1,压机\n",
            )
            .await?;
        assert_eq!(s.as_u16(), write_b, "{who}: write B's register: {body}");
    }
    // Nothing without a token, and the same JSON error shape.
    for path in [
        "/api/v1/summary",
        "/api/v1/digests",
        "/api/v1/enterprises",
        "/api/v1/city",
        "/api/v1/client",
        "/api/v1/chain",
        "/api/v1/losses",
        "/api/v1/accounts",
    ] {
        let (s, body) = w.send("nobody", Method::GET, path, None).await?;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}: {body}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }

    // Gateways: a provider cannot take one registered for someone else
    // (unassigned) nor one of another provider's enterprise.
    let to_a = serde_json::json!({ "enterprise": A });
    for (who, gw, status) in [
        ("prov-a", "gw-loose", 403),
        ("prov-a", "gw-b", 403),
        ("rev-all", "gw-a", 403),
        ("prov-a", "gw-a", 200),
    ] {
        let (s, body) = w
            .send(
                who,
                Method::PUT,
                &format!("/api/v1/gateways/{gw}/enterprise"),
                Some(to_a.clone()),
            )
            .await?;
        assert_eq!(s.as_u16(), status, "{who} assigns {gw}: {body}");
    }
    let (_, summary) = w
        .expect("prov-a", Method::GET, "/api/v1/summary", None, 200)
        .await?;
    assert_eq!(strings(&summary, "gateways", &["id"]), set(&["gw-a"]));
    // Unknown, malformed and huge ids are refused; no phantom row appears.
    let huge = "g".repeat(10_000);
    for (id, status) in [
        ("no-such-gateway", 404),
        ("a%2Fb", 400),
        (huge.as_str(), 400),
    ] {
        let (s, body) = w
            .send(
                "admin",
                Method::PUT,
                &format!("/api/v1/gateways/{id}/enterprise"),
                Some(to_a.clone()),
            )
            .await?;
        assert_eq!(s.as_u16(), status, "assign `{:.40}`: {body}", id);
        assert!(body["error"].is_string(), "{body}");
    }
    let (_, list) = w
        .expect("admin", Method::GET, "/api/v1/enterprises", None, 200)
        .await?;
    let owned: BTreeSet<String> = list["enterprises"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["gateways"].as_array().cloned().unwrap_or_default())
        .filter_map(|g| g.as_str().map(str::to_string))
        .collect();
    assert_eq!(owned, set(&["gw-a", "gw-b"]), "no phantom gateway: {list}");
    // Unassigning: not by another provider; then by admin, once.
    let path = "/api/v1/gateways/gw-b/enterprise";
    w.expect("prov-a", Method::DELETE, path, None, 404).await?;
    w.expect("admin", Method::DELETE, path, None, 200).await?;
    w.expect("admin", Method::DELETE, path, None, 404).await?;
    let (_, summary) = w
        .expect("prov-b", Method::GET, "/api/v1/summary", None, 200)
        .await?;
    assert_eq!(
        strings(&summary, "gateways", &["id"]),
        set(&[]),
        "{summary}"
    );
    assert!(!w.ingest.proc.logs().contains("panicked"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_are_bounded_and_take_offsets() -> anyhow::Result<()> {
    let mut w = World::start().await?;
    for (query, param) in [
        ("to=253402300800000", "to"),
        ("from=-62167219200001", "from"),
        ("to=10000-01-01T00:00:00Z", "to"),
        ("from=9223372036854775807", "from"),
    ] {
        let (s, body) = w
            .send(
                "admin",
                Method::GET,
                &format!("/api/v1/summary?{query}"),
                None,
            )
            .await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}: {body}");
        let e = body["error"].as_str().unwrap_or_default();
        assert!(e.starts_with(&format!("`{param}`:")), "{query}: {e}");
    }
    // UTC+8 with an offset, with and without fractional seconds.
    for query in [
        "from=2026-12-02T10:00:00%2B08:00&to=2026-12-02T11:00:00%2B08:00",
        "from=2026-12-02T02:00:00Z&to=2026-12-02T03:00:00.5Z",
        "from=0000-01-01T00:00:00Z&to=9999-12-31T23:59:59.999Z",
    ] {
        w.expect(
            "admin",
            Method::GET,
            &format!("/api/v1/summary?{query}"),
            None,
            200,
        )
        .await?;
    }
    let (s, body) = w
        .send(
            "admin",
            Method::GET,
            "/api/v1/points?gateway=gw-a&device=d&tag=t&from=2026-12-02T10:00:00%2B08:00",
            None,
        )
        .await?;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "the time parses; the tag is unknown: {body}"
    );
    assert!(w.ingest.proc.is_running(), "ingest still runs");
    // The CLI takes the same times: offsets, no fractional seconds.
    let data = w.dir.path().join("cli");
    IngestProc::register(&data, "gw-cli")?;
    let cli = |from: &str, to: &str| {
        std::process::Command::new(guantong_e2e::procs::binary("guantong-ingest")?)
            .args(["export-evidence", "--data"])
            .arg(&data)
            .args(["--gateway", "gw-cli", "--from", from, "--to", to, "--out"])
            .arg(data.with_extension("bundle.json"))
            .output()
            .map_err(anyhow::Error::from)
    };
    let out = cli("2026-12-02T10:00:00+08:00", "2026-12-02T11:00:00+08:00")?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli("2026-12-02T10:00:00+08:00", "253402300800000")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("`--to`"),
        "{stderr}"
    );
    assert!(
        !w.ingest.proc.logs().contains("panicked"),
        "{}",
        w.ingest.proc.logs()
    );
    Ok(())
}

/// The session cookie a response sets, `name=value` only.
fn session_of(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("gt_session="))
        .and_then(|c| c.split(';').next())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_returns_only_to_this_site_and_sessions_end() -> anyhow::Result<()> {
    let w = World::start().await?;
    let admin = w.tokens["admin"].clone();
    let login = |next: &str| {
        w.client
            .post(w.url("/login"))
            .form(&[("token", admin.as_str()), ("next", next)])
            .send()
    };
    for next in [
        "/\\evil.example/x",
        "/\\/evil.example",
        "/\t/evil.example",
        "//evil.example",
        "/%2F%2Fevil.example",
        "/%5Cevil.example",
        "https://evil.example/",
        "/ /evil.example",
    ] {
        let resp = login(next).await?;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{next:?}");
        assert_eq!(
            resp.headers()[header::LOCATION],
            "/",
            "{next:?} must not leave the site"
        );
    }
    let resp = login("/city?lang=en").await?;
    assert_eq!(resp.headers()[header::LOCATION], "/city?lang=en");
    let cookie = resp
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Max-Age="] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(
        !cookie.contains(&admin),
        "the account token stays out of cookies: {cookie}"
    );
    let session = session_of(&resp).ok_or_else(|| anyhow::anyhow!("no session: {cookie}"))?;
    let with_session = |method: Method, path: &str| {
        w.client
            .request(method, w.url(path))
            .header(header::COOKIE, session.clone())
    };
    let resp = with_session(Method::GET, "/api/v1/enterprises")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    // A cross-site form post with the session is refused (CSRF).
    let body = serde_json::json!({
        "code": B, "name": "x", "county": "x", "industry": "light", "provider": "prov-b",
    });
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let resp = with_session(Method::POST, "/api/v1/enterprises")
            .header(name, value)
            .json(&body)
            .send()
            .await?;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{name}: {value}");
    }
    let resp = with_session(Method::POST, "/api/v1/enterprises")
        .header("origin", format!("http://{}", w.ingest.http))
        .json(&body)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::CREATED, "same origin");
    // Logout ends the session on the server, not only in the browser.
    let resp = with_session(Method::POST, "/logout").send().await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cleared = resp
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    let resp = with_session(Method::GET, "/api/v1/enterprises")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // ?token= signs in, then leaves the address bar by redirect.
    let resp = w
        .client
        .get(w.url(&format!("/city?lang=en&token={admin}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[header::LOCATION], "/city?lang=en");
    let session = session_of(&resp).ok_or_else(|| anyhow::anyhow!("no session"))?;
    let resp = w
        .client
        .get(w.url("/city?lang=en"))
        .header(header::COOKIE, session)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_errors_bearer_and_csv_hold_for_browsers_and_excel() -> anyhow::Result<()> {
    let w = World::start().await?;
    for path in ["/", "/api/v1/summary", "/city", "/login", "/no/such/route"] {
        let resp = w.request("admin", Method::GET, path).send().await?;
        let h = resp.headers();
        let csp = h
            .get(header::CONTENT_SECURITY_POLICY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{path}: {csp}"
        );
        assert_eq!(h[header::X_FRAME_OPTIONS], "DENY", "{path}");
        assert_eq!(h[header::REFERRER_POLICY], "no-referrer", "{path}");
    }
    let page = w
        .request("admin", Method::GET, "/")
        .send()
        .await?
        .text()
        .await?;
    assert!(!page.contains("<script"), "no script at all: {page}");
    // One error shape: axum's own rejections and unknown routes too.
    for (method, path) in [
        (Method::GET, "/api/v1/points"),
        (Method::GET, "/api/v1/summary?from=x"),
        (Method::GET, "/no/such/route"),
        (Method::DELETE, "/api/v1/summary"),
        (Method::POST, "/api/v1/enterprises"),
    ] {
        let resp = w.request("admin", method.clone(), path).send().await?;
        let status = resp.status();
        assert!(status.is_client_error(), "{method} {path}: {status}");
        let text = resp.text().await?;
        let body: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{method} {path}: not JSON ({e}): {text}"))?;
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    // `Bearer` in any case.
    let admin = &w.tokens["admin"];
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let resp = w
            .client
            .get(w.url("/api/v1/enterprises"))
            .header(header::AUTHORIZATION, format!("{scheme} {admin}"))
            .send()
            .await?;
        assert_eq!(resp.status(), StatusCode::OK, "{scheme}");
    }
    // The data directory is the owner's only.
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [
        (w.ingest.data.clone(), 0o700),
        (w.ingest.data.join("ingest.redb"), 0o600),
    ] {
        let got = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(got, mode, "{} is {got:o}", path.display());
    }
    // Names are bounded.
    let long = serde_json::json!({
        "code": B, "name": "名".repeat(201), "county": "x", "industry": "light",
    });
    let (s, body) = w
        .send("admin", Method::POST, "/api/v1/enterprises", Some(long))
        .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    // CSV for Excel: no cell starts a formula.
    for path in [
        format!("/api/v1/enterprises/{A}/report?format=csv&part=equipment"),
        format!("/api/v1/enterprises/{A}/report?format=csv&part=devices"),
        "/api/v1/city?format=csv".to_string(),
    ] {
        let text = w
            .request("admin", Method::GET, &path)
            .send()
            .await?
            .text()
            .await?;
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(text.trim_start_matches('\u{feff}').as_bytes());
        for record in reader.records() {
            for cell in record?.iter() {
                assert!(
                    !runs_as_formula(cell),
                    "{path}: cell `{cell}` would run as a formula:\n{text}"
                );
            }
        }
    }
    let equipment = w
        .request(
            "admin",
            Method::GET,
            &format!("/api/v1/enterprises/{A}/report?format=csv&part=equipment"),
        )
        .send()
        .await?
        .text()
        .await?;
    assert!(equipment.contains("'+SUM(1+1)"), "{equipment}");
    Ok(())
}

/// Whether Excel would take `cell` as a formula (OWASP): it starts with
/// `=`, `+`, `-`, `@`, tab or CR and is not a plain number.
fn runs_as_formula(cell: &str) -> bool {
    cell.starts_with(['=', '+', '-', '@', '\t', '\r']) && cell.parse::<f64>().is_err()
}

/// Values that have broken parsers: huge, negative, non-numbers, unicode,
/// path tricks, NUL, very long.
fn nasty_values() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        "0",
        "-1",
        "-9223372036854775808",
        "9223372036854775807",
        "18446744073709551616",
        "253402300800000",
        "1e308",
        "NaN",
        "2026-02-30",
        "99999-01-01",
        "-0001-01-01",
        "2026-12-02T10:00:00+08:00",
        "10000-01-01T00:00:00Z",
        "%00",
        "%ff%fe",
        "..%2F..%2Fetc%2Fpasswd",
        "../../etc/passwd",
        "%E5%8F%8D%E5%BA%94",
        "<script>alert(1)</script>",
        "'%22;--",
        "%F0%9F%92%A5",
        "a&b=c",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("9".repeat(10_000));
    v.push("x".repeat(10_000));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_query_or_path_makes_ingest_answer_5xx_or_panic() -> anyhow::Result<()> {
    let w = World::start().await?;
    // Every route with the parameters it reads, and one it does not.
    let routes: [(&str, &[&str]); 16] = [
        ("/", &["x", "lang"]),
        ("/api/v1/summary", &["from", "to"]),
        ("/api/v1/points", &["from", "to", "limit"]),
        ("/api/v1/losses", &["x"]),
        ("/api/v1/chain", &["x"]),
        ("/api/v1/digests", &["day", "gateway"]),
        ("/api/v1/enterprises", &["x"]),
        ("/api/v1/accounts", &["x"]),
        ("/api/v1/access-log", &["limit"]),
        ("/api/v1/city", &["from", "to", "format", "lang"]),
        ("/city", &["from", "to", "lang"]),
        ("/api/v1/gateways", &["enterprise", "provider", "sort"]),
        ("/gateways", &["enterprise", "provider", "sort", "lang"]),
        ("/login", &["next"]),
        ("/api/v1/client", &["x"]),
        ("/healthz", &["x"]),
    ];
    let report_routes = [
        "/api/v1/enterprises/{}/report",
        "/report/{}",
        "/api/v1/enterprises/{}/equipment",
    ];
    let report_params = ["from", "to", "format", "part", "lang"];
    let values = nasty_values();
    let mut requests = Vec::new();
    for value in &values {
        for (route, params) in routes {
            for p in params {
                requests.push((
                    Method::GET,
                    format!("{route}?gateway=gw-a&device=d&tag=t&{p}={value}"),
                ));
            }
        }
        for route in report_routes {
            for code in [A, value.as_str()] {
                let path = route.replace("{}", code);
                for p in report_params {
                    requests.push((Method::GET, format!("{path}?{p}={value}")));
                }
                requests.push((Method::GET, path));
            }
        }
        for method in [Method::PUT, Method::DELETE] {
            requests.push((method, format!("/api/v1/gateways/{value}/enterprise")));
        }
        requests.push((Method::GET, format!("/{value}")));
        requests.push((Method::GET, format!("/api/v1/{value}")));
    }
    let mut failures = Vec::new();
    for (method, path) in &requests {
        let resp = w.request("admin", method.clone(), path).send().await?;
        if resp.status().is_server_error() {
            failures.push(format!("{method} {:.200}: {}", path, resp.status()));
        }
    }
    let requests = requests.len();
    assert!(requests > 1000, "{requests} requests");
    assert!(failures.is_empty(), "5xx answers:\n{}", failures.join("\n"));
    let logs = w.ingest.proc.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    Ok(())
}

/// A page route that fails answers an HTML page in the page's language
/// with the same status; the API route of the same report keeps JSON. The
/// overview `/` speaks both languages and links to what the account reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_fail_as_pages_and_the_overview_speaks_both_languages() -> anyhow::Result<()> {
    let w = World::start().await?;
    for (path, status, zh, en) in [
        ("/report/BADCODE", 404, "未找到该企业", "No such enterprise"),
        (
            "/report/91350100M000100Y43?from=2026-13-01",
            400,
            "请求有误",
            "not valid",
        ),
        ("/city?from=2026-02-30", 400, "请求有误", "not valid"),
    ] {
        for (lang, want) in [("zh", zh), ("en", en)] {
            let sep = if path.contains('?') { '&' } else { '?' };
            let resp = w
                .request("admin", Method::GET, &format!("{path}{sep}lang={lang}"))
                .send()
                .await?;
            assert_eq!(resp.status().as_u16(), status, "{path} {lang}");
            let ct = resp.headers()[header::CONTENT_TYPE].to_str()?.to_string();
            let body = resp.text().await?;
            assert!(ct.starts_with("text/html"), "{path} {lang}: {ct}: {body}");
            assert!(body.contains(want), "{path} {lang}: {body}");
        }
    }
    let resp = w
        .request("admin", Method::GET, "/api/v1/enterprises/BADCODE/report")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: Value = resp.json().await?;
    assert!(body["error"].as_str().is_some(), "{body}");

    // rev-a reads only A: the overview links A's report, not B's.
    for (lang, title) in [("zh", "实时联网状态"), ("en", "Live connectivity")] {
        let page = w
            .request("rev-a", Method::GET, &format!("/?lang={lang}"))
            .send()
            .await?
            .text()
            .await?;
        assert!(page.contains(title), "{lang}: {page}");
        assert!(
            page.contains(&format!("href=\"/report/{A}?lang={lang}\""))
                && page.contains(&format!("href=\"/city?lang={lang}\""))
                && !page.contains(&format!("/report/{B}")),
            "{lang}: {page}"
        );
    }
    Ok(())
}

/// The register as Excel on Chinese Windows saves it (GBK), detected or
/// declared; bytes in neither encoding refused naming the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equipment_register_in_gbk_is_imported() -> anyhow::Result<()> {
    let w = World::start().await?;
    let text = "设备编号,设备名称,车间,生产设备,网关,采集设备\nE1,反应釜1号,一车间,是,gw-a,dev-1\nE2,空压机,动力站,否,,\n";
    let (gbk, _, _) = encoding_rs::GBK.encode(text);
    let path = format!("/api/v1/enterprises/{A}/equipment");
    for query in ["", "?encoding=gbk"] {
        let resp = w
            .request("admin", Method::PUT, &format!("{path}{query}"))
            .body(gbk.to_vec())
            .send()
            .await?;
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "{query}: {}",
            resp.text().await?
        );
        let (_, list) = w.send("admin", Method::GET, &path, None).await?;
        assert_eq!(list["equipment"][0]["name"], "反应釜1号", "{query}: {list}");
    }
    let resp = w
        .request("admin", Method::PUT, &format!("{path}?encoding=utf-8"))
        .body(gbk.to_vec())
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await?;
    let e = body["error"].as_str().unwrap_or_default();
    assert!(e.contains("line 1") && e.contains("UTF-8"), "{e}");

    // The CLI reads a GBK file too (through the running server).
    let file = w.dir.path().join("台账.csv");
    std::fs::write(&file, &gbk[..])?;
    let out = std::process::Command::new(guantong_e2e::procs::binary("guantong-ingest")?)
        .args(["import-equipment", "--data"])
        .arg(w.dir.path().join("data"))
        .args(["--enterprise", B])
        .arg(&file)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, list) = w
        .send(
            "admin",
            Method::GET,
            &format!("/api/v1/enterprises/{B}/equipment"),
            None,
        )
        .await?;
    assert_eq!(list["equipment"][1]["name"], "空压机", "{list}");
    Ok(())
}
