//! The `clip-cls` binary end to end on the tiny fixture model: output keys and shapes, equality
//! with the library, adapters, and errors that name the culprit.
mod common;

use std::path::Path;
use std::process::Command;

use common::{clip, images, s, tiny_model_dir};

use burn::backend::Flex;
use burn::module::Module;
use burn::prelude::*;
use clip_cls::preprocess::{ImageProcessor, load_rgb};
use clip_cls::tokenizer::{CONTEXT_LENGTH, ClipTokenizer};
use serial_lora::io::{self, read_safetensors};
use serial_lora::{AdaptedModel, AdapterConfig, Method};

type B = Flex;

fn library_embeds(model_dir: &Path, adapter: Option<&Path>, texts: &[&str]) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let dev = Default::default();
    let (mut model, cfg) = clip_cls::load_clip::<B>(model_dir, &dev).unwrap();
    if let Some(a) = adapter {
        model = io::load_adapter(model, a, &dev).unwrap().0;
    }
    let proc = ImageProcessor::from_dir(model_dir, &cfg.vision_config).unwrap();
    let imgs: Vec<_> = images().iter().map(|p| load_rgb(p).unwrap()).collect();
    let tok = ClipTokenizer::from_dir(model_dir).unwrap();
    let ids: Vec<i64> = texts.iter().flat_map(|t| tok.tokenize(t, CONTEXT_LENGTH)).map(i64::from).collect();
    let ids = Tensor::from_data(TensorData::new(ids, [texts.len(), CONTEXT_LENGTH]), &dev);
    (model.get_image_features(proc.batch(&imgs, &dev)), model.get_text_features(ids))
}

fn max_diff(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn embed_writes_both_keys_equal_to_the_library() {
    let model = tiny_model_dir();
    let out = model.path().join("out.safetensors");
    let imgs = images();
    let mut args = vec!["embed", "--model", s(model.path()), "--images"];
    args.extend(imgs.iter().map(|p| s(p)));
    args.extend(["--texts", "a photo of a dog.", "a cat", "--output", s(&out)]);
    let (ok, _, err) = clip(&args);
    assert!(ok, "{err}");
    let (t, _) = read_safetensors(&out).unwrap();
    assert_eq!(t["image_embeds"].shape, vec![4, 16]);
    assert_eq!(t["text_embeds"].shape, vec![2, 16]);
    let (img, txt) = library_embeds(model.path(), None, &["a photo of a dog.", "a cat"]);
    assert_eq!(max_diff(t["image_embeds"].to_tensor(&Default::default()), img), 0.0);
    assert_eq!(max_diff(t["text_embeds"].to_tensor(&Default::default()), txt), 0.0);
}

#[test]
fn adapters_change_the_embeddings_as_in_the_library() {
    let model = tiny_model_dir();
    let dev = Default::default();
    for method in [Method::Lora, Method::SerialLora] {
        let (base, _) = clip_cls::load_clip::<B>(model.path(), &dev).unwrap();
        let cfg = AdapterConfig::new(method, 2);
        let adapted = base.with_adapters(&cfg, 0, &dev).unwrap().map(&mut Bump::default());
        let adapter = model.path().join(format!("adapter-{}", cfg.method_name()));
        io::save_adapter(&adapted, &cfg, &adapter, None).unwrap();
        let out = model.path().join("out.safetensors");
        let imgs = images();
        let (ok, _, err) =
            clip(&["embed", "--model", s(model.path()), "--adapter", s(&adapter), "--images", s(&imgs[0]), "--texts", "a cat", "--output", s(&out)]);
        assert!(ok, "{err}");
        let (t, _) = read_safetensors(&out).unwrap();
        let (img, txt) = library_embeds(model.path(), Some(&adapter), &["a cat"]);
        let (base_img, _) = library_embeds(model.path(), None, &["a cat"]);
        let got_img: Tensor<B, 2> = t["image_embeds"].to_tensor(&dev);
        // the binary merges the adapter; the library here runs it unmerged: f32 rounding only
        assert!(max_diff(got_img.clone(), img.narrow(0, 0, 1)) < 1e-5);
        assert!(max_diff(t["text_embeds"].to_tensor(&dev), txt) < 1e-5);
        assert!(max_diff(got_img, base_img.narrow(0, 0, 1)) > 1e-3, "{method:?} adapter had no effect");
    }
}

/// Non-zero B so that an adapter changes the output (seeded by the parameter's path).
#[derive(Default)]
struct Bump(Vec<String>);
impl burn::module::ModuleMapper<B> for Bump {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.0.push(name.into());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.0.pop();
    }
    fn map_float<const D: usize>(&mut self, p: burn::module::Param<Tensor<B, D>>) -> burn::module::Param<Tensor<B, D>> {
        if self.0.last().is_some_and(|n| n == "lora_b") {
            let t = p.val();
            let mut rng = serial_lora::rng::rng(serial_lora::rng::named(&self.0.join(".")));
            let r = serial_lora::rng::normal(t.dims(), 0.3, &mut rng, &t.device());
            burn::module::Param::initialized(p.id, r)
        } else {
            p
        }
    }
}

/// `spectra` writes the library's `qkv_spectra` of the base and of the adapted model.
#[test]
fn spectra_equal_the_library() {
    let model = tiny_model_dir();
    let dev = Default::default();
    let (base, _) = clip_cls::load_clip::<B>(model.path(), &dev).unwrap();
    let cfg = AdapterConfig::new(Method::SerialLora, 2);
    let adapted = base.clone().with_adapters(&cfg, 0, &dev).unwrap().map(&mut Bump::default());
    let adapter = model.path().join("adapter");
    io::save_adapter(&adapted, &cfg, &adapter, None).unwrap();
    let out = model.path().join("spectra.json");
    let (ok, _, err) = clip(&["spectra", "--model", s(model.path()), "--adapter", s(&adapter), "--output", s(&out)]);
    assert!(ok, "{err}");
    let got: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    // f64 SVDs of the same f32 weights: equal up to the last bits of their rounding
    let same = |got: &serde_json::Value, m: &clip_cls::ClipModel<B>| {
        let want = serial_lora::analysis::qkv_spectra(m);
        assert_eq!(got.as_array().unwrap().len(), want.len());
        for (g, w) in got.as_array().unwrap().iter().zip(&want) {
            assert_eq!((g["block"].as_str().unwrap(), g["projection"].as_str().unwrap()), (w.block.as_str(), w.projection));
            let sv: Vec<f64> = serde_json::from_value(g["singular_values"].clone()).unwrap();
            assert_eq!(sv.len(), w.singular_values.len());
            assert!(sv.iter().zip(&w.singular_values).all(|(a, b)| (a - b).abs() <= 1e-12 * b.abs().max(1.0)), "{} {}", w.block, w.projection);
        }
    };
    same(&got["base"], &base);
    same(&got["adapted"], &adapted);
    assert_ne!(got["base"], got["adapted"]);
    // 2 towers × 2 blocks × q, k, v
    assert_eq!(got["base"].as_array().unwrap().len(), 12);
    let (ok, _, err) = clip(&["spectra", "--model", s(model.path()), "--output", "/nonexistent/dir/s.json"]);
    assert!(!ok && err.contains("/nonexistent/dir"), "{err}");
}

#[test]
fn zero_shot_prints_one_json_object_per_image() {
    let model = tiny_model_dir();
    let imgs = images();
    let (ok, out, err) = clip(&["zero-shot", "--model", s(model.path()), "--classes", "dog,cat,car", s(&imgs[0]), s(&imgs[2])]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        let probs = l["probs"].as_object().unwrap();
        assert_eq!(probs.len(), 3);
        let sum: f64 = probs.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-5);
        let pred = l["prediction"].as_str().unwrap();
        let best = probs.iter().max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap())).unwrap().0;
        assert_eq!(pred, best);
        assert!(l["path"].as_str().unwrap().ends_with(".png"));
    }
}

#[test]
fn hub_ids_resolve_through_the_hf_cache() {
    let model = tiny_model_dir();
    let home = tempfile::tempdir().unwrap();
    let run = |id: &str| {
        Command::new(env!("CARGO_BIN_EXE_clip-cls"))
            .args(["zero-shot", "--model", id, "--classes", "a,b", s(&images()[0])])
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    // offline with an empty cache: a clear error naming the id
    let out = run("openai/clip-vit-base-patch16");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("openai/clip-vit-base-patch16") && err.contains("HF_HUB_OFFLINE"), "{err}");
    // the same model placed in the cache layout (refs/main → snapshots/<commit>) runs by id
    let repo = home.path().join("hub/models--org--tiny-clip");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "model.safetensors", "vocab.json", "merges.txt"] {
        std::fs::copy(model.path().join(f), snap.join(f)).unwrap();
    }
    let out = run("org/tiny-clip");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

#[test]
fn bad_input_is_named_without_a_panic() {
    let model = tiny_model_dir();
    let m = s(model.path());
    let img = images()[0].clone();
    let junk = model.path().join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    let empty = model.path().join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    let out = model.path().join("o.safetensors");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["embed", "--model", "/no/such/model", "--texts", "a", "--output", s(&out)], "/no/such/model"),
        (vec!["embed", "--model", m, "--device", "gpu", "--texts", "a", "--output", s(&out)], "gpu"),
        (vec!["embed", "--model", m, "--device", "tch-cpu", "--texts", "a", "--output", s(&out)], "--features tch"),
        (vec!["embed", "--model", m, "--images", s(&junk), "--output", s(&out)], "junk.png"),
        (vec!["embed", "--model", m, "--images", s(&empty), "--output", s(&out)], "empty.jpg"),
        (vec!["embed", "--model", m, "--images", "/no/such.png", "--output", s(&out)], "/no/such.png"),
        (vec!["embed", "--model", m, "--texts", "a", "--output", "/no/such/dir/o.safetensors"], "/no/such/dir"),
        (vec!["embed", "--model", m, "--adapter", "/no/adapter", "--texts", "a", "--output", s(&out)], "adapter_config.json"),
        (vec!["embed", "--model", m, "--output", s(&out)], "nothing to embed"),
        (vec!["zero-shot", "--model", m, "--classes", "a,b", "--template", "no slot", s(&img)], "--template"),
    ];
    for (args, culprit) in cases {
        let (ok, _, err) = clip(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(culprit), "{args:?}: error does not name {culprit:?}:\n{err}");
        assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    }
}

/// `--dtype bf16` holds the model in bf16: the embeddings are the library's in bf16 exactly and
/// within bf16 rounding of f32's; `--dtype auto` on this f32 checkpoint is f32.
#[test]
fn dtype_holds_the_model_in_that_precision() {
    let model = tiny_model_dir();
    let imgs = images();
    let embed = |dtype: &str| {
        let out = model.path().join(format!("out-{dtype}.safetensors"));
        let (ok, _, err) = clip(&["embed", "--model", s(model.path()), "--images", s(&imgs[0]), "--texts", "a cat", "--dtype", dtype, "--output", s(&out)]);
        assert!(ok, "{err}");
        read_safetensors(&out).unwrap().0["image_embeds"].data.clone()
    };
    let (bf16, f32, auto) = (embed("bf16"), embed("f32"), embed("auto"));
    assert_eq!(f32, auto);
    let (m, cfg) =
        lora_runtime::weights::with_base_dtype(serial_lora::BaseDType::Bf16, || clip_cls::load_clip::<B>(model.path(), &Default::default())).unwrap();
    let proc = ImageProcessor::from_dir(model.path(), &cfg.vision_config).unwrap();
    let lib = m.get_image_features(proc.batch(&[load_rgb(&imgs[0]).unwrap()], &Default::default()));
    assert_eq!(lib.into_data().to_vec::<f32>().unwrap(), bf16);
    let e = bf16.iter().zip(&f32).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / f32.iter().fold(0f32, |m, b| m.max(b.abs()));
    assert!(e > 0.0 && e < 3e-2, "bf16 vs f32: {e}");
    let (ok, _, err) = clip(&["embed", "--model", s(model.path()), "--texts", "a", "--dtype", "f8", "--output", s(&model.path().join("o.safetensors"))]);
    assert!(!ok && err.contains("f8"), "{err}");
}
