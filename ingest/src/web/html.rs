//! Report pages (Chinese by default, English with `lang=en`) and CSV exports
//! (UTF-8 with BOM, so Excel shows Chinese correctly).
//!
//! Pages are rendered on the server with inline SVG charts and no scripts:
//! they print to PDF from the browser as they are shown, and need nothing
//! from the network. Every text from the registry or devices is escaped.

use std::fmt::Write as _;

use crate::acceptance::{
    self, CityView, Criteria, EnterpriseReport, Flag, Gap, Reason, Trend, flag_name,
};
use crate::http::rfc3339;
use crate::store::rollup::{DAY_MS, DAY_OFFSET_MS};

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
    ("unit_h", "小时", " h "),
    ("unit_min", "分", " min "),
    ("unit_s", "秒", " s"),
    (
        "flag_on",
        "{flag}（点位 {tag}）：{detail}",
        "{flag} on {tag}: {detail}",
    ),
    (
        "flag_detail_frozen",
        "数值 {0} 秒未变化",
        "value unchanged for {0} s",
    ),
    (
        "flag_detail_identical_series",
        "与 {0} 数据相同（相似度 {1}）",
        "same values as {0} (similarity {1})",
    ),
    (
        "flag_detail_out_of_range",
        "{0} 个样本超出声明量程",
        "{0} samples outside the declared range",
    ),
    (
        "flag_detail_no_jitter",
        "{1} 个时间间隔中有 {0} 个恰为采集周期的整数倍",
        "{0} of {1} timestamp steps are exact multiples of the interval",
    ),
    (
        "flag_detail_future_timestamps",
        "{0} 个样本的时间戳晚于接收时间 5 秒以上",
        "{0} samples stamped more than 5 s after their receipt",
    ),
    ("reason_data_through", "数据贯通", "data-through"),
    (
        "reason_no_gateway",
        "未联网：台账未填写采集网关/设备",
        "not networked: the register names no gateway device",
    ),
    (
        "reason_gateway_not_owned",
        "台账填写的网关 {g} 未分配给本企业（未知网关或属于其他企业）",
        "the register's gateway {g} is not assigned to this enterprise (unknown, or another enterprise's)",
    ),
    (
        "reason_never_connected",
        "从未接入：该设备没有任何数据",
        "never connected: no data from this device",
    ),
    (
        "reason_no_data_expected",
        "判定期内没有应收数据",
        "no data expected in the verdict period",
    ),
    (
        "reason_low_completeness",
        "{date} 完整率 {got}，低于 {min}",
        "{date}: completeness {got}, below {min}",
    ),
    ("legend_95", "≥95%", "≥95%"),
    ("legend_80", "80–95%", "80–95%"),
    ("legend_50", "50–80%", "50–80%"),
    ("legend_low", "<50%", "<50%"),
    ("legend_none", "无应收数据", "nothing expected"),
    ("legend_week", "竖线：每周一", "lines: each Monday"),
    ("no_values", "无数值", "no values"),
    (
        "rate_fraction",
        "{a} / {b} 台生产设备数据贯通",
        "{a} of {b} production machines data-through",
    ),
    ("verdict_meets", "达标", "meets the target"),
    ("verdict_below", "未达标", "below the target"),
    ("target_is", "联网率目标 {t}", "networking-rate target {t}"),
    ("production", "生产设备", "Production"),
    ("production_yes", "是", "yes"),
    ("production_no", "否（不计入联网率）", "no (not counted)"),
    (
        "evidence_footer",
        "证据包：本报告的数据由各网关签名的哈希链担保。导出并离线校验证据包：{cmd}。证据包指纹即下列链头哈希，校验结果中的链头应与之一致：",
        "Evidence bundle: the data of this report is vouched for by each gateway's signed hash chain. Export the bundle and verify it offline: {cmd}. Its fingerprint is the chain heads below; the verified bundle must end at the same heads:",
    ),
    ("received_n", "实收", "Received"),
    ("expected_n", "应收", "Expected"),
    ("good", "好", "Good"),
    ("uncertain", "不确定", "Uncertain"),
    ("bad", "坏", "Bad"),
    ("backfilled", "补传", "Backfilled"),
    ("duration_s", "时长（秒）", "Duration (s)"),
];

/// A text of the catalogue; a missing key shows as `[key]` in the page
/// and fails `every_key_the_pages_use_is_in_the_catalogue`.
fn t(lang: Lang, key: &str) -> &'static str {
    TEXT.iter()
        .find(|(k, _, _)| *k == key)
        .map_or(
            "[missing text]",
            |(_, zh, en)| if lang == Lang::Zh { zh } else { en },
        )
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

fn duration(lang: Lang, ms: i64) -> String {
    let s = ms / 1000;
    let (h, m, sec) = (t(lang, "unit_h"), t(lang, "unit_min"), t(lang, "unit_s"));
    if s >= 3600 {
        format!("{}{h}{:02}{m}", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}{m}{:02}{sec}", s / 60, s % 60)
    } else {
        format!("{}.{:01}{sec}", s, ms % 1000 / 100)
    }
}

fn cause(lang: Lang, c: &str) -> &'static str {
    t(lang, &format!("cause_{c}"))
}

/// Text that comes from the registry, devices or codes: escaped, and marked
/// `translate="no"` (it stays as entered in either language).
fn name(s: &str) -> String {
    format!("<span translate=\"no\">{}</span>", esc(s))
}

/// A catalogue text with `{key}` placeholders replaced by ready HTML.
fn fill(template: &str, args: &[(&str, String)]) -> String {
    fill_as(true, template, args)
}

/// `fill` for HTML (`html`: the template is escaped) or plain text (CSV).
fn fill_as(html: bool, template: &str, args: &[(&str, String)]) -> String {
    let mut out = if html {
        esc(template)
    } else {
        template.to_string()
    };
    for (k, v) in args {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

/// `name` for HTML, the text itself for CSV.
fn name_as(html: bool, s: &str) -> String {
    if html { name(s) } else { s.to_string() }
}

/// An industry key as words in the page's language.
fn industry(lang: Lang, c: &Criteria, key: &str) -> String {
    c.industries.iter().find(|i| i.key == key).map_or_else(
        || name(key),
        |i| {
            esc(if lang == Lang::Zh {
                &i.name_zh
            } else {
                &i.name_en
            })
        },
    )
}

fn flag_text(lang: Lang, f: &Flag, html: bool) -> String {
    let kind = flag_name(f.kind);
    let figures: Vec<(String, String)> = f
        .figures
        .iter()
        .enumerate()
        .map(|(i, v)| (i.to_string(), name_as(html, v)))
        .collect();
    let args: Vec<(&str, String)> = figures
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    fill_as(
        html,
        t(lang, "flag_on"),
        &[
            ("flag", fill_as(html, t(lang, &format!("flag_{kind}")), &[])),
            ("tag", name_as(html, &f.tag)),
            (
                "detail",
                fill_as(html, t(lang, &format!("flag_detail_{kind}")), &args),
            ),
        ],
    )
}

/// Reasons of a verdict in the page's language (HTML, or plain for CSV).
fn reasons_text(lang: Lang, why: &[Reason], flags: &[Flag], html: bool) -> String {
    let plain = |key: &str| fill_as(html, t(lang, key), &[]);
    let words: Vec<String> = why
        .iter()
        .map(|r| match r {
            Reason::DataThrough => plain("reason_data_through"),
            Reason::NoGatewayNamed => plain("reason_no_gateway"),
            Reason::GatewayNotOwned(g) => fill_as(
                html,
                t(lang, "reason_gateway_not_owned"),
                &[("g", name_as(html, g))],
            ),
            Reason::NeverConnected => plain("reason_never_connected"),
            Reason::NoDataExpected => plain("reason_no_data_expected"),
            Reason::LowCompleteness {
                date,
                completeness,
                min,
            } => fill_as(
                html,
                t(lang, "reason_low_completeness"),
                &[
                    ("date", date.clone()),
                    ("got", pct(Some(*completeness))),
                    ("min", pct(Some(*min))),
                ],
            ),
            Reason::CriticalFlag(i) => flags
                .get(*i)
                .map_or_else(String::new, |f| flag_text(lang, f, html)),
        })
        .collect();
    words.join(if lang == Lang::Zh { "；" } else { "; " })
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

const STYLE: &str = "body{font-family:system-ui,'PingFang SC','Noto Sans CJK SC','WenQuanYi Micro Hei','Microsoft YaHei',sans-serif;margin:24px;color:#111;max-width:1100px}\
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:24px 0 8px;border-bottom:1px solid #ccc;padding-bottom:4px;break-after:avoid}\
table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}\
th{background:#f3f4f6}tr{break-inside:avoid}.ok{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}.muted{color:#666;font-size:12px}\
.big{font-size:30px;font-weight:700}.box{display:inline-block;border:1px solid #ccc;border-radius:6px;padding:10px 16px;margin:4px 8px 4px 0;vertical-align:top}\
.num{text-align:right;font-variant-numeric:tabular-nums}.cover{border:2px solid #111;padding:12px 16px;margin:8px 0 12px}\
.cover table{margin:0}.cover th{width:9em}.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;vertical-align:middle}\
.trends{display:flex;flex-wrap:wrap;gap:8px}figure.trend{margin:0;border:1px solid #e5e7eb;padding:4px;break-inside:avoid}\
figure.trend figcaption{font-size:12px}footer{margin-top:28px;border-top:1px solid #ccc;padding-top:8px;font-size:12px;word-break:break-all}\
@page{size:A4;margin:12mm}\
@media print{.nav{display:none !important}body{margin:0;max-width:none}#heatmap{max-width:100%;height:auto}figure.trend,svg,.cover{break-inside:avoid}}";

fn page(lang: Lang, title: &str, switch_href: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"{}\"><head><meta charset=\"utf-8\"><link rel=\"icon\" href=\"data:,\">\
         <title>{}</title><style>{STYLE}</style></head><body>\
         <p class=\"muted nav\"><a class=\"nav\" href=\"{}\" lang=\"{}\" translate=\"no\">{}</a> · {} \
         <form class=\"nav\" method=\"post\" action=\"/logout\" style=\"display:inline\"><button>{}</button></form></p>\
         {body}</body></html>",
        if lang == Lang::Zh { "zh-CN" } else { "en" },
        esc(title),
        esc(switch_href),
        if lang == Lang::Zh { "en" } else { "zh-CN" },
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

/// Width in px of `s` at `size` px, as a CJK sans font draws it (CJK
/// characters square, others about 0.6 em): sizes the heatmap's label column.
fn text_width(s: &str, size: usize) -> usize {
    s.chars()
        .map(|c| {
            if c.len_utf8() >= 3 {
                size
            } else {
                size * 6 / 10 + 1
            }
        })
        .sum()
}

/// Whether the UTC+8 day starting at `day_ms` is a Monday.
fn monday(day_ms: i64) -> bool {
    ((day_ms + DAY_OFFSET_MS).div_euclid(DAY_MS) + 3) % 7 == 0
}

/// Completeness per device and day. Day labels stand above the cells, never
/// over them: every day when a cell is wide enough for `MM-DD`, otherwise
/// each week's Monday, with a line marking the week's start.
fn heatmap(r: &EnterpriseReport, lang: Lang) -> String {
    let days = r.devices.first().map_or(0, |d| d.daily.len());
    if days == 0 {
        return format!("<p>{}</p>", t(lang, "none"));
    }
    let labels: Vec<String> = r
        .devices
        .iter()
        .map(|d| {
            d.equipment
                .as_ref()
                .map_or(d.device.clone(), |e| format!("{} {}", e.id, e.name))
        })
        .collect();
    let font = 12;
    let left = labels
        .iter()
        .map(|l| text_width(l, font))
        .max()
        .unwrap_or(0)
        + 14;
    let cw = (900 / days).clamp(8, 52);
    let ch = 20;
    let top = 30;
    let w = left + days * cw + 10;
    let h = top + r.devices.len() * ch + 6;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"heatmap\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-size=\"{font}\" role=\"img\">"
    );
    let daily = &r.devices[0].daily;
    // No day label closer than this to the next one.
    let min_gap = text_width("00-00", font) + 8;
    let every_day = cw >= min_gap;
    let mut last_label_x: Option<usize> = None;
    for (i, cell) in daily.iter().enumerate() {
        let x = left + i * cw;
        let week = monday(cell.day_ms);
        if !every_day && week {
            let _ = write!(
                s,
                "<line class=\"hm-week\" x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#374151\"/>",
                x.saturating_sub(1),
                top - 14,
                x.saturating_sub(1),
                h - 4
            );
        }
        let next_monday = (i + 1..days).find(|&j| monday(daily[j].day_ms));
        let first_fits = next_monday.is_none_or(|j| (j - i) * cw >= min_gap);
        let show = every_day || week || (i == 0 && first_fits);
        if show && last_label_x.is_none_or(|lx| x >= lx + min_gap) {
            let (anchor, lx) = if every_day {
                ("middle", x + cw / 2)
            } else {
                ("start", x + 1)
            };
            let _ = write!(
                s,
                "<text class=\"hm-day\" x=\"{lx}\" y=\"{}\" text-anchor=\"{anchor}\">{}</text>",
                top - 6,
                cell.date.get(5..).unwrap_or(&cell.date)
            );
            last_label_x = Some(x);
        }
    }
    for (j, d) in r.devices.iter().enumerate() {
        let y = top + j * ch;
        let _ = write!(
            s,
            "<text class=\"hm-dev\" translate=\"no\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            left - 8,
            y + 14,
            esc(&labels[j])
        );
        for (i, cell) in d.daily.iter().enumerate() {
            let _ = write!(
                s,
                "<rect class=\"hm-cell\" x=\"{}\" y=\"{y}\" width=\"{}\" height=\"{}\" fill=\"{}\"><title>{} {} {}</title></rect>",
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
    s.push_str("</svg><p class=\"legend muted\">");
    for (c, k) in [
        (Some(1.0), "legend_95"),
        (Some(0.9), "legend_80"),
        (Some(0.6), "legend_50"),
        (Some(0.0), "legend_low"),
        (None, "legend_none"),
    ] {
        let _ = write!(
            s,
            "<span style=\"background:{}\"></span>{}",
            colour(c),
            t(lang, k)
        );
    }
    if !every_day {
        let _ = write!(s, " · {}", t(lang, "legend_week"));
    }
    s.push_str("</p>");
    s
}

/// Day ticks of a time axis `width` px wide: every day, week, fortnight…
/// so that labels are at least 48 px apart.
fn day_ticks(from: i64, to: i64, width: f64) -> Vec<i64> {
    let days = ((to - from) / DAY_MS).max(1);
    let step = [1, 2, 7, 14, 28, 56, 112]
        .into_iter()
        .find(|s| width / days as f64 * *s as f64 >= 48.0)
        .unwrap_or(112);
    let mut ticks = Vec::new();
    let mut d = from;
    if step >= 7 {
        while !monday(d) && d < to {
            d += DAY_MS;
        }
    }
    while d < to {
        ticks.push(d);
        d += step * DAY_MS;
    }
    ticks
}

/// One small multiple: hourly mean (line and dots), min–max band, the value
/// range with its unit on the left and dates on the time axis.
fn trend_svg(lang: Lang, tr: &Trend, from: i64, to: i64) -> String {
    let unit = if tr.unit.is_empty() {
        String::new()
    } else {
        format!(" {}", tr.unit)
    };
    let lo = tr.points.iter().map(|p| p.2).fold(f64::INFINITY, f64::min);
    let hi = tr
        .points
        .iter()
        .map(|p| p.3)
        .fold(f64::NEG_INFINITY, f64::max);
    let (lo_label, hi_label) = (
        format!("{}{unit}", fmt_num(lo)),
        format!("{}{unit}", fmt_num(hi)),
    );
    // The value labels stand left of the plot, as wide as they need.
    let label_w = text_width(&lo_label, 10).max(text_width(&hi_label, 10));
    let (w, h, right, top, bottom) = (330.0, 150.0, 8.0, 8.0, 22.0);
    let left = (label_w as f64 + 8.0).max(40.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let x = |t: i64| left + (t - from) as f64 / (to - from).max(1) as f64 * plot_w;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-size=\"10\" role=\"img\">\
         <rect x=\"{left}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#ccc\"/>"
    );
    for d in day_ticks(from, to, plot_w) {
        let _ = write!(
            s,
            "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#eee\"/>\
             <text class=\"axis-t\" x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\">{3}</text>",
            x(d),
            top + plot_h + 3.0,
            h - 8.0,
            acceptance::date_of(d).get(5..).unwrap_or_default()
        );
    }
    if tr.points.is_empty() {
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#666\">{}</text></svg>",
            left + plot_w / 2.0,
            top + plot_h / 2.0,
            t(lang, "no_values")
        );
        return s;
    }
    let span = if hi > lo { hi - lo } else { 1.0 };
    let y = |v: f64| top + 4.0 + (hi - v) / span * (plot_h - 8.0);
    let mut band = String::new();
    for p in &tr.points {
        let _ = write!(
            band,
            "M{:.1},{:.1}L{:.1},{:.1}",
            x(p.0),
            y(p.3),
            x(p.0),
            y(p.2)
        );
    }
    let line: Vec<String> = tr
        .points
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1)))
        .collect();
    let _ = write!(
        s,
        "<path d=\"{band}\" stroke=\"#93c5fd\" stroke-width=\"3\"/>\
         <polyline class=\"mean\" points=\"{}\" fill=\"none\" stroke=\"#1d4ed8\" stroke-width=\"1.5\"/>",
        line.join(" ")
    );
    if tr.points.len() <= 48 {
        for p in &tr.points {
            let _ = write!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"#1d4ed8\"/>",
                x(p.0),
                y(p.1)
            );
        }
    }
    let _ = write!(
        s,
        "<text class=\"axis-v\" translate=\"no\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
         <text class=\"axis-v\" translate=\"no\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text></svg>",
        left - 4.0,
        top + 10.0,
        esc(&hi_label),
        left - 4.0,
        top + plot_h,
        esc(&lo_label)
    );
    s
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
            name(device),
            local(g.start_ms),
            local(g.end_ms),
            duration(lang, g.duration_ms),
            cause(lang, g.cause),
            g.tags
        );
    }
}

/// The report a reviewer files: cover, register, heatmap, devices, gaps,
/// gateways and chains, usage, trends, and the evidence footer.
pub fn report(r: &EnterpriseReport, lang: Lang) -> String {
    let e = &r.enterprise;
    let n = &r.networking;
    let c = &r.criteria;
    let mut b = String::new();
    let meets = n.rate.is_some_and(|x| x >= c.networking_target);
    let _ = write!(
        b,
        "<h1>{}</h1><div class=\"cover\" id=\"cover\"><table>\
         <tr><th>{}</th><td>{}</td><th>{}</th><td>{}</td></tr>\
         <tr><th>{}</th><td>{}</td><th>{}</th><td>{}</td></tr>\
         <tr><th>{}</th><td>{}</td><th>{}</th><td>{}</td></tr>\
         <tr><th>{}</th><td>{} — {}</td><th>{}</th><td>{}</td></tr></table>\
         <div class=\"box\"><div class=\"muted\">{}</div><div class=\"big\" id=\"networking-rate\">{}</div>\
         <div class=\"muted\" id=\"rate-fraction\">{}</div></div>\
         <div class=\"box\"><div class=\"muted\">{}</div><div class=\"big {}\" id=\"verdict\">{}</div>\
         <div class=\"muted\">{}</div></div></div>",
        t(lang, "title"),
        t(lang, "enterprise"),
        name(&e.name),
        t(lang, "code"),
        name(&e.code),
        t(lang, "county"),
        name(&e.county),
        t(lang, "industry"),
        industry(lang, c, &e.industry),
        t(lang, "provider"),
        name(&e.provider),
        t(lang, "generated"),
        local(r.generated_at_ms),
        t(lang, "window"),
        r.from,
        r.to,
        t(lang, "criteria"),
        fill(
            t(lang, "criteria_text"),
            &[
                ("c", format!("{:.0}", c.completeness_min * 100.0)),
                ("d", c.verdict_days.to_string()),
            ],
        ),
        t(lang, "rate"),
        pct(n.rate),
        fill(
            t(lang, "rate_fraction"),
            &[
                ("a", n.data_through.to_string()),
                ("b", n.registered_production.to_string()),
            ],
        ),
        t(lang, "verdict"),
        if meets { "ok" } else { "bad" },
        t(
            lang,
            if meets {
                "verdict_meets"
            } else {
                "verdict_below"
            }
        ),
        fill(
            t(lang, "target_is"),
            &[("t", format!("{:.0}%", c.networking_target * 100.0))],
        ),
    );
    let _ = write!(
        b,
        "<h2>{}</h2><table id=\"register\"><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr>",
        t(lang, "register"),
        t(lang, "eq_id"),
        t(lang, "eq_name"),
        t(lang, "workshop"),
        t(lang, "production"),
        t(lang, "collected_by"),
        t(lang, "verdict"),
        t(lang, "reason")
    );
    for s in &n.equipment {
        let q = &s.equipment;
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            name(&q.id),
            name(&q.name),
            name(&q.workshop),
            t(
                lang,
                if q.production {
                    "production_yes"
                } else {
                    "production_no"
                }
            ),
            if q.gateway.is_empty() {
                "—".to_string()
            } else {
                name(&format!("{}/{}", q.gateway, q.device))
            },
            if s.data_through { "ok" } else { "bad" },
            t(lang, if s.data_through { "yes" } else { "no" }),
            reasons_text(lang, &s.why, &s.flags, true)
        );
    }
    b.push_str("</table>");
    if !n.unregistered_devices.is_empty() {
        let _ = write!(
            b,
            "<p>{}: {}</p>",
            t(lang, "unregistered"),
            name(&n.unregistered_devices.join(", "))
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
                    "{}{}",
                    if f.critical {
                        format!("[{}] ", t(lang, "critical"))
                    } else {
                        String::new()
                    },
                    flag_text(lang, f, true)
                )
            })
            .collect();
        let samples = d.good + d.uncertain + d.bad;
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{} / {}</td><td class=\"num\">{} / {} / {}</td>\
             <td class=\"num\">{}</td><td>{}<br>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
            name(&format!("{}/{}", d.gateway, d.device)),
            name(&ident.join("; ")),
            pct(d.completeness),
            d.received,
            d.expected,
            d.good,
            d.uncertain,
            d.bad,
            pct((samples > 0).then(|| d.backfilled as f64 / samples as f64)),
            d.first_seen_ms.map_or("—".into(), local),
            d.last_seen_ms.map_or("—".into(), local),
            flags.join(if lang == Lang::Zh { "；" } else { "; " }),
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
    let mut heads = Vec::new();
    for g in &r.gateways {
        let chains: Vec<String> = g
            .chains
            .iter()
            .map(|c| {
                heads.push(format!("{} {}", g.gateway, c.head_hash));
                let mut s = fill(
                    t(lang, "chain_ok"),
                    &[
                        ("a", c.verified_from.to_string()),
                        ("b", c.verified_through.to_string()),
                        ("h", name(c.head_hash.get(..16).unwrap_or(&c.head_hash))),
                    ],
                );
                if !c.breaks.is_empty() {
                    let _ = write!(s, "; {} {}", c.breaks.len(), t(lang, "chain_breaks"));
                }
                s
            })
            .collect();
        let _ = write!(
            b,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{} / {} ms</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            name(&g.gateway),
            g.points,
            g.latency_p50_ms.map_or("—".into(), |v| format!("≤{v}")),
            g.latency_p95_ms.map_or("—".into(), |v| format!("≤{v}")),
            g.clock_offset_ms
                .map_or("—".into(), |v| format!("{v:+} ms")),
            pct(Some(g.backfill_share)),
            if chains.is_empty() {
                t(lang, "none").to_string()
            } else {
                chains.join("<br>")
            }
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
    let _ = write!(
        b,
        "<h2>{}</h2><div class=\"trends\" id=\"trends\">",
        t(lang, "trends")
    );
    for d in &r.devices {
        for tr in &d.trend {
            let unit = if tr.unit.is_empty() {
                String::new()
            } else {
                format!(" ({})", tr.unit)
            };
            let _ = write!(
                b,
                "<figure class=\"trend\" data-tag=\"{}/{}/{}\"><figcaption>{}</figcaption>{}</figure>",
                esc(&d.gateway),
                esc(&d.device),
                esc(&tr.tag),
                name(&format!("{}/{} · {}{unit}", d.gateway, d.device, tr.tag)),
                trend_svg(lang, tr, r.from_day_ms, r.to_day_ms)
            );
        }
    }
    b.push_str("</div>");
    let _ = write!(
        b,
        "<footer id=\"evidence\"><p>{}</p><p>{}</p></footer>",
        fill(
            t(lang, "evidence_footer"),
            &[(
                "cmd",
                name(&format!(
                    "guantong-ingest export-evidence --enterprise {} --from {} --to {} --out bundle.json; guantong-ingest verify bundle.json",
                    e.code,
                    rfc3339(r.from_day_ms),
                    rfc3339(r.to_day_ms)
                )),
            ),]
        ),
        if heads.is_empty() {
            t(lang, "none").to_string()
        } else {
            name(&heads.join(" · "))
        }
    );
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
            let label = if title == "by_industry" {
                industry(lang, c, &g.key)
            } else {
                name(&g.name)
            };
            let _ = write!(
                b,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                label,
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
            name(&r.name),
            name(&r.code),
            name(&r.county),
            industry(lang, c, &r.industry),
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
                h("received_n"),
                h("expected_n"),
                h("good"),
                h("uncertain"),
                h("bad"),
                h("backfilled"),
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
                        reasons_text(lang, &d.verdict.why, &d.flags, false),
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
                        reasons_text(lang, &s.why, &s.flags, false),
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
                h("duration_s"),
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
    use crate::acceptance::FlagKind;

    /// Every `t(lang, "…")` and `h("…")` of this file, and every key built
    /// from a cause or flag name, is in the catalogue in both languages.
    #[test]
    fn every_key_the_pages_use_is_in_the_catalogue() {
        let all = include_str!("html.rs");
        let source = &all[..all.find("#[cfg(test)]").unwrap_or(all.len())];
        let mut keys: Vec<String> = Vec::new();
        for pattern in [
            "t(lang, \"",
            "h(\"",
            "t(lang, if s.data_through { \"",
            "lang, if meets { \"",
        ] {
            for (i, _) in source.match_indices(pattern) {
                let before = source[..i].chars().next_back().unwrap_or(' ');
                if before.is_alphanumeric() || before == '_' {
                    continue;
                }
                let rest = &source[i + pattern.len()..];
                if let Some(end) = rest.find('"') {
                    keys.push(rest[..end].to_string());
                }
            }
        }
        for cause in [
            "device_fault",
            "dropped_by_gateway",
            "storage_error",
            "storage_corrupted",
            "no_data",
            "gateway_offline_backfilled",
        ] {
            keys.push(format!("cause_{cause}"));
        }
        for kind in [
            FlagKind::Frozen,
            FlagKind::IdenticalSeries,
            FlagKind::OutOfRange,
            FlagKind::NoJitter,
            FlagKind::FutureTimestamps,
        ] {
            keys.push(format!("flag_{}", flag_name(kind)));
            keys.push(format!("flag_detail_{}", flag_name(kind)));
        }
        assert!(keys.len() > 80, "the scan found only {} keys", keys.len());
        let missing: Vec<&String> = keys
            .iter()
            .filter(|k| {
                !TEXT
                    .iter()
                    .any(|(key, zh, en)| key == k && !zh.is_empty() && !en.is_empty())
            })
            .collect();
        assert!(
            missing.is_empty(),
            "keys missing from the catalogue: {missing:?}"
        );
        let mut seen = std::collections::BTreeSet::new();
        for (k, _, _) in TEXT {
            assert!(seen.insert(k), "key {k} twice in the catalogue");
        }
        assert_eq!(esc("<a href='x'>&"), "&lt;a href=&#39;x&#39;&gt;&amp;");
    }

    /// Heatmap day labels: every day at 7 days, Mondays at 30 and 90, never
    /// two closer than a label's width.
    #[test]
    fn day_ticks_and_mondays() {
        // 2026-11-30 is a Monday (UTC+8).
        let monday_ms = crate::acceptance::parse_date("2026-11-30").expect("date");
        assert!(monday(monday_ms));
        assert!(!monday(monday_ms + DAY_MS));
        let ticks = day_ticks(monday_ms, monday_ms + 90 * DAY_MS, 266.0);
        assert!(ticks.iter().all(|&d| monday(d)));
        assert!(ticks.len() <= 6, "{}", ticks.len());
        assert_eq!(day_ticks(monday_ms, monday_ms + 3 * DAY_MS, 266.0).len(), 3);
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
