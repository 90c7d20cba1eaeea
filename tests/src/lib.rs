//! End-to-end harness: a simulated Modbus device, the real binaries as
//! processes, and a client for ingest's API. Used by the scenarios in
//! `tests/`, the demo (`guantong-demo`) and the benchmark (`guantong-bench`).

pub mod mqtt;
pub mod procs;
pub mod proxy;
pub mod sim;

use serde_json::Value;

/// Checks that the Good values of the counter tag are exactly 1..=last, each
/// once, in time order. Returns the number of values.
pub fn check_counter_exactly_once(points: &[Value], last: u64) -> Result<u64, String> {
    let values: Vec<u64> = points
        .iter()
        .filter(|p| p["quality"] == "good")
        .map(|p| {
            p["value"]
                .as_u64()
                .ok_or_else(|| format!("counter value is not an unsigned integer: {p}"))
        })
        .collect::<Result<_, _>>()?;
    let mut seen = std::collections::BTreeMap::new();
    for v in &values {
        *seen.entry(*v).or_insert(0u32) += 1;
    }
    let duplicated: Vec<_> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(v, n)| format!("{v}×{n}"))
        .collect();
    let missing: Vec<u64> = (1..=last).filter(|v| !seen.contains_key(v)).collect();
    let extra: Vec<u64> = seen
        .keys()
        .copied()
        .filter(|v| *v == 0 || *v > last)
        .collect();
    if !duplicated.is_empty() || !missing.is_empty() || !extra.is_empty() {
        return Err(format!(
            "counter 1..={last}: {} stored; duplicated {:?}; missing {} {:?}; unexpected {:?}",
            values.len(),
            &duplicated[..duplicated.len().min(20)],
            missing.len(),
            &missing[..missing.len().min(20)],
            extra
        ));
    }
    let times: Vec<i64> = points
        .iter()
        .filter_map(|p| p["time_ms"].as_i64())
        .collect();
    let mut unique = times.clone();
    unique.dedup();
    if unique.len() != times.len() {
        return Err(
            "two points of the counter tag share a timestamp: a point was stored twice".into(),
        );
    }
    Ok(values.len() as u64)
}
