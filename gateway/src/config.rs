//! Gateway configuration: TOML in, validated `Config` out.
//!
//! Design: the file is parsed into a TOML tree first, then each section, each
//! device and each tag is deserialized on its own through `serde_path_to_error`,
//! so one run reports every problem at once, each with the file, the key path
//! (`devices[1].tags[0].type`) and what was expected. Unknown keys are errors.
//! Semantic checks (duplicate ids, register ranges) run afterwards and add to
//! the same list. Loading never panics: every failure is a `ConfigError`.
//!
//! Relative paths (the buffer directory) are resolved against the directory of
//! the config file, so a config means the same thing from any working directory.
//!
//! Memory: a TOML tree costs ~2 KB per small table, so a config with 100,000
//! inline tags would take ~270 MB as one tree. The text is therefore cut at
//! each top-level `[[devices]]` header (`split_devices`) and every device is
//! parsed, converted and dropped on its own: the peak is one device's tree.
//! Any piece that does not parse on its own sends the whole text through the
//! one-tree path, whose problems (with line numbers) are the ones reported;
//! a clean cut gives the same config as the one-tree path.

use std::collections::HashSet;
use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The whole gateway configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: GatewaySection,
    pub uplink: UplinkConfig,
    pub buffer: BufferConfig,
    pub status: StatusConfig,
    pub devices: Vec<DeviceConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// Stable identity of this gateway, as registered with ingest.
    pub id: String,
    /// The signing key file (created at first start); default
    /// `gateway.key` beside the buffer directory.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The signing algorithm of the evidence chain: `ed25519` (default) or
    /// `sm2` (SM2 with SM3, the national algorithms).
    #[serde(default)]
    pub key_algorithm: KeyAlgorithm,
}

impl GatewaySection {
    /// Makes `key_file` absolute: relative to the config's directory, by
    /// default `gateway.key` beside the buffer directory (`buffer_dir`,
    /// already absolute).
    fn resolve_key_file(&mut self, base_dir: &Path, buffer_dir: &Path) {
        let key_file = match self.key_file.take() {
            Some(k) if k.is_relative() => base_dir.join(k),
            Some(k) => k,
            None => buffer_dir
                .parent()
                .unwrap_or(buffer_dir)
                .join("gateway.key"),
        };
        self.key_file = Some(key_file);
    }

    /// Reads only what `identity` needs from a config file: `[gateway]` and
    /// `[buffer] dir` (for the default key file). The rest may be unfinished,
    /// above all the uplink token, which registering this identity yields.
    pub fn load_for_identity(path: &Path) -> Result<GatewaySection, ConfigError> {
        let fail = |problems: Vec<Problem>| ConfigError {
            file: path.to_path_buf(),
            problems,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            fail(vec![Problem {
                path: String::new(),
                message: format!("cannot read the file: {e}"),
            }])
        })?;
        let mut root: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            fail(vec![Problem {
                path: String::new(),
                message: format!("not valid TOML: {}", e.to_string().trim_end()),
            }])
        })?;
        #[derive(Deserialize)]
        struct BufferDir {
            dir: PathBuf,
        }
        let mut problems = Problems::default();
        let mut section = |name: &str, problems: &mut Problems| {
            let v = root.remove(name);
            if v.is_none() {
                problems.push("", format!("missing section `[{name}]`"));
            }
            v
        };
        let gateway = section("gateway", &mut problems)
            .and_then(|v| problems.parse::<GatewaySection>("gateway", v));
        let buffer = section("buffer", &mut problems).and_then(|v| {
            let dir = v.get("dir").cloned();
            let mut t = toml::Table::new();
            if let Some(dir) = dir {
                t.insert("dir".into(), dir);
            }
            problems.parse::<BufferDir>("buffer", toml::Value::Table(t))
        });
        if let Some(g) = &gateway {
            check_id(&mut problems, "gateway.id", &g.id);
        }
        match (gateway, buffer) {
            (Some(mut gateway), Some(buffer)) if problems.0.is_empty() => {
                let base_dir = path.parent().unwrap_or(Path::new("."));
                gateway.resolve_key_file(base_dir, &base_dir.join(buffer.dir));
                Ok(gateway)
            }
            _ => Err(fail(problems.0)),
        }
    }
}

/// `[gateway] key_algorithm`: see `guantong_proto::chain::Algorithm`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyAlgorithm {
    #[default]
    Ed25519,
    Sm2,
}

impl From<KeyAlgorithm> for guantong_proto::chain::Algorithm {
    fn from(a: KeyAlgorithm) -> Self {
        match a {
            KeyAlgorithm::Ed25519 => guantong_proto::chain::Algorithm::Ed25519,
            KeyAlgorithm::Sm2 => guantong_proto::chain::Algorithm::Sm2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Ingest gRPC endpoint, e.g. `https://ingest.example.com:7600`; or
    /// `endpoints`, several (exactly one of the two). Resolved at load:
    /// `endpoints` holds this one too.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Ingest endpoints in the order the uplink tries them (see `uplink`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Token printed by `guantong-ingest register-gateway`; or read from
    /// `token_file` or the environment variable `token_env` (exactly one of
    /// the three). Resolved at load: this holds the token itself.
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub token_env: Option<String>,
    /// Allow an `http://` endpoint: no TLS, token and data in clear. For
    /// local testing only; warned about at every start.
    #[serde(default)]
    pub plaintext: bool,
    /// CA certificate (PEM) ingest's certificate is checked against, e.g.
    /// `<ingest data>/tls/ca.pem`; default the system's trusted roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS, from
    /// `guantong-ingest ca issue`. Read at every connection, so replaced
    /// files take effect without a restart.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Name expected in ingest's certificate when it differs from the
    /// endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Batches sent but not yet acknowledged, at most.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: NonZeroU32,
    /// Points per batch, at most.
    #[serde(default = "default_max_batch_points")]
    pub max_batch_points: NonZeroU32,
    /// Time allowed to establish a connection.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait between reconnect attempts (backoff doubles up to this).
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Compression of batches on the wire.
    #[serde(default)]
    pub compression: Compression,
    /// HTTP/2 keepalive ping interval; with `keepalive_timeout` it bounds how
    /// long a dead link (no RST) goes unnoticed.
    #[serde(default = "default_keepalive_interval", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    Zstd,
    Gzip,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Directory holding the buffer file; relative to the config file.
    pub dir: PathBuf,
    /// Bytes of buffered data, at most; the oldest unsent data is dropped
    /// (and reported upstream as a loss) when it is reached.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: bytesize::ByteSize,
    /// How often collected points are committed to disk: the most a power cut
    /// or SIGKILL can lose.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// What happens when `max_bytes` is reached.
    #[serde(default)]
    pub when_full: crate::buffer::WhenFull,
    /// Unsent data older than this is dropped and reported as a loss.
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
}

/// `[status]`: the status page, `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Address of the status listener; `""` turns it off. Anything but a
    /// loopback address is warned about: the page has no login.
    #[serde(default = "default_status_listen")]
    pub listen: String,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            listen: default_status_listen(),
        }
    }
}

fn default_status_listen() -> String {
    "127.0.0.1:7700".into()
}

pub use crate::protocol::{DeviceConfig, PROTOCOLS};

fn default_max_in_flight() -> NonZeroU32 {
    NonZeroU32::new(128).expect("128 is not zero")
}
fn default_keepalive_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_age() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}
fn default_max_batch_points() -> NonZeroU32 {
    NonZeroU32::new(10_000).expect("10000 is not zero")
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_max_bytes() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(512)
}
fn default_commit_interval() -> Duration {
    Duration::from_millis(200)
}

/// One problem found in a config: where, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path, e.g. `devices[0].tags[2].type`; empty for the whole file.
    pub path: String,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "{}: {n} problem{}",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            if p.path.is_empty() {
                writeln!(f, "  {}: {}", self.file.display(), p.message)?;
            } else {
                writeln!(f, "  {}: {}: {}", self.file.display(), p.path, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Collects problems while walking the TOML tree.
#[derive(Default)]
pub(crate) struct Problems(pub(crate) Vec<Problem>);

impl Problems {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Each problem as `path: message`.
    #[cfg(feature = "opcua")]
    pub(crate) fn messages(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    /// `parse_tags`, where a missing `tags` array is a problem.
    #[cfg(any(feature = "mqtt", feature = "opcua"))]
    pub(crate) fn parse_required_tags<T: DeserializeOwned, U>(
        &mut self,
        path: &str,
        value: Option<toml::Value>,
        check: impl FnMut(&str, T, &mut Problems) -> Option<U>,
    ) -> Vec<U> {
        match value {
            Some(value) => self.parse_tags(path, value, check),
            None => {
                self.push(
                    path,
                    "missing field `tags`, expected at least one `[[devices.tags]]`",
                );
                Vec::new()
            }
        }
    }

    /// Parses a device's `tags` array (`value`; `path` is the device's key
    /// path): each table as `T` under `path.tags[i]`, then `check` with that
    /// path, keeping what it returns.
    pub(crate) fn parse_tags<T: DeserializeOwned, U>(
        &mut self,
        path: &str,
        value: toml::Value,
        mut check: impl FnMut(&str, T, &mut Problems) -> Option<U>,
    ) -> Vec<U> {
        let toml::Value::Array(items) = value else {
            self.push(
                format!("{path}.tags"),
                format!(
                    "invalid type: {}, expected an array of tables (`[[devices.tags]]`)",
                    value.type_str()
                ),
            );
            return Vec::new();
        };
        let mut tags = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let tag_path = format!("{path}.tags[{i}]");
            if let Some(tag) = self.parse::<T>(&tag_path, item) {
                tags.extend(check(&tag_path, tag, self));
            }
        }
        tags
    }

    /// Deserializes `value` as `T`, recording the first problem inside it
    /// under `base` (the key path of `value` itself).
    pub(crate) fn parse<T: DeserializeOwned>(
        &mut self,
        base: &str,
        value: toml::Value,
    ) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Some(v),
            Err(err) => {
                let inner = err.path().to_string();
                let path = match (base.is_empty(), inner == ".") {
                    (true, _) => inner,
                    (false, true) => base.to_string(),
                    (false, false) => format!("{base}.{inner}"),
                };
                // toml appends "\nin `key`"; the path already says where.
                let message = err.into_inner().to_string();
                self.push(path, message.lines().next().unwrap_or_default().to_string());
                None
            }
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            problems: vec![Problem {
                path: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base_dir).map_err(|problems| ConfigError {
            file: path.to_path_buf(),
            problems,
        })
    }

    /// Parses config text; relative paths are resolved against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, Vec<Problem>> {
        Config::parse_with(text, base_dir, true)
    }

    /// `split`: try parsing device by device first (see the module docs).
    fn parse_with(text: &str, base_dir: &Path, split: bool) -> Result<Config, Vec<Problem>> {
        let mut problems = Problems::default();
        let (mut root, devices) = match split.then(|| split_devices(text)).flatten() {
            Some(split) => split,
            None => {
                let mut root: toml::Table = match text.parse() {
                    Ok(t) => t,
                    Err(e) => {
                        let e: toml::de::Error = e;
                        return Err(vec![Problem {
                            path: String::new(),
                            message: format!("not valid TOML: {}", e.to_string().trim_end()),
                        }]);
                    }
                };
                let devices = root.remove("devices");
                (root, DeviceTexts::Tree(devices))
            }
        };

        let mut section = |name: &str, problems: &mut Problems| match root.remove(name) {
            Some(v) => Some(v),
            None => {
                problems.push("", format!("missing section `[{name}]`"));
                None
            }
        };
        let gateway = section("gateway", &mut problems)
            .and_then(|v| problems.parse::<GatewaySection>("gateway", v));
        let uplink = section("uplink", &mut problems)
            .and_then(|v| problems.parse::<UplinkConfig>("uplink", v));
        let buffer = section("buffer", &mut problems)
            .and_then(|v| problems.parse::<BufferConfig>("buffer", v));
        let status = match root.remove("status") {
            Some(v) => problems.parse::<StatusConfig>("status", v),
            None => Some(StatusConfig::default()),
        };
        if let Some(s) = &status
            && !s.listen.is_empty()
            && s.listen.parse::<std::net::SocketAddr>().is_err()
        {
            problems.push(
                "status.listen",
                format!(
                    "`{}` is not an address, expected e.g. `127.0.0.1:7700` (or `\"\"` for none)",
                    s.listen
                ),
            );
        }
        let devices = match devices {
            DeviceTexts::Pieces(pieces) => {
                let mut devices = Vec::new();
                for (i, piece) in pieces.into_iter().enumerate() {
                    let Some(item) = one_device(piece) else {
                        return Config::parse_with(text, base_dir, false);
                    };
                    devices.extend(crate::protocol::parse_device(
                        &format!("devices[{i}]"),
                        item,
                        base_dir,
                        &mut problems,
                    ));
                }
                devices
            }
            DeviceTexts::Tree(None) => Vec::new(),
            DeviceTexts::Tree(Some(toml::Value::Array(items))) => items
                .into_iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    crate::protocol::parse_device(
                        &format!("devices[{i}]"),
                        item,
                        base_dir,
                        &mut problems,
                    )
                })
                .collect(),
            DeviceTexts::Tree(Some(other)) => {
                problems.push(
                    "devices",
                    format!(
                        "invalid type: {}, expected an array of tables (`[[devices]]`)",
                        other.type_str()
                    ),
                );
                Vec::new()
            }
        };
        for key in root.keys() {
            problems.push(
                key.clone(),
                format!("unknown section `{key}`, expected one of `gateway`, `uplink`, `buffer`, `status`, `devices`"),
            );
        }

        if let Some(g) = &gateway {
            check_id(&mut problems, "gateway.id", &g.id);
        }
        let mut uplink = uplink;
        if let Some(u) = &mut uplink {
            crate::secret::resolve_uplink(u, base_dir, &mut problems);
            resolve_endpoints(u, &mut problems);
        }
        if let Some(u) = &uplink {
            if u.keepalive_interval < Duration::from_millis(100)
                || u.keepalive_timeout < Duration::from_millis(100)
            {
                problems.push(
                    "uplink.keepalive_interval",
                    "keepalive interval and timeout must be at least 100ms",
                );
            }
            if u.token.trim().is_empty() && u.token_file.is_none() && u.token_env.is_none() {
                problems.push(
                    "uplink.token",
                    "is empty, expected the token printed by `guantong-ingest register-gateway` (or `token_file`, `token_env`)",
                );
            }
        }
        if let Some(b) = &buffer {
            if b.max_bytes.as_u64() < 1024 * 1024 {
                problems.push(
                    "buffer.max_bytes",
                    format!("{} is too small, expected at least 1 MiB", b.max_bytes),
                );
            }
            if b.max_age < Duration::from_secs(60) {
                problems.push("buffer.max_age", "expected at least 1m");
            }
            if b.commit_interval.is_zero() || b.commit_interval > Duration::from_secs(10) {
                problems.push(
                    "buffer.commit_interval",
                    "expected a duration between 1ms and 10s",
                );
            }
        }
        crate::modbus::check_lines(&devices, &mut problems);
        #[cfg(feature = "dlt645")]
        crate::dlt645::config::check_lines(&devices, &mut problems);
        let mut seen = HashSet::new();
        for (i, d) in devices.iter().enumerate() {
            if !seen.insert(d.id().to_string()) {
                problems.push(
                    format!("devices[{i}].id"),
                    format!("duplicate device id `{}`", d.id()),
                );
            }
        }
        #[cfg(feature = "mqtt")]
        check_primary_hosts(&devices, &mut problems);

        match (gateway, uplink, buffer, status) {
            (Some(gateway), Some(uplink), Some(mut buffer), Some(status))
                if problems.0.is_empty() =>
            {
                if buffer.dir.is_relative() {
                    buffer.dir = base_dir.join(&buffer.dir);
                }
                let mut gateway = gateway;
                gateway.resolve_key_file(base_dir, &buffer.dir);
                let mut devices = devices;
                for d in &mut devices {
                    d.protocol_mut().finish(&gateway.id, base_dir, &buffer.dir);
                }
                Ok(Config {
                    gateway,
                    uplink,
                    buffer,
                    status,
                    devices,
                })
            }
            _ => Err(problems.0),
        }
    }
}

/// The `devices` of a config: parsed as one tree, or one piece of text per
/// device, parsed one at a time.
enum DeviceTexts<'a> {
    Tree(Option<toml::Value>),
    Pieces(Vec<&'a str>),
}

/// Cuts `text` before every line that is exactly a `[[devices]]` header
/// (trailing comment allowed) and at the next header that is not under
/// `devices`; returns the rest, parsed, and each device's text. None when
/// there is nothing to cut or the rest does not stand alone; a device piece
/// that does not (`one_device`) also sends the caller to the one-tree path.
///
/// Why a cut is right when every piece parses: a `[[devices]]` line is valid
/// TOML only as a header or inside a multi-line string, and texts with
/// multi-line strings are not cut. A cut inside a multi-line array or inline
/// table leaves the piece before it unterminated; `devices` written another
/// way (`[[ devices ]]`, dotted keys) stays in the rest and is refused there.
fn split_devices(text: &str) -> Option<(toml::Table, DeviceTexts<'_>)> {
    if text.contains("\"\"\"") || text.contains("'''") {
        return None;
    }
    let mut rest = String::new();
    let mut pieces: Vec<&str> = Vec::new();
    let mut device_start: Option<usize> = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let header = line.trim_start();
        let header = header.split('#').next().unwrap_or_default().trim_end();
        if header.starts_with('[') {
            let is_device = header == "[[devices]]";
            let under_devices = header.starts_with("[[devices.") || header.starts_with("[devices.");
            if is_device || !under_devices {
                if let Some(start) = device_start.take() {
                    pieces.push(&text[start..offset]);
                }
                if is_device {
                    device_start = Some(offset);
                }
            } else if device_start.is_none() {
                return None;
            }
        }
        if device_start.is_none() {
            rest.push_str(line);
        }
        offset += line.len();
    }
    if let Some(start) = device_start {
        pieces.push(&text[start..]);
    }
    if pieces.is_empty() {
        return None;
    }
    let root: toml::Table = rest.parse().ok()?;
    if root.contains_key("devices") {
        return None;
    }
    Some((root, DeviceTexts::Pieces(pieces)))
}

/// The one device table of a piece cut by `split_devices`.
fn one_device(piece: &str) -> Option<toml::Value> {
    let mut table: toml::Table = piece.parse().ok()?;
    match (table.remove("devices"), table.is_empty()) {
        (Some(toml::Value::Array(mut items)), true) if items.len() == 1 => items.pop(),
        _ => None,
    }
}

/// A primary host's STATE lives in one MQTT session: two devices announcing
/// the same host on one broker would publish each other's will.
#[cfg(feature = "mqtt")]
fn check_primary_hosts(devices: &[DeviceConfig], problems: &mut Problems) {
    let mut hosts: std::collections::HashMap<(String, &str), &str> = Default::default();
    for (i, d) in devices.iter().enumerate() {
        let DeviceConfig::Mqtt(m) = d else { continue };
        let Some(host) = m.primary_host_id.as_deref() else {
            continue;
        };
        // Elsewhere the key itself is refused.
        if m.payload != crate::mqtt::config::PayloadFormat::Sparkplug {
            continue;
        }
        // An unparsable broker is reported on its own key.
        let Ok(broker) = crate::mqtt::config::BrokerAddr::parse(&m.broker) else {
            continue;
        };
        let key = (format!("{}:{}", broker.host, broker.port), host);
        let first = *hosts.entry(key).or_insert(&m.id);
        if first != m.id {
            problems.push(
                format!("devices[{i}].primary_host_id"),
                format!(
                    "`{host}` is already announced by device `{first}` on this broker; set `primary_host_id` on one device per broker"
                ),
            );
        }
    }
}

/// Resolves `uplink.endpoints` from exactly one of `endpoint` (a list of
/// one) and `endpoints`, and checks each URL under its own key
/// (`uplink.endpoints[1]`).
fn resolve_endpoints(u: &mut UplinkConfig, problems: &mut Problems) {
    let keyed: Vec<(String, String)> = match (&u.endpoint, u.endpoints.is_empty()) {
        (Some(_), false) => {
            problems.push(
                "uplink.endpoints",
                "set only one of `endpoint` and `endpoints`",
            );
            return;
        }
        (None, true) => {
            problems.push(
                "uplink.endpoint",
                "missing, expected an ingest URL such as `https://ingest.example.com:7600` (or `endpoints`, a list of them)",
            );
            return;
        }
        (Some(url), true) => vec![("uplink.endpoint".into(), url.clone())],
        (None, false) => (u.endpoints.iter().enumerate())
            .map(|(i, url)| (format!("uplink.endpoints[{i}]"), url.clone()))
            .collect(),
    };
    for (key, url) in &keyed {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            problems.push(
                key,
                format!("`{url}` is not a URL, expected e.g. `https://ingest.example.com:7600`"),
            );
        } else if url.starts_with("http://") && !u.plaintext {
            problems.push(
                key,
                format!(
                    "`{url}` has no TLS: the token and data would cross the network in clear; use `https://`, or set `plaintext = true` for local testing"
                ),
            );
        } else if url.starts_with("https://") && u.plaintext {
            problems.push(
                "uplink.plaintext",
                format!("`plaintext = true` needs an `http://` endpoint; {key} is `{url}`"),
            );
        }
    }
    u.endpoints = keyed.into_iter().map(|(_, url)| url).collect();
}

/// Checks an identifier used in ids and tag names: printable, no separators
/// that would make paths ambiguous.
pub(crate) fn check_id(problems: &mut Problems, path: &str, id: &str) {
    if id.is_empty() || id.len() > 128 {
        problems.push(path, "expected 1 to 128 characters");
    } else if id.chars().any(|c| c.is_control() || c == '/') {
        problems.push(path, format!("`{id}` contains `/` or a control character"));
    }
}

pub(crate) fn quoted(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[gateway]
id = "gw-1"
[uplink]
endpoint = "https://127.0.0.1:7600"
token = "secret"
[buffer]
dir = "buf"
max_bytes = "64 MiB"
[[devices]]
id = "meter-1"
protocol = "modbus-tcp"
host = "127.0.0.1"
port = 5020
unit = 1
poll_interval = "1s"
[[devices.tags]]
name = "voltage"
table = "holding"
address = 0
type = "f32"
"#;

    fn problems(text: &str) -> Vec<String> {
        Config::parse(text, Path::new("/etc/guantong"))
            .expect_err("config should be rejected")
            .into_iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    #[test]
    fn accepts_a_good_config_and_resolves_relative_dirs() {
        let c = Config::parse(GOOD, Path::new("/etc/guantong")).expect("valid");
        assert_eq!(c.buffer.dir, Path::new("/etc/guantong/buf"));
        assert_eq!(c.buffer.max_bytes.as_u64(), 64 * 1024 * 1024);
        assert_eq!(c.devices.len(), 1);
    }

    #[test]
    fn reports_every_problem_at_once() {
        let text = GOOD
            .replace("port = 5020", "port = \"5020\"")
            .replace("token = \"secret\"", "")
            .replace("type = \"f32\"", "type = \"f33\"");
        let p = problems(&text);
        assert_eq!(p.len(), 3, "{p:#?}");
        assert_eq!(
            p[0],
            "devices[0].port: invalid type: string \"5020\", expected u16"
        );
        assert!(
            p[1].starts_with("devices[0].tags[0].type: unknown variant `f33`, expected one of"),
            "{}",
            p[1]
        );
        assert!(p[2].starts_with("uplink.token: is empty"), "{}", p[2]);
    }

    #[test]
    fn refuses_plaintext_unless_asked_and_reads_tokens_from_files_and_env() {
        let plain = GOOD.replace("https://", "http://");
        let p = problems(&plain);
        assert!(
            p[0].starts_with("uplink.endpoint: `http://127.0.0.1:7600` has no TLS"),
            "{p:?}"
        );
        let allowed = plain.replace("token = \"secret\"", "token = \"secret\"\nplaintext = true");
        assert!(
            Config::parse(&allowed, Path::new("/"))
                .expect("valid")
                .uplink
                .plaintext
        );

        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("token"), "gt_from_file\n").expect("write");
        let from_file = GOOD.replace("token = \"secret\"", "token_file = \"token\"");
        let c = Config::parse(&from_file, dir.path()).expect("valid");
        assert_eq!(c.uplink.token, "gt_from_file");
        // A variable name no other test sets.
        let var = "GUANTONG_TEST_TOKEN_ENV_7";
        let from_env = GOOD.replace("token = \"secret\"", &format!("token_env = \"{var}\""));
        let p = problems(&from_env);
        assert_eq!(
            p,
            [format!(
                "uplink.token_env: environment variable `{var}` is not set or empty"
            )]
        );
        let both = GOOD.replace(
            "token = \"secret\"",
            "token = \"a\"\ntoken_file = \"token\"",
        );
        assert_eq!(
            problems(&both),
            ["uplink.token: set only one of `token`, `token_file` and `token_env`"]
        );
        #[cfg(feature = "mqtt")]
        {
            let mqtt = format!(
                "{}\n[[devices]]\nid = \"m\"\nprotocol = \"mqtt\"\nbroker = \"mqtt://127.0.0.1\"\n\
             username = \"u\"\npassword_file = \"token\"\n[[devices.tags]]\nname = \"t\"\ntopic = \"a\"\n",
                GOOD
            );
            let c = Config::parse(&mqtt, dir.path()).expect("valid");
            match &c.devices[1] {
                DeviceConfig::Mqtt(m) => assert_eq!(m.password.as_deref(), Some("gt_from_file")),
                _ => panic!("not mqtt"),
            }
        }
        let missing_ca = GOOD.replace(
            "token = \"secret\"",
            "token = \"a\"\nca_file = \"nope.pem\"",
        );
        assert!(
            problems(&missing_ca)[0]
                .starts_with("uplink.ca_file: cannot read /etc/guantong/nope.pem")
        );
    }

    /// `endpoint` is a list of one, `endpoints` a list: exactly one of the
    /// two, and every URL is checked under its own key.
    #[test]
    fn takes_one_endpoint_or_a_list_of_them() {
        let c = Config::parse(GOOD, Path::new("/")).expect("valid");
        assert_eq!(c.uplink.endpoints, ["https://127.0.0.1:7600"]);
        let single = "endpoint = \"https://127.0.0.1:7600\"";
        let list = GOOD.replace(
            single,
            "endpoints = [\"https://a:7600\", \"https://b:7600\"]",
        );
        let c = Config::parse(&list, Path::new("/")).expect("valid");
        assert_eq!(c.uplink.endpoints, ["https://a:7600", "https://b:7600"]);

        let both = GOOD.replace(
            single,
            &format!("{single}\nendpoints = [\"https://b:7600\"]"),
        );
        assert_eq!(
            problems(&both),
            ["uplink.endpoints: set only one of `endpoint` and `endpoints`"]
        );
        let missing = "uplink.endpoint: missing, expected an ingest URL such as `https://ingest.example.com:7600` (or `endpoints`, a list of them)";
        assert_eq!(problems(&GOOD.replace(single, "")), [missing]);
        assert_eq!(problems(&GOOD.replace(single, "endpoints = []")), [missing]);

        assert_eq!(
            problems(&list.replace("https://b", "ftp://b")),
            [
                "uplink.endpoints[1]: `ftp://b:7600` is not a URL, expected e.g. `https://ingest.example.com:7600`"
            ]
        );
        let p = problems(&list.replace("https://b", "http://b"));
        assert!(
            p.len() == 1 && p[0].starts_with("uplink.endpoints[1]: `http://b:7600` has no TLS"),
            "{p:?}"
        );
        let plaintext = list
            .replace("https://a", "http://a")
            .replace("token = \"secret\"", "token = \"secret\"\nplaintext = true");
        assert_eq!(
            problems(&plaintext),
            [
                "uplink.plaintext: `plaintext = true` needs an `http://` endpoint; uplink.endpoints[1] is `https://b:7600`"
            ]
        );
        let c = Config::parse(&plaintext.replace("https://b", "http://b"), Path::new("/"))
            .expect("valid");
        assert_eq!(c.uplink.endpoints, ["http://a:7600", "http://b:7600"]);
    }

    #[test]
    fn names_unknown_keys() {
        let p = problems(&GOOD.replace("dir = \"buf\"", "dir = \"buf\"\ndirectory = \"x\""));
        assert_eq!(
            p,
            [
                "buffer.directory: unknown field `directory`, expected one of `dir`, `max_bytes`, `commit_interval`, `when_full`, `max_age`"
            ]
        );
    }

    /// A Modbus-only build (`--no-default-features`) names what it lacks.
    #[cfg(not(feature = "mqtt"))]
    #[test]
    fn names_mqtt_when_built_without_it() {
        let text = format!(
            "{GOOD}\n[[devices]]\nid = \"m\"\nprotocol = \"mqtt\"\nbroker = \"mqtt://127.0.0.1\"\n"
        );
        assert_eq!(
            problems(&text),
            ["devices[1].protocol: this gateway was built without MQTT (the `mqtt` cargo feature)"]
        );
    }

    #[cfg(not(feature = "s7"))]
    #[test]
    fn names_s7_when_built_without_it() {
        let text =
            format!("{GOOD}\n[[devices]]\nid = \"p\"\nprotocol = \"s7\"\nhost = \"127.0.0.1\"\n");
        assert_eq!(
            problems(&text),
            ["devices[1].protocol: this gateway was built without S7 (the `s7` cargo feature)"]
        );
    }

    #[cfg(not(feature = "dlt645"))]
    #[test]
    fn names_dlt645_when_built_without_it() {
        let text = format!(
            "{GOOD}\n[[devices]]\nid = \"m\"\nprotocol = \"dlt645\"\nserial_port = \"/dev/ttyUSB0\"\nmeter = \"000000000001\"\n"
        );
        assert_eq!(
            problems(&text),
            [
                "devices[1].protocol: this gateway was built without DL/T 645 (the `dlt645` cargo feature)"
            ]
        );
    }

    /// One task owns a serial port: a meter on a Modbus line's port is
    /// refused, as is a meter address used twice on one line.
    #[cfg(feature = "dlt645")]
    #[test]
    fn a_port_has_one_owner_across_protocols() {
        let meter = |id: &str, port: &str, meter: &str| {
            format!(
                "\n[[devices]]\nid = \"{id}\"\nprotocol = \"dlt645\"\nserial_port = \"{port}\"\nmeter = \"{meter}\"\n[[devices.tags]]\nname = \"ua\"\ndi = \"02010100\"\n"
            )
        };
        let modbus = "\n[[devices]]\nid = \"pm\"\nprotocol = \"modbus-rtu\"\nserial_port = \"/dev/ttyUSB0\"\nunit = 1\n[[devices.tags]]\nname = \"v\"\naddress = 40001\ntype = \"u16\"\n";
        let text = format!(
            "{GOOD}{modbus}{}{}{}",
            meter("m1", "/dev/ttyUSB0", "000000000001"),
            meter("m2", "/dev/ttyUSB1", "000000000001"),
            meter("m3", "/dev/ttyUSB1", "000000000001"),
        );
        assert_eq!(
            problems(&text),
            [
                "devices[2]: serial /dev/ttyUSB0 is also used by Modbus device devices[1]: one line has one owner; put DL/T 645 meters and Modbus devices on separate ports",
                "devices[4].meter: meter 000000000001 is already on serial /dev/ttyUSB1",
            ]
        );
    }

    #[cfg(not(feature = "opcua"))]
    #[test]
    fn names_opcua_when_built_without_it() {
        let text = format!(
            "{GOOD}\n[[devices]]\nid = \"o\"\nprotocol = \"opcua\"\nendpoint = \"opc.tcp://127.0.0.1:4840\"\n"
        );
        assert_eq!(
            problems(&text),
            [
                "devices[1].protocol: this gateway was built without OPC UA (the `opcua` cargo feature)"
            ]
        );
    }

    #[test]
    fn rejects_duplicate_devices_and_unknown_protocols() {
        let dup = format!("{GOOD}\n[[devices]]\nid = \"meter-1\"\nprotocol = \"bacnet\"\n");
        let p = problems(&dup);
        assert_eq!(
            p,
            [
                "devices[1].protocol: unknown protocol `bacnet`, expected one of `modbus-tcp`, `modbus-rtu`, `modbus-rtu-over-tcp`, `mqtt`, `opcua`, `s7`, `dlt645`"
            ]
        );
    }

    #[test]
    fn a_duplicate_tag_is_reported_with_its_index_beside_other_errors_of_its_device() {
        let text = format!(
            "{}\n[[devices.tags]]\nname = \"voltage\"\ntable = \"holding\"\naddress = 2\ntype = \"f32\"\n",
            GOOD.replace("host = \"127.0.0.1\"\n", "")
        );
        let p = problems(&text);
        assert!(
            p.contains(&"devices[0].tags[1].name: duplicate tag name `voltage`".to_string()),
            "{p:?}"
        );
        assert!(p.len() >= 2, "the missing host is reported too: {p:?}");
    }

    #[test]
    fn identity_needs_only_the_gateway_section_not_the_token_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            GOOD.replace(
                "token = \"secret\"",
                "token_file = \"not-yet-registered.token\"",
            ),
        )?;
        assert!(
            Config::load(&path).is_err(),
            "the full config needs the token file"
        );
        let g = GatewaySection::load_for_identity(&path)?;
        assert_eq!(g.id, "gw-1");
        assert_eq!(g.key_file, Some(dir.path().join("gateway.key")));
        Ok(())
    }

    /// Parsing device by device gives what one tree gives, and falls back
    /// to one tree where a cut would be wrong.
    #[test]
    fn device_by_device_parsing_matches_the_one_tree_path() {
        let same = |text: &str| {
            let pieces = Config::parse_with(text, Path::new("/etc"), true);
            let tree = Config::parse_with(text, Path::new("/etc"), false);
            assert_eq!(format!("{pieces:?}"), format!("{tree:?}"), "{text}");
            pieces
        };
        let second = GOOD
            .split("[[devices]]")
            .nth(1)
            .expect("GOOD has a device")
            .replace("meter-1", "meter-2");
        // Devices, then a section after them, with comments on headers.
        let text = format!(
            "{}\n[[devices]] # the second\n{second}\n[gateway]\nid = \"gw-1\"\n",
            GOOD.replace("[gateway]\nid = \"gw-1\"", "")
        );
        assert_eq!(same(&text).expect("valid").devices.len(), 2);
        assert!(split_devices(&text).is_some(), "a plain config is cut");
        // A multi-line string holding header lines: not cut.
        let tricky = GOOD.replace(
            "token = \"secret\"",
            "token = \"\"\"\n[[devices]]\nid = \"x\"\n[buffer]\n\"\"\"",
        );
        let c = same(&tricky).expect("valid");
        assert!(c.uplink.token.contains("[[devices]]"));
        assert!(split_devices(&tricky).is_none());
        // Errors come from the one-tree path, with lines of the whole file.
        let broken = format!("{GOOD}\n[[devices]]\nid = \"meter-2\"\nport = \n");
        let p = same(&broken).expect_err("invalid");
        assert!(p[0].message.contains("line 25"), "{:?}", p[0]);
    }

    #[test]
    fn reports_toml_syntax_errors_without_panicking() {
        let p = problems("[gateway\nid = 1");
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with(": not valid TOML"), "{}", p[0]);
    }
}
