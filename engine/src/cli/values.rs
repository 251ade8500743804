//! Values of flags and environment variables in the forms ztunnel's environment gives them.

use std::time::Duration;

/// Milliseconds as a plain number (`1500`), or a Go duration as ztunnel's environment takes
/// them (`1.5s`, `5m`, `1h30m`, `300ms`, `0`); `var` names the environment variable that may
/// have given it, for the error.
pub(super) fn parse_millis(s: &str, var: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    go_duration(s)
        .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
        .ok_or_else(|| {
            format!("{s:?} (the flag or {var}): expected milliseconds or a duration such as 300ms, 5s, 5m, 1h30m")
        })
}

/// Whole seconds (`86400`) or a Go duration (`24h`, `90s`), as ztunnel reads `SECRET_TTL`;
/// `var` names the environment variable, for the error.
pub(super) fn parse_secs(s: &str, var: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    go_duration(s).filter(|d| !d.is_zero()).ok_or_else(|| {
        format!("{s:?} (the flag or {var}): expected seconds or a duration such as 90s, 1h, 24h")
    })
}

/// A Go `time.ParseDuration` string (units ns, us, µs, ms, s, m, h; no sign).
fn go_duration(s: &str) -> Option<Duration> {
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let value: f64 = num.parse().ok()?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_end);
        let secs = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * secs;
        rest = next;
    }
    Duration::try_from_secs_f64(total).ok()
}

pub(super) fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_as_ztunnel_reads_them() {
        let ms = |s| parse_millis(s, "X");
        assert_eq!(ms("1500"), Ok(1500));
        assert_eq!(ms("300ms"), Ok(300));
        assert_eq!(ms("1.5s"), Ok(1500));
        assert_eq!(ms("5m"), Ok(300_000));
        assert_eq!(ms("1h30m"), Ok(5_400_000));
        assert_eq!(ms("2m30s"), Ok(150_000));
        assert_eq!(ms("0"), Ok(0));
        for bad in ["", "5 minutes", "m", "-1s", "1d", "1.2.3s"] {
            let e = ms(bad).expect_err(bad);
            assert!(e.contains("X"), "{bad}: {e}");
        }
        let secs = |s| parse_secs(s, "SECRET_TTL");
        assert_eq!(secs("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(secs("60"), Ok(Duration::from_secs(60)));
        assert_eq!(secs("1m30s"), Ok(Duration::from_secs(90)));
        assert!(secs("0s").is_err(), "a certificate lives for some time");
        assert!(secs("a day").expect_err("bad").contains("SECRET_TTL"));
    }
}
