#!/usr/bin/env bash
# Builds llama.cpp's own `llama-bench` and `llama-completion` (the anchor of `afm bench lm`) from the
# llama.cpp source vendored in the llama-cpp-python sdist on PyPI, with GGML_NATIVE (the
# build llama.cpp users get by default).
#
# Usage: scripts/build_llamacpp.sh [OUT_DIR]      (default: target/llama.cpp)
# Env:   PYTHON (default python3; needs pip), LLAMA_CPP_PYTHON_VERSION (default 0.3.36),
#        JOBS (default: number of CPUs).
# Needs a C/C++ compiler; cmake is taken from PATH, else installed from PyPI into OUT_DIR/venv.
# Prints the bin directory last; `afm bench lm --llama-bench OUT_DIR/bin/llama-bench`.
# `llama-completion` is the one-shot command line that llama.cpp called `llama-cli` until late
# 2025 (`llama-cli` is now an interactive chat client built on the server).
set -euo pipefail

OUT=${1:-target/llama.cpp}
VER=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [ -x "$OUT/bin/llama-bench" ] && [ -x "$OUT/bin/llama-completion" ]; then
  echo "$OUT/bin"
  exit 0
fi

SDIST="$OUT/llama_cpp_python-$VER.tar.gz"
if [ ! -f "$SDIST" ]; then
  # the sdist only (build dependencies come as wheels; nothing is compiled here)
  "$PY" -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VER" -d "$OUT" >&2
fi
SRC="$OUT/src"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
  rm -rf "$SRC" && mkdir -p "$SRC"
  tar -xzf "$SDIST" -C "$SRC" --strip-components=1
fi

CMAKE=$(command -v cmake || true)
if [ -z "$CMAKE" ]; then
  if [ ! -x "$OUT/venv/bin/cmake" ]; then
    "$PY" -m venv "$OUT/venv" >&2
    "$OUT/venv/bin/pip" install -q cmake >&2
  fi
  CMAKE="$OUT/venv/bin/cmake"
fi

BUILD="$OUT/build"
"$CMAKE" -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
"$CMAKE" --build "$BUILD" --config Release -j "$JOBS" --target llama-bench llama-completion >&2
mkdir -p "$OUT/bin"
cp "$BUILD/bin/llama-bench" "$BUILD/bin/llama-completion" "$OUT/bin/"
echo "$OUT/bin"
