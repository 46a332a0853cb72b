//! The recipe schema: plain serde structs, one per TOML section.
//!
//! Every struct denies unknown fields so that a typo is an error that names the key, and
//! every section has a `Default` so that a recipe only writes what it changes. No
//! `#[serde(flatten)]` is used anywhere: it silently disables unknown-field errors.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A whole training recipe, as written in a `.toml` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Run identity, seed, output location, backend and limits.
    pub run: RunSection,
    /// The model family and its configuration.
    pub model: ModelSection,
    /// How text becomes token ids.
    #[serde(default)]
    pub tokenizer: TokenizerSection,
    /// Where the training text comes from.
    pub data: DataSection,
    /// The curriculum: one entry per phase, run in order.
    pub phases: Vec<Phase>,
    /// The optimizer.
    #[serde(default)]
    pub optim: OptimSection,
    /// The learning-rate schedule over all phases.
    #[serde(default)]
    pub schedule: ScheduleSection,
    /// Loop settings: accumulation, clipping, checkpoints, evaluation.
    #[serde(default)]
    pub train: TrainSection,
    /// Parameter-efficient fine-tuning: LoRA adapters on a frozen (optionally NF4) base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterSection>,
    /// Dream consolidation: periodic per-tensor learning-rate multipliers from gradient
    /// statistics and router usage (DiscoverLM's method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dream: Option<DreamSection>,
    /// Data-parallel training over several processes (nodes), on Burn's collective engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed: Option<DistributedSection>,
}

/// `[distributed]`: data-parallel training over `nodes x devices_per_node` processes, one
/// per device (as torchrun launches them). Every process runs `kiln train` on the same
/// recipe; each step draws one global batch of `world x batch_size` rows, and the process
/// of rank `r` trains on its `r`-th slice. Gradients (and the step's loss and statistics)
/// are summed over all processes through Burn's collective engine (`burn-collective`),
/// whose global orchestrator `kiln orchestrator --port P` runs, so every process takes the
/// same optimizer step. Rank 0 writes checkpoints, metrics and the status into the run
/// directory, which all processes must see (a shared file system, or the same machine).
///
/// Keys a launcher sets per process can come from the environment instead:
/// `KILN_RANK` (or torchrun's `RANK`) for `rank`, `KILN_ORCHESTRATOR` for `orchestrator`,
/// `KILN_NODE_HOST` for `host` and `KILN_DATA_PORT` for `data_port`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DistributedSection {
    /// Machines taking part.
    #[serde(default = "default_one_u32")]
    pub nodes: u32,
    /// Processes per machine, one per device: global rank `node_rank x devices_per_node +
    /// local_rank`, and a process uses device `rank % devices_per_node` of its machine.
    #[serde(default = "default_one_u32")]
    pub devices_per_node: u32,
    /// This process's global rank, in `0..nodes x devices_per_node`.
    #[serde(default)]
    pub rank: u32,
    /// `host:port` of the global orchestrator (`kiln orchestrator --port P`).
    #[serde(default = "default_orchestrator")]
    pub orchestrator: String,
    /// Address the other processes reach this one at.
    #[serde(default = "default_node_host")]
    pub host: String,
    /// Base port of the processes' tensor data services: the process of rank `r` listens
    /// on `data_port + r % devices_per_node` (or `+ r` when every process runs on this
    /// host, `host` being a loopback address).
    #[serde(default = "default_data_port")]
    pub data_port: u16,
    /// All-reduce strategy across processes: `tree`, `ring` or `centralized`.
    #[serde(default = "default_all_reduce")]
    pub strategy: String,
    /// Seconds to wait for every process to join a step's all-reduce before stopping with
    /// an error (a dead or stuck peer); the first step also waits for the peers to start.
    #[serde(default = "default_peer_timeout")]
    pub timeout_s: f64,
}

fn default_one_u32() -> u32 {
    1
}
fn default_orchestrator() -> String {
    "127.0.0.1:7300".to_string()
}
fn default_node_host() -> String {
    "127.0.0.1".to_string()
}
fn default_data_port() -> u16 {
    7301
}
fn default_all_reduce() -> String {
    "tree".to_string()
}
fn default_peer_timeout() -> f64 {
    120.0
}

/// `[dream]`: every `every` steps, a consolidation cycle turns the recent gradient statistics
/// of each parameter tensor and the routers' path usage into learning-rate multipliers,
/// which the optimizer applies until the next cycle. The gradient statistic is the relative
/// jitter: the exponential average of the step-to-step change of the tensor's gradient RMS,
/// over the average RMS.
///
/// - crystallize: a tensor whose relative jitter is below `crystallize_below` has settled:
///   its multiplier is multiplied by `crystallize_factor`;
/// - dissolve: a tensor whose relative jitter is above `dissolve_above` is oscillating: its
///   multiplier is multiplied by `dissolve_factor`;
/// - prune: the tensors of a router path used by fewer than `prune_below` of its fair share
///   of tokens are multiplied by `prune_factor` (the path fades instead of wasting updates);
/// - diagnose: path usage and router confidence per layer go into the cycle's report.
///
/// Multipliers stay within `[min_multiplier, max_multiplier]`, are checkpointed, and every
/// cycle appends one row to the run's `dream.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DreamSection {
    /// Optimizer steps between cycles.
    pub every: u64,
    /// Decay of the exponential averages of each tensor's gradient RMS (per step).
    #[serde(default = "default_dream_ema")]
    pub ema: f64,
    /// Relative jitter of the gradient RMS below which a tensor crystallizes.
    #[serde(default = "default_crystallize_below")]
    pub crystallize_below: f64,
    /// Multiplier factor of a crystallizing tensor (below 1).
    #[serde(default = "default_crystallize_factor")]
    pub crystallize_factor: f64,
    /// Relative jitter of the gradient RMS above which a tensor dissolves.
    #[serde(default = "default_dissolve_above")]
    pub dissolve_above: f64,
    /// Multiplier factor of a dissolving tensor (above 1).
    #[serde(default = "default_dissolve_factor")]
    pub dissolve_factor: f64,
    /// Fraction of its fair share of tokens (`top_k / paths`) under which a router path is
    /// pruned.
    #[serde(default = "default_prune_below")]
    pub prune_below: f64,
    /// Multiplier factor of a pruned path's tensors (below 1).
    #[serde(default = "default_prune_factor")]
    pub prune_factor: f64,
    /// Lowest multiplier.
    #[serde(default = "default_min_multiplier")]
    pub min_multiplier: f64,
    /// Highest multiplier.
    #[serde(default = "default_max_multiplier")]
    pub max_multiplier: f64,
}

fn default_dream_ema() -> f64 {
    0.9
}
fn default_crystallize_below() -> f64 {
    0.15
}
fn default_crystallize_factor() -> f64 {
    0.9
}
fn default_dissolve_above() -> f64 {
    0.6
}
fn default_dissolve_factor() -> f64 {
    1.1
}
fn default_prune_below() -> f64 {
    0.25
}
fn default_prune_factor() -> f64 {
    0.5
}
fn default_min_multiplier() -> f64 {
    0.05
}
fn default_max_multiplier() -> f64 {
    4.0
}

/// `[adapter]`: LoRA (PEFT semantics) on a frozen base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    /// `lora` (f32 frozen base) or `qlora` (NF4 double-quantized frozen base).
    pub kind: AdapterKind,
    /// Rank r of each adapter.
    pub rank: usize,
    /// Scale numerator: the update is `B(A(x)) * alpha / r` (`alpha / sqrt(r)` with rslora).
    pub alpha: f64,
    /// Dropout on the adapter input, in training only.
    #[serde(default)]
    pub dropout: f64,
    /// Projections that get adapters (default: all seven).
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    /// Rank-stabilized LoRA scaling `alpha / sqrt(r)`.
    #[serde(default)]
    pub rslora: bool,
}

/// The projections LoRA can target.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn default_targets() -> Vec<String> {
    LORA_TARGETS.iter().map(|s| s.to_string()).collect()
}

/// Adapter kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// LoRA on an f32 frozen base.
    Lora,
    /// LoRA on an NF4 double-quantized frozen base.
    Qlora,
}

/// `[run]`: identity and placement of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Name of the run; the run directory is `<out_dir>/<name>/`.
    pub name: String,
    /// Seed for model initialization and data mixing.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Directory under which the run directory is created.
    #[serde(default = "default_out_dir")]
    pub out_dir: String,
    /// Compute backend: `flex` (default, CPU), `ndarray` (CPU), `cuda` or `wgpu`.
    #[serde(default)]
    pub backend: BackendKind,
    /// Device on the backend: `cpu` for the CPU backends; `cuda` / `cuda:N` for `cuda`;
    /// for `wgpu`, `default` (the adapter wgpu ranks first), `discrete:N`, `integrated:N`,
    /// `virtual:N` (the N-th adapter of that kind) or `software` (a CPU driver such as
    /// Mesa's lavapipe).
    #[serde(default = "default_device")]
    pub device: String,
    /// burn-fusion on the `cuda` and `wgpu` backends: element-wise chains and reductions
    /// compiled into fused kernels at run time (Burn's default, `true`). `false` runs each
    /// tensor operation as its own kernel: the switch for a fusion bug. The CPU backends
    /// never fuse.
    #[serde(default = "default_fusion")]
    pub fusion: bool,
    /// Stop cleanly (checkpoint, then exit) after this much wall time of a session, e.g.
    /// `"90s"`, `"45m"`, `"2h"`; `"none"` for no limit. The default is DiscoverLM's one-day
    /// rule, `"24h"`. A resumed run gets the same budget again.
    #[serde(default = "default_max_wall_time")]
    pub max_wall_time: String,
}

fn default_max_wall_time() -> String {
    "24h".to_string()
}

fn default_seed() -> u64 {
    0
}

fn default_out_dir() -> String {
    "runs".to_string()
}

fn default_device() -> String {
    "cpu".to_string()
}

fn default_fusion() -> bool {
    true
}

/// A `wgpu` device as `run.device` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgpuDeviceSpec {
    /// The adapter wgpu ranks first (a high-performance GPU when there is one).
    Default,
    /// The N-th discrete GPU.
    Discrete(usize),
    /// The N-th integrated GPU.
    Integrated(usize),
    /// The N-th virtual GPU.
    Virtual(usize),
    /// A driver that runs on the CPU (Mesa's lavapipe, WARP).
    Software,
}

impl WgpuDeviceSpec {
    /// Parses `default`, `discrete:N`, `integrated:N`, `virtual:N` or `software`; `None`
    /// for anything else.
    pub fn parse(device: &str) -> Option<Self> {
        let indexed = |prefix: &str| -> Option<usize> {
            device.strip_prefix(prefix)?.strip_prefix(':')?.parse().ok()
        };
        match device {
            "default" => Some(Self::Default),
            "software" => Some(Self::Software),
            _ => indexed("discrete")
                .map(Self::Discrete)
                .or_else(|| indexed("integrated").map(Self::Integrated))
                .or_else(|| indexed("virtual").map(Self::Virtual)),
        }
    }
}

/// The tensor backend a run executes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn-flex: the fastest CPU backend measured here (the default).
    #[default]
    Flex,
    /// burn-ndarray: the reference CPU backend.
    Ndarray,
    /// burn-cuda: NVIDIA GPUs (needs a build with `--features cuda`).
    Cuda,
    /// burn-wgpu: GPUs through Vulkan (Linux, Windows), Metal (macOS) or DX12 (Windows);
    /// needs a build with `--features wgpu`.
    Wgpu,
}

impl BackendKind {
    /// The name as written in recipes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Ndarray => "ndarray",
            Self::Cuda => "cuda",
            Self::Wgpu => "wgpu",
        }
    }

    /// The device a run on this backend uses when none is named: `cpu`, `cuda:0`, or
    /// wgpu's `default` adapter.
    pub fn default_device(self) -> &'static str {
        match self {
            Self::Flex | Self::Ndarray => "cpu",
            Self::Cuda => "cuda:0",
            Self::Wgpu => "default",
        }
    }
}

/// `[model]`: which family, and that family's own table (`[model.qwen2]`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The model family.
    pub family: ModelFamily,
    /// Settings of the `qwen2` family; required when `family = "qwen2"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qwen2: Option<Qwen2Section>,
    /// Settings of the `moa` family; required when `family = "moa"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moa: Option<MoaSection>,
    /// Settings of the `convgpt` family; required when `family = "convgpt"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convgpt: Option<ConvgptSection>,
}

/// `[model.convgpt]`: a ConvGPT-v2 language model (random init), free of dense
/// self-attention.
///
/// Each layer fuses a causal depthwise 1D convolution along the sequence with a causal
/// `conv2d_kernel x conv2d_kernel` convolution over the token grid (position `t` sits at
/// cell `d2xy(grid_order, t)` of the Hilbert curve), through a per-token, per-channel gate,
/// then a SwiGLU MLP; every `memory_every`-th layer adds chunk-token memory retrieval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConvgptSection {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_layers: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Heads of the chunk-memory attention.
    pub num_heads: usize,
    /// Kernel of the causal depthwise 1D convolution.
    #[serde(default = "default_conv_kernel")]
    pub conv_kernel: usize,
    /// Side of the causal 2D convolution's window over the grid (odd).
    #[serde(default = "default_conv2d_kernel")]
    pub conv2d_kernel: usize,
    /// The grid is `2^grid_order` cells on a side: `4^grid_order` positions (8: 256 x 256 =
    /// 65,536), the longest sequence.
    #[serde(default = "default_grid_order")]
    pub grid_order: u32,
    /// Every this many layers (the 2nd, 4th, ...) carry chunk-token memory (0: none).
    #[serde(default = "default_memory_every")]
    pub memory_every: usize,
    /// Tokens per memory chunk.
    #[serde(default = "default_memory_chunk")]
    pub memory_chunk: usize,
    /// Earlier chunks each token retrieves.
    #[serde(default = "default_memory_top_k")]
    pub memory_top_k: usize,
    /// Which memory layers rotate their queries and keys: `alternate` (the 1st, 3rd, ...),
    /// `all` or `none`; the others use no positions at all.
    #[serde(default)]
    pub rope: RopeLayers,
    /// RoPE base frequency.
    #[serde(default = "default_moa_rope_theta")]
    pub rope_theta: f64,
    /// Share the embedding with the output head.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// RMSNorm epsilon.
    #[serde(default = "default_moa_eps")]
    pub rms_norm_eps: f64,
    /// Standard deviation of the normal initialization.
    #[serde(default = "default_moa_init")]
    pub initializer_range: f64,
}

/// Which chunk-memory layers use rotary positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RopeLayers {
    /// Every other memory layer, starting with the first.
    #[default]
    Alternate,
    /// Every memory layer.
    All,
    /// None: positions come from the convolutions only.
    None,
}

fn default_true() -> bool {
    true
}
fn default_conv2d_kernel() -> usize {
    3
}
fn default_grid_order() -> u32 {
    8
}
fn default_memory_every() -> usize {
    2
}
fn default_memory_chunk() -> usize {
    64
}
fn default_memory_top_k() -> usize {
    4
}

/// `[model.moa]`: a DiscoverLM mixture-of-attentions language model (random init).
///
/// Each block routes every token to the top-2 of four paths (local causal depthwise conv,
/// multi-head metric attention, gated channel mixing, multi-query metric attention), then
/// through a HyperFFN that routes it to the top-2 of three experts (SwiGLU, causal
/// depthwise-separable conv, gated low-rank bottleneck). The embedding is tied to the head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MoaSection {
    /// Vocabulary size (rows of the tied embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of MoA blocks.
    pub num_layers: usize,
    /// Heads of both metric attentions (the multi-query path shares one key/value head).
    pub num_heads: usize,
    /// Width of the HyperFFN's SwiGLU expert.
    pub intermediate_size: usize,
    /// Rank of the HyperFFN's gated low-rank expert (default `hidden_size / 8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_rank: Option<usize>,
    /// Kernel of the local causal depthwise convolutions (path and HyperFFN expert).
    #[serde(default = "default_conv_kernel")]
    pub conv_kernel: usize,
    /// Paths (and HyperFFN experts) each token is routed to.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Probability of dropping a block's residual branch for a whole sequence in training
    /// (DropPath), rising linearly from 0 at the first block to this at the last.
    #[serde(default)]
    pub drop_path: f64,
    /// Longest sequence, and the period of BlackHoleRoPE's Fourier perturbation.
    #[serde(default = "default_moa_max_position")]
    pub max_position_embeddings: usize,
    /// RoPE base frequency of BlackHoleRoPE.
    #[serde(default = "default_moa_rope_theta")]
    pub rope_theta: f64,
    /// Fourier terms of BlackHoleRoPE's learned angle perturbation.
    #[serde(default = "default_rope_fourier")]
    pub rope_fourier: usize,
    /// Bound of the value energy gate `1 + beta * tanh(.)`.
    #[serde(default = "default_energy_beta")]
    pub energy_beta: f64,
    /// Logit penalty per unit of distance a key lies outside its head's learned ball
    /// (0: no ball pruning).
    #[serde(default = "default_ball_sharpness")]
    pub ball_sharpness: f64,
    /// Weight of the triangle-inequality regularizer.
    #[serde(default = "default_triangle_weight")]
    pub triangle_weight: f64,
    /// Triples sampled per sequence, layer and attention path for the regularizer.
    #[serde(default = "default_triangle_samples")]
    pub triangle_samples: usize,
    /// Weight of the routers' load-balancing loss.
    #[serde(default = "default_balance_weight")]
    pub balance_weight: f64,
    /// RMSNorm epsilon.
    #[serde(default = "default_moa_eps")]
    pub rms_norm_eps: f64,
    /// Standard deviation of the normal initialization.
    #[serde(default = "default_moa_init")]
    pub initializer_range: f64,
}

fn default_conv_kernel() -> usize {
    4
}
fn default_top_k() -> usize {
    2
}
fn default_moa_max_position() -> usize {
    2048
}
fn default_moa_rope_theta() -> f64 {
    10_000.0
}
fn default_rope_fourier() -> usize {
    4
}
fn default_energy_beta() -> f64 {
    0.5
}
fn default_ball_sharpness() -> f64 {
    4.0
}
fn default_triangle_weight() -> f64 {
    0.01
}
fn default_triangle_samples() -> usize {
    64
}
fn default_balance_weight() -> f64 {
    0.01
}
fn default_moa_eps() -> f64 {
    1e-6
}
fn default_moa_init() -> f64 {
    0.02
}

/// The model families kiln knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelFamily {
    /// A Qwen2 / Qwen2.5 decoder (Hugging Face `Qwen2ForCausalLM`).
    Qwen2,
    /// DiscoverLM's mixture-of-attentions language model.
    Moa,
    /// ConvGPT-v2: causal 1D + Hilbert-grid 2D convolutions with chunk-token memory.
    Convgpt,
}

impl ModelFamily {
    /// The name as written in recipes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qwen2 => "qwen2",
            Self::Moa => "moa",
            Self::Convgpt => "convgpt",
        }
    }
}

/// `[model.qwen2]`: a Qwen2 configuration, named as in Hugging Face's `Qwen2Config`.
///
/// Either `hf_dir` names a Hugging Face model directory (its `config.json` gives the
/// architecture, and its safetensors the weights unless `init = "random"`), or the
/// architecture keys below are written out (and the weights start random).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Qwen2Section {
    /// A local Hugging Face model directory (`config.json` + `model.safetensors` or a
    /// sharded `model.safetensors.index.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_dir: Option<String>,
    /// How the weights start: `pretrained` (from `hf_dir`; the default when it is set) or
    /// `random` (from `run.seed`; the default otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitKind>,
    /// Vocabulary size (rows of the embedding and the output head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    /// Width of the residual stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<usize>,
    /// Width of the SwiGLU MLP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
    /// Number of decoder layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_hidden_layers: Option<usize>,
    /// Number of query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<usize>,
    /// Number of key/value heads (grouped-query attention); must divide the query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Longest sequence the model is configured for (default 2048).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    /// RoPE base frequency (default 1e6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RMSNorm epsilon (default 1e-6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rms_norm_eps: Option<f64>,
    /// Share the embedding matrix with the output head (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    /// Standard deviation of the normal initialization (default 0.02).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializer_range: Option<f64>,
}

impl Qwen2Section {
    /// The architecture keys (all but `hf_dir` and `init`) with their values, if set.
    pub fn architecture_keys(&self) -> [(&'static str, bool); 11] {
        [
            ("vocab_size", self.vocab_size.is_some()),
            ("hidden_size", self.hidden_size.is_some()),
            ("intermediate_size", self.intermediate_size.is_some()),
            ("num_hidden_layers", self.num_hidden_layers.is_some()),
            ("num_attention_heads", self.num_attention_heads.is_some()),
            ("num_key_value_heads", self.num_key_value_heads.is_some()),
            (
                "max_position_embeddings",
                self.max_position_embeddings.is_some(),
            ),
            ("rope_theta", self.rope_theta.is_some()),
            ("rms_norm_eps", self.rms_norm_eps.is_some()),
            ("tie_word_embeddings", self.tie_word_embeddings.is_some()),
            ("initializer_range", self.initializer_range.is_some()),
        ]
    }

    /// The effective init kind.
    pub fn init_kind(&self) -> InitKind {
        self.init.unwrap_or(if self.hf_dir.is_some() {
            InitKind::Pretrained
        } else {
            InitKind::Random
        })
    }
}

/// How model weights are initialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InitKind {
    /// Random init from `run.seed`.
    Random,
    /// The weights of `hf_dir`.
    Pretrained,
}

/// `[tokenizer]`: how text becomes ids.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSection {
    /// The tokenizer kind.
    #[serde(default)]
    pub kind: TokenizerKind,
    /// For `hf`: a `tokenizer.json`, or a directory holding one (e.g. the model's `hf_dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// End-of-text token appended to every document (default: the first of
    /// `<|endoftext|>`, `</s>`, `<eos>`, `<|end_of_text|>` the tokenizer has).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos: Option<String>,
    /// Padding token (never trained on; default: `<|pad|>` if present, else `eos`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad: Option<String>,
}

/// The tokenizers kiln knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per byte plus a few special tokens: needs no file.
    #[default]
    Bytes,
    /// A Hugging Face `tokenizer.json` (the `tokenizers` library).
    Hf,
}

/// `[data]`: the sources every phase draws from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Fraction of each source's documents (taken from its end, at least one document)
    /// held out for evaluation and never trained on.
    #[serde(default = "default_eval_holdout")]
    pub eval_holdout: f64,
    /// Where tokenized sources are cached (token ids and loss masks, memory-mapped), keyed
    /// by the source's files and settings and the tokenizer; default `<run.out_dir>/.cache`,
    /// so runs in one output directory share it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<String>,
    /// The sources, each with a unique name that phases refer to.
    pub sources: Vec<Source>,
}

fn default_eval_holdout() -> f64 {
    0.05
}

/// `[[data.sources]]`: one corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Name that phases use in their `sources` table.
    pub name: String,
    /// File format.
    pub format: SourceFormat,
    /// A file, a directory whose files (sorted by name, hidden ones skipped) are read in
    /// order, or a glob such as `shards/train-*.parquet` (matches sorted by name).
    pub path: String,
    /// For `text`: one document per file (`file`) or per blank-line-separated block
    /// (`blank_line`).
    #[serde(default)]
    pub split: TextSplit,
    /// For `jsonl`, `parquet` and `arrow`: the field (column) holding the document text.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// For `parquet` and `arrow` (and `jsonl`): build each document from several string
    /// columns instead of `text_field`, e.g. `"{query}\n\n{reasoning}\n\n{answer}"`;
    /// `{{` and `}}` are literal braces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Drop documents shorter than this many tokens (end-of-text included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<usize>,
    /// Drop documents longer than this many tokens (end-of-text included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// What a row that cannot be read does (a null or non-string value, malformed chat):
    /// `error` stops with the file, row group and column; `skip` drops the row and counts it.
    #[serde(default)]
    pub on_bad_row: BadRow,
    /// What the source does at the end of its data in a mixture: `restart` begins its next
    /// epoch; `stop` leaves the mixture after `epochs` passes (the other sources' weights
    /// are renormalized, and a phase whose sources have all stopped ends early).
    #[serde(default)]
    pub on_exhausted: Exhausted,
    /// With `on_exhausted = "stop"`: passes over the source before it stops (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u64>,
    /// For `jsonl` chat rows: the field holding the messages (system/user/assistant/tool,
    /// assistant `tool_calls`). Rows are rendered with the Qwen2.5 ChatML template and only
    /// assistant turns are trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_field: Option<String>,
    /// For chat rows: the field holding the tool definitions, if any.
    #[serde(default = "default_tools_field")]
    pub tools_field: String,
}

fn default_tools_field() -> String {
    "tools".to_string()
}

fn default_text_field() -> String {
    "text".to_string()
}

/// Source file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    /// UTF-8 plain text.
    Text,
    /// One JSON object per line.
    Jsonl,
    /// Apache Parquet, read one row group at a time.
    Parquet,
    /// Apache Arrow IPC, file or stream format (e.g. Hugging Face `datasets` cache files),
    /// read one record batch at a time.
    Arrow,
}

impl SourceFormat {
    /// The name as written in recipes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Jsonl => "jsonl",
            Self::Parquet => "parquet",
            Self::Arrow => "arrow",
        }
    }
}

/// What a source does when its data runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Exhausted {
    /// Start the next epoch.
    #[default]
    Restart,
    /// Leave the mixture.
    Stop,
}

/// What to do with a row that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BadRow {
    /// Stop with an error naming the file, row and column.
    #[default]
    Error,
    /// Drop the row and count it (logged, and shown by `kiln data inspect`).
    Skip,
}

/// How a text file is split into documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TextSplit {
    /// The whole file is one document.
    #[default]
    File,
    /// Blocks separated by one or more blank lines are documents.
    BlankLine,
}

/// `[[phases]]`: one stage of the curriculum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Name shown in logs and metrics; defaults to `phase-<index>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Mixture: source name to relative weight.
    pub sources: BTreeMap<String, f64>,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence (the model sees `window` inputs and predicts `window` targets).
    pub window: usize,
    /// How documents are cut into windows.
    #[serde(default)]
    pub windowing: Windowing,
    /// For `belt`: tokens shared by consecutive windows of one document (context only,
    /// not trained twice).
    #[serde(default)]
    pub overlap: usize,
    /// Length of the phase in optimizer steps (exactly one of `steps`, `tokens` and
    /// `epochs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// Length of the phase in training tokens, rounded up to whole optimizer steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Length of the phase in passes over its data: `epochs` times the windows that one
    /// pass over each of its sources yields (under the phase's windowing), in whole optimizer
    /// steps. Resolved into `steps` when a run starts, once the data is read; the run's
    /// `recipe.resolved.toml` records the steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<f64>,
    /// Multiplier on the scheduled learning rate during this phase.
    #[serde(default = "default_lr_scale")]
    pub lr_scale: f64,
}

fn default_lr_scale() -> f64 {
    1.0
}

/// Windowing modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Windowing {
    /// Each document is cut into consecutive windows: every token trained, order kept.
    #[default]
    Belt,
    /// Documents are concatenated with end-of-text separators and cut into full windows.
    Pack,
    /// Each document yields one window; the rest of it is dropped.
    Truncate,
}

impl Windowing {
    /// The name as written in recipes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Belt => "belt",
            Self::Pack => "pack",
            Self::Truncate => "truncate",
        }
    }
}

/// `[optim]`: AdamW.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    /// The optimizer kind.
    #[serde(default)]
    pub kind: OptimKind,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Exponential decay rates of the first and second moments.
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// Term added to the denominator for numerical stability.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay (applied to matrices; norms and biases are not decayed).
    #[serde(default)]
    pub weight_decay: f64,
}

impl Default for OptimSection {
    fn default() -> Self {
        Self {
            kind: OptimKind::default(),
            lr: default_lr(),
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: 0.0,
        }
    }
}

fn default_lr() -> f64 {
    1e-3
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}

fn default_eps() -> f64 {
    1e-8
}

/// Optimizer kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OptimKind {
    /// AdamW with f32 moments.
    #[default]
    Adamw,
    /// AdamW with both moments blockwise-quantized to 8 bits (bitsandbytes' dynamic maps,
    /// blocks of 256; tensors under 4096 values keep f32 moments).
    Adamw8bit,
}

/// `[schedule]`: learning rate against the optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// Shape after warmup.
    #[serde(default)]
    pub kind: ScheduleKind,
    /// Steps of linear warmup from zero to `optim.lr`.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Floor that `linear` and `cosine` decay to at the last step.
    #[serde(default)]
    pub min_lr: f64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::default(),
            warmup_steps: 0,
            min_lr: 0.0,
        }
    }
}

/// Schedule shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Constant at `optim.lr` after warmup.
    #[default]
    Constant,
    /// Linear decay to `min_lr`.
    Linear,
    /// Half-cosine decay to `min_lr`.
    Cosine,
}

/// `[train]`: loop settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Micro-batches accumulated per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Clip gradients to this global L2 norm (absent: no clipping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_norm: Option<f64>,
    /// Write a checkpoint every this many optimizer steps (and at the end).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// How many of the newest checkpoints to keep.
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Evaluate every this many optimizer steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Held-out tokens scored per evaluation.
    #[serde(default = "default_eval_tokens")]
    pub eval_tokens: u64,
    /// Window of evaluation sequences (default: the first phase's window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_window: Option<usize>,
    /// NEFTune: in training only, add `U(-m, m)` noise to the input embeddings with
    /// `m = alpha / sqrt(seq * hidden)` (0: off; the Convergent-7B recipe uses 5).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub neftune_alpha: f64,
    /// Keep only each layer's input for the backward pass and recompute the layer there
    /// (gradient checkpointing): activation memory of one layer instead of all, for about
    /// one more forward pass of compute.
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// Compute the output head and its cross-entropy over this many tokens of a
    /// micro-batch at a time, each chunk's backward right after its forward, so that only
    /// one chunk's `[tokens, vocab]` logits and their gradient are ever alive (absent: the
    /// whole micro-batch at once). With a large vocabulary this is most of the activation
    /// memory: Qwen2.5's 152,064-entry head over 8,192 tokens is 15 GiB in f32 at once,
    /// 1.9 GiB in chunks of 1,024. Same loss and gradients up to summation order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_chunk_tokens: Option<usize>,
    /// Convergence guard: stop (finished, with a message) when the best evaluation loss of
    /// the last `convergence_window` steps is not at least `convergence_min_improvement`
    /// (a fraction) below the best before them. 0: off. Needs `eval_every`.
    #[serde(default)]
    pub convergence_window: u64,
    /// Fraction by which the evaluation loss must improve over `convergence_window` steps.
    #[serde(default = "default_min_improvement")]
    pub convergence_min_improvement: f64,
    /// Phases whose tokens per step differ are intended (no warning).
    #[serde(default)]
    pub varying_tokens_per_step: bool,
}

fn default_min_improvement() -> f64 {
    0.01
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            grad_accum: 1,
            clip_norm: None,
            checkpoint_every: default_checkpoint_every(),
            keep_checkpoints: default_keep(),
            eval_every: 0,
            eval_tokens: default_eval_tokens(),
            eval_window: None,
            neftune_alpha: 0.0,
            activation_checkpointing: false,
            head_chunk_tokens: None,
            convergence_window: 0,
            convergence_min_improvement: default_min_improvement(),
            varying_tokens_per_step: false,
        }
    }
}

fn one() -> usize {
    1
}

fn default_checkpoint_every() -> u64 {
    500
}

fn default_keep() -> usize {
    3
}

fn default_eval_tokens() -> u64 {
    16_384
}

impl Phase {
    /// The phase's display name.
    pub fn display_name(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("phase-{index}"))
    }
}
