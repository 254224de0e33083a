//! `transformer/config.json` of a diffusers SD3 pipeline, with diffusers' field names and
//! defaults; presets for the upstream checkpoints.
use std::path::Path;

use serde::{Deserialize, Serialize};
use serial_lora::parse;

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
            "sd3.5-medium" => Some(Self { pos_embed_max_size: 384, dual_attention_layers: (0..13).collect(), qk_norm: Some("rms_norm".into()), ..base }),
            "sd3.5-large" => Some(Self { num_layers: 38, num_attention_heads: 38, caption_projection_dim: 2432, qk_norm: Some("rms_norm".into()), ..base }),
            _ => None,
        }
    }

    /// Width of the transformer (`heads · head_dim`).
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Reads and checks a `config.json`; errors name the file and the field.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Sd3Error::Io { path: path.into(), source: e })?;
        let cfg: Self = parse::json(&text).map_err(|message| Sd3Error::Config { path: path.into(), message })?;
        cfg.validate().map_err(|message| Sd3Error::Config { path: path.into(), message })?;
        Ok(cfg)
    }

    /// Checks every value before anything is computed from it, and that no tensor of the model
    /// exceeds [`parse::MAX_TENSOR_ELEMENTS`] (nor the model [`parse::MAX_MODEL_ELEMENTS`]);
    /// errors name the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let layers = parse::in_range("num_layers", self.num_layers, 1, parse::MAX_LAYERS)?;
        if let Some(i) = self.dual_attention_layers.iter().find(|&&i| i >= layers) {
            return Err(format!("`dual_attention_layers` names block {i}, beyond the {layers} blocks (`num_layers`)"));
        }
        if self.qk_norm.as_deref().is_some_and(|n| n != "rms_norm") {
            return Err(format!("`qk_norm` {:?} is not supported (None or rms_norm)", self.qk_norm));
        }
        let heads = parse::at_least("num_attention_heads", self.num_attention_heads, 1)?;
        let head_dim = parse::at_least("attention_head_dim", self.attention_head_dim, 1)?;
        let d = heads
            .checked_mul(head_dim)
            .filter(|&d| d as u64 <= parse::MAX_TENSOR_ELEMENTS)
            .ok_or_else(|| format!("`num_attention_heads` · `attention_head_dim` = {heads} · {head_dim} is too large"))?;
        if self.caption_projection_dim != d {
            return Err(format!(
                "`caption_projection_dim` = {} must equal `num_attention_heads` · `attention_head_dim` = {heads} · {head_dim} = {d}",
                self.caption_projection_dim
            ));
        }
        let patch = parse::at_least("patch_size", self.patch_size, 1)?;
        let cin = parse::at_least("in_channels", self.in_channels, 1)?;
        let cout = parse::at_least("out_channels", self.out_channels, 1)?;
        let joint = parse::at_least("joint_attention_dim", self.joint_attention_dim, 1)?;
        let pooled = parse::at_least("pooled_projection_dim", self.pooled_projection_dim, 1)?;
        let m = parse::at_least("pos_embed_max_size", self.pos_embed_max_size, 1)?;
        parse::at_least("sample_size", self.sample_size, 1)?;
        let mm = m.checked_mul(m).ok_or_else(|| format!("`pos_embed_max_size` = {m} is too large"))?;
        let pos = parse::elements("the position table", &[("pos_embed_max_size²", mm), ("num_attention_heads · attention_head_dim", d)])?;
        let conv = parse::elements(
            "the patch embedding",
            &[("in_channels", cin), ("num_attention_heads · attention_head_dim", d), ("patch_size", patch), ("patch_size", patch)],
        )?;
        let out = parse::elements(
            "the output projection",
            &[("num_attention_heads · attention_head_dim", d), ("patch_size", patch), ("patch_size", patch), ("out_channels", cout)],
        )?;
        let ctx = parse::elements("the context embedder", &[("joint_attention_dim", joint), ("caption_projection_dim", d)])?;
        let text = parse::elements("the pooled-text embedder", &[("pooled_projection_dim", pooled), ("num_attention_heads · attention_head_dim", d)])?;
        // the widest tensor of a block: the dual-attention AdaNorm, [d, 9·d]
        let ada = parse::elements(
            "an AdaNorm projection",
            &[("num_attention_heads · attention_head_dim", d), ("9 · num_attention_heads · attention_head_dim", d.saturating_mul(9))],
        )?;
        // per block: AdaNorms (≤ 15·d²), two attentions (8·d²), a dual one (4·d²), two MLPs (16·d²)
        let per_block = (ada / 9).saturating_mul(43);
        parse::total_elements(&[
            ("the embeddings", pos.saturating_add(conv).saturating_add(out).saturating_add(ctx).saturating_add(text)),
            ("num_layers", per_block.saturating_mul(layers as u64)),
        ])?;
        Ok(())
    }
}
