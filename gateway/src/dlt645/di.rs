//! Data identifiers (DI) of DL/T 645-2007 appendix A that the gateway knows,
//! and decoding their values.
//!
//! Known: energies (DI3 = 00: combined, forward and reverse active, reactive
//! and apparent, per tariff and settlement day, and per phase), the
//! instantaneous variables (DI3 = 02: voltages, currents, powers, power
//! factors, phase angles, frequency, demand, temperature, battery), and
//! meter time, address and number (04000101, 04000102, 04000401, 04000402).
//! Any other DI is read with the `length` and `scale` its tag gives.
//!
//! Values travel as BCD, least significant byte first; where the standard
//! marks a value signed, bit 7 of its most significant byte is the sign.
//! A nibble above 9 is not BCD: the point is Bad (`MALFORMED`), not guessed.

use guantong_proto::v1::point::Value;
use serde::Deserialize;

use crate::quality;

/// How a value's bytes read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// A BCD number, scaled.
    Number,
    /// `YYMMDDWW` (date and weekday) as `20YY-MM-DD`.
    Date,
    /// `hhmmss` as `hh:mm:ss`.
    Time,
    /// BCD digits as text, most significant first (addresses, numbers).
    Digits,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Number => "number",
            Format::Date => "date",
            Format::Time => "time",
            Format::Digits => "digits",
        }
    }
}

/// What the standard says of a DI.
#[derive(Debug, Clone, PartialEq)]
pub struct Known {
    pub what: String,
    /// Data bytes after the echoed DI.
    pub length: u8,
    pub format: Format,
    /// Digits after the decimal point (numbers).
    pub decimals: u8,
    pub signed: bool,
    pub unit: &'static str,
}

fn number(what: String, length: u8, decimals: u8, signed: bool, unit: &'static str) -> Known {
    Known {
        what,
        length,
        format: Format::Number,
        decimals,
        signed,
        unit,
    }
}

const PHASES: [&str; 3] = ["A", "B", "C"];

/// The standard's description of `di`, if the gateway knows it.
pub fn known(di: u32) -> Option<Known> {
    let [di3, di2, di1, di0] = di.to_be_bytes();
    match di3 {
        0x00 => energy(di2, di1, di0),
        0x02 => variable(di2, di1, di0),
        0x04 => match di {
            0x0400_0101 => Some(Known {
                what: "meter date".into(),
                length: 4,
                format: Format::Date,
                decimals: 0,
                signed: false,
                unit: "",
            }),
            0x0400_0102 => Some(Known {
                what: "meter time".into(),
                length: 3,
                format: Format::Time,
                decimals: 0,
                signed: false,
                unit: "",
            }),
            0x0400_0401 | 0x0400_0402 => Some(Known {
                what: if di == 0x0400_0401 {
                    "communication address"
                } else {
                    "meter number"
                }
                .into(),
                length: 6,
                format: Format::Digits,
                decimals: 0,
                signed: false,
                unit: "",
            }),
            _ => None,
        },
        _ => None,
    }
}

/// DI3 = 00: XXXXXX.XX, 4 bytes. DI2 the kind (per phase from 0x15, 0x29,
/// 0x3D), DI1 the tariff (0 total, 1-63; phases have no tariffs), DI0 the
/// settlement (0 current, 1-12 previous).
fn energy(di2: u8, di1: u8, di0: u8) -> Option<Known> {
    let kind = |k: u8| -> Option<(&'static str, bool, &'static str)> {
        Some(match k {
            0x00 => ("combined active energy", true, "kWh"),
            0x01 => ("forward active energy", false, "kWh"),
            0x02 => ("reverse active energy", false, "kWh"),
            0x03 => ("combined reactive energy 1", true, "kvarh"),
            0x04 => ("combined reactive energy 2", true, "kvarh"),
            0x05..=0x08 => ("quadrant reactive energy", false, "kvarh"),
            0x09 => ("forward apparent energy", false, "kVAh"),
            0x0A => ("reverse apparent energy", false, "kVAh"),
            _ => return None,
        })
    };
    if di0 > 0x0C {
        return None;
    }
    let (what, signed, unit, phase) = match di2 {
        0x00..=0x0A if di1 <= 0x3F => {
            let (w, s, u) = kind(di2)?;
            (w, s, u, None)
        }
        0x15..=0x1E | 0x29..=0x32 | 0x3D..=0x46 if di1 == 0 => {
            let p = usize::from((di2 - 0x15) / 0x14);
            // Per phase, kinds run from forward active (0x15 = kind 1).
            let (w, s, u) = kind((di2 - 0x15) % 0x14 + 1)?;
            (w, s, u, Some(PHASES[p]))
        }
        _ => return None,
    };
    let mut text = match phase {
        Some(p) => format!("phase {p} {what}"),
        None => what.to_string(),
    };
    if (0x05..=0x08).contains(&di2) {
        text = format!("quadrant {} reactive energy", di2 - 4);
    }
    if di1 > 0 {
        text.push_str(&format!(", tariff {di1}"));
    }
    if di0 > 0 {
        text.push_str(&format!(", settlement {di0} ago"));
    }
    Some(number(text, 4, 2, signed, unit))
}

/// DI3 = 02: the instantaneous variables.
fn variable(di2: u8, di1: u8, di0: u8) -> Option<Known> {
    let phase = |n: u8| PHASES.get(usize::from(n).wrapping_sub(1)).copied();
    let total_or_phase = |n: u8, what: &str| match n {
        0 => Some(format!("total {what}")),
        n => phase(n).map(|p| format!("phase {p} {what}")),
    };
    match (di2, di1, di0) {
        (0x01, p, 0) => Some(number(
            format!("phase {} voltage", phase(p)?),
            2,
            1,
            false,
            "V",
        )),
        (0x02, p, 0) => Some(number(
            format!("phase {} current", phase(p)?),
            3,
            3,
            true,
            "A",
        )),
        (0x03, p, 0) if p <= 3 => {
            Some(number(total_or_phase(p, "active power")?, 3, 4, true, "kW"))
        }
        (0x04, p, 0) if p <= 3 => Some(number(
            total_or_phase(p, "reactive power")?,
            3,
            4,
            true,
            "kvar",
        )),
        (0x05, p, 0) if p <= 3 => Some(number(
            total_or_phase(p, "apparent power")?,
            3,
            4,
            true,
            "kVA",
        )),
        (0x06, p, 0) if p <= 3 => Some(number(total_or_phase(p, "power factor")?, 2, 3, true, "")),
        (0x07, p, 0) => Some(number(
            format!("phase {} angle", phase(p)?),
            2,
            1,
            false,
            "°",
        )),
        (0x80, 0x00, n) => Some(match n {
            0x01 => number("neutral current".into(), 3, 3, true, "A"),
            0x02 => number("grid frequency".into(), 2, 2, false, "Hz"),
            0x03 => number("one-minute average active power".into(), 3, 4, true, "kW"),
            0x04 => number("active demand".into(), 3, 4, true, "kW"),
            0x05 => number("reactive demand".into(), 3, 4, true, "kvar"),
            0x06 => number("apparent demand".into(), 3, 4, true, "kVA"),
            0x07 => number("meter temperature".into(), 2, 1, true, "°C"),
            0x08 => number("clock battery voltage".into(), 2, 2, false, "V"),
            0x09 => number("meter-reading battery voltage".into(), 2, 2, false, "V"),
            0x0A => number("battery working time".into(), 4, 0, false, "min"),
            _ => return None,
        }),
        _ => None,
    }
}

/// How a tag's value is read from the answer's data (after the DI).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub length: u8,
    pub format: Format,
    pub signed: bool,
    /// Multiplies the BCD integer (numbers).
    pub scale: f64,
}

impl Reading {
    /// The value of `data` (the answer after its DI): Err is a quality code.
    pub fn decode(&self, data: &[u8]) -> Result<Value, u32> {
        let bytes = data
            .get(..usize::from(self.length))
            .filter(|_| data.len() == usize::from(self.length))
            .ok_or(quality::MALFORMED)?;
        match self.format {
            Format::Number => {
                let mut big: Vec<u8> = bytes.iter().rev().copied().collect();
                let negative = self.signed && big.first().is_some_and(|b| b & 0x80 != 0);
                if self.signed
                    && let Some(top) = big.first_mut()
                {
                    *top &= 0x7F;
                }
                let raw = bcd(&big)?;
                let v = scaled(raw, self.scale);
                Ok(Value::Double(if negative { -v } else { v }))
            }
            Format::Date => {
                let [_week, day, month, year] = bytes else {
                    return Err(quality::MALFORMED);
                };
                let (y, m, d) = (bcd(&[*year])?, bcd(&[*month])?, bcd(&[*day])?);
                if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
                    return Err(quality::MALFORMED);
                }
                Ok(Value::String(format!("20{y:02}-{m:02}-{d:02}")))
            }
            Format::Time => {
                let [s, m, h] = bytes else {
                    return Err(quality::MALFORMED);
                };
                let (h, m, s) = (bcd(&[*h])?, bcd(&[*m])?, bcd(&[*s])?);
                if h > 23 || m > 59 || s > 59 {
                    return Err(quality::MALFORMED);
                }
                Ok(Value::String(format!("{h:02}:{m:02}:{s:02}")))
            }
            Format::Digits => {
                let big: Vec<u8> = bytes.iter().rev().copied().collect();
                bcd(&big)?;
                Ok(Value::String(
                    big.iter().map(|b| format!("{b:02X}")).collect(),
                ))
            }
        }
    }
}

/// The integer of BCD bytes, most significant first (at most 19 digits
/// fit; longer numbers are refused by the config).
fn bcd(big: &[u8]) -> Result<u64, u32> {
    let mut n: u64 = 0;
    for &b in big {
        let (hi, lo) = (b >> 4, b & 0x0F);
        if hi > 9 || lo > 9 {
            return Err(quality::MALFORMED);
        }
        n = n
            .checked_mul(100)
            .and_then(|n| n.checked_add(u64::from(hi * 10 + lo)))
            .ok_or(quality::MALFORMED)?;
    }
    Ok(n)
}

/// `raw × scale`, dividing by the power of ten when the scale is one (0.01
/// gives 123456.78 exactly as f64 prints it, not 123456.78000000001).
pub fn scaled(raw: u64, scale: f64) -> f64 {
    let raw = raw as f64;
    for d in 0..10 {
        let p = 10f64.powi(d);
        if (scale * p - 1.0).abs() < 1e-12 {
            return raw / p;
        }
    }
    raw * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(di: u32) -> Reading {
        let k = known(di).unwrap_or_else(|| panic!("{di:08X} unknown"));
        Reading {
            length: k.length,
            format: k.format,
            signed: k.signed,
            scale: 10f64.powi(-i32::from(k.decimals)),
        }
    }

    #[test]
    fn the_standards_formats_decode_with_scale_and_sign() {
        let d = |di: u32, bytes: &[u8]| reading(di).decode(bytes);
        assert_eq!(d(0x0201_0100, &[0x01, 0x22]), Ok(Value::Double(220.1)));
        assert_eq!(
            d(0x0202_0200, &[0x34, 0x62, 0x80]),
            Ok(Value::Double(-6.234))
        );
        assert_eq!(
            d(0x0000_0000, &[0x67, 0x45, 0x23, 0x01]),
            Ok(Value::Double(12345.67))
        );
        assert_eq!(
            d(0x0000_0000, &[0x78, 0x56, 0x34, 0x12]),
            Ok(Value::Double(123456.78))
        );
        assert_eq!(
            d(0x0203_0000, &[0x67, 0x45, 0x03]),
            Ok(Value::Double(3.4567))
        );
        assert_eq!(d(0x0206_0000, &[0x87, 0x09]), Ok(Value::Double(0.987)));
        assert_eq!(d(0x0280_0002, &[0x01, 0x50]), Ok(Value::Double(50.01)));
        assert_eq!(
            d(0x0400_0101, &[0x05, 0x17, 0x05, 0x24]),
            Ok(Value::String("2024-05-17".into()))
        );
        assert_eq!(
            d(0x0400_0102, &[0x56, 0x34, 0x12]),
            Ok(Value::String("12:34:56".into()))
        );
        assert_eq!(
            d(0x0400_0401, &[0x12, 0x90, 0x78, 0x56, 0x34, 0x12]),
            Ok(Value::String("123456789012".into()))
        );
        // Not BCD, too short, too long: Bad, never a guess.
        assert_eq!(d(0x0201_0100, &[0x0A, 0x22]), Err(quality::MALFORMED));
        assert_eq!(d(0x0201_0100, &[0x01]), Err(quality::MALFORMED));
        assert_eq!(d(0x0201_0100, &[0x01, 0x22, 0x00]), Err(quality::MALFORMED));
        assert_eq!(d(0x0400_0102, &[0x56, 0x60, 0x12]), Err(quality::MALFORMED));
        // Unsigned values keep bit 7 as a digit (voltage 822.0 V is 0x82 0x20).
        assert_eq!(d(0x0201_0100, &[0x20, 0x82]), Ok(Value::Double(822.0)));
    }

    #[test]
    fn known_identifiers_cover_the_common_readings_and_nothing_else() {
        for (di, what, unit) in [
            (0x0000_0000, "combined active energy", "kWh"),
            (0x0001_0000, "forward active energy", "kWh"),
            (0x0001_0100, "forward active energy, tariff 1", "kWh"),
            (
                0x0002_0001,
                "reverse active energy, settlement 1 ago",
                "kWh",
            ),
            (0x0015_0000, "phase A forward active energy", "kWh"),
            (0x0029_0000, "phase B forward active energy", "kWh"),
            (0x003D_0000, "phase C forward active energy", "kWh"),
            (0x003E_0000, "phase C reverse active energy", "kWh"),
            (0x0201_0300, "phase C voltage", "V"),
            (0x0202_0100, "phase A current", "A"),
            (0x0203_0000, "total active power", "kW"),
            (0x0204_0200, "phase B reactive power", "kvar"),
            (0x0206_0300, "phase C power factor", ""),
            (0x0280_0002, "grid frequency", "Hz"),
            (0x0400_0102, "meter time", ""),
        ] {
            let k = known(di).unwrap_or_else(|| panic!("{di:08X}"));
            assert_eq!((k.what.as_str(), k.unit), (what, unit), "{di:08X}");
        }
        for di in [
            0x0201_0400,
            0x0201_FF00,
            0x0203_0400,
            0x0015_0100,
            0x000B_0000,
            0x0280_000B,
            0x0300_0000,
            0xFFFF_FFFF,
        ] {
            assert_eq!(known(di), None, "{di:08X}");
        }
    }

    #[test]
    fn any_bytes_decode_or_give_a_code() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(645);
        for _ in 0..2000 {
            let len = rng.random_range(0..10usize);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            for format in [Format::Number, Format::Date, Format::Time, Format::Digits] {
                let r = Reading {
                    length: rng.random_range(1..=8),
                    format,
                    signed: rng.random(),
                    scale: 0.001,
                };
                if let Err(code) = r.decode(&bytes) {
                    assert_eq!(code, quality::MALFORMED);
                }
            }
        }
    }
}
