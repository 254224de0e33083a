//! In-process fuzzing of the runtime's loaders (harness: `tests/common/fuzz.rs`): seeded byte
//! damage of PNG and JPEG images (`imaging::load_rgb`): error or success, never a panic, a hang or
//! an allocation beyond the cap.
#[path = "../../../tests/common/fuzz.rs"]
mod fuzz;

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn damaged_images_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for f in ["rgb_61x47.png", "rgba_50x30.png", "gray_33x33.png"] {
        std::fs::copy(root().join("tests/fixtures/clip-images").join(f), images.join(f)).unwrap();
    }
    let rgb = image::open(images.join("rgb_61x47.png")).unwrap().to_rgb8();
    rgb.save(images.join("rgb.jpg")).unwrap();
    let decode = |name: &'static str| {
        move |d: &Path| {
            if let Ok(img) = lora_runtime::imaging::load_rgb(&d.join(name)) {
                let _ = lora_runtime::imaging::resize(&img, 7, 5, lora_runtime::imaging::Filter::Bilinear);
            }
        }
    };
    for (f, cases) in [("rgb_61x47.png", 64), ("rgba_50x30.png", 32), ("gray_33x33.png", 32), ("rgb.jpg", 96)] {
        fuzz::fuzz_bytes(&images, f, tmp.path(), fuzz::cases(cases), &decode(f));
    }
}
