//! Report pages (Chinese by default, English with `lang=en`) and CSV exports
//! (UTF-8 with BOM, so Excel shows Chinese correctly).
//!
//! Pages are rendered on the server with inline SVG charts and no scripts:
//! they print to PDF from the browser as they are shown, and need nothing
//! from the network. Every text from the registry or devices is escaped.

use std::fmt::Write as _;

use crate::acceptance::{CityView, Criteria, EnterpriseReport, Gap, flag_name};
use crate::http::rfc3339;
use crate::store::rollup::DAY_OFFSET_MS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Zh,
    En,
}

impl From<Option<&str>> for Lang {
    fn from(s: Option<&str>) -> Lang {
        match s {
            Some("en") => Lang::En,
            _ => Lang::Zh,
        }
    }
}

/// (key, Chinese, English)
const TEXT: &[(&str, &str, &str)] = &[
    (
        "title",
        "数据贯通验收报告",
        "Data-through acceptance report",
    ),
    (
        "city_title",
        "城市数字化转型试点 · 数据贯通总览",
        "City pilot: data-through overview",
    ),
    ("code", "统一社会信用代码", "Unified social credit code"),
    ("county", "区县", "County/district"),
    ("industry", "行业", "Industry"),
    ("provider", "服务商", "Service provider"),
    ("window", "统计区间", "Window"),
    ("generated", "生成时间", "Generated"),
    (
        "rate",
        "生产设备联网率",
        "Production equipment networking rate",
    ),
    ("through", "数据贯通设备", "Data-through devices"),
    (
        "registered",
        "登记生产设备",
        "Registered production devices",
    ),
    ("criteria", "判定标准", "Criteria"),
    (
        "criteria_text",
        "验收期内每日完整率 ≥ {c}%（最近 {d} 天），且无严重异常标记",
        "completeness ≥ {c}% on each of the last {d} days, and no critical plausibility flag",
    ),
    ("register", "设备台账", "Equipment register"),
    ("eq_id", "设备编号", "Equipment no."),
    ("eq_name", "设备名称", "Name"),
    ("workshop", "车间", "Workshop"),
    ("collected_by", "采集网关/设备", "Gateway/device"),
    ("verdict", "判定", "Verdict"),
    ("reason", "说明", "Reason"),
    ("yes", "贯通", "data-through"),
    ("no", "未贯通", "not data-through"),
    (
        "heatmap",
        "设备每日数据完整率",
        "Completeness per device and day",
    ),
    ("devices", "采集设备", "Collected devices"),
    ("device", "设备", "Device"),
    ("identity", "设备标识", "Device identification"),
    ("completeness", "完整率", "Completeness"),
    ("received", "实收/应收", "Received/expected"),
    (
        "quality",
        "质量（好/不确定/坏）",
        "Quality (good/uncertain/bad)",
    ),
    ("backfill", "补传占比", "Backfilled"),
    ("first_last", "首次/最近", "First/last seen"),
    ("flags", "异常标记", "Plausibility flags"),
    ("gaps", "数据缺口", "Gaps"),
    ("start", "开始", "Start"),
    ("end", "结束", "End"),
    ("duration", "时长", "Duration"),
    ("cause", "原因", "Cause"),
    ("tags", "点位数", "Tags"),
    ("gateways", "网关", "Gateways"),
    ("gateway", "网关", "Gateway"),
    ("latency", "延迟 p50/p95", "Latency p50/p95"),
    ("clock", "时钟偏差", "Clock offset"),
    ("chain", "证据链", "Evidence chain"),
    (
        "chain_ok",
        "已验证批次 {a}–{b}，链头 {h}",
        "verified batches {a}–{b}, head {h}",
    ),
    ("chain_breaks", "断点", "breaks"),
    ("usage", "上云用云", "Cloud usage"),
    ("date", "日期", "Date"),
    ("active", "活跃", "Active"),
    ("points", "数据点", "Points"),
    ("bytes", "字节", "Bytes"),
    ("active_devices", "活跃设备", "Active devices"),
    ("active_tags", "活跃点位", "Active tags"),
    ("active_days", "月活跃天数", "Active days per month"),
    (
        "trends",
        "实时数据趋势（小时均值）",
        "Value trends (hourly mean)",
    ),
    (
        "unregistered",
        "未登记的采集设备（不计入联网率）",
        "Devices not in the register (not counted)",
    ),
    ("none", "无", "none"),
    (
        "cause_device_fault",
        "设备故障（坏质量）",
        "device fault (Bad quality)",
    ),
    (
        "cause_dropped_by_gateway",
        "网关丢弃（有丢失记录）",
        "dropped by the gateway (loss record)",
    ),
    (
        "cause_storage_error",
        "网关存储故障（有丢失记录）",
        "gateway storage failed (loss record)",
    ),
    (
        "cause_storage_corrupted",
        "网关缓存文件损坏（有丢失记录）",
        "gateway buffer file damaged (loss record)",
    ),
    ("cause_no_data", "无数据", "no data at all"),
    (
        "cause_gateway_offline_backfilled",
        "网关离线，数据事后补传",
        "gateway offline, data backfilled later",
    ),
    ("flag_frozen", "数值冻结", "frozen value"),
    (
        "flag_identical_series",
        "与其他设备数据雷同",
        "identical to another device",
    ),
    ("flag_out_of_range", "超出量程", "outside declared range"),
    (
        "flag_no_jitter",
        "时间戳无抖动（疑似模拟）",
        "timestamps without jitter (simulator-like)",
    ),
    (
        "flag_future_timestamps",
        "时间戳超前",
        "timestamps in the future",
    ),
    ("critical", "严重", "critical"),
    ("enterprises", "登记企业", "Enterprises registered"),
    ("on_cloud", "已上云企业", "Enterprises on the cloud"),
    ("meets_target", "达到目标", "Meeting the target"),
    ("target", "联网率目标", "Networking-rate target"),
    ("distribution", "联网率分布", "Networking-rate distribution"),
    ("by_industry", "按行业", "By industry"),
    ("by_county", "按区县", "By county"),
    ("mean_rate", "平均联网率", "Mean networking rate"),
    ("enterprise", "企业", "Enterprise"),
    ("open_report", "查看报告", "open report"),
    ("switch", "English", "中文"),
    (
        "print",
        "可用浏览器“打印”导出 PDF",
        "Print from the browser to save a PDF",
    ),
    ("login", "登录", "Sign in"),
    ("logout", "退出登录", "Sign out"),
    ("token", "访问令牌", "Access token"),
];

fn t(lang: Lang, key: &str) -> &'static str {
    TEXT.iter()
        .find(|(k, _, _)| *k == key)
        .map_or("?", |(_, zh, en)| if lang == Lang::Zh { zh } else { en })
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// "YYYY-MM-DD HH:MM:SS" in UTC+8.
fn local(ms: i64) -> String {
    let s = rfc3339(ms + DAY_OFFSET_MS);
    s.get(..19).unwrap_or(&s).replace('T', " ")
}

fn pct(x: Option<f64>) -> String {
    x.map_or("—".into(), |x| format!("{:.1}%", x * 100.0))
}

fn duration(ms: i64) -> String {
    let s = ms / 1000;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}.{:01}s", s, ms % 1000 / 100)
    }
}

fn cause(lang: Lang, c: &str) -> &'static str {
    t(lang, &format!("cause_{c}"))
}

/// Red → amber → green for 0 → 100 % completeness.
fn colour(x: Option<f64>) -> &'static str {
    match x {
        None => "#e5e7eb",
        Some(x) if x >= 0.95 => "#16a34a",
        Some(x) if x >= 0.8 => "#84cc16",
        Some(x) if x >= 0.5 => "#f59e0b",
        Some(_) => "#dc2626",
    }
}

const STYLE: &str = "body{font-family:system-ui,'PingFang SC','Noto Sans CJK SC','Microsoft YaHei',sans-serif;margin:24px;color:#111}\
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ccc;padding-bottom:4px}\
table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}\
th{background:#f3f4f6}.ok{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}.muted{color:#666;font-size:12px}\
.big{font-size:30px;font-weight:700}.box{display:inline-block;border:1px solid #ccc;border-radius:6px;padding:10px 16px;margin:4px 8px 4px 0}\
.num{text-align:right;font-variant-numeric:tabular-nums}@media print{a.nav,form.nav{display:none}body{margin:8mm}}";

fn page(lang: Lang, title: &str, switch_href: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"{}\"><head><meta charset=\"utf-8\"><link rel=\"icon\" href=\"data:,\">\
         <title>{}</title><style>{STYLE}</style></head><body>\
         <p class=\"muted\"><a class=\"nav\" href=\"{}\">{}</a> · {} \
         <form class=\"nav\" method=\"post\" action=\"/logout\" style=\"display:inline\"><button>{}</button></form></p>\
         {body}</body></html>",
        if lang == Lang::Zh { "zh-CN" } else { "en" },
        esc(title),
        esc(switch_href),
        t(lang, "switch"),
        t(lang, "print"),
        t(lang, "logout"),
    )
}

pub fn login(next: &str) -> String {
    let lang = Lang::Zh;
    format!(
        "<!doctype html><html lang=\"zh-CN\"><head><meta charset=\"utf-8\"><link rel=\"icon\" href=\"data:,\">\
         <title>Guantong</title><style>{STYLE}</style></head><body><h1>Guantong · {}</h1>\
         <form method=\"post\" action=\"/login\"><label>{} / Access token<br>\
         <input name=\"token\" type=\"password\" size=\"40\" autocomplete=\"off\"></label>\
         <input type=\"hidden\" name=\"next\" value=\"{}\"> <button>{} / Sign in</button></form></body></html>",
        t(lang, "login"),
        t(lang, "token"),
        esc(next),
        t(lang, "login")
    )
}

pub fn login_failed() -> String {
    "<!doctype html><html><head><meta charset=\"utf-8\"><link rel=\"icon\" href=\"data:,\"><title>Guantong</title></head>\
     <body><p>令牌无效 / Wrong token. <a href=\"/login\">↩</a></p></body></html>"
        .into()
}

fn heatmap(r: &EnterpriseReport, lang: Lang) -> String {
    let days = r.devices.first().map_or(0, |d| d.daily.len());
    if days == 0 {
        return format!("<p>{}</p>", t(lang, "none"));
    }
    let (cw, ch, left, top) = (26, 18, 220, 40);
    let w = left + days * cw + 10;
    let h = top + r.devices.len() * ch + 10;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-size=\"11\" role=\"img\">"
    );
    for (i, cell) in r.devices[0].daily.iter().enumerate() {
        let x = left + i * cw + cw / 2;
        let _ = write!(
            s,
            "<text x=\"{x}\" y=\"{}\" text-anchor=\"end\" transform=\"rotate(-60 {x} {})\">{}</text>",
            top - 4,
            top - 4,
            &cell.date[5..]
        );
    }
    for (j, d) in r.devices.iter().enumerate() {
        let y = top + j * ch;
        let label = d
            .equipment
            .as_ref()
            .map_or(d.device.clone(), |e| format!("{} {}", e.id, e.name));
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            left - 6,
            y + 13,
            esc(&label)
        );
        for (i, cell) in d.daily.iter().enumerate() {
            let _ = write!(
                s,
                "<rect x=\"{}\" y=\"{y}\" width=\"{}\" height=\"{}\" fill=\"{}\"><title>{} {} {}</title></rect>",
                left + i * cw,
                cw - 2,
                ch - 2,
                colour(cell.completeness),
                esc(&d.device),
                cell.date,
                pct(cell.completeness)
            );
        }
    }
    s.push_str("</svg>");
    s
}

fn trend_svg(points: &[(i64, f64, f64, f64)], from: i64, to: i64) -> String {
    let (w, h) = (640.0, 140.0);
    if points.is_empty() {
        return String::new();
    }
    let lo = points.iter().map(|p| p.2).fold(f64::INFINITY, f64::min);
    let hi = points.iter().map(|p| p.3).fold(f64::NEG_INFINITY, f64::max);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let x = |t: i64| 40.0 + (t - from) as f64 / (to - from).max(1) as f64 * (w - 50.0);
    let y = |v: f64| 10.0 + (hi - v) / span * (h - 30.0);
    let mut band = String::new();
    for p in points {
        let _ = write!(
            band,
            "M{:.1},{:.1}L{:.1},{:.1}",
            x(p.0),
            y(p.3),
            x(p.0),
            y(p.2)
        );
    }
    let line: Vec<String> = points
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1)))
        .collect();
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-size=\"10\" role=\"img\">\
         <rect x=\"40\" y=\"10\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#ccc\"/>\
         <path d=\"{band}\" stroke=\"#93c5fd\" stroke-width=\"2\"/>\
         <polyline points=\"{}\" fill=\"none\" stroke=\"#1d4ed8\" stroke-width=\"1.5\"/>\
         <text x=\"36\" y=\"16\" text-anchor=\"end\">{}</text><text x=\"36\" y=\"{}\" text-anchor=\"end\">{}</text></svg>",
        w - 50.0,
        h - 30.0,
        line.join(" "),
        fmt_num(hi),
        h - 20.0,
        fmt_num(lo)
    )
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn gap_rows(out: &mut String, device: &str, gaps: &[Gap], lang: Lang) {
    for g in gaps {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
            esc(device),
            local(g.start_ms),
            local(g.end_ms),
            duration(g.duration_ms),
            cause(lang, g.cause),
            g.tags
        );
    }
}

pub fn report(r: &EnterpriseReport, lang: Lang) -> String {
    let e = &r.enterprise;
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>{} · {}</h1><table><tr><th>{}</th><td>{}</td><th>{}</th><td>{}</td></tr>\
         <tr><th>{}</th><td>{}</td><th>{}</th><td>{}</td></tr>\
         <tr><th>{}</th><td>{} — {}</td><th>{}</th><td>{}</td></tr></table>",
        esc(&e.name),
        t(lang, "title"),
        t(lang, "code"),
        esc(&e.code),
        t(lang, "county"),
        esc(&e.county),
        t(lang, "industry"),
        esc(&r.industry_name),
        t(lang, "provider"),
        esc(&e.provider),
        t(lang, "window"),
        r.from,
        r.to,
        t(lang, "generated"),
        local(r.generated_at_ms),
    );
    let n = &r.networking;
    let crit = t(lang, "criteria_text")
        .replace(
            "{c}",
            &format!("{:.0}", r.criteria.completeness_min * 100.0),
        )
        .replace("{d}", &r.criteria.verdict_days.to_string());
    let _ = write!(
        b,
        "<div class=\"box\"><div class=\"muted\">{}</div><div class=\"big\" id=\"networking-rate\">{}</div></div>\
         <div class=\"box\"><div class=\"muted\">{}</div><div class=\"big\" id=\"data-through\">{} / {}</div></div>\
         <p class=\"muted\">{}: {}</p>",
        t(lang, "rate"),
        pct(n.rate),
        t(lang, "through"),
        n.data_through,
        n.registered_production,
        t(lang, "criteria"),
        esc(&crit)
    );
    let _ = write!(
        b,
        "<h2>{}</h2><table id=\"register\"><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr>",
        t(lang, "register"),
        t(lang, "eq_id"),
        t(lang, "eq_name"),
        t(lang, "workshop"),
        t(lang, "collected_by"),
        t(lang, "verdict"),
        t(lang, "reason")
    );
    for s in &n.equipment {
        let q = &s.equipment;
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            esc(&q.id),
            esc(&q.name),
            esc(&q.workshop),
            esc(&if q.gateway.is_empty() {
                "—".to_string()
            } else {
                format!("{}/{}", q.gateway, q.device)
            }),
            if s.data_through { "ok" } else { "bad" },
            t(lang, if s.data_through { "yes" } else { "no" }),
            esc(&s.reason)
        );
    }
    b.push_str("</table>");
    if !n.unregistered_devices.is_empty() {
        let _ = write!(
            b,
            "<p>{}: {}</p>",
            t(lang, "unregistered"),
            esc(&n.unregistered_devices.join(", "))
        );
    }
    let _ = write!(b, "<h2>{}</h2>{}", t(lang, "heatmap"), heatmap(r, lang));
    let _ = write!(
        b,
        "<h2>{}</h2><table id=\"devices\"><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr>",
        t(lang, "devices"),
        t(lang, "device"),
        t(lang, "identity"),
        t(lang, "completeness"),
        t(lang, "received"),
        t(lang, "quality"),
        t(lang, "backfill"),
        t(lang, "first_last"),
        t(lang, "flags"),
        t(lang, "verdict")
    );
    for d in &r.devices {
        let ident: Vec<String> = d
            .identity
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let flags: Vec<String> = d
            .flags
            .iter()
            .map(|f| {
                format!(
                    "{}{} ({}: {})",
                    if f.critical {
                        format!("[{}] ", t(lang, "critical"))
                    } else {
                        String::new()
                    },
                    t(lang, &format!("flag_{}", flag_name(f.kind))),
                    f.tag,
                    f.detail
                )
            })
            .collect();
        let samples = d.good + d.uncertain + d.bad;
        let _ = write!(
            b,
            "<tr><td>{}/{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{} / {}</td><td class=\"num\">{} / {} / {}</td>\
             <td class=\"num\">{}</td><td>{}<br>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
            esc(&d.gateway),
            esc(&d.device),
            esc(&ident.join("; ")),
            pct(d.completeness),
            d.received,
            d.expected,
            d.good,
            d.uncertain,
            d.bad,
            pct((samples > 0).then(|| d.backfilled as f64 / samples as f64)),
            d.first_seen_ms.map_or("—".into(), local),
            d.last_seen_ms.map_or("—".into(), local),
            esc(&flags.join("; ")),
            if d.verdict.data_through { "ok" } else { "bad" },
            t(lang, if d.verdict.data_through { "yes" } else { "no" }),
        );
    }
    b.push_str("</table>");
    let _ = write!(
        b,
        "<h2>{}</h2><table id=\"gaps\"><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr>",
        t(lang, "gaps"),
        t(lang, "device"),
        t(lang, "start"),
        t(lang, "end"),
        t(lang, "duration"),
        t(lang, "cause"),
        t(lang, "tags")
    );
    for d in &r.devices {
        gap_rows(&mut b, &d.device, &d.gaps, lang);
    }
    b.push_str("</table>");
    let _ = write!(
        b,
        "<h2>{}</h2><table id=\"gateways\"><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr>",
        t(lang, "gateways"),
        t(lang, "gateway"),
        t(lang, "points"),
        t(lang, "latency"),
        t(lang, "clock"),
        t(lang, "backfill"),
        t(lang, "chain")
    );
    for g in &r.gateways {
        let chains: Vec<String> = g
            .chains
            .iter()
            .map(|c| {
                let mut s = t(lang, "chain_ok")
                    .replace("{a}", &c.verified_from.to_string())
                    .replace("{b}", &c.verified_through.to_string())
                    .replace("{h}", c.head_hash.get(..16).unwrap_or(&c.head_hash));
                if !c.breaks.is_empty() {
                    let _ = write!(s, "; {} {}", c.breaks.len(), t(lang, "chain_breaks"));
                }
                s
            })
            .collect();
        let _ = write!(
            b,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{} / {} ms</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&g.gateway),
            g.points,
            g.latency_p50_ms.map_or("—".into(), |v| format!("≤{v}")),
            g.latency_p95_ms.map_or("—".into(), |v| format!("≤{v}")),
            g.clock_offset_ms
                .map_or("—".into(), |v| format!("{v:+} ms")),
            pct(Some(g.backfill_share)),
            esc(&chains.join("<br>")).replace("&lt;br&gt;", "<br>")
        );
    }
    b.push_str("</table>");
    let _ = write!(
        b,
        "<h2>{}</h2><table id=\"usage\"><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr>",
        t(lang, "usage"),
        t(lang, "date"),
        t(lang, "active"),
        t(lang, "points"),
        t(lang, "bytes"),
        t(lang, "active_devices"),
        t(lang, "active_tags")
    );
    for u in &r.usage {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            u.date,
            if u.active { "✔" } else { "—" },
            u.points,
            u.bytes,
            u.active_devices,
            u.active_tags
        );
    }
    b.push_str("</table>");
    let months: Vec<String> = r
        .active_days
        .iter()
        .map(|(m, n)| format!("{m}: {n}"))
        .collect();
    let _ = write!(
        b,
        "<p>{}: {}</p>",
        t(lang, "active_days"),
        months.join(", ")
    );
    let _ = write!(b, "<h2>{}</h2>", t(lang, "trends"));
    for d in &r.devices {
        for tr in &d.trend {
            if tr.points.is_empty() {
                continue;
            }
            let _ = write!(
                b,
                "<p class=\"muted\">{}/{} · {} ({})</p>{}",
                esc(&d.gateway),
                esc(&d.device),
                esc(&tr.tag),
                esc(&tr.unit),
                trend_svg(&tr.points, r.from_day_ms, r.to_day_ms)
            );
        }
    }
    let switch = format!(
        "?from={}&to={}&lang={}",
        r.from,
        r.to,
        if lang == Lang::Zh { "en" } else { "zh" }
    );
    page(
        lang,
        &format!("{} · {}", e.name, t(lang, "title")),
        &switch,
        &b,
    )
}

pub fn city(v: &CityView, c: &Criteria, lang: Lang) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>{}</h1><p class=\"muted\">{}: {} — {}</p>\
         <div class=\"box\"><div class=\"muted\">{}</div><div class=\"big\" id=\"enterprises\">{}</div></div>\
         <div class=\"box\"><div class=\"muted\">{}</div><div class=\"big\" id=\"on-cloud\">{}</div></div>\
         <div class=\"box\"><div class=\"muted\">{} ({} {:.0}%)</div><div class=\"big\" id=\"meets-target\">{}</div></div>",
        t(lang, "city_title"),
        t(lang, "window"),
        v.from,
        v.to,
        t(lang, "enterprises"),
        v.enterprises,
        t(lang, "on_cloud"),
        v.on_cloud,
        t(lang, "meets_target"),
        t(lang, "target"),
        v.target * 100.0,
        v.meets_target
    );
    let labels = ["0–20%", "20–40%", "40–60%", "60–80%", "80–100%", "—"];
    let max = v.distribution.iter().copied().max().unwrap_or(0).max(1);
    let _ = write!(
        b,
        "<h2>{}</h2><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"520\" height=\"170\" font-size=\"11\" role=\"img\">",
        t(lang, "distribution")
    );
    for (i, n) in v.distribution.iter().enumerate() {
        let hgt = 120.0 * *n as f64 / max as f64;
        let x = 20 + i * 82;
        let _ = write!(
            b,
            "<rect x=\"{x}\" y=\"{:.1}\" width=\"60\" height=\"{hgt:.1}\" fill=\"#2563eb\"/><text x=\"{}\" y=\"160\" text-anchor=\"middle\">{}</text><text x=\"{}\" y=\"{:.1}\" text-anchor=\"middle\">{n}</text>",
            140.0 - hgt,
            x + 30,
            labels[i],
            x + 30,
            136.0 - hgt
        );
    }
    b.push_str("</svg>");
    for (title, groups) in [("by_industry", &v.by_industry), ("by_county", &v.by_county)] {
        let _ = write!(
            b,
            "<h2>{}</h2><table><tr><th></th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr>",
            t(lang, title),
            t(lang, "enterprises"),
            t(lang, "on_cloud"),
            t(lang, "meets_target"),
            t(lang, "mean_rate")
        );
        for g in groups.iter() {
            let name = if lang == Lang::En {
                c.industries
                    .iter()
                    .find(|i| i.key == g.key)
                    .map_or(g.name.clone(), |i| i.name_en.clone())
            } else {
                g.name.clone()
            };
            let _ = write!(
                b,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(&name),
                g.enterprises,
                g.on_cloud,
                g.meets_target,
                pct(g.mean_rate)
            );
        }
        b.push_str("</table>");
    }
    let _ = write!(
        b,
        "<h2>{}</h2><table id=\"rows\"><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th></th></tr>",
        t(lang, "enterprise"),
        t(lang, "enterprise"),
        t(lang, "county"),
        t(lang, "industry"),
        t(lang, "rate"),
        t(lang, "on_cloud"),
    );
    for r in &v.rows {
        let _ = write!(
            b,
            "<tr><td>{}<br><span class=\"muted\">{}</span></td><td>{}</td><td>{}</td><td class=\"num\">{} ({}/{})</td><td>{}</td><td><a href=\"/report/{}?from={}&amp;to={}&amp;lang={}\">{}</a></td></tr>",
            esc(&r.name),
            esc(&r.code),
            esc(&r.county),
            esc(&r.industry),
            pct(r.networking_rate),
            r.data_through,
            r.registered_production,
            if r.on_cloud { "✔" } else { "—" },
            esc(&r.code),
            v.from,
            v.to,
            if lang == Lang::Zh { "zh" } else { "en" },
            t(lang, "open_report")
        );
    }
    b.push_str("</table>");
    let switch = format!(
        "?from={}&to={}&lang={}",
        v.from,
        v.to,
        if lang == Lang::Zh { "en" } else { "zh" }
    );
    page(lang, t(lang, "city_title"), &switch, &b)
}

/// CSV for Excel: UTF-8 with a BOM, every cell through `spreadsheet_safe`.
fn csv_bytes(header: &[&str], rows: Vec<Vec<String>>) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(vec![0xEF, 0xBB, 0xBF]);
    let _ = w.write_record(header);
    for r in rows {
        let _ = w.write_record(r.iter().map(|c| spreadsheet_safe(c).into_owned()));
    }
    w.into_inner().unwrap_or_default()
}

/// A cell a spreadsheet shows as text, never runs as a formula (OWASP CSV
/// injection): one starting with `=`, `+`, `-`, `@`, tab or CR gets a `'`
/// in front, unless it is a plain number such as `-12` or `+0.5`.
fn spreadsheet_safe(cell: &str) -> std::borrow::Cow<'_, str> {
    let risky = cell.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if risky && cell.parse::<f64>().map_or(true, |v| !v.is_finite()) {
        format!("'{cell}").into()
    } else {
        cell.into()
    }
}

pub fn report_csv(r: &EnterpriseReport, part: &str, lang: Lang) -> Result<Vec<u8>, String> {
    let h = |k: &str| t(lang, k);
    Ok(match part {
        "devices" => csv_bytes(
            &[
                h("gateway"),
                h("device"),
                h("eq_id"),
                h("eq_name"),
                h("completeness"),
                "received",
                "expected",
                "good",
                "uncertain",
                "bad",
                "backfilled",
                h("flags"),
                h("verdict"),
                h("reason"),
            ],
            r.devices
                .iter()
                .map(|d| {
                    vec![
                        d.gateway.clone(),
                        d.device.clone(),
                        d.equipment.as_ref().map_or(String::new(), |e| e.id.clone()),
                        d.equipment
                            .as_ref()
                            .map_or(String::new(), |e| e.name.clone()),
                        d.completeness
                            .map_or(String::new(), |x| format!("{:.4}", x)),
                        d.received.to_string(),
                        d.expected.to_string(),
                        d.good.to_string(),
                        d.uncertain.to_string(),
                        d.bad.to_string(),
                        d.backfilled.to_string(),
                        d.flags
                            .iter()
                            .map(|f| format!("{}:{}", flag_name(f.kind), f.tag))
                            .collect::<Vec<_>>()
                            .join(" "),
                        h(if d.verdict.data_through { "yes" } else { "no" }).to_string(),
                        d.verdict.reasons.join("; "),
                    ]
                })
                .collect(),
        ),
        "equipment" => csv_bytes(
            &[
                h("eq_id"),
                h("eq_name"),
                h("workshop"),
                h("collected_by"),
                h("verdict"),
                h("reason"),
            ],
            r.networking
                .equipment
                .iter()
                .map(|s| {
                    vec![
                        s.equipment.id.clone(),
                        s.equipment.name.clone(),
                        s.equipment.workshop.clone(),
                        if s.equipment.gateway.is_empty() {
                            String::new()
                        } else {
                            format!("{}/{}", s.equipment.gateway, s.equipment.device)
                        },
                        h(if s.data_through { "yes" } else { "no" }).to_string(),
                        s.reason.clone(),
                    ]
                })
                .collect(),
        ),
        "gaps" => csv_bytes(
            &[
                h("gateway"),
                h("device"),
                h("start"),
                h("end"),
                "duration_s",
                h("cause"),
                h("tags"),
            ],
            r.devices
                .iter()
                .flat_map(|d| {
                    d.gaps.iter().map(move |g| {
                        vec![
                            d.gateway.clone(),
                            d.device.clone(),
                            local(g.start_ms),
                            local(g.end_ms),
                            format!("{:.1}", g.duration_ms as f64 / 1000.0),
                            cause(lang, g.cause).to_string(),
                            g.tags.to_string(),
                        ]
                    })
                })
                .collect(),
        ),
        "usage" => csv_bytes(
            &[
                h("date"),
                h("active"),
                h("points"),
                h("bytes"),
                h("active_devices"),
                h("active_tags"),
            ],
            r.usage
                .iter()
                .map(|u| {
                    vec![
                        u.date.clone(),
                        (u.active as u8).to_string(),
                        u.points.to_string(),
                        u.bytes.to_string(),
                        u.active_devices.to_string(),
                        u.active_tags.to_string(),
                    ]
                })
                .collect(),
        ),
        other => {
            return Err(format!(
                "part `{other}`: expected devices, equipment, gaps or usage"
            ));
        }
    })
}

pub fn city_csv(v: &CityView, lang: Lang) -> Vec<u8> {
    let h = |k: &str| t(lang, k);
    csv_bytes(
        &[
            h("code"),
            h("enterprise"),
            h("county"),
            h("industry"),
            h("provider"),
            h("registered"),
            h("through"),
            h("rate"),
            h("on_cloud"),
            h("meets_target"),
        ],
        v.rows
            .iter()
            .map(|r| {
                vec![
                    r.code.clone(),
                    r.name.clone(),
                    r.county.clone(),
                    r.industry.clone(),
                    r.provider.clone(),
                    r.registered_production.to_string(),
                    r.data_through.to_string(),
                    r.networking_rate
                        .map_or(String::new(), |x| format!("{:.4}", x)),
                    (r.on_cloud as u8).to_string(),
                    (r.meets_target as u8).to_string(),
                ]
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_text_key_used_exists_in_both_languages() {
        for key in ["title", "cause_no_data", "flag_frozen", "switch", "logout"] {
            assert_ne!(t(Lang::Zh, key), "?");
            assert_ne!(t(Lang::En, key), "?");
        }
        assert_eq!(esc("<a href='x'>&"), "&lt;a href=&#39;x&#39;&gt;&amp;");
    }

    #[test]
    fn csv_cells_that_spreadsheets_would_run_as_formulas_are_neutralised() {
        let cells = [
            ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
            ("+1+cmd", "'+1+cmd"),
            ("-2+3", "'-2+3"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("\rx", "'\rx"),
            ("-12", "-12"),
            ("+0.5", "+0.5"),
            ("-inf", "'-inf"),
            ("反应釜", "反应釜"),
        ];
        let b = csv_bytes(
            &["a"],
            vec![cells.iter().map(|(c, _)| c.to_string()).collect()],
        );
        let mut r = csv::ReaderBuilder::new()
            .flexible(true)
            .from_reader(&b[3..]);
        let row = r.records().next().expect("a row").expect("csv");
        let got: Vec<&str> = row.iter().collect();
        let want: Vec<&str> = cells.iter().map(|(_, w)| *w).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn csv_starts_with_a_bom_for_excel() {
        let b = csv_bytes(&["名称"], vec![vec!["反应釜".into()]]);
        assert_eq!(&b[..3], &[0xEF, 0xBB, 0xBF]);
        assert_eq!(
            std::str::from_utf8(&b[3..]).expect("utf-8"),
            "名称\n反应釜\n"
        );
    }
}
