//! Loading a SAM checkpoint in HF layout (`config.json` + `model.safetensors`): one key table,
//! every load checked.
use std::path::Path;

use burn::prelude::*;
use lora_runtime::weights::{KeyTable, load_safetensors, tensor_names};

use crate::config::SamConfig;
use crate::error::Result;
use crate::model::SamModel;
use crate::processor::SamProcessor;

/// HF `SamModel` keys → Burn paths. Everything not listed maps by identical name; norms'
/// `weight`/`bias` become `gamma`/`beta` and `Linear` weights are transposed by the PyTorch
/// adapter.
pub const KEY_TABLE: KeyTable = KeyTable {
    rules: &[HF_RULES],
    // the prompt encoder's copy of the tied Fourier matrix (some checkpoints store both)
    ignore: &[r"^prompt_encoder\.shared_embedding\.positional_embedding$"],
    by_hand: &[],
};

const HF_RULES: &[(&str, &str)] = &[
    (r"^(vision_encoder\.layers\.\d+)\.attn\.qkv\.(weight|bias)$", "$1.attn.qkv.Fused.base.$2"),
    (r"^(vision_encoder\.layers\.\d+)\.attn\.proj\.(weight|bias)$", "$1.attn.o.base.$2"),
    (r"^(vision_encoder\.layers\.\d+)\.attn\.rel_pos_(h|w)$", "$1.rel_pos.rel_pos_$2"),
    (r"^(.+)\.mlp\.lin1\.(weight|bias)$", "$1.mlp.fc1.$2"),
    (r"^(.+)\.mlp\.lin2\.(weight|bias)$", "$1.mlp.fc2.$2"),
    (r"^(mask_decoder\.transformer\..+)\.(q|k|v)_proj\.(weight|bias)$", "$1.qkv.Separate.$2.base.$3"),
    (r"^(mask_decoder\.transformer\..+)\.out_proj\.(weight|bias)$", "$1.o.base.$2"),
];

/// segment-anything keys (`sam_vit_b_01ec64.pth`, saved as safetensors) → Burn paths: the
/// renames of transformers' `convert_sam_to_hf.py` to HF keys, then [`KEY_TABLE`]'s rules.
pub const ORIGINAL_KEY_TABLE: KeyTable = KeyTable {
    rules: &[ORIGINAL_TO_HF, HF_RULES],
    // the normalization constants the original model keeps as buffers
    ignore: &[r"^pixel_(mean|std)$"],
    by_hand: &[],
};

pub(crate) const ORIGINAL_TO_HF: &[(&str, &str)] = &[
    (r"^image_encoder\.blocks\.", "vision_encoder.layers."),
    (r"^image_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"^image_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"^image_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"^image_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"^image_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"^image_encoder\.", "vision_encoder."),
    (r"\.norm(\d)\.", ".layer_norm$1."),
    (r"\.norm_final_attn\.", ".layer_norm_final_attn."),
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$", "shared_image_embedding.positional_embedding"),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    // the 3-layer MLP heads: layers.0 → proj_in, layers.2 → proj_out, then layers.1 → layers.0
    (r"^(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\.layers\.0\.", "$1.proj_in."),
    (r"^(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\.layers\.2\.", "$1.proj_out."),
    (r"^(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\.layers\.1\.", "$1.layers.0."),
];

/// Loads a SAM model from a local directory: `config.json` and `model.safetensors` with HF
/// key names (`facebook/sam-vit-base`) or segment-anything's (`image_encoder.blocks.…`,
/// detected from the file).
pub fn load_sam<B: Backend>(dir: &Path, device: &B::Device) -> Result<(SamModel<B>, SamConfig)> {
    let config = SamConfig::from_json_file(&dir.join("config.json"))?;
    let model = SamModel::new(&config, device);
    let weights = dir.join("model.safetensors");
    let original = tensor_names(&weights)?.iter().any(|k| k.starts_with("image_encoder."));
    let table = if original { &ORIGINAL_KEY_TABLE } else { &KEY_TABLE };
    let (model, _) = load_safetensors(model, &weights, table, false)?;
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
