//! `cargo xtask <command>`: the project's automation (the cargo-xtask pattern).
//!
//! `ci` is what `.ci/run` runs: if `cargo xtask ci` passes locally, CI is green.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project automation for the serial-lora workspace")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build and run every test (default `flex` backend), type-check the `cuda` backend, run
    /// the example; also type-checks `tch` when SERIAL_LORA_CHECK_TCH=1 (needs LibTorch 2.9.0).
    Ci,
    /// Regenerate the reference fixtures under tests/fixtures/ with the Python reference
    /// packages (creates .venv from tools/fixtures/requirements.txt if missing).
    Fixtures,
    /// Save adapters with this crate and load them with PEFT (`PeftModel.from_pretrained`),
    /// comparing outputs. Needs the .venv of `fixtures`.
    PeftCheck,
    /// Train a LoRA with `sd3-gen train` on the tiny SD3 fixture, load it in diffusers'
    /// `StableDiffusion3Pipeline.load_lora_weights` and compare a sample with `sd3-gen sample
    /// --adapter`. Needs the .venv of `fixtures`.
    Sd3LoraCheck,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// The target dir for a feature set: `$CARGO_TARGET_DIR` (or `<root>/target`) plus a suffix,
/// so feature sets never invalidate each other's builds.
fn target_dir(suffix: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    if suffix.is_empty() { base } else { PathBuf::from(format!("{}-{suffix}", base.display())) }
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let t = Instant::now();
    let status = cmd.current_dir(root()).status().with_context(|| format!("starting {cmd:?}"))?;
    eprintln!("  ({:.0} s)", t.elapsed().as_secs_f64());
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo(target_suffix: &str) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.env("CARGO_TARGET_DIR", target_dir(target_suffix));
    c
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
            run(cargo("").args(["test", "--workspace"]))?;
            // Built with the workspace's feature set (as the tests are) so nothing is rebuilt.
            run(cargo("").args(["build", "--workspace", "--examples"]))?;
            run(Command::new(target_dir("").join("debug/examples/quickstart")).args(["--device", "cpu"]))?;
            run(cargo("cuda").args(["check", "-p", "serial-lora", "-p", "clip-cls", "-p", "sam-seg", "-p", "sd3-gen", "--features", "cuda", "--examples", "--tests", "--bins"]))?;
            if std::env::var("SERIAL_LORA_CHECK_TCH").is_ok_and(|v| v == "1") {
                run(cargo("tch").args(["check", "-p", "serial-lora", "--features", "tch", "--examples"]).env("LIBTORCH_USE_PYTORCH", "1"))?;
            }
        }
        Cmd::Fixtures => {
            let py = venv_python()?;
            for script in ["serial_lora_core.py", "clip_tiny.py", "clip_text_image.py", "sam_tiny.py", "sam_processor.py", "sam_tiny_shapes.py", "sd3_tiny.py", "sd3_text.py", "sd3_t5.py", "sd3_lora_context.py", "sd3_train_step.py", "fid_inception.py", "clip_score.py", "unusual_images.py"] {
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
        }
        Cmd::Sd3LoraCheck => {
            let py = venv_python()?;
            run(cargo("").args(["build", "-p", "sd3-gen", "--bin", "sd3-gen"]))?;
            run(Command::new(&py).arg("tools/fixtures/check_sd3_lora_load.py").arg(target_dir("").join("debug/sd3-gen")))?;
        }
    }
    eprintln!("xtask done in {:.0} s", t.elapsed().as_secs_f64());
    Ok(())
}
