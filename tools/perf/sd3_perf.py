"""PyTorch + PEFT reference for `cargo xtask perf --model sd3-block --vs-pytorch`: one SD3 case
per process.

Same case as `crates/sd3-gen/examples/perf.rs` (`sd3-perf`): diffusers `SD3Transformer2DModel`
with SD3-medium's config (configs/models/sd3-medium-transformer.json) but `num_layers=--blocks`
(default 2; the last block is `context_pre_only` as in any SD3 stack), random weights, batch 1,
latents of a 512² image (16×64×64), prompt embeddings without T5 (77 random CLIP tokens + 77
zero T5 tokens, width 4096), pooled 2048, σ and timestep of the scheduler's training table index
500 (shift 3). Adapters on the image stream of every joint attention, rank 32, alpha = rank,
Gaussian init (train_dreambooth_lora_sd3.py's `init_lora_weights="gaussian"`).

Modes: `train` (sd3-gen train's step: `x_t = (1 − σ)·x0 + σ·ε`, transformer, preconditioned
prediction `pred·(−σ) + x_t` against `x0`, MSE, backward, `clip_grad_norm_(1.0)`, AdamW (0.9,
0.999, eps 1e-8, wd 1e-4), LoRA+ groups for `-plus`), `infer` (one transformer forward under
`torch.inference_mode`, adapters unmerged), `infer-merged` (after merging), `--method base
--mode infer` (the plain slice).

LoRA is PEFT's on `to_q`, `to_k`, `to_v`, `to_out.0`; Serial LoRA (not in PEFT) a forward pre-hook
on the `hidden_states` (image stream) argument of each joint `Attention`, merged as
`W ← W (I + s·B·A)` for to_q, to_k, to_v.

Usage: .venv/bin/python tools/perf/sd3_perf.py --method serial-lora --mode train --steps 3
"""
import torch

from perf_common import arg_parser, attach_serial, optimizer, print_line, time_infer, time_train


def build(method, rank, alpha, dropout, blocks):
    """(model, trainable params, merge function)."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=blocks, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
    )
    model.requires_grad_(False)
    base = method.removesuffix("-plus")
    if base == "base":
        return model, [], lambda: model
    if base == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                         target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        peft = get_peft_model(model, cfg)
        return peft, [(n, p) for n, p in peft.named_parameters() if p.requires_grad], peft.merge_and_unload
    if base == "serial-lora":
        params, merge = attach_serial(model, lambda n: n.startswith("transformer_blocks.") and n.endswith(".attn"), 1536,
                                      rank, alpha, dropout, lambda attn: [attn.to_q, attn.to_k, attn.to_v])
        return model, params, merge
    raise SystemExit(f"unknown method {method}")


def main():
    ap = arg_parser("sd3-block")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--max-sequence-length", type=int, default=77)
    a = ap.parse_args()
    if a.method == "base" and a.mode != "infer":
        raise SystemExit("--method base has only --mode infer")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    model, params, merge = build(a.method, a.rank, float(a.rank), a.dropout, a.blocks)
    model.to(dev)
    trainable = sum(p.numel() for _, p in params)
    b, l = a.batch, a.resolution // 8
    x0 = torch.randn(b, 16, l, l, device=dev)
    noise = torch.randn(b, 16, l, l, device=dev)
    embeds = torch.cat([torch.randn(b, 77, 4096, device=dev), torch.zeros(b, a.max_sequence_length, 4096, device=dev)], 1)
    pooled = torch.randn(b, 2048, device=dev)
    # FlowMatchEulerDiscreteScheduler's training table (shift 3), index 500 (as the Rust side)
    shift, n, i = 3.0, 1000, 500
    u = (n - i) / n
    sigma = shift * u / (1 + (shift - 1) * u)
    t = torch.full((b,), sigma * n, device=dev)
    noisy = (1 - sigma) * x0 + sigma * noise

    def forward(m):
        return m(hidden_states=noisy, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t, return_dict=False)[0]

    def loss_fn():
        pred = forward(model) * (-sigma) + noisy
        return ((pred - x0) ** 2).reshape(b, -1).mean(1).mean()

    if a.mode == "train":
        opt = optimizer(params, a.method, 1e-4, a.lr_ratio, 1e-4)
        times = time_train(a, model, loss_fn, params, opt, sync, max_grad_norm=1.0)
    else:
        if a.mode == "infer-merged":
            model = merge()
        elif a.mode != "infer":
            raise SystemExit(f"unknown mode {a.mode}")
        times = time_infer(a, model, lambda: forward(model))
    print_line(a, times, trainable, blocks=a.blocks, resolution=a.resolution, rank=a.rank)


if __name__ == "__main__":
    main()
