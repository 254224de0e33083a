//! In-process fuzzing of clip-cls's loaders (harness: `tests/common/fuzz.rs`): every numeric
//! field of the tiny CLIP's `config.json`, of a `CLIPTextModelWithProjection` config (SD3's
//! `text_encoder/`), of a `preprocessor_config.json` and of a PEFT `adapter_config.json`
//! edited to 0, −1, 1, huge, a float, a string, null and removed (the load refuses naming the
//! field, or loads); seeded byte damage of `model.safetensors`, `config.json`,
//! `adapter_model.safetensors`, `adapter_config.json`, `vocab.json`, `merges.txt`,
//! `tokenizer.json` and a CoOp split file (error or success, never a panic, a hang or an
//! allocation beyond the cap); seeded values of every numeric flag of `clip-cls train` and
//! `eval` (the binary, under the cap; `embed`, `zero-shot` and `spectra` have none); every file
//! of a run directory damaged, then `train --resume`.
mod common;
#[path = "../../../tests/common/fuzz.rs"]
mod fuzz;
#[path = "../../../tests/common/hostile.rs"]
mod hostile;

use std::path::Path;

use burn::backend::Flex;
use clip_cls::data::Dataset;
use clip_cls::preprocess::ImageProcessor;
use clip_cls::tokenizer::ClipTokenizer;
use clip_cls::{ClipConfig, ClipError, load_clip, load_clip_text};
use common::fixtures;

type B = Flex;

fn load(dir: &Path) -> Result<(), (bool, ClipError)> {
    ClipConfig::from_json_file(&dir.join("config.json")).map_err(|e| (true, e))?;
    load_clip::<B>(dir, &Default::default()).map(|_| ()).map_err(|e| (false, e))
}

#[test]
fn every_numeric_config_field_is_refused_by_name_or_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let (n, ..) = fuzz::fuzz_config_fields(&fixtures().join("clip-tiny"), "config.json", tmp.path(), &load);
    assert!(n >= 150, "only {n} edits");
}

#[test]
fn every_numeric_text_encoder_config_field_is_refused_by_name_or_loads() {
    let tmp = tempfile::tempdir().unwrap();
    for sub in ["text_encoder", "text_encoder_2"] {
        let load = |dir: &Path| -> Result<(), (bool, ClipError)> {
            // the config stage's errors are `Config` errors naming config.json; the weights' are not
            match load_clip_text::<B>(dir, &Default::default()) {
                Ok(_) => Ok(()),
                Err(e @ ClipError::Config { .. }) => Err((true, e)),
                Err(e) => Err((false, e)),
            }
        };
        fuzz::fuzz_config_fields(&fixtures().join("sd3-tiny").join(sub), "config.json", &tmp.path().join(sub), &load);
    }
}

#[test]
fn every_numeric_preprocessor_field_is_refused_by_name_or_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    fuzz::copy_dir(&fixtures().join("clip-tiny"), &model);
    // transformers' CLIPImageProcessor of openai/clip-vit-base-patch16, sized for the tiny model
    let size = ClipConfig::from_json_file(&model.join("config.json")).unwrap().vision_config.image_size;
    let p = serde_json::json!({
        "crop_size": {"height": size, "width": size}, "do_center_crop": true, "do_convert_rgb": true,
        "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": size}
    });
    std::fs::write(model.join("preprocessor_config.json"), p.to_string()).unwrap();
    let load = |dir: &Path| -> Result<(), (bool, ClipError)> {
        let cfg = ClipConfig::from_json_file(&dir.join("config.json")).unwrap();
        ImageProcessor::from_dir(dir, &cfg.vision_config).map(|_| ()).map_err(|e| (true, e))
    };
    fuzz::fuzz_config_fields(&model, "preprocessor_config.json", tmp.path(), &load);
}

/// The tiny CLIP with the PEFT adapter of the fixtures in `adapter/`.
fn adapter_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fuzz::copy_dir(&fixtures().join("clip-tiny"), dir.path());
    dir
}

fn load_adapter(dir: &Path) -> Result<(), (bool, serial_lora::Error)> {
    let dev = Default::default();
    let (model, _) = load_clip::<B>(dir, &dev).unwrap();
    match serial_lora::io::load_adapter(model, dir.join("peft_lora"), &dev) {
        Ok(_) => Ok(()),
        Err(e @ serial_lora::Error::Parse { .. }) => Err((true, e)),
        Err(e) => Err((false, e)),
    }
}

#[test]
fn every_numeric_adapter_config_field_is_refused_by_name_or_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = adapter_model();
    fuzz::fuzz_config_fields(model.path(), "peft_lora/adapter_config.json", tmp.path(), &load_adapter);
}

#[test]
fn damaged_weights_adapters_and_configs_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let model = adapter_model();
    for (file, cases) in [("model.safetensors", 64), ("config.json", 64)] {
        fuzz::fuzz_bytes(model.path(), file, tmp.path(), fuzz::cases(cases), &|d| load(d).is_ok());
    }
    for (file, cases) in [("peft_lora/adapter_model.safetensors", 64), ("peft_lora/adapter_config.json", 64)] {
        fuzz::fuzz_bytes(model.path(), file, tmp.path(), fuzz::cases(cases), &|d| load_adapter(d).is_ok());
    }
}

#[test]
fn damaged_tokenizer_files_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = common::tiny_model_dir();
    let encode = |tok: clip_cls::Result<ClipTokenizer>| {
        if let Ok(tok) = tok {
            let _ = tok.encode("a photo of a cat, résumé 123 <|endoftext|>");
        }
    };
    for (file, cases) in [("vocab.json", 48), ("merges.txt", 48)] {
        fuzz::fuzz_bytes(tiny.path(), file, tmp.path(), fuzz::cases(cases), &|d| encode(ClipTokenizer::from_dir(d)));
    }
    let sd3 = fixtures().join("sd3-tiny/tokenizer");
    for (file, cases) in [("tokenizer.json", 48), ("tokenizer_config.json", 32)] {
        fuzz::fuzz_bytes(&sd3, file, tmp.path(), fuzz::cases(cases), &|d| encode(ClipTokenizer::from_dir(d)));
    }
}

#[test]
fn damaged_coop_split_never_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("images")).unwrap();
    for (i, img) in common::images().iter().enumerate() {
        std::fs::copy(img, data.join(format!("images/{i}.png"))).unwrap();
    }
    let split = serde_json::json!({
        "train": [["0.png", 0, "red_thing"], ["1.png", 1, "blue_thing"]],
        "val": [["2.png", 0, "red_thing"]],
        "test": [["3.png", 1, "blue_thing"], ["1.png", 1, "blue_thing"]]
    });
    std::fs::write(data.join("split_zhou_Things.json"), split.to_string()).unwrap();
    let open = |d: &Path| {
        if let Ok(ds) = Dataset::open(d) {
            let _ = ds.few_shot("train", Some(1), 0);
            for item in ds.split("test").unwrap_or_default() {
                let _ = lora_runtime::imaging::load_rgb(&item.path);
            }
        }
    };
    fuzz::fuzz_bytes(&data, "split_zhou_Things.json", tmp.path(), fuzz::cases(64), &open);
}

/// Manifest entries outside the dataset folder are refused, naming the entry.
#[test]
fn coop_split_entries_outside_the_dataset_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("images")).unwrap();
    let img = &common::images()[0];
    std::fs::copy(img, data.join("images/0.png")).unwrap();
    std::fs::copy(img, tmp.path().join("outside.png")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("outside.png"), data.join("images/link.png")).unwrap();
    let outside = tmp.path().join("outside.png");
    for entry in [outside.to_str().unwrap(), "../../outside.png", "link.png"] {
        let split = serde_json::json!({"train": [["0.png", 0, "a"], [entry, 0, "a"]], "test": [["0.png", 0, "a"]]});
        std::fs::write(data.join("split_zhou_Things.json"), split.to_string()).unwrap();
        let e = Dataset::open(&data).err().unwrap_or_else(|| panic!("{entry} accepted")).to_string();
        assert!(e.contains(&format!("`{entry}`")) && e.contains("split_zhou_Things.json"), "{e}");
    }
}

/// Runs `clip-cls` under the hostile tests' address-space cap and time limit; `{OUT}` in the
/// arguments becomes a fresh path per run.
fn spawn(out: &Path) -> impl Fn(&[String]) -> fuzz::Spawned + Sync + '_ {
    let runs = std::sync::atomic::AtomicUsize::new(0);
    move |args: &[String]| {
        let n = runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let args: Vec<String> = args.iter().map(|a| a.replace("{OUT}", &out.join(format!("run-{n}")).to_string_lossy())).collect();
        let o = hostile::run(env!("CARGO_BIN_EXE_clip-cls"), &args, &[], true, hostile::TIME_LIMIT);
        (o.code, o.stdout, o.stderr, o.timed_out)
    }
}

#[test]
fn random_values_of_every_numeric_flag_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let model = common::tiny_model_dir();
    let m = model.path().to_string_lossy().into_owned();
    let data = w.join("data");
    common::colour_dataset(&data, 2, 1);
    let d = data.to_string_lossy().into_owned();
    let strings = |a: &[&str]| -> Vec<String> { a.iter().map(|x| x.to_string()).collect() };
    // `embed`, `zero-shot` and `spectra` take no numeric flag; `proxy` pretrains a backbone
    // first (minutes) and is not fuzzed here
    let bases = [
        ("train", strings(&["train", "--model", &m, "--dataset", &d, "--method", "lora", "--rank", "2", "--iters", "1", "--batch", "2", "--out", "{OUT}"])),
        ("eval", strings(&["eval", "--model", &m, "--dataset", &d, "--batch", "2"])),
    ];
    fuzz::fuzz_cli(&bases, &fuzz::NUMERIC_PLACEHOLDERS, fuzz::cli_cases(12), &spawn(w));
}

/// Every file of a run directory (`train_config.json`, the checkpoint's state, optimizer and
/// adapter) damaged, then `clip-cls train --resume`: an error or a resumed run, never a panic,
/// an abort or a hang (the binary, under the cap; each case resumes a fresh copy).
#[test]
fn damaged_run_directory_then_resume_never_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let model = common::tiny_model_dir();
    let data = w.join("data");
    common::colour_dataset(&data, 2, 0);
    let run = w.join("run");
    let args = |out: &Path, resume: bool| -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "--model",
            &model.path().to_string_lossy(),
            "--dataset",
            &data.to_string_lossy(),
            "--method",
            "serial-lora-plus",
            "--rank",
            "2",
            "--iters",
            "3",
            "--batch",
            "2",
            "--save-steps",
            "1",
            "--out",
            &out.to_string_lossy(),
        ]
        .map(String::from)
        .to_vec();
        a.extend(if resume { vec!["--resume".to_string()] } else { vec!["--stop-after".into(), "1".into()] });
        a
    };
    let first = hostile::run(env!("CARGO_BIN_EXE_clip-cls"), &args(&run, false), &[], false, hostile::TIME_LIMIT);
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    let mut files = Vec::new();
    for sub in ["", "checkpoint"] {
        for e in std::fs::read_dir(run.join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                files.push(p.strip_prefix(&run).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    assert!(files.iter().any(|f| f.starts_with("checkpoint/")) && files.len() >= 4, "{files:?}");
    let copies = std::sync::atomic::AtomicUsize::new(0);
    let resume = |d: &Path| {
        // resuming writes into the run: each case resumes its own copy
        let copy = w.join(format!("resume-{}", copies.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
        fuzz::copy_dir(d, &copy);
        let o = hostile::run(env!("CARGO_BIN_EXE_clip-cls"), &args(&copy, true), &[], true, hostile::TIME_LIMIT);
        let _ = std::fs::remove_dir_all(&copy);
        assert!(!o.timed_out && o.code.is_some() && !o.stderr.contains("panicked at"), "resume: {:?}\n{}", o.code, o.stderr);
    };
    for f in &files {
        fuzz::fuzz_bytes(&run, f, &w.join("damaged"), fuzz::cli_cases(12) as u32, &resume);
    }
}
