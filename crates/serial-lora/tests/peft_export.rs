//! Adapters saved by this crate, with our outputs, for `tools/fixtures/check_peft_load.py`, which
//! loads them with PEFT's `PeftModel.from_pretrained` and compares outputs
//! (`cargo xtask peft-check` runs both). Here: the export itself must succeed and be complete.
mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::module::Module;
use common::*;
use serial_lora::io::{self, HostTensor};
use serial_lora::{AdaptedModel, AdapterConfig, AttentionConfig, AttentionStack, LoraLinear, Method, QkvProjection};

fn export_dir() -> PathBuf {
    std::env::var("PEFT_EXPORT_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("peft-export"))
}

/// Base weights under their HF names, PyTorch layout.
fn hf_state(m: &AttentionStack<B>) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    let mut put = |key: String, l: &burn::nn::Linear<B>| {
        out.insert(format!("{key}.weight"), HostTensor::from_tensor(l.weight.val()).t());
        if let Some(b) = &l.bias {
            out.insert(format!("{key}.bias"), HostTensor::from_tensor(b.val()));
        }
    };
    for site in m.attention_sites() {
        let (a, n, p) = (site.attention, site.names, site.path);
        match &a.qkv {
            QkvProjection::Separate(s) => {
                for (name, l) in [(n.q, &s.q), (n.k, &s.k), (n.v, &s.v)] {
                    put(format!("{p}.{name}"), &l.base);
                }
            }
            QkvProjection::Fused(f) => put(format!("{p}.{}", n.qkv), &f.base),
        }
        let o: &LoraLinear<B> = a.o.as_ref().expect("output projection");
        put(format!("{p}.{}", n.o), &o.base);
    }
    out
}

/// Every random draw of this file comes from a generator seeded with `SEED` (+ a small offset
/// per use): a failure replays as it is.
const SEED: u64 = 20_260_318;

fn export(name: &str, kind: &str, attn: AttentionConfig, cfg: AdapterConfig) {
    let dev = Default::default();
    let base = seeded_stack::<B>(&attn, 2, SEED);
    let m = base.clone().with_adapters(&cfg, 0, &dev).unwrap().map(&mut RandomizeB::new(SEED + 1));
    let x = randn::<B, 3>([2, 5, attn.d_model], SEED + 2);
    let y = m.forward(x.clone());
    let dir = export_dir().join(name);
    io::save_adapter(&m, &cfg, dir.join("adapter"), None).unwrap();
    let mut t = hf_state(&base);
    t.insert("x".into(), HostTensor::from_tensor(x));
    t.insert("y".into(), HostTensor::from_tensor(y));
    let meta = [("kind", kind.to_string()), ("heads", attn.num_heads.to_string())];
    io::write_safetensors(&dir.join("case.safetensors"), &t, meta.map(|(k, v)| (k.to_string(), v)).into()).unwrap();
    assert!(dir.join("adapter").join(io::WEIGHTS_FILE).is_file());
}

#[test]
fn export_adapters_for_peft() {
    export("clip_lora", "clip", AttentionConfig::new(16, 2), AdapterConfig::new(Method::Lora, 4).with_alpha(8.0));
    // fused qkv: three pairs written as one rank-3r block-diagonal pair with rank/alpha patterns
    export(
        "fused_lora_rslora",
        "fused",
        AttentionConfig::new(12, 3).with_fused_qkv(true),
        AdapterConfig::new(Method::Lora, 2).with_alpha(4.0).with_rslora(true),
    );
}
