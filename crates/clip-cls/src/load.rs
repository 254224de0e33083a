//! Loading a CLIP checkpoint in HF layout (`config.json` + `model.safetensors`, or sharded
//! `model.safetensors.index.json`): one key table, every load checked.
use std::collections::BTreeSet;
use std::path::Path;

use burn::module::Param;
use burn::prelude::*;
use lora_runtime::weights::{KeyTable, load_safetensors, read_tensor};

use crate::config::ClipConfig;
use crate::error::{ClipError, Result};
use crate::model::ClipModel;

/// HF `CLIPModel` keys → Burn paths. Everything not listed maps by identical name
/// (`text_model.encoder.layers.3.mlp.fc1.weight`, …); norms' `weight`/`bias` become
/// `gamma`/`beta` and `Linear` weights are transposed by the PyTorch adapter.
pub const KEY_TABLE: KeyTable = KeyTable {
    rules: &[&[
        (r"^(.+)\.self_attn\.q_proj\.(weight|bias)$", "$1.self_attn.qkv.Separate.q.base.$2"),
        (r"^(.+)\.self_attn\.k_proj\.(weight|bias)$", "$1.self_attn.qkv.Separate.k.base.$2"),
        (r"^(.+)\.self_attn\.v_proj\.(weight|bias)$", "$1.self_attn.qkv.Separate.v.base.$2"),
        (r"^(.+)\.self_attn\.out_proj\.(weight|bias)$", "$1.self_attn.o.base.$2"),
    ]],
    // buffers of older checkpoints
    ignore: &[r"\.position_ids$"],
    // a 0-d tensor; the module holds it as [1]
    by_hand: &["logit_scale"],
};

/// Loads a CLIP model from a local directory in HF layout.
pub fn load_clip<B: Backend>(dir: &Path, device: &B::Device) -> Result<(ClipModel<B>, ClipConfig)> {
    let config = ClipConfig::from_json_file(&dir.join("config.json"))?;
    let mut model = ClipModel::new(&config, device);
    let single = dir.join("model.safetensors");
    let files = if single.is_file() { vec![single] } else { crate::load::shards(dir)? };
    let mut missing: Option<BTreeSet<String>> = None;
    let mut logit_scale = None;
    for file in &files {
        let (m, report) = load_safetensors(model, file, &KEY_TABLE, files.len() > 1)?;
        model = m;
        let now: BTreeSet<String> = report.missing.into_iter().collect();
        missing = Some(match missing {
            None => now,
            Some(before) => before.intersection(&now).cloned().collect(),
        });
        if logit_scale.is_none() {
            logit_scale = read_tensor(file, "logit_scale")?;
        }
    }
    if let Some(missing) = missing.filter(|m| !m.is_empty()) {
        let list: Vec<_> = missing.into_iter().collect();
        return Err(lora_runtime::Error::WeightsMismatch {
            path: dir.into(),
            report: format!("  missing in every shard ({}):\n    {}\n", list.len(), list.join("\n    ")),
        }
        .into());
    }
    let logit_scale = logit_scale.ok_or_else(|| lora_runtime::Error::WeightsMismatch {
        path: files[0].clone(),
        report: "  missing (parameters of the model the file does not provide) (1):\n    logit_scale\n".into(),
    })?;
    if logit_scale.data.len() != 1 {
        return Err(lora_runtime::Error::WeightsMismatch {
            path: files[0].clone(),
            report: format!("  wrong shape: logit_scale {:?}, expected a scalar\n", logit_scale.shape),
        }
        .into());
    }
    model.logit_scale = Param::from_tensor(Tensor::from_floats([logit_scale.data[0]], device));
    Ok((model, config))
}

/// Loads a `CLIPTextModelWithProjection` directory (`config.json` = a `CLIPTextConfig` with
/// `projection_dim`, `model.safetensors`), e.g. SD3's `text_encoder/` and `text_encoder_2/`.
pub fn load_clip_text<B: Backend>(dir: &Path, device: &B::Device) -> Result<crate::model::ClipTextModelWithProjection<B>> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ClipError::Io { path: path.clone(), source: e })?;
    let bad = |m: String| ClipError::Config { path: path.clone(), message: m };
    let cfg: crate::config::ClipTextConfig = serial_lora::parse::json(&text).map_err(bad)?;
    #[derive(serde::Deserialize)]
    struct Projection {
        projection_dim: usize,
    }
    let proj = serial_lora::parse::json::<Projection>(&text).map_err(bad)?.projection_dim;
    cfg.validate("").map_err(bad)?;
    serial_lora::parse::at_least("projection_dim", proj, 1).map_err(bad)?;
    serial_lora::parse::elements("the text projection", &[("hidden_size", cfg.hidden_size), ("projection_dim", proj)]).map_err(bad)?;
    let model = crate::model::ClipTextModelWithProjection::new(&cfg, proj, device);
    let (model, _) = load_safetensors(model, &dir.join("model.safetensors"), &KEY_TABLE, false)?;
    Ok(model)
}

/// The shard files named by `model.safetensors.index.json`, in order.
fn shards(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|e| ClipError::Io {
        path: dir.join("model.safetensors"),
        source: std::io::Error::new(e.kind(), format!("no model.safetensors and no readable model.safetensors.index.json ({e})")),
    })?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let bad = |message: String| ClipError::Config { path: index.clone(), message };
    let v: Index = serial_lora::parse::json(&text).map_err(bad)?;
    let files: BTreeSet<&str> = v.weight_map.values().map(String::as_str).collect();
    files.into_iter().map(|f| serial_lora::parse::contained_path(dir, f).map_err(|m| bad(format!("`weight_map`: {m}")))).collect()
}
