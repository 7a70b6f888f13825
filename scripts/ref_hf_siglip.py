#!/usr/bin/env python3
"""HF transformers references for the vision encoder (afm-vision) and its preprocessing.

Writes, under tests/fixtures/:
1. hf_tiny_siglip/: a seeded random SiglipVisionModel (hidden 32, 2 layers, 4 heads, patch 8,
   64 px) saved as config.json + model.safetensors; seeded pixels (2, 3, 64, 64) and the
   last hidden state for them; a second input of 48x80 px run with
   interpolate_pos_encoding=True (the position table resized bicubically).
2. hf_siglip_preprocess/: a 301x203 PNG drawn with PIL (gradients, shapes, text) and the
   pixel_values that SiglipImageProcessor's PIL backend (bicubic, 1/255, mean/std 0.5) makes of it at
   224x224 and at 64x96 (an upscale in one direction, a downscale in the other).

With --full DIR it also builds the full SmolVLM-256M vision tower (SigLIP-B/16 at 512 px:
hidden 768, 12 layers, 12 heads, MLP 3072) with seeded random weights in DIR, with one seeded
512x512 input and its last hidden state; `cargo test --release -p afm-vision --test hf_parity
-- --ignored` with AFM_SIGLIP_FULL=DIR compares against it. Nothing under DIR is committed
(~370 MB).

All arrays are little-endian f32, row-major; shapes are in each directory's ref.json.
Usage: python scripts/ref_hf_siglip.py [--full DIR]
(needs torch, transformers, pillow, numpy: `pip install torch transformers pillow numpy`)
"""
import json
import os
import sys

import numpy as np
import torch
import transformers
from PIL import Image, ImageDraw
from transformers import SiglipVisionConfig, SiglipVisionModel

try:  # transformers >= 5: the PIL backend by name (the default needs torchvision)
    from transformers import SiglipImageProcessorPil as SiglipImageProcessor
except ImportError:  # transformers 4: the PIL processor is the default
    from transformers import SiglipImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")


def save(arr, path):
    np.ascontiguousarray(arr, dtype="<f4").tofile(path)


def randomise(m, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "layer_norm" in n or "layernorm" in n:
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif "position_embedding" in n:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))


def run(m, px, interpolate=False):
    with torch.no_grad():
        return m(pixel_values=px, interpolate_pos_encoding=interpolate).last_hidden_state.float().numpy()


def tiny():
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, image_size=64, patch_size=8,
                             layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    m = SiglipVisionModel(cfg).eval()
    randomise(m, 4321)
    out = os.path.join(FIX, "hf_tiny_siglip")
    os.makedirs(out, exist_ok=True)
    m.save_pretrained(out, safe_serialization=True)
    g = torch.Generator().manual_seed(99)
    px = torch.randn(2, 3, 64, 64, generator=g)
    px2 = torch.randn(1, 3, 48, 80, generator=g)
    h = run(m, px)
    h2 = run(m, px2, interpolate=True)
    save(px.numpy(), os.path.join(out, "pixels.f32"))
    save(h, os.path.join(out, "hidden.f32"))
    save(px2.numpy(), os.path.join(out, "pixels_48x80.f32"))
    save(h2, os.path.join(out, "hidden_48x80.f32"))
    with open(os.path.join(out, "ref.json"), "w") as f:
        json.dump({"pixels": list(px.shape), "hidden": list(h.shape),
                   "pixels_48x80": list(px2.shape), "hidden_48x80": list(h2.shape),
                   "torch": torch.__version__, "transformers": transformers.__version__}, f)
    print("tiny siglip:", h.shape, h2.shape, "->", out)


def sample_image(path):
    w, h = 301, 203
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 // (w - 1)), (y * 255 // (h - 1)), ((x + y) * 7) % 256], -1).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    d.rectangle([20, 30, 120, 90], fill=(250, 250, 250), outline=(0, 0, 0), width=3)
    d.ellipse([150, 60, 260, 180], fill=(200, 30, 40))
    d.line([0, 200, 300, 0], fill=(10, 200, 10), width=2)
    d.text((28, 50), "OK Cancel", fill=(0, 0, 0))
    img.save(path)
    return img


def preprocess():
    out = os.path.join(FIX, "hf_siglip_preprocess")
    os.makedirs(out, exist_ok=True)
    img = sample_image(os.path.join(out, "sample.png"))
    img = Image.open(os.path.join(out, "sample.png")).convert("RGB")
    ref = {"image": "sample.png", "outputs": []}
    for (hh, ww) in [(224, 224), (64, 96)]:
        proc = SiglipImageProcessor(size={"height": hh, "width": ww}, resample=3,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3)
        pv = proc(images=img, return_tensors="np")["pixel_values"][0]
        name = f"pixels_{hh}x{ww}.f32"
        save(pv, os.path.join(out, name))
        ref["outputs"].append({"file": name, "height": hh, "width": ww, "shape": list(pv.shape)})
    ref["transformers"] = transformers.__version__
    with open(os.path.join(out, "ref.json"), "w") as f:
        json.dump(ref, f)
    print("preprocess:", [o["shape"] for o in ref["outputs"]], "->", out)


def full(out):
    cfg = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, image_size=512, patch_size=16,
                             layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    m = SiglipVisionModel(cfg).eval()
    randomise(m, 2025)
    os.makedirs(out, exist_ok=True)
    m.save_pretrained(out, safe_serialization=True)
    px = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(5))
    h = run(m, px)
    save(px.numpy(), os.path.join(out, "pixels.f32"))
    save(h, os.path.join(out, "hidden.f32"))
    with open(os.path.join(out, "ref.json"), "w") as f:
        json.dump({"pixels": list(px.shape), "hidden": list(h.shape), "torch": torch.__version__,
                   "transformers": transformers.__version__}, f)
    print("full siglip-b/16-512:", h.shape, "->", out)


if __name__ == "__main__":
    tiny()
    preprocess()
    if len(sys.argv) > 2 and sys.argv[1] == "--full":
        full(sys.argv[2])
