//! Salvage of a buffer file redb cannot open: the records are found in its
//! raw bytes, one by one, and what is missing between them is sized.
//!
//! # Finding records
//! redb stores each value contiguously, so a record (see the layout in
//! `buffer`) is a byte run starting with its format byte (2 or 3) whose
//! payload is an encoded `Batch` beginning with `buffer_id` (tag `0x09`) and
//! `seq` (tag `0x10`). The record has no length field, but prost writes a
//! message's fields in number order, so the record can only end at a
//! top-level field boundary of the payload: the scan walks those boundaries
//! and accepts the first one where the record's CRC matches and the payload
//! decodes. The chance that damaged bytes pass a CRC-32 is 2^-32.
//!
//! Manifests have no checksum but are self-verifying: their version is a hash
//! of their content (`manifest::version_of`). Only the versions salvaged
//! batches name are looked for.
//!
//! The buffer's `meta` table (keys `buffer_id`, `bytes`, `dropped_points`,
//! `next_seq`, values u64) is a redb leaf page holding the keys' bytes in a
//! row followed by the four values, little-endian; every commit writes a new
//! copy. The largest `next_seq` among the copies of this `buffer_id` is the
//! newest, so records after the last one found are known to be missing.
//!
//! # Choosing among copies
//! Freed pages keep old copies of records (acknowledged batches, loss
//! records later merged or replaced). Per first sequence number the copy that
//! chains after the record chosen before it wins, then the one covering the
//! most sequence numbers (a loss record that replaced batches is newer than
//! them); copies inside a chosen record's range are skipped. Records of
//! another `buffer_id` than the majority's are ignored.
//!
//! # Sizing what is missing
//! A missing range k..=m between two chosen records becomes a loss record
//! (reason `corrupted`, `estimated` set) bridged by the neighbours: its
//! `prev_hash` is the record before's effective link hash, its `bridge_hash`
//! the record after's `prev_hash`, so the chain verifies across it. Per tag,
//! the lost points are estimated from the nearest neighbouring batches with
//! points (`estimate`): exact when the tag is sampled at a steady interval,
//! otherwise off by the jitter at the two ends. Exact counts cannot be had:
//! the damaged records held them.

use std::collections::BTreeMap;

use guantong_proto::chain::Hash;
use guantong_proto::v1::{Batch, Loss, LossReason, Manifest, Quality};
use prost::Message;

use super::{
    FORMAT, FORMAT_SM2, HEADER, TagLossMap, decode_record, effective_link, encode_batch,
    frame_record, merge_tag_loss, tag_losses,
};

/// What a damaged file still holds.
#[derive(Debug, Default)]
pub(super) struct Salvage {
    pub buffer_id: u64,
    /// Chosen records (full bytes), ascending, not overlapping.
    pub records: Vec<SalvagedRecord>,
    /// Missing ranges between them, as loss records to write.
    pub gaps: Vec<PendingLoss>,
    /// Manifests the records name, by version (encoded).
    pub manifests: Vec<(u64, Vec<u8>)>,
    /// Valid records found, copies included.
    pub copies_found: usize,
    /// Adjacent chosen records that do not chain: (seq, why).
    pub breaks: Vec<(u64, String)>,
    /// The buffer's next sequence number, from the newest copy of its `meta`
    /// table found (so damaged newest records are declared too).
    pub next_seq: u64,
}

#[derive(Debug, Clone)]
pub(super) struct SalvagedRecord {
    pub seq: u64,
    pub last_seq: u64,
    pub bytes: Vec<u8>,
}

/// A loss record to write at `loss`'s first sequence number, chained after
/// `prev` (the record before's effective link).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PendingLoss {
    pub first: u64,
    pub prev: Hash,
    pub loss: Loss,
}

impl PendingLoss {
    /// Stored form: `[32] prev`, `[8] first`, encoded `Loss`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.prev.to_vec();
        out.extend_from_slice(&self.first.to_be_bytes());
        out.extend_from_slice(&self.loss.encode_to_vec());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<PendingLoss> {
        Some(PendingLoss {
            prev: bytes.get(..32)?.try_into().ok()?,
            first: u64::from_be_bytes(bytes.get(32..40)?.try_into().ok()?),
            loss: Loss::decode(bytes.get(40..)?).ok()?,
        })
    }
}

/// End offsets of the top-level protobuf fields of the message at the start
/// of `bytes`, while field numbers do not decrease and stay <= `max_field`.
fn field_ends(bytes: &[u8], max_field: u64) -> Vec<usize> {
    fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in 0..10 {
            let b = *bytes.get(*at)?;
            *at += 1;
            v |= u64::from(b & 0x7F) << (7 * shift);
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut ends = Vec::new();
    let (mut at, mut last_field) = (0usize, 0u64);
    while let Some(key) = varint(bytes, &mut at) {
        let field = key >> 3;
        if field == 0 || field < last_field || field > max_field {
            break;
        }
        last_field = field;
        let next = match key & 7 {
            0 => varint(bytes, &mut at).map(|_| at),
            1 => Some(at + 8),
            2 => varint(bytes, &mut at).and_then(|n| at.checked_add(usize::try_from(n).ok()?)),
            5 => Some(at + 4),
            _ => None,
        };
        match next {
            Some(n) if n <= bytes.len() => at = n,
            _ => break,
        }
        ends.push(at);
    }
    ends
}

/// The record starting at `bytes[0]`, if one does: its length.
fn record_at(bytes: &[u8]) -> Option<usize> {
    if !matches!(bytes.first(), Some(&FORMAT | &FORMAT_SM2))
        || bytes.get(HEADER) != Some(&0x09)
        || bytes.get(HEADER + 9) != Some(&0x10)
    {
        return None;
    }
    let crc = u32::from_be_bytes(bytes.get(1..5)?.try_into().ok()?);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[25..HEADER]);
    let mut done = HEADER;
    for end in field_ends(&bytes[HEADER..], 15) {
        let end = HEADER + end;
        hasher.update(&bytes[done..end]);
        done = end;
        if hasher.clone().finalize() == crc {
            return decode_record(&bytes[..end]).map(|_| end);
        }
    }
    None
}

/// The largest `next_seq` of the copies of `buffer_id`'s meta table in `bytes`.
fn newest_next_seq(bytes: &[u8], buffer_id: u64) -> Option<u64> {
    const KEYS: &[u8] = b"buffer_idbytesdropped_pointsnext_seq";
    let value = |at: usize| Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
    bytes
        .windows(KEYS.len())
        .enumerate()
        .filter(|(_, w)| *w == KEYS)
        .filter_map(|(i, _)| {
            let values = i + KEYS.len();
            (value(values)? == buffer_id).then_some(value(values + 24)?)
        })
        .max()
}

/// Every valid record in `bytes`, in file order.
fn find_records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + HEADER < bytes.len() {
        match record_at(&bytes[i..]) {
            Some(len) => {
                out.push(&bytes[i..i + len]);
                i += len;
            }
            None => i += 1,
        }
    }
    out
}

/// The manifest of `version` in `bytes`, verified by its content hash.
fn find_manifest(bytes: &[u8], version: u64) -> Option<Vec<u8>> {
    let mut pattern = vec![0x09];
    pattern.extend_from_slice(&version.to_le_bytes());
    let mut from = 0;
    while let Some(pos) = bytes[from..]
        .windows(pattern.len())
        .position(|w| w == pattern.as_slice())
    {
        let start = from + pos;
        for end in field_ends(&bytes[start..], 15) {
            let candidate = &bytes[start..start + end];
            if let Ok(m) = Manifest::decode(candidate)
                && m.version == version
                && crate::manifest::version_of(&Manifest {
                    version: 0,
                    created_at_ms: 0,
                    ..m.clone()
                }) == version
            {
                return Some(candidate.to_vec());
            }
        }
        from = start + 1;
    }
    None
}

struct Candidate<'a> {
    bytes: &'a [u8],
    seq: u64,
    last_seq: u64,
    is_loss: bool,
    prev_hash: Hash,
    link: Hash,
    batch: Batch,
}

/// Reads what `bytes` (a damaged buffer file) still holds.
pub(super) fn salvage(bytes: &[u8]) -> Salvage {
    let mut candidates: Vec<Candidate<'_>> = find_records(bytes)
        .into_iter()
        .filter_map(|r| {
            let (h, batch) = decode_record(r)?;
            // A sequence number of u64::MAX leaves no next one: never written.
            if h.last_seq == u64::MAX || batch.seq == u64::MAX {
                return None;
            }
            let link = effective_link(&h, &r[HEADER..], &batch);
            Some(Candidate {
                bytes: r,
                seq: batch.seq,
                last_seq: h.last_seq.max(batch.seq),
                is_loss: batch.loss.is_some(),
                prev_hash: h.prev_hash,
                link,
                batch,
            })
        })
        .collect();
    let mut ids: BTreeMap<u64, usize> = BTreeMap::new();
    for c in &candidates {
        *ids.entry(c.batch.buffer_id).or_default() += 1;
    }
    let Some((&buffer_id, _)) = ids.iter().max_by_key(|&(_, n)| *n) else {
        return Salvage::default();
    };
    candidates.retain(|c| c.batch.buffer_id == buffer_id);
    let copies_found = candidates.len();
    let mut by_seq: BTreeMap<u64, Vec<Candidate<'_>>> = BTreeMap::new();
    for c in candidates {
        by_seq.entry(c.seq).or_default().push(c);
    }
    let mut chosen: Vec<Candidate<'_>> = Vec::new();
    for (seq, copies) in by_seq {
        let after = chosen.last().map(|c| (c.last_seq, c.link));
        if after.is_some_and(|(last, _)| seq <= last) {
            continue;
        }
        let best = copies.into_iter().max_by_key(|c| {
            let chains = after.is_some_and(|(last, link)| last + 1 == seq && c.prev_hash == link);
            (chains, c.last_seq, c.is_loss)
        });
        chosen.extend(best);
    }
    let mut s = Salvage {
        buffer_id,
        copies_found,
        ..Salvage::default()
    };
    for (i, pair) in chosen.windows(2).enumerate() {
        let (a, b) = (&pair[0], &pair[1]);
        if a.last_seq + 1 == b.seq {
            if a.link != b.prev_hash {
                s.breaks.push((
                    b.seq,
                    format!(
                        "salvaged link {} does not chain after salvaged link {}",
                        b.seq, a.seq
                    ),
                ));
            }
            continue;
        }
        let before = chosen[..=i].iter().rev().map(|c| &c.batch);
        let after = chosen[i + 1..].iter().map(|c| &c.batch);
        let seqs = b.seq - a.last_seq - 1;
        let (points, per_tag) = estimate(before, after, seqs);
        s.gaps.push(PendingLoss {
            first: a.last_seq + 1,
            prev: a.link,
            loss: Loss {
                last_seq: b.seq - 1,
                points,
                tags: tag_losses(per_tag),
                reason: LossReason::Corrupted as i32,
                bridge_hash: b.prev_hash.to_vec(),
                estimated: true,
            },
        });
    }
    let last = chosen.last().map(|c| (c.last_seq, c.link));
    s.next_seq = last.map_or(1, |(l, _)| l.saturating_add(1));
    if let Some((last_seq, link)) = last
        && let Some(next) = newest_next_seq(bytes, buffer_id).filter(|n| *n > s.next_seq)
    {
        // The newest links are gone: nothing to bridge to, so the chain
        // continues from the last link found.
        let (points, per_tag) = estimate(
            chosen.iter().rev().map(|c| &c.batch),
            std::iter::empty(),
            next - last_seq - 1,
        );
        s.gaps.push(PendingLoss {
            first: last_seq + 1,
            prev: link,
            loss: Loss {
                last_seq: next - 1,
                points,
                tags: tag_losses(per_tag),
                reason: LossReason::Corrupted as i32,
                bridge_hash: link.to_vec(),
                estimated: true,
            },
        });
        s.next_seq = next;
    }
    let mut versions: Vec<u64> = chosen
        .iter()
        .map(|c| c.batch.manifest_version)
        .filter(|v| *v != 0)
        .collect();
    versions.sort_unstable();
    versions.dedup();
    for v in versions {
        if let Some(m) = find_manifest(bytes, v) {
            s.manifests.push((v, m));
        }
    }
    s.records = chosen
        .into_iter()
        .map(|c| SalvagedRecord {
            seq: c.seq,
            last_seq: c.last_seq,
            bytes: c.bytes.to_vec(),
        })
        .collect();
    s
}

/// Samples of one tag in one batch: times ascending, all Bad?, manifest version.
struct TagSamples {
    times: Vec<i64>,
    all_bad: bool,
    manifest_version: u64,
}

fn by_tag(batch: &Batch) -> BTreeMap<u32, TagSamples> {
    let mut out: BTreeMap<u32, TagSamples> = BTreeMap::new();
    for p in &batch.points {
        let e = out.entry(p.tag).or_insert(TagSamples {
            times: Vec::new(),
            all_bad: true,
            manifest_version: batch.manifest_version,
        });
        e.times
            .push(batch.base_time_ms.saturating_add(p.time_offset_ms));
        e.all_bad &= p.quality == Quality::Bad as i32;
    }
    for e in out.values_mut() {
        e.times.sort_unstable();
    }
    out
}

/// Estimates the points per tag of `seqs` missing batches from the nearest
/// batches with points before (`before`, nearest first) and after them.
///
/// A tag seen on both sides: the time between its last sample before and
/// its first after, divided by its interval (the median spacing of its
/// samples in both batches), less one. A tag seen on one side only: as many
/// samples per missing batch as that batch holds.
pub(super) fn estimate<'a>(
    before: impl Iterator<Item = &'a Batch>,
    after: impl Iterator<Item = &'a Batch>,
    seqs: u64,
) -> (u64, TagLossMap) {
    fn nearest_with_points<'b>(
        mut it: impl Iterator<Item = &'b Batch>,
    ) -> BTreeMap<u32, TagSamples> {
        it.find(|b| b.loss.is_none() && !b.points.is_empty())
            .map(by_tag)
            .unwrap_or_default()
    }
    let before = nearest_with_points(before);
    let after = nearest_with_points(after);
    let mut per_tag = TagLossMap::new();
    let mut tags: Vec<u32> = before.keys().chain(after.keys()).copied().collect();
    tags.sort_unstable();
    tags.dedup();
    for tag in tags {
        let (b, a) = (before.get(&tag), after.get(&tag));
        let mut spacings: Vec<i64> = [b, a]
            .into_iter()
            .flatten()
            .flat_map(|s| s.times.windows(2).map(|w| w[1].saturating_sub(w[0])))
            .filter(|d| *d > 0)
            .collect();
        spacings.sort_unstable();
        let interval = spacings.get(spacings.len() / 2).copied();
        let Some(one) = b.or(a) else { continue };
        let all_bad = [b, a].into_iter().flatten().all(|s| s.all_bad);
        let (points, first, last) = match (b, a, interval) {
            (Some(b), Some(a), Some(step)) => {
                let (t0, t1) = (b.times[b.times.len() - 1], a.times[0]);
                let n =
                    ((t1.saturating_sub(t0) as f64 / step as f64).round() as i64).saturating_sub(1);
                (
                    n.max(0) as u64,
                    t0.saturating_add(step),
                    t1.saturating_sub(step),
                )
            }
            _ => {
                let n = (one.times.len() as u64).saturating_mul(seqs);
                let step = interval.unwrap_or(1);
                let span =
                    step.saturating_mul(i64::try_from(n.saturating_sub(1)).unwrap_or(i64::MAX));
                if b.is_some() {
                    let t0 = one.times[one.times.len() - 1].saturating_add(step);
                    (n, t0, t0.saturating_add(span))
                } else {
                    let t1 = one.times[0].saturating_sub(step);
                    (n, t1.saturating_sub(span), t1)
                }
            }
        };
        if points == 0 {
            continue;
        }
        let bad = if all_bad { points } else { 0 };
        merge_tag_loss(
            &mut per_tag,
            (one.manifest_version, tag),
            points,
            first,
            last,
            bad,
        );
    }
    let points = per_tag
        .values()
        .fold(0u64, |sum, e| sum.saturating_add(e.0));
    (points, per_tag)
}

/// For the fuzz target `salvage_file` (gateway/fuzz): scans `data` as the
/// raw bytes of an unreadable buffer file, and a file built from `data`
/// whose records are well framed (right CRC, any sequence numbers, times
/// and losses) between garbage bytes and `meta` copies, so that the choice
/// among copies and the sizing of gaps are reached too. Panics when the
/// result is incoherent; any input must yield one without panicking.
pub fn fuzz_check(data: &[u8]) {
    check(&salvage(data));
    check(&salvage(&fuzz_file(data)));
}

/// Chunks of `[kind, a, b, n]` then `n` bytes: garbage, a `meta` copy, or a
/// framed record (data or loss) shaped by `kind`, `a`, `b` and the bytes.
fn fuzz_file(data: &[u8]) -> Vec<u8> {
    use crate::quality::Sample;
    use guantong_proto::chain::Algorithm;
    use guantong_proto::v1::point::Value;
    let mut out = Vec::new();
    let mut rest = data;
    while let Some((&[kind, a, b, n], tail)) = rest.split_first_chunk::<4>() {
        let (body, tail) = tail.split_at(usize::from(n).min(tail.len()));
        rest = tail;
        let word = |at: usize| {
            let mut w = [0u8; 8];
            for (i, x) in body.iter().skip(at).take(8).enumerate() {
                w[i] = *x;
            }
            u64::from_le_bytes(w)
        };
        let buffer_id: u64 = if kind & 4 == 0 { 0x1111 } else { 0x2223 };
        match kind % 4 {
            0 if kind & 8 == 0 => out.extend_from_slice(body),
            0 => {
                out.extend_from_slice(b"buffer_idbytesdropped_pointsnext_seq");
                out.extend_from_slice(&buffer_id.to_le_bytes());
                out.extend_from_slice(&[0; 16]);
                out.extend_from_slice(&word(0).to_le_bytes());
            }
            _ => {
                let seq = if kind & 8 == 0 {
                    u64::from(a % 32) + 1
                } else {
                    word(0)
                };
                let last_seq = if kind & 32 == 0 {
                    seq.saturating_add(u64::from(b % 4))
                } else {
                    word(8)
                };
                // Far-apart times, yet one batch spans less than i64::MAX.
                let scale = if kind & 64 == 0 { 1 } else { i64::MAX >> 17 };
                let samples: Vec<Sample> = body
                    .chunks(3)
                    .map(|c| {
                        let t = i64::from(i16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]));
                        Sample::good(
                            u32::from(*c.get(2).unwrap_or(&0) % 4),
                            t.wrapping_mul(scale),
                            Value::Uint(u64::from(c[0])),
                        )
                    })
                    .collect();
                let payload = if kind & 16 == 0 {
                    encode_batch(buffer_id, seq, 1, &samples, i64::from(a))
                } else {
                    let mut per_tag = TagLossMap::new();
                    for s in &samples {
                        merge_tag_loss(&mut per_tag, (1, s.tag), word(16), s.time_ms, s.time_ms, 0);
                    }
                    Batch {
                        buffer_id,
                        seq,
                        loss: Some(Loss {
                            last_seq,
                            points: word(16),
                            tags: tag_losses(per_tag),
                            reason: LossReason::Corrupted as i32,
                            bridge_hash: vec![b; 32 * usize::from(b & 1)],
                            estimated: true,
                        }),
                        ..Default::default()
                    }
                    .encode_to_vec()
                };
                let (version, header_last) = if kind & 16 == 0 {
                    (1, seq)
                } else {
                    (0, last_seq)
                };
                let algorithm = if kind & 128 == 0 {
                    Algorithm::Ed25519
                } else {
                    Algorithm::Sm2
                };
                out.extend(frame_record(
                    algorithm,
                    header_last,
                    version,
                    samples.len() as u32,
                    &[a; 32],
                    &[b; 64],
                    &payload,
                ));
            }
        }
    }
    out
}

/// What `salvage` returns must be usable as is: records ascending, not
/// overlapping, intact; gaps between them, each counting what it declares.
fn check(s: &Salvage) {
    for r in &s.records {
        assert!(
            r.seq <= r.last_seq,
            "record {} ends before it starts",
            r.seq
        );
        assert!(
            decode_record(&r.bytes).is_some(),
            "record {} is intact",
            r.seq
        );
        assert!(
            r.last_seq < s.next_seq,
            "next_seq {} after record {}",
            s.next_seq,
            r.seq
        );
    }
    for w in s.records.windows(2) {
        assert!(
            w[0].last_seq < w[1].seq,
            "records {} and {} overlap",
            w[0].seq,
            w[1].seq
        );
    }
    for g in &s.gaps {
        assert!(
            g.first <= g.loss.last_seq,
            "gap at {} ends before it starts",
            g.first
        );
        assert!(
            s.records
                .iter()
                .all(|r| r.last_seq < g.first || r.seq > g.loss.last_seq),
            "gap {}..={} overlaps a record",
            g.first,
            g.loss.last_seq
        );
        let sum = g
            .loss
            .tags
            .iter()
            .fold(0u64, |t, x| t.saturating_add(x.points));
        assert_eq!(sum, g.loss.points, "gap at {} counts its tags", g.first);
        assert_eq!(
            PendingLoss::decode(&g.encode()).as_ref(),
            Some(g),
            "stored form"
        );
    }
}

#[cfg(test)]
mod tests {
    use guantong_proto::v1::{Batch, Point};
    use rand::{Rng, SeedableRng};

    /// Neighbours at opposite ends of time (damaged bytes that still pass
    /// the CRC, or a clock gone wild): no overflow, nothing estimated.
    #[test]
    fn estimate_takes_times_at_the_ends_of_i64() {
        let batch = |base_time_ms: i64| Batch {
            base_time_ms,
            points: [0, 1]
                .map(|time_offset_ms| Point {
                    tag: 7,
                    time_offset_ms,
                    ..Default::default()
                })
                .to_vec(),
            ..Default::default()
        };
        let (before, after) = (batch(i64::MAX - 1), batch(i64::MIN));
        let (points, _) = super::estimate([&before].into_iter(), [&after].into_iter(), 3);
        assert_eq!(points, 0);
    }

    /// The fuzz target's check on random inputs, so `cargo test` runs it
    /// where cargo-fuzz is not installed; the seeds in
    /// `fuzz/regressions/salvage_file` too.
    #[test]
    fn salvage_takes_any_bytes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for _ in 0..3_000 {
            let mut data = vec![0u8; rng.random_range(0..600)];
            rng.fill(&mut data[..]);
            super::fuzz_check(&data);
        }
        let seeds = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/regressions/salvage_file");
        for entry in std::fs::read_dir(seeds).expect("regressions") {
            super::fuzz_check(&std::fs::read(entry.expect("entry").path()).expect("seed"));
        }
    }
}
