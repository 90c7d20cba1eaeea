//! Modbus TCP collector.
//!
//! Design: one task per device. At start-up the device's tags are planned into
//! the fewest read requests (`plan`). Each poll cycle sends them one after the
//! other on one connection, each under the device timeout. A device exception
//! marks only that request's tags Bad (with the exception code); a timeout or a
//! broken connection marks the remaining tags of the cycle Bad and drops the
//! connection, which is rebuilt at the next cycle (a late answer would
//! otherwise be taken for the next request's). One device never delays
//! another: each has its own task and timeouts.

pub mod config;
pub mod decode;
pub mod plan;

use std::net::SocketAddr;

use tokio::time::{MissedTickBehavior, timeout};
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::prelude::{Slave, tcp};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::collector::{Collector, PointSink};
use crate::quality::{self, Sample, now_ms};
use config::{ModbusTcpConfig, Table};
use plan::ReadRequest;

pub struct ModbusTcpCollector {
    config: ModbusTcpConfig,
    /// Manifest index of each of `config.tags`.
    tag_ids: Vec<u32>,
    plan: Vec<ReadRequest>,
}

/// What one request returned.
enum Answer {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

impl ModbusTcpCollector {
    pub fn new(config: ModbusTcpConfig, tag_ids: Vec<u32>) -> ModbusTcpCollector {
        let plan = plan::plan(&config.tags, config.max_gap);
        for r in &plan {
            info!(device = %config.id, table = r.table.name(), start = r.start, count = r.count, tags = r.tags.len(), "modbus request planned");
        }
        ModbusTcpCollector {
            config,
            tag_ids,
            plan,
        }
    }

    async fn connect(&self) -> Result<Context, String> {
        let target = format!("{}:{}", self.config.host, self.config.port);
        let addr: SocketAddr =
            match timeout(self.config.timeout, tokio::net::lookup_host(&target)).await {
                Ok(Ok(mut addrs)) => addrs
                    .next()
                    .ok_or_else(|| format!("{target} resolves to no address"))?,
                Ok(Err(e)) => return Err(format!("cannot resolve {target}: {e}")),
                Err(_) => return Err(format!("resolving {target} timed out")),
            };
        match timeout(
            self.config.timeout,
            tcp::connect_slave(addr, Slave(self.config.unit)),
        )
        .await
        {
            Ok(Ok(ctx)) => Ok(ctx),
            Ok(Err(e)) => Err(format!("cannot connect to {addr}: {e}")),
            Err(_) => Err(format!("connecting to {addr} timed out")),
        }
    }

    /// Reads one request. Ok(Err(code)) is a Bad answer that keeps the
    /// connection; Err(code) means the connection must be rebuilt.
    async fn read(&self, ctx: &mut Context, r: &ReadRequest) -> Result<Result<Answer, u32>, u32> {
        let call = async {
            match r.table {
                Table::Holding => ctx
                    .read_holding_registers(r.start, r.count)
                    .await
                    .map(|x| x.map(Answer::Words)),
                Table::Input => ctx
                    .read_input_registers(r.start, r.count)
                    .await
                    .map(|x| x.map(Answer::Words)),
                Table::Coil => ctx
                    .read_coils(r.start, r.count)
                    .await
                    .map(|x| x.map(Answer::Bits)),
                Table::Discrete => ctx
                    .read_discrete_inputs(r.start, r.count)
                    .await
                    .map(|x| x.map(Answer::Bits)),
            }
        };
        match timeout(self.config.timeout, call).await {
            Err(_) => Err(quality::TIMEOUT),
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                debug!(device = %self.config.id, error = %e, "modbus transport error");
                Err(quality::TRANSPORT_ERROR)
            }
            Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                debug!(device = %self.config.id, error = %e, "modbus protocol error");
                Err(quality::MALFORMED)
            }
            Ok(Ok(Err(exception))) => Ok(Err(
                quality::MODBUS_EXCEPTION | u32::from(u8::from(exception))
            )),
            Ok(Ok(Ok(answer))) => Ok(Ok(answer)),
        }
    }

    fn decode(&self, r: &ReadRequest, answer: &Answer, time_ms: i64, out: &mut Vec<Sample>) {
        for &(i, offset) in &r.tags {
            let tag = &self.config.tags[i];
            let id = self.tag_ids[i];
            let offset = usize::from(offset);
            let value = match answer {
                Answer::Bits(bits) => bits
                    .get(offset)
                    .map(|&b| guantong_proto::v1::point::Value::Bool(b)),
                Answer::Words(words) => words
                    .get(offset..offset + usize::from(tag.data_type.words()))
                    .and_then(|w| decode::decode_registers(w, tag.data_type, tag.order))
                    .map(|v| decode::engineering_value(tag, v)),
            };
            out.push(match value {
                Some(v) => Sample::good(id, time_ms, v),
                None => Sample::bad(id, time_ms, quality::MALFORMED),
            });
        }
    }

    fn mark_bad(&self, requests: &[ReadRequest], time_ms: i64, code: u32, out: &mut Vec<Sample>) {
        for r in requests {
            out.extend(
                r.tags
                    .iter()
                    .map(|&(i, _)| Sample::bad(self.tag_ids[i], time_ms, code)),
            );
        }
    }
}

impl Collector for ModbusTcpCollector {
    async fn run(self, sink: PointSink, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(self.config.poll_interval);
        // Delay, not Skip or Burst: polls stay at least one interval apart, never
        // bunched up after a stall (which would also give two polls one timestamp).
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut ctx: Option<Context> = None;
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let mut samples = Vec::with_capacity(self.config.tags.len());
            if ctx.is_none() {
                match self.connect().await {
                    Ok(c) => {
                        info!(device = %self.config.id, "modbus device connected");
                        last_error = None;
                        ctx = Some(c);
                    }
                    Err(e) => {
                        if last_error.as_deref() != Some(e.as_str()) {
                            warn!(device = %self.config.id, error = %e, "modbus device unreachable");
                            last_error = Some(e);
                        }
                        self.mark_bad(&self.plan, now_ms(), quality::CONNECT_FAILED, &mut samples);
                    }
                }
            }
            if let Some(c) = ctx.as_mut() {
                for (n, r) in self.plan.iter().enumerate() {
                    // A value is stamped with the time its request was sent.
                    let sent = now_ms();
                    match self.read(c, r).await {
                        Ok(Ok(answer)) => self.decode(r, &answer, sent, &mut samples),
                        Ok(Err(code)) => {
                            self.mark_bad(std::slice::from_ref(r), sent, code, &mut samples)
                        }
                        Err(code) => {
                            warn!(device = %self.config.id, code = format_args!("{code:#010x}"), "modbus read failed; reconnecting");
                            self.mark_bad(&self.plan[n..], sent, code, &mut samples);
                            ctx = None;
                            break;
                        }
                    }
                }
            }
            if !sink.send(samples).await {
                break;
            }
        }
    }
}
