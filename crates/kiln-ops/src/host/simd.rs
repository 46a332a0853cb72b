//! What every host kernel shares: run-time selection of vector code ([`multiversion!`]) and
//! the vectorizable scalar helpers (`exp`, `max`, `dot`) that the kernels' bodies inline.

/// Defines `fn $name` whose body is compiled for AVX-512, for AVX2 + FMA and for the
/// baseline target, and dispatches on what the CPU has. Helpers the body calls must be
/// `#[inline(always)]` to be compiled with the same features.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features the function is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use multiversion;

/// Lanes of the partial sums and maxima: wide enough for one AVX-512 register, and a
/// shape the compiler turns into vector code at any width.
pub(crate) const LANES: usize = 16;

/// `e^x` to within 2 ulp (Cephes' `expf` polynomial), written so that a loop over it
/// vectorizes; 0 below `-87.3`, where `e^x` leaves the normal floats.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.722_83;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let c = x.clamp(LO, HI);
    let n = (c * LOG2_E + ROUND) - ROUND;
    let r = c - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n + 127 is an integer in [0, 255]: added to 2^23 it lands in the low mantissa bits,
    // and shifting those into the exponent field makes 2^n.
    let scale = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    if x < LO { 0.0 } else { e * scale }
}

/// The largest value of `xs` (`-inf` when empty).
#[inline(always)]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let m = tail.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    acc.iter().fold(m, |m, &x| m.max(x))
}

/// `sum(a ⊙ b)`.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Elements per task of the element-wise kernels: large enough that splitting costs
/// little, small enough to spread a layer's activations over the cores.
pub(crate) const CHUNK: usize = 1 << 15;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_standard_library() {
        let mut worst = 0.0f32;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01 + 0.003;
            let (ours, std) = (exp(x), x.exp());
            worst = worst.max(((ours - std) / std).abs());
        }
        assert!(worst < 3e-7, "largest relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }
}
