//! One end-to-end scenario: a simulated Modbus device, the real ingest and
//! gateway binaries, and a fault proxy between gateway and ingest; plus the
//! checker that compares what the device served with what ingest stored.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::procs::{GatewayProc, IngestProc, gateway_identity, wait_for};
use crate::proxy::Proxy;
use crate::sim::{SimDevice, standard_device_toml};

pub const GW: &str = "gw-test";
pub const DEV: &str = "sim-1";

pub struct Options {
    pub poll: &'static str,
    pub commit_interval: &'static str,
    pub max_bytes: &'static str,
    /// HTTP/2 keepalive interval and timeout.
    pub keepalive: &'static str,
    /// Extra u16 tags (holding 20..) for volume.
    pub extra_tags: usize,
    /// `[gateway] key_algorithm`: `ed25519` or `sm2`.
    pub key_algorithm: &'static str,
    /// Mount a tmpfs of this size (`24m`) as the buffer directory.
    pub buffer_tmpfs: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            poll: "20ms",
            commit_interval: "100ms",
            max_bytes: "64 MiB",
            keepalive: "10s",
            extra_tags: 0,
            key_algorithm: "ed25519",
            buffer_tmpfs: None,
        }
    }
}

pub struct Scenario {
    /// Declared first: unmounted before `dir` is removed.
    pub buffer_fs: Option<crate::mount::Tmpfs>,
    pub dir: tempfile::TempDir,
    pub sim: SimDevice,
    pub ingest: IngestProc,
    pub gateway: GatewayProc,
    /// Between gateway and ingest.
    pub proxy: Proxy,
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

impl Scenario {
    pub async fn start(o: Options) -> anyhow::Result<Scenario> {
        let dir = tempfile::tempdir()?;
        let buffer_fs = match o.buffer_tmpfs {
            Some(size) => Some(crate::mount::Tmpfs::mount(
                &dir.path().join("buffer"),
                size,
            )?),
            None => None,
        };
        let sim = SimDevice::new();
        let (sim_addr, _task) = sim.serve(any_port()).await?;
        let data = dir.path().join("ingest");
        let config = dir.path().join("gateway.toml");
        // The gateway creates its key first; ingest binds it at registration.
        std::fs::write(
            &config,
            Self::config_text(&o, "127.0.0.1:1".parse()?, "none", dir.path(), sim_addr),
        )?;
        let (algorithm, public_key) = gateway_identity(&config)?;
        let token =
            IngestProc::register_with_algorithm_key(&data, GW, Some((&algorithm, &public_key)))?;
        let ingest = IngestProc::start(&data, any_port(), any_port()).await?;
        let proxy = Proxy::start(ingest.grpc).await?;
        std::fs::write(
            &config,
            Self::config_text(&o, proxy.addr, &token, dir.path(), sim_addr),
        )?;
        let gateway = GatewayProc::start(&config)?;
        Ok(Scenario {
            buffer_fs,
            dir,
            sim,
            ingest,
            gateway,
            proxy,
        })
    }

    fn config_text(
        o: &Options,
        endpoint: SocketAddr,
        token: &str,
        dir: &Path,
        sim_addr: SocketAddr,
    ) -> String {
        let mut text = format!(
            r#"[gateway]
id = "{GW}"
key_algorithm = "{key_algorithm}"

[uplink]
{uplink}token = "{token}"
max_backoff = "1s"
keepalive_interval = "{keepalive}"
keepalive_timeout = "{keepalive}"

[buffer]
dir = "{buffer}"
max_bytes = "{max_bytes}"
commit_interval = "{commit}"
"#,
            uplink = crate::procs::uplink_toml(endpoint),
            keepalive = o.keepalive,
            key_algorithm = o.key_algorithm,
            buffer = dir.join("buffer").display(),
            max_bytes = o.max_bytes,
            commit = o.commit_interval,
        );
        text += &standard_device_toml(DEV, sim_addr, o.poll);
        for i in 0..o.extra_tags {
            text += &format!(
                "\n[[devices.tags]]\nname = \"extra{i}\"\ntable = \"holding\"\naddress = {}\ntype = \"u16\"\n",
                20 + i
            );
        }
        text
    }

    /// The evidence chain report of this scenario's gateway: every stream,
    /// with its breaks.
    pub async fn chains(&self) -> anyhow::Result<Vec<Value>> {
        let v = self.ingest.api().get("/api/v1/chain").await?;
        Ok(v["chains"].as_array().cloned().unwrap_or_default())
    }

    /// Fails unless every stream's chain verified from its start with no break.
    pub async fn assert_chain_intact(&self) -> anyhow::Result<()> {
        // Live batches go before the backlog, so right after a reconnect a
        // later link may be stored before an earlier one still in flight:
        // give the backlog time to land before judging.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut chains = self.chains().await?;
        while chains.iter().any(|c| c["waiting"] != 0) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            chains = self.chains().await?;
        }
        anyhow::ensure!(
            !chains.is_empty(),
            "no evidence chain recorded\n{}",
            self.logs()
        );
        for c in &chains {
            let breaks = c["breaks"].as_array().map_or(0, |b| b.len());
            anyhow::ensure!(breaks == 0, "chain breaks: {c}\n{}", self.logs());
            anyhow::ensure!(c["waiting"] == 0, "links waiting for a missing one: {c}");
            anyhow::ensure!(
                c["verified_from"] == 1,
                "chain verified from its start: {c}"
            );
        }
        Ok(())
    }

    pub fn logs(&self) -> String {
        format!("{}{}", self.gateway.proc.logs(), self.ingest.proc.logs())
    }

    pub fn gateway_log(&self) -> String {
        std::fs::read_to_string(self.gateway.config.with_extension("log")).unwrap_or_default()
    }

    pub fn buffer_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("buffer")
    }

    /// Stops the counter (device fault) and waits until ingest has accounted
    /// for every value served: stored, or declared lost by the gateway.
    /// Returns (stored counter points, last value served, declared lost counter points).
    pub async fn settle(&self, timeout: Duration) -> anyhow::Result<(Vec<Value>, u64, u64)> {
        self.settle_with(timeout, false).await
    }

    /// Like `settle`; with `unaccounted_loss` (SIGKILLs, a destroyed file)
    /// it waits until the last value is stored and nothing new has arrived
    /// for 3 s instead.
    pub async fn settle_with(
        &self,
        timeout: Duration,
        unaccounted_loss: bool,
    ) -> anyhow::Result<(Vec<Value>, u64, u64)> {
        self.sim.set_fault(true);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let last = u64::from(self.sim.counter());
        anyhow::ensure!(
            last > 0,
            "the gateway never read the device\n{}",
            self.logs()
        );
        let api = self.ingest.api();
        let stable = std::sync::Mutex::new((0usize, std::time::Instant::now()));
        let result = wait_for(
            "every served counter value to be stored or declared lost",
            timeout,
            || async {
                let points = api.points(GW, DEV, "counter").await?;
                let good = points.iter().filter(|p| p["quality"] == "good").count() as u64;
                let lost = self.lost(DEV, "counter").await?;
                if !unaccounted_loss {
                    return Ok((good + lost >= last).then_some((points, lost)));
                }
                let has_last = points.iter().any(|p| p["value"].as_u64() == Some(last));
                let mut st = stable.lock().unwrap_or_else(|e| e.into_inner());
                // Bad points keep coming during the fault; count the values.
                if st.0 != good as usize {
                    *st = (good as usize, std::time::Instant::now());
                }
                Ok((has_last && st.1.elapsed() > Duration::from_secs(3)).then_some((points, lost)))
            },
        )
        .await;
        match result {
            Ok((points, lost)) => Ok((points, last, lost)),
            Err(e) => anyhow::bail!("{e}\n{}", self.logs()),
        }
    }

    /// Good (valued) points of one tag the gateway declared lost (ingest's
    /// loss records count Bad points apart).
    pub async fn lost(&self, device: &str, tag: &str) -> anyhow::Result<u64> {
        let v = self.ingest.api().get("/api/v1/losses").await?;
        Ok(v["losses"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["tags"].as_array().cloned().unwrap_or_default())
            .filter(|t| t["device"] == device && t["tag"] == tag)
            .filter_map(|t| Some(t["points"].as_u64()? - t["bad_points"].as_u64()?))
            .sum())
    }
}

/// Checks the counter's Good values against 1..=last: no value twice, no
/// value outside, and exactly `allowed_missing` values missing (or at most,
/// when `exact` is false). Returns the missing values.
///
/// Every poll reads a new counter value, so a value seen twice is a point
/// stored twice. (Timestamps cannot tell: a poll task starved of CPU may send
/// two polls within one millisecond.)
pub fn check_counter(
    points: &[Value],
    last: u64,
    allowed_missing: u64,
    exact: bool,
) -> Result<Vec<u64>, String> {
    let mut seen = std::collections::BTreeMap::new();
    for p in points.iter().filter(|p| p["quality"] == "good") {
        let v = p["value"]
            .as_u64()
            .ok_or_else(|| format!("counter value is not an unsigned integer: {p}"))?;
        *seen.entry(v).or_insert(0u32) += 1;
    }
    let duplicated: Vec<_> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(v, n)| format!("{v}×{n}"))
        .collect();
    let extra: Vec<u64> = seen
        .keys()
        .copied()
        .filter(|v| *v == 0 || *v > last)
        .collect();
    let missing: Vec<u64> = (1..=last).filter(|v| !seen.contains_key(v)).collect();
    let n = missing.len() as u64;
    let count_ok = if exact {
        n == allowed_missing
    } else {
        n <= allowed_missing
    };
    if !duplicated.is_empty() || !extra.is_empty() || !count_ok {
        return Err(format!(
            "counter 1..={last}: {} stored; duplicated {:?}; unexpected {:?}; missing {n} (allowed {}{allowed_missing}) {:?}",
            seen.len(),
            &duplicated[..duplicated.len().min(20)],
            extra,
            if exact { "exactly " } else { "at most " },
            &missing[..missing.len().min(30)],
        ));
    }
    Ok(missing)
}

/// `pending_batches=N` of every "gateway starting" line in a gateway log.
pub fn pending_batches_at_start(log: &Path) -> Vec<u64> {
    pending_batches_at(log, "gateway starting")
}

/// `pending_batches=N` of every line of `event` ("gateway starting",
/// "gateway stopped") in a gateway log.
pub fn pending_batches_at(log: &Path, event: &str) -> Vec<u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains(event))
        .filter_map(|l| {
            l.split("pending_batches=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}
