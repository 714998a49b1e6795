#!/usr/bin/env bash
# Runs on the GPU machine from the bundle (scripts/build-gpu-bundle.sh copies it there): a short
# composition bench over a few shapes (direct launches and CUDA-graph replay side by side), then
# Nsight Compute over the kernels those shapes run, for where the time goes inside them (memory
# throughput, occupancy, warp stall reasons). First run on the H200 of 2026-12-04:
# benches/gpu-runs/2026-12-04-h200-profile/. ncu runs with --clock-control none: the clocks are
# left as found. Everything goes under $OUT (or ./profile): bench.log, ncu-*.txt, clocks.txt.
#
# Usage: gpu-bundle/gpu-profile.sh [--budget SECONDS] [--shapes "d,N,T;…"] [--ncu "d,N,T@REGEX@SKIP@COUNT …"]
#   --shapes   bench shapes (default: small-T gemv shapes, the mma shapes of the targets and
#              two where the mma kernels split K: T = 256, and N = 8 at T = 4096); the small-T
#              ones are also timed without the L2 flush (bench-noflush.log)
#   --ncu      space-separated profiles: one shape, a kernel-name regex, launches of it to skip
#              and to profile (default: the gemv forward kernels at N = 8, T = 1; gemv
#              forward and backward at N = 128, T = 1 and 16; the mma forward kernels and the
#              hidden kernel with its ∂C epilogue at N = 32, T = 4096; the mma forward's split
#              shrink and expand at N = 32, T = 256)
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LC_PTX_DIR="$here/ptx"  # the bundle's executables read their PTX from here
if ! ls /usr/local/cuda/lib64/libcublas.so* >/dev/null 2>&1; then
    wheel_lib=$(find /opt /usr/local/lib /usr/lib/python3* -maxdepth 9 -name 'libcublas.so.*' 2>/dev/null | head -n 1)
    [[ -n ${wheel_lib:-} ]] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$(dirname "$wheel_lib")"
fi
for dir in /usr/local/cuda/bin /opt/nvidia/nsight-compute/*/; do
    [[ -d $dir ]] && PATH="$PATH:$dir"
done
out="${OUT:-$PWD/profile}"
mkdir -p "$out"
budget=300
shapes="4096,8,1;4096,32,1;4096,32,16;4096,128,1;4096,128,16;768,32,16;4096,32,256;4096,8,4096;4096,32,4096;4096,128,4096"
noflush_shapes="4096,8,1;4096,32,1;4096,128,1;4096,128,16"
# The first launches of each: the forward's check run, the first backward (∂C + ∂X) warm-up.
profiles="4096,8,1@compose_gemv_@0@2 4096,128,1@compose_gemv_(shrink|expand)@0@2
4096,128,1@compose_gemv_(hidden|dx)@0@2 4096,128,16@compose_gemv_(shrink|expand)@0@2
4096,128,16@compose_gemv_(hidden|dx)@0@2 4096,32,4096@compose_mma_(shrink|expand)@0@2
4096,32,4096@compose_mma_hidden_bf16@0@1 4096,32,256@compose_mma_@0@2"
while (($#)); do
    case "$1" in
        --budget) budget="$2"; shift 2 ;;
        --shapes) shapes="$2"; shift 2 ;;
        --ncu) profiles="$2"; shift 2 ;;
        *) echo "usage: gpu-profile.sh [--budget SECONDS] [--shapes \"d,N,T;…\"] [--ncu \"d,N,T@REGEX@SKIP@COUNT …\"]" >&2; exit 2 ;;
    esac
done
left() { local l=$((budget - SECONDS - ${1:-0})); ((l < 5)) && l=5; echo "$l"; }

nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw --format=csv >"$out/clocks.txt" 2>&1

n_profiles=$(wc -w <<<"$profiles")
start=$SECONDS
timeout "$(left $((n_profiles * 40)))" "$here/gpu-bench" --compose-only --no-model --runs 10 --shapes "$shapes" \
    >"$out/bench.log" 2>&1
echo "bench: exit $? ($((SECONDS - start)) s)"
# The small shapes again without the L2 flush before each run (gpu-bench --no-flush).
start=$SECONDS
timeout "$(left $((n_profiles * 40)))" "$here/gpu-bench" --compose-only --no-model --runs 10 --no-flush \
    --shapes "$noflush_shapes" >"$out/bench-noflush.log" 2>&1
echo "bench --no-flush: exit $? ($((SECONDS - start)) s)"
nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw --format=csv,noheader >>"$out/clocks.txt" 2>&1

if ! command -v ncu >/dev/null 2>&1; then
    echo "ncu: not on PATH; no profiles"
else
    i=0
    for p in $profiles; do
        IFS="@" read -r shape regex skip count <<<"$p"
        i=$((i + 1))
        start=$SECONDS
        timeout "$(left $(((n_profiles - i) * 40)))" ncu --clock-control none -k "regex:$regex" \
            --launch-skip "$skip" --launch-count "$count" \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
            --section MemoryWorkloadAnalysis_Tables --section ComputeWorkloadAnalysis \
            --section LaunchStats --section WarpStateStats --section SchedulerStats \
            "$here/gpu-bench" --compose-only --no-model --runs 1 --shapes "$shape" \
            >"$out/ncu-$i.txt" 2>&1
        echo "ncu $i ($shape, $regex): exit $? ($((SECONDS - start)) s)"
    done
fi
# The last lines of the reply: the bench table's composition rows.
grep -E '^\| [0-9]' "$out/bench.log" | cut -d'|' -f2-7,10-11 | tail -n 60
