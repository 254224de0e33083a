"""PyTorch + PEFT reference for `cargo xtask perf --model sam-b --vs-pytorch`: one SAM case per
process.

Same case as `crates/sam-seg/examples/perf.rs` (`sam-perf`): transformers `SamModel` with random
weights of facebook/sam-vit-base's config (configs/models/sam-vit-base.json), built for square
`--image-size` inputs (default 512; the checkpoint's 1024 is ~4× the tokens), batch 1 of noise
images, one box prompt (¼ s, ¼ s)–(¾ s, ¾ s), single-mask output, target = the box on the
low-resolution grid; adapters on the image encoder's attention only, rank 32, alpha = rank,
no dropout (sam-seg train's defaults).

Modes: `train` (image encoder + prompt encoder + mask decoder, BCE-with-logits + soft Dice on
the low-resolution logits, backward, AdamW (0.9, 0.999, eps 1e-8, wd 1e-2), LoRA+ as PEFT's
`create_loraplus_optimizer` for `-plus`), `infer` (the same forward under
`torch.inference_mode`, adapters unmerged), `infer-merged` (after merging), `--method base
--mode infer` (the plain model).

LoRA is PEFT's on `vision_encoder.layers.*.attn.{qkv,proj}`: one rank-r pair on the fused qkv
(d → 3d) where ours has three (q, k, v: d → d each), so PEFT trains 98,304 + 49,152 parameters
per block against our 147,456 + 49,152 — the rank-32 matmuls are < 1 % of the step either way.
Serial LoRA (not in PEFT) is a forward pre-hook on each `SamVisionAttention`, merged as
`W_qkv ← W_qkv (I + s·B·A)`.

Usage: .venv/bin/python tools/perf/sam_perf.py --method serial-lora --mode train --steps 3
"""
import torch
from torch import nn

from perf_common import arg_parser, attach_serial, optimizer, print_line, time_infer, time_train

ADAPTED = r"vision_encoder\.layers\.\d+\.attn\.(qkv|proj)"


def build(method, rank, alpha, dropout, image_size):
    """(model, trainable params, merge function)."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    vision = SamVisionConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4.0, image_size=image_size, patch_size=16,
        num_channels=3, output_channels=256, window_size=14, global_attn_indexes=[2, 5, 8, 11], qkv_bias=True, use_rel_pos=True,
        hidden_act="gelu", layer_norm_eps=1e-6,
    )
    cfg = SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=SamPromptEncoderConfig(image_size=image_size).to_dict(),
                    mask_decoder_config=SamMaskDecoderConfig().to_dict())
    model = SamModel(cfg)
    model.requires_grad_(False)
    base = method.removesuffix("-plus")
    if base == "base":
        return model, [], lambda: model
    if base == "lora":
        from peft import LoraConfig, get_peft_model

        peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=ADAPTED))
        return peft, [(n, p) for n, p in peft.named_parameters() if p.requires_grad], peft.merge_and_unload
    if base == "serial-lora":
        params, merge = attach_serial(model, lambda n: n.startswith("vision_encoder.layers.") and n.endswith(".attn"), vision.hidden_size,
                                      rank, alpha, dropout, lambda attn: [attn.qkv])
        return model, params, merge
    raise SystemExit(f"unknown method {method}")


def main():
    ap = arg_parser("sam-b")
    ap.add_argument("--image-size", type=int, default=512)
    a = ap.parse_args()
    if a.method == "base" and a.mode != "infer":
        raise SystemExit("--method base has only --mode infer")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    model, params, merge = build(a.method, a.rank, float(a.rank), a.dropout, a.image_size)
    model.to(dev)
    trainable = sum(p.numel() for _, p in params)
    s, b = a.image_size, a.batch
    x = torch.randn(b, 3, s, s, device=dev)
    q = s / 4
    boxes = torch.tensor([[[q, q, 3 * q, 3 * q]]], device=dev).repeat(b, 1, 1)
    low = 4 * (s // 16)
    y = torch.zeros(b, low, low, device=dev)
    y[:, low // 4:3 * low // 4, low // 4:3 * low // 4] = 1.0
    y = y.reshape(b, low * low)

    def masks(m):
        out = m(pixel_values=x, input_boxes=boxes, multimask_output=False)
        return out.pred_masks.reshape(b, -1)  # [b, 1, 1, low, low]: low-resolution logits

    def loss_fn():
        logits = masks(model)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, y)
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * y).sum(1) + 1) / (p.sum(1) + y.sum(1) + 1)
        return bce + dice.mean()

    if a.mode == "train":
        opt = optimizer(params, a.method, 1e-4, a.lr_ratio, 1e-2)
        times = time_train(a, model, loss_fn, params, opt, sync)
    else:
        if a.mode == "infer-merged":
            model = merge()
        elif a.mode != "infer":
            raise SystemExit(f"unknown mode {a.mode}")
        times = time_infer(a, model, lambda: masks(model))
    print_line(a, times, trainable, image_size=a.image_size, rank=a.rank)


if __name__ == "__main__":
    main()
