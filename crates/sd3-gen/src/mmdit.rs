//! The MMDiT denoiser: diffusers `SD3Transformer2DModel` — patch embedding with a centred crop of
//! the position table (`pos_embed_max_size`), timestep + pooled-text conditioning, context
//! embedder, joint transformer blocks (adaLN-Zero, joint attention over image and text tokens,
//! optional RMS qk-norm, `context_pre_only` last block), final adaptive norm and unpatchify.
//! Adapters attach to the image stream of each joint attention (`to_q`, `to_k`, `to_v`, `to_out.0`),
//! and with [`Sd3Transformer::with_context_stream`] also to its context stream (`add_q_proj`,
//! `add_k_proj`, `add_v_proj`, `to_add_out`; Serial LoRA keys `add_serial_lora_{A,B}`).
//! Upstream: diffusers `transformer_sd3.py`, `attention.py::JointTransformerBlock`,
//! `attention_processor.py::JointAttnProcessor2_0`, `embeddings.py`, `normalization.py` (v0.42.1).
use burn::module::{Module, Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::silu;
use serial_lora::half::{f32, linear};
use serial_lora::layers::{Activation, Mlp, contiguous, gated_residual, modulated_layer_norm};
use serial_lora::{AdaptedModel, Attention, AttentionConfig, AttentionSite, ProjNames, sdpa};

use crate::config::Sd3TransformerConfig;
use crate::error::{Result, Sd3Error};

/// diffusers `RMSNorm` with a weight (qk-norm over the head dimension).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
}

impl<B: Backend> RmsNorm<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let var = x.clone().powi_scalar(2).mean_dim(3);
        x / var.add_scalar(1e-6).sqrt() * self.weight.val().unsqueeze::<4>()
    }
}

/// The adaptive-norm projection `linear(silu(temb))` of `AdaLayerNormZero` (6 chunks) and
/// `AdaLayerNormContinuous` (2 chunks: scale, shift).
#[derive(Module, Debug)]
pub struct AdaNorm<B: Backend> {
    pub linear: Linear<B>,
}

impl<B: Backend> AdaNorm<B> {
    fn chunks(&self, temb: Tensor<B, 2>, n: usize) -> Vec<Tensor<B, 2>> {
        // contiguous chunks: Flex multiplies a strided operand element by element
        linear(&self.linear, silu(temb)).chunk(n, 1).into_iter().map(contiguous).collect()
    }

    /// `AdaLayerNormContinuous`: `LN(x)·(1 + scale) + shift`.
    fn continuous(&self, x: Tensor<B, 3>, temb: Tensor<B, 2>) -> Tensor<B, 3> {
        let c = self.chunks(temb, 2);
        modulated_layer_norm(x, Some(c[0].clone().add_scalar(1.0)), Some(c[1].clone()), 1e-6)
    }
}

/// Joint attention: the image stream (`to_q/k/v`, `to_out.0`) and the context stream
/// (`add_q/k/v_proj`, `to_add_out` unless `context_pre_only`) attend over both token sets.
#[derive(Module, Debug)]
pub struct JointAttention<B: Backend> {
    pub image: Attention<B>,
    pub context: Attention<B>,
    pub norm_q: Option<RmsNorm<B>>,
    pub norm_k: Option<RmsNorm<B>>,
    pub norm_added_q: Option<RmsNorm<B>>,
    pub norm_added_k: Option<RmsNorm<B>>,
}

fn norm<B: Backend>(n: &Option<RmsNorm<B>>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    match n {
        Some(n) => n.forward(x),
        None => x,
    }
}

impl<B: Backend> JointAttention<B> {
    /// Image tokens `[b, n, d]` and context tokens `[b, m, d]` → their attention outputs.
    pub fn forward(&self, x: Tensor<B, 3>, c: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let n = x.dims()[1];
        let m = c.dims()[1];
        let (q, k, v) = self.image.qkv(x);
        let (cq, ck, cv) = self.context.qkv(c);
        let (a, ctx) = (&self.image, &self.context);
        // the two token sets joined token-major (`[b, n + m, heads, head_dim]`: contiguous
        // copies), then viewed head-major for the attention, which reads the view in place
        let joint = |x: Tensor<B, 4>, c: Tensor<B, 4>| Tensor::cat(vec![x.swap_dims(1, 2), c.swap_dims(1, 2)], 1).swap_dims(1, 2);
        let q = joint(norm(&self.norm_q, a.split_heads(q)), norm(&self.norm_added_q, ctx.split_heads(cq)));
        let k = joint(norm(&self.norm_k, a.split_heads(k)), norm(&self.norm_added_k, ctx.split_heads(ck)));
        let v = joint(a.split_heads(v), ctx.split_heads(cv));
        let o = sdpa(q, k, v, None, None);
        (a.output(o.clone().narrow(2, 0, n)), ctx.output(o.narrow(2, n, m)))
    }
}

/// SD3.5's second attention (`attn2`): self-attention over the image tokens only, with qk-norm.
#[derive(Module, Debug)]
pub struct ImageAttention<B: Backend> {
    pub attn: Attention<B>,
    pub norm_q: Option<RmsNorm<B>>,
    pub norm_k: Option<RmsNorm<B>>,
}

impl<B: Backend> ImageAttention<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let a = &self.attn;
        let (q, k, v) = a.qkv(x);
        let o = sdpa(norm(&self.norm_q, a.split_heads(q)), norm(&self.norm_k, a.split_heads(k)), a.split_heads(v), None, None);
        a.output(o)
    }
}

/// `JointTransformerBlock`.
#[derive(Module, Debug)]
pub struct JointBlock<B: Backend> {
    /// adaLN-Zero: 6 chunks, or 9 with dual attention (`SD35AdaLayerNormZeroX`).
    pub norm1: AdaNorm<B>,
    /// adaLN-Zero (6 chunks), or continuous (2) in the `context_pre_only` block.
    pub norm1_context: AdaNorm<B>,
    pub attn: JointAttention<B>,
    /// SD3.5 dual attention (`dual_attention_layers`).
    pub attn2: Option<ImageAttention<B>>,
    pub ff: Mlp<B>,
    /// `None` in the `context_pre_only` block.
    pub ff_context: Option<Mlp<B>>,
}

impl<B: Backend> JointBlock<B> {
    /// [`JointBlock::forward`] through [`serial_lora::checkpoint`] when training with gradient
    /// checkpointing (a plain call otherwise): image and context tokens travel as one
    /// `[b, n + m, d]` tensor. The conditioning `temb` is read as a constant (no adapter is
    /// upstream of it).
    pub fn forward_checkpointed(&self, x: Tensor<B, 3>, c: Tensor<B, 3>, temb: Tensor<B, 2>) -> (Tensor<B, 3>, Option<Tensor<B, 3>>) {
        if !serial_lora::checkpoint::enabled() {
            return self.forward(x, c, temb);
        }
        let (n, m) = (x.dims()[1], c.dims()[1]);
        let temb = temb.detach();
        let y = serial_lora::checkpoint(self, Tensor::cat(vec![x, c], 1), move |block, t| {
            match block.forward(t.clone().narrow(1, 0, n), t.narrow(1, n, m), temb.clone()) {
                (x, Some(c)) => Tensor::cat(vec![x, c], 1),
                (x, None) => x,
            }
        });
        match &self.ff_context {
            Some(_) => (y.clone().narrow(1, 0, n), Some(y.narrow(1, n, m))),
            None => (y, None),
        }
    }

    /// Image `[b, n, d]`, context `[b, m, d]`, conditioning `[b, d]` → new image tokens and
    /// context tokens (`None` after the `context_pre_only` block).
    pub fn forward(&self, x: Tensor<B, 3>, c: Tensor<B, 3>, temb: Tensor<B, 2>) -> (Tensor<B, 3>, Option<Tensor<B, 3>>) {
        // shift, scale, gate (msa), shift, scale, gate (mlp)[, shift, scale, gate (msa2)]
        let e = self.norm1.chunks(temb.clone(), if self.attn2.is_some() { 9 } else { 6 });
        let modulate = |x: Tensor<B, 3>, e: &[Tensor<B, 2>], scale: usize, shift: usize| {
            modulated_layer_norm(x, Some(e[scale].clone().add_scalar(1.0)), Some(e[shift].clone()), 1e-6)
        };
        let nx = modulate(x.clone(), &e, 1, 0);
        let (nc, ce) = match &self.ff_context {
            Some(_) => {
                let ce = self.norm1_context.chunks(temb.clone(), 6);
                (modulate(c.clone(), &ce, 1, 0), Some(ce))
            }
            None => (self.norm1_context.continuous(c.clone(), temb), None),
        };
        let (ax, ac) = self.attn.forward(nx, nc);
        let mut y = gated_residual(x.clone(), ax, e[2].clone());
        if let Some(a2) = &self.attn2 {
            y = gated_residual(y, a2.forward(modulate(x, &e, 7, 6)), e[8].clone());
        }
        let nx = modulate(y.clone(), &e, 4, 3);
        let x = gated_residual(y, self.ff.forward(nx), e[5].clone());
        let c = match (ce, &self.ff_context) {
            (Some(ce), Some(ff)) => {
                let c = gated_residual(c, ac, ce[2].clone());
                let nc = modulate(c.clone(), &ce, 4, 3);
                Some(gated_residual(c, ff.forward(nc), ce[5].clone()))
            }
            _ => None,
        };
        (x, c)
    }
}

/// `linear_2(silu(linear_1(x)))`: `TimestepEmbedding` and `PixArtAlphaTextProjection(act="silu")`.
#[derive(Module, Debug)]
pub struct TwoLayer<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
}

impl<B: Backend> TwoLayer<B> {
    fn new(i: usize, h: usize, device: &B::Device) -> Self {
        Self { linear_1: LinearConfig::new(i, h).init(device), linear_2: LinearConfig::new(h, h).init(device) }
    }
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        linear(&self.linear_2, silu(linear(&self.linear_1, x)))
    }
}

/// `CombinedTimestepTextProjEmbeddings`.
#[derive(Module, Debug)]
pub struct TimeTextEmbed<B: Backend> {
    pub timestep_embedder: TwoLayer<B>,
    pub text_embedder: TwoLayer<B>,
}

/// `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`: `[cos(t·f), sin(t·f)]`,
/// `f_i = exp(−ln(10⁴)·i/128)`, computed in f32 as torch does.
pub fn timestep_projection<B: Backend>(t: &[f32], device: &B::Device) -> Tensor<B, 2> {
    let half = 128;
    let freqs: Vec<f32> = (0..half).map(|i| ((-(10000f64.ln()) as f32 * i as f32) / half as f32).exp()).collect();
    let data: Vec<f32> = t
        .iter()
        .flat_map(|&t| {
            let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
            args.iter().map(|a| a.cos()).chain(args.iter().map(|a| a.sin())).collect::<Vec<_>>()
        })
        .collect();
    Tensor::from_data(TensorData::new(data, [t.len(), 2 * half]), device)
}

/// `PatchEmbed` with `pos_embed_max_size`.
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    pub proj: Conv2d<B>,
    /// `[1, max², inner]` (a persistent buffer in the checkpoint).
    pub pos_embed: Param<Tensor<B, 3>>,
    pub pos_embed_max_size: usize,
}

impl<B: Backend> PatchEmbed<B> {
    /// Latents `[b, c, h, w]` → tokens `[b, (h/p)·(w/p), inner]` plus the centred crop of the
    /// position table. The stride-`p` convolution runs as one product of the patches
    /// `[b·(h/p)·(w/p), c·p·p]` (one strided copy) with the kernel viewed as `[c·p·p, inner]`:
    /// the same dot products, and the tokens come out token-major, so the crop is added to a
    /// contiguous tensor (on Flex at 512², 2 threads: 5 ms in all, against 12 ms for its direct
    /// convolution and 30 ms for the add through the transposed view).
    pub fn forward(&self, latents: Tensor<B, 4>) -> Result<Tensor<B, 3>> {
        let [b, c, h, w] = latents.dims();
        let [d, cin, p, _] = self.proj.weight.dims();
        if c != cin || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            return Err(Sd3Error::Input(format!("latents {c}×{h}×{w}: the patch embedding takes {cin} channels and sides that are multiples of {p}")));
        }
        let (hp, wp, m) = (h / p, w / p, self.pos_embed_max_size);
        if hp > m || wp > m {
            return Err(Sd3Error::Input(format!("{hp}×{wp} patches exceed pos_embed_max_size {m}")));
        }
        let patches = contiguous(latents.reshape([b, c, hp, p, wp, p]).permute([0, 2, 4, 1, 3, 5])).reshape([b * hp * wp, c * p * p]);
        let kernel =
            Linear { weight: Param::initialized(ParamId::new(), self.proj.weight.val().reshape([d, c * p * p]).transpose()), bias: self.proj.bias.clone() };
        let x = linear(&kernel, patches).reshape([b, hp * wp, d]);
        let (top, left) = ((m - hp) / 2, (m - wp) / 2);
        let pos = self.pos_embed.val().reshape([1, m, m, d]).slice([0..1, top..top + hp, left..left + wp, 0..d]);
        Ok(x + contiguous(f32(pos)).reshape([1, hp * wp, d]))
    }
}

/// `SD3Transformer2DModel`.
#[derive(Module, Debug)]
pub struct Sd3Transformer<B: Backend> {
    pub pos_embed: PatchEmbed<B>,
    pub time_text_embed: TimeTextEmbed<B>,
    pub context_embedder: Linear<B>,
    pub transformer_blocks: Vec<JointBlock<B>>,
    pub norm_out: AdaNorm<B>,
    pub proj_out: Linear<B>,
    pub patch_size: usize,
    pub out_channels: usize,
    /// Whether the context streams are adaptable sites too (see [`Sd3Transformer::with_context_stream`]).
    pub adapt_context: bool,
}

/// Intermediate values of a forward pass (for parity checks).
pub struct Trace<B: Backend> {
    pub embedded: Tensor<B, 3>,
    pub temb: Tensor<B, 2>,
    pub context: Tensor<B, 3>,
    /// Image and context tokens after each block.
    pub blocks: Vec<(Tensor<B, 3>, Option<Tensor<B, 3>>)>,
}

impl<B: Backend> Sd3Transformer<B> {
    /// A model with random weights of the given shape (to be overwritten by a checkpoint).
    pub fn new(c: &Sd3TransformerConfig, device: &B::Device) -> Self {
        let d = c.inner_dim();
        let rms = |on: bool| on.then(|| RmsNorm { weight: Param::from_tensor(Tensor::ones([c.attention_head_dim], device)) });
        let qk = c.qk_norm.is_some();
        let blocks = (0..c.num_layers)
            .map(|i| {
                let pre_only = i == c.num_layers - 1;
                let dual = c.dual_attention_layers.contains(&i);
                let attn = AttentionConfig::new(d, c.num_attention_heads);
                JointBlock {
                    norm1: AdaNorm { linear: LinearConfig::new(d, if dual { 9 } else { 6 } * d).init(device) },
                    attn2: dual.then(|| ImageAttention { attn: attn.init(device), norm_q: rms(qk), norm_k: rms(qk) }),
                    norm1_context: AdaNorm { linear: LinearConfig::new(d, if pre_only { 2 } else { 6 } * d).init(device) },
                    attn: JointAttention {
                        image: attn.init(device),
                        context: attn.clone().with_out_proj(!pre_only).init(device),
                        norm_q: rms(qk),
                        norm_k: rms(qk),
                        norm_added_q: rms(qk),
                        norm_added_k: rms(qk),
                    },
                    ff: Mlp::new(d, 4 * d, Activation::GeluTanh, device),
                    ff_context: (!pre_only).then(|| Mlp::new(d, 4 * d, Activation::GeluTanh, device)),
                }
            })
            .collect();
        let m = c.pos_embed_max_size;
        Self {
            pos_embed: PatchEmbed {
                proj: Conv2dConfig::new([c.in_channels, d], [c.patch_size, c.patch_size]).with_stride([c.patch_size, c.patch_size]).init(device),
                // lazy: a config claiming a huge table allocates nothing before the shapes are checked
                pos_embed: Initializer::Zeros.init([1, m * m, d], device),
                pos_embed_max_size: m,
            },
            time_text_embed: TimeTextEmbed {
                timestep_embedder: TwoLayer::new(256, d, device),
                text_embedder: TwoLayer::new(c.pooled_projection_dim, d, device),
            },
            context_embedder: LinearConfig::new(c.joint_attention_dim, c.caption_projection_dim).init(device),
            transformer_blocks: blocks,
            norm_out: AdaNorm { linear: LinearConfig::new(d, 2 * d).init(device) },
            proj_out: LinearConfig::new(d, c.patch_size * c.patch_size * c.out_channels).init(device),
            patch_size: c.patch_size,
            out_channels: c.out_channels,
            adapt_context: false,
        }
    }

    /// Makes the context stream of every joint attention adaptable as well (`false`, the
    /// default, is the image stream only: the paper's setting and parameter counts). With it,
    /// [`AdaptedModel::attention_sites`] lists the image streams `0..n` and then the context
    /// streams `n..2n` (the last block's has no output projection), so `target_blocks` index
    /// that list, and `with_adapters` / adapter files / merge cover both streams: LoRA on
    /// `add_q_proj, add_k_proj, add_v_proj, to_add_out` (diffusers' names, so a diffusers LoRA
    /// with those keys loads), Serial LoRA with its own pair on the context stream's attention
    /// input, keyed `transformer_blocks.{i}.attn.add_serial_lora_{A,B}.weight`.
    /// Switch it on before attaching or loading adapters.
    pub fn with_context_stream(mut self, on: bool) -> Self {
        self.adapt_context = on;
        self
    }

    /// Velocity prediction `[b, c, h, w]` for latents `[b, c, h, w]`, text tokens
    /// `[b, m, joint_attention_dim]`, pooled text `[b, pooled]` and timesteps (0..1000) per sample.
    pub fn forward(&self, latents: Tensor<B, 4>, encoder_hidden_states: Tensor<B, 3>, pooled: Tensor<B, 2>, timestep: &[f32]) -> Result<Tensor<B, 4>> {
        Ok(self.forward_traced(latents, encoder_hidden_states, pooled, timestep)?.0)
    }

    /// [`Sd3Transformer::forward`] with its intermediate values.
    pub fn forward_traced(
        &self,
        latents: Tensor<B, 4>,
        encoder_hidden_states: Tensor<B, 3>,
        pooled: Tensor<B, 2>,
        timestep: &[f32],
    ) -> Result<(Tensor<B, 4>, Trace<B>)> {
        let [b, _, h, w] = latents.dims();
        let p = self.patch_size;
        if !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            return Err(Sd3Error::Input(format!("latent size {h}×{w} is not a multiple of the patch size {p}")));
        }
        if timestep.len() != b || pooled.dims()[0] != b || encoder_hidden_states.dims()[0] != b {
            return Err(Sd3Error::Input(format!(
                "batch mismatch: latents {b}, timesteps {}, pooled {}, text {}",
                timestep.len(),
                pooled.dims()[0],
                encoder_hidden_states.dims()[0]
            )));
        }
        // widths the checkpoint fixes: a mismatch would panic inside a matmul
        let [joint_dim, _] = self.context_embedder.weight.dims(); // Burn Linear weights are [in, out]
        let [pooled_dim, _] = self.time_text_embed.text_embedder.linear_1.weight.dims();
        let [_, in_channels, _, _] = self.pos_embed.proj.weight.dims();
        let widths = [
            ("latents channels", latents.dims()[1], in_channels, "in_channels"),
            ("prompt_embeds width", encoder_hidden_states.dims()[2], joint_dim, "joint_attention_dim"),
            ("pooled_prompt_embeds width", pooled.dims()[1], pooled_dim, "pooled_projection_dim"),
        ];
        if let Some((what, got, want, field)) = widths.into_iter().find(|(_, got, want, _)| got != want) {
            return Err(Sd3Error::Input(format!("{what} is {got}, the transformer's {field} is {want}")));
        }
        let embedded = self.pos_embed.forward(latents)?;
        let device = embedded.device();
        let te = &self.time_text_embed;
        let temb = te.timestep_embedder.forward(timestep_projection(timestep, &device)) + te.text_embedder.forward(pooled);
        let context = linear(&self.context_embedder, encoder_hidden_states);
        let (mut x, mut c) = (embedded.clone(), Some(context.clone()));
        let mut blocks = Vec::with_capacity(self.transformer_blocks.len());
        let last = self.transformer_blocks.len().saturating_sub(1);
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            let ctx = c.ok_or_else(|| Sd3Error::Input("a block after the context_pre_only block".into()))?;
            // the last block's backward comes first: checkpointing it would only cost time
            let (nx, nc) = if i < last { block.forward_checkpointed(x, ctx, temb.clone()) } else { block.forward(x, ctx, temb.clone()) };
            blocks.push((nx.clone(), nc.clone()));
            (x, c) = (nx, nc);
        }
        let x = linear(&self.proj_out, self.norm_out.continuous(x, temb.clone()));
        let (hp, wp, oc) = (h / p, w / p, self.out_channels);
        let out = x.reshape([b, hp, wp, p, p, oc]).permute([0, 5, 1, 3, 2, 4]).reshape([b, oc, h, w]);
        Ok((out, Trace { embedded, temb, context, blocks }))
    }
}

/// diffusers `Attention`'s projection names (image stream): `to_q`, `to_k`, `to_v`, `to_out.0`.
pub const DIFFUSERS_PROJ_NAMES: ProjNames = ProjNames { q: "to_q", k: "to_k", v: "to_v", qkv: "to_qkv", o: "to_out.0", serial: "serial_" };
/// diffusers `Attention`, context stream of SD3's joint attention: `add_q_proj`, `add_k_proj`,
/// `add_v_proj`, `to_add_out`; its Serial LoRA pair is `add_serial_lora_{A,B}` (next to the image
/// stream's `serial_lora_{A,B}` of the same module, so the two never collide).
pub const DIFFUSERS_CONTEXT_PROJ_NAMES: ProjNames =
    ProjNames { q: "add_q_proj", k: "add_k_proj", v: "add_v_proj", qkv: "add_qkv_proj", o: "to_add_out", serial: "add_serial_" };

/// Adaptable blocks: the image stream of each joint attention, `transformer_blocks.{i}.attn`
/// (diffusers names `to_q`, `to_k`, `to_v`, `to_out.0`), then — with
/// [`Sd3Transformer::with_context_stream`] — the context streams (`add_q_proj`, `add_k_proj`,
/// `add_v_proj`, `to_add_out`) of the same modules.
impl<B: Backend> AdaptedModel<B> for Sd3Transformer<B> {
    fn attention_sites(&self) -> Vec<AttentionSite<'_, B>> {
        let path = |i: usize| format!("transformer_blocks.{i}.attn");
        let blocks = self.transformer_blocks.iter().enumerate();
        let image = blocks.clone().map(|(i, b)| AttentionSite { path: path(i), names: DIFFUSERS_PROJ_NAMES, attention: &b.attn.image });
        let context = blocks.filter(|_| self.adapt_context).map(|(i, b)| AttentionSite {
            path: path(i),
            names: DIFFUSERS_CONTEXT_PROJ_NAMES,
            attention: &b.attn.context,
        });
        image.chain(context).collect()
    }

    fn try_map_attention(mut self, f: &mut dyn FnMut(usize, Attention<B>) -> serial_lora::Result<Attention<B>>) -> serial_lora::Result<Self> {
        let blocks = std::mem::take(&mut self.transformer_blocks);
        let n = blocks.len();
        let blocks: Vec<JointBlock<B>> = blocks
            .into_iter()
            .enumerate()
            .map(|(i, b)| Ok(JointBlock { attn: JointAttention { image: f(i, b.attn.image)?, ..b.attn }, ..b }))
            .collect::<serial_lora::Result<_>>()?;
        self.transformer_blocks = if self.adapt_context {
            blocks
                .into_iter()
                .enumerate()
                .map(|(i, b)| Ok(JointBlock { attn: JointAttention { context: f(n + i, b.attn.context)?, ..b.attn }, ..b }))
                .collect::<serial_lora::Result<_>>()?
        } else {
            blocks
        };
        Ok(self)
    }
}

/// Whether the adapter directory `dir` holds tensors for the context stream (`add_*_proj`,
/// `to_add_out`, `add_serial_lora_*`), i.e. needs [`Sd3Transformer::with_context_stream`].
pub fn adapter_has_context_keys(dir: &std::path::Path) -> Result<bool> {
    let file =
        [serial_lora::io::WEIGHTS_FILE, serial_lora::io::DIFFUSERS_WEIGHTS_FILE].into_iter().map(|f| dir.join(f)).find(|f| f.is_file()).ok_or_else(|| {
            Sd3Error::Input(format!("{}: no {} or {}", dir.display(), serial_lora::io::WEIGHTS_FILE, serial_lora::io::DIFFUSERS_WEIGHTS_FILE))
        })?;
    let names = lora_runtime::weights::tensor_names(&file)?;
    let context = [".add_q_proj.", ".add_k_proj.", ".add_v_proj.", ".to_add_out.", ".add_serial_lora_"];
    Ok(names.iter().any(|n| context.iter().any(|c| n.contains(c))))
}
