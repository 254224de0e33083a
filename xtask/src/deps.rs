//! `cargo xtask deps`: the workspace's dependency graph as designed. The core library
//! (`serial-lora`) depends only on what an adapter library needs ([`CORE_ALLOWED`]); the runtime
//! (`lora-runtime`) on the core; each task crate on the core and the runtime (`sd3-gen` also on
//! `clip-cls` for its text towers); xtask on no workspace crate (it runs their binaries). Read
//! from `cargo tree` (normal dependencies, every feature set), so a new dependency of the core
//! fails CI until it is added here on purpose.

use anyhow::{Context, Result, bail};

/// The direct normal dependencies the core may have: Burn and its store, serde (+ JSON, TOML,
/// field paths in errors), safetensors, thiserror, nalgebra (spectra), and the fused Flex
/// kernels' gemm / rayon (the builds Flex itself uses), and with the `tch` feature the tch
/// bindings burn-tch links (the LibTorch attention op).
pub const CORE_ALLOWED: &[&str] =
    &["burn", "burn-store", "serde", "serde_json", "serde_path_to_error", "toml", "thiserror", "safetensors", "nalgebra", "gemm", "rayon", "rand", "tch"];

/// The workspace crates each workspace crate may depend on (normal dependencies).
const GRAPH: &[(&str, &[&str])] = &[
    ("serial-lora", &[]),
    ("lora-runtime", &["serial-lora"]),
    ("clip-cls", &["serial-lora", "lora-runtime"]),
    ("sam-seg", &["serial-lora", "lora-runtime"]),
    ("sd3-gen", &["serial-lora", "lora-runtime", "clip-cls"]),
    ("xtask", &[]),
];

/// The direct normal dependencies of `krate` (names), with `features` (`--all-features` or none).
fn direct_deps(krate: &str, all_features: bool) -> Result<Vec<String>> {
    let mut cmd = super::cargo("");
    cmd.args(["tree", "-p", krate, "-e", "normal", "--depth", "1", "--prefix", "none", "--format", "{p}"]);
    if all_features {
        cmd.arg("--all-features");
    }
    let out = cmd.current_dir(super::root()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout).context("cargo tree output is not UTF-8")?;
    // first line: the crate itself; then one `name vX.Y.Z [(path)]` per dependency
    let mut names: Vec<String> = text.lines().skip(1).filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Checks the core's allow-list and the workspace graph; the error lists every violation.
pub fn check() -> Result<()> {
    let workspace: Vec<&str> = GRAPH.iter().map(|(k, _)| *k).collect();
    let mut bad = Vec::new();
    for all_features in [false, true] {
        for (krate, allowed) in GRAPH {
            for dep in direct_deps(krate, all_features)? {
                let ok = if *krate == "serial-lora" {
                    CORE_ALLOWED.contains(&dep.as_str())
                } else {
                    !workspace.contains(&dep.as_str()) || allowed.contains(&dep.as_str())
                };
                if !ok {
                    bad.push(format!("{krate} → {dep}{}", if all_features { " (--all-features)" } else { "" }));
                }
            }
        }
    }
    bad.dedup();
    if !bad.is_empty() {
        bail!("dependencies outside the design (xtask/src/deps.rs):\n  {}", bad.join("\n  "));
    }
    eprintln!("dependency graph as designed; serial-lora depends only on: {}", CORE_ALLOWED.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_graph_names_every_workspace_crate_once() {
        let mut names: Vec<&str> = super::GRAPH.iter().map(|(k, _)| *k).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), super::GRAPH.len());
    }
}
