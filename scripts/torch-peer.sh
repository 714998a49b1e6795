#!/usr/bin/env bash
# PyTorch beside lora-compose on the same CPU work (scripts/torch_peer.py says what is timed),
# alternating round by round, printed as a table of both times and their ratio.
# Not part of CI: it installs torch and sentence-transformers from PyPI into a venv under
# target/torch-peer (override with TORCH_PEER_DIR; ~5.8 GB, PyPI's torch wheel pulls its CUDA
# libraries even on a CPU-only machine). MiniLM comes from scripts/fetch-minilm.sh.
#
#   scripts/torch-peer.sh                      every work, 3 rounds, 2 s a side, 2 threads
#   scripts/torch-peer.sh --only vit-step      one work (names: gemm compose-fwd compose-fwdbwd
#                                              vit-step embed)
#   scripts/torch-peer.sh --rounds 5 --secs 3 --threads 2
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${TORCH_PEER_DIR:-$root/target/torch-peer}"
venv="$dir/venv"

mkdir -p "$dir"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, sentence_transformers" 2>/dev/null; then
    "$venv/bin/pip" install -q "torch==2.15.0" "sentence-transformers==6.2.0"
fi
"$root/scripts/fetch-minilm.sh" >/dev/null

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin cpu-peer
echo "$(date -u +%Y-%m-%dT%H:%MZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs, commit $(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet || echo +dirty)"
HF_HUB_OFFLINE=1 "$venv/bin/python" "$root/scripts/torch_peer.py" \
    --ours "$CARGO_TARGET_DIR/release/cpu-peer" --minilm "$root/assets/minilm" "$@"
