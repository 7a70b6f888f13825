#!/usr/bin/env python3
"""PyTorch side of `afm bench vlm`: HF transformers' Idefics3ForConditionalGeneration (f32,
CPU) on a SmolVLM checkpoint directory (e.g. the random full-size SmolVLM-256M from
`scripts/ref_hf_idefics3.py --full DIR`), one 512x512 image and a short question, greedy.

Measures, per run, in one `generate` call: time to first token (from the PIL image: image
processing + vision encoder + connector + prefill, up to the first logits) and the decode
speed over `NEW` further tokens, both from timestamps a logits processor takes at every step
(EOS suppressed with min_new_tokens so every run decodes the same count). Prints one JSON
line. With INT8 = 1 every nn.Linear (vision encoder, connector, language model, output
head) is replaced by PyTorch's dynamic int8 quantisation (`quantize_dynamic`, fbgemm), the
like-for-like reference for `afm bench vlm --int8`.

Usage: python bench_hf_smolvlm.py DIR THREADS NEW RUNS SPLIT(0|1) [INT8(0|1)]
"""
import json
import sys
import time

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, Idefics3ForConditionalGeneration, LogitsProcessor


class Stamps(LogitsProcessor):
    """Records the time at which each step's logits are ready."""

    def __init__(self):
        self.t = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores


def image():
    y, x = np.mgrid[0:512, 0:512]
    arr = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def main():
    d, threads, new, runs, split = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    int8 = len(sys.argv) > 6 and sys.argv[6] == "1"
    torch.set_num_threads(threads)
    proc = AutoProcessor.from_pretrained(d)
    proc.image_processor.do_image_splitting = split
    model = Idefics3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    if int8:
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    img = image()
    ttft, dec, prompt_tokens = [], [], 0
    with torch.inference_mode():
        for i in range(runs + 1):  # the first run warms up
            stamps = Stamps()
            t0 = time.perf_counter()
            inp = proc(text=prompt, images=[img], return_tensors="pt")
            model.generate(**inp, max_new_tokens=new + 1, min_new_tokens=new + 1, do_sample=False,
                           logits_processor=[stamps])
            prompt_tokens = int(inp["input_ids"].shape[1])
            if i > 0:
                ttft.append(stamps.t[0] - t0)
                dec.append((len(stamps.t) - 1) / (stamps.t[-1] - stamps.t[0]))
    print(json.dumps({"ttft": ttft, "decode_tok_s": dec, "prompt_tokens": prompt_tokens,
                      "tiles": int(inp["pixel_values"].shape[1]), "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
