//! The CPU backend: kernels from `cuda/*.cu` compiled as C++ (by `build.rs`) and run by the
//! execution harness in `cuda/harness/` — fibers per thread with real `__syncthreads`, warp
//! shuffles, a seeded thread and block order, and a memory checker that sees every access a
//! kernel makes (bounds, initialisation, races within and between blocks; `cuda/README.md`).

use std::ffi::{c_char, c_void, CStr};
use std::ptr::NonNull;
use std::sync::Arc;

pub use crate::launch::HarnessLaunch;
use crate::launch::{
    Backend, Kernel, KernelArg, KernelError, LaunchDims, Scalar, Traffic, HARNESS_COOPERATIVE,
    HARNESS_COOPERATIVE_BLOCKS, HARNESS_SM_COUNT,
};

extern "C" {
    fn lc_harness_last_error() -> *const c_char;
    fn lc_harness_f32_to_f16_bits(x: f32) -> u16;
    fn lc_harness_f16_bits_to_f32(bits: u16) -> f32;
    fn lc_harness_f32_to_bf16_bits(x: f32) -> u16;
    fn lc_harness_bf16_bits_to_f32(bits: u16) -> f32;
    fn lc_harness_alloc(bytes: usize) -> *mut c_void;
    fn lc_harness_free(p: *mut c_void);
    fn lc_harness_mark_written(p: *mut c_void, bytes: usize);
    fn lc_harness_is_written(p: *const c_void, bytes: usize) -> i32;
}

/// Runs kernels on the calling thread. `seed` picks the order in which a block's threads run
/// between barriers and the order of the blocks: 0 forward, 1 reverse, anything else a seeded
/// permutation. Tests run several seeds.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuHarness {
    pub seed: u64,
}

impl CpuHarness {
    pub fn new(seed: u64) -> Self {
        CpuHarness { seed }
    }
}

/// One allocation in the harness's device arena, freed when the last buffer using it is dropped.
#[derive(Debug)]
struct Allocation(NonNull<c_void>);

// SAFETY: the arena is process-wide; the allocation is only freed in Drop, once.
unsafe impl Send for Allocation {}
// SAFETY: as above; the handle itself is never written through.
unsafe impl Sync for Allocation {}

impl Drop for Allocation {
    fn drop(&mut self) {
        // SAFETY: the pointer came from lc_harness_alloc and is freed once, here.
        unsafe { lc_harness_free(self.0.as_ptr()) };
    }
}

thread_local! {
    /// Host↔device traffic of this thread's harness buffers ([`Backend::traffic`]).
    static TRAFFIC: std::cell::Cell<Traffic> = const { std::cell::Cell::new(Traffic { to_device: 0, to_host: 0, copies: 0 }) };
}

thread_local! {
    /// This thread's [`Backend::tickets`], and whether a launch failed since they were last
    /// checked (a launch ended by an error may leave a ticket drawn).
    static TICKETS: std::cell::RefCell<Option<HostBuffer<u32>>> = const { std::cell::RefCell::new(None) };
    static LAUNCH_FAILED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn count(to_device: usize, to_host: usize) {
    TRAFFIC.with(|t| {
        let mut now = t.get();
        now.to_device += to_device as u64;
        now.to_host += to_host as u64;
        now.copies += 1;
        t.set(now);
    });
}

/// Harness device memory: an allocation in the harness's device arena, where the memory
/// checker knows its bounds and which of its elements have been written, or a view of part of
/// one ([`Backend::view`]). Fresh memory from [`Backend::alloc`] holds the poison pattern (0xff
/// bytes: NaN for floats, −1 for integers) and counts as unwritten until the host or a kernel
/// writes it.
#[derive(Debug)]
pub struct HostBuffer<T> {
    ptr: NonNull<T>,
    len: usize,
    allocation: Arc<Allocation>,
}

// SAFETY: a HostBuffer owns (a share of) its allocation like a Vec; the arena is process-wide.
unsafe impl<T: Send> Send for HostBuffer<T> {}
// SAFETY: shared references only read.
unsafe impl<T: Sync> Sync for HostBuffer<T> {}

impl<T: Scalar> HostBuffer<T> {
    /// `len` elements of poisoned, unwritten harness memory.
    pub fn uninit(len: usize) -> Result<Self, KernelError> {
        let bytes = std::mem::size_of::<T>() * len;
        // SAFETY: a plain allocation call; the result is checked for null.
        let p = unsafe { lc_harness_alloc(bytes) };
        let raw = NonNull::new(p).ok_or_else(|| {
            KernelError::Unavailable(format!("CPU harness: device arena cannot hold {bytes} more bytes"))
        })?;
        let ptr = raw.cast::<T>();
        // SAFETY: the allocation holds `bytes` writable bytes; writes from the host do not
        // count as initialisation (only lc_harness_mark_written does).
        unsafe { std::ptr::write_bytes(ptr.as_ptr().cast::<u8>(), 0xff, bytes) };
        Ok(HostBuffer {
            ptr,
            len,
            allocation: Arc::new(Allocation(raw)),
        })
    }

    /// A copy of `host`, written by the host.
    pub fn from_slice(host: &[T]) -> Result<Self, KernelError> {
        let mut buffer = Self::uninit(host.len())?;
        buffer.write(host);
        Ok(buffer)
    }

    /// Copies `host` in and marks it written (as a host-to-device copy does).
    fn write(&mut self, host: &[T]) {
        assert_eq!(
            host.len(),
            self.len,
            "copy of {} elements into a buffer of {}",
            host.len(),
            self.len
        );
        self.as_mut_slice().copy_from_slice(host);
        // SAFETY: the range is this buffer's.
        unsafe { lc_harness_mark_written(self.ptr.as_ptr().cast(), std::mem::size_of_val(host)) };
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements; unwritten ones hold the poison pattern.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `len` initialised (poison or data) elements of this buffer's allocation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as in as_slice; `&mut self` is unique among the references the crate makes
        // (views of one allocation are handed to kernels one launch at a time).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Whether the host or a kernel has written every element.
    pub fn is_written(&self) -> bool {
        // SAFETY: the range is this buffer's.
        unsafe { lc_harness_is_written(self.ptr.as_ptr().cast(), std::mem::size_of::<T>() * self.len) != 0 }
    }
}

impl<T: Scalar> Clone for HostBuffer<T> {
    /// A copy in a new allocation, written by the host, unwritten elements included (poison, as
    /// on the device).
    fn clone(&self) -> Self {
        HostBuffer::from_slice(self.as_slice()).expect("harness arena has room for a copy")
    }
}

impl Backend for CpuHarness {
    type Buffer<T: Scalar> = HostBuffer<T>;

    fn name(&self) -> String {
        format!("cpu-harness (thread order seed {})", self.seed)
    }

    fn sm_count(&self) -> usize {
        HARNESS_SM_COUNT
    }

    fn runs_sm90a(&self) -> bool {
        true
    }

    fn cooperative_blocks(&self, _kernel: &Kernel, _threads: u32, _shared: u32) -> Result<usize, KernelError> {
        Ok(HARNESS_COOPERATIVE_BLOCKS)
    }

    fn upload<T: Scalar>(&self, host: &[T]) -> Result<HostBuffer<T>, KernelError> {
        count(std::mem::size_of_val(host), 0);
        HostBuffer::from_slice(host)
    }

    fn upload_into<T: Scalar>(&self, buffer: &mut HostBuffer<T>, host: &[T]) -> Result<(), KernelError> {
        if host.len() != buffer.len {
            return Err(KernelError::Argument {
                kernel: "upload_into",
                message: format!("{} host elements for a buffer of {}", host.len(), buffer.len),
            });
        }
        count(std::mem::size_of_val(host), 0);
        buffer.write(host);
        Ok(())
    }

    fn zero<T: Scalar>(&self, buffer: &mut HostBuffer<T>) -> Result<(), KernelError> {
        let len = buffer.len;
        // SAFETY: `len` elements of this buffer; all-zero bits are a valid T (Scalar:
        // ValidAsZeroBits).
        unsafe { std::ptr::write_bytes(buffer.ptr.as_ptr(), 0, len) };
        // SAFETY: the range is this buffer's.
        unsafe { lc_harness_mark_written(buffer.ptr.as_ptr().cast(), std::mem::size_of::<T>() * len) };
        Ok(())
    }

    fn tickets(&self, len: usize) -> Result<KernelArg, KernelError> {
        TICKETS.with(|pool| {
            let mut pool = pool.borrow_mut();
            if let Some(p) = pool.as_mut() {
                if LAUNCH_FAILED.replace(false) {
                    self.zero(p)?;
                } else if let Some((at, &v)) = p.as_slice().iter().enumerate().find(|(_, &v)| v != 0) {
                    return Err(KernelError::Harness {
                        kernel: "tickets",
                        message: format!(
                            "ticket {at} is {v}: a launch left it drawn (its last block must reset it, \
                             lc::last_split)"
                        ),
                    });
                }
            }
            if pool.as_ref().is_none_or(|p| p.len < len) {
                let mut fresh = HostBuffer::uninit(len.max(64))?;
                self.zero(&mut fresh)?;
                *pool = Some(fresh);
            }
            Ok(self.arg_out(pool.as_mut().expect("the pool was just filled")))
        })
    }

    fn view<T: Scalar>(&self, parent: &HostBuffer<T>, offset: usize, len: usize) -> HostBuffer<T> {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= parent.len),
            "view {offset}..{offset}+{len} of a buffer of {}",
            parent.len
        );
        HostBuffer {
            // SAFETY: inside the parent's elements (checked above).
            ptr: unsafe { NonNull::new_unchecked(parent.ptr.as_ptr().add(offset)) },
            len,
            allocation: parent.allocation.clone(),
        }
    }

    fn traffic(&self) -> Traffic {
        TRAFFIC.with(|t| t.get())
    }

    fn alloc<T: Scalar>(&self, len: usize) -> Result<HostBuffer<T>, KernelError> {
        HostBuffer::uninit(len)
    }

    fn download<T: Scalar>(&self, buffer: &HostBuffer<T>) -> Result<Vec<T>, KernelError> {
        count(0, std::mem::size_of::<T>() * buffer.len);
        Ok(buffer.as_slice().to_vec())
    }

    fn buffer_len<T: Scalar>(&self, buffer: &HostBuffer<T>) -> usize {
        buffer.len
    }

    fn arg_in<T: Scalar>(&self, buffer: &HostBuffer<T>) -> KernelArg {
        KernelArg::Ptr(buffer.ptr.as_ptr() as u64)
    }

    fn arg_out<T: Scalar>(&self, buffer: &mut HostBuffer<T>) -> KernelArg {
        KernelArg::Ptr(buffer.ptr.as_ptr() as u64)
    }

    unsafe fn launch(&self, kernel: &Kernel, dims: &LaunchDims, args: &[KernelArg]) -> Result<(), KernelError> {
        let launch = HarnessLaunch {
            grid: dims.grid,
            block: dims.block,
            dynamic_shared_bytes: dims.dynamic_shared_bytes,
            flags: if kernel.cooperative { HARNESS_COOPERATIVE } else { 0 },
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
        // guarantees (this function's contract) that the arguments fit the kernel. Pointer
        // arguments that are not harness buffers are refused before the kernel runs.
        let status = unsafe { (kernel.harness_entry)(&launch, params.as_ptr()) };
        if status == 0 {
            return Ok(());
        }
        LAUNCH_FAILED.set(true);
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

/// The `extern "C"` entries of the harness's own test kernels (`cuda/harness_selftest.cu`).
#[cfg(test)]
pub(crate) mod entries {
    #[cfg(test)]
    pub(crate) mod harness_selftest {
        crate::launch::harness_entries!(
            lc_run_selftest_warp_sum,
            lc_run_selftest_shuffles,
            lc_run_selftest_votes,
            lc_run_selftest_atomics,
            lc_run_selftest_reverse,
            lc_run_selftest_barrier_divergence,
            lc_run_selftest_warp_divergence,
            lc_run_selftest_increments,
            lc_run_selftest_atomic_ops,
            lc_run_selftest_copy,
            lc_run_selftest_write_input,
            lc_run_selftest_block_tiles,
            lc_run_selftest_shared_past_end,
            lc_run_selftest_warp_handoff,
            lc_run_selftest_half_warps,
            lc_run_selftest_bad_masks,
            lc_run_selftest_divergent_barriers,
            lc_run_selftest_workspace,
            lc_run_selftest_shared_unwritten,
            lc_run_selftest_mma_bf16,
            lc_run_selftest_mma_f16,
            lc_run_selftest_ldmatrix,
            lc_run_selftest_cp_async,
            lc_run_selftest_prefetch,
            lc_run_selftest_grid_sync,
            lc_run_selftest_last_block,
        );
    }
    /// The wgmma emulation's test kernels live in `cuda/gemm_wgmma.cu` (built for compute_90a).
    #[cfg(test)]
    pub(crate) mod gemm_wgmma {
        crate::launch::harness_entries!(lc_run_selftest_wgmma_f16, lc_run_selftest_wgmma_bf16);
    }
}

#[cfg(test)]
mod selftest;
