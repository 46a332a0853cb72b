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

/// Dropout where the backend records gradients (training): `x ⊙ mask` with a
/// [`KilnBackend::kiln_dropout_mask`] of `x`'s shape, as `burn::nn::Dropout` computes it;
/// `x` itself at `prob` 0 or without autodiff.
pub fn dropout<B: KilnBackend, const D: usize>(x: Tensor<B, D>, prob: f64) -> Tensor<B, D> {
    let device = x.device();
    if prob <= 0.0 || !B::ad_enabled(&device) {
        return x;
    }
    let mask = B::kiln_dropout_mask(x.shape(), 1.0 - prob, &device);
    x * Tensor::from_primitive(TensorPrimitive::Float(mask))
}

/// `x * s` with one scale per row, as one backend op ([`KilnBackend::kiln_scale_rows`]):
/// a host kernel on the CPU backend, where the broadcast product walks the elements one by
/// one when `s` is a view (a column of routing weights).
///
/// # Shapes
/// - x: `[batch, seq, width]`, s: `[batch, seq, 1]` -> `[batch, seq, width]`
pub fn scale_rows<B: KilnBackend>(x: Tensor<B, 3>, s: Tensor<B, 3>) -> Tensor<B, 3> {
    Tensor::from_primitive(TensorPrimitive::Float(B::kiln_scale_rows(
        x.into_primitive().tensor(),
        s.into_primitive().tensor(),
    )))
}

/// RMSNorm over the last axis, `x / sqrt(mean(x²) + eps) * weight`, as one backend op
/// ([`KilnBackend::kiln_rms_norm`]): a host kernel on the CPU backend, whose backward
/// recomputes each row's scale instead of keeping the normalized activations.
///
/// # Shapes
/// - x: `[..., width]`; weight: `[width]` -> the shape of `x`
pub fn rms_norm<B: KilnBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dims = x.dims();
    let width = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = B::kiln_rms_norm(
        x.reshape([rows, width]).into_primitive().tensor(),
        weight.into_primitive().tensor(),
        eps,
    );
    Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y)).reshape(dims)
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

/// Causal depthwise convolution (one backend op, [`KilnBackend::kiln_causal_depthwise`]):
/// output `t` sees inputs `t - kernel + 1 ..= t`.
///
/// # Shapes
/// - x: `[batch, seq, channels]`; weight: `[channels, kernel]`, the last tap on the current
///   token -> `[batch, seq, channels]`
pub fn causal_depthwise<B: KilnBackend>(x: Tensor<B, 3>, weight: Tensor<B, 2>) -> Tensor<B, 3> {
    Tensor::from_primitive(TensorPrimitive::Float(B::kiln_causal_depthwise(
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
    )))
}

/// [`causal_depthwise`] in tensor ops, one shifted product per tap: the default of
/// [`KilnBackend::kiln_causal_depthwise`].
pub fn causal_depthwise_tensor_ops<B: Backend>(
    x: Tensor<B, 3>,
    weight: Tensor<B, 2>,
) -> Tensor<B, 3> {
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

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};

    use super::*;

    #[test]
    fn dropout_scales_kept_values_and_passes_its_mask_to_the_gradient() {
        type A = Autodiff<Flex>;
        let device = Default::default();
        let values: Vec<f32> = (0..4000).map(|i| 1.0 + (i % 7) as f32).collect();
        let x = Tensor::<A, 2>::from_data(TensorData::new(values.clone(), [40, 100]), &device)
            .require_grad();
        let y = dropout(x.clone(), 0.25);
        let grads = y.clone().sum().backward();
        let y: Vec<f32> = y.into_data().to_vec().unwrap();
        let g: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
        let scale = 1.0 / 0.75;
        for ((y, g), x) in y.iter().zip(&g).zip(&values) {
            // Each value is dropped (0, gradient 0) or kept (x / keep, gradient 1 / keep).
            assert!(
                (*y == 0.0 && *g == 0.0)
                    || ((y - x * scale).abs() < 1e-5 && (g - scale).abs() < 1e-6),
                "y {y}, grad {g}, x {x}"
            );
        }
        let kept = g.iter().filter(|&&g| g > 0.0).count();
        assert!((2850..3150).contains(&kept), "kept {kept} of 4000");
        // No dropout at probability 0, nor on a backend without autodiff (inference).
        let x = Tensor::<Flex, 1>::from_data(TensorData::new(values.clone(), [4000]), &device);
        assert_eq!(dropout(x.clone(), 0.25).into_data(), x.clone().into_data());
        let xa = Tensor::<A, 1>::from_data(TensorData::new(values, [4000]), &device);
        assert_eq!(dropout(xa.clone(), 0.0).into_data(), xa.into_data());
    }
}
