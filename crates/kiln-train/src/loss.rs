//! The language-model loss shared by every family: masked cross-entropy.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use kiln_data::Batch;

/// Summed negative log-likelihood over the masked targets of a batch.
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`
/// - returns `[1]` (the sum) and `[batch * seq]` (per-position losses, 0 where masked)
pub fn masked_nll<B: Backend>(
    logits: Tensor<B, 3>,
    batch: &Batch,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [b, t, v] = logits.dims();
    let logp = log_softmax(logits.reshape([b * t, v]), 1); // [b*t, v]
    let targets: Vec<i64> = batch.targets.iter().map(|&x| i64::from(x)).collect();
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [b * t, 1]), device);
    let mask = Tensor::<B, 1>::from_data(TensorData::new(batch.mask.clone(), [b * t]), device);
    let picked = logp.gather(1, targets).reshape([b * t]); // [b*t]
    let per_token = picked.neg().mul(mask);
    (per_token.clone().sum(), per_token)
}

/// The input ids of a batch as a tensor.
///
/// # Shapes
/// - returns `[batch, seq]`
pub fn input_tensor<B: Backend>(batch: &Batch, device: &B::Device) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = batch.inputs.iter().map(|&x| i64::from(x)).collect();
    Tensor::from_data(
        TensorData::new(ids, [batch.batch_size, batch.window]),
        device,
    )
}
