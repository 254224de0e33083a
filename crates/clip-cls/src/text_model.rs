//! The text tower: transformers `CLIPTextEmbeddings` + `CLIPEncoder` (causal) + `final_layer_norm`,
//! pooled at the end-of-text token. Upstream: transformers `modeling_clip.py::CLIPTextModel` (v5.24).
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig};
use burn::prelude::*;
use serial_lora::half::embedding;

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
        let pos = self.pooled_positions(input_ids.clone());
        let hidden_states = self.encode(input_ids);
        let last = self.final_layer_norm.forward(hidden_states[hidden_states.len() - 1].clone());
        let pooler_output = gather_rows(last.clone(), pos);
        TowerOutput { hidden_states, last_hidden_state: last, pooler_output }
    }

    /// The pooled output alone (`pooler_output` of [`TextModel::forward`]), computed on the ids
    /// cut after the last pooled position of the batch. Under the causal mask no position
    /// attends to a later one, so every kept position's hidden state (the pooled one included) is
    /// the full forward's, with the same sums: class prompts of 10–16 tokens run 16 of 77
    /// positions. Adapter dropout draws its masks for the kept positions only.
    pub fn pooled(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, l] = input_ids.dims();
        let pos = self.pooled_positions(input_ids.clone());
        let keep = (pos.clone().max().into_scalar().elem::<i64>().max(0) as usize + 1).min(l);
        let ids = if keep < l { input_ids.slice([0..b, 0..keep]) } else { input_ids };
        let hidden_states = self.encode(ids);
        gather_rows(self.final_layer_norm.forward(hidden_states[hidden_states.len() - 1].clone()), pos)
    }

    /// The input of layer 0 and each layer's output, `[batch, tokens, hidden]`.
    fn encode(&self, input_ids: Tensor<B, 2, Int>) -> Vec<Tensor<B, 3>> {
        let l = input_ids.dims()[1];
        let device = input_ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..l as i64, &device).unsqueeze::<2>();
        let x = embedding(&self.embeddings.token_embedding, input_ids) + embedding(&self.embeddings.position_embedding, positions);
        // causal: true above the diagonal = may not attend to later tokens
        let causal = Tensor::<B, 2, Bool>::tril_mask([l, l], 0, &device).unsqueeze::<4>();
        self.encoder.forward(x, Some(causal))
    }

    /// The pooled position of each sequence, `[batch]`.
    fn pooled_positions(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 1, Int> {
        let b = input_ids.dims()[0];
        let pos = if self.eos_token_id == 2 {
            input_ids.argmax(1) // legacy configs: the EOT token has the highest id
        } else {
            input_ids.equal_elem(self.eos_token_id).int().argmax(1) // first EOT
        };
        pos.reshape([b])
    }
}

/// `x[i, pos[i], :]` of `x [batch, tokens, d]`.
fn gather_rows<B: Backend>(x: Tensor<B, 3>, pos: Tensor<B, 1, Int>) -> Tensor<B, 2> {
    let [b, _, d] = x.dims();
    x.gather(1, pos.reshape([b, 1, 1]).expand([b, 1, d])).reshape([b, d])
}
