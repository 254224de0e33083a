//! Shared by the integration tests: the tiny CLIP in HF layout, the binary, paths.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;

use clip_cls::tokenizer::ClipTokenizer;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The tiny CLIP (vocab 1000, eos 999) plus a matching tokenizer: the 512 byte tokens, the
/// first 486 merges of the real CLIP vocabulary, start/end at 998/999.
pub fn tiny_model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("clip-tiny").join(f), dir.path().join(f)).unwrap();
    }
    let gz = std::fs::read(fixtures().join("clip-tokenizer/bpe_simple_vocab_16e6.txt.gz")).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
    let merges: Vec<&str> = text.lines().skip(1).take(486).collect();
    // byte tokens in GPT-2 order, as the full vocabulary numbers them
    let full = ClipTokenizer::from_open_clip_vocab(&fixtures().join("clip-tokenizer/bpe_simple_vocab_16e6.txt.gz")).unwrap();
    let mut vocab: Vec<String> = full.vocab_prefix(512);
    vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
    vocab.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
    let map: serde_json::Map<String, serde_json::Value> = vocab.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::json!(i))).collect();
    std::fs::write(dir.path().join("vocab.json"), serde_json::to_string(&map).unwrap()).unwrap();
    std::fs::write(dir.path().join("merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n"))).unwrap();
    dir
}

pub fn images() -> Vec<PathBuf> {
    ["rgb_61x47.png", "rgb_40x90.png", "gray_33x33.png", "rgba_50x30.png"].map(|f| fixtures().join("clip-images").join(f)).to_vec()
}

pub fn clip(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_clip-cls")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Class colours of the generated dataset (folder names test the `_` → space rule).
pub const COLOURS: [(&str, [u8; 3]); 3] = [("bright_red", [210, 40, 40]), ("grass_green", [40, 190, 60]), ("sky_blue", [50, 70, 220])];

/// A class-per-folder dataset `dir/{train,test}/<class>/NN.png` of noisy colour fields of
/// varying size (deterministic): `train` and `test` images per class.
pub fn colour_dataset(dir: &Path, train: usize, test: usize) {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (split, n) in [("train", train), ("test", test)].into_iter().filter(|(_, n)| *n > 0) {
        for (name, rgb) in COLOURS {
            let class_dir = dir.join(split).join(name);
            std::fs::create_dir_all(&class_dir).unwrap();
            for i in 0..n {
                let (w, h) = (36 + (next() % 30) as u32, 36 + (next() % 30) as u32);
                let img = image::RgbImage::from_fn(w, h, |_, _| image::Rgb(rgb.map(|c| (c as i64 + (next() % 81) as i64 - 40).clamp(0, 255) as u8)));
                img.save(class_dir.join(format!("{i:02}.png"))).unwrap();
            }
        }
    }
}
