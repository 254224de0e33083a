//! The denoising loop of diffusers' `StableDiffusion3Pipeline` from given prompt embeddings
//! and initial latents: flow-matching Euler steps with classifier-free guidance
//! `uncond + g·(cond − uncond)` (uncond first in the batch, as diffusers concatenates).
//! Upstream: diffusers `pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py` (v0.42.1).
use burn::prelude::*;

use crate::error::{Result, Sd3Error};
use crate::mmdit::Sd3Transformer;
use crate::scheduler::{euler_step, flow_match_schedule};

/// Text conditioning in the pipeline's argument names and shapes.
#[derive(Clone, Debug)]
pub struct PromptEmbeds<B: Backend> {
    /// `[b, tokens, joint_attention_dim]`.
    pub prompt_embeds: Tensor<B, 3>,
    /// `[b, pooled_projection_dim]`.
    pub pooled_prompt_embeds: Tensor<B, 2>,
    /// The same for the negative prompt (needed when guidance > 1).
    pub negative: Option<(Tensor<B, 3>, Tensor<B, 2>)>,
}

/// Sampling settings.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub steps: usize,
    pub guidance: f32,
    /// The scheduler's `shift` (`scheduler/scheduler_config.json`; SD3: 3.0).
    pub shift: f64,
}

/// Whether every value of `t` is finite (`Σ 0·t` is 0 exactly then; one host read).
fn all_finite<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    t.clone().mul_scalar(0.0).sum().into_scalar().elem::<f32>() == 0.0
}

/// Denoises `latents [b, c, h, w]` (initial noise) into the final latents.
pub fn denoise<B: Backend>(
    model: &Sd3Transformer<B>,
    latents: Tensor<B, 4>,
    cond: &PromptEmbeds<B>,
    opts: &SampleOptions,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Tensor<B, 4>> {
    if opts.steps == 0 {
        return Err(Sd3Error::Input("--steps must be at least 1".into()));
    }
    if !(opts.guidance.is_finite() && opts.guidance >= 0.0) {
        return Err(Sd3Error::Input(format!("--guidance {} must be a finite number ≥ 0 (≤ 1 turns classifier-free guidance off)", opts.guidance)));
    }
    if !(opts.shift.is_finite() && opts.shift > 0.0) {
        return Err(Sd3Error::Input(format!("the scheduler shift {} (scheduler_config.json) must be a finite number > 0", opts.shift)));
    }
    let mut inputs = vec![
        ("latents", all_finite(&latents)),
        ("prompt_embeds", all_finite(&cond.prompt_embeds)),
        ("pooled_prompt_embeds", all_finite(&cond.pooled_prompt_embeds)),
    ];
    if let Some((ne, np)) = &cond.negative {
        for (name, neg, pos) in [
            ("negative_prompt_embeds", ne.dims().to_vec(), cond.prompt_embeds.dims().to_vec()),
            ("negative_pooled_prompt_embeds", np.dims().to_vec(), cond.pooled_prompt_embeds.dims().to_vec()),
        ] {
            if neg != pos {
                return Err(Sd3Error::Input(format!("{name} has shape {neg:?}; it must match the positive embeddings' {pos:?}")));
            }
        }
        inputs.extend([("negative_prompt_embeds", all_finite(ne)), ("negative_pooled_prompt_embeds", all_finite(np))]);
    }
    if let Some((name, _)) = inputs.iter().find(|(_, ok)| !ok) {
        return Err(Sd3Error::Input(format!("{name} holds NaN or ±inf values: every input must be finite")));
    }
    let cfg = opts.guidance > 1.0;
    let (embeds, pooled) = if cfg {
        let (ne, np) = cond.negative.clone().ok_or_else(|| Sd3Error::Input("guidance > 1 needs negative prompt embeddings".into()))?;
        (Tensor::cat(vec![ne, cond.prompt_embeds.clone()], 0), Tensor::cat(vec![np, cond.pooled_prompt_embeds.clone()], 0))
    } else {
        (cond.prompt_embeds.clone(), cond.pooled_prompt_embeds.clone())
    };
    let (sigmas, timesteps) = flow_match_schedule(opts.steps, opts.shift, 1000);
    let mut x = latents;
    for (i, t) in timesteps.iter().enumerate() {
        let input = if cfg { Tensor::cat(vec![x.clone(), x.clone()], 0) } else { x.clone() };
        let ts = vec![*t; input.dims()[0]];
        let v = model.forward(input, embeds.clone(), pooled.clone(), &ts)?;
        let v = if cfg {
            let b = x.dims()[0];
            let (u, c) = (v.clone().narrow(0, 0, b), v.narrow(0, b, b));
            u.clone() + (c - u).mul_scalar(opts.guidance)
        } else {
            v
        };
        x = euler_step(x, v, sigmas[i], sigmas[i + 1]);
        on_step(i + 1, opts.steps);
    }
    Ok(x)
}

/// The pipeline's image output of final latents `[b, c, h, w]`: `vae.decode(z / scaling +
/// shift)`, then `(x / 2 + 0.5).clamp(0, 1)` and 8-bit rounding (diffusers' `VaeImageProcessor`
/// `postprocess(output_type="pil")`: `(x * 255).round()`).
pub fn decode_to_rgb<B: Backend>(vae: &crate::vae::Vae<B>, cfg: &crate::vae::VaeConfig, latents: Tensor<B, 4>) -> Vec<lora_runtime::imaging::RgbImage> {
    let scaled = latents.div_scalar(cfg.scaling_factor).add_scalar(cfg.shift_factor.unwrap_or(0.0));
    let (image, _) = vae.decode(scaled);
    let image = image.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0);
    let [n, _, h, w] = image.dims();
    let px: Vec<f32> = image.into_data().iter::<f32>().collect();
    (0..n)
        .map(|i| {
            let data = (0..h * w).flat_map(|p| (0..3).map(move |c| (c, p))).map(|(c, p)| (px[(i * 3 + c) * h * w + p] * 255.0).round() as u8).collect();
            lora_runtime::imaging::RgbImage { width: w, height: h, data }
        })
        .collect()
}
