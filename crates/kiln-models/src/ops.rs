//! Tensor operations more than one model family uses.

use burn::prelude::*;

// The fused operations (one backend op each, with a host kernel on the CPU backend) live
// in kiln-ops, one file per operation.
pub use kiln_ops::{causal_depthwise, dropout, rms_norm, scale_rows, swiglu};

/// A linear layer applied as one 2-D matmul over all leading axes. Burn's
/// [`burn::nn::Linear::forward`] on a 3-D input runs a batched matmul against the broadcast
/// weight, whose backward computes the weight's gradient once per batch row and then sums
/// the copies: about twice the time of the 2-D form on the CPU backend.
pub trait Dense<B: Backend> {
    /// # Shapes
    /// - x: `[..., in]` -> `[..., out]`
    fn dense<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>;
}

impl<B: Backend> Dense<B> for burn::nn::Linear<B> {
    fn dense<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let y = self.forward(x.reshape([rows, dims[D - 1]]));
        let mut out = dims;
        out[D - 1] = y.dims()[1];
        y.reshape(out)
    }
}

/// `x * w` for per-head weights `w: [heads, width]` broadcast over batch and positions
/// of `x: [batch, seq, heads, width]`. Written as a product of `[batch * seq, heads *
/// width]` rows with one shared row, the broadcast the CPU backend vectorizes (it walks a
/// `[1, 1, heads, width]` broadcast element by element).
pub fn scale_heads<B: Backend>(x: Tensor<B, 4>, w: Tensor<B, 2>) -> Tensor<B, 4> {
    let [b, t, h, e] = x.dims();
    (x.reshape([b * t, h * e]) * w.reshape([1, h * e])).reshape([b, t, h, e])
}

/// `x * table` for a per-position `table: [seq, width]` broadcast over batch and heads of
/// `x: [batch, seq, heads, width]`: the table is repeated over the heads (a copy of one
/// batch row's size) so that the product is the vectorized shared-row broadcast.
pub fn scale_positions<B: Backend>(x: Tensor<B, 4>, table: Tensor<B, 2>) -> Tensor<B, 4> {
    let [b, t, h, e] = x.dims();
    let per_head = table.reshape([t, 1, e]).repeat_dim(1, h); // [t, h, e]
    (x.reshape([b, t * h * e]) * per_head.reshape([1, t * h * e])).reshape([b, t, h, e])
}
