//! Training that loses nothing, on the tiny CLIP: `clip-cls train` SIGKILLed at seeded random
//! steps and restarted with `--resume` ends bit-identical to an uninterrupted run; a crash
//! between the checkpoint's renames keeps the previous checkpoint; a non-finite loss stops the
//! run naming the step, with the last good checkpoint kept and no non-finite adapter written.
mod common;
#[path = "../../../tests/common/crash.rs"]
mod crash;

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use clip_cls::load_clip;
use clip_cls::train::{RunOptions, Towers, TrainConfig, train};
use common::{colour_dataset, s, tiny_model_dir};
use serial_lora::{Projection, io};

const BIN: &str = env!("CARGO_BIN_EXE_clip-cls");

fn args(model: &Path, data: &Path, extra: &[&str]) -> Vec<String> {
    let base = [
        "train",
        "--model",
        s(model),
        "--dataset",
        s(data),
        "--shots",
        "2",
        "--seed",
        "5",
        "--method",
        "serial-lora-plus",
        "--rank",
        "2",
        "--alpha",
        "4",
        "--dropout",
        "0.25",
        "--lr-ratio",
        "4",
        "--batch",
        "2",
        "--save-steps",
        "1",
        "--logging-steps",
        "1",
    ];
    base.iter().chain(extra).map(|a| a.to_string()).collect()
}

#[test]
fn sigkill_at_random_steps_then_resume_is_bit_identical() {
    let model = tiny_model_dir();
    let data = tempfile::tempdir().unwrap();
    colour_dataset(data.path(), 3, 0);
    let total = 12;
    let kills = crash::kill_steps(0x5EED_C11F, 2, 2, total - 2);
    crash::crash_and_resume(BIN, &args(model.path(), data.path(), &["--iters", "12", "--lr", "1e-2"]), &kills, total);
}

#[test]
fn a_non_finite_loss_stops_training_keeping_the_last_checkpoint() {
    let model = tiny_model_dir();
    let data = tempfile::tempdir().unwrap();
    colour_dataset(data.path(), 3, 0);
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // lr 1e30: the first update is finite but enormous, the next forward pass overflows
    let a = crash::with_out(&args(model.path(), data.path(), &["--iters", "6", "--lr", "1e30", "--eta-min", "0"]), &run);
    let r = crash::run(BIN, &a, None);
    assert!(!r.status.success() && r.status.code().is_some(), "{:?}\n{}", r.status, r.stderr);
    let at = r.stderr.split("training stopped at step ").nth(1).and_then(|t| t.split(':').next()).and_then(|n| n.parse::<usize>().ok());
    let at = at.unwrap_or_else(|| panic!("the error does not name the step:\n{}", r.stderr));
    assert!(r.stderr.contains("not finite") && !r.stderr.contains("panicked"), "{}", r.stderr);
    println!("stopped at step {at}: {}", r.stderr.lines().last().unwrap_or(""));
    assert!(at >= 2, "step 1 starts from the pretrained weights and a zero B: its loss is finite");
    assert!(!run.join("adapter_model.safetensors").exists(), "a final adapter was written");
    // the checkpoint of the step before loads, and every weight in it is finite
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/state.json")).unwrap()).unwrap();
    assert_eq!(state["step"].as_u64(), Some(at as u64 - 1));
    let (weights, _) = io::read_safetensors(&run.join("checkpoint/adapter_model.safetensors")).unwrap();
    assert!(weights.values().all(|t| t.data.iter().all(|v| v.is_finite())));
    let dev = Default::default();
    let (base, _) = load_clip::<Flex>(model.path(), &dev).unwrap();
    io::load_adapter(base, run.join("checkpoint"), &dev).expect("the last checkpoint loads");
}

/// The window a kill can hit inside `save_checkpoint`: after `checkpoint/` was renamed to
/// `checkpoint.old/` and before the new one (possibly half-written) took its place.
#[test]
fn a_crash_between_the_checkpoint_renames_keeps_the_previous_checkpoint() {
    type AB = Autodiff<Flex>;
    let model = tiny_model_dir();
    let data = tempfile::tempdir().unwrap();
    colour_dataset(data.path(), 3, 0);
    let cfg = TrainConfig {
        model: s(model.path()).into(),
        gradient_checkpointing: false,
        dtype: Default::default(),
        dataset: data.path().to_path_buf(),
        split: "train".into(),
        shots: Some(2),
        seed: 9,
        method: "lora-plus".into(),
        rank: 2,
        alpha: 4.0,
        dropout: 0.25,
        lr: 1e-2,
        lr_ratio: 4.0,
        eta_min: 1e-6,
        weight_decay: 1e-2,
        epochs: None,
        iters: Some(5),
        batch: 2,
        encoder: Towers::Both,
        params: Projection::ALL.to_vec(),
        template: None,
        logit_scale: 100.0,
        skip_bad_images: false,
        save_steps: Some(1),
        eval_steps: None,
    };
    let dev = Default::default();
    let tmp = tempfile::tempdir().unwrap();
    let (full, parts) = (tmp.path().join("full"), tmp.path().join("parts"));
    let a = train::<AB>(&cfg, model.path(), &full, &RunOptions::default(), &dev, &mut |_| {}).unwrap();
    let stop = RunOptions { resume: true, stop_after: Some(3), ..Default::default() };
    train::<AB>(&cfg, model.path(), &parts, &stop, &dev, &mut |_| {}).unwrap();
    // the state a SIGKILL between the renames leaves: no checkpoint/, the previous one as
    // checkpoint.old/, the next one half-written in checkpoint.tmp/
    std::fs::rename(parts.join("checkpoint"), parts.join("checkpoint.old")).unwrap();
    std::fs::create_dir(parts.join("checkpoint.tmp")).unwrap();
    std::fs::write(parts.join("checkpoint.tmp/adapter_model.safetensors"), b"half").unwrap();
    let b = train::<AB>(&cfg, model.path(), &parts, &RunOptions { resume: true, ..Default::default() }, &dev, &mut |_| {}).unwrap();
    assert_eq!(b.run.resumed_from_step, Some(3), "the previous checkpoint was used");
    assert_eq!(a.run.loss, b.run.loss);
    let read = |d: &Path| io::read_safetensors(&d.join("adapter_model.safetensors")).unwrap().0;
    let (x, y) = (read(&full), read(&parts));
    for (k, t) in &x {
        assert!(t.data.iter().zip(&y[k].data).all(|(p, q)| p.to_bits() == q.to_bits()), "{k} differs");
    }
    assert!(!parts.join("checkpoint.old").exists() && !parts.join("checkpoint.tmp").exists());
}
