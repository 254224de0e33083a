//! `cargo xtask gpu-check`: the CUDA path, checked on a GPU machine with binaries built on a CPU
//! machine (nothing of it has run yet: run it whenever a GPU is at hand).
//!
//! `--prepare` (any machine, no GPU needed) builds with `--features cuda`, release profile, in
//! the `cuda` target dir, and copies into `gpu-check/` (git-ignored) together with this xtask
//! binary:
//! - the parity suites (`serial-lora` `peft_parity`, the models' `parity`, SD3's `t5`), which run
//!   on CUDA through `serial_lora::testing` against the PyTorch CPU references at
//!   `max(tolerance, 1e-4)`: outputs layer by layer, the adapters' gradients and AdamW steps
//!   (attention stack), SD3's training-step gradients;
//! - clip-cls's `perf` example (`cargo xtask perf`'s program for `clip-b16`).
//!
//! On the GPU machine `gpu-check/xtask gpu-check` (no cargo needed; run from the repository root,
//! whose `tests/fixtures` the suites read, linked to the path they were built in) runs them, then the `clip-b16` training and merged
//! inference steps on `cuda` next to PyTorch + PEFT on the same GPU when the machine's `python3`
//! has torch and peft, and writes everything to `gpu-check/report.json`.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The bundle directory, relative to the repository root.
const BUNDLE: &str = "gpu-check";
/// The parity suites: (package, test targets).
const SUITES: [(&str, &[&str]); 4] =
    [("serial-lora", &["peft_parity", "checkpoint", "half"]), ("clip-cls", &["parity"]), ("sam-seg", &["parity"]), ("sd3-gen", &["parity", "t5"])];

/// Builds the CUDA binaries and copies them into `gpu-check/`.
pub fn prepare() -> Result<()> {
    let dir = crate::root().join(BUNDLE);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut tests = crate::cargo("cuda");
    tests.args([
        "test",
        "--release",
        "--no-run",
        "--message-format=json-render-diagnostics",
        "--features",
        "serial-lora/cuda,clip-cls/cuda,sam-seg/cuda,sd3-gen/cuda",
    ]);
    for (package, targets) in SUITES {
        tests.args(["-p", package]);
        for t in targets {
            tests.args(["--test", t]);
        }
    }
    eprintln!("$ {tests:?}");
    let out = tests.current_dir(crate::root()).stderr(std::process::Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("building the CUDA test suites failed");
    }
    // cargo's JSON messages name each test executable
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else { continue };
        let (Some(exe), Some(name), Some(package)) = (msg["executable"].as_str(), msg["target"]["name"].as_str(), msg["package_id"].as_str()) else { continue };
        let package = SUITES.iter().map(|s| s.0).find(|p| package.contains(&format!("crates/{p}"))).context("a suite of an unknown package")?;
        copy(Path::new(exe), &dir.join(format!("test-{package}-{name}")))?;
    }
    crate::run(crate::cargo("cuda").args(["build", "--release", "-p", "clip-cls", "--example", "perf", "--features", "cuda"]))?;
    copy(&crate::target_dir("cuda").join("release/examples/perf"), &dir.join("clip-perf"))?;
    copy(&std::env::current_exe()?, &dir.join("xtask"))?;
    let size: u64 = std::fs::read_dir(&dir)?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    eprintln!("{}: {:.0} MiB; on the GPU machine run `{BUNDLE}/xtask gpu-check` from the repository root", dir.display(), size as f64 / 1048576.0);
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// One command's outcome for the report.
fn outcome(name: &str, cmd: &mut Command) -> Value {
    let t = Instant::now();
    eprintln!("$ {cmd:?}");
    let (ok, output) = match cmd.output() {
        Ok(o) => (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))),
        Err(e) => (false, format!("could not start: {e}")),
    };
    let tail: String = output.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    eprintln!("  {} in {:.0} s", if ok { "passed" } else { "FAILED" }, t.elapsed().as_secs_f64());
    json!({"name": name, "ok": ok, "seconds": t.elapsed().as_secs_f64(), "output_tail": tail})
}

/// Runs the bundle on this machine's GPU and writes `gpu-check/report.json`.
pub fn run() -> Result<()> {
    let root = std::env::current_dir()?;
    let dir = root.join(BUNDLE);
    if !dir.join("clip-perf").is_file() || !root.join("tests/fixtures").is_dir() {
        bail!("run from the repository root after `cargo xtask gpu-check --prepare` ({} missing)", dir.display());
    }
    let t = Instant::now();
    let mut steps = Vec::new();
    let mut suites: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("test-")))
        .collect();
    suites.sort();
    // the suites find their fixtures by the checkout path they were built in
    let built_in = crate::root();
    if built_in != root && !built_in.join("tests/fixtures").is_dir() {
        std::fs::create_dir_all(built_in.parent().context("a parent dir")?)?;
        #[cfg(unix)]
        std::os::unix::fs::symlink(&root, &built_in).with_context(|| format!("linking {} to {}", built_in.display(), root.display()))?;
    }
    for exe in &suites {
        let name = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        steps.push(outcome(&name, Command::new(exe).current_dir(&root)));
    }
    let case = ["--preset", "vit-b-16", "--steps", "5", "--warmup", "2", "--model-name", "clip-b16"];
    let mut perf = Vec::new();
    for (method, mode) in [("lora", "train"), ("serial-lora", "train"), ("lora", "infer-merged"), ("base", "infer")] {
        let args = ["--method", method, "--mode", mode];
        let ours = Command::new(dir.join("clip-perf")).args(["--device", "cuda"]).args(case).args(args).output();
        let torch = Command::new("python3").arg(root.join("tools/perf/clip_perf.py")).args(["--device", "cuda"]).args(case).args(args).output();
        let last_json = |o: std::io::Result<std::process::Output>| -> Value {
            o.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).lines().rev().find_map(|l| serde_json::from_str::<Value>(l).ok())).unwrap_or(Value::Null)
        };
        perf.push(json!({"method": method, "mode": mode, "ours": last_json(ours), "pytorch": last_json(torch)}));
    }
    let report = json!({
        "ok": steps.iter().all(|s| s["ok"] == true),
        "seconds": t.elapsed().as_secs_f64(),
        "suites": steps,
        "perf_clip_b16_cuda": perf,
    });
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    eprintln!("{} ({:.0} s)", path.display(), t.elapsed().as_secs_f64());
    if report["ok"] != true {
        bail!("a CUDA parity suite failed: see {}", path.display());
    }
    Ok(())
}
