//! The mask decoder: transformers `SamTwoWayAttentionBlock`, `SamTwoWayTransformer`,
//! `SamFeedForward` and `SamMaskDecoder` (output tokens, two-way transformer, transposed-conv
//! upscaling, hypernetwork MLPs, IoU head, multimask selection). Frozen in the paper's setting.
//! Upstream: transformers `models/sam/modeling_sam.py` (v5.24).
use burn::module::Module;
use burn::nn::conv::{ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu, relu};
use serial_lora::half::{f32, f32_view, linear};
use serial_lora::layers::Mlp;
use serial_lora::{Attention, AttentionConfig};

use crate::config::SamMaskDecoderConfig;
use crate::vision_encoder::layer_norm_channels_first;

/// `SamAttention(q, k, v)` on `[n, tokens, d]` inputs.
fn attend<B: Backend>(a: &Attention<B>, q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>) -> Tensor<B, 3> {
    a.forward_cross(q, k, v, None, None)
}

/// `SamTwoWayAttentionBlock`.
#[derive(Module, Debug)]
pub struct TwoWayBlock<B: Backend> {
    pub self_attn: Attention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub cross_attn_token_to_image: Attention<B>,
    pub layer_norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    pub layer_norm3: LayerNorm<B>,
    pub layer_norm4: LayerNorm<B>,
    pub cross_attn_image_to_token: Attention<B>,
    pub skip_first_layer_pe: bool,
}

impl<B: Backend> TwoWayBlock<B> {
    /// Queries `[n, t, d]`, keys `[n, hw, d]` and their positional encodings → new queries, keys.
    pub fn forward(&self, queries: Tensor<B, 3>, keys: Tensor<B, 3>, query_pe: Tensor<B, 3>, key_pe: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let queries = if self.skip_first_layer_pe {
            attend(&self.self_attn, queries.clone(), queries.clone(), queries)
        } else {
            let q = queries.clone() + query_pe.clone();
            queries.clone() + attend(&self.self_attn, q.clone(), q, queries)
        };
        let queries = self.layer_norm1.forward(queries);
        let (q, k) = (queries.clone() + query_pe.clone(), keys.clone() + key_pe.clone());
        let queries = self.layer_norm2.forward(queries + attend(&self.cross_attn_token_to_image, q, k, keys.clone()));
        let queries = self.layer_norm3.forward(queries.clone() + self.mlp.forward(queries));
        let (q, k) = (queries.clone() + query_pe, keys.clone() + key_pe);
        let keys = self.layer_norm4.forward(keys + attend(&self.cross_attn_image_to_token, k, q, queries.clone()));
        (queries, keys)
    }
}

/// `SamTwoWayTransformer`.
#[derive(Module, Debug)]
pub struct TwoWayTransformer<B: Backend> {
    pub layers: Vec<TwoWayBlock<B>>,
    pub final_attn_token_to_image: Attention<B>,
    pub layer_norm_final_attn: LayerNorm<B>,
}

/// `SamFeedForward`: `proj_in`, ReLU, hidden layers with ReLU, `proj_out`.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    pub proj_in: Linear<B>,
    pub layers: Vec<Linear<B>>,
    pub proj_out: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    fn new(input: usize, hidden: usize, output: usize, num_layers: usize, device: &B::Device) -> Self {
        Self {
            proj_in: LinearConfig::new(input, hidden).init(device),
            layers: (0..num_layers.saturating_sub(2)).map(|_| LinearConfig::new(hidden, hidden).init(device)).collect(),
            proj_out: LinearConfig::new(hidden, output).init(device),
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = self.layers.iter().fold(relu(linear(&self.proj_in, x)), |x, l| relu(linear(l, x)));
        linear(&self.proj_out, x)
    }
}

/// `SamMaskDecoder`.
#[derive(Module, Debug)]
pub struct MaskDecoder<B: Backend> {
    pub iou_token: Embedding<B>,
    pub mask_tokens: Embedding<B>,
    pub transformer: TwoWayTransformer<B>,
    pub upscale_conv1: ConvTranspose2d<B>,
    pub upscale_conv2: ConvTranspose2d<B>,
    pub upscale_layer_norm: LayerNorm<B>,
    pub output_hypernetworks_mlps: Vec<FeedForward<B>>,
    pub iou_prediction_head: FeedForward<B>,
}

impl<B: Backend> MaskDecoder<B> {
    pub fn new(c: &SamMaskDecoderConfig, device: &B::Device) -> Self {
        let d = c.hidden_size;
        let ln = |eps| LayerNormConfig::new(d).with_epsilon(eps).init(device);
        let attn = |downsample: usize| AttentionConfig::new(d, c.num_attention_heads).with_inner_dim(Some(d / downsample)).init(device);
        let num_mask_tokens = c.num_multimask_outputs + 1;
        let layers = (0..c.num_hidden_layers)
            .map(|i| TwoWayBlock {
                self_attn: attn(1),
                layer_norm1: ln(c.layer_norm_eps),
                cross_attn_token_to_image: attn(c.attention_downsample_rate),
                layer_norm2: ln(c.layer_norm_eps),
                mlp: Mlp::new(d, c.mlp_dim, c.hidden_act, device),
                layer_norm3: ln(c.layer_norm_eps),
                layer_norm4: ln(c.layer_norm_eps),
                cross_attn_image_to_token: attn(c.attention_downsample_rate),
                skip_first_layer_pe: i == 0,
            })
            .collect();
        Self {
            iou_token: EmbeddingConfig::new(1, d).init(device),
            mask_tokens: EmbeddingConfig::new(num_mask_tokens, d).init(device),
            transformer: TwoWayTransformer {
                layers,
                final_attn_token_to_image: attn(c.attention_downsample_rate),
                // transformers builds this one with nn.LayerNorm's default eps
                layer_norm_final_attn: ln(1e-5),
            },
            upscale_conv1: ConvTranspose2dConfig::new([d, d / 4], [2, 2]).with_stride([2, 2]).init(device),
            upscale_conv2: ConvTranspose2dConfig::new([d / 4, d / 8], [2, 2]).with_stride([2, 2]).init(device),
            upscale_layer_norm: LayerNormConfig::new(d / 4).with_epsilon(1e-6).init(device),
            output_hypernetworks_mlps: (0..num_mask_tokens).map(|_| FeedForward::new(d, d, d / 8, 3, device)).collect(),
            iou_prediction_head: FeedForward::new(d, c.iou_head_hidden_dim, num_mask_tokens, c.iou_head_depth, device),
        }
    }

    /// Image embeddings and their positional encoding `[b, d, s, s]`, sparse prompts
    /// `[b, p, t, d]` (or `None`), dense prompts `[b, d, s, s]` → mask logits
    /// `[b, p, m, 4s, 4s]` and IoU predictions `[b, p, m]` (m = 3 with `multimask`, else 1).
    pub fn forward(
        &self,
        image_embeddings: Tensor<B, 4>,
        image_pe: Tensor<B, 4>,
        sparse: Option<Tensor<B, 4>>,
        dense: Tensor<B, 4>,
        multimask: bool,
    ) -> (Tensor<B, 5>, Tensor<B, 3>) {
        let [b, d, s, _] = image_embeddings.dims();
        let p = sparse.as_ref().map_or(1, |t| t.dims()[1]);
        let output_tokens = Tensor::cat(vec![f32(self.iou_token.weight.val()), f32(self.mask_tokens.weight.val())], 0);
        let n_out = output_tokens.dims()[0];
        let output_tokens = output_tokens.unsqueeze::<4>().expand([b, p, n_out, d]);
        let tokens = match sparse {
            Some(sp) => Tensor::cat(vec![output_tokens, sp], 2),
            None => output_tokens,
        };
        let t = tokens.dims()[2];
        let tokens = tokens.reshape([b * p, t, d]);
        // per-image tensors repeated for each prompt of the image (repeat_interleave)
        let per_prompt = |x: Tensor<B, 4>| x.unsqueeze_dim::<5>(1).expand([b, p, d, s, s]).reshape([b * p, d, s * s]).swap_dims(1, 2);
        let keys = per_prompt(image_embeddings + dense);
        let key_pe = per_prompt(image_pe);

        let tr = &self.transformer;
        let (mut queries, mut keys) = (tokens.clone(), keys);
        for layer in &tr.layers {
            (queries, keys) = layer.forward(queries, keys, tokens.clone(), key_pe.clone());
        }
        let (q, k) = (queries.clone() + tokens, keys.clone() + key_pe);
        let queries = tr.layer_norm_final_attn.forward(queries + attend(&tr.final_attn_token_to_image, q, k, keys.clone()));

        let iou_token_out = queries.clone().slice([0..b * p, 0..1, 0..d]).reshape([b * p, d]);
        let up = keys.swap_dims(1, 2).reshape([b * p, d, s, s]);
        let up = gelu(layer_norm_channels_first(&self.upscale_layer_norm, f32_view(&self.upscale_conv1).forward(up)));
        let up = gelu(f32_view(&self.upscale_conv2).forward(up));
        let [_, c, h, w] = up.dims();
        let hyper: Vec<Tensor<B, 2>> = self
            .output_hypernetworks_mlps
            .iter()
            .enumerate()
            .map(|(i, mlp)| mlp.forward(queries.clone().slice([0..b * p, 1 + i..2 + i, 0..d]).reshape([b * p, d])))
            .collect();
        let hyper = Tensor::stack::<3>(hyper, 1); // [b·p, masks, c]
        let masks = hyper.matmul(up.reshape([b * p, c, h * w])).reshape([b, p, n_out - 1, h, w]);
        let iou = self.iou_prediction_head.forward(iou_token_out).reshape([b, p, n_out - 1]);
        let range = if multimask { 1..n_out - 1 } else { 0..1 };
        let m = range.len();
        (masks.slice([0..b, 0..p, range.clone(), 0..h, 0..w]).reshape([b, p, m, h, w]), iou.slice([0..b, 0..p, range]))
    }
}
