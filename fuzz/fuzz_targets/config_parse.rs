//! The ztunnel local-config parser must turn any input into a config or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(loaded) = ringtun::config::parse(std::path::Path::new("fuzz.yaml"), text) {
            let _ = ringtun::config::Snapshot::new(loaded.config, 1);
        }
    }
});
