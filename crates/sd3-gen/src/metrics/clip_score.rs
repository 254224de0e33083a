//! CLIP-Score of generated images against their prompts with a configurable CLIP model (the
//! `clip-cls` port of transformers' `CLIPModel`, its `CLIPImageProcessor` and tokenizer).
//!
//! Two scales are reported:
//! * `clip_score`: the mean raw cosine `cos(E_I, E_T)` of the L2-normalized projected image
//!   and text embeddings (`get_image_features` / `get_text_features`);
//! * `clip_score_100`: torchmetrics' `CLIPScore`: `max(100 · mean_i cos_i, 0)`. torchmetrics sums
//!   `100·cos` over all pairs and clamps the *mean* at 0 in `compute()`, not each pair.
//!
//! and, for the same model, the image–image cosine between each generated image and the real
//! image of its prompt (`clip_image_similarity`, "CLIP-I").
//!
//! Upstream: torchmetrics 1.9.0 `multimodal/clip_score.py` and
//! `functional/multimodal/clip_score.py`; transformers 5.24 `models/clip/modeling_clip.py`.
use std::path::{Path, PathBuf};

use burn::prelude::*;
use clip_cls::preprocess::{ImageProcessor, RgbImage};
use clip_cls::tokenizer::{CONTEXT_LENGTH, ClipTokenizer};
use clip_cls::{ClipModel, load_clip};
use lora_runtime::hub::{HubOptions, resolve_model_dir};

use crate::error::{Result, Sd3Error};

/// Images per CLIP forward pass.
const BATCH: usize = 16;

fn clip_err(e: clip_cls::ClipError) -> Sd3Error {
    Sd3Error::Input(e.to_string())
}

/// A CLIP model with its tokenizer and image processor.
pub struct ClipScorer<B: Backend> {
    pub model: ClipModel<B>,
    pub tokenizer: ClipTokenizer,
    pub processor: ImageProcessor,
}

/// The mean scores of a set of (image, prompt) pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipScore {
    /// Mean raw cosine.
    pub clip_score: f64,
    /// torchmetrics `CLIPScore`: `max(100 · mean cos, 0)`.
    pub clip_score_100: f64,
}

impl ClipScore {
    /// Both scales from the per-pair cosines.
    pub fn from_cosines(cos: &[f64]) -> Result<Self> {
        if cos.is_empty() {
            return Err(Sd3Error::Input("CLIP-Score of no image".into()));
        }
        let mean = cos.iter().sum::<f64>() / cos.len() as f64;
        Ok(Self { clip_score: mean, clip_score_100: (100.0 * mean).max(0.0) })
    }
}

impl<B: Backend> ClipScorer<B> {
    /// A local CLIP directory in HF layout, or a hub id (`openai/clip-vit-large-patch14`).
    pub fn resolve(spec: &str) -> Result<PathBuf> {
        Ok(resolve_model_dir(
            spec,
            &[&["config.json"], &["model.safetensors", "model.safetensors.index.json"], &["tokenizer.json", "vocab.json+merges.txt"]],
            &["preprocessor_config.json", "tokenizer_config.json"],
            &HubOptions::from_env(),
        )?)
    }

    /// `config.json`, weights, tokenizer and `preprocessor_config.json` (if any) of `dir`.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let (model, cfg) = load_clip::<B>(dir, device).map_err(clip_err)?;
        Ok(Self {
            model,
            tokenizer: ClipTokenizer::from_dir(dir).map_err(clip_err)?,
            processor: ImageProcessor::from_dir(dir, &cfg.vision_config).map_err(clip_err)?,
        })
    }

    /// L2-normalized image embeddings `[n, projection_dim]`.
    pub fn image_embeds(&self, images: &[RgbImage], device: &B::Device) -> Tensor<B, 2> {
        let parts: Vec<Tensor<B, 2>> = images.chunks(BATCH).map(|chunk| self.model.get_image_features(self.processor.batch(chunk, device))).collect();
        clip_cls::model::l2_normalize(Tensor::cat(parts, 0))
    }

    /// L2-normalized text embeddings `[n, projection_dim]` (77 tokens, truncated as CLIP's
    /// tokenizer does; the causal mask makes padding irrelevant to the pooled token).
    pub fn text_embeds(&self, texts: &[String], device: &B::Device) -> Tensor<B, 2> {
        let parts: Vec<Tensor<B, 2>> = texts
            .chunks(BATCH)
            .map(|chunk| {
                let ids: Vec<i64> = chunk.iter().flat_map(|t| self.tokenizer.tokenize(t, CONTEXT_LENGTH)).map(i64::from).collect();
                self.model.get_text_features(Tensor::from_data(TensorData::new(ids, [chunk.len(), CONTEXT_LENGTH]), device))
            })
            .collect();
        clip_cls::model::l2_normalize(Tensor::cat(parts, 0))
    }

    /// Cosine of each (image i, prompt i) pair.
    pub fn pair_cosines(&self, images: &[RgbImage], prompts: &[String], device: &B::Device) -> Result<Vec<f64>> {
        if images.len() != prompts.len() || images.is_empty() {
            return Err(Sd3Error::Input(format!("CLIP-Score needs one prompt per image: {} images, {} prompts", images.len(), prompts.len())));
        }
        let (i, t) = (self.image_embeds(images, device), self.text_embeds(prompts, device));
        Ok(row_dots(i, t))
    }

    /// Cosine of each (image a_i, image b_i) pair.
    pub fn image_cosines(&self, a: &[RgbImage], b: &[RgbImage], device: &B::Device) -> Result<Vec<f64>> {
        if a.len() != b.len() || a.is_empty() {
            return Err(Sd3Error::Input(format!("image similarity needs pairs: {} and {} images", a.len(), b.len())));
        }
        Ok(row_dots(self.image_embeds(a, device), self.image_embeds(b, device)))
    }
}

fn row_dots<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Vec<f64> {
    (a * b).sum_dim(1).into_data().iter::<f32>().map(f64::from).collect()
}
