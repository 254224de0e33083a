//! Quickstart: attach an adapter to a stack of attention blocks, train it with LoRA+ (AdamW),
//! merge it for zero-overhead inference, save it in the PEFT layout and load it back. It uses the
//! `serial-lora` library alone (no runtime crate): the backend is picked here by hand.
//!
//! cargo run -p serial-lora --example quickstart -- --device cpu --method serial-lora-plus
use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use serial_lora::optim::{adamw_pytorch_defaults, loraplus_adamw};
use serial_lora::{AdaptedModel, AdapterConfig, AttentionConfig, AttentionStack, ParamCountExt, io};

#[derive(Parser)]
struct Args {
    /// cpu | cuda[:N] | tch-cpu | tch-cuda[:N] (backends compiled in)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// lora | serial-lora | lora-plus | serial-lora-plus
    #[arg(long, default_value = "serial-lora-plus")]
    method: String,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 60)]
    steps: usize,
    /// Where to save the adapter (default: a temporary directory).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn run<B: AutodiffBackend>(device: &B::Device, args: &Args) -> anyhow::Result<()> {
    B::seed(device, 0);
    let attn = AttentionConfig::new(64, 4);
    // A frozen "pretrained" model (random here) and a target made by a hidden adapter of the same kind.
    let base = AttentionStack::<B>::new(&attn, 4, device).fork(device);
    let cfg = AdapterConfig::from_method_name(&args.method, args.rank, 20.0)?.with_alpha(2.0 * args.rank as f64);
    let teacher = base.clone().with_adapters(&cfg, 0, device)?.map(&mut Perturb);
    let x = Tensor::<B, 3>::random([8, 16, 64], Distribution::Normal(0.0, 1.0), device);
    let target = teacher.forward(x.clone()).detach();

    let mut model = base.clone().with_adapters(&cfg, 0, device)?;
    let counts = model.param_counts();
    println!("{}: trainable {} of {} parameters", cfg.method_name(), counts.trainable, counts.total);
    let mut optim = loraplus_adamw::<B, AttentionStack<B>>(&adamw_pytorch_defaults().with_weight_decay(0.0), cfg.lr_ratio.unwrap_or(1.0));
    let mut first = None;
    for step in 0..args.steps {
        let loss = (model.forward(x.clone()) - target.clone()).powi_scalar(2).mean();
        let value = loss.clone().into_scalar().elem::<f32>();
        first.get_or_insert(value);
        if step % 20 == 0 || step + 1 == args.steps {
            println!("step {step:3}  loss {value:.5}");
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(2e-3, model, grads);
    }

    let model = model.valid(); // inference copy, no autodiff
    let x = x.inner();
    let y = model.forward(x.clone());
    let merged = model.clone().merge_and_unload()?;
    let err = (merged.forward(x.clone()) - y.clone()).abs().max().into_scalar().elem::<f32>();
    println!("merged vs unmerged: max |Δ| = {err:.2e}; merged model has {} parameters", merged.total_params());

    let tmp = tempfile::tempdir()?;
    let dir = args.out.clone().unwrap_or_else(|| tmp.path().join("adapter"));
    io::save_adapter(&model, &cfg, &dir, Some("quickstart/random-base"))?;
    let (reloaded, _) = io::load_adapter(base.valid(), &dir, device)?;
    let err = (reloaded.forward(x) - y).abs().max().into_scalar().elem::<f32>();
    println!("saved to {} and reloaded: max |Δ| = {err:.2e}", dir.display());
    anyhow::ensure!(err == 0.0, "reloaded adapter differs");
    Ok(())
}

/// Sets every adapter matrix to small random values (the hidden target adapter).
struct Perturb;
impl<B: Backend> burn::module::ModuleMapper<B> for Perturb {
    fn map_float<const D: usize>(&mut self, p: burn::module::Param<Tensor<B, D>>) -> burn::module::Param<Tensor<B, D>> {
        if !p.is_require_grad() {
            return p;
        }
        let t = p.val();
        let r = Tensor::random(t.shape(), Distribution::Normal(0.0, 0.1), &t.device());
        burn::module::Param::initialized(p.id, r.detach())
    }
}

fn main() -> anyhow::Result<()> {
    use burn::backend::Autodiff;
    let args = Args::parse();
    let (name, index) = args.device.split_once(':').map_or((args.device.as_str(), "0"), |(n, i)| (n, i));
    let _gpu: usize = index.parse().map_err(|_| anyhow::anyhow!("device `{}`: `{index}` is not a GPU index", args.device))?;
    match name {
        #[cfg(feature = "flex")]
        "cpu" | "flex" => run::<Autodiff<burn::backend::Flex>>(&Default::default(), &args),
        #[cfg(feature = "cuda")]
        "cuda" => run::<Autodiff<burn::backend::Cuda>>(&burn::backend::cuda::CudaDevice::new(_gpu), &args),
        #[cfg(feature = "tch")]
        "tch-cpu" => run::<Autodiff<burn::backend::LibTorch>>(&burn::backend::libtorch::LibTorchDevice::Cpu, &args),
        #[cfg(feature = "tch")]
        "tch-cuda" => run::<Autodiff<burn::backend::LibTorch>>(&burn::backend::libtorch::LibTorchDevice::Cuda(_gpu), &args),
        _ => anyhow::bail!("device `{}`: unknown, or its backend is not compiled into this example (features flex, cuda, tch)", args.device),
    }
}
