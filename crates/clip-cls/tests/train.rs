//! Few-shot training end to end on the tiny CLIP and a generated colour dataset: every method
//! learns (loss down, accuracy above chance), parameter counts, bit-identical resume, datasets,
//! and bad input named without a panic.
mod common;

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use clip_cls::data::Dataset;
use clip_cls::preprocess::ImageProcessor;
use clip_cls::tokenizer::ClipTokenizer;
use clip_cls::train::{Metrics, RunOptions, Towers, TrainConfig, evaluate, train};
use clip_cls::{ClipModel, load_clip};
use common::{COLOURS, clip, colour_dataset, s, tiny_model_dir};
use serial_lora::{AdaptedModel, Projection, io};

type AB = Autodiff<Flex>;
type B = Flex;

fn config(model: &Path, dataset: &Path, method: &str) -> TrainConfig {
    TrainConfig {
        model: model.display().to_string(),
        gradient_checkpointing: false,
        dtype: Default::default(),
        dataset: dataset.to_path_buf(),
        split: "train".into(),
        shots: Some(4),
        seed: 7,
        method: method.into(),
        rank: 4,
        alpha: 4.0,
        dropout: 0.0,
        lr: 1e-2,
        lr_ratio: 4.0,
        eta_min: 1e-6,
        weight_decay: 1e-2,
        epochs: None,
        iters: Some(40),
        batch: 6,
        encoder: Towers::Both,
        params: Projection::ALL.to_vec(),
        template: None,
        logit_scale: 100.0,
        skip_bad_images: false,
        save_steps: None,
        eval_steps: None,
    }
}

fn test_accuracy(model_dir: &Path, dataset: &Path, adapter: Option<&Path>) -> f64 {
    let dev = Default::default();
    let (mut model, cfg): (ClipModel<B>, _) = load_clip(model_dir, &dev).unwrap();
    if let Some(a) = adapter {
        model = io::load_adapter(model, a, &dev).unwrap().0.merge_and_unload().unwrap();
    }
    let tok = ClipTokenizer::from_dir(model_dir).unwrap();
    let proc = ImageProcessor::from_dir(model_dir, &cfg.vision_config).unwrap();
    let ds = Dataset::open(dataset).unwrap();
    let r = evaluate(&model, &tok, &proc, &ds, "test", "a photo of a {}.", 8, false, &dev, &mut |_, _| {}).unwrap();
    assert_eq!(r.images, 3 * 6);
    r.top1
}

fn mean(x: &[f32]) -> f32 {
    x.iter().sum::<f32>() / x.len() as f32
}

/// Adapter parameters per attention block of the tiny model (d = 32): LoRA has one (A, B)
/// pair per projection, Serial LoRA one shared pair.
fn expected_trainable(method: &str, rank: usize, blocks: usize) -> usize {
    let d = 32;
    let pairs = if method.starts_with("serial") { 1 } else { 4 };
    blocks * pairs * 2 * d * rank
}

#[test]
fn every_method_learns_the_colour_task() {
    let model = tiny_model_dir();
    let data = tempfile::tempdir().unwrap();
    colour_dataset(data.path(), 5, 6);
    let chance = 1.0 / 3.0;
    let before = test_accuracy(model.path(), data.path(), None);
    for method in ["lora", "serial-lora", "lora-plus", "serial-lora-plus"] {
        let out = tempfile::tempdir().unwrap();
        let cfg = config(model.path(), data.path(), method);
        let m: Metrics = train::<AB>(&cfg, model.path(), out.path(), &RunOptions::default(), &Default::default(), &mut |_| {}).unwrap();
        let after = test_accuracy(model.path(), data.path(), Some(out.path()));
        let (first, last) = (mean(&m.run.loss[..5]), mean(&m.run.loss[m.run.loss.len() - 5..]));
        println!("{method}: trainable {} / {} params, loss {first:.3} → {last:.3}, test top-1 {before:.3} → {after:.3}", m.trainable_params, m.total_params);
        assert_eq!(m.trainable_params, expected_trainable(method, 4, 4), "{method}");
        assert!(m.run.completed && m.run.steps == 40 && m.train_images == 12 && m.num_classes == 3);
        assert!(last < 0.5 * first, "{method}: loss {first} → {last}");
        assert!(after > before && after > chance + 0.3, "{method}: test accuracy {before} → {after} (chance {chance})");
        // the run directory: PEFT-layout adapter, resolved config, metrics, checkpoint
        for f in ["adapter_config.json", "adapter_model.safetensors", "train_config.json", "metrics.json", "checkpoint/state.json"] {
            assert!(out.path().join(f).is_file(), "{method}: {f} missing");
        }
        let cos = (m.run.lr[0] - cfg.lr).abs() < 1e-12 && m.run.lr[39] < m.run.lr[20] && m.run.lr[20] < m.run.lr[1];
        assert!(cos, "{method}: lr schedule {:?}", m.run.lr);
    }
}

#[test]
fn one_tower_only_adapts_that_tower() {
    let model = tiny_model_dir();
    let data = tempfile::tempdir().unwrap();
    colour_dataset(data.path(), 2, 0);
    for (encoder, prefix) in [(Towers::Vision, "vision_model."), (Towers::Text, "text_model.")] {
        let out = tempfile::tempdir().unwrap();
        let cfg = TrainConfig { encoder, iters: Some(2), ..config(model.path(), data.path(), "serial-lora") };
        let m = train::<AB>(&cfg, model.path(), out.path(), &RunOptions::default(), &Default::default(), &mut |_| {}).unwrap();
        assert_eq!(m.trainable_params, expected_trainable("serial-lora", 4, 2));
        let dev = Default::default();
        let (base, _): (ClipModel<B>, _) = load_clip(model.path(), &dev).unwrap();
        let (adapted, _) = io::load_adapter(base, out.path(), &dev).unwrap();
        for site in adapted.attention_sites() {
            assert_eq!(site.attention.has_adapter(), site.path.starts_with(prefix), "{encoder:?}: {}", site.path);
        }
    }
}

#[test]
fn a_resumed_run_ends_bit_identical_to_an_uninterrupted_one() {
    let model = tiny_model_dir();
    let data = tempfile::tempdir().unwrap();
    colour_dataset(data.path(), 5, 0);
    // dropout on, LoRA+ (two optimizer groups), checkpoints every 2 steps
    let cfg = TrainConfig { iters: Some(7), dropout: 0.25, save_steps: Some(2), ..config(model.path(), data.path(), "serial-lora-plus") };
    let dev = Default::default();
    let full = tempfile::tempdir().unwrap();
    let a = train::<AB>(&cfg, model.path(), full.path(), &RunOptions::default(), &dev, &mut |_| {}).unwrap();

    let parts = tempfile::tempdir().unwrap();
    // (and with no image cache: pixels decoded again for every batch)
    let stop = |n| RunOptions { resume: true, stop_after: Some(n), cache_bytes: Some(0), ..Default::default() };
    let first = train::<AB>(&cfg, model.path(), parts.path(), &stop(3), &dev, &mut |_| {}).unwrap();
    assert!(!first.run.completed && first.run.steps == 3);
    assert!(!parts.path().join("adapter_model.safetensors").exists(), "no final adapter before the end");
    train::<AB>(&cfg, model.path(), parts.path(), &stop(5), &dev, &mut |_| {}).unwrap();
    let b = train::<AB>(&cfg, model.path(), parts.path(), &RunOptions { stop_after: None, ..stop(0) }, &dev, &mut |_| {}).unwrap();
    assert_eq!(b.run.resumed_from_step, Some(5));
    assert_eq!(a.run.loss, b.run.loss, "per-step losses");
    // (file bytes can differ: safetensors writes its metadata map in hash order)
    let read = |d: &Path| io::read_safetensors(&d.join("adapter_model.safetensors")).unwrap().0;
    let (x, y) = (read(full.path()), read(parts.path()));
    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
    for (k, t) in &x {
        let bits = |t: &io::HostTensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(bits(t) == bits(&y[k]), "{k} differs");
    }

    // A different setting is refused on resume, and a finished run is not overwritten.
    let other = TrainConfig { lr: 1e-3, ..cfg.clone() };
    let err = train::<AB>(&other, model.path(), parts.path(), &RunOptions { resume: true, ..Default::default() }, &dev, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("lr: saved 0.01, now 0.001"), "{err}");
    let err = train::<AB>(&cfg, model.path(), parts.path(), &RunOptions::default(), &dev, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
}

#[test]
fn coop_splits_and_few_shot_sampling() {
    let data = tempfile::tempdir().unwrap();
    colour_dataset(data.path(), 3, 1);
    // CoOp layout: images/ + split_zhou_<Name>.json with [relative path, label, classname]
    let images = data.path().join("images");
    std::fs::rename(data.path().join("train"), &images).unwrap();
    let entries = |n: usize| -> Vec<serde_json::Value> {
        COLOURS.iter().enumerate().flat_map(|(l, (c, _))| (0..n).map(move |i| serde_json::json!([format!("{c}/{i:02}.png"), l, c]))).collect()
    };
    let split = serde_json::json!({"train": entries(3), "val": entries(1), "test": entries(2)});
    std::fs::write(data.path().join("split_zhou_EuroSAT.json"), split.to_string()).unwrap();
    let ds = Dataset::open(data.path()).unwrap();
    assert_eq!(ds.classnames, ["bright red", "grass green", "sky blue"]);
    assert_eq!(ds.default_template(), "a centered satellite photo of {}."); // CoOp's, by name
    assert_eq!(Dataset::open(&data.path().join("images")).unwrap().default_template(), "a photo of a {}.");
    assert_eq!(ds.split("test").unwrap().len(), 6);
    assert!(ds.split("test").unwrap()[0].path.is_file());

    // K ≤ class size: distinct items; K > class size: repetition; a seed fixes the draw.
    let two = ds.few_shot("train", Some(2), 1).unwrap();
    assert_eq!(two.len(), 6);
    for l in 0..3 {
        let c: Vec<_> = two.iter().filter(|i| i.label == l).collect();
        assert!(c.len() == 2 && c[0].path != c[1].path);
    }
    let five = ds.few_shot("train", Some(5), 1).unwrap();
    assert_eq!(five.iter().filter(|i| i.label == 2).count(), 5);
    assert_eq!(ds.few_shot("train", Some(2), 1).unwrap(), two);
    let draws: Vec<_> = (0..8).map(|seed| ds.few_shot("train", Some(2), seed).unwrap()).collect();
    assert!(draws.iter().any(|d| d != &two), "the seed changes the draw");

    let err = ds.split("holdout").unwrap_err().to_string();
    assert!(err.contains("no `holdout` split") && err.contains("test, train, val"), "{err}");
}

#[test]
fn bad_training_input_is_named() {
    let model = tiny_model_dir();
    let data = tempfile::tempdir().unwrap();
    colour_dataset(data.path(), 3, 0);
    let bad = data.path().join("train/sky_blue/01.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let dev = Default::default();
    let cfg = TrainConfig { iters: Some(2), shots: Some(3), ..config(model.path(), data.path(), "lora") };
    let out = tempfile::tempdir().unwrap();
    let err = train::<AB>(&cfg, model.path(), out.path(), &RunOptions::default(), &dev, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("sky_blue/01.png") && err.contains("cannot decode"), "{err}");
    let skip = TrainConfig { skip_bad_images: true, ..cfg.clone() };
    let m = train::<AB>(&skip, model.path(), out.path(), &RunOptions::default(), &dev, &mut |_| {}).unwrap();
    assert_eq!((m.skipped_images, m.train_images), (vec![bad], 8));

    for (key, cfg) in [
        ("method", TrainConfig { method: "dora".into(), ..cfg.clone() }),
        ("batch", TrainConfig { batch: 0, ..cfg.clone() }),
        ("template", TrainConfig { template: Some("a photo".into()), ..cfg.clone() }),
    ] {
        let out = tempfile::tempdir().unwrap();
        let err = train::<AB>(&cfg, model.path(), out.path(), &RunOptions::default(), &dev, &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains(key), "{key}: {err}");
    }

    std::fs::create_dir(data.path().join("train/empty_class")).unwrap();
    let err = Dataset::open(data.path()).unwrap_err().to_string();
    assert!(err.contains("empty_class") && err.contains("no images"), "{err}");
}

#[test]
fn train_and_eval_commands() {
    let model = tiny_model_dir();
    let data = tempfile::tempdir().unwrap();
    colour_dataset(data.path(), 4, 2);
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let args = [
        "train",
        "--model",
        s(model.path()),
        "--dataset",
        s(data.path()),
        "--shots",
        "4",
        "--seed",
        "3",
        "--method",
        "serial-lora",
        "--rank",
        "4",
        "--alpha",
        "4",
        "--lr",
        "1e-2",
        "--iters",
        "20",
        "--batch",
        "6",
        "--out",
        s(&run),
    ];
    let (ok, _, err) = clip(&args);
    assert!(ok, "{err}");
    assert!(err.contains("step 20/20") && err.contains("1024 trainable"), "{err}");
    let metrics: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["trainable_params"], 1024);
    assert_eq!(metrics["loss"].as_array().unwrap().len(), 20);
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("train_config.json")).unwrap()).unwrap();
    assert_eq!((config["dropout"].as_f64(), config["encoder"].as_str()), (Some(0.25), Some("both")));

    let (ok, stdout, err) = clip(&["eval", "--model", s(model.path()), "--adapter", s(&run), "--dataset", s(data.path())]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!((r["split"].as_str(), r["images"].as_u64(), r["num_classes"].as_u64()), (Some("test"), Some(6), Some(3)));
    let top1 = r["top1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&top1));

    let (ok, _, err) = clip(&["eval", "--model", s(model.path()), "--dataset", s(data.path()), "--split", "val"]);
    assert!(!ok && err.contains("no `val` split"), "{err}");
    let (ok, _, err) = clip(&args);
    assert!(!ok && err.contains("already holds a run"), "{err}");
}

/// The lines of a run's metrics.jsonl.
fn jsonl(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn metrics_jsonl_and_eval_steps_keep_the_best_adapter() {
    let model = tiny_model_dir();
    let data = tempfile::tempdir().unwrap();
    colour_dataset(data.path(), 5, 0);
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let args = [
        "train",
        "--model",
        s(model.path()),
        "--dataset",
        s(data.path()),
        "--shots",
        "4",
        "--method",
        "lora-plus",
        "--rank",
        "2",
        "--iters",
        "6",
        "--batch",
        "6",
        "--lr",
        "1e-2",
        "--logging-steps",
        "2",
        "--eval-steps",
        "4",
        "--out",
        s(&run),
    ];
    let (ok, _, err) = clip(&args);
    assert!(ok, "{err}");
    let lines = jsonl(&run);
    let train: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(train.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 4, 6]);
    for l in &train {
        // LoRA+: both learning rates (ratio 20 by default)
        assert!((l["lr_b"].as_f64().unwrap() - 20.0 * l["lr"].as_f64().unwrap()).abs() < 1e-12, "{l}");
        for k in ["epoch", "loss_avg", "acc", "images_per_second", "elapsed_s"] {
            assert!(l.get(k).is_some(), "{k} missing in {l}");
        }
    }
    // evaluations at step 4 and at the end (a seeded tenth of the 15 training images: 2)
    let evals: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("eval_accuracy").is_some()).collect();
    assert_eq!(evals.iter().map(|l| (l["step"].as_u64().unwrap(), l["eval_images"].as_u64().unwrap())).collect::<Vec<_>>(), [(4, 2), (6, 2)]);
    let best: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("best/best.json")).unwrap()).unwrap();
    let top = evals.iter().map(|l| l["eval_accuracy"].as_f64().unwrap()).fold(f64::MIN, f64::max);
    assert_eq!(best["accuracy"].as_f64(), Some(top));
    assert!(run.join("best/adapter_model.safetensors").is_file() && run.join("best/adapter_config.json").is_file());
    // the best adapter loads as any adapter
    let (ok, _, err) = clip(&[
        "zero-shot",
        "--model",
        s(model.path()),
        "--adapter",
        s(&run.join("best")),
        "--classes",
        "red,green,blue",
        s(&data.path().join("train/bright_red/00.png")),
    ]);
    assert!(ok, "{err}");
    // without --eval-steps: no best/, train_config.json unchanged in form
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("train_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["eval_steps"].as_u64(), Some(4));
}

/// `--gradient-checkpointing` recomputes the encoder layers of both towers in the backward pass:
/// the same per-step losses and the same adapter bits as without it.
#[test]
fn gradient_checkpointing_gives_the_same_bits() {
    let model = tiny_model_dir();
    let data = tempfile::tempdir().unwrap();
    colour_dataset(data.path(), 5, 0);
    let dev = Default::default();
    let run = |on: bool| {
        let cfg = TrainConfig { iters: Some(2), dropout: 0.25, gradient_checkpointing: on, ..config(model.path(), data.path(), "serial-lora-plus") };
        let out = tempfile::tempdir().unwrap();
        let m = train::<AB>(&cfg, model.path(), out.path(), &RunOptions::default(), &dev, &mut |_| {}).unwrap();
        let adapter = io::read_safetensors(&out.path().join("adapter_model.safetensors")).unwrap().0;
        (m.run.loss, adapter.into_iter().map(|(k, t)| (k, t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>())).collect::<Vec<_>>())
    };
    assert_eq!(run(false), run(true));
}

/// `--dtype bf16`: training on the base held in bf16 gives losses within bf16 rounding of the
/// f32 base's (not equal: the weights differ), and gradient checkpointing keeps its bits there.
#[test]
fn a_bf16_base_trains_close_to_f32_and_checkpointing_keeps_its_bits() {
    use serial_lora::BaseDType;
    let model = tiny_model_dir();
    let data = tempfile::tempdir().unwrap();
    colour_dataset(data.path(), 5, 0);
    let dev = Default::default();
    let run = |dtype: BaseDType, on: bool| {
        let cfg = TrainConfig { iters: Some(2), dtype, gradient_checkpointing: on, ..config(model.path(), data.path(), "serial-lora") };
        let out = tempfile::tempdir().unwrap();
        let m = train::<AB>(&cfg, model.path(), out.path(), &RunOptions::default(), &dev, &mut |_| {}).unwrap();
        let adapter = io::read_safetensors(&out.path().join("adapter_model.safetensors")).unwrap().0;
        (m.run.loss, adapter.into_iter().map(|(k, t)| (k, t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>())).collect::<Vec<_>>())
    };
    let half = run(BaseDType::Bf16, false);
    assert_eq!(half, run(BaseDType::Bf16, true));
    let full = run(BaseDType::F32, false);
    let e = half.0.iter().zip(&full.0).fold(0f32, |m, (a, b)| m.max((a - b).abs() / b.abs()));
    println!("losses bf16 {:?} vs f32 {:?}: max rel diff {e:.2e}", half.0, full.0);
    assert!(e > 0.0 && e < 3e-2, "{e}");
}
