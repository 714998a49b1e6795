#!/usr/bin/env bash
# Runs on the GPU machine from the bundle that scripts/build-gpu-bundle.sh made: the GPU probe,
# the GPU GEMM tests (every variant × dtype × transpose against the f64 reference), the GPU
# composition tests (every forward/backward variant × f32/bf16 against the f64 reference, and the
# composed layer's CUDA dispatch), the transformer on --device cuda against its f64 model, and the bench (CUDA events: ms, TFLOP/s, GB/s; for the
# composition kernels also the ratio to the lower bound and the issue's targets). Writes a short
# report to $OUT/report.md when OUT is set, else ./gpu-report.md. Exits non-zero if a test or a
# bench check fails.
#
# Usage: gpu-bundle/gpu-check.sh [--runs N]   (bench runs per configuration, default 20)
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
report="${OUT:+$OUT/report.md}"
report="${report:-$PWD/gpu-report.md}"
runs=20
[[ "${1:-}" == "--runs" && -n "${2:-}" ]] && runs="$2"

status=0
{
    echo "# GPU check ($(cat "$here/COMMIT" 2>/dev/null || echo unknown commit))"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi not available"
    echo '```'
    echo
    echo "## Tests"
    echo '```'
} >"$report"

run_tests() {
    local exe="$1"; shift
    local log
    log=$("$here/$exe" "$@" --nocapture --test-threads=1 2>&1)
    local rc=$?
    grep -E "GPU (tests|bench)? ?(skipped|found|on)|panicked|test result|FAILED|^thread" <<<"$log" >>"$report"
    echo "$log" | tail -n 20
    return $rc
}
run_tests gpu_probe || status=1
run_tests gemm_kernels gpu_matches_reference || status=1
run_tests compose_kernels gpu_matches_reference || status=1
run_tests model_device gpu_model_matches_reference || status=1
echo '```' >>"$report"

echo >>"$report"
echo "## Bench (GEMM, composition)" >>"$report"
bench_log=$("$here/gpu-bench" --runs "$runs" 2>&1) || status=1
# This script runs where a GPU is expected: a skipped bench means the GPU was not usable.
grep -q "GPU bench skipped" <<<"$bench_log" && status=1
echo "$bench_log"
echo "$bench_log" >>"$report"

echo >>"$report"
echo "status: $([[ $status == 0 ]] && echo pass || echo FAIL)" >>"$report"
echo "report: $report"
exit $status
