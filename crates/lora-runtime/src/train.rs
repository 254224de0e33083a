//! The one training driver of every task: the step loop (batch order, sharding across
//! data-parallel peers, per-step seeded streams, adapter-dropout seed, forward and loss through
//! the task, gradient accumulation, all-reduce, the non-finite check, gradient clipping, the
//! optimizer step, the learning-rate schedule, logging, checkpoints, resume, the final save).
//! A task says only what is its own through [`TrainTask`]: the loss of a micro-batch (its data
//! and model), the learning rate of a step, what happens after a step (evaluation, samples) and
//! what is saved at the end.
//!
//! [`optimizer_step`] is one step of that loop on its own, for loops without a run directory
//! (the digits proxy's pretraining and adaptation).
//!
//! Determinism: every random draw of step `t` comes from a stream of `(seed, t)` named in
//! [`streams`]; a checkpoint holds the adapter, the AdamW moments and the step, so a resumed run
//! reaches the same adapter as an uninterrupted one.
use burn::module::{AutodiffModule, ParamId};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serial_lora::io;
use serial_lora::params::param_infos;
use serial_lora::{AdaptedModel, AdapterConfig, ParamCountExt, ParamCounts};

use crate::dist::Peer;
use crate::run::{Progress, RunDir, RunOptions, RunSummary, State, StepLog, StepTracker, check_finite, stream_seed};

/// The random streams of a run: `stream_seed(seed, STREAM, i)` (see [`stream_seed`]). Every
/// stream id of the workspace is here, so no two draws share one by accident.
pub mod streams {
    /// The batch order of epoch `i`.
    pub const SHUFFLE: u64 = 1;
    /// The per-example draws of micro-batch `i` (augmentation, box jitter, latent sample and
    /// noise): example `j` of the global micro-batch draws from `stream_seed(that, 0, j)`
    /// ([`super::Micro::example_seed`]).
    pub const EXAMPLES: u64 = 2;
    /// The adapter-dropout masks of micro-batch `i`: set on the model by
    /// [`serial_lora::AdaptedModel::with_dropout_seed`] (per peer: [`crate::dist::Peer::seed`]);
    /// each adapter pair draws from its own sub-stream of it ([`serial_lora::rng`]).
    pub const DROPOUT: u64 = 3;
    /// CLIP, SAM: the seeded tenth of the training split `--eval-steps` evaluates on when the
    /// dataset has no `val` split (`i` = 0).
    pub const HELD_OUT: u64 = 4;
    /// SD3: the flip of training image `i`, decided once when the latents are cached.
    pub const FLIP: u64 = 4;
    /// SD3: the noise of the validation samples (`i` = 0).
    pub const VALIDATION_NOISE: u64 = 5;
    /// Digits proxy: the initialization of the adapters (`i` = 0) and of the new head (`i` = 1).
    pub const PROXY_INIT: u64 = 5;
    /// The A matrices of a run's fresh adapters (`i` = 0), drawn by
    /// [`serial_lora::AdaptedModel::with_adapters`].
    pub const ADAPTER_INIT: u64 = 6;
}

/// One micro-batch as a task sees it: this peer's share of the global micro-batch.
pub struct Micro<'a> {
    /// The optimizer step (0-based).
    pub step: usize,
    /// This peer's examples: indices into the training set, never empty.
    pub examples: &'a [usize],
    /// The position of `examples[0]` in the global micro-batch.
    pub offset: usize,
    /// Seed of the per-example draws ([`streams::EXAMPLES`] of this micro-batch).
    pub example_seed: u64,
}

impl Micro<'_> {
    /// The seed of the draws of `examples[j]`: the same whichever peer holds it.
    pub fn example_rng_seed(&self, j: usize) -> u64 {
        stream_seed(self.example_seed, 0, (self.offset + j) as u64)
    }
}

/// How the steps of a loop are cut from the training set.
#[derive(Clone, Debug)]
pub struct StepPlan {
    /// Training examples.
    pub examples: usize,
    /// Examples per micro-batch and device.
    pub batch: usize,
    /// Micro-batches per optimizer step (gradients summed, each loss ÷ this, as accelerate).
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// The seed of every stream ([`streams`]).
    pub seed: u64,
    /// Shuffle each epoch ([`streams::SHUFFLE`]); else the examples in order.
    pub shuffle: bool,
    /// Seed Burn's backend generator per micro-batch for adapter dropout ([`streams::DROPOUT`]).
    pub seed_dropout: bool,
    /// This process's place in a data-parallel job.
    pub peer: Peer,
    /// Recompute each transformer block in the backward pass instead of keeping its
    /// activations ([`serial_lora::checkpoint`]; the gradients are the same bits).
    pub gradient_checkpointing: bool,
    /// The dtype of the frozen base (`--dtype`): the forward runs under
    /// [`serial_lora::half::autocast`] in it, which keeps the largest saved activations in half.
    pub dtype: serial_lora::BaseDType,
}

impl StepPlan {
    /// Examples of one global micro-batch (all peers).
    pub fn global_batch(&self) -> usize {
        self.batch.max(1) * self.peer.world
    }

    /// Micro-batches in one pass over the examples.
    pub fn micro_per_epoch(&self) -> usize {
        self.examples.div_ceil(self.global_batch())
    }

    /// Optimizer steps in one pass over the examples.
    pub fn steps_per_epoch(&self) -> usize {
        self.micro_per_epoch().div_ceil(self.grad_accum.max(1))
    }

    /// The example order of `epoch`.
    fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.examples).collect();
        if self.shuffle {
            use rand::SeedableRng;
            rand::seq::SliceRandom::shuffle(&mut order[..], &mut rand::rngs::StdRng::seed_from_u64(stream_seed(self.seed, streams::SHUFFLE, epoch as u64)));
        }
        order
    }
}

/// What a task contributes to the step loop.
pub trait TrainTask<AB: AutodiffBackend> {
    /// The model being trained.
    type Model: AutodiffModule<AB> + AdaptedModel<AB>;
    /// The task's error; every runtime error converts into it.
    type Error: From<crate::Error>;

    /// The mean loss over the examples of `micro` and their summed score (correct predictions,
    /// Dice, MSE, …: the [`StepLog::score`] of the step).
    fn loss(&mut self, model: &Self::Model, micro: &Micro, device: &AB::Device) -> Result<(Tensor<AB, 1>, f64), Self::Error>;

    /// The learning rate of step `step` (0-based) of `total`.
    fn lr(&self, step: usize, total: usize) -> f64;

    /// Called once with the model the loop starts from (fresh adapters, or the checkpoint's).
    fn on_start(&mut self, _model: &Self::Model, _device: &AB::Device) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Called after every optimizer step with the number of steps done (evaluations, samples).
    fn after_step(&mut self, _model: &Self::Model, _steps_done: usize, _total: usize) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Saves the trained adapter of a completed run (`steps` done) into the run directory `out`
    /// (the writing peer only): by default the PEFT layout of [`io::save_adapter`].
    fn save(&mut self, model: &Self::Model, _steps: usize, adapter: &AdapterConfig, out: &std::path::Path, base_model: &str) -> Result<(), Self::Error>
    where
        Self::Model: AdaptedModel<AB>,
    {
        io::save_adapter(model, adapter, out, Some(base_model)).map_err(crate::Error::from)?;
        Ok(())
    }
}

/// The settings every `train` command shares, checked in one place ([`CommonTrainArgs::validate`]).
/// Each task's `TrainConfig` keeps its own flags, defaults and `train_config.json` keys (they
/// differ per task — CLIP's `--alpha 1`, SAM's and SD3's `--alpha` = rank, SD3's `lora_dropout` —
/// and are part of the command line and file contract) and lends them here.
#[derive(Clone, Debug, PartialEq)]
pub struct CommonTrainArgs<'a> {
    /// `lora | serial-lora | lora-plus | serial-lora-plus`.
    pub method: &'a str,
    pub rank: usize,
    pub dropout: f64,
    /// Peak learning rate (A matrices).
    pub lr: f64,
    /// LoRA+ ratio lr_B / lr_A.
    pub lr_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    pub epochs: Option<usize>,
    pub iters: Option<usize>,
    /// Examples per device and micro-batch.
    pub batch: usize,
    pub seed: u64,
    pub save_steps: Option<usize>,
}

impl CommonTrainArgs<'_> {
    /// Refuses a setting out of range, naming the flag: `batch`, `epochs` / `iters` ≥ 1; `lr` and
    /// `lr-ratio` finite and > 0; `weight-decay` finite and ≥ 0; a known method.
    pub fn validate(&self) -> crate::Result<()> {
        self.validate_optimization()?;
        AdapterConfig::from_method_name(self.method, self.rank, self.lr_ratio)?;
        Ok(())
    }

    /// [`validate`](Self::validate) without the method and rank (for a run that trains no
    /// adapter, e.g. a head-only or full fine-tuning baseline).
    pub fn validate_optimization(&self) -> crate::Result<()> {
        let bad = |key: &'static str, value: String, why: &str| Err(crate::Error::config(key, value, why));
        if self.batch == 0 {
            return bad("batch", "0".into(), "must be at least 1");
        }
        if self.epochs == Some(0) || self.iters == Some(0) {
            return bad("epochs/iters", "0".into(), "must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", self.lr.to_string(), "must be a finite number > 0");
        }
        if !(self.lr_ratio.is_finite() && self.lr_ratio > 0.0) {
            return bad("lr-ratio", self.lr_ratio.to_string(), "must be a finite number > 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight-decay", self.weight_decay.to_string(), "must be a finite number ≥ 0");
        }
        Ok(())
    }
}

/// Trainable parameters with their rank (accumulation and clipping walk them).
type Ids = Vec<(ParamId, usize)>;

/// One optimizer step `step` (0-based) of `total`: the micro-batches of the step, each through
/// [`TrainTask::loss`] (weighted for this peer's share, ÷ `grad_accum`), the gradients summed over
/// micro-batches and peers, checked finite, clipped, and applied at [`TrainTask::lr`]. Returns
/// the updated model and the step's log (loss: mean over the micro-batches; images: of the
/// global batches).
pub fn optimizer_step<AB, T, O>(
    task: &mut T,
    mut model: T::Model,
    optim: &mut O,
    plan: &StepPlan,
    step: usize,
    total: usize,
    device: &AB::Device,
) -> Result<(T::Model, StepLog), T::Error>
where
    AB: AutodiffBackend,
    T: TrainTask<AB>,
    O: Optimizer<T::Model, AB>,
{
    let ids: Ids = if plan.grad_accum > 1 || plan.max_grad_norm > 0.0 {
        param_infos(&model).into_iter().filter(|p| p.trainable).map(|p| (p.id, p.ndim)).collect()
    } else {
        Vec::new()
    };
    let (micro_per_epoch, steps_per_epoch, global_batch, accum) =
        (plan.micro_per_epoch(), plan.steps_per_epoch().max(1), plan.global_batch(), plan.grad_accum.max(1));
    let epoch = step / steps_per_epoch;
    let order = plan.order(epoch);
    let first = (step % steps_per_epoch) * accum;
    let micros = first..(first + accum).min(micro_per_epoch);
    let peer = &plan.peer;
    let (mut grads, mut loss_sum, mut score, mut images) = (None::<GradientsParams>, 0f32, 0f64, 0usize);
    for m in micros.clone() {
        let batch = &order[m * global_batch..((m + 1) * global_batch).min(plan.examples)];
        let (offset, mine) = peer.shard(batch);
        images += batch.len();
        if mine.is_empty() {
            continue;
        }
        let index = (step * accum + (m - first)) as u64;
        let micro = Micro { step, examples: mine, offset, example_seed: stream_seed(plan.seed, streams::EXAMPLES, index) };
        if plan.seed_dropout {
            model = model.with_dropout_seed(peer.seed(stream_seed(plan.seed, streams::DROPOUT, index)));
        }
        let forward = || task.loss(&model, &micro, device);
        let (loss, s) = serial_lora::with_checkpointing(plan.gradient_checkpointing, || serial_lora::half::autocast(plan.dtype, forward))?;
        let loss = loss.mul_scalar(peer.weight(mine.len(), batch.len()));
        let value = loss.clone().into_scalar().elem::<f32>();
        let loss = if accum > 1 { loss.div_scalar(accum as f32) } else { loss };
        let g = GradientsParams::from_grads(loss.backward(), &model);
        grads = Some(match grads {
            None => g,
            Some(mut acc) => {
                accumulate::<AB>(&mut acc, g, &ids);
                acc
            }
        });
        loss_sum += value;
        score += s;
    }
    let mut stats = [f64::from(loss_sum), score];
    let mut grads = peer.all_reduce(&model, grads.unwrap_or_default(), &mut stats, device)?;
    let loss = if micros.len() > 1 { stats[0] as f32 / micros.len() as f32 } else { stats[0] as f32 };
    check_finite(step, loss, &model, &grads)?;
    if plan.max_grad_norm > 0.0 {
        clip_grad_norm::<AB>(&mut grads, &ids, plan.max_grad_norm);
    }
    let lr = task.lr(step, total);
    model = optim.step(lr, model, grads);
    Ok((model, StepLog { loss, lr, images, score: stats[1] }))
}

/// The run-level settings of [`train_loop`].
pub struct LoopConfig<'a> {
    /// How steps are cut from the training set.
    pub plan: StepPlan,
    /// Passes over the training set (with `default_epochs` when neither this nor `iters` is set).
    pub epochs: Option<usize>,
    /// Optimizer steps in total (instead of epochs).
    pub iters: Option<usize>,
    pub default_epochs: usize,
    /// Checkpoint every N steps (default: every epoch).
    pub save_steps: Option<usize>,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// The adapter the run trains.
    pub adapter: &'a AdapterConfig,
    /// The base model's hub id or path (written into adapter files).
    pub base_model: &'a str,
}

/// What [`train_loop`] hands back for the task's `metrics.json`.
pub struct Trained<M> {
    pub model: M,
    /// Steps done and every step's log.
    pub state: State,
    /// The `metrics.json` fields every run has.
    pub summary: RunSummary,
    /// Parameter counts of the model with adapters.
    pub counts: ParamCounts,
    pub steps_per_epoch: usize,
}

/// Trains `base` with fresh adapters (or the run's checkpoint when `resumed`) in the run
/// directory `run`: steps until the run's total or `--stop-after` ([`RunOptions`]), a checkpoint
/// every `save_steps` and at the stop, [`TrainTask::after_step`] after each step, and at
/// completion [`TrainTask::save`] on the writing peer.
#[allow(clippy::too_many_arguments)]
pub fn train_loop<AB, T>(
    task: &mut T,
    base: T::Model,
    cfg: &LoopConfig,
    run: &RunDir,
    resumed: Option<State>,
    opts: &RunOptions,
    device: &AB::Device,
    on_step: &mut dyn FnMut(&Progress),
) -> Result<Trained<T::Model>, T::Error>
where
    AB: AutodiffBackend,
    T: TrainTask<AB>,
    T::Model: AdaptedModel<AB>,
{
    let (mut model, mut optim, mut state) = run.start(resumed, base, cfg.adapter, cfg.weight_decay, cfg.plan.seed, device)?;
    let resumed_from_step = (state.step > 0).then_some(state.step);
    let counts = model.param_counts();
    task.on_start(&model, device)?;
    let steps_per_epoch = cfg.plan.steps_per_epoch();
    let total = cfg.iters.unwrap_or(cfg.epochs.unwrap_or(cfg.default_epochs) * steps_per_epoch);
    let mut tracker = StepTracker::new(total, opts.stop_after, cfg.save_steps.unwrap_or(steps_per_epoch));
    for step in state.step..tracker.stop {
        let (m, log) = optimizer_step(task, model, &mut optim, &cfg.plan, step, total, device)?;
        model = m;
        if tracker.record(&mut state, log, step / steps_per_epoch, on_step) {
            run.save_checkpoint(&model, cfg.adapter, &optim, &state, cfg.base_model)?;
        }
        task.after_step(&model, state.step, total)?;
    }
    let summary = tracker.summary(&state, steps_per_epoch, resumed_from_step, AB::name(device));
    if summary.completed && run.peer.is_writer() {
        task.save(&model, state.step, cfg.adapter, &run.path, cfg.base_model)?;
    }
    Ok(Trained { model, state, summary, counts, steps_per_epoch })
}

/// Sums the gradients of `add` into `acc` (the trainable parameters `ids`, 1-D or 2-D).
fn accumulate<B: AutodiffBackend>(acc: &mut GradientsParams, mut add: GradientsParams, ids: &[(ParamId, usize)]) {
    for &(id, ndim) in ids {
        match ndim {
            1 => merge::<B, 1>(acc, &mut add, id),
            _ => merge::<B, 2>(acc, &mut add, id),
        }
    }
}

fn merge<B: AutodiffBackend, const D: usize>(acc: &mut GradientsParams, add: &mut GradientsParams, id: ParamId) {
    if let Some(g) = add.remove::<B::InnerBackend, D>(id) {
        let sum = match acc.remove::<B::InnerBackend, D>(id) {
            Some(a) => a + g,
            None => g,
        };
        acc.register::<B::InnerBackend, D>(id, sum);
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` over the parameters `ids` (id, rank 1 or
/// 2): scales every gradient by `min(1, max_norm / (‖g‖₂ + 1e-6))`, `‖g‖₂` the norm of all of
/// them together; returns that norm (before clipping).
pub fn clip_grad_norm<B: AutodiffBackend>(grads: &mut GradientsParams, ids: &[(ParamId, usize)], max_norm: f64) -> f32 {
    fn sq<B: AutodiffBackend, const D: usize>(g: &GradientsParams, id: ParamId) -> f32 {
        g.get::<B::InnerBackend, D>(id).map_or(0.0, |t| t.powi_scalar(2).sum().into_scalar().elem::<f32>())
    }
    fn scale<B: AutodiffBackend, const D: usize>(g: &mut GradientsParams, id: ParamId, c: f32) {
        if let Some(t) = g.remove::<B::InnerBackend, D>(id) {
            g.register::<B::InnerBackend, D>(id, t.mul_scalar(c));
        }
    }
    let total = ids.iter().map(|&(id, d)| if d == 1 { sq::<B, 1>(grads, id) } else { sq::<B, 2>(grads, id) }).sum::<f32>().sqrt();
    let coef = (max_norm as f32 / (total + 1e-6)).min(1.0);
    if max_norm > 0.0 && coef < 1.0 {
        for &(id, d) in ids {
            if d == 1 { scale::<B, 1>(grads, id, coef) } else { scale::<B, 2>(grads, id, coef) }
        }
    }
    total
}
