//! Merkle trees over evidence, as in RFC 6962 (Certificate Transparency) §2.1,
//! with SHA-256. Part of the evidence format: the golden vectors below must
//! never change.
//!
//! - Leaf hash: `SHA-256(0x00 ‖ leaf bytes)`.
//! - Node hash: `SHA-256(0x01 ‖ left ‖ right)`.
//! - The root of n > 1 leaves splits them at k, the largest power of two
//!   smaller than n: `node(root(leaves[..k]), root(leaves[k..]))`.
//! - The root of no leaves is `SHA-256("")`.
//! - An inclusion proof of leaf m is its audit path (RFC 6962 §2.1.1), checked
//!   as RFC 9162 §2.1.3.2 does.
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

/// The audit path of leaf `index` among `leaves` (hashed with
/// [`leaf_hash`]), RFC 6962 §2.1.1; None when `index` is out of range.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    let (mut lo, mut hi, mut m) = (0, leaves.len(), index);
    let mut siblings = Vec::new();
    while hi - lo > 1 {
        let k = split(hi - lo);
        if m < k {
            siblings.push(root_of_leaf_hashes(&leaves[lo + k..hi]));
            hi = lo + k;
        } else {
            siblings.push(root_of_leaf_hashes(&leaves[lo..lo + k]));
            lo += k;
            m -= k;
        }
    }
    // The path lists siblings from the leaf up.
    siblings.reverse();
    Some(siblings)
}

/// The root that `proof` gives for leaf `index` (its hash `leaf`) of a tree
/// of `size` leaves, RFC 9162 §2.1.3.2; None when the proof cannot belong
/// to such a tree.
pub fn root_from_inclusion_proof(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
) -> Option<Hash> {
    if index >= size {
        return None;
    }
    let (mut f, mut s, mut r) = (index, size - 1, *leaf);
    for p in proof {
        if s == 0 {
            return None;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    (s == 0).then_some(r)
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

    #[test]
    fn every_inclusion_proof_gives_the_root_and_no_other_leaf_does() {
        for n in 1..=20usize {
            let hashes: Vec<Hash> = (0..n as u8).map(|i| leaf_hash(&[i])).collect();
            let r = root_of_leaf_hashes(&hashes);
            for m in 0..n {
                let proof = inclusion_proof(&hashes, m).expect("in range");
                let (m64, n64) = (m as u64, n as u64);
                assert_eq!(
                    root_from_inclusion_proof(&hashes[m], m64, n64, &proof),
                    Some(r),
                    "leaf {m} of {n}"
                );
                let other = leaf_hash(b"not a leaf");
                assert_ne!(root_from_inclusion_proof(&other, m64, n64, &proof), Some(r));
                if n > 1 {
                    let moved = (m64 + 1) % n64;
                    assert_ne!(
                        root_from_inclusion_proof(&hashes[m], moved, n64, &proof),
                        Some(r)
                    );
                }
            }
            assert_eq!(inclusion_proof(&hashes, n), None);
        }
    }

    /// Golden vector: the audit path of leaf 2 of ["a", "b", "c"] (RFC 6962
    /// §2.1.1: [MTH(a, b)]), computed with Python's hashlib.
    #[test]
    fn golden_vector_of_an_inclusion_proof() {
        let hashes: Vec<Hash> = [b"a", b"b", b"c"].iter().map(|l| leaf_hash(*l)).collect();
        let proof = inclusion_proof(&hashes, 2).expect("in range");
        assert_eq!(proof.len(), 1);
        assert_eq!(hex::encode(proof[0]), GOLDEN_AB);
    }

    const GOLDEN_AB: &str = "b137985ff484fb600db93107c77b0365c80d78f5b429ded0fd97361d077999eb";
}
