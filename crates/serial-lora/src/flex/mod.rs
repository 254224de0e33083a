//! Kernels of our own for the Flex CPU backend, each with its own backward pass: the fused
//! attention ([`attention`]), the MLP activations ([`activation`]), the base linears
//! ([`linear`]), adaLN's row ops ([`norm`]) and a parallel contiguous copy ([`layout`]). Model
//! code stays generic over `B: Backend`; [`sdpa`](crate::sdpa), [`crate::layers`] and
//! [`crate::half::linear`] call these when `B` is `Flex` or `Autodiff<Flex>` (checked by type
//! id, [`kind`]) and Burn's ops on every other backend.
pub(crate) mod activation;
pub(crate) mod attention;
pub(crate) mod layout;
pub(crate) mod linear;
pub(crate) mod norm;

pub(crate) use crate::prim::{cast, prim, tensor};

use burn::backend::Autodiff;
use burn::backend::flex::{Flex, FlexTensor};
use burn::prelude::*;

/// `AutodiffTensor<Flex>` (not nameable by path in 0.21: its module is private).
pub(crate) type AdTensor = <Autodiff<Flex> as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

/// How backend `B` reaches the kernels.
pub(crate) enum Kind {
    /// `Flex`: forward only.
    Inner,
    /// `Autodiff<Flex>`: forward, with the op's own backward recorded.
    Autodiff,
}

pub(crate) fn kind<B: 'static>() -> Option<Kind> {
    use std::any::TypeId;
    let t = TypeId::of::<B>();
    if t == TypeId::of::<Flex>() {
        Some(Kind::Inner)
    } else if t == TypeId::of::<Autodiff<Flex>>() {
        Some(Kind::Autodiff)
    } else {
        None
    }
}

/// Whether `x` is a tensor of `Autodiff<Flex>` that no gradient flows to (nothing trainable
/// upstream of it); `false` when unknown (other backends).
pub(crate) fn is_untracked<B: Backend, const D: usize>(x: &Tensor<B, D>) -> bool {
    matches!(kind::<B>(), Some(Kind::Autodiff)) && cast::<_, AdTensor>(prim(x.clone())).node.requirement.is_none()
}

/// `t` (f32) as an op keeps it for its backward pass: in the [`crate::half::autocast`] dtype
/// when one is set on this thread, else itself.
pub(crate) fn keep(t: FlexTensor) -> FlexTensor {
    match crate::half::saved_dtype() {
        Some(d) => convert(t, d).unwrap_or_else(|t| t),
        None => t,
    }
}

/// A tensor [`keep`] kept, in f32 again (itself when it is f32; contiguous when it was half).
pub(crate) fn widen(t: &FlexTensor) -> FlexTensor {
    convert(t.clone(), burn::tensor::DType::F32).unwrap_or_else(|t| t)
}

/// A contiguous f32 tensor of `shape` with uninitialised elements, for kernels that write every
/// element. `FlexTensor::empty` is `vec![0u8; n]` (on reused heap memory a memset over the
/// whole buffer) handed to `Bytes::from_bytes_vec`, which copies it into a second allocation
/// aligned for any dtype (a byte vector never declares the alignment): two passes on the
/// calling thread before the kernel starts. CLIP-B/16's Serial LoRA training step: 3.33–3.47 →
/// 2.79–2.83 s (2 threads, alternated).
///
/// # Safety
/// The caller writes every element before anything reads it (f32 has no invalid bit patterns;
/// what must not happen is a read of memory never written).
pub(crate) unsafe fn uninit(shape: Shape) -> FlexTensor {
    let n = shape.num_elements();
    let mut v = Vec::<f32>::with_capacity(n);
    // SAFETY: capacity n; the caller writes every element before any read. (`vec![0f32; n]`
    // instead keeps a memset: CLIP's step 2.94–2.96 s against 2.83–2.87.)
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(n)
    };
    FlexTensor::from_data(burn::tensor::TensorData::new(v, shape))
}

/// Raw output pointer shared by the tasks of one op; each task writes disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    pub(crate) fn of(t: &mut FlexTensor) -> Self {
        Out(t.storage_mut::<f32>().as_mut_ptr())
    }

    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Row kernels, vectorised by the compiler for the CPU's widest instruction set (AVX-512,
/// AVX2 + FMA; checked at run time), with a portable fallback.
pub(crate) mod simd {
    const LANES: usize = 16;

    /// Cephes `expf` without branches (≤ 2 ulp on [−87.3, 88.7]; below −87.3 it is 0).
    #[inline(always)]
    fn exp(x: f32) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let xc = x.clamp(-87.336_54, 88.376_26);
        let n = (xc * LOG2E + 0.5).floor();
        let r = xc - n * LN2_HI - n * LN2_LO;
        let z = r * r;
        let y = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 5e-1) * z + r + 1.0;
        // 2ⁿ from the bits of n + 1.5·2²³ (whose low mantissa bits are n): integer ops that
        // vectorise, where `n as i32` (saturating) compiles to one scalar conversion per lane
        const SHIFTER: f32 = 12_582_912.0;
        let pow2 = f32::from_bits((n + SHIFTER).to_bits().wrapping_sub(SHIFTER.to_bits()).wrapping_add(127) << 23);
        if x < -87.336_54 { 0.0 } else { y * pow2 }
    }

    macro_rules! dispatch {
        ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) -> $r:ty $body:block) => {
            $(#[$m])*
            pub(crate) fn $name($($a: $t),*) -> $r {
                #[inline(always)]
                fn body($($a: $t),*) -> $r $body
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f")]
                    unsafe fn v4($($a: $t),*) -> $r { body($($a),*) }
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn v3($($a: $t),*) -> $r { body($($a),*) }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: the CPU has the feature
                        return unsafe { v4($($a),*) };
                    }
                    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                        // SAFETY: the CPU has the features
                        return unsafe { v3($($a),*) };
                    }
                }
                body($($a),*)
            }
        };
    }

    dispatch! {
        /// The maximum of a row (−∞ for an empty or fully masked one).
        fn max(row: &[f32]) -> f32 {
            let mut acc = [f32::NEG_INFINITY; LANES];
            let chunks = row.chunks_exact(LANES);
            let tail = chunks.remainder();
            for c in chunks {
                for (a, x) in acc.iter_mut().zip(c) {
                    *a = a.max(*x);
                }
            }
            tail.iter().fold(acc.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x)), |m, x| m.max(*x))
        }
    }

    dispatch! {
        /// `row ← exp(row − sub)`, returns the sum of the new row.
        fn exp_sub(row: &mut [f32], sub: f32) -> f32 {
            let mut acc = [0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
                    *x = exp(*x - sub);
                    *a += *x;
                }
            }
            let mut sum: f32 = acc.iter().sum();
            for x in chunks.into_remainder() {
                *x = exp(*x - sub);
                sum += *x;
            }
            sum
        }
    }

    /// `tanh(x) = 1 − 2 / (e^{2x} + 1)` (|x| ≥ 9 rounds to ±1 in f32).
    #[inline(always)]
    fn tanh(x: f32) -> f32 {
        tanh_sech2(x).0
    }

    /// `(tanh x, 1 − tanh² x)`, the latter as `4r(1 − r)` with `r = 1 / (e^{2x} + 1)` (no
    /// cancellation where tanh x is near ±1).
    #[inline(always)]
    fn tanh_sech2(x: f32) -> (f32, f32) {
        let r = 1.0 / (exp(2.0 * x.clamp(-9.0, 9.0)) + 1.0);
        (1.0 - 2.0 * r, 4.0 * r * (1.0 - r))
    }

    /// `erf(x)`: Eigen's rational approximation on [−4, 4] (≤ 3.5e-7 absolute; beyond, |erf| is 1
    /// within 1.6e-8).
    #[inline(always)]
    fn erf(x: f32) -> f32 {
        let x = x.clamp(-4.0, 4.0);
        let x2 = x * x;
        let mut p = x2 * -2.726_142e-10 + 2.770_681_4e-8;
        p = x2 * p + -2.101_024e-6;
        p = x2 * p + -5.692_506_4e-5;
        p = x2 * p + -7.349_906_3e-4;
        p = x2 * p + -2.954_600_1e-3;
        p = x2 * p + -1.609_603_3e-2;
        let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
        q = x2 * q + -1.682_827e-3;
        q = x2 * q + -7.373_329_3e-3;
        q = x2 * q + -1.426_473_9e-2;
        x * p / q
    }

    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const GELU_TANH_C: f32 = 0.044_715;
    const QUICK: f32 = 1.702;

    dispatch! {
        /// `y = f(x)` element-wise.
        fn activation(act: super::activation::Act, x: &[f32], y: &mut [f32]) -> () {
            use super::activation::Act;
            match act {
                Act::Gelu => {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                    }
                }
                Act::GeluTanh => {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + GELU_TANH_C * x * x * x)));
                    }
                }
                Act::QuickGelu => {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = x / (1.0 + exp(-QUICK * x));
                    }
                }
            }
        }
    }

    dispatch! {
        /// `dx = f'(x)·dy` element-wise.
        fn activation_grad(act: super::activation::Act, x: &[f32], dy: &[f32], dx: &mut [f32]) -> () {
            use super::activation::Act;
            const INV_SQRT_2PI: f32 = 0.398_942_3;
            match act {
                Act::Gelu => {
                    for ((d, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
                        let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                        *d = g * (cdf + x * INV_SQRT_2PI * exp(-0.5 * x * x));
                    }
                }
                Act::GeluTanh => {
                    for ((d, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
                        let (t, sech2) = tanh_sech2(SQRT_2_OVER_PI * (x + GELU_TANH_C * x * x * x));
                        let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_C * x * x);
                        *d = g * (0.5 * (1.0 + t) + 0.5 * x * sech2 * du);
                    }
                }
                Act::QuickGelu => {
                    for ((d, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
                        let s = 1.0 / (1.0 + exp(-QUICK * x));
                        *d = g * (s + QUICK * x * s * (1.0 - s));
                    }
                }
            }
        }
    }

    dispatch! {
        /// `dp ← p ∘ (dp − d)`: the softmax backward of one row.
        fn softmax_grad(dp: &mut [f32], p: &[f32], d: f32) -> () {
            for (g, p) in dp.iter_mut().zip(p) {
                *g = p * (*g - d);
            }
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn exp_matches_libm() {
            let mut worst = 0f32;
            for i in -87_000..88_000 {
                let x = i as f32 / 1000.0 + 0.000_37;
                let (a, b) = (super::exp(x), x.exp());
                worst = worst.max(((a - b) / b).abs());
            }
            assert!(worst < 3.0 * f32::EPSILON, "worst relative error {worst}");
            assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
            let mut row = [0.5f32, -1.0, f32::NEG_INFINITY, 2.0];
            let s = super::exp_sub(&mut row, 2.0);
            let want: f32 = [-1.5f32, -3.0, 0.0].iter().map(|x| x.exp()).sum();
            assert!((s - want).abs() < 1e-6, "{s} vs {want}");
            assert_eq!(row[2], 0.0);
        }

        #[test]
        fn tanh_erf_match_libm() {
            let (mut wt, mut we) = (0f64, 0f64);
            for i in -10_000..10_000 {
                let x = i as f32 / 1000.0 + 0.000_37;
                wt = wt.max((super::tanh(x) as f64 - (x as f64).tanh()).abs());
                we = we.max((super::erf(x) as f64 - libm::erf(x as f64)).abs());
            }
            // absolute: both enter GELU as 1 + t, where an absolute error is what counts; measured
            // 1.8e-7 (tanh) and 3.5e-7 (erf, ~3 ulp of 1): ≤ 2e-7 relative error in GELU, far
            // inside the models' 1e-5 parity tolerances
            assert!(wt < 2.5e-7 && we < 5e-7, "tanh {wt:e}, erf {we:e}");
        }
    }
}

/// A float tensor converted between f32 and bf16 / f16 in one parallel pass (`Err` for other
/// pairs of dtypes). Flex's own cast goes through an f64 copy of the whole tensor: 4× the f32
/// output's memory and time, for every use of a half weight. The values are Flex's (and
/// `half`'s): exact widening, round-to-nearest-even narrowing.
pub(crate) fn convert(x: FlexTensor, to: burn::tensor::DType) -> Result<FlexTensor, FlexTensor> {
    use burn::tensor::{DType, bf16, f16};
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    macro_rules! map {
        ($x:expr, $a:ty, $c:ty, $f:expr) => {{
            let xs = $x.as_slice::<$a>().expect("contiguous");
            let mut y = FlexTensor::empty($x.layout().shape().clone(), to);
            y.storage_mut::<$c>().par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, x)| *y = $f(*x)));
            y
        }};
    }
    let from = x.dtype();
    if !matches!((from, to), (DType::BF16 | DType::F16, DType::F32) | (DType::F32, DType::BF16 | DType::F16)) {
        return Err(x);
    }
    let x = layout::contiguous(x);
    Ok(match (from, to) {
        (DType::BF16, _) => map!(x, bf16, f32, |v: bf16| f32::from_bits(u32::from(v.to_bits()) << 16)),
        (DType::F16, _) => map!(x, f16, f32, |v: f16| v.to_f32()),
        (_, DType::BF16) => map!(x, f32, bf16, bf16::from_f32),
        _ => map!(x, f32, f16, f16::from_f32),
    })
}

/// Columns of a half weight cast to f32 at a time by [`half_linear`].
const HALF_COLS: usize = 256;

/// `x·cast(w) + b` for an f32 `x [m, k]`, a bf16 / f16 weight `w [k, n]` and an f32 bias `[n]`,
/// casting [`HALF_COLS`] columns of `w` at a time into a buffer that gemm reads: besides the
/// output, one `[k, 256]` f32 block instead of an f32 copy of the whole weight (SD3's adaLN
/// modulation: 57 MB, an MLP layer: 38 MB). Each output column is the dot product gemm computes
/// for the whole weight (the same `k` blocking: `tests/flex_kernels.rs` checks the bits). `None`
/// for other dtypes or layouts.
pub(crate) fn half_linear(x: &FlexTensor, w: &FlexTensor, b: Option<&FlexTensor>) -> Option<FlexTensor> {
    use burn::tensor::{DType, bf16, f16};
    use layout::is_contiguous as contiguous;
    use rayon::prelude::*;
    let (xs, ws) = (x.layout().shape(), w.layout().shape());
    if x.dtype() != DType::F32 || xs.num_dims() != 2 || ws.num_dims() != 2 || xs[1] != ws[0] || !contiguous(w) {
        return None;
    }
    if b.is_some_and(|b| b.dtype() != DType::F32 || b.layout().shape().num_elements() != ws[1] || !contiguous(b)) {
        return None;
    }
    let (m, k, n) = (xs[0], ws[0], ws[1]);
    let widen_block: fn(&FlexTensor, usize, usize, &mut [f32]) = match w.dtype() {
        DType::BF16 => |w, row, col, out| {
            let s = &w.storage::<bf16>()[row * w.layout().shape()[1] + col..][..out.len()];
            out.iter_mut().zip(s).for_each(|(o, v)| *o = f32::from_bits(u32::from(v.to_bits()) << 16));
        },
        DType::F16 => |w, row, col, out| {
            let s = &w.storage::<f16>()[row * w.layout().shape()[1] + col..][..out.len()];
            out.iter_mut().zip(s).for_each(|(o, v)| *o = v.to_f32());
        },
        _ => return None,
    };
    let x = layout::contiguous(x.clone());
    // SAFETY (k > 0): every column block is written by gemm (no accumulation)
    let mut out = if k == 0 { FlexTensor::zeros(Shape::new([m, n]), DType::F32) } else { unsafe { uninit(Shape::new([m, n])) } };
    let dst = Out::of(&mut out);
    let mut buf = vec![0f32; k * HALF_COLS.min(n)];
    let parallel = m * n * k >= 64 * 64 * 64;
    for j0 in (0..n).step_by(HALF_COLS) {
        let cw = HALF_COLS.min(n - j0);
        let block = &mut buf[..k * cw];
        block.par_chunks_mut(cw).enumerate().for_each(|(row, out)| widen_block(w, row, j0, out));
        // SAFETY: `x` is `[m, k]` and `block` `[k, cw]`, both row-major; the destination is
        // columns `j0..j0 + cw` of the row-major `[m, n]` output
        unsafe {
            gemm::gemm(
                m,
                cw,
                k,
                dst.at(j0),
                1,
                n as isize,
                false,
                x.storage::<f32>().as_ptr(),
                1,
                k as isize,
                block.as_ptr(),
                1,
                cw as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None },
            );
        }
    }
    if let Some(b) = b {
        let bias = b.storage::<f32>();
        out.storage_mut::<f32>().par_chunks_mut(n).for_each(|row| row.iter_mut().zip(bias).for_each(|(y, b)| *y += b));
    }
    Some(out)
}
