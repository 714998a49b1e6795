#!/usr/bin/env bash
# Runs scripts/embed-crosscheck.py: `lora-compose embed` vs a float64 numpy reference of
# all-MiniLM-L6-v2 (sentence-transformers' pipeline), on 28 texts from 1 to 600+ tokens.
# Needs PyPI (numpy, tokenizers) once; installs them in .venv (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-minilm.sh
if ! .venv/bin/python -c "import numpy, tokenizers" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet numpy tokenizers
fi
cargo build --release --quiet
.venv/bin/python scripts/embed-crosscheck.py "${CARGO_TARGET_DIR:-target}/release/lora-compose" assets/minilm
