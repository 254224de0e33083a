//! The T5 encoder of SD3's `text_encoder_3`: transformers `T5EncoderModel` (T5 v1.1 as in
//! `google/t5-v1_1-xxl`): token embedding `shared`, pre-norm blocks with RMS `T5LayerNorm` (no
//! mean subtraction, no bias), self-attention without biases and without the 1/√d scaling of
//! the scores, plus a relative position bias computed by the first block and shared by all
//! blocks; gated-GELU (`gated-gelu`: `wo(gelu_new(wi_0 x) · wi_1 x)`) or plain (`relu`: `wo(act(wi x))`)
//! feed-forward; `final_layer_norm`. No attention mask (diffusers passes none).
//! Upstream: transformers `models/t5/modeling_t5.py` and `configuration_t5.py` (v5.24.0).
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use lora_runtime::weights::{KeyTable, load_safetensors_dir};
use serde::{Deserialize, Serialize};
use serial_lora::half::{embedding, f32, linear};
use serial_lora::layers::Activation;
use serial_lora::parse;
use serial_lora::{Attention, AttentionConfig, LoraLinear, sdpa};

use crate::error::{Result, Sd3Error};

/// `T5Config` (`text_encoder_3/config.json`) with transformers' field names and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct T5Config {
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub d_model: usize,
    /// Width of one attention head (`num_heads · d_kv` need not equal `d_model`).
    pub d_kv: usize,
    /// Width of the feed-forward layer.
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    /// `[gated-]ACT`; `gated-gelu` means the `gelu_new` (tanh) activation, as transformers reads it.
    pub feed_forward_proj: String,
}

impl Default for T5Config {
    /// transformers' `T5Config()` defaults.
    fn default() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
        }
    }
}

impl T5Config {
    /// `google/t5-v1_1-xxl` (SD3's `text_encoder_3/config.json`).
    pub fn t5_v1_1_xxl() -> Self {
        Self { d_model: 4096, d_kv: 64, d_ff: 10240, num_layers: 24, num_heads: 64, feed_forward_proj: "gated-gelu".into(), ..Self::default() }
    }

    /// `(gated, activation)` as transformers derives them from `feed_forward_proj`.
    pub fn feed_forward(&self) -> std::result::Result<(bool, Activation), String> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let gated = parts[0] == "gated";
        if (parts.len() > 1 && !gated) || parts.len() > 2 {
            return Err(format!("feed_forward_proj {:?} is not of the form `gated-ACT` or `ACT`", self.feed_forward_proj));
        }
        let name = match self.feed_forward_proj.as_str() {
            "gated-gelu" => "gelu_new",
            _ => parts[parts.len() - 1],
        };
        let act = serde_json::from_value(serde_json::Value::String(name.into()))
            .map_err(|_| format!("activation {name:?} of feed_forward_proj {:?} is not supported", self.feed_forward_proj))?;
        Ok((gated, act))
    }

    /// Reads and checks a `config.json`; errors name the file and the field.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Sd3Error::Io { path: path.into(), source: e })?;
        let cfg: Self = parse::json(&text).map_err(|message| Sd3Error::Config { path: path.into(), message })?;
        cfg.validate().map_err(|message| Sd3Error::Config { path: path.into(), message })?;
        Ok(cfg)
    }

    /// Checks every value before anything is computed from it, and that no tensor exceeds
    /// [`parse::MAX_TENSOR_ELEMENTS`]; errors name the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.feed_forward().map_err(|m| format!("`feed_forward_proj`: {m}"))?;
        let vocab = parse::at_least("vocab_size", self.vocab_size, 1)?;
        let d = parse::at_least("d_model", self.d_model, 1)?;
        let d_kv = parse::at_least("d_kv", self.d_kv, 1)?;
        let d_ff = parse::at_least("d_ff", self.d_ff, 1)?;
        let layers = parse::in_range("num_layers", self.num_layers, 1, parse::MAX_LAYERS)?;
        let heads = parse::at_least("num_heads", self.num_heads, 1)?;
        let buckets = parse::in_range("relative_attention_num_buckets", self.relative_attention_num_buckets, 4, parse::MAX_TENSOR_ELEMENTS as usize)?;
        if self.relative_attention_max_distance < buckets / 4 {
            return Err(format!(
                "`relative_attention_max_distance` = {} must be at least `relative_attention_num_buckets` / 4 = {}",
                self.relative_attention_max_distance,
                buckets / 4
            ));
        }
        parse::finite("layer_norm_epsilon", self.layer_norm_epsilon, 0.0, false)?;
        let inner = heads.checked_mul(d_kv).ok_or_else(|| format!("`num_heads` · `d_kv` = {heads} · {d_kv} is too large"))?;
        let emb = parse::elements("the token embedding", &[("vocab_size", vocab), ("d_model", d)])?;
        parse::elements("the relative attention bias", &[("relative_attention_num_buckets", buckets), ("num_heads", heads)])?;
        let attn = parse::elements("an attention projection", &[("d_model", d), ("d_kv · num_heads", inner)])?;
        let ff = parse::elements("a feed-forward layer", &[("d_model", d), ("d_ff", d_ff)])?;
        let per_layer = attn.saturating_mul(4).saturating_add(ff.saturating_mul(3));
        parse::total_elements(&[("vocab_size", emb), ("num_layers", per_layer.saturating_mul(layers as u64))])?;
        Ok(())
    }
}

/// transformers `T5Attention._relative_position_bucket` for the encoder (bidirectional):
/// half the buckets per direction, exact below `num_buckets / 4`, logarithmic up to
/// `max_distance`. The logarithmic part is computed in f32 as torch does (`.float()`, then
/// truncation), so the bucket edges are the reference's.
pub fn relative_position_bucket(relative_position: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let offset = if relative_position > 0 { half } else { 0 };
    let n = relative_position.unsigned_abs() as usize;
    let max_exact = half / 2;
    if n < max_exact {
        return offset + n;
    }
    // torch: max_exact + (log(n.float() / max_exact) / math.log(max_distance / max_exact) * (half − max_exact)).long()
    let denom = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = ((n as f32 / max_exact as f32).ln() / denom * (half - max_exact) as f32) as usize;
    offset + (max_exact + large).min(half - 1)
}

/// `T5LayerNorm`: `weight · x / √(mean(x²) + eps)` (RMS, no mean subtraction, no bias).
#[derive(Module, Debug)]
pub struct T5LayerNorm<B: Backend> {
    /// `[d_model]`.
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> T5LayerNorm<B> {
    fn new(d: usize, eps: f64, device: &B::Device) -> Self {
        Self { weight: Param::from_tensor(Tensor::ones([d], device)), eps }
    }

    /// `[b, l, d]` → `[b, l, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let var = x.clone().powi_scalar(2).mean_dim(2);
        x * var.add_scalar(self.eps).sqrt().recip() * self.weight.val().unsqueeze::<3>()
    }
}

/// `T5DenseGatedActDense` (`wi_0`, `wi_1`, `wo`) or `T5DenseActDense` (`wi`, `wo`), no biases.
#[derive(Module, Debug)]
pub struct T5DenseActDense<B: Backend> {
    pub wi: Option<Linear<B>>,
    pub wi_0: Option<Linear<B>>,
    pub wi_1: Option<Linear<B>>,
    pub wo: Linear<B>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: Backend> T5DenseActDense<B> {
    /// `[b, l, d_model]` → `[b, l, d_model]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = match (&self.wi, &self.wi_0, &self.wi_1) {
            (_, Some(w0), Some(w1)) => self.act.forward(linear(w0, x.clone())) * linear(w1, x),
            (Some(wi), _, _) => self.act.forward(linear(wi, x)),
            _ => unreachable!("T5DenseActDense is built with wi or with wi_0 and wi_1"),
        };
        linear(&self.wo, h)
    }
}

/// One `T5Block` of the encoder: `layer.0` (norm + self-attention) and `layer.1` (norm + FFN).
#[derive(Module, Debug)]
pub struct T5Block<B: Backend> {
    pub layer_norm_attn: T5LayerNorm<B>,
    /// q, k, v, o without biases (the shared block; adapters could attach here).
    pub attention: Attention<B>,
    pub layer_norm_ff: T5LayerNorm<B>,
    pub ff: T5DenseActDense<B>,
}

impl<B: Backend> T5Block<B> {
    /// `x [b, l, d]` with the position bias `[1, heads, l, l]`.
    pub fn forward(&self, x: Tensor<B, 3>, position_bias: Tensor<B, 4>) -> Tensor<B, 3> {
        let a = &self.attention;
        let (q, k, v) = a.qkv(self.layer_norm_attn.forward(x.clone()));
        let (q, k, v) = (a.split_heads(q), a.split_heads(k), a.split_heads(v));
        // T5 does not scale the scores (the 1/√d_kv is folded into the initialisation of q):
        // q·√d_kv cancels sdpa's 1/√d_kv — exactly for d_kv a power of 4 (T5-XXL: 64), and on
        // every backend (a custom `scale` option is not honoured by all fused kernels)
        let d_kv = q.dims()[3] as f64;
        let o = sdpa(q.mul_scalar(d_kv.sqrt()), k, v, None, Some(position_bias));
        let x = x + a.output(o);
        x.clone() + self.ff.forward(self.layer_norm_ff.forward(x))
    }
}

/// transformers `T5EncoderModel`.
#[derive(Module, Debug)]
pub struct T5EncoderModel<B: Backend> {
    /// Token embedding `[vocab_size, d_model]`.
    pub shared: Embedding<B>,
    /// The first block's `relative_attention_bias` `[num_buckets, num_heads]`, used by every block.
    pub relative_attention_bias: Param<Tensor<B, 2>>,
    pub block: Vec<T5Block<B>>,
    pub final_layer_norm: T5LayerNorm<B>,
    pub num_buckets: usize,
    pub max_distance: usize,
}

impl<B: Backend> T5EncoderModel<B> {
    /// A model with random weights of the given shape (to be overwritten by a checkpoint).
    pub fn new(c: &T5Config, device: &B::Device) -> Result<Self> {
        let (gated, act) = c.feed_forward().map_err(Sd3Error::Input)?;
        let inner = c.num_heads * c.d_kv;
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let block = (0..c.num_layers)
            .map(|_| {
                let mut attention = AttentionConfig::new(c.d_model, c.num_heads).with_inner_dim(Some(inner)).with_qkv_bias(false).init(device);
                attention.o = Some(LoraLinear::new(lin(inner, c.d_model)));
                T5Block {
                    layer_norm_attn: T5LayerNorm::new(c.d_model, c.layer_norm_epsilon, device),
                    attention,
                    layer_norm_ff: T5LayerNorm::new(c.d_model, c.layer_norm_epsilon, device),
                    ff: T5DenseActDense {
                        wi: (!gated).then(|| lin(c.d_model, c.d_ff)),
                        wi_0: gated.then(|| lin(c.d_model, c.d_ff)),
                        wi_1: gated.then(|| lin(c.d_model, c.d_ff)),
                        wo: lin(c.d_ff, c.d_model),
                        act,
                    },
                }
            })
            .collect();
        Ok(Self {
            shared: EmbeddingConfig::new(c.vocab_size, c.d_model).init(device),
            relative_attention_bias: Param::from_tensor(Tensor::zeros([c.relative_attention_num_buckets, c.num_heads], device)),
            block,
            final_layer_norm: T5LayerNorm::new(c.d_model, c.layer_norm_epsilon, device),
            num_buckets: c.relative_attention_num_buckets,
            max_distance: c.relative_attention_max_distance,
        })
    }

    /// Vocabulary size of the embedding.
    pub fn vocab_size(&self) -> usize {
        self.shared.weight.dims()[0]
    }

    /// Width of the output.
    pub fn d_model(&self) -> usize {
        self.shared.weight.dims()[1]
    }

    /// `compute_bias(l, l)`: the relative position bias `[1, heads, l, l]`.
    pub fn position_bias(&self, l: usize, device: &B::Device) -> Tensor<B, 4> {
        let buckets: Vec<i64> = (0..l as i64)
            .flat_map(|i| (0..l as i64).map(move |j| (i, j)))
            .map(|(i, j)| relative_position_bucket(j - i, self.num_buckets, self.max_distance) as i64)
            .collect();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(buckets, [l * l]), device);
        let heads = self.relative_attention_bias.dims()[1];
        f32(self.relative_attention_bias.val().select(0, idx)).reshape([l, l, heads]).permute([2, 0, 1]).unsqueeze_dim(0)
    }

    /// `last_hidden_state [b, l, d_model]` for token ids `[b, l]` (every id below `vocab_size`).
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.forward_traced(input_ids).0
    }

    /// [`T5EncoderModel::forward`] with the output of each block (before the final norm).
    pub fn forward_traced(&self, input_ids: Tensor<B, 2, Int>) -> (Tensor<B, 3>, Vec<Tensor<B, 3>>) {
        let l = input_ids.dims()[1];
        let mut x = embedding(&self.shared, input_ids);
        let bias = self.position_bias(l, &x.device());
        let mut trace = Vec::with_capacity(self.block.len());
        for block in &self.block {
            x = block.forward(x, bias.clone());
            trace.push(x.clone());
        }
        (self.final_layer_norm.forward(x), trace)
    }
}

const RULES: &[(&str, &str)] = &[
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v)\.weight$", "block.$1.attention.qkv.Separate.$2.base.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.o\.weight$", "block.$1.attention.o.base.weight"),
    (r"^encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$", "relative_attention_bias"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$", "block.$1.layer_norm_attn.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight$", "block.$1.ff.$2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$", "block.$1.layer_norm_ff.weight"),
    (r"^encoder\.final_layer_norm\.weight$", "final_layer_norm.weight"),
];

/// transformers `T5EncoderModel` keys → Burn paths. `shared.weight` maps by name; Linear
/// weights are transposed by the PyTorch adapter.
pub const KEY_TABLE: KeyTable = KeyTable {
    rules: &[RULES],
    // the encoder's copy of the tied embedding (`shared.weight` is loaded)
    ignore: &[r"^encoder\.embed_tokens\.weight$"],
    by_hand: &[],
};

/// [`KEY_TABLE`] for checkpoints that hold the tied embedding only as `encoder.embed_tokens.weight`.
pub const KEY_TABLE_EMBED_TOKENS: KeyTable = KeyTable { rules: &[RULES, &[(r"^encoder\.embed_tokens\.weight$", "shared.weight")]], ignore: &[], by_hand: &[] };

/// The tensor names of a checkpoint directory: `model.safetensors`'s header, or the
/// `weight_map` of `model.safetensors.index.json` (absent files: an empty list; the load names them).
fn checkpoint_keys(dir: &Path) -> Result<Vec<String>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(lora_runtime::weights::tensor_names(&single)?);
    }
    let index = dir.join("model.safetensors.index.json");
    let Ok(text) = std::fs::read_to_string(&index) else { return Ok(Vec::new()) };
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let v: Index = parse::json(&text).map_err(|message| Sd3Error::Config { path: index.clone(), message })?;
    Ok(v.weight_map.into_keys().collect())
}

/// Loads a `T5EncoderModel` directory (`config.json` + `model.safetensors` or the sharded
/// `model.safetensors.index.json`), e.g. SD3's `text_encoder_3/`. Half-precision weights are
/// cast to f32.
pub fn load_t5<B: Backend>(dir: &Path, device: &B::Device) -> Result<(T5EncoderModel<B>, T5Config)> {
    let config = T5Config::from_json_file(&dir.join("config.json"))?;
    let model = T5EncoderModel::new(&config, device)?;
    let keys = checkpoint_keys(dir)?;
    let has = |k: &str| keys.iter().any(|n| n == k);
    let table = if !has("shared.weight") && has("encoder.embed_tokens.weight") { &KEY_TABLE_EMBED_TOKENS } else { &KEY_TABLE };
    Ok((load_safetensors_dir(model, dir, "model", table)?, config))
}
