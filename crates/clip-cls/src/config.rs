//! CLIP configuration with the field names of transformers' `CLIPConfig` (`config.json`), and
//! named presets pointing at the upstream checkpoints.
use std::path::Path;

use serde::{Deserialize, Serialize};
use serial_lora::layers::Activation;
use serial_lora::parse;

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
fn d_vocab() -> usize {
    49408
}
fn d_text_hidden() -> usize {
    512
}
fn d_text_mlp() -> usize {
    2048
}
fn d_layers() -> usize {
    12
}
fn d_text_heads() -> usize {
    8
}
fn d_positions() -> usize {
    77
}
fn d_eps() -> f64 {
    1e-5
}
fn d_eos() -> i64 {
    49407
}
fn d_bos() -> i64 {
    49406
}
fn d_pad() -> i64 {
    1
}
fn d_vision_hidden() -> usize {
    768
}
fn d_vision_mlp() -> usize {
    3072
}
fn d_vision_heads() -> usize {
    12
}
fn d_channels() -> usize {
    3
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    32
}
fn d_proj() -> usize {
    512
}
fn d_logit_scale() -> f64 {
    2.6592
}

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

impl ClipTextConfig {
    /// Checks every size before anything is computed from it (errors name the field, under
    /// `prefix`, e.g. `text_config.`) and that no tensor exceeds [`parse::MAX_TENSOR_ELEMENTS`].
    /// Returns the model's parameter count (without the projection).
    pub fn validate(&self, prefix: &str) -> Result<u64, String> {
        let f = |name: &str| format!("{prefix}{name}");
        let hidden = parse::at_least(&f("hidden_size"), self.hidden_size, 1)?;
        let heads = parse::at_least(&f("num_attention_heads"), self.num_attention_heads, 1)?;
        parse::exact_div(&format!("`{}`", f("hidden_size")), hidden, &f("num_attention_heads"), heads)?;
        let vocab = parse::at_least(&f("vocab_size"), self.vocab_size, 1)?;
        let positions = parse::at_least(&f("max_position_embeddings"), self.max_position_embeddings, 1)?;
        let mlp = parse::at_least(&f("intermediate_size"), self.intermediate_size, 1)?;
        let layers = parse::in_range(&f("num_hidden_layers"), self.num_hidden_layers, 0, parse::MAX_LAYERS)?;
        parse::finite(&f("layer_norm_eps"), self.layer_norm_eps, 0.0, false)?;
        let tok = parse::elements("the token embedding", &[(&f("vocab_size"), vocab), (&f("hidden_size"), hidden)])?;
        let pos = parse::elements("the position embedding", &[(&f("max_position_embeddings"), positions), (&f("hidden_size"), hidden)])?;
        let attn = parse::elements("an attention projection", &[(&f("hidden_size"), hidden), (&f("hidden_size"), hidden)])?;
        let fc = parse::elements("an MLP layer", &[(&f("hidden_size"), hidden), (&f("intermediate_size"), mlp)])?;
        let per_layer = attn.saturating_mul(4).saturating_add(fc.saturating_mul(2));
        parse::total_elements(&[(&f("vocab_size"), tok.saturating_add(pos)), (&f("num_hidden_layers"), per_layer.saturating_mul(layers as u64))])
    }
}

impl ClipVisionConfig {
    /// As [`ClipTextConfig::validate`], for the vision tower (`vision_config.`).
    pub fn validate(&self, prefix: &str) -> Result<u64, String> {
        let f = |name: &str| format!("{prefix}{name}");
        let hidden = parse::at_least(&f("hidden_size"), self.hidden_size, 1)?;
        let heads = parse::at_least(&f("num_attention_heads"), self.num_attention_heads, 1)?;
        parse::exact_div(&format!("`{}`", f("hidden_size")), hidden, &f("num_attention_heads"), heads)?;
        let patch = parse::at_least(&f("patch_size"), self.patch_size, 1)?;
        parse::at_least(&f("image_size"), self.image_size, 1)?;
        let grid = parse::exact_div(&format!("`{}`", f("image_size")), self.image_size, &f("patch_size"), patch)?;
        let channels = parse::at_least(&f("num_channels"), self.num_channels, 1)?;
        let mlp = parse::at_least(&f("intermediate_size"), self.intermediate_size, 1)?;
        let layers = parse::in_range(&f("num_hidden_layers"), self.num_hidden_layers, 0, parse::MAX_LAYERS)?;
        parse::finite(&f("layer_norm_eps"), self.layer_norm_eps, 0.0, false)?;
        let positions = grid
            .checked_mul(grid)
            .and_then(|n| n.checked_add(1))
            .ok_or_else(|| format!("`{}` / `{}` = {grid} patches per side is too many", f("image_size"), f("patch_size")))?;
        let pos =
            parse::elements("the position embedding", &[(&format!("{} / patch_size, squared, + 1", f("image_size")), positions), (&f("hidden_size"), hidden)])?;
        let conv = parse::elements(
            "the patch embedding",
            &[(&f("num_channels"), channels), (&f("hidden_size"), hidden), (&f("patch_size"), patch), (&f("patch_size"), patch)],
        )?;
        let attn = parse::elements("an attention projection", &[(&f("hidden_size"), hidden), (&f("hidden_size"), hidden)])?;
        let fc = parse::elements("an MLP layer", &[(&f("hidden_size"), hidden), (&f("intermediate_size"), mlp)])?;
        let per_layer = attn.saturating_mul(4).saturating_add(fc.saturating_mul(2));
        parse::total_elements(&[(&f("image_size"), pos.saturating_add(conv)), (&f("num_hidden_layers"), per_layer.saturating_mul(layers as u64))])
    }
}

impl ClipConfig {
    /// Reads a transformers `config.json` (unknown fields are ignored); errors name the file
    /// and the field (`vision_config.patch_size`).
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ClipError::Io { path: path.into(), source: e })?;
        let cfg: Self = parse::json(&text).map_err(|message| ClipError::Config { path: path.into(), message })?;
        cfg.validate().map_err(|message| ClipError::Config { path: path.into(), message })?;
        Ok(cfg)
    }

    /// Checks every value before anything is computed from it; errors name the field.
    pub fn validate(&self) -> Result<(), String> {
        let text = self.text_config.validate("text_config.")?;
        let vision = self.vision_config.validate("vision_config.")?;
        let proj = parse::at_least("projection_dim", self.projection_dim, 1)?;
        parse::elements("the text projection", &[("text_config.hidden_size", self.text_config.hidden_size), ("projection_dim", proj)])?;
        parse::elements("the visual projection", &[("vision_config.hidden_size", self.vision_config.hidden_size), ("projection_dim", proj)])?;
        parse::finite("logit_scale_init_value", self.logit_scale_init_value, f64::MIN, false)?;
        parse::total_elements(&[("text_config", text), ("vision_config", vision)])?;
        Ok(())
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
