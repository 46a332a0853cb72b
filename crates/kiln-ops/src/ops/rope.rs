//! Rotary position embedding with rotate-half pairing (Qwen2's, not Burn's interleaved
//! `RotaryEncoding`) and constant `cos`/`sin` tables. It is linear in `x`, so its backward
//! is its transpose, computed from the tables alone: the autodiff graph keeps nothing of
//! `x`. On Flex both directions are one host kernel ([`crate::host::rope`]).

use burn::backend::Autodiff;
use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;

use crate::KilnBackend;
use crate::backends::flex::{AsF32, f32_or, flex_like};
use crate::host;
use crate::tensor::{float, prim};

/// The reference in tensor ops, or with `inverse` its transpose (the backward).
pub fn reference<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    inverse: bool,
) -> FloatTensor<B> {
    let x = float::<B, 4>(x);
    let [_, t, _, d] = x.dims();
    let cos = float::<B, 2>(cos).reshape([1, t, 1, d]);
    let sin = float::<B, 2>(sin).reshape([1, t, 1, d]);
    let half = d / 2;
    let rotated = |y: Tensor<B, 4>| {
        let (y1, y2) = (y.clone().narrow(3, 0, half), y.narrow(3, half, half));
        if inverse {
            Tensor::cat(vec![y2, y1.neg()], 3)
        } else {
            Tensor::cat(vec![y2.neg(), y1], 3)
        }
    };
    let out = if inverse {
        x.clone() * cos + rotated(x * sin)
    } else {
        x.clone() * cos + rotated(x) * sin
    };
    prim(out)
}

/// The backward: the transpose, from the tables alone.
#[derive(Debug)]
struct RopeBackward;

impl<B: KilnBackend> Backward<B, 1> for RopeBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, sin) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |d| {
            B::kiln_rope_backward(d, cos, sin)
        });
    }
}

/// The operation on an autodiff backend: the tables are constants (positions), never
/// differentiated.
pub(crate) fn autodiff<B: KilnBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    cos: FloatTensor<Autodiff<B, C>>,
    sin: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let (cos, sin) = (cos.primitive, sin.primitive);
    let output = B::kiln_rope(x.primitive, cos.clone(), sin.clone());
    match RopeBackward
        .prepare::<C>([x.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((cos, sin), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// Flex (either direction): the host kernel for f32, the reference otherwise.
pub(crate) fn flex(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, inverse: bool) -> FlexTensor {
    f32_or(
        [x, cos, sin],
        |[x, c, s]| {
            let shape = x.layout().shape();
            let dims = [shape[1], shape[2], shape[3]];
            flex_like(
                x,
                host::rope(x.as_f32(), c.as_f32(), s.as_f32(), dims, inverse),
            )
        },
        |[x, c, s]| reference::<Flex>(x, c, s, inverse),
    )
}
