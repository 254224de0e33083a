//! Sweep presets (`configs/<preset>.toml`) expanded into runs.
//!
//! A preset holds `[[sweep]]` tables; each names the task, the model, the datasets, the grid
//! (shots or fractions × methods × ranks × seeds) and extra flags for the task's `train` and
//! `eval` commands. String values may use `{root}` (the workspace), `{out}` (the results
//! directory), `{smoke}` (`{out}/_smoke`, the generated data of the smoke preset) and
//! `{dataset}` (the run's dataset name).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const METHODS: [&str; 4] = ["lora", "serial-lora", "lora-plus", "serial-lora-plus"];
/// The proxy experiment's baselines without adapter (rank 0 in their run ids): the head alone on
/// the frozen backbone, and full fine-tuning.
pub const PROXY_BASELINES: [&str; 2] = ["head-only", "full"];

/// One preset file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub description: String,
    /// Generated tiny models and data to create under `{out}/_smoke` first.
    #[serde(default)]
    pub generate_smoke_data: bool,
    pub sweep: Vec<Sweep>,
}

/// One `[[sweep]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    /// What the runs feed: `table2` (SD3), `table3` (CLIP), `table4` (SAM), `fig5` (CLIP rank
    /// sweep) or `proxy`.
    pub name: String,
    /// `clip`, `sam`, `sd3` or `proxy`.
    pub task: String,
    pub model: String,
    /// Dataset name → path.
    pub datasets: BTreeMap<String, String>,
    /// Few-shot settings (clip, proxy).
    #[serde(default)]
    pub shots: Vec<usize>,
    /// Training-set fractions (sam, sd3).
    #[serde(default)]
    pub fractions: Vec<f64>,
    pub methods: Vec<String>,
    pub ranks: Vec<usize>,
    pub seeds: Vec<u64>,
    /// Extra flags of the train command (`name = value`; `true` = bare flag).
    #[serde(default)]
    pub train: BTreeMap<String, toml::Value>,
    /// Extra flags of the eval command.
    #[serde(default)]
    pub eval: BTreeMap<String, toml::Value>,
}

/// Few-shot count or training fraction.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Setting {
    Shots(usize),
    Fraction(f64),
}

impl Setting {
    pub fn label(&self) -> String {
        match self {
            Setting::Shots(k) => format!("{k}shot"),
            Setting::Fraction(f) => format!("frac{f}"),
        }
    }
}

/// One run of the grid, as written to `results/<id>/config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    /// The sweeps (tables, figures) this run feeds.
    pub sweeps: Vec<String>,
    pub task: String,
    pub model: String,
    pub dataset: String,
    pub dataset_path: String,
    pub setting: Setting,
    pub method: String,
    pub rank: usize,
    pub seed: u64,
    pub train: BTreeMap<String, String>,
    pub eval: BTreeMap<String, String>,
}

/// Paths substituted into preset strings.
pub struct Vars<'a> {
    pub root: &'a Path,
    pub out: &'a Path,
}

impl Vars<'_> {
    fn expand(&self, s: &str, dataset: &str) -> String {
        s.replace("{smoke}", &self.out.join("_smoke").display().to_string())
            .replace("{root}", &self.root.display().to_string())
            .replace("{out}", &self.out.display().to_string())
            .replace("{dataset}", dataset)
    }

    fn flags(&self, table: &BTreeMap<String, toml::Value>, dataset: &str, what: &str) -> Result<BTreeMap<String, String>> {
        table
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    toml::Value::String(s) => self.expand(s, dataset),
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Boolean(true) => String::new(),
                    other => bail!("{what}.{k}: unsupported value {other} (string, number or true)"),
                };
                Ok((k.clone(), v))
            })
            .collect()
    }
}

/// Parses TOML into `T`; the error names the key path at fault (`grid.rank`).
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    let de = toml::Deserializer::parse(text)?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." || path == "?" { anyhow::anyhow!("{}", e.inner()) } else { anyhow::anyhow!("`{path}`: {}", e.inner()) }
    })
}

impl Preset {
    /// Reads `configs/<name>.toml` (or a path to a TOML file).
    pub fn load(root: &Path, name: &str) -> Result<(PathBuf, Preset)> {
        let path = if name.ends_with(".toml") { PathBuf::from(name) } else { root.join("configs").join(format!("{name}.toml")) };
        let text = std::fs::read_to_string(&path).with_context(|| format!("--preset {name}: reading {}", path.display()))?;
        let preset: Preset = parse_toml(&text).with_context(|| format!("{}", path.display()))?;
        Ok((path, preset))
    }

    /// Every run of the preset, sorted by id; a run that several sweeps share appears once,
    /// listing them all.
    pub fn runs(&self, vars: &Vars) -> Result<Vec<Run>> {
        let mut runs: BTreeMap<String, Run> = BTreeMap::new();
        for (i, s) in self.sweep.iter().enumerate() {
            let what = format!("sweep {} ({})", i + 1, s.name);
            let settings: Vec<Setting> = match s.task.as_str() {
                "clip" | "proxy" => s.shots.iter().map(|&k| Setting::Shots(k)).collect(),
                "sam" | "sd3" => s.fractions.iter().map(|&f| Setting::Fraction(f)).collect(),
                t => bail!("{what}: unknown task `{t}` (clip, sam, sd3, proxy)"),
            };
            if settings.is_empty() || s.methods.is_empty() || s.ranks.is_empty() || s.seeds.is_empty() || s.datasets.is_empty() {
                bail!("{what}: datasets, shots/fractions, methods, ranks and seeds must each be non-empty");
            }
            let known: Vec<&str> = METHODS.iter().chain(if s.task == "proxy" { &PROXY_BASELINES[..] } else { &[] }).copied().collect();
            if let Some(m) = s.methods.iter().find(|m| !known.contains(&m.as_str())) {
                bail!("{what}: unknown method `{m}` ({})", known.join(", "));
            }
            for (dataset, path) in &s.datasets {
                let train = vars.flags(&s.train, dataset, &format!("{what}: train"))?;
                let eval = vars.flags(&s.eval, dataset, &format!("{what}: eval"))?;
                for &setting in &settings {
                    for method in &s.methods {
                        // a baseline has no rank: one run per seed, rank 0
                        let ranks = if PROXY_BASELINES.contains(&method.as_str()) { vec![0] } else { s.ranks.clone() };
                        for &rank in &ranks {
                            for &seed in &s.seeds {
                                let id = format!("{}-{dataset}-{}-{method}-r{rank}-s{seed}", s.task, setting.label());
                                let run = Run {
                                    id: id.clone(),
                                    sweeps: vec![s.name.clone()],
                                    task: s.task.clone(),
                                    model: vars.expand(&s.model, dataset),
                                    dataset: dataset.clone(),
                                    dataset_path: vars.expand(path, dataset),
                                    setting,
                                    method: method.clone(),
                                    rank,
                                    seed,
                                    train: train.clone(),
                                    eval: eval.clone(),
                                };
                                match runs.get_mut(&id) {
                                    Some(prev) if Run { sweeps: prev.sweeps.clone(), ..run.clone() } == *prev => {
                                        if !prev.sweeps.contains(&s.name) {
                                            prev.sweeps.push(s.name.clone());
                                        }
                                    }
                                    Some(_) => bail!("{what}: run {id} is declared twice with different settings"),
                                    None => {
                                        runs.insert(id, run);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(runs.into_values().collect())
    }
}

/// `K/N` (1-based shard K of N).
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let err = || format!("--shard `{s}`: expected K/N with 1 ≤ K ≤ N");
    let (k, n) = s.split_once('/').with_context(err)?;
    let (k, n): (usize, usize) = (k.trim().parse().with_context(err)?, n.trim().parse().with_context(err)?);
    if k == 0 || k > n {
        bail!(err());
    }
    Ok((k, n))
}

/// The runs of shard `k` of `n`: every n-th run of the sorted list, starting at the k-th, so the
/// shards are disjoint, cover the grid and are balanced across tasks.
pub fn shard(runs: Vec<Run>, (k, n): (usize, usize)) -> Vec<Run> {
    runs.into_iter().enumerate().filter(|(i, _)| i % n == k - 1).map(|(_, r)| r).collect()
}

/// Keeps the runs whose task, dataset or method is one of `only` (comma-separated).
pub fn filter(runs: Vec<Run>, only: &str) -> Vec<Run> {
    let keys: Vec<&str> = only.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    runs.into_iter().filter(|r| keys.iter().any(|k| [&r.task, &r.dataset, &r.method].iter().any(|v| v.as_str() == *k))).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn root() -> PathBuf {
        crate::root()
    }

    fn all(preset: &str) -> Vec<Run> {
        let (_, p) = Preset::load(&root(), preset).unwrap();
        p.runs(&Vars { root: &root(), out: Path::new("/results") }).unwrap()
    }

    #[test]
    fn shards_cover_every_run_exactly_once() {
        for preset in ["smoke", "paper", "proxy"] {
            let runs = all(preset);
            for n in [1, 2, 3, 7] {
                let mut ids: Vec<String> = (1..=n).flat_map(|k| shard(runs.clone(), (k, n))).map(|r| r.id).collect();
                ids.sort();
                assert_eq!(ids, runs.iter().map(|r| r.id.clone()).collect::<Vec<_>>(), "{preset} {n}");
            }
        }
        assert!(parse_shard("0/2").is_err() && parse_shard("3/2").is_err() && parse_shard("x").is_err());
        assert_eq!(parse_shard("2/5").unwrap(), (2, 5));
    }

    /// The proxy preset is the grid issue 18 asks for: 1 / 4 / 16 shots × 10 seeds for the four
    /// methods at rank 8, LoRA at rank 2 and the two baselines (rank 0); 16 shots × 5 seeds ×
    /// ranks 2–32 for LoRA and Serial LoRA; every comparison paired (the same seeds).
    #[test]
    fn proxy_grid_is_paired() {
        let runs = all("proxy");
        let count = |sweep: &str, method: &str, rank: usize| {
            runs.iter().filter(|r| r.sweeps.iter().any(|s| s == sweep) && r.method == method && r.rank == rank).count()
        };
        for m in METHODS {
            assert_eq!(count("proxy", m, 8), 30, "{m}");
        }
        for (m, k) in [("lora", 2), ("head-only", 0), ("full", 0)] {
            assert_eq!(count("proxy", m, k), 30, "{m} r{k}");
        }
        for m in ["lora", "serial-lora"] {
            for k in [2, 4, 8, 16, 32] {
                assert_eq!(count("proxy_ranks", m, k), 5, "{m} r{k}");
            }
        }
        assert_eq!(runs.len(), 7 * 30 + 50 - 15);
        let cells = |m: &str, k: usize| -> BTreeSet<(String, u64)> {
            runs.iter().filter(|r| r.sweeps.iter().any(|s| s == "proxy") && r.method == m && r.rank == k).map(|r| (r.setting.label(), r.seed)).collect()
        };
        for (m, k) in [("lora", 2), ("serial-lora", 8), ("lora-plus", 8), ("serial-lora-plus", 8), ("head-only", 0), ("full", 0)] {
            assert_eq!(cells(m, k), cells("lora", 8), "{m} r{k}");
        }
    }

    #[test]
    fn paper_grid_is_the_papers() {
        let runs = all("paper");
        let count = |task: &str, sweep: &str| runs.iter().filter(|r| r.task == task && r.sweeps.iter().any(|s| s == sweep)).count();
        assert_eq!(count("sd3", "table2"), 4 * 3 * 4);
        assert_eq!(count("clip", "table3"), 4 * 3 * 4 * 3); // datasets × shots × methods × seeds
        assert_eq!(count("sam", "table4"), 5 * 3 * 4);
        assert!(count("clip", "fig5") > 0);
        // the rank-32 runs of the rank sweep are the Table III runs, run once
        let shared = runs.iter().filter(|r| r.sweeps.len() == 2).count();
        assert!(shared > 0);
        assert_eq!(filter(runs.clone(), "sam").len(), count("sam", "table4"));
        // a run is kept when its task, dataset or method is named: exactly those
        let kept = filter(runs.clone(), "eurosat, serial-lora");
        let want: Vec<&Run> = runs.iter().filter(|r| r.dataset == "eurosat" || r.method == "serial-lora").collect();
        assert!(!kept.is_empty() && kept.iter().eq(want.into_iter()));
    }
}
