//! Configuration from ingest ("cloud configuration").
//!
//! # Design
//! The gateway's configuration is its local file plus, once ingest has sent
//! one, a cloud document: TOML holding `[[devices]]` only, numbered by ingest.
//! The effective configuration is the local file with its devices replaced by
//! the cloud's ([`Source`]). SIGHUP and offers from ingest both read it through
//! `Source` and apply through the one `Reloader`, one request at a time, so
//! two changes never interleave and a refused one leaves the running
//! configuration as it was.
//!
//! # Invariants
//! - `[gateway]` (identity), `[uplink]` (credentials), `[buffer]` (where the
//!   data lives) and `[status]` never come from the cloud: a document naming
//!   them, or any key but `devices`, is refused whole ([`cloud_devices`]).
//! - The same rules judge a document at ingest ([`check_cloud`]) and at the
//!   gateway (`Config::parse` of the merged text); at ingest relative paths
//!   resolve nowhere, so a document must be self-contained (no `template`
//!   files, no `password_file`).
//! - An applied document is kept in `remote-config.toml` in the buffer
//!   directory, written after the reload applied it (temporary file, fsync,
//!   rename): a restart runs it again. If the process dies in between, the
//!   older version runs after the restart and ingest offers the new one again.
//! - Every offer is answered with a `ConfigResult`; an offer of the version
//!   running is answered `applied` (the reload finds nothing changed).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use guantong_proto::v1::{ConfigOffer, ConfigProblem, ConfigResult};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::config::{Config, ConfigError, Problem};
use crate::reload::{Outcome, Reloader};

/// The applied cloud document, in the buffer directory.
pub const FILE: &str = "remote-config.toml";
/// Its first line, before the version number.
const HEADER: &str = "# guantong cloud configuration, version ";

/// Top-level keys that are set only in the local file, and why.
const LOCAL_ONLY: &[(&str, &str)] = &[
    ("gateway", "the gateway's identity"),
    ("uplink", "the credentials to reach ingest"),
    ("buffer", "where the data is kept"),
    ("status", "the local status listener"),
];

/// A cloud document and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudConfig {
    pub version: u64,
    pub text: String,
}

fn problem(path: &str, message: String) -> Vec<Problem> {
    vec![Problem {
        path: path.into(),
        message,
    }]
}

fn parse_table(text: &str, what: &str) -> Result<toml::Table, Vec<Problem>> {
    text.parse::<toml::Table>().map_err(|e| {
        problem(
            "",
            format!("{what} is not valid TOML: {}", e.to_string().trim_end()),
        )
    })
}

/// The `devices` of a cloud document, or every key it may not hold.
pub fn cloud_devices(text: &str) -> Result<toml::Value, Vec<Problem>> {
    let mut table = parse_table(text, "the cloud configuration")?;
    let problems: Vec<Problem> = table
        .keys()
        .filter(|k| *k != "devices")
        .map(|k| {
            let message = match LOCAL_ONLY.iter().find(|(name, _)| name == k) {
                Some((_, what)) => format!(
                    "`[{k}]` ({what}) is set only in the gateway's local file, never from the cloud"
                ),
                None => format!("`{k}`: a cloud configuration holds `[[devices]]` only"),
            };
            Problem {
                path: k.clone(),
                message,
            }
        })
        .collect();
    if !problems.is_empty() {
        return Err(problems);
    }
    match table.remove("devices") {
        Some(d @ toml::Value::Array(_)) => Ok(d),
        Some(_) => Err(problem(
            "devices",
            "must be a list of `[[devices]]` tables".into(),
        )),
        None => Ok(toml::Value::Array(Vec::new())),
    }
}

/// `local` (a config file's text) with its devices replaced by those of the
/// cloud document `cloud`.
pub fn merge(local: &str, cloud: &str) -> Result<String, Vec<Problem>> {
    let devices = cloud_devices(cloud)?;
    let mut table = parse_table(local, "the local file")?;
    table.insert("devices".into(), devices);
    toml::to_string(&table).map_err(|e| problem("", format!("cannot write it back as TOML: {e}")))
}

/// Checks a cloud document by the gateway's rules, as ingest does before it
/// stores one: returns its number of devices.
pub fn check_cloud(text: &str) -> Result<usize, Vec<Problem>> {
    const LOCAL: &str = "[gateway]\nid = \"cloud-check\"\n\n[uplink]\nendpoint = \"https://ingest.invalid:7701\"\ntoken = \"cloud-check\"\n\n[buffer]\ndir = \"buffer\"\n";
    let merged = merge(LOCAL, text)?;
    // Relative paths resolve where nothing is: a document is self-contained.
    let nowhere = Path::new("/nonexistent/guantong-cloud-check");
    Config::parse(&merged, nowhere).map(|c| c.devices.len())
}

/// Where the gateway's configuration comes from: its local file and the
/// cloud document it runs (if any).
pub struct Source {
    path: PathBuf,
    /// The buffer directory, which keeps the applied cloud document.
    dir: PathBuf,
    cloud: Mutex<Option<CloudConfig>>,
}

impl Source {
    /// The configuration to start with: the local file at `path` with the
    /// kept cloud document when it still validates (otherwise the local file
    /// alone, with a warning naming the problems).
    pub fn start(path: &Path) -> Result<(Arc<Source>, Config), ConfigError> {
        let local = Config::load(path)?;
        let source = Source {
            path: path.to_path_buf(),
            dir: local.buffer.dir.clone(),
            cloud: Mutex::new(None),
        };
        let kept = match source.read_kept() {
            Ok(kept) => kept,
            Err(e) => {
                warn!(file = %source.kept_path().display(), error = %e, "cannot read the kept cloud configuration; running the local file alone");
                None
            }
        };
        let config = match kept {
            None => local,
            Some(cloud) => match source.load_with(Some(&cloud)) {
                Ok(config) => {
                    info!(
                        version = cloud.version,
                        "running the kept cloud configuration"
                    );
                    *source.lock() = Some(cloud);
                    config
                }
                Err(problems) => {
                    for p in &problems {
                        warn!(version = cloud.version, key = %p.path, problem = %p.message, "kept cloud configuration refused");
                    }
                    local
                }
            },
        };
        Ok((Arc::new(source), config))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<CloudConfig>> {
        self.cloud.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The local file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cloud version running (0: none).
    pub fn version(&self) -> u64 {
        self.lock().as_ref().map_or(0, |c| c.version)
    }

    /// The effective configuration now (for SIGHUP).
    pub fn load(&self) -> Result<Config, Vec<Problem>> {
        let cloud = self.lock().clone();
        self.load_with(cloud.as_ref())
    }

    /// The local file with `cloud`'s devices (or alone).
    fn load_with(&self, cloud: Option<&CloudConfig>) -> Result<Config, Vec<Problem>> {
        let Some(cloud) = cloud else {
            return Config::load(&self.path).map_err(|e| e.problems);
        };
        let local = std::fs::read_to_string(&self.path)
            .map_err(|e| problem("", format!("cannot read {}: {e}", self.path.display())))?;
        let merged = merge(&local, &cloud.text)?;
        Config::parse(&merged, self.path.parent().unwrap_or(Path::new(".")))
    }

    fn kept_path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    fn read_kept(&self) -> std::io::Result<Option<CloudConfig>> {
        let text = match std::fs::read_to_string(self.kept_path()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
        let version = first
            .strip_prefix(HEADER)
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("its first line is not `{HEADER}N`"),
                )
            })?;
        Ok(Some(CloudConfig {
            version,
            text: rest.to_string(),
        }))
    }

    /// Keeps `cloud` as the document running: on disk first, atomically.
    fn keep(&self, cloud: CloudConfig) -> std::io::Result<()> {
        let path = self.kept_path();
        let tmp = path.with_extension("toml.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        write!(f, "{HEADER}{}\n{}", cloud.version, cloud.text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        *self.lock() = Some(cloud);
        Ok(())
    }
}

/// What the uplink needs to carry offers and results.
#[derive(Clone)]
pub struct Link {
    pub source: Arc<Source>,
    pub offers: mpsc::Sender<ConfigOffer>,
    /// The latest result, sent to ingest when it changes.
    pub results: watch::Receiver<Option<ConfigResult>>,
}

/// The link for the uplink and the task that serves offers through `reloader`.
pub fn link(
    source: Arc<Source>,
    reloader: Reloader,
) -> (Link, impl std::future::Future<Output = ()> + Send) {
    let (offers_tx, offers) = mpsc::channel(8);
    let (results_tx, results) = watch::channel(None);
    let link = Link {
        source: source.clone(),
        offers: offers_tx,
        results,
    };
    (link, serve(source, reloader, offers, results_tx))
}

/// Applies offers one at a time until the gateway stops.
async fn serve(
    source: Arc<Source>,
    reloader: Reloader,
    mut offers: mpsc::Receiver<ConfigOffer>,
    results: watch::Sender<Option<ConfigResult>>,
) {
    while let Some(offer) = offers.recv().await {
        let cloud = CloudConfig {
            version: offer.version,
            text: offer.toml,
        };
        info!(version = cloud.version, "cloud configuration offered");
        let config = source.load_with(Some(&cloud));
        let label = format!("cloud configuration v{}", cloud.version);
        let version = cloud.version;
        let result = match reloader.reload(label, config).await {
            None => return,
            Some(Outcome::Applied {
                manifest_version, ..
            })
            | Some(Outcome::Unchanged { manifest_version }) => {
                if let Err(e) = source.keep(cloud) {
                    warn!(version, error = %e, "applied, but cannot keep it for the next start");
                }
                ConfigResult {
                    version,
                    applied: true,
                    manifest_version,
                    problems: Vec::new(),
                }
            }
            Some(Outcome::Refused(problems)) => ConfigResult {
                version,
                applied: false,
                manifest_version: 0,
                problems: problems
                    .into_iter()
                    .map(|p| ConfigProblem {
                        path: p.path,
                        message: p.message,
                    })
                    .collect(),
            },
        };
        results.send_replace(Some(result));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEVICE: &str = "[[devices]]\nid = \"press-01\"\nprotocol = \"modbus-tcp\"\nhost = \"127.0.0.1\"\nport = 502\nunit = 1\npoll_interval = \"1s\"\n\n[[devices.tags]]\nname = \"count\"\ntable = \"holding\"\naddress = 0\ntype = \"u16\"\n";

    #[test]
    fn a_cloud_document_holds_devices_only_and_is_judged_by_the_gateway_rules() {
        assert_eq!(check_cloud(DEVICE).ok(), Some(1));
        assert_eq!(check_cloud("").ok(), Some(0));
        let e =
            check_cloud(&format!("[uplink]\ntoken = \"stolen\"\n{DEVICE}")).expect_err("uplink");
        assert_eq!(e[0].path, "uplink");
        assert!(e[0].message.contains("local file"), "{e:?}");
        let e = check_cloud(&DEVICE.replace("u16", "u17")).expect_err("bad type");
        assert!(e[0].path.starts_with("devices[0].tags[0]"), "{e:?}");
        let e = check_cloud("devices = 3").expect_err("not tables");
        assert_eq!(e[0].path, "devices");
        let e = check_cloud("[[devices").expect_err("not TOML");
        assert!(e[0].message.contains("not valid TOML"), "{e:?}");
    }

    #[test]
    fn the_effective_config_is_the_local_file_with_the_clouds_devices_kept_across_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.toml");
        let local = format!(
            "[gateway]\nid = \"gw\"\n\n[uplink]\nendpoint = \"http://127.0.0.1:1\"\nplaintext = true\ntoken = \"t\"\n\n[buffer]\ndir = \"{}\"\n\n{}",
            dir.path().join("buffer").display(),
            DEVICE.replace("press-01", "local-01")
        );
        std::fs::write(&path, local).expect("write");
        std::fs::create_dir_all(dir.path().join("buffer")).expect("dir");
        let (source, config) = Source::start(&path).expect("start");
        assert_eq!(config.devices[0].id(), "local-01");
        assert_eq!(source.version(), 0);
        let cloud = CloudConfig {
            version: 3,
            text: DEVICE.into(),
        };
        let merged = source.load_with(Some(&cloud)).expect("merged");
        assert_eq!(merged.devices[0].id(), "press-01");
        assert_eq!(merged.gateway.id, "gw");
        source.keep(cloud).expect("keep");
        let (again, config) = Source::start(&path).expect("restart");
        assert_eq!(again.version(), 3);
        assert_eq!(config.devices[0].id(), "press-01");
        assert_eq!(again.load().expect("sighup").devices[0].id(), "press-01");
    }
}
