//! The transformer encoder shared by both towers: transformers `CLIPEncoderLayer` (pre-LN:
//! `x + attn(ln1(x))`, then `x + mlp(ln2(x))`) and `CLIPEncoder`.
//! Upstream: transformers `models/clip/modeling_clip.py` (v5.24).
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::prelude::*;
use serial_lora::layers::{Activation, Mlp};
use serial_lora::{Attention, AttentionConfig};

/// `CLIPEncoderLayer`.
#[derive(Module, Debug)]
pub struct EncoderLayer<B: Backend> {
    pub layer_norm1: LayerNorm<B>,
    pub self_attn: Attention<B>,
    pub layer_norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
}

/// `CLIPEncoder`: the layers in order.
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    pub layers: Vec<EncoderLayer<B>>,
}

/// Shape of an encoder (one tower).
pub struct EncoderShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub eps: f64,
    pub act: Activation,
}

impl<B: Backend> Encoder<B> {
    pub fn new(s: &EncoderShape, device: &B::Device) -> Self {
        let layers = (0..s.layers)
            .map(|_| EncoderLayer {
                layer_norm1: LayerNormConfig::new(s.hidden).with_epsilon(s.eps).init(device),
                self_attn: AttentionConfig::new(s.hidden, s.heads).init(device),
                layer_norm2: LayerNormConfig::new(s.hidden).with_epsilon(s.eps).init(device),
                mlp: Mlp::new(s.hidden, s.intermediate, s.act, device),
            })
            .collect();
        Self { layers }
    }

    /// Runs every layer on `[batch, tokens, hidden]`; returns the input of layer 0 followed by
    /// each layer's output (transformers' `hidden_states`, `num_layers + 1` entries).
    pub fn forward(&self, x: Tensor<B, 3>, mask: Option<Tensor<B, 4, Bool>>) -> Vec<Tensor<B, 3>> {
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        states.push(x.clone());
        let mut x = x;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            // the last layer's backward comes first: checkpointing it would only cost time
            x = if i < last { checkpointed(layer, x, mask.clone()) } else { layer.forward(x, mask.clone()) };
            states.push(x.clone());
        }
        states
    }

    /// The last layer's output at token `row` alone, `[batch, 1, hidden]`: every layer but the
    /// last runs on all tokens, the last one only for that query (its attention still reads every
    /// key and value) and its MLP on that row. The same sums as row `row` of
    /// [`Encoder::forward`]'s last state; CLIP's image tower pools the class token, so 196 of
    /// 197 rows skip the last layer's q, output projection and MLP (7 % of the tower).
    pub fn forward_row(&self, x: Tensor<B, 3>, mask: Option<Tensor<B, 4, Bool>>, row: usize) -> Tensor<B, 3> {
        let Some((last, layers)) = self.layers.split_last() else { return x.narrow(1, row, 1) };
        let mut x = x;
        for layer in layers {
            x = checkpointed(layer, x, mask.clone());
        }
        let h = last.self_attn.forward_queries(last.layer_norm1.forward(x.clone()), row, 1, mask);
        let x = x.narrow(1, row, 1) + h;
        x.clone() + last.mlp.forward(last.layer_norm2.forward(x))
    }
}

/// [`EncoderLayer::forward`] through [`serial_lora::checkpoint`] (a plain call unless training
/// with gradient checkpointing).
fn checkpointed<B: Backend>(layer: &EncoderLayer<B>, x: Tensor<B, 3>, mask: Option<Tensor<B, 4, Bool>>) -> Tensor<B, 3> {
    serial_lora::checkpoint(layer, x, move |l, x| l.forward(x, mask.clone()))
}

impl<B: Backend> EncoderLayer<B> {
    /// `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
    pub fn forward(&self, x: Tensor<B, 3>, mask: Option<Tensor<B, 4, Bool>>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x), mask, None);
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}
