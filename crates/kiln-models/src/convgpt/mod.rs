//! ConvGPT-v2: a language model without dense self-attention.
//!
//! Each layer fuses two causal convolutions of the normed input, then runs a SwiGLU MLP;
//! every `memory_every`-th layer (the 2nd, 4th, ...) then retrieves from chunk-token memory:
//!
//! ```text
//! h1 = conv1d(x)                       causal depthwise, `conv_kernel` taps to the left
//! h2 = conv2d(x)                       causal k x k over the Hilbert grid (below)
//! g  = sigmoid([h1, h2] W_g + b_g)     a gate per token and channel
//! x  = x + (g * h1 + (1 - g) * h2) W_o
//! x  = x + mlp(norm(x))
//! x  = x + memory(norm(x))             memory layers only
//! ```
//!
//! **Choices, and why** (the model's source is not public; its card and the closest public
//! patterns are the specification):
//! - *Hilbert packing* ([`hilbert`]): position `t` is cell `d2xy(grid_order, t)`; consecutive
//!   tokens are always neighbours, and the curve folds older tokens next to recent ones,
//!   which is what the 2D window adds over the 1D one.
//! - *Causal 2D convolution* (LMConv's rule): a tap is used only if its cell's token is
//!   earlier; the centre tap (the token itself) is excluded on the first layer and included
//!   after, as the card's pattern says. (In LMConv that keeps a pixel from seeing itself;
//!   in a language model the residual and the 1D branch already carry token `t`, so the
//!   first 2D convolution adds only its neighbours, and later ones also mix the token's own
//!   running state.) Cells of positions beyond the sequence are empty. It is computed in
//!   time proportional to the tokens present, not to the grid: the `k^2` neighbour indices
//!   of every position are built once per sequence length ([`hilbert::GridTaps`]; unused taps
//!   point at a zero row appended to the input), the inputs gathered and multiplied by the
//!   `[k^2 * hidden, hidden]` kernel in one matmul. It is a full (channel-mixing) kernel,
//!   as a 2D convolution layer is; the 1D branch is depthwise, so the two branches see
//!   different things (folded longer context with mixing, against the immediate past per
//!   channel).
//! - *Gated fusion*: a sigmoid gate per token and channel from both branches chooses
//!   between them (a convex mix), then one output projection.
//! - *RoPE / no-position hybrid*: the convolutions carry relative position by construction;
//!   only the memory layers could use more, and `rope` says which of them rotate queries
//!   and keys (by default every other one, the rest position-free, as the card's hybrid).
//! - *Chunk-token memory* (MoBA's selection): the sequence is cut into chunks of
//!   `memory_chunk` tokens; a chunk's summary is the mean of its keys; each token's query
//!   scores the summaries of the complete chunks before its own, keeps the `memory_top_k`
//!   best, and attends (one softmax) over those chunks' tokens and, causally, its own
//!   chunk's. Keys and values are read in place, a chunk at a time
//!   ([`crate::KilnBackend::kiln_chunk_attention`], never gathered), so the work is
//!   `seq * (top_k + 1) * chunk` per head, linear in the sequence; scoring the summaries adds
//!   `seq^2 / chunk`, a small quadratic term. The selection is not differentiated (as in
//!   MoBA); the attention over what it selects is.
//! - Embedding tied to the head by default; RMSNorm before every branch.
//! - *Padding*: no mask. Every branch reads only the current and earlier positions (the
//!   convolutions' taps, the chunk summaries of complete earlier chunks, the causal own
//!   chunk), so right padding never reaches a real token and needs none; masking left or
//!   inner padding would need every branch to skip those positions (a zero tap, a shorter
//!   chunk mean), which nothing in kiln produces (its batches pad on the right), so such a
//!   mask is refused with an error rather than silently ignored
//!   ([`Family::masked_context`]'s default).

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::activation::sigmoid;

use kiln_recipe::{ConvgptSection, RopeLayers};

use crate::family::{Family, FamilyConfig};
use crate::init::Init;
use crate::layers::{RmsNorm, Rope, SwiGlu, TokenEmbedding, lm_head};
use crate::ops::{Dense, causal_depthwise};
use crate::{Aux, KilnBackend};

pub mod hilbert;

use hilbert::GridTaps;

/// A resolved ConvGPT-v2 configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvgptConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Layers.
    pub num_layers: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Memory heads.
    pub num_heads: usize,
    /// 1D kernel.
    pub conv_kernel: usize,
    /// 2D window side.
    pub conv2d_kernel: usize,
    /// Grid order.
    pub grid_order: u32,
    /// Memory layer period (0: none).
    pub memory_every: usize,
    /// Tokens per chunk.
    pub memory_chunk: usize,
    /// Chunks retrieved per token.
    pub memory_top_k: usize,
    /// Which memory layers use RoPE.
    pub rope: RopeLayers,
    /// RoPE base.
    pub rope_theta: f64,
    /// Tied head.
    pub tie_word_embeddings: bool,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Init standard deviation.
    pub initializer_range: f64,
}

impl ConvgptConfig {
    /// The configuration of a recipe's `[model.convgpt]`.
    pub fn from_section(s: &ConvgptSection) -> Self {
        Self {
            vocab_size: s.vocab_size,
            hidden_size: s.hidden_size,
            num_layers: s.num_layers,
            intermediate_size: s.intermediate_size,
            num_heads: s.num_heads,
            conv_kernel: s.conv_kernel,
            conv2d_kernel: s.conv2d_kernel,
            grid_order: s.grid_order,
            memory_every: s.memory_every,
            memory_chunk: s.memory_chunk,
            memory_top_k: s.memory_top_k,
            rope: s.rope,
            rope_theta: s.rope_theta,
            tie_word_embeddings: s.tie_word_embeddings,
            rms_norm_eps: s.rms_norm_eps,
            initializer_range: s.initializer_range,
        }
    }

    /// Width of a memory head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Whether layer `i` carries chunk memory, and if so whether it uses RoPE.
    pub fn memory_of(&self, i: usize) -> Option<bool> {
        let every = self.memory_every;
        if every == 0 || !(i + 1).is_multiple_of(every) {
            return None;
        }
        let nth = (i + 1) / every - 1;
        Some(match self.rope {
            RopeLayers::All => true,
            RopeLayers::None => false,
            RopeLayers::Alternate => nth.is_multiple_of(2),
        })
    }

    /// Number of memory layers.
    pub fn memory_layers(&self) -> usize {
        (0..self.num_layers)
            .filter(|i| self.memory_of(*i).is_some())
            .count()
    }

    /// Parameters of one layer without and with memory.
    fn layer_params(&self) -> (u64, u64) {
        let (d, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let (k1, k2) = (self.conv_kernel as u64, self.conv2d_kernel as u64);
        let base = d * k1 + k2 * k2 * d * d + (2 * d * d + d) + d * d + 3 * d * i + 2 * d;
        (base, base + 4 * d * d + d)
    }

    /// Keys a token's memory query reads at sequence length `seq`: its retrieved chunks'
    /// tokens and its own chunk's, plus the summaries it scores.
    pub fn memory_reads_per_token(&self, seq: usize) -> (usize, usize) {
        let chunks = seq.div_ceil(self.memory_chunk.max(1));
        let k = self.memory_top_k.min(chunks.saturating_sub(1));
        ((k + 1) * self.memory_chunk, chunks)
    }

    /// Builds the model with random weights drawn from `init`.
    pub fn init<B: KilnBackend>(&self, init: &Init, device: &B::Device) -> ConvgptModel<B> {
        let (d, std) = (self.hidden_size, self.initializer_range);
        let lin = |name: String, i: usize, o: usize, bias: bool| {
            init.linear(&name, i, o, bias, std, device)
        };
        let k2 = self.conv2d_kernel * self.conv2d_kernel;
        let layers = (0..self.num_layers)
            .map(|i| {
                let p = format!("layers.{i}");
                ConvLayer {
                    norm1: RmsNorm::new(d, self.rms_norm_eps, device),
                    conv1d: init.normal(&format!("{p}.conv1d"), [d, self.conv_kernel], std, device),
                    conv2d: init.normal(&format!("{p}.conv2d"), [k2 * d, d], std, device),
                    fuse: lin(format!("{p}.fuse"), 2 * d, d, true),
                    out_proj: lin(format!("{p}.out_proj"), d, d, false),
                    norm2: RmsNorm::new(d, self.rms_norm_eps, device),
                    mlp: SwiGlu::new(
                        init,
                        &format!("{p}.mlp"),
                        [d, self.intermediate_size],
                        std,
                        device,
                    ),
                    memory: self.memory_of(i).map(|rope| ChunkMemory {
                        norm: RmsNorm::new(d, self.rms_norm_eps, device),
                        q_proj: lin(format!("{p}.memory.q_proj"), d, d, false),
                        k_proj: lin(format!("{p}.memory.k_proj"), d, d, false),
                        v_proj: lin(format!("{p}.memory.v_proj"), d, d, false),
                        o_proj: lin(format!("{p}.memory.o_proj"), d, d, false),
                        num_heads: self.num_heads,
                        chunk: self.memory_chunk,
                        top_k: self.memory_top_k,
                        rope,
                    }),
                    first: i == 0,
                }
            })
            .collect();
        ConvgptModel {
            embed_tokens: TokenEmbedding::new(
                init,
                "embed_tokens.weight",
                [self.vocab_size, d],
                std,
                device,
            ),
            layers,
            norm: RmsNorm::new(d, self.rms_norm_eps, device),
            lm_head: (!self.tie_word_embeddings)
                .then(|| lin("lm_head".to_string(), d, self.vocab_size, false)),
            config: self.clone(),
        }
    }
}

impl FamilyConfig for ConvgptConfig {
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Number of parameters.
    fn num_params(&self) -> u64 {
        let (d, v) = (self.hidden_size as u64, self.vocab_size as u64);
        let (plain, memory) = self.layer_params();
        let m = self.memory_layers() as u64;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + head + d + m * memory + (self.num_layers as u64 - m) * plain
    }

    /// Parameters that enter matrix products per token.
    fn matmul_params(&self) -> u64 {
        let (d, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let k2 = self.conv2d_kernel as u64;
        let plain = k2 * k2 * d * d + 2 * d * d + d * d + 3 * d * i;
        let m = self.memory_layers() as u64;
        plain * self.num_layers as u64 + m * 4 * d * d + self.vocab_size as u64 * d
    }

    /// Training FLOPs per token at sequence length `seq` (forward + backward):
    /// `6 * matmul_params` plus, per memory layer, `12 * hidden` per key read (scores and
    /// values) and `6 * hidden` per summary scored.
    fn flops_per_token(&self, seq: usize) -> f64 {
        let (keys, summaries) = self.memory_reads_per_token(seq);
        let d = self.hidden_size as f64;
        let memory =
            self.memory_layers() as f64 * (12.0 * d * keys as f64 + 6.0 * d * summaries as f64);
        6.0 * self.matmul_params() as f64 + memory
    }

    /// Rough bytes of activations kept for the backward pass per token (f32): the gathered
    /// 2D taps, the branches and MLP intermediates of every layer, the gathered memory keys
    /// and values of memory layers, and the logits with their gradient.
    fn activation_bytes_per_token(&self, seq: usize, checkpointed: bool) -> u64 {
        let (d, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let k2 = (self.conv2d_kernel * self.conv2d_kernel) as u64;
        let (keys, _) = self.memory_reads_per_token(seq);
        let per_layer = k2 * d + 12 * d + 5 * i;
        let memory = 2 * keys as u64 * d + 8 * d;
        let layers = self.num_layers as u64;
        let m = self.memory_layers() as u64;
        // Checkpointed: one layer's activations (a memory layer's, if any) and every layer's
        // input. No attention scores outlive a step (the memory reads are gathered).
        crate::activation_bytes(
            per_layer + if m > 0 { memory } else { 0 },
            per_layer * layers + memory * m,
            d * layers,
            self.vocab_size,
            0,
            checkpointed,
        )
    }
}

/// Chunk-token memory retrieval.
#[derive(Module, Debug)]
pub struct ChunkMemory<B: KilnBackend> {
    /// Norm before the retrieval.
    pub norm: RmsNorm<B>,
    /// `[hidden, hidden]`.
    pub q_proj: Linear<B>,
    /// `[hidden, hidden]`.
    pub k_proj: Linear<B>,
    /// `[hidden, hidden]`.
    pub v_proj: Linear<B>,
    /// `[hidden, hidden]`.
    pub o_proj: Linear<B>,
    /// Heads.
    pub num_heads: usize,
    /// Tokens per chunk.
    pub chunk: usize,
    /// Earlier chunks retrieved per token.
    pub top_k: usize,
    /// Whether queries and keys are rotated.
    pub rope: bool,
}

impl<B: KilnBackend> ChunkMemory<B> {
    /// Retrieval for every token; also returns how many key indices were gathered (the
    /// work the layer does, for the cost test).
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` (already normed) -> `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, rope: Option<&Rope<B>>) -> (Tensor<B, 3>, usize) {
        let [b, t, d] = x.dims();
        let device = x.device();
        let (h, e, c) = (self.num_heads, d / self.num_heads, self.chunk);
        let split = |p: &Linear<B>| p.dense(x.clone()).reshape([b, t, h, e]);
        let (mut q, mut k) = (split(&self.q_proj), split(&self.k_proj));
        if let (true, Some(r)) = (self.rope, rope) {
            q = r.apply(q);
            k = r.apply(k);
        }
        let v = split(&self.v_proj);

        let n = t.div_ceil(c);
        let top = self.top_k.min(n.saturating_sub(1));
        let picks = (top > 0).then(|| {
            // Chunk summaries: the mean key of each chunk (the last one padded with zeros;
            // it is never an earlier chunk of anyone), `[b, h, n, e]`.
            let keys = k.clone().detach();
            let padded = if n * c > t {
                Tensor::cat(vec![keys, Tensor::zeros([b, n * c - t, h, e], &device)], 1)
            } else {
                keys
            };
            let summaries = padded
                .reshape([b, n, c, h * e])
                .mean_dim(2)
                .reshape([b, n, h, e])
                .swap_dims(1, 2);
            // Scores of the complete chunks before each token's own; later ones masked.
            let scores = q
                .clone()
                .detach()
                .swap_dims(1, 2)
                .matmul(summaries.swap_dims(2, 3)); // [b, h, t, n]
            let mut later = Vec::with_capacity(t * n);
            for pos in 0..t {
                for ch in 0..n {
                    later.push(if ch < pos / c { 0.0f32 } else { -1e9 });
                }
            }
            let later = Tensor::<B, 1>::from_data(TensorData::new(later, [t * n]), &device)
                .reshape([1, 1, t, n]);
            let (best, chunks) = (scores + later).topk_with_indices(top, 3); // [b, h, t, top]
            // A token with fewer than `top` earlier chunks picks masked ones: none.
            chunks.mask_fill(best.lower_elem(-1e8), -1)
        });
        let gathered = b * h * t * (top + 1) * c;
        // Each query over its picked chunks and its own, without building key lists.
        let prim = |x: Tensor<B, 4>| x.into_primitive().tensor();
        let out = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(B::kiln_chunk_attention(
            prim(q),
            prim(k),
            prim(v),
            picks.map(|p| p.into_primitive()),
            c,
            1.0 / (e as f64).sqrt(),
        ))); // [b, t, h, e]
        (self.o_proj.dense(out.reshape([b, t, d])), gathered)
    }
}

/// One ConvGPT-v2 layer.
#[derive(Module, Debug)]
pub struct ConvLayer<B: KilnBackend> {
    /// Norm before the convolutions.
    pub norm1: RmsNorm<B>,
    /// Depthwise 1D taps `[hidden, conv_kernel]`, the last on the current token.
    pub conv1d: Param<Tensor<B, 2>>,
    /// 2D kernel `[conv2d_kernel^2 * hidden, hidden]`, taps in window order (rows of the
    /// window top to bottom, each left to right).
    pub conv2d: Param<Tensor<B, 2>>,
    /// Fusion gate `[2 * hidden, hidden]`, with bias.
    pub fuse: Linear<B>,
    /// Projection of the fused branches `[hidden, hidden]`.
    pub out_proj: Linear<B>,
    /// Norm before the MLP.
    pub norm2: RmsNorm<B>,
    /// The MLP.
    pub mlp: SwiGlu<B>,
    /// Chunk memory (memory layers only).
    pub memory: Option<ChunkMemory<B>>,
    /// The first layer's 2D convolution excludes the centre tap.
    pub first: bool,
}

/// What the layers of one forward pass share: the grid taps and the rotary tables.
#[derive(Debug, Clone)]
pub struct ConvgptContext<B: KilnBackend> {
    /// Taps without the centre (first layer), `[seq * k^2]` positions; an unused tap reads
    /// position `seq`, the zero row the convolution appends.
    pub first_taps: Tensor<B, 1, Int>,
    /// Taps with the centre (later layers).
    pub taps: Tensor<B, 1, Int>,
    /// RoPE tables of the memory heads.
    pub rope: Rope<B>,
}

impl<B: KilnBackend> ConvLayer<B> {
    /// The causal 2D convolution over the grid: the taps of every position gathered from
    /// `x` with a zero row appended (where unused taps point), then one matmul with the
    /// kernel.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn conv2d(&self, x: Tensor<B, 3>, ctx: &ConvgptContext<B>) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let idx = if self.first {
            &ctx.first_taps
        } else {
            &ctx.taps
        };
        let (k2, device) = (idx.dims()[0] / t, idx.device());
        let padded = Tensor::cat(vec![x, Tensor::zeros([b, 1, d], &device)], 1);
        // Rows of the flattened [b * (t + 1), d] input: a 2D select (and, backward, a 2D
        // select-add), which Flex runs row by row rather than element by element.
        let offsets = Tensor::<B, 1, Int>::arange(0..b as i64, &device)
            .mul_scalar((t + 1) as i64)
            .reshape([b, 1]);
        let rows = (idx.clone().reshape([1, t * k2]) + offsets).reshape([b * t * k2]);
        let taps = padded.reshape([b * (t + 1), d]).select(0, rows); // [b * t * k2, d]
        taps.reshape([b * t, k2 * d])
            .matmul(self.conv2d.val())
            .reshape([b, t, d])
    }

    /// The causal 1D depthwise convolution.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn conv1d(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        causal_depthwise(x, self.conv1d.val())
    }

    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &ConvgptContext<B>) -> Tensor<B, 3> {
        let h = self.norm1.forward(x.clone());
        let h1 = self.conv1d(h.clone());
        let h2 = self.conv2d(h, ctx);
        let g = sigmoid(
            self.fuse
                .dense(Tensor::cat(vec![h1.clone(), h2.clone()], 2)),
        );
        let fused = g.clone() * h1 + (g.neg().add_scalar(1.0)) * h2;
        let x = x + self.out_proj.dense(fused);
        let h = self.norm2.forward(x.clone());
        let x = x + self.mlp.forward(h);
        match &self.memory {
            Some(mem) => {
                let h = mem.norm.forward(x.clone());
                x + mem.forward(h, Some(&ctx.rope)).0
            }
            None => x,
        }
    }
}

/// The ConvGPT-v2 language model.
#[derive(Module, Debug)]
pub struct ConvgptModel<B: KilnBackend> {
    /// Token embedding `[vocab, hidden]`.
    pub embed_tokens: TokenEmbedding<B>,
    /// The layers.
    pub layers: Vec<ConvLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// Output head `[hidden, vocab]`; absent when tied to the embedding.
    pub lm_head: Option<Linear<B>>,
    /// The configuration it was built from.
    #[module(skip)]
    pub config: ConvgptConfig,
}

impl<B: KilnBackend> Family<B> for ConvgptModel<B> {
    const NAME: &'static str = "convgpt";
    type Config = ConvgptConfig;
    type Context = ConvgptContext<B>;

    crate::family::config_and_embedding!(embed_tokens);

    /// The grid taps and the memory heads' rotary tables.
    fn context(&self, input_ids: &Tensor<B, 2, Int>) -> ConvgptContext<B> {
        let c = &self.config;
        let t = input_ids.dims()[1];
        let device = input_ids.device();
        let k2 = c.conv2d_kernel * c.conv2d_kernel;
        let build = |centre: bool| {
            let taps = GridTaps::new(c.grid_order, t, c.conv2d_kernel, centre);
            Tensor::<B, 1, Int>::from_data(TensorData::new(taps.index, [t * k2]), &device)
        };
        ConvgptContext {
            first_taps: build(false),
            taps: build(true),
            rope: Rope::new(t, c.head_dim(), c.rope_theta, &device),
        }
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(
        &self,
        i: usize,
        x: Tensor<B, 3>,
        ctx: &ConvgptContext<B>,
        _aux: &mut Aux<B>,
    ) -> Tensor<B, 3> {
        self.layers[i].forward(x, ctx)
    }

    fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        lm_head(x, &self.norm, &self.embed_tokens, self.lm_head.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;
    use crate::family::forward;
    use crate::named_params;

    type B = Flex;

    fn tiny() -> ConvgptConfig {
        let section: ConvgptSection = toml::from_str(
            "vocab_size = 40\nhidden_size = 16\nnum_layers = 4\nintermediate_size = 24\nnum_heads = 2\ngrid_order = 3\nmemory_chunk = 4\nmemory_top_k = 2\ninitializer_range = 0.2",
        )
        .expect("section");
        ConvgptConfig::from_section(&section)
    }

    fn ids(values: &[i64]) -> Tensor<B, 2, Int> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), [1, values.len()]),
            &Default::default(),
        )
    }

    #[test]
    fn the_parameter_count_matches_the_model() {
        let cfg = tiny();
        let model = cfg.init::<B>(&Init::new(0), &Default::default());
        let counted: usize = named_params(&model).values().map(|t| t.values.len()).sum();
        assert_eq!(counted as u64, cfg.num_params());
        // Layers 1 and 3 carry memory; the first rotates, the second is position-free.
        assert_eq!(
            (0..4).map(|i| cfg.memory_of(i)).collect::<Vec<_>>(),
            [None, Some(true), None, Some(false)]
        );
    }

    /// Changing token `t` never changes an output before `t`: for each branch and the
    /// whole model, at lengths that are (16) and are not (23) powers of four.
    #[test]
    fn every_branch_and_the_model_are_causal() {
        let cfg = tiny();
        let device = Default::default();
        let model = cfg.init::<B>(&Init::new(5), &device);
        for len in [16usize, 23] {
            let base: Vec<i64> = (0..len).map(|i| (i * 11 % 40) as i64).collect();
            for t in [1usize, len / 2, len - 1] {
                let mut changed = base.clone();
                changed[t] = (changed[t] + 17) % 40;
                let (a, b) = (ids(&base), ids(&changed));
                let check = |name: &str, x: Tensor<B, 3>, y: Tensor<B, 3>| {
                    let (x, y) = (x.narrow(1, 0, t).into_data(), y.narrow(1, 0, t).into_data());
                    assert_eq!(x, y, "{name}, length {len}: outputs before {t} changed");
                };
                check(
                    "model",
                    forward(&model, a.clone()).0,
                    forward(&model, b.clone()).0,
                );
                let ctx = model.context(&a);
                let (ea, eb) = (ea_at(&model, &base), ea_at(&model, &changed));
                for (i, l) in model.layers.iter().enumerate() {
                    check(
                        &format!("conv1d {i}"),
                        l.conv1d(ea.clone()),
                        l.conv1d(eb.clone()),
                    );
                    check(
                        &format!("conv2d {i}"),
                        l.conv2d(ea.clone(), &ctx),
                        l.conv2d(eb.clone(), &ctx),
                    );
                    if let Some(m) = &l.memory {
                        check(
                            &format!("memory {i}"),
                            m.forward(ea.clone(), Some(&ctx.rope)).0,
                            m.forward(eb.clone(), Some(&ctx.rope)).0,
                        );
                    }
                }
                // The first layer's 2D branch does not see the token itself either.
                let first = &model.layers[0];
                let (ya, yb) = (
                    first.conv2d(ea_at(&model, &base), &ctx),
                    first.conv2d(ea_at(&model, &changed), &ctx),
                );
                let (ya, yb) = (
                    ya.narrow(1, t, 1).into_data(),
                    yb.narrow(1, t, 1).into_data(),
                );
                assert_eq!(
                    ya, yb,
                    "length {len}: the first 2D conv saw token {t} itself"
                );
            }
        }
    }

    /// ConvGPT has no padding mask: right padding (which never reaches a real token) gives
    /// the unmasked logits, and padding before a token is refused, not ignored.
    #[test]
    fn right_padding_is_taken_and_other_padding_refused() {
        let device = Default::default();
        let model = crate::Model::Convgpt(tiny().init::<B>(&Init::new(2), &device));
        let tokens: Vec<i64> = (0..16).map(|i| (i * 3 % 40) as i64).collect();
        let mask = |padded: std::ops::Range<usize>| {
            let m: Vec<bool> = (0..16).map(|i| padded.contains(&i)).collect();
            Tensor::<B, 2, Bool>::from_data(TensorData::new(m, [1, 16]), &device)
        };
        let plain = model.forward(ids(&tokens)).logits.into_data();
        let right = model
            .forward_masked(ids(&tokens), Some(mask(12..16)))
            .expect("right padding is taken")
            .logits
            .into_data();
        assert_eq!(plain, right);
        let err = model
            .forward_masked(ids(&tokens), Some(mask(0..3)))
            .expect_err("left padding is refused");
        assert!(
            matches!(
                err,
                crate::ModelError::Padding {
                    family: "convgpt",
                    row: 0
                }
            ),
            "{err}"
        );
    }

    /// The 2D branch equals its definition written as loops: for every position, the sum
    /// over the window's used taps of the tapped input times the tap's `[hidden, hidden]`
    /// block of the kernel (with and without the centre, at a length that leaves the grid's
    /// last cells empty).
    #[test]
    fn the_2d_convolution_is_the_sum_over_used_taps() {
        let cfg = tiny();
        let device = Default::default();
        let model = cfg.init::<B>(&Init::new(3), &device);
        let (b, t, d, k2) = (2usize, 23usize, 16usize, 9usize);
        let x = Tensor::<B, 3>::random(
            [b, t, d],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let ctx = model.context(&ids(&[0; 23]));
        let xs = x.to_data().to_vec::<f32>().expect("f32");
        for (layer, centre) in [(0usize, false), (1, true)] {
            let l = &model.layers[layer];
            let w = l.conv2d.val().to_data().to_vec::<f32>().expect("f32");
            let taps = GridTaps::new(cfg.grid_order, t, cfg.conv2d_kernel, centre);
            let got = l
                .conv2d(x.clone(), &ctx)
                .to_data()
                .to_vec::<f32>()
                .expect("f32");
            for bi in 0..b {
                for pos in 0..t {
                    for o in 0..d {
                        let mut want = 0.0f32;
                        for j in 0..k2 {
                            if taps.mask[pos * k2 + j] == 0.0 {
                                continue;
                            }
                            let s = taps.index[pos * k2 + j] as usize;
                            for i in 0..d {
                                want += xs[(bi * t + s) * d + i] * w[(j * d + i) * d + o];
                            }
                        }
                        let g = got[(bi * t + pos) * d + o];
                        assert!(
                            (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "layer {layer}, batch {bi}, position {pos}, channel {o}: {g} != {want}"
                        );
                    }
                }
            }
        }
    }

    fn ea_at(model: &ConvgptModel<B>, tokens: &[i64]) -> Tensor<B, 3> {
        model.embedding().forward(ids(tokens))
    }

    /// Doubling the sequence at a fixed chunk size and top-k doubles the keys the memory
    /// layer gathers (linear), where full attention's would quadruple.
    #[test]
    fn memory_work_grows_linearly_with_the_sequence() {
        let cfg = tiny();
        let model = cfg.init::<B>(&Init::new(1), &Default::default());
        let memory = model.layers[1].memory.as_ref().expect("memory layer");
        let gathered = |t: usize| {
            let x = Tensor::<B, 3>::random(
                [1, t, 16],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &Default::default(),
            );
            memory.forward(x, None).1
        };
        let (g16, g32, g64) = (gathered(16), gathered(32), gathered(64));
        // (top_k + 1) * chunk = 12 keys per token and head, once there are 2 earlier chunks.
        assert_eq!(g32, 2 * 32 * 12);
        assert_eq!(g64, 2 * g32);
        assert_eq!(g32, 2 * g16);
        assert_eq!(cfg.memory_reads_per_token(64).0, 12);
    }
}
