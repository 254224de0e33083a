//! Small building blocks shared by the model crates: HF activations and the two-layer MLP.
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation;
use serde::{Deserialize, Serialize};

/// Activation functions by their HF `hidden_act` names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `x·σ(1.702·x)`: OpenAI CLIP (`quick_gelu`).
    #[default]
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// erf GELU (`gelu`).
    #[serde(rename = "gelu")]
    Gelu,
    /// tanh approximation (`gelu_pytorch_tanh`, `gelu_new`).
    #[serde(rename = "gelu_pytorch_tanh", alias = "gelu_new")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

impl Activation {
    pub fn forward<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Activation::QuickGelu => x.clone() * activation::sigmoid(x.mul_scalar(1.702)),
            Activation::Gelu => activation::gelu(x),
            Activation::GeluTanh => activation::gelu_approximate(x),
            Activation::Relu => activation::relu(x),
        }
    }
}

/// `fc2(act(fc1(x)))` (transformers `CLIPMLP`, SAM `SamMLPBlock`).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: Backend> Mlp<B> {
    /// `d → hidden → d` with random weights (to be overwritten by a checkpoint).
    pub fn new(d: usize, hidden: usize, act: Activation, device: &B::Device) -> Self {
        Self { fc1: LinearConfig::new(d, hidden).init(device), fc2: LinearConfig::new(hidden, d).init(device), act }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.fc2.forward(self.act.forward(self.fc1.forward(x)))
    }
}
