//! `cargo xtask bench-all`: runs a preset's grid, one run directory per run.
//!
//! `results/<id>/config.json` (the run), `adapter/` (the training run directory: adapter,
//! checkpoints, the trainer's own metrics.json, `log.txt`), then `metrics.json`, written last and
//! atomically: a run with `metrics.json` is finished and skipped on the next invocation; any
//! other is continued (the trainers' `--resume` picks up their last checkpoint).
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::sweep::{Run, Setting};

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// What a finished child process left behind.
struct Finished {
    success: bool,
    peak_rss_mb: f64,
}

/// Runs `cmd` with stdout to `stdout` and stderr appended to `log`; the child's peak resident
/// memory from `wait4`.
fn run_logged(cmd: &mut Command, stdout: &Path, log: &Path) -> Result<Finished> {
    use std::io::Write;
    let mut log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("opening {}", log.display()))?;
    writeln!(log_file, "$ {cmd:?}")?;
    let child = cmd
        .stdout(File::create(stdout).with_context(|| format!("creating {}", stdout.display()))?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    wait_measured(child)
}

#[cfg(unix)]
fn wait_measured(child: std::process::Child) -> Result<Finished> {
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: plain FFI call with valid out-pointers; the child is ours and not waited on elsewhere.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = loop {
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break r;
        }
    };
    if r < 0 {
        bail!("waiting for process {pid}: {}", std::io::Error::last_os_error());
    }
    let success = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    // ru_maxrss is in KiB on Linux
    Ok(Finished { success, peak_rss_mb: usage.ru_maxrss as f64 / 1024.0 })
}

#[cfg(not(unix))]
fn wait_measured(mut child: std::process::Child) -> Result<Finished> {
    Ok(Finished { success: child.wait()?.success(), peak_rss_mb: f64::NAN })
}

/// Where the task binaries are and how they are called.
pub struct Runner {
    pub bin_dir: PathBuf,
    /// Whether the binaries link LibTorch (`tch-*` devices): they run with its library path.
    pub libtorch: bool,
    pub device: String,
}

fn push_flags(cmd: &mut Command, flags: &BTreeMap<String, String>) {
    for (k, v) in flags {
        cmd.arg(format!("--{k}"));
        if !v.is_empty() {
            cmd.arg(v);
        }
    }
}

/// The last line of `path` that parses as a JSON object (the eval commands print one).
fn last_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok().filter(Value::is_object))
        .with_context(|| format!("{}: no JSON result", path.display()))
}

impl Runner {
    fn bin(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(name));
        if self.libtorch {
            // found when the binaries were built, so it cannot fail here
            let _ = crate::with_libtorch(&mut cmd);
        }
        cmd
    }

    /// The train (or, for `proxy`, the whole) command of `run` writing into `adapter`.
    fn train_cmd(&self, run: &Run, adapter: &Path) -> Command {
        let (bin, sub) = match run.task.as_str() {
            "clip" => ("clip-cls", "train"),
            "proxy" => ("clip-cls", "proxy"),
            "sam" => ("sam-seg", "train"),
            _ => ("sd3-gen", "train"),
        };
        let mut cmd = self.bin(bin);
        cmd.arg(sub);
        cmd.args([if run.task == "proxy" { "--data" } else { "--dataset" }, &run.dataset_path]);
        if run.task != "proxy" {
            cmd.args(["--model", &run.model, "--resume"]);
        } else {
            cmd.args(["--backbone", &run.model]);
        }
        match run.setting {
            Setting::Shots(k) => cmd.args(["--shots", &k.to_string()]),
            Setting::Fraction(f) => cmd.args(["--fraction", &f.to_string()]),
        };
        cmd.args(["--method", &run.method, "--rank", &run.rank.to_string(), "--seed", &run.seed.to_string(), "--device", &self.device]);
        push_flags(&mut cmd, &run.train);
        cmd.arg("--out").arg(adapter);
        cmd
    }

    /// The eval command of `run` (none for `proxy`, whose command evaluates).
    fn eval_cmd(&self, run: &Run, adapter: &Path) -> Option<Command> {
        let mut cmd = match run.task.as_str() {
            "clip" => self.bin("clip-cls"),
            "sam" => self.bin("sam-seg"),
            "sd3" => self.bin("sd3-gen"),
            _ => return None,
        };
        cmd.args(["eval", "--model", &run.model, "--dataset", &run.dataset_path, "--device", &self.device]).arg("--adapter").arg(adapter);
        if run.task == "sam" {
            cmd.args(["--seed", &run.seed.to_string()]);
        }
        push_flags(&mut cmd, &run.eval);
        Some(cmd)
    }

    /// Runs `run` in `dir` unless it is finished; returns whether it ran.
    pub fn run(&self, run: &Run, dir: &Path) -> Result<bool> {
        let metrics_path = dir.join("metrics.json");
        if metrics_path.is_file() {
            // a finished run: only record a sweep that now also uses it
            let mut m = read_json(&metrics_path)?;
            let sweeps: Vec<String> = serde_json::from_value(m["sweeps"].clone()).unwrap_or_default();
            if run.sweeps.iter().any(|s| !sweeps.contains(s)) {
                let mut all = sweeps;
                all.extend(run.sweeps.iter().filter(|s| !all.contains(s)).cloned().collect::<Vec<_>>());
                m["sweeps"] = json!(all);
                write_atomic(&metrics_path, serde_json::to_string_pretty(&m)?.as_bytes())?;
            }
            return Ok(false);
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_path = dir.join("config.json");
        if config_path.is_file() {
            let saved: Run = serde_json::from_value(read_json(&config_path)?).with_context(|| format!("{}", config_path.display()))?;
            if (Run { sweeps: run.sweeps.clone(), ..saved }) != *run {
                bail!("{}: holds a run with other settings than the preset's now; move it away to rerun", dir.display());
            }
        }
        write_atomic(&config_path, serde_json::to_string_pretty(run)?.as_bytes())?;
        let adapter = dir.join("adapter");
        let log = dir.join("log.txt");
        let start = Instant::now();

        let mut peak = 0f64;
        let mut step = |cmd: &mut Command, stdout: &Path, what: &str| -> Result<()> {
            let f = run_logged(cmd, stdout, &log)?;
            peak = peak.max(f.peak_rss_mb);
            if !f.success {
                bail!("{what} failed; see {}", log.display());
            }
            Ok(())
        };
        let trained = read_json(&adapter.join("metrics.json")).ok().filter(|m| m["completed"] == json!(true) || run.task == "proxy");
        let train_metrics = match trained {
            Some(m) => m,
            None => {
                std::fs::create_dir_all(&adapter)?;
                step(&mut self.train_cmd(run, &adapter), &dir.join("train.stdout"), "training")?;
                read_json(&adapter.join("metrics.json"))?
            }
        };
        let eval = match self.eval_cmd(run, &adapter) {
            Some(mut cmd) => {
                step(&mut cmd, &dir.join("eval.json"), "evaluation")?;
                last_json(&dir.join("eval.json"))?
            }
            None => json!({}),
        };
        // Fig. 3: spectra of the effective Q, K, V weights of the CLIP runs (base and adapted);
        // `clip-cls proxy` writes its own
        if run.task == "clip" && ["lora", "serial-lora"].contains(&run.method.as_str()) {
            let mut cmd = self.bin("clip-cls");
            cmd.args(["spectra", "--model", &run.model, "--device", &self.device]).arg("--adapter").arg(&adapter).arg("--output").arg(dir.join("spectra.json"));
            step(&mut cmd, &dir.join("spectra.stdout"), "spectra")?;
        } else if run.task == "proxy" && adapter.join("spectra.json").is_file() {
            std::fs::copy(adapter.join("spectra.json"), dir.join("spectra.json"))
                .with_context(|| format!("copying {}", adapter.join("spectra.json").display()))?;
        }
        let mut metrics = json!({
            "id": run.id, "sweeps": run.sweeps, "task": run.task, "dataset": run.dataset, "method": run.method,
            "rank": run.rank, "seed": run.seed, "setting": run.setting, "device": self.device,
            "wall_seconds": start.elapsed().as_secs_f64(), "peak_rss_mb": peak,
            "train": train_metrics, "eval": eval,
        });
        metrics["score"] = score(run, &metrics)?;
        write_atomic(&metrics_path, serde_json::to_string_pretty(&metrics)?.as_bytes())?;
        Ok(true)
    }
}

/// The headline numbers of a finished run, by task: accuracy (clip, proxy), Dice and Dice loss
/// (sam), FID and CLIP-Score (sd3); plus trainable parameters and training images/s.
fn score(run: &Run, m: &Value) -> Result<Value> {
    let get = |v: &Value, k: &str| v.get(k).cloned().with_context(|| format!("run {}: no `{k}` in its results", run.id));
    let (train, eval) = (&m["train"], &m["eval"]);
    let mut s = match run.task.as_str() {
        "clip" => json!({ "accuracy": get(eval, "top1")? }),
        "proxy" => json!({ "accuracy": get(train, "accuracy")?, "adapter_params": get(train, "adapter_params")?, "head_params": get(train, "head_params")? }),
        "sam" => json!({ "dice": get(eval, "dice")?, "dice_loss": get(eval, "dice_loss")? }),
        _ => json!({ "fid": get(eval, "fid")?, "clip_score": get(eval, "clip_score")?, "clip_image_similarity": get(eval, "clip_image_similarity")? }),
    };
    s["trainable_params"] = get(train, "trainable_params")?;
    s["images_per_second"] = train.get("images_per_second").cloned().unwrap_or(Value::Null);
    Ok(s)
}
