//! The launch interface both backends implement and every kernel family uses (DESIGN §3–4):
//! launch dimensions and their limits, the element types, a kernel's identity, its arguments, the
//! errors, the [`Backend`] trait, and the ABI of the CPU harness's launch entries. A leaf module:
//! [`crate::gpu`] (cudarc), [`crate::harness`] (the CPU execution harness) and
//! [`crate::kernels`] (the families) all depend on it and on nothing of each other.

use std::ffi::c_void;

/// Mirrors `lc_harness::LaunchDims` in `cuda/harness/cuda_cpu.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HarnessLaunch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_shared_bytes: u32,
    /// [`HARNESS_COOPERATIVE`] for a cooperative launch.
    pub flags: u32,
    pub seed: u64,
}

/// [`HarnessLaunch::flags`]: the kernel is launched cooperatively ([`Kernel::cooperative`]).
pub const HARNESS_COOPERATIVE: u32 = 1;
/// Most blocks a cooperative launch has on the harness, which co-schedules them by setting each
/// aside at a grid barrier (its stacks and shared memory saved): what
/// [`Backend::cooperative_blocks`] reports there. Small, so that the harness runs grids whose
/// blocks each take several work items (`kMaxCooperativeBlocks` in cuda/harness/internal.h is
/// the hard limit).
pub const HARNESS_COOPERATIVE_BLOCKS: usize = 8;

/// Most threads in one block on every CUDA GPU.
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;
/// SM count the harness reports for split-K planning: an H200's (the GPU the plans and the
/// napkin math in benches/README.md are written for), so harness runs exercise the same plans.
pub const HARNESS_SM_COUNT: usize = 132;
/// Static shared memory a block may use without opting in to more (48 KiB on every GPU).
pub const MAX_STATIC_SHARED_BYTES: u32 = 48 * 1024;
/// Shared memory a block may have with the opt-in attribute, on every GPU from sm_80 on (sm_86
/// and sm_89 allow 99 KiB; sm_80 163, sm_90 227).
pub const MAX_OPT_IN_SHARED_BYTES: u32 = 99 * 1024;
/// Largest grid extent in y and z (x allows 2^31 − 1).
pub const MAX_GRID_YZ: u32 = 65_535;

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_shared_bytes: u32,
}

impl LaunchDims {
    pub fn threads_per_block(&self) -> u32 {
        self.block.iter().product()
    }

    pub fn blocks(&self) -> u64 {
        self.grid.iter().map(|&g| u64::from(g)).product()
    }

    /// Panics unless the launch fits every CUDA GPU: 1..=1024 threads, a non-empty grid within
    /// the grid limits, static shared memory within 48 KiB, and static plus dynamic within 48
    /// KiB — or, with dynamic memory past 48 KiB (which the GPU backend opts the kernel into:
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`), within the 99 KiB every GPU from
    /// sm_80 on allows.
    pub fn assert_valid(&self, static_shared_bytes: u32) {
        let threads = self.threads_per_block();
        assert!(
            (1..=MAX_THREADS_PER_BLOCK).contains(&threads),
            "block {:?} has {threads} threads (1..=1024)",
            self.block
        );
        assert!(self.grid.iter().all(|&g| g >= 1), "empty grid {:?}", self.grid);
        assert!(
            self.grid[0] <= i32::MAX as u32 && self.grid[1] <= MAX_GRID_YZ && self.grid[2] <= MAX_GRID_YZ,
            "grid {:?} exceeds the CUDA limits",
            self.grid
        );
        let shared = u64::from(static_shared_bytes) + u64::from(self.dynamic_shared_bytes);
        let limit = if self.dynamic_shared_bytes > MAX_STATIC_SHARED_BYTES {
            MAX_OPT_IN_SHARED_BYTES
        } else {
            MAX_STATIC_SHARED_BYTES
        };
        assert!(
            static_shared_bytes <= MAX_STATIC_SHARED_BYTES && shared <= u64::from(limit),
            "{shared} bytes of shared memory ({static_shared_bytes} static) exceed the {} KiB limit",
            limit / 1024
        );
    }
}

/// Storage type of a kernel's tensors; accumulation is always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub const ALL: &'static [DType] = &[DType::F32, DType::F16, DType::BF16];

    /// Suffix of the kernel names in `cuda/*.cu` (`gemm_naive_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Anything a device buffer holds: the storage elements and the `i32` index tables.
pub trait Scalar:
    bytemuck::Pod
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
}

impl<T> Scalar for T where
    T: bytemuck::Pod
        + cudarc::driver::DeviceRepr
        + cudarc::driver::ValidAsZeroBits
        + Default
        + Send
        + Sync
        + std::fmt::Debug
        + 'static
{
}

/// A storage element: `f32`, `half::f16` or `half::bf16` (same layout as the CUDA types).
pub trait Element: Scalar {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    /// Rounds to nearest even, as the kernels' stores do.
    fn from_f32(x: f32) -> Self;
    /// A NaN, for poisoning outputs so that unwritten elements fail the comparison.
    fn poison() -> Self {
        Self::from_f32(f32::NAN)
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

/// `extern "C"` launch entry of one kernel in the CPU harness (`LC_HARNESS_ENTRY`): the launch
/// and, like `cuLaunchKernel`, one pointer per kernel argument. Returns 0 or 1 on error.
pub type HarnessEntry = unsafe extern "C" fn(*const HarnessLaunch, *const *mut c_void) -> i32;

/// Declares the `extern "C"` launch entries `lc_run_<kernel>` that `LC_HARNESS_ENTRY` defines in
/// `cuda/harness/<family>_host.cpp`, each a [`HarnessEntry`].
macro_rules! harness_entries {
    ($($entry:ident),* $(,)?) => {
        extern "C" {
            $(pub(crate) fn $entry(
                launch: *const $crate::launch::HarnessLaunch,
                params: *const *mut std::ffi::c_void,
            ) -> i32;)*
        }
    };
}
pub(crate) use harness_entries;

/// One compiled kernel: its name in the family's PTX module and its CPU-harness entry.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    /// `cuda/<family>.cu`
    pub family: &'static str,
    /// The `extern "C" __global__` function name.
    pub name: &'static str,
    pub harness_entry: HarnessEntry,
    /// Synchronises its grid (`LC_GRID_SYNC()`): launched cooperatively
    /// (`cuLaunchCooperativeKernel`, whose grid the driver checks is co-resident) with at most
    /// [`Backend::cooperative_blocks`] blocks.
    pub cooperative: bool,
}

/// A kernel argument by value: buffers as raw addresses (device or host), scalars as is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No usable GPU: driver library missing, no device, or the crate was built without PTX.
    #[error("GPU unavailable: {0}")]
    Unavailable(String),
    #[error("CUDA driver error in {context}: {message}")]
    Driver { context: String, message: String },
    /// The CPU harness stopped a launch: a race, an out-of-bounds or uninitialised access,
    /// barrier or warp divergence, a bad warp mask, …
    #[error("CPU harness, kernel {kernel}: {message}")]
    Harness { kernel: &'static str, message: String },
    /// Buffers that do not match the shape, or a shape the kernel cannot take.
    #[error("{kernel}: {message}")]
    Argument { kernel: &'static str, message: String },
}

/// Bytes a backend has moved between host and device memory (uploads and downloads; kernels,
/// views and [`Backend::zero`] move nothing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub to_device: u64,
    pub to_host: u64,
    /// Number of copies in either direction.
    pub copies: u64,
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, earlier: Traffic) -> Traffic {
        Traffic {
            to_device: self.to_device - earlier.to_device,
            to_host: self.to_host - earlier.to_host,
            copies: self.copies - earlier.copies,
        }
    }
}

/// Where kernels run. Buffers live on the backend; kernel arguments are raw addresses.
///
/// A buffer is an allocation or a *view* of part of one ([`Backend::view`]): views share the
/// allocation (it is freed when the last of them is dropped), so a model can keep every
/// parameter in one flat buffer for the optimizer and hand each kernel its own parameter.
pub trait Backend {
    type Buffer<T: Scalar>;

    /// For test and bench output: "cpu-harness (seed 3)", "NVIDIA H200 (sm_90)".
    fn name(&self) -> String;
    /// Streaming multiprocessors, for split-K plans: the device's own count on a GPU,
    /// [`HARNESS_SM_COUNT`] on the harness.
    fn sm_count(&self) -> usize;
    /// Whether kernels built for sm_90a (Hopper's `wgmma`: the GEMM family's and the
    /// composition's `wgmma` variants) run here: on a GPU of compute capability 9.0 only (the
    /// driver cannot load their PTX elsewhere, and they return [`KernelError::Unavailable`]);
    /// always on the harness, which emulates `wgmma`. Tests and benches skip those variants where
    /// this is false, saying so.
    fn runs_sm90a(&self) -> bool;
    /// Most blocks of `kernel` (with `threads` a block and `dynamic_shared_bytes`) that can be
    /// co-resident, the limit of a cooperative launch's grid: the driver's occupancy for this
    /// kernel times the SMs on a GPU; [`HARNESS_COOPERATIVE_BLOCKS`] on the harness.
    fn cooperative_blocks(
        &self,
        kernel: &Kernel,
        threads: u32,
        dynamic_shared_bytes: u32,
    ) -> Result<usize, KernelError>;
    fn upload<T: Scalar>(&self, host: &[T]) -> Result<Self::Buffer<T>, KernelError>;
    /// `len` elements of uninitialised device memory, for outputs and workspaces that a kernel
    /// writes before anything reads them. The harness tracks it as unwritten: a kernel that reads
    /// an element before some kernel wrote it fails (initcheck).
    fn alloc<T: Scalar>(&self, len: usize) -> Result<Self::Buffer<T>, KernelError>;
    fn download<T: Scalar>(&self, buffer: &Self::Buffer<T>) -> Result<Vec<T>, KernelError>;
    /// Copies `host` into `buffer` (of the same length), reusing its memory.
    fn upload_into<T: Scalar>(&self, buffer: &mut Self::Buffer<T>, host: &[T]) -> Result<(), KernelError>;
    /// Sets every element to zero bits on the device (no host copy).
    fn zero<T: Scalar>(&self, buffer: &mut Self::Buffer<T>) -> Result<(), KernelError>;
    /// The address of at least `len` u32 tickets, every one zero, that the backend keeps for
    /// kernels whose last block to finish a tile completes it (split-K without a reduce launch:
    /// `lc::last_split` in `cuda/common.cuh`): such a kernel draws a tile's ticket with an atomic
    /// and leaves it zero again. Allocated and zeroed on first use (grown, zeroed, when a launch
    /// needs more); one pool per backend (per thread on the harness), so launches that use it run
    /// one after another, in stream order. The harness checks, at each call, that the launches
    /// before it left every ticket zero.
    fn tickets(&self, len: usize) -> Result<KernelArg, KernelError>;
    /// Elements `offset..offset + len` of `parent`, sharing its memory. Panics when the range is
    /// not inside `parent`. The harness checks bounds per allocation, as compute-sanitizer does:
    /// a kernel given a view may touch the rest of its allocation unreported.
    fn view<T: Scalar>(&self, parent: &Self::Buffer<T>, offset: usize, len: usize) -> Self::Buffer<T>;
    /// Host↔device bytes moved so far: by this backend on a GPU, by the calling thread on the
    /// harness (whose launches and copies all run on the calling thread).
    fn traffic(&self) -> Traffic;
    fn buffer_len<T: Scalar>(&self, buffer: &Self::Buffer<T>) -> usize;
    /// The address a kernel reads through.
    fn arg_in<T: Scalar>(&self, buffer: &Self::Buffer<T>) -> KernelArg;
    /// The address a kernel writes through.
    fn arg_out<T: Scalar>(&self, buffer: &mut Self::Buffer<T>) -> KernelArg;

    /// Launches `kernel` over `dims` (asynchronously on the GPU).
    ///
    /// # Safety
    /// `args` match the kernel's parameters in number and type, every `Ptr` comes from
    /// `arg_in`/`arg_out` of a live buffer of this backend that covers every element the kernel
    /// touches for these arguments, and buffers written through are not read through another
    /// argument. Family launchers check this against the shape before calling.
    unsafe fn launch(&self, kernel: &Kernel, dims: &LaunchDims, args: &[KernelArg]) -> Result<(), KernelError>;

    /// Waits for every launch so far (a no-op on the CPU).
    fn synchronize(&self) -> Result<(), KernelError>;
}
