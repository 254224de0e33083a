//! `sam-seg export`: a merged SAM in transformers' layout (`SamModel.from_pretrained` loads it),
//! also from a segment-anything checkpoint (keys renamed as transformers' `convert_sam_to_hf.py`
//! does, the pixel normalization buffers left out): `config.json` and the processor config
//! copied, `model.safetensors` rewritten with every adapter folded in (see
//! [`lora_runtime::export`]).
use std::path::Path;

use burn::prelude::*;
use lora_runtime::export::{ExportOptions, ExportSummary, TRANSFORMERS_MAX_SHARD, WeightedAdapter, WeightsSpec, export_model, is_weights_file};
use lora_runtime::weights::tensor_names;
use serial_lora::io;

use crate::error::Result;
use crate::load::{ORIGINAL_TO_HF, load_sam};

/// Exports the SAM model of `dir` with `adapters` merged into `out`.
pub fn export_sam<B: Backend>(dir: &Path, adapters: &[WeightedAdapter], opts: &ExportOptions, out: &Path, device: &B::Device) -> Result<ExportSummary> {
    let (model, _) = load_sam::<B>(dir, device)?;
    let original = tensor_names(&dir.join("model.safetensors"))?.iter().any(|k| k.starts_with("image_encoder."));
    let spec = WeightsSpec {
        sub: "",
        stem: "model",
        rename: if original { ORIGINAL_TO_HF } else { &[] },
        drop: if original { &[r"^pixel_(mean|std)$"] } else { &[] },
        dtype: opts.dtype,
        max_shard_bytes: opts.max_shard_bytes.unwrap_or(TRANSFORMERS_MAX_SHARD),
    };
    let mut load = |m, a: &Path| io::load_adapter(m, a, device).map(|(m, _)| m);
    let skip = |rel: &Path| is_weights_file(&rel.to_string_lossy());
    Ok(export_model(model, adapters, &mut load, dir, &spec, out, opts.force, &skip)?)
}
