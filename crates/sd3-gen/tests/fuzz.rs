//! In-process fuzzing of sd3-gen's loaders (harness: `tests/common/fuzz.rs`): every numeric
//! field of the tiny SD3's MMDiT, VAE and T5 `config.json`s and of a `scheduler_config.json`
//! edited to 0, −1, 1, huge, a float, a string, null and removed (the load refuses naming the
//! field, or loads); seeded byte damage of the weights, configs, the T5 shard index, the T5
//! `tokenizer.json`, `metadata.jsonl` and `split.json` (error or success, never a panic, a hang
//! or an allocation beyond the cap); seeded values of every numeric flag of `sd3-gen sample` and
//! `train` (the binary, under the cap).
#[path = "../../../tests/common/fuzz.rs"]
mod fuzz;
#[path = "../../../tests/common/hostile.rs"]
mod hostile;

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use sd3_gen::data::CaptionDataset;
use sd3_gen::t5::load_t5;
use sd3_gen::t5_tokenizer::T5Tokenizer;
use sd3_gen::vae::load_vae;
use sd3_gen::{Sd3Error, load_transformer};

type B = Flex;
type Loader = dyn Fn(&Path) -> Result<(), (bool, Sd3Error)>;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sd3-tiny")
}

/// `Config` errors are the config stage's (they must name the field); others come later.
fn staged<T>(r: sd3_gen::Result<T>) -> Result<(), (bool, Sd3Error)> {
    match r {
        Ok(_) => Ok(()),
        Err(e @ Sd3Error::Config { .. }) => Err((true, e)),
        Err(e) => Err((false, e)),
    }
}

fn transformer(dir: &Path) -> Result<(), (bool, Sd3Error)> {
    staged(load_transformer::<B>(dir, &Default::default()))
}
fn vae(dir: &Path) -> Result<(), (bool, Sd3Error)> {
    staged(load_vae::<B>(dir, &Default::default()))
}
fn t5(dir: &Path) -> Result<(), (bool, Sd3Error)> {
    staged(load_t5::<B>(&dir.join("text_encoder_3"), &Default::default()))
}

#[test]
fn every_numeric_model_config_field_is_refused_by_name_or_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let mut total = 0;
    for (file, load) in
        [("transformer/config.json", &transformer as &Loader), ("vae/config.json", &vae as &Loader), ("text_encoder_3/config.json", &t5 as &Loader)]
    {
        total += fuzz::fuzz_config_fields(&tiny(), file, tmp.path(), load).0;
    }
    assert!(total >= 250, "only {total} edits");
}

#[test]
fn every_numeric_scheduler_field_is_refused_by_name_or_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(model.join("scheduler")).unwrap();
    // diffusers' FlowMatchEulerDiscreteScheduler config of stable-diffusion-3-medium-diffusers
    let cfg = serde_json::json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": false});
    std::fs::write(model.join("scheduler/scheduler_config.json"), cfg.to_string()).unwrap();
    let load = |dir: &Path| staged(sd3_gen::train::scheduler_config(dir));
    fuzz::fuzz_config_fields(&model, "scheduler/scheduler_config.json", tmp.path(), &load);
}

#[test]
fn damaged_weights_and_configs_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    for (file, load, cases) in [
        ("transformer/diffusion_pytorch_model.safetensors", &transformer as &Loader, 48),
        ("transformer/config.json", &transformer as &Loader, 48),
        ("vae/diffusion_pytorch_model.safetensors", &vae as &Loader, 32),
        ("vae/config.json", &vae as &Loader, 32),
        ("text_encoder_3/model.safetensors.index.json", &t5 as &Loader, 32),
        ("text_encoder_3/model-00001-of-00002.safetensors", &t5 as &Loader, 32),
        ("text_encoder_3/config.json", &t5 as &Loader, 32),
    ] {
        fuzz::fuzz_bytes(&tiny(), file, tmp.path(), fuzz::cases(cases), &|d| load(d).is_ok());
    }
}

#[test]
fn damaged_t5_tokenizer_never_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let encode = |d: &Path| {
        if let Ok(tok) = T5Tokenizer::from_dir(d) {
            let _ = tok.tokenize("A photo of a cat, résumé 123 </s>", 16);
        }
    };
    let dir = tiny().join("tokenizer_3");
    for (file, cases) in [("tokenizer.json", 48), ("tokenizer_config.json", 32)] {
        fuzz::fuzz_bytes(&dir, file, tmp.path(), fuzz::cases(cases), &encode);
    }
}

/// A captioned folder: three PNGs, `metadata.jsonl` and `split.json`.
fn captioned(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let fx = tiny().join("../sd3-train-step");
    std::fs::copy(fx.join("wide.png"), dir.join("a.png")).unwrap();
    std::fs::copy(fx.join("tall.png"), dir.join("b.png")).unwrap();
    std::fs::copy(fx.join("wide.png"), dir.join("c.png")).unwrap();
    let lines = ["a.png", "b.png", "c.png"].map(|f| serde_json::json!({"file_name": f, "text": format!("photo {f}")}).to_string());
    std::fs::write(dir.join("metadata.jsonl"), lines.join("\n")).unwrap();
    std::fs::write(dir.join("split.json"), serde_json::json!({"train": ["a.png", "b"], "test": ["c.png"]}).to_string()).unwrap();
}

#[test]
fn damaged_caption_datasets_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    captioned(&data);
    let open = |d: &Path| {
        if let Ok(ds) = CaptionDataset::open(d, 0, 0.2) {
            for ex in ds.train_fraction(1.0, 0).unwrap_or_default().iter().chain(&ds.test) {
                if let Ok(img) = sd3_gen::data::load_image(ex) {
                    let _ = sd3_gen::data::resize_center_crop(&img, 16, true);
                }
            }
        }
    };
    for (file, cases) in [("metadata.jsonl", 64), ("split.json", 48), ("a.png", 48)] {
        fuzz::fuzz_bytes(&data, file, tmp.path(), fuzz::cases(cases), &open);
    }
}

/// `metadata.jsonl` entries outside the dataset folder are refused, naming the entry.
#[test]
fn metadata_entries_outside_the_dataset_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    captioned(&data);
    std::fs::remove_file(data.join("split.json")).unwrap();
    std::fs::copy(data.join("a.png"), tmp.path().join("outside.png")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("outside.png"), data.join("link.png")).unwrap();
    let outside = tmp.path().join("outside.png");
    for entry in [outside.to_str().unwrap(), "../outside.png", "link.png"] {
        let line = serde_json::json!({"file_name": entry, "text": "x"}).to_string();
        std::fs::write(data.join("metadata.jsonl"), format!("{{\"file_name\": \"a.png\", \"text\": \"y\"}}\n{line}\n")).unwrap();
        let e = CaptionDataset::open(&data, 0, 0.0).err().unwrap_or_else(|| panic!("{entry} accepted")).to_string();
        assert!(e.contains(&format!("`{entry}`")) && e.contains("metadata.jsonl") && e.contains("line 2"), "{e}");
    }
}

/// Runs `sd3-gen` under the hostile tests' address-space cap and time limit; `{OUT}` in the
/// arguments becomes a fresh path per run.
fn spawn(out: &Path) -> impl Fn(&[String]) -> fuzz::Spawned + Sync + '_ {
    let runs = std::sync::atomic::AtomicUsize::new(0);
    move |args: &[String]| {
        let n = runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let args: Vec<String> = args.iter().map(|a| a.replace("{OUT}", &out.join(format!("run-{n}")).to_string_lossy())).collect();
        let o = hostile::run(env!("CARGO_BIN_EXE_sd3-gen"), &args, &[], true, hostile::TIME_LIMIT);
        (o.code, o.stdout, o.stderr, o.timed_out)
    }
}

#[test]
fn random_values_of_every_numeric_flag_never_panic() {
    use serial_lora::io::{read_safetensors, write_safetensors};
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let m = tiny().to_string_lossy().into_owned();
    // the pipeline inputs of the fixture as the CLI's embeddings and latents files (as hostile.rs)
    let (r, _) = read_safetensors(&tiny().join("reference.safetensors")).unwrap();
    let names = ["prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"];
    let embeds_map: std::collections::BTreeMap<_, _> = names.iter().map(|k| (k.to_string(), r[&format!("pipe.{k}")].clone())).collect();
    let embeds = w.join("embeds.safetensors");
    write_safetensors(&embeds, &embeds_map, Default::default()).unwrap();
    let latents = w.join("latents.safetensors");
    write_safetensors(&latents, &std::collections::BTreeMap::from([("latents".to_string(), r["pipe.latents"].clone())]), Default::default()).unwrap();
    let data = w.join("data");
    captioned(&data);
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let strings = |a: &[&str]| -> Vec<String> { a.iter().map(|x| x.to_string()).collect() };
    let bases = [
        (
            "sample",
            strings(&[
                "sample",
                "--model",
                &m,
                "--prompt-embeds",
                &s(&embeds),
                "--latents",
                &s(&latents),
                "--steps",
                "1",
                "--height",
                "16",
                "--width",
                "12",
                "--output",
                "{OUT}.png",
            ]),
        ),
        (
            "train",
            strings(&[
                "train",
                "--model",
                &m,
                "--dataset",
                &s(&data),
                "--method",
                "lora",
                "--rank",
                "2",
                "--iters",
                "1",
                "--resolution",
                "16",
                "--max-sequence-length",
                "2",
                "--no-t5",
                "--test-fraction",
                "0",
                "--out",
                "{OUT}",
            ]),
        ),
    ];
    fuzz::fuzz_cli(&bases, &fuzz::NUMERIC_PLACEHOLDERS, fuzz::cli_cases(10), &spawn(w));
}
