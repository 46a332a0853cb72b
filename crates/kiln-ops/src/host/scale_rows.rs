//! Scaling rows by a column of weights on the host, and its gradients
//! ([`crate::ops::scale_rows`]).

use rayon::prelude::*;

use super::simd::{CHUNK, dot, multiversion};

/// `x ⊙ s` row by row: row `r` of `x` (`x.len() / s.len()` values) times `s[r]`.
pub fn scale_rows(x: &[f32], s: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    if x.is_empty() {
        return out;
    }
    let width = x.len() / s.len();
    let rows = (CHUNK / width).max(1);
    out.par_chunks_mut(rows * width)
        .zip(x.par_chunks(rows * width).zip(s.par_chunks(rows)))
        .for_each(|(o, (x, s))| scale_rows_chunk(x, s, width, o));
    out
}

/// The gradients `(dx, ds)` of [`scale_rows`] given the output's gradient `d`: `d ⊙ s`
/// and each row's `d · x`.
pub fn scale_rows_backward(x: &[f32], s: &[f32], d: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let dx = scale_rows(d, s);
    let mut ds = vec![0.0f32; s.len()];
    if !x.is_empty() {
        let width = x.len() / s.len();
        let rows = (CHUNK / width).max(1);
        ds.par_chunks_mut(rows)
            .zip(x.par_chunks(rows * width).zip(d.par_chunks(rows * width)))
            .for_each(|(ds, (x, d))| row_dots(x, d, width, ds));
    }
    (dx, ds)
}

multiversion! {
    /// `out` = each `width`-wide row of `x` times its entry of `s`.
    fn scale_rows_chunk(x: &[f32], s: &[f32], width: usize, out: &mut [f32]) {
        for ((o, x), &s) in out.chunks_mut(width).zip(x.chunks(width)).zip(s) {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = x * s;
            }
        }
    }
}

multiversion! {
    /// `out[r]` = row `r` of `a` · row `r` of `b`, rows `width` wide.
    fn row_dots(a: &[f32], b: &[f32], width: usize, out: &mut [f32]) {
        for ((o, a), b) in out.iter_mut().zip(a.chunks(width)).zip(b.chunks(width)) {
            *o = dot(a, b);
        }
    }
}
