//! In-process fuzzing of serial-lora's loaders (harness: `tests/common/fuzz.rs`): every numeric
//! field of every adapter preset (`configs/adapters/*.toml`, read through `AdapterConfig::load`
//! as JSON) edited to 0, −1, 1, huge, a float, a string, null and removed (refused naming the
//! field, or loaded, and a loaded config attaches to a model without allocating beyond the cap);
//! seeded byte damage of an adapter preset in TOML and a PEFT adapter directory saved by this
//! crate (error or success, never a panic, a hang or an allocation beyond the cap). Image damage:
//! `crates/lora-runtime/tests/fuzz.rs`.
#[path = "../../../tests/common/fuzz.rs"]
mod fuzz;

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use serial_lora::{AdaptedModel, AdapterConfig, AttentionConfig, AttentionStack, Method, io};

type B = Flex;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A small stack (width 32, 3 blocks) to attach loaded adapter configs to.
fn stack() -> AttentionStack<B> {
    AttentionStack::new(&AttentionConfig::new(32, 4), 3, &Default::default())
}

#[test]
fn every_numeric_adapter_preset_field_is_refused_by_name_or_attaches() {
    let tmp = tempfile::tempdir().unwrap();
    let mut total = 0;
    for entry in std::fs::read_dir(root().join("configs/adapters")).unwrap() {
        let path = entry.unwrap().path();
        let cfg = AdapterConfig::load(&path).unwrap();
        let dir = tmp.path().join(path.file_stem().unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        // block indices beyond the small stack would only exercise check_blocks
        let blocks = cfg.target_blocks.clone().map(|b| b.into_iter().map(|i| i % 3).collect());
        let cfg = cfg.with_target_blocks(blocks);
        std::fs::write(dir.join("adapter.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        let load = |d: &Path| -> Result<(), (bool, serial_lora::Error)> {
            let cfg = AdapterConfig::load(d.join("adapter.json")).map_err(|e| (true, e))?;
            stack().with_adapters(&cfg, 0, &Default::default()).map(|_| ()).map_err(|e| (false, e))
        };
        total += fuzz::fuzz_config_fields(&dir, "adapter.json", &tmp.path().join("work"), &load).0;
    }
    assert!(total >= 60, "only {total} edits");
}

/// A rank whose adapters would not fit the cap is refused before anything is allocated.
#[test]
fn regression_adapter_rank_2_pow_40_is_refused_before_allocating() {
    let cfg = AdapterConfig::new(Method::Lora, 1 << 40);
    let e = fuzz::guarded("rank 2^40", || stack().with_adapters(&cfg, 0, &Default::default()).err()).unwrap().expect("refused").to_string();
    assert!(e.contains("`rank`"), "{e}");
    // within MAX_RANK, but 8 blocks × 4 pairs × 2 · 2¹⁶ · 1024 > 2³⁰ elements
    let cfg = AdapterConfig::new(Method::Lora, serial_lora::config::MAX_RANK);
    let wide = AttentionStack::<B>::new(&AttentionConfig::new(1024, 4), 8, &Default::default());
    let e = fuzz::guarded("rank 2^16 × width 1024", || wide.with_adapters(&cfg, 0, &Default::default()).err()).unwrap().expect("refused").to_string();
    assert!(e.contains("`rank`") && e.contains("limit"), "{e}");
}

#[test]
fn damaged_adapter_preset_toml_never_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let load = |d: &Path| {
        if let Ok(cfg) = AdapterConfig::load(d.join("clip-lora.toml")) {
            let _ = stack().with_adapters(&cfg.with_target_blocks(None), 0, &Default::default());
        }
    };
    fuzz::fuzz_bytes(&root().join("configs/adapters"), "clip-lora.toml", tmp.path(), fuzz::cases(64), &load);
}

#[test]
fn damaged_adapter_files_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let dir = tmp.path().join("adapter");
    for (method, name) in [(Method::Lora, "lora"), (Method::SerialLora, "serial")] {
        let model = stack().with_adapters(&AdapterConfig::new(method, 4), 0, &dev).unwrap();
        let d = dir.join(name);
        io::save_adapter(&model, &AdapterConfig::new(method, 4), &d, None).unwrap();
        let load = |d: &Path| {
            let _ = io::load_adapter(stack(), d, &dev);
        };
        for file in ["adapter_model.safetensors", "adapter_config.json"] {
            fuzz::fuzz_bytes(&d, file, &tmp.path().join(name), fuzz::cases(48), &load);
        }
    }
}

/// The harness itself: a panicking loader fails the property (after shrinking), and the field
/// check wants the field in backticks.
#[test]
#[should_panic(expected = "a damaged input broke the loader")]
fn harness_reports_a_panicking_loader() {
    let tmp = tempfile::tempdir().unwrap();
    let load = |d: &Path| {
        let bytes = std::fs::read(d.join("clip-lora.toml")).unwrap();
        assert!(bytes.len() > 1000, "a planted bug");
    };
    fuzz::fuzz_bytes(&root().join("configs/adapters"), "clip-lora.toml", tmp.path(), 4, &load);
}

#[test]
fn harness_field_check() {
    assert!(fuzz::names_field("`vision_config.window_size`: invalid value", "vision_config.window_size"));
    assert!(fuzz::names_field("`vision_config`: missing field `window_size`", "vision_config.window_size"));
    assert!(fuzz::names_field("`block_out_channels[1]` = 3 is not…", "block_out_channels[1]"));
    assert!(!fuzz::names_field("invalid value: integer `-3`, expected usize at line 1 column 1176", "vision_config.window_size"));
    assert!(!fuzz::names_field("window_size is bad", "vision_config.window_size"));
    assert!(fuzz::guarded("planted", || panic!("boom")).unwrap_err().contains("boom"));
}
