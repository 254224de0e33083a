//! A frozen base held in half precision (`serial_lora::half`): a stack of adapted attention
//! blocks whose base is held in bf16 / f16 computes exactly what the f32 stack computes with its
//! base weights rounded to that dtype — the same bits for the output, every adapter gradient
//! and the input gradient (LoRA, Serial LoRA in both evaluation orders, fused qkv, dropout,
//! with and without gradient checkpointing) — while the adapters stay f32.
mod common;

use burn::backend::Autodiff;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::DType;
use common::{RandomizeB, adapted_stack_cases, randn, seeded_stack, stack_run};
use serial_lora::half::{BaseDType, hold_base_in};
use serial_lora::testing::Backend as Inner;
use serial_lora::{AdaptedModel, AdapterConfig, AttentionConfig, Method};

type AB = Autodiff<Inner>;

/// The f32 module with its frozen rank ≥ 2 parameters rounded to `dtype` (still f32).
struct Round(DType);

impl ModuleMapper<AB> for Round {
    fn map_float<const K: usize>(&mut self, p: Param<Tensor<AB, K>>) -> Param<Tensor<AB, K>> {
        let t = p.val();
        if K < 2 || t.is_require_grad() {
            return p;
        }
        // rounded on the host, round-to-nearest-even as torch does (Burn 0.21's Flex cast to
        // bf16 goes through f64 and ignores the low mantissa bits: not always nearest)
        let rounded = t.to_data().convert_dtype(self.0).convert_dtype(DType::F32);
        Param::initialized(p.id, Tensor::from_data(rounded, &t.device())).set_require_grad(false)
    }
}

/// dtypes of the parameters: (frozen rank ≥ 2, everything else).
struct DTypes(Vec<DType>, Vec<DType>);

impl ModuleVisitor<AB> for DTypes {
    fn visit_float<const K: usize>(&mut self, p: &Param<Tensor<AB, K>>) {
        let t = p.val();
        if K >= 2 && !t.is_require_grad() { self.0.push(t.dtype()) } else { self.1.push(t.dtype()) }
    }
}

#[test]
fn a_half_base_computes_the_rounded_f32_model_bit_for_bit() {
    for (name, m, x) in adapted_stack_cases() {
        for dtype in [BaseDType::Bf16, BaseDType::F16] {
            let half = hold_base_in(m.clone(), dtype);
            let mut d = DTypes(Vec::new(), Vec::new());
            half.visit(&mut d);
            assert!(!d.0.is_empty() && d.0.iter().all(|t| *t == dtype.dtype()), "{name}: base weights {:?}", d.0);
            assert!(d.1.iter().all(|t| *t == DType::F32), "{name}: adapters and vectors stay f32: {:?}", d.1);
            let rounded = m.clone().map(&mut Round(dtype.dtype()));
            for tracked_input in [false, true] {
                for ckpt in [false, true] {
                    let want = stack_run(&rounded, &x, tracked_input, false);
                    let got = stack_run(&half, &x, tracked_input, ckpt);
                    let case = format!("{name}, {dtype}, tracked input {tracked_input}, checkpointing {ckpt}");
                    assert!(!want.1.is_empty(), "{case}: no adapter gradients");
                    assert_eq!(want.0, got.0, "{case}: outputs differ");
                    assert_eq!(want.1, got.1, "{case}: adapter gradients differ");
                    assert_eq!(want.2, got.2, "{case}: input gradients differ");
                }
            }
        }
    }
}

#[test]
fn merging_into_a_half_base_keeps_it_half() {
    let dev = Default::default();
    for method in [Method::Lora, Method::SerialLora] {
        let m =
            seeded_stack::<AB>(&AttentionConfig::new(16, 2), 2, 5).with_adapters(&AdapterConfig::new(method, 4), 7, &dev).unwrap().map(&mut RandomizeB::new(9));
        let half = hold_base_in(m.clone(), BaseDType::Bf16);
        let merged = half.clone().merge_adapters().unwrap();
        let mut d = DTypes(Vec::new(), Vec::new());
        merged.visit(&mut d);
        assert!(d.0.iter().all(|t| *t == DType::BF16), "{method:?}: {:?}", d.0);
        // the merged half model is the unmerged one up to bf16 rounding of the merged weights
        let x = randn::<AB, 3>([1, 5, 16], 11);
        let (a, b) = (half.forward(x.clone()), merged.forward(x));
        let err = (a.clone() - b).abs().max().into_scalar().to_f32() / a.abs().max().into_scalar().to_f32();
        assert!(err < 2e-2, "{method:?}: merged vs unmerged {err} (bf16: 8 bits of mantissa)");
    }
}
