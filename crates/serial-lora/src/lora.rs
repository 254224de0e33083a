//! LoRA with PEFT semantics: a frozen base `Linear` plus low-rank (A, B) pairs.
//!
//! Upstream: PEFT `src/peft/tuners/lora/layer.py` (`LoraLayer`, `Linear`), v0.17.
//! PEFT: `y = base(x) + s·lora_B(lora_A(dropout(x)))` with `lora_A.weight ∈ [r, in]`,
//! `lora_B.weight ∈ [out, r]`. Here A and B are stored in Burn's `[in, out]` layout
//! (`lora_a ∈ [in, r]`, `lora_b ∈ [r, out]`); [`crate::io`] transposes at the file boundary.
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::prelude::*;

use crate::config::{AdapterConfig, Init};
use crate::error::{Error, Result};
use crate::half::{self, as_dtype_of};
use crate::layers::{matmul, on_rows};
use crate::rng::{self, AdapterDropout, StdRng};

/// One low-rank pair: `delta(x) = s·(dropout(x)·A)·B`.
#[derive(Module, Debug)]
pub struct LoraPair<B: Backend> {
    /// A, `[in, r]` (PEFT's `lora_A.weight` transposed).
    pub lora_a: Param<Tensor<B, 2>>,
    /// B, `[r, out]` (PEFT's `lora_B.weight` transposed); starts at zero.
    pub lora_b: Param<Tensor<B, 2>>,
    /// Dropout on the pair's input, with masks from an explicit seed ([`crate::rng`]).
    pub dropout: AdapterDropout,
    /// s = alpha / r (or alpha / √r).
    pub scale: f64,
    /// Whether `s·A·B` has been folded into the base weight (then `delta` is not applied).
    pub merged: bool,
}

impl<B: Backend> LoraPair<B> {
    /// A fresh pair for a `d_in → d_out` map: A random per `cfg.init` (drawn from `rng` on the
    /// host, row-major), B zero, trainable.
    ///
    /// The tensors are created eagerly: a lazy Burn param is re-initialized by every `clone()`,
    /// which would give replicas (and clones kept for comparison) different A matrices.
    pub fn init(d_in: usize, d_out: usize, cfg: &AdapterConfig, rng: &mut StdRng, device: &B::Device) -> Self {
        let r = cfg.rank;
        let a = match cfg.init {
            // kaiming_uniform_(a=√5) on [r, in]: gain √(2/(1+5)), bound gain·√(3/in) = 1/√in.
            Init::KaimingUniform => rng::uniform([d_in, r], 1.0 / (d_in as f64).sqrt(), rng, device),
            Init::Gaussian => rng::normal([d_in, r], 1.0 / r as f64, rng, device),
        };
        Self::from_tensors(a, Tensor::zeros([r, d_out], device), cfg.scale(), cfg.dropout)
    }

    /// A pair from given tensors in Burn layout (`a ∈ [in, r]`, `b ∈ [r, out]`), trainable.
    pub fn from_tensors(a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64, dropout: f64) -> Self {
        Self { lora_a: Param::from_tensor(a.detach()), lora_b: Param::from_tensor(b.detach()), dropout: AdapterDropout::new(dropout), scale, merged: false }
    }

    /// Rank r.
    pub fn rank(&self) -> usize {
        self.lora_a.lazy_shape().dims::<2>()[1]
    }

    /// `s·(dropout(x)·A)·B` for `x ∈ [..., in]`, computed as `(s·(dropout(x)·A))·B`: the scale
    /// on the rank-r intermediate (`r/out` of the multiplications, forward and backward; exact
    /// for s = 1 and powers of two, else a rounding-level difference) and the products 2-D.
    /// Dropout is active only under autodiff; each call draws the next mask of the pair's
    /// stream ([`AdapterDropout`]).
    pub fn delta<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = self.dropout.forward(x);
        on_rows(x, |x| matmul(matmul(x, self.lora_a.val()).mul_scalar(self.scale), self.lora_b.val()))
    }

    /// The dense update `s·A·B ∈ [in, out]`, detached from the autodiff graph.
    pub fn weight_delta(&self) -> Tensor<B, 2> {
        self.lora_a.val().detach().matmul(self.lora_b.val().detach()).mul_scalar(self.scale)
    }
}

/// Replaces the value of a frozen parameter, keeping its id and its dtype (a half base stays
/// half: `value` is computed in f32 and rounded).
pub(crate) fn replace_frozen<const D: usize, B: Backend>(param: Param<Tensor<B, D>>, value: Tensor<B, D>) -> Param<Tensor<B, D>> {
    let dtype = param.val().dtype();
    Param::initialized(param.id, as_dtype_of(value.detach(), dtype)).set_require_grad(false)
}

/// Fails with [`Error::NonFiniteMerge`] if `w` holds NaN or ±inf.
pub(crate) fn check_finite<B: Backend>(w: &Tensor<B, 2>, module: &str) -> Result<()> {
    let finite = w.clone().is_finite().all().into_scalar().to_bool();
    if finite { Ok(()) } else { Err(Error::NonFiniteMerge { module: module.to_string() }) }
}

/// A frozen `Linear` with an optional LoRA pair (PEFT `lora.Linear`).
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// The frozen base layer, weight `[in, out]`.
    pub base: Linear<B>,
    pub lora: Option<LoraPair<B>>,
}

impl<B: Backend> LoraLinear<B> {
    /// Wraps a base layer without an adapter.
    pub fn new(base: Linear<B>) -> Self {
        Self { base, lora: None }
    }

    /// `[in, out]` of the base weight.
    pub fn dims(&self) -> [usize; 2] {
        let d = self.base.weight.lazy_shape().dims::<2>();
        [d[0], d[1]]
    }

    /// Freezes the base layer and attaches a fresh pair.
    pub fn with_lora(self, cfg: &AdapterConfig, rng: &mut StdRng, device: &B::Device) -> Self {
        let [d_in, d_out] = self.dims();
        Self { base: self.base.no_grad(), lora: Some(LoraPair::init(d_in, d_out, cfg, rng, device)) }
    }

    /// `x·W + b + s·(dropout(x)·A)·B`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        on_rows(x, |x| match &self.lora {
            Some(l) if !l.merged => half::linear(&self.base, x.clone()) + l.delta(x),
            _ => half::linear(&self.base, x),
        })
    }

    /// Folds the pair into the base weight: `W ← W + s·A·B`. Refuses non-finite results.
    pub fn merge(mut self, name: &str) -> Result<Self> {
        let Some(mut lora) = self.lora.take() else { return Ok(self) };
        if lora.merged {
            return Err(Error::MergeState { module: name.into(), message: "already merged" });
        }
        let w = half::f32(self.base.weight.val().detach()) + lora.weight_delta();
        check_finite(&w, name)?;
        self.base.weight = replace_frozen(self.base.weight, w);
        lora.merged = true;
        self.lora = Some(lora);
        Ok(self)
    }

    /// Subtracts a merged pair from the base weight again: `W ← W − s·A·B`.
    pub fn unmerge(mut self, name: &str) -> Result<Self> {
        let Some(mut lora) = self.lora.take() else { return Ok(self) };
        if !lora.merged {
            return Err(Error::MergeState { module: name.into(), message: "not merged" });
        }
        let w = half::f32(self.base.weight.val().detach()) - lora.weight_delta();
        self.base.weight = replace_frozen(self.base.weight, w);
        lora.merged = false;
        self.lora = Some(lora);
        Ok(self)
    }
}

/// A frozen fused `qkv` linear (`[in, 3·d]`) with up to three separate LoRA pairs whose
/// outputs add onto the q, k and v slices — so the parameter count equals separate Q, K, V.
#[derive(Module, Debug)]
pub struct FusedQkv<B: Backend> {
    pub base: Linear<B>,
    pub q: Option<LoraPair<B>>,
    pub k: Option<LoraPair<B>>,
    pub v: Option<LoraPair<B>>,
}

impl<B: Backend> FusedQkv<B> {
    pub fn new(base: Linear<B>) -> Self {
        Self { base, q: None, k: None, v: None }
    }

    /// `[in, d]`: input width and the width of one slice.
    pub fn slice_dims(&self) -> [usize; 2] {
        let d = self.base.weight.lazy_shape().dims::<2>();
        [d[0], d[1] / 3]
    }

    /// The three pairs in q, k, v order.
    pub fn pairs(&self) -> [Option<&LoraPair<B>>; 3] {
        [self.q.as_ref(), self.k.as_ref(), self.v.as_ref()]
    }

    /// `x·W + b`, plus each unmerged pair's delta on its slice.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        on_rows(x, |x| self.forward_rows(x))
    }

    fn forward_rows<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let active = self.pairs().map(|p| p.filter(|p| !p.merged));
        if active.iter().all(Option::is_none) {
            return half::linear(&self.base, x);
        }
        let y = half::linear(&self.base, x.clone());
        let mut shape = x.dims();
        shape[D - 1] = self.slice_dims()[1];
        let parts: Vec<Tensor<B, D>> = active
            .iter()
            .map(|p| match p {
                Some(p) => p.delta(x.clone()),
                None => Tensor::zeros(shape, &x.device()),
            })
            .collect();
        y + Tensor::cat(parts, D - 1)
    }

    fn apply_deltas(mut self, name: &str, merged: bool) -> Result<Self> {
        let [d_in, d] = self.slice_dims();
        let mut w = half::f32(self.base.weight.val().detach());
        let mut pairs = [self.q.take(), self.k.take(), self.v.take()];
        for (i, pair) in pairs.iter_mut().enumerate() {
            let Some(p) = pair else { continue };
            if p.merged == merged {
                let message = if merged { "already merged" } else { "not merged" };
                return Err(Error::MergeState { module: name.into(), message });
            }
            let cols = i * d..(i + 1) * d;
            let slice = w.clone().slice([0..d_in, cols.clone()]);
            let updated = if merged { slice + p.weight_delta() } else { slice - p.weight_delta() };
            w = w.slice_assign([0..d_in, cols], updated);
        }
        if merged {
            check_finite(&w, name)?;
        }
        for p in pairs.iter_mut().flatten() {
            p.merged = merged;
        }
        let [q, k, v] = pairs;
        self.base.weight = replace_frozen(self.base.weight, w);
        Ok(Self { q, k, v, ..self })
    }

    /// Folds every pair into its slice of the fused weight.
    pub fn merge(self, name: &str) -> Result<Self> {
        self.apply_deltas(name, true)
    }

    /// Removes merged pairs from the fused weight again.
    pub fn unmerge(self, name: &str) -> Result<Self> {
        self.apply_deltas(name, false)
    }
}
