//! Backend extensions kiln's models need beyond Burn's tensor API.
//!
//! [`KilnBackend`] adds two operations.
//!
//! **Attention** `softmax(q kᵀ · scale + bias) v`, memory-efficient under autodiff: Burn's
//! graph would keep the `[queries, keys]` scores and probabilities of every layer (and
//! head) from the forward to the backward pass, which at 4096 tokens is gigabytes per layer.
//! Here the forward keeps only q, k, v (which the graph holds anyway) and the backward
//! recomputes the probabilities block by block of queries (FlashAttention's recomputation,
//! in plain tensor ops): `dV = Pᵀ dO`, `dS = P ⊙ (dO vᵀ − rowsum(dO ⊙ O))`, `dQ = dS k ·
//! scale`, `dK = dSᵀ q · scale`. The forward runs block by block too, so no step ever holds
//! more than one block's scores.
//!
//! **NF4 linear**: a linear layer on an NF4 base weight,
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
use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{ElementConversion, Int, TensorData, TensorPrimitive, s};

use crate::chunk_attention::{self, ChunkDims, ChunkInputs};
use crate::cpu;
use crate::nf4::{self, NF4_LEVELS, Nf4Tensor};

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

/// Query rows per attention block: bounds the scores held at once to
/// `batch · kv_heads · ATTENTION_BLOCK · keys` values.
pub const ATTENTION_BLOCK: usize = 512;

/// A Burn backend with kiln's extra operations.
pub trait KilnBackend: Backend {
    /// `softmax(q kᵀ · scale + bias) v` for `q: [b, h, t, dk]`, `k: [b, kvh, s, dk]`, `v:
    /// [b, kvh, s, dv]` (query head `i` reads key/value head `i / (h / kvh)`, grouped-query
    /// attention without copying the keys) and an additive `bias: [1 or b, 1 or h, 1 or t,
    /// s]` (0 where visible, -inf or a large negative number where not); returns `[b, h, t,
    /// dv]`. With `causal`, the queries are the last `t` of the `s` positions and query `r`
    /// sees keys `0..=r + s - t` only (`s >= t`). Computed in blocks of
    /// [`ATTENTION_BLOCK`] queries.
    fn kiln_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        scale: f64,
        causal: bool,
    ) -> FloatTensor<Self> {
        blocked_attention::<Self>(q, k, v, bias, scale, causal)
    }

    /// The gradients `(dq, dk, dv)` of [`Self::kiln_attention`] given the gradient of its
    /// output, recomputing the probabilities block by block (bias and scale are constants).
    fn kiln_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        (scale, causal): (f64, bool),
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        blocked_attention_backward::<Self>(q, k, v, bias, (scale, causal), d_out)
    }

    /// Per-row cross-entropy `-log softmax(logits_r)[target_r]` for `logits: [rows,
    /// vocab]` and int `targets: [rows]`; returns `[rows]`. Panics on a target outside the
    /// vocabulary.
    fn kiln_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        tensor_ops_cross_entropy::<Self>(logits, targets)
    }

    /// The gradient of [`Self::kiln_cross_entropy`] with respect to the logits, given the
    /// gradient of each row's loss `d_loss: [rows]`:
    /// `(softmax(logits_r) - onehot(target_r)) · d_loss_r`.
    fn kiln_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        d_loss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        tensor_ops_cross_entropy_backward::<Self>(logits, targets, d_loss)
    }

    /// Chunk-memory attention (see [`crate::chunk_attention`]): for `q, k, v: [batch, seq,
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
        let device = Self::float_device(&q);
        let h = HostChunk::read::<Self>(q, k, v, picks, chunk);
        let out = chunk_attention::forward(h.inputs(scale));
        Self::float_from_data(TensorData::new(out, h.shape), &device)
    }

    /// SwiGLU's gate `silu(gate) ⊙ up` for `gate` and `up` of one shape.
    fn kiln_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        tensor_ops_swiglu::<Self>(gate, up)
    }

    /// A dropout mask of `shape` (f32): each value is `1 / keep` with probability `keep`
    /// and 0 otherwise, drawn from the backend's generator, so `seed` replays it. A
    /// constant, never differentiated. The default samples a Bernoulli tensor.
    fn kiln_dropout_mask(shape: Shape, keep: f64, device: &Self::Device) -> FloatTensor<Self> {
        let mask = Self::float_random(
            shape,
            burn::tensor::Distribution::Bernoulli(keep),
            device,
            burn::tensor::FloatDType::F32,
        );
        Self::float_mul_scalar(mask, (1.0 / keep).into())
    }

    /// The gradients `[d_gate, d_up]` of [`Self::kiln_swiglu`] given its output's gradient.
    fn kiln_swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        tensor_ops_swiglu_backward::<Self>(gate, up, d_out)
    }

    /// `x ⊙ s` for `x: [batch, seq, width]` and one scale per row, `s: [batch, seq, 1]`
    /// (MoA's routing weight of a path's output).
    fn kiln_scale_rows(x: FloatTensor<Self>, s: FloatTensor<Self>) -> FloatTensor<Self> {
        tensor_ops_scale_rows::<Self>(x, s)
    }

    /// The gradients `[dx, ds]` of [`Self::kiln_scale_rows`] given its output's gradient:
    /// `d_out ⊙ s`, and each row's `d_out · x`.
    fn kiln_scale_rows_backward(
        x: FloatTensor<Self>,
        s: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        tensor_ops_scale_rows_backward::<Self>(x, s, d_out)
    }

    /// Rotary embedding `x ⊙ cos + rotate_half(x) ⊙ sin` of `x: [batch, seq, heads, dim]`
    /// with constant tables `cos, sin: [seq, dim]`, where `rotate_half([x1, x2]) = [-x2,
    /// x1]` over the two halves of `dim`.
    fn kiln_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        tensor_ops_rope::<Self>(x, cos, sin, false)
    }

    /// The backward of [`Self::kiln_rope`] (its transpose, since it is linear in `x`):
    /// `d ⊙ cos + rotate_halfᵀ(d ⊙ sin)` with `rotate_halfᵀ([y1, y2]) = [y2, -y1]`.
    fn kiln_rope_backward(
        d_out: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        tensor_ops_rope::<Self>(d_out, cos, sin, true)
    }

    /// Causal depthwise convolution of `x: [batch, seq, channels]` with `w: [channels,
    /// kernel]`, the last tap on the current token (see [`crate::ops::causal_depthwise`]).
    fn kiln_causal_depthwise(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::ops::causal_depthwise_tensor_ops(float::<Self, 3>(x), float::<Self, 2>(w))
            .into_primitive()
            .tensor()
    }

    /// The gradients `[dx, dw]` of [`Self::kiln_causal_depthwise`] given its output's
    /// gradient.
    fn kiln_causal_depthwise_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        tensor_ops_causal_depthwise_backward::<Self>(x, w, d_out)
    }

    /// RMSNorm `x / sqrt(mean(x²) + eps) ⊙ w` over the rows of `x: [rows, width]`, with
    /// the scale `w: [width]`.
    fn kiln_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        tensor_ops_rms_norm::<Self>(x, w, eps)
    }

    /// The gradients `[dx, dw]` of [`Self::kiln_rms_norm`] given its output's gradient.
    fn kiln_rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f64,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        tensor_ops_rms_norm_backward::<Self>(x, w, eps, d_out)
    }

    /// `x · dequant(w)ᵀ` for `x: [n, in]` and an NF4 weight of Hugging Face shape
    /// `[out, in]`; returns `[n, out]`.
    fn nf4_linear(x: FloatTensor<Self>, w: &Arc<Nf4Tensor>) -> FloatTensor<Self> {
        let device = Self::float_device(&x);
        let weight = Self::nf4_weight(w, &device);
        Self::float_matmul(x, Self::float_transpose(weight))
    }

    /// The dequantized NF4 weight `[out, in]` on `device`, as [`Self::nf4_linear`] and its
    /// backward use it. The default dequantizes on the host and uploads the f32 weight
    /// (nothing to upload on a CPU backend); an accelerator keeps the codes on the device
    /// and expands them there ([`nf4_weight_on_device`]).
    fn nf4_weight(w: &Arc<Nf4Tensor>, device: &Self::Device) -> FloatTensor<Self> {
        dequantized::<Self>(w, device)
    }
}

/// What [`nf4_weight_on_device`] keeps on the device: the codes, eight to a 32-bit word
/// (0.5 bytes per weight, as on the host), each block's dequantized absmax, and the levels.
struct Nf4OnDevice<B: Backend> {
    device: B::Device,
    words: Tensor<B, 1, Int>,
    absmax: Tensor<B, 2>,
    levels: Tensor<B, 1>,
}

impl<B: Backend> Nf4OnDevice<B> {
    fn upload(w: &Nf4Tensor, device: &B::Device) -> Self {
        let words = w.code_words();
        let absmax = w.absmax();
        let blocks = absmax.len();
        Self {
            device: device.clone(),
            words: Tensor::from_data(TensorData::new(words.clone(), [words.len()]), device),
            absmax: Tensor::from_data(TensorData::new(absmax, [blocks, 1]), device),
            levels: Tensor::from_data(TensorData::new(NF4_LEVELS.to_vec(), [16]), device),
        }
    }
}

/// The dequantized NF4 weight `[out, in]`, computed on `device` from codes uploaded there
/// once (on first use, kept with the tensor for later uses). The f32 weight exists only
/// for the caller's matmul: a 7B QLoRA base stays at 0.53 bytes per weight on the device.
///
/// Each 32-bit word is split into its eight 4-bit codes by shifts and masks, the codes
/// index the 16 levels, and each block of [`nf4::BLOCK`] values is scaled by its absmax.
pub fn nf4_weight_on_device<B: Backend>(w: &Nf4Tensor, device: &B::Device) -> Tensor<B, 2> {
    let resident = w
        .resident()
        .get_or_insert(|| Nf4OnDevice::<B>::upload(w, device));
    let fresh;
    let r = if resident.device == *device {
        resident.as_ref()
    } else {
        // Another device than the one holding the copy: upload for this use only.
        fresh = Nf4OnDevice::<B>::upload(w, device);
        &fresh
    };
    let blocks = r.absmax.dims()[0];
    let nibbles: Vec<Tensor<B, 1, Int>> = (0..8)
        .map(|k| {
            r.words
                .clone()
                .bitwise_right_shift_scalar((28 - 4 * k).elem())
                .bitwise_and_scalar(15.elem())
        })
        .collect();
    // [words, 8] row-major: word i's k-th code is weight 8i + k.
    let codes = Tensor::stack::<2>(nibbles, 1).reshape([blocks * nf4::BLOCK]);
    let values = r
        .levels
        .clone()
        .select(0, codes)
        .reshape([blocks, nf4::BLOCK])
        * r.absmax.clone();
    let [out, inp] = [w.shape[0], w.shape[1]];
    values
        .reshape([blocks * nf4::BLOCK])
        .slice(0..out * inp)
        .reshape([out, inp])
}

/// An autodiff backend whose inner backend also has kiln's operations.
pub trait KilnAutodiffBackend: AutodiffBackend<InnerBackend: KilnBackend> + KilnBackend {}

impl<B> KilnAutodiffBackend for B
where
    B: AutodiffBackend + KilnBackend,
    B::InnerBackend: KilnBackend,
{
}

/// A 3-D float primitive's values and dims, on the host.
fn host_float<B: Backend>(p: FloatTensor<B>) -> (Vec<f32>, [usize; 4]) {
    let t = float::<B, 4>(p);
    let dims = t.dims();
    let values = t
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32");
    (values, dims)
}

/// An int primitive's values, on the host.
fn host_int<B: Backend>(p: IntTensor<B>) -> Vec<i64> {
    Tensor::<B, 4, burn::tensor::Int>::from_primitive(p)
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("converted to i64")
}

/// A float primitive as a tensor.
fn float<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// The bias of a block of queries, plus the causal mask of those rows when `causal`:
/// `[1 or b, 1 or h, rows or 1, s]`.
fn block_bias<B: Backend>(
    bias: &Option<Tensor<B, 4>>,
    rows: std::ops::Range<usize>,
    (t, s): (usize, usize),
    causal: bool,
    device: &B::Device,
) -> Option<Tensor<B, 4>> {
    let bias = bias.as_ref().map(|b| {
        if b.dims()[2] == 1 {
            b.clone()
        } else {
            b.clone().slice(s![.., .., rows.clone(), ..])
        }
    });
    if !causal {
        return bias;
    }
    let n = rows.len();
    let mut mask = vec![0.0f32; n * s];
    for (i, r) in rows.enumerate() {
        let visible = (r + 1 + s).saturating_sub(t).min(s);
        mask[i * s + visible..(i + 1) * s].fill(f32::NEG_INFINITY);
    }
    let mask = Tensor::<B, 4>::from_data(TensorData::new(mask, [1, 1, n, s]), device);
    Some(match bias {
        Some(b) => b + mask,
        None => mask,
    })
}

/// `softmax(qb kᵀ · scale + bias)` for one block of queries: `[b, h, rows, s]`.
fn probabilities<B: Backend>(
    qb: Tensor<B, 4>,
    kt: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: f64,
) -> Tensor<B, 4> {
    let scores = qb.matmul(kt).mul_scalar(scale);
    let scores = match bias {
        Some(b) => scores + b,
        None => scores,
    };
    softmax(scores, 3)
}

/// Keys or values `[b, kvh, s, d]` repeated for the `h / kvh` query heads of each group:
/// `[b, h, s, d]`.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, heads: usize) -> Tensor<B, 4> {
    let [b, kvh, s, d] = x.dims();
    if kvh == heads {
        return x;
    }
    x.unsqueeze_dim::<5>(2)
        .repeat_dim(2, heads / kvh)
        .reshape([b, heads, s, d])
}

/// The gradient of [`repeat_kv`]: the group's query heads' gradients summed, `[b, kvh, s,
/// d]`.
fn sum_groups<B: Backend>(g: Tensor<B, 4>, kv_heads: usize) -> Tensor<B, 4> {
    let [b, h, s, d] = g.dims();
    if kv_heads == h {
        return g;
    }
    g.reshape([b, kv_heads, h / kv_heads, s, d])
        .sum_dim(2)
        .reshape([b, kv_heads, s, d])
}

/// The backward of [`KilnBackend::kiln_attention`]: recomputes each block's probabilities.
#[derive(Debug)]
struct AttentionBackward;

/// What the attention backward keeps: q, k, v, the bias, the scale and `causal`.
type AttentionState<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    Option<FloatTensor<B>>,
    (f64, bool),
);

impl<B: KilnBackend> Backward<B, 3> for AttentionBackward {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<B>(&ops.node);
        let (q, k, v, bias, scale_causal) = ops.state;
        let values = B::kiln_attention_backward(q, k, v, bias, scale_causal, d_out);
        register!(B, grads, ops.parents, values);
    }
}

/// [`KilnBackend::kiln_cross_entropy`] in tensor ops.
fn tensor_ops_cross_entropy<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
) -> FloatTensor<B> {
    let logits = float::<B, 2>(logits);
    let rows = logits.dims()[0];
    let targets = Tensor::<B, 1, Int>::from_primitive(targets).reshape([rows, 1]);
    log_softmax(logits, 1)
        .gather(1, targets)
        .reshape([rows])
        .neg()
        .into_primitive()
        .tensor()
}

/// [`KilnBackend::kiln_cross_entropy_backward`] in tensor ops.
fn tensor_ops_cross_entropy_backward<B: Backend>(
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
    ((softmax(logits, 1) - onehot) * d_loss)
        .into_primitive()
        .tensor()
}

/// [`KilnBackend::kiln_swiglu`] in tensor ops (of any rank).
fn tensor_ops_swiglu<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let s = B::sigmoid(gate.clone());
    B::float_mul(B::float_mul(gate, s), up)
}

/// [`KilnBackend::kiln_swiglu_backward`] in tensor ops: with `s = sigmoid(gate)`,
/// `d_up = d ⊙ gate ⊙ s` and `d_gate = d ⊙ up ⊙ s ⊙ (1 + gate ⊙ (1 - s))`.
fn tensor_ops_swiglu_backward<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    d: FloatTensor<B>,
) -> [FloatTensor<B>; 2] {
    let s = B::sigmoid(gate.clone());
    let d_s = B::float_mul(d, s.clone());
    let d_up = B::float_mul(d_s.clone(), gate.clone());
    let one_minus_s = B::float_add_scalar(B::float_neg(s), 1.0.into());
    let slope = B::float_add_scalar(B::float_mul(gate, one_minus_s), 1.0.into());
    let d_gate = B::float_mul(B::float_mul(d_s, up), slope);
    [d_gate, d_up]
}

/// [`KilnBackend::kiln_scale_rows`] in tensor ops: a broadcast product.
fn tensor_ops_scale_rows<B: Backend>(x: FloatTensor<B>, s: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mul(x, s)
}

/// [`KilnBackend::kiln_scale_rows_backward`] in tensor ops.
fn tensor_ops_scale_rows_backward<B: Backend>(
    x: FloatTensor<B>,
    s: FloatTensor<B>,
    d: FloatTensor<B>,
) -> [FloatTensor<B>; 2] {
    let ds = float::<B, 3>(B::float_mul(d.clone(), x)).sum_dim(2);
    [B::float_mul(d, s), ds.into_primitive().tensor()]
}

/// [`KilnBackend::kiln_rope`] in tensor ops, or with `inverse` its backward.
fn tensor_ops_rope<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    inverse: bool,
) -> FloatTensor<B> {
    let x = float::<B, 4>(x);
    let [_, t, _, d] = x.dims();
    let cos = float::<B, 2>(cos).reshape([1, t, 1, d]);
    let sin = float::<B, 2>(sin).reshape([1, t, 1, d]);
    let half = d / 2;
    let rotated = |y: Tensor<B, 4>| {
        let (y1, y2) = (y.clone().narrow(3, 0, half), y.narrow(3, half, half));
        if inverse {
            Tensor::cat(vec![y2, y1.neg()], 3)
        } else {
            Tensor::cat(vec![y2.neg(), y1], 3)
        }
    };
    let out = if inverse {
        x.clone() * cos + rotated(x * sin)
    } else {
        x.clone() * cos + rotated(x) * sin
    };
    out.into_primitive().tensor()
}

/// [`KilnBackend::kiln_causal_depthwise_backward`] in tensor ops: `dx` is the
/// convolution of `d_out` read backwards in time (an anti-causal one), and tap `j` of `dw`
/// sums `d_out ⊙ x` shifted by `kernel - 1 - j` positions.
fn tensor_ops_causal_depthwise_backward<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    d_out: FloatTensor<B>,
) -> [FloatTensor<B>; 2] {
    let (x, w, d) = (float::<B, 3>(x), float::<B, 2>(w), float::<B, 3>(d_out));
    let [b, t, c] = x.dims();
    let k = w.dims()[1];
    let mut dx = x.zeros_like();
    let mut taps = Vec::with_capacity(k);
    for j in 0..k {
        let shift = k - 1 - j; // out[s + shift] reads x[s] through tap j
        if shift >= t {
            taps.push(Tensor::<B, 2>::zeros([c, 1], &x.device()));
            continue;
        }
        let d_part = d.clone().narrow(1, shift, t - shift); // [b, t - shift, c]
        let x_part = x.clone().narrow(1, 0, t - shift);
        let tap = w.clone().narrow(1, j, 1).reshape([1, 1, c]);
        let contribution = d_part.clone() * tap;
        dx = dx
            + Tensor::cat(
                vec![contribution, Tensor::zeros([b, shift, c], &x.device())],
                1,
            );
        taps.push((d_part * x_part).sum_dim(0).sum_dim(1).reshape([c, 1]));
    }
    [
        dx.into_primitive().tensor(),
        Tensor::cat(taps, 1).into_primitive().tensor(),
    ]
}

/// `1 / sqrt(mean(x²) + eps)` of each row of `x: [rows, width]`, as `[rows, 1]`.
fn inverse_rms<B: Backend>(x: Tensor<B, 2>, eps: f64) -> Tensor<B, 2> {
    // A division, not `recip()`: burn-ndarray's reciprocal is an approximation with a
    // relative error near 3e-4 (`kiln doctor --backend ndarray` showed it against Flex).
    let rms = x.square().mean_dim(1).add_scalar(eps).sqrt();
    rms.ones_like().div(rms)
}

/// [`KilnBackend::kiln_rms_norm`] in tensor ops.
fn tensor_ops_rms_norm<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    eps: f64,
) -> FloatTensor<B> {
    let (x, w) = (float::<B, 2>(x), float::<B, 1>(w));
    let r = inverse_rms(x.clone(), eps);
    (x * r * w.unsqueeze::<2>()).into_primitive().tensor()
}

/// [`KilnBackend::kiln_rms_norm_backward`] in tensor ops: with `g = d ⊙ w` and `r` the
/// inverse RMS of each row, `dx = r g - x r³ rowsum(g ⊙ x) / width` and
/// `dw = colsum(d ⊙ x r)`.
fn tensor_ops_rms_norm_backward<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    eps: f64,
    d_out: FloatTensor<B>,
) -> [FloatTensor<B>; 2] {
    let (x, w, d) = (float::<B, 2>(x), float::<B, 1>(w), float::<B, 2>(d_out));
    let width = x.dims()[1];
    let r = inverse_rms(x.clone(), eps);
    let g = d.clone() * w.unsqueeze::<2>();
    let c = (g.clone() * x.clone()).sum_dim(1) * r.clone().powi_scalar(3) / width as f64;
    let dx = g * r.clone() - x.clone() * c;
    let dw = (d * x * r).sum_dim(0).reshape([width]);
    [dx.into_primitive().tensor(), dw.into_primitive().tensor()]
}

/// The ids of an int Flex tensor.
fn host_ids(ids: FlexTensor) -> Vec<i64> {
    ids.into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("converted to i64")
}

/// [`KilnBackend::kiln_attention`] in tensor ops, [`ATTENTION_BLOCK`] queries at a time.
fn blocked_attention<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    scale: f64,
    causal: bool,
) -> FloatTensor<B> {
    let q = float::<B, 4>(q);
    let [_, h, t, _] = q.dims();
    let (k, v) = (
        repeat_kv(float::<B, 4>(k), h),
        repeat_kv(float::<B, 4>(v), h),
    );
    let bias = bias.map(float::<B, 4>);
    let s = k.dims()[2];
    let device = q.device();
    let kt = k.swap_dims(2, 3);
    let blocks: Vec<Tensor<B, 4>> = (0..t)
        .step_by(ATTENTION_BLOCK)
        .map(|r0| {
            let rows = r0..(r0 + ATTENTION_BLOCK).min(t);
            let qb = q.clone().slice(s![.., .., rows.clone(), ..]);
            let bias = block_bias(&bias, rows, (t, s), causal, &device);
            probabilities(qb, kt.clone(), bias, scale).matmul(v.clone())
        })
        .collect();
    Tensor::cat(blocks, 2).into_primitive().tensor()
}

/// [`KilnBackend::kiln_attention_backward`] in tensor ops: `dV = Pᵀ dO`,
/// `dS = P ⊙ (dP − rowsum(dP ⊙ P))` with `dP = dO vᵀ`, `dQ = dS k · scale`,
/// `dK = dSᵀ q · scale`, recomputing `P` block by block.
fn blocked_attention_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    (scale, causal): (f64, bool),
    d_out: FloatTensor<B>,
) -> [FloatTensor<B>; 3] {
    let d_out = float::<B, 4>(d_out);
    let q = float::<B, 4>(q);
    let [_, h, t, _] = q.dims();
    let k = float::<B, 4>(k);
    let kv_heads = k.dims()[1];
    let (k, v) = (repeat_kv(k, h), repeat_kv(float::<B, 4>(v), h));
    let bias = bias.map(float::<B, 4>);
    let s = k.dims()[2];
    let device = q.device();
    let kt = k.clone().swap_dims(2, 3);
    let vt = v.clone().swap_dims(2, 3);
    let mut dq_blocks = Vec::new();
    let mut dk = k.zeros_like();
    let mut dv = v.zeros_like();
    for r0 in (0..t).step_by(ATTENTION_BLOCK) {
        let rows = r0..(r0 + ATTENTION_BLOCK).min(t);
        let qb = q.clone().slice(s![.., .., rows.clone(), ..]);
        let dob = d_out.clone().slice(s![.., .., rows.clone(), ..]);
        let bias = block_bias(&bias, rows, (t, s), causal, &device);
        let p = probabilities(qb.clone(), kt.clone(), bias, scale);
        dv = dv + p.clone().swap_dims(2, 3).matmul(dob.clone());
        let dp = dob.matmul(vt.clone());
        // rowsum(dP ⊙ P) equals rowsum(dO ⊙ O) for O = P v.
        let row = (dp.clone() * p.clone()).sum_dim(3);
        let ds = p * (dp - row);
        dq_blocks.push(ds.clone().matmul(k.clone()).mul_scalar(scale));
        dk = dk + ds.swap_dims(2, 3).matmul(qb).mul_scalar(scale);
    }
    let dq = Tensor::cat(dq_blocks, 2);
    let (dk, dv) = (sum_groups(dk, kv_heads), sum_groups(dv, kv_heads));
    [dq, dk, dv].map(|g| g.into_primitive().tensor())
}

/// The dequantized weight `[out, in]` on `device`.
fn dequantized<B: Backend>(w: &Nf4Tensor, device: &B::Device) -> FloatTensor<B> {
    let [out, inp] = [w.shape[0], w.shape[1]];
    B::float_from_data(TensorData::new(w.dequantize(), [out, inp]), device)
}

impl KilnBackend for burn::backend::Flex {
    fn kiln_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        scale: f64,
        causal: bool,
    ) -> FloatTensor<Self> {
        let Some(a) = FlexAttention::read(&q, &k, &v, bias.as_ref(), causal) else {
            return blocked_attention::<Self>(q, k, v, bias, scale, causal);
        };
        let Some(inputs) = a.inputs(scale) else {
            return blocked_attention::<Self>(q, k, v, bias, scale, causal);
        };
        let d = a.dims;
        // [b, t, h, dv], seen as [b, h, t, dv]: the output projection reads it as is.
        flex_f32(cpu::attention(inputs), [d.batch, d.queries, d.heads, d.dv]).transpose(1, 2)
    }

    fn kiln_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        (scale, causal): (f64, bool),
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        let read = FlexAttention::read(&q, &k, &v, bias.as_ref(), causal);
        let kernel = read.as_ref().and_then(|a| {
            let d = a.dims;
            let shape = [d.batch, d.heads, d.queries, d.dv];
            Some((a.inputs(scale)?, strided(&d_out, shape)?))
        });
        let (Some(a), Some((inputs, d_out))) = (&read, kernel) else {
            return blocked_attention_backward::<Self>(q, k, v, bias, (scale, causal), d_out);
        };
        let d = a.dims;
        let (dq, dk, dv) = cpu::attention_backward(inputs, d_out);
        // Gradients in the layouts of the projections they flow back into, seen as the
        // head-major shapes of q, k and v.
        [
            flex_f32(dq, [d.batch, d.queries, d.heads, d.dk]),
            flex_f32(dk, [d.batch, d.keys, d.kv_heads, d.dk]),
            flex_f32(dv, [d.batch, d.keys, d.kv_heads, d.dv]),
        ]
        .map(|g| g.transpose(1, 2))
    }

    fn kiln_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let logits = logits.to_contiguous();
        let [rows, vocab] = [logits.layout().shape()[0], logits.layout().shape()[1]];
        match logits.as_slice::<f32>() {
            Some(values) => flex_f32(
                cpu::cross_entropy(values, &host_ids(targets), vocab),
                [rows],
            ),
            None => tensor_ops_cross_entropy::<Self>(logits, targets),
        }
    }

    fn kiln_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        d_loss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (logits, d) = (logits.to_contiguous(), d_loss.to_contiguous());
        let [rows, vocab] = [logits.layout().shape()[0], logits.layout().shape()[1]];
        match (logits.as_slice::<f32>(), d.as_slice::<f32>()) {
            (Some(values), Some(d)) => flex_f32(
                cpu::cross_entropy_backward(values, &host_ids(targets), d, vocab),
                [rows, vocab],
            ),
            _ => tensor_ops_cross_entropy_backward::<Self>(logits, targets, d_loss),
        }
    }

    fn kiln_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        match (contiguous_f32(&gate), contiguous_f32(&up)) {
            (Some(g), Some(u)) => {
                let out = cpu::swiglu(g.as_f32(), u.as_f32());
                FlexTensor::from_data(TensorData::new(out, g.layout().shape().clone()))
            }
            _ => tensor_ops_swiglu::<Self>(gate, up),
        }
    }

    fn kiln_swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        match (
            contiguous_f32(&gate),
            contiguous_f32(&up),
            contiguous_f32(&d_out),
        ) {
            (Some(g), Some(u), Some(d)) => {
                let (dg, du) = cpu::swiglu_backward(g.as_f32(), u.as_f32(), d.as_f32());
                let shape = g.layout().shape();
                [dg, du].map(|v| FlexTensor::from_data(TensorData::new(v, shape.clone())))
            }
            _ => tensor_ops_swiglu_backward::<Self>(gate, up, d_out),
        }
    }

    /// Burn's Flex samples a Bernoulli value at a time from ChaCha20 on one thread: 44% of
    /// a QLoRA smoke step went to its LoRA dropout masks.
    fn kiln_dropout_mask(shape: Shape, keep: f64, device: &Self::Device) -> FloatTensor<Self> {
        host_dropout_mask::<Self>(shape, keep, device)
    }

    fn kiln_scale_rows(x: FloatTensor<Self>, s: FloatTensor<Self>) -> FloatTensor<Self> {
        match (contiguous_f32(&x), contiguous_f32(&s)) {
            (Some(xc), Some(sc)) => {
                let out = cpu::scale_rows(xc.as_f32(), sc.as_f32());
                FlexTensor::from_data(TensorData::new(out, xc.layout().shape().clone()))
            }
            _ => tensor_ops_scale_rows::<Self>(x, s),
        }
    }

    fn kiln_scale_rows_backward(
        x: FloatTensor<Self>,
        s: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        match (
            contiguous_f32(&x),
            contiguous_f32(&s),
            contiguous_f32(&d_out),
        ) {
            (Some(xc), Some(sc), Some(d)) => {
                let (dx, ds) = cpu::scale_rows_backward(xc.as_f32(), sc.as_f32(), d.as_f32());
                [
                    FlexTensor::from_data(TensorData::new(dx, xc.layout().shape().clone())),
                    FlexTensor::from_data(TensorData::new(ds, sc.layout().shape().clone())),
                ]
            }
            _ => tensor_ops_scale_rows_backward::<Self>(x, s, d_out),
        }
    }

    fn kiln_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        flex_rope(x, cos, sin, false)
    }

    fn kiln_causal_depthwise(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        match (contiguous_f32(&x), contiguous_f32(&w)) {
            (Some(xc), Some(wc)) => {
                let shape = xc.layout().shape().clone();
                let dims = [shape[1], shape[2], wc.layout().shape()[1]];
                let out = cpu::causal_depthwise(xc.as_f32(), wc.as_f32(), dims);
                FlexTensor::from_data(TensorData::new(out, shape))
            }
            _ => crate::ops::causal_depthwise_tensor_ops(float::<Self, 3>(x), float::<Self, 2>(w))
                .into_primitive()
                .tensor(),
        }
    }

    fn kiln_causal_depthwise_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        match (
            contiguous_f32(&x),
            contiguous_f32(&w),
            contiguous_f32(&d_out),
        ) {
            (Some(xc), Some(wc), Some(d)) => {
                let (x_shape, w_shape) = (xc.layout().shape().clone(), wc.layout().shape().clone());
                let dims = [x_shape[1], x_shape[2], w_shape[1]];
                let (dx, dw) =
                    cpu::causal_depthwise_backward(xc.as_f32(), wc.as_f32(), d.as_f32(), dims);
                [
                    FlexTensor::from_data(TensorData::new(dx, x_shape)),
                    FlexTensor::from_data(TensorData::new(dw, w_shape)),
                ]
            }
            _ => tensor_ops_causal_depthwise_backward::<Self>(x, w, d_out),
        }
    }

    fn kiln_rope_backward(
        d_out: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        flex_rope(d_out, cos, sin, true)
    }

    fn kiln_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        match (contiguous_f32(&x), contiguous_f32(&w)) {
            (Some(xc), Some(wc)) => {
                let out = cpu::rms_norm(xc.as_f32(), wc.as_f32(), eps as f32);
                FlexTensor::from_data(TensorData::new(out, xc.layout().shape().clone()))
            }
            _ => tensor_ops_rms_norm::<Self>(x, w, eps),
        }
    }

    fn kiln_rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f64,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        match (
            contiguous_f32(&x),
            contiguous_f32(&w),
            contiguous_f32(&d_out),
        ) {
            (Some(xc), Some(wc), Some(d)) => {
                let (dx, dw) =
                    cpu::rms_norm_backward(xc.as_f32(), wc.as_f32(), d.as_f32(), eps as f32);
                [
                    FlexTensor::from_data(TensorData::new(dx, xc.layout().shape().clone())),
                    FlexTensor::from_data(TensorData::new(dw, wc.layout().shape().clone())),
                ]
            }
            _ => tensor_ops_rms_norm_backward::<Self>(x, w, eps, d_out),
        }
    }
}

/// The operands of an attention call on Flex, read in place, when they are f32 and the
/// shapes are what [`cpu::attention`] takes.
struct FlexAttention {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    /// Contiguous.
    bias: Option<FlexTensor>,
    dims: cpu::AttentionDims,
}

impl FlexAttention {
    fn read(
        q: &FlexTensor,
        k: &FlexTensor,
        v: &FlexTensor,
        bias: Option<&FlexTensor>,
        causal: bool,
    ) -> Option<Self> {
        let f32 = |t: &FlexTensor| t.dtype() == burn::tensor::DType::F32;
        if !(f32(q) && f32(k) && f32(v) && bias.is_none_or(f32)) {
            return None;
        }
        let (qs, ks, vs) = (q.layout().shape(), k.layout().shape(), v.layout().shape());
        let [batch, heads, queries, dk] = [qs[0], qs[1], qs[2], qs[3]];
        let (kv_heads, keys, dv) = (ks[1], ks[2], vs[3]);
        if kv_heads == 0 || heads % kv_heads != 0 || (causal && keys < queries) {
            return None;
        }
        let (mut bias_batch, mut bias_heads, mut bias_queries) = (1, 1, 1);
        if let Some(b) = bias {
            let bs = b.layout().shape();
            (bias_batch, bias_heads, bias_queries) = (bs[0], bs[1], bs[2]);
            let fits = |n: usize, full: usize| n == 1 || n == full;
            if !(fits(bias_batch, batch) && fits(bias_heads, heads) && fits(bias_queries, queries))
                || bs[3] != keys
            {
                return None;
            }
        }
        Some(Self {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            bias: bias.map(FlexTensor::to_contiguous),
            dims: cpu::AttentionDims {
                batch,
                heads,
                kv_heads,
                queries,
                keys,
                dk,
                dv,
                bias_batch,
                bias_heads,
                bias_queries,
                causal,
            },
        })
    }

    /// The kernel's view of the operands; `None` for layouts it cannot read in place.
    fn inputs(&self, scale: f64) -> Option<cpu::AttentionInputs<'_>> {
        let d = self.dims;
        Some(cpu::AttentionInputs {
            q: strided(&self.q, [d.batch, d.heads, d.queries, d.dk])?,
            k: strided(&self.k, [d.batch, d.kv_heads, d.keys, d.dk])?,
            v: strided(&self.v, [d.batch, d.kv_heads, d.keys, d.dv])?,
            bias: self.bias.as_ref().map(FlexTensor::as_f32),
            dims: d,
            scale: scale as f32,
        })
    }
}

/// A 4-axis f32 Flex tensor of `shape` read in place, in its own layout.
fn strided(t: &FlexTensor, shape: [usize; 4]) -> Option<cpu::Strided<'_>> {
    let layout = t.layout();
    if t.dtype() != burn::tensor::DType::F32 || layout.shape().as_slice() != shape {
        return None;
    }
    let st = layout.strides();
    cpu::Strided::new(
        t.storage::<f32>(),
        layout.start_offset(),
        shape,
        [st[0], st[1], st[2], st[3]],
    )
}

/// [`KilnBackend::kiln_rope`] (or its backward) on Flex: the host kernel for f32.
fn flex_rope(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, inverse: bool) -> FlexTensor {
    match (
        contiguous_f32(&x),
        contiguous_f32(&cos),
        contiguous_f32(&sin),
    ) {
        (Some(xc), Some(c), Some(s)) => {
            let shape = xc.layout().shape().clone();
            let dims = [shape[1], shape[2], shape[3]];
            let out = cpu::rope(xc.as_f32(), c.as_f32(), s.as_f32(), dims, inverse);
            FlexTensor::from_data(TensorData::new(out, shape))
        }
        _ => tensor_ops_rope::<burn::backend::Flex>(x, cos, sin, inverse),
    }
}

/// A contiguous copy (or the tensor itself) of an f32 Flex tensor; `None` for other types.
fn contiguous_f32(t: &FlexTensor) -> Option<FlexTensor> {
    (t.dtype() == burn::tensor::DType::F32).then(|| t.to_contiguous())
}

/// The f32 values of a contiguous Flex tensor.
trait AsF32 {
    fn as_f32(&self) -> &[f32];
}

impl AsF32 for FlexTensor {
    fn as_f32(&self) -> &[f32] {
        self.as_slice::<f32>()
            .expect("a contiguous f32 tensor (checked by the caller)")
    }
}

/// A Flex tensor of `shape` holding `values`.
fn flex_f32<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// The CPU backends share [`host_dropout_mask`], so that they draw the same masks from the
/// same seed.
impl KilnBackend for burn::backend::NdArray {
    fn kiln_dropout_mask(shape: Shape, keep: f64, device: &Self::Device) -> FloatTensor<Self> {
        host_dropout_mask::<Self>(shape, keep, device)
    }
}

/// [`KilnBackend::kiln_dropout_mask`] computed on the host, on every core: 64 bits drawn
/// from the backend's generator seed [`cpu::dropout_mask`], a counter-based hash.
fn host_dropout_mask<B: Backend>(shape: Shape, keep: f64, device: &B::Device) -> FloatTensor<B> {
    let draws = B::float_random(
        Shape::new([1, 1, 1, 4]),
        burn::tensor::Distribution::Uniform(0.0, 65536.0),
        device,
        burn::tensor::FloatDType::F32,
    );
    let seed = host_float::<B>(draws)
        .0
        .iter()
        .fold(0u64, |s, &d| (s << 16) | (d as u64 & 0xffff));
    let mask = cpu::dropout_mask(shape.num_elements(), keep, seed);
    B::float_from_data(TensorData::new(mask, shape), device)
}
#[cfg(feature = "cuda")]
impl KilnBackend for burn::backend::Cuda {
    fn nf4_weight(w: &Arc<Nf4Tensor>, device: &Self::Device) -> FloatTensor<Self> {
        nf4_weight_on_device::<Self>(w, device)
            .into_primitive()
            .tensor()
    }
}

/// The two-input operations whose backward needs only the inputs (and a constant).
#[derive(Debug, Clone, Copy)]
enum Binary {
    /// [`KilnBackend::kiln_swiglu`] of `(gate, up)`.
    Swiglu,
    /// [`KilnBackend::kiln_causal_depthwise`] of `(x, w)`.
    CausalDepthwise,
    /// [`KilnBackend::kiln_rms_norm`] of `(x, w)` with this epsilon.
    RmsNorm(f64),
    /// [`KilnBackend::kiln_scale_rows`] of `(x, s)`.
    ScaleRows,
}

impl Binary {
    fn forward<B: KilnBackend>(self, a: FloatTensor<B>, b: FloatTensor<B>) -> FloatTensor<B> {
        match self {
            Binary::Swiglu => B::kiln_swiglu(a, b),
            Binary::CausalDepthwise => B::kiln_causal_depthwise(a, b),
            Binary::RmsNorm(eps) => B::kiln_rms_norm(a, b, eps),
            Binary::ScaleRows => B::kiln_scale_rows(a, b),
        }
    }

    fn backward<B: KilnBackend>(
        self,
        a: FloatTensor<B>,
        b: FloatTensor<B>,
        d_out: FloatTensor<B>,
    ) -> [FloatTensor<B>; 2] {
        match self {
            Binary::Swiglu => B::kiln_swiglu_backward(a, b, d_out),
            Binary::CausalDepthwise => B::kiln_causal_depthwise_backward(a, b, d_out),
            Binary::RmsNorm(eps) => B::kiln_rms_norm_backward(a, b, eps, d_out),
            Binary::ScaleRows => B::kiln_scale_rows_backward(a, b, d_out),
        }
    }

    /// The op on an autodiff backend, recording a backward that keeps both inputs.
    fn record<B: KilnBackend, C: CheckpointStrategy>(
        self,
        a: FloatTensor<Autodiff<B, C>>,
        b: FloatTensor<Autodiff<B, C>>,
    ) -> FloatTensor<Autodiff<B, C>> {
        let output = self.forward::<B>(a.primitive.clone(), b.primitive.clone());
        match BinaryBackward(self)
            .prepare::<C>([a.node, b.node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((a.primitive, b.primitive), output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }
}

/// The backward of a [`Binary`] operation.
#[derive(Debug)]
struct BinaryBackward(Binary);

impl<B: KilnBackend> Backward<B, 2> for BinaryBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<B>(&ops.node);
        let (a, b) = ops.state;
        register!(B, grads, ops.parents, self.0.backward::<B>(a, b, d_out));
    }
}

/// The backward of [`KilnBackend::kiln_rope`]: its transpose, from the tables alone.
#[derive(Debug)]
struct RopeBackward;

impl<B: KilnBackend> Backward<B, 1> for RopeBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, sin) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |d| {
            B::kiln_rope_backward(d, cos, sin)
        });
    }
}

/// The backward of [`KilnBackend::kiln_cross_entropy`]; the targets are constants.
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

/// The backward of [`KilnBackend::nf4_linear`]: `dx = dy · dequant(W)`.
#[derive(Debug)]
struct Nf4LinearBackward;

impl<B: KilnBackend> Backward<B, 1> for Nf4LinearBackward {
    type State = Arc<Nf4Tensor>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            let weight = B::nf4_weight(&w, &B::float_device(&grad));
            B::float_matmul(grad, weight)
        });
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

impl<B: KilnBackend, C: CheckpointStrategy> KilnBackend for Autodiff<B, C> {
    fn kiln_chunk_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        picks: Option<IntTensor<Self>>,
        chunk: usize,
        scale: f64,
    ) -> FloatTensor<Self> {
        // The picks are constants (the selection is not differentiated).
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

    fn kiln_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        scale: f64,
        causal: bool,
    ) -> FloatTensor<Self> {
        // The bias is a constant (masks), never differentiated.
        let bias = bias.map(|b| b.primitive);
        let output = B::kiln_attention(
            q.primitive.clone(),
            k.primitive.clone(),
            v.primitive.clone(),
            bias.clone(),
            scale,
            causal,
        );
        match AttentionBackward
            .prepare::<C>([q.node, k.node, v.node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                (q.primitive, k.primitive, v.primitive, bias, (scale, causal)),
                output,
            ),
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }

    fn kiln_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
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

    fn kiln_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        Binary::Swiglu.record::<B, C>(gate, up)
    }

    fn kiln_scale_rows(x: FloatTensor<Self>, s: FloatTensor<Self>) -> FloatTensor<Self> {
        Binary::ScaleRows.record::<B, C>(x, s)
    }

    fn kiln_dropout_mask(shape: Shape, keep: f64, device: &Self::Device) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::kiln_dropout_mask(shape, keep, device))
    }

    fn kiln_causal_depthwise(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Binary::CausalDepthwise.record::<B, C>(x, w)
    }

    fn kiln_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        Binary::RmsNorm(eps).record::<B, C>(x, w)
    }

    fn kiln_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        // The tables are constants (positions), never differentiated.
        let (cos, sin) = (cos.primitive, sin.primitive);
        let output = B::kiln_rope(x.primitive, cos.clone(), sin.clone());
        match RopeBackward
            .prepare::<C>([x.node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((cos, sin), output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }

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

    #[test]
    fn nf4_weights_expanded_on_the_device_equal_the_host_dequantization() {
        let device = Default::default();
        // 350 weights: five whole blocks of 64 and a partial one, which the words pad.
        for shape in [[7usize, 50], [128, 96]] {
            let n = shape[0] * shape[1];
            let values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 0.2).collect();
            let w = Nf4Tensor::quantize(&values, &shape);
            assert!(format!("{:?}", w.resident()).contains("host only"));
            for _ in 0..2 {
                let on_device = nf4_weight_on_device::<Flex>(&w, &device);
                assert_eq!(on_device.dims(), shape);
                assert_eq!(
                    on_device.into_data().into_vec::<f32>().expect("f32"),
                    w.dequantize(),
                    "{shape:?}"
                );
                assert!(format!("{:?}", w.resident()).contains("on device"));
            }
            // A clone starts without the device copy.
            assert!(format!("{:?}", w.clone().resident()).contains("host only"));
        }
    }

    /// [`KilnBackend::kiln_chunk_attention`] and its backward against dense attention
    /// over the same keys: scores of every query against every key, with a mask that keeps
    /// a query's picked chunks and its own chunk up to itself. The sequence ends inside a
    /// chunk, the head width is one register block plus a remainder, and some picks are
    /// none (negative).
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
        let mut keep = vec![f32::NEG_INFINITY; batch * heads * seq * seq];
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
                for key in 0..seq {
                    let c = (key / chunk) as i64;
                    if mine.contains(&c) || (key / chunk == own && key <= i) {
                        keep[(p * seq + i) * seq + key] = 0.0;
                    }
                }
                picks.extend(mine);
            }
        }
        assert!(picks.iter().any(|&c| c < 0) && picks.iter().any(|&c| c > 0));
        let picks = Tensor::<B, 4, burn::tensor::Int>::from_data(
            TensorData::new(picks, [batch, heads, seq, n]),
            &device,
        );
        let keep =
            Tensor::<B, 4>::from_data(TensorData::new(keep, [batch, heads, seq, seq]), &device);
        let upstream = Tensor::<B, 4>::from_data(data(0.41), &device);
        let run = |kiln: bool| {
            let leaf = |seed| Tensor::<B, 4>::from_data(data(seed), &device).require_grad();
            let (q, k, v) = (leaf(0.13), leaf(0.29), leaf(0.37));
            let scale = 0.5;
            let out = if kiln {
                float::<B, 4>(B::kiln_chunk_attention(
                    q.clone().into_primitive().tensor(),
                    k.clone().into_primitive().tensor(),
                    v.clone().into_primitive().tensor(),
                    Some(picks.clone().into_primitive()),
                    chunk,
                    scale,
                ))
            } else {
                let heads_first = |x: Tensor<B, 4>| x.swap_dims(1, 2);
                let s = heads_first(q.clone())
                    .matmul(heads_first(k.clone()).swap_dims(2, 3))
                    .mul_scalar(scale)
                    + keep.clone();
                softmax(s, 3).matmul(heads_first(v.clone())).swap_dims(1, 2)
            };
            let grads = (out.clone() * upstream.clone()).sum().backward();
            let g = |x: &Tensor<B, 4>| x.grad(&grads).expect("gradient").into_data();
            (out.into_data(), g(&q), g(&k), g(&v))
        };
        let (kiln, reference) = (run(true), run(false));
        let tol = burn::tensor::Tolerance::<f32>::absolute(1e-5);
        kiln.0.assert_approx_eq::<f32>(&reference.0, tol);
        kiln.1.assert_approx_eq::<f32>(&reference.1, tol);
        kiln.2.assert_approx_eq::<f32>(&reference.2, tol);
        kiln.3.assert_approx_eq::<f32>(&reference.3, tol);
    }

    #[test]
    fn blocked_attention_and_its_recomputing_backward_match_dense_attention() {
        // Flex runs the host kernels of crate::cpu, NdArray the tensor-op default. More
        // query rows than one block of either, so blocking and accumulation are exercised;
        // a causal mask with -inf as a bias or as the causal flag, padding keys masked per
        // batch row with a large negative number, grouped-query heads, and keys and values
        // of different widths.
        let t = ATTENTION_BLOCK + 88;
        for masking in [Masking::BiasRows, Masking::CausalFlag] {
            let dims = (2, 4, 2, t, t, 5, 4);
            attention_matches_dense::<Autodiff<Flex>>(dims, masking);
            attention_matches_dense::<Autodiff<burn::backend::NdArray>>(dims, masking);
        }
        // Queries after cached keys (generation), causal: fewer queries than keys.
        for masking in [Masking::BiasRows, Masking::CausalFlag] {
            let dims = (2, 3, 1, 70, 131, 8, 3);
            attention_matches_dense::<Autodiff<Flex>>(dims, masking);
            attention_matches_dense::<Autodiff<burn::backend::NdArray>>(dims, masking);
        }
        // Fewer keys than queries, no mask.
        let dims = (1, 2, 2, 70, 45, 8, 3);
        attention_matches_dense::<Autodiff<Flex>>(dims, Masking::None);
        attention_matches_dense::<Autodiff<burn::backend::NdArray>>(dims, Masking::None);
    }

    #[test]
    fn fused_cross_entropy_and_its_backward_match_log_softmax_and_gather() {
        cross_entropy_matches_log_softmax::<Autodiff<Flex>>();
        cross_entropy_matches_log_softmax::<Autodiff<burn::backend::NdArray>>();
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

    #[test]
    fn swiglu_and_rope_ops_and_their_backwards_match_plain_tensor_ops() {
        swiglu_and_rope_match::<Autodiff<Flex>>();
        swiglu_and_rope_match::<Autodiff<burn::backend::NdArray>>();
    }

    /// [`KilnBackend::kiln_swiglu`] and [`KilnBackend::kiln_rope`], forward and backward,
    /// against `silu(g) * u` and `x * cos + rotate_half(x) * sin` in tensor ops.
    fn swiglu_and_rope_match<A: KilnAutodiffBackend>() {
        use burn::tensor::activation::silu;
        let device = Default::default();
        let data = |seed: f32, shape: [usize; 4]| {
            let n = shape.iter().product::<usize>();
            let v: Vec<f32> = (0..n).map(|i| ((i as f32) * seed).sin() * 4.0).collect();
            Tensor::<A, 4>::from_data(TensorData::new(v, shape), &device)
        };
        // Not a multiple of the vector width or of the kernels' task size.
        let shape = [3, 7, 5, 6];
        let upstream = data(0.37, shape);
        let tol = burn::tensor::Tolerance::<f32>::absolute(1e-4);
        let swiglu = |kiln: bool| {
            let (g, u) = (
                data(0.11, shape).require_grad(),
                data(0.23, shape).require_grad(),
            );
            let out = if kiln {
                crate::ops::swiglu(g.clone(), u.clone())
            } else {
                silu(g.clone()) * u.clone()
            };
            let grads = (out.clone() * upstream.clone()).sum().backward();
            let grad = |x: &Tensor<A, 4>| x.grad(&grads).expect("gradient").into_data();
            (out.into_data(), grad(&g), grad(&u))
        };
        let (kiln, plain) = (swiglu(true), swiglu(false));
        kiln.0.assert_approx_eq::<f32>(&plain.0, tol);
        kiln.1.assert_approx_eq::<f32>(&plain.1, tol);
        kiln.2.assert_approx_eq::<f32>(&plain.2, tol);

        let [_, t, _, d] = shape;
        let table = |seed: f32| data(seed, [1, 1, t, d]).reshape([t, d]);
        let (cos, sin) = (table(0.05), table(0.07));
        let rope = |kiln: bool| {
            let x = data(0.13, shape).require_grad();
            let out = if kiln {
                float::<A, 4>(A::kiln_rope(
                    x.clone().into_primitive().tensor(),
                    cos.clone().into_primitive().tensor(),
                    sin.clone().into_primitive().tensor(),
                ))
            } else {
                let half = d / 2;
                let (x1, x2) = (
                    x.clone().narrow(3, 0, half),
                    x.clone().narrow(3, half, half),
                );
                let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
                x.clone() * cos.clone().reshape([1, t, 1, d])
                    + rotated * sin.clone().reshape([1, t, 1, d])
            };
            let grads = (out.clone() * upstream.clone()).sum().backward();
            (
                out.into_data(),
                x.grad(&grads).expect("gradient").into_data(),
            )
        };
        let (kiln, plain) = (rope(true), rope(false));
        kiln.0.assert_approx_eq::<f32>(&plain.0, tol);
        kiln.1.assert_approx_eq::<f32>(&plain.1, tol);
    }

    #[test]
    fn scale_rows_and_its_backward_match_a_broadcast_product() {
        scale_rows_matches::<Autodiff<Flex>>();
        scale_rows_matches::<Autodiff<burn::backend::NdArray>>();
    }

    /// [`crate::ops::scale_rows`] against `x * s` differentiated by Burn, with `s` a column
    /// view of routing weights `[batch, seq, 3]` (as MoA passes it), over more rows than one
    /// task of the host kernel and a width that is not a multiple of the vector width.
    fn scale_rows_matches<A: KilnAutodiffBackend>() {
        let device = Default::default();
        let (b, t, d) = (3, 700, 21);
        let data = |seed: f32, shape: [usize; 3]| {
            let n = shape.iter().product::<usize>();
            let v: Vec<f32> = (0..n).map(|i| ((i as f32) * seed).sin()).collect();
            Tensor::<A, 3>::from_data(TensorData::new(v, shape), &device)
        };
        let upstream = data(0.37, [b, t, d]);
        let run = |kiln: bool| {
            let x = data(0.11, [b, t, d]).require_grad();
            let w = data(0.23, [b, t, 3]).require_grad();
            let s = w.clone().narrow(2, 1, 1);
            let out = if kiln {
                crate::ops::scale_rows(x.clone(), s)
            } else {
                x.clone() * s
            };
            let grads = (out.clone() * upstream.clone()).sum().backward();
            let grad = |x: &Tensor<A, 3>| x.grad(&grads).expect("gradient").into_data();
            (out.into_data(), grad(&x), grad(&w))
        };
        let (kiln, plain) = (run(true), run(false));
        let tol = burn::tensor::Tolerance::<f32>::absolute(1e-5);
        kiln.0.assert_approx_eq::<f32>(&plain.0, tol);
        kiln.1.assert_approx_eq::<f32>(&plain.1, tol);
        kiln.2.assert_approx_eq::<f32>(&plain.2, tol);
    }

    #[test]
    fn causal_depthwise_op_and_its_backward_match_shifted_tensor_ops() {
        for (seq, kernel) in [(9, 4), (3, 5), (17, 1)] {
            causal_depthwise_matches::<Autodiff<Flex>>(seq, kernel);
            causal_depthwise_matches::<Autodiff<burn::backend::NdArray>>(seq, kernel);
        }
    }

    /// [`crate::ops::causal_depthwise`] (the backend op) against the same convolution in
    /// tensor ops differentiated by Burn, for `batch 3 x seq x 21 channels`.
    fn causal_depthwise_matches<A: KilnAutodiffBackend>(seq: usize, kernel: usize) {
        let device = Default::default();
        let channels = 21; // not a multiple of the vector width
        let x_values: Vec<f32> = (0..3 * seq * channels)
            .map(|i| ((i as f32) * 0.37).sin())
            .collect();
        let w_values: Vec<f32> = (0..channels * kernel)
            .map(|i| ((i as f32) * 0.53).cos())
            .collect();
        let up_values: Vec<f32> = (0..3 * seq * channels)
            .map(|i| ((i as f32) * 0.19).sin())
            .collect();
        let up = Tensor::<A, 3>::from_data(TensorData::new(up_values, [3, seq, channels]), &device);
        let run = |kiln: bool| {
            let x = Tensor::<A, 3>::from_data(
                TensorData::new(x_values.clone(), [3, seq, channels]),
                &device,
            )
            .require_grad();
            let w = Tensor::<A, 2>::from_data(
                TensorData::new(w_values.clone(), [channels, kernel]),
                &device,
            )
            .require_grad();
            let out = if kiln {
                crate::ops::causal_depthwise(x.clone(), w.clone())
            } else {
                crate::ops::causal_depthwise_tensor_ops(x.clone(), w.clone())
            };
            output_and_grads(out, &up, &x, &w)
        };
        assert_outputs_match(run(true), run(false));
    }

    /// An op's output and the gradients of `sum(out ⊙ up)` for its two inputs.
    fn output_and_grads<A: KilnAutodiffBackend, const D: usize, const E: usize>(
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
    fn assert_outputs_match(
        kiln: (TensorData, TensorData, TensorData),
        plain: (TensorData, TensorData, TensorData),
    ) {
        let tol = burn::tensor::Tolerance::<f32>::absolute(1e-4);
        kiln.0.assert_approx_eq::<f32>(&plain.0, tol);
        kiln.1.assert_approx_eq::<f32>(&plain.1, tol);
        kiln.2.assert_approx_eq::<f32>(&plain.2, tol);
    }

    #[test]
    fn rms_norm_op_and_its_backward_match_plain_tensor_ops() {
        rms_norm_matches::<Autodiff<Flex>>();
        rms_norm_matches::<Autodiff<burn::backend::NdArray>>();
    }

    /// [`crate::ops::rms_norm`] (the backend op) against `x / sqrt(mean(x²) + eps) * w`
    /// differentiated by Burn, over rows of a width that is not a multiple of the vector
    /// width, with rows of very different scales.
    fn rms_norm_matches<A: KilnAutodiffBackend>() {
        let device = Default::default();
        let (shape, width, eps) = ([3, 5, 37], 37, 1e-6);
        let n = 3 * 5 * width;
        let values: Vec<f32> = (0..n)
            .map(|i| ((i as f32) * 0.37).sin() * (1 + (i / width) % 4 * 10) as f32)
            .collect();
        let w_values: Vec<f32> = (0..width)
            .map(|i| 1.0 + ((i as f32) * 0.53).cos())
            .collect();
        let up_values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.19).sin()).collect();
        let up = Tensor::<A, 3>::from_data(TensorData::new(up_values, shape), &device);
        let run = |kiln: bool| {
            let x = Tensor::<A, 3>::from_data(TensorData::new(values.clone(), shape), &device)
                .require_grad();
            let w = Tensor::<A, 1>::from_data(TensorData::new(w_values.clone(), [width]), &device)
                .require_grad();
            let out = if kiln {
                crate::ops::rms_norm(x.clone(), w.clone(), eps)
            } else {
                let rms = x.clone().square().mean_dim(2).add_scalar(eps).sqrt();
                x.clone().div(rms).mul(w.clone().unsqueeze::<3>())
            };
            output_and_grads(out, &up, &x, &w)
        };
        assert_outputs_match(run(true), run(false));
    }

    /// How an attention test masks keys.
    #[derive(Clone, Copy, PartialEq)]
    enum Masking {
        /// No bias, not causal.
        None,
        /// A full `[b, 1, t, s]` bias holding the causal mask and padding keys.
        BiasRows,
        /// `causal` plus a `[b, 1, 1, s]` bias of padding keys only.
        CausalFlag,
    }

    /// [`KilnBackend::kiln_attention`] and its backward against `softmax(q kᵀ · scale +
    /// mask) v` in plain tensor ops (keys and values repeated per query head), for
    /// `(batch, heads, kv_heads, queries, keys, dk, dv)`. The operands are passed as the
    /// models pass them: views of `[b, t, h, d]` projections with the head axis in front.
    fn attention_matches_dense<A: KilnAutodiffBackend>(
        (b, h, kvh, t, s, dk, dv): (usize, usize, usize, usize, usize, usize, usize),
        masking: Masking,
    ) {
        let device = Default::default();
        let data = |seed: f32, shape: [usize; 4]| {
            let n = shape.iter().product::<usize>();
            let v: Vec<f32> = (0..n).map(|i| ((i as f32) * seed).sin()).collect();
            TensorData::new(v, shape)
        };
        // The whole mask, [b, 1, t, s]: the queries are the last t of s positions; the
        // second batch row's first 3 keys are padding.
        let causal = masking != Masking::None;
        let padded = |batch: usize, c: usize| batch == 1 && c < 3;
        let mut full = vec![0.0f32; b * t * s];
        let mut padding = vec![0.0f32; b * s];
        for batch in 0..b {
            for c in 0..s {
                if causal && padded(batch, c) {
                    padding[batch * s + c] = -1e9;
                }
            }
            for r in 0..t {
                for c in 0..s {
                    let i = (batch * t + r) * s + c;
                    if causal && c + t > r + s {
                        full[i] = f32::NEG_INFINITY;
                    } else if causal && padded(batch, c) {
                        full[i] = -1e9;
                    }
                }
            }
        }
        let full = Tensor::<A, 4>::from_data(TensorData::new(full, [b, 1, t, s]), &device);
        let bias = match masking {
            Masking::None => None,
            Masking::BiasRows => Some(full.clone()),
            Masking::CausalFlag => Some(Tensor::<A, 4>::from_data(
                TensorData::new(padding, [b, 1, 1, s]),
                &device,
            )),
        };
        let upstream = Tensor::<A, 4>::from_data(data(0.37, [b, h, t, dv]), &device);
        let run = |kiln: bool| {
            let q = Tensor::<A, 4>::from_data(data(0.11, [b, t, h, dk]), &device).require_grad();
            let k = Tensor::<A, 4>::from_data(data(0.23, [b, s, kvh, dk]), &device).require_grad();
            let v = Tensor::<A, 4>::from_data(data(0.31, [b, s, kvh, dv]), &device).require_grad();
            let (qh, kh, vh) = (
                q.clone().swap_dims(1, 2),
                k.clone().swap_dims(1, 2),
                v.clone().swap_dims(1, 2),
            );
            let scale = 0.5;
            let out = if kiln {
                float::<A, 4>(A::kiln_attention(
                    qh.into_primitive().tensor(),
                    kh.into_primitive().tensor(),
                    vh.into_primitive().tensor(),
                    bias.clone().map(|b| b.into_primitive().tensor()),
                    scale,
                    masking == Masking::CausalFlag,
                ))
            } else {
                let (kh, vh) = (repeat_kv(kh, h), repeat_kv(vh, h));
                let scores = qh.matmul(kh.swap_dims(2, 3)).mul_scalar(scale);
                let scores = if causal {
                    scores + full.clone()
                } else {
                    scores
                };
                softmax(scores, 3).matmul(vh)
            };
            let grads = (out.clone() * upstream.clone()).sum().backward();
            let g = |x: &Tensor<A, 4>| x.grad(&grads).expect("gradient").into_data();
            (out.into_data(), g(&q), g(&k), g(&v))
        };
        let (kiln, dense) = (run(true), run(false));
        // The dense reference is the less exact side: NdArray's matmuls on an AVX2 CPU
        // leave it over 1e-4 off (a query that sees one key gets a nonzero dq there,
        // where the exact gradient and the kernels' is 0). A wrong kernel is off by far
        // more.
        let tol = burn::tensor::Tolerance::<f32>::absolute(5e-4);
        kiln.0.assert_approx_eq::<f32>(&dense.0, tol);
        kiln.1.assert_approx_eq::<f32>(&dense.1, tol);
        kiln.2.assert_approx_eq::<f32>(&dense.2, tol);
        kiln.3.assert_approx_eq::<f32>(&dense.3, tol);
    }
}
