//! Tensor operations more than one model family uses.

use burn::prelude::*;

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
