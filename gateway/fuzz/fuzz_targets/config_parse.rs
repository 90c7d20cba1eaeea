//! Any config text must load to a `Config` or a list of problems, each
//! naming where — never a panic.
#![no_main]

use std::path::Path;

use guantong_gateway::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(problems) = Config::parse(text, Path::new("/nonexistent-fuzz-dir")) {
        assert!(!problems.is_empty(), "an error with no problem listed");
    }
});
