//! The `smoke` preset's models and data, generated under `<out>/_smoke` (deterministic; no
//! downloads): the tiny random-weight CLIP, SAM and SD3 fixtures of `tests/fixtures/` in HF /
//! diffusers layout, and three small image datasets in the layouts the task commands read.
use std::path::Path;

use anyhow::{Context, Result};

use crate::bench::write_atomic;

/// A deterministic xorshift64 stream.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// `c` ± `spread`, clamped to a byte.
    fn jitter(&mut self, c: u8, spread: u64) -> u8 {
        (c as i64 + (self.next() % (2 * spread + 1)) as i64 - spread as i64).clamp(0, 255) as u8
    }
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn save(img: &image::DynamicImage, path: &Path) -> Result<()> {
    std::fs::create_dir_all(path.parent().context("a file path")?)?;
    img.save(path).with_context(|| format!("writing {}", path.display()))
}

/// CLIP classes: colour fields with noise (folder names test the `_` → space rule).
const COLOURS: [(&str, [u8; 3]); 4] =
    [("bright_red", [210, 40, 40]), ("grass_green", [40, 190, 60]), ("sky_blue", [50, 70, 220]), ("sun_yellow", [225, 205, 50])];

/// `dir/{train,test}/<class>/NN.png`.
fn colours(dir: &Path, train: usize, test: usize) -> Result<()> {
    let mut rng = Noise(0x2545_F491_4F6C_DD1D);
    for (split, n) in [("train", train), ("test", test)] {
        for (name, rgb) in COLOURS {
            for i in 0..n {
                let (w, h) = (36 + (rng.next() % 30) as u32, 36 + (rng.next() % 30) as u32);
                let img = image::RgbImage::from_fn(w, h, |_, _| image::Rgb(rgb.map(|c| rng.jitter(c, 60))));
                save(&img.into(), &dir.join(split).join(name).join(format!("{i:02}.png")))?;
            }
        }
    }
    Ok(())
}

/// SAM: `dir/images/NN.png` + `dir/masks/NN.png`, one bright rectangle per 32×32 image at a
/// seeded place and size, `split.json` with the last `test` pairs held out.
fn rectangles(dir: &Path, n: usize, test: usize) -> Result<()> {
    let mut rng = Noise(0x9E37_79B9_7F4A_7C15);
    for i in 0..n {
        let (w, h) = (8 + (rng.next() % 12) as u32, 8 + (rng.next() % 12) as u32);
        let (x0, y0) = ((rng.next() % (32 - w as u64)) as u32, (rng.next() % (32 - h as u64)) as u32);
        let inside = |x: u32, y: u32| (x0..x0 + w).contains(&x) && (y0..y0 + h).contains(&y);
        let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb(if inside(x, y) { [220, 210, 200] } else { [20, 30, 40] }.map(|c| rng.jitter(c, 15))));
        save(&img.into(), &dir.join(format!("images/{i:02}.png")))?;
        let mask = image::GrayImage::from_fn(32, 32, |x, y| image::Luma([if inside(x, y) { 255 } else { 0 }]));
        save(&mask.into(), &dir.join(format!("masks/{i:02}.png")))?;
    }
    let stems: Vec<String> = (0..n).map(|i| format!("{i:02}")).collect();
    let split = serde_json::json!({"train": stems[..n - test], "test": stems[n - test..]});
    write_atomic(&dir.join("split.json"), split.to_string().as_bytes())
}

/// SD3: captioned 24×20 images (a coloured box on a gradient), `metadata.jsonl` as HF
/// imagefolder, `split.json` with the last `test` held out.
fn captioned(dir: &Path, n: usize, test: usize) -> Result<()> {
    let mut rng = Noise(0xD1B5_4A32_D192_ED03);
    let mut meta = String::new();
    for i in 0..n {
        let (name, c) = [("red", [220u8, 30, 30]), ("green", [30, 200, 40]), ("blue", [40, 60, 220]), ("yellow", [230, 220, 40])][i % 4];
        let (x0, y0) = (2 + (rng.next() % 10) as u32, 2 + (rng.next() % 8) as u32);
        let img = image::RgbImage::from_fn(24, 20, |x, y| {
            if (x0..x0 + 10).contains(&x) && (y0..y0 + 8).contains(&y) { image::Rgb(c) } else { image::Rgb([(x * 10) as u8, (y * 12) as u8, 128]) }
        });
        save(&img.into(), &dir.join(format!("img{i:02}.png")))?;
        meta += &format!("{}\n", serde_json::json!({"file_name": format!("img{i:02}.png"), "text": format!("a {name} box in the smoke style")}));
    }
    write_atomic(&dir.join("metadata.jsonl"), meta.as_bytes())?;
    let stems: Vec<String> = (0..n).map(|i| format!("img{i:02}")).collect();
    write_atomic(&dir.join("split.json"), serde_json::json!({"train": stems[..n - test], "test": stems[n - test..]}).to_string().as_bytes())
}

/// Creates `out/_smoke` unless complete (its `done` marker is written last). `inception_example`
/// is the built `fid_test_weights` example of sd3-gen.
pub fn generate(root: &Path, out: &Path, inception_example: &Path) -> Result<()> {
    let dir = out.join("_smoke");
    if dir.join("done").is_file() {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(&dir);
    let fx = root.join("tests/fixtures");
    // the tiny CLIP with the tiny CLIP tokenizer of the SD3 fixture (same vocabulary)
    let clip = dir.join("clip-tiny");
    std::fs::create_dir_all(&clip)?;
    for f in ["config.json", "model.safetensors"] {
        copy(&fx.join("clip-tiny").join(f), &clip.join(f))?;
    }
    for f in ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"] {
        copy(&fx.join("sd3-tiny/tokenizer").join(f), &clip.join(f))?;
    }
    colours(&dir.join("colours"), 16, 6)?;
    rectangles(&dir.join("rectangles"), 12, 4)?;
    captioned(&dir.join("captions"), 8, 2)?;
    crate::run(std::process::Command::new(inception_example).arg(dir.join("inception.safetensors")))?;
    write_atomic(&dir.join("done"), b"")
}
