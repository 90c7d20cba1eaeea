//! Decoding register words into typed values.
//!
//! Invariant: decoding never panics; a response too short for a tag yields
//! `None`, which the collector reports as a Bad point.

use guantong_proto::v1::point::Value;

use super::config::{ModbusTagConfig, ModbusType, Table, WordOrder};
use crate::quality;

/// The raw bytes of up to four `words`, most significant first, after
/// applying `order` (no allocation: this runs for every point).
fn ordered_bytes(words: &[u16], order: WordOrder) -> [u8; 8] {
    let mut out = [0u8; 8];
    let n = words.len().min(4);
    let swap_bytes = matches!(order, WordOrder::Badc | WordOrder::Dcba);
    let reverse = matches!(order, WordOrder::Cdab | WordOrder::Dcba);
    for i in 0..n {
        let w = if reverse { words[n - 1 - i] } else { words[i] };
        let b = if swap_bytes {
            w.to_le_bytes()
        } else {
            w.to_be_bytes()
        };
        out[2 * i..2 * i + 2].copy_from_slice(&b);
    }
    out
}

/// Decodes one register-table value from exactly `data_type.words()` words.
/// `Bool` and `String` need more than the type (`decode_tag` handles them).
pub fn decode_registers(words: &[u16], data_type: ModbusType, order: WordOrder) -> Option<Value> {
    if words.len() != usize::from(data_type.words()) {
        return None;
    }
    // One register, the common case: no byte shuffling beyond a swap.
    if let [w] = words {
        let w = if matches!(order, WordOrder::Badc | WordOrder::Dcba) {
            w.swap_bytes()
        } else {
            *w
        };
        return match data_type {
            ModbusType::U16 => Some(Value::Uint(u64::from(w))),
            ModbusType::I16 => Some(Value::Int(i64::from(w as i16))),
            _ => None,
        };
    }
    let b = ordered_bytes(words, order);
    let v = match data_type {
        ModbusType::Bool | ModbusType::String => return None,
        ModbusType::U16 => Value::Uint(u64::from(u16::from_be_bytes(b[..2].try_into().ok()?))),
        ModbusType::I16 => Value::Int(i64::from(i16::from_be_bytes(b[..2].try_into().ok()?))),
        ModbusType::U32 => Value::Uint(u64::from(u32::from_be_bytes(b[..4].try_into().ok()?))),
        ModbusType::I32 => Value::Int(i64::from(i32::from_be_bytes(b[..4].try_into().ok()?))),
        ModbusType::U64 => Value::Uint(u64::from_be_bytes(b[..8].try_into().ok()?)),
        ModbusType::I64 => Value::Int(i64::from_be_bytes(b[..8].try_into().ok()?)),
        ModbusType::F32 => Value::Double(crate::value::f32_to_f64(f32::from_be_bytes(
            b[..4].try_into().ok()?,
        ))),
        ModbusType::F64 => Value::Double(f64::from_be_bytes(b[..8].try_into().ok()?)),
    };
    Some(v)
}

/// An ASCII string packed two characters per register, first character in
/// the high byte (`BADC`/`DCBA`: in the low byte). Trailing NULs and spaces
/// are dropped; bytes outside printable ASCII become U+FFFD.
pub fn decode_string(words: &[u16], order: WordOrder) -> String {
    let swap = matches!(order, WordOrder::Badc | WordOrder::Dcba);
    let bytes: Vec<u8> = words
        .iter()
        .flat_map(|w| {
            if swap {
                w.to_le_bytes()
            } else {
                w.to_be_bytes()
            }
        })
        .collect();
    let end = bytes
        .iter()
        .rposition(|&b| b != 0 && b != b' ')
        .map_or(0, |i| i + 1);
    bytes[..end]
        .iter()
        .map(|&b| {
            if b == b' ' || b.is_ascii_graphic() {
                char::from(b)
            } else {
                char::REPLACEMENT_CHARACTER
            }
        })
        .collect()
}

/// Decodes a register tag from exactly `tag.words()` words: its type, bit,
/// scale and offset, then its valid range. `Err` is the quality code.
pub fn decode_tag(tag: &ModbusTagConfig, words: &[u16]) -> Result<Value, u32> {
    TagReader::new(tag).decode(words)
}

/// What the poll path keeps of a tag: how to decode it, in 24 bytes (the
/// full `ModbusTagConfig` is ~130 bytes plus its strings, and a gateway may
/// hold 100,000 of them). Name, unit and interval live in the manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct TagReader {
    pub address: u16,
    /// Registers (or bits) the tag occupies.
    pub words: u16,
    pub table: Table,
    pub data_type: ModbusType,
    pub order: WordOrder,
    pub bit: Option<u8>,
    /// Scale, offset and valid range, for the tags that have any.
    pub engineering: Option<Box<Engineering>>,
}

/// `value × scale + offset`, then Bad outside `min..=max`.
#[derive(Debug, Clone, PartialEq)]
pub struct Engineering {
    pub scale: f64,
    pub offset: f64,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl TagReader {
    pub fn new(tag: &ModbusTagConfig) -> TagReader {
        let plain = tag.scale == 1.0 && tag.offset == 0.0 && tag.min.is_none() && tag.max.is_none();
        TagReader {
            address: tag.address,
            words: tag.words(),
            table: tag.table,
            data_type: tag.data_type,
            order: tag.order,
            bit: tag.bit,
            engineering: (!plain).then(|| {
                Box::new(Engineering {
                    scale: tag.scale,
                    offset: tag.offset,
                    min: tag.min,
                    max: tag.max,
                })
            }),
        }
    }

    /// A plain `u16`: one register, no byte swap, bit, scale or range; its
    /// value is the register itself.
    pub fn is_plain_u16(&self) -> bool {
        self.data_type == ModbusType::U16
            && matches!(self.order, WordOrder::Abcd | WordOrder::Cdab)
            && self.bit.is_none()
            && self.engineering.is_none()
    }

    /// `holding:0`, `holding:3.15` (a bit), `holding:100+10` (a string).
    pub fn address_text(&self) -> String {
        let base = format!("{}:{}", self.table.name(), self.address);
        match (self.bit, self.data_type) {
            (Some(b), _) => format!("{base}.{b}"),
            (None, ModbusType::String) => format!("{base}+{}", self.words),
            _ => base,
        }
    }

    /// Decodes the tag from exactly `self.words` register words. `Err` is
    /// the quality code.
    #[inline]
    pub fn decode(&self, words: &[u16]) -> Result<Value, u32> {
        // The common case, inline in the poll loop: a plain 16-bit register.
        if let ([w], None, None) = (words, self.bit, &self.engineering) {
            let w = if matches!(self.order, WordOrder::Badc | WordOrder::Dcba) {
                w.swap_bytes()
            } else {
                *w
            };
            match self.data_type {
                ModbusType::U16 => return Ok(Value::Uint(u64::from(w))),
                ModbusType::I16 => return Ok(Value::Int(i64::from(w as i16))),
                _ => {}
            }
        }
        self.decode_any(words)
    }

    fn decode_any(&self, words: &[u16]) -> Result<Value, u32> {
        if words.len() != usize::from(self.words) {
            return Err(quality::MALFORMED);
        }
        let raw = match (self.data_type, self.bit) {
            (ModbusType::Bool, Some(bit)) => {
                return Ok(Value::Bool(
                    words[0].checked_shr(u32::from(bit)).unwrap_or(0) & 1 == 1,
                ));
            }
            (ModbusType::String, _) => return Ok(Value::String(decode_string(words, self.order))),
            (t, _) => decode_registers(words, t, self.order).ok_or(quality::MALFORMED)?,
        };
        match &self.engineering {
            None => Ok(raw),
            Some(e) => e.apply(raw),
        }
    }
}

impl Engineering {
    /// Scales `raw` (unscaled values keep their type) and checks the range.
    pub fn apply(&self, raw: Value) -> Result<Value, u32> {
        let x = match raw {
            Value::Int(i) => i as f64,
            Value::Uint(u) => u as f64,
            Value::Double(d) => d,
            other => return Ok(other),
        };
        let scaled = self.scale != 1.0 || self.offset != 0.0;
        let x = if scaled {
            x * self.scale + self.offset
        } else {
            x
        };
        // NaN is outside every range.
        let inside = self.min.is_none_or(|lo| x >= lo) && self.max.is_none_or(|hi| x <= hi);
        match (inside, scaled) {
            (false, _) => Err(quality::OUT_OF_RANGE),
            (true, true) => Ok(Value::Double(x)),
            (true, false) => Ok(raw),
        }
    }
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

    /// Every numeric type in every order, from one set of golden words: the
    /// bytes 01 02 03 04 05 06 07 08 as each order puts them on the wire.
    #[test]
    fn golden_every_type_in_every_order() {
        // Wire words for the logical big-endian bytes 0x01..=0x08 (64-bit) and
        // 0x01..=0x04 (32-bit) and 0x01 0x02 (16-bit), per order.
        let w64 = |o| match o {
            WordOrder::Abcd => [0x0102, 0x0304, 0x0506, 0x0708],
            WordOrder::Badc => [0x0201, 0x0403, 0x0605, 0x0807],
            WordOrder::Cdab => [0x0708, 0x0506, 0x0304, 0x0102],
            WordOrder::Dcba => [0x0807, 0x0605, 0x0403, 0x0201],
        };
        let w32 = |o| match o {
            WordOrder::Abcd => [0x0102, 0x0304],
            WordOrder::Badc => [0x0201, 0x0403],
            WordOrder::Cdab => [0x0304, 0x0102],
            WordOrder::Dcba => [0x0403, 0x0201],
        };
        let w16 = |o| match o {
            WordOrder::Abcd | WordOrder::Cdab => [0x8102],
            WordOrder::Badc | WordOrder::Dcba => [0x0281],
        };
        for order in WordOrder::ALL {
            let d = |w: &[u16], t| decode_registers(w, t, order);
            assert_eq!(
                d(&w16(order), ModbusType::U16),
                Some(Value::Uint(0x8102)),
                "{order:?}"
            );
            assert_eq!(
                d(&w16(order), ModbusType::I16),
                Some(Value::Int(0x8102u16 as i16 as i64)),
                "{order:?}"
            );
            assert_eq!(
                d(&w32(order), ModbusType::U32),
                Some(Value::Uint(0x0102_0304)),
                "{order:?}"
            );
            assert_eq!(
                d(&w32(order), ModbusType::I32),
                Some(Value::Int(0x0102_0304)),
                "{order:?}"
            );
            assert_eq!(
                d(&w32(order), ModbusType::F32),
                Some(Value::Double(crate::value::f32_to_f64(f32::from_bits(
                    0x0102_0304
                )))),
                "{order:?}"
            );
            assert_eq!(
                d(&w64(order), ModbusType::U64),
                Some(Value::Uint(0x0102_0304_0506_0708)),
                "{order:?}"
            );
            assert_eq!(
                d(&w64(order), ModbusType::I64),
                Some(Value::Int(0x0102_0304_0506_0708)),
                "{order:?}"
            );
            assert_eq!(
                d(&w64(order), ModbusType::F64),
                Some(Value::Double(f64::from_bits(0x0102_0304_0506_0708))),
                "{order:?}"
            );
        }
        // Negative values: sign comes from the most significant byte in every order.
        assert_eq!(
            decode_registers(&[0xFFFF, 0xFFFE], ModbusType::I32, WordOrder::Cdab),
            Some(Value::Int(-65537))
        );
        assert_eq!(
            decode_registers(&[0xFEFF, 0xFFFF], ModbusType::I32, WordOrder::Dcba),
            Some(Value::Int(-2))
        );
    }

    #[test]
    fn bits_strings_scale_and_range() {
        let mut t = ModbusTagConfig::new(
            "b",
            super::super::config::Table::Holding,
            0,
            ModbusType::Bool,
        );
        t.bit = Some(15);
        assert_eq!(decode_tag(&t, &[0x8000]), Ok(Value::Bool(true)));
        t.bit = Some(0);
        assert_eq!(decode_tag(&t, &[0x8000]), Ok(Value::Bool(false)));
        assert_eq!(decode_tag(&t, &[0x0001]), Ok(Value::Bool(true)));

        let mut s = ModbusTagConfig::new(
            "s",
            super::super::config::Table::Holding,
            0,
            ModbusType::String,
        );
        s.length = 3;
        assert_eq!(
            decode_tag(&s, &[0x5344, 0x4D36, 0x3330]),
            Ok(Value::String("SDM630".into()))
        );
        assert_eq!(
            decode_tag(&s, &[0x4142, 0x4300, 0x0000]),
            Ok(Value::String("ABC".into()))
        );
        s.order = WordOrder::Badc;
        assert_eq!(
            decode_tag(&s, &[0x4241, 0x0043, 0x2020]),
            Ok(Value::String("ABC".into()))
        );
        assert_eq!(decode_tag(&s, &[0x4241]), Err(quality::MALFORMED));
        assert_eq!(
            decode_tag(&s, &[0x01FF, 0, 0]),
            Ok(Value::String("\u{FFFD}\u{FFFD}".into()))
        );

        let mut v =
            ModbusTagConfig::new("v", super::super::config::Table::Input, 0, ModbusType::U16);
        v.scale = 0.1;
        v.min = Some(0.0);
        v.max = Some(300.0);
        assert_eq!(decode_tag(&v, &[2295]), Ok(Value::Double(229.5)));
        assert_eq!(decode_tag(&v, &[3001]), Err(quality::OUT_OF_RANGE));
        let mut f =
            ModbusTagConfig::new("f", super::super::config::Table::Input, 0, ModbusType::F32);
        f.max = Some(1.0);
        assert_eq!(
            decode_tag(&f, &[0x7FC0, 0]),
            Err(quality::OUT_OF_RANGE),
            "NaN is out of range"
        );
    }
}
