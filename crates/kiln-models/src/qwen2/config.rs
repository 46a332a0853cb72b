//! Qwen2 configuration: the resolved config, the lenient mirror of Hugging Face's
//! `config.json`, the mapping of checkpoint tensors to kiln's names and layouts, and random
//! initialization.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use kiln_recipe::Qwen2Section;

use super::{Attention, DecoderLayer, Mlp, Qwen2ForCausalLM, Qwen2Model, RmsNorm};
use crate::KilnBackend;
use crate::init::Init;
use crate::{ModelError, NamedTensor};

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

/// Lenient mirror of a Hugging Face Qwen2 `config.json`: unknown keys are ignored, missing
/// ones take `transformers`' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct HfQwen2Config {
    /// `model_type`, expected `qwen2`.
    #[serde(default)]
    pub model_type: Option<String>,
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
    /// Key/value heads (defaults to the query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Longest sequence.
    #[serde(default = "hf_default_max_position")]
    pub max_position_embeddings: usize,
    /// RoPE base (`transformers` 4.x writes it at the top level).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE settings (`transformers` 5.x: `{"rope_type": "default", "rope_theta": ...}`).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Per-layer attention kinds (`transformers` 5.x); only `full_attention` is supported.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// RMSNorm epsilon.
    #[serde(default = "hf_default_rms_eps")]
    pub rms_norm_eps: f64,
    /// Tied output head.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Init standard deviation.
    #[serde(default = "hf_default_init_range")]
    pub initializer_range: f64,
    /// Activation; only `silu` is supported.
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// RoPE scaling; only none is supported.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Sliding-window attention; only off is supported.
    #[serde(default)]
    pub use_sliding_window: bool,
}

fn hf_default_max_position() -> usize {
    32768
}

fn hf_default_rms_eps() -> f64 {
    1e-6
}

fn hf_default_init_range() -> f64 {
    0.02
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

    /// Reads `config.json` of a Hugging Face model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ModelError::MissingFile {
                    path: path.clone(),
                    hint: "a Hugging Face model directory holds `config.json`".to_string(),
                }
            } else {
                ModelError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let hf: HfQwen2Config = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let unsupported = |message: String| ModelError::Config {
            path: path.clone(),
            message,
        };
        if let Some(t) = hf.model_type.as_deref().filter(|t| *t != "qwen2") {
            return Err(unsupported(format!(
                "model_type is `{t}`, expected `qwen2`"
            )));
        }
        if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(unsupported(format!(
                "hidden_act `{act}` is not supported (only `silu`)"
            )));
        }
        if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported("rope_scaling is not supported".to_string()));
        }
        if hf.use_sliding_window {
            return Err(unsupported(
                "use_sliding_window = true is not supported".to_string(),
            ));
        }
        if let Some(kind) = hf
            .layer_types
            .iter()
            .flatten()
            .find(|k| *k != "full_attention")
        {
            return Err(unsupported(format!(
                "layer type `{kind}` is not supported (only `full_attention`)"
            )));
        }
        let mut rope_theta = hf.rope_theta;
        if let Some(params) = hf.rope_parameters.as_ref().filter(|v| !v.is_null()) {
            match params.get("rope_type").and_then(|v| v.as_str()) {
                None | Some("default") => {}
                Some(other) => {
                    return Err(unsupported(format!(
                        "rope_parameters.rope_type `{other}` is not supported (only `default`)"
                    )));
                }
            }
            if let Some(theta) = params.get("rope_theta").and_then(serde_json::Value::as_f64) {
                rope_theta = Some(theta);
            }
        }
        let cfg = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            max_position_embeddings: hf.max_position_embeddings,
            rope_theta: rope_theta.unwrap_or(10_000.0),
            rms_norm_eps: hf.rms_norm_eps,
            tie_word_embeddings: hf.tie_word_embeddings,
            initializer_range: hf.initializer_range,
        };
        if cfg.num_attention_heads == 0
            || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
            || cfg.num_key_value_heads == 0
            || !cfg
                .num_attention_heads
                .is_multiple_of(cfg.num_key_value_heads)
            || !cfg.head_dim().is_multiple_of(2)
        {
            return Err(unsupported(format!(
                "inconsistent heads: hidden_size {}, num_attention_heads {}, num_key_value_heads {}",
                cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
            )));
        }
        Ok(cfg)
    }

    /// The `config.json` that `transformers` reads back as this configuration.
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": { "rope_type": "default", "rope_theta": self.rope_theta },
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_sliding_window": false,
            "rope_scaling": null,
            "torch_dtype": "float32",
        })
    }

    /// Maps a Hugging Face tensor to kiln's name and layout: linear weights are transposed
    /// from `[out, in]` to Burn's `[in, out]`; a tied model's `lm_head.weight` is dropped
    /// (the embedding serves as the head).
    pub fn from_hf_tensor(&self, name: String, t: NamedTensor) -> Option<(String, NamedTensor)> {
        if self.tie_word_embeddings && name == "lm_head.weight" {
            return None;
        }
        Some(if is_linear_weight(&name, &t) {
            (name, transpose(t))
        } else {
            (name, t)
        })
    }

    /// The inverse of [`Qwen2Config::from_hf_tensor`].
    pub fn to_hf_tensor(&self, name: String, t: NamedTensor) -> (String, NamedTensor) {
        if is_linear_weight(&name, &t) {
            (name, transpose(t))
        } else {
            (name, t)
        }
    }
}

fn is_linear_weight(name: &str, t: &NamedTensor) -> bool {
    t.shape.len() == 2 && name != "model.embed_tokens.weight"
}

/// Transposes a 2-D tensor.
fn transpose(t: NamedTensor) -> NamedTensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    let mut values = vec![0.0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            values[j * r + i] = t.values[i * c + j];
        }
    }
    NamedTensor {
        shape: vec![c, r],
        values,
    }
}

impl Qwen2Config {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Parameters that take part in matrix products per token (everything but the
    /// embedding lookup; a tied head counts once as the head).
    pub fn matmul_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let d = self.head_dim() as u64;
        let q = self.num_attention_heads as u64 * d;
        let kv = self.num_key_value_heads as u64 * d;
        let i = self.intermediate_size as u64;
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * i;
        per_layer * self.num_hidden_layers as u64 + self.vocab_size as u64 * h
    }

    /// Number of parameters.
    pub fn num_params(&self) -> u64 {
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
    pub fn activation_bytes_per_token(&self, seq: usize, checkpointed: bool) -> u64 {
        let h = self.hidden_size as u64;
        let i = self.intermediate_size as u64;
        let heads = self.num_attention_heads as u64;
        let block = crate::backend::ATTENTION_BLOCK.min(seq) as u64;
        let per_layer = 10 * h + 5 * i;
        // Scores, probabilities and their gradient for one block of queries over `seq` keys,
        // per sequence: 3 · heads · block · seq values, i.e. 3 · heads · block per token.
        let transient = 3 * heads * block;
        let layers = self.num_hidden_layers as u64;
        crate::activation_bytes(
            per_layer,
            per_layer * layers,
            h * layers,
            self.vocab_size,
            transient,
            checkpointed,
        )
    }

    /// Training FLOPs per token at sequence length `seq` (forward + backward):
    /// `6 * matmul_params + 12 * layers * heads * head_dim * seq` (PaLM's estimate).
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        let attn = 12.0
            * self.num_hidden_layers as f64
            * (self.num_attention_heads * self.head_dim()) as f64
            * seq as f64;
        6.0 * self.matmul_params() as f64 + attn
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
                    mlp: Mlp {
                        gate_proj: init
                            .linear(
                                &format!("{p}.mlp.gate_proj"),
                                h,
                                self.intermediate_size,
                                false,
                                std,
                                device,
                            )
                            .into(),
                        up_proj: init
                            .linear(
                                &format!("{p}.mlp.up_proj"),
                                h,
                                self.intermediate_size,
                                false,
                                std,
                                device,
                            )
                            .into(),
                        down_proj: init
                            .linear(
                                &format!("{p}.mlp.down_proj"),
                                self.intermediate_size,
                                h,
                                false,
                                std,
                                device,
                            )
                            .into(),
                    },
                    input_layernorm: RmsNorm::new(h, self.rms_norm_eps, device),
                    post_attention_layernorm: RmsNorm::new(h, self.rms_norm_eps, device),
                }
            })
            .collect();
        let embed_tokens = burn::nn::Embedding {
            weight: init.normal(
                "model.embed_tokens.weight",
                [self.vocab_size, h],
                std,
                device,
            ),
        };
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
            neftune_alpha: 0.0,
        }
    }
}
