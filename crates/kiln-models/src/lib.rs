//! kiln-models: the model families, generic over the Burn backend.
//!
//! A family maps token ids to logits plus named auxiliary losses; everything else (data,
//! loop, optimizer, checkpoints) is shared. [`Model`] is the one type the trainer sees: an
//! enum over families, so the loop is monomorphized once per backend, not per family.
//!
//! Parameters are addressed by their checkpoint names (`model.layers.0.mlp.up_proj.weight`),
//! built from the module field names by [`named_params`]; [`load_named`] puts tensors back
//! and reports every missing, unused or mis-shaped name.

// A global allocator is unsafe by definition; each block's provenance is argued there.
#[allow(unsafe_code)]
pub mod alloc;
pub mod convgpt;
pub mod generate;
pub mod hf;
pub mod init;
pub mod lora;
pub mod moa;
pub mod ops;
pub mod qwen2;

// kiln's backend operations, their host kernels and NF4 live in the kiln-ops crate; these
// names keep the paths the model code and the crates above use.
pub use kiln_ops as backend;
pub use kiln_ops::{nf4, parallel};

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;

use kiln_recipe::{AdapterKind, AdapterSection, InitKind, ModelFamily, Recipe};

pub use backend::{KilnAutodiffBackend, KilnBackend};
pub use convgpt::{ConvgptConfig, ConvgptModel};
pub use generate::{GenerateError, GenerateOptions, Generation, generate};
pub use init::Init;
pub use moa::{MoaConfig, MoaModel};
pub use qwen2::{KvCache, Qwen2Config, Qwen2ForCausalLM};

/// Errors from building or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The recipe lacks the family's table.
    #[error("model.{0}: missing table for the chosen family")]
    MissingConfig(&'static str),
    /// Loaded tensors do not match the model.
    #[error("{0}")]
    Load(String),
    /// A required file is absent.
    #[error("`{path}` not found: {hint}")]
    MissingFile {
        /// The file.
        path: std::path::PathBuf,
        /// What was expected.
        hint: String,
    },
    /// A file could not be read or written.
    #[error("`{path}`: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors file is malformed, truncated or of an unsupported dtype.
    #[error("`{path}`: {message}")]
    Safetensors {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A configuration file is malformed or describes something unsupported.
    #[error("`{path}`: {message}")]
    Config {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct ModelOutput<B: Backend> {
    /// `[batch, seq, vocab]`.
    pub logits: Tensor<B, 3>,
    /// Named auxiliary losses (already weighted), added to the language-model loss.
    pub aux_losses: Vec<(String, Tensor<B, 1>)>,
    /// Named statistics (detached), e.g. router path usage.
    pub stats: Vec<(String, Tensor<B, 1>)>,
}

/// What layers report besides their output: auxiliary losses (already weighted; several
/// entries of one name add up) and statistics (detached).
#[derive(Debug)]
pub struct Aux<B: Backend> {
    /// Named losses, `[1]` each.
    pub losses: Vec<(String, Tensor<B, 1>)>,
    /// Named statistics.
    pub stats: Vec<(String, Tensor<B, 1>)>,
}

impl<B: Backend> Default for Aux<B> {
    fn default() -> Self {
        Self {
            losses: Vec::new(),
            stats: Vec::new(),
        }
    }
}

/// A router of the model: the statistic holding its path usage and, per path, the prefix
/// of that path's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterPaths {
    /// Name of the statistic (`[paths + 1]`: usage per path, then confidence).
    pub stat: String,
    /// Parameter-name prefix of each path, in router order.
    pub paths: Vec<String>,
    /// Paths kept per token.
    pub top_k: usize,
}

/// What the layers of one forward pass share (positions, masks), per family.
#[derive(Debug, Clone)]
pub enum LayerContext<B: KilnBackend> {
    /// Qwen2's RoPE tables and attention bias.
    Qwen2(qwen2::LayerContext<B>),
    /// MoA's causal bias and rotary tables.
    Moa(moa::MoaContext<B>),
    /// ConvGPT's grid taps and rotary tables.
    Convgpt(convgpt::ConvgptContext<B>),
}

/// NEFTune (Jain et al. 2023): uniform noise of magnitude `alpha / sqrt(L * d)` on the input
/// embeddings, in training only (never in eval or generation, which run without autodiff).
///
/// # Shapes
/// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
pub(crate) fn neftune<B: Backend>(x: Tensor<B, 3>, alpha: f64) -> Tensor<B, 3> {
    let device = x.device();
    if alpha <= 0.0 || !B::ad_enabled(&device) {
        return x;
    }
    let [_, t, d] = x.dims();
    let m = alpha / ((t * d) as f64).sqrt();
    let noise = Tensor::random(
        x.shape(),
        burn::tensor::Distribution::Uniform(-m, m),
        &device,
    );
    x + noise
}

/// Bytes (f32) per token kept for the backward pass, from per-token value counts: one
/// layer's activations (`one_layer`), all layers' (`all_layers`) and every layer's input
/// (`inputs`, what activation checkpointing keeps besides one layer), plus the logits with
/// their gradient (3 × `vocab`) and `transient` values alive during one step of a layer
/// (an attention block's scores). Shared by every family's `activation_bytes_per_token`.
pub(crate) fn activation_bytes(
    one_layer: u64,
    all_layers: u64,
    inputs: u64,
    vocab: usize,
    transient: u64,
    checkpointed: bool,
) -> u64 {
    let kept = if checkpointed {
        one_layer + inputs
    } else {
        all_layers
    };
    4 * (kept + transient) + logits_bytes_per_token(vocab)
}

/// Bytes (f32) per token of the logits, with what the fused cross-entropy and the head's
/// backward hold beside them (3 × `vocab` values): the part of the activations that
/// `train.head_chunk_tokens` bounds to one chunk.
pub fn logits_bytes_per_token(vocab: usize) -> u64 {
    4 * 3 * vocab as u64
}

/// The size of an adapter run's frozen base projections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaseFootprint {
    /// Weights under adapters.
    pub weights: u64,
    /// Bytes they hold.
    pub bytes: u64,
    /// Whether they are NF4.
    pub nf4: bool,
}

impl BaseFootprint {
    /// Bytes per weight.
    pub fn bytes_per_weight(&self) -> f64 {
        self.bytes as f64 / self.weights.max(1) as f64
    }
}

/// Every model family kiln trains.
#[derive(Module, Debug)]
pub enum Model<B: KilnBackend> {
    /// A Qwen2 decoder.
    Qwen2(Qwen2ForCausalLM<B>),
    /// A DiscoverLM mixture-of-attentions model.
    Moa(MoaModel<B>),
    /// A ConvGPT-v2 model.
    Convgpt(ConvgptModel<B>),
}

impl<B: KilnBackend> Model<B> {
    /// Builds the recipe's model: random weights from `run.seed`, or pretrained weights
    /// from the family's `hf_dir`.
    pub fn from_recipe(recipe: &Recipe, device: &B::Device) -> Result<Self, ModelError> {
        Self::build(recipe, device, None)
    }

    /// [`Model::from_recipe`], optionally with a QLoRA adapter attached: then every targeted
    /// base weight is quantized to NF4 as it is read from the checkpoint, so loading never
    /// holds more than one f32 weight beyond the unquantized rest of the model (the
    /// embedding, norms and head), and targeted weights of the random initialization are
    /// never drawn.
    fn build(
        recipe: &Recipe,
        device: &B::Device,
        qlora: Option<&AdapterSection>,
    ) -> Result<Self, ModelError> {
        let init = Init::new(recipe.run.seed);
        match ModelSpec::from_recipe(recipe)? {
            ModelSpec::Moa(cfg) => Ok(Self::Moa(cfg.init(&init, device))),
            ModelSpec::Convgpt(cfg) => Ok(Self::Convgpt(cfg.init(&init, device))),
            ModelSpec::Qwen2(cfg) => {
                let section = recipe
                    .model
                    .qwen2
                    .as_ref()
                    .ok_or(ModelError::MissingConfig("qwen2"))?;
                let model = Self::Qwen2(cfg.init(&init, device));
                let (InitKind::Pretrained, Some(dir)) = (section.init_kind(), &section.hf_dir)
                else {
                    return Ok(match qlora {
                        Some(a) => model.with_adapter(a, recipe.run.seed, device),
                        None => model,
                    });
                };
                let mut quantized = BTreeMap::new();
                let tensors = hf::read_checkpoint(Path::new(dir), |n, t| {
                    if let Some(module) = n.strip_suffix(".weight")
                        && qlora.is_some_and(|a| is_target(module, a))
                        && t.shape.len() == 2
                    {
                        // Hugging Face layout [out, in], as bitsandbytes quantizes it.
                        let q = nf4::Nf4Tensor::quantize(&t.values, &t.shape);
                        quantized.insert(module.to_string(), std::sync::Arc::new(q));
                        return None;
                    }
                    cfg.from_hf_tensor(n, t)
                })?;
                let mut mismatched = Vec::new();
                let model = match qlora {
                    Some(a) => model.with_adapter_on(
                        a,
                        recipe.run.seed,
                        device,
                        &mut quantized,
                        &mut mismatched,
                    ),
                    None => model,
                };
                mismatched.extend(
                    quantized
                        .keys()
                        .map(|m| format!("{m}.weight: not a projection of this model")),
                );
                if !mismatched.is_empty() {
                    return Err(ModelError::Load(format!(
                        "`{dir}`: weights do not match the model:\n  {}",
                        mismatched.join("\n  ")
                    )));
                }
                load_checked(model, tensors, device, Require::AllButAdapters)
                    .map_err(|e| ModelError::Load(format!("`{dir}`: {e}")))
            }
        }
    }

    /// Builds the recipe's architecture with the given weights (e.g. from a checkpoint),
    /// without reading any pretrained files.
    pub fn with_weights(
        recipe: &Recipe,
        tensors: BTreeMap<String, NamedTensor>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let init = Init::new(recipe.run.seed);
        let model = match ModelSpec::from_recipe(recipe)? {
            ModelSpec::Qwen2(cfg) => Self::Qwen2(cfg.init(&init, device)),
            ModelSpec::Moa(cfg) => Self::Moa(cfg.init(&init, device)),
            ModelSpec::Convgpt(cfg) => Self::Convgpt(cfg.init(&init, device)),
        };
        load_named(model, tensors, device)
    }

    /// Attaches LoRA adapters to the recipe's target projections and freezes every other
    /// parameter; `qlora` also quantizes the targeted base weights to NF4. `A` is drawn
    /// from `seed` by parameter name (kaiming-uniform with a = sqrt(5), as PEFT), `B` is zero.
    pub fn with_adapter(self, adapter: &AdapterSection, seed: u64, device: &B::Device) -> Self {
        self.with_adapter_on(adapter, seed, device, &mut BTreeMap::new(), &mut Vec::new())
    }

    /// [`Model::with_adapter`], taking a target's NF4 base from `quantized` (by module
    /// name) when it is there instead of quantizing the module's own weight.
    fn with_adapter_on(
        self,
        adapter: &AdapterSection,
        seed: u64,
        device: &B::Device,
        quantized: &mut BTreeMap<String, std::sync::Arc<nf4::Nf4Tensor>>,
        mismatched: &mut Vec<String>,
    ) -> Self {
        let init = Init::new(seed);
        let scale = if adapter.rslora {
            adapter.alpha / (adapter.rank as f64).sqrt()
        } else {
            adapter.alpha / adapter.rank as f64
        };
        let spec = lora::LoraSpec {
            rank: adapter.rank,
            scale,
            dropout: adapter.dropout,
            nf4: adapter.kind == AdapterKind::Qlora,
        };
        let mut attach = |p: lora::Proj<B>, name: String| -> lora::Proj<B> {
            if !is_target(&name, adapter) {
                return p;
            }
            let p = match quantized.remove(&name) {
                Some(q) if q.shape == [p.dims()[1], p.dims()[0]] => p.with_nf4_base(q),
                Some(q) => {
                    let [inp, out] = p.dims();
                    mismatched.push(format!(
                        "{name}.weight: expected shape {:?}, found {:?}",
                        [out, inp],
                        q.shape
                    ));
                    p
                }
                None => p,
            };
            let [inp, _] = p.dims();
            let bound = 1.0 / (inp as f64).sqrt();
            let a = init.uniform(
                &format!("{name}.lora_A.weight"),
                [inp, spec.rank],
                bound,
                device,
            );
            p.with_lora(spec, a, device)
        };
        let model = match self {
            Self::Qwen2(mut m) => {
                let layers = std::mem::take(&mut m.model.layers);
                m.model.layers = layers
                    .into_iter()
                    .enumerate()
                    .map(|(i, mut l)| {
                        let p = format!("model.layers.{i}");
                        let a = l.self_attn;
                        l.self_attn = qwen2::Attention {
                            q_proj: attach(a.q_proj, format!("{p}.self_attn.q_proj")),
                            k_proj: attach(a.k_proj, format!("{p}.self_attn.k_proj")),
                            v_proj: attach(a.v_proj, format!("{p}.self_attn.v_proj")),
                            o_proj: attach(a.o_proj, format!("{p}.self_attn.o_proj")),
                            ..a
                        };
                        let f = l.mlp;
                        l.mlp = qwen2::Mlp {
                            gate_proj: attach(f.gate_proj, format!("{p}.mlp.gate_proj")),
                            up_proj: attach(f.up_proj, format!("{p}.mlp.up_proj")),
                            down_proj: attach(f.down_proj, format!("{p}.mlp.down_proj")),
                        };
                        l
                    })
                    .collect();
                Self::Qwen2(m)
            }
            // Validation only allows adapters on qwen2; nothing to attach here.
            other => other,
        };
        model.map(&mut Freeze::default())
    }

    /// The model a recipe trains: [`Model::from_recipe`], with the `[adapter]` attached.
    pub fn for_training(recipe: &Recipe, device: &B::Device) -> Result<Self, ModelError> {
        let model = match &recipe.adapter {
            Some(a) if a.kind == AdapterKind::Qlora => Self::build(recipe, device, Some(a))?,
            Some(a) => Self::from_recipe(recipe, device)?.with_adapter(a, recipe.run.seed, device),
            None => Self::from_recipe(recipe, device)?,
        };
        Ok(model.with_neftune(recipe.train.neftune_alpha))
    }

    /// Sets the NEFTune noise scale (0: off); it only acts while gradients are tracked.
    pub fn with_neftune(self, alpha: f64) -> Self {
        match self {
            Self::Qwen2(mut m) => {
                m.neftune_alpha = alpha;
                Self::Qwen2(m)
            }
            Self::Moa(mut m) => {
                m.neftune_alpha = alpha;
                Self::Moa(m)
            }
            Self::Convgpt(mut m) => {
                m.neftune_alpha = alpha;
                Self::Convgpt(m)
            }
        }
    }

    /// The model of a checkpoint: for an adapter run, the base (from `hf_dir` or the seed)
    /// with the checkpoint's adapters; otherwise the checkpoint's full weights.
    pub fn restore(
        recipe: &Recipe,
        tensors: BTreeMap<String, NamedTensor>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        if recipe.adapter.is_none() {
            return Ok(Self::with_weights(recipe, tensors, device)?
                .with_neftune(recipe.train.neftune_alpha));
        }
        let model = Self::for_training(recipe, device)?;
        load_named_subset(model, tensors, device)
    }

    /// Loads a Hugging Face Qwen2 directory (`config.json` + safetensors).
    pub fn from_hf_dir(dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        let cfg = Qwen2Config::from_hf_dir(dir)?;
        let model = Self::Qwen2(cfg.init(&Init::new(0), device));
        let tensors = hf::read_checkpoint(dir, |n, t| cfg.from_hf_tensor(n, t))?;
        load_named(model, tensors, device)
            .map_err(|e| ModelError::Load(format!("`{}`: {e}", dir.display())))
    }

    /// Writes the LoRA adapters as a PEFT adapter directory (`adapter_config.json` +
    /// `adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight` `[r, in]`
    /// and `lora_B.weight` `[out, r]`) that `PeftModel.from_pretrained` loads onto `base`.
    pub fn export_peft(
        &self,
        dir: &Path,
        adapter: &AdapterSection,
        base: &str,
    ) -> Result<Vec<std::path::PathBuf>, ModelError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ModelError::Io { path, source }
        };
        let Self::Qwen2(m) = self else {
            return Err(ModelError::Load(
                "the model has no LoRA adapters to export (adapters apply to qwen2)".to_string(),
            ));
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let cfg = m.config();
        let tensors: BTreeMap<String, NamedTensor> = named_params(self)
            .into_iter()
            .filter(|(n, _)| n.contains(".lora_"))
            .map(|(n, t)| {
                let (n, t) = cfg.to_hf_tensor(n, t);
                (format!("base_model.model.{n}"), t)
            })
            .collect();
        if tensors.is_empty() {
            return Err(ModelError::Load(
                "the model has no LoRA adapters to export".to_string(),
            ));
        }
        let weights = dir.join("adapter_model.safetensors");
        hf::write_tensors(&weights, &tensors)?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": adapter.rank,
            "lora_alpha": adapter.alpha,
            "lora_dropout": adapter.dropout,
            "target_modules": adapter.targets,
            "use_rslora": adapter.rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        });
        let path = dir.join("adapter_config.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&config).expect("config serializes"),
        )
        .map_err(io(&path))?;
        Ok(vec![weights, path])
    }

    /// The model with every adapter merged into its base, as a plain model.
    pub fn merged(self, device: &B::Device) -> Self {
        let mut m = match self {
            Self::Qwen2(m) => m,
            other => return other,
        };
        let layers = std::mem::take(&mut m.model.layers);
        m.model.layers = layers
            .into_iter()
            .map(|mut l| {
                let a = l.self_attn;
                l.self_attn = qwen2::Attention {
                    q_proj: a.q_proj.merged(device),
                    k_proj: a.k_proj.merged(device),
                    v_proj: a.v_proj.merged(device),
                    o_proj: a.o_proj.merged(device),
                    ..a
                };
                let f = l.mlp;
                l.mlp = qwen2::Mlp {
                    gate_proj: f.gate_proj.merged(device),
                    up_proj: f.up_proj.merged(device),
                    down_proj: f.down_proj.merged(device),
                };
                l
            })
            .collect();
        Self::Qwen2(m)
    }

    /// Attaches a PEFT LoRA adapter directory (as [`Model::export_peft`] writes it) to this
    /// model, e.g. one loaded with [`Model::from_hf_dir`].
    pub fn load_peft_adapter(self, dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let bad = |m: &str| ModelError::Config {
            path: path.clone(),
            message: m.to_string(),
        };
        let adapter = AdapterSection {
            kind: AdapterKind::Lora,
            rank: cfg["r"].as_u64().ok_or_else(|| bad("`r` missing"))? as usize,
            alpha: cfg["lora_alpha"]
                .as_f64()
                .ok_or_else(|| bad("`lora_alpha` missing"))?,
            dropout: 0.0,
            targets: cfg["target_modules"]
                .as_array()
                .ok_or_else(|| bad("`target_modules` must be a list"))?
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            rslora: cfg["use_rslora"].as_bool().unwrap_or(false),
        };
        let Self::Qwen2(m) = &self else {
            return Err(ModelError::Load(
                "PEFT adapters apply to qwen2 models".to_string(),
            ));
        };
        let qcfg = m.config().clone();
        let weights = dir.join("adapter_model.safetensors");
        let tensors = hf::read_checkpoint_file(&weights, |name, t| {
            let name = name
                .strip_prefix("base_model.model.")
                .unwrap_or(&name)
                .replace(".default.", ".");
            Some(
                qcfg.from_hf_tensor(name, t)
                    .expect("adapter tensors are never dropped"),
            )
        })?;
        let model = self.with_adapter(&adapter, 0, device);
        load_named_subset(model, tensors, device)
    }

    /// Writes the model as a Hugging Face directory that `transformers` loads: `config.json`
    /// plus safetensors (sharded past `max_shard_bytes`). Returns the files written.
    pub fn export_hf(
        &self,
        dir: &Path,
        max_shard_bytes: u64,
    ) -> Result<Vec<std::path::PathBuf>, ModelError> {
        match self {
            Self::Qwen2(m) => {
                let cfg = m.config();
                if param_shapes(self).keys().any(|k| k.contains(".lora_")) {
                    return Err(ModelError::Load(
                        "the model has LoRA adapters: merge them first (`merged`) or export them in PEFT format".to_string(),
                    ));
                }
                let tensors: BTreeMap<String, NamedTensor> = named_params(self)
                    .into_iter()
                    .map(|(n, t)| cfg.to_hf_tensor(n, t))
                    .collect();
                let mut files = hf::write_checkpoint(dir, &tensors, max_shard_bytes)?;
                let path = dir.join("config.json");
                let json =
                    serde_json::to_string_pretty(&cfg.to_hf_json()).expect("config serializes");
                std::fs::write(&path, json).map_err(|source| ModelError::Io {
                    path: path.clone(),
                    source,
                })?;
                files.push(path);
                Ok(files)
            }
            Self::Moa(_) | Self::Convgpt(_) => Err(ModelError::Load(
                "only qwen2 models have a Hugging Face format: a checkpoint's model.safetensors is the model"
                    .to_string(),
            )),
        }
    }

    /// The frozen base under the adapters: how many weights it has and the bytes they hold
    /// (NF4 codes and statistics for QLoRA, f32 for LoRA); `None` without adapters.
    pub fn adapter_base(&self) -> Option<BaseFootprint> {
        let projs: Vec<&lora::Proj<B>> = match self {
            Self::Qwen2(m) => m
                .model
                .layers
                .iter()
                .flat_map(|l| {
                    let (a, f) = (&l.self_attn, &l.mlp);
                    [
                        &a.q_proj,
                        &a.k_proj,
                        &a.v_proj,
                        &a.o_proj,
                        &f.gate_proj,
                        &f.up_proj,
                        &f.down_proj,
                    ]
                })
                .filter(|p| p.lora_A.is_some())
                .collect(),
            Self::Moa(_) | Self::Convgpt(_) => Vec::new(),
        };
        (!projs.is_empty()).then(|| BaseFootprint {
            weights: projs
                .iter()
                .map(|p| p.dims().iter().product::<usize>() as u64)
                .sum(),
            bytes: projs.iter().map(|p| p.base_bytes() as u64).sum(),
            nf4: projs.iter().all(|p| p.nf4.is_some()),
        })
    }

    /// Number of layers, for layer-by-layer passes ([`Model::layer`]).
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Qwen2(m) => m.num_layers(),
            Self::Moa(m) => m.blocks.len(),
            Self::Convgpt(m) => m.layers.len(),
        }
    }

    /// What the layers of one forward pass share (positions, masks).
    pub fn layer_context(&self, input_ids: &Tensor<B, 2, Int>) -> LayerContext<B> {
        match self {
            Self::Qwen2(m) => LayerContext::Qwen2(m.layer_context(input_ids, None)),
            Self::Moa(m) => LayerContext::Moa(m.layer_context(input_ids)),
            Self::Convgpt(m) => LayerContext::Convgpt(m.layer_context(input_ids)),
        }
    }

    /// The input to the first layer.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        match self {
            Self::Qwen2(m) => m.embed(input_ids),
            Self::Moa(m) => m.embed(input_ids),
            Self::Convgpt(m) => m.embed(input_ids),
        }
    }

    /// Layer `i`: `[batch, seq, hidden]` -> `[batch, seq, hidden]`; its auxiliary losses
    /// and statistics go to `aux`.
    ///
    /// # Panics
    /// If `ctx` was made by another family's model.
    pub fn layer(
        &self,
        i: usize,
        x: Tensor<B, 3>,
        ctx: &LayerContext<B>,
        aux: &mut Aux<B>,
    ) -> Tensor<B, 3> {
        match (self, ctx) {
            (Self::Qwen2(m), LayerContext::Qwen2(c)) => m.layer(i, x, c),
            (Self::Moa(m), LayerContext::Moa(c)) => m.layer(i, x, c, aux),
            (Self::Convgpt(m), LayerContext::Convgpt(c)) => m.layer(i, x, c),
            _ => panic!("a layer context of another model family"),
        }
    }

    /// The routers of the model and the parameters of their paths (none for qwen2).
    pub fn routers(&self) -> Vec<RouterPaths> {
        match self {
            Self::Qwen2(_) | Self::Convgpt(_) => Vec::new(),
            Self::Moa(m) => (0..m.blocks.len())
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
                            paths: paths("moa", &moa::MOA_PATHS),
                            top_k: m.config.top_k,
                        },
                        RouterPaths {
                            stat: format!("blocks.{l}.ffn.router"),
                            paths: paths("ffn", &moa::FFN_EXPERTS),
                            top_k: m.config.top_k.min(moa::FFN_EXPERTS.len()),
                        },
                    ]
                })
                .collect(),
        }
    }

    /// From the last layer's output to logits: `[batch, seq, hidden]` -> `[batch, seq, vocab]`.
    pub fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Self::Qwen2(m) => m.logits(x),
            Self::Moa(m) => m.logits(x),
            Self::Convgpt(m) => m.logits(x),
        }
    }

    /// Whether the input embedding is trained (false under adapters).
    pub fn embedding_trains(&self) -> bool {
        match self {
            Self::Qwen2(m) => m.embedding_trains(),
            Self::Moa(m) => m.embed_tokens.weight.is_require_grad(),
            Self::Convgpt(m) => m.embed_tokens.weight.is_require_grad(),
        }
    }

    /// The last layer's output (the head's input) and what the layers reported: the
    /// forward pass without [`Model::head`], for callers that apply the head in pieces.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn hidden(&self, input_ids: Tensor<B, 2, Int>) -> (Tensor<B, 3>, Aux<B>) {
        let ctx = self.layer_context(&input_ids);
        let mut aux = Aux::default();
        let mut x = self.embed(input_ids);
        for l in 0..self.num_layers() {
            x = self.layer(l, x, &ctx, &mut aux);
        }
        (x, aux)
    }

    /// Logits and auxiliary losses.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> ModelOutput<B> {
        self.forward_masked(input_ids, None)
    }

    /// Logits and auxiliary losses, with padding keys masked out. (MoA has no padding mask:
    /// it is causal, so right padding never reaches a real token, and kiln's batches carry
    /// their padding on the right.)
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - padding: `[batch, seq]`, true at padding tokens
    pub fn forward_masked(
        &self,
        input_ids: Tensor<B, 2, Int>,
        padding: Option<Tensor<B, 2, Bool>>,
    ) -> ModelOutput<B> {
        match self {
            Self::Qwen2(m) => ModelOutput {
                logits: m.forward_masked(input_ids, padding),
                aux_losses: Vec::new(),
                stats: Vec::new(),
            },
            Self::Moa(m) => {
                let (logits, aux) = m.forward(input_ids);
                ModelOutput {
                    logits,
                    aux_losses: aux.losses,
                    stats: aux.stats,
                }
            }
            Self::Convgpt(m) => ModelOutput {
                logits: m.forward(input_ids),
                aux_losses: Vec::new(),
                stats: Vec::new(),
            },
        }
    }

    /// Vocabulary size of the output.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Qwen2(m) => m.config.vocab_size,
            Self::Moa(m) => m.config.vocab_size,
            Self::Convgpt(m) => m.config.vocab_size,
        }
    }
}

/// Model facts that need no weights: sizes and FLOPs.
#[derive(Debug, Clone)]
pub enum ModelSpec {
    /// A Qwen2 configuration.
    Qwen2(Qwen2Config),
    /// A MoA configuration.
    Moa(MoaConfig),
    /// A ConvGPT-v2 configuration.
    Convgpt(ConvgptConfig),
}

impl ModelSpec {
    /// The `[in, out]` of every projection an adapter can target, by module name
    /// (`q_proj`, ...), one entry per layer.
    pub fn projections(&self) -> Vec<(&'static str, [usize; 2])> {
        match self {
            Self::Qwen2(c) => {
                let (h, i) = (c.hidden_size, c.intermediate_size);
                let q = c.num_attention_heads * c.head_dim();
                let kv = c.num_key_value_heads * c.head_dim();
                let layer = [
                    ("q_proj", [h, q]),
                    ("k_proj", [h, kv]),
                    ("v_proj", [h, kv]),
                    ("o_proj", [q, h]),
                    ("gate_proj", [h, i]),
                    ("up_proj", [h, i]),
                    ("down_proj", [i, h]),
                ];
                (0..c.num_hidden_layers).flat_map(|_| layer).collect()
            }
            Self::Moa(_) | Self::Convgpt(_) => Vec::new(),
        }
    }

    /// The spec of a recipe's model.
    pub fn from_recipe(recipe: &Recipe) -> Result<Self, ModelError> {
        match recipe.model.family {
            ModelFamily::Qwen2 => Ok(Self::Qwen2(Qwen2Config::resolve(
                recipe
                    .model
                    .qwen2
                    .as_ref()
                    .ok_or(ModelError::MissingConfig("qwen2"))?,
            )?)),
            ModelFamily::Moa => Ok(Self::Moa(MoaConfig::from_section(
                recipe
                    .model
                    .moa
                    .as_ref()
                    .ok_or(ModelError::MissingConfig("moa"))?,
            ))),
            ModelFamily::Convgpt => Ok(Self::Convgpt(ConvgptConfig::from_section(
                recipe
                    .model
                    .convgpt
                    .as_ref()
                    .ok_or(ModelError::MissingConfig("convgpt"))?,
            ))),
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Qwen2(c) => c.vocab_size,
            Self::Moa(c) => c.vocab_size,
            Self::Convgpt(c) => c.vocab_size,
        }
    }

    /// Number of parameters.
    pub fn num_params(&self) -> u64 {
        match self {
            Self::Qwen2(c) => c.num_params(),
            Self::Moa(c) => c.num_params(),
            Self::Convgpt(c) => c.num_params(),
        }
    }

    /// Rough activation bytes per token kept for backward (see the family's docs); with
    /// `checkpointed`, one layer's plus every layer's input.
    pub fn activation_bytes_per_token(&self, seq: usize, checkpointed: bool) -> u64 {
        match self {
            Self::Qwen2(c) => c.activation_bytes_per_token(seq, checkpointed),
            Self::Moa(c) => c.activation_bytes_per_token(seq, checkpointed),
            Self::Convgpt(c) => c.activation_bytes_per_token(seq, checkpointed),
        }
    }

    /// Parameters that enter matrix products per token.
    pub fn matmul_params(&self) -> u64 {
        match self {
            Self::Qwen2(c) => c.matmul_params(),
            Self::Moa(c) => c.matmul_params(),
            Self::Convgpt(c) => c.matmul_params(),
        }
    }

    /// Training (forward + backward) FLOPs per token at sequence length `seq`.
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        match self {
            Self::Qwen2(c) => c.flops_per_token(seq),
            Self::Moa(c) => c.flops_per_token(seq),
            Self::Convgpt(c) => c.flops_per_token(seq),
        }
    }
}

/// Whether a parameter gets weight decay: matrices do; norms, biases, 1-D scales and MoA's
/// metric weights (pulling them to 0 would pull the metric to `softplus(0)`, not to
/// nothing) don't.
pub fn decays(name: &str, rank: usize) -> bool {
    rank >= 2 && !name.contains("norm") && !name.ends_with(".metric")
}

/// Freezes every parameter that is not part of a LoRA adapter.
#[derive(Default)]
struct Freeze {
    path: PathStack,
}

impl<B: Backend> ModuleMapper<B> for Freeze {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, name: &str, container_type: &str) {
        self.path.exit(name, container_type);
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.path.path().contains(".lora_") {
            param
        } else {
            param.set_require_grad(false)
        }
    }
}

/// The parameters that train (require gradients), by checkpoint name.
pub fn trainable_params<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, NamedTensor> {
    // Frozen parameters (a whole base model) are skipped before their values are read:
    // this runs at every checkpoint.
    let mut c = Collect {
        path: PathStack::default(),
        out: BTreeMap::new(),
        only_trainable: true,
    };
    module.visit(&mut c);
    c.out
}

/// A parameter's values, host side.
#[derive(Debug, Clone)]
pub struct NamedTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<f32>,
}

/// Tracks the dotted checkpoint name of the parameter being visited, for use in
/// `ModuleVisitor` / `ModuleMapper` implementations.
#[derive(Debug, Default)]
pub struct PathStack(Vec<String>);

impl PathStack {
    /// Call from `enter_module`.
    pub fn enter(&mut self, name: &str, container: &str) {
        // Enum variants (`Model::Qwen2`) are not part of checkpoint names.
        if !container.starts_with("Enum:") {
            self.0.push(name.to_string());
        }
    }

    /// Call from `exit_module`.
    pub fn exit(&mut self, _name: &str, container: &str) {
        if !container.starts_with("Enum:") {
            self.0.pop();
        }
    }

    /// The current dotted name.
    pub fn path(&self) -> String {
        self.0.join(".")
    }
}

struct Collect {
    path: PathStack,
    out: BTreeMap<String, NamedTensor>,
    only_trainable: bool,
}

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, name: &str, container_type: &str) {
        self.path.exit(name, container_type);
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.only_trainable && !param.is_require_grad() {
            return;
        }
        let data = param.val().into_data().convert::<f32>();
        let shape = data.shape.to_vec();
        let values = data.into_vec::<f32>().expect("converted to f32");
        self.out
            .insert(self.path.path(), NamedTensor { shape, values });
    }
}

/// Every float parameter of a module, by checkpoint name.
pub fn named_params<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, NamedTensor> {
    let mut c = Collect {
        path: PathStack::default(),
        out: BTreeMap::new(),
        only_trainable: false,
    };
    module.visit(&mut c);
    c.out
}

/// Names and shapes of every float parameter, without reading values.
pub fn param_shapes<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, Vec<usize>> {
    struct Shapes(PathStack, BTreeMap<String, Vec<usize>>);
    impl<B: Backend> ModuleVisitor<B> for Shapes {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.0.enter(name, container_type);
        }
        fn exit_module(&mut self, name: &str, container_type: &str) {
            self.0.exit(name, container_type);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.1.insert(self.0.path(), param.val().dims().to_vec());
        }
    }
    let mut s = Shapes(PathStack::default(), BTreeMap::new());
    module.visit(&mut s);
    s.1
}

struct Load<'a, B: Backend> {
    path: PathStack,
    tensors: &'a mut BTreeMap<String, NamedTensor>,
    device: B::Device,
    missing: Vec<String>,
    mismatched: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for Load<'_, B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, name: &str, container_type: &str) {
        self.path.exit(name, container_type);
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.path();
        let Some(loaded) = self.tensors.remove(&name) else {
            self.missing.push(name);
            return param;
        };
        // The shape without initializing a lazy parameter: a loaded weight is never drawn.
        let expected = param.lazy_shape().to_vec();
        if loaded.shape != expected {
            self.mismatched.push(format!(
                "{name}: expected shape {expected:?}, found {:?}",
                loaded.shape
            ));
            return param;
        }
        let id = param.id;
        let new =
            Tensor::<B, D>::from_data(TensorData::new(loaded.values, loaded.shape), &self.device);
        param.transform_for_load(new, id)
    }
}

/// Replaces the parameters named in `tensors` (e.g. a checkpoint's adapters), keeping the
/// others; fails on a tensor that matches no parameter or has the wrong shape.
pub fn load_named_subset<B: Backend, M: Module<B>>(
    module: M,
    tensors: BTreeMap<String, NamedTensor>,
    device: &B::Device,
) -> Result<M, ModelError> {
    load_checked(module, tensors, device, Require::Named)
}

/// Replaces every float parameter by the tensor of the same name.
///
/// Fails, listing them all, if any parameter has no tensor, a tensor has the wrong shape,
/// or a tensor matches no parameter. `tensors` is consumed.
pub fn load_named<B: Backend, M: Module<B>>(
    module: M,
    tensors: BTreeMap<String, NamedTensor>,
    device: &B::Device,
) -> Result<M, ModelError> {
    load_checked(module, tensors, device, Require::All)
}

/// Which parameters a load must cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Require {
    /// Every parameter.
    All,
    /// Every parameter but freshly attached adapters.
    AllButAdapters,
    /// Only those named.
    Named,
}

/// Whether the module `name` (`model.layers.0.self_attn.q_proj`) is one of the adapter's
/// targets.
fn is_target(name: &str, adapter: &AdapterSection) -> bool {
    name.starts_with("model.layers.")
        && adapter
            .targets
            .iter()
            .any(|t| name.rsplit('.').next() == Some(t.as_str()))
}

fn load_checked<B: Backend, M: Module<B>>(
    module: M,
    mut tensors: BTreeMap<String, NamedTensor>,
    device: &B::Device,
    require: Require,
) -> Result<M, ModelError> {
    let mut load = Load::<B> {
        path: PathStack::default(),
        tensors: &mut tensors,
        device: device.clone(),
        missing: Vec::new(),
        mismatched: Vec::new(),
    };
    let module = module.map(&mut load);
    let missing = match require {
        Require::All => load.missing,
        Require::AllButAdapters => load
            .missing
            .into_iter()
            .filter(|n| !n.contains(".lora_"))
            .collect(),
        Require::Named => Vec::new(),
    };
    let mismatched = load.mismatched;
    let unused: Vec<String> = tensors.into_keys().collect();
    if missing.is_empty() && mismatched.is_empty() && unused.is_empty() {
        return Ok(module);
    }
    let mut msg = String::from("weights do not match the model:");
    for m in &mismatched {
        msg.push_str(&format!("\n  shape mismatch: {m}"));
    }
    if !missing.is_empty() {
        msg.push_str(&format!("\n  missing: {}", missing.join(", ")));
    }
    if !unused.is_empty() {
        msg.push_str(&format!("\n  unused: {}", unused.join(", ")));
    }
    Err(ModelError::Load(msg))
}
