#!/usr/bin/env bash
# Relatedness and library size (DESIGN §5): the composition methods with a library of 4 modules
# from the downstream tasks' own domain (plain MNIST, `-id`), 4 from an unrelated one (inverted
# MNIST, `invert`), beside the whole 16-module library of the full run (`cargo run --release --
# --full`, results/full/). Same protocol as --full (every task, K ∈ {1, 4, 16}, 5 seeds, 100
# steps, the whole test sets), composition methods only. Resumable like every fewshot run.
#
# Usage: scripts/relatedness.sh [lora-compose binary]   (default: target/release/lora-compose)
# Writes results/relatedness/{id,invert}/{fewshot.jsonl,report.md,*.svg}.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/lora-compose}"
[[ -x "$bin" ]] || cargo build --release
for lib in id invert; do
    case "$lib" in
        id) filter="-id" ;;
        invert) filter="invert" ;;
    esac
    dir="results/relatedness/$lib"
    "$bin" fewshot --modules="$filter" --methods uniform,learned,soups --shots 1,4,16 --seeds 5 \
        --steps 100 --out "$dir/fewshot.jsonl"
    "$bin" report --dir "$dir" >/dev/null
    echo "wrote $dir/report.md"
done
if [[ -f results/full/fewshot.jsonl ]]; then
    python3 scripts/relatedness-table.py >results/relatedness/table.md
    echo "wrote results/relatedness/table.md"
fi
