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

use rayon::prelude::*;

use crate::bail;
use crate::error::Result;
use crate::tensor::CpuStorage;

/// Values per NF4 block.
pub const BLOCK: usize = 64;
/// Absmax values per block of the nested (double) quantisation.
pub const ABSMAX_BLOCK: usize = 256;

/// The 16 NF4 code values (quantiles of N(0,1) normalised to [-1, 1]).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Decision thresholds: the midpoints between adjacent code values, computed in f64 from the
/// f32 codes and rounded to f32 (the constants bitsandbytes' decision tree compares against).
fn nf4_thresholds() -> [f32; 15] {
    let mut t = [0f32; 15];
    for (i, ti) in t.iter_mut().enumerate() {
        *ti = ((NF4_CODE[i] as f64 + NF4_CODE[i + 1] as f64) / 2.0) as f32;
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
/// Reproduced with float32 arithmetic in the order torch performs it.
pub fn dynamic_code() -> [f32; 256] {
    // torch.linspace in float32: the first half steps up from `start`, the second half steps
    // down from `end`, so both ends are exact.
    fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
        let step = (end - start) / (steps - 1) as f32;
        let half = steps / 2;
        (0..steps)
            .map(|i| if i < half { start + step * i as f32 } else { end - step * (steps - i - 1) as f32 })
            .collect()
    }
    let mut data: Vec<f32> = Vec::with_capacity(256);
    let max_exponent_bits = 7i32;
    for i in 0..max_exponent_bits {
        let items = (1usize << i) + 1;
        let b = linspace(0.1, 1.0, items);
        let scale = 10f64.powi(-(max_exponent_bits - 1) + i) as f32;
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| a.total_cmp(b));
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

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
        if x > (upper + val) * 0.5 { upper_pivot } else { pivot }
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
    Double { q: Vec<u8>, absmax2: Vec<f32>, offset: f32, code: Box<[f32; 256]> },
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
            Absmax::Double { q, absmax2, offset, code } => {
                code[q[b] as usize] * absmax2[b / ABSMAX_BLOCK] + *offset
            }
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
            bail!(Shape, "NF4: shape {shape:?} does not match {} values", values.len());
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
        let absmax = if double_quant { double_quantize(&absmax) } else { Absmax::Plain(absmax) };
        Ok(Nf4Tensor { shape: shape.to_vec(), packed, absmax })
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
                let nib = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                out[o] = NF4_CODE[nib as usize] * scale;
                i += 1;
                o += 1;
            }
        }
    }

    /// The whole tensor dequantised to f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        out.par_chunks_mut(BLOCK * 64).enumerate().for_each(|(c, chunk)| {
            self.dequantize_into(c * BLOCK * 64, chunk);
        });
        out
    }
}

/// Nested quantisation of the per-block absmax values (bitsandbytes `compress_statistics`).
pub fn double_quantize(absmax: &[f32]) -> Absmax {
    // torch's f32 mean; summed in f64 here and rounded once.
    let offset = (absmax.iter().map(|&x| x as f64).sum::<f64>() / absmax.len() as f64) as f32;
    let code = Box::new(dynamic_code());
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut q = vec![0u8; centred.len()];
    let mut absmax2 = vec![0f32; centred.len().div_ceil(ABSMAX_BLOCK)];
    for ((chunk, qc), a2) in centred.chunks(ABSMAX_BLOCK).zip(q.chunks_mut(ABSMAX_BLOCK)).zip(&mut absmax2) {
        let m = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        *a2 = m;
        let inv = 1.0 / m;
        for (x, qv) in chunk.iter().zip(qc.iter_mut()) {
            *qv = dynamic_code_of(x * inv, &code);
        }
    }
    Absmax::Double { q, absmax2, offset, code }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_bitsandbytes_constants() {
        let t = nf4_thresholds();
        // Three of the constants in bitsandbytes' dQuantizeNF4 decision tree.
        assert_eq!(t[7], 0.039_790_149_778_127_67_f32);
        assert_eq!(t[11], 0.501_663_416_624_069_2_f32);
        assert_eq!(t[0], -0.848_096_400_499_343_9_f32);
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
        let mut v: Vec<f32> = (0..131).map(|i| ((i * 37 % 17) as f32 - 8.0) / 3.0).collect();
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
