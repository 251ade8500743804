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
    fn counter_families_are_named_per_format() {
        let mut text = String::new();
        counter_header(&mut text, "x", "help", false);
        assert_eq!(text, "# HELP x_total help\n# TYPE x_total counter\n");
        let mut om = String::new();
        counter_header(&mut om, "x", "help", true);
        assert_eq!(om, "# HELP x help\n# TYPE x counter\n");
    }
}
