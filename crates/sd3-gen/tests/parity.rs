//! Parity with diffusers' `SD3Transformer2DModel` on a tiny random-weight checkpoint
//! (`tools/fixtures/sd3_tiny.py`, diffusers 0.42.1, torch 2.9.0), stage by stage, and the
//! `FlowMatchEulerDiscreteScheduler` schedule.
#[path = "../../../tests/common/parity.rs"]
mod parity;

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::prelude::*;
use sd3_gen::load_transformer;
use sd3_gen::scheduler::flow_match_schedule;
use serial_lora::{AdaptedModel, AdapterConfig, Method, ParamCountExt};

/// Flex by default; LibTorch (CPU) or CUDA with the `tch` / `cuda` feature (see
/// `serial_lora::testing`).
type B = serial_lora::testing::Backend;

/// Errors relative to the largest reference value. f32 through two joint blocks with weights of
/// std 0.2: ~1e-7 per op; 1e-5 still fails for any wrong formula.
const TOL: f32 = serial_lora::testing::tolerance(1e-5);

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sd3-tiny")
}

fn reference() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir().join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.shape().to_vec(), v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())))
        .collect()
}

fn tensor<const D: usize>(r: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, key: &str) -> Tensor<B, D> {
    let (shape, data) = &r[key];
    Tensor::from_data(TensorData::new(data.clone(), shape.clone()), &Default::default())
}

fn check<const D: usize>(r: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, key: &str, got: Tensor<B, D>) {
    parity::compared(key);
    let want: Tensor<B, D> = tensor(r, key);
    assert_eq!(got.dims(), want.dims(), "{key}: shape");
    let scale = want.clone().abs().max().into_scalar();
    let err = (got - want).abs().max().into_scalar() / scale;
    println!("{key:24} rel err {err:.2e}");
    assert!(err < TOL, "{key}: relative error {err:e} ≥ {TOL:e}");
}

#[test]
fn mmdit_matches_diffusers_stage_by_stage() {
    let r = reference();
    let (model, _) = load_transformer::<B>(&dir(), &Default::default()).unwrap();
    let t: Vec<f32> = r["timestep"].1.clone();
    let (out, trace) = model.forward_traced(tensor(&r, "hidden_states"), tensor(&r, "encoder_hidden_states"), tensor(&r, "pooled_projections"), &t).unwrap();
    check(&r, "embedded", trace.embedded);
    check(&r, "temb", trace.temb);
    check(&r, "context", trace.context);
    for (i, (x, c)) in trace.blocks.into_iter().enumerate() {
        check(&r, &format!("block.{i}.hidden"), x);
        match c {
            Some(c) => check(&r, &format!("block.{i}.context"), c),
            None => assert!(!r.contains_key(&format!("block.{i}.context"))),
        }
    }
    check(&r, "sample", out);
    parity::assert_all_compared(r.keys(), &["embedded", "temb", "context", "block.", "sample"], &[]);
}

#[test]
fn flow_match_schedule_matches_diffusers() {
    let r = reference();
    for n in [1, 4, 28] {
        for shift in [1.0, 3.0] {
            let (sigmas, timesteps) = flow_match_schedule(n, shift, 1000);
            let key = |k: &str| format!("{k}.{n}.shift{shift}");
            let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert_eq!(sigmas.len(), n + 1);
            let (ds, dt) = (diff(&sigmas, &r[&key("sigmas")].1), diff(&timesteps, &r[&key("timesteps")].1));
            println!("N {n} shift {shift}: sigma err {ds:.1e}, timestep err {dt:.1e}");
            assert!(ds <= 1e-7 && dt <= 1e-4, "N {n} shift {shift}: {sigmas:?} vs {:?}", r[&key("sigmas")].1);
        }
    }
}

#[test]
fn adapters_go_on_the_image_stream_of_each_joint_attention() {
    type AB = burn::backend::Autodiff<B>;
    let dev = Default::default();
    let (model, cfg) = load_transformer::<AB>(&dir(), &dev).unwrap();
    let sites: Vec<String> = model.attention_sites().into_iter().map(|s| s.path).collect();
    assert_eq!(sites, ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]);
    let d = cfg.inner_dim();
    for (method, per_block) in [(Method::Lora, 4 * 2 * d * 4), (Method::SerialLora, 2 * d * 4)] {
        let adapted = model.clone().with_adapters(&AdapterConfig::new(method, 4), 0, &dev).unwrap();
        assert_eq!(adapted.trainable_params(), cfg.num_layers * per_block, "{method:?}");
    }
}

#[test]
fn bad_input_is_named() {
    let r = reference();
    let (model, _) = load_transformer::<B>(&dir(), &Default::default()).unwrap();
    let t = [500.0f32, 500.0];
    let odd: Tensor<B, 4> = Tensor::zeros([2, 4, 7, 6], &Default::default());
    let err = model.forward(odd, tensor(&r, "encoder_hidden_states"), tensor(&r, "pooled_projections"), &t).unwrap_err().to_string();
    assert!(err.contains("not a multiple of the patch size"), "{err}");
    let big: Tensor<B, 4> = Tensor::zeros([2, 4, 14, 6], &Default::default());
    let err = model.forward(big, tensor(&r, "encoder_hidden_states"), tensor(&r, "pooled_projections"), &t).unwrap_err().to_string();
    assert!(err.contains("pos_embed_max_size"), "{err}");
    let err =
        model.forward(tensor(&r, "hidden_states"), tensor(&r, "encoder_hidden_states"), tensor(&r, "pooled_projections"), &t[..1]).unwrap_err().to_string();
    assert!(err.contains("batch mismatch"), "{err}");
}

#[test]
fn four_step_guided_sample_matches_the_diffusers_pipeline() {
    use sd3_gen::pipeline::{PromptEmbeds, SampleOptions, denoise};
    let r = reference();
    let (model, _) = load_transformer::<B>(&dir(), &Default::default()).unwrap();
    let cond = PromptEmbeds {
        prompt_embeds: tensor(&r, "pipe.prompt_embeds"),
        pooled_prompt_embeds: tensor(&r, "pipe.pooled_prompt_embeds"),
        negative: Some((tensor(&r, "pipe.negative_prompt_embeds"), tensor(&r, "pipe.negative_pooled_prompt_embeds"))),
    };
    let opts = SampleOptions { steps: 4, guidance: 7.0, shift: 3.0 };
    let mut seen = 0;
    let out = denoise(&model, tensor(&r, "pipe.latents"), &cond, &opts, &mut |i, _| seen = i).unwrap();
    assert_eq!(seen, 4);
    check(&r, "pipe.output_latents", out);
    let no_negative = PromptEmbeds { negative: None, ..cond };
    let err = denoise(&model, tensor(&r, "pipe.latents"), &no_negative, &opts, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("negative"), "{err}");
}

#[test]
fn vae_encode_and_decode_match_diffusers() {
    let bytes = std::fs::read(dir().join("vae_reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let r: BTreeMap<String, (Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.shape().to_vec(), v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())))
        .collect();
    let (vae, cfg) = sd3_gen::vae::load_vae::<B>(&dir(), &Default::default()).unwrap();
    assert_eq!((cfg.scaling_factor, cfg.shift_factor), (1.5305, Some(0.0609)));
    let (mean, logvar, mid) = vae.encode(tensor(&r, "image"));
    check(&r, "encoder.mid", mid);
    check(&r, "latent_mean", mean);
    check(&r, "latent_logvar", logvar);
    let (decoded, mid) = vae.decode(tensor(&r, "latents"));
    check(&r, "decoder.mid", mid);
    check(&r, "decoded", decoded);
}

#[test]
fn prompt_encoding_matches_diffusers_without_t5() {
    let bytes = std::fs::read(dir().join("text_reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let r: BTreeMap<String, (Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("ids"))
        .map(|(k, v)| (k, (v.shape().to_vec(), v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())))
        .collect();
    let dev = Default::default();
    let enc = sd3_gen::text::TextEncoders::<B>::load(&dir(), &dev).unwrap();
    assert_eq!((enc.tokenizer_l.pad_id, enc.tokenizer_g.pad_id), (999, 0), "pad tokens from tokenizer_config.json");
    let prompts = ["a photo of a cat".to_string(), "two dogs, playing!".to_string()];
    let (e, p) = enc.encode(&prompts, 12, 3, &dev).unwrap();
    check(&r, "prompt_embeds", e);
    check(&r, "pooled_prompt_embeds", p);
    let (e, p) = enc.encode(&[String::new(), String::new()], 12, 3, &dev).unwrap();
    check(&r, "negative_prompt_embeds", e);
    check(&r, "negative_pooled_prompt_embeds", p);
}

#[test]
fn tokenizers_give_the_pipeline_ids() {
    // SD3's second tokenizer pads with `!`, an added token for transformers: "playing!" ends in
    // id 0, not BPE's "!</w>"
    let bytes = std::fs::read(dir().join("text_reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let enc = sd3_gen::text::TextEncoders::<B>::load(&dir(), &Default::default()).unwrap();
    for (key, tok) in [("ids_l", &enc.tokenizer_l), ("ids_g", &enc.tokenizer_g)] {
        let v = st.tensor(key).unwrap();
        let want: Vec<i64> = v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        let got: Vec<i64> = ["a photo of a cat", "two dogs, playing!"].iter().flat_map(|p| tok.tokenize(p, 77)).map(i64::from).collect();
        assert_eq!(got, want, "{key}");
    }
}

#[test]
fn a_diffusers_lora_file_loads_and_gives_diffusers_output() {
    let r = reference();
    let dev = Default::default();
    let (model, _) = load_transformer::<B>(&dir(), &dev).unwrap();
    let (model, cfg) = serial_lora::io::load_adapter_with_prefix(model, dir().join("lora"), &dev, "transformer.").unwrap();
    assert_eq!((cfg.rank, cfg.alpha), (2, 4.0));
    let bytes = std::fs::read(dir().join("lora_reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor("sample").unwrap();
    let want: Tensor<B, 4> = Tensor::from_data(
        TensorData::new(v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>(), v.shape().to_vec()),
        &dev,
    );
    let t: Vec<f32> = r["timestep"].1.clone();
    let got = model.forward(tensor(&r, "hidden_states"), tensor(&r, "encoder_hidden_states"), tensor(&r, "pooled_projections"), &t).unwrap();
    let base: Tensor<B, 4> = tensor(&r, "sample");
    let scale = want.clone().abs().max().into_scalar();
    let err = (got - want.clone()).abs().max().into_scalar() / scale;
    let effect = (want - base).abs().max().into_scalar() / scale;
    println!("LoRA output rel err {err:.2e} (the LoRA moves the output by {effect:.2e})");
    assert!(err < TOL && effect > 1e-2, "{err} {effect}");
}

#[test]
fn sd35_dual_attention_matches_diffusers() {
    let r = reference();
    let dir35 = dir().with_file_name("sd3-tiny-35");
    let (model, cfg) = load_transformer::<B>(&dir35, &Default::default()).unwrap();
    assert_eq!(cfg.dual_attention_layers, [0]);
    let bytes = std::fs::read(dir35.join("sd35_reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let r35: BTreeMap<String, (Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.shape().to_vec(), v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())))
        .collect();
    let t: Vec<f32> = r["timestep"].1.clone();
    let (out, trace) = model.forward_traced(tensor(&r, "hidden_states"), tensor(&r, "encoder_hidden_states"), tensor(&r, "pooled_projections"), &t).unwrap();
    let (x0, c0) = trace.blocks[0].clone();
    check(&r35, "block.0.hidden", x0);
    check(&r35, "block.0.context", c0.unwrap());
    check(&r35, "sample", out);
    for name in ["sd3-medium", "sd3.5-medium", "sd3.5-large"] {
        let p = sd3_gen::Sd3TransformerConfig::preset(name).unwrap();
        assert_eq!(p.caption_projection_dim, p.inner_dim(), "{name}");
    }
}

/// The paper's accounting on SD3-medium's MMDiT image stream (24 blocks of width 1536, rank 64),
/// from the config Table I of `cargo xtask report` reads: LoRA on to_q, to_k, to_v, to_out.0 =
/// 18,874,368, Serial LoRA = 4,718,592 trainable parameters (method.md). Counted on two of the
/// 24 identical-width blocks (building all 2B parameters would take minutes and 8 GB) × 12.
#[test]
fn sd3_medium_adapter_parameter_counts() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/models/sd3-medium-transformer.json");
    let cfg = sd3_gen::Sd3TransformerConfig::from_json_file(&path).unwrap();
    assert_eq!(cfg, sd3_gen::Sd3TransformerConfig::preset("sd3-medium").unwrap());
    let two = sd3_gen::Sd3TransformerConfig { num_layers: 2, ..cfg };
    let dev = Default::default();
    let count = |method| {
        sd3_gen::Sd3Transformer::<burn::backend::Autodiff<B>>::new(&two, &dev).with_adapters(&AdapterConfig::new(method, 64), 0, &dev).unwrap().param_counts()
    };
    let (lora, serial) = (count(Method::Lora), count(Method::SerialLora));
    assert_eq!((lora.trainable * 12, serial.trainable * 12), (18_874_368, 4_718_592));
    assert_eq!(lora.total - lora.trainable, serial.total - serial.trainable);
}

/// `--dtype bf16`: the tiny SD3 transformer held in bf16 (computed in f32) against diffusers
/// loaded with `torch_dtype=torch.bfloat16` (`tools/fixtures/half_reference.py`); tolerance
/// [`parity::BF16_TOL`].
#[test]
fn mmdit_in_bf16_matches_diffusers_in_bf16() {
    use lora_runtime::weights::with_base_dtype;
    let r = reference();
    let (model, _) = with_base_dtype(serial_lora::BaseDType::Bf16, || load_transformer::<B>(&dir(), &Default::default())).unwrap();
    let (want, _) = serial_lora::io::read_safetensors(&dir().join("bf16_reference.safetensors")).unwrap();
    let t: Vec<f32> = r["timestep"].1.clone();
    let (out, _) = model.forward_traced(tensor(&r, "hidden_states"), tensor(&r, "encoder_hidden_states"), tensor(&r, "pooled_projections"), &t).unwrap();
    let got = out.into_data().to_vec::<f32>().unwrap();
    let (e, e32) = (parity::rel_err(&got, &want["sample"].data), parity::rel_err(&got, &r["sample"].1));
    println!("sample bf16: max rel err {e:.2e} vs torch bf16, {e32:.2e} vs torch f32");
    assert!(e < parity::BF16_TOL, "sample: {e} vs diffusers in bf16");
}
