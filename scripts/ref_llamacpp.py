#!/usr/bin/env python3
"""Reference outputs of llama.cpp (PyPI llama-cpp-python) for the real SmolLM2 GGUF.

Writes tests/fixtures/llamacpp/: for each chat prompt, the rendered prompt text (the GGUF's own
Jinja chat template, rendered with jinja2 as llama-cpp-python does), llama.cpp's prompt token
ids, 64 greedy tokens (not stopping at EOS, so every run compares 64), the top-2 logit gap at
every step, and the first-token logits (raw little-endian f32); plus llama.cpp's token ids for
a set of tokenizer probe strings. The Rust test `tests/llamacpp_parity.rs` reads them.

Usage: python scripts/ref_llamacpp.py MODEL.gguf OUT_DIR   (run through scripts/fixtures.sh)
"""
import ctypes
import json
import os
import sys

import jinja2
import numpy as np
from llama_cpp import Llama, llama_cpp

N_NEW = 64

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Write a short poem about the sea and the wind, in four lines."}],
    [{"role": "user", "content": "List three uses of a paperclip. Number them 1 to 3 and explain each in one sentence."}],
]

PROBES = [
    "Hello world",
    "  leading spaces and\ttabs\nnewlines\n\n",
    "Numbers: 12345 and 3.14159, 2024-11-24",
    "Unicode: café, naïve, 東京, Ελληνικά, emoji 🙂👍🏽",
    "Code: fn main() { println!(\"{}\", x + 1); }",
    "<|im_start|>user\nHi<|im_end|>",
    "don't won't I'm we'll they've",
]


def main():
    model_path, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    llm = Llama(model_path=model_path, n_ctx=2048, n_threads=2, n_batch=512,
                logits_all=False, verbose=False, seed=0)
    template = llm.metadata["tokenizer.chat_template"]
    env = jinja2.Environment(loader=jinja2.BaseLoader())
    ctx = llm.ctx
    n_vocab = llm.n_vocab()

    def logits_last():
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

    out = {"model": os.path.basename(model_path), "llama_cpp_python": __import__("llama_cpp").__version__,
           "n_new": N_NEW, "prompts": [], "probes": []}
    for i, msgs in enumerate(PROMPTS):
        text = env.from_string(template).render(messages=msgs, add_generation_prompt=True,
                                                bos_token="", eos_token="")
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        first = logits_last()
        gen, gaps = [], []
        cur = first
        for _ in range(N_NEW):
            top2 = np.sort(cur)[-2:]
            gaps.append(float(top2[1] - top2[0]))
            nxt = int(np.argmax(cur))
            gen.append(nxt)
            llm.eval([nxt])
            cur = logits_last()
        fname = f"first_logits_{i}.f32"
        first.astype("<f4").tofile(os.path.join(out_dir, fname))
        out["prompts"].append({"messages": msgs, "text": text, "ids": ids, "generated": gen,
                               "top2_gaps": gaps, "first_logits_file": fname,
                               "generated_text": llm.detokenize(gen).decode("utf-8", "replace")})
        print(f"prompt {i}: {len(ids)} tokens -> {llm.detokenize(gen[:24]).decode('utf-8', 'replace')!r}")
    for s in PROBES:
        out["probes"].append({"text": s, "ids": llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)})
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
