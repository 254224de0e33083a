//! # sam-seg
//!
//! SAM (transformers `SamModel`: ViT-B/L/H image encoder, prompt encoder, mask decoder) on Burn
//! with LoRA / Serial LoRA adapters on the image-encoder attention (paper Section III-C).
//!
//! Upstream: transformers `src/transformers/models/sam/modeling_sam.py` (v5.24.0); weights
//! `facebook/sam-vit-base` on the HF hub.
pub mod config;
pub mod data;
pub mod error;
pub mod export;
pub mod load;
pub mod mask_decoder;
pub mod model;
pub mod processor;
pub mod prompt_encoder;
pub mod train;
pub mod vision_encoder;

pub use config::{SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig};
pub use error::{Result, SamError};
pub use load::{load_sam, load_sam_sized};
pub use model::{Prompts, SamModel, SamOutput};
