//! Writes pytorch-fid-shaped Inception-v3 weights drawn deterministically (the random weights of
//! the FID parity fixture, `tools/fixtures/fid_inception.py`) to the safetensors file given as
//! the only argument: a stand-in for `pt_inception-2015-12-05` where the real file cannot be
//! downloaded (the `smoke` preset of `cargo xtask bench-all`). FID values computed with it only
//! exercise the pipeline; they are not comparable to published FIDs.
use burn::backend::Flex;
use sd3_gen::metrics::inception::deterministic_state_dict;
use serial_lora::io::write_safetensors;

fn main() -> anyhow::Result<()> {
    let Some(out) = std::env::args_os().nth(1) else {
        anyhow::bail!("usage: fid_test_weights OUT.safetensors");
    };
    write_safetensors(std::path::Path::new(&out), &deterministic_state_dict::<Flex>(&Default::default()), Default::default())?;
    eprintln!("wrote {}", out.to_string_lossy());
    Ok(())
}
