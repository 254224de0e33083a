//! SD3 fine-tuning on the tiny fixture (`tests/fixtures/sd3-tiny`) with generated captioned
//! images: one training step against diffusers' formulas (`tools/fixtures/sd3_train_step.py`),
//! the loss goes down for every method, bit-identical resume, adapters that load back (library
//! and `sd3-gen sample --adapter`), datasets and bad input named without a panic.
#[path = "../../../tests/common/parity.rs"]
mod parity;

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use lora_runtime::run::RunOptions;
use sd3_gen::data::CaptionDataset;
use sd3_gen::data::CaptionedImage;
use sd3_gen::train::{TrainConfig, clip_grad_norm, flow_matching_loss, logit_normal_index, pixel_values, scaled_latents, train, training_schedule};
use sd3_gen::vae::load_vae;
use sd3_gen::{Sd3Error, Sd3Transformer, load_transformer};
use serial_lora::ParamCountExt;
use serial_lora::io::{self, HostTensor, read_safetensors};

type AB = Autodiff<Flex>;
type B = Flex;

/// f32 forward + backward through 2 MMDiT blocks, different summation order than PyTorch.
const LOSS_REL_TOL: f32 = 1e-5;
/// Gradients accumulate more rounding (backward through attention and adaLN): relative to the
/// largest gradient entry of each tensor.
const GRAD_REL_TOL: f32 = 1e-4;
/// Elementwise f32 ops (exp, mul, sub) on the same inputs as torch.
const LATENT_ABS_TOL: f32 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// `n` captioned 24×20 PNGs (a coloured rectangle on a gradient, caption naming the colour)
/// with same-stem .txt captions.
fn captioned(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let colours = [("red", [220u8, 30, 30]), ("green", [30, 200, 40]), ("blue", [40, 60, 220]), ("yellow", [230, 220, 40])];
    for i in 0..n {
        let (name, c) = colours[i % colours.len()];
        let (x0, y0) = (2 + (i as u32 * 5) % 10, 2 + (i as u32 * 3) % 8);
        let img = image::RgbImage::from_fn(24, 20, |x, y| {
            if (x0..x0 + 10).contains(&x) && (y0..y0 + 8).contains(&y) { image::Rgb(c) } else { image::Rgb([(x * 10) as u8, (y * 12) as u8, 128]) }
        });
        img.save(dir.join(format!("img{i:02}.png"))).unwrap();
        std::fs::write(dir.join(format!("img{i:02}.txt")), format!("a {name} box, painting number {i}")).unwrap();
    }
}

fn config(data: &Path, method: &str) -> TrainConfig {
    TrainConfig {
        model: fixture("sd3-tiny").display().to_string(),
        gradient_checkpointing: false,
        dtype: Default::default(),
        dataset: data.to_path_buf(),
        fraction: 1.0,
        seed: 3,
        split_seed: 0,
        test_fraction: 0.0,
        method: method.into(),
        rank: 4,
        alpha: None,
        lora_dropout: 0.0,
        lr: 1e-2,
        lr_ratio: 4.0,
        lr_scheduler: "constant".into(),
        lr_warmup_steps: 0,
        weight_decay: 1e-4,
        max_grad_norm: 1.0,
        epochs: None,
        iters: Some(40),
        resolution: 16,
        batch: 4,
        grad_accum: 1,
        random_flip: false,
        max_sequence_length: 3,
        no_t5: true,
        save_steps: None,
        validation_prompt: Vec::new(),
        validation_steps: None,
        validation_inference_steps: 2,
        validation_guidance_scale: 3.0,
    }
}

/// Replaces every parameter by its gradient (parameters without one stay).
struct ToGrad<'a>(&'a GradientsParams);

impl ModuleMapper<B> for ToGrad<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let t = self.0.get::<B, D>(id).unwrap_or(tensor);
        Param::from_mapped_value(id, t, mapper)
    }
}

/// One training step of diffusers' SD3 LoRA script on given draws: the latent sampling, the
/// timestep table and index, the loss and every LoRA gradient.
#[test]
fn one_step_matches_diffusers() {
    let dev = Default::default();
    let (mut t, _) = read_safetensors(&fixture("sd3-train-step/step.safetensors")).unwrap();
    let mut take = |k: &str| t.remove(k).unwrap_or_else(|| panic!("fixture has no {k}"));
    let (want_t, want_s) = (take("schedule.timesteps"), take("schedule.sigmas"));
    let (ts, ss) = training_schedule(3.0, 1000);
    assert_eq!(ts, want_t.data, "training timesteps");
    assert_eq!(ss, want_s.data, "training sigmas");
    let (u, idx) = (take("u_normal"), take("indices"));
    let ours: Vec<f32> = u.data.iter().map(|&x| logit_normal_index(x, 1000) as f32).collect();
    assert_eq!(ours, idx.data, "timestep indices");
    let ours_t: Vec<f32> = ours.iter().map(|&i| ts[i as usize]).collect();
    assert_eq!(ours_t, take("timesteps").data);
    let sigmas: Vec<f32> = ours.iter().map(|&i| ss[i as usize]).collect();
    assert_eq!(sigmas, take("sigmas").data);

    let (vae, vae_cfg) = load_vae::<B>(&fixture("sd3-tiny"), &dev).unwrap();
    let (mean, logvar, _) = vae.encode(take("pixel_values").to_tensor(&dev));
    let (want_mean, want_logvar) = (take("latent_mean"), take("latent_logvar"));
    let d_mean = max_abs(&HostTensor::from_tensor(mean).data, &want_mean.data);
    let d_logvar = max_abs(&HostTensor::from_tensor(logvar).data, &want_logvar.data);
    let x0 = scaled_latents::<B>(want_mean.to_tensor(&dev), want_logvar.to_tensor(&dev), take("latent_eps").to_tensor(&dev), &vae_cfg);
    let want_x0 = take("model_input");
    let d_x0 = max_abs(&HostTensor::from_tensor(x0).data, &want_x0.data);
    eprintln!("vae mean {d_mean:.2e} logvar {d_logvar:.2e} model_input {d_x0:.2e}");
    assert!(d_mean < 1e-4 && d_logvar < 1e-4 && d_x0 < LATENT_ABS_TOL);

    let (base, _) = load_transformer::<AB>(&fixture("sd3-tiny"), &dev).unwrap();
    let (model, cfg) = io::load_adapter_with_prefix(base, fixture("sd3-tiny/lora"), &dev, "transformer.").unwrap();
    let (loss, _) = flow_matching_loss(
        &model,
        want_x0.to_tensor(&dev),
        take("noise").to_tensor(&dev),
        &sigmas,
        &ours_t,
        take("prompt_embeds").to_tensor(&dev),
        take("pooled_prompt_embeds").to_tensor(&dev),
    )
    .unwrap();
    let want_loss = take("loss").data[0];
    let got = loss.clone().into_scalar().elem::<f32>();
    let rel = (got - want_loss).abs() / want_loss.abs();
    eprintln!("loss {got} vs diffusers {want_loss}: rel {rel:.2e}");
    assert!(rel < LOSS_REL_TOL);

    let mut grads = GradientsParams::from_grads(loss.backward(), &model);
    // The gradients in diffusers' key layout: each parameter replaced by its gradient, saved.
    let as_file = |grads: &GradientsParams| {
        let dir = tempfile::tempdir().unwrap();
        io::save_adapter_with_prefix(&model.valid().map(&mut ToGrad(grads)), &cfg, dir.path(), None, "transformer.").unwrap();
        read_safetensors(&dir.path().join(io::WEIGHTS_FILE)).unwrap().0
    };
    let compare = |t: &mut std::collections::BTreeMap<String, HostTensor>, ours: &std::collections::BTreeMap<String, HostTensor>, prefix: &str| {
        let mut worst = 0f32;
        for (k, g) in ours {
            let want = t.remove(&format!("{prefix}.{k}")).unwrap_or_else(|| panic!("fixture has no {prefix} for {k}"));
            let scale = want.data.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
            worst = worst.max(max_abs(&g.data, &want.data) / scale);
        }
        assert_eq!(ours.len(), 16, "4 projections × 2 blocks × (A, B)");
        worst
    };
    let worst = compare(&mut t, &as_file(&grads), "grad");
    eprintln!("worst LoRA gradient error {worst:.2e} (relative to each tensor's max)");
    assert!(worst < GRAD_REL_TOL);

    // clip_grad_norm_(max_norm 0.5) as torch: the total norm and the scaled gradients
    let ids: Vec<_> = serial_lora::params::param_infos(&model).into_iter().filter(|p| p.trainable).map(|p| (p.id, p.ndim)).collect();
    let norm = clip_grad_norm::<AB>(&mut grads, &ids, 0.5);
    let want_norm = take_norm(&mut t);
    eprintln!("gradient norm {norm} vs torch {want_norm}");
    assert!((norm - want_norm).abs() / want_norm < GRAD_REL_TOL);
    let worst = compare(&mut t, &as_file(&grads), "clipped");
    eprintln!("worst clipped-gradient error {worst:.2e}");
    assert!(worst < GRAD_REL_TOL);

    // learning rates of diffusers' get_scheduler (warm-up 4 of 12 steps)
    let mut lr_cfg = config(Path::new("."), "lora");
    (lr_cfg.lr, lr_cfg.lr_warmup_steps) = (1e-4, 4);
    for name in ["constant", "constant_with_warmup", "cosine"] {
        lr_cfg.lr_scheduler = name.into();
        let ours: Vec<f32> = (0..12).map(|s| lr_cfg.lr_at(s, 12) as f32).collect();
        let want = &t[&format!("lr.{name}")].data;
        assert!(max_abs(&ours, want) <= 1e-6 * 1e-4, "{name}: {ours:?} vs {want:?}");
    }
}

fn take_norm(t: &mut std::collections::BTreeMap<String, HostTensor>) -> f32 {
    t.remove("grad_norm").expect("fixture has grad_norm").data[0]
}

/// The step of [`one_step_matches_diffusers`] with the transformer in bf16 under
/// `half::autocast` (what `sd3-gen train --dtype bf16` runs) against diffusers' SD3 LoRA script
/// under mixed precision: the transformer loaded in bf16, the LoRA cast to f32
/// (`cast_training_params`), the forward under `torch.autocast(bf16)`
/// (`tools/fixtures/half_reference.py`). Per tensor, relative to its largest entry, torch's own
/// autocast gradients are up to 5.5e-2 from its f32 ones; ours compute the forward in f32 and
/// sit between the two (measured: 5.0e-2 from torch's autocast step, 1.6e-2 from its f32 step;
/// loss 4e-3 apart). Tolerance: 1.5 × torch's own drift, the rule of the SAM bf16 parity
/// (`parity::BF16_TOL` where that is larger).
#[test]
fn one_bf16_step_under_autocast_matches_diffusers_under_autocast() {
    let dev = Default::default();
    let (mut t, _) = read_safetensors(&fixture("sd3-train-step/step.safetensors")).unwrap();
    let (mut want, _) = read_safetensors(&fixture("sd3-train-step/bf16_step.safetensors")).unwrap();
    let mut take = |k: &str| t.remove(k).unwrap_or_else(|| panic!("fixture has no {k}"));
    let (sigmas, timesteps) = (take("sigmas").data, take("timesteps").data);
    let (base, _) = lora_runtime::weights::with_base_dtype(serial_lora::BaseDType::Bf16, || load_transformer::<AB>(&fixture("sd3-tiny"), &dev)).unwrap();
    let (model, cfg) = io::load_adapter_with_prefix(base.no_grad(), fixture("sd3-tiny/lora"), &dev, "transformer.").unwrap();
    let (x0, noise) = (take("model_input").to_tensor(&dev), take("noise").to_tensor(&dev));
    let (embeds, pooled) = (take("prompt_embeds").to_tensor(&dev), take("pooled_prompt_embeds").to_tensor(&dev));
    let (loss, _) =
        serial_lora::half::autocast(serial_lora::BaseDType::Bf16, || flow_matching_loss(&model, x0, noise, &sigmas, &timesteps, embeds, pooled)).unwrap();
    let (got_loss, want_loss, f32_loss) = (loss.clone().into_scalar().elem::<f32>(), want["loss"].data[0], take("loss").data[0]);
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let dir = tempfile::tempdir().unwrap();
    io::save_adapter_with_prefix(&model.valid().map(&mut ToGrad(&grads)), &cfg, dir.path(), None, "transformer.").unwrap();
    let ours = read_safetensors(&dir.path().join(io::WEIGHTS_FILE)).unwrap().0;
    assert_eq!(ours.len(), 16, "4 projections × 2 blocks × (A, B)");
    let rel = |a: &[f32], b: &[f32]| max_abs(a, b) / b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    let (mut vs_torch, mut vs_f32, mut torch_drift) = (0f32, 0f32, 0f32);
    for (k, g) in &ours {
        let (bf, f) = (want.remove(&format!("grad.{k}")).unwrap(), take(&format!("grad.{k}")));
        vs_torch = vs_torch.max(rel(&g.data, &bf.data));
        vs_f32 = vs_f32.max(rel(&g.data, &f.data));
        torch_drift = torch_drift.max(rel(&bf.data, &f.data));
    }
    let tol = parity::BF16_TOL.max(1.5 * torch_drift);
    println!(
        "loss {got_loss} (diffusers under autocast {want_loss}, in f32 {f32_loss}); gradients {vs_torch:.2e} from autocast's, {vs_f32:.2e} from f32's; torch's own drift {torch_drift:.2e}"
    );
    assert!((got_loss - want_loss).abs() / want_loss < tol, "loss {got_loss} vs {want_loss}");
    assert!(vs_torch < tol, "gradients {vs_torch:e} from diffusers under autocast (tolerance {tol:e})");
    assert!(vs_f32 < tol, "gradients {vs_f32:e} from diffusers in f32 (tolerance {tol:e})");
}

/// Pixel values of a 8-bit image after `(x/255 − 0.5)/0.5` in f32, same as torchvision's.
const PIXEL_ABS_TOL: f32 = 1e-6;

/// The script's image transform (resize short side bilinear, flip, center crop with Python's
/// rounding, normalize) on odd-sized images vs torchvision on PIL.
#[test]
fn image_transform_matches_torchvision() {
    let (t, _) = read_safetensors(&fixture("sd3-train-step/step.safetensors")).unwrap();
    for name in ["wide", "tall"] {
        let ex = CaptionedImage { image: fixture(&format!("sd3-train-step/{name}.png")), text: "x".into() };
        for res in [8, 16] {
            for flip in [false, true] {
                let key = format!("transform.{name}.{res}.{}", if flip { "flip" } else { "plain" });
                let d = max_abs(&pixel_values(&ex, res, flip).unwrap(), &t[&key].data);
                assert!(d < PIXEL_ABS_TOL, "{key}: {d}");
            }
        }
    }
}

/// The flow-matching loss of `model` on the training images at fixed σ and noise (the latent
/// means): a deterministic measure of fit.
fn fit_loss(model: &Sd3Transformer<B>, run: &Path) -> f32 {
    let dev = Default::default();
    let (_, vae_cfg) = load_vae::<B>(&fixture("sd3-tiny"), &dev).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(run.join("cache")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut total = 0.0;
    for (i, f) in files.iter().enumerate() {
        let (mut t, _) = read_safetensors(f).unwrap();
        let mean: Tensor<B, 3> = t.remove("latent_mean").unwrap().to_tensor(&dev);
        let x0 = mean.unsqueeze_dim::<4>(0).sub_scalar(vae_cfg.shift_factor.unwrap()).mul_scalar(vae_cfg.scaling_factor);
        let pe: Tensor<B, 2> = t.remove("prompt_embeds").unwrap().to_tensor(&dev);
        let pp: Tensor<B, 1> = t.remove("pooled_prompt_embeds").unwrap().to_tensor(&dev);
        for (j, s) in [0.25f32, 0.5, 0.75].into_iter().enumerate() {
            let noise = serial_lora::rng::normal(x0.dims(), 1.0, &mut serial_lora::rng::rng((i * 3 + j) as u64), &dev);
            let (loss, _) =
                flow_matching_loss(model, x0.clone(), noise, &[s], &[s * 1000.0], pe.clone().unsqueeze_dim(0), pp.clone().unsqueeze_dim(0)).unwrap();
            total += loss.into_scalar().elem::<f32>();
        }
    }
    total / (3 * files.len()) as f32
}

/// Every method lowers the fit loss; trainable counts are exact (Serial = ¼ of LoRA); the saved
/// adapter is in the promised format and loads back.
#[test]
fn loss_goes_down_for_each_method() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    captioned(&data, 8);
    let dev = Default::default();
    let (base, _) = load_transformer::<B>(&fixture("sd3-tiny"), &dev).unwrap();
    let mut counts = Vec::new();
    for method in ["lora", "serial-lora", "lora-plus", "serial-lora-plus"] {
        let out = tmp.path().join(method);
        let m = train::<AB>(&config(&data, method), &out, &RunOptions::default(), &dev, &mut |_| {}).unwrap();
        assert!(m.run.completed && m.run.loss.iter().all(|l| l.is_finite()));
        let file = m.adapter.clone().unwrap();
        let serial = method.starts_with("serial");
        assert_eq!(file.file_name().unwrap(), if serial { io::WEIGHTS_FILE } else { io::DIFFUSERS_WEIGHTS_FILE });
        let (trained, cfg) = io::load_adapter_with_prefix(base.clone(), &out, &dev, "transformer.").unwrap();
        assert_eq!((cfg.rank, cfg.alpha), (4, 4.0));
        assert_eq!(trained.param_counts().total - base.param_counts().total, m.trainable_params);
        let (before, after) = (fit_loss(&base, &out), fit_loss(&trained, &out));
        eprintln!("{method}: fit loss {before:.4} -> {after:.4}; step loss {:.4} -> {:.4}", m.run.loss[0], m.final_loss);
        assert!(after < 0.9 * before, "{method}: fit loss {before} -> {after}");
        counts.push(m.trainable_params);
    }
    // 2 blocks of width 16 at rank 4: LoRA on Q, K, V, O = 2·4·r·2d, Serial = 2·r·2d.
    assert_eq!(counts, vec![1024, 256, 1024, 256]);
}

/// A run stopped after 3 steps and resumed reaches the same adapter and losses, bit for bit, as
/// an uninterrupted one (with gradient accumulation, clipping, cosine warm-up, dropout, flips).
#[test]
fn resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    captioned(&data, 6);
    let dev = Default::default();
    let mut cfg = config(&data, "serial-lora-plus");
    (cfg.iters, cfg.batch, cfg.grad_accum, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.lora_dropout, cfg.random_flip) =
        (Some(6), 2, 2, "cosine".into(), 2, 0.1, true);
    cfg.save_steps = Some(2);
    let full = train::<AB>(&cfg, &tmp.path().join("full"), &RunOptions::default(), &dev, &mut |_| {}).unwrap();
    let part = tmp.path().join("part");
    let stopped = train::<AB>(&cfg, &part, &RunOptions { stop_after: Some(3), ..Default::default() }, &dev, &mut |_| {}).unwrap();
    assert!(!stopped.run.completed && stopped.adapter.is_none());
    assert!(train::<AB>(&cfg, &part, &RunOptions::default(), &dev, &mut |_| {}).is_err(), "a fresh run into a used dir is refused");
    let resumed = train::<AB>(&cfg, &part, &RunOptions { resume: true, ..Default::default() }, &dev, &mut |_| {}).unwrap();
    assert_eq!(resumed.run.resumed_from_step, Some(3));
    assert_eq!(full.run.loss, resumed.run.loss);
    assert_eq!(full.run.lr, resumed.run.lr);
    let read = |d: &Path| read_safetensors(&d.join(io::WEIGHTS_FILE)).unwrap().0;
    assert_eq!(read(&tmp.path().join("full")), read(&part));
    let mut other = cfg.clone();
    other.lr = 5e-3;
    let err = train::<AB>(&other, &part, &RunOptions { resume: true, ..Default::default() }, &dev, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("lr"), "{err}");
}

/// A NaN in the cached latents stops the run at that step with a named error, and the checkpoint
/// stays the last good one.
#[test]
fn non_finite_loss_stops_and_keeps_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    captioned(&data, 4);
    let dev = Default::default();
    let mut cfg = config(&data, "lora");
    cfg.iters = Some(4);
    let out = tmp.path().join("run");
    train::<AB>(&cfg, &out, &RunOptions { stop_after: Some(1), ..Default::default() }, &dev, &mut |_| {}).unwrap();
    for e in std::fs::read_dir(out.join("cache")).unwrap() {
        let p = e.unwrap().path();
        let (mut t, meta) = read_safetensors(&p).unwrap();
        t.get_mut("latent_mean").unwrap().data[0] = f32::NAN;
        io::write_safetensors(&p, &t, meta).unwrap();
    }
    let err = train::<AB>(&cfg, &out, &RunOptions { resume: true, ..Default::default() }, &dev, &mut |_| {}).unwrap_err();
    assert!(matches!(err, Sd3Error::Runtime(lora_runtime::Error::NonFinite { step: 2, .. })), "{err}");
    assert!(err.to_string().contains("step 2"), "{err}");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 1);
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sd3-gen"))
}

#[path = "../../../tests/common/data_parallel.rs"]
mod data_parallel;

/// `sd3-gen train` on two peers with `--batch 1` (`--devices cpu,cpu`, and `--nodes 2` sharing
/// one run directory, whose latent cache peer 0 writes) reaches the adapter of one device with
/// `--batch 2`: the latent, noise and timestep draws are per image, and the peers sum the same
/// gradients in another order (f32), through 2 micro-batches and gradient clipping.
#[test]
fn two_peers_reach_the_single_device_adapter_of_the_doubled_batch() {
    const SUM_ORDER_TOL: f32 = 1e-5;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    captioned(&data, 6);
    let model = fixture("sd3-tiny");
    let base = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--method",
        "lora",
        "--rank",
        "2",
        "--lr",
        "1e-3",
        "--iters",
        "3",
        "--resolution",
        "16",
        "--grad-accum",
        "2",
        "--max-grad-norm",
        "1",
        "--max-sequence-length",
        "2",
        "--no-t5",
        "--test-fraction",
        "0",
    ];
    data_parallel::two_peers_match_doubled_batch(env!("CARGO_BIN_EXE_sd3-gen"), &base, 1, tmp.path(), io::DIFFUSERS_WEIGHTS_FILE, SUM_ORDER_TOL);
}

/// `sd3-gen train` end to end (metadata.jsonl dataset, validation samples, metrics.json), then
/// `sd3-gen sample --adapter` with the trained LoRA.
#[test]
fn cli_train_then_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    captioned(&data, 4);
    let lines: Vec<String> = (0..4)
        .map(|i| {
            let text = std::fs::read_to_string(data.join(format!("img{i:02}.txt"))).unwrap();
            std::fs::remove_file(data.join(format!("img{i:02}.txt"))).unwrap();
            serde_json::json!({"file_name": format!("img{i:02}.png"), "text": text}).to_string()
        })
        .collect();
    std::fs::write(data.join("metadata.jsonl"), lines.join("\n")).unwrap();
    let run = tmp.path().join("run");
    let model = fixture("sd3-tiny");
    let out = bin()
        .args(["train", "--model", model.to_str().unwrap(), "--dataset", data.to_str().unwrap(), "--fraction", "0.5", "--method", "lora"])
        .args(["--rank", "2", "--lr", "1e-3", "--epochs", "2", "--resolution", "16", "--batch", "1", "--grad-accum", "2"])
        .args(["--max-sequence-length", "2", "--validation-prompt", "a red box", "--validation-steps", "1", "--validation-inference-steps", "2"])
        .args(["--test-fraction", "0", "--logging-steps", "1", "--out", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // one metrics.jsonl line per logging step (plain LoRA: no lr_b)
    let jsonl: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(jsonl.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2]);
    assert!(jsonl.iter().all(|l| l["loss"].is_number() && l["lr"].is_number() && l["elapsed_s"].is_number() && l.get("lr_b").is_none()));
    let metrics: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    // 2 of 4 images, 2 micro-batches of 1 per step: 1 step per epoch.
    assert_eq!((metrics["train_images"].as_u64(), metrics["steps"].as_u64()), (Some(2), Some(2)));
    assert_eq!(metrics["loss"].as_array().unwrap().len(), 2);
    assert!(run.join("samples/step-000001-0.png").is_file() && run.join("samples/step-000002-0.png").is_file());
    assert!(run.join(io::DIFFUSERS_WEIGHTS_FILE).is_file());
    // the fixture has text_encoder_3: the cached prompt embeddings carry T5 tokens after CLIP's 77
    let (cached, _) = read_safetensors(&run.join("cache/000000.safetensors")).unwrap();
    let pe = &cached["prompt_embeds"];
    let width = pe.shape[1];
    assert_eq!(pe.shape[0], 77 + 2);
    assert!(pe.data[77 * width..].iter().any(|&v| v != 0.0), "T5 tokens are zeros");
    let png = tmp.path().join("out.png");
    let out = bin()
        .args(["sample", "--model", model.to_str().unwrap(), "--adapter", run.to_str().unwrap(), "--prompt", "a red box", "--no-t5"])
        .args(["--max-sequence-length", "2", "--steps", "2", "--height", "16", "--width", "16", "--output", png.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(image::open(&png).unwrap().width(), 16);
}

/// Splits, fractions and the named errors of bad datasets.
#[test]
fn datasets_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    captioned(&data, 10);
    let ds = CaptionDataset::open(&data, 0, 0.2).unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (8, 2));
    assert_eq!(CaptionDataset::open(&data, 0, 0.2).unwrap().test, ds.test, "seeded split");
    assert_eq!(ds.train_fraction(0.5, 1).unwrap().len(), 4);
    assert_eq!(ds.train_fraction(1.0, 1).unwrap(), ds.train);
    assert!(ds.train_fraction(0.0, 1).unwrap_err().to_string().contains("--fraction"));
    std::fs::write(data.join("split.json"), r#"{"train": ["img00.png", "img01"], "test": ["img02"]}"#).unwrap();
    let ds = CaptionDataset::open(&data, 0, 0.2).unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (2, 1));
    assert_eq!(ds.train[1].text, "a green box, painting number 1");
    std::fs::remove_file(data.join("split.json")).unwrap();

    // caption missing
    std::fs::remove_file(data.join("img03.txt")).unwrap();
    let err = CaptionDataset::open(&data, 0, 0.2).unwrap_err().to_string();
    assert!(err.contains("img03.png") && err.contains("caption missing"), "{err}");
    std::fs::write(data.join("img03.txt"), "a box").unwrap();
    // bad JSONL line, and a line naming a missing image
    std::fs::write(data.join("metadata.jsonl"), "{\"file_name\": \"img00.png\", \"text\": \"x\"}\n{\"file_name\": \"img01.png\"}\n").unwrap();
    let err = CaptionDataset::open(&data, 0, 0.2).unwrap_err().to_string();
    assert!(err.contains("metadata.jsonl") && err.contains("line 2"), "{err}");
    std::fs::write(data.join("metadata.jsonl"), "{\"file_name\": \"nope.png\", \"text\": \"x\"}\n").unwrap();
    let err = CaptionDataset::open(&data, 0, 0.2).unwrap_err().to_string();
    assert!(err.contains("line 1") && err.contains("nope.png"), "{err}");
    std::fs::remove_file(data.join("metadata.jsonl")).unwrap();
    // unreadable image: named by training
    std::fs::write(data.join("img05.png"), b"not a png").unwrap();
    let dev = Default::default();
    let mut cfg = config(&data, "lora");
    cfg.iters = Some(1);
    let err = train::<AB>(&cfg, &tmp.path().join("run"), &RunOptions::default(), &dev, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("img05.png") && err.contains("unreadable image"), "{err}");
}

/// `--gradient-checkpointing` recomputes the joint blocks (image and context streams) in the
/// backward pass: the same per-step losses and the same adapter bits as without it.
#[test]
fn gradient_checkpointing_gives_the_same_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    captioned(&data, 4);
    let dev = Default::default();
    let run = |on: bool, name: &str| {
        let mut cfg = config(&data, "serial-lora-plus");
        (cfg.iters, cfg.batch, cfg.lora_dropout, cfg.gradient_checkpointing) = (Some(2), 2, 0.1, on);
        let out = tmp.path().join(name);
        let m = train::<AB>(&cfg, &out, &RunOptions::default(), &dev, &mut |_| {}).unwrap();
        // every weights file of the run directory (the adapter's format depends on the method)
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
        files.sort();
        assert!(!files.is_empty());
        let bits = files
            .iter()
            .flat_map(|f| read_safetensors(f).unwrap().0)
            .map(|(k, t)| (k, t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>()))
            .collect::<Vec<_>>();
        (m.run.loss, bits)
    };
    assert_eq!(run(false, "plain"), run(true, "checkpointed"));
}

/// `--dtype bf16`: the base held in bf16 trains f32 adapters (different from the f32 base's by
/// bf16 rounding only), a stopped bf16 run resumes to the same bits as an uninterrupted one, a
/// resume with another dtype is refused, and the adapter runs on an f32 base.
#[test]
fn a_bf16_run_resumes_bit_identically_and_its_adapter_runs_on_an_f32_base() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    captioned(&data, 4);
    let dev = Default::default();
    let mut cfg = config(&data, "serial-lora");
    (cfg.iters, cfg.batch, cfg.save_steps, cfg.dtype) = (Some(4), 2, Some(2), serial_lora::BaseDType::Bf16);
    let full = train::<AB>(&cfg, &tmp.path().join("full"), &RunOptions::default(), &dev, &mut |_| {}).unwrap();
    let part = tmp.path().join("part");
    train::<AB>(&cfg, &part, &RunOptions { stop_after: Some(2), ..Default::default() }, &dev, &mut |_| {}).unwrap();
    let f32_cfg = TrainConfig { dtype: serial_lora::BaseDType::F32, ..cfg.clone() };
    let err = train::<AB>(&f32_cfg, &part, &RunOptions { resume: true, ..Default::default() }, &dev, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("dtype"), "{err}");
    let resumed = train::<AB>(&cfg, &part, &RunOptions { resume: true, ..Default::default() }, &dev, &mut |_| {}).unwrap();
    assert_eq!(resumed.run.resumed_from_step, Some(2));
    assert_eq!(full.run.loss, resumed.run.loss);
    let read = |d: &Path| read_safetensors(&d.join(io::WEIGHTS_FILE)).unwrap().0;
    assert_eq!(read(&tmp.path().join("full")), read(&part));
    // the same run on the f32 base: close, not equal (the base weights differ by bf16 rounding)
    let f32_run = train::<AB>(&f32_cfg, &tmp.path().join("f32"), &RunOptions::default(), &dev, &mut |_| {}).unwrap();
    let rel = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / b.iter().fold(0f32, |m, y| m.max(y.abs()));
    let e = rel(&full.run.loss, &f32_run.run.loss);
    println!("bf16 vs f32 base: losses {:?} vs {:?}, max rel diff {e:.2e}", full.run.loss, f32_run.run.loss);
    assert!(e > 0.0 && e < 3e-2, "{e}");
    // the bf16-trained adapter on the f32 base and on the bf16 base: the same model up to bf16
    let r = read_safetensors(&fixture("sd3-tiny").join("reference.safetensors")).unwrap().0;
    let run_on = |dtype| {
        let (m, _) = lora_runtime::weights::with_base_dtype(dtype, || load_transformer::<Flex>(&fixture("sd3-tiny"), &dev)).unwrap();
        let m = sd3_gen::export::load_one(m, &tmp.path().join("full"), &dev).unwrap();
        let t = |k: &str| r[k].to_tensor::<Flex, 4>(&dev);
        let (out, _) = m
            .forward_traced(t("hidden_states"), r["encoder_hidden_states"].to_tensor(&dev), r["pooled_projections"].to_tensor(&dev), &r["timestep"].data)
            .unwrap();
        out.into_data().to_vec::<f32>().unwrap()
    };
    let e = rel(&run_on(serial_lora::BaseDType::F32), &run_on(serial_lora::BaseDType::Bf16));
    println!("bf16-trained adapter, f32 vs bf16 base: max rel diff {e:.2e}");
    assert!(e < 3e-2, "{e}");
}
