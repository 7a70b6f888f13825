#!/usr/bin/env python3
"""llama.cpp's own quantizer through llama-cpp-python (no C++ tools needed).

Usage: python llamacpp_quantize.py IN.gguf OUT.gguf TYPE [THREADS]
TYPE is a llama.cpp file type name without its prefix: Q2_K, Q3_K_M, Q4_K_M, Q4_0, ...
Requantizing an already quantized file is allowed (as `llama-quantize --allow-requantize`).
Prints the output's size in bytes.
"""
import ctypes
import os
import sys

import llama_cpp


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    src, dst, kind = sys.argv[1], sys.argv[2], sys.argv[3].upper()
    name = f"LLAMA_FTYPE_MOSTLY_{kind}"
    if not hasattr(llama_cpp, name):
        sys.exit(f"unknown llama.cpp file type {kind!r} (no llama_cpp.{name})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, name)
    params.allow_requantize = True
    params.nthread = int(sys.argv[4]) if len(sys.argv) == 5 else 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize failed ({rc})")
    print(os.path.getsize(dst))


if __name__ == "__main__":
    main()
