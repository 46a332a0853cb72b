//! DiscoverLM's mixture-of-attentions language model (MoA, "Structure Over Scale").
//!
//! A tied token embedding, `num_layers` MoA blocks and a final RMSNorm. Each block is two
//! pre-norm residual branches, each behind DropPath:
//!
//! 1. **MoA mixer**: a learned router scores four paths per token and keeps the top-2
//!    (weights renormalized by a softmax over the two kept logits):
//!    - `conv`: local causal depthwise convolution, SiLU, pointwise projection;
//!    - `attn`: multi-head metric attention ([`metric`]: negative diagonal-Mahalanobis
//!      logits, BlackHoleRoPE, energy-gated values, soft ball pruning);
//!    - `mix`: gated channel mixing, `out(sigmoid(x W_g) * x W_v)`;
//!    - `mqa`: multi-query metric attention (one shared key/value head).
//!
//!    Each path's output is scaled by a learned per-channel feature gate `2 sigmoid(g)`
//!    (starting at 1) before the routed sum.
//! 2. **HyperFFN**: a second router keeps the top-2 of three experts: a SwiGLU MLP, a causal
//!    depthwise-separable convolution (depthwise causal conv, SiLU, pointwise), and a gated
//!    low-rank bottleneck `b(silu(x a) * sigmoid(x g))`.
//!
//! Auxiliary losses (named, already weighted, averaged over layers): `balance`, the
//! routers' load-balancing term `P * sum_p f_p * mean_prob_p` (Switch Transformer's; 1 at
//! uniform use) and `triangle`, the triangle-inequality regularizer of both metric
//! attentions on randomly sampled token triples ([`metric::triangle_penalty`]). Statistics:
//! each router's path usage (fraction of tokens that kept each path) and confidence (mean
//! top probability), which the trainer logs and dream consolidation reads.
//!
//! **Choices where the design leaves them open** (no public code; the paper and the model
//! cards are the specification):
//! - Every path is computed for every token and the routed sum multiplies the unselected
//!   ones by an exact zero (so they get no gradient). Computing only the selected tokens
//!   of each path is a gather/scatter per path that pays off only once the paths are
//!   large; the metric attentions need every token's keys anyway.
//! - Router: a bias-free linear layer on the normed input; top-k by logit, ties to the
//!   lower path index. Feature gates are per channel and per path, not per token, so the
//!   router alone decides per token.
//! - DropPath drops a branch for a whole sequence, at a rate rising linearly from 0 at the
//!   first block to `drop_path` at the last, and scales kept branches by `1 / (1 - rate)`.
//! - The embedding is tied to the output head, as in the model card; there is no position
//!   embedding besides the metric attentions' rotations.
//! - The metric attention choices are listed in [`metric`].
//!
//! Reference: DiscoverLM-70M / MoA model cards and "Structure Over Scale" (CPU FP32
//! training with a developmental curriculum).

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;
use burn::tensor::activation::{sigmoid, silu, softmax};

use kiln_recipe::MoaSection;

use crate::family::{Family, FamilyConfig};
use crate::init::Init;
use crate::layers::{RmsNorm, SwiGlu, TokenEmbedding, lm_head};
use crate::ops::{Dense, causal_depthwise};
use crate::{Aux, KilnBackend, RouterPaths};

pub mod metric;

pub use metric::{Geometry, MetricAttention, MetricTables};

/// The MoA mixer's paths, in router order.
pub const MOA_PATHS: [&str; 4] = ["conv", "attn", "mix", "mqa"];
/// The HyperFFN's experts, in router order.
pub const FFN_EXPERTS: [&str; 3] = ["swiglu", "conv", "lowrank"];

/// A resolved MoA configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MoaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Blocks.
    pub num_layers: usize,
    /// Metric attention heads.
    pub num_heads: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Low-rank expert rank.
    pub ffn_rank: usize,
    /// Depthwise kernel.
    pub conv_kernel: usize,
    /// Paths kept per token.
    pub top_k: usize,
    /// Last block's DropPath rate.
    pub drop_path: f64,
    /// Longest sequence (Fourier period).
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// BlackHoleRoPE Fourier terms.
    pub rope_fourier: usize,
    /// Energy gate bound.
    pub energy_beta: f64,
    /// Ball pruning sharpness.
    pub ball_sharpness: f64,
    /// Triangle regularizer weight.
    pub triangle_weight: f64,
    /// Triples per sequence.
    pub triangle_samples: usize,
    /// Load-balancing weight.
    pub balance_weight: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Init standard deviation.
    pub initializer_range: f64,
}

/// One line of the parameter budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    /// What it is.
    pub name: &'static str,
    /// Parameters.
    pub params: u64,
}

impl MoaConfig {
    /// The configuration of a recipe's `[model.moa]`.
    pub fn from_section(s: &MoaSection) -> Self {
        Self {
            vocab_size: s.vocab_size,
            hidden_size: s.hidden_size,
            num_layers: s.num_layers,
            num_heads: s.num_heads,
            intermediate_size: s.intermediate_size,
            ffn_rank: s.ffn_rank.unwrap_or((s.hidden_size / 8).max(1)),
            conv_kernel: s.conv_kernel,
            top_k: s.top_k,
            drop_path: s.drop_path,
            max_position_embeddings: s.max_position_embeddings,
            rope_theta: s.rope_theta,
            rope_fourier: s.rope_fourier,
            energy_beta: s.energy_beta,
            ball_sharpness: s.ball_sharpness,
            triangle_weight: s.triangle_weight,
            triangle_samples: s.triangle_samples,
            balance_weight: s.balance_weight,
            rms_norm_eps: s.rms_norm_eps,
            initializer_range: s.initializer_range,
        }
    }

    /// Width of a head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Parameters of one metric attention with `kv_heads` key/value heads.
    fn attention_params(&self, kv_heads: usize) -> u64 {
        let (d, h, e, f) = (
            self.hidden_size as u64,
            self.num_heads as u64,
            self.head_dim() as u64,
            self.rope_fourier as u64,
        );
        let kv = kv_heads as u64;
        // q, k, v, o, energy; metric, alpha, origin, radius; the Fourier coefficients.
        2 * d * d + 2 * d * kv * e + d * kv + h * e / 2 + h + h * e + h + f * e
    }

    /// Parameters of the four paths, in router order.
    fn path_params(&self) -> [u64; 4] {
        let (d, k) = (self.hidden_size as u64, self.conv_kernel as u64);
        [
            d * k + d * d,
            self.attention_params(self.num_heads),
            3 * d * d,
            self.attention_params(1),
        ]
    }

    /// Parameters of the three HyperFFN experts, in router order.
    fn expert_params(&self) -> [u64; 3] {
        let (d, k) = (self.hidden_size as u64, self.conv_kernel as u64);
        let (i, r) = (self.intermediate_size as u64, self.ffn_rank as u64);
        [3 * d * i, d * k + d * d, 3 * d * r]
    }

    /// The parameter budget by component, as in the paper's table.
    pub fn components(&self) -> Vec<Component> {
        let (d, v, l) = (
            self.hidden_size as u64,
            self.vocab_size as u64,
            self.num_layers as u64,
        );
        let p = self.path_params();
        let x = self.expert_params();
        let c = |name, params| Component { name, params };
        vec![
            c("embedding (tied to the head)", v * d),
            c("MoA: local causal conv", l * p[0]),
            c("MoA: multi-head metric attention", l * p[1]),
            c("MoA: gated channel mixing", l * p[2]),
            c("MoA: multi-query metric attention", l * p[3]),
            c("MoA: router + feature gates", l * (4 * d + 4 * d)),
            c("HyperFFN: SwiGLU", l * x[0]),
            c("HyperFFN: depthwise-separable conv", l * x[1]),
            c("HyperFFN: gated low-rank", l * x[2]),
            c("HyperFFN: router", l * 3 * d),
            c("norms", l * 2 * d + d),
            c("head (tied: no parameters of its own)", 0),
        ]
    }

    /// Parameters a token uses (the embedding row and head, norms, routers, and its
    /// `top_k` paths and experts): the least and the most over routing choices.
    pub fn active_params(&self) -> (u64, u64) {
        let shared = self.num_params()
            - self.num_layers as u64
                * (self.path_params().iter().sum::<u64>()
                    + self.expert_params().iter().sum::<u64>());
        let pick = |mut v: Vec<u64>, k: usize, most: bool| -> u64 {
            v.sort_unstable();
            if most {
                v.iter().rev().take(k).sum()
            } else {
                v.iter().take(k).sum()
            }
        };
        let per_layer = |most| {
            pick(self.path_params().to_vec(), self.top_k, most)
                + pick(self.expert_params().to_vec(), self.top_k.min(3), most)
        };
        let l = self.num_layers as u64;
        (shared + l * per_layer(false), shared + l * per_layer(true))
    }

    /// Builds the model with random weights drawn from `init`.
    pub fn init<B: KilnBackend>(&self, init: &Init, device: &B::Device) -> MoaModel<B> {
        let (d, std) = (self.hidden_size, self.initializer_range);
        let lin = |name: String, i: usize, o: usize| init.linear(&name, i, o, false, std, device);
        let conv = |p: String| CausalConv {
            weight: init.normal(&format!("{p}.weight"), [d, self.conv_kernel], std, device),
            proj: lin(format!("{p}.proj"), d, d),
        };
        let attn = |p: String, kv: usize| {
            MetricAttention::new(
                init,
                &p,
                d,
                self.num_heads,
                kv,
                self.rope_fourier,
                self.energy_beta,
                self.ball_sharpness,
                std,
                device,
            )
        };
        let l = self.num_layers;
        let blocks = (0..l)
            .map(|i| {
                let p = format!("blocks.{i}");
                let (m, f) = (format!("{p}.moa"), format!("{p}.ffn"));
                MoaBlock {
                    norm1: RmsNorm::new(d, self.rms_norm_eps, device),
                    moa: MoaMixer {
                        router: lin(format!("{m}.router"), d, MOA_PATHS.len()),
                        gates: Param::from_tensor(Tensor::zeros([MOA_PATHS.len(), d], device)),
                        conv: conv(format!("{m}.conv")),
                        attn: attn(format!("{m}.attn"), self.num_heads),
                        mix: ChannelMix {
                            gate: lin(format!("{m}.mix.gate"), d, d),
                            value: lin(format!("{m}.mix.value"), d, d),
                            out: lin(format!("{m}.mix.out"), d, d),
                        },
                        mqa: attn(format!("{m}.mqa"), 1),
                    },
                    norm2: RmsNorm::new(d, self.rms_norm_eps, device),
                    ffn: HyperFfn {
                        router: lin(format!("{f}.router"), d, FFN_EXPERTS.len()),
                        swiglu: SwiGlu::new(
                            init,
                            &format!("{f}.swiglu"),
                            [d, self.intermediate_size],
                            std,
                            device,
                        ),
                        conv: conv(format!("{f}.conv")),
                        lowrank: LowRank {
                            a: lin(format!("{f}.lowrank.a"), d, self.ffn_rank),
                            g: lin(format!("{f}.lowrank.g"), d, self.ffn_rank),
                            b: lin(format!("{f}.lowrank.b"), self.ffn_rank, d),
                        },
                    },
                    drop_path: if l > 1 {
                        self.drop_path * i as f64 / (l - 1) as f64
                    } else {
                        self.drop_path
                    },
                    top_k: self.top_k,
                    triangle_weight: self.triangle_weight / l as f64,
                    triangle_samples: self.triangle_samples,
                    balance_weight: self.balance_weight / l as f64,
                }
            })
            .collect();
        MoaModel {
            embed_tokens: TokenEmbedding::new(
                init,
                "embed_tokens.weight",
                [self.vocab_size, d],
                std,
                device,
            ),
            blocks,
            norm: RmsNorm::new(d, self.rms_norm_eps, device),
            config: self.clone(),
        }
    }
}

impl FamilyConfig for MoaConfig {
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Number of parameters.
    fn num_params(&self) -> u64 {
        self.components().iter().map(|c| c.params).sum()
    }

    /// Parameters that enter matrix products per token; every path and expert is computed
    /// (see the module docs), so all of them count.
    fn matmul_params(&self) -> u64 {
        let (d, e) = (self.hidden_size as u64, self.head_dim() as u64);
        let (i, r) = (self.intermediate_size as u64, self.ffn_rank as u64);
        let attn = |kv: u64| 2 * d * d + 2 * d * kv * e + d * kv;
        let per_layer = d * d
            + attn(self.num_heads as u64)
            + 3 * d * d
            + attn(1)
            + 4 * d
            + 3 * d * i
            + d * d
            + 3 * d * r
            + 3 * d;
        per_layer * self.num_layers as u64 + self.vocab_size as u64 * d
    }

    /// Training FLOPs per token at sequence length `seq`: `6 * matmul_params` plus, for each
    /// of the two metric attentions of a layer, `12 * heads * (head_dim + 1) * seq`.
    fn flops_per_token(&self, seq: usize) -> f64 {
        let attn = 2.0
            * 12.0
            * self.num_layers as f64
            * (self.num_heads * (self.head_dim() + 1)) as f64
            * seq as f64;
        6.0 * self.matmul_params() as f64 + attn
    }

    /// Rough bytes of activations kept for the backward pass per token (f32): inputs of the
    /// matrix products and the gated intermediates of every path and expert, and the logits
    /// with their gradient. With checkpointing, one layer's plus every layer's input.
    fn activation_bytes_per_token(&self, seq: usize, checkpointed: bool) -> u64 {
        let (d, i, r) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.ffn_rank as u64,
        );
        let per_layer = 40 * d + 5 * i + 4 * r;
        crate::attention_activation_bytes(
            [per_layer, self.num_layers as u64, d],
            self.num_heads,
            seq,
            self.vocab_size,
            checkpointed,
        )
    }
}

/// A causal depthwise convolution, SiLU, then a pointwise projection (the `conv` path and
/// the HyperFFN's depthwise-separable expert).
#[derive(Module, Debug)]
pub struct CausalConv<B: KilnBackend> {
    /// Depthwise taps `[hidden, kernel]`.
    pub weight: Param<Tensor<B, 2>>,
    /// Pointwise `[hidden, hidden]`.
    pub proj: Linear<B>,
}

impl<B: KilnBackend> CausalConv<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.proj
            .dense(silu(causal_depthwise(x, self.weight.val())))
    }
}

/// Gated channel mixing: `out(sigmoid(x W_g) * x W_v)`.
#[derive(Module, Debug)]
pub struct ChannelMix<B: KilnBackend> {
    /// `[hidden, hidden]`.
    pub gate: Linear<B>,
    /// `[hidden, hidden]`.
    pub value: Linear<B>,
    /// `[hidden, hidden]`.
    pub out: Linear<B>,
}

impl<B: KilnBackend> ChannelMix<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let g = sigmoid(self.gate.dense(x.clone()));
        self.out.dense(g * self.value.dense(x))
    }
}

/// Gated low-rank bottleneck expert: `b(silu(x a) * sigmoid(x g))`.
#[derive(Module, Debug)]
pub struct LowRank<B: KilnBackend> {
    /// `[hidden, rank]`.
    pub a: Linear<B>,
    /// `[hidden, rank]`.
    pub g: Linear<B>,
    /// `[rank, hidden]`.
    pub b: Linear<B>,
}

/// A router's decision for every token.
#[derive(Debug)]
pub struct Routing<B: Backend> {
    /// `[batch, seq, paths]`: the renormalized weights, exactly zero off the top-k.
    pub weights: Tensor<B, 3>,
    /// The load-balancing term `paths * sum_p f_p * mean_prob_p`, `[1]`.
    pub balance: Tensor<B, 1>,
    /// Path usage (fraction of tokens keeping each path), then the mean top probability:
    /// `[paths + 1]`, detached.
    pub stats: Tensor<B, 1>,
}

/// Routes every token to its `k` highest-scoring paths.
///
/// # Shapes
/// - logits: `[batch, seq, paths]`
pub fn route<B: Backend>(logits: Tensor<B, 3>, k: usize) -> Routing<B> {
    let [b, t, p] = logits.dims();
    let device = logits.device();
    let (_, idx) = logits.clone().detach().topk_with_indices(k, 2); // [b, t, k]
    let mask = Tensor::<B, 3>::zeros([b, t, p], &device).scatter(
        2,
        idx,
        Tensor::ones([b, t, k], &device),
        IndexingUpdateOp::Add,
    ); // [b, t, p], 1 on the kept paths
    // A softmax over the kept logits only: the others get exp(-1e9) = 0 exactly.
    let weights = softmax(
        logits.clone() + mask.clone().sub_scalar(1.0).mul_scalar(1e9),
        2,
    );
    let probs = softmax(logits, 2);
    let usage = mask.reshape([b * t, p]).mean_dim(0).reshape([p]); // [p]
    let mean_prob = probs.clone().reshape([b * t, p]).mean_dim(0).reshape([p]); // [p]
    let balance = (usage.clone().div_scalar(k as f64) * mean_prob)
        .sum()
        .mul_scalar(p as f64);
    let confidence = probs.detach().max_dim(2).mean().reshape([1]);
    Routing {
        weights,
        balance,
        stats: Tensor::cat(vec![usage, confidence], 0),
    }
}

/// The weighted sum of path outputs.
///
/// # Shapes
/// - outs: each `[batch, seq, hidden]`; weights: `[batch, seq, paths]`
fn combine<B: KilnBackend>(outs: Vec<Tensor<B, 3>>, weights: &Tensor<B, 3>) -> Tensor<B, 3> {
    outs.into_iter()
        .enumerate()
        .map(|(p, out)| crate::ops::scale_rows(out, weights.clone().narrow(2, p, 1)))
        .reduce(|a, b| a + b)
        .expect("at least one path")
}

/// The four-path mixer.
#[derive(Module, Debug)]
pub struct MoaMixer<B: KilnBackend> {
    /// Router `[hidden, 4]`.
    pub router: Linear<B>,
    /// Feature gates `[4, hidden]`: path `p`'s output is scaled by `2 sigmoid(gates[p])`.
    pub gates: Param<Tensor<B, 2>>,
    /// Local causal depthwise conv path.
    pub conv: CausalConv<B>,
    /// Multi-head metric attention path.
    pub attn: MetricAttention<B>,
    /// Gated channel mixing path.
    pub mix: ChannelMix<B>,
    /// Multi-query metric attention path.
    pub mqa: MetricAttention<B>,
}

/// The HyperFFN: three experts, top-k routed.
#[derive(Module, Debug)]
pub struct HyperFfn<B: KilnBackend> {
    /// Router `[hidden, 3]`.
    pub router: Linear<B>,
    /// SwiGLU expert.
    pub swiglu: SwiGlu<B>,
    /// Causal depthwise-separable conv expert.
    pub conv: CausalConv<B>,
    /// Gated low-rank expert.
    pub lowrank: LowRank<B>,
}

/// One MoA block.
#[derive(Module, Debug)]
pub struct MoaBlock<B: KilnBackend> {
    /// Norm before the mixer.
    pub norm1: RmsNorm<B>,
    /// The four-path mixer.
    pub moa: MoaMixer<B>,
    /// Norm before the HyperFFN.
    pub norm2: RmsNorm<B>,
    /// The HyperFFN.
    pub ffn: HyperFfn<B>,
    /// This block's DropPath rate.
    pub drop_path: f64,
    /// Paths kept per token.
    pub top_k: usize,
    /// Triangle weight, already divided by the number of layers.
    pub triangle_weight: f64,
    /// Triples sampled per sequence.
    pub triangle_samples: usize,
    /// Balance weight, already divided by the number of layers.
    pub balance_weight: f64,
}

impl<B: KilnBackend> MoaBlock<B> {
    /// Block `index` (its name in statistics).
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(
        &self,
        index: usize,
        x: Tensor<B, 3>,
        tables: &MetricTables<B>,
        aux: &mut Aux<B>,
    ) -> Tensor<B, 3> {
        let training = B::ad_enabled(&x.device());
        let h = self.norm1.forward(x.clone());
        let m = &self.moa;
        let routing = route(m.router.dense(h.clone()), self.top_k);
        let (attn, g1) = m.attn.forward(h.clone(), tables);
        let (mqa, g2) = m.mqa.forward(h.clone(), tables);
        let gates = sigmoid(m.gates.val()).mul_scalar(2.0); // [4, d]
        let d = gates.dims()[1];
        let outs: Vec<Tensor<B, 3>> = [m.conv.forward(h.clone()), attn, m.mix.forward(h), mqa]
            .into_iter()
            .enumerate()
            .map(|(p, o)| o * gates.clone().narrow(0, p, 1).reshape([1, 1, d]))
            .collect();
        let x = x + self.drop(combine(outs, &routing.weights));
        aux.stats
            .push((format!("blocks.{index}.moa.router"), routing.stats));
        if training && self.triangle_weight > 0.0 {
            let tri = metric::triangle_penalty(&g1, self.triangle_samples)
                + metric::triangle_penalty(&g2, self.triangle_samples);
            aux.losses.push((
                "triangle".to_string(),
                tri.mul_scalar(self.triangle_weight / 2.0),
            ));
        }

        let f = &self.ffn;
        let h = self.norm2.forward(x.clone());
        let ffn_routing = route(f.router.dense(h.clone()), self.top_k.min(3));
        let swiglu = f.swiglu.forward(h.clone());
        let lr = &f.lowrank;
        let lowrank =
            lr.b.dense(silu(lr.a.dense(h.clone())) * sigmoid(lr.g.dense(h.clone())));
        let outs = vec![swiglu, f.conv.forward(h), lowrank];
        let x = x + self.drop(combine(outs, &ffn_routing.weights));
        aux.stats
            .push((format!("blocks.{index}.ffn.router"), ffn_routing.stats));
        if training && self.balance_weight > 0.0 {
            aux.losses.push((
                "balance".to_string(),
                (routing.balance + ffn_routing.balance).mul_scalar(self.balance_weight / 2.0),
            ));
        }
        x
    }

    /// DropPath: in training, the whole branch of a sequence is dropped with this block's
    /// rate and kept branches are scaled up to keep the expectation.
    fn drop(&self, y: Tensor<B, 3>) -> Tensor<B, 3> {
        let device = y.device();
        if self.drop_path <= 0.0 || !B::ad_enabled(&device) {
            return y;
        }
        let b = y.dims()[0];
        let keep = 1.0 - self.drop_path;
        let mask = Tensor::<B, 3>::random(
            [b, 1, 1],
            burn::tensor::Distribution::Bernoulli(keep),
            &device,
        );
        y * mask.div_scalar(keep)
    }
}

/// What the blocks of one forward pass share.
#[derive(Debug, Clone)]
pub struct MoaContext<B: Backend> {
    /// Causal bias and rotary tables.
    pub tables: MetricTables<B>,
}

/// The MoA language model.
#[derive(Module, Debug)]
pub struct MoaModel<B: KilnBackend> {
    /// Token embedding `[vocab, hidden]`, also the output head.
    pub embed_tokens: TokenEmbedding<B>,
    /// The blocks.
    pub blocks: Vec<MoaBlock<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// The configuration it was built from.
    #[module(skip)]
    pub config: MoaConfig,
}

/// MoA has no padding mask of its own: [`Family::masked_context`]'s default takes right
/// padding (which a causal model never lets reach a real token) and refuses any other.
impl<B: KilnBackend> Family<B> for MoaModel<B> {
    const NAME: &'static str = "moa";
    type Config = MoaConfig;
    type Context = MoaContext<B>;

    crate::family::config_and_embedding!(embed_tokens);

    /// The causal bias and rotary tables of every block.
    fn context(&self, input_ids: &Tensor<B, 2, Int>) -> MoaContext<B> {
        let c = &self.config;
        MoaContext {
            tables: MetricTables::new(
                input_ids.dims()[1],
                c.head_dim(),
                c.rope_theta,
                c.rope_fourier,
                c.max_position_embeddings,
                &input_ids.device(),
            ),
        }
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn layer(
        &self,
        i: usize,
        x: Tensor<B, 3>,
        ctx: &MoaContext<B>,
        aux: &mut Aux<B>,
    ) -> Tensor<B, 3> {
        self.blocks[i].forward(i, x, &ctx.tables, aux)
    }

    /// The tied head.
    fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        lm_head(x, &self.norm, &self.embed_tokens, None)
    }

    /// Each block's mixer and HyperFFN routers.
    fn routers(&self) -> Vec<RouterPaths> {
        let top_k = self.config.top_k;
        (0..self.blocks.len())
            .flat_map(|l| {
                let paths = |part: &str, names: &[&str]| {
                    names
                        .iter()
                        .map(|n| format!("blocks.{l}.{part}.{n}"))
                        .collect()
                };
                [
                    RouterPaths {
                        stat: format!("blocks.{l}.moa.router"),
                        paths: paths("moa", &MOA_PATHS),
                        top_k,
                    },
                    RouterPaths {
                        stat: format!("blocks.{l}.ffn.router"),
                        paths: paths("ffn", &FFN_EXPERTS),
                        top_k: top_k.min(FFN_EXPERTS.len()),
                    },
                ]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};

    use super::*;
    use crate::family::forward;
    use crate::named_params;

    type B = Flex;

    fn tiny() -> MoaConfig {
        let section: MoaSection = toml::from_str(
            "vocab_size = 50\nhidden_size = 16\nnum_layers = 2\nnum_heads = 2\nintermediate_size = 24\nrope_fourier = 2\nmax_position_embeddings = 64\ninitializer_range = 0.2",
        )
        .expect("section");
        MoaConfig::from_section(&section)
    }

    fn ids(values: &[i64], batch: usize) -> Tensor<B, 2, Int> {
        let t = values.len() / batch;
        Tensor::from_data(
            TensorData::new(values.to_vec(), [batch, t]),
            &Default::default(),
        )
    }

    #[test]
    fn the_budget_counts_every_parameter() {
        let cfg = tiny();
        let model = cfg.init::<B>(&Init::new(0), &Default::default());
        let counted: usize = named_params(&model).values().map(|t| t.values.len()).sum();
        assert_eq!(counted as u64, cfg.num_params());
        let (lo, hi) = cfg.active_params();
        assert!(lo < hi && hi < cfg.num_params());
    }

    #[test]
    fn the_router_keeps_exactly_two_paths_with_renormalized_weights() {
        let logits = Tensor::<B, 3>::from_data(
            TensorData::new(
                vec![
                    0.1f32, 2.0, -1.0, 0.5, 3.0, 3.0, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0,
                ],
                [1, 3, 4],
            ),
            &Default::default(),
        );
        let r = route(logits, 2);
        let w = r.weights.into_data().into_vec::<f32>().unwrap();
        for row in w.chunks(4) {
            assert_eq!(row.iter().filter(|x| **x > 0.0).count(), 2, "{row:?}");
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        // The first token keeps paths 1 and 3 (logits 2.0 and 0.5).
        assert!(w[1] > 0.0 && w[3] > 0.0 && w[0] == 0.0 && w[2] == 0.0);
        let stats = r.stats.into_data().into_vec::<f32>().unwrap();
        assert!((stats[..4].iter().sum::<f32>() - 2.0).abs() < 1e-6);
    }

    #[test]
    fn the_model_routes_every_token_to_two_paths_in_every_block() {
        let model = tiny().init::<B>(&Init::new(4), &Default::default());
        let (_, aux) = forward(&model, ids(&[1, 2, 3, 4, 5, 6, 7, 8], 2));
        assert_eq!(aux.stats.len(), 4);
        for (name, s) in aux.stats {
            let s = s.into_data().into_vec::<f32>().unwrap();
            let paths = s.len() - 1;
            assert!(
                (s[..paths].iter().sum::<f32>() - 2.0).abs() < 1e-5,
                "{name}: {s:?}"
            );
        }
    }

    /// Changing token `t` never changes an output before `t`, and does change the output at
    /// `t` (so the comparison sees changes at all): for each path alone and for the whole
    /// model.
    #[test]
    fn every_path_and_the_whole_model_are_causal() {
        let cfg = tiny();
        let device = Default::default();
        let model = cfg.init::<B>(&Init::new(7), &device);
        let base: Vec<i64> = (0..12).map(|i| (i * 7 % 50) as i64).collect();
        for t in [0usize, 5, 11] {
            let mut changed = base.clone();
            changed[t] = (changed[t] + 13) % 50;
            let (a, b) = (ids(&base, 1), ids(&changed, 1));
            let check = |name: &str, x: Tensor<B, 3>, y: Tensor<B, 3>| {
                let at = |v: &Tensor<B, 3>| v.clone().narrow(1, t, 1).into_data();
                assert_ne!(
                    at(&x),
                    at(&y),
                    "{name}: the output at {t} ignores token {t}"
                );
                // Position 0 has no earlier outputs to compare.
                if t > 0 {
                    let x = x.narrow(1, 0, t).into_data();
                    let y = y.narrow(1, 0, t).into_data();
                    assert_eq!(x, y, "{name}: outputs before {t} changed");
                }
            };
            let (la, _) = forward(&model, a.clone());
            let (lb, _) = forward(&model, b.clone());
            check("model", la, lb);
            let embed = |ids: &Tensor<B, 2, Int>| model.embedding().forward(ids.clone());
            let (ea, eb) = (embed(&a), embed(&b));
            let ctx = model.context(&a);
            let blk = &model.blocks[0];
            let m = &blk.moa;
            check(
                "conv",
                m.conv.forward(ea.clone()),
                m.conv.forward(eb.clone()),
            );
            check(
                "attn",
                m.attn.forward(ea.clone(), &ctx.tables).0,
                m.attn.forward(eb.clone(), &ctx.tables).0,
            );
            check("mix", m.mix.forward(ea.clone()), m.mix.forward(eb.clone()));
            check(
                "mqa",
                m.mqa.forward(ea.clone(), &ctx.tables).0,
                m.mqa.forward(eb.clone(), &ctx.tables).0,
            );
            check(
                "ffn conv",
                blk.ffn.conv.forward(ea.clone()),
                blk.ffn.conv.forward(eb.clone()),
            );
            let mut aux = Aux::default();
            let ya = blk.forward(0, ea, &ctx.tables, &mut aux);
            let yb = blk.forward(0, eb, &ctx.tables, &mut aux);
            check("block", ya, yb);
        }
    }

    #[test]
    fn training_adds_weighted_auxiliary_losses_and_gradients_reach_every_path() {
        type A = Autodiff<Flex>;
        let device = Default::default();
        let model = tiny().init::<A>(&Init::new(2), &device);
        let input = Tensor::<A, 2, Int>::from_data(
            TensorData::new(
                (0..16).map(|i| (i * 3 % 50) as i64).collect::<Vec<_>>(),
                [2, 8],
            ),
            &device,
        );
        let (logits, aux) = forward(&model, input);
        let names: Vec<&str> = aux.losses.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            names.contains(&"triangle") && names.contains(&"balance"),
            "{names:?}"
        );
        let mut loss = logits.square().mean();
        for (_, l) in aux.losses {
            loss = loss + l;
        }
        let grads = loss.backward();
        let norm =
            |p: &Param<Tensor<A, 2>>| p.val().grad(&grads).map(|g| g.abs().sum().into_scalar());
        let blk = &model.blocks[0];
        assert!(norm(&blk.moa.router.weight).unwrap_or(0.0) > 0.0, "router");
        assert!(norm(&blk.moa.attn.metric).unwrap_or(0.0) > 0.0, "metric");
        assert!(norm(&blk.moa.gates).unwrap_or(0.0) > 0.0, "gates");
    }
}
