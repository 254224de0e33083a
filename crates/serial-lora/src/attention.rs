//! The one multi-head attention block with adapters, shared by the CLIP, SAM and SD3 crates.
//!
//! Upstream shapes: transformers `CLIPAttention` (separate `q_proj`, `k_proj`, `v_proj`,
//! `out_proj`), `SamVisionAttention` (fused `qkv` + `proj`, additive relative-position bias),
//! `SamAttention` (cross-attention with a downsampled inner width), diffusers `Attention` +
//! `JointAttnProcessor2_0` (SD3: two streams, qk-norm between projection and attention).
//! Models that need a step between projection and attention (qk-norm, a bias computed from q)
//! call [`Attention::qkv`], [`Attention::split_heads`], [`sdpa`] and [`Attention::output`]
//! themselves; the rest call [`Attention::forward`].
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::config::{AdapterConfig, Method, Projection};
use crate::error::{Error, Result};
use crate::half;
use crate::layers::{matmul, on_rows};
use crate::lora::{FusedQkv, LoraLinear, check_finite, replace_frozen};
use crate::rng::StdRng;
use crate::serial::SerialLora;

/// Shape of an attention block.
#[derive(Config, Debug)]
pub struct AttentionConfig {
    /// Width of the (query) input and of the output.
    pub d_model: usize,
    /// Number of heads.
    pub num_heads: usize,
    /// Width of q, k and v; `None` = `d_model` (SAM's mask decoder halves it).
    #[config(default = "None")]
    pub inner_dim: Option<usize>,
    /// Width of the key/value inputs of cross-attention; `None` = `d_model`.
    #[config(default = "None")]
    pub kv_dim: Option<usize>,
    /// Biases on the q, k, v projections.
    #[config(default = true)]
    pub qkv_bias: bool,
    /// One fused `qkv` linear (SAM's image encoder) instead of three.
    #[config(default = false)]
    pub fused_qkv: bool,
    /// Whether the block has an output projection (SD3's last context stream has none).
    #[config(default = true)]
    pub out_proj: bool,
}

impl AttentionConfig {
    /// A block with random base weights (to be overwritten by a checkpoint).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Attention<B> {
        let inner = self.inner_dim.unwrap_or(self.d_model);
        let kv = self.kv_dim.unwrap_or(self.d_model);
        let lin = |i, o, bias| LoraLinear::new(LinearConfig::new(i, o).with_bias(bias).init(device));
        let qkv = if self.fused_qkv {
            QkvProjection::Fused(FusedQkv::new(LinearConfig::new(self.d_model, 3 * inner).with_bias(self.qkv_bias).init(device)))
        } else {
            QkvProjection::Separate(SeparateQkv {
                q: lin(self.d_model, inner, self.qkv_bias),
                k: lin(kv, inner, self.qkv_bias),
                v: lin(kv, inner, self.qkv_bias),
            })
        };
        Attention { serial: None, qkv, o: self.out_proj.then(|| lin(inner, self.d_model, true)), num_heads: self.num_heads }
    }
}

/// Separate q, k, v projections, each with an optional LoRA pair.
#[derive(Module, Debug)]
pub struct SeparateQkv<B: Backend> {
    pub q: LoraLinear<B>,
    pub k: LoraLinear<B>,
    pub v: LoraLinear<B>,
}

/// The q, k, v projections of a block: separate or fused.
// (one per block, built once and never moved in a hot loop: the size difference costs nothing)
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum QkvProjection<B: Backend> {
    Separate(SeparateQkv<B>),
    Fused(FusedQkv<B>),
}

/// Multi-head attention with an optional adapter: none, LoRA on Q, K, V, O, or Serial LoRA.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Serial LoRA on the attention input (shared by q, k and v).
    pub serial: Option<SerialLora<B>>,
    pub qkv: QkvProjection<B>,
    /// Output projection `[inner, d_model]`.
    pub o: Option<LoraLinear<B>>,
    pub num_heads: usize,
}

/// Scaled dot-product attention on `[batch, heads, tokens, head_dim]` tensors.
///
/// `mask` is true where attention is *not* allowed (`[batch|1, heads|1, q, k]`); `bias` is added
/// to the scores. The mask is applied as an additive −∞ bias: burn-tch 0.21's fused attention
/// reads boolean masks inverted (burn guide §4.1), an additive bias is read alike everywhere.
pub fn sdpa<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Option<Tensor<B, 4, Bool>>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 4> {
    let [b, h, lq, _] = q.dims();
    let lk = k.dims()[2];
    let bias = match (mask, bias) {
        (None, bias) => bias,
        (Some(mask), bias) => {
            let neg = Tensor::<B, 4>::zeros(mask.dims(), &q.device()).mask_fill(mask, f32::NEG_INFINITY);
            Some(match bias {
                Some(bias) => bias + neg,
                None => neg,
            })
        }
    };
    let bias = bias.map(|t| t.expand([b, h, lq, lk]));
    #[cfg(feature = "flex")]
    if let Some(kind) = flex_kind::<B>(&q) {
        return flex_sdpa(kind, q, k, v, bias.map(crate::flex::attention::Bias::Full));
    }
    #[cfg(feature = "tch")]
    let scale = 1.0 / (q.dims()[3] as f64).sqrt();
    #[cfg(feature = "tch")]
    let (q, k, v, bias) = match crate::libtorch::sdpa(q, k, v, bias, scale) {
        Ok(o) => return o,
        Err(inputs) => inputs,
    };
    attention(q, k, v, None, bias, AttentionModuleOptions::default())
}

/// [`sdpa`] with SAM's decomposed relative-position bias (`get_decomposed_rel_pos`):
/// `bias[b, h, i, ky·kw + kx] = rel_h[b, h, i, ky] + rel_w[b, h, i, kx]` for `rel_h
/// [b, h, lq, kh]`, `rel_w [b, h, lq, kw]` and `kh·kw` keys. On Flex the two terms go into the
/// fused kernel as they are (no `[b, h, lq, lk]` bias, forward or backward: 805 MB for one
/// global layer of SAM at 1024²); elsewhere the bias is materialised for [`sdpa`].
pub fn sdpa_rel_pos<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, rel_h: Tensor<B, 4>, rel_w: Tensor<B, 4>) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    if let Some(kind) = flex_kind::<B>(&q) {
        return flex_sdpa(kind, q, k, v, Some(crate::flex::attention::Bias::Decomposed(rel_h, rel_w)));
    }
    let [b, h, lq, kh] = rel_h.dims();
    let kw = rel_w.dims()[3];
    let bias = (rel_h.unsqueeze_dim::<5>(4) + rel_w.unsqueeze_dim::<5>(3)).reshape([b, h, lq, kh * kw]);
    sdpa(q, k, v, None, Some(bias))
}

/// Whether [`sdpa`] runs the fused kernel with its own backward on backend `B` (Flex, with or
/// without autodiff, in f32) rather than Burn's `attention` (decomposed under autodiff).
pub fn has_fused_attention<B: Backend>() -> bool {
    #[cfg(feature = "flex")]
    if crate::flex::kind::<B>().is_some() {
        return true;
    }
    false
}

#[cfg(feature = "flex")]
fn flex_kind<B: Backend>(q: &Tensor<B, 4>) -> Option<crate::flex::Kind> {
    crate::flex::kind::<B>().filter(|_| q.dtype() == burn::tensor::DType::F32)
}

/// [`sdpa`] on Flex, with or without autodiff: the fused op of `crate::flex::attention` (its
/// own backward: nothing `[b, h, lq, lk]` is kept for it), reading the strided head views in
/// place. `B` is `Flex` or `Autodiff<Flex>` (checked by the caller), so the casts cannot fail.
#[cfg(feature = "flex")]
fn flex_sdpa<B: Backend>(
    kind: crate::flex::Kind,
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<crate::flex::attention::Bias<Tensor<B, 4>>>,
) -> Tensor<B, 4> {
    use crate::flex::{Kind, attention as fa, cast, prim, tensor};
    let scale = 1.0 / (q.dims()[3] as f32).sqrt();
    let (q, k, v) = (prim(q), prim(k), prim(v));
    let bias = bias.map(|b| b.map(prim));
    tensor(match kind {
        Kind::Inner => cast(fa::inference(cast(q), cast(k), cast(v), bias.map(|b| b.map(cast)), scale)),
        Kind::Autodiff => cast(fa::autodiff(cast(q), cast(k), cast(v), bias.map(|b| b.map(cast)), scale)),
    })
}

/// Whether `x` is an autodiff tensor that no gradient flows to (nothing trainable upstream);
/// `false` where unknown (backends without a kernel module here).
fn is_untracked<B: Backend, const D: usize>(x: &Tensor<B, D>) -> bool {
    // the untracked first pass of a checkpointed block stands for a tracked input
    if crate::checkpoint::assumes_tracked() {
        return false;
    }
    #[cfg(feature = "flex")]
    if crate::flex::is_untracked(x) {
        return true;
    }
    #[cfg(feature = "tch")]
    if crate::libtorch::is_untracked(x) {
        return true;
    }
    let _ = x;
    false
}

/// q, k, v from a fused `[..., 3·d]` projection.
fn chunk3<B: Backend>(t: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
    let mut parts = t.chunk(3, 2).into_iter();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(q), Some(k), Some(v)) => (q, k, v),
        _ => unreachable!("chunk(3) of a 3·d wide tensor yields three parts"),
    }
}

/// `[batch, heads, tokens, head_dim]` → `[batch, tokens, heads·head_dim]` (free when the
/// attention wrote its output tokens-major, as the fused Flex op does).
pub fn merge_heads<B: Backend>(o: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, l, hd] = o.dims();
    crate::layers::contiguous(o.swap_dims(1, 2)).reshape([b, l, h * hd])
}

impl<B: Backend> Attention<B> {
    /// Input width of the q projection.
    pub fn d_model(&self) -> usize {
        match &self.qkv {
            QkvProjection::Separate(s) => s.q.dims()[0],
            QkvProjection::Fused(f) => f.slice_dims()[0],
        }
    }

    /// Freezes every base weight and attaches a fresh adapter per `cfg`, its A matrices drawn
    /// from `rng` in [`Attention::pairs`] order.
    pub fn with_adapter(mut self, cfg: &AdapterConfig, rng: &mut StdRng, device: &B::Device) -> Result<Self> {
        cfg.validate()?;
        if self.has_adapter() {
            return Err(Error::config("method", cfg.method_name(), "the block already has an adapter"));
        }
        let wants = |p: Projection| cfg.method == Method::Lora && cfg.target_projections.contains(&p);
        let attach = |l: LoraLinear<B>, p, rng: &mut StdRng| if wants(p) { l.with_lora(cfg, rng, device) } else { l.no_grad() };
        // the Serial pair first: its A is the first drawn
        let serial = (cfg.method == Method::SerialLora).then(|| SerialLora::init(self.d_model(), cfg, rng, device));
        self.qkv = match self.qkv {
            QkvProjection::Separate(s) => {
                let q = attach(s.q, Projection::Q, rng);
                let k = attach(s.k, Projection::K, rng);
                QkvProjection::Separate(SeparateQkv { q, k, v: attach(s.v, Projection::V, rng) })
            }
            QkvProjection::Fused(f) => {
                let [d_in, d] = f.slice_dims();
                let mut pair = |p| wants(p).then(|| crate::lora::LoraPair::init(d_in, d, cfg, rng, device));
                let (q, k) = (pair(Projection::Q), pair(Projection::K));
                QkvProjection::Fused(FusedQkv { base: f.base.no_grad(), q, k, v: pair(Projection::V) })
            }
        };
        self.o = self.o.map(|o| attach(o, Projection::O, rng));
        if cfg.method == Method::SerialLora {
            if let QkvProjection::Separate(s) = &self.qkv
                && s.k.dims()[0] != s.q.dims()[0]
            {
                return Err(Error::config(
                    "method",
                    "serial-lora",
                    "a cross-attention block whose key/value width differs from its query width has no single shared input",
                ));
            }
            self.serial = serial;
        }
        Ok(self)
    }

    /// Every adapter pair of the block (Serial, q, k, v, o).
    pub fn pairs(&self) -> Vec<&crate::lora::LoraPair<B>> {
        let mut out: Vec<&crate::lora::LoraPair<B>> = self.serial.iter().map(|s| &s.pair).collect();
        match &self.qkv {
            QkvProjection::Separate(s) => out.extend([&s.q, &s.k, &s.v].into_iter().filter_map(|l| l.lora.as_ref())),
            QkvProjection::Fused(f) => out.extend(f.pairs().into_iter().flatten()),
        }
        out.extend(self.o.as_ref().and_then(|o| o.lora.as_ref()));
        out
    }

    /// Every adapter pair of the block, mutable, in [`Attention::pairs`] order.
    pub fn pairs_mut(&mut self) -> Vec<&mut crate::lora::LoraPair<B>> {
        let mut out: Vec<&mut crate::lora::LoraPair<B>> = self.serial.iter_mut().map(|s| &mut s.pair).collect();
        match &mut self.qkv {
            QkvProjection::Separate(s) => out.extend([&mut s.q, &mut s.k, &mut s.v].into_iter().filter_map(|l| l.lora.as_mut())),
            QkvProjection::Fused(f) => out.extend([f.q.as_mut(), f.k.as_mut(), f.v.as_mut()].into_iter().flatten()),
        }
        out.extend(self.o.as_mut().and_then(|o| o.lora.as_mut()));
        out
    }

    /// Whether any adapter is attached.
    pub fn has_adapter(&self) -> bool {
        !self.pairs().is_empty()
    }

    /// Projects a self-attention input `[batch, tokens, d_model]` to q, k, v `[batch, tokens, inner]`.
    pub fn qkv(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        if let Some(serial) = self.serial.as_ref().filter(|s| self.serial_factored(s, &x)) {
            return self.qkv_serial_factored(serial, x);
        }
        let x = match &self.serial {
            Some(s) => s.forward(x),
            None => x,
        };
        match &self.qkv {
            QkvProjection::Separate(s) => (s.q.forward(x.clone()), s.k.forward(x.clone()), s.v.forward(x)),
            QkvProjection::Fused(f) => chunk3(f.forward(x)),
        }
    }

    /// Whether [`Attention::qkv`] computes Serial LoRA factored: when nothing upstream of `x`
    /// is trainable (the first adapted block), no gradient is wanted for `x` itself, and the
    /// usual order `h' = x + s·(dropout(x)·A)·B`, `q = h'·W_q + b_q` would still spend the
    /// backward's largest products on `dh' = dq·W_qᵀ + dk·W_kᵀ + dv·W_vᵀ` (three `[n, d]·[d, d]`
    /// products) only to reach A and B. Known on `Autodiff<Flex>` and `Autodiff<LibTorch>`
    /// (their tensors say whether they are tracked); worth it for at least `4·r` rows.
    fn serial_factored(&self, s: &SerialLora<B>, x: &Tensor<B, 3>) -> bool {
        let [b, n, _] = x.dims();
        let plain_qkv = match &self.qkv {
            QkvProjection::Separate(p) => [&p.q, &p.k, &p.v].iter().all(|l| l.lora.is_none()),
            QkvProjection::Fused(f) => f.pairs().iter().all(Option::is_none),
        };
        !s.pair.merged && plain_qkv && b * n >= 4 * s.pair.rank() && is_untracked(x)
    }

    /// Serial LoRA as `x·W + b + (s·dropout(x)·A)·(B·W)` per projection: the same values as
    /// `(x + s·(dropout(x)·A)·B)·W + b` up to summation order (one dropout mask, drawn as the
    /// usual order draws it), with a backward of rank-r products only (see
    /// [`Attention::serial_factored`]).
    fn qkv_serial_factored(&self, s: &SerialLora<B>, x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let pair = &s.pair;
        let xa = on_rows(x.clone(), |x| matmul(pair.dropout.forward(x), pair.lora_a.val()).mul_scalar(pair.scale));
        let project = |l: &Linear<B>, x: Tensor<B, 3>| {
            let bw = matmul(pair.lora_b.val(), half::f32(l.weight.val()));
            half::linear(l, x) + on_rows(xa.clone(), |xa| matmul(xa, bw))
        };
        match &self.qkv {
            QkvProjection::Separate(p) => (project(&p.q.base, x.clone()), project(&p.k.base, x.clone()), project(&p.v.base, x)),
            QkvProjection::Fused(f) => chunk3(project(&f.base, x)),
        }
    }

    /// Projects separate query, key and value inputs (cross-attention). Serial LoRA, when
    /// attached, transforms each input. A fused block projects each input through `qkv` and
    /// keeps its slice.
    pub fn qkv_cross(&self, xq: Tensor<B, 3>, xk: Tensor<B, 3>, xv: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let serial = |x| match &self.serial {
            Some(s) => s.forward(x),
            None => x,
        };
        let (xq, xk, xv) = (serial(xq), serial(xk), serial(xv));
        match &self.qkv {
            QkvProjection::Separate(s) => (s.q.forward(xq), s.k.forward(xk), s.v.forward(xv)),
            QkvProjection::Fused(f) => {
                let d = f.slice_dims()[1];
                let take = |x, i: usize| f.forward(x).narrow(2, i * d, d);
                (take(xq, 0), take(xk, 1), take(xv, 2))
            }
        }
    }

    /// `[batch, tokens, heads·head_dim]` → `[batch, heads, tokens, head_dim]`.
    pub fn split_heads(&self, t: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, l, inner] = t.dims();
        crate::layers::contiguous(t).reshape([b, l, self.num_heads, inner / self.num_heads]).swap_dims(1, 2)
    }

    /// `[batch, heads, tokens, head_dim]` → `[batch, tokens, heads·head_dim]` → output projection.
    pub fn output(&self, o: Tensor<B, 4>) -> Tensor<B, 3> {
        self.out_proj(merge_heads(o))
    }

    /// The output projection alone (identity without one), on any `[..., inner]` tensor.
    pub fn out_proj<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.o {
            Some(proj) => proj.forward(x),
            None => x,
        }
    }

    /// Self-attention on `[batch, tokens, d_model]`.
    pub fn forward(&self, x: Tensor<B, 3>, mask: Option<Tensor<B, 4, Bool>>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let (q, k, v) = self.qkv(x);
        let o = sdpa(self.split_heads(q), self.split_heads(k), self.split_heads(v), mask, bias);
        self.output(o)
    }

    /// Self-attention on `[batch, tokens, d_model]` computed for the queries `start..start + len`
    /// only: `[batch, len, d_model]`, the rows of [`Attention::forward`]'s output (keys and
    /// values from every token; with separate projections q is projected for those rows alone).
    /// For a model whose output reads a few tokens of its last layer (CLIP's class token).
    pub fn forward_queries(&self, x: Tensor<B, 3>, start: usize, len: usize, mask: Option<Tensor<B, 4, Bool>>) -> Tensor<B, 3> {
        let x = match &self.serial {
            Some(s) => s.forward(x),
            None => x,
        };
        let (q, k, v) = match &self.qkv {
            QkvProjection::Separate(s) => (s.q.forward(x.clone().narrow(1, start, len)), s.k.forward(x.clone()), s.v.forward(x)),
            QkvProjection::Fused(f) => {
                let d = f.slice_dims()[1];
                let y = f.forward(x);
                (y.clone().narrow(1, start, len).narrow(2, 0, d), y.clone().narrow(2, d, d), y.narrow(2, 2 * d, d))
            }
        };
        let mask = mask.map(|m| {
            let [mb, mh, _, lk] = m.dims();
            m.slice([0..mb, 0..mh, start..start + len, 0..lk])
        });
        let o = sdpa(self.split_heads(q), self.split_heads(k), self.split_heads(v), mask, None);
        self.output(o)
    }

    /// Cross-attention: queries `[batch, lq, d_model]`, keys and values `[batch, lk, kv_dim]`.
    pub fn forward_cross(
        &self,
        xq: Tensor<B, 3>,
        xk: Tensor<B, 3>,
        xv: Tensor<B, 3>,
        mask: Option<Tensor<B, 4, Bool>>,
        bias: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 3> {
        let (q, k, v) = self.qkv_cross(xq, xk, xv);
        let o = sdpa(self.split_heads(q), self.split_heads(k), self.split_heads(v), mask, bias);
        self.output(o)
    }

    /// Maps the base weight of each q/k/v projection (`[in, out]`), as Serial LoRA merge needs.
    fn map_qkv_weights(mut self, mut f: impl FnMut(Tensor<B, 2>, &str) -> Result<Tensor<B, 2>>) -> Result<Self> {
        let mut map = |lin: Linear<B>, name: &str| -> Result<Linear<B>> {
            let w = f(half::f32(lin.weight.val().detach()), name)?;
            Ok(Linear { weight: replace_frozen(lin.weight, w), ..lin })
        };
        self.qkv = match self.qkv {
            QkvProjection::Separate(s) => QkvProjection::Separate(SeparateQkv {
                q: LoraLinear { base: map(s.q.base, "q")?, ..s.q },
                k: LoraLinear { base: map(s.k.base, "k")?, ..s.k },
                v: LoraLinear { base: map(s.v.base, "v")?, ..s.v },
            }),
            QkvProjection::Fused(fq) => QkvProjection::Fused(FusedQkv { base: map(fq.base, "qkv")?, ..fq }),
        };
        Ok(self)
    }

    /// Folds every adapter into the base weights (LoRA: `W + s·A·B`; Serial: `(I + s·A·B)·W`).
    /// The adapter stays attached but inactive, so [`Attention::unmerge`] can undo it.
    /// Refuses (with the module's name) to write non-finite weights.
    pub fn merge(mut self) -> Result<Self> {
        self = self.map_projections(|l, name| l.merge(name), |f| f.merge("qkv"))?;
        if let Some(mut serial) = self.serial.take() {
            if serial.pair.merged {
                return Err(Error::MergeState { module: "serial".into(), message: "already merged" });
            }
            self = self.map_qkv_weights(|w, name| {
                let w = serial.merge_into(w);
                check_finite(&w, name)?;
                Ok(w)
            })?;
            serial.pair.merged = true;
            self.serial = Some(serial);
        }
        Ok(self)
    }

    /// Undoes [`Attention::merge`] (exact up to float rounding).
    pub fn unmerge(mut self) -> Result<Self> {
        if let Some(mut serial) = self.serial.take() {
            if !serial.pair.merged {
                return Err(Error::MergeState { module: "serial".into(), message: "not merged" });
            }
            self = self.map_qkv_weights(|w, name| serial.unmerge_from(w, name))?;
            serial.pair.merged = false;
            self.serial = Some(serial);
        }
        self.map_projections(|l, name| l.unmerge(name), |f| f.unmerge("qkv"))
    }

    /// Whether the adapter of this block is merged into the base weights.
    pub fn is_merged(&self) -> bool {
        self.pairs().iter().any(|p| p.merged)
    }

    /// Merges (unless already merged) and drops the adapters: a plain block with the base
    /// model's cost.
    pub fn merge_and_unload(self) -> Result<Self> {
        let mut merged = if self.is_merged() { self } else { self.merge()? };
        merged.serial = None;
        merged.map_projections(|l, _| Ok(LoraLinear { lora: None, ..l }), |f| Ok(FusedQkv { q: None, k: None, v: None, ..f }))
    }

    fn map_projections(
        mut self,
        mut lin: impl FnMut(LoraLinear<B>, &str) -> Result<LoraLinear<B>>,
        fused: impl FnOnce(FusedQkv<B>) -> Result<FusedQkv<B>>,
    ) -> Result<Self> {
        self.qkv = match self.qkv {
            QkvProjection::Separate(s) => QkvProjection::Separate(SeparateQkv { q: lin(s.q, "q")?, k: lin(s.k, "k")?, v: lin(s.v, "v")? }),
            QkvProjection::Fused(f) => QkvProjection::Fused(fused(f)?),
        };
        self.o = self.o.map(|o| lin(o, "o")).transpose()?;
        Ok(self)
    }

    /// The effective q, k, v weights `[in, inner]` with every unmerged adapter folded in
    /// (what [`Attention::merge`] would write), for spectrum analysis.
    pub fn effective_qkv_weights(&self) -> [Tensor<B, 2>; 3] {
        let eff = |l: &LoraLinear<B>| {
            let w = half::f32(l.base.weight.val().detach());
            match &l.lora {
                Some(p) if !p.merged => w + p.weight_delta(),
                _ => w,
            }
        };
        let [q, k, v] = match &self.qkv {
            QkvProjection::Separate(s) => [eff(&s.q), eff(&s.k), eff(&s.v)],
            QkvProjection::Fused(f) => {
                let [d_in, d] = f.slice_dims();
                let w = half::f32(f.base.weight.val().detach());
                let pairs = f.pairs();
                [0, 1, 2].map(|i| {
                    let slice = w.clone().slice([0..d_in, i * d..(i + 1) * d]);
                    match pairs[i] {
                        Some(p) if !p.merged => slice + p.weight_delta(),
                        _ => slice,
                    }
                })
            }
        };
        match &self.serial {
            Some(s) if !s.pair.merged => [s.merge_into(q), s.merge_into(k), s.merge_into(v)],
            _ => [q, k, v],
        }
    }
}
