//! OPC UA device and tag settings, as written in `[[devices]]` with
//! `protocol = "opcua"`.
//!
//! One `[[devices]]` is one session on one server. Tags name nodes in the
//! OPC UA text form: `ns=2;s=Line1.Temp`, `ns=3;i=1001`,
//! `ns=2;g=09087e75-8e5e-499b-954f-f2a9603db28a`, `ns=2;b=M/RbKBsRVkePCePcx24oRA==`,
//! or with the namespace by URI, `nsu=urn:factory:plc;s=Line1.Temp`, which is
//! resolved against the server's namespace array at every connect (an index
//! can change when the server restarts; a URI does not). `Tag.address` in the
//! manifest is the node exactly as configured.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_opcua::types::NodeId;
use guantong_proto::v1::{Device, Tag};
use serde::Deserialize;

use crate::config::{Problems, check_id};
use crate::value::ValueType;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcUaConfig {
    pub id: String,
    /// `opc.tcp://host:port[/path]`, the server's discovery URL.
    pub url: String,
    #[serde(default)]
    pub security_policy: SecurityPolicyChoice,
    #[serde(default)]
    pub security_mode: SecurityModeChoice,
    /// PKI directory (own/, private/, trusted/, rejected/); default
    /// `opcua-pki` beside the buffer directory. Relative to the config file.
    #[serde(default)]
    pub pki_dir: Option<PathBuf>,
    /// Trust the server's certificate the first time this device connects
    /// (recorded in `<pki_dir>/tofu/<device id>`); a later, different
    /// certificate is rejected like any other. Off by default.
    #[serde(default)]
    pub trust_on_first_use: bool,
    /// Connect to a trusted server whose certificate does not name the
    /// URL's host (a certificate made for another name or address). Trust is
    /// still required; the certificate's validity period and ApplicationUri
    /// are still checked. Off by default; warned about when it is used.
    #[serde(default)]
    pub accept_host_name_mismatch: bool,
    /// This gateway's application URI (in its certificate's SAN); default
    /// `urn:guantong:gateway:<gateway id>`.
    #[serde(default)]
    pub application_uri: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// X.509 user identity: certificate (DER or PEM) and private key (PEM).
    #[serde(default)]
    pub user_certificate_file: Option<PathBuf>,
    #[serde(default)]
    pub user_private_key_file: Option<PathBuf>,
    #[serde(default)]
    pub mode: Mode,
    /// Subscription mode: how often the server sends what changed.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub publishing_interval: Duration,
    /// Subscription mode: a tag whose value did not change for a
    /// publishing interval gets that value again, stamped now (see
    /// `Hold`), so ingest counts it alive; on by default.
    #[serde(default = "default_true")]
    pub repeat_unchanged: bool,
    /// Subscription mode: how often the server samples each node; 0s asks
    /// for the server's fastest rate (exception-based on many servers).
    #[serde(default, with = "humantime_serde")]
    pub sampling_interval: Duration,
    /// Values the server queues per item between publishes; default enough
    /// for every sample of one publishing interval (see README).
    #[serde(default)]
    pub queue_size: Option<u32>,
    #[serde(default)]
    pub deadband: Deadband,
    /// Absolute: in the value's unit; percent: of the node's EURange.
    #[serde(default)]
    pub deadband_value: f64,
    /// Poll mode: Read interval.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Which timestamp becomes the point's time; the other is the fallback,
    /// then the arrival time.
    #[serde(default)]
    pub timestamp: TimestampChoice,
    /// A Read of the server state this often; `keep_alive_failures` failed
    /// in a row and the session is declared dead.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive_interval: Duration,
    #[serde(default = "default_keep_alive_failures")]
    pub keep_alive_failures: u32,
    /// A subscription without a publish response (data or keep-alive
    /// notification) for this many of its keep-alive periods, while the
    /// session answers, is stalled: its tags are marked Bad and the session
    /// is opened again with new subscriptions.
    #[serde(default = "crate::liveness::default_stall_intervals")]
    pub stall_intervals: std::num::NonZeroU32,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(default = "default_session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Longest wait between reconnect attempts (backoff doubles up to this).
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Monitored items created (or nodes read) per request; default: the
    /// server's OperationLimits, else 1000.
    #[serde(default)]
    pub max_items_per_call: Option<u32>,
    #[serde(skip)]
    pub tags: Vec<OpcUaTagConfig>,
    /// Read from the server at start-up (see `identify_all`).
    #[serde(skip)]
    pub identity: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcUaTagConfig {
    pub name: String,
    /// The node, e.g. `ns=2;s=Line1.Temp` or `nsu=urn:plc;i=1001`.
    pub node: String,
    #[serde(rename = "type", default)]
    pub data_type: ValueType,
    #[serde(default)]
    pub unit: String,
    /// Overrides of the device's subscription settings for this tag.
    #[serde(default, with = "humantime_serde")]
    pub sampling_interval: Option<Duration>,
    #[serde(default)]
    pub queue_size: Option<u32>,
    #[serde(default)]
    pub deadband: Option<Deadband>,
    #[serde(default)]
    pub deadband_value: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityPolicyChoice {
    /// The endpoint the server rates most secure (its SecurityLevel) among
    /// the policies this gateway supports.
    #[default]
    Best,
    None,
    Basic256sha256,
    #[serde(rename = "aes128_sha256_rsaoaep")]
    Aes128Sha256RsaOaep,
    #[serde(rename = "aes256_sha256_rsapss")]
    Aes256Sha256RsaPss,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityModeChoice {
    /// SignAndEncrypt if offered, else Sign (None only with policy none).
    #[default]
    Best,
    None,
    Sign,
    SignAndEncrypt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Subscription,
    Poll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Deadband {
    #[default]
    None,
    Absolute,
    Percent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampChoice {
    #[default]
    Source,
    Server,
}

/// A configured node: the namespace as written (index or URI) and the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    pub namespace: Namespace,
    /// `i=..`, `s=..`, `g=..` or `b=..`.
    pub identifier: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespace {
    Index(u16),
    Uri(String),
}

impl NodeAddress {
    pub fn parse(text: &str) -> Result<NodeAddress, String> {
        let bad = || {
            format!(
                "`{text}` is not a NodeId, expected e.g. `ns=2;s=Line1.Temp`, `ns=3;i=1001`, `nsu=urn:plc;s=Temp`, `ns=2;g=<guid>` or `ns=2;b=<base64>`"
            )
        };
        let (namespace, identifier) = if let Some(rest) = text.strip_prefix("nsu=") {
            // A URI may itself contain `;` only rarely; the identifier starts
            // at the last `;` followed by a type letter and `=`.
            let split = rest
                .match_indices(';')
                .map(|(i, _)| i)
                .find(|&i| {
                    let t = &rest[i + 1..];
                    t.len() >= 2 && matches!(&t[..2], "i=" | "s=" | "g=" | "b=")
                })
                .ok_or_else(bad)?;
            let uri = &rest[..split];
            if uri.is_empty() {
                return Err(bad());
            }
            (Namespace::Uri(uri.to_string()), &rest[split + 1..])
        } else if let Some(rest) = text.strip_prefix("ns=") {
            let (idx, id) = rest.split_once(';').ok_or_else(bad)?;
            (Namespace::Index(idx.parse().map_err(|_| bad())?), id)
        } else {
            (Namespace::Index(0), text)
        };
        // The identifier's own syntax (numeric range, GUID, base64) is
        // checked by the OPC UA library's parser.
        NodeId::from_str(&format!("ns=0;{identifier}")).map_err(|_| bad())?;
        Ok(NodeAddress {
            namespace,
            identifier: identifier.to_string(),
        })
    }

    /// The NodeId once the namespace index is known.
    pub fn with_index(&self, index: u16) -> NodeId {
        NodeId::from_str(&format!("ns={index};{}", self.identifier))
            .expect("identifier checked when the config was loaded")
    }
}

impl crate::protocol::DeviceProtocol for OpcUaConfig {
    fn name(&self) -> &'static str {
        "opcua"
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn tag_count(&self) -> usize {
        self.tags.len()
    }
    fn manifest(&self, device_index: u32) -> (Device, Vec<Tag>) {
        OpcUaConfig::manifest(self, device_index)
    }
    /// A subscription is silent while values do not change: never by silence.
    fn stale_after(&self) -> Option<Duration> {
        None
    }
    fn finish(&mut self, gateway_id: &str, base_dir: &Path, buffer_dir: &Path) {
        self.resolve_paths(base_dir, buffer_dir);
        self.application_uri
            .get_or_insert_with(|| format!("urn:guantong:gateway:{gateway_id}"));
    }
}

impl OpcUaConfig {
    /// Queue size for an item sampled at `sampling`: every sample of one
    /// publishing interval, twice over (a publish can be late), at least 2;
    /// 100 when the server samples at its own fastest rate (every change).
    pub fn queue_size_for(&self, tag: &OpcUaTagConfig) -> u32 {
        if let Some(q) = tag.queue_size.or(self.queue_size) {
            return q;
        }
        let sampling = tag.sampling_interval.unwrap_or(self.sampling_interval);
        if sampling.is_zero() {
            return 100;
        }
        let per_publish = self.publishing_interval.as_secs_f64() / sampling.as_secs_f64();
        (per_publish.ceil() as u32).saturating_mul(2).max(2)
    }

    pub fn interval(&self) -> Duration {
        match self.mode {
            Mode::Subscription => self.publishing_interval,
            Mode::Poll => self.poll_interval,
        }
    }

    pub fn manifest(&self, device_index: u32) -> (Device, Vec<Tag>) {
        let device = Device {
            id: self.id.clone(),
            protocol: "opcua".into(),
            endpoint: self.url.clone(),
            identity: self.identity.clone().into_iter().collect(),
        };
        let tags = self
            .tags
            .iter()
            .map(|t| Tag {
                device: device_index,
                name: t.name.clone(),
                address: t.node.clone(),
                data_type: t.data_type.wire() as i32,
                unit: t.unit.clone(),
                interval_ms: self.interval().as_millis() as u64,
            })
            .collect();
        (device, tags)
    }

    /// Resolves relative paths against the config file's directory; the PKI
    /// directory defaults to `opcua-pki` beside the buffer directory.
    pub(crate) fn resolve_paths(&mut self, base_dir: &Path, buffer_dir: &Path) {
        let pki = self
            .pki_dir
            .take()
            .unwrap_or_else(|| buffer_dir.parent().unwrap_or(buffer_dir).join("opcua-pki"));
        self.pki_dir = Some(if pki.is_relative() {
            base_dir.join(pki)
        } else {
            pki
        });
        for p in [
            &mut self.user_certificate_file,
            &mut self.user_private_key_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base_dir.join(&*p);
            }
        }
    }

    pub fn pki_dir(&self) -> &Path {
        self.pki_dir
            .as_deref()
            .expect("resolved when the config was loaded")
    }
}

impl ValueType {
    pub fn is_numeric(self) -> bool {
        !matches!(self, ValueType::String)
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_true() -> bool {
    true
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(5)
}
fn default_keep_alive_failures() -> u32 {
    2
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_session_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

/// Parses one `protocol = "opcua"` device (its `protocol` key already
/// removed), recording problems under `path`.
pub(crate) fn parse(
    path: &str,
    mut table: toml::Table,
    problems: &mut Problems,
) -> Option<OpcUaConfig> {
    let raw_tags = table.remove("tags");
    let device = problems.parse::<OpcUaConfig>(path, toml::Value::Table(table));
    let tags =
        problems.parse_required_tags(path, raw_tags, |tag_path, tag: OpcUaTagConfig, problems| {
            check_id(problems, &format!("{tag_path}.name"), &tag.name);
            if let Err(e) = NodeAddress::parse(&tag.node) {
                problems.push(format!("{tag_path}.node"), e);
            }
            Some((tag_path.to_string(), tag))
        });
    let mut device = device?;
    let at = |key: &str| format!("{path}.{key}");
    check_id(problems, &at("id"), &device.id);
    if let Err(e) = check_url(&device.url) {
        problems.push(at("url"), e);
    }
    use SecurityModeChoice as M;
    use SecurityPolicyChoice as P;
    match (device.security_policy, device.security_mode) {
        (P::None, M::Sign | M::SignAndEncrypt) => problems.push(
            at("security_mode"),
            "policy `none` neither signs nor encrypts; expected `none` (or choose a policy)",
        ),
        (P::Basic256sha256 | P::Aes128Sha256RsaOaep | P::Aes256Sha256RsaPss, M::None) => problems
            .push(
                at("security_mode"),
                "a secured policy needs `sign` or `sign_and_encrypt`",
            ),
        _ => {}
    }
    if device.password.is_some() != device.username.is_some() {
        problems.push(at("username"), "`username` and `password` go together");
    }
    if device.user_certificate_file.is_some() != device.user_private_key_file.is_some() {
        problems.push(
            at("user_certificate_file"),
            "`user_certificate_file` and `user_private_key_file` go together",
        );
    }
    if device.username.is_some() && device.user_certificate_file.is_some() {
        problems.push(
            at("user_certificate_file"),
            "choose one user identity: `username` or `user_certificate_file`",
        );
    }
    if let Some(uri) = &device.application_uri
        && !uri.contains(':')
    {
        problems.push(
            at("application_uri"),
            format!("`{uri}` is not a URI, expected e.g. `urn:guantong:gateway:gw-1`"),
        );
    }
    for (key, d, min) in [
        ("publishing_interval", device.publishing_interval, 10),
        ("poll_interval", device.poll_interval, 10),
        ("keep_alive_interval", device.keep_alive_interval, 100),
        ("request_timeout", device.request_timeout, 100),
        ("session_timeout", device.session_timeout, 1000),
        ("max_backoff", device.max_backoff, 100),
    ] {
        if d < Duration::from_millis(min) {
            problems.push(at(key), format!("expected at least {min}ms"));
        }
    }
    if device.keep_alive_failures == 0 {
        problems.push(at("keep_alive_failures"), "expected at least 1");
    }
    if device.max_items_per_call == Some(0) {
        problems.push(at("max_items_per_call"), "expected at least 1");
    }
    check_deadband(
        problems,
        path,
        Some(device.deadband),
        Some(device.deadband_value),
    );
    if device.mode == Mode::Poll {
        let set = [
            ("queue_size", device.queue_size.is_some()),
            ("deadband", device.deadband != Deadband::None),
        ];
        for (key, set) in set {
            if set {
                problems.push(at(key), "only used with `mode = \"subscription\"`");
            }
        }
    }
    let mut names = HashSet::new();
    for (tag_path, tag) in &tags {
        if !names.insert(tag.name.as_str()) {
            problems.push(
                format!("{tag_path}.name"),
                format!("duplicate tag name `{}`", tag.name),
            );
        }
        check_deadband(problems, tag_path, tag.deadband, tag.deadband_value);
        if tag.queue_size == Some(0) {
            problems.push(format!("{tag_path}.queue_size"), "expected at least 1");
        }
        let deadband = tag.deadband.unwrap_or(device.deadband);
        if deadband != Deadband::None && !tag.data_type.is_numeric() {
            problems.push(
                format!("{tag_path}.deadband"),
                "a deadband needs a numeric `type`",
            );
        }
        if device.mode == Mode::Poll
            && (tag.sampling_interval.is_some()
                || tag.queue_size.is_some()
                || tag.deadband.is_some()
                || tag.deadband_value.is_some())
        {
            problems.push(
                tag_path.clone(),
                "`sampling_interval`, `queue_size` and `deadband` are only used with `mode = \"subscription\"`",
            );
        }
    }
    if device.queue_size == Some(0) {
        problems.push(at("queue_size"), "expected at least 1");
    }
    device.tags = tags.into_iter().map(|(_, t)| t).collect();
    Some(device)
}

fn check_deadband(problems: &mut Problems, path: &str, kind: Option<Deadband>, value: Option<f64>) {
    let Some(v) = value else { return };
    if !v.is_finite() || v < 0.0 {
        problems.push(
            format!("{path}.deadband_value"),
            "expected a number of 0 or more",
        );
    } else if kind == Some(Deadband::Percent) && v > 100.0 {
        problems.push(
            format!("{path}.deadband_value"),
            "a percent deadband is at most 100",
        );
    }
}

/// Whether `url` is an `opc.tcp://host:port[/path]` URL.
pub fn check_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("opc.tcp://") else {
        return Err(format!(
            "`{url}` is not an OPC UA URL, expected `opc.tcp://host:port[/path]`"
        ));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.starts_with(':') {
        return Err(format!("`{url}` has no host"));
    }
    if let Some((_, port)) = authority.rsplit_once(':')
        && !authority.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Err(format!("`{port}` in `{url}` is not a port number"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_four_identifier_types_and_namespace_uris() {
        let a = NodeAddress::parse("ns=2;s=Line1.Temp").expect("string id");
        assert_eq!(a.namespace, Namespace::Index(2));
        assert_eq!(a.with_index(2).to_string(), "ns=2;s=Line1.Temp");
        assert!(NodeAddress::parse("i=2258").is_ok());
        assert!(NodeAddress::parse("ns=1;g=09087e75-8e5e-499b-954f-f2a9603db28a").is_ok());
        assert!(NodeAddress::parse("ns=1;b=M/RbKBsRVkePCePcx24oRA==").is_ok());
        let u = NodeAddress::parse("nsu=urn:factory:plc;s=A;B").expect("uri");
        assert_eq!(u.namespace, Namespace::Uri("urn:factory:plc".into()));
        assert_eq!(u.identifier, "s=A;B");
        for bad in ["ns=x;i=1", "ns=2;q=1", "ns=2;i=abc", "nsu=;s=a", "hello"] {
            assert!(NodeAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn checks_urls() {
        assert!(check_url("opc.tcp://127.0.0.1:4840/").is_ok());
        assert!(check_url("opc.tcp://plc").is_ok());
        assert!(check_url("http://plc").is_err());
        assert!(check_url("opc.tcp://plc:x/").is_err());
    }
}
