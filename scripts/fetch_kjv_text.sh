#!/usr/bin/env bash
# Writes the fixed public texts of the quantization figures (docs/quantization.md):
#   runs/text/luke.txt  the Gospel of Luke, King James Version (~35k SmolLM2 tokens): the
#                       perplexity text of `afm bench quant`;
#   runs/text/acts.txt  the Acts of the Apostles (KJV): the "other text" a LoRA recovery
#                       adapter trains on (no verse of it is in luke.txt);
#   runs/text/recover.txt  Acts, Genesis and Romans (~95k tokens): the longer recovery text
#                       (no gospel, so no parallel of a verse of Luke either).
# Source: Debian's `bible-kjv-text` package (with the `bible-kjv` reader), whose copyright file
# says the KJV text's copyright has expired (1611); the reader program is GPL-2+. Verse
# numbers and chapter headings are removed, each chapter is one paragraph. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/runs/text"
mkdir -p "$out"
if ! command -v bible >/dev/null; then
  apt-get install -y -qq bible-kjv bible-kjv-text >/dev/null
fi
dump() { # spec file
  bible -l0 "$1" | awk '
    /^[A-Z0-9][A-Za-z ]* [0-9]+$/ { if (para != "") print para; para = ""; next }
    /^ *[0-9]+ / { sub(/^ *[0-9]+ /, ""); para = (para == "" ? $0 : para " " $0); next }
    END { if (para != "") print para }' > "$2"
}
dump "luke1:1-24:53" "$out/luke.txt"
dump "acts1:1-28:31" "$out/acts.txt"
dump "genesis1:1-50:26" "$out/genesis.txt"
dump "romans1:1-16:27" "$out/romans.txt"
cat "$out/acts.txt" "$out/genesis.txt" "$out/romans.txt" > "$out/recover.txt"
sha256sum "$out/luke.txt" "$out/acts.txt" "$out/recover.txt"
