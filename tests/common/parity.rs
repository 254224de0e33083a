//! Shared by the parity tests (`crates/<crate>/tests/parity.rs`, included with
//! `#[path = "../../../tests/common/parity.rs"] mod parity;`): a record of the reference tensors a
//! test compared, so that it fails when a reference key was never compared. The layer loops
//! iterate over *our* hidden states; without this check a model returning fewer layers than the
//! reference would pass.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::BTreeSet;

thread_local! {
    /// Keys compared by the test running on this thread (each test has its own thread).
    static COMPARED: RefCell<BTreeSet<String>> = const { RefCell::new(BTreeSet::new()) };
}

/// Records that this test compared the reference tensor `key` (call it from `check`).
pub fn compared(key: &str) {
    COMPARED.with(|c| c.borrow_mut().insert(key.to_string()));
}

/// Fails naming every key of `reference` that starts with one of `prefixes` (`""`: every key),
/// is not one of the model's `inputs`, and was never compared by this test.
pub fn assert_all_compared<'a>(reference: impl IntoIterator<Item = &'a String>, prefixes: &[&str], inputs: &[&str]) {
    let seen = COMPARED.with(|c| c.borrow().clone());
    let missing: Vec<&String> =
        reference.into_iter().filter(|k| prefixes.iter().any(|p| k.starts_with(p)) && !inputs.contains(&k.as_str()) && !seen.contains(k.as_str())).collect();
    assert!(missing.is_empty(), "reference tensors this test never compared: {missing:?}");
}

/// `max|got − want| / max|want|` of host values (the half-precision parity checks).
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// bf16 parity tolerance, relative to the largest reference value. bf16 keeps 8 bits of mantissa
/// (relative rounding 2⁻⁸ ≈ 3.9e-3 per value). Our half mode holds the same bf16 weights as torch
/// but computes in f32, while torch also rounds every activation to bf16; through a few blocks
/// that drifts by a few roundings (measured: see each test). 3e-2 still fails for a wrong formula
/// or a skipped layer (O(1e-1) or more).
pub const BF16_TOL: f32 = 3e-2;
