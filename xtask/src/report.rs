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
use crate::sweep::METHODS;

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
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
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

fn ordered_methods(runs: &[&Value]) -> Vec<String> {
    let present: BTreeSet<&str> = runs.iter().filter_map(|r| r["method"].as_str()).collect();
    METHODS.iter().filter(|m| present.contains(*m)).map(|m| m.to_string()).collect()
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
    let sections: [(&str, &str, &str, Vec<Metric>); 4] = [
        (
            "table2",
            "Table II: SD3, FID ↓ and CLIP-Score ↑",
            t2_note,
            vec![("FID", "fid", 1.0, 2, Some(0)), ("CLIP-T", "clip_score", 1.0, 4, None), ("CLIP-I", "clip_image_similarity", 1.0, 4, Some(1))],
        ),
        ("table3", "Table III: CLIP, top-1 accuracy (%) ↑", "", vec![("", "accuracy", 100.0, 2, Some(0))]),
        ("table4", "Table IV: SAM, Dice loss (1 − Dice) ↓", "", vec![("", "dice_loss", 1.0, 4, Some(0))]),
        ("proxy", "Proxy: tiny ViT pre-trained on digits 0–4, adapted few-shot to 5–9, top-1 accuracy (%) ↑", "", vec![("", "accuracy", 100.0, 2, None)]),
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
    if !proxy.is_empty() {
        let mut params: BTreeMap<(String, u64), (u64, u64)> = BTreeMap::new();
        for r in &proxy {
            let s = &r["score"];
            params.insert(
                (r["method"].as_str().unwrap_or("").into(), r["rank"].as_u64().unwrap_or(0)),
                (s["adapter_params"].as_u64().unwrap_or(0), s["head_params"].as_u64().unwrap_or(0)),
            );
        }
        let t = Table {
            header: ["method", "rank", "adapter parameters", "head parameters"].map(String::from).to_vec(),
            rows: params.iter().map(|((m, k), (a, h))| vec![m.clone(), k.to_string(), a.to_string(), h.to_string()]).collect(),
        };
        write_table(&mut md, "proxy_params", "Proxy: trainable parameters", "", &t)?;
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
    let fig5 = in_sweep(&runs, "fig5");
    if !fig5.is_empty() {
        let panels = ordered_datasets(&fig5)
            .into_iter()
            .map(|d| {
                let rs: Vec<&Value> = fig5.iter().copied().filter(|r| r["dataset"] == d.as_str()).collect();
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
                        Series { name: m, points: stats.iter().map(|&(x, (m, _), _)| (x, m)).collect(), band }
                    })
                    .collect();
                Panel { title: d, x_label: "rank (log scale)".into(), y_label: "top-1 accuracy (%)".into(), log_y: false, x_ticks: XTicks::Pow2, series }
            })
            .collect();
        let seeds: std::collections::BTreeSet<u64> = fig5.iter().filter_map(|r| r["seed"].as_u64()).collect();
        let caption = format!("{} CLIP runs ({}); line: mean over seeds {:?}, band: ± sample std", fig5.len(), setting_label(fig5[0]), seeds);
        figure(&mut md, "fig5_rank_sweep", Figure { title: "Fig. 5: accuracy vs rank".into(), caption, cols: 2, panels })?;
    }
    // Fig. 3: the spectra of a LoRA and a Serial LoRA CLIP run of the same dataset, setting, rank and seed
    let with_spectra: Vec<(&Value, Value)> =
        runs.iter().filter_map(|r| Some((r, read_json(&out.join(r["id"].as_str()?).join("spectra.json")).ok()?))).collect();
    let same_setting = |a: &Value, b: &Value| ["dataset", "setting", "rank", "seed"].iter().all(|k| a[k] == b[k]);
    let pair = with_spectra
        .iter()
        .filter(|(r, _)| r["method"] == "lora")
        .find_map(|(lr, ls)| with_spectra.iter().find(|(r, _)| r["method"] == "serial-lora" && same_setting(r, lr)).map(|(_, ss)| (lr, ls, ss)));
    if let Some((lr, ls, ss)) = pair {
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
                let series = vec![
                    Series::new("base", spectrum(&ls["base"], b, proj)),
                    Series::new("LoRA", spectrum(&ls["adapted"], b, proj)),
                    Series::new("Serial LoRA", spectrum(&ss["adapted"], b, proj)),
                ];
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
        let caption = format!(
            "runs {} and {}: base weights and the weights with each adapter merged; first, middle and last attention block",
            lr["id"].as_str().unwrap_or(""),
            with_spectra.iter().find(|(r, _)| r["method"] == "serial-lora" && same_setting(r, lr)).and_then(|(r, _)| r["id"].as_str()).unwrap_or("")
        );
        figure(&mut md, "fig3_spectra", Figure { title, caption, cols: shown.len(), panels })?;
    }
    // training loss per method, for the first dataset and setting of each task (lowest seed)
    for task in ["clip", "sam", "sd3", "proxy"] {
        let rs: Vec<&Value> = runs.iter().filter(|r| r["task"] == task).collect();
        let Some(first) = rs.iter().min_by_key(|r| (r["dataset"].as_str().unwrap_or("").to_string(), setting_key(r), r["rank"].as_u64(), r["seed"].as_u64()))
        else {
            continue;
        };
        // every seed of that setting: mean ± std per step where there are several
        let same: Vec<&Value> =
            rs.iter().copied().filter(|r| r["dataset"] == first["dataset"] && r["setting"] == first["setting"] && r["rank"] == first["rank"]).collect();
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
            series.push(Series { name: m, points: stats.iter().map(|&(x, (mu, _), _)| (x, mu)).collect(), band });
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
