//! Pieces the installers' probes share (`probe modbus`, `probe s7`): the
//! value an installer expects to find, and how values are printed.

use guantong_proto::v1::point::Value;

/// The value to look for, with the tolerance its written precision implies
/// (`229.5` matches 229.45..229.55).
#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    pub value: f64,
    pub tolerance: f64,
}

impl Expect {
    pub fn parse(text: &str) -> Result<Expect, String> {
        let value: f64 = text
            .trim()
            .parse()
            .map_err(|_| format!("--expect `{text}` is not a number"))?;
        let decimals = text
            .trim()
            .split_once('.')
            .map_or(0, |(_, d)| d.len().min(9));
        Ok(Expect {
            value,
            tolerance: 0.5 * 10f64.powi(-(decimals as i32)),
        })
    }

    pub fn matches(&self, x: f64) -> bool {
        x.is_finite() && (x - self.value).abs() <= self.tolerance + self.value.abs() * 1e-12
    }
}

pub fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Uint(u) => Some(*u as f64),
        Value::Double(d) => Some(*d),
        _ => None,
    }
}

pub fn show(v: &Value) -> String {
    match v {
        Value::Int(i) => i.to_string(),
        Value::Uint(u) => u.to_string(),
        Value::Double(d) if *d != 0.0 && (d.abs() < 1e-4 || d.abs() >= 1e12) => format!("{d:e}"),
        Value::Double(d) => format!("{d}"),
        Value::String(s) => format!("{s:?}"),
        Value::Bool(b) => b.to_string(),
    }
}
