//! Fréchet Inception Distance as pytorch-fid computes it, in f64:
//! statistics `mu = mean(act, 0)`, `sigma = cov(act, rowvar=False)` (N − 1 normalization), and
//! `d² = |mu1 − mu2|² + tr(Σ1) + tr(Σ2) − 2·tr(sqrtm(Σ1·Σ2))`.
//!
//! Upstream: pytorch-fid 0.3.0 `src/pytorch_fid/fid_score.py` (`calculate_activation_statistics`,
//! `calculate_frechet_distance`). pytorch-fid takes scipy's `sqrtm` of the non-symmetric
//! product, retries with `eps·I` added to both covariances when that is not finite, and keeps
//! the real part. Here `tr(sqrtm(Σ1Σ2))` is computed without a general matrix square root:
//! `Σ1Σ2` is similar to the symmetric PSD `√Σ1 Σ2 √Σ1`, so the trace is the sum of the square
//! roots of its eigenvalues (negative round-off eigenvalues clamped to 0, which is what taking
//! the real part of scipy's result does). With features instead of statistics and fewer
//! samples than dimensions (small evals), the non-zero eigenvalues are those of the small
//! `N1×N2` matrix `A1·A2ᵀ` of the centered features: `tr = ‖A1·A2ᵀ‖_* / √((N1−1)(N2−1))`
//! (nuclear norm), exact and O(N1·N2·D); against stored statistics it is
//! `Σ √eig(A2·Σ1·A2ᵀ) / √(N2−1)`, an `N2×N2` problem.
//!
//! Statistics files: safetensors with `mu [d]` and `sigma [d, d]` in f64 (pytorch-fid's `.npz`
//! keys; convert one with `safetensors.numpy.save_file({"mu": f["mu"], "sigma": f["sigma"]}, …)`).
use std::path::Path;

use nalgebra::{DMatrix, DVector};

use crate::error::{Result, Sd3Error};

/// pytorch-fid's default `eps` for the singular-product retry.
pub const FID_EPS: f64 = 1e-6;

/// Mean and covariance of a set of feature vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct FidStats {
    /// `[d]`.
    pub mu: DVector<f64>,
    /// `[d, d]`, normalized by N − 1 (`np.cov`).
    pub sigma: DMatrix<f64>,
    /// Number of samples.
    pub n: usize,
}

/// The distance and whether the `eps·I` retry was needed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fid {
    pub value: f64,
    pub eps_retry: bool,
}

/// Row-major `features [n, d]` (f32 as the network produces them) → centered f64 matrix and mean.
fn centered(features: &[f32], n: usize, d: usize, what: &str) -> Result<(DMatrix<f64>, DVector<f64>)> {
    if d == 0 || features.len() != n * d {
        return Err(Sd3Error::Input(format!("{what}: {} values are not {n} × {d} features", features.len())));
    }
    if n < 2 {
        return Err(Sd3Error::Input(format!("{what}: FID needs at least 2 images, got {n}")));
    }
    if let Some(i) = features.iter().position(|v| !v.is_finite()) {
        return Err(Sd3Error::Input(format!("{what}: feature {} of image {} is not finite", i % d, i / d)));
    }
    let a = DMatrix::from_row_iterator(n, d, features.iter().map(|&v| v as f64));
    let mu = a.row_mean().transpose();
    let mut a = a;
    for mut row in a.row_iter_mut() {
        row -= mu.transpose();
    }
    Ok((a, mu))
}

impl FidStats {
    /// `calculate_activation_statistics` from row-major `features [n, d]`.
    pub fn from_features(features: &[f32], n: usize, d: usize) -> Result<Self> {
        let (a, mu) = centered(features, n, d, "features")?;
        let sigma = (a.transpose() * &a) / (n as f64 - 1.0);
        Ok(Self { mu, sigma, n })
    }

    /// Writes `mu`, `sigma` (f64) and the sample count (metadata `n`) atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        use safetensors::tensor::TensorView;
        let d = self.mu.len();
        let mu: Vec<u8> = self.mu.iter().flat_map(|v| v.to_le_bytes()).collect();
        // nalgebra is column-major; sigma is symmetric, but write it row-major regardless
        let sigma: Vec<u8> = (0..d).flat_map(|i| (0..d).map(move |j| (i, j))).flat_map(|(i, j)| self.sigma[(i, j)].to_le_bytes()).collect();
        let bad = |e: safetensors::SafeTensorError| Sd3Error::Input(format!("{}: cannot write FID statistics: {e}", path.display()));
        let views = [
            ("mu", TensorView::new(safetensors::Dtype::F64, vec![d], &mu).map_err(bad)?),
            ("sigma", TensorView::new(safetensors::Dtype::F64, vec![d, d], &sigma).map_err(bad)?),
        ];
        let meta = std::collections::HashMap::from([("n".to_string(), self.n.to_string())]);
        let bytes = safetensors::serialize(views, Some(meta)).map_err(bad)?;
        Ok(serial_lora::io::write_atomic(path, &bytes)?)
    }

    /// Reads a statistics file (`mu [d]`, `sigma [d, d]`, f64 or f32); errors name the file and key.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Sd3Error::Io { path: path.into(), source: e })?;
        let bad = |m: String| Sd3Error::Dataset { path: path.into(), message: format!("FID statistics: {m}") };
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let get = |key: &str| -> Result<(Vec<usize>, Vec<f64>)> {
            let v = st.tensor(key).map_err(|_| bad(format!("no tensor `{key}`")))?;
            let data = match v.dtype() {
                safetensors::Dtype::F64 => v.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(),
                safetensors::Dtype::F32 => v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f64).collect(),
                other => return Err(bad(format!("`{key}` has dtype {other:?}; expected F64 or F32"))),
            };
            Ok((v.shape().to_vec(), data))
        };
        let (ms, mu) = get("mu")?;
        let (ss, sigma) = get("sigma")?;
        let d = mu.len();
        if ms != [d] || ss != [d, d] {
            return Err(bad(format!("`mu` {ms:?} and `sigma` {ss:?} are not [d] and [d, d]")));
        }
        if let Some(i) = mu.iter().chain(&sigma).position(|v| !v.is_finite()) {
            return Err(bad(format!("value {i} is not finite")));
        }
        let n = meta.metadata().as_ref().and_then(|m| m.get("n")).and_then(|n| n.parse().ok()).unwrap_or(0);
        Ok(Self { mu: DVector::from_vec(mu), sigma: DMatrix::from_row_slice(d, d, &sigma), n })
    }
}

/// `tr(sqrtm(Σ1·Σ2))` via the eigenvalues of `√Σ1 Σ2 √Σ1` (Σ symmetric PSD); `None` where a
/// matrix is not finite (nalgebra's eigen iteration would not terminate on NaN / ∞).
fn trace_sqrt_product(s1: &DMatrix<f64>, s2: &DMatrix<f64>) -> Option<f64> {
    let finite = |m: &DMatrix<f64>| m.iter().all(|v| v.is_finite());
    if !finite(s1) || !finite(s2) {
        return None;
    }
    let e = s1.clone().symmetric_eigen();
    let roots = e.eigenvalues.map(|w| w.max(0.0).sqrt());
    let r1 = &e.eigenvectors * DMatrix::from_diagonal(&roots) * e.eigenvectors.transpose();
    let m = &r1 * s2 * &r1;
    let m = (&m + m.transpose()) * 0.5;
    if !finite(&m) {
        return None;
    }
    Some(m.symmetric_eigenvalues().iter().map(|w| w.max(0.0).sqrt()).sum())
}

/// `calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps)`.
pub fn frechet_distance(a: &FidStats, b: &FidStats, eps: f64) -> Result<Fid> {
    let d = a.mu.len();
    if b.mu.len() != d || a.sigma.shape() != (d, d) || b.sigma.shape() != (d, d) {
        return Err(Sd3Error::Input(format!("FID statistics differ in size: mu {} / {}, sigma {:?} / {:?}", d, b.mu.len(), a.sigma.shape(), b.sigma.shape())));
    }
    let diff = &a.mu - &b.mu;
    let base = diff.dot(&diff) + a.sigma.trace() + b.sigma.trace();
    if let Some(tr) = trace_sqrt_product(&a.sigma, &b.sigma).filter(|t| t.is_finite() && base.is_finite()) {
        return Ok(Fid { value: base - 2.0 * tr, eps_retry: false });
    }
    // pytorch-fid: "fid calculation produces singular product; adding eps to diagonal of cov estimates"
    let offset = DMatrix::<f64>::identity(d, d) * eps;
    match trace_sqrt_product(&(&a.sigma + &offset), &(&b.sigma + &offset)).filter(|t| t.is_finite() && base.is_finite()) {
        Some(tr) => Ok(Fid { value: base - 2.0 * tr, eps_retry: true }),
        None => Err(Sd3Error::Input("FID: the statistics are not finite or their covariance product has no finite square root, even with eps added".into())),
    }
}

/// FID between two sets of row-major features `[n1, d]` and `[n2, d]`: the same number as
/// [`frechet_distance`] of their [`FidStats`]; with fewer samples than dimensions it takes the
/// nuclear-norm route (no `d×d` eigendecomposition).
pub fn fid_from_features(f1: &[f32], n1: usize, f2: &[f32], n2: usize, d: usize) -> Result<Fid> {
    if n1.min(n2) >= d {
        return frechet_distance(&FidStats::from_features(f1, n1, d)?, &FidStats::from_features(f2, n2, d)?, FID_EPS);
    }
    let (a1, mu1) = centered(f1, n1, d, "generated features")?;
    let (a2, mu2) = centered(f2, n2, d, "reference features")?;
    let (k1, k2) = (n1 as f64 - 1.0, n2 as f64 - 1.0);
    let diff = &mu1 - &mu2;
    let (t1, t2) = (a1.norm_squared() / k1, a2.norm_squared() / k2);
    let nuclear: f64 = (&a1 * a2.transpose()).singular_values().iter().sum();
    let value = diff.dot(&diff) + t1 + t2 - 2.0 * nuclear / (k1 * k2).sqrt();
    if !value.is_finite() {
        return Err(Sd3Error::Input("FID is not finite".into()));
    }
    Ok(Fid { value, eps_retry: false })
}

/// FID between stored statistics (e.g. of the real images) and row-major features `[n, d]`:
/// the same number as [`frechet_distance`] of the features' [`FidStats`]; with `n < d` through
/// the `n×n` matrix `A·Σ·Aᵀ` of the centered features (no `d×d` eigendecomposition).
pub fn fid_stats_vs_features(stats: &FidStats, features: &[f32], n: usize, d: usize) -> Result<Fid> {
    if stats.mu.len() != d || stats.sigma.shape() != (d, d) {
        return Err(Sd3Error::Input(format!("FID statistics have {} dimensions, the features {d}", stats.mu.len())));
    }
    if n >= d {
        return frechet_distance(stats, &FidStats::from_features(features, n, d)?, FID_EPS);
    }
    let (a, mu) = centered(features, n, d, "generated features")?;
    let k = n as f64 - 1.0;
    let m = &a * &stats.sigma * a.transpose() / k;
    let m = (&m + m.transpose()) * 0.5;
    if !m.iter().chain(stats.mu.iter()).all(|v| v.is_finite()) {
        return Err(Sd3Error::Input("FID: the statistics are not finite".into()));
    }
    let tr: f64 = m.symmetric_eigenvalues().iter().map(|w| w.max(0.0).sqrt()).sum();
    let diff = &stats.mu - &mu;
    let value = diff.dot(&diff) + stats.sigma.trace() + a.norm_squared() / k - 2.0 * tr;
    if !value.is_finite() {
        return Err(Sd3Error::Input("FID is not finite".into()));
    }
    Ok(Fid { value, eps_retry: false })
}
