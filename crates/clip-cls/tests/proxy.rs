//! The `proxy` subcommand of `clip-cls` (the transfer experiment on scikit-learn's digits):
//! metrics, outputs and refused flags, through the binary. The experiment's data, pretraining
//! and adaptation are unit-tested in its module (`src/bin/clip-cls/proxy_tests.rs`).
//!
//! One backbone is pretrained per test process through the CLI (shared through a `OnceLock`);
//! the CLI test reads it from the cache file.
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/digits/digits.csv.gz")
}

/// The backbone cache of this process and its held-out accuracy on 0–4 (pretrained once, by a
/// first `proxy` run that finds no cache).
fn backbone() -> &'static (PathBuf, f64, tempfile::TempDir) {
    static B: OnceLock<(PathBuf, f64, tempfile::TempDir)> = OnceLock::new();
    B.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backbone.safetensors");
        let out = dir.path().join("pretrain-run");
        let data = data();
        let args = ["proxy", "--data", data.to_str().unwrap(), "--backbone", path.to_str().unwrap(), "--method", "lora", "--iters", "1"];
        let (ok, stdout, stderr) = clip(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
        assert!(ok, "{stderr}");
        let m: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert!(m["backbone"]["pretrained_now"] == true && path.is_file(), "{m}");
        let acc = m["pretrain_accuracy"].as_f64().unwrap();
        eprintln!("pretraining: held-out accuracy on 0–4 {acc:.4}");
        (path, acc, dir)
    })
}

fn clip(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_clip-cls")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn cli_writes_metrics_and_the_adapter() {
    let (backbone, pretrain_acc, _) = backbone();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let data = data();
    let args = [
        "proxy",
        "--data",
        data.to_str().unwrap(),
        "--backbone",
        backbone.to_str().unwrap(),
        "--method",
        "serial-lora",
        "--rank",
        "4",
        "--shots",
        "4",
        "--seed",
        "3",
        "--iters",
        "20",
        "--out",
        out.to_str().unwrap(),
    ];
    let (ok, stdout, stderr) = clip(&args);
    assert!(ok, "{stderr}");
    let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let printed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let keys = [
        "task",
        "method",
        "rank",
        "shots",
        "seed",
        "accuracy",
        "pretrain_accuracy",
        "adapter_params",
        "head_params",
        "trainable_params",
        "loss",
        "wall_seconds",
        "images_per_second",
    ];
    for k in keys {
        assert!(file.get(k).is_some(), "metrics.json lacks {k}: {file}");
    }
    assert_eq!(file, printed);
    assert_eq!(file["task"], "proxy");
    assert_eq!(file["method"], "serial-lora");
    assert_eq!((file["rank"].as_u64(), file["shots"].as_u64(), file["seed"].as_u64()), (Some(4), Some(4), Some(3)));
    let acc = file["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    // (serde_json's default float parsing may be off by one ulp)
    assert!((file["pretrain_accuracy"].as_f64().unwrap() - pretrain_acc).abs() < 1e-12);
    assert_eq!(file["adapter_params"].as_u64(), Some(4 * 4 * 128));
    assert_eq!(file["head_params"].as_u64(), Some(325));
    assert_eq!(file["trainable_params"].as_u64(), Some(4 * 4 * 128 + 325));
    assert_eq!(file["loss"].as_array().unwrap().len(), 20);
    assert_eq!(file["backbone"]["pretrained_now"], false);
    for f in ["adapter_config.json", "adapter_model.safetensors", "head.safetensors", "spectra.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
}

#[test]
fn cli_refuses_bad_flags_naming_them() {
    let data = data();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("never-written.safetensors");
    let out = dir.path().join("run");
    let base = ["proxy", "--data", data.to_str().unwrap(), "--backbone", cache.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let cases: [(&[&str], &str); 6] = [
        (&["--method", "lora", "--rank", "0"], "rank"),
        (&["--method", "lora", "--shots", "0"], "shots"),
        (&["--method", "lora", "--iters", "0"], "iters"),
        (&["--method", "lora", "--rank", "-2"], "--rank"),
        (&["--method", "lora", "--shots", "500"], "shots"),
        (&["--method", "dora"], "dora"),
    ];
    for (extra, needle) in cases {
        let mut args = base.to_vec();
        args.extend(extra);
        let (ok, _, stderr) = clip(&args);
        assert!(!ok && stderr.contains(needle), "{extra:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{extra:?}: {stderr}");
    }
    let mut args = base.to_vec();
    args.extend(["--method", "lora"]);
    args[2] = "/nonexistent/digits.csv.gz";
    let (ok, _, stderr) = clip(&args);
    assert!(!ok && stderr.contains("/nonexistent/digits.csv.gz"), "{stderr}");
    assert!(!cache.exists(), "no pretraining on bad input");
}
