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

/// The gradients of `model`'s adapters after a backward pass, keyed as in its adapter file: each
/// trainable parameter replaced by its gradient, written with `save_adapter_with_prefix` (the
/// layout PEFT / diffusers name their gradients in), read back.
pub fn adapter_gradients<B, M>(
    model: &M,
    grads: &B::Gradients,
    cfg: &serial_lora::AdapterConfig,
    prefix: &str,
) -> std::collections::BTreeMap<String, serial_lora::io::HostTensor>
where
    B: burn::tensor::backend::AutodiffBackend,
    M: serial_lora::AdaptedModel<B>,
{
    use burn::module::{ModuleMapper, Param};
    use burn::prelude::Tensor;
    struct ToGrad<'a, B: burn::tensor::backend::AutodiffBackend>(&'a B::Gradients);
    impl<B: burn::tensor::backend::AutodiffBackend> ModuleMapper<B> for ToGrad<'_, B> {
        fn map_float<const K: usize>(&mut self, p: Param<Tensor<B, K>>) -> Param<Tensor<B, K>> {
            let t = p.val();
            match t.grad(self.0) {
                Some(g) if t.is_require_grad() => Param::initialized(p.id, Tensor::from_inner(g)),
                _ => p,
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    serial_lora::io::save_adapter_with_prefix(&model.clone().map(&mut ToGrad(grads)), cfg, dir.path(), None, prefix).unwrap();
    serial_lora::io::read_safetensors(&dir.path().join(serial_lora::io::WEIGHTS_FILE)).unwrap().0
}

/// Checks one training step against a reference that holds it twice (`tools/fixtures/
/// half_reference.py`): `autocast.*` (the base in bf16 under `torch.autocast`) and `f32.*`, each
/// with `loss` and every adapter gradient keyed as in the adapter file. `name` is the step `got`
/// ran: `f32` must match within `f32_tol`; `autocast` within [`BF16_TOL`], or 1.5 × torch's own
/// autocast drift (its autocast gradients against its f32 ones) where that is larger, and no
/// further from the f32 step than torch's autocast step is (at least [`BF16_TOL`]). Relative
/// errors as [`rel_err`], over all gradients at once; the loss relative to itself.
pub fn check_train_step(
    name: &str,
    loss: f32,
    got: &std::collections::BTreeMap<String, serial_lora::io::HostTensor>,
    want: &std::collections::BTreeMap<String, serial_lora::io::HostTensor>,
    f32_tol: f32,
) {
    assert_eq!(got.len() * 2 + 2, want.len(), "{name}: the adapter tensors of the reference");
    let all = |prefix: &str| -> Vec<f32> {
        got.keys().flat_map(|k| want.get(&format!("{prefix}.{k}")).unwrap_or_else(|| panic!("reference has no {prefix}.{k}")).data.clone()).collect()
    };
    let ours: Vec<f32> = got.values().flat_map(|t| t.data.clone()).collect();
    let (reference, at_f32) = (all(name), all("f32"));
    let drift = rel_err(&all("autocast"), &at_f32);
    let want_loss = want[&format!("{name}.loss")].data[0];
    let (e_loss, e, e32) = ((loss - want_loss).abs() / want_loss.abs(), rel_err(&ours, &reference), rel_err(&ours, &at_f32));
    println!(
        "{name}: loss {loss} (rel {e_loss:.2e} from torch), gradients {e:.2e} from torch's, {e32:.2e} from torch's f32 step; torch's own autocast drift {drift:.2e}"
    );
    if name == "f32" {
        assert!(e_loss < f32_tol && e < f32_tol, "{name}: loss {e_loss:e}, gradients {e:e} (tolerance {f32_tol:e})");
    } else {
        let tol = BF16_TOL.max(1.5 * drift);
        assert!(e_loss < tol && e < tol, "{name}: loss {e_loss:e}, gradients {e:e} from torch under autocast (tolerance {tol:e})");
        assert!(e32 < BF16_TOL.max(drift), "{name}: gradients {e32:e} from torch's f32 step (torch's autocast: {drift:e})");
    }
}
