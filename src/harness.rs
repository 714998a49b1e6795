//! The CPU backend: kernels from `cuda/*.cu` compiled as C++ (by `build.rs`) and run by the
//! execution harness in `cuda/harness/` — fibers per thread with real `__syncthreads`, warp
//! shuffles, poisoned shared memory and a seeded thread order (`cuda/README.md`).

use std::ffi::{c_char, c_void, CStr};

use crate::kernels::{Backend, Element, Kernel, KernelArg, KernelError, LaunchDims};

/// Mirrors `lc_harness::LaunchDims` in `cuda/harness/cuda_cpu.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HarnessLaunch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_shared_bytes: u32,
    pub reserved: u32,
    pub seed: u64,
}

extern "C" {
    fn lc_harness_last_error() -> *const c_char;
    fn lc_harness_f32_to_f16_bits(x: f32) -> u16;
    fn lc_harness_f16_bits_to_f32(bits: u16) -> f32;
    fn lc_harness_f32_to_bf16_bits(x: f32) -> u16;
    fn lc_harness_bf16_bits_to_f32(bits: u16) -> f32;
}

/// Runs kernels on the calling thread. `seed` picks the order in which a block's threads run
/// between barriers (and the block order): 0 forward, 1 reverse, anything else a seeded
/// permutation per block and barrier interval. Tests run several seeds.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuHarness {
    pub seed: u64,
}

impl CpuHarness {
    pub fn new(seed: u64) -> Self {
        CpuHarness { seed }
    }
}

/// Poisoned elements on either side of every harness buffer.
pub const GUARD_ELEMENTS: usize = 64;

/// A harness buffer: the data between two guard zones of poison (NaN). A kernel that reads out
/// of bounds reads NaN; one that writes out of bounds is caught when the buffer is downloaded.
#[derive(Clone, Debug)]
pub struct HostBuffer<T> {
    storage: Vec<T>,
    len: usize,
}

impl<T: Element> HostBuffer<T> {
    pub fn as_slice(&self) -> &[T] {
        &self.storage[GUARD_ELEMENTS..GUARD_ELEMENTS + self.len]
    }

    fn guards_intact(&self) -> bool {
        let (before, rest) = self.storage.split_at(GUARD_ELEMENTS);
        let after = &rest[self.len..];
        let poisoned = |zone: &[T]| bytemuck::cast_slice::<T, u8>(zone).iter().all(|&b| b == 0xff);
        poisoned(before) && poisoned(after)
    }
}

impl Backend for CpuHarness {
    type Buffer<T: Element> = HostBuffer<T>;

    fn name(&self) -> String {
        format!("cpu-harness (thread order seed {})", self.seed)
    }

    fn upload<T: Element>(&self, host: &[T]) -> Result<HostBuffer<T>, KernelError> {
        let mut storage = vec![T::zeroed(); host.len() + 2 * GUARD_ELEMENTS];
        bytemuck::cast_slice_mut::<T, u8>(&mut storage).fill(0xff);
        storage[GUARD_ELEMENTS..GUARD_ELEMENTS + host.len()].copy_from_slice(host);
        Ok(HostBuffer {
            storage,
            len: host.len(),
        })
    }

    fn download<T: Element>(&self, buffer: &HostBuffer<T>) -> Result<Vec<T>, KernelError> {
        if !buffer.guards_intact() {
            return Err(KernelError::OutOfBounds(format!(
                "a kernel wrote into the guard zone of a {}-element buffer",
                buffer.len
            )));
        }
        Ok(buffer.as_slice().to_vec())
    }

    fn buffer_len<T: Element>(&self, buffer: &HostBuffer<T>) -> usize {
        buffer.len
    }

    fn arg_in<T: Element>(&self, buffer: &HostBuffer<T>) -> KernelArg {
        KernelArg::Ptr(buffer.storage[GUARD_ELEMENTS..].as_ptr() as u64)
    }

    fn arg_out<T: Element>(&self, buffer: &mut HostBuffer<T>) -> KernelArg {
        KernelArg::Ptr(buffer.storage[GUARD_ELEMENTS..].as_mut_ptr() as u64)
    }

    unsafe fn launch(&self, kernel: &Kernel, dims: &LaunchDims, args: &[KernelArg]) -> Result<(), KernelError> {
        let launch = HarnessLaunch {
            grid: dims.grid,
            block: dims.block,
            dynamic_shared_bytes: dims.dynamic_shared_bytes,
            reserved: 0,
            seed: self.seed,
        };
        // Each argument's bytes at the start of an 8-byte slot; the C++ side reads
        // sizeof(parameter) bytes from it (memcpy), like cuLaunchKernel's kernelParams.
        let mut slots: Vec<[u8; 8]> = args
            .iter()
            .map(|arg| {
                let mut slot = [0u8; 8];
                match *arg {
                    KernelArg::Ptr(p) => slot.copy_from_slice(&p.to_ne_bytes()),
                    KernelArg::I32(v) => slot[..4].copy_from_slice(&v.to_ne_bytes()),
                    KernelArg::F32(v) => slot[..4].copy_from_slice(&v.to_ne_bytes()),
                }
                slot
            })
            .collect();
        let params: Vec<*mut c_void> = slots.iter_mut().map(|s| s.as_mut_ptr().cast()).collect();
        // SAFETY: `launch` and `params` outlive the call, which is synchronous; the caller
        // guarantees (this function's contract) that the arguments fit the kernel.
        let status = unsafe { (kernel.harness_entry)(&launch, params.as_ptr()) };
        if status == 0 {
            return Ok(());
        }
        // SAFETY: the harness returns a NUL-terminated thread-local string that stays valid
        // until the next launch on this thread; it is copied at once.
        let message = unsafe { CStr::from_ptr(lc_harness_last_error()) }
            .to_string_lossy()
            .into_owned();
        Err(KernelError::Harness {
            kernel: kernel.name,
            message,
        })
    }

    fn synchronize(&self) -> Result<(), KernelError> {
        Ok(())
    }
}

/// The harness's f32 → f16 conversion (`__float2half_rn`), as raw bits.
pub fn f32_to_f16_bits(x: f32) -> u16 {
    // SAFETY: a pure function of its argument.
    unsafe { lc_harness_f32_to_f16_bits(x) }
}

/// The harness's f16 → f32 conversion (`__half2float`).
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    // SAFETY: a pure function of its argument.
    unsafe { lc_harness_f16_bits_to_f32(bits) }
}

/// The harness's f32 → bf16 conversion (`__float2bfloat16_rn`), as raw bits.
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    // SAFETY: a pure function of its argument.
    unsafe { lc_harness_f32_to_bf16_bits(x) }
}

/// The harness's bf16 → f32 conversion (`__bfloat162float`).
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    // SAFETY: a pure function of its argument.
    unsafe { lc_harness_bf16_bits_to_f32(bits) }
}

/// The `extern "C"` entries that `LC_HARNESS_ENTRY` defines in `cuda/harness/<family>_host.cpp`.
pub(crate) mod entries {
    macro_rules! harness_entries {
        ($($entry:ident),* $(,)?) => {
            extern "C" {
                $(pub(crate) fn $entry(
                    launch: *const super::super::HarnessLaunch,
                    params: *const *mut std::ffi::c_void,
                ) -> i32;)*
            }
        };
    }

    pub(crate) mod gemm {
        harness_entries!(
            lc_run_gemm_naive_f32,
            lc_run_gemm_naive_f16,
            lc_run_gemm_naive_bf16,
            lc_run_gemm_tiled64_f32,
            lc_run_gemm_tiled64_f16,
            lc_run_gemm_tiled64_bf16,
            lc_run_gemm_tiled128_f32,
            lc_run_gemm_tiled128_f16,
            lc_run_gemm_tiled128_bf16,
        );
    }

    pub(crate) mod compose_fwd {
        harness_entries!(
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
        harness_entries!(
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

    #[cfg(test)]
    pub(crate) mod harness_selftest {
        harness_entries!(
            lc_run_selftest_warp_sum,
            lc_run_selftest_shuffles,
            lc_run_selftest_votes,
            lc_run_selftest_atomics,
            lc_run_selftest_reverse,
            lc_run_selftest_barrier_divergence,
            lc_run_selftest_warp_divergence,
        );
    }
}

#[cfg(test)]
mod selftest;
