//! The canonical form of a point for comparing the queryable tables with the
//! signed batches, and an order-independent digest over a batch's points.
//!
//! Encoding of one point (all integers big-endian):
//! `u32 len ‖ device id ‖ u32 len ‖ tag name ‖ i64 source time ms ‖
//! u8 quality (0 Good, 1 Uncertain, 2 Bad) ‖ u32 quality code ‖ value`, where
//! value is `0x00` (none), `0x01 ‖ u8` (bool), `0x02 ‖ i64` (int),
//! `0x03 ‖ u64` (uint), `0x04 ‖ f64 bits` (double) or `0x05 ‖ u32 len ‖ UTF-8`
//! (string).
//!
//! Digest of a set of points: each point's `SHA-256("guantong/point/v1" ‖
//! encoding)` read as a 256-bit big-endian integer, summed modulo 2^256, plus
//! the number of points. The sum does not depend on order, so the points of
//! one batch can be gathered from many chunks in any order.

use guantong_proto::v1::{Point, Quality, point::Value};
use sha2::{Digest, Sha256};

const POINT_DOMAIN: &[u8] = b"guantong/point/v1";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PointsDigest {
    pub count: u64,
    pub sum: [u8; 32],
}

impl PointsDigest {
    /// Adds one point; `time_ms` is its absolute source time.
    pub fn add(&mut self, device: &str, tag: &str, time_ms: i64, p: &Point) {
        let mut h = Sha256::new();
        h.update(POINT_DOMAIN);
        h.update(encode(device, tag, time_ms, p));
        let d: [u8; 32] = h.finalize().into();
        let mut carry = 0u16;
        for i in (0..32).rev() {
            let s = self.sum[i] as u16 + d[i] as u16 + carry;
            self.sum[i] = s as u8;
            carry = s >> 8;
        }
        self.count += 1;
    }

    pub fn hex(&self) -> String {
        hex::encode(self.sum)
    }
}

pub fn quality_byte(p: &Point) -> u8 {
    match Quality::try_from(p.quality).unwrap_or(Quality::Bad) {
        Quality::Good => 0,
        Quality::Uncertain => 1,
        Quality::Bad => 2,
    }
}

/// The canonical encoding of one point (see the module doc).
pub fn encode(device: &str, tag: &str, time_ms: i64, p: &Point) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + device.len() + tag.len());
    out.extend_from_slice(&(device.len() as u32).to_be_bytes());
    out.extend_from_slice(device.as_bytes());
    out.extend_from_slice(&(tag.len() as u32).to_be_bytes());
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(&time_ms.to_be_bytes());
    out.push(quality_byte(p));
    out.extend_from_slice(&p.quality_code.to_be_bytes());
    match &p.value {
        None => out.push(0),
        Some(Value::Bool(b)) => out.extend_from_slice(&[1, *b as u8]),
        Some(Value::Int(i)) => {
            out.push(2);
            out.extend_from_slice(&i.to_be_bytes());
        }
        Some(Value::Uint(u)) => {
            out.push(3);
            out.extend_from_slice(&u.to_be_bytes());
        }
        Some(Value::Double(d)) => {
            out.push(4);
            out.extend_from_slice(&d.to_bits().to_be_bytes());
        }
        Some(Value::String(s)) => {
            out.push(5);
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

/// The numeric value of a point for report sums (int, uint, double).
pub fn numeric(p: &Point) -> Option<f64> {
    match p.value.as_ref()? {
        Value::Int(i) => Some(*i as f64),
        Value::Uint(u) => Some(*u as f64),
        Value::Double(d) => Some(*d),
        Value::Bool(_) | Value::String(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(v: u64) -> Point {
        Point {
            tag: 0,
            time_offset_ms: 0,
            value: Some(Value::Uint(v)),
            quality: 0,
            quality_code: 0,
            server_time_delta_ms: None,
        }
    }

    /// Golden vector, computed independently with Python's hashlib.
    #[test]
    fn golden_vector_and_order_independence() {
        let p = point(5);
        assert_eq!(
            hex::encode(encode("dev", "x", 1000, &p)),
            "00000003646576000000017800000000000003e8000000000003\
             0000000000000005"
        );
        let mut golden = PointsDigest::default();
        golden.add("dev", "x", 1000, &p);
        golden.add("dev", "x", 2000, &point(6));
        assert_eq!(
            golden.hex(),
            "5e2b4ef87928b6041b792eb243fbdd94dda9a79dbbcd32bcb20c16b1a1a81892"
        );
        let mut a = PointsDigest::default();
        a.add("dev", "x", 1000, &p);
        a.add("dev", "x", 2000, &point(6));
        let mut b = PointsDigest::default();
        b.add("dev", "x", 2000, &point(6));
        b.add("dev", "x", 1000, &p);
        assert_eq!(a, b);
        assert_eq!(a.count, 2);
        let mut c = PointsDigest::default();
        c.add("dev", "x", 1000, &p);
        c.add("dev", "x", 2000, &point(7));
        assert_ne!(a, c);
    }
}
