//! The digits data set of the proxy experiment (scikit-learn's `load_digits` CSV), its fixed
//! per-digit train/test split and seeded few-shot samples.
use std::io::Read;
use std::ops::Range;
use std::path::Path;

use burn::prelude::*;
use lora_runtime::run::stream_seed;

use clip_cls::data::permutation;
use clip_cls::error::{ClipError, Result};

/// Side of a digit image.
pub const SIDE: usize = 8;
/// Pixels per image.
pub const PIXELS: usize = SIDE * SIDE;
/// Largest pixel value of the data set.
pub const MAX_PIXEL: f32 = 16.0;
/// Seed of the per-digit train/test split (fixed: every run and seed sees the same test set).
pub const SPLIT_SEED: u64 = 0x5EED_D161;

/// The digits data set: images (row-major 8×8, values 0–16) and labels 0–9, in file order.
#[derive(Clone, Debug)]
pub struct Digits {
    pub images: Vec<[f32; PIXELS]>,
    pub labels: Vec<u8>,
}

impl Digits {
    /// Reads scikit-learn's `digits.csv.gz` (gzip or plain text): one image per row, 64 pixel
    /// values then the label. Errors name the file and the (1-based) row.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ClipError::Io { path: path.into(), source: e })?;
        let bad = |message: String| ClipError::Dataset { path: path.into(), message };
        let mut text = String::new();
        if bytes.starts_with(&[0x1f, 0x8b]) {
            flate2::read::GzDecoder::new(&bytes[..]).read_to_string(&mut text).map_err(|e| bad(format!("not a readable gzip-compressed CSV file: {e}")))?;
        } else {
            text = String::from_utf8(bytes).map_err(|e| bad(format!("not a gzip file and not UTF-8 text: {e}")))?;
        }
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        for (i, line) in text.lines().enumerate() {
            let row = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if fields.len() != PIXELS + 1 {
                return Err(bad(format!("row {row}: {} values, expected {} (64 pixels, then the label)", fields.len(), PIXELS + 1)));
            }
            let mut image = [0.0f32; PIXELS];
            for (j, f) in fields[..PIXELS].iter().enumerate() {
                match f.parse::<f32>() {
                    Ok(v) if (0.0..=MAX_PIXEL).contains(&v) => image[j] = v,
                    _ => return Err(bad(format!("row {row}, column {}: pixel `{f}` is not a number in 0..=16", j + 1))),
                }
            }
            let label = fields[PIXELS];
            match label.parse::<f64>() {
                Ok(v) if v.fract() == 0.0 && (0.0..=9.0).contains(&v) => labels.push(v as u8),
                _ => return Err(bad(format!("row {row}, column {}: label `{label}` is not a digit 0–9", PIXELS + 1))),
            }
            images.push(image);
        }
        if images.is_empty() {
            return Err(bad("no data rows".into()));
        }
        Ok(Self { images, labels })
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Images per label 0–9.
    pub fn class_counts(&self) -> [usize; 10] {
        let mut c = [0; 10];
        for &l in &self.labels {
            c[l as usize] += 1;
        }
        c
    }

    /// Images `idx` as `[n, 1, 8, 8]`, scaled from 0–16 to −1–1.
    pub fn pixels<B: Backend>(&self, idx: &[usize], device: &B::Device) -> Tensor<B, 4> {
        let data: Vec<f32> = idx.iter().flat_map(|&i| self.images[i].iter().map(|v| v * (2.0 / MAX_PIXEL) - 1.0)).collect();
        Tensor::from_data(TensorData::new(data, [idx.len(), 1, SIDE, SIDE]), device)
    }

    /// Labels of `idx` minus `first` (the first digit of the task), `[n]`.
    pub fn targets<B: Backend>(&self, idx: &[usize], first: u8, device: &B::Device) -> Tensor<B, 1, Int> {
        let data: Vec<i64> = idx.iter().map(|&i| i64::from(self.labels[i]) - i64::from(first)).collect();
        Tensor::from_data(TensorData::new(data, [idx.len()]), device)
    }
}

/// Indices of a train/test split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

/// The fixed split of the digits `classes`: per digit, a seeded ([`SPLIT_SEED`]) 20 % (rounded)
/// is held out for testing, the rest is the training pool. Indices ascend in each part.
pub fn split(digits: &Digits, classes: Range<u8>) -> Split {
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for c in classes {
        let members: Vec<usize> = (0..digits.len()).filter(|&i| digits.labels[i] == c).collect();
        let order = permutation(members.len(), stream_seed(SPLIT_SEED, 0, u64::from(c)));
        let n_test = (members.len() + 2) / 5;
        test.extend(order[..n_test].iter().map(|&o| members[o]));
        train.extend(order[n_test..].iter().map(|&o| members[o]));
    }
    train.sort_unstable();
    test.sort_unstable();
    Split { train, test }
}

/// `shots` images of each digit of `classes` drawn from `pool` with `seed`, in class order.
pub fn few_shot(digits: &Digits, pool: &[usize], classes: Range<u8>, shots: usize, seed: u64) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for c in classes {
        let members: Vec<usize> = pool.iter().copied().filter(|&i| digits.labels[i] == c).collect();
        if shots > members.len() {
            let why = format!("digit {c} has only {} training images", members.len());
            return Err(serial_lora::Error::config("shots", shots, why).into());
        }
        let order = permutation(members.len(), stream_seed(seed, 4, u64::from(c)));
        out.extend(order[..shots].iter().map(|&o| members[o]));
    }
    Ok(out)
}
