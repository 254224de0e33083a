//! What every training loop of the model crates shares: seeded random streams, the cosine
//! schedule, per-step logs, and the run directory — resolved config, atomic checkpoints
//! (adapter + optimizer moments + step), resume checks and metrics.
//!
//! Determinism: a loop seeds every random draw of step `t` from `(seed, t)` with
//! [`stream_seed`], so a run resumed from a checkpoint reaches the same adapter as an
//! uninterrupted one.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::dist::{DistArgs, Peer};
use crate::error::{Error, Result};
use serial_lora::config::AdapterConfig;
use serial_lora::io::{self, write_atomic};
use serial_lora::model::AdaptedModel;
use serial_lora::optim::{LoraPlus, adamw_pytorch_defaults, loraplus_adamw};
use serial_lora::params::param_infos;

/// `CosineAnnealingLR(T_max = total, eta_min)` before step `step` (0-based).
pub fn cosine_lr(lr: f64, eta_min: f64, step: usize, total: usize) -> f64 {
    eta_min + (lr - eta_min) * (1.0 + (std::f64::consts::PI * step as f64 / total.max(1) as f64).cos()) / 2.0
}

/// A 64-bit seed for random stream `stream` at position `i` (splitmix64 of the mix).
pub fn stream_seed(seed: u64, stream: u64, i: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xD1B5_4A32_D192_ED69);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One optimizer step's record (kept in the checkpoint so metrics survive a resume).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepLog {
    /// The batch loss (f32, as computed: it survives the JSON round trip of a resume exactly,
    /// which an f64 does not with serde_json's default float parsing).
    pub loss: f32,
    pub lr: f64,
    /// Images in the batch.
    pub images: usize,
    /// Sum over the batch of the task's per-image score (correct predictions, Dice, …).
    pub score: f64,
}

/// What a progress display needs after each step.
pub struct Progress<'a> {
    pub step: usize,
    pub total: usize,
    pub epoch: usize,
    pub log: &'a StepLog,
    pub images_per_second: f64,
}

/// Stops a run whose step `step` (0-based; reported 1-based, as the logs count) has a
/// non-finite loss or gradient: call it after the backward pass and before the optimizer step,
/// so the model keeps its last finite weights and no non-finite checkpoint or adapter is
/// written. Gradients are checked with one host read (`Σ 0·g` over every gradient is 0 exactly
/// when all are finite); only on failure are they visited again to name the first bad one.
pub fn check_finite<AB: AutodiffBackend, M: AutodiffModule<AB>>(step: usize, loss: f32, model: &M, grads: &GradientsParams) -> Result<()> {
    let step = step + 1;
    if !loss.is_finite() {
        return Err(Error::NonFinite { step, what: format!("the loss ({loss})") });
    }
    let mut probe = FiniteProbe::<AB::InnerBackend> { grads, stack: Vec::new(), acc: None, first_bad: None, per_tensor: false };
    model.visit(&mut probe);
    let Some(acc) = probe.acc.take() else { return Ok(()) };
    if acc.into_scalar().elem::<f32>() == 0.0 {
        return Ok(());
    }
    probe.per_tensor = true;
    model.visit(&mut probe);
    let name = probe.first_bad.unwrap_or_else(|| "a parameter".into());
    Err(Error::NonFinite { step, what: format!("the gradient of `{name}`") })
}

/// Visits the parameters of a model with their gradients: sums `0·g` (NaN iff some entry of
/// `g` is NaN or ±∞), or with `per_tensor` finds the first parameter whose gradient is not finite.
struct FiniteProbe<'a, B: Backend> {
    grads: &'a GradientsParams,
    stack: Vec<String>,
    acc: Option<Tensor<B, 1>>,
    first_bad: Option<String>,
    per_tensor: bool,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for FiniteProbe<'_, AB::InnerBackend> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let Some(g) = self.grads.get::<AB::InnerBackend, D>(param.id) else { return };
        let zero = g.mul_scalar(0.0).sum();
        if self.per_tensor {
            if self.first_bad.is_none() && zero.into_scalar().elem::<f32>() != 0.0 {
                self.first_bad = Some(self.stack.join("."));
            }
        } else {
            self.acc = Some(match self.acc.take() {
                Some(a) => a + zero,
                None => zero,
            });
        }
    }
}

/// Options of one invocation (not part of the run's identity).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from `RUN_DIR/checkpoint` (the config must be the saved one).
    pub resume: bool,
    /// Stop after this many steps in total (the checkpoint is saved; resume later).
    pub stop_after: Option<usize>,
    /// Bytes of decoded training images kept in memory (default 2 GiB); the rest is decoded
    /// again for each batch.
    pub cache_bytes: Option<usize>,
    /// This process's place in a data-parallel job ([`Peer::single`] by default).
    pub peer: Peer,
}

/// The run flags every `train` command shares.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct RunArgs {
    /// Run directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop (checkpointed) once this many steps are done; continue later with --resume.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Log line every N steps when stderr is not a terminal.
    #[arg(long, default_value_t = 10)]
    pub logging_steps: usize,
    /// cpu | cuda[:N] | tch-cpu | tch-cuda[:N] (backends compiled into this binary).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub dist: DistArgs,
}

impl RunArgs {
    /// The options of this invocation as `peer`.
    pub fn options(&self, peer: Peer) -> RunOptions {
        RunOptions { resume: self.resume, stop_after: self.stop_after, cache_bytes: None, peer }
    }
}

/// Step bookkeeping of a training loop: the steps this invocation runs, when checkpoints are
/// due, and throughput.
pub struct StepTracker {
    /// Steps of the whole run.
    pub total: usize,
    /// Steps after which this invocation stops (`total` or `--stop-after`).
    pub stop: usize,
    every: usize,
    start: std::time::Instant,
    seen: usize,
}

impl StepTracker {
    /// `total` steps, checkpoints every `every` steps and at the stop.
    pub fn new(total: usize, stop_after: Option<usize>, every: usize) -> Self {
        Self { total, stop: stop_after.map_or(total, |s| s.min(total)), every: every.max(1), start: std::time::Instant::now(), seen: 0 }
    }

    /// Appends step `state.step`'s log, advances the state, reports progress; returns whether a
    /// checkpoint is due now.
    pub fn record(&mut self, state: &mut State, log: StepLog, epoch: usize, on_step: &mut dyn FnMut(&Progress)) -> bool {
        self.seen += log.images;
        state.history.push(log);
        state.step += 1;
        let ips = self.images_per_second();
        if let Some(log) = state.history.last() {
            on_step(&Progress { step: state.step, total: self.total, epoch, log, images_per_second: ips });
        }
        state.step.is_multiple_of(self.every) || state.step == self.stop
    }

    pub fn wall_seconds(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Images per second over this invocation.
    pub fn images_per_second(&self) -> f64 {
        self.seen as f64 / self.wall_seconds().max(1e-9)
    }

    /// The `metrics.json` fields every run has.
    pub fn summary(&self, state: &State, steps_per_epoch: usize, resumed_from_step: Option<usize>, device: String) -> RunSummary {
        RunSummary {
            steps: state.step,
            total_steps: self.total,
            steps_per_epoch,
            completed: state.step == self.total,
            loss: state.history.iter().map(|l| l.loss).collect(),
            lr: state.history.iter().map(|l| l.lr).collect(),
            resumed_from_step,
            wall_seconds: self.wall_seconds(),
            images_per_second: self.images_per_second(),
            device,
        }
    }
}

/// The part of `metrics.json` every training run shares (flattened into the model's metrics).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    pub steps: usize,
    pub total_steps: usize,
    pub steps_per_epoch: usize,
    pub completed: bool,
    /// Per-step batch loss and learning rate.
    pub loss: Vec<f32>,
    pub lr: Vec<f64>,
    pub resumed_from_step: Option<usize>,
    /// Of this invocation.
    pub wall_seconds: f64,
    pub images_per_second: f64,
    pub device: String,
}

/// Progress of a run: the next step and every step's log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub step: usize,
    pub history: Vec<StepLog>,
    /// Data-parallel peers of the run (the global batch is per-device batch × peers).
    #[serde(default = "one")]
    pub world: usize,
}

fn one() -> usize {
    1
}

impl Default for State {
    fn default() -> Self {
        Self { step: 0, history: Vec::new(), world: 1 }
    }
}

impl State {
    /// Mean loss and mean score per image over the last `n` steps.
    pub fn recent(&self, n: usize) -> (f64, f64) {
        let last = &self.history[self.history.len().saturating_sub(n)..];
        let (imgs, score) = last.iter().fold((0, 0.0), |(i, s), l| (i + l.images, s + l.score));
        (last.iter().map(|l| l.loss as f64).sum::<f64>() / last.len().max(1) as f64, score / imgs.max(1) as f64)
    }
}

const CONFIG_FILE: &str = "train_config.json";
const METRICS_FILE: &str = "metrics.json";
const CHECKPOINT: &str = "checkpoint";
const STATE_FILE: &str = "state.json";
const OPTIMIZER_FILE: &str = "optimizer"; // + ".mpk"

fn ckpt_err(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Checkpoint { path: path.to_path_buf(), message: message.to_string() }
}

/// Writes `value` as pretty JSON, atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ckpt_err(path, e))?;
    Ok(write_atomic(path, text.as_bytes())?)
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serial_lora::parse::json(&text).map_err(|message| Error::Parse { path: path.into(), format: "JSON", message })
}

/// The ids of the trainable parameters, in module order (the key of the optimizer state).
fn trainable_ids<B: Backend, M: Module<B>>(m: &M) -> Vec<ParamId> {
    param_infos(m).into_iter().filter(|p| p.trainable).map(|p| p.id).collect()
}

/// Re-keys an optimizer record (a map by parameter id) from the ids `from` to the ids `to`.
fn rekey<R, V>(rec: R, from: &[ParamId], to: &[ParamId]) -> R
where
    R: IntoIterator<Item = (ParamId, V)> + FromIterator<(ParamId, V)>,
{
    let mut rec: HashMap<ParamId, V> = rec.into_iter().collect();
    from.iter().zip(to).filter_map(|(f, t)| rec.remove(f).map(|v| (*t, v))).collect()
}

fn positional_ids(n: usize) -> Vec<ParamId> {
    (0..n as u64).map(ParamId::from).collect()
}

/// A training run's directory: `train_config.json`, `checkpoint/`, `metrics.json` and, when the
/// run completes, the adapter (`adapter_config.json` + `adapter_model.safetensors`).
pub struct RunDir {
    pub path: PathBuf,
    /// The process's place in a data-parallel job; only peer 0 writes.
    pub peer: Peer,
}

impl RunDir {
    /// Opens `path` for a run with `config`. Resuming (when asked and a checkpoint exists)
    /// requires the saved config to equal `config` and returns the saved state; a fresh run
    /// refuses a directory that already holds one and writes the config.
    ///
    /// In a data-parallel job ([`RunOptions::peer`]) peer 0 opens the directory first; the
    /// others then read the checkpoint's state, and none goes on unless every one succeeded.
    pub fn open<B: Backend, C: Serialize + DeserializeOwned + PartialEq>(
        path: &Path,
        config: &C,
        opts: &RunOptions,
        device: &B::Device,
    ) -> Result<(Self, Option<State>)> {
        let peer = &opts.peer;
        let opened = if peer.is_writer() { Self::open_writer(path, config, opts.resume) } else { Ok(None) };
        let agreed = peer.agree::<B>(opened.is_ok(), 0, "open the run directory", device);
        let mut state = opened?;
        agreed?;
        let ckpt_state = path.join(CHECKPOINT).join(STATE_FILE);
        if !peer.is_writer() && opts.resume && ckpt_state.is_file() {
            state = Some(read_json(&ckpt_state)?);
        }
        Ok((Self { path: path.to_path_buf(), peer: peer.clone() }, state))
    }

    fn open_writer<C: Serialize + DeserializeOwned + PartialEq>(path: &Path, config: &C, resume: bool) -> Result<Option<State>> {
        let config_path = path.join(CONFIG_FILE);
        let ckpt = path.join(CHECKPOINT);
        // A process killed between the two renames of `save_checkpoint` leaves no `checkpoint/`
        // but the previous one, complete, as `checkpoint.old/`: put it back.
        let old = path.join(format!("{CHECKPOINT}.old"));
        if !ckpt.exists() && old.join(STATE_FILE).is_file() {
            std::fs::rename(&old, &ckpt).map_err(|e| Error::io(&old, e))?;
        }
        if resume && ckpt.join(STATE_FILE).is_file() {
            let saved: C = read_json(&config_path)?;
            if &saved != config {
                let (a, b) = (serde_json::to_value(&saved).unwrap_or_default(), serde_json::to_value(config).unwrap_or_default());
                let diff: Vec<String> = a
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, v)| b.get(k.as_str()) != Some(v))
                    .map(|(k, v)| format!("{k}: saved {v}, now {}", b.get(k.as_str()).unwrap_or(&serde_json::Value::Null)))
                    .collect();
                return Err(ckpt_err(&config_path, format!("--resume with different settings: {}", diff.join("; "))));
            }
            return Ok(Some(read_json(&ckpt.join(STATE_FILE))?));
        }
        if ckpt.exists() || path.join(io::WEIGHTS_FILE).exists() {
            return Err(ckpt_err(path, "already holds a run: pass --resume to continue it, or choose another --out"));
        }
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        write_json(&config_path, config)?;
        Ok(None)
    }

    /// The model and optimizer a training loop starts from: the checkpoint's when `resumed`
    /// holds its state (from [`RunDir::open`]), else `base` with fresh adapters (A drawn from
    /// stream [`crate::train::streams::ADAPTER_INIT`] of `seed`) at step 0. The optimizer is AdamW with PyTorch's defaults and
    /// `weight_decay`, the B matrices at `lr × adapter.lr_ratio` (LoRA+; plain AdamW without).
    /// Data-parallel peers all start from the same step (checked), with the same adapters (the
    /// same seed; or the same checkpoint, written by a job with as many peers).
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    pub fn start<AB, M>(
        &self,
        resumed: Option<State>,
        base: M,
        adapter: &AdapterConfig,
        weight_decay: f64,
        seed: u64,
        device: &AB::Device,
    ) -> Result<(M, LoraPlus<OptimizerAdaptor<AdamW, M, AB>, M, AB>, State)>
    where
        AB: AutodiffBackend,
        M: AdaptedModel<AB> + AutodiffModule<AB>,
    {
        let config = adamw_pytorch_defaults().with_weight_decay(weight_decay as f32);
        let optim = loraplus_adamw::<AB, M>(&config, adapter.lr_ratio.unwrap_or(1.0));
        let world = self.peer.world;
        let started = match resumed {
            Some(state) if state.world != world => Err(ckpt_err(
                &self.path.join(CHECKPOINT),
                format!("written by a run on {} data-parallel peer(s), resumed on {world}: resume with the same --devices and --nodes", state.world),
            )),
            Some(state) => self.load_checkpoint(base, optim, device).map(|(model, optim)| (model, optim, state)),
            None => {
                let init = stream_seed(seed, crate::train::streams::ADAPTER_INIT, 0);
                base.with_adapters(adapter, init, device).map(|model| (model, optim, State { world, ..State::default() })).map_err(Error::from)
            }
        };
        let step = started.as_ref().map_or(0, |s| s.2.step);
        let agreed = self.peer.agree::<AB::InnerBackend>(started.is_ok(), step, "the step to start from", device);
        let started = started?;
        agreed?;
        Ok(started)
    }

    /// Loads the checkpoint's adapter into `base` (a model without adapters) and its optimizer
    /// moments into `optim`.
    pub fn load_checkpoint<AB, M, O, V>(&self, base: M, optim: O, device: &AB::Device) -> Result<(M, O)>
    where
        AB: AutodiffBackend,
        M: AdaptedModel<AB> + AutodiffModule<AB>,
        O: Optimizer<M, AB>,
        O::Record: IntoIterator<Item = (ParamId, V)> + FromIterator<(ParamId, V)>,
    {
        let ckpt = self.path.join(CHECKPOINT);
        let (model, _) = io::load_adapter(base, &ckpt, device)?;
        let ids = trainable_ids(&model);
        let opt_path = ckpt.join(OPTIMIZER_FILE);
        let record: O::Record = NamedMpkFileRecorder::<FullPrecisionSettings>::new().load(opt_path.clone(), device).map_err(|e| {
            // (Burn's message goes on with a hint about record formats of Burn ≤ 0.16: first line only)
            let e = e.to_string();
            let first = e.split(['\n']).next().and_then(|l| l.split("\\n").next()).unwrap_or_default();
            let first = first.trim_start_matches("Unknown(\"");
            ckpt_err(&opt_path.with_extension("mpk"), format!("cannot read the optimizer state (truncated or not this run's): {first}"))
        })?;
        Ok((model, optim.load_record(rekey(record, &positional_ids(ids.len()), &ids))))
    }

    /// Writes `checkpoint/` (adapter, optimizer moments keyed by trainable-parameter position,
    /// state) through a temporary directory, so a crash leaves the previous one.
    pub fn save_checkpoint<AB, M, O, V>(&self, model: &M, adapter: &AdapterConfig, optim: &O, state: &State, base_model: &str) -> Result<()>
    where
        AB: AutodiffBackend,
        M: AdaptedModel<AB> + AutodiffModule<AB>,
        O: Optimizer<M, AB>,
        O::Record: IntoIterator<Item = (ParamId, V)> + FromIterator<(ParamId, V)>,
    {
        if !self.peer.is_writer() {
            return Ok(());
        }
        let tmp = self.path.join(format!("{CHECKPOINT}.tmp"));
        let old = self.path.join(format!("{CHECKPOINT}.old"));
        let ckpt = self.path.join(CHECKPOINT);
        let _ = std::fs::remove_dir_all(&tmp);
        io::save_adapter(model, adapter, &tmp, Some(base_model))?;
        let ids = trainable_ids(model);
        let record = rekey(optim.to_record(), &ids, &positional_ids(ids.len()));
        let opt_path = tmp.join(OPTIMIZER_FILE);
        NamedMpkFileRecorder::<FullPrecisionSettings>::new().record(record, opt_path.clone()).map_err(|e| ckpt_err(&opt_path, e))?;
        write_json(&tmp.join(STATE_FILE), state)?;
        let _ = std::fs::remove_dir_all(&old);
        if ckpt.exists() {
            std::fs::rename(&ckpt, &old).map_err(|e| Error::io(&ckpt, e))?;
        }
        std::fs::rename(&tmp, &ckpt).map_err(|e| Error::io(&tmp, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Writes `metrics.json` (the writing peers only).
    pub fn write_metrics(&self, metrics: &impl Serialize) -> Result<()> {
        if !self.peer.is_writer() {
            return Ok(());
        }
        write_json(&self.path.join(METRICS_FILE), metrics)
    }
}

/// Training progress on stderr: a progress bar with loss, lr, score and throughput on a
/// terminal; otherwise a plain line every `logging_steps` steps (and at the last).
pub struct ProgressReporter {
    bar: Option<indicatif::ProgressBar>,
    logging_steps: usize,
    score_name: &'static str,
    silent: bool,
    jsonl: Option<std::cell::RefCell<MetricsLog>>,
}

/// `RUN_DIR/metrics.jsonl`: one JSON object per logging step, appended and flushed as the run
/// goes (`tail -f`, or a notebook reading it while the run is in progress).
pub struct MetricsLog {
    path: PathBuf,
    file: Option<std::fs::File>,
    lr_ratio: Option<f64>,
    start: std::time::Instant,
    /// (sum of losses, steps) since the last line.
    window: (f64, usize),
}

/// File name of the per-logging-step metrics in a run directory.
pub const METRICS_JSONL: &str = "metrics.jsonl";

impl MetricsLog {
    /// Appends to `path` (created on the first line). `lr_ratio` (LoRA+) adds the B matrices'
    /// learning rate `lr_b = lr × ratio` to each line.
    pub fn new(path: PathBuf, lr_ratio: Option<f64>) -> Self {
        Self { path, file: None, lr_ratio, start: std::time::Instant::now(), window: (0.0, 0) }
    }

    /// Appends one object (a line) and flushes it.
    pub fn append(&mut self, value: &serde_json::Value) -> Result<()> {
        use std::io::Write;
        if self.file.is_none() {
            let f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(|e| Error::io(&self.path, e))?;
            self.file = Some(f);
        }
        let mut line = serde_json::to_string(value).unwrap_or_default();
        line.push('\n');
        match self.file.as_mut() {
            Some(f) => f.write_all(line.as_bytes()).and_then(|()| f.flush()).map_err(|e| Error::io(&self.path, e)),
            None => Ok(()),
        }
    }

    /// Records a step; on a logging step returns its line: `step`, `epoch`, `loss` (the step's
    /// batch loss), `loss_avg` (mean since the last line), `lr` (A matrices; `lr_b` for the B
    /// matrices with LoRA+), `score` (per image: accuracy, Dice, …), `images_per_second`,
    /// `elapsed_s` (of this invocation).
    fn step(&mut self, p: &Progress, score_name: &str, log_now: bool) -> Option<serde_json::Value> {
        self.window.0 += p.log.loss as f64;
        self.window.1 += 1;
        if !log_now {
            return None;
        }
        let mut v = serde_json::json!({
            "step": p.step,
            "epoch": p.epoch + 1,
            "loss": p.log.loss,
            "loss_avg": self.window.0 / self.window.1.max(1) as f64,
            "lr": p.log.lr,
            "images_per_second": p.images_per_second,
            "elapsed_s": self.start.elapsed().as_secs_f64(),
        });
        v[score_name] = serde_json::json!(p.log.score / p.log.images.max(1) as f64);
        if let Some(r) = self.lr_ratio {
            v["lr_b"] = serde_json::json!(p.log.lr * r);
        }
        self.window = (0.0, 0);
        Some(v)
    }
}

impl ProgressReporter {
    /// `score_name` labels [`StepLog::score`] per image (`acc`, `dice`).
    pub fn new(logging_steps: usize, score_name: &'static str) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            let style = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}");
            bar.set_style(style.unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
            bar
        });
        Self { bar, logging_steps: logging_steps.max(1), score_name, silent: false, jsonl: None }
    }

    /// Also appends a line to `RUN_DIR/metrics.jsonl` every `logging_steps` steps and at the last
    /// (see [`MetricsLog`]); nothing on a silent (non-first) data-parallel peer.
    pub fn with_metrics_log(mut self, run_dir: &Path, lr_ratio: Option<f64>) -> Self {
        if !self.silent {
            self.jsonl = Some(std::cell::RefCell::new(MetricsLog::new(run_dir.join(METRICS_JSONL), lr_ratio)));
        }
        self
    }

    /// Appends an extra line (e.g. an evaluation during training) to `metrics.jsonl`.
    pub fn log_line(&self, value: &serde_json::Value) {
        if let Some(j) = &self.jsonl
            && let Err(e) = j.borrow_mut().append(value)
        {
            eprintln!("warning: {e}");
        }
    }

    /// [`ProgressReporter::new`] on the first peer of a data-parallel job; silent on the others.
    pub fn for_peer(logging_steps: usize, score_name: &'static str, peer: &Peer) -> Self {
        match peer.rank {
            0 => Self::new(logging_steps, score_name),
            _ => Self { bar: None, logging_steps: 1, score_name, silent: true, jsonl: None },
        }
    }

    /// Shows one step.
    pub fn report(&self, p: &Progress) {
        if self.silent {
            return;
        }
        let log_now = p.step.is_multiple_of(self.logging_steps) || p.step == p.total;
        if let Some(j) = &self.jsonl {
            let line = j.borrow_mut().step(p, self.score_name, log_now);
            if let Some(line) = line {
                self.log_line(&line);
            }
        }
        let line = format!(
            "epoch {} loss {:.4} lr {:.3e} {} {:.3} {:.2} img/s",
            p.epoch + 1,
            p.log.loss,
            p.log.lr,
            self.score_name,
            p.log.score / p.log.images.max(1) as f64,
            p.images_per_second
        );
        match &self.bar {
            Some(bar) => {
                bar.set_length(p.total as u64);
                bar.set_position(p.step as u64);
                bar.set_message(line);
            }
            None if p.step.is_multiple_of(self.logging_steps) || p.step == p.total => eprintln!("step {}/{} {line}", p.step, p.total),
            None => {}
        }
    }

    /// Leaves the bar at its final state.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish();
        }
    }
}

/// Directory of the best adapter under `--eval-steps`, inside the run directory.
pub const BEST_DIR: &str = "best";

/// `--eval-steps N`: when an evaluation is due, its result is appended to `metrics.jsonl`
/// (`{"step", "eval_<metric>", "eval_images"}`) and the adapter with the best value so far is
/// kept in `RUN_DIR/best/` (PEFT layout, plus `best.json` with the step and value). Only the
/// writing peer evaluates. A resumed run continues from the best recorded in `best/best.json`.
pub struct EvalKeeper {
    every: Option<usize>,
    dir: PathBuf,
    best: Option<f64>,
    log: MetricsLog,
    writer: bool,
    metric: &'static str,
}

impl EvalKeeper {
    /// For a run in `run`, evaluating every `every` steps (none: never), `metric` naming the
    /// value (higher is better: `accuracy`, `dice`).
    pub fn new(run: &RunDir, every: Option<usize>, metric: &'static str) -> Self {
        let dir = run.path.join(BEST_DIR);
        let best = read_json::<serde_json::Value>(&dir.join("best.json")).ok().and_then(|v| v.get(metric).and_then(|x| x.as_f64()));
        Self { every: every.filter(|&e| e > 0), dir, best, log: MetricsLog::new(run.path.join(METRICS_JSONL), None), writer: run.peer.is_writer(), metric }
    }

    /// Whether step `step` (1-based count of steps done) evaluates: every N-th and the last of
    /// the run (`total`), on the writing peer.
    pub fn due(&self, step: usize, total: usize) -> bool {
        self.writer && self.every.is_some_and(|e| step.is_multiple_of(e) || step == total)
    }

    /// Records the evaluation after step `step`; saves the adapters of `model` into `best/` if
    /// `value` is the best so far.
    pub fn record<B: Backend, M: serial_lora::AdaptedModel<B>>(
        &mut self,
        step: usize,
        value: f64,
        images: usize,
        model: &M,
        adapter: &AdapterConfig,
        base_model: &str,
    ) -> Result<()> {
        let mut line = serde_json::json!({ "step": step, "eval_images": images });
        line[format!("eval_{}", self.metric)] = serde_json::json!(value);
        self.log.append(&line)?;
        if self.best.is_none_or(|b| value > b) {
            let tmp = self.dir.with_extension("tmp");
            let _ = std::fs::remove_dir_all(&tmp);
            io::save_adapter(model, adapter, &tmp, Some(base_model))?;
            let mut best = serde_json::json!({ "step": step, "eval_images": images });
            best[self.metric] = serde_json::json!(value);
            write_json(&tmp.join("best.json"), &best)?;
            let _ = std::fs::remove_dir_all(&self.dir);
            std::fs::rename(&tmp, &self.dir).map_err(|e| Error::io(&self.dir, e))?;
            self.best = Some(value);
        }
        Ok(())
    }
}
