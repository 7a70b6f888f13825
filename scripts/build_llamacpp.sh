#!/usr/bin/env bash
# Builds llama.cpp's own `llama-bench`, `llama-completion`, `llama-quantize`, `llama-perplexity`
# and `llama-server` (the anchor of `afm bench lm`) from the
# llama.cpp source vendored in the llama-cpp-python sdist on PyPI, with GGML_NATIVE (the
# build llama.cpp users get by default).
#
# Usage: scripts/build_llamacpp.sh [OUT_DIR]      (default: target/llama.cpp)
# Env:   PYTHON (default python3; needs pip), LLAMA_CPP_PYTHON_VERSION (default 0.3.36),
#        JOBS (default: number of CPUs), LLAMA_ISA (default native; `avx2` builds for AVX2 +
#        FMA + F16C without AVX-512, the AVX2 class on an AVX-512 machine, to set beside
#        `AFM_ISA=avx2`; `avx2-vnni` adds the 256-bit `vpdpbusd` in the EVEX form an AVX-512
#        VNNI host has, to set beside `AFM_ISA=avx2-vnni`), LLAMA_TARGETS (space-separated,
#        default all five below), LLAMA_PY_VENV (a venv, created if missing: llama-cpp-python
#        is also installed there, built from the same sdist with the same ISA flags: the second
#        reference of `afm bench lm --python LLAMA_PY_VENV/bin/python`).
# Needs a C/C++ compiler; cmake is taken from PATH, else installed from PyPI into OUT_DIR/venv.
# Prints the bin directory last; `afm bench lm --llama-bench OUT_DIR/bin/llama-bench`.
# OUT_DIR/bin/isa names the LLAMA_ISA of the binaries there; asked for another, it rebuilds.
# `llama-completion` is the one-shot command line that llama.cpp called `llama-cli` until late
# 2025 (`llama-cli` is now an interactive chat client built on the server).
set -euo pipefail

OUT=${1:-target/llama.cpp}
VER=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# llama-bench / llama-completion: the speed anchor (`afm bench lm`); llama-quantize and
# llama-perplexity: Q2_K / Q4_K next to afm's formats (`scripts/bench_llamacpp_ppl.py`);
# llama-server: the serving comparison (`afm bench serve`).
TARGETS=(llama-bench llama-completion llama-quantize llama-perplexity llama-server)
if [ -n "${LLAMA_TARGETS:-}" ]; then
  read -r -a TARGETS <<< "$LLAMA_TARGETS"
fi
ISA=${LLAMA_ISA:-native}
# compiler flags beyond ggml's own, passed every time (empty but for avx2-vnni), so that a
# build directory reused for another ISA does not keep the last one's from the CMake cache
EXTRA_FLAGS=
case "$ISA" in
  native) ISA_FLAGS=(-DGGML_NATIVE=ON) ;;
  avx2) ISA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                   -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF) ;;
  # AVX2 + the 256-bit `vpdpbusd` in its EVEX form, for an AVX-512 VNNI host standing in for
  # AVX-VNNI CPUs (whose VEX form it lacks): ggml's AVX2 paths take `_mm256_dpbusd_epi32`
  # when __AVX512VNNI__ and __AVX512VL__ are defined; __AVX512F__ is undefined so its 512-bit
  # paths stay off, and the vectoriser keeps to 256 bits. The compiler may still use EVEX-only
  # forms in 256-bit code (32 registers, masks), which an AVX-VNNI CPU lacks: if anything, this
  # build is faster than llama.cpp's own AVX-VNNI build there.
  avx2-vnni)
    EXTRA_FLAGS="-mavx512vnni -mavx512vl -mprefer-vector-width=256 -U__AVX512F__"
    ISA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
               -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF) ;;
  *) echo "LLAMA_ISA=$ISA: expected native, avx2 or avx2-vnni" >&2; exit 2 ;;
esac
SDIST="$OUT/llama_cpp_python-$VER.tar.gz"
if [ ! -f "$SDIST" ]; then
  # the sdist only (build dependencies come as wheels; nothing is compiled here)
  "$PY" -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VER" -d "$OUT" >&2
fi

# llama-cpp-python in LLAMA_PY_VENV, from the same sdist and with the same ISA flags (pip builds
# it with cmake through scikit-build-core, from CMAKE_ARGS); VENV/llama-isa names its build
if [ -n "${LLAMA_PY_VENV:-}" ]; then
  PYV="$LLAMA_PY_VENV"
  [ -x "$PYV/bin/python" ] || "$PY" -m venv "$PYV" >&2
  if [ "$(cat "$PYV/llama-isa" 2>/dev/null)" != "$ISA $VER" ] \
      || ! "$PYV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    rm -f "$PYV/llama-isa"
    "$PYV/bin/pip" uninstall --quiet -y llama-cpp-python > /dev/null 2>&1 || true
    # --no-cache-dir: a wheel cached from another ISA's build is not reused
    CMAKE_ARGS="${ISA_FLAGS[*]} -DCMAKE_C_FLAGS='$EXTRA_FLAGS' -DCMAKE_CXX_FLAGS='$EXTRA_FLAGS'" \
      "$PYV/bin/pip" install --no-cache-dir "$SDIST" >&2
    "$PYV/bin/python" -c "import llama_cpp" >&2
    echo "$ISA $VER" > "$PYV/llama-isa"
  fi
fi

# OUT/bin/isa names the build the binaries are (a directory from before it holds native ones)
have=1
for t in "${TARGETS[@]}"; do [ -x "$OUT/bin/$t" ] || have=0; done
built=$(cat "$OUT/bin/isa" 2>/dev/null || echo native)
if [ "$have" = 1 ] && [ "$built" = "$ISA" ]; then
  echo "$OUT/bin"
  exit 0
fi
if [ "$have" = 1 ]; then
  echo "$OUT/bin holds a $built build; rebuilding it for $ISA" >&2
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
  "${ISA_FLAGS[@]}" "-DCMAKE_C_FLAGS=$EXTRA_FLAGS" "-DCMAKE_CXX_FLAGS=$EXTRA_FLAGS" \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >&2
"$CMAKE" --build "$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}" >&2
mkdir -p "$OUT/bin"
rm -f "$OUT/bin/isa"
for t in "${TARGETS[@]}"; do cp "$BUILD/bin/$t" "$OUT/bin/"; done
echo "$ISA" > "$OUT/bin/isa"
echo "$OUT/bin"
