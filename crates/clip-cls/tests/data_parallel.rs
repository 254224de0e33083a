//! Data-parallel training (`lora_runtime::dist`) through `clip-cls train`, over loopback: two
//! peers with `--batch b` reach the adapter of one peer with `--batch 2b`; a data-parallel run
//! resumes; a checkpoint resumes only on as many peers as wrote it.
mod common;
#[path = "../../../tests/common/data_parallel.rs"]
mod data_parallel;

use common::{clip, colour_dataset, s, tiny_model_dir};
use serial_lora::io::{WEIGHTS_FILE, max_abs_diff};

/// The peers sum the same per-image gradients as the single run, in another order (two partial
/// sums in f32, then their sum), and AdamW's steps carry that rounding on: the adapters agree to
/// f32 rounding of the updates, far below the 1e-2 learning rate.
const SUM_ORDER_TOL: f32 = 1e-5;

#[test]
fn two_peers_reach_the_single_device_adapter_of_the_doubled_batch() {
    let model = tiny_model_dir();
    let data = tempfile::tempdir().unwrap();
    // 3 classes × 3 shots = 9 images in global batches of 4: the last batch of each epoch has
    // one image, so one peer has an empty share
    colour_dataset(data.path(), 3, 1);
    let tmp = tempfile::tempdir().unwrap();
    let base = [
        "train",
        "--model",
        s(model.path()),
        "--dataset",
        s(data.path()),
        "--shots",
        "3",
        "--seed",
        "5",
        "--method",
        "lora",
        "--rank",
        "4",
        "--alpha",
        "4",
        "--lr",
        "1e-2",
        "--iters",
        "6",
        "--dropout",
        "0",
    ];
    let [_, devices, _] = data_parallel::two_peers_match_doubled_batch(env!("CARGO_BIN_EXE_clip-cls"), &base, 2, tmp.path(), WEIGHTS_FILE, SUM_ORDER_TOL);

    // stopped and resumed, a data-parallel run ends where the uninterrupted one did
    let part = tmp.path().join("part");
    let dp = |extra: &[&str]| clip(&[&base[..], &["--batch", "2", "--devices", "cpu,cpu", "--out", s(&part)], extra].concat());
    let (ok, _, err) = dp(&["--stop-after", "3"]);
    assert!(ok, "{err}");
    let (ok, _, err) = dp(&["--resume"]);
    assert!(ok, "{err}");
    let d = max_abs_diff(&devices.join(WEIGHTS_FILE), &part.join(WEIGHTS_FILE)).unwrap();
    assert!(d <= SUM_ORDER_TOL, "resumed data-parallel run differs by {d:e}");
    // its checkpoint was written by 2 peers: one cannot continue it
    let (ok, _, err) = clip(&[&base[..], &["--batch", "2", "--out", s(&part), "--resume"]].concat());
    assert!(!ok && err.contains("2 data-parallel peer(s), resumed on 1"), "{err}");
}
