//! `sd3-gen export` against fixtures made by the reference libraries
//! (`tools/fixtures/export_merge.py`): diffusers' `fuse_lora()` + `save_pretrained()` of the tiny
//! SD3 transformer with the fixture's LoRA, and the script's f64 Serial LoRA merge; the rest of
//! the pipeline directory is copied, a sharded transformer loads.
use std::path::{Path, PathBuf};
use std::process::Command;

use lora_runtime::export::{max_rel_diff, read_checkpoint};
use serial_lora::io::read_safetensors;

/// Merged in f64 and rounded once to f32; diffusers fuses in f32: a few ulps, relative to the
/// tensor's largest value.
const EXPORT_TOL: f64 = 1e-6;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn sd3(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sd3-gen")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const STEM: &str = "diffusion_pytorch_model";

#[test]
fn lora_export_equals_diffusers_fuse_lora_and_copies_the_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let model = fixtures().join("sd3-tiny");
    let (ok, err) = sd3(&["export", "--model", s(&model), "--adapter", s(&model.join("lora")), "--out", s(&out)]);
    assert!(ok, "{err}");
    let ours = read_checkpoint(&out.join("transformer"), STEM).unwrap();
    let reference = read_checkpoint(&fixtures().join("export/sd3_lora_merged"), STEM).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), reference.keys().collect::<Vec<_>>());
    let mut worst = 0f64;
    for (k, (dt, shape, v)) in &ours {
        let (rdt, rshape, rv) = &reference[k];
        assert_eq!((dt, shape), (rdt, rshape), "{k}");
        worst = worst.max(max_rel_diff(v, rv));
    }
    eprintln!("SD3 LoRA export vs diffusers fuse_lora + save_pretrained: max rel err {worst:.2e}");
    assert!(worst <= EXPORT_TOL, "{worst}");
    for f in [
        "model_index.json",
        "transformer/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer_3/tokenizer.json",
    ] {
        assert_eq!(std::fs::read(model.join(f)).unwrap(), std::fs::read(out.join(f)).unwrap(), "{f}");
    }
    assert!(!out.join("lora").exists() || model.join("lora").is_dir());
}

#[test]
fn serial_export_equals_the_reference_merge_and_shards_load() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("sd3-tiny");
    let serial = fixtures().join("export/sd3_serial");
    let out = tmp.path().join("merged");
    let (ok, err) = sd3(&["export", "--model", s(&model), "--adapter", s(&serial), "--out", s(&out)]);
    assert!(ok, "{err}");
    let ours = read_checkpoint(&out.join("transformer"), STEM).unwrap();
    let base = read_checkpoint(&model.join("transformer"), STEM).unwrap();
    let (reference, _) = read_safetensors(&fixtures().join("export/sd3_serial_merged.safetensors")).unwrap();
    let mut worst = 0f64;
    for (k, (_, _, v)) in &ours {
        match reference.get(k) {
            Some(r) => worst = worst.max(max_rel_diff(v, &r.data.iter().map(|&x| x as f64).collect::<Vec<_>>())),
            None => assert_eq!(v, &base[k].2, "{k} changed"),
        }
    }
    eprintln!("SD3 Serial LoRA export vs the reference merge: max rel err {worst:.2e}");
    assert!(worst <= EXPORT_TOL, "{worst}");

    // sharded (diffusers' index layout): loads, same tensors
    use burn::backend::Flex;
    let dev = Default::default();
    let adapters = lora_runtime::export::weighted_adapters(&[serial], &[]).unwrap();
    let sharded = tmp.path().join("sharded");
    let opts = lora_runtime::export::ExportOptions { max_shard_bytes: Some(40_000), ..Default::default() };
    let summary = sd3_gen::export::export_sd3::<Flex>(&model, &adapters, &opts, &sharded, &dev).unwrap();
    assert!(summary.shards > 1 && sharded.join("transformer/diffusion_pytorch_model.safetensors.index.json").is_file());
    assert_eq!(read_checkpoint(&sharded.join("transformer"), STEM).unwrap(), ours);
    sd3_gen::load_transformer::<Flex>(&sharded, &dev).unwrap();
}
