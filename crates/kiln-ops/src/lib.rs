//! kiln-ops: the operations kiln's models need beyond Burn's tensor API, on every backend.
//!
//! [`KilnBackend`] is Burn's [`Backend`] plus these operations. Each has a file of its own
//! in [`ops`] that holds everything about it: the public tensor-level function the models
//! call, its tensor-op reference (the "slow twin", which every backend without a faster
//! path runs and every test compares against), its backward, how an autodiff backend
//! records it, and the hook that hands it to a host kernel on the CPU backend ([`host`]).
//! The backends are thin files in [`backends`]: each overrides only the trait methods it has
//! a faster or a different path for, one line per method.
//!
//! The operations fall in three groups:
//! - **Memory-efficient under autodiff**: attention ([`ops::attention`]) and chunk attention
//!   ([`ops::chunk_attention`]) keep only their inputs and recompute probabilities in the
//!   backward pass; the NF4 linear layer ([`ops::nf4_linear`]) dequantizes its frozen weight
//!   again in the backward pass instead of keeping it; cross-entropy
//!   ([`ops::cross_entropy`]) keeps the logits, never the log-probabilities.
//! - **Fused**, which the CPU backend runs slowly as tensor ops: SwiGLU's product, RMSNorm,
//!   RoPE with constant tables, the causal depthwise convolution, scaling rows by a column.
//! - **Host-drawn**: dropout masks from a counter hash, the same on both CPU backends.
//!
//! [`conformance`] is the one table of these operations (forward and every gradient) that
//! both `cargo test` (fast path against reference) and `kiln doctor` (a backend against
//! the CPU) run.
//!
//! *Invariant:* kiln-ops knows nothing of models, recipes or training; it depends on Burn,
//! gemm and rayon only.

// The host kernels call gemm through raw pointers and pick vector code at run time (every
// kernel expands `multiversion!`, which calls a `#[target_feature]` function once the CPU is
// known to have the feature); each `unsafe` block states why it holds.
#[allow(unsafe_code)]
pub mod host;

pub mod backends;
pub mod conformance;
pub mod nf4;
pub mod ops;
pub mod parallel;
mod tensor;

use std::sync::Arc;

use burn::tensor::Shape;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor};

pub use nf4::Nf4Tensor;
pub use ops::attention::ATTENTION_BLOCK;
pub use ops::causal_depthwise::causal_depthwise;
pub use ops::dropout::dropout;
pub use ops::nf4_linear::nf4_weight_on_device;
pub use ops::rms_norm::rms_norm;
pub use ops::scale_rows::scale_rows;
pub use ops::swiglu::swiglu;

/// A Burn backend with kiln's extra operations. Every method has a default: the
/// operation's tensor-op reference in [`ops`], correct on any backend. A backend overrides
/// a method where it has a faster path (Flex: host kernels) or needs a different one
/// (autodiff: a recorded backward; CUDA: NF4 codes expanded on the device).
pub trait KilnBackend: Backend {
    /// `softmax(q kᵀ · scale + bias) v` for `q: [b, h, t, dk]`, `k: [b, kvh, s, dk]`, `v:
    /// [b, kvh, s, dv]` (query head `i` reads key/value head `i / (h / kvh)`, grouped-query
    /// attention without copying the keys) and an additive `bias: [1 or b, 1 or h, 1 or t,
    /// s]` (0 where visible, -inf or a large negative number where not); returns `[b, h, t,
    /// dv]`. With `causal`, the queries are the last `t` of the `s` positions and query `r`
    /// sees keys `0..=r + s - t` only (`s >= t`). Computed in blocks of
    /// [`ATTENTION_BLOCK`] queries ([`ops::attention`]).
    fn kiln_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        scale: f64,
        causal: bool,
    ) -> FloatTensor<Self> {
        ops::attention::reference::<Self>(q, k, v, bias, scale, causal)
    }

    /// The gradients `(dq, dk, dv)` of [`Self::kiln_attention`] given the gradient of its
    /// output, recomputing the probabilities block by block (bias and scale are constants).
    fn kiln_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        scale_causal: (f64, bool),
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        ops::attention::reference_backward::<Self>(q, k, v, bias, scale_causal, d_out)
    }

    /// Per-row cross-entropy `-log softmax(logits_r)[target_r]` for `logits: [rows,
    /// vocab]` and int `targets: [rows]`; returns `[rows]`. Panics on a target outside the
    /// vocabulary ([`ops::cross_entropy`]).
    fn kiln_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        ops::cross_entropy::reference::<Self>(logits, targets)
    }

    /// The gradient of [`Self::kiln_cross_entropy`] with respect to the logits, given the
    /// gradient of each row's loss `d_loss: [rows]`:
    /// `(softmax(logits_r) - onehot(target_r)) · d_loss_r`.
    fn kiln_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        d_loss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        ops::cross_entropy::reference_backward::<Self>(logits, targets, d_loss)
    }

    /// Chunk-memory attention ([`ops::chunk_attention`]): for `q, k, v: [batch, seq,
    /// heads, width]` and `picks: [batch, heads, seq, n]`, the earlier chunks of `chunk`
    /// positions each query reads (negative: none; `None`: no picks), every query attends
    /// over its picked chunks' keys and, causally, its own chunk's:
    /// `out_i = sum_j softmax_j(scale * q_i . k_j) v_j`, `[batch, seq, heads, width]`. The
    /// picks are constants. The default computes on the host without building key lists.
    fn kiln_chunk_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        picks: Option<IntTensor<Self>>,
        chunk: usize,
        scale: f64,
    ) -> FloatTensor<Self> {
        ops::chunk_attention::on_host::<Self>(q, k, v, picks, chunk, scale)
    }

    /// SwiGLU's gate `silu(gate) ⊙ up` for `gate` and `up` of one shape
    /// ([`ops::swiglu`]).
    fn kiln_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        ops::swiglu::reference::<Self>(gate, up)
    }

    /// The gradients `[d_gate, d_up]` of [`Self::kiln_swiglu`] given its output's gradient.
    fn kiln_swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        ops::swiglu::reference_backward::<Self>(gate, up, d_out)
    }

    /// A dropout mask of `shape` (f32): each value is `1 / keep` with probability `keep`
    /// and 0 otherwise, drawn from the backend's generator, so `seed` replays it. A
    /// constant, never differentiated ([`ops::dropout`]). The default samples a Bernoulli
    /// tensor.
    fn kiln_dropout_mask(shape: Shape, keep: f64, device: &Self::Device) -> FloatTensor<Self> {
        ops::dropout::reference::<Self>(shape, keep, device)
    }

    /// `x ⊙ s` for `x: [batch, seq, width]` and one scale per row, `s: [batch, seq, 1]`
    /// (MoA's routing weight of a path's output; [`ops::scale_rows`]).
    fn kiln_scale_rows(x: FloatTensor<Self>, s: FloatTensor<Self>) -> FloatTensor<Self> {
        ops::scale_rows::reference::<Self>(x, s)
    }

    /// The gradients `[dx, ds]` of [`Self::kiln_scale_rows`] given its output's gradient:
    /// `d_out ⊙ s`, and each row's `d_out · x`.
    fn kiln_scale_rows_backward(
        x: FloatTensor<Self>,
        s: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        ops::scale_rows::reference_backward::<Self>(x, s, d_out)
    }

    /// Rotary embedding `x ⊙ cos + rotate_half(x) ⊙ sin` of `x: [batch, seq, heads, dim]`
    /// with constant tables `cos, sin: [seq, dim]`, where `rotate_half([x1, x2]) = [-x2,
    /// x1]` over the two halves of `dim` ([`ops::rope`]).
    fn kiln_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        ops::rope::reference::<Self>(x, cos, sin, false)
    }

    /// The backward of [`Self::kiln_rope`] (its transpose, since it is linear in `x`):
    /// `d ⊙ cos + rotate_halfᵀ(d ⊙ sin)` with `rotate_halfᵀ([y1, y2]) = [y2, -y1]`.
    fn kiln_rope_backward(
        d_out: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        ops::rope::reference::<Self>(d_out, cos, sin, true)
    }

    /// Causal depthwise convolution of `x: [batch, seq, channels]` with `w: [channels,
    /// kernel]`, the last tap on the current token ([`ops::causal_depthwise`]).
    fn kiln_causal_depthwise(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        ops::causal_depthwise::reference_primitive::<Self>(x, w)
    }

    /// The gradients `[dx, dw]` of [`Self::kiln_causal_depthwise`] given its output's
    /// gradient.
    fn kiln_causal_depthwise_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        ops::causal_depthwise::reference_backward::<Self>(x, w, d_out)
    }

    /// RMSNorm `x / sqrt(mean(x²) + eps) ⊙ w` over the rows of `x: [rows, width]`, with
    /// the scale `w: [width]` ([`ops::rms_norm`]).
    fn kiln_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        ops::rms_norm::reference::<Self>(x, w, eps)
    }

    /// The gradients `[dx, dw]` of [`Self::kiln_rms_norm`] given its output's gradient.
    fn kiln_rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f64,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        ops::rms_norm::reference_backward::<Self>(x, w, eps, d_out)
    }

    /// `x · dequant(w)ᵀ` for `x: [n, in]` and an NF4 weight of Hugging Face shape
    /// `[out, in]`; returns `[n, out]` ([`ops::nf4_linear`]).
    fn nf4_linear(x: FloatTensor<Self>, w: &Arc<Nf4Tensor>) -> FloatTensor<Self> {
        ops::nf4_linear::reference::<Self>(x, w)
    }

    /// The dequantized NF4 weight `[out, in]` on `device`, as [`Self::nf4_linear`] and its
    /// backward use it. The default dequantizes on the host and uploads the f32 weight
    /// (nothing to upload on a CPU backend); an accelerator keeps the codes on the device
    /// and expands them there ([`nf4_weight_on_device`]).
    fn nf4_weight(w: &Arc<Nf4Tensor>, device: &Self::Device) -> FloatTensor<Self> {
        ops::nf4_linear::dequantized::<Self>(w, device)
    }
}

/// An autodiff backend whose inner backend also has kiln's operations: what the trainer
/// needs.
pub trait KilnAutodiffBackend: AutodiffBackend<InnerBackend: KilnBackend> + KilnBackend {}

impl<B> KilnAutodiffBackend for B
where
    B: AutodiffBackend + KilnBackend,
    B::InnerBackend: KilnBackend,
{
}
