//! Qwen2 / Qwen2.5 decoder (Hugging Face `Qwen2ForCausalLM`).
//!
//! Pre-norm decoder: RMSNorm (eps 1e-6), grouped-query attention with bias on q/k/v only,
//! rotate-half RoPE, SwiGLU MLP, optional tied embeddings; the norm, RoPE, MLP, embedding
//! and head are the shared [`crate::layers`]. Field names are the checkpoint keys
//! (`model.layers.{i}.self_attn.q_proj`, ...) so that loading needs no renaming; the
//! projections of every layer take adapters. `config.rs` holds the resolved configuration,
//! its sizes and initialization; `import.rs` the Hugging Face side (the lenient
//! `config.json` mirror, and the tensor names and layouts: Burn's `Linear.weight` is
//! `[in, out]`, Hugging Face's `[out, in]`).
//!
//! Training runs the [`Family`] layers over whole sequences (through [`crate::Model`]);
//! decoding runs [`Qwen2ForCausalLM::forward_cached`] over the new tokens only, with the keys
//! and values of the earlier ones in an explicit [`KvCache`]. Both share the same layer code.
//!
//! Reference: Qwen2 technical report (arXiv:2407.10671) and `modeling_qwen2.py` in
//! `transformers`.

use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use crate::family::{Family, HfFormat};
use crate::layers::{RmsNorm, Rope, SwiGlu, TokenEmbedding, lm_head};
use crate::lora::Proj;
use crate::{Aux, KilnBackend};

mod config;
mod import;

pub use config::Qwen2Config;
pub use import::HfQwen2Config;

/// Grouped-query self-attention.
#[derive(Module, Debug)]
pub struct Attention<B: KilnBackend> {
    /// `[hidden, heads * head_dim]`, with bias.
    pub q_proj: Proj<B>,
    /// `[hidden, kv_heads * head_dim]`, with bias.
    pub k_proj: Proj<B>,
    /// `[hidden, kv_heads * head_dim]`, with bias.
    pub v_proj: Proj<B>,
    /// `[heads * head_dim, hidden]`, no bias.
    pub o_proj: Proj<B>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

impl<B: KilnBackend> Attention<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - rope: cos and sin, each `[seq, head_dim]`
    /// - bias: `[batch, 1, 1, seq]`, added to the scores: a large negative number on
    ///   padding keys, 0 elsewhere; `None` without padding. Attention is causal either way.
    /// - returns `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        bias: Option<&Tensor<B, 4>>,
    ) -> Tensor<B, 3> {
        let (q, k, v) = self.qkv(x, rope);
        self.attend(q, k, v, bias)
    }

    /// Attention of the new tokens `x` over the cached ones and themselves; appends their
    /// keys and values to `kv`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`, the new tokens
    /// - rope: cos and sin at the new tokens' absolute positions, each `[seq, head_dim]`
    /// - bias: `[batch, 1, 1, past + seq]` on padding keys (see [`Attention::forward`]), or
    ///   `None`; the new tokens see the cached ones and the new ones up to themselves
    /// - kv: keys and values `[batch, kv_heads, past, head_dim]`, `None` when `past` is 0;
    ///   `[batch, kv_heads, past + seq, head_dim]` on return
    /// - returns `[batch, seq, hidden]`
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        bias: Option<&Tensor<B, 4>>,
        kv: &mut Option<LayerKv<B>>,
    ) -> Tensor<B, 3> {
        let (q, k, v) = self.qkv(x, rope);
        let (k, v) = match kv.take() {
            Some(past) => (
                Tensor::cat(vec![past.keys, k], 2),   // [b, kvh, past+t, d]
                Tensor::cat(vec![past.values, v], 2), // [b, kvh, past+t, d]
            ),
            None => (k, v),
        };
        *kv = Some(LayerKv {
            keys: k.clone(),
            values: v.clone(),
        });
        self.attend(q, k, v, bias)
    }

    /// Query, key and value heads, RoPE applied to queries and keys.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - rope: cos and sin, each `[seq, head_dim]`
    /// - returns q `[batch, heads, seq, head_dim]`, k and v `[batch, kv_heads, seq, head_dim]`
    fn qkv(&self, x: Tensor<B, 3>, rope: &Rope<B>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // RoPE is applied in the projections' own [b, t, heads, d] layout, where the tensors
        // are contiguous, before moving heads in front of the sequence.
        let q = rope
            .apply(self.q_proj.forward(x.clone()).reshape([b, t, h, d]))
            .swap_dims(1, 2); // [b, h, t, d]
        let k = rope
            .apply(self.k_proj.forward(x.clone()).reshape([b, t, kvh, d]))
            .swap_dims(1, 2); // [b, kvh, t, d]
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, t, kvh, d])
            .swap_dims(1, 2); // [b, kvh, t, d]
        (q, k, v)
    }

    /// Causal scaled dot-product attention of `t` queries (the last `t` positions) over `s`
    /// keys, then the output projection.
    ///
    /// # Shapes
    /// - q: `[batch, heads, t, head_dim]`
    /// - k, v: `[batch, kv_heads, s, head_dim]`
    /// - bias: `[1 or batch, 1, 1, s]`; `None` adds nothing
    /// - returns `[batch, t, hidden]`
    fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        bias: Option<&Tensor<B, 4>>,
    ) -> Tensor<B, 3> {
        let [b, h, t, d] = q.dims();
        let scale = 1.0 / (d as f64).sqrt();
        // softmax(q kᵀ · scale + bias) v, causal, without keeping the scores for the
        // backward pass. Query head `i` reads key/value head `i / (h / kv_heads)` (Hugging
        // Face's `repeat_kv`, without the copy). On the CPU the heads are read in place
        // from the projections' [b, t, heads, d] layout, and the output comes back in it.
        let out = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(B::kiln_attention(
            q.into_primitive().tensor(),
            k.into_primitive().tensor(),
            v.into_primitive().tensor(),
            bias.map(|b| b.clone().into_primitive().tensor()),
            scale,
            true,
        ))); // [b, h, t, d]
        let out = out.swap_dims(1, 2).reshape([b, t, h * d]); // [b, t, h*d]
        self.o_proj.forward(out)
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: KilnBackend> {
    /// Self-attention.
    pub self_attn: Attention<B>,
    /// Feed-forward.
    pub mlp: SwiGlu<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: KilnBackend> DecoderLayer<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        bias: Option<&Tensor<B, 4>>,
    ) -> Tensor<B, 3> {
        self.residual(x, |x| self.self_attn.forward(x, rope, bias))
    }

    /// The layer over new tokens only, attending to the cached ones too (see
    /// [`Attention::forward_cached`]).
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        bias: Option<&Tensor<B, 4>>,
        kv: &mut Option<LayerKv<B>>,
    ) -> Tensor<B, 3> {
        self.residual(x, |x| self.self_attn.forward_cached(x, rope, bias, kv))
    }

    /// The two pre-norm residual blocks around `attn`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    fn residual(
        &self,
        x: Tensor<B, 3>,
        attn: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let h = x.clone() + attn(self.input_layernorm.forward(x));
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// The adaptable projections of a decoder layer, by their names under the layer, borrowed
/// with `$r` (`&` or `&mut`): the one list of Qwen2's adapter targets.
macro_rules! projections {
    ($layer:expr, $($r:tt)+) => {{
        let (a, f) = ($($r)+ $layer.self_attn, $($r)+ $layer.mlp);
        [
            ("self_attn.q_proj", $($r)+ a.q_proj),
            ("self_attn.k_proj", $($r)+ a.k_proj),
            ("self_attn.v_proj", $($r)+ a.v_proj),
            ("self_attn.o_proj", $($r)+ a.o_proj),
            ("mlp.gate_proj", $($r)+ f.gate_proj),
            ("mlp.up_proj", $($r)+ f.up_proj),
            ("mlp.down_proj", $($r)+ f.down_proj),
        ]
    }};
}

/// The decoder stack (`model.*` in checkpoints).
#[derive(Module, Debug)]
pub struct Qwen2Model<B: KilnBackend> {
    /// Token embedding, `[vocab, hidden]`.
    pub embed_tokens: TokenEmbedding<B>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
}

/// Qwen2 with its language-model head.
#[derive(Module, Debug)]
pub struct Qwen2ForCausalLM<B: KilnBackend> {
    /// The decoder.
    pub model: Qwen2Model<B>,
    /// Output head `[hidden, vocab]`; absent when tied to the embedding.
    pub lm_head: Option<Linear<B>>,
    /// The configuration it was built from.
    #[module(skip)]
    pub config: Qwen2Config,
}

/// RoPE tables and the padding bias shared by the layers of one forward pass.
#[derive(Debug, Clone)]
pub struct Qwen2Context<B: KilnBackend> {
    rope: Rope<B>,
    /// `[batch, 1, 1, seq]`, when the batch has padding.
    bias: Option<Tensor<B, 4>>,
}

impl<B: KilnBackend> Family<B> for Qwen2ForCausalLM<B> {
    const NAME: &'static str = "qwen2";
    type Config = Qwen2Config;
    type Context = Qwen2Context<B>;

    crate::family::config_and_embedding!(model.embed_tokens);

    /// RoPE tables for positions `0..seq`, no bias.
    fn context(&self, input_ids: &Tensor<B, 2, Int>) -> Qwen2Context<B> {
        let rope = Rope::new(
            input_ids.dims()[1],
            self.config.head_dim(),
            self.config.rope_theta,
            &input_ids.device(),
        );
        Qwen2Context { rope, bias: None }
    }

    /// Padding keys masked out by a bias on the scores (as `transformers` does with an
    /// `attention_mask`), wherever the padding is. Positions count from 0 at the first
    /// column whatever the padding, as in `transformers`' forward without `position_ids`;
    /// outputs at padding positions are meaningless.
    fn masked_context(
        &self,
        input_ids: &Tensor<B, 2, Int>,
        padding: Tensor<B, 2, Bool>,
    ) -> Result<Qwen2Context<B>, crate::ModelError> {
        let [b, t] = input_ids.dims();
        // Attention masks the future itself (causal); the bias only masks padding keys.
        // A large finite value, not -inf: a padding query whose every key is masked must
        // still get a finite softmax, or its NaN would leak through `0 * NaN`.
        let bias = padding.float().mul_scalar(-1e9).reshape([b, 1, 1, t]);
        Ok(Qwen2Context {
            bias: Some(bias),
            ..self.context(input_ids)
        })
    }

    fn num_layers(&self) -> usize {
        self.model.layers.len()
    }

    fn layer(
        &self,
        i: usize,
        x: Tensor<B, 3>,
        ctx: &Qwen2Context<B>,
        _aux: &mut Aux<B>,
    ) -> Tensor<B, 3> {
        self.model.layers[i].forward(x, &ctx.rope, ctx.bias.as_ref())
    }

    fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        lm_head(
            x,
            &self.model.norm,
            &self.model.embed_tokens,
            self.lm_head.as_ref(),
        )
    }

    fn projections(&self) -> Vec<(String, &Proj<B>)> {
        let layers = self.model.layers.iter().enumerate();
        layers
            .flat_map(|(i, l)| {
                projections!(l, &).map(|(n, p)| (format!("model.layers.{i}.{n}"), p))
            })
            .collect()
    }

    fn projections_mut(&mut self) -> Vec<(String, &mut Proj<B>)> {
        let layers = self.model.layers.iter_mut().enumerate();
        layers
            .flat_map(|(i, l)| {
                projections!(l, &mut).map(|(n, p)| (format!("model.layers.{i}.{n}"), p))
            })
            .collect()
    }

    fn hf_format(&self) -> Option<&dyn HfFormat> {
        Some(&self.config)
    }

    /// Decodes with a [`KvCache`] ([`Qwen2ForCausalLM::forward_cached`]).
    fn decoder<'a>(&'a self) -> Box<dyn FnMut(Tensor<B, 2, Int>) -> Tensor<B, 3> + 'a> {
        let mut cache = self.new_cache();
        Box::new(move |ids| self.forward_cached(ids, &mut cache))
    }
}

impl<B: KilnBackend> Qwen2ForCausalLM<B> {
    /// An empty cache for [`Qwen2ForCausalLM::forward_cached`].
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.model.layers.len())
    }

    /// Logits of new tokens given the keys and values of the earlier ones, for decoding.
    ///
    /// The new tokens take positions `cache.len()..cache.len() + seq` (RoPE at those
    /// absolute positions); each attends to every cached token and causally to the new ones.
    /// Their keys and values are appended to `cache`. Run the whole prompt in one call, then
    /// one call per generated token: the logits equal [`crate::Model::forward`]'s over
    /// the whole sequence up to float rounding. Every row of the batch shares the positions
    /// (no padding).
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`, `seq >= 1`
    /// - cache: keys and values `[batch, kv_heads, cache.len(), head_dim]` per layer
    /// - returns `[batch, seq, vocab]`
    ///
    /// # Panics
    /// If `seq` is 0, or `cache` was made for another model or batch size.
    pub fn forward_cached(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let device = input_ids.device();
        let [b, t] = input_ids.dims();
        assert!(t > 0, "forward_cached needs at least one new token");
        assert_eq!(
            cache.layers.len(),
            self.model.layers.len(),
            "the cache was made for a model with another number of layers"
        );
        if let Some(kv) = cache.layers.first().and_then(Option::as_ref) {
            assert_eq!(kv.keys.dims()[0], b, "the cache holds another batch size");
        }
        let past = cache.len;
        let rope = Rope::at(
            past..past + t,
            self.config.head_dim(),
            self.config.rope_theta,
            &device,
        );
        // Causal attention lets each new token see the cached keys and the new ones up to
        // itself: nothing else to mask. Decoding never tracks gradients: no NEFTune.
        let mut x = self.model.embed_tokens.lookup(input_ids); // [b, t, hidden]
        for (layer, kv) in self.model.layers.iter().zip(&mut cache.layers) {
            x = layer.forward_cached(x, &rope, None, kv);
        }
        cache.len += t;
        Family::head(self, x)
    }
}

/// Keys and values of the tokens a [`Qwen2ForCausalLM`] has decoded so far: the explicit
/// state of [`Qwen2ForCausalLM::forward_cached`], never part of the module.
///
/// One cache serves one model and one batch of sequences that advance together.
#[derive(Debug, Clone)]
pub struct KvCache<B: KilnBackend> {
    /// Per layer; `None` until the first call.
    layers: Vec<Option<LayerKv<B>>>,
    /// Tokens cached per sequence.
    len: usize,
}

/// One layer's cached keys and values.
#[derive(Debug, Clone)]
pub struct LayerKv<B: KilnBackend> {
    /// `[batch, kv_heads, len, head_dim]`, RoPE already applied.
    pub keys: Tensor<B, 4>,
    /// `[batch, kv_heads, len, head_dim]`.
    pub values: Tensor<B, 4>,
}

impl<B: KilnBackend> KvCache<B> {
    /// An empty cache for a model with `num_layers` decoder layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Tokens cached per sequence: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keys and values of layer `i`; `None` while the cache is empty.
    pub fn layer(&self, i: usize) -> Option<&LayerKv<B>> {
        self.layers.get(i).and_then(Option::as_ref)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Flex, NdArray};

    use crate::init::Init;

    /// A tiny GQA model (2 query heads per key/value head) with weights large enough that
    /// attention is far from uniform.
    fn tiny<B: KilnBackend>(device: &B::Device) -> Qwen2ForCausalLM<B> {
        Qwen2Config {
            vocab_size: 37,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 64,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            initializer_range: 0.3,
        }
        .init(&Init::new(5), device)
    }

    fn ids<B: KilnBackend>(rows: &[&[i64]], device: &B::Device) -> Tensor<B, 2, Int> {
        let t = rows[0].len();
        let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(TensorData::new(flat, [rows.len(), t]), device)
    }

    fn values<B: KilnBackend>(t: Tensor<B, 3>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
    }

    fn rows_of() -> [&'static [i64]; 2] {
        [
            &[3, 17, 5, 30, 2, 8, 11, 36, 0],
            &[9, 9, 21, 4, 33, 1, 7, 12, 25],
        ]
    }

    /// The prompt in one call, then one token per call, then two tokens in one call (a
    /// causal mask with an offset) give the logits of one full forward pass.
    fn cached_matches_full<B: KilnBackend>() {
        let device = Default::default();
        let model = tiny::<B>(&device);
        let full = crate::Model::Qwen2(tiny::<B>(&device))
            .forward(ids::<B>(&rows_of(), &device))
            .logits; // [2, 9, vocab]
        let rows = rows_of();
        let mut cache = model.new_cache();
        let mut pieces = Vec::new();
        for range in [0..5, 5..6, 6..7, 7..9] {
            let chunk: Vec<&[i64]> = rows.iter().map(|r| &r[range.clone()]).collect();
            pieces.push(model.forward_cached(ids::<B>(&chunk, &device), &mut cache));
            assert_eq!(cache.len(), range.end);
        }
        let cached = Tensor::cat(pieces, 1);
        assert_eq!(cached.dims(), full.dims());
        let (a, b) = (values(full), values(cached));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-5, "cached logits differ by {worst:e}");
        let kv = cache.layer(1).unwrap();
        assert_eq!(kv.keys.dims(), [2, 2, 9, 4]);
        assert_eq!(kv.values.dims(), [2, 2, 9, 4]);
    }

    #[test]
    fn cached_decoding_matches_full_forward_on_ndarray() {
        cached_matches_full::<NdArray>();
    }

    #[test]
    fn cached_decoding_matches_full_forward_on_flex() {
        cached_matches_full::<Flex>();
    }
}
