//! Tensors: a shape, a dtype and storage on a device.
//!
//! Storage is an enum over backends (host memory, or device memory of one GPU), so every
//! op is a short `match` that forwards to the backend's implementation and the models are
//! written once against [`Tensor`]. Tensors are dense and row-major; ops that need a strided
//! view (one attention head inside a fused projection, say) take the strides as arguments
//! rather than through a general view mechanism. Storage is shared (`Arc`), so cloning a tensor
//! is cheap and tensors are immutable once built.
//!
//! Dtypes: f32, bf16 and f16 are storage types; CPU compute is f32. Weights keep their
//! checkpoint dtype in memory and are widened tile by tile inside the ops that read them.

use std::sync::Arc;

use half::{bf16, f16};

#[cfg(not(target_endian = "little"))]
compile_error!(
    "engine reads safetensors (little-endian) by casting bytes: big-endian targets are not supported"
);

use crate::bail;
use crate::cuda::{self, CudaBuffer, CudaDevice};
use crate::error::{Error, Result};

/// Element type of a tensor's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }

    /// The dtype of a safetensors entry, or an error naming the unsupported one.
    pub fn from_safetensors(d: safetensors::Dtype) -> Result<Self> {
        match d {
            safetensors::Dtype::F32 => Ok(DType::F32),
            safetensors::Dtype::BF16 => Ok(DType::BF16),
            safetensors::Dtype::F16 => Ok(DType::F16),
            other => bail!(
                Model,
                "unsupported tensor dtype {other:?} (expected F32, BF16 or F16)"
            ),
        }
    }
}

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A GPU by CUDA ordinal.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Host memory in one of the storage dtypes.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl CpuStorage {
    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
        }
    }

    /// Decode little-endian bytes of `dtype` (as stored in safetensors). A byte buffer that
    /// happens to be aligned is copied in one go; safetensors does not promise alignment, so
    /// the unaligned case reads element by element.
    pub fn from_le_bytes(bytes: &[u8], dtype: DType) -> Self {
        fn decode<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
            match bytemuck::try_cast_slice::<u8, T>(bytes) {
                Ok(v) => v.to_vec(),
                Err(_) => bytes
                    .chunks_exact(std::mem::size_of::<T>())
                    .map(bytemuck::pod_read_unaligned)
                    .collect(),
            }
        }
        // Every supported target is little-endian, as safetensors is.
        match dtype {
            DType::F32 => CpuStorage::F32(decode(bytes)),
            DType::BF16 => CpuStorage::BF16(decode(bytes)),
            DType::F16 => CpuStorage::F16(decode(bytes)),
        }
    }

    /// The little-endian bytes of the storage.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
        }
    }

    /// Widen elements `range` to f32 into `out` (same length as the range).
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            CpuStorage::F32(v) => out.copy_from_slice(&v[start..end]),
            CpuStorage::BF16(v) => {
                for (o, x) in out.iter_mut().zip(&v[start..end]) {
                    *o = x.to_f32();
                }
            }
            CpuStorage::F16(v) => {
                for (o, x) in out.iter_mut().zip(&v[start..end]) {
                    *o = x.to_f32();
                }
            }
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        self.read_f32(0, &mut out);
        out
    }

    /// Convert to `dtype` (round to nearest even when narrowing).
    pub fn to_dtype(&self, dtype: DType) -> CpuStorage {
        if self.dtype() == dtype {
            return self.clone();
        }
        let f = self.to_f32_vec();
        match dtype {
            DType::F32 => CpuStorage::F32(f),
            DType::BF16 => CpuStorage::BF16(f.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => CpuStorage::F16(f.iter().map(|&x| f16::from_f32(x)).collect()),
        }
    }
}

/// Device memory holding elements of one dtype.
#[derive(Debug)]
pub struct CudaStorage {
    pub buf: CudaBuffer,
    pub dtype: DType,
}

impl CudaStorage {
    pub fn device(&self) -> &Arc<CudaDevice> {
        self.buf.device()
    }
}

/// Backend storage of a tensor.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

/// A dense row-major tensor.
#[derive(Clone, Debug)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Vec<usize>,
}

fn check_len(shape: &[usize], len: usize) -> Result<()> {
    let n: usize = shape.iter().product();
    if n != len {
        bail!(
            Shape,
            "shape {shape:?} holds {n} elements but the data has {len}"
        );
    }
    Ok(())
}

impl Tensor {
    pub fn from_cpu(storage: CpuStorage, shape: &[usize]) -> Result<Self> {
        check_len(shape, storage.len())?;
        Ok(Tensor {
            storage: Arc::new(Storage::Cpu(storage)),
            shape: shape.to_vec(),
        })
    }

    pub fn from_f32(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        Self::from_cpu(CpuStorage::F32(data), shape)
    }

    /// A tensor over device memory holding at least `shape`'s elements of `dtype`.
    pub fn from_cuda(buf: CudaBuffer, dtype: DType, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if buf.len() < n * dtype.size_in_bytes() {
            bail!(
                Shape,
                "a {}-byte buffer cannot hold {shape:?} {}",
                buf.len(),
                dtype.name()
            );
        }
        Ok(Tensor {
            storage: Arc::new(Storage::Cuda(CudaStorage { buf, dtype })),
            shape: shape.to_vec(),
        })
    }

    /// Uninitialised device memory for `shape` (every op writes its whole output).
    pub fn cuda_uninit(device: &Arc<CudaDevice>, dtype: DType, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        Tensor::from_cuda(device.alloc(n * dtype.size_in_bytes())?, dtype, shape)
    }

    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Self> {
        let n: usize = shape.iter().product();
        match device {
            Device::Cpu => {
                let storage = match dtype {
                    DType::F32 => CpuStorage::F32(vec![0.0; n]),
                    DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; n]),
                    DType::F16 => CpuStorage::F16(vec![f16::ZERO; n]),
                };
                Tensor::from_cpu(storage, shape)
            }
            Device::Cuda(i) => {
                let buf = cuda::device(i)?.alloc_zeros(n * dtype.size_in_bytes())?;
                Tensor::from_cuda(buf, dtype, shape)
            }
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Identity of the storage (stable while any clone of the tensor lives): how the autograd
    /// recognises a parameter tensor.
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.storage) as usize
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        match self.storage.as_ref() {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype,
        }
    }

    pub fn device(&self) -> Device {
        match self.storage.as_ref() {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.device().ordinal()),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The host storage, or an error if the tensor lives on a GPU.
    pub fn cpu_storage(&self) -> Result<&CpuStorage> {
        match self.storage.as_ref() {
            Storage::Cpu(s) => Ok(s),
            Storage::Cuda(s) => bail!(
                Shape,
                "expected a CPU tensor, found one on cuda:{}",
                s.device().ordinal()
            ),
        }
    }

    /// The device storage, or an error if the tensor is on the host.
    pub fn cuda_storage(&self) -> Result<&CudaStorage> {
        match self.storage.as_ref() {
            Storage::Cuda(s) => Ok(s),
            Storage::Cpu(_) => bail!(Shape, "expected a GPU tensor, found one on the CPU"),
        }
    }

    /// A copy on `device` (the same tensor if it is already there).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let host = self.to_cpu()?;
        match device {
            Device::Cpu => Ok(host),
            Device::Cuda(i) => {
                let s = host.cpu_storage()?;
                let buf = cuda::device(i)?.upload(s.as_bytes())?;
                Tensor::from_cuda(buf, s.dtype(), &self.shape)
            }
        }
    }

    /// A host copy, in the same dtype.
    pub fn to_cpu(&self) -> Result<Tensor> {
        match self.storage.as_ref() {
            Storage::Cpu(_) => Ok(self.clone()),
            Storage::Cuda(s) => {
                let n = self.elem_count() * s.dtype.size_in_bytes();
                let bytes = s.buf.download()?;
                Tensor::from_cpu(CpuStorage::from_le_bytes(&bytes[..n], s.dtype), &self.shape)
            }
        }
    }

    /// The f32 host slice of an f32 CPU tensor.
    pub fn as_f32_slice(&self) -> Result<&[f32]> {
        match self.cpu_storage()? {
            CpuStorage::F32(v) => Ok(v),
            s => bail!(Shape, "expected an f32 tensor, found {}", s.dtype().name()),
        }
    }

    /// (rows, cols) of a rank-2 tensor.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self.shape[..] {
            [a, b] => Ok((a, b)),
            _ => bail!(Shape, "expected a matrix, found shape {:?}", self.shape),
        }
    }

    /// Copy the elements to host f32, whatever the dtype and device.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(self.to_cpu()?.cpu_storage()?.to_f32_vec())
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        match self.storage.as_ref() {
            Storage::Cpu(s) => Tensor::from_cpu(s.to_dtype(dtype), &self.shape),
            // Conversions on the GPU happen at load time only; a host round trip is enough.
            Storage::Cuda(_) => self.to_cpu()?.to_dtype(dtype)?.to_device(self.device()),
        }
    }

    /// Error unless `self` has exactly `shape`; `what` names the tensor in the message.
    pub fn expect_shape(&self, shape: &[usize], what: &str) -> Result<()> {
        if self.shape != shape {
            return Err(Error::Shape(format!(
                "{what}: expected shape {shape:?}, found {:?}",
                self.shape
            )));
        }
        Ok(())
    }
}
