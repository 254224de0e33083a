//! # clip-cls
//!
//! CLIP (transformers `CLIPModel`: ViT-B/32, ViT-B/16, ViT-L/14) on Burn with LoRA / Serial LoRA
//! adapters on both towers (paper Section III-B).
//!
//! Upstream: transformers `src/transformers/models/clip/modeling_clip.py` (v5.24.0); weights
//! `openai/clip-vit-base-patch16` on the HF hub.
pub mod config;
pub mod data;
pub mod encoder;
pub mod error;
pub mod export;
pub mod load;
pub mod model;
pub mod preprocess;
pub mod text_model;
pub mod tokenizer;
pub mod train;
pub mod vision_model;

pub use config::{ClipConfig, ClipTextConfig, ClipVisionConfig};
pub use error::{ClipError, Result};
pub use load::{load_clip, load_clip_text};
pub use model::{ClipModel, ClipTextModelWithProjection};
