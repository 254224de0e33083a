//! `cargo xtask <command>`: the project's automation (the cargo-xtask pattern).
//!
//! `ci` is what `.ci/run` runs: if `cargo xtask ci` passes locally, CI is green.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

mod bench;
mod deps;
mod gpu;
mod perf;
mod plot;
mod report;
mod smoke;
mod stats;
mod sweep;

#[derive(Parser)]
#[command(about = "Project automation for the serial-lora workspace")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check the dependency graph (`deps`), build and run every test (default `flex` backend),
    /// type-check the `cuda` backend, run the example, run the parity suites on `tch-cpu`
    /// (LibTorch of torch 2.9.0: the fixtures' `.venv`, else a venv made in
    /// `$CARGO_TARGET_DIR-venv`), and the smoke check.
    Ci,
    /// Check the dependency graph: the core library (`serial-lora`) depends only on its
    /// allow-list, the runtime on the core, the task crates on both, xtask on none of them.
    Deps,
    /// Regenerate the reference fixtures under tests/fixtures/ with the Python reference
    /// packages (creates .venv from tools/fixtures/requirements.txt if missing).
    Fixtures,
    /// Save adapters with this crate and load them with PEFT (`PeftModel.from_pretrained`),
    /// comparing outputs; then load the merged models of `clip-cls export`, `sam-seg export` and
    /// `sd3-gen export` (f32, f16, bf16) with `CLIPModel` / `SamModel` /
    /// `StableDiffusion3Pipeline.from_pretrained` and compare them with `embed` / `predict` /
    /// `sample --adapter`. Needs the .venv of `fixtures`.
    PeftCheck,
    /// Train a LoRA with `sd3-gen train` on the tiny SD3 fixture, load it in diffusers'
    /// `StableDiffusion3Pipeline.load_lora_weights` and compare a sample with `sd3-gen sample
    /// --adapter`. Needs the .venv of `fixtures`.
    Sd3LoraCheck,
    /// Run a sweep preset (`configs/<preset>.toml`): every run writes `<out>/<run-id>/{config.json,
    /// adapter/, metrics.json}`; finished runs are skipped, unfinished ones resumed.
    BenchAll(BenchArgs),
    /// The smoke sweep as CI checks it: a shard, the whole preset killed mid-run and re-run
    /// (finished runs skipped), then the report with every table and figure.
    SmokeCheck,
    /// Tables (Markdown + CSV) and figures (SVG + PNG) of the finished runs in `<out>/report/`.
    Report {
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// Longer fuzzing than CI's: the in-process loader fuzz suites of every crate (`tests/fuzz.rs`,
    /// harness `tests/common/fuzz.rs`) with `--cases` byte-mutation cases per file and the given
    /// (or a clock-derived, printed) seed; a failure prints the shrunk input and the seed to replay.
    Fuzz {
        #[arg(long, default_value_t = 2000)]
        cases: u32,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Time training and inference steps of a model on synthetic inputs (random weights of the
    /// real config), optionally next to PyTorch + PEFT (`--vs-pytorch`); see docs/perf.md.
    Perf(perf::PerfArgs),
    /// The CUDA check for a GPU machine: `--prepare` builds the CUDA parity suites and the
    /// clip-b16 perf program into `gpu-check/` (on any machine); without it, runs them there
    /// (no cargo needed: `gpu-check/xtask gpu-check`) and writes `gpu-check/report.json`.
    GpuCheck {
        #[arg(long)]
        prepare: bool,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// `smoke` (tiny models, generated data, minutes on a CPU), `proxy` (digits transfer on
    /// CPU), `paper` (the paper's grid: GPU, datasets, weights) or a path to a TOML file.
    #[arg(long, default_value = "smoke")]
    preset: String,
    /// Device for every run: cpu | cuda[:N] | tch-cpu | tch-cuda[:N] (builds with that backend).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Only runs whose task, dataset or method is one of these (comma-separated).
    #[arg(long)]
    only: Option<String>,
    /// Run shard K of N (1-based): every N-th run of the sorted grid.
    #[arg(long)]
    shard: Option<String>,
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Write a Slurm job-array script for N shards (`<out>/bench-<preset>.sbatch`) and exit.
    #[arg(long, value_name = "N")]
    emit_slurm: Option<usize>,
    /// Build the task binaries with the release profile.
    #[arg(long)]
    release: bool,
    /// List the runs (and whether each is finished) without running them.
    #[arg(long)]
    dry_run: bool,
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// The target dir for a feature set: `$CARGO_TARGET_DIR` (or `<root>/target`) plus a suffix,
/// so feature sets never invalidate each other's builds.
fn target_dir(suffix: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    if suffix.is_empty() { base } else { PathBuf::from(format!("{}-{suffix}", base.display())) }
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let t = Instant::now();
    let status = cmd.current_dir(root()).status().with_context(|| format!("starting {cmd:?}"))?;
    eprintln!("  ({:.0} s)", t.elapsed().as_secs_f64());
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

pub(crate) fn cargo(target_suffix: &str) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.env("CARGO_TARGET_DIR", target_dir(target_suffix));
    c
}

/// The target-dir suffix and cargo feature of the backend behind `--device`.
pub(crate) fn backend_of(device: &str) -> Result<(&'static str, Option<&'static str>)> {
    Ok(match device.split(':').next().unwrap_or("") {
        "cpu" => ("", None),
        "cuda" => ("cuda", Some("cuda")),
        "tch-cpu" | "tch-cuda" => ("tch", Some("tch")),
        d => bail!("--device {device}: unknown device `{d}` (cpu, cuda[:N], tch-cpu, tch-cuda[:N])"),
    })
}

/// The Python whose PyTorch the `tch` builds link (burn-tch 0.21 expects torch 2.9.0, the
/// version of `tools/fixtures/requirements.txt`): the fixtures' `.venv` when it exists, else a
/// venv with that torch alone in `$CARGO_TARGET_DIR-venv` (outside the clone, so CI reuses it).
fn torch_python() -> Result<PathBuf> {
    let fixtures = root().join(".venv/bin/python");
    if fixtures.exists() {
        return Ok(fixtures);
    }
    let venv = target_dir("venv");
    let py = venv.join("bin/python");
    if !py.exists() {
        let reqs = std::fs::read_to_string(root().join("tools/fixtures/requirements.txt"))?;
        let torch = reqs.lines().map(str::trim).find(|l| l.starts_with("torch==")).context("no torch== pin in tools/fixtures/requirements.txt")?;
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(&py).args(["-m", "pip", "install", "--quiet", torch]))?;
    }
    Ok(py)
}

/// `cmd` set up to build against (`LIBTORCH_USE_PYTORCH`, `python3` on `PATH`) and run with
/// (`LD_LIBRARY_PATH`) the LibTorch of [`torch_python`] (found once per process).
pub(crate) fn with_libtorch(cmd: &mut Command) -> Result<&mut Command> {
    static ENV: std::sync::OnceLock<Result<Vec<(&'static str, std::ffi::OsString)>, String>> = std::sync::OnceLock::new();
    let env = ENV.get_or_init(|| libtorch_env().map_err(|e| format!("{e:#}"))).as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(cmd.envs(env.iter().map(|(k, v)| (k, v))))
}

fn libtorch_env() -> Result<Vec<(&'static str, std::ffi::OsString)>> {
    let py = torch_python()?;
    let out = Command::new(&py).args(["-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"]).output()?;
    if !out.status.success() {
        bail!("{} cannot import torch: {}", py.display(), String::from_utf8_lossy(&out.stderr));
    }
    let lib = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    let prepend = |first: &Path, var: &str| {
        let old = std::env::var_os(var).map(|o| std::env::split_paths(&o).collect::<Vec<_>>()).unwrap_or_default();
        std::env::join_paths(std::iter::once(first.to_path_buf()).chain(old))
    };
    let bin = py.parent().context("python has a parent dir")?;
    Ok(vec![("LIBTORCH_USE_PYTORCH", "1".into()), ("PATH", prepend(bin, "PATH")?), ("LD_LIBRARY_PATH", prepend(&lib, "LD_LIBRARY_PATH")?)])
}

fn venv_python() -> Result<PathBuf> {
    let venv = root().join(".venv");
    let py = venv.join("bin/python");
    if !py.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(&py).args(["-m", "pip", "install", "-r", "tools/fixtures/requirements.txt"]))?;
    }
    Ok(py)
}

fn main() -> Result<()> {
    let t = Instant::now();
    match Cli::parse().command {
        Cmd::Ci => {
            deps::check()?;
            run(cargo("").args(["fmt", "--all", "--check"]))?;
            run(cargo("").args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
            run(cargo("").args(["test", "--workspace"]))?;
            // Built with the workspace's feature set (as the tests are) so nothing is rebuilt.
            run(cargo("").args(["build", "--workspace", "--examples"]))?;
            run(Command::new(target_dir("").join("debug/examples/quickstart")).args(["--device", "cpu"]))?;
            run(cargo("cuda").args([
                "check",
                "-p",
                "serial-lora",
                "-p",
                "lora-runtime",
                "-p",
                "clip-cls",
                "-p",
                "sam-seg",
                "-p",
                "sd3-gen",
                "--features",
                "cuda",
                "--examples",
                "--tests",
                "--bins",
            ]))?;
            // the parity suites again on LibTorch (CPU), same tolerances: masked (CLIP's causal
            // text mask), biased (SAM's relative positions) and joint (SD3) attention
            let mut tch = cargo("tch");
            tch.args(["test", "-p", "serial-lora", "-p", "clip-cls", "-p", "sam-seg", "-p", "sd3-gen"]);
            tch.args(["--features", "serial-lora/tch,clip-cls/tch,sam-seg/tch,sd3-gen/tch"]);
            tch.args(["--test", "peft_parity", "--test", "parity", "--test", "t5", "--test", "checkpoint", "--test", "half"]);
            run(with_libtorch(&mut tch)?)?;
            smoke_check()?;
        }
        Cmd::Fixtures => {
            let py = venv_python()?;
            for script in [
                "serial_lora_core.py",
                "clip_tiny.py",
                "clip_text_image.py",
                "sam_tiny.py",
                "sam_processor.py",
                "sam_tiny_shapes.py",
                "sd3_tiny.py",
                "sd3_text.py",
                "sd3_t5.py",
                "sd3_lora_context.py",
                "sd3_train_step.py",
                "fid_inception.py",
                "fid_folders.py",
                "clip_score.py",
                "unusual_images.py",
                "export_merge.py",
                "paired_t.py",
                "half_reference.py",
            ] {
                // PYTHONHASHSEED: PEFT writes target_modules from a set; fix its order.
                run(Command::new(&py).arg(format!("tools/fixtures/{script}")).env("PYTHONHASHSEED", "0"))?;
            }
        }
        Cmd::PeftCheck => {
            let py = venv_python()?;
            let out = target_dir("").join("peft-export");
            let _ = std::fs::remove_dir_all(&out);
            run(cargo("").args(["test", "-p", "serial-lora", "--test", "peft_export"]).env("PEFT_EXPORT_DIR", &out))?;
            run(Command::new(&py).arg("tools/fixtures/check_peft_load.py").arg(&out))?;
            // merged exports, loaded by transformers / diffusers without adapter code
            run(cargo("").args(["build", "-p", "clip-cls", "-p", "sam-seg", "-p", "sd3-gen", "--bins"]))?;
            run(Command::new(&py).arg("tools/fixtures/check_export_load.py").arg(target_dir("").join("debug")))?;
        }
        Cmd::Sd3LoraCheck => {
            let py = venv_python()?;
            run(cargo("").args(["build", "-p", "sd3-gen", "--bin", "sd3-gen"]))?;
            run(Command::new(&py).arg("tools/fixtures/check_sd3_lora_load.py").arg(target_dir("").join("debug/sd3-gen")))?;
        }
        Cmd::BenchAll(args) => bench_all(&args)?,
        Cmd::SmokeCheck => smoke_check()?,
        Cmd::Deps => deps::check()?,
        Cmd::Perf(args) => perf::perf(&args)?,
        Cmd::GpuCheck { prepare } => {
            if prepare {
                gpu::prepare()?
            } else {
                gpu::run()?
            }
        }
        Cmd::Fuzz { cases, seed } => {
            let seed = seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()));
            eprintln!("fuzzing with FUZZ_SEED={seed} FUZZ_CASES={cases}");
            for krate in ["serial-lora", "lora-runtime", "clip-cls", "sam-seg", "sd3-gen"] {
                run(cargo("")
                    .args(["test", "-p", krate, "--test", "fuzz", "--", "--nocapture", "--test-threads", "2"])
                    .env("FUZZ_SEED", seed.to_string())
                    .env("FUZZ_CASES", cases.to_string())
                    .env("FUZZ_CLI_CASES", (cases / 20).max(8).to_string()))
                .with_context(|| format!("replay with: cargo xtask fuzz --cases {cases} --seed {seed}"))?;
            }
        }
        Cmd::Report { out } => {
            let out = absolute(&out)?;
            eprintln!("wrote {}", report::report(&root(), &out)?.display());
        }
    }
    eprintln!("xtask done in {:.0} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// The `smoke` sweep end to end, as CI runs it: shard 1 of 2; then its SD3 runs, killed
/// (SIGKILL to the process group) in the middle of one; then the whole preset again, which must
/// skip every finished run and complete the rest, the killed one included; then the report,
/// which must hold every table and figure.
fn smoke_check() -> Result<()> {
    let t = Instant::now();
    let out = target_dir("").join("smoke-ci");
    let _ = std::fs::remove_dir_all(&out);
    let exe = std::env::current_exe().context("the xtask binary")?;
    let bench = |extra: &[&str]| {
        let mut c = Command::new(&exe);
        c.args(["bench-all", "--preset", "smoke", "--out"]).arg(&out).args(extra);
        c
    };
    let finished = || report::finished_runs(&out).map(|r| r.len());
    run(&mut bench(&["--shard", "1/2"]))?;
    let shard1 = finished()?;
    #[cfg(unix)]
    {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        // the SD3 runs take seconds each: kill 1 s into the run after the first one finished
        let mut interrupted = bench(&["--only", "sd3"]);
        eprintln!("$ {interrupted:?} (killed 1 s into its second run)");
        let mut child = interrupted.process_group(0).stderr(std::process::Stdio::piped()).spawn()?;
        // keep draining its stderr (a closed pipe would end it early), note the first finished run
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let forward = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if line.contains(": done in") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(std::time::Duration::from_secs(600)).context("smoke check: no SD3 run finished")?;
        std::thread::sleep(std::time::Duration::from_secs(1));
        // SAFETY: signals the process group the child leads
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        child.wait()?;
        let _ = forward.join();
    }
    let before = finished()?;
    let started: Vec<PathBuf> =
        std::fs::read_dir(&out)?.filter_map(|e| Some(e.ok()?.path())).filter(|d| d.join("config.json").is_file() && !d.join("metrics.json").exists()).collect();
    if before <= shard1 || (cfg!(unix) && started.is_empty()) {
        bail!(
            "smoke check: the interrupted sweep should have finished a run and left one unfinished ({before} finished, {shard1} before; unfinished: {started:?})"
        );
    }
    let output = bench(&[]).stderr(std::process::Stdio::piped()).output()?;
    let log = String::from_utf8_lossy(&output.stderr);
    eprint!("{log}");
    if !output.status.success() {
        bail!("smoke check: the resumed sweep failed");
    }
    let skipped = log.lines().filter(|l| l.contains(": finished earlier")).count();
    if skipped != before {
        bail!("smoke check: {before} runs were finished but {skipped} were skipped");
    }
    let path = report::report(&root(), &out)?;
    let dir = path.parent().context("report dir")?;
    let mut expected: Vec<String> = [
        "report.md",
        "table1.csv",
        "table1_runs.csv",
        "table2.csv",
        "table3.csv",
        "table4.csv",
        "proxy.csv",
        "proxy_paired.csv",
        "proxy_params.csv",
        "proxy_ranks.csv",
        "runs.csv",
    ]
    .map(String::from)
    .to_vec();
    for fig in [
        "fig5_rank_sweep",
        "fig3_spectra",
        "loss_clip",
        "loss_sam",
        "loss_sd3",
        "loss_proxy",
        "fig5_rank_sweep_proxy",
        "fig3_spectra_proxy",
        "proxy_accuracy_vs_params",
    ] {
        expected.extend(["svg", "png"].map(|e| format!("{fig}.{e}")));
    }
    let missing: Vec<&String> = expected.iter().filter(|f| !dir.join(f).is_file()).collect();
    if !missing.is_empty() {
        bail!("smoke check: the report lacks {missing:?}");
    }
    let md = std::fs::read_to_string(&path)?;
    if md.contains("No finished runs") {
        bail!("smoke check: a table of the report is empty:\n{md}");
    }
    eprintln!("smoke sweep: {} runs, interrupted and resumed, report complete ({:.0} s)", finished()?, t.elapsed().as_secs_f64());
    Ok(())
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("{}", p.display()))
}

/// `1m 05s` style durations.
fn hms(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h {:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

fn bench_all(a: &BenchArgs) -> Result<()> {
    let root = root();
    let out = absolute(&a.out)?;
    let (preset_path, preset) = sweep::Preset::load(&root, &a.preset)?;
    let mut runs = preset.runs(&sweep::Vars { root: &root, out: &out })?;
    let total_grid = runs.len();
    if let Some(only) = &a.only {
        runs = sweep::filter(runs, only);
    }
    if let Some(n) = a.emit_slurm {
        if n == 0 {
            bail!("--emit-slurm 0: need at least one shard");
        }
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let name = preset_path.file_stem().and_then(|s| s.to_str()).unwrap_or("sweep");
        let path = out.join(format!("bench-{name}.sbatch"));
        let only = a.only.as_ref().map(|o| format!(" --only {o}")).unwrap_or_default();
        let script = format!(
            "#!/bin/bash\n# {n} shards of the `{name}` preset ({} runs); submit with: sbatch {}\n#SBATCH --job-name=serial-lora-{name}\n#SBATCH --array=1-{n}\n#SBATCH --gpus=1\n#SBATCH --cpus-per-task=8\n#SBATCH --time=24:00:00\n#SBATCH --output={}/slurm-%A_%a.log\nset -euo pipefail\ncd {}\n# each array task runs its shard; finished runs are skipped, so resubmitting resumes\ncargo xtask bench-all --preset {} --device {} --release --out {} --shard ${{SLURM_ARRAY_TASK_ID}}/{n}{only}\n",
            runs.len(),
            path.display(),
            out.display(),
            root.display(),
            a.preset,
            a.device,
            out.display(),
        );
        bench::write_atomic(&path, script.as_bytes())?;
        eprintln!("wrote {} ({n} array tasks; gather with: cargo xtask report --out {})", path.display(), out.display());
        return Ok(());
    }
    if let Some(s) = &a.shard {
        runs = sweep::shard(runs, sweep::parse_shard(s)?);
    }
    eprintln!("{} ({}): {} of {total_grid} runs -> {}", preset_path.display(), preset.description, runs.len(), out.display());
    if a.dry_run {
        for r in &runs {
            let done = out.join(&r.id).join("metrics.json").is_file();
            println!("{}{}", r.id, if done { " (finished)" } else { "" });
        }
        return Ok(());
    }

    // the task binaries, with the device's backend (its own target dir) and profile
    let device: String = a.device.clone();
    let (suffix, features) = backend_of(&device)?;
    let mut build = cargo(suffix);
    // the workspace's feature set, as `cargo test --workspace` builds it, so nothing is rebuilt
    build.args(["build", "--workspace", "--bins", "--examples"]);
    if let Some(f) = features {
        build.args(["--features", f]);
    }
    if a.release {
        build.arg("--release");
    }
    if suffix == "tch" {
        with_libtorch(&mut build)?;
    }
    run(&mut build)?;
    let bin_dir = target_dir(suffix).join(if a.release { "release" } else { "debug" });
    if preset.generate_smoke_data {
        smoke::generate(&root, &out, &bin_dir.join("examples/fid_test_weights"))?;
    }

    let runner = bench::Runner { bin_dir, libtorch: suffix == "tch", device };
    let start = Instant::now();
    let (mut executed, mut failed) = (0usize, Vec::new());
    let mut spent = 0.0;
    for (i, r) in runs.iter().enumerate() {
        let t = Instant::now();
        match runner.run(r, &out.join(&r.id)) {
            Ok(false) => eprintln!("[{:>3}/{}] {}: finished earlier", i + 1, runs.len(), r.id),
            Ok(true) => {
                executed += 1;
                spent += t.elapsed().as_secs_f64();
                let left = runs.len() - i - 1;
                eprintln!(
                    "[{:>3}/{}] {}: done in {} (ETA {})",
                    i + 1,
                    runs.len(),
                    r.id,
                    hms(t.elapsed().as_secs_f64()),
                    hms(spent / executed as f64 * left as f64)
                );
            }
            Err(e) => {
                eprintln!("[{:>3}/{}] {}: FAILED: {e:#}", i + 1, runs.len(), r.id);
                failed.push(r.id.clone());
            }
        }
    }
    eprintln!(
        "{executed} runs done, {} skipped as finished, {} failed, in {}",
        runs.len() - executed - failed.len(),
        failed.len(),
        hms(start.elapsed().as_secs_f64())
    );
    if !failed.is_empty() {
        bail!("failed runs (rerun the same command to retry them): {}", failed.join(", "));
    }
    Ok(())
}
