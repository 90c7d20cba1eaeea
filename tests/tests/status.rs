//! The gateway's status listener and ingest's metrics listener, end to end:
//! a simulated Modbus device behind one fault proxy, ingest behind another,
//! the real binaries. The status page is read in headless Chromium and its
//! figures checked against what the test did (a device taken away, a cut
//! uplink); `/metrics` of both is parsed by a Prometheus text parser.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use guantong_e2e::browser::chromium_dom;
use guantong_e2e::procs::{
    GatewayProc, IngestProc, any_port, binary, free_port, gateway_public_key, gateway_toml,
    wait_for,
};
use guantong_e2e::proxy::{Mode, Proxy};
use guantong_e2e::sim::{SimDevice, standard_device_toml};
use serde_json::Value;

const DEV: &str = "press-1";
/// Poll interval and timeout of the device; it has one retry by default.
const POLL: &str = "200ms";
/// Requests one poll of the simulator's standard map costs: holding 0-19
/// merged, one input register, one coil, one discrete input.
const REQUESTS_PER_CYCLE: u64 = 4;

struct Setup {
    dir: tempfile::TempDir,
    _sim: SimDevice,
    device_link: Proxy,
    uplink: Proxy,
    ingest: IngestProc,
    gateway: GatewayProc,
    status: SocketAddr,
}

impl Setup {
    async fn start(gw: &str) -> anyhow::Result<Setup> {
        let dir = tempfile::tempdir()?;
        let sim = SimDevice::new();
        let (sim_addr, _task) = sim.serve(any_port()).await?;
        let device_link = Proxy::start(sim_addr).await?;
        let data = dir.path().join("ingest");
        let config = dir.path().join("gateway.toml");
        let buffer = dir.path().join("buffer");
        let status = free_port()?;
        let text = |endpoint: SocketAddr, token: &str| {
            gateway_toml(gw, endpoint, token, &buffer)
                + &format!("\n[status]\nlisten = \"{status}\"\n")
                + &standard_device_toml(DEV, device_link.addr, POLL)
        };
        std::fs::write(&config, text("127.0.0.1:1".parse()?, "none"))?;
        let key = gateway_public_key(&config)?;
        let token = IngestProc::register_with_key(&data, gw, Some(&key))?;
        let ingest = IngestProc::start_with_args(
            &data,
            any_port(),
            any_port(),
            &["--metrics-listen", "127.0.0.1:0"],
        )
        .await?;
        let uplink = Proxy::start(ingest.grpc).await?;
        std::fs::write(&config, text(uplink.addr, &token))?;
        let gateway = GatewayProc::start(&config)?;
        Ok(Setup {
            dir,
            _sim: sim,
            device_link,
            uplink,
            ingest,
            gateway,
            status,
        })
    }

    fn logs(&self) -> String {
        format!("{}{}", self.gateway.proc.logs(), self.ingest.proc.logs())
    }

    async fn json(&self) -> anyhow::Result<Value> {
        let url = format!("http://{}/status.json", self.status);
        Ok(reqwest::get(url).await?.error_for_status()?.json().await?)
    }

    /// Polls `/status.json` until `check` holds; returns the time it took.
    async fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Duration {
        let started = Instant::now();
        let r = wait_for(what, timeout, || async {
            let s = self.json().await?;
            Ok(check(&s).then_some(()))
        })
        .await;
        if let Err(e) = r {
            let last = self.json().await.map(|v| v.to_string()).unwrap_or_default();
            panic!("{e}\nlast status: {last}\n{}", self.logs());
        }
        started.elapsed()
    }

    /// The page as Chromium renders it.
    fn page(&self) -> String {
        let (dom, console) = chromium_dom(
            &format!("http://{}/", self.status),
            &self.dir.path().join("chromium"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(console.is_empty(), "console errors: {console:?}");
        dom
    }

    async fn metrics_of(&self, addr: SocketAddr) -> prometheus_parse::Scrape {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("scrape {addr}: {e}"))
            .text()
            .await
            .unwrap_or_else(|e| panic!("scrape {addr}: {e}"));
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    fn ingest_metrics_addr(&self) -> SocketAddr {
        let ports = std::fs::read_to_string(self.ingest.data.with_extension("ports.json"))
            .expect("ingest ports file");
        let v: Value = serde_json::from_str(&ports).expect("ports JSON");
        v["metrics"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no metrics address in {ports}"))
    }
}

/// The text of the element with `id` in `dom` (no nested elements).
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .and_then(|i| dom[i..].find('>').map(|j| i + j + 1))
        .unwrap_or_else(|| panic!("no element `{id}` in the page:\n{dom}"));
    let end = dom[start..].find('<').map_or(dom.len(), |j| start + j);
    dom[start..end].trim()
}

fn number_of(dom: &str, id: &str) -> f64 {
    let text = text_of(dom, id);
    text.parse()
        .unwrap_or_else(|_| panic!("`{id}` is `{text}`, not a number"))
}

fn device<'a>(s: &'a Value, id: &str) -> &'a Value {
    s["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == id))
        .unwrap_or_else(|| panic!("no device {id} in {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_a_device_taken_away_as_down_and_a_cut_uplink_as_growing_backlog()
-> anyhow::Result<()> {
    let s = Setup::start("gw-status").await?;
    let state = format!("device-{DEV}-state");
    s.wait_status(
        "device up, uplink connected",
        Duration::from_secs(30),
        |v| {
            device(v, DEV)["state"] == "up"
                && v["uplink"]["state"] == "connected"
                && v["uplink"]["last_ack_ms"].is_i64()
        },
    )
    .await;
    let page = s.page();
    assert!(text_of(&page, &state).starts_with("up"), "{page}");
    assert_eq!(text_of(&page, "uplink-state"), "connected");
    assert!(text_of(&page, "rtt").ends_with(" ms"), "{page}");
    // Ingest's clock is this machine's: the offset is a few ms at most.
    let offset = text_of(&page, "clock-offset");
    let offset_ms: i64 = offset
        .trim_end_matches(" ms")
        .parse()
        .unwrap_or_else(|_| panic!("clock offset `{offset}`"));
    assert!(offset_ms.abs() < 1000, "clock offset {offset_ms} ms");
    assert_eq!(text_of(&page, "ready"), "yes");
    assert_eq!(text_of(&page, "gateway"), "gw-status");
    assert!(number_of(&page, &format!("device-{DEV}-good")) > 0.0);
    assert_eq!(
        number_of(&page, &format!("device-{DEV}-requests")),
        REQUESTS_PER_CYCLE as f64,
        "requests per cycle on the page"
    );

    // The device is taken away: packets vanish, no RST. A poll times out
    // after 500 ms and is retried once; the page must say so within a few
    // polls of that, whatever the load.
    s.device_link.set(Mode::Blackhole);
    let took = s
        .wait_status("device down", Duration::from_secs(10), |v| {
            device(v, DEV)["state"] == "down"
        })
        .await;
    println!("device shown down {took:?} after it was taken away");
    let page = s.page();
    let shown = text_of(&page, &state);
    assert!(
        shown.starts_with("down") && shown.contains("no answer within the timeout"),
        "{shown}"
    );
    assert!(number_of(&page, &format!("device-{DEV}-bad")) > 0.0);

    // It comes back.
    s.device_link.set(Mode::Pass);
    s.wait_status("device up again", Duration::from_secs(30), |v| {
        device(v, DEV)["state"] == "up"
    })
    .await;
    assert!(text_of(&s.page(), &state).starts_with("up"));

    // The uplink is cut: the backlog grows, batches and age alike.
    s.uplink.set(Mode::Refuse);
    s.wait_status("uplink not connected", Duration::from_secs(30), |v| {
        v["uplink"]["state"] != "connected" && v["buffer"]["pending_batches"].as_u64() > Some(2)
    })
    .await;
    let first = s.page();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = s.page();
    assert_ne!(text_of(&second, "uplink-state"), "connected");
    let (age1, age2) = (
        number_of(&first, "backlog-age"),
        number_of(&second, "backlog-age"),
    );
    assert!(age2 >= age1 + 2.0, "backlog age {age1} s, then {age2} s");
    let (n1, n2) = (
        number_of(&first, "pending-batches"),
        number_of(&second, "pending-batches"),
    );
    assert!(n2 > n1, "pending batches {n1}, then {n2}");
    assert!(
        !text_of(&second, "uplink-error").is_empty() && text_of(&second, "uplink-error") != "-",
        "the last uplink error is shown"
    );

    // The terminal shows the same.
    let out = Command::new(binary("guantong-gateway")?)
        .args(["status", "--config"])
        .arg(&s.gateway.config)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("gateway           gw-status"), "{text}");
    assert!(!text.contains("uplink            connected"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with(DEV))
        .unwrap_or_else(|| panic!("no row for {DEV}:\n{text}"));
    assert_eq!(row.split_whitespace().nth(2), Some("up"), "{row}");
    let requests = REQUESTS_PER_CYCLE.to_string();
    assert_eq!(
        row.split_whitespace().nth(6),
        Some(requests.as_str()),
        "requests per cycle in the terminal: {row}"
    );

    // The link returns: the backlog drains.
    s.uplink.set(Mode::Pass);
    s.wait_status("backlog drained", Duration::from_secs(60), |v| {
        v["uplink"]["state"] == "connected" && v["buffer"]["backlog_age_s"].as_f64() < Some(2.0)
    })
    .await;
    Ok(())
}

/// Samples of `name` by their `device` label (or "" without one).
fn by_device(scrape: &prometheus_parse::Scrape, name: &str) -> HashMap<String, f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter_map(|s| {
            let v = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            Some((s.labels.get("device").unwrap_or_default().to_string(), v))
        })
        .collect()
}

fn try_value(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    try_value(scrape, name, labels).unwrap_or_else(|| {
        let names: Vec<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
        panic!("no {name} {labels:?} among {names:?}")
    })
}

fn histogram_count(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .and_then(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map(|b| b.count),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no histogram {name}"))
}

async fn get_status(url: String) -> reqwest::StatusCode {
    reqwest::get(&url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_gateway_and_ingest_parse_as_prometheus_text() -> anyhow::Result<()> {
    let s = Setup::start("gw-metrics").await?;
    s.wait_status("batches acknowledged", Duration::from_secs(30), |v| {
        v["uplink"]["last_ack_ms"].is_i64() && device(v, DEV)["good"].as_u64() > Some(20)
    })
    .await;
    let ingest = s.ingest_metrics_addr();
    for url in [
        format!("http://{}/healthz", s.status),
        format!("http://{}/readyz", s.status),
        format!("http://{ingest}/healthz"),
        format!("http://{ingest}/readyz"),
    ] {
        assert_eq!(get_status(url.clone()).await, 200, "{url}");
    }

    let gw = s.metrics_of(s.status).await;
    let good = value(
        &gw,
        "guantong_device_samples_total",
        &[("device", DEV), ("quality", "good")],
    );
    let status = s.json().await?;
    assert!(good > 20.0, "{good} good samples");
    assert!(
        good <= device(&status, DEV)["good"].as_f64().unwrap_or(0.0),
        "the counter never runs ahead of the page"
    );
    assert_eq!(value(&gw, "guantong_device_up", &[("device", DEV)]), 1.0);
    assert_eq!(
        value(
            &gw,
            "guantong_device_requests_per_cycle",
            &[("device", DEV)]
        ),
        REQUESTS_PER_CYCLE as f64
    );
    assert_eq!(
        device(&status, DEV)["requests_per_cycle"],
        REQUESTS_PER_CYCLE,
        "{status}"
    );
    assert_eq!(value(&gw, "guantong_uplink_connected", &[]), 1.0);
    assert!(value(&gw, "guantong_uplink_batches_acked_total", &[]) >= 1.0);
    assert!(histogram_count(&gw, "guantong_uplink_ack_latency_seconds") >= 1.0);
    assert_eq!(
        value(&gw, "guantong_buffer_capacity_bytes", &[]),
        64.0 * 1024.0 * 1024.0
    );
    // Labels are bounded: per device, never per tag.
    for sample in &gw.samples {
        assert!(sample.labels.get("tag").is_none(), "{sample:?}");
    }
    assert_eq!(
        by_device(&gw, "guantong_device_up")
            .keys()
            .collect::<Vec<_>>(),
        vec![DEV]
    );

    let ing = s.metrics_of(ingest).await;
    assert!(value(&ing, "guantong_ingest_batches_stored_total", &[]) >= 1.0);
    // Stored points were collected first: never more than the gateway saw.
    let points = value(&ing, "guantong_ingest_points_stored_total", &[]);
    let bad = try_value(
        &gw,
        "guantong_device_samples_total",
        &[("device", DEV), ("quality", "bad")],
    )
    .unwrap_or(0.0);
    assert!(
        points >= 1.0 && points <= good + bad,
        "ingest stored {points} points; the gateway collected {good} good, some bad"
    );
    assert_eq!(value(&ing, "guantong_ingest_streams_connected", &[]), 1.0);
    assert_eq!(
        value(&ing, "guantong_ingest_batches_rejected_total", &[]),
        0.0
    );
    assert!(histogram_count(&ing, "guantong_ingest_ack_latency_seconds") >= 1.0);

    // The uplink cut: the gateway says so in its metrics.
    s.uplink.set(Mode::Refuse);
    s.wait_status("uplink cut", Duration::from_secs(30), |v| {
        v["uplink"]["state"] != "connected"
    })
    .await;
    let gw = s.metrics_of(s.status).await;
    assert_eq!(value(&gw, "guantong_uplink_connected", &[]), 0.0);
    let ing = s.metrics_of(ingest).await;
    let streams = value(&ing, "guantong_ingest_streams_connected", &[]);
    assert!(streams <= 1.0, "{streams} streams");
    Ok(())
}

#[test]
fn check_names_a_status_listen_that_is_not_an_address() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("gateway.toml");
    let text = gateway_toml("gw-bad", any_port(), "t", Path::new("buffer"))
        + "\n[status]\nlisten = \"localhost\"\n";
    std::fs::write(&config, text)?;
    let out = Command::new(binary("guantong-gateway")?)
        .args(["check", "--config"])
        .arg(&config)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("status.listen: `localhost` is not an address"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_address_in_use_is_logged_and_the_gateway_collects_on() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let sim = SimDevice::new();
    let (sim_addr, _task) = sim.serve(any_port()).await?;
    let config = dir.path().join("gateway.toml");
    let text = gateway_toml(
        "gw-busy",
        "127.0.0.1:1".parse()?,
        "t",
        &dir.path().join("buffer"),
    ) + &format!("\n[status]\nlisten = \"{}\"\n", taken.local_addr()?)
        + &standard_device_toml(DEV, sim_addr, POLL);
    std::fs::write(&config, text)?;
    let mut gateway = GatewayProc::start(&config)?;
    let log = config.with_extension("log");
    let requests = sim.requests();
    wait_for("the warning and polls", Duration::from_secs(30), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok((text.contains("no status page; collecting without it")
            && sim.requests() > requests + 5)
            .then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", gateway.proc.logs()))?;
    assert!(gateway.proc.is_running(), "{}", gateway.proc.logs());
    Ok(())
}
