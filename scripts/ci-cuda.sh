#!/usr/bin/env bash
# Builds the CUDA kernels to PTX with nvcc from NVIDIA's pinned CUDA 13.0 wheels (installed
# into .cuda/ in the checkout, reused when present), embeds it through cargo build, checks that
# the GPU probe fails cleanly here, checks that the PTX of the tensor-core GEMM and composition
# kernels holds mma.sync, ldmatrix and cp.async (and the Hopper GEMM's wgmma), and runs ptxas
# for sm_80 and sm_90 on every PTX (sm_90a only, for PTX built for it): prints registers and
# shared memory per kernel, and FAILS on any register spill.
#
# Usage: scripts/ci-cuda.sh            (from anywhere; needs python3 + pip, network for the
#                                       first install only)
# Env:   CUDA_COMPUTE_CAP (PTX target, default 80), PTXAS_ARCHS (default "sm_80 sm_90").
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_WHEEL="cuda-toolkit[nvcc,cccl]==13.0.3.0"   # PTX ISA 9.0: accepted by driver 580 (CUDA 13.0)
export CUDA_HOME="$PWD/.cuda/nvidia/cu13"
if [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
    echo "installing nvcc: $CUDA_WHEEL into .cuda/"
    python3 -m pip install -q --target .cuda "$CUDA_WHEEL"
fi
export PATH="$CUDA_HOME/bin:$PATH"
nvcc --version | tail -n 2

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# build.rs reports its OUT_DIR, where it wrote <family>.ptx.
out_dir=$(cargo build --release --lib --message-format=json \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "build-script-executed" and "lora-compose" in m["package_id"]:
        print(m["out_dir"])' | tail -n 1)
ptx_files=$(ls "$out_dir"/*.ptx 2>/dev/null || true)
if [[ -z "$ptx_files" ]]; then
    echo "error: cargo build produced no PTX in ${out_dir:-?}" >&2
    exit 1
fi
# With PTX embedded and no driver, the probe must name the missing driver, not panic.
cargo test --release --test gpu_probe -- --nocapture 2>&1 | grep -E "no GPU|GPU found|test result"
# The PTX is embedded gzip-compressed: every family must inflate to PTX with its entries.
cargo test --release --test gpu_probe -- --ignored --exact embedded_ptx_inflates_for_every_family --nocapture 2>&1 \
    | grep -E "families of PTX|panicked|test result"
cargo test --release --test gpu_probe -- --ignored --exact embedded_ptx_inflates_for_every_family >/dev/null 2>&1 || {
    echo "error: the embedded PTX does not inflate for every family" >&2
    exit 1
}

# The tensor-core kernels (GEMM and composition) must be built from the real instructions, not
# a fallback: each entry's PTX body holds mma.sync, ldmatrix (.trans where an operand is stored
# k-major) and the cp.async copy, commit and wait.
for family_entry in gemm:gemm_mma_f16 gemm:gemm_mma_bf16 gemm:gemm_mma_split_f16 gemm:gemm_mma_split_bf16 \
    gemm:gemm_mma_w64_f16 gemm:gemm_mma_w64_bf16 gemm:gemm_mma_w64_split_f16 gemm:gemm_mma_w64_split_bf16 \
    compose_mma:compose_mma_shrink_bf16 \
    compose_mma:compose_mma_shrink64_bf16 compose_mma:compose_mma_expand_bf16 compose_mma:compose_mma_hidden_bf16:trans \
    compose_mma:compose_mma_hidden64_bf16:trans compose_mma:compose_mma_dx_bf16:trans compose_mma:compose_mma_expand64_bf16 \
    compose_mma:compose_mma_dx64_bf16:trans; do
    IFS=: read -r family entry trans <<<"$family_entry"
    body=$(awk -v e="$entry" 'index($0, ".entry " e "(") { on = 1 } on { print } on && /^}/ { exit }' "$out_dir/$family.ptx")
    if [[ -z "$body" ]]; then
        echo "error: no entry $entry in $family.ptx" >&2
        exit 1
    fi
    for instruction in mma.sync.aligned.m16n8k16.row.col.f32 ldmatrix.sync.aligned.m8n8.x4 cp.async.cg.shared.global \
        cp.async.commit_group cp.async.wait_group ${trans:+ldmatrix.sync.aligned.m8n8.x4.trans}; do
        if ! grep -q "$instruction" <<<"$body"; then
            echo "error: the PTX of $entry lacks $instruction" >&2
            exit 1
        fi
    done
    echo "$entry: $(grep -c 'mma.sync' <<<"$body") mma.sync, $(grep -c 'ldmatrix' <<<"$body") ldmatrix, $(grep -c 'cp.async.cg' <<<"$body") cp.async.cg in its PTX"
done

# The Hopper kernels (cuda/gemm_wgmma.cu, cuda/compose_wgmma.cu, PTX for sm_90a): wgmma.mma_async
# with its fence, commit and wait, fence.proxy.async and the cp.async pipeline; and ptxas must
# not have had to inject warpgroup waits or arrives into them (C7517/C7519: it serialises the asynchronous MMA where the
# kernel touches the accumulators while a wgmma is in flight).
for family_entry in gemm_wgmma:gemm_wgmma_f16:n128 gemm_wgmma:gemm_wgmma_bf16:n128 gemm_wgmma:gemm_wgmma_split_f16:n128 \
    gemm_wgmma:gemm_wgmma_split_bf16:n128 gemm_wgmma:gemm_wgmma_wide_f16:n256 gemm_wgmma:gemm_wgmma_wide_bf16:n256 \
    gemm_wgmma:gemm_wgmma_wide_split_f16:n256 gemm_wgmma:gemm_wgmma_wide_split_bf16:n256 \
    compose_wgmma:compose_wgmma_shrink_bf16:n128 compose_wgmma:compose_wgmma_expand_bf16:n128 \
    compose_wgmma:compose_wgmma_hidden_bf16:n128 compose_wgmma:compose_wgmma_dx_bf16:n128 \
    compose_wgmma:compose_wgmma_wide_shrink_bf16:n256 compose_wgmma:compose_wgmma_wide_expand_bf16:n256 \
    compose_wgmma:compose_wgmma_wide_hidden_bf16:n256 compose_wgmma:compose_wgmma_wide_dx_bf16:n256; do
    IFS=: read -r family entry width <<<"$family_entry"
    # To the next entry: the wgmma asm's own braces put lines of "}" inside the body.
    body=$(awk -v e="$entry" 'index($0, ".entry " e "(") { on = 1; print; next } on && /\.entry / { exit } on { print }' "$out_dir/$family.ptx")
    if [[ -z "$body" ]]; then
        echo "error: no entry $entry in $family.ptx" >&2
        exit 1
    fi
    for instruction in "wgmma.mma_async.sync.aligned.m64${width}k16.f32" wgmma.fence.sync.aligned wgmma.commit_group.sync.aligned \
        wgmma.wait_group.sync.aligned fence.proxy.async.shared::cta cp.async.cg.shared.global; do
        if ! grep -q "$instruction" <<<"$body"; then
            echo "error: the PTX of $entry lacks $instruction" >&2
            exit 1
        fi
    done
    echo "$entry: $(grep -c 'wgmma.mma_async' <<<"$body") wgmma.mma_async, $(grep -c 'cp.async.cg' <<<"$body") cp.async.cg in its PTX"
done
for family in gemm_wgmma compose_wgmma; do
    if ! grep -q "^.target sm_90a" "$out_dir/$family.ptx"; then
        echo "error: $family.ptx is not built for sm_90a" >&2
        exit 1
    fi
    injected=$(ptxas -arch=sm_90a -v "$out_dir/$family.ptx" -o /dev/null 2>&1 | grep -E "C751[79].*function '(gemm|compose)_" || true)
    if [[ -n "$injected" ]]; then
        echo "error: ptxas serialised the wgmma kernels of $family:" >&2
        echo "$injected" >&2
        exit 1
    fi
done

spills=0
for arch in ${PTXAS_ARCHS:-sm_80 sm_90}; do
    echo
    echo "## ptxas -arch=$arch"
    printf '%-28s %5s %10s %14s %13s\n' kernel regs smem_bytes spill_stores spill_loads
    for ptx in $ptx_files; do
        # Architecture-specific PTX (.target sm_90a: the wgmma family) builds for that target only.
        ptx_arch=$arch
        if grep -q "^.target sm_90a" "$ptx"; then
            [[ $arch == sm_90 ]] || continue
            ptx_arch=sm_90a
        fi
        log=$(ptxas -arch="$ptx_arch" -v "$ptx" -o /dev/null 2>&1)
        # ptxas -v prints per kernel: "Compiling entry function 'name'", then
        # "N bytes stack frame, S bytes spill stores, L bytes spill loads" and
        # "Used R registers, ..., B bytes smem".
        report=$(awk '
            /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2); smem = 0 }
            /spill stores/ { for (i = 1; i <= NF; i++) { if ($(i+2) == "spill" && $(i+3) == "stores,") st = $i; if ($(i+2) == "spill" && $(i+3) == "loads") ld = $i } }
            /Used [0-9]+ registers/ {
                for (i = 1; i <= NF; i++) { if ($i == "Used") regs = $(i+1); if ($(i+1) == "bytes" && $(i+2) ~ /^smem/) smem = $i }
                printf "%-28s %5s %10s %14s %13s\n", name, regs, smem, st, ld
            }' <<<"$log")
        echo "$report"
        spills=$((spills + $(awk '$4 != 0 || $5 != 0' <<<"$report" | wc -l)))
    done
done
if (( spills > 0 )); then
    echo "error: $spills kernel(s) spill registers (non-zero spill stores/loads above)" >&2
    exit 1
fi
echo
echo "ci-cuda: PTX built and embedded, no spills"
