//! SAM configuration with the field names of transformers' `SamConfig` (`config.json`); every
//! missing field takes transformers' default. Presets for the three upstream checkpoints.
use std::path::Path;

use serde::{Deserialize, Serialize};
use serial_lora::layers::Activation;

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
        let vision_config = SamVisionConfig {
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            global_attn_indexes: global,
            ..Default::default()
        };
        Some(Self { vision_config, ..Default::default() })
    }

    /// Reads and checks a `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| SamError::Io { path: path.into(), source: e })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| SamError::Config { path: path.into(), message: e.to_string() })?;
        cfg.validate().map_err(|message| SamError::Config { path: path.into(), message })?;
        Ok(cfg)
    }

    /// Checks the shape relations the model relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (v, p, d) = (&self.vision_config, &self.prompt_encoder_config, &self.mask_decoder_config);
        let checks: [(bool, String); 7] = [
            (v.patch_size > 0 && v.image_size % v.patch_size == 0, format!("vision image_size {} is not a multiple of patch_size {}", v.image_size, v.patch_size)),
            (v.num_attention_heads > 0 && v.hidden_size % v.num_attention_heads == 0, format!("vision hidden_size {} is not divisible by {} heads", v.hidden_size, v.num_attention_heads)),
            (v.global_attn_indexes.iter().all(|&i| i < v.num_hidden_layers), format!("global_attn_indexes {:?} beyond {} layers", v.global_attn_indexes, v.num_hidden_layers)),
            (2 * v.num_pos_feats == d.hidden_size && p.hidden_size == d.hidden_size && v.output_channels == d.hidden_size,
                format!("num_pos_feats·2 ({}), prompt hidden ({}), vision output_channels ({}) must equal the decoder hidden size ({})", 2 * v.num_pos_feats, p.hidden_size, v.output_channels, d.hidden_size)),
            (p.patch_size > 0 && p.image_embedding_size() == v.grid(), format!("prompt encoder grid {} differs from the vision grid {}", p.image_embedding_size(), v.grid())),
            (p.mask_input_channels % 4 == 0 && p.mask_input_channels > 0, format!("mask_input_channels {} is not a positive multiple of 4", p.mask_input_channels)),
            (d.attention_downsample_rate > 0 && d.num_attention_heads > 0 && (d.hidden_size / d.attention_downsample_rate) % d.num_attention_heads == 0 && d.hidden_size % 8 == 0 && d.iou_head_depth >= 2,
                format!("mask decoder: hidden {} / downsample {} must split into {} heads, hidden divisible by 8, iou_head_depth ≥ 2", d.hidden_size, d.attention_downsample_rate, d.num_attention_heads)),
        ];
        match checks.into_iter().find(|(ok, _)| !ok) {
            Some((_, msg)) => Err(msg),
            None => Ok(()),
        }
    }
}
