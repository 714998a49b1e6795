#!/usr/bin/env bash
# Builds everything a GPU machine needs to test and time the kernels into gpu-bundle/: the GPU
# test executables and gpu-bench (symbols stripped), built with LC_PTX_EXTERNAL=1 so that they
# read the PTX from gpu-bundle/ptx/ (LC_PTX_DIR, set by gpu-check.sh) instead of each embedding
# all of it, the C++ runtime they link, and gpu-check.sh; then packs it as gpu-bundle.tar.gz
# (both git-ignored). The GPU machine
# needs only the CUDA driver: no Rust, no network. The device tool sends the tracked tree and
# what it carries, 64 MiB in all: the script fails if the archive and the tracked files pass
# 60 MiB (the unpacked folder alone no longer fits beside the tree).
#
# Usage: scripts/build-gpu-bundle.sh   (installs nvcc into .cuda/ through ci-cuda.sh's wheel
#                                       if missing), then carry gpu-bundle.tar.gz to the GPU
#                                       machine and run there
#                                       tar xzf gpu-bundle.tar.gz && gpu-bundle/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_HOME="$PWD/.cuda/nvidia/cu13"
if [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
    python3 -m pip install -q --target .cuda "cuda-toolkit[nvcc,cccl]==13.0.3.0"
fi
export PATH="$CUDA_HOME/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
export LC_PTX_EXTERNAL=1

bundle=gpu-bundle
rm -rf "$bundle"
mkdir -p "$bundle/lib" "$bundle/ptx"

# Test executables (GEMM, composition, factor composition, layer norm, embedding, attention, element-wise, loss, optimizer, coefficient kernels, probe, model): cargo names them <test>-<hash>; keep the test name.
cargo test --release --no-run --message-format=json --test gemm_kernels --test compose_kernels --test compose_factor_kernels \
    --test layernorm_kernels --test embedding_kernels --test attention_kernels \
    --test elementwise_kernels --test loss_kernels --test optim_kernels --test coeffs_kernels \
    --test gpu_probe --test model_device \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
    elif m.get("reason") == "build-script-executed" and "lora-compose" in m["package_id"]:
        print("@ptx", m["out_dir"])' \
    | while read -r name path; do
        if [[ $name == @ptx ]]; then cp "$path"/*.ptx.gz "$bundle/ptx/"; else cp "$path" "$bundle/$name"; fi
    done
[[ -n $(ls "$bundle/ptx") ]] || { echo "error: no PTX was built (is nvcc working?)" >&2; exit 1; }
cargo build --release --bin gpu-bench
cp "$CARGO_TARGET_DIR/release/gpu-bench" "$bundle/"
for exe in gemm_kernels compose_kernels compose_factor_kernels layernorm_kernels embedding_kernels attention_kernels elementwise_kernels loss_kernels optim_kernels coeffs_kernels \
    gpu_probe model_device gpu-bench; do
    [[ -x "$bundle/$exe" ]] || { echo "error: $exe was not built" >&2; exit 1; }
    strip --strip-all "$bundle/$exe"  # panics still print their messages; backtraces lose names
done

# The harness's C++ runtime, in case the GPU machine lacks (this version of) it.
for lib in libstdc++.so.6 libgcc_s.so.1; do
    path=$(ldd "$bundle/gemm_kernels" | awk -v lib="$lib" '$1 == lib { print $3 }')
    [[ -n "$path" ]] && cp -L "$path" "$bundle/lib/"
done
cp scripts/gpu-check.sh scripts/gpu-profile.sh "$bundle/"
git rev-parse HEAD > "$bundle/COMMIT" 2>/dev/null || true

du -sh "$bundle"/* | sort -h
echo "gpu-bundle: $(du -sm "$bundle" | cut -f1) MiB unpacked"
archive=gpu-bundle.tar.gz
tar czf "$archive" "$bundle"
archive_bytes=$(stat -c %s "$archive")
tree_bytes=$(git ls-files -z | xargs -0 stat -c %s | awk '{ s += $1 } END { print s + 0 }')
mib=$((1024 * 1024))
echo "$archive: $((archive_bytes / mib)) MiB; with the tracked files ($((tree_bytes / mib)) MiB): $(((archive_bytes + tree_bytes) / mib)) of the 64 MiB the device tool sends"
if ((archive_bytes + tree_bytes >= 60 * mib)); then
    echo "error: the archive and the tracked files must stay under 60 MiB" >&2
    exit 1
fi
echo "on the GPU machine (carry $archive): tar xzf $archive && gpu-bundle/gpu-check.sh --runs 10 --budget 420 --sanitize"
