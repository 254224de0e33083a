//! CLIP configuration with the field names of transformers' `CLIPConfig` (`config.json`), and
//! named presets pointing at the upstream checkpoints.
use std::path::Path;

use serde::{Deserialize, Serialize};
use serial_lora::layers::Activation;

use crate::error::{ClipError, Result};

/// `CLIPTextConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_text_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_text_mlp")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_text_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_eos")]
    pub eos_token_id: i64,
    #[serde(default = "d_bos")]
    pub bos_token_id: i64,
    #[serde(default = "d_pad")]
    pub pad_token_id: i64,
}

/// `CLIPVisionConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_vision_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_vision_mlp")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_vision_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_image")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default)]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

/// `CLIPConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    #[serde(default = "d_proj")]
    pub projection_dim: usize,
    #[serde(default = "d_logit_scale")]
    pub logit_scale_init_value: f64,
}

// transformers' defaults (CLIPTextConfig / CLIPVisionConfig / CLIPConfig __init__)
fn d_vocab() -> usize { 49408 }
fn d_text_hidden() -> usize { 512 }
fn d_text_mlp() -> usize { 2048 }
fn d_layers() -> usize { 12 }
fn d_text_heads() -> usize { 8 }
fn d_positions() -> usize { 77 }
fn d_eps() -> f64 { 1e-5 }
fn d_eos() -> i64 { 49407 }
fn d_bos() -> i64 { 49406 }
fn d_pad() -> i64 { 1 }
fn d_vision_hidden() -> usize { 768 }
fn d_vision_mlp() -> usize { 3072 }
fn d_vision_heads() -> usize { 12 }
fn d_channels() -> usize { 3 }
fn d_image() -> usize { 224 }
fn d_patch() -> usize { 32 }
fn d_proj() -> usize { 512 }
fn d_logit_scale() -> f64 { 2.6592 }

impl ClipVisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Tokens: patches + the class token.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

impl ClipConfig {
    /// Reads a transformers `config.json` (unknown fields are ignored).
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ClipError::Io { path: path.into(), source: e })?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| ClipError::Config { path: path.into(), message: e.to_string() })?;
        cfg.validate().map_err(|message| ClipError::Config { path: path.into(), message })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let (t, v) = (&self.text_config, &self.vision_config);
        let checks = [
            (t.hidden_size % t.num_attention_heads.max(1) == 0 && t.num_attention_heads > 0, "text_config.hidden_size must be a multiple of num_attention_heads"),
            (v.hidden_size % v.num_attention_heads.max(1) == 0 && v.num_attention_heads > 0, "vision_config.hidden_size must be a multiple of num_attention_heads"),
            (v.patch_size > 0 && v.image_size % v.patch_size.max(1) == 0, "vision_config.image_size must be a multiple of patch_size"),
            (t.vocab_size > 0 && t.max_position_embeddings > 0, "text_config.vocab_size and max_position_embeddings must be > 0"),
            (self.projection_dim > 0, "projection_dim must be > 0"),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, msg)) => Err(msg.to_string()),
            None => Ok(()),
        }
    }

    fn openai(text_hidden: usize, text_heads: usize, vision: (usize, usize, usize, usize, usize), proj: usize) -> Self {
        let (hidden, layers, heads, image, patch) = vision;
        Self {
            text_config: ClipTextConfig {
                vocab_size: 49408,
                hidden_size: text_hidden,
                intermediate_size: 4 * text_hidden,
                num_hidden_layers: 12,
                num_attention_heads: text_heads,
                max_position_embeddings: 77,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
                eos_token_id: 49407,
                bos_token_id: 49406,
                pad_token_id: 1,
            },
            vision_config: ClipVisionConfig {
                hidden_size: hidden,
                intermediate_size: 4 * hidden,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                num_channels: 3,
                image_size: image,
                patch_size: patch,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
            },
            projection_dim: proj,
            logit_scale_init_value: 2.6592,
        }
    }

    /// `openai/clip-vit-base-patch32`.
    pub fn vit_base_patch32() -> Self {
        Self::openai(512, 8, (768, 12, 12, 224, 32), 512)
    }
    /// `openai/clip-vit-base-patch16` (the paper's model).
    pub fn vit_base_patch16() -> Self {
        Self::openai(512, 8, (768, 12, 12, 224, 16), 512)
    }
    /// `openai/clip-vit-large-patch14`.
    pub fn vit_large_patch14() -> Self {
        Self::openai(768, 12, (1024, 24, 16, 224, 14), 768)
    }
    /// `openai/clip-vit-large-patch14-336`.
    pub fn vit_large_patch14_336() -> Self {
        Self::openai(768, 12, (1024, 24, 16, 336, 14), 768)
    }

    /// A preset by name: `vit-b-32`, `vit-b-16`, `vit-l-14`, `vit-l-14-336`.
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "vit-b-32" => Self::vit_base_patch32(),
            "vit-b-16" => Self::vit_base_patch16(),
            "vit-l-14" => Self::vit_large_patch14(),
            "vit-l-14-336" => Self::vit_large_patch14_336(),
            _ => return None,
        })
    }
}
