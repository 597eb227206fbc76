//! NF4 quantisation, bit-compatible with bitsandbytes (`quant_type="nf4"`, blocksize 64).
//!
//! Layout, as bitsandbytes' CUDA kernels produce it:
//! - the weight is flattened row-major and cut into blocks of 64 values; the last block may be
//!   partial;
//! - each block stores `absmax = max|x|` as f32; values are scaled by the *reciprocal*
//!   `1/absmax` (a multiply, not a divide — this matters for values on a code boundary) and
//!   mapped to the nearest of the 16 NF4 code values; a value exactly on a midpoint between
//!   two codes takes the lower code;
//! - two codes per byte, the element with the even flat index in the high nibble; an odd
//!   element count pads the last low nibble with the code of 0.0;
//! - a block of zeros has `1/absmax = inf`, so every scaled value is NaN and every code is 0
//!   (the code of -1.0); dequantised, `-1.0 * 0 = -0.0`.
//!
//! Double quantisation (`compress_statistics=True`, our `--double-quant`): the f32 absmax
//! values have their mean subtracted (`offset`), then are quantised blockwise (256 per block)
//! to 8-bit indices into bitsandbytes' signed "dynamic" code, by the same binary search over
//! the sorted code that bitsandbytes' `dQuantize` performs; each 256-block keeps its own f32
//! absmax (`absmax2`). Dequantised: `absmax = code[q] * absmax2[b / 256] + offset`, then
//! `w = NF4[nibble] * absmax`, all in f32.

use std::sync::Arc;

use rayon::prelude::*;

use crate::bail;
use crate::cuda::{CudaBuffer, CudaDevice};
use crate::error::Result;
use crate::tensor::CpuStorage;

/// Values per NF4 block.
pub const BLOCK: usize = 64;
/// Absmax values per block of the nested (double) quantisation.
pub const ABSMAX_BLOCK: usize = 256;

/// The 16 NF4 code values (quantiles of N(0,1) normalised to [-1, 1]).
#[allow(clippy::excessive_precision)] // digits as bitsandbytes writes them
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Decision thresholds: the midpoints between adjacent code values. bitsandbytes writes them
/// as decimal `float` literals (the f64 midpoint printed to 16–17 digits), which the C
/// compiler rounds straight from decimal to f32. Rounding the f64 midpoint to f32 instead
/// differs for 0.5016634166240692 (it lies within 1e-17 of an f32 rounding boundary), so the
/// midpoint is formatted as its shortest decimal and parsed as f32, exactly like the literal.
fn nf4_thresholds() -> [f32; 15] {
    let mut t = [0f32; 15];
    for (i, ti) in t.iter_mut().enumerate() {
        let mid = (NF4_CODE[i] as f64 + NF4_CODE[i + 1] as f64) / 2.0;
        *ti = format!("{mid}").parse::<f32>().unwrap_or(mid as f32);
    }
    t
}

/// The NF4 code of a value already scaled into [-1, 1]: the number of thresholds it exceeds
/// (ties go down; NaN exceeds none and gets code 0, as in bitsandbytes).
#[inline]
pub fn nf4_code_of(x: f32, thresholds: &[f32; 15]) -> u8 {
    // A branch-free count is the same function as bitsandbytes' balanced decision tree over
    // the same sorted thresholds.
    thresholds.iter().map(|&t| (x > t) as u8).sum()
}

/// bitsandbytes' signed 8-bit "dynamic" code (`create_dynamic_map(signed=True)`), used for the
/// nested quantisation of absmax values: 127 negative values, 0, 127 positive values, 1.0.
///
/// bitsandbytes builds it from float32 `torch.linspace` grids, whose last-bit rounding depends
/// on torch's vectorised kernel; rather than re-derive that, the table is the exact bit pattern
/// bitsandbytes produced (the same on the fixture machine and the H200 test machine), and
/// `tests/nf4_bnb.rs` checks it against both fixtures.
pub fn dynamic_code() -> [f32; 256] {
    DYNAMIC_CODE_BITS.map(f32::from_bits)
}

#[rustfmt::skip]
const DYNAMIC_CODE_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// bitsandbytes' `dQuantize` (non-stochastic): a 7-step binary search over the sorted 256-entry
/// code starting at index 127, then a choice between the last probe and its bracketing
/// neighbour by midpoint. This is nearest-code except at the code's edges, where the search
/// bracket starts at ±1.0 — reproduced as is for bit compatibility.
pub fn dynamic_code_of(x: f32, code: &[f32; 256]) -> u8 {
    let mut pivot: i32 = 127;
    let mut upper_pivot: i32 = 255;
    let mut lower_pivot: i32 = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot as usize];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot as usize];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[255];
    }
    if lower_pivot == 0 {
        lower = code[0];
    }
    let idx = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    idx as u8
}

/// Per-block scales of an NF4 tensor.
#[derive(Clone, Debug)]
pub enum Absmax {
    /// One f32 absmax per 64-value block.
    Plain(Vec<f32>),
    /// Double quantisation: 8-bit index per block into the dynamic code, an f32 scale per 256
    /// blocks, and the mean subtracted before quantising.
    Double {
        q: Vec<u8>,
        absmax2: Vec<f32>,
        offset: f32,
        code: Box<[f32; 256]>,
    },
}

impl Absmax {
    pub fn blocks(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Double { q, .. } => q.len(),
        }
    }

    /// The f32 absmax of block `b`, exactly as bitsandbytes dequantises it.
    #[inline]
    pub fn get(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[b],
            Absmax::Double {
                q,
                absmax2,
                offset,
                code,
            } => code[q[b] as usize] * absmax2[b / ABSMAX_BLOCK] + *offset,
        }
    }

    /// Bytes held in memory.
    pub fn nbytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len() * 4,
            Absmax::Double { q, absmax2, .. } => q.len() + absmax2.len() * 4 + 4 + 256 * 4,
        }
    }
}

/// A weight quantised to NF4.
#[derive(Clone, Debug)]
pub struct Nf4Tensor {
    pub shape: Vec<usize>,
    /// Two codes per byte, `ceil(numel / 2)` bytes.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl Nf4Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes held in memory (codes plus scales).
    pub fn nbytes(&self) -> usize {
        self.packed.len() + self.absmax.nbytes()
    }

    /// Quantise `values` (any storage dtype, widened to f32 block by block).
    pub fn quantize(values: &CpuStorage, shape: &[usize], double_quant: bool) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != values.len() {
            bail!(
                Shape,
                "NF4: shape {shape:?} does not match {} values",
                values.len()
            );
        }
        if n == 0 {
            bail!(Shape, "NF4: cannot quantise an empty tensor");
        }
        let thresholds = nf4_thresholds();
        let blocks = n.div_ceil(BLOCK);
        let mut packed = vec![0u8; n.div_ceil(2)];
        let mut absmax = vec![0f32; blocks];
        // Each block fills 32 bytes of `packed` (the last one possibly fewer).
        packed
            .par_chunks_mut(BLOCK / 2)
            .zip(absmax.par_iter_mut())
            .enumerate()
            .for_each(|(b, (out, amax))| {
                let start = b * BLOCK;
                let len = BLOCK.min(n - start);
                let mut vals = [0f32; BLOCK];
                values.read_f32(start, &mut vals[..len]);
                let m = vals[..len].iter().fold(0f32, |m, v| m.max(v.abs()));
                *amax = m;
                let inv = 1.0 / m;
                for (j, byte) in out.iter_mut().enumerate() {
                    // Padding past the end is 0.0, as bitsandbytes' block loads fill it.
                    let hi = nf4_code_of(vals[2 * j] * inv, &thresholds);
                    let lo = nf4_code_of(vals[2 * j + 1] * inv, &thresholds);
                    *byte = (hi << 4) | lo;
                }
            });
        let absmax = if double_quant {
            double_quantize(&absmax)
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Nf4Tensor {
            shape: shape.to_vec(),
            packed,
            absmax,
        })
    }

    /// Dequantise elements `[start, start + out.len())` of the flattened tensor into `out`.
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) {
        let mut i = start;
        let end = start + out.len();
        let mut o = 0;
        while i < end {
            let b = i / BLOCK;
            let scale = self.absmax.get(b);
            let block_end = ((b + 1) * BLOCK).min(end);
            while i < block_end {
                let byte = self.packed[i / 2];
                let nib = if i.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0x0f
                };
                out[o] = NF4_CODE[nib as usize] * scale;
                i += 1;
                o += 1;
            }
        }
    }

    /// The whole tensor dequantised to f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        out.par_chunks_mut(BLOCK * 64)
            .enumerate()
            .for_each(|(c, chunk)| {
                self.dequantize_into(c * BLOCK * 64, chunk);
            });
        out
    }
}

/// Nested quantisation of the per-block absmax values (bitsandbytes `compress_statistics`):
/// the mean is subtracted, then [`nested_quantize`].
pub fn double_quantize(absmax: &[f32]) -> Absmax {
    // torch takes the f32 mean with its own summation order (which differs between its CPU and
    // CUDA kernels by an ulp); summing in f64 and rounding once gives the exact mean.
    let offset = (absmax.iter().map(|&x| x as f64).sum::<f64>() / absmax.len() as f64) as f32;
    nested_quantize(absmax, offset)
}

/// Quantise `absmax − offset` in blocks of 256 to the dynamic code: per block the f32 absmax
/// is kept, values are scaled by its reciprocal and mapped by [`dynamic_code_of`].
pub fn nested_quantize(absmax: &[f32], offset: f32) -> Absmax {
    let code = Box::new(dynamic_code());
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut q = vec![0u8; centred.len()];
    let mut absmax2 = vec![0f32; centred.len().div_ceil(ABSMAX_BLOCK)];
    for ((chunk, qc), a2) in centred
        .chunks(ABSMAX_BLOCK)
        .zip(q.chunks_mut(ABSMAX_BLOCK))
        .zip(&mut absmax2)
    {
        let m = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        *a2 = m;
        let inv = 1.0 / m;
        for (x, qv) in chunk.iter().zip(qc.iter_mut()) {
            *qv = dynamic_code_of(x * inv, &code);
        }
    }
    Absmax::Double {
        q,
        absmax2,
        offset,
        code,
    }
}

/// An NF4 weight in device memory, in exactly the layout of [`Nf4Tensor`].
#[derive(Debug)]
pub struct Nf4Device {
    pub shape: Vec<usize>,
    /// `ceil(numel / 2)` bytes, two codes per byte (even element in the high nibble).
    pub packed: CudaBuffer,
    pub absmax: DeviceAbsmax,
}

/// Per-block scales on the device.
#[derive(Debug)]
pub enum DeviceAbsmax {
    /// f32 per 64-value block.
    Plain(CudaBuffer),
    /// u8 per block, f32 per 256 blocks, the offset, and the 256-entry f32 dynamic code.
    Double {
        q: CudaBuffer,
        absmax2: CudaBuffer,
        offset: f32,
        code: CudaBuffer,
    },
}

impl Nf4Device {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                DeviceAbsmax::Plain(a) => a.len(),
                DeviceAbsmax::Double {
                    q, absmax2, code, ..
                } => q.len() + absmax2.len() + code.len(),
            }
    }
}

impl Nf4Tensor {
    /// Copy to a GPU.
    pub fn to_device(&self, device: &Arc<CudaDevice>) -> Result<Nf4Device> {
        let packed = device.upload(&self.packed)?;
        let absmax = match &self.absmax {
            Absmax::Plain(a) => DeviceAbsmax::Plain(device.upload(bytemuck::cast_slice(a))?),
            Absmax::Double {
                q,
                absmax2,
                offset,
                code,
            } => DeviceAbsmax::Double {
                q: device.upload(q)?,
                absmax2: device.upload(bytemuck::cast_slice(absmax2))?,
                offset: *offset,
                code: device.upload(bytemuck::cast_slice(&code[..]))?,
            },
        };
        Ok(Nf4Device {
            shape: self.shape.clone(),
            packed,
            absmax,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_bitsandbytes_constants() {
        let t = nf4_thresholds();
        // Three of the constants in bitsandbytes' dQuantizeNF4 decision tree.
        assert_eq!(t[7], 0.039_790_15_f32);
        assert_eq!(t[12], 0.501_663_4_f32);
        assert_eq!(t[0], -0.848_096_43_f32);
    }

    #[test]
    fn codes_round_trip_and_ties_go_down() {
        let t = nf4_thresholds();
        for (i, &c) in NF4_CODE.iter().enumerate() {
            assert_eq!(nf4_code_of(c, &t) as usize, i);
        }
        assert_eq!(nf4_code_of(t[7], &t), 7);
        assert_eq!(nf4_code_of(f32::NAN, &t), 0);
    }

    #[test]
    fn dynamic_code_is_sorted_and_symmetric() {
        let c = dynamic_code();
        assert!(c.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(c[127], 0.0);
        assert_eq!(c[255], 1.0);
        for i in 0..127 {
            assert_eq!(c[i], -c[254 - i]);
        }
        for (i, &v) in c.iter().enumerate() {
            assert_eq!(dynamic_code_of(v, &c) as usize, i, "code value {v} at {i}");
        }
    }

    #[test]
    fn odd_sizes_and_zero_blocks() {
        let mut v: Vec<f32> = (0..131)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 3.0)
            .collect();
        for x in &mut v[64..128] {
            *x = 0.0;
        }
        let q = Nf4Tensor::quantize(&CpuStorage::F32(v.clone()), &[131], false).unwrap();
        assert_eq!(q.packed.len(), 66);
        assert_eq!(q.absmax.blocks(), 3);
        // A zero block: every code 0, dequantised to zero.
        assert!(q.packed[32..64].iter().all(|&b| b == 0));
        let d = q.dequantize();
        assert!(d[64..128].iter().all(|&x| x == 0.0));
        // The padding nibble of the odd last element is the code of 0.0.
        assert_eq!(q.packed[65] & 0x0f, 7);
        // Every value within half a code gap of the original.
        for (b, chunk) in v.chunks(BLOCK).enumerate() {
            let s = q.absmax.get(b);
            for (j, &x) in chunk.iter().enumerate() {
                assert!((d[b * BLOCK + j] - x).abs() <= 0.16 * s + 1e-6);
            }
        }
    }
}
