//! Any bytes a gateway sends on its stream — a `GatewayMessage`, or a batch
//! envelope's payload — must decode or fail with an error, and what decodes
//! must pass validation or be refused with a reason — never a panic. A batch
//! that passes has only points within the manifest and the time window; a
//! health report that passes has a fill within 0..=1 and bounded devices; a
//! configuration result is kept with bounded problems.
#![no_main]

use guantong_ingest::validate::{ValidationLimits, check_manifest, check_points};
use guantong_proto::v1::gateway_message::Kind;
use guantong_proto::v1::{Batch, GatewayMessage};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const NOW_MS: i64 = 1_800_000_000_000;

fn batch(b: &Batch, tags: usize) {
    let limits = ValidationLimits::default();
    if check_points(b, tags, &limits, NOW_MS).is_ok() {
        for p in &b.points {
            assert!((p.tag as usize) < tags, "a point outside the manifest passed");
            let t = b.base_time_ms + p.time_offset_ms;
            assert!(
                t <= NOW_MS + limits.max_clock_ahead.as_millis() as i64,
                "a point from the future passed"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let tags = usize::from(selector % 8);
    if selector & 0x80 == 0 {
        if let Ok(b) = Batch::decode(bytes) {
            batch(&b, tags);
        }
        return;
    }
    match GatewayMessage::decode(bytes).ok().and_then(|m| m.kind) {
        Some(Kind::Manifest(m)) => {
            if check_manifest(&m).is_ok() {
                for t in &m.tags {
                    assert!((t.device as usize) < m.devices.len());
                }
            }
        }
        Some(Kind::Batch(envelope)) => {
            if let Ok(b) = Batch::decode(envelope.payload.as_ref()) {
                batch(&b, tags);
            }
        }
        Some(Kind::Health(h)) => {
            if let Ok(view) = guantong_ingest::fleet::HealthView::from_wire(h, NOW_MS) {
                assert!((0.0..=1.0).contains(&view.buffer_fill));
                assert!(view.devices.len() <= guantong_ingest::fleet::MAX_HEALTH_DEVICES);
            }
        }
        Some(Kind::ConfigResult(r)) => {
            let mut state = guantong_ingest::gateway_config::ConfigState::default();
            state.answered(&r, NOW_MS);
            if let Some(refused) = &state.refused {
                assert!(refused.problems.len() <= 100);
                assert!(refused.problems.iter().all(|p| p.message.len() <= 1024));
            }
        }
        Some(Kind::Hello(_)) | None => {}
    }
});
