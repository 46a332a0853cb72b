//! Per-row cross-entropy on the host and its gradient ([`crate::ops::cross_entropy`]).

use rayon::prelude::*;

use super::simd::{LANES, exp, max, multiversion};

multiversion! {
    /// `log(sum(exp(row)))`, shifted by the row's maximum.
    fn logsumexp(row: &[f32]) -> f32 {
        let m = max(row);
        if m == f32::NEG_INFINITY {
            return m;
        }
        let mut acc = [0.0f32; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().map(|&x| exp(x - m)).sum();
        for c in chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += exp(x - m);
            }
        }
        m + (acc.iter().sum::<f32>() + tail).ln()
    }
}

multiversion! {
    /// `out = exp(row - lse) · d`: the softmax of a row whose log-sum-exp is `lse`, scaled.
    fn scaled_softmax(row: &[f32], lse: f32, d: f32, out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o = exp(x - lse) * d;
        }
    }
}

/// Checks a target id against the vocabulary, naming the row.
fn target_index(targets: &[i64], row: usize, vocab: usize) -> usize {
    let t = targets[row];
    usize::try_from(t)
        .ok()
        .filter(|&t| t < vocab)
        .unwrap_or_else(|| panic!("target {t} of row {row} is outside the vocabulary of {vocab}"))
}

/// Per-row cross-entropy `logsumexp(logits_r) - logits_r[target_r]` for row-major
/// `logits: [rows, vocab]`; rows are spread over the cores.
pub fn cross_entropy(logits: &[f32], targets: &[i64], vocab: usize) -> Vec<f32> {
    logits
        .par_chunks(vocab)
        .enumerate()
        .map(|(r, row)| logsumexp(row) - row[target_index(targets, r, vocab)])
        .collect()
}

/// The gradient of [`cross_entropy`] with respect to the logits, given the gradient
/// `d_loss` of each row's loss: `(softmax(logits_r) - onehot(target_r)) · d_loss_r`.
pub fn cross_entropy_backward(
    logits: &[f32],
    targets: &[i64],
    d_loss: &[f32],
    vocab: usize,
) -> Vec<f32> {
    let mut grad = vec![0.0f32; logits.len()];
    grad.par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .enumerate()
        .for_each(|(r, (g, row))| {
            let d = d_loss[r];
            scaled_softmax(row, logsumexp(row), d, g);
            g[target_index(targets, r, vocab)] -= d;
        });
    grad
}
