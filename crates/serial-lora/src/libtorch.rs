//! Attention on LibTorch (`--device tch-*`) as one op with its own backward: PyTorch's fused
//! CPU kernel (`_scaled_dot_product_flash_attention_for_cpu`, the one `F.scaled_dot_product_attention`
//! runs on the CPU) forward, keeping only the output and the per-row log-sum-exp, and its
//! backward (`…_for_cpu_backward`) for dq, dk, dv.
//!
//! Burn 0.21's autodiff decomposes attention on every backend (the `[b, h, lq, lk]` scores and
//! probabilities are kept for the backward), and the inner LibTorch backend falls back to the
//! decomposed form for any additive bias. Here:
//! - `LibTorch` (inference): `scaled_dot_product_attention` with the bias as its float mask;
//! - `Autodiff<LibTorch>` on the CPU, when no gradient flows to the bias (CLIP's causal mask,
//!   SD3's unmasked joint attention): the fused kernel and its backward.
//!
//! A bias that needs a gradient (SAM's relative-position terms are computed from q) and
//! autodiff on CUDA keep Burn's decomposed path. Parity: the models' parity suites run on
//! `tch-cpu` in `cargo xtask ci` with the Flex tolerances.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::libtorch::TchTensor;
use burn::backend::{Autodiff, LibTorch};
use burn::prelude::*;

use crate::prim::{cast, prim, tensor};

/// `AutodiffTensor<LibTorch>` (its module is private in 0.21).
type AdTensor = <Autodiff<LibTorch> as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

/// q, k, v `[b, h, l, d]` and the additive bias given back when the op does not apply.
pub(crate) type Inputs<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 4>>);

/// Scaled dot-product attention on `LibTorch` / `Autodiff<LibTorch>` f32 tensors (see the
/// module header); `Err` with the inputs untouched for every other case.
pub(crate) fn sdpa<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, bias: Option<Tensor<B, 4>>, scale: f64) -> Result<Tensor<B, 4>, Inputs<B>> {
    use std::any::TypeId;
    let t = TypeId::of::<B>();
    if q.dtype() != burn::tensor::DType::F32 {
        return Err((q, k, v, bias));
    }
    if t == TypeId::of::<LibTorch>() {
        let [q, k, v]: [TchTensor; 3] = [q, k, v].map(|x| cast(prim(x)));
        let bias: Option<TchTensor> = bias.map(|b| cast(prim(b)));
        let o = tch::Tensor::scaled_dot_product_attention(&q.tensor, &k.tensor, &v.tensor, bias.as_ref().map(|b| &b.tensor), 0.0, false, scale, false);
        return Ok(tensor(cast(TchTensor::new(o))));
    }
    if t != TypeId::of::<Autodiff<LibTorch>>() {
        return Err((q, k, v, bias));
    }
    let ad = |x: &Tensor<B, 4>| -> AdTensor { cast(prim(x.clone())) };
    let on_cpu = ad(&q).primitive.tensor.device() == tch::Device::Cpu;
    let bias_tracked = bias.as_ref().is_some_and(|b| !ad(b).node.requirement.is_none());
    if !on_cpu || bias_tracked {
        return Err((q, k, v, bias));
    }
    let [q, k, v]: [AdTensor; 3] = [q, k, v].map(|x| cast(prim(x)));
    let mask = bias.map(|b| cast::<_, AdTensor>(prim(b)).primitive);
    Ok(tensor(cast(autodiff(q, k, v, mask, scale))))
}

/// Whether `x` is an `Autodiff<LibTorch>` tensor that no gradient flows to.
pub(crate) fn is_untracked<B: Backend, const D: usize>(x: &Tensor<B, D>) -> bool {
    std::any::TypeId::of::<B>() == std::any::TypeId::of::<Autodiff<LibTorch>>() && cast::<_, AdTensor>(prim(x.clone())).node.requirement.is_none()
}

/// What the backward needs: the inputs, the output and the log-sum-exp.
#[derive(Clone, Debug)]
struct Saved {
    q: TchTensor,
    k: TchTensor,
    v: TchTensor,
    mask: Option<TchTensor>,
    o: TchTensor,
    lse: TchTensor,
    scale: f64,
}

#[derive(Debug)]
struct FlashCpu;

impl Backward<LibTorch, 3> for FlashCpu {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = grads.consume::<LibTorch>(&ops.node);
        let st = &ops.state;
        let (dq, dk, dv) = tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu_backward(
            &dout.tensor,
            &st.q.tensor,
            &st.k.tensor,
            &st.v.tensor,
            &st.o.tensor,
            &st.lse.tensor,
            0.0,
            false,
            st.mask.as_ref().map(|m| &m.tensor),
            st.scale,
        );
        for (parent, grad) in ops.parents.iter().zip([dq, dk, dv]) {
            if let Some(node) = parent {
                grads.register::<LibTorch>(node.id, TchTensor::new(grad));
            }
        }
    }
}

fn autodiff(q: AdTensor, k: AdTensor, v: AdTensor, mask: Option<TchTensor>, scale: f64) -> AdTensor {
    let (o, lse) = tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu(
        &q.primitive.tensor,
        &k.primitive.tensor,
        &v.primitive.tensor,
        0.0,
        false,
        mask.as_ref().map(|m| &m.tensor),
        scale,
    );
    let (o, lse) = (TchTensor::new(o), TchTensor::new(lse));
    let nodes = [&q, &k, &v].map(|t| t.node.clone());
    match FlashCpu.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let st = Saved { q: q.primitive, k: k.primitive, v: v.primitive, mask, o: o.clone(), lse, scale };
            prep.finish(st, o)
        }
        OpsKind::UnTracked(prep) => prep.finish(o),
    }
}
