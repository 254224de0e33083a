//! Spectrum analysis (paper Fig. 3): singular values of the effective Q, K, V weights per block,
//! for a base, LoRA-adapted or Serial-LoRA-adapted model (adapters folded in, merged or not).
//! Computed on the host in f64 with nalgebra's SVD.
use burn::prelude::*;
use serde::Serialize;

use crate::model::AdaptedModel;

/// Singular values of one projection of one block, largest first.
#[derive(Clone, Debug, Serialize)]
pub struct ProjectionSpectrum {
    /// HF path of the attention module.
    pub block: String,
    /// `q`, `k` or `v`.
    pub projection: &'static str,
    pub singular_values: Vec<f64>,
}

/// Singular values of a matrix, largest first (f64 on the host).
pub fn singular_values<B: Backend>(w: Tensor<B, 2>) -> Vec<f64> {
    let [m, n] = w.dims();
    let data = crate::host_f64(w);
    let mut sv: Vec<f64> = nalgebra::DMatrix::<f64>::from_row_slice(m, n, &data).singular_values().iter().copied().collect();
    sv.sort_by(|a, b| b.total_cmp(a));
    sv
}

/// Spectra of the effective q, k, v weights of every attention block of `model`.
pub fn qkv_spectra<B: Backend, M: AdaptedModel<B>>(model: &M) -> Vec<ProjectionSpectrum> {
    model
        .attention_sites()
        .into_iter()
        .flat_map(|site| {
            let ws = site.attention.effective_qkv_weights();
            let path = site.path;
            ["q", "k", "v"].into_iter().zip(ws).map(move |(projection, w)| ProjectionSpectrum {
                block: path.clone(),
                projection,
                singular_values: singular_values(w),
            })
        })
        .collect()
}
