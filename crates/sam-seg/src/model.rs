//! transformers `SamModel`: image encoder, shared Fourier positional embedding, prompt encoder
//! and mask decoder; adapters on the image encoder's attention only (the paper's setting).
//! Upstream: transformers `models/sam/modeling_sam.py` (v5.24); checkpoint `facebook/sam-vit-base`.
use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use serial_lora::half::{as_dtype_of, f32};
use serial_lora::{AdaptedModel, Attention, AttentionSite, ProjNames};

use crate::config::SamConfig;
use crate::error::{Result, SamError};
use crate::mask_decoder::MaskDecoder;
use crate::prompt_encoder::{PositionalEmbedding, PromptEncoder};
use crate::vision_encoder::{RelPos, VisionEncoder, VisionOutput};

#[derive(Module, Debug)]
pub struct SamModel<B: Backend> {
    pub shared_image_embedding: PositionalEmbedding<B>,
    pub vision_encoder: VisionEncoder<B>,
    pub prompt_encoder: PromptEncoder<B>,
    pub mask_decoder: MaskDecoder<B>,
}

/// Prompts for a batch of images, in model-input pixels (after the processor's resize).
#[derive(Clone, Debug, Default)]
pub struct Prompts<B: Backend> {
    /// Points `[b, p, n, 2]` (x, y) and labels `[b, p, n]`: 1 foreground, 0 background,
    /// −1 not a point, −10 padding.
    pub points: Option<(Tensor<B, 4>, Tensor<B, 3, Int>)>,
    /// Boxes `[b, p, 4]` (x0, y0, x1, y1).
    pub boxes: Option<Tensor<B, 3>>,
    /// Low-resolution mask logits `[b, 1, 4·grid, 4·grid]`.
    pub masks: Option<Tensor<B, 4>>,
}

/// `SamImageSegmentationOutput`.
pub struct SamOutput<B: Backend> {
    /// Low-resolution mask logits `[b, p, m, 4·grid, 4·grid]`.
    pub pred_masks: Tensor<B, 5>,
    /// `[b, p, m]`.
    pub iou_scores: Tensor<B, 3>,
}

impl<B: Backend> SamModel<B> {
    /// A model with random weights of the given shape (to be overwritten by a checkpoint).
    pub fn new(c: &SamConfig, device: &B::Device) -> Self {
        Self {
            shared_image_embedding: PositionalEmbedding::new(&c.vision_config, device),
            vision_encoder: VisionEncoder::new(&c.vision_config, device),
            prompt_encoder: PromptEncoder::new(&c.prompt_encoder_config, device),
            mask_decoder: MaskDecoder::new(&c.mask_decoder_config, device),
        }
    }

    /// The model for square inputs of `size` pixels (a multiple of the patch size), for cheaper
    /// runs than the checkpoint's 1024: the absolute position embedding is resized bilinearly and
    /// the global layers' relative-position tables linearly (`align_corners=False`, as
    /// `SamVisionAttention.get_rel_pos` resizes them); windowed layers keep theirs. `cfg` is
    /// updated to match.
    pub fn with_image_size(mut self, cfg: &mut SamConfig, size: usize) -> Result<Self> {
        let v = &cfg.vision_config;
        if size == 0 || !size.is_multiple_of(v.patch_size) {
            return Err(SamError::Config {
                path: "--image-size".into(),
                message: format!("{size} is not a positive multiple of the patch size {}", v.patch_size),
            });
        }
        let g = size / v.patch_size;
        serial_lora::parse::elements(
            "the resized position embedding",
            &[("--image-size / patch_size", g), ("--image-size / patch_size", g), ("vision_config.hidden_size", v.hidden_size)],
        )
        .map_err(|message| SamError::Config { path: "--image-size".into(), message })?;
        if g == v.grid() {
            return Ok(self);
        }
        let bilinear = InterpolateOptions { mode: InterpolateMode::Bilinear, align_corners: false };
        let enc = &mut self.vision_encoder;
        if let Some(p) = enc.pos_embed.take() {
            let dtype = p.val().dtype();
            let resized = interpolate(f32(p.val()).permute([0, 3, 1, 2]), [g, g], bilinear.clone()).permute([0, 2, 3, 1]);
            let resized = as_dtype_of(resized, dtype);
            enc.pos_embed = Some(Param::initialized(p.id, resized.detach()).set_require_grad(false));
        }
        let resize_table = |t: Param<Tensor<B, 2>>| {
            let [_, hd] = t.dims();
            // [L, hd] as [1, hd, 1, L]: bilinear over a height of 1 is linear along L
            let dtype = t.val().dtype();
            let x = f32(t.val()).transpose().unsqueeze_dim::<3>(1).unsqueeze::<4>();
            let r = as_dtype_of(interpolate(x, [1, 2 * g - 1], bilinear.clone()).reshape([hd, 2 * g - 1]).transpose(), dtype);
            Param::initialized(t.id, r.detach()).set_require_grad(false)
        };
        for layer in enc.layers.iter_mut().filter(|l| l.window_size == 0) {
            if let Some(rp) = layer.rel_pos.take() {
                layer.rel_pos = Some(RelPos { rel_pos_h: resize_table(rp.rel_pos_h), rel_pos_w: resize_table(rp.rel_pos_w) });
            }
        }
        self.prompt_encoder.input_image_size = size;
        self.prompt_encoder.image_embedding_size = g;
        cfg.vision_config.image_size = size;
        cfg.prompt_encoder_config.image_size = size;
        Ok(self)
    }

    /// The image encoder's outputs (`last_hidden_state` = image embeddings `[b, c, g, g]`).
    pub fn vision(&self, pixel_values: Tensor<B, 4>) -> VisionOutput<B> {
        self.vision_encoder.forward(pixel_values)
    }

    /// `get_image_embeddings`.
    pub fn get_image_embeddings(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 4> {
        self.vision(pixel_values).last_hidden_state
    }

    /// `get_image_wide_positional_embeddings`: `[1, c, g, g]`.
    pub fn image_positional_embeddings(&self) -> Tensor<B, 4> {
        self.shared_image_embedding.image_wide(self.prompt_encoder.image_embedding_size)
    }

    /// `get_prompt_embeddings`: sparse `[b, p, t, c]` (or `None`) and dense `[b, c, g, g]`.
    pub fn prompt_embeddings(&self, prompts: &Prompts<B>, batch: usize) -> (Option<Tensor<B, 4>>, Tensor<B, 4>) {
        self.prompt_encoder.forward(&self.shared_image_embedding, prompts.points.clone(), prompts.boxes.clone(), prompts.masks.clone(), batch)
    }

    /// `SamModel.forward(image_embeddings=…)`: masks and IoU scores for precomputed image
    /// embeddings. Prompt shapes are checked against each other and the batch.
    pub fn forward(&self, image_embeddings: Tensor<B, 4>, prompts: &Prompts<B>, multimask: bool) -> Result<SamOutput<B>> {
        let b = image_embeddings.dims()[0];
        let point_batch = prompts.points.as_ref().map(|(p, l)| {
            let (pd, ld) = (p.dims(), l.dims());
            (pd[0], pd[1], pd[2] == ld[2] && pd[0] == ld[0] && pd[1] == ld[1])
        });
        if let Some((pb, pp, labels_fit)) = point_batch {
            if pb != b || !labels_fit {
                return Err(SamError::Prompt(format!("points for {pb} image(s) (labels must match) but {b} image embedding(s)")));
            }
            if let Some(bx) = &prompts.boxes
                && bx.dims()[1] != pp
            {
                return Err(SamError::Prompt(format!("{} box(es) per image but {pp} point set(s); they must match", bx.dims()[1])));
            }
        }
        if let Some(bx) = &prompts.boxes
            && bx.dims()[0] != b
        {
            return Err(SamError::Prompt(format!("boxes for {} image(s) but {b} image embedding(s)", bx.dims()[0])));
        }
        let pe = self.image_positional_embeddings().expand([b as i64, -1, -1, -1]);
        let (sparse, dense) = self.prompt_embeddings(prompts, b);
        let (pred_masks, iou_scores) = self.mask_decoder.forward(image_embeddings, pe, sparse, dense, multimask);
        Ok(SamOutput { pred_masks, iou_scores })
    }
}

/// transformers `SamVisionAttention`'s projection names: fused `qkv`, output `proj` (the adapter
/// file keys of the image encoder's attention blocks).
pub const SAM_VISION_PROJ_NAMES: ProjNames = ProjNames { q: "q", k: "k", v: "v", qkv: "qkv", o: "proj", serial: "serial_" };

/// Adaptable blocks: the image encoder's layers, `vision_encoder.layers.{i}.attn` (fused `qkv`,
/// output `proj`). The prompt encoder and mask decoder stay frozen.
impl<B: Backend> AdaptedModel<B> for SamModel<B> {
    fn attention_sites(&self) -> Vec<AttentionSite<'_, B>> {
        let layers = self.vision_encoder.layers.iter().enumerate();
        layers.map(|(i, l)| AttentionSite { path: format!("vision_encoder.layers.{i}.attn"), names: SAM_VISION_PROJ_NAMES, attention: &l.attn }).collect()
    }

    fn try_map_attention(mut self, f: &mut dyn FnMut(usize, Attention<B>) -> serial_lora::Result<Attention<B>>) -> serial_lora::Result<Self> {
        let layers = std::mem::take(&mut self.vision_encoder.layers);
        self.vision_encoder.layers = layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| Ok(crate::vision_encoder::VisionLayer { attn: f(i, l.attn)?, ..l }))
            .collect::<serial_lora::Result<_>>()?;
        Ok(self)
    }
}
