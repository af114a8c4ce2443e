#!/usr/bin/env python3
"""Tiny random-weight Qwen2-VL / Qwen2.5-VL reference fixture, made with the reference
implementation (PyPI `transformers` + `torch`, CPU, float32).

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.11.0 torchvision \
        transformers==5.17.0 pillow numpy safetensors          # PyPI, CPU use only
    /tmp/tv/bin/python scripts/vlm/make_fixture.py OUT_DIR [qwen2_vl | qwen2_5_vl]

Qwen2.5-VL's tower differs from Qwen2-VL's: RMSNorm, a SiLU gate/up/down MLP, and attention
within windows of merged patches except in the `fullatt_block_indexes` blocks (here a 2×2
window of merged tokens in block 0, full attention in block 1, so both paths are checked).

Writes OUT_DIR/{config.json, model.safetensors} (save_pretrained of a 2-layer model with a
2-block vision tower, random weights: machinery only, no fidelity claim), test images
img{0,1,2,3}.png (deterministic numpy patterns: sizes that need no resize, an upscale and a
downscale), and reference.safetensors + reference.json: per image the processor's
pixel_values and image_grid_thw, the vision tower + merger output, and for a prompt holding
image 1 the M-RoPE position ids and the logits. tests/vision.rs compares the Rust code with
these.
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

import transformers
from safetensors.torch import save_file

out = sys.argv[1]
family = sys.argv[2] if len(sys.argv) > 2 else "qwen2_vl"
assert family in ("qwen2_vl", "qwen2_5_vl"), family
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
np.random.seed(0)

VOCAB = 320
IMAGE, VSTART, VEND = 300, 301, 302
config = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "image_token_id": IMAGE,
    "video_token_id": 303,
    "vision_start_token_id": VSTART,
    "vision_end_token_id": VEND,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "vision_config": {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "hidden_act": "quick_gelu",
        "mlp_ratio": 4,
        "num_heads": 4,
        "in_chans": 3,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}
if family == "qwen2_5_vl":
    config["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    config["model_type"] = "qwen2_5_vl"
    config["vision_config"] = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 48,
        "out_hidden_size": config["hidden_size"],
        "hidden_act": "silu",
        "num_heads": 4,
        "in_channels": 3,
        "in_chans": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
cfg = transformers.AutoConfig.from_pretrained(out)
cls = (transformers.Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl"
       else transformers.Qwen2VLForConditionalGeneration)
model = cls(cfg).eval().float()
# Default init leaves norms at 1 and biases at 0; perturb every parameter so each one matters.
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.add_(0.1 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.5 / max(1, p.shape[-1]) ** 0.5 if p.dim() == 2 else 0.05)
model.save_pretrained(out, safe_serialization=True)

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 64
proc = transformers.Qwen2VLImageProcessor(
    min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, merge_size=2,
    temporal_patch_size=2)

def pattern(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)),
                    ((x + y) * 7) % 256], -1).astype(np.int32)
    img += rng.integers(-20, 21, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")

sizes = [(56, 56), (140, 84), (100, 75), (300, 200)]  # (width, height)
tensors, meta = {}, {"family": family, "images": [], "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "processor": [c.__module__ + "." + c.__name__ for c in type(proc).__mro__[:3]]}
visual = model.model.visual if hasattr(model, "model") and hasattr(model.model, "visual") else model.visual
with torch.no_grad():
    for i, (w, h) in enumerate(sizes):
        img = pattern(w, h, i)
        img.save(os.path.join(out, f"img{i}.png"))
        b = proc(images=[img], return_tensors="pt")
        pv, grid = b["pixel_values"].float(), b["image_grid_thw"]
        feats = visual(pv, grid_thw=grid)
        if not torch.is_tensor(feats):
            # Newer versions return an output object: the merged features are the ones of the
            # language model's width.
            cands = [v for v in (getattr(feats, "pooler_output", None),
                                 getattr(feats, "last_hidden_state", None)) if v is not None]
            cands += [v for v in feats if torch.is_tensor(v)] if isinstance(feats, tuple) else []
            feats = next(v for v in cands if v.shape[-1] == config["hidden_size"])
        tensors[f"pixel_values.{i}"] = pv.contiguous()
        # The resized 8-bit pixels by Pillow and by torchvision, to tell which resize the
        # processor ran (and to check the Rust port of each against its library).
        rh, rw = grid[0, 1].item() * 14, grid[0, 2].item() * 14
        tensors[f"pil_resized.{i}"] = torch.from_numpy(
            np.asarray(img.resize((rw, rh), Image.BICUBIC), dtype=np.float32).copy())
        try:
            import torchvision.transforms.v2.functional as TF
            t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
            tv = TF.resize(t, [rh, rw], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            tensors[f"tv_resized.{i}"] = tv.permute(1, 2, 0).float().contiguous()
        except Exception as e:  # noqa: BLE001
            print("torchvision resize unavailable:", e)
        tensors[f"features.{i}"] = feats.float().contiguous()
        meta["images"].append({"file": f"img{i}.png", "width": w, "height": h,
                               "grid_thw": grid[0].tolist()})
        print(f"img{i} {w}x{h}: grid {grid[0].tolist()} pixel_values {tuple(pv.shape)} "
              f"features {tuple(feats.shape)}")

    # A prompt with image 1 between text tokens.
    img = Image.open(os.path.join(out, "img1.png")).convert("RGB")
    b = proc(images=[img], return_tensors="pt")
    grid = b["image_grid_thw"]
    n = int(grid[0].prod()) // 4
    ids = [5, 17, 42, VSTART] + [IMAGE] * n + [VEND, 7, 99, 250, 3]
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)
    mm = (input_ids == IMAGE).long()  # 1 = image token (transformers 5 asks for the types)
    try:
        pos, _ = model.model.get_rope_index(input_ids=input_ids, image_grid_thw=grid,
                                            attention_mask=mask)
    except (TypeError, ValueError):
        pos, _ = model.model.get_rope_index(input_ids=input_ids, image_grid_thw=grid,
                                            attention_mask=mask, mm_token_type_ids=mm)
    kw = dict(input_ids=input_ids, attention_mask=mask, pixel_values=b["pixel_values"].float(),
              image_grid_thw=grid)
    # transformers 5 finds image tokens by `mm_token_type_ids` (what its processor returns);
    # without them Qwen2.5-VL silently gives every token a text position.
    try:
        o = model(**kw, mm_token_type_ids=mm)
    except (TypeError, ValueError):
        o = model(**kw)
    # The forward's own positions must be the ones saved: the same logits with them explicit.
    o2 = model(**kw, position_ids=pos)
    gap = (o.logits - o2.logits).abs().max().item()
    print(f"logits with the saved position ids: max |diff| {gap:.2e}")
    assert gap < 1e-5, "the forward used other positions than get_rope_index's"
    tensors["prompt.position_ids"] = pos[:, 0, :].to(torch.int64).contiguous()
    tensors["prompt.logits"] = o.logits[0].float().contiguous()
    meta["prompt"] = {"ids": ids, "image": 1}
    print(f"prompt: {len(ids)} tokens, position ids {tuple(pos.shape)}, logits {tuple(o.logits.shape)}")

save_file(tensors, os.path.join(out, "reference.safetensors"))
with open(os.path.join(out, "reference.json"), "w") as f:
    json.dump(meta, f, indent=2)
from safetensors import safe_open
with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
    keys = sorted(f.keys())
print(len(keys), "weights:", keys[:6], "...", keys[-4:])
with open(os.path.join(out, "weight_names.txt"), "w") as f:
    f.write("\n".join(keys) + "\n")
