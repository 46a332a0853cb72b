//! Backend extensions kiln's models need beyond Burn's tensor API.
//!
//! [`KilnBackend`] adds one operation: a linear layer on an NF4 base weight,
//! `y = x · dequant(W)ᵀ`. Its forward dequantizes `W` for the one matmul and drops it; on an
//! autodiff backend its backward dequantizes `W` again to compute `dx = dy · dequant(W)` and
//! records nothing else, so a QLoRA step never holds more than one layer's f32 weight at a
//! time. Expressed with Burn's matmul instead, the autodiff graph would keep every layer's
//! dequantized weight alive from the forward to the backward pass, and a QLoRA step would
//! need as much memory as a LoRA step on an f32 base. The base is frozen, so no gradient for
//! `W` is ever computed.
//!
//! Every backend kiln runs on implements the trait: the CPU backends and CUDA use the
//! default (dequantize on the host, one upload per use); [`Autodiff`] wraps it with the
//! re-dequantizing backward. [`KilnAutodiffBackend`] names an autodiff backend whose inner
//! backend is also a [`KilnBackend`], which is what the trainer needs.

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::TensorData;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;

use crate::nf4::Nf4Tensor;

/// A Burn backend with kiln's extra operations.
pub trait KilnBackend: Backend {
    /// `x · dequant(w)ᵀ` for `x: [n, in]` and an NF4 weight of Hugging Face shape
    /// `[out, in]`; returns `[n, out]`.
    fn nf4_linear(x: FloatTensor<Self>, w: &Arc<Nf4Tensor>) -> FloatTensor<Self> {
        let device = Self::float_device(&x);
        let weight = dequantized::<Self>(w, &device);
        Self::float_matmul(x, Self::float_transpose(weight))
    }
}

/// An autodiff backend whose inner backend also has kiln's operations.
pub trait KilnAutodiffBackend: AutodiffBackend<InnerBackend: KilnBackend> + KilnBackend {}

impl<B> KilnAutodiffBackend for B
where
    B: AutodiffBackend + KilnBackend,
    B::InnerBackend: KilnBackend,
{
}

/// The dequantized weight `[out, in]` on `device`.
fn dequantized<B: Backend>(w: &Nf4Tensor, device: &B::Device) -> FloatTensor<B> {
    let [out, inp] = [w.shape[0], w.shape[1]];
    B::float_from_data(TensorData::new(w.dequantize(), [out, inp]), device)
}

impl KilnBackend for burn::backend::Flex {}
impl KilnBackend for burn::backend::NdArray {}
#[cfg(feature = "cuda")]
impl KilnBackend for burn::backend::Cuda {}

/// The backward of [`KilnBackend::nf4_linear`]: `dx = dy · dequant(W)`.
#[derive(Debug)]
struct Nf4LinearBackward;

impl<B: Backend> Backward<B, 1> for Nf4LinearBackward {
    type State = Arc<Nf4Tensor>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            let weight = dequantized::<B>(&w, &B::float_device(&grad));
            B::float_matmul(grad, weight)
        });
    }
}

impl<B: KilnBackend, C: CheckpointStrategy> KilnBackend for Autodiff<B, C> {
    fn nf4_linear(x: FloatTensor<Self>, w: &Arc<Nf4Tensor>) -> FloatTensor<Self> {
        let output = B::nf4_linear(x.primitive, w);
        match Nf4LinearBackward
            .prepare::<C>([x.node])
            .compute_bound()
            .stateful()
        {
            // The state is the shared quantized weight: no copy, no f32 tensor.
            OpsKind::Tracked(prep) => prep.finish(Arc::clone(w), output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::prelude::*;
    use burn::tensor::TensorPrimitive;

    use super::*;

    type B = Autodiff<Flex>;

    fn nf4_linear(x: Tensor<B, 2>, w: &Arc<Nf4Tensor>) -> Tensor<B, 2> {
        let y = B::nf4_linear(x.into_primitive().tensor(), w);
        Tensor::from_primitive(TensorPrimitive::Float(y))
    }

    #[test]
    fn forward_and_input_gradient_match_a_dense_matmul() {
        let device = Default::default();
        let (n, inp, out) = (5, 96, 40);
        let values: Vec<f32> = (0..out * inp).map(|i| ((i as f32) * 0.71).sin()).collect();
        let w = Arc::new(Nf4Tensor::quantize(&values, &[out, inp]));
        let dense = Tensor::<B, 2>::from_data(TensorData::new(w.dequantize(), [out, inp]), &device);
        let xs: Vec<f32> = (0..n * inp).map(|i| ((i as f32) * 0.13).cos()).collect();
        let x = || Tensor::<B, 2>::from_data(TensorData::new(xs.clone(), [n, inp]), &device);
        let upstream: Vec<f32> = (0..n * out).map(|i| (i % 7) as f32 - 3.0).collect();
        let up = Tensor::<B, 2>::from_data(TensorData::new(upstream, [n, out]), &device);

        let x1 = x().require_grad();
        let y1 = nf4_linear(x1.clone(), &w);
        let g1 = (y1.clone() * up.clone()).sum().backward();
        let x2 = x().require_grad();
        let y2 = x2.clone().matmul(dense.transpose());
        let g2 = (y2.clone() * up).sum().backward();

        y1.into_data()
            .assert_approx_eq::<f32>(&y2.into_data(), burn::tensor::Tolerance::default());
        x1.grad(&g1)
            .expect("input gradient")
            .into_data()
            .assert_approx_eq::<f32>(
                &x2.grad(&g2).expect("input gradient").into_data(),
                burn::tensor::Tolerance::default(),
            );
    }
}
