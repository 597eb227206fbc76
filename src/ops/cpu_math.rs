//! Vectorisable f32 math for the CPU twins: `exp`, `tanh`, and the activations built on them,
//! plus `multiversion!`, which compiles a function for the widest vector ISA the CPU has.
//!
//! libm's `expf`/`tanhf` are scalar calls that stop the compiler from vectorising a loop;
//! these are branch-free polynomial versions (within 2 ulp over the range the models use), so
//! loops over them compile to AVX-512 or AVX2 code. Results do not depend on the ISA: no
//! fused multiply-adds are requested and Rust never contracts `a * b + c` on its own.

/// Define a function whose body is compiled three times — for AVX-512, for AVX2 + FMA and for
/// the baseline — and dispatched at run time, so the loops in it (and the `#[inline(always)]`
/// math they call) are vectorised for the widest ISA the CPU has.
///
/// ```text
/// multiversion! {
///     pub(super) fn scale(x: &mut [f32], s: f32) { for v in x { *v *= s; } }
/// }
/// ```
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v256($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features v512 is compiled for.
                    return unsafe { v512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for v256.
                    return unsafe { v256($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that n·LN2_HI is exact for |n| < 2^9 (Cody–Waite reduction).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// `e^x` for `x ≤ 88`; inputs below −87.3 give the smallest normal (≈1.2e-38), not 0 —
/// callers that need exact zeros (masked attention) skip those elements.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.0);
    let n = (x * LOG2E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    // e^r on |r| ≤ ln2/2: Taylor terms to r^7 (truncation error < 2e-9 relative).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[allow(clippy::excessive_precision)] // coefficients as published
/// `tanh(x)`: an odd polynomial for |x| < 0.625 (coefficients of the Cephes `tanhf`), else
/// `1 − 2/(e^{2|x|} + 1)` with the sign restored.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let small =
        ((((-5.704_988_7e-3 * z + 2.063_908_9e-2) * z - 5.373_971_6e-2) * z + 1.333_144_2e-1) * z
            - 3.333_328_2e-1)
            * z
            * x
            + x;
    let big = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    let big = if x < 0.0 { -big } else { big };
    if a < 0.625 { small } else { big }
}

/// GELU, tanh approximation (PyTorch's `gelu(approximate="tanh")`).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + tanh(K * (x + 0.044_715 * x * x * x)))
}

/// SiLU, `x · sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Sum of squares with eight independent partial sums (vectorisable).
#[inline(always)]
pub fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k] * c[k];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for v in rest {
        s += v * v;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> i64 {
        (a.to_bits() as i64 - b.to_bits() as i64).abs()
    }

    #[test]
    fn exp_and_tanh_are_within_a_few_ulp_of_libm() {
        let mut worst_exp = 0;
        let mut worst_tanh = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            worst_exp = worst_exp.max(ulps(exp(x), x.exp()));
            x += 0.0137;
        }
        let mut x = -12.0f32;
        while x < 12.0 {
            let want = (x as f64).tanh();
            worst_tanh = worst_tanh.max((tanh(x) as f64 - want).abs() / want.abs().max(1e-30));
            x += 0.000_731;
        }
        assert!(worst_exp <= 3, "exp: {worst_exp} ulp");
        assert!(worst_tanh < 3e-7, "tanh: relative error {worst_tanh:e}");
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!(tanh(30.0), 1.0);
        assert_eq!(tanh(-30.0), -1.0);
        assert!(exp(-1e30) < 1.2e-38 && exp(-1e30) >= 0.0);
    }

    #[test]
    fn activations_match_their_definitions() {
        for i in -400..400 {
            let x = i as f32 * 0.025;
            let g = 0.5
                * x as f64
                * (1.0
                    + ((2.0 / std::f64::consts::PI).sqrt()
                        * (x as f64 + 0.044715 * (x as f64).powi(3)))
                    .tanh());
            assert!(
                (gelu_tanh(x) as f64 - g).abs() < 2e-6 * (1.0 + g.abs()),
                "gelu({x})"
            );
            let s = x as f64 / (1.0 + (-(x as f64)).exp());
            assert!(
                (silu(x) as f64 - s).abs() < 2e-6 * (1.0 + s.abs()),
                "silu({x})"
            );
        }
    }
}
