//! The T5 tokenizer of SD3's `tokenizer_3/tokenizer.json` (transformers `T5Tokenizer`, backed by
//! HF tokenizers): added tokens split out first, then the normalizer (`Precompiled` SentencePiece
//! charsmap, `Replace`, `Strip`, `Lowercase`, `Sequence`), the pre-tokenizer (`WhitespaceSplit`,
//! `Metaspace`, `Sequence`), the `Unigram` model (Viterbi over the piece scores, unknown characters
//! fused into one `<unk>`, optional byte fallback) and the `TemplateProcessing` post-processor
//! (`$A </s>`); `tokenize` truncates and pads as `tokenizer(text, padding="max_length",
//! max_length=n, truncation=True)`. Like transformers 5.24's `T5Tokenizer` (what diffusers
//! calls), [`T5Tokenizer::from_dir`] takes only the vocabulary, the charsmap and the added
//! tokens from a T5 `tokenizer.json` and builds the rest of the pipeline itself;
//! [`T5Tokenizer::from_json`] follows the file's own pipeline (HF tokenizers' `from_file`).
//!
//! Ported instead of using the `tokenizers` crate: that crate turns on features of `ahash`,
//! `regex-automata` and `aho-corasick` that Burn's crates use, and its charsmap reader
//! `spm_precompiled` brings `unicode-segmentation` in as a target dependency (today only a
//! proc-macro dependency of Burn's), either of which rebuilds the whole Burn stack. So the
//! charsmap's double-array trie is read here, and grapheme clusters are approximated (a
//! character plus following combining marks, variation selectors, emoji modifiers, ZWJ
//! sequences; CR LF): exact for text without other multi-character clusters (e.g. Indic spacing
//! marks, Hangul jamo sequences), where the charsmap lookup of a whole cluster could differ.
//! Upstream: tokenizers v0.22.2 `models/unigram/model.rs` (`encode_optimized`),
//! `normalizers/precompiled.rs` and spm_precompiled 0.1.4 (`DoubleArray`, `normalize_string`),
//! `pre_tokenizers/{metaspace,whitespace}.rs`,
//! `tokenizer/added_vocabulary.rs`, `processors/template.rs`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Result, Sd3Error};

/// `K_UNK_PENALTY` of the Unigram model: an unknown character scores `min_score − 10`.
const UNK_PENALTY: f64 = 10.0;

enum Normalizer {
    Precompiled(Box<Charsmap>),
    Replace(regex::Regex, String),
    Strip { left: bool, right: bool },
    Lowercase,
}

enum PreTokenizer {
    WhitespaceSplit,
    /// Replacement character, prepend scheme (`always`, `first`, `never`), split.
    Metaspace(char, String, bool),
}

struct AddedToken {
    content: String,
    id: u32,
    normalized: bool,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

/// A Unigram tokenizer read from a `tokenizer.json`.
pub struct T5Tokenizer {
    path: PathBuf,
    normalizers: Vec<Normalizer>,
    pre_tokenizers: Vec<PreTokenizer>,
    pieces: HashMap<String, u32>,
    scores: Vec<f64>,
    max_piece_len: usize,
    min_score: f64,
    unk_id: Option<u32>,
    byte_fallback: bool,
    added: Vec<AddedToken>,
    /// The single-sequence template: `None` = the sequence, `Some(id)` = a special token.
    template: Vec<Option<u32>>,
    /// Id of the padding token.
    pub pad_id: u32,
}

fn config_err(path: &Path, message: impl Into<String>) -> Sd3Error {
    Sd3Error::Config { path: path.into(), message: message.into() }
}

impl T5Tokenizer {
    /// Reads `dir/tokenizer.json` and `dir/tokenizer_config.json` as transformers 5.24's
    /// `AutoTokenizer` does. For `tokenizer_class` `T5Tokenizer` (or no config), that class
    /// rebuilds the pipeline and takes only the vocabulary, the first `Precompiled` charsmap and
    /// the added tokens from the file: unk id 2, no byte fallback, `WhitespaceSplit` +
    /// `Metaspace(prepend_scheme="always")`, `$A </s>` — whatever else the file says (see
    /// [`T5Tokenizer::from_json_t5`]). Other classes use the file's pipeline
    /// ([`T5Tokenizer::from_json`]). The pad token (default `<pad>`) and eos token (default
    /// `</s>`) come from the config. Errors name the file and the component.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Sd3Error::Io { path: path.clone(), source: e })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| config_err(&path, e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| config_err(&cfg_path, e.to_string()))?,
            Err(_) => Value::Null,
        };
        let token = |key: &str, default: &str| match &cfg[key] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o.get("content").and_then(Value::as_str).unwrap_or(default).to_string(),
            _ => default.to_string(),
        };
        let mut tok = match cfg["tokenizer_class"].as_str() {
            None | Some("T5Tokenizer" | "T5TokenizerFast") => Self::from_json_t5(&json, &path, &token("eos_token", "</s>"))?,
            Some(_) => Self::from_json(&json, &path)?,
        };
        let pad = token("pad_token", "<pad>");
        tok.pad_id = tok.token_id(&pad).ok_or_else(|| config_err(&path, format!("pad token {pad:?} is not in the vocabulary")))?;
        Ok(tok)
    }

    /// transformers 5.24 `T5Tokenizer.__init__` on a `tokenizer.json`: its Unigram vocabulary,
    /// added tokens and first `Precompiled` normalizer (other normalizers, the pre-tokenizer and
    /// the post-processor of the file are not used), unk id 2, `WhitespaceSplit` +
    /// `Metaspace("▁", always, split)`, template `$A eos`.
    pub fn from_json_t5(json: &Value, path: &Path, eos: &str) -> Result<Self> {
        let err = |m: String| config_err(path, m);
        let mut tok = Self::from_parts(json, path, false)?;
        let mut normalizers: Vec<&Value> = vec![&json["normalizer"]];
        if json["normalizer"]["type"] == "Sequence" {
            normalizers = json["normalizer"]["normalizers"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
        }
        if let Some(p) = normalizers.into_iter().find(|n| n["type"] == "Precompiled") {
            parse_normalizer(p, &mut tok.normalizers, &err)?;
        }
        tok.pre_tokenizers = vec![PreTokenizer::WhitespaceSplit, PreTokenizer::Metaspace('▁', "always".into(), true)];
        if tok.scores.len() <= 2 {
            return Err(err(format!("T5Tokenizer needs unk id 2, but the vocabulary has {} pieces", tok.scores.len())));
        }
        (tok.unk_id, tok.byte_fallback) = (Some(2), false);
        let eos_id = tok.token_id(eos).ok_or_else(|| err(format!("eos token {eos:?} is not in the vocabulary")))?;
        tok.template = vec![None, Some(eos_id)];
        Ok(tok)
    }

    /// Builds the tokenizer from a parsed `tokenizer.json` with the file's own pipeline (HF
    /// tokenizers' `Tokenizer.from_file`); `path` for error messages.
    pub fn from_json(json: &Value, path: &Path) -> Result<Self> {
        Self::from_parts(json, path, true)
    }

    fn from_parts(json: &Value, path: &Path, pipeline: bool) -> Result<Self> {
        let err = |m: String| config_err(path, m);
        let model = &json["model"];
        if model["type"] != "Unigram" {
            return Err(err(format!("model type {} is not supported (Unigram only)", model["type"])));
        }
        let vocab = model["vocab"].as_array().ok_or_else(|| err("model.vocab is not a list".into()))?;
        let mut pieces = HashMap::with_capacity(vocab.len());
        let mut scores = Vec::with_capacity(vocab.len());
        for (id, entry) in vocab.iter().enumerate() {
            let (Some(piece), Some(score)) = (entry[0].as_str(), entry[1].as_f64()) else {
                return Err(err(format!("model.vocab[{id}] is not [piece, score]")));
            };
            pieces.insert(piece.to_string(), id as u32);
            scores.push(score);
        }
        let unk_id = model["unk_id"].as_u64().map(|u| u as u32);
        if unk_id.is_some_and(|u| u as usize >= scores.len()) {
            return Err(err(format!("model.unk_id {unk_id:?} is outside the vocabulary of {}", scores.len())));
        }
        let (mut normalizers, mut pre_tokenizers) = (Vec::new(), Vec::new());
        if pipeline {
            parse_normalizer(&json["normalizer"], &mut normalizers, &err)?;
            parse_pre_tokenizer(&json["pre_tokenizer"], &mut pre_tokenizers, &err)?;
        }
        let added = json["added_tokens"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|t| {
                let flag = |k: &str| t[k].as_bool().unwrap_or(false);
                Ok(AddedToken {
                    content: t["content"].as_str().ok_or_else(|| err(format!("added token without content: {t}")))?.to_string(),
                    id: t["id"].as_u64().ok_or_else(|| err(format!("added token without id: {t}")))? as u32,
                    normalized: flag("normalized"),
                    lstrip: flag("lstrip"),
                    rstrip: flag("rstrip"),
                    single_word: flag("single_word"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut tok = Self {
            path: path.into(),
            normalizers,
            pre_tokenizers,
            max_piece_len: pieces.keys().map(String::len).max().unwrap_or(0),
            min_score: scores.iter().copied().fold(f64::INFINITY, f64::min),
            pieces,
            scores,
            unk_id,
            byte_fallback: model["byte_fallback"].as_bool().unwrap_or(false),
            added,
            template: vec![None],
            pad_id: 0,
        };
        if pipeline {
            tok.template = tok.parse_template(&json["post_processor"])?;
        }
        Ok(tok)
    }

    /// The id of a token (added tokens first, then the model's pieces).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.added.iter().find(|a| a.content == token).map(|a| a.id).or_else(|| self.pieces.get(token).copied())
    }

    fn parse_template(&self, pp: &Value) -> Result<Vec<Option<u32>>> {
        let err = |m: String| config_err(&self.path, m);
        match pp["type"].as_str() {
            None => Ok(vec![None]),
            Some("TemplateProcessing") => {
                let single = pp["single"].as_array().ok_or_else(|| err("post_processor.single is not a list".into()))?;
                single
                    .iter()
                    .map(|piece| {
                        if piece.get("Sequence").is_some() {
                            Ok(None)
                        } else if let Some(name) = piece["SpecialToken"]["id"].as_str() {
                            let ids = pp["special_tokens"][name]["ids"].as_array();
                            match ids.map(|v| v.as_slice()) {
                                Some([id]) => id.as_u64().map(|i| Some(i as u32)).ok_or_else(|| err(format!("special token {name:?}: bad id"))),
                                _ => self.token_id(name).map(Some).ok_or_else(|| err(format!("special token {name:?} has no single id"))),
                            }
                        } else {
                            Err(err(format!("post_processor.single entry {piece} is not supported")))
                        }
                    })
                    .collect()
            }
            Some(other) => Err(err(format!("post_processor {other:?} is not supported (TemplateProcessing only)"))),
        }
    }

    /// Splits `text` into `(segment, Some(added id) | None)` on the added tokens that match with
    /// `normalized == want_normalized` (leftmost-longest, as tokenizers' AddedVocabulary).
    fn split_added<'a>(&self, text: &'a str, want_normalized: bool) -> Vec<(&'a str, Option<u32>)> {
        let tokens: Vec<&AddedToken> = self.added.iter().filter(|a| a.normalized == want_normalized && !a.content.is_empty()).collect();
        let mut out = Vec::new();
        let (mut start, mut pos) = (0, 0);
        while pos < text.len() {
            let rest = &text[pos..];
            let word_char = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            let best = tokens
                .iter()
                .filter(|a| rest.starts_with(a.content.as_str()))
                .filter(|a| !a.single_word || (!word_char(text[..pos].chars().next_back()) && !word_char(text[pos + a.content.len()..].chars().next())))
                .max_by_key(|a| a.content.len());
            match best {
                Some(a) => {
                    let mut s = pos;
                    if a.lstrip {
                        s = text[start..pos].trim_end().len() + start;
                    }
                    let mut e = pos + a.content.len();
                    if a.rstrip {
                        e = text.len() - text[e..].trim_start().len();
                    }
                    if s > start {
                        out.push((&text[start..s], None));
                    }
                    out.push((&text[s..e], Some(a.id)));
                    (start, pos) = (e, e);
                }
                None => pos += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        if start < text.len() {
            out.push((&text[start..], None));
        }
        out
    }

    fn normalize(&self, text: &str) -> String {
        let mut s = text.to_string();
        for n in &self.normalizers {
            s = match n {
                Normalizer::Precompiled(p) => p.normalize_string(&s),
                Normalizer::Replace(re, to) => re.replace_all(&s, regex::NoExpand(to)).into_owned(),
                Normalizer::Strip { left, right } => {
                    let t = if *left { s.trim_start() } else { &s };
                    (if *right { t.trim_end() } else { t }).to_string()
                }
                Normalizer::Lowercase => s.to_lowercase(),
            };
        }
        s
    }

    /// Pre-tokenizes one normalized segment; `first` = the segment starts the input text.
    fn pre_tokenize(&self, text: String, first: bool) -> Vec<String> {
        let mut words = vec![(text, first)];
        for p in &self.pre_tokenizers {
            words = match p {
                PreTokenizer::WhitespaceSplit => words
                    .into_iter()
                    .flat_map(|(w, f)| {
                        let starts_at_0 = f && !w.starts_with(char::is_whitespace);
                        w.split_whitespace().enumerate().map(|(i, s)| (s.to_string(), starts_at_0 && i == 0)).collect::<Vec<_>>()
                    })
                    .collect(),
                PreTokenizer::Metaspace(rep, scheme, split) => words
                    .into_iter()
                    .flat_map(|(w, f)| {
                        let mut w = w.replace(' ', &rep.to_string());
                        let prepend = match scheme.as_str() {
                            "always" => true,
                            "first" => f,
                            _ => false,
                        };
                        if prepend && !w.starts_with(*rep) {
                            w.insert(0, *rep);
                        }
                        if !split {
                            return vec![(w, f)];
                        }
                        // MergedWithNext: each replacement character starts a new piece
                        let mut parts: Vec<(String, bool)> = Vec::new();
                        for (i, c) in w.char_indices() {
                            if c == *rep && i > 0 || parts.is_empty() {
                                parts.push((String::new(), f && parts.is_empty()));
                            }
                            if let Some(p) = parts.last_mut() {
                                p.0.push(c);
                            }
                        }
                        parts
                    })
                    .collect(),
            };
        }
        words.into_iter().map(|(w, _)| w).filter(|w| !w.is_empty()).collect()
    }

    /// Unigram `encode_optimized`: the best-scoring segmentation of `word`, unknown runs fused.
    fn unigram(&self, word: &str, out: &mut Vec<u32>) -> Result<()> {
        struct Node {
            id: Option<u32>,
            score: f64,
            start: Option<usize>,
        }
        let n = word.len();
        let unk_score = self.min_score - UNK_PENALTY;
        let mut best: Vec<Node> = (0..=n).map(|_| Node { id: None, score: 0.0, start: None }).collect();
        let mut start = 0;
        while start < n {
            let here = best[start].score;
            let mblen = word[start..].chars().next().map_or(1, char::len_utf8);
            let mut single = false;
            let mut end = start;
            for c in word[start..].chars() {
                end += c.len_utf8();
                if end - start > self.max_piece_len {
                    break;
                }
                if let Some(&id) = self.pieces.get(&word[start..end]) {
                    let cand = self.scores[id as usize] + here;
                    let node = &mut best[end];
                    if node.start.is_none() || cand > node.score {
                        *node = Node { id: Some(id), score: cand, start: Some(start) };
                    }
                    single |= end - start == mblen;
                }
            }
            if !single {
                let node = &mut best[start + mblen];
                let cand = unk_score + here;
                if node.start.is_none() || cand > node.score {
                    *node = Node { id: None, score: cand, start: Some(start) };
                }
            }
            start += mblen;
        }
        let mut pieces: Vec<(usize, usize, Option<u32>)> = Vec::new();
        let mut end = n;
        while end > 0 {
            let node = &best[end];
            let s = node.start.unwrap_or(0);
            match (node.id, pieces.last_mut()) {
                // fuse consecutive unknowns
                (None, Some((ps, _, None))) => *ps = s,
                _ => pieces.push((s, end, node.id)),
            }
            end = s;
        }
        for (s, e, id) in pieces.into_iter().rev() {
            match id {
                Some(id) => out.push(id),
                None => {
                    let bytes: Option<Vec<u32>> =
                        if self.byte_fallback { word[s..e].bytes().map(|b| self.pieces.get(&format!("<0x{b:02X}>")).copied()).collect() } else { None };
                    match (bytes, self.unk_id) {
                        (Some(b), _) => out.extend(b),
                        (None, Some(u)) => out.push(u),
                        (None, None) => {
                            return Err(config_err(&self.path, format!("{:?} is not in the vocabulary and the model has no unk_id", &word[s..e])));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Token ids of `text` without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut at_start = true;
        for (seg, id) in self.split_added(text, false) {
            if let Some(id) = id {
                ids.push(id);
                at_start = false;
                continue;
            }
            let normalized = self.normalize(seg);
            for (part, id) in self.split_added(&normalized, true) {
                match id {
                    Some(id) => ids.push(id),
                    None => {
                        for word in self.pre_tokenize(part.to_string(), at_start) {
                            self.unigram(&word, &mut ids)?;
                        }
                    }
                }
                at_start = false;
            }
        }
        Ok(ids)
    }

    /// `tokenizer(text, padding="max_length", max_length, truncation=True)`: the text's ids cut
    /// so that they and the template's special tokens (`</s>`) fit, then padded with `pad_id`.
    pub fn tokenize(&self, text: &str, max_length: usize) -> Result<Vec<u32>> {
        let mut content = self.encode(text)?;
        let specials = self.template.iter().filter(|t| t.is_some()).count();
        content.truncate(max_length.saturating_sub(specials));
        let mut ids: Vec<u32> = Vec::with_capacity(max_length);
        for t in &self.template {
            match t {
                Some(id) => ids.push(*id),
                None => ids.extend(&content),
            }
        }
        ids.truncate(max_length);
        ids.resize(max_length, self.pad_id);
        Ok(ids)
    }
}

fn parse_normalizer(v: &Value, out: &mut Vec<Normalizer>, err: &dyn Fn(String) -> Sd3Error) -> Result<()> {
    match v["type"].as_str() {
        None => {}
        Some("Sequence") => {
            for n in v["normalizers"].as_array().map(|a| a.as_slice()).unwrap_or_default() {
                parse_normalizer(n, out, err)?;
            }
        }
        Some("Precompiled") => {
            let b64 = v["precompiled_charsmap"].as_str().unwrap_or_default();
            if !b64.is_empty() {
                let bytes = base64_decode(b64).ok_or_else(|| err("normalizer: precompiled_charsmap is not base64".into()))?;
                let p = Charsmap::parse(&bytes).ok_or_else(|| err("normalizer: precompiled_charsmap is malformed".into()))?;
                out.push(Normalizer::Precompiled(Box::new(p)));
            }
        }
        Some("Replace") => {
            let pattern = match (v["pattern"]["String"].as_str(), v["pattern"]["Regex"].as_str()) {
                (Some(s), _) => regex::escape(s),
                (None, Some(r)) => r.to_string(),
                _ => return Err(err(format!("normalizer Replace: bad pattern {}", v["pattern"]))),
            };
            let re = regex::Regex::new(&pattern).map_err(|e| err(format!("normalizer Replace: pattern {pattern:?}: {e}")))?;
            out.push(Normalizer::Replace(re, v["content"].as_str().unwrap_or_default().to_string()));
        }
        Some("Strip") => out.push(Normalizer::Strip { left: v["strip_left"].as_bool().unwrap_or(false), right: v["strip_right"].as_bool().unwrap_or(false) }),
        Some("Lowercase") => out.push(Normalizer::Lowercase),
        Some(other) => return Err(err(format!("normalizer {other:?} is not supported (Precompiled, Replace, Strip, Lowercase, Sequence)"))),
    }
    Ok(())
}

fn parse_pre_tokenizer(v: &Value, out: &mut Vec<PreTokenizer>, err: &dyn Fn(String) -> Sd3Error) -> Result<()> {
    match v["type"].as_str() {
        None => {}
        Some("Sequence") => {
            for p in v["pretokenizers"].as_array().map(|a| a.as_slice()).unwrap_or_default() {
                parse_pre_tokenizer(p, out, err)?;
            }
        }
        Some("WhitespaceSplit") => out.push(PreTokenizer::WhitespaceSplit),
        Some("Metaspace") => {
            let rep = v["replacement"].as_str().and_then(|s| s.chars().next()).unwrap_or('▁');
            let scheme = match (v["prepend_scheme"].as_str(), v["add_prefix_space"].as_bool()) {
                (Some(s), _) => s.to_string(),
                (None, Some(false)) => "never".into(),
                (None, _) => "always".into(),
            };
            if !matches!(scheme.as_str(), "always" | "first" | "never") {
                return Err(err(format!("pre_tokenizer Metaspace: prepend_scheme {scheme:?}")));
            }
            out.push(PreTokenizer::Metaspace(rep, scheme, v["split"].as_bool().unwrap_or(true)));
        }
        Some(other) => return Err(err(format!("pre_tokenizer {other:?} is not supported (WhitespaceSplit, Metaspace, Sequence)"))),
    }
    Ok(())
}

/// Standard base64 (with or without padding).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for &c in s.as_bytes().iter().filter(|c| !c.is_ascii_whitespace() && **c != b'=') {
        acc = (acc << 6) | val(c)? as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// SentencePiece's precompiled normalization map: a little-endian u32 trie size, the darts
/// double-array trie (u32 units) over UTF-8 keys, then the NUL-separated replacement strings.
struct Charsmap {
    array: Vec<u32>,
    normalized: Vec<u8>,
}

impl Charsmap {
    fn parse(bytes: &[u8]) -> Option<Self> {
        let size = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize / 4 * 4;
        let trie = bytes.get(4..4 + size)?;
        let array = trie.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let normalized = bytes[4 + size..].to_vec();
        std::str::from_utf8(&normalized).ok()?;
        Some(Self { array, normalized })
    }

    /// darts `commonPrefixSearch`: the values of every key that is a prefix of `key`, shortest first.
    fn common_prefix_search(&self, key: &[u8]) -> Vec<usize> {
        let offset = |u: u32| ((u >> 10) << ((u & (1 << 9)) >> 6)) as usize;
        let label = |u: u32| (u & ((1 << 31) | 0xFF)) as usize;
        let has_leaf = |u: u32| (u >> 8) & 1 == 1;
        let value = |u: u32| (u & ((1 << 31) - 1)) as usize;
        let mut results = Vec::new();
        let Some(&root) = self.array.first() else { return results };
        let mut pos = offset(root);
        for &c in key {
            if c == 0 {
                break;
            }
            pos ^= c as usize;
            let Some(&unit) = self.array.get(pos) else { return results };
            if label(unit) != c as usize {
                return results;
            }
            pos ^= offset(unit);
            if has_leaf(unit) {
                match self.array.get(pos) {
                    Some(&leaf) => results.push(value(leaf)),
                    None => return results,
                }
            }
        }
        results
    }

    /// The replacement of the shortest key that prefixes `chunk` (spm_precompiled's `transform`).
    fn transform(&self, chunk: &str) -> Option<&str> {
        let start = *self.common_prefix_search(chunk.as_bytes()).first()?;
        let rest = self.normalized.get(start..)?;
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).ok()
    }

    /// `normalize_string`: each grapheme cluster under 6 bytes is looked up whole, else (or if
    /// absent) each of its characters.
    fn normalize_string(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for g in graphemes(text) {
            if g.len() < 6
                && let Some(n) = self.transform(g)
            {
                out.push_str(n);
                continue;
            }
            for (i, c) in g.char_indices() {
                match self.transform(&g[i..i + c.len_utf8()]) {
                    Some(n) => out.push_str(n),
                    None => out.push(c),
                }
            }
        }
        out
    }
}

/// Characters that extend the preceding grapheme cluster in the approximation (combining
/// diacritical marks, variation selectors, emoji modifiers, tag characters, ZWJ).
fn extends(c: char) -> bool {
    matches!(c as u32,
        0x0300..=0x036F | 0x1AB0..=0x1AFF | 0x1DC0..=0x1DFF | 0x20D0..=0x20FF | 0xFE20..=0xFE2F
        | 0xFE00..=0xFE0F | 0xE0100..=0xE01EF | 0x1F3FB..=0x1F3FF | 0xE0020..=0xE007F | 0x200D
        | 0x3099..=0x309A)
}

/// Approximate extended grapheme clusters of `text` (see the module doc).
fn graphemes(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        let mut end = start + c.len_utf8();
        let mut prev = c;
        while let Some(&(i, n)) = chars.peek() {
            let joins = (prev == '\r' && n == '\n') || extends(n) || prev == '\u{200D}';
            if !joins {
                break;
            }
            end = i + n.len_utf8();
            prev = n;
            chars.next();
        }
        out.push(&text[start..end]);
    }
    out
}
