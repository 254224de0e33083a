//! # sd3-gen
//!
//! Stable Diffusion 3 on Burn (paper Section III-A): the MMDiT denoiser (diffusers
//! `SD3Transformer2DModel`) with LoRA / Serial LoRA adapters on its joint attention (image
//! stream; context stream optional), the flow-matching schedule and sampling loop, the VAE, and
//! prompt encoding with CLIP-L/G and T5-XXL (`text`, `t5`, `t5_tokenizer`).
//!
//! Upstream: diffusers `models/transformers/transformer_sd3.py`, `models/attention.py`
//! (`JointTransformerBlock`), `models/attention_processor.py` (`JointAttnProcessor2_0`),
//! `schedulers/scheduling_flow_match_euler_discrete.py` (v0.42.1); transformers
//! `models/t5/modeling_t5.py` (v5.24.0).
pub mod config;
pub mod data;
pub mod error;
pub mod export;
pub mod load;
pub mod metrics;
pub mod mmdit;
pub mod pipeline;
pub mod scheduler;
pub mod t5;
pub mod t5_tokenizer;
pub mod text;
pub mod train;
pub mod vae;

pub use config::Sd3TransformerConfig;
pub use error::{Result, Sd3Error};
pub use load::load_transformer;
pub use mmdit::Sd3Transformer;
