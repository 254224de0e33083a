//! Model directories by Hugging Face hub id or local path.
//!
//! A hub id (`openai/clip-vit-base-patch16`) is fetched with `hf-hub` into the standard HF cache
//! (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`; `HF_ENDPOINT`, `HF_TOKEN` and the cached
//! token are honoured) and resolved to its snapshot directory, so the model crates load every model from
//! a local directory in HF layout. With `HF_HUB_OFFLINE=1` only the cache is read.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where and how to look for hub files.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// The `hub` directory of the HF cache.
    pub cache_dir: PathBuf,
    /// Read the cache only (`HF_HUB_OFFLINE`).
    pub offline: bool,
}

impl HubOptions {
    /// From `HF_HOME` and `HF_HUB_OFFLINE`, as the Python tools read them.
    pub fn from_env() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"));
        Self { cache_dir: hf_hub::Cache::from_env().path().clone(), offline }
    }
}

/// One file a model needs; alternatives are tried in order (`["tokenizer.json", "vocab.json"]`).
/// An alternative `a+b` needs both files. A `*.index.json` alternative brings its shards.
pub type Needed<'a> = &'a [&'a str];

fn is_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))) && !spec.starts_with('.')
}

/// A local model directory, or the snapshot directory of a hub id with every `needed` file
/// present (downloaded unless offline). Errors name the path or id and the missing file.
pub fn resolve_model_dir(spec: &str, needed: &[Needed<'_>], optional: &[&str], opts: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(Error::Hub { id: spec.into(), message: "is a file; a model directory in HF layout is expected".into() });
    }
    if !is_hub_id(spec) {
        return Err(Error::Hub { id: spec.into(), message: "no such directory, and not a hub id of the form `owner/name`".into() });
    }
    let fetch = Fetcher::new(spec, opts)?;
    let mut dir: Option<PathBuf> = None;
    for alternatives in needed {
        let mut errors = Vec::new();
        let mut found = false;
        for alt in alternatives.iter() {
            match alt.split('+').map(|f| fetch.get(f)).collect::<Result<Vec<_>>>() {
                Ok(paths) => {
                    if alt.ends_with(".index.json") {
                        for shard in shards(&paths[0])? {
                            fetch.get(&shard)?;
                        }
                    }
                    dir.get_or_insert_with(|| paths[0].parent().map(Path::to_path_buf).unwrap_or_default());
                    found = true;
                    break;
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        if !found {
            return Err(Error::Hub { id: spec.into(), message: errors.join("; ") });
        }
    }
    for f in optional {
        let _ = fetch.get(f);
    }
    dir.ok_or_else(|| Error::Hub { id: spec.into(), message: "no files requested".into() })
}

fn shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Parse { path: index.into(), format: "JSON", message: e.to_string() })?;
    let mut files: Vec<String> = v["weight_map"].as_object().map(|m| m.values().filter_map(|f| f.as_str().map(String::from)).collect()).unwrap_or_default();
    files.sort();
    files.dedup();
    Ok(files)
}

struct Fetcher {
    id: String,
    cache: hf_hub::CacheRepo,
    api: Option<hf_hub::api::sync::ApiRepo>,
    cache_dir: PathBuf,
}

impl Fetcher {
    fn new(id: &str, opts: &HubOptions) -> Result<Self> {
        let cache = hf_hub::Cache::new(opts.cache_dir.clone());
        let api = if opts.offline {
            None
        } else {
            // HF_TOKEN first (gated repositories such as SD3), else the token `hf auth login` cached
            let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()).or_else(|| cache.token());
            let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone()).with_token(token);
            if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
                builder = builder.with_endpoint(endpoint);
            }
            let api = builder
                .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .build()
                .map_err(|e| Error::Hub { id: id.into(), message: format!("cannot start the hub client: {e}") })?;
            Some(api.model(id.to_string()))
        };
        Ok(Self { id: id.into(), cache: cache.model(id.to_string()), api, cache_dir: opts.cache_dir.clone() })
    }

    fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(p) = self.cache.get(file) {
            return Ok(p);
        }
        match &self.api {
            None => Err(Error::Hub {
                id: self.id.clone(),
                message: format!("`{file}` is not in the HF cache at {} and HF_HUB_OFFLINE is set", self.cache_dir.display()),
            }),
            Some(api) => api.get(file).map_err(|e| Error::Hub { id: self.id.clone(), message: format!("`{file}`: {e}") }),
        }
    }
}
