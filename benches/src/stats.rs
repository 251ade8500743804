//! Medians, spreads and percentiles.

use serde::Serialize;

/// Sorts a copy of `v` (NaNs last).
pub fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

/// The `q`-quantile (0..=1) of sorted values, interpolating between neighbours.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let pos = q.clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = pos.ceil() as usize;
            let w = pos - lo as f64;
            sorted[lo] * (1.0 - w) + sorted[hi] * w
        }
    }
}

/// Median, spread and count of repeated measurements.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

impl Summary {
    /// Summarises `v`; `None` when empty.
    pub fn of(v: &[f64]) -> Option<Summary> {
        if v.is_empty() {
            return None;
        }
        let s = sorted(v);
        Some(Summary {
            n: s.len(),
            median: quantile(&s, 0.5),
            min: s[0],
            max: s[s.len() - 1],
        })
    }
}

/// A compact CDF of many samples: the value at each of `points` evenly spaced quantiles, plus
/// the tail quantiles a latency report needs.
pub fn cdf(sorted: &[f64], points: usize) -> Vec<(f64, f64)> {
    let mut qs: Vec<f64> = (0..=points).map(|i| i as f64 / points as f64).collect();
    qs.extend([0.99, 0.995, 0.999, 0.9995, 0.9999]);
    qs.sort_by(f64::total_cmp);
    qs.dedup();
    qs.into_iter().map(|q| (q, quantile(sorted, q))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&s, 0.0), 1.0);
        assert_eq!(quantile(&s, 1.0), 4.0);
        assert_eq!(quantile(&s, 0.5), 2.5);
        let m = Summary::of(&[3.0, 1.0, 2.0]).expect("summary");
        assert_eq!((m.median, m.min, m.max, m.n), (2.0, 1.0, 3.0, 3));
    }
}
