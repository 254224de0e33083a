//! Training that loses nothing, on the tiny SAM: `sam-seg train` SIGKILLed at seeded random
//! steps and restarted with `--resume` ends bit-identical to an uninterrupted run; a
//! non-finite loss stops the run naming the step, keeping the last good checkpoint and writing
//! no non-finite adapter.
mod common;
#[path = "../../../tests/common/crash.rs"]
mod crash;

use std::path::Path;

use burn::backend::Flex;
use common::{fixtures, squares};
use serial_lora::io;

const BIN: &str = env!("CARGO_BIN_EXE_sam-seg");

fn args(data: &Path, extra: &[&str]) -> Vec<String> {
    let model = fixtures().join("sam-tiny-shapes");
    let base = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--seed",
        "3",
        "--method",
        "serial-lora-plus",
        "--rank",
        "2",
        "--dropout",
        "0.1",
        "--lr-ratio",
        "4",
        "--batch",
        "2",
        "--image-size",
        "32",
        "--save-steps",
        "1",
        "--logging-steps",
        "1",
    ];
    base.iter().chain(extra).map(|a| a.to_string()).collect()
}

#[test]
fn sigkill_at_random_steps_then_resume_is_bit_identical() {
    let data = tempfile::tempdir().unwrap();
    squares(data.path(), 5);
    let total = 10;
    let kills = crash::kill_steps(0x5A3_C8A5, 2, 2, total - 2);
    crash::crash_and_resume(BIN, &args(data.path(), &["--iters", "10", "--lr", "1e-2"]), &kills, total);
}

#[test]
fn a_non_finite_loss_stops_training_keeping_the_last_checkpoint() {
    let data = tempfile::tempdir().unwrap();
    squares(data.path(), 5);
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let a = crash::with_out(&args(data.path(), &["--iters", "6", "--lr", "1e30", "--eta-min", "0"]), &run);
    let r = crash::run(BIN, &a, None);
    assert!(!r.status.success() && r.status.code().is_some(), "{:?}\n{}", r.status, r.stderr);
    let at = r.stderr.split("training stopped at step ").nth(1).and_then(|t| t.split(':').next()).and_then(|n| n.parse::<usize>().ok());
    let at = at.unwrap_or_else(|| panic!("the error does not name the step:\n{}", r.stderr));
    assert!(r.stderr.contains("not finite") && !r.stderr.contains("panicked"), "{}", r.stderr);
    println!("stopped at step {at}: {}", r.stderr.lines().last().unwrap_or(""));
    assert!(at >= 2);
    assert!(!run.join("adapter_model.safetensors").exists(), "a final adapter was written");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/state.json")).unwrap()).unwrap();
    assert_eq!(state["step"].as_u64(), Some(at as u64 - 1));
    let (weights, _) = io::read_safetensors(&run.join("checkpoint/adapter_model.safetensors")).unwrap();
    assert!(weights.values().all(|t| t.data.iter().all(|v| v.is_finite())));
    let dev = Default::default();
    let (base, _) = sam_seg::load_sam::<Flex>(&fixtures().join("sam-tiny-shapes"), &dev).unwrap();
    io::load_adapter(base, run.join("checkpoint"), &dev).expect("the last checkpoint loads");
}
