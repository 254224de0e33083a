//! Few-shot classification datasets: CoOp's `split_zhou_<Name>.json` layout (what CLIP-LoRA
//! uses) and a plain class-per-folder layout; K-shot sampling per class with a seed.
//!
//! Upstream: CoOp `datasets/oxford_pets.py::read_split` and `Dassl` `DatasetBase.
//! generate_fewshot_dataset` (K items per class without repetition, or with repetition when a
//! class has fewer than K); CLIP-LoRA `datasets/` (same splits).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{RngExt, SeedableRng};

use crate::error::{ClipError, Result};

/// One labelled image.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub path: PathBuf,
    pub label: usize,
}

/// A dataset: class names (label order) and its splits.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Where the dataset was read from (for messages).
    pub root: PathBuf,
    /// The CoOp name (`EuroSAT` for `split_zhou_EuroSAT.json`); `None` for class folders.
    pub name: Option<String>,
    /// Class names with underscores replaced by spaces, indexed by label.
    pub classnames: Vec<String>,
    /// `train`, `val`, `test` (the ones present).
    pub splits: BTreeMap<String, Vec<Item>>,
}

/// The CoOp datasets, by the name in `split_zhou_<Name>.json`: image subfolder and the prompt
/// template CoOp / CLIP-LoRA use for it (CoOp `CUSTOM_TEMPLATES`).
const COOP: &[(&str, &str, &str)] = &[
    ("Caltech101", "101_ObjectCategories", "a photo of a {}."),
    ("Food101", "images", "a photo of {}, a type of food."),
    ("EuroSAT", "2750", "a centered satellite photo of {}."),
    ("OxfordPets", "images", "a photo of a {}, a type of pet."),
    ("DescribableTextures", "images", "{} texture."),
    ("OxfordFlowers", "jpg", "a photo of a {}, a type of flower."),
    ("StanfordCars", "", "a photo of a {}."),
    ("FGVCAircraft", "images", "a photo of a {}, a type of aircraft."),
    ("SUN397", "SUN397", "a photo of a {}."),
    ("UCF101", "UCF-101-midframes", "a photo of a person doing {}."),
];

/// CLIP's generic prompt.
pub const DEFAULT_TEMPLATE: &str = "a photo of a {}.";

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"];

fn bad(path: &Path, message: impl Into<String>) -> ClipError {
    ClipError::Dataset { path: path.to_path_buf(), message: message.into() }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClipError + '_ {
    move |e| ClipError::Io { path: path.to_path_buf(), source: e }
}

impl Dataset {
    /// Reads `dir`: a CoOp dataset folder (holding one `split_zhou_*.json`) or a
    /// class-per-folder tree (`dir/{train,val,test}/<class>/*`, or `dir/<class>/*` = train only).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(bad(dir, "dataset directory does not exist"));
        }
        let mut splits: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("split_zhou_") && n.ends_with(".json")))
            .collect();
        splits.sort();
        match splits.as_slice() {
            [] => Self::from_folders(dir),
            [one] => Self::from_coop(dir, one),
            many => Err(bad(dir, format!("more than one CoOp split file: {}", names(many)))),
        }
    }

    /// The prompt template CoOp and CLIP-LoRA use for this dataset, else [`DEFAULT_TEMPLATE`].
    pub fn default_template(&self) -> &'static str {
        let known = COOP.iter().find(|(n, ..)| Some(*n) == self.name.as_deref());
        known.map_or(DEFAULT_TEMPLATE, |(.., t)| *t)
    }

    /// The items of a split, or an error naming the splits there are.
    pub fn split(&self, name: &str) -> Result<&[Item]> {
        match self.splits.get(name) {
            Some(items) if !items.is_empty() => Ok(items),
            _ => Err(bad(&self.root, format!("no `{name}` split (available: {})", self.splits.keys().cloned().collect::<Vec<_>>().join(", ")))),
        }
    }

    fn from_coop(dir: &Path, split_file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(split_file).map_err(io_err(split_file))?;
        let raw: BTreeMap<String, Vec<(String, usize, String)>> =
            serial_lora::parse::json(&text).map_err(|e| bad(split_file, format!("not a CoOp split ({{split: [[path, label, classname], ...]}}): {e}")))?;
        let stem = split_file.file_stem().and_then(|s| s.to_str()).unwrap_or("").trim_start_matches("split_zhou_");
        let first = raw.values().flatten().next().ok_or_else(|| bad(split_file, "every split is empty"))?;
        // The image root: the dataset's CoOp subfolder, `images/`, or the folder itself.
        let known = COOP.iter().find(|(n, ..)| *n == stem).map(|(_, d, _)| *d);
        let candidates: Vec<PathBuf> = known.into_iter().chain(["images", ""]).map(|d| dir.join(d)).collect();
        let image_root = candidates
            .iter()
            .find(|r| serial_lora::parse::contained_path(r, &first.0).is_ok_and(|p| p.is_file()))
            .ok_or_else(|| bad(split_file, format!("image `{}` is not under any of {}", first.0, names(&candidates))))?;
        let mut classnames: BTreeMap<usize, String> = BTreeMap::new();
        let mut splits = BTreeMap::new();
        for (split, entries) in raw {
            let mut items = Vec::with_capacity(entries.len());
            for (rel, label, name) in entries {
                let name = name.replace('_', " ");
                if let Some(prev) = classnames.insert(label, name.clone())
                    && prev != name
                {
                    return Err(bad(split_file, format!("label {label} is both `{prev}` and `{name}`")));
                }
                let path = serial_lora::parse::contained_path(image_root, &rel).map_err(|e| bad(split_file, format!("split `{split}`: {e}")))?;
                items.push(Item { path, label });
            }
            splits.insert(split, items);
        }
        let n = classnames.len();
        if let Some((i, _)) = classnames.keys().enumerate().find(|(i, l)| i != *l) {
            return Err(bad(split_file, format!("labels are not 0..{n}: label {i} has no image")));
        }
        Ok(Self { root: dir.to_path_buf(), name: Some(stem.to_string()), classnames: classnames.into_values().collect(), splits })
    }

    fn from_folders(dir: &Path) -> Result<Self> {
        let split_dirs: Vec<&str> = ["train", "val", "test"].into_iter().filter(|s| dir.join(s).is_dir()).collect();
        let mut per_split: Vec<(String, BTreeMap<String, Vec<PathBuf>>)> = Vec::new();
        if split_dirs.is_empty() {
            per_split.push(("train".into(), class_folders(dir)?));
        } else {
            for s in split_dirs {
                per_split.push((s.into(), class_folders(&dir.join(s))?));
            }
        }
        let folders: Vec<String> = per_split.iter().flat_map(|(_, c)| c.keys().cloned()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        if folders.is_empty() {
            return Err(bad(dir, "no class folders and no split_zhou_*.json"));
        }
        let mut splits = BTreeMap::new();
        for (split, classes) in per_split {
            let items = classes
                .into_iter()
                .flat_map(|(c, files)| {
                    let label = folders.binary_search(&c).unwrap_or_default();
                    files.into_iter().map(move |path| Item { path, label })
                })
                .collect();
            splits.insert(split, items);
        }
        Ok(Self { root: dir.to_path_buf(), name: None, classnames: folders.iter().map(|f| f.replace('_', " ")).collect(), splits })
    }
}

/// `<dir>/<class>/<image>`: image files per class folder, sorted; an empty class is an error.
fn class_folders(dir: &Path) -> Result<BTreeMap<String, Vec<PathBuf>>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if !path.is_dir() {
            continue;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&path)
            .map_err(io_err(&path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())))
            .collect();
        if files.is_empty() {
            return Err(bad(&path, format!("class folder has no images ({})", IMAGE_EXTENSIONS.join(", "))));
        }
        files.sort();
        let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| bad(&path, "class folder name is not UTF-8"))?;
        out.insert(name.to_string(), files);
    }
    Ok(out)
}

fn names(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

impl Dataset {
    /// K items per class of `split` (classes in label order; `None` = the whole split), drawn
    /// with a seeded RNG: without repetition, or with repetition when a class has fewer than K
    /// (Dassl's `generate_fewshot_dataset`). A class with no item in the split is an error.
    pub fn few_shot(&self, split: &str, shots: Option<usize>, seed: u64) -> Result<Vec<Item>> {
        let items = self.split(split)?;
        let mut by_class: Vec<Vec<&Item>> = vec![Vec::new(); self.classnames.len()];
        for it in items {
            by_class[it.label].push(it);
        }
        if let Some(label) = by_class.iter().position(|c| c.is_empty()) {
            return Err(bad(&self.root, format!("class `{}` has no image in the `{split}` split", self.classnames[label])));
        }
        let Some(k) = shots else { return Ok(items.to_vec()) };
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(k * by_class.len());
        for pool in &by_class {
            if pool.len() >= k {
                out.extend(pool.sample(&mut rng, k).map(|i| (*i).clone()));
            } else {
                out.extend((0..k).map(|_| pool[rng.random_range(0..pool.len())].clone()));
            }
        }
        Ok(out)
    }
}

/// A seeded permutation of `0..n` (the order of one epoch).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    idx
}
