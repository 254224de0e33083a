//! What the task binaries (`clip-cls`, `sam-seg`, `sd3-gen`) share around their subcommands:
//! the checks before any work (an output file whose directory does not exist is refused with one
//! wording, naming the flag), the launch of a `train` process, its progress reporter, the
//! merge of `--adapter` directories into a loaded base model, the progress bar of an
//! evaluation and the report of an export.
use std::path::Path;

use burn::prelude::Backend;
use serial_lora::{AdaptedModel, BaseDType};

use crate::dist::{Launch, Peer, launch};
use crate::error::{Error, Result};
use crate::export::{ExportDtype, ExportSummary, WeightedAdapter, merge_weighted};
use crate::run::{ProgressReporter, RunArgs};

/// Refuses the output file `path` of `flag` (e.g. `--output`) when its directory does not exist.
pub fn check_output_parent(flag: &'static str, path: &Path) -> Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => Err(Error::OutputDir { flag, path: path.to_path_buf(), dir: dir.to_path_buf() }),
        _ => Ok(()),
    }
}

/// [`check_output_parent`] of each output file given (`None`: that flag was not given).
pub fn check_outputs(outputs: &[(&'static str, Option<&Path>)]) -> Result<()> {
    for &(flag, path) in outputs {
        if let Some(path) = path {
            check_output_parent(flag, path)?;
        }
    }
    Ok(())
}

/// The device and the place in a data-parallel job of a `train` process ([`launch`]). The
/// launcher of a data-parallel job (`--dist`) starts the peers and exits here with their code.
pub fn launch_train(run: &RunArgs) -> Result<(String, Peer)> {
    match launch(&run.dist, &run.device)? {
        Launch::Done(code) => std::process::exit(code),
        Launch::Train { peer, device } => Ok((device, peer)),
    }
}

/// The progress reporter of a `train` run: `score_name` logged per step, `metrics.jsonl` in
/// `--out` (with the B-matrix learning rate `lr × lr_ratio` for the `-plus` methods); silent on
/// the peers other than 0.
pub fn train_reporter(run: &RunArgs, method: &str, lr_ratio: f64, score_name: &'static str, peer: &Peer) -> ProgressReporter {
    let plus = method.ends_with("-plus").then_some(lr_ratio);
    ProgressReporter::for_peer(run.logging_steps, score_name, peer).with_metrics_log(&run.out, plus)
}

/// `model` with the weighted adapters (PEFT LoRA or Serial LoRA directories, [`serial_lora::io::load_adapter`])
/// merged in the order given ([`merge_weighted`]).
pub fn merge_adapters<B: Backend, M: AdaptedModel<B>>(model: M, adapters: &[WeightedAdapter], device: &B::Device) -> Result<M> {
    merge_weighted(model, adapters, &mut |m, a| serial_lora::io::load_adapter(m, a, device).map(|(m, _)| m))
}

/// Runs `f` with a progress callback `(done, total)` drawn as a progress bar on stderr, cleared
/// at the end.
pub fn with_progress_bar<T>(f: impl FnOnce(&mut dyn FnMut(usize, usize)) -> T) -> T {
    let bar = indicatif::ProgressBar::new(0);
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let r = f(&mut progress);
    bar.finish_and_clear();
    r
}

/// Reports an export into `out`: `wrote OUT (N <tensors>, M merged)` on stderr, the summary as
/// JSON on stdout.
pub fn report_export(out: &Path, summary: &ExportSummary, tensors: &str) -> serde_json::Result<()> {
    eprintln!("wrote {} ({} {tensors}, {} merged)", out.display(), summary.tensors, summary.merged_tensors);
    println!("{}", serde_json::to_string(summary)?);
    Ok(())
}

/// `--dtype`: the precision of the base model's weights — held in memory (inference and
/// training commands: default f32) or written (`export`: default the checkpoint's own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
    /// The checkpoint's own dtype.
    Auto,
}

impl DTypeArg {
    /// The dtype to hold a base model in; `auto` reads it from the first `*.safetensors` file
    /// (by name) of the checkpoint directory `dir`.
    pub fn base(arg: Option<Self>, dir: &Path) -> Result<BaseDType> {
        Ok(match arg {
            None | Some(DTypeArg::F32) => BaseDType::F32,
            Some(DTypeArg::Bf16) => BaseDType::Bf16,
            Some(DTypeArg::F16) => BaseDType::F16,
            Some(DTypeArg::Auto) => {
                let mut files: Vec<_> = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten().map(|e| e.path()).collect();
                files.retain(|p| p.extension().is_some_and(|e| e == "safetensors"));
                files.sort();
                let first = files.first().ok_or_else(|| Error::config("dtype", "auto", format!("no *.safetensors file in {}", dir.display())))?;
                crate::weights::checkpoint_dtype(first)?
            }
        })
    }

    /// The dtype an export writes (`None`: each tensor's own).
    pub fn export(arg: Option<Self>) -> Option<ExportDtype> {
        match arg? {
            DTypeArg::F32 => Some(ExportDtype::F32),
            DTypeArg::Bf16 => Some(ExportDtype::Bf16),
            DTypeArg::F16 => Some(ExportDtype::F16),
            DTypeArg::Auto => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_flag_the_file_and_the_directory() {
        let err = super::check_output_parent("--output", std::path::Path::new("/no/such/dir/out.json")).unwrap_err().to_string();
        assert_eq!(err, "--output /no/such/dir/out.json: directory /no/such/dir does not exist");
        super::check_output_parent("--output", std::path::Path::new("out.json")).unwrap();
    }

    #[test]
    fn check_outputs_names_the_flag_of_the_bad_one_and_skips_those_not_given() {
        use std::path::Path;
        super::check_outputs(&[("--output", Some(Path::new("out.json"))), ("--mask-png", None)]).unwrap();
        let err =
            super::check_outputs(&[("--output", Some(Path::new("out.json"))), ("--mask-png", Some(Path::new("/no/such/dir/m.png")))]).unwrap_err().to_string();
        assert_eq!(err, "--mask-png /no/such/dir/m.png: directory /no/such/dir does not exist");
    }

    #[test]
    fn the_progress_bar_passes_the_result_through() {
        let mut seen = Vec::new();
        let r = super::with_progress_bar(|p| {
            p(1, 2);
            p(2, 2);
            seen.push(2);
            7
        });
        assert_eq!((r, seen), (7, vec![2]));
    }
}
