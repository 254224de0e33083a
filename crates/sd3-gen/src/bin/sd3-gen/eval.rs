//! `sd3-gen eval`: generate an image for each prompt of a dataset split (CLIP-L/G + T5 text encoders →
//! flow-matching denoise with guidance → VAE decode, as `sample`), then FID against the split's
//! real images (pytorch-fid's Inception-v3 pool3, f64 statistics) and CLIP-Score against the
//! prompts; one JSON object on stdout.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use indicatif::ProgressBar;
use lora_runtime::hub::{HubOptions, resolve_model_dir};
use lora_runtime::imaging::{RgbImage, load_rgb, save_png};
use sd3_gen::data::{CaptionDataset, CaptionedImage, load_image};
use sd3_gen::load::{OPTIONAL_FILES, pipeline_files};
use sd3_gen::load_transformer;
use sd3_gen::metrics::inception::POOL3_DIM;
use sd3_gen::metrics::{
    ClipScore, ClipScorer, FidStats, fid_from_features, fid_stats_vs_features, inception_features, inception_features_from, load_fid_inception, load_rgb_fid,
};
use sd3_gen::pipeline::{PromptEmbeds, SampleOptions, decode_to_rgb, denoise};
use sd3_gen::text::{T5TextEncoder, TextEncoders};
use sd3_gen::vae::load_vae;

use super::{Cmd, scheduler_shift};

/// File names pytorch-fid's converted weights are looked up under (directory or hub repo).
const INCEPTION_FILES: &[&str] = &["pt_inception-2015-12-05-6726825d.safetensors", "pt_inception-2015-12-05.safetensors", "model.safetensors"];

pub(crate) fn inception_path(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if p.is_dir() {
        return INCEPTION_FILES
            .iter()
            .map(|f| p.join(f))
            .find(|f| f.is_file())
            .with_context(|| format!("--inception {spec}: none of {INCEPTION_FILES:?} in this directory"));
    }
    let dir = resolve_model_dir(spec, &[INCEPTION_FILES], &[], &HubOptions::from_env()).with_context(|| format!("--inception {spec}"))?;
    Ok(INCEPTION_FILES.iter().map(|f| dir.join(f)).find(|f| f.is_file()).unwrap_or_else(|| dir.join(INCEPTION_FILES[0])))
}

/// How the images are generated.
struct Generation<'a> {
    dir: &'a Path,
    adapters: &'a [lora_runtime::export::WeightedAdapter],
    negative: &'a str,
    /// Encode with text_encoder_3 (else zeros in place of the T5 tokens).
    t5: bool,
    opts: SampleOptions,
    seed: u64,
    height: Option<usize>,
    width: Option<usize>,
    batch: usize,
    t5_tokens: usize,
    out_images: Option<&'a PathBuf>,
}

/// Generates (or, with `--out-images`, reuses) one image per prompt.
fn generate<B: Backend>(g: &Generation, prompts: &[String], device: &B::Device) -> Result<Vec<RgbImage>> {
    let Generation { dir, adapters, negative, t5, ref opts, seed, height, width, batch, t5_tokens, out_images } = *g;
    let path_of = |i: usize| out_images.map(|d| d.join(format!("{i:05}.png")));
    let mut images: Vec<Option<RgbImage>> = (0..prompts.len()).map(|i| path_of(i).filter(|p| p.is_file()).and_then(|p| load_rgb(&p).ok())).collect();
    let reused = images.iter().filter(|i| i.is_some()).count();
    if reused > 0 {
        eprintln!("reusing {reused} generated image(s) from {}", out_images.map(|d| d.display().to_string()).unwrap_or_default());
    }
    let todo: Vec<usize> = (0..prompts.len()).filter(|&i| images[i].is_none()).collect();
    if todo.is_empty() {
        return Ok(images.into_iter().flatten().collect());
    }
    let (mmdit, cfg) = load_transformer::<B>(dir, device)?;
    // as `sample`: an adapter with add_* keys adapts the context stream too
    let mmdit = sd3_gen::export::merge_adapters(mmdit, adapters, device)?;
    let (vae, vae_cfg) = load_vae::<B>(dir, device)?;
    let enc = TextEncoders::<B>::load(dir, device)?;
    let t5 = if !t5 {
        None
    } else if dir.join("text_encoder_3").is_dir() {
        Some(T5TextEncoder::<B>::load(dir, device)?)
    } else {
        eprintln!("{}: no text_encoder_3: zeros in place of the T5 tokens (as diffusers with text_encoder_3=None)", dir.display());
        None
    };
    let factor = 1usize << (vae_cfg.block_out_channels.len() - 1);
    let (h, w) = (height.unwrap_or(cfg.sample_size * factor), width.unwrap_or(cfg.sample_size * factor));
    let multiple = factor * cfg.patch_size;
    if h % multiple != 0 || w % multiple != 0 {
        bail!("--height {h} / --width {w} must be multiples of {multiple} (VAE factor {factor} × patch size {})", cfg.patch_size);
    }
    let bar = ProgressBar::new(todo.len() as u64).with_message("generating");
    for chunk in todo.chunks(batch.max(1)) {
        let texts: Vec<String> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let jd = cfg.joint_attention_dim;
        let (pe, pp) = enc.encode_with_t5(&texts, jd, t5.as_ref(), t5_tokens, device)?;
        let negative =
            if opts.guidance > 1.0 { Some(enc.encode_with_t5(&vec![negative.to_string(); texts.len()], jd, t5.as_ref(), t5_tokens, device)?) } else { None };
        let noise: Vec<Tensor<B, 4>> = chunk
            .iter()
            .map(|&i| {
                let mut rng = serial_lora::rng::rng(seed.wrapping_add(i as u64));
                serial_lora::rng::normal([1, cfg.in_channels, h / factor, w / factor], 1.0, &mut rng, device)
            })
            .collect();
        let cond = PromptEmbeds { prompt_embeds: pe, pooled_prompt_embeds: pp, negative };
        let out = denoise(&mmdit, Tensor::cat(noise, 0), &cond, opts, &mut |_, _| {})?;
        for (&i, img) in chunk.iter().zip(decode_to_rgb(&vae, &vae_cfg, out)) {
            if let Some(p) = path_of(i) {
                save_png(&img, &p)?;
            }
            images[i] = Some(img);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(images.into_iter().flatten().collect())
}

pub fn run<B: Backend>(device: &B::Device, cmd: &Cmd) -> Result<()> {
    let Cmd::Eval {
        model,
        adapters,
        dataset,
        split,
        split_seed,
        test_fraction,
        num_images,
        inception,
        real_stats,
        clip_model,
        no_t5,
        max_sequence_length,
        negative,
        steps,
        guidance,
        seed,
        height,
        width,
        batch,
        out_images,
        ..
    } = cmd
    else {
        bail!("not an eval command");
    };
    let adapters = adapters.list()?;
    let data = CaptionDataset::open(dataset, *split_seed, *test_fraction)?;
    let items: &[CaptionedImage] = match split.as_str() {
        "test" => &data.test,
        "train" => &data.train,
        other => bail!("--split {other}: expected `test` or `train`"),
    };
    let n = num_images.unwrap_or(items.len());
    if n < 2 || n > items.len() {
        bail!("--num-images {n}: the `{split}` split of {} has {} image(s); FID needs 2 to {} (one per prompt)", dataset.display(), items.len(), items.len());
    }
    if let Some(d) = out_images {
        std::fs::create_dir_all(d).with_context(|| format!("--out-images {}", d.display()))?;
    }
    // fail on bad real images and weights before the expensive generation; FID decodes as
    // pytorch-fid (alpha dropped), CLIP as its image processor (alpha composited on white)
    // (the images of the evaluated prompts stay in memory for CLIP; the rest are only checked here
    // and decoded again, batch by batch, for their Inception features)
    let real: Vec<RgbImage> = items[..n].iter().map(load_image).collect::<Result<_, _>>()?;
    for c in &items[n..] {
        load_image(c)?;
    }
    let stored = match real_stats {
        Some(p) if p.is_file() => {
            let s = FidStats::load(p)?;
            if s.mu.len() != POOL3_DIM {
                bail!("--real-stats {}: {} dimensions, pool3 has {POOL3_DIM}", p.display(), s.mu.len());
            }
            eprintln!("FID statistics of the real images from {} ({} images)", p.display(), s.n);
            Some(s)
        }
        _ => None,
    };
    let real_count = if stored.is_some() { 0 } else { items.len() };
    let inception_file = inception_path(inception)?;
    let inception_model = load_fid_inception::<B>(&inception_file, device)?;
    let clip_dir = ClipScorer::<B>::resolve(clip_model).with_context(|| format!("--clip-model {clip_model}"))?;

    let dir = resolve_model_dir(model, &pipeline_files(true, !no_t5), &OPTIONAL_FILES, &HubOptions::from_env()).context("--model")?;
    let prompts: Vec<String> = items[..n].iter().map(|c| c.text.clone()).collect();
    let generation = Generation {
        dir: &dir,
        adapters: &adapters,
        negative,
        t5: !no_t5,
        opts: SampleOptions { steps: *steps, guidance: *guidance, shift: scheduler_shift(&dir)? },
        seed: *seed,
        height: *height,
        width: *width,
        batch: *batch,
        t5_tokens: *max_sequence_length,
        out_images: out_images.as_ref(),
    };
    let generated = generate::<B>(&generation, &prompts, device)?;

    let bar = ProgressBar::new((generated.len() + real_count) as u64).with_message("Inception features");
    let fg = inception_features(&inception_model, &generated, device, &mut |i| bar.set_position(i as u64));
    let mut load = |i: usize| load_rgb_fid(&items[i].image);
    let fr = inception_features_from(&inception_model, real_count, &mut load, device, &mut |i| bar.set_position((generated.len() + i) as u64))?;
    bar.finish_and_clear();
    drop(inception_model);
    let (fid, real_count) = match (stored, real_stats) {
        (Some(s), _) => (fid_stats_vs_features(&s, &fg, generated.len(), POOL3_DIM)?, s.n),
        (None, Some(p)) => {
            let s = FidStats::from_features(&fr, real_count, POOL3_DIM)?;
            s.save(p)?;
            eprintln!("wrote {}", p.display());
            (fid_stats_vs_features(&s, &fg, generated.len(), POOL3_DIM)?, s.n)
        }
        (None, None) => (fid_from_features(&fg, generated.len(), &fr, real_count, POOL3_DIM)?, real_count),
    };

    let scorer = ClipScorer::<B>::load(&clip_dir, device)?;
    let score = ClipScore::from_cosines(&scorer.pair_cosines(&generated, &prompts, device)?)?;
    let similarity = scorer.image_cosines(&generated, &real, device)?;
    let out = serde_json::json!({
        "split": split,
        "images": generated.len(),
        "real_images": real_count,
        "fid": fid.value,
        "fid_eps_retry": fid.eps_retry,
        "clip_score": score.clip_score,
        "clip_score_100": score.clip_score_100,
        "clip_image_similarity": similarity.iter().sum::<f64>() / similarity.len() as f64,
        "clip_model": clip_model,
        "inception": inception_file,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
    });
    println!("{out}");
    Ok(())
}
