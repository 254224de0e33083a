//! `clip-cls`: CLIP embeddings, zero-shot classification, few-shot LoRA / Serial LoRA (+)
//! training and evaluation.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::backend::AutodiffBackend;
use clap::{Parser, Subcommand};
use clip_cls::data::Dataset;
use clip_cls::export::export_clip;
use clip_cls::preprocess::{ImageProcessor, load_rgb};
use clip_cls::tokenizer::{CONTEXT_LENGTH, ClipTokenizer};
use clip_cls::train::{TrainConfig, evaluate};
use clip_cls::{ClipModel, load_clip};
use lora_runtime::cli::DTypeArg;
use lora_runtime::dist::Peer;
use lora_runtime::export::{ExportOptions, WeightedAdapter, weighted_adapters};
use lora_runtime::hub::{HubOptions, resolve_model_dir};
use lora_runtime::run::RunArgs;
use lora_runtime::weights::with_base_dtype;
use lora_runtime::{DeviceSpec, cli};
use serial_lora::analysis::qkv_spectra;
use serial_lora::io;

// The digits proxy experiment (`clip-cls proxy`): private to this binary. It keeps its whole
// API, of which the subcommand uses a part (the unit tests and the docs the rest).
#[allow(dead_code, unused_imports)]
#[path = "clip-cls/proxy.rs"]
mod proxy;
#[cfg(test)]
#[path = "clip-cls/proxy_tests.rs"]
mod proxy_tests;

use proxy::{ProxyConfig, run_proxy};

#[derive(Parser)]
#[command(version, about = "CLIP with LoRA / Serial LoRA (+) adapters: embeddings, zero-shot, few-shot training and evaluation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// Hub id (e.g. openai/clip-vit-base-patch16; fetched into the HF cache, honours HF_HOME and
    /// HF_HUB_OFFLINE) or a local directory in HF layout.
    #[arg(long)]
    model: String,
    /// Adapter directory (PEFT LoRA or Serial LoRA) to apply; repeat for several, applied in
    /// the order given: LoRA deltas add (W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ), Serial LoRA transforms compose
    /// (W (I + w₁s₁B₁A₁)(I + w₂s₂B₂A₂), PyTorch layout); LoRA and Serial adapters may be mixed.
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// Weight of each --adapter, comma-separated (default 1 each; diffusers'
    /// `set_adapters(..., adapter_weights=...)`): scales s·B·A; 0 gives the base model exactly.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    adapter_weights: Vec<f64>,
    /// cpu | cuda[:N] | tch-cpu | tch-cuda[:N] (backends compiled into this binary).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the base weights: f32 | bf16 | f16 | auto (the checkpoint's own). Held in
    /// memory in it (computed in f32; default f32), or, for `export`, written in it (default:
    /// the checkpoint's own).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Projected, unnormalized image and text features (transformers get_image_features /
    /// get_text_features), written to a safetensors file as `image_embeds` and `text_embeds`.
    Embed {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, num_args = 1..)]
        images: Vec<PathBuf>,
        #[arg(long, num_args = 1..)]
        texts: Vec<String>,
        #[arg(long)]
        output: PathBuf,
    },
    /// Zero-shot classification: one JSON object per image.
    ZeroShot {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated class names.
        #[arg(long, value_delimiter = ',', required = true)]
        classes: Vec<String>,
        /// Prompt template; `{}` is replaced by the class name.
        #[arg(long, default_value = "a photo of a {}.")]
        template: String,
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Few-shot fine-tuning with LoRA / Serial LoRA (+) (the CLIP-LoRA recipe). Writes the
    /// adapter (PEFT layout), train_config.json, metrics.json and checkpoint/ into --out.
    // a negative number is a (bad) value, named in the error, not an unknown flag
    #[command(allow_negative_numbers = true)]
    Train {
        #[command(flatten)]
        config: Box<TrainConfig>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Singular values of the effective Q, K, V weights of every attention block (the paper's
    /// Fig. 3) of the base model and, with --adapter, of the adapted one (adapter folded in):
    /// JSON `{"base": [...], "adapted": [...]}`, entries `{"block", "projection",
    /// "singular_values"}` (largest first).
    Spectra {
        #[command(flatten)]
        model: ModelArgs,
        /// JSON file to write.
        #[arg(long)]
        output: PathBuf,
    },
    /// Top-1 accuracy on a dataset split (JSON on stdout).
    // a negative number is a (bad) value, named in the error, not an unknown flag
    #[command(allow_negative_numbers = true)]
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        dataset: PathBuf,
        #[arg(long, default_value = "test")]
        split: String,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Prompt template; `{}` is replaced by the class name. Default: CoOp's template of the
        /// dataset, else "a photo of a {}.".
        #[arg(long)]
        template: Option<String>,
        /// Skip (and count) unreadable images instead of failing.
        #[arg(long)]
        skip_bad_images: bool,
    },
    /// A merged, full model in transformers' layout (`CLIPModel.from_pretrained(OUT)` loads it
    /// without adapter code): config, tokenizer and preprocessor files copied, model.safetensors
    /// rewritten with the adapters folded in (merged in f64; LoRA W + s·B·A, Serial LoRA
    /// W (I + s·B·A)). Written into a temporary directory renamed into place.
    Export {
        #[command(flatten)]
        model: ModelArgs,
        /// Output directory (refused if it exists, unless --force).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out.
        #[arg(long)]
        force: bool,
    },
    /// The proxy transfer experiment on scikit-learn's digits: a tiny CLIP-style ViT pretrained
    /// on digits 0–4 (cached in --backbone), adapted few-shot to digits 5–9 with a frozen
    /// backbone (or a baseline: the head alone, full fine-tuning). Writes metrics.json (also
    /// printed), the adapter, head.safetensors and spectra.json into --out.
    // a negative number is a (bad) value, named in the error, not an unknown flag
    #[command(allow_negative_numbers = true)]
    Proxy {
        #[command(flatten)]
        config: Box<ProxyConfig>,
        /// Run directory.
        #[arg(long)]
        out: PathBuf,
        /// cpu | cuda[:N] | tch-cpu | tch-cuda[:N] (backends compiled into this binary).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

struct Loaded<B: Backend> {
    model: ClipModel<B>,
    tokenizer: ClipTokenizer,
    processor: ImageProcessor,
}

fn model_dir(spec: &str) -> Result<PathBuf> {
    resolve_model_dir(
        spec,
        &[&["config.json"], &["model.safetensors", "model.safetensors.index.json"], &["tokenizer.json", "vocab.json+merges.txt"]],
        &["preprocessor_config.json"],
        &HubOptions::from_env(),
    )
    .context("--model")
}

fn load<B: Backend>(args: &ModelArgs, device: &B::Device) -> Result<Loaded<B>> {
    let dir = &model_dir(&args.model)?;
    let (model, cfg) = load_base::<B>(args, dir, device)?;
    let model = cli::merge_adapters(model, &adapters(args)?, device)?;
    Ok(Loaded { model, tokenizer: ClipTokenizer::from_dir(dir)?, processor: ImageProcessor::from_dir(dir, &cfg.vision_config)? })
}

/// The base model in the precision of `--dtype`.
fn load_base<B: Backend>(args: &ModelArgs, dir: &Path, device: &B::Device) -> Result<(ClipModel<B>, clip_cls::ClipConfig)> {
    let dtype = DTypeArg::base(args.dtype, dir)?;
    Ok(with_base_dtype(dtype, || load_clip::<B>(dir, device))?)
}

fn adapters(args: &ModelArgs) -> Result<Vec<WeightedAdapter>> {
    Ok(weighted_adapters(&args.adapter, &args.adapter_weights)?)
}

/// Refuses an output file whose directory does not exist, before any work.
fn check_output_dir(output: &Path) -> Result<()> {
    Ok(cli::check_output_parent("--output", output)?)
}

fn ids<B: Backend>(tok: &ClipTokenizer, texts: &[String], device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = texts.iter().flat_map(|t| tok.tokenize(t, CONTEXT_LENGTH)).map(i64::from).collect();
    Tensor::from_data(TensorData::new(data, [texts.len(), CONTEXT_LENGTH]), device)
}

fn pixels<B: Backend>(l: &Loaded<B>, paths: &[PathBuf], device: &B::Device) -> Result<Tensor<B, 4>> {
    let images = paths.iter().map(|p| load_rgb(p)).collect::<Result<Vec<_>, _>>()?;
    Ok(l.processor.batch(&images, device))
}

fn run<AB: AutodiffBackend>(device: &AB::Device, cmd: &Cmd, peer: &Peer) -> Result<()> {
    type B<AB> = <AB as AutodiffBackend>::InnerBackend;
    match cmd {
        Cmd::Embed { model, images, texts, output } => embed::<B<AB>>(model, images, texts, output, device),
        Cmd::ZeroShot { model, classes, template, images } => zero_shot::<B<AB>>(model, classes, template, images, device),
        Cmd::Train { config, run } => train::<AB>(config, run, peer, device),
        Cmd::Spectra { model, output } => spectra::<B<AB>>(model, output, device),
        Cmd::Eval { model, dataset, split, batch, template, skip_bad_images } => {
            eval::<B<AB>>(model, dataset, split, *batch, template.as_deref(), *skip_bad_images, device)
        }
        Cmd::Export { model, out, force } => export::<B<AB>>(model, out, *force, device),
        Cmd::Proxy { config, out, .. } => proxy::<AB>(config, out, device),
    }
}

fn embed<B: Backend>(model: &ModelArgs, images: &[PathBuf], texts: &[String], output: &Path, device: &B::Device) -> Result<()> {
    if images.is_empty() && texts.is_empty() {
        bail!("nothing to embed: give --images and/or --texts");
    }
    check_output_dir(output)?;
    let l = load::<B>(model, device)?;
    let mut out = std::collections::BTreeMap::new();
    if !images.is_empty() {
        let e = l.model.get_image_features(pixels(&l, images, device)?);
        out.insert("image_embeds".to_string(), io::HostTensor::from_tensor(e));
    }
    if !texts.is_empty() {
        let e = l.model.get_text_features(ids(&l.tokenizer, texts, device));
        out.insert("text_embeds".to_string(), io::HostTensor::from_tensor(e));
    }
    io::write_safetensors(output, &out, Default::default())?;
    eprintln!("wrote {}", output.display());
    Ok(())
}

fn zero_shot<B: Backend>(model: &ModelArgs, classes: &[String], template: &str, images: &[PathBuf], device: &B::Device) -> Result<()> {
    if !template.contains("{}") {
        bail!("--template {template:?} has no {{}} for the class name");
    }
    let l = load::<B>(model, device)?;
    let prompts: Vec<String> = classes.iter().map(|c| template.replace("{}", c)).collect();
    let text = l.model.get_text_features(ids(&l.tokenizer, &prompts, device));
    for path in images {
        let image = l.model.get_image_features(pixels(&l, std::slice::from_ref(path), device)?);
        let probs = softmax(l.model.logits_per_image(image, text.clone()), 1);
        let probs: Vec<f32> = probs.into_data().iter::<f32>().collect();
        let best = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
        let obj = serde_json::json!({
            "path": path.display().to_string(),
            "probs": classes.iter().zip(&probs).map(|(c, p)| (c.clone(), serde_json::json!(p))).collect::<serde_json::Map<_, _>>(),
            "prediction": classes[best],
        });
        println!("{obj}");
    }
    Ok(())
}

fn train<AB: AutodiffBackend>(config: &TrainConfig, run: &RunArgs, peer: &Peer, device: &AB::Device) -> Result<()> {
    let (dir, out) = (model_dir(&config.model)?, &run.out);
    let reporter = cli::train_reporter(run, &config.method, config.lr_ratio, "acc", peer);
    let m = clip_cls::train::train::<AB>(config, &dir, out, &run.options(peer.clone()), device, &mut |p| reporter.report(p))?;
    reporter.finish();
    if peer.rank > 0 {
        return Ok(());
    }
    eprintln!(
        "{}: {} trainable / {} parameters; {} of {} steps; final loss {:.4}, train accuracy {:.3}; {} skipped image(s)",
        out.display(),
        m.trainable_params,
        m.total_params,
        m.run.steps,
        m.run.total_steps,
        m.final_loss,
        m.train_accuracy,
        m.skipped_images.len()
    );
    Ok(())
}

fn spectra<B: Backend>(model: &ModelArgs, output: &Path, device: &B::Device) -> Result<()> {
    check_output_dir(output)?;
    let (base, _) = load_base::<B>(model, &model_dir(&model.model)?, device)?;
    let mut out = serde_json::json!({ "model": model.model, "base": qkv_spectra(&base) });
    if model.adapter.len() > 1 || !model.adapter_weights.is_empty() {
        bail!("spectra takes one --adapter and no --adapter-weights");
    }
    if let Some(a) = model.adapter.first() {
        let (adapted, cfg) = io::load_adapter(base, a, device)?;
        out["adapter"] = serde_json::json!(a);
        out["method"] = serde_json::json!(cfg.method);
        out["adapted"] = serde_json::json!(qkv_spectra(&adapted));
    }
    io::write_atomic(output, serde_json::to_string(&out)?.as_bytes())?;
    eprintln!("wrote {}", output.display());
    Ok(())
}

fn eval<B: Backend>(
    model: &ModelArgs,
    dataset: &Path,
    split: &str,
    batch: usize,
    template: Option<&str>,
    skip_bad_images: bool,
    device: &B::Device,
) -> Result<()> {
    let dataset = Dataset::open(dataset)?;
    let template = template.unwrap_or(dataset.default_template());
    if !template.contains("{}") {
        bail!("--template {template:?} has no {{}} for the class name");
    }
    let l = load::<B>(model, device)?;
    let r =
        cli::with_progress_bar(|progress| evaluate(&l.model, &l.tokenizer, &l.processor, &dataset, split, template, batch, skip_bad_images, device, progress))?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

fn export<B: Backend>(model: &ModelArgs, out: &Path, force: bool, device: &B::Device) -> Result<()> {
    let opts = ExportOptions { dtype: DTypeArg::export(model.dtype), force, max_shard_bytes: None };
    let summary = export_clip::<B>(&model_dir(&model.model)?, &adapters(model)?, &opts, out, device)?;
    cli::report_export(out, &summary, "tensors")?;
    Ok(())
}

fn proxy<AB: AutodiffBackend>(config: &ProxyConfig, out: &Path, device: &AB::Device) -> Result<()> {
    let epochs = config.pretrain_epochs;
    let mut on_epoch = |e: usize, loss: f64| eprintln!("pretraining epoch {}/{epochs}: loss {loss:.4}", e + 1);
    let m = run_proxy::<AB>(config, out, device, &mut on_epoch)?;
    eprintln!(
        "{}: {} rank {} {}-shot seed {}: accuracy {:.3} on {} held-out images of digits 5–9 (pretrained: {:.3} on 0–4); \
         {} trainable parameters in the backbone (adapters) + {} in the head; {:.1} s",
        out.display(),
        m.method,
        m.rank,
        m.shots,
        m.seed,
        m.accuracy,
        m.test_images,
        m.pretrain_accuracy,
        m.adapter_params,
        m.head_params,
        m.wall_seconds
    );
    println!("{}", serde_json::to_string_pretty(&m)?);
    Ok(())
}

fn main() -> Result<()> {
    lora_runtime::alloc::keep_freed_memory();
    let cli = Cli::parse();
    let (device_arg, peer) = match &cli.command {
        Cmd::Embed { model, .. } | Cmd::ZeroShot { model, .. } | Cmd::Spectra { model, .. } | Cmd::Eval { model, .. } | Cmd::Export { model, .. } => {
            (model.device.clone(), Peer::single())
        }
        Cmd::Proxy { device, .. } => (device.clone(), Peer::single()),
        Cmd::Train { run, .. } => cli::launch_train(run)?,
    };
    let device: DeviceSpec = device_arg.parse().context("--device")?;
    lora_runtime::dispatch!(device, run(&cli.command, &peer))
}
