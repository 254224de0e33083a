//! The image encoder: transformers `SamVisionEncoder` — patch embedding (conv, stride = patch),
//! absolute position embedding, pre-LN ViT layers with windowed (zero-padded) or global
//! attention and decomposed relative-position bias (MViTv2), and the convolutional neck.
//! Upstream: transformers `models/sam/modeling_sam.py` (v5.24): `SamPatchEmbeddings`,
//! `SamVisionAttention`, `SamVisionLayer`, `SamVisionNeck`, `SamVisionEncoder`.
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::ops::PadMode;
use serial_lora::half::{f32, f32_view};
use serial_lora::layers::{Mlp, contiguous};
use serial_lora::{Attention, AttentionConfig, sdpa, sdpa_rel_pos};

use crate::config::SamVisionConfig;

/// `SamLayerNorm(data_format="channels_first")`: LayerNorm over the channels of `[b, c, h, w]`.
pub fn layer_norm_channels_first<B: Backend>(ln: &LayerNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    ln.forward(x.permute([0, 2, 3, 1])).permute([0, 3, 1, 2])
}

/// Learned relative-position tables of one attention block, `[2·size − 1, head_dim]` per axis.
#[derive(Module, Debug)]
pub struct RelPos<B: Backend> {
    pub rel_pos_h: Param<Tensor<B, 2>>,
    pub rel_pos_w: Param<Tensor<B, 2>>,
}

/// `SamVisionAttention.get_rel_pos` for equal query and key sizes: `table[q − k + size − 1]`,
/// `[size, size, head_dim]`. The table must have `2·size − 1` rows (no interpolation needed).
fn rel_pos_lookup<B: Backend>(table: Tensor<B, 2>, size: usize) -> Tensor<B, 3> {
    let [rows, hd] = table.dims();
    debug_assert_eq!(rows, 2 * size - 1);
    let idx: Vec<i64> = (0..size).flat_map(|q| (0..size).map(move |k| (q + size - 1 - k) as i64)).collect();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [size * size]), &table.device());
    table.select(0, idx).reshape([size, size, hd])
}

impl<B: Backend> RelPos<B> {
    /// The two terms of the decomposed bias for queries `[n, heads, h·w, head_dim]` (unscaled),
    /// as `get_decomposed_rel_pos` computes them: `rel_h [n, heads, h·w, h]` and
    /// `rel_w [n, heads, h·w, w]`; the bias is `rel_h[.., ky] + rel_w[.., kx]` for key `(ky, kx)`
    /// ([`serial_lora::sdpa_rel_pos`] adds them inside the attention).
    pub fn terms(&self, q: Tensor<B, 4>, h: usize, w: usize) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [n, heads, _, hd] = q.dims();
        let nh = n * heads;
        let q = q.reshape([nh, h, w, hd]);
        let rh = rel_pos_lookup(f32(self.rel_pos_h.val()), h); // [h, kh, hd]
        let rw = rel_pos_lookup(f32(self.rel_pos_w.val()), w); // [w, kw, hd]
        // rel_h[b, y, x, k] = Σ_c q[b, y, x, c] · rh[y, k, c]
        let qy = contiguous(q.clone().permute([1, 0, 2, 3])).reshape([h, nh * w, hd]);
        let rel_h = contiguous(qy.matmul(rh.swap_dims(1, 2)).reshape([h, nh, w, h]).permute([1, 0, 2, 3]));
        // rel_w[b, y, x, k] = Σ_c q[b, y, x, c] · rw[x, k, c]
        let qx = contiguous(q.permute([2, 0, 1, 3])).reshape([w, nh * h, hd]);
        let rel_w = contiguous(qx.matmul(rw.swap_dims(1, 2)).reshape([w, nh, h, w]).permute([1, 2, 0, 3]));
        (rel_h.reshape([n, heads, h * w, h]), rel_w.reshape([n, heads, h * w, w]))
    }
}

/// Attention of one grid (window or whole image) of `[n, heads, h·w, head_dim]` queries, with the
/// relative-position bias when the layer has one.
fn grid_attention<B: Backend>(rel_pos: Option<&RelPos<B>>, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, (h, w): (usize, usize)) -> Tensor<B, 4> {
    match rel_pos {
        Some(r) => {
            let (rel_h, rel_w) = r.terms(q.clone(), h, w);
            sdpa_rel_pos(q, k, v, rel_h, rel_w)
        }
        None => sdpa(q, k, v, None, None),
    }
}

/// `SamVisionLayer`: `x + attn(ln1(x))` (in windows unless global), then `x + mlp(ln2(x))`.
#[derive(Module, Debug)]
pub struct VisionLayer<B: Backend> {
    pub layer_norm1: LayerNorm<B>,
    /// Fused `qkv` + `proj` (adapters attach here).
    pub attn: Attention<B>,
    pub rel_pos: Option<RelPos<B>>,
    pub layer_norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    /// 0 = global attention.
    pub window_size: usize,
}

impl<B: Backend> VisionLayer<B> {
    /// Attention over `[n, h, w, c]` token grids.
    fn attention(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, h, w, c] = x.dims();
        let (q, k, v) = self.attn.qkv(x.reshape([n, h * w, c]));
        let (q, k, v) = (self.attn.split_heads(q), self.attn.split_heads(k), self.attn.split_heads(v));
        let o = grid_attention(self.rel_pos.as_ref(), q, k, v, (h, w));
        self.attn.output(o).reshape([n, h, w, c])
    }

    /// Windowed attention over a `[b, h, w, c]` grid, as transformers computes it (zero-pad the
    /// grid to whole windows, attend in each window, crop) without its wasted work: q, k, v are
    /// projected for the real positions only and padded with what the projection of a zero
    /// row gives (exactly what the padded positions would produce: `0·W + b`, and every adapter
    /// maps 0 to 0), and the output projection runs after the crop. At 512² (32² grid, 42²
    /// padded) that is 42 % fewer rows through `qkv` and `proj`.
    fn windowed_attention(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, w, c] = x.dims();
        let ws = self.window_size;
        let (q, k, v) = self.attn.qkv(x.reshape([b, h * w, c]));
        let (q0, k0, v0) = self.attn.qkv(Tensor::zeros([1, 1, c], &q.device()));
        let windows = |t: Tensor<B, 3>, zero: Tensor<B, 3>| {
            let d = t.dims()[2];
            let t = pad_with_row(t.reshape([b, h, w, d]), zero.reshape([1, 1, 1, d]), ws);
            let nw = t.dims()[0] * (t.dims()[1] / ws) * (t.dims()[2] / ws);
            self.attn.split_heads(window_partition(t, ws).0.reshape([nw, ws * ws, d]))
        };
        let (q, k, v) = (windows(q, q0), windows(k, k0), windows(v, v0));
        let o = serial_lora::merge_heads(grid_attention(self.rel_pos.as_ref(), q, k, v, (ws, ws)));
        let [nw, _, d] = o.dims();
        let (ph, pw) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
        let o = window_unpartition(o.reshape([nw, ws, ws, d]), ws, (ph, pw), (h, w), b, d);
        self.attn.out_proj(o)
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.layer_norm1.forward(x.clone());
        let h = if self.window_size > 0 { self.windowed_attention(h) } else { self.attention(h) };
        let x = x + h;
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

/// `[b, h, w, c]` → windows `[b·nh·nw, ws, ws, c]` (zero padding at the bottom/right) and the
/// padded size.
pub fn window_partition<B: Backend>(x: Tensor<B, 4>, ws: usize) -> (Tensor<B, 4>, (usize, usize)) {
    let [b, h, w, c] = x.dims();
    let (ph, pw) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
    let x = if (ph, pw) != (h, w) { x.pad([(0, 0), (0, ph - h), (0, pw - w), (0, 0)], PadMode::Constant(0.0)) } else { x };
    let x = x.reshape([b, ph / ws, ws, pw / ws, ws, c]).permute([0, 1, 3, 2, 4, 5]);
    (contiguous(x).reshape([b * (ph / ws) * (pw / ws), ws, ws, c]), (ph, pw))
}

/// `[b, h, w, d]` padded at the bottom/right to whole `ws × ws` windows with copies of `row`
/// (`[1, 1, 1, d]`).
fn pad_with_row<B: Backend>(x: Tensor<B, 4>, row: Tensor<B, 4>, ws: usize) -> Tensor<B, 4> {
    let [b, h, w, d] = x.dims();
    let (ph, pw) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
    let x = if pw > w { Tensor::cat(vec![x, row.clone().expand([b, h, pw - w, d])], 2) } else { x };
    if ph > h { Tensor::cat(vec![x, row.expand([b, ph - h, pw, d])], 1) } else { x }
}

/// Inverse of [`window_partition`], cropping the padding.
pub fn window_unpartition<B: Backend>(windows: Tensor<B, 4>, ws: usize, (ph, pw): (usize, usize), (h, w): (usize, usize), b: usize, c: usize) -> Tensor<B, 4> {
    let x = contiguous(windows.reshape([b, ph / ws, pw / ws, ws, ws, c]).permute([0, 1, 3, 2, 4, 5])).reshape([b, ph, pw, c]);
    if (ph, pw) != (h, w) { x.slice([0..b, 0..h, 0..w, 0..c]) } else { x }
}

/// `SamVisionNeck`: 1×1 conv, LayerNorm, 3×3 conv, LayerNorm (channels first, no biases).
#[derive(Module, Debug)]
pub struct VisionNeck<B: Backend> {
    pub conv1: Conv2d<B>,
    pub layer_norm1: LayerNorm<B>,
    pub conv2: Conv2d<B>,
    pub layer_norm2: LayerNorm<B>,
}

/// `SamPatchEmbeddings`.
#[derive(Module, Debug)]
pub struct PatchEmbeddings<B: Backend> {
    pub projection: Conv2d<B>,
}

/// `SamVisionEncoder`.
#[derive(Module, Debug)]
pub struct VisionEncoder<B: Backend> {
    pub patch_embed: PatchEmbeddings<B>,
    /// `[1, grid, grid, hidden]`.
    pub pos_embed: Option<Param<Tensor<B, 4>>>,
    pub layers: Vec<VisionLayer<B>>,
    pub neck: VisionNeck<B>,
}

/// The encoder's outputs.
pub struct VisionOutput<B: Backend> {
    /// Patch embedding + position embedding, `[b, grid, grid, hidden]`.
    pub embeddings: Tensor<B, 4>,
    /// Output of each layer, `[b, grid, grid, hidden]`.
    pub hidden_states: Vec<Tensor<B, 4>>,
    /// Neck output `[b, output_channels, grid, grid]`: the image embeddings.
    pub last_hidden_state: Tensor<B, 4>,
}

impl<B: Backend> VisionEncoder<B> {
    pub fn new(c: &SamVisionConfig, device: &B::Device) -> Self {
        let (d, g) = (c.hidden_size, c.grid());
        let head_dim = d / c.num_attention_heads;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let window_size = if c.global_attn_indexes.contains(&i) { 0 } else { c.window_size };
                let size = if window_size == 0 { g } else { window_size };
                VisionLayer {
                    layer_norm1: LayerNormConfig::new(d).with_epsilon(c.layer_norm_eps).init(device),
                    attn: AttentionConfig::new(d, c.num_attention_heads).with_fused_qkv(true).with_qkv_bias(c.qkv_bias).init(device),
                    rel_pos: c.use_rel_pos.then(|| RelPos {
                        rel_pos_h: Initializer::Zeros.init([2 * size - 1, head_dim], device),
                        rel_pos_w: Initializer::Zeros.init([2 * size - 1, head_dim], device),
                    }),
                    layer_norm2: LayerNormConfig::new(d).with_epsilon(c.layer_norm_eps).init(device),
                    mlp: Mlp::new(d, c.mlp_width(), c.hidden_act, device),
                    window_size,
                }
            })
            .collect();
        let oc = c.output_channels;
        Self {
            patch_embed: PatchEmbeddings {
                projection: Conv2dConfig::new([c.num_channels, d], [c.patch_size, c.patch_size]).with_stride([c.patch_size, c.patch_size]).init(device),
            },
            // lazy (as Burn's layers): a config claiming a huge grid allocates nothing before the
            // checkpoint's shapes are checked
            pos_embed: c.use_abs_pos.then(|| Initializer::Zeros.init([1, g, g, d], device)),
            layers,
            neck: VisionNeck {
                conv1: Conv2dConfig::new([d, oc], [1, 1]).with_bias(false).init(device),
                layer_norm1: LayerNormConfig::new(oc).with_epsilon(1e-6).init(device),
                conv2: Conv2dConfig::new([oc, oc], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).with_bias(false).init(device),
                layer_norm2: LayerNormConfig::new(oc).with_epsilon(1e-6).init(device),
            },
        }
    }

    /// `pixel_values [b, 3, size, size]` → embeddings, per-layer states and image embeddings.
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> VisionOutput<B> {
        let mut x = f32_view(&self.patch_embed.projection).forward(pixel_values).permute([0, 2, 3, 1]);
        if let Some(p) = &self.pos_embed {
            x = x + f32(p.val());
        }
        let embeddings = x.clone();
        let mut hidden_states = Vec::with_capacity(self.layers.len());
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            // the last layer is not checkpointed: its backward comes first, so keeping its
            // activations adds nothing to the peak and saves recomputing it
            x = if i < last { serial_lora::checkpoint(layer, x, |l, x| l.forward(x)) } else { layer.forward(x) };
            hidden_states.push(x.clone());
        }
        let n = &self.neck;
        let y = f32_view(&n.conv1).forward(x.permute([0, 3, 1, 2]));
        let y = layer_norm_channels_first(&n.layer_norm1, y);
        let y = layer_norm_channels_first(&n.layer_norm2, f32_view(&n.conv2).forward(y));
        VisionOutput { embeddings, hidden_states, last_hidden_state: y }
    }
}
