#!/usr/bin/env bash
# Every figure of the README's per-CPU-class performance tables (all but the 2-bit row),
# measured on this machine in one unattended run: the references are built and the checkpoints
# generated first, then each `afm bench` command runs alone, one after the other. For a session
# that lands on a CPU class whose table is stale (issue 20: AVX2-only CPUs such as AMD Zen 3 or
# Intel client chips).
#
# Usage: scripts/measure_cpu_class.sh [OUT]
#   (default OUT: target/cpu-class, target/cpu-class-avx2-proxy with AFM_PROXY_AVX2=1, or
#   target/cpu-class-avx2-vnni-proxy with AFM_PROXY_AVX2=vnni)
#   OUT/report.md   every command with the tables it printed (stdout), the CPU line and the load
#                   average before it started, assembled from OUT/STEP.md
#   OUT/STEP.log    each step's full output; a step whose log ends in "STEP OK" is skipped on a
#                   second run (delete the log to measure it again), so the run is resumable.
#                   A step fails when a reference is missing from its output.
#   OUT/mode        native, avx2-proxy or avx2-vnni-proxy: one OUT holds one mode (a mismatch
#                   is refused)
# Env:
#   STEPS           which steps, in order (default: "setup pyref lm busy 3b serve vision vlm";
#                   pyref installs llama-cpp-python, the lm step's second reference, into
#                   OUT/venv-llamacpp, built from the same sdist with llama.cpp's ISA flags)
#   THREADS         --threads of every bench (default: the online logical CPUs)
#   AFM_PROXY_AVX2=1  the AVX2 class on an AVX-512 machine: afm built without its `avx512-gemm`
#                   feature (candle's f32 matmul stops at AVX2) and run with AFM_ISA=avx2 (afm's
#                   own kernels), llama.cpp built with LLAMA_ISA=avx2, and PyTorch capped to
#                   AVX2 (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, and
#                   FBGEMM_ENABLE_INSTRUCTIONS for its int8 backend). A proxy, not a substitute
#                   for the CPU class itself: memory, caches and clocks stay the host's, and
#                   libc's string functions still pick AVX-512. Without it, those variables are
#                   unset.
#   AFM_PROXY_AVX2=vnni  the AVX2 + AVX-VNNI class (Intel client cores since Alder Lake) on an
#                   AVX-512 VNNI host: as above, but afm's kernels run with AFM_ISA=avx2-vnni
#                   (256-bit `vpdpbusd`, in the EVEX form the host has; those CPUs have the VEX
#                   one) and llama.cpp is built with LLAMA_ISA=avx2-vnni (its AVX2 paths with the
#                   same EVEX `vpdpbusd`; llama.cpp's own AVX-VNNI build emits the VEX form, which
#                   Zen 4 cannot run). PyTorch keeps the AVX2 caps: its f32 paths have no use for
#                   VNNI and fbgemm has no AVX-VNNI kernels.
#   PYTHON          the Python that makes the venv for PyTorch (default: python3)
#   CARGO_TARGET_DIR  as for cargo (default: target); the setup step checks that the binary it
#                   copies from there is the one it built (its kernel line)
# Needs: cargo, a C/C++ compiler, Python with venv and pip, and PyPI (PyTorch's wheels are ~3 GB).
# Takes about an hour on 2 cores: builds ~30 min (afm, llama.cpp twice: its binaries and
# llama-cpp-python), benches ~20-40 min. Nothing
# else should run meanwhile (a build or a training run on the same cores makes every ratio
# wrong); each bench command records the load average before it starts.
set -euo pipefail
CALLER=$(pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PROXY=${AFM_PROXY_AVX2:-0}
case "$PROXY" in
  0) MODE=native; DEFAULT_OUT=target/cpu-class ;;
  1) MODE=avx2-proxy; DEFAULT_OUT=target/cpu-class-avx2-proxy ;;
  vnni) MODE=avx2-vnni-proxy; DEFAULT_OUT=target/cpu-class-avx2-vnni-proxy ;;
  *) echo "AFM_PROXY_AVX2=$PROXY: expected 1 (AVX2) or vnni (AVX2 + AVX-VNNI)" >&2; exit 2 ;;
esac
OUT=${1:-$ROOT/$DEFAULT_OUT}
case "$OUT" in /*) ;; *) OUT="$CALLER/$OUT" ;; esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -f "$OUT/mode" ]; then
  if [ "$(cat "$OUT/mode")" != "$MODE" ]; then
    echo "$OUT holds a $(cat "$OUT/mode") run; this is a $MODE run: use another OUT" >&2
    exit 2
  fi
elif compgen -G "$OUT/*.log" > /dev/null; then
  echo "$OUT holds a run without a mode file (older than it): use another OUT, or write its mode (native, avx2-proxy or avx2-vnni-proxy) into $OUT/mode" >&2
  exit 2
fi
ALL_STEPS="setup pyref lm busy 3b serve vision vlm"
STEPS=${STEPS:-$ALL_STEPS}
if [ "$PROXY" = vnni ] && ! grep -qw avx512_vnni /proc/cpuinfo; then
  echo "AFM_PROXY_AVX2=vnni needs a host with AVX-512 VNNI (its EVEX vpdpbusd stands in for AVX-VNNI); on an AVX-VNNI CPU, run without AFM_PROXY_AVX2" >&2
  exit 2
fi
THREADS=${THREADS:-$(getconf _NPROCESSORS_ONLN)}
PY=${PYTHON:-python3}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

AFM="$OUT/afm"
VENV="$OUT/venv-torch"
PYREF="$OUT/venv-llamacpp"
SMOLLM="$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf"
VLM_DIR="$OUT/smolvlm-256m-random"
GGUF_3B="$OUT/afm-3b-2bit.gguf"
# llama.cpp's build (scripts/build_llamacpp.sh's LLAMA_ISA): the proxies' level, as afm's
if [ "$PROXY" != 0 ]; then
  if [ "$PROXY" = vnni ]; then L_ISA=avx2-vnni; else L_ISA=avx2; fi
  LLAMA="$OUT/llama.cpp-$L_ISA"
  export AFM_ISA=$L_ISA
  export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
  export FBGEMM_ENABLE_INSTRUCTIONS=AVX2
else
  L_ISA=native
  LLAMA="$OUT/llama.cpp"
  unset AFM_ISA ATEN_CPU_CAPABILITY MKL_ENABLE_INSTRUCTIONS ONEDNN_MAX_CPU_ISA FBGEMM_ENABLE_INSTRUCTIONS
fi
REPORT="$OUT/report.md"

# `bench LOG EXPECT CMD...` runs one command of a step: its stdout (the tables) goes to the
# step's report part and the log, its stderr (progress, per-run figures) to the log only. The
# step fails when the output lacks a line of EXPECT (a reference that did not run leaves its
# line out).
bench() {
  local log=$1 expect=$2; shift 2
  local md=${log%.log}.md out
  {
    echo
    echo "\`\`\`"
    echo "\$ $*"
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), load average$(uptime | sed 's/.*load average//')"
  } | tee -a "$md" >> "$log"
  out=$("$@" 2>> "$log")
  printf '%s\n' "$out" | tee -a "$log" >> "$md"
  echo "\`\`\`" >> "$md"
  local e
  while IFS= read -r e; do
    if [[ "$out" != *"$e"* ]]; then
      echo "$*: the output lacks \"$e\" (see $log)" >&2
      return 1
    fi
  done <<< "$expect"
}

step_setup() {
  local log=$1
  echo "$MODE" > "$OUT/mode"
  if [ "$PROXY" != 0 ]; then
    # gemm's AVX-512 kernels stay out of the build; AFM_ISA caps afm's own kernels at run time
    cargo build --release -p afm --bins --no-default-features >> "$log" 2>&1
    cp "$TARGET/release/afm" "$AFM"
    # put the ordinary binary back in the target dir (both builds' crates stay cached)
    cargo build --release -p afm --bins >> "$log" 2>&1
  else
    cargo build --release -p afm --bins >> "$log" 2>&1
    cp "$TARGET/release/afm" "$AFM"
  fi
  # the binary copied is the one built: its f32 matmul line says which build it is
  local kernels
  kernels=$("$AFM" bench lm --no-reference --processes 1 --runs 1 --new-tokens 2 2>&1 | grep -m1 '^cpu: ' || true)
  case "$PROXY:$kernels" in
    1:*"kernels: avx2 "*"up to AVX2"*|vnni:*"kernels: avx2-vnni "*"up to AVX2"*|0:*"f32 matmul: gemm"*) ;;
    *) echo "$AFM is not the $MODE build ($kernels); is CARGO_TARGET_DIR right?" >&2; return 1 ;;
  esac
  case "$PROXY:$kernels" in
    0:*"up to AVX2"*) echo "$AFM was built without avx512-gemm; rebuild it" >&2; return 1 ;;
  esac
  bash scripts/fetch_smollm2.sh >> "$log" 2>&1
  local targets="llama-bench llama-server"
  if [ "$PROXY" = 0 ]; then targets="llama-bench llama-completion llama-server"; fi
  LLAMA_ISA=$L_ISA LLAMA_TARGETS="$targets" bash scripts/build_llamacpp.sh "$LLAMA" >> "$log" 2>&1
  # gguf: the SmolVLM script reads SmolLM2's tokenizer from its GGUF through transformers
  if ! "$VENV/bin/python" -c "import torch, transformers, gguf" 2>/dev/null; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch transformers numpy pillow safetensors gguf >> "$log" 2>&1
  fi
  if [ ! -f "$VLM_DIR/model.safetensors" ]; then
    HF_HUB_OFFLINE=1 "$VENV/bin/python" scripts/ref_hf_idefics3.py --full "$VLM_DIR" --skip-tiny >> "$log" 2>&1
  fi
  if [ ! -f "$GGUF_3B" ]; then
    "$AFM" device-gen --preset afm-3b --weights 2 --embeddings 4 --kv 8 --tokenizer "$SMOLLM" \
      --out "$GGUF_3B" >> "$log" 2>&1
  fi
  {
    echo "# afm $(git describe --always --dirty), measured $(date -u '+%Y-%m-%d')"
    echo
    if [ "$PROXY" = 1 ]; then echo "AVX2 proxy (AFM_PROXY_AVX2=1): afm built without avx512-gemm, AFM_ISA=avx2; llama.cpp LLAMA_ISA=avx2; PyTorch capped to AVX2."; fi
    if [ "$PROXY" = vnni ]; then echo "AVX2 + AVX-VNNI proxy (AFM_PROXY_AVX2=vnni): afm built without avx512-gemm, AFM_ISA=avx2-vnni (256-bit vpdpbusd, EVEX-encoded on this host); llama.cpp LLAMA_ISA=avx2-vnni (EVEX vpdpbusd at 256 bits); PyTorch capped to AVX2 (fbgemm has no AVX-VNNI kernels)."; fi
    echo
    echo "\`\`\`"
    echo "$kernels"
    lscpu | grep -E '^(Model name|CPU family|Model|Thread|Core|Socket|CPU max MHz|L2|L3)' || true
    echo "PyTorch: $("$VENV/bin/python" -c 'import torch, transformers; print(torch.__version__, "/ transformers", transformers.__version__, "/", torch.backends.cpu.get_cpu_capability())')"
    echo "\`\`\`"
  } > "$OUT/setup.md"
}

step_pyref() {
  local log=$1
  # the sdist build_llamacpp.sh downloaded in the setup step, built again as a Python package
  LLAMA_ISA=$L_ISA LLAMA_TARGETS=llama-bench LLAMA_PY_VENV="$PYREF" \
    bash scripts/build_llamacpp.sh "$LLAMA" >> "$log" 2>&1
  echo -e "\nSecond reference: llama-cpp-python $("$PYREF/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)'), built with LLAMA_ISA=$(cut -d" " -f1 "$PYREF/llama-isa") from the sdist that llama-bench comes from." \
    | tee "${log%.log}.md" >> "$log"
}

LB="$LLAMA/bin/llama-bench"
step_lm() {
  local log=$1 expect="afm / llama-bench:"
  echo -e "\n## SmolLM2-135M Q4_1 against llama-bench (three invocations)" >> "${log%.log}.md"
  # llama-cpp-python too when the pyref step installed it
  if [ -f "$PYREF/llama-isa" ]; then expect+=$'\nafm / llama-cpp-python:'; fi
  for _ in 1 2 3; do
    bench "$log" "$expect" "$AFM" --threads "$THREADS" bench lm --llama-bench "$LB" --prompt-tokens 85 \
      --python "$PYREF/bin/python"
  done
}
step_busy() {
  local log=$1
  echo -e "\n## A busy machine (a busy loop holds one core)" >> "${log%.log}.md"
  bench "$log" "afm / llama-bench:" "$AFM" --threads "$THREADS" bench lm --llama-bench "$LB" --prompt-tokens 85 --busy
  bench "$log" "2 threads / 1 thread" "$AFM" --threads "$THREADS" bench vision --no-reference --busy
  bench "$log" "tracks parallel / sequential" "$AFM" --threads "$THREADS" bench server --busy
}
step_3b() {
  local log=$1
  echo -e "\n## The 3.1B on-device model (2-bit, random weights) against the bandwidth limit" >> "${log%.log}.md"
  for _ in 1 2; do
    bench "$log" "of it" "$AFM" --threads "$THREADS" bench lm --model "$GGUF_3B" --prompt-tokens 16 \
      --new-tokens 33 --no-reference --processes 1 --runs 3
  done
}
step_serve() {
  local log=$1
  echo -e "\n## afm serve against llama-server" >> "${log%.log}.md"
  bench "$log" "vs llama.cpp \`llama-server\`" "$AFM" --threads "$THREADS" bench serve --llama-server "$LLAMA/bin/llama-server" \
    --prefix-cache --repeat 5
}
step_vision() {
  local log=$1
  echo -e "\n## SigLIP-B/16-512 per tile against PyTorch" >> "${log%.log}.md"
  bench "$log" "afm int8 / PyTorch dynamic int8" "$AFM" --threads "$THREADS" bench vision --int8 --python "$VENV/bin/python"
}
step_vlm() {
  local log=$1
  echo -e "\n## SmolVLM-256M (random weights, full size) against transformers" >> "${log%.log}.md"
  bench "$log" "afm / transformers f32" "$AFM" --threads "$THREADS" bench vlm --model "$VLM_DIR" --python "$VENV/bin/python"
  bench "$log" "afm int8 / transformers dynamic int8" "$AFM" --threads "$THREADS" bench vlm --model "$VLM_DIR" --python "$VENV/bin/python" --int8
}

for s in $STEPS; do
  case " $ALL_STEPS " in
    *" $s "*) ;;
    *) echo "unknown step '$s' (steps: $ALL_STEPS)" >&2; exit 2 ;;
  esac
done
s=; log=
trap 'rc=$?; if [ "$rc" != 0 ] && [ -n "$s" ]; then echo "$s: FAILED (exit $rc), see $log" >&2; fi' EXIT
for s in $STEPS; do
  log="$OUT/$s.log"
  if [ -f "$log" ] && [ "$(tail -n1 "$log")" = "STEP OK" ]; then
    echo "$s: done before ($log)"
    continue
  fi
  if [ "$s" != setup ] && [ ! -x "$AFM" ]; then
    echo "$s: run the setup step first ($AFM is missing)" >&2
    s=
    exit 1
  fi
  echo "$s: started $(date -u '+%H:%M:%S'), log $log"
  : > "$log"
  [ "$s" = setup ] || : > "$OUT/$s.md"
  "step_$s" "$log"
  echo "STEP OK" >> "$log"
done
s=
for s in $ALL_STEPS; do
  if [ -f "$OUT/$s.md" ]; then cat "$OUT/$s.md"; fi
done > "$REPORT"
echo "report: $REPORT"
