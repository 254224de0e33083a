//! Segmentation datasets: `images/` + `masks/` folders paired by file stem, binary masks or
//! class-index masks (`--class-id N`), a `split.json` (`{"train": [stems], "test": [stems]}`)
//! or a seeded split; box prompts derived from the ground truth.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use crate::error::{Result, SamError};

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp"];

/// One image and its mask file.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub image: PathBuf,
    pub mask: PathBuf,
}

/// A binary ground-truth mask, row-major, 1 = object.
#[derive(Clone, Debug, PartialEq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Mask {
    /// The tight box `x0, y0, x1, y1` around the object (pixel edges), `None` if empty.
    pub fn bbox(&self) -> Option<[f32; 4]> {
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for y in 0..self.height {
            for x in 0..self.width {
                if self.data[y * self.width + x] != 0 {
                    (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
                }
            }
        }
        (x0 != usize::MAX).then_some([x0 as f32, y0 as f32, x1 as f32, y1 as f32])
    }

    /// Pillow `resize(NEAREST)` (source pixel `⌊(i + ½)·in/out⌋`) to `w × h`.
    pub fn resize_nearest(&self, w: usize, h: usize) -> Mask {
        let src = |i: usize, out: usize, inp: usize| (((i as f64 + 0.5) * inp as f64 / out as f64) as usize).min(inp - 1);
        let data =
            (0..h).flat_map(|y| (0..w).map(move |x| (y, x))).map(|(y, x)| self.data[src(y, h, self.height) * self.width + src(x, w, self.width)]).collect();
        Mask { width: w, height: h, data }
    }
}

/// A box with each side moved by up to `fraction` of the box size (at most 20 px), clamped to
/// the image: the usual prompt augmentation of SAM fine-tuning.
pub fn jitter_box(b: [f32; 4], fraction: f32, (w, h): (usize, usize), rng: &mut StdRng) -> [f32; 4] {
    let (bw, bh) = (b[2] - b[0], b[3] - b[1]);
    let mut d = |side: f32| {
        let m = (fraction * side).min(20.0);
        if m > 0.0 { rng.random_range(-m..=m) } else { 0.0 }
    };
    let (dx0, dy0, dx1, dy1) = (d(bw), d(bh), d(bw), d(bh));
    let x0 = (b[0] + dx0).clamp(0.0, w as f32);
    let y0 = (b[1] + dy0).clamp(0.0, h as f32);
    [x0, y0, (b[2] + dx1).clamp(x0 + 1.0, w as f32), (b[3] + dy1).clamp(y0 + 1.0, h as f32)]
}

/// Reads a mask file: pixels > 0 are the object, or with `class_id` the pixels equal to it
/// (class-index masks must be single-channel).
pub fn load_mask(path: &Path, class_id: Option<u8>) -> Result<Mask> {
    let bad = |m: String| SamError::Dataset { path: path.into(), message: m };
    let img = image::open(path).map_err(|e| bad(format!("cannot read mask: {e}")))?;
    if class_id.is_some() && !matches!(img.color(), image::ColorType::L8 | image::ColorType::L16) {
        return Err(bad(format!("class-index masks must be single-channel 8/16-bit, found {:?}", img.color())));
    }
    let l = img.to_luma8();
    let (width, height) = (l.width() as usize, l.height() as usize);
    let data = l.into_raw().into_iter().map(|v| u8::from(class_id.map_or(v > 0, |c| v == c))).collect();
    Ok(Mask { width, height, data })
}

/// A folder dataset.
#[derive(Clone, Debug)]
pub struct SegDataset {
    pub root: PathBuf,
    pub splits: BTreeMap<String, Vec<Pair>>,
}

fn files_by_stem(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| SamError::Io { path: dir.into(), source: e })?;
    let mut out = BTreeMap::new();
    for entry in rd.filter_map(|e| e.ok()) {
        let p = entry.path();
        let ext_ok = p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        if let (true, Some(stem)) = (ext_ok, p.file_stem().and_then(|s| s.to_str())) {
            out.insert(stem.to_string(), p);
        }
    }
    Ok(out)
}

impl SegDataset {
    /// Reads `dir/images` and `dir/masks`; splits from `dir/split.json`, else a seeded split
    /// with `test_fraction` of the pairs in `test`.
    pub fn open(dir: &Path, seed: u64, test_fraction: f64) -> Result<Self> {
        let bad = |p: &Path, m: String| SamError::Dataset { path: p.into(), message: m };
        let (img_dir, mask_dir) = (dir.join("images"), dir.join("masks"));
        for d in [&img_dir, &mask_dir] {
            if !d.is_dir() {
                return Err(bad(d, "missing folder (a dataset has images/ and masks/, paired by file stem)".into()));
            }
        }
        let images = files_by_stem(&img_dir)?;
        let masks = files_by_stem(&mask_dir)?;
        if images.is_empty() {
            return Err(bad(&img_dir, "no images".into()));
        }
        let pair = |stem: &str| -> Result<Pair> {
            let image = images.get(stem).ok_or_else(|| bad(&img_dir, format!("no image with stem `{stem}`")))?;
            let mask = masks.get(stem).ok_or_else(|| bad(&mask_dir, format!("no mask for image {}", image.display())))?;
            Ok(Pair { image: image.clone(), mask: mask.clone() })
        };
        let split_file = dir.join("split.json");
        let splits: BTreeMap<String, Vec<String>> = if split_file.is_file() {
            let text = std::fs::read_to_string(&split_file).map_err(|e| SamError::Io { path: split_file.clone(), source: e })?;
            serial_lora::parse::json(&text).map_err(|e| bad(&split_file, format!("expected {{\"train\": [stems], \"test\": [stems]}}: {e}")))?
        } else {
            let mut stems: Vec<String> = images.keys().cloned().collect();
            stems.shuffle(&mut StdRng::seed_from_u64(seed));
            let n_test = ((stems.len() as f64 * test_fraction).round() as usize).min(stems.len().saturating_sub(1));
            let train = stems.split_off(n_test);
            BTreeMap::from([("test".to_string(), stems), ("train".to_string(), train)])
        };
        let splits = splits.into_iter().map(|(k, stems)| Ok((k, stems.iter().map(|s| pair(s)).collect::<Result<Vec<_>>>()?))).collect::<Result<_>>()?;
        Ok(Self { root: dir.into(), splits })
    }

    /// The pairs of a split (`fraction` of them, seeded, for `--fraction`).
    pub fn split(&self, name: &str, fraction: f64, seed: u64) -> Result<Vec<Pair>> {
        let items = self.splits.get(name).filter(|v| !v.is_empty()).ok_or_else(|| SamError::Dataset {
            path: self.root.clone(),
            message: format!("no `{name}` split (available: {})", self.splits.keys().cloned().collect::<Vec<_>>().join(", ")),
        })?;
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(SamError::Dataset { path: self.root.clone(), message: format!("--fraction {fraction} must be in (0, 1]") });
        }
        let mut items = items.clone();
        if fraction < 1.0 {
            items.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x5EED));
            items.truncate(((items.len() as f64 * fraction).ceil() as usize).max(1));
        }
        Ok(items)
    }
}
