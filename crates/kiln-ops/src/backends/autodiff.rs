//! [`KilnBackend`] on `Autodiff<B>`: each differentiable operation runs the inner backend's
//! forward and records its own backward (in the operation's file), so the graph holds
//! neither attention scores, log-probabilities nor dequantized weights. The backward passes
//! themselves (`kiln_*_backward`) are never called on the autodiff backend; they keep the
//! reference defaults.

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::Shape;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{FloatTensor, IntTensor};

use crate::KilnBackend;
use crate::nf4::Nf4Tensor;
use crate::ops::causal_depthwise::CausalDepthwise;
use crate::ops::rms_norm::RmsNorm;
use crate::ops::scale_rows::ScaleRows;
use crate::ops::swiglu::Swiglu;
use crate::ops::{attention, chunk_attention, cross_entropy, nf4_linear, rope};
use crate::tensor::record_binary;

impl<B: KilnBackend, C: CheckpointStrategy> KilnBackend for Autodiff<B, C> {
    fn kiln_chunk_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        picks: Option<IntTensor<Self>>,
        chunk: usize,
        scale: f64,
    ) -> FloatTensor<Self> {
        chunk_attention::autodiff::<B, C>(q, k, v, picks, chunk, scale)
    }

    fn kiln_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        scale: f64,
        causal: bool,
    ) -> FloatTensor<Self> {
        attention::autodiff::<B, C>(q, k, v, bias, scale, causal)
    }

    fn kiln_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        cross_entropy::autodiff::<B, C>(logits, targets)
    }

    fn kiln_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        record_binary::<B, C, _>(Swiglu, gate, up)
    }

    fn kiln_scale_rows(x: FloatTensor<Self>, s: FloatTensor<Self>) -> FloatTensor<Self> {
        record_binary::<B, C, _>(ScaleRows, x, s)
    }

    fn kiln_dropout_mask(shape: Shape, keep: f64, device: &Self::Device) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::kiln_dropout_mask(shape, keep, device))
    }

    fn kiln_causal_depthwise(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        record_binary::<B, C, _>(CausalDepthwise, x, w)
    }

    fn kiln_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        record_binary::<B, C, _>(RmsNorm(eps), x, w)
    }

    fn kiln_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        rope::autodiff::<B, C>(x, cos, sin)
    }

    fn nf4_linear(x: FloatTensor<Self>, w: &Arc<Nf4Tensor>) -> FloatTensor<Self> {
        nf4_linear::autodiff::<B, C>(x, w)
    }
}
