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
        for layer in &self.layers {
            let h = layer.self_attn.forward(layer.layer_norm1.forward(x.clone()), mask.clone(), None);
            x = x + h;
            x = x.clone() + layer.mlp.forward(layer.layer_norm2.forward(x));
            states.push(x.clone());
        }
        states
    }
}
