//! # sd3-gen
//!
//! Stable Diffusion 3 on Burn (paper Section III-A): the MMDiT denoiser (diffusers
//! `SD3Transformer2DModel`) with LoRA / Serial LoRA adapters on its joint attention, and the
//! flow-matching schedule. Work in progress: the VAE, the text encoders and the sampling
//! pipeline are not here yet.
//!
//! Upstream: diffusers `models/transformers/transformer_sd3.py`, `models/attention.py`
//! (`JointTransformerBlock`), `models/attention_processor.py` (`JointAttnProcessor2_0`),
//! `schedulers/scheduling_flow_match_euler_discrete.py` (v0.42.1).
pub mod config;
pub mod data;
pub mod error;
pub mod load;
pub mod metrics;
pub mod mmdit;
pub mod pipeline;
pub mod scheduler;
pub mod text;
pub mod train;
pub mod vae;

pub use config::Sd3TransformerConfig;
pub use error::{Result, Sd3Error};
pub use load::load_transformer;
pub use mmdit::Sd3Transformer;
