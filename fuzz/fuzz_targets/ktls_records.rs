//! What arrives on a kTLS socket after the switch: the record-type control message, the record
//! classification and TLS 1.3 handshake messages (tickets, KeyUpdate) must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tls_kernel_offload::parse_record_type_cmsg(data);
    if let Some((&content_type, payload)) = data.split_first() {
        let _ = tls_kernel_offload::classify(content_type, payload);
    }
    let _ = tls_kernel_offload::parse_handshake(data);
});
