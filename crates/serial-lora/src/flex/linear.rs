//! `x·W + b` for the base linears on Flex, with its own backward.
//!
//! Burn's `linear` is a matmul and then a broadcast bias add on one thread (a full pass over the
//! output: SD3's `[1024, 6144]` MLP activations); and Flex hands each product to gemm's own
//! threading, where every thread packs the same weight panels. Here the output is filled with
//! the bias (in parallel) and gemm accumulates onto it, and the columns of the product are split
//! among the threads, each packing only its own slice of the weight; an output too narrow for
//! that (a LoRA product's rank-r side, [`crate::layers::matmul`]) is split by rows instead
//! (SD3's `[1024, 1536]·[1536, 32]·[32, 1536]`, forward and backward: 6.6–8.7 → 4.0–4.3 ms
//! against Flex's matmul). The backward gives
//! `dx = dy·Wᵀ`, `dW = xᵀ·dy` and `db = Σ dy` for the inputs that are tracked (a frozen base
//! weight: `dx` alone). Each output element is the dot product gemm computes for Burn's matmul,
//! plus the bias (`tests/flex_kernels.rs`).
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{DType, Shape};
use rayon::prelude::*;

use super::layout::contiguous;
use super::{AdTensor, Out, keep, uninit, widen};

/// An f32 matrix read in place: pointer and (row, column) strides in elements.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

// SAFETY: read-only views of tensors that outlive the parallel section
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    /// A 2-D f32 tensor with non-negative strides.
    fn of(t: &FlexTensor) -> Option<Self> {
        let l = t.layout();
        if t.dtype() != DType::F32 || l.num_dims() != 2 || l.strides().iter().any(|&s| s < 0) {
            return None;
        }
        let ptr = t.storage::<f32>().as_ptr().wrapping_add(l.start_offset());
        Some(Self { ptr, rs: l.strides()[0], cs: l.strides()[1] })
    }

    /// The pointer (a method, so that closures capture the `Sync` matrix, not the raw field).
    fn at(self, offset: isize) -> *const f32 {
        self.ptr.wrapping_offset(offset)
    }

    fn t(self) -> Self {
        Self { rs: self.cs, cs: self.rs, ..self }
    }
}

/// Column slices narrower than this are not split further among threads.
const MIN_COLS: usize = 64;

/// `c[m×n] (+)= a[m×k]·b[k×n]` into a row-major `c`, split among the threads by columns (each
/// packs only its slice of `b`), or by rows where the output is too narrow for that (a LoRA
/// product's rank-r side); without `accumulate`, every element of `c` is written (it may start
/// uninitialised).
fn gemm(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut FlexTensor, accumulate: bool) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.storage_mut::<f32>().fill(0.0);
        }
        return;
    }
    let out = Out::of(c);
    let threads = rayon::current_num_threads();
    let parallel = threads > 1 && m * n * k >= 64 * 64 * 64;
    let by_rows = n < 2 * MIN_COLS;
    let tasks = if !parallel {
        1
    } else if by_rows {
        threads.min(m / 16).max(1)
    } else {
        threads.min(n / MIN_COLS).max(1)
    };
    let per = if by_rows { m.div_ceil(tasks) } else { n.div_ceil(tasks) };
    let run = |t: usize| {
        let (i0, rows, j0, cols) = if by_rows { (t * per, per.min(m - t * per), 0, n) } else { (0, m, t * per, per.min(n - t * per)) };
        // SAFETY: `a` addresses [m, k] and `b` [k, n] with their strides; the destination is
        // rows i0..i0 + rows, columns j0..j0 + cols of the row-major [m, n] output, disjoint
        // between tasks
        unsafe {
            gemm::gemm(
                rows,
                cols,
                k,
                out.at(i0 * n + j0),
                1,
                n as isize,
                accumulate,
                a.at(i0 as isize * a.rs),
                a.cs,
                a.rs,
                b.at(j0 as isize * b.cs),
                b.cs,
                b.rs,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    let count = if by_rows { m.div_ceil(per) } else { n.div_ceil(per) };
    if count > 1 {
        (0..count).into_par_iter().for_each(run);
    } else {
        run(0);
    }
}

/// `x [m, k]·w [k, n] + b [n]`; `None` unless all are f32 (and `b` contiguous).
fn forward(x: &FlexTensor, w: &FlexTensor, b: Option<&FlexTensor>) -> Option<FlexTensor> {
    let (xm, wm) = (Mat::of(x)?, Mat::of(w)?);
    let (xs, ws) = (x.layout().shape(), w.layout().shape());
    let (m, k, n) = (xs[0], xs[1], ws[1]);
    if ws[0] != k {
        return None;
    }
    let bias = match b {
        Some(b) if b.dtype() != DType::F32 || b.layout().shape().num_elements() != n => return None,
        Some(b) => Some(contiguous(b.clone())),
        None => None,
    };
    // SAFETY: every element is the bias written below, or written by `gemm` without it
    let mut y = unsafe { uninit(Shape::new([m, n])) };
    if let Some(bias) = &bias {
        let bias = bias.storage::<f32>();
        y.storage_mut::<f32>().par_chunks_mut(n.max(1)).for_each(|row| row.copy_from_slice(bias));
    }
    gemm(m, n, k, xm, wm, &mut y, bias.is_some());
    Some(y)
}

/// `x·w + b` on plain Flex tensors (`x [m, k]`); `None` where the dtypes are not f32.
pub(crate) fn inference(x: FlexTensor, w: FlexTensor, b: Option<FlexTensor>) -> Option<FlexTensor> {
    forward(&x, &w, b.as_ref())
}

/// The backward's inputs: `x` ([`keep`]) when the weight is tracked, the weight itself.
#[derive(Debug, Clone)]
struct State {
    x: Option<FlexTensor>,
    w: FlexTensor,
}

#[derive(Debug)]
struct Linear<const N: usize>;

impl<const N: usize> Backward<Flex, N> for Linear<N> {
    type State = State;

    fn backward(self, ops: Ops<State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let dym = Mat::of(&dy).expect("f32 gradient");
        let st = &ops.state;
        let wm = Mat::of(&st.w).expect("f32 weight");
        let [k, n] = [st.w.layout().shape()[0], st.w.layout().shape()[1]];
        let m = dy.layout().shape()[0];
        let mut out = Vec::new();
        if let Some(Some(node)) = ops.parents.first() {
            // SAFETY: written whole by `gemm` (no accumulation)
            let mut dx = unsafe { uninit(Shape::new([m, k])) };
            gemm(m, k, n, dym, wm.t(), &mut dx, false);
            out.push((node.id, dx));
        }
        if let (Some(Some(node)), Some(x)) = (ops.parents.get(1), &st.x) {
            let x = widen(x);
            // SAFETY: written whole by `gemm` (no accumulation)
            let mut dw = unsafe { uninit(Shape::new([k, n])) };
            gemm(k, n, m, Mat::of(&x).expect("f32 input").t(), dym, &mut dw, false);
            out.push((node.id, dw));
        }
        if let Some(Some(node)) = ops.parents.get(2) {
            let rows = dy.storage::<f32>();
            let db = rows
                .par_chunks(64 * n.max(1))
                .map(|chunk| {
                    let mut s = vec![0f32; n];
                    chunk.chunks_exact(n.max(1)).for_each(|r| s.iter_mut().zip(r).for_each(|(a, v)| *a += v));
                    s
                })
                .reduce(
                    || vec![0f32; n],
                    |mut a, b| {
                        a.iter_mut().zip(&b).for_each(|(a, v)| *a += v);
                        a
                    },
                );
            out.push((node.id, FlexTensor::from_data(burn::tensor::TensorData::new(db, [n]))));
        }
        for (id, g) in out {
            grads.register::<Flex>(id, g);
        }
    }
}

/// `x·w + b` on `Autodiff<Flex>` tensors (`x [m, k]`) with the backward above; `None` where the
/// dtypes are not f32.
pub(crate) fn autodiff(x: AdTensor, w: AdTensor, b: Option<AdTensor>) -> Option<AdTensor> {
    let y = forward(&x.primitive, &w.primitive, b.as_ref().map(|b| &b.primitive))?;
    let tracked_w = !w.node.requirement.is_none();
    let st = State { x: tracked_w.then(|| keep(contiguous(x.primitive.clone()))), w: w.primitive.clone() };
    macro_rules! finish {
        ($n:literal, $nodes:expr) => {
            match Linear::<$n>.prepare::<NoCheckpointing>($nodes).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(st, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        };
    }
    Some(match b {
        Some(b) => finish!(3, [x.node.clone(), w.node.clone(), b.node.clone()]),
        None => finish!(2, [x.node.clone(), w.node.clone()]),
    })
}
