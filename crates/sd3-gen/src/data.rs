//! Captioned image folders for SD3 fine-tuning and evaluation: HF `imagefolder` style
//! `metadata.jsonl` (one `{"file_name": …, "text": …}` object per line, paths relative to the
//! folder) or, without it, every image of the folder with a same-stem `.txt` caption next to it.
//! Splits from `split.json` (`{"train": [names], "test": [names]}`, names as `file_name` or
//! file stems), else a seeded split with a test fraction (as `sam-seg`'s data module);
//! `--fraction` takes a seeded subset of a split. Style sets whose prompt is the title
//! (ArtBench) are arranged by writing the titles as the `text` of `metadata.jsonl` (README).
//!
//! Upstream: the dataset handling of diffusers' `examples/dreambooth/train_dreambooth_lora_sd3.py`
//! (v0.42.1: `--dataset_name` / `--instance_data_dir` with `--caption_column`), and
//! `datasets`' `imagefolder` builder for the `metadata.jsonl` layout.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lora_runtime::imaging::{self, RgbImage};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::error::{Result, Sd3Error};

/// Image file extensions recognised in a `.txt`-caption folder.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"];
/// Name of the captions file of the `imagefolder` layout.
pub const METADATA_FILE: &str = "metadata.jsonl";
/// Name of the optional split file.
pub const SPLIT_FILE: &str = "split.json";
/// Seed of the split when the folder has no `split.json` (`--split-seed`; train and eval must
/// use the same one to keep the test images out of training).
pub const DEFAULT_SPLIT_SEED: u64 = 0;
/// Share of the images held out as `test` when the folder has no `split.json` (`--test-fraction`).
pub const DEFAULT_TEST_FRACTION: f64 = 0.1;

/// One training / test example: an image file and its prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptionedImage {
    pub image: PathBuf,
    pub text: String,
}

/// A captioned image folder with its `train` and `test` splits (file order of `metadata.jsonl`
/// or sorted by file name, then split).
#[derive(Clone, Debug)]
pub struct CaptionDataset {
    pub root: PathBuf,
    pub train: Vec<CaptionedImage>,
    pub test: Vec<CaptionedImage>,
}

fn bad(path: &Path, message: impl Into<String>) -> Sd3Error {
    Sd3Error::Dataset { path: path.to_path_buf(), message: message.into() }
}

#[derive(serde::Deserialize)]
struct MetadataLine {
    file_name: String,
    text: String,
}

/// `(name, example)` pairs from `metadata.jsonl`; names are the `file_name` values.
fn read_metadata(dir: &Path, file: &Path) -> Result<Vec<(String, CaptionedImage)>> {
    let text = std::fs::read_to_string(file).map_err(|e| Sd3Error::Io { path: file.into(), source: e })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let m: MetadataLine =
            serial_lora::parse::json(line).map_err(|e| bad(file, format!("line {}: expected {{\"file_name\": \"...\", \"text\": \"...\"}}: {e}", i + 1)))?;
        let image = serial_lora::parse::contained_path(dir, &m.file_name).map_err(|e| bad(file, format!("line {}: file_name {e}", i + 1)))?;
        if !image.is_file() {
            return Err(bad(file, format!("line {}: image `{}` not found ({})", i + 1, m.file_name, image.display())));
        }
        out.push((m.file_name, CaptionedImage { image, text: m.text }));
    }
    Ok(out)
}

/// `(file name, example)` pairs from images with same-stem `.txt` captions, sorted by name.
fn read_txt_captions(dir: &Path) -> Result<Vec<(String, CaptionedImage)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Sd3Error::Io { path: dir.into(), source: e })?;
    let mut images: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())))
        .collect();
    images.sort();
    let mut out = Vec::with_capacity(images.len());
    for image in images {
        let caption = image.with_extension("txt");
        if !caption.is_file() {
            return Err(bad(&image, format!("caption missing: no {} (and no {METADATA_FILE} in the folder)", caption.display())));
        }
        let text = std::fs::read_to_string(&caption).map_err(|e| Sd3Error::Io { path: caption.clone(), source: e })?;
        let name = image.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        out.push((name, CaptionedImage { image, text: text.trim().to_string() }));
    }
    Ok(out)
}

impl CaptionDataset {
    /// Reads `dir` (`metadata.jsonl`, else `.txt` captions). Splits from `dir/split.json`, else
    /// a seeded shuffle with `round(n · test_fraction)` examples in `test` (at least one left
    /// for `train`). Every caption must be non-empty and every listed image must exist.
    pub fn open(dir: &Path, seed: u64, test_fraction: f64) -> Result<Self> {
        if !dir.is_dir() {
            return Err(bad(dir, "dataset folder not found"));
        }
        if !(0.0..1.0).contains(&test_fraction) {
            return Err(bad(dir, format!("test fraction {test_fraction} must be in [0, 1)")));
        }
        let meta = dir.join(METADATA_FILE);
        let items = if meta.is_file() { read_metadata(dir, &meta)? } else { read_txt_captions(dir)? };
        if items.is_empty() {
            return Err(bad(dir, format!("no captioned images (expected {METADATA_FILE} or images with same-stem .txt captions)")));
        }
        if let Some((name, _)) = items.iter().find(|(_, c)| c.text.trim().is_empty()) {
            return Err(bad(dir, format!("caption missing: empty caption for `{name}`")));
        }
        let split_file = dir.join(SPLIT_FILE);
        let (train, test) = if split_file.is_file() {
            let text = std::fs::read_to_string(&split_file).map_err(|e| Sd3Error::Io { path: split_file.clone(), source: e })?;
            let splits: BTreeMap<String, Vec<String>> =
                serial_lora::parse::json(&text).map_err(|e| bad(&split_file, format!("expected {{\"train\": [names], \"test\": [names]}}: {e}")))?;
            let lookup = |name: &str| -> Result<CaptionedImage> {
                let stem_of = |n: &str| Path::new(n).file_stem().and_then(|s| s.to_str()).map(str::to_string);
                items
                    .iter()
                    .find(|(n, _)| n == name)
                    .or_else(|| items.iter().find(|(n, _)| stem_of(n).as_deref() == Some(name)))
                    .map(|(_, c)| c.clone())
                    .ok_or_else(|| bad(&split_file, format!("`{name}` is not a captioned image of the folder")))
            };
            let get = |k: &str| -> Result<Vec<CaptionedImage>> { splits.get(k).map_or(Ok(Vec::new()), |names| names.iter().map(|n| lookup(n)).collect()) };
            (get("train")?, get("test")?)
        } else {
            let mut all: Vec<CaptionedImage> = items.into_iter().map(|(_, c)| c).collect();
            all.shuffle(&mut StdRng::seed_from_u64(seed));
            let n_test = ((all.len() as f64 * test_fraction).round() as usize).min(all.len().saturating_sub(1));
            let train = all.split_off(n_test);
            (train, all)
        };
        Ok(Self { root: dir.to_path_buf(), train, test })
    }

    /// A seeded subset of `train` of `ceil(n · fraction)` examples (at least one), for
    /// `--fraction`; the whole split at 1.
    pub fn train_fraction(&self, fraction: f64, seed: u64) -> Result<Vec<CaptionedImage>> {
        if self.train.is_empty() {
            return Err(bad(&self.root, "the `train` split is empty"));
        }
        fraction_of(&self.train, fraction, seed).map_err(|m| bad(&self.root, m))
    }
}

/// `ceil(n · fraction)` (at least one) of `items` after a seeded shuffle; all of them, in order,
/// at `fraction = 1`. Errors (as a message) unless `fraction` is in (0, 1].
pub fn fraction_of<T: Clone>(items: &[T], fraction: f64, seed: u64) -> Result<Vec<T>, String> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(format!("--fraction {fraction} must be in (0, 1]"));
    }
    let mut items = items.to_vec();
    if fraction < 1.0 {
        items.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x5EED));
        items.truncate(((items.len() as f64 * fraction).ceil() as usize).max(1));
    }
    Ok(items)
}

/// Decodes an example's image as RGB (Pillow-exact), naming the file when it is unreadable.
pub fn load_image(example: &CaptionedImage) -> Result<RgbImage> {
    imaging::load_rgb(&example.image).map_err(|e| bad(&example.image, format!("unreadable image: {e}")))
}

/// Python's `int(round(d / 2))` for `d ≥ 0` (round half to even), torchvision's
/// `CenterCrop` offset.
fn half_round_even(d: usize) -> usize {
    let k = d / 2;
    if d.is_multiple_of(2) || k.is_multiple_of(2) { k } else { k + 1 }
}

/// The diffusers SD3 script's `--center_crop` transform: `transforms.Resize(resolution,
/// BILINEAR)` on the PIL image (short side to `resolution`, long side
/// `int(resolution · long / short)`, Pillow bilinear), then `transforms.CenterCrop(resolution)`
/// (offsets `int(round((size − resolution) / 2))`). `flip` mirrors the resized image first, as
/// the script's `--random_flip` does before cropping.
pub fn resize_center_crop(img: &RgbImage, resolution: usize, flip: bool) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let (nw, nh) = if w <= h {
        (resolution, ((resolution as f64 * h as f64 / w as f64) as usize).max(resolution))
    } else {
        (((resolution as f64 * w as f64 / h as f64) as usize).max(resolution), resolution)
    };
    let resized = if (nw, nh) == (w, h) { img.clone() } else { imaging::resize(img, nw, nh, imaging::Filter::Bilinear) };
    let resized = if flip { imaging::hflip(&resized) } else { resized };
    imaging::crop(&resized, half_round_even(nw - resolution), half_round_even(nh - resolution), resolution, resolution)
}
