//! Shared helpers of the serial-lora integration tests.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::module::{ModuleMapper, Param};
use burn::nn::Linear;
use burn::prelude::*;
use serial_lora::io::{HostTensor, read_safetensors};
use serial_lora::rng::{self, StdRng};
use serial_lora::{AttentionConfig, AttentionStack, LoraLinear, QkvProjection};

/// Flex by default; LibTorch (CPU) or CUDA with the `tch` / `cuda` feature (see
/// `serial_lora::testing`).
pub type I = serial_lora::testing::Backend;
pub type B = Autodiff<I>;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/serial-lora")
}

pub fn load_fixture() -> BTreeMap<String, HostTensor> {
    read_safetensors(&fixtures().join("core.safetensors")).expect("fixture core.safetensors").0
}

pub fn tensor<Bk: Backend, const D: usize>(fx: &BTreeMap<String, HostTensor>, key: &str) -> Tensor<Bk, D> {
    fx.get(key).unwrap_or_else(|| panic!("fixture key {key} missing")).to_tensor(&Default::default())
}

/// Max |a − b| over all elements.
pub fn max_abs_diff<Bk: Backend, const D: usize>(a: Tensor<Bk, D>, b: Tensor<Bk, D>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b).abs().max().into_scalar().to_f32()
}

/// `max|a − b| / max|b|`: error relative to the largest reference value.
pub fn rel_err<Bk: Backend, const D: usize>(a: Tensor<Bk, D>, want: Tensor<Bk, D>) -> f32 {
    let scale = max_abs(want.clone()).max(f32::MIN_POSITIVE);
    max_abs_diff(a, want) / scale
}

/// Max |a| over all elements.
pub fn max_abs<Bk: Backend, const D: usize>(a: Tensor<Bk, D>) -> f32 {
    a.abs().max().into_scalar().to_f32()
}

fn set_linear<Bk: Backend>(l: LoraLinear<Bk>, fx: &BTreeMap<String, HostTensor>, key: &str) -> LoraLinear<Bk> {
    let dev = Default::default();
    let w = fx[&format!("{key}.weight")].t().to_tensor::<Bk, 2>(&dev); // [out,in] → [in,out]
    let b = fx[&format!("{key}.bias")].to_tensor::<Bk, 1>(&dev);
    LoraLinear { base: Linear { weight: Param::from_tensor(w), bias: Some(Param::from_tensor(b)) }, ..l }
}

/// The fixture's 2-block CLIPAttention stack (d = 16, 2 heads) with the reference base weights.
pub fn fixture_stack<Bk: Backend>(fx: &BTreeMap<String, HostTensor>) -> AttentionStack<Bk> {
    let mut stack = AttentionStack::new(&AttentionConfig::new(16, 2), 2, &Default::default());
    for (i, a) in stack.layers.iter_mut().enumerate() {
        let p = format!("base.encoder.layers.{i}.self_attn");
        let QkvProjection::Separate(s) = &mut a.qkv else { unreachable!() };
        s.q = set_linear(s.q.clone(), fx, &format!("{p}.q_proj"));
        s.k = set_linear(s.k.clone(), fx, &format!("{p}.k_proj"));
        s.v = set_linear(s.v.clone(), fx, &format!("{p}.v_proj"));
        a.o = a.o.take().map(|o| set_linear(o, fx, &format!("{p}.out_proj")));
    }
    stack
}

/// Replaces every `lora_b` (zero at init) with N(0, 0.2²) values drawn from a seeded generator,
/// keeping it trainable.
pub struct RandomizeB {
    pub stack: Vec<String>,
    pub rng: StdRng,
}

impl RandomizeB {
    pub fn new(seed: u64) -> Self {
        Self { stack: vec![], rng: rng::rng(seed) }
    }
}

/// A tensor of N(0, 1) values from a generator seeded with `seed` (the seed is in the test's
/// source, so a failure replays).
pub fn randn<Bk: Backend, const D: usize>(shape: [usize; D], seed: u64) -> Tensor<Bk, D> {
    rng::normal(shape, 1.0, &mut rng::rng(seed), &Default::default())
}

/// `AttentionStack::new` with every base weight and bias drawn from a generator seeded with
/// `seed`: U(±1/√in) as `LinearConfig::init` draws them.
pub fn seeded_stack<Bk: Backend>(attn: &AttentionConfig, layers: usize, seed: u64) -> AttentionStack<Bk> {
    let dev = Default::default();
    AttentionStack::<Bk>::new(attn, layers, &dev).map(&mut Reinit { rng: rng::rng(seed), fan_in: 1 })
}

/// Redraws every float parameter (weights `[in, out]` before their bias, as a `Linear` holds them).
struct Reinit {
    rng: StdRng,
    fan_in: usize,
}

impl<Bk: Backend> ModuleMapper<Bk> for Reinit {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<Bk, D>>) -> Param<Tensor<Bk, D>> {
        let shape: [usize; D] = p.lazy_shape().dims();
        if D == 2 {
            self.fan_in = shape[0];
        }
        let t = rng::uniform(shape, 1.0 / (self.fan_in as f64).sqrt(), &mut self.rng, &Default::default());
        Param::initialized(p.id, t.require_grad())
    }
}

impl<Bk: Backend> ModuleMapper<Bk> for RandomizeB {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.stack.push(name.into());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.stack.pop();
    }
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<Bk, D>>) -> Param<Tensor<Bk, D>> {
        if self.stack.last().is_some_and(|n| n == "lora_b") {
            let t = p.val();
            let r = rng::normal(t.dims(), 0.2, &mut self.rng, &t.device());
            Param::initialized(p.id, r.detach().require_grad())
        } else {
            p
        }
    }
}

/// Output, adapter gradients and input gradient of `loss = Σ out²` for a stack whose blocks each
/// run through `serial_lora::checkpoint` (checkpointed when `checkpointing`), dropout masks
/// restarted at one seed as the training loop does per micro-batch. Every value is read as f32
/// (a half gradient would fail to read).
/// `autocast`: the dtype of [`serial_lora::half::autocast`] around the forward (the backward
/// runs outside it, as in the training loops).
pub fn stack_run(m: &AttentionStack<B>, x: &Tensor<B, 3>, tracked_input: bool, checkpointing: bool, autocast: serial_lora::BaseDType) -> StackRun {
    use burn::module::{Module, ModuleVisitor};
    use serial_lora::AdaptedModel;
    struct Grads<'a> {
        grads: &'a <B as burn::tensor::backend::AutodiffBackend>::Gradients,
        out: Vec<Vec<f32>>,
    }
    impl ModuleVisitor<B> for Grads<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some(g) = p.val().grad(self.grads) {
                self.out.push(g.into_data().to_vec().unwrap());
            }
        }
    }
    let m = &m.clone().with_dropout_seed(3);
    let x = if tracked_input { x.clone().require_grad() } else { x.clone() };
    let blocks = |x: Tensor<B, 3>| m.layers.iter().fold(x, |x, a| serial_lora::checkpoint(a, x, |a, x| x.clone() + a.forward(x, None, None)));
    let out = serial_lora::with_checkpointing(checkpointing, || serial_lora::half::autocast(autocast, || blocks(x.clone())));
    let grads = (out.clone() * out.clone()).sum().backward();
    let mut v = Grads { grads: &grads, out: Vec::new() };
    m.visit(&mut v);
    (out.into_data().to_vec().unwrap(), v.out, x.grad(&grads).map(|g| g.into_data().to_vec().unwrap()))
}

/// What [`stack_run`] returns: output, adapter gradients, input gradient (when tracked).
pub type StackRun = (Vec<f32>, Vec<Vec<f32>>, Option<Vec<f32>>);

/// The adapted stacks the checkpoint and half suites compare (LoRA, Serial LoRA, fused qkv with
/// dropout, targeted blocks): name, 3-block stack with random B matrices (so that every adapter
/// parameter has a gradient), and an input.
pub fn adapted_stack_cases() -> Vec<(&'static str, AttentionStack<B>, Tensor<B, 3>)> {
    use burn::module::Module;
    use serial_lora::{AdaptedModel, AdapterConfig, Method};
    let dev = Default::default();
    let cases = [
        ("lora", AttentionConfig::new(16, 2), AdapterConfig::new(Method::Lora, 4).with_alpha(8.0)),
        ("serial", AttentionConfig::new(16, 2), AdapterConfig::new(Method::SerialLora, 4).with_alpha(8.0)),
        ("serial fused, dropout", AttentionConfig::new(12, 3).with_fused_qkv(true), AdapterConfig::new(Method::SerialLora, 3).with_dropout(0.3)),
        ("lora blocks 1, 2", AttentionConfig::new(16, 2), AdapterConfig::new(Method::Lora, 2).with_target_blocks(Some(vec![1, 2]))),
    ];
    cases
        .into_iter()
        .enumerate()
        .map(|(i, (name, attn, adapter))| {
            let base = seeded_stack::<B>(&attn, 3, 40 + i as u64);
            let m = base.with_adapters(&adapter, 7, &dev).unwrap().map(&mut RandomizeB::new(50 + i as u64));
            (name, m, randn::<B, 3>([2, 9, attn.d_model], 60 + i as u64))
        })
        .collect()
}
