//! Checked loading of pretrained weights from HF safetensors files into Burn modules.
//!
//! One declarative key table per model (ordered regex → Burn path rules, most specific first),
//! PyTorch → Burn layout conversion in one place (`PyTorchToBurnAdapter`: transposes `Linear`
//! weights, renames norm `weight`/`bias` to `gamma`/`beta`), float casts ([`CastFloat`]), and
//! every load checked: missing, unexpected (unless allow-listed) and mis-shaped tensors are one
//! error that lists them all, naming the file.
use std::path::Path;
use std::rc::Rc;

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::DType;
use burn_store::{ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore, TensorSnapshot};

use crate::error::{Error, Result};
use serial_lora::BaseDType;

/// Casts float tensors on load: those of rank ≥ 2 (the frozen base's bulk: weights, tables)
/// to `base`, the rest (biases, norm scales) to f32 — see [`serial_lora::half`]. Burn 0.21 keeps
/// the file dtype otherwise, and mixed dtypes fail at the first matmul. Tensors already in
/// their dtype are not touched (a bf16 checkpoint held in bf16 is never widened).
#[derive(Clone, Debug)]
pub struct CastFloat {
    pub base: DType,
}

impl ModuleAdapter for CastFloat {
    fn adapt(&self, s: &TensorSnapshot) -> TensorSnapshot {
        let to = if s.shape.len() >= 2 { self.base } else { DType::F32 };
        if !matches!(s.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) || s.dtype == to {
            return s.clone();
        }
        let f = s.clone_data_fn();
        TensorSnapshot::from_closure(
            Rc::new(move || Ok(f()?.convert_dtype(to))),
            to,
            s.shape.clone(),
            s.path_stack.clone().unwrap_or_default(),
            s.container_stack.clone().unwrap_or_default(),
            s.tensor_id.unwrap_or_default(),
        )
    }
    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

thread_local! {
    static BASE_DTYPE: std::cell::Cell<BaseDType> = const { std::cell::Cell::new(BaseDType::F32) };
}

/// Runs `f` with the loads of this thread holding the frozen base in `dtype` (transformers'
/// `torch_dtype`; restored afterwards). Default f32.
pub fn with_base_dtype<R>(dtype: BaseDType, f: impl FnOnce() -> R) -> R {
    let _scope = base_dtype_scope(dtype);
    f()
}

/// [`with_base_dtype`] until the returned value is dropped.
pub fn base_dtype_scope(dtype: BaseDType) -> impl Drop {
    struct Restore(BaseDType);
    impl Drop for Restore {
        fn drop(&mut self) {
            BASE_DTYPE.with(|d| d.set(self.0));
        }
    }
    Restore(BASE_DTYPE.with(|d| d.replace(dtype)))
}

/// The dtype loads on this thread hold the base in ([`with_base_dtype`]).
pub fn base_dtype() -> BaseDType {
    BASE_DTYPE.with(std::cell::Cell::get)
}

/// The dtype of the first float tensor of a safetensors file's header (`--dtype auto`).
pub fn checkpoint_dtype(path: &Path) -> Result<BaseDType> {
    let (_, header, _) = read_header(path)?;
    let found = header
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| *k != "__metadata__")
        .find_map(|(_, v)| v.get("dtype")?.as_str().and_then(BaseDType::from_safetensors));
    found.ok_or_else(|| Error::Safetensors { path: path.into(), message: "no float tensor to take the dtype from".into() })
}

/// How one model's checkpoint keys map onto its Burn module.
pub struct KeyTable {
    /// Groups of `(regex on the file key, replacement)` rules; every rule is applied in order,
    /// each to the result of the previous (`$1` refers to capture groups).
    pub rules: &'static [&'static [(&'static str, &'static str)]],
    /// Regexes of file keys that may be present without a module parameter (buffers such as
    /// `position_ids`).
    pub ignore: &'static [&'static str],
    /// Exact file keys the model loads itself (e.g. a 0-d `logit_scale`, see [`read_tensor`]).
    pub by_hand: &'static [&'static str],
}

/// Prefix that parks [`KeyTable::by_hand`] keys away from every module path.
const BY_HAND: &str = "__loaded_by_hand__";

/// What one file contributed to a load.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub applied: Vec<String>,
    /// Burn paths of module parameters the file did not provide.
    pub missing: Vec<String>,
}

/// Loads the tensors of one safetensors file into `module` per `table`. Tensors of the file
/// that match nothing are an error unless ignored; with `allow_missing` (sharded checkpoints)
/// parameters the file lacks are returned in the report instead of failing.
pub fn load_safetensors<B: Backend, M: Module<B>>(mut module: M, path: &Path, table: &KeyTable, allow_missing: bool) -> Result<(M, LoadReport)> {
    let ignore: Vec<regex::Regex> = table.ignore.iter().filter_map(|r| regex::Regex::new(r).ok()).collect();
    // Burn panics on integer data in a float parameter: refuse non-float tensors up front.
    let (_, header, _) = read_header(path)?;
    let file_keys: Vec<(String, String)> = header
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (k.clone(), v.get("dtype").and_then(|d| d.as_str()).unwrap_or("?").to_string()))
        .collect();
    let not_float: Vec<String> = file_keys
        .iter()
        .filter(|(k, d)| !matches!(d.as_str(), "F32" | "F16" | "BF16" | "F64") && !ignore.iter().any(|r| r.is_match(k)))
        .map(|(k, d)| format!("{k}: dtype {d}, expected a float type (F32, F16, BF16, F64)"))
        .collect();
    if !not_float.is_empty() {
        return Err(Error::WeightsMismatch { path: path.into(), report: report_list("wrong dtype", &not_float) });
    }
    let mut store = SafetensorsStore::from_file(path)
        .with_from_adapter(PyTorchToBurnAdapter.chain(CastFloat { base: base_dtype().dtype() }))
        .skip_enum_variants(false)
        .validate(false) // shape errors come back in the result, reported below with the rest
        .allow_partial(true);
    for key in table.by_hand {
        store = store.with_key_remapping(format!("^{}$", regex::escape(key)), format!("{BY_HAND}.{key}"));
    }
    for (from, to) in table.rules.iter().flat_map(|g| g.iter()) {
        store = store.with_key_remapping(*from, *to);
    }
    let result = module.load_from(&mut store).map_err(|e| Error::Safetensors { path: path.into(), message: format!("cannot read weights: {e}") })?;
    // burn-store lists a norm's `weight`/`bias` as unused even when it applied them as
    // `gamma`/`beta` (its fallback name); those were loaded.
    let applied: std::collections::HashSet<&str> = result.applied.iter().map(String::as_str).collect();
    let loaded_as_norm = |k: &str| {
        let alt = |suffix: &str, to: &str| k.strip_suffix(suffix).is_some_and(|p| applied.contains(format!("{p}{to}").as_str()));
        alt(".weight", ".gamma") || alt(".bias", ".beta")
    };
    let unused: Vec<String> =
        result.unused.iter().filter(|k| !k.starts_with(BY_HAND) && !loaded_as_norm(k) && !ignore.iter().any(|r| r.is_match(k))).cloned().collect();
    let missing: Vec<String> = result.missing.iter().map(|(p, _)| p.clone()).filter(|p| !table.by_hand.contains(&p.as_str())).collect();
    // burn-store names the module path; name the file key too
    let rules: Vec<(regex::Regex, &str)> = table.rules.iter().flat_map(|g| g.iter()).filter_map(|(f, t)| regex::Regex::new(f).ok().map(|r| (r, *t))).collect();
    let to_module = |key: &str| rules.iter().fold(key.to_string(), |k, (r, t)| r.replace_all(&k, *t).into_owned());
    let file_key_of = |module_path: &str| {
        let base = module_path.strip_suffix(".gamma").map(|p| format!("{p}.weight"));
        let base = base.or_else(|| module_path.strip_suffix(".beta").map(|p| format!("{p}.bias"))).unwrap_or_else(|| module_path.into());
        file_keys.iter().map(|(k, _)| k).find(|k| to_module(k) == module_path || to_module(k) == base).cloned()
    };
    let errors: Vec<String> = result
        .errors
        .iter()
        .map(|e| {
            let text = e.to_string();
            let module_path = text.split('\'').nth(1).unwrap_or_default();
            match file_key_of(module_path) {
                Some(k) if k != module_path => format!("file key `{k}`: {text} (shapes in Burn's [in, out] layout)"),
                _ => text,
            }
        })
        .collect();
    let mut report = String::new();
    let mut list = |title: &str, items: &[String]| {
        if !items.is_empty() {
            report += &format!("  {title} ({}):\n", items.len());
            for i in items.iter().take(20) {
                report += &format!("    {i}\n");
            }
            if items.len() > 20 {
                report += &format!("    … and {} more\n", items.len() - 20);
            }
        }
    };
    if !allow_missing {
        list("missing (parameters of the model the file does not provide)", &missing);
    }
    list("unexpected (tensors of the file that match no parameter)", &unused);
    list("wrong shape or dtype", &errors);
    if !report.is_empty() {
        return Err(Error::WeightsMismatch { path: path.into(), report });
    }
    Ok((module, LoadReport { applied: result.applied, missing }))
}

/// `  title (n):` and up to 20 indented items.
fn report_list(title: &str, items: &[String]) -> String {
    let mut report = format!("  {title} ({}):\n", items.len());
    for i in items.iter().take(20) {
        report += &format!("    {i}\n");
    }
    if items.len() > 20 {
        report += &format!("    … and {} more\n", items.len() - 20);
    }
    report
}

/// The JSON header of a safetensors file, the open file and the header length.
pub(crate) fn read_header(path: &Path) -> Result<(std::fs::File, serde_json::Value, u64)> {
    use std::io::Read;
    let bad = |message: String| Error::Safetensors { path: path.into(), message };
    if !path.is_file() {
        return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found")));
    }
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return Err(bad(format!("not a valid safetensors file: header of {n} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let header = serde_json::from_slice(&header).map_err(|e| bad(format!("not a valid safetensors header: {e}")))?;
    Ok((f, header, n))
}

/// The tensor names of a safetensors file (reads the header only).
pub fn tensor_names(path: &Path) -> Result<Vec<String>> {
    let (_, header, _) = read_header(path)?;
    Ok(header.as_object().map(|o| o.keys().filter(|k| *k != "__metadata__").cloned().collect()).unwrap_or_default())
}

/// Reads one tensor of a safetensors file as f32 without reading the rest of the file;
/// `None` if the file has no such key.
pub fn read_tensor(path: &Path, key: &str) -> Result<Option<serial_lora::io::HostTensor>> {
    use std::io::{Read, Seek, SeekFrom};
    let bad = |message: String| Error::Safetensors { path: path.into(), message };
    let (mut f, header, n) = read_header(path)?;
    let Some(info) = header.get(key) else { return Ok(None) };
    let field = |name: &str| info.get(name).ok_or_else(|| bad(format!("tensor `{key}`: no `{name}` in the header")));
    let dtype = match field("dtype")?.as_str() {
        Some("F32") => DType::F32,
        Some("F16") => DType::F16,
        Some("BF16") => DType::BF16,
        Some("F64") => DType::F64,
        other => return Err(bad(format!("tensor `{key}` has dtype {other:?}; expected a float type"))),
    };
    let nums = |v: &serde_json::Value| -> Option<Vec<usize>> { v.as_array()?.iter().map(|x| x.as_u64().map(|x| x as usize)).collect() };
    let shape = nums(field("shape")?).ok_or_else(|| bad(format!("tensor `{key}`: malformed shape")))?;
    let offsets = nums(field("data_offsets")?).filter(|o| o.len() == 2 && o[0] <= o[1]);
    let [start, end] = offsets.map(|o| [o[0], o[1]]).ok_or_else(|| bad(format!("tensor `{key}`: malformed data_offsets")))?;
    let expected = shape.iter().product::<usize>() * dtype.size();
    if end - start != expected {
        return Err(bad(format!("tensor `{key}`: {} bytes for shape {shape:?} {dtype:?}", end - start)));
    }
    let mut bytes = vec![0u8; end - start];
    f.seek(SeekFrom::Start(8 + n + start as u64)).and_then(|_| f.read_exact(&mut bytes)).map_err(|e| bad(format!("tensor `{key}`: data cut short ({e})")))?;
    let data = TensorData::from_bytes_vec(bytes, shape.clone(), dtype).iter::<f32>().collect();
    Ok(Some(serial_lora::io::HostTensor { shape, data }))
}

/// `<stem>.safetensors.index.json`: tensor name → shard file (relative to the directory).
#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// Loads a checkpoint in HF layout from `dir`: `<stem>.safetensors`, or else the shards named by
/// `<stem>.safetensors.index.json` (its `weight_map`), each per `table`. A parameter is missing
/// only if no shard provides it; that, an unreadable index and every per-file check of
/// [`load_safetensors`] are errors naming the file.
pub fn load_safetensors_dir<B: Backend, M: Module<B>>(mut module: M, dir: &Path, stem: &str, table: &KeyTable) -> Result<M> {
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(load_safetensors(module, &single, table, false)?.0);
    }
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    let text = std::fs::read_to_string(&index).map_err(|e| {
        let message = format!("no {stem}.safetensors and no readable {stem}.safetensors.index.json ({e})");
        Error::io(&single, std::io::Error::new(e.kind(), message))
    })?;
    let bad = |message: String| Error::Parse { path: index.clone(), format: "safetensors index", message };
    let index_file: ShardIndex = serial_lora::parse::json(&text).map_err(bad)?;
    let files: std::collections::BTreeSet<&str> = index_file.weight_map.values().map(String::as_str).collect();
    if files.is_empty() {
        return Err(bad("`weight_map` names no file".into()));
    }
    let mut missing: Option<std::collections::BTreeSet<String>> = None;
    for file in files {
        let shard = serial_lora::parse::contained_path(dir, file).map_err(|m| bad(format!("`weight_map`: {m}")))?;
        let (m, report) = load_safetensors(module, &shard, table, true)?;
        module = m;
        let now = report.missing.into_iter().collect();
        missing = Some(match missing {
            None => now,
            Some(before) => before.intersection(&now).cloned().collect(),
        });
    }
    match missing.filter(|m| !m.is_empty()) {
        None => Ok(module),
        Some(m) => {
            let list: Vec<String> = m.into_iter().collect();
            let report = format!("  missing in every shard ({}):\n    {}\n", list.len(), list.join("\n    "));
            Err(Error::WeightsMismatch { path: index, report })
        }
    }
}
