//! The acceptance registry: enterprises, their production equipment register
//! (设备台账), gateway ownership and the accounts that may read or change them.
//!
//! Invariants:
//! - An enterprise is keyed by its unified social credit code (统一社会信用代码),
//!   which is checked, including its check character, before it is stored.
//! - The equipment register lists every production device, networked or not,
//!   so the networking rate has a true denominator. An entry may name the
//!   gateway device that collects it (`gateway`, `device`); entries without
//!   one count as not networked.
//! - A gateway belongs to at most one enterprise.
//! - Account tokens are 128-bit random secrets stored only as SHA-256 hashes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The characters of a unified social credit code (GB 32100-2015): digits and
/// capitals without I, O, Z, S, V.
const USCC_CHARS: &[u8; 31] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
const USCC_WEIGHTS: [u32; 17] = [
    1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
];

/// Checks a unified social credit code: 18 characters from the code's
/// alphabet, the last one the GB 32100-2015 check character of the others.
pub fn check_credit_code(code: &str) -> Result<(), String> {
    let bytes = code.as_bytes();
    if bytes.len() != 18 {
        return Err(format!(
            "unified social credit code `{code}`: expected 18 characters, found {}",
            code.chars().count()
        ));
    }
    let mut sum = 0;
    for (i, c) in bytes.iter().enumerate() {
        let Some(v) = USCC_CHARS.iter().position(|x| x == c) else {
            return Err(format!(
                "unified social credit code `{code}`: character {} (`{}`) is not one of 0-9 and A-Y without I, O, S, V, Z",
                i + 1,
                *c as char
            ));
        };
        if i < 17 {
            sum += USCC_WEIGHTS[i] * v as u32;
        }
    }
    let expected = USCC_CHARS[((31 - sum % 31) % 31) as usize];
    if bytes[17] != expected {
        return Err(format!(
            "unified social credit code `{code}`: check character is `{}`, expected `{}` (mistyped code?)",
            bytes[17] as char, expected as char
        ));
    }
    Ok(())
}

/// The pilot's four industries, used unless the ingest config names others.
pub fn default_industries() -> Vec<Industry> {
    [
        (
            "petrochemical",
            "石化化工",
            "Petrochemical and fine chemical",
        ),
        (
            "metallurgy",
            "冶金和新材料",
            "Metallurgy and advanced materials",
        ),
        ("equipment", "高端装备", "High-end equipment"),
        ("light", "现代轻工", "Modern light industry"),
    ]
    .into_iter()
    .map(|(key, zh, en)| Industry {
        key: key.into(),
        name_zh: zh.into(),
        name_en: en.into(),
    })
    .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Industry {
    pub key: String,
    pub name_zh: String,
    pub name_en: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Enterprise {
    /// Unified social credit code.
    pub code: String,
    pub name: String,
    /// County or district (区县).
    pub county: String,
    /// An industry key.
    pub industry: String,
    /// The service provider (服务商) responsible for the enterprise.
    #[serde(default)]
    pub provider: String,
}

/// Longest name (enterprise, equipment, county, provider) accepted, in characters.
pub const MAX_NAME_CHARS: usize = 200;

/// A name or id of the registry: at most `max` characters, no control
/// characters, and (when `required`) not blank. `what` names the field.
pub fn check_text(what: &str, value: &str, max: usize, required: bool) -> Result<(), String> {
    if required && value.trim().is_empty() {
        return Err(format!("{what} is empty"));
    }
    let chars = value.chars().count();
    if chars > max {
        return Err(format!(
            "{what} has {chars} characters, at most {max} allowed"
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{what} contains a control character"));
    }
    Ok(())
}

impl Enterprise {
    pub fn validate(&self, industries: &[Industry]) -> Result<(), String> {
        check_credit_code(&self.code)?;
        let field = |name: &str| format!("enterprise {}: {name}", self.code);
        check_text(&field("name"), &self.name, MAX_NAME_CHARS, true)?;
        check_text(&field("county"), &self.county, MAX_NAME_CHARS, true)?;
        check_text(&field("provider"), &self.provider, MAX_NAME_CHARS, false)?;
        if !industries.iter().any(|i| i.key == self.industry) {
            return Err(format!(
                "enterprise {}: industry `{}` is not one of: {}",
                self.code,
                self.industry,
                industries
                    .iter()
                    .map(|i| i.key.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(())
    }
}

/// One entry of an enterprise's production equipment register.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Equipment {
    /// The enterprise's own equipment number (设备编号).
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub workshop: String,
    /// Production equipment counts in the networking rate; other entries
    /// (office, utilities) are listed but not counted.
    #[serde(default = "yes")]
    pub production: bool,
    /// The gateway and device id (in that gateway's config) collecting it.
    #[serde(default)]
    pub gateway: String,
    #[serde(default)]
    pub device: String,
}

fn yes() -> bool {
    true
}

impl Equipment {
    /// Every field within its length, id and name present, gateway and
    /// device both given or neither.
    pub fn validate(&self) -> Result<(), String> {
        check_text("equipment id", &self.id, MAX_NAME_CHARS, true)?;
        let field = |name: &str| format!("equipment {}: {name}", self.id);
        check_text(&field("name"), &self.name, MAX_NAME_CHARS, true)?;
        for (name, value) in [
            ("kind", &self.kind),
            ("workshop", &self.workshop),
            ("gateway", &self.gateway),
            ("device", &self.device),
        ] {
            check_text(&field(name), value, MAX_NAME_CHARS, false)?;
        }
        if self.gateway.is_empty() != self.device.is_empty() {
            return Err(field("give both gateway and device, or neither"));
        }
        Ok(())
    }
}

/// CSV columns of an equipment register, English and Chinese headers.
const COLUMNS: &[(&str, &[&str])] = &[
    ("id", &["id", "equipment_id", "设备编号"]),
    ("name", &["name", "设备名称"]),
    ("kind", &["kind", "type", "设备类型"]),
    ("workshop", &["workshop", "车间"]),
    ("production", &["production", "生产设备"]),
    ("gateway", &["gateway", "网关"]),
    ("device", &["device", "采集设备"]),
];

/// How to save a register as UTF-8, for every refusal of its encoding.
const SAVE_AS_UTF8: &str = "save it as UTF-8 (Excel: 另存为 / Save As → \"CSV UTF-8（逗号分隔）/ CSV UTF-8 (Comma delimited)\"), or declare its encoding (--encoding gbk, or ?encoding=gbk over HTTP)";

/// The text of an equipment register file as Excel writes it: UTF-8 (BOM
/// or not), or GBK/GB18030, what Excel on Chinese Windows saves as
/// "CSV（逗号分隔）". `encoding` declares it (a WHATWG label such as
/// `utf-8`, `gbk`, `gb18030`); undeclared, bytes that are UTF-8 are UTF-8
/// and others are read as GB18030 (a superset of GBK). Bytes that are
/// neither are refused naming the line and how to save the file as UTF-8.
/// Decoding by encoding_rs (the WHATWG decoders of Firefox), never by hand.
pub fn decode_equipment_csv(bytes: &[u8], encoding: Option<&str>) -> Result<String, String> {
    let line_of = |at: usize| bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
    let declared = match encoding {
        Some(label) => Some(
            encoding_rs::Encoding::for_label(label.trim().as_bytes()).ok_or_else(|| {
                format!("encoding `{label}`: unknown; expected utf-8, gbk or gb18030")
            })?,
        ),
        None => None,
    };
    let utf8_error = match std::str::from_utf8(bytes) {
        Ok(text) if declared.is_none_or(|e| e == encoding_rs::UTF_8) => {
            return Ok(text.strip_prefix('\u{feff}').unwrap_or(text).to_string());
        }
        Ok(_) => None,
        Err(e) => Some(e.valid_up_to()),
    };
    let encoding = match declared {
        Some(e) => e,
        None if bytes.starts_with(&[0xEF, 0xBB, 0xBF]) => encoding_rs::UTF_8,
        None => encoding_rs::GB18030,
    };
    let mut decoder = encoding.new_decoder_without_bom_handling();
    let mut text = String::with_capacity(bytes.len() * 3 / 2 + 4);
    let (result, read) = decoder.decode_to_string_without_replacement(bytes, &mut text, true);
    match result {
        encoding_rs::DecoderResult::InputEmpty => {
            Ok(text.strip_prefix('\u{feff}').unwrap_or(&text).to_string())
        }
        _ => {
            // The first byte that is not text in the encoding tried, or
            // the first that is not UTF-8 when the file was not declared.
            let at = if declared.is_some() {
                read.saturating_sub(1)
            } else {
                utf8_error.unwrap_or(read)
            };
            let what = match declared {
                Some(e) => format!("not {} text", e.name()),
                None => "neither UTF-8 nor GBK/GB18030 text".to_string(),
            };
            Err(format!(
                "line {}: the file is {what}: {SAVE_AS_UTF8}",
                line_of(at.min(bytes.len()))
            ))
        }
    }
}

/// Parses an equipment register from CSV (UTF-8, BOM allowed). Every problem
/// is reported with its line, not only the first.
pub fn parse_equipment_csv(text: &str) -> Result<Vec<Equipment>, Vec<String>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => return Err(vec![format!("header line: {e}")]),
    };
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    let mut problems = Vec::new();
    for (i, h) in headers.iter().enumerate() {
        match COLUMNS.iter().find(|(_, names)| names.contains(&h)) {
            Some((key, _)) => {
                index.insert(key, i);
            }
            None => problems.push(format!(
                "header line: unknown column `{h}` (known: {})",
                COLUMNS
                    .iter()
                    .map(|(_, n)| n.join("/"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
    for required in ["id", "name"] {
        if !index.contains_key(required) {
            problems.push(format!("header line: column `{required}` is missing"));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut out = Vec::new();
    let mut seen = BTreeMap::new();
    for (n, record) in reader.records().enumerate() {
        let line = n + 2;
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("line {line}: {e}"));
                continue;
            }
        };
        let get = |key: &str| {
            index
                .get(key)
                .and_then(|&i| record.get(i))
                .unwrap_or_default()
                .to_string()
        };
        let production = match get("production").to_lowercase().as_str() {
            "" | "yes" | "y" | "true" | "1" | "是" => true,
            "no" | "n" | "false" | "0" | "否" => false,
            other => {
                problems.push(format!(
                    "line {line}: production `{other}`: expected yes/no (是/否)"
                ));
                continue;
            }
        };
        let e = Equipment {
            id: get("id"),
            name: get("name"),
            kind: get("kind"),
            workshop: get("workshop"),
            production,
            gateway: get("gateway"),
            device: get("device"),
        };
        if let Err(m) = e.validate() {
            problems.push(format!("line {line}: {m}"));
            continue;
        }
        if let Some(first) = seen.insert(e.id.clone(), line) {
            problems.push(format!(
                "line {line}: equipment id {} already on line {first}",
                e.id
            ));
            continue;
        }
        out.push(e);
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Manages the registry and accounts; reads everything.
    Admin,
    /// Manages and reads only the enterprises whose `provider` it is.
    Provider,
    /// Reads only: the enterprises assigned, or all with `all_enterprises`.
    Reviewer,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "provider" => Ok(Role::Provider),
            "reviewer" => Ok(Role::Reviewer),
            other => Err(format!(
                "role `{other}`: expected admin, provider or reviewer"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Account {
    pub name: String,
    pub role: Role,
    /// For a provider: the provider name enterprises carry.
    #[serde(default)]
    pub provider: String,
    /// For a reviewer: the enterprises assigned (empty: none, unless
    /// `all_enterprises`).
    #[serde(default)]
    pub enterprises: Vec<String>,
    /// For a reviewer: reads every enterprise (a city-level reviewer).
    #[serde(default)]
    pub all_enterprises: bool,
}

impl Account {
    pub fn can_read(&self, e: &Enterprise) -> bool {
        match self.role {
            Role::Admin => true,
            Role::Provider => !self.provider.is_empty() && e.provider == self.provider,
            Role::Reviewer => self.all_enterprises || self.enterprises.contains(&e.code),
        }
    }

    pub fn can_write(&self, e: &Enterprise) -> bool {
        match self.role {
            Role::Admin => true,
            Role::Provider => self.can_read(e),
            Role::Reviewer => false,
        }
    }
}

/// A new random account token: 32 hex digits with a recognisable prefix.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    format!("gtk_{}", hex::encode(b))
}

pub fn token_digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// One read or change by an account, for the access log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Access {
    pub at_ms: i64,
    pub account: String,
    pub role: Role,
    pub method: String,
    pub path: String,
    /// The enterprise the request was about, when there was one.
    #[serde(default)]
    pub enterprise: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_codes_are_checked_including_the_check_character() {
        // Published examples of valid codes.
        for ok in [
            "91350100M000100Y43",
            "91110000802100433B",
            "91440300708461136T",
        ] {
            assert_eq!(check_credit_code(ok), Ok(()), "{ok}");
        }
        let e = check_credit_code("91350100M000100Y44").expect_err("must be refused");
        assert!(e.contains("check character is `4`, expected `3`"), "{e}");
        assert!(
            check_credit_code("91350100M000100Y4")
                .expect_err("must be refused")
                .contains("18")
        );
        let e = check_credit_code("91350100I000100Y43").expect_err("must be refused");
        assert!(e.contains("character 9 (`I`)"), "{e}");
    }

    #[test]
    fn equipment_csv_with_chinese_headers_and_bom() {
        let csv = "\u{feff}设备编号,设备名称,设备类型,车间,生产设备,网关,采集设备\n\
                   E1,反应釜1号,反应釜,一车间,是,gw-1,kettle-1\n\
                   E2,空压机,空压机,动力站,否,,\n";
        let list = parse_equipment_csv(csv).expect("parses");
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].name, "反应釜1号");
        assert_eq!(
            (list[0].gateway.as_str(), list[0].device.as_str()),
            ("gw-1", "kettle-1")
        );
        assert!(list[0].production && !list[1].production);
    }

    /// What Excel on Chinese Windows saves ("CSV（逗号分隔）") is GBK:
    /// detected, or declared; bytes that are neither refused with the line.
    #[test]
    fn equipment_csv_in_gbk_as_excel_saves_it() {
        let text = "设备编号,设备名称,车间,生产设备\nE1,反应釜1号,一车间,是\nE2,空压机,动力站,否\n";
        let (gbk, _, unmappable) = encoding_rs::GBK.encode(text);
        assert!(!unmappable);
        assert!(
            std::str::from_utf8(&gbk).is_err(),
            "the sample must not be UTF-8"
        );
        for declared in [None, Some("gbk"), Some("GB18030")] {
            let decoded = decode_equipment_csv(&gbk, declared).expect("decodes");
            assert_eq!(decoded, text, "{declared:?}");
        }
        let list = parse_equipment_csv(&decode_equipment_csv(&gbk, None).expect("decodes"))
            .expect("parses");
        assert_eq!(list[0].name, "反应釜1号");
        let bom = [&[0xEF, 0xBB, 0xBF][..], text.as_bytes()].concat();
        assert_eq!(decode_equipment_csv(&bom, None).as_deref(), Ok(text));
        // Declared UTF-8 but GBK on line 2: the line and how to save as UTF-8.
        let mixed = [b"id,name\n".as_slice(), &gbk[..]].concat();
        let e = decode_equipment_csv(&mixed, Some("utf-8")).expect_err("not UTF-8");
        assert!(e.starts_with("line 2: the file is not UTF-8 text"), "{e}");
        assert!(e.contains("CSV UTF-8"), "{e}");
        // Neither encoding: a GBK lead byte without its trail byte on line 3.
        let broken = b"id,name\nE1,A\nE2,\x81\n";
        let e = decode_equipment_csv(broken, None).expect_err("neither");
        assert!(
            e.starts_with("line 3: the file is neither UTF-8 nor GBK"),
            "{e}"
        );
        let e = decode_equipment_csv(b"id", Some("klingon")).expect_err("unknown label");
        assert!(e.contains("encoding `klingon`"), "{e}");
    }

    #[test]
    fn equipment_csv_problems_name_their_lines() {
        let csv = "id,name,production,gateway,device\nE1,A,maybe,,\nE2,,yes,,\nE3,C,yes,gw,\nE4,D,,,\nE4,D2,,,\n";
        let problems = parse_equipment_csv(csv).expect_err("must be refused");
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(
            problems[0].starts_with("line 2: production `maybe`"),
            "{problems:?}"
        );
        assert!(problems[1].starts_with("line 3:"), "{problems:?}");
        let long = format!("id,name\nE1,{}\n", "x".repeat(MAX_NAME_CHARS + 1));
        let e = parse_equipment_csv(&long).expect_err("too long");
        assert!(e[0].contains("at most 200"), "{e:?}");
        assert!(
            problems[2].contains("both gateway and device"),
            "{problems:?}"
        );
        assert!(problems[3].contains("already on line 5"), "{problems:?}");
        let unknown = parse_equipment_csv("id,name,colour\n").expect_err("must be refused");
        assert!(
            unknown[0].contains("unknown column `colour`"),
            "{unknown:?}"
        );
    }

    #[test]
    fn roles_limit_what_an_account_reads_and_writes() {
        let e = Enterprise {
            code: "91350100M000100Y43".into(),
            name: "A".into(),
            county: "X".into(),
            industry: "light".into(),
            provider: "p1".into(),
        };
        let provider = |p: &str| Account {
            name: "x".into(),
            role: Role::Provider,
            provider: p.into(),
            enterprises: vec![],
            all_enterprises: false,
        };
        assert!(provider("p1").can_write(&e));
        assert!(!provider("p2").can_read(&e));
        let reviewer = Account {
            name: "r".into(),
            role: Role::Reviewer,
            provider: String::new(),
            enterprises: vec![],
            all_enterprises: false,
        };
        assert!(
            !reviewer.can_read(&e),
            "a reviewer with no enterprises listed reads none"
        );
        let city = Account {
            all_enterprises: true,
            ..reviewer.clone()
        };
        assert!(city.can_read(&e) && !city.can_write(&e));
        let assigned = Account {
            enterprises: vec!["other".into()],
            ..reviewer
        };
        assert!(!assigned.can_read(&e));
    }
}
