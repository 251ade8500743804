//! What `ringtun-bench` records and how it shows it: samples (one number per measurement, per
//! run, per contender), latency CDFs, memory points; a table on stdout with medians, spreads and
//! ratios; a JSON file with everything; an HTML report with SVG plots made with plotters.

mod plots;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::{self, Summary};

pub use plots::write_all;

/// The baseline every ratio is taken against.
pub const DIRECT: &str = "direct";

/// One measured number.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Run index (0-based); the contenders alternate within a run.
    pub run: usize,
    /// `direct`, `ringtun` or the other tunnel's name.
    pub contender: String,
    /// What was run, e.g. `bulk up 1 stream`.
    pub test: String,
    /// What was measured, with its unit, e.g. `MiB/s`.
    pub metric: String,
    /// The value.
    pub value: f64,
    /// Whether more is better (throughput) or less (latency, CPU, memory).
    pub higher_is_better: bool,
}

/// A latency distribution of one run.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyCdf {
    /// Run index.
    pub run: usize,
    /// Contender.
    pub contender: String,
    /// Test name.
    pub test: String,
    /// Number of round trips behind it.
    pub count: usize,
    /// (quantile, round-trip µs) pairs.
    pub cdf: Vec<(f64, f64)>,
}

/// RSS of one tunnel process with some number of idle tunnelled connections open.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryPoint {
    /// Run index.
    pub run: usize,
    /// Contender.
    pub contender: String,
    /// `client` or `server` side tunnel.
    pub side: String,
    /// Idle connections open.
    pub conns: usize,
    /// Resident set size, KiB.
    pub rss_kib: u64,
}

/// Facts about the machine and the run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Meta {
    /// Start time (UTC, RFC 3339).
    pub date: String,
    /// `uname -r`.
    pub kernel: String,
    /// CPU model from /proc/cpuinfo.
    pub cpu: String,
    /// Online CPUs.
    pub cores: usize,
    /// The command line.
    pub command: String,
    /// git describe of the ringtun tree, when known.
    pub ringtun_commit: String,
    /// Options in force, rendered.
    pub options: BTreeMap<String, String>,
}

/// Everything a run produced.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Results {
    /// Machine and options.
    pub meta: Meta,
    /// Contenders in the order they ran.
    pub contenders: Vec<String>,
    /// Every measured number.
    pub samples: Vec<Sample>,
    /// Latency distributions.
    pub latency: Vec<LatencyCdf>,
    /// Memory points.
    pub memory: Vec<MemoryPoint>,
    /// Cross-check results from iperf3/sockperf (same shape as samples).
    pub crosscheck: Vec<Sample>,
    /// Things the reader must know (what could not be measured and why).
    pub notes: Vec<String>,
    /// Raw round-trip times per (contender, test), all runs, for plots (not serialised).
    #[serde(skip)]
    pub raw_rtts: HashMap<(String, String), Vec<f64>>,
}

/// The metric of the CPU time the host took from the machine during a measurement.
pub const STOLEN: &str = "machine CPUs stolen";

/// A point in [`Results`] that figures pushed after it can be rolled back to.
#[derive(Debug, Clone)]
pub struct Mark {
    samples: usize,
    latency: usize,
    raw: HashMap<(String, String), usize>,
}

impl Results {
    /// Records a sample.
    pub fn push(
        &mut self,
        run: usize,
        contender: &str,
        test: &str,
        metric: &str,
        value: f64,
        hib: bool,
    ) {
        if value.is_finite() {
            self.samples.push(Sample {
                run,
                contender: contender.to_owned(),
                test: test.to_owned(),
                metric: metric.to_owned(),
                value,
                higher_is_better: hib,
            });
        }
    }

    /// Records round-trip times: p50/p90/p99/p99.9 as samples, the CDF, and the raw values for
    /// the plots.
    pub fn push_rtts(&mut self, run: usize, contender: &str, test: &str, rtts: &[f64]) {
        if rtts.is_empty() {
            return;
        }
        let s = stats::sorted(rtts);
        for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)] {
            self.push(
                run,
                contender,
                test,
                &format!("RTT {name} µs"),
                stats::quantile(&s, q),
                false,
            );
        }
        self.latency.push(LatencyCdf {
            run,
            contender: contender.to_owned(),
            test: test.to_owned(),
            count: s.len(),
            cdf: stats::cdf(&s, 200),
        });
        self.raw_rtts
            .entry((contender.to_owned(), test.to_owned()))
            .or_default()
            .extend_from_slice(rtts);
    }

    /// Where the results stand now, so a measurement's figures can be taken back
    /// ([`Results::roll_back`]).
    pub fn mark(&self) -> Mark {
        Mark {
            samples: self.samples.len(),
            latency: self.latency.len(),
            raw: self
                .raw_rtts
                .iter()
                .map(|(k, v)| (k.clone(), v.len()))
                .collect(),
        }
    }

    /// The `machine CPUs stolen` samples pushed since `mark`.
    fn stolen_after<'a>(&'a self, mark: &Mark) -> impl Iterator<Item = &'a Sample> {
        self.samples[mark.samples.min(self.samples.len())..]
            .iter()
            .filter(|s| s.metric == STOLEN)
    }

    /// The largest `machine CPUs stolen` among the samples pushed since `mark`.
    pub fn stolen_since(&self, mark: &Mark) -> Option<f64> {
        self.stolen_after(mark).map(|s| s.value).reduce(f64::max)
    }

    /// The tests pushed since `mark` during which the host stole more than `limit` CPUs.
    pub fn stolen_tests_since(&self, mark: &Mark, limit: f64) -> Vec<String> {
        self.stolen_after(mark)
            .filter(|s| s.value > limit)
            .map(|s| s.test.clone())
            .collect()
    }

    /// Takes back every figure pushed since `mark` (a measurement to be repeated).
    pub fn roll_back(&mut self, mark: &Mark) {
        self.samples.truncate(mark.samples);
        self.latency.truncate(mark.latency);
        self.raw_rtts.retain(|k, v| match mark.raw.get(k) {
            Some(&n) => {
                v.truncate(n);
                true
            }
            None => false,
        });
    }

    /// Values of one (contender, test, metric) over all runs.
    pub fn values(&self, contender: &str, test: &str, metric: &str) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.contender == contender && s.test == test && s.metric == metric)
            .map(|s| s.value)
            .collect()
    }

    /// Median of one (contender, test, metric) over all runs.
    pub fn median(&self, contender: &str, test: &str, metric: &str) -> Option<f64> {
        Summary::of(&self.values(contender, test, metric)).map(|s| s.median)
    }

    /// (test, metric) rows in first-seen order.
    pub fn rows(&self) -> Vec<(String, String, bool)> {
        let mut seen = Vec::new();
        for s in &self.samples {
            let key = (s.test.clone(), s.metric.clone(), s.higher_is_better);
            if !seen.contains(&key) {
                seen.push(key);
            }
        }
        seen
    }
}

/// Formats a number with a precision that suits its size.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "–".into()
    } else if a >= 10_000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn fmt_summary(s: &Summary) -> String {
    if s.n == 1 {
        fmt_num(s.median)
    } else {
        format!(
            "{} ({}–{})",
            fmt_num(s.median),
            fmt_num(s.min),
            fmt_num(s.max)
        )
    }
}

/// One rendered table: header and rows of cells.
pub struct Table {
    /// Column titles.
    pub header: Vec<String>,
    /// Cells.
    pub rows: Vec<Vec<String>>,
}

/// Builds the comparison table: per (test, metric), each contender's median (min–max), and
/// the ratios of medians to direct and, with another tunnel, ringtun to it.
pub fn table(r: &Results, samples: &[Sample]) -> Table {
    let others: Vec<&String> = r
        .contenders
        .iter()
        .filter(|c| *c != DIRECT && *c != "ringtun")
        .collect();
    let mut header = vec!["test".to_owned(), "metric".to_owned()];
    header.extend(r.contenders.iter().cloned());
    for c in r.contenders.iter().filter(|c| *c != DIRECT) {
        header.push(format!("{c}/direct"));
    }
    for o in &others {
        header.push(format!("ringtun/{o}"));
    }
    // In-pod mode against dedicated ringtun and against ztunnel in the same (shared) mode.
    let inpod: Vec<(&str, &str)> = [
        ("ringtun-inpod", "ringtun"),
        ("ringtun-inpod", "ztunnel-shared"),
    ]
    .into_iter()
    .filter(|(a, b)| r.contenders.iter().any(|c| c == a) && r.contenders.iter().any(|c| c == b))
    .collect();
    for (a, b) in &inpod {
        header.push(format!("{a}/{b}"));
    }
    let view = Results {
        samples: samples.to_vec(),
        contenders: r.contenders.clone(),
        ..Default::default()
    };
    let mut rows = Vec::new();
    for (test, metric, _) in view.rows() {
        let mut row = vec![test.clone(), metric.clone()];
        let mut med = HashMap::new();
        for c in &r.contenders {
            match Summary::of(&view.values(c, &test, &metric)) {
                Some(s) => {
                    med.insert(c.clone(), s.median);
                    row.push(fmt_summary(&s));
                }
                None => row.push("–".into()),
            }
        }
        let ratio = |a: Option<&f64>, b: Option<&f64>| match (a, b) {
            (Some(a), Some(b)) if *b != 0.0 => format!("×{:.2}", a / b),
            _ => "–".into(),
        };
        for c in r.contenders.iter().filter(|c| *c != DIRECT) {
            row.push(ratio(med.get(c), med.get(DIRECT)));
        }
        for o in &others {
            row.push(ratio(med.get("ringtun"), med.get(*o)));
        }
        for (a, b) in &inpod {
            row.push(ratio(med.get(*a), med.get(*b)));
        }
        rows.push(row);
    }
    Table { header, rows }
}

/// Renders a table as aligned text.
pub fn render_text(t: &Table) -> String {
    let cols = t.header.len();
    let mut w = vec![0usize; cols];
    for row in std::iter::once(&t.header).chain(&t.rows) {
        for (i, c) in row.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |row: &Vec<String>, out: &mut String| {
        for (i, c) in row.iter().enumerate() {
            let pad = w[i] - c.chars().count();
            if i < 2 {
                let _ = write!(out, "{c}{}  ", " ".repeat(pad));
            } else {
                let _ = write!(out, "{}{c}  ", " ".repeat(pad));
            }
        }
        out.push('\n');
    };
    line(&t.header, &mut out);
    let total: usize = w.iter().sum::<usize>() + 2 * cols;
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for row in &t.rows {
        line(row, &mut out);
    }
    out
}

/// Renders a table as Markdown.
pub fn render_markdown(t: &Table) -> String {
    let mut out = format!("| {} |\n", t.header.join(" | "));
    out.push_str(&format!("|{}\n", "---|".repeat(t.header.len())));
    for row in &t.rows {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rolled_back_measurement_leaves_only_what_came_before_it() {
        let mut r = Results::default();
        r.push(0, "ringtun", "rr", "req/s", 100.0, true);
        r.push(0, "ringtun", "rr", STOLEN, 0.01, false);
        r.push_rtts(0, "ringtun", "rr", &[10.0, 20.0]);
        let mark = r.mark();
        assert_eq!(r.stolen_since(&mark), None, "nothing pushed since the mark");
        r.push(1, "ringtun", "rr", "req/s", 50.0, true);
        r.push(1, "ringtun", "rr", STOLEN, 0.30, false);
        r.push(1, "ringtun", "bulk", STOLEN, 0.10, false);
        r.push_rtts(1, "ringtun", "rr", &[90.0, 95.0, 99.0]);
        r.push_rtts(1, "ztunnel", "rr", &[5.0]);
        assert_eq!(
            r.stolen_since(&mark),
            Some(0.30),
            "the largest steal since the mark"
        );
        r.roll_back(&mark);
        assert_eq!(r.values("ringtun", "rr", "req/s"), vec![100.0]);
        assert_eq!(r.values("ringtun", "rr", STOLEN), vec![0.01]);
        assert_eq!(r.latency.len(), 1);
        let key = |c: &str| (c.to_owned(), "rr".to_owned());
        assert_eq!(r.raw_rtts.get(&key("ringtun")), Some(&vec![10.0, 20.0]));
        assert!(!r.raw_rtts.contains_key(&key("ztunnel")));
    }
}
