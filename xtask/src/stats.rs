//! Paired comparisons over seeds for the proxy report: the mean of the differences `a − b` of
//! paired samples (the same seed: the same shots and head init), its 95 % confidence interval
//! from Student's t with n − 1 degrees of freedom, and the two-sided p-value of "no difference",
//! as `scipy.stats.ttest_rel(a, b)` gives them (fixture: `tools/fixtures/paired_t.py`).
use statrs::distribution::{ContinuousCDF, StudentsT};

/// A paired comparison of `n` pairs; `ci` and `p` are `None` with fewer than 2 pairs or no spread.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Paired {
    pub n: usize,
    pub mean: f64,
    /// The 95 % confidence interval of the mean difference.
    pub ci: Option<(f64, f64)>,
    pub p: Option<f64>,
}

/// `a − b` over pairs (equal lengths), with the interval at `level` (e.g. 0.95).
pub fn paired_t(a: &[f64], b: &[f64], level: f64) -> Paired {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let n = d.len();
    let mean = d.iter().sum::<f64>() / n.max(1) as f64;
    if n < 2 {
        return Paired { n, mean, ci: None, p: None };
    }
    let sd = (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    let se = sd / (n as f64).sqrt();
    let Ok(t) = StudentsT::new(0.0, 1.0, (n - 1) as f64) else { return Paired { n, mean, ci: None, p: None } };
    if se <= 0.0 || !se.is_finite() {
        return Paired { n, mean, ci: None, p: None };
    }
    let q = t.inverse_cdf(0.5 + level / 2.0);
    let p = 2.0 * t.cdf(-(mean / se).abs());
    Paired { n, mean, ci: Some((mean - q * se, mean + q * se)), p: Some(p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// statrs' Student t quantile is found numerically; against scipy's the interval ends agree
    /// to ~1e-12 (measured 1.6e-13 at most), far below the 0.01-point print resolution.
    const TOL: f64 = 1e-8;

    #[test]
    fn matches_scipy_ttest_rel() {
        let path = crate::root().join("tests/fixtures/stats/paired_t.json");
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut worst = 0f64;
        for case in fixture["cases"].as_array().unwrap() {
            let v = |k: &str| -> Vec<f64> { case[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
            let got = paired_t(&v("a"), &v("b"), 0.95);
            assert!((got.mean - case["mean"].as_f64().unwrap()).abs() < 1e-12, "{case}");
            match (got.ci, case["low"].as_f64(), case["high"].as_f64(), got.p, case["pvalue"].as_f64()) {
                (Some((lo, hi)), Some(want_lo), Some(want_hi), Some(p), Some(want_p)) => {
                    for (x, y) in [(lo, want_lo), (hi, want_hi), (p, want_p)] {
                        worst = worst.max((x - y).abs());
                        assert!((x - y).abs() < TOL, "{x} vs {y}: {case}");
                    }
                }
                (None, None, None, None, None) => {}
                other => panic!("{other:?}: {case}"),
            }
        }
        eprintln!("max |Δ| vs scipy: {worst:e}");
    }

    #[test]
    fn fewer_than_two_pairs_have_no_interval() {
        assert_eq!(paired_t(&[0.5], &[0.25], 0.95), Paired { n: 1, mean: 0.25, ci: None, p: None });
    }
}
