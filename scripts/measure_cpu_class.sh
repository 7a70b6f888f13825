#!/usr/bin/env bash
# Every figure of the README's per-CPU-class performance table, measured on this machine in one
# unattended run: the references are built and the checkpoints generated first, then each
# `afm bench` command runs alone, one after the other. For a session that lands on a CPU class
# whose table is stale (issue 20: AVX2-only CPUs such as AMD Zen 3 or Intel client chips).
#
# Usage: scripts/measure_cpu_class.sh [OUT]          (default: target/cpu-class)
#   OUT/report.md   every command with the tables it printed (stdout), the CPU line and the load,
#                   assembled from OUT/STEP.md
#   OUT/STEP.log    each step's full output; a step whose log ends in "STEP OK" is skipped on a
#                   second run (delete the log to measure it again), so the run is resumable
# Env:
#   STEPS           which steps, in order (default: "setup lm busy 3b serve vision vlm")
#   THREADS         --threads of every bench (default: all logical CPUs)
#   AFM_PROXY_AVX2=1  the AVX2 class on an AVX-512 machine: afm built without its `avx512-gemm`
#                   feature and run with AFM_ISA=avx2, llama.cpp built with LLAMA_ISA=avx2, and
#                   PyTorch capped to AVX2 (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS,
#                   ONEDNN_MAX_CPU_ISA, and FBGEMM_ENABLE_INSTRUCTIONS for its int8 backend). A
#                   proxy, not a substitute for the CPU class itself: memory, caches and clocks
#                   stay the host's.
#   PYTHON          the Python that makes the venv for PyTorch (default: python3)
#   CARGO_TARGET_DIR  as for cargo (default: target)
# Needs: cargo, a C/C++ compiler, Python with venv and pip, and PyPI (PyTorch's wheels are ~3 GB).
# Takes about an hour on 2 cores: builds ~20 min (afm, llama.cpp), benches ~40 min. Nothing else
# should run meanwhile (a build or a training run on the same cores makes every ratio wrong);
# each step logs `uptime` before it starts.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-target/cpu-class}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS=${STEPS:-setup lm busy 3b serve vision vlm}
THREADS=${THREADS:-$(nproc)}
PY=${PYTHON:-python3}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PROXY=${AFM_PROXY_AVX2:-0}

AFM="$OUT/afm"
VENV="$OUT/venv-torch"
SMOLLM="$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf"
VLM_DIR="$OUT/smolvlm-256m-random"
GGUF_3B="$OUT/afm-3b-2bit.gguf"
if [ "$PROXY" = 1 ]; then
  LLAMA="$OUT/llama.cpp-avx2"
  export AFM_ISA=avx2
  export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
  export FBGEMM_ENABLE_INSTRUCTIONS=AVX2
else
  LLAMA="$OUT/llama.cpp"
fi
REPORT="$OUT/report.md"
ALL_STEPS="setup lm busy 3b serve vision vlm"

# Runs one command of a step: its stdout (the tables) goes to the step's report part and the
# log, its stderr (progress, per-run figures) to the log only.
bench() {
  local log=$1; shift
  local md=${log%.log}.md
  {
    echo
    echo "\`\`\`"
    echo "\$ $*"
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), load average$(uptime | sed 's/.*load average//')"
  } | tee -a "$md" >> "$log"
  "$@" 2>> "$log" | tee -a "$log" >> "$md"
  echo "\`\`\`" >> "$md"
}

step_setup() {
  local log=$1
  if [ "$PROXY" = 1 ]; then
    # gemm's AVX-512 kernels stay out of the build; AFM_ISA caps afm's own kernels at run time
    cargo build --release -p afm --bins --no-default-features >> "$log" 2>&1
  else
    cargo build --release -p afm --bins >> "$log" 2>&1
  fi
  cp "$TARGET/release/afm" "$AFM"
  bash scripts/fetch_smollm2.sh >> "$log" 2>&1
  if [ "$PROXY" = 1 ]; then
    LLAMA_ISA=avx2 LLAMA_TARGETS="llama-bench llama-server" bash scripts/build_llamacpp.sh "$LLAMA" >> "$log" 2>&1
  else
    LLAMA_TARGETS="llama-bench llama-completion llama-server" bash scripts/build_llamacpp.sh "$LLAMA" >> "$log" 2>&1
  fi
  if ! "$VENV/bin/python" -c "import torch, transformers" 2>/dev/null; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch transformers numpy pillow safetensors >> "$log" 2>&1
  fi
  if [ ! -f "$VLM_DIR/model.safetensors" ]; then
    HF_HUB_OFFLINE=1 "$VENV/bin/python" scripts/ref_hf_idefics3.py --full "$VLM_DIR" --skip-tiny >> "$log" 2>&1
  fi
  if [ ! -f "$GGUF_3B" ]; then
    "$AFM" device-gen --preset afm-3b --weights 2 --embeddings 4 --kv 8 --tokenizer "$SMOLLM" \
      --out "$GGUF_3B" >> "$log" 2>&1
  fi
  {
    echo "# afm on $(hostname): $(git rev-parse --short HEAD), $(date -u '+%Y-%m-%d')"
    echo
    if [ "$PROXY" = 1 ]; then echo "AVX2 proxy (AFM_PROXY_AVX2=1): afm without avx512-gemm, AFM_ISA=avx2; llama.cpp LLAMA_ISA=avx2; PyTorch capped to AVX2."; fi
    echo
    echo "\`\`\`"
    "$AFM" bench lm --no-reference --processes 1 --runs 1 --new-tokens 2 2>&1 | grep -m1 '^cpu: ' || true
    lscpu | grep -E '^(Model name|CPU family|Model|Thread|Core|Socket|CPU max MHz|L2|L3)' || true
    echo "PyTorch: $("$VENV/bin/python" -c 'import torch, transformers; print(torch.__version__, "/ transformers", transformers.__version__, "/", torch.backends.cpu.get_cpu_capability())')"
    echo "\`\`\`"
  } > "$OUT/setup.md"
}

LB="$LLAMA/bin/llama-bench"
step_lm() {
  local log=$1
  echo -e "\n## SmolLM2-135M Q4_1 against llama-bench (three invocations)" >> "${log%.log}.md"
  for _ in 1 2 3; do
    bench "$log" "$AFM" --threads "$THREADS" bench lm --llama-bench "$LB" --prompt-tokens 85
  done
}
step_busy() {
  local log=$1
  echo -e "\n## A busy machine (a busy loop holds one core)" >> "${log%.log}.md"
  bench "$log" "$AFM" --threads "$THREADS" bench lm --llama-bench "$LB" --prompt-tokens 85 --busy
  bench "$log" "$AFM" --threads "$THREADS" bench vision --no-reference --busy
  bench "$log" "$AFM" --threads "$THREADS" bench server --busy
}
step_3b() {
  local log=$1
  echo -e "\n## The 3.1B on-device model (2-bit, random weights) against the bandwidth limit" >> "${log%.log}.md"
  for _ in 1 2; do
    bench "$log" "$AFM" --threads "$THREADS" bench lm --model "$GGUF_3B" --prompt-tokens 16 \
      --new-tokens 33 --no-reference --processes 1 --runs 3
  done
}
step_serve() {
  local log=$1
  echo -e "\n## afm serve against llama-server" >> "${log%.log}.md"
  bench "$log" "$AFM" --threads "$THREADS" bench serve --llama-server "$LLAMA/bin/llama-server" \
    --prefix-cache --repeat 5
}
step_vision() {
  local log=$1
  echo -e "\n## SigLIP-B/16-512 per tile against PyTorch" >> "${log%.log}.md"
  bench "$log" "$AFM" --threads "$THREADS" bench vision --int8 --python "$VENV/bin/python"
}
step_vlm() {
  local log=$1
  echo -e "\n## SmolVLM-256M (random weights, full size) against transformers" >> "${log%.log}.md"
  bench "$log" "$AFM" --threads "$THREADS" bench vlm --model "$VLM_DIR" --python "$VENV/bin/python"
  bench "$log" "$AFM" --threads "$THREADS" bench vlm --model "$VLM_DIR" --python "$VENV/bin/python" --int8
}

for s in $STEPS; do
  case " $ALL_STEPS " in
    *" $s "*) ;;
    *) echo "unknown step '$s' (steps: $ALL_STEPS)" >&2; exit 2 ;;
  esac
done
trap 'echo "${s:-?}: FAILED at line $LINENO, see ${log:-$OUT}" >&2' ERR
for s in $STEPS; do
  log="$OUT/$s.log"
  if [ -f "$log" ] && [ "$(tail -n1 "$log")" = "STEP OK" ]; then
    echo "$s: done before ($log)"
    continue
  fi
  if [ "$s" != setup ] && [ ! -x "$AFM" ]; then
    echo "$s: run the setup step first ($AFM is missing)" >&2
    exit 1
  fi
  echo "$s: started $(date -u '+%H:%M:%S'), log $log"
  : > "$log"
  [ "$s" = setup ] || : > "$OUT/$s.md"
  "step_$s" "$log"
  echo "STEP OK" >> "$log"
done
for s in $ALL_STEPS; do
  if [ -f "$OUT/$s.md" ]; then cat "$OUT/$s.md"; fi
done > "$REPORT"
echo "report: $REPORT"
