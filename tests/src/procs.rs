//! Running the real `guantong-ingest` and `guantong-gateway` binaries as
//! processes, and reading ingest's HTTP API.
//!
//! Binaries are taken from the cargo target directory this test was built
//! into (`cargo build --workspace --bins` first; the test script does).
//! Each process logs to a file in its work directory; `logs()` returns the
//! tail for failure messages.
//!
//! Ingest serves TLS (its default): `start` notes the CA it created under
//! its data directory for its gRPC address, and [`uplink_toml`] (used by
//! [`gateway_toml`], the scenarios and the raw client) connects to such an
//! address over TLS trusting that CA. An address with no CA noted (a test
//! that never started ingest, or `--plaintext`) gets a plaintext uplink.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// Runs `guantong-ingest ARGS` to completion; its stdout (trimmed), or
/// the failure with its stderr.
pub fn ingest_cli(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(binary("guantong-ingest")?)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "guantong-ingest {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// A client certificate and its key, PEM.
pub type Identity = (Vec<u8>, Vec<u8>);

/// Issues a client certificate for `gateway` from the CA of the data
/// directory `data` into `out` (`ca issue`); returns (cert, key) PEM and the
/// serial `ca list` shows.
pub fn issue_certificate(
    data: &Path,
    gateway: &str,
    out: &Path,
    valid_for: &str,
) -> anyhow::Result<(Identity, String)> {
    let data_s = data.to_str().context("utf-8 path")?;
    let out_s = out.to_str().context("utf-8 path")?;
    ingest_cli(&[
        "ca",
        "issue",
        "--data",
        data_s,
        gateway,
        "--out",
        out_s,
        "--valid-for",
        valid_for,
    ])?;
    let cert = std::fs::read(out.join(format!("{gateway}.pem")))?;
    let key = std::fs::read(out.join(format!("{gateway}.key")))?;
    let list = ingest_cli(&["ca", "list", "--data", data_s])?;
    let serial = list
        .lines()
        .rev()
        .find(|l| l.split('\t').nth(1) == Some(gateway))
        .and_then(|l| l.split('\t').next())
        .ok_or_else(|| anyhow::anyhow!("`ca list` lacks {gateway}: {list}"))?
        .to_string();
    Ok(((cert, key), serial))
}

/// Ingest gRPC addresses and the CA file their certificate comes from.
static CA_FILES: Mutex<Vec<(SocketAddr, PathBuf)>> = Mutex::new(Vec::new());

/// Notes that the ingest at `addr` serves TLS with a certificate from `ca`.
pub fn note_ca(addr: SocketAddr, ca: &Path) {
    let mut cas = CA_FILES.lock().unwrap_or_else(|e| e.into_inner());
    cas.retain(|(a, _)| *a != addr);
    cas.push((addr, ca.to_path_buf()));
}

/// The CA file of the ingest at `addr`, when it serves TLS.
pub fn ca_for(addr: SocketAddr) -> Option<PathBuf> {
    let cas = CA_FILES.lock().unwrap_or_else(|e| e.into_inner());
    cas.iter().find(|(a, _)| *a == addr).map(|(_, p)| p.clone())
}

/// The `[uplink]` lines reaching the ingest at `addr`: `https://` with its
/// CA when it serves TLS, else `http://` with `plaintext = true`.
pub fn uplink_toml(addr: SocketAddr) -> String {
    match ca_for(addr) {
        Some(ca) => format!(
            "endpoint = \"https://{addr}\"\nca_file = \"{}\"\n",
            ca.display()
        ),
        None => format!("endpoint = \"http://{addr}\"\nplaintext = true\n"),
    }
}

/// A loopback address with port 0: the listener picks a free port.
pub fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A port free a moment ago, for a config that must name its port (or an
/// address where nothing listens).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Path of a workspace binary next to the running test executable.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("test executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the binaries first with `cargo build --workspace --bins` (./test.sh does this)",
            path.display()
        );
    }
    Ok(path)
}

/// A child process that is killed when dropped.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("GUANTONG_LOG", "info")
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `grace` before SIGKILL. Returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn logs(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        format!(
            "--- last lines of {} ({}) ---\n{}\n",
            self.name,
            self.log.display(),
            tail.join("\n")
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The ingest service as a process, on a data directory that outlives it.
pub struct IngestProc {
    pub proc: Proc,
    pub data: PathBuf,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

impl IngestProc {
    /// Registers `gateway` in a fresh data directory and returns its token.
    pub fn register(data: &Path, gateway: &str) -> anyhow::Result<String> {
        IngestProc::register_with_key(data, gateway, None)
    }

    /// Registers `gateway` with its signing public key (hex).
    pub fn register_with_key(
        data: &Path,
        gateway: &str,
        public_key: Option<&str>,
    ) -> anyhow::Result<String> {
        IngestProc::register_with_algorithm_key(data, gateway, public_key.map(|k| ("ed25519", k)))
    }

    /// Registers `gateway` with its (algorithm, signing public key in hex).
    pub fn register_with_algorithm_key(
        data: &Path,
        gateway: &str,
        key: Option<(&str, &str)>,
    ) -> anyhow::Result<String> {
        let mut cmd = Command::new(binary("guantong-ingest")?);
        cmd.args(["register-gateway", "--data"])
            .arg(data)
            .arg(gateway);
        if let Some((algorithm, k)) = key {
            cmd.args(["--key-algorithm", algorithm, "--public-key", k]);
        }
        let out = cmd.output()?;
        if !out.status.success() {
            bail!(
                "register-gateway failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// Starts ingest; ports 0 pick free ones (read back from its ports file).
    pub async fn start(
        data: &Path,
        grpc: SocketAddr,
        http: SocketAddr,
    ) -> anyhow::Result<IngestProc> {
        IngestProc::start_with_args(data, grpc, http, &[]).await
    }

    /// Starts ingest with extra `serve` arguments (e.g. `--trust-on-first-use`).
    pub async fn start_with_args(
        data: &Path,
        grpc: SocketAddr,
        http: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<IngestProc> {
        let ports_file = data.with_extension("ports.json");
        let _ = std::fs::remove_file(&ports_file);
        let log = data.with_extension("log");
        let proc = Proc::spawn(
            "guantong-ingest",
            Command::new(binary("guantong-ingest")?)
                .arg("serve")
                .arg("--data")
                .arg(data)
                .arg("--grpc-listen")
                .arg(grpc.to_string())
                .arg("--http-listen")
                .arg(http.to_string())
                .arg("--ports-file")
                .arg(&ports_file)
                .args(extra),
            &log,
        )?;
        let mut ingest = IngestProc {
            proc,
            data: data.to_path_buf(),
            grpc,
            http,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ports = std::fs::read_to_string(&ports_file).ok();
            if let Some(v) = ports.and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
                ingest.grpc = v["grpc"].as_str().context("grpc")?.parse()?;
                ingest.http = v["http"].as_str().context("http")?.parse()?;
                if !extra.contains(&"--plaintext") {
                    note_ca(ingest.grpc, &ingest.ca_file());
                }
                return Ok(ingest);
            }
            if !ingest.proc.is_running() || Instant::now() > deadline {
                bail!("ingest did not start\n{}", ingest.proc.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts it again on the same data directory and ports.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill9();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match IngestProc::start(&self.data, self.grpc, self.http).await {
                Ok(new) => {
                    *self = new;
                    return Ok(());
                }
                // The old listener may linger for a moment.
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "ingest restart retry");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The operator CA `serve` created in the data directory.
    pub fn ca_file(&self) -> PathBuf {
        self.data.join("tls").join("ca.pem")
    }

    /// The API as the admin account `serve` created at its first start.
    pub fn api(&self) -> Api {
        self.api_as(self.admin_token().ok())
    }

    /// The API with `token` (None: no token at all).
    pub fn api_as(&self, token: Option<String>) -> Api {
        Api {
            base: format!("http://{}", self.http),
            client: reqwest::Client::new(),
            token,
        }
    }

    /// The admin token `serve` wrote into its data directory.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        let path = self.data.join("admin.token");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("{} (written by serve at its first start)", path.display()))?
            .trim()
            .to_string())
    }
}

/// The public key (hex) printed by `guantong-gateway identity` for `config`,
/// creating the key if needed.
pub fn gateway_public_key(config: &Path) -> anyhow::Result<String> {
    Ok(gateway_identity(config)?.1)
}

/// (algorithm, public key in hex) printed by `guantong-gateway identity` for
/// `config`, creating the key if needed.
pub fn gateway_identity(config: &Path) -> anyhow::Result<(String, String)> {
    gateway_identity_of(Command::new(binary("guantong-gateway")?), config)
}

/// `gateway_identity` with another gateway command (e.g. a cross build
/// under qemu-user).
pub fn gateway_identity_of(
    mut gateway: Command,
    config: &Path,
) -> anyhow::Result<(String, String)> {
    let out = gateway
        .args(["identity", "--config"])
        .arg(config)
        .output()?;
    if !out.status.success() {
        bail!("identity failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|k| k.trim().to_string()))
            .with_context(|| format!("identity printed no {name}:\n{text}"))
    };
    Ok((field("algorithm")?, field("public key")?))
}

/// A gateway process with its config file and buffer directory.
pub struct GatewayProc {
    pub proc: Proc,
    pub config: PathBuf,
}

impl GatewayProc {
    pub fn start(config: &Path) -> anyhow::Result<GatewayProc> {
        GatewayProc::start_command(Command::new(binary("guantong-gateway")?), config)
    }

    /// `start` with another gateway command (e.g. a cross build under
    /// qemu-user); `restart` goes back to the native binary.
    pub fn start_command(mut gateway: Command, config: &Path) -> anyhow::Result<GatewayProc> {
        let log = config.with_extension("log");
        let proc = Proc::spawn(
            "guantong-gateway",
            gateway.arg("run").arg("--config").arg(config),
            &log,
        )?;
        Ok(GatewayProc {
            proc,
            config: config.to_path_buf(),
        })
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill9();
        *self = GatewayProc::start(&self.config)?;
        Ok(())
    }
}

/// Registers `gateway` in ingest's `data` with the key its `config`
/// creates, as an installer does (`identity` before `register-gateway`): a
/// config without ingest or token comes first. Returns the gateway's token.
pub fn register_keyed_gateway(
    data: &Path,
    gateway: &str,
    config: &Path,
    buffer: &Path,
) -> anyhow::Result<String> {
    std::fs::write(
        config,
        gateway_toml(gateway, "127.0.0.1:1".parse()?, "none", buffer),
    )?;
    let key = gateway_public_key(config)?;
    IngestProc::register_with_key(data, gateway, Some(&key))
}

/// Gateway config text for `gateway` pointing at `ingest`, buffering in `buffer_dir`.
pub fn gateway_toml(
    gateway: &str,
    ingest_grpc: SocketAddr,
    token: &str,
    buffer_dir: &Path,
) -> String {
    format!(
        r#"[gateway]
id = "{gateway}"

[uplink]
{uplink}token = "{token}"
max_backoff = "1s"

[buffer]
dir = "{dir}"
max_bytes = "64 MiB"
commit_interval = "100ms"
"#,
        dir = buffer_dir.display(),
        uplink = uplink_toml(ingest_grpc),
    )
}

/// Client for ingest's HTTP API.
pub struct Api {
    pub base: String,
    client: reqwest::Client,
    token: Option<String>,
}

impl Api {
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = self.send(reqwest::Method::GET, path, None).await?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body)
    }

    /// Any request; returns the status and the body (JSON, or the text as a
    /// JSON string).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            let json = b.trim_start().starts_with('{');
            req = req
                .header(
                    "content-type",
                    if json { "application/json" } else { "text/csv" },
                )
                .body(b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }

    /// All stored points of one tag, oldest first.
    pub async fn points(
        &self,
        gateway: &str,
        device: &str,
        tag: &str,
    ) -> anyhow::Result<Vec<Value>> {
        let v = self
            .get(&format!(
                "/api/v1/points?gateway={gateway}&device={device}&tag={tag}"
            ))
            .await?;
        Ok(v["points"].as_array().cloned().unwrap_or_default())
    }

    /// The summary entry of one tag.
    pub async fn tag(
        &self,
        gateway: &str,
        device: &str,
        tag: &str,
    ) -> anyhow::Result<Option<Value>> {
        let s = self.get("/api/v1/summary").await?;
        for g in s["gateways"].as_array().into_iter().flatten() {
            if g["id"] != gateway {
                continue;
            }
            for d in g["devices"].as_array().into_iter().flatten() {
                if d["id"] != device {
                    continue;
                }
                for t in d["tags"].as_array().into_iter().flatten() {
                    if t["name"] == tag {
                        return Ok(Some(t.clone()));
                    }
                }
            }
        }
        Ok(None)
    }
}

/// Polls `check` until it returns Some, or fails after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
