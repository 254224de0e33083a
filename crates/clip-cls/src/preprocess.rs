//! Image preprocessing as transformers' `CLIPImageProcessor` (PIL path): convert to RGB
//! (alpha composited on white), resize the shortest edge with PIL's bicubic filter, center
//! crop, rescale by 1/255, normalize with the processor's mean and std.
//!
//! Upstream: transformers `models/clip/image_processing_pil_clip.py` (v5.24); Pillow 13
//! `libImaging/Resample.c` and `AlphaComposite.c` (the fixed-point arithmetic below is a
//! transcription, so resized pixels equal PIL's byte for byte).
use std::path::Path;

use burn::prelude::*;
use rand::{Rng, RngExt};
use serde::Deserialize;

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
        Self {
            shortest_edge: cfg.image_size,
            crop: [cfg.image_size, cfg.image_size],
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            rescale_factor: 1.0 / 255.0,
        }
    }

    /// `preprocessor_config.json` of a model directory, or the defaults of `cfg` without one.
    pub fn from_dir(dir: &Path, cfg: &ClipVisionConfig) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Ok(Self::for_vision(cfg));
        }
        let bad = |m: String| ClipError::Config { path: path.clone(), message: m };
        let text = std::fs::read_to_string(&path).map_err(|e| ClipError::Io { path: path.clone(), source: e })?;
        let raw: RawProcessor = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if raw.resample.is_some_and(|r| r != 3) {
            return Err(bad(format!("resample {:?} is not supported (only 3 = bicubic)", raw.resample)));
        }
        let mut p = Self::for_vision(cfg);
        match raw.size {
            Some(serde_json::Value::Number(n)) => p.shortest_edge = n.as_u64().unwrap_or(0) as usize,
            Some(v) => match v.get("shortest_edge").and_then(|s| s.as_u64()) {
                Some(s) => p.shortest_edge = s as usize,
                None => return Err(bad(format!("size {v} has no shortest_edge"))),
            },
            None => {}
        }
        match raw.crop_size {
            Some(serde_json::Value::Number(n)) => p.crop = [n.as_u64().unwrap_or(0) as usize; 2],
            Some(v) => match (v.get("height").and_then(|s| s.as_u64()), v.get("width").and_then(|s| s.as_u64())) {
                (Some(h), Some(w)) => p.crop = [h as usize, w as usize],
                _ => return Err(bad(format!("crop_size {v} needs height and width"))),
            },
            None => {}
        }
        p.image_mean = raw.image_mean.unwrap_or(p.image_mean);
        p.image_std = raw.image_std.unwrap_or(p.image_std);
        p.rescale_factor = raw.rescale_factor.unwrap_or(p.rescale_factor);
        if p.shortest_edge == 0 || p.crop.contains(&0) || p.image_std.contains(&0.0) {
            return Err(bad("sizes and std must be non-zero".into()));
        }
        Ok(p)
    }

    /// Decoded RGB pixels → normalized `[3, crop_h, crop_w]` values, channel-major.
    pub fn process(&self, img: &RgbImage) -> Vec<f32> {
        let (h, w) = (img.height, img.width);
        let (short, long) = if h <= w { (h, w) } else { (w, h) };
        let new_long = (self.shortest_edge as f64 * long as f64 / short as f64) as usize;
        let (nh, nw) = if h <= w { (self.shortest_edge, new_long) } else { (new_long, self.shortest_edge) };
        let resized = resize_bicubic(img, nw, nh);
        let [ch, cw] = self.crop;
        self.normalize(&center_crop(&resized, cw, ch))
    }

    /// The training transform of CLIP-LoRA: torchvision `RandomResizedCrop(crop, scale=(0.08, 1),
    /// bicubic)` + `RandomHorizontalFlip(0.5)`, then rescale and normalize.
    pub fn augment(&self, img: &RgbImage, rng: &mut impl Rng) -> Vec<f32> {
        let [ch, cw] = self.crop;
        let (left, top, w, h) = random_resized_crop_params(img.width, img.height, (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0), rng);
        let mut out = resize_bicubic(&crop(img, left, top, w, h), cw, ch);
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

/// 8-bit RGB pixels, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Decodes an image file to RGB as transformers' `convert_rgb` does with PIL: grayscale is
/// replicated, alpha is composited on white, 16-bit channels are reduced to 8 bits.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let err = |m: String| ClipError::Image { path: path.into(), message: m };
    let reader = image::ImageReader::open(path)
        .map_err(|e| ClipError::Io { path: path.into(), source: e })?
        .with_guessed_format()
        .map_err(|e| ClipError::Io { path: path.into(), source: e })?;
    let mut reader = reader;
    reader.limits(image::Limits::default()); // 512 MiB allocation cap: huge dimensions are refused
    let img = reader.decode().map_err(|e| err(format!("cannot decode image: {e}")))?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 {
        return Err(err("image has no pixels".into()));
    }
    let rgba = img.to_rgba8();
    let data = rgba.pixels().flat_map(|p| composite_on_white(p.0)).collect();
    Ok(RgbImage { width, height, data })
}

/// Pillow `alpha_composite(white, src)` for one pixel (AlphaComposite.c, PRECISION_BITS = 7).
fn composite_on_white([r, g, b, a]: [u8; 4]) -> [u8; 3] {
    if a == 255 {
        return [r, g, b];
    }
    const PB: u32 = 7;
    let a = a as u32;
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PB) / outa255;
    let coef2 = 255 * (1 << PB) - coef1;
    let ch = |s: u8| {
        let t = s as u32 * coef1 + 255 * coef2 + (0x80 << PB);
        ((((t >> 8) + t) >> 8) >> PB) as u8
    };
    [ch(r), ch(g), ch(b)]
}

/// Pillow's bicubic kernel (a = −0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

const PRECISION_BITS: i32 = 32 - 8 - 2;

/// Pillow `precompute_coeffs` + `normalize_coeffs_8bpc`: per output index, the first input
/// index, the count, and fixed-point weights.
fn coeffs(in_size: usize, out_size: usize) -> (Vec<(usize, usize)>, Vec<Vec<i32>>) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut k: Vec<f64> = (0..xmax).map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            k.iter_mut().for_each(|w| *w /= ww);
        }
        let fixed = k
            .iter()
            .map(|&w| {
                let v = w * (1i64 << PRECISION_BITS) as f64;
                if w < 0.0 { (-0.5 + v) as i32 } else { (0.5 + v) as i32 }
            })
            .collect();
        bounds.push((xmin, xmax));
        weights.push(fixed);
    }
    (bounds, weights)
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Pillow `Image.resize((w, h), Image.BICUBIC)` on RGB: one pass per axis whose size
/// changes, each rounded to 8 bits. Pass order as Pillow ≥ 13 (python-pillow/Pillow#9549):
/// vertical first iff both sizes change, the height shrinks and `2·(w_in − w_out) < h_in − h_out`;
/// horizontal first otherwise (Pillow ≤ 12 always went horizontal first).
pub fn resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (w_in, h_in) = (img.width as i64, img.height as i64);
    let (w_changes, h_changes) = (out_w != img.width, out_h != img.height);
    let vertical_first =
        w_changes && h_changes && (out_h as i64) < h_in && 2 * (w_in - out_w as i64) < h_in - out_h as i64;
    if vertical_first {
        return horizontal(&vertical(img, out_h), out_w);
    }
    let out = if w_changes { horizontal(img, out_w) } else { img.clone() };
    if h_changes { vertical(&out, out_h) } else { out }
}

fn horizontal(src: &RgbImage, out_w: usize) -> RgbImage {
    let (bounds, k) = coeffs(src.width, out_w);
    let mut data = vec![0u8; src.height * out_w * 3];
    for y in 0..src.height {
        for xx in 0..out_w {
            let (xmin, n) = bounds[xx];
            for c in 0..3 {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for x in 0..n {
                    ss += src.data[(y * src.width + xmin + x) * 3 + c] as i64 * k[xx][x] as i64;
                }
                data[(y * out_w + xx) * 3 + c] = clip8(ss);
            }
        }
    }
    RgbImage { width: out_w, height: src.height, data }
}

fn vertical(src: &RgbImage, out_h: usize) -> RgbImage {
    let (bounds, k) = coeffs(src.height, out_h);
    let w = src.width;
    let mut data = vec![0u8; out_h * w * 3];
    for yy in 0..out_h {
        let (ymin, n) = bounds[yy];
        for x in 0..w {
            for c in 0..3 {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for y in 0..n {
                    ss += src.data[((ymin + y) * w + x) * 3 + c] as i64 * k[yy][y] as i64;
                }
                data[(yy * w + x) * 3 + c] = clip8(ss);
            }
        }
    }
    RgbImage { width: w, height: out_h, data }
}

/// transformers `center_crop`: offsets `(size − crop) // 2`.
pub fn center_crop(img: &RgbImage, w: usize, h: usize) -> RgbImage {
    crop(img, img.width.saturating_sub(w) / 2, img.height.saturating_sub(h) / 2, w, h)
}

/// The `w × h` window at `(left, top)`; pixels past the border repeat the edge.
pub fn crop(img: &RgbImage, left: usize, top: usize, w: usize, h: usize) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in top..top + h {
        for x in left..left + w {
            let i = (y.min(img.height - 1) * img.width + x.min(img.width - 1)) * 3;
            data.extend_from_slice(&img.data[i..i + 3]);
        }
    }
    RgbImage { width: w, height: h, data }
}

/// Mirrors an image left to right.
pub fn hflip(img: &RgbImage) -> RgbImage {
    let data = img.data.chunks_exact(img.width * 3).flat_map(|row| row.chunks_exact(3).rev().flatten().copied()).collect();
    RgbImage { data, ..*img }
}

/// torchvision `RandomResizedCrop.get_params`: `(left, top, w, h)` of a window covering a
/// random fraction in `scale` of the area with a log-uniform aspect ratio in `ratio`; after 10
/// misses, the largest centered window with the ratio clamped into `ratio`.
pub fn random_resized_crop_params(
    width: usize,
    height: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> (usize, usize, usize, usize) {
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
