//! Rotary embedding (rotate-half pairing) on the host, and its transpose
//! ([`crate::ops::rope`]).

use rayon::prelude::*;

use super::simd::{CHUNK, multiversion};

multiversion! {
    /// Rotary embedding of the heads of one position, `x: [heads, dim]`, with that
    /// position's `cos` and `sin` rows (`[dim]`): `x ⊙ cos + rotate_half(x) ⊙ sin`, where
    /// `rotate_half([x1, x2]) = [-x2, x1]`. With `inverse`, the transpose (the backward):
    /// `x ⊙ cos + rotate_halfᵀ(x ⊙ sin)`, `rotate_halfᵀ([y1, y2]) = [y2, -y1]`.
    fn rope_position(x: &[f32], cos: &[f32], sin: &[f32], inverse: bool, out: &mut [f32]) {
        let half = cos.len() / 2;
        let (c1, c2) = cos.split_at(half);
        let (s1, s2) = sin.split_at(half);
        for (x, o) in x.chunks_exact(cos.len()).zip(out.chunks_exact_mut(cos.len())) {
            let (x1, x2) = x.split_at(half);
            let (o1, o2) = o.split_at_mut(half);
            if inverse {
                for i in 0..half {
                    o1[i] = x1[i] * c1[i] + x2[i] * s2[i];
                    o2[i] = x2[i] * c2[i] - x1[i] * s1[i];
                }
            } else {
                for i in 0..half {
                    o1[i] = x1[i] * c1[i] - x2[i] * s1[i];
                    o2[i] = x2[i] * c2[i] + x1[i] * s2[i];
                }
            }
        }
    }
}

/// Rotary embedding of `x: [batch, seq, heads, dim]` with tables `cos, sin: [seq, dim]`
/// (see [`rope_position`]); `inverse` applies the transpose, which is the backward.
pub fn rope(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    [seq, heads, dim]: [usize; 3],
    inverse: bool,
) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let row = heads * dim;
    // Positions per task: a few thousand elements each.
    let per_task = (CHUNK / 8 / row.max(1)).max(1);
    out.par_chunks_mut(row * per_task)
        .zip(x.par_chunks(row * per_task))
        .enumerate()
        .for_each(|(task, (o, x))| {
            for (j, (o, x)) in o.chunks_exact_mut(row).zip(x.chunks_exact(row)).enumerate() {
                let t = (task * per_task + j) % seq;
                let (c, s) = (&cos[t * dim..][..dim], &sin[t * dim..][..dim]);
                rope_position(x, c, s, inverse, o);
            }
        });
    out
}
