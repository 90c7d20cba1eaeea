//! Helpers shared by the benchmark binaries: synthetic manifests and points,
//! an in-process ingest, and medians.

use std::sync::Arc;
use std::time::Duration;

use guantong_gateway::buffer::Buffer;
use guantong_gateway::config::{Compression, UplinkConfig};
use guantong_gateway::quality::Sample;
use guantong_ingest::store::Store;
use guantong_ingest::store::embedded::EmbeddedStore;
use guantong_proto::v1::{DataType, Device, Manifest, Tag, point};
use tokio_util::sync::CancellationToken;

pub const GW: &str = "bench-gw";
pub const MANIFEST_VERSION: u64 = 7;

/// One device with `tags` double tags named t0, t1, ...
pub fn manifest(tags: u32) -> Manifest {
    Manifest {
        version: MANIFEST_VERSION,
        gateway_id: GW.into(),
        created_at_ms: 0,
        devices: vec![Device {
            id: "dev".into(),
            protocol: "bench".into(),
            endpoint: String::new(),
            identity: Default::default(),
        }],
        tags: (0..tags)
            .map(|i| Tag {
                device: 0,
                name: format!("t{i}"),
                address: format!("holding:{i}"),
                data_type: DataType::Double as i32,
                unit: String::new(),
                interval_ms: 1000,
            })
            .collect(),
    }
}

/// Slowly changing values (a step every 10 s), one per tag per second, from `t0_ms`.
pub fn samples(n: usize, tags: u32, t0_ms: i64) -> Vec<Sample> {
    (0..n)
        .map(|i| {
            let tag = (i as u32) % tags;
            let second = (i as u32 / tags) as i64;
            let v = 20.0 + f64::from(tag) + ((second / 10) as f64) * 0.1;
            Sample::good(tag, t0_ms + second * 1000, point::Value::Double(v))
        })
        .collect()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn percentile(mut v: Vec<i64>, p: f64) -> i64 {
    if v.is_empty() {
        return -1;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// An ingest running in this process on a temporary directory.
pub struct LocalIngest {
    pub store: Arc<EmbeddedStore>,
    pub token: String,
    pub grpc: std::net::SocketAddr,
    pub shutdown: CancellationToken,
    /// The CA of its TLS certificate; None: plaintext.
    pub ca_file: Option<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

impl LocalIngest {
    pub async fn start() -> anyhow::Result<LocalIngest> {
        LocalIngest::start_with_key(None).await
    }

    /// An ingest that verifies the bench gateway's chain with `public_key`.
    pub async fn start_with_key(
        public_key: Option<guantong_proto::chain::PublicKey>,
    ) -> anyhow::Result<LocalIngest> {
        LocalIngest::start_with(public_key, false).await
    }

    /// With `tls`, gRPC over TLS from an operator CA in its directory.
    pub async fn start_with(
        public_key: Option<guantong_proto::chain::PublicKey>,
        tls: bool,
    ) -> anyhow::Result<LocalIngest> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(EmbeddedStore::open(dir.path())?);
        let token = store.register_gateway(GW, public_key).await?;
        let shutdown = CancellationToken::new();
        let any = "127.0.0.1:0".parse()?;
        // No quotas: the benches measure ingest's own speed.
        let (tls, ca_file) = if tls {
            let tls = guantong_ingest::tls::TlsArgs::default()
                .prepare(&guantong_ingest::ops::StoreArgs::embedded(dir.path()))?;
            (
                tls,
                Some(guantong_ingest::ca::dir(dir.path()).join("ca.pem")),
            )
        } else {
            (None, None)
        };
        let options = guantong_ingest::Options {
            limits: guantong_ingest::limits::Limits::unlimited(),
            tls,
            ..guantong_ingest::Options::default()
        };
        let running =
            guantong_ingest::start_with(store.clone(), any, any, shutdown.clone(), options).await?;
        Ok(LocalIngest {
            store,
            token,
            grpc: running.grpc_addr,
            shutdown,
            ca_file,
            _dir: dir,
        })
    }

    pub fn uplink_config(
        &self,
        endpoint: std::net::SocketAddr,
        compression: Compression,
        window: u32,
    ) -> UplinkConfig {
        uplink_config(
            endpoint,
            &self.token,
            self.ca_file.clone(),
            compression,
            window,
        )
    }

    pub async fn stored_points(&self) -> anyhow::Result<u64> {
        Ok(self.store.series().await?.iter().map(|s| s.samples).sum())
    }
}

/// A gateway's uplink to the ingest at `endpoint`: TLS trusting `ca_file`,
/// or plaintext without one; `window` batches in flight.
pub fn uplink_config(
    endpoint: std::net::SocketAddr,
    token: &str,
    ca_file: Option<std::path::PathBuf>,
    compression: Compression,
    window: u32,
) -> UplinkConfig {
    UplinkConfig {
        endpoint: None,
        endpoints: vec![match ca_file {
            Some(_) => format!("https://{endpoint}"),
            None => format!("http://{endpoint}"),
        }],
        token: token.to_string(),
        token_file: None,
        token_env: None,
        plaintext: ca_file.is_none(),
        ca_file,
        cert_file: None,
        key_file: None,
        server_name: None,
        max_in_flight: std::num::NonZeroU32::new(window.max(1)).expect("nonzero"),
        max_batch_points: std::num::NonZeroU32::new(10_000).expect("nonzero"),
        connect_timeout: Duration::from_secs(5),
        max_backoff: Duration::from_secs(1),
        compression,
        keepalive_interval: Duration::from_secs(10),
        keepalive_timeout: Duration::from_secs(10),
    }
}

impl Drop for LocalIngest {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits until the buffer holds no batch numbered `last` or below.
pub async fn wait_drained(buffer: &Buffer, last: u64, limit: Duration) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    loop {
        let s = buffer.stats()?;
        if s.first_seq > last || s.first_seq == s.next_seq {
            return Ok(());
        }
        if start.elapsed() > limit {
            anyhow::bail!("backlog not drained after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// utime + stime of process `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    use anyhow::Context as _;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces).
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (VmRSS, VmHWM) of process `pid`, in MiB.
pub fn rss_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// Where a process's resident memory is, in MiB, from `/proc/PID/smaps`:
/// (mapping, RSS) for the executable's file pages, `[heap]`, anonymous
/// mappings (thread stacks, malloc arenas, large allocations), shared
/// libraries and the rest, largest first.
pub fn rss_by_mapping(pid: u32) -> anyhow::Result<Vec<(String, f64)>> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?
        .to_string_lossy()
        .into_owned();
    let mut sums: std::collections::BTreeMap<String, f64> = Default::default();
    let mut current = String::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: address perms offset dev inode [path].
            let path = fields.nth(4).unwrap_or_default();
            current = match path {
                "" => "anonymous".into(),
                p if p == exe => "executable (code, read-only data)".into(),
                "[heap]" => "[heap]".into(),
                p if p.contains(".so") => "shared libraries".into(),
                p => p.to_string(),
            };
        } else if first == "Rss:" {
            let kib: f64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            *sums.entry(current.clone()).or_default() += kib / 1024.0;
        }
    }
    let mut out: Vec<(String, f64)> = sums.into_iter().filter(|(_, v)| *v >= 0.05).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(out)
}
