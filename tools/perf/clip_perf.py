"""PyTorch + PEFT reference for `cargo xtask perf --vs-pytorch`: one CLIP case per process.

Same case as `crates/clip-cls/examples/perf.rs`: random weights with the shapes of
openai/clip-vit-base-patch16 (transformers `CLIPModel`, sdpa attention), batch 8 of 224²
noise images, 10 class prompts × 77 tokens re-encoded every step, both towers adapted, rank 32,
alpha 1, adapter dropout 0.25 while training.

Modes: `train` (image + class text features, logits 100·cos, cross-entropy, backward, AdamW
(0.9, 0.999, eps 1e-8, wd 1e-2); LoRA+ = two parameter groups, lr_B = 20 · lr_A, as PEFT's
`create_loraplus_optimizer`), `infer` (the same forward under `torch.inference_mode`,
adapters unmerged), `infer-merged` (after merging), and `--method base --mode infer` (the plain
model). LoRA is PEFT's (`get_peft_model`, q_proj/k_proj/v_proj/out_proj); Serial LoRA, which
PEFT lacks, is a forward pre-hook per self-attention module: `h + s·B(A(dropout(h)))` (the
paper's formula, as tools/bench/clip_train_step.py), merged as `W ← W (I + s·B·A)` for q, k, v.

Prints one JSON line with the keys of the Rust side (`model`, `method`, `mode`,
`median_step_s`, `peak_rss_mb`, ...).

Usage: .venv/bin/python tools/perf/clip_perf.py --method serial-lora --mode train --steps 5
"""
import argparse
import json
import os
import statistics
import time

import torch
from torch import nn


def peak_rss_mb():
    """VmHWM of this process, MiB (the Rust side reads the same field)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class SerialLora(nn.Module):
    """Serial LoRA on the input of one attention module: h' = h + s·B(A(dropout(h)))."""

    def __init__(self, d, r, alpha, dropout):
        super().__init__()
        self.lora_A = nn.Linear(d, r, bias=False)
        self.lora_B = nn.Linear(r, d, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.scale, self.drop = alpha / r, nn.Dropout(dropout)

    def __call__(self, module, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        h = h + self.scale * self.lora_B(self.lora_A(self.drop(h)))
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = h
            return args, kwargs
        return (h,) + tuple(args[1:]), kwargs

    @torch.no_grad()
    def merge_into(self, attn):
        """W ← W (I + s·B·A) for q, k, v (PyTorch layout [out, in])."""
        m = torch.eye(self.lora_A.weight.shape[1], device=self.lora_A.weight.device) + self.scale * self.lora_B.weight @ self.lora_A.weight
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight.copy_(lin.weight @ m)


def build(method, rank, alpha, dropout):
    """(model, clip, trainable params, merge function)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    cfg = CLIPConfig(
        text_config=CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16, image_size=224),
        projection_dim=512,
    )
    cfg._attn_implementation = "sdpa"
    model = CLIPModel(cfg)
    model.requires_grad_(False)
    base = method.removesuffix("-plus")
    if base == "base":
        return model, model, [], lambda: model
    if base == "lora":
        from peft import LoraConfig, get_peft_model

        peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        params = [(n, p) for n, p in peft.named_parameters() if p.requires_grad]

        def merge():
            return peft.merge_and_unload()

        return peft, peft.base_model.model, params, merge
    if base == "serial-lora":
        params, hooks = [], []
        for name, mod in model.named_modules():
            if name.endswith("self_attn"):
                s = SerialLora(mod.embed_dim, rank, alpha, dropout)
                handle = mod.register_forward_pre_hook(s, with_kwargs=True)
                hooks.append((mod, s, handle))
                params += [(f"{name}.serial.{n}", p) for n, p in s.named_parameters()]

        def merge():
            for mod, s, handle in hooks:
                s.merge_into(mod)
                handle.remove()
            return model

        return model, model, params, merge
    raise SystemExit(f"unknown method {method}")


def logits(clip, x, ids):
    def feats(out):
        return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a ModelOutput

    img = nn.functional.normalize(feats(clip.get_image_features(pixel_values=x)), dim=-1)
    txt = nn.functional.normalize(feats(clip.get_text_features(input_ids=ids)), dim=-1)
    return 100 * img @ txt.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="serial-lora", help="base | lora | serial-lora | lora-plus | serial-lora-plus")
    ap.add_argument("--mode", default="train", help="train | infer | infer-merged")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--dropout", type=float, default=0.25)
    ap.add_argument("--lr-ratio", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-name", default="clip-b16")
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N] (cuda untested)")
    a = ap.parse_args()
    if a.method == "base" and a.mode != "infer":
        raise SystemExit("--method base has only --mode infer")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    dev = torch.device(a.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    model, clip, params, merge = build(a.method, a.rank, 1.0, a.dropout)
    model.to(dev)
    trainable = sum(p.numel() for _, p in params)
    x = torch.randn(a.batch, 3, 224, 224)
    ids = torch.full((a.classes, 77), 49407, dtype=torch.long)  # <eos> pads, as CLIP's tokenizer
    ids[:, 0] = 49406
    for c in range(a.classes):
        for j in range(1, 7):
            ids[c, j] = (c * 7919 + j * 104729) % 49000 + 256
    y = torch.arange(a.batch) % a.classes
    x, ids, y = x.to(dev), ids.to(dev), y.to(dev)

    times = {"step": [], "forward": [], "backward": [], "optim": []}
    if a.mode == "train":
        lr = 2e-4
        if a.method.endswith("-plus"):  # PEFT create_loraplus_optimizer: lora_B (and 1-D params) at lr · ratio
            fast = [p for n, p in params if "lora_B" in n or p.ndim == 1]
            slow = [p for n, p in params if not ("lora_B" in n or p.ndim == 1)]
            groups = [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * a.lr_ratio}]
        else:
            groups = [{"params": [p for _, p in params], "lr": lr}]
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
        model.train()
        for step in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(logits(clip, x, ids), y)
            loss_value = loss.item()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            t3 = time.perf_counter()
            assert loss_value == loss_value, "non-finite loss"
            if step >= a.warmup:
                times["forward"].append(t1 - t0)
                times["backward"].append(t2 - t1)
                times["optim"].append(t3 - t2)
                times["step"].append(t3 - t0)
    else:
        if a.mode == "infer-merged":
            model = merge()
            clip = model
        elif a.mode != "infer":
            raise SystemExit(f"unknown mode {a.mode}")
        model.eval()
        with torch.inference_mode():
            for step in range(a.warmup + a.steps):
                t0 = time.perf_counter()
                logits(clip, x, ids).sum().item()
                if step >= a.warmup:
                    times["step"].append(time.perf_counter() - t0)

    med = statistics.median(times["step"])
    line = {
        "model": a.model_name,
        "method": a.method,
        "mode": a.mode,
        "median_step_s": med,
        "peak_rss_mb": peak_rss_mb(),
        "framework": f"pytorch-{torch.__version__}",
        "images_per_s": a.batch / med,
        "batch": a.batch,
        "classes": a.classes,
        "rank": a.rank,
        "steps": a.steps,
        "warmup": a.warmup,
        "threads": torch.get_num_threads(),
        "trainable_params": trainable,
        "step_s": times["step"],
    }
    if a.mode == "train":
        for k in ("forward", "backward", "optim"):
            line[f"{k}_s"] = statistics.median(times[k])
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
