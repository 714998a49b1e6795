// CPU-harness build of cuda/embedding.cu: the unchanged kernel source compiled as C++17, plus one
// extern "C" launch entry per kernel for src/harness.rs.
#include "../embedding.cu"

LC_HARNESS_ENTRY(embedding_bert_fwd_f32)
LC_HARNESS_ENTRY(embedding_bert_dword_naive_f32)
LC_HARNESS_ENTRY(embedding_bert_dword_indexed_f32)
LC_HARNESS_ENTRY(embedding_bert_dpos_f32)
LC_HARNESS_ENTRY(embedding_bert_dtype_f32)
LC_HARNESS_ENTRY(embedding_vit_patches_f32)
LC_HARNESS_ENTRY(embedding_vit_assemble_f32)
LC_HARNESS_ENTRY(embedding_vit_assemble_bwd_f32)
LC_HARNESS_ENTRY(embedding_bert_fwd_bf16)
LC_HARNESS_ENTRY(embedding_bert_dword_naive_bf16)
LC_HARNESS_ENTRY(embedding_bert_dword_indexed_bf16)
LC_HARNESS_ENTRY(embedding_bert_dpos_bf16)
LC_HARNESS_ENTRY(embedding_bert_dtype_bf16)
LC_HARNESS_ENTRY(embedding_vit_patches_bf16)
LC_HARNESS_ENTRY(embedding_vit_assemble_bf16)
LC_HARNESS_ENTRY(embedding_vit_assemble_bwd_bf16)
