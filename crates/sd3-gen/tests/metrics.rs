//! FID and CLIP-Score parity: pytorch-fid 0.3.0 (`tools/fixtures/fid_inception.py`: Inception-v3
//! with deterministic formula weights, block by block, and `calculate_frechet_distance` on
//! formula features) and torchmetrics 1.9.0 `CLIPScore` on the tiny CLIP
//! (`tools/fixtures/clip_score.py`).
use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::backend::Flex;
use burn::prelude::*;
use lora_runtime::imaging::load_rgb;
use sd3_gen::metrics::inception::{self, deterministic_state_dict, deterministic_uniform, load_fid_inception};
use sd3_gen::metrics::{ClipScore, ClipScorer, FID_EPS, FidStats, fid_from_features, fid_stats_vs_features, frechet_distance};
use serial_lora::io::{HostTensor, read_safetensors, write_safetensors};

type B = Flex;

/// Inception activations pointwise (the `x[0, :4, :12, :12]` border slices), relative to the
/// slice's largest reference value: f32 through up to 47 conv + BN + ReLU layers (fan-in up to
/// 2048) that oneDNN and Flex sum in different orders; measured ≤ 1.0e-4 (one slice of
/// Mixed_6b), most ≤ 3e-5. A wrong padding, pooling mode or branch order gives ≥ 1e-2.
const INCEPTION_TOL: f32 = 3e-4;

/// Per-channel spatial means and pool3 (averages over many positions; measured ≤ 1.7e-6).
const INCEPTION_MEAN_TOL: f32 = 1e-5;

/// FID vs pytorch-fid (relative) with full-rank or small covariances: scipy's `sqrtm` (Schur
/// method on the non-symmetric product) and the eigenvalue route differ by f64 round-off only.
const FID_TOL: f64 = 1e-6;

/// FID vs pytorch-fid at d = 2048 with n = 40 / 30 samples (rank-deficient, the small-eval
/// case). Here pytorch-fid itself is off: scipy's `sqrtm` turns the ~2000 round-off eigenvalues
/// (~1e-15) of the singular product into square roots of ~3e-8 each, lowering its result by
/// ~1.5e-4 (9e-7 relative); numpy's eigenvalue route has the same bias. The nuclear-norm route
/// used here is exact, so the tolerance covers pytorch-fid's bias, not ours.
const FID_DEFICIENT_TOL: f64 = 5e-6;

/// Statistics (mu, trace of sigma) in f64 from identical f32 features, stored as f32: f32
/// rounding of the reference only.
const STATS_TOL: f64 = 1e-6;

/// FID through the stored-statistics route (`A·Σ·Aᵀ`) vs the nuclear-norm route on the same
/// features (relative): both exact in exact arithmetic; the centered features have rank n − 1,
/// so one eigenvalue of `A·Σ·Aᵀ` is round-off whose square root enters the trace (measured
/// 1.7e-9 at d = 64, n = 20 / 15).
const ROUTE_TOL: f64 = 1e-7;

/// CLIP cosines vs transformers/torchmetrics (absolute, cosines are in [−1, 1]): f32 through
/// two tiny towers (clip-cls parity tolerance is 1e-5 relative).
const CLIP_TOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn reference(dir: &str) -> BTreeMap<String, HostTensor> {
    read_safetensors(&fixtures().join(dir).join("reference.safetensors")).expect("reference fixture").0
}

/// max |got − want| / max |want|.
fn rel_err(got: &[f32], want: &HostTensor) -> f32 {
    assert_eq!(got.len(), want.data.len());
    let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    got.iter().zip(&want.data).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// `x[0, :4, :12, :12]` and the per-channel spatial mean, as the fixture stores them.
fn summarize(x: &Tensor<B, 4>) -> (Vec<f32>, Vec<f32>) {
    let [_, c, h, w] = x.dims();
    let corner = x.clone().slice([0..1, 0..4, 0..12.min(h), 0..12.min(w)]).into_data().iter::<f32>().collect();
    let mean = x.clone().slice([0..1, 0..c, 0..h, 0..w]).mean_dim(3).mean_dim(2).into_data().iter::<f32>().collect();
    (corner, mean)
}

#[test]
fn inception_matches_pytorch_fid_block_by_block() {
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("pt_inception-deterministic.safetensors");
    write_safetensors(&weights, &deterministic_state_dict::<B>(&device), Default::default()).unwrap();
    let model = load_fid_inception::<B>(&weights, &device).expect("load through the key table");
    drop(dir);
    let r = reference("fid-inception");

    let mut worst = 0f32;
    let mut check = |key: String, got: &[f32]| {
        let e = rel_err(got, &r[&key]);
        println!("{key:24} {e:.2e}");
        let tol = if key.ends_with(".corner") { INCEPTION_TOL } else { INCEPTION_MEAN_TOL };
        assert!(e < tol, "{key}: relative error {e}");
        worst = worst.max(e);
    };
    // one image downsampled (320×310), one upsampled (41×53) to 299²; each resized alone,
    // then run as one batch of 2
    let mut resized = Vec::new();
    for (img, (h, w)) in [("a", (320, 310)), ("b", (41, 53))] {
        let x = Tensor::<B, 4>::from_data(TensorData::new(deterministic_uniform(&format!("input.{img}"), 3 * h * w, 0.0, 1.0), [1, 3, h, w]), &device);
        let x = inception::resize_299(x);
        let (corner, mean) = summarize(&x);
        check(format!("{img}.resized.corner"), &corner);
        check(format!("{img}.resized.mean"), &mean);
        resized.push(x);
    }
    let x = Tensor::cat(resized, 0).mul_scalar(2.0).sub_scalar(1.0);
    let start = std::time::Instant::now();
    let mut taps: Vec<(String, Tensor<B, 4>)> = Vec::new();
    let pool3 = model.forward_with(x, &mut |name, t| taps.push((name.to_string(), t.clone())));
    println!("forward of 2 images at 299²: {:.1} s", start.elapsed().as_secs_f32());
    assert_eq!(taps.len(), 15);
    for (name, t) in taps {
        for (i, img) in ["a", "b"].into_iter().enumerate() {
            let one = t.clone().narrow(0, i, 1);
            let (corner, mean) = summarize(&one);
            check(format!("{img}.{name}.corner"), &corner);
            check(format!("{img}.{name}.mean"), &mean);
        }
    }
    for (i, img) in ["a", "b"].into_iter().enumerate() {
        let f: Vec<f32> = pool3.clone().narrow(0, i, 1).into_data().iter::<f32>().collect();
        check(format!("{img}.pool3"), &f);
    }
    println!("worst relative error {worst:.2e}");
}

#[test]
fn inception_weights_are_checked() {
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let mut sd = deterministic_state_dict::<B>(&device);
    // a missing tensor, a wrong shape and an unknown key: one error naming all three
    sd.remove("Mixed_6b.branch7x7_2.conv.weight");
    sd.insert("Mixed_5b.branch1x1.bn.running_var".into(), HostTensor { shape: vec![3], data: vec![1.0; 3] });
    sd.insert("AuxLogits.fc.weight".into(), HostTensor { shape: vec![2], data: vec![0.0; 2] });
    let path = dir.path().join("broken.safetensors");
    write_safetensors(&path, &sd, Default::default()).unwrap();
    let err = load_fid_inception::<B>(&path, &device).unwrap_err().to_string();
    println!("{err}");
    assert!(err.contains("broken.safetensors"), "{err}");
    assert!(err.contains("mixed_6b.branch7x7_2.conv.weight"), "{err}");
    assert!(err.contains("mixed_5b.branch1x1.bn.running_var"), "{err}");
    assert!(err.contains("AuxLogits.fc.weight"), "{err}");
    let err = load_fid_inception::<B>(&dir.path().join("none.safetensors"), &device).unwrap_err().to_string();
    assert!(err.contains("none.safetensors"), "{err}");
}

/// The fixture's features: `(base[i, j % 16] + 0.5·noise[i, j]) · scale`, in f64, then f32.
fn features(name: &str, n: usize, d: usize, scale: f64) -> Vec<f32> {
    let base = deterministic_uniform(&format!("{name}.base"), n * 16, 0.0, 1.0);
    let noise = deterministic_uniform(&format!("{name}.noise"), n * d, 0.0, 1.0);
    (0..n * d).map(|k| ((base[(k / d) * 16 + (k % d) % 16] as f64 + 0.5 * noise[k] as f64) * scale) as f32).collect()
}

fn f64_of(r: &BTreeMap<String, HostTensor>, key: &str) -> f64 {
    let t = &r[key];
    t.data[0] as f64 + t.data[1] as f64
}

#[test]
fn fid_matches_pytorch_fid() {
    let r = reference("fid-inception");
    for (case, d, n1, n2) in [("full", 64, 300, 250), ("deficient", 64, 20, 15), ("big_deficient", 2048, 40, 30)] {
        let f1 = features(&format!("fid.{case}.x"), n1, d, 1.0);
        let f2 = features(&format!("fid.{case}.y"), n2, d, 1.1);
        let want = f64_of(&r, &format!("fid.{case}.fid64"));
        let exact = f64_of(&r, &format!("fid.{case}.exact64"));
        assert_eq!(r[&format!("fid.{case}.retried")].data[0], 0.0, "{case}: pytorch-fid retried with eps");
        let rel = |v: f64| (v - want).abs() / want.abs();
        let got = fid_from_features(&f1, n1, &f2, n2, d).unwrap();
        println!(
            "{case}: ours {:.10} pytorch-fid {want:.10} (rel {:.1e}); numpy eigen {exact:.10} (rel {:.1e})",
            got.value,
            rel(got.value),
            (got.value - exact).abs() / exact
        );
        let tol = if d > n1.min(n2) && d > 64 { FID_DEFICIENT_TOL } else { FID_TOL };
        assert!(rel(got.value) < tol, "{case}: FID {} vs pytorch-fid {want}", got.value);
        assert!(!got.eps_retry);
        // stored statistics of the first set against the features of the second: same number
        let stats = FidStats::from_features(&f1, n1, d).unwrap();
        let dir = tempfile::tempdir().unwrap();
        stats.save(&dir.path().join("stats.safetensors")).unwrap();
        let loaded = FidStats::load(&dir.path().join("stats.safetensors")).unwrap();
        assert_eq!(loaded, stats, "f64 round trip");
        let mixed = fid_stats_vs_features(&loaded, &f2, n2, d).unwrap();
        println!("{case}: statistics vs features {:.10} (rel to ours {:.1e})", mixed.value, (mixed.value - got.value).abs() / got.value);
        assert!((mixed.value - got.value).abs() < ROUTE_TOL * got.value.abs(), "{case}: {} vs {}", mixed.value, got.value);
        if d <= 64 {
            // the general d×d route on the statistics gives the same number
            let (s1, s2) = (FidStats::from_features(&f1, n1, d).unwrap(), FidStats::from_features(&f2, n2, d).unwrap());
            let mu: Vec<f32> = s1.mu.iter().map(|&v| v as f32).collect();
            let e = rel_err(&mu, &r[&format!("fid.{case}.mu1")]) as f64;
            let t = (s1.sigma.trace() - r[&format!("fid.{case}.trace1")].data[0] as f64).abs() / s1.sigma.trace();
            println!("{case}: mu rel {e:.1e}, trace rel {t:.1e}");
            assert!(e < STATS_TOL && t < STATS_TOL, "{case}: mu {e}, trace {t}");
            let general = frechet_distance(&s1, &s2, FID_EPS).unwrap();
            println!("{case}: statistics route {:.10} (rel {:.1e})", general.value, rel(general.value));
            assert!(rel(general.value) < FID_TOL, "{case}: statistics route {}", general.value);
        }
    }
}

#[test]
fn fid_rejects_bad_input() {
    let f = features("x", 4, 8, 1.0);
    let msg = |r: sd3_gen::Result<sd3_gen::metrics::Fid>| r.unwrap_err().to_string();
    assert!(msg(fid_from_features(&f, 4, &f[..8], 1, 8)).contains("at least 2 images"));
    assert!(msg(fid_from_features(&f, 4, &f, 3, 8)).contains("not 3 × 8"));
    let mut bad = f.clone();
    bad[13] = f32::NAN;
    let m = msg(fid_from_features(&f, 4, &bad, 4, 8));
    assert!(m.contains("feature 5 of image 1"), "{m}");
    let (a, b) = (FidStats::from_features(&f, 4, 8).unwrap(), FidStats::from_features(&f[..16], 2, 8).unwrap());
    assert!(frechet_distance(&a, &b, FID_EPS).is_ok());
    let c = FidStats::from_features(&f[..12], 3, 4).unwrap();
    assert!(msg(frechet_distance(&a, &c, FID_EPS)).contains("differ in size"));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.safetensors");
    write_safetensors(&p, &BTreeMap::from([("mu".to_string(), HostTensor { shape: vec![3], data: vec![0.0; 3] })]), Default::default()).unwrap();
    let m = FidStats::load(&p).unwrap_err().to_string();
    assert!(m.contains("s.safetensors") && m.contains("no tensor `sigma`"), "{m}");
    assert!(fid_stats_vs_features(&a, &f, 2, 4).unwrap_err().to_string().contains("8 dimensions, the features 4"));
    // non-finite statistics are an error, not a hang in the eigen iteration
    let mut inf = a.clone();
    inf.sigma[(1, 2)] = f64::INFINITY;
    assert!(msg(frechet_distance(&inf, &a, FID_EPS)).contains("not finite"));
    let mut nan = a.clone();
    nan.mu[0] = f64::NAN;
    assert!(msg(frechet_distance(&a, &nan, FID_EPS)).contains("not finite"));
    assert!(msg(fid_stats_vs_features(&nan, &f, 4, 8)).contains("not finite"));
    // identical sets: distance 0 (up to round-off)
    let same = fid_from_features(&f, 4, &f, 4, 8).unwrap().value;
    assert!(same.abs() < 1e-9, "{same}");
}

/// The tiny CLIP with the tiny CLIP tokenizer of the SD3 fixture (same vocabulary).
fn clip_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("clip-tiny").join(f), dir.path().join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"] {
        std::fs::copy(fixtures().join("sd3-tiny/tokenizer").join(f), dir.path().join(f)).unwrap();
    }
    dir
}

#[test]
fn clip_score_matches_torchmetrics() {
    let device = Default::default();
    let dir = clip_dir();
    let scorer = ClipScorer::<B>::load(dir.path(), &device).unwrap();
    let r = reference("clip-score");
    let images: Vec<_> = ["rgb_40x90.png", "gray_33x33.png", "rgb_40x90.png", "rgb_61x47.png"]
        .iter()
        .map(|f| load_rgb(&fixtures().join("clip-images").join(f)).unwrap())
        .collect();
    let prompts: Vec<String> = ["art nouveau poster", "cyberpunk city at night", "two dogs, playing!", "the sea"].map(String::from).to_vec();
    let cos = scorer.pair_cosines(&images, &prompts, &device).unwrap();
    for (i, (g, w)) in cos.iter().zip(&r["cos"].data).enumerate() {
        println!("pair {i}: cos {g:.7} transformers {w:.7}");
        assert!((g - *w as f64).abs() < CLIP_TOL, "pair {i}");
    }
    let three = ClipScore::from_cosines(&cos[..3]).unwrap();
    let all = ClipScore::from_cosines(&cos).unwrap();
    println!(
        "torchmetrics {} / ours {}; all four: {} / {}",
        r["torchmetrics"].data[0], three.clip_score_100, r["torchmetrics_all"].data[0], all.clip_score_100
    );
    assert!((three.clip_score_100 - r["torchmetrics"].data[0] as f64).abs() < 100.0 * CLIP_TOL);
    assert!((three.clip_score_100 - r["torchmetrics_2"].data[0] as f64).abs() < 100.0 * CLIP_TOL);
    assert!(cos[2] < 0.0 && three.clip_score_100 > 0.0, "the clamp is on the mean, not per pair");
    assert_eq!(all.clip_score_100, 0.0);
    assert_eq!(r["torchmetrics_all"].data[0], 0.0);
    assert!((three.clip_score - cos[..3].iter().sum::<f64>() / 3.0).abs() < 1e-12);
    // image–image cosines
    let sim = scorer.image_cosines(&images, &images[1..].iter().chain(&images[..1]).cloned().collect::<Vec<_>>(), &device).unwrap();
    for (i, s) in sim.iter().enumerate() {
        let w = r["image_cos"].data[i * 4 + (i + 1) % 4] as f64;
        assert!((s - w).abs() < CLIP_TOL, "image pair {i}: {s} vs {w}");
    }
    assert!(ClipScore::from_cosines(&[]).is_err());
    assert!(scorer.pair_cosines(&images, &prompts[..2], &device).unwrap_err().to_string().contains("4 images, 2 prompts"));
}

#[test]
fn fid_images_drop_alpha_as_pil_convert_rgb() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("rgba.png");
    image::RgbaImage::from_fn(3, 2, |x, y| image::Rgba([200, 100 + x as u8, 50 + y as u8, 64])).save(&path).unwrap();
    let fid = sd3_gen::metrics::load_rgb_fid(&path).unwrap();
    // PIL: Image.new('RGBA', …, (200, 100, 50, 64)).convert('RGB') → (200, 100, 50)
    assert_eq!(&fid.data[..6], &[200, 100, 50, 200, 101, 50]);
    assert_ne!(load_rgb(&path).unwrap().data, fid.data, "CLIP's decoding composites on white");
    let gray = tmp.path().join("la.png");
    image::GrayAlphaImage::from_pixel(2, 2, image::LumaA([90, 10])).save(&gray).unwrap();
    assert_eq!(sd3_gen::metrics::load_rgb_fid(&gray).unwrap().data, vec![90; 12]);
    std::fs::write(tmp.path().join("bad.png"), b"nope").unwrap();
    let err = sd3_gen::metrics::load_rgb_fid(&tmp.path().join("bad.png")).unwrap_err().to_string();
    assert!(err.contains("bad.png") && err.contains("unreadable image"), "{err}");
}

/// A captioned folder: 4 noisy colour images (different sizes), `metadata.jsonl`, `split.json`
/// with 2 test images.
fn tiny_dataset(dir: &std::path::Path) {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut meta = String::new();
    for (i, (name, rgb)) in [("a", [200u8, 40, 40]), ("b", [40, 190, 60]), ("c", [50, 70, 220]), ("d", [230, 200, 40])].into_iter().enumerate() {
        let (w, h) = (20 + 3 * i as u32, 24 - 2 * i as u32);
        let img = image::RgbImage::from_fn(w, h, |_, _| image::Rgb(rgb.map(|c| (c as i64 + (next() % 61) as i64 - 30).clamp(0, 255) as u8)));
        img.save(dir.join(format!("{name}.png"))).unwrap();
        meta += &format!("{{\"file_name\": \"{name}.png\", \"text\": \"a {name} coloured square\"}}\n");
    }
    std::fs::write(dir.join("metadata.jsonl"), meta).unwrap();
    std::fs::write(dir.join("split.json"), r#"{"train": ["a", "d"], "test": ["b", "c"]}"#).unwrap();
}

fn sd3(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sd3-gen")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn eval_end_to_end_on_the_tiny_pipeline() {
    let device = Default::default();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    tiny_dataset(&data);
    let weights = tmp.path().join("inception.safetensors");
    write_safetensors(&weights, &deterministic_state_dict::<B>(&device), Default::default()).unwrap();
    let clip = clip_dir();
    let images = tmp.path().join("generated");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let sd3_dir = s(&fixtures().join("sd3-tiny"));
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "eval",
            "--model",
            &sd3_dir,
            "--dataset",
            &s(&data),
            "--inception",
            &s(&weights),
            "--clip-model",
            &s(clip.path()),
            "--max-sequence-length",
            "4",
            "--steps",
            "2",
            "--guidance",
            "2",
            "--height",
            "16",
            "--width",
            "16",
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        sd3(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let start = std::time::Instant::now();
    let (ok, out, err) = run(&["--batch", "2", "--out-images", &s(&images)]);
    assert!(ok, "{err}");
    println!("eval: {out} ({:.1} s)", start.elapsed().as_secs_f32());
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["split"], "test");
    assert_eq!(v["images"], 2);
    assert_eq!(v["real_images"], 2);
    let (fid, cs, cs100) = (v["fid"].as_f64().unwrap(), v["clip_score"].as_f64().unwrap(), v["clip_score_100"].as_f64().unwrap());
    assert!(fid.is_finite() && fid > 0.0, "{fid}");
    assert!((-1.0..=1.0).contains(&cs) && (cs100 - (100.0 * cs).max(0.0)).abs() < 1e-9);
    assert!(v["clip_image_similarity"].as_f64().unwrap().abs() <= 1.0);

    // the printed FID is the library's FID of the written images against the real ones
    let gen_imgs: Vec<_> = (0..2).map(|i| load_rgb(&images.join(format!("{i:05}.png"))).unwrap()).collect();
    let real: Vec<_> = ["b", "c"].iter().map(|n| load_rgb(&data.join(format!("{n}.png"))).unwrap()).collect();
    assert!(gen_imgs.iter().all(|i| (i.width, i.height) == (16, 16)));
    let model = load_fid_inception::<B>(&weights, &device).unwrap();
    let fg = sd3_gen::metrics::inception_features(&model, &gen_imgs, &device, &mut |_| {});
    let fr = sd3_gen::metrics::inception_features(&model, &real, &device, &mut |_| {});
    let want = fid_from_features(&fg, 2, &fr, 2, 2048).unwrap().value;
    assert!((fid - want).abs() <= 1e-9 * want.abs(), "{fid} vs {want}");

    // images already in --out-images are reused (resume), and the batch size does not change
    // the noise of image i: regenerating image 1 alone gives the same images. --real-stats is
    // written on first use (FID through the stored-statistics route: the same number) and read
    // on the next (no real image through Inception): the same JSON again.
    std::fs::remove_file(images.join("00001.png")).unwrap();
    let before = std::fs::read(images.join("00000.png")).unwrap();
    let stats = tmp.path().join("real-stats.safetensors");
    let (ok, out_s, err) = run(&["--batch", "1", "--real-stats", &s(&stats), "--out-images", &s(&images)]);
    assert!(ok, "{err}");
    assert!(err.contains("reusing 1 generated image(s)") && stats.is_file(), "{err}");
    assert_eq!(before, std::fs::read(images.join("00000.png")).unwrap());
    let mut vs: serde_json::Value = serde_json::from_str(out_s.trim()).unwrap();
    let fid_s = vs["fid"].as_f64().unwrap();
    assert!((fid_s - fid).abs() < ROUTE_TOL * fid, "{fid_s} vs {fid}");
    vs["fid"] = v["fid"].clone();
    assert_eq!(vs, v, "regenerated image 1 alone equals its batch-2 version");
    let (ok, out_l, err) = run(&["--real-stats", &s(&stats), "--out-images", &s(&images)]);
    assert!(ok && err.contains("FID statistics of the real images from") && err.contains("reusing 2"), "{err}");
    assert_eq!(out_s.trim(), out_l.trim());

    // --no-t5 (zeros in place of the T5 tokens) conditions differently: other images
    let (ok, out_z, err) = run(&["--no-t5", "--out-images", &s(&tmp.path().join("no-t5"))]);
    assert!(ok, "{err}");
    assert_ne!(serde_json::from_str::<serde_json::Value>(out_z.trim()).unwrap()["fid"], v["fid"]);

    // bad input is named
    let (ok, _, err) = run(&["--num-images", "3"]);
    assert!(!ok && err.contains("--num-images 3"), "{err}");
    let (ok, _, err) = run(&["--split", "val"]);
    assert!(!ok && err.contains("--split val"), "{err}");
    std::fs::write(data.join("c.png"), b"not a png").unwrap();
    let (ok, _, err) = run(&[]);
    assert!(!ok && err.contains("c.png") && err.contains("unreadable image"), "{err}");
    std::fs::write(data.join("metadata.jsonl"), "{\"file_name\": \"a.png\", \"text\": \"\"}\n").unwrap();
    let (ok, _, err) = run(&[]);
    assert!(!ok && err.contains("caption missing"), "{err}");
    println!("whole test {:.1} s", start.elapsed().as_secs_f32());
}
