//! The in-process fuzz harness shared by `crates/<crate>/tests/fuzz.rs` (included with
//! `#[path = "../../../tests/common/fuzz.rs"] mod fuzz;`): the library loaders are called
//! directly on generated inputs, each call under [`guarded`] —
//! - a panic is caught (`catch_unwind`) and fails the test, naming the case;
//! - a call running past [`CASE_TIME_LIMIT`] is a hang: a watchdog prints the case and aborts
//!   the test binary;
//! - the whole binary runs under an address-space cap of [`MEMORY_LIMIT_BYTES`] (the cap of the
//!   hostile tests), so a loader that believes a size claimed by a file or a config fails to
//!   allocate, which aborts the binary: never an allocation beyond the cap goes unnoticed.
//!
//! Two kinds of generated input:
//! - [`config_edits`]: every numeric field of a JSON config (and every element of a numeric
//!   list) set to each of [`Edit::ALL`] (0, −1, 1, 2⁴⁰, 2⁶⁴−1, 2.5, a string, null, removed) —
//!   exhaustive and deterministic; the loader must refuse naming the field ([`names_field`]) or
//!   accept;
//! - [`byte_mutations`]: a proptest strategy of byte flips, overwrites, insertions and
//!   truncations of a file; the loader may fail or succeed, never panic or hang. The runner
//!   ([`runner`]) is seeded ([`DEFAULT_SEED`], or `FUZZ_SEED`) and runs [`cases`] cases per
//!   property: `FUZZ_CASES` overrides the CI default (`cargo xtask fuzz` sets it higher).
#![allow(dead_code)]

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::Value;

/// A loader call that runs longer hangs: the tiny fixtures load in well under a second.
pub const CASE_TIME_LIMIT: Duration = Duration::from_secs(30);

/// The address-space cap of the fuzz binaries (as `hostile::MEMORY_LIMIT_KIB`: 8 GiB).
pub const MEMORY_LIMIT_BYTES: u64 = 8 << 30;

/// The seed of every property run in CI (deterministic); `FUZZ_SEED=<u64>` picks another.
pub const DEFAULT_SEED: u64 = 0x005e_71a1_107a;

/// A loader under test: `Err((refused_cleanly, message))` when it rejects a file.
pub type LoadFn<E> = dyn Fn(&Path) -> Result<(), (bool, E)>;

/// Cases per byte-mutation property: `FUZZ_CASES`, else `default` (what CI runs).
pub fn cases(default: u32) -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs per subcommand of the CLI-flag fuzzing: `FUZZ_CLI_CASES`, else `default`.
pub fn cli_cases(default: usize) -> usize {
    std::env::var("FUZZ_CLI_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_SEED)
}

/// A proptest runner with a fixed seed (ChaCha), `cases` cases, no failure-persistence files.
pub fn runner(cases: u32) -> TestRunner {
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 256, ..Config::default() };
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed().to_le_bytes());
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

/// Caps this process's address space at [`MEMORY_LIMIT_BYTES`] (once; Unix only).
pub fn cap_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(unix)]
        {
            let lim = libc::rlimit { rlim_cur: MEMORY_LIMIT_BYTES as libc::rlim_t, rlim_max: MEMORY_LIMIT_BYTES as libc::rlim_t };
            // SAFETY: setrlimit reads a valid rlimit struct; lowering a limit needs no privilege.
            let rc = unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
            assert_eq!(rc, 0, "setrlimit(RLIMIT_AS) failed");
        }
    });
}

/// The calls in progress: thread → (case, start).
fn in_flight() -> &'static Mutex<HashMap<std::thread::ThreadId, (String, Instant)>> {
    static MAP: OnceLock<Mutex<HashMap<std::thread::ThreadId, (String, Instant)>>> = OnceLock::new();
    MAP.get_or_init(|| {
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let map = in_flight().lock().unwrap_or_else(|e| e.into_inner());
                if let Some((case, start)) = map.values().find(|(_, t)| t.elapsed() > CASE_TIME_LIMIT) {
                    eprintln!("fuzz case `{case}` hung: still running after {:?}; aborting", start.elapsed());
                    std::process::abort();
                }
            }
        });
        Mutex::new(HashMap::new())
    })
}

/// Runs `f` for the case `case` under the address-space cap and the watchdog; `Err` with the
/// panic message if it panicked.
pub fn guarded<T>(case: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    cap_memory();
    let id = std::thread::current().id();
    in_flight().lock().unwrap_or_else(|e| e.into_inner()).insert(id, (case.to_string(), Instant::now()));
    let r = catch_unwind(AssertUnwindSafe(f));
    in_flight().lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    r.map_err(|p| {
        let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
        format!("case `{case}` panicked: {msg}")
    })
}

/// One edit of a numeric config field.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Edit {
    Zero,
    MinusOne,
    One,
    /// 2⁴⁰.
    Huge,
    /// 2⁶⁴ − 1.
    Max,
    Float,
    Str,
    Null,
    Removed,
}

impl Edit {
    pub const ALL: [Edit; 9] = [Edit::Zero, Edit::MinusOne, Edit::One, Edit::Huge, Edit::Max, Edit::Float, Edit::Str, Edit::Null, Edit::Removed];

    fn value(self) -> Option<Value> {
        Some(match self {
            Edit::Zero => Value::from(0),
            Edit::MinusOne => Value::from(-1),
            Edit::One => Value::from(1),
            Edit::Huge => Value::from(1u64 << 40),
            Edit::Max => Value::from(u64::MAX),
            Edit::Float => Value::from(2.5),
            Edit::Str => Value::from("7"),
            Edit::Null => Value::Null,
            Edit::Removed => return None,
        })
    }
}

/// A step of a path into a JSON document.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// The paths of every number in `v` (object fields and list elements, recursively).
pub fn numeric_paths(v: &Value) -> Vec<Vec<Step>> {
    fn walk(v: &Value, at: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
        match v {
            Value::Number(_) => out.push(at.clone()),
            Value::Object(m) => {
                for (k, x) in m {
                    at.push(Step::Key(k.clone()));
                    walk(x, at, out);
                    at.pop();
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    at.push(Step::Index(i));
                    walk(x, at, out);
                    at.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// `vision_config.global_attn_indexes[2]` style.
pub fn dotted(path: &[Step]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Key(k) if s.is_empty() => s += k,
            Step::Key(k) => s += &format!(".{k}"),
            Step::Index(i) => s += &format!("[{i}]"),
        }
    }
    s
}

/// `v` with the field at `path` edited.
pub fn edited(v: &Value, path: &[Step], edit: Edit) -> Value {
    let mut out = v.clone();
    let (last, parents) = path.split_last().expect("a field path");
    let mut node = &mut out;
    for step in parents {
        node = match step {
            Step::Key(k) => &mut node[k.as_str()],
            Step::Index(i) => &mut node[*i],
        };
    }
    match (last, edit.value(), node) {
        (Step::Key(k), Some(x), Value::Object(m)) => {
            m.insert(k.clone(), x);
        }
        (Step::Key(k), None, Value::Object(m)) => {
            m.remove(k);
        }
        (Step::Index(i), Some(x), Value::Array(a)) => a[*i] = x,
        (Step::Index(i), None, Value::Array(a)) => {
            a.remove(*i);
        }
        _ => unreachable!("the path leads to a field of an object or a list element"),
    }
    out
}

/// Every (name, edited document, field) of `doc`: each numeric field × [`Edit::ALL`].
pub fn config_edits(doc: &Value) -> Vec<(String, Value, String)> {
    let mut out = Vec::new();
    for path in numeric_paths(doc) {
        let field = dotted(&path);
        for edit in Edit::ALL {
            out.push((format!("{field} = {edit:?}"), edited(doc, &path, edit), field.clone()));
        }
    }
    out
}

/// Whether an error message names `field` (`a.b.c`, list indices dropped) in backticks: the
/// whole path (possibly followed by an index or an expression: `` `a.b.c[0]` ``,
/// `` `a.b.c · 2` ``), or the parent path and the last key (serde's ``missing field `c` ``).
pub fn names_field(message: &str, field: &str) -> bool {
    let field = match field.find('[') {
        Some(i) => &field[..i],
        None => field,
    };
    if message.contains(&format!("`{field}")) {
        return true;
    }
    match field.rsplit_once('.') {
        Some((parent, leaf)) => message.contains(&format!("`{parent}`")) && message.contains(&format!("`{leaf}`")),
        None => false,
    }
}

/// For every edit of every numeric field of the JSON file `file` (in a copy of the model
/// directory `model`, written to `scratch`): `load(dir)` must not panic, hang or allocate beyond
/// the cap, and an `Err` must name the field ([`names_field`]) and the file name. `accept(field,
/// message)` may excuse an error that legitimately names something else: a config that passes
/// validation but does not fit the fixture's weights (the weights loader names the tensor).
/// Returns (cases, accepted, refused); fails listing every mishandled case.
pub fn fuzz_config_fields<E: std::fmt::Display>(model: &Path, file: &str, scratch: &Path, load: &LoadFn<E>) -> (usize, usize, usize) {
    let dir = scratch.join(format!("fields-{}", file.replace('/', "_")));
    copy_dir(model, &dir);
    let original = std::fs::read_to_string(model.join(file)).unwrap();
    let doc: Value = serde_json::from_str(&original).unwrap();
    let edits = config_edits(&doc);
    let (mut ok, mut refused, mut report) = (0, 0, String::new());
    let name = Path::new(file).file_name().unwrap().to_string_lossy().into_owned();
    for (case, v, field) in &edits {
        std::fs::write(dir.join(file), serde_json::to_string_pretty(v).unwrap()).unwrap();
        match guarded(&format!("{file}: {case}"), || load(&dir)) {
            Err(panic) => report += &format!("\n  {panic}"),
            Ok(Ok(())) => ok += 1,
            // an error of the config stage must name the field and the file
            Ok(Err((true, e))) => {
                let m = e.to_string();
                if names_field(&m, field) && m.contains(&name) {
                    refused += 1;
                } else {
                    report += &format!("\n  {file}: {case}: the error does not name `{field}` and {name}: {m}");
                }
            }
            // the config was accepted; a later stage (weights) refused: any error is fine
            Ok(Err((false, _))) => refused += 1,
        }
    }
    std::fs::write(dir.join(file), original).unwrap();
    assert!(report.is_empty(), "{} of {} config edits mishandled:{report}", report.matches("\n  ").count(), edits.len());
    println!("{file}: {} edits of {} numeric fields: {ok} loaded, {refused} refused naming the field", edits.len(), numeric_paths(&doc).len());
    (edits.len(), ok, refused)
}

/// A damaged copy of a file: bytes flipped, overwritten or inserted, or the file cut.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// XOR the byte at (offset mod len) with a non-zero mask.
    Flip(usize, u8),
    /// Overwrite the bytes at (offset mod len) with these.
    Overwrite(usize, Vec<u8>),
    /// Insert these bytes at (offset mod len + 1).
    Insert(usize, Vec<u8>),
    /// Keep the first (offset mod len) bytes.
    Truncate(usize),
}

/// Interesting bytes for overwrites: digits, JSON punctuation, 0xff, NUL, and little-endian
/// huge numbers (safetensors' header length and offsets are u64).
fn interesting_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 1..9),
        Just(vec![0xff; 8]),
        Just(vec![0x00; 8]),
        Just(b"9999999999".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"]}".to_vec()),
        Just(b"[[[[[[[[".to_vec()),
        Just((1u64 << 40).to_le_bytes().to_vec()),
    ]
}

/// 1 to 4 mutations.
pub fn byte_mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        4 => (any::<usize>(), 1..=255u8).prop_map(|(o, m)| Mutation::Flip(o, m)),
        3 => (any::<usize>(), interesting_bytes()).prop_map(|(o, b)| Mutation::Overwrite(o, b)),
        1 => (any::<usize>(), interesting_bytes()).prop_map(|(o, b)| Mutation::Insert(o, b)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ];
    prop::collection::vec(one, 1..=4)
}

/// `bytes` damaged by `mutations`.
pub fn mutate(bytes: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for m in mutations {
        if b.is_empty() {
            break;
        }
        let n = b.len();
        match m {
            Mutation::Flip(o, mask) => b[o % n] ^= mask,
            Mutation::Overwrite(o, x) => {
                for (i, &v) in x.iter().enumerate() {
                    if let Some(slot) = b.get_mut(o % n + i) {
                        *slot = v;
                    }
                }
            }
            Mutation::Insert(o, x) => {
                let at = (o % n + 1).min(n);
                b.splice(at..at, x.iter().copied());
            }
            Mutation::Truncate(o) => b.truncate(o % n),
        }
    }
    b
}

/// Runs `cases` byte-mutation cases of `file` (in a copy of `model` under `scratch`): `load(dir)`
/// may return anything but must not panic, hang or allocate beyond the cap. Shrinks and reports
/// the smallest failing mutation list.
pub fn fuzz_bytes<T>(model: &Path, file: &str, scratch: &Path, cases: u32, load: &dyn Fn(&Path) -> T) {
    let dir = scratch.join(format!("bytes-{}", file.replace('/', "_")));
    copy_dir(model, &dir);
    let original = std::fs::read(model.join(file)).unwrap();
    let result = runner(cases).run(&byte_mutations(), |muts| {
        std::fs::write(dir.join(file), mutate(&original, &muts)).unwrap();
        let r = guarded(&format!("{file}: {muts:?}"), || {
            load(&dir);
        });
        prop_assert!(r.is_ok(), "{}", r.err().unwrap_or_default());
        Ok(())
    });
    std::fs::write(dir.join(file), &original).unwrap();
    if let Err(e) = result {
        panic!("{file}: a damaged input broke the loader: {e}");
    }
    println!("{file}: {cases} damaged copies, no panic, no hang");
}

/// Copies a directory tree (files and subfolders).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// The `--flag <VALUE>` options of a clap `--help` text that take a number: a numeric
/// `[default: …]`, or a placeholder in `numeric` (e.g. `N`, `HEIGHT`: options without a default).
pub fn numeric_flags(help: &str, numeric: &[&str]) -> Vec<String> {
    let mut blocks: Vec<(String, String, String)> = Vec::new(); // (flag, placeholder, text)
    for line in help.lines() {
        let t = line.trim_start();
        if t.starts_with('-') {
            let Some(i) = t.find("--") else { continue };
            let mut words = t[i..].split_whitespace();
            let flag = words.next().unwrap_or_default().trim_end_matches(',').to_string();
            let placeholder = words.next().filter(|w| w.starts_with('<')).map(|w| w.trim_matches(|c| c == '<' || c == '>').to_string());
            blocks.push((flag, placeholder.unwrap_or_default(), t.to_string()));
        } else if let Some(b) = blocks.last_mut() {
            b.2 += " ";
            b.2 += t;
        }
    }
    blocks
        .into_iter()
        .filter(|(_, p, text)| {
            let default_is_number = text.split("[default: ").nth(1).and_then(|d| d.split(']').next()).is_some_and(|d| d.parse::<f64>().is_ok());
            !p.is_empty() && (default_is_number || numeric.contains(&p.as_str()))
        })
        .map(|(f, ..)| f)
        .collect()
}

/// Values tried on numeric flags: zero, negative, fractional, non-finite, out of every integer
/// type's range, not a number, empty; plus small random integers.
pub const HOSTILE_NUMBERS: [&str; 12] = ["0", "-1", "2.5", "nan", "inf", "-inf", "1e400", "18446744073709551616", "-9223372036854775809", "abc", "", "0x10"];

/// `n` seeded (flag, value) picks for the numeric flags `flags`: each flag gets
/// [`HOSTILE_NUMBERS`] values and small integers (0..=16) in turn, in seeded order.
pub fn flag_cases(flags: &[String], n: usize) -> Vec<(String, String)> {
    let mut rng = runner(1).new_rng();
    let mut out = Vec::new();
    for i in 0..n {
        if flags.is_empty() {
            break;
        }
        let flag = flags[i % flags.len()].clone();
        let value = if rng.next_u32().is_multiple_of(4) {
            (rng.next_u32() % 17).to_string()
        } else {
            HOSTILE_NUMBERS[rng.next_u32() as usize % HOSTILE_NUMBERS.len()].to_string()
        };
        out.push((flag, value));
    }
    out
}

/// The placeholders of numeric options without a default in the binaries' `--help`.
pub const NUMERIC_PLACEHOLDERS: [&str; 16] = [
    "N",
    "IMAGE_SIZE",
    "CLASS_ID",
    "HEIGHT",
    "WIDTH",
    "NUM_IMAGES",
    "SHOTS",
    "STOP_AFTER",
    "LR_RATIO",
    "ALPHA",
    "CACHE_BYTES",
    "MAX_SEQUENCE_LENGTH",
    "BATCH",
    "STEPS",
    "ITERS",
    "SEED",
];

/// What a spawned command left: exit code (`None`: killed by a signal), stdout, stderr, whether
/// it was killed for running too long.
pub type Spawned = (Option<i32>, String, String, bool);

/// Random values for every numeric flag of every subcommand: for each `(subcommand, base
/// arguments)` (a quick valid invocation), the numeric flags of `<bin> <subcommand> --help`
/// ([`numeric_flags`]) get `per_base` seeded values ([`flag_cases`]), each replacing the flag's
/// value in the base (or added). Every run must end by itself (no hang), with an exit code (no
/// abort, no out-of-memory kill) and without a panic; a refusal must say something on stderr.
/// `spawn(args)` runs the binary (two at a time). Returns the number of runs.
pub fn fuzz_cli(bases: &[(&str, Vec<String>)], numeric: &[&str], per_base: usize, spawn: &(dyn Fn(&[String]) -> Spawned + Sync)) -> usize {
    let mut cases: Vec<Vec<String>> = Vec::new();
    let mut picks: Vec<String> = Vec::new();
    for (sub, base) in bases {
        let (_, help, _, _) = spawn(&[sub.to_string(), "--help".into()]);
        let flags = numeric_flags(&help, numeric);
        assert!(!flags.is_empty(), "`{sub} --help` lists no numeric flag:\n{help}");
        for (flag, value) in flag_cases(&flags, per_base) {
            picks.push(format!("{sub} {flag} {value:?}"));
            let mut args = base.clone();
            match args.iter().position(|a| *a == flag) {
                Some(i) if i + 1 < args.len() => args[i + 1] = value,
                _ => args.extend([flag, value]),
            }
            cases.push(args);
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<(usize, Spawned)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(args) = cases.get(i) else { break };
                        out.push((i, spawn(args)));
                    }
                    out
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    let mut report = String::new();
    for (i, (code, _, stderr, timed_out)) in &results {
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        println!("  {:<40} exit {code:?}  {}", picks[*i], last.chars().take(140).collect::<String>());
        let mut p = Vec::new();
        if *timed_out {
            p.push("hung".to_string());
        } else if code.is_none() {
            p.push("killed by a signal (abort or out of memory?)".into());
        }
        if stderr.contains("panicked at") {
            p.push("panicked".into());
        }
        if code.is_some_and(|c| c != 0) && stderr.trim().is_empty() {
            p.push("failed without a message".into());
        }
        if !p.is_empty() {
            report += &format!("\n[{}] {}\n  stderr: {}", p.join("; "), cases[*i].join(" "), stderr.trim());
        }
    }
    assert!(report.is_empty(), "{} of {} flag values mishandled:{report}", report.matches("\n[").count(), cases.len());
    println!("{} runs with random values of numeric flags: no panic, no hang", cases.len());
    cases.len()
}
