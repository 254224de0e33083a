//! The `proxy` transfer experiment: a CPU-sized, real-data check of the paper's claim that
//! Serial LoRA matches LoRA with a quarter of the adapter parameters.
//!
//! - Data: scikit-learn's handwritten digits (`load_digits`: 1,797 grayscale 8×8 images, pixel
//!   values 0–16; `tests/fixtures/digits/`). Every digit is split 80/20 into train/test with a
//!   fixed seed ([`SPLIT_SEED`]), independent of the adaptation seed.
//! - Model: a tiny ViT built from this crate's CLIP vision tower ([`proxy_vision_config`]: 8×8
//!   single-channel images, 2×2 patches, hidden 64, 4 layers, 4 heads) plus a linear head on the
//!   pooled class token ([`ProxyModel`]).
//! - Pretraining: every parameter, on digits 0–4 (5-way head), AdamW; the result is cached in a
//!   safetensors file ([`load_or_pretrain`]).
//! - Adaptation: digits 5–9, K shots per class, the backbone frozen, adapters per method on the
//!   attention of every block (the shared `serial_lora` code) plus a fresh, trainable 5-way head
//!   in every method; top-1 accuracy on the held-out 5–9 images ([`run_proxy`]).
//!
//! Upstream of the data: UCI "Optical Recognition of Handwritten Digits" (optdigits) test set,
//! as bundled by scikit-learn 1.9.1 (`sklearn/datasets/data/digits.csv.gz`).
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use serial_lora::io::{self, HostTensor, read_safetensors, write_atomic, write_safetensors};
use serial_lora::layers::Activation;
use serial_lora::optim::{adamw_pytorch_defaults, loraplus_adamw};
use serial_lora::run::{check_finite, cosine_lr, stream_seed};
use serial_lora::{AdaptedModel, AdapterConfig, Attention, AttentionSite, ParamCountExt, ProjNames};

use crate::config::ClipVisionConfig;
use crate::data::permutation;
use crate::encoder::EncoderLayer;
use crate::error::{ClipError, Result};
use crate::vision_model::VisionModel;

/// Side of a digit image.
pub const SIDE: usize = 8;
/// Pixels per image.
pub const PIXELS: usize = SIDE * SIDE;
/// Largest pixel value of the data set.
pub const MAX_PIXEL: f32 = 16.0;
/// Seed of the per-digit train/test split (fixed: every run and seed sees the same test set).
pub const SPLIT_SEED: u64 = 0x5EED_D161;
/// Seed of pretraining (model init and batch order): the backbone is a function of the data
/// and the pretraining settings only.
pub const PRETRAIN_SEED: u64 = 0;
/// Digits the backbone is pretrained on.
pub const PRETRAIN_CLASSES: Range<u8> = 0..5;
/// Digits the adapters are trained on.
pub const TRANSFER_CLASSES: Range<u8> = 5..10;
/// Images per pretraining batch.
pub const PRETRAIN_BATCH: usize = 32;
/// Safetensors metadata key holding the [`PretrainRecipe`] of a cached backbone.
const META_RECIPE: &str = "clip_cls.proxy.pretrain_recipe";

/// The tiny ViT: CLIP's vision tower at 8×8, one channel, 2×2 patches (16 patches + class
/// token), hidden 64, MLP 128, 4 layers of 4 heads, quick-GELU as in CLIP.
pub fn proxy_vision_config() -> ClipVisionConfig {
    ClipVisionConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_channels: 1,
        image_size: SIDE,
        patch_size: 2,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    }
}

// ---------------------------------------------------------------------------------------------
// Data

/// The digits data set: images (row-major 8×8, values 0–16) and labels 0–9, in file order.
#[derive(Clone, Debug)]
pub struct Digits {
    pub images: Vec<[f32; PIXELS]>,
    pub labels: Vec<u8>,
}

impl Digits {
    /// Reads scikit-learn's `digits.csv.gz` (gzip or plain text): one image per row, 64 pixel
    /// values then the label. Errors name the file and the (1-based) row.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ClipError::Io { path: path.into(), source: e })?;
        let bad = |message: String| ClipError::Dataset { path: path.into(), message };
        let mut text = String::new();
        if bytes.starts_with(&[0x1f, 0x8b]) {
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_string(&mut text)
                .map_err(|e| bad(format!("not a readable gzip-compressed CSV file: {e}")))?;
        } else {
            text = String::from_utf8(bytes).map_err(|e| bad(format!("not a gzip file and not UTF-8 text: {e}")))?;
        }
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        for (i, line) in text.lines().enumerate() {
            let row = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if fields.len() != PIXELS + 1 {
                return Err(bad(format!("row {row}: {} values, expected {} (64 pixels, then the label)", fields.len(), PIXELS + 1)));
            }
            let mut image = [0.0f32; PIXELS];
            for (j, f) in fields[..PIXELS].iter().enumerate() {
                match f.parse::<f32>() {
                    Ok(v) if (0.0..=MAX_PIXEL).contains(&v) => image[j] = v,
                    _ => return Err(bad(format!("row {row}, column {}: pixel `{f}` is not a number in 0..=16", j + 1))),
                }
            }
            let label = fields[PIXELS];
            match label.parse::<f64>() {
                Ok(v) if v.fract() == 0.0 && (0.0..=9.0).contains(&v) => labels.push(v as u8),
                _ => return Err(bad(format!("row {row}, column {}: label `{label}` is not a digit 0–9", PIXELS + 1))),
            }
            images.push(image);
        }
        if images.is_empty() {
            return Err(bad("no data rows".into()));
        }
        Ok(Self { images, labels })
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Images per label 0–9.
    pub fn class_counts(&self) -> [usize; 10] {
        let mut c = [0; 10];
        for &l in &self.labels {
            c[l as usize] += 1;
        }
        c
    }

    /// Images `idx` as `[n, 1, 8, 8]`, scaled from 0–16 to −1–1.
    pub fn pixels<B: Backend>(&self, idx: &[usize], device: &B::Device) -> Tensor<B, 4> {
        let data: Vec<f32> = idx.iter().flat_map(|&i| self.images[i].iter().map(|v| v * (2.0 / MAX_PIXEL) - 1.0)).collect();
        Tensor::from_data(TensorData::new(data, [idx.len(), 1, SIDE, SIDE]), device)
    }

    /// Labels of `idx` minus `first` (the first digit of the task), `[n]`.
    pub fn targets<B: Backend>(&self, idx: &[usize], first: u8, device: &B::Device) -> Tensor<B, 1, Int> {
        let data: Vec<i64> = idx.iter().map(|&i| i64::from(self.labels[i]) - i64::from(first)).collect();
        Tensor::from_data(TensorData::new(data, [idx.len()]), device)
    }
}

/// Indices of a train/test split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

/// The fixed split of the digits `classes`: per digit, a seeded ([`SPLIT_SEED`]) 20 % (rounded)
/// is held out for testing, the rest is the training pool. Indices ascend in each part.
pub fn split(digits: &Digits, classes: Range<u8>) -> Split {
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for c in classes {
        let members: Vec<usize> = (0..digits.len()).filter(|&i| digits.labels[i] == c).collect();
        let order = permutation(members.len(), stream_seed(SPLIT_SEED, 0, u64::from(c)));
        let n_test = (members.len() + 2) / 5;
        test.extend(order[..n_test].iter().map(|&o| members[o]));
        train.extend(order[n_test..].iter().map(|&o| members[o]));
    }
    train.sort_unstable();
    test.sort_unstable();
    Split { train, test }
}

/// `shots` images of each digit of `classes` drawn from `pool` with `seed`, in class order.
pub fn few_shot(digits: &Digits, pool: &[usize], classes: Range<u8>, shots: usize, seed: u64) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for c in classes {
        let members: Vec<usize> = pool.iter().copied().filter(|&i| digits.labels[i] == c).collect();
        if shots > members.len() {
            let why = format!("digit {c} has only {} training images", members.len());
            return Err(serial_lora::Error::config("shots", shots, why).into());
        }
        let order = permutation(members.len(), stream_seed(seed, 4, u64::from(c)));
        out.extend(order[..shots].iter().map(|&o| members[o]));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Model

/// The tiny ViT classifier: CLIP vision tower + linear head on the pooled class token.
#[derive(Module, Debug)]
pub struct ProxyModel<B: Backend> {
    pub vision_model: VisionModel<B>,
    /// `[hidden, classes]`.
    pub head: Linear<B>,
}

impl<B: Backend> ProxyModel<B> {
    /// Random weights (backend RNG).
    pub fn new(vision: &ClipVisionConfig, classes: usize, device: &B::Device) -> Self {
        Self { vision_model: VisionModel::new(vision, device), head: LinearConfig::new(vision.hidden_size, classes).init(device) }
    }

    /// `[batch, 1, 8, 8]` → logits `[batch, classes]`.
    pub fn forward(&self, pixels: Tensor<B, 4>) -> Tensor<B, 2> {
        self.head.forward(self.vision_model.forward(pixels).pooler_output)
    }
}

/// Adaptable blocks: the vision tower's layers, named by their HF module paths.
impl<B: Backend> AdaptedModel<B> for ProxyModel<B> {
    fn attention_sites(&self) -> Vec<AttentionSite<'_, B>> {
        let layers = self.vision_model.encoder.layers.iter().enumerate();
        layers
            .map(|(i, l)| AttentionSite {
                path: format!("vision_model.encoder.layers.{i}.self_attn"),
                names: ProjNames::CLIP,
                attention: &l.self_attn,
            })
            .collect()
    }

    fn try_map_attention(
        mut self,
        f: &mut dyn FnMut(usize, Attention<B>) -> serial_lora::Result<Attention<B>>,
    ) -> serial_lora::Result<Self> {
        let layers = std::mem::take(&mut self.vision_model.encoder.layers);
        self.vision_model.encoder.layers = layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| Ok(EncoderLayer { self_attn: f(i, l.self_attn)?, ..l }))
            .collect::<serial_lora::Result<_>>()?;
        Ok(self)
    }
}

/// Mean cross-entropy of `logits [n, classes]` against `targets [n]`.
fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    log_softmax(logits, 1).gather(1, targets.unsqueeze_dim(1)).mean().neg()
}

/// Correct top-1 predictions on images `idx` (labels minus `first`), in batches of 256.
pub fn correct<B: Backend>(model: &ProxyModel<B>, digits: &Digits, idx: &[usize], first: u8, device: &B::Device) -> usize {
    idx.chunks(256)
        .map(|chunk| {
            let pred = model.forward(digits.pixels(chunk, device)).argmax(1).squeeze_dim::<1>(1);
            pred.equal(digits.targets(chunk, first, device)).int().sum().into_scalar().elem::<i64>() as usize
        })
        .sum()
}

/// Top-1 accuracy in [0, 1] on images `idx` (0 for no image).
pub fn accuracy<B: Backend>(model: &ProxyModel<B>, digits: &Digits, idx: &[usize], first: u8, device: &B::Device) -> f64 {
    correct(model, digits, idx, first, device) as f64 / idx.len().max(1) as f64
}

// ---------------------------------------------------------------------------------------------
// Pretraining and the backbone cache

/// Everything that determines a pretrained backbone (stored in the cache file and compared on
/// load).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PretrainRecipe {
    pub vision: ClipVisionConfig,
    pub classes: [u8; 2],
    pub split_seed: u64,
    pub seed: u64,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
}

impl PretrainRecipe {
    /// The recipe with the proxy's fixed choices and the given epochs and peak lr.
    pub fn new(epochs: usize, lr: f64) -> Self {
        Self {
            vision: proxy_vision_config(),
            classes: [PRETRAIN_CLASSES.start, PRETRAIN_CLASSES.end - 1],
            split_seed: SPLIT_SEED,
            seed: PRETRAIN_SEED,
            epochs,
            batch: PRETRAIN_BATCH,
            lr,
            weight_decay: 1e-2,
        }
    }
}

/// Full-parameter training of backbone + 5-way head on the training pool of digits 0–4:
/// AdamW (PyTorch defaults, weight decay per recipe), cosine schedule to 1 % of the peak lr,
/// seeded init and batch order. `on_epoch(epoch, mean loss)` after each epoch.
pub fn pretrain<AB: AutodiffBackend>(
    digits: &Digits,
    recipe: &PretrainRecipe,
    device: &AB::Device,
    on_epoch: &mut dyn FnMut(usize, f64),
) -> Result<ProxyModel<AB>> {
    let pool = split(digits, PRETRAIN_CLASSES).train;
    AB::seed(device, recipe.seed);
    let mut model = ProxyModel::<AB>::new(&recipe.vision, PRETRAIN_CLASSES.len(), device);
    let mut optim = adamw_pytorch_defaults().with_weight_decay(recipe.weight_decay as f32).init::<AB, ProxyModel<AB>>();
    let steps_per_epoch = pool.len().div_ceil(recipe.batch.max(1));
    let total = recipe.epochs * steps_per_epoch;
    for epoch in 0..recipe.epochs {
        let order = permutation(pool.len(), stream_seed(recipe.seed, 1, epoch as u64));
        let mut sum = 0.0;
        for (b, batch) in order.chunks(recipe.batch.max(1)).enumerate() {
            let step = epoch * steps_per_epoch + b;
            let idx: Vec<usize> = batch.iter().map(|&o| pool[o]).collect();
            let loss = cross_entropy(model.forward(digits.pixels(&idx, device)), digits.targets(&idx, PRETRAIN_CLASSES.start, device));
            let loss_value = loss.clone().into_scalar().elem::<f32>();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            check_finite(step, loss_value, &model, &grads)?;
            model = optim.step(cosine_lr(recipe.lr, recipe.lr * 0.01, step, total), model, grads);
            sum += f64::from(loss_value);
        }
        on_epoch(epoch, sum / steps_per_epoch as f64);
    }
    Ok(model)
}

/// Collects every float parameter as a host tensor keyed by its Burn path.
#[derive(Default)]
struct Collect {
    stack: Vec<String>,
    out: BTreeMap<String, HostTensor>,
}

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        self.out.insert(self.stack.join("."), HostTensor::from_tensor(p.val()));
    }
}

/// Replaces every float parameter by the tensor of the same Burn path, recording what is
/// missing or mis-shaped.
struct Apply<'a> {
    stack: Vec<String>,
    tensors: &'a BTreeMap<String, HostTensor>,
    used: Vec<String>,
    problems: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for Apply<'_> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.stack.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let path = self.stack.join(".");
        let expected = param.lazy_shape().to_vec();
        match self.tensors.get(&path) {
            None => self.problems.push(format!("missing: {path} {expected:?}")),
            Some(t) if t.shape != expected => self.problems.push(format!("wrong shape: {path} {:?}, expected {expected:?}", t.shape)),
            Some(t) => {
                self.used.push(path);
                let id = param.id;
                let value = Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), &param.lazy_device());
                return param.transform_for_load(value, id);
            }
        }
        param
    }
}

/// Writes a pretrained model (backbone and pretraining head, Burn paths and `[in, out]`
/// layout) with its recipe, atomically.
pub fn save_pretrained<B: Backend>(model: &ProxyModel<B>, recipe: &PretrainRecipe, path: &Path) -> Result<()> {
    let mut c = Collect::default();
    model.visit(&mut c);
    let meta = HashMap::from([(META_RECIPE.to_string(), serde_json::to_string(recipe).unwrap_or_default())]);
    Ok(write_safetensors(path, &c.out, meta)?)
}

/// Reads a file written by [`save_pretrained`]; it must hold exactly the parameters of a model
/// built from `recipe` and have been pretrained with `recipe`.
pub fn load_pretrained<B: Backend>(path: &Path, recipe: &PretrainRecipe, device: &B::Device) -> Result<ProxyModel<B>> {
    let (tensors, meta) = read_safetensors(path)?;
    let mismatch = |report: String| ClipError::from(serial_lora::Error::WeightsMismatch { path: path.into(), report });
    let saved: Option<PretrainRecipe> = meta.get(META_RECIPE).and_then(|s| serde_json::from_str(s).ok());
    match saved {
        None => return Err(mismatch(format!("  no `{META_RECIPE}` metadata: not a backbone written by `clip-cls proxy`\n"))),
        Some(s) if &s != recipe => {
            let text = |r: &PretrainRecipe| serde_json::to_string(r).unwrap_or_default();
            return Err(mismatch(format!(
                "  pretrained with {}\n  this run asks for {}\n  (delete the file or pass another --backbone)\n",
                text(&s),
                text(recipe)
            )));
        }
        Some(_) => {}
    }
    let model = ProxyModel::<B>::new(&recipe.vision, PRETRAIN_CLASSES.len(), device);
    let mut apply = Apply { stack: Vec::new(), tensors: &tensors, used: Vec::new(), problems: Vec::new() };
    let model = model.map(&mut apply);
    let mut problems = apply.problems;
    problems.extend(tensors.keys().filter(|k| !apply.used.contains(k)).map(|k| format!("unexpected: {k}")));
    if !problems.is_empty() {
        return Err(mismatch(problems.iter().map(|p| format!("  {p}\n")).collect()));
    }
    Ok(model)
}

/// How the backbone of a run was obtained.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackboneInfo {
    pub path: PathBuf,
    /// Whether this run pretrained it (else it was read from the cache).
    pub pretrained_now: bool,
    /// Seconds of pretraining in this run.
    pub pretrain_seconds: Option<f64>,
}

/// The pretrained model from `path` if the file exists, else pretrained now and written there
/// atomically (then read back, so a cached and a fresh backbone are the same bits).
pub fn load_or_pretrain<AB: AutodiffBackend>(
    digits: &Digits,
    recipe: &PretrainRecipe,
    path: &Path,
    device: &AB::Device,
    on_epoch: &mut dyn FnMut(usize, f64),
) -> Result<(ProxyModel<AB>, BackboneInfo)> {
    let mut info = BackboneInfo { path: path.into(), pretrained_now: false, pretrain_seconds: None };
    if !path.exists() {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ClipError::Io { path: dir.into(), source: e })?;
        }
        let start = std::time::Instant::now();
        let model = pretrain::<AB>(digits, recipe, device, on_epoch)?;
        save_pretrained(&model, recipe, path)?;
        info.pretrained_now = true;
        info.pretrain_seconds = Some(start.elapsed().as_secs_f64());
    }
    Ok((load_pretrained::<AB>(path, recipe, device)?, info))
}

// ---------------------------------------------------------------------------------------------
// Adaptation

/// Default adapter rank.
pub const DEFAULT_RANK: usize = 8;
/// Default shots per class.
pub const DEFAULT_SHOTS: usize = 16;
/// Default optimizer steps of the adaptation (full batch).
pub const DEFAULT_ITERS: usize = 100;
/// Default peak learning rate of the adaptation (A matrices and head).
pub const DEFAULT_LR: f64 = 3e-3;
/// Default pretraining epochs.
pub const DEFAULT_PRETRAIN_EPOCHS: usize = 10;
/// Default pretraining peak learning rate.
pub const DEFAULT_PRETRAIN_LR: f64 = 1e-3;

/// Settings of one proxy run (`clip-cls proxy`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct ProxyConfig {
    /// scikit-learn's digits.csv.gz (e.g. tests/fixtures/digits/digits.csv.gz).
    #[arg(long)]
    pub data: PathBuf,
    /// Pretrained-backbone cache (safetensors): read if it exists, else pretrained and written.
    #[arg(long)]
    pub backbone: PathBuf,
    /// lora | serial-lora | lora-plus | serial-lora-plus
    #[arg(long)]
    pub method: String,
    #[arg(long, default_value_t = DEFAULT_RANK)]
    pub rank: usize,
    /// Training images per digit 5–9, drawn with --seed from the training pool.
    #[arg(long, default_value_t = DEFAULT_SHOTS)]
    pub shots: usize,
    /// Seed of the shot sample, the adapter and head init and the adapter dropout.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Optimizer steps of the adaptation (full batch: every shot in every step).
    #[arg(long, default_value_t = DEFAULT_ITERS)]
    pub iters: usize,
    /// Peak learning rate (A matrices and head; B matrices get lr × lr-ratio with `-plus`).
    #[arg(long, default_value_t = DEFAULT_LR)]
    pub lr: f64,
    /// LoRA+ ratio lr_B / lr_A (lora-plus and serial-lora-plus).
    #[arg(long, default_value_t = 20.0)]
    pub lr_ratio: f64,
    /// Scale numerator s = alpha / rank; default: the rank (s = 1).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Dropout on the adapter input.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Pretraining epochs (only used when --backbone does not exist yet).
    #[arg(long, default_value_t = DEFAULT_PRETRAIN_EPOCHS)]
    pub pretrain_epochs: usize,
    /// Pretraining peak learning rate (only used when --backbone does not exist yet).
    #[arg(long, default_value_t = DEFAULT_PRETRAIN_LR)]
    pub pretrain_lr: f64,
}

impl ProxyConfig {
    /// The defaults of the command line for the required settings.
    pub fn new(data: impl Into<PathBuf>, backbone: impl Into<PathBuf>, method: &str) -> Self {
        Self {
            data: data.into(),
            backbone: backbone.into(),
            method: method.into(),
            rank: DEFAULT_RANK,
            shots: DEFAULT_SHOTS,
            seed: 1,
            iters: DEFAULT_ITERS,
            lr: DEFAULT_LR,
            lr_ratio: 20.0,
            alpha: None,
            dropout: 0.0,
            weight_decay: 1e-2,
            pretrain_epochs: DEFAULT_PRETRAIN_EPOCHS,
            pretrain_lr: DEFAULT_PRETRAIN_LR,
        }
    }

    /// The adapter config (checked).
    pub fn adapter_config(&self) -> Result<AdapterConfig> {
        let a = AdapterConfig::from_method_name(&self.method, self.rank, self.lr_ratio)?
            .with_alpha(self.alpha.unwrap_or(self.rank as f64))
            .with_dropout(self.dropout);
        a.validate()?;
        Ok(a)
    }

    /// The pretraining recipe.
    pub fn recipe(&self) -> PretrainRecipe {
        PretrainRecipe::new(self.pretrain_epochs, self.pretrain_lr)
    }

    /// Checks every setting; errors name the flag and the value.
    pub fn check(&self) -> Result<()> {
        let bad = |key: &'static str, value: String, why: &str| -> Result<()> { Err(serial_lora::Error::config(key, value, why).into()) };
        if self.rank == 0 {
            return bad("rank", "0".into(), "must be at least 1");
        }
        if self.shots == 0 {
            return bad("shots", "0".into(), "must be at least 1");
        }
        if self.iters == 0 {
            return bad("iters", "0".into(), "must be at least 1");
        }
        if self.pretrain_epochs == 0 {
            return bad("pretrain-epochs", "0".into(), "must be at least 1");
        }
        for (key, v) in [("lr", self.lr), ("pretrain-lr", self.pretrain_lr)] {
            if !(v.is_finite() && v > 0.0) {
                return bad(key, v.to_string(), "must be a finite number > 0");
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight-decay", self.weight_decay.to_string(), "must be a finite number ≥ 0");
        }
        self.adapter_config().map(|_| ())
    }
}

/// The adapted model after training, and what it cost.
pub struct Adapted<AB: AutodiffBackend> {
    pub model: ProxyModel<AB>,
    pub adapter: AdapterConfig,
    /// Per-step training loss.
    pub loss: Vec<f32>,
    /// Trainable parameters of the adapters (backbone) and of the head.
    pub adapter_params: usize,
    pub head_params: usize,
    pub total_params: usize,
    pub train_images: usize,
    /// Seconds of the optimizer steps.
    pub train_seconds: f64,
}

/// Attaches adapters per `cfg` to the frozen `backbone` of a pretrained model, adds a fresh
/// 5-way head (trainable in every method) and trains both on `shots` (full batch, `cfg.iters`
/// AdamW steps, cosine schedule to 1 % of the peak lr; LoRA+ puts B matrices and the head bias
/// at lr × ratio, as PEFT's `create_loraplus_optimizer` does with every 1-D parameter).
pub fn adapt<AB: AutodiffBackend>(
    pretrained: ProxyModel<AB>,
    digits: &Digits,
    shots: &[usize],
    cfg: &ProxyConfig,
    device: &AB::Device,
) -> Result<Adapted<AB>> {
    cfg.check()?;
    let adapter = cfg.adapter_config()?;
    AB::seed(device, stream_seed(cfg.seed, 5, 0));
    let hidden = pretrained.head.weight.val().dims()[0];
    let mut model = pretrained.with_adapters(&adapter, device)?;
    model.head = LinearConfig::new(hidden, TRANSFER_CLASSES.len()).init(device);
    let adapter_params = model.vision_model.trainable_params();
    let head_params = model.head.trainable_params();
    let total_params = model.total_params();

    let mut optim = loraplus_adamw::<AB, ProxyModel<AB>>(
        &adamw_pytorch_defaults().with_weight_decay(cfg.weight_decay as f32),
        adapter.lr_ratio.unwrap_or(1.0),
    );
    let x = digits.pixels::<AB>(shots, device);
    let y = digits.targets::<AB>(shots, TRANSFER_CLASSES.start, device);
    let mut loss_log = Vec::with_capacity(cfg.iters);
    let start = std::time::Instant::now();
    for step in 0..cfg.iters {
        AB::seed(device, stream_seed(cfg.seed, 3, step as u64)); // adapter dropout
        let loss = cross_entropy(model.forward(x.clone()), y.clone());
        let loss_value = loss.clone().into_scalar().elem::<f32>();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        check_finite(step, loss_value, &model, &grads)?;
        model = optim.step(cosine_lr(cfg.lr, cfg.lr * 0.01, step, cfg.iters), model, grads);
        loss_log.push(loss_value);
    }
    Ok(Adapted {
        model,
        adapter,
        loss: loss_log,
        adapter_params,
        head_params,
        total_params,
        train_images: shots.len(),
        train_seconds: start.elapsed().as_secs_f64(),
    })
}

/// `metrics.json` of a proxy run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProxyMetrics {
    /// Always `proxy`.
    pub task: String,
    pub method: String,
    pub rank: usize,
    pub shots: usize,
    pub seed: u64,
    pub iters: usize,
    pub lr: f64,
    pub lr_ratio: Option<f64>,
    pub alpha: f64,
    /// Top-1 accuracy on the held-out images of digits 5–9, in [0, 1].
    pub accuracy: f64,
    pub test_images: usize,
    pub correct: usize,
    /// Top-1 accuracy of the pretrained model (its 5-way head) on the held-out digits 0–4.
    pub pretrain_accuracy: f64,
    pub pretrain_test_images: usize,
    pub backbone: BackboneInfo,
    /// Trainable adapter parameters (A and B matrices).
    pub adapter_params: usize,
    /// Trainable head parameters (weight + bias).
    pub head_params: usize,
    /// adapter_params + head_params.
    pub trainable_params: usize,
    pub total_params: usize,
    pub train_images: usize,
    /// Per-step training loss.
    pub loss: Vec<f32>,
    /// Seconds of the adaptation (optimizer steps and the test evaluation; not pretraining).
    pub wall_seconds: f64,
    /// Training images per second of the optimizer steps.
    pub images_per_second: f64,
    pub device: String,
}

/// One proxy run: loads the digits, gets the pretrained backbone (cache or pretraining),
/// adapts it per `cfg`, evaluates, and writes into `out` the adapter (PEFT layout),
/// `head.safetensors` and `metrics.json` (atomically). `on_epoch` reports pretraining.
pub fn run_proxy<AB: AutodiffBackend>(
    cfg: &ProxyConfig,
    out: &Path,
    device: &AB::Device,
    on_epoch: &mut dyn FnMut(usize, f64),
) -> Result<ProxyMetrics> {
    cfg.check()?;
    let digits = Digits::load(&cfg.data)?;
    let transfer = split(&digits, TRANSFER_CLASSES);
    // too many shots fail here, before any time is spent on pretraining
    let shots = few_shot(&digits, &transfer.train, TRANSFER_CLASSES, cfg.shots, cfg.seed)?;
    std::fs::create_dir_all(out).map_err(|e| ClipError::Io { path: out.into(), source: e })?;
    let (pretrained, backbone) = load_or_pretrain::<AB>(&digits, &cfg.recipe(), &cfg.backbone, device, on_epoch)?;
    let held_out = split(&digits, PRETRAIN_CLASSES).test;
    let pretrain_accuracy = accuracy(&pretrained.valid(), &digits, &held_out, PRETRAIN_CLASSES.start, device);

    let start = std::time::Instant::now();
    let a = adapt(pretrained, &digits, &shots, cfg, device)?;
    let test = transfer.test;
    let right = correct(&a.model.valid(), &digits, &test, TRANSFER_CLASSES.start, device);
    let wall_seconds = start.elapsed().as_secs_f64();

    io::save_adapter(&a.model, &a.adapter, out, Some(&cfg.backbone.display().to_string()))?;
    let head: BTreeMap<String, HostTensor> = [("head.weight", a.model.head.weight.val())]
        .into_iter()
        .map(|(k, t)| (k.to_string(), HostTensor::from_tensor(t)))
        .chain(a.model.head.bias.as_ref().map(|b| ("head.bias".to_string(), HostTensor::from_tensor(b.val()))))
        .collect();
    write_safetensors(&out.join("head.safetensors"), &head, HashMap::new())?;

    let metrics = ProxyMetrics {
        task: "proxy".into(),
        method: a.adapter.method_name().into(),
        rank: cfg.rank,
        shots: cfg.shots,
        seed: cfg.seed,
        iters: cfg.iters,
        lr: cfg.lr,
        lr_ratio: a.adapter.lr_ratio,
        alpha: a.adapter.alpha,
        accuracy: right as f64 / test.len().max(1) as f64,
        test_images: test.len(),
        correct: right,
        pretrain_accuracy,
        pretrain_test_images: held_out.len(),
        backbone,
        adapter_params: a.adapter_params,
        head_params: a.head_params,
        trainable_params: a.adapter_params + a.head_params,
        total_params: a.total_params,
        train_images: a.train_images,
        loss: a.loss,
        wall_seconds,
        images_per_second: (a.train_images * cfg.iters) as f64 / a.train_seconds.max(1e-9),
        device: AB::name(device),
    };
    let text = serde_json::to_string_pretty(&metrics).unwrap_or_default();
    write_atomic(&out.join("metrics.json"), text.as_bytes())?;
    Ok(metrics)
}
