//! Small building blocks shared by the model crates: HF activations, the two-layer MLP,
//! [`on_rows`] for token-wise layers, [`contiguous`], and adaLN's [`modulated_layer_norm`] and
//! [`gated_residual`].
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation;
use serde::{Deserialize, Serialize};

/// Applies the token-wise `f` to `x ∈ [..., k]` viewed as 2-D `[rows, k]`, and restores the
/// leading dimensions. Flex runs a batched `[b, m, k]·[k, n]` as `b` gemms that each pack the
/// weight again (SAM's `[1, 32, 32, 768]` grid: 32 gemms of 32 rows; CLIP: one per image), and
/// the weight gradient of a batched product is `b` products summed; as 2-D it is one of each.
pub fn on_rows<B: Backend, const D: usize>(x: Tensor<B, D>, f: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>) -> Tensor<B, D> {
    let mut dims = x.dims();
    let rows = dims[..D - 1].iter().product();
    let y = f(x.reshape([rows, dims[D - 1]]));
    dims[D - 1] = y.dims()[1];
    y.reshape(dims)
}

/// `x·w` for `x ∈ [m, k]`, `w ∈ [k, n]`: on f32 Flex (outside [`crate::half::autocast`]) through
/// [`crate::flex::linear`], whose threads split the output by columns, or by rows where it is
/// narrow (a LoRA product's rank-r side); elsewhere `matmul`. The same dot products either way.
pub fn matmul<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(feature = "flex")]
    if crate::half::saved_dtype().is_none() && x.dtype() == burn::tensor::DType::F32 && w.dtype() == burn::tensor::DType::F32 {
        use crate::flex::{Kind, cast, linear, prim, tensor};
        let y = match crate::flex::kind::<B>() {
            Some(Kind::Inner) => linear::inference(cast(prim(x.clone())), cast(prim(w.clone())), None).map(cast),
            Some(Kind::Autodiff) => linear::autodiff(cast(prim(x.clone())), cast(prim(w.clone())), None).map(cast),
            None => None,
        };
        if let Some(y) = y {
            return tensor(y);
        }
    }
    x.matmul(w)
}

/// `x` laid out contiguously, so that the reshape after a permute, a narrow or a window
/// partition is free: on Flex one parallel copy ([`crate::flex::layout`]; the gradient passes
/// through), elsewhere `x` itself (those backends copy inside their reshape as they need).
pub fn contiguous<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    {
        use crate::flex::{Kind, cast, layout, prim, tensor};
        match crate::flex::kind::<B>() {
            Some(Kind::Inner) => return tensor(cast(layout::contiguous(cast(prim(x))))),
            Some(Kind::Autodiff) => return tensor(cast(layout::autodiff(cast(prim(x))))),
            None => {}
        }
    }
    x
}

/// LayerNorm over the last dimension without affine parameters of its own (biased variance),
/// then `·w + b` with `w`, `b` of `[g, d]`: one row for all tokens, or one per sample (`g` =
/// the batch; adaLN's `1 + scale` and `shift`). On Flex one parallel pass with its own
/// backward ([`crate::flex::norm`]); elsewhere Burn's ops.
pub fn modulated_layer_norm<B: Backend, const D: usize>(x: Tensor<B, D>, w: Option<Tensor<B, 2>>, b: Option<Tensor<B, 2>>, eps: f64) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    if let Some(y) = flex_rows(crate::flex::norm::Op::Norm { eps: eps as f32 }, &x, None, w.as_ref(), b.as_ref()) {
        return y;
    }
    let dims = x.dims();
    let d = dims[D - 1];
    let g = w.as_ref().or(b.as_ref()).map_or(1, |t| t.dims()[0]);
    let x = x.reshape([g, dims.iter().product::<usize>() / d / g, d]);
    let centered = x.clone() - x.mean_dim(2);
    let var = centered.clone().powi_scalar(2).mean_dim(2);
    let mut y = centered / var.add_scalar(eps).sqrt();
    if let Some(w) = w {
        y = y * w.unsqueeze_dim(1);
    }
    if let Some(b) = b {
        y = y + b.unsqueeze_dim(1);
    }
    y.reshape(dims)
}

/// `x + w·h`, the gated residual of adaLN-Zero blocks, with the gate `w` of `[g, d]` (one row
/// per sample). On Flex one parallel pass with its own backward; elsewhere Burn's ops.
pub fn gated_residual<B: Backend, const D: usize>(x: Tensor<B, D>, h: Tensor<B, D>, w: Tensor<B, 2>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    if let Some(y) = flex_rows(crate::flex::norm::Op::Gate, &x, Some(&h), Some(&w), None) {
        return y;
    }
    let dims = x.dims();
    let (d, g) = (dims[D - 1], w.dims()[0]);
    let shape = [g, dims.iter().product::<usize>() / d / g, d];
    (x.reshape(shape) + w.unsqueeze_dim(1) * h.reshape(shape)).reshape(dims)
}

/// [`crate::flex::norm`] when `B` is Flex (with or without autodiff) and the shapes are its own.
#[cfg(feature = "flex")]
fn flex_rows<B: Backend, const D: usize>(
    op: crate::flex::norm::Op,
    x: &Tensor<B, D>,
    h: Option<&Tensor<B, D>>,
    w: Option<&Tensor<B, 2>>,
    b: Option<&Tensor<B, 2>>,
) -> Option<Tensor<B, D>> {
    use crate::flex::{Kind, cast, norm, prim, tensor};
    fn p<B: Backend, const N: usize, T: 'static>(t: &Tensor<B, N>) -> T {
        cast(prim(t.clone()))
    }
    Some(tensor(match crate::flex::kind::<B>()? {
        Kind::Inner => cast(norm::inference(op, p(x), h.map(p), w.map(p), b.map(p))?),
        Kind::Autodiff => cast(norm::autodiff(op, p(x), h.map(p), w.map(p), b.map(p))?),
    }))
}

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
        #[cfg(feature = "flex")]
        let x = match self.flex(x) {
            Ok(y) => return y,
            Err(x) => x,
        };
        match self {
            Activation::QuickGelu => x.clone() * activation::sigmoid(x.mul_scalar(1.702)),
            Activation::Gelu => activation::gelu(x),
            Activation::GeluTanh => activation::gelu_approximate(x),
            Activation::Relu => activation::relu(x),
        }
    }

    /// On Flex (with or without autodiff), in f32: one vectorised pass with its own exact
    /// backward (`crate::flex::activation`); `Err(x)` elsewhere.
    #[cfg(feature = "flex")]
    fn flex<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
        use crate::flex::activation::{self as fa, Act};
        use crate::flex::{Kind, cast, prim, tensor};
        let act = match self {
            Activation::Gelu => Act::Gelu,
            Activation::GeluTanh => Act::GeluTanh,
            Activation::QuickGelu => Act::QuickGelu,
            Activation::Relu => return Err(x),
        };
        let Some(kind) = crate::flex::kind::<B>() else { return Err(x) };
        let p = prim(x);
        Ok(tensor(match kind {
            Kind::Inner => cast(fa::inference(act, cast(p)).map_err(|p| tensor(cast(p)))?),
            Kind::Autodiff => cast(fa::autodiff(act, cast(p)).map_err(|p| tensor(cast(p)))?),
        }))
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
        on_rows(x, |x| crate::half::linear(&self.fc2, self.act.forward(crate::half::linear(&self.fc1, x))))
    }
}
