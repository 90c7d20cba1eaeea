//! An async-opcua server run inside the test (or bench) process, with
//! variables the test changes: the real OPC UA peer for the collector's tests.
//!
//! Address space (namespace `urn:guantong:test`, whose index moves when the
//! server is started with `shift_namespace`):
//! - `s=Counter` (UInt32), `s=Temperature` (Double), `s=Running` (Boolean),
//!   `s=Label` (String), `s=Vector` (Int32 array), `i=1001` (Int64),
//!   `g=09087e75-8e5e-499b-954f-f2a9603db28a` (Float), `b=AQID` (UInt16),
//!   all in the folder `s=Plant`;
//! - `s=v0` .. `s=v{items-1}` (Double), in the folder `s=Items`.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_opcua::crypto::{CertificateStore, SecurityPolicy};
use async_opcua::server::address_space::Variable;
use async_opcua::server::diagnostics::NamespaceMetadata;
use async_opcua::server::node_manager::memory::{SimpleNodeManager, simple_node_manager};
use async_opcua::server::{ServerBuilder, ServerHandle, ServerUserToken};
use async_opcua::types::{
    BuildInfo, DataValue, DateTime, Guid, MessageSecurityMode, NodeId, Variant,
};

pub const NAMESPACE: &str = "urn:guantong:test";
pub const GUID: &str = "09087e75-8e5e-499b-954f-f2a9603db28a";
pub const USER: &str = "operator";
pub const PASSWORD: &str = "s3cret-pass";

#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// 0: any free port.
    pub port: u16,
    /// Its own PKI directory (kept across a restart so its certificate stays).
    pub pki_dir: PathBuf,
    /// Also offer Basic256Sha256 and Aes128_Sha256_RsaOaep, Sign and
    /// SignAndEncrypt (the None endpoint is always there).
    pub secure: bool,
    /// Register another namespace first, so the test namespace's index is 3
    /// instead of 2 (as after a server upgrade).
    pub shift_namespace: bool,
    /// `v0`.. variables.
    pub items: usize,
    /// Most monitored items per subscription (0: no limit).
    pub max_items_per_subscription: usize,
    /// Certificates (DER) of X.509 users the server accepts, on every endpoint.
    pub user_certificates: Vec<PathBuf>,
    /// Refuse client certificates not in its `trusted/` (by default it
    /// trusts every client).
    pub refuse_unknown_clients: bool,
}

impl ServerOptions {
    pub fn new(pki_dir: &Path) -> ServerOptions {
        ServerOptions {
            port: 0,
            pki_dir: pki_dir.to_path_buf(),
            secure: false,
            shift_namespace: false,
            items: 0,
            max_items_per_subscription: 1000,
            user_certificates: Vec::new(),
            refuse_unknown_clients: false,
        }
    }
}

pub struct TestServer {
    pub handle: ServerHandle,
    pub manager: Arc<SimpleNodeManager>,
    pub port: u16,
    pub ns: u16,
    pub options: ServerOptions,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(options: ServerOptions) -> anyhow::Result<TestServer> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", options.port)).await?;
        let port = listener.local_addr()?.port();
        let cert_users: Vec<String> = (0..options.user_certificates.len())
            .map(|i| format!("cert-user-{i}"))
            .collect();
        let mut users: Vec<&str> = vec!["ANONYMOUS", USER];
        users.extend(cert_users.iter().map(String::as_str));
        let mut builder = ServerBuilder::new()
            .application_name("Guantong test server")
            .application_uri("urn:guantong:test-server")
            .product_uri("urn:guantong:test-server:product")
            .build_info(BuildInfo {
                product_uri: "urn:guantong:test-server:product".into(),
                manufacturer_name: "Guantong tests".into(),
                product_name: "Guantong OPC UA test server".into(),
                software_version: "1.2.3".into(),
                build_number: "42".into(),
                build_date: DateTime::now(),
            })
            .host("127.0.0.1")
            .port(port)
            .pki_dir(&options.pki_dir)
            .create_sample_keypair(true)
            .trust_client_certs(!options.refuse_unknown_clients)
            .discovery_urls(vec![format!("opc.tcp://127.0.0.1:{port}/")])
            .add_user_token(USER, ServerUserToken::user_pass(USER, PASSWORD));
        for (id, cert) in cert_users.iter().zip(&options.user_certificates) {
            builder = builder.add_user_token(id, ServerUserToken::x509(id.as_str(), cert));
        }
        builder = builder
            .add_endpoint(
                "none",
                (
                    "/",
                    SecurityPolicy::None,
                    MessageSecurityMode::None,
                    &users[..],
                ),
            )
            .max_array_length(100_000)
            .max_message_size(64 * 1024 * 1024)
            .max_chunk_count(0);
        if options.secure {
            for (id, policy, mode) in [
                (
                    "b256_s",
                    SecurityPolicy::Basic256Sha256,
                    MessageSecurityMode::Sign,
                ),
                (
                    "b256_se",
                    SecurityPolicy::Basic256Sha256,
                    MessageSecurityMode::SignAndEncrypt,
                ),
                (
                    "aes_s",
                    SecurityPolicy::Aes128Sha256RsaOaep,
                    MessageSecurityMode::Sign,
                ),
                (
                    "aes_se",
                    SecurityPolicy::Aes128Sha256RsaOaep,
                    MessageSecurityMode::SignAndEncrypt,
                ),
            ] {
                builder = builder.add_endpoint(id, ("/", policy, mode, &users[..]));
            }
        }
        if options.shift_namespace {
            builder = builder.with_node_manager(simple_node_manager(
                NamespaceMetadata {
                    namespace_uri: "urn:guantong:padding".into(),
                    ..Default::default()
                },
                "padding",
            ));
        }
        builder = builder.with_node_manager(simple_node_manager(
            NamespaceMetadata {
                namespace_uri: NAMESPACE.into(),
                ..Default::default()
            },
            "test",
        ));
        {
            let limits = builder.limits_mut();
            limits.subscriptions.max_monitored_items_per_sub = options.max_items_per_subscription;
            limits.subscriptions.max_subscriptions_per_session = 50;
            limits.subscriptions.max_monitored_item_queue_size = 1000;
            limits.subscriptions.max_pending_publish_requests = 100;
            limits.subscriptions.max_queued_notifications = 1000;
            limits.subscriptions.min_publishing_interval_ms = 50.0;
            limits.subscriptions.min_sampling_interval_ms = 0.0;
        }
        let (server, handle) = builder
            .build()
            .map_err(|e| anyhow::anyhow!("test OPC UA server: {e}"))?;
        let manager = handle
            .node_managers()
            .get_by_name::<SimpleNodeManager>("test")
            .context("test node manager")?;
        let ns = handle
            .get_namespace_index(NAMESPACE)
            .context("test namespace")?;
        {
            let mut space = manager.address_space().write();
            let plant = NodeId::new(ns, "Plant");
            space.add_folder(&plant, "Plant", "Plant", &NodeId::objects_folder_id());
            let guid = Guid::from_str(GUID).map_err(|_| anyhow::anyhow!("guid"))?;
            let opaque = async_opcua::types::ByteString::from(vec![1u8, 2, 3]);
            let vars = vec![
                Variable::new(&NodeId::new(ns, "Counter"), "Counter", "Counter", 0u32),
                Variable::new(
                    &NodeId::new(ns, "Temperature"),
                    "Temperature",
                    "Temperature",
                    20.5f64,
                ),
                Variable::new(&NodeId::new(ns, "Running"), "Running", "Running", true),
                Variable::new(&NodeId::new(ns, "Label"), "Label", "Label", "Line 1"),
                Variable::new(
                    &NodeId::new(ns, "Vector"),
                    "Vector",
                    "Vector",
                    vec![1i32, 2, 3],
                ),
                Variable::new(&NodeId::new(ns, 1001u32), "Total", "Total", -7i64),
                Variable::new(&NodeId::new(ns, guid), "Ratio", "Ratio", 0.25f32),
                Variable::new(&NodeId::new(ns, opaque), "Code", "Code", 7u16),
            ];
            space.add_variables(vars, &plant);
            if options.items > 0 {
                let folder = NodeId::new(ns, "Items");
                space.add_folder(&folder, "Items", "Items", &NodeId::objects_folder_id());
                let vars = (0..options.items)
                    .map(|i| {
                        let name = format!("v{i}");
                        Variable::new(
                            &NodeId::new(ns, name.clone()),
                            name.as_str(),
                            name.as_str(),
                            0.0f64,
                        )
                    })
                    .collect();
                space.add_variables(vars, &folder);
            }
        }
        let task = tokio::spawn(async move {
            if let Err(e) = server.run_with(listener).await {
                eprintln!("test OPC UA server stopped: {e}");
            }
        });
        Ok(TestServer {
            handle,
            manager,
            port,
            ns,
            options,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("opc.tcp://127.0.0.1:{}/", self.port)
    }

    pub fn node(&self, id: &str) -> NodeId {
        NodeId::new(self.ns, id)
    }

    /// Sets values (source and server timestamp now) and notifies subscriptions.
    pub fn set(&self, values: Vec<(NodeId, Variant)>) {
        let now = DateTime::now();
        self.set_at(values, now, now);
    }

    /// Sets values with the given source and server timestamps.
    pub fn set_at(&self, values: Vec<(NodeId, Variant)>, source: DateTime, server: DateTime) {
        let updates: Vec<(NodeId, DataValue)> = values
            .into_iter()
            .map(|(n, v)| {
                let mut dv = DataValue::new_at(v, source);
                dv.server_timestamp = Some(server);
                (n, dv)
            })
            .collect();
        let _ = self.manager.set_values(
            self.handle.subscriptions(),
            updates.iter().map(|(n, dv)| (n, None, dv.clone())),
        );
    }

    /// The SHA-1 thumbprint of the server's certificate, hex.
    pub fn thumbprint(&self) -> anyhow::Result<String> {
        let cert = CertificateStore::read_cert(&self.options.pki_dir.join("own/cert.der"))
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok(cert.thumbprint().as_hex_string())
    }

    /// Creates a certificate and private key for an X.509 user; returns
    /// (certificate DER path, key PEM path).
    pub fn user_certificate(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{name}.der"));
        let key = dir.join(format!("{name}.pem"));
        let description = async_opcua::types::ApplicationDescription {
            application_uri: format!("urn:guantong:user:{name}").into(),
            application_name: async_opcua::types::LocalizedText::new("", name),
            ..Default::default()
        };
        let mut data = async_opcua::crypto::X509Data::from((description, None));
        data.key_size = 2048;
        CertificateStore::create_certificate_and_key(&data, true, &cert, &key)
            .map_err(|e| anyhow::anyhow!("user certificate {name}: {e}"))?;
        Ok((cert, key))
    }

    /// Takes every subscription of another session over into a session of
    /// its own (TransferSubscriptions, anonymous, Basic256Sha256 Sign, with
    /// `application_uri`, as the server requires of an anonymous transfer),
    /// so that the other session lives on without them: its publish
    /// requests get BadNoSubscription. The returned session must be kept
    /// (closing it deletes what it took); returns how many it took.
    pub async fn steal_subscriptions(
        &self,
        pki_dir: &Path,
        application_uri: &str,
    ) -> anyhow::Result<(Arc<async_opcua::client::Session>, usize)> {
        use async_opcua::client::{ClientBuilder, IdentityToken};
        use async_opcua::types::UserTokenPolicy;
        let mut client = ClientBuilder::new()
            .application_name("Guantong test thief")
            .application_uri(application_uri)
            .pki_dir(pki_dir)
            .create_sample_keypair(true)
            .trust_server_certs(true)
            .session_retry_limit(0)
            .client()
            .map_err(|e| anyhow::anyhow!("test client: {}", e.join("; ")))?;
        let (session, event_loop) = client
            .connect_to_matching_endpoint(
                (
                    self.url().as_str(),
                    SecurityPolicy::Basic256Sha256.to_str(),
                    MessageSecurityMode::Sign,
                    UserTokenPolicy::anonymous(),
                ),
                IdentityToken::Anonymous,
            )
            .await
            .map_err(|e| anyhow::anyhow!("test client connect: {e}"))?;
        event_loop.spawn();
        anyhow::ensure!(
            tokio::time::timeout(Duration::from_secs(10), session.wait_for_connection())
                .await
                .unwrap_or(false),
            "test client did not connect"
        );
        // Subscription ids are small numbers counted per server.
        let ids: Vec<u32> = (1..=100).collect();
        let results = session
            .transfer_subscriptions(&ids, false)
            .await
            .map_err(|e| anyhow::anyhow!("TransferSubscriptions: {e}"))?;
        let taken = results.iter().filter(|r| r.status_code.is_good()).count();
        anyhow::ensure!(
            taken > 0,
            "no subscription taken: {:?}",
            results.iter().map(|r| r.status_code).collect::<Vec<_>>()
        );
        Ok((session, taken))
    }

    /// Stops the server: its sessions end, its port closes.
    pub async fn stop(self) {
        self.handle.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// An OPC UA server of another stack, python asyncua
/// (`tests/peers/opcua_server.py`, namespace [`ASYNCUA_NAMESPACE`]): static
/// nodes of several types and `Sim.*` nodes stepping every `period_ms`.
/// Killed when dropped.
pub struct AsyncuaServer {
    child: std::process::Child,
    log: PathBuf,
    pub port: u16,
}

pub const ASYNCUA_NAMESPACE: &str = "urn:guantong:asyncua";

impl AsyncuaServer {
    /// `secure`: Sign and SignAndEncrypt endpoints of Basic256Sha256,
    /// Aes128_Sha256_RsaOaep and Aes256_Sha256_RsaPss too (its certificate
    /// under `dir`); `user`: (name, password), the only identity
    /// it accepts.
    pub fn start(
        dir: &Path,
        secure: bool,
        user: Option<(&str, &str)>,
        period_ms: u64,
    ) -> anyhow::Result<AsyncuaServer> {
        AsyncuaServer::spawn(dir, secure, user, period_ms, &[])
    }

    /// Secured, anonymous, its certificate naming only `host` (not
    /// 127.0.0.1, where it is reached): a certificate made for another
    /// machine.
    pub fn start_naming(dir: &Path, host: &str) -> anyhow::Result<AsyncuaServer> {
        AsyncuaServer::spawn(dir, true, None, 200, &["--cert-host", host])
    }

    /// Secured, anonymous, refusing a client whose ApplicationUri is not the
    /// one in its certificate (BadCertificateUriInvalid).
    pub fn start_checking_client_uri(dir: &Path) -> anyhow::Result<AsyncuaServer> {
        AsyncuaServer::spawn(dir, true, None, 200, &["--check-client-uri"])
    }

    /// Its certificate (DER), once started secured.
    pub fn certificate(dir: &Path) -> PathBuf {
        dir.join("asyncua-pki/cert.der")
    }

    fn spawn(
        dir: &Path,
        secure: bool,
        user: Option<(&str, &str)>,
        period_ms: u64,
        extra: &[&str],
    ) -> anyhow::Result<AsyncuaServer> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/opcua_server.py");
        let port = crate::mqtt::free_port()?;
        let log = dir.join(format!("asyncua-{port}.log"));
        let out = std::fs::File::create(&log)?;
        let mut cmd = std::process::Command::new(crate::mqtt::peers_python()?);
        cmd.arg(script)
            .args([
                "--port",
                &port.to_string(),
                "--period",
                &period_ms.to_string(),
            ])
            .arg("--pki")
            .arg(dir.join("asyncua-pki"));
        if secure {
            cmd.arg("--secure");
        }
        if let Some((u, p)) = user {
            cmd.args(["--user", u, "--password", p]);
        }
        cmd.args(extra);
        let child = cmd
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("cannot start the asyncua server")?;
        let server = AsyncuaServer { child, log, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !server.log().contains("ready") {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the asyncua server did not start in 60 s:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("opc.tcp://127.0.0.1:{}/", self.port)
    }

    /// What it printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AsyncuaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
