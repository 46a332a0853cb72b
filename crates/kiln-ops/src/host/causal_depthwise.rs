//! Causal depthwise convolution on the host, and its gradients
//! ([`crate::ops::causal_depthwise`]).

use rayon::prelude::*;

use super::simd::multiversion;

multiversion! {
    /// `acc += x ⊙ w` over equal-length slices.
    fn fma_into(acc: &mut [f32], x: &[f32], w: &[f32]) {
        for ((a, &x), &w) in acc.iter_mut().zip(x).zip(w) {
            *a += x * w;
        }
    }
}

/// Causal depthwise convolution of `x: [batch, seq, channels]` with `w: [channels,
/// kernel]` (tap `kernel - 1` on the current token): `out[b, t, c] = sum_j w[c, j] ·
/// x[b, t - kernel + 1 + j, c]`, zero before the start. Batch rows go to the cores.
pub fn causal_depthwise(x: &[f32], w: &[f32], [seq, channels, kernel]: [usize; 3]) -> Vec<f32> {
    let taps = transpose_taps(w, channels, kernel);
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(seq * channels)
        .zip(x.par_chunks(seq * channels))
        .for_each(|(o, x)| {
            for t in 0..seq {
                let row = &mut o[t * channels..][..channels];
                for (j, tap) in taps.chunks_exact(channels).enumerate() {
                    // Input position t - (kernel - 1) + j.
                    if let Some(src) = (t + j).checked_sub(kernel - 1) {
                        fma_into(row, &x[src * channels..][..channels], tap);
                    }
                }
            }
        });
    out
}

/// The gradients `(dx, dw)` of [`causal_depthwise`] given the output's gradient.
pub fn causal_depthwise_backward(
    x: &[f32],
    w: &[f32],
    d_out: &[f32],
    [seq, channels, kernel]: [usize; 3],
) -> (Vec<f32>, Vec<f32>) {
    let taps = transpose_taps(w, channels, kernel);
    let mut dx = vec![0.0f32; x.len()];
    // Each batch row's weight gradient `[kernel, channels]`, summed after.
    let dw_rows: Vec<Vec<f32>> = dx
        .par_chunks_mut(seq * channels)
        .zip(
            x.par_chunks(seq * channels)
                .zip(d_out.par_chunks(seq * channels)),
        )
        .map(|(dx, (x, d))| {
            let mut dw = vec![0.0f32; kernel * channels];
            for t in 0..seq {
                let d_row = &d[t * channels..][..channels];
                for (j, (tap, dw_tap)) in taps
                    .chunks_exact(channels)
                    .zip(dw.chunks_exact_mut(channels))
                    .enumerate()
                {
                    if let Some(src) = (t + j).checked_sub(kernel - 1) {
                        fma_into(&mut dx[src * channels..][..channels], d_row, tap);
                        fma_into(dw_tap, d_row, &x[src * channels..][..channels]);
                    }
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0.0f32; channels * kernel];
    for row in &dw_rows {
        for (j, tap) in row.chunks_exact(channels).enumerate() {
            for (c, &g) in tap.iter().enumerate() {
                dw[c * kernel + j] += g;
            }
        }
    }
    (dx, dw)
}

/// `w: [channels, kernel]` as `[kernel, channels]`, so each tap's weights are contiguous.
fn transpose_taps(w: &[f32], channels: usize, kernel: usize) -> Vec<f32> {
    (0..kernel)
        .flat_map(|j| (0..channels).map(move |c| w[c * kernel + j]))
        .collect()
}
