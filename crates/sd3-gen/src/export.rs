//! Several adapters on the MMDiT at inference, and `sd3-gen export`: a full diffusers pipeline
//! directory (`StableDiffusion3Pipeline.from_pretrained` loads it) with `transformer/` rewritten
//! with every adapter folded in (sharded with an index above diffusers' 10 GB) and every other
//! component copied (see [`lora_runtime::export`]).
use std::path::Path;

use burn::prelude::*;
use lora_runtime::export::{DIFFUSERS_MAX_SHARD, ExportOptions, ExportSummary, WeightedAdapter, WeightsSpec, export_model, is_weights_file, merge_weighted};
use serial_lora::io;

use crate::error::Result;
use crate::load::load_transformer;
use crate::mmdit::{Sd3Transformer, adapter_has_context_keys};

/// Key prefix of the transformer's adapters (diffusers' `transformer.`).
pub const PREFIX: &str = "transformer.";

/// Loads one adapter into the MMDiT: PEFT layout or diffusers' `pytorch_lora_weights.safetensors`;
/// an adapter with `add_*` keys adapts the context stream too.
pub fn load_one<B: Backend>(mmdit: Sd3Transformer<B>, dir: &Path, device: &B::Device) -> serial_lora::Result<Sd3Transformer<B>> {
    let context = adapter_has_context_keys(dir).map_err(|e| match e {
        crate::Sd3Error::Adapter(e) => e,
        other => serial_lora::Error::AdapterMismatch { path: dir.into(), report: format!("  {other}\n") },
    })?;
    Ok(io::load_adapter_with_prefix(mmdit.with_context_stream(context), dir, device, PREFIX)?.0)
}

/// Merges `adapters` into the MMDiT in order (see [`merge_weighted`]).
pub fn merge_adapters<B: Backend>(mmdit: Sd3Transformer<B>, adapters: &[WeightedAdapter], device: &B::Device) -> Result<Sd3Transformer<B>> {
    let merged = merge_weighted(mmdit, adapters, &mut |m, a| load_one(m, a, device))?;
    Ok(merged.with_context_stream(false))
}

/// Exports the SD3 pipeline of `dir` with `adapters` merged into its transformer into `out`.
pub fn export_sd3<B: Backend>(dir: &Path, adapters: &[WeightedAdapter], opts: &ExportOptions, out: &Path, device: &B::Device) -> Result<ExportSummary> {
    let (model, _) = load_transformer::<B>(dir, device)?;
    let spec = WeightsSpec {
        sub: "transformer",
        stem: "diffusion_pytorch_model",
        rename: &[],
        drop: &[],
        dtype: opts.dtype,
        max_shard_bytes: opts.max_shard_bytes.unwrap_or(DIFFUSERS_MAX_SHARD),
    };
    let mut load = |m, a: &Path| load_one(m, a, device);
    let skip = |rel: &Path| rel.starts_with("transformer") && is_weights_file(&rel.to_string_lossy());
    Ok(export_model(model, adapters, &mut load, dir, &spec, out, opts.force, &skip)?)
}
