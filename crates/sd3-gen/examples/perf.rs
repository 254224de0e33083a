//! Timing of one SD3 case on synthetic inputs, for `cargo xtask perf --model sd3-block`: a
//! slice of SD3-medium's MMDiT — the real config (`configs/models/sd3-medium-transformer.json`,
//! width 1536, 24 heads, joint width 4096) with `--blocks` (default 2) of its 24 joint blocks,
//! random weights — adapted on the image stream of every joint attention (`to_q`, `to_k`, `to_v`,
//! `to_out.0`), as `sd3-gen train` does.
//!
//! Modes (one per process, so the peak RSS of a case is its own):
//! - `train`: the step of `sd3-gen train` on cached inputs — `x_t = (1 − σ)·x0 + σ·ε`, MMDiT,
//!   preconditioned flow-matching MSE against `x0` (`sd3_gen::train::flow_matching_loss`),
//!   backward, global gradient-norm clipping at 1, AdamW (wd 1e-4; LoRA+ with the `-plus`
//!   methods). Latents of a `--resolution` image (512² → 16×64×64, 1024 image tokens), prompt
//!   embeddings without T5 (77 CLIP + 77 zero T5 tokens of width 4096; random here), pooled 2048.
//! - `infer`: one MMDiT forward (a denoising step's model call), adapters unmerged, no autodiff.
//! - `infer-merged`: the same after `merge_and_unload` (the base model's architecture); then
//!   alternated with a freshly built base model in this process (`over_alternated`,
//!   `lora_runtime::perf::alternate`). `train --alternate-with lora` does the same for a
//!   training step against another method's.
//! - `--method base --mode infer`: the frozen base slice, the reference for `infer-merged`.
//!
//! Prints one JSON line (`lora_runtime::perf::json_line`).
//!
//! cargo run --release -p sd3-gen --example sd3-perf -- --method serial-lora --mode train --steps 3
use serial_lora::half::autocast;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::ParamId;
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use lora_runtime::DeviceSpec;
use lora_runtime::perf::random_base_in;
use lora_runtime::perf::{Case, StepTimes, TrainStep, alternate, infer_model, json_line, timed, train_case};
use sd3_gen::train::{clip_grad_norm, flow_matching_loss, training_schedule};
use sd3_gen::{Sd3Transformer, Sd3TransformerConfig};
use serial_lora::config::Init;
use serial_lora::optim::{adamw_pytorch_defaults, loraplus_adamw};
use serial_lora::params::param_infos;
use serial_lora::{AdaptedModel, AdapterConfig, ParamCountExt};

#[derive(Parser, Debug)]
struct Args {
    /// cpu | cuda[:N] | tch-cpu | tch-cuda[:N] (backends compiled in)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// MMDiT config preset (`Sd3TransformerConfig::preset`).
    #[arg(long, default_value = "sd3-medium")]
    preset: String,
    /// Joint blocks of the slice (the last one is `context_pre_only`, as in any SD3 stack).
    #[arg(long, default_value_t = 2)]
    blocks: usize,
    /// base | lora | serial-lora | lora-plus | serial-lora-plus
    #[arg(long, default_value = "serial-lora")]
    method: String,
    /// train | infer | infer-merged
    #[arg(long, default_value = "train")]
    mode: String,
    /// `train`: after the timed steps, alternate steps with a model trained by this method in
    /// the same process (`over_alternated` in the JSON line; e.g. `lora` for `serial-lora`).
    #[arg(long)]
    alternate_with: Option<String>,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed steps before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Image size in pixels; latents are `resolution / 8` per side.
    #[arg(long, default_value_t = 512)]
    resolution: usize,
    /// T5 tokens after the 77 CLIP tokens (zeros without T5).
    #[arg(long, default_value_t = 77)]
    max_sequence_length: usize,
    #[arg(long, default_value_t = 32)]
    rank: usize,
    /// LoRA+ ratio of the `-plus` methods.
    #[arg(long, default_value_t = 20.0)]
    lr_ratio: f64,
    /// Name written to the JSON `model` key.
    #[arg(long, default_value = "sd3-block")]
    model_name: String,
    /// Recompute the transformer blocks in the backward pass (`--gradient-checkpointing` of `train`).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Precision the frozen base is held in (`--dtype` of `train`): f32 | bf16 | f16.
    #[arg(long, default_value = "f32")]
    dtype: serial_lora::BaseDType,
}

/// SD3's VAE downsampling factor and latent channels.
const VAE_FACTOR: usize = 8;
/// CLIP-L + CLIP-G tokens of the prompt embeddings.
const CLIP_TOKENS: usize = 77;
/// The scheduler's training table index of every step (σ ≈ 0.75 with SD3's shift 3).
const T_INDEX: usize = 500;

/// Synthetic cached inputs: scaled latents `x0` and noise `ε` `[b, 16, r/8, r/8]`, prompt
/// embeddings `[b, 77 + t5, 4096]` (the T5 part zeros, as with `--no-t5`), pooled `[b, 2048]`,
/// and σ / timestep of [`T_INDEX`].
struct Inputs<B: Backend> {
    x0: Tensor<B, 4>,
    noise: Tensor<B, 4>,
    embeds: Tensor<B, 3>,
    pooled: Tensor<B, 2>,
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
}

impl<B: Backend> Inputs<B> {
    fn new(cfg: &Sd3TransformerConfig, args: &Args, device: &B::Device) -> Self {
        let (b, l) = (args.batch, args.resolution / VAE_FACTOR);
        let n = Distribution::Normal(0.0, 1.0);
        let clip = Tensor::random([b, CLIP_TOKENS, cfg.joint_attention_dim], n, device);
        let t5 = Tensor::zeros([b, args.max_sequence_length, cfg.joint_attention_dim], device);
        let (ts, ss) = training_schedule(3.0, 1000);
        Self {
            x0: Tensor::random([b, cfg.in_channels, l, l], n, device),
            noise: Tensor::random([b, cfg.in_channels, l, l], n, device),
            embeds: Tensor::cat(vec![clip, t5], 1),
            pooled: Tensor::random([b, cfg.pooled_projection_dim], n, device),
            sigmas: vec![ss[T_INDEX]; b],
            timesteps: vec![ts[T_INDEX]; b],
        }
    }

    /// `x_t` (the model input of inference).
    fn noisy(&self) -> Tensor<B, 4> {
        let s = self.sigmas[0];
        self.x0.clone().mul_scalar(1.0 - s) + self.noise.clone().mul_scalar(s)
    }
}

/// `sd3-gen train`'s adapter: Gaussian init of A, alpha = rank (s = 1), no dropout.
fn adapter(args: &Args, method: &str) -> serial_lora::Result<AdapterConfig> {
    Ok(AdapterConfig::from_method_name(method, args.rank, args.lr_ratio)?.with_alpha(args.rank as f64).with_init(Init::Gaussian))
}

/// A model with `method`'s adapter, stepped as `sd3-gen train` steps it: each call runs one
/// step ([`TrainStep`]).
fn trainer<'a, AB: AutodiffBackend>(
    cfg: &Sd3TransformerConfig,
    args: &'a Args,
    method: &str,
    x: &'a Inputs<AB>,
    device: &'a AB::Device,
) -> Result<(impl FnMut() -> Result<TrainStep> + use<'a, AB>, usize)> {
    let acfg = adapter(args, method)?;
    let mut model = Some(random_base_in(Sd3Transformer::<AB>::new(cfg, device), args.dtype).with_adapters(&acfg, 0, device)?);
    let trainable = model.as_ref().map_or(0, |m| m.param_counts().trainable);
    let ids: Vec<(ParamId, usize)> = model.as_ref().map(param_infos).unwrap_or_default().into_iter().filter(|p| p.trainable).map(|p| (p.id, p.ndim)).collect();
    let mut optim = loraplus_adamw::<AB, Sd3Transformer<AB>>(&adamw_pytorch_defaults().with_weight_decay(1e-4), acfg.lr_ratio.unwrap_or(1.0));
    let run = move || {
        let t0 = Instant::now();
        let m = model.take().context("an earlier step failed")?;
        let (loss, _) = serial_lora::with_checkpointing(args.gradient_checkpointing, || {
            autocast(args.dtype, || flow_matching_loss(&m, x.x0.clone(), x.noise.clone(), &x.sigmas, &x.timesteps, x.embeds.clone(), x.pooled.clone()))
        })?;
        let value = loss.clone().into_scalar().elem::<f32>(); // as `sd3-gen train` (and a sync)
        let t1 = Instant::now();
        let mut grads = GradientsParams::from_grads(loss.backward(), &m);
        let _ = AB::sync(device);
        let t2 = Instant::now();
        clip_grad_norm::<AB>(&mut grads, &ids, 1.0);
        model = Some(optim.step(1e-4, m, grads));
        let _ = AB::sync(device);
        Ok((value, [t0, t1, t2, Instant::now()]))
    };
    Ok((run, trainable))
}

fn train<AB: AutodiffBackend>(cfg: &Sd3TransformerConfig, args: &Args, device: &AB::Device) -> Result<(StepTimes, usize)> {
    let x = Inputs::<AB>::new(cfg, args, device);
    let (step, trainable) = trainer(cfg, args, &args.method, &x, device)?;
    let other = args.alternate_with.as_deref().map(|other| (other, || trainer(cfg, args, other, &x, device).map(|(s, _)| s)));
    let times = train_case(step, other, args.steps, args.warmup)?;
    Ok((times, trainable))
}

fn infer<B: Backend>(cfg: &Sd3TransformerConfig, args: &Args, device: &B::Device) -> Result<(StepTimes, usize)> {
    let new_base = || random_base_in(Sd3Transformer::<B>::new(cfg, device), args.dtype);
    let (model, trainable) = infer_model(new_base(), &args.method, &args.mode, || adapter(args, &args.method), device)?;
    let x = Inputs::<B>::new(cfg, args, device);
    let forward = |m: &Sd3Transformer<B>| -> Result<()> {
        let out = m.forward(x.noisy(), x.embeds.clone(), x.pooled.clone(), &x.timesteps)?;
        let _ = out.into_data(); // sync: the velocity on the host
        Ok(())
    };
    let mut times = StepTimes::default();
    for step in 0..args.warmup + args.steps {
        let t0 = Instant::now();
        forward(&model)?;
        times.record_infer(step, args.warmup, t0);
    }
    if args.mode == "infer-merged" {
        let forward = &forward;
        let base = || Ok(new_base()).map(|b| move || timed(|| forward(&b)));
        alternate(&mut times, "base", || timed(|| forward(&model)), base, args.steps, args.warmup)?;
    }
    Ok((times, trainable))
}

fn run<AB: AutodiffBackend>(device: &AB::Device, args: &Args) -> Result<()> {
    let Some(full) = Sd3TransformerConfig::preset(&args.preset) else { bail!("unknown preset `{}`", args.preset) };
    if args.blocks == 0 || args.blocks > full.num_layers {
        bail!("--blocks {} (1..={})", args.blocks, full.num_layers);
    }
    if !args.resolution.is_multiple_of(VAE_FACTOR * full.patch_size) {
        bail!("--resolution {} is not a multiple of {}", args.resolution, VAE_FACTOR * full.patch_size);
    }
    let cfg = Sd3TransformerConfig { num_layers: args.blocks, ..full };
    AB::seed(device, 0);
    let (times, trainable) = match args.mode.as_str() {
        "train" if args.method == "base" => bail!("--method base has only --mode infer"),
        "train" => train::<AB>(&cfg, args, device)?,
        _ => infer::<AB::InnerBackend>(&cfg, args, device)?,
    };
    let case = Case {
        model: &args.model_name,
        method: &args.method,
        mode: &args.mode,
        framework: format!("burn-{}", <AB::InnerBackend as Backend>::name(device)),
        batch: args.batch,
        steps: args.steps,
        warmup: args.warmup,
        trainable_params: trainable,
    };
    let extra = serde_json::json!({"blocks": args.blocks, "resolution": args.resolution, "rank": args.rank, "gradient_checkpointing": args.gradient_checkpointing, "dtype": args.dtype});
    println!("{}", json_line(&case, &times, extra));
    Ok(())
}

fn main() -> Result<()> {
    lora_runtime::alloc::keep_freed_memory();
    let args = Args::parse();
    let device: DeviceSpec = args.device.parse()?;
    lora_runtime::dispatch!(device, run(&args))
}
