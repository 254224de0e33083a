//! Serial LoRA (Zhong et al., "Serial Low-rank Adaptation of Vision Transformer", ICME 2025,
//! arXiv 2503.17750): one shared low-rank pair per attention block, applied to the attention
//! input before the frozen Q, K, V projections: `h' = h + s·(dropout(h)·A)·B`.
//!
//! Merging folds it into the projections: with Burn's `[in, out]` layout `q = h'·W_q` and
//! `h' = h·(I + s·A·B)`, so `W_q ← (I + s·A·B)·W_q = W_q + s·A·(B·W_q)` (PyTorch layout:
//! `W_q (I + s B A)`). Unmerging uses Woodbury:
//! `(I + s·A·B)⁻¹ = I − s·A·(I_r + s·B·A)⁻¹·B`, an r×r inverse computed on the host in f64.
use burn::module::Module;
use burn::prelude::*;

use crate::config::AdapterConfig;
use crate::error::{Error, Result};
use crate::host_f64;
use crate::layers::on_rows;
use crate::lora::LoraPair;
use crate::rng::StdRng;

/// The shared pre-projection transform of one attention block.
#[derive(Module, Debug)]
pub struct SerialLora<B: Backend> {
    /// A `[d, r]`, B `[r, d]` with d the attention input width.
    pub pair: LoraPair<B>,
}

impl<B: Backend> SerialLora<B> {
    /// A fresh transform for attention input width `d` (A random, B zero).
    pub fn init(d: usize, cfg: &AdapterConfig, rng: &mut StdRng, device: &B::Device) -> Self {
        Self { pair: LoraPair::init(d, d, cfg, rng, device) }
    }

    /// `h + s·(dropout(h)·A)·B`; the identity once merged.
    pub fn forward<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D> {
        if self.pair.merged { h } else { on_rows(h, |h| h.clone() + self.pair.delta(h)) }
    }

    /// `W ← (I + s·A·B)·W` for a projection weight `W ∈ [d, out]`.
    pub fn merge_into(&self, w: Tensor<B, 2>) -> Tensor<B, 2> {
        let (a, b) = (self.pair.lora_a.val().detach(), self.pair.lora_b.val().detach());
        w.clone() + a.matmul(b.matmul(w)).mul_scalar(self.pair.scale)
    }

    /// `W ← (I + s·A·B)⁻¹·W = W − s·A·(I_r + s·B·A)⁻¹·(B·W)`, all in f64 on the host (in f32 the
    /// cancellation against a large adapter left up to ~1e-5 of the weights' scale).
    pub fn unmerge_from(&self, w: Tensor<B, 2>, name: &str) -> Result<Tensor<B, 2>> {
        use nalgebra::DMatrix;
        let (a, b) = (self.pair.lora_a.val().detach(), self.pair.lora_b.val().detach());
        let (s, r) = (self.pair.scale, self.pair.rank());
        let ([d, out], device) = (w.dims(), w.device());
        let a = DMatrix::<f64>::from_row_slice(d, r, &host_f64(a));
        let b = DMatrix::<f64>::from_row_slice(r, d, &host_f64(b));
        let w = DMatrix::<f64>::from_row_slice(d, out, &host_f64(w));
        // I + s·B·A is invertible exactly when I + s·A·B is (same non-unit eigenvalues).
        let inv = (&b * &a * s + DMatrix::identity(r, r))
            .try_inverse()
            .ok_or(Error::MergeState { module: name.into(), message: "I + s·B·A is singular: the merged weights cannot be unmerged" })?;
        let w0 = &w - &a * (inv * (&b * &w)) * s;
        let data: Vec<f32> = w0.transpose().iter().map(|&x| x as f32).collect(); // row-major
        Ok(Tensor::from_data(TensorData::new(data, [d, out]), &device))
    }
}
