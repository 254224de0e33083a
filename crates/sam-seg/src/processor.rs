//! Pre- and postprocessing as transformers' `SamProcessor` with the PIL image processor
//! (`SamImageProcessorPil`): resize the longest side (PIL bilinear), rescale, normalize
//! (ImageNet mean/std), pad bottom-right with zeros; prompts rescaled to the resized image;
//! masks upsampled to the padded size, cropped and upsampled to the original size.
//! Upstream: transformers `models/sam/image_processing_pil_sam.py`, `processing_sam.py` (v5.24).
use std::path::Path;

use burn::prelude::*;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use lora_runtime::imaging::{Filter, RgbImage, resize};
use serde::Deserialize;

use crate::config::SamVisionConfig;
use crate::error::{Result, SamError};

/// `IMAGENET_DEFAULT_MEAN` / `IMAGENET_DEFAULT_STD`.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The fields of `preprocessor_config.json` that SAM uses.
#[derive(Clone, Debug, PartialEq)]
pub struct SamProcessor {
    /// Target of the longest side.
    pub longest_edge: usize,
    /// Padded `[height, width]` (the model input).
    pub pad: [usize; 2],
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f32,
}

#[derive(Deserialize)]
struct Raw {
    size: Option<RawSize>,
    pad_size: Option<RawPad>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    rescale_factor: Option<f32>,
    resample: Option<u32>,
}

#[derive(Deserialize)]
struct RawSize {
    longest_edge: Option<usize>,
}

#[derive(Deserialize)]
struct RawPad {
    height: Option<usize>,
    width: Option<usize>,
}

/// An image ready for the model, with the sizes postprocessing needs.
pub struct Processed {
    /// `[3, pad_h, pad_w]`, channel-major.
    pub pixel_values: Vec<f32>,
    /// `(h, w)` of the file.
    pub original_size: (usize, usize),
    /// `(h, w)` after the resize, before padding.
    pub reshaped_size: (usize, usize),
}

impl SamProcessor {
    /// SAM's defaults for a vision config: longest edge = pad = `image_size`.
    pub fn for_vision(cfg: &SamVisionConfig) -> Self {
        Self { longest_edge: cfg.image_size, pad: [cfg.image_size; 2], image_mean: IMAGENET_MEAN, image_std: IMAGENET_STD, rescale_factor: 1.0 / 255.0 }
    }

    /// `preprocessor_config.json` of a model directory, or the defaults of `cfg` without one.
    pub fn from_dir(dir: &Path, cfg: &SamVisionConfig) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let mut p = Self::for_vision(cfg);
        if !path.is_file() {
            return Ok(p);
        }
        let bad = |m: String| SamError::Config { path: path.clone(), message: m };
        let text = std::fs::read_to_string(&path).map_err(|e| SamError::Io { path: path.clone(), source: e })?;
        let raw: Raw = serial_lora::parse::json(&text).map_err(bad)?;
        if raw.resample.is_some_and(|r| r != 2) {
            return Err(bad(format!("`resample` {:?} is not supported (only 2 = bilinear)", raw.resample)));
        }
        p.longest_edge = raw.size.and_then(|s| s.longest_edge).unwrap_or(p.longest_edge);
        let pad = raw.pad_size.unwrap_or(RawPad { height: None, width: None });
        p.pad = [pad.height.unwrap_or(p.pad[0]), pad.width.unwrap_or(p.pad[1])];
        p.image_mean = raw.image_mean.unwrap_or(p.image_mean);
        p.image_std = raw.image_std.unwrap_or(p.image_std);
        p.rescale_factor = raw.rescale_factor.unwrap_or(p.rescale_factor);
        if p.longest_edge == 0 || p.longest_edge > p.pad[0].min(p.pad[1]) || p.image_std.contains(&0.0) {
            return Err(bad(format!(
                "`size.longest_edge` = {} must be positive and at most `pad_size.height`, `pad_size.width` = {:?}; `image_std` {:?} non-zero",
                p.longest_edge, p.pad, p.image_std
            )));
        }
        if p.pad != [cfg.image_size; 2] {
            return Err(bad(format!("`pad_size.height`, `pad_size.width` = {:?} differ from the model's vision_config.image_size {}", p.pad, cfg.image_size)));
        }
        Ok(p)
    }

    /// `_get_preprocess_shape`: `(h, w)` scaled so the longest side is `longest_edge`.
    pub fn reshaped_size(&self, (h, w): (usize, usize)) -> (usize, usize) {
        let scale = self.longest_edge as f64 / h.max(w) as f64;
        ((h as f64 * scale + 0.5) as usize, (w as f64 * scale + 0.5) as usize)
    }

    /// Resize, rescale, normalize, pad.
    pub fn process(&self, img: &RgbImage) -> Processed {
        let original_size = (img.height, img.width);
        let (nh, nw) = self.reshaped_size(original_size);
        let r = resize(img, nw, nh, Filter::Bilinear);
        let [ph, pw] = self.pad;
        let mut out = vec![0f32; 3 * ph * pw];
        for c in 0..3 {
            for y in 0..nh {
                for x in 0..nw {
                    let v = r.data[(y * nw + x) * 3 + c] as f32 * self.rescale_factor;
                    out[c * ph * pw + y * pw + x] = (v - self.image_mean[c]) / self.image_std[c];
                }
            }
        }
        Processed { pixel_values: out, original_size, reshaped_size: (nh, nw) }
    }

    /// A point `(x, y)` of the original image in model-input pixels (`_normalize_coordinates`).
    pub fn scale_point(&self, original: (usize, usize), [x, y]: [f32; 2]) -> [f32; 2] {
        let (nh, nw) = self.reshaped_size(original);
        let (sx, sy) = (nw as f64 / original.1 as f64, nh as f64 / original.0 as f64);
        [(x as f64 * sx) as f32, (y as f64 * sy) as f32]
    }

    /// A box `x0, y0, x1, y1` of the original image in model-input pixels.
    pub fn scale_box(&self, original: (usize, usize), [x0, y0, x1, y1]: [f32; 4]) -> [f32; 4] {
        let [a, b] = self.scale_point(original, [x0, y0]);
        let [c, d] = self.scale_point(original, [x1, y1]);
        [a, b, c, d]
    }

    /// `post_process_masks` (no binarization): low-resolution logits `[n, m, s, s]` → `[n, m, h, w]`
    /// at the original size (bilinear, `align_corners=False`, via the padded size and the crop).
    pub fn postprocess_masks<B: Backend>(&self, masks: Tensor<B, 4>, reshaped: (usize, usize), original: (usize, usize)) -> Tensor<B, 4> {
        let bilinear = InterpolateOptions { mode: InterpolateMode::Bilinear, align_corners: false };
        let up = interpolate(masks, self.pad, bilinear.clone());
        let [n, m, _, _] = up.dims();
        let cropped = up.slice([0..n, 0..m, 0..reshaped.0, 0..reshaped.1]);
        interpolate(cropped, [original.0, original.1], bilinear)
    }
}
