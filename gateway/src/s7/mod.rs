//! Siemens S7 PLCs over S7comm (ISO-on-TCP, port 102): `protocol = "s7"`.
//!
//! # Design
//! One collector per PLC. It connects (COTP with the PLC's TSAP from rack
//! and slot or `tsap`), negotiates the PDU size, plans its reads for that
//! size ([`Plan`]) and polls every `poll_interval`: each poll sends the
//! plan's read requests in turn and hands the decoded values to the sink.
//!
//! The plan merges the tags of one area (a data block, M, I or Q) whose
//! bytes lie within `MAX_GAP` of each other into one range; ranges are
//! packed into requests of up to `proto::MAX_ITEMS` items within the PDU
//! size both ways, a range that does not fit whole filling the request's
//! remaining room and going on in the next, so a poll sends the fewest
//! requests the PDU allows.
//!
//! # Invariants
//! - Every tag yields one sample per poll: its value, or Bad with the
//!   reason: the PLC's item return code (`quality::S7_ITEM | code`), or a
//!   link code for the whole device when the connection fails or times out.
//! - A range the PLC refuses that holds several tags is split into one range
//!   per tag from the next poll on, so one bad address costs only its tag.
//! - Reconnects back off from 0.5 s doubling to `max_backoff`.
//!
//! Identity: the CPU's order number (SZL 0x0011) and its component
//! identification (SZL 0x001C: module type, serial number, names) are read
//! for the manifest at start (`identify_all`), or, for a PLC that was not
//! reachable then, at the collector's first connect. A CPU that refuses a
//! list (S7-200 SMART, LOGO!) just has less identity; collection goes on.

pub mod config;
pub mod probe;
pub mod proto;

use std::collections::BTreeMap;
use std::time::Duration;

use guantong_proto::v1::point::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::collector::{Collector, PointSink};
use crate::quality::{self, Sample, now_ms};
use config::{Area, S7Config, S7TagConfig, S7Type, Width};
use proto::ReadItem;

/// Bytes between two tags' data that a range reads rather than splitting.
const MAX_GAP: u32 = 32;
/// The least a range's piece fills of a request's remaining room; less room
/// than this starts a new request (an item of a few bytes saves nothing).
const MIN_PIECE: u32 = 16;

/// One merged stretch of an area, and the tags in it.
#[derive(Debug, Clone)]
struct Range {
    area: u8,
    db: u16,
    start: u32,
    len: u32,
    /// (tag index, offset of its bytes in the range)
    tags: Vec<(usize, u32)>,
}

/// The reads of one poll, for one PDU size.
#[derive(Debug, Clone)]
pub struct Plan {
    ranges: Vec<Range>,
    /// Requests: items as (range, offset in the range, bytes).
    requests: Vec<Vec<(usize, u32, u16)>>,
    pdu: usize,
}

impl Plan {
    pub fn new(tags: &[S7TagConfig], pdu: u16) -> Plan {
        let mut order: Vec<usize> = (0..tags.len()).collect();
        order.sort_by_key(|&i| {
            let a = tags[i].address();
            (a.area.code(), a.area.db(), a.byte)
        });
        let mut ranges: Vec<Range> = Vec::new();
        for i in order {
            let a = tags[i].address();
            let (start, end) = (a.byte, a.byte + tags[i].bytes());
            match ranges.last_mut() {
                Some(r)
                    if r.area == a.area.code()
                        && r.db == a.area.db()
                        && start <= r.start + r.len + MAX_GAP =>
                {
                    r.len = r.len.max(end - r.start);
                    r.tags.push((i, start - r.start));
                }
                _ => ranges.push(Range {
                    area: a.area.code(),
                    db: a.area.db(),
                    start,
                    len: end - start,
                    tags: vec![(i, 0)],
                }),
            }
        }
        Plan::pack(ranges, usize::from(pdu))
    }

    /// Cuts ranges into items and packs them into requests, filling each
    /// request's answer before starting the next: a range that does not fit
    /// whole takes the room left (if at least `MIN_PIECE`) and goes on in
    /// the next request, so a poll sends the fewest requests the PDU allows.
    fn pack(ranges: Vec<Range>, pdu: usize) -> Plan {
        // An item's answer: header, data and (at most) one fill byte.
        let item_cost = proto::RESPONSE_ITEM_HEADER + 1;
        // Pieces cut from a range are even, so that pieces of timers or
        // counters hold whole ones.
        let room_in = |answered: usize| {
            (pdu.saturating_sub(answered + item_cost)
                .min(usize::from(u16::MAX)) as u32)
                & !1
        };
        let mut requests: Vec<Vec<(usize, u32, u16)>> = Vec::new();
        let (mut asked, mut answered) = (usize::MAX, usize::MAX);
        for (r, range) in ranges.iter().enumerate() {
            let mut offset = 0;
            while offset < range.len {
                let left = range.len - offset;
                let open = requests.last().is_some_and(|q| q.len() < proto::MAX_ITEMS)
                    && asked + proto::REQUEST_ITEM_BYTES <= pdu;
                let room = if open { room_in(answered) } else { 0 };
                let bytes = if left <= room || room >= MIN_PIECE {
                    left.min(room)
                } else {
                    requests.push(Vec::new());
                    asked = proto::READ_REQUEST_OVERHEAD;
                    answered = proto::READ_RESPONSE_OVERHEAD;
                    left.min(room_in(answered))
                };
                if let Some(q) = requests.last_mut() {
                    q.push((r, offset, bytes as u16));
                }
                asked += proto::REQUEST_ITEM_BYTES;
                answered += item_cost + bytes as usize;
                offset += bytes;
            }
        }
        Plan {
            ranges,
            requests,
            pdu,
        }
    }

    /// The plan with range `r` read tag by tag.
    fn split(&self, r: usize, tags: &[S7TagConfig]) -> Plan {
        let mut ranges = self.ranges.clone();
        let range = ranges.remove(r);
        for (i, _) in range.tags {
            let a = tags[i].address();
            ranges.push(Range {
                area: range.area,
                db: range.db,
                start: a.byte,
                len: tags[i].bytes(),
                tags: vec![(i, 0)],
            });
        }
        Plan::pack(ranges, self.pdu)
    }

    /// Read requests per poll.
    pub fn requests(&self) -> usize {
        self.requests.len()
    }

    /// The items of request `q`.
    pub fn request_items(&self, q: usize) -> Vec<ReadItem> {
        self.requests[q]
            .iter()
            .map(|&(r, offset, bytes)| {
                let range = &self.ranges[r];
                ReadItem {
                    area: range.area,
                    db: range.db,
                    start: range.start + offset,
                    bytes,
                }
            })
            .collect()
    }
}

/// The value of `tag` from its bytes (`bytes` starts at the tag's byte).
pub fn decode(tag: &S7TagConfig, bytes: &[u8]) -> Option<Value> {
    let b = |n: usize| bytes.get(..n);
    let word = || Some(u16::from_be_bytes(b(2)?.try_into().ok()?));
    match tag.address().area {
        Area::Timers => return s5time_seconds(word()?).map(Value::Double),
        Area::Counters => {
            return bcd(u32::from(word()? & 0x0FFF), 3).map(|n| Value::Uint(n.into()));
        }
        _ => {}
    }
    Some(match tag.data_type {
        S7Type::Bool => {
            let Width::Bit(i) = tag.address().width else {
                return None;
            };
            Value::Bool(b(1)?[0] >> i & 1 == 1)
        }
        S7Type::U8 => Value::Uint(u64::from(b(1)?[0])),
        S7Type::I8 => Value::Int(i64::from(b(1)?[0] as i8)),
        S7Type::U16 => Value::Uint(u64::from(u16::from_be_bytes(b(2)?.try_into().ok()?))),
        S7Type::I16 => Value::Int(i64::from(i16::from_be_bytes(b(2)?.try_into().ok()?))),
        S7Type::U32 => Value::Uint(u64::from(u32::from_be_bytes(b(4)?.try_into().ok()?))),
        S7Type::I32 => Value::Int(i64::from(i32::from_be_bytes(b(4)?.try_into().ok()?))),
        S7Type::F32 => Value::Double(crate::value::f32_to_f64(f32::from_be_bytes(
            b(4)?.try_into().ok()?,
        ))),
        S7Type::F64 => Value::Double(f64::from_be_bytes(b(8)?.try_into().ok()?)),
        S7Type::String => {
            // STRING[n]: max length, actual length, then the characters.
            let [max, len, chars @ ..] = bytes else {
                return None;
            };
            let n = usize::from(*len.min(max)).min(chars.len());
            Value::String(String::from_utf8_lossy(&chars[..n]).into_owned())
        }
        S7Type::Date => {
            let days = u64::from(u16::from_be_bytes(b(2)?.try_into().ok()?));
            // 1990-01-01 is day 7,305 of the Unix epoch.
            let at = std::time::UNIX_EPOCH + Duration::from_secs((7305 + days) * 86_400);
            Value::String(humantime::format_rfc3339_seconds(at).to_string()[..10].to_string())
        }
        S7Type::Time => Value::Int(i64::from(i32::from_be_bytes(b(4)?.try_into().ok()?))),
        S7Type::TimeOfDay => {
            let ms = u32::from_be_bytes(b(4)?.try_into().ok()?);
            if ms >= 86_400_000 {
                return None;
            }
            Value::String(clock(
                ms / 3_600_000,
                ms / 60_000 % 60,
                ms / 1000 % 60,
                ms % 1000,
            ))
        }
        S7Type::DateAndTime => {
            let d = b(8)?;
            let at = |i: usize| bcd(u32::from(d[i]), 2);
            let year = at(0)?;
            let year = if year < 90 { 2000 + year } else { 1900 + year };
            let ms = bcd(u32::from(d[6]) << 4 | u32::from(d[7] >> 4), 3)?;
            timestamp(year, at(1)?, at(2)?, at(3)?, at(4)?, at(5)?, ms)?
        }
        S7Type::Dtl => {
            let d = b(12)?;
            let year = u32::from(u16::from_be_bytes([d[0], d[1]]));
            let nanos = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
            if nanos >= 1_000_000_000 {
                return None;
            }
            let [month, day, hour, minute, second] = [d[2], d[3], d[5], d[6], d[7]].map(u32::from);
            timestamp(year, month, day, hour, minute, second, nanos / 1_000_000)?
        }
    })
}

/// An S5TIME word in seconds: a time base (10 ms, 100 ms, 1 s, 10 s) in
/// bits 12-13 and three BCD digits.
fn s5time_seconds(w: u16) -> Option<f64> {
    let base = [0.01, 0.1, 1.0, 10.0][usize::from(w >> 12 & 3)];
    Some(f64::from(bcd(u32::from(w & 0x0FFF), 3)?) * base)
}

/// `digits` BCD digits of `v` (lowest first) as a number; None if a digit is
/// not 0-9.
fn bcd(v: u32, digits: u32) -> Option<u32> {
    let mut n = 0u32;
    for i in (0..digits).rev() {
        let d = (v >> (4 * i)) & 0xF;
        if d > 9 {
            return None;
        }
        n = n * 10 + d;
    }
    Some(n)
}

fn clock(h: u32, m: u32, s: u32, ms: u32) -> String {
    format!("{h:02}:{m:02}:{s:02}.{ms:03}")
}

/// A PLC's local date and time, checked field by field.
fn timestamp(y: u32, mo: u32, d: u32, h: u32, mi: u32, s: u32, ms: u32) -> Option<Value> {
    let valid = (1..=12).contains(&mo) && (1..=31).contains(&d) && h < 24 && mi < 60 && s < 60;
    valid.then(|| Value::String(format!("{y:04}-{mo:02}-{d:02}T{}", clock(h, mi, s, ms))))
}

/// An open S7 connection.
struct Connection {
    stream: TcpStream,
    timeout: Duration,
    pdu: u16,
    pdu_ref: u16,
}

impl Connection {
    async fn open(c: &S7Config) -> Result<Connection, (u32, String)> {
        let addr = format!("{}:{}", c.host, c.port);
        let stream = match tokio::time::timeout(c.timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err((quality::CONNECT_FAILED, format!("{addr}: {e}"))),
            Err(_) => return Err((quality::CONNECT_FAILED, format!("{addr}: no answer"))),
        };
        let _ = stream.set_nodelay(true);
        let mut conn = Connection {
            stream,
            timeout: c.timeout,
            pdu: proto::WANTED_PDU,
            pdu_ref: 0,
        };
        let refused = |e: String| (quality::CONNECT_FAILED, e);
        let cc = conn
            .exchange(&proto::connect_request(c.remote_tsap()))
            .await?;
        proto::check_connect_confirm(&cc).map_err(refused)?;
        let setup = conn.exchange(&proto::setup_request()).await?;
        conn.pdu = proto::setup_response(&setup).map_err(refused)?;
        Ok(conn)
    }

    /// Sends one frame and reads the answer's payload.
    async fn exchange(&mut self, frame: &[u8]) -> Result<Vec<u8>, (u32, String)> {
        let io = |e: std::io::Error| (quality::TRANSPORT_ERROR, e.to_string());
        let work = async {
            self.stream.write_all(frame).await.map_err(io)?;
            let mut header = [0u8; 4];
            self.stream.read_exact(&mut header).await.map_err(io)?;
            let len = proto::tpkt_payload_len(header).map_err(|e| (quality::MALFORMED, e))?;
            let mut payload = vec![0u8; len];
            self.stream.read_exact(&mut payload).await.map_err(io)?;
            Ok(payload)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err((quality::TIMEOUT, "no answer within the timeout".into())),
        }
    }

    /// What the CPU says of itself (see the module docs); Err only when the
    /// connection failed meanwhile.
    async fn identity(&mut self) -> Result<BTreeMap<String, String>, (u32, String)> {
        let mut identity = BTreeMap::new();
        if let Some(list) = self.read_szl(proto::SZL_MODULE_ID).await? {
            for (index, record) in proto::szl_records(&list, 28) {
                if index == 1 {
                    let order = proto::szl_text(record.get(..20).unwrap_or(record));
                    if !order.is_empty() {
                        identity.insert("order_number".into(), order);
                    }
                }
            }
        }
        if let Some(list) = self.read_szl(proto::SZL_COMPONENT_ID).await? {
            // Indexes in the order CPUs list them, for records without one.
            const ORDER: [u16; 10] = [1, 2, 3, 4, 5, 7, 8, 9, 10, 11];
            for (n, (index, record)) in proto::szl_records(&list, 34).into_iter().enumerate() {
                let index = if index == 0 {
                    ORDER.get(n).copied().unwrap_or(0)
                } else {
                    index
                };
                let key = match index {
                    1 => "automation_system",
                    2 => "module_name",
                    3 => "plant_id",
                    5 => "serial_number",
                    7 => "module_type",
                    _ => continue,
                };
                let text = proto::szl_text(record);
                if !text.is_empty() {
                    identity.insert(key.into(), text);
                }
            }
        }
        Ok(identity)
    }

    /// A whole SZL list, its parts gathered; None if the CPU refuses it.
    async fn read_szl(&mut self, id: u16) -> Result<Option<Vec<u8>>, (u32, String)> {
        self.pdu_ref = self.pdu_ref.wrapping_add(1);
        let answer = self
            .exchange(&proto::szl_request(self.pdu_ref, id, 0))
            .await?;
        let mut part = match proto::szl_response(&answer) {
            Ok(p) => p,
            Err(e) => {
                info!(szl = format!("{id:#06x}"), error = %e, "S7 CPU does not give this identity list");
                return Ok(None);
            }
        };
        let mut list = std::mem::take(&mut part.data);
        // A list longer than a PDU comes in parts; a CPU lists at most a few.
        for _ in 0..16 {
            if !part.more {
                break;
            }
            self.pdu_ref = self.pdu_ref.wrapping_add(1);
            let answer = self
                .exchange(&proto::szl_next_request(self.pdu_ref, part.sequence))
                .await?;
            part = match proto::szl_response(&answer) {
                Ok(p) => p,
                Err(_) => break,
            };
            list.extend_from_slice(&part.data);
        }
        Ok(Some(list))
    }

    /// One poll: a sample for every tag; Err ends the connection.
    async fn poll(
        &mut self,
        plan: &Plan,
        tags: &[S7TagConfig],
        first_slot: u32,
        split: &mut Option<usize>,
    ) -> Result<Vec<Sample>, (u32, String)> {
        let now = now_ms();
        let mut data: Vec<Vec<u8>> = plan
            .ranges
            .iter()
            .map(|r| Vec::with_capacity(r.len as usize))
            .collect();
        let mut refused: Vec<Option<u8>> = vec![None; plan.ranges.len()];
        for (q, request) in plan.requests.iter().enumerate() {
            let items = plan.request_items(q);
            self.pdu_ref = self.pdu_ref.wrapping_add(1);
            let answer = self
                .exchange(&proto::read_request(self.pdu_ref, &items))
                .await?;
            let results =
                proto::read_response(&answer, items.len()).map_err(|e| (quality::MALFORMED, e))?;
            for (&(r, _, bytes), result) in request.iter().zip(results) {
                match result {
                    Ok(b) if b.len() == usize::from(bytes) => data[r].extend_from_slice(&b),
                    Ok(b) => {
                        return Err((
                            quality::MALFORMED,
                            format!("{} bytes answered, {bytes} asked", b.len()),
                        ));
                    }
                    Err(code) => refused[r] = Some(code),
                }
            }
        }
        let mut samples = Vec::with_capacity(tags.len());
        for (r, range) in plan.ranges.iter().enumerate() {
            if let Some(code) = refused[r] {
                if range.tags.len() > 1 && split.is_none() {
                    *split = Some(r);
                }
                for &(i, _) in &range.tags {
                    samples.push(Sample::bad(
                        first_slot + i as u32,
                        now,
                        quality::S7_ITEM | u32::from(code),
                    ));
                }
                continue;
            }
            for &(i, offset) in &range.tags {
                let tag = first_slot + i as u32;
                let bytes = data[r].get(offset as usize..).unwrap_or_default();
                samples.push(match decode(&tags[i], bytes) {
                    Some(v) => Sample::good(tag, now, v),
                    None => Sample::bad(tag, now, quality::MALFORMED),
                });
            }
        }
        Ok(samples)
    }
}

/// A connected PLC and its plan, polled on demand: one tick of the
/// collector, for benchmarks and tools.
pub struct Poller {
    conn: Connection,
    plan: Plan,
    config: S7Config,
}

impl Poller {
    pub async fn connect(config: S7Config) -> Result<Poller, String> {
        let conn = Connection::open(&config).await.map_err(|(_, e)| e)?;
        let plan = Plan::new(&config.tags, conn.pdu);
        Ok(Poller { conn, plan, config })
    }

    /// The PDU size the CPU granted.
    pub fn pdu(&self) -> u16 {
        self.conn.pdu
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// One poll: a sample per tag, numbered from 0.
    pub async fn poll(&mut self) -> Result<Vec<Sample>, String> {
        let mut split = None;
        self.conn
            .poll(&self.plan, &self.config.tags, 0, &mut split)
            .await
            .map_err(|(_, e)| e)
    }
}

/// Reads the identity of every S7 PLC for the manifest, all at once; a PLC
/// that does not answer within its `timeout` gets none (its collector tries
/// again at its first connect).
pub async fn identify_all(devices: &mut [crate::config::DeviceConfig]) {
    let mut jobs = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        if let crate::config::DeviceConfig::S7(c) = d {
            let c = S7Config {
                tags: Vec::new(),
                ..(**c).clone()
            };
            jobs.push(tokio::spawn(async move {
                let read = async {
                    let mut conn = Connection::open(&c).await?;
                    conn.identity().await
                };
                let r = tokio::time::timeout(c.timeout * 3, read).await;
                (i, c.id, r)
            }));
        }
    }
    for job in jobs {
        let Ok((i, id, r)) = job.await else { continue };
        match r {
            Ok(Ok(identity)) => {
                info!(device = %id, ?identity, "S7 CPU identified");
                if let crate::config::DeviceConfig::S7(c) = &mut devices[i] {
                    c.identity = identity;
                }
            }
            Ok(Err((_, e))) => warn!(device = %id, error = %e, "S7 CPU not identified"),
            Err(_) => warn!(device = %id, "S7 CPU not identified: no answer in time"),
        }
    }
}

/// Polls one PLC; see the module docs.
pub struct S7Collector {
    config: S7Config,
    first_slot: u32,
    /// Where to report the identity read at the first connect, when the
    /// device was not identified before its collector started.
    identify: Option<crate::reload::IdentifiedTx>,
}

impl S7Collector {
    pub fn new(config: S7Config, first_slot: u32) -> S7Collector {
        S7Collector {
            config,
            first_slot,
            identify: None,
        }
    }

    pub fn report_identity_to(mut self, tx: crate::reload::IdentifiedTx) -> S7Collector {
        self.identify = self.config.identity.is_empty().then_some(tx);
        self
    }

    fn all_bad(&self, code: u32) -> Vec<Sample> {
        let now = now_ms();
        (0..self.config.tags.len() as u32)
            .map(|i| Sample::bad(self.first_slot + i, now, code))
            .collect()
    }
}

impl Collector for S7Collector {
    async fn run(mut self, sink: PointSink, cancel: CancellationToken) {
        let mut identify = self.identify.take();
        let c = &self.config;
        let mut backoff = Duration::from_millis(500);
        let mut last_error = String::new();
        loop {
            let opened = tokio::select! {
                _ = cancel.cancelled() => return,
                r = Connection::open(c) => r,
            };
            let mut conn = match opened {
                Ok(conn) => conn,
                Err((code, e)) => {
                    if e != last_error {
                        warn!(device = %c.id, error = %e, "S7 connection failed; retrying");
                        last_error = e;
                    }
                    if !sink.send(self.all_bad(code)).await {
                        return;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(c.max_backoff);
                    continue;
                }
            };
            backoff = Duration::from_millis(500);
            last_error.clear();
            if let Some(tx) = identify.take() {
                match conn.identity().await {
                    Ok(identity) if !identity.is_empty() => {
                        info!(device = %c.id, ?identity, "S7 CPU identified");
                        let _ = tx.send(crate::reload::Identified {
                            device: c.id.clone(),
                            first_slot: self.first_slot,
                            identity,
                        });
                    }
                    Ok(_) => {}
                    Err((_, e)) => {
                        // The poll finds out whether the link is gone.
                        warn!(device = %c.id, error = %e, "S7 identity read failed; trying again at the next connect");
                        identify = Some(tx);
                    }
                }
            }
            let mut plan = Plan::new(&c.tags, conn.pdu);
            info!(device = %c.id, pdu = conn.pdu, requests = plan.requests(), "S7 connected");
            let mut tick = tokio::time::interval(c.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let mut split = None;
                match conn.poll(&plan, &c.tags, self.first_slot, &mut split).await {
                    Ok(samples) => {
                        if !sink.send(samples).await {
                            return;
                        }
                        if let Some(r) = split {
                            plan = plan.split(r, &c.tags);
                            info!(device = %c.id, requests = plan.requests(), "a range was refused: its tags are read one by one");
                        }
                    }
                    Err((code, e)) => {
                        warn!(device = %c.id, error = %e, "S7 read failed; reconnecting");
                        if !sink.send(self.all_bad(code)).await {
                            return;
                        }
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str, address: &str, t: S7Type, length: Option<u8>) -> S7TagConfig {
        S7TagConfig {
            name: name.into(),
            address: address.into(),
            data_type: t,
            length,
            unit: String::new(),
            parsed: config::Address::parse(address).ok(),
        }
    }

    #[test]
    fn near_tags_share_a_range_and_requests_respect_the_pdu_both_ways() {
        let tags = vec![
            tag("a", "DB1.DBW0", S7Type::U16, None),
            tag("b", "DB1.DBD10", S7Type::F32, None),
            tag("c", "DB1.DBX4.3", S7Type::Bool, None),
            tag("d", "DB1.DBW500", S7Type::I16, None),
            tag("e", "DB2.DBW0", S7Type::U16, None),
            tag("f", "MW0", S7Type::U16, None),
        ];
        let plan = Plan::new(&tags, 240);
        let spans: Vec<(u8, u16, u32, u32)> = plan
            .ranges
            .iter()
            .map(|r| (r.area, r.db, r.start, r.len))
            .collect();
        assert_eq!(
            spans,
            [
                (0x83, 0, 0, 2),
                (0x84, 1, 0, 14),
                (0x84, 1, 500, 2),
                (0x84, 2, 0, 2)
            ]
        );
        assert_eq!(plan.requests(), 1);
        // 1,000 bytes of one block at PDU 240: pieces of at most 220 bytes.
        let long: Vec<S7TagConfig> = (0..250)
            .map(|i| {
                tag(
                    &format!("t{i}"),
                    &format!("DB1.DBD{}", i * 4),
                    S7Type::U32,
                    None,
                )
            })
            .collect();
        let plan = Plan::new(&long, 240);
        for q in &plan.requests {
            let answer: usize = 14 + q.iter().map(|&(_, _, b)| 5 + usize::from(b)).sum::<usize>();
            assert!(answer <= 240 && 12 + 12 * q.len() <= 240, "{q:?}");
        }
        let read: u32 = plan
            .requests
            .iter()
            .flatten()
            .map(|&(_, _, b)| u32::from(b))
            .sum();
        assert_eq!(read, 1000);
        // Four blocks of 1,000 bytes at PDU 480: each request's answer holds
        // at most 466 bytes, 5 per item besides the data, so at least 9
        // requests; pieces fill each request's room instead of 3 per block.
        let blocks: Vec<S7TagConfig> = (0..1000)
            .map(|i| {
                let address = format!("DB{}.DBD{}", 10 + i / 250, 4 * (i % 250));
                tag(&format!("t{i}"), &address, S7Type::F32, None)
            })
            .collect();
        let plan = Plan::new(&blocks, 480);
        assert_eq!(plan.requests(), 9);
        for q in &plan.requests {
            let answer: usize = 14 + q.iter().map(|&(_, _, b)| 5 + usize::from(b)).sum::<usize>();
            assert!(answer <= 480, "{q:?}");
        }
        let split = Plan::new(&tags, 240).split(1, &tags);
        assert_eq!(split.ranges.len(), 6);
    }

    #[test]
    fn values_decode_big_endian_bits_and_s7_strings() {
        let t = |a: &str, ty, len| tag("x", a, ty, len);
        assert_eq!(
            decode(&t("DB1.DBX0.3", S7Type::Bool, None), &[0b1000]),
            Some(Value::Bool(true))
        );
        assert_eq!(
            decode(&t("DB1.DBW0", S7Type::I16, None), &[0xFF, 0xFE]),
            Some(Value::Int(-2))
        );
        assert_eq!(
            decode(&t("DB1.DBD0", S7Type::F32, None), &(-0.1f32).to_be_bytes()),
            Some(Value::Double(-0.1))
        );
        assert_eq!(
            decode(
                &t("DB1.DBB0", S7Type::String, Some(10)),
                &[10, 3, b'a', b'b', b'c', b'z']
            ),
            Some(Value::String("abc".into()))
        );
        assert_eq!(decode(&t("DB1.DBD0", S7Type::U32, None), &[1, 2]), None);
    }

    #[test]
    fn timers_counters_dates_and_times_decode_as_plcs_store_them() {
        let t = |a: &str, ty| tag("x", a, ty, None);
        // S5T#12s300ms: 123 at base 100 ms; S5T#10000s: 100 at base 10 s.
        assert_eq!(
            decode(&t("T5", S7Type::F64), &[0x11, 0x23]),
            Some(Value::Double(12.3))
        );
        assert_eq!(
            decode(&t("T5", S7Type::F64), &[0x31, 0x00]),
            Some(Value::Double(1000.0))
        );
        assert_eq!(decode(&t("T5", S7Type::F64), &[0x01, 0xA0]), None);
        assert_eq!(
            decode(&t("C3", S7Type::U16), &[0x09, 0x99]),
            Some(Value::Uint(999))
        );
        assert_eq!(
            decode(&t("DB1.DBW0", S7Type::Date), &[0x31, 0x80]),
            Some(Value::String("2024-09-11".into()))
        );
        assert_eq!(
            decode(&t("DB1.DBD0", S7Type::Time), &(-1500i32).to_be_bytes()),
            Some(Value::Int(-1500))
        );
        assert_eq!(
            decode(
                &t("DB1.DBD0", S7Type::TimeOfDay),
                &45_296_789u32.to_be_bytes()
            ),
            Some(Value::String("12:34:56.789".into()))
        );
        assert_eq!(
            decode(
                &t("DB1.DBD0", S7Type::TimeOfDay),
                &86_400_000u32.to_be_bytes()
            ),
            None
        );
        // DT#2026-12-03-13:45:07.250, a Thursday (5).
        let dt = [0x26, 0x12, 0x03, 0x13, 0x45, 0x07, 0x25, 0x05];
        assert_eq!(
            decode(&t("DB1.DBB0", S7Type::DateAndTime), &dt),
            Some(Value::String("2026-12-03T13:45:07.250".into()))
        );
        assert_eq!(
            decode(
                &t("DB1.DBB0", S7Type::DateAndTime),
                &[0x26, 0x13, 3, 0, 0, 0, 0, 0]
            ),
            None
        );
        let mut dtl = vec![0x07, 0xEA, 12, 3, 5, 13, 45, 7];
        dtl.extend_from_slice(&250_000_000u32.to_be_bytes());
        assert_eq!(
            decode(&t("DB1.DBB0", S7Type::Dtl), &dtl),
            Some(Value::String("2026-12-03T13:45:07.250".into()))
        );
    }

    #[test]
    fn timers_and_counters_are_read_by_number_in_their_own_transport_size() {
        let tags = vec![
            tag("t1", "T1", S7Type::F64, None),
            tag("t2", "T2", S7Type::F64, None),
            tag("c7", "Z7", S7Type::U16, None),
        ];
        let plan = Plan::new(&tags, 240);
        let spans: Vec<(u8, u32, u32)> = plan
            .ranges
            .iter()
            .map(|r| (r.area, r.start, r.len))
            .collect();
        assert_eq!(spans, [(0x1C, 14, 2), (0x1D, 2, 4)]);
        let request = proto::read_request(
            1,
            &[ReadItem {
                area: 0x1D,
                db: 0,
                start: 2,
                bytes: 4,
            }],
        );
        // Transport size 0x1D, two timers, area 0x1D, from timer 1.
        assert_eq!(
            &request[19..31],
            &[0x12, 0x0A, 0x10, 0x1D, 0, 2, 0, 0, 0x1D, 0, 0, 1]
        );
    }
}
