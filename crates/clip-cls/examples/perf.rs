//! Timing of one CLIP case on synthetic inputs, for `cargo xtask perf`: random weights of the
//! real config (default `vit-b-16` = openai/clip-vit-base-patch16 shapes), both towers adapted.
//!
//! Modes (one per process, so the peak RSS of a case is its own):
//! - `train`: the steady-state step of `clip-cls train` — image features, the class text
//!   features re-encoded, logits `100 · cos`, cross-entropy, backward, AdamW (LoRA+ with the
//!   `-plus` methods) through `serial_lora::optim`.
//! - `infer`: the same forward (image + class text features + logits), adapters unmerged, no
//!   autodiff.
//! - `infer-merged`: the same after `merge_and_unload` (the base model's architecture); then
//!   alternated with a freshly built base model in this process (`over_alternated`,
//!   `lora_runtime::perf::alternate`). `train --alternate-with lora` does the same for a
//!   training step against another method's.
//! - `--method base --mode infer`: the frozen base model, the reference for `infer-merged`.
//!
//! Prints one JSON line: `model`, `method`, `mode`, `median_step_s`, `peak_rss_mb` (the
//! contract `cargo xtask perf` reads) plus details (per-step times, images/s, and for `train`
//! the medians of the forward, backward and optimizer parts).
//!
//! cargo run --release -p clip-cls --example perf -- --method serial-lora --mode train --steps 5
use serial_lora::half::autocast;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use clip_cls::ClipConfig;
use clip_cls::model::{ClipModel, l2_normalize};
use lora_runtime::DeviceSpec;
use lora_runtime::perf::random_base_in;
use lora_runtime::perf::{Case, StepTimes, TrainStep, alternate, infer_model, json_line, timed, train_case};
use serial_lora::optim::{adamw_pytorch_defaults, loraplus_adamw};
use serial_lora::{AdaptedModel, AdapterConfig, ParamCountExt};

#[derive(Parser, Debug)]
struct Args {
    /// cpu | cuda[:N] | tch-cpu | tch-cuda[:N] (backends compiled in)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CLIP config preset (clip-cls `ClipConfig::preset`).
    #[arg(long, default_value = "vit-b-16")]
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
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Class prompts re-encoded per step (77 tokens each).
    #[arg(long, default_value_t = 10)]
    classes: usize,
    #[arg(long, default_value_t = 32)]
    rank: usize,
    /// Adapter dropout while training (CLIP-LoRA: 0.25).
    #[arg(long, default_value_t = 0.25)]
    dropout: f64,
    /// LoRA+ ratio of the `-plus` methods.
    #[arg(long, default_value_t = 20.0)]
    lr_ratio: f64,
    /// Name written to the JSON `model` key.
    #[arg(long, default_value = "clip-b16")]
    model_name: String,
    /// Recompute the transformer blocks in the backward pass (`--gradient-checkpointing` of `train`).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Precision the frozen base is held in (`--dtype` of `train`): f32 | bf16 | f16.
    #[arg(long, default_value = "f32")]
    dtype: serial_lora::BaseDType,
}

/// Synthetic inputs: normalized-pixel-like noise, token ids `<bos> w1..w6 <eos> <eos>…` (CLIP
/// pads with the end token), labels `i mod classes`.
struct Inputs<B: Backend> {
    pixels: Tensor<B, 4>,
    ids: Tensor<B, 2, Int>,
    labels: Tensor<B, 1, Int>,
}

impl<B: Backend> Inputs<B> {
    fn new(cfg: &ClipConfig, args: &Args, device: &B::Device) -> Self {
        let v = &cfg.vision_config;
        let t = &cfg.text_config;
        let pixels = Tensor::random([args.batch, v.num_channels, v.image_size, v.image_size], Distribution::Normal(0.0, 1.0), device);
        let len = t.max_position_embeddings;
        let ids: Vec<i64> = (0..args.classes)
            .flat_map(|c| {
                (0..len).map(move |j| match j {
                    0 => t.bos_token_id,
                    1..=6 => ((c * 7919 + j * 104_729) % 49_000) as i64 + 256,
                    _ => t.eos_token_id,
                })
            })
            .collect();
        let ids = Tensor::from_data(TensorData::new(ids, [args.classes, len]), device);
        let labels: Vec<i64> = (0..args.batch).map(|i| (i % args.classes) as i64).collect();
        let labels = Tensor::from_data(TensorData::new(labels, [args.batch]), device);
        Self { pixels, ids, labels }
    }
}

/// `100 · cos(image, class text)`: `[batch, classes]` (CLIP-LoRA's logits).
fn logits<B: Backend>(model: &ClipModel<B>, x: &Inputs<B>) -> Tensor<B, 2> {
    let image = l2_normalize(model.get_image_features(x.pixels.clone()));
    let text = l2_normalize(model.get_text_features(x.ids.clone()));
    image.matmul(text.transpose()).mul_scalar(100.0)
}

fn adapter(args: &Args, method: &str) -> serial_lora::Result<AdapterConfig> {
    Ok(AdapterConfig::from_method_name(method, args.rank, args.lr_ratio)?.with_alpha(1.0).with_dropout(args.dropout))
}

/// A model with `method`'s adapter, stepped as `clip-cls train` steps it: each call runs one
/// step ([`TrainStep`]).
fn trainer<'a, AB: AutodiffBackend>(
    cfg: &ClipConfig,
    args: &'a Args,
    method: &str,
    x: &'a Inputs<AB>,
    device: &'a AB::Device,
) -> Result<(impl FnMut() -> Result<TrainStep> + use<'a, AB>, usize)> {
    let acfg = adapter(args, method)?;
    let mut model = Some(random_base_in(ClipModel::<AB>::new(cfg, device), args.dtype).with_adapters(&acfg, 0, device)?);
    let trainable = model.as_ref().map_or(0, |m| m.param_counts().trainable);
    let mut optim = loraplus_adamw::<AB, ClipModel<AB>>(&adamw_pytorch_defaults(), acfg.lr_ratio.unwrap_or(1.0));
    let mut step = 0u64;
    let run = move || {
        let t0 = Instant::now();
        // as the training driver, a dropout seed per micro-batch
        let m = model.take().context("an earlier step failed")?.with_dropout_seed(step);
        step += 1;
        let logits = serial_lora::with_checkpointing(args.gradient_checkpointing, || autocast(args.dtype, || logits(&m, x)));
        let loss = log_softmax(logits, 1).gather(1, x.labels.clone().unsqueeze_dim(1)).mean().neg();
        let value = loss.clone().into_scalar().elem::<f32>(); // as `clip-cls train` (and a sync)
        let t1 = Instant::now();
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        let _ = AB::sync(device);
        let t2 = Instant::now();
        model = Some(optim.step(2e-4, m, grads));
        let _ = AB::sync(device);
        Ok((value, [t0, t1, t2, Instant::now()]))
    };
    Ok((run, trainable))
}

fn train<AB: AutodiffBackend>(cfg: &ClipConfig, args: &Args, device: &AB::Device) -> Result<(StepTimes, usize)> {
    let x = Inputs::<AB>::new(cfg, args, device);
    let (step, trainable) = trainer(cfg, args, &args.method, &x, device)?;
    let other = args.alternate_with.as_deref().map(|other| (other, || trainer(cfg, args, other, &x, device).map(|(s, _)| s)));
    let times = train_case(step, other, args.steps, args.warmup)?;
    Ok((times, trainable))
}

fn infer<B: Backend>(cfg: &ClipConfig, args: &Args, device: &B::Device) -> Result<(StepTimes, usize)> {
    let new_base = || random_base_in(ClipModel::<B>::new(cfg, device), args.dtype);
    let (model, trainable) = infer_model(new_base(), &args.method, &args.mode, || adapter(args, &args.method), device)?;
    let x = Inputs::<B>::new(cfg, args, device);
    let forward = |m: &ClipModel<B>| -> Result<()> {
        let _ = logits(m, &x).into_data(); // sync: the logits on the host
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
    let Some(cfg) = ClipConfig::preset(&args.preset) else { bail!("unknown preset `{}`", args.preset) };
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
    let line = json_line(
        &case,
        &times,
        serde_json::json!({"classes": args.classes, "rank": args.rank, "gradient_checkpointing": args.gradient_checkpointing, "dtype": args.dtype}),
    );
    println!("{line}");
    Ok(())
}

fn main() -> Result<()> {
    lora_runtime::alloc::keep_freed_memory();
    let args = Args::parse();
    let device: DeviceSpec = args.device.parse()?;
    lora_runtime::dispatch!(device, run(&args))
}
