//! Timing of one SAM case on synthetic inputs, for `cargo xtask perf --model sam-b`: random
//! weights of SAM ViT-B (`facebook/sam-vit-base` shapes, `configs/models/sam-vit-base.json`),
//! adapters on the image encoder's attention (fused `qkv` + `proj`), as `sam-seg train` does.
//!
//! Modes (one per process, so the peak RSS of a case is its own):
//! - `train`: the step of `sam-seg train` — image encoder, one box prompt per image, mask
//!   decoder (single mask), BCE-with-logits + soft Dice on the low-resolution logits, backward,
//!   AdamW (PyTorch defaults, LoRA+ with the `-plus` methods) through `serial_lora::optim`.
//! - `infer`: the same forward (masks on the host), adapters unmerged, no autodiff.
//! - `infer-merged`: the same after `merge_and_unload` (the base model's architecture); then
//!   alternated with a freshly built base model in this process (`over_alternated`,
//!   `lora_runtime::perf::alternate`). `train --alternate-with lora` does the same for a
//!   training step against another method's.
//! - `--method base --mode infer`: the frozen base model, the reference for `infer-merged`.
//!
//! `--image-size` (default 512, not the checkpoint's 1024): a 1024² step is about 4× the
//! tokens and 16× the global-attention cost, too long for a 2-core CPU; the position tables are
//! resized as `sam-seg train --image-size` does.
//!
//! Prints one JSON line (`lora_runtime::perf::json_line`).
//!
//! cargo run --release -p sam-seg --example sam-perf -- --method serial-lora --mode train --steps 3
use serial_lora::half::autocast;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::{log_sigmoid, sigmoid};
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use lora_runtime::DeviceSpec;
use lora_runtime::perf::random_base_in;
use lora_runtime::perf::{Case, StepTimes, TrainStep, alternate, infer_model, json_line, timed, train_case};
use sam_seg::{Prompts, SamConfig, SamModel};
use serial_lora::optim::{adamw_pytorch_defaults, loraplus_adamw};
use serial_lora::{AdaptedModel, AdapterConfig, ParamCountExt};

#[derive(Parser, Debug)]
struct Args {
    /// cpu | cuda[:N] | tch-cpu | tch-cuda[:N] (backends compiled in)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// SAM config preset (`SamConfig::preset`: vit-b, vit-l, vit-h).
    #[arg(long, default_value = "vit-b")]
    preset: String,
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
    /// Square input size (a multiple of 16; the checkpoint's is 1024).
    #[arg(long, default_value_t = 512)]
    image_size: usize,
    #[arg(long, default_value_t = 32)]
    rank: usize,
    /// Adapter dropout while training (`sam-seg train` default: 0).
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// LoRA+ ratio of the `-plus` methods.
    #[arg(long, default_value_t = 20.0)]
    lr_ratio: f64,
    /// Name written to the JSON `model` key.
    #[arg(long, default_value = "sam-b")]
    model_name: String,
    /// Recompute the transformer blocks in the backward pass (`--gradient-checkpointing` of `train`).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Precision the frozen base is held in (`--dtype` of `train`): f32 | bf16 | f16.
    #[arg(long, default_value = "f32")]
    dtype: serial_lora::BaseDType,
}

/// Synthetic inputs: normalized-pixel-like noise `[b, 3, s, s]`, the box (¼ s, ¼ s)–(¾ s, ¾ s)
/// per image, and as target the same box on the low-resolution grid `[b, (s/4)²]`.
struct Inputs<B: Backend> {
    pixels: Tensor<B, 4>,
    prompts: Prompts<B>,
    target: Tensor<B, 2>,
    low: usize,
}

impl<B: Backend> Inputs<B> {
    fn new(cfg: &SamConfig, args: &Args, device: &B::Device) -> Self {
        let (b, s) = (args.batch, args.image_size);
        let pixels = Tensor::random([b, cfg.vision_config.num_channels, s, s], Distribution::Normal(0.0, 1.0), device);
        let q = s as f32 / 4.0;
        let boxes = Tensor::from_data(TensorData::new([q, q, 3.0 * q, 3.0 * q].repeat(b), [b, 1, 4]), device);
        // the encoder's grid at `--image-size` (`cfg` may still have the checkpoint's)
        let low = 4 * (s / cfg.vision_config.patch_size);
        let inside = |i: usize| (low / 4..3 * low / 4).contains(&i);
        let mask: Vec<f32> = (0..low * low).map(|p| if inside(p / low) && inside(p % low) { 1.0 } else { 0.0 }).collect();
        let target = Tensor::from_data(TensorData::new(mask.repeat(b), [b, low * low]), device);
        Self { pixels, prompts: Prompts { points: None, boxes: Some(boxes), masks: None }, target, low }
    }
}

/// Low-resolution mask logits `[b, (4·grid)²]` for the box prompts (single-mask output).
fn masks<B: Backend>(model: &SamModel<B>, x: &Inputs<B>) -> Result<Tensor<B, 2>> {
    let out = model.forward(model.get_image_embeddings(x.pixels.clone()), &x.prompts, false)?;
    Ok(out.pred_masks.reshape([x.pixels.dims()[0], x.low * x.low]))
}

/// `sam-seg train`'s loss: BCE with logits + per-image soft Dice `1 − (2Σpy + 1)/(Σp + Σy + 1)`.
fn seg_loss<B: Backend>(logits: Tensor<B, 2>, y: Tensor<B, 2>) -> Tensor<B, 1> {
    let bce = (y.clone() * log_sigmoid(logits.clone()) + y.clone().neg().add_scalar(1.0) * log_sigmoid(logits.clone().neg())).mean().neg();
    let p = sigmoid(logits);
    let inter = (p.clone() * y.clone()).sum_dim(1).mul_scalar(2.0).add_scalar(1.0);
    let dice = (inter / (p.sum_dim(1) + y.sum_dim(1)).add_scalar(1.0)).neg().add_scalar(1.0);
    bce + dice.mean()
}

/// `sam-seg train`'s adapter: alpha = rank (s = 1).
fn adapter(args: &Args, method: &str) -> serial_lora::Result<AdapterConfig> {
    Ok(AdapterConfig::from_method_name(method, args.rank, args.lr_ratio)?.with_alpha(args.rank as f64).with_dropout(args.dropout))
}

fn build<B: Backend>(cfg: &mut SamConfig, args: &Args, device: &B::Device) -> Result<SamModel<B>> {
    Ok(SamModel::<B>::new(cfg, device).with_image_size(cfg, args.image_size)?)
}

/// A model with `method`'s adapter, stepped as `sam-seg train` steps it: each call runs one
/// step ([`TrainStep`]).
fn trainer<'a, AB: AutodiffBackend>(
    cfg: &mut SamConfig,
    args: &'a Args,
    method: &str,
    x: &'a Inputs<AB>,
    device: &'a AB::Device,
) -> Result<(impl FnMut() -> Result<TrainStep> + use<'a, AB>, usize)> {
    let acfg = adapter(args, method)?;
    let mut model = Some(random_base_in(build::<AB>(cfg, args, device)?, args.dtype).with_adapters(&acfg, 0, device)?);
    let trainable = model.as_ref().map_or(0, |m| m.param_counts().trainable);
    let mut optim = loraplus_adamw::<AB, SamModel<AB>>(&adamw_pytorch_defaults(), acfg.lr_ratio.unwrap_or(1.0));
    let run = move || {
        let t0 = Instant::now();
        let m = model.take().context("an earlier step failed")?;
        let logits = serial_lora::with_checkpointing(args.gradient_checkpointing, || autocast(args.dtype, || masks(&m, x)))?;
        let loss = seg_loss(logits, x.target.clone());
        let value = loss.clone().into_scalar().elem::<f32>(); // as `sam-seg train` (and a sync)
        let t1 = Instant::now();
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        let _ = AB::sync(device);
        let t2 = Instant::now();
        model = Some(optim.step(1e-4, m, grads));
        let _ = AB::sync(device);
        Ok((value, [t0, t1, t2, Instant::now()]))
    };
    Ok((run, trainable))
}

fn train<AB: AutodiffBackend>(cfg: &mut SamConfig, args: &Args, device: &AB::Device) -> Result<(StepTimes, usize)> {
    let x = Inputs::<AB>::new(cfg, args, device);
    let (step, trainable) = trainer(cfg, args, &args.method, &x, device)?;
    let other = args.alternate_with.as_deref().map(|other| (other, || trainer(&mut cfg.clone(), args, other, &x, device).map(|(s, _)| s)));
    let times = train_case(step, other, args.steps, args.warmup)?;
    Ok((times, trainable))
}

fn infer<B: Backend>(cfg: &mut SamConfig, args: &Args, device: &B::Device) -> Result<(StepTimes, usize)> {
    let base = random_base_in(build::<B>(cfg, args, device)?, args.dtype);
    let (model, trainable) = infer_model(base, &args.method, &args.mode, || adapter(args, &args.method), device)?;
    let x = Inputs::<B>::new(cfg, args, device);
    let forward = |m: &SamModel<B>| -> Result<()> {
        let _ = masks(m, &x)?.into_data(); // sync: the masks on the host
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
        let base = || Ok(random_base_in(build::<B>(cfg, args, device)?, args.dtype)).map(|b| move || timed(|| forward(&b)));
        alternate(&mut times, "base", || timed(|| forward(&model)), base, args.steps, args.warmup)?;
    }
    Ok((times, trainable))
}

fn run<AB: AutodiffBackend>(device: &AB::Device, args: &Args) -> Result<()> {
    let Some(mut cfg) = SamConfig::preset(&args.preset) else { bail!("unknown preset `{}`", args.preset) };
    AB::seed(device, 0);
    let (times, trainable) = match args.mode.as_str() {
        "train" if args.method == "base" => bail!("--method base has only --mode infer"),
        "train" => train::<AB>(&mut cfg, args, device)?,
        _ => infer::<AB::InnerBackend>(&mut cfg, args, device)?,
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
    println!(
        "{}",
        json_line(
            &case,
            &times,
            serde_json::json!({"image_size": args.image_size, "rank": args.rank, "gradient_checkpointing": args.gradient_checkpointing, "dtype": args.dtype})
        )
    );
    Ok(())
}

fn main() -> Result<()> {
    lora_runtime::alloc::keep_freed_memory();
    let args = Args::parse();
    let device: DeviceSpec = args.device.parse()?;
    lora_runtime::dispatch!(device, run(&args))
}
