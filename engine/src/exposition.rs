//! What every operator output shares, written once: Prometheus family headers (the metrics text
//! of the shards, certificates and xDS) and the time format ztunnel's `/config_dump` uses.

use std::fmt::Write;

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC), as ztunnel writes times in `/config_dump`.
pub fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days: no calendar crate for one format.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// `# HELP`/`# TYPE` of a counter family named after its `name_total` samples.
pub fn counter_header(out: &mut String, name: &str, help: &str, openmetrics: bool) {
    // Prometheus text names the family after the sample (`_total`); OpenMetrics without it.
    let family = if openmetrics {
        name.to_owned()
    } else {
        format!("{name}_total")
    };
    let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} counter");
}

/// `# HELP`/`# TYPE` of a gauge family.
pub fn gauge_header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
}

/// A big-endian unsigned integer (a certificate's serial) in decimal, as ztunnel's
/// `/config_dump` writes `serialNumber`.
pub fn decimal(be: &[u8]) -> String {
    let mut n: Vec<u8> = be.iter().copied().skip_while(|&b| b == 0).collect();
    let mut digits = Vec::new();
    // Long division by 10 of the byte string, one digit per pass: serials are 20 bytes at most.
    while !n.is_empty() {
        let mut rem = 0u16;
        for b in n.iter_mut() {
            let cur = (rem << 8) | u16::from(*b);
            *b = (cur / 10) as u8;
            rem = cur % 10;
        }
        digits.push(b'0' + rem as u8);
        let zeros = n.iter().take_while(|&&b| b == 0).count();
        n.drain(..zeros);
    }
    if digits.is_empty() {
        return "0".into();
    }
    digits.iter().rev().map(|&d| d as char).collect()
}

/// A DER certificate as ztunnel's `/config_dump` shows its `pem`: the PEM text, in 60-column
/// lines as ztunnel writes them (checked against its dump of the same root), itself
/// base64-encoded on one line.
pub fn pem_base64(der: &[u8]) -> String {
    let body = base64(der);
    let mut pem = String::with_capacity(body.len() + body.len() / 64 + 60);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(60) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    base64(pem.as_bytes())
}

/// Standard base64 with padding (no crate for two call sites).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_ztunnels() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn serials_and_pems_read_as_ztunnels() {
        assert_eq!(decimal(&[]), "0");
        assert_eq!(decimal(&[0, 0]), "0");
        assert_eq!(decimal(&[0x0a, 0x1b]), "2587");
        // ztunnel's test CA root, as its `/config_dump` shows it.
        let root = [
            0x4d, 0x9f, 0xda, 0x01, 0x9e, 0x00, 0xb0, 0x34, 0x3a, 0x84, 0x1d, 0xd8, 0xed, 0xbf,
            0x3c, 0x5c, 0x6c, 0x9a, 0x1b, 0xc8,
        ];
        assert_eq!(
            decimal(&root),
            "443157098868639100276244936351886782195526409160"
        );
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(
            pem_base64(b"foo"),
            base64(b"-----BEGIN CERTIFICATE-----\nZm9v\n-----END CERTIFICATE-----\n")
        );
    }

    #[test]
    fn counter_families_are_named_per_format() {
        let mut text = String::new();
        counter_header(&mut text, "x", "help", false);
        assert_eq!(text, "# HELP x_total help\n# TYPE x_total counter\n");
        let mut om = String::new();
        counter_header(&mut om, "x", "help", true);
        assert_eq!(om, "# HELP x help\n# TYPE x counter\n");
    }
}
