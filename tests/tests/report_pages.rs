//! The report pages as a reviewer reads them: a real gateway feeding a
//! real ingest with the demo's device, then headless Chromium (with the CJK
//! font test.sh installs) over WebDriver. The zh and en report at 7 and 30
//! days and the city view are screenshot (PNGs under
//! `target/tmp/report-pages/`), and the test measures what is on screen:
//! labels present and not overlapping, a trend for every tag of the demo,
//! texts in the page's language (outside `translate="no"` names, units and
//! codes), and the report printed to A4 with its text and a CJK font.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use guantong_e2e::browser::Browser;
use guantong_e2e::procs::{
    GatewayProc, IngestProc, binary, gateway_toml, register_keyed_gateway, wait_for,
};
use guantong_e2e::sim::{SimDevice, standard_device_toml};
use guantong_ingest::acceptance::{date_of, parse_date};
use guantong_ingest::store::rollup::DAY_MS;
use reqwest::{Method, StatusCode};
use serde_json::Value;

const GW: &str = "gw-pages";
const CODE: &str = "91350100M000100Y43";
/// The tags of the demo's device (`standard_device_toml`).
const TAGS: [&str; 10] = [
    "counter",
    "u16",
    "i16",
    "u32",
    "i32_cdab",
    "temperature",
    "f32_cdab",
    "flow",
    "running",
    "door_closed",
];
/// Production machines networked, not networked, on an unknown gateway,
/// and one non-production machine, which must be listed too.
const REGISTER: &str = "设备编号,设备名称,车间,生产设备,网关,采集设备
E-001,压机1号,一车间,是,gw-pages,press-01
E-002,反应釜2号,二车间,是,,
E-003,办公空调,办公楼,否,,
E-004,包装机,三车间,是,gw-unknown,pack-01
";

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Boxes of elements, their overlaps and the page's text in its language,
/// measured in the page (injected through WebDriver: the CSP forbids inline
/// scripts in our pages).
const MEASURE: &str = r#"
const boxes = sel => [...document.querySelectorAll(sel)].map(e => {
  const r = e.getBoundingClientRect();
  return {text: e.textContent.trim(), l: r.left, t: r.top, r: r.right, b: r.bottom};
});
const clone = document.body.cloneNode(true);
clone.querySelectorAll('[translate="no"], title, style').forEach(e => e.remove());
document.body.appendChild(clone);
clone.style.position = 'absolute';
const text = clone.innerText;
clone.remove();
const trends = [...document.querySelectorAll('figure.trend')].map(f => ({
  tag: f.dataset.tag,
  marks: f.querySelectorAll('polyline.mean, circle').length,
  times: [...f.querySelectorAll('.axis-t')].map(e => {
    const r = e.getBoundingClientRect(); return {text: e.textContent, l: r.left, t: r.top, r: r.right, b: r.bottom};
  }),
  values: [...f.querySelectorAll('.axis-v')].map(e => {
    const r = e.getBoundingClientRect(); return {text: e.textContent, l: r.left, t: r.top, r: r.right, b: r.bottom};
  }),
  box: (r => ({text: '', l: r.left, t: r.top, r: r.right, b: r.bottom}))(f.getBoundingClientRect()),
}));
return {
  text,
  width: document.documentElement.scrollWidth,
  viewport: window.innerWidth,
  days: boxes('#heatmap .hm-day'),
  devices: boxes('#heatmap .hm-dev'),
  cells: boxes('#heatmap .hm-cell'),
  weeks: document.querySelectorAll('#heatmap .hm-week').length,
  heatmap: boxes('#heatmap')[0] || null,
  register: [...document.querySelectorAll('#register tr')].slice(1).map(r => [...r.cells].map(c => c.innerText)),
  cover: (document.querySelector('#cover') || {innerText: ''}).innerText,
  trends,
  dossier: (a => a ? {text: a.textContent.trim(), href: a.getAttribute('href')} : null)(document.querySelector('#dossier')),
  fingerprint: (document.querySelector('#fingerprint') || {textContent: ''}).textContent.trim(),
  fingerprint_note: (document.querySelector('#fingerprint-note') || {textContent: ''}).textContent.trim(),
  error: (document.querySelector('#error') || {textContent: ''}).textContent.trim(),
  lang: document.documentElement.lang,
  links: [...document.querySelectorAll('#links a')].map(a => a.getAttribute('href')),
  values: [...document.querySelectorAll('td.value')].map(e => e.textContent.trim()),
};
"#;

#[derive(Debug, Clone, Copy)]
struct Rect {
    l: f64,
    t: f64,
    r: f64,
    b: f64,
}

fn rects(v: &Value) -> Vec<(String, Rect)> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let f = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
            (
                b["text"].as_str().unwrap_or_default().to_string(),
                Rect {
                    l: f("l"),
                    t: f("t"),
                    r: f("r"),
                    b: f("b"),
                },
            )
        })
        .collect()
}

fn overlap(a: Rect, b: Rect) -> bool {
    // Half a pixel of anti-aliasing is not an overlap.
    a.l < b.r - 0.5 && b.l < a.r - 0.5 && a.t < b.b - 0.5 && b.t < a.b - 0.5
}

/// No two of `a` overlap each other, and none overlaps any of `b`.
fn assert_apart(what: &str, a: &[(String, Rect)], b: &[(String, Rect)]) {
    for (i, (ta, ra)) in a.iter().enumerate() {
        for (tb, rb) in a.iter().skip(i + 1) {
            assert!(
                !overlap(*ra, *rb),
                "{what}: `{ta}` {ra:?} overlaps `{tb}` {rb:?}"
            );
        }
        for (tb, rb) in b {
            assert!(
                !overlap(*ra, *rb),
                "{what}: `{ta}` {ra:?} overlaps `{tb}` {rb:?}"
            );
        }
    }
}

/// Words of the other language in what the page shows outside names,
/// units and codes.
fn foreign_words(text: &str, zh: bool) -> Vec<String> {
    if zh {
        const ALLOWED: [&str; 3] = ["ms", "PDF", "p50"];
        text.split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| w.chars().filter(char::is_ascii_alphabetic).count() >= 2)
            .filter(|w| !ALLOWED.contains(w) && w != &"p95")
            .map(str::to_string)
            .collect()
    } else {
        text.split_whitespace()
            .filter(|w| {
                w.chars().any(|c| {
                    ('\u{4e00}'..='\u{9fff}').contains(&c)
                        || ('\u{3000}'..='\u{303f}').contains(&c)
                        || ('\u{ff00}'..='\u{ffef}').contains(&c)
                })
            })
            .map(str::to_string)
            .collect()
    }
}

fn assert_language(page: &str, text: &str, zh: bool) {
    let foreign = foreign_words(text, zh);
    assert!(
        foreign.is_empty(),
        "{page}: words of the other language outside names: {foreign:?}\n{text}"
    );
}

/// The year before the one of `date` (`YYYY-MM-DD`): day labels of a
/// window across New Year.
fn to_year_before(date: &str) -> String {
    let year: i32 = date.get(..4).and_then(|y| y.parse().ok()).unwrap_or(0);
    (year - 1).to_string()
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_and_city_pages_read_right_in_both_languages_and_print_to_a4() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-pages");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots)?;
    let data = dir.path().join("ingest");
    let config = dir.path().join("gateway.toml");
    let buffer = dir.path().join("buffer");
    let token = register_keyed_gateway(&data, GW, &config, &buffer)?;
    let mut ingest = IngestProc::start(&data, any_port(), any_port()).await?;
    let admin = ingest.api();
    let admin_token = ingest.admin_token()?;

    // The demo's enterprise, register and device.
    let enterprise = format!(
        r#"{{"code":"{CODE}","name":"示范精细化工有限公司","county":"示范区","industry":"petrochemical","provider":"demo-provider"}}"#
    );
    for (method, path, body) in [
        (Method::POST, "/api/v1/enterprises".to_string(), enterprise),
        (
            Method::PUT,
            format!("/api/v1/enterprises/{CODE}/equipment"),
            REGISTER.to_string(),
        ),
        (
            Method::PUT,
            format!("/api/v1/gateways/{GW}/enterprise"),
            format!(r#"{{"enterprise":"{CODE}"}}"#),
        ),
    ] {
        let (status, reply) = admin.send(method, &path, Some(body)).await?;
        assert!(
            status == StatusCode::OK || status == StatusCode::CREATED,
            "{path}: {reply}"
        );
    }
    let sim = SimDevice::new();
    sim.with(|s| s.animate = true);
    let (sim_addr, _sim_task) = sim.serve(any_port()).await?;
    std::fs::write(
        &config,
        gateway_toml(GW, ingest.grpc, &token, &buffer)
            + &standard_device_toml("press-01", sim_addr, "200ms"),
    )?;
    let gateway = GatewayProc::start(&config)?;
    let report_json = format!("/api/v1/enterprises/{CODE}/report?format=json");
    let report: Value = wait_for(
        "a trend point for every tag",
        Duration::from_secs(30),
        || async {
            let r = admin.get(&report_json).await?;
            let trends = r["devices"][0]["trend"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let full = TAGS.iter().all(|tag| {
                trends.iter().any(|t| {
                    t["tag"] == *tag && t["points"].as_array().is_some_and(|p| !p.is_empty())
                })
            });
            Ok(full.then_some(r))
        },
    )
    .await?;
    let to = report["to"].as_str().unwrap_or_default().to_string();
    let to_day = parse_date(&to).map_err(anyhow::Error::msg)?;

    let browser = Browser::start(&dir.path().join("chromium"), 1400).await?;
    let base = format!("http://{}", ingest.http);
    // Sign in once; the session cookie serves every page after.
    browser
        .open(&format!("{base}/city?token={admin_token}"))
        .await?;

    for (lang, zh) in [("zh", true), ("en", false)] {
        for days in [7, 30, 90] {
            let from = date_of(to_day - (days - 1) * DAY_MS);
            let page = format!("report {lang} {days} days");
            browser
                .open(&format!(
                    "{base}/report/{CODE}?from={from}&to={to}&lang={lang}"
                ))
                .await?;
            browser
                .screenshot(&shots.join(format!("report-{lang}-{days}d.png")))
                .await?;
            let m = browser.eval(MEASURE).await?;

            // Cover: the verdict and the rate with its fraction.
            // Three production machines; E-001 counts once its data is
            // complete enough, as the JSON of the same window says.
            let json = admin
                .get(&format!(
                    "/api/v1/enterprises/{CODE}/report?format=json&from={from}&to={to}"
                ))
                .await?;
            let n = &json["networking"];
            assert_eq!(n["registered_production"], 3, "{n:#}");
            let through = n["data_through"].as_u64().unwrap_or(99);
            let rate = format!("{:.1}%", n["rate"].as_f64().unwrap_or(-1.0) * 100.0);
            let cover = m["cover"].as_str().unwrap_or_default();
            let (fraction, verdict, industry) = if zh {
                (
                    format!("{through} / 3 台生产设备数据贯通"),
                    "未达标",
                    "石化化工",
                )
            } else {
                (
                    format!("{through} of 3 production machines data-through"),
                    "below the target",
                    "Petrochemical and fine chemical",
                )
            };
            for want in [
                &rate,
                &fraction,
                verdict,
                industry,
                "示范精细化工有限公司",
                CODE,
            ] {
                assert!(
                    cover.contains(want),
                    "{page}: cover lacks `{want}`: {cover}"
                );
            }

            // The register: every machine, non-production too, each with a
            // reason in the page's language; the unknown gateway named.
            let register: Vec<Vec<String>> = serde_json::from_value(m["register"].clone())?;
            let ids: Vec<&str> = register.iter().map(|r| r[0].as_str()).collect();
            assert_eq!(ids, ["E-001", "E-002", "E-003", "E-004"], "{page}");
            assert!(
                register.iter().all(|r| r.len() == 7 && !r[6].is_empty()),
                "{page}: {register:?}"
            );
            let unknown = &register[3][6];
            assert!(unknown.contains("gw-unknown"), "{page}: {unknown}");
            assert!(
                unknown.contains(if zh {
                    "未分配给本企业"
                } else {
                    "not assigned to this enterprise"
                }),
                "{page}: {unknown}"
            );
            assert!(
                register[2][3].contains(if zh { "不计入" } else { "not counted" }),
                "{page}: {:?}",
                register[2]
            );

            // Heatmap: a label per day at 7 days, Mondays and week lines at
            // 30; labels outside the cells, device labels not clipped.
            let day_labels = rects(&m["days"]);
            let dev_labels = rects(&m["devices"]);
            let cells = rects(&m["cells"]);
            assert_eq!(
                cells.len(),
                days as usize,
                "{page}: one device, a cell per day"
            );
            if days == 7 {
                assert_eq!(day_labels.len(), 7, "{page}: {day_labels:?}");
                assert_eq!(day_labels[6].0, to[5..], "{page}");
            } else if days == 90 {
                // 90 days: a label at every week's Monday, a line per week.
                let weeks = m["weeks"].as_u64().unwrap_or(0);
                assert!(
                    (12..=14).contains(&weeks) && day_labels.len() >= 12,
                    "{page}: {weeks} week lines, labels {day_labels:?}"
                );
                for (text, _) in &day_labels {
                    let monday = parse_date(&format!("{}-{text}", &to[..4]))
                        .or_else(|_| parse_date(&format!("{}-{text}", to_year_before(&to))));
                    assert!(monday.is_ok(), "{page}: day label `{text}` is not a date");
                }
            } else {
                assert!(
                    day_labels.len() >= 4 && m["weeks"].as_u64() >= Some(4),
                    "{page}: {day_labels:?}"
                );
            }
            assert_apart(&format!("{page}: heatmap day labels"), &day_labels, &cells);
            assert_apart(
                &format!("{page}: heatmap device labels"),
                &dev_labels,
                &cells,
            );
            let heat = rects(&serde_json::json!([m["heatmap"]]))[0].1;
            for (t, r) in dev_labels.iter().chain(&day_labels) {
                assert!(
                    r.l >= heat.l - 0.5 && r.r <= heat.r + 0.5 && r.t >= heat.t - 0.5,
                    "{page}: `{t}` clipped: {r:?} outside {heat:?}"
                );
            }
            assert!(
                m["width"].as_f64() <= m["viewport"].as_f64(),
                "{page}: wider than the window: {m:?}"
            );

            // A trend for every tag of the demo, with values, value range
            // and a time axis whose labels do not overlap.
            let trends = m["trends"].as_array().cloned().unwrap_or_default();
            for tag in TAGS {
                let id = format!("{GW}/press-01/{tag}");
                let tr = trends
                    .iter()
                    .find(|t| t["tag"] == id.as_str())
                    .unwrap_or_else(|| panic!("{page}: no trend for {id}"));
                assert!(
                    tr["marks"].as_u64() >= Some(1),
                    "{page}: {id} draws nothing"
                );
                let values = rects(&tr["values"]);
                assert_eq!(values.len(), 2, "{page}: {id} value range");
                let figure = rects(&serde_json::json!([tr["box"]]))[0].1;
                for (t, r) in &values {
                    assert!(
                        r.l >= figure.l,
                        "{page}: {id} value label `{t}` clipped: {r:?} left of {figure:?}"
                    );
                }
                let times = rects(&tr["times"]);
                assert!(!times.is_empty(), "{page}: {id} has no time axis");
                assert_apart(&format!("{page}: {id} time axis"), &times, &[]);
            }

            // The dossier of this very window, to download; the page says
            // its fingerprint is on the dossier's copy (checked below).
            let dossier = &m["dossier"];
            assert_eq!(
                dossier["href"],
                format!("/api/v1/enterprises/{CODE}/dossier?from={from}&to={to}").as_str(),
                "{page}"
            );
            assert_eq!(
                dossier["text"],
                if zh {
                    "下载一企一档（本统计区间）"
                } else {
                    "Download the dossier (this window)"
                },
                "{page}"
            );
            assert_eq!(
                m["fingerprint"], "",
                "{page}: the live page exports no bundle"
            );
            assert!(
                m["fingerprint_note"]
                    .as_str()
                    .unwrap_or_default()
                    .contains(if zh {
                        "一企一档"
                    } else {
                        "the dossier's copy"
                    }),
                "{page}: fingerprint note `{}`",
                m["fingerprint_note"]
            );

            assert_language(&page, m["text"].as_str().unwrap_or_default(), zh);
        }
    }

    // A bad address of a report is a page in the page's language, not
    // JSON: a malformed code, a well-formed unknown one, a bad window.
    let unknown = "0123456789ABCDEFGHJKLMNPQRTUWXY"
        .chars()
        .map(|c| format!("91350100M000200Y4{c}"))
        .find(|code| guantong_ingest::registry::check_credit_code(code).is_ok())
        .unwrap_or_default();
    for (lang, zh) in [("zh", true), ("en", false)] {
        for path in [
            "/report/BADCODE".to_string(),
            format!("/report/{unknown}"),
            format!("/report/{CODE}?from=2026-13-01"),
        ] {
            let sep = if path.contains('?') { '&' } else { '?' };
            let page = format!("{path} {lang}");
            browser
                .open(&format!("{base}{path}{sep}lang={lang}"))
                .await?;
            let m = browser.eval(MEASURE).await?;
            let text = m["text"].as_str().unwrap_or_default();
            let error = m["error"].as_str().unwrap_or_default();
            assert!(!error.is_empty(), "{page}: no error page: {text}");
            assert!(!text.trim_start().starts_with('{'), "{page}: JSON: {text}");
            assert_eq!(m["lang"], if zh { "zh-CN" } else { "en" }, "{page}");
            let want = if path.contains("from=") {
                if zh { "请求有误" } else { "not valid" }
            } else if zh {
                "未找到该企业"
            } else {
                "No such enterprise"
            };
            assert!(error.contains(want), "{page}: `{error}`");
            assert_language(&page, text, zh);
        }
    }

    // The live overview in both languages: links to the report and the city
    // view, values as people read them (no f32 noise such as
    // 123.45600128173828), texts in the page's language.
    for (lang, zh) in [("zh", true), ("en", false)] {
        browser.open(&format!("{base}/?lang={lang}")).await?;
        browser
            .screenshot(&shots.join(format!("overview-{lang}.png")))
            .await?;
        let m = browser.eval(MEASURE).await?;
        let page = format!("overview {lang}");
        let links: Vec<String> = serde_json::from_value(m["links"].clone())?;
        assert!(
            links.contains(&format!("/city?lang={lang}"))
                && links.contains(&format!("/report/{CODE}?lang={lang}")),
            "{page}: {links:?}"
        );
        let values: Vec<String> = serde_json::from_value(m["values"].clone())?;
        assert_eq!(values.len(), TAGS.len(), "{page}: {values:?}");
        for v in &values {
            let digits = v
                .split(' ')
                .next()
                .unwrap_or_default()
                .chars()
                .filter(char::is_ascii_digit)
                .count();
            assert!(digits <= 9, "{page}: value `{v}` printed with float noise");
        }
        for unit in [" °C", " m³/h"] {
            assert!(
                values.iter().any(|v| v.ends_with(unit)),
                "{page}: no value in `{unit}`: {values:?}"
            );
        }
        assert_language(&page, m["text"].as_str().unwrap_or_default(), zh);
    }

    for (lang, zh) in [("zh", true), ("en", false)] {
        browser.open(&format!("{base}/city?lang={lang}")).await?;
        browser
            .screenshot(&shots.join(format!("city-{lang}.png")))
            .await?;
        let m = browser.eval(MEASURE).await?;
        let text = m["text"].as_str().unwrap_or_default();
        assert!(
            !text.contains("petrochemical"),
            "city {lang}: raw industry key\n{text}"
        );
        let industry = if zh {
            "石化化工"
        } else {
            "Petrochemical and fine chemical"
        };
        assert!(text.contains(industry), "city {lang}: {text}");
        assert_language(&format!("city {lang}"), text, zh);
    }

    // Printed to A4: the nav hidden, the text and a CJK font in the PDF,
    // the heatmap's last day not cut off.
    browser
        .open(&format!("{base}/report/{CODE}?to={to}&lang=zh"))
        .await?;
    let pdf_config = fantoccini::wd::PrintConfiguration::builder()
        .size(fantoccini::wd::PrintSize::A4)
        .background(true)
        .build()
        .map_err(|e| anyhow::anyhow!("print configuration: {e:?}"))?;
    let pdf = shots.join("report-zh.pdf");
    std::fs::write(&pdf, browser.client.print(pdf_config).await?)?;
    let pdf_arg = pdf.display().to_string();
    let info = run("pdfinfo", &[&pdf_arg])?;
    assert!(info.contains("(A4)"), "{info}");
    let pages: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("Pages:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!((1..=8).contains(&pages), "{pages} pages\n{info}");
    let text = run("pdftotext", &["-layout", &pdf_arg, "-"])?;
    for want in [
        "数据贯通验收报告",
        "生产设备联网率",
        "E-003",
        "证据包",
        &to[5..],
    ] {
        assert!(
            text.contains(want),
            "the printed report lacks `{want}`\n{text}"
        );
    }
    assert!(
        !text.contains("退出登录"),
        "the printed report shows the navigation\n{text}"
    );
    let fonts = run("pdffonts", &[&pdf_arg])?;
    assert!(
        fonts.contains("WenQuanYi") || fonts.contains("CJK") || fonts.contains("Hei"),
        "no CJK font in the printed report (install fonts-wqy-microhei):\n{fonts}"
    );

    // The dossier (一企一档) of the same window: self-contained pages, and a
    // bundle that verifies offline as VERIFY.txt says.
    drop(browser);
    drop(gateway);
    ingest.proc.terminate(Duration::from_secs(10));
    let dossier = dir.path().join("dossier");
    let ingest_bin = binary("guantong-ingest")?.display().to_string();
    let data_arg = data.display().to_string();
    let dossier_arg = dossier.display().to_string();
    run(
        &ingest_bin,
        &[
            "dossier",
            "--data",
            &data_arg,
            "--enterprise",
            CODE,
            "--to",
            &to,
            "--out",
            &dossier_arg,
        ],
    )?;
    for file in [
        "report-zh.html",
        "report-en.html",
        "report.json",
        "report-devices.csv",
        "report-equipment.csv",
        "report-gaps.csv",
        "report-usage.csv",
        "evidence-bundle.json",
        "digests.json",
        "VERIFY.txt",
    ] {
        assert!(dossier.join(file).is_file(), "the dossier lacks {file}");
    }
    for page in ["report-zh.html", "report-en.html"] {
        let html = std::fs::read_to_string(dossier.join(page))?;
        for external in [
            "src=\"http",
            "href=\"http",
            "url(http",
            "@import",
            "<script",
        ] {
            assert!(
                !html.contains(external),
                "{page} needs something from outside: `{external}`"
            );
        }
        assert!(
            html.contains("WenQuanYi Micro Hei"),
            "{page} names its CJK font"
        );
    }
    let verify = std::fs::read_to_string(dossier.join("VERIFY.txt"))?;
    let command = "guantong-ingest verify evidence-bundle.json --digests digests.json";
    assert!(
        verify.contains(command) && verify.contains("如何离线校验"),
        "{verify}"
    );
    let out = Command::new(&ingest_bin)
        .current_dir(&dossier)
        .args([
            "verify",
            "evidence-bundle.json",
            "--digests",
            "digests.json",
        ])
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("all checks hold"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The report of the dossier shows the fingerprint of the bundle beside
    // it, computed by the one function; `verify` prints the same.
    let bundle = guantong_ingest::evidence::read_bundle(&dossier.join("evidence-bundle.json"))?;
    let fingerprint = guantong_ingest::evidence::fingerprint(&bundle);
    for page in ["report-zh.html", "report-en.html"] {
        let html = std::fs::read_to_string(dossier.join(page))?;
        assert!(
            html.contains(&format!(
                "id=\"fingerprint\" translate=\"no\">{fingerprint}<"
            )),
            "{page} lacks the bundle's fingerprint {fingerprint}; it shows {:?}",
            html.find("id=\"fingerprint\"")
                .map(|at| &html[at..(at + 120).min(html.len())])
        );
    }
    assert!(said.contains(&fingerprint), "verify: {said}");

    println!("screenshots and PDF in {}", shots.display());
    Ok(())
}
