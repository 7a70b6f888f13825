#!/usr/bin/env python3
"""llama.cpp side of `afm bench quant`: one process, one GGUF, the same protocol as afm's worker.

Usage: python bench_llamacpp_ppl.py MODEL.gguf THREADS < input.json
input.json: {"text": [ids], "prompt": [ids], "ctx": N, "new_tokens": N, "runs": N, ...}
Prints one JSON line: load_s, peak_rss_kb (after the speed runs, before the perplexity pass,
whose all-positions logits buffer would otherwise count), prefill_tok_s / decode_tok_s (the
fastest of `runs`, greedy), ppl and scored: the text cut into windows of `ctx` tokens, each a
fresh pass, every position but a window's first scored (as afm's lm/src/perplexity.rs).
"""
import json
import sys
import time

import numpy as np
from llama_cpp import Llama


def peak_rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main():
    model, threads = sys.argv[1], int(sys.argv[2])
    inp = json.load(sys.stdin)
    prompt, new, runs, ctx = inp["prompt"], inp["new_tokens"], max(1, inp["runs"]), inp["ctx"]
    t0 = time.perf_counter()
    llm = Llama(model_path=model, n_ctx=max(512, len(prompt) + new + 8), n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    best_p, best_d = float("inf"), float("inf")
    for _ in range(runs):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(new):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        best_p = min(best_p, t1 - t0)
        best_d = min(best_d, time.perf_counter() - t1)
    rss = peak_rss_kb()
    del llm
    ppl, scored = None, 0
    text = inp["text"]
    if text:
        lp = Llama(model_path=model, n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                   n_batch=ctx, n_ubatch=ctx, logits_all=True, verbose=False)
        nll = 0.0
        for s in range(0, len(text), ctx):
            w = text[s:s + ctx]
            if len(w) < 2:
                continue
            lp.reset()
            lp.eval(w)
            logits = np.asarray(lp.scores[:len(w) - 1], dtype=np.float64)
            m = logits.max(axis=1, keepdims=True)
            lse = np.log(np.exp(logits - m).sum(axis=1)) + m[:, 0]
            tgt = np.asarray(w[1:])
            nll += float((lse - logits[np.arange(len(w) - 1), tgt]).sum())
            scored += len(w) - 1
        ppl = float(np.exp(nll / scored))
    print(json.dumps({"load_s": load_s, "peak_rss_kb": rss, "prefill_tok_s": len(prompt) / best_p,
                      "decode_tok_s": new / best_d, "ppl": ppl, "scored": scored,
                      "kv": "f16"}))


if __name__ == "__main__":
    main()
