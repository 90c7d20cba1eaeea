//! The online evidence-chain walker, whatever the backend: each stream
//! (gateway, buffer) is verified in sequence order as its links arrive.
//!
//! A backend keeps per stream a `ChainState` and the received links by
//! sequence number; after storing a link it calls `step` for each link that
//! follows the verified ones, in order, stopping at the first number not
//! received yet, and records the breaks `step` returns. Invariants: a break
//! (bad or unchecked signature, wrong previous hash, a chain anchored
//! mid-stream) is recorded and the chain continues from the breaking link, so
//! one bad batch does not hide the rest; `verified_through` only grows.

use guantong_proto::chain::{Algorithm, Hash, PublicKey};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChainState {
    pub verified_from: u64,
    pub verified_through: u64,
    /// Hex link hash the next link must name; None before any link.
    pub head: Option<String>,
}

impl ChainState {
    /// The sequence number of the link to verify next.
    pub fn next(&self) -> u64 {
        self.verified_through + 1
    }
}

/// What the walker needs of a stored link (not its payload).
#[derive(Debug, Clone)]
pub struct LinkHead {
    pub algorithm: Algorithm,
    pub prev_hash: Vec<u8>,
    /// The hash the next link must name (a loss record's bridge, or the
    /// link's own hash).
    pub effective_hash: Vec<u8>,
    pub signature_ok: bool,
    /// A key was bound, so the signature could be checked at all.
    pub signature_checked: bool,
    /// The last number the link covers (a loss record covers a range).
    pub last_seq: u64,
}

/// Whether a link's signature counts: a key is bound, the link names that
/// key's algorithm (`named`; None: an algorithm ingest does not know), and
/// the signature over the link hash verifies with it. The one rule, for
/// links received (`grpc`) and links re-read (`verify-chain`, bundles).
pub fn signature_ok(
    key: Option<&PublicKey>,
    named: Option<Algorithm>,
    link_hash: &Hash,
    signature: &[u8],
) -> bool {
    key.is_some_and(|k| Some(k.algorithm) == named && k.verify(link_hash, signature))
}

/// Verifies `link`, the link numbered `st.next()` of stream (`gateway`,
/// `buffer_id`), and advances `st` past it. Returns the breaks to record at
/// that number, in order.
pub fn step(st: &mut ChainState, gateway: &str, buffer_id: u64, link: &LinkHead) -> Vec<String> {
    let seq = st.next();
    let mut breaks = Vec::new();
    let expected = match &st.head {
        Some(h) => Some(h.clone()),
        None if seq == 1 => Some(hex::encode(link.algorithm.genesis(gateway, buffer_id))),
        None => None, // anchored mid-stream: earlier links were acknowledged elsewhere
    };
    if !link.signature_checked {
        if st.verified_from == 0 {
            breaks.push(
                "no public key bound to this gateway: signatures are not checked (register it with --public-key)"
                    .into(),
            );
        }
    } else if !link.signature_ok {
        breaks.push("signature does not verify with the gateway's key".into());
    }
    match expected {
        Some(e) if e != hex::encode(&link.prev_hash) => breaks.push(format!(
            "does not link to the previous batch (expected previous hash {e})"
        )),
        None => breaks.push("chain anchored here: earlier batches are not in this store".into()),
        _ => {}
    }
    if st.verified_from == 0 {
        st.verified_from = seq;
    }
    st.head = Some(hex::encode(&link.effective_hash));
    st.verified_through = link.last_seq.max(seq);
    breaks
}
