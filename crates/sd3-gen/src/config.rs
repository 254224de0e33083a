//! `transformer/config.json` of a diffusers SD3 pipeline, with diffusers' field names and
//! defaults; presets for the upstream checkpoints.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, Sd3Error};

/// `SD3Transformer2DModel`'s config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sd3TransformerConfig {
    pub sample_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub caption_projection_dim: usize,
    pub pooled_projection_dim: usize,
    pub out_channels: usize,
    pub pos_embed_max_size: usize,
    pub dual_attention_layers: Vec<usize>,
    pub qk_norm: Option<String>,
}

impl Default for Sd3TransformerConfig {
    fn default() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 18,
            attention_head_dim: 64,
            num_attention_heads: 18,
            joint_attention_dim: 4096,
            caption_projection_dim: 1152,
            pooled_projection_dim: 2048,
            out_channels: 16,
            pos_embed_max_size: 96,
            dual_attention_layers: Vec::new(),
            qk_norm: None,
        }
    }
}

impl Sd3TransformerConfig {
    /// `stabilityai/stable-diffusion-3-medium-diffusers` (`sd3-medium`),
    /// `stabilityai/stable-diffusion-3.5-medium` (`sd3.5-medium`: dual attention in the first 13
    /// blocks, RMS qk-norm) and `stabilityai/stable-diffusion-3.5-large` (`sd3.5-large`).
    pub fn preset(name: &str) -> Option<Self> {
        let base = Self { num_layers: 24, num_attention_heads: 24, caption_projection_dim: 1536, pos_embed_max_size: 192, ..Default::default() };
        match name {
            "sd3-medium" => Some(base),
            "sd3.5-medium" => Some(Self {
                pos_embed_max_size: 384,
                dual_attention_layers: (0..13).collect(),
                qk_norm: Some("rms_norm".into()),
                ..base
            }),
            "sd3.5-large" => Some(Self {
                num_layers: 38,
                num_attention_heads: 38,
                caption_projection_dim: 2432,
                qk_norm: Some("rms_norm".into()),
                ..base
            }),
            _ => None,
        }
    }

    /// Width of the transformer (`heads · head_dim`).
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Reads and checks a `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Sd3Error::Io { path: path.into(), source: e })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| Sd3Error::Config { path: path.into(), message: e.to_string() })?;
        let bad = |m: String| Err(Sd3Error::Config { path: path.into(), message: m });
        if cfg.dual_attention_layers.iter().any(|&i| i >= cfg.num_layers) {
            return bad(format!("dual_attention_layers {:?} beyond {} layers", cfg.dual_attention_layers, cfg.num_layers));
        }
        if cfg.qk_norm.as_deref().is_some_and(|n| n != "rms_norm") {
            return bad(format!("qk_norm {:?} is not supported (None or rms_norm)", cfg.qk_norm));
        }
        if cfg.caption_projection_dim != cfg.inner_dim() || cfg.patch_size == 0 || cfg.num_layers == 0 {
            return bad(format!(
                "caption_projection_dim {} must equal num_attention_heads·attention_head_dim ({}·{} = {}); patch_size {} and num_layers {} must be positive",
                cfg.caption_projection_dim,
                cfg.num_attention_heads,
                cfg.attention_head_dim,
                cfg.inner_dim(),
                cfg.patch_size,
                cfg.num_layers
            ));
        }
        Ok(cfg)
    }
}
