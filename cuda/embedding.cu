// Input embeddings of the two transformers (src/model/pass.rs `encode_taped` /
// `embeddings_backward`), forward and backward:
//
//   BERT forward     out[r,j] = word[ids[r],j] + position[r mod T,j] + token_type[type_ids[r],j]
//   BERT backward    ∂word[v,j]  = Σ_{r : ids[r] = v} ∂E[r,j]            (rows r ascending)
//                    ∂position[p,j] = Σ_b ∂E[b·T + p,j] for p < T, 0 for p ≥ T   (b ascending)
//                    ∂token_type[t,j] = Σ_{r : type_ids[r] = t} ∂E[r,j]
//   ViT patches      patches[b·np + gy·g + gx, y·p + x] = pixels[b, gy·p + y, gx·p + x]
//                    (g = side / p, np = g²; pixels past g·p in a row or column are unused)
//   ViT assemble     h[b·Tv,j] = cls[j] + pos[0,j];  h[b·Tv + t,j] = pe[b·np + t − 1,j] + pos[t,j]
//                    (Tv = np + 1, t ≥ 1)
//   ViT assemble ∂   ∂pe[b·np + t − 1,j] = ∂h[b·Tv + t,j] (t ≥ 1);  ∂cls[j] = Σ_b ∂h[b·Tv,j];
//                    ∂pos[t,j] = Σ_b ∂h[b·Tv + t,j]                         (b ascending)
//
// Shapes, row-major: ids, type_ids (rows = B·T) int32; word, ∂word (V, D); position, ∂position
// (P, D), P ≥ T; token_type, ∂token_type (types, D); out, ∂E (rows, D). pixels (B, side, side)
// f32 always; patches (B·np, p²); pe, ∂pe (B·np, D); cls, ∂cls (D); pos, ∂pos (Tv, D); h, ∂h
// (B·Tv, D). Storage T is float or __nv_bfloat16, sums in f32, rounded once on the store. Every
// kernel overwrites its outputs (the backward writes zeros for ids, positions and types no row
// uses). All gradients are deterministic: each output element is one thread's sum in a fixed
// order, no float atomics.
//
// Ids are trusted only as far as memory safety goes: the forward writes a NaN row for an id or
// type id out of range (the host checks them: src/model/batch.rs `Batch::check`); the backward's
// index is checked when it is built (src/kernels/embedding.rs `TokenIndex::upload`) and a type id
// out of range matches no type.
//
// Kernels (src/kernels/embedding.rs): bert_fwd, vit_patches, vit_assemble, vit_assemble_bwd and
// bert_dpos are one thread per output element (flat index, consecutive threads on consecutive
// columns: coalesced); bert_dtype is one block per (type, 32 columns) with 8 row-threads per
// column, reduced through shared memory in a fixed order. The ∂word scatter has two variants
// (`Variant`, same order):
//   1. naive    one thread per (id, column), looping over every row and comparing its id:
//               rows·V·D loads of ids; the baseline.
//   2. indexed  one thread per (id, column) summing exactly its id's rows through a CSR index
//               built on the host (offsets (V + 1), rows sorted ascending per id): rows·D loads.
#include "common.cuh"

namespace embedding {

constexpr int WARP = 32;
// Threads per block of the flat kernels. Mirrored by `THREADS` in src/kernels/embedding.rs.
constexpr int THREADS = 256;
// bert_dtype's block: 32 columns × TYPE_ROW_THREADS row-threads. Mirrored by
// `TYPE_ROW_THREADS` in src/kernels/embedding.rs.
constexpr int TYPE_ROW_THREADS = 8;

__device__ __forceinline__ long long flat_index() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }

// 1-D grid over rows·D, THREADS threads.
template <typename T>
__device__ __forceinline__ void bert_fwd(const int* ids, const int* type_ids, const T* word, const T* position,
                                         const T* token_type, T* out, int rows, int seq, int D, int vocab,
                                         int types) {
    const long long i = flat_index();
    if (i >= (long long)rows * D) return;
    const int r = (int)(i / D), j = (int)(i % D);
    const int id = ids[r], tt = type_ids[r];
    float v;
    if (id < 0 || id >= vocab || tt < 0 || tt >= types) {
        v = nanf("");  // an id the host failed to check
    } else {
        v = lc::to_f32(word[(size_t)id * D + j]) + lc::to_f32(position[(size_t)(r % seq) * D + j]) +
            lc::to_f32(token_type[(size_t)tt * D + j]);
    }
    out[i] = lc::from_f32<T>(v);
}

// Variant 1. 1-D grid over V·D, THREADS threads: rows in ascending order, those with id v added.
template <typename T>
__device__ __forceinline__ void bert_dword_naive(const int* ids, const T* de, T* dword, int rows, int D, int vocab) {
    const long long i = flat_index();
    if (i >= (long long)vocab * D) return;
    const int v = (int)(i / D), j = (int)(i % D);
    float sum = 0.0f;
    for (int r = 0; r < rows; ++r)
        if (ids[r] == v) sum += lc::to_f32(de[(size_t)r * D + j]);
    dword[i] = lc::from_f32<T>(sum);
}

// Variant 2. 1-D grid over V·D, THREADS threads: id v's rows index_rows[offsets[v] ..
// offsets[v + 1]) (ascending), so the sum's order is variant 1's.
template <typename T>
__device__ __forceinline__ void bert_dword_indexed(const int* offsets, const int* index_rows, const T* de, T* dword,
                                                   int D, int vocab) {
    const long long i = flat_index();
    if (i >= (long long)vocab * D) return;
    const int v = (int)(i / D), j = (int)(i % D);
    float sum = 0.0f;
    for (int k = offsets[v], end = offsets[v + 1]; k < end; ++k) sum += lc::to_f32(de[(size_t)index_rows[k] * D + j]);
    dword[i] = lc::from_f32<T>(sum);
}

// 1-D grid over P·D, THREADS threads: position p < T sums the B rows b·T + p in order.
template <typename T>
__device__ __forceinline__ void bert_dpos(const T* de, T* dposition, int rows, int seq, int D, int positions) {
    const long long i = flat_index();
    if (i >= (long long)positions * D) return;
    const int p = (int)(i / D), j = (int)(i % D);
    float sum = 0.0f;
    if (p < seq)
        for (int r = p; r < rows; r += seq) sum += lc::to_f32(de[(size_t)r * D + j]);
    dposition[i] = lc::from_f32<T>(sum);
}

// Grid (ceil(D / 32), types), block (32, TYPE_ROW_THREADS). Thread (tx, ty) of block (bx, t) sums
// the rows r ≡ ty (mod TYPE_ROW_THREADS) of type t in column bx·32 + tx, in ascending order; then
// row-thread 0 adds the TYPE_ROW_THREADS sums in order.
template <typename T>
__device__ __forceinline__ void bert_dtype(const int* type_ids, const T* de, T* dtoken_type, int rows, int D) {
    SHARED(float, part, [TYPE_ROW_THREADS][WARP + 1]);
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int j = blockIdx.x * WARP + tx, t = blockIdx.y;
    float sum = 0.0f;
    if (j < D)
        for (int r = ty; r < rows; r += TYPE_ROW_THREADS)
            if (type_ids[r] == t) sum += lc::to_f32(de[(size_t)r * D + j]);
    part[ty][tx] = sum;
    __syncthreads();  // every row-thread's sum is in shared memory
    if (ty == 0 && j < D) {
        float total = 0.0f;
        for (int k = 0; k < TYPE_ROW_THREADS; ++k) total += part[k][tx];
        dtoken_type[(size_t)t * D + j] = lc::from_f32<T>(total);
    }
}

// 1-D grid over B·np·p², THREADS threads: one thread per patch element (coalesced stores, reads in
// runs of p pixels).
template <typename T>
__device__ __forceinline__ void vit_patches(const float* pixels, T* patches, int batch, int side, int patch) {
    const int grid = side / patch, np = grid * grid, area = patch * patch;
    const long long i = flat_index();
    if (i >= (long long)batch * np * area) return;
    const int pi = (int)(i / area), q = (int)(i % area);
    const int img = pi / np, k = pi % np;
    const int gy = k / grid, gx = k % grid, y = q / patch, x = q % patch;
    patches[i] = lc::from_f32<T>(pixels[(size_t)img * side * side + (size_t)(gy * patch + y) * side + gx * patch + x]);
}

// 1-D grid over B·Tv·D, THREADS threads.
template <typename T>
__device__ __forceinline__ void vit_assemble(const T* pe, const T* cls, const T* position, T* h, int batch,
                                             int tokens, int D) {
    const long long i = flat_index();
    if (i >= (long long)batch * tokens * D) return;
    const int r = (int)(i / D), j = (int)(i % D);
    const int b = r / tokens, t = r % tokens, np = tokens - 1;
    const float src = t == 0 ? lc::to_f32(cls[j]) : lc::to_f32(pe[(size_t)(b * np + t - 1) * D + j]);
    h[i] = lc::from_f32<T>(src + lc::to_f32(position[(size_t)t * D + j]));
}

// 1-D grid over Tv·D, THREADS threads: token t's column j over the batch in order, copying each
// element into ∂pe on the way.
template <typename T>
__device__ __forceinline__ void vit_assemble_bwd(const T* dh, T* dpe, T* dcls, T* dposition, int batch, int tokens,
                                                 int D) {
    const long long i = flat_index();
    if (i >= (long long)tokens * D) return;
    const int t = (int)(i / D), j = (int)(i % D), np = tokens - 1;
    float sum = 0.0f;
    for (int b = 0; b < batch; ++b) {
        const T g = dh[(size_t)(b * tokens + t) * D + j];
        sum += lc::to_f32(g);
        if (t > 0) dpe[(size_t)(b * np + t - 1) * D + j] = g;
    }
    dposition[i] = lc::from_f32<T>(sum);
    if (t == 0) dcls[j] = lc::from_f32<T>(sum);
}

}  // namespace embedding

// Unmangled entry points: embedding_<kernel>_<dtype>.
#define EMBEDDING_ENTRIES(suffix, T)                                                                                \
    extern "C" __global__ void __launch_bounds__(256) embedding_bert_fwd_##suffix(                                  \
        const int* __restrict__ ids, const int* __restrict__ type_ids, const T* __restrict__ word,                 \
        const T* __restrict__ position, const T* __restrict__ token_type, T* __restrict__ out, int rows, int seq,   \
        int D, int vocab, int types) {                                                                              \
        embedding::bert_fwd<T>(ids, type_ids, word, position, token_type, out, rows, seq, D, vocab, types);         \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) embedding_bert_dword_naive_##suffix(                          \
        const int* __restrict__ ids, const T* __restrict__ de, T* __restrict__ dword, int rows, int D, int vocab) { \
        embedding::bert_dword_naive<T>(ids, de, dword, rows, D, vocab);                                             \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) embedding_bert_dword_indexed_##suffix(                        \
        const int* __restrict__ offsets, const int* __restrict__ index_rows, const T* __restrict__ de,             \
        T* __restrict__ dword, int D, int vocab) {                                                                  \
        embedding::bert_dword_indexed<T>(offsets, index_rows, de, dword, D, vocab);                                 \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) embedding_bert_dpos_##suffix(                                 \
        const T* __restrict__ de, T* __restrict__ dposition, int rows, int seq, int D, int positions) {            \
        embedding::bert_dpos<T>(de, dposition, rows, seq, D, positions);                                            \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) embedding_bert_dtype_##suffix(                                \
        const int* __restrict__ type_ids, const T* __restrict__ de, T* __restrict__ dtoken_type, int rows, int D) { \
        embedding::bert_dtype<T>(type_ids, de, dtoken_type, rows, D);                                               \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) embedding_vit_patches_##suffix(                               \
        const float* __restrict__ pixels, T* __restrict__ patches, int batch, int side, int patch) {               \
        embedding::vit_patches<T>(pixels, patches, batch, side, patch);                                             \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) embedding_vit_assemble_##suffix(                              \
        const T* __restrict__ pe, const T* __restrict__ cls, const T* __restrict__ position, T* __restrict__ h,    \
        int batch, int tokens, int D) {                                                                             \
        embedding::vit_assemble<T>(pe, cls, position, h, batch, tokens, D);                                         \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) embedding_vit_assemble_bwd_##suffix(                          \
        const T* __restrict__ dh, T* __restrict__ dpe, T* __restrict__ dcls, T* __restrict__ dposition, int batch, \
        int tokens, int D) {                                                                                        \
        embedding::vit_assemble_bwd<T>(dh, dpe, dcls, dposition, batch, tokens, D);                                 \
    }

EMBEDDING_ENTRIES(f32, float)
EMBEDDING_ENTRIES(bf16, __nv_bfloat16)
