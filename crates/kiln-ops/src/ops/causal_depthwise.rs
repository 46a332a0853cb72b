//! Causal depthwise convolution: output `t` sees inputs `t - kernel + 1 ..= t`, one weight
//! per channel and tap (MoA's local path and HyperFFN, ConvGPT's 1D branch). On Flex both
//! passes are host kernels ([`crate::host::causal_depthwise`]).

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;

use crate::KilnBackend;
use crate::backends::flex::{AsF32, f32_or, flex_like};
use crate::host;
use crate::tensor::{binary_op, float, prim};

/// Causal depthwise convolution as one backend op ([`KilnBackend::kiln_causal_depthwise`]).
///
/// # Shapes
/// - x: `[batch, seq, channels]`; weight: `[channels, kernel]`, the last tap on the current
///   token -> `[batch, seq, channels]`
pub fn causal_depthwise<B: KilnBackend>(x: Tensor<B, 3>, weight: Tensor<B, 2>) -> Tensor<B, 3> {
    float(B::kiln_causal_depthwise(prim(x), prim(weight)))
}

/// The reference in tensor ops, one shifted product per tap.
pub fn reference<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 2>) -> Tensor<B, 3> {
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

/// [`reference`] on primitives, as the trait's default takes them.
pub fn reference_primitive<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>) -> FloatTensor<B> {
    prim(reference(float::<B, 3>(x), float::<B, 2>(w)))
}

/// The reference backward in tensor ops: `dx` is the convolution of `d_out` read backwards
/// in time (an anti-causal one), and tap `j` of `dw` sums `d_out ⊙ x` shifted by
/// `kernel - 1 - j` positions.
pub fn reference_backward<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    d_out: FloatTensor<B>,
) -> [FloatTensor<B>; 2] {
    let (x, w, d) = (float::<B, 3>(x), float::<B, 2>(w), float::<B, 3>(d_out));
    let [b, t, c] = x.dims();
    let k = w.dims()[1];
    let mut dx = x.zeros_like();
    let mut taps = Vec::with_capacity(k);
    for j in 0..k {
        let shift = k - 1 - j; // out[s + shift] reads x[s] through tap j
        if shift >= t {
            taps.push(Tensor::<B, 2>::zeros([c, 1], &x.device()));
            continue;
        }
        let d_part = d.clone().narrow(1, shift, t - shift); // [b, t - shift, c]
        let x_part = x.clone().narrow(1, 0, t - shift);
        let tap = w.clone().narrow(1, j, 1).reshape([1, 1, c]);
        let contribution = d_part.clone() * tap;
        dx = dx
            + Tensor::cat(
                vec![contribution, Tensor::zeros([b, shift, c], &x.device())],
                1,
            );
        taps.push((d_part * x_part).sum_dim(0).sum_dim(1).reshape([c, 1]));
    }
    [prim(dx), prim(Tensor::cat(taps, 1))]
}

binary_op!(
    /// The operation as autodiff records it.
    CausalDepthwise,
    kiln_causal_depthwise,
    kiln_causal_depthwise_backward
);

/// `[seq, channels, kernel]` of contiguous operands `x: [batch, seq, channels]` and
/// `w: [channels, kernel]`.
fn dims(x: &FlexTensor, w: &FlexTensor) -> [usize; 3] {
    let shape = x.layout().shape();
    [shape[1], shape[2], w.layout().shape()[1]]
}

/// Flex: the host kernel for f32, the reference otherwise.
pub(crate) fn flex(x: FlexTensor, w: FlexTensor) -> FlexTensor {
    f32_or(
        [x, w],
        |[x, w]| {
            flex_like(
                x,
                host::causal_depthwise(x.as_f32(), w.as_f32(), dims(x, w)),
            )
        },
        |[x, w]| reference_primitive::<Flex>(x, w),
    )
}

/// Flex's backward: the host kernel for f32, the reference otherwise.
pub(crate) fn flex_backward(x: FlexTensor, w: FlexTensor, d: FlexTensor) -> [FlexTensor; 2] {
    f32_or(
        [x, w, d],
        |[x, w, d]| {
            let (dx, dw) =
                host::causal_depthwise_backward(x.as_f32(), w.as_f32(), d.as_f32(), dims(x, w));
            [flex_like(x, dx), flex_like(w, dw)]
        },
        |[x, w, d]| reference_backward::<Flex>(x, w, d),
    )
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex, NdArray};

    use super::*;
    use crate::KilnAutodiffBackend;
    use crate::tensor::testing::{assert_outputs_match, output_and_grads};

    #[test]
    fn causal_depthwise_op_and_its_backward_match_shifted_tensor_ops() {
        for (seq, kernel) in [(9, 4), (3, 5), (17, 1)] {
            causal_depthwise_matches::<Autodiff<Flex>>(seq, kernel);
            causal_depthwise_matches::<Autodiff<NdArray>>(seq, kernel);
        }
    }

    /// [`crate::ops::causal_depthwise`] (the backend op) against the same convolution in
    /// tensor ops differentiated by Burn, for `batch 3 x seq x 21 channels`.
    fn causal_depthwise_matches<A: KilnAutodiffBackend>(seq: usize, kernel: usize) {
        let device = Default::default();
        let channels = 21; // not a multiple of the vector width
        let x_values: Vec<f32> = (0..3 * seq * channels)
            .map(|i| ((i as f32) * 0.37).sin())
            .collect();
        let w_values: Vec<f32> = (0..channels * kernel)
            .map(|i| ((i as f32) * 0.53).cos())
            .collect();
        let up_values: Vec<f32> = (0..3 * seq * channels)
            .map(|i| ((i as f32) * 0.19).sin())
            .collect();
        let up = Tensor::<A, 3>::from_data(TensorData::new(up_values, [3, seq, channels]), &device);
        let run = |kiln: bool| {
            let x = Tensor::<A, 3>::from_data(
                TensorData::new(x_values.clone(), [3, seq, channels]),
                &device,
            )
            .require_grad();
            let w = Tensor::<A, 2>::from_data(
                TensorData::new(w_values.clone(), [channels, kernel]),
                &device,
            )
            .require_grad();
            let out = if kiln {
                causal_depthwise(x.clone(), w.clone())
            } else {
                reference(x.clone(), w.clone())
            };
            output_and_grads(out, &up, &x, &w)
        };
        assert_outputs_match(run(true), run(false));
    }
}
