//! Shared by the reliability tests (`hostile.rs`, `crash.rs`): fixture paths and a tiny
//! generated segmentation dataset.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// `dir/images/NN.png` + `dir/masks/NN.png` (32×32, one bright square each, shifted per image)
/// and a `split.json` with the last pair in `test`.
pub fn squares(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    for i in 0..n {
        let inside = |x: u32, y: u32| (4 + i as u32..20 + i as u32).contains(&x) && (6..22).contains(&y);
        image::RgbImage::from_fn(32, 32, |x, y| image::Rgb(if inside(x, y) { [220, 210, 200] } else { [20, 30, 40] }))
            .save(dir.join(format!("images/{i:02}.png")))
            .unwrap();
        image::GrayImage::from_fn(32, 32, |x, y| image::Luma([if inside(x, y) { 255 } else { 0 }])).save(dir.join(format!("masks/{i:02}.png"))).unwrap();
    }
    let stems: Vec<String> = (0..n).map(|i| format!("{i:02}")).collect();
    let split = serde_json::json!({"train": stems[..n - 1], "test": stems[n - 1..]});
    std::fs::write(dir.join("split.json"), split.to_string()).unwrap();
}
