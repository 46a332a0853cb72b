//! `x ⊙ s` with one scale per row (MoA's routing weight of a path's output, its energy
//! gate). On Flex a host kernel: there the broadcast product walks the elements one by one
//! when `s` is a view (a column of routing weights).

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;

use crate::KilnBackend;
use crate::backends::flex::{AsF32, f32_or, flex_like};
use crate::host;
use crate::tensor::{binary_op, float, prim};

/// `x * s` with one scale per row, as one backend op ([`KilnBackend::kiln_scale_rows`]).
///
/// # Shapes
/// - x: `[batch, seq, width]`, s: `[batch, seq, 1]` -> `[batch, seq, width]`
pub fn scale_rows<B: KilnBackend>(x: Tensor<B, 3>, s: Tensor<B, 3>) -> Tensor<B, 3> {
    float(B::kiln_scale_rows(prim(x), prim(s)))
}

/// The reference in tensor ops: a broadcast product.
pub fn reference<B: Backend>(x: FloatTensor<B>, s: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mul(x, s)
}

/// The reference backward in tensor ops: `d ⊙ s`, and each row's `d · x`.
pub fn reference_backward<B: Backend>(
    x: FloatTensor<B>,
    s: FloatTensor<B>,
    d: FloatTensor<B>,
) -> [FloatTensor<B>; 2] {
    let ds = float::<B, 3>(B::float_mul(d.clone(), x)).sum_dim(2);
    [B::float_mul(d, s), prim(ds)]
}

binary_op!(
    /// The operation as autodiff records it.
    ScaleRows,
    kiln_scale_rows,
    kiln_scale_rows_backward
);

/// Flex: the host kernel for f32, the reference otherwise.
pub(crate) fn flex(x: FlexTensor, s: FlexTensor) -> FlexTensor {
    f32_or(
        [x, s],
        |[x, s]| flex_like(x, host::scale_rows(x.as_f32(), s.as_f32())),
        |[x, s]| reference::<Flex>(x, s),
    )
}

/// Flex's backward: the host kernel for f32, the reference otherwise.
pub(crate) fn flex_backward(x: FlexTensor, s: FlexTensor, d: FlexTensor) -> [FlexTensor; 2] {
    f32_or(
        [x, s, d],
        |[x, s, d]| {
            let (dx, ds) = host::scale_rows_backward(x.as_f32(), s.as_f32(), d.as_f32());
            [flex_like(x, dx), flex_like(s, ds)]
        },
        |[x, s, d]| reference_backward::<Flex>(x, s, d),
    )
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex, NdArray};

    use super::*;
    use crate::KilnAutodiffBackend;

    #[test]
    fn scale_rows_and_its_backward_match_a_broadcast_product() {
        scale_rows_matches::<Autodiff<Flex>>();
        scale_rows_matches::<Autodiff<NdArray>>();
    }

    /// [`crate::ops::scale_rows`] against `x * s` differentiated by Burn, with `s` a column
    /// view of routing weights `[batch, seq, 3]` (as MoA passes it), over more rows than one
    /// task of the host kernel and a width that is not a multiple of the vector width.
    fn scale_rows_matches<A: KilnAutodiffBackend>() {
        let device = Default::default();
        let (b, t, d) = (3, 700, 21);
        let data = |seed: f32, shape: [usize; 3]| {
            let n = shape.iter().product::<usize>();
            let v: Vec<f32> = (0..n).map(|i| ((i as f32) * seed).sin()).collect();
            Tensor::<A, 3>::from_data(TensorData::new(v, shape), &device)
        };
        let upstream = data(0.37, [b, t, d]);
        let run = |kiln: bool| {
            let x = data(0.11, [b, t, d]).require_grad();
            let w = data(0.23, [b, t, 3]).require_grad();
            let s = w.clone().narrow(2, 1, 1);
            let out = if kiln {
                scale_rows(x.clone(), s)
            } else {
                x.clone() * s
            };
            let grads = (out.clone() * upstream.clone()).sum().backward();
            let grad = |x: &Tensor<A, 3>| x.grad(&grads).expect("gradient").into_data();
            (out.into_data(), grad(&x), grad(&w))
        };
        let (kiln, plain) = (run(true), run(false));
        let tol = burn::tensor::Tolerance::<f32>::absolute(1e-5);
        kiln.0.assert_approx_eq::<f32>(&plain.0, tol);
        kiln.1.assert_approx_eq::<f32>(&plain.1, tol);
        kiln.2.assert_approx_eq::<f32>(&plain.2, tol);
    }
}
