//! Chunk-memory attention (ConvGPT-v2's memory): each query attends over the key chunks it
//! picked and, causally, its own chunk, read in place; the backward recomputes the
//! probabilities. Work and memory are proportional to the keys read, never to
//! `queries x keys`.
//!
//! Every backend computes it on the host ([`crate::host::chunk_attention`]): the picks make
//! each query's key set irregular, which tensor ops express only as a dense masked
//! attention. [`reference`] is that dense masked attention, the slow twin the tests and
//! `kiln doctor` compare against.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::ops::{FloatTensor, IntTensor};

use crate::KilnBackend;
use crate::host::chunk_attention::{self, ChunkDims, ChunkInputs};
use crate::tensor::{host_float, host_int, register};

/// [`KilnBackend::kiln_chunk_attention`] computed on the host: the default of every
/// backend.
pub(crate) fn on_host<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    picks: Option<IntTensor<B>>,
    chunk: usize,
    scale: f64,
) -> FloatTensor<B> {
    let device = B::float_device(&q);
    let h = HostChunk::read::<B>(q, k, v, picks, chunk);
    let out = chunk_attention::forward(h.inputs(scale));
    B::float_from_data(TensorData::new(out, h.shape), &device)
}

/// The reference in tensor ops: dense attention of every query over every key, with a mask
/// that keeps a query's picked chunks and its own chunk up to itself. Memory grows with
/// `seq²`: for tests and `kiln doctor`, never for training.
///
/// # Shapes
/// - q, k, v: `[batch, seq, heads, width]`; picks: `[batch, heads, seq, n]` (negative: none)
///   -> `[batch, seq, heads, width]`
pub fn reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    picks: &[i64],
    chunk: usize,
    scale: f64,
) -> Tensor<B, 4> {
    let [batch, seq, heads, _] = q.dims();
    let n = picks.len() / (batch * heads * seq).max(1);
    let mut keep = vec![f32::NEG_INFINITY; batch * heads * seq * seq];
    for p in 0..batch * heads {
        for i in 0..seq {
            let mine = &picks[(p * seq + i) * n..][..n];
            let own = i / chunk;
            for key in 0..seq {
                let c = (key / chunk) as i64;
                if mine.contains(&c) || (key / chunk == own && key <= i) {
                    keep[(p * seq + i) * seq + key] = 0.0;
                }
            }
        }
    }
    let keep =
        Tensor::<B, 4>::from_data(TensorData::new(keep, [batch, heads, seq, seq]), &q.device());
    let heads_first = |x: Tensor<B, 4>| x.swap_dims(1, 2);
    let s = heads_first(q)
        .matmul(heads_first(k).swap_dims(2, 3))
        .mul_scalar(scale)
        + keep;
    softmax(s, 3).matmul(heads_first(v)).swap_dims(1, 2)
}

/// The operation on an autodiff backend: the picks are constants (the selection is not
/// differentiated).
pub(crate) fn autodiff<B: KilnBackend, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    picks: Option<IntTensor<Autodiff<B, C>>>,
    chunk: usize,
    scale: f64,
) -> FloatTensor<Autodiff<B, C>> {
    let output = B::kiln_chunk_attention(
        q.primitive.clone(),
        k.primitive.clone(),
        v.primitive.clone(),
        picks.clone(),
        chunk,
        scale,
    );
    match ChunkAttentionBackward
        .prepare::<C>([q.node, k.node, v.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            (q.primitive, k.primitive, v.primitive, picks, chunk, scale),
            output,
        ),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// The inputs of a chunk attention, read back to the host.
struct HostChunk {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    picks: Vec<i64>,
    shape: [usize; 4],
    dims: ChunkDims,
}

impl HostChunk {
    fn read<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        picks: Option<IntTensor<B>>,
        chunk: usize,
    ) -> Self {
        let (q, shape) = host_float::<B>(q);
        let (k, _) = host_float::<B>(k);
        let (v, _) = host_float::<B>(v);
        let picks = picks.map(host_int::<B>).unwrap_or_default();
        let [batch, seq, heads, width] = shape;
        let dims = ChunkDims {
            batch,
            seq,
            heads,
            width,
            picks: picks.len() / (batch * heads * seq).max(1),
            chunk,
        };
        Self {
            q,
            k,
            v,
            picks,
            shape,
            dims,
        }
    }

    fn inputs(&self, scale: f64) -> ChunkInputs<'_> {
        ChunkInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            picks: &self.picks,
            dims: self.dims,
            scale: scale as f32,
        }
    }
}

/// The backward of [`KilnBackend::kiln_chunk_attention`], recomputing the probabilities.
#[derive(Debug)]
struct ChunkAttentionBackward;

/// What the chunk-attention backward keeps: q, k, v, the picks, the chunk and the scale.
type ChunkState<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    Option<IntTensor<B>>,
    usize,
    f64,
);

impl<B: Backend> Backward<B, 3> for ChunkAttentionBackward {
    type State = ChunkState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<B>(&ops.node);
        let (q, k, v, picks, chunk, scale) = ops.state;
        let device = B::float_device(&q);
        let (d_out, _) = host_float::<B>(d_out);
        let h = HostChunk::read::<B>(q, k, v, picks, chunk);
        let values = chunk_attention::backward(h.inputs(scale), &d_out)
            .map(|grad| B::float_from_data(TensorData::new(grad, h.shape), &device));
        register!(B, grads, ops.parents, values);
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};

    use super::*;
    use crate::tensor::{float, prim};

    type B = Autodiff<Flex>;

    /// [`KilnBackend::kiln_chunk_attention`] and its backward against [`reference`], dense
    /// attention over the same keys, for irregular picks: the sequence ends inside a chunk,
    /// the head width is one register block plus a remainder, and some picks are none
    /// (negative) or repeat none.
    #[test]
    fn chunk_attention_and_its_backward_match_masked_dense_attention() {
        let device = Default::default();
        let (batch, seq, heads, e, chunk, n) = (2, 23, 3, 20, 5, 2);
        let data = |seed: f32| {
            let len = batch * seq * heads * e;
            TensorData::new(
                (0..len)
                    .map(|i| ((i as f32) * seed).sin())
                    .collect::<Vec<_>>(),
                [batch, seq, heads, e],
            )
        };
        // Query i of pair p picks earlier chunks by a formula, or none.
        let mut picks = Vec::new();
        for p in 0..batch * heads {
            for i in 0..seq {
                let own = i / chunk;
                let mut mine: Vec<i64> = Vec::new();
                for j in 0..n {
                    let c = (p + 2 * i + 3 * j) % (own + 1);
                    mine.push(if c < own && !mine.contains(&(c as i64)) {
                        c as i64
                    } else {
                        -1
                    });
                }
                picks.extend(mine);
            }
        }
        assert!(picks.iter().any(|&c| c < 0) && picks.iter().any(|&c| c > 0));
        let upstream = Tensor::<B, 4>::from_data(data(0.41), &device);
        let run = |kiln: bool| {
            let leaf = |seed| Tensor::<B, 4>::from_data(data(seed), &device).require_grad();
            let (q, k, v) = (leaf(0.13), leaf(0.29), leaf(0.37));
            let scale = 0.5;
            let out = if kiln {
                let ids = Tensor::<B, 4, Int>::from_data(
                    TensorData::new(picks.clone(), [batch, heads, seq, n]),
                    &device,
                );
                float::<B, 4>(B::kiln_chunk_attention(
                    prim(q.clone()),
                    prim(k.clone()),
                    prim(v.clone()),
                    Some(ids.into_primitive()),
                    chunk,
                    scale,
                ))
            } else {
                reference(q.clone(), k.clone(), v.clone(), &picks, chunk, scale)
            };
            let grads = (out.clone() * upstream.clone()).sum().backward();
            let g = |x: &Tensor<B, 4>| x.grad(&grads).expect("gradient").into_data();
            (out.into_data(), g(&q), g(&k), g(&v))
        };
        let (kiln, dense) = (run(true), run(false));
        let tol = burn::tensor::Tolerance::<f32>::absolute(1e-5);
        kiln.0.assert_approx_eq::<f32>(&dense.0, tol);
        kiln.1.assert_approx_eq::<f32>(&dense.1, tol);
        kiln.2.assert_approx_eq::<f32>(&dense.2, tol);
        kiln.3.assert_approx_eq::<f32>(&dense.3, tol);
    }
}
