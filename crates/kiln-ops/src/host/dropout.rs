//! Dropout masks on the host from a counter hash ([`crate::ops::dropout`]).

use rayon::prelude::*;

use super::simd::CHUNK;

/// A dropout mask of `n` values: `1 / keep` with probability `keep`, else 0. Value `i`
/// comes from a hash of `seed` and `i` (SplitMix64's output function of the counter), so
/// the mask depends on the seed alone, not on how the work is split over threads.
pub fn dropout_mask(n: usize, keep: f64, seed: u64) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    let scale = (1.0 / keep) as f32;
    // Keep a value when its 32-bit draw is below keep · 2³² (every value at keep = 1).
    let threshold = (keep * 4_294_967_296.0).min(4_294_967_296.0) as u64;
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let start = (c * CHUNK) as u64;
            for (pair, values) in chunk.chunks_mut(2).enumerate() {
                let h =
                    mix64(seed.wrapping_add((start / 2 + pair as u64 + 1).wrapping_mul(GOLDEN)));
                for (k, v) in values.iter_mut().enumerate() {
                    let draw = (h >> (32 * k)) & 0xffff_ffff;
                    *v = if draw < threshold { scale } else { 0.0 };
                }
            }
        });
    out
}

/// SplitMix64's increment (2⁶⁴ / φ).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_masks_keep_their_rate_and_depend_on_the_seed_alone() {
        // Crosses several parallel chunks, with an odd length (a lone last value).
        let n = 3 * CHUNK + 7;
        let mask = dropout_mask(n, 0.8, 42);
        assert!(
            mask.iter().all(|&v| v == 0.0 || v == 1.25),
            "values 0 or 1 / keep"
        );
        let kept = mask.iter().filter(|&&v| v > 0.0).count() as f64 / n as f64;
        assert!((kept - 0.8).abs() < 0.005, "kept {kept}");
        assert_eq!(mask, dropout_mask(n, 0.8, 42));
        let other = dropout_mask(n, 0.8, 43);
        let same = mask.iter().zip(&other).filter(|(a, b)| a == b).count() as f64 / n as f64;
        // Independent masks agree where both keep or both drop: 0.8² + 0.2² = 0.68.
        assert!((same - 0.68).abs() < 0.01, "agreement {same}");
        // Neighbouring values are not correlated (both halves of one hash are used).
        let both = mask.windows(2).filter(|w| w[0] > 0.0 && w[1] > 0.0).count() as f64;
        assert!((both / (n - 1) as f64 - 0.64).abs() < 0.01);
        assert!(dropout_mask(100, 1.0, 7).iter().all(|&v| v == 1.0));
        // A prefix is the mask of the shorter length: values do not depend on the length.
        assert_eq!(&mask[..CHUNK + 3], &dropout_mask(CHUNK + 3, 0.8, 42)[..]);
    }
}
