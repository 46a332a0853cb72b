//! The conformance table: every kiln operation, forward and every input gradient, as one
//! list of checks that both `cargo test` and `kiln doctor` run (candle's
//! `candle-nn/tests/ops.rs` pattern).
//!
//! A [`Check`] builds its inputs on the host from fixed seeds, so every backend sees the
//! same values, and runs either [`Path::Kernel`] (the operation as the backend computes it:
//! its host kernel on Flex, its recorded backward under autodiff) or [`Path::Reference`]
//! (the operation's tensor-op reference in [`crate::ops`], differentiated by Burn's own
//! autodiff: an independent derivation of every gradient). Each run returns the forward
//! values and the gradients of `sum(out ⊙ u)` for a fixed `u`.
//!
//! - `cargo test` (`tests/conformance.rs`) compares kernel against reference on each CPU
//!   backend, and the two CPU backends against each other.
//! - `kiln doctor` compares a backend's kernel path against the CPU's.
//!
//! The matmul checks are Burn's own operation in the shapes kiln's layers use (a weight
//! uploaded or computed just before use, transposed); their two paths are the same
//! expression, so they are checked across backends only. Dropout masks are random and have
//! no reference to equal; `host::dropout`'s tests check their rate and determinism.

use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::host::dropout::mix64;
use crate::nf4::Nf4Tensor;
use crate::ops::{
    attention, causal_depthwise, chunk_attention, cross_entropy, nf4_linear, rms_norm, rope,
    scale_rows, swiglu,
};
use crate::tensor::{float, prim};
use crate::{KilnAutodiffBackend, KilnBackend};

/// The sizes of the checks' operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Batch rows.
    pub batch: usize,
    /// Positions per row.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key and value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Hidden size of the projections.
    pub hidden: usize,
    /// Intermediate size of the MLP projections.
    pub intermediate: usize,
    /// Logits per row of the cross-entropy.
    pub vocab: usize,
    /// Positions per chunk of the chunk attention.
    pub chunk: usize,
    /// Earlier chunks each query of the chunk attention picks.
    pub picks: usize,
    /// Taps of the causal depthwise convolution.
    pub kernel: usize,
    /// Rank of the LoRA adapter of the QLoRA projection.
    pub rank: usize,
}

impl Sizes {
    /// The QLoRA smoke recipe's: a micro-batch of 8 x 256 tokens, hidden 128, intermediate
    /// 352 (what `kiln doctor` checks).
    pub const QLORA_SMOKE: Sizes = Sizes {
        batch: 8,
        seq: 256,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        hidden: 128,
        intermediate: 352,
        vocab: 1024,
        chunk: 32,
        picks: 2,
        kernel: 4,
        rank: 8,
    };

    /// Small operands that still cross a partial vector, a partial chunk and a partial
    /// NF4 block (what the unit tests check).
    pub const SMALL: Sizes = Sizes {
        batch: 2,
        seq: 45,
        heads: 4,
        kv_heads: 2,
        head_dim: 20,
        hidden: 40,
        intermediate: 70,
        vocab: 97,
        chunk: 8,
        picks: 2,
        kernel: 3,
        rank: 4,
    };

    fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

/// Which computation of an operation a run takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The backend's own: [`KilnBackend`]'s method as the backend implements it.
    Kernel,
    /// The operation's tensor-op reference, differentiated by Burn's autodiff.
    Reference,
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// `x · w`.
    Matmul,
    /// `x · wᵀ` for a weight uploaded from the host just before use, as the default NF4
    /// path (dequantized on the host) computes.
    UploadedTransposedMatmul,
    /// `x · wᵀ` for a weight produced by tensor ops just before use: the shape of an NF4
    /// layer's matmul on a device.
    ComputedTransposedMatmul,
    /// [`KilnBackend::nf4_weight`].
    Nf4Weight,
    /// [`KilnBackend::nf4_linear`] up (`[intermediate, hidden]`).
    Nf4Linear,
    /// [`KilnBackend::nf4_linear`] down (`[hidden, intermediate]`).
    Nf4LinearDown,
    /// A QLoRA projection: the NF4 linear plus a LoRA adapter's two matmuls.
    QloraProjection,
    /// [`KilnBackend::kiln_attention`], causal, grouped-query.
    Attention,
    /// [`KilnBackend::kiln_cross_entropy`].
    CrossEntropy,
    /// [`KilnBackend::kiln_swiglu`].
    Swiglu,
    /// [`KilnBackend::kiln_rms_norm`].
    RmsNorm,
    /// [`KilnBackend::kiln_rope`].
    Rope,
    /// [`KilnBackend::kiln_causal_depthwise`].
    CausalDepthwise,
    /// [`KilnBackend::kiln_scale_rows`].
    ScaleRows,
    /// [`KilnBackend::kiln_chunk_attention`].
    ChunkAttention,
}

/// Every check, in the order they run.
pub const CHECKS: [Check; 15] = [
    Check::Matmul,
    Check::UploadedTransposedMatmul,
    Check::ComputedTransposedMatmul,
    Check::Nf4Weight,
    Check::Nf4Linear,
    Check::Nf4LinearDown,
    Check::QloraProjection,
    Check::Attention,
    Check::CrossEntropy,
    Check::Swiglu,
    Check::RmsNorm,
    Check::Rope,
    Check::CausalDepthwise,
    Check::ScaleRows,
    Check::ChunkAttention,
];

/// Named outputs of one run of a check: the forward values, then each input's gradient
/// (empty where an input got none, which no comparison accepts).
pub type Outputs = Vec<(&'static str, Vec<f32>)>;

/// RMSNorm's epsilon in the checks (Qwen2's).
const EPS: f64 = 1e-6;

impl Check {
    /// The check's name, as `kiln doctor` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Check::Matmul => "matmul",
            Check::UploadedTransposedMatmul => "matmul, uploaded rhs transposed",
            Check::ComputedTransposedMatmul => "matmul, computed rhs transposed",
            Check::Nf4Weight => "nf4 weight expansion",
            Check::Nf4Linear => "nf4 linear, up",
            Check::Nf4LinearDown => "nf4 linear, down",
            Check::QloraProjection => "qlora projection",
            Check::Attention => "attention",
            Check::CrossEntropy => "cross-entropy",
            Check::Swiglu => "swiglu",
            Check::RmsNorm => "rms norm",
            Check::Rope => "rope",
            Check::CausalDepthwise => "causal depthwise conv",
            Check::ScaleRows => "scale rows",
            Check::ChunkAttention => "chunk attention",
        }
    }

    /// The operands' shapes at `sizes`, for the report.
    pub fn shapes(self, s: &Sizes) -> String {
        let (n, d, i) = (s.tokens(), s.hidden, s.intermediate);
        let (b, t, hd) = (s.batch, s.seq, s.head_dim);
        match self {
            Check::Matmul => format!("[{n}, {d}] x [{d}, {i}]"),
            Check::UploadedTransposedMatmul => format!("[{n}, {d}] x [{i}, {d}]^T"),
            Check::ComputedTransposedMatmul => format!("[{n}, {d}] x ([{i}, {d}] * s)^T"),
            Check::Nf4Weight => format!("[{i}, {d}]"),
            Check::Nf4Linear => format!("[{n}, {d}] x nf4 [{i}, {d}]^T"),
            Check::Nf4LinearDown => format!("[{n}, {i}] x nf4 [{d}, {i}]^T"),
            Check::QloraProjection => format!("[{n}, {d}] -> [{n}, {i}], r {}", s.rank),
            Check::Attention => format!(
                "q [{b}, {}, {t}, {hd}], kv [{b}, {}, {t}, {hd}], causal",
                s.heads, s.kv_heads
            ),
            Check::CrossEntropy => format!("[{n}, {}]", s.vocab),
            Check::Swiglu => format!("[{n}, {i}]"),
            Check::RmsNorm => format!("[{n}, {d}]"),
            Check::Rope => format!("[{b}, {t}, {}, {hd}]", s.heads),
            Check::CausalDepthwise => format!("[{b}, {t}, {d}], kernel {}", s.kernel),
            Check::ScaleRows => format!("[{b}, {t}, {d}] x [{b}, {t}, 1]"),
            Check::ChunkAttention => format!(
                "[{b}, {t}, {}, {hd}], chunks of {}, {} picks",
                s.heads, s.chunk, s.picks
            ),
        }
    }

    /// One run of the check on backend `B` by `path`.
    pub fn run<B: KilnAutodiffBackend>(self, path: Path, s: &Sizes, device: &B::Device) -> Outputs {
        let kernel = path == Path::Kernel;
        let (n, d, i) = (s.tokens(), s.hidden, s.intermediate);
        match self {
            Check::Matmul => {
                let (x, w) = (
                    leaf::<B, 2>([n, d], 1, device),
                    leaf::<B, 2>([d, i], 2, device),
                );
                let (y, g) = backward(x.clone().matmul(w.clone()));
                vec![("output", y), ("d x", grad(&x, &g)), ("d w", grad(&w, &g))]
            }
            Check::UploadedTransposedMatmul => {
                let x = leaf::<B, 2>([n, d], 1, device);
                let w = constant::<B, 2>([i, d], 2, device);
                let (y, g) = backward(x.clone().matmul(w.transpose()));
                vec![("output", y), ("d x", grad(&x, &g))]
            }
            Check::ComputedTransposedMatmul => {
                let x = leaf::<B, 2>([n, d], 1, device);
                let w = constant::<B, 2>([i, d], 2, device) * constant::<B, 2>([1, d], 3, device);
                let (y, g) = backward(x.clone().matmul(w.transpose()));
                vec![("output", y), ("d x", grad(&x, &g))]
            }
            Check::Nf4Weight => {
                let w = nf4_weight([i, d]);
                let weight = if kernel {
                    B::InnerBackend::nf4_weight(&w, device)
                } else {
                    nf4_linear::dequantized::<B::InnerBackend>(&w, device)
                };
                vec![("weight", host(float::<B::InnerBackend, 2>(weight)))]
            }
            Check::Nf4Linear | Check::Nf4LinearDown => {
                // x · Wᵀ for W [out, in]: [intermediate, hidden] up, [hidden, intermediate] down.
                let (w, inp) = match self {
                    Check::Nf4Linear => (nf4_weight([i, d]), d),
                    _ => (nf4_weight([d, i]), i),
                };
                let x = leaf::<B, 2>([n, inp], 1, device);
                let (y, g) = backward(nf4_matmul::<B>(x.clone(), &w, kernel));
                vec![("output", y), ("d x", grad(&x, &g))]
            }
            Check::QloraProjection => {
                let w = nf4_weight([i, d]);
                let x = leaf::<B, 2>([n, d], 1, device);
                let a = leaf::<B, 2>([d, s.rank], 5, device);
                // B starts at zero in training; a nonzero B lets every path carry a gradient.
                let b = leaf::<B, 2>([s.rank, i], 6, device);
                let base = nf4_matmul::<B>(x.clone(), &w, kernel);
                let y = base
                    + x.clone()
                        .matmul(a.clone())
                        .matmul(b.clone())
                        .mul_scalar(2.0);
                let (y, g) = backward(y);
                vec![
                    ("output", y),
                    ("d x", grad(&x, &g)),
                    ("d lora_A", grad(&a, &g)),
                    ("d lora_B", grad(&b, &g)),
                ]
            }
            Check::Attention => {
                let q = leaf::<B, 4>([s.batch, s.heads, s.seq, s.head_dim], 1, device);
                let k = leaf::<B, 4>([s.batch, s.kv_heads, s.seq, s.head_dim], 2, device);
                let v = leaf::<B, 4>([s.batch, s.kv_heads, s.seq, s.head_dim], 3, device);
                let scale = (s.head_dim as f64).powf(-0.5);
                let (pq, pk, pv) = (prim(q.clone()), prim(k.clone()), prim(v.clone()));
                let out = if kernel {
                    B::kiln_attention(pq, pk, pv, None, scale, true)
                } else {
                    attention::reference::<B>(pq, pk, pv, None, scale, true)
                };
                qkv_outputs::<B>(float(out), [&q, &k, &v])
            }
            Check::CrossEntropy => {
                let logits = (constant::<B, 2>([n, s.vocab], 1, device) * 4.0).require_grad();
                let targets: Vec<i64> = (0..n as i64).map(|r| (r * 37) % s.vocab as i64).collect();
                let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), device);
                let (l, t) = (prim(logits.clone()), targets.into_primitive());
                let out = if kernel {
                    B::kiln_cross_entropy(l, t)
                } else {
                    cross_entropy::reference::<B>(l, t)
                };
                let (y, g) = backward(float::<B, 1>(out));
                vec![("output", y), ("d logits", grad(&logits, &g))]
            }
            Check::Swiglu => {
                let (a, b) = (
                    leaf::<B, 2>([n, i], 1, device),
                    leaf::<B, 2>([n, i], 2, device),
                );
                let out = if kernel {
                    swiglu::swiglu(a.clone(), b.clone())
                } else {
                    float(swiglu::reference::<B>(prim(a.clone()), prim(b.clone())))
                };
                let (y, g) = backward(out);
                vec![
                    ("output", y),
                    ("d gate", grad(&a, &g)),
                    ("d up", grad(&b, &g)),
                ]
            }
            Check::RmsNorm => {
                let (x, w) = (
                    leaf::<B, 2>([n, d], 1, device),
                    leaf::<B, 1>([d], 2, device),
                );
                let out = if kernel {
                    rms_norm::rms_norm(x.clone(), w.clone(), EPS)
                } else {
                    float(rms_norm::reference::<B>(
                        prim(x.clone()),
                        prim(w.clone()),
                        EPS,
                    ))
                };
                let (y, g) = backward(out);
                vec![("output", y), ("d x", grad(&x, &g)), ("d w", grad(&w, &g))]
            }
            Check::Rope => {
                let x = leaf::<B, 4>([s.batch, s.seq, s.heads, s.head_dim], 1, device);
                let cos = prim(constant::<B, 2>([s.seq, s.head_dim], 2, device));
                let sin = prim(constant::<B, 2>([s.seq, s.head_dim], 3, device));
                let out = if kernel {
                    B::kiln_rope(prim(x.clone()), cos, sin)
                } else {
                    rope::reference::<B>(prim(x.clone()), cos, sin, false)
                };
                let (y, g) = backward(float::<B, 4>(out));
                vec![("output", y), ("d x", grad(&x, &g))]
            }
            Check::CausalDepthwise => {
                let x = leaf::<B, 3>([s.batch, s.seq, d], 1, device);
                let w = leaf::<B, 2>([d, s.kernel], 2, device);
                let out = if kernel {
                    causal_depthwise::causal_depthwise(x.clone(), w.clone())
                } else {
                    causal_depthwise::reference(x.clone(), w.clone())
                };
                let (y, g) = backward(out);
                vec![("output", y), ("d x", grad(&x, &g)), ("d w", grad(&w, &g))]
            }
            Check::ScaleRows => {
                let x = leaf::<B, 3>([s.batch, s.seq, d], 1, device);
                let r = leaf::<B, 3>([s.batch, s.seq, 1], 2, device);
                let out = if kernel {
                    scale_rows::scale_rows(x.clone(), r.clone())
                } else {
                    float(scale_rows::reference::<B>(prim(x.clone()), prim(r.clone())))
                };
                let (y, g) = backward(out);
                vec![("output", y), ("d x", grad(&x, &g)), ("d s", grad(&r, &g))]
            }
            Check::ChunkAttention => {
                let shape = [s.batch, s.seq, s.heads, s.head_dim];
                let (q, k, v) = (
                    leaf::<B, 4>(shape, 1, device),
                    leaf::<B, 4>(shape, 2, device),
                    leaf::<B, 4>(shape, 3, device),
                );
                // Query t (in chunk c = t / chunk) picks the chunks c - 1, c - 2, ... before
                // its own, where they exist (negative: none).
                let picks: Vec<i64> = (0..s.batch * s.heads * s.seq)
                    .flat_map(|r| {
                        let c = (r % s.seq / s.chunk) as i64;
                        (1..=s.picks as i64).map(move |j| c - j)
                    })
                    .collect();
                let scale = (s.head_dim as f64).powf(-0.5);
                let out = if kernel {
                    let picks = Tensor::<B, 4, Int>::from_data(
                        TensorData::new(picks, [s.batch, s.heads, s.seq, s.picks]),
                        device,
                    );
                    float(B::kiln_chunk_attention(
                        prim(q.clone()),
                        prim(k.clone()),
                        prim(v.clone()),
                        Some(picks.into_primitive()),
                        s.chunk,
                        scale,
                    ))
                } else {
                    let (q, k, v) = (q.clone(), k.clone(), v.clone());
                    chunk_attention::reference(q, k, v, &picks, s.chunk, scale)
                };
                qkv_outputs::<B>(out, [&q, &k, &v])
            }
        }
    }
}

/// `max |a - b| / max |reference|` (infinite where the lengths differ or a value is not
/// finite).
pub fn relative_error(values: &[f32], reference: &[f32]) -> f64 {
    if values.len() != reference.len() {
        return f64::INFINITY;
    }
    let scale = reference
        .iter()
        .fold(0f64, |m, r| m.max(f64::from(r.abs())));
    let diff = values
        .iter()
        .zip(reference)
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0f64, |m, e| {
            if e.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(e)
            }
        });
    if values.iter().any(|v| !v.is_finite()) || diff.is_nan() {
        return f64::INFINITY;
    }
    diff / scale.max(f64::MIN_POSITIVE)
}

/// `n` values in `[-1, 1)` from `seed`, by a counter hash (the same on every machine).
fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let h = mix64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(i));
            // The top 24 bits as a fraction of 2²⁴, exact in f32.
            ((h >> 40) as f32 / 16_777_216.0) * 2.0 - 1.0
        })
        .collect()
}

fn constant<B: Backend, const D: usize>(
    shape: [usize; D],
    seed: u64,
    device: &B::Device,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(values(n, seed), shape), device)
}

fn leaf<B: AutodiffBackend, const D: usize>(
    shape: [usize; D],
    seed: u64,
    device: &B::Device,
) -> Tensor<B, D> {
    constant::<B, D>(shape, seed, device).require_grad()
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 values")
}

/// The forward values of `out` and the gradients of `sum(out ⊙ u)`, for a fixed `u`.
fn backward<B: AutodiffBackend, const D: usize>(out: Tensor<B, D>) -> (Vec<f32>, B::Gradients) {
    let device = out.device();
    let upstream = constant::<B, D>(out.dims(), 99, &device);
    let grads = (out.clone() * upstream).sum().backward();
    (host(out), grads)
}

/// The gradient of `t`, or nothing where it got none (which fails every comparison).
fn grad<B: AutodiffBackend, const D: usize>(t: &Tensor<B, D>, grads: &B::Gradients) -> Vec<f32> {
    t.grad(grads).map(host).unwrap_or_default()
}

/// The outputs of an attention check: its values, then the gradients of `q`, `k` and `v`.
fn qkv_outputs<B: AutodiffBackend>(out: Tensor<B, 4>, [q, k, v]: [&Tensor<B, 4>; 3]) -> Outputs {
    let (y, g) = backward(out);
    vec![
        ("output", y),
        ("d q", grad(q, &g)),
        ("d k", grad(k, &g)),
        ("d v", grad(v, &g)),
    ]
}

/// An NF4 weight of the checks, `[out, in]` (Hugging Face layout).
fn nf4_weight(shape: [usize; 2]) -> Arc<Nf4Tensor> {
    let w: Vec<f32> = values(shape[0] * shape[1], 7)
        .iter()
        .map(|v| v * 0.1)
        .collect();
    Arc::new(Nf4Tensor::quantize(&w, &shape))
}

/// `x · Wᵀ` by [`KilnBackend::nf4_linear`] (`kernel`) or by a matmul with the weight
/// dequantized on the host.
fn nf4_matmul<B: KilnAutodiffBackend>(
    x: Tensor<B, 2>,
    w: &Arc<Nf4Tensor>,
    kernel: bool,
) -> Tensor<B, 2> {
    if kernel {
        float(B::nf4_linear(prim(x), w))
    } else {
        let dense = float::<B, 2>(nf4_linear::dequantized::<B>(w, &x.device()));
        x.matmul(dense.transpose())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relative_error_sees_a_changed_value_a_short_output_and_a_nan() {
        let reference = [1.0, -2.0, 4.0];
        assert_eq!(relative_error(&reference, &reference), 0.0);
        assert!((relative_error(&[1.0, -2.0, 4.4], &reference) - 0.1).abs() < 1e-6);
        assert_eq!(relative_error(&[1.0, -2.0], &reference), f64::INFINITY);
        assert_eq!(
            relative_error(&[1.0, f32::NAN, 4.0], &reference),
            f64::INFINITY
        );
    }

    #[test]
    fn check_values_are_spread_over_the_interval_and_differ_by_seed() {
        let v = values(10_000, 3);
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert_ne!(values(8, 3), values(8, 4));
    }
}
