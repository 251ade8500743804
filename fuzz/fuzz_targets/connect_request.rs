//! CONNECT validation on 15008: any method, authority and forwarded header gets an answer.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let method = parts.next().unwrap_or_default();
    let authority = parts.next().unwrap_or_default();
    let forwarded = parts.next().unwrap_or_default();
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else { return };
    let Ok(uri) = authority.parse::<http::Uri>() else { return };
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(forwarded) {
        headers.insert("forwarded", v);
    }
    let _ = ringtun_hbone::connect::parse_connect(&method, &uri, &headers);
    let _ = ringtun_hbone::connect::forwarded_for(forwarded);
});
