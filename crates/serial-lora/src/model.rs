//! Model-level adapter operations over every attention block of a model: attach, merge,
//! unmerge, and the block list that adapter files and spectrum analysis walk.
use burn::module::Module;
use burn::prelude::*;

use crate::attention::{Attention, AttentionConfig};
use crate::config::AdapterConfig;
use crate::error::{Error, Result};

/// HF names of an attention block's projections (adapter-file keys are built from them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjNames {
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    /// Name of the fused projection when the block fuses q, k, v.
    pub qkv: &'static str,
    pub o: &'static str,
    /// Key infix of the block's Serial LoRA pair (`<path>.<serial>lora_A.weight`): `serial_`,
    /// or another name where two streams of one attention module each carry a pair.
    pub serial: &'static str,
}

/// [`AttentionStack`]'s projection names with separate Q, K, V: `q_proj`, `k_proj`, `v_proj`,
/// `out_proj` (transformers' CLIP naming, so PEFT's own tools read the stack's adapter files).
pub const STACK_SEPARATE_NAMES: ProjNames = ProjNames { q: "q_proj", k: "k_proj", v: "v_proj", qkv: "qkv", o: "out_proj", serial: "serial_" };
/// [`AttentionStack`]'s projection names with a fused `qkv` and output `proj` (as transformers'
/// SAM vision attention).
pub const STACK_FUSED_NAMES: ProjNames = ProjNames { q: "q", k: "k", v: "v", qkv: "qkv", o: "proj", serial: "serial_" };

/// One adaptable attention block of a model.
pub struct AttentionSite<'a, B: Backend> {
    /// HF module path of the attention module, e.g. `vision_model.encoder.layers.3.self_attn`.
    pub path: String,
    pub names: ProjNames,
    pub attention: &'a Attention<B>,
}

/// A model whose attention blocks carry adapters. Each model crate implements it once.
pub trait AdaptedModel<B: Backend>: Module<B> + Sized {
    /// Every adaptable attention block, in a fixed order (the `target_blocks` indices).
    fn attention_sites(&self) -> Vec<AttentionSite<'_, B>>;

    /// Rebuilds the model with block `i` (same order) replaced by `f(i, block)`.
    fn try_map_attention(self, f: &mut dyn FnMut(usize, Attention<B>) -> Result<Attention<B>>) -> Result<Self>;

    /// Attaches fresh adapters per `cfg` to the targeted blocks and freezes every base weight
    /// (including parameters outside the attention blocks). The A matrices are drawn from a
    /// `StdRng` seeded with `seed`, block by block (see [`crate::rng`]); the dropout streams start
    /// at [`AdaptedModel::with_dropout_seed`] of a sub-stream of `seed`.
    fn with_adapters(self, cfg: &AdapterConfig, seed: u64, device: &B::Device) -> Result<Self> {
        cfg.validate()?;
        cfg.check_blocks(self.attention_sites().len())?;
        // refuse before allocating: A [r, d] and B [d, r] for each of up to 4 projections of
        // every targeted block (widths are the blocks' input width)
        let mut total = 0u64;
        for (i, site) in self.attention_sites().iter().enumerate().filter(|(i, _)| cfg.targets_block(*i)) {
            let pair = crate::parse::elements(
                &format!("an adapter pair of block {i}"),
                &[("rank", cfg.rank), ("model width", site.attention.d_model()), ("A and B", 2)],
            )
            .map_err(|m| Error::config("rank", cfg.rank, m))?;
            total = total.saturating_add(pair.saturating_mul(4));
        }
        if total > crate::parse::MAX_TENSOR_ELEMENTS {
            return Err(Error::config(
                "rank",
                cfg.rank,
                format!("the adapters would have about {total} parameters, more than the limit of {}", crate::parse::MAX_TENSOR_ELEMENTS),
            ));
        }
        let mut rng = crate::rng::rng(seed);
        let adapted = self.no_grad().try_map_attention(&mut |i, a| if cfg.targets_block(i) { a.with_adapter(cfg, &mut rng, device) } else { Ok(a) })?;
        Ok(adapted.with_dropout_seed(crate::rng::substream(seed, u64::MAX)))
    }

    /// Restarts the dropout masks of every adapter pair at `seed`: pair `k` of the model (blocks
    /// in order, [`Attention::pairs`] order within a block) draws from stream `(seed, k)`. A
    /// training loop calls it once per micro-batch with that micro-batch's seed, so the masks
    /// depend on (seed, step) only: not on what ran before in the process, nor on other threads.
    fn with_dropout_seed(self, seed: u64) -> Self {
        let mut k = 0u64;
        let reseeded = self.try_map_attention(&mut |_, mut a| {
            for p in a.pairs_mut() {
                p.dropout.reseed(seed, k);
                k += 1;
            }
            Ok(a)
        });
        match reseeded {
            Ok(m) => m,
            Err(e) => unreachable!("reseeding the dropout streams cannot fail: {e}"),
        }
    }

    /// Folds every adapter into the base weights (see [`Attention::merge`]).
    fn merge_adapters(self) -> Result<Self> {
        let paths = self.site_paths();
        self.try_map_attention(&mut |i, a| a.merge().map_err(|e| e.in_module(&paths[i])))
    }

    /// Undoes [`AdaptedModel::merge_adapters`].
    fn unmerge_adapters(self) -> Result<Self> {
        let paths = self.site_paths();
        self.try_map_attention(&mut |i, a| a.unmerge().map_err(|e| e.in_module(&paths[i])))
    }

    /// Merges and removes the adapters: the base model's architecture and cost.
    fn merge_and_unload(self) -> Result<Self> {
        let paths = self.site_paths();
        self.try_map_attention(&mut |i, a| a.merge_and_unload().map_err(|e| e.in_module(&paths[i])))
    }

    /// The HF paths of the attention blocks, in order.
    fn site_paths(&self) -> Vec<String> {
        self.attention_sites().into_iter().map(|s| s.path).collect()
    }
}

/// A plain stack of attention blocks applied in sequence (`x ← x + attn(x)`), named like a
/// transformers encoder: `<prefix>.<i>.self_attn`. Used by tests, examples and benchmarks of the
/// adapter machinery without a full model.
#[derive(Module, Debug)]
pub struct AttentionStack<B: Backend> {
    pub layers: Vec<Attention<B>>,
}

impl<B: Backend> AttentionStack<B> {
    /// `num_layers` blocks of the given shape with random base weights.
    pub fn new(cfg: &AttentionConfig, num_layers: usize, device: &B::Device) -> Self {
        Self { layers: (0..num_layers).map(|_| cfg.init(device)).collect() }
    }

    /// `[batch, tokens, d]` → `[batch, tokens, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.layers.iter().fold(x, |x, a| x.clone() + a.forward(x, None, None))
    }

    /// The HF path prefix of the blocks.
    pub const PREFIX: &'static str = "encoder.layers";
}

impl<B: Backend> AdaptedModel<B> for AttentionStack<B> {
    fn attention_sites(&self) -> Vec<AttentionSite<'_, B>> {
        let names = |a: &Attention<B>| match a.qkv {
            crate::attention::QkvProjection::Fused(_) => STACK_FUSED_NAMES,
            crate::attention::QkvProjection::Separate(_) => STACK_SEPARATE_NAMES,
        };
        let attention = self.layers.iter().enumerate();
        attention.map(|(i, a)| AttentionSite { path: format!("{}.{i}.self_attn", Self::PREFIX), names: names(a), attention: a }).collect()
    }

    fn try_map_attention(self, f: &mut dyn FnMut(usize, Attention<B>) -> Result<Attention<B>>) -> Result<Self> {
        let layers = self.layers.into_iter().enumerate().map(|(i, a)| f(i, a)).collect::<Result<_, Error>>()?;
        Ok(Self { layers })
    }
}
