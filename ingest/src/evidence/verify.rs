//! The offline verifier of an evidence bundle: needs nothing but the bundle
//! (and, optionally, digests a supervisor kept). It re-derives everything
//! from the signed bytes and states, per gateway, stream, batch, series and
//! day, what holds and what does not.
//!
//! Each link is judged by ingest's own walker (`store::chain::step`), the
//! one that verifies chains as batches arrive: the expected previous hash
//! (genesis for batch 1, else the previous link's effective hash) and
//! whether the signature counts are decided there and only there. This
//! module adds what only a bundle can get wrong: links listed out of order
//! or with gaps (after a gap the next link's previous hash is taken as
//! given, as at the bundle's first link), bytes that do not decode, and the
//! points, manifests and digests the signed bytes must agree with.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use guantong_proto::chain::{self, Algorithm, PublicKey};
use guantong_proto::merkle;
use guantong_proto::v1::{Batch, Manifest};
use prost::Message;

use super::bundle::{Bundle, FORMAT, GatewayEvidence, LinkEvidence, SeriesReport, VERSION};
use super::digest::{self, DIGEST_FORMAT, DayLink, SignedDigest};
use super::points::{PointsDigest, numeric, quality_byte};
use crate::store::chain::{self as walker, ChainState, LinkHead};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Holds,
    Fails,
    /// A fact the reader should know that is neither (e.g. an anchor taken
    /// as given, a kept digest this bundle does not cover).
    Note,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub status: Status,
    /// What the finding is about: `gateway G`, `… buffer B`, `… batch N`,
    /// `… series D/T`, `… day YYYY-MM-DD`.
    pub subject: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match self.status {
            Status::Holds => "HOLDS",
            Status::Fails => "FAILS",
            Status::Note => "NOTE ",
        };
        write!(f, "{status} {}: {}", self.subject, self.message)
    }
}

#[derive(Debug, Default)]
pub struct Verdict {
    pub findings: Vec<Finding>,
}

impl Verdict {
    pub fn failures(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.status == Status::Fails)
            .count()
    }

    fn push(&mut self, status: Status, subject: impl Into<String>, message: impl Into<String>) {
        self.findings.push(Finding {
            status,
            subject: subject.into(),
            message: message.into(),
        });
    }
}

/// What a bundle states that no signature covers, said in every verdict so
/// nobody takes it as proven.
pub const UNSIGNED_FIELDS: &str = "not signed, so ingest's word only: `created_at_ms`, each gateway's `key_source`, \
     and each batch's `received_at_ms` within its day (ingest's signed day digest fixes only the day)";

/// Verifies a bundle, and that it agrees with `kept` digests (of any
/// gateways and days; those the bundle does not cover are noted).
pub fn verify(bundle: &Bundle, kept: &[SignedDigest]) -> Verdict {
    let mut v = Verdict::default();
    if bundle.format != FORMAT || bundle.version != VERSION {
        v.push(
            Status::Fails,
            "bundle",
            format!(
                "format `{}` version {} is not `{FORMAT}` version {VERSION}",
                bundle.format, bundle.version
            ),
        );
        return v;
    }
    v.push(Status::Note, "bundle", UNSIGNED_FIELDS);
    if let Some(from) = bundle.points_from_ms {
        v.push(
            Status::Note,
            "bundle",
            format!(
                "ingest's retention dropped the points before {} (`points_from_ms`, not signed): \
                 the signed points of earlier source times are not compared with served ones",
                crate::http::rfc3339(from)
            ),
        );
    }
    let mut covered = HashSet::new();
    for g in &bundle.gateways {
        verify_gateway(bundle, g, &mut v);
        for d in &g.days {
            covered.insert((g.id.clone(), d.digest.day.clone()));
            for k in kept
                .iter()
                .filter(|k| k.subject == g.id && k.day == d.digest.day)
            {
                check_kept(&g.id, k, &d.digest, &mut v);
            }
        }
    }
    for k in kept {
        if !covered.contains(&(k.subject.clone(), k.day.clone())) {
            v.push(
                Status::Note,
                format!("kept digest {} {}", k.subject, k.day),
                "not covered by this bundle (not checked)",
            );
        }
    }
    v
}

fn check_kept(gateway: &str, kept: &SignedDigest, now: &SignedDigest, v: &mut Verdict) {
    let subject = format!("gateway {gateway} day {}", kept.day);
    if kept.format != DIGEST_FORMAT || !digest::verify_signature(kept) {
        v.push(
            Status::Fails,
            subject,
            "the kept digest's signature does not verify (it was not issued by an ingest key)",
        );
    } else if kept.ingest_public_key != now.ingest_public_key {
        v.push(
            Status::Fails,
            subject,
            format!(
                "the kept digest was signed by ingest key {} but this bundle's by {}",
                kept.ingest_public_key, now.ingest_public_key
            ),
        );
    } else if kept.root != now.root || kept.leaves != now.leaves {
        v.push(
            Status::Fails,
            subject,
            format!(
                "contradicts the digest kept: kept root {} over {} links, the stored data now gives root {} over {} links",
                kept.root, kept.leaves, now.root, now.leaves
            ),
        );
    } else {
        v.push(
            Status::Holds,
            subject,
            format!("matches the digest kept (root {})", kept.root),
        );
    }
}

fn hex_field(name: &str, s: &str) -> Result<Vec<u8>, String> {
    hex::decode(s).map_err(|e| format!("{name} is not hex: {e}"))
}

fn parse_id(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 16).ok()
}

struct GatewayCheck<'a> {
    id: &'a str,
    key: Option<PublicKey>,
    manifests: HashMap<u64, Manifest>,
    rejected: HashSet<(u64, u64)>,
    /// Recomputed from the signed batches, for the window.
    report: BTreeMap<(String, String), SeriesReport>,
    /// (day, leaf) of every link.
    leaves: Vec<(String, [u8; 48], u64, u64)>,
    /// The manifest version the stream's last manifest link announced (None:
    /// none seen, or a loss record since, which may have replaced one).
    announced: Option<u64>,
    /// Versions used without an announcement in the bundle (noted once).
    unannounced: HashSet<(u64, u64)>,
}

/// The bundle's bound key; a bundle without `key_algorithm` predates SM2 and
/// its keys are Ed25519.
fn bound_key(hex_key: &str, algorithm: Option<&str>) -> Result<PublicKey, String> {
    let name = algorithm.unwrap_or("ed25519");
    let algorithm = Algorithm::from_name(name)
        .ok_or_else(|| format!("key_algorithm `{name}` is not ed25519 or sm2"))?;
    let bytes = hex::decode(hex_key).map_err(|e| format!("not hex: {e}"))?;
    PublicKey::new(algorithm, bytes)
}

fn verify_gateway(bundle: &Bundle, g: &GatewayEvidence, v: &mut Verdict) {
    let subject = format!("gateway {}", g.id);
    let key = match &g.public_key {
        None => {
            v.push(
                Status::Fails,
                &subject,
                "no public key is bound to this gateway: its signatures cannot be checked",
            );
            None
        }
        Some(h) => match bound_key(h, g.key_algorithm.as_deref()) {
            Ok(k) => {
                v.push(
                    Status::Note,
                    &subject,
                    format!(
                        "key {} bound {} (`key_source`, not signed)",
                        k.fingerprint(),
                        match g.key_source.as_deref() {
                            Some("registered") => "at registration",
                            Some("trust-on-first-use") =>
                                "by trust on first use (not checked by anyone)",
                            _ => "by an unrecorded method",
                        }
                    ),
                );
                Some(k)
            }
            Err(e) => {
                v.push(Status::Fails, &subject, format!("public_key: {e}"));
                None
            }
        },
    };
    let mut check = GatewayCheck {
        id: &g.id,
        key,
        manifests: HashMap::new(),
        rejected: HashSet::new(),
        report: BTreeMap::new(),
        leaves: Vec::new(),
        announced: None,
        unannounced: HashSet::new(),
    };
    for m in &g.manifests {
        let decoded = hex::decode(&m.bytes)
            .map_err(|e| e.to_string())
            .and_then(|b| Manifest::decode(b.as_slice()).map_err(|e| e.to_string()));
        match decoded {
            Ok(manifest) if format!("{:016x}", manifest.version) == m.version => {
                check.manifests.insert(manifest.version, manifest);
            }
            Ok(manifest) => v.push(
                Status::Fails,
                format!("{subject} manifest {}", m.version),
                format!("the bytes are manifest {:016x}", manifest.version),
            ),
            Err(e) => v.push(
                Status::Fails,
                format!("{subject} manifest {}", m.version),
                format!("does not decode: {e}"),
            ),
        }
    }
    for l in g.losses.iter().filter(|l| l.is_rejection()) {
        if let Some(b) = parse_id(&l.buffer_id) {
            check.rejected.insert((b, l.first_seq));
        }
    }
    for s in &g.streams {
        let stream_subject = format!("{subject} buffer {}", s.buffer_id);
        let Some(buffer_id) = parse_id(&s.buffer_id) else {
            v.push(
                Status::Fails,
                stream_subject,
                "buffer_id is not 16 hex digits",
            );
            continue;
        };
        for b in &s.recorded_breaks {
            v.push(
                Status::Note,
                format!("{stream_subject} batch {}", b.seq),
                format!("ingest recorded on receipt: {}", b.reason),
            );
        }
        check.stream(bundle, buffer_id, &stream_subject, &s.links, v);
    }
    let mut unannounced: Vec<_> = check.unannounced.iter().copied().collect();
    unannounced.sort_unstable();
    for (buffer_id, version) in unannounced {
        v.push(
            Status::Note,
            format!("{subject} buffer {buffer_id:016x}"),
            format!("manifest {version:016x} is used without a manifest link in the bundle (announced before the window, or by a gateway predating manifest links)"),
        );
    }
    check.compare_report(&g.series, &subject, v);
    check.days(g, &bundle.ingest_public_key, &subject, v);
}

impl GatewayCheck<'_> {
    fn stream(
        &mut self,
        bundle: &Bundle,
        buffer_id: u64,
        subject: &str,
        links: &[LinkEvidence],
        v: &mut Verdict,
    ) {
        // The walker's state; `known` is false when the next link's
        // previous hash cannot be checked (after a gap or an undecodable
        // link, or at a first link other than batch 1).
        let mut st = ChainState::default();
        let mut known = true;
        let mut last: Option<u64> = None;
        let mut broken = Vec::new();
        self.announced = None;
        for l in links {
            let at = format!("{subject} batch {}", l.seq);
            let mut reasons = Vec::new();
            match last {
                Some(p) if l.seq <= p => {
                    reasons.push(format!("out of order: listed after batch {p}"));
                }
                Some(p) if l.seq != p + 1 => {
                    reasons.push(format!(
                        "batches {}..={} are missing before it",
                        p + 1,
                        l.seq - 1
                    ));
                    known = false;
                }
                None if l.seq != 1 => {
                    known = false;
                    v.push(
                        Status::Note,
                        &at,
                        format!(
                            "the bundle's chain starts here; its previous hash {} is taken as given",
                            l.prev_hash
                        ),
                    );
                }
                _ => {}
            }
            known = self.link(bundle, buffer_id, l, &mut st, known, &mut reasons);
            last = Some(l.last_seq.max(l.seq));
            for r in reasons.drain(..) {
                v.push(Status::Fails, &at, r);
                broken.push(l.seq);
            }
        }
        match (links.first(), links.last()) {
            (Some(first), Some(end)) if broken.is_empty() => v.push(
                Status::Holds,
                subject,
                format!(
                    "chain verified from batch {} to batch {} ({} links), head {}",
                    first.seq,
                    end.last_seq.max(end.seq),
                    links.len(),
                    st.head.unwrap_or_default()
                ),
            ),
            (Some(_), Some(_)) => {
                broken.dedup();
                v.push(
                    Status::Fails,
                    subject,
                    format!("chain broken at batches {broken:?}"),
                )
            }
            _ => v.push(Status::Note, subject, "no links in the window"),
        }
    }

    /// Checks one link with the walker, advancing `st` past it; `known`:
    /// whether `st` holds the hash this link must name. Returns whether the
    /// next link's previous hash can be checked.
    fn link(
        &mut self,
        bundle: &Bundle,
        buffer_id: u64,
        l: &LinkEvidence,
        st: &mut ChainState,
        known: bool,
        reasons: &mut Vec<String>,
    ) -> bool {
        let decoded = (|| {
            let prev = hex_field("prev_hash", &l.prev_hash)?;
            let prev = chain::to_hash(&prev).ok_or("prev_hash is not 32 bytes")?;
            Ok::<_, String>((
                prev,
                hex_field("signature", &l.signature)?,
                hex_field("payload", &l.payload)?,
            ))
        })();
        let (prev, signature, payload) = match decoded {
            Ok(d) => d,
            Err(e) => {
                reasons.push(e);
                return false;
            }
        };
        let Some(algorithm) = Algorithm::from_name(&l.algorithm) else {
            reasons.push(format!(
                "signature algorithm `{}` is not ed25519 or sm2",
                l.algorithm
            ));
            return false;
        };
        let hash = algorithm.link_hash(&prev, &payload);
        if let Some(key) = &self.key
            && key.algorithm != algorithm
        {
            reasons.push(format!(
                "signed with {algorithm} but the gateway's bound key is {}",
                key.algorithm
            ));
        }
        let batch = Batch::decode(payload.as_slice());
        let effective = batch
            .as_ref()
            .ok()
            .and_then(|b| b.loss.as_ref())
            .and_then(|loss| chain::to_hash(&loss.bridge_hash))
            .unwrap_or(hash);
        // The walker checks this link as the one after `l.seq - 1`; without
        // a known predecessor its previous hash is taken as given.
        st.verified_through = l.seq.saturating_sub(1);
        if !known {
            st.head = Some(hex::encode(prev));
        }
        let head = LinkHead {
            algorithm,
            prev_hash: prev.to_vec(),
            effective_hash: effective.to_vec(),
            signature_checked: self.key.is_some(),
            signature_ok: walker::signature_ok(
                self.key.as_ref(),
                Some(algorithm),
                &hash,
                &signature,
            ),
            last_seq: l.last_seq,
        };
        reasons.extend(walker::step(st, self.id, buffer_id, &head));
        self.leaves.push((
            digest::day_of(l.received_at_ms),
            DayLink {
                buffer_id,
                seq: l.seq,
                link_hash: hash,
            }
            .leaf(),
            buffer_id,
            l.seq,
        ));
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                reasons.push(format!("the signed bytes are not a Batch: {e}"));
                return true;
            }
        };
        let last = batch
            .loss
            .as_ref()
            .map_or(batch.seq, |loss| loss.last_seq.max(batch.seq));
        if batch.buffer_id != buffer_id || batch.seq != l.seq || last != l.last_seq {
            reasons.push(format!(
                "listed as batches {}..={} of buffer {buffer_id:016x}, but the signed batch is {}..={last} of buffer {:016x}",
                l.seq, l.last_seq, batch.seq, batch.buffer_id
            ));
        }
        if batch.loss.is_some() {
            self.announced = None;
        } else if !batch.manifest_sha256.is_empty() {
            self.manifest_link(&batch, reasons);
        } else {
            match self.announced {
                Some(v) if v != batch.manifest_version => reasons.push(format!(
                    "uses manifest {:016x} but the chain's last manifest link announced {v:016x}",
                    batch.manifest_version
                )),
                Some(_) => {}
                None => {
                    self.unannounced.insert((buffer_id, batch.manifest_version));
                }
            }
            self.points(bundle, buffer_id, l, &batch, reasons);
        }
        true
    }

    /// A manifest link: the manifest in the bundle must be the one signed.
    fn manifest_link(&mut self, batch: &Batch, reasons: &mut Vec<String>) {
        self.announced = Some(batch.manifest_version);
        if !batch.points.is_empty() {
            reasons.push("a manifest link carries points".into());
        }
        match self.manifests.get(&batch.manifest_version) {
            None => reasons.push(format!(
                "announces manifest {:016x}, which is not in the bundle",
                batch.manifest_version
            )),
            Some(m) if chain::manifest_hash(m).as_slice() != batch.manifest_sha256.as_slice() => {
                reasons.push(format!(
                    "the bundle's manifest {:016x} is not the one this manifest link signed",
                    batch.manifest_version
                ))
            }
            Some(_) => {}
        }
    }

    /// Compares the batch's signed points with what ingest serves for it,
    /// and adds them to the recomputed report.
    fn points(
        &mut self,
        bundle: &Bundle,
        buffer_id: u64,
        l: &LinkEvidence,
        batch: &Batch,
        reasons: &mut Vec<String>,
    ) {
        let Some(manifest) = self.manifests.get(&batch.manifest_version) else {
            reasons.push(format!(
                "manifest {:016x} is not in the bundle",
                batch.manifest_version
            ));
            return;
        };
        let rejected = self.rejected.contains(&(buffer_id, batch.seq));
        let mut signed = PointsDigest::default();
        for p in &batch.points {
            let tag = manifest.tags.get(p.tag as usize);
            let (device, name) = match tag {
                Some(t) => (
                    manifest
                        .devices
                        .get(t.device as usize)
                        .map_or("", |d| d.id.as_str()),
                    t.name.as_str(),
                ),
                None => {
                    reasons.push(format!("a point names tag {} outside its manifest", p.tag));
                    return;
                }
            };
            let t = batch.base_time_ms.saturating_add(p.time_offset_ms);
            if bundle.points_from_ms.is_some_and(|from| t < from) {
                continue; // dropped by ingest's retention: signed, not served
            }
            signed.add(device, name, t, p);
            if !rejected && t >= bundle.from_ms && t < bundle.to_ms {
                let r = self
                    .report
                    .entry((device.to_string(), name.to_string()))
                    .or_insert_with(|| SeriesReport {
                        device: device.into(),
                        tag: name.into(),
                        ..Default::default()
                    });
                match quality_byte(p) {
                    0 => r.good += 1,
                    1 => r.uncertain += 1,
                    _ => r.bad += 1,
                }
                r.sum += numeric(p).unwrap_or(0.0);
            }
        }
        let expected = if rejected {
            PointsDigest::default()
        } else {
            signed
        };
        if l.served.points != expected.count || l.served.digest != expected.hex() {
            reasons.push(format!(
                "the points ingest serves for this batch differ from the signed batch ({} signed{}, {} served)",
                signed.count,
                if rejected { ", refused by ingest" } else { "" },
                l.served.points
            ));
        }
    }

    fn compare_report(&self, reported: &[SeriesReport], subject: &str, v: &mut Verdict) {
        let mut keys: Vec<(String, String)> = self.report.keys().cloned().collect();
        keys.extend(reported.iter().map(|r| (r.device.clone(), r.tag.clone())));
        keys.sort();
        keys.dedup();
        let mut matching = 0;
        for k in keys {
            let signed = self.report.get(&k).cloned().unwrap_or_default();
            let served = reported
                .iter()
                .find(|r| r.device == k.0 && r.tag == k.1)
                .cloned()
                .unwrap_or_default();
            let counts = |r: &SeriesReport| (r.good, r.uncertain, r.bad);
            let tolerance = 1e-9 * signed.sum.abs().max(served.sum.abs()).max(1.0);
            if counts(&signed) == counts(&served) && (signed.sum - served.sum).abs() <= tolerance {
                matching += 1;
            } else {
                v.push(
                    Status::Fails,
                    format!("{subject} series {}/{}", k.0, k.1),
                    format!(
                        "the report says good/uncertain/bad {}/{}/{}, sum {}; the signed batches hold {}/{}/{}, sum {}",
                        served.good, served.uncertain, served.bad, served.sum,
                        signed.good, signed.uncertain, signed.bad, signed.sum
                    ),
                );
            }
        }
        let total = self.report.len().max(reported.len()).max(matching);
        v.push(
            if matching == total {
                Status::Holds
            } else {
                Status::Note
            },
            format!("{subject} report"),
            format!("{matching} of {total} series agree with the signed batches over the window"),
        );
    }

    fn days(&self, g: &GatewayEvidence, ingest_key: &str, subject: &str, v: &mut Verdict) {
        let mut by_day: BTreeMap<&str, HashSet<[u8; 48]>> = BTreeMap::new();
        for d in &g.days {
            let at = format!("{subject} day {}", d.digest.day);
            let leaves: Result<Vec<Vec<u8>>, String> =
                d.leaves.iter().map(|l| hex_field("leaf", l)).collect();
            let leaves = match leaves {
                Ok(l) if l.iter().all(|l| l.len() == 48) => l,
                _ => {
                    v.push(Status::Fails, at, "leaves are not 48-byte hex strings");
                    continue;
                }
            };
            let root = hex::encode(merkle::root(&leaves));
            if d.digest.subject != g.id || d.digest.format != DIGEST_FORMAT {
                v.push(
                    Status::Fails,
                    &at,
                    "the digest is not this gateway's day digest",
                );
            } else if d.digest.ingest_public_key != ingest_key
                || !digest::verify_signature(&d.digest)
            {
                v.push(
                    Status::Fails,
                    &at,
                    "the digest's signature does not verify with the bundle's ingest key",
                );
            } else if root != d.digest.root || leaves.len() as u64 != d.digest.leaves {
                v.push(
                    Status::Fails,
                    &at,
                    format!(
                        "the leaves give root {root} over {} links, the digest says {} over {}",
                        leaves.len(),
                        d.digest.root,
                        d.digest.leaves
                    ),
                );
            } else {
                v.push(
                    Status::Holds,
                    &at,
                    format!(
                        "signed digest verified: root {} over {} links",
                        root, d.digest.leaves
                    ),
                );
            }
            by_day.insert(
                &d.digest.day,
                leaves
                    .iter()
                    .filter_map(|l| <[u8; 48]>::try_from(l.as_slice()).ok())
                    .collect(),
            );
        }
        for (day, leaf, buffer_id, seq) in &self.leaves {
            let at = format!("{subject} buffer {buffer_id:016x} batch {seq}");
            match by_day.get(day.as_str()) {
                None => v.push(
                    Status::Fails,
                    at,
                    format!("no digest of day {day} in the bundle"),
                ),
                Some(set) if !set.contains(leaf) => v.push(
                    Status::Fails,
                    at,
                    format!("its link is not among the leaves of the digest of {day}"),
                ),
                Some(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verdict_says_which_fields_no_signature_covers() {
        let bundle = Bundle {
            format: FORMAT.into(),
            version: VERSION,
            created_at_ms: 0,
            from_ms: 0,
            to_ms: 1,
            points_from_ms: None,
            ingest_public_key: String::new(),
            gateways: Vec::new(),
        };
        let v = verify(&bundle, &[]);
        let said: Vec<String> = v.findings.iter().map(ToString::to_string).collect();
        assert!(
            said.iter()
                .any(|f| f.starts_with("NOTE  bundle: not signed")
                    && f.contains("key_source")
                    && f.contains("received_at_ms")),
            "{said:?}"
        );
    }
}
