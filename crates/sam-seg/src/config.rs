//! SAM configuration with the field names of transformers' `SamConfig` (`config.json`); every
//! missing field takes transformers' default. Presets for the three upstream checkpoints.
use std::path::Path;

use serde::{Deserialize, Serialize};
use serial_lora::layers::Activation;
use serial_lora::parse;

use crate::error::{Result, SamError};

/// `SamVisionConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamVisionConfig {
    pub hidden_size: usize,
    pub output_channels: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
    pub mlp_ratio: f64,
    pub use_abs_pos: bool,
    pub use_rel_pos: bool,
    pub window_size: usize,
    pub global_attn_indexes: Vec<usize>,
    pub num_pos_feats: usize,
    pub mlp_dim: Option<usize>,
}

impl Default for SamVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            output_channels: 256,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 1024,
            patch_size: 16,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-6,
            qkv_bias: true,
            mlp_ratio: 4.0,
            use_abs_pos: true,
            use_rel_pos: true,
            window_size: 14,
            global_attn_indexes: vec![2, 5, 8, 11],
            num_pos_feats: 128,
            mlp_dim: None,
        }
    }
}

impl SamVisionConfig {
    /// MLP width (`mlp_dim`, else `hidden_size · mlp_ratio`).
    pub fn mlp_width(&self) -> usize {
        self.mlp_dim.unwrap_or((self.hidden_size as f64 * self.mlp_ratio) as usize)
    }
    /// Tokens per side of the image-encoder grid.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// `SamPromptEncoderConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamPromptEncoderConfig {
    pub hidden_size: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub mask_input_channels: usize,
    pub num_point_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for SamPromptEncoderConfig {
    fn default() -> Self {
        Self {
            hidden_size: 256,
            image_size: 1024,
            patch_size: 16,
            mask_input_channels: 16,
            num_point_embeddings: 4,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-6,
        }
    }
}

impl SamPromptEncoderConfig {
    /// Side of the image-embedding grid.
    pub fn image_embedding_size(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// `SamMaskDecoderConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamMaskDecoderConfig {
    pub hidden_size: usize,
    pub hidden_act: Activation,
    pub mlp_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub attention_downsample_rate: usize,
    pub num_multimask_outputs: usize,
    pub iou_head_depth: usize,
    pub iou_head_hidden_dim: usize,
    pub layer_norm_eps: f64,
}

impl Default for SamMaskDecoderConfig {
    fn default() -> Self {
        Self {
            hidden_size: 256,
            hidden_act: Activation::Relu,
            mlp_dim: 2048,
            num_hidden_layers: 2,
            num_attention_heads: 8,
            attention_downsample_rate: 2,
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 256,
            layer_norm_eps: 1e-6,
        }
    }
}

/// `SamConfig`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamConfig {
    pub vision_config: SamVisionConfig,
    pub prompt_encoder_config: SamPromptEncoderConfig,
    pub mask_decoder_config: SamMaskDecoderConfig,
}

impl SamConfig {
    /// `facebook/sam-vit-base`, `-large`, `-huge` by short name (`vit-b`, `vit-l`, `vit-h`).
    pub fn preset(name: &str) -> Option<Self> {
        let (hidden, layers, heads, global) = match name {
            "vit-b" => (768, 12, 12, vec![2, 5, 8, 11]),
            "vit-l" => (1024, 24, 16, vec![5, 11, 17, 23]),
            "vit-h" => (1280, 32, 16, vec![7, 15, 23, 31]),
            _ => return None,
        };
        let vision_config =
            SamVisionConfig { hidden_size: hidden, num_hidden_layers: layers, num_attention_heads: heads, global_attn_indexes: global, ..Default::default() };
        Some(Self { vision_config, ..Default::default() })
    }

    /// Reads and checks a `config.json`; errors name the file and the field
    /// (`vision_config.patch_size`).
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| SamError::Io { path: path.into(), source: e })?;
        let cfg: Self = parse::json(&text).map_err(|message| SamError::Config { path: path.into(), message })?;
        cfg.validate().map_err(|message| SamError::Config { path: path.into(), message })?;
        Ok(cfg)
    }

    /// Checks the shape relations the model relies on, each value before anything is computed
    /// from it, and that no tensor of the model exceeds [`parse::MAX_TENSOR_ELEMENTS`] (nor the
    /// whole model [`parse::MAX_MODEL_ELEMENTS`]); errors name the field (`vision_config.patch_size`).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (v, p, d) = (&self.vision_config, &self.prompt_encoder_config, &self.mask_decoder_config);
        // vision encoder
        let hidden = parse::at_least("vision_config.hidden_size", v.hidden_size, 1)?;
        let heads = parse::at_least("vision_config.num_attention_heads", v.num_attention_heads, 1)?;
        let head_dim = parse::exact_div("`vision_config.hidden_size`", hidden, "vision_config.num_attention_heads", heads)?;
        let layers = parse::in_range("vision_config.num_hidden_layers", v.num_hidden_layers, 0, parse::MAX_LAYERS)?;
        let channels = parse::at_least("vision_config.num_channels", v.num_channels, 1)?;
        let patch = parse::at_least("vision_config.patch_size", v.patch_size, 1)?;
        let grid = parse::exact_div("`vision_config.image_size`", v.image_size, "vision_config.patch_size", patch)?;
        parse::at_least("vision_config.image_size", v.image_size, 1)?;
        let out = parse::at_least("vision_config.output_channels", v.output_channels, 1)?;
        parse::finite("vision_config.layer_norm_eps", v.layer_norm_eps, 0.0, false)?;
        parse::finite("vision_config.mlp_ratio", v.mlp_ratio, 0.0, true)?;
        let mlp = match v.mlp_dim {
            Some(m) => parse::at_least("vision_config.mlp_dim", m, 1)?,
            None => {
                let w = hidden as f64 * v.mlp_ratio;
                if !(1.0..=parse::MAX_TENSOR_ELEMENTS as f64).contains(&w) {
                    return Err(format!("`vision_config.hidden_size` · `vision_config.mlp_ratio` = {w} must be in 1..={}", parse::MAX_TENSOR_ELEMENTS));
                }
                w as usize
            }
        };
        if let Some(i) = v.global_attn_indexes.iter().find(|&&i| i >= layers) {
            return Err(format!("`vision_config.global_attn_indexes` names layer {i}, beyond the {layers} layers (`vision_config.num_hidden_layers`)"));
        }
        let window = v.window_size;
        let table = |size: usize, field: &str| -> std::result::Result<u64, String> {
            let rows = size.checked_mul(2).map(|n| n - 1).ok_or_else(|| format!("`{field}` = {size} is too large"))?;
            parse::elements("a relative-position table", &[(field, rows), ("vision_config.hidden_size / num_attention_heads", head_dim)])
        };
        let rel = if v.use_rel_pos {
            2 * (table(grid.max(1), "vision_config.image_size / patch_size")? + if window > 0 { table(window, "vision_config.window_size")? } else { 0 })
        } else {
            0
        };
        let pos = parse::elements(
            "the position embedding",
            &[("vision_config.image_size / patch_size", grid), ("vision_config.image_size / patch_size", grid), ("vision_config.hidden_size", hidden)],
        )?;
        let patch_embed = parse::elements(
            "the patch embedding",
            &[
                ("vision_config.num_channels", channels),
                ("vision_config.hidden_size", hidden),
                ("vision_config.patch_size", patch),
                ("vision_config.patch_size", patch),
            ],
        )?;
        let qkv = parse::elements("a qkv projection", &[("vision_config.hidden_size", hidden), ("3 · vision_config.hidden_size", hidden.saturating_mul(3))])?;
        let fc = parse::elements("an MLP layer", &[("vision_config.hidden_size", hidden), ("vision_config.mlp_dim", mlp)])?;
        let neck = parse::elements("the neck", &[("vision_config.output_channels", out), ("vision_config.output_channels", out), ("3 · 3", 9)])?;
        let per_layer = qkv.saturating_add(qkv / 3).saturating_add(fc.saturating_mul(2)).saturating_add(rel);
        parse::total_elements(&[
            ("vision_config", pos.saturating_add(patch_embed).saturating_add(neck)),
            ("vision_config.num_hidden_layers", per_layer.saturating_mul(layers as u64)),
        ])?;

        // mask decoder
        let dh = parse::at_least("mask_decoder_config.hidden_size", d.hidden_size, 8)?;
        parse::exact_div("`mask_decoder_config.hidden_size`", dh, "8", 8)?;
        let dheads = parse::at_least("mask_decoder_config.num_attention_heads", d.num_attention_heads, 1)?;
        parse::exact_div("`mask_decoder_config.hidden_size`", dh, "mask_decoder_config.num_attention_heads", dheads)?;
        let rate = parse::at_least("mask_decoder_config.attention_downsample_rate", d.attention_downsample_rate, 1)?;
        let inner = parse::exact_div("`mask_decoder_config.hidden_size`", dh, "mask_decoder_config.attention_downsample_rate", rate)?;
        parse::exact_div("`mask_decoder_config.hidden_size / attention_downsample_rate`", inner, "mask_decoder_config.num_attention_heads", dheads)?;
        parse::in_range("mask_decoder_config.num_hidden_layers", d.num_hidden_layers, 0, parse::MAX_LAYERS)?;
        parse::in_range("mask_decoder_config.num_multimask_outputs", d.num_multimask_outputs, 1, parse::MAX_LAYERS)?;
        parse::in_range("mask_decoder_config.iou_head_depth", d.iou_head_depth, 2, parse::MAX_LAYERS)?;
        let iou = parse::at_least("mask_decoder_config.iou_head_hidden_dim", d.iou_head_hidden_dim, 1)?;
        let dmlp = parse::at_least("mask_decoder_config.mlp_dim", d.mlp_dim, 1)?;
        parse::finite("mask_decoder_config.layer_norm_eps", d.layer_norm_eps, 0.0, false)?;
        parse::elements("a mask-decoder MLP layer", &[("mask_decoder_config.hidden_size", dh), ("mask_decoder_config.mlp_dim", dmlp)])?;
        parse::elements("an IoU-head layer", &[("mask_decoder_config.iou_head_hidden_dim", iou), ("mask_decoder_config.iou_head_hidden_dim", iou)])?;

        // prompt encoder, and the widths the three parts share
        let pp = parse::at_least("prompt_encoder_config.patch_size", p.patch_size, 1)?;
        parse::at_least("prompt_encoder_config.image_size", p.image_size, 1)?;
        let pgrid = p.image_size / pp;
        if pgrid != grid {
            return Err(format!(
                "`prompt_encoder_config.image_size` / `prompt_encoder_config.patch_size` = {} / {pp} = {pgrid} differs from the vision grid `vision_config.image_size` / `vision_config.patch_size` = {grid}",
                p.image_size
            ));
        }
        let m = parse::at_least("prompt_encoder_config.mask_input_channels", p.mask_input_channels, 4)?;
        parse::exact_div("`prompt_encoder_config.mask_input_channels`", m, "4", 4)?;
        parse::in_range("prompt_encoder_config.num_point_embeddings", p.num_point_embeddings, 4, parse::MAX_LAYERS)?;
        parse::finite("prompt_encoder_config.layer_norm_eps", p.layer_norm_eps, 0.0, false)?;
        parse::elements("the mask embedding", &[("prompt_encoder_config.mask_input_channels", m), ("prompt_encoder_config.hidden_size", p.hidden_size)])?;
        for (field, value) in [
            ("prompt_encoder_config.hidden_size", Some(p.hidden_size)),
            ("vision_config.output_channels", Some(out)),
            ("vision_config.num_pos_feats · 2", v.num_pos_feats.checked_mul(2)),
        ] {
            if value != Some(dh) {
                return Err(format!(
                    "`{field}` = {} must equal `mask_decoder_config.hidden_size` = {dh}",
                    value.map_or("more than 2^64".into(), |x| x.to_string())
                ));
            }
        }
        Ok(())
    }
}
