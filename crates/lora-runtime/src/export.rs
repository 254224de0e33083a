//! Several adapters at inference, and export of a merged full model in the source layout.
//!
//! - [`merge_weighted`]: loads adapters one after the other, each scaled by its weight
//!   (diffusers' `set_adapters(..., adapter_weights=...)` meaning) and merged before the next:
//!   LoRA deltas add (`W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ`), Serial LoRA transforms compose in the order given
//!   (`W (I + w₁s₁B₁A₁)(I + w₂s₂B₂A₂)`, PyTorch layout). Weight 0 leaves the base weights
//!   untouched (the adapter is still checked against the model).
//! - [`export_model`]: writes the source checkpoint again with every adapter folded in, under
//!   the source's key names (after optional renames, e.g. segment-anything → transformers),
//!   tensor by tensor (one tensor in memory at a time), merged in f64 and written in the
//!   source dtype or a chosen one, sharded with an index above a size, into a temporary
//!   directory renamed into place. The merge is the formula of [`serial_lora::Attention::merge`] in
//!   PyTorch layout: LoRA `W[rows] += s·B·A`, Serial `W ← W + (W·s·B)·A`.
//!
//! Upstream: PEFT `LoraModel.merge_and_unload` / `add_weighted_adapter(combination_type="cat")`,
//! diffusers `fuse_lora`, transformers `save_pretrained` (shard index layout).
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;

use crate::error::{Error, Result};
use serial_lora::attention::{Attention, QkvProjection, SeparateQkv};
use serial_lora::lora::{FusedQkv, LoraLinear, LoraPair};
use serial_lora::model::AdaptedModel;

/// One adapter directory and its weight.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedAdapter {
    pub dir: PathBuf,
    pub weight: f64,
}

/// Pairs `--adapter` directories with `--adapter-weights` (default 1 each). Errors name the
/// flag and the value.
pub fn weighted_adapters(dirs: &[PathBuf], weights: &[f64]) -> Result<Vec<WeightedAdapter>> {
    if !weights.is_empty() && weights.len() != dirs.len() {
        return Err(Error::config(
            "adapter-weights",
            weights.iter().map(f64::to_string).collect::<Vec<_>>().join(","),
            format!("{} weights for {} --adapter directories (give one weight per adapter)", weights.len(), dirs.len()),
        ));
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(Error::config("adapter-weights", w, "must be a finite number"));
    }
    Ok(dirs.iter().enumerate().map(|(i, d)| WeightedAdapter { dir: d.clone(), weight: weights.get(i).copied().unwrap_or(1.0) }).collect())
}

fn map_pairs<B: Backend>(mut a: Attention<B>, f: &mut dyn FnMut(LoraPair<B>) -> Option<LoraPair<B>>) -> Attention<B> {
    a.serial = a.serial.and_then(|s| f(s.pair).map(|pair| serial_lora::serial::SerialLora { pair }));
    fn lin<B: Backend>(l: LoraLinear<B>, f: &mut dyn FnMut(LoraPair<B>) -> Option<LoraPair<B>>) -> LoraLinear<B> {
        LoraLinear { lora: l.lora.and_then(&mut *f), ..l }
    }
    a.qkv = match a.qkv {
        QkvProjection::Separate(s) => QkvProjection::Separate(SeparateQkv { q: lin(s.q, f), k: lin(s.k, f), v: lin(s.v, f) }),
        QkvProjection::Fused(fq) => {
            let FusedQkv { base, q, k, v } = fq;
            QkvProjection::Fused(FusedQkv { base, q: q.and_then(&mut *f), k: k.and_then(&mut *f), v: v.and_then(&mut *f) })
        }
    };
    a.o = a.o.map(|o| lin(o, f));
    a
}

/// Multiplies the scale of every adapter pair of `model` by `weight`.
pub fn scale_adapters<B: Backend, M: AdaptedModel<B>>(model: M, weight: f64) -> Result<M> {
    model
        .try_map_attention(&mut |_, a| {
            Ok(map_pairs(a, &mut |mut p| {
                p.scale *= weight;
                Some(p)
            }))
        })
        .map_err(Error::from)
}

/// Drops every adapter of `model` without merging it.
pub fn remove_adapters<B: Backend, M: AdaptedModel<B>>(model: M) -> Result<M> {
    Ok(model.try_map_attention(&mut |_, a| Ok(map_pairs(a, &mut |_| None)))?)
}

/// Applies `adapters` to a base model in order: each is loaded with `load` (e.g.
/// [`serial_lora::io::load_adapter`]), scaled by its weight and merged ([`AdaptedModel::merge_and_unload`])
/// before the next. A weight of 0 is loaded (so a wrong adapter is still an error) and dropped.
pub fn merge_weighted<B: Backend, M: AdaptedModel<B>>(
    mut model: M,
    adapters: &[WeightedAdapter],
    load: &mut dyn FnMut(M, &Path) -> serial_lora::Result<M>,
) -> Result<M> {
    for a in adapters {
        let loaded = load(model, &a.dir)?;
        model = if a.weight == 0.0 { remove_adapters(loaded)? } else { scale_adapters(loaded, a.weight)?.merge_and_unload()? };
    }
    Ok(model)
}

/// One update of a weight matrix `W ∈ [out, in]` (PyTorch layout) of the source checkpoint.
#[derive(Clone, Debug)]
pub enum MergeOp {
    /// LoRA: `W[rows] += B·A`, `B ∈ [rows.len(), r]` with the scale folded in, `A ∈ [r, in]`.
    Lora { key: String, rows: Range<usize>, b: Vec<f64>, a: Vec<f64>, rank: usize },
    /// Serial LoRA: `W ← W (I + B·A)`, `B ∈ [in, r]` with the scale folded in, `A ∈ [r, in]`.
    Serial { key: String, b: Vec<f64>, a: Vec<f64>, rank: usize },
}

impl MergeOp {
    /// The checkpoint key this update applies to.
    pub fn key(&self) -> &str {
        match self {
            MergeOp::Lora { key, .. } | MergeOp::Serial { key, .. } => key,
        }
    }

    /// Applies the update to `w` (`[out, in]`, row-major).
    fn apply(&self, w: &mut [f64], shape: &[usize]) -> std::result::Result<(), String> {
        let [out, inp] = match shape {
            [o, i] => [*o, *i],
            _ => return Err(format!("expected a matrix, the checkpoint has shape {shape:?}")),
        };
        match self {
            MergeOp::Lora { rows, b, a, rank, .. } => {
                let r = *rank;
                if rows.end > out || a.len() != r * inp || b.len() != rows.len() * r {
                    return Err(format!("adapter of rank {r} on rows {rows:?} does not fit shape {shape:?}"));
                }
                for (i, row) in rows.clone().enumerate() {
                    let bi = &b[i * r..(i + 1) * r];
                    let wr = &mut w[row * inp..(row + 1) * inp];
                    for (k, &bk) in bi.iter().enumerate() {
                        let ak = &a[k * inp..(k + 1) * inp];
                        wr.iter_mut().zip(ak).for_each(|(x, &y)| *x += bk * y);
                    }
                }
            }
            MergeOp::Serial { b, a, rank, .. } => {
                let r = *rank;
                if a.len() != r * inp || b.len() != inp * r {
                    return Err(format!("Serial adapter of rank {r} (width {}) does not fit shape {shape:?}", a.len() / r.max(1)));
                }
                for row in 0..out {
                    let wr = &mut w[row * inp..(row + 1) * inp];
                    // (W·B)[row] ∈ [r], from the weights before this update
                    let mut wb = vec![0.0; r];
                    for (j, &x) in wr.iter().enumerate() {
                        let bj = &b[j * r..(j + 1) * r];
                        wb.iter_mut().zip(bj).for_each(|(s, &y)| *s += x * y);
                    }
                    for (k, &c) in wb.iter().enumerate() {
                        let ak = &a[k * inp..(k + 1) * inp];
                        wr.iter_mut().zip(ak).for_each(|(x, &y)| *x += c * y);
                    }
                }
            }
        }
        Ok(())
    }
}

/// `(B ∈ [out, r] · scale, A ∈ [r, in])` of a pair in PyTorch layout, as f64.
fn pair_f64<B: Backend>(p: &LoraPair<B>) -> (Vec<f64>, Vec<f64>, usize) {
    let a = p.lora_a.val().detach(); // [in, r]
    let b = p.lora_b.val().detach(); // [r, out]
    let r = p.rank();
    let a_t: Vec<f64> = serial_lora::host_f64(a.transpose());
    let b_t: Vec<f64> = serial_lora::host_f64(b.transpose()).into_iter().map(|x| x * p.scale).collect();
    (b_t, a_t, r)
}

/// The checkpoint updates that merging the adapters attached to `model` means, in the order
/// [`serial_lora::Attention::merge`] applies them (LoRA pairs, then the Serial transform).
pub fn merge_ops<B: Backend, M: AdaptedModel<B>>(model: &M) -> Vec<MergeOp> {
    let mut ops = Vec::new();
    for site in model.attention_sites() {
        let (a, n) = (site.attention, site.names);
        let key = |name: &str| format!("{}.{name}.weight", site.path);
        match &a.qkv {
            QkvProjection::Separate(s) => {
                for (l, name) in [(&s.q, n.q), (&s.k, n.k), (&s.v, n.v)] {
                    if let Some(p) = &l.lora {
                        let (b, av, rank) = pair_f64(p);
                        ops.push(MergeOp::Lora { key: key(name), rows: 0..l.dims()[1], b, a: av, rank });
                    }
                }
            }
            QkvProjection::Fused(f) => {
                let d = f.slice_dims()[1];
                for (i, p) in f.pairs().into_iter().enumerate() {
                    if let Some(p) = p {
                        let (b, av, rank) = pair_f64(p);
                        ops.push(MergeOp::Lora { key: key(n.qkv), rows: i * d..(i + 1) * d, b, a: av, rank });
                    }
                }
            }
        }
        if let Some(o) = &a.o
            && let Some(p) = &o.lora
        {
            let (b, av, rank) = pair_f64(p);
            ops.push(MergeOp::Lora { key: key(n.o), rows: 0..o.dims()[1], b, a: av, rank });
        }
        if let Some(s) = &a.serial {
            let (b, av, rank) = pair_f64(&s.pair);
            let names: Vec<&str> = match &a.qkv {
                QkvProjection::Separate(_) => vec![n.q, n.k, n.v],
                QkvProjection::Fused(_) => vec![n.qkv],
            };
            for name in names {
                ops.push(MergeOp::Serial { key: key(name), b: b.clone(), a: av.clone(), rank });
            }
        }
    }
    ops
}

/// The merge updates of `adapters` applied in order to a base model: each adapter is loaded
/// into `model` with `load`, scaled by its weight, turned into [`MergeOp`]s and removed again.
/// Weight 0 adds no update. Returns the (adapter-free) model back with the updates.
pub fn weighted_merge_ops<B: Backend, M: AdaptedModel<B>>(
    mut model: M,
    adapters: &[WeightedAdapter],
    load: &mut dyn FnMut(M, &Path) -> serial_lora::Result<M>,
) -> Result<(M, Vec<MergeOp>)> {
    let mut ops = Vec::new();
    for a in adapters {
        let loaded = scale_adapters(load(model, &a.dir)?, a.weight)?;
        if a.weight != 0.0 {
            ops.extend(merge_ops(&loaded));
        }
        model = remove_adapters(loaded)?;
    }
    Ok((model, ops))
}

/// Output precision of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportDtype {
    F32,
    F16,
    Bf16,
}

impl ExportDtype {
    fn safetensors_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "F32",
            ExportDtype::F16 => "F16",
            ExportDtype::Bf16 => "BF16",
        }
    }
    /// transformers' / diffusers' name (`torch_dtype` in `config.json`).
    pub fn torch_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::F16 => "float16",
            ExportDtype::Bf16 => "bfloat16",
        }
    }
}

/// What [`export_model`] writes for the weights of one model (component).
pub struct WeightsSpec<'a> {
    /// Sub-directory of the model directory holding the weights (`""`, `"transformer"`).
    pub sub: &'a str,
    /// File stem: `model` (transformers) or `diffusion_pytorch_model` (diffusers).
    pub stem: &'a str,
    /// Regex renames applied in order to every source key (e.g. segment-anything → HF names).
    pub rename: &'a [(&'a str, &'a str)],
    /// Regexes of (renamed) source keys not written (buffers the target layout does not keep).
    pub drop: &'a [&'a str],
    /// Output dtype of every float tensor; `None`: each tensor's own.
    pub dtype: Option<ExportDtype>,
    /// Largest shard in bytes (transformers' / diffusers' `max_shard_size`).
    pub max_shard_bytes: u64,
}

/// transformers' default `max_shard_size` ("5GB").
pub const TRANSFORMERS_MAX_SHARD: u64 = 5_000_000_000;
/// diffusers' default `max_shard_size` ("10GB").
pub const DIFFUSERS_MAX_SHARD: u64 = 10_000_000_000;

/// What an export wrote.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ExportSummary {
    pub tensors: usize,
    pub merged_tensors: usize,
    pub shards: usize,
    pub bytes: u64,
}

struct SourceTensor {
    key: String,
    file: PathBuf,
    dtype: String,
    shape: Vec<usize>,
    offset: u64,
    len: usize,
}

/// The weight files of `dir`: `<stem>.safetensors`, or the shards of its index.
pub fn weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    let text = std::fs::read_to_string(&index)
        .map_err(|e| Error::io(&single, std::io::Error::new(e.kind(), format!("no {stem}.safetensors and no readable {stem}.safetensors.index.json ({e})"))))?;
    let bad = |message: String| Error::Parse { path: index.clone(), format: "safetensors index", message };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no `weight_map` object".into()))?;
    let files: std::collections::BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
    if files.is_empty() {
        return Err(bad("`weight_map` names no file".into()));
    }
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn list_tensors(files: &[PathBuf], spec: &WeightsSpec) -> Result<Vec<SourceTensor>> {
    let bad_re = |r: &str, e: regex::Error| Error::config("rename", r, e.to_string());
    let rename: Vec<(regex::Regex, &str)> =
        spec.rename.iter().map(|(f, t)| regex::Regex::new(f).map(|r| (r, *t)).map_err(|e| bad_re(f, e))).collect::<Result<_>>()?;
    let drop: Vec<regex::Regex> = spec.drop.iter().map(|r| regex::Regex::new(r).map_err(|e| bad_re(r, e))).collect::<Result<_>>()?;
    let mut out: BTreeMap<String, SourceTensor> = BTreeMap::new();
    for file in files {
        let bad = |message: String| Error::Safetensors { path: file.clone(), message };
        let (_, header, n) = crate::weights::read_header(file)?;
        let obj = header.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
        for (key, info) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
            let nums = |v: Option<&serde_json::Value>| -> Option<Vec<usize>> { v?.as_array()?.iter().map(|x| x.as_u64().map(|x| x as usize)).collect() };
            let dtype = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad(format!("tensor `{key}`: no dtype")))?;
            let shape = nums(info.get("shape")).ok_or_else(|| bad(format!("tensor `{key}`: malformed shape")))?;
            let off = nums(info.get("data_offsets")).filter(|o| o.len() == 2 && o[0] <= o[1]);
            let off = off.ok_or_else(|| bad(format!("tensor `{key}`: malformed data_offsets")))?;
            let renamed = rename.iter().fold(key.clone(), |k, (r, t)| r.replace_all(&k, *t).into_owned());
            if drop.iter().any(|r| r.is_match(&renamed)) {
                continue;
            }
            let t = SourceTensor { key: renamed.clone(), file: file.clone(), dtype: dtype.into(), shape, offset: 8 + n + off[0] as u64, len: off[1] - off[0] };
            if let Some(prev) = out.insert(renamed.clone(), t) {
                return Err(bad(format!("tensor `{renamed}` is also in {} (after renaming)", prev.file.display())));
            }
        }
    }
    Ok(out.into_values().collect())
}

fn float_dtype(name: &str) -> Option<DType> {
    match name {
        "F32" => Some(DType::F32),
        "F16" => Some(DType::F16),
        "BF16" => Some(DType::BF16),
        "F64" => Some(DType::F64),
        _ => None,
    }
}

fn dtype_size(name: &str) -> Option<usize> {
    Some(match name {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// Writes the merged weights of `spec` from the model directory `src` into `dst` (the same
/// sub-directory), applying `ops` in order. Every op must find its key.
pub fn write_merged_weights(src: &Path, dst: &Path, spec: &WeightsSpec, ops: &[MergeOp]) -> Result<ExportSummary> {
    let files = weight_files(&src.join(spec.sub), spec.stem)?;
    let tensors = list_tensors(&files, spec)?;
    let mut by_key: BTreeMap<&str, Vec<&MergeOp>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key()).or_default().push(op);
    }
    if let Some(missing) = by_key.keys().find(|k| !tensors.iter().any(|t| t.key == **k)) {
        return Err(Error::Safetensors { path: files[0].clone(), message: format!("the adapter updates `{missing}`, which the checkpoint does not hold") });
    }
    // output dtype and byte size of each tensor
    let plan: Vec<(&SourceTensor, String, usize)> = tensors
        .iter()
        .map(|t| {
            let out_dtype = match (float_dtype(&t.dtype), spec.dtype) {
                (Some(_), Some(d)) => d.safetensors_name().to_string(),
                _ => t.dtype.clone(),
            };
            let size = dtype_size(&out_dtype).ok_or_else(|| Error::Safetensors {
                path: t.file.clone(),
                message: format!("tensor `{}` has dtype {}, which cannot be exported", t.key, t.dtype),
            })?;
            Ok((t, out_dtype, t.shape.iter().product::<usize>() * size))
        })
        .collect::<Result<_>>()?;
    // shards in key order, each up to max_shard_bytes (a larger tensor gets its own)
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, (_, _, n)) in plan.iter().enumerate() {
        if size > 0 && size + *n as u64 > spec.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push(i);
        }
        size += *n as u64;
    }
    let out_dir = dst.join(spec.sub);
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    let nshards = shards.len();
    let mut summary = ExportSummary { shards: nshards, ..Default::default() };
    let mut weight_map = serde_json::Map::new();
    for (si, shard) in shards.iter().enumerate() {
        let name = if nshards == 1 { format!("{}.safetensors", spec.stem) } else { format!("{}-{:05}-of-{:05}.safetensors", spec.stem, si + 1, nshards) };
        let path = out_dir.join(&name);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut offset = 0usize;
        for &i in shard {
            let (t, dtype, n) = &plan[i];
            header.insert(t.key.clone(), serde_json::json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, offset + n]}));
            offset += n;
            weight_map.insert(t.key.clone(), serde_json::Value::String(name.clone()));
        }
        let mut hbytes = serde_json::to_vec(&header).map_err(|e| Error::Safetensors { path: path.clone(), message: e.to_string() })?;
        while hbytes.len() % 8 != 0 {
            hbytes.push(b' ');
        }
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = std::io::BufWriter::new(file);
        let io = |e| Error::io(&path, e);
        w.write_all(&(hbytes.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&hbytes).map_err(io)?;
        for &i in shard {
            let (t, dtype, _) = &plan[i];
            let bytes = tensor_bytes(t, dtype, by_key.get(t.key.as_str()).map(Vec::as_slice).unwrap_or(&[]))?;
            if by_key.contains_key(t.key.as_str()) {
                summary.merged_tensors += 1;
            }
            w.write_all(&bytes).map_err(io)?;
            summary.tensors += 1;
            summary.bytes += bytes.len() as u64;
        }
        w.flush().map_err(io)?;
        w.into_inner().map_err(|e| Error::io(&path, e.into_error()))?.sync_all().map_err(io)?;
    }
    if nshards > 1 {
        let index = serde_json::json!({"metadata": {"total_size": summary.bytes}, "weight_map": weight_map});
        let path = out_dir.join(format!("{}.safetensors.index.json", spec.stem));
        let text = serde_json::to_string_pretty(&index).unwrap_or_default();
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    Ok(summary)
}

/// The bytes of one output tensor: the source bytes when nothing changes, else the values
/// merged in f64 and rounded once to `dtype`.
fn tensor_bytes(t: &SourceTensor, dtype: &str, ops: &[&MergeOp]) -> Result<Vec<u8>> {
    let bad = |message: String| Error::Safetensors { path: t.file.clone(), message: format!("tensor `{}`: {message}", t.key) };
    let mut f = std::fs::File::open(&t.file).map_err(|e| Error::io(&t.file, e))?;
    let mut bytes = vec![0u8; t.len];
    f.seek(SeekFrom::Start(t.offset)).and_then(|_| f.read_exact(&mut bytes)).map_err(|e| bad(format!("data cut short ({e})")))?;
    if ops.is_empty() && dtype == t.dtype {
        return Ok(bytes);
    }
    let src = float_dtype(&t.dtype).ok_or_else(|| bad(format!("dtype {} is not a float type", t.dtype)))?;
    let expected = t.shape.iter().product::<usize>() * src.size();
    if bytes.len() != expected {
        return Err(bad(format!("{} bytes for shape {:?} {}", bytes.len(), t.shape, t.dtype)));
    }
    let mut w: Vec<f64> = TensorData::from_bytes_vec(bytes, t.shape.clone(), src).iter::<f64>().collect();
    for op in ops {
        op.apply(&mut w, &t.shape).map_err(bad)?;
    }
    if !ops.is_empty() && w.iter().any(|x| !x.is_finite()) {
        return Err(serial_lora::Error::NonFiniteMerge { module: t.key.clone() }.into());
    }
    let out = float_dtype(dtype).ok_or_else(|| bad(format!("cannot write dtype {dtype}")))?;
    let data = match out {
        DType::F64 => TensorData::new(w, t.shape.clone()),
        _ => TensorData::new(w.into_iter().map(|x| x as f32).collect::<Vec<f32>>(), t.shape.clone()).convert_dtype(out),
    };
    Ok(data.as_bytes().to_vec())
}

/// Copies the tree `src` into `dst` (following symbolic links, as a hub snapshot holds them),
/// leaving out hidden entries and every relative path for which `skip` is true.
pub fn copy_tree(src: &Path, dst: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
    fn walk(root: &Path, rel: &Path, dst: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
        let dir = root.join(rel);
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut entries: Vec<_> = entries.collect::<std::io::Result<_>>().map_err(|e| Error::io(&dir, e))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let r = rel.join(&name);
            if skip(&r) {
                continue;
            }
            let from = root.join(&r);
            let to = dst.join(&r);
            if from.is_dir() {
                std::fs::create_dir_all(&to).map_err(|e| Error::io(&to, e))?;
                walk(root, &r, dst, skip)?;
            } else if from.is_file() {
                std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
            }
        }
        Ok(())
    }
    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    walk(src, Path::new(""), dst, skip)
}

/// Whether a file name is a weights file of some framework (never copied into an export:
/// the export writes its own).
pub fn is_weights_file(name: &str) -> bool {
    [".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".h5", ".msgpack", ".pth", ".pt", ".ckpt", ".onnx", ".onnx_data"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Sets the dtype recorded in a transformers `config.json`: `dtype` (transformers 5) and / or
/// `torch_dtype` (older), whichever it has (`torch_dtype` when neither, and the file has a
/// `transformers_version`). diffusers configs record no dtype and are left alone.
pub fn set_config_dtype(path: &Path, dtype: ExportDtype) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Parse { path: path.into(), format: "JSON", message: e.to_string() })?;
    let Some(o) = v.as_object_mut() else { return Ok(()) };
    let keys: Vec<&str> = ["dtype", "torch_dtype"].into_iter().filter(|k| o.contains_key(*k)).collect();
    let keys = if keys.is_empty() && o.contains_key("transformers_version") { vec!["torch_dtype"] } else { keys };
    if keys.is_empty() {
        return Ok(());
    }
    for k in keys {
        o.insert(k.into(), dtype.torch_name().into());
    }
    let text = serde_json::to_string_pretty(&v).unwrap_or_default();
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Builds a directory atomically: `fill` writes into a temporary sibling of `out`, which is
/// renamed into place when it succeeds (and removed when it fails). An existing `out` is
/// refused unless `force`, then replaced.
pub fn atomic_dir<T>(out: &Path, force: bool, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let exists = |m: &str| Error::io(out, std::io::Error::new(std::io::ErrorKind::AlreadyExists, m.to_string()));
    if out.exists() && !force {
        return Err(exists("already exists; pass --force to replace it"));
    }
    if out.exists() && !out.is_dir() {
        return Err(exists("exists and is not a directory; remove it first"));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "export".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let value = match fill(&tmp) {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    }
    Ok(value)
}

/// Exports a merged model: `base` (loaded from `src`) gets `adapters` through `load`, the
/// merge updates are written into the weights of `spec` under `out`, and every other file of
/// `src` (except hidden ones and paths `skip` names) is copied. Atomic; see [`atomic_dir`].
#[allow(clippy::too_many_arguments)]
pub fn export_model<B: Backend, M: AdaptedModel<B>>(
    base: M,
    adapters: &[WeightedAdapter],
    load: &mut dyn FnMut(M, &Path) -> serial_lora::Result<M>,
    src: &Path,
    spec: &WeightsSpec,
    out: &Path,
    force: bool,
    skip: &dyn Fn(&Path) -> bool,
) -> Result<ExportSummary> {
    if out.exists() && !force {
        return Err(Error::io(out, std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists; pass --force to replace it")));
    }
    let (_, ops) = weighted_merge_ops(base, adapters, load)?;
    atomic_dir(out, force, |tmp| {
        copy_tree(src, tmp, skip)?;
        let summary = write_merged_weights(src, tmp, spec, &ops)?;
        if let Some(d) = spec.dtype {
            let cfg = tmp.join(spec.sub).join("config.json");
            if cfg.is_file() {
                set_config_dtype(&cfg, d)?;
            }
        }
        Ok(summary)
    })
}

/// The settings of an `export` command.
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// Output dtype of every float tensor (`None`: the checkpoint's own).
    pub dtype: Option<ExportDtype>,
    /// Replace an existing output directory.
    pub force: bool,
    /// Largest shard in bytes (`None`: the reference library's default).
    pub max_shard_bytes: Option<u64>,
}

/// One tensor of a checkpoint: safetensors dtype name, shape, values as f64.
pub type CheckpointTensor = (String, Vec<usize>, Vec<f64>);

/// Every tensor of the weights `<dir>/<stem>.safetensors` (or of its shards) with its dtype,
/// shape and values as f64 (for comparing checkpoints in tests and checks).
pub fn read_checkpoint(dir: &Path, stem: &str) -> Result<BTreeMap<String, CheckpointTensor>> {
    let files = weight_files(dir, stem)?;
    let spec = WeightsSpec { sub: "", stem, rename: &[], drop: &[], dtype: None, max_shard_bytes: u64::MAX };
    let mut out = BTreeMap::new();
    for t in list_tensors(&files, &spec)? {
        let bytes = tensor_bytes(&t, &t.dtype, &[])?;
        let dtype = match t.dtype.as_str() {
            "I64" => DType::I64,
            "I32" => DType::I32,
            other => float_dtype(other)
                .ok_or_else(|| Error::Safetensors { path: t.file.clone(), message: format!("tensor `{}`: dtype {other} is not read here", t.key) })?,
        };
        let values = TensorData::from_bytes_vec(bytes, t.shape.clone(), dtype).iter::<f64>().collect();
        out.insert(t.key.clone(), (t.dtype.clone(), t.shape.clone(), values));
    }
    Ok(out)
}

/// `max |a − b| / max |b|` (0 when both are all zero).
pub fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    if scale == 0.0 { diff } else { diff / scale }
}
