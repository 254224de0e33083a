//! Inception-v3 as pytorch-fid uses it for FID: `InceptionV3([3])` with `use_fid_inception=True`
//! (torchvision `Inception3` with pytorch-fid's `FIDInceptionA/C/E_1/E_2` blocks), input resized
//! to 299×299 (`F.interpolate(mode='bilinear', align_corners=False)`), scaled from [0, 1] to
//! [−1, 1], pool3 = adaptive average pool of `Mixed_7c` → 2048 features.
//!
//! Upstream: pytorch-fid 0.3.0 `src/pytorch_fid/inception.py` (mseitzer/pytorch-fid, tag v0.3.0),
//! torchvision 0.24 `models/inception.py`; weights `pt_inception-2015-12-05-6726825d.pth`
//! (the TF FID Inception, ported by pytorch-fid), state-dict keys of `fid_inception_v3()`.
//! The FID variants of the blocks differ from torchvision's in their pooling branch:
//! average pooling with `count_include_pad=False` (A, C, E_1) and max pooling in E_2 (`Mixed_7c`).
use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::{avg_pool2d, interpolate, max_pool2d};
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use lora_runtime::weights::{KeyTable, load_safetensors};
use serial_lora::io::HostTensor;

use crate::error::Result;

/// Input side of the network (pytorch-fid resizes every input to it).
pub const INCEPTION_SIZE: usize = 299;
/// pool3 feature width.
pub const POOL3_DIM: usize = 2048;

/// pytorch-fid state-dict keys → Burn paths. Fields are the snake-case module names
/// (`Mixed_5b` → `mixed_5b`, `Conv2d_1a_3x3` → `conv2d_1a_3x3`); BatchNorm `weight`/`bias` become
/// `gamma`/`beta` (PyTorch adapter), `running_mean`/`running_var` keep their names.
pub const KEY_TABLE: KeyTable = KeyTable {
    rules: &[&[(r"^Mixed_", "mixed_"), (r"^Conv2d_", "conv2d_")]],
    // the 1008-way classifier is not part of pool3; BN step counters are training state
    ignore: &[r"^fc\.(weight|bias)$", r"\.num_batches_tracked$"],
    by_hand: &[],
};

/// torchvision `BasicConv2d`: conv (no bias) → BatchNorm(eps 1e-3, running statistics) → ReLU.
#[derive(Module, Debug)]
pub struct BasicConv2d<B: Backend> {
    pub conv: Conv2d<B>,
    pub bn: BatchNorm<B>,
}

impl<B: Backend> BasicConv2d<B> {
    /// `kernel`, `stride`, `padding` as `[h, w]`.
    pub fn new(cin: usize, cout: usize, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2], device: &B::Device) -> Self {
        let [ph, pw] = padding;
        Self {
            conv: Conv2dConfig::new([cin, cout], kernel)
                .with_stride(stride)
                .with_padding(PaddingConfig2d::Explicit(ph, pw, ph, pw))
                .with_bias(false)
                .init(device),
            bn: BatchNormConfig::new(cout).with_epsilon(1e-3).init(device),
        }
    }

    /// `[b, cin, h, w]` → `[b, cout, h', w']`. On a non-autodiff backend BatchNorm uses the
    /// running statistics (inference mode, as `model.eval()`).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        relu(self.bn.forward(self.conv.forward(x)))
    }
}

fn c<B: Backend>(cin: usize, cout: usize, k: usize, d: &B::Device) -> BasicConv2d<B> {
    BasicConv2d::new(cin, cout, [k, k], [1, 1], [k / 2, k / 2], d)
}
fn c_s2<B: Backend>(cin: usize, cout: usize, d: &B::Device) -> BasicConv2d<B> {
    BasicConv2d::new(cin, cout, [3, 3], [2, 2], [0, 0], d)
}
/// 1×n (`wide`) or n×1 convolution with "same" padding.
fn c_1xn<B: Backend>(cin: usize, cout: usize, n: usize, wide: bool, d: &B::Device) -> BasicConv2d<B> {
    if wide { BasicConv2d::new(cin, cout, [1, n], [1, 1], [0, n / 2], d) } else { BasicConv2d::new(cin, cout, [n, 1], [1, 1], [n / 2, 0], d) }
}

/// TF-style 3×3/1 average pool that ignores the zero padding (`count_include_pad=False`).
fn avg3<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    avg_pool2d(x, [3, 3], [1, 1], [1, 1], false, false)
}
fn max3_s2<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    max_pool2d(x, [3, 3], [2, 2], [0, 0], [1, 1], false)
}

/// `FIDInceptionA(in, pool_features)`: 64 + 64 + 96 + pool_features channels.
#[derive(Module, Debug)]
pub struct InceptionA<B: Backend> {
    pub branch1x1: BasicConv2d<B>,
    pub branch5x5_1: BasicConv2d<B>,
    pub branch5x5_2: BasicConv2d<B>,
    pub branch3x3dbl_1: BasicConv2d<B>,
    pub branch3x3dbl_2: BasicConv2d<B>,
    pub branch3x3dbl_3: BasicConv2d<B>,
    pub branch_pool: BasicConv2d<B>,
}

impl<B: Backend> InceptionA<B> {
    /// `Mixed_5b` / `5c` / `5d`: `in` = 192 / 256 / 288, `pool_features` = 32 / 64 / 64.
    pub fn new(cin: usize, pool_features: usize, d: &B::Device) -> Self {
        Self {
            branch1x1: c(cin, 64, 1, d),
            branch5x5_1: c(cin, 48, 1, d),
            branch5x5_2: c(48, 64, 5, d),
            branch3x3dbl_1: c(cin, 64, 1, d),
            branch3x3dbl_2: c(64, 96, 3, d),
            branch3x3dbl_3: c(96, 96, 3, d),
            branch_pool: c(cin, pool_features, 1, d),
        }
    }
    /// `[b, in, h, w]` → `[b, 224 + pool_features, h, w]` (branches concatenated in torchvision's order).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b5 = self.branch5x5_2.forward(self.branch5x5_1.forward(x.clone()));
        let b3 = self.branch3x3dbl_3.forward(self.branch3x3dbl_2.forward(self.branch3x3dbl_1.forward(x.clone())));
        let bp = self.branch_pool.forward(avg3(x));
        Tensor::cat(vec![b1, b5, b3, bp], 1)
    }
}

/// torchvision `InceptionB(in)` (`Mixed_6a`, grid reduction): 384 + 96 + in channels.
#[derive(Module, Debug)]
pub struct InceptionB<B: Backend> {
    pub branch3x3: BasicConv2d<B>,
    pub branch3x3dbl_1: BasicConv2d<B>,
    pub branch3x3dbl_2: BasicConv2d<B>,
    pub branch3x3dbl_3: BasicConv2d<B>,
}

impl<B: Backend> InceptionB<B> {
    /// `Mixed_6a`: `in` = 288.
    pub fn new(cin: usize, d: &B::Device) -> Self {
        Self { branch3x3: c_s2(cin, 384, d), branch3x3dbl_1: c(cin, 64, 1, d), branch3x3dbl_2: c(64, 96, 3, d), branch3x3dbl_3: c_s2(96, 96, d) }
    }
    /// `[b, in, h, w]` → `[b, 480 + in, (h − 3) / 2 + 1, (w − 3) / 2 + 1]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b3 = self.branch3x3.forward(x.clone());
        let bd = self.branch3x3dbl_3.forward(self.branch3x3dbl_2.forward(self.branch3x3dbl_1.forward(x.clone())));
        Tensor::cat(vec![b3, bd, max3_s2(x)], 1)
    }
}

/// `FIDInceptionC(in, channels_7x7)`: 4 × 192 channels.
#[derive(Module, Debug)]
pub struct InceptionC<B: Backend> {
    pub branch1x1: BasicConv2d<B>,
    pub branch7x7_1: BasicConv2d<B>,
    pub branch7x7_2: BasicConv2d<B>,
    pub branch7x7_3: BasicConv2d<B>,
    pub branch7x7dbl_1: BasicConv2d<B>,
    pub branch7x7dbl_2: BasicConv2d<B>,
    pub branch7x7dbl_3: BasicConv2d<B>,
    pub branch7x7dbl_4: BasicConv2d<B>,
    pub branch7x7dbl_5: BasicConv2d<B>,
    pub branch_pool: BasicConv2d<B>,
}

impl<B: Backend> InceptionC<B> {
    /// `Mixed_6b` … `6e`: `in` = 768, `channels_7x7` = 128 / 160 / 160 / 192.
    pub fn new(cin: usize, c7: usize, d: &B::Device) -> Self {
        Self {
            branch1x1: c(cin, 192, 1, d),
            branch7x7_1: c(cin, c7, 1, d),
            branch7x7_2: c_1xn(c7, c7, 7, true, d),
            branch7x7_3: c_1xn(c7, 192, 7, false, d),
            branch7x7dbl_1: c(cin, c7, 1, d),
            branch7x7dbl_2: c_1xn(c7, c7, 7, false, d),
            branch7x7dbl_3: c_1xn(c7, c7, 7, true, d),
            branch7x7dbl_4: c_1xn(c7, c7, 7, false, d),
            branch7x7dbl_5: c_1xn(c7, 192, 7, true, d),
            branch_pool: c(cin, 192, 1, d),
        }
    }
    /// `[b, 768, h, w]` → `[b, 768, h, w]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b7 = self.branch7x7_3.forward(self.branch7x7_2.forward(self.branch7x7_1.forward(x.clone())));
        let mut bd = self.branch7x7dbl_1.forward(x.clone());
        for conv in [&self.branch7x7dbl_2, &self.branch7x7dbl_3, &self.branch7x7dbl_4, &self.branch7x7dbl_5] {
            bd = conv.forward(bd);
        }
        let bp = self.branch_pool.forward(avg3(x));
        Tensor::cat(vec![b1, b7, bd, bp], 1)
    }
}

/// torchvision `InceptionD(in)` (`Mixed_7a`, grid reduction): 320 + 192 + in channels.
#[derive(Module, Debug)]
pub struct InceptionD<B: Backend> {
    pub branch3x3_1: BasicConv2d<B>,
    pub branch3x3_2: BasicConv2d<B>,
    pub branch7x7x3_1: BasicConv2d<B>,
    pub branch7x7x3_2: BasicConv2d<B>,
    pub branch7x7x3_3: BasicConv2d<B>,
    pub branch7x7x3_4: BasicConv2d<B>,
}

impl<B: Backend> InceptionD<B> {
    /// `Mixed_7a`: `in` = 768.
    pub fn new(cin: usize, d: &B::Device) -> Self {
        Self {
            branch3x3_1: c(cin, 192, 1, d),
            branch3x3_2: c_s2(192, 320, d),
            branch7x7x3_1: c(cin, 192, 1, d),
            branch7x7x3_2: c_1xn(192, 192, 7, true, d),
            branch7x7x3_3: c_1xn(192, 192, 7, false, d),
            branch7x7x3_4: c_s2(192, 192, d),
        }
    }
    /// `[b, in, h, w]` → `[b, 512 + in, (h − 3) / 2 + 1, (w − 3) / 2 + 1]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b3 = self.branch3x3_2.forward(self.branch3x3_1.forward(x.clone()));
        let mut b7 = self.branch7x7x3_1.forward(x.clone());
        for conv in [&self.branch7x7x3_2, &self.branch7x7x3_3, &self.branch7x7x3_4] {
            b7 = conv.forward(b7);
        }
        Tensor::cat(vec![b3, b7, max3_s2(x)], 1)
    }
}

/// `FIDInceptionE_1` (`max_pool: false`, average pool without padding) and `FIDInceptionE_2`
/// (`max_pool: true`, 3×3/1 max pool): 320 + 768 + 768 + 192 = 2048 channels.
#[derive(Module, Debug)]
pub struct InceptionE<B: Backend> {
    pub branch1x1: BasicConv2d<B>,
    pub branch3x3_1: BasicConv2d<B>,
    pub branch3x3_2a: BasicConv2d<B>,
    pub branch3x3_2b: BasicConv2d<B>,
    pub branch3x3dbl_1: BasicConv2d<B>,
    pub branch3x3dbl_2: BasicConv2d<B>,
    pub branch3x3dbl_3a: BasicConv2d<B>,
    pub branch3x3dbl_3b: BasicConv2d<B>,
    pub branch_pool: BasicConv2d<B>,
    pub max_pool: bool,
}

impl<B: Backend> InceptionE<B> {
    /// `Mixed_7b` (`in` 1280, average pool) / `Mixed_7c` (`in` 2048, max pool).
    pub fn new(cin: usize, max_pool: bool, d: &B::Device) -> Self {
        Self {
            branch1x1: c(cin, 320, 1, d),
            branch3x3_1: c(cin, 384, 1, d),
            branch3x3_2a: c_1xn(384, 384, 3, true, d),
            branch3x3_2b: c_1xn(384, 384, 3, false, d),
            branch3x3dbl_1: c(cin, 448, 1, d),
            branch3x3dbl_2: c(448, 384, 3, d),
            branch3x3dbl_3a: c_1xn(384, 384, 3, true, d),
            branch3x3dbl_3b: c_1xn(384, 384, 3, false, d),
            branch_pool: c(cin, 192, 1, d),
            max_pool,
        }
    }
    /// `[b, in, h, w]` → `[b, 2048, h, w]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b1 = self.branch1x1.forward(x.clone());
        let t = self.branch3x3_1.forward(x.clone());
        let b3 = Tensor::cat(vec![self.branch3x3_2a.forward(t.clone()), self.branch3x3_2b.forward(t)], 1);
        let t = self.branch3x3dbl_2.forward(self.branch3x3dbl_1.forward(x.clone()));
        let bd = Tensor::cat(vec![self.branch3x3dbl_3a.forward(t.clone()), self.branch3x3dbl_3b.forward(t)], 1);
        let pooled = if self.max_pool { max_pool2d(x, [3, 3], [1, 1], [1, 1], [1, 1], false) } else { avg3(x) };
        let bp = self.branch_pool.forward(pooled);
        Tensor::cat(vec![b1, b3, bd, bp], 1)
    }
}

/// A named stage of the network after `block1`.
type Stage<'a, B> = (&'static str, &'a dyn Fn(Tensor<B, 4>) -> Tensor<B, 4>);

/// pytorch-fid's `InceptionV3([3])` (pool3 features) with its weights.
#[derive(Module, Debug)]
pub struct FidInceptionV3<B: Backend> {
    pub conv2d_1a_3x3: BasicConv2d<B>,
    pub conv2d_2a_3x3: BasicConv2d<B>,
    pub conv2d_2b_3x3: BasicConv2d<B>,
    pub conv2d_3b_1x1: BasicConv2d<B>,
    pub conv2d_4a_3x3: BasicConv2d<B>,
    pub mixed_5b: InceptionA<B>,
    pub mixed_5c: InceptionA<B>,
    pub mixed_5d: InceptionA<B>,
    pub mixed_6a: InceptionB<B>,
    pub mixed_6b: InceptionC<B>,
    pub mixed_6c: InceptionC<B>,
    pub mixed_6d: InceptionC<B>,
    pub mixed_6e: InceptionC<B>,
    pub mixed_7a: InceptionD<B>,
    pub mixed_7b: InceptionE<B>,
    pub mixed_7c: InceptionE<B>,
}

impl<B: Backend> FidInceptionV3<B> {
    /// The architecture with placeholder weights (to be overwritten by [`load_fid_inception`]).
    pub fn new(d: &B::Device) -> Self {
        Self {
            conv2d_1a_3x3: c_s2(3, 32, d),
            conv2d_2a_3x3: BasicConv2d::new(32, 32, [3, 3], [1, 1], [0, 0], d),
            conv2d_2b_3x3: c(32, 64, 3, d),
            conv2d_3b_1x1: c(64, 80, 1, d),
            conv2d_4a_3x3: BasicConv2d::new(80, 192, [3, 3], [1, 1], [0, 0], d),
            mixed_5b: InceptionA::new(192, 32, d),
            mixed_5c: InceptionA::new(256, 64, d),
            mixed_5d: InceptionA::new(288, 64, d),
            mixed_6a: InceptionB::new(288, d),
            mixed_6b: InceptionC::new(768, 128, d),
            mixed_6c: InceptionC::new(768, 160, d),
            mixed_6d: InceptionC::new(768, 160, d),
            mixed_6e: InceptionC::new(768, 192, d),
            mixed_7a: InceptionD::new(768, d),
            mixed_7b: InceptionE::new(1280, false, d),
            mixed_7c: InceptionE::new(2048, true, d),
        }
    }

    /// The network on an already resized and normalized input `[b, 3, h, w]` (values in
    /// [−1, 1]); `tap(name, activation)` sees every stage output (the pytorch-fid module names
    /// plus `block0` / `block1` for the two max pools). Returns pool3 `[b, 2048]`.
    pub fn forward_with(&self, x: Tensor<B, 4>, tap: &mut dyn FnMut(&str, &Tensor<B, 4>)) -> Tensor<B, 2> {
        let mut x = self.conv2d_1a_3x3.forward(x);
        tap("Conv2d_1a_3x3", &x);
        x = self.conv2d_2a_3x3.forward(x);
        x = self.conv2d_2b_3x3.forward(x);
        tap("Conv2d_2b_3x3", &x);
        x = max3_s2(x);
        tap("block0", &x);
        x = max3_s2(self.conv2d_4a_3x3.forward(self.conv2d_3b_1x1.forward(x)));
        tap("block1", &x);
        let stages: [Stage<'_, B>; 11] = [
            ("Mixed_5b", &|x| self.mixed_5b.forward(x)),
            ("Mixed_5c", &|x| self.mixed_5c.forward(x)),
            ("Mixed_5d", &|x| self.mixed_5d.forward(x)),
            ("Mixed_6a", &|x| self.mixed_6a.forward(x)),
            ("Mixed_6b", &|x| self.mixed_6b.forward(x)),
            ("Mixed_6c", &|x| self.mixed_6c.forward(x)),
            ("Mixed_6d", &|x| self.mixed_6d.forward(x)),
            ("Mixed_6e", &|x| self.mixed_6e.forward(x)),
            ("Mixed_7a", &|x| self.mixed_7a.forward(x)),
            ("Mixed_7b", &|x| self.mixed_7b.forward(x)),
            ("Mixed_7c", &|x| self.mixed_7c.forward(x)),
        ];
        for (name, stage) in stages {
            x = stage(x);
            tap(name, &x);
        }
        // AdaptiveAvgPool2d((1, 1))
        let [b, ch, _, _] = x.dims();
        x.mean_dim(3).mean_dim(2).reshape([b, ch])
    }

    /// pool3 features `[b, 2048]` of images `[b, 3, h, w]` with values in [0, 1], as
    /// pytorch-fid's `InceptionV3([3])(x)[0]` (resize to 299², then 2x − 1).
    pub fn features(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        self.forward_with(preprocess(images), &mut |_, _| {})
    }
}

/// `F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)` then `2x − 1`.
pub fn preprocess<B: Backend>(images: Tensor<B, 4>) -> Tensor<B, 4> {
    resize_299(images).mul_scalar(2.0).sub_scalar(1.0)
}

/// The resize step of [`preprocess`] alone (bilinear, half-pixel centers, no antialiasing).
pub fn resize_299<B: Backend>(images: Tensor<B, 4>) -> Tensor<B, 4> {
    let opts = InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false);
    interpolate(images, [INCEPTION_SIZE, INCEPTION_SIZE], opts)
}

/// Loads pytorch-fid's Inception weights from a safetensors file with the state-dict keys of
/// `pt_inception-2015-12-05-6726825d.pth` (every key checked: missing, unexpected and
/// mis-shaped tensors are one error naming the file). Convert the `.pth` once with
/// `python -c "import torch; from safetensors.torch import save_file; save_file(torch.load('pt_inception-2015-12-05-6726825d.pth'), 'pt_inception-2015-12-05.safetensors')"`.
pub fn load_fid_inception<B: Backend>(path: &Path, device: &B::Device) -> Result<FidInceptionV3<B>> {
    // the metric's network is always f32, whatever --dtype holds the generator in
    let (model, _) =
        lora_runtime::weights::with_base_dtype(serial_lora::BaseDType::F32, || load_safetensors(FidInceptionV3::new(device), path, &KEY_TABLE, false))?;
    Ok(model)
}

/// The fixture weight formula of `tools/fixtures/fid_inception.py`, for tests without the real
/// weights: value `i` (1-based, row-major) of tensor `name` is
/// `lo + (hi − lo) · (splitmix64(fnv1a64(name) + i·0x9E3779B97F4A7C15) >> 40) / 2²⁴`, in f64, then f32.
pub fn deterministic_uniform(name: &str, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    let mut seed: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        seed ^= b as u64;
        seed = seed.wrapping_mul(0x0000_0100_0000_01B3);
    }
    (1..=n as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f64 / (1u64 << 24) as f64;
            (lo + (hi - lo) * u) as f32
        })
        .collect()
}

/// A complete pytorch-fid state dict (every key of the real `.pth` except the integer
/// `num_batches_tracked`, including the unused `fc`) drawn from [`deterministic_uniform`] with
/// the ranges of `tools/fixtures/fid_inception.py`: conv weights ±√(6/fan_in), BN weight
/// [0.5, 1.5], bias [−0.2, 0.2], running_mean [−0.2, 0.2], running_var [0.5, 2], fc ±0.02 / ±0.1.
pub fn deterministic_state_dict<B: Backend>(device: &B::Device) -> BTreeMap<String, HostTensor> {
    use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot};
    // shapes and names from the module itself (Burn paths in PyTorch naming)
    let model = FidInceptionV3::<B>::new(device);
    let mut out = BTreeMap::new();
    for snap in model.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true) {
        let path = snap.full_path();
        let key = path.replacen("mixed_", "Mixed_", 1).replacen("conv2d_", "Conv2d_", 1);
        let shape: Vec<usize> = snap.shape.to_vec();
        let (lo, hi) = if key.ends_with("conv.weight") {
            let a = (6.0 / (shape[1] * shape[2] * shape[3]) as f64).sqrt();
            (-a, a)
        } else if key.ends_with("bn.weight") {
            (0.5, 1.5)
        } else if key.ends_with("bn.running_var") {
            (0.5, 2.0)
        } else {
            (-0.2, 0.2) // bn.bias, bn.running_mean
        };
        let data = deterministic_uniform(&key, shape.iter().product(), lo, hi);
        out.insert(key, HostTensor { shape, data });
    }
    out.insert("fc.weight".into(), HostTensor { shape: vec![1008, POOL3_DIM], data: deterministic_uniform("fc.weight", 1008 * POOL3_DIM, -0.02, 0.02) });
    out.insert("fc.bias".into(), HostTensor { shape: vec![1008], data: deterministic_uniform("fc.bias", 1008, -0.1, 0.1) });
    out
}
