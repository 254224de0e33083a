//! Loading a SAM checkpoint in HF layout (`config.json` + `model.safetensors`): one key table,
//! every load checked.
use std::path::Path;

use burn::prelude::*;
use serial_lora::weights::{KeyTable, load_safetensors};

use crate::config::SamConfig;
use crate::error::Result;
use crate::model::SamModel;
use crate::processor::SamProcessor;

/// HF `SamModel` keys → Burn paths. Everything not listed maps by identical name; norms'
/// `weight`/`bias` become `gamma`/`beta` and `Linear` weights are transposed by the PyTorch
/// adapter.
pub const KEY_TABLE: KeyTable = KeyTable {
    rules: &[
        (r"^(vision_encoder\.layers\.\d+)\.attn\.qkv\.(weight|bias)$", "$1.attn.qkv.Fused.base.$2"),
        (r"^(vision_encoder\.layers\.\d+)\.attn\.proj\.(weight|bias)$", "$1.attn.o.base.$2"),
        (r"^(vision_encoder\.layers\.\d+)\.attn\.rel_pos_(h|w)$", "$1.rel_pos.rel_pos_$2"),
        (r"^(.+)\.mlp\.lin1\.(weight|bias)$", "$1.mlp.fc1.$2"),
        (r"^(.+)\.mlp\.lin2\.(weight|bias)$", "$1.mlp.fc2.$2"),
        (r"^(mask_decoder\.transformer\..+)\.(q|k|v)_proj\.(weight|bias)$", "$1.qkv.Separate.$2.base.$3"),
        (r"^(mask_decoder\.transformer\..+)\.out_proj\.(weight|bias)$", "$1.o.base.$2"),
    ],
    // the prompt encoder's copy of the tied Fourier matrix (some checkpoints store both)
    ignore: &[r"^prompt_encoder\.shared_embedding\.positional_embedding$"],
    by_hand: &[],
};

/// Loads a SAM model from a local directory in HF layout.
pub fn load_sam<B: Backend>(dir: &Path, device: &B::Device) -> Result<(SamModel<B>, SamConfig)> {
    let config = SamConfig::from_json_file(&dir.join("config.json"))?;
    let model = SamModel::new(&config, device);
    let (model, _) = load_safetensors(model, &dir.join("model.safetensors"), &KEY_TABLE, false)?;
    Ok((model, config))
}

/// [`load_sam`] plus the processor of the directory, both for square inputs of `image_size`
/// pixels when given (see [`SamModel::with_image_size`]).
pub fn load_sam_sized<B: Backend>(dir: &Path, device: &B::Device, image_size: Option<usize>) -> Result<(SamModel<B>, SamConfig, SamProcessor)> {
    let (model, mut cfg) = load_sam(dir, device)?;
    let proc = SamProcessor::from_dir(dir, &cfg.vision_config)?;
    match image_size {
        Some(size) => {
            let model = model.with_image_size(&mut cfg, size)?;
            Ok((model, cfg, SamProcessor { longest_edge: size, pad: [size, size], ..proc }))
        }
        None => Ok((model, cfg, proc)),
    }
}
