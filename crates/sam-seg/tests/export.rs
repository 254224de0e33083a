//! `sam-seg export` against fixtures made by the reference libraries
//! (`tools/fixtures/export_merge.py`): PEFT's `merge_and_unload()` + `save_pretrained()` of the
//! tiny SAM with a LoRA on the vision encoder's fused qkv and proj, the script's f64 Serial
//! LoRA merge, and the conversion of a segment-anything checkpoint to transformers' layout.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::fixtures;
use lora_runtime::export::{CheckpointTensor, max_rel_diff, read_checkpoint};
use serial_lora::io::read_safetensors;

/// Merged in f64 and rounded once to f32; PEFT merges in f32: a few ulps, relative to the
/// tensor's largest value.
const EXPORT_TOL: f64 = 1e-6;

fn sam(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sam-seg")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn checkpoint(dir: &Path) -> BTreeMap<String, CheckpointTensor> {
    read_checkpoint(dir, "model").unwrap()
}

#[test]
fn lora_export_equals_peft_merge_and_unload() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let model = fixtures().join("sam-tiny");
    let (ok, err) = sam(&["export", "--model", s(&model), "--adapter", s(&fixtures().join("export/sam_lora")), "--out", s(&out)]);
    assert!(ok, "{err}");
    let (ours, reference) = (checkpoint(&out), checkpoint(&fixtures().join("export/sam_lora_merged")));
    // save_pretrained leaves out the prompt encoder's copy of the tied Fourier matrix
    let tied = "prompt_encoder.shared_embedding.positional_embedding";
    let keys = |m: &BTreeMap<String, CheckpointTensor>| m.keys().filter(|k| *k != tied).cloned().collect::<Vec<_>>();
    assert_eq!(keys(&ours), keys(&reference));
    let mut worst = 0f64;
    for k in keys(&reference) {
        let ((dt, shape, v), (rdt, rshape, rv)) = (&ours[&k], &reference[&k]);
        assert_eq!((dt, shape), (rdt, rshape), "{k}");
        worst = worst.max(max_rel_diff(v, rv));
    }
    eprintln!("SAM LoRA export vs PEFT merge_and_unload + save_pretrained: max rel err {worst:.2e}");
    assert!(worst <= EXPORT_TOL, "{worst}");
    assert_eq!(std::fs::read(model.join("config.json")).unwrap(), std::fs::read(out.join("config.json")).unwrap());
}

#[test]
fn serial_export_equals_the_reference_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let model = fixtures().join("sam-tiny");
    let (ok, err) = sam(&["export", "--model", s(&model), "--adapter", s(&fixtures().join("export/sam_serial")), "--out", s(&out)]);
    assert!(ok, "{err}");
    let (ours, base) = (checkpoint(&out), checkpoint(&model));
    let (reference, _) = read_safetensors(&fixtures().join("export/sam_serial_merged.safetensors")).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), base.keys().collect::<Vec<_>>());
    let mut worst = 0f64;
    for (k, (_, _, v)) in &ours {
        match reference.get(k) {
            Some(r) => worst = worst.max(max_rel_diff(v, &r.data.iter().map(|&x| x as f64).collect::<Vec<_>>())),
            None => assert_eq!(v, &base[k].2, "{k} changed"),
        }
    }
    eprintln!("SAM Serial LoRA export vs the reference merge: max rel err {worst:.2e}");
    assert!(worst <= EXPORT_TOL, "{worst}");
}

#[test]
fn segment_anything_checkpoint_exports_in_transformers_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hf");
    let (ok, err) = sam(&["export", "--model", s(&fixtures().join("sam-tiny-original")), "--out", s(&out)]);
    assert!(ok, "{err}");
    let (ours, hf) = (checkpoint(&out), checkpoint(&fixtures().join("sam-tiny")));
    let tied = "prompt_encoder.shared_embedding.positional_embedding";
    let hf_keys: Vec<&String> = hf.keys().filter(|k| *k != tied).collect();
    assert_eq!(ours.keys().collect::<Vec<_>>(), hf_keys);
    for (k, t) in &ours {
        assert_eq!(t, &hf[k], "{k}");
    }
}

#[test]
fn predict_with_weighted_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("sam-tiny");
    let img = tmp.path().join("img.png");
    image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, 90])).save(&img).unwrap();
    let predict = |extra: &[&str]| {
        let out = tmp.path().join("p.safetensors");
        let mut args = vec!["predict", "--model", s(&model), "--image", s(&img), "--box", "4,5,30,25", "--output", s(&out)];
        args.extend(extra);
        let (ok, err) = sam(&args);
        assert!(ok, "{err}");
        read_safetensors(&out).unwrap().0["pred_masks"].data.clone()
    };
    let (lora, serial) = (fixtures().join("export/sam_lora"), fixtures().join("export/sam_serial"));
    let base = predict(&[]);
    assert_eq!(predict(&["--adapter", s(&lora), "--adapter-weights", "0"]), base, "weight 0 ≡ base");
    let single = predict(&["--adapter", s(&serial)]);
    assert_eq!(predict(&["--adapter", s(&serial), "--adapter-weights", "1"]), single, "weight 1 ≡ the single adapter");
    assert_ne!(single, base);
    // the exported model predicts what the adapters applied at inference predict
    let out = tmp.path().join("exported");
    let (ok, err) = sam(&["export", "--model", s(&model), "--adapter", s(&lora), "--adapter", s(&serial), "--adapter-weights", "0.7,0.5", "--out", s(&out)]);
    assert!(ok, "{err}");
    let applied = predict(&["--adapter", s(&lora), "--adapter", s(&serial), "--adapter-weights", "0.7,0.5"]);
    let exported = {
        let o = tmp.path().join("q.safetensors");
        let (ok, err) = sam(&["predict", "--model", s(&out), "--image", s(&img), "--box", "4,5,30,25", "--output", s(&o)]);
        assert!(ok, "{err}");
        read_safetensors(&o).unwrap().0["pred_masks"].data.clone()
    };
    let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let err = max_rel_diff(&f(&exported), &f(&applied));
    assert!(err < 1e-5, "{err}");
}
