//! Block-level gradient checkpointing: a transformer block run through [`checkpoint`] keeps only
//! its input for the backward pass; its activations are recomputed there. This is what
//! `torch.utils.checkpoint` does for diffusers' and transformers' `gradient_checkpointing_enable()`.
//!
//! How, on `Autodiff<B>` (Flex, LibTorch, CUDA):
//! - forward: the block runs once on untracked copies of its input and parameters, so autodiff
//!   records and keeps nothing inside it; one op of ours is recorded instead, whose parents are
//!   the block input and the block's trainable parameters (flattened into one tensor);
//! - backward of that op: the block runs again from its saved input on a fresh graph whose
//!   leaves are the input and the trainable parameters, `Σ y ∘ dy` is backpropagated through it,
//!   and the gradients of the leaves go to the op's parents.
//!
//! The recomputation runs the same operations on the same values as the first pass, and the
//! forward of the first pass runs the same operations as it would without checkpointing (the
//! block's choice of evaluation order by whether its input is tracked is kept: see
//! [`assumes_tracked`]), so the gradients are bit-identical to a run without checkpointing
//! (`tests/checkpoint.rs`). Backward ops that run a backward pass of their own need the patched
//! `burn-autodiff` of this workspace (`vendor/burn-autodiff`).
//!
//! The recomputation skips the fused attention's forward kernel where it can (Flex): the first
//! pass keeps each attention's output and log-sum-exp ([`memoized`], in call order) and the
//! recomputation takes them instead of computing them again: the same values, one attention
//! output per block more memory, the attention's share of the forward less time.
//!
//! Adapter dropout draws the same masks in both passes: both run on copies of the block taken
//! at the same place of its dropout stream. The block itself is not moved along that stream, so
//! a block run twice between two reseeds (`AdaptedModel::with_dropout_seed`, once per
//! micro-batch in the training loops) would draw the same masks twice; no model here does.
//!
//! Switched on per thread: model code calls [`checkpoint`] around each block, and it only
//! checkpoints inside [`with_checkpointing`]`(true, ..)` and on an autodiff backend.
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::backend::BackendTypes;

use crate::prim::{cast, prim, return_on_autodiff, tensor};

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    static ASSUME_TRACKED: Cell<bool> = const { Cell::new(false) };
    static MEMO: RefCell<Memo> = const { RefCell::new(Memo::Off) };
}

/// Results kept from a checkpointed block's first pass for its recomputation.
enum Memo {
    Off,
    /// First pass: results appended in call order.
    Record(Vec<Box<dyn Any + Send>>),
    /// Recomputation: results taken in the same order.
    Replay(VecDeque<Box<dyn Any + Send>>),
}

/// `compute()`, except in the recomputation of a checkpointed block, where the result the first
/// pass computed at the same place is taken instead (when it `fits`; else computed again). In the
/// first pass the result is kept for that. The block runs the same ops in the same order both
/// times, so the n-th call of one pass is the n-th call of the other.
pub(crate) fn memoized<T: Clone + Send + 'static>(fits: impl Fn(&T) -> bool, compute: impl FnOnce() -> T) -> T {
    let kept = MEMO.with(|m| match &mut *m.borrow_mut() {
        Memo::Replay(q) => q.pop_front(),
        _ => None,
    });
    if let Some(v) = kept.and_then(|b| b.downcast::<T>().ok()).filter(|v| fits(v)) {
        return *v;
    }
    let v = compute();
    MEMO.with(|m| {
        if let Memo::Record(list) = &mut *m.borrow_mut() {
            list.push(Box::new(v.clone()));
        }
    });
    v
}

/// Runs `f` with `memo` installed, returning what is left of it.
fn with_memo<R>(memo: Memo, f: impl FnOnce() -> R) -> (R, Memo) {
    let before = MEMO.with(|m| m.replace(memo));
    let r = f();
    (r, MEMO.with(|m| m.replace(before)))
}

/// Runs `f` with block checkpointing on or off on this thread (restored afterwards).
pub fn with_checkpointing<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let before = ENABLED.with(|e| e.replace(on));
    let r = f();
    ENABLED.with(|e| e.set(before));
    r
}

/// Whether [`checkpoint`] checkpoints on this thread.
pub fn enabled() -> bool {
    ENABLED.with(Cell::get)
}

/// Inside the untracked first pass of a checkpointed block whose real input is tracked: code
/// that picks its evaluation order by whether its input is tracked (`Attention::qkv`) must pick
/// as it would for the real input, so that the values are the same as without checkpointing.
pub(crate) fn assumes_tracked() -> bool {
    ASSUME_TRACKED.with(Cell::get)
}

/// The forward of a block: the module and its input.
type BlockFn<M, B, const D: usize> = Arc<dyn Fn(&M, Tensor<B, D>) -> Tensor<B, D> + Send + Sync>;

/// `f(module, x)`, checkpointed when it is switched on ([`with_checkpointing`]) and `B` is an
/// autodiff backend of this build (`Autodiff<Flex>`, `Autodiff<LibTorch>`, `Autodiff<Cuda>`);
/// plainly otherwise. `f` must be a function of the module and `x` alone (anything else it
/// reads must not need a gradient).
pub fn checkpoint<B, M, const D: usize>(module: &M, x: Tensor<B, D>, f: impl Fn(&M, Tensor<B, D>) -> Tensor<B, D> + Send + Sync + 'static) -> Tensor<B, D>
where
    B: Backend,
    M: Module<B> + 'static,
{
    if !enabled() {
        return f(module, x);
    }
    let f: BlockFn<M, B, D> = Arc::new(f);
    return_on_autodiff!(B, IB => run::<IB, B, M, D>(module, x, f));
    f(module, x)
}

/// The autodiff tensor primitive of `Autodiff<IB>`.
type AdPrim<IB> = <Autodiff<IB> as BackendTypes>::FloatTensorPrimitive;

/// The trainable parameters of a module, each flattened, in visiting order.
struct Trainable<B: Backend> {
    flat: Vec<Tensor<B, 1>>,
}

impl<B: Backend> ModuleVisitor<B> for Trainable<B> {
    fn visit_float<const K: usize>(&mut self, p: &Param<Tensor<B, K>>) {
        let t = p.val();
        if t.is_require_grad() {
            let n = t.shape().num_elements();
            self.flat.push(t.reshape([n]));
        }
    }
}

/// Replaces each trainable parameter by a fresh leaf with its value (in visiting order, as
/// [`Trainable`]) and keeps how to read the leaf's gradient, flattened.
struct Leaves<IB: Backend, B: Backend> {
    grads: Vec<GradOf<IB>>,
    _b: PhantomData<fn() -> B>,
}

type GradOf<IB> = Box<dyn Fn(&Gradients) -> Tensor<IB, 1>>;

impl<IB: Backend, B: Backend> ModuleMapper<B> for Leaves<IB, B> {
    fn map_float<const K: usize>(&mut self, param: Param<Tensor<B, K>>) -> Param<Tensor<B, K>> {
        let t = param.val();
        if !t.is_require_grad() {
            return param;
        }
        let leaf = t.detach().require_grad();
        let ad: Tensor<Autodiff<IB>, K> = cast(leaf.clone());
        let (n, device) = (ad.shape().num_elements(), ad.device());
        self.grads.push(Box::new(move |g| ad.grad(g).map(|t| t.reshape([n])).unwrap_or_else(|| Tensor::zeros([n], &device))));
        Param::initialized(param.id, leaf)
    }
}

/// The recorded op: the block, its saved input and whether that input is tracked.
struct Recompute<IB: Backend, B: Backend, M, const D: usize> {
    module: M,
    x: IB::FloatTensorPrimitive,
    x_tracked: bool,
    f: BlockFn<M, B, D>,
    /// What the first pass kept ([`memoized`]).
    kept: Vec<Box<dyn Any + Send>>,
    /// The first pass's [`crate::half::autocast`] setting, for the recomputation.
    saved_dtype: Option<burn::tensor::DType>,
}

impl<IB: Backend, B: Backend, M, const D: usize> std::fmt::Debug for Recompute<IB, B, M, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Recompute")
    }
}

impl<IB: Backend, B: Backend, M: Module<B> + 'static, const D: usize, const N: usize> Backward<IB, N> for Recompute<IB, B, M, D> {
    type State = ();

    fn backward(self, ops: Ops<(), N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = tensor::<IB, D>(grads.consume::<IB>(&ops.node));
        let x = Tensor::<Autodiff<IB>, D>::from_inner(tensor::<IB, D>(self.x));
        let x = if self.x_tracked { x.require_grad() } else { x };
        let mut leaves = Leaves::<IB, B> { grads: Vec::new(), _b: PhantomData };
        let module = self.module.map(&mut leaves);
        let f = self.f;
        let replay = || with_memo(Memo::Replay(self.kept.into()), || (f)(&module, cast(x.clone()))).0;
        let y = crate::half::with_saved_dtype(self.saved_dtype, replay);
        let y: Tensor<Autodiff<IB>, D> = cast(y);
        let g = (y * Tensor::from_inner(dy)).sum().backward();
        let mut parents = ops.parents.iter();
        if let Some(Some(node)) = parents.next() {
            let dx = x.grad(&g).unwrap_or_else(|| Tensor::zeros(x.shape(), &x.device()));
            grads.register::<IB>(node.id, prim(dx));
        }
        if let Some(Some(node)) = parents.next() {
            let dp = Tensor::cat(leaves.grads.iter().map(|get| get(&g)).collect(), 0);
            grads.register::<IB>(node.id, prim(dp));
        }
    }
}

fn finish<IB: Backend, B: Backend, M: Module<B> + 'static, const D: usize, const N: usize>(
    op: Recompute<IB, B, M, D>,
    parents: [&AdPrim<IB>; N],
    out: IB::FloatTensorPrimitive,
) -> AdPrim<IB> {
    match op.prepare::<NoCheckpointing>(parents.map(|p| p.node.clone())).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

fn run<IB: Backend, B: Backend, M: Module<B> + 'static, const D: usize>(module: &M, x: Tensor<B, D>, f: BlockFn<M, B, D>) -> Tensor<B, D> {
    let mut trainable = Trainable { flat: Vec::new() };
    module.visit(&mut trainable);
    let x_tracked = !cast::<_, AdPrim<IB>>(prim(x.clone())).node.requirement.is_none();
    // the first pass, untracked: nothing inside the block is recorded or kept
    let previous = ASSUME_TRACKED.with(|a| a.replace(x_tracked));
    let (y, kept) = with_memo(Memo::Record(Vec::new()), || f(&module.clone().no_grad(), x.clone().detach()));
    ASSUME_TRACKED.with(|a| a.set(previous));
    let kept = match kept {
        Memo::Record(list) => list,
        _ => Vec::new(),
    };
    let y: AdPrim<IB> = cast(prim(y));
    let x: AdPrim<IB> = cast(prim(x));
    let op = Recompute::<IB, B, M, D> { module: module.clone(), x: x.primitive.clone(), x_tracked, f, kept, saved_dtype: crate::half::saved_dtype() };
    let out = if trainable.flat.is_empty() {
        finish(op, [&x], y.primitive)
    } else {
        // The flattened parameters stay referenced until `cat` is recorded: each is a graph of
        // its own until then, and a graph no live tensor refers to is freed by the sweep that
        // ends any backward pass in the process (another thread's too), which would cut the
        // parameters off this op's gradient.
        let held = trainable.flat.clone();
        let p: AdPrim<IB> = cast(prim(Tensor::cat(trainable.flat, 0)));
        drop(held);
        finish(op, [&x, &p], y.primitive)
    };
    tensor::<B, D>(cast(out))
}
