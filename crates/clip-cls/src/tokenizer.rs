//! The CLIP byte-level BPE tokenizer, ids identical to open_clip's `SimpleTokenizer` and
//! transformers' `CLIPTokenizer`.
//!
//! Upstream: open_clip `src/open_clip/tokenizer.py` (SimpleTokenizer); transformers
//! `models/clip/tokenization_clip.py`. Reads the vocabulary from an HF model directory
//! (`tokenizer.json`, or `vocab.json` + `merges.txt`) or open_clip's
//! `bpe_simple_vocab_16e6.txt.gz`.
//!
//! Text cleanup as open_clip's `basic_clean` + `whitespace_clean`: the parts of `ftfy.fix_text`
//! that apply to valid Unicode (HTML entities, Latin ligatures, full-width characters, curly
//! quotes, control characters, NFC), `html.unescape` twice, whitespace runs collapsed, lower
//! case. ftfy's mojibake repair (`fix_encoding`: text that was decoded with the wrong codec,
//! "cafÃ©") is not reproduced; such text tokenizes as it is written.
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::error::{ClipError, Result};

/// CLIP's context length.
pub const CONTEXT_LENGTH: usize = 77;
/// Start/end token strings of HF vocabularies (transformers `CLIPTokenizer`).
const HF_SPECIALS: [&str; 2] = ["<|startoftext|>", "<|endoftext|>"];
/// Start/end token strings of open_clip ≥ 2.x (`SimpleTokenizer.special_tokens`); the same ids.
const OPEN_CLIP_SPECIALS: [&str; 2] = ["<start_of_text>", "<end_of_text>"];
/// open_clip keeps the first 49152 − 256 − 2 merges of its vocabulary file.
const OPEN_CLIP_MERGES: usize = 49152 - 256 - 2;

/// The CLIP tokenizer.
#[derive(Debug)]
pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_encoder: [char; 256],
    pat: Regex,
    /// Start and end token strings, recognised when they occur in the text.
    specials: [String; 2],
    sot: u32,
    eot: u32,
    /// Id used for padding: transformers pads with `<|endoftext|>`, open_clip with 0.
    pub pad_id: u32,
    /// A padding token other than the start/end tokens (SD3's second CLIP: `!`): an added token
    /// for transformers, matched in the text before BPE.
    added: Option<(String, u32)>,
    cache: std::sync::Mutex<HashMap<String, Vec<u32>>>,
}

/// GPT-2's byte ↔ printable-character map as `(byte, char)` pairs in the order of its Python
/// dict (printable bytes first): that order numbers open_clip's first 512 vocabulary entries.
fn byte_chars() -> Vec<(u8, char)> {
    let mut bytes: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = bytes.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    bytes.into_iter().zip(chars).map(|(b, c)| (b as u8, char::from_u32(c).unwrap_or('\0'))).collect()
}

/// Byte → printable character.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    for (b, c) in byte_chars() {
        table[b as usize] = c;
    }
    table
}

fn io_err(path: &Path, e: std::io::Error) -> ClipError {
    ClipError::Io { path: path.into(), source: e }
}

fn bad(path: &Path, message: impl Into<String>) -> ClipError {
    ClipError::Config { path: path.into(), message: message.into() }
}

impl ClipTokenizer {
    fn new(vocab: Vec<String>, merges: Vec<(String, String)>, specials: [&str; 2], source: &Path) -> Result<Self> {
        let encoder: HashMap<String, u32> = vocab.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
        let id = |t: &str| encoder.get(t).copied().ok_or_else(|| bad(source, format!("the vocabulary has no `{t}` token")));
        let (sot, eot) = (id(specials[0])?, id(specials[1])?);
        let ranks = merges.into_iter().enumerate().map(|(i, m)| (m, i)).collect();
        let pat = Regex::new(&format!(
            r"(?i){}|{}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex::escape(specials[0]),
            regex::escape(specials[1])
        ))
        .map_err(|e| bad(source, e.to_string()))?;
        Ok(Self {
            encoder,
            ranks,
            byte_encoder: bytes_to_unicode(),
            pat,
            specials: specials.map(String::from),
            added: None,
            sot,
            eot,
            pad_id: eot,
            cache: Default::default(),
        })
    }

    /// open_clip's `bpe_simple_vocab_16e6.txt.gz` (plain or gzip-compressed merges list).
    pub fn from_open_clip_vocab(path: &Path) -> Result<Self> {
        let raw = std::fs::read(path).map_err(|e| io_err(path, e))?;
        let mut text = String::new();
        if raw.starts_with(&[0x1f, 0x8b]) {
            flate2::read::GzDecoder::new(&raw[..]).read_to_string(&mut text).map_err(|e| io_err(path, e))?;
        } else {
            text = String::from_utf8(raw).map_err(|_| bad(path, "not UTF-8 text"))?;
        }
        let merges: Vec<(String, String)> = text
            .lines()
            .skip(1)
            .take(OPEN_CLIP_MERGES)
            .map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(path, "a merges line without two tokens"))?;
        let bytes: Vec<String> = byte_chars().iter().map(|(_, c)| c.to_string()).collect();
        let mut vocab = bytes.clone();
        vocab.extend(bytes.iter().map(|b| format!("{b}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.extend(OPEN_CLIP_SPECIALS.map(String::from));
        Self::new(vocab, merges, OPEN_CLIP_SPECIALS, path)
    }

    /// `vocab.json` (token → id) and `merges.txt` (`#version` header, one "a b" pair a line).
    pub fn from_vocab_merges(vocab_path: &Path, merges_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(vocab_path).map_err(|e| io_err(vocab_path, e))?;
        let map: HashMap<String, u32> = serial_lora::parse::json(&text).map_err(|e| bad(vocab_path, e))?;
        let merges_text = std::fs::read_to_string(merges_path).map_err(|e| io_err(merges_path, e))?;
        let merges = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad(merges_path, "a merges line without two tokens"))?;
        Self::from_map(map, merges, vocab_path)
    }

    /// An HF `tokenizer.json` with a BPE model.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(path, e.to_string()))?;
        let model = &v["model"];
        let map: HashMap<String, u32> = serial_lora::parse::json_value(model["vocab"].clone()).map_err(|e| bad(path, format!("model.vocab: {e}")))?;
        let merges = model["merges"]
            .as_array()
            .ok_or_else(|| bad(path, "model.merges is missing"))?
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                serde_json::Value::Array(p) => Some((p.first()?.as_str()?.to_string(), p.get(1)?.as_str()?.to_string())),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad(path, "model.merges has an entry that is not a pair"))?;
        Self::from_map(map, merges, path)
    }

    fn from_map(map: HashMap<String, u32>, merges: Vec<(String, String)>, source: &Path) -> Result<Self> {
        let mut vocab = vec![String::new(); map.len()];
        for (t, i) in map {
            let slot = vocab.get_mut(i as usize).ok_or_else(|| bad(source, format!("token id {i} of `{t}` is out of range")))?;
            *slot = t;
        }
        Self::new(vocab, merges, HF_SPECIALS, source)
    }

    /// The tokenizer of an HF model directory: `tokenizer.json`, else `vocab.json` + `merges.txt`;
    /// the padding token from `tokenizer_config.json` (SD3's second CLIP pads with `!`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let (v, m) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let mut tok = if json.is_file() {
            Self::from_tokenizer_json(&json)?
        } else if v.is_file() && m.is_file() {
            Self::from_vocab_merges(&v, &m)?
        } else {
            return Err(io_err(&PathBuf::from(dir), std::io::Error::new(std::io::ErrorKind::NotFound, "no tokenizer.json, nor vocab.json + merges.txt")));
        };
        let cfg_path = dir.join("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg_path) {
            let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| ClipError::Config { path: cfg_path.clone(), message: e.to_string() })?;
            let pad = cfg.get("pad_token").and_then(|p| p.as_str().or_else(|| p.get("content").and_then(|c| c.as_str())));
            if let Some(pad) = pad {
                tok.pad_id = *tok
                    .encoder
                    .get(pad)
                    .ok_or_else(|| ClipError::Config { path: cfg_path.clone(), message: format!("pad_token {pad:?} is not in the vocabulary") })?;
                if !tok.specials.iter().any(|s| s == pad) {
                    tok.added = Some((pad.to_string(), tok.pad_id));
                }
            }
        }
        Ok(tok)
    }

    fn bpe(&self, token: &str) -> Vec<u32> {
        if let Some(ids) = self.cache.lock().ok().and_then(|c| c.get(token).cloned()) {
            return ids;
        }
        let chars: Vec<char> = token.chars().collect();
        let mut word: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        while word.len() > 1 {
            let best = word.windows(2).filter_map(|p| self.ranks.get(&(p[0].clone(), p[1].clone())).map(|&r| (r, p[0].clone(), p[1].clone()))).min();
            let Some((_, first, second)) = best else { break };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
        }
        // every byte character and every merge result is in the vocabulary
        let ids: Vec<u32> = word.iter().filter_map(|w| self.encoder.get(w).copied()).collect();
        if let Ok(mut c) = self.cache.lock() {
            c.insert(token.to_string(), ids.clone());
        }
        ids
    }

    /// Text → BPE ids, without start/end tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let text = clean(text);
        if let Some((tok, id)) = &self.added {
            let mut ids = Vec::new();
            for (i, part) in text.split(tok.as_str()).enumerate() {
                if i > 0 {
                    ids.push(*id);
                }
                ids.extend(self.encode_words(part));
            }
            return ids;
        }
        self.encode_words(&text)
    }

    fn encode_words(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for m in self.pat.find_iter(text) {
            let t = m.as_str();
            if t == self.specials[0] || t == self.specials[1] {
                ids.push(if t == self.specials[0] { self.sot } else { self.eot });
                continue;
            }
            let mapped: String = t.bytes().map(|b| self.byte_encoder[b as usize]).collect();
            ids.extend(self.bpe(&mapped));
        }
        ids
    }

    /// `[sot] + encode(text) + [eot]`, truncated to `context` (keeping `eot` last) and padded
    /// with `pad_id`: what transformers (`padding="max_length", truncation=True`) and open_clip
    /// (`pad_id = 0`) feed the text tower.
    pub fn tokenize(&self, text: &str, context: usize) -> Vec<u32> {
        let mut ids = vec![self.sot];
        ids.extend(self.encode(text));
        ids.push(self.eot);
        if ids.len() > context {
            ids.truncate(context);
            ids[context - 1] = self.eot;
        }
        ids.resize(context, self.pad_id);
        ids
    }

    /// The first `n` vocabulary entries in id order (the byte tokens come first).
    pub fn vocab_prefix(&self, n: usize) -> Vec<String> {
        let mut v: Vec<(&String, &u32)> = self.encoder.iter().filter(|e| (*e.1 as usize) < n).collect();
        v.sort_by_key(|e| *e.1);
        v.into_iter().map(|(t, _)| t.clone()).collect()
    }

    pub fn eot_id(&self) -> u32 {
        self.eot
    }
}

/// open_clip's `basic_clean` + `whitespace_clean` + lower case (see the module header).
fn clean(text: &str) -> String {
    let text = html_unescape(&html_unescape(&html_unescape(text)));
    let text: String = text.chars().filter_map(ftfy_char).collect::<String>().nfc().collect();
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// ftfy's per-character fixes: `fix_latin_ligatures`, `fix_character_width`,
/// `uncurl_quotes`, `remove_control_chars` (the line-break and escape-sequence fixes end up as
/// whitespace, which `whitespace_clean` collapses anyway).
fn ftfy_char(c: char) -> Option<String> {
    let s = match c {
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' | 'ﬆ' => "st",
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'Ŀ' => "L·",
        'ŀ' => "l·",
        'ŉ' => "ʼn",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǆ' => "DŽ",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        '\u{2018}' | '\u{2019}' | '\u{201a}' | '\u{201b}' => "'",
        '\u{201c}' | '\u{201d}' | '\u{201e}' | '\u{201f}' => "\"",
        '\u{3000}' => " ",
        // full-width ASCII variants → ASCII
        '\u{ff01}'..='\u{ff5e}' => return char::from_u32(c as u32 - 0xff01 + 0x21).map(String::from),
        // control characters other than whitespace are dropped
        c if c.is_control() && !c.is_whitespace() => return None,
        c => return Some(c.to_string()),
    };
    Some(s.to_string())
}

/// Python's `html.unescape` for the named entities that occur in captions and numeric ones.
fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let re = Regex::new(r"&(#[0-9]+|#[xX][0-9a-fA-F]+|amp|lt|gt|quot|apos|nbsp);?").expect("static regex");
    re.replace_all(s, |c: &regex::Captures| {
        let e = &c[1];
        let ch = match e {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            _ if e.starts_with("#x") || e.starts_with("#X") => u32::from_str_radix(&e[2..], 16).ok().and_then(char::from_u32),
            _ => e[1..].parse().ok().and_then(char::from_u32),
        };
        ch.map_or_else(|| c[0].to_string(), |ch| ch.to_string())
    })
    .into_owned()
}
