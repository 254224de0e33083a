//! Parsing of the JSON and TOML files the workspace reads (model `config.json`s, processor,
//! scheduler and adapter configs, presets, dataset splits), so that every error names the field
//! path at fault (`vision_config.window_size`), not only a line and column; and the checked size
//! arithmetic the configs' `validate()` use, so that no size derived from a file overflows or
//! implies an allocation beyond [`MAX_TENSOR_ELEMENTS`].
use std::path::{Component, Path, PathBuf};

use serde::de::DeserializeOwned;

/// The most elements one tensor of a model built from a config file may have: 2³⁰ (4 GiB in
/// f32). The largest tensors of the supported checkpoints are far below (SD3.5-large's position
/// table, 384²·2432 ≈ 3.6·10⁸; T5-XXL's embedding, 32128·4096 ≈ 1.3·10⁸); a config implying
/// more is refused before anything is allocated.
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 30;

/// The most elements all tensors of one model built from a config file may have together: 2³⁴
/// (64 GiB in f32; SD3.5-large's MMDiT has 8·10⁹ parameters).
pub const MAX_MODEL_ELEMENTS: u64 = 1 << 34;

/// The most repeated sub-modules (layers, blocks, embeddings of a list) a config may ask for: far
/// above every supported checkpoint (SD3.5-large has 38 blocks, T5-XXL 24 layers), far below what
/// would exhaust memory or time building the module tree.
pub const MAX_LAYERS: usize = 4096;

/// Formats a `serde_path_to_error` error: `` `a.b[2].c`: <message> `` (the message alone when the
/// error is at the root or at no field: malformed JSON, where the path is `?`).
fn with_path<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> String {
    // a syntax error inside `a.b` ends in an unknown segment: `a.b.?`
    let full = e.path().to_string();
    let path = full.strip_suffix(".?").unwrap_or(&full);
    if path == "." || path == "?" { e.inner().to_string() } else { format!("`{path}`: {}", e.inner()) }
}

/// Parses JSON text into `T`; the error names the field path at fault.
pub fn json<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(with_path)?;
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// [`json`] from an already parsed value.
pub fn json_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(with_path)
}

/// Parses TOML text into `T`; the error names the field path at fault.
pub fn toml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let de = toml::Deserializer::parse(text).map_err(|e| e.to_string())?;
    serde_path_to_error::deserialize(de).map_err(with_path)
}

/// `Err` naming `field` unless `value` is at least `min`.
pub fn at_least(field: &str, value: usize, min: usize) -> Result<usize, String> {
    if value >= min { Ok(value) } else { Err(format!("`{field}` = {value} must be at least {min}")) }
}

/// `Err` naming `field` unless `min ≤ value ≤ max`.
pub fn in_range(field: &str, value: usize, min: usize, max: usize) -> Result<usize, String> {
    if (min..=max).contains(&value) { Ok(value) } else { Err(format!("`{field}` = {value} must be in {min}..={max}")) }
}

/// `Err` naming `field` unless `value` is finite and at least `min` (strictly above it when
/// `strict`).
pub fn finite(field: &str, value: f64, min: f64, strict: bool) -> Result<f64, String> {
    let ok = value.is_finite() && if strict { value > min } else { value >= min };
    if ok { Ok(value) } else { Err(format!("`{field}` = {value} must be a finite number {} {min}", if strict { ">" } else { "≥" })) }
}

/// `a / b` where `b` (the field `field`) must be positive and divide `a` (`what`) exactly.
pub fn exact_div(what: &str, a: usize, field: &str, b: usize) -> Result<usize, String> {
    if b == 0 {
        return Err(format!("`{field}` = 0 must be positive"));
    }
    if !a.is_multiple_of(b) {
        return Err(format!("{what} = {a} is not a multiple of `{field}` = {b}"));
    }
    Ok(a / b)
}

/// The product of `dims` (each named by its field), refused when it overflows or exceeds
/// [`MAX_TENSOR_ELEMENTS`]: `what` names the tensor.
pub fn elements(what: &str, dims: &[(&str, usize)]) -> Result<u64, String> {
    let product = dims.iter().try_fold(1u64, |acc, &(_, d)| acc.checked_mul(d as u64));
    match product {
        Some(n) if n <= MAX_TENSOR_ELEMENTS => Ok(n),
        _ => {
            let named: Vec<String> = dims.iter().map(|(f, d)| format!("`{f}` = {d}")).collect();
            Err(format!(
                "{what} would have {} elements ({}), more than the limit of {MAX_TENSOR_ELEMENTS}",
                product.map_or("more than 2^64".to_string(), |n| n.to_string()),
                named.join(" × ")
            ))
        }
    }
}

/// Sums per-part element counts (`(what, count)`), refused above [`MAX_MODEL_ELEMENTS`].
pub fn total_elements(parts: &[(&str, u64)]) -> Result<u64, String> {
    let mut total = 0u64;
    for (what, n) in parts {
        total = total.saturating_add(*n);
        if total > MAX_MODEL_ELEMENTS {
            return Err(format!("the model would have more than {MAX_MODEL_ELEMENTS} parameters (limit reached at {what})"));
        }
    }
    Ok(total)
}

/// `root/entry` for a file named by a dataset manifest (`metadata.jsonl`, a split file),
/// refused — as a message quoting the entry — when the entry is absolute, climbs out with `..`,
/// or resolves (through a symlink) to a file outside `root`.
pub fn contained_path(root: &Path, entry: &str) -> Result<PathBuf, String> {
    let rel = Path::new(entry);
    if rel.has_root() || rel.components().any(|c| matches!(c, Component::Prefix(_) | Component::RootDir)) {
        return Err(format!("`{entry}` is an absolute path: entries must be relative to {}", root.display()));
    }
    if rel.components().any(|c| c == Component::ParentDir) {
        return Err(format!("`{entry}` climbs out of {} with `..`", root.display()));
    }
    let path = root.join(rel);
    if let (Ok(real), Ok(real_root)) = (path.canonicalize(), root.canonicalize())
        && !real.starts_with(&real_root)
    {
        return Err(format!("`{entry}` resolves to {}, outside {} (a symlink out of the dataset)", real.display(), root.display()));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Inner {
        #[allow(dead_code)]
        window_size: usize,
    }
    #[derive(Debug, serde::Deserialize)]
    struct Outer {
        #[allow(dead_code)]
        vision_config: Inner,
    }

    #[test]
    fn errors_name_the_field_path() {
        let e = json::<Outer>(r#"{"vision_config": {"window_size": -3}}"#).unwrap_err();
        assert!(e.starts_with("`vision_config.window_size`: invalid value: integer `-3`"), "{e}");
        let e = toml::<Outer>("[vision_config]\nwindow_size = \"x\"\n").unwrap_err();
        assert!(e.starts_with("`vision_config.window_size`: "), "{e}");
        let e = json::<Outer>(r#"{"vision_config": {}}"#).unwrap_err();
        assert!(e.contains("vision_config") && e.contains("window_size"), "{e}");
        assert!(json::<Outer>(r#"{"vision_config": {"window_size": 3}} x"#).is_err());
        let e = json::<Outer>(r#"{"vision_config": {"wind"#).unwrap_err();
        assert!(e.starts_with("`vision_config`: EOF while parsing"), "{e}");
        assert!(json::<Outer>("{").unwrap_err().starts_with("EOF while parsing"));
    }

    #[test]
    fn manifest_entries_stay_inside() {
        let tmp = std::env::temp_dir().join(format!("serial-lora-contained-{}", std::process::id()));
        let root = tmp.join("data");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(tmp.join("secret.png"), b"x").unwrap();
        std::fs::write(root.join("sub/a.png"), b"x").unwrap();
        assert_eq!(contained_path(&root, "sub/a.png"), Ok(root.join("sub/a.png")));
        assert!(contained_path(&root, "missing.png").is_ok(), "existence is checked by the caller");
        assert!(contained_path(&root, "/etc/passwd").unwrap_err().contains("`/etc/passwd` is an absolute path"));
        assert!(contained_path(&root, "sub/../../secret.png").unwrap_err().contains("`sub/../../secret.png` climbs out"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(tmp.join("secret.png"), root.join("link.png")).unwrap();
            assert!(contained_path(&root, "link.png").unwrap_err().contains("`link.png` resolves to"));
        }
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(elements("t", &[("a", 3), ("b", 4)]), Ok(12));
        let e = elements("t", &[("a", usize::MAX), ("b", 4)]).unwrap_err();
        assert!(e.contains("`a` = ") && e.contains("more than 2^64"), "{e}");
        assert!(elements("t", &[("a", 1 << 20), ("b", 1 << 20)]).is_err());
        assert_eq!(exact_div("x", 10, "p", 0), Err("`p` = 0 must be positive".into()));
        assert!(exact_div("x", 10, "p", 3).unwrap_err().contains("`p` = 3"));
        assert_eq!(exact_div("x", 12, "p", 3), Ok(4));
        assert!(total_elements(&[("a", MAX_MODEL_ELEMENTS), ("b", 1)]).unwrap_err().contains("at b"));
    }
}
