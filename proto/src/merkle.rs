//! Merkle trees over evidence, as in RFC 6962 (Certificate Transparency) §2.1,
//! with SHA-256. Part of the evidence format: the golden vectors below must
//! never change.
//!
//! - Leaf hash: `SHA-256(0x00 ‖ leaf bytes)`.
//! - Node hash: `SHA-256(0x01 ‖ left ‖ right)`.
//! - The root of n > 1 leaves splits them at k, the largest power of two
//!   smaller than n: `node(root(leaves[..k]), root(leaves[k..]))`.
//! - The root of no leaves is `SHA-256("")`.
//!
//! What the leaves are is defined where a tree is used (daily digests:
//! `ingest/src/evidence/digest.rs`).

use sha2::{Digest, Sha256};

use crate::chain::Hash;

pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(leaf);
    h.finalize().into()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root over leaves already hashed with [`leaf_hash`].
pub fn root_of_leaf_hashes(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(
                &root_of_leaf_hashes(&leaves[..k]),
                &root_of_leaf_hashes(&leaves[k..]),
            )
        }
    }
}

/// The root over raw leaves.
pub fn root<L: AsRef<[u8]>>(leaves: &[L]) -> Hash {
    let hashed: Vec<Hash> = leaves.iter().map(|l| leaf_hash(l.as_ref())).collect();
    root_of_leaf_hashes(&hashed)
}

/// The largest power of two smaller than `n` (n > 1).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden vectors, computed independently with Python's hashlib
    /// following RFC 6962 §2.1. Never update them to make a test pass.
    #[test]
    fn golden_vectors_of_rfc6962_trees() {
        assert_eq!(
            hex::encode(root::<&[u8]>(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex::encode(root(&[b"a"])),
            "022a6979e6dab7aa5ae4c3e5e45f7e977112a7e63593820dbec1ec738a24f93c"
        );
        assert_eq!(
            hex::encode(root(&[b"a", b"b", b"c"])),
            "36642e73c2540ab121e3a6bf9545b0a24982cd830eb13d3cd19de3ce6c021ec1"
        );
    }

    #[test]
    fn any_changed_leaf_or_order_changes_the_root() {
        let leaves: Vec<Vec<u8>> = (0..7u8).map(|i| vec![i]).collect();
        let r = root(&leaves);
        let mut swapped = leaves.clone();
        swapped.swap(2, 3);
        assert_ne!(root(&swapped), r);
        let mut edited = leaves.clone();
        edited[6][0] ^= 1;
        assert_ne!(root(&edited), r);
        assert_ne!(root(&leaves[..6]), r);
    }
}
