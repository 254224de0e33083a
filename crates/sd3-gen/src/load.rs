//! Loading the MMDiT from a diffusers pipeline directory (`transformer/config.json` +
//! `transformer/diffusion_pytorch_model.safetensors`): one key table, every load checked.
use std::path::Path;

use burn::prelude::*;
use lora_runtime::hub::Needed;
use lora_runtime::weights::{KeyTable, load_safetensors_dir};

use crate::config::Sd3TransformerConfig;
use crate::error::Result;
use crate::mmdit::Sd3Transformer;

/// The files of a diffusers SD3 directory a command needs, for
/// [`lora_runtime::hub::resolve_model_dir`] (alternatives per entry): the transformer and the VAE,
/// with `text` the CLIP-L/G encoders and tokenizers, with `t5` also `text_encoder_3` (single or
/// sharded) and `tokenizer_3`.
pub fn pipeline_files(text: bool, t5: bool) -> Vec<Needed<'static>> {
    let mut files: Vec<Needed<'static>> = vec![
        &["transformer/config.json"],
        &["transformer/diffusion_pytorch_model.safetensors"],
        &["vae/config.json"],
        &["vae/diffusion_pytorch_model.safetensors"],
    ];
    if text {
        files.extend_from_slice(&[
            &["text_encoder/config.json"][..],
            &["text_encoder/model.safetensors"],
            &["text_encoder_2/config.json"],
            &["text_encoder_2/model.safetensors"],
            &["tokenizer/tokenizer.json", "tokenizer/vocab.json+tokenizer/merges.txt"],
            &["tokenizer_2/tokenizer.json", "tokenizer_2/vocab.json+tokenizer_2/merges.txt"],
        ]);
    }
    if t5 {
        files.extend_from_slice(&[
            &["text_encoder_3/config.json"][..],
            &["text_encoder_3/model.safetensors", "text_encoder_3/model.safetensors.index.json"],
            &["tokenizer_3/tokenizer.json"],
        ]);
    }
    files
}

/// Files fetched when the repository has them.
pub const OPTIONAL_FILES: [&str; 4] =
    ["scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json", "tokenizer_2/tokenizer_config.json", "tokenizer_3/tokenizer_config.json"];

/// diffusers `SD3Transformer2DModel` keys → Burn paths. Everything not listed maps by identical
/// name; `Linear` weights are transposed by the PyTorch adapter.
pub const KEY_TABLE: KeyTable = KeyTable {
    rules: &[&[
        (r"^(transformer_blocks\.\d+\.attn)\.to_(q|k|v)\.(weight|bias)$", "$1.image.qkv.Separate.$2.base.$3"),
        (r"^(transformer_blocks\.\d+\.attn)\.to_out\.0\.(weight|bias)$", "$1.image.o.base.$2"),
        (r"^(transformer_blocks\.\d+\.attn)\.add_(q|k|v)_proj\.(weight|bias)$", "$1.context.qkv.Separate.$2.base.$3"),
        (r"^(transformer_blocks\.\d+\.attn)\.to_add_out\.(weight|bias)$", "$1.context.o.base.$2"),
        (r"^(transformer_blocks\.\d+\.attn2)\.to_(q|k|v)\.(weight|bias)$", "$1.attn.qkv.Separate.$2.base.$3"),
        (r"^(transformer_blocks\.\d+\.attn2)\.to_out\.0\.(weight|bias)$", "$1.attn.o.base.$2"),
        (r"^(transformer_blocks\.\d+\.ff(?:_context)?)\.net\.0\.proj\.(weight|bias)$", "$1.fc1.$2"),
        (r"^(transformer_blocks\.\d+\.ff(?:_context)?)\.net\.2\.(weight|bias)$", "$1.fc2.$2"),
    ]],
    ignore: &[],
    by_hand: &[],
};

/// Loads the transformer of a diffusers SD3 directory (`dir/transformer/…`).
pub fn load_transformer<B: Backend>(dir: &Path, device: &B::Device) -> Result<(Sd3Transformer<B>, Sd3TransformerConfig)> {
    let sub = dir.join("transformer");
    let config = Sd3TransformerConfig::from_json_file(&sub.join("config.json"))?;
    let model = Sd3Transformer::new(&config, device);
    // a single file, or the shards of its index (what diffusers writes above `max_shard_size`)
    let model = load_safetensors_dir(model, &sub, "diffusion_pytorch_model", &KEY_TABLE)?;
    Ok((model, config))
}
