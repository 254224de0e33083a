//! In-process fuzzing of sam-seg's loaders (harness: `tests/common/fuzz.rs`): every numeric
//! field of the tiny SAM's `config.json` and of a `preprocessor_config.json` edited to 0, −1, 1,
//! huge, a float, a string, null and removed (the load refuses naming the field, or loads);
//! seeded byte damage of `model.safetensors`, `config.json`, images, masks and `split.json`
//! (error or success, never a panic, a hang or an allocation beyond the cap); seeded values of
//! every numeric flag of `sam-seg predict`, `train` and `eval` (the binary, under the cap).
mod common;
#[path = "../../../tests/common/fuzz.rs"]
mod fuzz;
#[path = "../../../tests/common/hostile.rs"]
mod hostile;

use std::path::Path;

use burn::backend::Flex;
use common::fixtures;
use sam_seg::data::{SegDataset, load_mask};
use sam_seg::{SamConfig, SamError, load_sam_sized};

type B = Flex;

/// The config stage (`true`: its errors must name the field), then the whole load.
fn load(dir: &Path) -> Result<(), (bool, SamError)> {
    SamConfig::from_json_file(&dir.join("config.json")).map_err(|e| (true, e))?;
    load_sam_sized::<B>(dir, &Default::default(), None).map(|_| ()).map_err(|e| (false, e))
}

#[test]
fn every_numeric_config_field_is_refused_by_name_or_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let (n, ..) = fuzz::fuzz_config_fields(&fixtures().join("sam-tiny"), "config.json", tmp.path(), &load);
    assert!(n >= 300, "only {n} edits: the fixture's config lost its fields?");
}

/// HF `SamProcessor`'s `preprocessor_config.json` (facebook/sam-vit-base), sized for the tiny model.
fn with_preprocessor(dir: &Path) {
    let image_size = SamConfig::from_json_file(&dir.join("config.json")).unwrap().vision_config.image_size;
    let p = serde_json::json!({
        "do_normalize": true, "do_pad": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "mask_pad_size": {"height": 256, "width": 256}, "mask_size": {"longest_edge": 256},
        "pad_size": {"height": image_size, "width": image_size}, "resample": 2,
        "rescale_factor": 0.00392156862745098, "size": {"longest_edge": image_size}
    });
    std::fs::write(dir.join("preprocessor_config.json"), serde_json::to_string_pretty(&p).unwrap()).unwrap();
}

#[test]
fn every_numeric_preprocessor_field_is_refused_by_name_or_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    fuzz::copy_dir(&fixtures().join("sam-tiny"), &model);
    with_preprocessor(&model);
    let load = |dir: &Path| -> Result<(), (bool, SamError)> {
        let cfg = SamConfig::from_json_file(&dir.join("config.json")).unwrap();
        sam_seg::processor::SamProcessor::from_dir(dir, &cfg.vision_config).map(|_| ()).map_err(|e| (true, e))
    };
    fuzz::fuzz_config_fields(&model, "preprocessor_config.json", tmp.path(), &load);
}

#[test]
fn damaged_weights_and_config_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    for (file, cases) in [("model.safetensors", 96), ("config.json", 96)] {
        fuzz::fuzz_bytes(&fixtures().join("sam-tiny"), file, tmp.path(), fuzz::cases(cases), &|d| load(d).is_ok());
    }
}

#[test]
fn damaged_dataset_files_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::squares(&data, 3);
    let open = |d: &Path| -> bool {
        let Ok(ds) = SegDataset::open(d, 0, 0.5) else { return false };
        for split in ["train", "test"] {
            for pair in ds.split(split, 1.0, 0).unwrap_or_default() {
                let _ = load_mask(&pair.mask, None);
                let _ = lora_runtime::imaging::load_rgb(&pair.image);
            }
        }
        true
    };
    for (file, cases) in [("split.json", 64), ("images/00.png", 64), ("masks/00.png", 64)] {
        fuzz::fuzz_bytes(&data, file, tmp.path(), fuzz::cases(cases), &open);
    }
}

/// Named regressions: the hand-edited configs of issue 17 (a divide by zero in the error
/// message before the guard; an error naming only line and column).
#[test]
fn regression_sam_vision_config_patch_size_0_and_window_size_negative() {
    let tmp = tempfile::tempdir().unwrap();
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("sam-tiny/config.json")).unwrap()).unwrap();
    for (field, value, want) in
        [("patch_size", serde_json::json!(0), "vision_config.patch_size"), ("window_size", serde_json::json!(-3), "vision_config.window_size")]
    {
        let mut v = original.clone();
        v["vision_config"][field] = value;
        let path = tmp.path().join(format!("{field}.json"));
        std::fs::write(&path, v.to_string()).unwrap();
        let e = fuzz::guarded(field, || SamConfig::from_json_file(&path)).unwrap().unwrap_err().to_string();
        assert!(e.contains(want) && e.contains(&format!("{field}.json")), "{e}");
        println!("{e}");
    }
}

/// Runs `sam-seg` under the hostile tests' address-space cap and time limit; `{OUT}` in the
/// arguments becomes a fresh directory per run.
fn spawn(out: &Path) -> impl Fn(&[String]) -> fuzz::Spawned + Sync + '_ {
    let runs = std::sync::atomic::AtomicUsize::new(0);
    move |args: &[String]| {
        let n = runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let args: Vec<String> = args.iter().map(|a| a.replace("{OUT}", &out.join(format!("run-{n}")).to_string_lossy())).collect();
        let o = hostile::run(env!("CARGO_BIN_EXE_sam-seg"), &args, &[], true, hostile::TIME_LIMIT);
        (o.code, o.stdout, o.stderr, o.timed_out)
    }
}

#[test]
fn random_values_of_every_numeric_flag_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let data = w.join("data");
    common::squares(&data, 4);
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let (tiny, shapes) = (s(&fixtures().join("sam-tiny")), s(&fixtures().join("sam-tiny-shapes")));
    let image = s(&fixtures().join("clip-images/rgb_61x47.png"));
    let strings = |a: &[&str]| -> Vec<String> { a.iter().map(|x| x.to_string()).collect() };
    let bases = [
        ("predict", strings(&["predict", "--model", &tiny, "--image", &image, "--box", "5,6,40,30", "--output", "{OUT}.safetensors"])),
        (
            "train",
            strings(&[
                "train",
                "--model",
                &shapes,
                "--dataset",
                &s(&data),
                "--method",
                "lora",
                "--rank",
                "2",
                "--iters",
                "1",
                "--batch",
                "2",
                "--image-size",
                "32",
                "--out",
                "{OUT}",
            ]),
        ),
        ("eval", strings(&["eval", "--model", &shapes, "--dataset", &s(&data), "--image-size", "32"])),
    ];
    fuzz::fuzz_cli(&bases, &fuzz::NUMERIC_PLACEHOLDERS, fuzz::cli_cases(10), &spawn(w));
}
