//! `clip-cls export` and several adapters at inference, against fixtures made by the reference
//! libraries (`tools/fixtures/export_merge.py`): PEFT's `merge_and_unload()` + `save_pretrained()`,
//! PEFT's `add_weighted_adapter(combination_type="cat")`, and the script's f64 Serial LoRA merge.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{clip, fixtures, images, s, tiny_model_dir};
use lora_runtime::export::{CheckpointTensor, ExportOptions, max_rel_diff, read_checkpoint, weighted_adapters};
use serial_lora::io::read_safetensors;

/// Merged in f64 and rounded once to f32 here; PEFT merges in f32 (one rounding of B·A and one of
/// the sum): a few f32 ulps of the weight, relative to the tensor's largest value.
const EXPORT_TOL: f64 = 1e-6;
/// Embeddings through 2 blocks per tower with merged vs PEFT's unmerged adapters: the f32
/// summation order differs (as the PEFT parity tests).
const EMBED_TOL: f64 = 1e-5;
/// f16 keeps 11 significant bits: rounding to nearest is within 2^-11 of the value (plus f16's
/// subnormal spacing 2^-24 near zero).
const F16_REL: f64 = 1.0 / 2048.0;
/// bf16 keeps 8 significant bits: within 2^-8 of the value.
const BF16_REL: f64 = 1.0 / 256.0;

fn export_dir() -> PathBuf {
    fixtures().join("export")
}

fn export(model: &Path, adapters: &[&Path], extra: &[&str], out: &Path) -> (bool, String) {
    let mut args = vec!["export", "--model", s(model)];
    for a in adapters {
        args.extend(["--adapter", s(a)]);
    }
    args.extend(extra);
    args.extend(["--out", s(out)]);
    let (ok, _, err) = clip(&args);
    (ok, err)
}

fn checkpoint(dir: &Path) -> BTreeMap<String, CheckpointTensor> {
    read_checkpoint(dir, "model").unwrap()
}

/// Same keys, shapes and dtypes; returns the largest relative difference over all tensors.
fn compare(ours: &BTreeMap<String, CheckpointTensor>, reference: &BTreeMap<String, CheckpointTensor>) -> f64 {
    let (ka, kb): (Vec<_>, Vec<_>) = (ours.keys().collect(), reference.keys().collect());
    assert_eq!(ka, kb, "keys differ");
    let mut worst = 0f64;
    for (k, (dt, shape, v)) in ours {
        let (rdt, rshape, rv) = &reference[k];
        assert_eq!((dt, shape), (rdt, rshape), "{k}: dtype / shape");
        worst = worst.max(max_rel_diff(v, rv));
    }
    worst
}

#[test]
fn lora_export_equals_peft_merge_and_unload() {
    let model = tiny_model_dir();
    let out = model.path().join("merged");
    let (ok, err) = export(model.path(), &[&fixtures().join("clip-tiny/peft_lora")], &[], &out);
    assert!(ok, "{err}");
    let err = compare(&checkpoint(&out), &checkpoint(&export_dir().join("clip_lora_merged")));
    eprintln!("LoRA export vs PEFT merge_and_unload + save_pretrained: max rel err {err:.2e}");
    assert!(err <= EXPORT_TOL, "{err}");
    // the rest of the model directory is copied, and the merged model gives PEFT's embeddings
    for f in ["config.json", "vocab.json", "merges.txt"] {
        assert_eq!(std::fs::read(model.path().join(f)).unwrap(), std::fs::read(out.join(f)).unwrap(), "{f}");
    }
    assert!(
        !out.join("peft_lora").exists() && std::fs::read_dir(model.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with(".merged"))
    );
}

#[test]
fn serial_export_equals_the_reference_merge_and_keeps_the_rest() {
    let model = tiny_model_dir();
    let out = model.path().join("merged");
    let (ok, err) = export(model.path(), &[&export_dir().join("clip_serial")], &[], &out);
    assert!(ok, "{err}");
    let (ours, base) = (checkpoint(&out), checkpoint(model.path()));
    let (reference, _) = read_safetensors(&export_dir().join("clip_serial_merged.safetensors")).unwrap();
    let mut worst = 0f64;
    let mut merged = 0;
    for (k, (dt, shape, v)) in &ours {
        assert_eq!((dt, shape), (&base[k].0, &base[k].1), "{k}");
        match reference.get(k) {
            Some(r) => {
                merged += 1;
                worst = worst.max(max_rel_diff(v, &r.data.iter().map(|&x| x as f64).collect::<Vec<_>>()));
            }
            None => assert_eq!(v, &base[k].2, "{k} changed"),
        }
    }
    assert_eq!(merged, 12, "q, k, v of 4 blocks");
    eprintln!("Serial LoRA export vs the reference merge W (I + s·B·A): max rel err {worst:.2e}");
    assert!(worst <= EXPORT_TOL, "{worst}");
}

#[test]
fn two_lora_adapters_equal_peft_cat_and_serial_adapters_compose_in_order() {
    let model = tiny_model_dir();
    let (cat, _) = read_safetensors(&export_dir().join("clip_cat.safetensors")).unwrap();
    let (serial, _) = read_safetensors(&export_dir().join("clip_serial_merged.safetensors")).unwrap();
    type Case<'a> = (&'a str, [PathBuf; 2], &'a BTreeMap<String, serial_lora::io::HostTensor>, &'a str);
    let cases: [Case; 3] = [
        ("cat", [fixtures().join("clip-tiny/peft_lora"), export_dir().join("clip_lora_b")], &cat, "merged."),
        ("composed", [export_dir().join("clip_serial"), export_dir().join("clip_serial_b")], &serial, "composed."),
        ("mixed", [fixtures().join("clip-tiny/peft_lora"), export_dir().join("clip_serial_b")], &serial, "mixed."),
    ];
    for (name, adapters, reference, prefix) in cases {
        let out = model.path().join(name);
        let (ok, err) = export(model.path(), &[&adapters[0], &adapters[1]], &["--adapter-weights", "0.7,0.5"], &out);
        assert!(ok, "{err}");
        let ours = checkpoint(&out);
        let mut worst = 0f64;
        let mut n = 0;
        for (k, r) in reference.iter().filter_map(|(k, r)| k.strip_prefix(prefix).map(|k| (k, r))) {
            n += 1;
            worst = worst.max(max_rel_diff(&ours[k].2, &r.data.iter().map(|&x| x as f64).collect::<Vec<_>>()));
        }
        assert!(n >= 12, "{name}: {n} reference tensors");
        eprintln!("{name} (weights 0.7, 0.5): max rel err {worst:.2e} over {n} tensors");
        assert!(worst <= EXPORT_TOL, "{name}: {worst}");
    }
}

fn embed(model: &Path, adapter_args: &[&str], out: &Path) -> BTreeMap<String, Vec<f64>> {
    let imgs = images();
    let mut args = vec!["embed", "--model", s(model)];
    args.extend(adapter_args);
    args.extend(["--images", s(&imgs[0]), s(&imgs[1]), "--texts", "a photo of a dog.", "a cat", "--output", s(out)]);
    let (ok, _, err) = clip(&args);
    assert!(ok, "{err}");
    let (t, _) = read_safetensors(out).unwrap();
    t.into_iter().map(|(k, v)| (k, v.data.iter().map(|&x| x as f64).collect())).collect()
}

#[test]
fn adapter_weights_at_inference() {
    let model = tiny_model_dir();
    let (m, o) = (model.path(), model.path().join("e.safetensors"));
    let lora = fixtures().join("clip-tiny/peft_lora");
    let serial = export_dir().join("clip_serial");
    let base = embed(m, &[], &o);
    for a in [&lora, &serial] {
        let single = embed(m, &["--adapter", s(a)], &o);
        assert_eq!(embed(m, &["--adapter", s(a), "--adapter-weights", "0"], &o), base, "weight 0 ≡ base");
        assert_eq!(embed(m, &["--adapter", s(a), "--adapter-weights", "1"], &o), single, "weight 1 ≡ the single adapter");
        assert_ne!(single, base);
    }
    // the merged export gives the embeddings of the same adapters applied at inference
    let out = m.join("exported");
    let (ok, err) = export(m, &[&lora, &serial], &["--adapter-weights", "0.7,0.5"], &out);
    assert!(ok, "{err}");
    for f in ["vocab.json", "merges.txt"] {
        assert!(out.join(f).is_file());
    }
    let exported = embed(&out, &[], &o);
    let applied = embed(m, &["--adapter", s(&lora), "--adapter", s(&serial), "--adapter-weights", "0.7,0.5"], &o);
    for k in ["image_embeds", "text_embeds"] {
        assert!(max_rel_diff(&exported[k], &applied[k]) < EMBED_TOL, "{k}");
    }
    // zero-shot and eval take the same flags
    let (ok, _, err) = clip(&[
        "zero-shot",
        "--model",
        s(m),
        "--adapter",
        s(&lora),
        "--adapter",
        s(&serial),
        "--adapter-weights",
        "0.7,0.5",
        "--classes",
        "dog,cat",
        s(&images()[0]),
    ]);
    assert!(ok, "{err}");
}

#[test]
fn two_lora_adapters_give_peft_cat_embeddings() {
    // PEFT's add_weighted_adapter(cat) embeddings on the fixture's inputs, through the library's
    // multi-adapter merge (what embed / zero-shot / eval run)
    use burn::backend::Flex;
    use burn::prelude::*;
    let dev = Default::default();
    let (model, _) = clip_cls::load_clip::<Flex>(&fixtures().join("clip-tiny"), &dev).unwrap();
    let adapters = weighted_adapters(&[fixtures().join("clip-tiny/peft_lora"), export_dir().join("clip_lora_b")], &[0.7, 0.5]).unwrap();
    let model = lora_runtime::export::merge_weighted(model, &adapters, &mut |m, a| serial_lora::io::load_adapter(m, a, &dev).map(|(m, _)| m)).unwrap();
    let inputs = read_checkpoint(&fixtures().join("clip-tiny"), "reference").unwrap();
    let (cat, _) = read_safetensors(&export_dir().join("clip_cat.safetensors")).unwrap();
    let (_, shape, px) = &inputs["pixel_values"];
    let px = Tensor::<Flex, 4>::from_data(TensorData::new(px.iter().map(|&x| x as f32).collect::<Vec<_>>(), shape.clone()), &dev);
    let (_, shape, ids) = &inputs["input_ids"];
    let ids = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), shape.clone()), &dev);
    let f64s = |t: Tensor<Flex, 2>| t.into_data().iter::<f64>().collect::<Vec<_>>();
    let img = max_rel_diff(&f64s(model.get_image_features(px)), &cat["image_embeds"].data.iter().map(|&x| x as f64).collect::<Vec<_>>());
    let txt = max_rel_diff(&f64s(model.get_text_features(ids)), &cat["text_embeds"].data.iter().map(|&x| x as f64).collect::<Vec<_>>());
    eprintln!("two LoRA adapters (0.7, 0.5) vs PEFT add_weighted_adapter(cat): image {img:.2e}, text {txt:.2e}");
    assert!(img < EMBED_TOL && txt < EMBED_TOL);
}

#[test]
fn half_precision_exports_round_the_f32_merge() {
    let model = tiny_model_dir();
    let lora = fixtures().join("clip-tiny/peft_lora");
    let f32_out = model.path().join("f32");
    assert!(export(model.path(), &[&lora], &[], &f32_out).0);
    let reference = checkpoint(&f32_out);
    for (dtype, name, rel) in [("f16", "F16", F16_REL), ("bf16", "BF16", BF16_REL)] {
        let out = model.path().join(dtype);
        let (ok, err) = export(model.path(), &[&lora], &["--dtype", dtype], &out);
        assert!(ok, "{err}");
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["dtype"], if dtype == "f16" { "float16" } else { "bfloat16" });
        for (k, (dt, shape, v)) in checkpoint(&out) {
            let (rdt, rshape, rv) = &reference[&k];
            assert_eq!(&shape, rshape);
            if rdt == "F32" {
                assert_eq!(dt, name, "{k}");
                for (x, y) in v.iter().zip(rv) {
                    assert!((x - y).abs() <= rel * y.abs() + 6e-8, "{k}: {x} vs {y}");
                }
            }
        }
    }
}

#[test]
fn sharded_export_loads_and_equals_the_single_file() {
    use burn::backend::Flex;
    let model = tiny_model_dir();
    let dev = Default::default();
    let adapters = weighted_adapters(&[fixtures().join("clip-tiny/peft_lora")], &[]).unwrap();
    let (single, sharded) = (model.path().join("single"), model.path().join("sharded"));
    let opts = ExportOptions::default();
    clip_cls::export::export_clip::<Flex>(model.path(), &adapters, &opts, &single, &dev).unwrap();
    let opts = ExportOptions { max_shard_bytes: Some(100_000), ..Default::default() };
    let summary = clip_cls::export::export_clip::<Flex>(model.path(), &adapters, &opts, &sharded, &dev).unwrap();
    assert!(summary.shards > 1, "{summary:?}");
    assert!(sharded.join("model.safetensors.index.json").is_file() && !sharded.join("model.safetensors").exists());
    assert_eq!(compare(&checkpoint(&sharded), &checkpoint(&single)), 0.0);
    clip_cls::load_clip::<Flex>(&sharded, &dev).unwrap();
}

#[test]
fn export_refuses_an_existing_out_and_bad_weights() {
    let model = tiny_model_dir();
    let lora = fixtures().join("clip-tiny/peft_lora");
    let out = model.path().join("merged");
    assert!(export(model.path(), &[&lora], &[], &out).0);
    let (ok, err) = export(model.path(), &[&lora], &[], &out);
    assert!(!ok && err.contains("merged") && err.contains("--force"), "{err}");
    let (ok, err) = export(model.path(), &[&lora], &["--force"], &out);
    assert!(ok, "{err}");
    let (ok, err) = export(model.path(), &[&lora], &["--force", "--adapter-weights", "0.5,1"], &out);
    assert!(!ok && err.contains("adapter-weights"), "{err}");
    // an adapter of another model: named, and nothing is left behind
    let fresh = model.path().join("fresh");
    let (ok, err) = export(model.path(), &[&export_dir().join("sam_serial")], &[], &fresh);
    assert!(!ok && err.contains("sam_serial"), "{err}");
    assert!(!fresh.exists());
    assert!(std::fs::read_dir(model.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp-")));
}
