#!/usr/bin/env bash
# Cross-checks `lora-compose merge` against PEFT itself (see scripts/peft_crosscheck.py).
# Not part of CI: it installs torch and peft from PyPI into a venv under
# target/peft-crosscheck (override with PEFT_XCHECK_DIR).
#
# Size: PyPI's Linux torch wheel (2.15.0, ~540 MB) links libcublas, libcudnn, … at import
# time even on a CPU-only machine, so `pip install --no-deps torch` does not import; with its
# nvidia-* / cuda-toolkit dependencies the venv is ~5.6 GB and takes ~2.5 min to install
# on a fast link. Nothing here needs a GPU.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${PEFT_XCHECK_DIR:-$root/target/peft-crosscheck}"
venv="$dir/venv"

mkdir -p "$dir"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, peft" 2>/dev/null; then
    "$venv/bin/pip" install -q "torch==2.15.0" "peft==0.21.2"
fi
"$venv/bin/python" -c "import torch, peft; print(f'torch {torch.__version__}, peft {peft.__version__}')"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin lora-compose
bin="$CARGO_TARGET_DIR/release/lora-compose"

work="$dir/work"
rm -rf "$work"
cd "$dir"
"$venv/bin/python" "$root/scripts/peft_crosscheck.py" "$bin" "$work"
