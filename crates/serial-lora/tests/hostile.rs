//! The adapter library's part of the hostile-input corpus (the runtime's, image decoding, is in
//! `crates/lora-runtime/tests/hostile.rs`; the binaries' in
//! `crates/{clip-cls,sam-seg,sd3-gen}/tests/hostile.rs`): hostile safetensors files named without
//! a panic, and malformed adapter presets (TOML).
#[path = "../../../tests/common/hostile.rs"]
mod hostile;

use std::path::{Path, PathBuf};

use hostile::make::{self, Safetensors};
use serial_lora::io::read_safetensors;
use serial_lora::{AdapterConfig, Method};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn hostile_safetensors_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let good = fixtures().join("clip-tiny/peft_lora/adapter_model.safetensors");
    let st = Safetensors::read(&good);
    let k = st.find("lora_A", 2);
    let mut int = st.clone();
    int.retype_i32(&k);
    let cases: Vec<(PathBuf, &str)> = vec![
        (make::truncated(&good, &w.join("trunc.safetensors"), 0.5), "trunc.safetensors"),
        (make::zero_byte(&w.join("zero.safetensors")), "zero.safetensors"),
        (st.write_lying_length(&w.join("len.safetensors"), 1 << 40), "len.safetensors"),
        (st.write_lying_length(&w.join("short.safetensors"), 3), "short.safetensors"),
        (st.write_lying_shape(&w.join("shape.safetensors"), &k, &[1 << 20, 1 << 20]), "shape.safetensors"),
        (int.write(&w.join("int.safetensors")), "lora_A"),
    ];
    for (path, culprit) in cases {
        let err = read_safetensors(&path).expect_err(culprit).to_string();
        assert!(err.contains(culprit), "{culprit}: {err}");
    }
}

fn preset(dir: &Path, name: &str, text: &str) -> PathBuf {
    make::text(&dir.join(name), text)
}

#[test]
fn malformed_adapter_presets_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    // every shipped preset loads
    for e in std::fs::read_dir(fixtures().join("../../configs/adapters")).unwrap() {
        let p = e.unwrap().path();
        AdapterConfig::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    let cases = [
        ("truncated.toml", "method = \"serial-lora\"\nrank = ", &["truncated.toml", "TOML"][..]),
        ("type.toml", "method = \"lora\"\nrank = \"big\"\n", &["type.toml", "rank"]),
        ("method.toml", "method = \"dora\"\nrank = 4\n", &["method.toml", "dora"]),
        ("zero.toml", "method = \"lora\"\nrank = 0\n", &["zero.toml", "rank"]),
        ("negative.toml", "method = \"lora\"\nrank = -4\n", &["negative.toml", "-4"]),
        ("alpha.toml", "method = \"lora\"\nrank = 4\nalpha = -1.0\n", &["alpha.toml", "alpha"]),
        ("dropout.toml", "method = \"lora\"\nrank = 4\ndropout = 1.0\n", &["dropout.toml", "dropout"]),
        ("ratio.toml", "method = \"lora\"\nrank = 4\nlr_ratio = 0.0\n", &["ratio.toml", "lr_ratio"]),
        ("proj.toml", "method = \"lora\"\nrank = 4\ntarget_projections = [\"q\", \"w\"]\n", &["proj.toml", "w"]),
        ("empty.toml", "method = \"lora\"\nrank = 4\ntarget_projections = []\n", &["empty.toml", "target_projections"]),
        ("bad.json", "{\"method\": \"lora\", \"rank\": 4,", &["bad.json", "JSON"]),
    ];
    for (name, text, culprits) in cases {
        let err = AdapterConfig::load(preset(w, name, text)).expect_err(name).to_string();
        for c in culprits {
            assert!(err.contains(c), "{name}: error does not name {c:?}: {err}");
        }
    }
    let err = AdapterConfig::load(w.join("absent.toml")).unwrap_err().to_string();
    assert!(err.contains("absent.toml"), "{err}");
    // a good one, for contrast
    let ok = AdapterConfig::load(preset(w, "ok.toml", "method = \"serial-lora\"\nrank = 4\n")).unwrap();
    assert_eq!((ok.method, ok.rank), (Method::SerialLora, 4));
}
