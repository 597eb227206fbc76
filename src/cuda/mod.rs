//! The CUDA runtime: devices, the embedded kernel modules, device memory and launches.
//!
//! The driver is loaded at run time (cudarc's dynamic loading), so the same binary runs on a
//! machine without CUDA; [`availability`] says why no GPU can be used. Each GPU gets one
//! [`CudaDevice`]: its context, one stream that all work is ordered on, the kernel modules
//! (loaded lazily, once per device) and byte counters for peak memory. Device memory comes
//! from the driver's stream-ordered pool with its release threshold raised to "never", so
//! freed buffers are cached and reused and no op pays for a `cudaMalloc` on the hot path.
//!
//! Every kernel launch goes through one typed Rust function in `src/ops/<op>/cuda.rs`, which
//! checks shapes and builds the grid; `unsafe` is confined to those launches.

#[rustfmt::skip]
pub mod abi;

mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut,
    DriverError,
};

use crate::error::{Error, Result};

/// The GPU architectures the embedded kernels were compiled for (empty when built without
/// nvcc).
pub fn targets() -> &'static str {
    kernels::TARGETS
}

/// Names of the embedded kernel modules.
pub fn modules() -> impl Iterator<Item = &'static str> {
    kernels::MODULES.iter().map(|(n, _)| *n)
}

impl From<DriverError> for Error {
    fn from(e: DriverError) -> Self {
        Error::Cuda(format!("{e:?}"))
    }
}

/// How many GPUs can be used, or why none can.
pub fn availability() -> std::result::Result<usize, String> {
    if kernels::MODULES.is_empty() {
        return Err("this binary was built without CUDA kernels (no nvcc at build time)".into());
    }
    // Probe for the driver library first: cudarc panics (and prints) when it cannot load it.
    let found = ["libcuda.so.1", "libcuda.so"].iter().any(|name| {
        // SAFETY: loading the system CUDA driver runs only its library initialisers.
        unsafe { libloading::Library::new(*name) }.is_ok()
    });
    if !found {
        return Err("no CUDA driver library (libcuda.so) on this machine".into());
    }
    let count = std::panic::catch_unwind(CudaContext::device_count)
        .map_err(|_| "the CUDA driver library could not be loaded".to_string())?
        .map_err(|e| format!("the CUDA driver reports {e:?}"))?;
    if count <= 0 {
        return Err("the CUDA driver sees no GPU".into());
    }
    Ok(count as usize)
}

/// One GPU: context, stream, kernel modules and memory accounting.
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Vec<OnceLock<Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    capability: (i32, i32),
    name: String,
    bytes_in_use: AtomicUsize,
    peak_bytes: AtomicUsize,
    poison: AtomicBool,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuda:{} ({}, sm_{}{})",
            self.ordinal, self.name, self.capability.0, self.capability.1
        )
    }
}

static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();

/// The device with this ordinal, opened on first use.
pub fn device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    let map = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map
        .lock()
        .map_err(|_| Error::Cuda("device registry poisoned".into()))?;
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    let count =
        availability().map_err(|why| Error::Cuda(format!("cannot use cuda:{ordinal}: {why}")))?;
    if ordinal >= count {
        return Err(Error::Cuda(format!(
            "cuda:{ordinal} does not exist ({count} GPU(s) visible)"
        )));
    }
    let d = Arc::new(CudaDevice::open(ordinal)?);
    map.insert(ordinal, d.clone());
    Ok(d)
}

impl CudaDevice {
    fn open(ordinal: usize) -> Result<Self> {
        let ctx = CudaContext::new(ordinal)?;
        // All work of a device is ordered on its one stream, so cudarc's per-buffer event
        // tracking (two events per allocation, a wait and a record per launch argument) would
        // be pure overhead.
        // SAFETY: nothing uses this context from another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let capability = ctx.compute_capability()?;
        let name = ctx.name()?;
        // Keep freed memory in the pool (a caching allocator owned by the driver).
        // SAFETY: plain driver calls on this context's device with a valid attribute value.
        unsafe {
            use cudarc::driver::sys;
            let pool = cudarc::driver::result::device::get_default_mem_pool(ctx.cu_device())?;
            let mut threshold: u64 = u64::MAX;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            )
            .result()?;
        }
        Ok(CudaDevice {
            ordinal,
            ctx,
            stream,
            modules: kernels::MODULES.iter().map(|_| OnceLock::new()).collect(),
            functions: Mutex::new(HashMap::new()),
            capability,
            name,
            bytes_in_use: AtomicUsize::new(0),
            peak_bytes: AtomicUsize::new(0),
            poison: AtomicBool::new(false),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// (major, minor) compute capability.
    pub fn capability(&self) -> (i32, i32) {
        self.capability
    }

    /// Whether bf16 tensor-core math exists here (sm_80+); T4 (sm_75) computes in f16.
    pub fn has_bf16(&self) -> bool {
        self.capability.0 >= 8
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Wait for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Peak bytes of engine-allocated device memory since the device was opened (or the last
    /// [`CudaDevice::reset_peak`]).
    pub fn peak_bytes(&self) -> usize {
        self.peak_bytes.load(Ordering::Relaxed)
    }

    pub fn bytes_in_use(&self) -> usize {
        self.bytes_in_use.load(Ordering::Relaxed)
    }

    pub fn reset_peak(&self) {
        self.peak_bytes
            .store(self.bytes_in_use(), Ordering::Relaxed);
    }

    /// Make this device's context current on the calling thread (each worker thread of a
    /// multi-GPU run calls it once before its first raw driver call).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread()?;
        Ok(())
    }

    /// Let `peer` read and write buffers allocated on this device (its memory pool), where
    /// the hardware allows peer access; returns whether it does. Peer-to-peer NCCL between
    /// GPUs of one process writes straight into the other GPU's buffers.
    pub fn share_pool_with(&self, peer: &CudaDevice) -> Result<bool> {
        use cudarc::driver::sys;
        // SAFETY: plain driver queries and settings on two valid devices; the descriptor
        // lives across the call.
        unsafe {
            let mut can: std::ffi::c_int = 0;
            sys::cuDeviceCanAccessPeer(&mut can, peer.ctx.cu_device(), self.ctx.cu_device())
                .result()?;
            if can == 0 {
                return Ok(false);
            }
            self.ctx.bind_to_thread()?;
            let pool = cudarc::driver::result::device::get_default_mem_pool(self.ctx.cu_device())?;
            let desc = sys::CUmemAccessDesc {
                location: sys::CUmemLocation {
                    type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                    id: peer.ordinal as std::ffi::c_int,
                },
                flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            };
            sys::cuMemPoolSetAccess(pool, &desc, 1).result()?;
        }
        Ok(true)
    }

    /// A kernel by module and name (`<op>_<dtype>`), loading the module on first use.
    pub fn function(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
        let mut cache = self
            .functions
            .lock()
            .map_err(|_| Error::Cuda("function cache poisoned".into()))?;
        if let Some(f) = cache.get(&(module, name)) {
            return Ok(f.clone());
        }
        let idx = kernels::MODULES
            .iter()
            .position(|(m, _)| *m == module)
            .ok_or_else(|| Error::Cuda(format!("no kernel module `{module}` in this build")))?;
        let m = match self.modules[idx].get() {
            Some(m) => m.clone(),
            None => {
                let bytes = kernels::MODULES[idx].1.to_vec();
                let m = self
                    .ctx
                    .load_module(cudarc::nvrtc::Ptx::from_binary(bytes))
                    .map_err(|e| {
                        Error::Cuda(format!(
                            "loading kernel module `{module}` on {self:?}: {e:?}"
                        ))
                    })?;
                let _ = self.modules[idx].set(m.clone());
                m
            }
        };
        let f = m
            .load_function(name)
            .map_err(|e| Error::Cuda(format!("kernel `{name}` in module `{module}`: {e:?}")))?;
        cache.insert((module, name), f.clone());
        Ok(f)
    }

    /// Fill every buffer [`CudaDevice::alloc`] returns with 0xFF bytes (NaN in every float
    /// type), so a test sees any output element a kernel failed to write.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// `bytes` of uninitialised device memory (poisoned in poison mode).
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<CudaBuffer> {
        // SAFETY: the buffer is written by a kernel or copy before any read (every op writes
        // its whole output; tests poison outputs to prove it).
        let mut slice = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }?;
        if self.poison.load(Ordering::Relaxed) {
            use cudarc::driver::DevicePtrMut;
            let n = slice.len();
            let (ptr, _guard) = slice.device_ptr_mut(&self.stream);
            // SAFETY: `ptr` addresses `n` bytes owned by `slice`, ordered on this stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xff, n, self.stream.cu_stream())
            }?;
        }
        Ok(self.track(slice))
    }

    /// `bytes` of zeroed device memory.
    pub fn alloc_zeros(self: &Arc<Self>, bytes: usize) -> Result<CudaBuffer> {
        let slice = self.stream.alloc_zeros::<u8>(bytes.max(1))?;
        Ok(self.track(slice))
    }

    /// Copy host bytes to a new device buffer.
    pub fn upload(self: &Arc<Self>, data: &[u8]) -> Result<CudaBuffer> {
        let mut b = self.alloc(data.len())?;
        if !data.is_empty() {
            self.stream.memcpy_htod(data, &mut b.slice)?;
        }
        Ok(b)
    }

    fn track(self: &Arc<Self>, slice: CudaSlice<u8>) -> CudaBuffer {
        let n = slice.len();
        let now = self.bytes_in_use.fetch_add(n, Ordering::Relaxed) + n;
        self.peak_bytes.fetch_max(now, Ordering::Relaxed);
        CudaBuffer {
            slice,
            device: self.clone(),
            len: n,
        }
    }
}

/// Device memory, counted against its device's peak.
pub struct CudaBuffer {
    slice: CudaSlice<u8>,
    device: Arc<CudaDevice>,
    len: usize,
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuffer({} bytes on {:?})", self.len, self.device)
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        self.device
            .bytes_in_use
            .fetch_sub(self.len, Ordering::Relaxed);
    }
}

impl CudaBuffer {
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copy the whole buffer to the host (waits for queued work).
    pub fn download(&self) -> Result<Vec<u8>> {
        Ok(self.device.stream.clone_dtoh(&self.slice)?)
    }

    /// The buffer as `count` elements of `T` (checked to fit).
    pub fn view<T>(&self, count: usize) -> Result<CudaView<'_, T>> {
        let need = count * std::mem::size_of::<T>();
        if need > self.len {
            return Err(Error::Cuda(format!(
                "view of {need} bytes into a buffer of {}",
                self.len
            )));
        }
        // SAFETY: the byte range fits the allocation (checked above); T is a plain device type.
        unsafe { self.slice.transmute::<T>(count) }
            .ok_or_else(|| Error::Cuda("misaligned view".into()))
    }

    /// The buffer as `count` mutable elements of `T` (checked to fit).
    pub fn view_mut<T>(&mut self, count: usize) -> Result<CudaViewMut<'_, T>> {
        let need = count * std::mem::size_of::<T>();
        if need > self.len {
            return Err(Error::Cuda(format!(
                "view of {need} bytes into a buffer of {}",
                self.len
            )));
        }
        // SAFETY: as in `view`.
        unsafe { self.slice.transmute_mut::<T>(count) }
            .ok_or_else(|| Error::Cuda("misaligned view".into()))
    }

    /// The device address (for pointer tables read by multi-tensor kernels; the buffer must
    /// outlive every launch that reads the table).
    pub fn raw_ptr(&self) -> u64 {
        use cudarc::driver::DevicePtr;
        let (ptr, _guard) = self.slice.device_ptr(&self.device.stream);
        ptr
    }

    /// A device-to-device copy.
    pub fn duplicate(&self) -> Result<CudaBuffer> {
        let mut out = self.device.alloc(self.len)?;
        self.device
            .stream
            .memcpy_dtod(&self.slice, &mut out.slice)?;
        Ok(out)
    }

    /// The buffer as a kernel pointer argument (read-only).
    pub fn arg(&self) -> CudaView<'_, u8> {
        self.slice.as_view()
    }

    /// The buffer as a kernel pointer argument the kernel writes.
    pub fn arg_mut(&mut self) -> CudaViewMut<'_, u8> {
        self.slice.as_view_mut()
    }

    /// Fill with a byte pattern (tests poison outputs with 0xFF: NaN in every float type).
    pub fn fill_bytes(&mut self, byte: u8) -> Result<()> {
        let host = vec![byte; self.len];
        Ok(self.device.stream.memcpy_htod(&host, &mut self.slice)?)
    }
}

/// Launch helpers shared by the typed launchers.
pub mod launch {
    use cudarc::driver::LaunchConfig;

    use crate::tensor::DType;

    /// A 1-D grid with one thread per item (`n` items, `block` threads per block).
    pub fn grid_1d(n: usize, block: u32) -> LaunchConfig {
        let blocks = n.div_ceil(block as usize).clamp(1, i32::MAX as usize) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A grid-stride 1-D grid: enough blocks to fill the GPU, each thread looping.
    pub fn grid_stride(n: usize, block: u32) -> LaunchConfig {
        let blocks = n.div_ceil(block as usize).clamp(1, 4096) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One block per row, `threads` per block.
    pub fn per_row(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.max(1) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Threads for a row-wise kernel over `width` elements: a multiple of 32, at most 512.
    pub fn row_threads(width: usize) -> u32 {
        (width.div_ceil(8).div_ceil(32) * 32).clamp(32, 512) as u32
    }

    /// Elements moved per 16-byte vector access.
    pub fn pack(dtype: DType) -> usize {
        16 / dtype.size_in_bytes()
    }

    /// `<base>_<dtype>`, the name of a kernel instantiated for every float type, as a static
    /// string (kernel handles are cached by name).
    #[macro_export]
    macro_rules! kernel_name {
        ($base:literal, $dtype:expr) => {
            match $dtype {
                $crate::tensor::DType::F32 => concat!($base, "_f32"),
                $crate::tensor::DType::BF16 => concat!($base, "_bf16"),
                $crate::tensor::DType::F16 => concat!($base, "_f16"),
            }
        };
    }
}

// SAFETY: the parameter structs are #[repr(C)] plain data mirrored from kernels/abi.h, whose
// sizes are asserted on both sides (below and in abi.h / abi_check.c).
unsafe impl cudarc::driver::DeviceRepr for abi::engine_attention_params {}
unsafe impl cudarc::driver::DeviceRepr for abi::engine_matmul_params {}
unsafe impl cudarc::driver::DeviceRepr for abi::engine_norm_params {}

const _: () = assert!(std::mem::size_of::<abi::engine_attention_params>() == 40);
const _: () = assert!(std::mem::size_of::<abi::engine_matmul_params>() == 32);
const _: () = assert!(std::mem::size_of::<abi::engine_norm_params>() == 16);

unsafe extern "C" {
    /// From kernels/abi_check.c: the C compiler's `sizeof` of each ABI struct.
    fn engine_abi_sizeof(which: i32) -> usize;
}

/// C-side sizes of the ABI structs (attention, matmul, norm), for the layout test.
pub fn c_abi_sizes() -> [usize; 3] {
    // SAFETY: a pure function of its argument defined in kernels/abi_check.c.
    unsafe {
        [
            engine_abi_sizeof(0),
            engine_abi_sizeof(1),
            engine_abi_sizeof(2),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes_agree_with_the_c_compiler() {
        assert_eq!(
            c_abi_sizes(),
            [
                std::mem::size_of::<abi::engine_attention_params>(),
                std::mem::size_of::<abi::engine_matmul_params>(),
                std::mem::size_of::<abi::engine_norm_params>(),
            ]
        );
        assert_eq!(abi::ENGINE_NF4_BLOCK as usize, crate::quant::nf4::BLOCK);
        assert_eq!(
            abi::ENGINE_ABSMAX_BLOCK as usize,
            crate::quant::nf4::ABSMAX_BLOCK
        );
    }
}
