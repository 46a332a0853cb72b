//! The language-model head every family ends with: the final norm, then either its own
//! projection or the transposed token embedding (tied).

use burn::nn::Linear;
use burn::prelude::*;

use crate::KilnBackend;
use crate::layers::{RmsNorm, TokenEmbedding};

/// Logits of the last layer's output: `norm`, then `head` or, when it is absent, the
/// transposed `embedding` matrix, as one 2-D matmul over all positions (see
/// [`crate::lora::Proj::forward`] for why 2-D).
///
/// # Shapes
/// - x: `[batch, seq, hidden]` -> `[batch, seq, vocab]`
pub fn lm_head<B: KilnBackend>(
    x: Tensor<B, 3>,
    norm: &RmsNorm<B>,
    embedding: &TokenEmbedding<B>,
    head: Option<&Linear<B>>,
) -> Tensor<B, 3> {
    let [b, t, d] = x.dims();
    let x = norm.forward(x).reshape([b * t, d]); // [b*t, d]
    let logits = match head {
        Some(head) => head.forward(x),
        None => x.matmul(embedding.weight.val().transpose()), // [d, vocab]
    };
    let v = logits.dims()[1];
    logits.reshape([b, t, v])
}
