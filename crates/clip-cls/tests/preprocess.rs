//! Preprocessing parity with transformers' PIL `CLIPImageProcessor` (`CLIPImageProcessorPil`
//! in transformers 5.24, Pillow 13.0): RGB conversion, bicubic resize and crop are compared
//! byte for byte, `pixel_values` to f32 rounding. `rgb_40x90` (→ 32×72) takes Pillow 13's
//! vertical-first pass order, the others horizontal-first. Fixture: `tools/fixtures/clip_text_image.py`.
use std::path::PathBuf;

use clip_cls::preprocess::{Filter, ImageProcessor, RgbImage, center_crop, load_rgb, resize};
use serial_lora::io::read_safetensors;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/clip-images")
}

/// The processor rescales in f64 then normalizes in f32; we do both in f32: ≤ 2 ulp of values
/// of magnitude ≤ 2.2.
const PIXEL_TOL: f32 = 1e-6;

#[test]
fn pixels_match_the_pil_image_processor() {
    let (reference, _) = read_safetensors(&dir().join("reference.safetensors")).unwrap();
    let processor = ImageProcessor {
        shortest_edge: 32,
        crop: [32, 32],
        image_mean: clip_cls::preprocess::CLIP_MEAN,
        image_std: clip_cls::preprocess::CLIP_STD,
        rescale_factor: 1.0 / 255.0,
    };
    for name in ["rgb_61x47.png", "rgb_40x90.png", "gray_33x33.png", "rgba_50x30.png"] {
        let img = load_rgb(&dir().join(name)).unwrap();
        let bytes = |key: &str| -> Vec<u8> { reference[key].data.iter().map(|&v| v as u8).collect() };
        if let Some(rgb) = reference.get(&format!("{name}.rgb")) {
            let want: Vec<u8> = rgb.data.iter().map(|&v| v as u8).collect();
            let diff = img.data.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{name}: {diff} RGB values differ after alpha compositing");
        }
        let shape = &reference[&format!("{name}.resized")].shape;
        let resized = resize(&img, shape[1], shape[0], Filter::Bicubic);
        let want = bytes(&format!("{name}.resized"));
        let diff = resized.data.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{name}: {diff} of {} resized values differ from PIL", want.len());
        let cropped: RgbImage = center_crop(&resized, 32, 32);
        assert_eq!(cropped.data, bytes(&format!("{name}.cropped")), "{name}: crop");
        let pv = processor.process(&img);
        let want = &reference[&format!("{name}.pixel_values")].data;
        let err = pv.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= PIXEL_TOL, "{name}: pixel_values differ by {err}");
    }
}
