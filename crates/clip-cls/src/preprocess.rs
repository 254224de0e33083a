//! Image preprocessing as transformers' `CLIPImageProcessor` (PIL path): convert to RGB
//! (alpha composited on white), resize the shortest edge with PIL's bicubic filter, center
//! crop, rescale by 1/255, normalize with the processor's mean and std.
//!
//! Upstream: transformers `models/clip/image_processing_pil_clip.py` (v5.24); the pixels come
//! from [`lora_runtime::imaging`] (Pillow-exact decoding and resampling).
use std::path::Path;

use burn::prelude::*;
use rand::{Rng, RngExt};
use serde::Deserialize;

pub use lora_runtime::imaging::{Filter, RgbImage, center_crop, crop, hflip, load_rgb, resize};

use crate::config::ClipVisionConfig;
use crate::error::{ClipError, Result};

/// OpenAI CLIP's normalization constants (`OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The fields of `preprocessor_config.json` that CLIP uses.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ImageProcessor {
    /// Target of the shortest edge.
    pub shortest_edge: usize,
    /// Center crop `[height, width]`.
    pub crop: [usize; 2],
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f32,
}

#[derive(Deserialize)]
struct RawProcessor {
    size: Option<serde_json::Value>,
    crop_size: Option<serde_json::Value>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    rescale_factor: Option<f32>,
    resample: Option<u32>,
}

impl ImageProcessor {
    /// CLIP's defaults for a vision config (shortest edge = crop = `image_size`).
    pub fn for_vision(cfg: &ClipVisionConfig) -> Self {
        Self { shortest_edge: cfg.image_size, crop: [cfg.image_size, cfg.image_size], image_mean: CLIP_MEAN, image_std: CLIP_STD, rescale_factor: 1.0 / 255.0 }
    }

    /// `preprocessor_config.json` of a model directory, or the defaults of `cfg` without one.
    pub fn from_dir(dir: &Path, cfg: &ClipVisionConfig) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Ok(Self::for_vision(cfg));
        }
        let bad = |m: String| ClipError::Config { path: path.clone(), message: m };
        let text = std::fs::read_to_string(&path).map_err(|e| ClipError::Io { path: path.clone(), source: e })?;
        let raw: RawProcessor = serial_lora::parse::json(&text).map_err(bad)?;
        if raw.resample.is_some_and(|r| r != 3) {
            return Err(bad(format!("`resample` {:?} is not supported (only 3 = bicubic)", raw.resample)));
        }
        let mut p = Self::for_vision(cfg);
        // a positive integer, or an object with one under `key`
        let size = |v: &serde_json::Value, field: &str| -> Result<usize> {
            v.as_u64().filter(|&n| n > 0).map(|n| n as usize).ok_or_else(|| bad(format!("`{field}` = {v} must be a positive integer")))
        };
        match &raw.size {
            Some(n @ serde_json::Value::Number(_)) => p.shortest_edge = size(n, "size")?,
            Some(v) => match v.get("shortest_edge") {
                Some(s) => p.shortest_edge = size(s, "size.shortest_edge")?,
                None => return Err(bad(format!("`size` {v} has no `shortest_edge`"))),
            },
            None => {}
        }
        match &raw.crop_size {
            Some(n @ serde_json::Value::Number(_)) => p.crop = [size(n, "crop_size")?; 2],
            Some(v) => match (v.get("height"), v.get("width")) {
                (Some(h), Some(w)) => p.crop = [size(h, "crop_size.height")?, size(w, "crop_size.width")?],
                _ => return Err(bad(format!("`crop_size` {v} needs `height` and `width`"))),
            },
            None => {}
        }
        p.image_mean = raw.image_mean.unwrap_or(p.image_mean);
        p.image_std = raw.image_std.unwrap_or(p.image_std);
        p.rescale_factor = raw.rescale_factor.unwrap_or(p.rescale_factor);
        if p.image_std.contains(&0.0) {
            return Err(bad(format!("`image_std` {:?} must be non-zero", p.image_std)));
        }
        // the position table fixes the input size: another crop would not fit the model
        if p.crop != [cfg.image_size; 2] {
            return Err(bad(format!(
                "`crop_size.height`, `crop_size.width` = {:?} differ from the model's vision_config.image_size {}",
                p.crop, cfg.image_size
            )));
        }
        // every image is resized to this before the crop: a huge value would allocate that much
        if p.shortest_edge > 8 * cfg.image_size {
            return Err(bad(format!("`size.shortest_edge` = {} is more than 8× the crop size {}", p.shortest_edge, cfg.image_size)));
        }
        Ok(p)
    }

    /// Decoded RGB pixels → normalized `[3, crop_h, crop_w]` values, channel-major.
    pub fn process(&self, img: &RgbImage) -> Vec<f32> {
        let (h, w) = (img.height, img.width);
        let (short, long) = if h <= w { (h, w) } else { (w, h) };
        let new_long = (self.shortest_edge as f64 * long as f64 / short as f64) as usize;
        let (nh, nw) = if h <= w { (self.shortest_edge, new_long) } else { (new_long, self.shortest_edge) };
        let resized = resize(img, nw, nh, Filter::Bicubic);
        let [ch, cw] = self.crop;
        self.normalize(&center_crop(&resized, cw, ch))
    }

    /// The training transform of CLIP-LoRA: torchvision `RandomResizedCrop(crop, scale=(0.08, 1),
    /// bicubic)` + `RandomHorizontalFlip(0.5)`, then rescale and normalize.
    pub fn augment(&self, img: &RgbImage, rng: &mut impl Rng) -> Vec<f32> {
        let [ch, cw] = self.crop;
        let (left, top, w, h) = random_resized_crop_params(img.width, img.height, (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0), rng);
        let mut out = resize(&crop(img, left, top, w, h), cw, ch, Filter::Bicubic);
        if rng.random_bool(0.5) {
            out = hflip(&out);
        }
        self.normalize(&out)
    }

    /// RGB pixels → `(v·rescale − mean) / std`, channel-major `[3, h, w]`.
    pub fn normalize(&self, img: &RgbImage) -> Vec<f32> {
        let n = img.width * img.height;
        let mut out = vec![0f32; 3 * n];
        for c in 0..3 {
            for i in 0..n {
                let v = img.data[i * 3 + c] as f32 * self.rescale_factor;
                out[c * n + i] = (v - self.image_mean[c]) / self.image_std[c];
            }
        }
        out
    }

    /// Processed images (each `[3, crop_h, crop_w]` values) → `pixel_values [batch, 3, h, w]`.
    pub fn stack<B: Backend>(&self, processed: Vec<Vec<f32>>, device: &B::Device) -> Tensor<B, 4> {
        let n = processed.len();
        let data: Vec<f32> = processed.into_iter().flatten().collect();
        Tensor::from_data(TensorData::new(data, [n, 3, self.crop[0], self.crop[1]]), device)
    }

    /// A batch of images → `pixel_values [batch, 3, crop_h, crop_w]`.
    pub fn batch<B: Backend>(&self, images: &[RgbImage], device: &B::Device) -> Tensor<B, 4> {
        self.stack(images.iter().map(|i| self.process(i)).collect(), device)
    }
}

/// torchvision `RandomResizedCrop.get_params`: `(left, top, w, h)` of a window covering a
/// random fraction in `scale` of the area with a log-uniform aspect ratio in `ratio`; after 10
/// misses, the largest centered window with the ratio clamped into `ratio`.
pub fn random_resized_crop_params(width: usize, height: usize, scale: (f64, f64), ratio: (f64, f64), rng: &mut impl Rng) -> (usize, usize, usize, usize) {
    let (wf, hf) = (width as f64, height as f64);
    let area = wf * hf;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(log_lo..=log_hi).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (left, top, w, h);
        }
    }
    let in_ratio = wf / hf;
    let (w, h) = if in_ratio < ratio.0 {
        (width, (wf / ratio.0).round() as usize)
    } else if in_ratio > ratio.1 {
        ((hf * ratio.1).round() as usize, height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}
