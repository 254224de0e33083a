//! `clip-cls export`: a merged CLIP in transformers' layout (`CLIPModel.from_pretrained` loads
//! it): `config.json`, tokenizer and preprocessor files copied, `model.safetensors` rewritten
//! with every adapter folded in (see [`lora_runtime::export`]).
use std::path::Path;

use burn::prelude::*;
use lora_runtime::export::{ExportOptions, ExportSummary, TRANSFORMERS_MAX_SHARD, WeightedAdapter, WeightsSpec, export_model, is_weights_file};
use serial_lora::io;

use crate::error::Result;
use crate::load::load_clip;

/// Exports the CLIP model of `dir` with `adapters` merged into `out`.
pub fn export_clip<B: Backend>(dir: &Path, adapters: &[WeightedAdapter], opts: &ExportOptions, out: &Path, device: &B::Device) -> Result<ExportSummary> {
    let (model, _) = load_clip::<B>(dir, device)?;
    let spec = WeightsSpec {
        sub: "",
        stem: "model",
        rename: &[],
        drop: &[],
        dtype: opts.dtype,
        max_shard_bytes: opts.max_shard_bytes.unwrap_or(TRANSFORMERS_MAX_SHARD),
    };
    let mut load = |m, a: &Path| io::load_adapter(m, a, device).map(|(m, _)| m);
    let skip = |rel: &Path| is_weights_file(&rel.to_string_lossy());
    Ok(export_model(model, adapters, &mut load, dir, &spec, out, opts.force, &skip)?)
}
