//! Checks on what gateways send, before anything reaches storage.
//!
//! Pure functions of the decoded message, the manifest it refers to, the
//! limits and the current time; shared by the gRPC service and the fuzz
//! target (ingest/fuzz). A batch that fails is not stored: the service
//! records it as a loss with the reason and answers `BatchRejected`, which
//! the gateway logs. A manifest that fails ends the stream with
//! INVALID_ARGUMENT naming the field.
//!
//! Rules:
//! - every point names a tag the manifest has;
//! - every point's time (`base_time_ms + time_offset_ms`, without overflow)
//!   lies within `max_past` before and `max_future` after now;
//! - string values are at most `max_string_bytes`;
//! - manifest names (device ids, tag names) are 1..=256 bytes without
//!   control characters or `/`; other manifest strings at most 1 KiB.

use std::time::Duration;

use guantong_proto::v1::point::Value;
use guantong_proto::v1::{Batch, Manifest};

/// Validation options of `guantong-ingest serve`.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ValidationLimits {
    /// Points older than this (by their source timestamp) are refused.
    #[arg(long, env = "GUANTONG_MAX_POINT_AGE", default_value = "3650d", value_parser = humantime::parse_duration)]
    pub max_point_age: Duration,
    /// Points further in the future than this (gateway clock ahead) are
    /// refused.
    #[arg(long, env = "GUANTONG_MAX_CLOCK_AHEAD", default_value = "1d", value_parser = humantime::parse_duration)]
    pub max_clock_ahead: Duration,
    /// Longest string value, bytes.
    #[arg(long, env = "GUANTONG_MAX_STRING_BYTES", default_value_t = 64 * 1024)]
    pub max_string_bytes: usize,
}

impl Default for ValidationLimits {
    fn default() -> Self {
        ValidationLimits {
            max_point_age: Duration::from_secs(3650 * 24 * 3600),
            max_clock_ahead: Duration::from_secs(24 * 3600),
            max_string_bytes: 64 * 1024,
        }
    }
}

const MAX_NAME_BYTES: usize = 256;
const MAX_TEXT_BYTES: usize = 1024;
const MAX_MANIFEST_TAGS: usize = 1_000_000;

/// Why the points of `batch` may not be stored, or Ok. `tags` is the number
/// of tags in the batch's manifest.
pub fn check_points(
    batch: &Batch,
    tags: usize,
    limits: &ValidationLimits,
    now_ms: i64,
) -> Result<(), String> {
    let oldest = now_ms.saturating_sub(limits.max_point_age.as_millis() as i64);
    let newest = now_ms.saturating_add(limits.max_clock_ahead.as_millis() as i64);
    for (i, p) in batch.points.iter().enumerate() {
        if p.tag as usize >= tags {
            return Err(format!(
                "point {i} refers to tag {} but the manifest has {tags} tags",
                p.tag
            ));
        }
        let t = batch
            .base_time_ms
            .checked_add(p.time_offset_ms)
            .ok_or_else(|| format!("point {i}: timestamp overflows"))?;
        if t < oldest || t > newest {
            return Err(format!(
                "point {i} (tag {}): timestamp {} is outside the accepted range {} to {}",
                p.tag,
                format_ms(t),
                format_ms(oldest),
                format_ms(newest),
            ));
        }
        if let Some(Value::String(s)) = &p.value
            && s.len() > limits.max_string_bytes
        {
            return Err(format!(
                "point {i} (tag {}): string of {} bytes exceeds the limit of {}",
                p.tag,
                s.len(),
                limits.max_string_bytes
            ));
        }
    }
    Ok(())
}

/// Why `manifest` may not be stored, or Ok.
pub fn check_manifest(manifest: &Manifest) -> Result<(), String> {
    if manifest.tags.len() > MAX_MANIFEST_TAGS {
        return Err(format!(
            "{} tags exceed the limit of {MAX_MANIFEST_TAGS}",
            manifest.tags.len()
        ));
    }
    for (i, d) in manifest.devices.iter().enumerate() {
        name(&format!("devices[{i}].id"), &d.id)?;
        text(&format!("devices[{i}].protocol"), &d.protocol)?;
        text(&format!("devices[{i}].endpoint"), &d.endpoint)?;
        for (k, v) in &d.identity {
            text(&format!("devices[{i}].identity key"), k)?;
            text(&format!("devices[{i}].identity.{k}"), v)?;
        }
    }
    for (i, t) in manifest.tags.iter().enumerate() {
        name(&format!("tags[{i}].name"), &t.name)?;
        text(&format!("tags[{i}].address"), &t.address)?;
        text(&format!("tags[{i}].unit"), &t.unit)?;
        if t.device as usize >= manifest.devices.len() {
            return Err(format!(
                "tags[{i}] (`{}`) names device {} of {}",
                t.name,
                t.device,
                manifest.devices.len()
            ));
        }
    }
    Ok(())
}

fn name(at: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{at}: expected 1 to {MAX_NAME_BYTES} bytes, got {}",
            s.len()
        ));
    }
    if s.chars().any(|c| c.is_control() || c == '/') {
        return Err(format!(
            "{at}: `{}` holds `/` or a control character",
            s.escape_debug()
        ));
    }
    Ok(())
}

fn text(at: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_TEXT_BYTES {
        return Err(format!(
            "{at}: {} bytes exceed the limit of {MAX_TEXT_BYTES}",
            s.len()
        ));
    }
    Ok(())
}

fn format_ms(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) if ms < 253_402_300_800_000 => {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string()
        }
        _ => format!("{ms} ms since 1970"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guantong_proto::v1::Point;

    const NOW: i64 = 1_800_000_000_000;

    fn batch(offset: i64, value: Option<Value>, tag: u32) -> Batch {
        Batch {
            base_time_ms: NOW,
            points: vec![Point {
                tag,
                time_offset_ms: offset,
                value,
                ..Point::default()
            }],
            ..Batch::default()
        }
    }

    #[test]
    fn refuses_unknown_tags_absurd_times_and_oversized_strings() {
        let l = ValidationLimits::default();
        let ok = batch(-1000, Some(Value::Double(1.0)), 1);
        assert_eq!(check_points(&ok, 2, &l, NOW), Ok(()));
        let unknown = check_points(&ok, 1, &l, NOW).expect_err("refused");
        assert!(
            unknown.contains("tag 1 but the manifest has 1 tags"),
            "{unknown}"
        );
        let future = batch(2 * 86_400_000, None, 0);
        let e = check_points(&future, 1, &l, NOW).expect_err("refused");
        assert!(e.contains("outside the accepted range"), "{e}");
        let past = batch(-(4000 * 86_400_000), None, 0);
        assert!(check_points(&past, 1, &l, NOW).is_err());
        let overflow = batch(i64::MAX, None, 0);
        assert!(
            check_points(&overflow, 1, &l, NOW)
                .expect_err("refused")
                .contains("overflows")
        );
        let long = batch(0, Some(Value::String("x".repeat(70_000))), 0);
        assert!(
            check_points(&long, 1, &l, NOW)
                .expect_err("refused")
                .contains("70000 bytes")
        );
    }

    #[test]
    fn refuses_manifests_with_bad_names() {
        let mut m = Manifest {
            devices: vec![guantong_proto::v1::Device {
                id: "press".into(),
                ..Default::default()
            }],
            tags: vec![guantong_proto::v1::Tag {
                name: "temp".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(check_manifest(&m), Ok(()));
        m.tags[0].name = "a/b".into();
        assert!(
            check_manifest(&m)
                .expect_err("refused")
                .contains("tags[0].name")
        );
        m.tags[0].name = "x".repeat(300);
        assert!(check_manifest(&m).is_err());
        m.tags[0].name = "t".into();
        m.tags[0].device = 3;
        assert!(
            check_manifest(&m)
                .expect_err("refused")
                .contains("names device 3")
        );
    }
}
