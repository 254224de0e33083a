//! The VAE: diffusers `AutoencoderKL` as SD3 uses it (no quant convs): encoder (ResNet down
//! blocks, mid block with single-head attention, `2·latent` moments) and decoder (mid block, ResNet
//! up blocks with nearest ×2 upsampling); `scaling_factor` / `shift_factor` from its config.
//! Upstream: diffusers `models/autoencoders/autoencoder_kl.py`, `vae.py` (`Encoder`, `Decoder`),
//! `resnet.py::ResnetBlock2D`, `unets/unet_2d_blocks.py` (`UNetMidBlock2D`, `DownEncoderBlock2D`,
//! `UpDecoderBlock2D`), `downsampling.py`, `upsampling.py` (v0.42.1).
use std::path::Path;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::ops::PadMode;
use lora_runtime::weights::{KeyTable, load_safetensors};
use serde::{Deserialize, Serialize};
use serial_lora::half::f32_view;
use serial_lora::{Attention, AttentionConfig, sdpa};

use crate::error::{Result, Sd3Error};

/// `vae/config.json` (the fields SD3's VAE uses).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    /// SD3's VAE.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 16,
            norm_num_groups: 32,
            scaling_factor: 1.5305,
            shift_factor: Some(0.0609),
            use_quant_conv: false,
            use_post_quant_conv: false,
            mid_block_add_attention: true,
        }
    }
}

fn conv3<B: Backend>(i: usize, o: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([i, o], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(device)
}

fn group_norm<B: Backend>(groups: usize, c: usize, device: &B::Device) -> GroupNorm<B> {
    GroupNormConfig::new(groups, c).with_epsilon(1e-6).init(device)
}

/// `ResnetBlock2D` without time embedding.
#[derive(Module, Debug)]
pub struct ResnetBlock<B: Backend> {
    pub norm1: GroupNorm<B>,
    pub conv1: Conv2d<B>,
    pub norm2: GroupNorm<B>,
    pub conv2: Conv2d<B>,
    pub conv_shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> ResnetBlock<B> {
    fn new(i: usize, o: usize, groups: usize, device: &B::Device) -> Self {
        Self {
            norm1: group_norm(groups, i, device),
            conv1: conv3(i, o, device),
            norm2: group_norm(groups, o, device),
            conv2: conv3(o, o, device),
            conv_shortcut: (i != o).then(|| Conv2dConfig::new([i, o], [1, 1]).init(device)),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = f32_view(&self.conv1).forward(silu(self.norm1.forward(x.clone())));
        let h = f32_view(&self.conv2).forward(silu(self.norm2.forward(h)));
        let x = match &self.conv_shortcut {
            Some(c) => f32_view(c).forward(x),
            None => x,
        };
        x + h
    }
}

/// The mid block's attention: group norm, single-head attention over positions, residual.
#[derive(Module, Debug)]
pub struct MidAttention<B: Backend> {
    pub group_norm: GroupNorm<B>,
    pub attention: Attention<B>,
}

impl<B: Backend> MidAttention<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let t = self.group_norm.forward(x.clone()).reshape([b, c, h * w]).swap_dims(1, 2);
        let (q, k, v) = self.attention.qkv(t);
        let a = &self.attention;
        let o = a.output(sdpa(a.split_heads(q), a.split_heads(k), a.split_heads(v), None, None));
        x + o.swap_dims(1, 2).reshape([b, c, h, w])
    }
}

/// `UNetMidBlock2D`: resnet, attention, resnet.
#[derive(Module, Debug)]
pub struct MidBlock<B: Backend> {
    pub resnets: Vec<ResnetBlock<B>>,
    pub attentions: Vec<MidAttention<B>>,
}

impl<B: Backend> MidBlock<B> {
    fn new(c: usize, groups: usize, attention: bool, device: &B::Device) -> Self {
        Self {
            resnets: vec![ResnetBlock::new(c, c, groups, device), ResnetBlock::new(c, c, groups, device)],
            attentions: if attention {
                vec![MidAttention { group_norm: group_norm(groups, c, device), attention: AttentionConfig::new(c, 1).init(device) }]
            } else {
                Vec::new()
            },
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x);
        for a in &self.attentions {
            x = a.forward(x);
        }
        self.resnets[1].forward(x)
    }
}

/// A strided 3×3 conv (`Downsample2D`, zero padding right/bottom) or a 3×3 conv after nearest ×2
/// upsampling (`Upsample2D`).
#[derive(Module, Debug)]
pub struct Resample<B: Backend> {
    pub conv: Conv2d<B>,
}

/// `DownEncoderBlock2D` / `UpDecoderBlock2D`.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub resnets: Vec<ResnetBlock<B>>,
    pub downsamplers: Vec<Resample<B>>,
    pub upsamplers: Vec<Resample<B>>,
}

impl<B: Backend> Block<B> {
    fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for r in &self.resnets {
            x = r.forward(x);
        }
        for d in &self.downsamplers {
            x = f32_view(&d.conv).forward(x.pad([(0, 0), (0, 0), (0, 1), (0, 1)], PadMode::Constant(0.0)));
        }
        for u in &self.upsamplers {
            let [b, c, h, w] = x.dims();
            let up = x.reshape([b, c, h, 1, w, 1]).expand([b, c, h, 2, w, 2]).reshape([b, c, 2 * h, 2 * w]);
            x = f32_view(&u.conv).forward(up);
        }
        x
    }
}

/// `Encoder` / `Decoder` of `AutoencoderKL`.
#[derive(Module, Debug)]
pub struct Coder<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub down_blocks: Vec<Block<B>>,
    pub mid_block: MidBlock<B>,
    pub up_blocks: Vec<Block<B>>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Coder<B> {
    /// Runs the coder; also returns the mid block's output.
    fn forward(&self, x: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let mut x = f32_view(&self.conv_in).forward(x);
        for b in &self.down_blocks {
            x = b.forward(x);
        }
        let mid = self.mid_block.forward(x);
        let mut x = mid.clone();
        for b in &self.up_blocks {
            x = b.forward(x);
        }
        (f32_view(&self.conv_out).forward(silu(self.conv_norm_out.forward(x))), mid)
    }
}

/// `AutoencoderKL` without quant convs.
#[derive(Module, Debug)]
pub struct Vae<B: Backend> {
    pub encoder: Coder<B>,
    pub decoder: Coder<B>,
}

impl<B: Backend> Vae<B> {
    pub fn new(c: &VaeConfig, device: &B::Device) -> Self {
        let ch = &c.block_out_channels;
        let (g, n) = (c.norm_num_groups, ch.len());
        let down_blocks = (0..n)
            .map(|i| {
                let input = if i == 0 { ch[0] } else { ch[i - 1] };
                Block {
                    resnets: (0..c.layers_per_block).map(|j| ResnetBlock::new(if j == 0 { input } else { ch[i] }, ch[i], g, device)).collect(),
                    downsamplers: if i + 1 < n {
                        vec![Resample { conv: Conv2dConfig::new([ch[i], ch[i]], [3, 3]).with_stride([2, 2]).init(device) }]
                    } else {
                        Vec::new()
                    },
                    upsamplers: Vec::new(),
                }
            })
            .collect();
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let up_blocks = (0..n)
            .map(|i| {
                let prev = if i == 0 { rev[0] } else { rev[i - 1] };
                Block {
                    resnets: (0..=c.layers_per_block).map(|j| ResnetBlock::new(if j == 0 { prev } else { rev[i] }, rev[i], g, device)).collect(),
                    downsamplers: Vec::new(),
                    upsamplers: if i + 1 < n { vec![Resample { conv: conv3(rev[i], rev[i], device) }] } else { Vec::new() },
                }
            })
            .collect();
        let last = ch[n - 1];
        Self {
            encoder: Coder {
                conv_in: conv3(c.in_channels, ch[0], device),
                down_blocks,
                mid_block: MidBlock::new(last, g, c.mid_block_add_attention, device),
                up_blocks: Vec::new(),
                conv_norm_out: group_norm(g, last, device),
                conv_out: conv3(last, 2 * c.latent_channels, device),
            },
            decoder: Coder {
                conv_in: conv3(c.latent_channels, last, device),
                down_blocks: Vec::new(),
                mid_block: MidBlock::new(last, g, c.mid_block_add_attention, device),
                up_blocks,
                conv_norm_out: group_norm(g, ch[0], device),
                conv_out: conv3(ch[0], c.out_channels, device),
            },
        }
    }

    /// Image `[b, 3, H, W]` in [−1, 1] → the latent distribution's mean and log-variance
    /// (clamped to [−30, 20]), each `[b, latent, H/f, W/f]`, and the encoder's mid-block output.
    pub fn encode(&self, image: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let (moments, mid) = self.encoder.forward(image);
        let mut halves = moments.chunk(2, 1).into_iter();
        let (mean, logvar) = (halves.next().expect("2 chunks"), halves.next().expect("2 chunks"));
        (mean, logvar.clamp(-30.0, 20.0), mid)
    }

    /// Latents `[b, latent, h, w]` (unscaled) → image `[b, 3, h·f, w·f]` and the decoder's
    /// mid-block output.
    pub fn decode(&self, latents: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        self.decoder.forward(latents)
    }
}

impl VaeConfig {
    /// Checks every value before anything is computed from it (the group norms need channels
    /// divisible by `norm_num_groups`), and that no tensor exceeds
    /// [`serial_lora::parse::MAX_TENSOR_ELEMENTS`]; errors name the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        use serial_lora::parse;
        if self.use_quant_conv || self.use_post_quant_conv {
            return Err(format!(
                "SD3's VAE has no quant convs (`use_quant_conv` = {}, `use_post_quant_conv` = {})",
                self.use_quant_conv, self.use_post_quant_conv
            ));
        }
        parse::in_range("block_out_channels (length)", self.block_out_channels.len(), 1, 64)?;
        parse::in_range("layers_per_block", self.layers_per_block, 1, parse::MAX_LAYERS)?;
        let groups = parse::at_least("norm_num_groups", self.norm_num_groups, 1)?;
        let cin = parse::at_least("in_channels", self.in_channels, 1)?;
        let cout = parse::at_least("out_channels", self.out_channels, 1)?;
        let latent = parse::at_least("latent_channels", self.latent_channels, 1)?;
        parse::finite("scaling_factor", self.scaling_factor, f64::MIN, false)?;
        if let Some(shift) = self.shift_factor {
            parse::finite("shift_factor", shift, f64::MIN, false)?;
        }
        let mut parts = Vec::new();
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            let field = format!("block_out_channels[{i}]");
            parse::at_least(&field, c, 1)?;
            parse::exact_div(&format!("`{field}`"), c, "norm_num_groups", groups)?;
            parts.push(parse::elements("a 3×3 convolution", &[(&field, c), (&field, c), ("3 · 3", 9)])?.saturating_mul(2 * self.layers_per_block as u64 + 3));
        }
        let (first, last) = (self.block_out_channels[0], self.block_out_channels[self.block_out_channels.len() - 1]);
        parts.push(parse::elements("the input convolution", &[("in_channels", cin), ("block_out_channels[0]", first), ("3 · 3", 9)])?);
        parts.push(parse::elements("the output convolution", &[("out_channels", cout), ("block_out_channels[0]", first), ("3 · 3", 9)])?);
        parts.push(parse::elements(
            "the latent convolution",
            &[("latent_channels · 2", latent.saturating_mul(2)), ("block_out_channels[-1]", last), ("3 · 3", 9)],
        )?);
        let named: Vec<(&str, u64)> = parts.iter().map(|&n| ("block_out_channels", n)).collect();
        parse::total_elements(&named)?;
        Ok(())
    }
}

/// diffusers `AutoencoderKL` keys → Burn paths.
pub const VAE_KEY_TABLE: KeyTable = KeyTable {
    rules: &[&[
        (r"^(.+\.mid_block\.attentions\.\d+)\.to_(q|k|v)\.(weight|bias)$", "$1.attention.qkv.Separate.$2.base.$3"),
        (r"^(.+\.mid_block\.attentions\.\d+)\.to_out\.0\.(weight|bias)$", "$1.attention.o.base.$2"),
    ]],
    ignore: &[],
    by_hand: &[],
};

/// Loads `dir/vae/` of a diffusers SD3 directory.
pub fn load_vae<B: Backend>(dir: &Path, device: &B::Device) -> Result<(Vae<B>, VaeConfig)> {
    let sub = dir.join("vae");
    let path = sub.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Sd3Error::Io { path: path.clone(), source: e })?;
    let cfg: VaeConfig = serial_lora::parse::json(&text).map_err(|message| Sd3Error::Config { path: path.clone(), message })?;
    cfg.validate().map_err(|message| Sd3Error::Config { path: path.clone(), message })?;
    let (vae, _) = load_safetensors(Vae::new(&cfg, device), &sub.join("diffusion_pytorch_model.safetensors"), &VAE_KEY_TABLE, false)?;
    Ok((vae, cfg))
}
