#!/usr/bin/env python3
"""PyTorch reference for the paper's vision-language adapter (afm-fusion `AfmAdapter`).

The adapter, as the AFM 2025 report describes it: a transformer layer over the encoder's
output, a linear projection into the LM width, a 3x3 convolution, and average pooling to a
fixed grid of image tokens. Built here from independent PyTorch/transformers parts:
transformers' SiglipEncoderLayer (pre-norm, GELU-tanh MLP), nn.Linear, nn.Conv2d(padding=1)
and nn.AdaptiveAvgPool2d. Register tokens (first R positions) take part in the transformer
layer and are dropped before the projection. The optional output norm (`output_norm_eps`) is
torch.nn.RMSNorm over each pooled token (output_out_norm.f32).

Writes tests/fixtures/torch_afm_adapter/: weights.safetensors under our names
(adapter.layer.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}.*,
adapter.proj.{weight,bias}, adapter.conv.{weight,bias}, adapter.out_norm.weight), config.json
(the adapter config, and `output_norm_eps`), input.f32 (2, 1 + 7*7, 32), output.f32
(2, 3*3, 48) and output_out_norm.f32 (2, 3*3, 48), little-endian f32. A 7x7 patch grid
pooled to 3x3 makes the adaptive bins uneven (sizes 3, 3, 3 overlapping), as 42x42 -> 12x12
does at the paper's 672 px.

Usage: python scripts/ref_torch_afm_adapter.py   (needs torch, transformers, safetensors)
"""
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "torch_afm_adapter")
DV, DL, HEADS, INTER, REG, GRID, POOL = 32, 48, 4, 64, 1, 7, 3
NORM_EPS = 1e-5


def main():
    torch.manual_seed(77)
    vcfg = SiglipVisionConfig(hidden_size=DV, intermediate_size=INTER, num_attention_heads=HEADS,
                              layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    vcfg._attn_implementation = "eager"
    layer = SiglipEncoderLayer(vcfg).eval()
    proj = torch.nn.Linear(DV, DL)
    conv = torch.nn.Conv2d(DL, DL, 3, padding=1)
    pool = torch.nn.AdaptiveAvgPool2d((POOL, POOL))
    with torch.no_grad():
        for m in (layer, proj, conv):
            for n, p in m.named_parameters():
                if "layer_norm" in n:
                    p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
        x = torch.randn(2, REG + GRID * GRID, DV)
        h = layer(x, None)
        h = proj(h[:, REG:])  # (2, 49, DL)
        h = h.reshape(2, GRID, GRID, DL).permute(0, 3, 1, 2)
        h = pool(conv(h))  # (2, DL, 3, 3)
        y = h.flatten(2).transpose(1, 2).contiguous()  # (2, 9, DL)
        norm = torch.nn.RMSNorm(DL, eps=NORM_EPS)
        norm.weight.copy_(0.5 + 0.1 * torch.randn(DL))
        y_norm = norm(y)
    os.makedirs(OUT, exist_ok=True)
    t = {f"adapter.layer.{k}": v.contiguous() for k, v in layer.state_dict().items()}
    t.update({f"adapter.proj.{k}": v.contiguous() for k, v in proj.state_dict().items()})
    t.update({f"adapter.conv.{k}": v.contiguous() for k, v in conv.state_dict().items()})
    t["adapter.out_norm.weight"] = norm.weight.detach().contiguous()
    save_file(t, os.path.join(OUT, "weights.safetensors"))
    np.ascontiguousarray(x.numpy(), "<f4").tofile(os.path.join(OUT, "input.f32"))
    np.ascontiguousarray(y.numpy(), "<f4").tofile(os.path.join(OUT, "output.f32"))
    np.ascontiguousarray(y_norm.numpy(), "<f4").tofile(os.path.join(OUT, "output_out_norm.f32"))
    cfg = {"vision_hidden_size": DV, "text_hidden_size": DL, "num_attention_heads": HEADS,
           "intermediate_size": INTER, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
           "pool": [POOL, POOL]}
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump({"adapter": cfg, "output_norm_eps": NORM_EPS, "registers": REG, "grid": [GRID, GRID],
                   "input": list(x.shape), "output": list(y.shape),
                   "torch": torch.__version__}, f, indent=1)
    print("afm adapter:", tuple(x.shape), "->", tuple(y.shape), "->", OUT)


if __name__ == "__main__":
    main()
