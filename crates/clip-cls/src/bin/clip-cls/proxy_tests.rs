//! Unit tests of the `proxy` transfer experiment on scikit-learn's digits (the module of the
//! `clip-cls` binary): the data file, pretraining, adaptation with each method, parameter
//! accounting and errors. The `proxy` subcommand itself: `tests/proxy.rs`.
//!
//! One backbone is pretrained per test process (shared through a `OnceLock`).
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module};

use crate::proxy::{Digits, PRETRAIN_CLASSES, ProxyConfig, TRANSFER_CLASSES, accuracy, adapt, few_shot, load_or_pretrain, split};

type AB = Autodiff<Flex>;

/// Held-out accuracy on digits 0–4 the default pretraining (10 epochs) must beat. Measured:
/// 0.989 (178 of 180).
const MIN_PRETRAIN_ACCURACY: f64 = 0.8;
/// Chance on 5 classes is 0.2; every method at 16 shots must clearly beat it. Measured with
/// [`TEST_ITERS`] steps: 0.81 (serial-lora) to 0.93 (lora-plus).
const MIN_TRANSFER_ACCURACY: f64 = 0.4;
/// Adaptation steps in the per-method test.
const TEST_ITERS: usize = 40;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/digits/digits.csv.gz")
}

fn digits() -> &'static Digits {
    static D: OnceLock<Digits> = OnceLock::new();
    D.get_or_init(|| Digits::load(&data()).unwrap())
}

/// The backbone cache of this process and its held-out accuracy on 0–4 (pretrained once).
fn backbone() -> &'static (PathBuf, f64, tempfile::TempDir) {
    static B: OnceLock<(PathBuf, f64, tempfile::TempDir)> = OnceLock::new();
    B.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backbone.safetensors");
        let cfg = ProxyConfig::new(data(), &path, "lora");
        let dev = Default::default();
        let (model, info) = load_or_pretrain::<AB>(digits(), &cfg.recipe(), &path, &dev, &mut |_, _| {}).unwrap();
        assert!(info.pretrained_now && path.is_file());
        let acc = accuracy(&model.valid(), digits(), &split(digits(), PRETRAIN_CLASSES).test, 0, &dev);
        eprintln!("pretraining: held-out accuracy on 0–4 {acc:.4} in {:.1} s", info.pretrain_seconds.unwrap());
        (path, acc, dir)
    })
}

#[test]
fn the_csv_has_sklearn_counts() {
    let d = digits();
    assert_eq!(d.len(), 1797);
    assert_eq!(d.class_counts(), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]);
    assert!(d.images.iter().flatten().all(|&v| (0.0..=16.0).contains(&v)));
    // sklearn's first image: a zero
    assert_eq!(d.labels[0], 0);
    assert_eq!(&d.images[0][..8], &[0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0]);
}

#[test]
fn the_split_is_fixed_disjoint_and_eighty_twenty() {
    let d = digits();
    let s = split(d, 0..10);
    assert_eq!(s.train.len() + s.test.len(), 1797);
    assert!(s.test.iter().all(|i| s.train.binary_search(i).is_err()));
    assert_eq!(s.test.len(), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180].iter().map(|n| (n + 2) / 5).sum::<usize>());
    assert_eq!(split(d, TRANSFER_CLASSES), split(d, TRANSFER_CLASSES));
    let a = few_shot(d, &s.train, TRANSFER_CLASSES, 4, 1).unwrap();
    assert_eq!(a.len(), 20);
    assert_eq!(a, few_shot(d, &s.train, TRANSFER_CLASSES, 4, 1).unwrap());
    assert_ne!(a, few_shot(d, &s.train, TRANSFER_CLASSES, 4, 2).unwrap());
    let err = few_shot(d, &s.train, TRANSFER_CLASSES, 1000, 1).unwrap_err().to_string();
    assert!(err.contains("shots") && err.contains("training images"), "{err}");
}

#[test]
fn pretraining_beats_chance_clearly() {
    let (_, acc, _) = backbone();
    assert!(*acc > MIN_PRETRAIN_ACCURACY, "held-out accuracy on 0–4: {acc}");
}

#[test]
fn every_method_transfers_and_serial_has_a_quarter_of_the_adapter() {
    let (path, _, _) = backbone();
    let dev = Default::default();
    let d = digits();
    let transfer = split(d, TRANSFER_CLASSES);
    let mut adapter_params = Vec::new();
    for method in ["lora", "serial-lora", "lora-plus", "serial-lora-plus"] {
        // fewer steps than the CLI default (100) to keep the test short
        let cfg = ProxyConfig { iters: TEST_ITERS, ..ProxyConfig::new(data(), path, method) };
        let shots = few_shot(d, &transfer.train, TRANSFER_CLASSES, 16, cfg.seed).unwrap();
        let (pretrained, info) = load_or_pretrain::<AB>(d, &cfg.recipe(), path, &dev, &mut |_, _| {}).unwrap();
        assert!(!info.pretrained_now);
        let a = adapt(pretrained, d, &shots, &cfg, &dev).unwrap();
        let acc = accuracy(&a.model.valid(), d, &transfer.test, TRANSFER_CLASSES.start, &dev);
        eprintln!("{method}: accuracy {acc:.4}, {} adapter + {} head params", a.adapter_params, a.head_params);
        assert!(acc > MIN_TRANSFER_ACCURACY, "{method}: accuracy {acc}");
        assert!(a.loss.last().unwrap() < a.loss.first().unwrap(), "{method}: loss {:?}", a.loss);
        assert_eq!(a.head_params, 64 * 5 + 5);
        adapter_params.push(a.adapter_params);
    }
    // rank 8, 4 blocks of width 64: LoRA 4 · 8 · 2 · 64 per block, Serial a quarter of it
    assert_eq!(adapter_params, vec![4 * 4 * 8 * 128, 4 * 8 * 128, 4 * 4 * 8 * 128, 4 * 8 * 128]);
    assert_eq!(adapter_params[0], 4 * adapter_params[1]);
}

#[test]
fn a_missing_or_bad_data_file_is_named() {
    let err = Digits::load(Path::new("/nonexistent/digits.csv.gz")).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/digits.csv.gz"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    let mut rows = vec![["0"; 65].join(","); 2];
    rows.push(["1"; 64].join(","));
    std::fs::write(&bad, rows.join("\n")).unwrap();
    let err = Digits::load(&bad).unwrap_err().to_string();
    assert!(err.contains("bad.csv") && err.contains("row 3") && err.contains("64 values"), "{err}");
    let mut row = vec!["0"; 65];
    row[64] = "12";
    std::fs::write(&bad, row.join(",")).unwrap();
    let err = Digits::load(&bad).unwrap_err().to_string();
    assert!(err.contains("row 1") && err.contains("label `12`"), "{err}");
    std::fs::write(&bad, [0x1f, 0x8b, 1, 2, 3]).unwrap();
    let err = Digits::load(&bad).unwrap_err().to_string();
    assert!(err.contains("bad.csv") && err.contains("gzip"), "{err}");
}

#[test]
fn the_baselines_train_the_head_alone_or_everything() {
    let (path, _, _) = backbone();
    let dev = Default::default();
    let d = digits();
    let transfer = split(d, TRANSFER_CLASSES);
    for method in ["head-only", "full"] {
        // any rank is accepted (and unused) by a baseline
        let cfg = ProxyConfig { iters: TEST_ITERS, rank: 0, ..ProxyConfig::new(data(), path, method) };
        assert!(cfg.is_baseline() && cfg.adapter_config().unwrap().is_none());
        let shots = few_shot(d, &transfer.train, TRANSFER_CLASSES, 16, cfg.seed).unwrap();
        let (pretrained, _) = load_or_pretrain::<AB>(d, &cfg.recipe(), path, &dev, &mut |_, _| {}).unwrap();
        let before = pretrained.vision_model.clone().valid();
        let backbone_params = pretrained.vision_model.num_params();
        let a = adapt(pretrained, d, &shots, &cfg, &dev).unwrap();
        let acc = accuracy(&a.model.valid(), d, &transfer.test, TRANSFER_CLASSES.start, &dev);
        eprintln!("{method}: accuracy {acc:.4}, {} backbone + {} head params", a.adapter_params, a.head_params);
        assert!(acc > MIN_TRANSFER_ACCURACY, "{method}: accuracy {acc}");
        assert_eq!(a.head_params, 64 * 5 + 5);
        // the patch embedding, the first backbone weight, moves only in full fine-tuning
        let after = a.model.valid();
        let unchanged = after.vision_model.embeddings.patch_embedding.weight.val().into_data() == before.embeddings.patch_embedding.weight.val().into_data();
        if method == "head-only" {
            assert_eq!(a.adapter_params, 0);
            assert!(unchanged, "head-only changed the backbone");
        } else {
            assert_eq!(a.adapter_params, backbone_params);
            assert!(!unchanged, "full fine-tuning left the backbone unchanged");
        }
    }
}

#[test]
fn an_unknown_method_lists_the_baselines() {
    let err = ProxyConfig::new(data(), "unused.safetensors", "dora").check().unwrap_err().to_string();
    assert!(err.contains("dora") && err.contains("head-only") && err.contains("full"), "{err}");
}
