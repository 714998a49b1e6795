#!/usr/bin/env bash
# Runs scripts/embed-crosscheck.py: `lora-compose embed` vs a float64 numpy reference of
# all-MiniLM-L6-v2 (sentence-transformers' pipeline), on 28 texts from 1 to 600+ tokens.
# Needs PyPI (numpy, tokenizers) once; installs them in .venv (git-ignored).
# To check against sentence-transformers itself too, point PYTHON at an interpreter that has
# torch + sentence-transformers, e.g. the venv that scripts/peft-crosscheck.sh makes:
#   target/peft-crosscheck/venv/bin/pip install sentence-transformers==6.2.0
#   PYTHON=target/peft-crosscheck/venv/bin/python scripts/embed-crosscheck.sh
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-minilm.sh
PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -c "import numpy, tokenizers" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet numpy tokenizers
    PYTHON=.venv/bin/python
fi
cargo build --release --quiet
HF_HUB_OFFLINE=1 "$PYTHON" scripts/embed-crosscheck.py "${CARGO_TARGET_DIR:-target}/release/lora-compose" assets/minilm
