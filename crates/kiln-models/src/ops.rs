//! Tensor operations more than one model family uses.

use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use crate::KilnBackend;

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

/// SwiGLU's gate `silu(gate) * up` as one backend op ([`KilnBackend::kiln_swiglu`]): a
/// host kernel on the CPU backend, and the backward keeps only `gate` and `up`.
///
/// # Shapes
/// - gate, up: any shape, the same -> the same
pub fn swiglu<B: KilnBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::kiln_swiglu(
        gate.into_primitive().tensor(),
        up.into_primitive().tensor(),
    )))
}

/// Causal depthwise convolution: output `t` sees inputs `t - kernel + 1 ..= t`.
///
/// # Shapes
/// - x: `[batch, seq, channels]`; weight: `[channels, kernel]`, the last tap on the current
///   token -> `[batch, seq, channels]`
pub fn causal_depthwise<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 2>) -> Tensor<B, 3> {
    let [b, t, c] = x.dims();
    let k = weight.dims()[1];
    let padded = if k > 1 {
        Tensor::cat(vec![Tensor::zeros([b, k - 1, c], &x.device()), x], 1) // [b, t+k-1, c]
    } else {
        x
    };
    let mut out: Option<Tensor<B, 3>> = None;
    for j in 0..k {
        let tap = weight.clone().narrow(1, j, 1).reshape([1, 1, c]);
        let term = padded.clone().narrow(1, j, t) * tap;
        out = Some(match out {
            Some(o) => o + term,
            None => term,
        });
    }
    out.expect("kernel of at least one tap")
}
