//! Per-row cross-entropy `-log softmax(logits_r)[target_r]`, fused: on an autodiff backend
//! the backward keeps the logits and the targets, never the `[rows, vocab]`
//! log-probabilities, and on Flex both passes are host kernels
//! ([`crate::host::cross_entropy`]).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::ops::{FloatTensor, IntTensor};

use crate::KilnBackend;
use crate::backends::flex::flex_f32;
use crate::host;
use crate::tensor::{float, prim};

/// The reference in tensor ops.
pub fn reference<B: Backend>(logits: FloatTensor<B>, targets: IntTensor<B>) -> FloatTensor<B> {
    let logits = float::<B, 2>(logits);
    let rows = logits.dims()[0];
    let targets = Tensor::<B, 1, Int>::from_primitive(targets).reshape([rows, 1]);
    prim(
        log_softmax(logits, 1)
            .gather(1, targets)
            .reshape([rows])
            .neg(),
    )
}

/// The reference backward in tensor ops.
pub fn reference_backward<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    d_loss: FloatTensor<B>,
) -> FloatTensor<B> {
    let logits = float::<B, 2>(logits);
    let [rows, vocab] = logits.dims();
    let onehot = Tensor::<B, 1, Int>::from_primitive(targets)
        .one_hot::<2>(vocab)
        .float();
    let d_loss = float::<B, 1>(d_loss).reshape([rows, 1]);
    prim((softmax(logits, 1) - onehot) * d_loss)
}

/// The backward on an autodiff backend; the targets are constants.
#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: KilnBackend> Backward<B, 1> for CrossEntropyBackward {
    type State = (FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, targets) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |d_loss| {
            B::kiln_cross_entropy_backward(logits, targets, d_loss)
        });
    }
}

/// The operation on an autodiff backend.
pub(crate) fn autodiff<B: KilnBackend, C: CheckpointStrategy>(
    logits: FloatTensor<Autodiff<B, C>>,
    targets: IntTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let output = B::kiln_cross_entropy(logits.primitive.clone(), targets.clone());
    match CrossEntropyBackward
        .prepare::<C>([logits.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((logits.primitive, targets), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// The ids of an int Flex tensor.
fn host_ids(ids: FlexTensor) -> Vec<i64> {
    ids.into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("converted to i64")
}

/// Flex: the host kernel for f32, the reference otherwise.
pub(crate) fn flex(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
    let logits = logits.to_contiguous();
    let [rows, vocab] = [logits.layout().shape()[0], logits.layout().shape()[1]];
    match logits.as_slice::<f32>() {
        Some(values) => flex_f32(
            host::cross_entropy(values, &host_ids(targets), vocab),
            [rows],
        ),
        None => reference::<burn::backend::Flex>(logits, targets),
    }
}

/// Flex's backward: the host kernel for f32, the reference otherwise.
pub(crate) fn flex_backward(
    logits: FlexTensor,
    targets: FlexTensor,
    d_loss: FlexTensor,
) -> FlexTensor {
    let (logits, d) = (logits.to_contiguous(), d_loss.to_contiguous());
    let [rows, vocab] = [logits.layout().shape()[0], logits.layout().shape()[1]];
    match (logits.as_slice::<f32>(), d.as_slice::<f32>()) {
        (Some(values), Some(d)) => flex_f32(
            host::cross_entropy_backward(values, &host_ids(targets), d, vocab),
            [rows, vocab],
        ),
        _ => reference_backward::<burn::backend::Flex>(logits, targets, d_loss),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex, NdArray};
    use burn::tensor::activation::log_softmax;

    use super::*;
    use crate::KilnAutodiffBackend;

    #[test]
    fn fused_cross_entropy_and_its_backward_match_log_softmax_and_gather() {
        cross_entropy_matches_log_softmax::<Autodiff<Flex>>();
        cross_entropy_matches_log_softmax::<Autodiff<NdArray>>();
    }

    #[test]
    #[should_panic(expected = "target 50 of row 2 is outside the vocabulary of 37")]
    fn a_target_outside_the_vocabulary_names_its_row() {
        let device = Default::default();
        let logits = Tensor::<Flex, 2>::zeros([3, 37], &device);
        let targets =
            Tensor::<Flex, 1, Int>::from_data(TensorData::new(vec![1i64, 2, 50], [3]), &device);
        Flex::kiln_cross_entropy(logits.into_primitive().tensor(), targets.into_primitive());
    }

    /// [`KilnBackend::kiln_cross_entropy`] and its backward against `-log_softmax` gathered
    /// at the targets, with each row's loss weighted (as a mask does).
    fn cross_entropy_matches_log_softmax<A: KilnAutodiffBackend>() {
        let device = Default::default();
        // A vocabulary that is not a multiple of the vector width, and large logits.
        let (rows, vocab) = (9, 37);
        let values: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i as f32) * 0.71).sin() * 30.0)
            .collect();
        let ids: Vec<i64> = (0..rows as i64).map(|r| (r * 5) % vocab as i64).collect();
        let weights: Vec<f32> = (0..rows)
            .map(|r| if r % 4 == 3 { 0.0 } else { 1.0 + r as f32 })
            .collect();
        let weights = Tensor::<A, 1>::from_data(TensorData::new(weights, [rows]), &device);
        let targets =
            || Tensor::<A, 1, Int>::from_data(TensorData::new(ids.clone(), [rows]), &device);
        let run = |kiln: bool| {
            let logits =
                Tensor::<A, 2>::from_data(TensorData::new(values.clone(), [rows, vocab]), &device)
                    .require_grad();
            let nll = if kiln {
                float::<A, 1>(A::kiln_cross_entropy(
                    logits.clone().into_primitive().tensor(),
                    targets().into_primitive(),
                ))
            } else {
                log_softmax(logits.clone(), 1)
                    .gather(1, targets().reshape([rows, 1]))
                    .reshape([rows])
                    .neg()
            };
            let grads = (nll.clone() * weights.clone()).sum().backward();
            (
                nll.into_data(),
                logits.grad(&grads).expect("gradient").into_data(),
            )
        };
        let (kiln, reference) = (run(true), run(false));
        let tol = burn::tensor::Tolerance::<f32>::absolute(1e-4);
        kiln.0.assert_approx_eq::<f32>(&reference.0, tol);
        kiln.1.assert_approx_eq::<f32>(&reference.1, tol);
    }
}
