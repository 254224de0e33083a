//! The hostile-input corpus (`tests/common/hostile.rs`) against `sd3-gen sample`: bad weights,
//! configs, adapters, embeddings and latents files, flags, output paths and hub ids fail with
//! an error naming the culprit — no panic, no hang, no huge allocation.
#[path = "../../../tests/common/hostile.rs"]
mod hostile;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hostile::make::{self, Safetensors};
use hostile::{Case, check_all, copy_dir, s, with_flags};
use serial_lora::io::{HostTensor, read_safetensors, write_safetensors};

const BIN: &str = env!("CARGO_BIN_EXE_sd3-gen");

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn hostile_inputs_are_rejected_naming_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let model = w.join("model");
    for sub in ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"] {
        copy_dir(&fixtures().join("sd3-tiny").join(sub), &model.join(sub));
    }
    let m = s(&model);
    // the pipeline inputs of the fixture as the CLI's embeddings and latents files
    let (r, _) = read_safetensors(&fixtures().join("sd3-tiny/reference.safetensors")).unwrap();
    let names = ["prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"];
    let embeds_map: BTreeMap<String, HostTensor> = names.iter().map(|k| (k.to_string(), r[&format!("pipe.{k}")].clone())).collect();
    let embeds = w.join("embeds.safetensors");
    write_safetensors(&embeds, &embeds_map, Default::default()).unwrap();
    let latents = w.join("latents.safetensors");
    write_safetensors(&latents, &BTreeMap::from([("latents".to_string(), r["pipe.latents"].clone())]), Default::default()).unwrap();
    let png = w.join("img.png");
    let sample = |model: &str, embeds: &Path, extra: &[&str]| -> Vec<String> {
        let base = [
            "sample",
            "--model",
            model,
            "--prompt-embeds",
            s(embeds),
            "--latents",
            s(&latents),
            "--steps",
            "1",
            "--height",
            "16",
            "--width",
            "12",
            "--output",
            s(&png),
        ];
        with_flags(&base, extra)
    };
    let ok = |extra: &[&str]| sample(m, &embeds, extra);
    let variant = |name: &str, edit: &dyn Fn(&Path)| -> PathBuf {
        let d = w.join(name);
        copy_dir(&model, &d);
        edit(&d);
        d
    };
    let mut cases = Vec::new();

    // weights and configs
    let tw = model.join("transformer/diffusion_pytorch_model.safetensors");
    let st = Safetensors::read(&tw);
    let key = st.find("transformer_blocks.0.attn.to_q.weight", 2);
    let d = variant("transformer-truncated", &|d| {
        make::truncated(&tw, &d.join("transformer/diffusion_pytorch_model.safetensors"), 0.5);
    });
    cases.push(Case::new("transformer weights: truncated", &sample(s(&d), &embeds, &[]), "diffusion_pytorch_model.safetensors"));
    let d = variant("transformer-missing", &|d| {
        let mut st = st.clone();
        st.remove(&key);
        st.write(&d.join("transformer/diffusion_pytorch_model.safetensors"));
    });
    cases.push(Case::new("transformer weights: missing key", &sample(s(&d), &embeds, &[]), "missing").and("transformer_blocks.0.attn"));
    let d = variant("transformer-lying", &|d| {
        st.write_lying_shape(&d.join("transformer/diffusion_pytorch_model.safetensors"), &key, &[1 << 16, 1 << 16]);
    });
    cases.push(
        Case::new("transformer weights: header shape larger than data", &sample(s(&d), &embeds, &[]), "diffusion_pytorch_model.safetensors").memory_limited(),
    );
    let d = variant("transformer-config-huge", &|d| make::edit_json(&d.join("transformer/config.json"), |v| v["pos_embed_max_size"] = 300_000.into()));
    cases.push(
        Case::new("transformer/config.json: pos_embed_max_size 300000", &sample(s(&d), &embeds, &[]), "transformer/config.json")
            .and("`pos_embed_max_size")
            .memory_limited(),
    );
    // regressions found by the fuzz suite (issue 17): Burn's GroupNorm asserting channels
    // divisible by the groups (or dividing by 0 groups), overflowing products, 2^40 blocks
    let huge = serde_json::json!(1u64 << 40);
    for (name, file, field, value, culprit) in [
        ("regression (issue 17): vae block_out_channels[0] 1", "vae/config.json", "block_out_channels", serde_json::json!([1, 32]), "`block_out_channels[0]`"),
        ("regression (issue 17): vae norm_num_groups 0", "vae/config.json", "norm_num_groups", serde_json::json!(0), "`norm_num_groups`"),
        (
            "regression (issue 17): transformer num_attention_heads 2^40",
            "transformer/config.json",
            "num_attention_heads",
            huge.clone(),
            "`num_attention_heads`",
        ),
        ("regression (issue 17): transformer patch_size 2^40", "transformer/config.json", "patch_size", huge.clone(), "`patch_size`"),
        ("regression (issue 17): transformer num_layers 2^40", "transformer/config.json", "num_layers", huge.clone(), "`num_layers`"),
    ] {
        let d = variant(&format!("regression-{}", name.rsplit(": ").next().unwrap_or(name).replace([' ', '[', ']', '^'], "-")), &|d| {
            make::edit_json(&d.join(file), |v| v[field] = value.clone())
        });
        cases.push(Case::new(name, &sample(s(&d), &embeds, &[]), file).and(culprit).memory_limited());
    }
    let vw = model.join("vae/diffusion_pytorch_model.safetensors");
    let vst = Safetensors::read(&vw);
    let vkey = vst.find("decoder.conv_in.weight", 4);
    let d = variant("vae-shape", &|d| {
        let mut st = vst.clone();
        st.drop_row(&vkey);
        st.write(&d.join("vae/diffusion_pytorch_model.safetensors"));
    });
    cases.push(Case::new("VAE weights: wrong shape", &sample(s(&d), &embeds, &[]), "conv_in"));
    let d = variant("vae-dtype", &|d| {
        let mut st = vst.clone();
        st.retype_i32(&vkey);
        st.write(&d.join("vae/diffusion_pytorch_model.safetensors"));
    });
    cases.push(Case::new("VAE weights: a tensor stored as I32", &sample(s(&d), &embeds, &[]), "conv_in"));
    let d = variant("transformer-config", &|d| {
        make::truncated(&model.join("transformer/config.json"), &d.join("transformer/config.json"), 0.5);
    });
    cases.push(Case::new("transformer/config.json: truncated", &sample(s(&d), &embeds, &[]), "transformer/config.json"));
    let d = variant("transformer-config-heads", &|d| make::edit_json(&d.join("transformer/config.json"), |v| v["num_attention_heads"] = 0.into()));
    cases.push(Case::new("transformer/config.json: 0 heads", &sample(s(&d), &embeds, &[]), "transformer/config.json").and("num_attention_heads"));
    let d = variant("vae-config", &|d| make::edit_json(&d.join("vae/config.json"), |v| v["block_out_channels"] = serde_json::json!([])));
    cases.push(Case::new("vae/config.json: no blocks", &sample(s(&d), &embeds, &[]), "vae/config.json").and("block_out_channels"));
    let d = variant("scheduler-config", &|d| {
        std::fs::create_dir_all(d.join("scheduler")).unwrap();
        make::text(&d.join("scheduler/scheduler_config.json"), "{\"shift\": ");
    });
    cases.push(Case::new("scheduler_config.json: truncated", &sample(s(&d), &embeds, &[]), "scheduler_config.json"));
    let d = variant("scheduler-shift", &|d| {
        std::fs::create_dir_all(d.join("scheduler")).unwrap();
        make::text(&d.join("scheduler/scheduler_config.json"), "{\"shift\": -3.0}");
    });
    cases.push(Case::new("scheduler_config.json: negative shift", &sample(s(&d), &embeds, &[]), "shift"));

    // embeddings and latents
    let e = make::truncated(&embeds, &w.join("embeds-truncated.safetensors"), 0.5);
    cases.push(Case::new("--prompt-embeds: truncated", &sample(m, &e, &[]), "embeds-truncated.safetensors"));
    let e = make::zero_byte(&w.join("embeds-empty.safetensors"));
    cases.push(Case::new("--prompt-embeds: zero bytes", &sample(m, &e, &[]), "embeds-empty.safetensors"));
    let est = Safetensors::read(&embeds);
    let mut int = est.clone();
    int.retype_i32("pooled_prompt_embeds");
    let e = int.write(&w.join("embeds-int.safetensors"));
    cases.push(Case::new("--prompt-embeds: I32 tensor", &sample(m, &e, &[]), "pooled_prompt_embeds"));
    let reshape = |name: &str, key: &str, t: HostTensor| -> PathBuf {
        let mut map = embeds_map.clone();
        map.insert(key.into(), t);
        let p = w.join(name);
        write_safetensors(&p, &map, Default::default()).unwrap();
        p
    };
    let pe = &embeds_map["prompt_embeds"];
    let e = reshape("embeds-width.safetensors", "prompt_embeds", HostTensor { shape: vec![1, 5, 6], data: pe.data[..30].to_vec() });
    cases.push(Case::new("--prompt-embeds: width 6 for joint_attention_dim 12", &sample(m, &e, &[]), "prompt_embeds").and("12"));
    let pp = &embeds_map["pooled_prompt_embeds"];
    let e = reshape("embeds-pooled.safetensors", "pooled_prompt_embeds", HostTensor { shape: vec![1, 5], data: pp.data[..5].to_vec() });
    cases.push(Case::new("--prompt-embeds: pooled width 5 for 10", &sample(m, &e, &[]), "pooled_prompt_embeds").and("10"));
    let ne = &embeds_map["negative_prompt_embeds"];
    let e =
        reshape("embeds-batch.safetensors", "negative_prompt_embeds", HostTensor { shape: vec![2, 5, 12], data: [ne.data.clone(), ne.data.clone()].concat() });
    cases.push(Case::new("--prompt-embeds: negative batch 2 for 1 prompt", &sample(m, &e, &[]), "negative_prompt_embeds"));
    let mut nan = embeds_map.clone();
    nan.get_mut("prompt_embeds").unwrap().data[3] = f32::NAN;
    let e = w.join("embeds-nan.safetensors");
    write_safetensors(&e, &nan, Default::default()).unwrap();
    cases.push(Case::new("--prompt-embeds: a NaN", &sample(m, &e, &[]), "prompt_embeds").and("finite"));
    let f = make::fifo(&w.join("embeds-pipe.safetensors"));
    cases.push(Case::new("--prompt-embeds: a named pipe (would block)", &sample(m, &f, &[]), "embeds-pipe.safetensors").and("not a regular file"));
    let l = make::truncated(&latents, &w.join("latents-truncated.safetensors"), 0.5);
    cases.push(Case::new("--latents: truncated", &sample(m, &embeds, &["--latents", s(&l)]), "latents-truncated.safetensors"));

    // flags
    for (name, flag, value, culprit) in [
        ("--steps 0", "--steps", "0", "steps"),
        ("--steps -2", "--steps", "-2", "--steps"),
        ("--guidance nan", "--guidance", "nan", "guidance"),
        ("--guidance -1", "--guidance", "-1", "guidance"),
        ("--height 0", "--height", "0", "height"),
        ("--width 0", "--width", "0", "width"),
        ("--device gpu", "--device", "gpu", "gpu"),
    ] {
        cases.push(Case::new(name, &ok(&[flag, value]), culprit));
    }
    cases.push(Case::new(
        "--prompt-file missing",
        &["sample", "--model", m, "--prompt-file", s(&w.join("prompts.txt")), "--no-t5", "--output", s(&png)],
        "prompts.txt",
    ));

    // adapters
    let clip_adapter = fixtures().join("clip-tiny/peft_lora");
    cases.push(Case::new("adapter: CLIP's adapter on the MMDiT", &ok(&["--adapter", s(&clip_adapter)]), "adapter_model.safetensors"));
    let a = w.join("lora-truncated");
    std::fs::create_dir(&a).unwrap();
    make::truncated(&fixtures().join("sd3-tiny/lora/pytorch_lora_weights.safetensors"), &a.join("pytorch_lora_weights.safetensors"), 0.5);
    cases.push(Case::new("adapter: truncated diffusers LoRA", &ok(&["--adapter", s(&a)]), "pytorch_lora_weights.safetensors"));

    // outputs
    cases.push(Case::new("--output: missing directory", &ok(&["--output", s(&w.join("nowhere/img.png"))]), "nowhere"));
    let under = make::under_a_file(w, "img.png");
    cases.push(Case::new("--output: parent is a regular file", &ok(&["--output", s(&under)]), "a-regular-file"));
    cases.push(Case::new(
        "--output-latents: parent is a regular file",
        &ok(&["--output-latents", s(&w.join("a-regular-file/l.safetensors"))]),
        "a-regular-file",
    ));
    cases.push(Case::new(
        "--save-prompt-embeds: parent is a regular file",
        &[
            "sample",
            "--model",
            m,
            "--prompt",
            "a cat",
            "--no-t5",
            "--max-sequence-length",
            "3",
            "--steps",
            "1",
            "--height",
            "16",
            "--width",
            "12",
            "--save-prompt-embeds",
            s(&w.join("a-regular-file/e.safetensors")),
            "--output",
            s(&png),
        ],
        "a-regular-file",
    ));

    // hub
    let home = w.join("hf-home");
    std::fs::create_dir(&home).unwrap();
    cases.push(
        Case::new(
            "hub: id offline with an empty cache",
            &sample("stabilityai/stable-diffusion-3-medium-diffusers", &embeds, &[]),
            "stabilityai/stable-diffusion-3-medium-diffusers",
        )
        .and("HF_HUB_OFFLINE")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", &home),
    );

    assert!(cases.len() >= 25);
    check_all(BIN, &cases);
}
