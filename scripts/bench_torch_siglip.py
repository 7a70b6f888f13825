#!/usr/bin/env python3
"""PyTorch side of `afm bench vision`: SigLIP-B/16-512 (SmolVLM-256M's vision tower: hidden 768,
12 layers, 12 heads, MLP 3072, 512 px, patch 16) with random weights, encoding a batch of
512x512 tiles on CPU. Prints one JSON line {"secs": [...], "torch": version, "threads": n}.
With INT8 = 1 every nn.Linear is replaced by PyTorch's dynamic int8 quantisation
(`torch.ao.quantization.quantize_dynamic`: int8 weights per tensor, activations quantised
per batch at run time, fbgemm kernels), the reference for `afm bench vision --int8`.

Usage: python bench_torch_siglip.py THREADS TILES RUNS [INT8]
"""
import json
import sys
import time

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel


def main():
    threads, tiles, runs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    int8 = len(sys.argv) > 4 and sys.argv[4] == "1"
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, image_size=512, patch_size=16,
                             layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    model = SiglipVisionModel(cfg).eval()
    if int8:
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(tiles, 3, 512, 512)
    secs = []
    with torch.inference_mode():
        model(pixel_values=x)  # warm-up
        for _ in range(runs):
            t0 = time.perf_counter()
            model(pixel_values=x)
            secs.append(time.perf_counter() - t0)
    print(json.dumps({"secs": secs, "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
