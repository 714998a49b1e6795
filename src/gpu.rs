//! The GPU backend: cudarc with the driver library loaded at run time, kernels from the PTX that
//! `build.rs` embedded. [`GpuBackend::probe`] returns an error — never panics — when the driver
//! library is missing, no GPU is present, or the crate was built without PTX.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, DriverError,
    LaunchConfig, PushKernelArg,
};

use crate::launch::{Backend, Kernel, KernelArg, KernelError, LaunchDims, Scalar, Traffic};

/// The PTX that build.rs compiled, per kernel family (`ptx::get("gemm")`).
pub mod ptx {
    use std::io::Read;
    use std::sync::OnceLock;

    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));

    /// Every family's PTX text, inflated once.
    static TEXT: OnceLock<Vec<(&'static str, String)>> = OnceLock::new();

    /// The PTX of `cuda/<family>.cu`, when nvcc built it: embedded gzip-compressed, or (a build
    /// with `LC_PTX_EXTERNAL=1`, the GPU bundle's) read from `$LC_PTX_DIR/<family>.ptx.gz`.
    pub fn get(family: &str) -> Option<&'static str> {
        let all = TEXT.get_or_init(|| {
            FAMILIES
                .iter()
                .map(|&(f, embedded)| {
                    let gz: std::borrow::Cow<[u8]> = if EXTERNAL {
                        let dir = std::env::var("LC_PTX_DIR").unwrap_or_else(|_| {
                            panic!("this build reads its PTX at run time: set LC_PTX_DIR (gpu-check.sh does)")
                        });
                        let path = std::path::Path::new(&dir).join(format!("{f}.ptx.gz"));
                        let read = std::fs::read(&path);
                        read.unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
                            .into()
                    } else {
                        embedded.into()
                    };
                    let mut text = String::new();
                    flate2::read::GzDecoder::new(&gz[..])
                        .read_to_string(&mut text)
                        .unwrap_or_else(|e| panic!("the PTX of {f} does not inflate: {e}"));
                    (f, text)
                })
                .collect()
        });
        all.iter().find(|(f, _)| *f == family).map(|(_, text)| text.as_str())
    }
}

fn driver_error(context: impl Into<String>) -> impl FnOnce(DriverError) -> KernelError {
    let context = context.into();
    move |e| KernelError::Driver {
        context,
        message: format!("{e:?}"),
    }
}

/// GPU memory: elements `offset..offset + len` of one allocation, which views share (it is
/// freed when the last buffer using it is dropped).
pub struct GpuBuffer<T> {
    allocation: Arc<CudaSlice<T>>,
    offset: usize,
    len: usize,
}

impl<T> GpuBuffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of the first element (one stream: the synchronisation guard cudarc
    /// returns has nothing to order).
    fn address(&self, stream: &Arc<CudaStream>) -> u64 {
        let (base, _sync) = self.allocation.device_ptr(stream);
        base + (self.offset * std::mem::size_of::<T>()) as u64
    }
}

/// A recorded launch sequence ([`GpuBackend::capture`]).
pub struct GpuGraph {
    graph: CudaGraph,
}

impl GpuGraph {
    /// Replays the recorded sequence on the backend's stream (asynchronous, like a launch).
    pub fn launch(&self) -> Result<(), KernelError> {
        self.graph.launch().map_err(driver_error("launching a graph"))
    }
}

pub struct GpuBackend {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    device_name: String,
    compute_capability: (i32, i32),
    sm_count: usize,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    /// Per kernel, the dynamic shared memory past 48 KiB it has been opted into (a host-side
    /// attribute, set once rather than before every launch).
    opted_in: Mutex<HashMap<&'static str, u32>>,
    /// Per (kernel, threads, dynamic shared bytes), the co-resident blocks of a cooperative
    /// launch: the driver's occupancy query, made once rather than before every launch.
    co_resident: Mutex<HashMap<(&'static str, u32, u32), usize>>,
    /// [`Backend::tickets`]: zeroed once, left zero by every kernel that draws from it.
    tickets: Mutex<Option<GpuBuffer<u32>>>,
    to_device: AtomicU64,
    to_host: AtomicU64,
    copies: AtomicU64,
}

/// Tickets the GPU backend allocates when it opens ([`Backend::tickets`]).
const TICKETS: usize = 4096;

impl GpuBackend {
    /// Opens GPU 0, or says why not. cudarc panics inside `CudaContext::new` when libcuda is
    /// missing, so the library is looked for first, and any other panic from the driver
    /// bindings (a symbol missing from an old driver) is turned into an error too.
    pub fn probe() -> Result<GpuBackend, KernelError> {
        if !ptx::BUILT_WITH_PTX {
            return Err(KernelError::Unavailable(
                "built without PTX (nvcc was not found when the crate was built)".into(),
            ));
        }
        // SAFETY: only tries to dlopen the driver library by its usual names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(KernelError::Unavailable(
                "CUDA driver library (libcuda.so) not found".into(),
            ));
        }
        std::panic::catch_unwind(Self::open_device_0).unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(KernelError::Unavailable(format!(
                "CUDA driver bindings panicked: {why}"
            )))
        })
    }

    fn open_device_0() -> Result<GpuBackend, KernelError> {
        let count =
            CudaContext::device_count().map_err(|e| KernelError::Unavailable(format!("cuInit failed: {e:?}")))?;
        if count < 1 {
            return Err(KernelError::Unavailable("no CUDA device".into()));
        }
        let context = CudaContext::new(0).map_err(driver_error("opening device 0"))?;
        let device_name = context.name().map_err(driver_error("device name"))?;
        let compute_capability = context
            .compute_capability()
            .map_err(driver_error("compute capability"))?;
        let ptx_cap: i32 = ptx::COMPUTE_CAP
            .trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .parse()
            .unwrap_or(0);
        let device_cap = compute_capability.0 * 10 + compute_capability.1;
        if device_cap < ptx_cap {
            return Err(KernelError::Unavailable(format!(
                "{device_name} is sm_{device_cap}, the PTX was built for compute_{} (CUDA_COMPUTE_CAP)",
                ptx::COMPUTE_CAP
            )));
        }
        let sm_count = context
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_error("multiprocessor count"))?;
        // One stream of our own (not the legacy default stream, which cannot be captured into a
        // graph: `capture`). Creating it puts cudarc in its multi-stream mode, where every buffer
        // records events to order its uses across streams; everything the crate does runs in
        // order on this one stream, so those events would only add driver calls to every launch.
        // SAFETY: no buffer is used on any other stream (disable_event_tracking's contract); the
        // call precedes every allocation of this context.
        unsafe { context.disable_event_tracking() };
        let stream = context.new_stream().map_err(driver_error("creating a stream"))?;
        let gpu = GpuBackend {
            sm_count: usize::try_from(sm_count).unwrap_or(1).max(1),
            context,
            stream,
            device_name,
            compute_capability,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            opted_in: Mutex::new(HashMap::new()),
            co_resident: Mutex::new(HashMap::new()),
            tickets: Mutex::new(None),
            to_device: AtomicU64::new(0),
            to_host: AtomicU64::new(0),
            copies: AtomicU64::new(0),
        };
        // The ticket pool now, outside any stream capture (`capture`): a plan splits K only
        // where its tiles leave SMs idle, so 4,096 tickets are never outgrown in practice.
        gpu.tickets(TICKETS)?;
        Ok(gpu)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// A timing event (for benches: `start.elapsed_ms(&end)`).
    pub fn timing_event(&self) -> Result<CudaEvent, KernelError> {
        self.context
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver_error("creating an event"))
    }

    pub fn record(&self, event: &CudaEvent) -> Result<(), KernelError> {
        event.record(&self.stream).map_err(driver_error("recording an event"))
    }

    /// Records what `launches` puts on the stream — kernels, memsets, copies between device
    /// buffers — into a CUDA graph instead of running it; [`GpuGraph::launch`] then replays the
    /// whole sequence with one call, on the same buffers with the same arguments: the host's
    /// launch calls are paid once. On the H200 that saved 0.7–2.5 µs a call of the composition
    /// at T ≤ 16 (3–4 kernels); the ~4.5 µs each dependent kernel costs there is on the GPU and
    /// stays (benches/README.md, "Second H200 session").
    ///
    /// Run `launches` once normally first: the first use of a kernel family loads its module,
    /// which is not a stream operation. Inside, nothing may wait for the GPU or copy to or from
    /// the host (the driver refuses: the error is returned and nothing is recorded), and no
    /// buffer it touches may be dropped while the graph lives.
    pub fn capture(&self, launches: impl FnOnce(&Self) -> Result<(), KernelError>) -> Result<GpuGraph, KernelError> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_error("beginning a stream capture"))?;
        let recorded = launches(self);
        // End the capture whatever happened, so that the stream is usable again.
        let graph = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(driver_error("ending a stream capture"));
        recorded?;
        let graph = graph?.ok_or_else(|| KernelError::Driver {
            context: "ending a stream capture".into(),
            message: "the capture recorded no graph".into(),
        })?;
        Ok(GpuGraph { graph })
    }

    /// The loaded function, loading its family's PTX module on first use (the driver
    /// JIT-compiles PTX for this GPU then).
    pub fn function(&self, kernel: &Kernel) -> Result<CudaFunction, KernelError> {
        if let Some(f) = self.functions.lock().expect("function cache").get(kernel.name) {
            return Ok(f.clone());
        }
        let module = {
            let mut modules = self.modules.lock().expect("module cache");
            match modules.get(kernel.family) {
                Some(m) => m.clone(),
                None => {
                    let ptx = ptx::get(kernel.family).ok_or_else(|| {
                        KernelError::Unavailable(format!("no PTX for cuda/{}.cu in this build", kernel.family))
                    })?;
                    // Architecture-specific PTX (`// lc-arch: 90a` in build.rs: wgmma) loads on
                    // that architecture only.
                    let (major, minor) = self.compute_capability;
                    if ptx.contains(".target sm_90a") && !self.runs_sm90a() {
                        return Err(KernelError::Unavailable(format!(
                            "cuda/{}.cu is built for sm_90a (wgmma); this GPU is sm_{major}{minor}",
                            kernel.family
                        )));
                    }
                    let module = self
                        .context
                        .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                        .map_err(driver_error(format!("loading the PTX of cuda/{}.cu", kernel.family)))?;
                    modules.insert(kernel.family, module.clone());
                    module
                }
            }
        };
        let function = module
            .load_function(kernel.name)
            .map_err(driver_error(format!("finding kernel {}", kernel.name)))?;
        self.functions
            .lock()
            .expect("function cache")
            .insert(kernel.name, function.clone());
        Ok(function)
    }
}

impl GpuBackend {
    fn count(&self, to_device: usize, to_host: usize) {
        self.to_device.fetch_add(to_device as u64, Ordering::Relaxed);
        self.to_host.fetch_add(to_host as u64, Ordering::Relaxed);
        self.copies.fetch_add(1, Ordering::Relaxed);
    }

    fn wrap<T>(slice: CudaSlice<T>) -> GpuBuffer<T> {
        let len = slice.len();
        GpuBuffer {
            allocation: Arc::new(slice),
            offset: 0,
            len,
        }
    }
}

impl Backend for GpuBackend {
    type Buffer<T: Scalar> = GpuBuffer<T>;

    fn name(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!("{} (sm_{major}{minor})", self.device_name)
    }

    fn sm_count(&self) -> usize {
        self.sm_count
    }

    fn runs_sm90a(&self) -> bool {
        self.compute_capability == (9, 0)
    }

    fn cooperative_blocks(
        &self,
        kernel: &Kernel,
        threads: u32,
        dynamic_shared_bytes: u32,
    ) -> Result<usize, KernelError> {
        let key = (kernel.name, threads, dynamic_shared_bytes);
        if let Some(&blocks) = self.co_resident.lock().expect("occupancy cache").get(&key) {
            return Ok(blocks);
        }
        let per_sm = self
            .function(kernel)?
            .occupancy_max_active_blocks_per_multiprocessor(threads, dynamic_shared_bytes as usize, None)
            .map_err(driver_error(format!("the occupancy of {}", kernel.name)))?;
        let blocks = per_sm as usize * self.sm_count;
        self.co_resident.lock().expect("occupancy cache").insert(key, blocks);
        Ok(blocks)
    }

    fn upload<T: Scalar>(&self, host: &[T]) -> Result<GpuBuffer<T>, KernelError> {
        self.count(std::mem::size_of_val(host), 0);
        let slice = self.stream.clone_htod(host).map_err(driver_error("copy to device"))?;
        Ok(Self::wrap(slice))
    }

    fn alloc<T: Scalar>(&self, len: usize) -> Result<GpuBuffer<T>, KernelError> {
        // SAFETY: the memory is uninitialised; callers hand it only to kernels that write an
        // element before reading it (the harness checks exactly this).
        let slice = unsafe { self.stream.alloc::<T>(len) }.map_err(driver_error("allocate on device"))?;
        Ok(Self::wrap(slice))
    }

    fn download<T: Scalar>(&self, buffer: &GpuBuffer<T>) -> Result<Vec<T>, KernelError> {
        self.count(0, std::mem::size_of::<T>() * buffer.len);
        let view = buffer.allocation.slice(buffer.offset..buffer.offset + buffer.len);
        self.stream.clone_dtoh(&view).map_err(driver_error("copy to host"))
    }

    fn upload_into<T: Scalar>(&self, buffer: &mut GpuBuffer<T>, host: &[T]) -> Result<(), KernelError> {
        if host.len() != buffer.len {
            return Err(KernelError::Argument {
                kernel: "upload_into",
                message: format!("{} host elements for a buffer of {}", host.len(), buffer.len),
            });
        }
        self.count(std::mem::size_of_val(host), 0);
        let address = buffer.address(&self.stream);
        // SAFETY: `address` is the start of `buffer.len` elements of T in a live allocation of
        // this stream; from pageable host memory the call returns only once `host` has been
        // staged, so `host` may be dropped after it.
        unsafe { cudarc::driver::result::memcpy_htod_async(address, host, self.stream.cu_stream()) }
            .map_err(driver_error("copy to device"))
    }

    fn zero<T: Scalar>(&self, buffer: &mut GpuBuffer<T>) -> Result<(), KernelError> {
        let address = buffer.address(&self.stream);
        // SAFETY: `len · size_of::<T>()` bytes from `address` belong to the buffer; zero bits
        // are a valid T (Scalar: ValidAsZeroBits).
        unsafe {
            cudarc::driver::result::memset_d8_async(
                address,
                0,
                buffer.len * std::mem::size_of::<T>(),
                self.stream.cu_stream(),
            )
        }
        .map_err(driver_error("memset"))
    }

    fn tickets(&self, len: usize) -> Result<KernelArg, KernelError> {
        let mut pool = self.tickets.lock().expect("ticket pool");
        if pool.as_ref().is_none_or(|p| p.len < len) {
            let mut fresh = self.alloc::<u32>(len.max(TICKETS))?;
            self.zero(&mut fresh)?;
            // The pool it replaces is freed in stream order, after the launches that use it.
            *pool = Some(fresh);
        }
        Ok(self.arg_out(pool.as_mut().expect("the pool was just filled")))
    }

    fn view<T: Scalar>(&self, parent: &GpuBuffer<T>, offset: usize, len: usize) -> GpuBuffer<T> {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= parent.len),
            "view {offset}..{offset}+{len} of a buffer of {}",
            parent.len
        );
        GpuBuffer {
            allocation: parent.allocation.clone(),
            offset: parent.offset + offset,
            len,
        }
    }

    fn traffic(&self) -> Traffic {
        Traffic {
            to_device: self.to_device.load(Ordering::Relaxed),
            to_host: self.to_host.load(Ordering::Relaxed),
            copies: self.copies.load(Ordering::Relaxed),
        }
    }

    fn buffer_len<T: Scalar>(&self, buffer: &GpuBuffer<T>) -> usize {
        buffer.len
    }

    fn arg_in<T: Scalar>(&self, buffer: &GpuBuffer<T>) -> KernelArg {
        KernelArg::Ptr(buffer.address(&self.stream))
    }

    fn arg_out<T: Scalar>(&self, buffer: &mut GpuBuffer<T>) -> KernelArg {
        KernelArg::Ptr(buffer.address(&self.stream))
    }

    unsafe fn launch(&self, kernel: &Kernel, dims: &LaunchDims, args: &[KernelArg]) -> Result<(), KernelError> {
        let function = self.function(kernel)?;
        let mut builder = self.stream.launch_builder(&function);
        for arg in args {
            match arg {
                KernelArg::Ptr(address) => builder.arg(address),
                KernelArg::I32(value) => builder.arg(value),
                KernelArg::F32(value) => builder.arg(value),
            };
        }
        let bytes = dims.dynamic_shared_bytes;
        if bytes > crate::launch::MAX_STATIC_SHARED_BYTES {
            // Dynamic shared memory past 48 KiB needs the kernel's opt-in, once per size it grows to.
            let mut opted_in = self.opted_in.lock().expect("opt-in cache");
            if opted_in.get(kernel.name).is_none_or(|&had| had < bytes) {
                function
                    .set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        bytes as i32,
                    )
                    .map_err(driver_error(format!(
                        "opting {} into {bytes} bytes of dynamic shared memory",
                        kernel.name
                    )))?;
                opted_in.insert(kernel.name, bytes);
            }
        }
        let config = LaunchConfig {
            grid_dim: (dims.grid[0], dims.grid[1], dims.grid[2]),
            block_dim: (dims.block[0], dims.block[1], dims.block[2]),
            shared_mem_bytes: dims.dynamic_shared_bytes,
        };
        // SAFETY: the caller guarantees the arguments match the kernel and the buffers cover
        // what it touches (`Backend::launch` contract); `args` outlives the launch call, which
        // copies the argument values.
        if kernel.cooperative {
            // SAFETY: as above; the driver refuses a grid larger than can be co-resident.
            unsafe { builder.launch_cooperative(config) }
                .map_err(driver_error(format!("launching {} cooperatively", kernel.name)))?;
        } else {
            // SAFETY: as above.
            unsafe { builder.launch(config) }.map_err(driver_error(format!("launching {}", kernel.name)))?;
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<(), KernelError> {
        self.stream.synchronize().map_err(driver_error("synchronize"))
    }
}
