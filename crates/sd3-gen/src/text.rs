//! Prompt encoding as diffusers' `StableDiffusion3Pipeline.encode_prompt`: CLIP-L and CLIP-G
//! (`CLIPTextModelWithProjection`, the `clip-cls` text tower) penultimate hidden states
//! concatenated and zero-padded to the T5 width (= `joint_attention_dim`), followed on the
//! sequence axis by `max_sequence_length` T5 tokens: the `T5EncoderModel` output of
//! `text_encoder_3` (`_get_t5_prompt_embeds`: padded/truncated to `max_sequence_length`, no
//! attention mask), or zeros without it (`text_encoder_3=None`); pooled = both projected pooled
//! outputs concatenated. Upstream: diffusers `pipeline_stable_diffusion_3.py::encode_prompt` (v0.42.1).
use std::path::Path;

use burn::prelude::*;
use clip_cls::tokenizer::{CONTEXT_LENGTH, ClipTokenizer};
use clip_cls::{ClipTextModelWithProjection, load_clip_text};

use crate::error::{Result, Sd3Error};
use crate::t5::{T5EncoderModel, load_t5};
use crate::t5_tokenizer::T5Tokenizer;

/// SD3's third text encoder (`text_encoder_3/`, `tokenizer_3/`).
pub struct T5TextEncoder<B: Backend> {
    pub model: T5EncoderModel<B>,
    pub tokenizer: T5Tokenizer,
}

impl<B: Backend> T5TextEncoder<B> {
    /// `text_encoder_3/` and `tokenizer_3/` of `dir`.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        Ok(Self { model: load_t5(&dir.join("text_encoder_3"), device)?.0, tokenizer: T5Tokenizer::from_dir(&dir.join("tokenizer_3"))? })
    }

    /// Token ids `[b, max_sequence_length]` as `tokenizer_3(prompts, padding="max_length",
    /// max_length=max_sequence_length, truncation=True)`.
    pub fn token_ids(&self, prompts: &[String], max_sequence_length: usize) -> Result<Vec<Vec<u32>>> {
        let vocab = self.model.vocab_size();
        prompts
            .iter()
            .map(|p| {
                let ids = self.tokenizer.tokenize(p, max_sequence_length)?;
                match ids.iter().find(|&&i| i as usize >= vocab) {
                    Some(i) => Err(Sd3Error::Input(format!("tokenizer_3 gives id {i} for {p:?}, beyond text_encoder_3's vocab_size {vocab}"))),
                    None => Ok(ids),
                }
            })
            .collect()
    }

    /// `_get_t5_prompt_embeds`: `[b, max_sequence_length, d_model]`.
    pub fn encode(&self, prompts: &[String], max_sequence_length: usize, device: &B::Device) -> Result<Tensor<B, 3>> {
        if max_sequence_length == 0 {
            return Err(Sd3Error::Input("max_sequence_length must be at least 1 for the T5 encoder".into()));
        }
        let ids: Vec<i64> = self.token_ids(prompts, max_sequence_length)?.into_iter().flatten().map(i64::from).collect();
        Ok(self.model.forward(Tensor::from_data(TensorData::new(ids, [prompts.len(), max_sequence_length]), device)))
    }
}

/// The two CLIP text encoders of an SD3 directory with their tokenizers.
pub struct TextEncoders<B: Backend> {
    pub clip_l: ClipTextModelWithProjection<B>,
    pub tokenizer_l: ClipTokenizer,
    pub clip_g: ClipTextModelWithProjection<B>,
    pub tokenizer_g: ClipTokenizer,
}

fn clip_err(e: clip_cls::ClipError) -> Sd3Error {
    Sd3Error::Input(e.to_string())
}

impl<B: Backend> TextEncoders<B> {
    /// `text_encoder/`, `tokenizer/`, `text_encoder_2/`, `tokenizer_2/` of `dir`.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        Ok(Self {
            clip_l: load_clip_text(&dir.join("text_encoder"), device).map_err(clip_err)?,
            tokenizer_l: ClipTokenizer::from_dir(&dir.join("tokenizer")).map_err(clip_err)?,
            clip_g: load_clip_text(&dir.join("text_encoder_2"), device).map_err(clip_err)?,
            tokenizer_g: ClipTokenizer::from_dir(&dir.join("tokenizer_2")).map_err(clip_err)?,
        })
    }

    /// `(prompt_embeds [b, 77 + t5_tokens, joint_dim], pooled_prompt_embeds [b, proj_l + proj_g])`
    /// with zeros for the T5 tokens (diffusers with `text_encoder_3=None`).
    pub fn encode(&self, prompts: &[String], joint_dim: usize, t5_tokens: usize, device: &B::Device) -> Result<(Tensor<B, 3>, Tensor<B, 2>)> {
        self.encode_with_t5(prompts, joint_dim, None, t5_tokens, device)
    }

    /// As [`TextEncoders::encode`], with the T5 tokens from `t5` when given (its width must be
    /// `joint_dim`, as the transformer's `context_embedder` reads it).
    pub fn encode_with_t5(
        &self,
        prompts: &[String],
        joint_dim: usize,
        t5: Option<&T5TextEncoder<B>>,
        t5_tokens: usize,
        device: &B::Device,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 2>)> {
        let b = prompts.len();
        let run = |model: &ClipTextModelWithProjection<B>, tok: &ClipTokenizer| {
            let ids: Vec<i64> = prompts.iter().flat_map(|p| tok.tokenize(p, CONTEXT_LENGTH)).map(i64::from).collect();
            let (pooled, out) = model.forward(Tensor::from_data(TensorData::new(ids, [b, CONTEXT_LENGTH]), device));
            (out.hidden_states[out.hidden_states.len() - 2].clone(), pooled)
        };
        let (hl, pl) = run(&self.clip_l, &self.tokenizer_l);
        let (hg, pg) = run(&self.clip_g, &self.tokenizer_g);
        let width = hl.dims()[2] + hg.dims()[2];
        if width > joint_dim {
            return Err(Sd3Error::Input(format!("CLIP widths {width} exceed the transformer's joint_attention_dim {joint_dim}")));
        }
        let clip = Tensor::cat(vec![hl, hg, Tensor::zeros([b, CONTEXT_LENGTH, joint_dim - width], device)], 2);
        let t5_embeds = match t5 {
            Some(t5) if t5.model.d_model() != joint_dim => {
                return Err(Sd3Error::Input(format!(
                    "text_encoder_3 d_model {} differs from the transformer's joint_attention_dim {joint_dim}",
                    t5.model.d_model()
                )));
            }
            Some(t5) => t5.encode(prompts, t5_tokens, device)?,
            None => Tensor::zeros([b, t5_tokens, joint_dim], device),
        };
        let embeds = Tensor::cat(vec![clip, t5_embeds], 1);
        Ok((embeds, Tensor::cat(vec![pl, pg], 1)))
    }
}
