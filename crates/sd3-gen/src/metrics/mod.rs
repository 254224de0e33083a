//! Image-generation metrics of the paper's Table II: FID exactly as pytorch-fid (Inception-v3
//! pool3 features, f64 statistics and Fréchet distance) and CLIP-Score (raw cosine and
//! torchmetrics' ×100 scale).
//!
//! Upstream: pytorch-fid 0.3.0 (mseitzer/pytorch-fid), torchmetrics 1.9.0
//! (`torchmetrics.multimodal.CLIPScore`).
pub mod clip_score;
pub mod fid;
pub mod inception;

use std::path::Path;

use burn::prelude::*;
use lora_runtime::imaging::RgbImage;

use crate::error::{Result, Sd3Error};

pub use clip_score::{ClipScore, ClipScorer};
pub use fid::{FID_EPS, Fid, FidStats, fid_from_features, fid_stats_vs_features, frechet_distance};
pub use inception::{FidInceptionV3, load_fid_inception};

/// Images per Inception forward pass.
const INCEPTION_BATCH: usize = 8;

/// Decodes an image as pytorch-fid's `ImagePathDataset` does, with PIL's
/// `Image.open(path).convert('RGB')`: an alpha channel is dropped, not composited (CLIP's
/// processor and [`lora_runtime::imaging::load_rgb`] composite on white instead); images without
/// alpha decode as `load_rgb` does.
pub fn load_rgb_fid(path: &Path) -> Result<RgbImage> {
    let bad = |m: String| Sd3Error::Dataset { path: path.to_path_buf(), message: format!("unreadable image: {m}") };
    let img = image::ImageReader::open(path)
        .map_err(|e| bad(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?
        .decode()
        .map_err(|e| bad(e.to_string()))?;
    if !img.color().has_alpha() {
        return lora_runtime::imaging::load_rgb(path).map_err(|e| bad(e.to_string()));
    }
    let rgb = img.to_rgb8();
    Ok(RgbImage { width: rgb.width() as usize, height: rgb.height() as usize, data: rgb.into_raw() })
}

/// torchvision `ToTensor()` of one image: `[1, 3, h, w]`, values `v / 255`.
pub fn to_unit_tensor<B: Backend>(img: &RgbImage, device: &B::Device) -> Tensor<B, 4> {
    let n = img.width * img.height;
    let mut data = vec![0f32; 3 * n];
    for c in 0..3 {
        for i in 0..n {
            data[c * n + i] = img.data[i * 3 + c] as f32 / 255.0;
        }
    }
    Tensor::from_data(TensorData::new(data, [1, 3, img.height, img.width]), device)
}

/// pool3 features of images of any sizes, row-major `[n, 2048]`: each image is resized to 299²
/// on its own (pytorch-fid with images of different sizes, i.e. batch size 1), then the network
/// runs on batches of resized images. `on_image(done)` reports progress.
pub fn inception_features<B: Backend>(model: &FidInceptionV3<B>, images: &[RgbImage], device: &B::Device, on_image: &mut dyn FnMut(usize)) -> Vec<f32> {
    let mut get = |i: usize| Ok(images[i].clone());
    // infallible: the images are in memory
    inception_features_from(model, images.len(), &mut get, device, on_image).unwrap_or_default()
}

/// As [`inception_features`] with image `i` produced by `load(i)` when its batch runs (so a
/// large split is never held in memory at once); the first error stops and is returned.
pub fn inception_features_from<B: Backend>(
    model: &FidInceptionV3<B>,
    count: usize,
    load: &mut dyn FnMut(usize) -> Result<RgbImage>,
    device: &B::Device,
    on_image: &mut dyn FnMut(usize),
) -> Result<Vec<f32>> {
    inception_features_batched(model, count, load, INCEPTION_BATCH, device, on_image)
}

/// As [`inception_features_from`] with `batch` images per forward pass (pytorch-fid's
/// `--batch-size`: the features do not depend on it beyond f32 rounding).
pub fn inception_features_batched<B: Backend>(
    model: &FidInceptionV3<B>,
    count: usize,
    load: &mut dyn FnMut(usize) -> Result<RgbImage>,
    batch: usize,
    device: &B::Device,
    on_image: &mut dyn FnMut(usize),
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(count * inception::POOL3_DIM);
    let mut start = 0;
    while start < count {
        let end = (start + batch.max(1)).min(count);
        let batch = (start..end).map(|i| Ok(inception::preprocess(to_unit_tensor::<B>(&load(i)?, device)))).collect::<Result<Vec<_>>>()?;
        let f = model.forward_with(Tensor::cat(batch, 0), &mut |_, _| {});
        out.extend(f.into_data().iter::<f32>());
        on_image(end);
        start = end;
    }
    Ok(out)
}
