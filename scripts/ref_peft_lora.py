#!/usr/bin/env python3
"""PEFT reference for afm's LoRA adapters (lm/tests/lora_peft.rs).

Builds a seeded tiny random LlamaForCausalLM, wraps it with PEFT
LoraConfig(r=4, lora_alpha=8, all seven projections), sets every lora_B to seeded random
non-zero values (PEFT initialises them to zero, which would test nothing), and writes into
tests/fixtures/peft_lora/:
  base/config.json, base/model.safetensors       the base model (before wrapping)
  adapter/adapter_model.safetensors,
  adapter/adapter_config.json                    PEFT's own adapter files
  input.json                                     the token ids
  logits.f32                                     adapted logits, every position, (n, vocab)
  base_logits.f32                                base logits, same ids

Usage: /path/to/venv/bin/python scripts/ref_peft_lora.py
(needs torch, transformers, peft, safetensors; tests never run it).
"""
import json
import os
import shutil

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/peft_lora")
IDS = [1, 5, 77, 3, 120, 45, 45, 9, 64, 33, 2]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    torch.manual_seed(4321)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=True,
                      hidden_act="silu", attention_bias=False, mlp_bias=False)
    base = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    base.save_pretrained(os.path.join(OUT, "base"), safe_serialization=True)
    for extra in ("generation_config.json",):
        p = os.path.join(OUT, "base", extra)
        if os.path.exists(p):
            os.remove(p)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        base_logits = base(ids).logits[0].float().numpy()

    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    model = get_peft_model(base, lcfg).eval()
    g = torch.Generator().manual_seed(99)
    n_b = 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
                n_b += 1
            elif "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    model.save_pretrained(os.path.join(OUT, "adapter"), safe_serialization=True)
    readme = os.path.join(OUT, "adapter", "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    with torch.no_grad():
        logits = model(ids).logits[0].float().numpy()
    logits.astype("<f4").tofile(os.path.join(OUT, "logits.f32"))
    base_logits.astype("<f4").tofile(os.path.join(OUT, "base_logits.f32"))
    import peft
    import transformers
    with open(os.path.join(OUT, "input.json"), "w") as f:
        json.dump({"ids": IDS, "torch": torch.__version__, "transformers": transformers.__version__,
                   "peft": peft.__version__}, f)
    diff = abs(logits - base_logits).max()
    print(f"{n_b} lora_B set; logits {logits.shape}; max |adapted - base| = {diff:.4f}; in {OUT}")


if __name__ == "__main__":
    main()
