//! The MLP activations (erf GELU, tanh GELU, quick GELU) as single vectorised passes with their
//! own backward. Burn 0.21 computes them as chains of element-wise ops with scalar libm calls
//! (`erff`, `tanhf`, `powf`, `expf`: 10 % of an SD3 block's training step), keeps the
//! intermediates for the backward, and its default GELU backward is the tanh approximation's
//! derivative even for the erf GELU; here the backward is the exact derivative of the forward.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::DType;
use rayon::prelude::*;

use super::layout::contiguous;
use super::{AdTensor, keep, simd, uninit, widen};

/// The activations served here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Act {
    /// `x·Φ(x)` (`gelu`).
    Gelu,
    /// `½x(1 + tanh(√(2/π)(x + 0.044715x³)))` (`gelu_pytorch_tanh`).
    GeluTanh,
    /// `x·σ(1.702x)` (`quick_gelu`).
    QuickGelu,
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `f(x)` in one pass; `None` for a dtype other than f32 (the caller uses Burn's ops).
fn forward(act: Act, x: &FlexTensor) -> FlexTensor {
    let xs = x.as_slice::<f32>().expect("contiguous f32");
    // SAFETY: the chunks below cover every element
    let mut y = unsafe { uninit(x.layout().shape().clone()) };
    y.storage_mut::<f32>().par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).for_each(|(y, x)| simd::activation(act, x, y));
    y
}

/// `f'(x)·dy` in one pass.
fn backward(act: Act, x: &FlexTensor, dy: &FlexTensor) -> FlexTensor {
    let (xs, gs) = (x.as_slice::<f32>().expect("contiguous f32"), dy.as_slice::<f32>().expect("contiguous f32"));
    // SAFETY: the chunks below cover every element
    let mut dx = unsafe { uninit(x.layout().shape().clone()) };
    dx.storage_mut::<f32>()
        .par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
        .for_each(|(d, (x, g))| simd::activation_grad(act, x, g, d));
    dx
}

#[derive(Debug)]
struct Activation;

impl Backward<Flex, 1> for Activation {
    /// The input ([`keep`]: in half under [`crate::half::autocast`]) and the function.
    type State = (FlexTensor, Act);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let (x, act) = &ops.state;
        if let [Some(node)] = &ops.parents {
            grads.register::<Flex>(node.id, backward(*act, &widen(x), &dy));
        }
    }
}

/// `f(x)` on plain Flex tensors; `None` unless f32.
pub(crate) fn inference(act: Act, x: FlexTensor) -> Result<FlexTensor, FlexTensor> {
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    Ok(forward(act, &contiguous(x)))
}

/// `f(x)` on `Autodiff<Flex>` tensors with the backward above; `Err` (the input back) unless f32.
#[allow(clippy::result_large_err)] // the input handed back whole, by value, once per call
pub(crate) fn autodiff(act: Act, mut x: AdTensor) -> Result<AdTensor, AdTensor> {
    if x.primitive.dtype() != DType::F32 {
        return Err(x);
    }
    x.primitive = contiguous(x.primitive);
    let y = forward(act, &x.primitive);
    Ok(match Activation.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((keep(x.primitive), act), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    })
}
