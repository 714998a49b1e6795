#!/usr/bin/env bash
# Relatedness on language (DESIGN §5, the twin of scripts/relatedness.sh): the composition
# methods on the two held-out tweet domains (covariate shift) with a library from their own
# domain (the 4 tweet-domain modules, `tw-`) vs an unrelated one (the 9 supersense modules,
# `ss-`), beside the whole 13-module library of `fewshot-text`. Same protocol as the language
# sweep (K ∈ {1, 4, 16}, 5 seeds, 100 steps), composition methods only. Resumable.
#
# Usage: scripts/relatedness-lang.sh [lora-compose binary]   (default: target/release/lora-compose)
# Needs assets/minilm (scripts/fetch-minilm.sh) and data/text-library.
# Writes results/relatedness-lang/{tweets,supersense}/{fewshot.jsonl,report.md,*.svg}.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/lora-compose}"
[[ -x "$bin" ]] || cargo build --release
for lib in tweets supersense; do
    case "$lib" in
        tweets) filter="tw-" ;;
        supersense) filter="ss-" ;;
    esac
    dir="results/relatedness-lang/$lib"
    "$bin" fewshot-text --modules="$filter" --tasks tw-cars,tw-claritin \
        --methods uniform,learned,soups --shots 1,4,16 --seeds 5 --steps 100 --out "$dir/fewshot.jsonl"
    "$bin" report --dir "$dir" >/dev/null
    echo "wrote $dir/report.md"
done
