#!/usr/bin/env python3
"""PyTorch reference for afm's text-line reader (afm-vision `reader::TextReader`).

The reader, built here from independent PyTorch parts: F.pixel_unshuffle(2) (each 2x2
pixel block to 4 channels, dy * 2 + dx), nn.Conv2d(3x3, padding 1) + ReLU, max pooling 2x2
after the first convolution and 2x1 (height only) after the others, the columns flattened
with features ordered (row, channel), nn.Linear + nn.LayerNorm + tanh-GELU, residual context
blocks x + GELU(Linear([ln(x)_{t-1}, ln(x)_t, ln(x)_{t+1}])) with zero padding at the ends,
then nn.LayerNorm and nn.Linear to 97 classes.

Writes tests/fixtures/torch_reader/: config.json (the reader config), model.safetensors
(seeded random weights under afm's names, `reader.` prefix, f32), input.f32 (2, 1, 16, 40)
and logits.f32 (2, 10, 97), little-endian f32.

Usage: /usr/bin/python3 scripts/ref_torch_reader.py   (needs torch: Debian 12 python3-torch 1.13 works)
"""
import json
import os
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "torch_reader")
CFG = {"height": 16, "channels": [8, 12], "hidden": 16, "context_layers": 1,
       "max_width": 64, "layer_norm_eps": 1e-5}
CLASSES = 97


class Reader(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c_in = 4
        self.convs = nn.ModuleList()
        for c in cfg["channels"]:
            self.convs.append(nn.Conv2d(c_in, c, 3, padding=1))
            c_in = c
        h = cfg["hidden"]
        eps = cfg["layer_norm_eps"]
        self.proj = nn.Linear(2 * c_in, h)
        self.proj_norm = nn.LayerNorm(h, eps=eps)
        self.ctx_norm = nn.ModuleList([nn.LayerNorm(h, eps=eps) for _ in range(cfg["context_layers"])])
        self.ctx = nn.ModuleList([nn.Linear(3 * h, h) for _ in range(cfg["context_layers"])])
        self.head_norm = nn.LayerNorm(h, eps=eps)
        self.head = nn.Linear(h, CLASSES)

    def forward(self, x):
        x = F.pixel_unshuffle(x, 2)
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            x = F.max_pool2d(x, 2) if i == 0 else F.max_pool2d(x, (2, 1))
        b, c, hh, t = x.shape
        x = x.permute(0, 3, 2, 1).reshape(b, t, hh * c)
        x = F.gelu(self.proj_norm(self.proj(x)), approximate="tanh")
        for norm, lin in zip(self.ctx_norm, self.ctx):
            n = norm(x)
            p = F.pad(n, (0, 0, 1, 1))
            cat = torch.cat([p[:, 0:t], p[:, 1:t + 1], p[:, 2:t + 2]], dim=2)
            x = x + F.gelu(lin(cat), approximate="tanh")
        return self.head(self.head_norm(x))


def save_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().contiguous().to(torch.float32).numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def main():
    torch.manual_seed(7)
    m = Reader(CFG).eval()
    with torch.no_grad():
        for p in m.parameters():  # non-trivial norms and biases too
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 0.3))
    x = torch.rand(2, 1, CFG["height"], 40)
    with torch.no_grad():
        y = m(x)
    names = {}
    for i, conv in enumerate(m.convs):
        names[f"reader.conv.{i}.weight"] = conv.weight
        names[f"reader.conv.{i}.bias"] = conv.bias
    for k in ["proj", "head"]:
        names[f"reader.{k}.weight"] = getattr(m, k).weight
        names[f"reader.{k}.bias"] = getattr(m, k).bias
    for k in ["proj_norm", "head_norm"]:
        names[f"reader.{k}.weight"] = getattr(m, k).weight
        names[f"reader.{k}.bias"] = getattr(m, k).bias
    for i, (n, l) in enumerate(zip(m.ctx_norm, m.ctx)):
        names[f"reader.context.{i}.norm.weight"] = n.weight
        names[f"reader.context.{i}.norm.bias"] = n.bias
        names[f"reader.context.{i}.weight"] = l.weight
        names[f"reader.context.{i}.bias"] = l.bias
    os.makedirs(OUT, exist_ok=True)
    save_safetensors(os.path.join(OUT, "model.safetensors"), names)
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(CFG, f, indent=2)
    x.numpy().astype("<f4").tofile(os.path.join(OUT, "input.f32"))
    y.numpy().astype("<f4").tofile(os.path.join(OUT, "logits.f32"))
    print(f"wrote {OUT}: logits {tuple(y.shape)}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
