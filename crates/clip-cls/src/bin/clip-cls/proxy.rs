//! The `proxy` transfer experiment: a CPU-sized, real-data check of the paper's claim that
//! Serial LoRA matches LoRA with a quarter of the adapter parameters.
//!
//! - Data: scikit-learn's handwritten digits (`load_digits`: 1,797 grayscale 8×8 images, pixel
//!   values 0–16; `tests/fixtures/digits/`). Every digit is split 80/20 into train/test with a
//!   fixed seed ([`data::SPLIT_SEED`]), independent of the adaptation seed.
//! - Model: a tiny ViT built from this crate's CLIP vision tower ([`proxy_vision_config`]: 8×8
//!   single-channel images, 2×2 patches, hidden 64, 4 layers, 4 heads) plus a linear head on the
//!   pooled class token ([`ProxyModel`]).
//! - Pretraining: every parameter, on digits 0–4 (5-way head), AdamW; the result is cached in a
//!   safetensors file ([`load_or_pretrain`]).
//! - Adaptation: digits 5–9, K shots per class, the backbone frozen, adapters per method on the
//!   attention of every block (the shared `serial_lora` code) plus a fresh, trainable 5-way head
//!   in every method; top-1 accuracy on the held-out 5–9 images ([`run_proxy`]). Two baselines
//!   in the same harness ([`BASELINES`]): the head alone on the frozen backbone (`head-only`),
//!   and full fine-tuning of backbone and head (`full`).
//! - The same seed draws the same shots and the same head init in every method, so results of
//!   different methods at one seed are paired.
//!
//! Upstream of the data: UCI "Optical Recognition of Handwritten Digits" (optdigits) test set,
//! as bundled by scikit-learn 1.9.1 (`sklearn/datasets/data/digits.csv.gz`).
#[path = "proxy/backbone.rs"]
pub mod backbone;
#[path = "proxy/data.rs"]
pub mod data;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module, Param};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use lora_runtime::dist::Peer;
use lora_runtime::run::{cosine_lr, stream_seed};
use lora_runtime::train::{CommonTrainArgs, Micro, StepPlan, TrainTask, optimizer_step, streams};
use serde::{Deserialize, Serialize};
use serial_lora::analysis::qkv_spectra;
use serial_lora::io::{self, HostTensor, write_atomic, write_safetensors};
use serial_lora::optim::{adamw_pytorch_defaults, loraplus_adamw};
use serial_lora::{AdaptedModel, AdapterConfig, ParamCountExt};

use backbone::cross_entropy;
pub use backbone::{
    BackboneInfo, PretrainRecipe, ProxyModel, accuracy, correct, load_or_pretrain, load_pretrained, pretrain, proxy_vision_config, save_pretrained,
};
use clip_cls::error::{ClipError, Result};
pub use data::{Digits, Split, few_shot, split};

/// Digits the backbone is pretrained on.
pub const PRETRAIN_CLASSES: Range<u8> = 0..5;
/// Digits the adapters are trained on.
pub const TRANSFER_CLASSES: Range<u8> = 5..10;

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
/// The methods without an adapter: the 5-way head alone on the frozen backbone, and full
/// fine-tuning (every backbone parameter and the head).
pub const BASELINES: [&str; 2] = ["head-only", "full"];
/// What `--method` takes.
const METHOD_CHOICES: &str = "lora | serial-lora | lora-plus | serial-lora-plus | head-only | full";

/// Settings of one proxy run (`clip-cls proxy`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct ProxyConfig {
    /// scikit-learn's digits.csv.gz (e.g. tests/fixtures/digits/digits.csv.gz).
    #[arg(long)]
    pub data: PathBuf,
    /// Pretrained-backbone cache (safetensors): read if it exists, else pretrained and written.
    #[arg(long)]
    pub backbone: PathBuf,
    /// lora | serial-lora | lora-plus | serial-lora-plus, or a baseline without adapter:
    /// head-only (the head alone on the frozen backbone) | full (every parameter).
    #[arg(long)]
    pub method: String,
    /// Adapter rank (not used by head-only and full).
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

    /// Whether the method is a baseline without adapter ([`BASELINES`]).
    pub fn is_baseline(&self) -> bool {
        BASELINES.contains(&self.method.as_str())
    }

    /// The adapter config (checked); `None` for a baseline.
    pub fn adapter_config(&self) -> Result<Option<AdapterConfig>> {
        if self.is_baseline() {
            return Ok(None);
        }
        let a = AdapterConfig::from_method_name(&self.method, self.rank, self.lr_ratio)
            .map_err(|_| serial_lora::Error::config("method", &self.method, format!("unknown method (expected {METHOD_CHOICES})")))?
            .with_alpha(self.alpha.unwrap_or(self.rank as f64))
            .with_dropout(self.dropout);
        a.validate()?;
        Ok(Some(a))
    }

    /// The pretraining recipe.
    pub fn recipe(&self) -> PretrainRecipe {
        PretrainRecipe::new(self.pretrain_epochs, self.pretrain_lr)
    }

    /// Checks every setting; errors name the flag and the value.
    pub fn check(&self) -> Result<()> {
        let bad = |key: &'static str, value: String, why: &str| -> Result<()> { Err(serial_lora::Error::config(key, value, why).into()) };
        if self.rank == 0 && !self.is_baseline() {
            return bad("rank", "0".into(), "must be at least 1");
        }
        if self.shots == 0 {
            return bad("shots", "0".into(), "must be at least 1");
        }
        self.common().validate_optimization()?;
        if self.pretrain_epochs == 0 {
            return bad("pretrain-epochs", "0".into(), "must be at least 1");
        }
        if !(self.pretrain_lr.is_finite() && self.pretrain_lr > 0.0) {
            return bad("pretrain-lr", self.pretrain_lr.to_string(), "must be a finite number > 0");
        }
        self.adapter_config().map(|_| ())
    }

    /// The settings every training shares (checked by [`CommonTrainArgs::validate`]); the batch is
    /// every shot.
    pub fn common(&self) -> CommonTrainArgs<'_> {
        CommonTrainArgs {
            method: &self.method,
            rank: self.rank,
            dropout: self.dropout,
            lr: self.lr,
            lr_ratio: self.lr_ratio,
            weight_decay: self.weight_decay,
            epochs: None,
            iters: Some(self.iters),
            batch: self.shots,
            seed: self.seed,
            save_steps: None,
        }
    }
}

/// The adapted model after training, and what it cost.
pub struct Adapted<AB: AutodiffBackend> {
    pub model: ProxyModel<AB>,
    /// `None` for a baseline.
    pub adapter: Option<AdapterConfig>,
    /// Per-step training loss.
    pub loss: Vec<f32>,
    /// Trainable parameters of the backbone (its adapters; every backbone parameter for `full`;
    /// none for `head-only`) and of the head.
    pub adapter_params: usize,
    pub head_params: usize,
    pub total_params: usize,
    pub train_images: usize,
    /// Seconds of the optimizer steps.
    pub train_seconds: f64,
}

/// Attaches adapters per `cfg` to the frozen `backbone` of a pretrained model (a baseline: no
/// adapter, the backbone frozen for `head-only`, trainable for `full`), adds a fresh 5-way head
/// (trainable in every method) and trains them on `shots` (full batch, `cfg.iters` AdamW steps,
/// cosine schedule to 1 % of the peak lr; LoRA+ puts B matrices and the head bias at lr × ratio,
/// as PEFT's `create_loraplus_optimizer` does with every 1-D parameter).
pub fn adapt<AB: AutodiffBackend>(pretrained: ProxyModel<AB>, digits: &Digits, shots: &[usize], cfg: &ProxyConfig, device: &AB::Device) -> Result<Adapted<AB>> {
    cfg.check()?;
    let adapter = cfg.adapter_config()?;
    let hidden = pretrained.head.weight.val().dims()[0];
    let mut model = match &adapter {
        Some(a) => pretrained.with_adapters(a, stream_seed(cfg.seed, streams::PROXY_INIT, 0), device)?,
        None if cfg.method == "head-only" => pretrained.no_grad(),
        None => pretrained, // `full`: the loaded parameters are all trainable
    };
    // the new head as `LinearConfig::init` draws it (U(±1/√in) for weight and bias), seeded
    let (mut rng, bound, n) = (serial_lora::rng::rng(stream_seed(cfg.seed, streams::PROXY_INIT, 1)), 1.0 / (hidden as f64).sqrt(), TRANSFER_CLASSES.len());
    let weight = serial_lora::rng::uniform([hidden, n], bound, &mut rng, device);
    let bias = serial_lora::rng::uniform([n], bound, &mut rng, device);
    model.head = Linear { weight: Param::from_tensor(weight), bias: Some(Param::from_tensor(bias)) };
    let adapter_params = model.vision_model.trainable_params();
    let head_params = model.head.trainable_params();
    let total_params = model.total_params();

    let mut optim = loraplus_adamw::<AB, ProxyModel<AB>>(
        &adamw_pytorch_defaults().with_weight_decay(cfg.weight_decay as f32),
        adapter.as_ref().and_then(|a| a.lr_ratio).unwrap_or(1.0),
    );
    // full batch, in order: one micro-batch of every shot per step
    let plan = StepPlan {
        examples: shots.len(),
        batch: shots.len(),
        grad_accum: 1,
        max_grad_norm: 0.0,
        seed: cfg.seed,
        shuffle: false,
        seed_dropout: true,
        peer: Peer::single(),
        gradient_checkpointing: false,
        dtype: serial_lora::BaseDType::F32,
    };
    let mut task = FullBatch { x: digits.pixels::<AB>(shots, device), y: digits.targets::<AB>(shots, TRANSFER_CLASSES.start, device), lr: cfg.lr };
    let mut loss_log = Vec::with_capacity(cfg.iters);
    let start = std::time::Instant::now();
    for step in 0..cfg.iters {
        let (m, log) = optimizer_step(&mut task, model, &mut optim, &plan, step, cfg.iters, device)?;
        model = m;
        loss_log.push(log.loss);
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

/// The adaptation as a [`TrainTask`]: cross-entropy of the model on all the shots.
struct FullBatch<AB: AutodiffBackend> {
    x: Tensor<AB, 4>,
    y: Tensor<AB, 1, Int>,
    /// Peak learning rate (cosine to 1 % of it).
    lr: f64,
}

impl<AB: AutodiffBackend> TrainTask<AB> for FullBatch<AB> {
    type Model = ProxyModel<AB>;
    type Error = ClipError;

    fn loss(&mut self, model: &ProxyModel<AB>, _micro: &Micro, _device: &AB::Device) -> Result<(Tensor<AB, 1>, f64)> {
        Ok((cross_entropy(model.forward(self.x.clone()), self.y.clone()), 0.0))
    }

    fn lr(&self, step: usize, total: usize) -> f64 {
        cosine_lr(self.lr, self.lr * 0.01, step, total)
    }
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
    /// Scale numerator of the adapter (`None` for a baseline).
    pub alpha: Option<f64>,
    /// Top-1 accuracy on the held-out images of digits 5–9, in [0, 1].
    pub accuracy: f64,
    pub test_images: usize,
    pub correct: usize,
    /// Top-1 accuracy of the pretrained model (its 5-way head) on the held-out digits 0–4.
    pub pretrain_accuracy: f64,
    pub pretrain_test_images: usize,
    pub backbone: BackboneInfo,
    /// Trainable parameters of the backbone: the adapters' A and B matrices (every backbone
    /// parameter for `full`, 0 for `head-only`).
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
/// adapts it per `cfg`, evaluates, and writes into `out` the adapter (PEFT layout; for `full`
/// the whole fine-tuned model as `model.safetensors`), `head.safetensors`, `spectra.json` (the
/// singular values of the Q, K, V weights before and after, as `clip-cls spectra` writes them;
/// not for `head-only`, which leaves them unchanged) and `metrics.json` (atomically).
/// `on_epoch` reports pretraining.
pub fn run_proxy<AB: AutodiffBackend>(cfg: &ProxyConfig, out: &Path, device: &AB::Device, on_epoch: &mut dyn FnMut(usize, f64)) -> Result<ProxyMetrics> {
    cfg.check()?;
    let digits = Digits::load(&cfg.data)?;
    let transfer = split(&digits, TRANSFER_CLASSES);
    // too many shots fail here, before any time is spent on pretraining
    let shots = few_shot(&digits, &transfer.train, TRANSFER_CLASSES, cfg.shots, cfg.seed)?;
    std::fs::create_dir_all(out).map_err(|e| ClipError::Io { path: out.into(), source: e })?;
    let (pretrained, backbone) = load_or_pretrain::<AB>(&digits, &cfg.recipe(), &cfg.backbone, device, on_epoch)?;
    let held_out = split(&digits, PRETRAIN_CLASSES).test;
    let pretrain_accuracy = accuracy(&pretrained.valid(), &digits, &held_out, PRETRAIN_CLASSES.start, device);
    let base_spectra = (cfg.method != "head-only").then(|| qkv_spectra(&pretrained));

    let start = std::time::Instant::now();
    let a = adapt(pretrained, &digits, &shots, cfg, device)?;
    let test = transfer.test;
    let right = correct(&a.model.valid(), &digits, &test, TRANSFER_CLASSES.start, device);
    let wall_seconds = start.elapsed().as_secs_f64();

    match &a.adapter {
        Some(adapter) => io::save_adapter(&a.model, adapter, out, Some(&cfg.backbone.display().to_string()))?,
        None if cfg.method == "full" => backbone::save_weights(&a.model, HashMap::new(), &out.join("model.safetensors"))?,
        None => {}
    }
    if let Some(base) = base_spectra {
        let spectra = serde_json::json!({ "model": cfg.backbone, "method": cfg.method, "base": base, "adapted": qkv_spectra(&a.model) });
        write_atomic(&out.join("spectra.json"), spectra.to_string().as_bytes())?;
    }
    let head: BTreeMap<String, HostTensor> = [("head.weight", a.model.head.weight.val())]
        .into_iter()
        .map(|(k, t)| (k.to_string(), HostTensor::from_tensor(t)))
        .chain(a.model.head.bias.as_ref().map(|b| ("head.bias".to_string(), HostTensor::from_tensor(b.val()))))
        .collect();
    write_safetensors(&out.join("head.safetensors"), &head, HashMap::new())?;

    let metrics = ProxyMetrics {
        task: "proxy".into(),
        method: a.adapter.as_ref().map_or(cfg.method.as_str(), |ad| ad.method_name()).into(),
        rank: cfg.rank,
        shots: cfg.shots,
        seed: cfg.seed,
        iters: cfg.iters,
        lr: cfg.lr,
        lr_ratio: a.adapter.as_ref().and_then(|ad| ad.lr_ratio),
        alpha: a.adapter.as_ref().map(|ad| ad.alpha),
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
