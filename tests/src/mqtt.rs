//! Real MQTT peers for the scenarios and the benchmark: the shared Mosquitto
//! on 127.0.0.1:1883, a private Mosquitto process that can be restarted (with
//! persistence, so sessions survive), and a publisher on a real rumqttc
//! client that reconnects and counts what the broker acknowledged.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::procs::Proc;

pub const SHARED_BROKER: &str = "127.0.0.1:1883";

/// The shared broker's port, or an error saying how to start it.
pub fn shared_broker() -> anyhow::Result<u16> {
    let addr: SocketAddr = SHARED_BROKER.parse()?;
    if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err() {
        bail!(
            "no MQTT broker on {SHARED_BROKER}: start one with `mosquitto -d -p 1883` \
             (./test.sh installs and starts it)"
        );
    }
    Ok(addr.port())
}

/// A topic prefix no other test run uses.
pub fn unique_prefix(test: &str) -> String {
    format!(
        "guantong-test/{test}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, up: bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() == up {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A Mosquitto of our own on a free port, persisting sessions in `dir`.
pub struct OwnBroker {
    pub port: u16,
    conf: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl OwnBroker {
    pub fn start(dir: &Path) -> anyhow::Result<OwnBroker> {
        OwnBroker::start_with(dir, true)
    }

    /// `persistence`: save sessions to disk (survive a restart); off for the
    /// benchmark, where disk writes of the broker would compete with ours.
    pub fn start_with(dir: &Path, persistence: bool) -> anyhow::Result<OwnBroker> {
        OwnBroker::start_conf(dir, persistence, "")
    }

    /// `extra`: more Mosquitto config after the plain listener on `port`
    /// (e.g. a TLS listener).
    pub fn start_conf(dir: &Path, persistence: bool, extra: &str) -> anyhow::Result<OwnBroker> {
        let port = free_port()?;
        let data = dir.join("mosquitto-data");
        std::fs::create_dir_all(&data)?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                // `user root`: started as root, Mosquitto would otherwise
                // switch to its own user, which cannot write into our temp dir.
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence {persistence}\n\
                 persistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 0\n\
                 autosave_interval 1\n{extra}",
                data.display()
            ),
        )?;
        let mut b = OwnBroker {
            port,
            conf,
            log: dir.join("mosquitto.log"),
            proc: None,
        };
        b.spawn()?;
        Ok(b)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        if let Err(e) = Command::new("mosquitto").arg("-h").output() {
            bail!(
                "cannot run `mosquitto` ({e}): install it with `apt-get install mosquitto` (./test.sh does)"
            );
        }
        let proc = Proc::spawn(
            "mosquitto",
            Command::new("mosquitto").arg("-c").arg(&self.conf),
            &self.log,
        )?;
        self.proc = Some(proc);
        if !wait_port(self.port, true, Duration::from_secs(10)) {
            bail!(
                "mosquitto did not listen on {}\n{}",
                self.port,
                self.proc.as_ref().map(|p| p.logs()).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// SIGTERM (Mosquitto saves its sessions), then start again on the same
    /// port and data.
    pub fn restart(&mut self, down_for: Duration) -> anyhow::Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10));
        }
        wait_port(self.port, false, Duration::from_secs(5));
        std::thread::sleep(down_for);
        self.spawn()
    }
}

/// A publisher on a real rumqttc client, reconnecting. `persistent` keeps
/// its session (and so its unacknowledged messages) across a broker restart;
/// on the shared broker use a clean session, so test runs leave nothing there.
pub struct Publisher {
    pub client: AsyncClient,
    /// PUBACKs received (QoS 1 messages the broker has taken).
    pub acked: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub async fn connect(
        port: u16,
        client_id: &str,
        persistent: bool,
    ) -> anyhow::Result<Publisher> {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10))
            .set_clean_session(!persistent)
            .set_inflight(100)
            .set_request_channel_capacity(100_000)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(o, 100_000);
        let acked = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let count = acked.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .context("publisher: no ConnAck within 10 s")??;
        Ok(Publisher {
            client,
            acked,
            task,
        })
    }

    pub async fn publish(&self, topic: &str, qos: QoS, payload: impl Into<Vec<u8>>) {
        // Only fails when the event loop task is gone.
        let _ = self.client.publish(topic, qos, false, payload).await;
    }

    /// Waits until the broker acknowledged `n` QoS 1 messages.
    pub async fn wait_acked(&self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.acked.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                bail!(
                    "the broker acknowledged {} of {n} messages",
                    self.acked.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Removes the broker's saved session of `client_id` (connect with a clean
/// session, disconnect), so a test leaves no session on the shared broker.
pub async fn forget_session(port: u16, client_id: &str) -> anyhow::Result<()> {
    let o = MqttOptions::new(client_id, "127.0.0.1", port);
    let (client, mut eventloop) = AsyncClient::new(o, 10);
    let connected = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await;
    connected.context("forget_session: no ConnAck")??;
    client.disconnect().await?;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    Ok(())
}

/// The message the broker retains on `topic`, as a client subscribing now
/// receives it (`None` if none arrives within 2 s).
pub async fn retained_message(port: u16, topic: &str) -> anyhow::Result<Option<rumqttc::Publish>> {
    let id = format!("guantong-test-retained-{:08x}", rand::random::<u32>());
    let (client, mut eventloop) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 10);
    client.subscribe(topic, QoS::AtLeastOnce).await?;
    let received = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await? {
                return anyhow::Ok(p);
            }
        }
    })
    .await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    match received {
        Ok(p) => Ok(Some(p?)),
        Err(_) => Ok(None),
    }
}

/// A test CA with a server certificate for 127.0.0.1 and a client
/// certificate, made with the `openssl` command in `dir`.
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    pub fn create(dir: &Path) -> anyhow::Result<TestPki> {
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .context("cannot run `openssl`: install it with `apt-get install openssl` (./test.sh does)")?;
            if !out.status.success() {
                bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=guantong-test-ca",
        ]);
        run(&a)?;
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext)?;
            let (key, csr, pem, extf) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            let mut a = vec!["req"];
            a.extend(ec);
            a.extend(["-keyout", &key, "-out", &csr, "-subj"]);
            let subj = format!("/CN=guantong-test-{name}");
            a.push(&subj);
            run(&a)?;
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extf,
            ])?;
        }
        Ok(TestPki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        })
    }
}

/// The Python of the third-party peers: `GUANTONG_PEERS_PYTHON`, else the
/// virtualenv `./test.sh` makes at the repository root (`.venv-peers/`).
/// Missing is an error saying how to get it, never a skipped test.
pub fn peers_python() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("GUANTONG_PEERS_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-peers/bin/python"),
    };
    if !path.exists() {
        bail!(
            "{} is missing: the third-party peers (pysparkplug) live in a virtualenv that ./test.sh \
             creates; run it, or set GUANTONG_PEERS_PYTHON to a python that has them",
            path.display()
        );
    }
    Ok(path)
}

/// A Sparkplug B edge node of pysparkplug (`tests/peers/sparkplug_edge_node.py`)
/// on a broker, driven by commands on its stdin; what it did is in its log
/// (`sent ...`, `rebirth requested`). Killed when dropped.
pub struct SparkplugEdgeNode {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    log: PathBuf,
}

impl SparkplugEdgeNode {
    pub fn start(
        dir: &Path,
        port: u16,
        group: &str,
        node: &str,
        device: &str,
    ) -> anyhow::Result<SparkplugEdgeNode> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/sparkplug_edge_node.py");
        let log = dir.join(format!("edge-node-{node}.log"));
        let out = std::fs::File::create(&log)?;
        let mut child = Command::new(peers_python()?)
            .arg(script)
            .args(["--port", &port.to_string(), "--group", group])
            .args(["--node", node, "--device", device])
            .stdin(std::process::Stdio::piped())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("cannot start the pysparkplug edge node")?;
        let stdin = child.stdin.take().context("edge node stdin")?;
        let node = SparkplugEdgeNode { child, stdin, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !node.log().contains("connected") {
            if Instant::now() > deadline {
                bail!("the edge node did not connect in 30 s:\n{}", node.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(node)
    }

    /// Sends one command line (`birth`, `data {json}`, `gap`, ...).
    pub fn send(&mut self, command: &str) -> anyhow::Result<()> {
        use std::io::Write;
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .with_context(|| format!("edge node gone:\n{}", self.log()))
    }

    /// What the edge node printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many rebirth requests (NCMD) it received.
    pub fn rebirths_requested(&self) -> usize {
        self.log().matches("rebirth requested").count()
    }
}

impl Drop for SparkplugEdgeNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
