//! `sd3-gen fid DIR_A DIR_B`: the FID of two folders of images (or a folder and saved
//! statistics), as `python -m pytorch_fid DIR_A DIR_B` computes it: the images of each folder
//! with pytorch-fid's extensions (lower case, not recursive), PIL `convert('RGB')` decoding,
//! Inception-v3 pool3 features, f64 statistics and the Fréchet distance. `--save-stats OUT` with
//! one folder writes its statistics (the `--real-stats` format) as pytorch-fid's `--save-stats`.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use indicatif::ProgressBar;
use sd3_gen::metrics::inception::POOL3_DIM;
use sd3_gen::metrics::{
    FID_EPS, FidInceptionV3, FidStats, fid_from_features, fid_stats_vs_features, frechet_distance, inception_features_batched, load_fid_inception, load_rgb_fid,
};

use super::Cmd;
use super::eval::inception_path;

/// pytorch-fid's `IMAGE_EXTENSIONS` (matched as written: lower case).
const IMAGE_EXTENSIONS: [&str; 9] = ["bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"];

/// The image files of a folder as pytorch-fid lists them, sorted.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let p = e.with_context(|| format!("{}", dir.display()))?.path();
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if p.is_file() && IMAGE_EXTENSIONS.contains(&ext) {
            files.push(p);
        }
    }
    files.sort();
    if files.len() < 2 {
        bail!("{}: {} image(s) with pytorch-fid's extensions ({}); FID needs at least 2", dir.display(), files.len(), IMAGE_EXTENSIONS.join(", "));
    }
    Ok(files)
}

/// A folder's pool3 features, or a statistics file.
enum Side {
    Features(Vec<f32>, usize),
    Stats(FidStats),
}

impl Side {
    fn count(&self) -> usize {
        match self {
            Side::Features(_, n) => *n,
            Side::Stats(s) => s.n,
        }
    }
}

fn side<B: Backend>(path: &Path, model: &FidInceptionV3<B>, batch: usize, device: &B::Device) -> Result<Side> {
    if path.is_file() {
        let s = FidStats::load(path)?;
        if s.mu.len() != POOL3_DIM {
            bail!("{}: statistics of {} dimensions; pool3 has {POOL3_DIM}", path.display(), s.mu.len());
        }
        return Ok(Side::Stats(s));
    }
    if !path.is_dir() {
        bail!("{}: no such folder or statistics file", path.display());
    }
    let files = image_files(path)?;
    let bar = ProgressBar::new(files.len() as u64).with_message(format!("Inception features of {}", path.display()));
    let mut load = |i: usize| load_rgb_fid(&files[i]);
    let f = inception_features_batched(model, files.len(), &mut load, batch, device, &mut |i| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    Ok(Side::Features(f, files.len()))
}

pub fn run<B: Backend>(device: &B::Device, cmd: &Cmd) -> Result<()> {
    let Cmd::Fid { paths, inception, batch, save_stats, .. } = cmd else {
        bail!("not a fid command");
    };
    match (paths.len(), save_stats) {
        (1, Some(_)) | (2, None) => {}
        (_, Some(_)) => bail!("--save-stats takes one folder (got {})", paths.len()),
        (n, None) => bail!("give two paths (folders of images or a folder and a statistics file), got {n}"),
    }
    if *batch == 0 {
        bail!("--batch 0: must be at least 1");
    }
    for p in paths {
        if !p.exists() {
            bail!("{}: no such folder or statistics file", p.display());
        }
    }
    let model = load_fid_inception::<B>(&inception_path(inception)?, device)?;
    let a = side(&paths[0], &model, *batch, device)?;
    if let Some(out) = save_stats {
        let Side::Features(f, n) = &a else { bail!("--save-stats: {} is a statistics file already", paths[0].display()) };
        FidStats::from_features(f, *n, POOL3_DIM)?.save(out)?;
        eprintln!("wrote {}", out.display());
        println!("{}", serde_json::json!({"images_a": n, "stats": out}));
        return Ok(());
    }
    let b = side(&paths[1], &model, *batch, device)?;
    let fid = match (&a, &b) {
        (Side::Features(fa, na), Side::Features(fb, nb)) => fid_from_features(fa, *na, fb, *nb, POOL3_DIM)?,
        (Side::Stats(s), Side::Features(f, n)) | (Side::Features(f, n), Side::Stats(s)) => fid_stats_vs_features(s, f, *n, POOL3_DIM)?,
        (Side::Stats(sa), Side::Stats(sb)) => frechet_distance(sa, sb, FID_EPS)?,
    };
    println!("{}", serde_json::json!({"fid": fid.value, "images_a": a.count(), "images_b": b.count()}));
    Ok(())
}
