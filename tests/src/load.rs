//! A city's worth of gateways in one process, for the ingest load bench
//! (`bench-ingest-load`) and the kill-during-load test.
//!
//! Each played gateway is what a real one is above its collectors: its own
//! durable buffer (`gateway::buffer`, signing a hash chain with its own
//! Ed25519 key), committed every [`COMMIT_INTERVAL`], drained by the real
//! `gateway::uplink` over its own gRPC/TLS stream with its own registered
//! token. Tag `i` of `T` is sampled every `I` ms at phase `i·I/T`, so sample
//! number `n` of a gateway is tag `n mod T` at `n·I/T` ms after the start:
//! every commit carries the samples whose times have passed, one or two per
//! tag when `I` is near the commit interval.
//!
//! A gateway's driver task ticks every [`POLL`]: it reads the buffer's first
//! unacknowledged number (the uplink deletes what ingest acknowledged) to
//! count acknowledged points and ack latency (commit to deletion, so
//! latencies are rounded up to [`POLL`]), and every fourth tick commits.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use guantong_gateway::buffer::{Buffer, ChainSigner, WhenFull};
use guantong_gateway::config::Compression;
use guantong_gateway::quality::Sample;
use guantong_gateway::uplink::Uplink;
use guantong_ingest::store::Store;
use guantong_ingest::store::embedded::EmbeddedStore;
use guantong_proto::chain::{ChainKey, PublicKey};
use guantong_proto::v1::{DataType, Device, Manifest, Tag, point};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a played gateway commits its buffer (a gateway's default).
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// How often a driver looks at its buffer.
pub const POLL: Duration = Duration::from_millis(50);
/// Largest batch, as the gateway's default `max_batch_points`.
pub const MAX_BATCH_POINTS: usize = 10_000;
const MANIFEST_VERSION: u64 = 1;

/// N gateways × T tags sampled every I.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub gateways: usize,
    pub tags: u32,
    pub interval_ms: u32,
}

impl Shape {
    /// Points per second all gateways together collect.
    pub fn rate(&self) -> f64 {
        self.gateways as f64 * f64::from(self.tags) * 1000.0 / f64::from(self.interval_ms)
    }

    /// Sample numbers of one gateway whose times lie before `ms` after the start.
    pub fn samples_before(&self, ms: u64) -> u64 {
        // Sample n is at floor(n·I/T) ms: those with n·I/T < ms.
        (ms * u64::from(self.tags)).div_ceil(u64::from(self.interval_ms))
    }
}

/// Gateway `index`'s id.
pub fn gateway_id(prefix: &str, index: usize) -> String {
    format!("{prefix}-{index:04}")
}

/// Gateway `index`'s signing key (deterministic, distinct per gateway).
fn signing_key(index: usize) -> ChainKey {
    let mut seed = [7u8; 32];
    seed[..8].copy_from_slice(&(index as u64).to_be_bytes());
    ChainKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&seed))
}

/// Gateway `index`'s public key, as `guantong-gateway identity` prints it:
/// (algorithm, hex).
pub fn public_key(index: usize) -> (String, String) {
    let key = signing_key(index);
    (key.algorithm().to_string(), hex::encode(key.public_key()))
}

/// One device with `shape.tags` u16 registers at `shape.interval_ms`.
fn manifest(gateway: &str, shape: Shape) -> Manifest {
    Manifest {
        version: MANIFEST_VERSION,
        gateway_id: gateway.into(),
        created_at_ms: 0,
        devices: vec![Device {
            id: "plc".into(),
            protocol: "modbus-tcp".into(),
            endpoint: "10.0.0.1:502".into(),
            identity: Default::default(),
        }],
        tags: (0..shape.tags)
            .map(|i| Tag {
                device: 0,
                name: format!("r{i}"),
                address: format!("holding:{i}"),
                data_type: DataType::Uint as i32,
                unit: String::new(),
                interval_ms: u64::from(shape.interval_ms),
            })
            .collect(),
    }
}

/// Samples `numbers` of one gateway of `shape` started at `t0_ms`: sample
/// `n` is tag `n mod T` at `n·I/T` ms, valued like a register that changes
/// every tenth reading.
pub fn samples(shape: Shape, numbers: std::ops::Range<u64>, t0_ms: i64) -> Vec<Sample> {
    let (tags, interval) = (u64::from(shape.tags), u64::from(shape.interval_ms));
    numbers
        .map(|n| {
            let tag = (n % tags) as u32;
            let value = u64::from(tag % 1000) + n / tags / 10;
            Sample::good(
                tag,
                t0_ms + (n * interval / tags) as i64,
                point::Value::Uint(value),
            )
        })
        .collect()
}

/// Registers every gateway of `shape` with its key in the (not serving)
/// store at `data`; returns their tokens in order.
pub async fn register(data: &Path, prefix: &str, shape: Shape) -> anyhow::Result<Vec<String>> {
    register_in(&EmbeddedStore::open(data)?, prefix, shape).await
}

/// `register` in any store.
pub async fn register_in<S: Store>(
    store: &S,
    prefix: &str,
    shape: Shape,
) -> anyhow::Result<Vec<String>> {
    let mut tokens = Vec::with_capacity(shape.gateways);
    for i in 0..shape.gateways {
        let key = signing_key(i);
        let public =
            PublicKey::new(key.algorithm(), key.public_key()).map_err(anyhow::Error::msg)?;
        tokens.push(
            store
                .register_gateway(&gateway_id(prefix, i), Some(public))
                .await?,
        );
    }
    Ok(tokens)
}

/// Registers `shape`'s gateways, starts the real ingest (ports chosen by
/// the OS) and the gateways streaming to it. On the embedded store in
/// `work/data`; with `database`, on that PostgreSQL database (migrated),
/// as `replicas` processes (data directories `work/data`, `work/data-1`,
/// … sharing the first one's CA), gateway `i` streaming to replica
/// `i mod replicas`.
pub async fn start_with_ingest(
    work: &Path,
    prefix: &str,
    shape: Shape,
    database: Option<&str>,
    replicas: usize,
) -> anyhow::Result<(Vec<crate::procs::IngestProc>, Load)> {
    let data = work.join("data");
    let any = "127.0.0.1:0".parse()?;
    let Some(url) = database else {
        let tokens = register(&data, prefix, shape).await?;
        let ingest = crate::procs::IngestProc::start(&data, any, any).await?;
        let load = Load::start(
            work,
            prefix,
            shape,
            &[ingest.grpc],
            ingest.ca_file(),
            &tokens,
        )?;
        return Ok((vec![ingest], load));
    };
    let target = guantong_ingest::store::postgres::Target::new(url, None)?;
    let tokens = {
        let store = guantong_ingest::store::postgres::PgStore::open(&target).await?;
        register_in(&store, prefix, shape).await?
    };
    let serve = ["--database", url];
    let first = crate::procs::IngestProc::start_with_args(&data, any, any, &serve).await?;
    let mut replicas_started = vec![first];
    for r in 1..replicas.max(1) {
        let dir = work.join(format!("data-{r}"));
        std::fs::create_dir_all(dir.join("tls"))?;
        for file in ["ca.pem", "ca.key"] {
            std::fs::copy(data.join("tls").join(file), dir.join("tls").join(file))?;
        }
        replicas_started
            .push(crate::procs::IngestProc::start_with_args(&dir, any, any, &serve).await?);
    }
    let endpoints: Vec<_> = replicas_started.iter().map(|i| i.grpc).collect();
    let load = Load::start(
        work,
        prefix,
        shape,
        &endpoints,
        replicas_started[0].ca_file(),
        &tokens,
    )?;
    Ok((replicas_started, load))
}

/// What one gateway's driver counted.
#[derive(Debug, Default)]
struct Counts {
    /// Points committed to the buffer / acknowledged by ingest.
    committed: u64,
    acked: u64,
    /// Ack latencies (ms) of batches committed while measuring.
    latencies_ms: Vec<u32>,
}

/// The played gateways, running until [`Load::stop_producing`].
pub struct Load {
    shape: Shape,
    counts: Vec<Arc<Mutex<Counts>>>,
    producing: CancellationToken,
    uplinks: CancellationToken,
    measuring: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dirs: tempfile::TempDir,
}

/// Sums over all gateways at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub committed: u64,
    pub acked: u64,
}

impl Load {
    /// Starts `shape.gateways` gateways streaming to `grpc` (gateway `i` to
    /// `grpc[i mod len]`, TLS trusting `ca_file`) with `tokens`; buffers
    /// live in a temporary directory under `work`.
    pub fn start(
        work: &Path,
        prefix: &str,
        shape: Shape,
        grpc: &[std::net::SocketAddr],
        ca_file: PathBuf,
        tokens: &[String],
    ) -> anyhow::Result<Load> {
        let dirs = tempfile::tempdir_in(work)?;
        let producing = CancellationToken::new();
        let uplinks = CancellationToken::new();
        let measuring = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let t0_ms = guantong_gateway::quality::now_ms();
        let mut counts = Vec::new();
        let mut tasks = Vec::new();
        for (i, token) in tokens.iter().enumerate().take(shape.gateways) {
            let id = gateway_id(prefix, i);
            let buffer = Buffer::open(&dirs.path().join(&id), 1 << 30, WhenFull::DropOldest)
                .with_context(|| format!("buffer of {id}"))?
                .with_identity(ChainSigner {
                    key: signing_key(i),
                    gateway_id: id.clone(),
                });
            buffer.put_manifest(&manifest(&id, shape))?;
            let buffer = Arc::new(buffer);
            let (committed_tx, committed_rx) = watch::channel(0);
            let mut config = crate::bench::uplink_config(
                grpc[i % grpc.len()],
                token,
                Some(ca_file.clone()),
                Compression::Zstd,
                32,
            );
            config.connect_timeout = Duration::from_secs(30);
            let uplink = Uplink {
                config,
                gateway_id: id.clone(),
                buffer: buffer.clone(),
                committed: committed_rx,
                status: Arc::new(guantong_gateway::status::Status::new(&id, 0, Vec::new(), 0)),
                health: None,
                remote: None,
            };
            tasks.push(tokio::spawn({
                let cancel = uplinks.child_token();
                async move {
                    uplink.run(cancel).await;
                    Ok(())
                }
            }));
            let c = Arc::new(Mutex::new(Counts::default()));
            counts.push(c.clone());
            let driver = Driver {
                shape,
                buffer,
                committed: committed_tx,
                counts: c,
                measuring: measuring.clone(),
                start,
                t0_ms,
                next_sample: 0,
                pending: VecDeque::new(),
            };
            tasks.push(tokio::spawn(driver.run(
                producing.clone(),
                uplinks.clone(),
                // Spread the gateways' commits over the commit interval.
                COMMIT_INTERVAL.mul_f64(i as f64 / shape.gateways as f64),
            )));
        }
        Ok(Load {
            shape,
            counts,
            producing,
            uplinks,
            measuring,
            tasks,
            _dirs: dirs,
        })
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Points committed and acknowledged so far, all gateways.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for c in &self.counts {
            let c = c.lock().unwrap_or_else(|e| e.into_inner());
            t.committed += c.committed;
            t.acked += c.acked;
        }
        t
    }

    /// How many gateways have had at least one batch acknowledged.
    pub fn gateways_acked(&self) -> usize {
        self.counts
            .iter()
            .filter(|c| c.lock().unwrap_or_else(|e| e.into_inner()).acked > 0)
            .count()
    }

    /// From now on, ack latencies of new commits are recorded.
    pub fn measure_latency(&self, on: bool) {
        self.measuring.store(on, Ordering::SeqCst);
    }

    /// Every recorded ack latency, ms.
    pub fn latencies_ms(&self) -> Vec<i64> {
        self.counts
            .iter()
            .flat_map(|c| {
                c.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .latencies_ms
                    .iter()
                    .map(|&l| i64::from(l))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Gateways stop committing (their uplinks keep draining).
    pub fn stop_producing(&self) {
        self.producing.cancel();
    }

    /// Waits until everything committed is acknowledged; false on timeout.
    pub async fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.totals();
            if t.acked == t.committed {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Expected stored samples of tag `tag` of every gateway: all commits
    /// are of whole sample-number ranges from 0, so tag counts follow from
    /// the number of samples committed.
    pub fn expected_per_tag(&self) -> Vec<Vec<u64>> {
        let tags = u64::from(self.shape.tags);
        self.counts
            .iter()
            .map(|c| {
                let n = c.lock().unwrap_or_else(|e| e.into_inner()).committed;
                (0..tags)
                    .map(|t| n / tags + u64::from(t < n % tags))
                    .collect()
            })
            .collect()
    }

    /// Stops everything; an error of any driver is returned.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.producing.cancel();
        self.uplinks.cancel();
        for t in self.tasks {
            t.await??;
        }
        Ok(())
    }
}

struct Driver {
    shape: Shape,
    buffer: Arc<Buffer>,
    committed: watch::Sender<u64>,
    counts: Arc<Mutex<Counts>>,
    measuring: Arc<AtomicBool>,
    start: Instant,
    t0_ms: i64,
    next_sample: u64,
    /// Committed, not yet acknowledged: (last seq, points, committed at, measured).
    pending: VecDeque<(u64, u64, Instant, bool)>,
}

impl Driver {
    async fn run(
        mut self,
        producing: CancellationToken,
        stopped: CancellationToken,
        phase: Duration,
    ) -> anyhow::Result<()> {
        tokio::time::sleep(phase).await;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let per_commit = (COMMIT_INTERVAL.as_millis() / POLL.as_millis()) as u64;
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = stopped.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            ticks += 1;
            if ticks.is_multiple_of(per_commit) && !producing.is_cancelled() {
                self.commit().await?;
            }
            self.poll().await?;
        }
    }

    /// Commits every sample whose time has come, as the gateway's writer does.
    async fn commit(&mut self) -> anyhow::Result<()> {
        let end = self
            .shape
            .samples_before(self.start.elapsed().as_millis() as u64);
        if end <= self.next_sample {
            return Ok(());
        }
        let samples = samples(self.shape, self.next_sample..end, self.t0_ms);
        let points = samples.len() as u64;
        let buffer = self.buffer.clone();
        let last = tokio::task::spawn_blocking(move || {
            buffer.append(MANIFEST_VERSION, &samples, MAX_BATCH_POINTS)
        })
        .await??;
        self.next_sample = end;
        let measured = self.measuring.load(Ordering::SeqCst);
        self.pending
            .push_back((last, points, Instant::now(), measured));
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .committed += points;
        self.committed.send_replace(last);
        Ok(())
    }

    /// Counts what ingest acknowledged since the last look.
    async fn poll(&mut self) -> anyhow::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let buffer = self.buffer.clone();
        let stats = tokio::task::spawn_blocking(move || buffer.stats()).await??;
        let now = Instant::now();
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(last, points, at, measured)) = self.pending.front() {
            let acked = stats.first_seq > last || stats.first_seq == stats.next_seq;
            if !acked {
                break;
            }
            self.pending.pop_front();
            counts.acked += points;
            if measured {
                counts
                    .latencies_ms
                    .push(now.duration_since(at).as_millis() as u32);
            }
        }
        Ok(())
    }
}

/// Waits until `done(load)` holds; fails after `within`, or at once when
/// ingest dies, with `progress(load)` and ingest's log.
pub async fn wait_for_load(
    load: &Load,
    ingest: &mut crate::procs::IngestProc,
    within: Duration,
    done: impl Fn(&Load) -> bool,
    progress: impl Fn(&Load) -> String,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !done(load) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} within {} s\n{}",
            progress(load),
            within.as_secs(),
            ingest.proc.logs()
        );
        anyhow::ensure!(
            ingest.proc.is_running(),
            "ingest died\n{}",
            ingest.proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Waits (up to 2 min) until ingest has acknowledged at least `at_least`
/// points of `load`.
pub async fn wait_acked(
    load: &Load,
    ingest: &mut crate::procs::IngestProc,
    at_least: u64,
) -> anyhow::Result<()> {
    wait_for_load(
        load,
        ingest,
        Duration::from_secs(120),
        |l| l.totals().acked >= at_least,
        |l| {
            format!(
                "acknowledged {} of at least {at_least} points",
                l.totals().acked
            )
        },
    )
    .await
}
