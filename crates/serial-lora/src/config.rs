//! Adapter configuration: which method, rank, scale, init and targets.
//!
//! Field names follow PEFT's `LoraConfig` where one exists (`r` ⇄ `rank`, `lora_alpha` ⇄ `alpha`,
//! `lora_dropout` ⇄ `dropout`, `use_rslora` ⇄ `rslora`); the file format lives in [`crate::io`].
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which adapter is attached to each attention block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// One (A, B) pair per adapted projection (Hu et al. 2022, PEFT semantics).
    Lora,
    /// One shared (A, B) pair per attention block, applied to the attention input (the paper).
    SerialLora,
}

/// Initialisation of the A matrices (B always starts at zero).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    /// `kaiming_uniform_(a = √5)` = U(±1/√in): PEFT's default (`init_lora_weights=True`).
    #[default]
    KaimingUniform,
    /// N(0, (1/r)²): PEFT's `init_lora_weights="gaussian"` (`std = 1/r`).
    Gaussian,
}

/// One projection of an attention block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Projection {
    Q,
    K,
    V,
    O,
}

impl Projection {
    pub const ALL: [Projection; 4] = [Projection::Q, Projection::K, Projection::V, Projection::O];
}

/// Everything that defines an adapter. Serialises to TOML or JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// `lora` or `serial-lora`.
    pub method: Method,
    /// Rank r of every (A, B) pair.
    pub rank: usize,
    /// Scale numerator: s = alpha / r (or alpha / √r with `rslora`).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter input during training.
    #[serde(default)]
    pub dropout: f64,
    /// rsLoRA scaling s = alpha / √r.
    #[serde(default)]
    pub rslora: bool,
    /// Initialisation of A.
    #[serde(default)]
    pub init: Init,
    /// Indices of the attention blocks to adapt, in model order; `None` = all.
    #[serde(default)]
    pub target_blocks: Option<Vec<usize>>,
    /// Projections that get a LoRA pair (LoRA only; Serial LoRA always adapts the shared Q/K/V input).
    #[serde(default = "default_projections")]
    pub target_projections: Vec<Projection>,
    /// LoRA+ learning-rate ratio lr_B / lr_A; `None` = plain LoRA / Serial LoRA.
    #[serde(default)]
    pub lr_ratio: Option<f64>,
}

/// The largest rank an adapter config may ask for (far above every model width this workspace
/// loads); the adapter of a given model is also refused when its parameters would exceed
/// [`crate::parse::MAX_TENSOR_ELEMENTS`] (see [`crate::AdaptedModel::with_adapters`]).
pub const MAX_RANK: usize = 1 << 16;

fn default_alpha() -> f64 {
    1.0
}
fn default_projections() -> Vec<Projection> {
    Projection::ALL.to_vec()
}

impl AdapterConfig {
    /// A config with PEFT's defaults for everything but method and rank (alpha = rank, so s = 1).
    pub fn new(method: Method, rank: usize) -> Self {
        Self {
            method,
            rank,
            alpha: rank as f64,
            dropout: 0.0,
            rslora: false,
            init: Init::KaimingUniform,
            target_blocks: None,
            target_projections: default_projections(),
            lr_ratio: None,
        }
    }

    /// The config of a command-line method name: `lora`, `serial-lora`, `lora-plus`,
    /// `serial-lora-plus` (the `-plus` methods get LoRA+ ratio `lr_ratio`).
    pub fn from_method_name(name: &str, rank: usize, lr_ratio: f64) -> Result<Self> {
        let (method, plus) = match name {
            "lora" => (Method::Lora, false),
            "serial-lora" => (Method::SerialLora, false),
            "lora-plus" => (Method::Lora, true),
            "serial-lora-plus" => (Method::SerialLora, true),
            other => {
                return Err(Error::config("method", other, "expected one of lora, serial-lora, lora-plus, serial-lora-plus"));
            }
        };
        let mut cfg = Self::new(method, rank);
        cfg.lr_ratio = plus.then_some(lr_ratio);
        Ok(cfg)
    }

    pub fn with_alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }
    pub fn with_dropout(mut self, dropout: f64) -> Self {
        self.dropout = dropout;
        self
    }
    pub fn with_rslora(mut self, rslora: bool) -> Self {
        self.rslora = rslora;
        self
    }
    pub fn with_init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }
    pub fn with_target_blocks(mut self, blocks: Option<Vec<usize>>) -> Self {
        self.target_blocks = blocks;
        self
    }
    pub fn with_target_projections(mut self, projections: Vec<Projection>) -> Self {
        self.target_projections = projections;
        self
    }
    pub fn with_lr_ratio(mut self, ratio: Option<f64>) -> Self {
        self.lr_ratio = ratio;
        self
    }

    /// The adapter scale s: alpha / r, or alpha / √r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.rslora { self.alpha / (self.rank as f64).sqrt() } else { self.alpha / self.rank as f64 }
    }

    /// The name used on the command line and in result tables.
    pub fn method_name(&self) -> &'static str {
        match (self.method, self.lr_ratio.is_some()) {
            (Method::Lora, false) => "lora",
            (Method::Lora, true) => "lora-plus",
            (Method::SerialLora, false) => "serial-lora",
            (Method::SerialLora, true) => "serial-lora-plus",
        }
    }

    /// Checks every value; errors name the field and the value.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::config("rank", self.rank, "must be at least 1"));
        }
        if self.rank > MAX_RANK {
            return Err(Error::config("rank", self.rank, format!("must be at most {MAX_RANK}")));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::config("alpha", self.alpha, "must be a finite number > 0"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config("dropout", self.dropout, "must be in [0, 1)"));
        }
        if let Some(r) = self.lr_ratio
            && !(r.is_finite() && r > 0.0)
        {
            return Err(Error::config("lr_ratio", r, "must be a finite number > 0"));
        }
        if self.method == Method::Lora && self.target_projections.is_empty() {
            return Err(Error::TargetMatchesNothing("target_projections is empty".into()));
        }
        if matches!(&self.target_blocks, Some(b) if b.is_empty()) {
            return Err(Error::TargetMatchesNothing("target_blocks is empty".into()));
        }
        Ok(())
    }

    /// Whether block `index` of a model with `num_blocks` attention blocks is adapted.
    pub fn targets_block(&self, index: usize) -> bool {
        self.target_blocks.as_ref().is_none_or(|b| b.contains(&index))
    }

    /// Checks that the block selection fits a model with `num_blocks` blocks.
    pub fn check_blocks(&self, num_blocks: usize) -> Result<()> {
        if let Some(blocks) = &self.target_blocks {
            let out: Vec<_> = blocks.iter().filter(|&&b| b >= num_blocks).collect();
            if !out.is_empty() {
                return Err(Error::TargetMatchesNothing(format!(
                    "target_blocks {out:?} do not exist: the model has {num_blocks} attention blocks (0..{num_blocks})"
                )));
            }
        }
        Ok(())
    }

    /// Reads a config from a `.toml` or `.json` file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = if path.extension().is_some_and(|e| e == "json") {
            crate::parse::json(&text).map_err(|message| Error::Parse { path: path.into(), format: "JSON", message })?
        } else {
            crate::parse::toml(&text).map_err(|message| Error::Parse { path: path.into(), format: "TOML", message })?
        };
        cfg.validate().map_err(|e| Error::Parse { path: path.into(), format: "adapter config", message: e.to_string() })?;
        Ok(cfg)
    }
}
