//! Changing the configuration while running: SIGHUP now, remote configs later.
//!
//! `Collectors` owns the running collectors and is the one entry point:
//! `apply(config)` takes a config already validated by `Config::load` or
//! `Config::parse` (the rules of `check`) and returns `Outcome::Applied`
//! (the new manifest version), `Unchanged`, or `Refused(problems)`, in which
//! case nothing changed. Callers send `ReloadRequest`s through a `Reloader`;
//! `run` serves them one at a time, so two reloads never interleave.
//!
//! Design and invariants:
//! - Collectors are the unit of restart: one per device, one per Modbus line
//!   (devices sharing a serial port or RTU-over-TCP link), named by
//!   `DeviceConfig::collector_key`. A collector is restarted when the
//!   fingerprint (SHA-256 of the parsed settings, before identification) of
//!   any of its devices changed; the others are not touched and keep polling.
//! - Samples carry slots, not manifest indices: a device keeps its slots for
//!   as long as its collector runs; a restarted one gets fresh slots. Every
//!   applied reload sends a `Switch` through the sink after the stopped
//!   collectors returned and before the new ones start, so the writer stamps
//!   everything before it with the old manifest and maps slots to the new
//!   manifest's indices after it. At start slots equal indices (no map).
//! - The new manifest is committed to the buffer (a chain link) before the
//!   switch, so no batch names a version the chain does not hold. If that
//!   commit fails, `apply` returns the error and the gateway stops, as it
//!   would at start: the supervisor restarts it with the new file.
//! - `[gateway]`, `[uplink]`, `[buffer]` and `[status]` change only at a
//!   restart: a reload that changes them is refused as a whole.
//! - A device not identified when its collector started (an OPC UA server
//!   untrusted or unreachable then) reports its identity once it connects
//!   (`Identified`); `identified` publishes it as a new manifest through the
//!   same commit and switch as a reload (`switch_to`), restarting nothing.
//!   The report names the device's first slot, so one from a collector a
//!   reload has since replaced is ignored.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::buffer::Buffer;
use crate::collector::{PointSink, Switch, UNMAPPED};
use crate::config::{Config, DeviceConfig, Problem};
use crate::status::{DeviceSpec, Status};

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new config runs; its manifest is in the chain.
    Applied {
        manifest_version: u64,
        /// Devices whose collectors were (re)started.
        restarted: Vec<String>,
    },
    /// The config is the one running.
    Unchanged { manifest_version: u64 },
    /// The running config stays, for these reasons.
    Refused(Vec<Problem>),
}

/// A config to apply; `source` names it in logs (a file, a remote version).
pub struct ReloadRequest {
    pub source: String,
    pub config: Result<Config, Vec<Problem>>,
    pub done: Option<oneshot::Sender<Outcome>>,
}

/// Sends reloads to the running gateway.
#[derive(Clone)]
pub struct Reloader(mpsc::Sender<ReloadRequest>);

pub fn channel() -> (Reloader, mpsc::Receiver<ReloadRequest>) {
    let (tx, rx) = mpsc::channel(4);
    (Reloader(tx), rx)
}

impl Reloader {
    /// Applies `config` (or reports its problems); None if the gateway stopped.
    pub async fn reload(
        &self,
        source: String,
        config: Result<Config, Vec<Problem>>,
    ) -> Option<Outcome> {
        let (done, outcome) = oneshot::channel();
        let request = ReloadRequest {
            source,
            config,
            done: Some(done),
        };
        self.0.send(request).await.ok()?;
        outcome.await.ok()
    }
}

/// Reloads the configuration (the local file, with the cloud's devices if
/// any: `remote::Source`) at every SIGHUP, until the gateway stops.
pub async fn on_sighup(source: Arc<crate::remote::Source>, reloader: Reloader) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP: reloading needs a restart");
            return;
        }
    };
    while hup.recv().await.is_some() {
        info!(file = %source.path().display(), "SIGHUP: reloading the configuration");
        let config = source.load();
        if reloader
            .reload(source.path().display().to_string(), config)
            .await
            .is_none()
        {
            return;
        }
    }
}

/// SHA-256 of a value's full debug form: equal settings, equal fingerprint.
fn fingerprint(v: &impl Debug) -> [u8; 32] {
    Sha256::digest(format!("{v:?}").as_bytes()).into()
}

/// Fingerprints of the sections only a restart changes.
struct Fixed {
    sections: [(&'static str, [u8; 32]); 4],
}

impl Fixed {
    fn of(c: &Config) -> Fixed {
        Fixed {
            sections: [
                ("gateway", fingerprint(&c.gateway)),
                ("uplink", fingerprint(&c.uplink)),
                ("buffer", fingerprint(&c.buffer)),
                ("status", fingerprint(&c.status)),
            ],
        }
    }

    fn changes(&self, new: &Config) -> Vec<Problem> {
        let new = Fixed::of(new);
        self.sections
            .iter()
            .zip(new.sections)
            .filter(|(a, b)| a.1 != b.1)
            .map(|((name, _), _)| Problem {
                path: name.to_string(),
                message: format!(
                    "`[{name}]` changed: it takes effect only at a restart, so this reload is refused and the running config stays"
                ),
            })
            .collect()
    }
}

/// A device's identity, read by its collector at its first connect.
#[derive(Debug)]
pub struct Identified {
    pub device: String,
    /// The reporting collector's first slot: which run of the device.
    pub first_slot: u32,
    pub identity: BTreeMap<String, String>,
}

/// Where collectors send the identities they read (see `Identified`).
pub type IdentifiedTx = mpsc::UnboundedSender<Identified>;

/// A device whose collector runs.
struct Running {
    id: String,
    first_slot: u32,
    /// What the device said of itself when its collector started.
    identity: BTreeMap<String, String>,
}

/// One collector: its devices' fingerprints, and how to stop it.
struct Unit {
    fingerprint: [u8; 32],
    cancel: CancellationToken,
    done: TaskTracker,
}

/// The running collectors, and what a reload needs to change them.
pub struct Collectors {
    sink: PointSink,
    cancel: CancellationToken,
    all: TaskTracker,
    status: Arc<Status>,
    buffer: Arc<Buffer>,
    fixed: Fixed,
    devices: Vec<Running>,
    units: HashMap<String, Unit>,
    next_slot: u32,
    manifest_version: u64,
    /// The writer's slot map since the last switch.
    map: Option<Arc<[u32]>>,
    /// Handed to collectors that identify their device late (OPC UA only).
    #[cfg_attr(not(feature = "opcua"), allow(dead_code))]
    identified: IdentifiedTx,
}

/// Per device: fingerprint and collector key, in config order.
pub fn fingerprints(devices: &[DeviceConfig]) -> Vec<([u8; 32], String)> {
    devices
        .iter()
        .map(|d| (fingerprint(d), d.collector_key()))
        .collect()
}

/// Each collector's fingerprint, over its devices' in config order.
fn unit_fingerprints(fps: &[([u8; 32], String)]) -> BTreeMap<String, [u8; 32]> {
    let mut hashers: BTreeMap<String, Sha256> = BTreeMap::new();
    for (fp, key) in fps {
        hashers.entry(key.clone()).or_default().update(fp);
    }
    hashers
        .into_iter()
        .map(|(k, h)| (k, h.finalize().into()))
        .collect()
}

impl Collectors {
    /// Starts the collectors of `config` (identified, its manifest
    /// `manifest` committed), numbering slots as the manifest numbers tags.
    /// `fps` are the devices' fingerprints taken before identification.
    /// Devices identified later report through `identified`: pass what
    /// arrives to `Collectors::identified`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: Config,
        fps: Vec<([u8; 32], String)>,
        manifest: &guantong_proto::v1::Manifest,
        sink: PointSink,
        cancel: CancellationToken,
        status: Arc<Status>,
        buffer: Arc<Buffer>,
        identified: IdentifiedTx,
    ) -> Collectors {
        let mut c = Collectors {
            sink,
            cancel,
            all: TaskTracker::new(),
            status,
            buffer,
            fixed: Fixed::of(&config),
            devices: Vec::new(),
            units: HashMap::new(),
            next_slot: 0,
            manifest_version: manifest.version,
            map: None,
            identified,
        };
        let units = unit_fingerprints(&fps);
        let mut fresh = Vec::new();
        for (device, entry) in config.devices.into_iter().zip(&manifest.devices) {
            let first_slot = c.next_slot;
            c.next_slot += device.tag_count() as u32;
            c.devices.push(Running {
                id: device.id().to_string(),
                first_slot,
                identity: entry.identity.clone(),
            });
            fresh.push((device, first_slot));
        }
        c.spawn(fresh, &units);
        c
    }

    /// Waits for every collector to return (after `cancel`), and lets the
    /// writer's channel close.
    pub async fn stopped(self) {
        let Collectors { all, sink, .. } = self;
        drop(sink);
        all.close();
        all.wait().await;
    }

    /// Starts the collectors of `fresh` (devices with their first slot), in
    /// config order, one per collector key.
    fn spawn(&mut self, fresh: Vec<(DeviceConfig, u32)>, fps: &BTreeMap<String, [u8; 32]>) {
        let mut by_key: Vec<(String, Vec<(DeviceConfig, u32)>)> = Vec::new();
        for (device, slot) in fresh {
            let key = device.collector_key();
            match by_key.iter_mut().find(|(k, _)| *k == key) {
                Some((_, devices)) => devices.push((device, slot)),
                None => by_key.push((key, vec![(device, slot)])),
            }
        }
        for (key, devices) in by_key {
            let unit = Unit {
                fingerprint: fps.get(&key).copied().unwrap_or_default(),
                cancel: self.cancel.child_token(),
                done: TaskTracker::new(),
            };
            self.spawn_unit(&unit, devices);
            unit.done.close();
            self.units.insert(key, unit);
        }
    }

    /// Starts a unit's collectors (`protocol::start_unit`), tracked by it.
    fn spawn_unit(&self, unit: &Unit, devices: Vec<(DeviceConfig, u32)>) {
        let ctx = crate::protocol::StartContext {
            sink: self.sink.clone(),
            cancel: unit.cancel.clone(),
            status: self.status.clone(),
            identified: self.identified.clone(),
        };
        for run in crate::protocol::start_unit(devices, &ctx) {
            self.all.spawn(unit.done.track_future(run));
        }
    }

    /// Applies a validated config: see the module docs. An error means the
    /// new manifest could not be committed: the gateway must stop.
    pub async fn apply(&mut self, new: Config) -> anyhow::Result<Outcome> {
        let problems = self.fixed.changes(&new);
        if !problems.is_empty() {
            return Ok(Outcome::Refused(problems));
        }
        let fps = fingerprints(&new.devices);
        let units = unit_fingerprints(&fps);
        let stop: Vec<String> = self
            .units
            .iter()
            .filter(|(k, u)| units.get(*k) != Some(&u.fingerprint))
            .map(|(k, _)| k.clone())
            .collect();
        let kept = |key: &str| {
            self.units
                .get(key)
                .is_some_and(|u| units.get(key) == Some(&u.fingerprint))
        };
        let fresh: Vec<bool> = fps.iter().map(|(_, key)| !kept(key)).collect();
        // Slots: kept devices keep theirs, the others get new ones.
        let mut next_slot = self.next_slot;
        let mut slots = Vec::with_capacity(new.devices.len());
        for (d, device) in new.devices.iter().enumerate() {
            let slot = if fresh[d] {
                let first = next_slot;
                next_slot = next_slot
                    .checked_add(device.tag_count() as u32)
                    .filter(|n| *n < UNMAPPED)
                    .ok_or_else(|| anyhow::anyhow!("tag slots exhausted by reloads"))?;
                first
            } else {
                self.running(device.id())
                    .map(|r| r.first_slot)
                    .ok_or_else(|| anyhow::anyhow!("kept device {} not running", device.id()))?
            };
            slots.push(slot);
        }

        // Stop what changed; the kept collectors go on.
        for key in &stop {
            if let Some(unit) = self.units.remove(key) {
                unit.cancel.cancel();
                unit.done.wait().await;
            }
        }
        let mut config = new;
        let mut devices: Vec<Option<DeviceConfig>> = std::mem::take(&mut config.devices)
            .into_iter()
            .map(Some)
            .collect();
        let mut to_identify: Vec<DeviceConfig> = (0..devices.len())
            .filter(|&d| fresh[d])
            .filter_map(|d| devices[d].take())
            .collect();
        crate::protocol::identify(&mut to_identify).await;
        let mut identified = to_identify.into_iter();
        config.devices = devices
            .iter_mut()
            .map(|d| d.take().or_else(|| identified.next()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| anyhow::anyhow!("a device went missing while identifying"))?;

        let mut manifest = crate::manifest::build(&config);
        for (d, entry) in manifest.devices.iter_mut().enumerate() {
            if !fresh[d]
                && let Some(r) = self.running(&entry.id)
            {
                entry.identity = r.identity.clone();
            }
        }
        crate::manifest::seal(&mut manifest);
        if stop.is_empty() && !fresh.contains(&true) && manifest.version == self.manifest_version {
            return Ok(Outcome::Unchanged {
                manifest_version: manifest.version,
            });
        }
        // Slot -> manifest index, from the switch on.
        let firsts = crate::manifest::first_tag_of_devices(&config);
        let mut map = vec![UNMAPPED; next_slot as usize];
        let mut identity = true;
        for ((device, &slot), &first) in config.devices.iter().zip(&slots).zip(&firsts) {
            for i in 0..device.tag_count() as u32 {
                map[(slot + i) as usize] = first + i;
                identity &= slot == first;
            }
        }
        let map = (!identity || next_slot as usize != manifest.tags.len()).then(|| map.into());
        let manifest = self.switch_to(manifest, map).await?;

        let specs = config
            .devices
            .iter()
            .zip(&slots)
            .map(|(d, &slot)| DeviceSpec::new(d, slot))
            .collect();
        self.status.reconfigure(manifest.version, specs);
        // Kept devices' manifest entries hold their identity from before.
        let mut restarted = Vec::new();
        let mut running = Vec::new();
        let mut start = Vec::new();
        let devices = config.devices.into_iter().zip(slots).zip(&manifest.devices);
        for (d, ((device, slot), entry)) in devices.enumerate() {
            running.push(Running {
                id: device.id().to_string(),
                first_slot: slot,
                identity: entry.identity.clone(),
            });
            if fresh[d] {
                restarted.push(device.id().to_string());
                start.push((device, slot));
            }
        }
        self.devices = running;
        self.next_slot = next_slot;
        self.spawn(start, &units);
        Ok(Outcome::Applied {
            manifest_version: manifest.version,
            restarted,
        })
    }

    /// The one place a new manifest takes effect: committed to the chain,
    /// then switched to in the writer, with `map` from slots to its indices.
    async fn switch_to(
        &mut self,
        manifest: guantong_proto::v1::Manifest,
        map: Option<Arc<[u32]>>,
    ) -> anyhow::Result<guantong_proto::v1::Manifest> {
        let buffer = self.buffer.clone();
        let manifest =
            tokio::task::spawn_blocking(move || buffer.put_manifest(&manifest).map(|()| manifest))
                .await??;
        let switch = Switch {
            version: manifest.version,
            map: map.clone(),
        };
        if !self.sink.switch(switch).await {
            anyhow::bail!("the buffer writer stopped");
        }
        self.manifest_version = manifest.version;
        self.map = map;
        Ok(manifest)
    }

    /// Publishes an identity a collector read after it started: the running
    /// manifest with that device's identity, as a new version (see the
    /// module docs). An error: the gateway must stop, as for a reload.
    pub async fn identified(&mut self, report: Identified) -> anyhow::Result<()> {
        let Identified {
            device,
            first_slot,
            identity,
        } = report;
        let Some(d) = self
            .devices
            .iter()
            .position(|r| r.id == device && r.first_slot == first_slot)
        else {
            return Ok(()); // replaced by a reload since
        };
        if self.devices[d].identity == identity {
            return Ok(());
        }
        let (buffer, version) = (self.buffer.clone(), self.manifest_version);
        let bytes = tokio::task::spawn_blocking(move || buffer.manifest(version))
            .await??
            .ok_or_else(|| anyhow::anyhow!("manifest {version:016x} is not in the buffer"))?;
        let mut manifest = <guantong_proto::v1::Manifest as prost::Message>::decode(&*bytes)?;
        let entry = manifest
            .devices
            .iter_mut()
            .find(|e| e.id == device)
            .ok_or_else(|| anyhow::anyhow!("device {device} is not in manifest {version:016x}"))?;
        entry.identity = identity.clone();
        crate::manifest::seal(&mut manifest);
        let manifest = self.switch_to(manifest, self.map.clone()).await?;
        self.status.manifest_switched(manifest.version);
        self.devices[d].identity = identity;
        info!(
            device = %device,
            manifest_version = format_args!("{:016x}", manifest.version),
            "device identified at its first connect; its identity is in a new manifest"
        );
        Ok(())
    }

    fn running(&self, id: &str) -> Option<&Running> {
        self.devices.iter().find(|r| r.id == id)
    }

    /// Serves one request: applies it, logs the outcome (every problem on
    /// its own line) and answers. An error: the gateway must stop.
    pub async fn serve(&mut self, request: ReloadRequest) -> anyhow::Result<()> {
        let ReloadRequest {
            source,
            config,
            done,
        } = request;
        let outcome = match config {
            Ok(config) => self.apply(config).await?,
            Err(problems) => Outcome::Refused(problems),
        };
        match &outcome {
            Outcome::Applied {
                manifest_version,
                restarted,
            } => info!(
                source = %source,
                manifest_version = format_args!("{manifest_version:016x}"),
                restarted = ?restarted,
                "configuration reloaded"
            ),
            Outcome::Unchanged { manifest_version } => info!(
                source = %source,
                manifest_version = format_args!("{manifest_version:016x}"),
                "configuration reloaded: nothing changed"
            ),
            Outcome::Refused(problems) => {
                for p in problems {
                    warn!(source = %source, key = %p.path, problem = %p.message, "reload refused");
                }
                warn!(
                    source = %source,
                    problems = problems.len(),
                    manifest_version = format_args!("{:016x}", self.manifest_version),
                    "reload refused: the running configuration stays"
                );
            }
        }
        if let Some(done) = done {
            let _ = done.send(outcome);
        }
        Ok(())
    }
}
