//! The vision tower: transformers `CLIPVisionEmbeddings` (patch conv without bias, class token,
//! learned positions) + `pre_layrnorm` + `CLIPEncoder` + `post_layernorm` on the class token.
//! Upstream: transformers `modeling_clip.py::CLIPVisionModel` (v5.24).
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig};
use burn::prelude::*;
use serial_lora::half::{embedding, f32_view};

use crate::config::ClipVisionConfig;
use crate::encoder::{Encoder, EncoderShape};
use crate::text_model::TowerOutput;

/// `CLIPVisionEmbeddings`.
#[derive(Module, Debug)]
pub struct VisionEmbeddings<B: Backend> {
    /// `[hidden]`.
    pub class_embedding: Param<Tensor<B, 1>>,
    /// `[hidden, channels, patch, patch]`, stride = patch, no bias.
    pub patch_embedding: Conv2d<B>,
    /// `[patches + 1, hidden]`.
    pub position_embedding: Embedding<B>,
}

/// The vision tower.
#[derive(Module, Debug)]
pub struct VisionModel<B: Backend> {
    pub embeddings: VisionEmbeddings<B>,
    /// Upstream spelling kept: the checkpoint key is `pre_layrnorm`.
    pub pre_layrnorm: LayerNorm<B>,
    pub encoder: Encoder<B>,
    pub post_layernorm: LayerNorm<B>,
}

impl<B: Backend> VisionModel<B> {
    pub fn new(c: &ClipVisionConfig, device: &B::Device) -> Self {
        let shape = EncoderShape {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            eps: c.layer_norm_eps,
            act: c.hidden_act,
        };
        let ln = || LayerNormConfig::new(c.hidden_size).with_epsilon(c.layer_norm_eps).init(device);
        Self {
            embeddings: VisionEmbeddings {
                class_embedding: Param::from_tensor(Tensor::zeros([c.hidden_size], device)),
                patch_embedding: Conv2dConfig::new([c.num_channels, c.hidden_size], [c.patch_size, c.patch_size])
                    .with_stride([c.patch_size, c.patch_size])
                    .with_bias(false)
                    .init(device),
                position_embedding: EmbeddingConfig::new(c.num_positions(), c.hidden_size).init(device),
            },
            pre_layrnorm: ln(),
            encoder: Encoder::new(&shape, device),
            post_layernorm: ln(),
        }
    }

    /// `[batch, channels, image, image]` → class + patch embeddings with positions,
    /// `[batch, patches + 1, hidden]` (before `pre_layrnorm`).
    pub fn embed(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let patches = f32_view(&self.embeddings.patch_embedding).forward(pixel_values); // [b, d, g, g]
        let [b, d, gh, gw] = patches.dims();
        let patches = patches.reshape([b, d, gh * gw]).swap_dims(1, 2); // [b, g², d]
        let cls = self.embeddings.class_embedding.val().reshape([1, 1, d]).expand([b, 1, d]);
        let x = Tensor::cat(vec![cls, patches], 1);
        let positions = Tensor::<B, 1, Int>::arange(0..(gh * gw + 1) as i64, &x.device()).unsqueeze::<2>();
        x + embedding(&self.embeddings.position_embedding, positions)
    }

    /// Pixel values (already normalized) → hidden states; pooled = `post_layernorm` of the
    /// class token.
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> TowerOutput<B> {
        let x = self.pre_layrnorm.forward(self.embed(pixel_values));
        let hidden_states = self.encoder.forward(x, None);
        let last = hidden_states[hidden_states.len() - 1].clone();
        let [b, _, d] = last.dims();
        let pooler_output = self.post_layernorm.forward(last.clone().narrow(1, 0, 1).reshape([b, d]));
        TowerOutput { hidden_states, last_hidden_state: last, pooler_output }
    }

    /// The pooled output alone (`pooler_output` of [`VisionModel::forward`]): the last layer
    /// runs for the class token only ([`crate::encoder::Encoder::forward_row`]).
    pub fn pooled(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.pre_layrnorm.forward(self.embed(pixel_values));
        let cls = self.encoder.forward_row(x, None, 0);
        let [b, _, d] = cls.dims();
        self.post_layernorm.forward(cls.reshape([b, d]))
    }
}
