//! Qwen2's Hugging Face side: the lenient mirror of `config.json` (unknown keys ignored,
//! `transformers`' defaults for missing ones, unsupported features refused by name), and the
//! mapping of checkpoint tensors to kiln's names and layouts. Names need no mapping (the
//! model's fields are the checkpoint keys); layouts do: Burn's `Linear.weight` is
//! `[in, out]`, Hugging Face's `[out, in]`.

use std::path::Path;

use serde::Deserialize;

use super::Qwen2Config;
use crate::family::HfFormat;
use crate::{ModelError, NamedTensor};

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
}

impl HfFormat for Qwen2Config {
    fn config_json(&self) -> serde_json::Value {
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

    /// Linear weights are transposed from `[out, in]` to Burn's `[in, out]`; a tied
    /// model's `lm_head.weight` is dropped (the embedding serves as the head).
    fn import_tensor(&self, name: String, t: NamedTensor) -> Option<(String, NamedTensor)> {
        if self.tie_word_embeddings && name == "lm_head.weight" {
            return None;
        }
        Some(if is_linear_weight(&name, &t) {
            (name, transpose(t))
        } else {
            (name, t)
        })
    }

    fn export_tensor(&self, name: String, t: NamedTensor) -> (String, NamedTensor) {
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
