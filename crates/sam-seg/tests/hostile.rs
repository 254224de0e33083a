//! The hostile-input corpus (`tests/common/hostile.rs`) against the `sam-seg` binary: bad images
//! and masks, weights, configs, adapters, flags, datasets, output paths and hub ids fail with an
//! error naming the culprit — no panic, no hang, no huge allocation.
mod common;
#[path = "../../../tests/common/hostile.rs"]
mod hostile;

use std::path::{Path, PathBuf};

use common::{fixtures, squares as dataset};
use hostile::make::{self, Safetensors};
use hostile::{Case, check_all, copy_dir, s, with_flags};

const BIN: &str = env!("CARGO_BIN_EXE_sam-seg");

#[test]
fn hostile_inputs_are_rejected_naming_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let model = w.join("model");
    copy_dir(&fixtures().join("sam-tiny"), &model);
    let m = s(&model);
    let image = fixtures().join("clip-images/rgb_61x47.png");
    let out = w.join("o.safetensors");
    let o = s(&out);
    let predict = |model: &str, image: &Path, extra: &[&str]| -> Vec<String> {
        with_flags(&["predict", "--model", model, "--image", s(image), "--box", "5,6,40,30", "--output", o], extra)
    };
    let variant = |name: &str, edit: &dyn Fn(&Path)| -> PathBuf {
        let d = w.join(name);
        copy_dir(&model, &d);
        edit(&d);
        d
    };
    let mut cases = Vec::new();

    // images
    let t = make::truncated(&image, &w.join("truncated.png"), 0.5);
    cases.push(Case::new("image: truncated PNG", &predict(m, &t, &[]), "truncated.png"));
    let z = make::zero_byte(&w.join("zero.png"));
    cases.push(Case::new("image: zero bytes", &predict(m, &z, &[]), "zero.png"));
    let x = make::text(&w.join("text.jpg"), "GIF89a? no.");
    cases.push(Case::new("image: text named .jpg", &predict(m, &x, &[]), "text.jpg"));
    let h = make::huge_png(&w.join("huge.png"), 100_000, 100_000);
    cases.push(Case::new("image: PNG header claims 100000x100000", &predict(m, &h, &[]), "huge.png").memory_limited());

    // weights
    let weights = model.join("model.safetensors");
    let st = Safetensors::read(&weights);
    let qkv = st.find("vision_encoder.layers.0.attn.qkv.weight", 2);
    let d = variant("weights-truncated", &|d| {
        make::truncated(&weights, &d.join("model.safetensors"), 0.5);
    });
    cases.push(Case::new("weights: truncated", &predict(s(&d), &image, &[]), "model.safetensors"));
    let d = variant("weights-header-length", &|d| {
        st.write_lying_length(&d.join("model.safetensors"), u64::MAX / 2);
    });
    cases.push(Case::new("weights: header length claims 4 EiB", &predict(s(&d), &image, &[]), "model.safetensors").memory_limited());
    let d = variant("weights-header-shape", &|d| {
        st.write_lying_shape(&d.join("model.safetensors"), &qkv, &[96, 1 << 30]);
    });
    cases.push(Case::new("weights: header shape larger than data", &predict(s(&d), &image, &[]), "model.safetensors").memory_limited());
    let d = variant("weights-missing", &|d| {
        let mut st = st.clone();
        st.remove(&qkv);
        st.write(&d.join("model.safetensors"));
    });
    cases.push(Case::new("weights: missing key", &predict(s(&d), &image, &[]), "missing").and("qkv"));
    let d = variant("weights-shape", &|d| {
        let mut st = st.clone();
        st.drop_row(&qkv);
        st.write(&d.join("model.safetensors"));
    });
    cases.push(Case::new("weights: wrong shape", &predict(s(&d), &image, &[]), "qkv"));
    let d = variant("weights-dtype", &|d| {
        let mut st = st.clone();
        st.retype_i32(&qkv);
        st.write(&d.join("model.safetensors"));
    });
    cases.push(Case::new("weights: a tensor stored as I32", &predict(s(&d), &image, &[]), "qkv"));

    // config
    let d = variant("config-truncated", &|d| {
        make::truncated(&model.join("config.json"), &d.join("config.json"), 0.4);
    });
    cases.push(Case::new("config.json: truncated", &predict(s(&d), &image, &[]), "config.json"));
    let d = variant("config-global", &|d| make::edit_json(&d.join("config.json"), |v| v["vision_config"]["global_attn_indexes"] = serde_json::json!([1, 9])));
    cases.push(Case::new("config.json: global_attn_indexes beyond the layers", &predict(s(&d), &image, &[]), "config.json").and("global_attn_indexes"));
    let d = variant("config-type", &|d| make::edit_json(&d.join("config.json"), |v| v["vision_config"]["patch_size"] = serde_json::json!(-8)));
    cases.push(Case::new("config.json: patch_size -8", &predict(s(&d), &image, &[]), "config.json").and("-8"));

    let d = variant("config-huge-image", &|d| {
        make::edit_json(&d.join("config.json"), |v| {
            v["vision_config"]["image_size"] = 524_288.into();
            v["prompt_encoder_config"]["image_size"] = 524_288.into();
            v["prompt_encoder_config"]["image_embedding_size"] = 65_536.into();
        })
    });
    cases.push(
        Case::new("config.json: image_size 524288 (a 2^32-entry position table)", &predict(s(&d), &image, &[]), "config.json")
            .and("`vision_config.image_size")
            .and("position embedding")
            .memory_limited(),
    );
    // regressions found by the fuzz suite (issue 17): a divide by zero formatting the error, an
    // error without the field, an allocation of 2^40 blocks
    for (name, section, field, value) in [
        ("regression (issue 17): vision_config.patch_size 0", "vision_config", "patch_size", serde_json::json!(0)),
        ("regression (issue 17): prompt_encoder_config.patch_size 0", "prompt_encoder_config", "patch_size", serde_json::json!(0)),
        ("regression (issue 17): vision_config.window_size -3", "vision_config", "window_size", serde_json::json!(-3)),
        ("regression (issue 17): mask_decoder_config.iou_head_depth 2^40", "mask_decoder_config", "iou_head_depth", serde_json::json!(1u64 << 40)),
    ] {
        let d = variant(&format!("regression-{section}-{field}"), &|d| make::edit_json(&d.join("config.json"), |v| v[section][field] = value.clone()));
        cases.push(Case::new(name, &predict(s(&d), &image, &[]), "config.json").and(format!("`{section}.{field}`")).memory_limited());
    }

    // adapters
    let clip_adapter = fixtures().join("clip-tiny/peft_lora");
    cases.push(Case::new("adapter: CLIP's adapter on SAM", &predict(m, &image, &["--adapter", s(&clip_adapter)]), "unexpected").and("text_model"));
    let a = w.join("adapter-bad-json");
    copy_dir(&clip_adapter, &a);
    make::text(&a.join("adapter_config.json"), "{\"peft_type\": \"LORA\", \"r\": 4,");
    cases.push(Case::new("adapter: malformed adapter_config.json", &predict(m, &image, &["--adapter", s(&a)]), "adapter_config.json"));

    // flags
    cases.push(Case::new("device: unknown", &predict(m, &image, &["--device", "gpu:0"]), "gpu:0"));
    cases.push(Case::new("--image-size not a multiple of the patch", &predict(m, &image, &["--image-size", "30"]), "30"));
    cases.push(Case::new("--image-size 0", &predict(m, &image, &["--image-size", "0"]), "image"));
    cases.push(Case::new("--box with 3 numbers", &predict(m, &image, &["--box", "1,2,3"]), "1,2,3"));

    // outputs
    cases.push(Case::new(
        "output: missing directory",
        &["predict", "--model", m, "--image", s(&image), "--box", "5,6,40,30", "--output", s(&w.join("nowhere/o.safetensors"))],
        "nowhere",
    ));
    let under = make::under_a_file(w, "o.safetensors");
    cases.push(Case::new(
        "output: parent is a regular file",
        &["predict", "--model", m, "--image", s(&image), "--box", "5,6,40,30", "--output", s(&under)],
        "a-regular-file",
    ));
    let png_under = w.join("a-regular-file/mask.png");
    cases.push(Case::new("--mask-png: parent is a regular file", &predict(m, &image, &["--mask-png", s(&png_under)]), "a-regular-file"));

    // training and datasets
    let shapes = fixtures().join("sam-tiny-shapes");
    let data = w.join("data");
    dataset(&data, 4);
    // every training case gets its own --out (a case that wrongly succeeds must not mask others)
    let runs = std::cell::Cell::new(0);
    let run_dir = || {
        runs.set(runs.get() + 1);
        w.join(format!("run-{}", runs.get()))
    };
    let train_on = |data: &Path, extra: &[&str]| -> Vec<String> {
        let out_dir = run_dir();
        let base = [
            "train",
            "--model",
            s(&shapes),
            "--dataset",
            s(data),
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
            s(&out_dir),
        ];
        with_flags(&base, extra)
    };
    for (name, flag, value, culprit) in [
        ("train: --rank 0", "--rank", "0", "rank"),
        ("train: --lr 0", "--lr", "0", "lr"),
        ("train: --lr inf", "--lr", "inf", "lr"),
        ("train: --batch 0", "--batch", "0", "batch"),
        ("train: --fraction 0", "--fraction", "0", "fraction"),
        ("train: --fraction 1.5", "--fraction", "1.5", "fraction"),
        ("train: --box-jitter 2", "--box-jitter", "2", "box-jitter"),
        ("train: --class-id 300", "--class-id", "300", "--class-id"),
        ("train: --method ia3", "--method", "ia3", "ia3"),
        ("train: --dropout -0.1", "--dropout", "-0.1", "dropout"),
        ("train: --image-size 33", "--image-size", "33", "33"),
    ] {
        cases.push(Case::new(name, &train_on(&data, &[flag, value]), culprit));
    }
    let bad = |name: &str, edit: &dyn Fn(&Path)| -> PathBuf {
        let d = w.join(name);
        dataset(&d, 4);
        edit(&d);
        d
    };
    let d = bad("data-split-json", &|d| {
        make::text(&d.join("split.json"), "{\"train\": [\"00\", ");
    });
    cases.push(Case::new("dataset: malformed split.json", &train_on(&d, &[]), "split.json"));
    let d = bad("data-split-stem", &|d| {
        make::text(&d.join("split.json"), r#"{"train": ["00", "ghost"], "test": ["03"]}"#);
    });
    cases.push(Case::new("dataset: split.json names a missing stem", &train_on(&d, &[]), "ghost"));
    let d = bad("data-mask-empty-file", &|d| {
        make::zero_byte(&d.join("masks/01.png"));
    });
    cases.push(Case::new("dataset: zero-byte mask", &train_on(&d, &[]), "masks/01.png"));
    let d = bad("data-mask-huge", &|d| {
        make::huge_png(&d.join("masks/02.png"), 100_000, 100_000);
    });
    cases.push(Case::new("dataset: mask header claims 100000x100000", &train_on(&d, &[]), "masks/02.png").memory_limited());
    let d = bad("data-image-truncated", &|d| {
        let p = d.join("images/00.png");
        make::truncated(&p.clone(), &p, 0.3);
    });
    cases.push(Case::new("dataset: truncated image", &train_on(&d, &[]), "images/00.png"));
    let d = w.join("data-no-images");
    std::fs::create_dir_all(d.join("images")).unwrap();
    std::fs::create_dir_all(d.join("masks")).unwrap();
    cases.push(Case::new("dataset: no images", &train_on(&d, &[]), "images").and("no images"));
    let d = bad("data-all-empty-masks", &|d| {
        for i in 0..4 {
            image::GrayImage::new(32, 32).save(d.join(format!("masks/{i:02}.png"))).unwrap();
        }
    });
    cases.push(Case::new("dataset: every mask empty", &train_on(&d, &[]), "no training mask has an object"));
    let mut t = train_on(&data, &[]);
    let i = t.iter().position(|a| a == "--out").unwrap() + 1;
    t[i] = s(&make::under_a_file(&w.join("data"), "run")).into();
    cases.push(Case::new("train: --out under a regular file", &t, "a-regular-file"));
    cases.push(Case::new("eval: --split nope", &["eval", "--model", s(&shapes), "--dataset", s(&data), "--split", "nope"], "nope").and("train"));

    // hub
    let home = w.join("hf-home");
    std::fs::create_dir(&home).unwrap();
    cases.push(
        Case::new("hub: id offline with an empty cache", &predict("facebook/sam-vit-base", &image, &[]), "facebook/sam-vit-base")
            .and("HF_HUB_OFFLINE")
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", &home),
    );

    assert!(cases.len() >= 25);
    check_all(BIN, &cases);
}
