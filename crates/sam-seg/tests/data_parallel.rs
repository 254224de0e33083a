//! Data-parallel training (`lora_runtime::dist`) through `sam-seg train`, over loopback: two
//! peers with `--batch b` reach the adapter of one peer with `--batch 2b`.
mod common;
#[path = "../../../tests/common/data_parallel.rs"]
mod data_parallel;

use common::{fixtures, squares};
use serial_lora::io::WEIGHTS_FILE;

/// The peers sum the same per-image gradients (box jitter is drawn per image) in another order
/// (f32 partial sums), which AdamW carries on: f32 rounding of the updates.
const SUM_ORDER_TOL: f32 = 1e-5;

#[test]
fn two_peers_reach_the_single_device_adapter_of_the_doubled_batch() {
    let data = tempfile::tempdir().unwrap();
    squares(data.path(), 6); // 5 training pairs in global batches of 4: shares of 2+2, then 0+1
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("sam-tiny-shapes");
    let base = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.path().to_str().unwrap(),
        "--seed",
        "3",
        "--method",
        "serial-lora-plus",
        "--rank",
        "2",
        "--dropout",
        "0",
        "--lr",
        "1e-2",
        "--lr-ratio",
        "4",
        "--image-size",
        "32",
        "--iters",
        "4",
    ];
    data_parallel::two_peers_match_doubled_batch(env!("CARGO_BIN_EXE_sam-seg"), &base, 2, tmp.path(), WEIGHTS_FILE, SUM_ORDER_TOL);
}
