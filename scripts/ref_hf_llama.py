#!/usr/bin/env python3
"""HF transformers references for the dense decoder (DeviceModel with sharing off = llama).

1. tests/fixtures/hf_tiny_llama/: a seeded random LlamaForCausalLM (GQA 4:2, tied embeddings,
   HF rotate-half RoPE) saved as config.json + model.safetensors, and its logits for every
   position of a fixed 12-token input (logits.f32, row-major (12, vocab)).
2. tests/fixtures/llamacpp/hf_dequant_logits_{i}.f32: the real SmolLM2 GGUF loaded by
   transformers (which dequantizes it to f32 and un-permutes Q/K), last-position logits for the
   same chat prompts as the llama.cpp reference. This is an independent check of our f32 math
   on real weights, free of llama.cpp's activation quantisation.

Usage: python scripts/ref_hf_llama.py [MODEL.gguf]   (run through scripts/fixtures.sh)
"""
import json
import os
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = [1, 17, 200, 3, 99, 45, 45, 250, 7, 128, 64, 2]


def tiny():
    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=True,
                      hidden_act="silu", attention_bias=False, mlp_bias=False)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    out = os.path.join(ROOT, "tests/fixtures/hf_tiny_llama")
    os.makedirs(out, exist_ok=True)
    m.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        logits = m(torch.tensor([IDS])).logits[0].float().numpy()
    logits.astype("<f4").tofile(os.path.join(out, "logits.f32"))
    with open(os.path.join(out, "input.json"), "w") as f:
        json.dump({"ids": IDS, "torch": torch.__version__}, f)
    print("tiny llama: logits", logits.shape, "saved to", out)


def real(gguf):
    d, name = os.path.split(os.path.abspath(gguf))
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, torch_dtype=torch.float32).eval()
    ref = json.load(open(os.path.join(ROOT, "tests/fixtures/llamacpp/reference.json")))
    for i, p in enumerate(ref["prompts"]):
        with torch.no_grad():
            lg = m(torch.tensor([p["ids"]])).logits[0, -1].float().numpy()
        lg.astype("<f4").tofile(os.path.join(ROOT, f"tests/fixtures/llamacpp/hf_dequant_logits_{i}.f32"))
        print(f"real prompt {i}: argmax {int(np.argmax(lg))}")


if __name__ == "__main__":
    tiny()
    if len(sys.argv) > 1:
        real(sys.argv[1])
