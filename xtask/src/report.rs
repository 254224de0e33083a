//! `cargo xtask report`: the paper's tables and figures from whatever runs of `bench-all` are
//! finished (`results/<id>/metrics.json`), into `results/report/` (Markdown + CSV tables, SVG +
//! PNG figures).
//!
//! Table I is computed from the real model configs in `configs/models/` (no weights): per
//! adapted attention block of input width d, LoRA on Q, K, V, O has 4 · r · 2d parameters and
//! Serial LoRA r · 2d (`shared/docs/method.md`); the runs' own `trainable_params`, counted by
//! the task crates on the models they trained, are listed next to it.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::bench::{read_json, write_atomic};
use crate::plot::{Figure, Panel, Series, XTicks, save};
use crate::stats::paired_t;
use crate::sweep::{METHODS, PROXY_BASELINES};

/// Table I: full-size model, its config file, how its adapted blocks are read from it, rank.
pub const TABLE1: [(&str, &str, &str, usize); 3] = [
    ("CLIP ViT-B/16 (both towers)", "clip-vit-base-patch16.json", "clip", 32),
    ("SAM ViT-B (image encoder)", "sam-vit-base.json", "sam", 64),
    ("SD3-medium MMDiT (image stream)", "sd3-medium-transformer.json", "sd3", 64),
];

fn usize_at(v: &Value, path: &str, file: &Path) -> Result<usize> {
    path.split('.').try_fold(v, |v, k| v.get(k)).and_then(Value::as_u64).map(|x| x as usize).with_context(|| format!("{}: no integer `{path}`", file.display()))
}

/// Adapted attention blocks of a model config as `(count, width)` groups.
pub fn attention_blocks(config: &Path, kind: &str) -> Result<Vec<(usize, usize)>> {
    let v = read_json(config)?;
    Ok(match kind {
        "clip" => vec![
            (usize_at(&v, "vision_config.num_hidden_layers", config)?, usize_at(&v, "vision_config.hidden_size", config)?),
            (usize_at(&v, "text_config.num_hidden_layers", config)?, usize_at(&v, "text_config.hidden_size", config)?),
        ],
        "sam" => vec![(usize_at(&v, "vision_config.num_hidden_layers", config)?, usize_at(&v, "vision_config.hidden_size", config)?)],
        _ => vec![(usize_at(&v, "num_layers", config)?, usize_at(&v, "num_attention_heads", config)? * usize_at(&v, "attention_head_dim", config)?)],
    })
}

/// Trainable parameters of LoRA (Q, K, V, O) and Serial LoRA at rank `r` on `blocks`.
pub fn adapter_params(blocks: &[(usize, usize)], r: usize) -> (usize, usize) {
    let serial: usize = blocks.iter().map(|&(n, d)| n * r * 2 * d).sum();
    (4 * serial, serial)
}

/// `3932160` → `3,932,160`.
fn thousands(n: usize) -> String {
    crate::plot::thousands(n as u64)
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (m, var.sqrt())
}

fn setting_key(run: &Value) -> String {
    let s = &run["setting"];
    match (s.get("shots"), s.get("fraction")) {
        (Some(k), _) => k.to_string(),
        (_, Some(f)) => format!("{:?}", f.as_f64().unwrap_or(f64::NAN)),
        _ => "?".into(),
    }
}

fn setting_label(run: &Value) -> String {
    let s = &run["setting"];
    match (s.get("shots"), s.get("fraction").and_then(Value::as_f64)) {
        (Some(k), _) => format!("{k}-shot"),
        (_, Some(f)) if f >= 1.0 => "full".into(),
        (_, Some(f)) => format!("{:.0}%", f * 100.0),
        _ => "?".into(),
    }
}

/// Finished runs of `out` (directories with `metrics.json`; `_*` and `report` skipped).
pub fn finished_runs(out: &Path) -> Result<Vec<Value>> {
    let mut runs = Vec::new();
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(runs) };
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("metrics.json").is_file()).collect();
    dirs.sort();
    for d in dirs {
        runs.push(read_json(&d.join("metrics.json"))?);
    }
    Ok(runs)
}

/// A Markdown table and the same as CSV.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn markdown(&self) -> String {
        let mut s = format!("| {} |\n|{}\n", self.header.join(" | "), "---|".repeat(self.header.len()));
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        s
    }

    fn csv(&self) -> String {
        let q = |c: &String| if c.contains([',', '"']) { format!("\"{}\"", c.replace('"', "\"\"")) } else { c.clone() };
        std::iter::once(&self.header).chain(&self.rows).map(|r| r.iter().map(q).collect::<Vec<_>>().join(",") + "\n").collect()
    }
}

/// Published numbers (`configs/paper-results.toml`).
struct Paper(toml::Table);

impl Paper {
    fn load(root: &Path) -> Result<Self> {
        let p = root.join("configs/paper-results.toml");
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(Self(crate::sweep::parse_toml(&text).with_context(|| format!("{}", p.display()))?))
    }

    fn get(&self, table: &str, key: &str) -> Option<&toml::Value> {
        self.0.get(table)?.get(key)
    }
}

fn num(v: &toml::Value) -> Option<f64> {
    v.as_float().or_else(|| v.as_integer().map(|i| i as f64))
}

/// Mean ± std of `metric` over seeds for each (dataset, setting, method) of the runs in `sweep`.
type Cells = BTreeMap<(String, String, String), Vec<f64>>;

fn cells(runs: &[&Value], metric: &str) -> Cells {
    let mut c: Cells = BTreeMap::new();
    for r in runs {
        if let Some(x) = r["score"].get(metric).and_then(f) {
            c.entry((r["dataset"].as_str().unwrap_or("").to_string(), setting_key(r), r["method"].as_str().unwrap_or("").to_string())).or_default().push(x);
        }
    }
    c
}

fn fmt_cell(xs: Option<&Vec<f64>>, scale: f64, digits: usize, paper: Option<f64>) -> String {
    let ours = match xs {
        Some(xs) if xs.len() > 1 => {
            let (m, s) = mean_std(xs);
            format!("{:.*} ± {:.*}", digits, m * scale, digits, s * scale)
        }
        Some(xs) => format!("{:.*}", digits, xs[0] * scale),
        None => "–".into(),
    };
    match paper {
        Some(p) => format!("{ours} ({p})"),
        None => ours,
    }
}

fn in_sweep<'a>(runs: &'a [Value], sweep: &str) -> Vec<&'a Value> {
    runs.iter().filter(|r| r["sweeps"].as_array().is_some_and(|s| s.iter().any(|x| x == sweep))).collect()
}

/// Every method in report order: the head-only baseline, the paper's four, full fine-tuning.
fn all_methods() -> impl Iterator<Item = &'static str> {
    std::iter::once(PROXY_BASELINES[0]).chain(METHODS).chain(std::iter::once(PROXY_BASELINES[1]))
}

fn ordered_methods(runs: &[&Value]) -> Vec<String> {
    let present: BTreeSet<&str> = runs.iter().filter_map(|r| r["method"].as_str()).collect();
    all_methods().filter(|m| present.contains(*m)).map(|m| m.to_string()).collect()
}

/// `lora` → `LoRA`, `head-only` → `head only`.
fn method_name(m: &str) -> &str {
    match m {
        "lora" => "LoRA",
        "serial-lora" => "Serial LoRA",
        "lora-plus" => "LoRA+",
        "serial-lora-plus" => "Serial LoRA+",
        "head-only" => "head only",
        "full" => "full fine-tuning",
        other => other,
    }
}

/// The rank most runs of `runs` with an adapter have (the smallest on a tie).
fn modal_rank(runs: &[&Value]) -> Option<u64> {
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for r in runs.iter().filter(|r| !PROXY_BASELINES.iter().any(|b| r["method"] == *b)) {
        *count.entry(r["rank"].as_u64().unwrap_or(0)).or_default() += 1;
    }
    count.into_iter().max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0))).map(|(k, _)| k)
}

/// Settings in numeric order, with a display label.
fn ordered_settings(runs: &[&Value]) -> Vec<(String, String)> {
    let mut s: Vec<(f64, String, String)> = runs.iter().map(|r| (setting_key(r).parse().unwrap_or(f64::NAN), setting_key(r), setting_label(r))).collect();
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    s.dedup_by(|a, b| a.1 == b.1);
    s.into_iter().map(|(_, k, l)| (k, l)).collect()
}

fn ordered_datasets(runs: &[&Value]) -> Vec<String> {
    runs.iter().filter_map(|r| r["dataset"].as_str().map(String::from)).collect::<BTreeSet<_>>().into_iter().collect()
}

/// A column of a results table: name, key in `score`, scale, digits, and the index of the
/// paper's comparable number in its cell (`None`: the paper has none).
type Metric<'a> = (&'a str, &'a str, f64, usize, Option<usize>);

/// A results table: rows (setting, method), a column group per dataset with `metrics`; the
/// paper's value in parentheses where it has one.
fn result_table(runs: &[&Value], paper: &Paper, table: &str, metrics: &[Metric]) -> Table {
    let datasets = ordered_datasets(runs);
    let mut header = vec!["setting".to_string(), "method".to_string()];
    for d in &datasets {
        header.extend(metrics.iter().map(|(name, ..)| if metrics.len() > 1 { format!("{d} {name}") } else { d.clone() }));
    }
    let by_metric: Vec<Cells> = metrics.iter().map(|(_, key, ..)| cells(runs, key)).collect();
    let mut rows = Vec::new();
    for (skey, slabel) in ordered_settings(runs) {
        for m in ordered_methods(runs) {
            let mut row = vec![slabel.clone(), m.clone()];
            for d in &datasets {
                let key = (d.clone(), skey.clone(), m.clone());
                let published = paper.get(table, &format!("{d}/{skey}/{m}"));
                for (i, (_, _, scale, digits, paper_index)) in metrics.iter().enumerate() {
                    let p = published.zip(*paper_index).and_then(|(v, j)| match v {
                        toml::Value::Array(a) => a.get(j).and_then(num),
                        v => num(v),
                    });
                    row.push(fmt_cell(by_metric[i].get(&key), *scale, *digits, p));
                }
            }
            rows.push(row);
        }
    }
    Table { header, rows }
}

/// `(step, loss_avg)` of each training line of a run's `metrics.jsonl` (evaluation lines have no
/// loss); empty when the file is missing.
fn loss_from_jsonl(path: &Path) -> Vec<(f64, f64)> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    let mut by_step: BTreeMap<u64, f64> = BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        if let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss_avg"].as_f64().or_else(|| v["loss"].as_f64())) {
            by_step.insert(step, loss); // a resumed run may log a step again: keep the last
        }
    }
    by_step.into_iter().map(|(s, l)| (s as f64, l)).collect()
}

/// A (method, rank) group of proxy runs; baselines have rank 0.
type Group = (String, u64);

/// Position of a group in the proxy tables: by method (report order), then rank.
fn group_order(g: &Group) -> (usize, u64) {
    (all_methods().position(|m| m == g.0).unwrap_or(usize::MAX), g.1)
}

/// `LoRA r=8`, `head only`.
fn group_label((m, rank): &Group) -> String {
    if PROXY_BASELINES.contains(&m.as_str()) { method_name(m).to_string() } else { format!("{} r={rank}", method_name(m)) }
}

/// Accuracy (%) of proxy runs by setting key and group, per seed; settings in numeric order.
struct ProxyAccuracy {
    settings: Vec<(String, String)>,
    groups: Vec<Group>,
    acc: BTreeMap<(String, Group), BTreeMap<u64, f64>>,
    params: BTreeMap<Group, (u64, u64, u64)>,
}

impl ProxyAccuracy {
    fn new(runs: &[&Value]) -> Self {
        let mut acc: BTreeMap<(String, Group), BTreeMap<u64, f64>> = BTreeMap::new();
        let mut params = BTreeMap::new();
        for r in runs {
            let g: Group = (r["method"].as_str().unwrap_or("").into(), r["rank"].as_u64().unwrap_or(0));
            let s = &r["score"];
            if let (Some(a), Some(seed)) = (s["accuracy"].as_f64(), r["seed"].as_u64()) {
                acc.entry((setting_key(r), g.clone())).or_default().insert(seed, a * 100.0);
            }
            let count = |k: &str| s[k].as_u64().unwrap_or(0);
            params.insert(g, (count("adapter_params"), count("head_params"), count("trainable_params")));
        }
        let mut groups: Vec<Group> = params.keys().cloned().collect();
        groups.sort_by_key(group_order);
        Self { settings: ordered_settings(runs), groups, acc, params }
    }

    fn get(&self, setting: &str, g: &Group) -> Option<&BTreeMap<u64, f64>> {
        self.acc.get(&(setting.to_string(), g.clone()))
    }
}

/// `a − b` over the seeds both have: `+1.2 [-0.3, +2.7] p=0.110 (n=10)` (paired t, 95 %).
fn paired_cell(a: &BTreeMap<u64, f64>, b: &BTreeMap<u64, f64>) -> String {
    let seeds: Vec<u64> = a.keys().filter(|s| b.contains_key(s)).copied().collect();
    let xa: Vec<f64> = seeds.iter().map(|s| a[s]).collect();
    let xb: Vec<f64> = seeds.iter().map(|s| b[s]).collect();
    let d = paired_t(&xa, &xb, 0.95);
    match (d.ci, d.p) {
        (Some((lo, hi)), Some(p)) => {
            let p = if p < 0.001 { "p<0.001".to_string() } else { format!("p={p:.3}") };
            format!("{:+.1} [{lo:+.1}, {hi:+.1}] {p} (n={})", d.mean, d.n)
        }
        _ => format!("{:+.1} (n={})", d.mean, d.n),
    }
}

/// `12.3 ± 4.5` over seeds (no ± for one seed).
fn mean_std_cell(by_seed: &BTreeMap<u64, f64>) -> String {
    let xs: Vec<f64> = by_seed.values().copied().collect();
    let (m, sd) = mean_std(&xs);
    if xs.len() > 1 { format!("{m:.1} ± {sd:.1}") } else { format!("{m:.1}") }
}

/// The proxy's rank sweep as a table: a row per setting and rank, LoRA and Serial LoRA (mean ±
/// std) and their paired difference.
fn proxy_rank_table(runs: &[&Value]) -> Table {
    let pa = ProxyAccuracy::new(runs);
    let ranks: BTreeSet<u64> = pa.groups.iter().map(|g| g.1).collect();
    let header = ["setting", "rank", "LoRA", "Serial LoRA", "Serial LoRA − LoRA"].map(String::from).to_vec();
    let mut rows = Vec::new();
    for (k, label) in &pa.settings {
        for r in &ranks {
            let (l, s) = (pa.get(k, &("lora".into(), *r)), pa.get(k, &("serial-lora".into(), *r)));
            let cell = |x: Option<&BTreeMap<u64, f64>>| x.map_or("–".to_string(), mean_std_cell);
            let diff = l.zip(s).map_or("–".to_string(), |(l, s)| paired_cell(s, l));
            rows.push(vec![label.clone(), r.to_string(), cell(l), cell(s), diff]);
        }
    }
    Table { header, rows }
}

/// The proxy's tables: accuracy per method, the paired differences with their 95 % intervals,
/// and the trainable parameters.
fn proxy_tables(runs: &[&Value]) -> Vec<(&'static str, &'static str, String, Table)> {
    let pa = ProxyAccuracy::new(runs);
    let seeds: BTreeSet<u64> = runs.iter().filter_map(|r| r["seed"].as_u64()).collect();
    let mut header = vec!["method".to_string(), "trainable parameters".to_string()];
    header.extend(pa.settings.iter().map(|(_, l)| l.clone()));
    let rows = pa
        .groups
        .iter()
        .map(|g| {
            let mut row = vec![group_label(g), thousands(pa.params[g].2 as usize)];
            row.extend(pa.settings.iter().map(|(k, _)| pa.get(k, g).map_or("–".to_string(), mean_std_cell)));
            row
        })
        .collect();
    let accuracy = Table { header, rows };
    let accuracy_note = format!(
        "Tiny ViT pre-trained on digits 0–4, adapted few-shot to 5–9; top-1 accuracy (%) on the held-out 5–9 images, mean ± sample std over seeds {seeds:?}. Trainable parameters: adapter (or backbone) + the 5-way head.\n\n"
    );

    // comparisons: Serial vs LoRA at the same rank, Serial at r vs LoRA at r/4 (the same
    // parameter count), and every method vs the head alone
    let has = |m: &str, k: u64| pa.groups.contains(&(m.to_string(), k));
    let mut comparisons: Vec<(Group, Group, String)> = Vec::new();
    for (serial, lora) in [("serial-lora", "lora"), ("serial-lora-plus", "lora-plus")] {
        for (_, k) in pa.groups.iter().filter(|g| g.0 == serial) {
            if has(lora, *k) {
                comparisons.push(((serial.into(), *k), (lora.into(), *k), format!("{} − {} (r={k})", method_name(serial), method_name(lora))));
            }
        }
    }
    for (_, k) in pa.groups.iter().filter(|g| g.0 == "serial-lora") {
        if k % 4 == 0 && has("lora", k / 4) {
            let (a, b) = (("serial-lora".to_string(), *k), ("lora".to_string(), k / 4));
            comparisons.push((a.clone(), b.clone(), format!("{} − {} (equal parameters)", group_label(&a), group_label(&b))));
        }
    }
    let head: Group = ("head-only".into(), 0);
    if pa.groups.contains(&head) {
        for g in pa.groups.iter().filter(|g| **g != head) {
            comparisons.push((g.clone(), head.clone(), format!("{} − head only", group_label(g))));
        }
    }
    let mut header = vec!["comparison".to_string()];
    header.extend(pa.settings.iter().map(|(_, l)| l.clone()));
    let rows = comparisons
        .iter()
        .map(|(a, b, label)| {
            let mut row = vec![label.clone()];
            row.extend(pa.settings.iter().map(|(k, _)| match (pa.get(k, a), pa.get(k, b)) {
                (Some(a), Some(b)) => paired_cell(a, b),
                _ => "–".to_string(),
            }));
            row
        })
        .collect();
    let paired = Table { header, rows };
    let paired_note = "Mean paired difference of accuracy (points) over the seeds both methods ran (a seed draws the same shots and head init in every method), with its 95 % confidence interval and two-sided p-value from the paired t test (Student's t, n − 1 degrees of freedom; `scipy.stats.ttest_rel`). An interval that excludes 0 is a difference at the 5 % level.\n\n".to_string();

    let params = Table {
        header: ["method", "adapter (or backbone) parameters", "head parameters", "trainable parameters"].map(String::from).to_vec(),
        rows: pa
            .groups
            .iter()
            .map(|g| {
                let (a, h, t) = pa.params[g];
                vec![group_label(g), a.to_string(), h.to_string(), t.to_string()]
            })
            .collect(),
    };
    vec![
        ("proxy", "Proxy: tiny ViT, digits 0–4 → 5–9, top-1 accuracy (%) ↑", accuracy_note, accuracy),
        ("proxy_paired", "Proxy: paired differences (accuracy points)", paired_note, paired),
        ("proxy_params", "Proxy: trainable parameters", String::new(), params),
    ]
}

/// Accuracy vs trainable parameters of every proxy run: a panel per shot setting, a line per
/// method over its ranks (mean ± sample std over seeds; an error bar where a method has one rank).
fn accuracy_vs_params(runs: &[&Value]) -> Figure {
    let pa = ProxyAccuracy::new(runs);
    let panels = pa
        .settings
        .iter()
        .map(|(k, label)| {
            let series = ordered_methods(runs)
                .into_iter()
                .filter_map(|m| {
                    let stats: Vec<(f64, (f64, f64), usize)> = pa
                        .groups
                        .iter()
                        .filter(|g| g.0 == m)
                        .filter_map(|g| {
                            let xs: Vec<f64> = pa.get(k, g)?.values().copied().collect();
                            Some(((pa.params[g].2 as f64).log10(), mean_std(&xs), xs.len()))
                        })
                        .collect();
                    if stats.is_empty() {
                        return None;
                    }
                    let band = stats.iter().filter(|s| s.2 > 1).map(|&(x, (mu, sd), _)| (x, mu - sd, mu + sd)).collect();
                    Some(Series { name: method_name(&m).into(), points: stats.iter().map(|&(x, (mu, _), _)| (x, mu)).collect(), band })
                })
                .collect();
            Panel {
                title: label.clone(),
                x_label: "trainable parameters (log scale)".into(),
                y_label: "top-1 accuracy (%)".into(),
                log_y: false,
                x_ticks: XTicks::Pow10,
                series,
            }
        })
        .collect();
    let n: Vec<usize> = pa.acc.values().map(BTreeMap::len).collect();
    let (lo, hi) = (n.iter().min().copied().unwrap_or(0), n.iter().max().copied().unwrap_or(0));
    let seeds = if lo == hi { format!("{lo} seeds") } else { format!("{lo}–{hi} seeds") };
    Figure {
        title: "Proxy: accuracy vs trainable parameters".into(),
        caption: format!(
            "{} proxy runs; a point per method and rank (adapter + head parameters; head only: the head; full: every parameter), mean over {seeds}, band / bar: ± sample std",
            runs.len()
        ),
        cols: pa.settings.len().min(3),
        panels,
    }
}

/// Fig. 5: accuracy vs rank of the runs of a rank sweep, a panel per dataset.
fn rank_sweep_figure(runs: &[&Value], what: &str) -> Figure {
    let panels = ordered_datasets(runs)
        .into_iter()
        .map(|d| {
            let rs: Vec<&Value> = runs.iter().copied().filter(|r| r["dataset"] == d.as_str()).collect();
            let series = ordered_methods(&rs)
                .into_iter()
                .map(|m| {
                    let mut by_rank: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
                    for r in rs.iter().filter(|r| r["method"] == m.as_str()) {
                        if let (Some(k), Some(a)) = (r["rank"].as_u64(), r["score"]["accuracy"].as_f64()) {
                            by_rank.entry(k).or_default().push(a * 100.0);
                        }
                    }
                    let stats: Vec<(f64, (f64, f64), usize)> = by_rank.into_iter().map(|(k, a)| ((k as f64).log2(), mean_std(&a), a.len())).collect();
                    let band = stats.iter().filter(|s| s.2 > 1).map(|&(x, (m, sd), _)| (x, m - sd, m + sd)).collect();
                    Series { name: method_name(&m).into(), points: stats.iter().map(|&(x, (m, _), _)| (x, m)).collect(), band }
                })
                .collect();
            Panel { title: d, x_label: "rank (log scale)".into(), y_label: "top-1 accuracy (%)".into(), log_y: false, x_ticks: XTicks::Pow2, series }
        })
        .collect();
    let seeds: BTreeSet<u64> = runs.iter().filter_map(|r| r["seed"].as_u64()).collect();
    let caption = format!("{} {what} runs ({}); line: mean over seeds {seeds:?}, band: ± sample std", runs.len(), setting_label(runs[0]));
    let title = if what == "CLIP" { "Fig. 5: accuracy vs rank".to_string() } else { format!("Fig. 5 on the {what}: accuracy vs rank") };
    Figure { title, caption, cols: 2, panels }
}

/// Fig. 3: the spectra of a LoRA and a Serial LoRA run of `runs` with the same dataset, setting,
/// rank and seed (the most common rank, the most shots or data, the lowest seed), and of a full
/// fine-tuning run of that setting and seed when there is one; `None` without such a pair.
fn spectra_figure(out: &Path, runs: &[&Value]) -> Option<Figure> {
    let with_spectra: Vec<(&Value, Value)> =
        runs.iter().filter_map(|r| Some((*r, read_json(&out.join(r["id"].as_str()?).join("spectra.json")).ok()?))).collect();
    let same_setting = |a: &Value, b: &Value| ["dataset", "setting", "seed"].iter().all(|k| a[k] == b[k]);
    let find = |method: &str, like: &Value, same_rank: bool| {
        with_spectra.iter().find(|(r, _)| r["method"] == method && same_setting(r, like) && (!same_rank || r["rank"] == like["rank"]))
    };
    let rank = modal_rank(runs);
    let (lr, ls) = with_spectra
        .iter()
        .filter(|(r, _)| r["method"] == "lora" && find("serial-lora", r, true).is_some())
        .min_by_key(|(r, _)| (r["rank"].as_u64() != rank, std::cmp::Reverse(setting_key(r).parse::<f64>().unwrap_or(0.0) as u64), r["seed"].as_u64()))?;
    let (sr, ss) = find("serial-lora", lr, true)?;
    let full = find("full", lr, false);
    // blocks in model order; the first, middle and last are shown
    let mut blocks: Vec<String> = Vec::new();
    for b in ls["base"].as_array().into_iter().flatten().filter_map(|p| p["block"].as_str()) {
        if !blocks.iter().any(|x| x == b) {
            blocks.push(b.to_string());
        }
    }
    let mut shown: Vec<&String> = [blocks.first(), blocks.get(blocks.len() / 2), blocks.last()].into_iter().flatten().collect();
    shown.dedup();
    let spectrum = |v: &Value, block: &str, proj: &str| -> Vec<(f64, f64)> {
        v.as_array()
            .into_iter()
            .flatten()
            .find(|p| p["block"] == block && p["projection"] == proj)
            .and_then(|p| p["singular_values"].as_array())
            .map(|a| a.iter().enumerate().filter_map(|(i, x)| Some((i as f64, x.as_f64()?))).collect())
            .unwrap_or_default()
    };
    let mut panels = Vec::new();
    for proj in ["q", "k", "v"] {
        for b in &shown {
            let mut series = vec![
                Series::new("base", spectrum(&ls["base"], b, proj)),
                Series::new("LoRA", spectrum(&ls["adapted"], b, proj)),
                Series::new("Serial LoRA", spectrum(&ss["adapted"], b, proj)),
            ];
            if let Some((_, fs)) = full {
                series.push(Series::new("full fine-tuning", spectrum(&fs["adapted"], b, proj)));
            }
            panels.push(Panel {
                title: format!("W_{proj} of {b}"),
                x_label: "singular value index".into(),
                y_label: "singular value (log)".into(),
                log_y: true,
                x_ticks: XTicks::Integer,
                series,
            });
        }
    }
    let title = format!(
        "Fig. 3: singular values of the effective Q, K, V weights ({} {}, rank {})",
        lr["dataset"].as_str().unwrap_or(""),
        setting_label(lr),
        lr["rank"]
    );
    let ids: Vec<&str> = [Some(*lr), Some(*sr), full.map(|f| f.0)].into_iter().flatten().filter_map(|r| r["id"].as_str()).collect();
    let caption =
        format!("runs {}: base weights and the weights with each adapter merged (or fine-tuned); first, middle and last attention block", ids.join(", "));
    Some(Figure { title, caption, cols: shown.len(), panels })
}

/// Writes the report into `out/report`; returns the Markdown path.
pub fn report(root: &Path, out: &Path) -> Result<PathBuf> {
    let runs = finished_runs(out)?;
    let dir = out.join("report");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let paper = Paper::load(root)?;
    let mut md = format!(
        "# Results\n\n{} finished runs in `{}`. Cells: ours (mean ± std over seeds where there are several) and, in parentheses, the paper's published number where it has one.\n\n",
        runs.len(),
        out.display()
    );
    let write_table = |md: &mut String, name: &str, title: &str, note: &str, t: &Table| -> Result<()> {
        write_atomic(&dir.join(format!("{name}.csv")), t.csv().as_bytes())?;
        let _ = write!(md, "## {title}\n\n{note}{}\n", t.markdown());
        Ok(())
    };

    // Table I: exact counts of the full-size models from their configs, beside the paper's print
    let mut t1 =
        Table { header: ["model", "rank", "LoRA / LoRA+", "Serial LoRA / Serial LoRA+", "ratio", "paper prints"].map(String::from).to_vec(), rows: vec![] };
    for (name, file, kind, r) in TABLE1 {
        let (lora, serial) = adapter_params(&attention_blocks(&root.join("configs/models").join(file), kind)?, r);
        let printed = paper
            .get("table1", kind)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" / "))
            .unwrap_or_default();
        t1.rows.push(vec![name.into(), r.to_string(), thousands(lora), thousands(serial), format!("{:.2}", serial as f64 / lora as f64), printed]);
    }
    write_table(&mut md, "table1", "Table I: trainable parameters (full-size models, from `configs/models/`)", "", &t1)?;
    let mut measured: BTreeMap<(String, String, u64), u64> = BTreeMap::new();
    for r in &runs {
        if let (Some(t), Some(m), Some(k), Some(p)) = (r["task"].as_str(), r["method"].as_str(), r["rank"].as_u64(), r["score"]["trainable_params"].as_u64()) {
            measured.insert((t.into(), m.into(), k), p);
        }
    }
    let t1m = Table {
        header: ["task", "method", "rank", "trainable parameters"].map(String::from).to_vec(),
        rows: measured.iter().map(|((t, m, k), p)| vec![t.clone(), m.clone(), k.to_string(), p.to_string()]).collect(),
    };
    write_table(
        &mut md,
        "table1_runs",
        "Trainable parameters of the models trained here",
        "As counted by the task crates on the models of these runs (the presets' models, which may be tiny).\n\n",
        &t1m,
    )?;

    let t2_note = "CLIP-T: text–image cosine (`clip_score`); CLIP-I: image–image cosine with the real image of the prompt (`clip_image_similarity`), the number on the paper's CLIP-Score scale (see the README), so the paper's CLIP-Score is printed beside it.\n\n";
    let sections: [(&str, &str, &str, Vec<Metric>); 3] = [
        (
            "table2",
            "Table II: SD3, FID ↓ and CLIP-Score ↑",
            t2_note,
            vec![("FID", "fid", 1.0, 2, Some(0)), ("CLIP-T", "clip_score", 1.0, 4, None), ("CLIP-I", "clip_image_similarity", 1.0, 4, Some(1))],
        ),
        ("table3", "Table III: CLIP, top-1 accuracy (%) ↑", "", vec![("", "accuracy", 100.0, 2, Some(0))]),
        ("table4", "Table IV: SAM, Dice loss (1 − Dice) ↓", "", vec![("", "dice_loss", 1.0, 4, Some(0))]),
    ];
    for (sweep, title, note, metrics) in sections {
        let rs = in_sweep(&runs, sweep);
        if rs.is_empty() {
            let _ = write!(md, "## {title}\n\nNo finished runs.\n\n");
            continue;
        }
        write_table(&mut md, sweep, title, note, &result_table(&rs, &paper, sweep, &metrics))?;
    }
    let proxy = in_sweep(&runs, "proxy");
    if proxy.is_empty() {
        let _ = write!(md, "## Proxy\n\nNo finished runs.\n\n");
    } else {
        for (name, title, note, t) in proxy_tables(&proxy) {
            write_table(&mut md, name, title, &note, &t)?;
        }
    }
    let ranks = in_sweep(&runs, "proxy_ranks");
    if !ranks.is_empty() {
        let note = "Fig. 5 on the proxy as numbers: top-1 accuracy (%), mean ± sample std over seeds, and the paired difference (as above).\n\n";
        write_table(&mut md, "proxy_ranks", "Proxy: accuracy vs rank", note, &proxy_rank_table(&ranks))?;
    }

    // cost per run
    let t = Table {
        header: ["run", "wall time (s)", "peak memory (MB)", "training images/s"].map(String::from).to_vec(),
        rows: runs
            .iter()
            .map(|r| {
                let g = |v: &Value, d: usize| v.as_f64().map(|x| format!("{x:.*}", d)).unwrap_or_else(|| "–".into());
                vec![r["id"].as_str().unwrap_or("").into(), g(&r["wall_seconds"], 1), g(&r["peak_rss_mb"], 0), g(&r["score"]["images_per_second"], 2)]
            })
            .collect(),
    };
    write_table(&mut md, "runs", "Cost per run", "", &t)?;

    // figures
    let _ = write!(md, "## Figures\n\n");
    let figure = |md: &mut String, stem: &str, fig: Figure| -> Result<()> {
        save(&fig, &dir.join(stem))?;
        let _ = write!(md, "![{}]({stem}.png) ([SVG]({stem}.svg))\n\n", fig.title);
        Ok(())
    };
    for (sweep, stem, what) in [("fig5", "fig5_rank_sweep", "CLIP"), ("proxy_ranks", "fig5_rank_sweep_proxy", "proxy")] {
        let rs = in_sweep(&runs, sweep);
        if !rs.is_empty() {
            figure(&mut md, stem, rank_sweep_figure(&rs, what))?;
        }
    }
    // Fig. 3: the spectra of a LoRA and a Serial LoRA run of the same dataset, setting, rank and seed
    for (task, stem) in [("clip", "fig3_spectra"), ("proxy", "fig3_spectra_proxy")] {
        let rs: Vec<&Value> = runs.iter().filter(|r| r["task"] == task).collect();
        if let Some(fig) = spectra_figure(out, &rs) {
            figure(&mut md, stem, fig)?;
        }
    }
    if !proxy.is_empty() {
        let all_proxy: Vec<&Value> = runs.iter().filter(|r| r["task"] == "proxy").collect();
        figure(&mut md, "proxy_accuracy_vs_params", accuracy_vs_params(&all_proxy))?;
    }
    // training loss per method, for the first dataset and setting of each task (lowest seed)
    for task in ["clip", "sam", "sd3", "proxy"] {
        let rs: Vec<&Value> = runs.iter().filter(|r| r["task"] == task).collect();
        // the most common rank; the baselines without adapter are drawn beside it
        let rank = modal_rank(&rs);
        let baseline = |r: &Value| PROXY_BASELINES.iter().any(|b| r["method"] == *b);
        let Some(first) = rs
            .iter()
            .filter(|r| r["rank"].as_u64() == rank)
            .min_by_key(|r| (r["dataset"].as_str().unwrap_or("").to_string(), setting_key(r), r["seed"].as_u64()))
        else {
            continue;
        };
        // every seed of that setting: mean ± std per step where there are several
        let same: Vec<&Value> = rs
            .iter()
            .copied()
            .filter(|r| r["dataset"] == first["dataset"] && r["setting"] == first["setting"] && (r["rank"] == first["rank"] || baseline(r)))
            .collect();
        let mut from_jsonl = 0;
        let mut series = Vec::new();
        let mut seeds = std::collections::BTreeSet::new();
        for m in ordered_methods(&same) {
            let mut curves: Vec<Vec<(f64, f64)>> = Vec::new();
            for r in same.iter().filter(|r| r["method"] == m.as_str()) {
                seeds.insert(r["seed"].as_u64().unwrap_or(0));
                let jsonl = r["id"].as_str().map(|id| loss_from_jsonl(&out.join(id).join("adapter").join("metrics.jsonl"))).unwrap_or_default();
                let curve = if jsonl.len() >= 2 {
                    from_jsonl += 1;
                    jsonl
                } else {
                    r["train"]["loss"]
                        .as_array()
                        .map(|a| a.iter().enumerate().filter_map(|(i, l)| Some(((i + 1) as f64, l.as_f64()?))).collect())
                        .unwrap_or_default()
                };
                if !curve.is_empty() {
                    curves.push(curve);
                }
            }
            if curves.is_empty() {
                continue;
            }
            let mut by_step: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
            for c in &curves {
                for &(x, y) in c {
                    by_step.entry(x.round() as i64).or_default().push(y);
                }
            }
            let stats: Vec<(f64, (f64, f64), usize)> = by_step.into_iter().map(|(x, ys)| (x as f64, mean_std(&ys), ys.len())).collect();
            let band = if curves.len() > 1 { stats.iter().filter(|s| s.2 > 1).map(|&(x, (mu, sd), _)| (x, mu - sd, mu + sd)).collect() } else { Vec::new() };
            series.push(Series { name: method_name(&m).into(), points: stats.iter().map(|&(x, (mu, _), _)| (x, mu)).collect(), band });
        }
        let title = format!("Training loss: {task}, {} {} rank {}", first["dataset"].as_str().unwrap_or(""), setting_label(first), first["rank"]);
        let source = if from_jsonl > 0 { "metrics.jsonl (mean over each logging window)" } else { "metrics.json (per-step batch loss)" };
        let caption = if seeds.len() > 1 {
            format!("{} runs, seeds {seeds:?}: line = mean over seeds, band = ± sample std; from {source}", same.len())
        } else {
            format!("{} runs, seed {seeds:?}; from {source}", same.len())
        };
        let panel =
            Panel { title: String::new(), x_label: "optimizer step".into(), y_label: "training loss".into(), log_y: false, x_ticks: XTicks::Integer, series };
        figure(&mut md, &format!("loss_{task}"), Figure { title, caption, cols: 1, panels: vec![panel] })?;
    }
    let path = dir.join("report.md");
    write_atomic(&path, md.as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Table I for the three full-size configs equals shared/docs/method.md.
    #[test]
    fn table1_matches_the_method_note() {
        let root = crate::root();
        let want = [(3_932_160, 983_040), (4_718_592, 1_179_648), (18_874_368, 4_718_592)];
        for ((_, file, kind, r), want) in TABLE1.iter().zip(want) {
            let blocks = attention_blocks(&root.join("configs/models").join(file), kind).unwrap();
            assert_eq!(adapter_params(&blocks, *r), want, "{file}");
        }
    }

    /// The proxy's comparisons pair runs by seed (a seed one method lacks is left out) and
    /// include Serial LoRA at r against LoRA at r / 4.
    #[test]
    fn proxy_comparisons_are_paired_by_seed() {
        let run = |method: &str, rank: u64, seed: u64, acc: f64| {
            serde_json::json!({ "method": method, "rank": rank, "seed": seed, "setting": { "shots": 4 },
                "score": { "accuracy": acc, "adapter_params": 1, "head_params": 1, "trainable_params": 2 } })
        };
        let mut runs = Vec::new();
        for seed in 1..=4 {
            let s = seed as f64 / 100.0;
            runs.push(run("lora", 8, seed, 0.5 + s));
            runs.push(run("serial-lora", 8, seed, 0.4 + s + if seed % 2 == 0 { 0.02 } else { 0.0 }));
            runs.push(run("head-only", 0, seed, 0.3));
        }
        runs.push(run("lora", 2, 1, 0.45)); // one seed only
        runs.push(run("serial-lora", 8, 9, 0.99)); // no LoRA run to pair with
        let refs: Vec<&Value> = runs.iter().collect();
        let tables = proxy_tables(&refs);
        let paired = &tables[1].3;
        let row = |label: &str| paired.rows.iter().find(|r| r[0] == label).unwrap_or_else(|| panic!("{label}: {:?}", paired.rows))[1].clone();
        // differences -0.1, -0.08, -0.1, -0.08 (seed 9 unpaired): mean -9.0 points over 4 pairs
        assert!(row("Serial LoRA − LoRA (r=8)").starts_with("-9.0 [") && row("Serial LoRA − LoRA (r=8)").ends_with("(n=4)"));
        assert_eq!(row("Serial LoRA r=8 − LoRA r=2 (equal parameters)"), "-4.0 (n=1)");
        assert!(row("LoRA r=8 − head only").ends_with("(n=4)"));
        // the accuracy table: mean over every seed a method ran
        let acc = &tables[0].3;
        assert_eq!(acc.rows.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), ["head only", "LoRA r=2", "LoRA r=8", "Serial LoRA r=8"]);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!([thousands(0), thousands(999), thousands(1000), thousands(3_932_160)], ["0", "999", "1,000", "3,932,160"]);
    }

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!((m, s), (2.0, 1.0));
        assert_eq!(mean_std(&[5.0]), (5.0, 0.0));
    }
}
