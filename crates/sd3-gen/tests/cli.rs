//! `sd3-gen sample` on the tiny fixture: from given embeddings and latents the final latents
//! equal diffusers' pipeline output, the image is written, and bad input is named.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serial_lora::io::{HostTensor, read_safetensors, write_safetensors};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sd3-tiny")
}

fn sd3(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sd3-gen")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes the fixture's pipeline inputs (`pipe.*`) as the CLI's embeddings and latents files.
fn inputs(tmp: &Path) -> (PathBuf, PathBuf, BTreeMap<String, HostTensor>) {
    let (r, _) = read_safetensors(&dir().join("reference.safetensors")).unwrap();
    let pick = |keys: &[&str]| keys.iter().map(|k| (k.to_string(), r[&format!("pipe.{k}")].clone())).collect::<BTreeMap<_, _>>();
    let embeds = tmp.join("embeds.safetensors");
    let names = ["prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"];
    write_safetensors(&embeds, &pick(&names), Default::default()).unwrap();
    let latents = tmp.join("latents.safetensors");
    write_safetensors(&latents, &pick(&["latents"]), Default::default()).unwrap();
    (embeds, latents, r)
}

#[test]
fn sample_from_embeddings_and_latents_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let (embeds, latents, r) = inputs(tmp.path());
    let (out, png) = (tmp.path().join("out.safetensors"), tmp.path().join("img.png"));
    let (ok, err) = sd3(&[
        "sample",
        "--model",
        s(&dir()),
        "--prompt-embeds",
        s(&embeds),
        "--latents",
        s(&latents),
        "--steps",
        "4",
        "--guidance",
        "7",
        "--height",
        "16",
        "--width",
        "12",
        "--output-latents",
        s(&out),
        "--output",
        s(&png),
    ]);
    assert!(ok, "{err}");
    let got = &read_safetensors(&out).unwrap().0["latents"];
    let want = &r["pipe.output_latents"];
    assert_eq!(got.shape, want.shape);
    let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got.data.iter().zip(&want.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
    println!("final latents rel err {err:.2e}");
    assert!(err < 1e-5, "{err}");
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (12, 16));
}

#[test]
fn bad_input_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (embeds, latents, _) = inputs(tmp.path());
    let png = tmp.path().join("img.png");
    let model = dir();
    let base = ["sample", "--model", s(&model), "--steps", "1", "--output", s(&png)];
    let mut partial = read_safetensors(&embeds).unwrap().0;
    partial.remove("negative_pooled_prompt_embeds");
    let partial_file = tmp.path().join("partial.safetensors");
    write_safetensors(&partial_file, &partial, Default::default()).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--prompt-embeds", s(&partial_file), "--height", "16", "--width", "12"], "no tensor `negative_pooled_prompt_embeds`"),
        (vec!["--prompt-embeds", s(&embeds), "--latents", s(&latents), "--height", "16", "--width", "16"], "needs [1, 4, 8, 8]"),
        (vec!["--prompt-embeds", s(&embeds), "--height", "15", "--width", "12"], "multiples of 4"),
    ];
    for (extra, want) in cases {
        let (ok, err) = sd3(&[&base[..], &extra[..]].concat());
        assert!(!ok && err.contains(want) && !err.contains("panicked"), "{extra:?}: {err}");
    }
}

#[test]
fn sample_from_a_prompt_without_t5() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, png) = (tmp.path().join("out.safetensors"), tmp.path().join("cat.png"));
    let model = dir();
    let args = [
        "sample",
        "--model",
        s(&model),
        "--prompt",
        "a photo of a cat",
        "--prompt",
        "two dogs",
        "--no-t5",
        "--max-sequence-length",
        "3",
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "12",
        "--seed",
        "4",
        "--output-latents",
        s(&out),
        "--output",
        s(&png),
    ];
    let (ok, err) = sd3(&args);
    assert!(ok, "{err}");
    assert_eq!(read_safetensors(&out).unwrap().0["latents"].shape, [2, 4, 8, 6]);
    for i in 0..2 {
        let img = image::open(tmp.path().join(format!("cat-{i}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (12, 16));
    }
    // the same from a prompt file, and the embeddings cached for --prompt-embeds
    let (file, cache) = (tmp.path().join("prompts.txt"), tmp.path().join("embeds.safetensors"));
    std::fs::write(&file, "a photo of a cat\n\ntwo dogs\n").unwrap();
    let from_file = tmp.path().join("from_file.safetensors");
    let (ok, err) = sd3(&[
        "sample",
        "--model",
        s(&model),
        "--prompt-file",
        s(&file),
        "--no-t5",
        "--max-sequence-length",
        "3",
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "12",
        "--seed",
        "4",
        "--save-prompt-embeds",
        s(&cache),
        "--output-latents",
        s(&from_file),
        "--output",
        s(&png),
    ]);
    assert!(ok, "{err}");
    assert_eq!(read_safetensors(&out).unwrap().0["latents"].data, read_safetensors(&from_file).unwrap().0["latents"].data);
    let cached = tmp.path().join("cached.safetensors");
    let (ok, err) = sd3(&[
        "sample",
        "--model",
        s(&model),
        "--prompt-embeds",
        s(&cache),
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "12",
        "--seed",
        "4",
        "--output-latents",
        s(&cached),
        "--output",
        s(&png),
    ]);
    assert!(ok, "{err}");
    assert_eq!(read_safetensors(&out).unwrap().0["latents"].data, read_safetensors(&cached).unwrap().0["latents"].data);
    // the same seed gives the same latents
    let again = tmp.path().join("again.safetensors");
    let args2: Vec<&str> = args.iter().map(|a| if *a == s(&out) { s(&again) } else { a }).collect();
    assert!(sd3(&args2).0);
    assert_eq!(read_safetensors(&out).unwrap().0["latents"].data, read_safetensors(&again).unwrap().0["latents"].data);
}

#[test]
fn sample_from_prompts_with_t5_gives_the_diffusers_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, png) = (tmp.path().join("embeds.safetensors"), tmp.path().join("img.png"));
    let model = dir();
    let (ok, err) = sd3(&[
        "sample",
        "--model",
        s(&model),
        "--prompt",
        "a photo of a cat",
        "--prompt",
        "two dogs, playing!",
        "--prompt",
        "a painting of a castle on a hill at sunset, fine art",
        "--max-sequence-length",
        "6",
        "--steps",
        "1",
        "--height",
        "8",
        "--width",
        "8",
        "--save-prompt-embeds",
        s(&cache),
        "--output",
        s(&png),
    ]);
    assert!(ok, "{err}");
    let got = read_safetensors(&cache).unwrap().0;
    // (the reference file also holds i64 token ids, which read_safetensors refuses)
    let bytes = std::fs::read(dir().join("t5_reference.safetensors")).unwrap();
    let want = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for key in ["prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"] {
        let (g, w) = (&got[key], want.tensor(&format!("pipe.{key}")).unwrap());
        assert_eq!(g.shape, w.shape(), "{key}");
        let w: Vec<f32> = w.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = g.data.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
        println!("{key:32} rel err {err:.2e}");
        assert!(err < 1e-5, "{key}: {err}");
    }
    // with --no-t5 the T5 tokens are zeros and the CLIP part is unchanged
    let (ok, err) = sd3(&[
        "sample",
        "--model",
        s(&model),
        "--prompt",
        "a photo of a cat",
        "--no-t5",
        "--max-sequence-length",
        "6",
        "--steps",
        "1",
        "--height",
        "8",
        "--width",
        "8",
        "--save-prompt-embeds",
        s(&cache),
        "--output",
        s(&png),
    ]);
    assert!(ok, "{err}");
    let zeros = &read_safetensors(&cache).unwrap().0["prompt_embeds"];
    assert_eq!(zeros.shape, [1, 83, 12]);
    assert!(zeros.data[77 * 12..].iter().all(|v| *v == 0.0));
    assert_eq!(zeros.data[..77 * 12], got["prompt_embeds"].data[..77 * 12]);
}

#[test]
fn a_model_with_text_encoder_3_but_no_tokenizer_3_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    for sub in ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2"] {
        std::fs::create_dir_all(model.join(sub)).unwrap();
        for f in std::fs::read_dir(dir().join(sub)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), model.join(sub).join(f.file_name())).unwrap();
        }
    }
    let png = tmp.path().join("img.png");
    let (ok, err) = sd3(&["sample", "--model", s(&model), "--prompt", "a cat", "--steps", "1", "--height", "8", "--width", "8", "--output", s(&png)]);
    assert!(!ok && err.contains("tokenizer_3/tokenizer.json") && !err.contains("panicked"), "{err}");
    // --no-t5 does not need it
    let (ok, err) =
        sd3(&["sample", "--model", s(&model), "--prompt", "a cat", "--no-t5", "--steps", "1", "--height", "8", "--width", "8", "--output", s(&png)]);
    assert!(ok, "{err}");
}

#[test]
fn a_diffusers_lora_on_both_streams_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let (embeds, latents, _) = inputs(tmp.path());
    let (png, model) = (tmp.path().join("img.png"), dir());
    let run = |adapter: Option<&Path>, out: &Path| {
        let mut args = vec![
            "sample",
            "--model",
            s(&model),
            "--prompt-embeds",
            s(&embeds),
            "--latents",
            s(&latents),
            "--steps",
            "2",
            "--height",
            "16",
            "--width",
            "12",
            "--output-latents",
            s(out),
            "--output",
            s(&png),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        let (ok, err) = sd3(&args);
        assert!(ok, "{err}");
        read_safetensors(out).unwrap().0["latents"].data.clone()
    };
    let base = run(None, &tmp.path().join("base.safetensors"));
    let lora = dir().join("lora_context");
    let adapted = run(Some(&lora), &tmp.path().join("lora.safetensors"));
    let moved = base.iter().zip(&adapted).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(moved > 1e-3, "the adapter did not change the sample ({moved})");
}
