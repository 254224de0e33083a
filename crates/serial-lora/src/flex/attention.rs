//! Fused scaled-dot-product attention for the Flex CPU backend, with its own backward pass.
//!
//! Burn 0.21's autodiff decomposes attention (`attention_fallback`): the `[b, h, lq, lk]` scores
//! and probabilities are materialised, soft-maxed element by element and kept for the backward.
//! This op follows FlashAttention-2 (Dao 2023, Algorithms 1–2) on the CPU:
//! - forward, per (batch, head, block of query rows): `S = scale·Q·Kᵀ + bias`, the row maximum
//!   `m`, `P = exp(S − m)`, `O = P·V / Σ P`; only `O` and the per-row log-sum-exp
//!   `L = m + ln Σ P` are kept;
//! - backward, per (batch, head): for each block of query rows `P = exp(scale·Q·Kᵀ + bias − L)`
//!   is recomputed, `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `D = rowsum(dO ∘ O)`, `dS = P ∘ (dP − D)`,
//!   `dQ = scale·dS·K`, `dK += scale·dSᵀ·Q`, and `dS` itself is the gradient of the bias.
//!
//! The matrix products are `gemm` calls (the crate Flex's own matmul uses) on the strided
//! inputs as they are: q, k, v straight out of a head split (`[b, l, h, d]` viewed as
//! `[b, h, l, d]`) are read in place, and `O`, `dQ`, `dK`, `dV` are written `[b, l, h, d]` and
//! returned as `[b, h, l, d]` views, so the head merge that follows is a free reshape. The
//! exponentials are a vectorised polynomial (Cephes `expf`, ≤ 2 ulp) instead of libm's scalar
//! `expf`. Parity with the decomposed path: `tests/flex_kernels.rs`; with transformers /
//! diffusers attention: the models' parity suites, tolerances unchanged.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor, Layout};
use burn::tensor::{DType, Shape};
use rayon::prelude::*;

use super::{AdTensor, Out, keep, simd, uninit, widen};

/// Query rows per block: as many as keep the `[rows, lk]` score block of one thread within
/// [`SCORE_FLOATS`] (2 MiB, the L2 of one core), at most [`MAX_ROWS`]: long blocks keep the
/// products' dimensions long enough for gemm's micro-kernel and pack K and V fewer times (SD3's
/// joint attention, lk = 1178: 384 rows, 1.3× faster than 128 on one core).
fn rows_per_block(lk: usize) -> usize {
    (SCORE_FLOATS / lk.max(1)).clamp(64, MAX_ROWS) / 16 * 16
}

const SCORE_FLOATS: usize = 1 << 19;
const MAX_ROWS: usize = 384;

/// A rank-4 f32 tensor read in place: storage, offset and element strides (≥ 0; 0 = broadcast).
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    strides: [usize; 4],
    shape: [usize; 4],
}

impl<'a> View<'a> {
    fn of(t: &'a FlexTensor) -> Option<Self> {
        let layout = t.layout();
        if t.dtype() != DType::F32 || layout.num_dims() != 4 || layout.strides().iter().any(|&s| s < 0) {
            return None;
        }
        let s = layout.strides();
        let d = layout.shape();
        Some(Self {
            data: t.storage::<f32>(),
            offset: layout.start_offset(),
            strides: [s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize],
            shape: [d[0], d[1], d[2], d[3]],
        })
    }

    /// Pointer to row `row` of the `(b, h)` matrix.
    fn row(&self, b: usize, h: usize, row: usize) -> *const f32 {
        let i = self.offset + b * self.strides[0] + h * self.strides[1] + row * self.strides[2];
        // in bounds for every row < shape[2] (the layout addresses it); an empty matrix is never read
        self.data.as_ptr().wrapping_add(i)
    }
}

/// A tensor in the fused op's input convention: contiguous-or-strided f32 with non-negative strides.
fn readable(t: FlexTensor) -> FlexTensor {
    if View::of(&t).is_some() { t } else { t.to_contiguous() }
}

/// A `[b, l, h, d]` buffer and the `[b, h, l, d]` view of it: zeroed unless the caller writes
/// every element (`written`).
fn heads_major(b: usize, h: usize, l: usize, d: usize, written: bool) -> FlexTensor {
    let shape = Shape::new([b, l, h, d]);
    // SAFETY (written): the caller writes every element
    let t = if written { unsafe { uninit(shape) } } else { FlexTensor::zeros(shape, DType::F32) };
    let layout = Layout::new(Shape::new([b, h, l, d]), vec![(l * h * d) as isize, d as isize, (h * d) as isize, 1], 0);
    t.with_layout(layout)
}

/// The first `n` elements of a scratch buffer that only grows (its stale contents are
/// overwritten by the caller: no clearing per block).
fn scratch(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// `dst[m×n] (+)= beta · lhs[m×k] · rhs[k×n]`, single-threaded (the tasks are the parallelism).
/// Strides are (row, column) in elements.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY (caller): every pointer addresses its whole matrix with these strides
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// An additive score bias: a full `[b, h, lq, lk]` tensor (broadcast views read in place), or
/// SAM's decomposed relative-position terms `rel_h [b, h, lq, kh]` and `rel_w [b, h, lq, kw]`
/// with `lk = kh·kw` and `bias[i, ky·kw + kx] = rel_h[i, ky] + rel_w[i, kx]`, added inside the
/// kernel so that nothing `[lq, lk]`-sized is materialised for it, forward or backward.
#[derive(Clone, Debug)]
pub(crate) enum Bias<T> {
    Full(T),
    Decomposed(T, T),
}

impl<T> Bias<T> {
    pub(crate) fn map<U>(self, mut f: impl FnMut(T) -> U) -> Bias<U> {
        match self {
            Bias::Full(t) => Bias::Full(f(t)),
            Bias::Decomposed(h, w) => Bias::Decomposed(f(h), f(w)),
        }
    }

    fn as_ref(&self) -> Bias<&T> {
        match self {
            Bias::Full(t) => Bias::Full(t),
            Bias::Decomposed(h, w) => Bias::Decomposed(h, w),
        }
    }

    fn terms(self) -> Vec<T> {
        match self {
            Bias::Full(t) => vec![t],
            Bias::Decomposed(h, w) => vec![h, w],
        }
    }
}

fn bias_view(b: Bias<&FlexTensor>) -> Bias<View<'_>> {
    b.map(|t| View::of(t).unwrap())
}

/// Adds the bias rows `[i0, i0 + rows)` of `(b, h)` to the score block `s` (`[rows, lk]`), in
/// transformers' order for the decomposed terms (`(s + rel_h) + rel_w`).
fn add_bias(s: &mut [f32], bias: &Bias<View>, b: usize, h: usize, i0: usize, lk: usize) {
    for (i, row) in s.chunks_exact_mut(lk).enumerate() {
        // SAFETY: every column read is < the row length the layout addresses
        match bias {
            Bias::Full(v) => {
                let (p, cs) = (v.row(b, h, i0 + i), v.strides[3]);
                for (j, x) in row.iter_mut().enumerate() {
                    *x += unsafe { *p.add(j * cs) };
                }
            }
            Bias::Decomposed(vh, vw) => {
                let (ph, pw) = (vh.row(b, h, i0 + i), vw.row(b, h, i0 + i));
                let kw = vw.shape[3];
                for (ky, chunk) in row.chunks_exact_mut(kw).enumerate() {
                    let a = unsafe { *ph.add(ky * vh.strides[3]) };
                    for (kx, x) in chunk.iter_mut().enumerate() {
                        *x = (*x + a) + unsafe { *pw.add(kx * vw.strides[3]) };
                    }
                }
            }
        }
    }
}

/// The bias gradients of one `(b, h)` block of `dS` rows (`[rows, lk]`), written at row `i0` of
/// the `[b, h, lq, ·]` outputs.
fn bias_grad(ds: &[f32], grads: &[Out], bh: usize, lq: usize, i0: usize, lk: usize, kw: usize) {
    let rows = ds.len() / lk;
    match grads {
        // SAFETY: rows (bh, i0..i0 + rows) of the outputs belong to this task
        [full] => unsafe { std::ptr::copy_nonoverlapping(ds.as_ptr(), full.at((bh * lq + i0) * lk), rows * lk) },
        [gh, gw] => {
            let kh = lk / kw;
            for (i, row) in ds.chunks_exact(lk).enumerate() {
                let (rh, rw) = unsafe {
                    (std::slice::from_raw_parts_mut(gh.at((bh * lq + i0 + i) * kh), kh), std::slice::from_raw_parts_mut(gw.at((bh * lq + i0 + i) * kw), kw))
                };
                rw.fill(0.0);
                for (ky, chunk) in row.chunks_exact(kw).enumerate() {
                    rh[ky] = chunk.iter().sum();
                    rw.iter_mut().zip(chunk).for_each(|(a, x)| *a += x);
                }
            }
        }
        _ => {}
    }
}

/// Forward: `(O [b, h, lq, dv] (a view of [b, lq, h, dv]), L [b, h, lq])`.
fn forward(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, bias: Option<Bias<&FlexTensor>>, scale: f32) -> (FlexTensor, FlexTensor) {
    let (qv, kv, vv) = (View::of(q).unwrap(), View::of(k).unwrap(), View::of(v).unwrap());
    let bv = bias.map(bias_view);
    let [b, h, lq, d] = qv.shape;
    let (lk, dv) = (kv.shape[2], vv.shape[3]);
    // every output row is written below when there are keys (one gemm per block of rows)
    let mut o = heads_major(b, h, lq, dv, lk > 0);
    // SAFETY: every (b, h, row) task writes its row's entry
    let mut lse = unsafe { uninit(Shape::new([b, h, lq])) };
    let (o_ptr, lse_ptr) = (Out::of(&mut o), Out::of(&mut lse));
    let block = rows_per_block(lk);
    let blocks = lq.div_ceil(block);
    (0..b * h * blocks).into_par_iter().for_each_init(Vec::new, |s: &mut Vec<f32>, task| {
        let (bh, blk) = (task / blocks, task % blocks);
        let (bi, hi) = (bh / h, bh % h);
        let i0 = blk * block;
        let rows = block.min(lq - i0);
        let s = scratch(s, rows * lk);
        // SAFETY: the views address [rows, d] / [lk, d] / [lk, dv]; s is [rows, lk]
        unsafe {
            mm(
                (rows, lk, d),
                s.as_mut_ptr(),
                (lk, 1),
                false,
                qv.row(bi, hi, i0),
                (qv.strides[2], qv.strides[3]),
                kv.row(bi, hi, 0),
                (kv.strides[3], kv.strides[2]),
                scale,
            );
        }
        if let Some(bv) = &bv {
            add_bias(s, bv, bi, hi, i0, lk);
        }
        let mut inv = [0f32; MAX_ROWS];
        for (i, row) in s.chunks_exact_mut(lk).enumerate() {
            let m = simd::max(row);
            let m = if m == f32::NEG_INFINITY { 0.0 } else { m };
            let sum = simd::exp_sub(row, m);
            // a fully masked row: O = 0 and L = −∞ (the backward gives it no gradient)
            inv[i] = if sum > 0.0 { 1.0 / sum } else { 0.0 };
            // SAFETY: row (bi, hi, i0 + i) of the [b, h, lq] buffer; this task owns it
            unsafe { *lse_ptr.at(bh * lq + i0 + i) = m + sum.ln() };
        }
        // O rows of (bi, hi) in the [b, lq, h, dv] buffer: row stride h·dv
        let o_row = o_ptr.at(((bi * lq + i0) * h + hi) * dv);
        unsafe {
            mm((rows, dv, lk), o_row, (h * dv, 1), false, s.as_ptr(), (lk, 1), vv.row(bi, hi, 0), (vv.strides[2], vv.strides[3]), 1.0);
            for (i, f) in inv[..rows].iter().enumerate() {
                let r = std::slice::from_raw_parts_mut(o_row.add(i * h * dv), dv);
                r.iter_mut().for_each(|x| *x *= f);
            }
        }
    });
    (o, lse)
}

/// The saved state of one fused attention: inputs, output and log-sum-exp (inner tensors,
/// shared, not copied; q, k, v in half under [`crate::half::autocast`]: [`keep`]).
#[derive(Clone, Debug)]
struct Saved {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    bias: Option<Bias<FlexTensor>>,
    o: FlexTensor,
    lse: FlexTensor,
    scale: f32,
}

/// Gradients `[dq, dk, dv, bias terms…]`; those of the bias only when asked (contiguous
/// `[b, h, lq, lk]`, or `[b, h, lq, kh]` and `[b, h, lq, kw]`).
fn backward(st: &Saved, dout: &FlexTensor, want_bias: bool) -> Vec<FlexTensor> {
    let [q, k, v] = [&st.q, &st.k, &st.v].map(widen);
    let (qv, kv, vv, ov) = (View::of(&q).unwrap(), View::of(&k).unwrap(), View::of(&v).unwrap(), View::of(&st.o).unwrap());
    let bv = st.bias.as_ref().map(|b| bias_view(b.as_ref()));
    let dov = View::of(dout).unwrap();
    let lse = st.lse.storage::<f32>();
    let [b, h, lq, d] = qv.shape;
    let (lk, dv) = (kv.shape[2], vv.shape[3]);
    let scale = st.scale;
    // written by the first block of rows (lq > 0) and accumulated by the others; dq by every block
    let written = lq > 0 && lk > 0;
    let mut dq = heads_major(b, h, lq, d, written);
    let mut dk = heads_major(b, h, lk, d, written);
    let mut dvt = heads_major(b, h, lk, dv, written);
    let kw = match &bv {
        Some(Bias::Decomposed(_, vw)) => vw.shape[3],
        _ => lk,
    };
    let mut db: Vec<FlexTensor> = match (&bv, want_bias) {
        (Some(Bias::Full(_)), true) => vec![FlexTensor::zeros(Shape::new([b, h, lq, lk]), DType::F32)],
        (Some(Bias::Decomposed(..)), true) => [lk / kw, kw].map(|n| FlexTensor::zeros(Shape::new([b, h, lq, n]), DType::F32)).to_vec(),
        _ => Vec::new(),
    };
    let (dq_ptr, dk_ptr, dv_ptr) = (Out::of(&mut dq), Out::of(&mut dk), Out::of(&mut dvt));
    let db_ptr: Vec<Out> = db.iter_mut().map(Out::of).collect();
    (0..b * h).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(p, dp): &mut (Vec<f32>, Vec<f32>), bh| {
            let (bi, hi) = (bh / h, bh % h);
            // rows of (bi, hi) in the [b, l, h, ·] gradient buffers
            let dq_rows = dq_ptr.at(bi * lq * h * d + hi * d);
            let dk_rows = dk_ptr.at(bi * lk * h * d + hi * d);
            let dv_rows = dv_ptr.at(bi * lk * h * dv + hi * dv);
            let block = rows_per_block(lk);
            for (blk, i0) in (0..lq).step_by(block).enumerate() {
                let rows = block.min(lq - i0);
                let (p, dp) = (scratch(p, rows * lk), scratch(dp, rows * lk));
                let q_blk = qv.row(bi, hi, i0);
                let do_blk = dov.row(bi, hi, i0);
                // SAFETY: every view addresses the blocks named; the (bi, hi) gradient rows belong
                // to this task alone
                unsafe {
                    mm(
                        (rows, lk, d),
                        p.as_mut_ptr(),
                        (lk, 1),
                        false,
                        q_blk,
                        (qv.strides[2], qv.strides[3]),
                        kv.row(bi, hi, 0),
                        (kv.strides[3], kv.strides[2]),
                        scale,
                    );
                    if let Some(bv) = &bv {
                        add_bias(p, bv, bi, hi, i0, lk);
                    }
                    for (i, row) in p.chunks_exact_mut(lk).enumerate() {
                        let l = lse[bh * lq + i0 + i];
                        if l == f32::NEG_INFINITY {
                            row.fill(0.0); // fully masked row: the forward wrote 0
                        } else {
                            simd::exp_sub(row, l);
                        }
                    }
                    // dV += Pᵀ·dO
                    mm((lk, dv, rows), dv_rows, (h * dv, 1), blk > 0, p.as_ptr(), (1, lk), do_blk, (dov.strides[2], dov.strides[3]), 1.0);
                    // dP = dO·Vᵀ
                    mm(
                        (rows, lk, dv),
                        dp.as_mut_ptr(),
                        (lk, 1),
                        false,
                        do_blk,
                        (dov.strides[2], dov.strides[3]),
                        vv.row(bi, hi, 0),
                        (vv.strides[3], vv.strides[2]),
                        1.0,
                    );
                    for (i, (dp_row, p_row)) in dp.chunks_exact_mut(lk).zip(p.chunks_exact(lk)).enumerate() {
                        let (o_row, g_row) = (ov.row(bi, hi, i0 + i), dov.row(bi, hi, i0 + i));
                        let mut di = 0.0f32;
                        for c in 0..dv {
                            di += *o_row.add(c * ov.strides[3]) * *g_row.add(c * dov.strides[3]);
                        }
                        simd::softmax_grad(dp_row, p_row, di);
                    }
                    bias_grad(dp, &db_ptr, bh, lq, i0, lk, kw);
                    // dQ = scale·dS·K
                    mm(
                        (rows, d, lk),
                        dq_rows.add(i0 * h * d),
                        (h * d, 1),
                        false,
                        dp.as_ptr(),
                        (lk, 1),
                        kv.row(bi, hi, 0),
                        (kv.strides[2], kv.strides[3]),
                        scale,
                    );
                    // dK += scale·dSᵀ·Q
                    mm((lk, d, rows), dk_rows, (h * d, 1), blk > 0, dp.as_ptr(), (1, lk), q_blk, (qv.strides[2], qv.strides[3]), scale);
                }
            }
        },
    );
    [dq, dk, dvt].into_iter().chain(db).collect()
}

#[derive(Debug)]
struct FusedAttention<const N: usize>;

impl<const N: usize> Backward<Flex, N> for FusedAttention<N> {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = readable(grads.consume::<Flex>(&ops.node));
        let want_bias = ops.parents[3..].iter().any(Option::is_some);
        for (parent, grad) in ops.parents.iter().zip(backward(&ops.state, &dout, want_bias)) {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

fn tracked<const N: usize>(inputs: [&AdTensor; N], st: Saved) -> AdTensor {
    let nodes = inputs.map(|t| t.node.clone());
    match FusedAttention::<N>.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let o = st.o.clone();
            prep.finish(st, o)
        }
        OpsKind::UnTracked(prep) => prep.finish(st.o),
    }
}

/// Fused attention on `Autodiff<Flex>` tensors `[b, h, l, d]`; a full bias is broadcastable
/// to `[b, h, lq, lk]` (expanded views are read in place), `-∞` entries mask.
pub(crate) fn autodiff(q: AdTensor, k: AdTensor, v: AdTensor, bias: Option<Bias<AdTensor>>, scale: f32) -> AdTensor {
    let readable_ad = |mut t: AdTensor| {
        t.primitive = readable(t.primitive);
        t
    };
    let [q, k, v] = [q, k, v].map(readable_ad);
    let bias = bias.map(|b| b.map(readable_ad));
    // the output shape `[b, h, lq, dv]`: a kept result of another shape is not this call's
    let (qs, vs) = (q.primitive.layout().shape(), v.primitive.layout().shape());
    let want = [qs[0], qs[1], qs[2], vs[3]];
    let fits = |(o, _): &(FlexTensor, FlexTensor)| o.layout().shape().iter().copied().eq(want);
    // a checkpointed block's recomputation takes the output and log-sum-exp of its first pass
    let (o, lse) =
        crate::checkpoint::memoized(fits, || forward(&q.primitive, &k.primitive, &v.primitive, bias.as_ref().map(|b| b.as_ref().map(|t| &t.primitive)), scale));
    let st = Saved {
        q: keep(q.primitive.clone()),
        k: keep(k.primitive.clone()),
        v: keep(v.primitive.clone()),
        bias: bias.as_ref().map(|b| b.as_ref().map(|t| t.primitive.clone())),
        o,
        lse,
        scale,
    };
    let terms = bias.map(Bias::terms).unwrap_or_default();
    match terms.as_slice() {
        [] => tracked::<3>([&q, &k, &v], st),
        [t] => tracked::<4>([&q, &k, &v, t], st),
        [h, w] => tracked::<5>([&q, &k, &v, h, w], st),
        _ => unreachable!("a bias has one or two terms"),
    }
}

/// Fused attention on plain Flex tensors (inference): the forward alone.
pub(crate) fn inference(q: FlexTensor, k: FlexTensor, v: FlexTensor, bias: Option<Bias<FlexTensor>>, scale: f32) -> FlexTensor {
    let [q, k, v] = [q, k, v].map(readable);
    let bias = bias.map(|b| b.map(readable));
    forward(&q, &k, &v, bias.as_ref().map(|b| b.as_ref()), scale).0
}
