//! SPIFFE URI parsing and certificate SAN extraction on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(id) = ringtun_hbone::Identity::parse(s) {
            assert_eq!(ringtun_hbone::Identity::parse(&id.to_string()).ok(), Some(id));
        }
    }
    let _ = ringtun_hbone::cert::spiffe_identities(data);
});
