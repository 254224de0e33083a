//! transformers `CLIPModel`: both towers, the projections and `logit_scale`; adapters on the
//! self-attention of every layer of both towers (the paper's setting).
//! Upstream: transformers `models/clip/modeling_clip.py` (v5.24); checkpoint
//! `openai/clip-vit-base-patch16`.
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use serial_lora::half::linear;
use serial_lora::{AdaptedModel, Attention, AttentionSite, ProjNames};

use crate::config::ClipConfig;
use crate::encoder::EncoderLayer;
use crate::text_model::{TextModel, TowerOutput};
use crate::vision_model::VisionModel;

#[derive(Module, Debug)]
pub struct ClipModel<B: Backend> {
    pub text_model: TextModel<B>,
    pub vision_model: VisionModel<B>,
    /// `[vision hidden, projection_dim]`, no bias.
    pub visual_projection: Linear<B>,
    /// `[text hidden, projection_dim]`, no bias.
    pub text_projection: Linear<B>,
    /// `[1]`: log of the logit temperature (the checkpoint stores a scalar).
    pub logit_scale: Param<Tensor<B, 1>>,
}

impl<B: Backend> ClipModel<B> {
    /// A model with random weights of the given shape (to be overwritten by a checkpoint).
    pub fn new(c: &ClipConfig, device: &B::Device) -> Self {
        let proj = |d| LinearConfig::new(d, c.projection_dim).with_bias(false).init(device);
        Self {
            text_model: TextModel::new(&c.text_config, device),
            vision_model: VisionModel::new(&c.vision_config, device),
            visual_projection: proj(c.vision_config.hidden_size),
            text_projection: proj(c.text_config.hidden_size),
            logit_scale: Param::from_tensor(Tensor::from_floats([c.logit_scale_init_value as f32], device)),
        }
    }

    /// Projected, unnormalized image features `[batch, projection_dim]` and the tower outputs
    /// (transformers `get_image_features`).
    pub fn image_features(&self, pixel_values: Tensor<B, 4>) -> (Tensor<B, 2>, TowerOutput<B>) {
        let out = self.vision_model.forward(pixel_values);
        (linear(&self.visual_projection, out.pooler_output.clone()), out)
    }

    /// Projected, unnormalized text features `[batch, projection_dim]` and the tower outputs
    /// (transformers `get_text_features`).
    pub fn text_features(&self, input_ids: Tensor<B, 2, Int>) -> (Tensor<B, 2>, TowerOutput<B>) {
        let out = self.text_model.forward(input_ids);
        (linear(&self.text_projection, out.pooler_output.clone()), out)
    }

    /// `get_image_features`: `[batch, projection_dim]`. The last layer runs for the class token
    /// only ([`VisionModel::pooled`]): the same features as [`ClipModel::image_features`].
    pub fn get_image_features(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 2> {
        linear(&self.visual_projection, self.vision_model.pooled(pixel_values))
    }

    /// `get_text_features`: `[batch, projection_dim]`. Runs the text tower only up to the last
    /// pooled position ([`TextModel::pooled`]): the same features as [`ClipModel::text_features`].
    pub fn get_text_features(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        linear(&self.text_projection, self.text_model.pooled(input_ids))
    }

    /// `logits_per_image [images, texts] = exp(logit_scale) · norm(image)·norm(text)ᵀ`.
    pub fn logits_per_image(&self, image_embeds: Tensor<B, 2>, text_embeds: Tensor<B, 2>) -> Tensor<B, 2> {
        let scale = self.logit_scale.val().exp().unsqueeze::<2>();
        l2_normalize(image_embeds).matmul(l2_normalize(text_embeds).transpose()) * scale
    }
}

/// transformers `CLIPTextModelWithProjection` (the text encoders of SD3): the text tower and its
/// projection (`text_embeds` = projected pooled output).
#[derive(Module, Debug)]
pub struct ClipTextModelWithProjection<B: Backend> {
    pub text_model: TextModel<B>,
    /// `[hidden, projection_dim]`, no bias.
    pub text_projection: Linear<B>,
}

impl<B: Backend> ClipTextModelWithProjection<B> {
    pub fn new(c: &crate::config::ClipTextConfig, projection_dim: usize, device: &B::Device) -> Self {
        Self { text_model: TextModel::new(c, device), text_projection: LinearConfig::new(c.hidden_size, projection_dim).with_bias(false).init(device) }
    }

    /// `(text_embeds [batch, projection_dim], tower outputs)`.
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> (Tensor<B, 2>, TowerOutput<B>) {
        let out = self.text_model.forward(input_ids);
        (linear(&self.text_projection, out.pooler_output.clone()), out)
    }
}

/// Rows scaled to unit L2 norm.
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt();
    x / norm
}

/// transformers CLIP's projection names: `q_proj`, `k_proj`, `v_proj`, `out_proj` (the adapter
/// file keys of every CLIP attention block).
pub const CLIP_PROJ_NAMES: ProjNames = ProjNames { q: "q_proj", k: "k_proj", v: "v_proj", qkv: "qkv", o: "out_proj", serial: "serial_" };

/// Adaptable blocks: the vision tower's layers (indices `0..V`), then the text tower's
/// (`V..V+T`), each named by its HF module path.
impl<B: Backend> AdaptedModel<B> for ClipModel<B> {
    fn attention_sites(&self) -> Vec<AttentionSite<'_, B>> {
        fn tower<'a, B: Backend>(name: &str, enc: &'a crate::encoder::Encoder<B>) -> Vec<AttentionSite<'a, B>> {
            let site = |(i, l): (usize, &'a EncoderLayer<B>)| AttentionSite {
                path: format!("{name}.encoder.layers.{i}.self_attn"),
                names: CLIP_PROJ_NAMES,
                attention: &l.self_attn,
            };
            enc.layers.iter().enumerate().map(site).collect()
        }
        let mut sites = tower("vision_model", &self.vision_model.encoder);
        sites.extend(tower("text_model", &self.text_model.encoder));
        sites
    }

    fn try_map_attention(mut self, f: &mut dyn FnMut(usize, Attention<B>) -> serial_lora::Result<Attention<B>>) -> serial_lora::Result<Self> {
        let mut i = 0;
        let mut map = |layers: Vec<EncoderLayer<B>>| {
            layers
                .into_iter()
                .map(|l| {
                    let self_attn = f(i, l.self_attn)?;
                    i += 1;
                    Ok(EncoderLayer { self_attn, ..l })
                })
                .collect::<serial_lora::Result<Vec<_>>>()
        };
        self.vision_model.encoder.layers = map(std::mem::take(&mut self.vision_model.encoder.layers))?;
        self.text_model.encoder.layers = map(std::mem::take(&mut self.text_model.encoder.layers))?;
        Ok(self)
    }
}
