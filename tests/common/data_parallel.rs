//! Data-parallel equivalence shared by `crates/*/tests/data_parallel.rs` (included with
//! `#[path = "../../../tests/common/data_parallel.rs"] mod data_parallel;`): a `train` command
//! run by two peers with `--batch b` must reach the adapter of one peer with `--batch 2b`, both
//! as two devices of one node (`--devices cpu,cpu`) and as two single-device nodes (`--nodes 2`
//! with an orchestrator on loopback, one shared run directory).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serial_lora::io::max_abs_diff;

fn run(bin: &str, args: &[String]) -> Output {
    Command::new(bin).args(args).output().unwrap()
}

fn ok(name: &str, out: &Output) {
    assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
}

fn metrics(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap()
}

fn args(base: &[&str], extra: &[&str]) -> Vec<String> {
    base.iter().chain(extra).map(|a| a.to_string()).collect()
}

/// Runs `bin base…` three ways under `dir` (`one`: `--batch 2b`; `devices`: `--batch b
/// --devices cpu,cpu`; `nodes`: `--batch b --nodes 2`) and checks that the data-parallel runs'
/// adapters (`weights` in the run directory) are within `tol` of the single run's, with the same
/// steps and logged losses (relative `tol`), while one device with `--batch b` is more than
/// 10 × `tol` away. Returns the three run directories.
pub fn two_peers_match_doubled_batch(bin: &str, base: &[&str], b: usize, dir: &Path, weights: &str, tol: f32) -> [PathBuf; 3] {
    let (b, b2) = (b.to_string(), (2 * b).to_string());
    let [one, devices, nodes] = ["one", "devices", "nodes"].map(|n| dir.join(n));
    ok("one device", &run(bin, &args(base, &["--batch", &b2, "--out", one.to_str().unwrap()])));
    ok("--devices cpu,cpu", &run(bin, &args(base, &["--batch", &b, "--devices", "cpu,cpu", "--out", devices.to_str().unwrap()])));

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let orchestrator = format!("127.0.0.1:{port}");
    let node = |rank: &str| {
        let extra = ["--batch", &b, "--nodes", "2", "--node-rank", rank, "--orchestrator", &orchestrator, "--out", nodes.to_str().unwrap()];
        run(bin, &args(base, &extra))
    };
    let (n0, n1) = std::thread::scope(|s| {
        let h0 = s.spawn(|| node("0"));
        let h1 = s.spawn(|| node("1"));
        (h0.join().unwrap(), h1.join().unwrap())
    });
    ok("--nodes 2 --node-rank 0", &n0);
    ok("--nodes 2 --node-rank 1", &n1);

    let single = metrics(&one);
    for run in [&devices, &nodes] {
        let d = max_abs_diff(&one.join(weights), &run.join(weights)).unwrap();
        eprintln!("{}: max |Δ adapter| vs one device = {d:.2e} (tolerance {tol:e})", run.display());
        assert!(d <= tol, "{}: the adapter differs from the single-device one by {d:e}", run.display());
        let m = metrics(run);
        for key in ["steps", "total_steps", "steps_per_epoch", "completed"] {
            assert_eq!(m[key], single[key], "{}: {key}", run.display());
        }
        let (la, lb) = (single["loss"].as_array().unwrap(), m["loss"].as_array().unwrap());
        assert_eq!(la.len(), lb.len());
        for (x, y) in la.iter().zip(lb) {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= f64::from(tol) * x.abs().max(1.0), "{}: logged losses {la:?} vs {lb:?}", run.display());
        }
    }
    // the control: one device with half the batch ends far away, so the tolerance discriminates
    let half = dir.join("half");
    ok("one device, half the batch", &run(bin, &args(base, &["--batch", &b, "--out", half.to_str().unwrap()])));
    let d = max_abs_diff(&one.join(weights), &half.join(weights)).unwrap();
    assert!(d > 10.0 * tol, "half the batch differs by only {d:e}: the test cannot tell batches apart");
    [one, devices, nodes]
}
