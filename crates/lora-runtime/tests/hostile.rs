//! The runtime's part of the hostile-input corpus (the adapter library's is in
//! `crates/serial-lora/tests/hostile.rs`, the binaries' in
//! `crates/{clip-cls,sam-seg,sd3-gen}/tests/hostile.rs`): image decoding as PIL / transformers
//! see unusual but valid files (byte-exact against `tools/fixtures/unusual_images.py`), hostile
//! image files named without a panic, and the non-finite step check naming the step.
#[path = "../../../tests/common/hostile.rs"]
mod hostile;

use std::path::PathBuf;

use hostile::make;
use lora_runtime::imaging::load_rgb;
use serial_lora::io::read_safetensors;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Largest byte difference allowed for the CMYK JPEG: libjpeg (Pillow) and zune-jpeg (image)
/// use different IDCTs, so JPEG decodes agree only to a few levels; every PNG must be exact.
const JPEG_TOLERANCE: u8 = 4;

#[test]
fn unusual_images_decode_as_transformers_convert_to_rgb() {
    let dir = fixtures().join("unusual-images");
    let (reference, _) = read_safetensors(&dir.join("reference.safetensors")).unwrap();
    assert!(reference.len() >= 9);
    for (name, want) in &reference {
        let img = load_rgb(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(vec![img.height, img.width, 3], want.shape, "{name}");
        let want: Vec<u8> = want.data.iter().map(|v| *v as u8).collect();
        let worst = img.data.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
        println!("{name}: {}x{} max byte difference {worst}", img.width, img.height);
        let limit = if name.ends_with(".jpg") { JPEG_TOLERANCE } else { 0 };
        assert!(worst <= limit, "{name}: max byte difference {worst} > {limit}\n got {:?}\nwant {:?}", &img.data[..21], &want[..21]);
    }
}

#[test]
fn hostile_images_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let png = fixtures().join("clip-images/rgb_61x47.png");
    let cases: Vec<(PathBuf, &str)> = vec![
        (make::truncated(&png, &w.join("t.png"), 0.5), "t.png"),
        (make::zero_byte(&w.join("z.png")), "z.png"),
        (make::text(&w.join("x.jpg"), "hello"), "x.jpg"),
        (make::huge_png(&w.join("huge.png"), 100_000, 100_000), "huge.png"),
        (make::huge_png(&w.join("wide.png"), u32::MAX / 4, 1), "wide.png"),
        (make::huge_jpeg(&w.join("huge.jpg"), 65_000, 65_000), "huge.jpg"),
        (w.join("missing.png"), "missing.png"),
    ];
    for (path, culprit) in cases {
        let err = load_rgb(&path).expect_err(culprit).to_string();
        assert!(err.contains(culprit), "{culprit}: {err}");
    }
}

/// A one-parameter module for [`check_finite`] (`lora_runtime::run`).
#[derive(burn::module::Module, Debug)]
struct Tiny<B: burn::prelude::Backend> {
    p: burn::module::Param<burn::prelude::Tensor<B, 1>>,
}

#[test]
fn check_finite_names_the_step_and_the_gradient() {
    use burn::optim::GradientsParams;
    use burn::prelude::*;
    use lora_runtime::run::check_finite;
    type AB = burn::backend::Autodiff<burn::backend::Flex>;
    let dev = Default::default();
    let m = Tiny::<AB> { p: burn::module::Param::from_tensor(Tensor::from_floats([0.0, 1.0], &dev)).set_require_grad(true) };
    let grads_of = |loss: Tensor<AB, 1>| {
        let v = loss.clone().into_scalar();
        (v, GradientsParams::from_grads(loss.backward(), &m))
    };
    // finite loss and gradient
    let (v, g) = grads_of(m.p.val().powf_scalar(2.0).sum());
    check_finite(0, v, &m, &g).unwrap();
    // a finite loss (√0 + √1 = 1) with an infinite gradient (d√p/dp at 0)
    let (v, g) = grads_of(m.p.val().sqrt().sum());
    assert!(v.is_finite());
    let err = check_finite(4, v, &m, &g).unwrap_err().to_string();
    assert!(err.contains("step 5") && err.contains("gradient of `p`") && err.contains("not finite"), "{err}");
    // a non-finite loss
    let (_, g) = grads_of(m.p.val().powf_scalar(2.0).sum());
    let err = check_finite(0, f32::NAN, &m, &g).unwrap_err().to_string();
    assert!(err.contains("step 1") && err.contains("loss (NaN)"), "{err}");
}
