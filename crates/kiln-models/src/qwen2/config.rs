//! Qwen2's resolved configuration (from a recipe, or from `config.json` through
//! `import.rs`), its sizes and costs, and random initialization.

use std::path::{Path, PathBuf};

use kiln_recipe::Qwen2Section;

use super::{Attention, DecoderLayer, Qwen2ForCausalLM, Qwen2Model};
use crate::family::FamilyConfig;
use crate::init::Init;
use crate::layers::{RmsNorm, SwiGlu, TokenEmbedding};
use crate::{KilnBackend, ModelError};

/// Resolved Qwen2 configuration (no optional fields).
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Longest supported sequence.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the output head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Standard deviation of the normal initialization.
    pub initializer_range: f64,
}

impl Qwen2Config {
    /// Resolves a recipe's `[model.qwen2]`: from `hf_dir`'s `config.json`, or from the
    /// keys written in the recipe with Qwen2 defaults for the optional ones.
    pub fn resolve(section: &Qwen2Section) -> Result<Self, ModelError> {
        if let Some(dir) = &section.hf_dir {
            return Self::from_hf_dir(Path::new(dir));
        }
        let missing = |key: &'static str| ModelError::Config {
            path: PathBuf::from("[model.qwen2]"),
            message: format!("`{key}` is missing"),
        };
        Ok(Self {
            vocab_size: section.vocab_size.ok_or_else(|| missing("vocab_size"))?,
            hidden_size: section.hidden_size.ok_or_else(|| missing("hidden_size"))?,
            intermediate_size: section
                .intermediate_size
                .ok_or_else(|| missing("intermediate_size"))?,
            num_hidden_layers: section
                .num_hidden_layers
                .ok_or_else(|| missing("num_hidden_layers"))?,
            num_attention_heads: section
                .num_attention_heads
                .ok_or_else(|| missing("num_attention_heads"))?,
            num_key_value_heads: section
                .num_key_value_heads
                .ok_or_else(|| missing("num_key_value_heads"))?,
            max_position_embeddings: section.max_position_embeddings.unwrap_or(2048),
            rope_theta: section.rope_theta.unwrap_or(1_000_000.0),
            rms_norm_eps: section.rms_norm_eps.unwrap_or(1e-6),
            tie_word_embeddings: section.tie_word_embeddings.unwrap_or(false),
            initializer_range: section.initializer_range.unwrap_or(0.02),
        })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Builds the model with random weights drawn from `init`.
    pub fn init<B: KilnBackend>(&self, init: &Init, device: &B::Device) -> Qwen2ForCausalLM<B> {
        let std = self.initializer_range;
        let h = self.hidden_size;
        let d = self.head_dim();
        let q = self.num_attention_heads * d;
        let kv = self.num_key_value_heads * d;
        let layers = (0..self.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                DecoderLayer {
                    self_attn: Attention {
                        q_proj: init
                            .linear(&format!("{p}.self_attn.q_proj"), h, q, true, std, device)
                            .into(),
                        k_proj: init
                            .linear(&format!("{p}.self_attn.k_proj"), h, kv, true, std, device)
                            .into(),
                        v_proj: init
                            .linear(&format!("{p}.self_attn.v_proj"), h, kv, true, std, device)
                            .into(),
                        o_proj: init
                            .linear(&format!("{p}.self_attn.o_proj"), q, h, false, std, device)
                            .into(),
                        num_heads: self.num_attention_heads,
                        num_kv_heads: self.num_key_value_heads,
                        head_dim: d,
                    },
                    mlp: SwiGlu::new(
                        init,
                        &format!("{p}.mlp"),
                        [h, self.intermediate_size],
                        std,
                        device,
                    ),
                    input_layernorm: RmsNorm::new(h, self.rms_norm_eps, device),
                    post_attention_layernorm: RmsNorm::new(h, self.rms_norm_eps, device),
                }
            })
            .collect();
        let embed_tokens = TokenEmbedding::new(
            init,
            "model.embed_tokens.weight",
            [self.vocab_size, h],
            std,
            device,
        );
        let lm_head = (!self.tie_word_embeddings)
            .then(|| init.linear("lm_head", h, self.vocab_size, false, std, device));
        Qwen2ForCausalLM {
            model: Qwen2Model {
                embed_tokens,
                layers,
                norm: RmsNorm::new(h, self.rms_norm_eps, device),
            },
            lm_head,
            config: self.clone(),
        }
    }
}

impl FamilyConfig for Qwen2Config {
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Parameters that take part in matrix products per token (everything but the
    /// embedding lookup; a tied head counts once as the head).
    fn matmul_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let d = self.head_dim() as u64;
        let q = self.num_attention_heads as u64 * d;
        let kv = self.num_key_value_heads as u64 * d;
        let i = self.intermediate_size as u64;
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * i;
        per_layer * self.num_hidden_layers as u64 + self.vocab_size as u64 * h
    }

    /// Number of parameters.
    fn num_params(&self) -> u64 {
        let (h, d) = (self.hidden_size as u64, self.head_dim() as u64);
        let q = self.num_attention_heads as u64 * d;
        let kv = self.num_key_value_heads as u64 * d;
        let i = self.intermediate_size as u64;
        let v = self.vocab_size as u64;
        let per_layer = (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + per_layer * self.num_hidden_layers as u64 + h + head
    }

    /// Rough bytes of activations kept for the backward pass, per token, in f32 without
    /// activation checkpointing (inputs of every matrix product, MLP intermediates, and
    /// logits with their gradient). Attention keeps no scores: its backward recomputes them
    /// block by block ([`crate::backend::KilnBackend::kiln_attention`]), so `seq` only adds
    /// one block's scores at a time.
    ///
    /// With activation checkpointing only one layer's activations are alive at a time, plus
    /// every layer's input (`hidden` values per token per layer).
    fn activation_bytes_per_token(&self, seq: usize, checkpointed: bool) -> u64 {
        let h = self.hidden_size as u64;
        let i = self.intermediate_size as u64;
        let per_layer = 10 * h + 5 * i;
        crate::attention_activation_bytes(
            [per_layer, self.num_hidden_layers as u64, h],
            self.num_attention_heads,
            seq,
            self.vocab_size,
            checkpointed,
        )
    }

    /// Training FLOPs per token at sequence length `seq` (forward + backward):
    /// `6 * matmul_params + 12 * layers * heads * head_dim * seq` (PaLM's estimate).
    fn flops_per_token(&self, seq: usize) -> f64 {
        let attn = 12.0
            * self.num_hidden_layers as f64
            * (self.num_attention_heads * self.head_dim()) as f64
            * seq as f64;
        6.0 * self.matmul_params() as f64 + attn
    }

    /// Per layer: attention's `q_proj`, `k_proj`, `v_proj`, `o_proj` and the MLP's
    /// `gate_proj`, `up_proj`, `down_proj`.
    fn projections(&self) -> Vec<(&'static str, [usize; 2])> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.num_key_value_heads * self.head_dim();
        let layer = [
            ("q_proj", [h, q]),
            ("k_proj", [h, kv]),
            ("v_proj", [h, kv]),
            ("o_proj", [q, h]),
            ("gate_proj", [h, i]),
            ("up_proj", [h, i]),
            ("down_proj", [i, h]),
        ];
        (0..self.num_hidden_layers).flat_map(|_| layer).collect()
    }
}
