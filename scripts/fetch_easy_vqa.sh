#!/usr/bin/env bash
# Fetches the easy-VQA data set (Victor Zhou, MIT licence: 64x64 shape images with
# question/answer pairs) that ships inside the PyPI package `easy-vqa` 1.0: downloads the wheel
# by package name through pip, checks its sha256, pip-installs that verified wheel into a
# scratch --target dir and copies the data out. Result (read by afm-train's easy_vqa module):
#   models/easy-vqa/answers.txt, LICENSE, {train,test}/questions.json, {train,test}/images/*.png
# Idempotent: does nothing when models/easy-vqa/.wheel-sha256 records the expected wheel.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/models/easy-vqa"
wheel_sha="fcb51b309b78c7b00f97b64cdbcbcf5c105f94da1b39c0796cee5a787c4f650f"
python="${PYTHON:-python3}"

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$dest/.wheel-sha256" ] && [ "$(cat "$dest/.wheel-sha256")" = "$wheel_sha" ] \
  && [ -f "$dest/train/questions.json" ] && [ -f "$dest/test/questions.json" ]; then
  echo "models/easy-vqa present (wheel sha256 ok)"
  exit 0
fi
mkdir -p "$root/models"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "downloading easy-vqa==1.0 from PyPI (3.2 MB)..."
"$python" -m pip download --no-deps --progress-bar on -d "$tmp/dl" "easy-vqa==1.0"
whl="$(ls "$tmp"/dl/easy_vqa-1.0-*.whl)"
if [ "$(sha "$whl")" != "$wheel_sha" ]; then
  echo "error: $whl has sha256 $(sha "$whl"), expected $wheel_sha" >&2
  exit 1
fi
"$python" -m pip install --no-deps --no-index --quiet --target "$tmp/site" "$whl"
src="$tmp/site/easy_vqa/data"
out="$tmp/out"
mkdir -p "$out"
cp "$src/answers.txt" "$out/"
cp "$tmp"/site/easy_vqa-1.0.dist-info/LICENSE "$out/LICENSE"
for split in train test; do
  mkdir -p "$out/$split"
  cp "$src/$split/questions.json" "$out/$split/"
  cp -r "$src/$split/images" "$out/$split/"
done
n_train="$(ls "$out/train/images" | wc -l)"
n_test="$(ls "$out/test/images" | wc -l)"
if [ "$n_train" != 4000 ] || [ "$n_test" != 1000 ]; then
  echo "error: expected 4000 train and 1000 test images, found $n_train and $n_test" >&2
  exit 1
fi
echo "$wheel_sha" > "$out/.wheel-sha256"
rm -rf "$dest"
mv "$out" "$dest"
echo "models/easy-vqa ready: $n_train train and $n_test test images (wheel sha256 $wheel_sha)"
