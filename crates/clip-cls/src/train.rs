//! Few-shot fine-tuning and evaluation of CLIP with LoRA / Serial LoRA (+): the CLIP-LoRA
//! recipe the paper follows.
//!
//! Upstream: CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024) `lora.py::run_lora` and
//! `utils.py::cls_acc`: AdamW (0.9, 0.999, weight decay 1e-2), `CosineAnnealingLR(total_iters,
//! eta_min=1e-6)` stepped per iteration, logits `100 · cos(image, class text)`, cross-entropy,
//! class text features re-encoded every step when the text tower is adapted, RandomResizedCrop
//! (scale 0.08–1, bicubic) + horizontal flip. Differences: no fp16 autocast; one epoch is one
//! pass over the few-shot set (`--epochs`), or a fixed step count (`--iters`).
//!
//! Determinism: every random draw of step `t` (batch order, augmentation, adapter dropout) is
//! seeded from `(seed, t)` (augmentation per image of the batch), and a checkpoint holds the
//! adapter, the AdamW moments and the step; a resumed run therefore reaches the same adapter as
//! an uninterrupted one.
//!
//! The step loop is the runtime's ([`lora_runtime::train::train_loop`]); this file holds what is
//! CLIP's: data, loss, accuracy.
//!
//! Data parallel ([`lora_runtime::dist`]): `--batch` is per device; the peers share out each
//! global batch and sum their weighted gradients, which is the single-device step on the whole
//! batch (up to float rounding, and adapter dropout masks, which differ per peer).
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use lora_runtime::imaging::decode_all;
use lora_runtime::run::{EvalKeeper, RunDir, RunSummary, cosine_lr, stream_seed};
pub use lora_runtime::run::{Progress, RunOptions, StepLog};
use lora_runtime::train::{CommonTrainArgs, LoopConfig, Micro, StepPlan, TrainTask, streams, train_loop};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serial_lora::{AdapterConfig, Projection};

use crate::data::{Dataset, Item, permutation};
use crate::error::{ClipError, Result};
use crate::model::{ClipModel, l2_normalize};
use crate::preprocess::{ImageProcessor, RgbImage, load_rgb};
use crate::tokenizer::{CONTEXT_LENGTH, ClipTokenizer};
use crate::{ClipConfig, load_clip};

/// Which tower(s) get adapters (CLIP-LoRA's `--encoder`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Towers {
    Vision,
    Text,
    Both,
}

/// Everything that defines a training run (saved as `train_config.json` in the run directory;
/// `--resume` checks it). Flag names and defaults follow CLIP-LoRA and the paper.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct TrainConfig {
    /// Hub id (e.g. openai/clip-vit-base-patch16) or local directory in HF layout.
    #[arg(long)]
    pub model: String,
    /// Dataset directory: CoOp layout (`split_zhou_<Name>.json` + images) or class-per-folder.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Split to train on.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Images per class (K-shot, sampled with --seed); omit to train on the whole split.
    #[arg(long)]
    pub shots: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Recompute each transformer block's activations in the backward pass instead of keeping
    /// them (less memory, one more forward pass of the blocks; the same gradients).
    #[arg(long)]
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Precision the frozen base is held in: f32 | bf16 | f16 (adapters, their gradients and
    /// the optimizer state stay f32; computed in f32).
    #[arg(long, default_value = "f32")]
    #[serde(default)]
    pub dtype: serial_lora::BaseDType,
    /// lora | serial-lora | lora-plus | serial-lora-plus
    #[arg(long)]
    pub method: String,
    #[arg(long, default_value_t = 32)]
    pub rank: usize,
    /// Scale numerator: s = alpha / rank (CLIP-LoRA's default 1).
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f64,
    /// Dropout on the adapter input.
    #[arg(long, default_value_t = 0.25)]
    pub dropout: f64,
    /// Peak learning rate (A matrices; B matrices get lr × lr-ratio with the `-plus` methods).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// LoRA+ ratio lr_B / lr_A (used by lora-plus and serial-lora-plus).
    #[arg(long, default_value_t = 20.0)]
    pub lr_ratio: f64,
    /// Final learning rate of the cosine schedule.
    #[arg(long, default_value_t = 1e-6)]
    pub eta_min: f64,
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Passes over the training images (default 50 unless --iters is given).
    #[arg(long, conflicts_with = "iters")]
    pub epochs: Option<usize>,
    /// Optimizer steps (instead of --epochs).
    #[arg(long)]
    pub iters: Option<usize>,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Tower(s) to adapt.
    #[arg(long, value_enum, default_value_t = Towers::Both)]
    pub encoder: Towers,
    /// Projections that get LoRA pairs (LoRA methods; Serial LoRA adapts the shared Q/K/V input).
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o", value_parser = parse_projection)]
    pub params: Vec<Projection>,
    /// Prompt template; `{}` is replaced by the class name. Default: CoOp's template of the
    /// dataset (e.g. "a centered satellite photo of {}." for EuroSAT), else "a photo of a {}.".
    #[arg(long)]
    pub template: Option<String>,
    /// Logits = logit_scale · cos (CLIP's trained exp(logit_scale) = 100).
    #[arg(long, default_value_t = 100.0)]
    pub logit_scale: f64,
    /// Skip (and count) images that cannot be read instead of failing.
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Checkpoint every N steps (default: every epoch).
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Top-1 accuracy on the validation split every N steps and at the end (CoOp's `val`; for
    /// class folders without one, a seeded tenth of the training split), logged to
    /// metrics.jsonl; the best adapter is kept in RUN_DIR/best/.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_steps: Option<usize>,
}

fn parse_projection(s: &str) -> std::result::Result<Projection, String> {
    match s.trim() {
        "q" => Ok(Projection::Q),
        "k" => Ok(Projection::K),
        "v" => Ok(Projection::V),
        "o" => Ok(Projection::O),
        other => Err(format!("`{other}` is not one of q, k, v, o")),
    }
}

impl TrainConfig {
    /// The adapter config for a model with `vision` + `text` layers (vision blocks first).
    pub fn adapter_config(&self, clip: &ClipConfig) -> Result<AdapterConfig> {
        let (nv, nt) = (clip.vision_config.num_hidden_layers, clip.text_config.num_hidden_layers);
        let mut a = AdapterConfig::from_method_name(&self.method, self.rank, self.lr_ratio)?.with_alpha(self.alpha).with_dropout(self.dropout);
        a.target_projections = self.params.clone();
        a.target_blocks = match self.encoder {
            Towers::Both => None,
            Towers::Vision => Some((0..nv).collect()),
            Towers::Text => Some((nv..nv + nt).collect()),
        };
        a.validate()?;
        Ok(a)
    }

    /// The settings every task shares (checked by [`CommonTrainArgs::validate`]).
    pub fn common(&self) -> CommonTrainArgs<'_> {
        CommonTrainArgs {
            method: &self.method,
            rank: self.rank,
            dropout: self.dropout,
            lr: self.lr,
            lr_ratio: self.lr_ratio,
            weight_decay: self.weight_decay,
            epochs: self.epochs,
            iters: self.iters,
            batch: self.batch,
            seed: self.seed,
            save_steps: self.save_steps,
        }
    }

    fn check(&self) -> Result<()> {
        self.common().validate()?;
        let bad = |key: &'static str, value: String, why: &str| -> Result<()> { Err(serial_lora::Error::config(key, value, why).into()) };
        if self.shots == Some(0) {
            return bad("shots", "0".into(), "must be at least 1 (omit it to use the whole split)");
        }
        if !(0.0..=self.lr).contains(&self.eta_min) {
            return bad("lr/eta-min", format!("{}/{}", self.lr, self.eta_min), "need 0 ≤ eta-min ≤ lr, lr > 0");
        }
        if let Some(t) = self.template.as_ref().filter(|t| !t.contains("{}")) {
            return bad("template", t.clone(), "has no {} for the class name");
        }
        Ok(())
    }

    /// Optimizer steps of the run for `steps_per_epoch`.
    pub fn total_steps(&self, steps_per_epoch: usize) -> usize {
        self.iters.unwrap_or(self.epochs.unwrap_or(50) * steps_per_epoch)
    }

    /// Steps between checkpoints.
    pub fn checkpoint_every(&self, steps_per_epoch: usize) -> usize {
        self.save_steps.unwrap_or(steps_per_epoch).max(1)
    }
}

/// `metrics.json` of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metrics {
    pub method: String,
    /// The prompt template used.
    pub template: String,
    pub num_classes: usize,
    pub train_images: usize,
    pub skipped_images: Vec<PathBuf>,
    pub trainable_params: usize,
    pub total_params: usize,
    #[serde(flatten)]
    pub run: RunSummary,
    /// Mean loss and accuracy on the augmented training batches of the last epoch.
    pub final_loss: f64,
    pub train_accuracy: f64,
}

/// Default of [`RunOptions::cache_bytes`].
const CACHE_BYTES: usize = 2 << 30;

/// Decoded images with their items, and the unreadable files that were skipped.
type Decoded = (Vec<(RgbImage, Item)>, Vec<PathBuf>);

/// Decodes `items`; an unreadable one fails, or with `skip_bad` is skipped and returned.
fn decode_items(items: &[Item], skip_bad: bool) -> Result<Decoded> {
    let paths: Vec<&Path> = items.iter().map(|i| i.path.as_path()).collect();
    let mut good = Vec::with_capacity(items.len());
    let mut skipped = Vec::new();
    for (item, r) in items.iter().zip(decode_all(&paths)) {
        match r.map_err(ClipError::from) {
            Ok(img) => good.push((img, item.clone())),
            Err(_) if skip_bad => skipped.push(item.path.clone()),
            Err(e) => return Err(e),
        }
    }
    Ok((good, skipped))
}

/// Token ids of `template` filled with each class name: `[classes, 77]`.
pub fn class_prompts<B: Backend>(tok: &ClipTokenizer, classnames: &[String], template: &str, device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = classnames.iter().flat_map(|c| tok.tokenize(&template.replace("{}", c), CONTEXT_LENGTH)).map(i64::from).collect();
    Tensor::from_data(TensorData::new(data, [classnames.len(), CONTEXT_LENGTH]), device)
}

/// Trains an adapter per `cfg` on the model in `model_dir`, writing the adapter (PEFT layout:
/// `adapter_config.json` + `adapter_model.safetensors`), `train_config.json`, `metrics.json` and
/// `checkpoint/` into `out`. `on_step` is called after every optimizer step.
pub fn train<AB: AutodiffBackend>(
    cfg: &TrainConfig,
    model_dir: &Path,
    out: &Path,
    opts: &RunOptions,
    device: &AB::Device,
    on_step: &mut dyn FnMut(&Progress),
) -> Result<Metrics> {
    cfg.check()?;
    let (run, resumed) = RunDir::open::<AB::InnerBackend, _>(out, cfg, opts, device)?;

    let dataset = Dataset::open(&cfg.dataset)?;
    let items = dataset.few_shot(&cfg.split, cfg.shots, cfg.seed)?;
    // Decode everything once (bad files fail or are skipped now, not mid-run); keep the pixels
    // in memory up to the cache size and decode the rest again when a batch needs them.
    let mut images: Vec<(Option<RgbImage>, Item)> = Vec::with_capacity(items.len());
    let mut skipped = Vec::new();
    let mut cached_bytes = 0;
    for chunk in items.chunks(256) {
        let (decoded, bad) = decode_items(chunk, cfg.skip_bad_images)?;
        skipped.extend(bad);
        for (img, item) in decoded {
            cached_bytes += img.data.len();
            images.push(((cached_bytes <= opts.cache_bytes.unwrap_or(CACHE_BYTES)).then_some(img), item));
        }
    }
    if images.is_empty() {
        return Err(ClipError::Dataset { path: cfg.dataset.clone(), message: "no readable training image".into() });
    }

    let (model, clip_cfg) = lora_runtime::weights::with_base_dtype(cfg.dtype, || load_clip::<AB>(model_dir, device))?;
    let tokenizer = ClipTokenizer::from_dir(model_dir)?;
    let processor = ImageProcessor::from_dir(model_dir, &clip_cfg.vision_config)?;
    let adapter_cfg = cfg.adapter_config(&clip_cfg)?;
    let template = cfg.template.clone().unwrap_or_else(|| dataset.default_template().to_string());
    let ids = class_prompts::<AB>(&tokenizer, &dataset.classnames, &template, device);
    let val_items = if cfg.eval_steps.is_some() { validation_items(&dataset, cfg.seed)? } else { Vec::new() };
    let plan = StepPlan {
        examples: images.len(),
        batch: cfg.batch,
        grad_accum: 1,
        max_grad_norm: 0.0,
        seed: cfg.seed,
        shuffle: true,
        seed_dropout: true,
        peer: opts.peer.clone(),
        gradient_checkpointing: cfg.gradient_checkpointing,
        dtype: cfg.dtype,
    };
    let loop_cfg = LoopConfig {
        plan,
        epochs: cfg.epochs,
        iters: cfg.iters,
        default_epochs: 50,
        save_steps: cfg.save_steps,
        weight_decay: cfg.weight_decay,
        adapter: &adapter_cfg,
        base_model: &cfg.model,
    };
    let mut task = ClipTask {
        cfg,
        images: &images,
        processor: &processor,
        tokenizer: &tokenizer,
        classnames: &dataset.classnames,
        template: &template,
        ids,
        fixed_text: None,
        keeper: EvalKeeper::new(&run, cfg.eval_steps, "accuracy"),
        val_items,
        adapter: &adapter_cfg,
    };
    let trained = train_loop(&mut task, model, &loop_cfg, &run, resumed, opts, device, on_step)?;

    let (final_loss, train_accuracy) = trained.state.recent(trained.steps_per_epoch);
    let metrics = Metrics {
        method: cfg.method.clone(),
        template,
        num_classes: dataset.classnames.len(),
        train_images: images.len(),
        skipped_images: skipped,
        trainable_params: trained.counts.trainable,
        total_params: trained.counts.total,
        run: trained.summary,
        final_loss,
        train_accuracy,
    };
    run.write_metrics(&metrics)?;
    Ok(metrics)
}

/// CLIP few-shot classification as a [`TrainTask`]: augmented images against the class prompts,
/// cross-entropy on `logit_scale · cos`; top-1 accuracy on the validation items every
/// `--eval-steps`.
struct ClipTask<'a, AB: AutodiffBackend> {
    cfg: &'a TrainConfig,
    images: &'a [(Option<RgbImage>, Item)],
    processor: &'a ImageProcessor,
    tokenizer: &'a ClipTokenizer,
    classnames: &'a [String],
    template: &'a str,
    /// Class prompt token ids `[classes, 77]`.
    ids: Tensor<AB, 2, Int>,
    /// The class text features when the text tower has no adapters (computed once).
    fixed_text: Option<Tensor<AB, 2>>,
    keeper: EvalKeeper,
    val_items: Vec<Item>,
    adapter: &'a AdapterConfig,
}

impl<AB: AutodiffBackend> TrainTask<AB> for ClipTask<'_, AB> {
    type Model = ClipModel<AB>;
    type Error = ClipError;

    fn on_start(&mut self, model: &ClipModel<AB>, _device: &AB::Device) -> Result<()> {
        let text_adapted = self.cfg.encoder != Towers::Vision;
        self.fixed_text = (!text_adapted).then(|| l2_normalize(model.get_text_features(self.ids.clone())).detach());
        Ok(())
    }

    fn loss(&mut self, model: &ClipModel<AB>, micro: &Micro, device: &AB::Device) -> Result<(Tensor<AB, 1>, f64)> {
        let mut pixels = Vec::with_capacity(micro.examples.len());
        for (j, &i) in micro.examples.iter().enumerate() {
            let mut rng = StdRng::seed_from_u64(micro.example_rng_seed(j));
            pixels.push(match &self.images[i].0 {
                Some(img) => self.processor.augment(img, &mut rng),
                None => self.processor.augment(&load_rgb(&self.images[i].1.path)?, &mut rng),
            });
        }
        let labels: Vec<i64> = micro.examples.iter().map(|&i| self.images[i].1.label as i64).collect();
        let x = self.processor.stack::<AB>(pixels, device);
        let y = Tensor::<AB, 1, Int>::from_data(TensorData::new(labels, [micro.examples.len()]), device);
        let image = l2_normalize(model.get_image_features(x));
        let text = match &self.fixed_text {
            Some(t) => t.clone(),
            None => l2_normalize(model.get_text_features(self.ids.clone())),
        };
        let logits = image.matmul(text.transpose()).mul_scalar(self.cfg.logit_scale);
        let correct = logits.clone().argmax(1).squeeze_dim::<1>(1).equal(y.clone()).int().sum().into_scalar().elem::<i64>();
        let loss = log_softmax(logits, 1).gather(1, y.unsqueeze_dim(1)).mean().neg();
        Ok((loss, correct as f64))
    }

    fn lr(&self, step: usize, total: usize) -> f64 {
        cosine_lr(self.cfg.lr, self.cfg.eta_min, step, total)
    }

    fn after_step(&mut self, model: &ClipModel<AB>, steps_done: usize, total: usize) -> Result<()> {
        if self.keeper.due(steps_done, total) {
            let valid = model.valid();
            let device = self.ids.device();
            let (cfg, v) = (self.cfg, &self.val_items);
            let r = evaluate_items(
                &valid,
                self.tokenizer,
                self.processor,
                self.classnames,
                v,
                "val",
                self.template,
                cfg.batch,
                cfg.skip_bad_images,
                &device,
                &mut |_, _| {},
            )?;
            self.keeper.record(steps_done, r.top1, r.images, model, self.adapter, &cfg.model)?;
        }
        Ok(())
    }
}

/// Top-1 accuracy of a split.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalResult {
    pub split: String,
    pub template: String,
    pub num_classes: usize,
    pub images: usize,
    pub correct: usize,
    pub top1: f64,
    pub skipped_images: Vec<PathBuf>,
}

/// Zero-shot-style classification of every image of `split` against the class prompts, in
/// batches of `batch`; `on_batch(done, total)` after each batch.
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Backend>(
    model: &ClipModel<B>,
    tokenizer: &ClipTokenizer,
    processor: &ImageProcessor,
    dataset: &Dataset,
    split: &str,
    template: &str,
    batch: usize,
    skip_bad: bool,
    device: &B::Device,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<EvalResult> {
    let items = dataset.few_shot(split, None, 0)?;
    evaluate_items(model, tokenizer, processor, &dataset.classnames, &items, split, template, batch, skip_bad, device, on_batch)
}

/// The images `--eval-steps` evaluates on: the `val` split when the dataset has one, else a
/// seeded tenth (at least one image) of the training split.
pub fn validation_items(dataset: &Dataset, seed: u64) -> Result<Vec<Item>> {
    if dataset.splits.get("val").is_some_and(|v| !v.is_empty()) {
        return dataset.few_shot("val", None, 0);
    }
    let train = dataset.few_shot("train", None, 0)?;
    let order = permutation(train.len(), stream_seed(seed, streams::HELD_OUT, 0));
    let n = train.len().div_ceil(10).max(1).min(train.len());
    Ok(order[..n].iter().map(|&i| train[i].clone()).collect())
}

/// [`evaluate`] on given items (`split` names them in the result).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_items<B: Backend>(
    model: &ClipModel<B>,
    tokenizer: &ClipTokenizer,
    processor: &ImageProcessor,
    classnames: &[String],
    items: &[Item],
    split: &str,
    template: &str,
    batch: usize,
    skip_bad: bool,
    device: &B::Device,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<EvalResult> {
    if batch == 0 {
        return Err(serial_lora::Error::config("batch", 0, "must be at least 1").into());
    }
    let text = l2_normalize(model.get_text_features(class_prompts::<B>(tokenizer, classnames, template, device)));
    let (mut correct, mut images, mut skipped) = (0, 0, Vec::new());
    for (i, chunk) in items.chunks(batch.max(1)).enumerate() {
        let (decoded, bad) = decode_items(chunk, skip_bad)?;
        skipped.extend(bad);
        if !decoded.is_empty() {
            let labels: Vec<i64> = decoded.iter().map(|(_, it)| it.label as i64).collect();
            let x = processor.stack::<B>(decoded.iter().map(|(img, _)| processor.process(img)).collect(), device);
            let pred = l2_normalize(model.get_image_features(x)).matmul(text.clone().transpose()).argmax(1).squeeze_dim::<1>(1);
            let y = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [decoded.len()]), device);
            correct += pred.equal(y).int().sum().into_scalar().elem::<i64>() as usize;
            images += decoded.len();
        }
        on_batch((i * batch.max(1) + chunk.len()).min(items.len()), items.len());
    }
    Ok(EvalResult {
        split: split.to_string(),
        template: template.to_string(),
        num_classes: classnames.len(),
        images,
        correct,
        top1: correct as f64 / images.max(1) as f64,
        skipped_images: skipped,
    })
}
