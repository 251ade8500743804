//! The operator's HTTP endpoints of a ringtun inside a namespace: metrics (15020), readiness
//! (15021) and the admin API (15000), and Prometheus scrapes parsed by `prometheus_client`'s
//! reference parsers (`tests/peers/prom_check.py`).

use std::collections::HashMap;
use std::time::Duration;

use ringtun_testbed::process::http_request;
use ringtun_testbed::{connect_in, Netns};

use super::{peers_dir, Ringtun};

/// The metrics endpoint, as `prom_check.py` asks it.
pub const METRICS: &str = "http://127.0.0.1:15020/metrics";
/// The readiness endpoint.
pub const READY: &str = "127.0.0.1:15021";
/// The admin API.
pub const ADMIN: &str = "127.0.0.1:15000";
/// How long a log line may take to show up.
const LOG_WAIT: Duration = Duration::from_secs(10);

/// Waits until ringtun says its metrics, readiness and admin endpoints are all up (readiness
/// answers once it is bound, the admin listener is bound just after it).
pub fn wait_endpoints(r: &Ringtun) {
    r.wait_log_count("admin endpoints up", 1, LOG_WAIT);
}

/// An HTTP request to `addr` from inside `ns`.
pub fn http_in(ns: &Netns, addr: &str, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_request(connect_in(ns, addr)?, method, path, None)
}

/// `GET /healthz/ready` on the namespace's readiness port: its status.
pub fn readiness(ns: &Netns) -> u16 {
    http_in(ns, READY, "GET", "/healthz/ready")
        .unwrap_or_else(|e| panic!("readiness request in {}: {e}", ns.name()))
        .0
}

/// One metric sample as `prom_check.py` reports it.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Sample name (with `_total` and the like).
    pub name: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A parsed scrape: family name → type, and every sample.
pub struct Scrape {
    /// What was scraped where, for messages.
    pub what: String,
    /// The response's Content-Type.
    pub content_type: String,
    /// Family name → type.
    pub types: HashMap<String, String>,
    /// Every sample.
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Scrapes `/metrics` inside `ns` and parses it with `prometheus_client` (the OpenMetrics
    /// parser with `openmetrics`).
    pub fn take(ns: &Netns, openmetrics: bool) -> Scrape {
        let mut cmd = ns.exec("python3");
        cmd.arg(peers_dir().join("prom_check.py")).arg(METRICS);
        if openmetrics {
            cmd.arg("--openmetrics");
        }
        let out = cmd.output().expect("run python3 prom_check.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "prom_check.py (openmetrics={openmetrics}) in {} failed ({}): {stdout}\n{}",
            ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&stdout).expect("prom_check.py JSON");
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        for f in v["families"].as_array().expect("families") {
            let name = f["name"].as_str().expect("family name").to_owned();
            types.insert(name, f["type"].as_str().unwrap_or_default().to_owned());
            for s in f["samples"].as_array().expect("samples") {
                samples.push(Sample {
                    name: s["name"].as_str().expect("sample name").to_owned(),
                    labels: s["labels"]
                        .as_object()
                        .expect("labels")
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect(),
                    value: s["value"].as_f64().expect("sample value"),
                });
            }
        }
        Scrape {
            what: format!(
                "{} scrape in {}",
                if openmetrics {
                    "OpenMetrics"
                } else {
                    "Prometheus"
                },
                ns.name()
            ),
            content_type: v["content_type"].as_str().unwrap_or_default().to_owned(),
            types,
            samples,
        }
    }

    /// Samples named `name` whose labels include every `(key, value)` of `want`.
    pub fn select(&self, name: &str, want: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && want
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// Sum of the samples [`Scrape::select`] picks.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.select(name, want).iter().map(|s| s.value).sum()
    }

    /// The value of the only sample named `name` with labels `want`; fails unless exactly one.
    pub fn one(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let found = self.select(name, want);
        assert_eq!(
            found.len(),
            1,
            "{}: expected exactly one {name} sample with {want:?}, found {found:#?}\nall {name} samples: {:#?}",
            self.what,
            self.select(name, &[])
        );
        found[0].value
    }

    /// Fails unless the scrape has `family` with type `kind`.
    pub fn assert_family(&self, family: &str, kind: &str) {
        assert_eq!(
            self.types.get(family).map(String::as_str),
            Some(kind),
            "{}: family {family} of type {kind} missing; families: {:?}",
            self.what,
            self.types
        );
    }
}
