//! The hostile-input corpus shared by the binaries' tests (`crates/<crate>/tests/hostile.rs`
//! include it with `#[path = "../../../tests/common/hostile.rs"] mod hostile;` and pass their
//! own `env!("CARGO_BIN_EXE_<bin>")`).
//!
//! Two halves:
//! - [`make`]: bad inputs generated in a temporary directory from the small valid fixtures
//!   (truncated, zero-byte, non-image and huge-dimension images; truncated, lying, mistyped,
//!   mis-keyed and mis-shaped safetensors; edited JSON), so no binary junk is committed;
//! - [`Case`] / [`check_all`]: run a binary on each case and require what issue 9 asks of every
//!   bad input: a non-zero exit, an error on stderr that names the culprit (file, key, flag or
//!   value), no panic and no backtrace, within [`TIME_LIMIT`] (a hang is killed and reported).
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A case that runs longer is a hang: it is killed and fails. The slowest legitimate case (a
/// tiny model loaded in the dev profile, then the error) takes well under a second.
pub const TIME_LIMIT: Duration = Duration::from_secs(60);

/// Address-space cap (KiB, `ulimit -v`) for the cases that must not allocate what a lying header
/// claims (a 100000×100000 RGB image is 30 GB): far above what the tiny models need, far below
/// the claim.
pub const MEMORY_LIMIT_KIB: u64 = 8 << 20;

/// What a finished (or killed) run left.
#[derive(Debug)]
pub struct Outcome {
    /// `None` when killed by a signal (our timeout, an abort, the OOM killer).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub elapsed: Duration,
}

/// One bad invocation of a binary and the strings its error must contain.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Every one of these must appear in stderr.
    pub culprits: Vec<String>,
    /// Run under [`MEMORY_LIMIT_KIB`].
    pub memory_limited: bool,
}

impl Case {
    /// `args` (as strings or paths) must fail with an error naming `culprit`.
    pub fn new<S: AsRef<std::ffi::OsStr>>(name: &str, args: &[S], culprit: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            args: args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect(),
            env: Vec::new(),
            culprits: vec![culprit.into()],
            memory_limited: false,
        }
    }
    /// Also require `culprit` in stderr.
    pub fn and(mut self, culprit: impl Into<String>) -> Self {
        self.culprits.push(culprit.into());
        self
    }
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.env.push((key.into(), value.as_ref().to_string_lossy().into_owned()));
        self
    }
    /// Under an address-space cap: the input lies about a size that must not be allocated.
    pub fn memory_limited(mut self) -> Self {
        self.memory_limited = true;
        self
    }
}

/// Runs `bin args` with `env`, killing it after `limit`. `RUST_BACKTRACE` is unset so that a
/// panic shows its usual note.
pub fn run(bin: &str, args: &[String], env: &[(String, String)], memory_limited: bool, limit: Duration) -> Outcome {
    let mut cmd = if memory_limited {
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!("ulimit -v {MEMORY_LIMIT_KIB} && exec \"$0\" \"$@\"")).arg(bin).args(args);
        c
    } else {
        let mut c = Command::new(bin);
        c.args(args);
        c
    };
    cmd.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn the binary");
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut s);
            }
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the binary") {
            break s;
        }
        if start.elapsed() > limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("reap the binary");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Outcome { code: status.code(), stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default(), timed_out, elapsed: start.elapsed() }
}

/// What is wrong with how `bin` handled `case` (empty = handled well).
pub fn problems(case: &Case, o: &Outcome) -> Vec<String> {
    let mut p = Vec::new();
    if o.timed_out {
        p.push(format!("hung: killed after {:?}", TIME_LIMIT));
    }
    match o.code {
        Some(0) => p.push("exited 0".into()),
        None if !o.timed_out => p.push("killed by a signal (abort or out of memory?)".into()),
        _ => {}
    }
    for c in &case.culprits {
        if !o.stderr.contains(c.as_str()) {
            p.push(format!("stderr does not name {c:?}"));
        }
    }
    for bad in ["panicked at", "RUST_BACKTRACE", "stack backtrace"] {
        if o.stderr.contains(bad) {
            p.push(format!("stderr shows {bad:?}"));
        }
    }
    p
}

/// Runs every case (two at a time) and fails with one report listing each mishandled case,
/// its command line and stderr. Prints one line per case.
pub fn check_all(bin: &str, cases: &[Case]) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<(usize, Outcome)> = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..2 {
            let (tx, next) = (tx.clone(), &next);
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(c) = cases.get(i) else { break };
                    let _ = tx.send((i, run(bin, &c.args, &c.env, c.memory_limited, TIME_LIMIT)));
                }
            });
        }
        drop(tx);
        let mut r: Vec<_> = rx.iter().collect();
        r.sort_by_key(|(i, _)| *i);
        r
    });
    let mut report = String::new();
    for (i, o) in &results {
        let c = &cases[*i];
        let p = problems(c, o);
        let first_line = o.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        println!("{:<42} {:>6.2}s  {}  {first_line}", c.name, o.elapsed.as_secs_f64(), if p.is_empty() { "ok  " } else { "FAIL" });
        if !p.is_empty() {
            report += &format!("\n[{}] {}\n  $ {bin} {}\n  stderr:\n{}\n", c.name, p.join("; "), c.args.join(" "), indent(&o.stderr));
        }
    }
    assert!(report.is_empty(), "{} of {} hostile inputs mishandled:{report}", report.matches("\n[").count(), cases.len());
    println!("{} hostile inputs rejected, each naming its culprit", cases.len());
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

/// `base` with each `--flag value` pair of `extra` replacing that flag's value in `base`, or
/// appended when `base` lacks the flag (clap refuses a flag given twice).
pub fn with_flags(base: &[&str], extra: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = base.iter().map(|a| a.to_string()).collect();
    for pair in extra.chunks(2) {
        match (out.iter().position(|a| a == pair[0]), pair.get(1)) {
            (Some(i), Some(v)) if i + 1 < out.len() => out[i + 1] = v.to_string(),
            _ => out.extend(pair.iter().map(|a| a.to_string())),
        }
    }
    out
}

/// A path as a `&str` (the tests' temporary paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Copies every file of `src` (recursively) into `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// Generators of bad files.
pub mod make {
    use super::*;

    /// The first `keep` of `src`'s bytes (0 < keep < 1) written to `dst`.
    pub fn truncated(src: &Path, dst: &Path, keep: f64) -> PathBuf {
        let b = std::fs::read(src).unwrap();
        std::fs::write(dst, &b[..((b.len() as f64 * keep) as usize).max(1)]).unwrap();
        dst.into()
    }

    pub fn zero_byte(dst: &Path) -> PathBuf {
        std::fs::write(dst, b"").unwrap();
        dst.into()
    }

    /// Text in a file whose name says image (or model).
    pub fn text(dst: &Path, text: &str) -> PathBuf {
        std::fs::write(dst, text).unwrap();
        dst.into()
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        let mut crc_input = kind.to_vec();
        crc_input.extend_from_slice(data);
        c.extend_from_slice(&crc32(&crc_input).to_be_bytes());
        c
    }

    /// A well-formed PNG whose header claims `w × h` 8-bit RGB pixels, followed by a tiny zlib
    /// stream: a decoder that trusts the header allocates `3·w·h` bytes.
    pub fn huge_png(dst: &Path, w: u32, h: u32) -> PathBuf {
        let mut ihdr = w.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
        b.extend(png_chunk(b"IHDR", &ihdr));
        // zlib header + an empty stored block, then the image data simply ends
        b.extend(png_chunk(b"IDAT", &[0x78, 0x01, 0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 1]));
        b.extend(png_chunk(b"IEND", &[]));
        std::fs::write(dst, b).unwrap();
        dst.into()
    }

    /// A baseline JPEG header (SOI, DQT, SOF0) claiming `w × h` (≤ 65535) RGB pixels, then EOI.
    pub fn huge_jpeg(dst: &Path, w: u16, h: u16) -> PathBuf {
        let mut b = vec![0xFF, 0xD8];
        b.extend([0xFF, 0xDB, 0x00, 0x43, 0x00]);
        b.extend([1u8; 64]);
        b.extend([0xFF, 0xC0, 0x00, 0x11, 0x08]);
        b.extend(h.to_be_bytes());
        b.extend(w.to_be_bytes());
        b.extend([0x03, 0x01, 0x11, 0x00, 0x02, 0x11, 0x00, 0x03, 0x11, 0x00]);
        b.extend([0xFF, 0xD9]);
        std::fs::write(dst, b).unwrap();
        dst.into()
    }

    /// A path whose parent is a regular file: no directory can be created there, not even by
    /// root (ENOTDIR), unlike a chmod-read-only directory.
    pub fn under_a_file(dir: &Path, name: &str) -> PathBuf {
        let f = dir.join("a-regular-file");
        std::fs::write(&f, b"x").unwrap();
        f.join(name)
    }

    /// A named pipe (nothing ever writes to it: opening it for reading blocks forever).
    pub fn fifo(dst: &Path) -> PathBuf {
        let ok = Command::new("mkfifo").arg(dst).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "mkfifo {}", dst.display());
        dst.into()
    }

    /// Reads `path` as JSON, lets `edit` change it, writes it back.
    pub fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    }

    /// One tensor of a safetensors file, raw.
    #[derive(Clone, Debug)]
    pub struct RawTensor {
        pub name: String,
        pub dtype: String,
        pub shape: Vec<usize>,
        pub data: Vec<u8>,
    }

    /// A safetensors file as its parts, to be edited and written back (offsets recomputed).
    #[derive(Clone, Debug)]
    pub struct Safetensors {
        pub metadata: Option<serde_json::Value>,
        pub tensors: Vec<RawTensor>,
    }

    impl Safetensors {
        pub fn read(path: &Path) -> Self {
            let b = std::fs::read(path).unwrap();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&b[8..8 + n]).unwrap();
            let data = &b[8 + n..];
            let mut metadata = None;
            let mut tensors = Vec::new();
            for (k, v) in header {
                if k == "__metadata__" {
                    metadata = Some(v);
                    continue;
                }
                let o: Vec<usize> = v["data_offsets"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
                tensors.push(RawTensor {
                    name: k,
                    dtype: v["dtype"].as_str().unwrap().into(),
                    shape: v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect(),
                    data: data[o[0]..o[1]].to_vec(),
                });
            }
            tensors.sort_by(|a, b| a.name.cmp(&b.name));
            Self { metadata, tensors }
        }

        /// The header as written (offsets in tensor order) and the data.
        fn parts(&self) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
            let mut header = serde_json::Map::new();
            if let Some(m) = &self.metadata {
                header.insert("__metadata__".into(), m.clone());
            }
            let mut data = Vec::new();
            for t in &self.tensors {
                let start = data.len();
                data.extend_from_slice(&t.data);
                header.insert(t.name.clone(), serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [start, data.len()]}));
            }
            (header, data)
        }

        pub fn write(&self, path: &Path) -> PathBuf {
            let (header, data) = self.parts();
            write_raw(path, serde_json::to_vec(&header).unwrap(), None, &data)
        }

        /// Written with `claim` as the 8-byte header length instead of the true one.
        pub fn write_lying_length(&self, path: &Path, claim: u64) -> PathBuf {
            let (header, data) = self.parts();
            write_raw(path, serde_json::to_vec(&header).unwrap(), Some(claim), &data)
        }

        /// Written with tensor `name`'s shape in the header replaced by `shape` (its data and
        /// offsets unchanged): the header lies about the size.
        pub fn write_lying_shape(&self, path: &Path, name: &str, shape: &[usize]) -> PathBuf {
            let (mut header, data) = self.parts();
            header[name]["shape"] = serde_json::json!(shape);
            write_raw(path, serde_json::to_vec(&header).unwrap(), None, &data)
        }

        pub fn get_mut(&mut self, name: &str) -> &mut RawTensor {
            self.tensors.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"))
        }

        pub fn remove(&mut self, name: &str) -> RawTensor {
            let i = self.tensors.iter().position(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"));
            self.tensors.remove(i)
        }

        /// The name of the first tensor whose name contains `part` and has `rank` dimensions.
        pub fn find(&self, part: &str, rank: usize) -> String {
            self.tensors.iter().find(|t| t.name.contains(part) && t.shape.len() == rank).unwrap_or_else(|| panic!("no {part} of rank {rank}")).name.clone()
        }

        /// Tensor `name` re-typed as 32-bit integers (same bytes, so same size).
        pub fn retype_i32(&mut self, name: &str) {
            let t = self.get_mut(name);
            assert_eq!(t.dtype, "F32");
            t.dtype = "I32".into();
        }

        /// Tensor `name` with its first dimension cut by one row (a wrong shape, honest header).
        pub fn drop_row(&mut self, name: &str) {
            let t = self.get_mut(name);
            let row = t.data.len() / t.shape[0];
            t.shape[0] -= 1;
            t.data.truncate(t.data.len() - row);
        }
    }

    fn write_raw(path: &Path, header: Vec<u8>, claim: Option<u64>, data: &[u8]) -> PathBuf {
        let mut b = claim.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(&header);
        b.extend_from_slice(data);
        std::fs::write(path, b).unwrap();
        path.into()
    }
}
