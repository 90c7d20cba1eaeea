//! Decoding register words into typed values.
//!
//! Invariant: decoding never panics; a response too short for a tag yields
//! `None`, which the collector reports as a Bad point.

use guantong_proto::v1::point::Value;

use super::config::{ModbusTagConfig, ModbusType, WordOrder};

/// The raw bytes of `words`, most significant first, after applying `order`.
fn ordered_bytes(words: &[u16], order: WordOrder) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 2);
    let push = |out: &mut Vec<u8>, w: u16, swap_bytes: bool| {
        let b = if swap_bytes {
            w.to_le_bytes()
        } else {
            w.to_be_bytes()
        };
        out.extend_from_slice(&b);
    };
    match order {
        WordOrder::Abcd => words.iter().for_each(|&w| push(&mut out, w, false)),
        WordOrder::Badc => words.iter().for_each(|&w| push(&mut out, w, true)),
        WordOrder::Cdab => words.iter().rev().for_each(|&w| push(&mut out, w, false)),
        WordOrder::Dcba => words.iter().rev().for_each(|&w| push(&mut out, w, true)),
    }
    out
}

/// Decodes one register-table value from exactly `data_type.words()` words.
pub fn decode_registers(words: &[u16], data_type: ModbusType, order: WordOrder) -> Option<Value> {
    if words.len() != usize::from(data_type.words()) {
        return None;
    }
    let b = ordered_bytes(words, order);
    let v = match data_type {
        ModbusType::Bool => return None,
        ModbusType::U16 => Value::Uint(u64::from(u16::from_be_bytes(b[..2].try_into().ok()?))),
        ModbusType::I16 => Value::Int(i64::from(i16::from_be_bytes(b[..2].try_into().ok()?))),
        ModbusType::U32 => Value::Uint(u64::from(u32::from_be_bytes(b[..4].try_into().ok()?))),
        ModbusType::I32 => Value::Int(i64::from(i32::from_be_bytes(b[..4].try_into().ok()?))),
        ModbusType::U64 => Value::Uint(u64::from_be_bytes(b[..8].try_into().ok()?)),
        ModbusType::I64 => Value::Int(i64::from_be_bytes(b[..8].try_into().ok()?)),
        ModbusType::F32 => Value::Double(f64::from(f32::from_be_bytes(b[..4].try_into().ok()?))),
        ModbusType::F64 => Value::Double(f64::from_be_bytes(b[..8].try_into().ok()?)),
    };
    Some(v)
}

/// Applies a tag's scale and offset; unscaled values keep their type.
pub fn engineering_value(tag: &ModbusTagConfig, raw: Value) -> Value {
    if tag.scale == 1.0 && tag.offset == 0.0 {
        return raw;
    }
    let x = match raw {
        Value::Int(i) => i as f64,
        Value::Uint(u) => u as f64,
        Value::Double(d) => d,
        other => return other,
    };
    Value::Double(x * tag.scale + tag.offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    // 0x41B4_0000 is 22.5f32; 0x4036_8000_0000_0000 is 22.5f64.
    const F32_ABCD: [u16; 2] = [0x41B4, 0x0000];

    #[test]
    fn decodes_every_order_of_a_32_bit_float() {
        let cases = [
            (WordOrder::Abcd, [0x41B4, 0x0000]),
            (WordOrder::Cdab, [0x0000, 0x41B4]),
            (WordOrder::Badc, [0xB441, 0x0000]),
            (WordOrder::Dcba, [0x0000, 0xB441]),
        ];
        for (order, words) in cases {
            assert_eq!(
                decode_registers(&words, ModbusType::F32, order),
                Some(Value::Double(22.5)),
                "{order:?}"
            );
        }
        assert_eq!(
            decode_registers(&F32_ABCD, ModbusType::U32, WordOrder::Abcd),
            Some(Value::Uint(0x41B4_0000))
        );
    }

    #[test]
    fn decodes_64_bit_orders() {
        let abcd = [0x4036, 0x8000, 0x0000, 0x0000];
        let cdab = [0x0000, 0x0000, 0x8000, 0x4036];
        let badc = [0x3640, 0x0080, 0x0000, 0x0000];
        let dcba = [0x0000, 0x0000, 0x0080, 0x3640];
        for (order, w) in [
            (WordOrder::Abcd, abcd),
            (WordOrder::Cdab, cdab),
            (WordOrder::Badc, badc),
            (WordOrder::Dcba, dcba),
        ] {
            assert_eq!(
                decode_registers(&w, ModbusType::F64, order),
                Some(Value::Double(22.5)),
                "{order:?}"
            );
        }
        assert_eq!(
            decode_registers(
                &[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE],
                ModbusType::I64,
                WordOrder::Abcd
            ),
            Some(Value::Int(-2))
        );
    }

    #[test]
    fn decodes_signed_16_bit() {
        assert_eq!(
            decode_registers(&[0xFF38], ModbusType::I16, WordOrder::Abcd),
            Some(Value::Int(-200))
        );
        assert_eq!(
            decode_registers(&[0xFF38], ModbusType::U16, WordOrder::Abcd),
            Some(Value::Uint(65336))
        );
    }

    #[test]
    fn short_input_is_none_not_a_panic() {
        assert_eq!(
            decode_registers(&[0x41B4], ModbusType::F32, WordOrder::Abcd),
            None
        );
        assert_eq!(
            decode_registers(&[], ModbusType::U16, WordOrder::Abcd),
            None
        );
    }
}
