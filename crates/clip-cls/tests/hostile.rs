//! The hostile-input corpus (`tests/common/hostile.rs`) against the `clip-cls` binary: every bad
//! image, weights file, config, adapter, flag, dataset, output path and hub id fails with an
//! error naming it — no panic, no hang, no huge allocation — and valid but unusual images
//! (16-bit, grayscale + alpha, palette, 1-bit, CMYK JPEG) are accepted.
mod common;
#[path = "../../../tests/common/hostile.rs"]
mod hostile;

use std::path::{Path, PathBuf};

use common::{colour_dataset, fixtures, images, tiny_model_dir};
use hostile::make::{self, Safetensors};
use hostile::{Case, check_all, copy_dir, s, with_flags};

const BIN: &str = env!("CARGO_BIN_EXE_clip-cls");

/// A copy of the model directory `model` named `name` under `work`, changed by `edit`.
fn variant(work: &Path, model: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = work.join(name);
    copy_dir(model, &dir);
    edit(&dir);
    dir
}

/// A copy of the PEFT LoRA fixture adapter (rank 4, both towers) named `name`, changed by `edit`.
fn adapter(work: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = work.join(name);
    copy_dir(&fixtures().join("clip-tiny/peft_lora"), &dir);
    edit(&dir);
    dir
}

#[test]
fn hostile_inputs_are_rejected_naming_the_culprit() {
    let model_tmp = tiny_model_dir();
    let model = model_tmp.path();
    let m = s(model);
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let out = w.join("out.safetensors");
    let o = s(&out);
    let png = images()[0].clone();
    let strings = |a: &[&str]| -> Vec<String> { a.iter().map(|x| x.to_string()).collect() };
    let embed = |extra: &[&str]| -> Vec<String> { strings(&[&["embed", "--model", m, "--output", o][..], extra].concat()) };
    let embed_image = |img: &Path| -> Vec<String> { embed(&["--images", s(img)]) };
    let embed_model = |dir: &Path| -> Vec<String> { strings(&["embed", "--model", s(dir), "--texts", "a", "--output", o]) };
    let embed_adapter = |dir: &Path| -> Vec<String> { embed(&["--adapter", s(dir), "--texts", "a"]) };

    let mut cases = Vec::new();

    // images
    let truncated = make::truncated(&png, &w.join("truncated.png"), 0.5);
    cases.push(Case::new("image: truncated PNG", &embed_image(&truncated), "truncated.png"));
    let zero = make::zero_byte(&w.join("zero.jpg"));
    cases.push(Case::new("image: zero bytes", &embed_image(&zero), "zero.jpg"));
    let text = make::text(&w.join("notes.png"), "this is not an image\n");
    cases.push(Case::new("image: text named .png", &embed_image(&text), "notes.png"));
    let huge = make::huge_png(&w.join("huge.png"), 100_000, 100_000);
    cases.push(Case::new("image: PNG header claims 100000x100000", &embed_image(&huge), "huge.png").memory_limited());
    let huge_jpg = make::huge_jpeg(&w.join("huge.jpg"), 65_000, 65_000);
    cases.push(Case::new("image: JPEG header claims 65000x65000", &embed_image(&huge_jpg), "huge.jpg").memory_limited());
    cases.push(Case::new("image: missing file", &embed_image(&w.join("absent.png")), "absent.png"));
    let dir_as_image = w.join("a-directory.png");
    std::fs::create_dir(&dir_as_image).unwrap();
    cases.push(Case::new("image: a directory", &embed_image(&dir_as_image), "a-directory.png"));
    let pipe = make::fifo(&w.join("pipe.png"));
    cases.push(Case::new("image: a named pipe (would block)", &embed_image(&pipe), "pipe.png").and("not a regular file"));

    // weights
    let weights = model.join("model.safetensors");
    let st = Safetensors::read(&weights);
    let proj = st.find("visual_projection", 2);
    let q = st.find("vision_model.encoder.layers.0.self_attn.q_proj.weight", 2);
    let d = variant(w, model, "weights-truncated", |d| {
        make::truncated(&weights, &d.join("model.safetensors"), 0.6);
    });
    cases.push(Case::new("weights: truncated", &embed_model(&d), "model.safetensors"));
    let d = variant(w, model, "weights-empty", |d| {
        make::zero_byte(&d.join("model.safetensors"));
    });
    cases.push(Case::new("weights: zero bytes", &embed_model(&d), "model.safetensors"));
    let d = variant(w, model, "weights-header-length", |d| {
        st.write_lying_length(&d.join("model.safetensors"), 1 << 40);
    });
    cases.push(Case::new("weights: header length claims 1 TiB", &embed_model(&d), "model.safetensors").memory_limited());
    let d = variant(w, model, "weights-header-shape", |d| {
        st.write_lying_shape(&d.join("model.safetensors"), &proj, &[100_000, 100_000]);
    });
    cases.push(Case::new("weights: header shape larger than data", &embed_model(&d), "model.safetensors").memory_limited());
    let d = variant(w, model, "weights-dtype", |d| {
        let mut st = st.clone();
        st.retype_i32(&q);
        st.write(&d.join("model.safetensors"));
    });
    cases.push(Case::new("weights: a tensor stored as I32", &embed_model(&d), "model.safetensors").and("q_proj"));
    let d = variant(w, model, "weights-missing", |d| {
        let mut st = st.clone();
        st.remove(&proj);
        st.write(&d.join("model.safetensors"));
    });
    cases.push(Case::new("weights: missing key", &embed_model(&d), "missing").and("visual_projection"));
    let d = variant(w, model, "weights-unexpected", |d| {
        let mut st = st.clone();
        let mut extra = st.get_mut(&proj).clone();
        extra.name = "vision_model.extra_head.weight".into();
        st.tensors.push(extra);
        st.write(&d.join("model.safetensors"));
    });
    cases.push(Case::new("weights: unexpected key", &embed_model(&d), "unexpected").and("vision_model.extra_head.weight"));
    let d = variant(w, model, "weights-shape", |d| {
        let mut st = st.clone();
        st.drop_row(&q);
        st.write(&d.join("model.safetensors"));
    });
    cases.push(Case::new("weights: wrong shape", &embed_model(&d), "q_proj"));

    // configs and tokenizer
    let d = variant(w, model, "config-truncated", |d| {
        make::truncated(&model.join("config.json"), &d.join("config.json"), 0.5);
    });
    cases.push(Case::new("config.json: truncated", &embed_model(&d), "config.json"));
    let d = variant(w, model, "config-type", |d| make::edit_json(&d.join("config.json"), |v| v["vision_config"]["hidden_size"] = "wide".into()));
    cases.push(Case::new("config.json: a string for hidden_size", &embed_model(&d), "config.json").and("wide"));
    let d = variant(w, model, "config-heads", |d| make::edit_json(&d.join("config.json"), |v| v["vision_config"]["num_attention_heads"] = 5.into()));
    cases.push(Case::new("config.json: heads do not divide width", &embed_model(&d), "config.json").and("num_attention_heads"));
    let d = variant(w, model, "config-zero-patch", |d| make::edit_json(&d.join("config.json"), |v| v["vision_config"]["patch_size"] = 0.into()));
    cases.push(Case::new("config.json: patch_size 0", &embed_model(&d), "config.json").and("patch_size"));
    let d = variant(w, model, "config-huge-image", |d| make::edit_json(&d.join("config.json"), |v| v["vision_config"]["image_size"] = 800_000.into()));
    cases.push(
        Case::new("config.json: image_size 800000 (a 10^10-entry position table)", &embed_model(&d), "config.json")
            .and("`vision_config.image_size")
            .and("position embedding")
            .memory_limited(),
    );
    // regression found by the fuzz suite (issue 17): 2^40 layers were allocated
    let d = variant(w, model, "regression-text-layers", |d| {
        make::edit_json(&d.join("config.json"), |v| v["text_config"]["num_hidden_layers"] = (1u64 << 40).into())
    });
    cases.push(
        Case::new("regression (issue 17): text_config.num_hidden_layers 2^40", &embed_model(&d), "config.json")
            .and("`text_config.num_hidden_layers`")
            .memory_limited(),
    );
    let d = variant(w, model, "preprocessor-crop", |d| {
        make::text(&d.join("preprocessor_config.json"), r#"{"crop_size": {"height": 48, "width": 48}, "size": {"shortest_edge": 48}}"#);
    });
    cases.push(Case::new("preprocessor_config.json: crop 48 for a 32-pixel model", &embed_model(&d), "preprocessor_config.json").and("crop_size"));
    let d = variant(w, model, "preprocessor-huge", |d| {
        make::text(&d.join("preprocessor_config.json"), r#"{"crop_size": 32, "size": {"shortest_edge": 3000000}}"#);
    });
    let mut args = embed_model(&d);
    args.extend(["--images".to_string(), s(&png).to_string()]);
    cases.push(Case::new("preprocessor_config.json: shortest_edge 3000000", &args, "preprocessor_config.json").and("shortest_edge").memory_limited());
    let d = variant(w, model, "vocab-truncated", |d| {
        make::truncated(&model.join("vocab.json"), &d.join("vocab.json"), 0.5);
    });
    cases.push(Case::new("tokenizer: truncated vocab.json", &embed_model(&d), "vocab.json"));

    // adapters
    let a = adapter(w, "adapter-other-model", |d| {
        let mut st = Safetensors::read(&d.join("adapter_model.safetensors"));
        for t in &mut st.tensors {
            t.name = t.name.replace("text_model.encoder.layers", "mask_decoder.transformer.layers");
        }
        st.write(&d.join("adapter_model.safetensors"));
    });
    cases.push(Case::new("adapter: for another model", &embed_adapter(&a), "adapter_model.safetensors").and("mask_decoder.transformer.layers"));
    let a = adapter(w, "adapter-other-rank", |d| make::edit_json(&d.join("adapter_config.json"), |v| v["r"] = 8.into()));
    cases.push(Case::new("adapter: config says rank 8, tensors rank 4", &embed_adapter(&a), "wrong shapes").and("lora_A"));
    let a = adapter(w, "adapter-other-method", |d| make::edit_json(&d.join("adapter_config.json"), |v| v["peft_type"] = "SERIAL_LORA".into()));
    cases.push(Case::new("adapter: LoRA tensors, Serial LoRA config", &embed_adapter(&a), "unexpected").and("lora_A"));
    let a = adapter(w, "adapter-unknown-type", |d| make::edit_json(&d.join("adapter_config.json"), |v| v["peft_type"] = "IA3".into()));
    cases.push(Case::new("adapter: peft_type IA3", &embed_adapter(&a), "IA3"));
    let a = adapter(w, "adapter-config-truncated", |d| {
        let f = d.join("adapter_config.json");
        make::truncated(&f.clone(), &f, 0.5);
    });
    cases.push(Case::new("adapter: truncated adapter_config.json", &embed_adapter(&a), "adapter_config.json"));
    let a = adapter(w, "adapter-rank-zero", |d| make::edit_json(&d.join("adapter_config.json"), |v| v["r"] = 0.into()));
    cases.push(Case::new("adapter: r = 0", &embed_adapter(&a), "adapter_config.json").and("rank"));
    let a = adapter(w, "adapter-rank-negative", |d| make::edit_json(&d.join("adapter_config.json"), |v| v["r"] = (-2).into()));
    cases.push(Case::new("adapter: r = -2", &embed_adapter(&a), "adapter_config.json").and("-2"));
    let a = adapter(w, "adapter-weights-truncated", |d| {
        let f = d.join("adapter_model.safetensors");
        make::truncated(&f.clone(), &f, 0.5);
    });
    cases.push(Case::new("adapter: truncated weights", &embed_adapter(&a), "adapter_model.safetensors"));
    let a = adapter(w, "adapter-nan", |d| {
        let mut st = Safetensors::read(&d.join("adapter_model.safetensors"));
        let k = st.find("lora_B", 2);
        st.get_mut(&k).data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        st.write(&d.join("adapter_model.safetensors"));
    });
    cases.push(Case::new("adapter: a NaN weight", &embed_adapter(&a), "non-finite").and("self_attn"));
    cases.push(Case::new("adapter: missing directory", &embed_adapter(&w.join("no-adapter")), "no-adapter"));

    // devices
    cases.push(Case::new("device: unknown", &embed(&["--texts", "a", "--device", "gpu"]), "gpu"));
    cases.push(Case::new("device: bad index", &embed(&["--texts", "a", "--device", "cuda:x"]), "cuda:x"));

    // training flags and datasets
    let data = w.join("data");
    colour_dataset(&data, 2, 1);
    // every training case gets its own --out (a case that wrongly succeeds must not mask others)
    let runs = std::cell::Cell::new(0);
    let run_dir = || {
        runs.set(runs.get() + 1);
        w.join(format!("run-{}", runs.get()))
    };
    let train_on = |data: &Path, extra: &[&str]| -> Vec<String> {
        let out_dir = run_dir();
        let base = ["train", "--model", m, "--dataset", s(data), "--method", "lora", "--rank", "2", "--iters", "1", "--batch", "2", "--out", s(&out_dir)];
        with_flags(&base, extra)
    };
    let train = |extra: &[&str]| -> Vec<String> { train_on(&data, extra) };
    for (name, flag, value, culprit) in [
        ("train: --rank 0", "--rank", "0", "rank"),
        ("train: --rank -3", "--rank", "-3", "--rank"),
        ("train: --lr 0", "--lr", "0", "lr"),
        ("train: --lr -0.001", "--lr", "-0.001", "lr"),
        ("train: --lr nan", "--lr", "nan", "lr"),
        ("train: --batch 0", "--batch", "0", "batch"),
        ("train: --batch -1", "--batch", "-1", "--batch"),
        ("train: --shots 0", "--shots", "0", "shots"),
        ("train: --shots -4", "--shots", "-4", "--shots"),
        ("train: --iters 0", "--iters", "0", "iters"),
        ("train: --alpha 0", "--alpha", "0", "alpha"),
        ("train: --dropout 1.5", "--dropout", "1.5", "dropout"),
        ("train: --lr-ratio -2", "--lr-ratio", "-2", "lr-ratio"),
        ("train: --method dora", "--method", "dora", "dora"),
        ("train: --params q,x", "--params", "q,x", "x"),
        ("train: --device tpu", "--device", "tpu", "tpu"),
        ("train: --devices cpu,tpu", "--devices", "cpu,tpu", "tpu"),
        ("train: --nodes 0", "--nodes", "0", "nodes"),
        ("train: --nodes 2 without --orchestrator", "--nodes", "2", "--orchestrator"),
    ] {
        cases.push(Case::new(name, &train(&[flag, value]), culprit));
    }
    for (name, extra, culprit) in [
        ("train: --node-rank 2 of 2", ["--nodes", "2", "--node-rank", "2", "--orchestrator", "127.0.0.1:29500"], "node-rank"),
        ("train: --orchestrator without a port", ["--nodes", "2", "--node-rank", "1", "--orchestrator", "node0"], "node0"),
    ] {
        cases.push(Case::new(name, &train(&extra), culprit));
    }
    let empty_class = w.join("data-empty-class");
    colour_dataset(&empty_class, 2, 0);
    std::fs::create_dir(empty_class.join("train/no_pictures")).unwrap();
    let with = |d: &Path| -> Vec<String> { train_on(d, &[]) };
    cases.push(Case::new("dataset: a class with no images", &with(&empty_class), "no_pictures").and("no images"));
    let coop = w.join("data-coop");
    std::fs::create_dir_all(coop.join("images")).unwrap();
    make::text(&coop.join("split_zhou_EuroSAT.json"), r#"{"train": [["a.png", 0, "#);
    cases.push(Case::new("dataset: truncated CoOp split JSON", &with(&coop), "split_zhou_EuroSAT.json"));
    let coop2 = w.join("data-coop-missing-image");
    std::fs::create_dir_all(coop2.join("images")).unwrap();
    make::text(&coop2.join("split_zhou_EuroSAT.json"), r#"{"train": [["gone/a.png", 0, "x"]]}"#);
    cases.push(Case::new("dataset: split names a missing image", &with(&coop2), "gone/a.png"));
    cases.push(Case::new("dataset: missing directory", &with(&w.join("no-data")), "no-data"));
    let bad_img_data = w.join("data-bad-image");
    colour_dataset(&bad_img_data, 2, 0);
    make::truncated(&bad_img_data.join("train/sky_blue/00.png"), &bad_img_data.join("train/sky_blue/00.png"), 0.3);
    cases.push(Case::new("dataset: a truncated training image", &with(&bad_img_data), "sky_blue/00.png"));
    cases.push(Case::new("eval: --split holdout", &["eval", "--model", m, "--dataset", s(&data), "--split", "holdout"], "holdout").and("test, train"));
    cases.push(Case::new("eval: --batch 0", &["eval", "--model", m, "--dataset", s(&data), "--batch", "0"], "batch"));

    // output paths
    cases.push(Case::new("output: missing directory", &["embed", "--model", m, "--texts", "a", "--output", s(&w.join("nowhere/o.safetensors"))], "nowhere"));
    let under = make::under_a_file(w, "o.safetensors");
    cases.push(Case::new("output: parent is a regular file", &["embed", "--model", m, "--texts", "a", "--output", s(&under)], "a-regular-file"));
    let under_run = make::under_a_file(&w.join("data"), "run");
    let mut t = train(&[]);
    let last = t.len() - 1;
    t[last] = s(&under_run).to_string();
    cases.push(Case::new("train: --out under a regular file", &t, "a-regular-file"));

    // a run directory damaged between invocations, continued with --resume
    let run = w.join("run-to-damage");
    let mut first = train(&["--iters", "3", "--save-steps", "1"]);
    first.iter_mut().filter(|a| a.contains("/run-")).for_each(|a| *a = s(&run).to_string());
    let mut first_run = first.clone();
    first_run.extend(["--stop-after".to_string(), "1".to_string()]);
    let made = hostile::run(BIN, &first_run, &[], false, hostile::TIME_LIMIT);
    assert_eq!(made.code, Some(0), "{}", made.stderr);
    for (i, name, file, keep) in [
        ("resume: truncated checkpoint/state.json", "checkpoint/state.json", 0.5),
        ("resume: truncated checkpoint/optimizer.mpk", "checkpoint/optimizer.mpk", 0.5),
        ("resume: truncated checkpoint adapter", "checkpoint/adapter_model.safetensors", 0.5),
        ("resume: truncated train_config.json", "train_config.json", 0.5),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, c)| (i, c.0, c.1, c.2))
    {
        let d = w.join(format!("damaged-run-{i}"));
        copy_dir(&run, &d);
        make::truncated(&run.join(file), &d.join(file), keep);
        let mut args: Vec<String> = first.iter().map(|a| if *a == s(&run) { s(&d).to_string() } else { a.clone() }).collect();
        args.push("--resume".into());
        cases.push(Case::new(name, &args, file.rsplit('/').next().unwrap_or(file)).and(s(&d)));
    }

    // hub
    let home = w.join("hf-home");
    std::fs::create_dir(&home).unwrap();
    cases.push(
        Case::new(
            "hub: id offline with an empty cache",
            &["embed", "--model", "openai/clip-vit-base-patch16", "--texts", "a", "--output", o],
            "openai/clip-vit-base-patch16",
        )
        .and("HF_HUB_OFFLINE")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", &home),
    );
    cases.push(Case::new("hub: neither a directory nor an id", &embed_model(Path::new("no/such/model/dir")), "no/such/model/dir"));

    assert!(cases.len() >= 25);
    check_all(BIN, &cases);
}

/// Valid images in unusual formats are accepted and converted (the PIL-exactness of the
/// conversion is checked in serial-lora's `tests/hostile.rs`).
#[test]
fn unusual_but_valid_images_are_embedded() {
    let model = tiny_model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let dir = fixtures().join("unusual-images");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg")).collect();
    files.sort();
    assert!(files.len() >= 9, "{files:?}");
    let mut args = vec!["embed".to_string(), "--model".into(), s(model.path()).into(), "--output".into(), s(&out).into(), "--images".into()];
    args.extend(files.iter().map(|p| s(p).to_string()));
    let o = hostile::run(BIN, &args, &[], false, hostile::TIME_LIMIT);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let (t, _) = serial_lora::io::read_safetensors(&out).unwrap();
    assert_eq!(t["image_embeds"].shape, vec![files.len(), 16]);
    assert!(t["image_embeds"].data.iter().all(|v| v.is_finite()));
}
