#!/usr/bin/env python3
"""llama.cpp side of `afm bench lm`: one process, given token ids, measures prefill and decode.

Usage: python bench_llamacpp.py MODEL.gguf THREADS NEW_TOKENS RUNS < ids.json
Prints one JSON line: {"prefill_s": [...], "decode_s": [...], "peak_rss_kb": N}.
"""
import json
import sys
import time

from llama_cpp import Llama, llama_cpp  # noqa: F401  (reference only, never at run time)


def peak_rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main():
    model, threads, new, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    ids = json.load(sys.stdin)
    llm = Llama(model_path=model, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)
    pre, dec = [], []
    for _ in range(runs):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = llm.sample(temp=0.0)  # greedy from the prefill logits
        t1 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([tok])
            tok = llm.sample(temp=0.0)
        t2 = time.perf_counter()
        pre.append(t1 - t0)
        dec.append(t2 - t1)
    print(json.dumps({"prefill_s": pre, "decode_s": dec, "peak_rss_kb": peak_rss_kb()}))


if __name__ == "__main__":
    main()
