//! Timing helpers of the model crates' `perf` examples (`cargo xtask perf`): per-step times,
//! their median, the process's peak RSS, and the JSON line whose first five keys are the
//! contract the xtask reads (`model`, `method`, `mode`, `median_step_s`, `peak_rss_mb`).
use std::time::Instant;

use burn::prelude::Backend;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use serial_lora::config::AdapterConfig;
use serial_lora::model::AdaptedModel;

/// Seconds of the timed steps; `forward`, `backward`, `optim` stay empty for inference.
#[derive(Clone, Debug, Default)]
pub struct StepTimes {
    pub step: Vec<f64>,
    pub forward: Vec<f64>,
    pub backward: Vec<f64>,
    pub optim: Vec<f64>,
    /// [`alternate`]: the other case, `(other, own)` seconds of each alternated round, and the
    /// peak RSS taken before the other case was built.
    pub alternated_with: Option<String>,
    pub alternated: Vec<(f64, f64)>,
    pub peak_rss_before_alternating_mb: Option<f64>,
}

impl StepTimes {
    /// Records one training step from its four instants: start, loss on the host, gradients,
    /// optimizer step done.
    pub fn push_train(&mut self, t: [Instant; 4]) {
        self.forward.push((t[1] - t[0]).as_secs_f64());
        self.backward.push((t[2] - t[1]).as_secs_f64());
        self.optim.push((t[3] - t[2]).as_secs_f64());
        self.step.push((t[3] - t[0]).as_secs_f64());
    }

    /// After training step `step` with loss `loss` and instants `t` (see [`Self::push_train`]):
    /// stops on a non-finite loss, records the step unless it is one of the `warmup` first.
    pub fn record_train(&mut self, step: usize, warmup: usize, loss: f32, t: [Instant; 4]) -> Result<()> {
        if !loss.is_finite() {
            return Err(Error::NonFinite { step: step + 1, what: format!("the loss ({loss})") });
        }
        if step >= warmup {
            self.push_train(t);
        }
        Ok(())
    }

    /// After inference step `step`, begun at `t0` and ended by a host read: records it unless it
    /// is one of the `warmup` first.
    pub fn record_infer(&mut self, step: usize, warmup: usize, t0: Instant) {
        if step >= warmup {
            self.step.push(t0.elapsed().as_secs_f64());
        }
    }
}

/// The model of an inference case and the adapter's size before any merge (as the PyTorch
/// scripts count it): the base model (`--method base`, `--mode infer` only), or `base` with the
/// adapter `adapter()` (`infer`), merged (`infer-merged`).
pub fn infer_model<B: Backend, M: AdaptedModel<B>>(
    base: M,
    method: &str,
    mode: &str,
    adapter: impl FnOnce() -> serial_lora::Result<AdapterConfig>,
    device: &B::Device,
) -> Result<(M, usize)> {
    let adapted = match (method, mode) {
        ("base", "infer") => base,
        ("base", _) => return Err(Error::config("mode", mode, "--method base has only --mode infer")),
        (_, "infer" | "infer-merged") => base.with_adapters(&adapter()?, 0, device)?,
        (_, m) => return Err(Error::config("mode", m, "expected train | infer | infer-merged")),
    };
    let trainable = adapter_params(&adapted);
    let model = if mode == "infer-merged" { adapted.merge_and_unload()? } else { adapted };
    Ok((model, trainable))
}

/// What a perf program's training step returns: the loss and the step's four instants
/// ([`StepTimes::push_train`]).
pub type TrainStep = (f32, [Instant; 4]);

/// Timed rounds of [`alternate`] at least: with 3, the ratio of two identical computations
/// still spread 0.94–1.06 on a 2-core machine (sam-b merged ÷ base); with 10, 0.99–1.00.
pub const ALTERNATED_ROUNDS: usize = 10;

/// After a case's own timed steps: a second case built now (`other()`, which returns its step)
/// and this case's `own` step run alternately in this process, `warmup` rounds and then at least
/// [`ALTERNATED_ROUNDS`] timed ones (`steps` if more), the order swapped every round; each step
/// returns its seconds. Their ratio then compares the two computations without the 10–15 % by
/// which one process differs from the next (where the heap and the weights land): the JSON line
/// reports `alternated_with` (`with`: `base` for merged inference, `lora` for a Serial LoRA
/// step) and `over_alternated` (median own ÷ median other), and its peak RSS stays the case's
/// own, taken before `other()` builds anything.
pub fn alternate<E, F: FnMut() -> std::result::Result<f64, E>>(
    times: &mut StepTimes,
    with: &str,
    mut own: impl FnMut() -> std::result::Result<f64, E>,
    other: impl FnOnce() -> std::result::Result<F, E>,
    steps: usize,
    warmup: usize,
) -> std::result::Result<(), E> {
    times.peak_rss_before_alternating_mb = Some(peak_rss_mb());
    let mut other = other()?;
    for round in 0..warmup + steps.max(ALTERNATED_ROUNDS) {
        let (o, m) = if round % 2 == 0 {
            let o = other()?;
            (o, own()?)
        } else {
            let m = own()?;
            (other()?, m)
        };
        if round >= warmup {
            times.alternated.push((o, m));
        }
    }
    times.alternated_with = Some(with.to_string());
    Ok(())
}

/// A perf program's training case: `warmup + steps` calls of `step` recorded, then, with
/// `alternate_with = Some((method, build))`, that method's step (`build()`) alternated with it
/// ([`alternate`]).
pub fn train_case<E: From<Error>, G: FnMut() -> std::result::Result<TrainStep, E>>(
    mut step: impl FnMut() -> std::result::Result<TrainStep, E>,
    alternate_with: Option<(&str, impl FnOnce() -> std::result::Result<G, E>)>,
    steps: usize,
    warmup: usize,
) -> std::result::Result<StepTimes, E> {
    let mut times = StepTimes::default();
    for i in 0..warmup + steps {
        let (loss, t) = step()?;
        times.record_train(i, warmup, loss, t)?;
    }
    if let Some((method, build)) = alternate_with {
        let seconds = |(_, t): TrainStep| (t[3] - t[0]).as_secs_f64();
        let other = || build().map(|mut s| move || s().map(seconds));
        alternate(&mut times, method, || step().map(seconds), other, steps, warmup)?;
    }
    Ok(times)
}

/// Seconds of `f()` (which ends with a host read or a sync).
pub fn timed<E>(f: impl FnOnce() -> std::result::Result<(), E>) -> std::result::Result<f64, E> {
    let t0 = Instant::now();
    f()?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Median (mean of the middle two for an even count; NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Peak resident set size of this process (`VmHWM` of `/proc/self/status`), MiB; NaN where
/// there is no procfs.
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Worker threads of the CPU backends (`RAYON_NUM_THREADS`, else the available cores).
pub fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Adapter parameters (A and B of every pair, merged or not) of a model: its trainable count
/// on an autodiff backend, also on the inner backend where `require_grad` is not kept.
pub fn adapter_params<B: Backend, M: AdaptedModel<B>>(model: &M) -> usize {
    let sites = model.attention_sites();
    let pairs = sites.iter().flat_map(|s| s.attention.pairs());
    pairs.map(|p| p.lora_a.lazy_shape().num_elements() + p.lora_b.lazy_shape().num_elements()).sum()
}

/// What a perf line says about its case besides the times.
pub struct Case<'a> {
    pub model: &'a str,
    pub method: &'a str,
    pub mode: &'a str,
    /// e.g. `burn-flex`.
    pub framework: String,
    /// Images (samples) per step, for `images_per_s`.
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub trainable_params: usize,
}

/// The case's JSON line: contract keys, framework, images/s, threads, the per-step times and,
/// for training, the medians of the forward, backward and optimizer parts. `extra` (an object)
/// is merged in (model-specific settings: rank, image size …).
pub fn json_line(c: &Case, times: &StepTimes, extra: Value) -> Value {
    let med = median(&times.step);
    let mut line = json!({
        "model": c.model,
        "method": c.method,
        "mode": c.mode,
        "median_step_s": med,
        "peak_rss_mb": times.peak_rss_before_alternating_mb.unwrap_or_else(peak_rss_mb),
        "framework": c.framework,
        "images_per_s": c.batch as f64 / med,
        "batch": c.batch,
        "steps": c.steps,
        "warmup": c.warmup,
        "threads": threads(),
        "trainable_params": c.trainable_params,
        "step_s": times.step,
    });
    if !times.forward.is_empty() {
        line["forward_s"] = median(&times.forward).into();
        line["backward_s"] = median(&times.backward).into();
        line["optim_s"] = median(&times.optim).into();
    }
    if let Some(with) = &times.alternated_with {
        let (other, own): (Vec<f64>, Vec<f64>) = times.alternated.iter().copied().unzip();
        line["alternated_with"] = with.as_str().into();
        line["over_alternated"] = (median(&own) / median(&other)).into();
        line["alternated_own_s"] = own.into();
        line["alternated_other_s"] = other.into();
    }
    if let (Some(obj), Value::Object(more)) = (line.as_object_mut(), extra) {
        obj.extend(more);
    }
    line
}

/// The perf programs' random base for `--dtype`: every float parameter of rank ≥ 2 replaced by
/// uniform values of Linear's init scale (±1/√fan-in) drawn on the
/// host straight into `dtype` (bf16 / f16), one parameter at a time — as a checkpoint stored in
/// that dtype loads, with no f32 copy; other parameters are kept. `f32`: the module unchanged
/// (Burn's own init). Call it before attaching adapters.
pub fn random_base_in<B: Backend, M: burn::module::Module<B>>(module: M, dtype: serial_lora::BaseDType) -> M {
    use burn::module::{ModuleMapper, Param};
    use burn::tensor::{Tensor, TensorData, bf16, f16};
    use rand::{RngExt, SeedableRng};
    struct Draw(burn::tensor::DType, rand::rngs::StdRng);
    impl<B: Backend> ModuleMapper<B> for Draw {
        fn map_float<const K: usize>(&mut self, param: Param<Tensor<B, K>>) -> Param<Tensor<B, K>> {
            if K < 2 {
                return param;
            }
            let (shape, device) = (param.lazy_shape(), param.lazy_device());
            let n = shape.num_elements();
            let d = shape.dims::<K>();
            // fan-in: `[in, out]` for a linear weight, `[out, in, …]` for a convolution's
            let fan_in = if K == 2 { d[0] } else { n / d[0].max(1) };
            let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
            let rng = &mut self.1;
            let data = match self.0 {
                burn::tensor::DType::BF16 => TensorData::new((0..n).map(|_| bf16::from_f32(rng.random_range(-bound..bound))).collect::<Vec<_>>(), shape),
                _ => TensorData::new((0..n).map(|_| f16::from_f32(rng.random_range(-bound..bound))).collect::<Vec<_>>(), shape),
            };
            Param::initialized(param.id, Tensor::from_data(data, (&device, self.0))).set_require_grad(false)
        }
    }
    if dtype == serial_lora::BaseDType::F32 {
        return module;
    }
    module.map(&mut Draw(dtype.dtype(), rand::rngs::StdRng::seed_from_u64(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn json_line_has_the_contract_keys_and_the_train_split() {
        let mut t = StepTimes::default();
        let t0 = std::time::Instant::now();
        t.push_train([t0, t0, t0, t0]);
        let c = Case { model: "m", method: "lora", mode: "train", framework: "burn-x".into(), batch: 2, steps: 1, warmup: 0, trainable_params: 7 };
        let v = json_line(&c, &t, json!({"rank": 32}));
        for k in ["model", "method", "mode", "median_step_s", "peak_rss_mb", "forward_s", "backward_s", "optim_s", "rank"] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        let infer = json_line(&Case { mode: "infer", ..c }, &StepTimes { step: vec![1.0], ..Default::default() }, json!({}));
        assert!(infer.get("forward_s").is_none());
        assert_eq!(infer["images_per_s"], 2.0);
        assert!(infer.get("over_alternated").is_none());
    }

    #[test]
    fn alternate_swaps_the_order_and_reports_the_ratio() {
        use std::cell::RefCell;
        // the log records the order the two "cases" ran in; "own" sleeps twice as long
        let log = RefCell::new(Vec::new());
        let run = |name: &'static str, ms: u64| {
            let log = &log;
            move || {
                timed(|| {
                    log.borrow_mut().push(name);
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                    Ok::<(), ()>(())
                })
            }
        };
        let mut t = StepTimes { step: vec![1.0], ..Default::default() };
        alternate(&mut t, "base", run("own", 4), || Ok(run("other", 2)), 2, 1).unwrap();
        assert_eq!(log.borrow()[..6], ["other", "own", "own", "other", "other", "own"]);
        assert_eq!(t.alternated.len(), ALTERNATED_ROUNDS, "the warm-up round is not kept");
        assert!(t.peak_rss_before_alternating_mb.is_some());
        let c = Case { model: "m", method: "lora", mode: "infer-merged", framework: "burn-x".into(), batch: 1, steps: 1, warmup: 0, trainable_params: 0 };
        let v = json_line(&c, &t, json!({}));
        assert_eq!(v["alternated_with"], "base");
        let r = v["over_alternated"].as_f64().unwrap();
        assert!(r > 1.0, "own sleeps twice as long: {r}");
        assert_eq!(v["alternated_other_s"].as_array().unwrap().len(), ALTERNATED_ROUNDS);
        let fail = || Err::<fn() -> std::result::Result<f64, &'static str>, _>("no other case");
        assert!(alternate(&mut t, "base", || Ok(1.0), fail, 1, 0).is_err());
    }
}
