//! Adapter files: a directory with `adapter_config.json` + `adapter_model.safetensors`.
//!
//! - LoRA: PEFT's own format (`peft_type: "LORA"`, keys
//!   `base_model.model.<module>.lora_A.weight` `[r, in]` / `.lora_B.weight` `[out, r]`), so an
//!   adapter saved by PEFT's `save_pretrained` loads here and one saved here loads with
//!   `PeftModel.from_pretrained`. A fused `qkv` projection carrying three pairs is written as
//!   one rank-3r pair — A stacked, B block-diagonal — with `rank_pattern`/`alpha_pattern`
//!   entries that give PEFT the same scale: mathematically the same map.
//! - Serial LoRA: same layout, `peft_type: "SERIAL_LORA"`, keys
//!   `base_model.model.<attention module>.serial_lora_A.weight` `[r, d]` and
//!   `.serial_lora_B.weight` `[d, r]` (the infix comes from the site's [`ProjNames::serial`]:
//!   SD3's context stream writes `add_serial_lora_A/B` on the same attention module).
//!
//! Upstream: PEFT `utils/save_and_load.py` (`get_peft_model_state_dict`), `tuners/lora/config.py`.
//! Every write is atomic (temporary file + rename).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::attention::{Attention, QkvProjection, SeparateQkv};
use crate::config::{AdapterConfig, Init, Method, Projection};
use crate::error::{Error, Result};
use crate::lora::{FusedQkv, LoraLinear, LoraPair};
use crate::model::{AdaptedModel, ProjNames};
use crate::serial::SerialLora;

/// File name of the adapter config inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter weights inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of a LoRA saved by diffusers' `save_lora_weights` (no `adapter_config.json`).
pub const DIFFUSERS_WEIGHTS_FILE: &str = "pytorch_lora_weights.safetensors";
/// Key prefix PEFT puts before module paths.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// Safetensors metadata key holding this crate's full [`AdapterConfig`] (PEFT ignores it).
const META_CONFIG: &str = "serial_lora.adapter_config";

/// `adapter_config.json`: PEFT's `LoraConfig` fields (unknown fields are kept but unused).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: serde_json::Value,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub init_lora_weights: serde_json::Value,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl PeftConfig {
    /// Rank and alpha of `module`, honouring `rank_pattern` / `alpha_pattern` (PEFT matches a
    /// pattern against the full module name or a `.`-separated suffix of it).
    fn rank_alpha(&self, module: &str) -> (usize, f64) {
        let find = |k: &String| module == k || module.ends_with(&format!(".{k}"));
        let r = self.rank_pattern.iter().find(|(k, _)| find(k)).map_or(self.r, |(_, &v)| v);
        let a = self.alpha_pattern.iter().find(|(k, _)| find(k)).map_or(self.lora_alpha, |(_, &v)| v);
        (r, a)
    }

    fn scale(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 }
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, then rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = std::fs::write(&tmp, bytes).and_then(|()| {
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)
    });
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// A host tensor: row-major f32 values and a shape.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>) -> Self {
        let shape = t.dims().to_vec();
        Self { shape, data: t.into_data().iter::<f32>().collect() }
    }
    pub fn to_tensor<B: Backend, const D: usize>(&self, device: &B::Device) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(self.data.clone(), self.shape.clone()), device)
    }
    /// Transpose of a matrix.
    pub fn t(&self) -> Self {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut data = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                data[j * r + i] = self.data[i * c + j];
            }
        }
        Self { shape: vec![c, r], data }
    }
    /// Rows `rows` and columns `cols` of a matrix.
    fn block(&self, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) -> Self {
        let c = self.shape[1];
        let data = rows.clone().flat_map(|i| self.data[i * c + cols.start..i * c + cols.end].iter().copied()).collect();
        Self { shape: vec![rows.len(), cols.len()], data }
    }
}

/// The largest |a − b| over the tensors of two safetensors files (e.g. two adapters), which
/// must hold the same keys with the same shapes.
pub fn max_abs_diff(a: &Path, b: &Path) -> Result<f32> {
    let ((ta, _), (tb, _)) = (read_safetensors(a)?, read_safetensors(b)?);
    let mut max = 0f32;
    for (key, x) in &ta {
        let y = tb
            .get(key)
            .filter(|y| y.shape == x.shape)
            .ok_or_else(|| Error::Safetensors { path: b.into(), message: format!("no tensor `{key}` of shape {:?} (as in {})", x.shape, a.display()) })?;
        max = x.data.iter().zip(&y.data).fold(max, |m, (p, q)| m.max((p - q).abs()));
    }
    if let Some(extra) = tb.keys().find(|k| !ta.contains_key(*k)) {
        return Err(Error::Safetensors { path: b.into(), message: format!("tensor `{extra}` is not in {}", a.display()) });
    }
    Ok(max)
}

/// Reads every tensor of a safetensors file as f32 (F32, F16, BF16 and F64 are accepted).
pub fn read_safetensors(path: &Path) -> Result<(BTreeMap<String, HostTensor>, HashMap<String, String>)> {
    let err = |message: String| Error::Safetensors { path: path.into(), message };
    if path.exists() && !path.is_file() {
        return Err(err("not a regular file".into())); // a FIFO would block, a directory fail obscurely
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        use safetensors::Dtype as S;
        let dtype = match view.dtype() {
            S::F32 => burn::tensor::DType::F32,
            S::F16 => burn::tensor::DType::F16,
            S::BF16 => burn::tensor::DType::BF16,
            S::F64 => burn::tensor::DType::F64,
            other => return Err(err(format!("tensor `{name}` has dtype {other:?}; expected a float type"))),
        };
        let shape = view.shape().to_vec();
        let data = TensorData::from_bytes_vec(view.data().to_vec(), shape.clone(), dtype).iter::<f32>().collect();
        out.insert(name, HostTensor { shape, data });
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// Writes f32 tensors to a safetensors file atomically.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, HostTensor>, metadata: HashMap<String, String>) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> =
        tensors.iter().map(|(k, t)| (k.clone(), t.data.iter().flat_map(|x| x.to_le_bytes()).collect(), t.shape.clone())).collect();
    let views = bytes
        .iter()
        .map(|(k, b, s)| safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).map(|v| (k.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Safetensors { path: path.into(), message: e.to_string() })?;
    let out = safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Safetensors { path: path.into(), message: e.to_string() })?;
    write_atomic(path, &out)
}

fn pair_host<B: Backend>(p: &LoraPair<B>) -> (HostTensor, HostTensor) {
    // Burn [in, r] / [r, out] → PyTorch [r, in] / [out, r]
    (HostTensor::from_tensor(p.lora_a.val()).t(), HostTensor::from_tensor(p.lora_b.val()).t())
}

/// What [`collect`] gathers: the tensors by PEFT key, the adapted module paths, and the
/// (rank, alpha) of modules that differ from the config's.
type Collected = (BTreeMap<String, HostTensor>, Vec<String>, BTreeMap<String, (usize, f64)>);

/// The adapter tensors of a model in PEFT naming (prefix included) and the adapted module paths.
fn collect<B: Backend, M: AdaptedModel<B>>(model: &M, cfg: &AdapterConfig, prefix: &str) -> Collected {
    // (module path, key infix, A [r, in], B [out, r]) in PyTorch layout
    let mut pairs: Vec<(String, &str, HostTensor, HostTensor)> = Vec::new();
    let mut patterns = BTreeMap::new();
    for site in model.attention_sites() {
        let (a, n) = (site.attention, site.names);
        if let Some(s) = &a.serial {
            let (ta, tb) = pair_host(&s.pair);
            pairs.push((site.path.clone(), n.serial, ta, tb));
        }
        let mut linears: Vec<(&LoraLinear<B>, &str)> = Vec::new();
        match &a.qkv {
            QkvProjection::Separate(s) => linears.extend([(&s.q, n.q), (&s.k, n.k), (&s.v, n.v)]),
            QkvProjection::Fused(f) if f.pairs().iter().any(Option::is_some) => {
                let [d_in, d] = f.slice_dims();
                // the pairs' own rank (a loaded PEFT adapter of rank 3r has pairs of rank r; a
                // smaller pair fills the top of its block, the rest stays zero)
                let r = f.pairs().iter().flatten().map(|p| p.lora_b.val().dims()[0]).max().unwrap_or(cfg.rank);
                let mut a_cat = HostTensor { shape: vec![3 * r, d_in], data: vec![0.0; 3 * r * d_in] };
                let mut b_diag = HostTensor { shape: vec![3 * d, 3 * r], data: vec![0.0; 9 * d * r] };
                for (i, p) in f.pairs().iter().enumerate() {
                    let Some(p) = p else { continue };
                    let (ta, tb) = pair_host(p); // [ri, d_in], [d, ri]
                    let ri = ta.shape[0];
                    a_cat.data[i * r * d_in..(i * r + ri) * d_in].copy_from_slice(&ta.data);
                    for row in 0..d {
                        let dst = (i * d + row) * 3 * r + i * r;
                        b_diag.data[dst..dst + ri].copy_from_slice(&tb.data[row * ri..(row + 1) * ri]);
                    }
                }
                let module = format!("{}.{}", site.path, n.qkv);
                // PEFT's scale alpha'/(3r) (or alpha'/√(3r)) must equal ours.
                let rr = 3 * r;
                let alpha = if cfg.rslora { cfg.scale() * (rr as f64).sqrt() } else { cfg.scale() * rr as f64 };
                patterns.insert(module.clone(), (rr, alpha));
                pairs.push((module, "", a_cat, b_diag));
            }
            QkvProjection::Fused(_) => {}
        }
        linears.extend(a.o.as_ref().map(|o| (o, n.o)));
        for (l, name) in linears {
            if let Some(p) = &l.lora {
                let (ta, tb) = pair_host(p);
                pairs.push((format!("{}.{name}", site.path), "", ta, tb));
            }
        }
    }
    let mut tensors = BTreeMap::new();
    let mut modules = Vec::new();
    for (module, infix, a, b) in pairs {
        tensors.insert(format!("{prefix}{module}.{infix}lora_A.weight"), a);
        tensors.insert(format!("{prefix}{module}.{infix}lora_B.weight"), b);
        if !modules.contains(&module) {
            modules.push(module);
        }
    }
    (tensors, modules, patterns)
}

/// Saves the adapters of `model` to directory `dir` (created if missing). `base_model` is
/// recorded as `base_model_name_or_path`. LoRA directories load in PEFT.
pub fn save_adapter<B: Backend, M: AdaptedModel<B>>(model: &M, cfg: &AdapterConfig, dir: impl AsRef<Path>, base_model: Option<&str>) -> Result<()> {
    save_adapter_with_prefix(model, cfg, dir, base_model, PEFT_PREFIX)
}

/// [`save_adapter`] with another key prefix (diffusers writes `transformer.`).
pub fn save_adapter_with_prefix<B: Backend, M: AdaptedModel<B>>(
    model: &M,
    cfg: &AdapterConfig,
    dir: impl AsRef<Path>,
    base_model: Option<&str>,
    prefix: &str,
) -> Result<()> {
    let dir = dir.as_ref();
    let (tensors, modules, patterns) = collect(model, cfg, prefix);
    if tensors.is_empty() {
        return Err(Error::TargetMatchesNothing(format!("{}: the model has no adapters to save", dir.display())));
    }
    // an adapter (or checkpoint) with NaN / ±∞ is never written
    if let Some((key, _)) = tensors.iter().find(|(_, t)| t.data.iter().any(|v| !v.is_finite())) {
        return Err(Error::Safetensors {
            path: dir.join(WEIGHTS_FILE),
            message: format!("refusing to write `{key}`: it holds non-finite values (NaN or ±inf)"),
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let peft = PeftConfig {
        peft_type: match cfg.method {
            Method::Lora => "LORA",
            Method::SerialLora => "SERIAL_LORA",
        }
        .into(),
        r: cfg.rank,
        lora_alpha: cfg.alpha,
        lora_dropout: cfg.dropout,
        target_modules: serde_json::json!(modules),
        use_rslora: cfg.rslora,
        rank_pattern: patterns.iter().map(|(k, v)| (k.clone(), v.0)).collect(),
        alpha_pattern: patterns.iter().map(|(k, v)| (k.clone(), v.1)).collect(),
        init_lora_weights: match cfg.init {
            Init::KaimingUniform => serde_json::json!(true),
            Init::Gaussian => serde_json::json!("gaussian"),
        },
        base_model_name_or_path: base_model.map(str::to_string),
        other: serde_json::json!({
            "task_type": null, "bias": "none", "fan_in_fan_out": false, "inference_mode": true,
            "modules_to_save": null, "layers_to_transform": null, "layers_pattern": null,
            "use_dora": false, "revision": null
        })
        .as_object()
        .cloned()
        .unwrap_or_default(),
    };
    let cfg_json = serde_json::to_string_pretty(cfg).unwrap_or_default();
    let mut meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    meta.insert(META_CONFIG.into(), cfg_json);
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, meta)?;
    let json = serde_json::to_string_pretty(&peft).unwrap_or_default();
    write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
}

/// Reads and parses `adapter_config.json` of an adapter directory.
pub fn read_adapter_config(dir: &Path) -> Result<PeftConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    crate::parse::json(&text).map_err(|message| Error::Parse { path, format: "JSON", message })
}

/// The LoRA config of a diffusers `pytorch_lora_weights.safetensors`: from its
/// `lora_adapter_metadata` (`<component>.r`, `<component>.lora_alpha`, … with the component of
/// `prefix`, e.g. `transformer`) when present, else rank from the `lora_A` shapes and alpha = rank
/// (scale 1, what diffusers applies to a LoRA saved without alphas).
fn diffusers_config(path: &Path, prefix: &str) -> Result<PeftConfig> {
    let bad = |m: String| Error::Parse { path: path.into(), format: "diffusers LoRA", message: m };
    let (tensors, meta) = read_safetensors(path)?;
    let component = prefix.trim_end_matches('.');
    let meta: serde_json::Value = meta.get("lora_adapter_metadata").and_then(|m| serde_json::from_str(m).ok()).unwrap_or_default();
    let field = |k: &str| meta.get(format!("{component}.{k}")).or_else(|| meta.get(k)).cloned();
    let first_a = tensors.iter().find(|(k, _)| k.starts_with(prefix) && k.ends_with(".lora_A.weight"));
    let r_shape = first_a.map(|(_, t)| t.shape[0]);
    let r = field("r").and_then(|v| v.as_u64()).map(|v| v as usize).or(r_shape).ok_or_else(|| bad(format!("no `{prefix}…lora_A.weight` tensors")))?;
    let lora_alpha = field("lora_alpha").and_then(|v| v.as_f64()).unwrap_or(r as f64);
    Ok(PeftConfig {
        peft_type: "LORA".into(),
        r,
        lora_alpha,
        lora_dropout: 0.0,
        target_modules: field("target_modules").unwrap_or_default(),
        use_rslora: field("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
        rank_pattern: field("rank_pattern").and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default(),
        alpha_pattern: field("alpha_pattern").and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default(),
        init_lora_weights: serde_json::Value::Null,
        base_model_name_or_path: None,
        other: Default::default(),
    })
}

/// Collects every mismatch of one load so the error lists them all.
#[derive(Default)]
struct Report {
    missing: Vec<String>,
    shape: Vec<String>,
    other: Vec<String>,
}

impl Report {
    fn take(&mut self, file: &mut BTreeMap<String, HostTensor>, key: &str, shape: [usize; 2]) -> Option<HostTensor> {
        let Some(t) = file.remove(key) else {
            self.missing.push(key.to_string());
            return None;
        };
        if t.shape != shape {
            self.shape.push(format!("{key}: file {:?}, model expects {:?}", t.shape, shape));
            return None;
        }
        Some(t)
    }
}

fn list(title: &str, items: &[String]) -> String {
    if items.is_empty() {
        return String::new();
    }
    let mut s = format!("  {title} ({}):\n", items.len());
    for i in items.iter().take(20) {
        s += &format!("    {i}\n");
    }
    if items.len() > 20 {
        s += &format!("    … and {} more\n", items.len() - 20);
    }
    s
}

/// Loads an adapter directory into `model` (a base model without adapters): attaches the
/// adapters found in the file, freezes every base weight, and returns the adapter config.
/// Fails — listing every missing key, unexpected key and wrong shape — if the file does not
/// fit the model (another model, rank or method).
pub fn load_adapter<B: Backend, M: AdaptedModel<B>>(model: M, dir: impl AsRef<Path>, device: &B::Device) -> Result<(M, AdapterConfig)> {
    load_adapter_with_prefix(model, dir, device, PEFT_PREFIX)
}

/// [`load_adapter`] with another key prefix (diffusers: `transformer.`).
pub fn load_adapter_with_prefix<B: Backend, M: AdaptedModel<B>>(
    model: M,
    dir: impl AsRef<Path>,
    device: &B::Device,
    prefix: &str,
) -> Result<(M, AdapterConfig)> {
    let dir = dir.as_ref();
    let diffusers = dir.join(DIFFUSERS_WEIGHTS_FILE);
    let (peft, cfg_path, weights_path) = if !dir.join(CONFIG_FILE).is_file() && diffusers.is_file() {
        (diffusers_config(&diffusers, prefix)?, diffusers.clone(), diffusers)
    } else {
        (read_adapter_config(dir)?, dir.join(CONFIG_FILE), dir.join(WEIGHTS_FILE))
    };
    let method = match peft.peft_type.as_str() {
        "LORA" => Method::Lora,
        "SERIAL_LORA" => Method::SerialLora,
        other => {
            return Err(Error::Parse {
                path: cfg_path,
                format: "adapter config",
                message: format!("peft_type `{other}` is not supported (expected LORA or SERIAL_LORA)"),
            });
        }
    };
    let mut cfg = AdapterConfig::new(method, peft.r)
        .with_alpha(peft.lora_alpha)
        .with_dropout(peft.lora_dropout)
        .with_rslora(peft.use_rslora)
        .with_init(if peft.init_lora_weights == serde_json::json!("gaussian") { Init::Gaussian } else { Init::KaimingUniform });
    cfg.validate().map_err(|e| Error::Parse {
        path: cfg_path.clone(),
        format: "adapter config",
        message: format!("{e} (from `r` = {}, `lora_alpha` = {}, `lora_dropout` = {})", peft.r, peft.lora_alpha, peft.lora_dropout),
    })?;
    let (mut file, meta) = read_safetensors(&weights_path)?;
    if let Some(saved) = meta.get(META_CONFIG).and_then(|s| serde_json::from_str::<AdapterConfig>(s).ok()) {
        cfg.lr_ratio = saved.lr_ratio;
    }

    // Plan every block first (shapes only), so a mismatch leaves nothing half-attached.
    let mut report = Report::default();
    let mut plans: Vec<BlockPlan> = Vec::new();
    let mut projections = BTreeSet::new();
    for site in model.attention_sites() {
        let mut plan = BlockPlan::default();
        let key = |module: &str, s: &str| format!("{prefix}{module}.{s}");
        let pair = |report: &mut Report, file: &mut BTreeMap<String, HostTensor>, module: &str, d_in: usize, d_out: usize, suffix: &str| {
            let ka = key(module, &format!("{suffix}lora_A.weight"));
            let kb = key(module, &format!("{suffix}lora_B.weight"));
            if !file.contains_key(&ka) && !file.contains_key(&kb) {
                return None;
            }
            let (r, alpha) = peft.rank_alpha(module);
            let a = report.take(file, &ka, [r, d_in]);
            let b = report.take(file, &kb, [d_out, r]);
            Some((a?, b?, peft.scale(r, alpha)))
        };
        let attn: &Attention<B> = site.attention;
        if attn.has_adapter() {
            report.other.push(format!("{}: the model already carries an adapter", site.path));
        }
        let names: ProjNames = site.names;
        let d = attn.d_model();
        if method == Method::SerialLora {
            plan.serial = pair(&mut report, &mut file, &site.path, d, d, names.serial);
        } else {
            match &attn.qkv {
                QkvProjection::Separate(s) => {
                    for (i, (l, n)) in [(&s.q, names.q), (&s.k, names.k), (&s.v, names.v)].into_iter().enumerate() {
                        let [di, dout] = l.dims();
                        plan.qkv[i] = pair(&mut report, &mut file, &format!("{}.{n}", site.path), di, dout, "");
                    }
                }
                QkvProjection::Fused(f) => {
                    let [di, ds] = f.slice_dims();
                    let module = format!("{}.{}", site.path, names.qkv);
                    if let Some((a, b, s)) = pair(&mut report, &mut file, &module, di, 3 * ds, "") {
                        match split_fused(&a, &b, ds) {
                            Ok(parts) => {
                                for (i, p) in parts.into_iter().enumerate() {
                                    plan.qkv[i] = p.map(|(a, b)| (a, b, s));
                                }
                            }
                            Err(msg) => report.other.push(format!("{prefix}{module}: {msg}")),
                        }
                    }
                }
            }
            if let Some(o) = &attn.o {
                let [di, dout] = o.dims();
                plan.o = pair(&mut report, &mut file, &format!("{}.{}", site.path, names.o), di, dout, "");
            }
            for (i, p) in [Projection::Q, Projection::K, Projection::V].into_iter().enumerate() {
                if plan.qkv[i].is_some() {
                    projections.insert(p);
                }
            }
            if plan.o.is_some() {
                projections.insert(Projection::O);
            }
        }
        plans.push(plan);
    }
    let unexpected: Vec<String> = file.keys().cloned().collect();
    let text = list("missing keys", &report.missing)
        + &list("unexpected keys (not adapters of this model's attention blocks)", &unexpected)
        + &list("wrong shapes", &report.shape)
        + &list("other", &report.other);
    if !text.is_empty() {
        return Err(Error::AdapterMismatch { path: weights_path, report: text });
    }
    let adapted: Vec<usize> = plans.iter().enumerate().filter(|(_, p)| !p.is_empty()).map(|(i, _)| i).collect();
    if adapted.is_empty() {
        return Err(Error::AdapterMismatch { path: weights_path, report: "  the file holds no adapter tensors\n".into() });
    }
    if adapted.len() < plans.len() {
        cfg.target_blocks = Some(adapted);
    }
    if method == Method::Lora {
        cfg.target_projections = projections.into_iter().collect();
    }
    let dropout = cfg.dropout;
    let model = model.no_grad();
    let mut plans = plans.into_iter();
    let model = model.try_map_attention(&mut |_, a| Ok(plans.next().unwrap_or_default().apply(a, dropout, device)))?;
    Ok((model, cfg))
}

type PairData = (HostTensor, HostTensor, f64);

#[derive(Default)]
struct BlockPlan {
    serial: Option<PairData>,
    qkv: [Option<PairData>; 3],
    o: Option<PairData>,
}

impl BlockPlan {
    fn is_empty(&self) -> bool {
        self.serial.is_none() && self.o.is_none() && self.qkv.iter().all(Option::is_none)
    }

    fn apply<B: Backend>(self, mut attn: Attention<B>, dropout: f64, device: &B::Device) -> Attention<B> {
        // File layout [r, in] / [out, r] → Burn [in, r] / [r, out].
        let mk = |(a, b, s): PairData| LoraPair::from_tensors(a.t().to_tensor(device), b.t().to_tensor(device), s, dropout);
        let [q, k, v] = self.qkv;
        attn.serial = self.serial.map(|p| SerialLora { pair: mk(p) });
        attn.qkv = match attn.qkv {
            QkvProjection::Separate(s) => QkvProjection::Separate(SeparateQkv {
                q: LoraLinear { lora: q.map(mk), ..s.q },
                k: LoraLinear { lora: k.map(mk), ..s.k },
                v: LoraLinear { lora: v.map(mk), ..s.v },
            }),
            QkvProjection::Fused(f) => QkvProjection::Fused(FusedQkv { q: q.map(mk), k: k.map(mk), v: v.map(mk), ..f }),
        };
        attn.o = attn.o.map(|o| LoraLinear { lora: self.o.map(mk), ..o });
        attn
    }
}

/// Splits a stacked rank-3r pair on a fused `qkv` (A `[3r, in]`, B `[3d, 3r]` block-diagonal)
/// into three rank-r pairs; an all-zero block is an absent pair.
fn split_fused(a: &HostTensor, b: &HostTensor, d: usize) -> Result<[Option<(HostTensor, HostTensor)>; 3], String> {
    let rr = a.shape[0];
    if !rr.is_multiple_of(3) {
        return Err(format!("rank {rr} of a fused qkv pair is not a multiple of 3 (one pair per q, k, v slice)"));
    }
    let r = rr / 3;
    let d_in = a.shape[1];
    for i in 0..3 {
        for j in (0..3).filter(|&j| j != i) {
            if b.block(i * d..(i + 1) * d, j * r..(j + 1) * r).data.iter().any(|&x| x != 0.0) {
                return Err("a single LoRA pair across the whole fused qkv (non-block-diagonal B) is not supported; \
                            expected one pair per q, k, v slice"
                    .into());
            }
        }
    }
    Ok([0, 1, 2].map(|i| {
        let ai = a.block(i * r..(i + 1) * r, 0..d_in);
        let bi = b.block(i * d..(i + 1) * d, i * r..(i + 1) * r);
        let zero = ai.data.iter().all(|&x| x == 0.0) && bi.data.iter().all(|&x| x == 0.0);
        (!zero).then_some((ai, bi))
    }))
}
