//! RMSNorm with a learned scale, as every family uses it before each branch and the head.

use burn::module::{Module, Param};
use burn::prelude::*;

use crate::KilnBackend;

/// Root-mean-square layer norm with a learned scale (`weight`, as in the checkpoints).
#[derive(Module, Debug)]
pub struct RmsNorm<B: KilnBackend> {
    /// Scale, `[hidden]`, initialized to ones.
    pub weight: Param<Tensor<B, 1>>,
    /// Epsilon added to the mean square.
    pub eps: f64,
}

impl<B: KilnBackend> RmsNorm<B> {
    /// A norm of width `dim` with unit scale.
    pub fn new(dim: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
            eps,
        }
    }

    /// `x / sqrt(mean(x²) + eps) * weight` over the last axis ([`crate::ops::rms_norm`]).
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        crate::ops::rms_norm(x, self.weight.val(), self.eps)
    }
}
