#!/usr/bin/env bash
# Runs on the GPU machine from the bundle that scripts/build-gpu-bundle.sh made: the GPU probe,
# the GPU GEMM tests (every variant × dtype × transpose against the f64 reference), the GPU
# composition tests (every forward/backward variant × f32/bf16 against the f64 reference, and the
# composed layer's CUDA dispatch), the transformer on --device cuda against its f64 model, the SASS
# of the tensor-core GEMM and composition kernels (HMMA present, where ptxas and cuobjdump are installed), and the bench (CUDA events: ms, TFLOP/s, GB/s; for the
# composition kernels also the ratio to the lower bound and the issue's targets). Writes a short
# report to $OUT/report.md when OUT is set, else ./gpu-report.md. Exits non-zero if a test or a
# bench check fails, or if a GPU test did not run.
#
# The GPU tests are #[ignore]d (a plain `cargo test` shows them as ignored where there is no GPU)
# and panic when the probe fails, so here they run with --ignored (gpu_probe with
# --include-ignored: its clean-probe test too). Every ignored test in these executables is a
# GPU test. Each run's libtest summary must also show at least one test passed and none left
# ignored, so a test that matched nothing or stayed ignored cannot pass as a green run.
#
# Every step runs under `timeout`, inside one time budget (--budget, seconds, default 540: one
# 10-minute call), so a hung kernel costs its step, not the call; what a step was cut off at is
# in the report. Full logs (tests.log, bench.log, sanitizer.log) go beside the report.
# --sanitize adds compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over the small
# GPU cases of the composition and GEMM tests (`gpu_sanitizer_cases`) and the factor-mode
# composition test, each within what is left of the budget. --tests "A B …" runs only those
# test executables; --no-bench skips the SASS check and the bench (for a re-check).
#
# Usage: gpu-bundle/gpu-check.sh [--runs N] [--budget SECONDS] [--sanitize] [--tests "A B"] [--no-bench]
#        (bench runs per configuration, default 20)
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The bundle's executables read their PTX from here (built with LC_PTX_EXTERNAL=1).
export LC_PTX_DIR="$here/ptx"
# cuBLAS, for gpu-bench's reference columns: the bundle carries none (too large); a CUDA
# toolkit's or an nvidia-cublas wheel's where one is installed. Without it the bench prints
# "cuBLAS: unavailable".
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d $dir ]] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$dir"
done
if ! ls /usr/local/cuda/lib64/libcublas.so* >/dev/null 2>&1; then
    wheel_lib=$(find /opt /usr/local/lib /usr/lib/python3* -maxdepth 9 -name 'libcublas.so.*' 2>/dev/null | head -n 1)
    [[ -n $wheel_lib ]] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$(dirname "$wheel_lib")"
fi
for dir in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do
    [[ -d $dir ]] && PATH="$PATH:$dir"
done
out_dir="${OUT:-$PWD}"
report="${OUT:+$OUT/report.md}"
report="${report:-$PWD/gpu-report.md}"
tests_log="$out_dir/tests.log"
runs=20
budget=540
sanitize=0
bench=1
only=""
while (($#)); do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --budget) budget="$2"; shift 2 ;;
        --sanitize) sanitize=1; shift ;;
        --tests) only=" ${2//,/ } "; shift 2 ;;
        --no-bench) bench=0; shift ;;
        *) echo "usage: gpu-check.sh [--runs N] [--budget SECONDS] [--sanitize] [--tests \"A B\"] [--no-bench]" >&2; exit 2 ;;
    esac
done
: >"$tests_log"

# Seconds kept for the later steps while an earlier one runs: the SASS check and the bench, the
# sanitizer passes.
bench_reserve=$((bench ? 240 : 0))
sanitize_reserve=$((sanitize ? 120 : 0))

# Seconds a step may take: its own cap, or what is left of the budget less `reserve` (kept for
# the steps after it), whichever is smaller; at least 5.
step_limit() {
    local cap="$1" reserve="$2"
    local left=$((budget - SECONDS - reserve))
    ((left < cap)) && cap=$left
    ((cap < 5)) && cap=5
    echo "$cap"
}

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
    [[ -z $only || $only == *" $exe "* ]] || return 0
    local log limit
    limit=$(step_limit 120 $((bench_reserve + sanitize_reserve)))
    local start=$SECONDS
    log=$(timeout "$limit" "$here/$exe" "$@" --nocapture --test-threads=1 2>&1)
    local rc=$?
    { echo "=== $exe $* (exit $rc, $((SECONDS - start)) s)"; echo "$log"; } >>"$tests_log"
    if ((rc == 124)); then
        echo "$exe: cut off after $limit s" | tee -a "$report"
    fi
    grep -E "GPU (tests|bench)? ?(skipped|found|on)|no GPU|panicked|test result|FAILED|^thread|needs a usable" <<<"$log" >>"$report"
    echo "$log" | tail -n 20
    # libtest: "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 2 filtered out; …"
    local summary
    summary=$(grep -E "^test result:" <<<"$log" | tail -n 1)
    if [[ ! $summary =~ ([0-9]+)\ passed\;\ ([0-9]+)\ failed\;\ ([0-9]+)\ ignored ]]; then
        echo "$exe: no libtest summary (exit $rc)" | tee -a "$report"
        return 1
    fi
    local passed=${BASH_REMATCH[1]} ignored=${BASH_REMATCH[3]}
    if ((passed == 0 || ignored > 0)); then
        echo "$exe: $passed passed, $ignored ignored: every GPU test must run here" | tee -a "$report"
        rc=1
    fi
    return $rc
}
run_tests gpu_probe --include-ignored || status=1
run_tests gemm_kernels --ignored || status=1
run_tests compose_kernels --ignored || status=1
run_tests compose_factor_kernels --ignored || status=1
run_tests layernorm_kernels --ignored || status=1
run_tests embedding_kernels --ignored || status=1
run_tests attention_kernels --ignored || status=1
run_tests elementwise_kernels --ignored || status=1
run_tests loss_kernels --ignored || status=1
run_tests optim_kernels --ignored || status=1
run_tests coeffs_kernels --ignored || status=1
run_tests model_device --ignored || status=1
echo '```' >>"$report"

# SASS of the tensor-core kernels: where the machine has ptxas and cuobjdump (a CUDA toolkit),
# the embedded gemm and compose_mma PTX is compiled for the GPU's architecture and each
# gemm_mma_* and compose_mma_* kernel's machine code must contain HMMA (tensor-core) instructions,
# and on sm_90 each gemm_wgmma_* and compose_wgmma_* kernel's (PTX for sm_90a) HGMMA. Seconds; skipped (and said so) elsewhere.
echo >>"$report"
echo "## SASS of the tensor-core kernels" >>"$report"
if ((!bench)); then
    echo "- skipped (--no-bench)" >>"$report"
elif command -v cuobjdump >/dev/null 2>&1 && command -v ptxas >/dev/null 2>&1; then
    sass_dir=$(mktemp -d)
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
    arch="sm_${cap:-90}"
    for family_kernels in "gemm:gemm_mma_f16 gemm_mma_bf16 gemm_mma_split_f16 gemm_mma_split_bf16 gemm_mma_w64_f16 gemm_mma_w64_bf16 gemm_mma_w64_split_f16 gemm_mma_w64_split_bf16" \
        "compose_mma:compose_mma_shrink_bf16 compose_mma_shrink64_bf16 compose_mma_expand_bf16 compose_mma_hidden_bf16 compose_mma_hidden64_bf16 compose_mma_dx_bf16 compose_mma_expand64_bf16 compose_mma_dx64_bf16" \
        "gemm_wgmma:gemm_wgmma_f16 gemm_wgmma_bf16 gemm_wgmma_split_f16 gemm_wgmma_split_bf16 gemm_wgmma_wide_f16 gemm_wgmma_wide_bf16 gemm_wgmma_wide_split_f16 gemm_wgmma_wide_split_bf16" "compose_wgmma:compose_wgmma_shrink_bf16 compose_wgmma_expand_bf16 compose_wgmma_hidden_bf16 compose_wgmma_dx_bf16 compose_wgmma_wide_shrink_bf16 compose_wgmma_wide_expand_bf16 compose_wgmma_wide_hidden_bf16 compose_wgmma_wide_dx_bf16"; do
        family=${family_kernels%%:*}
        # gemm_wgmma is PTX for sm_90a (Hopper only): compiled for it, its kernels must hold HGMMA.
        family_arch=$arch
        opcode=HMMA
        if [[ $family == *wgmma ]]; then
            [[ $arch == sm_90 ]] || continue
            family_arch=sm_90a
            opcode=HGMMA
        fi
        if "$here/gpu-bench" --dump-ptx "$family" "$sass_dir/$family.ptx" \
            && ptxas -arch="$family_arch" "$sass_dir/$family.ptx" -o "$sass_dir/$family.cubin" 2>>"$report"; then
            for kernel in ${family_kernels#*:}; do
                hmma=$(cuobjdump -sass -fun "$kernel" "$sass_dir/$family.cubin" 2>/dev/null | grep -c "$opcode")
                echo "- $kernel ($family_arch): $hmma $opcode instructions" | tee -a "$report"
                ((hmma > 0)) || status=1
            done
        else
            echo "- could not dump or compile the $family PTX" | tee -a "$report"
            status=1
        fi
    done
    rm -rf "$sass_dir"
else
    echo "- skipped: cuobjdump or ptxas not on PATH" | tee -a "$report"
fi

echo >>"$report"
echo "## Bench (GEMM, composition, whole model)" >>"$report"
if ((bench)); then
    bench_limit=$(step_limit 400 "$sanitize_reserve")
    bench_log=$(timeout "$bench_limit" "$here/gpu-bench" --runs "$runs" 2>&1)
    bench_rc=$?
    ((bench_rc == 0)) || status=1
    ((bench_rc == 124)) && echo "gpu-bench: cut off after $bench_limit s" | tee -a "$report"
    echo "$bench_log" >"$out_dir/bench.log"
    grep -E "^cuBLAS:" <<<"$bench_log" | head -n 1
    # This script runs where a GPU is expected: a skipped bench means the GPU was not usable.
    grep -q "GPU bench skipped" <<<"$bench_log" && status=1
    echo "$bench_log"
    echo "$bench_log" >>"$report"
else
    echo "- skipped (--no-bench)" >>"$report"
fi

# compute-sanitizer over the GPU tests of the composition and GEMM kernels: what the CPU
# harness checks (cuda/README.md), now on the hardware. Findings fail the check; a tool cut off
# by the budget is reported as such, not as clean.
if ((sanitize)); then
    echo >>"$report"
    echo "## compute-sanitizer" >>"$report"
    sanitizer_log="$out_dir/sanitizer.log"
    : >"$sanitizer_log"
    if command -v compute-sanitizer >/dev/null 2>&1; then
        for tool_exe in memcheck:compose_kernels:gpu_sanitizer_cases racecheck:compose_kernels:gpu_sanitizer_cases \
            memcheck:gemm_kernels:gpu_sanitizer_cases racecheck:gemm_kernels:gpu_sanitizer_cases \
            synccheck:compose_kernels:gpu_sanitizer_cases initcheck:compose_kernels:gpu_sanitizer_cases \
            memcheck:compose_factor_kernels:gpu_matches_reference racecheck:compose_factor_kernels:gpu_matches_reference; do
            IFS=: read -r tool exe test_name <<<"$tool_exe"
            limit=$(step_limit 90 0)
            start=$SECONDS
            log=$(timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 86 \
                "$here/$exe" --ignored --exact "$test_name" --test-threads=1 2>&1)
            rc=$?
            { echo "=== $tool $exe $test_name (exit $rc, $((SECONDS - start)) s)"; echo "$log"; } >>"$sanitizer_log"
            summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" <<<"$log" | tail -n 1)
            case $rc in
                0) verdict="clean (${summary:-no summary})" ;;
                124) verdict="cut off after $limit s (not a verdict)" ;;
                86) verdict="FINDINGS: ${summary}"; status=1 ;;
                *) verdict="exit $rc: $(grep -E "test result|panicked" <<<"$log" | tail -n 1)"; status=1 ;;
            esac
            echo "- $tool on $exe $test_name: $verdict ($((SECONDS - start)) s)" | tee -a "$report"
        done
    else
        echo "- skipped: compute-sanitizer not on PATH" | tee -a "$report"
    fi
fi

echo >>"$report"
echo "status: $([[ $status == 0 ]] && echo pass || echo FAIL) ($SECONDS s of a $budget s budget)" >>"$report"
echo "report: $report"
exit $status
