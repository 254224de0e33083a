//! `cargo xtask perf`: times training and inference cases of a model (one process per case, so
//! each peak RSS is the case's own) with the model crate's `perf` example, optionally next to
//! the PyTorch + PEFT reference (`tools/perf/`). Prints a Markdown table, the targets of the
//! performance issue, and last one JSON line per case (`model`, `method`, `mode`,
//! `median_step_s`, `peak_rss_mb`, `framework`, …). xtask stays free of Burn: the timing lives
//! in the task crates — `clip-b16`: `clip-cls --example perf`, `sam-b`: `sam-seg --example
//! sam-perf`, `sd3-block`: `sd3-gen --example sd3-perf` (each `examples/perf.rs`), next to
//! `tools/perf/{clip,sam,sd3}_perf.py`.
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// `cargo xtask perf` arguments.
#[derive(clap::Args, Debug)]
pub struct PerfArgs {
    /// cpu (Flex) | tch-cpu (LibTorch, linked from the torch 2.9.0 of `.venv` or of
    /// `$CARGO_TARGET_DIR-venv`) | cuda[:N] | tch-cuda[:N] (the GPU ones: untested, no GPU was
    /// available when this was written). PyTorch runs on the same device.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// clip-b16 (CLIP ViT-B/16, both towers adapted, batch 8), sam-b (SAM ViT-B image encoder
    /// adapted, box prompt, 512² input, batch 1), sd3-block (2 joint blocks of SD3-medium's
    /// MMDiT, image stream adapted, 64×64 latents, batch 1); rank 32 each.
    #[arg(long, default_value = "clip-b16")]
    pub model: String,
    /// Comma-separated: lora, serial-lora, lora-plus, serial-lora-plus.
    #[arg(long, value_delimiter = ',', default_value = "lora,serial-lora")]
    pub method: Vec<String>,
    /// Comma-separated: train, infer, infer-merged (the base forward comes with infer-merged).
    #[arg(long, value_delimiter = ',', default_value = "train,infer,infer-merged")]
    pub modes: Vec<String>,
    /// Timed steps per case (median reported), after --warmup untimed ones.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Runs of every case, one process each, in rounds over all cases; a case's time is the
    /// median of its runs' medians, its peak RSS the largest. The same binary on the same case
    /// varies 10–15 % from process to process on a shared VM (more than between steps of one
    /// process), which decides comparisons such as merged ÷ base inference (one computation).
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Also run every case in PyTorch 2.9 + PEFT (.venv) and print both side by side.
    #[arg(long)]
    pub vs_pytorch: bool,
    /// Torch threads of the PyTorch side.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Our training steps with block-level gradient checkpointing (`train --gradient-checkpointing`;
    /// the PyTorch side runs without it).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Precision our frozen base is held in (`--dtype` of `train`): f32 | bf16 | f16; the
    /// JSON lines carry it as `dtype` (the PyTorch side runs in f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// One measured case (a JSON line of a perf program).
#[derive(Clone, Debug, PartialEq)]
pub struct CaseResult {
    pub model: String,
    pub method: String,
    pub mode: String,
    pub median_step_s: f64,
    pub peak_rss_mb: f64,
    /// Everything the program printed (details: framework, images/s, forward/backward/optim …).
    pub raw: Value,
}

impl CaseResult {
    fn num(&self, key: &str) -> Option<f64> {
        self.raw.get(key).and_then(Value::as_f64)
    }
    fn key(&self) -> (&str, &str, &str) {
        (&self.model, &self.method, &self.mode)
    }
}

/// The contract keys of a JSON line, in order.
pub const KEYS: [&str; 5] = ["model", "method", "mode", "median_step_s", "peak_rss_mb"];

/// The last line of `stdout` that is a JSON object, with the contract keys checked.
pub fn parse_case(stdout: &str) -> Result<CaseResult> {
    let line = stdout.lines().rev().map(str::trim).find(|l| l.starts_with('{')).context("no JSON line in the output")?;
    let raw: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
    if let Some(k) = KEYS.iter().find(|k| raw.get(**k).is_none()) {
        bail!("`{k}` missing in {line}");
    }
    let s = |k: &str| raw.get(k).and_then(Value::as_str).map(String::from).with_context(|| format!("`{k}` (string) missing in {line}"));
    let f = |k: &str| raw.get(k).and_then(Value::as_f64).with_context(|| format!("`{k}` (number) missing in {line}"));
    Ok(CaseResult { model: s("model")?, method: s("method")?, mode: s("mode")?, median_step_s: f("median_step_s")?, peak_rss_mb: f("peak_rss_mb")?, raw })
}

/// The JSON line printed for a case: the contract keys first, then the framework, images/s and
/// the train breakdown when present.
pub fn json_line(c: &CaseResult) -> String {
    // written by hand: serde_json's map (without `preserve_order`) would sort the keys
    let mut parts = vec![
        format!("\"model\":{}", json!(c.model)),
        format!("\"method\":{}", json!(c.method)),
        format!("\"mode\":{}", json!(c.mode)),
        format!("\"median_step_s\":{}", json!(c.median_step_s)),
        format!("\"peak_rss_mb\":{}", json!(c.peak_rss_mb)),
    ];
    for k in [
        "framework",
        "images_per_s",
        "forward_s",
        "backward_s",
        "optim_s",
        "threads",
        "steps",
        "process_medians_s",
        "alternated_with",
        "over_alternated",
        "process_over_alternated",
    ] {
        if let Some(v) = c.raw.get(k) {
            parts.push(format!("{}:{v}", json!(k)));
        }
    }
    format!("{{{}}}", parts.join(","))
}

/// One case measured in several processes: the median of their medians (the forward / backward /
/// optimizer split and images/s of the run that gave it), the largest peak RSS, and every run's
/// median as `process_medians_s`.
pub fn combine(runs: Vec<CaseResult>) -> Result<CaseResult> {
    let mut medians: Vec<f64> = runs.iter().map(|c| c.median_step_s).collect();
    let runs_alternated: Vec<f64> = runs.iter().filter_map(|c| c.num("over_alternated")).collect();
    let peak = runs.iter().map(|c| c.peak_rss_mb).fold(f64::NAN, f64::max);
    medians.sort_by(f64::total_cmp);
    let mid = *medians.get(medians.len().saturating_sub(1) / 2).context("no runs")?;
    let mut c = runs.into_iter().find(|c| c.median_step_s == mid).context("no runs")?;
    c.peak_rss_mb = peak;
    if medians.len() > 1 {
        c.raw["process_medians_s"] = json!(medians);
        let mut alternated: Vec<f64> = runs_alternated;
        if !alternated.is_empty() {
            alternated.sort_by(f64::total_cmp);
            c.raw["over_alternated"] = json!(alternated[(alternated.len() - 1) / 2]);
            c.raw["process_over_alternated"] = json!(alternated);
        }
    }
    Ok(c)
}

/// The method a case of ours alternates its steps with in its own process, for the targets
/// that compare two of our cases (`over_alternated`): a Serial LoRA training step with the
/// LoRA step of the run (merged inference alternates with the base model by itself).
pub fn alternate_with<'a>(method: &str, mode: &str, methods: &'a [String]) -> Option<&'a str> {
    let lora = method.strip_prefix("serial-").filter(|_| mode == "train")?;
    methods.iter().find(|m| *m == lora).map(String::as_str)
}

/// The cases to run: `(method, mode)`, with the frozen base forward (`base`, `infer`) once when
/// any merged inference is measured.
pub fn cases(methods: &[String], modes: &[String]) -> Result<Vec<(String, String)>> {
    for m in modes {
        if !["train", "infer", "infer-merged"].contains(&m.as_str()) {
            bail!("--modes: unknown mode `{m}` (train, infer, infer-merged)");
        }
    }
    for m in methods {
        if !["lora", "serial-lora", "lora-plus", "serial-lora-plus"].contains(&m.as_str()) {
            bail!("--method: unknown method `{m}` (lora, serial-lora, lora-plus, serial-lora-plus)");
        }
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for mode in modes {
        for method in methods {
            out.push((method.clone(), mode.clone()));
        }
        if mode == "infer-merged" {
            out.push(("base".into(), "infer".into()));
        }
    }
    Ok(out)
}

fn fmt_s(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{v:.3}"))
}
fn fmt_f(x: Option<f64>, digits: usize) -> String {
    x.map_or("–".into(), |v| format!("{v:.digits$}"))
}
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b?).filter(|r| r.is_finite())
}

/// Markdown table: ours, and with PyTorch results their numbers and the ratio ours ÷ PyTorch.
pub fn table(ours: &[CaseResult], torch: &[CaseResult]) -> String {
    let mut s = String::new();
    let find = |c: &CaseResult| torch.iter().find(|t| t.key() == c.key());
    if torch.is_empty() {
        s.push_str("| model | method | mode | s/step | images/s | peak RSS MiB |\n|---|---|---|---:|---:|---:|\n");
        for c in ours {
            s.push_str(&format!(
                "| {} | {} | {} | {:.3} | {} | {:.0} |\n",
                c.model,
                c.method,
                c.mode,
                c.median_step_s,
                fmt_f(c.num("images_per_s"), 2),
                c.peak_rss_mb
            ));
        }
        return s;
    }
    s.push_str("| model | method | mode | ours s/step | PyTorch s/step | time ours÷PT | ours img/s | PyTorch img/s | ours peak MiB | PyTorch peak MiB | mem ours÷PT |\n");
    s.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for c in ours {
        let t = find(c);
        s.push_str(&format!(
            "| {} | {} | {} | {:.3} | {} | {} | {} | {} | {:.0} | {} | {} |\n",
            c.model,
            c.method,
            c.mode,
            c.median_step_s,
            fmt_s(t.map(|t| t.median_step_s)),
            fmt_f(ratio(Some(c.median_step_s), t.map(|t| t.median_step_s)), 2),
            fmt_f(c.num("images_per_s"), 2),
            fmt_f(t.and_then(|t| t.num("images_per_s")), 2),
            c.peak_rss_mb,
            fmt_f(t.map(|t| t.peak_rss_mb), 0),
            fmt_f(ratio(Some(c.peak_rss_mb), t.map(|t| t.peak_rss_mb)), 2),
        ));
    }
    s
}

/// Where the training step's time goes: forward / backward / optimizer medians.
pub fn breakdown(results: &[&CaseResult]) -> String {
    let mut s = String::from("| framework | method | forward s | backward s | optimizer s | step s |\n|---|---|---:|---:|---:|---:|\n");
    for c in results.iter().filter(|c| c.mode == "train") {
        let fw = c.raw.get("framework").and_then(Value::as_str).unwrap_or("?");
        s.push_str(&format!(
            "| {fw} | {} | {} | {} | {} | {:.3} |\n",
            c.method,
            fmt_s(c.num("forward_s")),
            fmt_s(c.num("backward_s")),
            fmt_s(c.num("optim_s")),
            c.median_step_s
        ));
    }
    s
}

/// Limits of ours ÷ PyTorch (train step, inference) of the performance issue for `model` on
/// `device`: on Flex (`cpu`) ≤ 1.0 for `clip-b16` and ≤ 1.25 for the others; on LibTorch
/// (`tch-*`) ≤ 1.0 everywhere and ≤ 0.9 for `clip-b16` / `sam-b` training.
pub fn limits(model: &str, device: &str) -> (f64, f64) {
    match (device.starts_with("tch"), model) {
        (true, "clip-b16" | "sam-b") => (0.9, 1.0),
        (true, _) | (false, "clip-b16") => (1.0, 1.0),
        (false, _) => (1.25, 1.25),
    }
}

/// The targets, each with the measured value and whether it is met.
pub fn targets(ours: &[CaseResult], torch: &[CaseResult], device: &str) -> String {
    let get = |set: &[CaseResult], method: &str, mode: &str| set.iter().find(|c| c.method == method && c.mode == mode).cloned();
    let (train_limit, infer_limit) = ours.first().map_or((1.0, 1.0), |c| limits(&c.model, device));
    let mut rows = Vec::new();
    let mut row = |name: String, value: Option<f64>, limit: f64| {
        let verdict = match value {
            Some(v) if v <= limit => "met",
            Some(_) => "missed",
            None => "not measured",
        };
        rows.push(format!("| {name} | {} | ≤ {limit} | {verdict} |", fmt_f(value, 3)));
    };
    let methods: Vec<String> = ours.iter().map(|c| c.method.clone()).filter(|m| m != "base").fold(Vec::new(), |mut v, m| {
        if !v.contains(&m) {
            v.push(m);
        }
        v
    });
    let vs_torch =
        |method: &str, mode: &str, key: fn(&CaseResult) -> f64| ratio(get(ours, method, mode).map(|c| key(&c)), get(torch, method, mode).map(|c| key(&c)));
    if !torch.is_empty() {
        for m in &methods {
            row(format!("train step ours ÷ PyTorch ({m})"), vs_torch(m, "train", |c| c.median_step_s), train_limit);
        }
        for (m, mode) in methods.iter().map(|m| (m.as_str(), "infer-merged")).chain(methods.iter().map(|m| (m.as_str(), "infer"))).chain([("base", "infer")]) {
            if get(ours, m, mode).is_some() {
                row(format!("{mode} ours ÷ PyTorch ({m})"), vs_torch(m, mode, |c| c.median_step_s), infer_limit);
            }
        }
    }
    // two cases of ours: alternated in the first one's process where it reports that
    // (`over_alternated`), else the ratio of the two cases' own processes
    let mut own_ratio = |name: String, (method, mode): (&str, &str), (other, other_mode): (&str, &str), limit: f64| {
        let c = get(ours, method, mode);
        let alternated = c.as_ref().filter(|c| c.raw.get("alternated_with").and_then(Value::as_str) == Some(other)).and_then(|c| c.num("over_alternated"));
        let (r, how) = match alternated {
            Some(r) => (Some(r), "alternated in one process"),
            None => (ratio(c.map(|c| c.median_step_s), get(ours, other, other_mode).map(|c| c.median_step_s)), "separate processes"),
        };
        row(format!("{name} ({how})"), r, limit);
    };
    for (serial, lora) in [("serial-lora", "lora"), ("serial-lora-plus", "lora-plus")] {
        if methods.iter().any(|m| m == serial) && methods.iter().any(|m| m == lora) {
            own_ratio(format!("ours: {serial} train step ÷ {lora} train step"), (serial, "train"), (lora, "train"), 1.0);
        }
    }
    for m in &methods {
        own_ratio(format!("ours: {m} merged inference ÷ base forward"), (m, "infer-merged"), ("base", "infer"), 1.02);
    }
    if !torch.is_empty() {
        for m in &methods {
            row(format!("train peak RSS ours ÷ PyTorch ({m})"), vs_torch(m, "train", |c| c.peak_rss_mb), 1.0);
        }
    }
    format!("| target | measured | limit | verdict |\n|---|---:|---:|---|\n{}\n", rows.join("\n"))
}

/// The perf program of a model: (package, example, model arguments).
struct Program {
    package: &'static str,
    example: &'static str,
    args: Vec<String>,
}

/// The perf program of a model (the model arguments are the defaults of the PyTorch script).
fn program(model: &str) -> Result<Program> {
    let p = |package: &'static str, example: &'static str, args: &[&str]| Ok(Program { package, example, args: args.iter().map(|s| s.to_string()).collect() });
    match model {
        "clip-b16" => p("clip-cls", "perf", &["--preset", "vit-b-16"]),
        "sam-b" => p("sam-seg", "sam-perf", &["--preset", "vit-b", "--image-size", "512"]),
        "sd3-block" => p("sd3-gen", "sd3-perf", &["--preset", "sd3-medium", "--blocks", "2", "--resolution", "512"]),
        m => bail!("--model {m}: unknown (clip-b16, sam-b, sd3-block)"),
    }
}

fn python_script(model: &str) -> Result<&'static str> {
    match model {
        "clip-b16" => Ok("tools/perf/clip_perf.py"),
        "sam-b" => Ok("tools/perf/sam_perf.py"),
        "sd3-block" => Ok("tools/perf/sd3_perf.py"),
        m => bail!("--model {m}: no PyTorch reference"),
    }
}

/// Runs `cmd`, echoing stderr, and parses its JSON line.
fn run_case(cmd: &mut Command) -> Result<CaseResult> {
    eprintln!("$ {cmd:?}");
    let out = cmd.current_dir(crate::root()).stderr(Stdio::inherit()).output().with_context(|| format!("starting {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{cmd:?} failed with {}:\n{stdout}", out.status);
    }
    let c = parse_case(&stdout)?;
    eprintln!("  {:.3} s/step, peak {:.0} MiB", c.median_step_s, c.peak_rss_mb);
    Ok(c)
}

pub fn perf(a: &PerfArgs) -> Result<()> {
    let prog = program(&a.model)?;
    let cases = cases(&a.method, &a.modes)?;
    let (suffix, features) = crate::backend_of(&a.device)?;
    let mut build = crate::cargo(suffix);
    build.args(["build", "--release", "--example", prog.example, "-p", prog.package]);
    if let Some(f) = features {
        build.args(["--features", f]);
    }
    if suffix == "tch" {
        crate::with_libtorch(&mut build)?;
    }
    crate::run(&mut build)?;
    let exe: PathBuf = crate::target_dir(suffix).join("release/examples").join(prog.example);
    let py = if a.vs_pytorch { Some(crate::venv_python()?) } else { None };

    let (mut ours, mut torch) = (vec![Vec::new(); cases.len()], vec![Vec::new(); cases.len()]);
    for (i, (method, mode)) in (0..a.repeats.max(1)).flat_map(|_| cases.iter().enumerate()) {
        let (steps, warmup) = (a.steps.to_string(), a.warmup.to_string());
        let case = ["--method", method, "--mode", mode, "--steps", &steps, "--warmup", &warmup, "--model-name", &a.model];
        let mut cmd = Command::new(&exe);
        if suffix == "tch" {
            crate::with_libtorch(&mut cmd)?;
        }
        if a.gradient_checkpointing && *mode == "train" {
            cmd.arg("--gradient-checkpointing");
        }
        cmd.args(["--dtype", &a.dtype]);
        if let Some(other) = alternate_with(method, mode, &a.method) {
            cmd.args(["--alternate-with", other]);
        }
        ours[i].push(run_case(cmd.args(["--device", &a.device]).args(&prog.args).args(case))?);
        if let Some(py) = &py {
            let device = a.device.strip_prefix("tch-").unwrap_or(&a.device);
            let device = if device.starts_with("cuda") { device } else { "cpu" };
            torch[i].push(run_case(Command::new(py).arg(python_script(&a.model)?).args(case).args(["--threads", &a.threads.to_string(), "--device", device]))?);
        }
    }
    let combined = |runs: Vec<Vec<CaseResult>>| runs.into_iter().filter(|r| !r.is_empty()).map(combine).collect::<Result<Vec<_>>>();
    let (ours, torch) = (combined(ours)?, combined(torch)?);

    println!(
        "## `cargo xtask perf` — {} on {} ({} timed steps after {} warm-up, {} process(es) per case)\n",
        a.model,
        a.device,
        a.steps,
        a.warmup,
        a.repeats.max(1)
    );
    println!("{}", table(&ours, &torch));
    let all: Vec<&CaseResult> = ours.iter().chain(torch.iter()).collect();
    if all.iter().any(|c| c.mode == "train") {
        println!("{}", breakdown(&all));
    }
    println!("{}", targets(&ours, &torch, &a.device));
    for c in &all {
        println!("{}", json_line(c));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(method: &str, mode: &str, s: f64, mb: f64, fw: &str) -> CaseResult {
        let line = json!({"model": "clip-b16", "method": method, "mode": mode, "median_step_s": s, "peak_rss_mb": mb,
                          "framework": fw, "images_per_s": 8.0 / s, "step_s": [s, s]});
        parse_case(&line.to_string()).unwrap()
    }

    #[test]
    fn parses_the_last_json_line_and_checks_the_contract_keys() {
        let out = "warming up\n{\"model\":\"x\"}\n{\"model\":\"clip-b16\",\"method\":\"lora\",\"mode\":\"train\",\"median_step_s\":1.5,\"peak_rss_mb\":900.0,\"forward_s\":0.5}\n";
        let c = parse_case(out).unwrap();
        assert_eq!((c.model.as_str(), c.method.as_str(), c.mode.as_str()), ("clip-b16", "lora", "train"));
        assert_eq!((c.median_step_s, c.peak_rss_mb, c.num("forward_s")), (1.5, 900.0, Some(0.5)));
        assert!(parse_case("{\"model\":\"x\"}").is_err(), "missing keys must fail");
        assert!(parse_case("no json").is_err());
    }

    #[test]
    fn combine_takes_the_median_process_and_the_largest_peak() {
        let runs = [(1.3, 500.0), (1.1, 520.0), (1.2, 510.0)].map(|(s, mb)| case("lora", "infer-merged", s, mb, "burn-flex"));
        let c = combine(runs.to_vec()).unwrap();
        assert_eq!((c.median_step_s, c.peak_rss_mb), (1.2, 520.0));
        assert_eq!(c.raw["process_medians_s"], json!([1.1, 1.2, 1.3]));
        assert!(json_line(&c).contains("\"process_medians_s\":[1.1,1.2,1.3]"));
        // one run: unchanged, no list
        let one = combine(vec![case("lora", "train", 2.0, 100.0, "burn-flex")]).unwrap();
        assert_eq!((one.median_step_s, one.raw.get("process_medians_s")), (2.0, None));
        assert!(combine(Vec::new()).is_err());
        // the alternated merged ÷ base of each process: their median
        let with = |s: f64, r: f64| {
            let mut c = case("lora", "infer-merged", s, 500.0, "burn-flex");
            c.raw["over_alternated"] = json!(r);
            c
        };
        let c = combine(vec![with(1.3, 1.01), with(1.1, 0.97), with(1.2, 1.05)]).unwrap();
        assert_eq!(c.raw["over_alternated"], json!(1.01));
        assert!(json_line(&c).contains("\"process_over_alternated\":[0.97,1.01,1.05]"));
    }

    #[test]
    fn json_line_starts_with_the_contract_keys() {
        let c = case("serial-lora", "infer-merged", 0.25, 512.5, "burn-flex");
        let line = json_line(&c);
        let v: Value = serde_json::from_str(&line).unwrap();
        let at: Vec<usize> = KEYS.iter().map(|k| line.find(&format!("\"{k}\":")).unwrap()).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]) && at[0] == 1, "contract keys first, in order: {line}");
        assert!(line.find("\"framework\"").unwrap() > at[4], "{line}");
        assert_eq!(v["median_step_s"], 0.25);
        assert_eq!(v["peak_rss_mb"], 512.5);
        assert_eq!(v["framework"], "burn-flex");
        assert!(v.get("step_s").is_none(), "per-step lists stay out of the summary line");
        assert_eq!(parse_case(&line).unwrap().key(), c.key(), "the printed line parses back");
    }

    #[test]
    fn serial_training_alternates_with_the_plain_method_of_the_run() {
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let all = m(&["lora", "serial-lora", "lora-plus", "serial-lora-plus"]);
        assert_eq!(alternate_with("serial-lora", "train", &all), Some("lora"));
        assert_eq!(alternate_with("serial-lora-plus", "train", &all), Some("lora-plus"));
        assert_eq!(alternate_with("serial-lora", "infer-merged", &all), None);
        assert_eq!(alternate_with("lora", "train", &all), None);
        assert_eq!(alternate_with("serial-lora", "train", &m(&["serial-lora"])), None);
    }

    #[test]
    fn cases_add_the_base_forward_once_with_merged_inference() {
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = cases(&m(&["lora", "serial-lora"]), &m(&["train", "infer-merged"])).unwrap();
        let want = [("lora", "train"), ("serial-lora", "train"), ("lora", "infer-merged"), ("serial-lora", "infer-merged"), ("base", "infer")];
        assert_eq!(c, want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec());
        assert!(cases(&m(&["dora"]), &m(&["train"])).is_err());
        assert!(cases(&m(&["lora"]), &m(&["eval"])).is_err());
    }

    #[test]
    fn every_model_has_an_example_and_a_pytorch_script() {
        for m in ["clip-b16", "sam-b", "sd3-block"] {
            let p = program(m).unwrap();
            let manifest = std::fs::read_to_string(crate::root().join("crates").join(p.package).join("Cargo.toml")).unwrap();
            assert!(p.example == "perf" || manifest.contains(&format!("name = \"{}\"", p.example)), "{m}: example {} not declared", p.example);
            assert!(crate::root().join("crates").join(p.package).join("examples/perf.rs").is_file(), "{m}");
            assert!(crate::root().join(python_script(m).unwrap()).is_file(), "{m}");
        }
        assert!(program("sam-h").is_err() && python_script("sam-h").is_err());
    }

    #[test]
    fn tables_and_targets() {
        let ours = vec![
            case("lora", "train", 4.0, 3000.0, "burn-flex"),
            case("serial-lora", "train", 3.0, 2500.0, "burn-flex"),
            case("serial-lora", "infer-merged", 1.01, 800.0, "burn-flex"),
            case("base", "infer", 1.0, 800.0, "burn-flex"),
        ];
        let torch = vec![case("lora", "train", 2.0, 3500.0, "pytorch"), case("serial-lora", "train", 1.5, 2000.0, "pytorch")];
        let t = table(&ours, &torch);
        assert!(t.contains("| clip-b16 | lora | train | 4.000 | 2.000 | 2.00 |"), "{t}");
        assert!(t.contains("| clip-b16 | base | infer | 1.000 | – | – |"), "{t}");
        let g = targets(&ours, &torch, "cpu");
        assert!(g.contains("| train step ours ÷ PyTorch (lora) | 2.000 | ≤ 1 | missed |"), "{g}");
        assert!(g.contains("| ours: serial-lora train step ÷ lora train step (separate processes) | 0.750 | ≤ 1 | met |"), "{g}");
        assert!(g.contains("| infer-merged ours ÷ PyTorch (serial-lora) | – | ≤ 1 | not measured |"), "{g}");
        assert!(g.contains("| ours: serial-lora merged inference ÷ base forward (separate processes) | 1.010 | ≤ 1.02 | met |"), "{g}");
        assert!(g.contains("| ours: lora merged inference ÷ base forward (separate processes) | – | ≤ 1.02 | not measured |"), "{g}");
        assert!(g.contains("| train peak RSS ours ÷ PyTorch (lora) | 0.857 | ≤ 1 | met |"), "{g}");
        let mut alternated = ours.clone();
        alternated[2].raw["over_alternated"] = json!(1.03);
        alternated[2].raw["alternated_with"] = json!("base");
        alternated[1].raw["over_alternated"] = json!(0.98);
        alternated[1].raw["alternated_with"] = json!("lora");
        let g = targets(&alternated, &torch, "cpu");
        assert!(g.contains("| ours: serial-lora merged inference ÷ base forward (alternated in one process) | 1.030 | ≤ 1.02 | missed |"), "{g}");
        assert!(g.contains("| ours: serial-lora train step ÷ lora train step (alternated in one process) | 0.980 | ≤ 1 | met |"), "{g}");
        // alternated with another method: not this comparison
        alternated[1].raw["alternated_with"] = json!("lora-plus");
        assert!(targets(&alternated, &torch, "cpu").contains("| ours: serial-lora train step ÷ lora train step (separate processes) | 0.750 |"));
        assert!(table(&ours, &[]).contains("| clip-b16 | lora | train | 4.000 | 2.00 | 3000 |"));
        assert!(targets(&ours, &torch, "tch-cpu").contains("| train step ours ÷ PyTorch (lora) | 2.000 | ≤ 0.9 | missed |"));
        assert_eq!(limits("sd3-block", "cpu"), (1.25, 1.25));
        assert_eq!(limits("sd3-block", "tch-cpu"), (1.0, 1.0));
    }
}
