//! Metric attention: attention logits from a learned diagonal Mahalanobis distance, with
//! BlackHoleRoPE, bounded value-energy gating and soft ball pruning.
//!
//! For query head `h`, `logit(q, k) = -alpha_h * d2_h(q, k) - pen_h(k)` with
//! `d2_h(q, k) = sum_i s_hi (q_i - k_i)^2`, `s_h = softplus(metric_h)` and
//! `alpha_h = softplus(alpha_raw_h)`. Expanded,
//! `-alpha d2 = 2 alpha <s q, k> - alpha |k|_s^2 - alpha |q|_s^2`; the last term is the same
//! for every key of a query, so it cancels in the softmax. What remains is a dot product of augmented vectors:
//!
//! ```text
//! q_aug = [2 alpha s * q, -1]        k_aug = [k, alpha |k|_s^2 + pen(k)]
//! ```
//!
//! so metric attention runs through the same blocked, recomputing attention kernel as every
//! other attention in kiln ([`crate::KilnBackend::kiln_attention`], scale 1): exact, and with
//! activation memory linear in the sequence length.
//!
//! **Choices where the design leaves them open** (DiscoverLM's code is not public):
//! - `s` is shared by the two dimensions of each rotary pair, so `<R_t q, R_u k>_s` depends
//!   on `u - t` only, as with plain RoPE.
//! - `alpha` starts at `1 / (2 sqrt(head_dim))`, so the cross term starts at the usual
//!   `1 / sqrt(head_dim)` dot-product scale; `s` starts at 1.
//! - Ball pruning is soft: a key at distance `delta` outside head `h`'s ball (learned origin
//!   `o_h` and radius `r_h = softplus(.)`, on the key before rotation) loses
//!   `ball_sharpness * delta` from its logit. A hard mask gives the origin and radius no
//!   gradient, so they could never learn; the soft mask tends to the hard one as the
//!   sharpness grows. The penalty is finite, so a query always keeps some attention, to its
//!   nearest keys (the current token among them, unpenalized when inside the ball); exempting
//!   the current token outright would need a per-(query, key) term, i.e. quadratic memory.
//! - BlackHoleRoPE: the angle of pair `i` at position `t` is `t * theta^(-2i/d)` plus
//!   `sum_f A_fi sin(2 pi f t / L) + B_fi cos(2 pi f t / L)` (`L` the longest position,
//!   `A`, `B` learned, starting at 0, i.e. at plain RoPE). The rotation has unit modulus.
//! - Energy gating: values are scaled by `1 + beta * tanh(x w_e)`, a per-token, per-key-head
//!   gate bounded in `[1 - beta, 1 + beta]`, starting at 1.
//! - Multi-query attention shares the key and value projections (one head); each query head
//!   keeps its own metric, temperature and ball.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::activation::{relu, softplus};

use crate::KilnBackend;
use crate::init::Init;
use crate::layers::rope::{AngleRounding, angles, rotate_half};
use crate::ops::{Dense, scale_heads};

/// BlackHoleRoPE's learned Fourier perturbation of the rotary angles.
#[derive(Module, Debug)]
pub struct BlackHoleRope<B: KilnBackend> {
    /// Sine coefficients `[fourier, head_dim / 2]`.
    pub fourier_sin: Param<Tensor<B, 2>>,
    /// Cosine coefficients `[fourier, head_dim / 2]`.
    pub fourier_cos: Param<Tensor<B, 2>>,
}

impl<B: KilnBackend> BlackHoleRope<B> {
    /// cos and sin of the angles, each `[seq, head_dim / 2]`.
    ///
    /// # Shapes
    /// - base: plain RoPE angles `[seq, head_dim / 2]`
    /// - basis: `[seq, 2 * fourier]`, the sines then the cosines of `2 pi f t / L`
    fn tables(&self, base: &Tensor<B, 2>, basis: &Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let coef = Tensor::cat(vec![self.fourier_sin.val(), self.fourier_cos.val()], 0); // [2F, e/2]
        let angles = base.clone() + basis.clone().matmul(coef); // [t, e/2]
        (angles.clone().cos(), angles.sin())
    }
}

/// What every metric attention of a forward pass shares.
#[derive(Debug, Clone)]
pub struct MetricTables<B: Backend> {
    /// Plain RoPE angles `[seq, head_dim / 2]`.
    pub base_angles: Tensor<B, 2>,
    /// Fourier basis `[seq, 2 * fourier]`.
    pub basis: Tensor<B, 2>,
}

impl<B: KilnBackend> MetricTables<B> {
    /// The tables for positions `0..seq`.
    pub fn new(
        seq: usize,
        head_dim: usize,
        theta: f64,
        fourier: usize,
        period: usize,
        device: &B::Device,
    ) -> Self {
        let half = head_dim / 2;
        let base = angles(0..seq, head_dim, theta, AngleRounding::F64Product);
        let mut basis = Vec::with_capacity(seq * 2 * fourier);
        for t in 0..seq {
            let w = 2.0 * std::f64::consts::PI * t as f64 / period.max(1) as f64;
            basis.extend((1..=fourier).map(|f| (w * f as f64).sin() as f32));
            basis.extend((1..=fourier).map(|f| (w * f as f64).cos() as f32));
        }
        Self {
            base_angles: Tensor::from_data(TensorData::new(base, [seq, half]), device),
            basis: Tensor::from_data(TensorData::new(basis, [seq, 2 * fourier]), device),
        }
    }
}

/// Multi-head (or multi-query, one key/value head) metric attention.
#[derive(Module, Debug)]
pub struct MetricAttention<B: KilnBackend> {
    /// `[hidden, heads * head_dim]`.
    pub q_proj: Linear<B>,
    /// `[hidden, kv_heads * head_dim]`.
    pub k_proj: Linear<B>,
    /// `[hidden, kv_heads * head_dim]`.
    pub v_proj: Linear<B>,
    /// `[heads * head_dim, hidden]`.
    pub o_proj: Linear<B>,
    /// Value energy gate `[hidden, kv_heads]`, starting at zero (gate 1).
    pub energy: Linear<B>,
    /// Raw metric `[heads, head_dim / 2]`: `s = softplus(metric)`, shared by rotary pairs.
    pub metric: Param<Tensor<B, 2>>,
    /// Raw inverse temperature `[heads]`: `alpha = softplus(alpha)`.
    pub alpha: Param<Tensor<B, 1>>,
    /// Ball origins `[heads, head_dim]`.
    pub origin: Param<Tensor<B, 2>>,
    /// Raw ball radii `[heads]`: `r = softplus(radius)`.
    pub radius: Param<Tensor<B, 1>>,
    /// BlackHoleRoPE perturbation; absent with no Fourier terms.
    pub rope: Option<BlackHoleRope<B>>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads: `num_heads`, or 1 for multi-query attention.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Bound of the energy gate.
    pub energy_beta: f64,
    /// Logit penalty per unit of distance outside the ball (0: off).
    pub ball_sharpness: f64,
}

/// The inverse of softplus, for initial values.
fn softplus_inverse(y: f64) -> f64 {
    if y > 20.0 { y } else { y.exp_m1().ln() }
}

/// Geometry of one metric attention call, kept for the triangle regularizer.
#[derive(Debug, Clone)]
pub struct Geometry<B: Backend> {
    /// Rotated queries `[batch, seq, heads, head_dim]`.
    pub q: Tensor<B, 4>,
    /// Rotated keys, one per query head `[batch, seq, heads, head_dim]`.
    pub k: Tensor<B, 4>,
    /// Metric `[heads, head_dim]`.
    pub s: Tensor<B, 2>,
}

impl<B: KilnBackend> MetricAttention<B> {
    /// A metric attention named `prefix`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        init: &Init,
        prefix: &str,
        hidden: usize,
        heads: usize,
        kv_heads: usize,
        fourier: usize,
        energy_beta: f64,
        ball_sharpness: f64,
        std: f64,
        device: &B::Device,
    ) -> Self {
        let e = hidden / heads;
        let full = |v: f64, shape: Vec<usize>| -> Tensor<B, 1> {
            let n: usize = shape.iter().product();
            Tensor::from_data(TensorData::new(vec![v as f32; n], [n]), device)
        };
        let alpha0 = 1.0 / (2.0 * (e as f64).sqrt());
        let radius0 = 2.0 * (e as f64).sqrt();
        Self {
            q_proj: init.linear(
                &format!("{prefix}.q_proj"),
                hidden,
                heads * e,
                false,
                std,
                device,
            ),
            k_proj: init.linear(
                &format!("{prefix}.k_proj"),
                hidden,
                kv_heads * e,
                false,
                std,
                device,
            ),
            v_proj: init.linear(
                &format!("{prefix}.v_proj"),
                hidden,
                kv_heads * e,
                false,
                std,
                device,
            ),
            o_proj: init.linear(
                &format!("{prefix}.o_proj"),
                heads * e,
                hidden,
                false,
                std,
                device,
            ),
            energy: Linear {
                weight: Param::from_tensor(Tensor::zeros([hidden, kv_heads], device)),
                bias: None,
            },
            metric: Param::from_tensor(
                full(softplus_inverse(1.0), vec![heads, e / 2]).reshape([heads, e / 2]),
            ),
            alpha: Param::from_tensor(full(softplus_inverse(alpha0), vec![heads])),
            origin: Param::from_tensor(Tensor::zeros([heads, e], device)),
            radius: Param::from_tensor(full(softplus_inverse(radius0), vec![heads])),
            rope: (fourier > 0).then(|| BlackHoleRope {
                fourier_sin: Param::from_tensor(Tensor::zeros([fourier, e / 2], device)),
                fourier_cos: Param::from_tensor(Tensor::zeros([fourier, e / 2], device)),
            }),
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: e,
            energy_beta,
            ball_sharpness,
        }
    }

    /// The metric `s = softplus(metric)`, expanded to both dimensions of each rotary pair.
    ///
    /// # Shapes
    /// - returns `[heads, head_dim]`
    pub fn metric_weights(&self) -> Tensor<B, 2> {
        let s = softplus(self.metric.val(), 1.0); // [h, e/2]
        Tensor::cat(vec![s.clone(), s], 1)
    }

    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`, with the rotated queries and
    ///   keys for the triangle regularizer
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        tables: &MetricTables<B>,
    ) -> (Tensor<B, 3>, Geometry<B>) {
        let [b, t, _] = x.dims();
        let (h, kvh, e) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.dense(x.clone()).reshape([b, t, h, e]); // [b, t, h, e]
        let k = self.k_proj.dense(x.clone()).reshape([b, t, kvh, e]); // [b, t, kvh, e]
        let v = self.v_proj.dense(x.clone()).reshape([b, t, kvh, e]); // [b, t, kvh, e]
        // Bounded energy gate on the values: 1 + beta * tanh(x w), in [1 - beta, 1 + beta].
        let gate = self
            .energy
            .dense(x)
            .tanh()
            .mul_scalar(self.energy_beta)
            .add_scalar(1.0)
            .reshape([b, t * kvh, 1]);
        // One scale per (position, head) row; v's gradient arrives as a view of the
        // attention's, which a broadcast product would walk element by element.
        let v = crate::ops::scale_rows(v.reshape([b, t * kvh, e]), gate).reshape([b, t, kvh, e]);

        // Ball penalty per query head on the key before rotation: sharpness * relu(|k - o| - r).
        let pen = (self.ball_sharpness > 0.0).then(|| {
            // Rows of [b * t, h * e] against one shared row: the broadcast Flex vectorizes.
            // A shared key head (kvh = 1) is measured against every query head's ball.
            let k_heads = if kvh == h {
                k.clone()
            } else {
                k.clone().repeat_dim(2, h / kvh)
            };
            let o = self.origin.val().reshape([1, h * e]);
            let centred = (k_heads.reshape([b * t, h * e]) - o).reshape([b, t, h, e]);
            let dist = centred.square().sum_dim(3).add_scalar(1e-6).sqrt(); // [b, t, h, 1]
            let r = softplus(self.radius.val(), 1.0).reshape([1, h]);
            relu(dist.reshape([b * t, h]) - r)
                .mul_scalar(self.ball_sharpness)
                .reshape([b, t, h, 1])
        });

        let (cos, sin) = match &self.rope {
            Some(r) => r.tables(&tables.base_angles, &tables.basis),
            None => (
                tables.base_angles.clone().cos(),
                tables.base_angles.clone().sin(),
            ),
        };
        let q = rotate_half(q, &cos, &sin);
        let k = rotate_half(k, &cos, &sin);
        let (k, v) = if kvh == h {
            (k, v)
        } else {
            (k.repeat_dim(2, h), v.repeat_dim(2, h)) // [b, t, h, e]
        };
        let s = self.metric_weights(); // [h, e]
        let alpha = softplus(self.alpha.val(), 1.0); // [h]
        let (q_aug, k_aug) = augment(q.clone(), k.clone(), s.clone(), alpha, pen);
        let out = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(B::kiln_attention(
            q_aug.swap_dims(1, 2).into_primitive().tensor(), // [b, h, t, e+1]
            k_aug.swap_dims(1, 2).into_primitive().tensor(), // [b, h, t, e+1]
            v.swap_dims(1, 2).into_primitive().tensor(),     // [b, h, t, e]
            None,
            1.0,
            true,
        ))); // [b, h, t, e]
        let out = out.swap_dims(1, 2).reshape([b, t, h * e]);
        (self.o_proj.dense(out), Geometry { q, k, s })
    }
}

/// The augmented queries and keys whose dot product is the metric logit up to a per-query
/// constant: `q_aug . k_aug = -alpha d2(q, k) - pen(k) + alpha |q|_s^2`.
///
/// # Shapes
/// - q, k: `[batch, seq, heads, head_dim]`; s: `[heads, head_dim]`; alpha: `[heads]`;
///   pen: `[batch, seq, heads, 1]`
/// - returns both `[batch, seq, heads, head_dim + 1]`
pub fn augment<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    s: Tensor<B, 2>,
    alpha: Tensor<B, 1>,
    pen: Option<Tensor<B, 4>>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, t, h, _] = q.dims();
    // 2 alpha_h s_h, and alpha_h s_h, per head and dimension.
    let a = alpha.reshape([h, 1]);
    let q_aug = Tensor::cat(
        vec![
            scale_heads(q.clone(), s.clone() * a.clone().mul_scalar(2.0)),
            Tensor::<B, 4>::ones([b, t, h, 1], &q.device()).neg(),
        ],
        3,
    );
    let norm = scale_heads(k.clone().square(), s * a).sum_dim(3); // [b, t, h, 1]
    let last = match pen {
        Some(p) => norm + p,
        None => norm,
    };
    (q_aug, Tensor::cat(vec![k, last], 3))
}

/// Metric attention logits by their definition, `-alpha_h * sum_i s_hi (q_i - k_i)^2`, for
/// every query and key (quadratic memory: for tests and diagnostics).
///
/// # Shapes
/// - q: `[batch, heads, seq_q, head_dim]`; k: `[batch, heads, seq_k, head_dim]`;
///   s: `[heads, head_dim]`; alpha: `[heads]`
/// - returns `[batch, heads, seq_q, seq_k]`
pub fn metric_logits<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    s: Tensor<B, 2>,
    alpha: Tensor<B, 1>,
) -> Tensor<B, 4> {
    let [b, h, tq, e] = q.dims();
    let tk = k.dims()[2];
    let diff = q.reshape([b, h, tq, 1, e]) - k.reshape([b, h, 1, tk, e]); // [b, h, tq, tk, e]
    let d2 = (diff.square() * s.reshape([1, h, 1, 1, e])).sum_dim(4); // [b, h, tq, tk, 1]
    d2.reshape([b, h, tq, tk]) * alpha.reshape([1, h, 1, 1]).neg()
}

/// The triangle-inequality violation `relu(d(a, c) - d(a, b) - d(b, c))`, elementwise.
pub fn triangle_violation<B: Backend, const D: usize>(
    d_ab: Tensor<B, D>,
    d_bc: Tensor<B, D>,
    d_ac: Tensor<B, D>,
) -> Tensor<B, D> {
    relu(d_ac - d_ab - d_bc)
}

/// The triangle regularizer of one attention call: `samples` random position triples
/// `(a, b, c)` per sequence, and for each head the mean violation with the token distance
/// `d(x, y) = sqrt(d2_s(q_x, k_y) + 1e-6)` (a query of one token against the key of
/// another: zero for a true metric, positive where the learned geometry is inconsistent).
/// Positions are drawn from the backend's generator, which the trainer seeds per step.
pub fn triangle_penalty<B: Backend>(g: &Geometry<B>, samples: usize) -> Tensor<B, 1> {
    let t = g.q.dims()[1];
    let device = g.q.device();
    let draw = || {
        Tensor::<B, 1>::random(
            [samples],
            burn::tensor::Distribution::Uniform(0.0, t as f64),
            &device,
        )
        .int()
        .clamp(0, t as i64 - 1)
    };
    triangle_penalty_at(g, [draw(), draw(), draw()])
}

/// [`triangle_penalty`] at given positions: `[a, b, c]`, each `[samples]`, the same in
/// every sequence of the batch.
pub fn triangle_penalty_at<B: Backend>(
    g: &Geometry<B>,
    [a, bb, c]: [Tensor<B, 1, Int>; 3],
) -> Tensor<B, 1> {
    let [b, t, h, e] = g.q.dims();
    let (device, samples) = (g.q.device(), a.dims()[0]);
    // Rows of the [b * t, h * e] matrices, so that the gather (and its backward) and the
    // product with the shared metric row are the 2D forms the CPU backend vectorizes.
    let offsets = Tensor::<B, 1, Int>::arange(0..b as i64, &device)
        .mul_scalar(t as i64)
        .reshape([b, 1]);
    let rows = |x: &Tensor<B, 1, Int>| {
        (x.clone().reshape([1, samples]) + offsets.clone()).reshape([b * samples])
    };
    let (q, k) = (
        g.q.clone().reshape([b * t, h * e]),
        g.k.clone().reshape([b * t, h * e]),
    );
    let s = g.s.clone().reshape([1, h * e]);
    let dist = |x: &Tensor<B, 1, Int>, y: &Tensor<B, 1, Int>| {
        let qx = q.clone().select(0, rows(x)); // [b * n, h * e]
        let ky = k.clone().select(0, rows(y));
        ((qx - ky).square() * s.clone())
            .reshape([b * samples, h, e])
            .sum_dim(2)
            .add_scalar(1e-6)
            .sqrt()
            .reshape([b, samples, h])
    };
    triangle_violation(dist(&a, &bb), dist(&bb, &c), dist(&a, &c))
        .mean()
        .reshape([1])
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Tolerance;
    use burn::tensor::activation::softmax;

    use super::*;

    type B = Flex;

    fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    #[test]
    fn metric_logits_equal_their_definition() {
        // One head, two dimensions, one query and two keys, computed by hand.
        let q = tensor(vec![1.0, 2.0], [1, 1, 1, 2]);
        let k = tensor(vec![0.0, 0.0, 3.0, 1.0], [1, 1, 2, 2]);
        let s = tensor(vec![0.5, 2.0], [1, 2]);
        let alpha = tensor(vec![3.0], [1]);
        let got = metric_logits(q, k, s, alpha).into_data();
        // key 0: 0.5 * 1 + 2 * 4 = 8.5; key 1: 0.5 * 4 + 2 * 1 = 4.
        let want = TensorData::new(vec![-3.0 * 8.5, -3.0 * 4.0], [1, 1, 1, 2]);
        got.assert_approx_eq::<f32>(&want, Tolerance::default());
    }

    #[test]
    fn augmented_dot_products_give_the_metric_softmax() {
        let (b, t, h, e) = (2, 5, 3, 4);
        let wave = |seed: f32, n: usize| (0..n).map(|i| ((i as f32) * seed).sin()).collect();
        let q = tensor(wave(0.7, b * t * h * e), [b, t, h, e]);
        let k = tensor(wave(1.3, b * t * h * e), [b, t, h, e]);
        let s = tensor(wave(0.4, h * e), [h, e]).abs().add_scalar(0.1);
        let alpha = tensor(vec![0.3, 1.0, 2.0], [h]);
        let (qa, ka) = augment(q.clone(), k.clone(), s.clone(), alpha.clone(), None);
        let dots = qa
            .swap_dims(1, 2)
            .matmul(ka.swap_dims(1, 2).swap_dims(2, 3));
        let want = metric_logits(q.swap_dims(1, 2), k.swap_dims(1, 2), s, alpha);
        softmax(dots, 3)
            .into_data()
            .assert_approx_eq::<f32>(&softmax(want, 3).into_data(), Tolerance::absolute(1e-5));
    }

    #[test]
    fn the_triangle_violation_is_zero_on_a_metric_and_positive_when_violated() {
        // Euclidean distances between 3 points on a line: 0, 1, 3.
        let ok = triangle_violation(
            tensor(vec![1.0], [1]),
            tensor(vec![2.0], [1]),
            tensor(vec![3.0], [1]),
        );
        assert_eq!(ok.into_scalar(), 0.0);
        // d(a, c) = 5 > d(a, b) + d(b, c) = 1 + 1.
        let bad = triangle_violation(
            tensor(vec![1.0], [1]),
            tensor(vec![1.0], [1]),
            tensor(vec![5.0], [1]),
        );
        assert_eq!(bad.into_scalar(), 3.0);
        // The sampled penalty of a geometry where each token's query is its key is a true
        // (weighted Euclidean) metric: zero up to the epsilon under the root.
        let x = tensor(
            (0..2 * 6 * 2 * 4)
                .map(|i| (i as f32 * 0.37).sin())
                .collect(),
            [2, 6, 2, 4],
        );
        let g = Geometry {
            q: x.clone(),
            k: x,
            s: tensor(vec![0.5; 8], [2, 4]),
        };
        assert!(triangle_penalty(&g, 32).into_scalar() < 1e-3);
        // Three tokens whose queries and keys disagree: d(0, 2) = |q0 - k2| = 10 while
        // d(0, 1) = |q0 - k1| = 0 and d(1, 2) = |q1 - k2| = 0, so sampling finds violations.
        let q = tensor(vec![0.0, 10.0, 0.0], [1, 3, 1, 1]);
        let k = tensor(vec![5.0, 0.0, 10.0], [1, 3, 1, 1]);
        let g = Geometry {
            q,
            k,
            s: tensor(vec![1.0], [1, 1]),
        };
        assert!(triangle_penalty(&g, 512).into_scalar() > 0.1);
    }

    /// The penalty at given positions is the mean over batch rows, samples and heads of the
    /// violation computed from each batch row's own queries and keys, checked against loops
    /// over the values.
    #[test]
    fn the_triangle_penalty_measures_each_sequence_at_its_drawn_positions() {
        let device = Default::default();
        let (b, t, h, e, n) = (3usize, 7usize, 2usize, 4usize, 16usize);
        let wave = |seed: f32| -> Vec<f32> {
            (0..b * t * h * e)
                .map(|i| (i as f32 * seed).sin() * (1.0 + (i / (t * h * e)) as f32))
                .collect()
        };
        let (qs, ks) = (wave(0.37), wave(0.91));
        let ss: Vec<f32> = (0..h * e).map(|i| 0.5 + i as f32 * 0.1).collect();
        let g = Geometry {
            q: tensor(qs.clone(), [b, t, h, e]),
            k: tensor(ks.clone(), [b, t, h, e]),
            s: tensor(ss.clone(), [h, e]),
        };
        let pos = |seed: usize| -> Vec<i64> {
            (0..n)
                .map(|j| ((j * 5 + seed) * (j + 3 * seed) % t) as i64)
                .collect()
        };
        let (pa, pb, pc) = (pos(3), pos(5), pos(2));
        let int =
            |v: &Vec<i64>| Tensor::<B, 1, Int>::from_data(TensorData::new(v.clone(), [n]), &device);
        let got = triangle_penalty_at(&g, [int(&pa), int(&pb), int(&pc)]).into_scalar();
        let d = |bi: usize, x: i64, y: i64, head: usize| {
            let at = |v: &[f32], p: i64, i: usize| v[((bi * t + p as usize) * h + head) * e + i];
            let d2: f32 = (0..e)
                .map(|i| ss[head * e + i] * (at(&qs, x, i) - at(&ks, y, i)).powi(2))
                .sum();
            (d2 + 1e-6).sqrt()
        };
        let mut total = 0.0f32;
        for bi in 0..b {
            for j in 0..n {
                for head in 0..h {
                    let (x, y, z) = (pa[j], pb[j], pc[j]);
                    total += (d(bi, x, z, head) - d(bi, x, y, head) - d(bi, y, z, head)).max(0.0);
                }
            }
        }
        let want = total / (b * n * h) as f32;
        assert!(
            want > 0.01,
            "the geometry violates the inequality somewhere"
        );
        assert!((got - want).abs() < 1e-4 * want.max(1.0), "{got} != {want}");
    }

    #[test]
    fn the_ball_penalty_trains_origin_and_radius() {
        type A = Autodiff<Flex>;
        let device = Default::default();
        let mut att =
            MetricAttention::<A>::new(&Init::new(1), "a", 8, 2, 2, 2, 0.5, 4.0, 0.5, &device);
        // A radius about the keys' typical distance from the origin (0.7 to 1.7 here) puts some inside the
        // ball and some outside (with every key outside, the penalty of a query's keys
        // would shift together and the softmax would not feel the radius).
        let r = softplus_inverse(1.2) as f32;
        att.radius =
            Param::from_tensor(Tensor::from_data(TensorData::new(vec![r, r], [2]), &device));
        let x = Tensor::<A, 3>::from_data(
            TensorData::new(
                (0..2 * 5 * 8).map(|i| (i as f32 * 0.3).cos()).collect(),
                [2, 5, 8],
            ),
            &device,
        );
        let tables = MetricTables::new(5, 4, 10_000.0, 2, 64, &device);
        let (y, _) = att.forward(x, &tables);
        let grads = y.sum().backward();
        let g = |p: &Param<Tensor<A, 1>>| p.val().grad(&grads).expect("gradient").abs().sum();
        assert!(g(&att.radius).into_scalar() > 0.0);
        assert!(
            att.origin
                .val()
                .grad(&grads)
                .expect("gradient")
                .abs()
                .sum()
                .into_scalar()
                > 0.0
        );
    }
}
