"""CLIP ViT-B/16 few-shot training throughput: PyTorch + PEFT next to `clip-cls train`.

Pretrained weights cannot be downloaded here, so both sides use the same random-weight
`CLIPModel` with ViT-B/16 shapes (openai/clip-vit-base-patch16's config), written in HF layout
with the real CLIP vocabulary (from open_clip's bpe_simple_vocab_16e6.txt.gz), and a synthetic
EuroSAT-shaped dataset (10 classes of 64x64 JPEGs, CoOp split file). Throughput does not depend
on the weights' values.

The PyTorch side runs the CLIP-LoRA step: RandomResizedCrop + flip, image features, class text
features re-encoded (both towers adapted), logits 100·cos, cross-entropy, AdamW. LoRA via PEFT
(q, k, v, out_proj, rank 32); Serial LoRA as forward pre-hooks on each self-attention module
(h + s·B(A(dropout(h))), the paper's formula; PEFT has no Serial LoRA).

Usage: .venv/bin/python tools/bench/clip_train_step.py WORKDIR [--steps 3] [--batch 8] [--threads 2]
Then:  clip-cls train --model WORKDIR/clip-vit-b16-random --dataset WORKDIR/eurosat-synthetic \
           --shots 16 --method lora --iters 3 --batch 8 --out WORKDIR/run-lora
       (images/s in WORKDIR/run-lora/metrics.json; `cargo xtask` does not wrap this yet)
"""
import argparse
import gzip
import json
import os
import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_model(out):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    if os.path.exists(os.path.join(out, "model.safetensors")):
        return
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16, image_size=224),
        projection_dim=512,
    )
    CLIPModel(cfg).save_pretrained(out)
    import open_clip

    gz = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    json.dump({t: i for i, t in enumerate(vocab)}, open(os.path.join(out, "vocab.json"), "w"))
    open(os.path.join(out, "merges.txt"), "w").write("#version: 0.2\n" + "\n".join(merges) + "\n")


CLASSES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]


def write_dataset(out, per_class=20):
    if os.path.exists(os.path.join(out, "split_zhou_EuroSAT.json")):
        return
    rng = np.random.default_rng(0)
    entries = []
    for label, c in enumerate(CLASSES):
        os.makedirs(os.path.join(out, "2750", c), exist_ok=True)
        for i in range(per_class):
            rel = f"{c}/{c}_{i}.jpg"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(os.path.join(out, "2750", rel))
            entries.append([rel, label, c])
    json.dump({"train": entries, "val": entries[:10], "test": entries}, open(os.path.join(out, "split_zhou_EuroSAT.json"), "w"))


class SerialHook(nn.Module):
    def __init__(self, d, r, alpha, dropout):
        super().__init__()
        self.a = nn.Linear(d, r, bias=False)
        self.b = nn.Linear(r, d, bias=False)
        nn.init.zeros_(self.b.weight)
        self.s, self.drop = alpha / r, nn.Dropout(dropout)

    def __call__(self, module, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        h = h + self.s * self.b(self.a(self.drop(h)))
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = h
            return args, kwargs
        return (h,) + tuple(args[1:]), kwargs


def bench(model_dir, data_dir, method, steps, batch, rank=32, alpha=1.0, dropout=0.25):
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(model_dir, attn_implementation="sdpa")
    model.requires_grad_(False)
    hooks = []
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        params = [p for p in model.parameters() if p.requires_grad]
        clip = model.base_model.model
    else:
        clip = model
        params = []
        for name, mod in model.named_modules():
            if name.endswith("self_attn"):
                h = SerialHook(mod.embed_dim, rank, alpha, dropout)
                hooks.append(h)
                params += list(h.parameters())
                mod.register_forward_pre_hook(h, with_kwargs=True)
    n_trainable = sum(p.numel() for p in params)
    tok = CLIPTokenizer.from_pretrained(model_dir)
    ids = tok([f"a centered satellite photo of {c}." for c in CLASSES], padding="max_length", max_length=77, return_tensors="pt").input_ids
    split = json.load(open(os.path.join(data_dir, "split_zhou_EuroSAT.json")))["train"]
    tf = transforms.Compose([
        transforms.RandomResizedCrop(224, scale=(0.08, 1), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(0.5),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-2, betas=(0.9, 0.999))
    times = []
    for step in range(steps):
        t = time.perf_counter()
        items = [split[(step * batch + i) % len(split)] for i in range(batch)]
        x = torch.stack([tf(Image.open(os.path.join(data_dir, "2750", p)).convert("RGB")) for p, _, _ in items])
        y = torch.tensor([l for _, l, _ in items])
        img = nn.functional.normalize(clip.get_image_features(pixel_values=x).pooler_output, dim=-1)
        txt = nn.functional.normalize(clip.get_text_features(input_ids=ids).pooler_output, dim=-1)
        loss = nn.functional.cross_entropy(100 * img @ txt.T, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    steady = times[1:] if len(times) > 1 else times
    return {"method": method, "trainable": n_trainable, "batch": batch, "step_seconds": times, "images_per_second": batch / (sum(steady) / len(steady))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model_dir = os.path.join(a.workdir, "clip-vit-b16-random")
    data_dir = os.path.join(a.workdir, "eurosat-synthetic")
    write_model(model_dir)
    write_dataset(data_dir)
    print(json.dumps({"torch": torch.__version__, "threads": a.threads}))
    for method in ["lora", "serial-lora"]:
        print(json.dumps(bench(model_dir, data_dir, method, a.steps, a.batch)), flush=True)


if __name__ == "__main__":
    main()
