//! Prompt encoding as diffusers' `StableDiffusion3Pipeline.encode_prompt` without the T5 encoder
//! (`text_encoder_3=None`): CLIP-L and CLIP-G (`CLIPTextModelWithProjection`, the `clip-cls`
//! text tower) penultimate hidden states concatenated and zero-padded to `joint_attention_dim`,
//! followed by `max_sequence_length` zero T5 tokens; pooled = both projected pooled outputs
//! concatenated. Upstream: diffusers `pipeline_stable_diffusion_3.py::encode_prompt` (v0.42.1).
use std::path::Path;

use burn::prelude::*;
use clip_cls::tokenizer::{CONTEXT_LENGTH, ClipTokenizer};
use clip_cls::{ClipTextModelWithProjection, load_clip_text};

use crate::error::{Result, Sd3Error};

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

    /// `(prompt_embeds [b, 77 + t5_tokens, joint_dim], pooled_prompt_embeds [b, proj_l + proj_g])`.
    pub fn encode(&self, prompts: &[String], joint_dim: usize, t5_tokens: usize, device: &B::Device) -> Result<(Tensor<B, 3>, Tensor<B, 2>)> {
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
        let embeds = Tensor::cat(vec![clip, Tensor::zeros([b, t5_tokens, joint_dim], device)], 1);
        Ok((embeds, Tensor::cat(vec![pl, pg], 1)))
    }
}
