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
