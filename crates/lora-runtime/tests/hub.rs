//! Model resolution by hub id through the HF cache layout (`models--owner--name/refs/main` →
//! `snapshots/<commit>/…`), offline, and by local path.
use std::path::Path;

use lora_runtime::hub::{HubOptions, resolve_model_dir};

fn fake_cache(root: &Path, id: &str, files: &[&str]) -> std::path::PathBuf {
    let repo = root.join(format!("models--{}", id.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for f in files {
        std::fs::write(snap.join(f), "{}").unwrap();
    }
    snap
}

#[test]
fn hub_ids_resolve_from_the_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = HubOptions { cache_dir: tmp.path().to_path_buf(), offline: true };
    let needed: &[&[&str]] = &[&["config.json"], &["model.safetensors", "model.safetensors.index.json"]];
    // empty cache, offline: the error names the id, the file and the reason
    let err = resolve_model_dir("openai/clip-vit-base-patch16", needed, &[], &opts).unwrap_err().to_string();
    assert!(err.contains("openai/clip-vit-base-patch16") && err.contains("config.json") && err.contains("HF_HUB_OFFLINE"), "{err}");
    // cached snapshot
    let snap = fake_cache(tmp.path(), "org/tiny-clip", &["config.json", "model.safetensors"]);
    assert_eq!(resolve_model_dir("org/tiny-clip", needed, &["preprocessor_config.json"], &opts).unwrap(), snap);
    // a required file missing from the snapshot
    let err = resolve_model_dir("org/tiny-clip", &[&["config.json"], &["tokenizer.json", "vocab.json+merges.txt"]], &[], &opts).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("vocab.json"), "{err}");
}

#[test]
fn local_paths_and_bad_specs() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = HubOptions { cache_dir: tmp.path().join("cache"), offline: true };
    let d = tmp.path().to_str().unwrap();
    assert_eq!(resolve_model_dir(d, &[&["config.json"]], &[], &opts).unwrap(), tmp.path());
    let file = tmp.path().join("f.txt");
    std::fs::write(&file, "x").unwrap();
    let err = resolve_model_dir(file.to_str().unwrap(), &[], &[], &opts).unwrap_err().to_string();
    assert!(err.contains("is a file"), "{err}");
    let err = resolve_model_dir("/no/such/model/dir", &[], &[], &opts).unwrap_err().to_string();
    assert!(err.contains("/no/such/model/dir") && err.contains("not a hub id"), "{err}");
}
