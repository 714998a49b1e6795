//! Composition in factor mode (LoraHub, `ΔW = (Σ c_i B_i)(Σ c_i s_i A_i)`, equal ranks): the
//! shrink and expand GEMMs through the [`super::gemm`] family, the mix forward, the mix backward
//! and the deterministic per-sample `∂C` in `cuda/compose_factor.cu` (the formulas, shapes,
//! semantics and variants are there). CPU references: [`crate::compose::reference`]
//! (`Mode::Factor`, the f64 specification) and [`crate::compose::fast`] (`mix`, `mix_backward`:
//! the same GEMM–mix–GEMM structure).

use super::compose_common::{check_tables, linear_dims, naive_dims, not_built};
pub use super::compose_common::{Shape, Tables, TokenRows};
use super::gemm::{self, GemmParams, GemmShape};
use super::{check_len, check_lens, Backend, DType, Element, Kernel, KernelArg, KernelError, LaunchDims};

/// The kernel variants, in the order of `cuda/compose_factor.cu`'s numbered list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// One thread per (token, q) in the mixes, one per (sample, module) in the ∂C reduction;
    /// naive GEMMs.
    Naive,
    /// One warp per token in the mixes, one per (sample, module) in the ∂C reduction; 64×64
    /// tiled GEMMs.
    Warp,
}

/// Every variant: tests and benches iterate this list.
pub const ALL: &[Variant] = &[Variant::Naive, Variant::Warp];

/// Threads per block of the warp kernels and of the naive ∂C reduction (`THREADS` in
/// `cuda/compose_factor.cu`).
pub const THREADS: u32 = 256;
const WARP: u32 = 32;
const WARPS: u32 = THREADS / WARP;
/// Static shared memory of the warp mix backward: f32 `part_v`, `part_dv`, `v_chunk`,
/// `dv_chunk`, each `[WARPS][32]`.
pub const WARP_MIX_SHARED_BYTES: u32 = 4 * 4 * WARPS * WARP;
/// Static shared memory of the warp mix forward: f32 `part_v` and `v_chunk` alone (it has no ∂v).
pub const WARP_MIX_FWD_SHARED_BYTES: u32 = 2 * 4 * WARPS * WARP;

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Naive => "naive",
            Variant::Warp => "warp",
        }
    }

    /// The GEMM variant of the shrink, expand, hidden and ∂X products.
    pub fn gemm(self) -> gemm::Variant {
        match self {
            Variant::Naive => gemm::Variant::Naive,
            Variant::Warp => gemm::Variant::Tiled64,
        }
    }

    /// Partials per (token, module) in the backward's workspace: one per rank column for the
    /// naive mix, one for the warp mix (which sums the columns itself).
    fn partials_per_module(self, rank: usize) -> usize {
        match self {
            Variant::Naive => rank,
            Variant::Warp => 1,
        }
    }
}

/// One kernel of the family (the GEMMs belong to [`super::gemm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    MixForward(Variant),
    MixBackward(Variant),
    /// f32 in and out whatever the storage.
    CoeffGrad(Variant),
}

/// One launch, in stream order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Step {
    /// `U = X A_catᵀ` (GEMM, overwrite).
    Shrink(GemmParams),
    /// `Z = mix(U)`.
    MixForward,
    /// `Y += Z B_catᵀ` (GEMM, beta = 1).
    Expand(GemmParams),
    /// `H = G B_cat` (GEMM, overwrite).
    Hidden(GemmParams),
    /// `∂U` and the per-token ∂C partials.
    MixBackward,
    /// `∂C[s, i]` from the partials of `tokens` tokens (0 when the shape is empty: ∂C = 0).
    CoeffGrad { tokens: usize },
    /// `∂X += ∂U A_cat` (GEMM, beta = 1).
    Dx(GemmParams),
}

/// The common rank r of every module: factor mode sums the modules' factors, so the ranks must
/// be equal.
pub fn rank(kernel: &'static str, shape: &Shape) -> Result<usize, KernelError> {
    let r = shape.ranks.first().copied().unwrap_or(0);
    if shape.ranks.iter().any(|&ri| ri != r) {
        return Err(KernelError::Argument {
            kernel,
            message: format!(
                "factor mode needs every module to have the same rank, got ranks {:?}",
                shape.ranks
            ),
        });
    }
    Ok(r)
}

fn gemm_params(m: usize, n: usize, k: usize, trans_b: bool, beta: f32) -> GemmParams {
    GemmParams {
        shape: GemmShape {
            m,
            n,
            k,
            trans_a: false,
            trans_b,
        },
        alpha: 1.0,
        beta,
    }
}

fn gemm_step(variant: Variant, step: Step, params: GemmParams) -> (Step, LaunchDims) {
    (step, gemm::launch_config(variant.gemm(), &params.shape))
}

/// Grid of a mix kernel: naive (q, t) 16×16 blocks, or one warp per token.
fn mix_dims(variant: Variant, t: usize, r: usize) -> LaunchDims {
    match variant {
        Variant::Naive => naive_dims(t, r),
        Variant::Warp => {
            let dims = LaunchDims {
                grid: [
                    u32::try_from(t.div_ceil(WARPS as usize)).expect("grid x fits u32"),
                    1,
                    1,
                ],
                block: [THREADS, 1, 1],
                dynamic_shared_bytes: 0,
            };
            dims.assert_valid(WARP_MIX_SHARED_BYTES);
            dims
        }
    }
}

/// Grid of the ∂C reduction over `outputs` = S·N elements.
fn coeff_dims(variant: Variant, outputs: usize) -> LaunchDims {
    match variant {
        Variant::Naive => linear_dims(outputs),
        Variant::Warp => {
            let dims = LaunchDims {
                grid: [
                    u32::try_from(outputs.div_ceil(WARPS as usize)).expect("grid x fits u32"),
                    1,
                    1,
                ],
                block: [THREADS, 1, 1],
                dynamic_shared_bytes: 0,
            };
            dims.assert_valid(0);
            dims
        }
    }
}

/// The forward's launches in stream order with their grids. Pure; panics on unequal ranks or
/// past the launch limits ([`forward`] checks both first and returns errors). Empty for an empty
/// shape (Y unchanged).
pub fn forward_config(variant: Variant, shape: &Shape) -> Vec<(Step, LaunchDims)> {
    let r = rank("compose_factor", shape).unwrap_or_else(|e| panic!("{e}"));
    if shape.is_empty() {
        return Vec::new();
    }
    let (t, big_r) = (shape.t, shape.r_total());
    let shrink = gemm_params(t, big_r, shape.d_in, true, 0.0);
    let expand = gemm_params(t, shape.d_out, big_r, true, 1.0);
    vec![
        gemm_step(variant, Step::Shrink(shrink), shrink),
        (Step::MixForward, mix_dims(variant, t, r)),
        gemm_step(variant, Step::Expand(expand), expand),
    ]
}

/// The backward's launches in stream order, for ∂X when `dx` and ∂C when `dc`. Pure; panics
/// like [`forward_config`]. An empty shape with ∂C asked still runs the reduction (over no
/// tokens) so that ∂C is overwritten with zeros.
pub fn backward_config(variant: Variant, shape: &Shape, dx: bool, dc: bool) -> Vec<(Step, LaunchDims)> {
    let r = rank("compose_factor", shape).unwrap_or_else(|e| panic!("{e}"));
    let coeffs = shape.n_samples * shape.n();
    let mut steps = Vec::new();
    if shape.is_empty() {
        if dc && coeffs > 0 {
            steps.push((Step::CoeffGrad { tokens: 0 }, coeff_dims(variant, coeffs)));
        }
        return steps;
    }
    if !dx && !dc {
        return steps;
    }
    let (t, big_r) = (shape.t, shape.r_total());
    let hidden = gemm_params(t, big_r, shape.d_out, false, 0.0);
    steps.push(gemm_step(variant, Step::Hidden(hidden), hidden));
    steps.push((Step::MixBackward, mix_dims(variant, t, r)));
    if dc {
        steps.push((Step::CoeffGrad { tokens: t }, coeff_dims(variant, coeffs)));
    }
    if dx {
        let dx = gemm_params(t, shape.d_in, big_r, false, 1.0);
        steps.push(gemm_step(variant, Step::Dx(dx), dx));
    }
    steps
}

/// f32 elements of the workspace (the backward's per-token ∂C partials, T·N·K with K = r for
/// the naive variant and 1 for the warp variant; the forward needs none); at least 1.
pub fn workspace_len(variant: Variant, shape: &Shape) -> usize {
    let r = shape.ranks.first().copied().unwrap_or(0);
    (shape.t * shape.n() * variant.partials_per_module(r)).max(1)
}

/// Useful FLOPs and the fewest bytes. Forward: `2·T·d_in·R + 3·T·R + 2·T·R·d_out`; X, A_cat,
/// B_cat read once, Y read and written, U written (kept for the backward). Backward (∂X and
/// ∂C): `2·T·d_out·R + 9·T·R + 2·T·R·d_in`; G, U, A_cat, B_cat read once, ∂X read and written.
/// Z, H and ∂U are scratch a fused kernel would not store; C, ∂C, the token rows and the scales
/// count as f32/int32.
pub fn flops_bytes(shape: &Shape, dtype: DType, backward: bool) -> (f64, f64) {
    let (t, di, d_o, r) = (
        shape.t as f64,
        shape.d_in as f64,
        shape.d_out as f64,
        shape.r_total() as f64,
    );
    let (sn, n) = (shape.n_samples as f64 * shape.n() as f64, shape.n() as f64);
    let (flops, elems, small) = if backward {
        (
            2.0 * t * d_o * r + 9.0 * t * r + 2.0 * t * r * di,
            t * d_o + t * r + r * di + d_o * r + 2.0 * t * di,
            4.0 * (2.0 * sn + t + n),
        )
    } else {
        (
            2.0 * t * di * r + 3.0 * t * r + 2.0 * t * r * d_o,
            t * di + r * di + d_o * r + 2.0 * t * d_o + t * r,
            4.0 * (sn + t + n),
        )
    };
    (flops, elems * dtype.size_bytes() as f64 + small)
}

/// The compiled kernel of `entry` for storage `dtype` (`compose_factor_<kernel>_<dtype>`).
pub fn kernel(entry: Entry, dtype: DType) -> Result<Kernel, KernelError> {
    use super::entries::compose_factor as e;
    use DType::{BF16, F32};
    use Variant::{Naive, Warp};
    let (name, harness_entry): (&'static str, super::HarnessEntry) = match (entry, dtype) {
        (Entry::MixForward(Naive), F32) => kernel_entry!(e::lc_run_compose_factor_mix_fwd_naive_f32),
        (Entry::MixForward(Naive), BF16) => kernel_entry!(e::lc_run_compose_factor_mix_fwd_naive_bf16),
        (Entry::MixForward(Warp), F32) => kernel_entry!(e::lc_run_compose_factor_mix_fwd_warp_f32),
        (Entry::MixForward(Warp), BF16) => kernel_entry!(e::lc_run_compose_factor_mix_fwd_warp_bf16),
        (Entry::MixBackward(Naive), F32) => kernel_entry!(e::lc_run_compose_factor_mix_bwd_naive_f32),
        (Entry::MixBackward(Naive), BF16) => kernel_entry!(e::lc_run_compose_factor_mix_bwd_naive_bf16),
        (Entry::MixBackward(Warp), F32) => kernel_entry!(e::lc_run_compose_factor_mix_bwd_warp_f32),
        (Entry::MixBackward(Warp), BF16) => kernel_entry!(e::lc_run_compose_factor_mix_bwd_warp_bf16),
        (Entry::CoeffGrad(Naive), _) => kernel_entry!(e::lc_run_compose_factor_coeff_grad_naive_f32),
        (Entry::CoeffGrad(Warp), _) => kernel_entry!(e::lc_run_compose_factor_coeff_grad_warp_f32),
        (_, DType::F16) => return Err(not_built("compose_factor")),
    };
    Ok(Kernel {
        family: "compose_factor",
        name,
        harness_entry,
        cooperative: false,
    })
}

/// Y (T, d_out) += the factor composition of X (T, d_in), with `variant` (asynchronous on the
/// GPU). U (T, R) is overwritten with `X A_catᵀ` and kept for the [`backward`]; Z (T, R) is
/// overwritten scratch. A_cat (R, d_in), B_cat (d_out, R), C (S, N) f32.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &Shape,
    x: &B::Buffer<T>,
    a_cat: &B::Buffer<T>,
    b_cat: &B::Buffer<T>,
    c: &B::Buffer<f32>,
    rows: &TokenRows<B>,
    tables: &Tables<B>,
    u: &mut B::Buffer<T>,
    z: &mut B::Buffer<T>,
    y: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let mix = kernel(Entry::MixForward(variant), T::DTYPE)?;
    let r = rank(mix.name, shape)?;
    check_tables(backend, mix.name, shape, backend.buffer_len(c), rows, tables)?;
    let (t, big_r, d_in, d_out) = (shape.t, shape.r_total(), shape.d_in, shape.d_out);
    check_lens(
        mix.name,
        &[
            ("X", backend.buffer_len(x), t * d_in),
            ("A_cat", backend.buffer_len(a_cat), big_r * d_in),
            ("B_cat", backend.buffer_len(b_cat), d_out * big_r),
            ("U", backend.buffer_len(u), t * big_r),
            ("Z", backend.buffer_len(z), t * big_r),
            ("Y", backend.buffer_len(y), t * d_out),
        ],
    )?;
    let i = |v: usize| KernelArg::I32(v as i32);
    for (step, dims) in forward_config(variant, shape) {
        match step {
            Step::Shrink(params) => gemm::launch(backend, variant.gemm(), &params, x, a_cat, u)?,
            Step::MixForward => {
                let args = [
                    backend.arg_in(u),
                    backend.arg_in(c),
                    backend.arg_in(&rows.sample_of),
                    backend.arg_in(&tables.mod_scale),
                    backend.arg_out(z),
                    i(t),
                    i(shape.n()),
                    i(r),
                ];
                // SAFETY: the arguments follow `compose_factor_mix_fwd_*`'s parameter list (U, C,
                // sample_of, mod_scale, Z, n_tokens, n_modules, r). U and Z hold exactly T·N·r
                // elements (checked above, with equal ranks); C is S·N and every token's sample
                // was checked against S on upload; mod_scale has N entries (the tables were built
                // from these ranks). Z is a distinct, mutably borrowed buffer.
                unsafe { backend.launch(&mix, &dims, &args)? };
            }
            Step::Expand(params) => gemm::launch(backend, variant.gemm(), &params, z, b_cat, y)?,
            other => unreachable!("{other:?} in the forward plan"),
        }
    }
    Ok(())
}

/// The backward with `G = ∂L/∂Y` (T, d_out) and the forward's U: `dx` (T, d_in) += ∂X when
/// given, `dc` (S, N) overwritten with ∂C when given. H, ∂U (T, R) are overwritten scratch;
/// `work` holds at least [`workspace_len`] f32 elements (need not be initialised; left holding
/// the ∂C partials). `x` is length-checked but not read: modules never train in factor mode, and
/// ∂C and ∂X need only U, H and the weights.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &Shape,
    g: &B::Buffer<T>,
    x: &B::Buffer<T>,
    u: &B::Buffer<T>,
    a_cat: &B::Buffer<T>,
    b_cat: &B::Buffer<T>,
    c: &B::Buffer<f32>,
    rows: &TokenRows<B>,
    tables: &Tables<B>,
    mut dx: Option<&mut B::Buffer<T>>,
    mut dc: Option<&mut B::Buffer<f32>>,
    h: &mut B::Buffer<T>,
    du: &mut B::Buffer<T>,
    work: &mut B::Buffer<f32>,
) -> Result<(), KernelError> {
    let mix = kernel(Entry::MixBackward(variant), T::DTYPE)?;
    let reduce = kernel(Entry::CoeffGrad(variant), T::DTYPE)?;
    let r = rank(mix.name, shape)?;
    check_tables(backend, mix.name, shape, backend.buffer_len(c), rows, tables)?;
    let (t, n, big_r, d_in, d_out) = (shape.t, shape.n(), shape.r_total(), shape.d_in, shape.d_out);
    check_lens(
        mix.name,
        &[
            ("G", backend.buffer_len(g), t * d_out),
            ("X", backend.buffer_len(x), t * d_in),
            ("U", backend.buffer_len(u), t * big_r),
            ("A_cat", backend.buffer_len(a_cat), big_r * d_in),
            ("B_cat", backend.buffer_len(b_cat), d_out * big_r),
            ("H", backend.buffer_len(h), t * big_r),
            ("dU", backend.buffer_len(du), t * big_r),
        ],
    )?;
    if let Some(dx) = dx.as_deref() {
        check_len(mix.name, "dX", backend.buffer_len(dx), t * d_in, false)?;
    }
    if let Some(dc) = dc.as_deref() {
        check_len(mix.name, "dC", backend.buffer_len(dc), shape.n_samples * n, false)?;
    }
    check_len(
        mix.name,
        "workspace",
        backend.buffer_len(work),
        workspace_len(variant, shape),
        true,
    )?;
    let i = |v: usize| KernelArg::I32(v as i32);
    for (step, dims) in backward_config(variant, shape, dx.is_some(), dc.is_some()) {
        match step {
            Step::Hidden(params) => gemm::launch(backend, variant.gemm(), &params, g, b_cat, h)?,
            Step::MixBackward => {
                let args = [
                    backend.arg_in(u),
                    backend.arg_in(h),
                    backend.arg_in(c),
                    backend.arg_in(&rows.sample_of),
                    backend.arg_in(&tables.mod_scale),
                    backend.arg_out(du),
                    backend.arg_out(work),
                    i(t),
                    i(n),
                    i(r),
                ];
                // SAFETY: the arguments follow `compose_factor_mix_bwd_*`'s parameter list (U, H,
                // C, sample_of, mod_scale, dU, work, n_tokens, n_modules, r). U, H and dU hold
                // exactly T·N·r elements and the workspace at least T·N·K (checked above); C,
                // sample_of and mod_scale as in the forward. dU and the workspace are distinct,
                // mutably borrowed buffers.
                unsafe { backend.launch(&mix, &dims, &args)? };
            }
            Step::CoeffGrad { tokens } => {
                let dc = dc.as_deref_mut().expect("∂C is planned only when asked for");
                let args = [
                    backend.arg_in(work),
                    backend.arg_in(&rows.sample_of),
                    backend.arg_out(dc),
                    i(tokens),
                    i(shape.n_samples),
                    i(n),
                    i(variant.partials_per_module(r)),
                ];
                // SAFETY: the arguments follow `compose_factor_coeff_grad_*_f32`'s parameter list
                // (work, sample_of, dC, n_tokens, n_samples, n_modules, K). dC holds exactly S·N
                // elements; the kernel reads work[(t·N + i)·K + k] for t < tokens, which the mix
                // backward of this plan wrote (tokens is 0 when it did not run); sample_of has
                // T entries. dC is a distinct, mutably borrowed buffer.
                unsafe { backend.launch(&reduce, &dims, &args)? };
            }
            Step::Dx(params) => {
                let dx = dx.as_deref_mut().expect("∂X is planned only when asked for");
                gemm::launch(backend, variant.gemm(), &params, du, a_cat, dx)?;
            }
            other => unreachable!("{other:?} in the backward plan"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(t: usize, d: usize, ranks: Vec<usize>) -> Shape {
        Shape {
            t,
            d_in: d,
            d_out: d + 1,
            n_samples: 2,
            ranks,
        }
    }

    #[test]
    fn plans_are_gemm_mix_gemm() {
        let s = shape(33, 70, vec![4; 3]);
        for &variant in ALL {
            let fwd: Vec<Step> = forward_config(variant, &s).into_iter().map(|(s, _)| s).collect();
            assert!(matches!(
                fwd[..],
                [Step::Shrink(_), Step::MixForward, Step::Expand(p)] if p.beta == 1.0 && p.shape.k == 12
            ));
            let bwd = backward_config(variant, &s, true, true);
            assert_eq!(bwd.len(), 4);
            assert!(matches!(bwd[3].0, Step::Dx(p) if p.beta == 1.0 && p.shape.n == 70));
            assert_eq!(backward_config(variant, &s, false, true).len(), 3);
            assert!(backward_config(variant, &s, false, false).is_empty());
        }
    }

    #[test]
    fn empty_shape_still_zeroes_dc() {
        let s = shape(0, 8, vec![2; 3]);
        assert!(forward_config(Variant::Warp, &s).is_empty());
        let plan = backward_config(Variant::Warp, &s, true, true);
        assert!(matches!(plan[..], [(Step::CoeffGrad { tokens: 0 }, _)]));
    }

    #[test]
    fn grids_cover_every_token_and_coefficient() {
        let s = shape(33, 8, vec![40; 5]);
        let mix = mix_dims(Variant::Warp, s.t, 40);
        assert!(mix.grid[0] as usize * WARPS as usize >= 33);
        let naive = mix_dims(Variant::Naive, s.t, 40);
        assert!(naive.grid[0] * naive.block[0] >= 40 && naive.grid[1] * naive.block[1] >= 33);
        let dc = coeff_dims(Variant::Warp, 10);
        assert!(dc.grid[0] as usize * WARPS as usize >= 10);
    }

    #[test]
    fn unequal_ranks_are_an_argument_error() {
        let err = rank("compose_factor", &shape(3, 4, vec![4, 8])).unwrap_err();
        assert!(err.to_string().contains("same rank"), "{err}");
        assert_eq!(rank("x", &shape(3, 4, vec![])).unwrap(), 0);
    }

    #[test]
    fn workspace_fits_the_partials() {
        let s = shape(7, 8, vec![4; 3]);
        assert_eq!(workspace_len(Variant::Naive, &s), 7 * 3 * 4);
        assert_eq!(workspace_len(Variant::Warp, &s), 7 * 3);
        assert_eq!(workspace_len(Variant::Warp, &shape(0, 8, vec![])), 1);
    }
}
