//! Adapters on the context stream of SD3's joint attention (`Sd3Transformer::with_context_stream`):
//! off by default (image stream only, the paper's counts), exact parameter counts when on,
//! PEFT-style invariants (fresh ≡ base, non-zero ≠ base, merged ≡ unmerged, unmerge restores,
//! save → load identical) for LoRA and Serial LoRA on both streams with non-colliding keys, and a
//! LoRA saved by diffusers with `add_*` keys (`tools/fixtures/sd3_lora_context.py`) giving
//! diffusers' output.
use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::prelude::*;
use sd3_gen::mmdit::adapter_has_context_keys;
use sd3_gen::{Sd3Transformer, load_transformer};
use serial_lora::io::{load_adapter_with_prefix, save_adapter_with_prefix};
use serial_lora::{AdaptedModel, AdapterConfig, Method, ParamCountExt};

type B = Flex;
type AB = Autodiff<Flex>;

/// Relative to the largest output value. Merged vs unmerged reorders f32 sums through two
/// joint blocks (~1e-6); diffusers parity as in parity.rs (~1e-7 per op). 1e-5 fails for any
/// adapter on the wrong input or stream.
const TOL: f32 = 1e-5;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sd3-tiny")
}

fn read(file: &str) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir().join(file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.shape().to_vec(), v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())))
        .collect()
}

fn tensor<Bk: Backend, const D: usize>(r: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, key: &str) -> Tensor<Bk, D> {
    let (shape, data) = &r[key];
    Tensor::from_data(TensorData::new(data.clone(), shape.clone()), &Default::default())
}

/// The transformer output on the fixture's inputs.
fn run<Bk: Backend>(model: &Sd3Transformer<Bk>) -> Tensor<Bk, 4> {
    let r = read("reference.safetensors");
    let t = r["timestep"].1.clone();
    model.forward(tensor(&r, "hidden_states"), tensor(&r, "encoder_hidden_states"), tensor(&r, "pooled_projections"), &t).unwrap()
}

fn rel<Bk: Backend>(a: Tensor<Bk, 4>, b: Tensor<Bk, 4>) -> f32 {
    let scale = b.clone().abs().max().into_scalar().elem::<f32>();
    (a - b).abs().max().into_scalar().elem::<f32>() / scale
}

/// Replaces every `lora_b` (zero at init) with N(0, 0.3²) values (seeded by the parameter's path).
struct RandomizeB(Vec<String>);

impl<Bk: Backend> ModuleMapper<Bk> for RandomizeB {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.0.push(name.into());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.0.pop();
    }
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<Bk, D>>) -> Param<Tensor<Bk, D>> {
        if self.0.last().is_some_and(|n| n == "lora_b") {
            let t = p.val();
            let mut rng = serial_lora::rng::rng(serial_lora::rng::named(&self.0.join(".")));
            let r = serial_lora::rng::normal(t.dims(), 0.3, &mut rng, &t.device());
            Param::initialized(p.id, r.detach().require_grad())
        } else {
            p
        }
    }
}

#[test]
fn context_stream_is_off_by_default_and_counts_are_exact_when_on() {
    let dev = Default::default();
    let (model, cfg) = load_transformer::<AB>(&dir(), &dev).unwrap();
    let (d, r) = (cfg.inner_dim(), 4);
    let lora = AdapterConfig::new(Method::Lora, r);
    let serial = AdapterConfig::new(Method::SerialLora, r);
    // default: image stream only
    assert_eq!(model.attention_sites().len(), 2);
    let image = model.clone().with_adapters(&lora, 0, &dev).unwrap();
    assert_eq!(image.trainable_params(), 2 * 4 * r * 2 * d);
    assert!(image.transformer_blocks.iter().all(|b| !b.attn.context.has_adapter()));
    // on: image sites, then context sites of the same modules
    let both = model.with_context_stream(true);
    let sites: Vec<(String, &str)> = both.attention_sites().into_iter().map(|s| (s.path, s.names.q)).collect();
    let p = |i: usize| format!("transformer_blocks.{i}.attn");
    assert_eq!(sites, [(p(0), "to_q"), (p(1), "to_q"), (p(0), "add_q_proj"), (p(1), "add_q_proj")]);
    // LoRA: 4 projections per image stream; context: 4 in block 0, 3 in the context_pre_only block
    assert_eq!(both.clone().with_adapters(&lora, 0, &dev).unwrap().trainable_params(), (2 * 4 + 4 + 3) * r * 2 * d);
    assert_eq!(both.clone().with_adapters(&serial, 0, &dev).unwrap().trainable_params(), 4 * r * 2 * d);
    // target_blocks index the site list: 2 = the first context stream only
    let only = both.with_adapters(&serial.clone().with_target_blocks(Some(vec![2])), 0, &dev).unwrap();
    assert!(only.transformer_blocks[0].attn.context.serial.is_some() && !only.transformer_blocks[0].attn.image.has_adapter());
}

#[test]
fn context_adapters_merge_unmerge_save_and_load() {
    let dev = Default::default();
    let (base, _) = load_transformer::<AB>(&dir(), &dev).unwrap();
    let base = base.with_context_stream(true);
    let base_out = run(&base.clone().valid());
    for method in [Method::Lora, Method::SerialLora] {
        let cfg = AdapterConfig::new(method, 2).with_alpha(4.0);
        let fresh = base.clone().with_adapters(&cfg, 0, &dev).unwrap();
        let fresh_err = rel(run(&fresh.clone().valid()), base_out.clone());
        assert!(fresh_err < 1e-6, "{method:?}: fresh adapter {fresh_err}");
        let adapted = fresh.map(&mut RandomizeB(Vec::new())).valid();
        let out = run(&adapted);
        let effect = rel(out.clone(), base_out.clone());
        let merged = adapted.clone().merge_adapters().unwrap();
        let merge_err = rel(run(&merged), out.clone());
        let restored = merged.unmerge_adapters().unwrap();
        let unmerge_err = rel(run(&restored), out.clone());
        let unloaded = adapted.clone().merge_and_unload().unwrap();
        assert!(unloaded.transformer_blocks.iter().all(|b| !b.attn.context.has_adapter() && !b.attn.image.has_adapter()));
        let unload_err = rel(run(&unloaded), out.clone());
        // save → load into a fresh base (with the context stream on) gives the same output
        let tmp = tempfile::tempdir().unwrap();
        save_adapter_with_prefix(&adapted, &cfg, tmp.path(), None, "transformer.").unwrap();
        let names = lora_runtime::weights::tensor_names(&tmp.path().join(serial_lora::io::WEIGHTS_FILE)).unwrap();
        let key = |module: &str| names.iter().any(|n| n == &format!("transformer.transformer_blocks.0.attn.{module}lora_A.weight"));
        match method {
            Method::SerialLora => assert!(key("serial_") && key("add_serial_") && names.len() == 8, "{names:?}"),
            Method::Lora => assert!(key("to_q.") && key("add_q_proj.") && key("to_add_out.") && names.len() == 2 * 15, "{names:?}"),
        }
        assert!(adapter_has_context_keys(tmp.path()).unwrap());
        let (fresh_base, _) = load_transformer::<B>(&dir(), &dev).unwrap();
        let (loaded, loaded_cfg) = load_adapter_with_prefix(fresh_base.with_context_stream(true), tmp.path(), &dev, "transformer.").unwrap();
        assert_eq!((loaded_cfg.method, loaded_cfg.rank), (method, 2));
        let load_err = rel(run(&loaded), out.clone());
        // without the context stream the same file is refused, naming the context keys
        let (plain, _) = load_transformer::<B>(&dir(), &dev).unwrap();
        let err = load_adapter_with_prefix(plain, tmp.path(), &dev, "transformer.").err().unwrap().to_string();
        assert!(err.contains("unexpected") && err.contains("add_"), "{err}");
        println!("{method:?}: effect {effect:.2e}, merged {merge_err:.2e}, unmerged {unmerge_err:.2e}, unloaded {unload_err:.2e}, loaded {load_err:.2e}");
        assert!(effect > 1e-2, "{method:?}: adapters do not change the output ({effect})");
        for (what, e) in [("merge", merge_err), ("unmerge", unmerge_err), ("unload", unload_err)] {
            assert!(e < TOL, "{method:?} {what}: {e}");
        }
        assert!(load_err == 0.0, "{method:?}: loaded adapter differs by {load_err}");
    }
}

#[test]
fn context_stream_adapter_alone_changes_the_output() {
    let dev = Default::default();
    let (base, _) = load_transformer::<AB>(&dir(), &dev).unwrap();
    let base = base.with_context_stream(true);
    let base_out = run(&base.clone().valid());
    for method in [Method::Lora, Method::SerialLora] {
        let cfg = AdapterConfig::new(method, 2).with_target_blocks(Some(vec![2, 3]));
        let m = base.clone().with_adapters(&cfg, 0, &dev).unwrap().map(&mut RandomizeB(Vec::new())).valid();
        assert!(m.transformer_blocks.iter().all(|b| !b.attn.image.has_adapter() && b.attn.context.has_adapter()));
        let effect = rel(run(&m), base_out.clone());
        let merge_err = rel(run(&m.clone().merge_adapters().unwrap()), run(&m));
        println!("{method:?} context only: effect {effect:.2e}, merged {merge_err:.2e}");
        assert!(effect > 1e-3 && merge_err < TOL, "{method:?}: {effect} {merge_err}");
    }
}

#[test]
fn a_diffusers_lora_with_context_keys_gives_diffusers_output() {
    let dev = Default::default();
    let lora = dir().join("lora_context");
    assert!(adapter_has_context_keys(&lora).unwrap());
    assert!(!adapter_has_context_keys(&dir().join("lora")).unwrap());
    let (model, _) = load_transformer::<B>(&dir(), &dev).unwrap();
    let (model, cfg) = load_adapter_with_prefix(model.with_context_stream(true), &lora, &dev, "transformer.").unwrap();
    assert_eq!((cfg.rank, cfg.alpha), (2, 4.0));
    assert!(model.transformer_blocks.iter().all(|b| b.attn.context.has_adapter()));
    let want: Tensor<B, 4> = tensor(&read("lora_context_reference.safetensors"), "sample");
    let got = run(&model);
    let err = rel(got.clone(), want.clone());
    let effect = rel(run(&load_transformer::<B>(&dir(), &dev).unwrap().0), want.clone());
    let merged_err = rel(run(&model.merge_and_unload().unwrap()), want);
    println!("diffusers LoRA on both streams: rel err {err:.2e}, merged {merged_err:.2e} (the LoRA moves the output by {effect:.2e})");
    assert!(err < TOL && merged_err < TOL && effect > 1e-2, "{err} {merged_err} {effect}");
}
