//! SwiGLU's gate `silu(gate) ⊙ up` on the host and its gradients ([`crate::ops::swiglu`]).

use rayon::prelude::*;

use super::simd::{CHUNK, exp, multiversion};

/// `1 / (1 + e^-x)`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

multiversion! {
    /// `out = silu(gate) ⊙ up`.
    fn swiglu_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    }
}

multiversion! {
    /// The gradients of [`swiglu_chunk`] given the output's gradient `d`, into `d_gate`
    /// and `d_up`.
    fn swiglu_backward_chunk(
        gate: &[f32],
        up: &[f32],
        d: &[f32],
        d_gate: &mut [f32],
        d_up: &mut [f32],
    ) {
        for ((((dg, du), &g), &u), &d) in d_gate.iter_mut().zip(d_up.iter_mut()).zip(gate).zip(up).zip(d) {
            let s = sigmoid(g);
            *du = d * g * s;
            *dg = d * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

/// SwiGLU's gate, `silu(gate) ⊙ up`, over equal-length slices.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; gate.len()];
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| swiglu_chunk(g, u, o));
    out
}

/// The gradients `(d_gate, d_up)` of [`swiglu`] given the output's gradient `d_out`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], d_out: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut d_gate = vec![0.0f32; gate.len()];
    let mut d_up = vec![0.0f32; gate.len()];
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .zip(d_out.par_chunks(CHUNK))
        .for_each(|(((dg, du), (g, u)), d)| swiglu_backward_chunk(g, u, d, dg, du));
    (d_gate, d_up)
}
