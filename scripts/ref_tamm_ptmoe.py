#!/usr/bin/env python3
"""Apple's own reference for ServerModel: a seeded random tamm PT-MoE (PyPI `tamm` 0.2.0).

Writes tests/fixtures/tamm_ptmoe_tiny/ (checked by lm/tests/tamm_ptmoe_parity.rs):

* config.json       our ServerConfig schema (lm/src/server_model.rs): 2 tracks x 8 layers,
                    track blocks of 4 (2 sync points), hidden 48, 4 query heads x 8 (attention
                    width 32 != hidden, as in tamm's default 4 x 128 in 2048), 2 K/V heads,
                    dense SwiGLU 64, 4 experts per track of SwiGLU 32, top-2, pattern
                    (dense, sparse), attention pattern (local, local, local, global), sliding
                    window 6 (7 visible keys; the 20-token prompt exceeds it), interleaved RoPE
                    theta 500000 on local layers, NoPE on global layers, QK-norm with learned
                    weights, mean track merge, router soft cap 5 (small so that the tanh cap
                    really bends the router logits), tied embeddings, eps 1e-5.
* model.safetensors the tamm weights under OUR tensor names, as f16: the random weights are
                    rounded to f16 *before* tamm runs, so the file holds exactly the weights
                    tamm used (fixture < 1 MB).
* input.json        token ids, seed, versions, the tamm config, and routing facts: the smallest
                    gap between the k-th and (k+1)-th capped router logit over all MoE layers,
                    tracks and tokens (so a float-rounding tie cannot flip a routing decision),
                    and how often each expert is chosen.
* logits.f32        tamm's logits for every position, little-endian f32, row-major (t, vocab).

The model is `AFMParallelTrackMoEConfig(vocab_size=256, num_tracks=2, num_layers_per_track=8,
num_layers_per_track_per_sync_point=4, hidden_dim=48, attention_hidden_dim=32, num_heads=4,
num_kv_heads=2, dense_feed_forward_hidden_dim=64, sparse_feed_forward_hidden_dim=32,
num_experts=4, num_experts_per_token=2, local_attention_window_size=6,
experts_router_logits_cap=5.0, sdpa_implementation="basic").create_model()`; everything else is
tamm's default (attention_layer_pattern (local_rope x 3, global_nope), feed_forward_layer_pattern
(dense, sparse), pre_norm rms_norm, no post/pre-residual/dispatch/combine norms,
scale_qk_norm=True, tracks_combine_op "mean", rope_theta 500000, norm_eps 1e-5, tied output).

tamm semantics, as read in site-packages/tamm (0.2.0):
* layers/transformer/positional_encoding.py SlidingWindowPositionalEncoding: key j is masked
  for query p when |p - j| > window, i.e. keys p-window ..= p are visible (window + 1 keys);
  that is our `sliding_window`. Global layers get the secondary "global_nope" side inputs
  (plain causal mask, no window) and have no rope_transform.
* layers/attention.py TransformerAttention: norm -> qkv_transform -> rope_transform -> qk_norm
  -> kv_cacher -> SDPA (scale 1/sqrt(dim_per_head)) -> output_transform -> residual add.
  RoPE (layers/rope.py) rotates adjacent pairs (rope_interleaved).
* layers/mixture_of_experts/router.py + sampler/top_k.py: logits (cast to f32) -> SoftCap
  cap*tanh(x/cap) -> softmax over all experts -> top-k -> renormalise the k probabilities to
  sum 1 (= softmax over the k selected capped logits, our rule); dispatcher/dropless.py:
  dropless, output = sum_k w_k expert_k(x); experts private to each track; no shared expert,
  no bias.
* layers/transformer/layer_sequence/parallel_track.py: each segment dispatches with ExpandDim
  (copy into every track) and combines with Mean(dim=1) over tracks.

Name mapping, tamm state_dict -> ours. tamm stacks tracks (and experts) in leading dims and
stores linear weights as (in, out), so every matrix is sliced per track [t] (and expert [e])
and TRANSPOSED to our (out, in). s = segment (0, 1), j = layer in segment (0..4),
i = 4 s + j (layer in track), t = track, {p} = model.tracks.{t}.layers.{i}:

  embedding.weight (256, 48)                       model.embed_tokens.weight
  output_transform.weight (tied: same tensor)      (omitted, tie_word_embeddings)
  output_norm.weight (48,)                         model.norm.weight
  layers.segment_{s}.layer_{j}.attention.norm.weight (2, 48)[t]   {p}.input_layernorm.weight
  layers.segment_{s}.layer_{j}.attention.qkv_transform.fused_linear.weight (2, 48, 64)[t].T
      rows  0..32 -> {p}.self_attn.q_proj.weight (32, 48)
      rows 32..48 -> {p}.self_attn.k_proj.weight (16, 48)
      rows 48..64 -> {p}.self_attn.v_proj.weight (16, 48)
  layers.segment_{s}.layer_{j}.attention.qk_norm.query_norm.weight (2, 8)[t]  {p}.self_attn.q_norm.weight
  layers.segment_{s}.layer_{j}.attention.qk_norm.key_norm.weight (2, 8)[t]    {p}.self_attn.k_norm.weight
  layers.segment_{s}.layer_{j}.attention.output_transform.weight (2, 32, 48)[t].T  {p}.self_attn.o_proj.weight
  layers.segment_{s}.layer_{j}.feed_forward.norm.weight (2, 48)[t]  {p}.post_attention_layernorm.weight
  dense layers (j even):
  layers.segment_{s}.layer_{j}.feed_forward.hidden_transform.linear_0.weight (2, 48, 64)[t].T  {p}.mlp.gate_proj.weight
      (linear_0 is SwiGLU's gate: silu(linear_0 x) * linear_1 x)
  layers.segment_{s}.layer_{j}.feed_forward.hidden_transform.linear_1.weight (2, 48, 64)[t].T  {p}.mlp.up_proj.weight
  layers.segment_{s}.layer_{j}.feed_forward.output_transform.weight (2, 64, 48)[t].T           {p}.mlp.down_proj.weight
  MoE layers (j odd):
  layers.segment_{s}.layer_{j}.feed_forward.router.input_transform.weight (2, 48, 4)[t].T      {p}.mlp.router.weight
  layers.segment_{s}.layer_{j}.feed_forward.experts.hidden_transform.linear_0.weight (2, 4, 48, 32)[t, e].T
                                                                                  {p}.mlp.experts.{e}.gate_proj.weight
  layers.segment_{s}.layer_{j}.feed_forward.experts.hidden_transform.linear_1.weight (2, 4, 48, 32)[t, e].T
                                                                                  {p}.mlp.experts.{e}.up_proj.weight
  layers.segment_{s}.layer_{j}.feed_forward.experts.output_transform.weight (2, 4, 32, 48)[t, e].T
                                                                                  {p}.mlp.experts.{e}.down_proj.weight

Usage: /work/venv-ref/bin/python scripts/ref_tamm_ptmoe.py   (a venv outside the repo with
`pip install tamm==0.2.0 torch safetensors numpy`)
"""
import json
import os

import torch
from safetensors.torch import save_file

import tamm
from tamm.models.afm_text import AFMParallelTrackMoEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/tamm_ptmoe_tiny")
IDS = [1, 17, 200, 3, 99, 45, 45, 250, 7, 128, 255, 2, 64, 31, 31, 180, 5, 222, 90, 13]
SEED = 20250718
V, T, L, D = 256, 2, 8, 4  # vocab, tracks, layers per track, track block depth
H, NH, NKV, HD = 48, 4, 2, 8  # hidden, heads, K/V heads, head dim
FF, EFF, E, K = 64, 32, 4, 2  # dense SwiGLU, expert SwiGLU, experts, top-k
WINDOW, CAP, THETA, EPS = 6, 5.0, 500000.0, 1e-5
ROUTER_STD = 0.5  # router logits of a few units: the routing varies and the cap bends them

TAMM_CFG = dict(
    vocab_size=V, num_tracks=T, num_layers_per_track=L, num_layers_per_track_per_sync_point=D,
    hidden_dim=H, attention_hidden_dim=NH * HD, num_heads=NH, num_kv_heads=NKV,
    dense_feed_forward_hidden_dim=FF, sparse_feed_forward_hidden_dim=EFF, num_experts=E,
    num_experts_per_token=K, local_attention_window_size=WINDOW, experts_router_logits_cap=CAP,
    rope_theta=THETA, norm_eps=EPS, sdpa_implementation="basic",
)


def build():
    torch.manual_seed(SEED)
    cfg = AFMParallelTrackMoEConfig(**TAMM_CFG)
    assert tuple(cfg.attention_layer_pattern) == ("local_rope",) * 3 + ("global_nope",)
    assert tuple(cfg.feed_forward_layer_pattern) == ("dense", "sparse")
    assert cfg.tracks_combine_op == "mean" and cfg.scale_qk_norm
    assert cfg.post_norm is None and cfg.pre_residual_norm is None
    assert cfg.tracks_dispatch_norm is None and cfg.tracks_combine_norm is None
    m = cfg.create_model().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():  # tied output weight appears once (embedding)
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "router" in n:
                p.copy_(ROUTER_STD * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
            p.copy_(p.half().float())  # exactly representable in the f16 fixture
    return m


def main():
    m = build()
    assert m.output_transform.weight.data_ptr() == m.embedding.weight.data_ptr(), "not tied"

    # router logits of every MoE layer (before the cap), to check the routing margins
    router_logits, hooks = [], []
    for name, mod in m.named_modules():
        if name.endswith("feed_forward.router.input_transform"):
            hooks.append(mod.register_forward_hook(
                lambda mod, args, out: router_logits.append(out.detach().float())))
    with torch.no_grad():
        logits = m(torch.tensor([IDS])).logits[0].float()
    for h in hooks:
        h.remove()
    assert len(router_logits) == L // 2, len(router_logits)  # one vectorized call per layer
    gaps, counts = [], torch.zeros(E, dtype=torch.long)
    for r in router_logits:  # (1, T, S, E)
        c = CAP * torch.tanh(r / CAP)
        top = c.topk(K + 1, dim=-1)
        gaps.append((top.values[..., K - 1] - top.values[..., K]).min().item())
        counts += torch.bincount(top.indices[..., :K].flatten(), minlength=E)
    min_gap = min(gaps)
    assert min_gap > 1e-3, f"near-tie in routing ({min_gap}); change the seed"
    max_abs_router = max(r.abs().max().item() for r in router_logits)

    with torch.no_grad():  # deterministic
        assert torch.equal(logits, m(torch.tensor([IDS])).logits[0].float())

    sd = m.state_dict()
    assert torch.equal(sd["output_transform.weight"], sd["embedding.weight"])
    t = {"model.embed_tokens.weight": sd["embedding.weight"],
         "model.norm.weight": sd["output_norm.weight"]}
    qd, kvd = NH * HD, NKV * HD
    used = {"embedding.weight", "output_norm.weight", "output_transform.weight"}

    def get(name):
        used.add(name)
        return sd[name]

    for s in range(L // D):
        for j in range(D):
            i = s * D + j
            src = f"layers.segment_{s}.layer_{j}"
            a, f = f"{src}.attention", f"{src}.feed_forward"
            qkv = get(f"{a}.qkv_transform.fused_linear.weight")
            assert qkv.shape == (T, H, qd + 2 * kvd), qkv.shape
            for tr in range(T):
                p = f"model.tracks.{tr}.layers.{i}"
                t[f"{p}.input_layernorm.weight"] = get(f"{a}.norm.weight")[tr]
                w = qkv[tr].T
                t[f"{p}.self_attn.q_proj.weight"] = w[:qd]
                t[f"{p}.self_attn.k_proj.weight"] = w[qd:qd + kvd]
                t[f"{p}.self_attn.v_proj.weight"] = w[qd + kvd:]
                t[f"{p}.self_attn.q_norm.weight"] = get(f"{a}.qk_norm.query_norm.weight")[tr]
                t[f"{p}.self_attn.k_norm.weight"] = get(f"{a}.qk_norm.key_norm.weight")[tr]
                t[f"{p}.self_attn.o_proj.weight"] = get(f"{a}.output_transform.weight")[tr].T
                t[f"{p}.post_attention_layernorm.weight"] = get(f"{f}.norm.weight")[tr]
                if i % 2 == 0:  # dense
                    ht = f"{f}.hidden_transform"
                    t[f"{p}.mlp.gate_proj.weight"] = get(f"{ht}.linear_0.weight")[tr].T
                    t[f"{p}.mlp.up_proj.weight"] = get(f"{ht}.linear_1.weight")[tr].T
                    t[f"{p}.mlp.down_proj.weight"] = get(f"{f}.output_transform.weight")[tr].T
                else:  # sparse
                    t[f"{p}.mlp.router.weight"] = get(f"{f}.router.input_transform.weight")[tr].T
                    ex = f"{f}.experts"
                    for e in range(E):
                        q = f"{p}.mlp.experts.{e}"
                        t[f"{q}.gate_proj.weight"] = get(f"{ex}.hidden_transform.linear_0.weight")[tr, e].T
                        t[f"{q}.up_proj.weight"] = get(f"{ex}.hidden_transform.linear_1.weight")[tr, e].T
                        t[f"{q}.down_proj.weight"] = get(f"{ex}.output_transform.weight")[tr, e].T
    t = {k: v.detach().contiguous().half() for k, v in t.items()}

    # every tamm tensor is mapped, and the parameter counts agree (tied output counted once)
    assert used == set(sd), sorted(set(sd) - used)
    n_tamm = sum(p.numel() for p in m.parameters())
    n_ours = sum(v.numel() for v in t.values())
    assert n_tamm == n_ours, (n_tamm, n_ours)

    os.makedirs(OUT, exist_ok=True)
    save_file(t, os.path.join(OUT, "model.safetensors"))
    os.chmod(os.path.join(OUT, "model.safetensors"), 0o644)  # save_file makes it 0600
    cfg = {
        "vocab_size": V, "hidden_size": H, "intermediate_size": FF,
        "num_tracks": T, "track_block_depth": D, "num_layers_per_track": L,
        "num_attention_heads": NH, "num_key_value_heads": NKV, "head_dim": HD,
        "num_experts": E, "experts_per_token": K, "moe_intermediate_size": EFF, "moe_every": 2,
        "attention_pattern": ["local", "local", "local", "global"], "sliding_window": WINDOW,
        "global_rope": False, "rope_theta": THETA, "rope_interleaved": True,
        "rms_norm_eps": EPS, "qk_norm": True, "tie_word_embeddings": True,
        "track_merge": "mean", "router_softcap": CAP, "max_position_embeddings": 64,
    }
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    logits.numpy().astype("<f4").tofile(os.path.join(OUT, "logits.f32"))
    with open(os.path.join(OUT, "input.json"), "w") as f:
        json.dump({
            "ids": IDS, "seed": SEED, "tamm": tamm.__version__, "torch": torch.__version__,
            "tamm_config": TAMM_CFG,
            "router_min_topk_gap": min_gap,
            "router_max_abs_logit": max_abs_router,
            "expert_counts": counts.tolist(),
        }, f, indent=1)
    print(f"tamm {tamm.__version__}, torch {torch.__version__}: logits {tuple(logits.shape)}, "
          f"|logit| max {logits.abs().max():.3f}; router |logit| max {max_abs_router:.2f}, "
          f"min top-{K} gap {min_gap:.3e}, expert counts {counts.tolist()}; "
          f"{n_ours} parameters; written to {OUT}")


if __name__ == "__main__":
    main()
