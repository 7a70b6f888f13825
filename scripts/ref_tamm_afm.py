#!/usr/bin/env python3
"""Apple's own reference for DeviceModel: a seeded random tamm AFMTextV7 (PyPI `tamm` 0.2.0).

Writes tests/fixtures/tamm_afm_tiny/ (checked by lm/tests/tamm_parity.rs):

* config.json       our LmConfig schema (lm/README.md): 8 layers of which the last 3 reuse
                    the K/V of layer 4 (5:3), 4 query heads x 16, 2 K/V heads, SwiGLU 208
                    (tamm's hidden_dim_scale_factor 3.25), qk_norm, interleaved RoPE with
                    theta 500000, kv_quant, tied embeddings, eps 1e-5.
* model.safetensors the tamm weights under OUR tensor names. Matrices and norm weights are
                    stored as f16 (the random weights are rounded to f16 *before* tamm runs,
                    so the f16 file holds exactly the weights tamm used; this keeps the
                    fixture under 1 MB); the KV scales are stored as f32.
* input.json        the token ids, versions, the K/V scales and the effect of the KV fake
                    quantisation on the logits (so the test shows the rounding matters).
* logits.f32        tamm's logits for every position, little-endian f32, row-major (t, vocab).

The model is `AFMTextV7.create_basic_builder(vocab_size=512, hidden_dim=64, num_layers=8,
num_kv_reuse_layers=3, num_heads=4, num_kv_heads=2).build()` followed by
`tamm.ao.arch_optimizers.KVQuantArchOptimizer(freeze_qparams=True).optimize(model)`, which
inserts a `kv_quantizer` (8-bit symmetric fake quantisation, int8 range [-128, 127]) right
before the `kv_cacher` of every *TransformerAttention* layer, i.e. the block-1 layers only (the
KV-reuse layers are `KVReuseTransformerAttention` and have no K/V of their own). tamm derives
each scale from an observer buffer `range = (min, max)` as
`scale = max(min / -128, max / 127)`; we calibrate `range` on an unquantised pass
(+-0.9 x the largest |k| or |v| of the layer, so values round *and* a few clip) and export the
scale tamm actually uses (`calculate_qparams()`), in f32.

Name mapping, tamm state_dict -> ours (b1 = 5 block-1 layers; i < b1, j < 3):

  embedding.weight                                        model.embed_tokens.weight
  output_transform.weight   (tied: the same tensor)       (omitted, tie_word_embeddings)
  output_norm.weight                                      model.norm.weight
  layers.segment_0.layer_{i}.attention.norm.weight        model.layers.{i}.input_layernorm.weight
  layers.segment_0.layer_{i}.attention.qkv_transform.fused_linear.weight (q 64 + k 32 + v 32, 64)
      rows   0..64  -> model.layers.{i}.self_attn.q_proj.weight
      rows  64..96  -> model.layers.{i}.self_attn.k_proj.weight
      rows  96..128 -> model.layers.{i}.self_attn.v_proj.weight
  layers.segment_0.layer_{i}.attention.qk_norm.query_norm.weight  ...self_attn.q_norm.weight
  layers.segment_0.layer_{i}.attention.qk_norm.key_norm.weight    ...self_attn.k_norm.weight
  layers.segment_0.layer_{i}.attention.kv_quantizer.{key,value}_quantizer
      .activation_post_process.range (2,) (observer buffer) ...self_attn.{k,v}_scale (1), f32,
                                                          = calculate_qparams()[0]
      (.activation_post_process.num_samples, a counter, has no counterpart)
  layers.segment_0.layer_{i}.attention.output_transform.weight    ...self_attn.o_proj.weight
  layers.segment_0.layer_{i}.feed_forward.norm.weight     model.layers.{i}.post_attention_layernorm.weight
  layers.segment_0.layer_{i}.feed_forward.hidden_transform.linear_0.weight  ...mlp.gate_proj.weight
      (linear_0 is SwiGLU's gate_input: silu(linear_0 x) * linear_1 x)
  layers.segment_0.layer_{i}.feed_forward.hidden_transform.linear_1.weight  ...mlp.up_proj.weight
  layers.segment_0.layer_{i}.feed_forward.output_transform.weight           ...mlp.down_proj.weight
  layers.segment_1.layer_{j}.attention.norm.weight        model.layers.{b1+j}.input_layernorm.weight
  layers.segment_1.layer_{j}.attention.q_transform.weight model.layers.{b1+j}.self_attn.q_proj.weight
  layers.segment_1.layer_{j}.attention.q_norm.query_norm.weight   ...{b1+j}.self_attn.q_norm.weight
  layers.segment_1.layer_{j}.attention.output_transform.weight    ...{b1+j}.self_attn.o_proj.weight
  layers.segment_1.layer_{j}.feed_forward.*               as in segment_0, under model.layers.{b1+j}

No permutation is needed: tamm's RoPE already rotates adjacent pairs (rope_interleaved), with
frequencies theta^(-2i/head_dim), and it ropes the full head dim. A block-1 attention runs
norm -> qkv_transform -> rope_transform -> qk_norm -> kv_quantizer -> kv_cacher -> SDPA, and the
K/V that the last block-1 layer's SDPA receives (roped, k-normed, quantised, cache included)
is what every KV-reuse layer attends to; block-2 queries are roped at their own positions,
then q-normed.

Usage: /path/to/venv/bin/python scripts/ref_tamm_afm.py   (needs torch, tamm==0.2.0,
safetensors)
"""
import json
import os

import torch
from safetensors.torch import save_file

import tamm
from tamm.ao.arch_optimizers import KVQuantArchOptimizer
from tamm.models.afm_text import AFMTextV7

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/tamm_afm_tiny")
IDS = [1, 17, 200, 3, 99, 45, 45, 250, 7, 128, 511, 2]
SEED = 20250717
V, H, L, R, NH, NKV = 512, 64, 8, 3, 4, 2
B1 = L - R
HD = H // NH
THETA = 500000.0
CLIP = 0.9  # scale = CLIP * amax / 127: most values round, the largest few clip


def build():
    torch.manual_seed(SEED)
    m = AFMTextV7.create_basic_builder(
        vocab_size=V, hidden_dim=H, num_layers=L, num_kv_reuse_layers=R, num_heads=NH,
        num_kv_heads=NKV, rope_theta=THETA,
    ).build().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():  # tied output weight appears once (embedding)
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
            p.copy_(p.half().float())  # exactly representable in the f16 fixture
    return m


def logits_of(m):
    with torch.no_grad():
        return m(torch.tensor([IDS])).logits[0].float()


def kv_amax(m):
    """|k|, |v| maxima per block-1 layer, as the kv_cacher sees them (after RoPE, k-norm)."""
    amax, hooks = {}, []
    for i, layer in enumerate(m.layers.segment_0.children()):
        def hook(mod, args, kwargs, i=i):
            _, k, v = args[:3]
            amax[i] = (k.abs().max().item(), v.abs().max().item())
        hooks.append(layer.attention.kv_cacher.register_forward_pre_hook(hook, with_kwargs=True))
    logits_of(m)
    for h in hooks:
        h.remove()
    return amax


def main():
    m = build()
    assert m.output_transform.weight.data_ptr() == m.embedding.weight.data_ptr(), "not tied"
    plain = logits_of(m)
    amax = kv_amax(m)

    KVQuantArchOptimizer(freeze_qparams=True).optimize(m)
    m.eval()
    scales = []
    with torch.no_grad():
        for i, layer in enumerate(m.layers.segment_0.children()):
            q = layer.attention.kv_quantizer
            pair = []
            for fq, a in zip((q.key_quantizer, q.value_quantizer), amax[i]):
                obs = fq.activation_post_process
                obs.range.copy_(torch.tensor([-CLIP * a, CLIP * a]))
                obs.num_samples.fill_(1)
                pair.append(obs.calculate_qparams()[0].float().reshape(1))
            scales.append(pair)
        for layer in m.layers.segment_1.children():
            assert not hasattr(layer.attention, "kv_quantizer"), "KV-reuse layer was quantised"
    logits = logits_of(m)
    assert torch.equal(logits, logits_of(m)), "observers must stay frozen in eval mode"
    quant_effect = (logits - plain).abs().max().item()

    sd = m.state_dict()
    t = {"model.embed_tokens.weight": sd["embedding.weight"],
         "model.norm.weight": sd["output_norm.weight"]}
    assert torch.equal(sd["output_transform.weight"], sd["embedding.weight"])
    qd, kvd = H, NKV * HD

    def common(src, dst):
        t[f"{dst}.input_layernorm.weight"] = sd[f"{src}.attention.norm.weight"]
        t[f"{dst}.self_attn.o_proj.weight"] = sd[f"{src}.attention.output_transform.weight"]
        t[f"{dst}.post_attention_layernorm.weight"] = sd[f"{src}.feed_forward.norm.weight"]
        ht = f"{src}.feed_forward.hidden_transform"
        t[f"{dst}.mlp.gate_proj.weight"] = sd[f"{ht}.linear_0.weight"]
        t[f"{dst}.mlp.up_proj.weight"] = sd[f"{ht}.linear_1.weight"]
        t[f"{dst}.mlp.down_proj.weight"] = sd[f"{src}.feed_forward.output_transform.weight"]

    for i in range(B1):
        src, dst = f"layers.segment_0.layer_{i}", f"model.layers.{i}"
        common(src, dst)
        w = sd[f"{src}.attention.qkv_transform.fused_linear.weight"]
        assert w.shape == (qd + 2 * kvd, H)
        t[f"{dst}.self_attn.q_proj.weight"] = w[:qd]
        t[f"{dst}.self_attn.k_proj.weight"] = w[qd:qd + kvd]
        t[f"{dst}.self_attn.v_proj.weight"] = w[qd + kvd:]
        t[f"{dst}.self_attn.q_norm.weight"] = sd[f"{src}.attention.qk_norm.query_norm.weight"]
        t[f"{dst}.self_attn.k_norm.weight"] = sd[f"{src}.attention.qk_norm.key_norm.weight"]
    for j in range(R):
        src, dst = f"layers.segment_1.layer_{j}", f"model.layers.{B1 + j}"
        common(src, dst)
        t[f"{dst}.self_attn.q_proj.weight"] = sd[f"{src}.attention.q_transform.weight"]
        t[f"{dst}.self_attn.q_norm.weight"] = sd[f"{src}.attention.q_norm.query_norm.weight"]
    t = {k: v.detach().contiguous().half() for k, v in t.items()}
    for i, (ks, vs) in enumerate(scales):
        t[f"model.layers.{i}.self_attn.k_scale"] = ks.contiguous()
        t[f"model.layers.{i}.self_attn.v_scale"] = vs.contiguous()

    # every tamm weight is mapped: parameter counts agree (the tied output counted once)
    n_tamm = sum(p.numel() for p in m.parameters())
    n_ours = sum(v.numel() for k, v in t.items() if not k.endswith("_scale"))
    assert n_tamm == n_ours, (n_tamm, n_ours)

    os.makedirs(OUT, exist_ok=True)
    save_file(t, os.path.join(OUT, "model.safetensors"))
    cfg = {
        "architectures": ["AFMTextV7"],
        "vocab_size": V, "hidden_size": H, "intermediate_size": round(H * 3.25),
        "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NKV,
        "head_dim": HD, "rms_norm_eps": 1e-5, "rope_theta": THETA,
        "max_position_embeddings": 64, "tie_word_embeddings": True,
        "num_kv_reuse_layers": R, "qk_norm": True, "rope_interleaved": True, "kv_quant": True,
    }
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    logits.numpy().astype("<f4").tofile(os.path.join(OUT, "logits.f32"))
    with open(os.path.join(OUT, "input.json"), "w") as f:
        json.dump({
            "ids": IDS, "seed": SEED, "tamm": tamm.__version__, "torch": torch.__version__,
            "kv_scales": [[s.item() for s in p] for p in scales],
            "kv_quant_effect_max_abs": quant_effect,
        }, f, indent=1)
    print(f"tamm {tamm.__version__}, torch {torch.__version__}: logits {tuple(logits.shape)}, "
          f"|logit| max {logits.abs().max():.3f}; KV fake quantisation moves logits by up to "
          f"{quant_effect:.3e}; written to {OUT}")


if __name__ == "__main__":
    main()
