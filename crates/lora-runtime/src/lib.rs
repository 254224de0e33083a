//! # lora-runtime
//!
//! What the task crates (`clip-cls`, `sam-seg`, `sd3-gen`) share to *run* a model with adapters,
//! on top of the `serial-lora` library: model resolution through the HF hub ([`hub`]),
//! checked weight loading by key table ([`weights`]), Pillow-exact image decoding ([`imaging`]),
//! run-time backend selection ([`DeviceSpec`], [`dispatch!`]), training runs (run directories,
//! checkpoints, schedules, seeded streams: [`run`]), the one training driver of every task
//! ([`train`]: [`train::TrainTask`], [`train::train_loop`]), data-parallel training ([`dist`]), merged
//! transformers / diffusers exports ([`export`]), step timing ([`perf`]) and the allocator
//! settings of the programs ([`alloc`]).
//!
//! Dependency graph: `serial-lora` (the adapter library, lean) ← `lora-runtime` ← each task
//! crate.
pub mod alloc;
pub mod cli;
pub mod device;
pub mod dist;
pub mod error;
pub mod export;
pub mod hub;
pub mod imaging;
pub mod perf;
pub mod run;
pub mod train;
pub mod weights;

pub use device::DeviceSpec;
pub use error::{Error, Result};
