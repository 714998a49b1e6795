//! The learned composition's coefficients `c = softmax(v)` per row (layer) and the backward
//! `∂v = c ∘ (∂c − ⟨∂c, c⟩)` (`cuda/coeffs.cu` has the formulas, the shapes and the variants).
//! CPU references: [`softmax_reference`], [`softmax_backward_reference`] — the f64 statements
//! of [`crate::compose::coefficients`] and [`crate::compose::coefficients_backward`]
//! (`Param::Softmax`). Storage f32 only (the coefficients are f32 master values; see the `.cu`).

use super::{Backend, Kernel, KernelArg, KernelError, LaunchDims};

/// The kernel variants, in the order of `cuda/coeffs.cu`'s list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// One thread per row.
    Row,
    /// One warp per row, shuffle reductions.
    Warp,
}

pub const ALL: &[Variant] = &[Variant::Row, Variant::Warp];

/// `rows` independent rows of `n` coefficients (one per module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub rows: usize,
    pub n: usize,
}

const ROW_BLOCK: u32 = 128;
const WARP_BLOCK: u32 = 256;

/// Grid and block of `variant` (forward and backward alike). Pure; panics on an empty shape.
pub fn launch_config(variant: Variant, shape: &Shape) -> LaunchDims {
    assert!(shape.rows >= 1 && shape.n >= 1, "empty coefficients {shape:?}");
    let (rows_per_block, block) = match variant {
        Variant::Row => (ROW_BLOCK, ROW_BLOCK),
        Variant::Warp => (WARP_BLOCK / 32, WARP_BLOCK),
    };
    let dims = LaunchDims {
        grid: [
            u32::try_from(shape.rows.div_ceil(rows_per_block as usize)).expect("grid x fits u32"),
            1,
            1,
        ],
        block: [block, 1, 1],
        dynamic_shared_bytes: 0,
    };
    dims.assert_valid(0);
    dims
}

/// Forward ~4 FLOPs per value, backward ~4; f32 in and out.
pub fn flops_bytes(shape: &Shape, backward: bool) -> (f64, f64) {
    let e = (shape.rows * shape.n) as f64;
    (4.0 * e, if backward { 3.0 } else { 2.0 } * 4.0 * e)
}

/// The compiled kernel (`coeffs_softmax_<variant>_f32`, `coeffs_softmax_bwd_<variant>_f32`).
pub fn kernel(variant: Variant, backward: bool) -> Kernel {
    use super::entries::coeffs as e;
    let (name, harness_entry): (&'static str, super::HarnessEntry) = match (variant, backward) {
        (Variant::Row, false) => kernel_entry!(e::lc_run_coeffs_softmax_row_f32),
        (Variant::Warp, false) => kernel_entry!(e::lc_run_coeffs_softmax_warp_f32),
        (Variant::Row, true) => kernel_entry!(e::lc_run_coeffs_softmax_bwd_row_f32),
        (Variant::Warp, true) => kernel_entry!(e::lc_run_coeffs_softmax_bwd_warp_f32),
    };
    Kernel {
        family: "coeffs",
        name,
        harness_entry,
        cooperative: false,
    }
}

fn check(kernel: &Kernel, shape: &Shape, lens: &[(&str, usize)]) -> Result<(), KernelError> {
    let error = |message: String| KernelError::Argument {
        kernel: kernel.name,
        message,
    };
    if shape.rows == 0 || shape.n == 0 {
        return Err(error(format!("empty coefficients {shape:?}")));
    }
    let want = shape.rows.checked_mul(shape.n).filter(|&e| e <= i32::MAX as usize);
    let Some(want) = want else {
        return Err(error(format!("{shape:?}: too large for int32 indexing")));
    };
    for &(what, len) in lens {
        if len != want {
            return Err(error(format!("{what} has {len} elements, {shape:?} needs {want}")));
        }
    }
    Ok(())
}

/// `c = softmax(v)` row by row (c overwritten).
pub fn softmax<B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &Shape,
    v: &B::Buffer<f32>,
    c: &mut B::Buffer<f32>,
) -> Result<(), KernelError> {
    let kernel = kernel(variant, false);
    check(
        &kernel,
        shape,
        &[("v", backend.buffer_len(v)), ("c", backend.buffer_len(c))],
    )?;
    let args = [
        backend.arg_in(v),
        backend.arg_out(c),
        KernelArg::I32(shape.rows as i32),
        KernelArg::I32(shape.n as i32),
    ];
    // SAFETY: `coeffs_softmax_*_f32(v, c, rows, n)`; both buffers hold rows·n elements (checked,
    // fits int32), c is distinct and mutably borrowed.
    unsafe { backend.launch(&kernel, &launch_config(variant, shape), &args) }
}

/// `dv = c ∘ (dc − ⟨dc, c⟩)` row by row (dv overwritten), from the forward's `c`.
pub fn softmax_backward<B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &Shape,
    c: &B::Buffer<f32>,
    dc: &B::Buffer<f32>,
    dv: &mut B::Buffer<f32>,
) -> Result<(), KernelError> {
    let kernel = kernel(variant, true);
    check(
        &kernel,
        shape,
        &[
            ("c", backend.buffer_len(c)),
            ("dc", backend.buffer_len(dc)),
            ("dv", backend.buffer_len(dv)),
        ],
    )?;
    let args = [
        backend.arg_in(c),
        backend.arg_in(dc),
        backend.arg_out(dv),
        KernelArg::I32(shape.rows as i32),
        KernelArg::I32(shape.n as i32),
    ];
    // SAFETY: `coeffs_softmax_bwd_*_f32(c, dc, dv, rows, n)`; every buffer holds rows·n elements
    // (checked, fits int32), dv is distinct and mutably borrowed.
    unsafe { backend.launch(&kernel, &launch_config(variant, shape), &args) }
}

/// `c = softmax(v)` per row in f64 (the CPU composition's `coefficients(Softmax, …)`).
pub fn softmax_reference(shape: &Shape, v: &[f64]) -> Vec<f64> {
    crate::compose::coefficients(crate::compose::Param::Softmax, &v[..shape.rows * shape.n], shape.n)
}

/// `∂v = c ∘ (∂c − ⟨∂c, c⟩)` per row in f64, c recomputed from v (the CPU composition's
/// `coefficients_backward(Softmax, …)`).
pub fn softmax_backward_reference(shape: &Shape, v: &[f64], dc: &[f64]) -> Vec<f64> {
    crate::compose::coefficients_backward(crate::compose::Param::Softmax, &v[..shape.rows * shape.n], dc, shape.n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_match_the_cuda_entries() {
        assert_eq!(kernel(Variant::Warp, true).name, "coeffs_softmax_bwd_warp_f32");
        assert_eq!(kernel(Variant::Row, false).name, "coeffs_softmax_row_f32");
    }

    #[test]
    fn grids_cover_every_row() {
        for rows in [1, 7, 8, 9, 100, 1000] {
            for &variant in ALL {
                let dims = launch_config(variant, &Shape { rows, n: 3 });
                let per_block = match variant {
                    Variant::Row => dims.block[0],
                    Variant::Warp => dims.block[0] / 32,
                } as usize;
                let blocks = dims.grid[0] as usize;
                assert!(blocks * per_block >= rows && (blocks - 1) * per_block < rows);
            }
        }
    }
}
