//! The `extern "C"` launch entries that `LC_HARNESS_ENTRY` defines in
//! `cuda/harness/<family>_host.cpp`, one module per kernel family (used through `kernel_entry!`).

pub(crate) mod gemm {
    crate::launch::harness_entries!(
        lc_run_gemm_naive_f32,
        lc_run_gemm_naive_f16,
        lc_run_gemm_naive_bf16,
        lc_run_gemm_tiled64_f32,
        lc_run_gemm_tiled64_f16,
        lc_run_gemm_tiled64_bf16,
        lc_run_gemm_tiled128_f32,
        lc_run_gemm_tiled128_f16,
        lc_run_gemm_tiled128_bf16,
        lc_run_gemm_mma_f16,
        lc_run_gemm_mma_bf16,
        lc_run_gemm_mma_split_f16,
        lc_run_gemm_mma_split_bf16,
        lc_run_gemm_mma_w64_f16,
        lc_run_gemm_mma_w64_bf16,
        lc_run_gemm_mma_w64_split_f16,
        lc_run_gemm_mma_w64_split_bf16,
    );
}

pub(crate) mod gemm_wgmma {
    crate::launch::harness_entries!(
        lc_run_gemm_wgmma_f16,
        lc_run_gemm_wgmma_bf16,
        lc_run_gemm_wgmma_split_f16,
        lc_run_gemm_wgmma_split_bf16,
        lc_run_gemm_wgmma_wide_f16,
        lc_run_gemm_wgmma_wide_bf16,
        lc_run_gemm_wgmma_wide_split_f16,
        lc_run_gemm_wgmma_wide_split_bf16,
    );
}

pub(crate) mod compose_wgmma {
    crate::launch::harness_entries!(
        lc_run_compose_wgmma_shrink_bf16,
        lc_run_compose_wgmma_expand_bf16,
        lc_run_compose_wgmma_hidden_bf16,
        lc_run_compose_wgmma_dx_bf16,
        lc_run_compose_wgmma_wide_shrink_bf16,
        lc_run_compose_wgmma_wide_expand_bf16,
        lc_run_compose_wgmma_wide_hidden_bf16,
        lc_run_compose_wgmma_wide_dx_bf16,
    );
}

pub(crate) mod compose_fwd {
    crate::launch::harness_entries!(
        lc_run_compose_fwd_shrink_naive_f32,
        lc_run_compose_fwd_shrink_naive_bf16,
        lc_run_compose_fwd_expand_naive_f32,
        lc_run_compose_fwd_expand_naive_bf16,
        lc_run_compose_fwd_shrink_tiled_f32,
        lc_run_compose_fwd_shrink_tiled_bf16,
        lc_run_compose_fwd_shrink_reduce_f32,
        lc_run_compose_fwd_shrink_reduce_bf16,
        lc_run_compose_fwd_expand_tiled_f32,
        lc_run_compose_fwd_expand_tiled_bf16,
        lc_run_compose_fwd_sum_partials_f32,
        lc_run_compose_fwd_sum_partials_bf16,
    );
}

pub(crate) mod compose_bwd {
    crate::launch::harness_entries!(
        lc_run_compose_bwd_hidden_naive_f32,
        lc_run_compose_bwd_hidden_naive_bf16,
        lc_run_compose_bwd_coeff_grad_naive_f32,
        lc_run_compose_bwd_coeff_grad_naive_bf16,
        lc_run_compose_bwd_dx_naive_f32,
        lc_run_compose_bwd_dx_naive_bf16,
        lc_run_compose_bwd_da_naive_f32,
        lc_run_compose_bwd_da_naive_bf16,
        lc_run_compose_bwd_db_naive_f32,
        lc_run_compose_bwd_db_naive_bf16,
        lc_run_compose_bwd_coeff_grad_tiled_f32,
        lc_run_compose_bwd_coeff_grad_tiled_bf16,
        lc_run_compose_bwd_dx_tiled_f32,
        lc_run_compose_bwd_dx_tiled_bf16,
        lc_run_compose_bwd_da_tiled_f32,
        lc_run_compose_bwd_da_tiled_bf16,
        lc_run_compose_bwd_db_tiled_f32,
        lc_run_compose_bwd_db_tiled_bf16,
    );
}

pub(crate) mod compose_gemv {
    crate::launch::harness_entries!(
        lc_run_compose_gemv_zero,
        lc_run_compose_gemv_shrink_f32,
        lc_run_compose_gemv_shrink_bf16,
        lc_run_compose_gemv_expand_f32,
        lc_run_compose_gemv_expand_bf16,
        lc_run_compose_gemv_hidden_f32,
        lc_run_compose_gemv_hidden_bf16,
        lc_run_compose_gemv_dx_f32,
        lc_run_compose_gemv_dx_bf16,
        lc_run_compose_gemv_finish_f32,
        lc_run_compose_gemv_finish_bf16,
        lc_run_compose_gemv_forward_f32,
        lc_run_compose_gemv_forward_bf16,
        lc_run_compose_gemv_backward_f32,
        lc_run_compose_gemv_backward_bf16,
    );
}

pub(crate) mod compose_mma {
    crate::launch::harness_entries!(
        lc_run_compose_mma_shrink_bf16,
        lc_run_compose_mma_shrink64_bf16,
        lc_run_compose_mma_expand_bf16,
        lc_run_compose_mma_expand64_bf16,
        lc_run_compose_mma_hidden_bf16,
        lc_run_compose_mma_hidden64_bf16,
        lc_run_compose_mma_dx_bf16,
        lc_run_compose_mma_dx64_bf16,
    );
}

pub(crate) mod compose_factor {
    crate::launch::harness_entries!(
        lc_run_compose_factor_mix_fwd_naive_f32,
        lc_run_compose_factor_mix_fwd_naive_bf16,
        lc_run_compose_factor_mix_fwd_warp_f32,
        lc_run_compose_factor_mix_fwd_warp_bf16,
        lc_run_compose_factor_mix_bwd_naive_f32,
        lc_run_compose_factor_mix_bwd_naive_bf16,
        lc_run_compose_factor_mix_bwd_warp_f32,
        lc_run_compose_factor_mix_bwd_warp_bf16,
        lc_run_compose_factor_coeff_grad_naive_f32,
        lc_run_compose_factor_coeff_grad_warp_f32,
    );
}

pub(crate) mod elementwise {
    crate::launch::harness_entries!(
        lc_run_elementwise_gelu_bias_fwd_f32,
        lc_run_elementwise_gelu_bias_bwd_f32,
        lc_run_elementwise_add_f32,
        lc_run_elementwise_add_acc_f32,
        lc_run_elementwise_bias_add_f32,
        lc_run_elementwise_cast_f32,
        lc_run_elementwise_bias_grad_naive_f32,
        lc_run_elementwise_bias_grad_partial_f32,
        lc_run_elementwise_bias_grad_sum_f32,
        lc_run_elementwise_gelu_bias_fwd_bf16,
        lc_run_elementwise_gelu_bias_bwd_bf16,
        lc_run_elementwise_add_bf16,
        lc_run_elementwise_add_acc_bf16,
        lc_run_elementwise_bias_add_bf16,
        lc_run_elementwise_cast_bf16,
        lc_run_elementwise_bias_grad_naive_bf16,
        lc_run_elementwise_bias_grad_partial_bf16,
        lc_run_elementwise_bias_grad_sum_bf16,
    );
}

pub(crate) mod layernorm {
    crate::launch::harness_entries!(
        lc_run_layernorm_fwd_naive_f32,
        lc_run_layernorm_fwd_warp_f32,
        lc_run_layernorm_fwd_block_f32,
        lc_run_layernorm_dx_naive_f32,
        lc_run_layernorm_dx_warp_f32,
        lc_run_layernorm_dx_block_f32,
        lc_run_layernorm_params_naive_f32,
        lc_run_layernorm_params_partial_f32,
        lc_run_layernorm_params_sum_f32,
        lc_run_layernorm_fwd_naive_bf16,
        lc_run_layernorm_fwd_warp_bf16,
        lc_run_layernorm_fwd_block_bf16,
        lc_run_layernorm_dx_naive_bf16,
        lc_run_layernorm_dx_warp_bf16,
        lc_run_layernorm_dx_block_bf16,
        lc_run_layernorm_params_naive_bf16,
        lc_run_layernorm_params_partial_bf16,
        lc_run_layernorm_params_sum_bf16,
    );
}

pub(crate) mod loss {
    crate::launch::harness_entries!(
        lc_run_loss_pool_fwd_f32,
        lc_run_loss_pool_fwd_bf16,
        lc_run_loss_pool_bwd_f32,
        lc_run_loss_pool_bwd_bf16,
        lc_run_loss_xent_row_f32,
        lc_run_loss_xent_row_bf16,
        lc_run_loss_xent_warp_f32,
        lc_run_loss_xent_warp_bf16,
        lc_run_loss_xent_mean_f32,
    );
}

pub(crate) mod optim {
    crate::launch::harness_entries!(
        lc_run_optim_adamw_f32,
        lc_run_optim_adamw_bf16,
        lc_run_optim_sq_partials_f32,
        lc_run_optim_sq_partials_bf16,
        lc_run_optim_clip_scale_f32,
        lc_run_optim_clip_scale_bf16,
        lc_run_optim_norm_finish_f32,
    );
}

pub(crate) mod coeffs {
    crate::launch::harness_entries!(
        lc_run_coeffs_softmax_row_f32,
        lc_run_coeffs_softmax_warp_f32,
        lc_run_coeffs_softmax_bwd_row_f32,
        lc_run_coeffs_softmax_bwd_warp_f32,
    );
}

pub(crate) mod embedding {
    crate::launch::harness_entries!(
        lc_run_embedding_bert_fwd_f32,
        lc_run_embedding_bert_dword_naive_f32,
        lc_run_embedding_bert_dword_indexed_f32,
        lc_run_embedding_bert_dpos_f32,
        lc_run_embedding_bert_dtype_f32,
        lc_run_embedding_vit_patches_f32,
        lc_run_embedding_vit_assemble_f32,
        lc_run_embedding_vit_assemble_bwd_f32,
        lc_run_embedding_bert_fwd_bf16,
        lc_run_embedding_bert_dword_naive_bf16,
        lc_run_embedding_bert_dword_indexed_bf16,
        lc_run_embedding_bert_dpos_bf16,
        lc_run_embedding_bert_dtype_bf16,
        lc_run_embedding_vit_patches_bf16,
        lc_run_embedding_vit_assemble_bf16,
        lc_run_embedding_vit_assemble_bwd_bf16,
    );
}

pub(crate) mod attention {
    crate::launch::harness_entries!(
        lc_run_attention_fwd_naive_f32,
        lc_run_attention_fwd_tiled_f32,
        lc_run_attention_bwd_dot_f32,
        lc_run_attention_dq_naive_f32,
        lc_run_attention_dq_tiled_f32,
        lc_run_attention_dkv_naive_f32,
        lc_run_attention_dkv_tiled_f32,
        lc_run_attention_fwd_naive_bf16,
        lc_run_attention_fwd_tiled_bf16,
        lc_run_attention_bwd_dot_bf16,
        lc_run_attention_dq_naive_bf16,
        lc_run_attention_dq_tiled_bf16,
        lc_run_attention_dkv_naive_bf16,
        lc_run_attention_dkv_tiled_bf16,
    );
}
