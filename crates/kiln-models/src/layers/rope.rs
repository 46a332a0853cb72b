//! Rotate-half rotary position embedding (Su et al. 2021, Hugging Face's pairing: dimension
//! `i` rotates with `i + head_dim / 2`, not Burn's interleaved `RotaryEncoding`).
//!
//! Two forms, because the tables either are constants or carry gradients:
//! - [`Rope`]: constant cos/sin tables applied by one backend op
//!   ([`crate::KilnBackend::kiln_rope`]), for Qwen2's attention and ConvGPT's memory;
//! - [`rotate_half`]: the same rotation in tensor ops, for tables that are learned (MoA's
//!   BlackHoleRoPE perturbs the angles with trained Fourier terms).
//!
//! Both start from [`angles`], whose rounding is a parameter: Qwen2 rounds as Hugging Face
//! does and MoA as it always has, and the two differ in the last bit of some angles.

use std::ops::Range;

use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use crate::KilnBackend;
use crate::ops::scale_positions;

/// How a rotary angle `pos * theta^(-2i / head_dim)` is rounded to f32. The two orders
/// give different bits for some positions, and changing a family's would change its
/// results, so each family keeps its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AngleRounding {
    /// Hugging Face's: `1 / theta^(2i/d)` in f64, rounded to f32, times the position in f32
    /// (Qwen2, ConvGPT).
    F32Product,
    /// `pos * theta^(-2i/d)` in f64, rounded to f32 once (MoA).
    F64Product,
}

/// The rotary angles of `positions`, `[positions.len(), head_dim / 2]` row-major: pair `i`
/// of position `pos` turns by `pos * theta^(-2i / head_dim)`.
pub fn angles(
    positions: Range<usize>,
    head_dim: usize,
    theta: f64,
    rounding: AngleRounding,
) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(positions.len() * half);
    for pos in positions {
        for i in 0..half {
            out.push(match rounding {
                AngleRounding::F32Product => {
                    let inv_freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
                    (pos as f32) * (inv_freq as f32)
                }
                AngleRounding::F64Product => {
                    let inv = theta.powf(-(2.0 * i as f64) / head_dim as f64);
                    (pos as f64 * inv) as f32
                }
            });
        }
    }
    out
}

/// Constant rotate-half tables for a range of positions.
#[derive(Debug, Clone)]
pub struct Rope<B: KilnBackend> {
    /// `[seq, head_dim]`, each half a copy of the pairs' cosines.
    cos: Tensor<B, 2>,
    /// `[seq, head_dim]`, each half a copy of the pairs' sines.
    sin: Tensor<B, 2>,
}

impl<B: KilnBackend> Rope<B> {
    /// Tables for positions `0..seq`, rounded as Hugging Face does.
    pub fn new(seq: usize, head_dim: usize, theta: f64, device: &B::Device) -> Self {
        Self::at(0..seq, head_dim, theta, device)
    }

    /// Tables for the absolute `positions`, computed on the host in f32 (angles, cosines
    /// and sines), as Hugging Face computes them.
    pub fn at(positions: Range<usize>, head_dim: usize, theta: f64, device: &B::Device) -> Self {
        let (seq, half) = (positions.len(), head_dim / 2);
        let angles = angles(positions, head_dim, theta, AngleRounding::F32Product);
        let mut cos = Vec::with_capacity(seq * head_dim);
        let mut sin = Vec::with_capacity(seq * head_dim);
        for row in angles.chunks(half.max(1)).take(seq) {
            for j in 0..head_dim {
                let angle = row[j % half];
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            cos: Tensor::from_data(TensorData::new(cos, [seq, head_dim]), device),
            sin: Tensor::from_data(TensorData::new(sin, [seq, head_dim]), device),
        }
    }

    /// `x * cos + rotate_half(x) * sin`, one backend op.
    ///
    /// # Shapes
    /// - x: `[batch, seq, heads, head_dim]` -> same
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        Tensor::from_primitive(TensorPrimitive::Float(B::kiln_rope(
            x.into_primitive().tensor(),
            self.cos.clone().into_primitive().tensor(),
            self.sin.clone().into_primitive().tensor(),
        )))
    }
}

/// Rotates `x` by tables that may carry gradients, in tensor ops: pair `(x1, x2)` of
/// dimensions `i` and `i + head_dim / 2` becomes `(x1 c - x2 s, x2 c + x1 s)`.
///
/// # Shapes
/// - x: `[batch, seq, heads, head_dim]`; cos, sin: `[seq, head_dim / 2]` -> the shape of `x`
pub fn rotate_half<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
) -> Tensor<B, 4> {
    let e = x.dims()[3];
    let half = e / 2;
    // [x1, x2] -> [x1 c - x2 s, x2 c + x1 s] = [x1, x2] * [c, c] + [x2, x1] * [-s, s].
    let swapped = Tensor::cat(
        vec![
            x.clone().narrow(3, half, half),
            x.clone().narrow(3, 0, half),
        ],
        3,
    );
    let c = Tensor::cat(vec![cos.clone(), cos.clone()], 1); // [t, e]
    let s = Tensor::cat(vec![sin.clone().neg(), sin.clone()], 1); // [t, e]
    scale_positions(x, c) + scale_positions(swapped, s)
}
