//! Explicit, seeded randomness: every random draw of the library comes from a generator or seed
//! its caller passes in, never from Burn's process-wide generator (so two runs, tests or
//! data-parallel peers in one process cannot disturb each other's draws).
//!
//! - Adapter initialization ([`crate::AdaptedModel::with_adapters`]) draws the A matrices from a
//!   [`StdRng`] seeded by the caller, on the host, in a fixed order (block by block, the pairs of
//!   a block in Serial, q, k, v, o order, each A row-major), then uploads them.
//! - Adapter dropout ([`AdapterDropout`]) draws its masks from a counter-based hash of (the
//!   micro-batch's dropout seed, the pair's index in the model, the mask's index since the seed
//!   was set, the element index): the training driver sets the seed once per micro-batch through
//!   [`crate::AdaptedModel::with_dropout_seed`]; `forward` stays `&self`.
use std::sync::atomic::{AtomicU64, Ordering};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::backend::BackendTypes;
use rand::RngExt;

use crate::prim::{cast, prim, return_on_autodiff, tensor};
pub use rand::SeedableRng;
pub use rand::rngs::StdRng;

/// The golden-ratio increment of SplitMix64.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finalizer: a bijective 64-bit mix whose outputs pass BigCrush as a sequence
/// over consecutive inputs.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed for sub-stream `index` of `seed` (distinct indices give unrelated streams).
pub fn substream(seed: u64, index: u64) -> u64 {
    mix(seed ^ mix(index.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// A seed named by a string (FNV-1a, mixed): e.g. a parameter's path in a test.
pub fn named(name: &str) -> u64 {
    mix(name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)))
}

/// A generator for `seed` (rand's `StdRng`: reproducible for the pinned rand version).
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in `[-bound, bound)`.
pub fn uniform_values(n: usize, bound: f64, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect()
}

/// `n` values from `N(0, std²)` (Box–Muller in f64).
pub fn normal_values(n: usize, std: f64, rng: &mut StdRng) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // u1 in (0, 1]: ln(u1) is finite
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// A tensor of `shape` uniform in `[-bound, bound)`, drawn from `rng` on the host.
pub fn uniform<B: Backend, const D: usize>(shape: [usize; D], bound: f64, rng: &mut StdRng, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(uniform_values(shape.iter().product(), bound, rng), shape), device)
}

/// A tensor of `shape` from `N(0, std²)`, drawn from `rng` on the host.
pub fn normal<B: Backend, const D: usize>(shape: [usize; D], std: f64, rng: &mut StdRng, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(normal_values(shape.iter().product(), std, rng), shape), device)
}

/// Inverted dropout on an adapter's input (PEFT's `lora_dropout`), with masks from an explicit
/// seed instead of Burn's global generator. Active only under autodiff, as `burn::nn::Dropout`.
///
/// Mask `m` (the `m`-th drawn since the seed was set: a pair applied to several inputs in one
/// forward draws one mask each) keeps element `i` when the 32-bit word `i` of the stream
/// `mix(key' + (j + 1)·φ)`, `j = i / 2`, `key' = substream(key, m)` (SplitMix64 over a counter,
/// two words per output) is below `keep·2³²`; kept elements are scaled by `1 / keep`, so the
/// mask is one `{0, 1/keep}` tensor and the dropout a single product. Being counter-based, the
/// masks are filled in parallel chunks and do not depend on the thread count.
#[derive(Debug)]
pub struct AdapterDropout {
    /// Probability of zeroing an element.
    pub prob: f64,
    /// The stream of this pair for the current seed ([`AdapterDropout::reseed`]).
    key: u64,
    /// Masks drawn since the key was set.
    draws: AtomicU64,
}

impl Clone for AdapterDropout {
    /// A copy at the same place of the same stream (the clone and the original then draw the same
    /// masks, as two copies of a seeded generator do).
    fn clone(&self) -> Self {
        Self { prob: self.prob, key: self.key, draws: AtomicU64::new(self.draws.load(Ordering::Relaxed)) }
    }
}

impl AdapterDropout {
    /// Dropout with probability `prob` (checked by [`crate::AdapterConfig::validate`]), stream 0.
    pub fn new(prob: f64) -> Self {
        Self { prob, key: 0, draws: AtomicU64::new(0) }
    }

    /// Restarts the masks at stream `index` of `seed` (`index`: the pair's place in the model).
    pub fn reseed(&mut self, seed: u64, index: u64) {
        self.key = substream(seed, index);
        *self.draws.get_mut() = 0;
    }

    /// `x ⊙ mask / keep` under autodiff with `prob > 0`; `x` otherwise. On the autodiff
    /// backends of this build the backward draws the mask again from its key instead of keeping
    /// it (one f32 tensor of `x`'s size less per adapted projection until the backward); the
    /// same products either way.
    pub fn forward<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if self.prob == 0.0 || !B::ad_enabled(&x.device()) {
            return x;
        }
        let mask = Mask { key: substream(self.key, self.draws.fetch_add(1, Ordering::Relaxed)), keep: 1.0 - self.prob, shape: x.dims().to_vec() };
        return_on_autodiff!(B, IB => mask.apply::<IB, B, D>(x));
        let device = x.device();
        x * Tensor::from_data(mask.data(), &device)
    }
}

/// One drawn dropout mask, by its key: `{0, 1/keep}` values of `shape`.
#[derive(Clone, Debug)]
struct Mask {
    key: u64,
    keep: f64,
    shape: Vec<usize>,
}

impl Mask {
    fn data(&self) -> TensorData {
        let mut data = vec![0f32; self.shape.iter().product()];
        fill_mask(&mut data, self.key, self.keep);
        TensorData::new(data, self.shape.clone())
    }

    /// `x ⊙ mask` on `Autodiff<IB>`, recorded with the backward `dx = dy ⊙ mask` (the mask drawn
    /// again there).
    fn apply<IB: Backend, B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        let xa: <Autodiff<IB> as BackendTypes>::FloatTensorPrimitive = cast(prim(x));
        let device = IB::float_device(&xa.primitive);
        let y = IB::float_mul(xa.primitive, IB::float_from_data(self.data(), &device));
        let out = match Backward::<IB, 1>::prepare::<NoCheckpointing>(self, [xa.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(device, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        tensor(cast(out))
    }
}

impl<IB: Backend> Backward<IB, 1> for Mask {
    /// The device of the mask.
    type State = IB::Device;

    fn backward(self, ops: Ops<IB::Device, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<IB>(&ops.node);
        if let [Some(node)] = &ops.parents {
            // `x * mask`'s own backward multiplies by the same values: the same bits
            grads.register::<IB>(node.id, IB::float_mul(dy, IB::float_from_data(self.data(), &ops.state)));
        }
    }
}

/// Fills `out` with mask values for stream `key` (see [`AdapterDropout`]).
fn fill_mask(out: &mut [f32], key: u64, keep: f64) {
    // keep·2³² as the bound on a 32-bit word (keep = 1 keeps every word)
    let bound = (keep * 4_294_967_296.0).min(u64::MAX as f64) as u64;
    let scale = (1.0 / keep) as f32;
    let fill = |start: usize, chunk: &mut [f32]| {
        // start is even: chunk element 2k + h is word h of counter start / 2 + k
        let mut j = (start / 2) as u64;
        for pair in chunk.chunks_mut(2) {
            j += 1;
            let w = mix(key.wrapping_add(j.wrapping_mul(GOLDEN)));
            for (h, v) in pair.iter_mut().enumerate() {
                let word = if h == 0 { w & 0xFFFF_FFFF } else { w >> 32 };
                *v = if word < bound { scale } else { 0.0 };
            }
        }
    };
    const CHUNK: usize = 1 << 16;
    #[cfg(feature = "flex")]
    {
        use rayon::prelude::*;
        if out.len() > CHUNK {
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| fill(c * CHUNK, chunk));
            return;
        }
    }
    for (c, chunk) in out.chunks_mut(CHUNK).enumerate() {
        fill(c * CHUNK, chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_the_expected_share_and_do_not_depend_on_chunking() {
        let n = 300_001;
        let mut a = vec![0f32; n];
        fill_mask(&mut a, 42, 0.75);
        let kept = a.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.75).abs() < 0.005, "{kept}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        // a shorter mask (one chunk, one thread) is a prefix of the longer (parallel chunks)
        let mut b = vec![0f32; 1001];
        fill_mask(&mut b, 42, 0.75);
        assert_eq!(a[..1001], b[..]);
        // element i of a later chunk: word i % 2 of counter i / 2 + 1
        for i in [65_536usize, 100_001, 299_999] {
            let w = mix(42u64.wrapping_add((i as u64 / 2 + 1).wrapping_mul(GOLDEN)));
            let word = if i % 2 == 0 { w & 0xFFFF_FFFF } else { w >> 32 };
            assert_eq!(a[i] != 0.0, word < (0.75 * 4_294_967_296.0) as u64, "{i}");
        }
        let mut c = vec![0f32; n];
        fill_mask(&mut c, 43, 0.75);
        assert_ne!(a, c);
    }

    #[test]
    fn normal_values_have_the_asked_spread() {
        let v = normal_values(100_001, 0.5, &mut rng(1));
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01 && (var.sqrt() - 0.5).abs() < 0.01, "{mean} {var}");
        assert_eq!(v, normal_values(100_001, 0.5, &mut rng(1)));
    }
}
