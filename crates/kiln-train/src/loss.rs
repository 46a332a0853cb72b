//! The language-model loss shared by every family: masked cross-entropy.

use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use kiln_data::Batch;
use kiln_models::KilnBackend;

/// Summed negative log-likelihood over the masked targets of a batch, with the backend's
/// fused cross-entropy ([`KilnBackend::kiln_cross_entropy`]: no `[rows, vocab]`
/// log-probabilities are kept for the backward pass).
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`
/// - returns `[1]` (the sum) and `[batch * seq]` (per-position losses, 0 where masked)
pub fn masked_nll<B: KilnBackend>(
    logits: Tensor<B, 3>,
    batch: &Batch,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    masked_nll_rows(logits, &batch.targets, &batch.mask, device)
}

/// [`masked_nll`] of the logits of some of a batch's positions, given their targets and
/// mask (row-major over `[batch, seq]`, as in [`Batch`]).
///
/// # Shapes
/// - logits: `[b, t, vocab]` with `b * t == targets.len() == mask.len()`
/// - returns `[1]` (the sum) and `[b * t]` (per-position losses, 0 where masked)
pub fn masked_nll_rows<B: KilnBackend>(
    logits: Tensor<B, 3>,
    targets: &[u32],
    mask: &[f32],
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [b, t, v] = logits.dims();
    let targets: Vec<i64> = targets.iter().map(|&x| i64::from(x)).collect();
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [b * t]), device);
    let mask = Tensor::<B, 1>::from_data(TensorData::new(mask.to_vec(), [b * t]), device);
    let nll = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::kiln_cross_entropy(
        logits.reshape([b * t, v]).into_primitive().tensor(),
        targets.into_primitive(),
    ))); // [b*t]
    let per_token = nll.mul(mask);
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
