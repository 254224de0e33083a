//! `sd3-gen`: Stable Diffusion 3 sampling and LoRA / Serial LoRA (+) fine-tuning of the MMDiT.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use clap::{Parser, Subcommand};
use indicatif::ProgressBar;
use lora_runtime::cli::DTypeArg;
use lora_runtime::dist::Peer;
use lora_runtime::export::{ExportOptions, WeightedAdapter, weighted_adapters};
use lora_runtime::hub::{HubOptions, resolve_model_dir};
use lora_runtime::imaging::save_png;
use lora_runtime::run::RunArgs;
use lora_runtime::weights::base_dtype_scope;
use lora_runtime::{DeviceSpec, cli};
use sd3_gen::export::{export_sd3, merge_adapters};
use sd3_gen::load::{OPTIONAL_FILES, pipeline_files};
use sd3_gen::load_transformer;
use sd3_gen::pipeline::{PromptEmbeds, SampleOptions, decode_to_rgb, denoise};
use sd3_gen::text::{T5TextEncoder, TextEncoders};
use sd3_gen::train::TrainConfig;
use sd3_gen::vae::load_vae;
use serial_lora::io::{self, HostTensor, read_safetensors};

#[derive(Parser)]
#[command(version, about = "Stable Diffusion 3 with LoRA / Serial LoRA adapters: sampling and fine-tuning")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct AdapterArgs {
    /// Adapter directory for the transformer (PEFT layout or diffusers' pytorch_lora_weights.safetensors,
    /// keys `transformer.<module>…`; context-stream keys `add_*` / `to_add_out` are recognised);
    /// repeat for several, applied in the order given: LoRA deltas add (W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ),
    /// Serial LoRA transforms compose (W (I + w₁s₁B₁A₁)(I + w₂s₂B₂A₂), PyTorch layout).
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
#[allow(clippy::large_enum_variant)] // parsed once per process
enum Cmd {
    /// Generate images (flow-matching Euler with classifier-free guidance, as diffusers'
    /// StableDiffusion3Pipeline) and decode them with the VAE.
    // a negative number is a (bad) value, named in the error, not an unknown flag
    #[command(allow_negative_numbers = true)]
    Sample(SampleArgs),
    /// A merged, full diffusers pipeline directory (`StableDiffusion3Pipeline.from_pretrained(OUT)`
    /// loads it without adapter code): transformer/ rewritten with the adapters folded in
    /// (merged in f64; LoRA W + s·B·A, Serial LoRA W (I + s·B·A); sharded with an index above
    /// 10 GB), every other component copied. Written into a temporary directory renamed into place.
    Export(ExportArgs),
    /// FID of two folders of images (or a folder and a statistics file), as
    /// `python -m pytorch_fid DIR_A DIR_B`: JSON `{"fid", "images_a", "images_b"}` on stdout.
    /// With --save-stats OUT and one folder: its statistics (the --real-stats format), as
    /// pytorch-fid's --save-stats.
    Fid {
        /// Folders of images (bmp, jpg, jpeg, pgm, png, ppm, tif, tiff, webp; not recursive) or
        /// statistics files (safetensors `mu`, `sigma`, as `eval --real-stats` writes).
        #[arg(required = true, num_args = 1..=2)]
        paths: Vec<PathBuf>,
        /// pytorch-fid's Inception weights as safetensors (a file, a directory holding
        /// pt_inception-2015-12-05-6726825d.safetensors, or a hub id with that file).
        #[arg(long)]
        inception: String,
        /// Images per Inception forward pass.
        #[arg(long, default_value_t = 50)]
        batch: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Write the statistics of the one folder given to this file instead.
        #[arg(long)]
        save_stats: Option<PathBuf>,
    },
    /// Generate images for the prompts of a dataset split and report FID (pytorch-fid's
    /// Inception-v3) against the split's real images and CLIP-Score against the prompts (JSON).
    Eval {
        /// Hub id or local diffusers-layout directory of the SD3 pipeline.
        #[arg(long)]
        model: String,
        #[command(flatten)]
        adapters: AdapterArgs,
        /// Captioned image folder (metadata.jsonl or same-stem .txt captions; split.json or a seeded split).
        #[arg(long)]
        dataset: PathBuf,
        /// `test` or `train`.
        #[arg(long, default_value = "test")]
        split: String,
        /// Seed of the split when the folder has no split.json (the one training used).
        #[arg(long, default_value_t = sd3_gen::data::DEFAULT_SPLIT_SEED)]
        split_seed: u64,
        /// Held-out share when the folder has no split.json (the one training used).
        #[arg(long, default_value_t = sd3_gen::data::DEFAULT_TEST_FRACTION)]
        test_fraction: f64,
        /// Images to generate: the first N prompts of the split (default: all of them).
        #[arg(long)]
        num_images: Option<usize>,
        /// pytorch-fid's Inception weights as safetensors (a file, a directory holding
        /// pt_inception-2015-12-05-6726825d.safetensors, or a hub id with that file).
        #[arg(long)]
        inception: String,
        /// FID statistics of the real images (safetensors `mu`, `sigma`): read if the file
        /// exists, else computed from the split's images and written there.
        #[arg(long)]
        real_stats: Option<PathBuf>,
        /// CLIP model for CLIP-Score (hub id or local HF directory).
        #[arg(long, default_value = "openai/clip-vit-large-patch14")]
        clip_model: String,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Without the T5-XXL encoder (text_encoder_3): zeros in its place, as diffusers does with
        /// text_encoder_3=None (also what happens when the model directory has no text_encoder_3).
        #[arg(long)]
        no_t5: bool,
        #[arg(long, default_value_t = 256)]
        max_sequence_length: usize,
        /// Negative prompt (default "").
        #[arg(long, default_value = "")]
        negative: String,
        #[arg(long, default_value_t = 28)]
        steps: usize,
        #[arg(long, default_value_t = 7.0)]
        guidance: f32,
        /// Image i starts from the noise of seed + i (independent of --batch).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        height: Option<usize>,
        #[arg(long)]
        width: Option<usize>,
        /// Prompts per denoising batch.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Keep the generated images here (NNNNN.png); images already there are reused, so an
        /// interrupted eval resumes.
        #[arg(long)]
        out_images: Option<PathBuf>,
    },
    /// Fine-tune the MMDiT on captioned images (diffusers' train_dreambooth_lora_sd3.py recipe).
    /// Writes train_config.json, cache/ (latents, prompt embeddings), checkpoint/, samples/,
    /// metrics.json and the adapter into --out (LoRA: pytorch_lora_weights.safetensors, diffusers'
    /// format; Serial LoRA: adapter_config.json + adapter_model.safetensors).
    Train {
        #[command(flatten)]
        config: Box<TrainConfig>,
        #[command(flatten)]
        run: RunArgs,
    },
}

#[derive(clap::Args)]
struct SampleArgs {
    /// Hub id (e.g. stabilityai/stable-diffusion-3-medium-diffusers) or local diffusers-layout directory.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    adapters: AdapterArgs,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision the pipeline's models are held in: f32 | bf16 | f16 | auto (the checkpoint's
    /// own); computed in f32. Default f32.
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Text prompt(s), encoded with the CLIP-L/G and T5 text encoders of --model (repeatable: a batch).
    #[arg(long, conflicts_with = "prompt_embeds")]
    prompt: Vec<String>,
    /// A file with one prompt per line (added to --prompt; empty lines skipped).
    #[arg(long, conflicts_with = "prompt_embeds")]
    prompt_file: Option<PathBuf>,
    /// Write the prompt embeddings computed from --prompt to this file (the --prompt-embeds
    /// format), to reuse them without the text encoders.
    #[arg(long)]
    save_prompt_embeds: Option<PathBuf>,
    /// Negative prompt (default "").
    #[arg(long, default_value = "")]
    negative: String,
    /// Without the T5-XXL encoder (text_encoder_3): zeros in its place, as diffusers does with
    /// text_encoder_3=None (also what happens when the model directory has no text_encoder_3).
    #[arg(long)]
    no_t5: bool,
    /// T5 tokens of the prompt embeddings (prompt padded/truncated to it; zeros with --no-t5).
    #[arg(long, default_value_t = 256)]
    max_sequence_length: usize,
    /// safetensors with `prompt_embeds`, `pooled_prompt_embeds`, `negative_prompt_embeds`,
    /// `negative_pooled_prompt_embeds` (the diffusers pipeline's names and shapes).
    #[arg(long)]
    prompt_embeds: Option<PathBuf>,
    /// safetensors with `latents` [b, channels, h, w]: the initial noise.
    #[arg(long)]
    latents: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 28)]
    steps: usize,
    #[arg(long, default_value_t = 7.0)]
    guidance: f32,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long)]
    width: Option<usize>,
    /// Also write the final latents (key `latents`).
    #[arg(long)]
    output_latents: Option<PathBuf>,
    /// PNG path (with several images: NAME-0.png, NAME-1.png, …).
    #[arg(long)]
    output: PathBuf,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Hub id or local diffusers-layout directory of the SD3 pipeline.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    adapters: AdapterArgs,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output directory (refused if it exists, unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Output precision of the transformer's float tensors: f32 | bf16 | f16 | auto (default:
    /// the checkpoint's own).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Replace an existing --out.
    #[arg(long)]
    force: bool,
}

/// The tensor `key` of `file`, which must exist and have `D` dimensions.
fn take<B: Backend, const D: usize>(t: &mut BTreeMap<String, HostTensor>, file: &Path, key: &str, device: &B::Device) -> Result<Tensor<B, D>> {
    let h = t.remove(key).with_context(|| format!("{}: no tensor `{key}`", file.display()))?;
    if h.shape.len() != D {
        bail!("{}: `{key}` has shape {:?}, expected {D} dimensions", file.display(), h.shape);
    }
    Ok(h.to_tensor(device))
}

#[path = "sd3-gen/eval.rs"]
mod eval;
#[path = "sd3-gen/fid.rs"]
mod fid;

fn scheduler_shift(dir: &Path) -> Result<f64> {
    Ok(sd3_gen::train::scheduler_config(dir)?.0)
}

fn run<AB: AutodiffBackend>(device: &AB::Device, cmd: &Cmd, peer: &Peer) -> Result<()> {
    match cmd {
        Cmd::Sample(args) => sample::<AB::InnerBackend>(args, device),
        Cmd::Export(args) => export::<AB::InnerBackend>(args, device),
        Cmd::Fid { .. } => fid::run::<AB::InnerBackend>(device, cmd),
        Cmd::Eval { .. } => eval::run::<AB::InnerBackend>(device, cmd),
        Cmd::Train { config, run } => train::<AB>(config, run, peer, device),
    }
}

fn sample<B: Backend>(args: &SampleArgs, device: &B::Device) -> Result<()> {
    let SampleArgs {
        model,
        adapters,
        prompt,
        prompt_file,
        save_prompt_embeds,
        negative,
        no_t5,
        max_sequence_length,
        prompt_embeds,
        latents,
        seed,
        steps,
        guidance,
        height,
        width,
        output_latents,
        output,
        dtype,
        ..
    } = args;
    let mut prompt = prompt.clone();
    if let Some(f) = prompt_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("--prompt-file {}", f.display()))?;
        prompt.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from));
        if prompt.is_empty() {
            bail!("--prompt-file {}: no prompt in it", f.display());
        }
    }
    if prompt_embeds.is_none() && prompt.is_empty() {
        bail!("give --prompt TEXT or --prompt-embeds FILE");
    }
    cli::check_outputs(&[("--output", Some(output.as_path())), ("--output-latents", output_latents.as_deref())])?;
    let dir = resolve_model_dir(model, &pipeline_files(!prompt.is_empty(), !prompt.is_empty() && !no_t5), &OPTIONAL_FILES, &HubOptions::from_env())
        .context("--model")?;
    let adapters = adapters.list()?;
    let _dtype = base_dtype_scope(DTypeArg::base(*dtype, &dir.join("transformer"))?);
    let (mmdit, cfg) = load_transformer::<B>(&dir, device)?;
    // a LoRA with add_* keys (diffusers' --lora_layers incl. the context stream) adapts both streams
    let mmdit = merge_adapters(mmdit, &adapters, device)?;
    let (vae, vae_cfg) = load_vae::<B>(&dir, device)?;
    let factor = 1usize << (vae_cfg.block_out_channels.len() - 1);

    let (prompt_embeds, pooled, negative): (Tensor<B, 3>, Tensor<B, 2>, _) = match prompt_embeds {
        Some(file) => {
            let (mut t, _) = read_safetensors(file)?;
            let pe = take(&mut t, file, "prompt_embeds", device)?;
            let pp = take(&mut t, file, "pooled_prompt_embeds", device)?;
            let neg = if *guidance > 1.0 {
                Some((take(&mut t, file, "negative_prompt_embeds", device)?, take(&mut t, file, "negative_pooled_prompt_embeds", device)?))
            } else {
                None
            };
            (pe, pp, neg)
        }
        None => {
            let enc = TextEncoders::<B>::load(&dir, device)?;
            let t5 = if *no_t5 {
                None
            } else if dir.join("text_encoder_3").is_dir() {
                Some(T5TextEncoder::<B>::load(&dir, device)?)
            } else {
                eprintln!("{}: no text_encoder_3: zeros in place of the T5 tokens (as diffusers with text_encoder_3=None)", dir.display());
                None
            };
            let jd = cfg.joint_attention_dim;
            let (pe, pp) = enc.encode_with_t5(&prompt, jd, t5.as_ref(), *max_sequence_length, device)?;
            let (ne, np) = enc.encode_with_t5(&vec![negative.clone(); prompt.len()], jd, t5.as_ref(), *max_sequence_length, device)?;
            if let Some(f) = save_prompt_embeds {
                let t = |name: &str, h: HostTensor| (name.to_string(), h);
                let all = BTreeMap::from([
                    t("prompt_embeds", HostTensor::from_tensor(pe.clone())),
                    t("pooled_prompt_embeds", HostTensor::from_tensor(pp.clone())),
                    t("negative_prompt_embeds", HostTensor::from_tensor(ne.clone())),
                    t("negative_pooled_prompt_embeds", HostTensor::from_tensor(np.clone())),
                ]);
                io::write_safetensors(f, &all, Default::default())?;
                eprintln!("wrote {}", f.display());
            }
            (pe, pp, (*guidance > 1.0).then_some((ne, np)))
        }
    };
    let b = prompt_embeds.dims()[0];
    let (h, w) = (height.unwrap_or(cfg.sample_size * factor), width.unwrap_or(cfg.sample_size * factor));
    let multiple = factor * cfg.patch_size;
    if h == 0 || w == 0 || h % multiple != 0 || w % multiple != 0 {
        bail!("--height {h} / --width {w} must be positive multiples of {multiple} (VAE factor {factor} × patch size {})", cfg.patch_size);
    }
    let want = [b, cfg.in_channels, h / factor, w / factor];
    let noise = match latents {
        Some(f) => {
            let (mut t, _) = read_safetensors(f)?;
            let l: Tensor<B, 4> = take(&mut t, f, "latents", device)?;
            if l.dims() != want {
                bail!("{}: `latents` has shape {:?}; this model at {h}×{w} with {b} prompt(s) needs {want:?}", f.display(), l.dims());
            }
            l
        }
        None => serial_lora::rng::normal(want, 1.0, &mut serial_lora::rng::rng(*seed), device),
    };
    let cond = PromptEmbeds { prompt_embeds, pooled_prompt_embeds: pooled, negative };
    let opts = SampleOptions { steps: *steps, guidance: *guidance, shift: scheduler_shift(&dir)? };
    let bar = ProgressBar::new(*steps as u64);
    let out = denoise(&mmdit, noise, &cond, &opts, &mut |i, _| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    if let Some(f) = output_latents {
        io::write_safetensors(f, &BTreeMap::from([("latents".to_string(), HostTensor::from_tensor(out.clone()))]), Default::default())?;
        eprintln!("wrote {}", f.display());
    }
    let images = decode_to_rgb(&vae, &vae_cfg, out);
    let n = images.len();
    for (i, img) in images.iter().enumerate() {
        let path =
            if n == 1 { output.clone() } else { output.with_file_name(format!("{}-{i}.png", output.file_stem().and_then(|s| s.to_str()).unwrap_or("image"))) };
        save_png(img, &path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn export<B: Backend>(args: &ExportArgs, device: &B::Device) -> Result<()> {
    let ExportArgs { model, adapters, out, dtype, force, .. } = args;
    let dir = resolve_model_dir(model, &pipeline_files(true, false), &OPTIONAL_FILES, &HubOptions::from_env()).context("--model")?;
    let opts = ExportOptions { dtype: DTypeArg::export(*dtype), force: *force, max_shard_bytes: None };
    let summary = export_sd3::<B>(&dir, &adapters.list()?, &opts, out, device)?;
    cli::report_export(out, &summary, "transformer tensors")?;
    Ok(())
}

fn train<AB: AutodiffBackend>(config: &TrainConfig, run: &RunArgs, peer: &Peer, device: &AB::Device) -> Result<()> {
    let out = &run.out;
    let reporter = cli::train_reporter(run, &config.method, config.lr_ratio, "mse", peer);
    let m = sd3_gen::train::train::<AB>(config, out, &run.options(peer.clone()), device, &mut |p| reporter.report(p))?;
    reporter.finish();
    if peer.rank > 0 {
        return Ok(());
    }
    eprintln!(
        "{}: {} trainable / {} parameters; {} of {} steps; final loss {:.4}{}",
        out.display(),
        m.trainable_params,
        m.total_params,
        m.run.steps,
        m.run.total_steps,
        m.final_loss,
        m.adapter.as_ref().map_or(String::new(), |a| format!("; adapter {}", a.display()))
    );
    Ok(())
}

fn main() -> Result<()> {
    lora_runtime::alloc::keep_freed_memory();
    let cli = Cli::parse();
    let (device, peer) = match &cli.command {
        Cmd::Train { run, .. } => cli::launch_train(run)?,
        Cmd::Sample(SampleArgs { device, .. }) | Cmd::Export(ExportArgs { device, .. }) | Cmd::Eval { device, .. } | Cmd::Fid { device, .. } => {
            (device.clone(), Peer::single())
        }
    };
    let device: DeviceSpec = device.parse().context("--device")?;
    lora_runtime::dispatch!(device, run(&cli.command, &peer))
}
