"""Shared pieces of the PyTorch references of `cargo xtask perf` (sam_perf.py, sd3_perf.py):
the arguments, Serial LoRA as a forward pre-hook, the timing loops and the JSON line (the keys of
the Rust side, `serial_lora::perf::json_line`). clip_perf.py predates this module and keeps its
own copy.
"""
import argparse
import json
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


def arg_parser(model_name, batch=1, rank=32, dropout=0.0):
    """The arguments every perf script shares with the Rust examples."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="serial-lora", help="base | lora | serial-lora | lora-plus | serial-lora-plus")
    ap.add_argument("--mode", default="train", help="train | infer | infer-merged")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--rank", type=int, default=rank)
    ap.add_argument("--dropout", type=float, default=dropout)
    ap.add_argument("--lr-ratio", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-name", default=model_name)
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N] (cuda untested)")
    return ap


class SerialLora(nn.Module):
    """Serial LoRA on the input of one attention module (PEFT has none): a forward pre-hook
    `h' = h + s·B(A(dropout(h)))` on the `hidden_states` argument (keyword or first positional),
    merged as `W ← W (I + s·B·A)` into the given query/key/value linears ([out, in] layout; a
    fused qkv linear is one of them)."""

    def __init__(self, d, r, alpha, dropout):
        super().__init__()
        self.lora_A = nn.Linear(d, r, bias=False)
        self.lora_B = nn.Linear(r, d, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.scale, self.drop = alpha / r, nn.Dropout(dropout)

    def __call__(self, module, args, kwargs):
        if "hidden_states" in kwargs:
            h = kwargs["hidden_states"]
            kwargs["hidden_states"] = h + self.scale * self.lora_B(self.lora_A(self.drop(h)))
            return args, kwargs
        h = args[0]
        return (h + self.scale * self.lora_B(self.lora_A(self.drop(h))),) + tuple(args[1:]), kwargs

    @torch.no_grad()
    def merge_into(self, linears):
        m = torch.eye(self.lora_A.weight.shape[1], device=self.lora_A.weight.device) + self.scale * self.lora_B.weight @ self.lora_A.weight
        for lin in linears:
            lin.weight.copy_(lin.weight @ m)


def attach_serial(model, is_site, d, rank, alpha, dropout, qkv_of):
    """Serial LoRA on every module whose name satisfies `is_site`; returns (params, merge)."""
    params, hooks = [], []
    for name, mod in model.named_modules():
        if is_site(name):
            s = SerialLora(d, rank, alpha, dropout)
            hooks.append((mod, s, mod.register_forward_pre_hook(s, with_kwargs=True)))
            params += [(f"{name}.serial.{n}", p) for n, p in s.named_parameters()]

    def merge():
        for mod, s, handle in hooks:
            s.merge_into(qkv_of(mod))
            handle.remove()
        return model

    return params, merge


def optimizer(params, method, lr, lr_ratio, weight_decay):
    """AdamW (0.9, 0.999, eps 1e-8); LoRA+ = two groups, lr_B = ratio · lr_A (PEFT's
    `create_loraplus_optimizer`: lora_B and 1-D parameters in the fast group)."""
    if method.endswith("-plus"):
        fast = [p for n, p in params if "lora_B" in n or p.ndim == 1]
        slow = [p for n, p in params if not ("lora_B" in n or p.ndim == 1)]
        groups = [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * lr_ratio}]
    else:
        groups = [{"params": [p for _, p in params], "lr": lr}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


def time_train(a, model, loss_fn, params, opt, sync, max_grad_norm=None):
    """Steady-state training steps; forward ends with the loss on the host."""
    times = {"step": [], "forward": [], "backward": [], "optim": []}
    model.train()
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss_value = loss.item()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for _, p in params], max_grad_norm)
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
    return times


def time_infer(a, model, forward):
    """Forwards under `torch.inference_mode`, each ending with a host read."""
    times = {"step": []}
    model.eval()
    with torch.inference_mode():
        for step in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            forward().sum().item()
            if step >= a.warmup:
                times["step"].append(time.perf_counter() - t0)
    return times


def print_line(a, times, trainable, **extra):
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
        "steps": a.steps,
        "warmup": a.warmup,
        "threads": torch.get_num_threads(),
        "trainable_params": trainable,
        "step_s": times["step"],
        **extra,
    }
    if a.mode == "train":
        for k in ("forward", "backward", "optim"):
            line[f"{k}_s"] = statistics.median(times[k])
    print(json.dumps(line), flush=True)
