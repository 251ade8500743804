//! The DNS proxy's message parser on arbitrary bytes: never a panic; whatever parses writes
//! back out and parses to the same message; the names it carries expand without a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringtun::dns::names::{aliases, Domains};
use ringtun::dns::wire::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Message::decode(data) else {
        return;
    };
    let bytes = m.encode().expect("a parsed message writes back");
    assert_eq!(Message::decode(&bytes).as_ref(), Ok(&m));
    let _ = ringtun::dns::udp_limit(&m);
    if let (Some(q), Some(d)) = (m.questions.first(), Domains::new("cluster.local")) {
        let _ = q.name.to_lookup();
        let _ = q.name.to_string();
        let _ = aliases(&q.name, "default", &d);
    }
});
