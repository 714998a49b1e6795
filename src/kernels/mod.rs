//! Hand-written CUDA kernels (`cuda/*.cu`) behind one launch interface ([`crate::launch`],
//! re-exported here) with two backends (DESIGN §3–4): [`crate::gpu::GpuBackend`] (cudarc, PTX
//! built by `build.rs`) and [`crate::harness::CpuHarness`] (the same kernel source compiled as
//! C++ and run by the CPU execution harness in `cuda/harness/`).
//!
//! A kernel family is one `cuda/<family>.cu` plus one module here holding its parameter struct,
//! a pure `launch_config` that asserts its preconditions, the launcher (generic over
//! [`Backend`]), `flops_bytes`, and its plain f64 CPU reference. The launch configuration is
//! computed once, in Rust, and given unchanged to either backend.

/// `(PTX name, harness entry)` of one kernel, both from its harness symbol
/// `lc_run_<name>` (`LC_HARNESS_ENTRY` in cuda/harness/), so the two cannot disagree.
macro_rules! kernel_entry {
    ($module:ident :: $symbol:ident) => {
        (
            &stringify!($symbol)["lc_run_".len()..],
            $module::$symbol as $crate::kernels::HarnessEntry,
        )
    };
}

pub mod attention;
pub mod coeffs;
pub mod compose_bwd;
pub mod compose_common;
pub mod compose_factor;
pub mod compose_fwd;
pub mod elementwise;
pub mod embedding;
mod entries;
pub mod gemm;
pub mod layernorm;
pub mod loss;
pub mod optim;

pub use crate::launch::*;

/// `Err(Argument)` unless `len` is `want` (or at least `want` when `at_least`).
pub(crate) fn check_len(
    kernel: &'static str,
    what: &str,
    len: usize,
    want: usize,
    at_least: bool,
) -> Result<(), KernelError> {
    let ok = if at_least { len >= want } else { len == want };
    if ok {
        Ok(())
    } else {
        Err(KernelError::Argument {
            kernel,
            message: format!(
                "{what} has {len} elements, needs {}{want}",
                if at_least { "at least " } else { "" }
            ),
        })
    }
}

/// [`check_len`] for each `(what, len, want)`: every buffer exactly as long as the shape needs.
pub(crate) fn check_lens(kernel: &'static str, lens: &[(&str, usize, usize)]) -> Result<(), KernelError> {
    lens.iter()
        .try_for_each(|&(what, len, want)| check_len(kernel, what, len, want, false))
}
