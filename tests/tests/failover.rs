//! Uplink failover end to end, with the real binaries: a gateway given
//! several `uplink.endpoints` tries them in order. With an address where
//! nothing listens first, points reach ingest through the second; with two
//! routes to one ingest (fault proxies), a stream that ends moves the
//! gateway to the next route and, wrapping around, back to the first, and
//! every counter value is stored once.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use guantong_e2e::procs::{
    GatewayProc, IngestProc, any_port, binary, free_port, gateway_toml, register_keyed_gateway,
    wait_for,
};
use guantong_e2e::proxy::{Mode, Proxy};
use guantong_e2e::scenario::check_counter;
use guantong_e2e::sim::{SimDevice, standard_device_toml};
use serde_json::Value;

const GW: &str = "gw-failover";
const DEV: &str = "sim-1";

/// A simulated device, ingest, and a gateway whose uplink lists
/// `endpoints` (all TLS, trusting ingest's CA).
struct Setup {
    dir: tempfile::TempDir,
    sim: SimDevice,
    sim_addr: SocketAddr,
    token: String,
    ingest: IngestProc,
    gateway: Option<GatewayProc>,
    status: SocketAddr,
}

impl Setup {
    /// The device and ingest, with the gateway registered.
    async fn ingest() -> anyhow::Result<Setup> {
        let dir = tempfile::tempdir()?;
        let sim = SimDevice::new();
        let (sim_addr, _task) = sim.serve(any_port()).await?;
        let data = dir.path().join("ingest");
        let token = register_keyed_gateway(
            &data,
            GW,
            &dir.path().join("gateway.toml"),
            &dir.path().join("buffer"),
        )?;
        let ingest = IngestProc::start(&data, any_port(), any_port()).await?;
        Ok(Setup {
            dir,
            sim,
            sim_addr,
            token,
            ingest,
            gateway: None,
            status: free_port()?,
        })
    }

    fn start_gateway(&mut self, endpoints: &[SocketAddr]) -> anyhow::Result<()> {
        let config = self.dir.path().join("gateway.toml");
        let buffer = self.dir.path().join("buffer");
        let list: Vec<String> = endpoints
            .iter()
            .map(|a| format!("\"https://{a}\""))
            .collect();
        let text = gateway_toml(GW, self.ingest.grpc, &self.token, &buffer).replace(
            &format!("endpoint = \"https://{}\"", self.ingest.grpc),
            &format!("endpoints = [{}]", list.join(", ")),
        );
        anyhow::ensure!(text.contains("endpoints = ["), "{text}");
        std::fs::write(
            &config,
            text + &format!("\n[status]\nlisten = \"{}\"\n", self.status)
                + &standard_device_toml(DEV, self.sim_addr, "50ms"),
        )?;
        self.gateway = Some(GatewayProc::start(&config)?);
        Ok(())
    }

    fn logs(&self) -> String {
        let gateway = self.gateway.as_ref().map(|g| g.proc.logs());
        format!("{}{}", gateway.unwrap_or_default(), self.ingest.proc.logs())
    }

    async fn status(&self) -> anyhow::Result<Value> {
        let url = format!("http://{}/status.json", self.status);
        Ok(reqwest::get(url).await?.error_for_status()?.json().await?)
    }

    /// Good counter points ingest stored.
    async fn stored(&self) -> anyhow::Result<Vec<Value>> {
        let points = self.ingest.api().points(GW, DEV, "counter").await?;
        Ok(points
            .into_iter()
            .filter(|p| p["quality"] == "good")
            .collect())
    }

    /// Waits until the uplink is connected to `endpoint` and ingest has
    /// stored more than `beyond` good counter points; returns how many.
    async fn delivering_through(&self, endpoint: SocketAddr, beyond: usize) -> usize {
        let url = format!("https://{endpoint}");
        let r = wait_for(
            &format!("points stored through {url}"),
            Duration::from_secs(20),
            || async {
                let s = self.status().await?;
                let n = self.stored().await?.len();
                let on = s["uplink"]["state"] == "connected" && s["uplink"]["endpoint"] == url;
                Ok((on && n > beyond + 5).then_some(n))
            },
        )
        .await;
        r.unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_arrive_through_the_second_endpoint_when_nothing_listens_at_the_first()
-> anyhow::Result<()> {
    let dead = free_port()?;
    let mut s = Setup::ingest().await?;
    s.start_gateway(&[dead, s.ingest.grpc])?;
    s.delivering_through(s.ingest.grpc, 0).await;

    // The first endpoint was tried first, and failed.
    let config = s.dir.path().join("gateway.toml");
    let log = std::fs::read_to_string(config.with_extension("log"))?;
    let failed = log
        .lines()
        .position(|l| l.contains("uplink disconnected") && l.contains(&format!("https://{dead}")));
    let connected = log.lines().position(|l| {
        l.contains("uplink connected") && l.contains(&format!("https://{}", s.ingest.grpc))
    });
    assert!(
        matches!((failed, connected), (Some(f), Some(c)) if f < c),
        "a failure at {dead} before connecting to ingest\n{}",
        s.logs()
    );

    // `status` names the endpoint in use.
    let out = Command::new(binary("guantong-gateway")?)
        .args(["status", "--config"])
        .arg(&config)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("endpoint          https://{}", s.ingest.grpc)),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_moves_to_the_next_endpoint_and_wraps_around() -> anyhow::Result<()> {
    let mut s = Setup::ingest().await?;
    // Two routes to one ingest.
    let a = Proxy::start(s.ingest.grpc).await?;
    let b = Proxy::start(s.ingest.grpc).await?;
    s.start_gateway(&[a.addr, b.addr])?;

    let n = s.delivering_through(a.addr, 0).await;
    a.set(Mode::Refuse);
    let n = s.delivering_through(b.addr, n).await;
    a.set(Mode::Pass);
    b.set(Mode::Refuse);
    s.delivering_through(a.addr, n).await;

    // Every value served is stored once, across both switches.
    s.sim.set_fault(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last = u64::from(s.sim.counter());
    let points = wait_for(
        "every served counter value stored",
        Duration::from_secs(20),
        || async {
            let points = s.stored().await?;
            Ok((points.len() as u64 >= last).then_some(points))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    if let Err(e) = check_counter(&points, last, 0, true) {
        panic!("{e}\n{}", s.logs());
    }
    Ok(())
}
