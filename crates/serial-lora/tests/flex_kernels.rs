//! The Flex kernels with their own backward (`serial_lora::flex`). The fused attention of `sdpa`
//! and `sdpa_rel_pos` against Burn's decomposed `attention_fallback` (matmul + softmax + matmul,
//! differentiated op by op): outputs and the gradients of q, k, v and of the bias, for self- and
//! cross-attention, boolean masks (one fully masked row), strided head views, several query
//! blocks, SAM's decomposed relative-position bias, inference and autodiff. The activations
//! against their f64 formulas. Every random tensor is seeded.
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::Tolerance;
use burn::tensor::module::attention_fallback;
use burn::tensor::ops::AttentionModuleOptions;
use serial_lora::{has_fused_attention, sdpa};

type AB = Autodiff<Flex>;

/// Two f32 evaluations of the same attention that sum in a different order (tiled gemm vs
/// Flex's matmul, a polynomial exp vs libm's): well inside the 1e-5 of the models' parity tests.
const SUM_ORDER_TOL: f64 = 1e-5;

fn close<B: Backend, const D: usize>(what: &str, a: Tensor<B, D>, b: Tensor<B, D>) {
    let (a, b) = (a.into_data(), b.into_data());
    let scale = b.iter::<f32>().fold(0f32, |m, x| m.max(x.abs())).max(1.0) as f64;
    let diff = a.iter::<f32>().zip(b.iter::<f32>()).fold(0f32, |m, (x, y)| m.max((x - y).abs())) as f64;
    eprintln!("{what}: max |Δ| {diff:.2e} (scale {scale:.2})");
    assert!(diff <= SUM_ORDER_TOL * scale, "{what}: max |Δ| {diff:e} > {SUM_ORDER_TOL:e} × {scale}");
    a.assert_approx_eq::<f32>(&b, Tolerance::absolute(SUM_ORDER_TOL as f32 * scale as f32));
}

struct Case {
    name: &'static str,
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    bias: bool,
    causal: bool,
}

fn heads<B: Backend>(t: Tensor<B, 4>) -> Tensor<B, 4> {
    // [b, l, h, d] → [b, h, l, d] as a strided view, as Attention::split_heads produces
    t.swap_dims(1, 2)
}

#[test]
fn fused_matches_decomposed_forward_and_gradients() {
    let cases = [
        Case { name: "self, 2 query blocks", b: 2, h: 3, lq: 150, lk: 150, d: 16, bias: false, causal: false },
        Case { name: "cross, bias with grad", b: 1, h: 2, lq: 37, lk: 300, d: 8, bias: true, causal: false },
        Case { name: "causal mask", b: 3, h: 2, lq: 20, lk: 20, d: 4, bias: false, causal: true },
        Case { name: "causal + bias, 3 blocks", b: 1, h: 1, lq: 260, lk: 260, d: 32, bias: true, causal: true },
    ];
    assert!(has_fused_attention::<AB>() && has_fused_attention::<Flex>(), "Flex must take the fused path");
    let dev = Default::default();
    let mut rng = serial_lora::rng::rng(7);
    for c in cases {
        let mut rand = |s: [usize; 4]| serial_lora::rng::normal::<AB, 4>(s, 1.0, &mut rng, &dev);
        let q0 = rand([c.b, c.lq, c.h, c.d]).require_grad();
        let k0 = rand([c.b, c.lk, c.h, c.d]).require_grad();
        let v0 = rand([c.b, c.lk, c.h, c.d]).require_grad();
        let bias0 = c.bias.then(|| rand([c.b, c.h, c.lq, c.lk]).require_grad());
        let mask = c.causal.then(|| Tensor::<AB, 2, Bool>::tril_mask([c.lq, c.lk], 0, &dev).unsqueeze::<4>());
        let dout = rand([c.b, c.h, c.lq, c.d]).detach();

        let fused = sdpa(heads(q0.clone()), heads(k0.clone()), heads(v0.clone()), mask.clone(), bias0.clone());
        let g1 = (fused.clone() * dout.clone()).sum().backward();
        let additive = match (&mask, &bias0) {
            (Some(m), b) => {
                let neg = Tensor::<AB, 4>::zeros(m.dims(), &dev).mask_fill(m.clone(), f32::NEG_INFINITY);
                Some(b.clone().map_or(neg.clone(), |b| b + neg).expand([c.b, c.h, c.lq, c.lk]))
            }
            (None, b) => b.clone(),
        };
        let reference = attention_fallback(heads(q0.clone()), heads(k0.clone()), heads(v0.clone()), None, additive, AttentionModuleOptions::default());
        let g2 = (reference.clone() * dout).sum().backward();

        close(&format!("{}: output", c.name), fused.clone().inner(), reference.inner());
        for (what, t) in [("dq", &q0), ("dk", &k0), ("dv", &v0)] {
            close(&format!("{}: {what}", c.name), t.grad(&g1).unwrap(), t.grad(&g2).unwrap());
        }
        if let Some(b) = &bias0 {
            close(&format!("{}: dbias", c.name), b.grad(&g1).unwrap(), b.grad(&g2).unwrap());
        }
        // inference (the inner backend) gives the autodiff forward
        let inner = sdpa(heads(q0.inner()), heads(k0.inner()), heads(v0.inner()), mask.map(|m| m.inner()), bias0.map(|b| b.inner()));
        close(&format!("{}: inference", c.name), inner, fused.inner());
    }
}

#[test]
fn fully_masked_row_gives_zero_output_and_no_gradient() {
    let dev = Default::default();
    let mut rng = serial_lora::rng::rng(3);
    let mut rand = |s: [usize; 4]| serial_lora::rng::normal::<AB, 4>(s, 1.0, &mut rng, &dev);
    let (q, k, v) = (rand([1, 1, 4, 8]).require_grad(), rand([1, 1, 5, 8]).require_grad(), rand([1, 1, 5, 8]).require_grad());
    let mut m = vec![false; 20];
    m[5..10].iter_mut().for_each(|x| *x = true); // query row 1 sees nothing
    let mask = Tensor::<AB, 4, Bool>::from_data(TensorData::new(m, [1, 1, 4, 5]), &dev);
    let out = sdpa(q.clone(), k, v, Some(mask), None);
    let row1 = out.clone().inner().slice([0..1, 0..1, 1..2, 0..8]);
    assert_eq!(row1.abs().sum().into_scalar(), 0.0);
    let g = out.sum().backward();
    let dq = q.grad(&g).unwrap();
    assert!(!dq.clone().is_nan().any().into_scalar());
    assert_eq!(dq.slice([0..1, 0..1, 1..2, 0..8]).abs().sum().into_scalar(), 0.0);
}

/// The vectorised activations (forward and their own backward) against the formulas in f64
/// with libm's `erf`, `tanh` and `exp`.
#[test]
fn activations_match_f64_formulas() {
    use serial_lora::layers::Activation;
    // f32 evaluation of a closed form with ≤ 3.5e-7 absolute error in erf / tanh (flex/mod.rs)
    const ACT_TOL: f64 = 2e-6;
    let dev = Default::default();
    let xs: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) / 250.0 + 0.0013).collect(); // [-8, 8]
    let n = xs.len();
    type F = fn(f64) -> (f64, f64);
    let cases: [(Activation, F); 3] = [
        (Activation::Gelu, |x| {
            let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
            (x * cdf, cdf + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt())
        }),
        (Activation::GeluTanh, |x| {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let t = (c * (x + 0.044715 * x * x * x)).tanh();
            (0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x))
        }),
        (Activation::QuickGelu, |x| {
            let s = 1.0 / (1.0 + (-1.702 * x).exp());
            (x * s, s + 1.702 * x * s * (1.0 - s))
        }),
    ];
    for (act, f) in cases {
        let x = Tensor::<AB, 1>::from_data(TensorData::new(xs.clone(), [n]), &dev).require_grad();
        let y = act.forward(x.clone().reshape([1, n])).reshape([n]);
        let dx = x.grad(&y.clone().sum().backward()).unwrap().into_data();
        let (y, dx) = (y.inner().into_data(), dx);
        for (i, (&xi, (yi, di))) in xs.iter().zip(y.iter::<f32>().zip(dx.iter::<f32>())).enumerate() {
            let (ry, rd) = f(xi as f64);
            assert!((yi as f64 - ry).abs() <= ACT_TOL * ry.abs().max(1.0), "{act:?} y[{i}] at {xi}: {yi} vs {ry}");
            assert!((di as f64 - rd).abs() <= ACT_TOL * rd.abs().max(1.0), "{act:?} dy/dx[{i}] at {xi}: {di} vs {rd}");
        }
        // the plain backend (inference) gives the same forward
        let yi = act.forward(Tensor::<Flex, 1>::from_data(TensorData::new(xs.clone(), [n]), &dev));
        assert_eq!(yi.into_data(), y, "{act:?}: inference vs autodiff forward");
    }
}

/// SAM's decomposed relative-position bias added inside the kernel against the same bias
/// materialised and differentiated by Burn (`attention_fallback`).
#[test]
fn decomposed_rel_pos_matches_materialised_bias() {
    use serial_lora::sdpa_rel_pos;
    let dev = Default::default();
    let mut rng = serial_lora::rng::rng(11);
    let (b, h, kh, kw, d) = (2, 3, 7, 9, 8);
    let (lq, lk) = (kh * kw, kh * kw);
    let mut rand = |s: [usize; 4]| serial_lora::rng::normal::<AB, 4>(s, 1.0, &mut rng, &dev);
    let (q, k, v) = (rand([b, lq, h, d]).require_grad(), rand([b, lk, h, d]).require_grad(), rand([b, lk, h, d]).require_grad());
    let (rh, rw) = (rand([b, h, lq, kh]).require_grad(), rand([b, h, lq, kw]).require_grad());
    let dout = rand([b, h, lq, d]).detach();
    let fused = sdpa_rel_pos(heads(q.clone()), heads(k.clone()), heads(v.clone()), rh.clone(), rw.clone());
    let g1 = (fused.clone() * dout.clone()).sum().backward();
    let bias = (rh.clone().unsqueeze_dim::<5>(4) + rw.clone().unsqueeze_dim::<5>(3)).reshape([b, h, lq, lk]);
    let reference = attention_fallback(heads(q.clone()), heads(k.clone()), heads(v.clone()), None, Some(bias), AttentionModuleOptions::default());
    let g2 = (reference.clone() * dout).sum().backward();
    close("rel-pos: output", fused.inner(), reference.inner());
    for (what, t) in [("dq", &q), ("dk", &k), ("dv", &v)] {
        close(&format!("rel-pos: {what}"), t.grad(&g1).unwrap(), t.grad(&g2).unwrap());
    }
    for (what, t) in [("drel_h", &rh), ("drel_w", &rw)] {
        close(&format!("rel-pos: {what}"), t.grad(&g1).unwrap(), t.grad(&g2).unwrap());
    }
}

/// A linear layer with a bf16 / f16 weight (`half::linear`, Flex: cast a block of columns at a
/// time) gives the bits of the f32 layer whose weight is that weight widened, for several
/// column blocks and a ragged last one, with and without bias, for one row and for many, and
/// under autodiff (forward and input gradient).
#[test]
fn half_linear_casts_by_blocks_to_the_same_bits() {
    use burn::module::AutodiffModule;
    use burn::nn::LinearConfig;
    use burn::tensor::{DType, Distribution};
    use serial_lora::half::{BaseDType, hold_base_in};
    let dev = Default::default();
    for (k, n, bias) in [(300, 700, true), (64, 256, false), (33, 1030, true)] {
        for dtype in [BaseDType::Bf16, BaseDType::F16] {
            let f32_layer = LinearConfig::new(k, n).with_bias(bias).init::<AB>(&dev);
            let half = hold_base_in(f32_layer, dtype);
            assert_eq!(half.weight.val().dtype(), dtype.dtype());
            let _ = half.bias.as_ref().map(|b| b.val()); // initialized before the copy (lazy: else drawn twice)
            let mut widened = half.clone();
            widened.weight = widened.weight.map(|w| w.cast(DType::F32));
            for m in [1, 37, 200] {
                let x = Tensor::<Flex, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &dev);
                let case = format!("k {k}, n {n}, bias {bias}, {dtype}, m {m}");
                let (got, want) = (serial_lora::half::linear(&half.valid(), x.clone()), widened.valid().forward(x.clone()));
                assert_eq!(got.into_data().to_vec::<f32>().unwrap(), want.into_data().to_vec::<f32>().unwrap(), "{case}");
                // autodiff: the same forward, and the input gradient of the f32 layer
                let (ha, wa) = (&half, &widened);
                let (xa, xb) = (Tensor::<AB, 2>::from_inner(x.clone()).require_grad(), Tensor::<AB, 2>::from_inner(x).require_grad());
                let (ya, yb) = (serial_lora::half::linear(ha, xa.clone()), wa.forward(xb.clone()));
                assert_eq!(ya.clone().into_data().to_vec::<f32>().unwrap(), yb.clone().into_data().to_vec::<f32>().unwrap(), "{case}: autodiff");
                let (ga, gb) = ((ya.clone() * ya).sum().backward(), (yb.clone() * yb).sum().backward());
                let (da, db) = (xa.grad(&ga).unwrap(), xb.grad(&gb).unwrap());
                assert_eq!(da.into_data().to_vec::<f32>().unwrap(), db.into_data().to_vec::<f32>().unwrap(), "{case}: input gradient");
            }
        }
    }
}

/// The adaLN row ops (`modulated_layer_norm`, `gated_residual`) against Burn's element-wise
/// ops on the same backend: forward, and the gradients of every input (with per-sample `w`, `b`
/// and with shared ones, and a non-uniform upstream gradient).
#[test]
fn adaln_row_ops_match_decomposed_forward_and_gradients() {
    use burn::tensor::Distribution;
    use serial_lora::layers::{gated_residual, modulated_layer_norm};
    let dev = Default::default();
    let (b, n, d) = (2, 37, 40);
    let rnd = |shape: [usize; 3]| Tensor::<AB, 3>::random(shape, Distribution::Normal(0.5, 2.0), &dev);
    let upstream = rnd([b, n, d]).detach();
    for g in [b, 1] {
        let x = rnd([b, n, d]).require_grad();
        let h = rnd([b, n, d]).require_grad();
        let w = rnd([1, g, d]).reshape([g, d]).require_grad();
        let s = rnd([1, g, d]).reshape([g, d]).require_grad();
        let grads = |y: Tensor<AB, 3>| {
            let gr = (y * upstream.clone()).sum().backward();
            [x.grad(&gr).map(|t| t.reshape([b * n, d])), h.grad(&gr).map(|t| t.reshape([b * n, d])), w.grad(&gr), s.grad(&gr)]
        };
        // Burn's ops: (x − μ)/√(σ² + ε)·w + s over [g, rows / g, d]
        let grouped = |t: Tensor<AB, 3>| t.reshape([g, b * n / g, d]);
        let xg = grouped(x.clone());
        let c = xg.clone() - xg.mean_dim(2);
        let var = c.clone().powi_scalar(2).mean_dim(2);
        let want = (c / var.add_scalar(1e-6).sqrt() * w.clone().unsqueeze_dim(1) + s.clone().unsqueeze_dim(1)).reshape([b, n, d]);
        let want_y = want.clone().inner();
        let want = grads(want);
        let got = modulated_layer_norm(x.clone(), Some(w.clone()), Some(s.clone()), 1e-6);
        close("norm forward", got.clone().inner(), want_y);
        for (i, (a, e)) in grads(got).into_iter().zip(want).enumerate() {
            match (a, e) {
                (Some(a), Some(e)) => close(&format!("norm grad {i} (g = {g})"), a, e),
                (a, e) => assert_eq!(a.is_some(), e.is_some(), "norm grad {i}"),
            }
        }
        // each graph built and differentiated in turn (one backward pass frees what it used)
        let want = (grouped(x.clone()) + w.clone().unsqueeze_dim(1) * grouped(h.clone())).reshape([b, n, d]);
        let want_y = want.clone().inner().into_data();
        let want = grads(want);
        let got = gated_residual(x.clone(), h.clone(), w.clone());
        assert_eq!(got.clone().inner().into_data(), want_y, "gate forward: the same ops");
        for (i, (a, e)) in grads(got).into_iter().zip(want).enumerate() {
            match (a, e) {
                (Some(a), Some(e)) => close(&format!("gate grad {i} (g = {g})"), a, e),
                (a, e) => assert_eq!(a.is_some(), e.is_some(), "gate grad {i}"),
            }
        }
        // inference (plain Flex) gives the autodiff forward's bits
        let plain = modulated_layer_norm(x.clone().inner(), Some(w.clone().inner()), Some(s.clone().inner()), 1e-6);
        assert_eq!(plain.into_data(), modulated_layer_norm(x.clone(), Some(w.clone()), Some(s.clone()), 1e-6).inner().into_data());
    }
}

/// The base linear on Flex (`half::linear` → `flex::linear`: bias inside the product, columns
/// split among threads) against Burn's `linear`: forward and the gradients of input, weight and
/// bias, for a contiguous and a strided (transposed) input, frozen and trainable weights.
#[test]
fn flex_linear_matches_burn_linear() {
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;
    let dev = Default::default();
    let (m, k, n) = (97, 200, 300);
    for (bias, strided) in [(true, false), (false, true), (true, true)] {
        let l = LinearConfig::new(k, n).with_bias(bias).init::<AB>(&dev);
        // the leaf is [m, k], or [k, m] read through a transposed view
        let leaf = Tensor::<AB, 2>::random(if strided { [k, m] } else { [m, k] }, Distribution::Normal(0.0, 1.0), &dev).require_grad();
        // a view per graph (a backward pass frees the nodes it used)
        let x = || if strided { leaf.clone().transpose() } else { leaf.clone() };
        let up = Tensor::<AB, 2>::random([m, n], Distribution::Normal(0.0, 1.0), &dev).detach();
        let grads = |y: Tensor<AB, 2>| {
            let g = (y * up.clone()).sum().backward();
            (leaf.grad(&g), l.weight.grad(&g), l.bias.as_ref().and_then(|b| b.grad(&g)))
        };
        let want = burn::tensor::module::linear(x(), l.weight.val(), l.bias.as_ref().map(|b| b.val()));
        let want_y = want.clone().inner();
        let (wx, ww, wb) = grads(want);
        let got = serial_lora::half::linear(&l, x());
        close("linear forward", got.clone().inner(), want_y);
        let (gx, gw, gb) = grads(got);
        close("linear dx", gx.unwrap(), wx.unwrap());
        close("linear dW", gw.unwrap(), ww.unwrap());
        assert_eq!(gb.is_some(), wb.is_some());
        if let (Some(a), Some(e)) = (gb, wb) {
            close("linear db", a, e);
        }
    }
}

/// A LoRA pair's products through `layers::matmul` (Flex: `flex::linear` without bias, the
/// threads splitting the narrow rank-r outputs by rows, an odd row count) against Burn's
/// `matmul`: forward and the gradients of x, A and B.
#[test]
fn flex_matmul_with_a_narrow_side_matches_burn_matmul() {
    use burn::tensor::Distribution;
    let dev = Default::default();
    let (m, k, r, n) = (301, 200, 8, 150);
    let rand = |shape: [usize; 2]| Tensor::<AB, 2>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
    let (x, a, b) = (rand([m, k]).require_grad(), rand([k, r]).require_grad(), rand([r, n]).require_grad());
    let up = rand([m, n]).detach();
    let run = |f: &dyn Fn(Tensor<AB, 2>, Tensor<AB, 2>) -> Tensor<AB, 2>| {
        let y = f(f(x.clone(), a.clone()).mul_scalar(0.5), b.clone());
        let g = (y.clone() * up.clone()).sum().backward();
        (y.inner(), x.grad(&g).unwrap(), a.grad(&g).unwrap(), b.grad(&g).unwrap())
    };
    let want = run(&|p, q| p.matmul(q));
    let got = run(&|p, q| serial_lora::layers::matmul(p, q));
    close("lora forward", got.0, want.0);
    close("lora dx", got.1, want.1);
    close("lora dA", got.2, want.2);
    close("lora dB", got.3, want.3);
}
