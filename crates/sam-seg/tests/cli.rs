//! The `sam-seg` binary end to end on the tiny fixture model: output keys and shapes, equality
//! with the library, the mask PNG, and bad input named without a panic.
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::Flex;
use burn::prelude::*;
use lora_runtime::imaging::load_rgb;
use sam_seg::processor::SamProcessor;
use sam_seg::{Prompts, load_sam};
use serial_lora::io::read_safetensors;

type B = Flex;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn sam(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sam-seg")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn predict_writes_masks_equal_to_the_library() {
    let model = fixtures().join("sam-tiny");
    let image = fixtures().join("clip-images/rgb_61x47.png");
    let tmp = tempfile::tempdir().unwrap();
    let (out, png) = (tmp.path().join("out.safetensors"), tmp.path().join("mask.png"));
    let args = ["predict", "--model", s(&model), "--image", s(&image), "--box", "5,6,40,30", "--point", "20,15,1", "--point", "50,40,0"];
    let (ok, err) = sam(&[&args[..], &["--output", s(&out), "--mask-png", s(&png)]].concat());
    assert!(ok, "{err}");
    let (t, _) = read_safetensors(&out).unwrap();
    assert_eq!(t["pred_masks"].shape, [1, 1, 3, 32, 32]);
    assert_eq!(t["iou_scores"].shape, [1, 1, 3]);

    // the same through the library
    let dev = Default::default();
    let (m, cfg) = load_sam::<B>(&model, &dev).unwrap();
    let p = SamProcessor::for_vision(&cfg.vision_config);
    let img = load_rgb(&image).unwrap();
    let px = p.process(&img);
    let xy: Vec<f32> = [[20.0, 15.0], [50.0, 40.0]].iter().flat_map(|q| p.scale_point(px.original_size, *q)).collect();
    let prompts = Prompts::<B> {
        points: Some((Tensor::from_data(TensorData::new(xy, [1, 1, 2, 2]), &dev), Tensor::from_data(TensorData::new(vec![1i64, 0], [1, 1, 2]), &dev))),
        boxes: Some(Tensor::from_data(TensorData::new(p.scale_box(px.original_size, [5.0, 6.0, 40.0, 30.0]).to_vec(), [1, 1, 4]), &dev)),
        masks: None,
    };
    let pixels = Tensor::from_data(TensorData::new(px.pixel_values, [1, 3, 64, 64]), &dev);
    let o = m.forward(m.get_image_embeddings(pixels), &prompts, true).unwrap();
    let lib: Vec<f32> = o.pred_masks.into_data().iter::<f32>().collect();
    assert_eq!(lib, t["pred_masks"].data, "CLI and library differ");

    // a smaller input: the masks shrink with it
    let small = tmp.path().join("small.safetensors");
    let (ok, err) = sam(&[&args[..], &["--output", s(&small), "--image-size", "32"]].concat());
    assert!(ok, "{err}");
    assert_eq!(read_safetensors(&small).unwrap().0["pred_masks"].shape, [1, 1, 3, 16, 16]);

    let mask = image::open(&png).unwrap().to_luma8();
    assert_eq!((mask.width(), mask.height()), (61, 47));
    assert!(mask.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
}

#[test]
fn bad_input_is_named_without_a_panic() {
    let model = fixtures().join("sam-tiny");
    let image = fixtures().join("clip-images/rgb_61x47.png");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let base = ["predict", "--model", s(&model), "--image", s(&image), "--output", s(&out)];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--box", "5,6,70,30"], "outside the image"),
        (vec!["--point", "-3,4,1"], "outside the image"),
        (vec![], "give a prompt"),
        (vec!["--box", "5,6,4,30"], "x0 < x1"),
        (vec!["--point", "3,4,2"], "label must be 1"),
        (vec!["--box", "5,6,nan,30"], "finite"),
    ];
    for (extra, want) in cases {
        let (ok, err) = sam(&[&base[..], &extra[..]].concat());
        assert!(!ok && err.contains(want) && !err.contains("panicked"), "{extra:?}: {err}");
    }
    let missing = tmp.path().join("nothing.png");
    let (ok, err) = sam(&["predict", "--model", s(&model), "--image", s(&missing), "--box", "1,1,5,5", "--output", s(&out)]);
    assert!(!ok && err.contains("nothing.png"), "{err}");
    let (ok, err) = sam(&["predict", "--model", s(tmp.path()), "--image", s(&image), "--box", "1,1,5,5", "--output", s(&out)]);
    assert!(!ok && err.contains("config.json"), "{err}");
}
