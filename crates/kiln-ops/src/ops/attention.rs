//! Attention `softmax(q kᵀ · scale + bias) v`, memory-efficient under autodiff.
//!
//! Burn's graph would keep the `[queries, keys]` scores and probabilities of every layer
//! (and head) from the forward to the backward pass, which at 4096 tokens is gigabytes per
//! layer. Here the forward keeps only q, k, v (which the graph holds anyway) and the
//! backward recomputes the probabilities block by block of queries (FlashAttention's
//! recomputation, in plain tensor ops): `dV = Pᵀ dO`, `dS = P ⊙ (dO vᵀ − rowsum(dO ⊙ O))`,
//! `dQ = dS k · scale`, `dK = dSᵀ q · scale`. The forward runs block by block too, so no
//! step ever holds more than one block's scores.
//!
//! On Flex both passes are host kernels ([`crate::host::attention`]) that read the heads in
//! place: attention takes its heads as strided views of the projections' `[b, t, heads, d]`
//! layout and a `causal` flag, so nothing is copied into a head-major layout and a causal
//! block computes only the keys it sees.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::ops::FloatTensor;
use burn::tensor::s;

use crate::KilnBackend;
use crate::backends::flex::{AsF32, flex_f32};
use crate::host;
use crate::tensor::{float, register};

/// Query rows per attention block: bounds the scores held at once to
/// `batch · kv_heads · ATTENTION_BLOCK · keys` values.
pub const ATTENTION_BLOCK: usize = 512;

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

/// The reference in tensor ops, [`ATTENTION_BLOCK`] queries at a time.
pub fn reference<B: Backend>(
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

/// The reference backward in tensor ops: `dV = Pᵀ dO`,
/// `dS = P ⊙ (dP − rowsum(dP ⊙ P))` with `dP = dO vᵀ`, `dQ = dS k · scale`,
/// `dK = dSᵀ q · scale`, recomputing `P` block by block.
pub fn reference_backward<B: Backend>(
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

/// The operation on an autodiff backend: the bias is a constant (masks), never
/// differentiated.
pub(crate) fn autodiff<B: KilnBackend, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    bias: Option<FloatTensor<Autodiff<B, C>>>,
    scale: f64,
    causal: bool,
) -> FloatTensor<Autodiff<B, C>> {
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

/// Flex: the host kernel where the operands are f32 in layouts it reads in place, the
/// reference otherwise.
pub(crate) fn flex(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    bias: Option<FlexTensor>,
    scale: f64,
    causal: bool,
) -> FlexTensor {
    let Some(a) = FlexAttention::read(&q, &k, &v, bias.as_ref(), causal) else {
        return reference::<burn::backend::Flex>(q, k, v, bias, scale, causal);
    };
    let Some(inputs) = a.inputs(scale) else {
        return reference::<burn::backend::Flex>(q, k, v, bias, scale, causal);
    };
    let d = a.dims;
    // [b, t, h, dv], seen as [b, h, t, dv]: the output projection reads it as is.
    flex_f32(host::attention(inputs), [d.batch, d.queries, d.heads, d.dv]).transpose(1, 2)
}

/// Flex's backward: the host kernel where it reads the operands in place, the reference
/// otherwise.
pub(crate) fn flex_backward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    bias: Option<FlexTensor>,
    (scale, causal): (f64, bool),
    d_out: FlexTensor,
) -> [FlexTensor; 3] {
    let read = FlexAttention::read(&q, &k, &v, bias.as_ref(), causal);
    let kernel = read.as_ref().and_then(|a| {
        let d = a.dims;
        let shape = [d.batch, d.heads, d.queries, d.dv];
        Some((a.inputs(scale)?, strided(&d_out, shape)?))
    });
    let (Some(a), Some((inputs, d_out))) = (&read, kernel) else {
        return reference_backward::<burn::backend::Flex>(q, k, v, bias, (scale, causal), d_out);
    };
    let d = a.dims;
    let (dq, dk, dv) = host::attention_backward(inputs, d_out);
    // Gradients in the layouts of the projections they flow back into, seen as the
    // head-major shapes of q, k and v.
    [
        flex_f32(dq, [d.batch, d.queries, d.heads, d.dk]),
        flex_f32(dk, [d.batch, d.keys, d.kv_heads, d.dk]),
        flex_f32(dv, [d.batch, d.keys, d.kv_heads, d.dv]),
    ]
    .map(|g| g.transpose(1, 2))
}

/// The operands of an attention call on Flex, read in place, when they are f32 and the
/// shapes are what [`host::attention`] takes.
struct FlexAttention {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    /// Contiguous.
    bias: Option<FlexTensor>,
    dims: host::AttentionDims,
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
            dims: host::AttentionDims {
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
    fn inputs(&self, scale: f64) -> Option<host::AttentionInputs<'_>> {
        let d = self.dims;
        Some(host::AttentionInputs {
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
fn strided(t: &FlexTensor, shape: [usize; 4]) -> Option<host::Strided<'_>> {
    let layout = t.layout();
    if t.dtype() != burn::tensor::DType::F32 || layout.shape().as_slice() != shape {
        return None;
    }
    let st = layout.strides();
    host::Strided::new(
        t.storage::<f32>(),
        layout.start_offset(),
        shape,
        [st[0], st[1], st[2], st[3]],
    )
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex, NdArray};

    use super::*;
    use crate::KilnAutodiffBackend;

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
            attention_matches_dense::<Autodiff<NdArray>>(dims, masking);
        }
        // Queries after cached keys (generation), causal: fewer queries than keys.
        for masking in [Masking::BiasRows, Masking::CausalFlag] {
            let dims = (2, 3, 1, 70, 131, 8, 3);
            attention_matches_dense::<Autodiff<Flex>>(dims, masking);
            attention_matches_dense::<Autodiff<NdArray>>(dims, masking);
        }
        // Fewer keys than queries, no mask.
        let dims = (1, 2, 2, 70, 45, 8, 3);
        attention_matches_dense::<Autodiff<Flex>>(dims, Masking::None);
        attention_matches_dense::<Autodiff<NdArray>>(dims, Masking::None);
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
