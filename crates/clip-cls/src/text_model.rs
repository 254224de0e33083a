//! The text tower: transformers `CLIPTextEmbeddings` + `CLIPEncoder` (causal) + `final_layer_norm`,
//! pooled at the end-of-text token. Upstream: transformers `modeling_clip.py::CLIPTextModel` (v5.24).
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig};
use burn::prelude::*;

use crate::config::ClipTextConfig;
use crate::encoder::{Encoder, EncoderShape};

/// `CLIPTextEmbeddings`: token + learned absolute position embeddings.
#[derive(Module, Debug)]
pub struct TextEmbeddings<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub position_embedding: Embedding<B>,
}

/// Outputs of a tower, as transformers' `BaseModelOutputWithPooling`.
#[derive(Debug, Clone)]
pub struct TowerOutput<B: Backend> {
    /// `[batch, tokens, hidden]`: input of layer 0, then each layer's output.
    pub hidden_states: Vec<Tensor<B, 3>>,
    /// `[batch, tokens, hidden]`.
    pub last_hidden_state: Tensor<B, 3>,
    /// `[batch, hidden]`.
    pub pooler_output: Tensor<B, 2>,
}

/// The text tower.
#[derive(Module, Debug)]
pub struct TextModel<B: Backend> {
    pub embeddings: TextEmbeddings<B>,
    pub encoder: Encoder<B>,
    pub final_layer_norm: LayerNorm<B>,
    /// End-of-text id; with the legacy value 2 the pooled token is the highest id instead.
    pub eos_token_id: i64,
}

impl<B: Backend> TextModel<B> {
    pub fn new(c: &ClipTextConfig, device: &B::Device) -> Self {
        let shape = EncoderShape {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            eps: c.layer_norm_eps,
            act: c.hidden_act,
        };
        Self {
            embeddings: TextEmbeddings {
                token_embedding: EmbeddingConfig::new(c.vocab_size, c.hidden_size).init(device),
                position_embedding: EmbeddingConfig::new(c.max_position_embeddings, c.hidden_size).init(device),
            },
            encoder: Encoder::new(&shape, device),
            final_layer_norm: LayerNormConfig::new(c.hidden_size).with_epsilon(c.layer_norm_eps).init(device),
            eos_token_id: c.eos_token_id,
        }
    }

    /// `input_ids [batch, tokens]` (tokens ≤ max_position_embeddings) → hidden states and the
    /// pooled feature at the first end-of-text token (transformers ≥ 4.31 rule).
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> TowerOutput<B> {
        let [b, l] = input_ids.dims();
        let device = input_ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..l as i64, &device).unsqueeze::<2>();
        let x = self.embeddings.token_embedding.forward(input_ids.clone())
            + self.embeddings.position_embedding.forward(positions);
        // causal: true above the diagonal = may not attend to later tokens
        let causal = Tensor::<B, 2, Bool>::tril_mask([l, l], 0, &device).unsqueeze::<4>();
        let hidden_states = self.encoder.forward(x, Some(causal));
        let last = self.final_layer_norm.forward(hidden_states[hidden_states.len() - 1].clone());
        let pos = if self.eos_token_id == 2 {
            input_ids.argmax(1) // legacy configs: the EOT token has the highest id
        } else {
            input_ids.equal_elem(self.eos_token_id).int().argmax(1) // first EOT
        };
        let d = last.dims()[2];
        let pooler_output = last.clone().gather(1, pos.reshape([b, 1, 1]).expand([b, 1, d])).reshape([b, d]);
        TowerOutput { hidden_states, last_hidden_state: last, pooler_output }
    }
}
