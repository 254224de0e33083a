//! 8-bit RGB images as the Python tools see them: decoding with PIL's RGB conversion and
//! Pillow-exact resampling (bilinear and bicubic), crops and flips. Shared by the model crates'
//! image processors.
//!
//! Upstream: Pillow 13 `libImaging/Resample.c` and `AlphaComposite.c` (the fixed-point
//! arithmetic below is a transcription, so resized pixels equal PIL's byte for byte).
use std::path::Path;

use crate::error::{Error, Result};

/// 8-bit RGB pixels, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Decodes an image file to RGB as transformers' `convert_to_rgb` does with PIL (Pillow 13):
/// grayscale is replicated, alpha (or a palette's transparent entry) is composited on white,
/// CMYK is converted, and 16-bit samples are reduced as Pillow reduces them: 16-bit RGB(A) and
/// gray + alpha keep the high byte, 16-bit grayscale (`I;16`) is *clipped* to 255.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let err = |m: String| Error::Image { path: path.into(), message: m };
    // opening a FIFO or a device would block or read forever
    if path.exists() && !path.is_file() {
        return Err(err("not a regular file".into()));
    }
    let reader = image::ImageReader::open(path).map_err(|e| Error::io(path, e))?.with_guessed_format().map_err(|e| Error::io(path, e))?;
    let mut reader = reader;
    reader.limits(image::Limits::default()); // 512 MiB allocation cap: huge dimensions are refused
    let img = reader.decode().map_err(|e| err(format!("cannot decode image: {e}")))?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 {
        return Err(err("image has no pixels".into()));
    }
    let hi = |v: u16| (v >> 8) as u8;
    let rgba: Vec<[u8; 4]> = match &img {
        // Pillow's I;16 → RGB conversion clips (Convert.c I16_RGB), it does not rescale
        image::DynamicImage::ImageLuma16(b) => b.pixels().map(|p| p.0[0].min(255) as u8).map(|v| [v, v, v, 255]).collect(),
        // PngImagePlugin reads these with the "…;16B" raw modes: the high byte of each sample
        image::DynamicImage::ImageLumaA16(b) => b.pixels().map(|p| [hi(p.0[0]), hi(p.0[0]), hi(p.0[0]), hi(p.0[1])]).collect(),
        image::DynamicImage::ImageRgb16(b) => b.pixels().map(|p| [hi(p.0[0]), hi(p.0[1]), hi(p.0[2]), 255]).collect(),
        image::DynamicImage::ImageRgba16(b) => b.pixels().map(|p| p.0.map(hi)).collect(),
        other => other.to_rgba8().pixels().map(|p| p.0).collect(),
    };
    let data = rgba.into_iter().flat_map(composite_on_white).collect();
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

/// Pillow's resampling filters (`Image.BILINEAR`, `Image.BICUBIC`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Triangle kernel, support 1.
    Bilinear,
    /// Cubic kernel with a = −0.5, support 2.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }
    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => (1.0 - x.abs()).max(0.0),
            Filter::Bicubic => bicubic(x),
        }
    }
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
fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> (Vec<(usize, usize)>, Vec<Vec<i32>>) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut k: Vec<f64> = (0..xmax).map(|x| filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
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

/// Pillow `Image.resize((w, h), filter)` on RGB: one pass per axis whose size changes, each
/// rounded to 8 bits. Pass order as Pillow ≥ 13 (python-pillow/Pillow#9549):
/// vertical first iff both sizes change, the height shrinks and `2·(w_in − w_out) < h_in − h_out`;
/// horizontal first otherwise (Pillow ≤ 12 always went horizontal first).
pub fn resize(img: &RgbImage, out_w: usize, out_h: usize, filter: Filter) -> RgbImage {
    let (w_in, h_in) = (img.width as i64, img.height as i64);
    let (w_changes, h_changes) = (out_w != img.width, out_h != img.height);
    let vertical_first = w_changes && h_changes && (out_h as i64) < h_in && 2 * (w_in - out_w as i64) < h_in - out_h as i64;
    if vertical_first {
        return horizontal(&vertical(img, out_h, filter), out_w, filter);
    }
    let out = if w_changes { horizontal(img, out_w, filter) } else { img.clone() };
    if h_changes { vertical(&out, out_h, filter) } else { out }
}

fn horizontal(src: &RgbImage, out_w: usize, filter: Filter) -> RgbImage {
    let (bounds, k) = coeffs(src.width, out_w, filter);
    let mut data = vec![0u8; src.height * out_w * 3];
    for y in 0..src.height {
        for xx in 0..out_w {
            let (xmin, n) = bounds[xx];
            for c in 0..3 {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (x, &kx) in k[xx][..n].iter().enumerate() {
                    ss += src.data[(y * src.width + xmin + x) * 3 + c] as i64 * kx as i64;
                }
                data[(y * out_w + xx) * 3 + c] = clip8(ss);
            }
        }
    }
    RgbImage { width: out_w, height: src.height, data }
}

fn vertical(src: &RgbImage, out_h: usize, filter: Filter) -> RgbImage {
    let (bounds, k) = coeffs(src.height, out_h, filter);
    let w = src.width;
    let mut data = vec![0u8; out_h * w * 3];
    for yy in 0..out_h {
        let (ymin, n) = bounds[yy];
        for x in 0..w {
            for c in 0..3 {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (y, &ky) in k[yy][..n].iter().enumerate() {
                    ss += src.data[((ymin + y) * w + x) * 3 + c] as i64 * ky as i64;
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

/// Decodes images on all cores, in order; `Err` entries are the unreadable files.
pub fn decode_all(paths: &[&Path]) -> Vec<Result<RgbImage>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(paths.len().max(1));
    let chunk = paths.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = paths.chunks(chunk).map(|c| (c, s.spawn(move || c.iter().map(|p| load_rgb(p)).collect::<Vec<_>>()))).collect();
        let panicked = |p: &&Path| Err(Error::Image { path: p.to_path_buf(), message: "the image decoder panicked".into() });
        handles.into_iter().flat_map(|(c, h)| h.join().unwrap_or_else(|_| c.iter().map(panicked).collect())).collect()
    })
}

/// Writes `img` to `path` as an 8-bit RGB PNG, atomically (temporary file + rename).
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let bad = |message: String| Error::Parse { path: path.into(), format: "PNG", message };
    let buf = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
        .ok_or_else(|| bad(format!("{} bytes are not a {}×{} RGB image", img.data.len(), img.width, img.height)))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    buf.write_to(&mut bytes, image::ImageFormat::Png).map_err(|e| bad(e.to_string()))?;
    Ok(serial_lora::io::write_atomic(path, bytes.get_ref())?)
}
