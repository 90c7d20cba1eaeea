//! Any bytes as a buffer file redb cannot open go through the salvage scan
//! (`buffer::salvage`): raw, and shaped into well-framed records between
//! garbage so that the choice among copies and the sizing of damaged
//! ranges are reached. It must never panic, and what it returns must be
//! coherent: records ascending and intact, gaps between them counting what
//! they declare (checked inside `fuzz_salvage`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    guantong_gateway::buffer::fuzz_salvage(data);
});
