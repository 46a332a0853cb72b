//! RMSNorm on the host, and its gradients ([`crate::ops::rms_norm`]).

use rayon::prelude::*;

use super::simd::{CHUNK, dot, multiversion};

multiversion! {
    /// RMSNorm of each `w.len()`-wide row of `x` into `out`: `x · r ⊙ w` with
    /// `r = 1 / sqrt(mean(x²) + eps)`.
    fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let d = w.len();
        for (x, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let r = 1.0 / (dot(x, x) / d as f32 + eps).sqrt();
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                *o = x * r * w;
            }
        }
    }
}

multiversion! {
    /// The backward of [`rms_norm_rows`] for rows of `x` with output gradients `d`: with
    /// `g = d ⊙ w`, `dx = r g - x r³ (g · x) / width` into `dx`, and `d ⊙ x r` added to
    /// `dw`.
    fn rms_norm_backward_rows(x: &[f32], w: &[f32], d: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32]) {
        let width = w.len();
        let mut g = vec![0.0f32; width];
        for ((x, d), dx) in x.chunks_exact(width).zip(d.chunks_exact(width)).zip(dx.chunks_exact_mut(width)) {
            let r = 1.0 / (dot(x, x) / width as f32 + eps).sqrt();
            for ((g, &d), &w) in g.iter_mut().zip(d).zip(w) {
                *g = d * w;
            }
            let c = r * r * r * dot(&g, x) / width as f32;
            for ((dx, &g), &x) in dx.iter_mut().zip(&g).zip(x) {
                *dx = r * g - x * c;
            }
            for ((dw, &d), &x) in dw.iter_mut().zip(d).zip(x) {
                *dw += d * x * r;
            }
        }
    }
}

/// Rows per task of the RMSNorm kernels: about [`CHUNK`] values.
fn norm_rows(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1) * width.max(1)
}

/// RMSNorm `x / sqrt(mean(x²) + eps) ⊙ w` over the rows of `x: [rows, w.len()]`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let task = norm_rows(w.len());
    out.par_chunks_mut(task)
        .zip(x.par_chunks(task))
        .for_each(|(o, x)| rms_norm_rows(x, w, eps, o));
    out
}

/// The gradients `(dx, dw)` of [`rms_norm`] given the output's gradient `d_out`; the
/// scale `r` of each row is recomputed rather than kept.
pub fn rms_norm_backward(x: &[f32], w: &[f32], d_out: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut dx = vec![0.0f32; x.len()];
    let task = norm_rows(w.len());
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(task)
        .zip(x.par_chunks(task).zip(d_out.par_chunks(task)))
        .map(|(dx, (x, d))| {
            let mut dw = vec![0.0f32; w.len()];
            rms_norm_backward_rows(x, w, d, eps, dx, &mut dw);
            dw
        })
        .collect();
    let mut dw = vec![0.0f32; w.len()];
    for p in &partial {
        for (a, &b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    (dx, dw)
}
