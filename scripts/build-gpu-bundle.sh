#!/usr/bin/env bash
# Builds everything a GPU machine needs to test and time the kernels into gpu-bundle/ (under
# 64 MB): the GPU test executables and gpu-bench with the PTX embedded, the C++ runtime they
# link, and gpu-check.sh. The GPU machine needs only the CUDA driver: no Rust, no network.
#
# Usage: scripts/build-gpu-bundle.sh   (installs nvcc into .cuda/ through ci-cuda.sh's wheel
#                                       if missing), then copy gpu-bundle/ to the GPU machine
#                                       and run gpu-bundle/gpu-check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_HOME="$PWD/.cuda/nvidia/cu13"
if [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
    python3 -m pip install -q --target .cuda "cuda-toolkit[nvcc,cccl]==13.0.3.0"
fi
export PATH="$CUDA_HOME/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

bundle=gpu-bundle
rm -rf "$bundle"
mkdir -p "$bundle/lib"

# Test executables (GEMM, composition, factor composition, layer norm, embedding, attention, element-wise, loss, optimizer, coefficient kernels, probe, model): cargo names them <test>-<hash>; keep the test name.
cargo test --release --no-run --message-format=json --test gemm_kernels --test compose_kernels --test compose_factor_kernels \
    --test layernorm_kernels --test embedding_kernels --test attention_kernels \
    --test elementwise_kernels --test loss_kernels --test optim_kernels --test coeffs_kernels \
    --test gpu_probe --test model_device \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])' \
    | while read -r name exe; do cp "$exe" "$bundle/$name"; done
cargo build --release --bin gpu-bench
cp "$CARGO_TARGET_DIR/release/gpu-bench" "$bundle/"
for exe in gemm_kernels compose_kernels compose_factor_kernels layernorm_kernels embedding_kernels attention_kernels elementwise_kernels loss_kernels optim_kernels coeffs_kernels \
    gpu_probe model_device gpu-bench; do
    [[ -x "$bundle/$exe" ]] || { echo "error: $exe was not built" >&2; exit 1; }
    strip --strip-debug "$bundle/$exe"
done

# The harness's C++ runtime, in case the GPU machine lacks (this version of) it.
for lib in libstdc++.so.6 libgcc_s.so.1; do
    path=$(ldd "$bundle/gemm_kernels" | awk -v lib="$lib" '$1 == lib { print $3 }')
    [[ -n "$path" ]] && cp -L "$path" "$bundle/lib/"
done
cp scripts/gpu-check.sh scripts/gpu-profile.sh "$bundle/"
git rev-parse HEAD > "$bundle/COMMIT" 2>/dev/null || true

size_mb=$(du -sm "$bundle" | cut -f1)
du -sh "$bundle"/* | sort -h
echo "gpu-bundle: ${size_mb} MB"
if (( size_mb >= 64 )); then
    echo "error: the bundle must stay under 64 MB" >&2
    exit 1
fi
