//! Parity with transformers `CLIPModel` on a tiny random-weight checkpoint
//! (`tools/fixtures/clip_tiny.py`, transformers 5.24.0, torch 2.9.0), layer by layer.
#[path = "../../../tests/common/parity.rs"]
mod parity;

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::prelude::*;
use clip_cls::load_clip;
use serial_lora::io::{HostTensor, read_safetensors};

/// Flex by default; LibTorch (CPU) or CUDA with the `tch` / `cuda` feature (see
/// `serial_lora::testing`).
type B = serial_lora::testing::Backend;

/// Errors relative to the largest reference value (`max|a−b| / max|b|`). f32 through two
/// pre-LN blocks per tower with weights of std 0.2; PyTorch sums in another order: ~1e-7 per
/// op. 1e-5 (≈80 ulp) still fails for any wrong formula (O(1e-2) or more).
const TOL: f32 = serial_lora::testing::tolerance(1e-5);

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/clip-tiny")
}

struct Ref {
    floats: BTreeMap<String, HostTensor>,
    ids: Tensor<B, 2, Int>,
}

fn reference() -> Ref {
    let path = dir().join("reference.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor("input_ids").unwrap();
    let ids: Vec<i64> = v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let ids = Tensor::from_data(TensorData::new(ids, v.shape().to_vec()), &Default::default());
    // read_safetensors rejects the int tensor: copy the floats into a file of their own
    let floats = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| k != "input_ids")
        .map(|(k, v)| {
            let data = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (k, HostTensor { shape: v.shape().to_vec(), data })
        })
        .collect();
    Ref { floats, ids }
}

fn check<const D: usize>(r: &Ref, key: &str, got: Tensor<B, D>) -> f32 {
    parity::compared(key);
    let want: Tensor<B, D> = r.floats[key].to_tensor(&Default::default());
    assert_eq!(got.dims(), want.dims(), "{key}: shape");
    let scale = want.clone().abs().max().into_scalar();
    let e = (got - want).abs().max().into_scalar() / scale;
    println!("{key:28} max rel err {e:.2e}");
    assert!(e < TOL, "{key} differs by {e} (relative)");
    e
}

#[test]
fn clip_matches_transformers_layer_by_layer() {
    let (model, cfg) = load_clip::<B>(&dir(), &Default::default()).expect("load fixture");
    assert_eq!(cfg.projection_dim, 16);
    let r = reference();
    let pixels: Tensor<B, 4> = r.floats["pixel_values"].to_tensor(&Default::default());

    check(&r, "vision.embeddings", model.vision_model.embed(pixels.clone()));
    let (image_embeds, vision) = model.image_features(pixels);
    for (i, h) in vision.hidden_states.iter().enumerate() {
        check(&r, &format!("vision.hidden_states.{i}"), h.clone());
    }
    check(&r, "vision.last_hidden_state", vision.last_hidden_state);
    check(&r, "vision.pooler_output", vision.pooler_output);
    check(&r, "image_embeds", image_embeds.clone());

    let (text_embeds, text) = model.text_features(r.ids.clone());
    for (i, h) in text.hidden_states.iter().enumerate() {
        check(&r, &format!("text.hidden_states.{i}"), h.clone());
    }
    check(&r, "text.last_hidden_state", text.last_hidden_state);
    check(&r, "text.pooler_output", text.pooler_output);
    check(&r, "text_embeds", text_embeds.clone());
    check(&r, "logits_per_image", model.logits_per_image(image_embeds, text_embeds));
    parity::assert_all_compared(r.floats.keys(), &[""], &["pixel_values"]);
}

#[test]
fn bad_checkpoints_name_the_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // no config
    let err = load_clip::<B>(d, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
    // malformed config
    std::fs::write(d.join("config.json"), "{").unwrap();
    let err = load_clip::<B>(d, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("invalid CLIP config"), "{err}");
    // config without weights
    std::fs::copy(dir().join("config.json"), d.join("config.json")).unwrap();
    let err = load_clip::<B>(d, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    // a weights file missing one tensor and holding an unexpected one
    let (mut t, meta) = read_safetensors(&dir().join("model.safetensors")).unwrap();
    let w = t.remove("text_model.encoder.layers.1.mlp.fc2.weight").unwrap();
    t.insert("text_model.encoder.layers.1.mlp.fc3.weight".into(), w);
    serial_lora::io::write_safetensors(&d.join("model.safetensors"), &t, meta).unwrap();
    let err = load_clip::<B>(d, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("mlp.fc2.weight") && err.contains("mlp.fc3.weight"), "{err}");
    // a wrong shape
    let (mut t, meta) = read_safetensors(&dir().join("model.safetensors")).unwrap();
    t.get_mut("visual_projection.weight").unwrap().shape = vec![32, 16];
    serial_lora::io::write_safetensors(&d.join("model.safetensors"), &t, meta).unwrap();
    let err = load_clip::<B>(d, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("visual_projection"), "{err}");
}

/// The paper's accounting on the real ViT-B/16 shape (both towers, rank 32): LoRA on Q, K, V, O
/// = 3,932,160 and Serial LoRA = 983,040 trainable parameters (method.md table; the paper
/// prints 3.84M / 0.96M = these ÷ 1.024e6).
#[test]
fn vit_b16_adapter_parameter_counts() {
    use serial_lora::{AdaptedModel, AdapterConfig, Method, ParamCountExt};
    let dev = Default::default();
    // the config Table I of `cargo xtask report` reads builds the same model as the preset
    let from_file =
        clip_cls::ClipConfig::from_json_file(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/models/clip-vit-base-patch16.json")).unwrap();
    // (the hub file keeps CLIP's legacy bos/eos ids 0 / 2, which the tokenizer overrides)
    let preset = clip_cls::ClipConfig::vit_base_patch16();
    let text = clip_cls::config::ClipTextConfig {
        eos_token_id: preset.text_config.eos_token_id,
        bos_token_id: preset.text_config.bos_token_id,
        ..from_file.text_config.clone()
    };
    assert_eq!((&from_file.vision_config, &text), (&preset.vision_config, &preset.text_config));
    let count = |method| {
        let m = clip_cls::ClipModel::<burn::backend::Autodiff<B>>::new(&from_file, &dev);
        let m = m.with_adapters(&AdapterConfig::new(method, 32), 0, &dev).unwrap();
        assert_eq!(m.attention_sites().len(), 24);
        m.param_counts()
    };
    let lora = count(Method::Lora);
    let serial = count(Method::SerialLora);
    assert_eq!(lora.trainable, 3_932_160);
    assert_eq!(serial.trainable, 983_040);
    assert_eq!(lora.total - lora.trainable, serial.total - serial.trainable);
    println!("ViT-B/16 base {} params", serial.total - serial.trainable);
}

/// A LoRA adapter saved by PEFT on both towers of the tiny CLIP (q, k, v, out_proj) loads here
/// and gives PEFT's embeddings.
#[test]
fn peft_lora_adapter_gives_peft_embeddings() {
    use serial_lora::AdaptedModel;
    let dev = Default::default();
    let (model, _) = load_clip::<B>(&dir(), &dev).unwrap();
    let (model, cfg) = serial_lora::io::load_adapter(model, dir().join("peft_lora"), &dev).expect("PEFT adapter");
    assert_eq!((cfg.rank, cfg.alpha), (4, 8.0));
    assert_eq!(model.attention_sites().iter().filter(|s| s.attention.has_adapter()).count(), 4);
    let r = reference();
    let (want, _) = read_safetensors(&dir().join("peft_reference.safetensors")).unwrap();
    let r2 = Ref { floats: want, ids: r.ids.clone() };
    let pixels: Tensor<B, 4> = r.floats["pixel_values"].to_tensor(&dev);
    let img = model.get_image_features(pixels.clone());
    check(&r2, "image_embeds", img.clone());
    check(&r2, "text_embeds", model.get_text_features(r.ids.clone()));
    // and it is not the base model's output
    let base = (img - r.floats["image_embeds"].to_tensor::<B, 2>(&dev)).abs().max().into_scalar();
    assert!(base > 1e-3);
    // merged: the same
    let merged = model.merge_and_unload().unwrap();
    check(&r2, "image_embeds", merged.get_image_features(pixels));
}

/// `--dtype bf16`: the tiny CLIP held in bf16 (linear and convolution weights, embedding
/// tables; computed in f32) against transformers loaded with `torch_dtype=torch.bfloat16`
/// (`tools/fixtures/half_reference.py`), which also rounds every activation to bf16.
/// Tolerance [`parity::BF16_TOL`].
#[test]
fn clip_in_bf16_matches_transformers_in_bf16() {
    use lora_runtime::weights::with_base_dtype;
    use serial_lora::BaseDType;
    let dev = Default::default();
    let (model, _) = with_base_dtype(BaseDType::Bf16, || load_clip::<B>(&dir(), &dev)).expect("load in bf16");
    assert_eq!(model.visual_projection.weight.val().dtype(), burn::tensor::DType::BF16);
    assert_eq!(model.text_model.embeddings.token_embedding.weight.val().dtype(), burn::tensor::DType::BF16);
    let r = reference();
    let (want, _) = read_safetensors(&dir().join("bf16_reference.safetensors")).unwrap();
    let pixels: Tensor<B, 4> = r.floats["pixel_values"].to_tensor(&dev);
    let image = model.get_image_features(pixels);
    let text = model.get_text_features(r.ids.clone());
    for (key, got) in [("image_embeds", image.clone()), ("text_embeds", text.clone()), ("logits_per_image", model.logits_per_image(image, text))] {
        assert_eq!(got.dtype(), burn::tensor::DType::F32);
        let want: Tensor<B, 2> = want[key].to_tensor(&dev);
        let f32_ref: Tensor<B, 2> = r.floats[key].to_tensor(&dev);
        let host = |t: Tensor<B, 2>| t.into_data().to_vec::<f32>().unwrap();
        let got = host(got);
        let (e, e32) = (parity::rel_err(&got, &host(want)), parity::rel_err(&got, &host(f32_ref)));
        println!("{key:20} bf16: max rel err {e:.2e} vs torch bf16, {e32:.2e} vs torch f32");
        assert!(e < parity::BF16_TOL, "{key}: {e} vs transformers in bf16");
        assert!(e32 < parity::BF16_TOL, "{key}: {e32} vs transformers in f32");
    }
}

/// One training step of the fixture's PEFT LoRA adapter with the base in bf16 under
/// `half::autocast` (what `clip-cls train --dtype bf16` runs) against PEFT training the same
/// adapter on transformers' CLIP loaded in bf16 under `torch.autocast(bf16)`
/// (`tools/fixtures/half_reference.py`): the loss and every adapter gradient. Torch's own
/// autocast gradients are 3.2e-2 (relative to the largest) from its f32 ones; ours compute the
/// forward in f32 and keep some activations in bf16, so they sit between the two (measured:
/// 3.4e-2 from torch's autocast step, 1.1e-2 from its f32 step; loss 5e-3 apart). Tolerance
/// [`parity::BF16_TOL`], or 1.5 × torch's own drift where that is larger (as for SAM's masks).
/// The f32 step (no autocast) matches PEFT's f32 step at the f32 tolerance (measured 1.1e-6).
#[test]
fn a_bf16_training_step_under_autocast_matches_peft_under_autocast() {
    use burn::backend::Autodiff;
    use burn::tensor::activation::log_softmax;
    use lora_runtime::weights::with_base_dtype;
    use serial_lora::BaseDType;
    type AB = Autodiff<B>;
    let dev = Default::default();
    let (want, _) = read_safetensors(&dir().join("bf16_train_reference.safetensors")).unwrap();
    let r = reference();
    for (name, dtype) in [("f32", BaseDType::F32), ("autocast", BaseDType::Bf16)] {
        let (model, _) = with_base_dtype(dtype, || load_clip::<AB>(&dir(), &dev)).unwrap();
        let (model, cfg) = serial_lora::io::load_adapter(model.no_grad(), dir().join("peft_lora"), &dev).unwrap();
        let pixels: Tensor<AB, 4> = r.floats["pixel_values"].to_tensor(&dev);
        let ids = Tensor::<AB, 2, Int>::from_inner(r.ids.clone());
        let loss = serial_lora::half::autocast(dtype, || {
            let logits = model.logits_per_image(model.get_image_features(pixels), model.get_text_features(ids));
            let labels = Tensor::<AB, 1, Int>::arange(0..logits.dims()[0] as i64, &dev);
            log_softmax(logits, 1).gather(1, labels.unsqueeze_dim(1)).mean().neg()
        });
        let loss_value = loss.clone().into_scalar().elem::<f32>();
        let got = parity::adapter_gradients(&model, &loss.backward(), &cfg, serial_lora::io::PEFT_PREFIX);
        parity::check_train_step(name, loss_value, &got, &want, TOL);
    }
}
