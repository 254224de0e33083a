//! # serial-lora
//!
//! LoRA, LoRA+, Serial LoRA and Serial LoRA+ adapters for vision transformers on Burn 0.21,
//! generic over backends.
//!
//! - Paper: Zhong et al., *Serial Low-rank Adaptation of Vision Transformer*, ICME 2025,
//!   arXiv 2503.17750. The exact formulas: `shared/docs/method.md`.
//! - Reference implementations: PEFT (`huggingface/peft`, LoRA semantics, file format,
//!   `create_loraplus_optimizer`), transformers / diffusers attention modules.
//!
//! Building blocks: [`LoraLinear`], [`FusedQkv`], [`SerialLora`], the shared [`Attention`]
//! block, model-level operations through [`AdaptedModel`], the LoRA+ optimizer
//! [`optim::LoraPlus`], PEFT-compatible adapter files ([`io`]) and spectrum analysis
//! ([`analysis`]). Layout convention: Burn's `[in, out]` for every weight; PyTorch's
//! `[out, in]` exists only in files.
//!
//! This crate is the library alone (Burn, serde, safetensors, nalgebra, and on Flex the fused
//! kernels' gemm / rayon; `cargo xtask ci` checks the list): running tasks (hub, images,
//! devices, training runs, data-parallel training, exports) lives in `lora-runtime`.
pub mod analysis;
pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod error;
#[cfg(feature = "flex")]
mod flex;
pub mod half;
pub mod io;
pub mod layers;
#[cfg(feature = "tch")]
mod libtorch;
pub mod lora;
pub mod model;
pub mod optim;
pub mod params;
pub mod parse;
mod prim;
pub mod rng;
pub mod serial;
#[doc(hidden)]
#[cfg(any(feature = "flex", feature = "tch", feature = "cuda"))]
pub mod testing;

pub use attention::{Attention, AttentionConfig, QkvProjection, SeparateQkv, has_fused_attention, merge_heads, sdpa, sdpa_rel_pos};
pub use checkpoint::{checkpoint, with_checkpointing};
pub use config::{AdapterConfig, Init, Method, Projection};
pub use error::{Error, Result};
pub use half::BaseDType;
pub use lora::{FusedQkv, LoraLinear, LoraPair};
pub use model::{AdaptedModel, AttentionSite, AttentionStack, ProjNames};
pub use params::{ParamCountExt, ParamCounts};
pub use serial::SerialLora;

use burn::prelude::*;

/// A tensor's values on the host as f64, row-major.
pub fn host_f64<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}
