//! Plumbing every operation file shares: primitives as tensors, read-backs to the host, and
//! the autodiff recording of an operation whose backward needs only its two inputs.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::ops::{FloatTensor, IntTensor};

use crate::KilnBackend;

/// Registers each input's gradient (`$values`, in the order of `$parents`) with its node,
/// for the inputs that track one.
macro_rules! register {
    ($backend:ty, $grads:expr, $parents:expr, $values:expr) => {
        for (node, grad) in $parents.into_iter().zip($values) {
            if let Some(node) = node {
                $grads.register::<$backend>(node.id, grad);
            }
        }
    };
}
pub(crate) use register;

/// A float primitive as a tensor.
pub(crate) fn float<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// A float tensor as a primitive.
pub(crate) fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// A 4-axis float primitive's values and dims, on the host.
pub(crate) fn host_float<B: Backend>(p: FloatTensor<B>) -> (Vec<f32>, [usize; 4]) {
    let t = float::<B, 4>(p);
    let dims = t.dims();
    let values = t
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32");
    (values, dims)
}

/// A 4-axis int primitive's values, on the host.
pub(crate) fn host_int<B: Backend>(p: IntTensor<B>) -> Vec<i64> {
    Tensor::<B, 4, Int>::from_primitive(p)
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("converted to i64")
}

/// An operation of two float inputs whose backward needs only those inputs (and a
/// constant the value carries, such as RMSNorm's epsilon): recorded by [`record_binary`].
pub(crate) trait BinaryOp: Copy + std::fmt::Debug + Send + Sync + 'static {
    /// The forward pass on backend `B`.
    fn forward<B: KilnBackend>(self, a: FloatTensor<B>, b: FloatTensor<B>) -> FloatTensor<B>;

    /// The gradients of both inputs given the output's gradient.
    fn backward<B: KilnBackend>(
        self,
        a: FloatTensor<B>,
        b: FloatTensor<B>,
        d_out: FloatTensor<B>,
    ) -> [FloatTensor<B>; 2];
}

/// Declares `$name`, the [`BinaryOp`] of the two [`KilnBackend`] methods `$forward` and
/// `$backward` (which take no constant).
macro_rules! binary_op {
    ($(#[$meta:meta])* $name:ident, $forward:ident, $backward:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy)]
        pub(crate) struct $name;

        impl $crate::tensor::BinaryOp for $name {
            fn forward<B: $crate::KilnBackend>(
                self,
                a: burn::tensor::ops::FloatTensor<B>,
                b: burn::tensor::ops::FloatTensor<B>,
            ) -> burn::tensor::ops::FloatTensor<B> {
                B::$forward(a, b)
            }

            fn backward<B: $crate::KilnBackend>(
                self,
                a: burn::tensor::ops::FloatTensor<B>,
                b: burn::tensor::ops::FloatTensor<B>,
                d_out: burn::tensor::ops::FloatTensor<B>,
            ) -> [burn::tensor::ops::FloatTensor<B>; 2] {
                B::$backward(a, b, d_out)
            }
        }
    };
}
pub(crate) use binary_op;

/// `op` on an autodiff backend: the inner backend's forward, and a backward that keeps both
/// inputs.
pub(crate) fn record_binary<B: KilnBackend, C: CheckpointStrategy, O: BinaryOp>(
    op: O,
    a: FloatTensor<Autodiff<B, C>>,
    b: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let output = op.forward::<B>(a.primitive.clone(), b.primitive.clone());
    match BinaryBackward(op)
        .prepare::<C>([a.node, b.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((a.primitive, b.primitive), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// The backward of a [`BinaryOp`].
#[derive(Debug)]
struct BinaryBackward<O>(O);

impl<B: KilnBackend, O: BinaryOp> Backward<B, 2> for BinaryBackward<O> {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<B>(&ops.node);
        let (a, b) = ops.state;
        register!(B, grads, ops.parents, self.0.backward::<B>(a, b, d_out));
    }
}

/// Helpers the operations' unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    use burn::prelude::*;

    use crate::KilnAutodiffBackend;

    /// An op's output and the gradients of `sum(out ⊙ up)` for its two inputs.
    pub(crate) fn output_and_grads<A: KilnAutodiffBackend, const D: usize, const E: usize>(
        out: Tensor<A, 3>,
        up: &Tensor<A, 3>,
        x: &Tensor<A, D>,
        w: &Tensor<A, E>,
    ) -> (TensorData, TensorData, TensorData) {
        let grads = (out.clone() * up.clone()).sum().backward();
        (
            out.into_data(),
            x.grad(&grads).expect("dx").into_data(),
            w.grad(&grads).expect("dw").into_data(),
        )
    }

    /// Asserts that a kiln op's output and input gradients equal the tensor-op reference's.
    pub(crate) fn assert_outputs_match(
        kiln: (TensorData, TensorData, TensorData),
        plain: (TensorData, TensorData, TensorData),
    ) {
        let tol = burn::tensor::Tolerance::<f32>::absolute(1e-4);
        kiln.0.assert_approx_eq::<f32>(&plain.0, tol);
        kiln.1.assert_approx_eq::<f32>(&plain.1, tol);
        kiln.2.assert_approx_eq::<f32>(&plain.2, tol);
    }
}
