//! Block-level gradient checkpointing (`serial_lora::checkpoint`): with it, a stack of adapted
//! attention blocks gives bit-identical outputs, adapter gradients and input gradients (LoRA,
//! Serial LoRA with its evaluation order chosen by the input's tracking, fused qkv, dropout,
//! untargeted blocks).
mod common;

use burn::backend::Autodiff;
use burn::prelude::*;
use common::{adapted_stack_cases, randn, seeded_stack, stack_run};
use serial_lora::testing::Backend as Inner;
use serial_lora::{AttentionConfig, AttentionStack, BaseDType, checkpoint};

type AB = Autodiff<Inner>;

/// The stack's forward with every block checkpointed (a no-op outside `with_checkpointing`).
fn forward(m: &AttentionStack<AB>, x: Tensor<AB, 3>) -> Tensor<AB, 3> {
    m.layers.iter().fold(x, |x, a| checkpoint(a, x, |a, x| x.clone() + a.forward(x, None, None)))
}

#[test]
fn gradients_are_bit_identical_with_checkpointing() {
    for (name, m, x) in adapted_stack_cases() {
        for tracked_input in [false, true] {
            let plain = stack_run(&m, &x, tracked_input, false, BaseDType::F32);
            let ckpt = stack_run(&m, &x, tracked_input, true, BaseDType::F32);
            assert!(!plain.1.is_empty(), "{name}: no adapter gradients");
            assert_eq!(plain.1.len(), ckpt.1.len(), "{name}");
            assert_eq!(plain.0, ckpt.0, "{name}, tracked input {tracked_input}: outputs differ");
            for (k, (a, b)) in plain.1.iter().zip(&ckpt.1).enumerate() {
                assert_eq!(a, b, "{name}, tracked input {tracked_input}: gradient {k} differs");
            }
            assert_eq!(plain.2, ckpt.2, "{name}: input gradients differ");
            assert_eq!(plain.2.is_some(), tracked_input);
        }
    }
}

/// Checkpointed steps while other threads of the process train without checkpointing: the same
/// gradients as alone. Burn's autodiff frees, after every backward pass in the process, the
/// graphs no live tensor refers to; the flattened parameters of a checkpointed block were such a
/// graph for a moment, and were freed when another thread's backward ended then (their gradients
/// came out wrong in 10 of 10 runs of this test before `checkpoint` held them).
#[test]
fn checkpointed_steps_beside_other_threads_give_the_same_gradients() {
    let run = |checkpointing: bool| {
        let cases = adapted_stack_cases();
        let want: Vec<_> = cases.iter().map(|(_, m, x)| stack_run(m, x, true, false, BaseDType::F32)).collect();
        for _ in 0..6 {
            for ((name, m, x), want) in cases.iter().zip(&want) {
                let got = stack_run(m, x, true, checkpointing, BaseDType::F32);
                assert_eq!(want.1, got.1, "{name}, checkpointing {checkpointing}: adapter gradients differ");
            }
        }
    };
    std::thread::scope(|s| {
        let threads: Vec<_> = [true, false, false, true].into_iter().map(|c| s.spawn(move || run(c))).collect();
        for t in threads {
            t.join().unwrap();
        }
    });
}

#[test]
fn outside_with_checkpointing_it_is_the_plain_forward() {
    let m = seeded_stack::<AB>(&AttentionConfig::new(8, 2), 2, 1);
    let x = randn::<AB, 3>([1, 4, 8], 2);
    assert_eq!(forward(&m, x.clone()).into_data(), m.forward(x).into_data());
}
