//! Fine-tuning SD3's MMDiT with LoRA / Serial LoRA (+) on captioned images (paper Section III-A:
//! style datasets, rank 64, 10 epochs, LoRA+ ratio 20), as diffusers'
//! `examples/dreambooth/train_dreambooth_lora_sd3.py` (v0.42.1) trains:
//!
//! - images resized (short side, Pillow bilinear) and center-cropped to `--resolution`,
//!   optionally flipped once per image (`--random-flip`, decided when the dataset is prepared),
//!   scaled to [−1, 1];
//! - the VAE latent distribution (mean, log-variance) and the prompt embeddings computed once per
//!   run directory and cached in `RUN_DIR/cache/` (the text encoders are then dropped); the script
//!   caches `latent_dist` and draws `latent_dist.sample()` every step, so do we (seeded stream);
//! - `x0 = (z − shift_factor) · scaling_factor`, `ε ~ N(0, 1)`, timestep indices
//!   `⌊sigmoid(N(0, 1)) · 1000⌋` (`compute_density_for_timestep_sampling("logit_normal")`) into
//!   the scheduler's training timesteps / sigmas (shift from `scheduler_config.json`, SD3: 3),
//!   `x_t = (1 − σ)·x0 + σ·ε`, preconditioned prediction `model_pred·(−σ) + x_t` against `x0`
//!   (`--precondition_outputs 1`), weight 1 (`compute_loss_weighting_for_sd3("logit_normal")`),
//!   per-sample MSE averaged over the batch;
//! - AdamW (betas 0.9 / 0.999, eps 1e-8, weight decay 1e-4 as `--adam_weight_decay`), LoRA+ groups
//!   for the `-plus` methods, global gradient-norm clipping at 1 (`--max_grad_norm`), gradient
//!   accumulation as accelerate does it (each micro-batch loss ÷ accumulation steps), constant /
//!   constant-with-warmup / cosine-with-warmup learning rate (`--lr_scheduler`, default constant);
//! - LoRA as the script: `init_lora_weights="gaussian"`, `lora_alpha = rank`; on the image stream
//!   of every joint attention (`to_q`, `to_k`, `to_v`, `to_out.0`; the script also adapts the
//!   context stream by default — the paper's counts are for the image stream).
//!
//! Random draws of step `t` come from seeded streams of `(seed, t)`, so `--resume` continues
//! bit-identically on CPU. The step loop (accumulation, clipping, checkpoints) is the runtime's
//! ([`lora_runtime::train::train_loop`]); this file holds what is SD3's: data, loss, samples.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use lora_runtime::hub::{HubOptions, resolve_model_dir};
use lora_runtime::imaging::save_png;
use lora_runtime::run::{Progress, RunDir, RunOptions, RunSummary, stream_seed};
pub use lora_runtime::train::clip_grad_norm;
use lora_runtime::train::{CommonTrainArgs, LoopConfig, Micro, StepPlan, TrainTask, streams, train_loop};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use serial_lora::config::Init;
use serial_lora::io::{self, HostTensor, read_safetensors, write_safetensors};
use serial_lora::{AdapterConfig, Method};

use crate::data::{self, CaptionDataset, CaptionedImage};
use crate::error::{Result, Sd3Error};
use crate::load::{OPTIONAL_FILES, pipeline_files};
use crate::mmdit::Sd3Transformer;
use crate::pipeline::{PromptEmbeds, SampleOptions, decode_to_rgb, denoise};
use crate::text::{T5TextEncoder, TextEncoders};
use crate::vae::{Vae, VaeConfig, load_vae};
use crate::{Sd3TransformerConfig, load_transformer};
use lora_runtime::weights::with_base_dtype;

/// Images encoded per VAE / text-encoder call while the caches are built.
const CACHE_CHUNK: usize = 8;

/// Everything that defines a training run (`train_config.json`; `--resume` checks it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct TrainConfig {
    /// Hub id (e.g. stabilityai/stable-diffusion-3-medium-diffusers) or local diffusers-layout directory.
    #[arg(long)]
    pub model: String,
    /// Dataset folder: images with metadata.jsonl (file_name, text) or same-stem .txt captions; optional split.json.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Fraction of the training split to use (the paper: 0.2, 0.5, 1.0).
    #[arg(long, default_value_t = 1.0)]
    pub fraction: f64,
    /// Seed of adapter init, shuffling, noise and timesteps.
    #[arg(long, default_value_t = 0)]
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
    /// Seed of the train/test split when the dataset has no split.json (use the same in `eval`).
    #[arg(long, default_value_t = data::DEFAULT_SPLIT_SEED)]
    pub split_seed: u64,
    /// Test share of that split.
    #[arg(long, default_value_t = data::DEFAULT_TEST_FRACTION)]
    pub test_fraction: f64,
    /// lora | serial-lora | lora-plus | serial-lora-plus
    #[arg(long)]
    pub method: String,
    #[arg(long, default_value_t = 64)]
    pub rank: usize,
    /// Scale numerator s = alpha / rank (default: rank, so s = 1, as the diffusers script).
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long, alias = "dropout", default_value_t = 0.0)]
    pub lora_dropout: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// LoRA+ ratio lr_B / lr_A (lora-plus, serial-lora-plus).
    #[arg(long, default_value_t = 20.0)]
    pub lr_ratio: f64,
    /// constant | constant_with_warmup | cosine (cosine with warmup, to 0).
    #[arg(long, default_value = "constant")]
    pub lr_scheduler: String,
    /// Warm-up steps of constant_with_warmup / cosine (ignored by constant, as in diffusers).
    #[arg(long, default_value_t = 500)]
    pub lr_warmup_steps: usize,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Passes over the training images (default 10 unless --iters is given).
    #[arg(long, conflicts_with = "iters")]
    pub epochs: Option<usize>,
    /// Optimizer steps in total (diffusers' --max_train_steps).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Square training size in pixels (a multiple of the VAE factor × patch size).
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// Images per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Mirror each training image with probability ½ (once, when the latents are cached).
    #[arg(long)]
    pub random_flip: bool,
    /// T5 tokens of the prompt embeddings (zeros with --no-t5).
    #[arg(long, default_value_t = 77)]
    pub max_sequence_length: usize,
    /// Zeros in place of the T5-XXL embeddings (as diffusers with text_encoder_3=None).
    #[arg(long)]
    pub no_t5: bool,
    /// Checkpoint every N steps (default: every epoch).
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Prompt(s) sampled every --validation-steps into RUN_DIR/samples/ (repeatable).
    #[arg(long)]
    pub validation_prompt: Vec<String>,
    /// Sample the validation prompts every N steps (and at the end).
    #[arg(long)]
    pub validation_steps: Option<usize>,
    /// Denoising steps of the validation samples.
    #[arg(long, default_value_t = 28)]
    pub validation_inference_steps: usize,
    /// Classifier-free guidance of the validation samples.
    #[arg(long, default_value_t = 7.0)]
    pub validation_guidance_scale: f32,
}

impl TrainConfig {
    /// The adapter of this run (Gaussian init, alpha = rank unless given).
    pub fn adapter_config(&self) -> Result<AdapterConfig> {
        let a = AdapterConfig::from_method_name(&self.method, self.rank, self.lr_ratio)?
            .with_alpha(self.alpha.unwrap_or(self.rank as f64))
            .with_dropout(self.lora_dropout)
            .with_init(Init::Gaussian);
        a.validate()?;
        Ok(a)
    }

    /// The settings every task shares (checked by [`CommonTrainArgs::validate`]).
    pub fn common(&self) -> CommonTrainArgs<'_> {
        CommonTrainArgs {
            method: &self.method,
            rank: self.rank,
            dropout: self.lora_dropout,
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
        if self.grad_accum == 0 || self.resolution == 0 {
            return bad("grad-accum/resolution", "0".into(), "must be at least 1");
        }
        if !["constant", "constant_with_warmup", "cosine"].contains(&self.lr_scheduler.as_str()) {
            return bad("lr-scheduler", self.lr_scheduler.clone(), "expected constant, constant_with_warmup or cosine");
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad("max-grad-norm", self.max_grad_norm.to_string(), "must be ≥ 0");
        }
        if self.validation_steps == Some(0) || self.validation_inference_steps == 0 {
            return bad("validation-steps/validation-inference-steps", "0".into(), "must be at least 1");
        }
        self.adapter_config()
    }

    /// The learning rate of optimizer step `step` (0-based) of `total`: diffusers'
    /// `get_scheduler(name, num_warmup_steps, num_training_steps)` multiplier times `lr`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warm = |s: usize| s as f64 / self.lr_warmup_steps.max(1) as f64;
        let factor = match self.lr_scheduler.as_str() {
            "constant_with_warmup" if step < self.lr_warmup_steps => warm(step),
            "cosine" if step < self.lr_warmup_steps => warm(step),
            "cosine" => {
                let progress = (step - self.lr_warmup_steps) as f64 / total.saturating_sub(self.lr_warmup_steps).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
            _ => 1.0,
        };
        self.lr * factor
    }
}

/// The scheduler's training tables (`FlowMatchEulerDiscreteScheduler.__init__`, f32 as torch):
/// `timesteps[i] = σ_i · T` and `sigmas[i] = shift·s / (1 + (shift − 1)·s)` with
/// `s = (T − i) / T`, `i = 0 … T−1` (descending from σ = 1).
pub fn training_schedule(shift: f64, num_train_timesteps: usize) -> (Vec<f32>, Vec<f32>) {
    let tt = num_train_timesteps as f32;
    let sh = shift as f32;
    let sigmas: Vec<f32> = (0..num_train_timesteps)
        .map(|i| {
            let s = (num_train_timesteps - i) as f32 / tt;
            sh * s / (1.0 + (sh - 1.0) * s)
        })
        .collect();
    (sigmas.iter().map(|s| s * tt).collect(), sigmas)
}

/// The timestep index of one logit-normal draw `n ~ N(0, 1)`:
/// `⌊sigmoid(mean + std·n) · T⌋` (clamped to `T − 1`).
pub fn logit_normal_index(n: f32, num_train_timesteps: usize) -> usize {
    let u = 1.0 / (1.0 + (-n).exp());
    ((u * num_train_timesteps as f32) as usize).min(num_train_timesteps - 1)
}

/// The fields of diffusers' `scheduler_config.json` that SD3's flow-matching schedule uses.
#[derive(serde::Deserialize)]
struct SchedulerFile {
    #[serde(default)]
    use_dynamic_shifting: Option<bool>,
    #[serde(default = "default_train_timesteps")]
    num_train_timesteps: usize,
    #[serde(default = "default_shift")]
    shift: f64,
}
fn default_train_timesteps() -> usize {
    1000
}
fn default_shift() -> f64 {
    1.0
}

/// `shift` and `num_train_timesteps` of `dir/scheduler/scheduler_config.json` (SD3's 3.0 and
/// 1000 when the file is absent); errors name the file and the field.
pub fn scheduler_config(dir: &Path) -> Result<(f64, usize)> {
    let path = dir.join("scheduler/scheduler_config.json");
    if !path.is_file() {
        return Ok((3.0, 1000));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Sd3Error::Io { path: path.clone(), source: e })?;
    let bad = |message: String| Sd3Error::Config { path: path.clone(), message };
    let f: SchedulerFile = serial_lora::parse::json(&text).map_err(bad)?;
    if f.use_dynamic_shifting == Some(true) {
        return Err(bad("`use_dynamic_shifting` is not supported".into()));
    }
    let n = serial_lora::parse::in_range("num_train_timesteps", f.num_train_timesteps, 1, 1 << 24).map_err(bad)?;
    let shift = serial_lora::parse::finite("shift", f.shift, 0.0, true).map_err(bad)?;
    Ok((shift, n))
}

/// `latent_dist.sample()` with the draw `eps`, scaled: `(mean + exp(½·logvar)·eps − shift) · scale`.
pub fn scaled_latents<B: Backend>(mean: Tensor<B, 4>, logvar: Tensor<B, 4>, eps: Tensor<B, 4>, vae: &VaeConfig) -> Tensor<B, 4> {
    (mean + logvar.mul_scalar(0.5).exp() * eps).sub_scalar(vae.shift_factor.unwrap_or(0.0)).mul_scalar(vae.scaling_factor)
}

/// The script's loss for latents `x0 [b, c, h, w]`, noise `ε` (same shape), per-sample `sigmas`
/// and `timesteps` (`[b]`): `mean_b mean((model(x_t)·(−σ) + x_t − x0)²)` with
/// `x_t = (1 − σ)·x0 + σ·ε`. Returns the loss `[1]` and the per-sample MSE `[b]`.
pub fn flow_matching_loss<B: Backend>(
    model: &Sd3Transformer<B>,
    x0: Tensor<B, 4>,
    noise: Tensor<B, 4>,
    sigmas: &[f32],
    timesteps: &[f32],
    prompt_embeds: Tensor<B, 3>,
    pooled: Tensor<B, 2>,
) -> Result<(Tensor<B, 1>, Tensor<B, 1>)> {
    let [b, c, h, w] = x0.dims();
    if sigmas.len() != b {
        return Err(Sd3Error::Input(format!("{} sigmas for a batch of {b}", sigmas.len())));
    }
    let device = x0.device();
    let s = Tensor::<B, 1>::from_data(TensorData::new(sigmas.to_vec(), [b]), &device).reshape([b, 1, 1, 1]);
    let noisy = x0.clone() * s.clone().neg().add_scalar(1.0) + noise * s.clone();
    let pred = model.forward(noisy.clone(), prompt_embeds, pooled, timesteps)?;
    let pre = pred * s.neg() + noisy;
    let per_sample = (pre - x0).powi_scalar(2).reshape([b, c * h * w]).mean_dim(1).reshape([b]);
    Ok((per_sample.clone().mean(), per_sample))
}

/// `n` standard normal draws (Box–Muller on `rng`, f64 → f32).
fn normals(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u1, u2) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// One cached example: the latent distribution and the prompt embeddings.
struct Cached {
    mean: HostTensor,
    logvar: HostTensor,
    prompt_embeds: HostTensor,
    pooled: HostTensor,
}

fn cache_file(run: &Path, i: usize) -> PathBuf {
    run.join("cache").join(format!("{i:06}.safetensors"))
}

/// What a cache entry depends on besides its image: the settings that change latents or
/// prompt embeddings.
fn cache_key(cfg: &TrainConfig) -> String {
    format!(
        "model={} resolution={} random_flip={} seed={} max_sequence_length={} no_t5={}",
        cfg.model, cfg.resolution, cfg.random_flip, cfg.seed, cfg.max_sequence_length, cfg.no_t5
    )
}

fn read_cached(path: &Path, example: &CaptionedImage, key: &str) -> Result<Cached> {
    let (mut t, meta) = read_safetensors(path)?;
    let stale = || {
        let message = format!("cache entry is not for {} with {key} (delete RUN_DIR/cache to rebuild it)", example.image.display());
        Sd3Error::Dataset { path: path.into(), message }
    };
    if meta.get("image").map(String::as_str) != example.image.to_str() || meta.get("key").map(String::as_str) != Some(key) {
        return Err(stale());
    }
    let mut take = |k: &str| t.remove(k).ok_or_else(stale);
    Ok(Cached { mean: take("latent_mean")?, logvar: take("latent_logvar")?, prompt_embeds: take("prompt_embeds")?, pooled: take("pooled_prompt_embeds")? })
}

/// The image as the script feeds it to the VAE ([`data::resize_center_crop`], then `ToTensor` and
/// `Normalize([0.5], [0.5])`): `[3, R, R]` values `(x/255 − 0.5)/0.5`, row-major.
pub fn pixel_values(example: &CaptionedImage, resolution: usize, flip: bool) -> Result<Vec<f32>> {
    let img = data::resize_center_crop(&data::load_image(example)?, resolution, flip);
    let n = resolution * resolution;
    let mut out = vec![0f32; 3 * n];
    for (p, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * n + p] = (px[c] as f32 / 255.0 - 0.5) / 0.5;
        }
    }
    Ok(out)
}

/// Validation prompts and their negatives ("").
#[derive(Clone)]
struct Validation<B: Backend> {
    cond: PromptEmbeds<B>,
    noise: Tensor<B, 4>,
}

/// Builds `RUN_DIR/cache/` (skipping entries already there, so an interrupted build resumes) and
/// encodes the validation prompts; the text encoders are dropped on return.
#[allow(clippy::too_many_arguments)]
fn build_caches<B: Backend>(
    cfg: &TrainConfig,
    dir: &Path,
    out: &Path,
    examples: &[CaptionedImage],
    vae: &Vae<B>,
    vae_cfg: &VaeConfig,
    mmdit_cfg: &Sd3TransformerConfig,
    device: &B::Device,
) -> Result<Option<PromptEmbeds<B>>> {
    let key = cache_key(cfg);
    let fresh = |i: usize| read_cached(&cache_file(out, i), &examples[i], &key).is_ok();
    let missing: Vec<usize> = (0..examples.len()).filter(|&i| !fresh(i)).collect();
    if missing.is_empty() && cfg.validation_prompt.is_empty() {
        return Ok(None);
    }
    let enc = TextEncoders::<B>::load(dir, device)?;
    // the diffusers script always has text_encoder_3; --no-t5 puts zeros in its place
    let t5 = if cfg.no_t5 { None } else { Some(T5TextEncoder::<B>::load(dir, device)?) };
    let encode = |prompts: &[String]| enc.encode_with_t5(prompts, mmdit_cfg.joint_attention_dim, t5.as_ref(), cfg.max_sequence_length, device);
    let cache = out.join("cache");
    std::fs::create_dir_all(&cache).map_err(|e| Sd3Error::Io { path: cache.clone(), source: e })?;
    let r = cfg.resolution;
    for chunk in missing.chunks(CACHE_CHUNK) {
        let mut px = Vec::with_capacity(chunk.len() * 3 * r * r);
        let mut flips = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let flip = cfg.random_flip && StdRng::seed_from_u64(stream_seed(cfg.seed, streams::FLIP, i as u64)).random::<f64>() < 0.5;
            px.extend(pixel_values(&examples[i], r, flip)?);
            flips.push(flip);
        }
        let n = chunk.len();
        let (mean, logvar, _) = vae.encode(Tensor::from_data(TensorData::new(px, [n, 3, r, r]), device));
        let texts: Vec<String> = chunk.iter().map(|&i| examples[i].text.clone()).collect();
        let (pe, pp) = encode(&texts)?;
        for (j, &i) in chunk.iter().enumerate() {
            let one4 = |t: &Tensor<B, 4>| HostTensor::from_tensor(t.clone().narrow(0, j, 1).squeeze_dim::<3>(0));
            let tensors = BTreeMap::from([
                ("latent_mean".to_string(), one4(&mean)),
                ("latent_logvar".to_string(), one4(&logvar)),
                ("prompt_embeds".to_string(), HostTensor::from_tensor(pe.clone().narrow(0, j, 1).squeeze_dim::<2>(0))),
                ("pooled_prompt_embeds".to_string(), HostTensor::from_tensor(pp.clone().narrow(0, j, 1).squeeze_dim::<1>(0))),
            ]);
            let meta = HashMap::from([
                ("image".to_string(), examples[i].image.display().to_string()),
                ("text".to_string(), examples[i].text.clone()),
                ("flip".to_string(), flips[j].to_string()),
                ("key".to_string(), cache_key(cfg)),
                ("vae_scaling_factor".to_string(), vae_cfg.scaling_factor.to_string()),
            ]);
            write_safetensors(&cache_file(out, i), &tensors, meta)?;
        }
    }
    if cfg.validation_prompt.is_empty() {
        return Ok(None);
    }
    let (pe, pp) = encode(&cfg.validation_prompt)?;
    let (ne, np) = encode(&vec![String::new(); cfg.validation_prompt.len()])?;
    Ok(Some(PromptEmbeds { prompt_embeds: pe, pooled_prompt_embeds: pp, negative: Some((ne, np)) }))
}

/// Latents `[b, c, h, w]` → PNG files `paths` (VAE decode, `(x/2 + ½)` clamped, rounded to 8 bits).
fn write_pngs<B: Backend>(vae: &Vae<B>, vae_cfg: &VaeConfig, latents: Tensor<B, 4>, paths: &[PathBuf]) -> Result<()> {
    for (img, path) in decode_to_rgb(vae, vae_cfg, latents).iter().zip(paths) {
        save_png(img, path)?;
    }
    Ok(())
}

/// Writes the trained adapter into `out`: LoRA as diffusers' `pytorch_lora_weights.safetensors`
/// (keys `transformer.<module>.lora_A.weight` / `.lora_B.weight`, `lora_adapter_metadata` with
/// `transformer.r`, `transformer.lora_alpha`, `transformer.target_modules`, …), loadable by
/// `StableDiffusion3Pipeline.load_lora_weights`; Serial LoRA as an adapter directory
/// (`adapter_config.json` + `adapter_model.safetensors`, keys `transformer.<module>.serial_lora_*`).
/// Both load with `io::load_adapter_with_prefix(.., "transformer.")` (`sd3-gen sample --adapter`).
pub fn save_trained_adapter<B: Backend>(model: &Sd3Transformer<B>, adapter: &AdapterConfig, out: &Path, base_model: &str) -> Result<PathBuf> {
    if adapter.method == Method::SerialLora {
        io::save_adapter_with_prefix(model, adapter, out, Some(base_model), "transformer.")?;
        return Ok(out.join(io::WEIGHTS_FILE));
    }
    let tmp = out.join("lora.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    io::save_adapter_with_prefix(model, adapter, &tmp, Some(base_model), "transformer.")?;
    let (tensors, _) = read_safetensors(&tmp.join(io::WEIGHTS_FILE))?;
    let peft = io::read_adapter_config(&tmp)?;
    let meta = serde_json::json!({
        "transformer.r": peft.r,
        "transformer.lora_alpha": peft.lora_alpha,
        "transformer.lora_dropout": peft.lora_dropout,
        "transformer.target_modules": peft.target_modules,
        "transformer.init_lora_weights": "gaussian",
        "transformer.use_rslora": peft.use_rslora,
        "transformer.rank_pattern": peft.rank_pattern,
        "transformer.alpha_pattern": peft.alpha_pattern,
    });
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("lora_adapter_metadata".to_string(), serde_json::to_string_pretty(&meta).unwrap_or_default()),
    ]);
    let path = out.join(io::DIFFUSERS_WEIGHTS_FILE);
    write_safetensors(&path, &tensors, meta)?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(path)
}

/// `metrics.json` of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metrics {
    pub method: String,
    pub train_images: usize,
    pub trainable_params: usize,
    pub total_params: usize,
    #[serde(flatten)]
    pub run: RunSummary,
    /// Mean loss over the last epoch's steps.
    pub final_loss: f64,
    /// The adapter file (when the run completed).
    pub adapter: Option<PathBuf>,
    /// Validation PNGs written by this invocation.
    pub samples: Vec<PathBuf>,
}

/// Trains per `cfg`; writes the run directory `out` (`train_config.json`, `cache/`,
/// `checkpoint/`, `samples/`, `metrics.json` and at the end the adapter, see
/// [`save_trained_adapter`]). A non-finite loss or gradient stops with `lora_runtime::Error::NonFinite` before
/// the step is applied; the checkpoint on disk stays the last good one.
pub fn train<AB: AutodiffBackend>(
    cfg: &TrainConfig,
    out: &Path,
    opts: &RunOptions,
    device: &AB::Device,
    on_step: &mut dyn FnMut(&Progress),
) -> Result<Metrics> {
    type B<AB> = <AB as AutodiffBackend>::InnerBackend;
    let adapter_cfg = cfg.check()?;
    let dataset = CaptionDataset::open(&cfg.dataset, cfg.split_seed, cfg.test_fraction)?;
    let examples = dataset.train_fraction(cfg.fraction, cfg.seed)?;
    let dir = resolve_model_dir(&cfg.model, &pipeline_files(true, !cfg.no_t5), &OPTIONAL_FILES, &HubOptions::from_env())?;
    let peer = &opts.peer;
    let (run, resumed) = RunDir::open::<B<AB>, _>(out, cfg, opts, device)?;

    let (mmdit, mmdit_cfg) = with_base_dtype(cfg.dtype, || load_transformer::<AB>(&dir, device))?;
    let (vae, vae_cfg) = with_base_dtype(cfg.dtype, || load_vae::<B<AB>>(&dir, device))?;
    let factor = 1usize << (vae_cfg.block_out_channels.len().saturating_sub(1));
    if !cfg.resolution.is_multiple_of(factor * mmdit_cfg.patch_size) {
        let m = factor * mmdit_cfg.patch_size;
        return Err(serial_lora::Error::config("resolution", cfg.resolution, format!("must be a multiple of {m} (VAE factor {factor} × patch size)")).into());
    }
    // Peer 0 fills the cache (and samples); the others read it.
    let built =
        if peer.is_writer() { with_base_dtype(cfg.dtype, || build_caches(cfg, &dir, out, &examples, &vae, &vae_cfg, &mmdit_cfg, device)) } else { Ok(None) };
    let agreed = peer.agree::<B<AB>>(built.is_ok(), 0, "build the latent cache", device);
    let built = built?;
    agreed?;
    let validation = built.map(|cond| {
        let (b, lh) = (cfg.validation_prompt.len(), cfg.resolution / factor);
        let shape = [b, mmdit_cfg.in_channels, lh, lh];
        let n = normals(&mut StdRng::seed_from_u64(stream_seed(cfg.seed, streams::VALIDATION_NOISE, 0)), shape.iter().product());
        Validation { cond, noise: Tensor::<B<AB>, 4>::from_data(TensorData::new(n, shape), device) }
    });
    let vae = if validation.is_some() { Some(vae) } else { None };
    let (shift, n_train_t) = scheduler_config(&dir)?;
    let (sched_t, sched_s) = training_schedule(shift, n_train_t);

    let n = examples.len();
    let plan = StepPlan {
        examples: n,
        batch: cfg.batch,
        grad_accum: cfg.grad_accum,
        max_grad_norm: cfg.max_grad_norm,
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
        default_epochs: 10,
        save_steps: cfg.save_steps,
        weight_decay: cfg.weight_decay,
        adapter: &adapter_cfg,
        base_model: &cfg.model,
    };
    let mut task = Sd3Task {
        cfg,
        out,
        examples: &examples,
        key: cache_key(cfg),
        vae_cfg: &vae_cfg,
        schedule: (sched_t, sched_s),
        n_train_t,
        shift,
        validation,
        vae,
        samples: Vec::new(),
        adapter: None,
    };
    let trained = train_loop(&mut task, mmdit, &loop_cfg, &run, resumed, opts, device, on_step)?;

    let (final_loss, _) = trained.state.recent(trained.steps_per_epoch);
    let metrics = Metrics {
        method: cfg.method.clone(),
        train_images: n,
        trainable_params: trained.counts.trainable,
        total_params: trained.counts.total,
        run: trained.summary,
        final_loss,
        adapter: task.adapter,
        samples: task.samples,
    };
    run.write_metrics(&metrics)?;
    Ok(metrics)
}

/// SD3 flow matching as a [`TrainTask`]: cached latent distributions and prompt embeddings, a
/// latent sample, noise and a logit-normal timestep per example, the preconditioned MSE; the
/// validation prompts sampled every `--validation-steps` and at the end.
struct Sd3Task<'a, AB: AutodiffBackend> {
    cfg: &'a TrainConfig,
    /// The run directory (its `cache/`, `samples/`).
    out: &'a Path,
    examples: &'a [CaptionedImage],
    /// The cache key of this run's settings.
    key: String,
    vae_cfg: &'a VaeConfig,
    /// The scheduler's training timesteps and sigmas.
    schedule: (Vec<f32>, Vec<f32>),
    n_train_t: usize,
    shift: f64,
    validation: Option<Validation<AB::InnerBackend>>,
    vae: Option<Vae<AB::InnerBackend>>,
    /// Sample images written so far.
    samples: Vec<PathBuf>,
    /// The adapter file written at the end.
    adapter: Option<PathBuf>,
}

impl<AB: AutodiffBackend> Sd3Task<'_, AB> {
    /// Samples the validation prompts with `model` into `RUN_DIR/samples/step-<step>-<i>.png`.
    fn sample(&mut self, model: &Sd3Transformer<AB>, step: usize) -> Result<()> {
        let (Some(v), Some(vae)) = (&self.validation, &self.vae) else { return Ok(()) };
        let cfg = self.cfg;
        let o = SampleOptions { steps: cfg.validation_inference_steps, guidance: cfg.validation_guidance_scale, shift: self.shift };
        let latents = denoise(&model.valid(), v.noise.clone(), &v.cond, &o, &mut |_, _| {})?;
        let samples_dir = self.out.join("samples");
        std::fs::create_dir_all(&samples_dir).map_err(|e| Sd3Error::Io { path: samples_dir.clone(), source: e })?;
        let paths: Vec<PathBuf> = (0..cfg.validation_prompt.len()).map(|i| samples_dir.join(format!("step-{step:06}-{i}.png"))).collect();
        write_pngs(vae, self.vae_cfg, latents, &paths)?;
        self.samples.extend(paths);
        Ok(())
    }
}

impl<AB: AutodiffBackend> TrainTask<AB> for Sd3Task<'_, AB> {
    type Model = Sd3Transformer<AB>;
    type Error = Sd3Error;

    fn loss(&mut self, model: &Sd3Transformer<AB>, micro: &Micro, device: &AB::Device) -> Result<(Tensor<AB, 1>, f64)> {
        let nb = micro.examples.len();
        let cached = micro.examples.iter().map(|&i| read_cached(&cache_file(self.out, i), &self.examples[i], &self.key)).collect::<Result<Vec<_>>>()?;
        let stack = |f: &dyn Fn(&Cached) -> &HostTensor| {
            let s = &f(&cached[0]).shape;
            let data: Vec<f32> = cached.iter().flat_map(|c| f(c).data.iter().copied()).collect();
            (data, s.clone())
        };
        let (mean, ls) = stack(&|c| &c.mean);
        let (logvar, _) = stack(&|c| &c.logvar);
        let (pe, ps) = stack(&|c| &c.prompt_embeds);
        let (pp, pps) = stack(&|c| &c.pooled);
        let lshape = [nb, ls[0], ls[1], ls[2]];
        let numel: usize = lshape.iter().product();
        // per sample of the global batch: the latent draw, the noise and the timestep
        let (mut eps, mut noise, mut u) = (Vec::with_capacity(numel), Vec::with_capacity(numel), Vec::with_capacity(nb));
        for j in 0..nb {
            let mut rng = StdRng::seed_from_u64(micro.example_rng_seed(j));
            eps.extend(normals(&mut rng, numel / nb));
            noise.extend(normals(&mut rng, numel / nb));
            u.extend(normals(&mut rng, 1));
        }
        let t4 = |v: Vec<f32>| Tensor::<AB, 4>::from_data(TensorData::new(v, lshape), device);
        let x0 = scaled_latents(t4(mean), t4(logvar), t4(eps), self.vae_cfg);
        let idx: Vec<usize> = u.iter().map(|&x| logit_normal_index(x, self.n_train_t)).collect();
        let (ts, ss): (Vec<f32>, Vec<f32>) = idx.iter().map(|&i| (self.schedule.0[i], self.schedule.1[i])).unzip();
        let embeds = Tensor::<AB, 3>::from_data(TensorData::new(pe, [nb, ps[0], ps[1]]), device);
        let pooled = Tensor::<AB, 2>::from_data(TensorData::new(pp, [nb, pps[0]]), device);
        let (loss, per_sample) = flow_matching_loss(model, x0, t4(noise), &ss, &ts, embeds, pooled)?;
        Ok((loss, per_sample.into_data().iter::<f32>().map(f64::from).sum::<f64>()))
    }

    fn lr(&self, step: usize, total: usize) -> f64 {
        self.cfg.lr_at(step, total)
    }

    fn after_step(&mut self, model: &Sd3Transformer<AB>, steps_done: usize, total: usize) -> Result<()> {
        if self.cfg.validation_steps.is_some_and(|v| steps_done.is_multiple_of(v)) && steps_done != total {
            self.sample(model, steps_done)?;
        }
        Ok(())
    }

    fn save(&mut self, model: &Sd3Transformer<AB>, steps: usize, adapter: &AdapterConfig, out: &Path, base_model: &str) -> Result<()> {
        self.sample(model, steps)?;
        self.adapter = Some(save_trained_adapter(&model.valid(), adapter, out, base_model)?);
        Ok(())
    }
}
