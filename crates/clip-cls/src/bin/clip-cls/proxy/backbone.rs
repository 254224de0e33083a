//! The proxy model (CLIP vision tower + linear head), its pretraining on digits 0–4 and the
//! backbone cache file.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use lora_runtime::dist::Peer;
use lora_runtime::run::cosine_lr;
use lora_runtime::train::{Micro, StepPlan, TrainTask, optimizer_step};
use serde::{Deserialize, Serialize};
use serial_lora::io::{HostTensor, read_safetensors, write_safetensors};
use serial_lora::layers::Activation;
use serial_lora::optim::adamw_pytorch_defaults;
use serial_lora::{AdaptedModel, Attention, AttentionSite};

use super::PRETRAIN_CLASSES;
use super::data::{Digits, SIDE, SPLIT_SEED, split};
use clip_cls::config::ClipVisionConfig;
use clip_cls::encoder::EncoderLayer;
use clip_cls::error::{ClipError, Result};
use clip_cls::vision_model::VisionModel;

/// Seed of pretraining (model init and batch order): the backbone is a function of the data
/// and the pretraining settings only.
pub const PRETRAIN_SEED: u64 = 0;
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
                names: clip_cls::model::CLIP_PROJ_NAMES,
                attention: &l.self_attn,
            })
            .collect()
    }

    fn try_map_attention(mut self, f: &mut dyn FnMut(usize, Attention<B>) -> serial_lora::Result<Attention<B>>) -> serial_lora::Result<Self> {
        let layers = std::mem::take(&mut self.vision_model.encoder.layers);
        self.vision_model.encoder.layers =
            layers.into_iter().enumerate().map(|(i, l)| Ok(EncoderLayer { self_attn: f(i, l.self_attn)?, ..l })).collect::<serial_lora::Result<_>>()?;
        Ok(self)
    }
}

/// Mean cross-entropy of `logits [n, classes]` against `targets [n]`.
pub(crate) fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
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
    let plan = StepPlan {
        examples: pool.len(),
        batch: recipe.batch.max(1),
        grad_accum: 1,
        max_grad_norm: 0.0,
        seed: recipe.seed,
        shuffle: true,
        seed_dropout: false,
        peer: Peer::single(),
        gradient_checkpointing: false,
        dtype: serial_lora::BaseDType::F32,
    };
    let steps_per_epoch = plan.steps_per_epoch();
    let total = recipe.epochs * steps_per_epoch;
    let mut task = Pretraining { digits, pool: &pool, lr: recipe.lr };
    for epoch in 0..recipe.epochs {
        let mut sum = 0.0;
        for b in 0..steps_per_epoch {
            let (m, log) = optimizer_step(&mut task, model, &mut optim, &plan, epoch * steps_per_epoch + b, total, device)?;
            model = m;
            sum += f64::from(log.loss);
        }
        on_epoch(epoch, sum / steps_per_epoch as f64);
    }
    Ok(model)
}

/// Pretraining as a [`TrainTask`]: cross-entropy on a batch of the pool of digits 0–4.
struct Pretraining<'a> {
    digits: &'a Digits,
    /// Indices into `digits` of the training pool.
    pool: &'a [usize],
    /// Peak learning rate (cosine to 1 % of it).
    lr: f64,
}

impl<AB: AutodiffBackend> TrainTask<AB> for Pretraining<'_> {
    type Model = ProxyModel<AB>;
    type Error = ClipError;

    fn loss(&mut self, model: &ProxyModel<AB>, micro: &Micro, device: &AB::Device) -> Result<(Tensor<AB, 1>, f64)> {
        let idx: Vec<usize> = micro.examples.iter().map(|&o| self.pool[o]).collect();
        Ok((cross_entropy(model.forward(self.digits.pixels(&idx, device)), self.digits.targets(&idx, PRETRAIN_CLASSES.start, device)), 0.0))
    }

    fn lr(&self, step: usize, total: usize) -> f64 {
        cosine_lr(self.lr, self.lr * 0.01, step, total)
    }
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
    save_weights(model, HashMap::from([(META_RECIPE.to_string(), serde_json::to_string(recipe).unwrap_or_default())]), path)
}

/// Writes every float parameter of `model` (Burn paths, `[in, out]` layout) with `meta`,
/// atomically.
pub fn save_weights<B: Backend>(model: &ProxyModel<B>, meta: HashMap<String, String>, path: &Path) -> Result<()> {
    let mut c = Collect::default();
    model.visit(&mut c);
    Ok(write_safetensors(path, &c.out, meta)?)
}

/// Reads a file written by [`save_pretrained`]; it must hold exactly the parameters of a model
/// built from `recipe` and have been pretrained with `recipe`.
pub fn load_pretrained<B: Backend>(path: &Path, recipe: &PretrainRecipe, device: &B::Device) -> Result<ProxyModel<B>> {
    let (tensors, meta) = read_safetensors(path)?;
    let mismatch = |report: String| ClipError::from(lora_runtime::Error::WeightsMismatch { path: path.into(), report });
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
