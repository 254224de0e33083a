//! Loading the MMDiT from a diffusers pipeline directory (`transformer/config.json` +
//! `transformer/diffusion_pytorch_model.safetensors`): one key table, every load checked.
use std::path::Path;

use burn::prelude::*;
use serial_lora::weights::{KeyTable, load_safetensors};

use crate::config::Sd3TransformerConfig;
use crate::error::Result;
use crate::mmdit::Sd3Transformer;

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
    let (model, _) = load_safetensors(model, &sub.join("diffusion_pytorch_model.safetensors"), &KEY_TABLE, false)?;
    Ok((model, config))
}
