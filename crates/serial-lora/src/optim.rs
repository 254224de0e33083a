//! LoRA+ (Hayou et al. 2024): AdamW with the B matrices at `lr × ratio`.
//!
//! Upstream: PEFT `src/peft/optimizers/loraplus.py::create_loraplus_optimizer` — parameters named
//! `lora_B` and every trainable 1-D parameter go to the group with `lr × loraplus_lr_ratio`, the
//! rest keep `lr`. Burn 0.21 has no parameter groups, so [`LoraPlus`] steps one inner optimizer
//! twice per step with disjoint gradient sets (state stays in one record). Works in a plain
//! loop and in burn-train's `Learner` (it is an [`Optimizer`]).
//!
//! Difference from PEFT: PEFT exempts biases and norm weights from weight decay
//! (`groupB_no_decay`); here the decay is the inner optimizer's for every parameter. The
//! adapters of this crate have no trainable 1-D parameters, so LoRA / Serial LoRA training
//! is identical.
use std::marker::PhantomData;

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamW, AdamWConfig, GradientsParams, MultiGradientsParams, Optimizer, adaptor::OptimizerAdaptor};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

/// PyTorch's `torch.optim.AdamW` defaults (betas 0.9/0.999, eps 1e-8, weight decay 1e-2);
/// Burn's own defaults differ (eps 1e-5, weight decay 1e-4).
pub fn adamw_pytorch_defaults() -> AdamWConfig {
    AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.999).with_epsilon(1e-8).with_weight_decay(1e-2)
}

/// Whether a parameter goes to LoRA+'s fast group: a `lora_b` matrix or any 1-D parameter.
pub fn is_loraplus_b(path: &str, ndim: usize) -> bool {
    path.ends_with("lora_b") || ndim == 1
}

/// LoRA+ wrapper around any optimizer: B-group gradients are applied with `lr × ratio`.
#[derive(Clone)]
pub struct LoraPlus<O, M, B> {
    inner: O,
    ratio: f64,
    _p: PhantomData<fn() -> (M, B)>,
}

impl<O, M, B> LoraPlus<O, M, B> {
    /// Wraps `inner`; `ratio` = lr_B / lr_A (the paper: 20, PEFT's docs: 16).
    pub fn new(inner: O, ratio: f64) -> Self {
        Self { inner, ratio, _p: PhantomData }
    }
    pub fn ratio(&self) -> f64 {
        self.ratio
    }
}

/// AdamW with PyTorch defaults, wrapped for LoRA+ (`ratio = 1` gives plain AdamW).
pub fn loraplus_adamw<B: AutodiffBackend, M: AutodiffModule<B>>(config: &AdamWConfig, ratio: f64) -> LoraPlus<OptimizerAdaptor<AdamW, M, B>, M, B> {
    LoraPlus::new(config.init::<B, M>(), ratio)
}

/// Moves the B-group gradients out of `grads` into a second set.
struct SplitB<'a, B: AutodiffBackend> {
    stack: Vec<String>,
    from: &'a mut GradientsParams,
    to: GradientsParams,
    _b: PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SplitB<'_, B> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if is_loraplus_b(&self.stack.join("."), D)
            && let Some(g) = self.from.remove::<B::InnerBackend, D>(p.id)
        {
            self.to.register::<B::InnerBackend, D>(p.id, g);
        }
    }
}

fn split_b<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M, grads: &mut GradientsParams) -> GradientsParams {
    let mut v = SplitB::<B> { stack: Vec::new(), from: grads, to: GradientsParams::new(), _b: PhantomData };
    module.visit(&mut v);
    v.to
}

/// The ids of the B-group parameters of `module`.
pub fn loraplus_b_ids<B: Backend, M: burn::module::Module<B>>(module: &M) -> Vec<ParamId> {
    crate::params::param_infos(module).into_iter().filter(|p| is_loraplus_b(&p.path, p.ndim)).map(|p| p.id).collect()
}

impl<O, M, B> Optimizer<M, B> for LoraPlus<O, M, B>
where
    O: Optimizer<M, B>,
    M: AutodiffModule<B>,
    B: AutodiffBackend,
{
    type Record = O::Record;

    fn step(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> M {
        if self.ratio == 1.0 {
            return self.inner.step(lr, module, grads);
        }
        let grads_b = split_b::<B, M>(&module, &mut grads);
        let module = self.inner.step(lr, module, grads);
        self.inner.step(lr * self.ratio, module, grads_b)
    }

    fn step_multi(&mut self, lr: f64, module: M, grads: MultiGradientsParams) -> M {
        if self.ratio == 1.0 {
            return self.inner.step_multi(lr, module, grads);
        }
        let mut rest = MultiGradientsParams::default();
        let mut fast = MultiGradientsParams::default();
        for (mut g, device) in grads.grads {
            let b = split_b::<B, M>(&module, &mut g);
            rest.grads.push((g, device));
            fast.grads.push((b, device));
        }
        let module = self.inner.step_multi(lr, module, rest);
        self.inner.step_multi(lr * self.ratio, module, fast)
    }

    fn to_record(&self) -> Self::Record {
        self.inner.to_record()
    }

    fn load_record(mut self, record: Self::Record) -> Self {
        self.inner = self.inner.load_record(record);
        self
    }
}
