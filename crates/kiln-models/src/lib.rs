//! kiln-models: the model families, generic over the Burn backend.
//!
//! A family maps token ids to logits plus named auxiliary losses; everything else (data,
//! loop, optimizer, checkpoints) is shared. Each family implements [`Family`] (in
//! `family.rs`, which says why [`Model`] is an enum that dispatches in one place) and
//! composes the shared [`layers`]. [`Model`] is the one type the trainer sees, so the loop is
//! monomorphized once per backend, not per family.
//!
//! Parameters are addressed by their checkpoint names (`model.layers.0.mlp.up_proj.weight`),
//! built from the module field names by [`named_params`]; [`load_named`] puts tensors back
//! and reports every missing, unused or mis-shaped name.

// A global allocator is unsafe by definition; each block's provenance is argued there.
#[allow(unsafe_code)]
pub mod alloc;
pub mod convgpt;
pub mod family;
pub mod generate;
pub mod hf;
pub mod init;
pub mod layers;
pub mod lora;
pub mod moa;
pub mod ops;
pub mod qwen2;

mod adapter;

pub use adapter::BaseFootprint;
// kiln's backend operations, their host kernels and NF4 live in the kiln-ops crate; these
// names keep the paths the model code and the crates above use.
pub use kiln_ops as backend;
pub use kiln_ops::{nf4, parallel};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;

use kiln_recipe::{AdapterKind, InitKind, ModelFamily, Recipe};

pub use backend::{KilnAutodiffBackend, KilnBackend};
pub use convgpt::{ConvgptConfig, ConvgptModel};
pub use family::{AnyFamily, Family, FamilyConfig, HfFormat, Layers};
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
    /// Loaded tensors do not match the model's parameters.
    #[error("{0}")]
    Mismatch(Box<WeightMismatch>),
    /// The model has no LoRA adapters to export.
    #[error("the model has no LoRA adapters to export")]
    NoAdapters,
    /// A plain export of a model that still has adapters.
    #[error(
        "the model has LoRA adapters: merge them first (`merged`) or export them in PEFT format"
    )]
    UnmergedAdapters,
    /// The family has no projections that adapters can target.
    #[error("`{family}` models take no adapters (adapters apply to qwen2)")]
    NoAdapterTargets {
        /// The family.
        family: &'static str,
    },
    /// The family has no Hugging Face format.
    #[error(
        "`{family}` models have no Hugging Face format: a checkpoint's model.safetensors is the model"
    )]
    NoHfFormat {
        /// The family.
        family: &'static str,
    },
    /// A padding mask the family cannot honour.
    #[error(
        "`{family}` takes right padding only (it has no padding mask): row {row} has a token after padding"
    )]
    Padding {
        /// The family.
        family: &'static str,
        /// The first row with padding before a token.
        row: usize,
    },
    /// A required file is absent.
    #[error("`{path}` not found: {hint}")]
    MissingFile {
        /// The file.
        path: PathBuf,
        /// What was expected.
        hint: String,
    },
    /// A file could not be read or written.
    #[error("`{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors file is malformed, truncated or of an unsupported dtype.
    #[error("`{path}`: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A configuration file is malformed or describes something unsupported.
    #[error("`{path}`: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Tensors that do not match a model's parameters, each named.
#[derive(Debug, Default)]
pub struct WeightMismatch {
    /// Where the tensors came from (a directory or file), when known.
    pub origin: Option<PathBuf>,
    /// Tensors whose shape differs from their parameter's.
    pub shapes: Vec<ShapeMismatch>,
    /// Parameters that no tensor filled.
    pub missing: Vec<String>,
    /// Tensors that fill no parameter (with why, when more is known than the name).
    pub unused: Vec<String>,
}

/// A tensor whose shape differs from its parameter's.
#[derive(Debug)]
pub struct ShapeMismatch {
    /// The tensor's checkpoint name.
    pub tensor: String,
    /// The parameter's shape.
    pub expected: Vec<usize>,
    /// The tensor's shape.
    pub found: Vec<usize>,
}

impl WeightMismatch {
    fn is_empty(&self) -> bool {
        self.shapes.is_empty() && self.missing.is_empty() && self.unused.is_empty()
    }

    /// `Ok(())` when everything matched, the error otherwise.
    fn into_result(self) -> Result<(), ModelError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Mismatch(Box::new(self)))
        }
    }
}

impl std::fmt::Display for WeightMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(origin) = &self.origin {
            write!(f, "`{}`: ", origin.display())?;
        }
        write!(f, "weights do not match the model:")?;
        for m in &self.shapes {
            write!(
                f,
                "\n  shape mismatch: {}: expected shape {:?}, found {:?}",
                m.tensor, m.expected, m.found
            )?;
        }
        if !self.missing.is_empty() {
            write!(f, "\n  missing: {}", self.missing.join(", "))?;
        }
        if !self.unused.is_empty() {
            write!(f, "\n  unused: {}", self.unused.join(", "))?;
        }
        Ok(())
    }
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

/// [`activation_bytes`] of `layers` alike layers, `per_layer` values and `hidden` wide
/// each, with one attention block's scores, probabilities and their gradient alive at a time:
/// for `heads` heads, a block of [`backend::ATTENTION_BLOCK`] queries (at most `seq`) over
/// `seq` keys, i.e. `3 · heads · block` values per token.
pub(crate) fn attention_activation_bytes(
    [per_layer, layers, hidden]: [u64; 3],
    heads: usize,
    seq: usize,
    vocab: usize,
    checkpointed: bool,
) -> u64 {
    let block = backend::ATTENTION_BLOCK.min(seq) as u64;
    let transient = 3 * heads as u64 * block;
    activation_bytes(
        per_layer,
        per_layer * layers,
        hidden * layers,
        vocab,
        transient,
        checkpointed,
    )
}

/// Bytes (f32) per token of the logits, with what the fused cross-entropy and the head's
/// backward hold beside them (3 × `vocab` values): the part of the activations that
/// `train.head_chunk_tokens` bounds to one chunk.
pub fn logits_bytes_per_token(vocab: usize) -> u64 {
    4 * 3 * vocab as u64
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
    /// The family behind the model: the one place that matches on it (`family.rs` says
    /// why the model is an enum).
    pub fn family(&self) -> &dyn AnyFamily<B> {
        match self {
            Self::Qwen2(m) => m,
            Self::Moa(m) => m,
            Self::Convgpt(m) => m,
        }
    }

    /// [`Model::family`], mutable.
    pub fn family_mut(&mut self) -> &mut dyn AnyFamily<B> {
        match self {
            Self::Qwen2(m) => m,
            Self::Moa(m) => m,
            Self::Convgpt(m) => m,
        }
    }

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
        qlora: Option<&kiln_recipe::AdapterSection>,
    ) -> Result<Self, ModelError> {
        let model = ModelSpec::from_recipe(recipe)?.init(&Init::new(recipe.run.seed), device);
        match pretrained_dir(recipe) {
            Some(dir) => adapter::load_pretrained(model, dir, recipe.run.seed, qlora, device),
            None => Ok(match qlora {
                Some(a) => model.with_adapter(a, recipe.run.seed, device),
                None => model,
            }),
        }
    }

    /// Builds the recipe's architecture with the given weights (e.g. from a checkpoint),
    /// without reading any pretrained files.
    pub fn with_weights(
        recipe: &Recipe,
        tensors: BTreeMap<String, NamedTensor>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let model = ModelSpec::from_recipe(recipe)?.init(&Init::new(recipe.run.seed), device);
        load_named(model, tensors, device)
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
    pub fn with_neftune(mut self, alpha: f64) -> Self {
        self.family_mut().embedding_mut().neftune_alpha = alpha;
        self
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
        let tensors = hf::read_checkpoint(dir, |n, t| cfg.import_tensor(n, t))?;
        load_checked(model, tensors, device, Require::All, Some(dir))
    }

    /// Writes the model as a Hugging Face directory that `transformers` loads: `config.json`
    /// plus safetensors (sharded past `max_shard_bytes`). Returns the files written.
    pub fn export_hf(&self, dir: &Path, max_shard_bytes: u64) -> Result<Vec<PathBuf>, ModelError> {
        let family = self.family();
        let format = family.hf_format().ok_or(ModelError::NoHfFormat {
            family: family.name(),
        })?;
        if param_shapes(self).keys().any(|k| k.contains(".lora_")) {
            return Err(ModelError::UnmergedAdapters);
        }
        let tensors: BTreeMap<String, NamedTensor> = named_params(self)
            .into_iter()
            .map(|(n, t)| format.export_tensor(n, t))
            .collect();
        let mut files = hf::write_checkpoint(dir, &tensors, max_shard_bytes)?;
        let path = dir.join("config.json");
        let json = serde_json::to_string_pretty(&format.config_json()).expect("config serializes");
        std::fs::write(&path, json).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        files.push(path);
        Ok(files)
    }

    /// Number of layers, for layer-by-layer passes ([`Model::layers`]).
    pub fn num_layers(&self) -> usize {
        self.family().num_layers()
    }

    /// The layers of one forward pass over `input_ids` (without padding), bound to what
    /// they share (positions, masks): call [`Layers::layer`] one layer at a time, or
    /// [`Layers::forward`] for all.
    pub fn layers(&self, input_ids: &Tensor<B, 2, Int>) -> Layers<'_, B> {
        self.family().layers(input_ids)
    }

    /// The input to the first layer (with NEFTune noise while gradients are tracked).
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.family().embedding().forward(input_ids)
    }

    /// The routers of the model and the parameters of their paths (none for qwen2).
    pub fn routers(&self) -> Vec<RouterPaths> {
        self.family().routers()
    }

    /// From the last layer's output to logits: `[batch, seq, hidden]` -> `[batch, seq, vocab]`.
    pub fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.family().head(x)
    }

    /// Whether the input embedding is trained (false under adapters).
    pub fn embedding_trains(&self) -> bool {
        self.family().embedding().trains()
    }

    /// The last layer's output (the head's input) and what the layers reported: the
    /// forward pass without [`Model::head`], for callers that apply the head in pieces.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn hidden(&self, input_ids: Tensor<B, 2, Int>) -> (Tensor<B, 3>, Aux<B>) {
        self.layers(&input_ids).forward(self.embed(input_ids))
    }

    /// Logits and auxiliary losses.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> ModelOutput<B> {
        let (logits, aux) = family::run(self.family(), &self.layers(&input_ids), input_ids);
        ModelOutput {
            logits,
            aux_losses: aux.losses,
            stats: aux.stats,
        }
    }

    /// Logits and auxiliary losses, with padding keys masked out. Qwen2 masks padding
    /// anywhere; MoA and ConvGPT have no mask and take right padding only (it never reaches
    /// a real token in a causal model, and kiln's batches pad on the right), refusing any
    /// other with [`ModelError::Padding`].
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - padding: `[batch, seq]`, true at padding tokens
    pub fn forward_masked(
        &self,
        input_ids: Tensor<B, 2, Int>,
        padding: Option<Tensor<B, 2, Bool>>,
    ) -> Result<ModelOutput<B>, ModelError> {
        let Some(padding) = padding else {
            return Ok(self.forward(input_ids));
        };
        let family = self.family();
        let layers = family.masked_layers(&input_ids, padding)?;
        let (logits, aux) = family::run(family, &layers, input_ids);
        Ok(ModelOutput {
            logits,
            aux_losses: aux.losses,
            stats: aux.stats,
        })
    }

    /// Vocabulary size of the output.
    pub fn vocab_size(&self) -> usize {
        self.family().config().vocab_size()
    }
}

/// The `hf_dir` a recipe's model loads its pretrained weights from, if any.
fn pretrained_dir(recipe: &Recipe) -> Option<&Path> {
    let section = recipe.model.qwen2.as_ref()?;
    let dir = section.hf_dir.as_deref()?;
    (recipe.model.family == ModelFamily::Qwen2 && section.init_kind() == InitKind::Pretrained)
        .then_some(Path::new(dir))
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
    /// The spec of a recipe's model.
    pub fn from_recipe(recipe: &Recipe) -> Result<Self, ModelError> {
        let m = &recipe.model;
        Ok(match m.family {
            ModelFamily::Qwen2 => Self::Qwen2(Qwen2Config::resolve(
                m.qwen2.as_ref().ok_or(ModelError::MissingConfig("qwen2"))?,
            )?),
            ModelFamily::Moa => Self::Moa(MoaConfig::from_section(
                m.moa.as_ref().ok_or(ModelError::MissingConfig("moa"))?,
            )),
            ModelFamily::Convgpt => Self::Convgpt(ConvgptConfig::from_section(
                m.convgpt
                    .as_ref()
                    .ok_or(ModelError::MissingConfig("convgpt"))?,
            )),
        })
    }

    /// The family's configuration: the one place that matches on it.
    pub fn config(&self) -> &dyn FamilyConfig {
        match self {
            Self::Qwen2(c) => c,
            Self::Moa(c) => c,
            Self::Convgpt(c) => c,
        }
    }

    /// The model with random weights drawn from `init` (lazily: a weight loaded before its
    /// first use is never drawn).
    pub fn init<B: KilnBackend>(&self, init: &Init, device: &B::Device) -> Model<B> {
        match self {
            Self::Qwen2(c) => Model::Qwen2(c.init(init, device)),
            Self::Moa(c) => Model::Moa(c.init(init, device)),
            Self::Convgpt(c) => Model::Convgpt(c.init(init, device)),
        }
    }

    /// The `[in, out]` of every projection an adapter can target, by module name
    /// (`q_proj`, ...), one entry per layer.
    pub fn projections(&self) -> Vec<(&'static str, [usize; 2])> {
        self.config().projections()
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.config().vocab_size()
    }

    /// Number of parameters.
    pub fn num_params(&self) -> u64 {
        self.config().num_params()
    }

    /// Rough activation bytes per token kept for backward (see the family's docs); with
    /// `checkpointed`, one layer's plus every layer's input.
    pub fn activation_bytes_per_token(&self, seq: usize, checkpointed: bool) -> u64 {
        self.config().activation_bytes_per_token(seq, checkpointed)
    }

    /// Parameters that enter matrix products per token.
    pub fn matmul_params(&self) -> u64 {
        self.config().matmul_params()
    }

    /// Training (forward + backward) FLOPs per token at sequence length `seq`.
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        self.config().flops_per_token(seq)
    }
}

/// Whether a parameter gets weight decay: matrices do; norms, biases, 1-D scales and MoA's
/// metric weights (pulling them to 0 would pull the metric to `softplus(0)`, not to
/// nothing) don't.
pub fn decays(name: &str, rank: usize) -> bool {
    rank >= 2 && !name.contains("norm") && !name.ends_with(".metric")
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
    mismatched: Vec<ShapeMismatch>,
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
            self.mismatched.push(ShapeMismatch {
                tensor: name,
                expected,
                found: loaded.shape,
            });
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
    load_checked(module, tensors, device, Require::Named, None)
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
    load_checked(module, tensors, device, Require::All, None)
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

/// Loads `tensors` into `module` as `require` says; on failure the error lists every
/// mismatched, missing and unused tensor, with `origin` (the directory or file read).
fn load_checked<B: Backend, M: Module<B>>(
    module: M,
    mut tensors: BTreeMap<String, NamedTensor>,
    device: &B::Device,
    require: Require,
    origin: Option<&Path>,
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
    WeightMismatch {
        origin: origin.map(Path::to_path_buf),
        shapes: load.mismatched,
        missing,
        unused: tensors.into_keys().collect(),
    }
    .into_result()?;
    Ok(module)
}
