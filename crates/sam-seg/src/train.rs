//! Fine-tuning SAM's image encoder with LoRA / Serial LoRA (+) on box-prompted masks, and Dice
//! evaluation (paper Section III-C: prompt encoder and mask decoder frozen, 5 epochs, rank 64).
//!
//! Recipe (the common SAM fine-tuning setup, as in the HF SAM fine-tuning notebook): one box
//! prompt per image from the ground-truth mask's bounding box, each side jittered by up to
//! `--box-jitter` of the box size (≤ 20 px) during training; single-mask output
//! (`multimask_output=False`); loss = BCE-with-logits + soft Dice on the low-resolution logits
//! against the ground truth resized (nearest) and padded like the image (`SamImageProcessor`'s
//! mask path); AdamW (PyTorch defaults) with a cosine schedule. Evaluation: the mask upsampled to
//! the original size, thresholded at 0, Dice against the ground truth; the paper reports the
//! Dice loss = 1 − mean Dice.
//!
//! The step loop is the runtime's ([`lora_runtime::train::train_loop`]); this file holds what is
//! SAM's: data, loss, Dice.
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::activation::{log_sigmoid, sigmoid};
use burn::tensor::backend::AutodiffBackend;
use lora_runtime::imaging::load_rgb;
use lora_runtime::run::{EvalKeeper, Progress, RunDir, RunOptions, RunSummary, cosine_lr, stream_seed};
use lora_runtime::train::{CommonTrainArgs, LoopConfig, Micro, StepPlan, TrainTask, streams, train_loop};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serial_lora::AdapterConfig;

use crate::data::{Mask, Pair, SegDataset, jitter_box, load_mask};
use crate::error::{Result, SamError};
use crate::model::{Prompts, SamModel};
use crate::processor::SamProcessor;
use crate::{SamConfig, load_sam_sized};

/// Everything that defines a training run (`train_config.json`; `--resume` checks it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct TrainConfig {
    /// Hub id (e.g. facebook/sam-vit-base) or local directory in HF layout.
    #[arg(long)]
    pub model: String,
    /// Dataset directory: images/ + masks/ (same stems), optional split.json.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Fraction of the training split to use (the paper: 0.2, 0.5, 1.0).
    #[arg(long, default_value_t = 1.0)]
    pub fraction: f64,
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
    #[arg(long, default_value_t = 64)]
    pub rank: usize,
    /// Scale numerator s = alpha / rank (default: rank, so s = 1).
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// LoRA+ ratio lr_B / lr_A (lora-plus, serial-lora-plus).
    #[arg(long, default_value_t = 20.0)]
    pub lr_ratio: f64,
    #[arg(long, default_value_t = 1e-6)]
    pub eta_min: f64,
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Passes over the training images (default 5 unless --iters is given).
    #[arg(long, conflicts_with = "iters")]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub iters: Option<usize>,
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Use the mask pixels equal to this value as the object (class-index masks).
    #[arg(long)]
    pub class_id: Option<u8>,
    /// Box jitter as a fraction of the box size (each side, ≤ 20 px).
    #[arg(long, default_value_t = 0.1)]
    pub box_jitter: f32,
    /// Square input size in pixels (a multiple of the patch size; default: the checkpoint's,
    /// 1024) — smaller for cheap runs; position tables are resized.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Test fraction of the seeded split when the dataset has no split.json.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Checkpoint every N steps (default: every epoch).
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Mean Dice on the validation split every N steps and at the end (split.json's `val`;
    /// without one, a seeded tenth of the training split), logged to metrics.jsonl; the best
    /// adapter is kept in RUN_DIR/best/.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_steps: Option<usize>,
}

impl TrainConfig {
    fn adapter_config(&self) -> Result<AdapterConfig> {
        let a = AdapterConfig::from_method_name(&self.method, self.rank, self.lr_ratio)?
            .with_alpha(self.alpha.unwrap_or(self.rank as f64))
            .with_dropout(self.dropout);
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

    fn check(&self) -> Result<AdapterConfig> {
        self.common().validate()?;
        let bad = |k: &'static str, v: String, why: &str| Err(serial_lora::Error::config(k, v, why).into());
        if !(0.0..=self.lr).contains(&self.eta_min) {
            return bad("lr/eta-min", format!("{}/{}", self.lr, self.eta_min), "need 0 ≤ eta-min ≤ lr, lr > 0");
        }
        if !(0.0..1.0).contains(&self.box_jitter) || !(0.0..1.0).contains(&self.test_fraction) {
            return bad("box-jitter/test-fraction", format!("{}/{}", self.box_jitter, self.test_fraction), "must be in [0, 1)");
        }
        self.adapter_config()
    }
}

/// One prepared example: model input, prompt box (model pixels) and low-res target.
struct Example {
    pixels: Vec<f32>,
    boxed: [f32; 4],
    target: Vec<f32>,
}

/// Loads an image and its mask, checking sizes and that the mask has an object.
pub fn load_pair(p: &Pair, class_id: Option<u8>) -> Result<(lora_runtime::imaging::RgbImage, Mask)> {
    let img = load_rgb(&p.image)?;
    let mask = load_mask(&p.mask, class_id)?;
    if (mask.width, mask.height) != (img.width, img.height) {
        return Err(SamError::Dataset {
            path: p.mask.clone(),
            message: format!("mask is {}×{} but image {} is {}×{}", mask.width, mask.height, p.image.display(), img.width, img.height),
        });
    }
    Ok((img, mask))
}

/// The ground truth at the decoder's output resolution: resized (nearest) so the longest side
/// is `size`, padded to `size × size` (transformers' `mask_size` / `mask_pad_size`).
fn low_res_target(mask: &Mask, size: usize) -> Vec<f32> {
    let scale = size as f64 / mask.width.max(mask.height) as f64;
    let (h, w) = ((mask.height as f64 * scale + 0.5) as usize, (mask.width as f64 * scale + 0.5) as usize);
    let small = mask.resize_nearest(w.max(1), h.max(1));
    let mut out = vec![0f32; size * size];
    for y in 0..small.height {
        for x in 0..small.width {
            out[y * size + x] = small.data[y * small.width + x] as f32;
        }
    }
    out
}

/// Per-image soft Dice loss `1 − (2Σpy + 1)/(Σp + Σy + 1)` on `[b, n]` probabilities.
fn dice_loss<B: Backend>(p: Tensor<B, 2>, y: Tensor<B, 2>) -> Tensor<B, 1> {
    let inter = (p.clone() * y.clone()).sum_dim(1).mul_scalar(2.0).add_scalar(1.0);
    let denom = (p.sum_dim(1) + y.sum_dim(1)).add_scalar(1.0);
    (inter / denom).neg().add_scalar(1.0).squeeze_dim(1)
}

/// Hard Dice of binary `[b, n]` masks (1 when both are empty).
fn hard_dice<B: Backend>(pred: Tensor<B, 2>, y: Tensor<B, 2>) -> Vec<f64> {
    let inter = (pred.clone() * y.clone()).sum_dim(1).mul_scalar(2.0);
    let denom = pred.sum_dim(1) + y.sum_dim(1);
    let (i, d): (Vec<f32>, Vec<f32>) = (inter.into_data().iter().collect(), denom.into_data().iter().collect());
    i.iter().zip(&d).map(|(i, d)| if *d == 0.0 { 1.0 } else { (*i / *d) as f64 }).collect()
}

/// `metrics.json` of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metrics {
    pub method: String,
    pub train_images: usize,
    /// Training images whose mask is empty (no box to prompt with).
    pub skipped_empty_masks: Vec<PathBuf>,
    pub trainable_params: usize,
    pub total_params: usize,
    #[serde(flatten)]
    pub run: RunSummary,
    /// Mean loss and mean Dice (low resolution, jittered boxes) over the last epoch.
    pub final_loss: f64,
    pub train_dice: f64,
}

/// Trains per `cfg` on the model in `model_dir`; writes the run directory `out` (adapter,
/// `train_config.json`, `metrics.json`, `checkpoint/`).
pub fn train<AB: AutodiffBackend>(
    cfg: &TrainConfig,
    model_dir: &Path,
    out: &Path,
    opts: &RunOptions,
    device: &AB::Device,
    on_step: &mut dyn FnMut(&Progress),
) -> Result<Metrics> {
    let adapter_cfg = cfg.check()?;
    let dataset = SegDataset::open(&cfg.dataset, cfg.seed, cfg.test_fraction)?;
    let pairs = dataset.split("train", cfg.fraction, cfg.seed)?;
    let (run, resumed) = RunDir::open::<AB::InnerBackend, _>(out, cfg, opts, device)?;

    let (model, sam_cfg, proc): (SamModel<AB>, SamConfig, SamProcessor) =
        lora_runtime::weights::with_base_dtype(cfg.dtype, || load_sam_sized(model_dir, device, cfg.image_size))?;
    // Check every pair once: readable, same size, an object to box.
    let mut usable = Vec::with_capacity(pairs.len());
    let mut skipped = Vec::new();
    for p in &pairs {
        let (_, mask) = load_pair(p, cfg.class_id)?;
        match mask.bbox() {
            Some(_) => usable.push(p.clone()),
            None => skipped.push(p.mask.clone()),
        }
    }
    if usable.is_empty() {
        return Err(SamError::Dataset { path: cfg.dataset.clone(), message: "no training mask has an object".into() });
    }

    let val_pairs = if cfg.eval_steps.is_some() { validation_pairs(&dataset, cfg.seed)? } else { Vec::new() };
    let plan = StepPlan {
        examples: usable.len(),
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
        default_epochs: 5,
        save_steps: cfg.save_steps,
        weight_decay: cfg.weight_decay,
        adapter: &adapter_cfg,
        base_model: &cfg.model,
    };
    let mut task = SamTask {
        cfg,
        usable: &usable,
        proc: &proc,
        low: 4 * sam_cfg.vision_config.grid(),
        keeper: EvalKeeper::new(&run, cfg.eval_steps, "dice"),
        val_pairs,
        adapter: &adapter_cfg,
        device: device.clone(),
    };
    let trained = train_loop(&mut task, model, &loop_cfg, &run, resumed, opts, device, on_step)?;

    let (final_loss, train_dice) = trained.state.recent(trained.steps_per_epoch);
    let metrics = Metrics {
        method: cfg.method.clone(),
        train_images: usable.len(),
        skipped_empty_masks: skipped,
        trainable_params: trained.counts.trainable,
        total_params: trained.counts.total,
        run: trained.summary,
        final_loss,
        train_dice,
    };
    run.write_metrics(&metrics)?;
    Ok(metrics)
}

/// Box-prompted SAM fine-tuning as a [`TrainTask`]: jittered ground-truth boxes, BCE + soft Dice
/// on the low-resolution logits; mean Dice on the validation pairs every `--eval-steps`.
struct SamTask<'a, AB: AutodiffBackend> {
    cfg: &'a TrainConfig,
    usable: &'a [Pair],
    proc: &'a SamProcessor,
    /// Side of the decoder's low-resolution masks.
    low: usize,
    keeper: EvalKeeper,
    val_pairs: Vec<Pair>,
    adapter: &'a AdapterConfig,
    device: AB::Device,
}

impl<AB: AutodiffBackend> TrainTask<AB> for SamTask<'_, AB> {
    type Model = SamModel<AB>;
    type Error = SamError;

    fn loss(&mut self, model: &SamModel<AB>, micro: &Micro, device: &AB::Device) -> Result<(Tensor<AB, 1>, f64)> {
        let (cfg, proc, low) = (self.cfg, self.proc, self.low);
        let mut examples = Vec::with_capacity(micro.examples.len());
        for (j, &i) in micro.examples.iter().enumerate() {
            let mut rng = StdRng::seed_from_u64(micro.example_rng_seed(j));
            let (img, mask) = load_pair(&self.usable[i], cfg.class_id)?;
            let bbox = mask.bbox().ok_or_else(|| SamError::Dataset { path: self.usable[i].mask.clone(), message: "mask became empty".into() })?;
            let jittered = jitter_box(bbox, cfg.box_jitter, (img.width, img.height), &mut rng);
            let px = proc.process(&img);
            examples.push(Example { boxed: proc.scale_box(px.original_size, jittered), pixels: px.pixel_values, target: low_res_target(&mask, low) });
        }
        let nb = examples.len();
        let [ph, pw] = proc.pad;
        let pixels = Tensor::<AB, 4>::from_data(TensorData::new(examples.iter().flat_map(|e| e.pixels.clone()).collect::<Vec<_>>(), [nb, 3, ph, pw]), device);
        let boxes = Tensor::<AB, 3>::from_data(TensorData::new(examples.iter().flat_map(|e| e.boxed).collect::<Vec<_>>(), [nb, 1, 4]), device);
        let y = Tensor::<AB, 2>::from_data(TensorData::new(examples.iter().flat_map(|e| e.target.clone()).collect::<Vec<_>>(), [nb, low * low]), device);
        let prompts = Prompts { points: None, boxes: Some(boxes), masks: None };
        let out = model.forward(model.get_image_embeddings(pixels), &prompts, false)?;
        let logits = out.pred_masks.reshape([nb, low * low]);
        // BCE with logits: −[y·logσ(x) + (1−y)·logσ(−x)]
        let bce = (y.clone() * log_sigmoid(logits.clone()) + y.clone().neg().add_scalar(1.0) * log_sigmoid(logits.clone().neg())).mean().neg();
        let loss = bce + dice_loss(sigmoid(logits.clone()), y.clone()).mean();
        let dice: f64 = hard_dice(logits.detach().greater_elem(0.0).float(), y).iter().sum();
        Ok((loss, dice))
    }

    fn lr(&self, step: usize, total: usize) -> f64 {
        cosine_lr(self.cfg.lr, self.cfg.eta_min, step, total)
    }

    fn after_step(&mut self, model: &SamModel<AB>, steps_done: usize, total: usize) -> Result<()> {
        if self.keeper.due(steps_done, total) {
            let r = evaluate_pairs(&model.valid(), self.proc, &self.val_pairs, "val", self.cfg.class_id, &self.device, &mut |_, _| {})?;
            self.keeper.record(steps_done, r.dice, r.images, model, self.adapter, &self.cfg.model)?;
        }
        Ok(())
    }
}

/// Dice on a split.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalResult {
    pub split: String,
    pub images: usize,
    /// Mean Dice coefficient (binary masks at the original size).
    pub dice: f64,
    /// 1 − mean Dice (what the paper reports; lower is better).
    pub dice_loss: f64,
    /// Images whose mask is empty (no box to prompt with).
    pub skipped_empty_masks: Vec<PathBuf>,
}

/// Box-prompted masks for every pair of `split`, Dice against the ground truth;
/// `on_image(done, total)` after each image.
pub fn evaluate<B: Backend>(
    model: &SamModel<B>,
    proc: &SamProcessor,
    dataset: &SegDataset,
    split: &str,
    class_id: Option<u8>,
    device: &B::Device,
    on_image: &mut dyn FnMut(usize, usize),
) -> Result<EvalResult> {
    let pairs = dataset.split(split, 1.0, 0)?;
    evaluate_pairs(model, proc, &pairs, split, class_id, device, on_image)
}

/// The pairs `--eval-steps` evaluates on: the `val` split when split.json has one, else a
/// seeded tenth (at least one pair) of the training split.
pub fn validation_pairs(dataset: &SegDataset, seed: u64) -> Result<Vec<Pair>> {
    if dataset.splits.get("val").is_some_and(|v| !v.is_empty()) {
        return dataset.split("val", 1.0, 0);
    }
    let mut train = dataset.split("train", 1.0, 0)?;
    rand::seq::SliceRandom::shuffle(&mut train[..], &mut StdRng::seed_from_u64(stream_seed(seed, streams::HELD_OUT, 0)));
    train.truncate(train.len().div_ceil(10).max(1));
    Ok(train)
}

/// [`evaluate`] on given pairs (`split` names them in the result).
pub fn evaluate_pairs<B: Backend>(
    model: &SamModel<B>,
    proc: &SamProcessor,
    pairs: &[Pair],
    split: &str,
    class_id: Option<u8>,
    device: &B::Device,
    on_image: &mut dyn FnMut(usize, usize),
) -> Result<EvalResult> {
    let [ph, pw] = proc.pad;
    let (mut dices, mut skipped) = (Vec::new(), Vec::new());
    for (i, p) in pairs.iter().enumerate() {
        let (img, mask) = load_pair(p, class_id)?;
        let Some(bbox) = mask.bbox() else {
            skipped.push(p.mask.clone());
            continue;
        };
        let px = proc.process(&img);
        let pixels = Tensor::<B, 4>::from_data(TensorData::new(px.pixel_values, [1, 3, ph, pw]), device);
        let boxes = Tensor::<B, 3>::from_data(TensorData::new(proc.scale_box(px.original_size, bbox).to_vec(), [1, 1, 4]), device);
        let out = model.forward(model.get_image_embeddings(pixels), &Prompts { points: None, boxes: Some(boxes), masks: None }, false)?;
        let [_, _, _, s, s2] = out.pred_masks.dims();
        let up = proc.postprocess_masks(out.pred_masks.reshape([1, 1, s, s2]), px.reshaped_size, px.original_size);
        let pred = up.reshape([1, img.width * img.height]).greater_elem(0.0).float();
        let gt = Tensor::<B, 2>::from_data(TensorData::new(mask.data.iter().map(|v| *v as f32).collect::<Vec<_>>(), [1, img.width * img.height]), device);
        dices.extend(hard_dice(pred, gt));
        on_image(i + 1, pairs.len());
    }
    let dice = dices.iter().sum::<f64>() / dices.len().max(1) as f64;
    Ok(EvalResult { split: split.into(), images: dices.len(), dice, dice_loss: 1.0 - dice, skipped_empty_masks: skipped })
}
