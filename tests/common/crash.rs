//! Crash tests shared by `crates/{clip-cls,sam-seg}/tests/crash.rs` (included with
//! `#[path = "../../../tests/common/crash.rs"] mod crash;`): a training command is SIGKILLed at
//! seeded random steps — a real kill, not `--stop-after` — restarted with `--resume` each time,
//! and must end with exactly the adapter (bit for bit) and per-step losses of an uninterrupted
//! run with the same seed.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A run that takes longer has hung.
pub const TIME_LIMIT: Duration = Duration::from_secs(120);

/// How a run ended.
#[derive(Debug)]
pub struct Ended {
    pub status: ExitStatus,
    /// Whether we killed it.
    pub killed: bool,
    /// The last step its log reported (`step N/T` lines).
    pub last_step: usize,
    pub stderr: String,
}

/// The step of a `step N/T …` progress line.
fn step_of(line: &str) -> Option<usize> {
    line.strip_prefix("step ")?.split('/').next()?.parse().ok()
}

/// Runs `bin args`; with `kill_at = Some(k)`, sends SIGKILL as soon as the log reports step `k`
/// (the checkpoint of that step is being written at that moment when checkpoints are due every
/// step, so the kill also lands in the middle of checkpoint writes).
pub fn run(bin: &str, args: &[String], kill_at: Option<usize>) -> Ended {
    let mut child = Command::new(bin)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the binary");
    let start = Instant::now();
    let stderr = child.stderr.take().expect("piped stderr");
    let (mut last_step, mut killed, mut log) = (0, false, String::new());
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if let Some(step) = step_of(&line) {
            last_step = step;
            if kill_at.is_some_and(|k| step >= k) && !killed {
                child.kill().expect("SIGKILL the run"); // std's kill is SIGKILL on Unix
                killed = true;
            }
        }
        log += &line;
        log.push('\n');
        if start.elapsed() > TIME_LIMIT && !killed {
            let _ = child.kill();
            panic!("hung: {bin} {args:?}\n{log}");
        }
    }
    let status = child.wait().expect("reap the binary");
    Ended { status, killed, last_step, stderr: log }
}

/// `n` distinct steps in `lo..hi`, increasing, from a seeded xorshift (printed for replay;
/// `SERIAL_LORA_CRASH_SEED` overrides the seed).
pub fn kill_steps(seed: u64, n: usize, lo: usize, hi: usize) -> Vec<usize> {
    let seed = std::env::var("SERIAL_LORA_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(seed);
    let mut state = seed.max(1);
    let mut steps = std::collections::BTreeSet::new();
    while steps.len() < n.min(hi - lo) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        steps.insert(lo + (state % (hi - lo) as u64) as usize);
    }
    let steps: Vec<usize> = steps.into_iter().collect();
    println!("crash seed {seed}: SIGKILL at steps {steps:?}");
    steps
}

/// `args` with `--out dir` (appended).
pub fn with_out(args: &[String], dir: &Path) -> Vec<String> {
    let mut a = args.to_vec();
    a.extend(["--out".to_string(), dir.to_str().expect("UTF-8 path").to_string()]);
    a
}

/// The uninterrupted run, then the same command plus `--resume`, killed at each of `kills` and
/// at the last step, restarted each time, then run to the end: final adapters bit-identical and
/// per-step losses equal.
pub fn crash_and_resume(bin: &str, args: &[String], kills: &[usize], total: usize) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (full, parts) = (tmp.path().join("full"), tmp.path().join("parts"));
    let a = run(bin, &with_out(args, &full), None);
    assert!(a.status.success() && a.last_step == total, "uninterrupted run: {:?}\n{}", a.status, a.stderr);

    let mut resume = with_out(args, &parts);
    resume.push("--resume".into());
    // the kills at `kills`, then one at the last step (while the final checkpoint, adapter and
    // metrics are being written)
    for &k in kills.iter().chain([&total]) {
        let r = run(bin, &resume, Some(k));
        if k == total && r.status.success() {
            println!("the run finished before the kill at its last step landed");
            continue;
        }
        assert!(r.killed && r.status.code().is_none(), "the run was to be killed at step {k}: {:?}\n{}", r.status, r.stderr);
        assert!(k == total || !parts.join("adapter_model.safetensors").exists(), "killed at step {k}: a final adapter exists");
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(parts.join("checkpoint/state.json")).unwrap_or_else(|e| panic!("killed at step {k}: no readable checkpoint ({e})")),
        )
        .expect("checkpoint/state.json is JSON");
        let at = state["step"].as_u64().expect("state.step") as usize;
        println!("killed at step {} (log); checkpoint holds step {at}", r.last_step);
        assert!(at + 1 >= k && at <= r.last_step, "killed at step {k}: checkpoint holds step {at}");
    }
    let b = run(bin, &resume, None);
    assert!(b.status.success() && b.last_step == total, "resumed run: {:?}\n{}", b.status, b.stderr);

    let read = |d: &Path| serial_lora::io::read_safetensors(&d.join("adapter_model.safetensors")).expect("final adapter").0;
    let (x, y) = (read(&full), read(&parts));
    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
    for (k, t) in &x {
        let bits = |t: &serial_lora::io::HostTensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(bits(t) == bits(&y[k]), "{k} differs after the crashes");
    }
    let losses = |d: &Path| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(d.join("metrics.json")).expect("metrics.json")).expect("JSON")["loss"].clone()
    };
    assert_eq!(losses(&full), losses(&parts), "per-step losses");
    assert_eq!(losses(&full).as_array().map(Vec::len), Some(total));
}
