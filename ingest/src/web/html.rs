//! Report pages (Chinese by default, English with `lang=en`) and CSV exports
//! (UTF-8 with BOM, so Excel shows Chinese correctly).
//!
//! Pages are rendered on the server with inline SVG charts and no scripts:
//! they print to PDF from the browser as they are shown, and need nothing
//! from the network. They are maud templates (`html!`): checked when
//! compiled, and every spliced value escaped unless wrapped in `raw`, which
//! only takes HTML made here from escaped parts (`name`, `fill`, the
//! reasons). maud rather than askama: templates stay beside the code that
//! computes their values (one file, no template directory to ship), and the
//! gateway's status page already uses it.
//!
//! Every visible text comes from `TEXT`, one catalogue of (key, zh, en);
//! `every_key_the_pages_use_is_in_the_catalogue` fails on a key the pages
//! use that it lacks.

use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::acceptance::{
    self, CityView, Criteria, EnterpriseReport, Flag, Reason, Trend, flag_name,
};
use crate::http::{Summary, rfc3339};
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
        "证据包：本报告的数据由各网关签名的哈希链担保。导出并离线校验证据包：{cmd}。校验结果中的链头应与下列链头一致：",
        "Evidence bundle: the data of this report is vouched for by each gateway's signed hash chain. Export the bundle and verify it offline: {cmd}. The verified bundle must end at the chain heads below:",
    ),
    (
        "fingerprint",
        "证据包指纹（不含导出时间；与一企一档中的证据包一致）",
        "Evidence bundle fingerprint (SHA-256, export time excluded; the dossier's bundle has the same)",
    ),
    (
        "fingerprint_in_dossier",
        "证据包指纹印在一企一档中的报告上（导出证据包需读取整个区间的数据，网页不逐次计算）",
        "The evidence bundle's fingerprint is printed on the dossier's copy of this report (exporting the bundle reads the whole window, so the page does not on every view)",
    ),
    (
        "dossier_download",
        "下载一企一档（本统计区间）",
        "Download the dossier (this window)",
    ),
    ("wrong_token", "令牌无效", "Wrong token"),
    (
        "error_400",
        "请求有误，无法显示",
        "The request is not valid",
    ),
    ("error_403", "无权查看", "Not permitted"),
    (
        "error_404",
        "未找到该企业（代码未登记、格式有误，或本账号无权查看）",
        "No such enterprise (the code is not registered, malformed, or not readable by this account)",
    ),
    ("error_500", "服务器内部错误", "Server error"),
    ("error_detail", "详情", "Detail"),
    ("to_city", "返回数据贯通总览", "Back to the city overview"),
    ("bool_true", "是", "true"),
    ("bool_false", "否", "false"),
    ("overview_title", "实时联网状态", "Live connectivity"),
    ("overview_refresh", "每 5 秒刷新", "Refreshes every 5 s"),
    ("no_gateways", "尚未登记网关", "No gateway registered yet"),
    ("fleet_title", "网关运维总览", "Gateway fleet"),
    ("fleet_refresh", "每30秒自动刷新", "Refreshes every 30 s"),
    ("fleet_none", "没有符合条件的网关", "No gateway matches"),
    ("status", "状态", "Status"),
    ("online", "在线", "online"),
    ("offline", "离线", "offline"),
    ("since", "自", "since"),
    (
        "not_seen",
        "本次启动后未连接",
        "not seen since ingest started",
    ),
    ("last_batch", "最近数据", "Last batch"),
    ("backlog", "积压", "Backlog"),
    ("batches", "批", "batches"),
    ("oldest", "最早", "oldest"),
    ("buffer_fill", "缓存占用", "buffer"),
    ("dropped", "已丢弃点数", "dropped points"),
    ("dev_up", "在线", "up"),
    ("dev_down", "离线", "down"),
    ("dev_waiting", "等待首个数据", "waiting"),
    ("version", "版本", "Version"),
    ("manifest", "配置清单", "manifest"),
    ("clock_offset", "时钟偏差", "Clock offset"),
    ("links_verified", "已验证", "verified"),
    ("links_waiting", "待续", "waiting"),
    ("no_health", "尚无网关自报状态", "no health report yet"),
    ("reported", "网关自报于", "reported"),
    ("filter", "筛选", "Filter"),
    ("all", "全部", "all"),
    ("unassigned", "未分配企业", "not assigned"),
    ("sort_by", "排序", "sort"),
    ("fleet_link", "网关运维总览", "Gateway fleet"),
    ("config", "云端配置", "Cloud config"),
    ("config_requested", "下发", "requested"),
    ("config_applied", "运行", "running"),
    ("config_local", "本地配置", "local file"),
    ("config_refused", "被拒绝", "refused"),
    ("connected", "已连接", "connected"),
    ("not_connected", "未连接", "not connected"),
    ("tag", "点位", "Tag"),
    ("address", "地址", "Address"),
    ("last_value", "最新值", "Last value"),
    ("quality_col", "质量", "Quality"),
    ("samples", "样本数", "Samples"),
    ("last_seen", "最近接收", "Last seen"),
    (
        "completeness_window",
        "完整率（最近一小时）",
        "Completeness (last hour)",
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

/// Ready HTML (escaped by the helper that made it) into a template.
fn raw(s: String) -> PreEscaped<String> {
    PreEscaped(s)
}

fn esc(s: &str) -> String {
    html! { (s) }.into_string()
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

fn html_lang(lang: Lang) -> &'static str {
    if lang == Lang::Zh { "zh-CN" } else { "en" }
}

/// Every page: head with the one style sheet, the nav (language switch,
/// print hint, `nav` extras, sign out; hidden in print), then `body`.
fn page(lang: Lang, title: &str, switch_href: &str, nav: Markup, body: Markup) -> String {
    page_with_head(lang, title, switch_href, html! {}, nav, body)
}

fn page_with_head(
    lang: Lang,
    title: &str,
    switch_href: &str,
    head: Markup,
    nav: Markup,
    body: Markup,
) -> String {
    html! {
        (DOCTYPE)
        html lang=(html_lang(lang)) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                link rel="icon" href="data:,";
                title { (title) }
                style { (PreEscaped(STYLE)) }
                (head)
            }
            body {
                // A div: a form may not stand inside a p.
                div.muted.nav {
                    a.nav href=(switch_href) lang=(html_lang(if lang == Lang::Zh { Lang::En } else { Lang::Zh })) translate="no" {
                        (t(lang, "switch"))
                    }
                    " · " (t(lang, "print"))
                    (nav)
                    " "
                    form.nav method="post" action="/logout" style="display:inline" {
                        button { (t(lang, "logout")) }
                    }
                }
                (body)
            }
        }
    }
    .into_string()
}

/// The sign-in form, in both languages at once (the page's language is not
/// known before sign-in).
pub fn login(next: &str) -> String {
    let (zh, en) = (Lang::Zh, Lang::En);
    html! {
        (DOCTYPE)
        html lang="zh-CN" {
            head {
                meta charset="utf-8";
                link rel="icon" href="data:,";
                title { "Guantong" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "Guantong · " (t(zh, "login")) }
                form method="post" action="/login" {
                    label {
                        (t(zh, "token")) " / " span lang="en" { (t(en, "token")) } br;
                        input name="token" type="password" size="40" autocomplete="off";
                    }
                    input type="hidden" name="next" value=(next);
                    " "
                    button { (t(zh, "login")) " / " span lang="en" { (t(en, "login")) } }
                }
            }
        }
    }
    .into_string()
}

pub fn login_failed() -> String {
    html! {
        (DOCTYPE)
        html lang="zh-CN" {
            head { meta charset="utf-8"; link rel="icon" href="data:,"; title { "Guantong" } }
            body {
                p {
                    (t(Lang::Zh, "wrong_token")) " / " span lang="en" { (t(Lang::En, "wrong_token")) } " "
                    a href="/login" { "↩" }
                }
            }
        }
    }
    .into_string()
}

/// The page a browser gets when a page route fails (unknown or malformed
/// code, bad window, no access): what happened in the page's language, the
/// API's own message as detail. API routes keep `{"error": "..."}`.
pub fn error_page(lang: Lang, status: u16, detail: &str) -> String {
    let key = match status {
        400 => "error_400",
        401 | 403 => "error_403",
        404 => "error_404",
        _ => "error_500",
    };
    let body = html! {
        h1 id="error" { (t(lang, key)) }
        p.muted { (t(lang, "error_detail")) ": " span id="error-detail" translate="no" { (detail) } }
        p { a href={ "/city?lang=" (if lang == Lang::Zh { "zh" } else { "en" }) } { (t(lang, "to_city")) } }
    };
    let switch = format!("?lang={}", if lang == Lang::Zh { "en" } else { "zh" });
    page(lang, t(lang, key), &switch, html! {}, body)
}

/// A stored value as people read it: a float32 source's value without its
/// binary noise (`123.456`, not `123.45600128173828`), booleans as words,
/// then the unit.
fn value_text(lang: Lang, data_type: &str, v: &serde_json::Value, unit: &str) -> String {
    let text = match v {
        serde_json::Value::Bool(b) => {
            t(lang, if *b { "bool_true" } else { "bool_false" }).to_string()
        }
        serde_json::Value::Number(n) if data_type == "double" || n.is_f64() => match n.as_f64() {
            Some(x) => fmt_double(x),
            None => n.to_string(),
        },
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if unit.is_empty() {
        text
    } else {
        format!("{text} {unit}")
    }
}

/// The shortest decimal of a double, as an f32 when it is one (most field
/// devices send 32-bit floats), at most 6 decimals otherwise.
fn fmt_double(x: f64) -> String {
    let as_f32 = x as f32;
    if f64::from(as_f32) == x {
        format!("{as_f32}")
    } else if x.fract() == 0.0 || x.abs() >= 1e15 {
        format!("{x}")
    } else {
        let s = format!("{x:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// An RFC 3339 UTC time of the API as UTC+8 "YYYY-MM-DD HH:MM:SS".
fn local_of(rfc: &str) -> String {
    crate::http::parse_time("time", rfc).map_or_else(|_| rfc.to_string(), local)
}

/// The live overview `/`: every visible gateway, device and tag with its
/// last value, quality and completeness; links to the reports of the
/// enterprises the account may read and to the city view. Rendered on the
/// server and reloaded by the browser every 5 s (no script).
/// `fleet`: the account may open the fleet page (admins and providers).
pub fn overview(s: &Summary, enterprises: &[(String, String)], fleet: bool, lang: Lang) -> String {
    let lang_code = if lang == Lang::Zh { "zh" } else { "en" };
    let body = html! {
        h1 { (t(lang, "overview_title")) }
        p.muted {
            (t(lang, "overview_refresh")) " · " (t(lang, "generated")) " " (local_of(&s.generated_at))
            " · " span translate="no" { "JSON: " a href="/api/v1/summary" { "/api/v1/summary" } }
        }
        p id="links" {
            a id="city-link" href={ "/city?lang=" (lang_code) } { (t(lang, "city_title")) }
            @if fleet { " · " a id="fleet-link" href={ "/gateways?lang=" (lang_code) } { (t(lang, "fleet_link")) } }
            @for (code, ename) in enterprises {
                " · "
                a.report-link href={ "/report/" (code) "?lang=" (lang_code) } {
                    span translate="no" { (ename) } " " (t(lang, "open_report"))
                }
            }
        }
        @if s.gateways.is_empty() { p { (t(lang, "no_gateways")) } }
        @for g in &s.gateways {
            @let connected = g.connection.as_ref().is_some_and(|c| c.connected);
            h2 {
                (t(lang, "gateway")) " " span translate="no" { (g.id) } " "
                span class=(if connected { "ok" } else { "bad" }) {
                    (t(lang, if connected { "connected" } else { "not_connected" }))
                }
            }
            @for d in &g.devices {
                h3 { span translate="no" { (d.id) } " " span.muted translate="no" { (d.protocol) " " (d.endpoint) } }
                table.tags {
                    tr {
                        th { (t(lang, "tag")) } th { (t(lang, "address")) } th { (t(lang, "last_value")) }
                        th { (t(lang, "quality_col")) } th { (t(lang, "samples")) } th { (t(lang, "last_seen")) }
                        th { (t(lang, "completeness_window")) }
                    }
                    @for tag in &d.tags {
                        tr {
                            td translate="no" { (tag.name) }
                            td translate="no" { (tag.address) }
                            td.num.value translate="no" {
                                @match &tag.last_value {
                                    Some(v) => { (value_text(lang, &tag.data_type, v, &tag.unit)) }
                                    None => { "—" }
                                }
                            }
                            @let q = tag.last_quality.as_deref().unwrap_or("");
                            td class=(if q == "good" { "ok" } else { "bad" }) {
                                (match q { "good" => t(lang, "good"), "uncertain" => t(lang, "uncertain"), "bad" => t(lang, "bad"), _ => "—" })
                            }
                            td.num { (tag.samples) }
                            td { (tag.last_seen.as_deref().map_or("—".to_string(), local_of)) }
                            td.num { (pct(tag.window.completeness)) }
                        }
                    }
                }
            }
        }
    };
    let refresh = html! { meta http-equiv="refresh" content="5"; };
    let switch = format!("/?lang={}", if lang == Lang::Zh { "en" } else { "zh" });
    page_with_head(
        lang,
        t(lang, "overview_title"),
        &switch,
        refresh,
        html! {},
        body,
    )
}

/// The fleet page's own style: below 640 px each gateway becomes a card
/// (label before each value), so an installer reads it on a phone.
const FLEET_STYLE: &str = "table.fleet{width:100%}table.fleet td.down{color:#b91c1c}\
form.filter{margin:8px 0}form.filter label{margin-right:12px}th a{color:inherit}\
@media (max-width:640px){body{margin:8px}table.fleet,table.fleet tbody,table.fleet tr,table.fleet td{display:block;width:auto}\
table.fleet tr.head{display:none}table.fleet tr{border:1px solid #ccc;border-radius:6px;margin:0 0 10px;padding:4px}\
table.fleet td{border:none;padding:2px 4px;overflow-wrap:anywhere;text-align:left}table.fleet td::before{content:attr(data-label) ': ';color:#666}}";

/// `/gateways`: one row per gateway with its connection, backlog, devices,
/// version and chain; filter by enterprise and provider, sort by column.
pub fn fleet(
    rows: &[crate::fleet::FleetRow],
    q: &crate::fleet::FleetQuery,
    enterprises: &[(String, String)],
    providers: &[String],
    lang: Lang,
) -> String {
    let lang_code = if lang == Lang::Zh { "zh" } else { "en" };
    let query = |sort: Option<&str>, lang_code: &str| {
        let mut parts = vec![format!("lang={lang_code}")];
        for (k, v) in [("enterprise", &q.enterprise), ("provider", &q.provider)] {
            if let Some(v) = v {
                parts.push(format!("{k}={}", super::url_escape(v)));
            }
        }
        if let Some(s) = sort.or(q.sort.as_deref()) {
            parts.push(format!("sort={}", super::url_escape(s)));
        }
        format!("/gateways?{}", parts.join("&"))
    };
    // A column's link sorts by it, descending when it already sorts ascending.
    let sort_href = |key: &str| {
        let next = if q.sort.as_deref() == Some(key) {
            format!("-{key}")
        } else {
            key.to_string()
        };
        query(Some(&next), lang_code)
    };
    let head = |key: &'static str, label: &'static str| {
        html! { th { a href=(sort_href(key)) { (t(lang, label)) } } }
    };
    let body = html! {
        h1 { (t(lang, "fleet_title")) }
        p.muted {
            (t(lang, "fleet_refresh")) " · "
            span translate="no" { "JSON: " a href="/api/v1/gateways" { "/api/v1/gateways" } }
        }
        form.filter method="get" action="/gateways" {
            input type="hidden" name="lang" value=(lang_code);
            @if let Some(s) = &q.sort { input type="hidden" name="sort" value=(s); }
            label {
                (t(lang, "enterprise")) " "
                select name="enterprise" {
                    option value="" { (t(lang, "all")) }
                    @for (code, ename) in enterprises {
                        option value=(code) selected[q.enterprise.as_deref() == Some(code.as_str())] translate="no" { (ename) }
                    }
                    option value="-" selected[q.enterprise.as_deref() == Some("-")] { (t(lang, "unassigned")) }
                }
            }
            label {
                (t(lang, "provider")) " "
                select name="provider" {
                    option value="" { (t(lang, "all")) }
                    @for p in providers {
                        option value=(p) selected[q.provider.as_deref() == Some(p.as_str())] translate="no" { (p) }
                    }
                }
            }
            button { (t(lang, "filter")) }
        }
        @if rows.is_empty() { p id="fleet-none" { (t(lang, "fleet_none")) } }
        table.fleet id="fleet" {
            tr.head {
                (head("id", "gateway")) (head("enterprise", "enterprise")) (head("online", "status"))
                (head("last_batch", "last_batch")) (head("backlog", "backlog")) (head("devices_down", "devices"))
                (head("version", "version")) th { (t(lang, "config")) } th { (t(lang, "clock_offset")) }
                (head("chain_breaks", "chain"))
            }
            @for r in rows {
                tr.gateway data-id=(r.id) {
                    td data-label=(t(lang, "gateway")) translate="no" { b { (r.id) } }
                    td data-label=(t(lang, "enterprise")) {
                        @match (&r.enterprise_name, &r.enterprise) {
                            (Some(n), Some(c)) => { span translate="no" { (n) } br; span.muted translate="no" { (c) } }
                            _ => { span.muted { (t(lang, "unassigned")) } }
                        }
                        @if let Some(p) = &r.provider { br; span.muted translate="no" { (p) } }
                    }
                    td.state data-label=(t(lang, "status")) {
                        span class=(if r.online { "ok" } else { "bad" }) { (t(lang, if r.online { "online" } else { "offline" })) }
                        br;
                        span.muted {
                            @match &r.since { Some(s) => { (t(lang, "since")) " " (local_of(s)) } None => { (t(lang, "not_seen")) } }
                        }
                    }
                    td data-label=(t(lang, "last_batch")) { (r.last_batch.as_deref().map_or("—".to_string(), local_of)) }
                    @match &r.health {
                        Some(h) => {
                            td.backlog data-label=(t(lang, "backlog")) {
                                span.num { (h.pending_batches) } " " (t(lang, "batches"))
                                @if h.pending_batches > 0 { ", " (t(lang, "oldest")) " " (duration(lang, (h.backlog_age_s * 1000.0) as i64)) }
                                br; span.muted { (t(lang, "buffer_fill")) " " (format!("{:.1}%", h.buffer_fill * 100.0)) }
                                @if h.dropped_points > 0 { br; span.bad { (t(lang, "dropped")) " " (h.dropped_points) } }
                            }
                            td.devices data-label=(t(lang, "devices")) {
                                span.ok { (r.devices_up) " " (t(lang, "dev_up")) }
                                @if r.devices_down > 0 { " · " span.bad { (r.devices_down) " " (t(lang, "dev_down")) } }
                                @if r.devices_waiting > 0 { " · " (r.devices_waiting) " " (t(lang, "dev_waiting")) }
                                @for d in h.devices.iter().filter(|d| d.state == "down") {
                                    br;
                                    span.down translate="no" { (d.id) }
                                    @if let Some(why) = &d.reason { span.muted translate="no" { ": " (why) } }
                                }
                            }
                        }
                        None => {
                            td data-label=(t(lang, "backlog")) colspan="2" { span.muted { (t(lang, "no_health")) } }
                        }
                    }
                    td data-label=(t(lang, "version")) translate="no" {
                        (r.software_version.as_deref().unwrap_or("—"))
                        @if let Some(h) = &r.health { br; span.muted { (t(lang, "manifest")) " " (h.manifest_version) } }
                    }
                    td.config data-label=(t(lang, "config")) {
                        @match &r.config {
                            None => { span.muted { (t(lang, "config_local")) } }
                            Some(c) => {
                                span class=(if c.in_effect { "ok" } else { "bad" }) {
                                    (t(lang, "config_requested")) " v" (c.requested) " · " (t(lang, "config_applied")) " "
                                    @if c.applied == 0 { (t(lang, "config_local")) } @else { "v" (c.applied) }
                                }
                                @if let Some(refused) = &c.refused {
                                    br; span.bad { (t(lang, "config_refused")) " v" (refused.version) }
                                    @for p in refused.problems.iter().take(5) {
                                        br; span.muted translate="no" { (p.path) ": " (p.message) }
                                    }
                                }
                            }
                        }
                    }
                    td.num data-label=(t(lang, "clock_offset")) {
                        (r.health.as_ref().and_then(|h| h.clock_offset_ms).map_or("—".to_string(), |o| format!("{o:+} ms")))
                    }
                    td.chain data-label=(t(lang, "chain")) {
                        (t(lang, "links_verified")) " " (r.chain.verified)
                        @if r.chain.waiting > 0 { ", " (t(lang, "links_waiting")) " " (r.chain.waiting) }
                        @if r.chain.breaks > 0 { br; span.bad { (t(lang, "chain_breaks")) " " (r.chain.breaks) } }
                    }
                }
            }
        }
    };
    let head = html! {
        meta http-equiv="refresh" content="30";
        style { (PreEscaped(FLEET_STYLE)) }
    };
    let switch = query(None, if lang == Lang::Zh { "en" } else { "zh" });
    page_with_head(lang, t(lang, "fleet_title"), &switch, head, html! {}, body)
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
fn heatmap(r: &EnterpriseReport, lang: Lang) -> Markup {
    let days = r.devices.first().map_or(0, |d| d.daily.len());
    if days == 0 {
        return html! { p { (t(lang, "none")) } };
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
    let daily = &r.devices[0].daily;
    // No day label closer than this to the next one.
    let min_gap = text_width("00-00", font) + 8;
    let every_day = cw >= min_gap;
    // (x of the cell, week line?, label) per day.
    let mut last_label_x: Option<usize> = None;
    let columns: Vec<(usize, bool, Option<&str>)> = daily
        .iter()
        .enumerate()
        .map(|(i, cell)| {
            let x = left + i * cw;
            let week = monday(cell.day_ms);
            let next_monday = (i + 1..days).find(|&j| monday(daily[j].day_ms));
            let first_fits = next_monday.is_none_or(|j| (j - i) * cw >= min_gap);
            let show = (every_day || week || (i == 0 && first_fits))
                && last_label_x.is_none_or(|lx| x >= lx + min_gap);
            if show {
                last_label_x = Some(x);
            }
            let label = show.then(|| cell.date.get(5..).unwrap_or(&cell.date));
            (x, !every_day && week, label)
        })
        .collect();
    let (anchor, label_dx) = if every_day {
        ("middle", cw / 2)
    } else {
        ("start", 1)
    };
    html! {
        svg xmlns="http://www.w3.org/2000/svg" id="heatmap" width=(w) height=(h)
            viewBox={ "0 0 " (w) " " (h) } font-size=(font) role="img" {
            @for (x, week, label) in &columns {
                @if *week {
                    line.hm-week x1=(x.saturating_sub(1)) y1=(top - 14) x2=(x.saturating_sub(1))
                        y2=(h - 4) stroke="#374151" {}
                }
                @if let Some(label) = label {
                    text.hm-day x=(x + label_dx) y=(top - 6) text-anchor=(anchor) { (label) }
                }
            }
            @for (j, d) in r.devices.iter().enumerate() {
                @let y = top + j * ch;
                text.hm-dev translate="no" x=(left - 8) y=(y + 14) text-anchor="end" { (labels[j]) }
                @for (i, cell) in d.daily.iter().enumerate() {
                    rect.hm-cell x=(left + i * cw) y=(y) width=(cw - 2) height=(ch - 2)
                        fill=(colour(cell.completeness)) {
                        title { (d.device) " " (cell.date) " " (pct(cell.completeness)) }
                    }
                }
            }
        }
        p.legend.muted {
            @for (c, k) in [
                (Some(1.0), "legend_95"),
                (Some(0.9), "legend_80"),
                (Some(0.6), "legend_50"),
                (Some(0.0), "legend_low"),
                (None, "legend_none"),
            ] {
                span style={ "background:" (colour(c)) } {}
                (t(lang, k))
            }
            @if !every_day { " · " (t(lang, "legend_week")) }
        }
    }
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

/// A coordinate of a chart, to 0.1 px.
fn px(v: f64) -> String {
    format!("{v:.1}")
}

/// One small multiple: hourly mean (line and dots), min–max band, the value
/// range with its unit on the left and dates on the time axis.
fn trend_svg(lang: Lang, tr: &Trend, from: i64, to: i64) -> Markup {
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
    let span = if hi > lo { hi - lo } else { 1.0 };
    let y = |v: f64| top + 4.0 + (hi - v) / span * (plot_h - 8.0);
    let band: String = tr
        .points
        .iter()
        .map(|p| {
            format!(
                "M{},{}L{},{}",
                px(x(p.0)),
                px(y(p.3)),
                px(x(p.0)),
                px(y(p.2))
            )
        })
        .collect();
    let line: Vec<String> = tr
        .points
        .iter()
        .map(|p| format!("{},{}", px(x(p.0)), px(y(p.1))))
        .collect();
    html! {
        svg xmlns="http://www.w3.org/2000/svg" width=(w) height=(h) font-size="10" role="img" {
            rect x=(left) y=(top) width=(plot_w) height=(plot_h) fill="none" stroke="#ccc" {}
            @for d in day_ticks(from, to, plot_w) {
                line x1=(px(x(d))) y1=(top) x2=(px(x(d))) y2=(top + plot_h + 3.0) stroke="#eee" {}
                text.axis-t x=(px(x(d))) y=(h - 8.0) text-anchor="middle" {
                    (acceptance::date_of(d).get(5..).unwrap_or_default())
                }
            }
            @if tr.points.is_empty() {
                text x=(left + plot_w / 2.0) y=(top + plot_h / 2.0) text-anchor="middle" fill="#666" {
                    (t(lang, "no_values"))
                }
            } @else {
                path d=(band) stroke="#93c5fd" stroke-width="3" {}
                polyline.mean points=(line.join(" ")) fill="none" stroke="#1d4ed8" stroke-width="1.5" {}
                @if tr.points.len() <= 48 {
                    @for p in &tr.points {
                        circle cx=(px(x(p.0))) cy=(px(y(p.1))) r="2.5" fill="#1d4ed8" {}
                    }
                }
                text.axis-v translate="no" x=(left - 4.0) y=(top + 10.0) text-anchor="end" { (hi_label) }
                text.axis-v translate="no" x=(left - 4.0) y=(top + plot_h) text-anchor="end" { (lo_label) }
            }
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The report a reviewer files: cover, register, heatmap, devices, gaps,
/// gateways and chains, usage, trends, and the evidence footer with the
/// bundle's fingerprint (`evidence::fingerprint` of the bundle the dossier
/// writes for the same window; None: not computed, as in tests).
pub fn report(r: &EnterpriseReport, lang: Lang, fingerprint: Option<&str>) -> String {
    let e = &r.enterprise;
    let n = &r.networking;
    let c = &r.criteria;
    let meets = n.rate.is_some_and(|x| x >= c.networking_target);
    let sep = if lang == Lang::Zh { "；" } else { "; " };
    let ok_class = |ok: bool| if ok { "ok" } else { "bad" };
    let verdict_word = |ok: bool| t(lang, if ok { "yes" } else { "no" });
    let mut heads = Vec::new();
    let gateway_chains: Vec<String> = r
        .gateways
        .iter()
        .map(|g| {
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
                        s += &format!("; {} {}", c.breaks.len(), t(lang, "chain_breaks"));
                    }
                    s
                })
                .collect();
            if chains.is_empty() {
                t(lang, "none").to_string()
            } else {
                chains.join("<br>")
            }
        })
        .collect();
    let window = format!("from={}&to={}", r.from, r.to);
    let dossier = format!("/api/v1/enterprises/{}/dossier?{window}", e.code);
    let body = html! {
        h1 { (t(lang, "title")) }
        div.cover id="cover" {
            table {
                tr { th { (t(lang, "enterprise")) } td { (raw(name(&e.name))) } th { (t(lang, "code")) } td { (raw(name(&e.code))) } }
                tr { th { (t(lang, "county")) } td { (raw(name(&e.county))) } th { (t(lang, "industry")) } td { (raw(industry(lang, c, &e.industry))) } }
                tr { th { (t(lang, "provider")) } td { (raw(name(&e.provider))) } th { (t(lang, "generated")) } td { (local(r.generated_at_ms)) } }
                tr {
                    th { (t(lang, "window")) } td { (r.from) " — " (r.to) }
                    th { (t(lang, "criteria")) }
                    td { (raw(fill(t(lang, "criteria_text"), &[
                        ("c", format!("{:.0}", c.completeness_min * 100.0)),
                        ("d", c.verdict_days.to_string()),
                    ]))) }
                }
            }
            div.box {
                div.muted { (t(lang, "rate")) }
                div.big id="networking-rate" { (pct(n.rate)) }
                div.muted id="rate-fraction" { (raw(fill(t(lang, "rate_fraction"), &[
                    ("a", n.data_through.to_string()),
                    ("b", n.registered_production.to_string()),
                ]))) }
            }
            div.box {
                div.muted { (t(lang, "verdict")) }
                div class={ "big " (ok_class(meets)) } id="verdict" {
                    (t(lang, if meets { "verdict_meets" } else { "verdict_below" }))
                }
                div.muted { (raw(fill(t(lang, "target_is"), &[("t", format!("{:.0}%", c.networking_target * 100.0))]))) }
            }
        }
        h2 { (t(lang, "register")) }
        table id="register" {
            tr {
                th { (t(lang, "eq_id")) } th { (t(lang, "eq_name")) } th { (t(lang, "workshop")) }
                th { (t(lang, "production")) } th { (t(lang, "collected_by")) } th { (t(lang, "verdict")) }
                th { (t(lang, "reason")) }
            }
            @for s in &n.equipment {
                @let q = &s.equipment;
                tr {
                    td { (raw(name(&q.id))) } td { (raw(name(&q.name))) } td { (raw(name(&q.workshop))) }
                    td { (t(lang, if q.production { "production_yes" } else { "production_no" })) }
                    td {
                        @if q.gateway.is_empty() { "—" } @else { (raw(name(&format!("{}/{}", q.gateway, q.device)))) }
                    }
                    td class=(ok_class(s.data_through)) { (verdict_word(s.data_through)) }
                    td { (raw(reasons_text(lang, &s.why, &s.flags, true))) }
                }
            }
        }
        @if !n.unregistered_devices.is_empty() {
            p { (t(lang, "unregistered")) ": " (raw(name(&n.unregistered_devices.join(", ")))) }
        }
        h2 { (t(lang, "heatmap")) }
        (heatmap(r, lang))
        h2 { (t(lang, "devices")) }
        table id="devices" {
            tr {
                th { (t(lang, "device")) } th { (t(lang, "identity")) } th { (t(lang, "completeness")) }
                th { (t(lang, "received")) } th { (t(lang, "quality")) } th { (t(lang, "backfill")) }
                th { (t(lang, "first_last")) } th { (t(lang, "flags")) } th { (t(lang, "verdict")) }
            }
            @for d in &r.devices {
                @let ident: Vec<String> = d.identity.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                @let flags: Vec<String> = d.flags.iter().map(|f| {
                    let critical = if f.critical { format!("[{}] ", t(lang, "critical")) } else { String::new() };
                    critical + &flag_text(lang, f, true)
                }).collect();
                @let samples = d.good + d.uncertain + d.bad;
                tr {
                    td { (raw(name(&format!("{}/{}", d.gateway, d.device)))) }
                    td { (raw(name(&ident.join("; ")))) }
                    td.num { (pct(d.completeness)) }
                    td.num { (d.received) " / " (d.expected) }
                    td.num { (d.good) " / " (d.uncertain) " / " (d.bad) }
                    td.num { (pct((samples > 0).then(|| d.backfilled as f64 / samples as f64))) }
                    td { (d.first_seen_ms.map_or("—".into(), local)) br; (d.last_seen_ms.map_or("—".into(), local)) }
                    td { (raw(flags.join(sep))) }
                    td class=(ok_class(d.verdict.data_through)) { (verdict_word(d.verdict.data_through)) }
                }
            }
        }
        h2 { (t(lang, "gaps")) }
        table id="gaps" {
            tr {
                th { (t(lang, "device")) } th { (t(lang, "start")) } th { (t(lang, "end")) }
                th { (t(lang, "duration")) } th { (t(lang, "cause")) } th { (t(lang, "tags")) }
            }
            @for d in &r.devices {
                @for g in &d.gaps {
                    tr {
                        td { (raw(name(&d.device))) }
                        td { (local(g.start_ms)) }
                        td { (local(g.end_ms)) }
                        td.num { (duration(lang, g.duration_ms)) }
                        td { (cause(lang, g.cause)) }
                        td.num { (g.tags) }
                    }
                }
            }
        }
        h2 { (t(lang, "gateways")) }
        table id="gateways" {
            tr {
                th { (t(lang, "gateway")) } th { (t(lang, "points")) } th { (t(lang, "latency")) }
                th { (t(lang, "clock")) } th { (t(lang, "backfill")) } th { (t(lang, "chain")) }
            }
            @for (g, chains) in r.gateways.iter().zip(&gateway_chains) {
                tr {
                    td { (raw(name(&g.gateway))) }
                    td.num { (g.points) }
                    td.num {
                        (g.latency_p50_ms.map_or("—".into(), |v| format!("≤{v}"))) " / "
                        (g.latency_p95_ms.map_or("—".into(), |v| format!("≤{v}"))) " ms"
                    }
                    td.num { (g.clock_offset_ms.map_or("—".into(), |v| format!("{v:+} ms"))) }
                    td.num { (pct(Some(g.backfill_share))) }
                    td { (raw(chains.clone())) }
                }
            }
        }
        h2 { (t(lang, "usage")) }
        table id="usage" {
            tr {
                th { (t(lang, "date")) } th { (t(lang, "active")) } th { (t(lang, "points")) }
                th { (t(lang, "bytes")) } th { (t(lang, "active_devices")) } th { (t(lang, "active_tags")) }
            }
            @for u in &r.usage {
                tr {
                    td { (u.date) }
                    td { @if u.active { "✔" } @else { "—" } }
                    td.num { (u.points) } td.num { (u.bytes) }
                    td.num { (u.active_devices) } td.num { (u.active_tags) }
                }
            }
        }
        p {
            (t(lang, "active_days")) ": "
            (r.active_days.iter().map(|(m, n)| format!("{m}: {n}")).collect::<Vec<_>>().join(", "))
        }
        h2 { (t(lang, "trends")) }
        div.trends id="trends" {
            @for d in &r.devices {
                @for tr in &d.trend {
                    @let unit = if tr.unit.is_empty() { String::new() } else { format!(" ({})", tr.unit) };
                    figure.trend data-tag={ (d.gateway) "/" (d.device) "/" (tr.tag) } {
                        figcaption { (raw(name(&format!("{}/{} · {}{unit}", d.gateway, d.device, tr.tag)))) }
                        (trend_svg(lang, tr, r.from_day_ms, r.to_day_ms))
                    }
                }
            }
        }
        footer id="evidence" {
            p {
                (raw(fill(t(lang, "evidence_footer"), &[(
                    "cmd",
                    name(&format!(
                        "guantong-ingest export-evidence --enterprise {} --from {} --to {} --out bundle.json; guantong-ingest verify bundle.json",
                        e.code,
                        rfc3339(r.from_day_ms),
                        rfc3339(r.to_day_ms)
                    )),
                )])))
            }
            p id="chain-heads" {
                @if heads.is_empty() { (t(lang, "none")) } @else { (raw(name(&heads.join(" · ")))) }
            }
            @if let Some(f) = fingerprint {
                p { (t(lang, "fingerprint")) ": " code id="fingerprint" translate="no" { (f) } }
            } @else {
                p id="fingerprint-note" { (t(lang, "fingerprint_in_dossier")) }
            }
        }
    };
    let switch = format!(
        "?{window}&lang={}",
        if lang == Lang::Zh { "en" } else { "zh" }
    );
    let nav = html! {
        " · " a.nav id="dossier" href=(dossier) { (t(lang, "dossier_download")) }
    };
    page(
        lang,
        &format!("{} · {}", e.name, t(lang, "title")),
        &switch,
        nav,
        body,
    )
}

pub fn city(v: &CityView, c: &Criteria, lang: Lang) -> String {
    let labels = ["0–20%", "20–40%", "40–60%", "60–80%", "80–100%", "—"];
    let max = v.distribution.iter().copied().max().unwrap_or(0).max(1);
    let code_lang = if lang == Lang::Zh { "zh" } else { "en" };
    let body = html! {
        h1 { (t(lang, "city_title")) }
        p.muted { (t(lang, "window")) ": " (v.from) " — " (v.to) }
        div.box { div.muted { (t(lang, "enterprises")) } div.big id="enterprises" { (v.enterprises) } }
        div.box { div.muted { (t(lang, "on_cloud")) } div.big id="on-cloud" { (v.on_cloud) } }
        div.box {
            div.muted { (t(lang, "meets_target")) " (" (t(lang, "target")) " " (format!("{:.0}%", v.target * 100.0)) ")" }
            div.big id="meets-target" { (v.meets_target) }
        }
        h2 { (t(lang, "distribution")) }
        svg xmlns="http://www.w3.org/2000/svg" width="520" height="170" font-size="11" role="img" {
            @for (i, n) in v.distribution.iter().enumerate() {
                @let hgt = 120.0 * *n as f64 / max as f64;
                @let x = 20 + i * 82;
                rect x=(x) y=(format!("{:.1}", 140.0 - hgt)) width="60" height=(format!("{hgt:.1}")) fill="#2563eb" {}
                text x=(x + 30) y="160" text-anchor="middle" { (labels[i]) }
                text x=(x + 30) y=(format!("{:.1}", 136.0 - hgt)) text-anchor="middle" { (n) }
            }
        }
        @for (title, groups) in [("by_industry", &v.by_industry), ("by_county", &v.by_county)] {
            h2 { (t(lang, title)) }
            table {
                tr {
                    th {} th { (t(lang, "enterprises")) } th { (t(lang, "on_cloud")) }
                    th { (t(lang, "meets_target")) } th { (t(lang, "mean_rate")) }
                }
                @for g in groups.iter() {
                    tr {
                        td { (raw(if title == "by_industry" { industry(lang, c, &g.key) } else { name(&g.name) })) }
                        td.num { (g.enterprises) } td.num { (g.on_cloud) }
                        td.num { (g.meets_target) } td.num { (pct(g.mean_rate)) }
                    }
                }
            }
        }
        h2 { (t(lang, "enterprise")) }
        table id="rows" {
            tr {
                th { (t(lang, "enterprise")) } th { (t(lang, "county")) } th { (t(lang, "industry")) }
                th { (t(lang, "rate")) } th { (t(lang, "on_cloud")) } th {}
            }
            @for r in &v.rows {
                tr {
                    td { (raw(name(&r.name))) br; span.muted { (raw(name(&r.code))) } }
                    td { (raw(name(&r.county))) }
                    td { (raw(industry(lang, c, &r.industry))) }
                    td.num { (pct(r.networking_rate)) " (" (r.data_through) "/" (r.registered_production) ")" }
                    td { @if r.on_cloud { "✔" } @else { "—" } }
                    td { a href={ "/report/" (r.code) "?from=" (v.from) "&to=" (v.to) "&lang=" (code_lang) } { (t(lang, "open_report")) } }
                }
            }
        }
    };
    let switch = format!(
        "?from={}&to={}&lang={}",
        v.from,
        v.to,
        if lang == Lang::Zh { "en" } else { "zh" }
    );
    page(lang, t(lang, "city_title"), &switch, html! {}, body)
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
            "t(zh, \"",
            "t(en, \"",
            "t(Lang::Zh, \"",
            "t(Lang::En, \"",
            "h(\"",
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
        // Keys chosen by a condition: `t(lang, if c { "a" } else { "b" })`.
        for (i, _) in source.match_indices("t(lang, if ") {
            let rest = &source[i..];
            let end = rest.find(')').unwrap_or(rest.len());
            let mut parts = rest[..end].split('"');
            parts.next();
            keys.extend(parts.step_by(2).map(str::to_string));
        }
        keys.extend(
            [
                "error_400",
                "error_403",
                "error_404",
                "error_500",
                "by_industry",
                "by_county",
            ]
            .map(String::from),
        );
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
        assert_eq!(esc("<a href=\"x\">&"), "&lt;a href=&quot;x&quot;&gt;&amp;");
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

    /// The overview prints a float32 device value without its binary noise,
    /// a scaled value without f64 noise, booleans as words, then the unit.
    #[test]
    fn values_are_formatted_by_type_and_unit() {
        let v = |x: serde_json::Value, ty: &str, unit: &str| value_text(Lang::En, ty, &x, unit);
        assert_eq!(v(123.456_f32.into(), "double", "°C"), "123.456 °C");
        assert_eq!(f64::from(123.456_f32), 123.45600128173828);
        assert_eq!(v((123_f64 * 0.1).into(), "double", "m³/h"), "12.3 m³/h");
        assert_eq!(v(2.5.into(), "double", ""), "2.5");
        assert_eq!(v(42.into(), "uint", "pcs"), "42 pcs");
        assert_eq!(v(true.into(), "bool", ""), "true");
        assert_eq!(value_text(Lang::Zh, "bool", &false.into(), ""), "否");
        assert_eq!(v("a<b".into(), "string", ""), "a<b");
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
