//! RMSNorm over the last axis, fused: the backward recomputes each row's scale instead of
//! keeping the normalized activations, and on Flex both passes are host kernels
//! ([`crate::host::rms_norm`]).

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;

use crate::KilnBackend;
use crate::backends::flex::{AsF32, f32_or, flex_like};
use crate::host;
use crate::tensor::{BinaryOp, float, prim};

/// RMSNorm over the last axis, `x / sqrt(mean(x²) + eps) * weight`, as one backend op
/// ([`KilnBackend::kiln_rms_norm`]).
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
    let y = B::kiln_rms_norm(prim(x.reshape([rows, width])), prim(weight), eps);
    float::<B, 2>(y).reshape(dims)
}

/// `1 / sqrt(mean(x²) + eps)` of each row of `x: [rows, width]`, as `[rows, 1]`.
fn inverse_rms<B: Backend>(x: Tensor<B, 2>, eps: f64) -> Tensor<B, 2> {
    // A division, not `recip()`: burn-ndarray's reciprocal is an approximation with a
    // relative error near 3e-4 (`kiln doctor --backend ndarray` showed it against Flex).
    let rms = x.square().mean_dim(1).add_scalar(eps).sqrt();
    rms.ones_like().div(rms)
}

/// The reference in tensor ops, for `x: [rows, width]`.
pub fn reference<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let (x, w) = (float::<B, 2>(x), float::<B, 1>(w));
    let r = inverse_rms(x.clone(), eps);
    prim(x * r * w.unsqueeze::<2>())
}

/// The reference backward in tensor ops: with `g = d ⊙ w` and `r` the inverse RMS of each
/// row, `dx = r g - x r³ rowsum(g ⊙ x) / width` and `dw = colsum(d ⊙ x r)`.
pub fn reference_backward<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    eps: f64,
    d_out: FloatTensor<B>,
) -> [FloatTensor<B>; 2] {
    let (x, w, d) = (float::<B, 2>(x), float::<B, 1>(w), float::<B, 2>(d_out));
    let width = x.dims()[1];
    let r = inverse_rms(x.clone(), eps);
    let g = d.clone() * w.unsqueeze::<2>();
    let c = (g.clone() * x.clone()).sum_dim(1) * r.clone().powi_scalar(3) / width as f64;
    let dx = g * r.clone() - x.clone() * c;
    let dw = (d * x * r).sum_dim(0).reshape([width]);
    [prim(dx), prim(dw)]
}

/// The operation as autodiff records it, with its epsilon.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNorm(pub(crate) f64);

impl BinaryOp for RmsNorm {
    fn forward<B: KilnBackend>(self, a: FloatTensor<B>, b: FloatTensor<B>) -> FloatTensor<B> {
        B::kiln_rms_norm(a, b, self.0)
    }

    fn backward<B: KilnBackend>(
        self,
        a: FloatTensor<B>,
        b: FloatTensor<B>,
        d_out: FloatTensor<B>,
    ) -> [FloatTensor<B>; 2] {
        B::kiln_rms_norm_backward(a, b, self.0, d_out)
    }
}

/// Flex: the host kernel for f32, the reference otherwise.
pub(crate) fn flex(x: FlexTensor, w: FlexTensor, eps: f64) -> FlexTensor {
    f32_or(
        [x, w],
        |[x, w]| flex_like(x, host::rms_norm(x.as_f32(), w.as_f32(), eps as f32)),
        |[x, w]| reference::<Flex>(x, w, eps),
    )
}

/// Flex's backward: the host kernel for f32, the reference otherwise.
pub(crate) fn flex_backward(
    x: FlexTensor,
    w: FlexTensor,
    eps: f64,
    d: FlexTensor,
) -> [FlexTensor; 2] {
    f32_or(
        [x, w, d],
        |[x, w, d]| {
            let (dx, dw) = host::rms_norm_backward(x.as_f32(), w.as_f32(), d.as_f32(), eps as f32);
            [flex_like(x, dx), flex_like(w, dw)]
        },
        |[x, w, d]| reference_backward::<Flex>(x, w, eps, d),
    )
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex, NdArray};

    use super::*;
    use crate::KilnAutodiffBackend;
    use crate::tensor::testing::{assert_outputs_match, output_and_grads};

    #[test]
    fn rms_norm_op_and_its_backward_match_plain_tensor_ops() {
        rms_norm_matches::<Autodiff<Flex>>();
        rms_norm_matches::<Autodiff<NdArray>>();
    }

    /// [`crate::ops::rms_norm`] (the backend op) against `x / sqrt(mean(x²) + eps) * w`
    /// differentiated by Burn, over rows of a width that is not a multiple of the vector
    /// width, with rows of very different scales.
    fn rms_norm_matches<A: KilnAutodiffBackend>() {
        let device = Default::default();
        let (shape, width, eps) = ([3, 5, 37], 37, 1e-6);
        let n = 3 * 5 * width;
        let values: Vec<f32> = (0..n)
            .map(|i| ((i as f32) * 0.37).sin() * (1 + (i / width) % 4 * 10) as f32)
            .collect();
        let w_values: Vec<f32> = (0..width)
            .map(|i| 1.0 + ((i as f32) * 0.53).cos())
            .collect();
        let up_values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.19).sin()).collect();
        let up = Tensor::<A, 3>::from_data(TensorData::new(up_values, shape), &device);
        let run = |kiln: bool| {
            let x = Tensor::<A, 3>::from_data(TensorData::new(values.clone(), shape), &device)
                .require_grad();
            let w = Tensor::<A, 1>::from_data(TensorData::new(w_values.clone(), [width]), &device)
                .require_grad();
            let out = if kiln {
                rms_norm(x.clone(), w.clone(), eps)
            } else {
                let rms = x.clone().square().mean_dim(2).add_scalar(eps).sqrt();
                x.clone().div(rms).mul(w.clone().unsqueeze::<3>())
            };
            output_and_grads(out, &up, &x, &w)
        };
        assert_outputs_match(run(true), run(false));
    }
}
