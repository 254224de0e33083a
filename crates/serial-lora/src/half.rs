//! A frozen base held in half precision (`--dtype bf16|f16`), computed in f32.
//!
//! What is held in half: every frozen float parameter of rank ≥ 2 (linear and convolution
//! weights, embedding tables, position embeddings) — the model's bulk. Vectors (biases, norm
//! scales) stay f32, and so do the adapters, their gradients and the optimizer state, as PEFT
//! keeps them under autocast. The forward's activations are f32 throughout, so the norms'
//! statistics, the softmax and the loss are f32 (autocast's rules) — on the CPU backends the
//! point of the half base is memory.
//!
//! How a half parameter meets an f32 activation: each use casts it to f32 (a transient copy
//! of one layer's weight at a time). The copy must not outlive the layer: a plain
//! `x·cast(W)` under autodiff keeps `cast(W)` for the backward of a tracked `x`, which would
//! hold an f32 copy of every weight until the backward — more memory than the f32 model. So
//! [`linear`] records one op of its own whose backward keeps the half weight and casts it
//! again (`dx = dy·cast(W)ᵀ`); small layers (convolutions on pixels, embeddings, position
//! tables) go through [`f32_view`].
//!
//! The values are those of the f32 model whose weights are rounded to the half dtype
//! (`tests/half.rs`: the same bits).
//!
//! Training under [`autocast`] (the train commands do it with `--dtype bf16|f16`) also keeps
//! the largest activations saved for the backward pass in the half dtype, as `torch.autocast`
//! keeps the bf16 outputs of its matmuls: the MLP activation's input and the attention's q, k, v
//! (Flex's fused kernels). The forward is unchanged (computed in f32, the same bits); the
//! backward reads the rounded copies, so gradients move by bf16's rounding (`tests/half.rs`).
use std::cell::Cell;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::module::{Module, ModuleMapper, Param};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::backend::BackendTypes;
use serde::{Deserialize, Serialize};

use crate::layers::on_rows;
use crate::prim::{cast, prim, return_on_autodiff, tensor};

/// The dtype the frozen base is held in (`torch_dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseDType {
    #[default]
    F32,
    Bf16,
    F16,
}

impl BaseDType {
    /// Burn's dtype.
    pub fn dtype(self) -> DType {
        match self {
            BaseDType::F32 => DType::F32,
            BaseDType::Bf16 => DType::BF16,
            BaseDType::F16 => DType::F16,
        }
    }

    /// The dtype of a safetensors header's `dtype` field ("F32", "BF16", "F16"; F64 → f32).
    pub fn from_safetensors(name: &str) -> Option<Self> {
        match name {
            "F32" | "F64" => Some(BaseDType::F32),
            "BF16" => Some(BaseDType::Bf16),
            "F16" => Some(BaseDType::F16),
            _ => None,
        }
    }

    /// The name on the command line and in run configs.
    pub fn name(self) -> &'static str {
        match self {
            BaseDType::F32 => "f32",
            BaseDType::Bf16 => "bf16",
            BaseDType::F16 => "f16",
        }
    }
}

impl std::str::FromStr for BaseDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(BaseDType::F32),
            "bf16" | "bfloat16" => Ok(BaseDType::Bf16),
            "f16" | "float16" => Ok(BaseDType::F16),
            _ => Err(format!("unknown dtype `{s}` (expected f32, bf16 or f16)")),
        }
    }
}

impl std::fmt::Display for BaseDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

thread_local! {
    static AUTOCAST: Cell<Option<DType>> = const { Cell::new(None) };
}

/// Runs `f` (a training forward pass) with the activations that ops save for the backward pass
/// kept in `dtype` where this crate's kernels save them (Flex: the MLP activations' inputs and
/// the fused attention's q, k, v), as `torch.autocast(dtype=…)` keeps the half outputs of its
/// matmuls. Forward values are not changed. `F32` (and other backends) keep everything in f32.
/// Per thread, restored afterwards; a checkpointed block's recomputation runs under the setting
/// of its first pass.
pub fn autocast<R>(dtype: BaseDType, f: impl FnOnce() -> R) -> R {
    with_saved_dtype((dtype != BaseDType::F32).then(|| dtype.dtype()), f)
}

/// The dtype [`autocast`] keeps saved activations in on this thread (`None`: f32).
pub(crate) fn saved_dtype() -> Option<DType> {
    AUTOCAST.with(Cell::get)
}

/// Runs `f` with [`saved_dtype`] set to `dtype` (restored afterwards, also on unwinding).
pub(crate) fn with_saved_dtype<R>(dtype: Option<DType>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<DType>);
    impl Drop for Restore {
        fn drop(&mut self) {
            AUTOCAST.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(AUTOCAST.with(|a| a.replace(dtype)));
    f()
}

/// `t` in f32: itself when it is f32, else a cast copy.
pub fn f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    as_dtype_of(t, DType::F32)
}

/// `t.cast(to)`, on Flex by a kernel of ours between f32 and the half types (`flex::convert`:
/// Burn 0.21's Flex cast makes an f64 copy of the whole tensor) for a `Flex` tensor or an
/// untracked `Autodiff<Flex>` one.
fn cast_to<B: Backend, const D: usize>(t: Tensor<B, D>, to: DType) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    {
        use crate::flex::{AdTensor, Kind, convert, kind};
        use burn::backend::Flex;
        match kind::<B>() {
            Some(Kind::Inner) => match convert(cast(prim(t)), to) {
                Ok(y) => return tensor(cast(y)),
                Err(x) => return tensor::<B, D>(cast(x)).cast(to),
            },
            Some(Kind::Autodiff) if crate::flex::is_untracked(&t) => {
                let a: AdTensor = cast(prim(t.clone()));
                if let Ok(y) = convert(a.primitive, to) {
                    return cast::<_, Tensor<B, D>>(Tensor::<Autodiff<Flex>, D>::from_inner(tensor(y)));
                }
            }
            _ => {}
        }
    }
    t.cast(to)
}

/// `t` in `like`'s dtype (how a computed weight goes back into a half parameter).
pub fn as_dtype_of<B: Backend, const D: usize>(t: Tensor<B, D>, like: DType) -> Tensor<B, D> {
    if t.dtype() == like { t } else { cast_to(t, like) }
}

/// Casts every float parameter of a module to f32 (see [`f32_view`]).
struct ToF32;

impl<B: Backend> ModuleMapper<B> for ToF32 {
    fn map_float<const K: usize>(&mut self, param: Param<Tensor<B, K>>) -> Param<Tensor<B, K>> {
        let t = param.val();
        if t.dtype() == DType::F32 {
            return param;
        }
        let require_grad = t.is_require_grad();
        Param::initialized(param.id, f32(t.detach())).set_require_grad(require_grad)
    }
}

/// A copy of a small module with its half parameters cast to f32, to run as it is (no-op
/// for an f32 module). For layers whose weights are small or whose input is untracked
/// (convolutions on pixels, embeddings); a large weight applied to a tracked input goes
/// through [`linear`].
pub fn f32_view<B: Backend, M: Module<B>>(module: &M) -> M {
    module.clone().map(&mut ToF32)
}

/// Holds the base of `module` in `dtype`, frozen: every float parameter of rank ≥ 2 outside the
/// adapter pairs ([`crate::LoraPair`], which stay f32 and trainable). For a model built or loaded in f32 (the
/// loaders cast while reading instead). A lazily initialized parameter stays lazy: it is made in
/// f32 and cast on first use, one at a time, so the f32 model never exists whole.
pub fn hold_base_in<B: Backend, M: Module<B>>(module: M, dtype: BaseDType) -> M {
    struct Cast {
        to: DType,
        /// Depth inside adapter pairs.
        in_pair: usize,
    }
    impl<B: Backend> ModuleMapper<B> for Cast {
        fn enter_module(&mut self, _: &str, container_type: &str) {
            self.in_pair += usize::from(container_type == "Struct:LoraPair");
        }
        fn exit_module(&mut self, _: &str, container_type: &str) {
            self.in_pair -= usize::from(container_type == "Struct:LoraPair");
        }
        fn map_float<const K: usize>(&mut self, param: Param<Tensor<B, K>>) -> Param<Tensor<B, K>> {
            if K < 2 || self.in_pair > 0 {
                return param;
            }
            let to = self.to;
            // frozen first: a lazy parameter stays lazy (made untracked in f32 and cast when
            // first used; a tracked f32 leaf would stay alive in the autodiff graph)
            param.set_require_grad(false).init_mapper(move |t| as_dtype_of(t, to).detach())
        }
    }
    module.map(&mut Cast { to: dtype.dtype(), in_pair: 0 })
}

/// `x·W + b` for a base `Linear` (`W ∈ [in, out]`), also when its weight is held in half
/// precision: then computed in f32 as `x·cast(W) + cast(b)` without keeping `cast(W)` for the
/// backward (see the module docs). The same values as `Linear::forward` on the f32 cast.
pub fn linear<B: Backend, const D: usize>(l: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let w = l.weight.val();
    if w.dtype() == x.dtype() {
        #[cfg(feature = "flex")]
        if crate::flex::kind::<B>().is_some() {
            return on_rows(x, |x| flex_linear(l, x));
        }
        return l.forward(x);
    }
    on_rows(x, |x| {
        return_on_autodiff!(B, IB => autodiff::<IB, B>(l, x));
        plain(l, x)
    })
}

/// An f32 `Linear` on Flex ([`crate::flex::linear`]: the bias added inside the product, the
/// columns split among threads), `Linear::forward` where the dtypes are not its own.
#[cfg(feature = "flex")]
fn flex_linear<B: Backend>(l: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    use crate::flex::{Kind, linear};
    let (w, b) = (prim(l.weight.val()), l.bias.as_ref().map(|b| prim(b.val())));
    let y = match crate::flex::kind::<B>() {
        Some(Kind::Inner) => linear::inference(cast(prim(x.clone())), cast(w), b.map(cast)).map(cast),
        Some(Kind::Autodiff) => linear::autodiff(cast(prim(x.clone())), cast(w), b.map(cast)).map(cast),
        None => None,
    };
    match y {
        Some(y) => tensor(y),
        None => l.forward(x),
    }
}

/// The rows of an embedding table for `ids ∈ [batch, seq]`, in f32: looked up in the table's
/// own dtype, then cast (a half table is never copied whole).
pub fn embedding<B: Backend>(e: &burn::nn::Embedding<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    f32(burn::tensor::module::embedding(e.weight.val(), ids))
}

/// `x·cast(W) + cast(b)` with the tensor ops of `B`.
fn plain<B: Backend>(l: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    cast_linear(x, l.weight.val(), l.bias.as_ref().map(|b| b.val()))
}

/// `x·cast(w) + cast(b)`: on Flex without an f32 copy of the whole weight
/// ([`crate::flex::half_linear`]: a block of columns at a time, the same values), elsewhere
/// with the weight cast whole.
fn cast_linear<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>, b: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
    #[cfg(feature = "flex")]
    if matches!(crate::flex::kind::<B>(), Some(crate::flex::Kind::Inner)) {
        use burn::backend::flex::FlexTensor;
        let flex = |t: burn::tensor::TensorPrimitive<B>| cast::<_, FlexTensor>(t.tensor());
        let (xp, wp) = (flex(x.clone().into_primitive()), flex(w.clone().into_primitive()));
        let bp = b.as_ref().map(|b| flex(b.clone().into_primitive()));
        if let Some(y) = crate::flex::half_linear(&xp, &wp, bp.as_ref()) {
            return tensor(cast(y));
        }
    }
    burn::tensor::module::linear(x, f32(w), b.map(f32))
}

type AdPrim<IB> = <Autodiff<IB> as BackendTypes>::FloatTensorPrimitive;

/// The backward of a half-weight linear: `dx = dy·cast(W)ᵀ` (W kept in half).
#[derive(Debug)]
struct HalfLinear;

impl<IB: Backend> Backward<IB, 1> for HalfLinear {
    /// The half weight `[in, out]`.
    type State = IB::FloatTensorPrimitive;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<IB>(&ops.node);
        let w = prim(f32(tensor::<IB, 2>(ops.state)));
        if let [Some(node)] = ops.parents {
            // the op autodiff's own `linear` backward calls: the same bits as the f32 model
            grads.register::<IB>(node.id, IB::linear_x_backward(w, dy));
        }
    }
}

fn autodiff<IB: Backend, B: Backend>(l: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    // weights that need a gradient (a trained base) keep the plain path and its gradients
    if l.weight.val().is_require_grad() || l.bias.as_ref().is_some_and(|b| b.val().is_require_grad()) {
        return plain(l, x);
    }
    let inner = |t: Tensor<B, 2>| cast::<_, Tensor<Autodiff<IB>, 2>>(t).inner();
    let w = inner(l.weight.val());
    let xa: AdPrim<IB> = cast(prim(x));
    let xi = tensor::<IB, 2>(xa.primitive.clone());
    let b = l.bias.as_ref().map(|b| cast::<_, Tensor<Autodiff<IB>, 1>>(b.val()).inner());
    let y = prim(cast_linear(xi, w.clone(), b));
    let out: AdPrim<IB> = match HalfLinear.prepare::<NoCheckpointing>([xa.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(prim(w), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    tensor::<B, 2>(cast(out))
}
