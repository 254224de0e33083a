//! `sam-seg`: SAM mask prediction from box / point prompts, image-encoder LoRA / Serial LoRA (+)
//! fine-tuning and Dice evaluation.
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use clap::{Parser, Subcommand};
use lora_runtime::cli::DTypeArg;
use lora_runtime::dist::Peer;
use lora_runtime::export::{ExportOptions, WeightedAdapter, weighted_adapters};
use lora_runtime::hub::{HubOptions, resolve_model_dir};
use lora_runtime::imaging::load_rgb;
use lora_runtime::run::RunArgs;
use lora_runtime::weights::with_base_dtype;
use lora_runtime::{DeviceSpec, cli};
use sam_seg::data::SegDataset;
use sam_seg::export::export_sam;
use sam_seg::processor::SamProcessor;
use sam_seg::train::{TrainConfig, evaluate};
use sam_seg::{Prompts, SamConfig, SamModel, load_sam_sized};
use serial_lora::io;

#[derive(Parser)]
#[command(version, about = "SAM with LoRA / Serial LoRA (+) adapters on the image encoder: prediction, fine-tuning, Dice evaluation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct AdapterArgs {
    /// Adapter directory (PEFT LoRA or Serial LoRA) for the image encoder; repeat for several,
    /// applied in the order given: LoRA deltas add (W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ), Serial LoRA transforms
    /// compose (W (I + w₁s₁B₁A₁)(I + w₂s₂B₂A₂), PyTorch layout); LoRA and Serial may be mixed.
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// Weight of each --adapter, comma-separated (default 1 each; diffusers'
    /// `set_adapters(..., adapter_weights=...)`): scales s·B·A; 0 gives the base model exactly.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    adapter_weights: Vec<f64>,
}

impl AdapterArgs {
    fn list(&self) -> Result<Vec<WeightedAdapter>> {
        Ok(weighted_adapters(&self.adapter, &self.adapter_weights)?)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Masks for one image and one prompt (a box and/or points), as transformers'
    /// `SamModel(..., multimask_output=True)`: `pred_masks` [1, 1, 3, h, w] low-resolution logits
    /// and `iou_scores` [1, 1, 3] in a safetensors file; the best mask as a PNG at image size.
    // a negative number is a (bad) value, named in the error, not an unknown flag
    #[command(allow_negative_numbers = true)]
    Predict(PredictArgs),
    /// Fine-tune the image encoder on box prompts from ground-truth masks (Dice + BCE). Writes
    /// the adapter (PEFT layout), train_config.json, metrics.json and checkpoint/ into --out.
    // a negative number is a (bad) value, named in the error, not an unknown flag
    #[command(allow_negative_numbers = true)]
    Train {
        #[command(flatten)]
        config: Box<TrainConfig>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Mean Dice and Dice loss (1 − Dice) of box-prompted masks on a split (JSON on stdout).
    // a negative number is a (bad) value, named in the error, not an unknown flag
    #[command(allow_negative_numbers = true)]
    Eval(EvalArgs),
    /// A merged, full model in transformers' layout (`SamModel.from_pretrained(OUT)` loads it
    /// without adapter code), also from a segment-anything checkpoint: config and processor
    /// files copied, model.safetensors rewritten under HF key names with the adapters folded in
    /// (merged in f64; LoRA W + s·B·A, Serial LoRA W (I + s·B·A)). Written into a temporary
    /// directory renamed into place.
    Export(ExportArgs),
}

#[derive(clap::Args)]
struct PredictArgs {
    /// Hub id (e.g. facebook/sam-vit-base; HF cache, HF_HOME, HF_HUB_OFFLINE) or local HF-layout directory.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    adapters: AdapterArgs,
    /// cpu | cuda[:N] | tch-cpu | tch-cuda[:N] (backends compiled into this binary).
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    image: PathBuf,
    /// Box `x0,y0,x1,y1` in image pixels.
    #[arg(long, value_parser = parse_box, allow_hyphen_values = true)]
    r#box: Option<[f32; 4]>,
    /// Point `x,y,label` in image pixels (label 1 = object, 0 = background); repeatable.
    #[arg(long = "point", value_parser = parse_point, allow_hyphen_values = true)]
    points: Vec<([f32; 2], i64)>,
    #[arg(long)]
    output: PathBuf,
    /// Also write the highest-IoU mask, upscaled to the image and thresholded at 0, as a PNG.
    #[arg(long)]
    mask_png: Option<PathBuf>,
    /// Square input size (multiple of the patch size; default: the checkpoint's).
    #[arg(long)]
    image_size: Option<usize>,
    /// Precision the model is held in: f32 | bf16 | f16 | auto (the checkpoint's own);
    /// computed in f32. Default f32.
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
}

#[derive(clap::Args)]
struct EvalArgs {
    #[arg(long)]
    model: String,
    #[command(flatten)]
    adapters: AdapterArgs,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    dataset: PathBuf,
    #[arg(long, default_value = "test")]
    split: String,
    #[arg(long)]
    class_id: Option<u8>,
    /// Seed and test fraction of the split when the dataset has no split.json (as in train).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 0.2)]
    test_fraction: f64,
    /// Square input size (as given to train).
    #[arg(long)]
    image_size: Option<usize>,
    /// Precision the model is held in: f32 | bf16 | f16 | auto (the checkpoint's own);
    /// computed in f32. Default f32.
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
}

#[derive(clap::Args)]
struct ExportArgs {
    #[arg(long)]
    model: String,
    #[command(flatten)]
    adapters: AdapterArgs,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output directory (refused if it exists, unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Output precision of the float tensors: f32 | bf16 | f16 | auto (default: the
    /// checkpoint's own).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Replace an existing --out.
    #[arg(long)]
    force: bool,
}

fn model_dir(spec: &str) -> Result<PathBuf> {
    resolve_model_dir(spec, &[&["config.json"], &["model.safetensors"]], &["preprocessor_config.json"], &HubOptions::from_env()).context("--model")
}

fn numbers(s: &str, n: usize, what: &str) -> std::result::Result<Vec<f32>, String> {
    let v: Vec<f32> = s.split(',').map(|x| x.trim().parse::<f32>()).collect::<std::result::Result<_, _>>().map_err(|e| format!("{what} `{s}`: {e}"))?;
    if v.len() != n || v.iter().any(|x| !x.is_finite()) {
        return Err(format!("{what} `{s}`: expected {n} comma-separated finite numbers"));
    }
    Ok(v)
}

fn parse_box(s: &str) -> std::result::Result<[f32; 4], String> {
    let v = numbers(s, 4, "box")?;
    if v[2] <= v[0] || v[3] <= v[1] {
        return Err(format!("box `{s}`: need x0 < x1 and y0 < y1"));
    }
    Ok([v[0], v[1], v[2], v[3]])
}

fn parse_point(s: &str) -> std::result::Result<([f32; 2], i64), String> {
    let v = numbers(s, 3, "point")?;
    if v[2] != 0.0 && v[2] != 1.0 {
        return Err(format!("point `{s}`: label must be 1 (object) or 0 (background)"));
    }
    Ok(([v[0], v[1]], v[2] as i64))
}

fn run<AB: AutodiffBackend>(device: &AB::Device, cmd: &Cmd, peer: &Peer) -> Result<()> {
    match cmd {
        Cmd::Predict(args) => predict::<AB::InnerBackend>(args, device),
        Cmd::Train { config, run } => train::<AB>(config, run, peer, device),
        Cmd::Eval(args) => eval::<AB::InnerBackend>(args, device),
        Cmd::Export(args) => export::<AB::InnerBackend>(args, device),
    }
}

fn predict<B: Backend>(args: &PredictArgs, device: &B::Device) -> Result<()> {
    let PredictArgs { model, adapters, image, r#box, points, output, mask_png, image_size, dtype, .. } = args;
    if r#box.is_none() && points.is_empty() {
        bail!("give a prompt: --box x0,y0,x1,y1 and/or --point x,y,label");
    }
    // fail before any work on an output that cannot be written
    cli::check_outputs(&[("--output", Some(output.as_path())), ("--mask-png", mask_png.as_deref())])?;
    let img = load_rgb(image)?;
    let (w, h) = (img.width as f32, img.height as f32);
    let inside = |x: f32, y: f32| (0.0..=w).contains(&x) && (0.0..=h).contains(&y);
    if let Some(b) = r#box
        && !(inside(b[0], b[1]) && inside(b[2], b[3]))
    {
        bail!("--box {b:?} lies outside the image {} ({}×{} pixels)", image.display(), img.width, img.height);
    }
    if let Some((p, _)) = points.iter().find(|(p, _)| !inside(p[0], p[1])) {
        bail!("--point {p:?} lies outside the image {} ({}×{} pixels)", image.display(), img.width, img.height);
    }

    let adapters = adapters.list()?;
    let (sam, _, proc) = load::<B>(model, *dtype, *image_size, device)?;
    let sam = cli::merge_adapters(sam, &adapters, device)?;
    let px = proc.process(&img);
    let [ph, pw] = proc.pad;
    let pixel_values = Tensor::<B, 4>::from_data(TensorData::new(px.pixel_values, [1, 3, ph, pw]), device);
    let prompts = Prompts {
        points: (!points.is_empty()).then(|| {
            let xy: Vec<f32> = points.iter().flat_map(|(p, _)| proc.scale_point(px.original_size, *p)).collect();
            let labels: Vec<i64> = points.iter().map(|(_, l)| *l).collect();
            let n = points.len();
            (Tensor::from_data(TensorData::new(xy, [1, 1, n, 2]), device), Tensor::from_data(TensorData::new(labels, [1, 1, n]), device))
        }),
        boxes: r#box.map(|b| Tensor::from_data(TensorData::new(proc.scale_box(px.original_size, b).to_vec(), [1, 1, 4]), device)),
        masks: None,
    };
    let out = sam.forward(sam.get_image_embeddings(pixel_values), &prompts, true)?;
    let scores: Vec<f32> = out.iou_scores.clone().into_data().iter::<f32>().collect();
    let mut tensors = BTreeMap::new();
    tensors.insert("pred_masks".to_string(), io::HostTensor::from_tensor(out.pred_masks.clone()));
    tensors.insert("iou_scores".to_string(), io::HostTensor::from_tensor(out.iou_scores));
    io::write_safetensors(output, &tensors, Default::default())?;
    let best = scores.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
    eprintln!("wrote {} (iou_scores {scores:?}, best mask {best})", output.display());
    if let Some(png) = mask_png {
        let [_, _, m, s, s2] = out.pred_masks.dims();
        let low = out.pred_masks.reshape([1, m, s, s2]).narrow(1, best, 1);
        let mask = proc.postprocess_masks(low, px.reshaped_size, px.original_size);
        let on: Vec<u8> = mask.into_data().iter::<f32>().map(|v| if v > 0.0 { 255 } else { 0 }).collect();
        let buf = image::GrayImage::from_raw(img.width as u32, img.height as u32, on).context("mask size")?;
        let mut bytes = std::io::Cursor::new(Vec::new());
        buf.write_to(&mut bytes, image::ImageFormat::Png).context("encoding the mask PNG")?;
        io::write_atomic(png, bytes.get_ref())?;
        eprintln!("wrote {}", png.display());
    }
    Ok(())
}

fn train<AB: AutodiffBackend>(config: &TrainConfig, run: &RunArgs, peer: &Peer, device: &AB::Device) -> Result<()> {
    let (dir, out) = (model_dir(&config.model)?, &run.out);
    let reporter = cli::train_reporter(run, &config.method, config.lr_ratio, "dice", peer);
    let m = sam_seg::train::train::<AB>(config, &dir, out, &run.options(peer.clone()), device, &mut |p| reporter.report(p))?;
    reporter.finish();
    if peer.rank > 0 {
        return Ok(());
    }
    eprintln!(
        "{}: {} trainable / {} parameters; {} of {} steps; final loss {:.4}, train dice {:.3}; {} empty mask(s) skipped",
        out.display(),
        m.trainable_params,
        m.total_params,
        m.run.steps,
        m.run.total_steps,
        m.final_loss,
        m.train_dice,
        m.skipped_empty_masks.len()
    );
    Ok(())
}

/// The model of `--model` at `--image-size`, held in `--dtype`.
fn load<B: Backend>(model: &str, dtype: Option<DTypeArg>, image_size: Option<usize>, device: &B::Device) -> Result<(SamModel<B>, SamConfig, SamProcessor)> {
    let dir = model_dir(model)?;
    let dtype = DTypeArg::base(dtype, &dir)?;
    Ok(with_base_dtype(dtype, || load_sam_sized::<B>(&dir, device, image_size))?)
}

fn eval<B: Backend>(args: &EvalArgs, device: &B::Device) -> Result<()> {
    let EvalArgs { model, adapters, dataset, split, class_id, seed, test_fraction, image_size, dtype, .. } = args;
    let dataset = SegDataset::open(dataset, *seed, *test_fraction)?;
    let (sam, _, proc) = load::<B>(model, *dtype, *image_size, device)?;
    let sam = cli::merge_adapters(sam, &adapters.list()?, device)?;
    let r = cli::with_progress_bar(|progress| evaluate(&sam, &proc, &dataset, split, *class_id, device, progress))?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

fn export<B: Backend>(args: &ExportArgs, device: &B::Device) -> Result<()> {
    let ExportArgs { model, adapters, out, dtype, force, .. } = args;
    let opts = ExportOptions { dtype: DTypeArg::export(*dtype), force: *force, max_shard_bytes: None };
    let summary = export_sam::<B>(&model_dir(model)?, &adapters.list()?, &opts, out, device)?;
    cli::report_export(out, &summary, "tensors")?;
    Ok(())
}

fn main() -> Result<()> {
    lora_runtime::alloc::keep_freed_memory();
    let cli = Cli::parse();
    let (device, peer) = match &cli.command {
        Cmd::Train { run, .. } => cli::launch_train(run)?,
        Cmd::Predict(PredictArgs { device, .. }) | Cmd::Eval(EvalArgs { device, .. }) | Cmd::Export(ExportArgs { device, .. }) => {
            (device.clone(), Peer::single())
        }
    };
    let device: DeviceSpec = device.parse().context("--device")?;
    lora_runtime::dispatch!(device, run(&cli.command, &peer))
}
