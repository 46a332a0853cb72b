//! SwiGLU's gate `silu(gate) ⊙ up`, fused: on an autodiff backend the backward keeps only
//! `gate` and `up` (not `sigmoid(gate)` and the intermediate products), and on Flex it is
//! one vectorized pass on every core ([`crate::host::swiglu`]).

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;

use crate::KilnBackend;
use crate::backends::flex::{AsF32, f32_or, flex_like};
use crate::host;
use crate::tensor::{binary_op, float, prim};

/// SwiGLU's gate `silu(gate) * up` as one backend op ([`KilnBackend::kiln_swiglu`]).
///
/// # Shapes
/// - gate, up: any shape, the same -> the same
pub fn swiglu<B: KilnBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    float(B::kiln_swiglu(prim(gate), prim(up)))
}

/// The reference in tensor ops (of any rank).
pub fn reference<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let s = B::sigmoid(gate.clone());
    B::float_mul(B::float_mul(gate, s), up)
}

/// The reference backward in tensor ops: with `s = sigmoid(gate)`, `d_up = d ⊙ gate ⊙ s`
/// and `d_gate = d ⊙ up ⊙ s ⊙ (1 + gate ⊙ (1 - s))`.
pub fn reference_backward<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    d: FloatTensor<B>,
) -> [FloatTensor<B>; 2] {
    let s = B::sigmoid(gate.clone());
    let d_s = B::float_mul(d, s.clone());
    let d_up = B::float_mul(d_s.clone(), gate.clone());
    let one_minus_s = B::float_add_scalar(B::float_neg(s), 1.0.into());
    let slope = B::float_add_scalar(B::float_mul(gate, one_minus_s), 1.0.into());
    let d_gate = B::float_mul(B::float_mul(d_s, up), slope);
    [d_gate, d_up]
}

binary_op!(
    /// The operation as autodiff records it.
    Swiglu,
    kiln_swiglu,
    kiln_swiglu_backward
);

/// Flex: the host kernel for f32, the reference otherwise.
pub(crate) fn flex(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
    f32_or(
        [gate, up],
        |[g, u]| flex_like(g, host::swiglu(g.as_f32(), u.as_f32())),
        |[g, u]| reference::<Flex>(g, u),
    )
}

/// Flex's backward: the host kernel for f32, the reference otherwise.
pub(crate) fn flex_backward(gate: FlexTensor, up: FlexTensor, d: FlexTensor) -> [FlexTensor; 2] {
    f32_or(
        [gate, up, d],
        |[g, u, d]| {
            let (dg, du) = host::swiglu_backward(g.as_f32(), u.as_f32(), d.as_f32());
            [flex_like(g, dg), flex_like(g, du)]
        },
        |[g, u, d]| reference_backward::<Flex>(g, u, d),
    )
}
