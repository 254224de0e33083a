//! The prompt encoder: transformers `SamPositionalEmbedding` (random Fourier features),
//! `SamMaskEmbedding` and `SamPromptEncoder` (points, boxes, masks, no-mask embedding).
//! Upstream: transformers `models/sam/modeling_sam.py` (v5.24).
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig};
use burn::prelude::*;
use serial_lora::half::{f32, f32_view};
use serial_lora::layers::Activation;

use crate::config::{SamPromptEncoderConfig, SamVisionConfig};
use crate::vision_encoder::layer_norm_channels_first;

/// `SamPositionalEmbedding`: `[sin, cos](2π·(2c − 1)·G)` for coordinates `c ∈ [0, 1]²`.
#[derive(Module, Debug)]
pub struct PositionalEmbedding<B: Backend> {
    /// `G`, `[2, num_pos_feats]`.
    pub positional_embedding: Param<Tensor<B, 2>>,
}

impl<B: Backend> PositionalEmbedding<B> {
    pub fn new(c: &SamVisionConfig, device: &B::Device) -> Self {
        Self { positional_embedding: Param::from_tensor(Tensor::zeros([2, c.num_pos_feats], device)) }
    }

    /// `coords [..., 2]` (x, y in [0, 1]) → `[..., 2·num_pos_feats]`.
    pub fn forward<const D: usize>(&self, coords: Tensor<B, D>) -> Tensor<B, D> {
        let g = f32(self.positional_embedding.val());
        let mut shape = coords.dims();
        let n: usize = shape[..D - 1].iter().product();
        let c = coords.reshape([n, 2]).mul_scalar(2.0).sub_scalar(1.0).matmul(g).mul_scalar(2.0 * std::f64::consts::PI);
        let out = Tensor::cat(vec![c.clone().sin(), c.cos()], 1);
        shape[D - 1] = out.dims()[1];
        out.reshape(shape)
    }

    /// `get_image_wide_positional_embeddings`: `[1, 2·feats, size, size]` at the cell centres.
    pub fn image_wide(&self, size: usize) -> Tensor<B, 4> {
        let device = self.positional_embedding.device();
        let xy: Vec<f32> = (0..size).flat_map(|i| (0..size).flat_map(move |j| [(j as f32 + 0.5) / size as f32, (i as f32 + 0.5) / size as f32])).collect();
        let pe = self.forward(Tensor::<B, 3>::from_data(TensorData::new(xy, [size, size, 2]), &device));
        pe.permute([2, 0, 1]).unsqueeze()
    }
}

/// `SamMaskEmbedding`: conv 2×2/2, LN, act, conv 2×2/2, LN, act, conv 1×1.
#[derive(Module, Debug)]
pub struct MaskEmbedding<B: Backend> {
    pub conv1: Conv2d<B>,
    pub conv2: Conv2d<B>,
    pub conv3: Conv2d<B>,
    pub layer_norm1: LayerNorm<B>,
    pub layer_norm2: LayerNorm<B>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: Backend> MaskEmbedding<B> {
    /// `masks [b, 1, 4·grid, 4·grid]` → `[b, hidden, grid, grid]`.
    pub fn forward(&self, masks: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.act.forward(layer_norm_channels_first(&self.layer_norm1, f32_view(&self.conv1).forward(masks)));
        let h = self.act.forward(layer_norm_channels_first(&self.layer_norm2, f32_view(&self.conv2).forward(h)));
        f32_view(&self.conv3).forward(h)
    }
}

/// `SamPromptEncoder` (its Fourier matrix is the model's shared one, passed to `forward`).
#[derive(Module, Debug)]
pub struct PromptEncoder<B: Backend> {
    pub mask_embed: MaskEmbedding<B>,
    pub no_mask_embed: Embedding<B>,
    /// 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right.
    pub point_embed: Vec<Embedding<B>>,
    pub not_a_point_embed: Embedding<B>,
    pub input_image_size: usize,
    pub image_embedding_size: usize,
}

/// Point label of a padding point (ignored: zero embedding).
pub const LABEL_PAD: i64 = -10;
/// Point label of a "not a point" entry (transformers' −1).
pub const LABEL_NOT_A_POINT: i64 = -1;

impl<B: Backend> PromptEncoder<B> {
    pub fn new(c: &SamPromptEncoderConfig, device: &B::Device) -> Self {
        let emb = || EmbeddingConfig::new(1, c.hidden_size).init(device);
        let m = c.mask_input_channels;
        Self {
            mask_embed: MaskEmbedding {
                conv1: Conv2dConfig::new([1, m / 4], [2, 2]).with_stride([2, 2]).init(device),
                conv2: Conv2dConfig::new([m / 4, m], [2, 2]).with_stride([2, 2]).init(device),
                conv3: Conv2dConfig::new([m, c.hidden_size], [1, 1]).init(device),
                layer_norm1: LayerNormConfig::new(m / 4).with_epsilon(c.layer_norm_eps).init(device),
                layer_norm2: LayerNormConfig::new(m).with_epsilon(c.layer_norm_eps).init(device),
                act: c.hidden_act,
            },
            no_mask_embed: emb(),
            point_embed: (0..c.num_point_embeddings).map(|_| emb()).collect(),
            not_a_point_embed: emb(),
            input_image_size: c.image_size,
            image_embedding_size: c.image_embedding_size(),
        }
    }

    fn row(e: &Embedding<B>) -> Tensor<B, 2> {
        f32(e.weight.val())
    }

    /// Points `[b, p, n, 2]` (pixels of the model input) with labels `[b, p, n]` → `[b, p, n(+1), hidden]`;
    /// `pad` appends a not-a-point entry (transformers does when there is no box).
    pub fn embed_points(&self, pe: &PositionalEmbedding<B>, points: Tensor<B, 4>, labels: Tensor<B, 3, Int>, pad: bool) -> Tensor<B, 4> {
        let [b, p, _, _] = points.dims();
        let device = points.device();
        let mut points = points.add_scalar(0.5);
        let mut labels = labels;
        if pad {
            points = Tensor::cat(vec![points, Tensor::zeros([b, p, 1, 2], &device)], 2);
            labels = Tensor::cat(vec![labels, Tensor::full([b, p, 1], LABEL_NOT_A_POINT, &device)], 2);
        }
        let n = points.dims()[2];
        let emb = pe.forward(points.div_scalar(self.input_image_size as f64));
        let d = emb.dims()[3];
        let is = |v: i64| labels.clone().equal_elem(v).unsqueeze_dim::<4>(3).expand([b, p, n, d]);
        let row = |e: &Embedding<B>| Self::row(e).reshape([1, 1, 1, d]).expand([b, p, n, d]);
        let emb = emb.mask_where(is(LABEL_NOT_A_POINT), row(&self.not_a_point_embed));
        let emb = emb.mask_fill(is(LABEL_PAD), 0.0);
        let emb = emb.clone().mask_where(is(0), emb.clone() + row(&self.point_embed[0]));
        emb.clone().mask_where(is(1), emb + row(&self.point_embed[1]))
    }

    /// Boxes `[b, nb, 4]` (x0, y0, x1, y1 in model-input pixels) → corners `[b, nb, 2, hidden]`.
    pub fn embed_boxes(&self, pe: &PositionalEmbedding<B>, boxes: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, nb, _] = boxes.dims();
        let coords = boxes.add_scalar(0.5).reshape([b, nb, 2, 2]).div_scalar(self.input_image_size as f64);
        let emb = pe.forward(coords);
        let corners = Tensor::cat(vec![Self::row(&self.point_embed[2]), Self::row(&self.point_embed[3])], 0);
        emb + corners.unsqueeze::<4>()
    }

    /// Sparse `[b, p, tokens, hidden]` (points then box corners; `None` without points and
    /// boxes) and dense `[b, hidden, grid, grid]` embeddings.
    pub fn forward(
        &self,
        pe: &PositionalEmbedding<B>,
        points: Option<(Tensor<B, 4>, Tensor<B, 3, Int>)>,
        boxes: Option<Tensor<B, 3>>,
        masks: Option<Tensor<B, 4>>,
        batch: usize,
    ) -> (Option<Tensor<B, 4>>, Tensor<B, 4>) {
        let pad = boxes.is_none();
        let mut parts = Vec::new();
        if let Some((pts, labels)) = points {
            parts.push(self.embed_points(pe, pts, labels, pad));
        }
        if let Some(bx) = boxes {
            parts.push(self.embed_boxes(pe, bx));
        }
        let sparse = (!parts.is_empty()).then(|| Tensor::cat(parts, 2));
        let dense = match masks {
            Some(m) => self.mask_embed.forward(m),
            None => {
                let w = Self::row(&self.no_mask_embed);
                let d = w.dims()[1];
                let s = self.image_embedding_size;
                w.reshape([1, d, 1, 1]).expand([batch, d, s, s])
            }
        };
        (sparse, dense)
    }
}
