//! MQTT ingestion benchmark: messages/s and values/s sustained from a real
//! Mosquitto into the gateway's durable buffer, beside a bare rumqttc
//! subscriber counting the same messages in the same run (the limit).
//!
//! Per run: a private Mosquitto (no persistence), one publisher, the bare
//! subscriber and the gateway's MQTT collector + buffer writer + redb buffer
//! (the library, in this process) subscribed to the same topic. After a
//! warm-up, `--messages` JSON messages of `--values` numbers each are
//! published. Each side's sustained rate is taken over the steady middle of
//! the run: 80% of the messages / (time its count went from 10% to 90%),
//! counted on arrival for the bare subscriber and once committed to disk for
//! the gateway. The whole-run rate (first publish to last message, which for
//! the gateway includes the last commit) is printed beside it.
//!
//! Two modes:
//! - `flow`: messages are published while both sides are subscribed; the
//!   limit is then what the publisher and the broker sustain.
//! - `drain`: both sides subscribe, go away, the messages are published and
//!   queued in their sessions, then both come back at once and drain their
//!   queues as fast as they can read (and, for the gateway, commit and
//!   acknowledge): the limit is the bare subscriber's own speed.
//!
//! `cargo run --release -p guantong-e2e --bin bench-mqtt -- --runs 5`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use guantong_e2e::mqtt::{OwnBroker, Publisher};
use guantong_gateway::buffer::Buffer;
use guantong_gateway::collector::{Collector, PointSink};
use guantong_gateway::config::{Config, DeviceConfig};
use guantong_gateway::mqtt::MqttCollector;
use guantong_gateway::status::{DeviceSpec, Status};
use guantong_gateway::writer::Writer;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// Messages per run.
    #[arg(long, default_value_t = 50_000)]
    messages: u64,
    /// Values (tags) per message.
    #[arg(long, default_value_t = 10)]
    values: usize,
    /// Runs per QoS; medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// QoS levels to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,0")]
    qos: Vec<u8>,
    /// More Mosquitto config lines for the benchmark's broker, e.g.
    /// `max_inflight_messages 20` (Mosquitto's default; the benchmark's
    /// broker otherwise has no in-flight limit).
    #[arg(long, default_value = "")]
    broker_conf: String,
    /// Modes to measure: flow, drain.
    #[arg(long, value_delimiter = ',', default_value = "flow,drain")]
    mode: Vec<String>,
    /// `json`, or `sparkplug`: an edge node's NDATA with alias-only Float
    /// metrics after one NBIRTH, seq counting (flow mode only: a collector
    /// that reconnects asks for a new birth, which the bench does not send).
    #[arg(long, default_value = "json")]
    payload: String,
}

struct RunResult {
    /// Sustained (10% to 90% of the messages).
    gateway_msgs_per_s: f64,
    bare_msgs_per_s: f64,
    /// Whole run.
    gateway_whole: f64,
    bare_whole: f64,
}

/// When a side's count passed 10%, 90% and 100% of the messages.
#[derive(Default)]
struct Progress {
    t10: Option<Duration>,
    t90: Option<Duration>,
    done: Option<Duration>,
}

impl Progress {
    fn update(&mut self, count: u64, n: u64, now: Duration) {
        if self.t10.is_none() && count * 10 >= n {
            self.t10 = Some(now);
        }
        if self.t90.is_none() && count * 10 >= n * 9 {
            self.t90 = Some(now);
        }
        if self.done.is_none() && count >= n {
            self.done = Some(now);
        }
    }
    fn sustained(&self, n: u64) -> anyhow::Result<f64> {
        let (Some(a), Some(b)) = (self.t10, self.t90) else {
            bail!("run unfinished");
        };
        Ok(0.8 * n as f64 / (b - a).as_secs_f64().max(1e-6))
    }
    fn whole(&self, n: u64) -> anyhow::Result<f64> {
        Ok(n as f64 / self.done.context("run unfinished")?.as_secs_f64())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        println!(
            "bench-mqtt: {} {} messages x {} values per run, {} runs per QoS",
            args.messages, args.payload, args.values, args.runs
        );
        for (mode, &qos) in args
            .mode
            .iter()
            .flat_map(|m| args.qos.iter().map(move |q| (m.as_str(), q)))
        {
            let drain = match mode {
                "flow" => false,
                "drain" => true,
                other => bail!("unknown mode `{other}`, expected flow or drain"),
            };
            match (args.payload.as_str(), drain) {
                ("json", _) | ("sparkplug", false) => {}
                ("sparkplug", true) => bail!("--payload sparkplug measures flow mode only"),
                (other, _) => bail!("unknown payload `{other}`, expected json or sparkplug"),
            }
            let mut results = Vec::new();
            for run in 0..args.runs {
                let r = match one_run(&args, qos, run, drain).await {
                    Ok(r) => r,
                    Err(e) => {
                        println!("  {mode} qos {qos} run {run}: FAILED, left out of the medians: {e:#}");
                        continue;
                    }
                };
                println!(
                    "  {mode} qos {qos} run {run}: sustained gateway {:>7.0} msg/s {:>8.0} values/s | bare subscriber {:>7.0} msg/s | ratio {:.3}   (whole run: {:.0} vs {:.0} msg/s, ratio {:.3})",
                    r.gateway_msgs_per_s,
                    r.gateway_msgs_per_s * args.values as f64,
                    r.bare_msgs_per_s,
                    r.gateway_msgs_per_s / r.bare_msgs_per_s,
                    r.gateway_whole,
                    r.bare_whole,
                    r.gateway_whole / r.bare_whole
                );
                results.push(r);
            }
            if results.is_empty() {
                println!("{mode} qos {qos}: no run finished");
                continue;
            }
            let gw = median(results.iter().map(|r| r.gateway_msgs_per_s).collect());
            let bare = median(results.iter().map(|r| r.bare_msgs_per_s).collect());
            let ratio = median(
                results
                    .iter()
                    .map(|r| r.gateway_msgs_per_s / r.bare_msgs_per_s)
                    .collect(),
            );
            let whole_ratio = median(
                results
                    .iter()
                    .map(|r| r.gateway_whole / r.bare_whole)
                    .collect(),
            );
            println!(
                "{mode} qos {qos} median (sustained): gateway {gw:.0} msg/s, {:.0} values/s into the buffer; limit (bare subscriber) {bare:.0} msg/s; ratio {ratio:.3}; whole-run ratio {whole_ratio:.3}",
                gw * args.values as f64
            );
        }
        anyhow::Ok(())
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The limit: a bare subscriber counting publishes. Persistent session, so
/// that in drain mode it finds its queue again under the same id.
async fn spawn_bare(
    port: u16,
    id: &str,
    subscribe: Option<(&str, QoS)>,
    count: Arc<AtomicU64>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20)
        .set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(o, 1000);
    if let Some((topic, qos)) = subscribe {
        client.subscribe(topic, qos).await?;
    }
    Ok(tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }))
}

async fn one_run(args: &Args, qos: u8, run: usize, drain: bool) -> anyhow::Result<RunResult> {
    let dir = tempfile::tempdir()?;
    // Queue QoS 0 messages for absent persistent sessions too (drain mode).
    let broker = OwnBroker::start_conf(
        dir.path(),
        false,
        &format!("queue_qos0_messages true\n{}\n", args.broker_conf),
    )?;
    let sparkplug = args.payload == "sparkplug";
    let node = format!("node{run}");
    let topic = if sparkplug {
        format!("spBv1.0/bench/NDATA/{node}")
    } else {
        format!("bench/{run}/data")
    };
    let mq = if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };

    // The gateway side: collector -> sink -> writer -> redb buffer.
    let mut tags = String::new();
    for i in 0..args.values {
        tags.push_str(&format!("[[devices.tags]]\nname = \"v{i}\"\n"));
        if !sparkplug {
            tags.push_str(&format!("pointer = \"/v{i}\"\n"));
        }
    }
    let source = if sparkplug {
        format!("payload = \"sparkplug\"\ngroup = \"bench\"\nedge_node = \"{node}\"")
    } else {
        format!("topic = \"{topic}\"")
    };
    let text = format!(
        "[gateway]\nid = \"bench\"\n[uplink]\nendpoint = \"https://127.0.0.1:1\"\ntoken = \"t\"\n\
         [buffer]\ndir = \"buffer\"\nmax_bytes = \"4 GiB\"\n\
         [[devices]]\nid = \"dev\"\nprotocol = \"mqtt\"\nbroker = \"mqtt://127.0.0.1:{}\"\n\
         qos = {qos}\n{source}\n{tags}",
        broker.port
    );
    let config =
        Config::parse(&text, dir.path()).map_err(|p| anyhow::anyhow!("bench config: {p:?}"))?;
    // Signed like the real gateway's buffer.
    let buffer = Arc::new(
        Buffer::open(
            &config.buffer.dir,
            config.buffer.max_bytes.as_u64(),
            config.buffer.when_full,
        )?
        .with_identity(guantong_gateway::buffer::ChainSigner {
            key: guantong_proto::chain::ChainKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(
                &rand::random(),
            )),
            gateway_id: "bench".into(),
        }),
    );
    let (sink, rx) = PointSink::new(guantong_gateway::SINK_MAX_POINTS);
    let (committed_tx, mut committed_rx) = watch::channel(0u64);
    let writer = Writer {
        buffer: buffer.clone(),
        manifest_version: 1,
        commit_interval: config.buffer.commit_interval,
        max_age: config.buffer.max_age,
        max_batch_points: config.uplink.max_batch_points.get() as usize,
        max_held_points: guantong_gateway::SINK_MAX_POINTS,
        committed: committed_tx,
        // As in the gateway: device health is counted on the way to disk.
        status: Arc::new(Status::new("bench", 1, DeviceSpec::of(&config), 0)),
    };
    let writer_task = tokio::spawn(writer.run(rx));
    let cancel = CancellationToken::new();
    let Some(DeviceConfig::Mqtt(device)) = config.devices.into_iter().next() else {
        bail!("bench config has no mqtt device");
    };
    let ids: Vec<u32> = (0..args.values as u32).collect();
    let mut collector = tokio::spawn(
        MqttCollector::new((*device).clone(), ids.clone()).run(sink.clone(), cancel.clone()),
    );

    let bare_count = Arc::new(AtomicU64::new(0));
    let bare_id = format!("bare-{run}");
    let mut bare_task = spawn_bare(
        broker.port,
        &bare_id,
        Some((&topic, mq)),
        bare_count.clone(),
    )
    .await?;

    let publisher = Publisher::connect(broker.port, &format!("pub-{run}"), false).await?;
    // Message n (n ≥ 1 after the warm-up's n = 0).
    let payload = |n: u64| -> Vec<u8> {
        if sparkplug {
            sparkplug_payload(Some(n + 1), args.values, n, false)
        } else {
            let mut p = format!("{{\"n\":{n}");
            for i in 0..args.values {
                p.push_str(&format!(",\"v{i}\":{}.{}", n % 1000, i));
            }
            p.push('}');
            p.into_bytes()
        }
    };

    // Warm-up: until both sides see messages, then settle.
    let mut points = PointCounter::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if sparkplug {
            let birth = sparkplug_payload(Some(0), args.values, 0, true);
            publisher
                .publish(&format!("spBv1.0/bench/NBIRTH/{node}"), mq, birth)
                .await;
        }
        publisher.publish(&topic, mq, payload(0)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        points.update(&buffer)?;
        if bare_count.load(Ordering::Relaxed) > 0 && points.total > 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("warm-up: nothing arrived in 20 s");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    points.update(&buffer)?;
    let bare0 = bare_count.load(Ordering::Relaxed);
    let points0 = points.total;

    let n = args.messages;
    let want_points = points0 + n * args.values as u64;
    let mut cancel = cancel;
    if drain {
        // Both go away; their sessions queue what is published meanwhile.
        cancel.cancel();
        (&mut collector).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        bare_task.abort();
        let acked0 = publisher.acked.load(Ordering::Relaxed);
        for m in 1..=n {
            publisher
                .publish(&topic, QoS::AtLeastOnce, payload(m))
                .await;
        }
        publisher
            .wait_acked(acked0 + n, Duration::from_secs(300))
            .await?;
    }
    let start = Instant::now();
    if drain {
        cancel = CancellationToken::new();
        collector = tokio::spawn(MqttCollector::new(*device, ids).run(sink, cancel.clone()));
        bare_task = spawn_bare(broker.port, &bare_id, None, bare_count.clone()).await?;
    } else {
        drop(sink);
    }
    let n_publish = if drain { 0 } else { n };
    let pub_task = {
        let client = publisher.client.clone();
        let topic = topic.clone();
        let payloads: Vec<Vec<u8>> = (1..=n_publish).map(payload).collect();
        tokio::spawn(async move {
            for p in payloads {
                if client.publish(&topic, mq, false, p).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut bare = Progress::default();
    let mut gw = Progress::default();
    let deadline = Instant::now() + Duration::from_secs(120);
    let per_msg = args.values as u64;
    while bare.done.is_none() || gw.done.is_none() {
        let now = start.elapsed();
        bare.update(bare_count.load(Ordering::Relaxed) - bare0, n, now);
        if gw.done.is_none() {
            points.update(&buffer)?;
            gw.update((points.total - points0) / per_msg, n, start.elapsed());
        }
        if Instant::now() > deadline {
            bail!(
                "bare subscriber counted {} of {n} messages, gateway committed {} of {} points after 120 s",
                bare_count.load(Ordering::Relaxed) - bare0,
                points.total - points0,
                want_points - points0
            );
        }
        // Wakes on each commit, or every 2 ms for the bare count.
        let _ = tokio::time::timeout(Duration::from_millis(2), committed_rx.changed()).await;
    }
    cancel.cancel();
    let _ = collector.await;
    let _ = writer_task.await;
    pub_task.abort();
    bare_task.abort();
    drop(publisher);
    Ok(RunResult {
        gateway_msgs_per_s: gw.sustained(n)?,
        bare_msgs_per_s: bare.sustained(n)?,
        gateway_whole: gw.whole(n)?,
        bare_whole: bare.whole(n)?,
    })
}

/// A Sparkplug B payload of `values` Float metrics `v0…`: the birth names
/// them with aliases 1… and their datatype; data carries aliases only.
/// `seq` counts from the birth's 0 and wraps at 256.
fn sparkplug_payload(seq: Option<u64>, values: usize, n: u64, birth: bool) -> Vec<u8> {
    use guantong_gateway::mqtt::sparkplug::{Metric, MetricValue, Payload};
    use prost::Message;
    let metrics = (0..values)
        .map(|i| Metric {
            name: birth.then(|| format!("v{i}")),
            alias: Some(i as u64 + 1),
            datatype: birth.then_some(9),
            value: Some(MetricValue::Float((n % 1000) as f32 + i as f32 / 10.0)),
            ..Metric::default()
        })
        .collect();
    Payload {
        timestamp: Some(guantong_gateway::quality::now_ms() as u64),
        metrics,
        seq: seq.map(|s| s % 256),
        uuid: None,
    }
    .encode_to_vec()
}

/// Points committed to the buffer, summed incrementally over new batches.
#[derive(Default)]
struct PointCounter {
    next_seq: u64,
    total: u64,
}

impl PointCounter {
    fn update(&mut self, buffer: &Buffer) -> anyhow::Result<()> {
        loop {
            let batches = buffer.read_from(self.next_seq.max(1), 1000)?;
            let Some(last) = batches.last() else {
                return Ok(());
            };
            self.next_seq = last.last_seq + 1;
            self.total += batches.iter().map(|b| u64::from(b.points)).sum::<u64>();
            if batches.len() < 1000 {
                return Ok(());
            }
        }
    }
}
