//! Adapter invariants over a table of tiny configs, both methods (PEFT's test style):
//! B = 0 ⇒ base output; B ≠ 0 ⇒ different output; merged ≡ unmerged; unmerge restores the
//! base weights; save → load ⇒ identical output; exact parameter counts; frozen base; clear
//! errors for targets that match nothing and for corrupt or mismatched adapter files.
mod common;

use burn::module::Module;
use burn::prelude::*;
use common::*;
use serial_lora::analysis::{qkv_spectra, singular_values};
use serial_lora::{AdaptedModel, AdapterConfig, AttentionConfig, AttentionStack, Error, Init, Method, ParamCountExt, Projection, QkvProjection, io};

/// merged vs unmerged (and unmerge vs original) in f32: folding s·A·B into W reorders the sums
/// of one matmul; method.md: "f32: ~1e-5 relative".
const MERGE_TOL: f32 = 1e-5;

struct Case {
    name: &'static str,
    attn: AttentionConfig,
    layers: usize,
    adapter: AdapterConfig,
}

fn cases() -> Vec<Case> {
    let sep = |d, h| AttentionConfig::new(d, h);
    let fused = |d, h| AttentionConfig::new(d, h).with_fused_qkv(true);
    vec![
        Case { name: "lora d16", attn: sep(16, 2), layers: 2, adapter: AdapterConfig::new(Method::Lora, 4).with_alpha(8.0) },
        Case { name: "serial d16", attn: sep(16, 2), layers: 2, adapter: AdapterConfig::new(Method::SerialLora, 4).with_alpha(8.0) },
        Case { name: "lora fused d12 rslora", attn: fused(12, 3), layers: 2, adapter: AdapterConfig::new(Method::Lora, 2).with_alpha(4.0).with_rslora(true) },
        Case { name: "serial fused d12 gaussian", attn: fused(12, 3), layers: 2, adapter: AdapterConfig::new(Method::SerialLora, 3).with_init(Init::Gaussian) },
        Case {
            name: "lora d8 no-bias block 1, q+v",
            attn: sep(8, 1).with_qkv_bias(false),
            layers: 3,
            adapter: AdapterConfig::new(Method::Lora, 2).with_target_blocks(Some(vec![1])).with_target_projections(vec![Projection::Q, Projection::V]),
        },
        Case {
            name: "lora fused d12 k only",
            attn: fused(12, 2),
            layers: 1,
            adapter: AdapterConfig::new(Method::Lora, 2).with_target_projections(vec![Projection::K]),
        },
        Case {
            name: "serial d8 blocks 0,2 lora+",
            attn: sep(8, 2),
            layers: 3,
            adapter: AdapterConfig::new(Method::SerialLora, 2).with_target_blocks(Some(vec![0, 2])).with_lr_ratio(Some(20.0)),
        },
    ]
}

/// Every random draw of this file comes from a generator seeded with `SEED` (+ a small offset
/// per use): a failure replays as it is.
const SEED: u64 = 20_260_317;

/// A base stack with seeded, materialized weights (cloning a lazy Burn param re-initializes it).
fn base(case: &Case) -> AttentionStack<B> {
    seeded_stack(&case.attn, case.layers, SEED)
}

fn input(case: &Case) -> Tensor<B, 3> {
    randn([2, 5, case.attn.d_model], SEED + 2)
}

fn adapted(case: &Case, base: &AttentionStack<B>) -> AttentionStack<B> {
    let m = base.clone().with_adapters(&case.adapter, 0, &Default::default()).expect("attach");
    m.map(&mut RandomizeB::new(SEED + 1))
}

fn base_weights(m: &AttentionStack<B>) -> Vec<Tensor<B, 2>> {
    m.layers
        .iter()
        .flat_map(|a| {
            let mut w = match &a.qkv {
                QkvProjection::Separate(s) => vec![s.q.base.weight.val(), s.k.base.weight.val(), s.v.base.weight.val()],
                QkvProjection::Fused(f) => vec![f.base.weight.val()],
            };
            w.extend(a.o.as_ref().map(|o| o.base.weight.val()));
            w
        })
        .collect()
}

#[test]
fn fresh_adapter_is_the_base_model() {
    for case in cases() {
        let base = base(&case);
        let x = input(&case);
        let fresh = base.clone().with_adapters(&case.adapter, 0, &Default::default()).unwrap();
        let e = max_abs_diff(fresh.forward(x.clone()), base.forward(x));
        assert_eq!(e, 0.0, "{}: B = 0 must give exactly the base output", case.name);
    }
}

#[test]
fn nonzero_adapter_changes_the_output() {
    for case in cases() {
        let base = base(&case);
        let x = input(&case);
        let e = max_abs_diff(adapted(&case, &base).forward(x.clone()), base.forward(x));
        assert!(e > 1e-3, "{}: a non-zero adapter left the output unchanged ({e})", case.name);
    }
}

#[test]
fn merge_matches_unmerged_and_unmerge_restores_base() {
    for case in cases() {
        let base = base(&case);
        let x = input(&case);
        let m = adapted(&case, &base);
        let y = m.forward(x.clone());
        let merged = m.merge_adapters().unwrap();
        let e = rel_err(merged.forward(x.clone()), y.clone());
        assert!(e < MERGE_TOL, "{}: merged differs from unmerged by {e}", case.name);
        assert!(matches!(merged.clone().merge_adapters(), Err(Error::MergeState { .. })), "{}: merging twice must fail", case.name);
        let unmerged = merged.clone().unmerge_adapters().unwrap();
        for (w, w0) in base_weights(&unmerged).into_iter().zip(base_weights(&base)) {
            let e = rel_err(w, w0);
            assert!(e < MERGE_TOL, "{}: unmerge left weights off by {e}", case.name);
        }
        let e = rel_err(unmerged.forward(x.clone()), y.clone());
        assert!(e < MERGE_TOL, "{}: unmerged output off by {e}", case.name);
        let plain = merged.merge_and_unload().unwrap();
        assert!(plain.layers.iter().all(|a| !a.has_adapter()), "{}: unload left adapters", case.name);
        assert_eq!(plain.total_params(), base.total_params(), "{}", case.name);
        let e = rel_err(plain.forward(x), y);
        assert!(e < MERGE_TOL, "{}: unloaded output off by {e}", case.name);
    }
}

#[test]
fn safe_merge_refuses_non_finite_weights() {
    let case = &cases()[1];
    let m = adapted(case, &base(case));
    let mut m = m.map(&mut RandomizeB::new(SEED + 1));
    let pair = &mut m.layers[1].serial.as_mut().unwrap().pair;
    pair.lora_b = burn::module::Param::from_tensor(pair.lora_b.val().mul_scalar(f32::INFINITY).detach());
    let err = m.merge_adapters().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("encoder.layers.1.self_attn"), "{msg}");
    assert!(matches!(err, Error::NonFiniteMerge { .. }));
}

#[test]
fn save_then_load_gives_identical_output() {
    for case in cases() {
        let base = base(&case);
        let x = input(&case);
        let m = adapted(&case, &base);
        let dir = tempfile::tempdir().unwrap();
        io::save_adapter(&m, &case.adapter, dir.path(), Some("tiny/base")).unwrap();
        let (loaded, cfg) = io::load_adapter(base.clone(), dir.path(), &Default::default()).unwrap();
        assert_eq!(max_abs_diff(loaded.forward(x.clone()), m.forward(x)), 0.0, "{}", case.name);
        assert_eq!(cfg, case.adapter, "{}: config round trip", case.name);
        assert_eq!(loaded.param_counts(), m.param_counts(), "{}", case.name);
        // saving onto an existing adapter replaces it atomically (no temp files left behind)
        io::save_adapter(&loaded, &cfg, dir.path(), None).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{}: {names:?}", case.name);
    }
}

#[test]
fn parameter_counts_are_exact_and_base_is_frozen() {
    for case in cases() {
        let base = base(&case);
        let total_base = base.total_params();
        let m = adapted(&case, &base);
        let (d, r) = (case.attn.d_model, case.adapter.rank);
        let blocks = (0..case.layers).filter(|&i| case.adapter.targets_block(i)).count();
        let expected = match case.adapter.method {
            // one (A, B) pair per projection of width d: r·2d each
            Method::Lora => blocks * case.adapter.target_projections.len() * r * 2 * d,
            Method::SerialLora => blocks * r * 2 * d,
        };
        let counts = m.param_counts();
        assert_eq!(counts.trainable, expected, "{}", case.name);
        assert_eq!(counts.total, total_base + expected, "{}", case.name);

        // no gradient reaches a base weight
        let grads = m.forward(input(&case)).sum().backward();
        for w in base_weights(&m) {
            assert!(w.grad(&grads).is_none(), "{}: a base weight received a gradient", case.name);
        }
    }
    // The method's accounting, written out: Q, K, V, O of width d at rank r.
    let (d, r) = (16, 4);
    let full = |method| {
        let b = AttentionStack::<B>::new(&AttentionConfig::new(d, 2), 1, &Default::default());
        b.with_adapters(&AdapterConfig::new(method, r), 0, &Default::default()).unwrap().trainable_params()
    };
    assert_eq!(full(Method::Lora), 4 * r * 2 * d);
    assert_eq!(full(Method::SerialLora), r * 2 * d);
}

#[test]
fn fused_qkv_lora_equals_separate_lora() {
    let dev = Default::default();
    let sep = seeded_stack::<B>(&AttentionConfig::new(12, 3), 1, SEED);
    let cfg = AdapterConfig::new(Method::Lora, 2);
    let sep = sep.with_adapters(&cfg, 0, &dev).unwrap().map(&mut RandomizeB::new(SEED + 1));
    let QkvProjection::Separate(s) = &sep.layers[0].qkv else { unreachable!() };
    let cat = |f: &dyn Fn(&serial_lora::LoraLinear<B>) -> Tensor<B, 2>| Tensor::cat(vec![f(&s.q), f(&s.k), f(&s.v)], 1);
    let w = cat(&|l| l.base.weight.val());
    let b: Tensor<B, 1> =
        Tensor::cat(vec![s.q.base.bias.as_ref().unwrap().val(), s.k.base.bias.as_ref().unwrap().val(), s.v.base.bias.as_ref().unwrap().val()], 0);
    let fused = serial_lora::FusedQkv {
        base: burn::nn::Linear { weight: burn::module::Param::from_tensor(w.detach()), bias: Some(burn::module::Param::from_tensor(b.detach())) }.no_grad(),
        q: s.q.lora.clone(),
        k: s.k.lora.clone(),
        v: s.v.lora.clone(),
    };
    let mut fused_stack = sep.clone();
    fused_stack.layers[0].qkv = QkvProjection::Fused(fused);
    let x = randn::<B, 3>([2, 4, 12], SEED + 2);
    let e = rel_err(fused_stack.forward(x.clone()), sep.forward(x));
    assert!(e < 1e-6, "fused and separate LoRA differ by {e}");
    assert_eq!(fused_stack.trainable_params(), sep.trainable_params());
}

#[test]
fn lora_update_has_rank_r_and_spectra_follow_merging() {
    let case = &cases()[0];
    let base = base(case);
    let m = adapted(case, &base);
    let before = qkv_spectra(&m);
    assert_eq!(before.len(), 2 * 3);
    assert_eq!(before[0].singular_values.len(), 16);
    let merged = qkv_spectra(&m.clone().merge_adapters().unwrap());
    for (a, b) in before.iter().zip(&merged) {
        for (x, y) in a.singular_values.iter().zip(&b.singular_values) {
            assert!((x - y).abs() <= 1e-4 * a.singular_values[0], "{} {}: {x} vs {y}", a.block, a.projection);
        }
    }
    // ΔW = W_eff − W_base has rank ≤ r = 4
    let QkvProjection::Separate(s) = &m.layers[0].qkv else { unreachable!() };
    let eff = m.layers[0].effective_qkv_weights();
    let sv = singular_values(eff[0].clone() - s.q.base.weight.val());
    assert!(sv[4] < 1e-5 * sv[0], "LoRA update has rank > 4: {sv:?}");
    assert!(sv[3] > 1e-3 * sv[0]);
    // known spectrum: diag(3, −1, 2) → [3, 2, 1]
    let w = Tensor::<I, 2>::from_floats([[3.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 2.0]], &Default::default());
    let sv = singular_values(w);
    assert!(sv.iter().zip([3.0, 2.0, 1.0]).all(|(a, b)| (a - b).abs() < 1e-12), "{sv:?}");
}

#[test]
fn targets_that_match_nothing_are_errors() {
    let case = &cases()[0];
    let dev = Default::default();
    let err = base(case).with_adapters(&case.adapter.clone().with_target_blocks(Some(vec![0, 7])), 0, &dev).unwrap_err();
    assert!(matches!(err, Error::TargetMatchesNothing(_)) && err.to_string().contains("[7]"), "{err}");
    let err = base(case).with_adapters(&AdapterConfig::new(Method::Lora, 2).with_target_projections(vec![]), 0, &dev).unwrap_err();
    assert!(matches!(err, Error::TargetMatchesNothing(_)), "{err}");
    for (cfg, field) in [
        (AdapterConfig::new(Method::Lora, 0), "rank"),
        (AdapterConfig::new(Method::Lora, 2).with_dropout(1.0), "dropout"),
        (AdapterConfig::new(Method::Lora, 2).with_alpha(-1.0), "alpha"),
        (AdapterConfig::new(Method::Lora, 2).with_lr_ratio(Some(0.0)), "lr_ratio"),
    ] {
        let err = base(case).with_adapters(&cfg, 0, &dev).unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }
}

fn saved(case: &Case) -> (AttentionStack<B>, tempfile::TempDir) {
    let base = base(case);
    let m = adapted(case, &base);
    let dir = tempfile::tempdir().unwrap();
    io::save_adapter(&m, &case.adapter, dir.path(), None).unwrap();
    (base, dir)
}

fn load_err(base: AttentionStack<B>, dir: &std::path::Path) -> String {
    match io::load_adapter(base, dir, &Default::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn corrupt_or_mismatched_adapter_files_give_clear_errors() {
    let cases = cases();
    let lora = &cases[0];
    let weights = |d: &tempfile::TempDir| d.path().join(io::WEIGHTS_FILE);
    let config = |d: &tempfile::TempDir| d.path().join(io::CONFIG_FILE);

    // truncated, zero-byte and lying-header safetensors
    let (b, d) = saved(lora);
    let bytes = std::fs::read(weights(&d)).unwrap();
    std::fs::write(weights(&d), &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(b.clone(), d.path());
    assert!(msg.contains(io::WEIGHTS_FILE) && msg.contains("not a valid safetensors"), "{msg}");
    std::fs::write(weights(&d), b"").unwrap();
    assert!(load_err(b.clone(), d.path()).contains(io::WEIGHTS_FILE));
    let mut lying = bytes.clone();
    let n = u64::from_le_bytes(lying[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(lying[8..8 + n].to_vec()).unwrap().replacen("[4,16]", "[4,1600]", 1);
    lying.splice(8..8 + n, header.bytes());
    std::fs::write(weights(&d), &lying).unwrap();
    assert!(load_err(b.clone(), d.path()).contains("not a valid safetensors"));

    // a missing file, malformed JSON, unknown peft_type
    std::fs::write(weights(&d), &bytes).unwrap();
    let good_cfg = std::fs::read_to_string(config(&d)).unwrap();
    std::fs::remove_file(config(&d)).unwrap();
    assert!(load_err(b.clone(), d.path()).contains(io::CONFIG_FILE));
    std::fs::write(config(&d), "{ not json").unwrap();
    let msg = load_err(b.clone(), d.path());
    assert!(msg.contains(io::CONFIG_FILE) && msg.contains("malformed JSON"), "{msg}");
    std::fs::write(config(&d), good_cfg.replace("\"LORA\"", "\"IA3\"")).unwrap();
    assert!(load_err(b.clone(), d.path()).contains("IA3"));
    std::fs::write(config(&d), good_cfg.replace("\"r\": 4", "\"r\": 0")).unwrap();
    assert!(load_err(b.clone(), d.path()).contains("rank"));

    // rank in the config ≠ rank of the tensors
    std::fs::write(config(&d), good_cfg.replace("\"r\": 4", "\"r\": 8")).unwrap();
    let msg = load_err(b.clone(), d.path());
    assert!(msg.contains("wrong shapes") && msg.contains("[4, 16]") && msg.contains("[8, 16]"), "{msg}");
    std::fs::write(config(&d), &good_cfg).unwrap();

    // a missing key and an unexpected key
    let (mut t, meta) = io::read_safetensors(&weights(&d)).unwrap();
    let key = "base_model.model.encoder.layers.1.self_attn.v_proj.lora_B.weight";
    let v = t.remove(key).unwrap();
    t.insert("base_model.model.encoder.layers.1.mlp.fc1.lora_B.weight".into(), v);
    io::write_safetensors(&weights(&d), &t, meta).unwrap();
    let msg = load_err(b.clone(), d.path());
    assert!(msg.contains("missing keys (1)") && msg.contains(key), "{msg}");
    assert!(msg.contains("unexpected keys") && msg.contains("mlp.fc1.lora_B.weight"), "{msg}");

    // an adapter for another model (width 16 into width 8) and for another method
    let (_, d16) = saved(lora);
    let msg = load_err(base(&cases[6]), d16.path());
    assert!(msg.contains("wrong shapes"), "{msg}");
    let (_, serial) = saved(&cases[1]);
    let mut lora_base = base(lora);
    lora_base.layers.truncate(1);
    let msg = load_err(lora_base, serial.path());
    assert!(msg.contains("encoder.layers.1.self_attn.serial_lora_A.weight"), "{msg}");

    // a model that already carries an adapter
    let (b, d) = saved(lora);
    let msg = load_err(adapted(lora, &b), d.path());
    assert!(msg.contains("already carries an adapter"), "{msg}");
}

#[test]
fn a_wrong_dtype_is_named() {
    let (b, d) = saved(&cases()[0]);
    let path = d.path().join(io::WEIGHTS_FILE);
    let data = vec![0u8; 8];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1], &data).unwrap();
    std::fs::write(&path, safetensors::serialize([("base_model.model.x.lora_A.weight", view)], None).unwrap()).unwrap();
    let msg = load_err(b, d.path());
    assert!(msg.contains("base_model.model.x.lora_A.weight") && msg.contains("I64"), "{msg}");
}

#[test]
fn adapter_config_files_round_trip_and_name_bad_values() {
    let cfg = AdapterConfig::from_method_name("serial-lora-plus", 32, 20.0).unwrap().with_dropout(0.25);
    assert_eq!(cfg.method, Method::SerialLora);
    assert_eq!(cfg.lr_ratio, Some(20.0));
    assert_eq!(cfg.method_name(), "serial-lora-plus");
    let dir = tempfile::tempdir().unwrap();
    let toml_path = dir.path().join("a.toml");
    std::fs::write(&toml_path, toml::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(AdapterConfig::load(&toml_path).unwrap(), cfg);
    let json_path = dir.path().join("a.json");
    std::fs::write(&json_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(AdapterConfig::load(&json_path).unwrap(), cfg);
    std::fs::write(&toml_path, "method = \"lora\"\nrank = 4\nrnak = 3\n").unwrap();
    let msg = AdapterConfig::load(&toml_path).unwrap_err().to_string();
    assert!(msg.contains("a.toml") && msg.contains("rnak"), "{msg}");
    std::fs::write(&toml_path, "method = \"dora\"\nrank = 4\n").unwrap();
    assert!(AdapterConfig::load(&toml_path).unwrap_err().to_string().contains("dora"));
    assert!(AdapterConfig::from_method_name("qlora", 4, 20.0).unwrap_err().to_string().contains("qlora"));
    assert!((AdapterConfig::new(Method::Lora, 4).with_alpha(8.0).with_rslora(true).scale() - 4.0).abs() < 1e-12);
}

#[test]
fn shipped_adapter_configs_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/adapters");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let cfg = AdapterConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.rank >= 32, "{}", path.display());
        n += 1;
    }
    assert!(n >= 4);
}
