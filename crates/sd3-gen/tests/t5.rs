//! Parity of SD3's third text encoder with transformers 5.24 / diffusers 0.42.1 on the tiny
//! fixture of `tools/fixtures/sd3_t5.py`: `T5Tokenizer` ids (normalizer charsmap, unknown
//! characters, added tokens, truncation, empty prompt), the relative-position buckets, the
//! `T5EncoderModel` block by block (loaded from a sharded checkpoint), and
//! `StableDiffusion3Pipeline.encode_prompt` with all three encoders.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use sd3_gen::t5::{T5Config, load_t5, relative_position_bucket};
use sd3_gen::t5_tokenizer::T5Tokenizer;
use sd3_gen::text::{T5TextEncoder, TextEncoders};

/// Flex by default; LibTorch (CPU) or CUDA with the `tch` / `cuda` feature (see
/// `serial_lora::testing`).
type B = serial_lora::testing::Backend;

/// Errors relative to the largest reference value. f32 through two T5 blocks (weights of std
/// 0.3, no score scaling) and the CLIP towers: ~1e-7 per op; 1e-5 still fails for any wrong formula.
const TOL: f32 = serial_lora::testing::tolerance(1e-5);

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sd3-tiny")
}

struct Ref(BTreeMap<String, (Vec<usize>, Vec<u8>, safetensors::Dtype)>);

impl Ref {
    fn load() -> Self {
        let bytes = std::fs::read(dir().join("t5_reference.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        Ref(st.tensors().into_iter().map(|(k, v)| (k, (v.shape().to_vec(), v.data().to_vec(), v.dtype()))).collect())
    }
    fn f32(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let (shape, data, dtype) = &self.0[key];
        assert_eq!(*dtype, safetensors::Dtype::F32, "{key}");
        (shape.clone(), data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    }
    fn i64(&self, key: &str) -> Vec<i64> {
        let (_, data, dtype) = &self.0[key];
        assert_eq!(*dtype, safetensors::Dtype::I64, "{key}");
        data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    }
    fn check<const D: usize>(&self, key: &str, got: Tensor<B, D>) {
        let (shape, want) = self.f32(key);
        assert_eq!(got.dims().to_vec(), shape, "{key}: shape");
        let got: Vec<f32> = got.into_data().iter::<f32>().collect();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
        println!("{key:36} rel err {err:.2e}");
        assert!(err < TOL, "{key}: relative error {err:e} ≥ {TOL:e}");
    }
}

/// The prompts of `PROMPTS_TOK` in sd3_t5.py.
fn tok_prompts() -> Vec<String> {
    [
        "a photo of a cat",
        "two dogs, playing!",
        "",
        "ﬁne  Ａrt™\u{3000}poster   of a  cat ",
        "xyz 日本 cat<extra_id_0>dog </s> q",
        "a painting of a castle on a hill at sunset, fine art",
        "cafe\u{301} e\u{301}e\u{301}\u{301} ca\u{301}t",
    ]
    .map(String::from)
    .to_vec()
}

fn pipe_prompts() -> Vec<String> {
    ["a photo of a cat", "two dogs, playing!", "a painting of a castle on a hill at sunset, fine art"].map(String::from).to_vec()
}

#[test]
fn tokenizer_gives_the_transformers_ids() {
    let r = Ref::load();
    let tok = T5Tokenizer::from_dir(&dir().join("tokenizer_3")).unwrap();
    assert_eq!(tok.pad_id, 0);
    for len in [16, 6] {
        for (p, text) in tok_prompts().iter().enumerate() {
            let got: Vec<i64> = tok.tokenize(text, len).unwrap().into_iter().map(i64::from).collect();
            assert_eq!(got, r.i64(&format!("ids.{len}.{p}")), "max_length {len}, prompt {text:?}");
        }
    }
}

/// transformers' T5Tokenizer rebuilds its pipeline: a tokenizer.json with another normalizer
/// tail, pre-tokenizer and post-processor gives the same ids there (and here), though the
/// file's own pipeline (HF tokenizers' `from_file`, our `from_json`) does not.
#[test]
fn tokenizer_follows_transformers_t5_class_not_the_file_pipeline() {
    let r = Ref::load();
    let variant = dir().join("../sd3-tiny-tokenizer-variant");
    let tok = T5Tokenizer::from_dir(&variant).unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(variant.join("tokenizer.json")).unwrap()).unwrap();
    let file_pipeline = T5Tokenizer::from_json(&json, &variant.join("tokenizer.json")).unwrap();
    let mut differs = 0;
    for (p, text) in tok_prompts().iter().enumerate() {
        let want = r.i64(&format!("variant.{p}"));
        let got: Vec<i64> = tok.tokenize(text, 16).unwrap().into_iter().map(i64::from).collect();
        assert_eq!(got, want, "prompt {text:?}");
        let file: Vec<i64> = file_pipeline.tokenize(text, 16).unwrap().into_iter().map(i64::from).collect();
        differs += usize::from(file != want);
        // from_json follows the file as HF tokenizers' Tokenizer.from_file does
        let mut own: Vec<i64> = file_pipeline.encode(text).unwrap().into_iter().map(i64::from).collect();
        own.push(-1);
        assert_eq!(own, r.i64(&format!("file.{p}")), "file pipeline, prompt {text:?}");
    }
    assert!(differs >= 3, "the variant's own pipeline should tokenize differently ({differs} prompts differ)");
}

#[test]
fn relative_position_buckets_match_transformers() {
    let r = Ref::load();
    for (key, buckets, distance) in [("buckets.tiny", 8, 16), ("buckets.xxl", 32, 128)] {
        let got: Vec<i64> = (-300..=300).map(|p| relative_position_bucket(p, buckets, distance) as i64).collect();
        assert_eq!(got, r.i64(key), "{key}");
    }
}

#[test]
fn t5_encoder_matches_transformers_block_by_block() {
    let r = Ref::load();
    let dev = Default::default();
    let d3 = dir().join("text_encoder_3");
    assert!(!d3.join("model.safetensors").exists() && d3.join("model.safetensors.index.json").exists(), "fixture is sharded");
    let (model, cfg) = load_t5::<B>(&d3, &dev).unwrap();
    assert_eq!((cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.feed_forward_proj.as_str()), (12, 4, 2, "gated-gelu"));
    r.check("position_bias", model.position_bias(16, &dev));
    let ids = r.i64("input_ids");
    let (out, blocks) = model.forward_traced(Tensor::from_data(TensorData::new(ids, [4, 16]), &dev));
    for (i, b) in blocks.into_iter().enumerate() {
        r.check(&format!("block.{i}"), b);
    }
    r.check("last_hidden_state", out);
}

#[test]
fn encode_prompt_with_t5_matches_diffusers() {
    let r = Ref::load();
    let dev = Default::default();
    let clip = TextEncoders::<B>::load(&dir(), &dev).unwrap();
    let t5 = T5TextEncoder::<B>::load(&dir(), &dev).unwrap();
    let prompts = pipe_prompts();
    let (e, p) = clip.encode_with_t5(&prompts, 12, Some(&t5), 6, &dev).unwrap();
    r.check("pipe.prompt_embeds", e);
    r.check("pipe.pooled_prompt_embeds", p);
    let (e, p) = clip.encode_with_t5(&vec![String::new(); 3], 12, Some(&t5), 6, &dev).unwrap();
    r.check("pipe.negative_prompt_embeds", e);
    r.check("pipe.negative_pooled_prompt_embeds", p);
    let err = clip.encode_with_t5(&prompts, 12, Some(&t5), 0, &dev).unwrap_err().to_string();
    assert!(err.contains("max_sequence_length"), "{err}");
    // a transformer of another width is refused with both numbers
    let err = clip.encode_with_t5(&prompts, 16, Some(&t5), 6, &dev).unwrap_err().to_string();
    assert!(err.contains("d_model 12") && err.contains("joint_attention_dim 16"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn bad_t5_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    // a tokenizer.json of another model type
    let tok = tmp.path().join("tokenizer_3");
    copy_dir(&dir().join("tokenizer_3"), &tok);
    let text = std::fs::read_to_string(tok.join("tokenizer.json")).unwrap().replace("\"type\": \"Unigram\"", "\"type\": \"BPE\"");
    std::fs::write(tok.join("tokenizer.json"), text).unwrap();
    let err = T5Tokenizer::from_dir(&tok).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("Unigram only"), "{err}");
    // a shard missing
    let enc = tmp.path().join("text_encoder_3");
    copy_dir(&dir().join("text_encoder_3"), &enc);
    std::fs::remove_file(enc.join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_t5::<B>(&enc, &dev).err().unwrap().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    // the tied embedding stored only as encoder.embed_tokens.weight (older checkpoints) loads the same
    let tied = tmp.path().join("tied");
    copy_dir(&dir().join("text_encoder_3"), &tied);
    let index = std::fs::read_to_string(tied.join("model.safetensors.index.json")).unwrap();
    let shard = serde_json::from_str::<serde_json::Value>(&index).unwrap()["weight_map"]["shared.weight"].as_str().unwrap().to_string();
    let bytes = std::fs::read(tied.join(&shard)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().map(|(k, v)| (if k == "shared.weight" { "encoder.embed_tokens.weight".into() } else { k }, v)).collect();
    std::fs::write(tied.join(&shard), safetensors::serialize(renamed, None).unwrap()).unwrap();
    std::fs::write(tied.join("model.safetensors.index.json"), index.replace("\"shared.weight\"", "\"encoder.embed_tokens.weight\"")).unwrap();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![5i64, 9, 1, 0], [1, 4]), &dev);
    let (a, _) = load_t5::<B>(&dir().join("text_encoder_3"), &dev).unwrap();
    let (b, _) = load_t5::<B>(&tied, &dev).unwrap();
    assert_eq!(a.forward(ids.clone()).into_data(), b.forward(ids).into_data());
    // a parameter no shard provides is named once, with the index
    let cut = tmp.path().join("cut");
    copy_dir(&dir().join("text_encoder_3"), &cut);
    let index = std::fs::read_to_string(cut.join("model.safetensors.index.json")).unwrap();
    let key = "encoder.final_layer_norm.weight";
    let shard = serde_json::from_str::<serde_json::Value>(&index).unwrap()["weight_map"][key].as_str().unwrap().to_string();
    let bytes = std::fs::read(cut.join(&shard)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st.tensors().into_iter().filter(|(k, _)| k != key).collect();
    std::fs::write(cut.join(&shard), safetensors::serialize(kept, None).unwrap()).unwrap();
    let err = load_t5::<B>(&cut, &dev).err().unwrap().to_string();
    assert!(err.contains("model.safetensors.index.json") && err.contains("missing in every shard (1)") && err.contains("final_layer_norm.weight"), "{err}");
    // an unknown activation
    let cfg = std::fs::read_to_string(enc.join("config.json")).unwrap().replace("\"gated-gelu\"", "\"gated-swish\"");
    std::fs::write(enc.join("config.json"), cfg).unwrap();
    let err = load_t5::<B>(&enc, &dev).err().unwrap().to_string();
    assert!(err.contains("config.json") && err.contains("swish"), "{err}");
    // the XXL preset is what SD3's text_encoder_3/config.json says
    let xxl = T5Config::t5_v1_1_xxl();
    assert_eq!((xxl.d_model, xxl.num_heads, xxl.d_kv, xxl.d_ff, xxl.num_layers), (4096, 64, 64, 10240, 24));
}
