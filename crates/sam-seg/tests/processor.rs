//! Pre- and postprocessing vs transformers' `SamProcessor` + `SamImageProcessorPil`
//! (`tools/fixtures/sam_processor.py`): pixel values, sizes, rescaled prompts, upsampled masks.
use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::backend::Flex;
use burn::prelude::*;
use lora_runtime::imaging::load_rgb;
use sam_seg::processor::SamProcessor;

type B = Flex;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn reference() -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(fixtures().join("sam-processor/reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let data = match v.dtype() {
                safetensors::Dtype::I64 => v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                _ => v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            };
            (k, (v.shape().to_vec(), data))
        })
        .collect()
}

fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn processor_matches_transformers() {
    let r = reference();
    // the fixture's processor: longest edge 64, pad 64 × 64
    let p = SamProcessor { longest_edge: 64, pad: [64, 64], ..SamProcessor::for_vision(&Default::default()) };
    for name in ["rgb_61x47", "rgb_40x90"] {
        let img = load_rgb(&fixtures().join(format!("clip-images/{name}.png"))).unwrap();
        let out = p.process(&img);
        let key = |k: &str| format!("{name}.{k}");
        let size = |k: &str| (r[&key(k)].1[0] as usize, r[&key(k)].1[1] as usize);
        assert_eq!(out.original_size, size("original_size"));
        assert_eq!(out.reshaped_size, size("reshaped_size"));
        // bilinear resize is byte-exact (Pillow transcription); normalization in f32 as numpy,
        // values up to |2.6|: 1e-5 absolute is a few ulp
        let px: Vec<f64> = out.pixel_values.iter().map(|v| *v as f64).collect();
        let err = max_abs(&px, &r[&key("pixel_values")].1);
        println!("{name}: pixel_values max abs err {err:.1e}");
        assert!(err < 1e-5, "{name}: pixel_values {err}");

        let pts: Vec<f64> = [[10.0, 20.0], [33.0, 5.0]].iter().flat_map(|q| p.scale_point(out.original_size, *q)).map(f64::from).collect();
        assert!(max_abs(&pts, &r[&key("input_points")].1) < 1e-5, "{name}: points {pts:?}");
        let bx: Vec<f64> = p.scale_box(out.original_size, [5.0, 6.0, 30.0, 40.0]).iter().map(|v| *v as f64).collect();
        assert!(max_abs(&bx, &r[&key("input_boxes")].1) < 1e-5, "{name}: box {bx:?}");

        let (shape, low) = &r[&key("low_res_masks")];
        let low = Tensor::<B, 4>::from_data(TensorData::new(low.iter().map(|v| *v as f32).collect::<Vec<_>>(), shape.clone()), &Default::default());
        let masks = p.postprocess_masks(low, out.reshaped_size, out.original_size);
        let (mshape, want) = &r[&key("masks")];
        assert_eq!(&masks.dims().to_vec(), mshape);
        let got: Vec<f64> = masks.into_data().iter::<f32>().map(f64::from).collect();
        // relative to the largest logit: both sides interpolate in f32 but derive the source
        // coordinates in a different order (~1e-6); a wrong crop or alignment is O(1e-1)
        let err = max_abs(&got, want) / want.iter().fold(0.0, |m, v| v.abs().max(m));
        println!("{name}: masks rel err {err:.1e}");
        assert!(err < 1e-5, "{name}: masks {err}");
    }
}
