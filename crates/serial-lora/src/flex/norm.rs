//! Row-wise ops of the adaLN transformer blocks (SD3's `AdaLayerNormZero`, DiT) as single
//! parallel passes with their own backward:
//! - [`Op::Norm`]: `LN(x)·w + b`, LayerNorm over the last dimension without affine parameters
//!   of its own, modulated by `w`, `b` of `[g, d]` (one row per sample: `1 + scale`, `shift`);
//! - [`Op::Gate`]: `x + w·h`, the gated residual (`w` = `gate`, `[g, d]`).
//!
//! Burn runs each as five to eight element-wise ops on one thread (and autodiff keeps their
//! intermediates). Rows are `[rows, d]` with `rows = g·per`: row `r` takes row `r / per` of
//! `w` and `b`. The arithmetic is Burn's, op for op (`(x − μ)/√(σ² + ε)·w + b` with the biased
//! variance; `x + w·h`), so the forward matches the decomposed path to rounding.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{DType, Shape};
use rayon::prelude::*;

use super::layout::contiguous;
use super::{AdTensor, keep, widen};

/// Rows per parallel task.
const ROWS: usize = 32;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Norm { eps: f32 },
    Gate,
}

fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

/// `Σ a[j]·b[j]` in 16 lanes (vectorised; no less accurate than one running sum).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        acc.iter_mut().zip(x.iter().zip(y)).for_each(|(s, (x, y))| *s += x * y);
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ a[j]` in 16 lanes.
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let c = a.chunks_exact(16);
    let tail: f32 = c.remainder().iter().sum();
    for x in c {
        acc.iter_mut().zip(x).for_each(|(s, x)| *s += x);
    }
    acc.iter().sum::<f32>() + tail
}

/// `y = (x − μ)/√(σ² + ε)` of one row (biased variance); returns `√(σ² + ε)`.
fn normalize(x: &[f32], eps: f32, y: &mut [f32]) -> f32 {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    y.iter_mut().zip(x).for_each(|(y, v)| *y = v - mean);
    let denom = (dot(y, y) / n + eps).sqrt();
    y.iter_mut().for_each(|y| *y /= denom);
    denom
}

/// The forward over `[rows, d]`; `w`, `b`: `[g, d]` or empty (absent).
fn forward(op: Op, x: &[f32], h: &[f32], w: &[f32], b: &[f32], d: usize, per: usize) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(ROWS * d).enumerate().for_each(|(task, ys)| {
        for (i, yr) in ys.chunks_exact_mut(d).enumerate() {
            let r = task * ROWS + i;
            let g = r / per;
            let (wr, br) = (w.get(g * d..(g + 1) * d), b.get(g * d..(g + 1) * d));
            let xr = &x[r * d..(r + 1) * d];
            match op {
                Op::Norm { eps } => {
                    normalize(xr, eps, yr);
                    if let Some(wr) = wr {
                        yr.iter_mut().zip(wr).for_each(|(y, w)| *y *= w);
                    }
                    if let Some(br) = br {
                        yr.iter_mut().zip(br).for_each(|(y, b)| *y += b);
                    }
                }
                Op::Gate => {
                    let (hr, wr) = (&h[r * d..(r + 1) * d], wr.expect("a gate"));
                    yr.iter_mut().zip(xr.iter().zip(hr.iter().zip(wr))).for_each(|(y, (x, (h, w)))| *y = x + w * h);
                }
            }
        }
    });
    y
}

/// Gradients `[dx, dh, dw, db]` (the last three empty where not asked for) of the op at `dy`;
/// `x` is read by the norm, `h` by the gate's `dw`.
#[allow(clippy::too_many_arguments)]
fn backward(op: Op, x: &[f32], h: &[f32], w: &[f32], dy: &[f32], (d, per, groups): (usize, usize, usize), want: [bool; 3]) -> [Vec<f32>; 4] {
    let [want_h, want_w, want_b] = want;
    let wrow = |r: usize| w.get(r / per * d..(r / per + 1) * d);
    let mut dx = vec![0f32; dy.len()];
    // per-task partial sums of dw and db ([g, d] each), added up after
    let partial: Vec<[Vec<f32>; 2]> = dx
        .par_chunks_mut(ROWS * d)
        .enumerate()
        .map(|(task, dxs)| {
            let mut dw = if want_w { vec![0f32; groups * d] } else { Vec::new() };
            let mut db = if want_b { vec![0f32; groups * d] } else { Vec::new() };
            let (mut xhat, mut dxhat) = (vec![0f32; d], vec![0f32; d]);
            for (i, dxr) in dxs.chunks_exact_mut(d).enumerate() {
                let r = task * ROWS + i;
                let g = r / per;
                let gr = &dy[r * d..(r + 1) * d];
                match op {
                    Op::Norm { eps } => {
                        let denom = normalize(&x[r * d..(r + 1) * d], eps, &mut xhat);
                        // dx̂ = dy·w; dx = (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) / √(σ² + ε)
                        match wrow(r) {
                            Some(wr) => dxhat.iter_mut().zip(gr.iter().zip(wr)).for_each(|(a, (g, w))| *a = g * w),
                            None => dxhat.copy_from_slice(gr),
                        }
                        let (m1, m2) = (sum(&dxhat) / d as f32, dot(&dxhat, &xhat) / d as f32);
                        dxr.iter_mut().zip(dxhat.iter().zip(&xhat)).for_each(|(v, (g, x))| *v = (g - m1 - x * m2) / denom);
                        if want_w {
                            dw[g * d..(g + 1) * d].iter_mut().zip(gr.iter().zip(&xhat)).for_each(|(a, (g, x))| *a += g * x);
                        }
                    }
                    Op::Gate => {
                        dxr.copy_from_slice(gr);
                        if want_w {
                            dw[g * d..(g + 1) * d].iter_mut().zip(gr.iter().zip(&h[r * d..(r + 1) * d])).for_each(|(a, (g, h))| *a += g * h);
                        }
                    }
                }
                if want_b {
                    db[g * d..(g + 1) * d].iter_mut().zip(gr).for_each(|(a, g)| *a += g);
                }
            }
            [dw, db]
        })
        .collect();
    let total = |i: usize, want: bool| {
        let mut acc = if want { vec![0f32; groups * d] } else { Vec::new() };
        for p in &partial {
            acc.iter_mut().zip(&p[i]).for_each(|(a, v)| *a += v);
        }
        acc
    };
    // the gate's dh = w·dy
    let mut dh = if want_h { vec![0f32; dy.len()] } else { Vec::new() };
    dh.par_chunks_mut(d).enumerate().for_each(|(r, out)| {
        let wr = wrow(r).expect("a gate");
        out.iter_mut().zip(dy[r * d..(r + 1) * d].iter().zip(wr)).for_each(|(a, (g, w))| *a = g * w);
    });
    [dx, dh, total(0, want_w), total(1, want_b)]
}

fn tensor(data: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(burn::tensor::TensorData::new(data, shape))
}

/// The inputs of one call: `x` and `h` `[.., d]`, `w` and `b` `[g, d]`, contiguous f32.
struct Args {
    x: FlexTensor,
    h: Option<FlexTensor>,
    w: Option<FlexTensor>,
    b: Option<FlexTensor>,
}

impl Args {
    /// `(d, rows per group)`, or `None` where the shapes or dtypes are not this op's.
    fn dims(&self) -> Option<(usize, usize)> {
        let shape = self.x.layout().shape();
        let d = *shape.last()?;
        let rows = shape.num_elements() / d.max(1);
        let all = [Some(&self.x), self.h.as_ref(), self.w.as_ref(), self.b.as_ref()];
        if d == 0 || all.iter().flatten().any(|t| t.dtype() != DType::F32) {
            return None;
        }
        if self.h.as_ref().is_some_and(|h| h.layout().shape() != shape) {
            return None;
        }
        let mut groups = None;
        for p in [&self.w, &self.b].into_iter().flatten() {
            let s = p.layout().shape();
            if s.num_dims() != 2 || s[1] != d || s[0] == 0 || !rows.is_multiple_of(s[0]) || groups.is_some_and(|g| g != s[0]) {
                return None;
            }
            groups = Some(s[0]);
        }
        Some((d, rows / groups.unwrap_or(1)))
    }
}

fn run(op: Op, a: &Args, d: usize, per: usize) -> FlexTensor {
    let empty: &[f32] = &[];
    let y = forward(op, f32s(&a.x), a.h.as_ref().map_or(empty, f32s), a.w.as_ref().map_or(empty, f32s), a.b.as_ref().map_or(empty, f32s), d, per);
    tensor(y, a.x.layout().shape().clone())
}

/// The op on plain Flex tensors; `None` where shapes or dtypes are not its own.
pub(crate) fn inference(op: Op, x: FlexTensor, h: Option<FlexTensor>, w: Option<FlexTensor>, b: Option<FlexTensor>) -> Option<FlexTensor> {
    let a = Args { x: contiguous(x), h: h.map(contiguous), w: w.map(contiguous), b: b.map(contiguous) };
    let (d, per) = a.dims()?;
    Some(run(op, &a, d, per))
}

/// What the backward needs: the op, `x` or `h` ([`keep`]), `w` and the layout.
#[derive(Debug, Clone)]
struct State {
    op: Op,
    x: Option<FlexTensor>,
    h: Option<FlexTensor>,
    w: Option<FlexTensor>,
    shape: Shape,
    groups: usize,
    d: usize,
    per: usize,
}

#[derive(Debug)]
struct RowOp<const N: usize>;

impl<const N: usize> Backward<Flex, N> for RowOp<N> {
    type State = State;

    fn backward(self, ops: Ops<State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let st = &ops.state;
        // parents: x, then h (gate), then w, then b, each where present
        let (has_h, has_w) = (matches!(st.op, Op::Gate), st.w.is_some());
        let slot = |i: usize| ops.parents.get(i).is_some_and(Option::is_some);
        let (ih, iw) = (1, 1 + usize::from(has_h));
        let ib = iw + usize::from(has_w);
        let want = [has_h && slot(ih), has_w && slot(iw), ib < N && slot(ib)];
        let (x, h, w) = (st.x.as_ref().map(widen), st.h.as_ref().map(widen), st.w.as_ref().map(widen));
        fn read(t: &Option<FlexTensor>) -> &[f32] {
            t.as_ref().map_or(&[], f32s)
        }
        let [dx, dh, dw, db] = backward(st.op, read(&x), read(&h), read(&w), f32s(&dy), (st.d, st.per, st.groups), want);
        let pshape = Shape::new([st.groups, st.d]);
        let mut out = vec![(0, tensor(dx, st.shape.clone()))];
        if want[0] {
            out.push((ih, tensor(dh, st.shape.clone())));
        }
        if want[1] {
            out.push((iw, tensor(dw, pshape.clone())));
        }
        if want[2] {
            out.push((ib, tensor(db, pshape)));
        }
        for (i, g) in out {
            if let Some(Some(node)) = ops.parents.get(i) {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

/// The op on `Autodiff<Flex>` tensors with the backward above; `None` where shapes or dtypes
/// are not its own.
pub(crate) fn autodiff(op: Op, x: AdTensor, h: Option<AdTensor>, w: Option<AdTensor>, b: Option<AdTensor>) -> Option<AdTensor> {
    let a = Args {
        x: contiguous(x.primitive.clone()),
        h: h.as_ref().map(|t| contiguous(t.primitive.clone())),
        w: w.as_ref().map(|t| contiguous(t.primitive.clone())),
        b: b.as_ref().map(|t| contiguous(t.primitive.clone())),
    };
    let (d, per) = a.dims()?;
    let y = run(op, &a, d, per);
    let groups = a.x.layout().shape().num_elements() / d / per;
    let st = State {
        op,
        // the norm's backward recomputes x̂ from x; the gate's needs h (for dw) only
        x: matches!(op, Op::Norm { .. }).then(|| keep(a.x.clone())),
        h: a.h.clone().filter(|_| w.as_ref().is_some_and(|w| !w.node.requirement.is_none())).map(keep),
        w: a.w.clone(),
        shape: a.x.layout().shape().clone(),
        groups,
        d,
        per,
    };
    let nodes: Vec<_> = [Some(&x), h.as_ref(), w.as_ref(), b.as_ref()].into_iter().flatten().map(|t| t.node.clone()).collect();
    macro_rules! finish {
        ($n:literal) => {{
            let nodes: [_; $n] = nodes.try_into().expect("node count");
            match RowOp::<$n>.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(st, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        }};
    }
    Some(match nodes.len() {
        1 => finish!(1),
        2 => finish!(2),
        3 => finish!(3),
        _ => finish!(4),
    })
}
