//! Value conversions every collector shares.
//!
//! Decision: a 32-bit float from a device (Modbus `f32`, OPC UA Float,
//! Sparkplug Float) is stored as the f64 of its shortest round-trip decimal,
//! so `-0.1f32` is stored and shown as `-0.1`, not as its exact binary value
//! `-0.10000000149011612`. The f32 is recovered from the f64 exactly
//! (`as f32`), so nothing is lost; NaN and the infinities are kept as they are.

use guantong_proto::v1::DataType;
use serde::Deserialize;

/// The type a tag's value is stored as, where the protocol does not fix it
/// (MQTT payloads, OPC UA variables): `type = "double"` etc. in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    Bool,
    Int,
    Uint,
    #[default]
    Double,
    String,
}

impl ValueType {
    pub fn wire(self) -> DataType {
        match self {
            ValueType::Bool => DataType::Bool,
            ValueType::Int => DataType::Int,
            ValueType::Uint => DataType::Uint,
            ValueType::Double => DataType::Double,
            ValueType::String => DataType::String,
        }
    }
}

/// The f64 that prints like `v` does as an f32: the shortest decimal that
/// reads back as `v`. No allocation (ryu formats on the stack).
pub fn f32_to_f64(v: f32) -> f64 {
    if !v.is_finite() {
        return f64::from(v);
    }
    let mut buf = ryu::Buffer::new();
    buf.format_finite(v)
        .parse::<f64>()
        .unwrap_or_else(|_| f64::from(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_becomes_its_shortest_decimal() {
        assert_eq!(f32_to_f64(-0.1), -0.1);
        assert_eq!(f32_to_f64(123.456), 123.456);
        assert_eq!(f32_to_f64(22.5), 22.5);
        assert_eq!(f32_to_f64(f32::MAX), 3.4028235e38);
        assert_eq!(f32_to_f64(f32::MIN_POSITIVE), 1.1754944e-38);
        assert_eq!(f32_to_f64(1e-45), 1e-45);
        assert!(f32_to_f64(-0.0).is_sign_negative());
        assert!(f32_to_f64(f32::NAN).is_nan());
        assert_eq!(f32_to_f64(f32::INFINITY), f64::INFINITY);
        assert_eq!(f32_to_f64(f32::NEG_INFINITY), f64::NEG_INFINITY);
        // Nothing lost: the f32 comes back bit for bit.
        for bits in [
            0x3dcc_cccd_u32,
            0x42f6_e979,
            0x0000_0001,
            0x7f7f_ffff,
            0xbf80_0001,
        ] {
            let v = f32::from_bits(bits);
            assert_eq!((f32_to_f64(v) as f32).to_bits(), bits);
        }
    }
}
